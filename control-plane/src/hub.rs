//! The watch hub: one store watch per replica, fanned out to every
//! subscriber through an in-memory cache.
//!
//! The hub keeps the current instances (what GetService and ListServices
//! read), the store revision it has applied, and a bounded history of recent
//! change batches. Every batch is applied to the cache and broadcast while
//! the cache's write lock is held, so a subscriber that reads a snapshot at
//! revision S under the read lock sees, on its broadcast receiver, exactly the
//! batches after S.
//!
//! Slow subscribers: the broadcast channel is a bounded ring. A subscriber
//! that falls more than its capacity behind gets `Lagged` and is sent a fresh
//! snapshot (a resync) instead of the changes it missed; the hub never waits
//! for it and never buffers more for it. See `docs/architecture.md`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use futures::StreamExt;
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use weir_proto::{
    agent::v1::{policy_update, PolicyChange, PolicyUpdate},
    policy::v1::PolicyRecord,
    registry::v1::{
        watch_response::Kind, Event, EventType, HealthStatus, Instance, ServiceConfig,
        ServiceProtection, WatchResponse,
    },
};

use weir_core::{backoff::Backoff, InstanceKey};

use crate::{
    keys::Keys,
    store::{EventKind, History, Snapshot, Store, WatchMessage},
};

/// Largest encoded watch message the hub builds (snapshots and large change
/// batches are split across messages below this).
const MAX_MESSAGE_BYTES: usize = 1024 * 1024;

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
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            history_batches: 50_000,
            subscriber_lag: 4096,
            subscriber_queue: 16,
            protection_threshold_percent: DEFAULT_PROTECTION_THRESHOLD_PERCENT,
        }
    }
}

/// What the hub broadcasts.
#[derive(Debug)]
enum Batch {
    /// Changes of one store watch message, revision = the last one in it,
    /// with the services whose protection flipped.
    Changes {
        revision: u64,
        events: Vec<Event>,
        protection: Vec<ServiceProtection>,
        policies: Vec<PolicyChange>,
    },
    /// The store is at `revision` with no change for us.
    Progress { revision: u64 },
    /// The cache was reloaded from a fresh snapshot: resync.
    Reset { revision: u64 },
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    instances: BTreeMap<InstanceKey, Arc<Instance>>,
    /// Recent change batches, oldest first.
    history: VecDeque<Arc<Batch>>,
    /// `history` holds every change with a revision greater than this.
    history_floor: u64,
    loaded: bool,
    /// Live control-plane replicas (ids), for check sharing.
    replicas: BTreeSet<String>,
    /// Per-service settings.
    configs: HashMap<(String, String), ServiceConfig>,
    /// Services in protection now.
    protected: BTreeMap<(String, String), ServiceProtection>,
    /// Current traffic policies, version = the key's mod_revision.
    policies: BTreeMap<(String, String), Arc<PolicyChange>>,
    /// Nodes with an open agent session.
    agents: BTreeSet<String>,
    /// Per service: (instances not CRITICAL, all instances), kept in step
    /// with `instances` so protection costs O(1) per change.
    counts: HashMap<(String, String), (u32, u32)>,
}

impl State {
    /// The held batches with changes after `revision`, oldest first (a batch
    /// may also hold older changes: filter them by their own revision).
    fn batches_after(&self, revision: u64) -> impl Iterator<Item = &Batch> {
        self.history
            .iter()
            .filter(move |b| b.revision() > revision)
            .map(|b| &**b)
    }

