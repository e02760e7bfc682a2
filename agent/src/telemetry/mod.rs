//! Telemetry: every request and delivery through the agent is a span with
//! a child span per attempt, and counts on its edge (source → target, or
//! publisher → topic → subscriber).
//!
//! A request begins a [`Trace`] from its headers (W3C `traceparent`, or
//! B3; none starts a trace) and the caller's identity (`weir-source`, or
//! the node's one local service). The attempt loop asks it for the
//! `traceparent` of each attempt, which the instance receives, and notes
//! what each attempt got and the governance decisions taken. When the
//! request ends, [`Telemetry::finish`] counts it on its edge (always:
//! metrics are never sampled) and keeps its spans when the trace is
//! sampled, failed, or was slow, within a spans-per-second cap.
//!
//! Sampling is decided once per trace, at its head: a caller's sampled
//! flag is followed; a trace the agent starts is sampled at the target
//! service's policy rate (`tracing.sample_rate`), else the agent's
//! default. Errors and slow requests are kept whatever the rate.
//!
//! The state is sharded by thread: a request touches only its thread's
//! shard (an uncontended lock), and the [`report`] task drains them all
//! about once a second.

pub mod context;
mod edges;
pub mod report;

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
        Arc, Mutex,
    },
    time::Duration,
};

use http::{HeaderMap, HeaderValue};
use tokio::time::Instant;
use weir_proto::telemetry::v1::{self as pb, attribute::Value};

use crate::{reject::Reason, view::ServiceRoute};
pub use context::{Parent, SpanId, TraceId};
use edges::Edges;

/// The header `weir-client` sets to name the calling service:
/// `namespace/name`, or `name` (the agent's namespace).
pub const WEIR_SOURCE: &str = "weir-source";

/// Telemetry settings (`--telemetry`, `--trace-*`).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Off: no spans, no edge counts, no trace context sent on.
    pub enabled: bool,
    /// Share of the traces this agent starts that are kept, when the
    /// target's policy says nothing.
    pub sample_rate: f64,
    /// Requests at least this slow are kept whatever the rate.
    pub slow: Duration,
    /// Spans kept per second at most; the rest are dropped and counted.
    pub spans_per_second: u32,
    /// Spans held for the next batch at most.
    pub max_buffered_spans: usize,
    /// Bytes of batches (encoded) kept while no control plane
    /// acknowledges them.
    pub buffer_bytes: usize,
    pub node_id: String,
    /// The agent's namespace: a `weir-source` without one is in it.
    pub namespace: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            enabled: true,
            sample_rate: 0.01,
            slow: Duration::from_secs(1),
            spans_per_second: 1_000,
            max_buffered_spans: 20_000,
            buffer_bytes: report::DEFAULT_BUFFER_BYTES,
            node_id: String::new(),
            namespace: "default".into(),
        }
    }
}

/// What a request was, for its span's name and kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An event (or request) addressed to a service.
    Send,
    /// An event published to a topic.
    Publish,
    /// A topic's event delivered to one subscribing service.
    Deliver,
}

/// Governance decisions a request met (bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    RateLimited = 1,
    Queued = 2,
    CircuitOpen = 4,
    BreakerOpened = 8,
    Ejected = 16,
    Retried = 32,
    DeadLettered = 64,
}

impl Decision {
    const ALL: [Decision; 7] = [
        Decision::RateLimited,
        Decision::Queued,
        Decision::CircuitOpen,
        Decision::BreakerOpened,
        Decision::Ejected,
        Decision::Retried,
        Decision::DeadLettered,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Decision::RateLimited => "rate-limited",
            Decision::Queued => "queued",
            Decision::CircuitOpen => "circuit-open",
            Decision::BreakerOpened => "breaker-opened",
            Decision::Ejected => "ejected",
            Decision::Retried => "retried",
            Decision::DeadLettered => "dead-lettered",
        }
    }
}

