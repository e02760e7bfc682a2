//! One feed for every subscriber of the hub: a snapshot, or the changes
//! after the revision it resumes from, then live changes, with a resync (a
//! fresh snapshot saying why) whenever it cannot be given exactly the
//! changes it missed.
//!
//! The algorithm is written once, in [`feed`]; what differs between the
//! registry `Watch` stream and the agents' policy stream (which records,
//! which message type, how a snapshot and a change look, the resync
//! wording) is a [`View`]: [`RegistryView`] (with its [`Filter`]) and
//! [`PolicyView`].
//!
//! Resuming from revision R: the changes after R come from this replica's
//! history when it holds them; older ones from the store's history, then
//! the replica's; a revision the store compacted, or one the replica cannot
//! read back, gets a resync. A subscriber that falls behind the broadcast
//! ring, or a replica that reloads its cache, resyncs every subscriber.

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLockReadGuard},
};

use tokio::sync::{broadcast, mpsc};
use weir_proto::{
    agent::v1::{policy_update, PolicyChange, PolicyUpdate},
    registry::v1::{watch_response::Kind, Event, EventType, ServiceProtection, WatchResponse},
};

use super::{
    cache::{Batch, State},
    chunk::chunk,
    record::{history_event, policy_change},
    Filter, Hub,
};
use weir_core::InstanceKey;

use crate::{
    keys::Keys,
    store::{History, WatchEvent},
};

/// Why a subscriber gets a fresh snapshot instead of the changes it missed.
#[derive(Debug)]
pub(super) enum Resync {
    /// It fell this many batches behind the broadcast ring.
    Lagged { missed: u64 },
    /// The replica reloaded its cache (its store watch ended).
    Reloaded,
    /// The store compacted the revision it resumes from.
    Compacted { start: u64, compact_revision: u64 },
    /// The store's history could not be read.
    Unreadable { start: u64, error: String },
    /// The revision is older than the replica's history, which the store's
    /// did not cover.
    BeforeHistory { start: u64, floor: u64 },
}

/// What one kind of subscriber follows, and how it is told.
pub(super) trait View: Send + Sync + 'static {
    /// A message of the subscriber's stream.
    type Message: Send + 'static;
    /// One change as the view keeps it while catching up.
    type Change: Send;

    /// The store prefix whose history holds this view's changes.
    fn history_prefix(&self, keys: &Keys) -> String;
    /// A change read from the store's history, if the view follows it.
    fn store_change(&self, keys: &Keys, change: WatchEvent) -> Option<Self::Change>;
    /// The changes of a batch that the view follows, with a revision after
    /// `after`.
    fn batch_changes(&self, batch: &Batch, after: u64) -> Vec<Self::Change>;
    /// A snapshot of the cache, and the revision it is at.
    fn snapshot(
        &self,
        state: RwLockReadGuard<'_, State>,
        reason: &str,
    ) -> (Vec<Self::Message>, u64);
    /// The messages that bring a resuming subscriber from its revision to
    /// the cache's, given the changes in between; and that revision.
    fn catch_up(
        &self,
        state: RwLockReadGuard<'_, State>,
        changes: Vec<Self::Change>,
    ) -> (Vec<Self::Message>, u64);
    /// The messages of a live batch for a subscriber at `after` (none if
    /// nothing in it concerns the subscriber).
    fn live(&self, batch: &Batch, after: u64) -> Vec<Self::Message>;
    /// The resync reason, as this stream words it.
    fn reason(&self, why: &Resync) -> String;
}

/// Starts feeding `view` from `start_revision` (0 = snapshot). The stream
/// ends when the hub stops; dropping the receiver unsubscribes.
pub(super) fn spawn<V: View>(
    hub: &Hub,
    view: V,
    start_revision: u64,
) -> mpsc::Receiver<V::Message> {
    let (out, rx) = mpsc::channel(hub.inner.config.subscriber_queue.max(1));
    let hub = hub.clone();
    tokio::spawn(async move {
        // Subscribe before reading the cache: nothing falls in between.
        let receiver = hub.inner.tx.subscribe();
        let mut closed = hub.inner.closed.subscribe();
        tokio::select! {
            reason = feed(&hub, &view, start_revision, receiver, &out) => {
                tracing::debug!(reason, "subscriber left");
            }
            _ = closed.wait_for(|c| *c) => {}
        }
    });
    rx
}