    /// Adds an instance to its service's counts, or removes it.
    fn count(&mut self, i: &Instance, add: bool) {
        let key = (i.namespace.clone(), i.service.clone());
        let healthy = u32::from(i.status != HealthStatus::Critical as i32);
        let entry = self.counts.entry(key.clone()).or_insert((0, 0));
        if add {
            entry.0 += healthy;
            entry.1 += 1;
        } else {
            entry.0 = entry.0.saturating_sub(healthy);
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                self.counts.remove(&key);
            }
        }
    }

    fn insert_instance(&mut self, key: InstanceKey, i: Arc<Instance>) {
        self.count(&i, true);
        if let Some(old) = self.instances.insert(key, i) {
            self.count(&old, false);
        }
    }

    fn remove_instance(&mut self, key: &InstanceKey) -> Option<Arc<Instance>> {
        let old = self.instances.remove(key)?;
        self.count(&old, false);
        Some(old)
    }

    fn service_instances<'a>(
        &'a self,
        namespace: &'a str,
        service: &'a str,
    ) -> impl Iterator<Item = &'a Arc<Instance>> + 'a {
        let start = InstanceKey {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            instance_id: String::new(),
        };
        self.instances
            .range((Bound::Included(start), Bound::Unbounded))
            .take_while(move |(k, _)| k.namespace == namespace && k.service == service)
            .map(|(_, i)| i)
    }

    /// The protection state of one service as the cache has it now.
    fn protection(
        &self,
        namespace: &str,
        service: &str,
        default_threshold: u32,
    ) -> ServiceProtection {
        let threshold = self
            .configs
            .get(&(namespace.to_owned(), service.to_owned()))
            .and_then(|c| c.protection_threshold_percent)
            .unwrap_or(default_threshold)
            .min(100);
        let (healthy, total) = self
            .counts
            .get(&(namespace.to_owned(), service.to_owned()))
            .copied()
            .unwrap_or((0, 0));
        ServiceProtection {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            active: threshold > 0
                && total > 0
                && u64::from(healthy) * 100 < u64::from(threshold) * u64::from(total),
            threshold_percent: threshold,
            healthy,
            total,
        }
    }

    /// Recomputes the protection of `services`; returns those that flipped.
    fn update_protection(
        &mut self,
        services: BTreeSet<(String, String)>,
        default_threshold: u32,
    ) -> Vec<ServiceProtection> {
        let mut flipped = Vec::new();
        for (ns, svc) in services {
            let p = self.protection(&ns, &svc, default_threshold);
            let was = self.protected.contains_key(&(ns.clone(), svc.clone()));
            if p.active {
                self.protected.insert((ns, svc), p.clone());
            } else {
                self.protected.remove(&(ns, svc));
            }
            if p.active != was {
                flipped.push(p);
            }
        }
        flipped
    }
}

