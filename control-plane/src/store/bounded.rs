//! A [`Store`] whose every call finishes within a bound, for the calls made
//! on behalf of a gRPC request: a hung store must cost a caller a few
//! seconds and a clear error, not its whole deadline (a renewal on an etcd
//! lease stream, for one, has no deadline of its own).
//!
//! Watches are bounded only while they open; their stream lives on.

use std::{sync::Arc, time::Duration};

use super::{
    layer::{Call, Layer, Layered, Op},
    Store, StoreError,
};

/// Wraps a store so each call fails with [`StoreError::Timeout`] after
/// `limit`.
pub type BoundedStore = Layered<Bound>;

impl BoundedStore {
    pub fn new(inner: Arc<dyn Store>, limit: Duration) -> Self {
        Layered::wrap(inner, Bound { limit })
    }
}

/// The [`Layer`] of a [`BoundedStore`]: a timeout on each call.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    limit: Duration,
}

impl Layer for Bound {
    fn around<'a, T: Send + 'a>(&'a self, _: Op<'a>, call: Call<'a, T>) -> Call<'a, T> {
        let limit = self.limit;
        Box::pin(async move {
            tokio::time::timeout(limit, call)
                .await
                .unwrap_or(Err(StoreError::Timeout(limit)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig};

    /// Makes every call of the store it wraps hang.
    #[derive(Debug)]
    struct Hung;

    impl Layer for Hung {
        fn around<'a, T: Send + 'a>(&'a self, _: Op<'a>, _: Call<'a, T>) -> Call<'a, T> {
            Box::pin(std::future::pending())
        }
    }

    fn embedded() -> Arc<dyn Store> {
        Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_store_times_out_at_the_bound() {
        let limit = Duration::from_secs(3);
        let hung = Arc::new(Layered::wrap(embedded(), Hung));
        let store = BoundedStore::new(hung, limit);
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
        let store = BoundedStore::new(embedded(), Duration::from_secs(3));
        let revision = store.put("/k", b"v".to_vec(), None).await.expect("put");
        let kv = store.get("/k").await.expect("get").expect("present");
        assert_eq!(kv.value, b"v");
        assert_eq!(kv.mod_revision, revision);
        assert_eq!(store.kind(), "embedded");
    }
}
