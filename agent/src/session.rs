//! The node session: the agent's one stream to the control plane.
//!
//! It opens `AgentSessionService/Session` on the first replica that takes
//! it, applies the registry and policy messages to the [`View`], and
//! acknowledges every policy version. When the stream breaks it reopens
//! it, on any replica, with capped, jittered backoff, resuming both
//! streams from the revisions it applied; while no replica answers it
//! keeps routing on the view it has and says it is degraded.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use tokio::sync::watch;
use weir_client::{
    agent::{
        agent_reply, agent_request, applied_policy, reply_error, AgentDescription, AgentRequest,
        AgentStatus, AppliedPolicy, BucketDemand, Hello, LimitDemand, LimitShare, LimitShares,
        Outlier, Outliers, PolicyChange, ReplyError,
    },
    AckOutcome, AgentSession, Client, EventType, SessionEvent, WatchUpdate,
};
use weir_core::{
    backoff::{Backoff, Jitter},
    time::now_unix_ms,
};

use crate::{
    local::Local,
    persist::{Persister, Seed},
    view::View,
};

/// What the session is doing, for the admin API and readiness.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionState {
    /// A stream is open.
    pub connected: bool,
    /// No replica answers and the agent routes on the view it has.
    pub degraded: bool,
    /// The replica serving the stream (the last one, when not connected).
    pub replica: String,
    /// The last stream took over the node's earlier session.
    pub resumed_session: bool,
    /// A complete registry snapshot was applied: the agent can route.
    pub view_loaded: bool,
    /// The node's local instances are registered in the current session.
    pub local_registered: bool,
    /// Local instances held.
    pub local_instances: usize,
    /// Instances routed as stale after a reconnect (see `View`).
    pub stale_instances: usize,
    pub registry_revision: u64,
    pub policy_revision: u64,
    /// How each `namespace/service` policy version was acknowledged.
    pub policies: BTreeMap<String, PolicyAck>,
    /// When the state last changed between connected and not.
    pub since_unix_ms: i64,
    /// Why the last stream ended or could not open.
    pub last_error: Option<String>,
}

/// One policy version as this agent acknowledged it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PolicyAck {
    pub version: u64,
    /// When it was acknowledged.
    pub at_unix_ms: i64,
    /// The sections set in the policy that this agent does not enforce.
    pub unenforced: Vec<String>,
}

/// How a policy version is acknowledged: applied when this agent enforces
/// every section it sets, else in part, naming the sections it does not.
/// Enforced now: `load_balancer` (every algorithm, zone preference, and
/// shadow mode, which is evaluated and reported), by default and in rules
/// (matched by event type and source). Not yet: rate limits, breakers,
/// retries, timeouts and delivery, by default or in a rule (named
/// `rules`), which come with the policy stack of the next issues. See
/// [`crate::balance::policy`].
fn outcome(change: &PolicyChange) -> (AckOutcome, Vec<String>) {
    let Some(policy) = change.policy.as_ref() else {
        return (AckOutcome::Applied, Vec::new());
    };
    let unenforced: Vec<String> = crate::balance::policy::unenforced(policy)
        .into_iter()
        .map(str::to_owned)
        .collect();
    if unenforced.is_empty() {
        (AckOutcome::Applied, unenforced)
    } else {
        (AckOutcome::Partly(unenforced.clone()), unenforced)
    }
}

/// Where the session starts from and where it saves what it applies.
#[derive(Debug, Default)]
pub struct Persistence {
    /// Saves the view and policies (`--data-dir`).
    pub persister: Option<Persister>,
    /// The policies read from disk; the view was loaded from the same
    /// file ([`crate::persist::Store::restore`]).
    pub seed: Option<Seed>,
    /// The outbox's topics, for the control plane's dead-letter requests.
    pub topics: Option<std::sync::Arc<crate::outbox::topics::Topics>>,
}

