//! Conformance suite for the [`Store`] contract.
//!
//! Every check is written once, as `check_*`, and runs unchanged against the
//! embedded store and against a real etcd (the one named by
//! `WEIR_TEST_ETCD_ENDPOINTS`, else a private one the harness spawns): the
//! `conformance!` table at the end makes a module per check with an
//! `embedded` and an `etcd` test, e.g. `watch::etcd`.
//!
//! Each test works under its own key prefix, so the etcd tests can share one
//! etcd. Compaction is global to an etcd cluster, so the compaction check
//! always gets a private etcd.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    future::Future,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures::StreamExt;
use tokio::time::{timeout, timeout_at, Instant};
use weir_control_plane::store::{
    CasOutcome, EmbeddedStore, EmbeddedStoreConfig, EtcdStore, EtcdStoreConfig, EventKind, History,
    KeyValue, LeaseId, Page, PageRead, Replaced, Store, StoreError, WatchEvent, WatchMessage,
    WatchStream,
};
use weir_tests::{unique_prefix, wait_until, Etcd, EtcdOptions};

/// Upper bound for one whole check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(90);
/// Upper bound for a watch to deliver what a check waits for.
const WATCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A TTL at or below every store's minimum: the store raises it (etcd's
/// server enforces its own minimum, 2 s with default flags).
const SHORT_TTL: Duration = Duration::from_secs(1);
/// A TTL no check outlives.
const LONG_TTL: Duration = Duration::from_secs(30);
/// A lease id no store has granted.
const UNKNOWN_LEASE: LeaseId = 0x0123_4567_89ab_cdef;

/// `ensure!(left == right)` that shows both sides.
macro_rules! ensure_eq {
    ($left:expr, $right:expr, $($what:tt)+) => {{
        let (left, right) = (&$left, &$right);
        anyhow::ensure!(
            left == right,
            "{}:\n       got: {:?}\n  expected: {:?}",
            format!($($what)+),
            left,
            right
        );
    }};
}

// ---------------------------------------------------------------------------
// Stores and helpers

/// Which etcd an etcd test runs on.
#[derive(Clone, Copy, Debug)]
enum EtcdUse {
    /// The shared one when configured, else a private one.
    Shared,
    /// Always a private one (for cluster-wide effects like compaction).
    Private,
}

fn embedded_store() -> Arc<dyn Store> {
    Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()))
}

/// An etcd store; keep the [`Etcd`] alive for as long as the store is used.
async fn etcd_store(etcd: EtcdUse) -> Result<(Etcd, Arc<dyn Store>)> {
    let etcd = Etcd::start_with(EtcdOptions {
        private: matches!(etcd, EtcdUse::Private),
        ..EtcdOptions::default()
    })
    .await?;
    let store = EtcdStore::connect(EtcdStoreConfig::new(etcd.endpoints().to_vec()))
        .await
        .with_context(|| format!("connecting to etcd at {:?}", etcd.endpoints()))?;
    Ok((etcd, Arc::new(store)))
}

/// A fresh key prefix ending with '/'.
fn test_prefix(check: &str) -> String {
    format!("{}/", unique_prefix(&format!("conf-{check}")))
}

async fn bounded(check: impl Future<Output = Result<()>>) -> Result<()> {
    timeout(CHECK_TIMEOUT, check)
        .await
        .map_err(|_| anyhow!("check did not finish within {CHECK_TIMEOUT:?}"))?
}

fn kv(
    key: &str,
    value: &[u8],
    create_revision: u64,
    mod_revision: u64,
    lease: LeaseId,
) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
        lease,
    }
}

fn put_event(kv: KeyValue) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Put,
        kv,
    }
}

/// A delete as [`comparable`] leaves it: key, value (empty on watches, the
/// removed value in history) and the revision of the deletion.
fn delete_event(key: &str, revision: u64, value: &[u8]) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: kv(key, value, 0, revision, 0),
    }
}

/// The events with what the contract leaves open cleared: a delete promises
/// its key, value and revision, not a create revision or a lease.
fn comparable(mut events: Vec<WatchEvent>) -> Vec<WatchEvent> {
    for event in &mut events {
        if event.kind == EventKind::Delete {
            event.kv.create_revision = 0;
            event.kv.lease = 0;
        }
    }
    events
}

async fn must_get(store: &Arc<dyn Store>, key: &str) -> Result<KeyValue> {
    store
        .get(key)
        .await?
        .with_context(|| format!("{key} should exist"))
}

async fn keys_under(store: &Arc<dyn Store>, prefix: &str) -> Result<Vec<String>> {
    Ok(store
        .range(prefix)
        .await?
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect())
}

fn names(prefix: &str, names: &[&str]) -> Vec<String> {
    names.iter().map(|n| format!("{prefix}{n}")).collect()
}

/// One watch message, within [`WATCH_TIMEOUT`].
async fn next_message(stream: &mut WatchStream) -> Result<Option<WatchMessage>> {
    match timeout(WATCH_TIMEOUT, stream.next()).await {
        Err(_) => bail!("no watch message within {WATCH_TIMEOUT:?}"),
        Ok(None) => Ok(None),
        Ok(Some(message)) => Ok(Some(message.context("watch failed")?)),
    }
}

/// Reads a watch until `done` says the events so far are enough (progress
/// messages are skipped; Compacted, an error or the end fail).
async fn events_while(
    stream: &mut WatchStream,
    what: &str,
    done: impl Fn(&[WatchEvent]) -> bool,
) -> Result<Vec<WatchEvent>> {
    let deadline = Instant::now() + WATCH_TIMEOUT;
    let mut events: Vec<WatchEvent> = Vec::new();
    while !done(&events) {
        let message = timeout_at(deadline, stream.next()).await.map_err(|_| {
            anyhow!("watch did not deliver {what} within {WATCH_TIMEOUT:?}; got {events:?}")
        })?;
        match message {
            None => bail!("watch ended before delivering {what}; got {events:?}"),
            Some(Err(e)) => return Err(anyhow::Error::new(e).context("watch failed")),
            Some(Ok(WatchMessage::Events(batch))) => {
                ensure!(!batch.is_empty(), "a watch sent an empty Events message");
                events.extend(batch);
            }
            Some(Ok(WatchMessage::Progress { .. })) => {}
            Some(Ok(WatchMessage::Compacted { compact_revision })) => {
                bail!("watch unexpectedly compacted (at {compact_revision}); got {events:?}")
            }
        }
    }
    Ok(events)
}

