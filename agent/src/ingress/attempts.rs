//! The attempt loop: one request, one or more attempts at the instances of
//! its service, under the policy's deadline and retry section.
//!
//! Each attempt picks an endpoint that is neither ejected nor already
//! tried by this request (failing open to an ejected one when nothing
//! else is left, and to one already tried when every one was), bounds the
//! wait for its answer by the per-try timeout and the total deadline, and
//! classes the outcome ([`Class`]). An endpoint that refused or dropped
//! the connection is ejected at once, retry or not. Another attempt
//! follows only when all of these hold:
//!
//! - the policy's `retry_on` lists the outcome;
//! - the request is safe to send again: it never reached the instance
//!   (connect failure), or it is a CloudEvent (its `id` lets a subscriber
//!   deduplicate), an idempotent method, or carries an `Idempotency-Key`;
//! - its body is in hand ([`Exchange::replayable`]);
//! - attempts are left, the backoff (exponential, full jitter) ends before
//!   the deadline, and the service's retry [`Budget`](crate::retry::Budget)
//!   has a retry left.
//!
//! Otherwise the last outcome is the answer: the instance's own answer
//! (a 503, say) passes on unchanged; a failure with no answer is the
//! agent's `502 upstream-unavailable` or `504 timeout`. A retry or timeout
//! section in shadow mode changes nothing and counts what it would have
//! done.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{forward::Failed, InFlight};
use crate::{
    balance::{any, Endpoint, Picker},
    breaker::{Breakers, Probe, Transition},
    eject::eject,
    limit::Decision as Admit,
    reject::{Reason, Rejection},
    retry::Class,
    telemetry::{self, Decision, Trace},
    view::{Handling, ServiceRoute},
};

/// One kind of request the loop can send, and send again.
pub(crate) trait Exchange {
    /// What an instance answered.
    type Answer;

    /// The class of an answer a retry may follow (5xx, 429, the gRPC
    /// statuses that map to them); `None` for an answer to pass on.
    fn judge(&self, answer: &Self::Answer) -> Option<Class>;

    /// Whether the request can be sent once more (its body is in hand).
    fn replayable(&self) -> bool;

    /// What an answer was, for the attempt's span.
    fn answered(&self, answer: &Self::Answer) -> telemetry::Answer;

    /// Sends the request (again) to `endpoint`, carrying the attempt's
    /// trace context when telemetry is on.
    fn attempt(
        &mut self,
        endpoint: &Endpoint,
        trace: Option<telemetry::Propagation>,
    ) -> impl Future<Output = Result<Self::Answer, Failed>> + Send;
}

/// What the loop needs to know of a request besides the exchange.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan<'a> {
    pub route: &'a ServiceRoute,
    pub handling: Handling<'a>,
    /// The hash of its consistent-hash key, if any.
    pub key: Option<u64>,
    /// Whether an attempt the instance may have seen can be repeated.
    pub safe: bool,
    /// A topic's delivery goes only to endpoints whose instance lists it.
    pub topic: Option<&'a str>,
}

/// The earlier of two optional instants.
fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// An endpoint for the next attempt: not ejected and not tried by this
/// request; else (every untried one is ejected) an ejected one, failing
/// open; else (every one was tried) any. With a `topic`, only endpoints
/// whose instance lists it, at every step.
fn pick<'p>(
    route: &ServiceRoute,
    picker: &'p Picker,
    breakers: Option<Breakers<'_>>,
    key: Option<u64>,
    tried: &[usize],
    topic: Option<&str>,
) -> Result<&'p Arc<Endpoint>, Rejection> {
    let elsewhere = |e: &Endpoint| topic.is_some_and(|t| !e.subscribes(t));
    let was_tried = |e: &Endpoint| elsewhere(e) || tried.contains(&(e as *const Endpoint as usize));
    if let Some(b) = breakers.filter(|_| route.all_tripped(breakers)) {
        // The service fails fast: only half-open probes go.
        return picker
            .pick(key, &|e| !b.cell(e).gate.may_probe() || was_tried(e))
            .ok_or_else(|| circuit_open(route, b));
    }
    let again: &dyn Fn(&Endpoint) -> bool = if topic.is_some() { &elsewhere } else { &any };
    let out =
        |e: &Endpoint| e.ejection.is_ejected() || breakers.is_some_and(|b| b.cell(e).gate.blocks());
    picker
        .pick(key, &|e| out(e) || was_tried(e))
        .or_else(|| picker.pick(key, &was_tried))
        .or_else(|| {
            (!tried.is_empty())
                .then(|| picker.pick(key, again))
                .flatten()
        })
        .ok_or_else(|| {
            Rejection::new(
                Reason::NoEndpoint,
                format!(
                    "service {}/{} has no usable instance ({} registered)",
                    route.namespace, route.service, route.instances
                ),
            )
        })
}

