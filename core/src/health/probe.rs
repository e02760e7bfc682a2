//! Running one check: HTTP GET, TCP connect, or gRPC `grpc.health.v1`.
//!
//! The checker reaches the network only through a [`Prober`], so its loop
//! can be tested with a fake; [`NetProber`] is the real one.

use std::{fmt, time::Duration};

use async_trait::async_trait;
use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{net::TcpStream, time::Instant};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use super::{
    hysteresis::Outcome,
    spec::{CheckSpec, Probe},
};

/// What one check saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeResult {
    pub outcome: Outcome,
    /// Human-readable, e.g. "HTTP 500 from GET /healthz".
    pub output: String,
    pub latency: Duration,
}

/// Makes the probe of each check: the seam between the checker loop and
/// the network.
pub trait Prober: Send + Sync + fmt::Debug + 'static {
    /// Called when a check starts (from within the runtime); the probe it
    /// returns runs every round of that check, so it may keep a connection
    /// from one round to the next.
    fn start(&self, spec: &CheckSpec, checked_by: &str) -> Box<dyn CheckProbe>;
}

/// One check's probe, run once per round.
#[async_trait]
pub trait CheckProbe: Send + fmt::Debug {
    /// Runs the check once, bounded by the spec's timeout.
    async fn run(&mut self) -> ProbeResult;
}

/// The real prober: HTTP, TCP and gRPC over the network (see [`run`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct NetProber;

impl Prober for NetProber {
    fn start(&self, spec: &CheckSpec, checked_by: &str) -> Box<dyn CheckProbe> {
        let grpc = match spec.probe {
            Probe::Grpc { .. } => grpc_channel(spec),
            _ => None,
        };
        Box::new(NetProbe {
            spec: spec.clone(),
            checked_by: checked_by.to_owned(),
            grpc,
        })
    }
}

/// A check's network probe: the spec, and for gRPC checks one channel kept
/// for the life of the check.
#[derive(Debug)]
struct NetProbe {
    spec: CheckSpec,
    checked_by: String,
    grpc: Option<tonic::transport::Channel>,
}

#[async_trait]
impl CheckProbe for NetProbe {
    async fn run(&mut self) -> ProbeResult {
        run(&self.spec, self.grpc.as_ref(), &self.checked_by).await
    }
}

/// Longest output kept (a check's error text can be long).
const MAX_OUTPUT: usize = 256;

/// Runs the check once, bounded by its timeout. `grpc` is a reusable channel
/// for gRPC checks (created lazily by the caller), so a gRPC check is one
/// RPC, not a new connection each time.
/// HTTP checks send `checked_by` in an `x-weir-checker` header, so an
/// instance's logs say who checks it.
pub async fn run(
    spec: &CheckSpec,
    grpc: Option<&tonic::transport::Channel>,
    checked_by: &str,
) -> ProbeResult {
    let start = Instant::now();
    let attempt = async {
        match &spec.probe {
            Probe::Tcp => tcp(spec).await,
            Probe::Http { path, expected } => http(spec, path, *expected, checked_by).await,
            Probe::Grpc { service } => match grpc {
                Some(channel) => grpc_check(channel.clone(), service).await,
                None => (Outcome::Fail, "no gRPC channel".to_owned()),
            },
        }
    };
    let (outcome, output) = match tokio::time::timeout(spec.timeout, attempt).await {
        Ok(r) => r,
        Err(_) => (
            Outcome::Fail,
            format!("timed out after {} ms", spec.timeout.as_millis()),
        ),
    };
    ProbeResult {
        outcome,
        output: truncate(output),
        latency: start.elapsed(),
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_OUTPUT {
        let mut end = MAX_OUTPUT;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn authority(spec: &CheckSpec) -> String {
    if spec.host.contains(':') {
        format!("[{}]:{}", spec.host, spec.port)
    } else {
        format!("{}:{}", spec.host, spec.port)
    }
}

async fn connect(spec: &CheckSpec) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(authority(spec))
        .await
        .map_err(|e| format!("connect {}: {e}", authority(spec)))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn tcp(spec: &CheckSpec) -> (Outcome, String) {
    match connect(spec).await {
        Ok(_) => (Outcome::Pass, format!("TCP connect {} ok", authority(spec))),
        Err(e) => (Outcome::Fail, e),
    }
}

async fn http(
    spec: &CheckSpec,
    path: &str,
    expected: (u16, u16),
    checked_by: &str,
) -> (Outcome, String) {
    let stream = match connect(spec).await {
        Ok(s) => s,
        Err(e) => return (Outcome::Fail, e),
    };
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    {
        Ok(pair) => pair,
        Err(e) => return (Outcome::Fail, format!("HTTP handshake: {e}")),
    };
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, authority(spec))
        .header(hyper::header::USER_AGENT, "weir-health-check")
        .header(hyper::header::CONNECTION, "close")
        .header("x-weir-checker", checked_by)
        .body(Empty::<Bytes>::new());
    let request = match request {
        Ok(r) => r,
        Err(e) => return (Outcome::Fail, format!("bad request for {path}: {e}")),
    };
    let result = sender.send_request(request).await;
    driver.abort();
    match result {
        Ok(response) => {
            let code = response.status().as_u16();
            let outcome = if (expected.0..=expected.1).contains(&code) {
                Outcome::Pass
            } else if code == 429 {
                Outcome::Warn
            } else {
                Outcome::Fail
            };
            (outcome, format!("HTTP {code} from GET {path}"))
        }
        Err(e) => (Outcome::Fail, format!("GET {path}: {e}")),
    }
}

async fn grpc_check(channel: tonic::transport::Channel, service: &str) -> (Outcome, String) {
    let mut client = HealthClient::new(channel);
    let named = if service.is_empty() {
        "(server)"
    } else {
        service
    };
    match client
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await
    {
        Ok(r) => match ServingStatus::try_from(r.into_inner().status) {
            Ok(ServingStatus::Serving) => (Outcome::Pass, format!("gRPC health {named}: SERVING")),
            Ok(other) => (
                Outcome::Fail,
                format!("gRPC health {named}: {}", other.as_str_name()),
            ),
            Err(_) => (
                Outcome::Fail,
                format!("gRPC health {named}: unknown status"),
            ),
        },
        Err(status) => (
            Outcome::Fail,
            format!(
                "gRPC health {named}: {:?} {}",
                status.code(),
                status.message()
            ),
        ),
    }
}

/// A lazily connecting channel for gRPC checks of `spec`.
pub fn grpc_channel(spec: &CheckSpec) -> Option<tonic::transport::Channel> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", authority(spec))).ok()?;
    Some(
        endpoint
            .connect_timeout(spec.timeout)
            .timeout(spec.timeout)
            .connect_lazy(),
    )
}
