//! What of a service's policy the balancers enforce: the default balancing,
//! and the rules that give the events they match (by CloudEvents `type`
//! and `source`) a balancer of their own. Pure: [`Balancing::of`] runs when
//! a policy changes, and the view builds the service's balancers from it.
//!
//! The agent enforces a `load_balancer` section that asks for round robin,
//! plain or weighted, and is not in shadow mode. A section it does not
//! enforce is treated as absent: shadow mode means "do not change what
//! happens", and the other algorithms come with the next issue. The
//! acknowledgement says so ([`unenforced`]).

use weir_client::policy::{load_balancer::Algorithm, LoadBalancer, Rule, TrafficPolicy};
use weir_core::policy::{resolve::EventMatcher, sections};

/// The balancing of one service, as far as this agent enforces it. The
/// default value is what a service without a policy gets: plain round
/// robin and no rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    /// The default balancer follows instance weights.
    pub weighted: bool,
    /// The policy's rules in order, up to the last one that has a balancer
    /// of its own; empty when none has, so events need not be matched.
    /// Earlier rules without one are kept: the first match wins, and such
    /// a rule sends its events to the default balancer.
    pub rules: Vec<RuleBalancing>,
}

/// One rule, as the balancers see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleBalancing {
    /// Unique within the policy: a rebuilt balancer carries on the
    /// rotation of the rule of the same name.
    pub name: String,
    pub matcher: EventMatcher,
    /// `Some(weighted)`: a balancer of its own. `None`: the default one
    /// (the rule sets no `load_balancer`, or one this agent does not
    /// enforce).
    pub own: Option<bool>,
}

/// `Some(weighted)` when this agent enforces `lb`: round robin, plain
/// (`false`) or weighted (`true`), not in shadow mode.
pub fn enforced(lb: &LoadBalancer) -> Option<bool> {
    if lb.shadow {
        return None;
    }
    match Algorithm::try_from(lb.algorithm) {
        Ok(Algorithm::Unspecified | Algorithm::RoundRobin) => Some(false),
        Ok(Algorithm::WeightedRoundRobin) => Some(true),
        _ => None,
    }
}

impl Balancing {
    /// The balancing `policy` asks for, as far as this agent enforces it.
    pub fn of(policy: &TrafficPolicy) -> Self {
        let weighted = policy
            .load_balancer
            .as_ref()
            .and_then(enforced)
            .unwrap_or(false);
        let own: Vec<Option<bool>> = policy
            .rules
            .iter()
            .map(|r| r.load_balancer.as_ref().and_then(enforced))
            .collect();
        let Some(last) = own.iter().rposition(Option::is_some) else {
            return Self {
                weighted,
                rules: Vec::new(),
            };
        };
        // The matchers as `resolve` builds them, so the agent matches
        // exactly as the policy documentation says.
        let resolved = weir_core::policy::resolve(policy);
        let rules = resolved
            .rules
            .into_iter()
            .zip(own)
            .take(last + 1)
            .map(|(r, own)| RuleBalancing {
                name: r.name,
                matcher: r.matcher,
                own,
            })
            .collect();
        Self { weighted, rules }
    }

    /// The index in [`Balancing::rules`] of the first rule matching an
    /// event of `event_type` from `source`, if any.
    pub fn rule_for(&self, event_type: &str, source: &str) -> Option<usize> {
        self.rules
            .iter()
            .position(|r| r.matcher.matches(event_type, source))
    }
}

/// Whether this agent enforces every section `rule` sets: only a
/// `load_balancer` it enforces (and the match itself).
fn rule_enforced(rule: &Rule) -> bool {
    rule.rate_limit.is_none()
        && rule.circuit_breaker.is_none()
        && rule.retry.is_none()
        && rule.timeout.is_none()
        && rule.delivery.is_none()
        && rule
            .load_balancer
            .as_ref()
            .is_none_or(|lb| enforced(lb).is_some())
}

