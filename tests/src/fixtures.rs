//! Sample instances: registry records to register, and for health and
//! agent tests a real HTTP server whose answers the test controls and which
//! records every request it gets, and a gRPC `weir.events.v1.Subscriber`
//! that does the same for the events delivered to it.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Result;
use axum::{body::Bytes, extract::State, http::HeaderMap, http::StatusCode, http::Uri, Router};
use tokio::{net::TcpListener, task::JoinHandle};
use weir_proto::{
    events::v1::{
        subscriber_server::{Subscriber, SubscriberServer},
        DeliverRequest, DeliverResponse,
    },
    registry::v1::{health_check, HealthCheck, HttpCheck, Instance},
};

/// Registers `default/service/id` at `server`, subscribed to `topics`.
pub async fn subscribe(
    client: &weir_client::Client,
    service: &str,
    id: &str,
    server: &HttpInstance,
    topics: &[&str],
) -> anyhow::Result<()> {
    let mut i = instance("default", service, id, u32::from(server.port()));
    i.topics = topics.iter().map(|t| t.to_string()).collect();
    client.register(i).await?;
    Ok(())
}

/// `n` HTTP instances of `default/service`, registered as persistent
/// instances `{prefix}0`, `{prefix}1`, ...
pub async fn http_instances(
    client: &weir_client::Client,
    service: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<HttpInstance>> {
    let mut instances = Vec::with_capacity(n);
    for k in 0..n {
        let server = HttpInstance::start().await?;
        let id = format!("{prefix}{k}");
        client
            .register(instance("default", service, &id, u32::from(server.port())))
            .await?;
        instances.push(server);
    }
    Ok(instances)
}

/// A persistent instance at `127.0.0.1:port`.
pub fn instance(namespace: &str, service: &str, id: &str, port: u32) -> Instance {
    Instance {
        namespace: namespace.into(),
        service: service.into(),
        instance_id: id.into(),
        host: "127.0.0.1".into(),
        port,
        ..Instance::default()
    }
}

/// An ephemeral instance at `127.0.0.1:8080` with a lease of `ttl` seconds.
pub fn ephemeral(namespace: &str, service: &str, id: &str, ttl: u32) -> Instance {
    Instance {
        ephemeral: true,
        ttl_seconds: ttl,
        ..instance(namespace, service, id, 8080)
    }
}

/// A persistent instance of `default/service` at `127.0.0.1:port`, checked
/// by `kind` every `interval_ms`.
pub fn checked(
    service: &str,
    id: &str,
    port: u16,
    kind: health_check::Kind,
    interval_ms: u32,
) -> Instance {
    Instance {
        health_check: Some(HealthCheck {
            kind: Some(kind),
            interval_ms,
            ..HealthCheck::default()
        }),
        ..instance("default", service, id, u32::from(port))
    }
}

/// An HTTP check of `GET path`.
pub fn http_check(path: &str) -> health_check::Kind {
    health_check::Kind::Http(HttpCheck {
        path: path.into(),
        ..HttpCheck::default()
    })
}

/// One request a [`HttpInstance`] answered.
#[derive(Clone, Debug)]
pub struct Hit {
    pub path: String,
    /// The `x-weir-checker` header: which replica checked.
    pub checker: String,
    pub at: Instant,
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Default)]
struct Behaviour {
    default_status: u16,
    status: HashMap<String, u16>,
    /// Paths that alternate 200, 500, 200, ... per request.
    flapping: HashSet<String>,
    flap_state: HashMap<String, bool>,
    /// Requests with this header value are answered only after the delay.
    delays: Vec<(String, String, Duration)>,
    hits: Vec<Hit>,
}

/// An HTTP server on loopback answering every path with a status the test
/// sets (200 by default), recording each request with its headers and body.
#[derive(Debug)]
pub struct HttpInstance {
    addr: SocketAddr,
    state: Arc<Mutex<Behaviour>>,
    task: JoinHandle<()>,
}

