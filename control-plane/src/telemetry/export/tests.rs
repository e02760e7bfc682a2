//! The exporters against real receivers on 127.0.0.1: an OTLP collector
//! built from the same opentelemetry-proto definitions, and a Zipkin
//! endpoint in axum.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use axum::{extract::State, http::StatusCode, routing::post, Json, Router};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value::Value as Any, AnyValue, ArrayValue, KeyValue},
    trace::v1::{self as otlp, span::SpanKind as OtlpKind, status::StatusCode as OtlpStatus},
};
use serde_json::{json, Value as JsonValue};
use tokio::{net::TcpListener, sync::oneshot, time::Instant};
use tokio_stream::wrappers::TcpListenerStream;
use weir_proto::telemetry::v1::{attribute, Attribute, ServiceRef, Span, SpanKind, StringList};

use super::{CountsSnapshot, ExportConfig, Exporters, Kind};

// ---- spans ----

const TRACE: [u8; 16] = [
    0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36,
];
const T0: u64 = 1_700_000_000_123_456_789;

fn id(n: u8) -> Vec<u8> {
    vec![0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, n]
}

fn service(namespace: &str, name: &str) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

fn attr(key: &str, value: attribute::Value) -> Attribute {
    Attribute {
        key: key.to_owned(),
        value: Some(value),
    }
}

fn text(key: &str, value: &str) -> Attribute {
    attr(key, attribute::Value::StringValue(value.to_owned()))
}

/// A span of [`TRACE`] from `checkout` in `shop` on `node-1`, 1.5 ms
/// long; tests change what they need.
fn span(n: u8, parent: Option<u8>, name: &str, kind: SpanKind, attributes: Vec<Attribute>) -> Span {
    Span {
        trace_id: TRACE.to_vec(),
        span_id: id(n),
        parent_span_id: parent.map(id).unwrap_or_default(),
        trace_state: String::new(),
        name: name.to_owned(),
        kind: kind as i32,
        start_unix_nanos: T0 + u64::from(n) * 1_000_000,
        end_unix_nanos: T0 + u64::from(n) * 1_000_000 + 1_500_000,
        error: false,
        status_message: String::new(),
        attributes,
        source: service("shop", "checkout"),
        target: None,
        topic: String::new(),
        node_id: "node-1".to_owned(),
    }
}

/// A call from checkout to payments (the root), a publish to `orders`
/// that failed, and the payments server's side of the call, made by an
/// agent that could not name the caller.
fn spans() -> Vec<Span> {
    let mut call = span(
        1,
        None,
        "POST /pay",
        SpanKind::Client,
        vec![
            text("http.request.method", "POST"),
            attr("server.port", attribute::Value::IntValue(8080)),
            attr("weir.retry.ratio", attribute::Value::DoubleValue(0.25)),
        ],
    );
    call.target = service("shop", "payments");
    call.trace_state = "weir=1".to_owned();
    let mut publish = span(
        2,
        Some(1),
        "orders publish",
        SpanKind::Producer,
        vec![
            text("messaging.operation.type", "publish"),
            text("messaging.destination.name", "orders"),
            text("cloudevents.event_id", "ev-42"),
            attr(
                "cloudevents.event_subject",
                attribute::Value::Strings(StringList {
                    values: vec!["a".to_owned(), "b".to_owned()],
                }),
            ),
            attr("weir.sampled", attribute::Value::BoolValue(true)),
        ],
    );
    publish.topic = "orders".to_owned();
    publish.error = true;
    publish.status_message = "broker unavailable".to_owned();
    let mut server = span(3, Some(1), "POST /pay", SpanKind::Server, vec![]);
    server.source = service("", "");
    server.target = service("shop", "payments");
    server.node_id = "node-2".to_owned();
    vec![call, publish, server]
}

fn config() -> ExportConfig {
    ExportConfig {
        timeout: Duration::from_secs(5),
        ..ExportConfig::default()
    }
}

