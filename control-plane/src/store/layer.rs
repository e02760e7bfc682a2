//! One [`Store`] that wraps another and lets a [`Layer`] act around each
//! call, so a store that changes a few calls (a bound on every call, a fault
//! in tests) writes only those, not a delegation of the whole trait.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;
use futures::future::BoxFuture;

use super::{
    CasOutcome, Deleted, History, KeyValue, Lease, LeaseId, PageRead, Replaced, Snapshot, Store,
    StoreError, WatchStream,
};

/// A store call, with the arguments a layer may want to look at (values
/// being written are left out: they move into the inner call).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Get {
        key: &'a str,
    },
    Range {
        prefix: &'a str,
    },
    RangePage {
        prefix: &'a str,
        revision: u64,
        after: Option<&'a str>,
        limit: usize,
    },
    Put {
        key: &'a str,
        lease: Option<LeaseId>,
    },
    Replace {
        key: &'a str,
        lease: Option<LeaseId>,
    },
    PutIf {
        key: &'a str,
        lease: Option<LeaseId>,
        expected: u64,
    },
    Delete {
        key: &'a str,
    },
    GrantLease {
        ttl: Duration,
    },
    KeepAlive {
        lease: LeaseId,
    },
    RevokeLease {
        lease: LeaseId,
    },
    Watch {
        prefix: &'a str,
        after_revision: u64,
    },
    History {
        prefix: &'a str,
        after: u64,
        until: u64,
    },
    Compact {
        revision: u64,
    },
}

/// A store call in flight, as a [`Layer`] gets and returns it.
pub type Call<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// What a [`Layered`] store does around the calls of its inner store.
pub trait Layer: Send + Sync + fmt::Debug + 'static {
    /// Runs `call`, the inner store's answer to `op`, or answers without
    /// it. The inner call does nothing until polled.
    fn around<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: Call<'a, T>) -> Call<'a, T>;

    /// The stream of a watch the inner store opened (unchanged by default).
    fn watch_stream(&self, stream: WatchStream) -> WatchStream {
        stream
    }
}

/// A store that passes every call to `inner` through `layer`.
#[derive(Debug, Clone)]
pub struct Layered<L> {
    inner: Arc<dyn Store>,
    layer: L,
}

impl<L: Layer> Layered<L> {
    pub fn wrap(inner: Arc<dyn Store>, layer: L) -> Self {
        Self { inner, layer }
    }

    pub fn layer(&self) -> &L {
        &self.layer
    }
}

#[async_trait]
impl<L: Layer> Store for Layered<L> {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let op = Op::Get { key };
        self.layer.around(op, self.inner.get(key)).await
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let op = Op::Range { prefix };
        self.layer.around(op, self.inner.range(prefix)).await
    }

    async fn range_page(
        &self,
        prefix: &str,
        revision: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PageRead, StoreError> {
        let op = Op::RangePage {
            prefix,
            revision,
            after,
            limit,
        };
        let call = self.inner.range_page(prefix, revision, after, limit);
        self.layer.around(op, call).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let op = Op::Put { key, lease };
        self.layer
            .around(op, self.inner.put(key, value, lease))
            .await
    }

    async fn replace(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Replaced, StoreError> {
        let op = Op::Replace { key, lease };
        self.layer
            .around(op, self.inner.replace(key, value, lease))
            .await
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        let op = Op::PutIf {
            key,
            lease,
            expected,
        };
        let call = self.inner.put_if(key, value, lease, expected);
        self.layer.around(op, call).await
    }

    async fn delete(&self, key: &str) -> Result<Deleted, StoreError> {
        let op = Op::Delete { key };
        self.layer.around(op, self.inner.delete(key)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let op = Op::GrantLease { ttl };
        self.layer.around(op, self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        let op = Op::KeepAlive { lease };
        self.layer.around(op, self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let op = Op::RevokeLease { lease };
        self.layer.around(op, self.inner.revoke_lease(lease)).await
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        let op = Op::Watch {
            prefix,
            after_revision,
        };
        let stream = self
            .layer
            .around(op, self.inner.watch(prefix, after_revision))
            .await?;
        Ok(self.layer.watch_stream(stream))
    }

    async fn history(&self, prefix: &str, after: u64, until: u64) -> Result<History, StoreError> {
        let op = Op::History {
            prefix,
            after,
            until,
        };
        let call = self.inner.history(prefix, after, until);
        self.layer.around(op, call).await
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        let op = Op::Compact { revision };
        self.layer.around(op, self.inner.compact(revision)).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::sync::Mutex;

    use futures::StreamExt;

    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig, WatchMessage};

    /// Records the ops it sees and refuses `delete`.
    #[derive(Debug, Default)]
    struct Recording {
        ops: Mutex<Vec<String>>,
    }

    impl Layer for Recording {
        fn around<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: Call<'a, T>) -> Call<'a, T> {
            self.ops.lock().unwrap().push(format!("{op:?}"));
            if let Op::Delete { .. } = op {
                return Box::pin(async { Err(StoreError::Protocol("refused".into())) });
            }
            call
        }

        fn watch_stream(&self, stream: WatchStream) -> WatchStream {
            Box::pin(stream.take(1))
        }
    }

    #[tokio::test]
    async fn every_call_goes_through_the_layer() {
        let inner = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let store = Layered::wrap(inner.clone(), Recording::default());
        let revision = store.put("/p/a", b"1".to_vec(), None).await.unwrap();
        assert_eq!(store.get("/p/a").await.unwrap().unwrap().value, b"1");
        assert!(matches!(
            store.delete("/p/a").await,
            Err(StoreError::Protocol(_))
        ));
        assert!(inner.get("/p/a").await.unwrap().is_some(), "delete refused");
        let mut watch = store.watch("/p/", revision - 1).await.unwrap();
        assert!(matches!(
            watch.next().await,
            Some(Ok(WatchMessage::Events(_)))
        ));
        assert!(watch.next().await.is_none(), "the layer's stream ends");
        assert_eq!(store.kind(), "embedded");
        assert_eq!(
            *store.layer().ops.lock().unwrap(),
            [
                r#"Put { key: "/p/a", lease: None }"#,
                r#"Get { key: "/p/a" }"#,
                r#"Delete { key: "/p/a" }"#,
                r#"Watch { prefix: "/p/", after_revision: 0 }"#,
            ]
        );
    }
}
