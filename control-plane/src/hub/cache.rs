//! The hub's cache: what a replica knows of the store, kept from one
//! snapshot plus the watched changes after it. Pure: no store calls, no
//! tokio; `sync` feeds it and `feed` reads it.
//!
//! Besides the records (instances, service configs, policies, replicas,
//! agents) it keeps, per service, the count of instances that are not
//! CRITICAL, so protection costs O(1) per change, and a bounded history of
//! change batches for watchers that resume from a recent revision.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    ops::Bound,
    sync::Arc,
};

use prost::Message;
use weir_proto::{
    agent::v1::PolicyChange,
    registry::v1::{Event, EventType, HealthStatus, Instance, ServiceConfig, ServiceProtection},
};

use super::{
    agents::AgentTable,
    record::{decode_instance, decode_policy, policy_change},
    ServiceInstances,
};
use weir_core::InstanceKey;

use crate::{
    keys::Keys,
    store::{EventKind, KeyValue, WatchEvent},
};

/// What the hub broadcasts, and what its history holds.
#[derive(Debug)]
pub(super) enum Batch {
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

impl Batch {
    pub(super) fn revision(&self) -> u64 {
        match self {
            Batch::Changes { revision, .. }
            | Batch::Progress { revision }
            | Batch::Reset { revision } => *revision,
        }
    }
}

/// What applying one watch message did.
#[derive(Debug)]
pub(super) struct Applied {
    /// The batch to broadcast; None when nothing a subscriber follows
    /// changed (an agent's ack, a replica's renewal).
    pub(super) batch: Option<Arc<Batch>>,
    /// The revision the cache is at now.
    pub(super) revision: u64,
    /// Instances or the replica set changed (what the check assigner
    /// follows).
    pub(super) topology: bool,
}

/// (namespace, service).
type ServiceName = (String, String);

#[derive(Debug)]
pub(super) struct State {
    /// Protection threshold (percent) of services that set none.
    default_threshold: u32,
    /// Change batches kept in `history`.
    history_batches: usize,
    pub(super) revision: u64,
    pub(super) instances: BTreeMap<InstanceKey, Arc<Instance>>,
    /// Recent change batches, oldest first.
    history: VecDeque<Arc<Batch>>,
    /// `history` holds every change with a revision greater than this.
    pub(super) history_floor: u64,
    pub(super) loaded: bool,
    /// Live control-plane replicas (ids), for check sharing.
    pub(super) replicas: BTreeSet<String>,
    /// Where each live replica is reached (its announcement's `grpc=`),
    /// for queries one replica asks the others.
    pub(super) replica_addresses: BTreeMap<String, String>,
    /// Per-service settings.
    pub(super) configs: HashMap<ServiceName, ServiceConfig>,
    /// Services in protection now.
    pub(super) protected: BTreeMap<ServiceName, ServiceProtection>,
    /// Current traffic policies, version = the key's mod_revision.
    pub(super) policies: BTreeMap<ServiceName, Arc<PolicyChange>>,
    /// Agents: session and last-seen records, acknowledgements.
    pub(super) agents: AgentTable,
    /// Per service: (instances not CRITICAL, all instances), kept in step
    /// with `instances`.
    counts: HashMap<ServiceName, (u32, u32)>,
}

impl State {
    /// Services with at least one instance.
    pub(super) fn services_count(&self) -> usize {
        self.counts.values().filter(|(_, all)| *all > 0).count()
    }

    /// An empty, not yet loaded cache.
    pub(super) fn new(default_threshold: u32, history_batches: usize) -> Self {
        Self {
            default_threshold,
            history_batches,
            revision: 0,
            instances: BTreeMap::new(),
            history: VecDeque::new(),
            history_floor: 0,
            loaded: false,
            replicas: BTreeSet::new(),
            replica_addresses: BTreeMap::new(),
            configs: HashMap::new(),
            protected: BTreeMap::new(),
            policies: BTreeMap::new(),
            agents: AgentTable::default(),
            counts: HashMap::new(),
        }
    }

