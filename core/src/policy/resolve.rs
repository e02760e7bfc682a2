//! A stored [`TrafficPolicy`] resolved into what an agent enforces: typed
//! settings (durations, Rust enums without "unspecified"), every documented
//! default applied from the same `DEFAULT_*` constants that
//! [`super::validate`] quotes in its errors, and each rule's sections
//! merged with the policy's defaults (a rule's section replaces the
//! default section as a whole, as `policy.proto` says).
//!
//! [`resolve`] expects a policy that passed [`super::validate::policy`]. It
//! never panics on one that did not: an unknown enum value takes its
//! default, a number out of bounds is clamped into them, and a rate limit
//! without a positive rate (or a consistent hash without a key) is treated
//! as absent.
//!
//! [`TrafficPolicy`]: pb::TrafficPolicy

use std::time::Duration;

use weir_proto::policy::v1 as pb;

use super::validate::{
    DEFAULT_BACKOFF_BASE_MS, DEFAULT_BACKOFF_MAX_MS, DEFAULT_BUDGET_PERCENT, DEFAULT_CHOICES,
    DEFAULT_DELIVERY_ATTEMPTS, DEFAULT_EWMA_DECAY_MS, DEFAULT_HALF_OPEN_PROBES,
    DEFAULT_MAX_AGE_SECONDS, DEFAULT_MAX_EJECTION_PERCENT, DEFAULT_MAX_OPEN_MS,
    DEFAULT_MINIMUM_REQUESTS, DEFAULT_OPEN_MS, DEFAULT_RETRY_ATTEMPTS, DEFAULT_WINDOW_MS,
    DEFAULT_ZONE_PERCENT, MAX_AGE_SECONDS, MAX_BACKOFF_BASE_MS, MAX_BACKOFF_MAX_MS,
    MAX_BUDGET_PERCENT, MAX_BURST, MAX_CHOICES, MAX_CONSECUTIVE_FAILURES, MAX_DELIVERY_ATTEMPTS,
    MAX_EJECTION_PERCENT, MAX_EWMA_DECAY_MS, MAX_HALF_OPEN_PROBES, MAX_MINIMUM_REQUESTS,
    MAX_OPEN_MS, MAX_PER_TRY_TIMEOUT_MS, MAX_QUEUE_WAIT_MS, MAX_REQUESTS_PER_SECOND,
    MAX_RETRY_ATTEMPTS, MAX_SLOW_CALL_MS, MAX_TOTAL_MS, MAX_WINDOW_MS, MAX_ZONE_PERCENT,
    MIN_CHOICES, MIN_EWMA_DECAY_MS, MIN_OPEN_MS, MIN_WINDOW_MS,
};
use crate::backoff::{Backoff, Jitter};

/// Outcomes retried when a retry section lists none.
pub const DEFAULT_RETRY_ON: [RetryOn; 4] = [
    RetryOn::ConnectFailure,
    RetryOn::Http5xx,
    RetryOn::Timeout,
    RetryOn::Reset,
];

/// A policy as the agent enforces it.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPolicy {
    pub namespace: String,
    pub service: String,
    /// What an event that matches no rule gets.
    pub defaults: Sections,
    /// In the policy's order: the first that matches an event wins.
    pub rules: Vec<ResolvedRule>,
}

impl ResolvedPolicy {
    /// The settings for an event of CloudEvents `event_type` from `source`:
    /// the first matching rule's, or the defaults.
    pub fn sections_for(&self, event_type: &str, source: &str) -> &Sections {
        self.rules
            .iter()
            .find(|r| r.matcher.matches(event_type, source))
            .map_or(&self.defaults, |r| &r.sections)
    }
}

/// A rule with its sections merged with the policy's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedRule {
    pub name: String,
    pub matcher: EventMatcher,
    pub sections: Sections,
}

/// Which events a rule applies to (CloudEvents `type` and `source`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMatcher {
    pub event_type: TypeMatch,
    /// `None`: any source.
    pub source: Option<String>,
}

impl EventMatcher {
    pub fn matches(&self, event_type: &str, source: &str) -> bool {
        let type_ok = match &self.event_type {
            TypeMatch::Any => true,
            TypeMatch::Exact(t) => event_type == t,
            TypeMatch::Prefix(p) => event_type.starts_with(p.as_str()),
        };
        type_ok && self.source.as_deref().is_none_or(|s| s == source)
    }
}

