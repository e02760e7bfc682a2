//! Validation of everything a caller sends. Each check names the field and
//! the rule it broke, so `InvalidArgument` tells the caller what to fix. The
//! limits are documented in `registry.proto`; keep the two in step.
//!
//! The dependency runs one way: this module uses the health-check limits of
//! [`crate::health::spec`]; nothing in `health` uses this module.

use std::net::IpAddr;

use weir_proto::registry::v1::{health_check::Kind, HealthCheck, Instance, InstanceRef, Protocol};

use crate::{
    health::spec::{
        DEFAULT_FAILURES_BEFORE_CRITICAL, DEFAULT_INTERVAL_MS, DEFAULT_SUCCESSES_BEFORE_PASSING,
        DEFAULT_TIMEOUT_MS, MAX_DEREGISTER_AFTER_S, MAX_HTTP_PATH, MAX_INTERVAL_MS, MAX_THRESHOLD,
        MIN_DEREGISTER_AFTER_S, MIN_INTERVAL_MS, MIN_TIMEOUT_MS,
    },
    keys::InstanceKey,
};

pub const DEFAULT_NAMESPACE: &str = "default";
pub const DEFAULT_WEIGHT: u32 = 100;
pub const MAX_WEIGHT: u32 = 10_000;
pub const DEFAULT_TTL_SECONDS: u32 = 10;
pub const MIN_TTL_SECONDS: u32 = 2;
pub const MAX_TTL_SECONDS: u32 = 3600;
pub const MAX_METADATA_ENTRIES: usize = 64;
pub const MAX_METADATA_KEY_LEN: usize = 63;
pub const MAX_METADATA_VALUE_LEN: usize = 512;
pub const MAX_METADATA_TOTAL: usize = 8 * 1024;
pub const MAX_TOPICS: usize = 64;
pub const MAX_TOPIC_LEN: usize = 255;
pub const MAX_SHORT_TEXT: usize = 64;
pub const MAX_INSTANCE_ID_LEN: usize = 128;
pub const MAX_HOST_LEN: usize = 253;
/// Largest encoded request the gRPC server accepts.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most instances one KeepAlive message may name.
pub const MAX_KEEPALIVE_BATCH: usize = 1024;

/// A field that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct ValidationError {
    /// Path of the field, e.g. `instance.port`.
    pub field: String,
    /// The rule, with the offending value where it helps.
    pub rule: String,
}

/// A [`ValidationError`] for `field` breaking `rule`.
pub fn err(field: impl Into<String>, rule: impl Into<String>) -> ValidationError {
    ValidationError {
        field: field.into(),
        rule: rule.into(),
    }
}

/// Shortens a value for an error message (never echo 64 KiB back).
pub fn shown(value: &str) -> String {
    const MAX: usize = 40;
    if value.chars().count() <= MAX {
        format!("{value:?}")
    } else {
        let head: String = value.chars().take(MAX).collect();
        format!("{head:?}…")
    }
}

/// DNS label (RFC 1123): 1-63 of [a-z0-9-], alphanumeric at both ends.
pub fn dns_label(field: &str, value: &str) -> Result<(), ValidationError> {
    const RULE: &str = "must be a DNS label: 1-63 characters of a-z, 0-9 and '-', starting and ending with a letter or digit";
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(err(field, format!("{RULE} (got {})", shown(value))))
    }
}

pub fn instance_id(field: &str, value: &str) -> Result<(), ValidationError> {
    let ok = !value.is_empty()
        && value.len() <= MAX_INSTANCE_ID_LEN
        && !value.starts_with('.')
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "must be 1-{MAX_INSTANCE_ID_LEN} characters of A-Z, a-z, 0-9, '.', '_', ':' and '-', not starting with '.' (got {})",
                shown(value)
            ),
        ))
    }
}

