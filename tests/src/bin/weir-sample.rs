//! `weir-sample`: a sample service for the quickstart and the end-to-end
//! tests.
//!
//! It serves HTTP, answers every event (`POST /...`) with 200 and a small
//! JSON body naming itself, counts what it received (`GET /stats`), and
//! registers itself as an ephemeral instance, deregistering on SIGTERM or
//! Ctrl-C. `--fail-every N` answers every Nth event 503 and `--delay-ms`
//! answers late, for an instance that fails now and then or is slow;
//! `POST /outage?ms=N` makes it answer every event 503 for the next N ms
//! (at most 10 minutes), an outage to trigger by hand.
//! `--topic NAME` (repeatable) subscribes it to a topic: the agents
//! deliver what is published there to `/`, counted like any event. With
//! `--emit-to` it also sends CloudEvents (binary mode) to a
//! service through an agent's ingress, at a fixed rate, and every
//! `--report-every` seconds prints one line saying which instances
//! answered (from their JSON answers) and why the rest failed: by the
//! agent's `weir-reason` header, else `http-<status>`, `timeout` (no
//! answer in 5 s) or `agent-unreachable`, and the p50 and p99 time to
//! an answer.
//!
//! ```text
//! weir-sample --service orders --instance-id orders-a1 --zone a --registry http://127.0.0.1:7070
//! weir-sample --service checkout --instance-id checkout-a1 --zone a \
//!     --emit-to orders --agent http://127.0.0.1:7080 --rate 20
//! ```
//!
//! Stdout carries the ready line first (`weir-sample ready service=..
//! instance=.. addr=..`), then the emitter's report lines; logs go to
//! stderr.

use std::{
    collections::BTreeMap,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use axum::{
    body::Bytes,
    extract::State,
    http::{header, HeaderMap, Method, StatusCode},
    routing::get,
    Json, Router,
};
use clap::Parser;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Uri};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::watch, time::MissedTickBehavior};
use weir_client::{Client, Instance, Protocol, DEFAULT_ENDPOINT};
use weir_core::{logging::LogFormat, signal::shutdown_signal};

/// How long one event may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// After deregistering, how long the instance keeps answering: agents
/// route to it until the deletion reaches them.
const DRAIN_AFTER_DEREGISTER: Duration = Duration::from_millis(500);
/// How long the HTTP server may take to finish once told to stop.
const SERVER_STOP: Duration = Duration::from_secs(5);
/// Largest answer body read from an instance.
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Distinct keys a [`Tally`] keeps; the rest are counted under `(other)`.
const MAX_KEYS: usize = 64;
/// Latencies an emitter keeps per report window.
const MAX_LATENCIES: usize = 100_000;
/// Highest `--rate`.
const MAX_RATE: f64 = 10_000.0;

#[derive(Debug, Parser)]
#[command(
    name = "weir-sample",
    version,
    about = "A sample Weir service: answers events, registers itself, optionally emits CloudEvents through an agent"
)]
struct Args {
    /// The service this instance belongs to.
    #[arg(long)]
    service: String,
    /// This instance's id (default: the service name and random digits).
    #[arg(long)]
    instance_id: Option<String>,
    /// The instance's zone (its failure domain).
    #[arg(long, default_value = "")]
    zone: String,
    /// The node named in answers (default: the zone).
    #[arg(long)]
    node: Option<String>,
    /// Namespace to register in.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Address to listen on; registered as the instance's host, so agents
    /// must reach it there.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    host: IpAddr,
    /// Port to listen on (0: a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Where the `weir.registry.v1.Registry` API is served (the control
    /// plane today; the node's agent once it serves registrations).
    /// Several comma-separated replicas fail over.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_ENDPOINT)]
    registry: Vec<String>,
    /// The registration's TTL in seconds, renewed in the background.
    #[arg(long, default_value_t = 10)]
    ttl: u32,
    /// A topic this instance subscribes to (`Instance.topics`): the agents
    /// deliver what is published to it at `/`. Repeat for more.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Send events to this service (through `--agent`).
    #[arg(long, requires = "agent")]
    emit_to: Option<String>,
    /// The agent's event ingress, e.g. http://127.0.0.1:7080.
    #[arg(long, requires = "emit_to")]
    agent: Option<String>,
    /// Events per second, sent one at a time (a slow answer delays the
    /// next).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Stop after this many events, then exit (non-zero if any failed);
    /// 0 = until stopped.
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Seconds between report lines.
    #[arg(long, default_value_t = 5)]
    report_every: u64,
    /// Answer every Nth event with 503 instead of 200 (0: never): an
    /// instance that fails now and then.
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Answer each event this many milliseconds late: a slow instance.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Log format (logs go to stderr): text or json.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

/// Counts by name, at most [`MAX_KEYS`] names (then `(other)`), in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Tally(BTreeMap<String, u64>);

impl Tally {
    fn add(&mut self, key: &str, n: u64) {
        if let Some(count) = self.0.get_mut(key) {
            *count += n;
        } else if self.0.len() < MAX_KEYS {
            self.0.insert(key.to_owned(), n);
        } else {
            *self.0.entry("(other)".to_owned()).or_default() += n;
        }
    }

