//! `weir.events.v1.Publisher` on the ingress port: a gRPC call whose path
//! starts with `/weir.events.v1.Publisher/` is the agent's own, not routed
//! by `:authority`.
//!
//! `Send` carries a `io.cloudevents.v1.CloudEvent` to one instance of a
//! service, balanced as any request through the agent: to an HTTP
//! instance as a binary-mode CloudEvents HTTP request
//! ([`binary_request`]), answered with the instance's status and body; to
//! a gRPC instance through its `weir.events.v1.Subscriber/Deliver`
//! ([`deliver`](super::deliver)), answered 200 on OK. Both check the event
//! the same way ([`check_event`]). The agent's refusals are
//! [`Rejection`]s, turned into a `tonic::Status` in one place
//! ([`Rejection::into_status`]); a gRPC instance's own refusal passes
//! through with its code, message and details ([`refused`]).

use std::{
    borrow::Cow,
    sync::{atomic::Ordering::Relaxed, Arc},
};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, uri::PathAndQuery, HeaderMap, HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Limited};
use weir_proto::{
    cloudevents::v1::{
        cloud_event::{cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data},
        CloudEvent,
    },
    events::v1::{
        publish_stream_response,
        publisher_server::{Publisher, PublisherServer},
        DeliverRequest, PublishRefusal, PublishRequest, PublishResponse, PublishStreamResponse,
        SendRequest, SendResponse,
    },
};

use super::{
    attempts::{self, Exchange, Plan},
    deliver::{self, DeliverError},
    forward::Failed,
    target::Target,
    Ingress,
};
use crate::{
    balance::{key_hash, Endpoint, Picker, Protocol},
    body::Body,
    reject::{Reason, Rejection, INSTANCE_STATUS, WEIR_INSTANCE, WEIR_REASON},
    retry::{grpc_class, Class},
    telemetry::{self, Ending, EventInfo, Kind, Trace},
};

/// Paths of the Publisher's methods start with this.
pub const PATH_PREFIX: &str = "/weir.events.v1.Publisher/";

/// Whether a request is a call to the agent's Publisher.
pub fn is_call<B>(request: &Request<B>) -> bool {
    request.uri().path().starts_with(PATH_PREFIX) && super::is_grpc(request.headers())
}

/// The tonic server a worker hands Publisher calls to.
pub type Server = PublisherServer<EventsPublisher>;

/// One worker's Publisher server: messages up to `max_event_bytes`.
pub fn server(ingress: Arc<Ingress>) -> Server {
    let max = ingress.max_event_bytes;
    PublisherServer::new(EventsPublisher { ingress }).max_decoding_message_size(max)
}

/// The Publisher service, over a worker's [`Ingress`].
#[derive(Debug)]
pub struct EventsPublisher {
    ingress: Arc<Ingress>,
}

#[tonic::async_trait]
impl Publisher for EventsPublisher {
    async fn send(
        &self,
        request: tonic::Request<SendRequest>,
    ) -> Result<tonic::Response<SendResponse>, tonic::Status> {
        let _in_flight = self.ingress.in_flight.enter();
        let (metadata, _, message) = request.into_parts();
        let headers = metadata.into_headers();
        let mut trace = self.ingress.telemetry.begin(Kind::Send, &headers);
        let result = self.send_event(&headers, message, &mut trace).await;
        if trace.is_on() {
            let ending = match &result {
                Ok(r) => Ending::status(u16::try_from(r.status).unwrap_or(500)),
                Err(SendError::Rejected(r)) => Ending::rejected(r),
                Err(SendError::Refused { status, .. }) => {
                    Ending::grpc(status.code(), status.message())
                }
            };
            self.ingress.telemetry.finish(trace, &ending);
        }
        match result {
            Ok(response) => Ok(tonic::Response::new(response)),
            Err(SendError::Rejected(r)) => {
                tracing::debug!(reason = r.reason.as_str(), detail = %r.detail, "Publisher/Send refused");
                self.ingress.count(&r);
                Err(r.into_status())
            }
            Err(SendError::Refused { instance, status }) => {
                tracing::debug!(%instance, code = ?status.code(), message = status.message(), "Publisher/Send: the instance refused the event");
                Err(refused(&instance, &status))
            }
        }
    }

    async fn publish(
        &self,
        request: tonic::Request<PublishRequest>,
    ) -> Result<tonic::Response<PublishResponse>, tonic::Status> {
        let _in_flight = self.ingress.in_flight.enter();
        let (metadata, _, message) = request.into_parts();
        publish_event(&self.ingress, &metadata.into_headers(), message)
            .await
            .map(tonic::Response::new)
            .map_err(|r| {
                self.ingress.count(&r);
                r.into_status()
            })
    }