/// Feeds one subscriber until it leaves or the hub stops; returns why.
async fn feed<V: View>(
    hub: &Hub,
    view: &V,
    start_revision: u64,
    mut receiver: broadcast::Receiver<Arc<Batch>>,
    out: &mpsc::Sender<V::Message>,
) -> &'static str {
    // Before its first load a replica knows nothing to send: wait for it
    // (batches from then on are in `receiver`).
    let mut loaded = hub.inner.loaded.subscribe();
    if loaded.wait_for(|l| *l).await.is_err() {
        return "hub stopped";
    }
    let (initial, mut last) = initial(hub, view, start_revision).await;
    if send_all(out, initial).await.is_err() {
        return "subscriber closed the stream";
    }
    loop {
        let messages = match receiver.recv().await {
            Ok(batch) => match &*batch {
                Batch::Changes { revision, .. } if *revision > last => {
                    let messages = view.live(&batch, last);
                    last = *revision;
                    messages
                }
                Batch::Progress { revision } if *revision > last => {
                    last = *revision;
                    Vec::new()
                }
                Batch::Reset { .. } => {
                    let (messages, revision) =
                        view.snapshot(hub.read(), &view.reason(&Resync::Reloaded));
                    last = revision;
                    messages
                }
                _ => Vec::new(),
            },
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let (messages, revision) =
                    view.snapshot(hub.read(), &view.reason(&Resync::Lagged { missed }));
                last = revision;
                messages
            }
            Err(broadcast::error::RecvError::Closed) => return "hub stopped",
        };
        if send_all(out, messages).await.is_err() {
            return "subscriber closed the stream";
        }
    }
}

/// First messages for a new subscriber and the revision they bring it to.
async fn initial<V: View>(hub: &Hub, view: &V, start: u64) -> (Vec<V::Message>, u64) {
    if start == 0 {
        return view.snapshot(hub.read(), "");
    }
    let (floor, revision) = {
        let state = hub.read();
        (state.history_floor, state.revision)
    };
    if start >= revision {
        // Current (or ahead of this replica, which will catch up): only
        // changes after it are sent.
        return (Vec::new(), start);
    }
    // Older than this replica's own history (it started after R, or R fell
    // out of it): read the gap from the store, then go on from the
    // replica's history.
    let keys = &hub.inner.keys;
    let mut changes = Vec::new();
    let mut from = start;
    if start < floor {
        let resync = match hub
            .inner
            .store
            .history(&view.history_prefix(keys), start, floor)
            .await
        {
            Ok(History::Events(events)) => {
                changes.extend(
                    events
                        .into_iter()
                        .filter_map(|e| view.store_change(keys, e)),
                );
                from = floor;
                None
            }
            Ok(History::Compacted { compact_revision }) => Some(Resync::Compacted {
                start,
                compact_revision,
            }),
            Err(e) => Some(Resync::Unreadable {
                start,
                error: e.to_string(),
            }),
        };
        if let Some(why) = resync {
            return view.snapshot(hub.read(), &view.reason(&why));
        }
    }
    let state = hub.read();
    if from < state.history_floor {
        let why = Resync::BeforeHistory {
            start,
            floor: state.history_floor,
        };
        return view.snapshot(state, &view.reason(&why));
    }
    for batch in state.batches_after(from) {
        changes.extend(view.batch_changes(batch, from));
    }
    view.catch_up(state, changes)
}

async fn send_all<M>(out: &mpsc::Sender<M>, messages: Vec<M>) -> Result<(), ()> {
    for m in messages {
        out.send(m).await.map_err(|_| ())?;
    }
    Ok(())
}

