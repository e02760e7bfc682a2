//! Dead letters, as the admin API and the control plane's requests (for
//! `weirctl events`) see them: listed, replayed (delivered again with the
//! original id and a fresh max age) or purged, by service, topic, type
//! and id. One implementation for both.

use std::time::Duration;

use weir_proto::{
    agent::v1::{dead_letters_request::Action, DeadLetter},
    outbox::v1::{Outcome, Update},
};

use super::{store::Stored, topics::Topics};
use crate::view::Routes;

/// Which dead letters: every filter given must match.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct Filter {
    pub service: Option<String>,
    pub topic: Option<String>,
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    pub id: Option<String>,
}

impl Filter {
    /// From a request's fields, where empty means any.
    pub fn of(service: &str, topic: &str, event_type: &str, id: &str) -> Self {
        let given = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Self {
            service: given(service),
            topic: given(topic),
            event_type: given(event_type),
            id: given(id),
        }
    }

    fn matches(&self, service: &str, e: &Stored) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.topic.as_deref().is_none_or(|t| t == e.topic)
            && self
                .event_type
                .as_deref()
                .is_none_or(|t| t == e.event.r#type)
            && self.id.as_deref().is_none_or(|i| i == e.event.id)
    }
}

/// Does `action` to the dead letters `filter` matches; those it matched,
/// as they were. `Err`: no outbox, or a record could not be written.
pub async fn act(
    topics: &Topics,
    routes: &Routes,
    action: Action,
    filter: &Filter,
) -> Result<Vec<DeadLetter>, String> {
    let outbox = topics.outbox().ok_or_else(|| {
        format!(
            "no outbox: {}",
            topics.unavailable().unwrap_or("not configured")
        )
    })?;
    let now = weir_core::time::now_unix_ms();
    let mut matched = Vec::new();
    for (service, e, d) in outbox.all_dead_letters() {
        if !filter.matches(&service, &e) {
            continue;
        }
        let outcome = match action {
            Action::Replay => Some(Outcome::Replayed),
            Action::Purge => Some(Outcome::Purged),
            Action::List | Action::Unspecified => None,
        };
        if let Some(outcome) = outcome {
            let max_age = routes
                .delivery(&e.namespace, &service)
                .map_or(Duration::from_secs(86_400), |d| d.max_age);
            let update = Update {
                seq: e.seq,
                service: service.to_string(),
                outcome: outcome as i32,
                attempts: 0,
                // For a replay: its new deadline.
                next_attempt_unix_ms: now
                    .saturating_add(i64::try_from(max_age.as_millis()).unwrap_or(i64::MAX)),
                error: String::new(),
                at_unix_ms: now,
            };
            outbox.update(update).await.map_err(|e| e.to_string())?;
        }
        matched.push(DeadLetter {
            seq: e.seq,
            namespace: e.namespace.clone(),
            service: service.to_string(),
            topic: e.topic.clone(),
            id: e.event.id.clone(),
            r#type: e.event.r#type.clone(),
            source: e.event.source.clone(),
            attempts: d.delivery.attempts,
            reason: d.reason,
            dead_unix_ms: d.dead_unix_ms,
            accepted_unix_ms: e.accepted_unix_ms,
        });
    }
    if action == Action::Replay {
        topics.wake.notify_waiters();
    }
    Ok(matched)
}