/// How a rule matches the event type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TypeMatch {
    Any,
    Exact(String),
    Prefix(String),
}

/// Every setting of one scope (the defaults, or a rule). The load balancer
/// always has a value (round robin when absent); the other sections are
/// `None` when absent, which means "off" as documented on each.
#[derive(Clone, Debug, PartialEq)]
pub struct Sections {
    pub load_balancer: LoadBalancer,
    /// `None`: no limit.
    pub rate_limit: Option<RateLimit>,
    /// `None`: no breaker, no ejection.
    pub circuit_breaker: Option<CircuitBreaker>,
    /// `None`: no retries.
    pub retry: Option<Retry>,
    /// `None`: no deadline beyond the caller's.
    pub timeout: Option<Timeout>,
    /// `None`: best effort, no outbox.
    pub delivery: Option<Delivery>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadBalancer {
    pub algorithm: Algorithm,
    /// Prefer the agent's own zone while it holds at least this percentage
    /// (1-100) of the usable instances; `None`: no zone preference.
    pub zone_min_percent: Option<u32>,
    pub shadow: bool,
}

impl Default for LoadBalancer {
    /// Round robin, as an absent section means.
    fn default() -> Self {
        Self {
            algorithm: Algorithm::RoundRobin,
            zone_min_percent: None,
            shadow: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    /// By instance weight.
    WeightedRoundRobin,
    /// Power of `choices` choices.
    LeastRequest {
        choices: u32,
    },
    PeakEwma {
        decay: Duration,
    },
    ConsistentHash {
        key: HashKey,
    },
}

/// What a consistent hash hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// An HTTP header / gRPC metadata entry (lowercase name).
    Header(String),
    /// The CloudEvents `subject`.
    Subject,
    /// The CloudEvents `partitionkey` extension.
    PartitionKey,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained rate, events per second.
    pub requests_per_second: f64,
    /// Bucket size (default: the rate rounded up).
    pub burst: u32,
    pub scope: Scope,
    pub on_excess: OnExcess,
    pub shadow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    PerAgent,
    /// Across all agents (enforced per agent at the whole rate until the
    /// control plane allocates shares).
    Global,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExcess {
    /// 429 with Retry-After.
    Reject,
    /// Wait up to `max_wait`, then 429.
    Queue { max_wait: Duration },
}

#[derive(Clone, Debug, PartialEq)]
pub struct CircuitBreaker {
    /// Open after this many failures in a row; `None`: off.
    pub consecutive_failures: Option<u32>,
    /// Open when failures / requests over `window` reach this, once
    /// `minimum_requests` were seen; `None`: off.
    pub failure_ratio: Option<f64>,
    pub window: Duration,
    pub minimum_requests: u32,
    /// `None`: slow calls are not counted.
    pub slow_call: Option<SlowCall>,
    /// First open period; doubles on each re-open up to `max_open`.
    pub open: Duration,
    pub max_open: Duration,
    /// Probes let through while half open.
    pub half_open_probes: u32,
    /// Never eject more than this share of a service's instances.
    pub max_ejection_percent: u32,
    pub shadow: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowCall {
    /// A call slower than this is slow ...
    pub threshold: Duration,
    /// ... and the breaker opens when this share of calls is slow.
    pub ratio: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Retry {
    /// Total attempts, the first included.
    pub attempts: u32,
    /// Bound on each attempt; `None`: only the total timeout.
    pub per_try_timeout: Option<Duration>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Never empty (default [`DEFAULT_RETRY_ON`]); no duplicates.
    pub retry_on: Vec<RetryOn>,
    /// Retries allowed as a share of requests, percent.
    pub budget_percent: f64,
    pub shadow: bool,
}

impl Retry {
    /// The backoff between attempts: base × 2^n with full jitter, capped.
    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_base, self.backoff_max).with_jitter(Jitter::Full)
    }
}

/// Outcomes a retry may follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryOn {
    ConnectFailure,
    Http5xx,
    Http429,
    Timeout,
    /// Reset or closed after the request was sent.
    Reset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeout {
    /// Deadline of a delivery, retries included.
    pub total: Duration,
    pub shadow: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub durable_outbox: bool,
    pub max_age: Duration,
    pub max_attempts: u32,
    pub dead_letter: bool,
    /// In publish order per CloudEvents `partitionkey`.
    pub ordered: bool,
    /// Where compensation events go; `None`: none.
    pub compensation_topic: Option<String>,
    pub shadow: bool,
}

/// Resolves `p`; see the module docs.
pub fn resolve(p: &pb::TrafficPolicy) -> ResolvedPolicy {
    let defaults = Sections {
        load_balancer: p
            .load_balancer
            .as_ref()
            .map(load_balancer)
            .unwrap_or_default(),
        rate_limit: p.rate_limit.as_ref().and_then(rate_limit),
        circuit_breaker: p.circuit_breaker.as_ref().map(circuit_breaker),
        retry: p.retry.as_ref().map(retry),
        timeout: p.timeout.as_ref().map(timeout),
        delivery: p.delivery.as_ref().map(delivery),
    };
    let rules = p
        .rules
        .iter()
        .map(|r| ResolvedRule {
            name: r.name.clone(),
            matcher: r.r#match.as_ref().map_or(
                EventMatcher {
                    event_type: TypeMatch::Any,
                    source: None,
                },
                event_match,
            ),
            sections: Sections {
                load_balancer: r
                    .load_balancer
                    .as_ref()
                    .map_or_else(|| defaults.load_balancer.clone(), load_balancer),
                rate_limit: match &r.rate_limit {
                    Some(rl) => rate_limit(rl),
                    None => defaults.rate_limit.clone(),
                },
                circuit_breaker: r.circuit_breaker.as_ref().map_or_else(
                    || defaults.circuit_breaker.clone(),
                    |c| Some(circuit_breaker(c)),
                ),
                retry: r
                    .retry
                    .as_ref()
                    .map_or_else(|| defaults.retry.clone(), |x| Some(retry(x))),
                timeout: r
                    .timeout
                    .as_ref()
                    .map_or(defaults.timeout, |t| Some(timeout(t))),
                delivery: r
                    .delivery
                    .as_ref()
                    .map_or_else(|| defaults.delivery.clone(), |d| Some(delivery(d))),
            },
        })
        .collect();
    ResolvedPolicy {
        namespace: p.namespace.clone(),
        service: p.service.clone(),
        defaults,
        rules,
    }
}

/// `value` in milliseconds, or `default` ms when 0, clamped to `min..=max`.
fn ms_or(value: u32, default: u32, min: u32, max: u32) -> Duration {
    let v = if value == 0 { default } else { value };
    Duration::from_millis(u64::from(v.clamp(min, max)))
}

/// `value`, or `default` when 0, clamped to `1..=max`.
fn count_or(value: u32, default: u32, max: u32) -> u32 {
    if value == 0 { default } else { value }.clamp(1, max)
}

fn event_match(m: &pb::EventMatch) -> EventMatcher {
    let event_type = if !m.type_exact.is_empty() {
        TypeMatch::Exact(m.type_exact.clone())
    } else if !m.type_prefix.is_empty() {
        TypeMatch::Prefix(m.type_prefix.clone())
    } else {
        TypeMatch::Any
    };
    EventMatcher {
        event_type,
        source: (!m.source.is_empty()).then(|| m.source.clone()),
    }
}

fn load_balancer(lb: &pb::LoadBalancer) -> LoadBalancer {
    use pb::load_balancer::Algorithm as A;
    let algorithm = match A::try_from(lb.algorithm).unwrap_or(A::Unspecified) {
        A::Unspecified | A::RoundRobin => Algorithm::RoundRobin,
        A::WeightedRoundRobin => Algorithm::WeightedRoundRobin,
        A::LeastRequest => Algorithm::LeastRequest {
            choices: if lb.choices == 0 {
                DEFAULT_CHOICES
            } else {
                lb.choices
            }
            .clamp(MIN_CHOICES, MAX_CHOICES),
        },
        A::PeakEwma => Algorithm::PeakEwma {
            decay: ms_or(
                lb.ewma_decay_ms,
                DEFAULT_EWMA_DECAY_MS,
                MIN_EWMA_DECAY_MS,
                MAX_EWMA_DECAY_MS,
            ),
        },
        A::ConsistentHash => match lb.consistent_hash.as_ref().and_then(hash_key) {
            Some(key) => Algorithm::ConsistentHash { key },
            None => Algorithm::RoundRobin,
        },
    };
    LoadBalancer {
        algorithm,
        zone_min_percent: lb.zone_preference.as_ref().filter(|z| z.enabled).map(|z| {
            match z.min_usable_percent {
                0 => DEFAULT_ZONE_PERCENT,
                p => p.min(MAX_ZONE_PERCENT),
            }
        }),
        shadow: lb.shadow,
    }
}

fn hash_key(ch: &pb::ConsistentHash) -> Option<HashKey> {
    use pb::consistent_hash::Key;
    match Key::try_from(ch.key).ok()? {
        Key::Unspecified => None,
        Key::Header if ch.header.is_empty() => None,
        Key::Header => Some(HashKey::Header(ch.header.clone())),
        Key::Subject => Some(HashKey::Subject),
        Key::PartitionKey => Some(HashKey::PartitionKey),
    }
}

fn rate_limit(rl: &pb::RateLimit) -> Option<RateLimit> {
    use pb::rate_limit::{OnExcess as E, Scope as S};
    let rate = rl.requests_per_second;
    if !(rate.is_finite() && rate > 0.0) {
        return None;
    }
    let rate = rate.min(MAX_REQUESTS_PER_SECOND);
    let burst = if rl.burst == 0 {
        // At most MAX_REQUESTS_PER_SECOND, so the cast cannot truncate.
        rate.ceil() as u32
    } else {
        rl.burst
    };
    Some(RateLimit {
        requests_per_second: rate,
        burst: burst.clamp(1, MAX_BURST),
        scope: match S::try_from(rl.scope).unwrap_or(S::Unspecified) {
            S::Unspecified | S::PerAgent => Scope::PerAgent,
            S::Global => Scope::Global,
        },
        on_excess: match E::try_from(rl.on_excess).unwrap_or(E::Unspecified) {
            E::Unspecified | E::Reject => OnExcess::Reject,
            E::Queue => OnExcess::Queue {
                max_wait: Duration::from_millis(u64::from(
                    rl.max_queue_wait_ms.clamp(1, MAX_QUEUE_WAIT_MS),
                )),
            },
        },
        shadow: rl.shadow,
    })
}

/// In (0, 1], or `None` (off) for 0 and anything not a number.
fn ratio(value: f64) -> Option<f64> {
    (value.is_finite() && value > 0.0).then(|| value.min(1.0))
}

fn circuit_breaker(cb: &pb::CircuitBreaker) -> CircuitBreaker {
    let open = ms_or(cb.open_ms, DEFAULT_OPEN_MS, MIN_OPEN_MS, MAX_OPEN_MS);
    let max_open = ms_or(
        cb.max_open_ms,
        DEFAULT_MAX_OPEN_MS,
        MIN_OPEN_MS,
        MAX_OPEN_MS,
    )
    .max(open);
    CircuitBreaker {
        consecutive_failures: (cb.consecutive_failures != 0)
            .then(|| cb.consecutive_failures.min(MAX_CONSECUTIVE_FAILURES)),
        failure_ratio: ratio(cb.failure_ratio),
        window: ms_or(
            cb.window_ms,
            DEFAULT_WINDOW_MS,
            MIN_WINDOW_MS,
            MAX_WINDOW_MS,
        ),
        minimum_requests: count_or(
            cb.minimum_requests,
            DEFAULT_MINIMUM_REQUESTS,
            MAX_MINIMUM_REQUESTS,
        ),
        slow_call: match (cb.slow_call_ms, ratio(cb.slow_call_ratio)) {
            (0, _) | (_, None) => None,
            (ms, Some(ratio)) => Some(SlowCall {
                threshold: Duration::from_millis(u64::from(ms.min(MAX_SLOW_CALL_MS))),
                ratio,
            }),
        },
        open,
        max_open,
        half_open_probes: count_or(
            cb.half_open_probes,
            DEFAULT_HALF_OPEN_PROBES,
            MAX_HALF_OPEN_PROBES,
        ),
        max_ejection_percent: count_or(
            cb.max_ejection_percent,
            DEFAULT_MAX_EJECTION_PERCENT,
            MAX_EJECTION_PERCENT,
        ),
        shadow: cb.shadow,
    }
}

fn retry(r: &pb::Retry) -> Retry {
    let backoff_base = ms_or(
        r.backoff_base_ms,
        DEFAULT_BACKOFF_BASE_MS,
        1,
        MAX_BACKOFF_BASE_MS,
    );
    let backoff_max = ms_or(
        r.backoff_max_ms,
        DEFAULT_BACKOFF_MAX_MS,
        1,
        MAX_BACKOFF_MAX_MS,
    )
    .max(backoff_base);
    let mut retry_on = Vec::new();
    for &value in &r.retry_on {
        let on = match pb::RetryOn::try_from(value) {
            Ok(pb::RetryOn::ConnectFailure) => RetryOn::ConnectFailure,
            Ok(pb::RetryOn::Http5xx) => RetryOn::Http5xx,
            Ok(pb::RetryOn::Http429) => RetryOn::Http429,
            Ok(pb::RetryOn::Timeout) => RetryOn::Timeout,
            Ok(pb::RetryOn::Reset) => RetryOn::Reset,
            Ok(pb::RetryOn::Unspecified) | Err(_) => continue,
        };
        if !retry_on.contains(&on) {
            retry_on.push(on);
        }
    }
    if retry_on.is_empty() {
        retry_on = DEFAULT_RETRY_ON.to_vec();
    }
    let budget = r.budget_percent;
    Retry {
        attempts: count_or(r.attempts, DEFAULT_RETRY_ATTEMPTS, MAX_RETRY_ATTEMPTS),
        per_try_timeout: (r.per_try_timeout_ms != 0).then(|| {
            Duration::from_millis(u64::from(r.per_try_timeout_ms.min(MAX_PER_TRY_TIMEOUT_MS)))
        }),
        backoff_base,
        backoff_max,
        retry_on,
        budget_percent: if budget.is_finite() && budget > 0.0 {
            budget.min(MAX_BUDGET_PERCENT)
        } else {
            DEFAULT_BUDGET_PERCENT
        },
        shadow: r.shadow,
    }
}

fn timeout(t: &pb::Timeout) -> Timeout {
    Timeout {
        total: Duration::from_millis(u64::from(t.total_ms.clamp(1, MAX_TOTAL_MS))),
        shadow: t.shadow,
    }
}

fn delivery(d: &pb::Delivery) -> Delivery {
    Delivery {
        durable_outbox: d.durable_outbox,
        max_age: Duration::from_secs(u64::from(count_or(
            d.max_age_seconds,
            DEFAULT_MAX_AGE_SECONDS,
            MAX_AGE_SECONDS,
        ))),
        max_attempts: count_or(
            d.max_attempts,
            DEFAULT_DELIVERY_ATTEMPTS,
            MAX_DELIVERY_ATTEMPTS,
        ),
        dead_letter: d.dead_letter,
        ordered: d.ordered,
        compensation_topic: (!d.compensation_topic.is_empty())
            .then(|| d.compensation_topic.clone()),
        shadow: d.shadow,
    }
}

#[cfg(test)]
mod tests {
    use pb::{load_balancer::Algorithm as A, rate_limit as rl};

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn policy() -> pb::TrafficPolicy {
        pb::TrafficPolicy {
            namespace: "shop".into(),
            service: "orders".into(),
            ..pb::TrafficPolicy::default()
        }
    }