fn host(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let labels_ok = !value.is_empty()
        && value.len() <= MAX_HOST_LEN
        && value.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if labels_ok {
        Ok(())
    } else {
        Err(err(
            field,
            format!(
                "must be an IP address or a DNS name of at most {MAX_HOST_LEN} characters (got {})",
                shown(value)
            ),
        ))
    }
}

/// At most 64 printable ASCII characters without spaces (versions, zones).
pub fn short_text(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() <= MAX_SHORT_TEXT && value.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(err(
            field,
            format!("must be at most {MAX_SHORT_TEXT} printable ASCII characters without spaces (got {})", shown(value)),
        ))
    }
}

/// A namespace as a DNS label, or [`DEFAULT_NAMESPACE`] when empty.
pub fn namespace_or_default(field: &str, value: &str) -> Result<String, ValidationError> {
    if value.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_owned());
    }
    dns_label(field, value)?;
    Ok(value.to_owned())
}

/// Validates an [`InstanceRef`] and fills the default namespace.
pub fn instance_ref(field: &str, r: Option<&InstanceRef>) -> Result<InstanceKey, ValidationError> {
    let r = r.ok_or_else(|| err(field, "is required"))?;
    let namespace = namespace_or_default(&format!("{field}.namespace"), &r.namespace)?;
    dns_label(&format!("{field}.service"), &r.service)?;
    instance_id(&format!("{field}.instance_id"), &r.instance_id)?;
    Ok(InstanceKey {
        namespace,
        service: r.service.clone(),
        instance_id: r.instance_id.clone(),
    })
}

/// Validates namespace + service of a read, filling the default namespace.
pub fn service_name(namespace: &str, service: &str) -> Result<(String, String), ValidationError> {
    let namespace = namespace_or_default("namespace", namespace)?;
    dns_label("service", service)?;
    Ok((namespace, service.to_owned()))
}

/// Optional namespace filter: empty means all.
pub fn namespace_filter(namespace: &str) -> Result<(), ValidationError> {
    if namespace.is_empty() {
        Ok(())
    } else {
        dns_label("namespace", namespace)
    }
}

/// Validates an instance for registration and normalizes it: defaults
/// filled, output-only fields cleared. The instance id may still be empty
/// (the caller assigns one).
pub fn registration(instance: Option<&Instance>) -> Result<Instance, ValidationError> {
    let mut i = instance
        .cloned()
        .ok_or_else(|| err("instance", "is required"))?;
    i.namespace = namespace_or_default("instance.namespace", &i.namespace)?;
    dns_label("instance.service", &i.service)?;
    if !i.instance_id.is_empty() {
        instance_id("instance.instance_id", &i.instance_id)?;
    }
    host("instance.host", &i.host)?;
    if i.port == 0 || i.port > 65_535 {
        return Err(err(
            "instance.port",
            format!("must be 1-65535 (got {})", i.port),
        ));
    }
    if Protocol::try_from(i.protocol).is_err() {
        return Err(err(
            "instance.protocol",
            format!(
                "must be PROTOCOL_HTTP or PROTOCOL_GRPC (got {})",
                i.protocol
            ),
        ));
    }
    if i.protocol == Protocol::Unspecified as i32 {
        i.protocol = Protocol::Http as i32;
    }
    if i.weight > MAX_WEIGHT {
        return Err(err(
            "instance.weight",
            format!(
                "must be 0-{MAX_WEIGHT} (0 = default {DEFAULT_WEIGHT}) (got {})",
                i.weight
            ),
        ));
    }
    if i.weight == 0 {
        i.weight = DEFAULT_WEIGHT;
    }
    short_text("instance.version", &i.version)?;
    short_text("instance.zone", &i.zone)?;
    if i.ephemeral {
        if i.ttl_seconds == 0 {
            i.ttl_seconds = DEFAULT_TTL_SECONDS;
        }
        if !(MIN_TTL_SECONDS..=MAX_TTL_SECONDS).contains(&i.ttl_seconds) {
            return Err(err(
                "instance.ttl_seconds",
                format!(
                    "must be {MIN_TTL_SECONDS}-{MAX_TTL_SECONDS} for an ephemeral instance (0 = default {DEFAULT_TTL_SECONDS}) (got {})",
                    i.ttl_seconds
                ),
            ));
        }
    } else if i.ttl_seconds != 0 {
        return Err(err(
            "instance.ttl_seconds",
            format!(
                "must be 0 for a persistent instance (got {}); set ephemeral for a leased one",
                i.ttl_seconds
            ),
        ));
    }
    metadata("instance.metadata", &i.metadata)?;
    topics("instance.topics", &i.topics)?;
    if let Some(check) = i.health_check.as_mut() {
        health_check(check, i.ephemeral)?;
    }
    // Output-only fields are the server's to fill.
    i.status = 0;
    i.revision = 0;
    i.registered_at_unix_ms = 0;
    i.lease_id = 0;
    i.health = None;
    i.agent_node.clear();
    Ok(i)
}