impl Filter {
    fn matches(&self, k: &InstanceKey) -> bool {
        (self.namespace.is_empty() || self.namespace == k.namespace)
            && (self.service.is_empty() || self.service == k.service)
    }

    fn matches_event(&self, e: &Event) -> bool {
        e.instance.as_ref().is_some_and(|i| {
            (self.namespace.is_empty() || self.namespace == i.namespace)
                && (self.service.is_empty() || self.service == i.service)
        })
    }

    fn matches_protection(&self, p: &ServiceProtection) -> bool {
        (self.namespace.is_empty() || self.namespace == p.namespace)
            && (self.service.is_empty() || self.service == p.service)
    }
}

/// The registry `Watch` stream: instances matching a filter, with the
/// protection state of their services.
#[derive(Debug)]
pub(super) struct RegistryView {
    pub(super) filter: Filter,
}

impl View for RegistryView {
    type Message = WatchResponse;
    type Change = Event;

    fn history_prefix(&self, keys: &Keys) -> String {
        keys.root().to_owned()
    }

    fn store_change(&self, keys: &Keys, change: WatchEvent) -> Option<Event> {
        history_event(keys, change).filter(|e| self.filter.matches_event(e))
    }

    fn batch_changes(&self, batch: &Batch, after: u64) -> Vec<Event> {
        match batch {
            Batch::Changes { events, .. } => events
                .iter()
                .filter(|e| e.revision > after && self.filter.matches_event(e))
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn snapshot(
        &self,
        state: RwLockReadGuard<'_, State>,
        reason: &str,
    ) -> (Vec<WatchResponse>, u64) {
        let revision = state.revision;
        let events: Vec<Event> = state
            .instances
            .iter()
            .filter(|(k, _)| self.filter.matches(k))
            .map(|(_, i)| Event {
                r#type: EventType::Put as i32,
                instance: Some((**i).clone()),
                revision: i.revision,
            })
            .collect();
        let protection: Vec<ServiceProtection> = state
            .protected
            .values()
            .filter(|p| self.filter.matches_protection(p))
            .cloned()
            .collect();
        drop(state);
        (
            chunk(Kind::Snapshot, events, revision, reason, protection),
            revision,
        )
    }

    fn catch_up(
        &self,
        state: RwLockReadGuard<'_, State>,
        events: Vec<Event>,
    ) -> (Vec<WatchResponse>, u64) {
        let revision = state.revision;
        // The protection state of every service the gap touched, and of
        // every matching one in protection: what the watcher may have missed.
        let mut services: BTreeSet<(String, String)> = events
            .iter()
            .filter_map(|e| e.instance.as_ref())
            .map(|i| (i.namespace.clone(), i.service.clone()))
            .collect();
        services.extend(
            state
                .protected
                .values()
                .filter(|p| self.filter.matches_protection(p))
                .map(|p| (p.namespace.clone(), p.service.clone())),
        );
        let protection: Vec<ServiceProtection> = services
            .iter()
            .map(|(ns, svc)| state.protection(ns, svc))
            .collect();
        drop(state);
        let messages = if events.is_empty() && protection.is_empty() {
            vec![WatchResponse {
                kind: Kind::Progress as i32,
                revision,
                ..WatchResponse::default()
            }]
        } else {
            chunk(Kind::Changes, events, revision, "", protection)
        };
        (messages, revision)
    }

    fn live(&self, batch: &Batch, after: u64) -> Vec<WatchResponse> {
        let Batch::Changes {
            revision,
            protection,
            ..
        } = batch
        else {
            return Vec::new();
        };
        let flipped: Vec<ServiceProtection> = protection
            .iter()
            .filter(|p| self.filter.matches_protection(p))
            .cloned()
            .collect();
        let events = self.batch_changes(batch, after);
        if events.is_empty() && flipped.is_empty() {
            return Vec::new();
        }
        chunk(Kind::Changes, events, *revision, "", flipped)
    }

    fn reason(&self, why: &Resync) -> String {
        match why {
            Resync::Lagged { missed } => {
                format!("watcher fell behind by {missed} updates; resynced from a snapshot")
            }
            Resync::Reloaded => "the replica reloaded its cache from the store".to_owned(),
            Resync::Compacted {
                start,
                compact_revision,
            } => format!(
                "revision {start} was compacted in the store (compacted up to {compact_revision}); resynced from a snapshot"
            ),
            Resync::Unreadable { start, error } => format!(
                "could not read the changes after revision {start} ({error}); resynced from a snapshot"
            ),
            Resync::BeforeHistory { start, floor } => format!(
                "revision {start} is older than the history this replica holds (from {floor}); resynced from a snapshot"
            ),
        }
    }
}

/// The agents' policy stream: every traffic policy.
#[derive(Debug)]
pub(super) struct PolicyView;

impl View for PolicyView {
    type Message = PolicyUpdate;
    type Change = PolicyChange;

    fn history_prefix(&self, keys: &Keys) -> String {
        keys.policies_prefix("")
    }

    fn store_change(&self, keys: &Keys, change: WatchEvent) -> Option<PolicyChange> {
        let (ns, svc) = keys.parse_policy(&change.kv.key)?;
        policy_change(ns, svc, &change)
    }

    fn batch_changes(&self, batch: &Batch, after: u64) -> Vec<PolicyChange> {
        match batch {
            Batch::Changes { policies, .. } => policies
                .iter()
                .filter(|p| p.version > after)
                .cloned()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn snapshot(
        &self,
        state: RwLockReadGuard<'_, State>,
        reason: &str,
    ) -> (Vec<PolicyUpdate>, u64) {
        let update = PolicyUpdate {
            kind: policy_update::Kind::Snapshot as i32,
            changes: state.policies.values().map(|p| (**p).clone()).collect(),
            revision: state.revision,
            resync_reason: reason.to_owned(),
        };
        (vec![update], state.revision)
    }

    fn catch_up(
        &self,
        state: RwLockReadGuard<'_, State>,
        changes: Vec<PolicyChange>,
    ) -> (Vec<PolicyUpdate>, u64) {
        let revision = state.revision;
        drop(state);
        (vec![changes_update(changes, revision)], revision)
    }

    fn live(&self, batch: &Batch, after: u64) -> Vec<PolicyUpdate> {
        let changes = self.batch_changes(batch, after);
        if changes.is_empty() {
            return Vec::new();
        }
        vec![changes_update(changes, batch.revision())]
    }

    fn reason(&self, why: &Resync) -> String {
        match why {
            Resync::Lagged { missed } => format!("fell behind by {missed} updates"),
            Resync::Reloaded => "the replica reloaded its cache from the store".to_owned(),
            Resync::Compacted {
                start,
                compact_revision,
            } => format!("revision {start} was compacted (up to {compact_revision})"),
            Resync::Unreadable { start, error } => {
                format!("could not read the changes after revision {start} ({error})")
            }
            Resync::BeforeHistory { start, .. } => {
                format!("revision {start} is older than this replica's history")
            }
        }
    }
}

fn changes_update(changes: Vec<PolicyChange>, revision: u64) -> PolicyUpdate {
    PolicyUpdate {
        kind: policy_update::Kind::Changes as i32,
        changes,
        revision,
        resync_reason: String::new(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{collections::BTreeMap, time::Duration};

    use super::*;
    use crate::{
        hub::{
            tests::{next, record},
            HubConfig,
        },
        store::{EmbeddedStore, EmbeddedStoreConfig, Store},
    };

    /// Applies messages to a view keyed by instance id until it holds
    /// `want`; returns the view, whether a resync happened, and every
    /// CHANGES revision seen.
    async fn follow(
        rx: &mut mpsc::Receiver<WatchResponse>,
        mut done: impl FnMut(&BTreeMap<String, u32>) -> bool,
    ) -> (BTreeMap<String, u32>, Option<String>, Vec<u64>) {
        let mut view = BTreeMap::new();
        let mut resync = None;
        let mut revisions = Vec::new();
        loop {
            let m = next(rx).await;
            if m.kind == Kind::Snapshot as i32 {
                view.clear();
                if !m.resync_reason.is_empty() {
                    resync = Some(m.resync_reason.clone());
                }
            }
            for e in m.events {
                let i = e.instance.unwrap();
                if m.kind == Kind::Changes as i32 {
                    revisions.push(e.revision);
                }
                if e.r#type == EventType::Delete as i32 {
                    view.remove(&i.instance_id);
                } else {
                    view.insert(i.instance_id, i.port);
                }
            }
            if done(&view) && (m.kind != Kind::Snapshot as i32 || m.snapshot_complete) {
                return (view, resync, revisions);
            }
        }
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_resynced_while_a_fast_one_sees_every_change() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let config = HubConfig {
            history_batches: 1000,
            subscriber_lag: 16,
            subscriber_queue: 1,
            ..HubConfig::default()
        };
        let (hub, _task) = Hub::start(store.clone(), keys.clone(), config);
        let mut slow = hub.subscribe(Filter::default(), 0);
        let mut fast = hub.subscribe(Filter::default(), 0);
        let _ = follow(&mut slow, |_| true).await;
        let _ = follow(&mut fast, |_| true).await;

        let key = move |n: u32| {
            keys.instance(&InstanceKey {
                namespace: "ns".into(),
                service: "svc".into(),
                instance_id: format!("i-{n:03}"),
            })
        };
        let writer = {
            let store = store.clone();
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for n in 0..300u32 {
                    revisions.push(
                        store
                            .put(&key(n % 50), record(&format!("i-{:03}", n % 50), n), None)
                            .await
                            .unwrap(),
                    );
                    // Let the hub and the fast subscriber run between writes.
                    tokio::task::yield_now().await;
                }
                revisions
            })
        };
        // The fast one reads as it goes and sees all 300 changes in order.
        let (fast_view, fast_resync, fast_revisions) = follow(&mut fast, |v| {
            v.values().filter(|p| **p >= 250).count() == 50
        })
        .await;
        let written = writer.await.unwrap();
        assert_eq!(fast_resync, None);
        assert_eq!(fast_revisions, written);
        // The slow one did not read at all: it gets a resync to the same end
        // state instead of an unbounded backlog.
        let (slow_view, slow_resync, _) = follow(&mut slow, |v| {
            v.values().filter(|p| **p >= 250).count() == 50
        })
        .await;
        assert!(
            slow_resync
                .as_deref()
                .is_some_and(|r| r.contains("fell behind")),
            "{slow_resync:?}"
        );
        assert_eq!(slow_view, fast_view);
    }

    #[tokio::test]
    async fn resume_replays_from_the_hub_then_the_store_and_resyncs_past_compaction() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let config = HubConfig {
            history_batches: 5,
            ..HubConfig::default()
        };
        let (hub, _task) = Hub::start(store.clone(), keys.clone(), config);
        while !hub.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut revisions = Vec::new();
        for n in 0..20u32 {
            let k = keys.instance(&InstanceKey {
                namespace: "ns".into(),
                service: "svc".into(),
                instance_id: format!("i-{n}"),
            });
            let rev = store
                .put(&k, record(&format!("i-{n}"), n), None)
                .await
                .unwrap();
            // One batch per write, so the history bound (in batches) bites.
            assert!(hub.wait_for(rev, Duration::from_secs(5)).await);
            revisions.push(rev);
        }
        let last = *revisions.last().unwrap();
        assert!(hub.wait_for(last, Duration::from_secs(5)).await);

        // From the 17th write: exactly the three after it.
        let mut rx = hub.subscribe(Filter::default(), revisions[16]);
        let m = next(&mut rx).await;
        assert_eq!(m.kind, Kind::Changes as i32);
        let got: Vec<u64> = m.events.iter().map(|e| e.revision).collect();
        assert_eq!(got, revisions[17..]);
        assert_eq!(m.revision, last);

        // From before the hub's own history: the gap is read from the store,
        // so the watcher still gets exactly the changes after it.
        let mut rx = hub.subscribe(Filter::default(), revisions[2]);
        let m = next(&mut rx).await;
        assert_eq!(m.kind, Kind::Changes as i32);
        let got: Vec<u64> = m.events.iter().map(|e| e.revision).collect();
        assert_eq!(got, revisions[3..]);

        // From before what the store still holds: a snapshot saying why.
        store.compact(revisions[5]).await.unwrap();
        let mut rx = hub.subscribe(Filter::default(), revisions[2]);
        let m = next(&mut rx).await;
        assert_eq!(m.kind, Kind::Snapshot as i32);
        assert!(m.resync_reason.contains("compacted"), "{}", m.resync_reason);
        assert_eq!(m.events.len(), 20);

        // Filters apply to replays and snapshots alike.
        let other = Filter {
            namespace: "ns".into(),
            service: "other".into(),
        };
        let mut rx = hub.subscribe(other, 0);
        let m = next(&mut rx).await;
        assert!(m.events.is_empty() && m.snapshot_complete);
    }

    #[tokio::test]
    async fn policy_resume_uses_the_same_history_then_store_then_resync_path() {
        use prost::Message;
        use weir_proto::policy::v1::{PolicyRecord, TrafficPolicy};

        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let config = HubConfig {
            history_batches: 3,
            ..HubConfig::default()
        };
        let (hub, _task) = Hub::start(store.clone(), keys.clone(), config);
        let record = PolicyRecord {
            policy: Some(TrafficPolicy::default()),
            ..PolicyRecord::default()
        }
        .encode_to_vec();
        let mut versions = Vec::new();
        for n in 0..8 {
            let rev = store
                .put(&keys.policy("ns", &format!("s{n}")), record.clone(), None)
                .await
                .unwrap();
            assert!(hub.wait_for(rev, Duration::from_secs(5)).await);
            versions.push(rev);
        }
        // A deletion is a change too.
        let deleted = store
            .delete(&keys.policy("ns", "s0"))
            .await
            .unwrap()
            .revision;
        assert!(hub.wait_for(deleted, Duration::from_secs(5)).await);

        let first = recv_one(&mut hub.subscribe_policies(0)).await;
        assert_eq!(first.kind, policy_update::Kind::Snapshot as i32);
        assert_eq!((first.changes.len(), first.revision), (7, deleted));
        assert!(first.resync_reason.is_empty());

        // Within the hub's history (the last three batches).
        let m = recv_one(&mut hub.subscribe_policies(versions[6])).await;
        assert_eq!(m.kind, policy_update::Kind::Changes as i32);
        let got: Vec<(u64, bool)> = m
            .changes
            .iter()
            .map(|c| (c.version, c.policy.is_some()))
            .collect();
        assert_eq!(got, [(versions[7], true), (deleted, false)]);
        // Older: the gap comes from the store's history.
        let m = recv_one(&mut hub.subscribe_policies(versions[1])).await;
        assert_eq!(m.kind, policy_update::Kind::Changes as i32);
        let got: Vec<u64> = m.changes.iter().map(|c| c.version).collect();
        assert_eq!(got, [&versions[2..], &[deleted]].concat());
        assert_eq!(m.revision, deleted);
        // Current: nothing until the next change.
        let mut rx = hub.subscribe_policies(deleted);
        let next = store
            .put(&keys.policy("ns", "s9"), record, None)
            .await
            .unwrap();
        let m = recv_one(&mut rx).await;
        assert_eq!(m.kind, policy_update::Kind::Changes as i32);
        assert_eq!(m.changes[0].version, next);
        // Compacted in the store: a snapshot that says so.
        store.compact(versions[4]).await.unwrap();
        let m = recv_one(&mut hub.subscribe_policies(versions[1])).await;
        assert_eq!(m.kind, policy_update::Kind::Snapshot as i32);
        assert!(
            m.resync_reason.starts_with(&format!(
                "revision {} was compacted (up to {})",
                versions[1], versions[4]
            )),
            "{}",
            m.resync_reason
        );
    }

    async fn recv_one(rx: &mut mpsc::Receiver<PolicyUpdate>) -> PolicyUpdate {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap()
    }
}
