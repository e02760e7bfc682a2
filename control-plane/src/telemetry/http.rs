//! The telemetry JSON API on the control plane's HTTP port, the same
//! answers as the gRPC queries (for the whole cluster), in JSON with
//! hex ids:
//!
//! - `GET /api/v1/traces?service=&outcome=ok|error&min_duration_ms=&since_unix_ms=&until_unix_ms=&limit=`
//! - `GET /api/v1/traces/{trace_id}`
//! - `GET /api/v1/stats?window_seconds=60|900&service=`
//! - `GET /api/v1/topology?window_seconds=`
//!
//! The JSON is `weir_core::telemetry_json`'s, as `weirctl -o json` prints
//! it. A bad parameter is a 400 naming it; an unknown trace a 404.

use std::sync::Arc;

use axum::{
    extract::{Path, Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use serde::Deserialize;
use serde_json::json;
use weir_core::telemetry_json;
use weir_proto::telemetry::v1::{
    GetStatsRequest, GetTopologyRequest, GetTraceRequest, ListTracesRequest,
};

use super::service::TelemetryState;
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
        Ok(r) => Json(telemetry_json::summaries(&r.traces)).into_response(),
        Err(e) => error(e),
    }
}

async fn one(State(state): State<Arc<TelemetryState>>, Path(id): Path<String>) -> Response {
    let request = GetTraceRequest {
        trace_id: id.clone(),
    };
    match state.trace(&request, false).await {
        Ok(r) => Json(telemetry_json::trace(&id, &r.spans)).into_response(),
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
        Ok(r) => Json(telemetry_json::stats(&r)).into_response(),
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
        Ok(t) => Json(telemetry_json::topology(&t)).into_response(),
        Err(e) => error(e),
    }
}