/// Validates an instance registered on behalf of `agent_node`'s agent
/// session, like [`registration`], and marks it with the node. Such an
/// instance lives as long as the session, so it must be ephemeral; its
/// `ttl_seconds` (same bounds) is the TTL its agent enforces on the local
/// service's own heartbeats.
pub fn session_registration(
    instance: Option<&Instance>,
    agent_node: &str,
) -> Result<Instance, ValidationError> {
    instance_id("agent_node", agent_node)?;
    let mut i = registration(instance)?;
    if !i.ephemeral {
        return Err(err(
            "instance.ephemeral",
            format!(
                "must be true for an instance held by an agent session (agent_node {}): it lives as long as the session",
                shown(agent_node)
            ),
        ));
    }
    i.agent_node = agent_node.to_owned();
    Ok(i)
}

/// The instance metadata key naming the path at which an HTTP instance
/// takes topic deliveries (default `/`).
pub const DELIVERY_PATH_KEY: &str = "weir.delivery.path";

/// `value` as a delivery path ([`DELIVERY_PATH_KEY`]): `/` then printable
/// ASCII, no spaces and no fragment; `None` otherwise.
pub fn delivery_path(value: &str) -> Option<&str> {
    let ok = value.starts_with('/')
        && value.len() <= MAX_METADATA_VALUE_LEN
        && value.bytes().all(|b| b.is_ascii_graphic() && b != b'#');
    ok.then_some(value)
}

pub fn metadata(
    field: &str,
    metadata: &std::collections::HashMap<String, String>,
) -> Result<(), ValidationError> {
    if metadata.len() > MAX_METADATA_ENTRIES {
        return Err(err(
            field,
            format!(
                "at most {MAX_METADATA_ENTRIES} entries (got {})",
                metadata.len()
            ),
        ));
    }
    let mut total = 0;
    // Sorted, so the first bad key reported is the same every time.
    let mut keys: Vec<_> = metadata.keys().collect();
    keys.sort();
    for key in keys {
        let value = &metadata[key];
        let key_ok = !key.is_empty()
            && key.len() <= MAX_METADATA_KEY_LEN
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
        if !key_ok {
            return Err(err(
                format!("{field}[{}]", shown(key)),
                format!("key must be 1-{MAX_METADATA_KEY_LEN} characters of A-Z, a-z, 0-9, '.', '_', '/' and '-'"),
            ));
        }
        if value.len() > MAX_METADATA_VALUE_LEN {
            return Err(err(
                format!("{field}[{}]", shown(key)),
                format!(
                    "value must be at most {MAX_METADATA_VALUE_LEN} bytes (got {})",
                    value.len()
                ),
            ));
        }
        if key == DELIVERY_PATH_KEY && delivery_path(value).is_none() {
            return Err(err(
                format!("{field}[{}]", shown(key)),
                "the delivery path must be an absolute HTTP path: '/' then printable ASCII without spaces or '#'",
            ));
        }
        total += key.len() + value.len();
    }
    if total > MAX_METADATA_TOTAL {
        return Err(err(
            field,
            format!("keys and values must total at most {MAX_METADATA_TOTAL} bytes (got {total})"),
        ));
    }
    Ok(())
}

