//! The event ingress: one listener speaking HTTP/1.1 and h2c, a reverse
//! proxy to the instances of the service each request names.
//!
//! A request is routed ([`target`]), checked when it is a CloudEvent
//! ([`cloudevents`]), balanced over the service's usable endpoints and
//! forwarded ([`forward`]). The balancer is the service's default one,
//! unless its policy has rules with balancers of their own: then an
//! event's `type` and `source` pick it ([`ServiceRoute::balancer_for`]); the instance's answer streams back unchanged
//! (gRPC trailers included). Whatever the agent answers itself is a
//! [`Rejection`](crate::reject::Rejection). Calls to the agent's own
//! `weir.events.v1.Publisher` are served on the same port ([`publisher`]);
//! its `Send` reaches gRPC instances through their `Subscriber/Deliver`
//! ([`deliver`]).

pub(crate) mod attempts;
pub mod cloudevents;
pub mod deliver;
pub mod forward;
pub mod h1;
pub mod publisher;
pub mod target;
mod workers;

pub use workers::Workers;

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use tokio::net::TcpListener;
use tonic::codegen::Service as _;

use crate::{
    balance::{key_hash, Endpoint, Picker},
    body::Body,
    outbox::store::Origin,
    reject::{Reason, Rejection},
    retry::{answer_class, Class},
    telemetry::{self, Ending, EventInfo, Kind, Telemetry, Trace},
    view::{Handling, Routes, ServiceRoute},
};

/// The trace context a publish stores for its deliveries: its own span's
/// `traceparent` when telemetry is on, else the caller's as it came; and
/// the caller's `tracestate`.
pub(crate) fn published_context(trace: &Trace, headers: &HeaderMap) -> (String, String) {
    let text = |v: Option<&HeaderValue>| {
        v.and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let parent = trace
        .traceparent()
        .or_else(|| headers.get(telemetry::TRACEPARENT).cloned());
    let state = trace
        .tracestate()
        .or_else(|| headers.get(telemetry::TRACESTATE));
    (text(parent.as_ref()), text(state))
}

/// The span attributes of a parsed event.
fn event_info(event: &serde_json::Map<String, serde_json::Value>) -> EventInfo {
    let text = |k: &str| event.get(k).and_then(|v| v.as_str()).unwrap_or_default();
    EventInfo::of(text("id"), text("type"), text("source"))
}

use attempts::{Exchange, Plan};
use cloudevents::Mode;
use forward::{Failed, Upstreams};
use target::Target;

/// The most of a request body that is not a CloudEvent the agent holds to
/// send it again; a longer one streams through and is not retried.
pub const RETRY_BUFFER_BYTES: usize = 64 * 1024;

/// What every request handler shares.
#[derive(Debug)]
pub struct Ingress {
    pub routes: Arc<Routes>,
    pub upstreams: Upstreams,
    pub default_namespace: String,
    pub max_event_bytes: usize,
    /// Requests this worker is handling.
    pub in_flight: Arc<WorkerInFlight>,
    /// Publishing to topics (`/v1/topics/{topic}`), when set.
    pub topics: Option<Arc<crate::outbox::topics::Topics>>,
    /// Spans and edge counts (off unless set).
    pub telemetry: Arc<Telemetry>,
    rejections: [metrics::Counter; Reason::ALL.len()],
}

/// A header map of static pairs, for tests.
#[cfg(test)]
pub(crate) fn test_headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    pairs
        .iter()
        .map(|(k, v)| {
            (
                http::HeaderName::from_static(k),
                HeaderValue::from_static(v),
            )
        })
        .collect()
}

/// Paths of publishes to a topic start with this.
pub const TOPICS_PREFIX: &str = "/v1/topics/";

/// Requests in flight on one ingress worker, on a cache line of its own:
/// workers on different cores never write the same line per request.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerInFlight(AtomicUsize);

impl WorkerInFlight {
    /// Counts one request until the guard drops (also when the caller
    /// goes away mid-request and the future is dropped).
    pub fn enter(&self) -> Entered<'_> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Entered(self)
    }
}