/// Every event up to and including revision `until`, as delivered.
async fn events_through(stream: &mut WatchStream, until: u64) -> Result<Vec<WatchEvent>> {
    events_while(stream, &format!("revision {until}"), |events| {
        events.last().is_some_and(|e| e.kv.mod_revision >= until)
    })
    .await
}

/// The first `n` events (or more, when a message brings more).
async fn first_events(stream: &mut WatchStream, n: usize) -> Result<Vec<WatchEvent>> {
    events_while(stream, &format!("{n} events"), |events| events.len() >= n).await
}

/// Writes `{prefix}fence` and checks that it is the very next event on each
/// watch: nothing else under the prefix arrived before it.
async fn ensure_next_is_fence(
    store: &Arc<dyn Store>,
    prefix: &str,
    watches: &mut [&mut WatchStream],
) -> Result<()> {
    let fence = format!("{prefix}fence");
    let revision = store.put(&fence, b"fence".to_vec(), None).await?;
    let kv = must_get(store, &fence).await?;
    for (n, watch) in watches.iter_mut().enumerate() {
        let events = comparable(events_through(watch, revision).await?);
        ensure_eq!(
            events,
            vec![put_event(kv.clone())],
            "watch #{n}: the fence write must be the next (and only) event"
        );
    }
    Ok(())
}

async fn history_events(
    store: &Arc<dyn Store>,
    prefix: &str,
    after: u64,
    until: u64,
) -> Result<Vec<WatchEvent>> {
    match store.history(prefix, after, until).await? {
        History::Events(events) => Ok(comparable(events)),
        History::Compacted { compact_revision } => {
            bail!("history ({after}, {until}] unexpectedly compacted (at {compact_revision})")
        }
    }
}

fn ensure_lease_not_found<T: Debug>(
    result: Result<T, StoreError>,
    lease: LeaseId,
    what: &str,
) -> Result<()> {
    match result {
        Err(StoreError::LeaseNotFound(id)) => {
            ensure_eq!(id, lease, "{what}: LeaseNotFound names the lease");
            Ok(())
        }
        other => bail!("{what}: expected LeaseNotFound({lease}), got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Checks

/// put/get: values, create vs mod revision, increasing revisions; range:
/// byte order, one revision, prefix boundaries.
async fn check_put_get_range(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    ensure_eq!(store.get(&key).await?, None, "a key never written");

    let r1 = store.put(&key, b"v1".to_vec(), None).await?;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v1", r1, r1, 0)),
        "after the first put"
    );
    let r2 = store.put(&key, b"v2".to_vec(), None).await?;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v2", r1, r2, 0)),
        "an update keeps create_revision and moves mod_revision"
    );
    // Values are bytes: empty and non-UTF-8 values round-trip, and a key
    // with an empty value exists.
    let r3 = store.put(&key, Vec::new(), None).await?;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"", r1, r3, 0)),
        "a key with an empty value"
    );
    let binary: Vec<u8> = (0..=255).collect();
    let r4 = store.put(&key, binary.clone(), None).await?;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, &binary, r1, r4, 0)),
        "a binary value"
    );
    let mut revisions = vec![r1, r2, r3, r4];

    // Range returns keys in byte order whatever the write order ('/' < '0'
    // < 'A' < 'Z' < 'a' < '~' < UTF-8 multi-byte).
    let dir = format!("{prefix}r/");
    let mut written = BTreeMap::new();
    for (n, name) in ["m", "Z", "a", "a/b", "é", "~", "0", "a-", "A", "mm"]
        .iter()
        .enumerate()
    {
        let key = format!("{dir}{name}");
        let value = format!("value-{n}").into_bytes();
        let rev = store.put(&key, value.clone(), None).await?;
        revisions.push(rev);
        written.insert(key, (value, rev));
    }
    ensure!(
        revisions.windows(2).all(|w| w[0] < w[1]),
        "write revisions must strictly increase: {revisions:?}"
    );
    let last = revisions.last().copied().unwrap_or_default();
    let snapshot = store.range(&dir).await?;
    ensure!(
        snapshot.revision >= last,
        "range revision {} is older than the last write {last}",
        snapshot.revision
    );
    // String order is byte order, so the BTreeMap holds the expected order.
    let expected: Vec<KeyValue> = written
        .iter()
        .map(|(key, (value, rev))| kv(key, value, *rev, *rev, 0))
        .collect();
    ensure_eq!(
        snapshot.kvs,
        expected,
        "range of {dir}: every key, byte-ordered"
    );

    // A prefix range is exactly the keys starting with the prefix: not `a`,
    // `a.x` (before the range), `a0` (the exclusive end) or the sibling `ab/`.
    let all = names(
        prefix,
        &["a", "a.x", "a/", "a/x", "a/y/z", "a0", "ab/", "ab/x"],
    );
    for key in &all {
        store.put(key, key.as_bytes().to_vec(), None).await?;
    }
    ensure_eq!(
        keys_under(&store, &format!("{prefix}a/")).await?,
        names(prefix, &["a/", "a/x", "a/y/z"]),
        "range of {prefix}a/"
    );
    ensure_eq!(
        keys_under(&store, &format!("{prefix}ab/")).await?,
        names(prefix, &["ab/", "ab/x"]),
        "range of {prefix}ab/"
    );
    let empty = store.range(&format!("{prefix}none/")).await?;
    ensure!(empty.kvs.is_empty(), "range of an empty prefix: {empty:?}");
    ensure!(
        empty.revision >= last,
        "an empty range still reports the store revision"
    );
    Ok(())
}

