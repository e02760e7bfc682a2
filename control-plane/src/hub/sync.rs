//! The store sync loop: load the cache from a snapshot of the root, page by
//! page at one revision, then follow the store's watch from that revision;
//! when the watch fails, ends or is compacted past, load again.
//!
//! Retries back off exponentially (100 ms doubling to 5 s), whether the
//! attempt failed or the watch merely ended, so a store that keeps closing
//! streams is not hammered in a tight loop; a watch that ran for a healthy
//! while starts the backoff over.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::time::Instant;

use weir_core::backoff::Backoff;

use super::{cache::Batch, cache::State, Hub};
use crate::store::{PageRead, Store, StoreError, WatchEvent, WatchMessage, WatchStream};

/// First delay before a retry.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between retries.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch that ran this long was healthy: the next retry starts from
/// [`RETRY_INITIAL`] again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// What a load read.
#[derive(Debug)]
enum Load {
    /// Every key, as of the first page's revision.
    Done(Box<State>),
    /// That revision was compacted before the last page was read.
    Compacted { revision: u64 },
}

/// How one sync attempt ended.
#[derive(Debug)]
struct SyncEnd {
    /// Why the watch ended, or what failed.
    outcome: Result<String, StoreError>,
    /// How long the cache followed the watch (zero if it never did).
    watched: Duration,
}

impl Hub {
    /// Syncs the cache with the store for as long as the hub runs.
    pub(super) async fn run(self) {
        let store = self.inner.store.clone();
        let prefix = self.inner.keys.root().to_owned();
        let mut backoff = Backoff::new(RETRY_INITIAL, RETRY_MAX);
        loop {
            let end = self.sync(store.as_ref(), &prefix).await;
            if end.watched >= HEALTHY_AFTER {
                backoff.reset();
            }
            let retry_in = backoff.next_delay();
            match end.outcome {
                Ok(reason) => {
                    tracing::warn!(store = store.kind(), reason = %reason, ?retry_in, "store watch ended; reloading");
                }
                Err(e) => {
                    tracing::warn!(store = store.kind(), error = %e, ?retry_in, "store watch failed; reloading");
                }
            }
            tokio::time::sleep(retry_in).await;
        }
    }

    /// One load + watch cycle.
    async fn sync(&self, store: &dyn Store, prefix: &str) -> SyncEnd {
        let failed = |outcome| SyncEnd {
            outcome,
            watched: Duration::ZERO,
        };
        let state = match self.load(store, prefix).await {
            Ok(Load::Done(state)) => state,
            Ok(Load::Compacted { revision }) => {
                return failed(Ok(format!(
                    "the store compacted revision {revision} while it was being loaded"
                )))
            }
            Err(e) => return failed(Err(e)),
        };
        let mut stream = match store.watch(prefix, state.revision).await {
            Ok(stream) => stream,
            Err(e) => return failed(Err(e)),
        };
        self.reset(*state);
        let since = Instant::now();
        let outcome = self.follow(&mut stream).await;
        SyncEnd {
            outcome,
            watched: since.elapsed(),
        }
    }

    /// Reads every key under `prefix` into a fresh cache, page by page at
    /// the first page's revision.
    async fn load(&self, store: &dyn Store, prefix: &str) -> Result<Load, StoreError> {
        let config = &self.inner.config;
        let keys = &self.inner.keys;
        let mut state = State::new(config.protection_threshold_percent, config.history_batches);
        let mut revision = 0;
        let mut after: Option<String> = None;
        let mut pages = 0u64;
        let started = Instant::now();
        loop {
            let page = match store
                .range_page(prefix, revision, after.as_deref(), config.load_page_keys)
                .await?
            {
                PageRead::Page(page) => page,
                PageRead::Compacted => return Ok(Load::Compacted { revision }),
            };
            pages += 1;
            revision = page.revision;
            let Some(last) = page.kvs.last() else {
                break;
            };
            after = Some(last.key.clone());
            for kv in page.kvs {
                state.load(keys, kv);
            }
            if !page.more {
                break;
            }
        }
        state.finish_load(revision);
        tracing::info!(
            revision,
            pages,
            instances = state.instances.len(),
            took = ?started.elapsed(),
            "registry cache loaded"
        );
        Ok(Load::Done(Box::new(state)))
    }