    fn total(&self) -> u64 {
        self.0.values().sum()
    }

    fn to_json(&self) -> Value {
        Value::Object(self.0.iter().map(|(k, n)| (k.clone(), json!(n))).collect())
    }

    /// `a=1 b=2`.
    fn pairs(&self) -> String {
        self.0
            .iter()
            .map(|(k, n)| format!("{k}={n}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// What the instance received.
#[derive(Debug, Default)]
struct Received {
    events: u64,
    by_source: Tally,
    by_type: Tally,
}

/// What happened to the events one emitter sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Sent {
    /// Answered 2xx, by the instance named in the answer.
    ok: Tally,
    /// Not answered 2xx, by `weir-reason` (or what else went wrong).
    failed: Tally,
    /// Time to each answer, in microseconds (the first [`MAX_LATENCIES`]).
    latencies_us: Vec<u64>,
}

impl Sent {
    fn took(&mut self, elapsed: Duration) {
        if self.latencies_us.len() < MAX_LATENCIES {
            self.latencies_us
                .push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        }
    }

    /// ` p50=1.2ms p99=20.5ms`, or nothing without answers.
    fn latency(&self) -> String {
        if self.latencies_us.is_empty() {
            return String::new();
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let at = |q: f64| {
            let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
            sorted[i] as f64 / 1000.0
        };
        format!(" p50={:.1}ms p99={:.1}ms", at(0.50), at(0.99))
    }

    fn record(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Answered { instance } => self.ok.add(instance, 1),
            Outcome::Failed { reason } => self.failed.add(reason, 1),
        }
    }

    fn sent(&self) -> u64 {
        self.ok.total() + self.failed.total()
    }

    /// `sent=10 ok=9 (orders-a1=5 orders-b1=4) failed=1 (no-endpoint=1)`.
    fn summary(&self) -> String {
        let mut line = format!("sent={} ok={}", self.sent(), self.ok.total());
        if !self.ok.0.is_empty() {
            line.push_str(&format!(" ({})", self.ok.pairs()));
        }
        line.push_str(&format!(" failed={}", self.failed.total()));
        if !self.failed.0.is_empty() {
            line.push_str(&format!(" ({})", self.failed.pairs()));
        }
        line.push_str(&self.latency());
        line
    }
}

/// The outcome of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Answered { instance: String },
    Failed { reason: String },
}

/// This instance: who it is and what it counted.
#[derive(Debug)]
struct Sample {
    service: String,
    instance: String,
    node: String,
    zone: String,
    received: Mutex<Received>,
    /// `--fail-every` and `--delay-ms`.
    fail_every: u64,
    delay: Duration,
    /// Until when every event is answered 503 (`POST /outage`).
    outage_until: Mutex<Option<tokio::time::Instant>>,
    /// Every event this instance emitted so far (`None`: not an emitter).
    sent: Mutex<Option<(String, Sent)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while counting leaves counts that are still counts.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sample {
    fn identity(&self) -> Value {
        json!({"service": self.service, "instance": self.instance, "node": self.node})
    }
}

/// Prints one line on stdout; a closed stdout is not worth dying for.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// `source` and `type` of an event: `ce-*` headers (binary mode) or the
/// members of a structured-mode body.
fn event_attributes(headers: &HeaderMap, body: &[u8]) -> (String, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let structured = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/cloudevents+json"));
    let (source, kind) = if structured {
        let event: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let member = |name: &str| event.get(name).and_then(Value::as_str).map(str::to_owned);
        (member("source"), member("type"))
    } else {
        (header("ce-source"), header("ce-type"))
    };
    (
        source.unwrap_or_else(|| "-".to_owned()),
        kind.unwrap_or_else(|| "-".to_owned()),
    )
}

async fn answer(
    State(sample): State<Arc<Sample>>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Json<Value>) {
    let mut status = StatusCode::OK;
    if method == Method::POST {
        let (source, kind) = event_attributes(&headers, &body);
        let n = {
            let mut r = lock(&sample.received);
            r.events += 1;
            r.by_source.add(&source, 1);
            r.by_type.add(&kind, 1);
            r.events
        };
        let outage = lock(&sample.outage_until).is_some_and(|t| tokio::time::Instant::now() < t);
        if outage || (sample.fail_every > 0 && n % sample.fail_every == 0) {
            status = StatusCode::SERVICE_UNAVAILABLE;
        }
        if !sample.delay.is_zero() {
            tokio::time::sleep(sample.delay).await;
        }
    }
    (status, Json(sample.identity()))
}

async fn stats(State(sample): State<Arc<Sample>>) -> Json<Value> {
    let mut body = sample.identity();
    body["zone"] = json!(sample.zone);
    {
        let r = lock(&sample.received);
        body["received"] = json!(r.events);
        body["by_source"] = r.by_source.to_json();
        body["by_type"] = r.by_type.to_json();
    }
    if let Some((target, sent)) = &*lock(&sample.sent) {
        body["emitted"] = json!({
            "to": target,
            "sent": sent.sent(),
            "ok": sent.ok.total(),
            "by_instance": sent.ok.to_json(),
            "failed": sent.failed.total(),
            "by_reason": sent.failed.to_json(),
        });
    }
    Json(body)
}

/// Longest outage `POST /outage` starts.
const MAX_OUTAGE_MS: u64 = 600_000;

/// `POST /outage?ms=N`: every event is answered 503 for the next N ms.
async fn outage(State(sample): State<Arc<Sample>>, uri: Uri) -> (StatusCode, Json<Value>) {
    let ms = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|pair| pair.strip_prefix("ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|ms| (1..=MAX_OUTAGE_MS).contains(ms));
    let Some(ms) = ms else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("ms must be 1-{MAX_OUTAGE_MS}: POST /outage?ms=N")})),
        );
    };
    *lock(&sample.outage_until) = Some(tokio::time::Instant::now() + Duration::from_millis(ms));
    tracing::info!(ms, "outage: answering every event 503");
    (StatusCode::OK, Json(json!({"outage_ms": ms})))
}

