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

use super::{cache::Batch, cache::State, Hub};
use crate::store::{PageRead, Store, StoreError, WatchEvent, WatchMessage, WatchStream};

/// First delay before a retry.
const RETRY_INITIAL: Duration = Duration::from_millis(100);
/// Longest delay between retries.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A watch that ran this long was healthy: the next retry starts from
/// [`RETRY_INITIAL`] again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Exponential retry delays.
#[derive(Clone, Debug)]
struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next retry; each one doubles the last, up to
    /// the maximum.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    fn reset(&mut self) {
        self.next = self.initial;
    }
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
            Ok(Ok(state)) => state,
            Ok(Err(revision)) => {
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
        self.reset(state);
        let since = Instant::now();
        let outcome = self.follow(&mut stream).await;
        SyncEnd {
            outcome,
            watched: since.elapsed(),
        }
    }

    /// Reads every key under `prefix` into a fresh cache, page by page at
    /// the first page's revision. `Ok(Err(revision))`: that revision was
    /// compacted before the last page was read.
    async fn load(
        &self,
        store: &dyn Store,
        prefix: &str,
    ) -> Result<Result<State, u64>, StoreError> {
        let config = &self.inner.config;
        let keys = &self.inner.keys;
        let mut state = State::new(config.protection_threshold_percent, config.history_batches);
        let mut revision = 0;
        let mut after: Option<String> = None;
        let mut pages = 0u64;
        loop {
            let page = match store
                .range_page(prefix, revision, after.as_deref(), config.load_page_keys)
                .await?
            {
                PageRead::Page(page) => page,
                PageRead::Compacted => return Ok(Err(revision)),
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
            "registry cache loaded"
        );
        Ok(Ok(state))
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