fn protection_matches(filter: &Filter, p: &ServiceProtection) -> bool {
    (filter.namespace.is_empty() || filter.namespace == p.namespace)
        && (filter.service.is_empty() || filter.service == p.service)
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn Store>,
    keys: Keys,
    config: HubConfig,
    state: RwLock<State>,
    tx: broadcast::Sender<Arc<Batch>>,
    revision: watch::Sender<u64>,
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

impl Filter {
    fn matches(&self, k: &InstanceKey) -> bool {
        (self.namespace.is_empty() || self.namespace == k.namespace)
            && (self.service.is_empty() || self.service == k.service)
    }

    fn matches_instance(&self, i: &Instance) -> bool {
        (self.namespace.is_empty() || self.namespace == i.namespace)
            && (self.service.is_empty() || self.service == i.service)
    }
}

/// (namespace, service, instances) of one service.
pub type ServiceInstances = (String, String, Vec<Arc<Instance>>);

/// Handle to a replica's hub. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

/// Decodes a stored instance record; the key is the truth for its names.
pub fn decode_instance(
    key: &InstanceKey,
    value: &[u8],
    mod_revision: u64,
) -> Result<Instance, prost::DecodeError> {
    let mut i = Instance::decode(value)?;
    i.namespace.clone_from(&key.namespace);
    i.service.clone_from(&key.service);
    i.instance_id.clone_from(&key.instance_id);
    i.revision = mod_revision;
    Ok(i)
}

/// A stored policy record as the change agents receive.
fn decode_policy(
    namespace: &str,
    service: &str,
    value: &[u8],
    version: u64,
) -> Option<PolicyChange> {
    match PolicyRecord::decode(value) {
        Ok(record) => Some(PolicyChange {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            version,
            policy: record.policy,
        }),
        Err(e) => {
            tracing::warn!(namespace, service, error = %e, "skipping undecodable policy record");
            None
        }
    }
}

/// A watched (or historical) change of a policy key as agents receive it:
/// the new policy, or none for a deletion.
fn policy_change(
    namespace: String,
    service: String,
    change: &crate::store::WatchEvent,
) -> Option<PolicyChange> {
    match change.kind {
        EventKind::Put => decode_policy(
            &namespace,
            &service,
            &change.kv.value,
            change.kv.mod_revision,
        ),
        EventKind::Delete => Some(PolicyChange {
            namespace,
            service,
            version: change.kv.mod_revision,
            policy: None,
        }),
    }
}

impl Hub {
    /// Creates the hub and starts its store watch. The watch stops when the
    /// returned [`HubTask`] is dropped.
    pub fn start(store: Arc<dyn Store>, keys: Keys, config: HubConfig) -> (Self, HubTask) {
        let (tx, _) = broadcast::channel(config.subscriber_lag.max(16));
        let hub = Self {
            inner: Arc::new(Inner {
                store: store.clone(),
                keys,
                config,
                state: RwLock::default(),
                tx,
                revision: watch::channel(0).0,
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

    async fn run(self) {
        let store = self.inner.store.clone();
        let prefix = self.inner.keys.root().to_owned();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            match self.sync(store.as_ref(), &prefix).await {
                Ok(reason) => {
                    tracing::warn!(store = store.kind(), reason = %reason, "store watch ended; reloading");
                    backoff.reset();
                }
                Err(e) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(store = store.kind(), error = %e, retry_in = ?delay, "store watch failed");
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// One snapshot + watch cycle; returns why the watch ended.
    async fn sync(
        &self,
        store: &dyn Store,
        prefix: &str,
    ) -> Result<String, crate::store::StoreError> {
        let snapshot = store.range(prefix).await?;
        let mut stream = store.watch(prefix, snapshot.revision).await?;
        self.reset(snapshot);
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

    fn reset(&self, snapshot: Snapshot) {
        let keys = &self.inner.keys;
        let mut instances = BTreeMap::new();
        let mut replicas = BTreeSet::new();
        let mut configs = HashMap::new();
        let mut policies = BTreeMap::new();
        let mut agents = BTreeSet::new();
        for kv in snapshot.kvs {
            if let Some(id) = keys.parse_replica(&kv.key) {
                replicas.insert(id);
                continue;
            }
            if let Some(node) = keys.parse_agent(&kv.key) {
                agents.insert(node);
                continue;
            }
            if let Some((ns, svc)) = keys.parse_policy(&kv.key) {
                if let Some(change) = decode_policy(&ns, &svc, &kv.value, kv.mod_revision) {
                    policies.insert((ns, svc), Arc::new(change));
                }
                continue;
            }
            if let Some(service) = keys.parse_service_config(&kv.key) {
                match ServiceConfig::decode(kv.value.as_slice()) {
                    Ok(c) => {
                        configs.insert(service, c);
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "skipping undecodable service config")
                    }
                }
                continue;
            }
            let Some(key) = keys.parse_instance(&kv.key) else {
                continue;
            };
            match decode_instance(&key, &kv.value, kv.mod_revision) {
                Ok(i) => {
                    instances.insert(key, Arc::new(i));
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping undecodable instance record")
                }
            }
        }
        let mut state = self.write();
        let was_loaded = state.loaded;
        let count = instances.len();
        state.counts.clear();
        for i in instances.values() {
            let i = i.clone();
            state.count(&i, true);
        }
        state.instances = instances;
        state.replicas = replicas;
        state.configs = configs;
        state.policies = policies;
        state.agents = agents;
        state.protected.clear();
        let services: BTreeSet<(String, String)> = state
            .instances
            .keys()
            .map(|k| (k.namespace.clone(), k.service.clone()))
            .collect();
        state.update_protection(services, self.inner.config.protection_threshold_percent);
        state.revision = snapshot.revision;
        state.history.clear();
        state.history_floor = snapshot.revision;
        state.loaded = true;
        if was_loaded {
            let _ = self.inner.tx.send(Arc::new(Batch::Reset {
                revision: snapshot.revision,
            }));
        }
        self.inner.revision.send_replace(snapshot.revision);
        self.inner.topology.send_modify(|t| *t += 1);
        drop(state);
        tracing::info!(
            revision = snapshot.revision,
            instances = count,
            "registry cache loaded"
        );
    }

    fn apply(&self, changes: Vec<crate::store::WatchEvent>) {
        let keys = &self.inner.keys;
        let mut state = self.write();
        let mut events = Vec::new();
        let mut revision = state.revision;
        let mut touched = BTreeSet::new();
        let mut policies = Vec::new();
        let mut replicas_changed = false;
        for change in changes {
            revision = revision.max(change.kv.mod_revision);
            if let Some(id) = keys.parse_replica(&change.kv.key) {
                replicas_changed |= match change.kind {
                    EventKind::Put => state.replicas.insert(id),
                    EventKind::Delete => state.replicas.remove(&id),
                };
                continue;
            }
            if let Some(node) = keys.parse_agent(&change.kv.key) {
                match change.kind {
                    EventKind::Put => state.agents.insert(node),
                    EventKind::Delete => state.agents.remove(&node),
                };
                continue;
            }
            if let Some((ns, svc)) = keys.parse_policy(&change.kv.key) {
                let key = (ns.clone(), svc.clone());
                if let Some(change) = policy_change(ns, svc, &change) {
                    if change.policy.is_some() {
                        state.policies.insert(key, Arc::new(change.clone()));
                    } else {
                        state.policies.remove(&key);
                    }
                    policies.push(change);
                }
                continue;
            }
            if let Some(service) = keys.parse_service_config(&change.kv.key) {
                match change.kind {
                    EventKind::Put => match ServiceConfig::decode(change.kv.value.as_slice()) {
                        Ok(c) => {
                            state.configs.insert(service.clone(), c);
                        }
                        Err(e) => {
                            tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable service config")
                        }
                    },
                    EventKind::Delete => {
                        state.configs.remove(&service);
                    }
                }
                touched.insert(service);
                continue;
            }
            let Some(key) = keys.parse_instance(&change.kv.key) else {
                continue;
            };
            touched.insert((key.namespace.clone(), key.service.clone()));
            match change.kind {
                EventKind::Put => {
                    match decode_instance(&key, &change.kv.value, change.kv.mod_revision) {
                        Ok(i) => {
                            let i = Arc::new(i);
                            state.insert_instance(key, i.clone());
                            events.push(Event {
                                r#type: EventType::Put as i32,
                                instance: Some((*i).clone()),
                                revision: change.kv.mod_revision,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable instance record");
                        }
                    }
                }
                EventKind::Delete => {
                    if let Some(old) = state.remove_instance(&key) {
                        events.push(Event {
                            r#type: EventType::Delete as i32,
                            instance: Some((*old).clone()),
                            revision: change.kv.mod_revision,
                        });
                    }
                }
            }
        }
        state.revision = revision;
        let protection =
            state.update_protection(touched, self.inner.config.protection_threshold_percent);
        let batch = Arc::new(
            if events.is_empty() && protection.is_empty() && policies.is_empty() {
                Batch::Progress { revision }
            } else {
                Batch::Changes {
                    revision,
                    events,
                    protection,
                    policies,
                }
            },
        );
        if matches!(*batch, Batch::Changes { .. }) {
            state.history.push_back(batch.clone());
            while state.history.len() > self.inner.config.history_batches {
                if let Some(old) = state.history.pop_front() {
                    state.history_floor = old.revision();
                }
            }
        } else if state.history.is_empty() {
            // Nothing between the floor and now changed for us.
            state.history_floor = revision;
        }
        let instances_changed =
            matches!(&*batch, Batch::Changes { events, .. } if !events.is_empty());
        // A write nobody follows (an agent's ack, a replica's renewal) wakes
        // no subscriber: they learn the revision from the next change.
        if matches!(*batch, Batch::Changes { .. }) {
            let _ = self.inner.tx.send(batch);
        }
        self.inner.revision.send_replace(revision);
        if instances_changed || replicas_changed {
            self.inner.topology.send_modify(|t| *t += 1);
        }
    }

    fn progress(&self, revision: u64) {
        let mut state = self.write();
        if revision <= state.revision {
            return;
        }
        state.revision = revision;
        if state.history.is_empty() {
            state.history_floor = revision;
        }
        let _ = self.inner.tx.send(Arc::new(Batch::Progress { revision }));
        self.inner.revision.send_replace(revision);
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
        self.read().agents.clone()
    }

    /// Follows the policies: a snapshot (or the changes after
    /// `start_revision`, read from this replica's history or the store's),
    /// then every change, in order. A subscriber that falls behind, or whose
    /// revision is gone, gets a fresh snapshot.
    pub fn subscribe_policies(&self, start_revision: u64) -> mpsc::Receiver<PolicyUpdate> {
        let (out, rx) = mpsc::channel(self.inner.config.subscriber_queue.max(1));
        let hub = self.clone();
        tokio::spawn(async move {
            let receiver = hub.inner.tx.subscribe();
            let mut closed = hub.inner.closed.subscribe();
            tokio::select! {
                Err(reason) = hub.feed_policies(start_revision, receiver, &out) => {
                    tracing::debug!(reason, "policy subscriber left");
                }
                _ = closed.wait_for(|c| *c) => {}
            }
        });
        rx
    }

    async fn feed_policies(
        &self,
        start_revision: u64,
        mut receiver: broadcast::Receiver<Arc<Batch>>,
        out: &mpsc::Sender<PolicyUpdate>,
    ) -> Result<(), &'static str> {
        let send =
            |u: PolicyUpdate| async move { out.send(u).await.map_err(|_| "subscriber closed") };
        let (first, mut last) = self.initial_policies(start_revision).await;
        if let Some(first) = first {
            send(first).await?;
        }
        loop {
            let batch = match receiver.recv().await {
                Ok(batch) => batch,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let (snapshot, revision) =
                        self.policy_snapshot(&format!("fell behind by {missed} updates"));
                    send(snapshot).await?;
                    last = revision;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Err("hub stopped"),
            };
            match &*batch {
                Batch::Changes {
                    revision, policies, ..
                } if *revision > last => {
                    let changes: Vec<PolicyChange> = policies
                        .iter()
                        .filter(|p| p.version > last)
                        .cloned()
                        .collect();
                    last = *revision;
                    if !changes.is_empty() {
                        send(PolicyUpdate {
                            kind: policy_update::Kind::Changes as i32,
                            changes,
                            revision: last,
                            resync_reason: String::new(),
                        })
                        .await?;
                    }
                }
                Batch::Progress { revision } if *revision > last => last = *revision,
                Batch::Reset { .. } => {
                    let (snapshot, revision) =
                        self.policy_snapshot("the replica reloaded its cache from the store");
                    send(snapshot).await?;
                    last = revision;
                }
                _ => {}
            }
        }
    }

    fn policy_snapshot(&self, resync_reason: &str) -> (PolicyUpdate, u64) {
        let state = self.read();
        (
            PolicyUpdate {
                kind: policy_update::Kind::Snapshot as i32,
                changes: state.policies.values().map(|p| (**p).clone()).collect(),
                revision: state.revision,
                resync_reason: resync_reason.to_owned(),
            },
            state.revision,
        )
    }

    /// What a policy subscriber gets first, and the revision it is at then.
    async fn initial_policies(&self, start_revision: u64) -> (Option<PolicyUpdate>, u64) {
        if start_revision == 0 {
            let (s, r) = self.policy_snapshot("");
            return (Some(s), r);
        }
        let (floor, revision) = {
            let state = self.read();
            if !state.loaded {
                drop(state);
                let (s, r) = self.policy_snapshot("this replica has not loaded yet");
                return (Some(s), r);
            }
            (state.history_floor, state.revision)
        };
        if start_revision >= revision {
            return (None, start_revision);
        }
        let mut changes = Vec::new();
        let mut from = start_revision;
        if start_revision < floor {
            match self
                .inner
                .store
                .history(&self.inner.keys.policies_prefix(""), start_revision, floor)
                .await
            {
                Ok(History::Events(events)) => {
                    let keys = &self.inner.keys;
                    changes.extend(events.into_iter().filter_map(|e| {
                        let (ns, svc) = keys.parse_policy(&e.kv.key)?;
                        policy_change(ns, svc, &e)
                    }));
                    from = floor;
                }
                Ok(History::Compacted { compact_revision }) => {
                    let (s, r) = self.policy_snapshot(&format!(
                        "revision {start_revision} was compacted (up to {compact_revision})"
                    ));
                    return (Some(s), r);
                }
                Err(e) => {
                    let (s, r) = self.policy_snapshot(&format!(
                        "could not read the changes after revision {start_revision} ({e})"
                    ));
                    return (Some(s), r);
                }
            }
        }
        let state = self.read();
        if from < state.history_floor {
            drop(state);
            let (s, r) = self.policy_snapshot(&format!(
                "revision {start_revision} is older than this replica's history"
            ));
            return (Some(s), r);
        }
        changes.extend(
            state
                .batches_after(from)
                .flat_map(|b| match b {
                    Batch::Changes { policies, .. } => policies.as_slice(),
                    _ => &[],
                })
                .filter(|p| p.version > from)
                .cloned(),
        );
        let revision = state.revision;
        (
            Some(PolicyUpdate {
                kind: policy_update::Kind::Changes as i32,
                changes,
                revision,
                resync_reason: String::new(),
            }),
            revision,
        )
    }

    /// Live control-plane replica ids, sorted.
    pub fn replicas(&self) -> Vec<String> {
        self.read().replicas.iter().cloned().collect()
    }

    /// Every instance in the cache.
    pub fn all_instances(&self) -> Vec<Arc<Instance>> {
        self.read().instances.values().cloned().collect()
    }

    /// Protection state of one service.
    pub fn protection(&self, namespace: &str, service: &str) -> ServiceProtection {
        self.read().protection(
            namespace,
            service,
            self.inner.config.protection_threshold_percent,
        )
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
        mut select: impl FnMut(&str, &str, Vec<Arc<Instance>>) -> Option<Vec<Arc<Instance>>>,
    ) -> (Vec<ServiceInstances>, bool, u64) {
        let state = self.read();
        let start = match after {
            Some((ns, svc)) => InstanceKey {
                namespace: ns.to_owned(),
                service: svc.to_owned(),
                instance_id: String::new(),
            },
            None => InstanceKey {
                namespace: namespace.to_owned(),
                service: String::new(),
                instance_id: String::new(),
            },
        };
        let skip = after.map(|(ns, svc)| (ns.to_owned(), svc.to_owned()));
        let mut out: Vec<ServiceInstances> = Vec::new();
        let mut current: Option<ServiceInstances> = None;
        let mut more = false;
        let entries = state
            .instances
            .range((Bound::Included(start), Bound::Unbounded))
            .skip_while(|(k, _)| {
                skip.as_ref()
                    .is_some_and(|(ns, svc)| k.namespace == *ns && k.service == *svc)
            });
        for (k, i) in entries {
            if !namespace.is_empty() && k.namespace != namespace {
                break;
            }
            let same = current
                .as_ref()
                .is_some_and(|(ns, svc, _)| *ns == k.namespace && *svc == k.service);
            if !same {
                if let Some((ns, svc, instances)) = current.take() {
                    if let Some(kept) = select(&ns, &svc, instances) {
                        out.push((ns, svc, kept));
                    }
                }
                if out.len() >= limit {
                    more = true;
                    break;
                }
                current = Some((k.namespace.clone(), k.service.clone(), Vec::new()));
            }
            if let Some((_, _, instances)) = current.as_mut() {
                instances.push(i.clone());
            }
        }
        if let Some((ns, svc, instances)) = current.take() {
            if out.len() < limit {
                if let Some(kept) = select(&ns, &svc, instances) {
                    out.push((ns, svc, kept));
                }
            } else {
                more = true;
            }
        }
        (out, more, state.revision)
    }

    /// Subscribes a watcher: a snapshot (or the changes after
    /// `start_revision`), then live changes. The stream ends when the hub
    /// stops; dropping it unsubscribes.
    pub fn subscribe(&self, filter: Filter, start_revision: u64) -> mpsc::Receiver<WatchResponse> {
        let (out, rx) = mpsc::channel(self.inner.config.subscriber_queue.max(1));
        let hub = self.clone();
        tokio::spawn(async move {
            // Subscribe before reading the cache: nothing falls in between.
            let receiver = hub.inner.tx.subscribe();
            let mut closed = hub.inner.closed.subscribe();
            tokio::select! {
                Err(reason) = hub.feed(filter, start_revision, receiver, &out) => {
                    tracing::debug!(reason, "watcher left");
                }
                _ = closed.wait_for(|c| *c) => {}
            }
        });
        rx
    }

    async fn feed(
        &self,
        filter: Filter,
        start_revision: u64,
        mut receiver: broadcast::Receiver<Arc<Batch>>,
        out: &mpsc::Sender<WatchResponse>,
    ) -> Result<(), &'static str> {
        let (initial, mut last) = self.initial(&filter, start_revision).await;
        send_all(out, initial).await?;
        loop {
            let batch = match receiver.recv().await {
                Ok(batch) => batch,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    let (messages, revision) = self.snapshot(
                        &filter,
                        &format!(
                            "watcher fell behind by {missed} updates; resynced from a snapshot"
                        ),
                    );
                    send_all(out, messages).await?;
                    last = revision;
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Err("hub stopped"),
            };
            match &*batch {
                Batch::Changes {
                    revision,
                    events,
                    protection,
                    ..
                } if *revision > last => {
                    let flipped: Vec<ServiceProtection> = protection
                        .iter()
                        .filter(|p| protection_matches(&filter, p))
                        .cloned()
                        .collect();
                    let matching: Vec<Event> = events
                        .iter()
                        .filter(|e| {
                            e.revision > last
                                && e.instance
                                    .as_ref()
                                    .is_some_and(|i| filter.matches_instance(i))
                        })
                        .cloned()
                        .collect();
                    last = *revision;
                    if !matching.is_empty() || !flipped.is_empty() {
                        send_all(out, chunk(Kind::Changes, matching, last, "", flipped)).await?;
                    }
                }
                Batch::Progress { revision } if *revision > last => {
                    last = *revision;
                }
                Batch::Reset { .. } => {
                    let (messages, revision) =
                        self.snapshot(&filter, "the replica reloaded its cache from the store");
                    send_all(out, messages).await?;
                    last = revision;
                }
                _ => {}
            }
        }
    }

    /// First messages for a new watcher and the revision they bring it to.
    async fn initial(&self, filter: &Filter, start_revision: u64) -> (Vec<WatchResponse>, u64) {
        if start_revision == 0 {
            return self.snapshot(filter, "");
        }
        let (floor, revision, loaded) = {
            let state = self.read();
            (state.history_floor, state.revision, state.loaded)
        };
        if start_revision >= revision {
            // Current (or ahead of this replica, which will catch up): only
            // changes after it are sent.
            return (Vec::new(), start_revision);
        }
        if !loaded {
            return self.snapshot(
                filter,
                "this replica has not loaded the registry yet; resynced from a snapshot",
            );
        }
        // Older than this replica's own history (it started after R, or R
        // fell out of it): read the gap from the store, then go on from the
        // replica's history.
        let mut events = Vec::new();
        let mut from = start_revision;
        if start_revision < floor {
            match self
                .inner
                .store
                .history(self.inner.keys.root(), start_revision, floor)
                .await
            {
                Ok(History::Events(changes)) => {
                    events = changes
                        .into_iter()
                        .filter_map(|c| self.history_event(c))
                        .filter(|e| {
                            e.instance
                                .as_ref()
                                .is_some_and(|i| filter.matches_instance(i))
                        })
                        .collect();
                    from = floor;
                }
                Ok(History::Compacted { compact_revision }) => {
                    let reason = format!(
                        "revision {start_revision} was compacted in the store (compacted up to {compact_revision}); resynced from a snapshot"
                    );
                    return self.snapshot(filter, &reason);
                }
                Err(e) => {
                    let reason = format!("could not read the changes after revision {start_revision} ({e}); resynced from a snapshot");
                    return self.snapshot(filter, &reason);
                }
            }
        }
        let state = self.read();
        if from < state.history_floor {
            let reason = format!(
                "revision {start_revision} is older than the history this replica holds (from {}); resynced from a snapshot",
                state.history_floor
            );
            drop(state);
            return self.snapshot(filter, &reason);
        }
        events.extend(
            state
                .batches_after(from)
                .flat_map(|b| match b {
                    Batch::Changes { events, .. } => events.as_slice(),
                    _ => &[],
                })
                .filter(|e| {
                    e.revision > from
                        && e.instance
                            .as_ref()
                            .is_some_and(|i| filter.matches_instance(i))
                })
                .cloned(),
        );
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
                .filter(|p| protection_matches(filter, p))
                .map(|p| (p.namespace.clone(), p.service.clone())),
        );
        let default_threshold = self.inner.config.protection_threshold_percent;
        let protection: Vec<ServiceProtection> = services
            .iter()
            .map(|(ns, svc)| state.protection(ns, svc, default_threshold))
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

    /// A change read back from the store's history as a watch event.
    fn history_event(&self, change: crate::store::WatchEvent) -> Option<Event> {
        let key = self.inner.keys.parse_instance(&change.kv.key)?;
        let revision = change.kv.mod_revision;
        let decoded = decode_instance(&key, &change.kv.value, revision);
        let (r#type, instance) = match (change.kind, decoded) {
            (EventKind::Put, Ok(i)) => (EventType::Put, i),
            (EventKind::Put, Err(e)) => {
                tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable instance record in history");
                return None;
            }
            (EventKind::Delete, Ok(i)) => (EventType::Delete, i),
            // The removed record did not decode: the key still says which
            // instance left.
            (EventKind::Delete, Err(_)) => (
                EventType::Delete,
                Instance {
                    namespace: key.namespace,
                    service: key.service,
                    instance_id: key.instance_id,
                    revision,
                    ..Instance::default()
                },
            ),
        };
        Some(Event {
            r#type: r#type as i32,
            instance: Some(instance),
            revision,
        })
    }

    /// A snapshot of the matching instances as watch messages.
    fn snapshot(&self, filter: &Filter, resync_reason: &str) -> (Vec<WatchResponse>, u64) {
        let state = self.read();
        let revision = state.revision;
        let events: Vec<Event> = state
            .instances
            .iter()
            .filter(|(k, _)| filter.matches(k))
            .map(|(_, i)| Event {
                r#type: EventType::Put as i32,
                instance: Some((**i).clone()),
                revision: i.revision,
            })
            .collect();
        let protection: Vec<ServiceProtection> = state
            .protected
            .values()
            .filter(|p| protection_matches(filter, p))
            .cloned()
            .collect();
        drop(state);
        (
            chunk(Kind::Snapshot, events, revision, resync_reason, protection),
            revision,
        )
    }
}

impl Batch {
    fn revision(&self) -> u64 {
        match self {
            Batch::Changes { revision, .. }
            | Batch::Progress { revision }
            | Batch::Reset { revision } => *revision,
        }
    }
}

/// Splits events (in revision order) into messages below
/// [`MAX_MESSAGE_BYTES`]. A snapshot always yields at least one message, the
/// last marked complete. Each message's `revision` is a safe resume point:
/// the batch revision on the last message; on an intermediate CHANGES message
/// the revision just before the next message's first event; 0 on an
/// intermediate SNAPSHOT message (half a snapshot is no view to resume from).
fn chunk(
    kind: Kind,
    events: Vec<Event>,
    revision: u64,
    resync_reason: &str,
    protection: Vec<ServiceProtection>,
) -> Vec<WatchResponse> {
    let mut protection = Some(protection);
    let mut groups: Vec<Vec<Event>> = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for event in events {
        let len = event.encoded_len() + 8;
        if !current.is_empty() && size + len > MAX_MESSAGE_BYTES {
            groups.push(std::mem::take(&mut current));
            size = 0;
        }
        size += len;
        current.push(event);
    }
    if !current.is_empty() || groups.is_empty() {
        groups.push(current);
    }
    let next_firsts: Vec<Option<u64>> = groups
        .iter()
        .skip(1)
        .map(|g| g.first().map(|e| e.revision))
        .chain([None])
        .collect();
    groups
        .into_iter()
        .zip(next_firsts)
        .map(|(events, next_first)| {
            let last = next_first.is_none();
            let revision = match (last, kind) {
                (true, _) => revision,
                (false, Kind::Snapshot) => 0,
                (false, _) => next_first.map_or(revision, |r| r.saturating_sub(1)),
            };
            WatchResponse {
                kind: kind as i32,
                revision,
                events,
                snapshot_complete: kind == Kind::Snapshot && last,
                resync_reason: resync_reason.to_owned(),
                // Protection flips belong to the batch's last revision.
                protection: if last {
                    protection.take().unwrap_or_default()
                } else {
                    Vec::new()
                },
            }
        })
        .collect()
}

async fn send_all(
    out: &mpsc::Sender<WatchResponse>,
    messages: Vec<WatchResponse>,
) -> Result<(), &'static str> {
    for m in messages {
        out.send(m).await.map_err(|_| "watcher closed the stream")?;
    }
    Ok(())
}

/// Owns the hub's background watch; dropping it stops the watch (and so
/// ends every subscriber's stream).
#[derive(Debug)]
pub struct HubTask {
    task: tokio::task::JoinHandle<()>,
    hub: Hub,
}

impl Drop for HubTask {
    fn drop(&mut self) {
        self.task.abort();
        self.hub.inner.closed.send_replace(true);
    }
}

impl HubTask {
    /// Completes if the watch task ends by itself (only a panic ends it),
    /// so the server stops rather than serve a frozen cache.
    pub async fn ended(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.task).await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig};

    fn record(id: &str, port: u32) -> Vec<u8> {
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

    async fn next(rx: &mut mpsc::Receiver<WatchResponse>) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("watch message in time")
            .expect("stream open")
    }

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

    #[test]
    fn chunks_stay_under_the_size_limit_with_safe_resume_points() {
        let big = |rev: u64| Event {
            r#type: EventType::Put as i32,
            instance: Some(Instance {
                metadata: [("k".to_string(), "v".repeat(300_000))].into(),
                ..Instance::default()
            }),
            revision: rev,
        };
        let events: Vec<Event> = (1..=10).map(big).collect();
        let changes = chunk(Kind::Changes, events.clone(), 10, "", Vec::new());
        assert!(changes.len() > 1);
        for m in &changes {
            assert!(m.encoded_len() <= MAX_MESSAGE_BYTES + 1024);
        }
        // Each message's revision is the last revision it completes.
        for pair in changes.windows(2) {
            assert_eq!(pair[0].revision + 1, pair[1].events[0].revision);
        }
        assert_eq!(changes.last().unwrap().revision, 10);
        let snapshot = chunk(Kind::Snapshot, events, 42, "why", Vec::new());
        assert!(snapshot[..snapshot.len() - 1]
            .iter()
            .all(|m| m.revision == 0 && !m.snapshot_complete));
        let last = snapshot.last().unwrap();
        assert!(last.snapshot_complete && last.revision == 42 && last.resync_reason == "why");
        assert_eq!(
            chunk(Kind::Snapshot, Vec::new(), 7, "", Vec::new()).len(),
            1
        );
    }
}