    type PublishStreamStream = Answers;

    async fn publish_stream(
        &self,
        request: tonic::Request<tonic::Streaming<PublishRequest>>,
    ) -> Result<tonic::Response<Answers>, tonic::Status> {
        let (metadata, _, requests) = request.into_parts();
        // The stream counts as one request in flight until it ends.
        self.ingress.in_flight.0.fetch_add(1, Relaxed);
        Ok(tonic::Response::new(Answers {
            ingress: self.ingress.clone(),
            headers: Arc::new(metadata.into_headers()),
            requests: Some(requests),
            pending: futures_util::stream::FuturesOrdered::new(),
        }))
    }
}

/// The most events of one `PublishStream` the agent works on at once.
pub const STREAM_WINDOW: usize = 1024;

/// One answer of a `PublishStream`, on its way.
type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = PublishStreamResponse> + Send>>;

/// The answers of one `PublishStream`, in request order: it reads requests
/// while fewer than [`STREAM_WINDOW`] are unanswered, publishes each at
/// once (they share group commits), and yields answers as the oldest
/// completes. No task or channel of its own: the connection's task polls
/// it.
pub struct Answers {
    ingress: Arc<Ingress>,
    /// The call's metadata: trace context and caller.
    headers: Arc<http::HeaderMap>,
    /// None once the publisher closed its side (or broke it).
    requests: Option<tonic::Streaming<PublishRequest>>,
    pending: futures_util::stream::FuturesOrdered<Answer>,
}

impl Answers {
    fn answer(&self, request: PublishRequest) -> Answer {
        let ingress = self.ingress.clone();
        let headers = self.headers.clone();
        Box::pin(async move {
            let result = match publish_event(&ingress, &headers, request).await {
                Ok(published) => publish_stream_response::Result::Published(published),
                Err(r) => {
                    ingress.count(&r);
                    publish_stream_response::Result::Refused(PublishRefusal {
                        code: i32::from(r.reason.grpc_code()),
                        reason: r.reason.as_str().to_owned(),
                        message: r.detail.into_owned(),
                        field: r.field.map(Cow::into_owned).unwrap_or_default(),
                        retry_after_ms: r.retry_after.map_or(0, |d| {
                            u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
                        }),
                    })
                }
            };
            PublishStreamResponse {
                result: Some(result),
            }
        })
    }
}

impl std::fmt::Debug for Answers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Answers")
            .field("pending", &self.pending.len())
            .field("reading", &self.requests.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        self.ingress.in_flight.0.fetch_sub(1, Relaxed);
    }
}

