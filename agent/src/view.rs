//! The agent's view of the registry, and the routes built from it.
//!
//! [`View`] is written by the session task only: it applies the registry
//! messages the control plane pushes to a [`RegistryMirror`] and, for each
//! service a message touched, rebuilds that service's [`ServiceRoute`] (its
//! usable endpoints and their balancers: the default one, and one per
//! policy rule that sets its own). [`Routes`] is what the data path
//! reads: a map from namespace and service to the current route, swapped
//! per service on change, so a request takes a read lock for one lookup
//! and never waits on a rebuild of anything but the map entry.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, RwLock},
};

use tokio::time::Instant;

use serde::Serialize;
use weir_client::{
    policy::TrafficPolicy, Instance, Protocol as WireProtocol, RegistryMirror, WatchUpdate,
};

use crate::{
    balance::{policy::Lb, Balancing, Endpoint, Picker, Protocol},
    breaker::{Breakers, RuleBreakers},
    limit::{LimitState, Limiter, SERVICE_RULE},
    outbox::subscriptions::{Restored, SavedSubscription, Subscriptions, DEFAULT_RETENTION},
    retry::{Budget, Failure, FailureMetrics, FailureState},
};

/// How one service is reached now.
#[derive(Debug)]
pub struct ServiceRoute {
    pub namespace: Box<str>,
    pub service: Box<str>,
    /// Picks among the usable endpoints for requests no rule takes: those
    /// that are not CloudEvents, and events no rule matches.
    pub balancer: Picker,
    /// The rules the balancing follows; `None` without a policy (or with
    /// one that asks for plain round robin and no rule).
    balancing: Option<Arc<Balancing>>,
    /// One per rule of `balancing`, by index: the rule's own balancer
    /// (over the same endpoints), or `None` for the default one. Empty when
    /// no rule has its own, so requests skip matching.
    rule_balancers: Box<[Option<Picker>]>,
    /// Every instance the registry lists, usable or not.
    pub instances: usize,
    /// Routing to every instance because the service is in protection.
    pub protection: bool,
    /// Failure handling (retry, timeout) for requests no rule takes.
    pub failure: Failure,
    /// The service's retry budget, kept across rebuilds.
    pub budget: Arc<Budget>,
    /// The service's own rate limit, if any: its bucket lives on across
    /// rebuilds (and policy changes, in proportion).
    pub limit: Option<Arc<Limiter>>,
    /// One per rule of `balancing`, by index: the rule's own bucket, or
    /// `None` (its events take the service's).
    rule_limits: Box<[Option<Arc<Limiter>>]>,
    /// The breaker each endpoint runs, if the policy has one.
    pub breaker: Option<weir_core::policy::resolve::CircuitBreaker>,
    /// One per rule of `balancing`, by index: the rule's own breakers, or
    /// `None` (its events run under the service's).
    rule_breakers: Box<[Option<RuleBreakers>]>,
    /// The policy's `tracing` section.
    pub tracing: crate::balance::policy::Tracing,
    pub(crate) requests: metrics::Counter,
    pub(crate) upstream_errors: metrics::Counter,
    pub(crate) failures: FailureMetrics,
}

/// How a request is balanced and what happens when an attempt fails.
#[derive(Clone, Copy, Debug)]
pub struct Handling<'r> {
    pub picker: &'r Picker,
    pub failure: &'r Failure,
    /// The bucket the request takes a token from, if any.
    pub limit: Option<&'r Limiter>,
    /// The circuit breakers the request runs under, if any.
    pub breakers: Option<Breakers<'r>>,
}

impl ServiceRoute {
    /// Whether a rule picks a balancer of its own: only then are an
    /// event's `type` and `source` worth reading.
    #[inline]
    pub fn has_rules(&self) -> bool {
        !self.rule_balancers.is_empty()
    }

    /// The balancer for an event of `event_type` from `source`: the first
    /// matching rule's own, or the default one (no rule matches, or the
    /// first that does has no balancer of its own).
    pub fn balancer_for(&self, event_type: &str, source: &str) -> &Picker {
        self.handling_for(event_type, source).picker
    }

