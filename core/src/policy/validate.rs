//! Validation of traffic policies. The rules are the ones written in the
//! comments of `policy.proto`; keep the two in step. Each check names the
//! field by its full path (`policy.rules[2].retry.attempts`) and the rule it
//! broke, with the offending value, in the style of [`crate::validate`].
//!
//! Defaults stay implicit: a zero means "the documented default" and is
//! kept as written, so what is stored is what the caller sent (only the
//! namespace is filled). [`super::resolve()`] applies the defaults, from the
//! `DEFAULT_*` constants below, for whoever enforces the policy.

use std::collections::HashMap;

use prost::Message;
use weir_proto::policy::v1::{
    consistent_hash, load_balancer, rate_limit, CircuitBreaker, ConsistentHash, Delivery,
    EventMatch, LoadBalancer, RateLimit, Retry, RetryOn, Rule, Timeout, Tracing, TrafficPolicy,
    ZonePreference,
};

use crate::validate::{
    dns_label, err, namespace_or_default, shown, valid_topic, ValidationError, MAX_TOPIC_LEN,
};

/// Largest encoded policy accepted.
pub const MAX_POLICY_BYTES: usize = 256 * 1024;
pub const MAX_RULES: usize = 64;
pub const MAX_MATCH_LEN: usize = 255;
pub const MAX_HEADER_LEN: usize = 128;

pub const MIN_CHOICES: u32 = 2;
pub const MAX_CHOICES: u32 = 8;
pub const DEFAULT_CHOICES: u32 = 2;
pub const MIN_EWMA_DECAY_MS: u32 = 100;
pub const MAX_EWMA_DECAY_MS: u32 = 600_000;
pub const DEFAULT_EWMA_DECAY_MS: u32 = 10_000;
pub const MAX_ZONE_PERCENT: u32 = 100;
pub const DEFAULT_ZONE_PERCENT: u32 = 25;

pub const MAX_REQUESTS_PER_SECOND: f64 = 1_000_000.0;
pub const MAX_BURST: u32 = 1_000_000;
pub const MAX_QUEUE_WAIT_MS: u32 = 60_000;

pub const MAX_CONSECUTIVE_FAILURES: u32 = 1000;
pub const MIN_WINDOW_MS: u32 = 1000;
pub const MAX_WINDOW_MS: u32 = 600_000;
pub const DEFAULT_WINDOW_MS: u32 = 10_000;
pub const MAX_MINIMUM_REQUESTS: u32 = 100_000;
pub const DEFAULT_MINIMUM_REQUESTS: u32 = 20;
pub const MAX_SLOW_CALL_MS: u32 = 600_000;
pub const MIN_OPEN_MS: u32 = 100;
pub const MAX_OPEN_MS: u32 = 3_600_000;
pub const DEFAULT_OPEN_MS: u32 = 5000;
pub const DEFAULT_MAX_OPEN_MS: u32 = 60_000;
pub const MAX_HALF_OPEN_PROBES: u32 = 100;
pub const DEFAULT_HALF_OPEN_PROBES: u32 = 3;
pub const MAX_EJECTION_PERCENT: u32 = 100;
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 50;

pub const MAX_RETRY_ATTEMPTS: u32 = 10;
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 3;
pub const MAX_PER_TRY_TIMEOUT_MS: u32 = 600_000;
pub const MAX_BACKOFF_BASE_MS: u32 = 60_000;
pub const DEFAULT_BACKOFF_BASE_MS: u32 = 25;
pub const MAX_BACKOFF_MAX_MS: u32 = 600_000;
pub const DEFAULT_BACKOFF_MAX_MS: u32 = 1000;
pub const MAX_BUDGET_PERCENT: f64 = 100.0;
pub const DEFAULT_BUDGET_PERCENT: f64 = 20.0;

pub const MAX_TOTAL_MS: u32 = 3_600_000;

pub const MAX_AGE_SECONDS: u32 = 2_592_000;
pub const DEFAULT_MAX_AGE_SECONDS: u32 = 86_400;
pub const MAX_DELIVERY_ATTEMPTS: u32 = 1000;
pub const DEFAULT_DELIVERY_ATTEMPTS: u32 = 10;

const ALGORITHMS: &str =
    "ALGORITHM_UNSPECIFIED, ROUND_ROBIN, WEIGHTED_ROUND_ROBIN, LEAST_REQUEST, PEAK_EWMA, CONSISTENT_HASH";
const KEYS: &str = "HEADER, SUBJECT, PARTITION_KEY";
const SCOPES: &str = "SCOPE_UNSPECIFIED, PER_AGENT, GLOBAL";
const ON_EXCESS: &str = "ON_EXCESS_UNSPECIFIED, REJECT, QUEUE";
const RETRY_ONS: &str = "CONNECT_FAILURE, HTTP_5XX, HTTP_429, TIMEOUT, RESET";

/// Validates a policy for writing and normalizes it: namespace defaulted to
/// "default"; nothing else is filled (defaults stay implicit, as documented).
/// The error names the first bad field with its full path, e.g.
/// `policy.rate_limit.requests_per_second` or `policy.rules[2].retry.attempts`.
pub fn policy(p: Option<&TrafficPolicy>) -> Result<TrafficPolicy, ValidationError> {
    let p = p.ok_or_else(|| err("policy", "is required"))?;
    // First, so an oversized policy costs no more than its length.
    let size = p.encoded_len();
    if size > MAX_POLICY_BYTES {
        return Err(err(
            "policy",
            format!("must be at most {MAX_POLICY_BYTES} bytes encoded (got {size})"),
        ));
    }
    let mut p = p.clone();
    p.namespace = namespace_or_default("policy.namespace", &p.namespace)?;
    if p.service.is_empty() {
        return Err(err(
            "policy.service",
            "is required: a DNS label of 1-63 characters of a-z, 0-9 and '-'",
        ));
    }
    dns_label("policy.service", &p.service)?;
    sections(
        "policy",
        Sections {
            load_balancer: p.load_balancer.as_ref(),
            rate_limit: p.rate_limit.as_ref(),
            circuit_breaker: p.circuit_breaker.as_ref(),
            retry: p.retry.as_ref(),
            timeout: p.timeout.as_ref(),
            delivery: p.delivery.as_ref(),
        },
    )?;
    if let Some(t) = &p.tracing {
        tracing_section("policy.tracing", t)?;
    }
    if p.rules.len() > MAX_RULES {
        return Err(err(
            "policy.rules",
            format!("at most {MAX_RULES} rules (got {})", p.rules.len()),
        ));
    }
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (n, r) in p.rules.iter().enumerate() {
        let f = format!("policy.rules[{n}]");
        rule(&f, r)?;
        if let Some(first) = names.insert(&r.name, n) {
            return Err(err(
                format!("{f}.name"),
                format!(
                    "must be unique: rules[{first}] is also named {}",
                    shown(&r.name)
                ),
            ));
        }
    }
    Ok(p)
}

/// The sections a scope (the defaults or a rule) may set.
struct Sections<'a> {
    load_balancer: Option<&'a LoadBalancer>,
    rate_limit: Option<&'a RateLimit>,
    circuit_breaker: Option<&'a CircuitBreaker>,
    retry: Option<&'a Retry>,
    timeout: Option<&'a Timeout>,
    delivery: Option<&'a Delivery>,
}