    fn rule(name: &str, m: pb::EventMatch) -> pb::Rule {
        pb::Rule {
            name: name.into(),
            r#match: Some(m),
            ..pb::Rule::default()
        }
    }

    #[test]
    fn an_empty_policy_is_round_robin_and_nothing_else() {
        let r = resolve(&policy());
        assert_eq!(
            (r.namespace.as_str(), r.service.as_str()),
            ("shop", "orders")
        );
        assert_eq!(
            r.defaults,
            Sections {
                load_balancer: LoadBalancer::default(),
                rate_limit: None,
                circuit_breaker: None,
                retry: None,
                timeout: None,
                delivery: None,
            }
        );
        assert!(r.rules.is_empty());
    }

    #[test]
    fn zeros_become_the_documented_defaults() {
        let p = pb::TrafficPolicy {
            load_balancer: Some(pb::LoadBalancer {
                algorithm: A::LeastRequest as i32,
                ..pb::LoadBalancer::default()
            }),
            rate_limit: Some(pb::RateLimit {
                requests_per_second: 12.5,
                ..pb::RateLimit::default()
            }),
            circuit_breaker: Some(pb::CircuitBreaker {
                consecutive_failures: 5,
                ..pb::CircuitBreaker::default()
            }),
            retry: Some(pb::Retry::default()),
            timeout: Some(pb::Timeout {
                total_ms: 2500,
                shadow: false,
            }),
            delivery: Some(pb::Delivery::default()),
            ..policy()
        };
        let d = resolve(&p).defaults;
        assert_eq!(
            d.load_balancer.algorithm,
            Algorithm::LeastRequest {
                choices: DEFAULT_CHOICES
            }
        );
        let limit = d.rate_limit.expect("rate limit");
        assert_eq!(limit.burst, 13, "burst defaults to the rate rounded up");
        assert_eq!(limit.scope, Scope::PerAgent);
        assert_eq!(limit.on_excess, OnExcess::Reject);
        let cb = d.circuit_breaker.expect("breaker");
        assert_eq!(cb.consecutive_failures, Some(5));
        assert_eq!(cb.failure_ratio, None);
        assert_eq!(cb.slow_call, None);
        assert_eq!(cb.window, MS * DEFAULT_WINDOW_MS);
        assert_eq!(cb.minimum_requests, DEFAULT_MINIMUM_REQUESTS);
        assert_eq!(cb.open, MS * DEFAULT_OPEN_MS);
        assert_eq!(cb.max_open, MS * DEFAULT_MAX_OPEN_MS);
        assert_eq!(cb.half_open_probes, DEFAULT_HALF_OPEN_PROBES);
        assert_eq!(cb.max_ejection_percent, DEFAULT_MAX_EJECTION_PERCENT);
        let retry = d.retry.expect("retry");
        assert_eq!(retry.attempts, DEFAULT_RETRY_ATTEMPTS);
        assert_eq!(retry.per_try_timeout, None);
        assert_eq!(retry.backoff_base, MS * DEFAULT_BACKOFF_BASE_MS);
        assert_eq!(retry.backoff_max, MS * DEFAULT_BACKOFF_MAX_MS);
        assert_eq!(retry.retry_on, DEFAULT_RETRY_ON);
        assert_eq!(retry.budget_percent, DEFAULT_BUDGET_PERCENT);
        assert_eq!(d.timeout.expect("timeout").total, 2500 * MS);
        let delivery = d.delivery.expect("delivery");
        assert_eq!(
            delivery.max_age,
            Duration::from_secs(u64::from(DEFAULT_MAX_AGE_SECONDS))
        );
        assert_eq!(delivery.max_attempts, DEFAULT_DELIVERY_ATTEMPTS);
        assert!(!delivery.durable_outbox && !delivery.dead_letter);
    }