    /// What requests no rule takes get.
    #[inline]
    pub fn default_handling(&self) -> Handling<'_> {
        Handling {
            picker: &self.balancer,
            failure: &self.failure,
            limit: self.limit.as_deref(),
            breakers: self.breaker.as_ref().map(Breakers::Service),
        }
    }

    /// The balancer and failure handling for an event of `event_type` from
    /// `source`: the first matching rule's own, or the defaults (no rule
    /// matches, or the first that does has none of its own).
    pub fn handling_for(&self, event_type: &str, source: &str) -> Handling<'_> {
        let Some(balancing) = self.balancing.as_deref().filter(|_| self.has_rules()) else {
            return self.default_handling();
        };
        let Some(i) = balancing.rule_for(event_type, source) else {
            return self.default_handling();
        };
        Handling {
            picker: self
                .rule_balancers
                .get(i)
                .and_then(Option::as_ref)
                .unwrap_or(&self.balancer),
            failure: balancing
                .rules
                .get(i)
                .and_then(|r| r.failure.as_ref())
                .unwrap_or(&self.failure),
            limit: self
                .rule_limits
                .get(i)
                .and_then(Option::as_deref)
                .or(self.limit.as_deref()),
            breakers: match self.rule_breakers.get(i).and_then(Option::as_ref) {
                Some(own) => Some(Breakers::Rule(own)),
                None => self.breaker.as_ref().map(Breakers::Service),
            },
        }
    }

    /// The bucket of the rule named `rule` (or the service's own, for
    /// [`SERVICE_RULE`]) in this route, to carry over to the next.
    fn bucket(&self, rule: &str) -> Option<&Arc<Limiter>> {
        if rule == SERVICE_RULE {
            return self.limit.as_ref();
        }
        let balancing = self.balancing.as_deref()?;
        let i = balancing.rules.iter().position(|r| r.name == rule)?;
        self.rule_limits.get(i)?.as_ref()
    }

    /// Whether one more endpoint may leave the rotation under the
    /// breaker's `max_ejection_percent`: those out now (ejected, or
    /// excluded by their breaker) are fewer than that share of the
    /// endpoints (at least one may always go).
    pub fn may_exclude(&self, breakers: Option<Breakers<'_>>) -> bool {
        let Some(breakers) = breakers else {
            return true;
        };
        let endpoints = self.balancer.endpoints();
        let cap = (endpoints.len() * breakers.spec().max_ejection_percent as usize / 100).max(1);
        let out = endpoints
            .iter()
            .filter(|e| e.ejection.is_ejected() || breakers.cell(e).gate.excludes())
            .count();
        out < cap
    }

    /// Whether every endpoint's breaker in `breakers` is open or half open
    /// (capped or not): then the service fails fast for the requests
    /// under them, but for half-open probes.
    pub fn all_tripped(&self, breakers: Option<Breakers<'_>>) -> bool {
        breakers.is_some_and(|b| {
            !b.spec().shadow
                && self
                    .balancer
                    .endpoints()
                    .iter()
                    .all(|e| b.cell(e).gate.tripped())
        })
    }

    /// The breakers of the rules that set their own.
    pub fn rule_breakers(&self) -> impl Iterator<Item = &RuleBreakers> {
        self.rule_breakers.iter().flatten()
    }

    /// The breakers of rule `name` in this route, to carry over.
    fn rule_breaker(&self, name: &str) -> Option<&RuleBreakers> {
        self.rule_breakers().find(|r| &*r.rule == name)
    }

    /// Every bucket of the route, the service's own first.
    pub fn limits(&self) -> impl Iterator<Item = &Arc<Limiter>> {
        self.limit.iter().chain(self.rule_limits.iter().flatten())
    }

    /// Where the rotation of rule `name`'s own balancer is, if it has one.
    fn rule_position(&self, name: &str) -> Option<usize> {
        let balancing = self.balancing.as_deref()?;
        let i = balancing.rules.iter().position(|r| r.name == name)?;
        Some(self.rule_balancers.get(i)?.as_ref()?.position())
    }
}

type Table = HashMap<Box<str>, HashMap<Box<str>, Arc<ServiceRoute>>>;

/// The routes the data path reads.
#[derive(Debug, Default)]
pub struct Routes {
    table: RwLock<Table>,
    /// Which services subscribe to which topics.
    subscriptions: RwLock<Subscriptions>,
    /// The `delivery` section of each service's policy that has one.
    deliveries: RwLock<HashMap<(String, String), weir_core::policy::resolve::Delivery>>,
    /// A whole registry view is in (from the control plane or the data
    /// dir): subscriptions are known.
    loaded: std::sync::atomic::AtomicBool,
}

impl Routes {
    /// Whether a whole registry view is in.
    pub fn loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// `namespace/service`'s delivery settings, if its policy has them.
    pub fn delivery(
        &self,
        namespace: &str,
        service: &str,
    ) -> Option<weir_core::policy::resolve::Delivery> {
        self.deliveries
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(namespace.to_owned(), service.to_owned()))
            .cloned()
    }

    /// The services subscribed to `namespace/topic` now.
    pub fn subscribers(&self, namespace: &str, topic: &str) -> Vec<Box<str>> {
        self.subscriptions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .subscribers(namespace, topic, Instant::now())
    }

    /// Every subscription, for the admin API: (namespace, topic, service,
    /// listed by an instance now).
    pub fn subscription_list(&self) -> Vec<(String, String, String, bool)> {
        self.subscriptions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .list(Instant::now())
    }

    /// Every subscription as kept on disk (`now_unix_ms`: the wall clock
    /// now), for [`crate::persist`].
    pub fn saved_subscriptions(&self, now_unix_ms: i64) -> Vec<SavedSubscription> {
        self.subscriptions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .save(Instant::now(), now_unix_ms)
    }

    /// Adds back the subscriptions saved on disk, after the saved registry
    /// view was applied (what it lists stays listed; see
    /// [`Subscriptions::restore`]).
    pub fn restore_subscriptions(
        &self,
        saved: impl IntoIterator<Item = SavedSubscription>,
        now_unix_ms: i64,
    ) -> Restored {
        self.subscriptions()
            .restore(saved, Instant::now(), now_unix_ms)
    }

    fn subscriptions(&self) -> std::sync::RwLockWriteGuard<'_, Subscriptions> {
        self.subscriptions
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// The route of a service the registry lists (even with no usable
    /// instance), or `None` for a service it does not know.
    pub fn get(&self, namespace: &str, service: &str) -> Option<Arc<ServiceRoute>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.get(namespace)?.get(service).cloned()
    }

    /// Every route, for the admin API.
    pub fn all(&self) -> Vec<Arc<ServiceRoute>> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<_> = table.values().flat_map(|m| m.values().cloned()).collect();
        all.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
        all
    }

    /// (services, endpoints) routed now, without copying the table: the
    /// session asks after every message it applies.
    pub fn count(&self) -> (usize, usize) {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table
            .values()
            .flat_map(|m| m.values())
            .fold((0, 0), |(s, e), r| {
                (s + 1, e + r.balancer.endpoints().len())
            })
    }

    fn set(&self, namespace: &str, service: &str, route: Option<ServiceRoute>) {
        let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
        match route {
            Some(r) => {
                table
                    .entry(namespace.into())
                    .or_default()
                    .insert(service.into(), Arc::new(r));
            }
            None => {
                if let Some(m) = table.get_mut(namespace) {
                    m.remove(service);
                    if m.is_empty() {
                        table.remove(namespace);
                    }
                }
            }
        }
    }

    fn services(&self) -> BTreeSet<(String, String)> {
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table
            .iter()
            .flat_map(|(ns, m)| m.keys().map(move |s| (ns.to_string(), s.to_string())))
            .collect()
    }
}

type InstanceId = (String, String, String);

fn id_of(i: &Instance) -> InstanceId {
    (
        i.namespace.clone(),
        i.service.clone(),
        i.instance_id.clone(),
    )
}

