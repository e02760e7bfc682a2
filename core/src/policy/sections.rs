//! The top-level sections of a `TrafficPolicy`, by the names an agent uses
//! when it applies a policy in part (`Ack.unenforced`), and the rules those
//! names must follow.

use std::collections::HashSet;

use weir_proto::policy::v1::TrafficPolicy;

use crate::validate::{err, shown, ValidationError};

/// Every top-level section of a `TrafficPolicy`, by its proto field name.
pub const SECTIONS: [&str; 8] = [
    "load_balancer",
    "rate_limit",
    "circuit_breaker",
    "retry",
    "timeout",
    "delivery",
    "rules",
    "tracing",
];

/// Most section names one acknowledgement may carry.
pub const MAX_UNENFORCED: usize = 16;
/// Longest section name accepted.
pub const MAX_SECTION_LEN: usize = 64;

/// The sections `policy` sets, in [`SECTIONS`] order: what an agent that
/// enforces only some sections compares with its own list.
pub fn present(policy: &TrafficPolicy) -> Vec<&'static str> {
    let set = [
        policy.load_balancer.is_some(),
        policy.rate_limit.is_some(),
        policy.circuit_breaker.is_some(),
        policy.retry.is_some(),
        policy.timeout.is_some(),
        policy.delivery.is_some(),
        !policy.rules.is_empty(),
        policy.tracing.is_some(),
    ];
    SECTIONS
        .iter()
        .zip(set)
        .filter_map(|(name, set)| set.then_some(*name))
        .collect()
}

/// Checks the section names of a partial acknowledgement (`field` is the
/// list's path, e.g. `ack.unenforced`): at most [`MAX_UNENFORCED`], each
/// 1-[`MAX_SECTION_LEN`] characters of `[a-z0-9_]`, no duplicates. Names
/// outside [`SECTIONS`] pass: an agent built against a newer proto may
/// name a section this build does not know, and refusing its whole
/// acknowledgement would hide what it does enforce.
pub fn unenforced(field: &str, names: &[String]) -> Result<(), ValidationError> {
    if names.len() > MAX_UNENFORCED {
        return Err(err(
            field,
            format!(
                "at most {MAX_UNENFORCED} section names (got {})",
                names.len()
            ),
        ));
    }
    let mut seen = HashSet::new();
    for (i, name) in names.iter().enumerate() {
        let ok = !name.is_empty()
            && name.len() <= MAX_SECTION_LEN
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !ok {
            return Err(err(
                format!("{field}[{i}]"),
                format!(
                    "must be a section name: 1-{MAX_SECTION_LEN} characters of a-z, 0-9 and '_', e.g. {} (got {})",
                    SECTIONS.join(", "),
                    shown(name)
                ),
            ));
        }
        if !seen.insert(name.as_str()) {
            return Err(err(
                format!("{field}[{i}]"),
                format!("{} is named twice", shown(name)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use weir_proto::policy::v1::{RateLimit, Rule, Timeout};

    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn section_names_are_bounded_and_named_by_index() {
        assert!(unenforced("ack.unenforced", &[]).is_ok());
        assert!(unenforced("ack.unenforced", &names(&SECTIONS)).is_ok());
        // A name this build does not know still passes.
        assert!(unenforced("ack.unenforced", &names(&["mirror"])).is_ok());

        let e = unenforced("ack.unenforced", &names(&["retry", "Rate-Limit"])).expect_err("bad");
        assert_eq!(e.field, "ack.unenforced[1]");
        assert!(e.rule.contains("\"Rate-Limit\""), "{e}");
        let e = unenforced("ack.unenforced", &names(&["retry", ""])).expect_err("empty");
        assert_eq!(e.field, "ack.unenforced[1]");
        let long = "a".repeat(MAX_SECTION_LEN + 1);
        let e = unenforced("ack.unenforced", &[long]).expect_err("long");
        assert_eq!(e.field, "ack.unenforced[0]");
        let e = unenforced("ack.unenforced", &names(&["retry", "timeout", "retry"]))
            .expect_err("duplicate");
        assert_eq!(e.field, "ack.unenforced[2]");
        assert!(e.rule.contains("twice"), "{e}");
        let many: Vec<String> = (0..=MAX_UNENFORCED).map(|i| format!("s{i}")).collect();
        let e = unenforced("ack.unenforced", &many).expect_err("too many");
        assert_eq!(e.field, "ack.unenforced");
    }

    #[test]
    fn present_lists_the_sections_a_policy_sets() {
        assert!(present(&TrafficPolicy::default()).is_empty());
        let p = TrafficPolicy {
            rate_limit: Some(RateLimit::default()),
            timeout: Some(Timeout::default()),
            rules: vec![Rule::default()],
            ..TrafficPolicy::default()
        };
        assert_eq!(present(&p), ["rate_limit", "timeout", "rules"]);
    }
}