/// One request counted in a [`WorkerInFlight`].
#[derive(Debug)]
pub struct Entered<'a>(&'a WorkerInFlight);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The agent's requests in flight: the sum over its workers.
#[derive(Debug, Clone, Default)]
pub struct InFlightTotal(Arc<std::sync::Mutex<Vec<Arc<WorkerInFlight>>>>);

impl InFlightTotal {
    /// A counter for one more worker.
    pub fn worker(&self) -> Arc<WorkerInFlight> {
        let counter = Arc::new(WorkerInFlight::default());
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(counter.clone());
        counter
    }

    pub fn get(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| c.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Counts a request in flight on an endpoint (and the agent) while alive.
struct InFlight<'a>(&'a Endpoint);

impl<'a> InFlight<'a> {
    fn new(e: &'a Endpoint) -> Self {
        e.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(e)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

impl Ingress {
    /// One worker's ingress: `routes` is shared by all; `in_flight` is
    /// this worker's.
    pub fn new(
        routes: Arc<Routes>,
        default_namespace: String,
        max_event_bytes: usize,
        in_flight: Arc<WorkerInFlight>,
    ) -> Self {
        Self {
            routes,
            upstreams: Upstreams::new(),
            default_namespace,
            max_event_bytes,
            in_flight,
            topics: None,
            telemetry: Telemetry::off(),
            rejections: Reason::ALL
                .map(|r| metrics::counter!("weir_agent_rejections_total", "reason" => r.as_str())),
        }
    }

    /// The same ingress, with `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// The same ingress, publishing to `topics`.
    pub fn with_topics(mut self, topics: Arc<crate::outbox::topics::Topics>) -> Self {
        self.topics = Some(topics);
        self
    }

    /// Counts a rejection in `weir_agent_rejections_total`.
    fn count(&self, r: &Rejection) {
        if let Some(i) = Reason::ALL.iter().position(|x| *x == r.reason) {
            self.rejections[i].increment(1);
        }
    }

    fn rejected(&self, r: Rejection, grpc: bool) -> Response<Body> {
        self.count(&r);
        r.into_response(grpc)
    }

    /// Handles one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let grpc = is_grpc(request.headers());
        let _entered = self.in_flight.enter();
        let publish = request.uri().path().starts_with(TOPICS_PREFIX);
        let kind = if publish { Kind::Publish } else { Kind::Send };
        let mut trace = self.telemetry.begin(kind, request.headers());
        let result = if publish {
            self.publish(request, &mut trace).await
        } else {
            self.route_and_send(request, grpc, &mut trace).await
        };
        if trace.is_on() {
            let ending = match &result {
                Ok(r) => Ending::status(r.status().as_u16()),
                Err(r) => Ending::rejected(r),
            };
            self.telemetry.finish(trace, &ending);
        }
        match result {
            Ok(r) => r,
            Err(r) => self.rejected(r, grpc),
        }
    }

    fn route(&self, target: &Target<'_>) -> Result<Arc<ServiceRoute>, Rejection> {
        self.routes
            .get(target.namespace, target.service)
            .ok_or_else(|| {
                Rejection::new(
                    Reason::UnknownService,
                    format!(
                        "no service {}/{} in the registry",
                        target.namespace, target.service
                    ),
                )
            })
    }

    async fn route_and_send(
        &self,
        request: Request<Incoming>,
        grpc: bool,
        trace: &mut Trace,
    ) -> Result<Response<Body>, Rejection> {
        let (route, rewrite) = {
            let target =
                target::resolve(request.uri(), request.headers(), &self.default_namespace)?;
            (self.route(&target)?, target.rewrite)
        };
        trace.target(&route);
        let mode = cloudevents::mode(request.headers());
        if trace.is_on() && mode == Mode::Binary {
            trace.event(EventInfo::of_headers(request.headers()));
        }
        match mode {
            Mode::Plain => {}
            Mode::Binary => cloudevents::check_binary(request.headers())?,
            Mode::Structured => {
                let (parts, body) = request.into_parts();
                let body = self.read_whole(body).await?;
                let event = cloudevents::parse_structured(&body)?;
                if trace.is_on() {
                    trace.event(event_info(&event));
                }
                let handling = event_handling(&route, &event);
                let key = key_of(handling.picker, &parts.headers, Some(&event));
                let request = Request::from_parts(parts, Body::full(body));
                let plan = Plan {
                    route: &route,
                    handling,
                    key,
                    safe: true,
                    topic: None,
                };
                return self.send(plan, request, rewrite, grpc, trace).await;
            }
            Mode::Batch => {
                let (parts, body) = request.into_parts();
                let body = self.read_whole(body).await?;
                let events = cloudevents::parse_batch(&body)?;
                return Ok(self.send_batch(&route, parts, rewrite, events, trace).await);
            }
        }
        let handling = header_handling(&route, mode, request.headers());
        let key = key_of(handling.picker, request.headers(), None);
        // A CloudEvent's id makes a second delivery safe for a subscriber
        // that deduplicates; otherwise only the method or an
        // Idempotency-Key (draft-ietf-httpapi-idempotency-key-header) can.
        let safe = mode == Mode::Binary
            || request.method().is_idempotent()
            || request.headers().contains_key("idempotency-key");
        let (parts, body) = request.into_parts();
        let plan = Plan {
            route: &route,
            handling,
            key,
            safe,
            topic: None,
        };
        self.send(
            plan,
            Request::from_parts(parts, Body::Stream(body)),
            rewrite,
            grpc,
            trace,
        )
        .await
    }

    /// Sends `request` as `plan` says: attempts, retries and deadlines
    /// ([`attempts`]). When retries apply, the body is held for them first
    /// ([`Ingress::hold`]).
    async fn send(
        &self,
        plan: Plan<'_>,
        request: Request<Body>,
        rewrite: Option<http::uri::PathAndQuery>,
        grpc: bool,
        trace: &mut Trace,
    ) -> Result<Response<Body>, Rejection> {
        let (request, again) = if plan.handling.failure.attempts() > 1 {
            let bound = if cloudevents::mode(request.headers()) == Mode::Plain {
                RETRY_BUFFER_BYTES
            } else {
                self.max_event_bytes
            };
            hold(request, bound).await?
        } else {
            (request, None)
        };
        let mut exchange = Forward {
            upstreams: &self.upstreams,
            first: Some(request),
            again,
            rewrite,
            grpc,
        };
        attempts::run(plan, &mut exchange, trace).await
    }

    /// `POST /v1/topics/{topic}`: the event (binary or structured mode) is
    /// accepted into the outbox for the topic's subscribers, answered 202
    /// with its id; a batch is answered 207, one `{id, status, reason}`
    /// per event.
    async fn publish(
        &self,
        request: Request<Incoming>,
        trace: &mut Trace,
    ) -> Result<Response<Body>, Rejection> {
        use crate::outbox::event;
        let topics = self.topics.as_ref().ok_or_else(|| {
            Rejection::new(
                Reason::OutboxUnavailable,
                "topic publishing is not configured",
            )
        })?;
        let topic = request
            .uri()
            .path()
            .strip_prefix(TOPICS_PREFIX)
            .unwrap_or_default()
            .to_owned();
        let headers = request.headers();
        let namespace = headers
            .get(target::WEIR_NAMESPACE)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .unwrap_or(&self.default_namespace)
            .to_owned();
        trace.topic(&namespace, &topic);
        let (traceparent, tracestate) = published_context(trace, headers);
        let publisher = trace.source().key();
        let origin = Origin {
            traceparent: &traceparent,
            tracestate: &tracestate,
            publisher: &publisher,
        };
        let mode = cloudevents::mode(headers);
        if mode == Mode::Plain {
            return Err(Rejection::new(
                Reason::BadEvent,
                "a topic takes a CloudEvent: binary mode (ce- headers), structured or batch",
            ));
        }
        let (parts, body) = request.into_parts();
        let body = self.read_whole(body).await?;
        let answer = |status: StatusCode, json: Vec<u8>| {
            let mut response = Response::new(Body::full(json));
            *response.status_mut() = status;
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            response
        };
        let one = match mode {
            Mode::Binary => Some(event::from_binary(&parts.headers, body.clone())?),
            Mode::Structured => Some(event::from_structured(&cloudevents::parse_structured(
                &body,
            )?)?),
            _ => None,
        };
        if let Some(e) = one {
            if trace.is_on() {
                trace.event(EventInfo::of(&e.id, &e.r#type, &e.source));
            }
            let published = topics.publish(&namespace, &topic, e, origin).await?;
            let json = serde_json::to_vec(&published).unwrap_or_default();
            return Ok(answer(StatusCode::ACCEPTED, json));
        }
        // All at once: the outbox takes them in batch order (each takes
        // its sequence number before its first wait) and commits them
        // together, one fsync for the batch rather than one per event.
        let entries = cloudevents::parse_batch(&body)?;
        let outcomes = futures_util::future::join_all(entries.into_iter().map(|(id, entry)| {
            let (namespace, topic) = (&namespace, &topic);
            async move {
                let outcome = match entry.and_then(|map| event::from_structured(&map)) {
                    Ok(e) => topics.publish(namespace, topic, e, origin).await,
                    Err(r) => Err(r),
                };
                (id, outcome)
            }
        }))
        .await;
        let mut results = Vec::with_capacity(outcomes.len());
        for (id, outcome) in outcomes {
            results.push(match outcome {
                Ok(p) => serde_json::json!({"id": id, "status": 202, "reason": "", "subscribers": p.subscribers}),
                Err(r) => {
                    self.count(&r);
                    serde_json::json!({"id": id, "status": r.reason.http_status().as_u16(), "reason": r.to_string()})
                }
            });
        }
        Ok(answer(
            StatusCode::MULTI_STATUS,
            serde_json::to_vec(&results).unwrap_or_default(),
        ))
    }

    async fn read_whole(&self, body: Incoming) -> Result<Bytes, Rejection> {
        match Limited::new(body, self.max_event_bytes).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Rejection::new(
                Reason::TooLarge,
                format!("the body is larger than {} bytes", self.max_event_bytes),
            )),
            Err(e) => Err(Rejection::new(
                Reason::BadEvent,
                format!("the body could not be read: {e}"),
            )),
        }
    }

    /// Sends each event of a batch on its own, as a structured event
    /// balanced by its own `type` and `source`, and answers 207 with one
    /// `{id, status, reason}` per event, in order.
    async fn send_batch(
        &self,
        route: &ServiceRoute,
        parts: http::request::Parts,
        rewrite: Option<http::uri::PathAndQuery>,
        events: Vec<cloudevents::BatchEntry>,
        trace: &mut Trace,
    ) -> Response<Body> {
        let mut results = Vec::with_capacity(events.len());
        for (id, event) in events {
            let outcome = match event {
                Err(r) => Err(r),
                Ok(event) => {
                    let handling = event_handling(route, &event);
                    let key = key_of(handling.picker, &parts.headers, Some(&event));
                    let bytes = serde_json::to_vec(&event).unwrap_or_default();
                    let mut request = Request::new(Body::full(bytes));
                    *request.method_mut() = parts.method.clone();
                    *request.uri_mut() = parts.uri.clone();
                    *request.headers_mut() = parts.headers.clone();
                    request.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/cloudevents+json; charset=utf-8"),
                    );
                    request.headers_mut().remove(header::CONTENT_LENGTH);
                    let plan = Plan {
                        route,
                        handling,
                        key,
                        safe: true,
                        topic: None,
                    };
                    self.send(plan, request, rewrite.clone(), false, trace)
                        .await
                }
            };
            let (status, reason) = match outcome {
                Ok(response) => {
                    let status = response.status();
                    // Drain the instance's answer so the connection is reused.
                    let _ = response.into_body().collect().await;
                    let reason = if status.is_success() {
                        String::new()
                    } else {
                        format!("the instance answered {status}")
                    };
                    (status.as_u16(), reason)
                }
                Err(r) => {
                    if let Some(i) = Reason::ALL.iter().position(|x| *x == r.reason) {
                        self.rejections[i].increment(1);
                    }
                    (r.reason.http_status().as_u16(), r.to_string())
                }
            };
            results.push(serde_json::json!({"id": id, "status": status, "reason": reason}));
        }
        let body = serde_json::to_vec(&results).unwrap_or_default();
        let mut response = Response::new(Body::full(body));
        *response.status_mut() = StatusCode::MULTI_STATUS;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

/// The balancer and failure handling for a request whose event, if any,
/// is in its headers: a binary-mode event's `ce-type` and `ce-source`
/// choose when the route has rules; a request that is not a CloudEvent
/// gets the defaults. Without rules this reads no header.
fn header_handling<'r>(
    route: &'r ServiceRoute,
    mode: Mode,
    headers: &http::HeaderMap,
) -> Handling<'r> {
    match mode {
        Mode::Binary if route.has_rules() => {
            let (event_type, source) = cloudevents::binary_type_and_source(headers);
            route.handling_for(&event_type, &source)
        }
        _ => route.default_handling(),
    }
}

/// The balancer and failure handling for a parsed (structured or batch)
/// event.
fn event_handling<'r>(
    route: &'r ServiceRoute,
    event: &serde_json::Map<String, serde_json::Value>,
) -> Handling<'r> {
    if !route.has_rules() {
        return route.default_handling();
    }
    let (event_type, source) = cloudevents::type_and_source(event);
    route.handling_for(event_type, source)
}