fn sections(f: &str, s: Sections<'_>) -> Result<(), ValidationError> {
    if let Some(lb) = s.load_balancer {
        load_balancer(&format!("{f}.load_balancer"), lb)?;
    }
    if let Some(rl) = s.rate_limit {
        rate_limit(&format!("{f}.rate_limit"), rl)?;
    }
    if let Some(cb) = s.circuit_breaker {
        circuit_breaker(&format!("{f}.circuit_breaker"), cb)?;
    }
    if let Some(r) = s.retry {
        retry(&format!("{f}.retry"), r)?;
    }
    if let Some(t) = s.timeout {
        timeout(&format!("{f}.timeout"), t)?;
    }
    if let Some(d) = s.delivery {
        delivery(&format!("{f}.delivery"), d)?;
    }
    // Within one scope, an attempt cannot be allowed longer than the whole.
    if let (Some(r), Some(t)) = (s.retry, s.timeout) {
        if r.per_try_timeout_ms != 0 && t.total_ms != 0 && r.per_try_timeout_ms > t.total_ms {
            return Err(err(
                format!("{f}.retry.per_try_timeout_ms"),
                format!(
                    "must be at most timeout.total_ms ({}) (got {})",
                    t.total_ms, r.per_try_timeout_ms
                ),
            ));
        }
    }
    Ok(())
}

fn rule(f: &str, r: &Rule) -> Result<(), ValidationError> {
    if r.name.is_empty() {
        return Err(err(
            format!("{f}.name"),
            "is required: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit",
        ));
    }
    dns_label(&format!("{f}.name"), &r.name)?;
    let m = r
        .r#match
        .as_ref()
        .ok_or_else(|| err(format!("{f}.match"), "is required"))?;
    event_match(&format!("{f}.match"), m)?;
    sections(
        f,
        Sections {
            load_balancer: r.load_balancer.as_ref(),
            rate_limit: r.rate_limit.as_ref(),
            circuit_breaker: r.circuit_breaker.as_ref(),
            retry: r.retry.as_ref(),
            timeout: r.timeout.as_ref(),
            delivery: r.delivery.as_ref(),
        },
    )
}

fn event_match(f: &str, m: &EventMatch) -> Result<(), ValidationError> {
    if m.type_exact.is_empty() && m.type_prefix.is_empty() && m.source.is_empty() {
        return Err(err(
            f,
            "must set at least one of type_exact, type_prefix and source",
        ));
    }
    match_text(&format!("{f}.type_exact"), &m.type_exact)?;
    match_text(&format!("{f}.type_prefix"), &m.type_prefix)?;
    match_text(&format!("{f}.source"), &m.source)?;
    if !m.type_exact.is_empty() && !m.type_prefix.is_empty() {
        return Err(err(
            format!("{f}.type_prefix"),
            "must be empty when type_exact is set (they are exclusive)",
        ));
    }
    Ok(())
}

/// At most 255 printable ASCII characters (space included); empty = unset.
fn match_text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() <= MAX_MATCH_LEN && value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "must be at most {MAX_MATCH_LEN} printable ASCII characters (got {}, {} bytes)",
                shown(value),
                value.len()
            ),
        ))
    }
}

fn load_balancer(f: &str, lb: &LoadBalancer) -> Result<(), ValidationError> {
    use load_balancer::Algorithm;
    let algorithm = Algorithm::try_from(lb.algorithm).map_err(|_| {
        err(
            format!("{f}.algorithm"),
            format!("must be one of {ALGORITHMS} (got {})", lb.algorithm),
        )
    })?;
    if algorithm == Algorithm::LeastRequest {
        if lb.choices != 0 && !(MIN_CHOICES..=MAX_CHOICES).contains(&lb.choices) {
            return Err(err(
                format!("{f}.choices"),
                format!(
                    "must be 0 (default {DEFAULT_CHOICES}) or {MIN_CHOICES}-{MAX_CHOICES} (got {})",
                    lb.choices
                ),
            ));
        }
    } else if lb.choices != 0 {
        return Err(err(
            format!("{f}.choices"),
            format!(
                "must be 0 unless algorithm is LEAST_REQUEST (got {} with {})",
                lb.choices,
                algorithm.as_str_name()
            ),
        ));
    }
    if algorithm == Algorithm::PeakEwma {
        if lb.ewma_decay_ms != 0
            && !(MIN_EWMA_DECAY_MS..=MAX_EWMA_DECAY_MS).contains(&lb.ewma_decay_ms)
        {
            return Err(err(
                format!("{f}.ewma_decay_ms"),
                format!(
                    "must be 0 (default {DEFAULT_EWMA_DECAY_MS}) or {MIN_EWMA_DECAY_MS}-{MAX_EWMA_DECAY_MS} (got {})",
                    lb.ewma_decay_ms
                ),
            ));
        }
    } else if lb.ewma_decay_ms != 0 {
        return Err(err(
            format!("{f}.ewma_decay_ms"),
            format!(
                "must be 0 unless algorithm is PEAK_EWMA (got {} with {})",
                lb.ewma_decay_ms,
                algorithm.as_str_name()
            ),
        ));
    }
    if let Some(zp) = &lb.zone_preference {
        zone_preference(&format!("{f}.zone_preference"), zp)?;
    }
    let f = format!("{f}.consistent_hash");
    match (algorithm == Algorithm::ConsistentHash, &lb.consistent_hash) {
        (true, Some(ch)) => consistent_hash(&f, ch),
        (true, None) => Err(err(f, "is required with algorithm CONSISTENT_HASH")),
        (false, None) => Ok(()),
        (false, Some(_)) => Err(err(
            f,
            format!(
                "must be unset unless algorithm is CONSISTENT_HASH (got it with {})",
                algorithm.as_str_name()
            ),
        )),
    }
}

fn zone_preference(f: &str, zp: &ZonePreference) -> Result<(), ValidationError> {
    let field = format!("{f}.min_usable_percent");
    if !zp.enabled {
        if zp.min_usable_percent != 0 {
            return Err(err(
                field,
                format!(
                    "must be 0 unless enabled is true (got {})",
                    zp.min_usable_percent
                ),
            ));
        }
    } else if zp.min_usable_percent > MAX_ZONE_PERCENT {
        return Err(err(
            field,
            format!(
                "must be 0 (default {DEFAULT_ZONE_PERCENT}) or 1-{MAX_ZONE_PERCENT} percent (got {})",
                zp.min_usable_percent
            ),
        ));
    }
    Ok(())
}

fn consistent_hash(f: &str, ch: &ConsistentHash) -> Result<(), ValidationError> {
    use consistent_hash::Key;
    let key = match Key::try_from(ch.key) {
        Ok(Key::Unspecified) => {
            return Err(err(
                format!("{f}.key"),
                format!("is required: one of {KEYS} (got KEY_UNSPECIFIED)"),
            ))
        }
        Ok(key) => key,
        Err(_) => {
            return Err(err(
                format!("{f}.key"),
                format!("must be one of {KEYS} (got {})", ch.key),
            ))
        }
    };
    let field = format!("{f}.header");
    if key == Key::Header {
        const RULE: &str = "a lowercase header name: 1-128 characters of a-z, 0-9, '-' and '_'";
        if ch.header.is_empty() {
            return Err(err(field, format!("is required with key HEADER: {RULE}")));
        }
        let ok = ch.header.len() <= MAX_HEADER_LEN
            && ch
                .header
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(err(
                field,
                format!("must be {RULE} (got {})", shown(&ch.header)),
            ));
        }
    } else if !ch.header.is_empty() {
        return Err(err(
            field,
            format!(
                "must be empty unless key is HEADER (got {} with {})",
                shown(&ch.header),
                key.as_str_name()
            ),
        ));
    }
    Ok(())
}