/// Runs the session until the process stops. With a view loaded from
/// disk (`persistence.seed`), the agent routes on it, says it is degraded
/// until a stream opens, and resumes both streams from the saved
/// revisions.
pub async fn run(
    client: Client,
    hello: Hello,
    mut view: View,
    local: std::sync::Arc<Local>,
    state: watch::Sender<SessionState>,
    persistence: Persistence,
) {
    let mut backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(Jitter::Half);
    let connected = metrics::gauge!("weir_agent_session_connected");
    let degraded = metrics::gauge!("weir_agent_degraded");
    let Persistence {
        persister,
        mut seed,
        topics,
    } = persistence;
    // GLOBAL rate limits follow their shares, or fall back, whether a
    // stream is open or not.
    let quota = std::sync::Arc::new(std::sync::Mutex::new(Quota::default()));
    let _quota_task = {
        let (quota, routes) = (quota.clone(), view.routes().clone());
        weir_core::task::AbortOnDrop(tokio::spawn(async move {
            let mut tick = tokio::time::interval(OUTLIER_EVERY);
            loop {
                tick.tick().await;
                lock(&quota).apply(&routes);
            }
        }))
    };
    if let Some(seed) = seed.as_ref().filter(|_| view.is_loaded()) {
        degraded.set(1.0);
        state.send_modify(|s| {
            s.degraded = true;
            s.view_loaded = true;
            // A fresh process holds no local instance yet.
            s.local_registered = local.is_empty();
            s.registry_revision = view.revision();
            s.policy_revision = seed.policy_revision;
            s.policies = seed.acks.clone();
            s.since_unix_ms = now_unix_ms();
        });
    }
    let mut previous: Option<AgentSession> = None;
    loop {
        let mut resume = hello.clone();
        if view.is_loaded() {
            resume.registry_revision = view.revision();
        }
        if let Some(p) = &previous {
            resume.policy_revision = p.policy_revision();
        } else if let Some(seed) = &seed {
            resume.policy_revision = seed.policy_revision;
        }
        match client.open_session(resume).await {
            Ok(mut session) => {
                if let Some(p) = &previous {
                    session.adopt(p);
                    // Back after a disconnection: what the control plane
                    // lost meanwhile is being registered again.
                    view.begin_grace();
                } else if let Some(seed) = seed.take() {
                    // Started from disk: the same, after an outage of
                    // unknown length.
                    session.seed_policies(seed.policies);
                    view.begin_grace();
                }
                view.stream_restarted();
                backoff.reset();
                tracing::info!(
                    replica = %session.welcome().replica_id,
                    resumed = session.welcome().resumed_session,
                    registry_revision = view.revision(),
                    "node session open"
                );
                connected.set(1.0);
                degraded.set(0.0);
                state.send_modify(|s| {
                    s.connected = true;
                    s.degraded = false;
                    s.replica = session.welcome().replica_id.clone();
                    s.resumed_session = session.welcome().resumed_session;
                    s.since_unix_ms = now_unix_ms();
                });
                if !session.welcome().resumed_session && !local.is_empty() {
                    // A new lease: the records of the old one are gone.
                    let failed = local.register_all().await;
                    tracing::info!(
                        instances = local.len(),
                        failed,
                        "local instances registered in the new session"
                    );
                }
                state.send_modify(|s| {
                    s.local_registered = true;
                    s.local_instances = local.len();
                });
                let error = follow(
                    &mut session,
                    &mut view,
                    &local,
                    &state,
                    persister.as_ref(),
                    topics.as_deref(),
                    &quota,
                )
                .await;
                tracing::warn!(error = %error, "node session ended; reconnecting");
                connected.set(0.0);
                degraded.set(if view.is_loaded() { 1.0 } else { 0.0 });
                state.send_modify(|s| {
                    s.connected = false;
                    s.degraded = view.is_loaded();
                    s.since_unix_ms = now_unix_ms();
                    s.last_error = Some(error);
                });
                previous = Some(session);
            }
            Err(e) => {
                tracing::warn!(error = %e, degraded = view.is_loaded(), "no control-plane replica took the node session");
                state.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Applies what the stream brings until it ends; returns why it ended.
async fn follow(
    session: &mut AgentSession,
    view: &mut View,
    local: &Local,
    state: &watch::Sender<SessionState>,
    persister: Option<&Persister>,
    topics: Option<&crate::outbox::topics::Topics>,
    quota: &std::sync::Mutex<Quota>,
) -> String {
    let mut reported: Option<AgentStatus> = None;
    // The outliers last reported on this stream (none yet: report them,
    // even an empty set, so an earlier stream's are replaced).
    let mut outliers_reported: Option<Outliers> = None;
    let mut outlier_tick = tokio::time::interval(OUTLIER_EVERY);
    outlier_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The control plane keeps no status from an earlier stream: say it
        // at the start, then whenever it changes.
        let status = status_of(view, local);
        if reported.as_ref() != Some(&status) {
            if let Err(e) = session.report_status(status.clone()).await {
                return format!("reporting the agent's status failed: {e}");
            }
            reported = Some(status);
        }
        let expiry = view.next_expiry();
        let next = tokio::select! {
            next = session.next() => next,
            _ = outlier_tick.tick() => {
                let now = outliers_of(view.routes());
                if !outliers_reported.as_ref().is_some_and(|r| same_outliers(r, &now)) {
                    if let Err(e) = session.report_outliers(now.clone()).await {
                        return format!("reporting outliers failed: {e}");
                    }
                    outliers_reported = Some(now);
                }
                let demand = lock(quota).demand(view.routes());
                if let Some(demand) = demand {
                    if let Err(e) = session.report_demand(demand).await {
                        return format!("reporting rate limit demand failed: {e}");
                    }
                }
                continue;
            }
            () = sleep_until(expiry), if expiry.is_some() => {
                // The subscriptions saved with the view may have changed.
                if view.expire(tokio::time::Instant::now()) {
                    if let Some(p) = persister {
                        p.touch();
                    }
                }
                continue;
            }
        };
        let event = match next {
            Ok(Some(event)) => event,
            Ok(None) => return "the control plane closed the stream".to_owned(),
            Err(e) => return e.to_string(),
        };
        match event {
            SessionEvent::Registry(message) => match view.apply(message) {
                Ok(update) => {
                    if let (Some(p), Some(_)) = (persister, &update) {
                        p.touch();
                    }
                    if let Some(WatchUpdate::Changes { events, .. }) = update {
                        for e in &events {
                            if e.r#type == EventType::Delete as i32 {
                                if let Some(i) = &e.instance {
                                    local.removed_elsewhere(i);
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    // The stream disagrees with the view: start over from
                    // a snapshot rather than route on a wrong one.
                    view.forget_revision();
                    return format!("registry stream out of order ({e}); resyncing");
                }
            },
            SessionEvent::Policies(update) => {
                view.apply_policies(
                    session
                        .policies()
                        .iter()
                        .map(|(k, c)| (k, c.policy.as_ref())),
                );
                for change in &update.changes {
                    let (ack, unenforced) = outcome(change);
                    if let Err(e) = session
                        .ack(&change.namespace, &change.service, change.version, ack)
                        .await
                    {
                        return format!("acknowledging a policy failed: {e}");
                    }
                    state.send_modify(|s| {
                        let key = format!("{}/{}", change.namespace, change.service);
                        if change.policy.is_some() {
                            s.policies.insert(
                                key,
                                PolicyAck {
                                    version: change.version,
                                    at_unix_ms: now_unix_ms(),
                                    unenforced,
                                },
                            );
                        } else {
                            s.policies.remove(&key);
                        }
                    });
                }
                if let Some(p) = persister {
                    p.set_policies(session.policies(), session.policy_revision());
                }
            }
            SessionEvent::Shares(shares) => {
                let mut quota = lock(quota);
                quota.received(shares);
                quota.apply(view.routes());
            }
            SessionEvent::Request(request) => {
                let body = match &request.body {
                    Some(agent_request::Body::DeadLetters(r)) => {
                        dead_letters(topics, view.routes(), r).await
                    }
                    _ => answer(&request, view, local, &state.borrow(), session),
                };
                if let Err(e) = session.reply(request.request_id, body).await {
                    return format!("answering a request failed: {e}");
                }
            }
            _ => {}
        }
        state.send_modify(|s| {
            s.local_instances = local.len();
            s.stale_instances = view.stale();
            s.view_loaded = view.is_loaded();
            s.registry_revision = view.revision();
            s.policy_revision = session.policy_revision();
        });
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How long an allocated share of a GLOBAL rate limit holds without a
/// new one; then the agent falls back to the limit ÷ the agents it was
/// shared among.
pub const SHARE_HOLD: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's side of GLOBAL rate limits: it measures the demand on each
/// such bucket and reports it; it runs each bucket at the share the
/// control plane allocated, holds a share for [`SHARE_HOLD`] when no new
/// one comes, then falls back to limit ÷ agents (and says so). It never
/// runs more than the whole limit, and before its first share it runs the
/// whole limit.
#[derive(Debug, Default)]
struct Quota {
    /// The latest share of each bucket and when it came.
    shares: std::collections::HashMap<(String, String, String), (LimitShare, tokio::time::Instant)>,
    /// When the demand was last measured.
    measured: Option<tokio::time::Instant>,
    /// Whether the last report named any bucket.
    reported: bool,
    /// Buckets running on the fallback now (said once each).
    falling_back: std::collections::HashSet<(String, String, String)>,
}

impl Quota {
    fn received(&mut self, shares: LimitShares) {
        let now = tokio::time::Instant::now();
        for s in shares.shares {
            self.shares.insert(
                (s.namespace.clone(), s.service.clone(), s.rule.clone()),
                (s, now),
            );
        }
    }

    /// The demand on every GLOBAL bucket since the last call, to report:
    /// `None` when there is none now and none was reported last time.
    fn demand(&mut self, routes: &crate::view::Routes) -> Option<LimitDemand> {
        let now = tokio::time::Instant::now();
        let secs = self
            .measured
            .replace(now)
            .map_or(1.0, |t| now.duration_since(t).as_secs_f64().max(0.001));
        let mut buckets = Vec::new();
        for route in routes.all() {
            for l in route.limits().filter(|l| l.is_global()) {
                buckets.push(BucketDemand {
                    namespace: route.namespace.to_string(),
                    service: route.service.to_string(),
                    rule: l.rule.to_string(),
                    requests_per_second: l.take_arrivals() as f64 / secs,
                });
            }
        }
        if buckets.is_empty() && !self.reported {
            return None;
        }
        self.reported = !buckets.is_empty();
        buckets.truncate(1_000);
        Some(LimitDemand { buckets })
    }

    /// Runs every GLOBAL bucket at its share, its fallback, or (before
    /// any share) the whole limit.
    fn apply(&mut self, routes: &crate::view::Routes) {
        let now = tokio::time::Instant::now();
        for route in routes.all() {
            for l in route.limits().filter(|l| l.is_global()) {
                let key = (
                    route.namespace.to_string(),
                    route.service.to_string(),
                    l.rule.to_string(),
                );
                let share = self.shares.get(&key).map(|(s, at)| {
                    if now.duration_since(*at) <= SHARE_HOLD {
                        self.falling_back.remove(&key);
                        crate::limit::Share {
                            requests_per_second: s.requests_per_second,
                            burst: s.burst.max(1),
                            source: "allocated",
                        }
                    } else {
                        let agents = f64::from(s.agents.max(1));
                        if self.falling_back.insert(key.clone()) {
                            tracing::warn!(namespace = %key.0, service = %key.1, rule = %key.2,
                                agents = s.agents, "no rate limit share for {} s; running the limit divided by the agents it was shared among",
                                SHARE_HOLD.as_secs());
                        }
                        crate::limit::Share {
                            requests_per_second: l.spec.requests_per_second / agents,
                            burst: ((f64::from(l.spec.burst) / agents).ceil() as u32).max(1),
                            source: "fallback",
                        }
                    }
                });
                l.retune(share);
            }
        }
    }
}

/// How often the agent looks at which instances it has taken out of
/// rotation, to report them when that changed.
pub const OUTLIER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The instances this agent has taken out of its rotation now: ejected,
/// or with a breaker open or half open (not in shadow mode), in route and
/// instance order.
fn outliers_of(routes: &crate::view::Routes) -> Outliers {
    let now = now_unix_ms();
    let mut routes = routes.all();
    routes.sort_by(|a, b| (&a.namespace, &a.service).cmp(&(&b.namespace, &b.service)));
    let mut outliers = Vec::new();
    for route in &routes {
        let breakers = route.breaker.as_ref().is_some_and(|b| !b.shadow);
        let mut endpoints: Vec<_> = route.balancer.endpoints().iter().collect();
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        for e in endpoints {
            let ago = |d: std::time::Duration| now - i64::try_from(d.as_millis()).unwrap_or(0);
            let (kind, reason, since) = if let Some(d) = e.ejection.ejected_for() {
                ("ejected", "refused or reset connections".to_owned(), ago(d))
            } else if let Some((rule, b)) = tripped(route, e, breakers) {
                let of = rule.map_or(String::new(), |r| format!(" (rule {r})"));
                let why = if b.why.is_empty() {
                    format!("circuit breaker open{of}")
                } else {
                    format!("circuit breaker open{of}: {}", b.why)
                };
                (
                    "breaker",
                    why,
                    ago(std::time::Duration::from_millis(b.since_ms)),
                )
            } else {
                continue;
            };
            outliers.push(Outlier {
                namespace: route.namespace.to_string(),
                service: route.service.to_string(),
                instance_id: e.id.to_string(),
                kind: kind.to_owned(),
                reason,
                since_unix_ms: since,
            });
            if outliers.len() >= MAX_OUTLIERS {
                return Outliers { outliers };
            }
        }
    }
    Outliers { outliers }
}

/// The first breaker of `e` open or half open, not in shadow mode: the
/// service's (when `service` says it counts), else a rule's (named).
fn tripped<'r>(
    route: &'r crate::view::ServiceRoute,
    e: &crate::balance::Endpoint,
    service: bool,
) -> Option<(Option<&'r str>, crate::breaker::BreakerState)> {
    if service && e.breaker.gate.tripped() {
        return e.breaker.state().map(|b| (None, b));
    }
    route
        .rule_breakers()
        .filter(|r| !r.spec.shadow)
        .find_map(|r| {
            let cell = crate::breaker::Breakers::Rule(r).cell(e);
            cell.gate
                .tripped()
                .then(|| cell.state())
                .flatten()
                .map(|b| (Some(&*r.rule), b))
        })
}

/// Whether two reports name the same instances, kinds and reasons (the
/// times they give are read from clocks and may differ by a millisecond).
fn same_outliers(a: &Outliers, b: &Outliers) -> bool {
    a.outliers.len() == b.outliers.len()
        && a.outliers.iter().zip(&b.outliers).all(|(x, y)| {
            (&x.namespace, &x.service, &x.instance_id, &x.kind, &x.reason)
                == (&y.namespace, &y.service, &y.instance_id, &y.kind, &y.reason)
        })
}

/// The most outliers one report carries (the control plane's bound).
const MAX_OUTLIERS: usize = 10_000;

/// What the agent tells the control plane about itself.
fn status_of(view: &View, local: &Local) -> AgentStatus {
    AgentStatus {
        degraded: false,
        reason: String::new(),
        local_instances: u32::try_from(local.len()).unwrap_or(u32::MAX),
        endpoints: u32::try_from(view.endpoints()).unwrap_or(u32::MAX),
    }
}

/// The answer to a dead-letter request: the letters it matched, or the
/// agent's error (no outbox).
async fn dead_letters(
    topics: Option<&crate::outbox::topics::Topics>,
    routes: &crate::view::Routes,
    request: &weir_client::agent::DeadLettersRequest,
) -> agent_reply::Body {
    use crate::outbox::dead;
    let failed = |message: String| {
        agent_reply::Body::Error(ReplyError {
            kind: reply_error::Kind::Failed as i32,
            message: message.chars().take(1024).collect(),
        })
    };
    let Some(topics) = topics else {
        return failed("this agent has no topics".to_owned());
    };
    let filter = dead::Filter::of(
        &request.service,
        &request.topic,
        &request.r#type,
        &request.id,
    );
    match dead::act(topics, routes, request.action(), &filter).await {
        Ok(letters) => {
            agent_reply::Body::DeadLetters(weir_client::agent::DeadLettersReply { letters })
        }
        Err(why) => failed(why),
    }
}

/// The rate limit buckets and breakers of the services `request` names.
pub(crate) fn governance(
    routes: &crate::view::Routes,
    request: &weir_client::agent::GovernanceRequest,
) -> weir_client::agent::GovernanceReply {
    use weir_client::agent::{BreakerInfo, GovernanceReply, LimitInfo};
    let mut reply = GovernanceReply::default();
    let wanted = |filter: &str, value: &str| filter.is_empty() || filter == value;
    for route in routes.all() {
        if !wanted(&request.namespace, &route.namespace)
            || !wanted(&request.service, &route.service)
        {
            continue;
        }
        for l in route.limits() {
            let s = l.state();
            reply.limits.push(LimitInfo {
                namespace: route.namespace.to_string(),
                service: route.service.to_string(),
                rule: s.rule,
                requests_per_second: s.requests_per_second,
                burst: s.burst,
                scope: s.scope.to_owned(),
                on_excess: s.on_excess.to_owned(),
                shadow: s.shadow,
                tokens: s.tokens,
                admitted: s.admitted,
                queued: s.queued,
                rejected: s.rejected,
                shadow_rejected: s.shadow_rejected,
                share_requests_per_second: s.share.map_or(0.0, |x| x.requests_per_second),
                share_source: s.share.map_or("", |x| x.source).to_owned(),
            });
        }
        let sets = route
            .breaker
            .as_ref()
            .map(|spec| {
                (
                    crate::limit::SERVICE_RULE,
                    crate::breaker::Breakers::Service(spec),
                )
            })
            .into_iter()
            .chain(
                route
                    .rule_breakers()
                    .map(|r| (&*r.rule, crate::breaker::Breakers::Rule(r))),
            );
        for (rule, set) in sets {
            for e in route.balancer.endpoints() {
                let Some(b) = set.cell(e).state() else {
                    continue;
                };
                reply.breakers.push(BreakerInfo {
                    namespace: route.namespace.to_string(),
                    service: route.service.to_string(),
                    instance_id: e.id.to_string(),
                    address: e.authority.to_string(),
                    state: b.state.as_str().to_owned(),
                    since_ms: b.since_ms,
                    why: b.why,
                    capped: b.capped,
                    opens: b.opens,
                    shadow: set.spec().shadow,
                    rule: rule.to_owned(),
                });
            }
        }
    }
    reply
}

/// The answer to a request from the control plane.
fn answer(
    request: &AgentRequest,
    view: &View,
    local: &Local,
    state: &SessionState,
    session: &AgentSession,
) -> agent_reply::Body {
    match &request.body {
        Some(agent_request::Body::Describe(_)) => agent_reply::Body::Describe(AgentDescription {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            degraded: false,
            degraded_reason: String::new(),
            services: u32::try_from(view.routes().count().0).unwrap_or(u32::MAX),
            endpoints: u32::try_from(view.endpoints()).unwrap_or(u32::MAX),
            local_instances: u32::try_from(local.len()).unwrap_or(u32::MAX),
            registry_revision: view.revision(),
            policy_revision: session.policy_revision(),
            policies: state
                .policies
                .iter()
                .map(|(key, ack)| {
                    let (namespace, service) = key.split_once('/').unwrap_or(("", key));
                    AppliedPolicy {
                        namespace: namespace.to_owned(),
                        service: service.to_owned(),
                        version: ack.version,
                        outcome: if ack.unenforced.is_empty() {
                            applied_policy::Outcome::Applied
                        } else {
                            applied_policy::Outcome::Partly
                        } as i32,
                        unenforced: ack.unenforced.clone(),
                        error: String::new(),
                        at_unix_ms: ack.at_unix_ms,
                    }
                })
                .collect(),
        }),
        Some(agent_request::Body::Governance(r)) => {
            agent_reply::Body::Governance(governance(view.routes(), r))
        }
        // Answered by `dead_letters`, which awaits the outbox.
        Some(agent_request::Body::DeadLetters(_)) | None => agent_reply::Body::Error(ReplyError {
            kind: reply_error::Kind::Unsupported as i32,
            message: "this agent does not know the request".to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use weir_client::policy::{rate_limit::Scope, RateLimit, TrafficPolicy};

    use super::*;

    fn global_share(routes: &crate::view::Routes) -> Option<crate::limit::Share> {
        let route = routes.get("default", "orders").expect("a route");
        let limit = route.limits().next().expect("a bucket");
        limit.state().share
    }

    #[tokio::test(start_paused = true)]
    async fn a_share_holds_for_a_while_then_falls_back_to_the_limit_over_the_agents() {
        let routes = crate::view::test_routes(
            &[("a", 0)],
            TrafficPolicy {
                rate_limit: Some(RateLimit {
                    requests_per_second: 300.0,
                    burst: 30,
                    scope: Scope::Global as i32,
                    ..RateLimit::default()
                }),
                ..TrafficPolicy::default()
            },
        );
        let mut quota = Quota::default();
        // Before any share: the whole limit, and a demand report.
        quota.apply(&routes);
        assert_eq!(global_share(&routes), None);
        let demand = quota.demand(&routes).expect("a report");
        assert_eq!(demand.buckets.len(), 1);
        assert_eq!(demand.buckets[0].rule, "default");
        quota.received(LimitShares {
            shares: vec![LimitShare {
                namespace: "default".into(),
                service: "orders".into(),
                rule: "default".into(),
                requests_per_second: 80.0,
                burst: 8,
                agents: 4,
            }],
        });
        quota.apply(&routes);
        let allocated = crate::limit::Share {
            requests_per_second: 80.0,
            burst: 8,
            source: "allocated",
        };
        assert_eq!(global_share(&routes), Some(allocated));
        // The control plane goes quiet: the share holds ...
        tokio::time::advance(SHARE_HOLD).await;
        quota.apply(&routes);
        assert_eq!(global_share(&routes), Some(allocated));
        // ... then the agent falls back to 300 / 4, never the whole limit.
        tokio::time::advance(Duration::from_secs(1)).await;
        quota.apply(&routes);
        assert_eq!(
            global_share(&routes),
            Some(crate::limit::Share {
                requests_per_second: 75.0,
                burst: 8,
                source: "fallback",
            })
        );
    }
}