    #[test]
    fn enums_are_mapped() {
        let mut p = policy();
        let algorithms = [
            (A::Unspecified, Algorithm::RoundRobin),
            (A::RoundRobin, Algorithm::RoundRobin),
            (A::WeightedRoundRobin, Algorithm::WeightedRoundRobin),
            (
                A::PeakEwma,
                Algorithm::PeakEwma {
                    decay: MS * DEFAULT_EWMA_DECAY_MS,
                },
            ),
        ];
        for (proto, want) in algorithms {
            p.load_balancer = Some(pb::LoadBalancer {
                algorithm: proto as i32,
                ..pb::LoadBalancer::default()
            });
            assert_eq!(resolve(&p).defaults.load_balancer.algorithm, want);
        }
        let keys = [
            (
                pb::consistent_hash::Key::Header,
                "x-user",
                HashKey::Header("x-user".into()),
            ),
            (pb::consistent_hash::Key::Subject, "", HashKey::Subject),
            (
                pb::consistent_hash::Key::PartitionKey,
                "",
                HashKey::PartitionKey,
            ),
        ];
        for (proto, header, want) in keys {
            p.load_balancer = Some(pb::LoadBalancer {
                algorithm: A::ConsistentHash as i32,
                consistent_hash: Some(pb::ConsistentHash {
                    key: proto as i32,
                    header: header.into(),
                }),
                ..pb::LoadBalancer::default()
            });
            assert_eq!(
                resolve(&p).defaults.load_balancer.algorithm,
                Algorithm::ConsistentHash { key: want }
            );
        }
        p.rate_limit = Some(pb::RateLimit {
            requests_per_second: 100.0,
            burst: 7,
            scope: rl::Scope::Global as i32,
            on_excess: rl::OnExcess::Queue as i32,
            max_queue_wait_ms: 250,
            shadow: false,
        });
        p.retry = Some(pb::Retry {
            retry_on: vec![
                pb::RetryOn::Http429 as i32,
                pb::RetryOn::Timeout as i32,
                pb::RetryOn::Reset as i32,
            ],
            ..pb::Retry::default()
        });
        let d = resolve(&p).defaults;
        let limit = d.rate_limit.expect("rate limit");
        assert_eq!(limit.burst, 7);
        assert_eq!(limit.scope, Scope::Global);
        assert_eq!(limit.on_excess, OnExcess::Queue { max_wait: 250 * MS });
        assert_eq!(
            d.retry.expect("retry").retry_on,
            [RetryOn::Http429, RetryOn::Timeout, RetryOn::Reset]
        );
    }