async fn answer(
    State(state): State<Arc<Mutex<Behaviour>>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let path = uri.path().to_owned();
    let delay = {
        let b = state.lock().unwrap_or_else(|e| e.into_inner());
        b.delays
            .iter()
            .find(|(name, value, _)| headers.get(name).is_some_and(|v| v == value.as_str()))
            .map(|(_, _, d)| *d)
    };
    if let Some(delay) = delay {
        // Recorded when it came, answered after the delay.
        record(&state, path, headers, body, 200);
        tokio::time::sleep(delay).await;
        return StatusCode::OK;
    }
    let mut b = state.lock().unwrap_or_else(|e| e.into_inner());
    let status = if b.flapping.contains(&path) {
        let failing = b.flap_state.entry(path.clone()).or_insert(true);
        *failing = !*failing;
        if *failing {
            500
        } else {
            200
        }
    } else {
        b.status.get(&path).copied().unwrap_or(b.default_status)
    };
    drop(b);
    record(&state, path, headers, body, status);
    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn record(state: &Mutex<Behaviour>, path: String, headers: HeaderMap, body: Bytes, status: u16) {
    let checker = headers
        .get("x-weir-checker")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .hits
        .push(Hit {
            path,
            checker,
            at: Instant::now(),
            status,
            headers,
            body,
        });
}

impl HttpInstance {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Behaviour {
            default_status: 200,
            ..Behaviour::default()
        }));
        let app = Router::new().fallback(answer).with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { addr, state, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Behaviour) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Answers `path` with `status` from now on.
    pub fn set_status(&self, path: &str, status: u16) {
        self.with(|b| {
            b.flapping.remove(path);
            b.status.insert(path.to_owned(), status);
        });
    }

    /// Answers `path` with 500 and 200 in turn.
    pub fn flap(&self, path: &str) {
        self.with(|b| {
            b.flapping.insert(path.to_owned());
        });
    }

    /// Answers requests whose `header` is `value` with 200 only after
    /// `delay` (recording them when they come).
    pub fn delay_when(&self, header: &str, value: &str, delay: Duration) {
        self.with(|b| {
            b.delays.push((header.to_owned(), value.to_owned(), delay));
        });
    }

    /// Answers every request at once again.
    pub fn clear_delays(&self) {
        self.with(|b| b.delays.clear());
    }

    /// Every request so far.
    pub fn hits(&self) -> Vec<Hit> {
        self.with(|b| b.hits.clone())
    }

    /// Requests to `path` since `since`.
    pub fn hits_since(&self, path: &str, since: Instant) -> Vec<Hit> {
        self.with(|b| {
            b.hits
                .iter()
                .filter(|h| h.path == path && h.at >= since)
                .cloned()
                .collect()
        })
    }
}

impl Drop for HttpInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Default)]
struct Deliveries {
    received: Vec<DeliverRequest>,
    /// What `Deliver` answers; OK when none.
    refusal: Option<tonic::Status>,
}

#[derive(Debug, Clone)]
struct Recorder(Arc<Mutex<Deliveries>>);

#[tonic::async_trait]
impl Subscriber for Recorder {
    async fn deliver(
        &self,
        request: tonic::Request<DeliverRequest>,
    ) -> Result<tonic::Response<DeliverResponse>, tonic::Status> {
        let mut d = self.0.lock().unwrap_or_else(|e| e.into_inner());
        d.received.push(request.into_inner());
        match &d.refusal {
            Some(status) => Err(status.clone()),
            None => Ok(tonic::Response::new(DeliverResponse {})),
        }
    }
}

/// A gRPC server on loopback implementing `weir.events.v1.Subscriber`
/// (register it with `PROTOCOL_GRPC`): records every `DeliverRequest`
/// and answers OK, or the status the test sets.
#[derive(Debug)]
pub struct SubscriberInstance {
    addr: SocketAddr,
    state: Arc<Mutex<Deliveries>>,
    task: JoinHandle<()>,
}

impl SubscriberInstance {
    pub async fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(Deliveries::default()));
        let server = SubscriberServer::new(Recorder(state.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Self { addr, state, task })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn with<T>(&self, f: impl FnOnce(&mut Deliveries) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Answers `Deliver` with `status` from now on (`None`: OK).
    pub fn refuse_with(&self, status: Option<tonic::Status>) {
        self.with(|d| d.refusal = status);
    }

    /// Every delivery so far, refused ones included.
    pub fn deliveries(&self) -> Vec<DeliverRequest> {
        self.with(|d| d.received.clone())
    }
}

impl Drop for SubscriberInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A gRPC server on loopback with the standard health service: unary
/// `Check` and server-streaming `Watch` (register it with
/// `PROTOCOL_GRPC`). `service` is SERVING at start.
#[derive(Debug)]
pub struct HealthInstance {
    addr: SocketAddr,
    reporter: tonic_health::server::HealthReporter,
    task: JoinHandle<()>,
}

impl HealthInstance {
    pub async fn start(service: &str) -> Result<Self> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(service, tonic_health::ServingStatus::Serving)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        Ok(Self {
            addr,
            reporter,
            task,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Sets `service`'s status (watchers get it).
    pub async fn set(&self, service: &str, status: tonic_health::ServingStatus) {
        self.reporter.set_service_status(service, status).await;
    }
}

impl Drop for HealthInstance {
    fn drop(&mut self) {
        self.task.abort();
    }
}