/// Polls `check` every 5 ms until it yields, for at most 10 s.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn counts(exporters: &Exporters, kind: Kind) -> CountsSnapshot {
    exporters.counts(kind).expect("the exporter runs")
}

// ---- receivers ----

/// What a receiver got, and how many calls it fails first.
#[derive(Debug, Default)]
struct Received<T> {
    requests: Mutex<Vec<T>>,
    calls: AtomicUsize,
    fail_first: usize,
}

impl<T: Clone> Received<T> {
    fn failing_first(n: usize) -> Arc<Self> {
        Arc::new(Self {
            requests: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            fail_first: n,
        })
    }

    /// Counts a call; false: fail it.
    fn call(&self, request: T) -> bool {
        if self.calls.fetch_add(1, Ordering::SeqCst) < self.fail_first {
            return false;
        }
        self.requests.lock().expect("not poisoned").push(request);
        true
    }

    fn requests(&self) -> Vec<T> {
        self.requests.lock().expect("not poisoned").clone()
    }
}

#[derive(Debug)]
struct Collector(Arc<Received<ExportTraceServiceRequest>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if !self.0.call(request.into_inner()) {
            return Err(tonic::Status::unavailable("warming up"));
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// Serves until the returned sender is dropped.
async fn otlp_receiver(
    received: Arc<Received<ExportTraceServiceRequest>>,
) -> (String, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(received)))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            }),
    );
    (format!("http://{addr}"), stop)
}

/// Serves `/api/v2/spans` until the returned sender is dropped; a failed
/// call answers 503.
async fn zipkin_receiver(received: Arc<Received<JsonValue>>) -> (String, oneshot::Sender<()>) {
    async fn spans(
        State(received): State<Arc<Received<JsonValue>>>,
        Json(body): Json<JsonValue>,
    ) -> StatusCode {
        if received.call(body) {
            StatusCode::ACCEPTED
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }
    let app = Router::new()
        .route("/api/v2/spans", post(spans))
        .with_state(received);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    (format!("http://{addr}/api/v2/spans"), stop)
}

/// Accepts connections and never answers; counts them.
async fn silent_receiver() -> (String, Arc<AtomicUsize>, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let accepted = Arc::new(AtomicUsize::new(0));
    let (stop, mut stopped) = oneshot::channel::<()>();
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                conn = listener.accept() => {
                    if let Ok((conn, _)) = conn {
                        count.fetch_add(1, Ordering::SeqCst);
                        held.push(conn);
                    }
                }
            }
        }
    });
    (format!("http://{addr}"), accepted, stop)
}

// ---- OTLP ----

fn kv(key: &str, value: Any) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(value: &str) -> Any {
    Any::StringValue(value.to_owned())
}