/// A range taken while another task writes is the state at its revision.
async fn check_range_consistency(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    const WRITES: usize = 120;
    const KEYS: usize = 8;
    let dir = format!("{prefix}c/");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (store, dir, done) = (store.clone(), dir.clone(), done.clone());
        tokio::spawn(async move {
            let mut log = Vec::new();
            let result = async {
                for n in 0..WRITES {
                    let key = format!("{dir}{}", n % KEYS);
                    let value = n.to_string().into_bytes();
                    let rev = store.put(&key, value.clone(), None).await?;
                    log.push((key, value, rev));
                }
                Ok::<_, StoreError>(())
            }
            .await;
            done.store(true, Ordering::SeqCst);
            result.map(|()| log)
        })
    };
    let mut snapshots = Vec::new();
    while !done.load(Ordering::SeqCst) {
        snapshots.push(store.range(&dir).await?);
        tokio::task::yield_now().await;
    }
    let log = writer.await??;
    snapshots.push(store.range(&dir).await?);

    for snapshot in &snapshots {
        // Replay the writer's log up to the snapshot's revision.
        let mut state: BTreeMap<&str, (&[u8], u64)> = BTreeMap::new();
        for (key, value, rev) in &log {
            if *rev <= snapshot.revision {
                state.insert(key, (value, *rev));
            }
        }
        let expected: Vec<(&str, &[u8], u64)> =
            state.iter().map(|(k, (v, r))| (*k, *v, *r)).collect();
        let got: Vec<(&str, &[u8], u64)> = snapshot
            .kvs
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_slice(), kv.mod_revision))
            .collect();
        ensure_eq!(
            got,
            expected,
            "range at revision {} must be the state at that revision",
            snapshot.revision
        );
    }
    let last = snapshots.last().map_or(0, |s| s.kvs.len());
    ensure_eq!(last, KEYS, "keys after all writes");
    Ok(())
}

/// delete: existed, revision, key gone, only the exact key, fresh life after.
/// One page of `range_page` that must not be `Compacted`.
async fn page(
    store: &Arc<dyn Store>,
    prefix: &str,
    revision: u64,
    after: Option<&str>,
    limit: usize,
) -> Result<Page> {
    match store.range_page(prefix, revision, after, limit).await? {
        PageRead::Page(page) => Ok(page),
        PageRead::Compacted => bail!("a page at revision {revision} came back Compacted"),
    }
}

/// Every key under `prefix` at `revision`, `limit` keys a page.
async fn all_pages(
    store: &Arc<dyn Store>,
    prefix: &str,
    revision: u64,
    limit: usize,
) -> Result<(Vec<KeyValue>, u64)> {
    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut at = revision;
    loop {
        let after = kvs.last().map(|kv| kv.key.clone());
        let p = page(store, prefix, at, after.as_deref(), limit).await?;
        ensure!(
            p.kvs.len() <= limit,
            "a page of {} keys > limit {limit}",
            p.kvs.len()
        );
        if at == 0 {
            at = p.revision;
        }
        ensure_eq!(
            p.revision,
            at,
            "a later page is read at the first page's revision"
        );
        kvs.extend(p.kvs);
        if !p.more {
            return Ok((kvs, at));
        }
    }
}

async fn check_range_page(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let dir = format!("{prefix}p/");
    // Neighbours that share the prefix's bytes but are outside it.
    store
        .put(&format!("{prefix}p"), b"x".to_vec(), None)
        .await?;
    store
        .put(&format!("{prefix}q/a"), b"x".to_vec(), None)
        .await?;
    for name in ["a", "b", "c", "d", "e"] {
        store
            .put(&format!("{dir}{name}"), name.as_bytes().to_vec(), None)
            .await?;
    }
    let before = store.range(&dir).await?;

    // The first page is at the current revision and says more follow.
    let first = page(&store, &dir, 0, None, 2).await?;
    ensure_eq!(
        first.kvs,
        before.kvs[..2].to_vec(),
        "the first page holds the first two keys"
    );
    ensure!(first.more, "a first page of 2 of 5 keys says more follow");
    ensure!(
        first.revision >= before.revision,
        "the first page's revision {} is older than the range before it ({})",
        first.revision,
        before.revision
    );
    let at = first.revision;

    // Changes after the first page: an update, a delete, a key inserted
    // before the cursor, one after it.
    store.put(&format!("{dir}b"), b"b2".to_vec(), None).await?;
    store.delete(&format!("{dir}c")).await?;
    store.put(&format!("{dir}aa"), b"aa".to_vec(), None).await?;
    store.put(&format!("{dir}f"), b"f".to_vec(), None).await?;

    // The rest, at the first page's revision: the keys as they were then.
    let (then, revision) = all_pages(&store, &dir, at, 2).await?;
    ensure_eq!(revision, at, "pages at a fixed revision");
    ensure_eq!(then, before.kvs, "every page at the first page's revision");
    let cursor = format!("{dir}b");
    let rest = page(&store, &dir, at, Some(&cursor), 2).await?;
    ensure_eq!(
        rest.kvs,
        before.kvs[2..4].to_vec(),
        "a page after a key: later keys as they were (c still there)"
    );
    ensure!(rest.more, "e follows d");

    // A fresh read by pages is the current state.
    let now = store.range(&dir).await?;
    let (current, revision) = all_pages(&store, &dir, 0, 2).await?;
    ensure_eq!(current, now.kvs, "pages at the current revision");
    ensure!(revision >= now.revision, "a fresh first page is current");
    let (single, _) = all_pages(&store, &dir, 0, 1).await?;
    ensure_eq!(single, now.kvs, "pages of one key");
    let whole = page(&store, &dir, 0, None, 1000).await?;
    ensure_eq!(whole.kvs, now.kvs, "one page holding everything");
    ensure!(!whole.more, "nothing follows the whole range");
    let past = page(&store, &dir, at, Some(&format!("{dir}z")), 10).await?;
    ensure!(
        past.kvs.is_empty() && !past.more,
        "a page after the last key is empty"
    );

    ensure!(
        store
            .range_page(&dir, revision + 1000, None, 10)
            .await
            .is_err(),
        "a page at a future revision must fail"
    );
    Ok(())
}