    #[test]
    fn zone_preference_takes_its_default_and_off_is_none() {
        let with = |zp: Option<pb::ZonePreference>| {
            let p = pb::TrafficPolicy {
                load_balancer: Some(pb::LoadBalancer {
                    zone_preference: zp,
                    ..pb::LoadBalancer::default()
                }),
                ..policy()
            };
            resolve(&p).defaults.load_balancer.zone_min_percent
        };
        assert_eq!(with(None), None);
        assert_eq!(with(Some(pb::ZonePreference::default())), None);
        let on = |min_usable_percent| pb::ZonePreference {
            enabled: true,
            min_usable_percent,
        };
        assert_eq!(with(Some(on(0))), Some(DEFAULT_ZONE_PERCENT));
        assert_eq!(with(Some(on(60))), Some(60));
        assert_eq!(with(Some(on(500))), Some(100), "clamped");
    }

    #[test]
    fn rules_override_section_by_section_in_order() {
        let p = pb::TrafficPolicy {
            retry: Some(pb::Retry {
                attempts: 5,
                ..pb::Retry::default()
            }),
            timeout: Some(pb::Timeout {
                total_ms: 5000,
                shadow: false,
            }),
            rules: vec![
                pb::Rule {
                    timeout: Some(pb::Timeout {
                        total_ms: 200,
                        shadow: false,
                    }),
                    ..rule(
                        "payments",
                        pb::EventMatch {
                            type_prefix: "com.example.payment.".into(),
                            ..pb::EventMatch::default()
                        },
                    )
                },
                pb::Rule {
                    retry: Some(pb::Retry {
                        attempts: 1,
                        ..pb::Retry::default()
                    }),
                    ..rule(
                        "refunds",
                        pb::EventMatch {
                            type_exact: "com.example.payment.refunded".into(),
                            source: "/billing".into(),
                            ..pb::EventMatch::default()
                        },
                    )
                },
            ],
            ..policy()
        };
        let r = resolve(&p);
        assert_eq!(r.rules.len(), 2);
        let payments = &r.rules[0];
        assert_eq!(payments.name, "payments");
        // Its own timeout, the default retry.
        assert_eq!(payments.sections.timeout.expect("timeout").total, 200 * MS);
        assert_eq!(payments.sections.retry, r.defaults.retry);
        let refunds = &r.rules[1];
        assert_eq!(refunds.sections.retry.as_ref().expect("retry").attempts, 1);
        assert_eq!(refunds.sections.timeout, r.defaults.timeout);
        assert_eq!(
            refunds.matcher,
            EventMatcher {
                event_type: TypeMatch::Exact("com.example.payment.refunded".into()),
                source: Some("/billing".into()),
            }
        );

        // The first matching rule wins; no match gets the defaults.
        let total = |t: &str, s: &str| r.sections_for(t, s).timeout.map(|t| t.total);
        assert_eq!(
            total("com.example.payment.refunded", "/billing"),
            Some(200 * MS)
        );
        assert_eq!(
            r.sections_for("com.example.payment.refunded", "/billing")
                .retry
                .as_ref()
                .map(|r| r.attempts),
            Some(5),
            "rules[1] matches too but rules[0] comes first"
        );
        assert_eq!(total("com.example.order.created", "/shop"), Some(5000 * MS));
    }