/// A request again, for a retry: its head and its body in hand.
#[derive(Debug)]
struct Again {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl Again {
    fn of(parts: &http::request::Parts, body: Bytes) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: parts.headers.clone(),
            body,
        }
    }

    fn request(&self) -> Request<Body> {
        let mut request = Request::new(Body::full(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Keeps what a retry needs of `request`: its body when it is in hand
/// already, or when the whole of it is there to read: a declared length
/// of at most `bound` is read whole; a body of unknown length is read as
/// far as it has arrived (never waiting for more), and kept when its end
/// came within `bound`. Otherwise the request goes as it is, with what was
/// read of it, and is not retried (but for connect failures: it was never
/// sent).
async fn hold(
    request: Request<Body>,
    bound: usize,
) -> Result<(Request<Body>, Option<Again>), Rejection> {
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok()?.parse::<u64>().ok());
    let (body, kept) = match body {
        Body::Full(Some(bytes)) => (Body::full(bytes.clone()), Some(bytes)),
        Body::Full(None) | Body::Empty => (Body::Empty, Some(Bytes::new())),
        Body::Stream(incoming) if declared.is_some_and(|n| n <= bound as u64) => {
            match Limited::new(incoming, bound).collect().await {
                Ok(collected) => {
                    let bytes = collected.to_bytes();
                    (Body::full(bytes.clone()), Some(bytes))
                }
                Err(e) => {
                    return Err(Rejection::new(
                        Reason::BadEvent,
                        format!("the body could not be read: {e}"),
                    ))
                }
            }
        }
        Body::Stream(incoming) if declared.is_none() => read_arrived(incoming, bound)?,
        other => (other, None),
    };
    let again = kept.map(|bytes| Again::of(&parts, bytes));
    Ok((Request::from_parts(parts, body), again))
}

/// Reads what has arrived of `body`, up to `bound` bytes: the whole body
/// if it ended (also kept), else a body that carries on from there.
fn read_arrived(mut body: Incoming, bound: usize) -> Result<(Body, Option<Bytes>), Rejection> {
    use http_body::Body as _;
    use std::{
        pin::Pin,
        task::{Context, Poll, Waker},
    };
    let mut cx = Context::from_waker(Waker::noop());
    let mut first: Option<Bytes> = None;
    let mut more = BytesMut::new();
    let mut len = 0usize;
    let read = |first: Option<Bytes>, more: BytesMut| match first {
        None => None,
        Some(f) if more.is_empty() => Some(f),
        Some(f) => {
            let mut all = BytesMut::with_capacity(f.len() + more.len());
            all.extend_from_slice(&f);
            all.extend_from_slice(&more);
            Some(all.freeze())
        }
    };
    loop {
        if body.is_end_stream() {
            let bytes = read(first, more).unwrap_or_default();
            return Ok((Body::full(bytes.clone()), Some(bytes)));
        }
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    if first.is_none() {
                        first = Some(data);
                    } else {
                        more.extend_from_slice(&data);
                    }
                    if len > bound {
                        let body = Body::Resumed {
                            read: read(first, more),
                            trailers: None,
                            rest: Some(body),
                        };
                        return Ok((body, None));
                    }
                }
                Err(frame) => {
                    // Trailers end the body; they travel, without a retry.
                    let body = Body::Resumed {
                        read: read(first, more),
                        trailers: frame.into_trailers().ok(),
                        rest: None,
                    };
                    return Ok((body, None));
                }
            },
            Poll::Ready(Some(Err(e))) => {
                return Err(Rejection::new(
                    Reason::BadEvent,
                    format!("the body could not be read: {e}"),
                ))
            }
            Poll::Ready(None) => {
                let bytes = read(first, more).unwrap_or_default();
                return Ok((Body::full(bytes.clone()), Some(bytes)));
            }
            Poll::Pending => {
                let body = Body::Resumed {
                    read: read(first, more),
                    trailers: None,
                    rest: Some(body),
                };
                return Ok((body, None));
            }
        }
    }
}

