//! What of a service's policy the data path enforces: the default
//! balancing and failure handling (`retry`, `timeout`), and the rules that
//! give the events they match (by CloudEvents `type` and `source`) a
//! balancer or failure handling of their own. Pure: [`Balancing::of`] runs when
//! a policy changes, and the view builds the service's balancers from it.
//!
//! The agent enforces every `load_balancer` section with an algorithm it
//! knows, zone preference included. One in shadow mode is evaluated, not
//! applied: its events are balanced as if it were absent (round robin by
//! default; in a rule, the policy's default balancer) and the shadow
//! balancer's picks are compared with those made ([`Lb::shadow`]). The
//! acknowledgement names what is not enforced ([`unenforced`]).

use weir_client::policy::{load_balancer, LoadBalancer, Rule, TrafficPolicy};
use weir_core::policy::{
    resolve::{self, Algorithm, EventMatcher},
    sections,
};

use crate::retry::Failure;

/// One balancer: an algorithm, and the zone preference around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    pub algorithm: Algorithm,
    /// Prefer the agent's zone while it holds at least this percentage of
    /// the usable endpoints.
    pub zone_min_percent: Option<u32>,
}

impl Default for Spec {
    /// Round robin, as an absent section means.
    fn default() -> Self {
        Self {
            algorithm: Algorithm::RoundRobin,
            zone_min_percent: None,
        }
    }
}

impl From<&resolve::LoadBalancer> for Spec {
    fn from(lb: &resolve::LoadBalancer) -> Self {
        Self {
            algorithm: lb.algorithm.clone(),
            zone_min_percent: lb.zone_min_percent,
        }
    }
}

/// A `load_balancer` section as the agent runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lb {
    /// What picks.
    pub applied: Spec,
    /// What a section in shadow mode would have picked, compared with
    /// `applied` on every pick.
    pub shadow: Option<Spec>,
}

impl Lb {
    /// `section` (resolved), over `fallback`: what applies when the section
    /// is in shadow mode.
    fn of(section: &resolve::LoadBalancer, fallback: &Spec) -> Self {
        if section.shadow {
            Self {
                applied: fallback.clone(),
                shadow: Some(Spec::from(section)),
            }
        } else {
            Self {
                applied: Spec::from(section),
                shadow: None,
            }
        }
    }
}

/// The balancing of one service, as far as this agent enforces it. The
/// default value is what a service without a policy gets: plain round
/// robin, no retry, no deadline and no rules.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Balancing {
    /// The default balancer.
    pub default: Lb,
    /// The default failure handling.
    pub failure: Failure,
    /// The service's own rate limit (its `rate_limit` section).
    pub limit: Option<resolve::RateLimit>,
    /// The breaker every endpoint of the service gets (its
    /// `circuit_breaker` section).
    pub breaker: Option<resolve::CircuitBreaker>,
    /// The policy's rules in order, up to the last one that has a
    /// balancer, failure handling or rate limit of its own; empty when
    /// none has, so events need not be matched.
    /// Earlier rules without one are kept: the first match wins, and such
    /// a rule sends its events to the default balancer.
    pub rules: Vec<RuleBalancing>,
    /// The policy's `tracing` section.
    pub tracing: Tracing,
}

/// How requests to a service are traced (its policy's `tracing`
/// section); `None`s leave the agent's defaults.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tracing {
    pub sample_rate: Option<f64>,
    pub slow: Option<std::time::Duration>,
}

impl Tracing {
    fn of(policy: &TrafficPolicy) -> Self {
        let Some(t) = &policy.tracing else {
            return Self::default();
        };
        Self {
            sample_rate: t.sample_rate.filter(|r| (0.0..=1.0).contains(r)),
            slow: (t.slow_ms > 0).then(|| std::time::Duration::from_millis(u64::from(t.slow_ms))),
        }
    }
}