fn router(sample: Arc<Sample>) -> Router {
    Router::new()
        .route("/stats", get(stats))
        .route("/outage", axum::routing::post(outage))
        .fallback(answer)
        .with_state(sample)
}

/// What an emitter sends, and where.
#[derive(Debug, Clone)]
struct EmitConfig {
    target: String,
    uri: Uri,
    rate: f64,
    count: u64,
    report_every: Duration,
}

/// `http://host:port` (a bare `host:port` is taken as http) plus the
/// target's events path.
fn events_uri(agent: &str, target: &str) -> Result<Uri> {
    let agent = agent.trim().trim_end_matches('/');
    let base = if agent.contains("://") {
        agent.to_owned()
    } else {
        format!("http://{agent}")
    };
    let uri: Uri = format!("{base}/v1/services/{target}/events")
        .parse()
        .with_context(|| format!("--agent {agent:?} is not an http://host:port address"))?;
    if uri.scheme_str() != Some("http") {
        bail!(
            "--agent {agent:?}: only http:// is supported (the agent's ingress speaks plain HTTP)"
        );
    }
    Ok(uri)
}

impl Args {
    fn emit_config(&self) -> Result<Option<EmitConfig>> {
        let (Some(target), Some(agent)) = (&self.emit_to, &self.agent) else {
            return Ok(None);
        };
        weir_core::validate::dns_label("emit_to", target)
            .map_err(|e| anyhow::anyhow!("--emit-to: {e}"))?;
        if !(self.rate > 0.0 && self.rate <= MAX_RATE) {
            bail!(
                "--rate must be above 0 and at most {MAX_RATE} (got {})",
                self.rate
            );
        }
        if self.report_every == 0 {
            bail!("--report-every must be at least 1 second");
        }
        Ok(Some(EmitConfig {
            target: target.clone(),
            uri: events_uri(agent, target)?,
            rate: self.rate,
            count: self.count,
            report_every: Duration::from_secs(self.report_every),
        }))
    }
}