    #[test]
    fn delivery_order_and_compensation_are_resolved() {
        let mut p = pb::TrafficPolicy {
            delivery: Some(pb::Delivery {
                ordered: true,
                compensation_topic: "orders.failed".into(),
                ..pb::Delivery::default()
            }),
            ..pb::TrafficPolicy::default()
        };
        let d = resolve(&p).defaults.delivery.expect("delivery");
        assert!(d.ordered);
        assert_eq!(d.compensation_topic.as_deref(), Some("orders.failed"));
        p.delivery = Some(pb::Delivery::default());
        let d = resolve(&p).defaults.delivery.expect("delivery");
        assert!(
            !d.ordered && d.compensation_topic.is_none(),
            "empty is none"
        );
        assert_eq!(d.max_age, Duration::from_secs(86_400));
    }

    #[test]
    fn shadow_flags_are_kept() {
        let p = pb::TrafficPolicy {
            load_balancer: Some(pb::LoadBalancer {
                algorithm: A::RoundRobin as i32,
                shadow: true,
                ..pb::LoadBalancer::default()
            }),
            rate_limit: Some(pb::RateLimit {
                requests_per_second: 5.0,
                shadow: true,
                ..pb::RateLimit::default()
            }),
            circuit_breaker: Some(pb::CircuitBreaker {
                failure_ratio: 0.5,
                shadow: true,
                ..pb::CircuitBreaker::default()
            }),
            retry: Some(pb::Retry {
                shadow: true,
                ..pb::Retry::default()
            }),
            timeout: Some(pb::Timeout {
                total_ms: 100,
                shadow: true,
            }),
            delivery: Some(pb::Delivery {
                shadow: true,
                ..pb::Delivery::default()
            }),
            rules: vec![pb::Rule {
                timeout: Some(pb::Timeout {
                    total_ms: 100,
                    shadow: false,
                }),
                ..rule(
                    "r",
                    pb::EventMatch {
                        source: "/x".into(),
                        ..pb::EventMatch::default()
                    },
                )
            }],
            ..policy()
        };
        let r = resolve(&p);
        let d = &r.defaults;
        assert!(d.load_balancer.shadow);
        assert!(d.rate_limit.as_ref().is_some_and(|x| x.shadow));
        assert!(d.circuit_breaker.as_ref().is_some_and(|x| x.shadow));
        assert!(d.retry.as_ref().is_some_and(|x| x.shadow));
        assert!(d.timeout.is_some_and(|x| x.shadow));
        assert!(d.delivery.as_ref().is_some_and(|x| x.shadow));
        // The rule's own section carries its own flag; inherited ones keep
        // the default's.
        let rule = &r.rules[0].sections;
        assert!(rule.timeout.is_some_and(|x| !x.shadow));
        assert!(rule.retry.as_ref().is_some_and(|x| x.shadow));
    }