/// The registry as this agent knows it, and the routes derived from it.
///
/// **Stale instances.** After the session comes back from a disconnection
/// (say the control plane was away for longer than the session TTL), the
/// instances of every node's agents may be missing from what the control
/// plane sends, for the seconds their agents take to register them again.
/// For a grace period after such a reconnect ([`View::begin_grace`]), an
/// instance that a resync snapshot omits or a change deletes stays routed
/// as *stale* until it is registered again or the period ends; then it is
/// dropped. So the view is never emptied because the control plane went
/// away and came back. The price: an instance deregistered during the
/// grace period keeps getting traffic until it ends.
#[derive(Debug)]
pub struct View {
    /// Shared with the local registry, which answers reads from it.
    mirror: Arc<RwLock<RegistryMirror>>,
    routes: Arc<Routes>,
    /// A complete snapshot was applied.
    loaded: bool,
    grace: std::time::Duration,
    grace_until: Option<Instant>,
    /// Instances kept past their removal, until the deadline.
    stale: BTreeMap<InstanceId, (Instance, Instant)>,
    /// The balancing of services whose policy asks for more than plain
    /// round robin without rules (the default, [`Balancing::default`]).
    balancing: BTreeMap<(String, String), Arc<Balancing>>,
    /// The agent's zone, for zone preference; empty: none.
    zone: String,
    /// How long a service's subscriptions outlive its instances, when its
    /// policy's `delivery.max_age_seconds` asks for more than the default.
    retention: BTreeMap<(String, String), std::time::Duration>,
}

/// Where `i` takes topic deliveries: its `weir.delivery.path` metadata
/// (checked when it registered), else `/`.
fn delivery_path_of(i: &Instance) -> http::uri::PathAndQuery {
    i.metadata
        .get(weir_core::validate::DELIVERY_PATH_KEY)
        .and_then(|p| weir_core::validate::delivery_path(p))
        .and_then(|p| http::uri::PathAndQuery::try_from(p).ok())
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"))
}

/// `host:port` with IPv6 literals bracketed.
fn authority_of(i: &Instance) -> Option<http::uri::Authority> {
    let host = if i.host.contains(':') && !i.host.starts_with('[') {
        format!("[{}]", i.host)
    } else {
        i.host.clone()
    };
    format!("{host}:{}", i.port).parse().ok()
}

impl View {
    /// A view feeding `routes`, keeping removed instances as stale for
    /// `grace` after a reconnect.
    pub fn new(routes: Arc<Routes>, grace: std::time::Duration) -> Self {
        Self {
            mirror: Arc::default(),
            routes,
            loaded: false,
            grace,
            grace_until: None,
            stale: BTreeMap::new(),
            balancing: BTreeMap::new(),
            zone: String::new(),
            retention: BTreeMap::new(),
        }
    }

    /// The agent runs in `zone`: policies with zone preference prefer its
    /// endpoints.
    pub fn with_zone(mut self, zone: &str) -> Self {
        self.zone = zone.to_owned();
        self
    }