/// How a request ended, as counted on its edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    ClientError,
    ServerError,
    Limited,
    Rejected,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::ClientError,
        Outcome::ServerError,
        Outcome::Limited,
        Outcome::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Limited => "limited",
            Outcome::Rejected => "rejected",
        }
    }

    /// An instance's HTTP status.
    pub fn of_status(status: u16) -> Self {
        match status {
            500.. => Outcome::ServerError,
            400..=499 => Outcome::ClientError,
            _ => Outcome::Ok,
        }
    }

    /// A gRPC status code from an instance.
    pub fn of_grpc(code: tonic::Code) -> Self {
        use tonic::Code::*;
        match code {
            Ok => Outcome::Ok,
            InvalidArgument | NotFound | AlreadyExists | PermissionDenied | FailedPrecondition
            | OutOfRange | Unauthenticated | Cancelled => Outcome::ClientError,
            _ => Outcome::ServerError,
        }
    }

    /// An answer the agent made itself.
    pub fn of_rejection(reason: Reason) -> Self {
        match reason {
            Reason::RateLimited => Outcome::Limited,
            Reason::UpstreamUnavailable | Reason::Timeout => Outcome::ServerError,
            _ => Outcome::Rejected,
        }
    }

    fn is_error(self) -> bool {
        matches!(self, Outcome::ServerError | Outcome::Rejected)
    }
}

/// How a request ended: its outcome, the status answered (HTTP, or the
/// gRPC code when `grpc`), and the agent's reason when it answered itself.
#[derive(Clone, Debug)]
pub struct Ending {
    pub outcome: Outcome,
    pub status: u16,
    pub grpc: bool,
    pub reason: Option<Reason>,
    pub message: String,
}

impl Ending {
    pub fn status(status: u16) -> Self {
        Self {
            outcome: Outcome::of_status(status),
            status,
            grpc: false,
            reason: None,
            message: String::new(),
        }
    }

    pub fn grpc(code: tonic::Code, message: &str) -> Self {
        Self {
            outcome: Outcome::of_grpc(code),
            status: code as u16,
            grpc: true,
            reason: None,
            message: message.to_owned(),
        }
    }

    pub fn rejected(r: &crate::reject::Rejection) -> Self {
        Self {
            outcome: Outcome::of_rejection(r.reason),
            status: r.reason.http_status().as_u16(),
            grpc: false,
            reason: Some(r.reason),
            message: r.to_string(),
        }
    }
}

/// What one attempt got.
#[derive(Clone, Copy, Debug)]
pub enum Answer {
    Http(u16),
    Grpc(tonic::Code),
    /// No answer: how it failed (`connect_failure`, `timeout`, ...).
    Failed(&'static str),
}

#[derive(Debug)]
struct AttemptRec {
    span_id: SpanId,
    start: Instant,
    start_nanos: u64,
    duration: Duration,
    instance: Box<str>,
    authority: Box<str>,
    answer: Option<Answer>,
}

/// The trace context an attempt carries to the instance: its span's
/// `traceparent`, and the caller's `tracestate` unchanged.
#[derive(Clone, Debug)]
pub struct Propagation {
    pub traceparent: HeaderValue,
    pub tracestate: Option<HeaderValue>,
}

impl Propagation {
    /// Sets both headers (replacing what the request had).
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent);
        if let Some(state) = self.tracestate {
            headers.insert(TRACESTATE, state);
        }
    }
}

/// W3C Trace Context headers.
pub const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");
pub const TRACESTATE: http::HeaderName = http::HeaderName::from_static("tracestate");

/// The event a request carries, for span attributes.
#[derive(Clone, Debug, Default)]
pub struct EventInfo {
    pub id: Option<HeaderValue>,
    pub r#type: Option<HeaderValue>,
    pub source: Option<HeaderValue>,
}

impl EventInfo {
    /// From binary-mode `ce-` headers.
    pub fn of_headers(headers: &HeaderMap) -> Self {
        Self {
            id: headers.get("ce-id").cloned(),
            r#type: headers.get("ce-type").cloned(),
            source: headers.get("ce-source").cloned(),
        }
    }

