//! The store: where the registry's truth lives.
//!
//! [`Store`] is a small key-value contract shaped after etcd's: revisions,
//! leases, prefix ranges, compare-and-put and ordered, resumable watches. Two
//! implementations pass the same conformance suite (`tests/tests/store_conformance.rs`):
//! [`EtcdStore`] for production and [`EmbeddedStore`] for single-node dev mode.
//!
//! Revisions are etcd's: a store-wide counter bumped once per write; a key's
//! `mod_revision` is the revision of its last write. A watch from revision R
//! delivers every change with a revision greater than R, in order.

mod bounded;
mod embedded;
mod etcd;
mod layer;

use std::{fmt, pin::Pin, time::Duration};

use async_trait::async_trait;
use futures::Stream;

pub use bounded::{Bound, BoundedStore};
pub use embedded::{EmbeddedStore, EmbeddedStoreConfig};
pub use etcd::{EtcdStore, EtcdStoreConfig};
pub use layer::{Call, Layer, Layered, Op};

/// An etcd lease id. 0 means "no lease".
pub type LeaseId = i64;

/// One key with its value and bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: u64,
    /// Revision of the last write of the key.
    pub mod_revision: u64,
    /// Lease the key is attached to, 0 if none.
    pub lease: LeaseId,
}

/// A consistent read of a prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// Keys in byte-wise order.
    pub kvs: Vec<KeyValue>,
    /// Store revision the read was taken at.
    pub revision: u64,
}

/// One page of a prefix read at a fixed revision (see [`Store::range_page`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Page {
    /// Keys in byte-wise order, each greater than the `after` key asked for.
    pub kvs: Vec<KeyValue>,
    /// Revision the page was read at: the one asked for, or the current one
    /// when 0 was asked.
    pub revision: u64,
    /// Whether keys follow the last one of this page.
    pub more: bool,
}

/// Outcome of [`Store::range_page`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PageRead {
    Page(Page),
    /// The revision asked for is older than what the store still holds:
    /// start again from a first page at the current revision.
    Compacted,
}

/// What a watched change did to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a put, the new key-value; for a delete, the key with an empty value
    /// and `mod_revision` set to the revision of the deletion.
    pub kv: KeyValue,
}

/// One message of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes of one or more revisions, in revision order.
    Events(Vec<WatchEvent>),
    /// Nothing under the prefix changed, but the store is at `revision`.
    Progress { revision: u64 },
    /// The requested start revision is gone; the stream ends after this.
    /// Take a fresh [`Snapshot`] and watch from its revision.
    Compacted { compact_revision: u64 },
}

/// A watch stream. Ends after an error or [`WatchMessage::Compacted`].
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, StoreError>> + Send>>;

/// A granted lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    /// The TTL the store granted (etcd may raise a short one).
    pub ttl: Duration,
}

/// Outcome of [`Store::put_if`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Written { revision: u64 },
    /// The key's `mod_revision` was not the expected one. `current` is the
    /// key as it is now (None if it does not exist).
    Conflict { current: Option<KeyValue> },
}

/// Outcome of [`Store::replace`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replaced {
    /// Revision of the write.
    pub revision: u64,
    /// The key as it was before, if it existed.
    pub prev: Option<KeyValue>,
}

/// Outcome of [`Store::history`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum History {
    Events(Vec<WatchEvent>),
    /// `after` is older than what the store still holds.
    Compacted {
        compact_revision: u64,
    },
}

/// Outcome of [`Store::delete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub existed: bool,
    /// Revision of the deletion, or the current revision if nothing existed.
    pub revision: u64,
}

/// Store failures. Callers map them to `UNAVAILABLE` unless noted.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("store answered with something unexpected: {0}")]
    Protocol(String),
    /// The call did not finish within its bound ([`BoundedStore`]); a write
    /// may or may not have been applied.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
}

/// The registry's storage contract. See the module docs.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// "etcd" or "embedded", for logs and `/readyz`.
    fn kind(&self) -> &'static str;

    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;

    /// Reads every key starting with `prefix`, at one revision.
    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError>;

    /// Reads up to `limit` (at least 1) keys starting with `prefix` and
    /// greater than `after` (from the first key when None), as they were at
    /// `revision` (0 = the current revision; the page says which). Reading a
    /// prefix page by page at the first page's revision yields one
    /// consistent snapshot, however large, unless that revision is
    /// compacted meanwhile ([`PageRead::Compacted`]). A revision in the
    /// future is an error.
    async fn range_page(
        &self,
        prefix: &str,
        revision: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PageRead, StoreError>;

    /// Writes a key, attached to `lease` when given (detached otherwise).
    /// Returns the revision of the write.
    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        Ok(self.replace(key, value, lease).await?.revision)
    }

    /// Writes a key like [`Store::put`] and returns what it replaced, in one
    /// round trip.
    async fn replace(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Replaced, StoreError>;

    /// Writes a key only if its `mod_revision` is `expected` (0 = only if the
    /// key does not exist).
    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: u64,
    ) -> Result<CasOutcome, StoreError>;

    /// Deletes one key.
    async fn delete(&self, key: &str) -> Result<Deleted, StoreError>;

    /// Grants a lease of about `ttl`.
    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError>;

    /// Renews a lease. `Ok(None)` means the lease no longer exists.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError>;

    /// Revokes a lease, deleting every key attached to it. Returns whether it
    /// existed.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool, StoreError>;

    /// Watches every key starting with `prefix` for changes with a revision
    /// greater than `after_revision`.
    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError>;

    /// The changes under `prefix` with revisions in `(after, until]`, in
    /// order, for a watcher resuming from an old revision. Unlike a watch, a
    /// delete here carries the deleted key's last value, so the caller can
    /// say what was removed. `until` must not be in the future.
    async fn history(&self, prefix: &str, after: u64, until: u64) -> Result<History, StoreError>;

    /// Discards history up to `revision` (watches from before it get
    /// [`WatchMessage::Compacted`]).
    async fn compact(&self, revision: u64) -> Result<(), StoreError>;
}

/// The exclusive end of a prefix range: the prefix with its last byte
/// incremented (etcd's convention). Prefixes in Weir always end with '/'.
pub(crate) fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}