    /// Takes the balancing of every service from its policy (all the
    /// policies the session holds): services whose balancing changed are
    /// rebuilt.
    pub fn apply_policies<'a>(
        &mut self,
        policies: impl IntoIterator<Item = (&'a (String, String), Option<&'a TrafficPolicy>)>,
    ) {
        let mut balancing: BTreeMap<(String, String), Arc<Balancing>> = BTreeMap::new();
        self.retention.clear();
        let mut deliveries = HashMap::new();
        for (key, policy) in policies {
            let delivery =
                policy.and_then(|p| weir_core::policy::resolve::resolve(p).defaults.delivery);
            if let Some(d) = delivery {
                if d.max_age > DEFAULT_RETENTION {
                    self.retention.insert(key.clone(), d.max_age);
                }
                deliveries.insert(key.clone(), d);
            }
            let Some(b) = policy.map(Balancing::of) else {
                continue;
            };
            if b == Balancing::default() {
                continue;
            }
            // Unchanged: keep the one the routes share.
            let b = match self.balancing.get(key) {
                Some(old) if **old == b => old.clone(),
                _ => Arc::new(b),
            };
            balancing.insert(key.clone(), b);
        }
        let changed: Vec<(String, String)> = balancing
            .iter()
            .filter(|(k, b)| {
                self.balancing
                    .get(*k)
                    .is_none_or(|old| !Arc::ptr_eq(old, b))
            })
            .map(|(k, _)| k.clone())
            .chain(
                self.balancing
                    .keys()
                    .filter(|k| !balancing.contains_key(*k))
                    .cloned(),
            )
            .collect();
        self.balancing = balancing;
        *self
            .routes
            .deliveries
            .write()
            .unwrap_or_else(|p| p.into_inner()) = deliveries;
        for (ns, svc) in &changed {
            self.rebuild(ns, svc);
        }
    }

    /// The session came back after a disconnection: for the grace period,
    /// removals keep the instance as stale.
    pub fn begin_grace(&mut self) {
        if self.loaded && !self.grace.is_zero() {
            self.grace_until = Some(Instant::now() + self.grace);
        }
    }

    /// Instances routed as stale now.
    pub fn stale(&self) -> usize {
        self.stale.len()
    }

    /// When the next stale instance is due to be dropped.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.stale.values().map(|(_, t)| *t).min()
    }

    /// Drops the stale instances whose grace ended by `now`; whether any
    /// was (the routes, and the subscriptions they make, changed).
    pub fn expire(&mut self, now: Instant) -> bool {
        let due: Vec<InstanceId> = self
            .stale
            .iter()
            .filter(|(_, (_, t))| *t <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let mut touched = BTreeSet::new();
        for k in due {
            if let Some((i, _)) = self.stale.remove(&k) {
                tracing::info!(namespace = %i.namespace, service = %i.service, instance = %i.instance_id,
                    "a stale instance was not registered again within the grace period; dropped");
                touched.insert((i.namespace, i.service));
            }
        }
        for (ns, svc) in &touched {
            self.rebuild(ns, svc);
        }
        !touched.is_empty()
    }

    pub fn routes(&self) -> &Arc<Routes> {
        &self.routes
    }

    /// Endpoints over every route.
    pub fn endpoints(&self) -> usize {
        self.routes.count().1
    }

    /// Whether a whole snapshot has been applied.
    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn revision(&self) -> u64 {
        self.read().revision()
    }

    /// The registry as last applied, for readers outside the session.
    pub fn mirror(&self) -> Arc<RwLock<RegistryMirror>> {
        self.mirror.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RegistryMirror> {
        self.mirror.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RegistryMirror> {
        self.mirror.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a snapshot on the next stream (the routes stay as they are
    /// until it arrives).
    pub fn forget_revision(&mut self) {
        self.write().forget_revision();
    }

    /// A new stream starts: drop any half-received snapshot.
    pub fn stream_restarted(&mut self) {
        self.write().drop_partial_snapshot();
    }

    /// Applies one registry message and rebuilds the routes it touched.
    pub fn apply(
        &mut self,
        message: weir_client::WatchResponse,
    ) -> Result<Option<WatchUpdate>, weir_client::Error> {
        let grace_until = self.grace_until.filter(|t| Instant::now() < *t);
        // What a removal would drop, while removals keep instances stale.
        let mut removed: Vec<Instance> = Vec::new();
        if grace_until.is_some() {
            if message.kind == weir_client::WatchKind::Snapshot as i32 && message.snapshot_complete
            {
                removed.extend(self.read().instances().cloned());
            } else if message.kind == weir_client::WatchKind::Changes as i32 {
                removed.extend(
                    message
                        .events
                        .iter()
                        .filter(|e| e.r#type == weir_client::EventType::Delete as i32)
                        .filter_map(|e| e.instance.clone()),
                );
            }
        }
        let Some(update) = self.write().apply(message)? else {
            return Ok(None);
        };
        let mut touched: BTreeSet<(String, String)> = match &update {
            WatchUpdate::Snapshot { .. } => {
                self.loaded = true;
                self.routes
                    .loaded
                    .store(true, std::sync::atomic::Ordering::Release);
                // Once per snapshot: forget subscriptions past retention.
                self.routes.subscriptions().expire(Instant::now());
                let mut all = self.routes.services();
                all.extend(
                    self.read()
                        .instances()
                        .map(|i| (i.namespace.clone(), i.service.clone())),
                );
                all
            }
            WatchUpdate::Changes {
                events, protection, ..
            } => events
                .iter()
                .filter_map(|e| e.instance.as_ref())
                .map(|i| (i.namespace.clone(), i.service.clone()))
                .chain(
                    protection
                        .iter()
                        .map(|p| (p.namespace.clone(), p.service.clone())),
                )
                .collect(),
            WatchUpdate::Progress { .. } => BTreeSet::new(),
        };
        {
            let mirror = self.mirror.read().unwrap_or_else(|p| p.into_inner());
            if let Some(deadline) = grace_until {
                for i in removed {
                    if mirror
                        .get(&i.namespace, &i.service, &i.instance_id)
                        .is_none()
                    {
                        touched.insert((i.namespace.clone(), i.service.clone()));
                        self.stale.insert(id_of(&i), (i, deadline));
                    }
                }
            }
            // Registered again: no longer stale.
            self.stale
                .retain(|(ns, svc, id), _| mirror.get(ns, svc, id).is_none());
        }
        for (ns, svc) in &touched {
            self.rebuild(ns, svc);
        }
        Ok(Some(update))
    }

    /// Rebuilds one service's route from the mirror. Endpoints that did
    /// not change keep their identity (and in-flight counts).
    fn rebuild(&self, namespace: &str, service: &str) {
        let mirror = self.read();
        let stale = self
            .stale
            .range((namespace.to_owned(), service.to_owned(), String::new())..)
            .take_while(|((ns, svc, _), _)| ns == namespace && svc == service)
            .map(|(_, (i, _))| i);
        let instances: Vec<&Instance> = mirror.service(namespace, service).chain(stale).collect();
        let retention = self
            .retention
            .get(&(namespace.to_owned(), service.to_owned()))
            .copied()
            .unwrap_or(DEFAULT_RETENTION);
        self.routes.subscriptions().observe(
            namespace,
            service,
            instances
                .iter()
                .flat_map(|i| i.topics.iter().map(String::as_str)),
            retention,
            Instant::now(),
        );
        if instances.is_empty() {
            self.routes.set(namespace, service, None);
            return;
        }
        let protection = mirror.in_protection(namespace, service);
        let previous = self.routes.get(namespace, service);
        let old: HashMap<&str, &Arc<Endpoint>> = previous
            .as_ref()
            .map(|r| r.balancer.endpoints().iter().map(|e| (&*e.id, e)).collect())
            .unwrap_or_default();
        let endpoints: Vec<Arc<Endpoint>> = instances
            .iter()
            .filter(|i| protection || weir_core::health::takes_traffic(i))
            .filter_map(|i| {
                let authority = authority_of(i)?;
                let protocol = if i.protocol == WireProtocol::Grpc as i32 {
                    Protocol::Grpc
                } else {
                    Protocol::Http
                };
                let weight = if i.weight == 0 { 100 } else { i.weight };
                let fresh = Endpoint::new(&i.instance_id, authority, protocol, weight, &i.zone)
                    .with_topics(i.topics.iter().map(String::as_str))
                    .with_delivery_path(delivery_path_of(i));
                match old.get(i.instance_id.as_str()) {
                    Some(e)
                        if e.authority == fresh.authority
                            && e.protocol == protocol
                            && e.weight == weight
                            && e.zone == fresh.zone
                            && e.topics == fresh.topics
                            && e.delivery_path == fresh.delivery_path =>
                    {
                        Some(Arc::clone(e))
                    }
                    _ => Some(Arc::new(fresh)),
                }
            })
            .collect();
        let start = previous.as_ref().map_or(0, |r| r.balancer.position());
        let balancing = self
            .balancing
            .get(&(namespace.to_owned(), service.to_owned()))
            .cloned();
        let labels = [
            ("namespace", namespace.to_owned()),
            ("service", service.to_owned()),
        ];
        let disagreements =
            || metrics::counter!("weir_agent_shadow_balancer_disagreements_total", &labels);
        // A rule's own balancer carries on the rotation of the rule of the
        // same name in the previous route.
        let rule_balancers: Box<[Option<Picker>]> = match &balancing {
            Some(b) if !b.rules.is_empty() => b
                .rules
                .iter()
                .map(|rule| {
                    rule.own.as_ref().map(|lb| {
                        let start = previous
                            .as_ref()
                            .and_then(|r| r.rule_position(&rule.name))
                            .unwrap_or(0);
                        Picker::new(lb, &endpoints, &self.zone, start, disagreements)
                    })
                })
                .collect(),
            _ => Box::default(),
        };
        let default_lb = balancing.as_ref().map(|b| &b.default);
        let balancer = Picker::new(
            default_lb.unwrap_or(&Lb::default()),
            &endpoints,
            &self.zone,
            start,
            disagreements,
        );
        metrics::gauge!("weir_agent_endpoints", &labels).set(endpoints.len() as f64);
        let failure = balancing
            .as_ref()
            .map(|b| b.failure.clone())
            .unwrap_or_default();
        let budget = previous
            .as_ref()
            .map_or_else(Arc::default, |r| r.budget.clone());
        // Buckets carry on from the previous route's of the same rule.
        let bucket = |rule: &str, spec: Option<&weir_core::policy::resolve::RateLimit>| {
            let spec = spec?;
            let old = previous.as_ref().and_then(|r| r.bucket(rule));
            Some(match old {
                Some(old) if old.runs(spec) => old.clone(),
                Some(old) => Arc::new(old.successor(namespace, service, spec)),
                None => Arc::new(Limiter::new(namespace, service, rule, spec)),
            })
        };
        let limit = bucket(
            SERVICE_RULE,
            balancing.as_ref().and_then(|b| b.limit.as_ref()),
        );
        let breaker = balancing.as_ref().and_then(|b| b.breaker.clone());
        let rule_breakers: Box<[Option<RuleBreakers>]> = match &balancing {
            Some(b) if !b.rules.is_empty() => b
                .rules
                .iter()
                .map(|rule| {
                    rule.breaker.as_ref().map(|spec| {
                        RuleBreakers::new(
                            &rule.name,
                            spec,
                            endpoints.iter().map(|e| &*e.id),
                            previous.as_ref().and_then(|r| r.rule_breaker(&rule.name)),
                        )
                    })
                })
                .collect(),
            _ => Box::default(),
        };
        if previous.as_ref().is_some_and(|r| r.breaker != breaker) {
            // The section changed (or went): every breaker starts afresh.
            for e in &endpoints {
                e.breaker.reset();
            }
        }
        let rule_limits: Box<[Option<Arc<Limiter>>]> = match &balancing {
            Some(b) if !b.rules.is_empty() => b
                .rules
                .iter()
                .map(|rule| bucket(&rule.name, rule.limit.as_ref()))
                .collect(),
            _ => Box::default(),
        };
        let tracing = balancing.as_ref().map(|b| b.tracing).unwrap_or_default();
        let route = ServiceRoute {
            namespace: namespace.into(),
            service: service.into(),
            balancer,
            balancing,
            rule_balancers,
            instances: instances.len(),
            protection,
            failure,
            budget,
            limit,
            rule_limits,
            breaker,
            rule_breakers,
            tracing,
            requests: metrics::counter!("weir_agent_requests_total", &labels),
            upstream_errors: metrics::counter!("weir_agent_upstream_errors_total", &labels),
            failures: FailureMetrics::new(&labels),
        };
        self.routes.set(namespace, service, Some(route));
    }
}

/// A route as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct RouteState {
    pub namespace: String,
    pub service: String,
    pub instances: usize,
    pub protection: bool,
    /// The default balancer's algorithm (`round_robin`,
    /// `weighted_round_robin`, `least_request`, `peak_ewma`,
    /// `consistent_hash`).
    pub balancer: &'static str,
    /// The algorithm of its `load_balancer` in shadow mode, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_balancer: Option<&'static str>,
    /// Whether the default balancer keeps to the agent's zone now (zone
    /// preference on, and the zone holds enough usable endpoints).
    pub in_zone: bool,
    /// The default retry and timeout, when the policy sets either.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureState>,
    pub endpoints: Vec<EndpointState>,
    /// The rate limit buckets: the service's own (`rule: default`) and
    /// each rule's own.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<LimitState>,
    /// The rules balancing and failure handling follow, in order (empty
    /// when none has a balancer, retry or timeout of its own).
    pub rules: Vec<RuleState>,
}

/// A policy rule as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct RuleState {
    pub name: String,
    /// An algorithm as in [`RouteState::balancer`], or `default` (the
    /// events it matches go to the default balancer).
    pub balancer: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow_balancer: Option<&'static str>,
    /// Its own retry and timeout, when they differ from the defaults.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureState>,
    /// Its own circuit breakers, by instance id (those that saw a call).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub breakers: BTreeMap<String, crate::breaker::BreakerState>,
}

#[derive(Debug, Serialize)]
pub struct EndpointState {
    pub id: String,
    pub address: String,
    pub protocol: Protocol,
    pub weight: u32,
    pub zone: String,
    pub in_flight: usize,
    /// The peak EWMA latency estimate in milliseconds, on routes that
    /// balance (or shadow) by it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ewma_ms: Option<f64>,
    /// For how long it has been out of this agent's rotation (refused or
    /// dropped connections), while it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_ms: Option<u64>,
    /// Times it was ejected since the agent started.
    pub ejections: u64,
    /// Its circuit breaker, on routes with one, once it saw a call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub breaker: Option<crate::breaker::BreakerState>,
}

impl From<&ServiceRoute> for RouteState {
    fn from(r: &ServiceRoute) -> Self {
        let observed =
            r.balancer.observes() || r.rule_balancers.iter().flatten().any(Picker::observes);
        Self {
            namespace: r.namespace.to_string(),
            service: r.service.to_string(),
            instances: r.instances,
            protection: r.protection,
            balancer: r.balancer.algorithm(),
            shadow_balancer: r.balancer.shadow_algorithm(),
            in_zone: r.balancer.in_zone(),
            failure: FailureState::of(&r.failure),
            limits: r.limits().map(|l| l.state()).collect(),
            endpoints: r
                .balancer
                .endpoints()
                .iter()
                .map(|e| EndpointState {
                    id: e.id.to_string(),
                    address: e.authority.to_string(),
                    protocol: e.protocol,
                    weight: e.weight,
                    zone: e.zone.to_string(),
                    in_flight: e.in_flight.load(std::sync::atomic::Ordering::Relaxed),
                    ewma_ms: observed.then(|| e.ewma.millis()),
                    ejected_ms: e.ejection.ejected_for().map(|d| d.as_millis() as u64),
                    ejections: e.ejection.count(),
                    breaker: r.breaker.as_ref().and_then(|_| e.breaker.state()),
                })
                .collect(),
            rules: r
                .balancing
                .as_deref()
                .filter(|_| r.has_rules())
                .map(|b| {
                    b.rules
                        .iter()
                        .zip(r.rule_balancers.iter())
                        .zip(r.rule_breakers.iter())
                        .map(|((rule, own), breakers)| RuleState {
                            name: rule.name.clone(),
                            balancer: own.as_ref().map_or("default", Picker::algorithm),
                            shadow_balancer: own.as_ref().and_then(Picker::shadow_algorithm),
                            failure: rule.failure.as_ref().and_then(FailureState::of),
                            breakers: breakers
                                .iter()
                                .flat_map(|b| b.cells())
                                .filter_map(|(id, cell)| Some((id.to_owned(), cell.state()?)))
                                .collect(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// `default/orders` with instances of the given ids and weights on
/// 127.0.0.1:1, under `policy` (its namespace and service are set here):
/// a route as the data path gets it, for tests.
#[cfg(test)]
pub(crate) fn test_routes(instances: &[(&str, u32)], policy: TrafficPolicy) -> Arc<Routes> {
    use weir_client::{Event, EventType, WatchKind, WatchResponse};
    let routes = Arc::new(Routes::default());
    let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
    let events = instances
        .iter()
        .map(|(id, weight)| Event {
            r#type: EventType::Put as i32,
            instance: Some(Instance {
                namespace: "default".into(),
                service: "orders".into(),
                instance_id: (*id).into(),
                host: "127.0.0.1".into(),
                port: 1,
                weight: *weight,
                ..Instance::default()
            }),
            revision: 1,
        })
        .collect();
    view.apply(WatchResponse {
        kind: WatchKind::Snapshot as i32,
        events,
        revision: 1,
        snapshot_complete: true,
        ..WatchResponse::default()
    })
    .expect("applies");
    let key = ("default".to_owned(), "orders".to_owned());
    let policy = TrafficPolicy {
        namespace: "default".into(),
        service: "orders".into(),
        ..policy
    };
    view.apply_policies([(&key, Some(&policy))]);
    // The view holds the routes' subscriptions; the routes outlive it.
    drop(view);
    routes
}

/// [`test_routes`]' one route.
#[cfg(test)]
pub(crate) fn test_route(instances: &[(&str, u32)], policy: TrafficPolicy) -> Arc<ServiceRoute> {
    test_routes(instances, policy)
        .get("default", "orders")
        .expect("a route")
}

#[cfg(test)]
mod tests {
    use weir_client::{
        policy::{load_balancer::Algorithm, EventMatch},
        Event, EventType, HealthStatus, ServiceProtection, WatchKind, WatchResponse,
    };

    use super::*;
    use crate::balance::any;

    fn inst(svc: &str, id: &str, port: u32, status: HealthStatus) -> Instance {
        Instance {
            namespace: "default".into(),
            service: svc.into(),
            instance_id: id.into(),
            host: "127.0.0.1".into(),
            port,
            status: status as i32,
            ..Instance::default()
        }
    }

    fn snapshot(instances: Vec<Instance>, revision: u64) -> WatchResponse {
        WatchResponse {
            kind: WatchKind::Snapshot as i32,
            events: instances
                .into_iter()
                .map(|i| Event {
                    r#type: EventType::Put as i32,
                    instance: Some(i),
                    revision,
                })
                .collect(),
            revision,
            snapshot_complete: true,
            ..WatchResponse::default()
        }
    }

    fn change(t: EventType, i: Instance, revision: u64) -> WatchResponse {
        WatchResponse {
            kind: WatchKind::Changes as i32,
            events: vec![Event {
                r#type: t as i32,
                instance: Some(i),
                revision,
            }],
            revision,
            ..WatchResponse::default()
        }
    }

    fn ids(routes: &Routes, svc: &str) -> Vec<String> {
        routes
            .get("default", svc)
            .map(|r| {
                r.balancer
                    .endpoints()
                    .iter()
                    .map(|e| e.id.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn instances_topics_make_subscriptions_that_outlive_them() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        let with = |id: &str, topics: &[&str]| Instance {
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..inst("billing", id, 1, HealthStatus::Passing)
        };
        view.apply(snapshot(
            vec![with("b1", &["orders", "refunds"]), with("b2", &["orders"])],
            1,
        ))
        .expect("applies");
        let subscribers = |topic: &str| -> Vec<String> {
            routes
                .subscribers("default", topic)
                .into_iter()
                .map(String::from)
                .collect()
        };
        assert_eq!(subscribers("orders"), ["billing"]);
        assert_eq!(subscribers("refunds"), ["billing"]);
        // Only instances that list a topic receive it.
        let route = routes.get("default", "billing").expect("a route");
        let listing: Vec<bool> = route
            .balancer
            .endpoints()
            .iter()
            .map(|e| e.subscribes("refunds"))
            .collect();
        assert_eq!(listing, [true, false]);
        // Every instance leaves: the subscription stays for the retention.
        view.apply(change(EventType::Delete, with("b1", &[]), 2))
            .expect("applies");
        view.apply(change(EventType::Delete, with("b2", &[]), 3))
            .expect("applies");
        assert!(routes.get("default", "billing").is_none());
        tokio::time::advance(DEFAULT_RETENTION - std::time::Duration::from_secs(1)).await;
        assert_eq!(subscribers("orders"), ["billing"]);
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(subscribers("orders").is_empty());
    }

    #[test]
    fn routes_follow_snapshots_and_changes_and_skip_critical_instances() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        assert!(!view.is_loaded());
        view.apply(snapshot(
            vec![
                inst("orders", "a", 1, HealthStatus::Passing),
                inst("orders", "b", 2, HealthStatus::Critical),
                inst("billing", "x", 3, HealthStatus::Unknown),
            ],
            5,
        ))
        .expect("applies");
        assert!(view.is_loaded());
        assert_eq!(ids(&routes, "orders"), ["a"], "CRITICAL is not usable");
        assert_eq!(routes.get("default", "orders").expect("route").instances, 2);
        assert_eq!(ids(&routes, "billing"), ["x"]);

        let a_before = routes
            .get("default", "orders")
            .expect("route")
            .balancer
            .endpoints()[0]
            .clone();
        view.apply(change(
            EventType::Put,
            inst("orders", "b", 2, HealthStatus::Passing),
            6,
        ))
        .expect("applies");
        assert_eq!(ids(&routes, "orders"), ["a", "b"]);
        let a_after = routes
            .get("default", "orders")
            .expect("route")
            .balancer
            .endpoints()[0]
            .clone();
        assert!(
            Arc::ptr_eq(&a_before, &a_after),
            "an unchanged endpoint keeps its identity"
        );

        view.apply(change(
            EventType::Delete,
            inst("billing", "x", 3, HealthStatus::Unknown),
            7,
        ))
        .expect("applies");
        assert!(
            routes.get("default", "billing").is_none(),
            "a service with no instance is gone"
        );

        // A resync snapshot drops what it does not list.
        view.apply(snapshot(
            vec![inst("orders", "b", 2, HealthStatus::Passing)],
            9,
        ))
        .expect("applies");
        assert_eq!(ids(&routes, "orders"), ["b"]);
    }

    #[test]
    fn protection_routes_to_every_instance() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        view.apply(snapshot(
            vec![
                inst("orders", "a", 1, HealthStatus::Critical),
                inst("orders", "b", 2, HealthStatus::Critical),
            ],
            5,
        ))
        .expect("applies");
        assert!(routes
            .get("default", "orders")
            .expect("route")
            .balancer
            .pick(None, &any)
            .is_none());
        view.apply(WatchResponse {
            kind: WatchKind::Changes as i32,
            revision: 6,
            protection: vec![ServiceProtection {
                namespace: "default".into(),
                service: "orders".into(),
                active: true,
                threshold_percent: 50,
                healthy: 0,
                total: 2,
            }],
            ..WatchResponse::default()
        })
        .expect("applies");
        let route = routes.get("default", "orders").expect("route");
        assert!(route.protection);
        assert_eq!(ids(&routes, "orders"), ["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_reconnect_removed_instances_stay_stale_for_the_grace_period() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        let a = inst("orders", "a", 1, HealthStatus::Passing);
        let b = inst("orders", "b", 2, HealthStatus::Passing);
        view.apply(snapshot(vec![a.clone(), b.clone()], 5))
            .expect("applies");

        // Outside a grace period a removal is a removal.
        view.apply(change(EventType::Delete, b.clone(), 6))
            .expect("applies");
        assert_eq!(ids(&routes, "orders"), ["a"]);
        view.apply(change(EventType::Put, b.clone(), 7))
            .expect("applies");

        // Back from an outage: the resync snapshot lacks a (its agent has
        // not registered it again yet) and a delete takes b.
        view.begin_grace();
        view.apply(snapshot(vec![b.clone()], 20)).expect("applies");
        view.apply(change(EventType::Delete, b.clone(), 21))
            .expect("applies");
        assert_eq!(ids(&routes, "orders"), ["a", "b"], "both kept, stale");
        assert_eq!(view.stale(), 2);

        // a is registered again: no longer stale.
        tokio::time::advance(std::time::Duration::from_secs(10)).await;
        view.apply(change(EventType::Put, a.clone(), 22))
            .expect("applies");
        assert_eq!(view.stale(), 1);
        let due = view.next_expiry().expect("b is due");
        assert!(!view.expire(tokio::time::Instant::now()), "nothing due yet");
        assert_eq!(
            ids(&routes, "orders"),
            ["a", "b"],
            "b's grace has 20 s left"
        );

        tokio::time::advance(due - tokio::time::Instant::now()).await;
        assert!(view.expire(tokio::time::Instant::now()), "b dropped");
        assert_eq!(
            ids(&routes, "orders"),
            ["a"],
            "b dropped when the grace ended"
        );
        assert_eq!(view.stale(), 0);

        // After the grace period removals are removals again.
        view.apply(change(EventType::Delete, a, 23))
            .expect("applies");
        assert!(routes.get("default", "orders").is_none());
    }

    fn weighted(svc: &str, id: &str, port: u32, weight: u32) -> Instance {
        Instance {
            weight,
            ..inst(svc, id, port, HealthStatus::Passing)
        }
    }

    use crate::balance::policy::tests::{lb, rule};

    fn apply_policy(view: &mut View, policy: Option<TrafficPolicy>) {
        let key = ("default".to_owned(), "orders".to_owned());
        view.apply_policies([(&key, policy.as_ref())]);
    }

    fn picks(b: &Picker, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| b.pick(None, &any).expect("an endpoint").id.to_string())
            .collect()
    }

    /// Round robin by default; rules by exact type, by type prefix and by
    /// source, one without a balancer of its own shadowing a later one.
    fn rules_policy() -> TrafficPolicy {
        TrafficPolicy {
            namespace: "default".into(),
            service: "orders".into(),
            load_balancer: lb(Algorithm::RoundRobin),
            rules: vec![
                rule(
                    "audit",
                    EventMatch {
                        type_exact: "com.example.audit".into(),
                        ..EventMatch::default()
                    },
                    lb(Algorithm::WeightedRoundRobin),
                ),
                rule(
                    "heavy",
                    EventMatch {
                        type_prefix: "com.example.heavy.".into(),
                        ..EventMatch::default()
                    },
                    lb(Algorithm::WeightedRoundRobin),
                ),
                rule(
                    "billing",
                    EventMatch {
                        source: "/billing".into(),
                        ..EventMatch::default()
                    },
                    None,
                ),
                rule(
                    "late",
                    EventMatch {
                        type_prefix: "com.example.".into(),
                        source: "/billing".into(),
                        ..EventMatch::default()
                    },
                    lb(Algorithm::WeightedRoundRobin),
                ),
                rule(
                    "partner",
                    EventMatch {
                        source: "/partner".into(),
                        ..EventMatch::default()
                    },
                    lb(Algorithm::WeightedRoundRobin),
                ),
            ],
            ..TrafficPolicy::default()
        }
    }

    #[test]
    fn events_pick_the_balancer_of_the_first_matching_rule() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        view.apply(snapshot(
            vec![
                weighted("orders", "a", 1, 1),
                weighted("orders", "b", 2, 1),
                weighted("orders", "c", 3, 4),
            ],
            5,
        ))
        .expect("applies");
        assert!(!routes.get("default", "orders").expect("route").has_rules());
        apply_policy(&mut view, Some(rules_policy()));
        let route = routes.get("default", "orders").expect("route");
        assert!(route.has_rules());
        let own = |name: &str| {
            let i = route
                .balancing
                .as_ref()
                .and_then(|b| b.rules.iter().position(|r| r.name == name))
                .expect("a rule");
            route.rule_balancers[i].as_ref().expect("its own balancer")
        };
        let is = |got: &Picker, want: &Picker| std::ptr::eq(got, want);

        // By exact type (a longer type is not the same type).
        assert!(is(
            route.balancer_for("com.example.audit", "/x"),
            own("audit")
        ));
        assert!(is(
            route.balancer_for("com.example.audit.v2", "/x"),
            &route.balancer
        ));
        // By type prefix.
        assert!(is(
            route.balancer_for("com.example.heavy.resize", "/x"),
            own("heavy")
        ));
        assert!(is(
            route.balancer_for("com.example.heavy.resize", "/billing"),
            own("heavy"),
        ));
        // By source.
        assert!(is(
            route.balancer_for("org.other", "/partner"),
            own("partner")
        ));
        // The first match wins: "billing" (default balancer) comes before
        // "late", which matches too.
        assert!(is(
            route.balancer_for("com.example.light", "/billing"),
            &route.balancer
        ));
        // No match: the defaults.
        assert!(is(route.balancer_for("org.other", "/x"), &route.balancer));

        // The default is round robin, the rules' own follow the weights,
        // over the same endpoints.
        assert_eq!(picks(&route.balancer, 6), ["a", "b", "c", "a", "b", "c"]);
        let mut heavy = picks(own("heavy"), 12);
        heavy.sort();
        assert_eq!(heavy.iter().filter(|id| *id == "c").count(), 8, "{heavy:?}");
        assert_eq!(heavy.iter().filter(|id| *id == "a").count(), 2, "{heavy:?}");
        assert!(Arc::ptr_eq(
            &route.balancer.endpoints()[2],
            &own("heavy").endpoints()[2]
        ));
        let state = RouteState::from(&*route);
        let rules: Vec<(&str, &str)> = state
            .rules
            .iter()
            .map(|r| (r.name.as_str(), r.balancer))
            .collect();
        assert_eq!(
            rules,
            [
                ("audit", "weighted_round_robin"),
                ("heavy", "weighted_round_robin"),
                ("billing", "default"),
                ("late", "weighted_round_robin"),
                ("partner", "weighted_round_robin"),
            ]
        );
    }

    #[test]
    fn rule_balancers_follow_the_view_and_carry_on_their_rotation() {
        let routes = Arc::new(Routes::default());
        let mut view = View::new(routes.clone(), std::time::Duration::from_secs(30));
        view.apply(snapshot(
            vec![weighted("orders", "a", 1, 1), weighted("orders", "b", 2, 3)],
            5,
        ))
        .expect("applies");
        apply_policy(&mut view, Some(rules_policy()));
        let route = routes.get("default", "orders").expect("route");
        let heavy = route.balancer_for("com.example.heavy.x", "/s");
        assert_eq!(picks(heavy, 3), ["b", "a", "b"]);
        let at = heavy.position();

        // A registry change rebuilds every balancer of the route, each
        // carrying on where it was.
        view.apply(change(EventType::Put, weighted("orders", "c", 3, 1), 6))
            .expect("applies");
        let route = routes.get("default", "orders").expect("route");
        let heavy = route.balancer_for("com.example.heavy.x", "/s");
        assert_eq!(heavy.endpoints().len(), 3, "fed from the view");
        assert_eq!(heavy.position(), at);

        // The same policy again changes nothing: the route is not rebuilt.
        apply_policy(&mut view, Some(rules_policy()));
        assert!(Arc::ptr_eq(
            &route,
            &routes.get("default", "orders").expect("route")
        ));

        // A policy without rules: no matching, one balancer.
        apply_policy(
            &mut view,
            Some(TrafficPolicy {
                rules: Vec::new(),
                ..rules_policy()
            }),
        );
        let route = routes.get("default", "orders").expect("route");
        assert!(!route.has_rules());
        assert!(std::ptr::eq(
            route.balancer_for("com.example.heavy.x", "/s"),
            &route.balancer
        ));
        apply_policy(&mut view, None);
        assert!(!routes.get("default", "orders").expect("route").has_rules());
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let mut i = inst("orders", "a", 80, HealthStatus::Passing);
        i.host = "::1".into();
        assert_eq!(authority_of(&i).expect("valid").as_str(), "[::1]:80");
    }
}