    /// From an event's attributes.
    pub fn of(id: &str, r#type: &str, source: &str) -> Self {
        let value = |s: &str| HeaderValue::from_str(s).ok();
        Self {
            id: value(id),
            r#type: value(r#type),
            source: value(source),
        }
    }
}

/// A calling service: namespace and name; empty name when unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Source {
    pub namespace: Box<str>,
    pub name: Box<str>,
}

impl Source {
    /// `namespace/name` or `name` (in `default_namespace`): DNS-label
    /// characters, at most 253 bytes; anything else names nobody.
    pub fn parse(value: &[u8], default_namespace: &str) -> Option<Self> {
        if value.is_empty() || value.len() > 253 {
            return None;
        }
        let ok = |s: &[u8]| {
            !s.is_empty()
                && s.iter()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_'))
        };
        let text = std::str::from_utf8(value).ok()?;
        let (ns, name) = text.split_once('/').unwrap_or((default_namespace, text));
        (ok(ns.as_bytes()) && ok(name.as_bytes())).then(|| Self {
            namespace: ns.into(),
            name: name.into(),
        })
    }

    /// `namespace/name`, or "" when unknown (what the outbox keeps).
    pub fn key(&self) -> String {
        if self.name.is_empty() {
            String::new()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }

    fn to_proto(&self) -> pb::ServiceRef {
        pb::ServiceRef {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
        }
    }

    fn label(&self) -> String {
        if self.name.is_empty() {
            "unknown".to_owned()
        } else {
            self.key()
        }
    }
}

/// One request or delivery being traced. Inert when telemetry is off.
#[derive(Debug)]
pub struct Trace {
    on: bool,
    kind: Kind,
    trace_id: TraceId,
    span_id: SpanId,
    parent: Option<SpanId>,
    /// The caller's decision, if it made one.
    parent_sampled: Option<bool>,
    /// The caller's `tracestate`, passed on as it came.
    trace_state: Option<HeaderValue>,
    sampled: bool,
    start: Instant,
    start_nanos: u64,
    source: Source,
    target: Option<Arc<ServiceRoute>>,
    /// (namespace, topic) of a publish or delivery.
    topic: Option<(Box<str>, Box<str>)>,
    event: EventInfo,
    attempts: Vec<AttemptRec>,
    decisions: u8,
}

/// Whether a trace started now is kept, at `rate`.
fn sample(rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && rand::random::<f64>() < rate)
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Trace {
    /// A trace that records nothing (telemetry off).
    pub fn off() -> Self {
        Self {
            on: false,
            kind: Kind::Send,
            trace_id: [0; 16],
            span_id: [0; 8],
            parent: None,
            parent_sampled: None,
            trace_state: None,
            sampled: false,
            start: Instant::now(),
            start_nanos: 0,
            source: Source::default(),
            target: None,
            topic: None,
            event: EventInfo::default(),
            attempts: Vec::new(),
            decisions: 0,
        }
    }

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Sets the service addressed (or subscribing, for a delivery): a
    /// rate in its policy decides the sampling of a trace the agent
    /// starts (else the agent's default did, at the start).
    pub fn target(&mut self, route: &Arc<ServiceRoute>) {
        if !self.on {
            return;
        }
        if let (None, Some(rate)) = (self.parent_sampled, route.tracing.sample_rate) {
            self.sampled = sample(rate);
        }
        self.target = Some(route.clone());
    }

    /// Sets the topic of a publish or delivery.
    pub fn topic(&mut self, namespace: &str, topic: &str) {
        if self.on {
            self.topic = Some((namespace.into(), topic.into()));
        }
    }

    pub fn event(&mut self, event: EventInfo) {
        if self.on {
            self.event = event;
        }
    }

    /// Notes a governance decision.
    pub fn decided(&mut self, d: Decision) {
        self.decisions |= d as u8;
    }

    /// The `traceparent` of this request's own span (what a publish
    /// stores for its deliveries), if on.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        self.on
            .then(|| context::traceparent(&self.trace_id, &self.span_id, self.sampled))
    }

