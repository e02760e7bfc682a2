//! The node session: the agent's one stream to the control plane.
//!
//! It opens `AgentSessionService/Session` on the first replica that takes
//! it, applies the registry and policy messages to the [`View`], and
//! acknowledges every policy version. When the stream breaks it reopens
//! it, on any replica, with capped, jittered backoff, resuming both
//! streams from the revisions it applied; while no replica answers it
//! keeps routing on the view it has and says it is degraded.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use tokio::sync::watch;
use weir_client::{
    agent::{Hello, PolicyChange},
    AgentSession, Client, EventType, SessionEvent, WatchUpdate,
};
use weir_core::{
    backoff::{Backoff, Jitter},
    time::now_unix_ms,
};

use crate::{local::Local, view::View};

/// What the session is doing, for the admin API and readiness.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SessionState {
    /// A stream is open.
    pub connected: bool,
    /// No replica answers and the agent routes on the view it has.
    pub degraded: bool,
    /// The replica serving the stream (the last one, when not connected).
    pub replica: String,
    /// The last stream took over the node's earlier session.
    pub resumed_session: bool,
    /// A complete registry snapshot was applied: the agent can route.
    pub view_loaded: bool,
    /// The node's local instances are registered in the current session.
    pub local_registered: bool,
    /// Local instances held.
    pub local_instances: usize,
    pub registry_revision: u64,
    pub policy_revision: u64,
    /// Policy version acknowledged per `namespace/service`.
    pub policies: BTreeMap<String, u64>,
    /// When the state last changed between connected and not.
    pub since_unix_ms: i64,
    /// Why the last stream ended or could not open.
    pub last_error: Option<String>,
}

/// Runs the session until the process stops.
pub async fn run(
    client: Client,
    hello: Hello,
    mut view: View,
    local: std::sync::Arc<Local>,
    state: watch::Sender<SessionState>,
) {
    let mut backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(Jitter::Half);
    let connected = metrics::gauge!("weir_agent_session_connected");
    let degraded = metrics::gauge!("weir_agent_degraded");
    let mut previous: Option<AgentSession> = None;
    loop {
        let mut resume = hello.clone();
        if view.is_loaded() {
            resume.registry_revision = view.revision();
        }
        if let Some(p) = &previous {
            resume.policy_revision = p.policy_revision();
        }
        match client.open_session(resume).await {
            Ok(mut session) => {
                if let Some(p) = &previous {
                    session.adopt(p);
                }
                view.stream_restarted();
                backoff.reset();
                tracing::info!(
                    replica = %session.welcome().replica_id,
                    resumed = session.welcome().resumed_session,
                    registry_revision = view.revision(),
                    "node session open"
                );
                connected.set(1.0);
                degraded.set(0.0);
                state.send_modify(|s| {
                    s.connected = true;
                    s.degraded = false;
                    s.replica = session.welcome().replica_id.clone();
                    s.resumed_session = session.welcome().resumed_session;
                    s.since_unix_ms = now_unix_ms();
                });
                if !session.welcome().resumed_session && !local.is_empty() {
                    // A new lease: the records of the old one are gone.
                    let failed = local.register_all().await;
                    tracing::info!(
                        instances = local.len(),
                        failed,
                        "local instances registered in the new session"
                    );
                }
                state.send_modify(|s| {
                    s.local_registered = true;
                    s.local_instances = local.len();
                });
                let error = follow(&mut session, &mut view, &local, &state).await;
                tracing::warn!(error = %error, "node session ended; reconnecting");
                connected.set(0.0);
                degraded.set(if view.is_loaded() { 1.0 } else { 0.0 });
                state.send_modify(|s| {
                    s.connected = false;
                    s.degraded = view.is_loaded();
                    s.since_unix_ms = now_unix_ms();
                    s.last_error = Some(error);
                });
                previous = Some(session);
            }
            Err(e) => {
                tracing::warn!(error = %e, degraded = view.is_loaded(), "no control-plane replica took the node session");
                state.send_modify(|s| s.last_error = Some(e.to_string()));
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Applies what the stream brings until it ends; returns why it ended.
async fn follow(
    session: &mut AgentSession,
    view: &mut View,
    local: &Local,
    state: &watch::Sender<SessionState>,
) -> String {
    loop {
        let event = match session.next().await {
            Ok(Some(event)) => event,
            Ok(None) => return "the control plane closed the stream".to_owned(),
            Err(e) => return e.to_string(),
        };
        match event {
            SessionEvent::Registry(message) => match view.apply(message) {
                Ok(Some(WatchUpdate::Changes { events, .. })) => {
                    for e in &events {
                        if e.r#type == EventType::Delete as i32 {
                            if let Some(i) = &e.instance {
                                local.removed_elsewhere(i);
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    // The stream disagrees with the view: start over from
                    // a snapshot rather than route on a wrong one.
                    view.forget_revision();
                    return format!("registry stream out of order ({e}); resyncing");
                }
            },
            SessionEvent::Policies(update) => {
                for change in &update.changes {
                    if let Err(e) = acknowledge(session, change).await {
                        return format!("acknowledging a policy failed: {e}");
                    }
                    state.send_modify(|s| {
                        let key = format!("{}/{}", change.namespace, change.service);
                        if change.policy.is_some() {
                            s.policies.insert(key, change.version);
                        } else {
                            s.policies.remove(&key);
                        }
                    });
                }
            }
        }
        state.send_modify(|s| {
            s.local_instances = local.len();
            s.view_loaded = view.is_loaded();
            s.registry_revision = view.revision();
            s.policy_revision = session.policy_revision();
        });
    }
}

/// Acknowledges one policy version. Nothing in a policy is enforced by
/// this agent yet (the policy stack comes with the next issues), so it
/// reports every version as received, not as enforced: see the note in
/// `docs/agent.md`.
async fn acknowledge(
    session: &AgentSession,
    change: &PolicyChange,
) -> Result<(), weir_client::Error> {
    session
        .ack(&change.namespace, &change.service, change.version, Ok(()))
        .await
}