fn rate_limit(f: &str, rl: &RateLimit) -> Result<(), ValidationError> {
    use rate_limit::{OnExcess, Scope};
    let field = format!("{f}.requests_per_second");
    finite(&field, rl.requests_per_second)?;
    if rl.requests_per_second == 0.0 {
        return Err(err(
            field,
            format!(
                "is required: > 0 and at most {MAX_REQUESTS_PER_SECOND} events per second (got 0)"
            ),
        ));
    }
    if rl.requests_per_second < 0.0 || rl.requests_per_second > MAX_REQUESTS_PER_SECOND {
        return Err(err(
            field,
            format!(
                "must be > 0 and at most {MAX_REQUESTS_PER_SECOND} events per second (got {})",
                rl.requests_per_second
            ),
        ));
    }
    if rl.burst > MAX_BURST {
        return Err(err(
            format!("{f}.burst"),
            format!(
                "must be 0 (default ceil(requests_per_second)) or 1-{MAX_BURST} (got {})",
                rl.burst
            ),
        ));
    }
    if Scope::try_from(rl.scope).is_err() {
        return Err(err(
            format!("{f}.scope"),
            format!("must be one of {SCOPES} (got {})", rl.scope),
        ));
    }
    let on_excess = OnExcess::try_from(rl.on_excess).map_err(|_| {
        err(
            format!("{f}.on_excess"),
            format!("must be one of {ON_EXCESS} (got {})", rl.on_excess),
        )
    })?;
    let field = format!("{f}.max_queue_wait_ms");
    if on_excess == OnExcess::Queue {
        if !(1..=MAX_QUEUE_WAIT_MS).contains(&rl.max_queue_wait_ms) {
            return Err(err(
                field,
                format!(
                    "must be 1-{MAX_QUEUE_WAIT_MS} with on_excess QUEUE (got {})",
                    rl.max_queue_wait_ms
                ),
            ));
        }
    } else if rl.max_queue_wait_ms != 0 {
        return Err(err(
            field,
            format!(
                "must be 0 unless on_excess is QUEUE (got {} with {})",
                rl.max_queue_wait_ms,
                on_excess.as_str_name()
            ),
        ));
    }
    Ok(())
}

fn circuit_breaker(f: &str, cb: &CircuitBreaker) -> Result<(), ValidationError> {
    if cb.consecutive_failures > MAX_CONSECUTIVE_FAILURES {
        return Err(err(
            format!("{f}.consecutive_failures"),
            format!(
                "must be 0 (off) or 1-{MAX_CONSECUTIVE_FAILURES} (got {})",
                cb.consecutive_failures
            ),
        ));
    }
    let field = format!("{f}.failure_ratio");
    finite(&field, cb.failure_ratio)?;
    if cb.failure_ratio != 0.0 && !in_unit(cb.failure_ratio) {
        return Err(err(
            field,
            format!("must be 0 (off) or in (0, 1] (got {})", cb.failure_ratio),
        ));
    }
    if cb.window_ms != 0 && !(MIN_WINDOW_MS..=MAX_WINDOW_MS).contains(&cb.window_ms) {
        return Err(err(
            format!("{f}.window_ms"),
            format!(
                "must be 0 (default {DEFAULT_WINDOW_MS}) or {MIN_WINDOW_MS}-{MAX_WINDOW_MS} (got {})",
                cb.window_ms
            ),
        ));
    }
    if cb.minimum_requests > MAX_MINIMUM_REQUESTS {
        return Err(err(
            format!("{f}.minimum_requests"),
            format!(
                "must be 0 (default {DEFAULT_MINIMUM_REQUESTS}) or 1-{MAX_MINIMUM_REQUESTS} (got {})",
                cb.minimum_requests
            ),
        ));
    }
    if cb.slow_call_ms > MAX_SLOW_CALL_MS {
        return Err(err(
            format!("{f}.slow_call_ms"),
            format!(
                "must be 0 (off) or 1-{MAX_SLOW_CALL_MS} (got {})",
                cb.slow_call_ms
            ),
        ));
    }
    let field = format!("{f}.slow_call_ratio");
    finite(&field, cb.slow_call_ratio)?;
    if cb.slow_call_ms != 0 {
        if !in_unit(cb.slow_call_ratio) {
            return Err(err(
                field,
                format!(
                    "is required with slow_call_ms: must be in (0, 1] (got {})",
                    cb.slow_call_ratio
                ),
            ));
        }
    } else if cb.slow_call_ratio != 0.0 {
        return Err(err(
            field,
            format!(
                "must be 0 unless slow_call_ms is set (got {})",
                cb.slow_call_ratio
            ),
        ));
    }
    if cb.open_ms != 0 && !(MIN_OPEN_MS..=MAX_OPEN_MS).contains(&cb.open_ms) {
        return Err(err(
            format!("{f}.open_ms"),
            format!(
                "must be 0 (default {DEFAULT_OPEN_MS}) or {MIN_OPEN_MS}-{MAX_OPEN_MS} (got {})",
                cb.open_ms
            ),
        ));
    }
    let open_ms = if cb.open_ms == 0 {
        DEFAULT_OPEN_MS
    } else {
        cb.open_ms
    };
    if cb.max_open_ms != 0 && !(open_ms..=MAX_OPEN_MS).contains(&cb.max_open_ms) {
        return Err(err(
            format!("{f}.max_open_ms"),
            format!(
                "must be 0 (default {DEFAULT_MAX_OPEN_MS}) or open_ms ({open_ms})-{MAX_OPEN_MS} (got {})",
                cb.max_open_ms
            ),
        ));
    }
    if cb.half_open_probes > MAX_HALF_OPEN_PROBES {
        return Err(err(
            format!("{f}.half_open_probes"),
            format!(
                "must be 0 (default {DEFAULT_HALF_OPEN_PROBES}) or 1-{MAX_HALF_OPEN_PROBES} (got {})",
                cb.half_open_probes
            ),
        ));
    }
    if cb.max_ejection_percent > MAX_EJECTION_PERCENT {
        return Err(err(
            format!("{f}.max_ejection_percent"),
            format!(
                "must be 0 (default {DEFAULT_MAX_EJECTION_PERCENT}) or 1-{MAX_EJECTION_PERCENT} (got {})",
                cb.max_ejection_percent
            ),
        ));
    }
    if cb.consecutive_failures == 0 && cb.failure_ratio == 0.0 && cb.slow_call_ms == 0 {
        return Err(err(
            f,
            "must set at least one trigger: consecutive_failures, failure_ratio or slow_call_ms",
        ));
    }
    Ok(())
}

fn retry(f: &str, r: &Retry) -> Result<(), ValidationError> {
    if r.attempts > MAX_RETRY_ATTEMPTS {
        return Err(err(
            format!("{f}.attempts"),
            format!(
                "must be 0 (default {DEFAULT_RETRY_ATTEMPTS}) or 1-{MAX_RETRY_ATTEMPTS} (got {})",
                r.attempts
            ),
        ));
    }
    if r.per_try_timeout_ms > MAX_PER_TRY_TIMEOUT_MS {
        return Err(err(
            format!("{f}.per_try_timeout_ms"),
            format!(
                "must be 0 (none) or 1-{MAX_PER_TRY_TIMEOUT_MS} (got {})",
                r.per_try_timeout_ms
            ),
        ));
    }
    if r.backoff_base_ms > MAX_BACKOFF_BASE_MS {
        return Err(err(
            format!("{f}.backoff_base_ms"),
            format!(
                "must be 0 (default {DEFAULT_BACKOFF_BASE_MS}) or 1-{MAX_BACKOFF_BASE_MS} (got {})",
                r.backoff_base_ms
            ),
        ));
    }
    let base = if r.backoff_base_ms == 0 {
        DEFAULT_BACKOFF_BASE_MS
    } else {
        r.backoff_base_ms
    };
    if r.backoff_max_ms != 0 && !(base..=MAX_BACKOFF_MAX_MS).contains(&r.backoff_max_ms) {
        return Err(err(
            format!("{f}.backoff_max_ms"),
            format!(
                "must be 0 (default {DEFAULT_BACKOFF_MAX_MS}) or backoff_base_ms ({base})-{MAX_BACKOFF_MAX_MS} (got {})",
                r.backoff_max_ms
            ),
        ));
    }
    let mut seen: HashMap<i32, usize> = HashMap::new();
    for (n, &value) in r.retry_on.iter().enumerate() {
        let field = format!("{f}.retry_on[{n}]");
        match RetryOn::try_from(value) {
            Ok(RetryOn::Unspecified) => {
                return Err(err(
                    field,
                    format!("must be one of {RETRY_ONS} (got RETRY_ON_UNSPECIFIED)"),
                ))
            }
            Ok(on) => {
                if let Some(first) = seen.insert(value, n) {
                    return Err(err(
                        field,
                        format!("duplicate {} (also retry_on[{first}])", on.as_str_name()),
                    ));
                }
            }
            Err(_) => {
                return Err(err(
                    field,
                    format!("must be one of {RETRY_ONS} (got {value})"),
                ))
            }
        }
    }
    let field = format!("{f}.budget_percent");
    finite(&field, r.budget_percent)?;
    if !(0.0..=MAX_BUDGET_PERCENT).contains(&r.budget_percent) {
        return Err(err(
            field,
            format!(
                "must be 0 (default {DEFAULT_BUDGET_PERCENT}) or in (0, {MAX_BUDGET_PERCENT}] percent (got {})",
                r.budget_percent
            ),
        ));
    }
    Ok(())
}

