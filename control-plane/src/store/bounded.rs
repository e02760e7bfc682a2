//! A [`Store`] whose every call finishes within a bound, for the calls made
//! on behalf of a gRPC request: a hung store must cost a caller a few
//! seconds and a clear error, not its whole deadline (a renewal on an etcd
//! lease stream, for one, has no deadline of its own).
//!
//! Watches are bounded only while they open; their stream lives on.

use std::{future::Future, sync::Arc, time::Duration};

use async_trait::async_trait;

use super::{
    CasOutcome, Deleted, History, KeyValue, Lease, LeaseId, PageRead, Replaced, Snapshot, Store,
    StoreError, WatchStream,
};

/// Wraps a store so each call fails with [`StoreError::Timeout`] after
/// `limit`.
#[derive(Debug, Clone)]
pub struct BoundedStore {
    inner: Arc<dyn Store>,
    limit: Duration,
}

impl BoundedStore {
    pub fn new(inner: Arc<dyn Store>, limit: Duration) -> Self {
        Self { inner, limit }
    }

    async fn bound<T>(
        &self,
        call: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.limit, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.limit)))
    }
}

#[async_trait]
impl Store for BoundedStore {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.bound(self.inner.get(key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        self.bound(self.inner.range(prefix)).await
    }

    async fn range_page(
        &self,
        prefix: &str,
        revision: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PageRead, StoreError> {
        self.bound(self.inner.range_page(prefix, revision, after, limit))
            .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        self.bound(self.inner.put(key, value, lease)).await
    }

    async fn replace(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Replaced, StoreError> {
        self.bound(self.inner.replace(key, value, lease)).await
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        self.bound(self.inner.put_if(key, value, lease, expected))
            .await
    }

    async fn delete(&self, key: &str) -> Result<Deleted, StoreError> {
        self.bound(self.inner.delete(key)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        self.bound(self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        self.bound(self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.bound(self.inner.revoke_lease(lease)).await
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        self.bound(self.inner.watch(prefix, after_revision)).await
    }

    async fn history(&self, prefix: &str, after: u64, until: u64) -> Result<History, StoreError> {
        self.bound(self.inner.history(prefix, after, until)).await
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.bound(self.inner.compact(revision)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig};

    /// A store that never answers.
    #[derive(Debug)]
    struct Hung;

    #[async_trait]
    impl Store for Hung {
        fn kind(&self) -> &'static str {
            "hung"
        }
        async fn get(&self, _: &str) -> Result<Option<KeyValue>, StoreError> {
            std::future::pending().await
        }
        async fn range(&self, _: &str) -> Result<Snapshot, StoreError> {
            std::future::pending().await
        }
        async fn range_page(
            &self,
            _: &str,
            _: u64,
            _: Option<&str>,
            _: usize,
        ) -> Result<PageRead, StoreError> {
            std::future::pending().await
        }
        async fn replace(
            &self,
            _: &str,
            _: Vec<u8>,
            _: Option<LeaseId>,
        ) -> Result<Replaced, StoreError> {
            std::future::pending().await
        }
        async fn put_if(
            &self,
            _: &str,
            _: Vec<u8>,
            _: Option<LeaseId>,
            _: u64,
        ) -> Result<CasOutcome, StoreError> {
            std::future::pending().await
        }
        async fn delete(&self, _: &str) -> Result<Deleted, StoreError> {
            std::future::pending().await
        }
        async fn grant_lease(&self, _: Duration) -> Result<Lease, StoreError> {
            std::future::pending().await
        }
        async fn keep_alive(&self, _: LeaseId) -> Result<Option<Duration>, StoreError> {
            std::future::pending().await
        }
        async fn revoke_lease(&self, _: LeaseId) -> Result<bool, StoreError> {
            std::future::pending().await
        }
        async fn watch(&self, _: &str, _: u64) -> Result<WatchStream, StoreError> {
            std::future::pending().await
        }
        async fn history(&self, _: &str, _: u64, _: u64) -> Result<History, StoreError> {
            std::future::pending().await
        }
        async fn compact(&self, _: u64) -> Result<(), StoreError> {
            std::future::pending().await
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_store_times_out_at_the_bound() {
        let limit = Duration::from_secs(3);
        let store = BoundedStore::new(Arc::new(Hung), limit);
        let started = tokio::time::Instant::now();
        let put = store.put("/k", b"v".to_vec(), None).await;
        assert!(
            matches!(put, Err(StoreError::Timeout(d)) if d == limit),
            "{put:?}"
        );
        assert_eq!(started.elapsed(), limit);
        assert!(matches!(
            store.keep_alive(7).await,
            Err(StoreError::Timeout(_))
        ));
        assert!(matches!(store.get("/k").await, Err(StoreError::Timeout(_))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_healthy_store_answers_through_the_bound() {
        let store = BoundedStore::new(
            Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default())),
            Duration::from_secs(3),
        );
        let revision = store.put("/k", b"v".to_vec(), None).await.expect("put");
        let kv = store.get("/k").await.expect("get").expect("present");
        assert_eq!(kv.value, b"v");
        assert_eq!(kv.mod_revision, revision);
        assert_eq!(store.kind(), "embedded");
    }
}