/// Validates an instance's health check (at registration) and fills its
/// defaults in place, so the stored record says what runs. `ephemeral` is
/// the instance's flag. [`crate::health::spec::resolve`] reads
/// the result.
pub fn health_check(check: &mut HealthCheck, ephemeral: bool) -> Result<(), ValidationError> {
    const F: &str = "instance.health_check";
    let Some(kind) = &mut check.kind else {
        return Err(err(
            format!("{F}.kind"),
            "must be one of http, tcp, grpc or ttl (or leave health_check unset)",
        ));
    };
    match kind {
        Kind::Http(h) => {
            if h.path.is_empty() {
                h.path = "/".into();
            }
            if !h.path.starts_with('/')
                || h.path.len() > MAX_HTTP_PATH
                || !h.path.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(err(
                    format!("{F}.http.path"),
                    format!("must start with '/' and be at most {MAX_HTTP_PATH} printable ASCII characters without spaces"),
                ));
            }
            if h.expected_status_min == 0 && h.expected_status_max == 0 {
                h.expected_status_min = 200;
                h.expected_status_max = 399;
            }
            if !(100..=599).contains(&h.expected_status_min)
                || !(h.expected_status_min..=599).contains(&h.expected_status_max)
            {
                return Err(err(
                    format!("{F}.http.expected_status_min"),
                    format!(
                        "expected status range must be within 100-599 with min <= max (got {}-{})",
                        h.expected_status_min, h.expected_status_max
                    ),
                ));
            }
        }
        Kind::Tcp(_) => {}
        Kind::Grpc(g) => {
            if g.service.len() > 255 || !g.service.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(err(
                    format!("{F}.grpc.service"),
                    "must be at most 255 printable ASCII characters without spaces",
                ));
            }
        }
        Kind::Ttl(_) => {
            if !ephemeral {
                return Err(err(
                    format!("{F}.ttl"),
                    "a TTL check needs an ephemeral instance (the heartbeat is the check)",
                ));
            }
        }
    }
    if check.interval_ms == 0 {
        check.interval_ms = DEFAULT_INTERVAL_MS;
    }
    if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&check.interval_ms) {
        return Err(err(
            format!("{F}.interval_ms"),
            format!("must be {MIN_INTERVAL_MS}-{MAX_INTERVAL_MS} (0 = default {DEFAULT_INTERVAL_MS}) (got {})", check.interval_ms),
        ));
    }
    if check.timeout_ms == 0 {
        check.timeout_ms = DEFAULT_TIMEOUT_MS.min(check.interval_ms);
    }
    if !(MIN_TIMEOUT_MS..=check.interval_ms).contains(&check.timeout_ms) {
        return Err(err(
            format!("{F}.timeout_ms"),
            format!(
                "must be {MIN_TIMEOUT_MS}-interval_ms ({}) (got {})",
                check.interval_ms, check.timeout_ms
            ),
        ));
    }
    for (name, value, default) in [
        (
            "failures_before_critical",
            &mut check.failures_before_critical,
            DEFAULT_FAILURES_BEFORE_CRITICAL,
        ),
        (
            "successes_before_passing",
            &mut check.successes_before_passing,
            DEFAULT_SUCCESSES_BEFORE_PASSING,
        ),
    ] {
        if *value == 0 {
            *value = default;
        }
        if *value > MAX_THRESHOLD {
            return Err(err(
                format!("{F}.{name}"),
                format!("must be 1-{MAX_THRESHOLD} (0 = default {default}) (got {value})"),
            ));
        }
    }
    if check.deregister_critical_after_seconds != 0 {
        if ephemeral {
            return Err(err(
                format!("{F}.deregister_critical_after_seconds"),
                "only for persistent instances (an ephemeral one leaves when its lease expires)",
            ));
        }
        if !(MIN_DEREGISTER_AFTER_S..=MAX_DEREGISTER_AFTER_S)
            .contains(&check.deregister_critical_after_seconds)
        {
            return Err(err(
                format!("{F}.deregister_critical_after_seconds"),
                format!(
                    "must be {MIN_DEREGISTER_AFTER_S}-{MAX_DEREGISTER_AFTER_S} (0 = never) (got {})",
                    check.deregister_critical_after_seconds
                ),
            ));
        }
    }
    if check.port > 65_535 {
        return Err(err(
            format!("{F}.port"),
            format!(
                "must be 1-65535 (0 = the instance's port) (got {})",
                check.port
            ),
        ));
    }
    Ok(())
}