async fn check_delete(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    let child = format!("{prefix}k/child");
    let longer = format!("{prefix}kk");
    store.put(&key, b"v".to_vec(), None).await?;
    store.put(&child, b"c".to_vec(), None).await?;
    let before = store.put(&longer, b"l".to_vec(), None).await?;

    let deleted = store.delete(&key).await?;
    ensure!(deleted.existed, "deleting an existing key: {deleted:?}");
    ensure!(
        deleted.revision > before,
        "a delete is a write with a new revision: {deleted:?} after {before}"
    );
    ensure_eq!(store.get(&key).await?, None, "a deleted key");
    ensure_eq!(
        keys_under(&store, prefix).await?,
        vec![child.clone(), longer.clone()],
        "delete removes exactly the key, not keys it prefixes"
    );

    let again = store.delete(&key).await?;
    ensure!(!again.existed, "deleting a deleted key: {again:?}");
    ensure!(
        again.revision >= deleted.revision,
        "a no-op delete reports the current revision: {again:?} after {deleted:?}"
    );
    let never = store.delete(&format!("{prefix}never")).await?;
    ensure!(!never.existed, "deleting a key never written: {never:?}");
    ensure!(never.revision >= deleted.revision, "{never:?}");

    // A key written again starts a new life.
    let reborn = store.put(&key, b"again".to_vec(), None).await?;
    ensure!(
        reborn > never.revision,
        "no-op deletes must not claim future revisions"
    );
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"again", reborn, reborn, 0)),
        "a recreated key has a new create_revision"
    );
    Ok(())
}

/// replace returns what it replaced; put attaches and detaches leases.
async fn check_replace(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    let first = store.replace(&key, b"v1".to_vec(), None).await?;
    ensure!(
        first.prev.is_none(),
        "first write replaces nothing: {first:?}"
    );
    let r1 = first.revision;
    let second = store.replace(&key, b"v2".to_vec(), None).await?;
    ensure!(second.revision > r1, "{second:?}");
    ensure_eq!(
        second,
        Replaced {
            revision: second.revision,
            prev: Some(kv(&key, b"v1", r1, r1, 0)),
        },
        "the second write returns the first"
    );
    let r2 = second.revision;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v2", r1, r2, 0)),
        "after replace"
    );

    // Attach to a lease, then detach by writing without one.
    let lease = store.grant_lease(LONG_TTL).await?;
    let attached = store.replace(&key, b"v3".to_vec(), Some(lease.id)).await?;
    ensure_eq!(
        attached.prev,
        Some(kv(&key, b"v2", r1, r2, 0)),
        "prev of the leased write"
    );
    let r3 = attached.revision;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v3", r1, r3, lease.id)),
        "a write with a lease attaches the key"
    );
    let detached = store.replace(&key, b"v4".to_vec(), None).await?;
    ensure_eq!(
        detached.prev,
        Some(kv(&key, b"v3", r1, r3, lease.id)),
        "prev carries the old lease"
    );
    let r4 = detached.revision;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v4", r1, r4, 0)),
        "a write without a lease detaches the key"
    );
    ensure!(store.revoke_lease(lease.id).await?, "revoking a live lease");
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v4", r1, r4, 0)),
        "revoking a lease leaves keys detached from it alone"
    );

    // put (the default method) is replace without the answer.
    let r5 = store.put(&key, b"v5".to_vec(), None).await?;
    ensure!(r5 > r4, "put revision {r5} after {r4}");
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"v5", r1, r5, 0)),
        "after put"
    );
    Ok(())
}

/// put_if: create-only with 0, compare on mod_revision, conflicts say why.
async fn check_put_if(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    let r1 = match store.put_if(&key, b"a".to_vec(), None, 0).await? {
        CasOutcome::Written { revision } => revision,
        other => bail!("put_if(expected 0) on an absent key: {other:?}"),
    };
    let a = kv(&key, b"a", r1, r1, 0);
    ensure_eq!(store.get(&key).await?, Some(a.clone()), "created by put_if");

    ensure_eq!(
        store.put_if(&key, b"b".to_vec(), None, 0).await?,
        CasOutcome::Conflict {
            current: Some(a.clone())
        },
        "put_if(expected 0) on an existing key"
    );
    ensure_eq!(store.get(&key).await?, Some(a), "a conflict writes nothing");

    let r2 = match store.put_if(&key, b"c".to_vec(), None, r1).await? {
        CasOutcome::Written { revision } => revision,
        other => bail!("put_if(expected = mod_revision): {other:?}"),
    };
    ensure!(r2 > r1, "put_if revision {r2} after {r1}");
    let c = kv(&key, b"c", r1, r2, 0);
    ensure_eq!(store.get(&key).await?, Some(c.clone()), "updated by put_if");

    ensure_eq!(
        store.put_if(&key, b"d".to_vec(), None, r1).await?,
        CasOutcome::Conflict {
            current: Some(c.clone())
        },
        "put_if with a stale revision"
    );
    ensure_eq!(
        store.get(&key).await?,
        Some(c),
        "a stale put_if writes nothing"
    );

    let absent = format!("{prefix}absent");
    ensure_eq!(
        store.put_if(&absent, b"x".to_vec(), None, r2).await?,
        CasOutcome::Conflict { current: None },
        "put_if(expected > 0) on an absent key"
    );
    ensure_eq!(store.get(&absent).await?, None, "still absent");

    // After a delete the key is absent again: 0 creates it anew.
    store.delete(&key).await?;
    let r3 = match store.put_if(&key, b"e".to_vec(), None, 0).await? {
        CasOutcome::Written { revision } => revision,
        other => bail!("put_if(expected 0) after a delete: {other:?}"),
    };
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"e", r3, r3, 0)),
        "recreated by put_if"
    );

    // put_if attaches a lease like put.
    let lease = store.grant_lease(LONG_TTL).await?;
    let leased = format!("{prefix}leased");
    let r4 = match store
        .put_if(&leased, b"l".to_vec(), Some(lease.id), 0)
        .await?
    {
        CasOutcome::Written { revision } => revision,
        other => bail!("put_if with a lease: {other:?}"),
    };
    ensure_eq!(
        store.get(&leased).await?,
        Some(kv(&leased, b"l", r4, r4, lease.id)),
        "put_if with a lease"
    );
    ensure!(store.revoke_lease(lease.id).await?, "revoking a live lease");
    ensure_eq!(store.get(&leased).await?, None, "revoke deletes the key");
    Ok(())
}

