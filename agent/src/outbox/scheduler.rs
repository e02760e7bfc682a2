//! Delivering what the outbox holds: one worker per subscribing service
//! (a [`Queue`]: namespace and service) with pending deliveries, so a slow
//! or dead subscriber never holds up the others. A worker keeps up to
//! [`WINDOW`] deliveries of its queue in flight (started in publish order,
//! the oldest per ordering key only, and one key never twice at once),
//! starting another due one as each ends and recording each outcome; with
//! nothing due it waits for a new event or [`TICK`].
//!
//! One delivery is one pass through the service's balancer and attempt
//! loop (its `retry` and `timeout`, as for addressed traffic), to an
//! instance that lists the topic: HTTP instances get the event in binary
//! mode at the path of their `weir.delivery.path` metadata (default `/`),
//! gRPC instances through `Subscriber/Deliver`. A 2xx (or
//! OK) is delivered. Any other outcome counts one attempt and the
//! delivery is tried again after a backoff (1 s doubling to 60 s), until
//! `max_attempts` or its deadline (`max_age`): then it becomes a dead
//! letter (with `dead_letter`) or is dropped, logged and counted. With no
//! usable instance, nothing is tried and no attempt is counted: the
//! delivery waits, up to its deadline.
//!
//! The log is compacted when it is over [`COMPACT_MIN_BYTES`] (or a
//! quarter of the quota, when smaller) and at least twice the live state
//! ([`Outbox::compact`]); looked at every [`TICK`], tried again after a
//! try that would not have gained only once the log grew by a quarter or
//! the events it holds fell by half.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use http::uri::PathAndQuery;
use tokio::{runtime::Handle, sync::watch, task::JoinHandle};
use weir_core::backoff::exponential;
use weir_proto::outbox::v1::{Outcome, Update};

use crate::telemetry::{
    context::parse_traceparent, Decision, Ending, EventInfo, Kind, Source, Trace,
};

use super::{
    store::{Due, Outbox, Queue},
    topics::{compensation, Topics},
};
use crate::{
    ingress::{
        attempts::{self, Plan},
        publisher::{Publish, Sent, TopicDelivery},
        Ingress,
    },
    reject::Reason,
};

/// Deliveries in flight per service at most.
pub const WINDOW: usize = 64;
/// How often a worker with nothing due looks again.
pub const TICK: Duration = Duration::from_millis(100);
/// A log smaller than this (or than a quarter of the quota) is never
/// compacted.
pub const COMPACT_MIN_BYTES: u64 = 64 << 20;
const BACKOFF_BASE: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// The outbox's depth, set every [`TICK`].
struct Gauges {
    events: metrics::Gauge,
    pending: metrics::Gauge,
    dead: metrics::Gauge,
    bytes: metrics::Gauge,
    oldest: metrics::Gauge,
}

impl Gauges {
    fn new() -> Self {
        Self {
            events: metrics::gauge!("weir_agent_outbox_events"),
            pending: metrics::gauge!("weir_agent_outbox_pending_deliveries"),
            dead: metrics::gauge!("weir_agent_outbox_dead_letters"),
            bytes: metrics::gauge!("weir_agent_outbox_bytes"),
            oldest: metrics::gauge!("weir_agent_outbox_oldest_age_seconds"),
        }
    }

    fn set(&self, outbox: &Outbox) {
        let (events, pending, dead) = outbox.depth();
        self.events.set(events as f64);
        self.pending.set(pending as f64);
        self.dead.set(dead as f64);
        self.bytes.set(outbox.used_bytes() as f64);
        let age = outbox.oldest_accepted_unix_ms().map_or(0.0, |at| {
            (weir_core::time::now_unix_ms() - at).max(0) as f64 / 1000.0
        });
        self.oldest.set(age);
    }
}

/// A service's delivery outcomes, counted.
struct Outcomes([metrics::Counter; 4]);

impl Outcomes {
    fn new(queue: &Queue) -> Self {
        Self(["delivered", "attempted", "dead", "dropped"].map(|o| {
            metrics::counter!("weir_agent_outbox_deliveries_total",
                "namespace" => queue.namespace.to_string(),
                "service" => queue.service.to_string(), "outcome" => o)
        }))
    }

