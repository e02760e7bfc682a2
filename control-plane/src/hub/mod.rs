//! The watch hub: one store watch per replica, fanned out to every
//! subscriber through an in-memory cache.
//!
//! - `cache`: the cache itself (instances with per-service health counts
//!   and protection, service configs, policies, replicas, agents, and a
//!   bounded history of change batches). Pure, unit-tested without a store.
//! - `agents`: the cache's agent table (session and last-seen records,
//!   acknowledgements) and what "connected" means.
//! - `sync`: loads the cache from the store page by page at one revision,
//!   then follows the store's watch; reloads with backoff when it ends.
//! - `feed`: the one snapshot / resume / resync algorithm, behind a
//!   `View` for the registry `Watch` stream and one for the agents' policy
//!   stream.
//! - `chunk`: splits watch messages below 1 MiB with safe resume points.
//! - `record`: decoding stored records.
//!
//! Every batch is applied to the cache and broadcast while the cache's write
//! lock is held, so a subscriber that reads a snapshot at revision S under
//! the read lock sees, on its broadcast receiver, exactly the batches after
//! S.
//!
//! Slow subscribers: the broadcast channel is a bounded ring. A subscriber
//! that falls more than its capacity behind gets `Lagged` and is sent a fresh
//! snapshot (a resync) instead of the changes it missed; the hub never waits
//! for it and never buffers more for it. See `docs/architecture.md`.

mod agents;
mod cache;
mod chunk;
mod feed;
mod record;
mod sync;

use std::{
    collections::BTreeSet,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use tokio::sync::{broadcast, mpsc, watch};
use weir_proto::{
    agent::v1::{AgentInfo, AgentRecord, PolicyChange, PolicyUpdate},
    registry::v1::{Instance, ServiceConfig, ServiceProtection, WatchResponse},
};

pub use agents::Seen;
pub use record::decode_instance;

use self::{
    cache::{Batch, State},
    feed::{PolicyView, RegistryView},
};
use weir_core::InstanceKey;

use crate::{keys::Keys, store::Store};

/// Protection threshold of a service that sets none.
pub const DEFAULT_PROTECTION_THRESHOLD_PERCENT: u32 = 50;

/// Settings of the hub.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// Change batches held for watchers resuming from a recent revision.
    pub history_batches: usize,
    /// Batches a subscriber may fall behind before it is resynced.
    pub subscriber_lag: usize,
    /// Messages queued towards one gRPC watcher.
    pub subscriber_queue: usize,
    /// Protection threshold (percent) of services without their own.
    pub protection_threshold_percent: u32,
    /// Keys per page when loading the cache from the store.
    pub load_page_keys: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history_batches: 50_000,
            subscriber_lag: 4096,
            subscriber_queue: 16,
            protection_threshold_percent: DEFAULT_PROTECTION_THRESHOLD_PERCENT,
            load_page_keys: 1000,
        }
    }
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    keys: Keys,
    config: HubConfig,
    state: RwLock<State>,
    tx: broadcast::Sender<Arc<Batch>>,
    revision: watch::Sender<u64>,
    /// Set once the first snapshot has loaded.
    loaded: watch::Sender<bool>,
    /// Bumped when instances or the replica set change (what the check
    /// assigner depends on), not on every write under the root.
    topology: watch::Sender<u64>,
    /// Set when the hub stops; ends every subscriber.
    closed: watch::Sender<bool>,
}

/// Which instances a watcher or a read wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// Empty = every namespace.
    pub namespace: String,
    /// Empty = every service (of the namespace).
    pub service: String,
}

/// (namespace, service, instances) of one service.
pub type ServiceInstances = (String, String, Vec<Arc<Instance>>);

/// Handle to a replica's hub. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