/// One rule, as the balancers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleBalancing {
    /// Unique within the policy: a rebuilt balancer carries on the
    /// rotation of the rule of the same name.
    pub name: String,
    pub matcher: EventMatcher,
    /// A balancer of its own, or `None`: the default one (the rule sets
    /// no `load_balancer`, or one this agent does not enforce).
    pub own: Option<Lb>,
    /// Failure handling of its own (its `retry` or `timeout` differs from
    /// the defaults'), or `None`: the default one.
    pub failure: Option<Failure>,
    /// A rate limit of its own: a bucket for the events the rule matches
    /// (the rule sets a `rate_limit` section). `None`: its events share
    /// the service's bucket, if it has one.
    pub limit: Option<resolve::RateLimit>,
    /// Circuit breakers of its own (the rule sets a `circuit_breaker`
    /// section): one per endpoint, for its events. `None`: the service's.
    pub breaker: Option<resolve::CircuitBreaker>,
}

/// Whether this agent enforces `lb`: any algorithm it knows (one from a
/// newer proto is treated as absent).
pub fn enforced(lb: &LoadBalancer) -> bool {
    load_balancer::Algorithm::try_from(lb.algorithm).is_ok()
}

impl Balancing {
    /// The balancing `policy` asks for, as far as this agent enforces it.
    pub fn of(policy: &TrafficPolicy) -> Self {
        let resolved = resolve::resolve(policy);
        let default = match &policy.load_balancer {
            Some(lb) if enforced(lb) => Lb::of(&resolved.defaults.load_balancer, &Spec::default()),
            _ => Lb::default(),
        };
        let own: Vec<Option<Lb>> = policy
            .rules
            .iter()
            .zip(&resolved.rules)
            .map(|(r, resolved)| {
                r.load_balancer
                    .as_ref()
                    .filter(|lb| enforced(lb))
                    .map(|_| Lb::of(&resolved.sections.load_balancer, &default.applied))
            })
            .collect();
        let failure = Failure {
            retry: resolved.defaults.retry.clone(),
            timeout: resolved.defaults.timeout,
        };
        // `resolve` merged each rule's sections with the defaults.
        let own_failure: Vec<Option<Failure>> = resolved
            .rules
            .iter()
            .map(|r| {
                let f = Failure {
                    retry: r.sections.retry.clone(),
                    timeout: r.sections.timeout,
                };
                (f != failure).then_some(f)
            })
            .collect();
        let limit = resolved.defaults.rate_limit.clone();
        let breaker = resolved.defaults.circuit_breaker.clone();
        let own_limit: Vec<Option<resolve::RateLimit>> = policy
            .rules
            .iter()
            .zip(&resolved.rules)
            .map(|(r, resolved)| {
                r.rate_limit
                    .as_ref()
                    .and(resolved.sections.rate_limit.clone())
            })
            .collect();
        let own_breaker: Vec<Option<resolve::CircuitBreaker>> = policy
            .rules
            .iter()
            .zip(&resolved.rules)
            .map(|(r, resolved)| {
                r.circuit_breaker
                    .as_ref()
                    .and(resolved.sections.circuit_breaker.clone())
            })
            .collect();
        let Some(last) = (0..own.len()).rev().find(|&i| {
            own[i].is_some()
                || own_failure[i].is_some()
                || own_limit[i].is_some()
                || own_breaker[i].is_some()
        }) else {
            return Self {
                default,
                failure,
                limit,
                breaker,
                rules: Vec::new(),
                tracing: Tracing::of(policy),
            };
        };
        // The matchers as `resolve` builds them, so the agent matches
        // exactly as the policy documentation says.
        let rules = resolved
            .rules
            .into_iter()
            .zip(
                own.into_iter()
                    .zip(own_failure)
                    .zip(own_limit)
                    .zip(own_breaker),
            )
            .take(last + 1)
            .map(|(r, (((own, failure), limit), breaker))| RuleBalancing {
                name: r.name,
                matcher: r.matcher,
                own,
                failure,
                limit,
                breaker,
            })
            .collect();
        Self {
            default,
            failure,
            limit,
            breaker,
            rules,
            tracing: Tracing::of(policy),
        }
    }

    /// The index in [`Balancing::rules`] of the first rule matching an
    /// event of `event_type` from `source`, if any.
    pub fn rule_for(&self, event_type: &str, source: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matcher.matches(event_type, source))
    }
}

/// Whether this agent enforces every section `rule` sets: a
/// `load_balancer` it enforces, `retry`, `timeout`, `rate_limit` and
/// `circuit_breaker` (and the match itself).
fn rule_enforced(rule: &Rule) -> bool {
    rule.rate_limit.as_ref().is_none_or(limit_enforced)
        && rule.delivery.is_none()
        && rule.load_balancer.as_ref().is_none_or(enforced)
}