/// The answer when every breaker of `route` in `breakers` is open: when
/// the first half-open probe may go.
fn circuit_open(route: &ServiceRoute, breakers: Breakers<'_>) -> Rejection {
    let next = route
        .balancer
        .endpoints()
        .iter()
        .filter_map(|e| breakers.cell(e).gate.reopens_in())
        .min()
        .unwrap_or_default();
    let mut r = Rejection::new(
        Reason::CircuitOpen,
        format!(
            "every instance of {}/{} is failing (circuit breakers open); the next probe goes in {} ms",
            route.namespace,
            route.service,
            next.as_millis()
        ),
    );
    r.retry_after = Some(next);
    r
}

/// Feeds an attempt's outcome to its endpoint's breaker: `class` is how it
/// failed (`None`: it got an answer to pass on); `probe`, the half-open
/// place the attempt took, if any. True when the breaker opened.
fn record(
    route: &ServiceRoute,
    breakers: Breakers<'_>,
    endpoint: &Endpoint,
    class: Option<Class>,
    latency: Duration,
    probe: Option<Probe<'_>>,
) -> bool {
    let spec = breakers.spec();
    let cell = breakers.cell(endpoint);
    // A 429 is the instance pacing its callers, not failing.
    let failed = class.is_some_and(|c| c != Class::Http429);
    let Some(transition) = cell.record(spec, failed, latency, probe, || {
        route.may_exclude(Some(breakers))
    }) else {
        return false;
    };
    let opened = matches!(transition, Transition::Opened { .. });
    let rule = match breakers {
        Breakers::Service(_) => crate::limit::SERVICE_RULE,
        Breakers::Rule(r) => &r.rule,
    };
    let labels = [
        ("namespace", route.namespace.to_string()),
        ("service", route.service.to_string()),
        ("to", transition_name(&transition).to_owned()),
        ("shadow", spec.shadow.to_string()),
    ];
    metrics::counter!("weir_agent_breaker_transitions_total", &labels).increment(1);
    match transition {
        Transition::Opened { why, period } => {
            let left_in_rotation = cell.gate.tripped() && !cell.gate.excludes();
            tracing::warn!(service = %route.service, rule, instance = %endpoint.id, %why,
                open_ms = period.as_millis() as u64, shadow = spec.shadow,
                capped = left_in_rotation && !spec.shadow,
                "circuit breaker opened");
        }
        Transition::HalfOpened => {
            tracing::info!(service = %route.service, rule, instance = %endpoint.id, "circuit breaker half open: probing");
        }
        Transition::Closed => {
            tracing::info!(service = %route.service, rule, instance = %endpoint.id, "circuit breaker closed: back in rotation");
        }
    }
    opened
}

fn transition_name(t: &Transition) -> &'static str {
    match t {
        Transition::Opened { .. } => "open",
        Transition::HalfOpened => "half_open",
        Transition::Closed => "closed",
    }
}

/// The failure of an attempt cut off at `until`.
fn timed_out(endpoint: &Endpoint, waited: Duration, total: bool) -> Failed {
    let which = if total { "deadline" } else { "per-try timeout" };
    Failed {
        class: Some(Class::Timeout),
        rejection: Rejection::new(
            Reason::Timeout,
            format!(
                "instance {} at {} did not answer within the {which} ({} ms)",
                endpoint.id,
                endpoint.authority,
                waited.as_millis()
            ),
        ),
    }
}