/// Concurrent put_ifs with the same expected revision: exactly one wins,
/// every loser sees the winner's write.
async fn check_put_if_race(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    const WRITERS: usize = 16;

    async fn race(store: &Arc<dyn Store>, key: &str, expected: u64, round: &str) -> Result<u64> {
        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..WRITERS {
            let (store, key, barrier) = (store.clone(), key.to_owned(), barrier.clone());
            let value = format!("{round}-{n}").into_bytes();
            tasks.spawn(async move {
                barrier.wait().await;
                let outcome = store.put_if(&key, value.clone(), None, expected).await;
                (value, outcome)
            });
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            let (value, outcome) = joined?;
            match outcome.with_context(|| format!("{round}: put_if"))? {
                CasOutcome::Written { revision } => winners.push((value, revision)),
                CasOutcome::Conflict { current } => losers.push(current),
            }
        }
        let [(value, revision)] = winners.as_slice() else {
            bail!("{round}: exactly one of {WRITERS} put_ifs must win, got {winners:?}");
        };
        ensure!(*revision > expected, "{round}: winner at {revision}");
        for current in losers {
            ensure_eq!(
                current.map(|kv| (kv.value, kv.mod_revision)),
                Some((value.clone(), *revision)),
                "{round}: a loser's conflict shows the winner's write"
            );
        }
        let stored = must_get(store, key).await?;
        ensure_eq!(
            (stored.value, stored.mod_revision),
            (value.clone(), *revision),
            "{round}: the stored value is the winner's"
        );
        Ok(*revision)
    }

    let key = format!("{prefix}contended");
    let created = race(&store, &key, 0, "create").await?;
    ensure_eq!(
        must_get(&store, &key).await?.create_revision,
        created,
        "the winning create"
    );
    race(&store, &key, created, "update").await?;
    Ok(())
}

/// Leases: grant, attach, renew, revoke (atomically deleting the keys),
/// keep_alive/revoke of a lease that no longer exists.
async fn check_leases(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let l1 = store.grant_lease(LONG_TTL).await?;
    let l2 = store.grant_lease(LONG_TTL).await?;
    ensure!(
        l1.id != 0 && l2.id != 0 && l1.id != l2.id,
        "leases need distinct non-zero ids: {l1:?} {l2:?}"
    );
    ensure_eq!(
        (l1.ttl, l2.ttl),
        (LONG_TTL, LONG_TTL),
        "granted TTLs (no store raises 30 s)"
    );

    let [a, b, c, d] = [
        format!("{prefix}a"),
        format!("{prefix}b"),
        format!("{prefix}c"),
        format!("{prefix}d"),
    ];
    let ra = store.put(&a, b"a".to_vec(), Some(l1.id)).await?;
    let rb = store.put(&b, b"b".to_vec(), Some(l1.id)).await?;
    let rc = store.put(&c, b"c".to_vec(), Some(l2.id)).await?;
    let rd = store.put(&d, b"d".to_vec(), None).await?;
    ensure_eq!(
        store.range(prefix).await?.kvs,
        vec![
            kv(&a, b"a", ra, ra, l1.id),
            kv(&b, b"b", rb, rb, l1.id),
            kv(&c, b"c", rc, rc, l2.id),
            kv(&d, b"d", rd, rd, 0),
        ],
        "keys carry their leases"
    );

    // Renewing a live lease reports its TTL, every time.
    for n in 0..3 {
        ensure_eq!(
            store.keep_alive(l1.id).await?,
            Some(l1.ttl),
            "keep_alive #{n} of a live lease returns its granted TTL"
        );
    }

    let mut watch = store.watch(prefix, rd).await?;
    ensure!(
        store.revoke_lease(l1.id).await?,
        "revoking a live lease returns true"
    );
    ensure_eq!(
        keys_under(&store, prefix).await?,
        vec![c.clone(), d.clone()],
        "revoke deletes exactly the lease's keys"
    );
    // Like etcd, one revision deletes them all (keys in order).
    let events = first_events(&mut watch, 2).await?;
    let revision = events.first().map_or(0, |e| e.kv.mod_revision);
    ensure!(revision > rd, "revoke revision {revision} after {rd}");
    ensure_eq!(
        comparable(events),
        vec![
            delete_event(&a, revision, b""),
            delete_event(&b, revision, b"")
        ],
        "revoking a lease deletes its keys in one revision"
    );
    ensure_next_is_fence(&store, prefix, &mut [&mut watch]).await?;

    ensure!(
        !store.revoke_lease(l1.id).await?,
        "revoking a revoked lease returns false"
    );
    // The trait documents `Ok(None)` for a lease that no longer exists.
    ensure_eq!(
        store.keep_alive(l1.id).await?,
        None,
        "keep_alive of a revoked lease"
    );
    ensure_eq!(
        store.keep_alive(UNKNOWN_LEASE).await?,
        None,
        "keep_alive of a lease never granted"
    );
    ensure!(
        !store.revoke_lease(UNKNOWN_LEASE).await?,
        "revoking a lease never granted returns false"
    );

    // The other lease was not touched.
    ensure_eq!(
        store.keep_alive(l2.id).await?,
        Some(l2.ttl),
        "the other lease"
    );
    ensure!(store.revoke_lease(l2.id).await?, "revoking the other lease");
    ensure_eq!(
        keys_under(&store, prefix).await?,
        vec![d, format!("{prefix}fence")],
        "only unleased keys remain"
    );
    Ok(())
}