    /// Applies the watch until it ends; returns why it ended.
    async fn follow(&self, stream: &mut WatchStream) -> Result<String, StoreError> {
        while let Some(message) = stream.next().await {
            match message? {
                WatchMessage::Events(events) => self.apply(events),
                WatchMessage::Progress { revision } => self.progress(revision),
                WatchMessage::Compacted { compact_revision } => {
                    return Ok(format!(
                        "watch start revision compacted (at {compact_revision})"
                    ));
                }
            }
        }
        Ok("store closed the watch stream".to_owned())
    }

    /// Replaces the cache with a freshly loaded one; subscribers of the old
    /// one resync.
    fn reset(&self, loaded: State) {
        let revision = loaded.revision;
        let mut state = self.write();
        let old = std::mem::replace(&mut *state, loaded);
        if old.loaded {
            let _ = self.inner.tx.send(Arc::new(Batch::Reset { revision }));
        }
        self.inner.revision.send_replace(revision);
        self.inner.topology.send_modify(|t| *t += 1);
        self.inner.loaded.send_replace(true);
        drop(state);
        // The old cache is dropped outside the lock.
        drop(old);
    }

    /// Applies one watch message and broadcasts it, under the write lock so
    /// a subscriber reading the cache sees exactly the batches after it.
    fn apply(&self, changes: Vec<WatchEvent>) {
        let mut state = self.write();
        let applied = state.apply(&self.inner.keys, changes);
        // A write nobody follows (an agent's ack, a replica's renewal) wakes
        // no subscriber: they learn the revision from the next change.
        if let Some(batch) = applied.batch {
            let _ = self.inner.tx.send(batch);
        }
        self.inner.revision.send_replace(applied.revision);
        if applied.topology {
            self.inner.topology.send_modify(|t| *t += 1);
        }
    }

