//! Telemetry answers as JSON (feature `json`): one shape for the control
//! plane's `/api/v1/` and for `weirctl -o json`. Ids are lowercase hex
//! (as W3C Trace Context writes them); services are
//! `{"namespace", "name"}` objects (an empty name is a caller the agent
//! could not name); a root span's `parent_span_id` is null.

use serde_json::{json, Map, Value};
use weir_proto::telemetry::v1::{
    attribute, GetStatsResponse, GetTopologyResponse, Outcomes, ServiceRef, Sketch, Span, SpanKind,
    TraceSummary, Traffic,
};

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}

pub fn kind_name(kind: i32) -> &'static str {
    match SpanKind::try_from(kind) {
        Ok(SpanKind::Internal) => "internal",
        Ok(SpanKind::Server) => "server",
        Ok(SpanKind::Client) => "client",
        Ok(SpanKind::Producer) => "producer",
        Ok(SpanKind::Consumer) => "consumer",
        _ => "unspecified",
    }
}

pub fn service(s: Option<&ServiceRef>) -> Value {
    s.map_or(
        Value::Null,
        |s| json!({ "namespace": s.namespace, "name": s.name }),
    )
}

fn attribute(value: Option<&attribute::Value>) -> Value {
    match value {
        Some(attribute::Value::StringValue(s)) => json!(s),
        Some(attribute::Value::IntValue(i)) => json!(i),
        Some(attribute::Value::DoubleValue(d)) => json!(d),
        Some(attribute::Value::BoolValue(b)) => json!(b),
        Some(attribute::Value::Strings(list)) => json!(list.values),
        None => Value::Null,
    }
}

pub fn span(s: &Span) -> Value {
    let attributes: Map<String, Value> = s
        .attributes
        .iter()
        .map(|a| (a.key.clone(), attribute(a.value.as_ref())))
        .collect();
    json!({
        "trace_id": hex(&s.trace_id),
        "span_id": hex(&s.span_id),
        "parent_span_id": (!s.parent_span_id.is_empty()).then(|| hex(&s.parent_span_id)),
        "trace_state": s.trace_state,
        "name": s.name,
        "kind": kind_name(s.kind),
        "start_unix_nanos": s.start_unix_nanos,
        "end_unix_nanos": s.end_unix_nanos,
        "duration_us": s.end_unix_nanos.saturating_sub(s.start_unix_nanos) / 1_000,
        "error": s.error,
        "status_message": s.status_message,
        "attributes": attributes,
        "source": service(s.source.as_ref()),
        "target": service(s.target.as_ref()),
        "topic": s.topic,
        "node_id": s.node_id,
    })
}

/// One trace: its id and its spans.
pub fn trace(trace_id: &str, spans: &[Span]) -> Value {
    json!({
        "trace_id": trace_id.to_ascii_lowercase(),
        "spans": spans.iter().map(span).collect::<Vec<_>>(),
    })
}

pub fn summary(t: &TraceSummary) -> Value {
    json!({
        "trace_id": t.trace_id,
        "root_name": t.root_name,
        "services": t.services,
        "start_unix_ms": t.start_unix_ms,
        "duration_us": t.duration_us,
        "spans": t.spans,
        "error": t.error,
    })
}

pub fn summaries(traces: &[TraceSummary]) -> Value {
    json!({ "traces": traces.iter().map(summary).collect::<Vec<_>>() })
}

fn outcomes(o: Option<&Outcomes>) -> Value {
    let o = o.copied().unwrap_or_default();
    json!({
        "ok": o.ok,
        "client_error": o.client_error,
        "server_error": o.server_error,
        "limited": o.limited,
        "rejected": o.rejected,
    })
}

fn sketch(s: &Sketch) -> Value {
    json!({
        "alpha": s.alpha,
        "offset": s.offset,
        "counts": s.counts,
        "zeros": s.zeros,
        "sum": s.sum,
        "min": s.min,
        "max": s.max,
    })
}

pub fn traffic(t: Option<&Traffic>) -> Value {
    t.map_or(Value::Null, |t| {
        let o = t.outcomes.unwrap_or_default();
        json!({
            "requests": o.ok + o.client_error + o.server_error + o.limited + o.rejected,
            "outcomes": outcomes(t.outcomes.as_ref()),
            "retries": t.retries,
            "rate_per_second": t.rate_per_second,
            "error_ratio": t.error_ratio,
            "p50_seconds": t.p50_seconds,
            "p90_seconds": t.p90_seconds,
            "p99_seconds": t.p99_seconds,
            "latency": t.latency.as_ref().map(sketch),
            "series": t.series,
        })
    })
}

pub fn stats(s: &GetStatsResponse) -> Value {
    json!({
        "window_seconds": s.window_seconds,
        "services": s.services.iter().map(|s| json!({
            "service": service(s.service.as_ref()),
            "traffic": traffic(s.traffic.as_ref()),
        })).collect::<Vec<_>>(),
        "edges": s.edges.iter().map(|e| {
            let edge = e.edge.clone().unwrap_or_default();
            json!({
                "source": service(edge.source.as_ref()),
                "target": service(edge.target.as_ref()),
                "topic": edge.topic.as_ref().filter(|t| !t.name.is_empty()).map(|t| json!({
                    "namespace": t.namespace,
                    "name": t.name,
                })),
                "traffic": traffic(e.traffic.as_ref()),
            })
        }).collect::<Vec<_>>(),
        "breakers": s.breakers.iter().filter_map(|n| {
            let b = n.breaker.as_ref()?;
            Some(json!({
                "node_id": n.node_id,
                "namespace": b.namespace,
                "service": b.service,
                "rule": b.rule,
                "instance_id": b.instance_id,
                "address": b.address,
                "state": b.state,
                "since_ms": b.since_ms,
                "why": b.why,
                "capped": b.capped,
                "shadow": b.shadow,
            }))
        }).collect::<Vec<_>>(),
        "limits": s.limits.iter().map(|l| json!({
            "service": service(l.service.as_ref()),
            "rule": l.rule,
            "admitted": l.admitted,
            "queued": l.queued,
            "rejected": l.rejected,
            "shadow_rejected": l.shadow_rejected,
            "rejected_per_second": l.rejected_per_second,
        })).collect::<Vec<_>>(),
        "replicas": s.replicas,
        "missing_replicas": s.missing_replicas,
    })
}

/// The topology, edges by (from, to).
pub fn topology(t: &GetTopologyResponse) -> Value {
    let mut edges = t.edges.clone();
    edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
    json!({
        "nodes": t.nodes.iter().map(|n| json!({
            "id": n.id,
            "kind": n.kind,
            "namespace": n.namespace,
            "name": n.name,
        })).collect::<Vec<_>>(),
        "edges": edges.iter().map(|e| json!({
            "from": e.from,
            "to": e.to,
            "rate_per_second": e.rate_per_second,
            "error_ratio": e.error_ratio,
            "p99_seconds": e.p99_seconds,
        })).collect::<Vec<_>>(),
    })
}