    #[test]
    fn invalid_values_fall_back_without_panicking() {
        let p = pb::TrafficPolicy {
            load_balancer: Some(pb::LoadBalancer {
                algorithm: 99,
                ..pb::LoadBalancer::default()
            }),
            rate_limit: Some(pb::RateLimit {
                requests_per_second: f64::NAN,
                ..pb::RateLimit::default()
            }),
            circuit_breaker: Some(pb::CircuitBreaker {
                open_ms: 10_000,
                max_open_ms: 1000,
                ..pb::CircuitBreaker::default()
            }),
            retry: Some(pb::Retry {
                backoff_base_ms: 500,
                backoff_max_ms: 100,
                retry_on: vec![0, 42],
                ..pb::Retry::default()
            }),
            ..policy()
        };
        let d = resolve(&p).defaults;
        assert_eq!(d.load_balancer.algorithm, Algorithm::RoundRobin);
        assert_eq!(d.rate_limit, None);
        let cb = d.circuit_breaker.expect("breaker");
        assert!(cb.max_open >= cb.open);
        let retry = d.retry.expect("retry");
        assert!(retry.backoff_max >= retry.backoff_base);
        assert_eq!(retry.retry_on, DEFAULT_RETRY_ON);
        let mut backoff = retry.backoff();
        assert!(backoff.next_delay() <= retry.backoff_base);
    }
}