impl Hub {
    /// Creates the hub and starts its store watch. The watch stops when the
    /// returned [`HubTask`] is dropped.
    pub fn start(store: Arc<dyn Store>, keys: Keys, config: HubConfig) -> (Self, HubTask) {
        let (tx, _) = broadcast::channel(config.subscriber_lag.max(16));
        let state = State::new(config.protection_threshold_percent, config.history_batches);
        let hub = Self {
            inner: Arc::new(Inner {
                store,
                keys,
                config,
                state: RwLock::new(state),
                tx,
                revision: watch::channel(0).0,
                loaded: watch::channel(false).0,
                topology: watch::channel(0).0,
                closed: watch::channel(false).0,
            }),
        };
        let task = tokio::spawn(hub.clone().run());
        (hub.clone(), HubTask { task, hub })
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The current policy of a service.
    pub fn policy(&self, namespace: &str, service: &str) -> Option<Arc<PolicyChange>> {
        self.read()
            .policies
            .get(&(namespace.to_owned(), service.to_owned()))
            .cloned()
    }

    /// Current policies of a namespace (all when empty), and the revision.
    pub fn policies(&self, namespace: &str) -> (Vec<Arc<PolicyChange>>, u64) {
        let state = self.read();
        let list = state
            .policies
            .iter()
            .filter(|((ns, _), _)| namespace.is_empty() || ns == namespace)
            .map(|(_, p)| p.clone())
            .collect();
        (list, state.revision)
    }

    /// Nodes with an open agent session.
    pub fn agents(&self) -> BTreeSet<String> {
        self.read().agents.sessions()
    }

    /// The session record of a node, while its session lives.
    pub fn agent_session(&self, node: &str) -> Option<Arc<AgentRecord>> {
        self.read().agents.session(node)
    }

    /// Every agent's last-seen record, with its node's session record if
    /// the session lives.
    pub fn agents_seen(&self) -> Vec<(Seen, Option<Arc<AgentRecord>>)> {
        self.read().agents.seen()
    }

    /// Agents (with a session or a last-seen record) after `after` in node
    /// order, at most `limit`; whether more follow; the revision.
    pub fn agents_page(&self, after: Option<&str>, limit: usize) -> (Vec<AgentInfo>, bool, u64) {
        let state = self.read();
        let (page, more) = state.agents.page(after, limit);
        (page, more, state.revision)
    }

    /// Follows the policies: a snapshot (or the changes after
    /// `start_revision`, read from this replica's history or the store's),
    /// then every change, in order. A subscriber that falls behind, or whose
    /// revision is gone, gets a fresh snapshot. Nothing is sent before the
    /// replica's first load.
    pub fn subscribe_policies(&self, start_revision: u64) -> mpsc::Receiver<PolicyUpdate> {
        feed::spawn(self, PolicyView, start_revision)
    }

    /// Live control-plane replica ids, sorted.
    pub fn replicas(&self) -> Vec<String> {
        self.read().replicas.iter().cloned().collect()
    }

    /// Sizes for `/metrics`: (instances, services, agent sessions, open
    /// subscriptions to the change feed: watches and agent sessions).
    pub fn sizes(&self) -> (usize, usize, usize, usize) {
        let state = self.read();
        (
            state.instances.len(),
            state.services_count(),
            state.agents.sessions().len(),
            self.inner.tx.receiver_count(),
        )
    }

    /// Live replicas with the address each announced: (id, host:port).
    pub fn replica_addresses(&self) -> Vec<(String, String)> {
        self.read()
            .replica_addresses
            .iter()
            .map(|(id, a)| (id.clone(), a.clone()))
            .collect()
    }

    /// Every instance in the cache.
    pub fn all_instances(&self) -> Vec<Arc<Instance>> {
        self.read().instances.values().cloned().collect()
    }

    /// Protection state of one service.
    pub fn protection(&self, namespace: &str, service: &str) -> ServiceProtection {
        self.read().protection(namespace, service)
    }

    /// The stored settings of a service, if any.
    pub fn service_config(&self, namespace: &str, service: &str) -> Option<ServiceConfig> {
        self.read()
            .configs
            .get(&(namespace.to_owned(), service.to_owned()))
            .cloned()
    }

    /// The threshold used when a service sets none.
    pub fn default_protection_threshold(&self) -> u32 {
        self.inner.config.protection_threshold_percent
    }

    /// Fires when instances or the replica set changed (for the check
    /// assigner).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.topology.subscribe()
    }

    /// Whether the first snapshot has loaded.
    pub fn is_ready(&self) -> bool {
        self.read().loaded
    }

    /// The revision the cache has applied.
    pub fn revision(&self) -> u64 {
        *self.inner.revision.borrow()
    }