    /// The caller's `tracestate`, if any.
    pub fn tracestate(&self) -> Option<&HeaderValue> {
        self.trace_state.as_ref()
    }

    /// The caller's service, if known.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Starts an attempt at `endpoint`: the trace context it carries.
    pub fn attempt(&mut self, id: &str, authority: &str) -> Option<Propagation> {
        if !self.on {
            return None;
        }
        let span_id = context::new_span_id();
        self.attempts.push(AttemptRec {
            span_id,
            start: Instant::now(),
            start_nanos: now_nanos(),
            duration: Duration::ZERO,
            instance: id.into(),
            authority: authority.into(),
            answer: None,
        });
        Some(Propagation {
            traceparent: context::traceparent(&self.trace_id, &span_id, self.sampled),
            tracestate: self.trace_state.clone(),
        })
    }

    /// Ends the attempt started last.
    pub fn attempted(&mut self, answer: Answer) {
        if let Some(a) = self.attempts.last_mut() {
            a.duration = a.start.elapsed();
            a.answer = Some(answer);
        }
    }
}

/// Spans kept this second, for the cap.
#[derive(Debug, Default)]
struct Cap {
    second: AtomicU64,
    kept: AtomicU64,
}

#[derive(Debug, Default)]
struct Shard {
    edges: Edges,
    spans: Vec<pb::Span>,
}

/// A shard on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(Mutex<Shard>);

/// What a report takes: the spans and edge deltas since the last one.
#[derive(Debug, Default)]
pub struct Drained {
    pub spans: Vec<pb::Span>,
    pub edges: Vec<pb::EdgeDelta>,
    pub spans_dropped: u64,
}

/// The agent's telemetry: see the module docs. Shared by every worker.
#[derive(Debug)]
pub struct Telemetry {
    settings: Settings,
    shards: Box<[Padded]>,
    cap: Cap,
    spans_dropped: AtomicU64,
    dropped_metric: metrics::Counter,
    /// The node's local services, when exactly one: the caller of a
    /// request that names none.
    local: Mutex<Option<Source>>,
    edges_count: Arc<AtomicUsize>,
}

/// Shards: enough that two threads rarely share one.
const SHARDS: usize = 16;

fn shard_index() -> usize {
    thread_local! {
        static INDEX: usize = {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            NEXT.fetch_add(1, Relaxed) % SHARDS
        };
    }
    INDEX.with(|i| *i)
}