/// A proxied request, as the attempt loop sends it.
struct Forward<'a> {
    upstreams: &'a Upstreams,
    /// The request as it came, for the first attempt.
    first: Option<Request<Body>>,
    /// The request again, when retries are possible.
    again: Option<Again>,
    rewrite: Option<http::uri::PathAndQuery>,
    grpc: bool,
}

impl Exchange for Forward<'_> {
    type Answer = Response<Body>;

    fn judge(&self, answer: &Response<Body>) -> Option<Class> {
        answer_class(answer.status(), answer.headers())
    }

    fn replayable(&self) -> bool {
        self.again.is_some()
    }

    fn answered(&self, answer: &Response<Body>) -> telemetry::Answer {
        telemetry::Answer::Http(answer.status().as_u16())
    }

    fn attempt(
        &mut self,
        endpoint: &Endpoint,
        trace: Option<telemetry::Propagation>,
    ) -> impl std::future::Future<Output = Result<Response<Body>, Failed>> + Send {
        let mut request = self
            .first
            .take()
            .or_else(|| self.again.as_ref().map(Again::request));
        if let (Some(r), Some(t)) = (request.as_mut(), trace) {
            t.apply(r.headers_mut());
        }
        let upstreams = self.upstreams;
        let rewrite = self.rewrite.clone();
        let grpc = self.grpc;
        async move {
            let request = request.ok_or_else(|| {
                Rejection::new(
                    Reason::UpstreamUnavailable,
                    "the request's body was not kept; it cannot be sent again",
                )
            })?;
            upstreams.send(endpoint, request, rewrite, grpc).await
        }
    }
}