/// Writing with a lease that does not exist fails with LeaseNotFound and
/// writes nothing.
async fn check_unknown_lease(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    ensure_lease_not_found(
        store.put(&key, b"v".to_vec(), Some(UNKNOWN_LEASE)).await,
        UNKNOWN_LEASE,
        "put with a lease never granted",
    )?;
    ensure_lease_not_found(
        store
            .replace(&key, b"v".to_vec(), Some(UNKNOWN_LEASE))
            .await,
        UNKNOWN_LEASE,
        "replace with a lease never granted",
    )?;
    ensure_lease_not_found(
        store
            .put_if(&key, b"v".to_vec(), Some(UNKNOWN_LEASE), 0)
            .await,
        UNKNOWN_LEASE,
        "put_if with a lease never granted",
    )?;
    ensure_eq!(store.get(&key).await?, None, "failed writes create nothing");

    let revoked = store.grant_lease(LONG_TTL).await?;
    ensure!(
        store.revoke_lease(revoked.id).await?,
        "revoking a live lease"
    );
    ensure_lease_not_found(
        store.put(&key, b"v".to_vec(), Some(revoked.id)).await,
        revoked.id,
        "put with a revoked lease",
    )?;

    // An existing key is left as it was.
    let rev = store.put(&key, b"kept".to_vec(), None).await?;
    ensure_lease_not_found(
        store
            .replace(&key, b"v".to_vec(), Some(UNKNOWN_LEASE))
            .await,
        UNKNOWN_LEASE,
        "replace of an existing key with a lease never granted",
    )?;
    ensure_lease_not_found(
        store
            .put_if(&key, b"v".to_vec(), Some(revoked.id), rev)
            .await,
        revoked.id,
        "put_if of an existing key with a revoked lease",
    )?;
    ensure_eq!(
        store.get(&key).await?,
        Some(kv(&key, b"kept", rev, rev, 0)),
        "failed writes change nothing"
    );
    Ok(())
}

/// A short lease expires on its own within a bounded time, not before its
/// TTL, its keys vanish, and watches see the deletion.
async fn check_lease_expiry(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let leased = format!("{prefix}leased");
    let kept = format!("{prefix}kept");
    let started = std::time::Instant::now();
    let lease = store.grant_lease(SHORT_TTL).await?;
    ensure!(
        lease.ttl >= SHORT_TTL && lease.ttl <= Duration::from_secs(5),
        "granted TTL {:?} for a request of {SHORT_TTL:?}",
        lease.ttl
    );
    store.put(&kept, b"k".to_vec(), None).await?;
    let rev = store.put(&leased, b"l".to_vec(), Some(lease.id)).await?;
    let mut watch = store.watch(prefix, rev).await?;
    ensure!(
        store.get(&leased).await?.is_some(),
        "the leased key before its TTL"
    );

    wait_until(
        lease.ttl + Duration::from_secs(10),
        "the leased key to expire",
        || {
            let (store, leased) = (store.clone(), leased.clone());
            async move { matches!(store.get(&leased).await, Ok(None)) }
        },
    )
    .await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed + Duration::from_millis(100) >= lease.ttl,
        "the key expired after {elapsed:?}, before its TTL {:?}",
        lease.ttl
    );
    ensure_eq!(
        keys_under(&store, prefix).await?,
        vec![kept],
        "only the unleased key remains"
    );
    ensure_eq!(
        store.keep_alive(lease.id).await?,
        None,
        "keep_alive of an expired lease"
    );
    ensure_lease_not_found(
        store.put(&leased, b"again".to_vec(), Some(lease.id)).await,
        lease.id,
        "put with an expired lease",
    )?;

    // The expiry is a delete on watches.
    let events = first_events(&mut watch, 1).await?;
    let revision = events.first().map_or(0, |e| e.kv.mod_revision);
    ensure!(revision > rev, "expiry revision {revision} after {rev}");
    ensure_eq!(
        comparable(events),
        vec![delete_event(&leased, revision, b"")],
        "lease expiry shows as a delete"
    );
    ensure_next_is_fence(&store, prefix, &mut [&mut watch]).await
}

/// keep_alive keeps a short lease and its key alive well past its TTL.
async fn check_keep_alive(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let key = format!("{prefix}k");
    let lease = store.grant_lease(SHORT_TTL).await?;
    let rev = store.put(&key, b"v".to_vec(), Some(lease.id)).await?;
    let started = std::time::Instant::now();
    let hold = lease.ttl * 3;
    let mut renewals = 0;
    while started.elapsed() < hold {
        // The renewal cadence, as a client would keep it (not a wait for a
        // condition).
        tokio::time::sleep(lease.ttl / 4).await;
        ensure_eq!(
            store.keep_alive(lease.id).await?,
            Some(lease.ttl),
            "renewal #{renewals} at {:?} returns the granted TTL",
            started.elapsed()
        );
        ensure_eq!(
            store.get(&key).await?,
            Some(kv(&key, b"v", rev, rev, lease.id)),
            "the key at {:?}, after {renewals} renewals",
            started.elapsed()
        );
        renewals += 1;
    }
    ensure!(
        store.revoke_lease(lease.id).await?,
        "the renewed lease still exists after {:?} (TTL {:?})",
        started.elapsed(),
        lease.ttl
    );
    ensure_eq!(store.get(&key).await?, None, "revoke deletes the key");
    Ok(())
}