fn timeout(f: &str, t: &Timeout) -> Result<(), ValidationError> {
    if t.total_ms == 0 {
        return Err(err(
            format!("{f}.total_ms"),
            format!("is required: 1-{MAX_TOTAL_MS} (got 0)"),
        ));
    }
    if t.total_ms > MAX_TOTAL_MS {
        return Err(err(
            format!("{f}.total_ms"),
            format!("must be 1-{MAX_TOTAL_MS} (got {})", t.total_ms),
        ));
    }
    Ok(())
}

/// Longest `tracing.slow_ms`: an hour.
pub const MAX_SLOW_MS: u32 = 3_600_000;

fn tracing_section(f: &str, t: &Tracing) -> Result<(), ValidationError> {
    if let Some(rate) = t.sample_rate {
        if !(0.0..=1.0).contains(&rate) {
            return Err(err(
                format!("{f}.sample_rate"),
                format!("must be 0-1 (got {rate})"),
            ));
        }
    }
    if t.slow_ms > MAX_SLOW_MS {
        return Err(err(
            format!("{f}.slow_ms"),
            format!(
                "must be 0 (the agent's default) or 1-{MAX_SLOW_MS} (got {})",
                t.slow_ms
            ),
        ));
    }
    Ok(())
}

fn delivery(f: &str, d: &Delivery) -> Result<(), ValidationError> {
    if d.max_age_seconds > MAX_AGE_SECONDS {
        return Err(err(
            format!("{f}.max_age_seconds"),
            format!(
                "must be 0 (default {DEFAULT_MAX_AGE_SECONDS}) or 1-{MAX_AGE_SECONDS} (got {})",
                d.max_age_seconds
            ),
        ));
    }
    if d.max_attempts > MAX_DELIVERY_ATTEMPTS {
        return Err(err(
            format!("{f}.max_attempts"),
            format!(
                "must be 0 (default {DEFAULT_DELIVERY_ATTEMPTS}) or 1-{MAX_DELIVERY_ATTEMPTS} (got {})",
                d.max_attempts
            ),
        ));
    }
    if !d.compensation_topic.is_empty() && !valid_topic(&d.compensation_topic) {
        return Err(err(
            format!("{f}.compensation_topic"),
            format!(
                "must be empty or 1-{MAX_TOPIC_LEN} printable ASCII characters without spaces (got {})",
                shown(&d.compensation_topic)
            ),
        ));
    }
    Ok(())
}

/// NaN and the infinities are never valid.
fn finite(field: &str, value: f64) -> Result<(), ValidationError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(err(field, format!("must be a finite number (got {value})")))
    }
}

/// In (0, 1].
fn in_unit(value: f64) -> bool {
    value > 0.0 && value <= 1.0
}

#[cfg(test)]
mod tests {
    use load_balancer::Algorithm;
    use rate_limit::{OnExcess, Scope};

    use super::*;

