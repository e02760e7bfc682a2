//! The admin API (loopback by default): what the agent knows and does.
//!
//! - `GET /healthz`: the process answers.
//! - `GET /readyz`: 200 once the agent can route (it has a registry view),
//!   503 with the reason before.
//! - `GET /v1/state`: the session (replica, degraded, revisions, policy
//!   versions acknowledged) and every route with its endpoints and
//!   requests in flight, as JSON.
//! - `GET /metrics`: Prometheus text (see `docs/metrics.md`).

use std::sync::{Arc, OnceLock};

use axum::{extract::State, http::StatusCode, response::IntoResponse, routing::get, Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use tokio::sync::watch;

use crate::{
    session::SessionState,
    view::{RouteState, Routes},
};

/// The process-wide Prometheus recorder, installed by the first agent.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!(
                "a metrics recorder was already installed; /metrics shows only what reaches it"
            );
        }
        handle
    })
}

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

/// Which dead letters a request means: every filter given must match.
#[derive(Debug, Default, serde::Deserialize)]
struct DeadFilter {
    service: Option<String>,
    topic: Option<String>,
    #[serde(rename = "type")]
    event_type: Option<String>,
    id: Option<String>,
}

impl DeadFilter {
    fn matches(&self, service: &str, e: &crate::outbox::store::Stored) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.topic.as_deref().is_none_or(|t| t == e.topic)
            && self
                .event_type
                .as_deref()
                .is_none_or(|t| t == e.event.r#type)
            && self.id.as_deref().is_none_or(|i| i == e.event.id)
    }
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

fn no_outbox(a: &Admin) -> (StatusCode, String) {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "no outbox: {}\n",
            a.topics.unavailable().unwrap_or("not configured")
        ),
    )
}

/// `GET /v1/dead-letters?service=&topic=&type=&id=`: the dead letters
/// every given filter matches.
async fn dead_letters(
    State(a): State<Admin>,
    axum::extract::Query(filter): axum::extract::Query<DeadFilter>,
) -> axum::response::Response {
    let Some(outbox) = a.topics.outbox() else {
        return no_outbox(&a).into_response();
    };
    let list: Vec<DeadLetterState> = outbox
        .all_dead_letters()
        .into_iter()
        .filter(|(svc, e, _)| filter.matches(svc, e))
        .map(|(svc, e, d)| DeadLetterState {
            seq: e.seq,
            service: svc.to_string(),
            namespace: e.namespace.clone(),
            topic: e.topic.clone(),
            id: e.event.id.clone(),
            event_type: e.event.r#type.clone(),
            source: e.event.source.clone(),
            attempts: d.delivery.attempts,
            reason: d.reason,
            dead_unix_ms: d.dead_unix_ms,
            accepted_unix_ms: e.accepted_unix_ms,
        })
        .collect();
    Json(list).into_response()
}

/// Replays (delivers again, with the original id and a fresh max age) or
/// purges the dead letters `filter` matches; how many.
async fn act_on_dead(
    a: &Admin,
    filter: &DeadFilter,
    outcome: weir_proto::outbox::v1::Outcome,
) -> axum::response::Response {
    let Some(outbox) = a.topics.outbox() else {
        return no_outbox(a).into_response();
    };
    let now = weir_core::time::now_unix_ms();
    let mut done = 0usize;
    for (svc, e, _) in outbox.all_dead_letters() {
        if !filter.matches(&svc, &e) {
            continue;
        }
        let max_age = a
            .routes
            .delivery(&e.namespace, &svc)
            .map_or(std::time::Duration::from_secs(86_400), |d| d.max_age);
        let update = weir_proto::outbox::v1::Update {
            seq: e.seq,
            service: svc.to_string(),
            outcome: outcome as i32,
            attempts: 0,
            // For a replay: its new deadline.
            next_attempt_unix_ms: now
                .saturating_add(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX)),
            error: String::new(),
            at_unix_ms: now,
        };
        if let Err(e) = outbox.update(update).await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
        done += 1;
    }
    a.topics.wake.notify_waiters();
    let key = if outcome == weir_proto::outbox::v1::Outcome::Replayed {
        "replayed"
    } else {
        "purged"
    };
    Json(serde_json::json!({ key: done })).into_response()
}

async fn replay(
    State(a): State<Admin>,
    axum::extract::Query(filter): axum::extract::Query<DeadFilter>,
) -> axum::response::Response {
    act_on_dead(&a, &filter, weir_proto::outbox::v1::Outcome::Replayed).await
}

async fn purge(
    State(a): State<Admin>,
    axum::extract::Query(filter): axum::extract::Query<DeadFilter>,
) -> axum::response::Response {
    act_on_dead(&a, &filter, weir_proto::outbox::v1::Outcome::Purged).await
}