/// watch: replays changes after R made before it was opened, then live
/// ones, in order, with the right kinds and revisions, and nothing from
/// other prefixes.
async fn check_watch(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let dir = format!("{prefix}a/");
    let [k1, k2, k3, k4] = [
        format!("{dir}k1"),
        format!("{dir}k2"),
        format!("{dir}k3"),
        format!("{dir}k4"),
    ];
    let sibling = format!("{prefix}ab/x");
    let next_door = format!("{prefix}a0");
    let lease = store.grant_lease(LONG_TTL).await?;

    // Before the watch is opened.
    let r0 = store.put(&k1, b"v1".to_vec(), None).await?;
    store.put(&sibling, b"s1".to_vec(), None).await?;
    let r2 = store.put(&k2, b"v1".to_vec(), None).await?;
    let r3 = store.put(&k1, b"v2".to_vec(), None).await?;
    let r4 = store.delete(&k2).await?.revision;
    store.put(&next_door, b"n".to_vec(), None).await?;
    let r6 = store.put(&k3, b"v1".to_vec(), Some(lease.id)).await?;

    let mut w1 = store.watch(&dir, r0).await?;
    ensure_eq!(
        comparable(events_through(&mut w1, r6).await?),
        vec![
            put_event(kv(&k2, b"v1", r2, r2, 0)),
            put_event(kv(&k1, b"v2", r0, r3, 0)),
            delete_event(&k2, r4, b""),
            put_event(kv(&k3, b"v1", r6, r6, lease.id)),
        ],
        "a watch from R replays what changed under {dir} after R"
    );

    // After it was opened.
    store.put(&sibling, b"s2".to_vec(), None).await?;
    let r8 = store.put(&k1, b"v3".to_vec(), None).await?;
    let r9 = store.delete(&k1).await?.revision;
    let r10 = store.delete(&k3).await?.revision;
    ensure_eq!(
        comparable(events_through(&mut w1, r10).await?),
        vec![
            put_event(kv(&k1, b"v3", r0, r8, 0)),
            delete_event(&k1, r9, b""),
            delete_event(&k3, r10, b""),
        ],
        "live changes, in order"
    );

    // A watch opened later from R delivers exactly what came after R.
    let mut w2 = store.watch(&dir, r9).await?;
    ensure_eq!(
        comparable(events_through(&mut w2, r10).await?),
        vec![delete_event(&k3, r10, b"")],
        "a watch from {r9}"
    );
    // Neither delivers anything else (not the sibling writes).
    ensure_next_is_fence(&store, &dir, &mut [&mut w1, &mut w2]).await?;

    // A watch from the current revision sees only what comes next.
    let now = store.range(&dir).await?.revision;
    let mut w3 = store.watch(&dir, now).await?;
    let r11 = store.put(&k4, b"v1".to_vec(), None).await?;
    ensure_eq!(
        comparable(events_through(&mut w3, r11).await?),
        vec![put_event(kv(&k4, b"v1", r11, r11, 0))],
        "a watch from the current revision"
    );
    store.revoke_lease(lease.id).await?;
    Ok(())
}

/// history(prefix, after, until): the events in (after, until], deletes
/// carrying the value they removed.
async fn check_history(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let dir = format!("{prefix}h/");
    let (x, y) = (format!("{dir}x"), format!("{dir}y"));
    let base = store.range(&dir).await?.revision;
    let r1 = store.put(&x, b"x1".to_vec(), None).await?;
    store
        .put(&format!("{prefix}hh/s"), b"s".to_vec(), None)
        .await?;
    let r3 = store.put(&y, b"y1".to_vec(), None).await?;
    let r4 = store.put(&x, b"x2".to_vec(), None).await?;
    let r5 = store.delete(&x).await?.revision;
    let r6 = store
        .put(&format!("{prefix}h0"), b"n".to_vec(), None)
        .await?;
    let r7 = store.put(&y, b"y2".to_vec(), None).await?;
    let r8 = store.delete(&y).await?.revision;

    ensure_eq!(
        history_events(&store, &dir, base, r8).await?,
        vec![
            put_event(kv(&x, b"x1", r1, r1, 0)),
            put_event(kv(&y, b"y1", r3, r3, 0)),
            put_event(kv(&x, b"x2", r1, r4, 0)),
            delete_event(&x, r5, b"x2"),
            put_event(kv(&y, b"y2", r3, r7, 0)),
            delete_event(&y, r8, b"y2"),
        ],
        "history ({base}, {r8}]"
    );
    ensure_eq!(
        history_events(&store, &dir, r1, r5).await?,
        vec![
            put_event(kv(&y, b"y1", r3, r3, 0)),
            put_event(kv(&x, b"x2", r1, r4, 0)),
            delete_event(&x, r5, b"x2"),
        ],
        "history ({r1}, {r5}]: `after` excluded, `until` included"
    );
    ensure_eq!(
        history_events(&store, &dir, r3, r4).await?,
        vec![put_event(kv(&x, b"x2", r1, r4, 0))],
        "history ({r3}, {r4}]"
    );
    ensure_eq!(
        history_events(&store, &dir, r5, r6).await?,
        vec![],
        "history ({r5}, {r6}]: only other prefixes changed"
    );
    ensure_eq!(
        history_events(&store, &dir, r8, r8).await?,
        vec![],
        "history ({r8}, {r8}]"
    );
    Ok(())
}

