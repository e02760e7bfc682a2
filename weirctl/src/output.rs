//! Tables for people, JSON for programs: the formatting every command
//! shares.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};
use weir_client::{
    telemetry::{ServiceRef, TopicRef},
    Event, EventType, GetHealthResponse, HealthDetail, HealthStatus, Instance, Protocol,
    ServiceProtection, ServiceSummary,
};

/// How a command prints its answer (`-o`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// Lays rows out in left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

pub fn status_name(status: i32) -> &'static str {
    match HealthStatus::try_from(status) {
        Ok(HealthStatus::Passing) => "passing",
        Ok(HealthStatus::Warning) => "warning",
        Ok(HealthStatus::Critical) => "critical",
        _ => "unknown",
    }
}

pub fn protocol_name(protocol: i32) -> &'static str {
    match Protocol::try_from(protocol) {
        Ok(Protocol::Grpc) => "grpc",
        _ => "http",
    }
}

fn event_name(t: i32) -> &'static str {
    match EventType::try_from(t) {
        Ok(EventType::Put) => "PUT",
        Ok(EventType::Delete) => "DELETE",
        _ => "UNKNOWN",
    }
}

fn address(i: &Instance) -> String {
    if i.host.contains(':') {
        format!("[{}]:{}", i.host, i.port)
    } else {
        format!("{}:{}", i.host, i.port)
    }
}

/// How long an instance lives: persistent, on its own lease, or on the
/// session of the agent that holds it (which enforces its TTL).
fn lifetime(i: &Instance) -> String {
    if !i.agent_node.is_empty() {
        format!("agent {} (ttl {}s)", i.agent_node, i.ttl_seconds)
    } else if i.ephemeral {
        format!("ttl {}s", i.ttl_seconds)
    } else {
        "persistent".into()
    }
}

fn metadata(i: &Instance) -> String {
    let mut pairs: Vec<_> = i.metadata.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

pub const INSTANCE_HEADER: [&str; 10] = [
    "ID", "ADDRESS", "PROTOCOL", "WEIGHT", "VERSION", "ZONE", "STATUS", "LIFETIME", "METADATA",
    "REASON",
];

pub fn instance_row(i: &Instance) -> Vec<String> {
    vec![
        i.instance_id.clone(),
        address(i),
        protocol_name(i.protocol).into(),
        i.weight.to_string(),
        dash(&i.version),
        dash(&i.zone),
        status_name(i.status).into(),
        lifetime(i),
        dash(&metadata(i)),
        dash(i.health.as_ref().map_or("", |h| h.reason.as_str())),
    ]
}

fn detail_json(h: &HealthDetail) -> Value {
    json!({
        "reason": h.reason,
        "latency_us": h.latency_us,
        "consecutive": h.consecutive,
        "since_unix_ms": h.since_unix_ms,
        "checked_by": h.checked_by,
    })
}

pub fn protection_json(p: &ServiceProtection) -> Value {
    json!({
        "namespace": p.namespace,
        "service": p.service,
        "active": p.active,
        "threshold_percent": p.threshold_percent,
        "healthy": p.healthy,
        "total": p.total,
    })
}

pub fn protection_line(revision: u64, p: &ServiceProtection) -> String {
    format!(
        "{revision:<8} {:<6} {}/{}  {} of {} healthy, threshold {}%",
        if p.active { "PROTECT" } else { "RELEASE" },
        p.namespace,
        p.service,
        p.healthy,
        p.total,
        p.threshold_percent
    )
}

pub fn ago(unix_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let s = (now - unix_ms).max(0) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        _ => format!("{}h ago", s / 3600),
    }
}