    fn count(&self, outcome: Outcome) {
        let i = match outcome {
            Outcome::Delivered => 0,
            Outcome::Attempted => 1,
            Outcome::Dead => 2,
            Outcome::Dropped => 3,
            _ => return,
        };
        self.0[i].increment(1);
    }
}

/// How one delivery went.
enum Tried {
    Delivered,
    /// Tried, and failed with this.
    Failed(String),
    /// Not tried: no instance to try.
    NoInstance(String),
}

/// Runs until `stop`: starts a worker for every service with pending
/// deliveries, on one of `runtimes` (the ingress workers' runtimes, each
/// with its [`Ingress`], taken in turn), so that a delivery runs on the
/// thread whose pools it uses.
pub async fn run(
    topics: Arc<Topics>,
    runtimes: Vec<(Handle, Arc<Ingress>)>,
    mut stop: watch::Receiver<bool>,
) {
    let Some(outbox) = topics.outbox().cloned() else {
        return;
    };
    if runtimes.is_empty() {
        tracing::error!("no ingress worker runs; the outbox delivers nothing");
        return;
    }
    let mut turn = 0usize;
    let mut workers: HashMap<Queue, JoinHandle<()>> = HashMap::new();
    // Its own task: a compaction with a large backlog takes a while, and
    // meanwhile new queues still get their workers and the gauges move.
    let compactor = tokio::spawn(compact_while_running(outbox.clone(), stop.clone()));
    let gauges = Gauges::new();
    loop {
        gauges.set(&outbox);
        workers.retain(|_, w| !w.is_finished());
        for queue in outbox.pending_queues() {
            if let std::collections::hash_map::Entry::Vacant(slot) = workers.entry(queue) {
                let queue = slot.key().clone();
                let (runtime, ingress) = &runtimes[turn % runtimes.len()];
                turn = turn.wrapping_add(1);
                slot.insert(runtime.spawn(work(
                    topics.clone(),
                    outbox.clone(),
                    ingress.clone(),
                    queue,
                )));
            }
        }
        // Workers are woken by new events; the supervisor only looks for
        // new services, every tick.
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    for (_, w) in workers {
        w.abort();
    }
    // It ends at `stop` too, after the compaction it may be running.
    let _ = compactor.await;
}

/// Compacts the log when it is worth it (see the module docs), looking
/// every [`TICK`], until `stop`.
async fn compact_while_running(outbox: Arc<Outbox>, mut stop: watch::Receiver<bool>) {
    let min = COMPACT_MIN_BYTES.min(outbox.max_bytes() / 4);
    // After a try that would not have gained enough, the next waits until
    // the log grew by a quarter or the events held fell by half.
    let mut next_try = (min, usize::MAX);
    loop {
        let used = outbox.used_bytes();
        let events = outbox.depth().0;
        if used > min && (used > next_try.0 || events.saturating_mul(2) <= next_try.1) {
            match outbox.compact(min).await {
                Ok(true) => next_try = (min, usize::MAX),
                Ok(false) => next_try = (used + used / 4, events),
                Err(e) => {
                    tracing::error!(error = %e, "outbox compaction failed");
                    next_try = (used + used / 4, events);
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Delivers `queue`'s events until it has none pending, with up to
/// [`WINDOW`] in flight: as each delivery ends another due one starts, so
/// one slow delivery takes one place in the window and holds up nothing
/// else (but its own ordering key). The SENDING markers of the deliveries
/// started together go to the log together before any of them is sent;
/// the outcomes of those that ended together, likewise.
async fn work(topics: Arc<Topics>, outbox: Arc<Outbox>, ingress: Arc<Ingress>, queue: Queue) {
    use futures_util::{stream::FuturesUnordered, FutureExt as _, StreamExt as _};

    let wake = topics.wake.clone();
    let outcomes = Outcomes::new(&queue);
    let service = &*queue.service;
    // By seq: what is being delivered now.
    let mut flying: HashSet<u64> = HashSet::new();
    let mut in_flight = FuturesUnordered::new();
    loop {
        let now = weir_core::time::now_unix_ms();
        if in_flight.len() < WINDOW {
            // No instance of the service lists the topic now: nothing to
            // try, nothing to record; it waits (up to its deadline).
            let ready: Vec<Due> = outbox
                .due(&queue, now, WINDOW - in_flight.len(), &flying)
                .into_iter()
                .filter(|d| {
                    reachable(&ingress, service, &d.event)
                        || now >= d.delivery.target.deadline_unix_ms
                })
                .collect();
            if !ready.is_empty() {
                // Before the sends: after a crash, these deliveries are
                // known to be ones that may have arrived (a redelivery, a
                // possible duplicate).
                let sending = ready
                    .iter()
                    .map(|d| Update {
                        seq: d.event.seq,
                        service: service.to_owned(),
                        outcome: Outcome::Sending as i32,
                        attempts: d.delivery.attempts,
                        next_attempt_unix_ms: 0,
                        error: String::new(),
                        at_unix_ms: 0,
                    })
                    .collect();
                match outbox.update_all(sending).await {
                    Ok(()) => {
                        for d in ready {
                            flying.insert(d.event.seq);
                            in_flight.push(deliver(&topics, &ingress, service, d));
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot record deliveries about to be sent; not sending them");
                    }
                }
            }
        }
        if in_flight.is_empty() {
            if !outbox.has_pending(&queue) {
                return;
            }
            // Nothing due: a new event, or a retry's time, comes.
            tokio::select! {
                () = wake.notified() => {}
                () = tokio::time::sleep(TICK) => {}
            }
            continue;
        }
        // A delivery ends; or, with room in the window, a new event or a
        // retry's time comes.
        let ended = tokio::select! {
            ended = in_flight.next() => ended,
            () = wake.notified(), if in_flight.len() < WINDOW => None,
            () = tokio::time::sleep(TICK), if in_flight.len() < WINDOW => None,
        };
        let Some(first) = ended else {
            continue;
        };
        let mut updates = vec![first];
        while let Some(Some(more)) = in_flight.next().now_or_never() {
            updates.push(more);
        }
        for u in &updates {
            flying.remove(&u.seq);
            outcomes.count(Outcome::try_from(u.outcome).unwrap_or(Outcome::Unspecified));
        }
        if let Err(e) = outbox.update_all(updates).await {
            tracing::error!(error = %e, "cannot record delivery outcomes; they will be delivered again");
        }
    }
}

/// One delivery: the record of its outcome.
async fn deliver(topics: &Topics, ingress: &Ingress, service: &str, due: Due) -> Update {
    let Due { event, delivery } = due;
    let telemetry = &ingress.telemetry;
    let mut trace = telemetry.begin_with(
        Kind::Deliver,
        parse_traceparent(event.traceparent.as_bytes()),
        http::HeaderValue::from_str(&event.tracestate)
            .ok()
            .filter(|v| !v.is_empty()),
        Source::parse(event.publisher.as_bytes(), &event.namespace),
    );
    trace.topic(&event.namespace, &event.topic);
    if trace.is_on() {
        let e = &event.event;
        trace.event(EventInfo::of(&e.id, &e.r#type, &e.source));
    }
    let (outcome, ending) = send(ingress, service, &event, delivery.attempts + 1, &mut trace).await;
    let now = weir_core::time::now_unix_ms();
    let tried = !matches!(outcome, Tried::NoInstance(_));
    // A delivery that tried nothing is not traced: it waits.
    let mut trace = (tried && trace.is_on()).then_some(trace);
    let mut finish = |dead: bool| {
        if let (Some(mut t), Some(ending)) = (trace.take(), ending.as_ref()) {
            if dead {
                t.decided(Decision::DeadLettered);
            }
            telemetry.finish(t, ending);
        }
    };
    let attempts = delivery.attempts + u32::from(tried);
    let record = |outcome: Outcome, next_attempt_unix_ms: i64, error: String| Update {
        seq: event.seq,
        service: service.to_owned(),
        outcome: outcome as i32,
        attempts,
        next_attempt_unix_ms,
        error,
        at_unix_ms: now,
    };
    let e = match outcome {
        Tried::Delivered => {
            finish(false);
            return record(Outcome::Delivered, 0, String::new());
        }
        Tried::Failed(e) | Tried::NoInstance(e) => e,
    };
    let spent = attempts >= delivery.target.max_attempts;
    let late = now >= delivery.target.deadline_unix_ms;
    if !spent && !late {
        // No usable instance: nothing was sent and no attempt counts;
        // look again after a tick. Tried and failed: back off.
        let delay = if tried {
            exponential(BACKOFF_BASE, BACKOFF_MAX, attempts)
        } else {
            TICK
        };
        let next = now.saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        finish(false);
        return record(Outcome::Attempted, next, e);
    }
    finish(delivery.target.dead_letter);
    let why = if spent {
        format!("{attempts} attempts failed; the last: {e}")
    } else {
        format!("not delivered within its max age; the last error: {e}")
    };
    let comp = &delivery.target.compensation_topic;
    if !comp.is_empty() {
        let failed = compensation(&event.event, &event.topic, service, attempts, &e);
        if let Err(r) = topics
            .publish(
                &event.namespace,
                comp,
                failed,
                super::store::Origin {
                    traceparent: &event.traceparent,
                    tracestate: &event.tracestate,
                    publisher: "",
                },
            )
            .await
        {
            tracing::error!(service, topic = %comp, error = %r, "cannot publish the compensation event");
        }
    }
    let outcome = if delivery.target.dead_letter {
        tracing::warn!(service, topic = %event.topic, id = %event.event.id, reason = %why, "delivery dead-lettered");
        Outcome::Dead
    } else {
        tracing::warn!(service, topic = %event.topic, id = %event.event.id, reason = %why, "delivery dropped (the policy keeps no dead letters)");
        Outcome::Dropped
    };
    record(outcome, 0, why)
}

/// Whether `service` has an instance that lists the event's topic.
fn reachable(ingress: &Ingress, service: &str, event: &super::store::Stored) -> bool {
    ingress
        .routes
        .get(&event.namespace, service)
        .is_some_and(|r| {
            r.balancer
                .endpoints()
                .iter()
                .any(|e| e.subscribes(&event.topic))
        })
}

/// One pass through the service's balancer and attempt loop.
async fn send(
    ingress: &Ingress,
    service: &str,
    event: &super::store::Stored,
    attempt: u32,
    trace: &mut Trace,
) -> (Tried, Option<Ending>) {
    let Some(route) = ingress.routes.get(&event.namespace, service) else {
        let why = format!("service {}/{service} has no instance", event.namespace);
        return (Tried::NoInstance(why), None);
    };
    trace.target(&route);
    let handling = route.handling_for(&event.event.r#type, &event.event.source);
    // The subscriber's rate limit sets the pace; it never refuses.
    if let Some(limit) = handling.limit {
        limit.paced().await;
    }
    let plan = Plan {
        route: &route,
        handling,
        key: None,
        safe: true,
        topic: Some(&event.topic),
    };
    let keep = handling.failure.attempts() > 1;
    let mut exchange = Publish::new(
        ingress,
        event.event.clone(),
        PathAndQuery::from_static("/"),
        keep,
    )
    .for_topic(TopicDelivery {
        topic: event.topic.clone(),
        subscription: service.to_owned(),
        attempt,
    });
    match attempts::run(plan, &mut exchange, trace).await {
        Ok(Sent::Answered(r)) => {
            let ending = Ending::status(u16::try_from(r.status).unwrap_or(500));
            if (200..300).contains(&r.status) {
                (Tried::Delivered, Some(ending))
            } else {
                let why = format!("instance {} answered {}", r.instance_id, r.status);
                (Tried::Failed(why), Some(ending))
            }
        }
        Ok(Sent::Refused { instance, status }) => {
            let why = format!(
                "instance {instance} answered {}: {}",
                status.code(),
                status.message()
            );
            let ending = Ending::grpc(status.code(), status.message());
            (Tried::Failed(why), Some(ending))
        }
        // Every breaker open: like no instance, the delivery waits (no
        // attempt counted) until a probe finds the service back.
        Err(r) if matches!(r.reason, Reason::NoEndpoint | Reason::CircuitOpen) => {
            (Tried::NoInstance(r.detail.into_owned()), None)
        }
        Err(r) => {
            let ending = Ending::rejected(&r);
            (Tried::Failed(r.to_string()), Some(ending))
        }
    }
}