#[tokio::test]
async fn otlp_receiver_gets_the_spans_as_offered() {
    let received = Received::failing_first(0);
    let (endpoint, _stop) = otlp_receiver(Arc::clone(&received)).await;
    let exporters = Exporters::start(ExportConfig {
        otlp_endpoint: Some(endpoint),
        ..config()
    });
    exporters.offer(&spans());

    let requests = eventually("the collector to get the spans", || {
        let r = received.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(requests.len(), 1, "one batch");
    let resources = &requests[0].resource_spans;
    assert_eq!(resources.len(), 2, "checkout on node-1, unknown on node-2");

    let checkout = &resources[0];
    assert_eq!(
        checkout.resource.as_ref().expect("resource").attributes,
        vec![
            kv("service.name", s("checkout")),
            kv("service.namespace", s("shop")),
            kv("host.name", s("node-1")),
        ]
    );
    assert_eq!(checkout.scope_spans.len(), 1);
    let scope = &checkout.scope_spans[0];
    assert_eq!(scope.scope.as_ref().expect("scope").name, "weir-agent");
    let [call, publish] = &scope.spans[..] else {
        panic!("two spans from checkout: {:?}", scope.spans);
    };

    assert_eq!(call.trace_id, TRACE);
    assert_eq!(call.span_id, id(1));
    assert!(call.parent_span_id.is_empty(), "a root");
    assert_eq!(call.trace_state, "weir=1");
    assert_eq!(call.name, "POST /pay");
    assert_eq!(call.kind, OtlpKind::Client as i32);
    assert_eq!(call.start_time_unix_nano, T0 + 1_000_000);
    assert_eq!(call.end_time_unix_nano, T0 + 2_500_000);
    assert_eq!(call.status, Some(otlp::Status::default()), "UNSET");
    assert_eq!(
        call.attributes,
        vec![
            kv("http.request.method", s("POST")),
            kv("server.port", Any::IntValue(8080)),
            kv("weir.retry.ratio", Any::DoubleValue(0.25)),
            kv("peer.service", s("payments")),
        ]
    );

    assert_eq!(publish.span_id, id(2));
    assert_eq!(publish.parent_span_id, id(1));
    assert_eq!(publish.kind, OtlpKind::Producer as i32);
    assert_eq!(
        publish.status,
        Some(otlp::Status {
            code: OtlpStatus::Error as i32,
            message: "broker unavailable".to_owned(),
        })
    );
    assert_eq!(
        publish.attributes,
        vec![
            kv("messaging.operation.type", s("publish")),
            kv("messaging.destination.name", s("orders")),
            kv("cloudevents.event_id", s("ev-42")),
            kv(
                "cloudevents.event_subject",
                Any::ArrayValue(ArrayValue {
                    values: vec![
                        AnyValue {
                            value: Some(s("a")),
                        },
                        AnyValue {
                            value: Some(s("b")),
                        },
                    ],
                }),
            ),
            kv("weir.sampled", Any::BoolValue(true)),
        ],
        "no peer.service without a target"
    );

    let unknown = &resources[1];
    assert_eq!(
        unknown.resource.as_ref().expect("resource").attributes,
        vec![
            kv("service.name", s("unknown")),
            kv("host.name", s("node-2"))
        ]
    );
    let server = &unknown.scope_spans[0].spans[0];
    assert_eq!(server.span_id, id(3));
    assert_eq!(server.parent_span_id, id(1));
    assert_eq!(server.kind, OtlpKind::Server as i32);

    let got = eventually("the count", || {
        let c = counts(&exporters, Kind::Otlp);
        (c.exported == 3).then_some(c)
    })
    .await;
    assert_eq!(
        got,
        CountsSnapshot {
            exported: 3,
            ..Default::default()
        }
    );
}

#[tokio::test]
async fn otlp_retries_unavailable_until_the_collector_takes_the_batch() {
    let received = Received::failing_first(2);
    let (endpoint, _stop) = otlp_receiver(Arc::clone(&received)).await;
    let exporters = Exporters::start(ExportConfig {
        otlp_endpoint: Some(endpoint),
        ..config()
    });
    exporters.offer(&spans());

    let requests = eventually("the third call to get through", || {
        let r = received.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    let sent: usize = requests[0]
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len())
        .sum();
    assert_eq!(sent, 3);
    assert_eq!(received.calls.load(Ordering::SeqCst), 3);
    let got = eventually("the count", || {
        let c = counts(&exporters, Kind::Otlp);
        (c.exported == 3).then_some(c)
    })
    .await;
    assert_eq!(got.failures, 2);
    assert_eq!(got.failed, 0);
}

// ---- Zipkin ----

#[tokio::test]
async fn zipkin_receiver_gets_the_spans_as_json() {
    let received = Received::failing_first(0);
    let (endpoint, _stop) = zipkin_receiver(Arc::clone(&received)).await;
    let exporters = Exporters::start(ExportConfig {
        zipkin_endpoint: Some(endpoint),
        ..config()
    });
    exporters.offer(&spans());

    let requests = eventually("the Zipkin endpoint to get the spans", || {
        let r = received.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    let us = T0 / 1000;
    assert_eq!(
        requests,
        vec![json!([
            {
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "00f067aa0ba90201",
                "name": "POST /pay",
                "kind": "CLIENT",
                "timestamp": us + 1000,
                "duration": 1500,
                "localEndpoint": {"serviceName": "checkout"},
                "remoteEndpoint": {"serviceName": "payments"},
                "tags": {
                    "http.request.method": "POST",
                    "server.port": "8080",
                    "weir.retry.ratio": "0.25",
                },
            },
            {
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "00f067aa0ba90202",
                "parentId": "00f067aa0ba90201",
                "name": "orders publish",
                "kind": "PRODUCER",
                "timestamp": us + 2000,
                "duration": 1500,
                "localEndpoint": {"serviceName": "checkout"},
                "tags": {
                    "messaging.operation.type": "publish",
                    "messaging.destination.name": "orders",
                    "cloudevents.event_id": "ev-42",
                    "cloudevents.event_subject": "a,b",
                    "weir.sampled": "true",
                    "error": "broker unavailable",
                },
            },
            {
                "traceId": "4bf92f3577b34da6a3ce929d0e0e4736",
                "id": "00f067aa0ba90203",
                "parentId": "00f067aa0ba90201",
                "name": "POST /pay",
                "kind": "SERVER",
                "timestamp": us + 3000,
                "duration": 1500,
                "localEndpoint": {"serviceName": "unknown"},
                "remoteEndpoint": {"serviceName": "payments"},
            },
        ])]
    );
    eventually("the count", || {
        (counts(&exporters, Kind::Zipkin).exported == 3).then_some(())
    })
    .await;
}

#[test]
fn zipkin_leaves_out_internal_kinds_and_never_says_zero_duration() {
    let mut s = span(9, None, "tick", SpanKind::Internal, vec![]);
    s.end_unix_nanos = s.start_unix_nanos + 999;
    s.error = true;
    let json = serde_json::to_value(super::zipkin::ZipkinSpan::from(&s)).expect("encodes");
    assert_eq!(json.get("kind"), None);
    assert_eq!(json.get("parentId"), None);
    assert_eq!(json["duration"], 1, "under 1 µs rounds up to 1");
    assert_eq!(json["tags"], json!({"error": "true"}));
}

#[tokio::test]
async fn zipkin_retries_503_until_the_endpoint_takes_the_batch() {
    let received = Received::failing_first(2);
    let (endpoint, _stop) = zipkin_receiver(Arc::clone(&received)).await;
    let exporters = Exporters::start(ExportConfig {
        zipkin_endpoint: Some(endpoint),
        ..config()
    });
    exporters.offer(&spans());

    let requests = eventually("the third call to get through", || {
        let r = received.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(requests[0].as_array().map(Vec::len), Some(3));
    assert_eq!(received.calls.load(Ordering::SeqCst), 3);
    let got = eventually("the count", || {
        let c = counts(&exporters, Kind::Zipkin);
        (c.exported == 3).then_some(c)
    })
    .await;
    assert_eq!(got.failures, 2);
    assert_eq!(got.failed, 0);
}

// ---- bounds ----

/// On the test's one thread the exporter tasks cannot run while `offer`
/// does, so what fits and what drops is exact.
#[tokio::test]
async fn offer_never_waits_on_a_backend_that_does_not_answer() {
    let (otlp, otlp_conns, _stop_otlp) = silent_receiver().await;
    let (zipkin, zipkin_conns, _stop_zipkin) = silent_receiver().await;
    let exporters = Exporters::start(ExportConfig {
        otlp_endpoint: Some(otlp),
        zipkin_endpoint: Some(format!("{zipkin}/api/v2/spans")),
        batch_spans: 4,
        queue_spans: 8,
        // Longer than the test: every send hangs.
        timeout: Duration::from_secs(60),
    });
    let many: Vec<Span> = (1..=100)
        .map(|n| span(n, None, "op", SpanKind::Client, vec![]))
        .collect();

    exporters.offer(&many);
    for kind in [Kind::Otlp, Kind::Zipkin] {
        let c = counts(&exporters, kind);
        assert_eq!(c.queue_full, 92, "{kind:?}: 8 queued, the rest dropped");
    }

    // Each task has taken a batch of 4 and hangs on it; 4 wait behind it.
    eventually("both exporters to connect", || {
        (otlp_conns.load(Ordering::SeqCst) > 0 && zipkin_conns.load(Ordering::SeqCst) > 0)
            .then_some(())
    })
    .await;
    exporters.offer(&many[..10]);
    for kind in [Kind::Otlp, Kind::Zipkin] {
        let c = counts(&exporters, kind);
        assert_eq!(c.queue_full, 92 + 6, "{kind:?}: room for 4 more");
        assert_eq!(c.exported, 0);
    }
}

#[tokio::test]
async fn a_down_backend_costs_the_batch_after_a_few_retries() {
    // A port nobody listens on (any more).
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        listener.local_addr().expect("bound")
    };
    let exporters = Exporters::start(ExportConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        zipkin_endpoint: Some(format!("http://{addr}/api/v2/spans")),
        ..config()
    });
    exporters.offer(&spans());
    for kind in [Kind::Otlp, Kind::Zipkin] {
        let got = eventually("the batch to be given up", || {
            let c = counts(&exporters, kind);
            (c.failed == 3).then_some(c)
        })
        .await;
        assert_eq!(got.failures, u64::from(super::MAX_ATTEMPTS), "{kind:?}");
        assert_eq!(got.exported, 0);
    }
}

#[tokio::test]
async fn a_4xx_is_not_retried() {
    async fn reject() -> StatusCode {
        StatusCode::BAD_REQUEST
    }
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("bound");
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let app = Router::new().route("/api/v2/spans", post(reject));
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await;
    });
    let exporters = Exporters::start(ExportConfig {
        zipkin_endpoint: Some(format!("http://{addr}/api/v2/spans")),
        ..config()
    });
    exporters.offer(&spans());
    let got = eventually("the batch to be dropped", || {
        let c = counts(&exporters, Kind::Zipkin);
        (c.failed == 3).then_some(c)
    })
    .await;
    assert_eq!(got.failures, 1);
}

#[tokio::test]
async fn bad_ids_are_counted_and_not_sent() {
    let received = Received::failing_first(0);
    let (endpoint, _stop) = zipkin_receiver(Arc::clone(&received)).await;
    let exporters = Exporters::start(ExportConfig {
        zipkin_endpoint: Some(endpoint),
        ..config()
    });
    let mut short = span(1, None, "short", SpanKind::Client, vec![]);
    short.trace_id.truncate(8);
    let mut zero = span(2, None, "zero", SpanKind::Client, vec![]);
    zero.span_id = vec![0; 8];
    let good = span(3, None, "good", SpanKind::Client, vec![]);
    exporters.offer(&[short, zero, good]);
    let requests = eventually("the good span", || {
        let r = received.requests();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert_eq!(requests[0].as_array().map(Vec::len), Some(1));
    assert_eq!(counts(&exporters, Kind::Zipkin).invalid, 2);
}

#[tokio::test]
async fn nothing_configured_or_a_bad_endpoint_exports_nothing() {
    let none = Exporters::start(ExportConfig::default());
    none.offer(&spans());
    assert!(none.queues.is_empty());
    let bad = Exporters::start(ExportConfig {
        otlp_endpoint: Some("https://collector:4317".to_owned()),
        zipkin_endpoint: Some("not a uri".to_owned()),
        ..config()
    });
    bad.offer(&spans());
    assert!(bad.queues.is_empty());
}