/// Runs `exchange` for one request; see the module docs. Each attempt and
/// the governance decisions taken are noted in `trace`.
pub(crate) async fn run<E: Exchange>(
    plan: Plan<'_>,
    exchange: &mut E,
    trace: &mut Trace,
) -> Result<E::Answer, Rejection> {
    let Plan {
        route,
        handling:
            Handling {
                picker,
                failure,
                limit,
                breakers,
            },
        key,
        safe,
        topic,
    } = plan;
    // The rate limit, for requests; the outbox paces topic deliveries
    // before they come here.
    if let (Some(limit), None) = (limit, topic) {
        match limit.admit() {
            Admit::Go => {}
            Admit::Wait(wait) => {
                trace.decided(Decision::Queued);
                tokio::time::sleep(wait).await
            }
            Admit::Reject(after) => {
                trace.decided(Decision::RateLimited);
                return Err(limit.rejection(after));
            }
        }
    }
    let breaker = breakers;
    // Answers are classed for retries, and for breakers.
    let judged = failure.retry.is_some() || breaker.is_some();
    let start = (!failure.is_none()).then(Instant::now);
    let deadline = start.zip(failure.total()).map(|(s, t)| s + t);
    let budget = failure.budget_percent();
    if let (Some(start), Some(_)) = (start, budget) {
        route.budget.request(start);
    }
    // Endpoints this request tried, by address; no allocation unless a
    // retry happens.
    let mut tried: Vec<usize> = Vec::new();
    let mut backoff = None;
    let mut attempt = 0u32;
    let result = loop {
        attempt += 1;
        let endpoint = pick(route, picker, breakers, key, &tried, topic).inspect_err(|r| {
            if r.reason == Reason::CircuitOpen {
                trace.decided(Decision::CircuitOpen);
            }
        })?;
        let context = trace.attempt(&endpoint.id, endpoint.authority.as_str());
        if attempt == 1 {
            route.requests.increment(1);
        }
        let probe = breaker.and_then(|b| b.cell(endpoint).gate.picked());
        let (result, sent_at) = {
            let _in_flight = InFlight::new(endpoint);
            // Only peak EWMA routes, routes with a deadline and routes
            // with a breaker read the clock per attempt.
            let sent =
                (picker.observes() || start.is_some() || breaker.is_some()).then(Instant::now);
            let per_try = sent.zip(failure.per_try()).map(|(s, p)| s + p);
            let result = match (sent, earliest(deadline, per_try)) {
                (Some(sent), Some(until)) => {
                    match tokio::time::timeout_at(until, exchange.attempt(endpoint, context)).await
                    {
                        Ok(r) => r,
                        Err(_) => Err(timed_out(endpoint, until - sent, Some(until) == deadline)),
                    }
                }
                _ => exchange.attempt(endpoint, context).await,
            };
            if let (Ok(_), Some(sent)) = (&result, sent) {
                // The answer came: the latency peak EWMA weighs.
                picker.observe(endpoint, sent.elapsed());
            }
            (result, sent)
        };
        let class = match &result {
            Ok(answer) if judged => exchange.judge(answer),
            Ok(_) => None,
            Err(f) => {
                route.upstream_errors.increment(1);
                f.class
            }
        };
        if trace.is_on() {
            trace.attempted(match &result {
                Ok(answer) => exchange.answered(answer),
                Err(f) => telemetry::Answer::Failed(f.class.map_or("cancelled", Class::as_str)),
            });
        }
        if let (Some(b), Some(sent)) = (breaker, sent_at) {
            // Not the instance's doing (the caller's body broke off, say):
            // nothing to hold against it.
            if !matches!(&result, Err(f) if f.class.is_none())
                && record(route, b, endpoint, class, sent.elapsed(), probe)
            {
                trace.decided(Decision::BreakerOpened);
            }
        }
        let Some(class) = class else {
            break result;
        };
        // Under a breaker, ejection also keeps to max_ejection_percent.
        if class.ejects() && route.may_exclude(breakers) {
            eject(endpoint, class, &route.failures.ejection);
            trace.decided(Decision::Ejected);
        }
        if !failure.retries(class) || !(class.never_sent() || safe) {
            break result;
        }
        if failure.retry_shadow() {
            route.failures.shadow_retries.increment(1);
            break result;
        }
        if attempt >= failure.attempts() || !exchange.replayable() {
            break result;
        }
        let Some(backoff) = backoff.get_or_insert_with(|| failure.backoff()) else {
            break result;
        };
        let delay = backoff.next_delay();
        let now = Instant::now();
        if deadline.is_some_and(|d| now + delay >= d) {
            break result;
        }
        if !route.budget.try_retry(now, budget.unwrap_or(0.0)) {
            route.failures.budget_exhausted.increment(1);
            break result;
        }
        route.failures.retried(class);
        trace.decided(Decision::Retried);
        tracing::debug!(service = %route.service, instance = %endpoint.id, on = class.as_str(),
            attempt, ?delay, "retrying on another instance");
        tried.push(Arc::as_ptr(endpoint) as usize);
        // The failed answer (and its connection) goes before the wait.
        drop(result);
        tokio::time::sleep(delay).await;
    };
    if let (Some(start), Some(total)) = (start, failure.shadow_total()) {
        if start.elapsed() > total {
            route.failures.shadow_timeouts.increment(1);
        }
    }
    result.map_err(|f| {
        if f.rejection.reason == Reason::Timeout {
            route.failures.timeouts.increment(1);
        }
        f.rejection
    })
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use weir_client::policy::{Retry, Timeout, TrafficPolicy};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// The loop, untraced.
    async fn run<E: Exchange>(plan: Plan<'_>, exchange: &mut E) -> Result<E::Answer, Rejection> {
        super::run(plan, exchange, &mut Trace::off()).await
    }

    /// `orders` with instances a, b and c, under `policy`.
    fn route(policy: TrafficPolicy) -> Arc<ServiceRoute> {
        crate::view::test_route(&[("a", 0), ("b", 0), ("c", 0)], policy)
    }

    fn retry(attempts: u32) -> Option<Retry> {
        Some(Retry {
            attempts,
            backoff_base_ms: 100,
            backoff_max_ms: 1000,
            ..Retry::default()
        })
    }

    /// What a scripted attempt does.
    #[derive(Clone, Copy, Debug)]
    enum Step {
        Answer(u16),
        Fail(Class),
        /// Answers 200 after this long.
        Slow(Duration),
    }

    /// An exchange playing a script, noting who was tried when.
    struct Script {
        steps: VecDeque<Step>,
        tried: Vec<(String, Instant)>,
    }

    impl Script {
        fn new(steps: &[Step]) -> Self {
            Self {
                steps: steps.iter().copied().collect(),
                tried: Vec::new(),
            }
        }

        fn ids(&self) -> Vec<&str> {
            self.tried.iter().map(|(id, _)| id.as_str()).collect()
        }
    }

    impl Exchange for Script {
        type Answer = u16;

        fn judge(&self, status: &u16) -> Option<Class> {
            (*status >= 500).then_some(Class::Http5xx)
        }

        fn replayable(&self) -> bool {
            true
        }

        fn answered(&self, status: &u16) -> telemetry::Answer {
            telemetry::Answer::Http(*status)
        }

        fn attempt(
            &mut self,
            endpoint: &Endpoint,
            _trace: Option<telemetry::Propagation>,
        ) -> impl Future<Output = Result<u16, Failed>> + Send {
            self.tried.push((endpoint.id.to_string(), Instant::now()));
            let step = self.steps.pop_front().unwrap_or(Step::Answer(200));
            async move {
                match step {
                    Step::Answer(status) => Ok(status),
                    Step::Fail(class) => Err(Failed {
                        class: Some(class),
                        rejection: Rejection::new(Reason::UpstreamUnavailable, "scripted"),
                    }),
                    Step::Slow(d) => {
                        tokio::time::sleep(d).await;
                        Ok(200)
                    }
                }
            }
        }
    }

    fn plan(route: &ServiceRoute, safe: bool) -> Plan<'_> {
        Plan {
            route,
            handling: route.default_handling(),
            key: None,
            safe,
            topic: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_go_to_other_instances_after_a_jittered_backoff() {
        let route = route(TrafficPolicy {
            retry: retry(3),
            ..TrafficPolicy::default()
        });
        let mut script = Script::new(&[Step::Answer(503); 5]);
        let answer = run(plan(&route, true), &mut script).await;
        assert_eq!(answer, Ok(503), "the last answer passes on");
        let mut ids = script.ids();
        assert_eq!(ids.len(), 3, "attempts are bounded");
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3, "each attempt on another instance");
        // Full jitter: the n-th wait is in [0, 100 ms × 2^(n-1)].
        for (n, pair) in script.tried.windows(2).enumerate() {
            let gap = pair[1].1 - pair[0].1;
            assert!(gap <= 100 * MS * (1 << n), "wait {n}: {gap:?}");
        }
        // A success ends it.
        let mut script = Script::new(&[Step::Answer(503), Step::Answer(200)]);
        assert_eq!(run(plan(&route, true), &mut script).await, Ok(200));
        assert_eq!(script.tried.len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn what_was_sent_is_retried_only_when_safe_and_listed() {
        let route = route(TrafficPolicy {
            retry: Some(Retry {
                retry_on: vec![
                    weir_client::policy::RetryOn::ConnectFailure as i32,
                    weir_client::policy::RetryOn::Http5xx as i32,
                ],
                ..retry(3).expect("some")
            }),
            ..TrafficPolicy::default()
        });
        // Not safe (a POST that is no CloudEvent): a 503 is final, a
        // connect failure (never sent) is not.
        let mut script = Script::new(&[Step::Answer(503)]);
        assert_eq!(run(plan(&route, false), &mut script).await, Ok(503));
        assert_eq!(script.tried.len(), 1);
        let mut script = Script::new(&[Step::Fail(Class::ConnectFailure)]);
        assert_eq!(run(plan(&route, false), &mut script).await, Ok(200));
        assert_eq!(script.tried.len(), 2);
        // RESET is not listed: final, even when safe.
        let mut script = Script::new(&[Step::Fail(Class::Reset)]);
        let answer = run(plan(&route, true), &mut script).await;
        assert_eq!(
            answer.map_err(|r| r.reason),
            Err(Reason::UpstreamUnavailable)
        );
        assert_eq!(script.tried.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_cut_attempts_and_the_whole_request() {
        let route = route(TrafficPolicy {
            retry: Some(Retry {
                per_try_timeout_ms: 100,
                backoff_base_ms: 1,
                ..retry(5).expect("some")
            }),
            timeout: Some(Timeout {
                total_ms: 250,
                shadow: false,
            }),
            ..TrafficPolicy::default()
        });
        let start = Instant::now();
        let mut script = Script::new(&[Step::Slow(Duration::from_secs(10)); 5]);
        let answer = run(plan(&route, true), &mut script).await;
        let rejection = answer.expect_err("no answer in time");
        assert_eq!(rejection.reason, Reason::Timeout);
        assert!(start.elapsed() <= 250 * MS, "{:?}", start.elapsed());
        assert_eq!(script.tried.len(), 3, "100 + 100 + what is left of 250");
        // A slow first try, a quick second.
        let mut script = Script::new(&[Step::Slow(Duration::from_secs(1)), Step::Answer(200)]);
        assert_eq!(run(plan(&route, true), &mut script).await, Ok(200));
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_sections_change_nothing() {
        let route = route(TrafficPolicy {
            retry: Some(Retry {
                shadow: true,
                ..retry(3).expect("some")
            }),
            timeout: Some(Timeout {
                total_ms: 10,
                shadow: true,
            }),
            ..TrafficPolicy::default()
        });
        let mut script = Script::new(&[Step::Answer(503)]);
        assert_eq!(run(plan(&route, true), &mut script).await, Ok(503));
        assert_eq!(script.tried.len(), 1, "not retried");
        let mut script = Script::new(&[Step::Slow(Duration::from_secs(1))]);
        assert_eq!(
            run(plan(&route, true), &mut script).await,
            Ok(200),
            "not cut"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn refused_instances_are_ejected_and_skipped_until_none_is_left() {
        // No retry section: ejection happens all the same.
        let route = route(TrafficPolicy::default());
        let mut script = Script::new(&[Step::Fail(Class::ConnectFailure)]);
        assert!(run(plan(&route, true), &mut script).await.is_err());
        let ejected = script.tried[0].0.clone();
        let mut script = Script::new(&[]);
        for _ in 0..10 {
            run(plan(&route, true), &mut script)
                .await
                .expect("answered");
        }
        assert!(
            !script.ids().contains(&ejected.as_str()),
            "{:?}",
            script.ids()
        );
        // Every instance ejected: picks fail open rather than refuse.
        for _ in 0..2 {
            let mut script = Script::new(&[Step::Fail(Class::Reset)]);
            let _ = run(plan(&route, true), &mut script).await;
        }
        assert!(route
            .balancer
            .endpoints()
            .iter()
            .all(|e| e.ejection.is_ejected()));
        let mut script = Script::new(&[]);
        assert_eq!(run(plan(&route, true), &mut script).await, Ok(200));
    }

    /// An exchange whose instances answer as the test says: 500 from
    /// those in `failing`, 200 after `slow` from those in `slowed`, else
    /// 200 at once.
    #[derive(Default)]
    struct Fleet {
        failing: Vec<&'static str>,
        slowed: Vec<&'static str>,
        slow: Duration,
        tried: Vec<String>,
    }

    impl Exchange for Fleet {
        type Answer = u16;

        fn judge(&self, status: &u16) -> Option<Class> {
            (*status >= 500).then_some(Class::Http5xx)
        }

        fn replayable(&self) -> bool {
            true
        }

        fn answered(&self, status: &u16) -> telemetry::Answer {
            telemetry::Answer::Http(*status)
        }

        fn attempt(
            &mut self,
            endpoint: &Endpoint,
            _trace: Option<telemetry::Propagation>,
        ) -> impl Future<Output = Result<u16, Failed>> + Send {
            self.tried.push(endpoint.id.to_string());
            let fails = self.failing.contains(&&*endpoint.id);
            let delay = if self.slowed.contains(&&*endpoint.id) {
                self.slow
            } else {
                Duration::ZERO
            };
            async move {
                tokio::time::sleep(delay).await;
                Ok(if fails { 500 } else { 200 })
            }
        }
    }

    fn breaker(cb: weir_client::policy::CircuitBreaker) -> Arc<ServiceRoute> {
        route(TrafficPolicy {
            circuit_breaker: Some(cb),
            ..TrafficPolicy::default()
        })
    }

    fn tripped(route: &ServiceRoute) -> Vec<&str> {
        let endpoints = route.balancer.endpoints();
        endpoints
            .iter()
            .filter(|e| e.breaker.gate.tripped())
            .map(|e| &*e.id)
            .collect()
    }

    async fn send(
        route: &ServiceRoute,
        fleet: &mut Fleet,
        n: usize,
    ) -> Vec<Result<u16, Rejection>> {
        let mut answers = Vec::new();
        for _ in 0..n {
            answers.push(run(plan(route, true), fleet).await);
        }
        answers
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_instance_is_broken_off_and_probed_back() {
        let route = breaker(weir_client::policy::CircuitBreaker {
            consecutive_failures: 3,
            open_ms: 1_000,
            half_open_probes: 2,
            ..Default::default()
        });
        let mut fleet = Fleet {
            failing: vec!["b"],
            ..Fleet::default()
        };
        send(&route, &mut fleet, 9).await;
        assert_eq!(tripped(&route), ["b"]);
        fleet.tried.clear();
        let answers = send(&route, &mut fleet, 20).await;
        assert!(answers.iter().all(|a| *a == Ok(200)), "{answers:?}");
        assert!(!fleet.tried.iter().any(|id| id == "b"), "{:?}", fleet.tried);
        // b recovers; after the open period, two probes close its breaker.
        fleet.failing.clear();
        tokio::time::advance(Duration::from_secs(1)).await;
        fleet.tried.clear();
        send(&route, &mut fleet, 12).await;
        assert!(tripped(&route).is_empty());
        let to_b = fleet.tried.iter().filter(|id| *id == "b").count();
        assert!(to_b >= 3, "b back in rotation: {:?}", fleet.tried);
        let state = route.balancer.endpoints()[1]
            .breaker
            .state()
            .expect("b's breaker");
        assert_eq!(
            (state.state, state.opens),
            (crate::breaker::State::Closed, 1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rules_own_breakers_act_on_its_events_only() {
        use weir_client::policy::{CircuitBreaker, EventMatch, Rule};
        let route = route(TrafficPolicy {
            rules: vec![Rule {
                name: "payments".into(),
                r#match: Some(EventMatch {
                    type_prefix: "com.shop.payment.".into(),
                    ..EventMatch::default()
                }),
                circuit_breaker: Some(CircuitBreaker {
                    consecutive_failures: 2,
                    ..Default::default()
                }),
                ..Rule::default()
            }],
            ..TrafficPolicy::default()
        });
        let payments = route.handling_for("com.shop.payment.charge", "/s");
        assert!(matches!(payments.breakers, Some(Breakers::Rule(_))));
        assert!(route.default_handling().breakers.is_none());
        let plan_for = |handling| Plan {
            route: &route,
            handling,
            key: None,
            safe: true,
            topic: None,
        };
        let mut fleet = Fleet {
            failing: vec!["b"],
            ..Fleet::default()
        };
        for _ in 0..9 {
            let _ = run(plan_for(payments), &mut fleet).await;
        }
        // b's breaker for payments opened; its own (the service's) did not.
        let b = &route.balancer.endpoints()[1];
        assert!(payments.breakers.expect("rule").cell(b).gate.tripped());
        assert!(!b.breaker.gate.tripped());
        fleet.tried.clear();
        for _ in 0..9 {
            let _ = run(plan_for(payments), &mut fleet).await;
        }
        assert!(!fleet.tried.iter().any(|id| id == "b"), "{:?}", fleet.tried);
        // Other events still go to b.
        fleet.tried.clear();
        fleet.failing.clear();
        for _ in 0..9 {
            let _ = run(plan_for(route.default_handling()), &mut fleet).await;
        }
        assert_eq!(fleet.tried.iter().filter(|id| *id == "b").count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_instance_is_broken_off_by_the_slow_call_ratio() {
        let route = breaker(weir_client::policy::CircuitBreaker {
            slow_call_ms: 100,
            slow_call_ratio: 0.5,
            minimum_requests: 4,
            window_ms: 2_000,
            ..Default::default()
        });
        let mut fleet = Fleet {
            slowed: vec!["c"],
            slow: Duration::from_millis(300),
            ..Fleet::default()
        };
        // c takes every third call, each slow; with the first four calls
        // (two of them c's) it opens.
        send(&route, &mut fleet, 12).await;
        assert_eq!(tripped(&route), ["c"]);
        fleet.tried.clear();
        send(&route, &mut fleet, 10).await;
        assert!(!fleet.tried.iter().any(|id| id == "c"), "{:?}", fleet.tried);
    }

    #[tokio::test(start_paused = true)]
    async fn all_failing_no_more_than_the_cap_leaves_and_the_service_fails_fast() {
        let route = breaker(weir_client::policy::CircuitBreaker {
            consecutive_failures: 2,
            open_ms: 1_000,
            half_open_probes: 1,
            // Of 3 instances, 1 may leave the rotation.
            max_ejection_percent: 50,
            ..Default::default()
        });
        let mut fleet = Fleet {
            failing: vec!["a", "b", "c"],
            ..Fleet::default()
        };
        let answers = send(&route, &mut fleet, 12).await;
        assert_eq!(tripped(&route).len(), 3, "every breaker opened");
        let excluded = route
            .balancer
            .endpoints()
            .iter()
            .filter(|e| e.breaker.gate.excludes())
            .count();
        assert_eq!(excluded, 1, "the cap holds");
        let failed_fast = answers
            .iter()
            .filter(|a| a.as_ref().is_err_and(|r| r.reason == Reason::CircuitOpen))
            .count();
        assert!(failed_fast > 0, "{answers:?}");
        // From then on, nothing is sent: 503 at once, saying when to try.
        fleet.tried.clear();
        let answer = run(plan(&route, true), &mut fleet).await;
        let rejection = answer.expect_err("fails fast");
        assert_eq!(rejection.reason, Reason::CircuitOpen);
        assert!(rejection
            .retry_after
            .is_some_and(|d| d <= Duration::from_secs(1)));
        assert!(fleet.tried.is_empty());
        // The period passes and the service is back: a probe per instance
        // goes, succeeds, and traffic flows.
        fleet.failing.clear();
        tokio::time::advance(Duration::from_secs(1)).await;
        let answers = send(&route, &mut fleet, 6).await;
        assert!(answers.iter().all(|a| *a == Ok(200)), "{answers:?}");
        assert!(tripped(&route).is_empty());
    }
}
