//! The embedded store: an in-process, single-node store for `--dev` mode and
//! the quickstart. It keeps etcd's semantics (revisions, leases with expiry,
//! compare-and-put, resumable ordered watches, compaction) so the control
//! plane cannot tell it from etcd, and it passes the same conformance suite.
//! It does not persist: a restart starts from revision 1.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use tokio::{
    sync::{watch, Notify},
    time::Instant,
};

use super::{
    CasOutcome, Deleted, EventKind, History, KeyValue, Lease, LeaseId, Page, PageRead, Replaced,
    Snapshot, Store, StoreError, WatchEvent, WatchMessage, WatchStream,
};

/// Settings of the embedded store.
#[derive(Clone, Debug)]
pub struct EmbeddedStoreConfig {
    /// Changes kept for watches that resume from an older revision; older
    /// ones are compacted away automatically.
    pub history_limit: usize,
    /// Shortest lease the store grants (etcd raises short TTLs the same way).
    pub min_lease_ttl: Duration,
}

impl Default for EmbeddedStoreConfig {
    fn default() -> Self {
        Self {
            history_limit: 100_000,
            min_lease_ttl: Duration::from_secs(1),
        }
    }
}

/// One key's change in a commit: the new value and lease, or None to delete.
type Change = (String, Option<(Vec<u8>, LeaseId)>);