impl Telemetry {
    pub fn new(settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            shards: (0..SHARDS).map(|_| Padded::default()).collect(),
            cap: Cap::default(),
            spans_dropped: AtomicU64::new(0),
            dropped_metric: metrics::counter!("weir_agent_spans_dropped_total"),
            local: Mutex::new(None),
            edges_count: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Telemetry that records nothing.
    pub fn off() -> Arc<Self> {
        Self::new(Settings {
            enabled: false,
            ..Settings::default()
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Sets the node's local services (the callers a request without
    /// `weir-source` may come from): one names the caller, more or none
    /// name nobody.
    pub fn set_local_services(&self, services: &[(String, String)]) {
        let one = match services {
            [(ns, name)] => Some(Source {
                namespace: ns.as_str().into(),
                name: name.as_str().into(),
            }),
            _ => None,
        };
        *self.local.lock().unwrap_or_else(|p| p.into_inner()) = one;
    }

    /// Begins the trace of a request with `headers`.
    pub fn begin(&self, kind: Kind, headers: &HeaderMap) -> Trace {
        let parent = context::extract(headers);
        // A tracestate goes with a valid traceparent only (W3C).
        let state = parent
            .as_ref()
            .filter(|_| headers.contains_key(TRACEPARENT))
            .and(headers.get(TRACESTATE))
            .cloned();
        let source = headers
            .get(WEIR_SOURCE)
            .and_then(|v| Source::parse(v.as_bytes(), &self.settings.namespace));
        self.begin_with(kind, parent, state, source)
    }

    /// Begins a trace under `parent` (a delivery: the publish's span),
    /// with the caller's `tracestate`.
    pub fn begin_with(
        &self,
        kind: Kind,
        parent: Option<Parent>,
        trace_state: Option<HeaderValue>,
        source: Option<Source>,
    ) -> Trace {
        if !self.settings.enabled {
            return Trace::off();
        }
        let source = source.unwrap_or_else(|| {
            self.local
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default()
        });
        let (trace_id, parent_id, parent_sampled) = match parent {
            Some(p) => (p.trace_id, Some(p.span_id), Some(p.sampled)),
            None => (context::new_trace_id(), None, None),
        };
        Trace {
            on: true,
            kind,
            trace_id,
            span_id: context::new_span_id(),
            parent: parent_id,
            parent_sampled,
            trace_state,
            sampled: parent_sampled.unwrap_or_else(|| sample(self.settings.sample_rate)),
            start: Instant::now(),
            start_nanos: now_nanos(),
            source,
            target: None,
            topic: None,
            event: EventInfo::default(),
            attempts: Vec::new(),
            decisions: 0,
        }
    }

    /// Ends `trace`: counts it on its edge, keeps its spans if it is to.
    pub fn finish(&self, trace: Trace, ending: &Ending) {
        if !trace.on || (trace.target.is_none() && trace.topic.is_none()) {
            // Telemetry off, or the request named nothing the agent knows
            // (its rejection is counted by reason).
            return;
        }
        let elapsed = trace.start.elapsed();
        let retries = trace.attempts.len().saturating_sub(1) as u64;
        let shard = &self.shards[shard_index()].0;
        {
            let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
            shard.edges.record(
                &self.edges_count,
                edges::Key::of(&trace),
                ending.outcome,
                retries,
                elapsed,
            );
        }
        let slow = trace
            .target
            .as_ref()
            .and_then(|r| r.tracing.slow)
            .unwrap_or(self.settings.slow);
        let kept = if trace.sampled {
            "sampled"
        } else if ending.outcome.is_error() {
            "error"
        } else if elapsed >= slow {
            "slow"
        } else {
            return;
        };
        let spans = 1 + trace.attempts.len() as u64;
        if !self.within_cap(spans) {
            self.dropped(spans);
            return;
        }
        let built = self.spans(&trace, ending, elapsed, kept);
        let mut shard = shard.lock().unwrap_or_else(|p| p.into_inner());
        if shard.spans.len() + built.len() > self.settings.max_buffered_spans / SHARDS {
            drop(shard);
            self.dropped(spans);
            return;
        }
        shard.spans.extend(built);
    }

    fn dropped(&self, n: u64) {
        self.spans_dropped.fetch_add(n, Relaxed);
        self.dropped_metric.increment(n);
    }

    /// Whether `n` more spans fit this second's cap.
    fn within_cap(&self, n: u64) -> bool {
        let second = now_nanos() / 1_000_000_000;
        if self.cap.second.swap(second, Relaxed) != second {
            self.cap.kept.store(0, Relaxed);
        }
        self.cap.kept.fetch_add(n, Relaxed) + n <= u64::from(self.settings.spans_per_second)
    }

    /// Takes what every shard holds.
    pub fn drain(&self) -> Drained {
        let mut out = Drained {
            spans_dropped: self.spans_dropped.swap(0, Relaxed),
            ..Drained::default()
        };
        for shard in self.shards.iter() {
            let mut shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            out.spans.append(&mut shard.spans);
            shard.edges.drain_into(&mut out.edges);
        }
        out
    }

    /// The spans of a finished trace: the request's, then one per attempt.
    fn spans(&self, t: &Trace, ending: &Ending, elapsed: Duration, kept: &str) -> Vec<pb::Span> {
        let target = t.target.as_ref();
        let target_ref = target
            .map(|r| pb::ServiceRef {
                namespace: r.namespace.to_string(),
                name: r.service.to_string(),
            })
            .unwrap_or_default();
        let (topic_ns, topic) = t
            .topic
            .as_ref()
            .map(|(ns, t)| (ns.to_string(), t.to_string()))
            .unwrap_or_default();
        let destination = match t.kind {
            Kind::Send => target_ref.name.clone(),
            Kind::Publish | Kind::Deliver => topic.clone(),
        };
        let (operation, op_type, kind) = match t.kind {
            Kind::Send => ("send", "send", pb::SpanKind::Producer),
            Kind::Publish => ("publish", "send", pb::SpanKind::Producer),
            Kind::Deliver => ("deliver", "process", pb::SpanKind::Consumer),
        };
        let mut attrs = vec![
            string("messaging.system", "weir"),
            string("messaging.operation.type", op_type),
            string("messaging.operation.name", operation),
            string("messaging.destination.name", &destination),
            string("weir.outcome", ending.outcome.as_str()),
            string("weir.source.service", &t.source.label()),
            string("weir.kept", kept),
            int("weir.attempts", t.attempts.len() as i64),
        ];
        if let Some(r) = target {
            attrs.push(string(
                "weir.target.service",
                &format!("{}/{}", r.namespace, r.service),
            ));
        }
        if !topic.is_empty() {
            attrs.push(string("weir.topic", &format!("{topic_ns}/{topic}")));
        }
        for (key, value) in [
            ("cloudevents.event_id", &t.event.id),
            ("cloudevents.event_type", &t.event.r#type),
            ("cloudevents.event_source", &t.event.source),
        ] {
            if let Some(v) = value.as_ref().and_then(|v| v.to_str().ok()) {
                attrs.push(string(key, v));
                if key == "cloudevents.event_id" {
                    attrs.push(string("messaging.message.id", v));
                }
            }
        }
        if ending.grpc {
            attrs.push(int("rpc.grpc.status_code", i64::from(ending.status)));
        } else {
            attrs.push(int("http.response.status_code", i64::from(ending.status)));
        }
        if let Some(reason) = ending.reason {
            attrs.push(string("weir.reason", reason.as_str()));
        }
        let decisions: Vec<String> = Decision::ALL
            .iter()
            .filter(|d| t.decisions & **d as u8 != 0)
            .map(|d| d.as_str().to_owned())
            .collect();
        if !decisions.is_empty() {
            attrs.push(pb::Attribute {
                key: "weir.governance.decisions".into(),
                value: Some(Value::Strings(pb::StringList { values: decisions })),
            });
        }
        let source = t.source.to_proto();
        let node_id = self.settings.node_id.clone();
        let trace_state = t
            .trace_state
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let end = t.start_nanos + u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let mut spans = Vec::with_capacity(1 + t.attempts.len());
        spans.push(pb::Span {
            trace_id: t.trace_id.to_vec(),
            span_id: t.span_id.to_vec(),
            parent_span_id: t.parent.map(|p| p.to_vec()).unwrap_or_default(),
            trace_state: trace_state.clone(),
            name: format!("{operation} {destination}"),
            kind: kind as i32,
            start_unix_nanos: t.start_nanos,
            end_unix_nanos: end,
            error: ending.outcome.is_error(),
            status_message: if ending.outcome.is_error() {
                ending.message.clone()
            } else {
                String::new()
            },
            attributes: attrs,
            source: Some(source.clone()),
            target: Some(target_ref.clone()),
            topic: topic.clone(),
            node_id: node_id.clone(),
        });
        for (n, a) in t.attempts.iter().enumerate() {
            let (host, port) = a.authority.rsplit_once(':').unwrap_or((&a.authority, ""));
            let mut attrs = vec![
                string("messaging.system", "weir"),
                string("messaging.operation.type", "send"),
                string("messaging.operation.name", "send"),
                string("messaging.destination.name", &target_ref.name),
                int("weir.attempt", n as i64 + 1),
                string("weir.instance.id", &a.instance),
                string("server.address", host),
            ];
            if let Ok(port) = port.parse::<i64>() {
                attrs.push(int("server.port", port));
            }
            let (error, outcome) = match a.answer {
                Some(Answer::Http(s)) => {
                    attrs.push(int("http.response.status_code", i64::from(s)));
                    let o = Outcome::of_status(s);
                    (o.is_error().then(|| s.to_string()), o)
                }
                Some(Answer::Grpc(c)) => {
                    attrs.push(int("rpc.grpc.status_code", c as i64));
                    let o = Outcome::of_grpc(c);
                    (o.is_error().then(|| format!("{c:?}")), o)
                }
                Some(Answer::Failed(how)) => (Some(how.to_owned()), Outcome::ServerError),
                // Cut off before it ended (the caller went away).
                None => (Some("cancelled".to_owned()), Outcome::ServerError),
            };
            attrs.push(string("weir.outcome", outcome.as_str()));
            if let Some(e) = &error {
                attrs.push(string("error.type", e));
            }
            let start = a.start_nanos;
            spans.push(pb::Span {
                trace_id: t.trace_id.to_vec(),
                span_id: a.span_id.to_vec(),
                parent_span_id: t.span_id.to_vec(),
                trace_state: trace_state.clone(),
                name: format!("send {}", target_ref.name),
                kind: pb::SpanKind::Client as i32,
                start_unix_nanos: start,
                end_unix_nanos: start + u64::try_from(a.duration.as_nanos()).unwrap_or(0),
                error: error.is_some(),
                status_message: error.unwrap_or_default(),
                attributes: attrs,
                source: Some(source.clone()),
                target: Some(target_ref.clone()),
                topic: topic.clone(),
                node_id: node_id.clone(),
            });
        }
        spans
    }
}

fn string(key: &str, value: &str) -> pb::Attribute {
    pb::Attribute {
        key: key.to_owned(),
        value: Some(Value::StringValue(value.to_owned())),
    }
}

fn int(key: &str, value: i64) -> pb::Attribute {
    pb::Attribute {
        key: key.to_owned(),
        value: Some(Value::IntValue(value)),
    }
}

#[cfg(test)]
mod tests {
    use weir_client::policy::TrafficPolicy;

    use super::*;

    fn telemetry(sample_rate: f64, spans_per_second: u32) -> Arc<Telemetry> {
        Telemetry::new(Settings {
            sample_rate,
            spans_per_second,
            node_id: "n1".into(),
            ..Settings::default()
        })
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        crate::ingress::test_headers(pairs)
    }

    /// A request to `orders` from `shop/web`, one attempt answering `status`.
    fn request(t: &Telemetry, h: &HeaderMap, status: u16) {
        let route = crate::view::test_route(&[("a", 0)], TrafficPolicy::default());
        let mut trace = t.begin(Kind::Send, h);
        trace.target(&route);
        trace.event(EventInfo::of_headers(h));
        let tp = trace.attempt("a", "127.0.0.1:9");
        assert!(tp.is_some());
        trace.attempted(Answer::Http(status));
        t.finish(trace, &Ending::status(status));
    }

    #[test]
    fn edges_count_everything_and_spans_keep_the_sampled_and_the_failed() {
        let t = telemetry(0.0, 1_000);
        let h = headers(&[("weir-source", "shop/web"), ("ce-id", "e1")]);
        for _ in 0..3 {
            request(&t, &h, 200);
        }
        request(&t, &h, 503);
        let d = t.drain();
        assert_eq!(d.edges.len(), 1);
        let edge = &d.edges[0];
        let e = edge.edge.as_ref().expect("edge");
        assert_eq!(e.source.as_ref().map(|s| s.name.as_str()), Some("web"));
        assert_eq!(e.target.as_ref().map(|s| s.name.as_str()), Some("orders"));
        let o = edge.outcomes.expect("outcomes");
        assert_eq!((o.ok, o.server_error), (3, 1));
        let sketch = weir_core::sketch::Sketch::from_proto(edge.latency.as_ref().expect("latency"))
            .expect("valid");
        assert_eq!(sketch.count(), 4);
        // Rate 0: only the failed request's spans, itself and its attempt.
        assert_eq!(d.spans.len(), 2);
        let (root, attempt) = (&d.spans[0], &d.spans[1]);
        assert!(root.error && root.parent_span_id.is_empty());
        assert_eq!(attempt.parent_span_id, root.span_id);
        assert_eq!(attempt.trace_id, root.trace_id);
        assert_eq!(root.name, "send orders");
        let attr = |s: &pb::Span, k: &str| {
            s.attributes
                .iter()
                .find(|a| a.key == k)
                .and_then(|a| a.value.clone())
        };
        assert_eq!(
            attr(root, "cloudevents.event_id"),
            Some(Value::StringValue("e1".into()))
        );
        assert_eq!(
            attr(root, "weir.kept"),
            Some(Value::StringValue("error".into()))
        );
        assert_eq!(
            attr(attempt, "http.response.status_code"),
            Some(Value::IntValue(503))
        );
        // Drained: nothing is left.
        let d = t.drain();
        assert!(d.edges.is_empty() && d.spans.is_empty());
    }

    #[test]
    fn a_callers_context_is_followed_and_the_cap_drops_with_a_count() {
        let t = telemetry(0.0, 3);
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        request(&t, &h, 200);
        request(&t, &h, 200);
        let d = t.drain();
        // Sampled by the caller: kept, within the cap of 3 spans a second
        // (the second request's 2 spans did not fit, unless the second
        // turned between the two).
        assert!(
            d.spans.len() == 2 || d.spans.len() == 4,
            "{}",
            d.spans.len()
        );
        assert_eq!(d.spans.len() as u64 + d.spans_dropped, 4);
        let root = &d.spans[0];
        assert_eq!(
            context::hex(&root.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context::hex(&root.parent_span_id), "00f067aa0ba902b7");
        // Unknown caller: the edge's source is empty.
        let source = d.edges[0].edge.as_ref().and_then(|e| e.source.clone());
        assert_eq!(source.map(|s| s.name), Some(String::new()));
    }

    #[test]
    fn a_single_local_service_names_callers_that_do_not() {
        let t = telemetry(1.0, 1_000);
        t.set_local_services(&[("shop".into(), "web".into())]);
        let trace = t.begin(Kind::Send, &HeaderMap::new());
        assert_eq!(&*trace.source().name, "web");
        t.set_local_services(&[
            ("shop".into(), "web".into()),
            ("shop".into(), "cart".into()),
        ]);
        let trace = t.begin(Kind::Send, &HeaderMap::new());
        assert!(trace.source().name.is_empty());
        assert_eq!(
            Source::parse(b"billing", "shop"),
            Some(Source {
                namespace: "shop".into(),
                name: "billing".into()
            })
        );
        assert_eq!(Source::parse(b"a b", "shop"), None);
        assert!(!Telemetry::off()
            .begin(Kind::Send, &HeaderMap::new())
            .is_on());
    }

    #[test]
    fn tracestate_travels_only_with_a_traceparent() {
        let t = telemetry(1.0, 1_000);
        let alone = t.begin(Kind::Send, &headers(&[("tracestate", "v=1")]));
        assert!(alone.tracestate().is_none());
        let mut with = t.begin(
            Kind::Send,
            &headers(&[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("tracestate", "v=1"),
            ]),
        );
        let p = with.attempt("a", "127.0.0.1:1").expect("on");
        assert_eq!(
            p.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"v=1"[..])
        );
        let mut h = HeaderMap::new();
        p.apply(&mut h);
        assert!(h
            .get("traceparent")
            .is_some_and(|v| v.as_bytes().starts_with(b"00-4bf92f35")));
        assert_eq!(h.get("tracestate").map(|v| v.as_bytes()), Some(&b"v=1"[..]));
    }
}