/// The hash of a request's consistent-hash key when `picker` hashes one
/// (else `None` at once, reading nothing): a header, or the CloudEvents
/// `subject` or `partitionkey`, read from `event` when the event was
/// parsed (structured and batch modes) and from the `ce-` headers
/// otherwise (binary mode). A request without the key gets `None`, and
/// the consistent hash sends it round robin.
fn key_of(
    picker: &Picker,
    headers: &http::HeaderMap,
    event: Option<&serde_json::Map<String, serde_json::Value>>,
) -> Option<u64> {
    use weir_core::policy::resolve::HashKey;
    let attribute = |name: &str, header: &str| match event {
        Some(e) => match e.get(name)? {
            serde_json::Value::String(s) => Some(key_hash(s.as_bytes())),
            serde_json::Value::Null => None,
            other => Some(key_hash(other.to_string().as_bytes())),
        },
        None => Some(key_hash(headers.get(header)?.as_bytes())),
    };
    match picker.hash_key()? {
        HashKey::Header(name) => Some(key_hash(headers.get(name.as_str())?.as_bytes())),
        HashKey::Subject => attribute("subject", "ce-subject"),
        HashKey::PartitionKey => attribute("partitionkey", "ce-partitionkey"),
    }
}

/// Serves the ingress on `listener` until `shutdown` resolves, then stops
/// accepting and lets requests in flight finish for up to `drain`.
pub async fn serve(
    listener: TcpListener,
    ingress: Arc<Ingress>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    // This worker's Publisher; a call is the only request that uses it.
    let publisher = publisher::server(ingress.clone());
    tokio::pin!(shutdown);
    loop {
        let (stream, peer): (_, SocketAddr) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let ingress = ingress.clone();
        let publisher = publisher.clone();
        let service = service_fn(move |request: Request<Incoming>| {
            let ingress = ingress.clone();
            let call = publisher::is_call(&request).then(|| publisher.clone());
            async move {
                let response = match call {
                    None => ingress.handle(request).await.map(Either::Left),
                    // The generated server is always ready: no poll_ready.
                    Some(mut publisher) => match publisher.call(request).await {
                        Ok(r) => r.map(Either::Right),
                        Err(never) => match never {},
                    },
                };
                Ok::<_, Infallible>(response)
            }
        });
        let connection = builder.serve_connection(TokioIo::new(stream), service);
        let connection = graceful.watch(connection.into_owned());
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "ingress connection ended");
            }
        });
    }
    drop(listener);
    tracing::info!(
        in_flight = ingress.in_flight.0.load(Ordering::Relaxed),
        "ingress draining"
    );
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?drain,
            "ingress drain bound reached; closing the remaining connections"
        );
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use weir_client::policy::{
        load_balancer::Algorithm, EventMatch, LoadBalancer, Rule, TrafficPolicy,
    };

    use super::*;

    /// `orders` with instances a, b, c (weights 1, 1, 4), round robin by
    /// default and weighted for events of type `com.example.heavy.*`.
    fn route() -> Arc<ServiceRoute> {
        let policy = TrafficPolicy {
            rules: vec![Rule {
                name: "heavy".into(),
                r#match: Some(EventMatch {
                    type_prefix: "com.example.heavy.".into(),
                    ..EventMatch::default()
                }),
                load_balancer: Some(LoadBalancer {
                    algorithm: Algorithm::WeightedRoundRobin as i32,
                    ..LoadBalancer::default()
                }),
                ..Rule::default()
            }],
            ..TrafficPolicy::default()
        };
        crate::view::test_route(&[("a", 1), ("b", 1), ("c", 4)], policy)
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        crate::ingress::test_headers(pairs)
    }

    #[test]
    fn binary_events_choose_by_headers_and_other_requests_get_the_default() {
        let route = route();
        let heavy = route.balancer_for("com.example.heavy.x", "/s");
        assert!(
            !std::ptr::eq(heavy, &route.balancer),
            "the rule has its own"
        );
        let event = headers(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "1"),
            ("ce-source", "/s"),
            ("ce-type", "com.example.heavy.resize"),
        ]);
        let mode = cloudevents::mode(&event);
        assert_eq!(mode, Mode::Binary);
        assert!(std::ptr::eq(
            header_handling(&route, mode, &event).picker,
            heavy
        ));
        let light = headers(&[("ce-specversion", "1.0"), ("ce-type", "com.example.light")]);
        assert!(std::ptr::eq(
            header_handling(&route, Mode::Binary, &light).picker,
            &route.balancer
        ));
        // Not a CloudEvent (no ce-specversion): the default, whatever
        // other headers say.
        let plain = headers(&[("ce-type", "com.example.heavy.resize")]);
        let mode = cloudevents::mode(&plain);
        assert_eq!(mode, Mode::Plain);
        assert!(std::ptr::eq(
            header_handling(&route, mode, &plain).picker,
            &route.balancer
        ));
    }

    #[test]
    fn structured_and_batch_events_choose_each_by_their_own_type() {
        let route = route();
        let heavy = route.balancer_for("com.example.heavy.x", "/s");
        let events = cloudevents::parse_batch(
            br#"[{"specversion":"1.0","id":"1","source":"/s","type":"com.example.heavy.a"},
                 {"specversion":"1.0","id":"2","source":"/s","type":"com.example.light"}]"#,
        )
        .expect("a batch");
        let chosen: Vec<bool> = events
            .iter()
            .map(|(_, e)| {
                std::ptr::eq(
                    event_handling(&route, e.as_ref().expect("good")).picker,
                    heavy,
                )
            })
            .collect();
        assert_eq!(chosen, [true, false]);
        let one = cloudevents::parse_structured(
            br#"{"specversion":"1.0","id":"1","source":"/s","type":"com.example.heavy.a"}"#,
        )
        .expect("good");
        assert!(std::ptr::eq(event_handling(&route, &one).picker, heavy));
    }
}
