//! The hub's cache: what a replica knows of the store, kept from one
//! snapshot plus the watched changes after it. Pure: no store calls, no
//! tokio; [`super::sync`] feeds it and [`super::feed`] reads it.
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
    record::{decode_instance, decode_policy, policy_change},
    ServiceInstances,
};
use crate::{
    keys::{InstanceKey, Keys},
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
    /// Per-service settings.
    pub(super) configs: HashMap<ServiceName, ServiceConfig>,
    /// Services in protection now.
    pub(super) protected: BTreeMap<ServiceName, ServiceProtection>,
    /// Current traffic policies, version = the key's mod_revision.
    pub(super) policies: BTreeMap<ServiceName, Arc<PolicyChange>>,
    /// Nodes with an open agent session.
    pub(super) agents: BTreeSet<String>,
    /// Per service: (instances not CRITICAL, all instances), kept in step
    /// with `instances`.
    counts: HashMap<ServiceName, (u32, u32)>,
}

impl State {
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
            configs: HashMap::new(),
            protected: BTreeMap::new(),
            policies: BTreeMap::new(),
            agents: BTreeSet::new(),
            counts: HashMap::new(),
        }
    }

    /// Adds one key of a snapshot being loaded (see [`State::finish_load`]).
    pub(super) fn load(&mut self, keys: &Keys, kv: KeyValue) {
        if let Some(id) = keys.parse_replica(&kv.key) {
            self.replicas.insert(id);
        } else if let Some(node) = keys.parse_agent(&kv.key) {
            self.agents.insert(node);
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
                    EventKind::Put => self.replicas.insert(id),
                    EventKind::Delete => self.replicas.remove(&id),
                };
            } else if let Some(node) = keys.parse_agent(&change.kv.key) {
                match change.kind {
                    EventKind::Put => self.agents.insert(node),
                    EventKind::Delete => self.agents.remove(&node),
                };
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