    fn progress(&self, revision: u64) {
        let mut state = self.write();
        if state.progress(revision) {
            let _ = self.inner.tx.send(Arc::new(Batch::Progress { revision }));
            self.inner.revision.send_replace(revision);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    };

    use weir_core::InstanceKey;

    use super::*;
    use crate::{
        hub::{tests::record, HubConfig},
        keys::Keys,
        store::{Call, EmbeddedStore, EmbeddedStoreConfig, Layer, Layered, Op},
    };

    /// Makes the loads of the store it wraps fail, its watches end after
    /// `watch_for` (at once when zero), can compact the revision of a load
    /// in progress, and records when each load starts.
    #[derive(Debug)]
    struct Flaky {
        /// The store it wraps, to write and compact mid-load.
        inner: EmbeddedStore,
        /// Loads that fail before any succeeds.
        failing_loads: usize,
        watch_for: Duration,
        compact_mid_load: AtomicBool,
        loads: Mutex<Vec<Instant>>,
    }

    impl Flaky {
        fn new(failing_loads: usize, watch_for: Duration) -> Arc<Layered<Self>> {
            let inner = EmbeddedStore::new(EmbeddedStoreConfig::default());
            let flaky = Self {
                inner: inner.clone(),
                failing_loads,
                watch_for,
                compact_mid_load: AtomicBool::new(false),
                loads: Mutex::default(),
            };
            Arc::new(Layered::wrap(Arc::new(inner), flaky))
        }

        fn loads(&self) -> Vec<Instant> {
            self.loads.lock().unwrap().clone()
        }
    }

    impl Layer for Flaky {
        fn around<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: Call<'a, T>) -> Call<'a, T> {
            let Op::RangePage { revision, .. } = op else {
                return call;
            };
            Box::pin(async move {
                if revision == 0 {
                    let n = {
                        let mut loads = self.loads.lock().unwrap();
                        loads.push(Instant::now());
                        loads.len()
                    };
                    if n > 1000 {
                        // A tight loop: park it, so paused time can advance
                        // and the test fails on the count instead of hanging.
                        std::future::pending::<()>().await;
                    }
                    if n <= self.failing_loads {
                        return Err(StoreError::Protocol("injected failure".into()));
                    }
                } else if self.compact_mid_load.swap(false, Ordering::SeqCst) {
                    let revision = self.inner.put("/t/v1/agents/x", Vec::new(), None).await?;
                    self.inner.compact(revision).await?;
                }
                call.await
            })
        }

        fn watch_stream(&self, stream: WatchStream) -> WatchStream {
            if self.watch_for.is_zero() {
                return Box::pin(futures::stream::empty());
            }
            Box::pin(stream.take_until(tokio::time::sleep(self.watch_for)))
        }
    }

    fn gaps(loads: &[Instant]) -> Vec<Duration> {
        loads.windows(2).map(|w| w[1] - w[0]).collect()
    }

    /// `gap` is `want`, give or take the timer's millisecond rounding.
    fn about(gap: Duration, want: Duration) -> bool {
        gap >= want && gap <= want + Duration::from_millis(5)
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_keeps_failing_or_ending_watches_is_retried_with_backoff() {
        // Three failed loads, then loads whose watch ends at once: one
        // backoff across both kinds of retry.
        let store = Flaky::new(3, Duration::ZERO);
        let (hub, _task) = Hub::start(store.clone(), Keys::new("/t"), HubConfig::default());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(hub.is_ready());
        let loads = store.layer().loads();
        // 0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3 s, then every 5 s up to 56.3 s.
        assert!((16..=17).contains(&loads.len()), "{} loads", loads.len());
        let want = [100, 200, 400, 800, 1600, 3200]
            .map(Duration::from_millis)
            .into_iter()
            .chain(std::iter::repeat(RETRY_MAX));
        for (n, (gap, want)) in gaps(&loads).into_iter().zip(want).enumerate() {
            assert!(about(gap, want), "retry {n}: {gap:?}, expected {want:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_watch_starts_the_backoff_over() {
        let store = Flaky::new(0, Duration::from_secs(30));
        let (_hub, _task) = Hub::start(store.clone(), Keys::new("/t"), HubConfig::default());
        tokio::time::sleep(Duration::from_secs(200)).await;
        let loads = store.layer().loads();
        assert!(loads.len() >= 6, "{} loads", loads.len());
        // Each watch ran 30 s, so each retry waits the first delay again.
        for gap in gaps(&loads) {
            assert!(
                about(gap, Duration::from_secs(30) + RETRY_INITIAL),
                "{gap:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_pages_and_restarts_when_its_revision_is_compacted() {
        let store = Flaky::new(0, Duration::from_secs(3600));
        let keys = Keys::new("/t");
        for n in 0..5 {
            let id = format!("i-{n}");
            let key = keys.instance(&InstanceKey {
                namespace: "ns".into(),
                service: "svc".into(),
                instance_id: id.clone(),
            });
            store.put(&key, record(&id, 80), None).await.unwrap();
        }
        store.layer().compact_mid_load.store(true, Ordering::SeqCst);
        let config = HubConfig {
            load_page_keys: 2,
            ..HubConfig::default()
        };
        let (hub, _task) = Hub::start(store.clone(), keys, config);
        let mut ready = hub.inner.loaded.subscribe();
        tokio::time::timeout(Duration::from_secs(10), ready.wait_for(|r| *r))
            .await
            .unwrap()
            .unwrap();
        // The first load was cut short by the compaction; the second read
        // all five instances in three pages, and the write made meanwhile.
        let loads = store.layer().loads();
        assert_eq!(loads.len(), 2);
        assert!(about(loads[1] - loads[0], RETRY_INITIAL));
        assert_eq!(hub.all_instances().len(), 5);
        assert!(hub.agents().contains("x"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_subscriber_before_the_first_load_gets_the_loaded_snapshot() {
        use weir_proto::registry::v1::watch_response::Kind;

        // Two failed loads: the replica loads after 300 ms.
        let store = Flaky::new(2, Duration::from_secs(3600));
        let keys = Keys::new("/t");
        let key = keys.instance(&InstanceKey {
            namespace: "ns".into(),
            service: "svc".into(),
            instance_id: "i-0".into(),
        });
        store.put(&key, record("i-0", 80), None).await.unwrap();
        let (hub, _task) = Hub::start(store.clone(), keys, HubConfig::default());
        let mut watch = hub.subscribe(crate::hub::Filter::default(), 0);
        let mut policies = hub.subscribe_policies(0);
        assert!(!hub.is_ready());
        let m = crate::hub::tests::next(&mut watch).await;
        assert!(hub.is_ready());
        assert_eq!(store.layer().loads().len(), 3);
        assert_eq!(m.kind, Kind::Snapshot as i32);
        assert!(m.snapshot_complete && m.resync_reason.is_empty());
        assert_eq!(m.events.len(), 1);
        let p = policies.recv().await.unwrap();
        assert!(p.resync_reason.is_empty() && p.revision == m.revision);
    }
}