#[derive(Debug)]
struct LeaseState {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// A change in the history, with the key as it was before it (what a
/// delete removed, and what a read at an older revision sees).
#[derive(Debug)]
struct Logged {
    event: WatchEvent,
    prev: Option<KeyValue>,
}

impl Logged {
    fn revision(&self) -> u64 {
        self.event.kv.mod_revision
    }
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    /// Every change with revision > compacted is in `history`.
    compacted: u64,
    kvs: BTreeMap<String, KeyValue>,
    leases: HashMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    history: VecDeque<Logged>,
}

#[derive(Debug)]
struct Shared {
    config: EmbeddedStoreConfig,
    state: Mutex<State>,
    /// Current revision, for watchers to wait on.
    revision: watch::Sender<u64>,
    /// Wakes the lease reaper when a deadline moves earlier.
    reaper: Arc<Notify>,
}

/// In-process store. Cheap to clone; clones share the data.
#[derive(Clone, Debug)]
pub struct EmbeddedStore {
    shared: Arc<Shared>,
}

impl EmbeddedStore {
    /// Creates an empty store and starts its lease reaper on the current
    /// tokio runtime. The reaper stops when the last clone is dropped.
    pub fn new(config: EmbeddedStoreConfig) -> Self {
        let shared = Arc::new(Shared {
            config,
            state: Mutex::new(State {
                next_lease: 1,
                ..State::default()
            }),
            revision: watch::channel(0).0,
            reaper: Arc::new(Notify::new()),
        });
        tokio::spawn(reap_leases(Arc::downgrade(&shared)));
        Self { shared }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding the lock cannot leave State half-written in a way
    // that matters more than losing the process, so take the data anyway.
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Applies a batch of changes as one revision. Returns that revision.
    fn commit(&self, state: &mut State, changes: Vec<Change>) -> u64 {
        state.revision += 1;
        let rev = state.revision;
        for (key, change) in changes {
            match change {
                Some((value, lease)) => {
                    let create_revision = match state.kvs.get(&key) {
                        Some(old) => {
                            if old.lease != 0 && old.lease != lease {
                                if let Some(l) = state.leases.get_mut(&old.lease) {
                                    l.keys.remove(&key);
                                }
                            }
                            old.create_revision
                        }
                        None => rev,
                    };
                    if lease != 0 {
                        if let Some(l) = state.leases.get_mut(&lease) {
                            l.keys.insert(key.clone());
                        }
                    }
                    let kv = KeyValue {
                        key: key.clone(),
                        value,
                        create_revision,
                        mod_revision: rev,
                        lease,
                    };
                    let prev = state.kvs.insert(key, kv.clone());
                    state.history.push_back(Logged {
                        event: WatchEvent {
                            kind: EventKind::Put,
                            kv,
                        },
                        prev,
                    });
                }
                None => {
                    if let Some(old) = state.kvs.remove(&key) {
                        if old.lease != 0 {
                            if let Some(l) = state.leases.get_mut(&old.lease) {
                                l.keys.remove(&key);
                            }
                        }
                        state.history.push_back(Logged {
                            event: WatchEvent {
                                kind: EventKind::Delete,
                                kv: KeyValue {
                                    key,
                                    value: Vec::new(),
                                    create_revision: 0,
                                    mod_revision: rev,
                                    lease: 0,
                                },
                            },
                            prev: Some(old),
                        });
                    }
                }
            }
        }
        while state.history.len() > self.config.history_limit {
            if let Some(ev) = state.history.pop_front() {
                state.compacted = state.compacted.max(ev.revision());
            }
        }
        // Keep `compacted` on a revision boundary: drop the rest of a
        // partially evicted revision too.
        while state
            .history
            .front()
            .is_some_and(|ev| ev.revision() <= state.compacted)
        {
            state.history.pop_front();
        }
        self.revision.send_replace(rev);
        rev
    }

    fn revoke(&self, state: &mut State, lease: LeaseId) -> bool {
        match state.leases.remove(&lease) {
            Some(l) => {
                if !l.keys.is_empty() {
                    let changes = l.keys.into_iter().map(|k| (k, None)).collect();
                    self.commit(state, changes);
                }
                true
            }
            None => false,
        }
    }
}

async fn reap_leases(shared: std::sync::Weak<Shared>) {
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let next = {
            let mut state = lock(&strong);
            let now = Instant::now();
            let expired: Vec<LeaseId> = state
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| *id)
                .collect();
            for id in expired {
                strong.revoke(&mut state, id);
                tracing::debug!(lease = id, "embedded store: lease expired");
            }
            state.leases.values().map(|l| l.deadline).min()
        };
        // Hold only a weak reference while sleeping so dropping the store
        // stops the reaper; wake at least every second to notice that.
        let wake = next
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(1))
            .min(Instant::now() + Duration::from_secs(1));
        let reaper = strong.reaper.clone();
        drop(strong);
        let notified = reaper.notified();
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = notified => {}
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.lock().kvs.get(key).cloned())
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let state = self.lock();
        let kvs = state
            .kvs
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect();
        Ok(Snapshot {
            kvs,
            revision: state.revision,
        })
    }

    async fn range_page(
        &self,
        prefix: &str,
        revision: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PageRead, StoreError> {
        let state = self.lock();
        let at = if revision == 0 {
            state.revision
        } else {
            revision
        };
        if at > state.revision {
            return Err(StoreError::Protocol(format!(
                "range revision {at} is in the future (current {})",
                state.revision
            )));
        }
        // Every change after `compacted` is in the history, so the keys as
        // they were at any revision from there on can be rebuilt.
        if at < state.compacted {
            return Ok(PageRead::Compacted);
        }
        let limit = limit.max(1);
        let lower = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let wanted = |key: &str| {
            key.starts_with(prefix)
                && match lower {
                    Bound::Excluded(after) => key > after,
                    _ => true,
                }
        };
        // Keys changed after `at`, as they were at `at` (None: absent). The
        // oldest change after `at` holds that state, so walking newest first,
        // the last one written wins.
        let mut then: BTreeMap<&str, Option<&KeyValue>> = BTreeMap::new();
        for logged in state.history.iter().rev() {
            if logged.revision() <= at {
                break;
            }
            let key = logged.event.kv.key.as_str();
            if wanted(key) {
                then.insert(key, logged.prev.as_ref());
            }
        }
        let unchanged = state
            .kvs
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| !then.contains_key(k.as_str()))
            .map(|(_, kv)| kv)
            .take(limit + 1);
        let mut kvs: Vec<KeyValue> = then
            .values()
            .flatten()
            .copied()
            .take(limit + 1)
            .chain(unchanged)
            .cloned()
            .collect();
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        let more = kvs.len() > limit;
        kvs.truncate(limit);
        Ok(PageRead::Page(Page {
            kvs,
            revision: at,
            more,
        }))
    }

    async fn replace(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Replaced, StoreError> {
        let mut state = self.lock();
        let lease = lease.unwrap_or(0);
        if lease != 0 && !state.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let prev = state.kvs.get(key).cloned();
        let revision = self
            .shared
            .commit(&mut state, vec![(key.to_owned(), Some((value, lease)))]);
        Ok(Replaced { revision, prev })
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        let mut state = self.lock();
        let current = state.kvs.get(key);
        let actual = current.map_or(0, |kv| kv.mod_revision);
        if actual != expected {
            return Ok(CasOutcome::Conflict {
                current: current.cloned(),
            });
        }
        let lease = lease.unwrap_or(0);
        if lease != 0 && !state.leases.contains_key(&lease) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        let revision = self
            .shared
            .commit(&mut state, vec![(key.to_owned(), Some((value, lease)))]);
        Ok(CasOutcome::Written { revision })
    }

    async fn delete(&self, key: &str) -> Result<Deleted, StoreError> {
        let mut state = self.lock();
        if !state.kvs.contains_key(key) {
            return Ok(Deleted {
                existed: false,
                revision: state.revision,
            });
        }
        let revision = self.shared.commit(&mut state, vec![(key.to_owned(), None)]);
        Ok(Deleted {
            existed: true,
            revision,
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let ttl = ttl.max(self.shared.config.min_lease_ttl);
        let mut state = self.lock();
        let id = state.next_lease;
        state.next_lease += 1;
        state.leases.insert(
            id,
            LeaseState {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            },
        );
        drop(state);
        self.shared.reaper.notify_one();
        Ok(Lease { id, ttl })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        let mut state = self.lock();
        Ok(state.leases.get_mut(&lease).and_then(|l| {
            // Like etcd: a lease past its deadline is gone even if the reaper
            // has not run yet.
            let now = Instant::now();
            (l.deadline > now).then(|| {
                l.deadline = now + l.ttl;
                l.ttl
            })
        }))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut state = self.lock();
        Ok(self.shared.revoke(&mut state, lease))
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        let shared = self.shared.clone();
        let prefix = prefix.to_owned();
        let revisions = shared.revision.subscribe();
        let stream = futures::stream::unfold(Some((after_revision, revisions)), move |cursor| {
            let shared = shared.clone();
            let prefix = prefix.clone();
            async move {
                let (mut last, mut revisions) = cursor?;
                loop {
                    // Mark the current revision seen before reading the
                    // state, so a commit after the read wakes `changed`.
                    revisions.borrow_and_update();
                    let message = next_watch_message(&shared, &prefix, last);
                    match message {
                        Some((msg @ WatchMessage::Compacted { .. }, _)) => {
                            return Some((Ok(msg), None));
                        }
                        // Like etcd, say nothing when only other
                        // prefixes changed.
                        Some((WatchMessage::Progress { revision }, _)) => last = revision,
                        Some((msg, now)) => return Some((Ok(msg), Some((now, revisions)))),
                        None => {}
                    }
                    if revisions.changed().await.is_err() {
                        return None;
                    }
                }
            }
        });
        Ok(Box::pin(stream))
    }

    async fn history(&self, prefix: &str, after: u64, until: u64) -> Result<History, StoreError> {
        let state = self.lock();
        if after < state.compacted {
            return Ok(History::Compacted {
                compact_revision: state.compacted,
            });
        }
        let events = state
            .history
            .iter()
            .skip_while(|ev| ev.revision() <= after)
            .take_while(|ev| ev.revision() <= until)
            .filter(|ev| ev.event.kv.key.starts_with(prefix))
            .map(|ev| {
                let mut event = ev.event.clone();
                if event.kind == EventKind::Delete {
                    if let Some(prev) = &ev.prev {
                        event.kv.value.clone_from(&prev.value);
                    }
                }
                event
            })
            .collect();
        Ok(History::Events(events))
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let mut state = self.lock();
        if revision > state.revision {
            return Err(StoreError::Protocol(format!(
                "compact revision {revision} is in the future (current {})",
                state.revision
            )));
        }
        state.compacted = state.compacted.max(revision);
        let compacted = state.compacted;
        while state
            .history
            .front()
            .is_some_and(|ev| ev.revision() <= compacted)
        {
            state.history.pop_front();
        }
        Ok(())
    }
}

/// The next message for a watch of `prefix` that has seen everything up to
/// `last`, with the revision it brings the watch to; None if nothing is new.
fn next_watch_message(shared: &Shared, prefix: &str, last: u64) -> Option<(WatchMessage, u64)> {
    let state = lock(shared);
    if last < state.compacted {
        let compact_revision = state.compacted;
        return Some((
            WatchMessage::Compacted { compact_revision },
            compact_revision,
        ));
    }
    if state.revision <= last {
        return None;
    }
    let now = state.revision;
    let events: Vec<WatchEvent> = state
        .history
        .iter()
        .skip_while(|ev| ev.revision() <= last)
        .filter(|ev| ev.event.kv.key.starts_with(prefix))
        .map(|ev| ev.event.clone())
        .collect();
    if events.is_empty() {
        Some((WatchMessage::Progress { revision: now }, now))
    } else {
        Some((WatchMessage::Events(events), now))
    }
}
