//! Publishing to a topic: the event is accepted into the outbox once, for
//! every service subscribed to the topic now ([`Subscriptions`](super::subscriptions)),
//! each with the delivery settings of its policy, and the
//! [`scheduler`](super::scheduler) delivers one copy per service.
//!
//! A publish is durable (answered only once the event is fsync'd, with
//! the group commit of the [`log`](super::log)) when any subscriber's
//! policy sets `delivery.durable_outbox` or the agent runs with
//! `--durable-by-default true`. A topic nobody subscribes to is accepted
//! and dropped with a count, or refused with 404 `no-subscriber`
//! (`--unsubscribed reject`). Without `--data-dir`, or with an outbox that
//! could not be opened, publishing answers 503 `outbox-unavailable`; past
//! the quota, 503 `outbox-full` with `Retry-After`.

use std::{sync::Arc, time::Duration};

use tokio::sync::Notify;
use weir_core::policy::{
    resolve::Delivery,
    validate::{DEFAULT_DELIVERY_ATTEMPTS, DEFAULT_MAX_AGE_SECONDS},
};
use weir_proto::{cloudevents::v1::CloudEvent, outbox::v1::Target};

use super::{
    event::attribute,
    log::LogError,
    store::{Outbox, OutboxError},
};
use crate::{
    config::Unsubscribed,
    reject::{Reason, Rejection},
    view::Routes,
};

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Published {
    pub id: String,
    pub topic: String,
    /// The services it will reach (empty: dropped, nobody subscribes).
    pub subscribers: Vec<String>,
    /// Written to disk before this answer.
    pub durable: bool,
}

/// The CloudEvents `type` of a compensation event.
pub const COMPENSATION_TYPE: &str = "weir.delivery.failed";

/// The compensation event for `event`'s delivery to `service` that failed
/// for good: `weir.delivery.failed`, from `/weir/topics/{topic}`, its id
/// the original's with `.failed.{service}`, its JSON data naming the
/// original (id, type, source, subject), the topic, the service, the
/// attempts and the last error; `subject` is the original id, so a
/// consumer can order or key by it.
pub fn compensation(
    event: &CloudEvent,
    topic: &str,
    service: &str,
    attempts: u32,
    error: &str,
) -> CloudEvent {
    use weir_proto::cloudevents::v1::cloud_event::{
        cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data,
    };
    let data = serde_json::json!({
        "id": event.id,
        "type": event.r#type,
        "source": event.source,
        "subject": attribute(event, "subject"),
        "topic": topic,
        "service": service,
        "attempts": attempts,
        "error": error,
    });
    let text = |s: &str| CloudEventAttributeValue {
        attr: Some(Attr::CeString(s.to_owned())),
    };
    CloudEvent {
        id: format!("{}.failed.{service}", event.id),
        source: format!("/weir/topics/{topic}"),
        spec_version: "1.0".into(),
        r#type: COMPENSATION_TYPE.into(),
        attributes: [
            ("subject".to_owned(), text(&event.id)),
            ("datacontenttype".to_owned(), text("application/json")),
        ]
        .into_iter()
        .collect(),
        data: Some(Data::TextData(data.to_string())),
    }
}

/// The topics of one agent.
#[derive(Debug)]
pub struct Topics {
    outbox: Result<Arc<Outbox>, String>,
    /// The outbox exists but could not be opened (not merely unset).
    broken: bool,
    routes: Arc<Routes>,
    durable_by_default: bool,
    unsubscribed: Unsubscribed,
    /// Woken on every accepted event, for the scheduler.
    pub wake: Arc<Notify>,
    published: metrics::Counter,
    dropped: metrics::Counter,
}

/// The delivery settings of a service whose policy has none.
fn default_delivery() -> Delivery {
    Delivery {
        durable_outbox: false,
        max_age: Duration::from_secs(u64::from(DEFAULT_MAX_AGE_SECONDS)),
        max_attempts: DEFAULT_DELIVERY_ATTEMPTS,
        dead_letter: false,
        ordered: false,
        compensation_topic: None,
        shadow: false,
    }
}