/// The top-level sections `policy` sets that this agent does not enforce
/// (in full), by the names acknowledgements use: `load_balancer` when it
/// is not round robin or is in shadow mode, `rules` when a rule sets any
/// section but such a load balancer, and every other section set.
/// Acknowledgements carry top-level names only (`[a-z0-9_]`, checked by
/// the control plane), so a rule's own sections are summed up as `rules`.
pub fn unenforced(policy: &TrafficPolicy) -> Vec<&'static str> {
    sections::present(policy)
        .into_iter()
        .filter(|s| match *s {
            "load_balancer" => policy.load_balancer.as_ref().and_then(enforced).is_none(),
            "rules" => !policy.rules.iter().all(rule_enforced),
            _ => true,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use weir_client::policy::{EventMatch, RateLimit, Retry, Timeout};
    use weir_core::policy::resolve::TypeMatch;

    use super::*;

    fn lb(algorithm: Algorithm) -> Option<LoadBalancer> {
        Some(LoadBalancer {
            algorithm: algorithm as i32,
            ..LoadBalancer::default()
        })
    }

    fn rule(name: &str, m: EventMatch, load_balancer: Option<LoadBalancer>) -> Rule {
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

    #[test]
    fn round_robin_plain_or_weighted_is_enforced_and_the_rest_is_not() {
        assert_eq!(enforced(&LoadBalancer::default()), Some(false));
        assert_eq!(
            enforced(&lb(Algorithm::RoundRobin).expect("set")),
            Some(false)
        );
        assert_eq!(
            enforced(&lb(Algorithm::WeightedRoundRobin).expect("set")),
            Some(true)
        );
        assert_eq!(enforced(&lb(Algorithm::LeastRequest).expect("set")), None);
        let shadow = LoadBalancer {
            shadow: true,
            ..lb(Algorithm::WeightedRoundRobin).expect("set")
        };
        assert_eq!(enforced(&shadow), None, "shadow mode changes nothing");
        let unknown = LoadBalancer {
            algorithm: 99,
            ..LoadBalancer::default()
        };
        assert_eq!(enforced(&unknown), None);
    }

    #[test]
    fn a_policy_without_rules_of_their_own_balancer_needs_no_matching() {
        assert_eq!(
            Balancing::of(&policy(None, Vec::new())),
            Balancing::default()
        );
        let b = Balancing::of(&policy(
            lb(Algorithm::WeightedRoundRobin),
            vec![Rule {
                timeout: Some(Timeout {
                    total_ms: 100,
                    shadow: false,
                }),
                ..rule("slow", prefix("a."), None)
            }],
        ));
        assert!(b.weighted);
        assert!(b.rules.is_empty(), "no rule balances on its own: {b:?}");
        // A shadow or unsupported balancer in a rule is no balancer.
        let b = Balancing::of(&policy(
            None,
            vec![rule("p2c", prefix("a."), lb(Algorithm::LeastRequest))],
        ));
        assert!(b.rules.is_empty(), "{b:?}");
    }

    #[test]
    fn rules_are_kept_in_order_up_to_the_last_with_a_balancer() {
        let b = Balancing::of(&policy(
            lb(Algorithm::WeightedRoundRobin),
            vec![
                rule("light", prefix("com.example.light."), None),
                rule("heavy", prefix("com.example."), lb(Algorithm::RoundRobin)),
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
        assert!(b.weighted);
        let names: Vec<&str> = b.rules.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["light", "heavy"],
            "the tail can only pick the default"
        );
        assert_eq!(b.rules[0].own, None);
        assert_eq!(b.rules[1].own, Some(false));
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
    fn acks_name_the_sections_not_enforced() {
        let only_balancing = policy(
            lb(Algorithm::RoundRobin),
            vec![rule(
                "heavy",
                prefix("com.example.heavy."),
                lb(Algorithm::WeightedRoundRobin),
            )],
        );
        assert!(unenforced(&only_balancing).is_empty());
        // A rule that only matches (sends its events to the defaults) is
        // enforced too.
        assert!(unenforced(&policy(None, vec![rule("m", prefix("a."), None)])).is_empty());

        let rate_limited = Rule {
            rate_limit: Some(RateLimit {
                requests_per_second: 5.0,
                ..RateLimit::default()
            }),
            ..rule("limited", prefix("a."), None)
        };
        let p = TrafficPolicy {
            retry: Some(Retry::default()),
            ..policy(
                lb(Algorithm::WeightedRoundRobin),
                vec![only_balancing.rules[0].clone(), rate_limited],
            )
        };
        assert_eq!(unenforced(&p), ["retry", "rules"]);

        let p = policy(
            Some(LoadBalancer {
                shadow: true,
                ..LoadBalancer::default()
            }),
            vec![rule("p2c", prefix("a."), lb(Algorithm::LeastRequest))],
        );
        assert_eq!(unenforced(&p), ["load_balancer", "rules"]);
    }
}