    /// Keeps the address a replica's announcement names (`grpc=host:port`).
    fn note_address(&mut self, id: &str, value: &[u8]) {
        let address = std::str::from_utf8(value)
            .ok()
            .and_then(|v| v.split_whitespace().find_map(|p| p.strip_prefix("grpc=")));
        match address {
            Some(a) => self.replica_addresses.insert(id.to_owned(), a.to_owned()),
            None => self.replica_addresses.remove(id),
        };
    }

    /// Adds one key of a snapshot being loaded (see [`State::finish_load`]).
    pub(super) fn load(&mut self, keys: &Keys, kv: KeyValue) {
        if let Some(id) = keys.parse_replica(&kv.key) {
            self.note_address(&id, &kv.value);
            self.replicas.insert(id);
        } else if self.agents.apply(keys, EventKind::Put, &kv) {
            // An agent's session, last-seen or ack record: in the table.
        } else if let Some((ns, svc)) = keys.parse_policy(&kv.key) {
            if let Some(change) = decode_policy(&ns, &svc, &kv.value, kv.mod_revision) {
                self.policies.insert((ns, svc), Arc::new(change));
            }
        } else if let Some(service) = keys.parse_service_config(&kv.key) {
            match ServiceConfig::decode(kv.value.as_slice()) {
                Ok(c) => {
                    self.configs.insert(service, c);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping undecodable service config")
                }
            }
        } else if let Some(key) = keys.parse_instance(&kv.key) {
            match decode_instance(&key, &kv.value, kv.mod_revision) {
                Ok(i) => self.insert_instance(key, Arc::new(i)),
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "skipping undecodable instance record")
                }
            }
        }
    }

    /// Ends a load: the snapshot was read at `revision`.
    pub(super) fn finish_load(&mut self, revision: u64) {
        let services: BTreeSet<ServiceName> = self.counts.keys().cloned().collect();
        self.protected.clear();
        self.update_protection(services);
        self.revision = revision;
        self.history.clear();
        self.history_floor = revision;
        self.loaded = true;
    }

    /// Applies the changes of one watch message.
    pub(super) fn apply(&mut self, keys: &Keys, changes: Vec<WatchEvent>) -> Applied {
        let mut events = Vec::new();
        let mut revision = self.revision;
        let mut touched = BTreeSet::new();
        let mut policies = Vec::new();
        let mut replicas_changed = false;
        for change in changes {
            revision = revision.max(change.kv.mod_revision);
            if let Some(id) = keys.parse_replica(&change.kv.key) {
                replicas_changed |= match change.kind {
                    EventKind::Put => {
                        self.note_address(&id, &change.kv.value);
                        self.replicas.insert(id)
                    }
                    EventKind::Delete => {
                        self.replica_addresses.remove(&id);
                        self.replicas.remove(&id)
                    }
                };
            } else if self.agents.apply(keys, change.kind, &change.kv) {
                // Agents are nothing a watcher follows.
            } else if let Some((ns, svc)) = keys.parse_policy(&change.kv.key) {
                let key = (ns.clone(), svc.clone());
                if let Some(change) = policy_change(ns, svc, &change) {
                    if change.policy.is_some() {
                        self.policies.insert(key, Arc::new(change.clone()));
                    } else {
                        self.policies.remove(&key);
                    }
                    policies.push(change);
                }
            } else if let Some(service) = keys.parse_service_config(&change.kv.key) {
                match change.kind {
                    EventKind::Put => match ServiceConfig::decode(change.kv.value.as_slice()) {
                        Ok(c) => {
                            self.configs.insert(service.clone(), c);
                        }
                        Err(e) => {
                            tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable service config")
                        }
                    },
                    EventKind::Delete => {
                        self.configs.remove(&service);
                    }
                }
                touched.insert(service);
            } else if let Some(key) = keys.parse_instance(&change.kv.key) {
                touched.insert((key.namespace.clone(), key.service.clone()));
                if let Some(event) = self.apply_instance(key, &change) {
                    events.push(event);
                }
            }
        }
        self.revision = revision;
        let protection = self.update_protection(touched);
        let topology = !events.is_empty() || replicas_changed;
        if events.is_empty() && protection.is_empty() && policies.is_empty() {
            if self.history.is_empty() {
                // Nothing between the floor and now changed for us.
                self.history_floor = revision;
            }
            return Applied {
                batch: None,
                revision,
                topology,
            };
        }
        let batch = Arc::new(Batch::Changes {
            revision,
            events,
            protection,
            policies,
        });
        self.history.push_back(batch.clone());
        while self.history.len() > self.history_batches {
            if let Some(old) = self.history.pop_front() {
                self.history_floor = old.revision();
            }
        }
        Applied {
            batch: Some(batch),
            revision,
            topology,
        }
    }

    /// One watched change of an instance key, as the event watchers get.
    fn apply_instance(&mut self, key: InstanceKey, change: &WatchEvent) -> Option<Event> {
        match change.kind {
            EventKind::Put => match decode_instance(&key, &change.kv.value, change.kv.mod_revision)
            {
                Ok(i) => {
                    let i = Arc::new(i);
                    self.insert_instance(key, i.clone());
                    Some(Event {
                        r#type: EventType::Put as i32,
                        instance: Some((*i).clone()),
                        revision: change.kv.mod_revision,
                    })
                }
                Err(e) => {
                    tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable instance record");
                    None
                }
            },
            EventKind::Delete => self.remove_instance(&key).map(|old| Event {
                r#type: EventType::Delete as i32,
                instance: Some((*old).clone()),
                revision: change.kv.mod_revision,
            }),
        }
    }

    /// The store is at `revision` with no change under the root. Returns
    /// whether that moved the cache.
    pub(super) fn progress(&mut self, revision: u64) -> bool {
        if revision <= self.revision {
            return false;
        }
        self.revision = revision;
        if self.history.is_empty() {
            self.history_floor = revision;
        }
        true
    }

    /// The held batches with changes after `revision`, oldest first (a batch
    /// may also hold older changes: filter them by their own revision).
    pub(super) fn batches_after(&self, revision: u64) -> impl Iterator<Item = &Batch> {
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

    /// The instances of one service, in id order.
    pub(super) fn service_instances<'a>(
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
    pub(super) fn protection(&self, namespace: &str, service: &str) -> ServiceProtection {
        let name = (namespace.to_owned(), service.to_owned());
        let threshold = self
            .configs
            .get(&name)
            .and_then(|c| c.protection_threshold_percent)
            .unwrap_or(self.default_threshold)
            .min(100);
        let (healthy, total) = self.counts.get(&name).copied().unwrap_or((0, 0));
        ServiceProtection {
            namespace: name.0,
            service: name.1,
            active: threshold > 0
                && total > 0
                && u64::from(healthy) * 100 < u64::from(threshold) * u64::from(total),
            threshold_percent: threshold,
            healthy,
            total,
        }
    }

    /// Recomputes the protection of `services`; returns those that flipped.
    fn update_protection(&mut self, services: BTreeSet<ServiceName>) -> Vec<ServiceProtection> {
        let mut flipped = Vec::new();
        for (ns, svc) in services {
            let p = self.protection(&ns, &svc);
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

    /// Services in (namespace, name) order after `after` (exclusive), each
    /// with its instances, until `select` has accepted `limit`; see
    /// [`super::Hub::services`]. Returns them and whether more may follow.
    pub(super) fn services(
        &self,
        namespace: &str,
        after: Option<(&str, &str)>,
        limit: usize,
        mut select: impl FnMut(&str, &str, Vec<Arc<Instance>>) -> Option<Vec<Arc<Instance>>>,
    ) -> (Vec<ServiceInstances>, bool) {
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
        let entries = self
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
        (out, more)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use weir_proto::policy::v1::{PolicyRecord, TrafficPolicy};

    use super::*;

    fn keys() -> Keys {
        Keys::new("/t")
    }

    fn instance_key(service: &str, id: &str) -> String {
        keys().instance(&InstanceKey {
            namespace: "ns".into(),
            service: service.into(),
            instance_id: id.into(),
        })
    }

    fn record(critical: bool) -> Vec<u8> {
        Instance {
            host: "127.0.0.1".into(),
            port: 80,
            status: if critical {
                HealthStatus::Critical as i32
            } else {
                HealthStatus::Passing as i32
            },
            ..Instance::default()
        }
        .encode_to_vec()
    }

    fn kv(key: &str, value: Vec<u8>, revision: u64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
            lease: 0,
        }
    }

    fn put(key: &str, value: Vec<u8>, revision: u64) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            kv: kv(key, value, revision),
        }
    }

    fn delete(key: &str, revision: u64) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Delete,
            kv: kv(key, Vec::new(), revision),
        }
    }

    fn loaded(revision: u64, history_batches: usize) -> State {
        let mut state = State::new(50, history_batches);
        state.finish_load(revision);
        state
    }

    /// (events, protection flips) of an applied batch.
    fn changes(applied: &Applied) -> (Vec<(i32, String, u64)>, Vec<ServiceProtection>) {
        match applied.batch.as_deref() {
            Some(Batch::Changes {
                events, protection, ..
            }) => (
                events
                    .iter()
                    .map(|e| {
                        let i = e.instance.as_ref().unwrap();
                        (e.r#type, i.instance_id.clone(), e.revision)
                    })
                    .collect(),
                protection.clone(),
            ),
            other => panic!("expected a change batch, got {other:?}"),
        }
    }

    #[test]
    fn puts_deletes_and_status_changes_keep_counts_and_flip_protection() {
        let keys = keys();
        let mut state = loaded(1, 100);
        let put_all = (0..4)
            .map(|n| {
                put(
                    &instance_key("svc", &format!("i-{n}")),
                    record(false),
                    2 + n,
                )
            })
            .collect();
        let applied = state.apply(&keys, put_all);
        let (events, flips) = changes(&applied);
        assert_eq!(events.len(), 4);
        assert!(events.iter().all(|e| e.0 == EventType::Put as i32));
        assert!(flips.is_empty());
        assert!(applied.topology);
        assert_eq!((applied.revision, state.revision), (5, 5));
        let p = state.protection("ns", "svc");
        assert_eq!((p.healthy, p.total, p.active), (4, 4, false));

        // 2 of 4 critical: exactly 50% healthy, not below the threshold.
        let applied = state.apply(
            &keys,
            vec![
                put(&instance_key("svc", "i-0"), record(true), 6),
                put(&instance_key("svc", "i-1"), record(true), 6),
            ],
        );
        assert!(changes(&applied).1.is_empty());
        // The third flips it, once.
        let applied = state.apply(
            &keys,
            vec![put(&instance_key("svc", "i-2"), record(true), 7)],
        );
        let flips = changes(&applied).1;
        assert_eq!(flips.len(), 1);
        assert!(flips[0].active && flips[0].healthy == 1 && flips[0].total == 4);
        assert!(state.protected.contains_key(&("ns".into(), "svc".into())));
        // A replaced record counts once and flips nothing.
        let applied = state.apply(
            &keys,
            vec![put(&instance_key("svc", "i-2"), record(true), 8)],
        );
        assert!(changes(&applied).1.is_empty());
        assert_eq!(state.protection("ns", "svc").total, 4);

        // Deleting two critical ones releases it (1 of 2 healthy).
        let applied = state.apply(
            &keys,
            vec![
                delete(&instance_key("svc", "i-0"), 9),
                delete(&instance_key("svc", "i-1"), 9),
            ],
        );
        let (events, flips) = changes(&applied);
        assert_eq!(
            events,
            vec![
                (EventType::Delete as i32, "i-0".into(), 9),
                (EventType::Delete as i32, "i-1".into(), 9)
            ]
        );
        assert!(!flips[0].active && flips[0].healthy == 1 && flips[0].total == 2);
        assert!(state.protected.is_empty());

        // Deleting what is not there changes nothing anyone follows.
        let applied = state.apply(&keys, vec![delete(&instance_key("svc", "gone"), 10)]);
        assert!(applied.batch.is_none() && !applied.topology);
        assert_eq!(state.revision, 10);

        // A service's own threshold counts: 1 of 2 is below 100%.
        let config = ServiceConfig {
            protection_threshold_percent: Some(100),
        };
        let applied = state.apply(
            &keys,
            vec![put(
                &keys.service_config("ns", "svc"),
                config.encode_to_vec(),
                11,
            )],
        );
        let flips = changes(&applied).1;
        assert!(flips[0].active && flips[0].threshold_percent == 100);
        // Counts go when the last instance goes.
        state.apply(
            &keys,
            vec![
                delete(&instance_key("svc", "i-2"), 12),
                delete(&instance_key("svc", "i-3"), 12),
            ],
        );
        assert!(state.counts.is_empty() && state.instances.is_empty());
    }

    #[test]
    fn policies_replicas_and_agents_follow_their_keys() {
        let keys = keys();
        let mut state = loaded(1, 100);
        let policy = PolicyRecord {
            policy: Some(TrafficPolicy::default()),
            ..PolicyRecord::default()
        };
        let applied = state.apply(
            &keys,
            vec![
                put(&keys.policy("ns", "svc"), policy.encode_to_vec(), 2),
                put(&keys.replica("r1"), Vec::new(), 2),
                put(&keys.agent("node-1"), Vec::new(), 2),
            ],
        );
        assert!(applied.topology, "a new replica is a topology change");
        match applied.batch.as_deref() {
            Some(Batch::Changes { policies, .. }) => {
                assert_eq!(policies.len(), 1);
                assert_eq!(policies[0].version, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(state.policies.len(), 1);
        assert!(state.replicas.contains("r1") && state.agents.sessions().contains("node-1"));
        // An agent leaving is nothing a subscriber follows.
        let applied = state.apply(&keys, vec![delete(&keys.agent("node-1"), 3)]);
        assert!(applied.batch.is_none() && !applied.topology);
        assert!(state.agents.sessions().is_empty());
        // A deleted policy reaches subscribers as a change without a policy.
        let applied = state.apply(&keys, vec![delete(&keys.policy("ns", "svc"), 4)]);
        match applied.batch.as_deref() {
            Some(Batch::Changes { policies, .. }) => {
                assert!(policies[0].policy.is_none() && policies[0].version == 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(state.policies.is_empty());
    }

    #[test]
    fn history_keeps_the_last_batches_and_its_floor_follows() {
        let keys = keys();
        let mut state = loaded(10, 3);
        assert_eq!(state.history_floor, 10);
        // Nothing followed changed: the floor moves with the revision while
        // the history is empty.
        state.apply(&keys, vec![put(&keys.agent("n"), Vec::new(), 11)]);
        assert_eq!(state.history_floor, 11);
        assert!(state.progress(12));
        assert_eq!((state.revision, state.history_floor), (12, 12));
        assert!(!state.progress(12), "progress never goes back");

        for rev in 13..=17 {
            state.apply(
                &keys,
                vec![put(&instance_key("svc", "i"), record(false), rev)],
            );
        }
        // Three batches held (15, 16, 17); the floor is the last dropped.
        assert_eq!(state.history.len(), 3);
        assert_eq!(state.history_floor, 14);
        let after = |r| -> Vec<u64> { state.batches_after(r).map(Batch::revision).collect() };
        assert_eq!(after(14), vec![15, 16, 17]);
        assert_eq!(after(16), vec![17]);
        assert!(after(17).is_empty());

        // With a history, unfollowed writes and progress leave the floor.
        state.apply(&keys, vec![put(&keys.agent("n"), Vec::new(), 18)]);
        assert!(state.progress(20));
        assert_eq!((state.revision, state.history_floor), (20, 14));

        // A reload starts the history over at the snapshot's revision.
        state.finish_load(30);
        assert!(state.history.is_empty() && state.history_floor == 30);
    }

    #[test]
    fn a_load_sorts_records_by_kind_and_skips_undecodable_ones() {
        let keys = keys();
        let mut state = State::new(50, 100);
        let config = ServiceConfig {
            protection_threshold_percent: Some(75),
        };
        let policy = PolicyRecord {
            policy: Some(TrafficPolicy::default()),
            ..PolicyRecord::default()
        };
        let health = keys.health(&InstanceKey {
            namespace: "ns".into(),
            service: "svc".into(),
            instance_id: "a".into(),
        });
        for kv in [
            kv(&instance_key("svc", "a"), record(false), 2),
            kv(&instance_key("svc", "b"), record(true), 3),
            kv(&instance_key("svc", "c"), record(false), 4),
            kv(&instance_key("svc", "d"), record(true), 4),
            kv(&instance_key("svc", "broken"), vec![0xff, 0xff], 5),
            kv(&keys.service_config("ns", "svc"), config.encode_to_vec(), 6),
            kv(&keys.policy("ns", "svc"), policy.encode_to_vec(), 7),
            kv(&keys.policy("ns", "bad"), vec![0xff], 7),
            kv(&keys.replica("r1"), Vec::new(), 8),
            kv(&keys.agent("node-1"), Vec::new(), 8),
            kv(&health, vec![1, 2, 3], 8),
        ] {
            state.load(&keys, kv);
        }
        assert!(!state.loaded);
        state.finish_load(9);
        assert!(state.loaded);
        assert_eq!((state.revision, state.history_floor), (9, 9));
        let ids: Vec<&str> = state
            .service_instances("ns", "svc")
            .map(|i| i.instance_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
        // The key names the instance and its revision is the key's.
        let b = state.service_instances("ns", "svc").nth(1).unwrap();
        assert_eq!(
            (b.namespace.as_str(), b.service.as_str(), b.revision),
            ("ns", "svc", 3)
        );
        // 2 of 4 healthy is below the service's 75%: protected from the start.
        let p = state.protection("ns", "svc");
        assert_eq!((p.healthy, p.total, p.threshold_percent), (2, 4, 75));
        assert!(p.active && state.protected.contains_key(&("ns".into(), "svc".into())));
        assert_eq!(state.policies.len(), 1);
        assert_eq!(state.policies[&("ns".into(), "svc".into())].version, 7);
        assert!(state.replicas.contains("r1") && state.agents.sessions().contains("node-1"));
    }

    #[test]
    fn services_page_in_name_order() {
        let keys = keys();
        let mut state = State::new(50, 100);
        for (svc, n) in [("a", 2), ("b", 1), ("c", 3)] {
            for i in 0..n {
                state.load(
                    &keys,
                    kv(&instance_key(svc, &format!("{i}")), record(false), 2),
                );
            }
        }
        state.finish_load(2);
        let names = |page: &[ServiceInstances]| -> Vec<(String, usize)> {
            page.iter().map(|(_, s, i)| (s.clone(), i.len())).collect()
        };
        let (page, more) = state.services("ns", None, 2, |_, _, i| Some(i));
        assert_eq!(names(&page), [("a".into(), 2), ("b".into(), 1)]);
        assert!(more);
        let (page, more) = state.services("ns", Some(("ns", "b")), 2, |_, _, i| Some(i));
        assert_eq!(names(&page), [("c".into(), 3)]);
        assert!(!more);
        // A skipped service does not count towards the limit.
        let (page, _) = state.services("ns", None, 2, |_, s, i| (s != "b").then_some(i));
        assert_eq!(names(&page), [("a".into(), 2), ("c".into(), 3)]);
        let (page, more) = state.services("other", None, 10, |_, _, i| Some(i));
        assert!(page.is_empty() && !more);
    }
}