    /// Every section in the defaults and in rules[0]; rules[1] is minimal.
    fn valid() -> TrafficPolicy {
        TrafficPolicy {
            namespace: "shop".into(),
            service: "orders".into(),
            load_balancer: Some(LoadBalancer {
                algorithm: Algorithm::PeakEwma as i32,
                ewma_decay_ms: 30_000,
                ..LoadBalancer::default()
            }),
            rate_limit: Some(RateLimit {
                requests_per_second: 250.5,
                burst: 500,
                scope: Scope::Global as i32,
                on_excess: OnExcess::Queue as i32,
                max_queue_wait_ms: 500,
                shadow: true,
            }),
            circuit_breaker: Some(CircuitBreaker {
                consecutive_failures: 5,
                failure_ratio: 0.5,
                window_ms: 10_000,
                minimum_requests: 20,
                slow_call_ms: 1000,
                slow_call_ratio: 0.5,
                open_ms: 1000,
                max_open_ms: 30_000,
                half_open_probes: 3,
                max_ejection_percent: 50,
                shadow: false,
            }),
            retry: Some(Retry {
                attempts: 3,
                per_try_timeout_ms: 1000,
                backoff_base_ms: 50,
                backoff_max_ms: 2000,
                retry_on: vec![RetryOn::ConnectFailure as i32, RetryOn::Http5xx as i32],
                budget_percent: 20.0,
                shadow: false,
            }),
            timeout: Some(Timeout {
                total_ms: 5000,
                shadow: false,
            }),
            delivery: Some(Delivery {
                durable_outbox: true,
                max_age_seconds: 3600,
                max_attempts: 20,
                dead_letter: true,
                ordered: true,
                compensation_topic: "orders.failed".into(),
                shadow: false,
            }),
            tracing: Some(Tracing {
                sample_rate: Some(0.25),
                slow_ms: 500,
            }),
            rules: vec![
                Rule {
                    name: "payments".into(),
                    r#match: Some(EventMatch {
                        type_exact: "com.example.payment.created".into(),
                        type_prefix: String::new(),
                        source: "/payments".into(),
                    }),
                    load_balancer: Some(LoadBalancer {
                        algorithm: Algorithm::ConsistentHash as i32,
                        consistent_hash: Some(ConsistentHash {
                            key: consistent_hash::Key::Header as i32,
                            header: "x-user_id".into(),
                        }),
                        ..LoadBalancer::default()
                    }),
                    rate_limit: Some(RateLimit {
                        requests_per_second: 10.0,
                        on_excess: OnExcess::Reject as i32,
                        ..RateLimit::default()
                    }),
                    circuit_breaker: Some(CircuitBreaker {
                        consecutive_failures: 3,
                        ..CircuitBreaker::default()
                    }),
                    retry: Some(Retry {
                        attempts: 2,
                        per_try_timeout_ms: 200,
                        ..Retry::default()
                    }),
                    timeout: Some(Timeout {
                        total_ms: 1000,
                        shadow: true,
                    }),
                    delivery: Some(Delivery {
                        max_attempts: 5,
                        ..Delivery::default()
                    }),
                },
                Rule {
                    name: "audit".into(),
                    r#match: Some(EventMatch {
                        type_prefix: "com.example.audit.".into(),
                        ..EventMatch::default()
                    }),
                    load_balancer: Some(LoadBalancer {
                        algorithm: Algorithm::LeastRequest as i32,
                        choices: 3,
                        ..LoadBalancer::default()
                    }),
                    ..Rule::default()
                },
            ],
        }
    }

    fn lb(p: &mut TrafficPolicy) -> &mut LoadBalancer {
        p.load_balancer.as_mut().expect("load_balancer")
    }
    fn rl(p: &mut TrafficPolicy) -> &mut RateLimit {
        p.rate_limit.as_mut().expect("rate_limit")
    }
    fn cb(p: &mut TrafficPolicy) -> &mut CircuitBreaker {
        p.circuit_breaker.as_mut().expect("circuit_breaker")
    }
    fn rt(p: &mut TrafficPolicy) -> &mut Retry {
        p.retry.as_mut().expect("retry")
    }
    fn to(p: &mut TrafficPolicy) -> &mut Timeout {
        p.timeout.as_mut().expect("timeout")
    }
    fn dl(p: &mut TrafficPolicy) -> &mut Delivery {
        p.delivery.as_mut().expect("delivery")
    }
    fn tr(p: &mut TrafficPolicy) -> &mut Tracing {
        p.tracing.as_mut().expect("tracing")
    }
    fn r0(p: &mut TrafficPolicy) -> &mut Rule {
        &mut p.rules[0]
    }
    fn m0(p: &mut TrafficPolicy) -> &mut EventMatch {
        r0(p).r#match.as_mut().expect("match")
    }
    fn r0_lb(p: &mut TrafficPolicy) -> &mut LoadBalancer {
        r0(p).load_balancer.as_mut().expect("load_balancer")
    }
    fn r0_ch(p: &mut TrafficPolicy) -> &mut ConsistentHash {
        r0_lb(p).consistent_hash.as_mut().expect("consistent_hash")
    }
    fn r0_rl(p: &mut TrafficPolicy) -> &mut RateLimit {
        r0(p).rate_limit.as_mut().expect("rate_limit")
    }
    fn r0_cb(p: &mut TrafficPolicy) -> &mut CircuitBreaker {
        r0(p).circuit_breaker.as_mut().expect("circuit_breaker")
    }
    fn r0_rt(p: &mut TrafficPolicy) -> &mut Retry {
        r0(p).retry.as_mut().expect("retry")
    }
    fn r0_to(p: &mut TrafficPolicy) -> &mut Timeout {
        r0(p).timeout.as_mut().expect("timeout")
    }
    fn r0_dl(p: &mut TrafficPolicy) -> &mut Delivery {
        r0(p).delivery.as_mut().expect("delivery")
    }
    fn r1_lb(p: &mut TrafficPolicy) -> &mut LoadBalancer {
        p.rules[1].load_balancer.as_mut().expect("load_balancer")
    }

    type Mutation = fn(&mut TrafficPolicy);

    /// (expected field, a word the rule must mention, the one change).
    fn cases() -> Vec<(&'static str, &'static str, Mutation)> {
        vec![
            // Identity.
            ("policy.namespace", "DNS label", |p| {
                p.namespace = "Shop".into()
            }),
            ("policy.namespace", "DNS label", |p| {
                p.namespace = "a_b".into()
            }),
            ("policy.namespace", "DNS label", |p| {
                p.namespace = "a".repeat(64)
            }),
            ("policy.service", "required", |p| p.service = String::new()),
            ("policy.service", "DNS label", |p| {
                p.service = "Orders".into()
            }),
            ("policy.service", "DNS label", |p| {
                p.service = "-orders".into()
            }),
            ("policy.service", "DNS label", |p| {
                p.service = "orders-".into()
            }),
            ("policy.service", "DNS label", |p| {
                p.service = "o".repeat(64)
            }),
            ("policy", "262144 bytes", |p| {
                m0(p).source = "s".repeat(300_000)
            }),
            // Rules.
            ("policy.rules", "at most 64", |p| {
                let rule = p.rules[1].clone();
                p.rules = (0..65)
                    .map(|n| Rule {
                        name: format!("r{n}"),
                        ..rule.clone()
                    })
                    .collect();
            }),
            ("policy.rules[0].name", "required", |p| {
                r0(p).name = String::new()
            }),
            ("policy.rules[0].name", "DNS label", |p| {
                r0(p).name = "Pay_ments".into()
            }),
            ("policy.rules[0].name", "DNS label", |p| {
                r0(p).name = "-payments".into()
            }),
            ("policy.rules[0].name", "DNS label", |p| {
                r0(p).name = "n".repeat(64)
            }),
            ("policy.rules[1].name", "unique", |p| {
                p.rules[1].name = "payments".into()
            }),
            ("policy.rules[0].match", "required", |p| {
                r0(p).r#match = None
            }),
            ("policy.rules[0].match", "at least one", |p| {
                r0(p).r#match = Some(EventMatch::default())
            }),
            ("policy.rules[0].match.type_prefix", "exclusive", |p| {
                m0(p).type_prefix = "com.".into()
            }),
            ("policy.rules[0].match.type_exact", "255", |p| {
                m0(p).type_exact = "t".repeat(256)
            }),
            ("policy.rules[0].match.type_exact", "printable", |p| {
                m0(p).type_exact = "a\nb".into()
            }),
            ("policy.rules[1].match.type_prefix", "255", |p| {
                p.rules[1].r#match = Some(EventMatch {
                    type_prefix: "t".repeat(256),
                    ..EventMatch::default()
                })
            }),
            ("policy.rules[0].match.source", "printable", |p| {
                m0(p).source = "/paiements/é".into()
            }),
            ("policy.rules[0].match.source", "255", |p| {
                m0(p).source = "s".repeat(256)
            }),
            // Load balancer.
            ("policy.load_balancer.algorithm", "PEAK_EWMA", |p| {
                lb(p).algorithm = 99
            }),
            ("policy.load_balancer.algorithm", "got -1", |p| {
                lb(p).algorithm = -1
            }),
            ("policy.load_balancer.ewma_decay_ms", "100-600000", |p| {
                lb(p).ewma_decay_ms = 99
            }),
            ("policy.load_balancer.ewma_decay_ms", "100-600000", |p| {
                lb(p).ewma_decay_ms = 600_001
            }),
            ("policy.load_balancer.ewma_decay_ms", "PEAK_EWMA", |p| {
                lb(p).algorithm = Algorithm::RoundRobin as i32
            }),
            ("policy.load_balancer.choices", "LEAST_REQUEST", |p| {
                lb(p).choices = 2
            }),
            (
                "policy.load_balancer.zone_preference.min_usable_percent",
                "1-100",
                |p| {
                    lb(p).zone_preference = Some(ZonePreference {
                        enabled: true,
                        min_usable_percent: 101,
                    })
                },
            ),
            (
                "policy.rules[1].load_balancer.zone_preference.min_usable_percent",
                "unless enabled",
                |p| {
                    r1_lb(p).zone_preference = Some(ZonePreference {
                        enabled: false,
                        min_usable_percent: 50,
                    })
                },
            ),
            (
                "policy.load_balancer.consistent_hash",
                "CONSISTENT_HASH",
                |p| {
                    lb(p).consistent_hash = Some(ConsistentHash {
                        key: consistent_hash::Key::Subject as i32,
                        header: String::new(),
                    })
                },
            ),
            ("policy.rules[1].load_balancer.choices", "2-8", |p| {
                r1_lb(p).choices = 1
            }),
            ("policy.rules[1].load_balancer.choices", "2-8", |p| {
                r1_lb(p).choices = 9
            }),
            (
                "policy.rules[1].load_balancer.ewma_decay_ms",
                "PEAK_EWMA",
                |p| r1_lb(p).ewma_decay_ms = 1000,
            ),
            (
                "policy.rules[0].load_balancer.algorithm",
                "CONSISTENT_HASH",
                |p| r0_lb(p).algorithm = 6,
            ),
            (
                "policy.rules[0].load_balancer.choices",
                "LEAST_REQUEST",
                |p| r0_lb(p).choices = 3,
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash",
                "required",
                |p| r0_lb(p).consistent_hash = None,
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash",
                "CONSISTENT_HASH",
                |p| r0_lb(p).algorithm = Algorithm::WeightedRoundRobin as i32,
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.key",
                "required",
                |p| r0_ch(p).key = 0,
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.key",
                "got 99",
                |p| r0_ch(p).key = 99,
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.header",
                "required",
                |p| r0_ch(p).header = String::new(),
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.header",
                "lowercase",
                |p| r0_ch(p).header = "X-User".into(),
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.header",
                "1-128",
                |p| r0_ch(p).header = "h".repeat(129),
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.header",
                "lowercase",
                |p| r0_ch(p).header = "x.user".into(),
            ),
            (
                "policy.rules[0].load_balancer.consistent_hash.header",
                "unless key is HEADER",
                |p| r0_ch(p).key = consistent_hash::Key::PartitionKey as i32,
            ),
            // Rate limit.
            ("policy.rate_limit.requests_per_second", "required", |p| {
                rl(p).requests_per_second = 0.0
            }),
            ("policy.rate_limit.requests_per_second", "> 0", |p| {
                rl(p).requests_per_second = -1.0
            }),
            ("policy.rate_limit.requests_per_second", "1000000", |p| {
                rl(p).requests_per_second = 1_000_000.5
            }),
            ("policy.rate_limit.requests_per_second", "finite", |p| {
                rl(p).requests_per_second = f64::NAN
            }),
            ("policy.rate_limit.requests_per_second", "finite", |p| {
                rl(p).requests_per_second = f64::INFINITY
            }),
            ("policy.rate_limit.burst", "1-1000000", |p| {
                rl(p).burst = 1_000_001
            }),
            ("policy.rate_limit.scope", "PER_AGENT", |p| rl(p).scope = 3),
            ("policy.rate_limit.on_excess", "QUEUE", |p| {
                rl(p).on_excess = 3
            }),
            ("policy.rate_limit.max_queue_wait_ms", "1-60000", |p| {
                rl(p).max_queue_wait_ms = 0
            }),
            ("policy.rate_limit.max_queue_wait_ms", "1-60000", |p| {
                rl(p).max_queue_wait_ms = 60_001
            }),
            (
                "policy.rate_limit.max_queue_wait_ms",
                "unless on_excess is QUEUE",
                |p| rl(p).on_excess = OnExcess::Reject as i32,
            ),
            (
                "policy.rate_limit.max_queue_wait_ms",
                "unless on_excess is QUEUE",
                |p| rl(p).on_excess = OnExcess::Unspecified as i32,
            ),
            (
                "policy.rules[0].rate_limit.requests_per_second",
                "required",
                |p| r0_rl(p).requests_per_second = 0.0,
            ),
            (
                "policy.rules[0].rate_limit.requests_per_second",
                "finite",
                |p| r0_rl(p).requests_per_second = f64::NEG_INFINITY,
            ),
            ("policy.rules[0].rate_limit.burst", "1000000", |p| {
                r0_rl(p).burst = u32::MAX
            }),
            ("policy.rules[0].rate_limit.scope", "GLOBAL", |p| {
                r0_rl(p).scope = -5
            }),
            ("policy.rules[0].rate_limit.on_excess", "REJECT", |p| {
                r0_rl(p).on_excess = 7
            }),
            (
                "policy.rules[0].rate_limit.max_queue_wait_ms",
                "unless on_excess is QUEUE",
                |p| r0_rl(p).max_queue_wait_ms = 5,
            ),
            (
                "policy.rules[0].rate_limit.max_queue_wait_ms",
                "1-60000",
                |p| r0_rl(p).on_excess = OnExcess::Queue as i32,
            ),
            // Circuit breaker.
            (
                "policy.circuit_breaker.consecutive_failures",
                "1-1000",
                |p| cb(p).consecutive_failures = 1001,
            ),
            ("policy.circuit_breaker.failure_ratio", "(0, 1]", |p| {
                cb(p).failure_ratio = 1.5
            }),
            ("policy.circuit_breaker.failure_ratio", "(0, 1]", |p| {
                cb(p).failure_ratio = -0.1
            }),
            ("policy.circuit_breaker.failure_ratio", "finite", |p| {
                cb(p).failure_ratio = f64::NAN
            }),
            ("policy.circuit_breaker.failure_ratio", "finite", |p| {
                cb(p).failure_ratio = f64::INFINITY
            }),
            ("policy.circuit_breaker.window_ms", "1000-600000", |p| {
                cb(p).window_ms = 999
            }),
            ("policy.circuit_breaker.window_ms", "1000-600000", |p| {
                cb(p).window_ms = 600_001
            }),
            ("policy.circuit_breaker.minimum_requests", "1-100000", |p| {
                cb(p).minimum_requests = 100_001
            }),
            ("policy.circuit_breaker.slow_call_ms", "1-600000", |p| {
                cb(p).slow_call_ms = 600_001
            }),
            ("policy.circuit_breaker.slow_call_ratio", "required", |p| {
                cb(p).slow_call_ratio = 0.0
            }),
            ("policy.circuit_breaker.slow_call_ratio", "(0, 1]", |p| {
                cb(p).slow_call_ratio = 1.01
            }),
            ("policy.circuit_breaker.slow_call_ratio", "(0, 1]", |p| {
                cb(p).slow_call_ratio = -0.5
            }),
            ("policy.circuit_breaker.slow_call_ratio", "finite", |p| {
                cb(p).slow_call_ratio = f64::NAN
            }),
            (
                "policy.circuit_breaker.slow_call_ratio",
                "unless slow_call_ms",
                |p| cb(p).slow_call_ms = 0,
            ),
            ("policy.circuit_breaker.open_ms", "100-3600000", |p| {
                cb(p).open_ms = 99
            }),
            ("policy.circuit_breaker.open_ms", "100-3600000", |p| {
                cb(p).open_ms = 3_600_001
            }),
            (
                "policy.circuit_breaker.max_open_ms",
                "open_ms (1000)",
                |p| cb(p).max_open_ms = 999,
            ),
            ("policy.circuit_breaker.max_open_ms", "3600000", |p| {
                cb(p).max_open_ms = 3_600_001
            }),
            (
                "policy.circuit_breaker.max_open_ms",
                "open_ms (40000)",
                |p| cb(p).open_ms = 40_000,
            ),
            ("policy.circuit_breaker.half_open_probes", "1-100", |p| {
                cb(p).half_open_probes = 101
            }),
            (
                "policy.circuit_breaker.max_ejection_percent",
                "1-100",
                |p| cb(p).max_ejection_percent = 101,
            ),
            (
                "policy.rules[0].circuit_breaker",
                "at least one trigger",
                |p| r0_cb(p).consecutive_failures = 0,
            ),
            (
                "policy.rules[0].circuit_breaker.consecutive_failures",
                "1000",
                |p| r0_cb(p).consecutive_failures = 5000,
            ),
            (
                "policy.rules[0].circuit_breaker.failure_ratio",
                "(0, 1]",
                |p| r0_cb(p).failure_ratio = 2.0,
            ),
            (
                "policy.rules[0].circuit_breaker.failure_ratio",
                "finite",
                |p| r0_cb(p).failure_ratio = f64::NEG_INFINITY,
            ),
            (
                "policy.rules[0].circuit_breaker.window_ms",
                "1000-600000",
                |p| r0_cb(p).window_ms = 1,
            ),
            (
                "policy.rules[0].circuit_breaker.minimum_requests",
                "100000",
                |p| r0_cb(p).minimum_requests = 200_000,
            ),
            (
                "policy.rules[0].circuit_breaker.slow_call_ms",
                "600000",
                |p| r0_cb(p).slow_call_ms = 700_000,
            ),
            (
                "policy.rules[0].circuit_breaker.slow_call_ratio",
                "required",
                |p| r0_cb(p).slow_call_ms = 100,
            ),
            (
                "policy.rules[0].circuit_breaker.slow_call_ratio",
                "unless slow_call_ms",
                |p| r0_cb(p).slow_call_ratio = 0.5,
            ),
            (
                "policy.rules[0].circuit_breaker.slow_call_ratio",
                "finite",
                |p| r0_cb(p).slow_call_ratio = f64::INFINITY,
            ),
            (
                "policy.rules[0].circuit_breaker.open_ms",
                "100-3600000",
                |p| r0_cb(p).open_ms = 50,
            ),
            (
                "policy.rules[0].circuit_breaker.max_open_ms",
                "open_ms (5000)",
                |p| r0_cb(p).max_open_ms = 4000,
            ),
            (
                "policy.rules[0].circuit_breaker.half_open_probes",
                "100",
                |p| r0_cb(p).half_open_probes = 1000,
            ),
            (
                "policy.rules[0].circuit_breaker.max_ejection_percent",
                "100",
                |p| r0_cb(p).max_ejection_percent = 200,
            ),
            // Retry.
            ("policy.retry.attempts", "1-10", |p| rt(p).attempts = 11),
            ("policy.retry.per_try_timeout_ms", "1-600000", |p| {
                rt(p).per_try_timeout_ms = 600_001
            }),
            (
                "policy.retry.per_try_timeout_ms",
                "timeout.total_ms (5000)",
                |p| rt(p).per_try_timeout_ms = 5001,
            ),
            ("policy.retry.backoff_base_ms", "1-60000", |p| {
                rt(p).backoff_base_ms = 60_001
            }),
            ("policy.retry.backoff_max_ms", "backoff_base_ms (50)", |p| {
                rt(p).backoff_max_ms = 49
            }),
            ("policy.retry.backoff_max_ms", "600000", |p| {
                rt(p).backoff_max_ms = 600_001
            }),
            (
                "policy.retry.backoff_max_ms",
                "backoff_base_ms (3000)",
                |p| rt(p).backoff_base_ms = 3000,
            ),
            ("policy.retry.retry_on[1]", "HTTP_429", |p| {
                rt(p).retry_on[1] = 99
            }),
            ("policy.retry.retry_on[0]", "RETRY_ON_UNSPECIFIED", |p| {
                rt(p).retry_on[0] = 0
            }),
            (
                "policy.retry.retry_on[2]",
                "duplicate CONNECT_FAILURE",
                |p| rt(p).retry_on.push(RetryOn::ConnectFailure as i32),
            ),
            ("policy.retry.budget_percent", "(0, 100]", |p| {
                rt(p).budget_percent = -1.0
            }),
            ("policy.retry.budget_percent", "(0, 100]", |p| {
                rt(p).budget_percent = 100.5
            }),
            ("policy.retry.budget_percent", "finite", |p| {
                rt(p).budget_percent = f64::NAN
            }),
            ("policy.retry.budget_percent", "finite", |p| {
                rt(p).budget_percent = f64::INFINITY
            }),
            ("policy.rules[0].retry.attempts", "1-10", |p| {
                r0_rt(p).attempts = 100
            }),
            ("policy.rules[0].retry.per_try_timeout_ms", "600000", |p| {
                r0_rt(p).per_try_timeout_ms = u32::MAX
            }),
            (
                "policy.rules[0].retry.per_try_timeout_ms",
                "timeout.total_ms (1000)",
                |p| r0_rt(p).per_try_timeout_ms = 1001,
            ),
            ("policy.rules[0].retry.backoff_base_ms", "60000", |p| {
                r0_rt(p).backoff_base_ms = 70_000
            }),
            (
                "policy.rules[0].retry.backoff_max_ms",
                "backoff_base_ms (25)",
                |p| r0_rt(p).backoff_max_ms = 10,
            ),
            ("policy.rules[0].retry.retry_on[0]", "got 6", |p| {
                r0_rt(p).retry_on = vec![6]
            }),
            (
                "policy.rules[0].retry.retry_on[1]",
                "duplicate TIMEOUT",
                |p| r0_rt(p).retry_on = vec![RetryOn::Timeout as i32, RetryOn::Timeout as i32],
            ),
            ("policy.rules[0].retry.budget_percent", "100", |p| {
                r0_rt(p).budget_percent = 1000.0
            }),
            ("policy.rules[0].retry.budget_percent", "finite", |p| {
                r0_rt(p).budget_percent = f64::NEG_INFINITY
            }),
            // Timeout.
            ("policy.timeout.total_ms", "required", |p| {
                to(p).total_ms = 0
            }),
            ("policy.timeout.total_ms", "1-3600000", |p| {
                to(p).total_ms = 3_600_001
            }),
            ("policy.rules[0].timeout.total_ms", "required", |p| {
                r0_to(p).total_ms = 0
            }),
            ("policy.rules[0].timeout.total_ms", "1-3600000", |p| {
                r0_to(p).total_ms = u32::MAX
            }),
            // Delivery.
            ("policy.delivery.max_age_seconds", "1-2592000", |p| {
                dl(p).max_age_seconds = 2_592_001
            }),
            ("policy.delivery.max_attempts", "1-1000", |p| {
                dl(p).max_attempts = 1001
            }),
            ("policy.rules[0].delivery.max_age_seconds", "2592000", |p| {
                r0_dl(p).max_age_seconds = u32::MAX
            }),
            ("policy.rules[0].delivery.max_attempts", "1000", |p| {
                r0_dl(p).max_attempts = 5000
            }),
            (
                "policy.delivery.compensation_topic",
                "printable ASCII",
                |p| dl(p).compensation_topic = "orders failed".into(),
            ),
            (
                "policy.rules[0].delivery.compensation_topic",
                "1-255",
                |p| r0_dl(p).compensation_topic = "t".repeat(256),
            ),
            // Tracing.
            ("policy.tracing.sample_rate", "0-1", |p| {
                tr(p).sample_rate = Some(1.5)
            }),
            ("policy.tracing.sample_rate", "0-1", |p| {
                tr(p).sample_rate = Some(f64::NAN)
            }),
            ("policy.tracing.slow_ms", "1-3600000", |p| {
                tr(p).slow_ms = 3_600_001
            }),
        ]
    }

    #[test]
    fn every_rule_names_its_field() {
        let ok = policy(Some(&valid())).expect("the base policy is valid");
        assert_eq!(ok, valid(), "nothing but the namespace is normalized");
        let cases = cases();
        assert!(cases.len() > 100, "{} cases", cases.len());
        for (n, (field, mention, mutate)) in cases.into_iter().enumerate() {
            let mut p = valid();
            mutate(&mut p);
            let e = policy(Some(&p)).expect_err(&format!("case {n} ({field}) must fail"));
            assert_eq!(e.field, field, "case {n}: {e}");
            assert!(!e.rule.is_empty(), "case {n}: {e}");
            assert!(
                e.rule.contains(mention),
                "case {n}: {e:?} should mention {mention:?}"
            );
            assert!(e.rule.len() < 400, "case {n}: rule too long: {}", e.rule);
        }
        assert_eq!(policy(None).expect_err("none").field, "policy");
    }

    #[test]
    fn accepts_edges() {
        let edges: Vec<Mutation> = vec![
            |p| p.rules = Vec::new(),
            |p| {
                let rule = p.rules[1].clone();
                p.rules = (0..64)
                    .map(|n| Rule {
                        name: format!("r{n}"),
                        ..rule.clone()
                    })
                    .collect();
            },
            |p| r0(p).name = "a".repeat(63),
            |p| r0(p).name = "0".into(),
            |p| {
                r0(p).r#match = Some(EventMatch {
                    source: "s".repeat(255),
                    ..EventMatch::default()
                })
            },
            |p| m0(p).type_exact = " ~".repeat(127),
            |p| lb(p).ewma_decay_ms = 0,
            |p| lb(p).ewma_decay_ms = 100,
            |p| lb(p).ewma_decay_ms = 600_000,
            |p| {
                lb(p).algorithm = Algorithm::Unspecified as i32;
                lb(p).ewma_decay_ms = 0;
            },
            |p| {
                lb(p).algorithm = Algorithm::RoundRobin as i32;
                lb(p).ewma_decay_ms = 0;
            },
            |p| r1_lb(p).choices = 0,
            |p| r1_lb(p).choices = 2,
            |p| r1_lb(p).choices = 8,
            |p| {
                lb(p).zone_preference = Some(ZonePreference {
                    enabled: true,
                    min_usable_percent: 100,
                })
            },
            |p| {
                r1_lb(p).zone_preference = Some(ZonePreference {
                    enabled: true,
                    min_usable_percent: 0,
                })
            },
            |p| lb(p).zone_preference = Some(ZonePreference::default()),
            |p| r0_ch(p).header = "h".repeat(128),
            |p| {
                *r0_ch(p) = ConsistentHash {
                    key: consistent_hash::Key::Subject as i32,
                    header: String::new(),
                }
            },
            |p| rl(p).requests_per_second = 1_000_000.0,
            |p| rl(p).requests_per_second = 0.001,
            |p| rl(p).burst = 1_000_000,
            |p| rl(p).max_queue_wait_ms = 1,
            |p| rl(p).max_queue_wait_ms = 60_000,
            |p| r0_rl(p).on_excess = OnExcess::Unspecified as i32,
            |p| {
                *cb(p) = CircuitBreaker {
                    failure_ratio: 1.0,
                    ..CircuitBreaker::default()
                }
            },
            |p| {
                *cb(p) = CircuitBreaker {
                    slow_call_ms: 600_000,
                    slow_call_ratio: 1.0,
                    ..CircuitBreaker::default()
                }
            },
            |p| cb(p).consecutive_failures = 1000,
            |p| cb(p).window_ms = 1000,
            |p| cb(p).window_ms = 600_000,
            |p| cb(p).minimum_requests = 100_000,
            |p| cb(p).open_ms = 100,
            |p| cb(p).max_open_ms = 1000,
            |p| cb(p).max_open_ms = 3_600_000,
            |p| cb(p).half_open_probes = 100,
            |p| cb(p).max_ejection_percent = 100,
            |p| r0_cb(p).max_open_ms = 5000,
            |p| rt(p).attempts = 10,
            |p| rt(p).per_try_timeout_ms = 5000,
            |p| rt(p).backoff_max_ms = 50,
            |p| rt(p).backoff_max_ms = 600_000,
            |p| rt(p).budget_percent = 100.0,
            |p| rt(p).budget_percent = 0.0,
            |p| rt(p).retry_on = (1..=4).collect(),
            |p| r0_rt(p).backoff_max_ms = 25,
            |p| r0_rt(p).per_try_timeout_ms = 1000,
            // A per-try bound with the timeout in another scope is allowed.
            |p| r0(p).timeout = None,
            |p| to(p).total_ms = 3_600_000,
            |p| dl(p).max_age_seconds = 2_592_000,
            |p| dl(p).max_attempts = 1000,
        ];
        for (n, mutate) in edges.into_iter().enumerate() {
            let mut p = valid();
            mutate(&mut p);
            policy(Some(&p)).unwrap_or_else(|e| panic!("edge {n}: {e}"));
        }
    }

    #[test]
    fn namespace_defaults_and_minimal_policy() {
        let p = policy(Some(&TrafficPolicy {
            namespace: String::new(),
            ..valid()
        }))
        .expect("valid");
        assert_eq!(p.namespace, crate::validate::DEFAULT_NAMESPACE);
        assert_eq!(
            p,
            TrafficPolicy {
                namespace: "default".into(),
                ..valid()
            }
        );

        let minimal = TrafficPolicy {
            service: "orders".into(),
            ..TrafficPolicy::default()
        };
        let p = policy(Some(&minimal)).expect("minimal");
        assert_eq!(p.namespace, "default");
        assert_eq!(p.service, "orders");
        assert!(p.load_balancer.is_none() && p.rules.is_empty());
    }

    #[test]
    fn proto3_json() {
        let json = r#"{
            "service": "orders",
            "loadBalancer": {
                "algorithm": "LEAST_REQUEST",
                "choices": 4,
                "zonePreference": { "enabled": true, "minUsablePercent": 60 }
            },
            "rate_limit": {
                "requestsPerSecond": 100.5,
                "burst": 200,
                "scope": "GLOBAL",
                "onExcess": "QUEUE",
                "max_queue_wait_ms": 250
            },
            "circuitBreaker": { "consecutiveFailures": 5, "failureRatio": 0.5, "openMs": 1000 },
            "retry": {
                "attempts": 3,
                "perTryTimeoutMs": 500,
                "retryOn": ["CONNECT_FAILURE", "HTTP_5XX", "HTTP_429"],
                "budgetPercent": 10
            },
            "timeout": { "totalMs": 2000 },
            "delivery": { "durableOutbox": true, "maxAgeSeconds": 3600, "deadLetter": true },
            "rules": [
                {
                    "name": "payments",
                    "match": { "typePrefix": "com.example.payment." },
                    "loadBalancer": {
                        "algorithm": "CONSISTENT_HASH",
                        "consistentHash": { "key": "HEADER", "header": "x-user-id" }
                    },
                    "retry": { "attempts": 1 },
                    "timeout": { "totalMs": 500, "shadow": true }
                }
            ]
        }"#;
        let parsed: TrafficPolicy = serde_json::from_str(json).expect("proto3 JSON");
        let p = policy(Some(&parsed)).expect("valid");
        assert_eq!(p.namespace, "default");
        assert_eq!(
            p.load_balancer.as_ref().map(|lb| lb.algorithm),
            Some(Algorithm::LeastRequest as i32)
        );
        assert_eq!(
            p.load_balancer
                .as_ref()
                .and_then(|lb| lb.zone_preference.as_ref())
                .map(|z| (z.enabled, z.min_usable_percent)),
            Some((true, 60))
        );
        assert_eq!(
            p.retry.as_ref().map(|r| r.retry_on.clone()),
            Some(vec![1, 2, 3])
        );
        assert_eq!(p.rules[0].name, "payments");
        assert_eq!(
            p.rules[0]
                .load_balancer
                .as_ref()
                .and_then(|lb| lb.consistent_hash.as_ref())
                .map(|ch| ch.header.as_str()),
            Some("x-user-id")
        );

        // Values proto3 JSON can carry but the rules reject.
        let bad = [
            (
                r#"{"service": "orders", "rateLimit": {"requestsPerSecond": "NaN"}}"#,
                "policy.rate_limit.requests_per_second",
            ),
            (
                r#"{"service": "orders", "retry": {"budgetPercent": "Infinity"}}"#,
                "policy.retry.budget_percent",
            ),
            (
                r#"{"service": "orders", "retry": {"retryOn": ["TIMEOUT", "TIMEOUT"]}}"#,
                "policy.retry.retry_on[1]",
            ),
            (
                r#"{"service": "orders", "rules": [{"name": "a", "match": {}}]}"#,
                "policy.rules[0].match",
            ),
        ];
        for (json, field) in bad {
            let parsed: TrafficPolicy = serde_json::from_str(json).expect(json);
            let e = policy(Some(&parsed)).expect_err(json);
            assert_eq!(e.field, field, "{e}");
        }
    }
}