    /// Waits until the cache has applied `revision` (true) or `timeout`
    /// passed (false).
    pub async fn wait_for(&self, revision: u64, timeout: Duration) -> bool {
        let mut rx = self.inner.revision.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// One instance from the cache.
    pub fn instance(&self, key: &InstanceKey) -> Option<Arc<Instance>> {
        self.read().instances.get(key).cloned()
    }

    /// The instances of one service and the revision they were read at.
    pub fn service(&self, namespace: &str, service: &str) -> (Vec<Arc<Instance>>, u64) {
        let state = self.read();
        let instances = state
            .service_instances(namespace, service)
            .cloned()
            .collect();
        (instances, state.revision)
    }

    /// Services in (namespace, name) order, starting after `after` (exclusive),
    /// each with its instances, until `select` has accepted `limit` services.
    /// `select` sees a service's instances and returns the ones to keep, or
    /// None to skip the service. Returns the services, whether more may
    /// follow, and the revision.
    pub fn services(
        &self,
        namespace: &str,
        after: Option<(&str, &str)>,
        limit: usize,
        select: impl FnMut(&str, &str, Vec<Arc<Instance>>) -> Option<Vec<Arc<Instance>>>,
    ) -> (Vec<ServiceInstances>, bool, u64) {
        let state = self.read();
        let (services, more) = state.services(namespace, after, limit, select);
        (services, more, state.revision)
    }

    /// Subscribes a watcher: a snapshot (or the changes after
    /// `start_revision`), then live changes. Nothing is sent before the
    /// replica's first load. The stream ends when the hub stops; dropping it
    /// unsubscribes.
    pub fn subscribe(&self, filter: Filter, start_revision: u64) -> mpsc::Receiver<WatchResponse> {
        feed::spawn(self, RegistryView { filter }, start_revision)
    }
}

/// Owns the hub's background watch; dropping it stops the watch (and so
/// ends every subscriber's stream).
#[derive(Debug)]
pub struct HubTask {
    task: tokio::task::JoinHandle<()>,
    hub: Hub,
}

impl HubTask {
    /// Completes if the watch task ends by itself (only a panic ends it),
    /// so the server stops rather than serve a frozen cache.
    pub async fn ended(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.task).await
    }
}

impl Drop for HubTask {
    fn drop(&mut self) {
        self.task.abort();
        self.hub.inner.closed.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use prost::Message;
    use weir_proto::registry::v1::{watch_response::Kind, HealthStatus};

    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig};

    pub(super) fn record(id: &str, port: u32) -> Vec<u8> {
        Instance {
            namespace: "ns".into(),
            service: "svc".into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port,
            ..Instance::default()
        }
        .encode_to_vec()
    }

    pub(super) async fn next(rx: &mut mpsc::Receiver<WatchResponse>) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("watch message in time")
            .expect("stream open")
    }

    /// Waits until a CHANGES message carries a protection flip.
    async fn next_flip(rx: &mut mpsc::Receiver<WatchResponse>) -> ServiceProtection {
        loop {
            let m = next(rx).await;
            if m.kind == Kind::Changes as i32 {
                if let Some(p) = m.protection.into_iter().next() {
                    return p;
                }
            }
        }
    }

    #[tokio::test]
    async fn protection_follows_the_counts_through_puts_status_changes_and_deletes() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let (hub, _task) = Hub::start(store.clone(), keys.clone(), HubConfig::default());
        let key = |id: &str| InstanceKey {
            namespace: "ns".into(),
            service: "svc".into(),
            instance_id: id.into(),
        };
        let put = |id: String, critical: bool| {
            let store = store.clone();
            let k = keys.instance(&key(&id));
            async move {
                let mut i = Instance::decode(record(&id, 80).as_slice()).unwrap();
                if critical {
                    i.status = HealthStatus::Critical as i32;
                }
                store.put(&k, i.encode_to_vec(), None).await.unwrap();
            }
        };
        for k in 0..4 {
            put(format!("i-{k}"), false).await;
        }
        let mut rx = hub.subscribe(Filter::default(), 0);
        let snapshot = next(&mut rx).await;
        assert!(snapshot.protection.is_empty());
        // 2 of 4 critical: exactly 50% healthy, not below the threshold.
        put("i-0".into(), true).await;
        put("i-1".into(), true).await;
        // The third flips it (1 of 4 healthy) ...
        put("i-2".into(), true).await;
        let p = next_flip(&mut rx).await;
        assert!(p.active && p.healthy == 1 && p.total == 4, "{p:?}");
        assert!(hub.protection("ns", "svc").active);
        // ... and deleting two critical ones releases it (1 of 2).
        store.delete(&keys.instance(&key("i-0"))).await.unwrap();
        store.delete(&keys.instance(&key("i-1"))).await.unwrap();
        let p = next_flip(&mut rx).await;
        assert!(!p.active && p.healthy == 1 && p.total == 2, "{p:?}");
        // A replaced record counts once.
        put("i-3".into(), false).await;
        put("i-3".into(), false).await;
        assert!(
            hub.wait_for(
                store.range("/t/").await.unwrap().revision,
                Duration::from_secs(5)
            )
            .await
        );
        let p = hub.protection("ns", "svc");
        assert_eq!((p.healthy, p.total), (1, 2));
    }
}