/// Whether this agent enforces `limit`: one of a scope it knows
/// (`PER_AGENT`, or `GLOBAL` at the share the control plane allocates).
fn limit_enforced(limit: &weir_client::policy::RateLimit) -> bool {
    weir_client::policy::rate_limit::Scope::try_from(limit.scope).is_ok()
}

/// The top-level sections `policy` sets that this agent does not enforce
/// (in full), by the names acknowledgements use: `load_balancer` when its
/// algorithm is unknown to this agent, `rules` when a rule sets any
/// section but such a load balancer, and every other section set. A
/// load balancer in shadow mode counts as enforced: the agent evaluates
/// and reports it, which is what shadow mode asks. Acknowledgements carry
/// top-level names only (`[a-z0-9_]`, checked by the control plane), so a
/// rule's own sections are summed up as `rules`.
pub fn unenforced(policy: &TrafficPolicy) -> Vec<&'static str> {
    sections::present(policy)
        .into_iter()
        .filter(|s| match *s {
            "load_balancer" => !policy.load_balancer.as_ref().is_some_and(enforced),
            "retry" | "timeout" => false,
            "rate_limit" => !policy.rate_limit.as_ref().is_none_or(limit_enforced),
            "circuit_breaker" | "tracing" => false,
            // Topic delivery follows the defaults' section; shadow mode
            // is not built for it.
            "delivery" => policy.delivery.as_ref().is_some_and(|d| d.shadow),
            "rules" => !policy.rules.iter().all(rule_enforced),
            _ => true,
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

    use weir_client::policy::{
        CircuitBreaker, EventMatch, RateLimit, Retry, Timeout, ZonePreference,
    };
    use weir_core::policy::resolve::TypeMatch;

    use super::*;
    use load_balancer::Algorithm;

    /// A `load_balancer` section asking for `algorithm` (also used by the
    /// view's tests).
    pub(crate) fn lb(algorithm: Algorithm) -> Option<LoadBalancer> {
        Some(LoadBalancer {
            algorithm: algorithm as i32,
            ..LoadBalancer::default()
        })
    }

    /// A rule named `name` matching `m` (also used by the view's tests).
    pub(crate) fn rule(name: &str, m: EventMatch, load_balancer: Option<LoadBalancer>) -> Rule {
        Rule {
            name: name.into(),
            r#match: Some(m),
            load_balancer,
            ..Rule::default()
        }
    }

    fn prefix(p: &str) -> EventMatch {
        EventMatch {
            type_prefix: p.into(),
            ..EventMatch::default()
        }
    }

    fn policy(load_balancer: Option<LoadBalancer>, rules: Vec<Rule>) -> TrafficPolicy {
        TrafficPolicy {
            namespace: "default".into(),
            service: "orders".into(),
            load_balancer,
            rules,
            ..TrafficPolicy::default()
        }
    }

    fn spec(algorithm: resolve::Algorithm) -> Spec {
        Spec {
            algorithm,
            zone_min_percent: None,
        }
    }

    fn applied(algorithm: resolve::Algorithm) -> Option<Lb> {
        Some(Lb {
            applied: spec(algorithm),
            shadow: None,
        })
    }

    #[test]
    fn every_known_algorithm_is_enforced_and_shadow_applies_the_fallback() {
        for a in [
            Algorithm::Unspecified,
            Algorithm::RoundRobin,
            Algorithm::WeightedRoundRobin,
            Algorithm::LeastRequest,
            Algorithm::PeakEwma,
            Algorithm::ConsistentHash,
        ] {
            assert!(enforced(&lb(a).expect("set")), "{a:?}");
        }
        let unknown = LoadBalancer {
            algorithm: 99,
            ..LoadBalancer::default()
        };
        assert!(!enforced(&unknown));
        let b = Balancing::of(&policy(
            Some(LoadBalancer {
                shadow: true,
                choices: 3,
                zone_preference: Some(ZonePreference {
                    enabled: true,
                    min_usable_percent: 60,
                }),
                ..lb(Algorithm::LeastRequest).expect("set")
            }),
            Vec::new(),
        ));
        assert_eq!(
            b.default,
            Lb {
                applied: Spec::default(),
                shadow: Some(Spec {
                    algorithm: resolve::Algorithm::LeastRequest { choices: 3 },
                    zone_min_percent: Some(60),
                }),
            }
        );
        let b = Balancing::of(&policy(
            Some(LoadBalancer {
                ewma_decay_ms: 2000,
                ..lb(Algorithm::PeakEwma).expect("set")
            }),
            Vec::new(),
        ));
        assert_eq!(
            b.default,
            applied(resolve::Algorithm::PeakEwma {
                decay: Duration::from_secs(2)
            })
            .expect("some")
        );
    }

    #[test]
    fn a_policy_without_rules_of_their_own_needs_no_matching() {
        assert_eq!(
            Balancing::of(&policy(None, Vec::new())),
            Balancing::default()
        );
        let b = Balancing::of(&policy(
            lb(Algorithm::WeightedRoundRobin),
            vec![Rule {
                // Nothing the balancing runs.
                delivery: Some(weir_client::policy::Delivery {
                    max_attempts: 3,
                    ..weir_client::policy::Delivery::default()
                }),
                ..rule("delivered", prefix("a."), None)
            }],
        ));
        assert_eq!(
            b.default.applied.algorithm,
            resolve::Algorithm::WeightedRoundRobin
        );
        assert!(b.rules.is_empty(), "no rule has its own: {b:?}");
        // A rule's own rate limit is a bucket of its own: the rule is
        // kept, and so are the rules before it.
        let b = Balancing::of(&TrafficPolicy {
            rate_limit: Some(RateLimit {
                requests_per_second: 50.0,
                ..RateLimit::default()
            }),
            ..policy(
                None,
                vec![
                    rule("first", prefix("b."), None),
                    Rule {
                        rate_limit: Some(RateLimit {
                            requests_per_second: 5.0,
                            ..RateLimit::default()
                        }),
                        ..rule("limited", prefix("a."), None)
                    },
                ],
            )
        });
        assert_eq!(b.limit.as_ref().map(|l| l.burst), Some(50));
        assert_eq!(b.rules.len(), 2);
        assert_eq!(b.rules[0].limit, None, "shares the service's bucket");
        assert_eq!(
            b.rules[1]
                .limit
                .as_ref()
                .map(|l| (l.requests_per_second, l.burst)),
            Some((5.0, 5))
        );
        // So is a rule's own breaker.
        let b = Balancing::of(&policy(
            None,
            vec![Rule {
                circuit_breaker: Some(CircuitBreaker {
                    consecutive_failures: 5,
                    ..CircuitBreaker::default()
                }),
                ..rule("broken", prefix("a."), None)
            }],
        ));
        assert_eq!(
            b.rules[0]
                .breaker
                .as_ref()
                .and_then(|c| c.consecutive_failures),
            Some(5)
        );
        // An unknown algorithm in a rule is no balancer.
        let b = Balancing::of(&policy(
            None,
            vec![rule(
                "new",
                prefix("a."),
                Some(LoadBalancer {
                    algorithm: 99,
                    ..LoadBalancer::default()
                }),
            )],
        ));
        assert!(b.rules.is_empty(), "{b:?}");
    }

    #[test]
    fn rules_are_kept_in_order_up_to_the_last_with_a_balancer() {
        let b = Balancing::of(&policy(
            lb(Algorithm::LeastRequest),
            vec![
                rule("light", prefix("com.example.light."), None),
                rule("heavy", prefix("com.example."), lb(Algorithm::RoundRobin)),
                rule(
                    "shadowed",
                    prefix("com.example.audit."),
                    Some(LoadBalancer {
                        shadow: true,
                        ..lb(Algorithm::PeakEwma).expect("set")
                    }),
                ),
                rule(
                    "tail",
                    EventMatch {
                        source: "/x".into(),
                        ..EventMatch::default()
                    },
                    None,
                ),
            ],
        ));
        let p2c = resolve::Algorithm::LeastRequest { choices: 2 };
        assert_eq!(b.default, applied(p2c.clone()).expect("some"));
        let names: Vec<&str> = b.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["light", "heavy", "shadowed"],
            "the tail can only pick the default"
        );
        assert_eq!(b.rules[0].own, None);
        assert_eq!(b.rules[1].own, applied(resolve::Algorithm::RoundRobin));
        // A rule in shadow mode balances as the default does.
        assert_eq!(
            b.rules[2].own,
            Some(Lb {
                applied: spec(p2c),
                shadow: Some(spec(resolve::Algorithm::PeakEwma {
                    decay: Duration::from_secs(10)
                })),
            })
        );
        assert_eq!(
            b.rules[1].matcher.event_type,
            TypeMatch::Prefix("com.example.".into())
        );
        // The first match wins, even a rule with the default balancer.
        assert_eq!(b.rule_for("com.example.light.x", "/s"), Some(0));
        assert_eq!(b.rule_for("com.example.heavy.x", "/s"), Some(1));
        assert_eq!(b.rule_for("org.other", "/x"), None);
    }

    #[test]
    fn rules_with_their_own_retry_or_timeout_are_kept() {
        let retry = Retry {
            attempts: 2,
            ..Retry::default()
        };
        let p = TrafficPolicy {
            retry: Some(retry.clone()),
            ..policy(
                None,
                vec![
                    rule("same", prefix("a."), None),
                    Rule {
                        timeout: Some(Timeout {
                            total_ms: 50,
                            shadow: false,
                        }),
                        ..rule("deadline", prefix("b."), None)
                    },
                    Rule {
                        retry: Some(retry),
                        ..rule("same-again", prefix("c."), None)
                    },
                ],
            )
        };
        let b = Balancing::of(&p);
        assert_eq!(b.failure.retry.as_ref().map(|r| r.attempts), Some(2));
        assert_eq!(b.failure.timeout, None);
        let names: Vec<&str> = b.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["same", "deadline"],
            "a rule like the defaults ends it"
        );
        assert_eq!(b.rules[0].failure, None);
        let own = b.rules[1].failure.as_ref().expect("its own");
        assert_eq!(own.total(), Some(Duration::from_millis(50)));
        assert_eq!(own.retry, b.failure.retry, "merged with the defaults");
        assert_ne!(b, Balancing::default());
    }

    #[test]
    fn acks_name_the_sections_not_enforced() {
        let only_balancing = policy(
            lb(Algorithm::RoundRobin),
            vec![rule(
                "heavy",
                prefix("com.example.heavy."),
                lb(Algorithm::PeakEwma),
            )],
        );
        assert!(unenforced(&only_balancing).is_empty());
        // A rule that only matches (sends its events to the defaults) is
        // enforced too.
        assert!(unenforced(&policy(None, vec![rule("m", prefix("a."), None)])).is_empty());

        let global = RateLimit {
            requests_per_second: 5.0,
            scope: weir_client::policy::rate_limit::Scope::Global as i32,
            ..RateLimit::default()
        };
        // Per agent and global: enforced; a scope from a newer proto is
        // not.
        let limited = |scope: i32| TrafficPolicy {
            rate_limit: Some(RateLimit { scope, ..global }),
            ..policy(None, Vec::new())
        };
        assert!(unenforced(&limited(0)).is_empty());
        assert!(unenforced(&limited(global.scope)).is_empty());
        assert_eq!(unenforced(&limited(7)), ["rate_limit"]);
        let rate_limited = Rule {
            rate_limit: Some(RateLimit { scope: 7, ..global }),
            ..rule("limited", prefix("a."), None)
        };
        let p = TrafficPolicy {
            retry: Some(Retry::default()),
            ..policy(
                lb(Algorithm::WeightedRoundRobin),
                vec![only_balancing.rules[0].clone(), rate_limited],
            )
        };
        assert_eq!(unenforced(&p), ["rules"], "retry is enforced");

        // Shadow mode is enforced (evaluated and reported); an algorithm
        // this agent does not know is not.
        let p = policy(
            Some(LoadBalancer {
                shadow: true,
                ..LoadBalancer::default()
            }),
            vec![rule("p2c", prefix("a."), lb(Algorithm::LeastRequest))],
        );
        assert!(unenforced(&p).is_empty());
        let p = policy(
            Some(LoadBalancer {
                algorithm: 42,
                ..LoadBalancer::default()
            }),
            vec![rule(
                "new",
                prefix("a."),
                Some(LoadBalancer {
                    algorithm: 42,
                    ..LoadBalancer::default()
                }),
            )],
        );
        assert_eq!(unenforced(&p), ["load_balancer", "rules"]);
    }
}
