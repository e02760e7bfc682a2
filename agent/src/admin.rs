//! The admin API (loopback by default): what the agent knows and does.
//!
//! - `GET /healthz`: the process answers.
//! - `GET /readyz`: 200 once the agent can route (it has a registry view),
//!   503 with the reason before.
//! - `GET /v1/state`: the session (replica, degraded, revisions, policy
//!   versions acknowledged) and every route with its endpoints and
//!   requests in flight, as JSON.
//! - `GET /metrics`: Prometheus text (see `docs/metrics.md`).

use std::sync::Arc;

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    session::SessionState,
    view::{RouteState, Routes},
};

/// The process-wide Prometheus recorder (shared with a control plane in
/// the same process).
pub use weir_core::prometheus::handle as prometheus;

#[derive(Debug, Clone)]
pub struct Admin {
    pub node_id: String,
    pub session: watch::Receiver<SessionState>,
    pub routes: Arc<Routes>,
    /// Requests in flight over every ingress worker.
    pub in_flight: crate::ingress::InFlightTotal,
    pub topics: Arc<crate::outbox::topics::Topics>,
}

#[derive(Serialize)]
struct StateBody {
    node_id: String,
    session: SessionState,
    in_flight: usize,
    routes: Vec<RouteState>,
    /// Which services subscribe to which topics (`listed`: an instance
    /// lists the topic now; else the subscription is retained).
    subscriptions: Vec<SubscriptionState>,
    outbox: OutboxState,
}

#[derive(Serialize)]
struct OutboxState {
    /// Whether publishing works (an outbox under `--data-dir` is open).
    available: bool,
    /// Why not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    /// Events held, deliveries pending, dead letters.
    events: usize,
    pending: usize,
    dead_letters: usize,
    used_bytes: u64,
}

#[derive(Serialize)]
struct SubscriptionState {
    namespace: String,
    topic: String,
    service: String,
    listed: bool,
}

pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/v1/state", get(state))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/dead-letters/replay", axum::routing::post(replay))
        .route("/v1/dead-letters/purge", axum::routing::post(purge))
        .route("/metrics", get(|| async { prometheus().render() }))
        .with_state(admin)
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    let (view, local) = {
        let s = a.session.borrow();
        (s.view_loaded, s.local_registered)
    };
    if let Some(why) = a.topics.broken() {
        // Addressed traffic flows; publishing does not.
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: the outbox cannot be opened: {why}\n"),
        );
    }
    if view && local {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            if view {
                "not ready: registering the node's local instances\n".to_owned()
            } else {
                "not ready: no registry view yet (waiting for the control plane)\n".to_owned()
            },
        )
    }
}

async fn state(State(a): State<Admin>) -> Json<StateBody> {
    Json(StateBody {
        node_id: a.node_id.clone(),
        session: a.session.borrow().clone(),
        in_flight: a.in_flight.get(),
        routes: a
            .routes
            .all()
            .iter()
            .map(|r| RouteState::from(&**r))
            .collect(),
        subscriptions: a
            .routes
            .subscription_list()
            .into_iter()
            .map(|(namespace, topic, service, listed)| SubscriptionState {
                namespace,
                topic,
                service,
                listed,
            })
            .collect(),
        outbox: {
            let (events, pending, dead_letters) =
                a.topics.outbox().map_or((0, 0, 0), |o| o.depth());
            OutboxState {
                available: a.topics.outbox().is_some(),
                error: a.topics.unavailable().map(str::to_owned),
                events,
                pending,
                dead_letters,
                used_bytes: a.topics.outbox().map_or(0, |o| {
                    o.log_stats()
                        .used_bytes
                        .load(std::sync::atomic::Ordering::Relaxed)
                }),
            }
        },
    })
}

#[derive(Serialize)]
struct DeadLetterState {
    seq: u64,
    service: String,
    namespace: String,
    topic: String,
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    source: String,
    attempts: u32,
    reason: String,
    dead_unix_ms: i64,
    accepted_unix_ms: i64,
}

/// `action` on the dead letters `filter` matches: the list (for a list),
/// or how many were replayed or purged.
async fn dead(
    a: &Admin,
    action: weir_proto::agent::v1::dead_letters_request::Action,
    filter: &crate::outbox::dead::Filter,
) -> axum::response::Response {
    use weir_proto::agent::v1::dead_letters_request::Action;
    let matched = match crate::outbox::dead::act(&a.topics, &a.routes, action, filter).await {
        Ok(m) => m,
        Err(why) => return (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    };
    match action {
        Action::Replay => Json(serde_json::json!({ "replayed": matched.len() })).into_response(),
        Action::Purge => Json(serde_json::json!({ "purged": matched.len() })).into_response(),
        Action::List | Action::Unspecified => Json(
            matched
                .into_iter()
                .map(|d| DeadLetterState {
                    seq: d.seq,
                    service: d.service,
                    namespace: d.namespace,
                    topic: d.topic,
                    id: d.id,
                    event_type: d.r#type,
                    source: d.source,
                    attempts: d.attempts,
                    reason: d.reason,
                    dead_unix_ms: d.dead_unix_ms,
                    accepted_unix_ms: d.accepted_unix_ms,
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
    }
}

type Filtered = axum::extract::Query<crate::outbox::dead::Filter>;

/// `GET /v1/dead-letters?service=&topic=&type=&id=`.
async fn dead_letters(State(a): State<Admin>, filter: Filtered) -> axum::response::Response {
    dead(
        &a,
        weir_proto::agent::v1::dead_letters_request::Action::List,
        &filter,
    )
    .await
}

/// `POST /v1/dead-letters/replay?...`: delivered again, original ids.
async fn replay(State(a): State<Admin>, filter: Filtered) -> axum::response::Response {
    dead(
        &a,
        weir_proto::agent::v1::dead_letters_request::Action::Replay,
        &filter,
    )
    .await
}

/// `POST /v1/dead-letters/purge?...`.
async fn purge(State(a): State<Admin>, filter: Filtered) -> axum::response::Response {
    dead(
        &a,
        weir_proto::agent::v1::dead_letters_request::Action::Purge,
        &filter,
    )
    .await
}