/// compact(rev): watches and history from before rev say Compacted (and the
/// watch ends); from rev on, and caught-up watches, still work.
async fn check_compaction(store: Arc<dyn Store>, prefix: &str) -> Result<()> {
    let dir = format!("{prefix}c/");
    let [a, b, c, d] = [
        format!("{dir}a"),
        format!("{dir}b"),
        format!("{dir}c"),
        format!("{dir}d"),
    ];
    let r1 = store.put(&a, b"a1".to_vec(), None).await?;
    store.put(&b, b"b1".to_vec(), None).await?;
    let r3 = store.put(&a, b"a2".to_vec(), None).await?;
    let r4 = store.delete(&b).await?.revision;
    let r5 = store.put(&c, b"c1".to_vec(), None).await?;
    let mut caught_up = store.watch(&dir, r5).await?;

    store.compact(r4).await?;

    let mut old = store.watch(&dir, r1).await?;
    loop {
        match next_message(&mut old).await? {
            Some(WatchMessage::Progress { .. }) => {}
            Some(WatchMessage::Compacted { compact_revision }) => {
                ensure_eq!(compact_revision, r4, "Compacted names the compaction");
                break;
            }
            other => {
                bail!("a watch from {r1}, compacted at {r4}: expected Compacted, got {other:?}")
            }
        }
    }
    match timeout(WATCH_TIMEOUT, old.next()).await {
        Ok(None) => {}
        Ok(Some(message)) => bail!("the watch stream must end after Compacted, got {message:?}"),
        Err(_) => bail!("the watch stream did not end within {WATCH_TIMEOUT:?} after Compacted"),
    }

    // From the compaction revision on, the history is there.
    let mut from_compaction = store.watch(&dir, r4).await?;
    ensure_eq!(
        comparable(events_through(&mut from_compaction, r5).await?),
        vec![put_event(kv(&c, b"c1", r5, r5, 0))],
        "a watch from the compaction revision"
    );
    let r6 = store.put(&d, b"d1".to_vec(), None).await?;
    for (name, watch) in [
        ("from the compaction revision", &mut from_compaction),
        ("opened before the compaction", &mut caught_up),
    ] {
        ensure_eq!(
            comparable(events_through(watch, r6).await?),
            vec![put_event(kv(&d, b"d1", r6, r6, 0))],
            "a watch {name} gets later writes"
        );
    }

    // Pages: from the compaction revision on they read the past; before it
    // they say Compacted.
    ensure_eq!(
        store.range_page(&dir, r1, None, 10).await?,
        PageRead::Compacted,
        "a page at a compacted revision"
    );
    let at_compaction = page(&store, &dir, r4, None, 10).await?;
    ensure_eq!(
        at_compaction.kvs,
        vec![kv(&a, b"a2", r1, r3, 0)],
        "a page at the compaction revision"
    );

    // History (last: etcd's history writes a fence key under the prefix).
    ensure_eq!(
        store.history(&dir, r1, r5).await?,
        History::Compacted {
            compact_revision: r4
        },
        "history from before the compaction"
    );
    ensure_eq!(
        history_events(&store, &dir, r4, r6).await?,
        vec![
            put_event(kv(&c, b"c1", r5, r5, 0)),
            put_event(kv(&d, b"d1", r6, r6, 0))
        ],
        "history from the compaction revision"
    );

    let now = store.range(&dir).await?.revision;
    ensure!(
        store.compact(now + 1000).await.is_err(),
        "compacting a future revision must fail"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The tests: one module per check, with an `embedded` and an `etcd` test.

macro_rules! conformance {
    ($($name:ident => $check:ident on $etcd:ident;)*) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn embedded() -> anyhow::Result<()> {
                weir_tests::init_tracing();
                let store = super::embedded_store();
                super::bounded(super::$check(store, &super::test_prefix(stringify!($name)))).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn etcd() -> anyhow::Result<()> {
                weir_tests::init_tracing();
                let (_etcd, store) = super::etcd_store(super::EtcdUse::$etcd).await?;
                super::bounded(super::$check(store, &super::test_prefix(stringify!($name)))).await
            }
        }
    )*};
}

conformance! {
    put_get_range => check_put_get_range on Shared;
    range_consistency => check_range_consistency on Shared;
    range_page => check_range_page on Shared;
    delete => check_delete on Shared;
    replace => check_replace on Shared;
    put_if => check_put_if on Shared;
    put_if_race => check_put_if_race on Shared;
    leases => check_leases on Shared;
    unknown_lease => check_unknown_lease on Shared;
    lease_expiry => check_lease_expiry on Shared;
    keep_alive => check_keep_alive on Shared;
    watch => check_watch on Shared;
    history => check_history on Shared;
    compaction => check_compaction on Private;
}

// ---------------------------------------------------------------------------
// Embedded only: lease expiry runs on tokio's clock.

/// Lets the embedded store's reaper run; a bounded number of scheduler turns,
/// not time (the clock is paused).
async fn settle() {
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn embedded_lease_expiry_follows_tokio_time() -> Result<()> {
    let wall = std::time::Instant::now();
    let store: Arc<dyn Store> = embedded_store();
    let ttl = Duration::from_secs(10);
    let (ka, kb) = ("/paused/a", "/paused/b");
    let a = store.grant_lease(ttl).await?;
    let b = store.grant_lease(ttl).await?;
    ensure_eq!((a.ttl, b.ttl), (ttl, ttl), "granted TTLs");
    store.put(ka, b"a".to_vec(), Some(a.id)).await?;
    store.put(kb, b"b".to_vec(), Some(b.id)).await?;

    // 8 s in: both alive. Renew b, so it now runs until 18 s.
    tokio::time::advance(Duration::from_secs(8)).await;
    settle().await;
    ensure_eq!(
        keys_under(&store, "/paused/").await?,
        vec![ka.to_owned(), kb.to_owned()],
        "before the TTL"
    );
    ensure_eq!(
        store.keep_alive(b.id).await?,
        Some(ttl),
        "renewing b at 8 s"
    );

    // 11 s: a is past its TTL, b is not.
    tokio::time::advance(Duration::from_secs(3)).await;
    settle().await;
    ensure_eq!(
        keys_under(&store, "/paused/").await?,
        vec![kb.to_owned()],
        "at 11 s only the renewed lease's key is left"
    );
    ensure_eq!(store.keep_alive(a.id).await?, None, "a expired");

    // 17 s: b still alive; 19 s: gone.
    tokio::time::advance(Duration::from_secs(6)).await;
    settle().await;
    ensure!(store.get(kb).await?.is_some(), "b at 17 s (renewed at 8 s)");
    tokio::time::advance(Duration::from_secs(2)).await;
    settle().await;
    ensure_eq!(store.get(kb).await?, None, "b at 19 s");

    ensure!(
        wall.elapsed() < ttl,
        "took {:?} of wall time: expiry must follow tokio's clock",
        wall.elapsed()
    );
    Ok(())
}