/// Whether `topic` is a valid topic name: 1-[`MAX_TOPIC_LEN`] printable
/// ASCII characters without spaces.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && topic.bytes().all(|b| b.is_ascii_graphic())
}

fn topics(field: &str, topics: &[String]) -> Result<(), ValidationError> {
    if topics.len() > MAX_TOPICS {
        return Err(err(
            field,
            format!("at most {MAX_TOPICS} topics (got {})", topics.len()),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (n, topic) in topics.iter().enumerate() {
        if !valid_topic(topic) {
            return Err(err(
                format!("{field}[{n}]"),
                format!(
                    "must be 1-{MAX_TOPIC_LEN} printable ASCII characters without spaces (got {})",
                    shown(topic)
                ),
            ));
        }
        if !seen.insert(topic) {
            return Err(err(
                format!("{field}[{n}]"),
                format!("duplicate topic {}", shown(topic)),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weir_proto::registry::v1::{GrpcCheck, HttpCheck, TtlCheck};

    use super::*;
    use crate::health::spec;

    fn valid() -> Instance {
        Instance {
            service: "orders".into(),
            host: "10.0.0.1".into(),
            port: 8080,
            ..Instance::default()
        }
    }

    #[test]
    fn session_registrations_must_be_ephemeral_and_name_a_valid_node() {
        let ephemeral = Instance {
            ephemeral: true,
            agent_node: "forged".into(),
            ..valid()
        };
        let i = session_registration(Some(&ephemeral), "node-1").expect("valid");
        assert_eq!(i.agent_node, "node-1");
        assert_eq!(i.ttl_seconds, DEFAULT_TTL_SECONDS);
        // A direct registration cannot claim a node: the field is output only.
        assert_eq!(
            registration(Some(&ephemeral)).expect("valid").agent_node,
            ""
        );

        let e = session_registration(Some(&valid()), "node-1").expect_err("persistent");
        assert_eq!(e.field, "instance.ephemeral");
        assert!(e.rule.contains("node-1"), "{e}");
        for bad in ["", "a/b", &"n".repeat(129)] {
            let e = session_registration(Some(&ephemeral), bad).expect_err(bad);
            assert_eq!(e.field, "agent_node");
        }
        let e = session_registration(
            Some(&Instance {
                ttl_seconds: 1,
                ..ephemeral
            }),
            "node-1",
        )
        .expect_err("ttl");
        assert_eq!(e.field, "instance.ttl_seconds");
    }

    #[test]
    fn fills_defaults() {
        let i = registration(Some(&Instance {
            ephemeral: true,
            ..valid()
        }))
        .expect("valid");
        assert_eq!(i.namespace, "default");
        assert_eq!(i.weight, DEFAULT_WEIGHT);
        assert_eq!(i.ttl_seconds, DEFAULT_TTL_SECONDS);
        assert_eq!(i.protocol, Protocol::Http as i32);
    }

    #[test]
    fn every_rule_names_its_field() {
        let cases: Vec<(&str, Instance)> = vec![
            (
                "instance.service",
                Instance {
                    service: "".into(),
                    ..valid()
                },
            ),
            (
                "instance.service",
                Instance {
                    service: "Orders".into(),
                    ..valid()
                },
            ),
            (
                "instance.service",
                Instance {
                    service: "-a".into(),
                    ..valid()
                },
            ),
            (
                "instance.service",
                Instance {
                    service: "a".repeat(64),
                    ..valid()
                },
            ),
            (
                "instance.namespace",
                Instance {
                    namespace: "a_b".into(),
                    ..valid()
                },
            ),
            (
                "instance.instance_id",
                Instance {
                    instance_id: "a/b".into(),
                    ..valid()
                },
            ),
            (
                "instance.instance_id",
                Instance {
                    instance_id: ".hidden".into(),
                    ..valid()
                },
            ),
            (
                "instance.instance_id",
                Instance {
                    instance_id: "x".repeat(129),
                    ..valid()
                },
            ),
            (
                "instance.host",
                Instance {
                    host: "".into(),
                    ..valid()
                },
            ),
            (
                "instance.host",
                Instance {
                    host: "bad host".into(),
                    ..valid()
                },
            ),
            ("instance.port", Instance { port: 0, ..valid() }),
            (
                "instance.port",
                Instance {
                    port: 65_536,
                    ..valid()
                },
            ),
            (
                "instance.protocol",
                Instance {
                    protocol: 9,
                    ..valid()
                },
            ),
            (
                "instance.weight",
                Instance {
                    weight: 10_001,
                    ..valid()
                },
            ),
            (
                "instance.version",
                Instance {
                    version: "v 1".into(),
                    ..valid()
                },
            ),
            (
                "instance.zone",
                Instance {
                    zone: "z".repeat(65),
                    ..valid()
                },
            ),
            (
                "instance.ttl_seconds",
                Instance {
                    ephemeral: true,
                    ttl_seconds: 1,
                    ..valid()
                },
            ),
            (
                "instance.ttl_seconds",
                Instance {
                    ephemeral: true,
                    ttl_seconds: 3601,
                    ..valid()
                },
            ),
            (
                "instance.ttl_seconds",
                Instance {
                    ttl_seconds: 5,
                    ..valid()
                },
            ),
            (
                "instance.topics[1]",
                Instance {
                    topics: vec!["a".into(), "a".into()],
                    ..valid()
                },
            ),
            (
                "instance.topics[0]",
                Instance {
                    topics: vec!["".into()],
                    ..valid()
                },
            ),
            (
                "instance.topics",
                Instance {
                    topics: (0..65).map(|n| n.to_string()).collect(),
                    ..valid()
                },
            ),
            (
                "instance.metadata",
                Instance {
                    metadata: (0..65).map(|n| (n.to_string(), String::new())).collect(),
                    ..valid()
                },
            ),
            (
                "instance.metadata[\"bad key\"]",
                Instance {
                    metadata: [("bad key".to_string(), "v".to_string())].into(),
                    ..valid()
                },
            ),
            (
                "instance.metadata[\"k\"]",
                Instance {
                    metadata: [("k".to_string(), "v".repeat(513))].into(),
                    ..valid()
                },
            ),
            (
                "instance.metadata[\"weir.delivery.path\"]",
                Instance {
                    metadata: [("weir.delivery.path".to_string(), "events".to_string())].into(),
                    ..valid()
                },
            ),
            (
                "instance.metadata[\"weir.delivery.path\"]",
                Instance {
                    metadata: [("weir.delivery.path".to_string(), "/a b".to_string())].into(),
                    ..valid()
                },
            ),
            (
                "instance.metadata",
                Instance {
                    metadata: (0..20)
                        .map(|n| (format!("k{n}"), "v".repeat(500)))
                        .collect(),
                    ..valid()
                },
            ),
        ];
        for (field, instance) in cases {
            let e = registration(Some(&instance)).expect_err(field);
            assert_eq!(e.field, field, "{e}");
            assert!(!e.rule.is_empty());
        }
        assert_eq!(registration(None).expect_err("none").field, "instance");
    }

    #[test]
    fn accepts_edges() {
        for host in ["::1", "127.0.0.1", "svc.ns.svc.cluster.local", "a"] {
            registration(Some(&Instance {
                host: host.into(),
                ..valid()
            }))
            .expect(host);
        }
        registration(Some(&Instance {
            port: 65_535,
            weight: MAX_WEIGHT,
            ..valid()
        }))
        .expect("edges");
        registration(Some(&Instance {
            ephemeral: true,
            ttl_seconds: MIN_TTL_SECONDS,
            ..valid()
        }))
        .expect("ttl");
    }

    #[test]
    fn long_values_are_shortened_in_messages() {
        let e = registration(Some(&Instance {
            service: "x".repeat(5000),
            ..valid()
        }))
        .expect_err("long");
        assert!(e.rule.len() < 300, "{}", e.rule);
    }

    fn http(path: &str) -> HealthCheck {
        HealthCheck {
            kind: Some(Kind::Http(HttpCheck {
                path: path.into(),
                ..HttpCheck::default()
            })),
            ..HealthCheck::default()
        }
    }

    #[test]
    fn defaults_are_filled_and_resolved() {
        let mut c = http("");
        health_check(&mut c, false).expect("valid");
        assert_eq!((c.interval_ms, c.timeout_ms), (1000, 1000));
        assert_eq!(
            (c.failures_before_critical, c.successes_before_passing),
            (2, 2)
        );
        let i = Instance {
            host: "10.0.0.1".into(),
            port: 8080,
            health_check: Some(c),
            ..Instance::default()
        };
        let spec = spec::resolve(&i).expect("active check");
        assert_eq!(
            spec.probe,
            spec::Probe::Http {
                path: "/".into(),
                expected: (200, 399)
            }
        );
        assert_eq!(spec.port, 8080);
        assert_eq!(spec.interval, Duration::from_secs(1));
    }

    #[test]
    fn every_bad_field_is_named() {
        let cases: Vec<(HealthCheck, bool, &str)> = vec![
            (HealthCheck::default(), false, "health_check.kind"),
            (http("healthz"), false, "http.path"),
            (
                HealthCheck {
                    kind: Some(Kind::Http(HttpCheck {
                        path: "/".into(),
                        expected_status_min: 500,
                        expected_status_max: 200,
                    })),
                    ..HealthCheck::default()
                },
                false,
                "expected_status_min",
            ),
            (
                HealthCheck {
                    kind: Some(Kind::Ttl(TtlCheck {})),
                    ..HealthCheck::default()
                },
                false,
                "health_check.ttl",
            ),
            (
                HealthCheck {
                    interval_ms: 50,
                    ..http("/")
                },
                false,
                "interval_ms",
            ),
            (
                HealthCheck {
                    interval_ms: 1000,
                    timeout_ms: 2000,
                    ..http("/")
                },
                false,
                "timeout_ms",
            ),
            (
                HealthCheck {
                    failures_before_critical: 21,
                    ..http("/")
                },
                false,
                "failures_before_critical",
            ),
            (
                HealthCheck {
                    successes_before_passing: 99,
                    ..http("/")
                },
                false,
                "successes_before_passing",
            ),
            (
                HealthCheck {
                    deregister_critical_after_seconds: 30,
                    ..http("/")
                },
                true,
                "deregister_critical_after_seconds",
            ),
            (
                HealthCheck {
                    deregister_critical_after_seconds: 5,
                    ..http("/")
                },
                false,
                "deregister_critical_after_seconds",
            ),
            (
                HealthCheck {
                    port: 70_000,
                    ..http("/")
                },
                false,
                "health_check.port",
            ),
            (
                HealthCheck {
                    kind: Some(Kind::Grpc(GrpcCheck {
                        service: "a b".into(),
                    })),
                    ..HealthCheck::default()
                },
                false,
                "grpc.service",
            ),
        ];
        for (mut check, ephemeral, field) in cases {
            let e = health_check(&mut check, ephemeral).expect_err(field);
            assert!(e.to_string().contains(field), "{e} should name {field}");
        }
    }
}