/// Sends events and tells how they went.
#[derive(Debug)]
struct Emitter {
    http: HttpClient<HttpConnector, Full<Bytes>>,
    config: EmitConfig,
    /// `ce-source`.
    source: String,
    /// `ce-type`.
    kind: String,
    /// Makes `ce-id` unique across runs of the same instance id.
    run: u32,
    instance: String,
    /// This service, named to the agent (`weir-source`) for telemetry.
    service: String,
}

impl Emitter {
    fn new(config: EmitConfig, service: &str, instance: &str) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            http: HttpClient::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(90))
                .build(connector),
            config,
            source: format!("/{service}/{instance}"),
            kind: format!("sample.{service}.tick"),
            run: rand::random(),
            instance: instance.to_owned(),
            service: service.to_owned(),
        }
    }

    fn request(&self, seq: u64) -> Result<Request<Full<Bytes>>> {
        let body = json!({"seq": seq, "from": self.instance}).to_string();
        Ok(Request::post(self.config.uri.clone())
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("{}-{:08x}-{seq}", self.instance, self.run))
            .header("ce-source", &self.source)
            .header("ce-type", &self.kind)
            .header("weir-source", &self.service)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?)
    }

    /// Sends event `seq`; who answered it, or why it failed.
    async fn send(&self, seq: u64) -> Outcome {
        let failed = |reason: &str| Outcome::Failed {
            reason: reason.to_owned(),
        };
        let request = match self.request(seq) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the event");
                return failed("bad-request");
            }
        };
        let exchange = async {
            let response = self.http.request(request).await?;
            let status = response.status();
            let reason = response
                .headers()
                .get("weir-reason")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, reason, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Err(_) => failed("timeout"),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, uri = %self.config.uri, "the agent could not be reached");
                failed("agent-unreachable")
            }
            Ok(Ok((status, reason, body))) => {
                if !status.is_success() {
                    return match reason {
                        Some(r) => failed(&r),
                        None => failed(&format!("http-{}", status.as_u16())),
                    };
                }
                let instance = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v.get("instance").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_else(|| "(unnamed)".to_owned());
                Outcome::Answered { instance }
            }
        }
    }

    /// Sends at the configured rate until `count` events are sent (forever
    /// when 0), one at a time, reporting every `report_every`. Totals go
    /// into `sample` as they come.
    async fn run(self, sample: Arc<Sample>) {
        let c = &self.config;
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / c.rate));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let start = tokio::time::Instant::now() + c.report_every;
        let mut report = tokio::time::interval_at(start, c.report_every);
        let mut window = Sent::default();
        let mut seq = 0u64;
        let report_line = |window: &Sent| {
            format!(
                "weir-sample report instance={} to={} {}",
                self.instance,
                c.target,
                window.summary()
            )
        };
        while c.count == 0 || seq < c.count {
            tokio::select! {
                _ = tick.tick() => {
                    seq += 1;
                    let sent_at = std::time::Instant::now();
                    let outcome = self.send(seq).await;
                    window.took(sent_at.elapsed());
                    window.record(&outcome);
                    if let Some((_, total)) = &mut *lock(&sample.sent) {
                        total.record(&outcome);
                    }
                }
                _ = report.tick() => {
                    say(&report_line(&window));
                    window = Sent::default();
                }
            }
        }
        if window.sent() > 0 {
            say(&report_line(&window));
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    weir_core::logging::init(args.log_format);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir-sample: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let emit = args.emit_config()?;

    let listener = TcpListener::bind(SocketAddr::new(args.host, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    if addr.ip().is_unspecified() {
        bail!(
            "--host {}: give the address agents reach this instance at; it is registered as is",
            args.host
        );
    }

    let client = Client::connect(&args.registry)
        .await
        .context("--registry")?;
    let node = args.node.clone().unwrap_or_else(|| {
        if args.zone.is_empty() {
            "local".to_owned()
        } else {
            args.zone.clone()
        }
    });
    // Named before registering: answers carry it from the first one.
    let id = args.instance_id.clone().unwrap_or_else(|| {
        format!(
            "{}-{:012x}",
            args.service,
            rand::random::<u64>() & 0xffff_ffff_ffff
        )
    });
    let instance = Instance {
        namespace: args.namespace.clone(),
        service: args.service.clone(),
        instance_id: id.clone(),
        host: addr.ip().to_string(),
        port: u32::from(addr.port()),
        protocol: Protocol::Http as i32,
        zone: args.zone.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        metadata: [
            ("node".to_owned(), node.clone()),
            ("sample".to_owned(), "weir-sample".to_owned()),
        ]
        .into(),
        ephemeral: true,
        ttl_seconds: args.ttl,
        topics: args.topics.clone(),
        ..Instance::default()
    };

    // Serve first, so the instance answers as soon as it is registered.
    let sample = Arc::new(Sample {
        service: args.service.clone(),
        instance: id.clone(),
        node,
        zone: args.zone.clone(),
        received: Mutex::default(),
        sent: Mutex::new(emit.as_ref().map(|e| (e.target.clone(), Sent::default()))),
        fail_every: args.fail_every,
        delay: Duration::from_millis(args.delay_ms),
        outage_until: Mutex::new(None),
    });
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let app = router(sample.clone());
    let mut server = tokio::spawn(async move {
        let stopped = async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });

    let registration = match client.register_and_keep_alive(instance).await {
        Ok(r) => r,
        Err(e) => {
            let _ = stop_tx.send(true);
            let _ = tokio::time::timeout(SERVER_STOP, &mut server).await;
            return Err(e)
                .with_context(|| format!("cannot register at {}", args.registry.join(",")));
        }
    };
    say(&format!(
        "weir-sample ready service={} instance={id} addr={addr}",
        args.service
    ));
    tracing::info!(service = %args.service, instance = %id, %addr, registry = %args.registry.join(","), "serving and registered");

    let mut emitter = emit.map(|config| {
        tracing::info!(to = %config.target, uri = %config.uri, rate = config.rate, count = config.count, "emitting events");
        tokio::spawn(Emitter::new(config, &args.service, &id).run(sample.clone()))
    });
    let emitting = async {
        match &mut emitter {
            Some(task) => {
                let _ = task.await;
            }
            None => std::future::pending().await,
        }
    };
    let server_ended = tokio::select! {
        () = shutdown_signal() => false,
        () = emitting => false,
        _ = &mut server => true,
    };
    if let Some(task) = emitter {
        // Stopped by a signal: no more events (a no-op once it finished).
        task.abort();
    }

    let mut failed = 0;
    if let Some((target, total)) = &*lock(&sample.sent) {
        say(&format!(
            "weir-sample total instance={id} to={target} {}",
            total.summary()
        ));
        failed = total.failed.total();
    }
    match registration.deregister().await {
        Ok(_) => tracing::info!(instance = %id, "deregistered"),
        Err(e) => {
            tracing::warn!(instance = %id, error = %e, "deregistration failed; the lease will expire")
        }
    }
    if server_ended {
        bail!("the HTTP server stopped on its own");
    }
    tokio::time::sleep(DRAIN_AFTER_DEREGISTER).await;
    let _ = stop_tx.send(true);
    if tokio::time::timeout(SERVER_STOP, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("the HTTP server did not stop in time");
    }
    if failed > 0 {
        bail!("{failed} of the events sent failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_caps_its_keys_and_sums() {
        let mut t = Tally::default();
        for i in 0..MAX_KEYS + 5 {
            t.add(&format!("k{i:03}"), 1);
        }
        t.add("k000", 2);
        assert_eq!(t.0.len(), MAX_KEYS + 1);
        assert_eq!(t.0["(other)"], 5);
        assert_eq!(t.0["k000"], 3);
        assert_eq!(t.total(), (MAX_KEYS + 5 + 2) as u64);
    }

    fn sample(fail_every: u64, delay_ms: u64) -> Arc<Sample> {
        Arc::new(Sample {
            service: "orders".into(),
            instance: "orders-a1".into(),
            node: "a".into(),
            zone: "a".into(),
            received: Mutex::default(),
            fail_every,
            delay: Duration::from_millis(delay_ms),
            sent: Mutex::new(None),
            outage_until: Mutex::new(None),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_answers_every_event_503_until_it_ends() {
        let s = sample(0, 0);
        let post = |s: &Arc<Sample>| {
            answer(
                State(s.clone()),
                Method::POST,
                HeaderMap::new(),
                Bytes::new(),
            )
        };
        let bad = outage(State(s.clone()), "/outage?ms=0".parse().expect("uri")).await;
        assert_eq!(bad.0, StatusCode::BAD_REQUEST);
        let ok = outage(State(s.clone()), "/outage?ms=500".parse().expect("uri")).await;
        assert_eq!(ok.0, StatusCode::OK);
        assert_eq!(post(&s).await.0, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::advance(Duration::from_millis(499)).await;
        assert_eq!(post(&s).await.0, StatusCode::SERVICE_UNAVAILABLE);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(post(&s).await.0, StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn every_nth_event_fails_and_answers_come_late_when_asked() {
        let s = sample(3, 20);
        let mut statuses = Vec::new();
        for _ in 0..6 {
            let start = tokio::time::Instant::now();
            let (status, _) = answer(
                State(s.clone()),
                Method::POST,
                HeaderMap::new(),
                Bytes::new(),
            )
            .await;
            assert!(start.elapsed() >= Duration::from_millis(20));
            statuses.push(status.as_u16());
        }
        assert_eq!(statuses, [200, 200, 503, 200, 200, 503]);
        let (status, _) = answer(
            State(sample(0, 0)),
            Method::POST,
            HeaderMap::new(),
            Bytes::new(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn the_report_gives_latency_percentiles() {
        let mut s = Sent::default();
        assert_eq!(s.latency(), "");
        for ms in 1..=100 {
            s.took(Duration::from_millis(ms));
        }
        assert_eq!(s.latency(), " p50=50.0ms p99=99.0ms");
    }

    #[test]
    fn a_summary_names_instances_and_reasons() {
        let mut s = Sent::default();
        for o in [
            Outcome::Answered {
                instance: "orders-b1".into(),
            },
            Outcome::Answered {
                instance: "orders-a1".into(),
            },
            Outcome::Answered {
                instance: "orders-a1".into(),
            },
            Outcome::Failed {
                reason: "no-endpoint".into(),
            },
        ] {
            s.record(&o);
        }
        assert_eq!(
            s.summary(),
            "sent=4 ok=3 (orders-a1=2 orders-b1=1) failed=1 (no-endpoint=1)"
        );
        assert_eq!(Sent::default().summary(), "sent=0 ok=0 failed=0");
    }

    #[test]
    fn the_agent_address_becomes_the_events_uri() {
        let uri = events_uri("127.0.0.1:7080/", "orders").expect("valid");
        assert_eq!(
            uri.to_string(),
            "http://127.0.0.1:7080/v1/services/orders/events"
        );
        assert!(events_uri("https://127.0.0.1:7080", "orders").is_err());
        assert!(events_uri("http://bad host", "orders").is_err());
    }

    #[test]
    fn attributes_come_from_headers_or_a_structured_body() {
        let mut h = HeaderMap::new();
        h.insert("ce-source", "/checkout/c1".parse().expect("value"));
        h.insert("ce-type", "sample.checkout.tick".parse().expect("value"));
        assert_eq!(
            event_attributes(&h, b""),
            ("/checkout/c1".into(), "sample.checkout.tick".into())
        );
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/cloudevents+json; charset=utf-8"
                .parse()
                .expect("value"),
        );
        assert_eq!(
            event_attributes(&h, br#"{"source":"/s","type":"t","id":"1"}"#),
            ("/s".into(), "t".into())
        );
        assert_eq!(event_attributes(&h, b"{"), ("-".into(), "-".into()));
    }
}