impl futures_util::Stream for Answers {
    type Item = Result<PublishStreamResponse, tonic::Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = &mut *self;
        while this.pending.len() < STREAM_WINDOW {
            let Some(requests) = this.requests.as_mut() else {
                break;
            };
            match std::pin::Pin::new(requests).poll_next(cx) {
                Poll::Ready(Some(Ok(request))) => {
                    let answer = this.answer(request);
                    this.pending.push_back(answer);
                }
                Poll::Ready(Some(Err(status))) => {
                    // A broken request stream (a reset, a message too large
                    // or not decodable): what was read is still answered,
                    // then the stream ends with that status.
                    tracing::debug!(code = ?status.code(), message = status.message(), "Publisher/PublishStream: the request stream broke");
                    this.requests = None;
                    if this.pending.is_empty() {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(None) => this.requests = None,
                Poll::Pending => break,
            }
        }
        match std::pin::Pin::new(&mut this.pending).poll_next(cx) {
            Poll::Ready(Some(answer)) => Poll::Ready(Some(Ok(answer))),
            Poll::Ready(None) if this.requests.is_none() => Poll::Ready(None),
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

/// Why `Send` did not succeed.
#[derive(Debug, thiserror::Error)]
enum SendError {
    /// The agent's own refusal.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A gRPC instance answered `Deliver` with a status other than OK.
    #[error("instance {instance} answered {}: {}", status.code(), status.message())]
    Refused {
        instance: Box<str>,
        status: tonic::Status,
    },
}

/// A gRPC instance's refusal as its caller gets it: the instance's code,
/// message and details, with `weir-reason: instance-status` and
/// `weir-instance` naming it. The instance's other trailers stay behind:
/// they belong to its exchange with the agent.
fn refused(instance: &str, status: &tonic::Status) -> tonic::Status {
    let mut out = if status.details().is_empty() {
        tonic::Status::new(status.code(), status.message())
    } else {
        tonic::Status::with_details(
            status.code(),
            status.message(),
            Bytes::copy_from_slice(status.details()),
        )
    };
    let metadata = out.metadata_mut();
    metadata.insert(
        WEIR_REASON,
        tonic::metadata::MetadataValue::from_static(INSTANCE_STATUS),
    );
    // Registry ids are DNS-label-like; one that is not a header value is
    // left out rather than failing the answer.
    if let Ok(id) = tonic::metadata::MetadataValue::try_from(instance) {
        metadata.insert(WEIR_INSTANCE, id);
    }
    out
}

/// Publishes one event of `Publish` or `PublishStream` (a call with
/// `headers`), traced as a publish.
async fn publish_event(
    ingress: &Ingress,
    headers: &http::HeaderMap,
    request: PublishRequest,
) -> Result<PublishResponse, Rejection> {
    let mut trace = ingress.telemetry.begin(Kind::Publish, headers);
    let result = publish_traced(ingress, headers, request, &mut trace).await;
    if trace.is_on() {
        let ending = match &result {
            Ok(_) => Ending::grpc(tonic::Code::Ok, ""),
            Err(r) => Ending::rejected(r),
        };
        ingress.telemetry.finish(trace, &ending);
    }
    result
}

async fn publish_traced(
    ingress: &Ingress,
    headers: &http::HeaderMap,
    request: PublishRequest,
    trace: &mut Trace,
) -> Result<PublishResponse, Rejection> {
    let topics = ingress.topics.as_ref().ok_or_else(|| {
        Rejection::new(
            Reason::OutboxUnavailable,
            "topic publishing is not configured",
        )
    })?;
    if request.topic.is_empty() {
        return Err(Rejection::new(Reason::NoTarget, "topic is required").with_field("topic"));
    }
    let event = request
        .event
        .ok_or_else(|| Rejection::new(Reason::BadEvent, "event is required").with_field("event"))?;
    check_event(&event)?;
    let namespace = if request.namespace.is_empty() {
        ingress.default_namespace.as_str()
    } else {
        request.namespace.as_str()
    };
    trace.topic(namespace, &request.topic);
    if trace.is_on() {
        trace.event(EventInfo::of(&event.id, &event.r#type, &event.source));
    }
    let (traceparent, tracestate) = super::published_context(trace, headers);
    let published = topics
        .publish(
            namespace,
            &request.topic,
            event,
            crate::outbox::store::Origin {
                traceparent: &traceparent,
                tracestate: &tracestate,
                publisher: &trace.source().key(),
            },
        )
        .await
        .inspect_err(|r| tracing::debug!(reason = r.reason.as_str(), detail = %r.detail, "Publisher: a publish refused"))?;
    Ok(PublishResponse {
        id: published.id,
        subscribers: published.subscribers,
        durable: published.durable,
    })
}

impl EventsPublisher {
    async fn send_event(
        &self,
        metadata: &http::HeaderMap,
        request: SendRequest,
        trace: &mut Trace,
    ) -> Result<SendResponse, SendError> {
        if request.service.is_empty() {
            return Err(Rejection::new(Reason::NoTarget, "service is required")
                .with_field("service")
                .into());
        }
        let namespace = if request.namespace.is_empty() {
            self.ingress.default_namespace.as_str()
        } else {
            request.namespace.as_str()
        };
        let path = path_of(&request.path)?;
        let event = request.event.ok_or_else(|| {
            Rejection::new(Reason::BadEvent, "event is required").with_field("event")
        })?;
        check_event(&event)?;
        let route = self.ingress.route(&Target {
            namespace,
            service: &request.service,
            rewrite: None,
        })?;
        trace.target(&route);
        if trace.is_on() {
            trace.event(EventInfo::of(&event.id, &event.r#type, &event.source));
        }
        // Rules match on the event's own `type` and `source`.
        let handling = route.handling_for(&event.r#type, &event.source);
        let key = key_of(handling.picker, metadata, &event);
        let mut exchange = Publish {
            ingress: &self.ingress,
            keep: handling.failure.attempts() > 1,
            event: Some(event),
            path,
            topic: None,
        };
        let plan = Plan {
            route: &route,
            handling,
            key,
            // The event's id makes a second delivery safe.
            safe: true,
            topic: None,
        };
        match attempts::run(plan, &mut exchange, trace).await? {
            Sent::Answered(response) => Ok(response),
            Sent::Refused { instance, status } => Err(SendError::Refused { instance, status }),
        }
    }
}

/// What an instance answered an event of `Send` (or a topic delivery).
#[derive(Debug)]
pub(crate) enum Sent {
    /// An HTTP instance's answer, or a gRPC instance's OK.
    Answered(SendResponse),
    /// A gRPC instance's status other than OK.
    Refused {
        instance: Box<str>,
        status: tonic::Status,
    },
}

/// `Send`'s event (or a topic delivery), as the attempt loop sends it.
/// What a gRPC subscriber's `Deliver` says of a topic delivery.
#[derive(Clone, Debug)]
pub(crate) struct TopicDelivery {
    pub topic: String,
    /// The subscribing service.
    pub subscription: String,
    /// From 1.
    pub attempt: u32,
}

pub(crate) struct Publish<'a> {
    ingress: &'a Ingress,
    /// The event; kept for a retry when `keep`, else taken by the attempt.
    event: Option<CloudEvent>,
    keep: bool,
    path: PathAndQuery,
    /// Set for a topic delivery.
    topic: Option<TopicDelivery>,
}

impl<'a> Publish<'a> {
    /// `event` to `path` of an instance through `ingress`'s pools; kept
    /// for more attempts when `keep`.
    pub(crate) fn new(
        ingress: &'a Ingress,
        event: CloudEvent,
        path: PathAndQuery,
        keep: bool,
    ) -> Self {
        Self {
            ingress,
            event: Some(event),
            keep,
            path,
            topic: None,
        }
    }

    /// The same, for a delivery to a topic's subscriber.
    pub(crate) fn for_topic(mut self, delivery: TopicDelivery) -> Self {
        self.topic = Some(delivery);
        self
    }
}

impl Exchange for Publish<'_> {
    type Answer = Sent;

    fn judge(&self, answer: &Sent) -> Option<Class> {
        match answer {
            Sent::Answered(r) if r.status >= 500 => Some(Class::Http5xx),
            Sent::Answered(r) if r.status == 429 => Some(Class::Http429),
            Sent::Answered(_) => None,
            Sent::Refused { status, .. } => grpc_class(status.code() as u32),
        }
    }

    fn replayable(&self) -> bool {
        self.keep && self.event.is_some()
    }

    fn answered(&self, answer: &Sent) -> telemetry::Answer {
        match answer {
            Sent::Answered(r) => telemetry::Answer::Http(u16::try_from(r.status).unwrap_or(500)),
            Sent::Refused { status, .. } => telemetry::Answer::Grpc(status.code()),
        }
    }

    fn attempt(
        &mut self,
        endpoint: &Endpoint,
        trace: Option<telemetry::Propagation>,
    ) -> impl std::future::Future<Output = Result<Sent, Failed>> + Send {
        let event = if self.keep {
            self.event.clone()
        } else {
            self.event.take()
        };
        let ingress = self.ingress;
        // A topic delivery goes where the instance takes them.
        let path = match (&self.topic, endpoint.protocol) {
            (Some(_), Protocol::Http) => endpoint.delivery_path.clone(),
            _ => self.path.clone(),
        };
        let topic = self.topic.clone();
        async move {
            let event = event.ok_or_else(|| {
                Rejection::new(Reason::UpstreamUnavailable, "the event was not kept")
            })?;
            match endpoint.protocol {
                Protocol::Http => send_http(ingress, endpoint, event, path, trace).await,
                Protocol::Grpc => {
                    send_grpc(ingress, endpoint, event, path, topic.as_ref(), trace).await
                }
            }
        }
    }
}

/// To an HTTP instance: a binary-mode CloudEvents request to `path`,
/// answered with the instance's status and body.
async fn send_http(
    ingress: &Ingress,
    endpoint: &Endpoint,
    event: CloudEvent,
    path: PathAndQuery,
    trace: Option<telemetry::Propagation>,
) -> Result<Sent, Failed> {
    let (mut headers, body) = checked_binary_request(event)?;
    if let Some(t) = trace {
        t.apply(&mut headers);
    }
    let mut upstream = Request::new(Body::full(body));
    *upstream.method_mut() = Method::POST;
    *upstream.headers_mut() = headers;
    let response = ingress
        .upstreams
        .send(endpoint, upstream, Some(path), false)
        .await?;
    let (parts, body) = response.into_parts();
    let max = ingress.max_event_bytes;
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Rejection::new(
                Reason::TooLarge,
                format!(
                    "the answer of instance {} is larger than {max} bytes",
                    endpoint.id
                ),
            )
            .into())
        }
        Err(e) => {
            return Err(Failed {
                class: Some(Class::Reset),
                rejection: Rejection::new(
                    Reason::UpstreamUnavailable,
                    format!(
                        "instance {} at {} broke off its answer: {e}",
                        endpoint.id, endpoint.authority
                    ),
                ),
            });
        }
    };
    Ok(Sent::Answered(SendResponse {
        status: u32::from(parts.status.as_u16()),
        body,
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        instance_id: endpoint.id.to_string(),
    }))
}

/// To a gRPC instance: `Subscriber/Deliver` with the event unchanged,
/// answered 200 with the `DeliverResponse` on OK.
async fn send_grpc(
    ingress: &Ingress,
    endpoint: &Endpoint,
    event: CloudEvent,
    path: PathAndQuery,
    delivery: Option<&TopicDelivery>,
    trace: Option<telemetry::Propagation>,
) -> Result<Sent, Failed> {
    let message = match delivery {
        None => DeliverRequest {
            event: Some(event),
            topic: String::new(),
            subscription: String::new(),
            attempt: 1,
            path: path.as_str().to_owned(),
        },
        Some(d) => DeliverRequest {
            event: Some(event),
            topic: d.topic.clone(),
            subscription: d.subscription.clone(),
            attempt: d.attempt,
            path: String::new(),
        },
    };
    let max = ingress.max_event_bytes;
    match deliver::deliver(&ingress.upstreams, endpoint, &message, max, trace).await {
        Ok(body) => Ok(Sent::Answered(SendResponse {
            status: 200,
            body,
            content_type: String::new(),
            instance_id: endpoint.id.to_string(),
        })),
        Err(DeliverError::Failed(f)) => Err(f),
        Err(DeliverError::Refused(status)) => Ok(Sent::Refused {
            instance: endpoint.id.clone(),
            status,
        }),
    }
}

/// The path the instance sees: `/` when empty.
fn path_of(path: &str) -> Result<PathAndQuery, Rejection> {
    if path.is_empty() {
        return Ok(PathAndQuery::from_static("/"));
    }
    let bad =
        |why: &str| Rejection::new(Reason::NoTarget, format!("path {why}")).with_field("path");
    if !path.starts_with('/') {
        return Err(bad("must start with \"/\""));
    }
    PathAndQuery::try_from(path).map_err(|_| bad("is not a valid path and query"))
}

/// The hash of the event's consistent-hash key when `balancer` hashes one:
/// a gRPC metadata entry of the call, or the event's `subject` or
/// `partitionkey` attribute (in the canonical string form the event would
/// have as a header). `None`: no key needed, or the call lacks it.
fn key_of(balancer: &Picker, metadata: &HeaderMap, event: &CloudEvent) -> Option<u64> {
    use weir_core::policy::resolve::HashKey;
    let attribute = |name: &str| {
        let value = event.attributes.get(name)?;
        Some(key_hash(canonical(name, value).ok()?.as_bytes()))
    };
    match balancer.hash_key()? {
        HashKey::Header(name) => Some(key_hash(metadata.get(name.as_str())?.as_bytes())),
        HashKey::Subject => attribute("subject"),
        HashKey::PartitionKey => attribute("partitionkey"),
    }
}

fn bad_event(field: String, detail: String) -> Rejection {
    Rejection::new(Reason::BadEvent, detail).with_field(field)
}

/// Checks a required attribute.
fn required(field: &'static str, value: &str) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(bad_event(field.into(), format!("{field} is required")));
    }
    Ok(())
}

/// An attribute value as a header carries it: space, `"`, `%` and every
/// byte outside printable ASCII percent-encoded (CloudEvents HTTP binding,
/// 3.1.3.2), so any UTF-8 string makes a valid header value.
fn header_value(text: &str) -> HeaderValue {
    let encode = |b: u8| b == b' ' || b == b'"' || b == b'%' || !(0x21..=0x7e).contains(&b);
    let text: Cow<'_, str> = if text.bytes().any(encode) {
        let mut out = String::with_capacity(text.len() + 8);
        for b in text.bytes() {
            if encode(b) {
                out.push_str(&format!("%{b:02X}"));
            } else {
                out.push(char::from(b));
            }
        }
        Cow::Owned(out)
    } else {
        Cow::Borrowed(text)
    };
    // Printable ASCII only, by construction.
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// An attribute's canonical string form (CloudEvents type system): booleans
/// `true`/`false`, integers in decimal, bytes in base64, timestamps in
/// RFC 3339, the rest as they are.
fn canonical(name: &str, value: &CloudEventAttributeValue) -> Result<String, Rejection> {
    let field = || format!("event.attributes[{name}]");
    match &value.attr {
        None => Err(bad_event(field(), format!("attribute {name} has no value"))),
        Some(Attr::CeBoolean(b)) => Ok(b.to_string()),
        Some(Attr::CeInteger(i)) => Ok(i.to_string()),
        Some(Attr::CeString(s) | Attr::CeUri(s) | Attr::CeUriRef(s)) => Ok(s.clone()),
        Some(Attr::CeBytes(b)) => Ok(base64::engine::general_purpose::STANDARD.encode(b)),
        Some(Attr::CeTimestamp(t)) => {
            if !(0..1_000_000_000).contains(&t.nanos) {
                return Err(bad_event(
                    field(),
                    format!("attribute {name}: timestamp nanos must be in 0..1e9"),
                ));
            }
            Ok(t.to_string())
        }
    }
}

/// Attribute names are lower-case letters and digits (CloudEvents 1.0,
/// "Attribute Naming Convention").
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Checks `event` as `Send` takes it, whatever the instance speaks:
/// `spec_version` "1.0", `id`, `source` and `type` non-empty, attribute
/// names of lower-case letters and digits (none of the four above), each
/// attribute with a value (timestamps with nanos in range), and
/// `datacontenttype` a valid Content-Type. The first fault is named.
pub fn check_event(event: &CloudEvent) -> Result<(), Rejection> {
    if event.spec_version.is_empty() {
        return Err(bad_event(
            "event.spec_version".into(),
            "event.spec_version is required".into(),
        ));
    }
    if event.spec_version != "1.0" {
        return Err(bad_event(
            "event.spec_version".into(),
            format!(
                "event.spec_version must be \"1.0\" (got {:?})",
                event.spec_version
            ),
        ));
    }
    required("event.id", &event.id)?;
    required("event.source", &event.source)?;
    required("event.type", &event.r#type)?;
    for (name, value) in &event.attributes {
        if !valid_name(name) {
            return Err(bad_event(
                format!("event.attributes[{name}]"),
                format!("attribute name {name:?} must be lower-case letters and digits"),
            ));
        }
        if matches!(name.as_str(), "id" | "source" | "specversion" | "type") {
            return Err(bad_event(
                format!("event.attributes[{name}]"),
                format!("attribute {name} has a field of its own, not an attributes entry"),
            ));
        }
        let text = canonical(name, value)?;
        if name == "datacontenttype" {
            content_type(&text)?;
        }
    }
    Ok(())
}

fn content_type(text: &str) -> Result<HeaderValue, Rejection> {
    HeaderValue::from_str(text).map_err(|_| {
        bad_event(
            "event.attributes[datacontenttype]".into(),
            "attribute datacontenttype must be a valid Content-Type".into(),
        )
    })
}

/// The headers and body of a binary-mode CloudEvents HTTP request carrying
/// `event` (checked first, [`check_event`]): `ce-id`, `ce-source`,
/// `ce-specversion`, `ce-type`, one `ce-{name}` per other attribute
/// (`datacontenttype` is `Content-Type`), the data as the body. Proto data
/// is its `Any`'s value, as `application/protobuf` unless
/// `datacontenttype` says otherwise, with `ce-dataschema` the `Any`'s type
/// URL unless the event sets one.
pub fn binary_request(event: CloudEvent) -> Result<(HeaderMap, Bytes), Rejection> {
    check_event(&event)?;
    checked_binary_request(event)
}

/// [`binary_request`] of an event [`check_event`] passed (its errors
/// cannot happen then; `Send` checks before it picks an instance).
fn checked_binary_request(event: CloudEvent) -> Result<(HeaderMap, Bytes), Rejection> {
    let mut headers = HeaderMap::with_capacity(5 + event.attributes.len());
    headers.insert("ce-specversion", HeaderValue::from_static("1.0"));
    headers.insert("ce-id", header_value(&event.id));
    headers.insert("ce-source", header_value(&event.source));
    headers.insert("ce-type", header_value(&event.r#type));
    for (name, value) in &event.attributes {
        let text = canonical(name, value)?;
        if name == "datacontenttype" {
            headers.insert(header::CONTENT_TYPE, content_type(&text)?);
            continue;
        }
        // Lower-case letters and digits: a valid header name.
        let header = HeaderName::try_from(format!("ce-{name}")).map_err(|_| {
            bad_event(
                format!("event.attributes[{name}]"),
                format!("attribute name {name:?} is not a valid header name"),
            )
        })?;
        headers.insert(header, header_value(&text));
    }
    let body = match event.data {
        None => Bytes::new(),
        Some(Data::BinaryData(b)) => b,
        Some(Data::TextData(t)) => Bytes::from(t),
        Some(Data::ProtoData(any)) => {
            if !headers.contains_key(header::CONTENT_TYPE) {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/protobuf"),
                );
            }
            if !any.type_url.is_empty() && !headers.contains_key("ce-dataschema") {
                headers.insert("ce-dataschema", header_value(&any.type_url));
            }
            Bytes::from(any.value)
        }
    };
    Ok((headers, body))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use weir_proto::{events::v1::publisher_server::SERVICE_NAME, prost_types};

    use super::*;

    fn value(attr: Attr) -> CloudEventAttributeValue {
        CloudEventAttributeValue { attr: Some(attr) }
    }

    fn event(attributes: Vec<(&str, Attr)>, data: Option<Data>) -> CloudEvent {
        CloudEvent {
            id: "e-1".into(),
            source: "/orders".into(),
            spec_version: "1.0".into(),
            r#type: "com.example.order.created".into(),
            attributes: attributes
                .into_iter()
                .map(|(k, v)| (k.to_owned(), value(v)))
                .collect::<HashMap<_, _>>(),
            data,
        }
    }

    fn get<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
        h.get(name)
            .unwrap_or_else(|| panic!("no header {name}"))
            .to_str()
            .expect("ascii")
    }

    #[test]
    fn the_prefix_is_the_generated_service_name() {
        assert_eq!(PATH_PREFIX, format!("/{SERVICE_NAME}/"));
    }

    #[test]
    fn attributes_become_ce_headers_in_canonical_form() {
        let e = event(
            vec![
                ("datacontenttype", Attr::CeString("application/json".into())),
                ("subject", Attr::CeString("order 7 \"big\" 100% ü".into())),
                (
                    "time",
                    Attr::CeTimestamp(prost_types::Timestamp {
                        seconds: 1_700_000_000,
                        nanos: 0,
                    }),
                ),
                ("dataschema", Attr::CeUri("https://example.com/s".into())),
                ("traceparent", Attr::CeString("00-ab-cd-01".into())),
                ("retries", Attr::CeInteger(-3)),
                ("urgent", Attr::CeBoolean(true)),
                (
                    "signature",
                    Attr::CeBytes(Bytes::from_static(b"\x00\xffhi")),
                ),
            ],
            Some(Data::TextData("{\"n\":7}".into())),
        );
        let (h, body) = binary_request(e).expect("a good event");
        assert_eq!(get(&h, "ce-specversion"), "1.0");
        assert_eq!(get(&h, "ce-id"), "e-1");
        assert_eq!(get(&h, "ce-source"), "/orders");
        assert_eq!(get(&h, "ce-type"), "com.example.order.created");
        assert_eq!(get(&h, "content-type"), "application/json");
        assert!(h.get("ce-datacontenttype").is_none());
        assert_eq!(
            get(&h, "ce-subject"),
            "order%207%20%22big%22%20100%25%20%C3%BC"
        );
        assert_eq!(get(&h, "ce-time"), "2023-11-14T22:13:20Z");
        assert_eq!(get(&h, "ce-dataschema"), "https://example.com/s");
        assert_eq!(get(&h, "ce-traceparent"), "00-ab-cd-01");
        assert_eq!(get(&h, "ce-retries"), "-3");
        assert_eq!(get(&h, "ce-urgent"), "true");
        assert_eq!(get(&h, "ce-signature"), "AP9oaQ==");
        assert_eq!(h.len(), 12);
        assert_eq!(&body[..], b"{\"n\":7}");
    }

    #[test]
    fn type_and_source_read_back_from_the_headers_as_sent() {
        let mut e = event(vec![], None);
        e.r#type = "com.example.heavy.résumé 100%".into();
        e.source = "/shop \"cart\"/%41".into();
        let (h, _) = binary_request(e.clone()).expect("a good event");
        let (event_type, source) = super::super::cloudevents::binary_type_and_source(&h);
        assert_eq!(
            (&*event_type, &*source),
            (e.r#type.as_str(), e.source.as_str())
        );
    }

    #[test]
    fn fractional_timestamps_keep_their_fraction() {
        let e = event(
            vec![(
                "time",
                Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 0,
                    nanos: 500_000_000,
                }),
            )],
            None,
        );
        let (h, body) = binary_request(e).expect("a good event");
        let time = get(&h, "ce-time");
        assert!(time.starts_with("1970-01-01T00:00:00.5"), "{time}");
        assert!(time.ends_with('Z'), "{time}");
        assert!(body.is_empty());
        assert!(h.get("content-type").is_none());

        let e = event(
            vec![(
                "time",
                Attr::CeTimestamp(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
            )],
            None,
        );
        let r = binary_request(e).expect_err("bad nanos");
        assert_eq!(r.field.as_deref(), Some("event.attributes[time]"));
    }

    #[test]
    fn binary_and_proto_data_are_the_body() {
        let (h, body) = binary_request(event(
            vec![],
            Some(Data::BinaryData(Bytes::from_static(b"\x01\x02"))),
        ))
        .expect("ok");
        assert_eq!(&body[..], b"\x01\x02");
        assert!(h.get("content-type").is_none());

        let any = prost_types::Any {
            type_url: "type.googleapis.com/shop.Order".into(),
            value: vec![8, 7],
        };
        let (h, body) =
            binary_request(event(vec![], Some(Data::ProtoData(any.clone())))).expect("ok");
        assert_eq!(&body[..], &[8, 7]);
        assert_eq!(get(&h, "content-type"), "application/protobuf");
        assert_eq!(get(&h, "ce-dataschema"), "type.googleapis.com/shop.Order");

        // The event's own content type and schema win.
        let (h, _) = binary_request(event(
            vec![
                (
                    "datacontenttype",
                    Attr::CeString("application/x-protobuf".into()),
                ),
                ("dataschema", Attr::CeUri("urn:order".into())),
            ],
            Some(Data::ProtoData(any)),
        ))
        .expect("ok");
        assert_eq!(get(&h, "content-type"), "application/x-protobuf");
        assert_eq!(get(&h, "ce-dataschema"), "urn:order");
    }

    #[test]
    fn bad_events_name_the_field() {
        let field = |e: CloudEvent| {
            let r = binary_request(e).expect_err("a bad event");
            assert_eq!(r.reason, Reason::BadEvent);
            (
                r.field.map(|f| f.into_owned()).unwrap_or_default(),
                r.detail.into_owned(),
            )
        };
        let mut e = event(vec![], None);
        e.r#type.clear();
        assert_eq!(
            field(e),
            ("event.type".into(), "event.type is required".into())
        );
        let mut e = event(vec![], None);
        e.source.clear();
        assert_eq!(field(e).0, "event.source");
        let mut e = event(vec![], None);
        e.id.clear();
        assert_eq!(field(e).0, "event.id");
        let mut e = event(vec![], None);
        e.spec_version = "0.3".into();
        let (f, detail) = field(e);
        assert_eq!(f, "event.spec_version");
        assert!(detail.contains("must be \"1.0\""), "{detail}");
        let mut e = event(vec![], None);
        e.spec_version.clear();
        assert_eq!(field(e).0, "event.spec_version");

        let e = event(vec![("Bad-Name", Attr::CeString("x".into()))], None);
        assert_eq!(field(e).0, "event.attributes[Bad-Name]");
        let e = event(vec![("type", Attr::CeString("x".into()))], None);
        assert_eq!(field(e).0, "event.attributes[type]");
        let mut e = event(vec![], None);
        e.attributes
            .insert("empty".into(), CloudEventAttributeValue { attr: None });
        assert_eq!(field(e).0, "event.attributes[empty]");
        let e = event(
            vec![("datacontenttype", Attr::CeString("a\nb".into()))],
            None,
        );
        assert_eq!(field(e).0, "event.attributes[datacontenttype]");
    }

    #[test]
    fn an_instances_refusal_keeps_code_message_and_details_and_says_whose() {
        use tonic_types::{ErrorDetails, StatusExt};
        let from_instance = tonic::Status::with_error_details(
            tonic::Code::ResourceExhausted,
            "slow down",
            ErrorDetails::with_retry_info(Some(std::time::Duration::from_secs(3))),
        );
        let mut from_instance = from_instance;
        from_instance
            .metadata_mut()
            .insert(WEIR_REASON, "spoofed".parse().expect("ascii"));
        let s = refused("g0", &from_instance);
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "slow down");
        assert_eq!(
            s.get_error_details()
                .retry_info()
                .and_then(|r| r.retry_delay),
            Some(std::time::Duration::from_secs(3))
        );
        let meta = |k: &str| s.metadata().get(k).and_then(|v| v.to_str().ok());
        assert_eq!(meta(WEIR_REASON), Some(INSTANCE_STATUS));
        assert_eq!(meta(WEIR_INSTANCE), Some("g0"));

        let s = refused("g0", &tonic::Status::invalid_argument("no"));
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.details().is_empty());
    }

    #[test]
    fn check_event_accepts_what_binary_request_sends() {
        let e = event(
            vec![("subject", Attr::CeString("x".into()))],
            Some(Data::BinaryData(Bytes::from_static(b"\x00"))),
        );
        check_event(&e).expect("a good event");
        let mut bad = e;
        bad.id.clear();
        let r = check_event(&bad).expect_err("no id");
        assert_eq!(r.field.as_deref(), Some("event.id"));
    }

    #[test]
    fn paths_default_to_root_and_must_be_absolute() {
        assert_eq!(path_of("").expect("root").as_str(), "/");
        assert_eq!(path_of("/a/b?x=1").expect("ok").as_str(), "/a/b?x=1");
        let r = path_of("a").expect_err("relative");
        assert_eq!(r.reason, Reason::NoTarget);
        assert_eq!(r.field.as_deref(), Some("path"));
    }
}