impl Topics {
    /// `outbox`: the opened outbox, or why there is none; `broken`: it
    /// failed to open (as opposed to not being configured).
    pub fn new(
        outbox: Result<Arc<Outbox>, String>,
        broken: bool,
        routes: Arc<Routes>,
        durable_by_default: bool,
        unsubscribed: Unsubscribed,
    ) -> Self {
        Self {
            outbox,
            broken,
            routes,
            durable_by_default,
            unsubscribed,
            wake: Arc::new(Notify::new()),
            published: metrics::counter!("weir_agent_outbox_published_total"),
            dropped: metrics::counter!("weir_agent_outbox_unsubscribed_total"),
        }
    }

    /// The outbox, when there is one.
    pub fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.outbox.as_ref().ok()
    }

    /// Why the outbox failed to open, if it did (`/readyz` reports it).
    pub fn broken(&self) -> Option<&str> {
        self.broken.then(|| self.unavailable()).flatten()
    }

    /// Why there is no outbox, if there is none.
    pub fn unavailable(&self) -> Option<&str> {
        self.outbox.as_ref().err().map(String::as_str)
    }

    /// Accepts `event` for `namespace/topic`.
    pub async fn publish(
        &self,
        namespace: &str,
        topic: &str,
        event: CloudEvent,
        origin: super::store::Origin<'_>,
    ) -> Result<Published, Rejection> {
        if !weir_core::validate::valid_topic(topic) {
            return Err(Rejection::new(
                Reason::NoTarget,
                format!(
                    "topic must be 1-{} printable ASCII characters without spaces",
                    weir_core::validate::MAX_TOPIC_LEN
                ),
            ));
        }
        let outbox = self
            .outbox
            .as_ref()
            .map_err(|why| Rejection::new(Reason::OutboxUnavailable, why.clone()))?;
        if !self.routes.loaded() {
            // Subscribers are unknown until the registry view is in.
            let mut r = Rejection::new(
                Reason::OutboxUnavailable,
                "no registry view yet, so the topic's subscribers are unknown; try again shortly",
            );
            r.retry_after = Some(Duration::from_secs(1));
            return Err(r);
        }
        let subscribers = self.routes.subscribers(namespace, topic);
        let id = event.id.clone();
        if subscribers.is_empty() {
            if self.unsubscribed == Unsubscribed::Reject {
                return Err(Rejection::new(
                    Reason::NoSubscriber,
                    format!("no service subscribes to topic {namespace}/{topic}"),
                ));
            }
            self.dropped.increment(1);
            return Ok(Published {
                id,
                topic: topic.to_owned(),
                subscribers: Vec::new(),
                durable: false,
            });
        }
        let now = weir_core::time::now_unix_ms();
        let mut durable = self.durable_by_default;
        let targets: Vec<Target> = subscribers
            .iter()
            .map(|service| {
                let d = self
                    .routes
                    .delivery(namespace, service)
                    .unwrap_or_else(default_delivery);
                durable |= d.durable_outbox;
                Target {
                    service: service.to_string(),
                    deadline_unix_ms: now
                        .saturating_add(i64::try_from(d.max_age.as_millis()).unwrap_or(i64::MAX)),
                    max_attempts: d.max_attempts,
                    dead_letter: d.dead_letter,
                    ordering_key: if d.ordered {
                        attribute(&event, "partitionkey")
                            .unwrap_or_default()
                            .to_owned()
                    } else {
                        String::new()
                    },
                    compensation_topic: d.compensation_topic.unwrap_or_default(),
                }
            })
            .collect();
        match outbox
            .accept(namespace, topic, event, origin, targets, durable)
            .await
        {
            Ok(_) => {}
            Err(OutboxError::Log(LogError::Full { used, max })) => {
                let mut r = Rejection::new(
                    Reason::OutboxFull,
                    format!("the outbox holds {used} of its {max} bytes; try again once subscribers drain it"),
                );
                r.retry_after = Some(Duration::from_secs(1));
                return Err(r);
            }
            Err(e) => {
                tracing::error!(error = %e, "the outbox refused an event");
                return Err(Rejection::new(Reason::OutboxUnavailable, e.to_string()));
            }
        }
        self.published.increment(1);
        self.wake.notify_waiters();
        Ok(Published {
            id,
            topic: topic.to_owned(),
            subscribers: subscribers.into_iter().map(String::from).collect(),
            durable,
        })
    }
}