pub fn health_json(r: &GetHealthResponse) -> Value {
    json!({
        "revision": r.revision,
        "protection": r.protection.as_ref().map(protection_json),
        "instances": r.instances.iter().map(|i| json!({
            "instance_id": i.instance_id,
            "status": status_name(i.status),
            "detail": i.detail.as_ref().map(detail_json),
            "transitions": i.transitions.iter().map(|t| json!({
                "at_unix_ms": t.at_unix_ms,
                "from": status_name(t.from),
                "to": status_name(t.to),
                "reason": t.reason,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Current status per instance, then each one's transitions, newest first.
pub fn health_table(namespace: &str, service: &str, r: &GetHealthResponse) -> String {
    let mut out = String::new();
    if let Some(p) = &r.protection {
        let _ = writeln!(
            out,
            "{namespace}/{service}: {} of {} instances healthy, protection threshold {}%{}",
            p.healthy,
            p.total,
            p.threshold_percent,
            if p.active {
                " -- IN PROTECTION (route to all)"
            } else {
                ""
            }
        );
    }
    let rows: Vec<Vec<String>> = r
        .instances
        .iter()
        .map(|i| {
            let d = i.detail.clone().unwrap_or_default();
            vec![
                i.instance_id.clone(),
                status_name(i.status).into(),
                if d.since_unix_ms > 0 {
                    ago(d.since_unix_ms)
                } else {
                    "-".into()
                },
                dash(&d.checked_by),
                dash(&d.reason),
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "STATUS", "SINCE", "CHECKED BY", "REASON"],
        &rows,
    ));
    for i in &r.instances {
        if i.transitions.is_empty() {
            continue;
        }
        let _ = writeln!(out, "\n{} transitions (newest first):", i.instance_id);
        for t in i.transitions.iter().rev() {
            let _ = writeln!(
                out,
                "  {:<9} {:>8} -> {:<8} {}",
                ago(t.at_unix_ms),
                status_name(t.from),
                status_name(t.to),
                t.reason
            );
        }
    }
    out
}

/// A unix time in milliseconds as UTC, `2024-05-01T12:00:03Z`.
pub fn utc(unix_ms: i64) -> String {
    let secs = unix_ms.div_euclid(1000);
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

/// How an agent took a policy version: `applied`, `partly (rate_limit,
/// retry)` or `rejected`.
pub fn ack_state(accepted: bool, unenforced: &[String]) -> String {
    if !accepted {
        "rejected".into()
    } else if unenforced.is_empty() {
        "applied".into()
    } else {
        format!("partly ({})", unenforced.join(", "))
    }
}

pub fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// A service in telemetry, `namespace/name`. An empty name is a caller
/// the agent could not name, and a missing one the same to a reader.
pub fn service_label(s: Option<&ServiceRef>) -> String {
    match s {
        Some(s) if !s.name.is_empty() => qualified(&s.namespace, &s.name),
        _ => "unknown".into(),
    }
}

/// A topic, `topic namespace/name`, so it never reads as a service; none
/// when the edge or span has no topic.
pub fn topic_label(t: Option<&TopicRef>) -> Option<String> {
    t.filter(|t| !t.name.is_empty())
        .map(|t| format!("topic {}", qualified(&t.namespace, &t.name)))
}

fn qualified(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.into()
    } else {
        format!("{namespace}/{name}")
    }
}

/// A ratio (0-1) as a percentage with one decimal, `2.5%`.
pub fn percent(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{:.1}%", ratio * 100.0)
    } else {
        "-".into()
    }
}

/// A per-second rate: two decimals, so a trickle (0.02/s, one request
/// a minute) does not read as nothing.
pub fn rate(per_second: f64) -> String {
    if per_second.is_finite() {
        format!("{per_second:.2}")
    } else {
        "-".into()
    }
}

pub const SUMMARY_HEADER: [&str; 4] = ["NAMESPACE", "SERVICE", "INSTANCES", "PASSING"];

pub fn summary_row(s: &ServiceSummary) -> Vec<String> {
    vec![
        s.namespace.clone(),
        s.name.clone(),
        s.instance_count.to_string(),
        s.passing_count.to_string(),
    ]
}

pub fn instance_json(i: &Instance) -> Value {
    let metadata: Map<String, Value> = i
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    json!({
        "namespace": i.namespace,
        "service": i.service,
        "instance_id": i.instance_id,
        "host": i.host,
        "port": i.port,
        "protocol": protocol_name(i.protocol),
        "weight": i.weight,
        "version": i.version,
        "zone": i.zone,
        "metadata": metadata,
        "ephemeral": i.ephemeral,
        "ttl_seconds": i.ttl_seconds,
        "status": status_name(i.status),
        "topics": i.topics,
        "revision": i.revision,
        "registered_at_unix_ms": i.registered_at_unix_ms,
        "lease_id": i.lease_id,
        "agent_node": i.agent_node,
        "health": i.health.as_ref().map(detail_json),
    })
}

pub fn summary_json(s: &ServiceSummary) -> Value {
    json!({
        "namespace": s.namespace,
        "service": s.name,
        "instance_count": s.instance_count,
        "passing_count": s.passing_count,
    })
}

pub fn event_json(e: &Event) -> Value {
    json!({
        "type": event_name(e.r#type),
        "revision": e.revision,
        "instance": e.instance.as_ref().map(instance_json),
    })
}

/// One line per watch event: revision, type, instance, address, status.
pub fn event_line(e: &Event) -> String {
    match &e.instance {
        Some(i) => format!(
            "{:<8} {:<6} {}/{}/{}  {}  {}",
            e.revision,
            event_name(e.r#type),
            i.namespace,
            i.service,
            i.instance_id,
            address(i),
            status_name(i.status)
        ),
        None => format!("{:<8} {}", e.revision, event_name(e.r#type)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc(1_714_564_803_999), "2024-05-01T12:00:03Z");
        assert_eq!(utc(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn ack_states_name_what_is_not_enforced() {
        assert_eq!(ack_state(true, &[]), "applied");
        assert_eq!(
            ack_state(true, &["rate_limit".into(), "retry".into()]),
            "partly (rate_limit, retry)"
        );
        assert_eq!(ack_state(false, &[]), "rejected");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["ID", "ADDRESS"],
            &[
                vec!["a".into(), "10.0.0.1:80".into()],
                vec!["long-id".into(), "h:1".into()],
            ],
        );
        assert_eq!(t, "ID       ADDRESS\na        10.0.0.1:80\nlong-id  h:1\n");
    }

    #[test]
    fn instances_render_for_people_and_programs() {
        let mut i = Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "o-1".into(),
            host: "::1".into(),
            port: 8080,
            protocol: Protocol::Grpc as i32,
            weight: 100,
            ephemeral: true,
            ttl_seconds: 6,
            status: HealthStatus::Passing as i32,
            ..Instance::default()
        };
        i.metadata.insert("b".into(), "2".into());
        i.metadata.insert("a".into(), "1".into());
        let row = instance_row(&i);
        assert_eq!(row[1], "[::1]:8080");
        assert_eq!(row[2], "grpc");
        assert_eq!(row[6], "passing");
        assert_eq!(row[7], "ttl 6s");
        assert_eq!(row[8], "a=1,b=2");
        let j = instance_json(&i);
        assert_eq!(j["status"], "passing");
        assert_eq!(j["metadata"]["a"], "1");
        assert_eq!(j["port"], 8080);
        assert_eq!(j["agent_node"], "");

        i.agent_node = "node-1".into();
        assert_eq!(instance_row(&i)[7], "agent node-1 (ttl 6s)");
        assert_eq!(instance_json(&i)["agent_node"], "node-1");
    }
}
