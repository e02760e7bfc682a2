//! The telemetry JSON API on the control plane's HTTP port, the same
//! answers as the gRPC queries (for the whole cluster), in JSON with
//! hex ids:
//!
//! - `GET /api/v1/traces?service=&outcome=ok|error&min_duration_ms=&since_unix_ms=&until_unix_ms=&limit=`
//! - `GET /api/v1/traces/{trace_id}`
//! - `GET /api/v1/stats?window_seconds=60|900&service=`
//! - `GET /api/v1/topology?window_seconds=`
//!
//! A bad parameter is a 400 naming it; an unknown trace a 404.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use weir_proto::telemetry::v1::{
    attribute, GetStatsRequest, GetTopologyRequest, GetTraceRequest, ListTracesRequest, ServiceRef,
    Span, SpanKind, Traffic,
};

use super::{service::TelemetryState, traces::hex};
use crate::error::ApiError;

/// The routes, over `state`.
pub fn routes(state: Arc<TelemetryState>) -> Router {
    Router::new()
        .route("/api/v1/traces", get(list))
        .route("/api/v1/traces/{id}", get(one))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/topology", get(topology))
        .with_state(state)
}

/// An error as JSON, with the HTTP status its gRPC code maps to.
fn error(e: ApiError) -> Response {
    let status = match e.code() {
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let field = match &e {
        ApiError::Invalid(v) => v.first().map(|v| v.field.clone()),
        _ => None,
    };
    (
        status,
        Json(json!({"error": e.to_string(), "field": field})),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TracesParams {
    service: String,
    outcome: String,
    min_duration_ms: u64,
    since_unix_ms: u64,
    until_unix_ms: u64,
    limit: u32,
}

async fn list(State(state): State<Arc<TelemetryState>>, Query(p): Query<TracesParams>) -> Response {
    let request = ListTracesRequest {
        service: p.service,
        outcome: p.outcome,
        min_duration_ms: p.min_duration_ms,
        since_unix_ms: p.since_unix_ms,
        until_unix_ms: p.until_unix_ms,
        limit: p.limit,
    };
    match state.list_traces(&request, false).await {
        Ok(r) => Json(json!({
            "traces": r.traces.iter().map(|t| json!({
                "trace_id": t.trace_id,
                "root_name": t.root_name,
                "services": t.services,
                "start_unix_ms": t.start_unix_ms,
                "duration_us": t.duration_us,
                "spans": t.spans,
                "error": t.error,
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

async fn one(State(state): State<Arc<TelemetryState>>, Path(id): Path<String>) -> Response {
    match state
        .trace(
            &GetTraceRequest {
                trace_id: id.clone(),
            },
            false,
        )
        .await
    {
        Ok(r) => Json(json!({
            "trace_id": id.to_ascii_lowercase(),
            "spans": r.spans.iter().map(span).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct StatsParams {
    window_seconds: u32,
    service: String,
}

async fn stats(State(state): State<Arc<TelemetryState>>, Query(p): Query<StatsParams>) -> Response {
    let request = GetStatsRequest {
        window_seconds: p.window_seconds,
        service: p.service,
        raw: false,
    };
    match state.stats(&request, false).await {
        Ok(r) => Json(json!({
            "window_seconds": r.window_seconds,
            "services": r.services.iter().map(|s| json!({
                "service": service(s.service.as_ref()),
                "traffic": traffic(s.traffic.as_ref()),
            })).collect::<Vec<_>>(),
            "edges": r.edges.iter().map(|e| {
                let edge = e.edge.clone().unwrap_or_default();
                json!({
                    "source": service(edge.source.as_ref()),
                    "target": service(edge.target.as_ref()),
                    "topic": edge.topic.map(|t| if t.name.is_empty() { String::new() } else { format!("{}/{}", t.namespace, t.name) }),
                    "traffic": traffic(e.traffic.as_ref()),
                })
            }).collect::<Vec<_>>(),
            "breakers": r.breakers.iter().filter_map(|n| {
                let b = n.breaker.as_ref()?;
                Some(json!({
                    "node_id": n.node_id,
                    "service": format!("{}/{}", b.namespace, b.service),
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
            "limits": r.limits.iter().map(|l| json!({
                "service": service(l.service.as_ref()),
                "rule": l.rule,
                "admitted": l.admitted,
                "queued": l.queued,
                "rejected": l.rejected,
                "shadow_rejected": l.shadow_rejected,
                "rejected_per_second": l.rejected_per_second,
            })).collect::<Vec<_>>(),
            "replicas": r.replicas,
            "missing_replicas": r.missing_replicas,
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct TopologyParams {
    window_seconds: u32,
}

async fn topology(
    State(state): State<Arc<TelemetryState>>,
    Query(p): Query<TopologyParams>,
) -> Response {
    let request = GetTopologyRequest {
        window_seconds: p.window_seconds,
    };
    match state.topology(&request).await {
        Ok(t) => Json(json!({
            "nodes": t.nodes.iter().map(|n| json!({
                "id": n.id, "kind": n.kind, "name": n.name, "namespace": n.namespace,
            })).collect::<Vec<_>>(),
            "edges": t.edges.iter().map(|e| json!({
                "from": e.from, "to": e.to,
                "rate_per_second": e.rate_per_second,
                "error_ratio": e.error_ratio,
                "p99_seconds": e.p99_seconds,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(e),
    }
}

/// `namespace/name`, "" for none and "unknown" for a nameless caller.
fn service(s: Option<&ServiceRef>) -> String {
    match s {
        None => String::new(),
        Some(s) if s.name.is_empty() && s.namespace.is_empty() => String::new(),
        Some(s) if s.name.is_empty() => "unknown".into(),
        Some(s) => format!("{}/{}", s.namespace, s.name),
    }
}

fn traffic(t: Option<&Traffic>) -> Value {
    let Some(t) = t else {
        return Value::Null;
    };
    let o = t.outcomes.unwrap_or_default();
    json!({
        "requests": o.ok + o.client_error + o.server_error + o.limited + o.rejected,
        "ok": o.ok,
        "client_error": o.client_error,
        "server_error": o.server_error,
        "limited": o.limited,
        "rejected": o.rejected,
        "retries": t.retries,
        "rate_per_second": t.rate_per_second,
        "error_ratio": t.error_ratio,
        "p50_seconds": t.p50_seconds,
        "p90_seconds": t.p90_seconds,
        "p99_seconds": t.p99_seconds,
        "series": t.series,
    })
}

fn kind(k: i32) -> &'static str {
    match SpanKind::try_from(k).unwrap_or(SpanKind::Unspecified) {
        SpanKind::Unspecified => "unspecified",
        SpanKind::Internal => "internal",
        SpanKind::Server => "server",
        SpanKind::Client => "client",
        SpanKind::Producer => "producer",
        SpanKind::Consumer => "consumer",
    }
}

/// A span as JSON: hex ids, attributes as an object.
pub fn span(s: &Span) -> Value {
    let mut attributes = Map::new();
    for a in &s.attributes {
        let v = match &a.value {
            Some(attribute::Value::StringValue(v)) => json!(v),
            Some(attribute::Value::IntValue(v)) => json!(v),
            Some(attribute::Value::DoubleValue(v)) => json!(v),
            Some(attribute::Value::BoolValue(v)) => json!(v),
            Some(attribute::Value::Strings(l)) => json!(l.values),
            None => Value::Null,
        };
        attributes.insert(a.key.clone(), v);
    }
    json!({
        "trace_id": hex(&s.trace_id),
        "span_id": hex(&s.span_id),
        "parent_span_id": hex(&s.parent_span_id),
        "name": s.name,
        "kind": kind(s.kind),
        "start_unix_nanos": s.start_unix_nanos,
        "end_unix_nanos": s.end_unix_nanos,
        "duration_us": s.end_unix_nanos.saturating_sub(s.start_unix_nanos) / 1_000,
        "error": s.error,
        "status_message": s.status_message,
        "source": service(s.source.as_ref()),
        "target": service(s.target.as_ref()),
        "topic": s.topic,
        "node_id": s.node_id,
        "attributes": attributes,
    })
}
