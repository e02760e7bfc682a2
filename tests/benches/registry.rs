//! Registry benchmark: Weir's control plane next to raw etcd, in one run.
//!
//! ```text
//! CARGO_TARGET_DIR=target/bench cargo bench -p weir-tests --bench registry
//! ```
//!
//! One private etcd (fresh data dir, auto-compaction on) and one real
//! `weir-control-plane` process (release build, built by the bench toolkit
//! into the same target dir before it starts), all on loopback. With
//! `WEIR_BENCH_BASE=<git rev>` the whole run is repeated in interleaved
//! rounds on that revision's control plane and this checkout's (see
//! `weir_tests::bench`), each round on a fresh etcd, and the Weir figures
//! of both are compared at the end.
//!
//! Throughput: Weir and raw etcd at the same concurrency, [`CONCURRENCY`]
//! operations in flight, spread round-robin over [`CHANNELS`] gRPC
//! connections to the control plane or [`CHANNELS`] etcd clients (one
//! connection each). The figures compared with each other are measured
//! interleaved ([`ROUNDS`] slices each, after a warm-up), so load from
//! outside the benchmark hits both sides alike.
//!
//! Latency: one write at a time; each watcher task timestamps the event, and
//! a figure is the time from the write call returning until a watcher saw
//! it (0 if it saw it before the call returned). Weir and raw samples
//! alternate. See `docs/benchmarks.md` for what each figure means.
//!
//! Knobs (environment): `WEIR_BENCH_SECS` (measured seconds per throughput
//! figure, default 4), `WEIR_BENCH_SAMPLES` (sequential writes per latency
//! figure, default 300), `WEIR_BENCH_WATCHERS` (default 1000), and the
//! toolkit's `WEIR_BENCH_SKIP_BUILD=1` (use the binaries already built),
//! `WEIR_BENCH_BASE`, `WEIR_BENCH_ROUNDS`.

use std::{
    future::Future,
    path::Path,
    pin::Pin,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use weir_tests::bench::{
    self, env_num, loadavg, percentile, private_etcd, start_plane, Better, CpuMeter, CpuSecs,
    Figure,
};

use anyhow::{bail, Context, Result};
use etcd_client::{EventType as EtcdEventType, GetOptions, PutOptions, WatchOptions};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use weir_proto::registry::v1::{
    registry_client::RegistryClient, watch_response::Kind, EventType, GetServiceRequest,
    HealthStatus, HeartbeatRequest, Instance, InstanceRef, KeepAliveRequest, KeepAliveResponse,
    RegisterRequest, WatchRequest,
};
use weir_tests::{unique_prefix, Etcd};

/// Operations in flight during a throughput figure (Weir and raw etcd alike).
const CONCURRENCY: usize = 64;
/// gRPC connections to the control plane / etcd clients, used round-robin.
const CHANNELS: usize = 8;
/// Untimed run before each throughput figure.
const WARMUP: Duration = Duration::from_secs(1);
/// Each throughput figure is measured in this many slices, interleaved with
/// the figures it is compared with.
const ROUNDS: u32 = 4;
/// Lease TTL of every ephemeral registration: longer than the whole run, so
/// no lease expires (and no mass expiry disturbs a figure) while it runs.
const TTL_SECS: u32 = 600;
/// Instances renewed in the heartbeat figures (16 per worker).
const HEARTBEAT_INSTANCES: usize = 1024;
/// Instances of the service read in the discovery figures.
const READ_INSTANCES: usize = 10;
/// Instances named in one message of the batched KeepAlive figure.
const KEEPALIVE_BATCH: usize = 16;
const NAMESPACE: &str = "default";
/// Root of the raw etcd keys (outside the control plane's prefix).
const RAW_ROOT: &str = "/bench-raw";
/// A run (one binary, after the build) stops with an error past this.
const TIME_LIMIT: Duration = Duration::from_secs(600);

fn main() -> Result<()> {
    // Each run (this checkout's control plane, or base and this in
    // interleaved rounds) on a fresh etcd and control plane.
    bench::main("registry", |plan| async move {
        plan.measure(|r| async move {
            tokio::time::timeout(TIME_LIMIT, run_once(r.binary()))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("the benchmark took more than {TIME_LIMIT:?}; stopped")
                })?
        })
        .await
    })
}

// ---------------------------------------------------------------------------
// Setup

async fn weir_clients(endpoint: &str) -> Result<Vec<RegistryClient<Channel>>> {
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        // One Endpoint::connect = one HTTP/2 connection.
        let channel = Endpoint::from_shared(endpoint.to_owned())?
            .tcp_nodelay(true)
            .connect()
            .await?;
        clients.push(RegistryClient::new(channel));
    }
    Ok(clients)
}

async fn etcd_clients(etcd: &Etcd) -> Result<Vec<etcd_client::Client>> {
    let mut clients = Vec::new();
    for _ in 0..CHANNELS {
        // Each Client::connect opens its own connection.
        clients.push(etcd.client().await?);
    }
    Ok(clients)
}

fn instance(service: &str, id: &str, ephemeral: bool) -> Instance {
    Instance {
        namespace: NAMESPACE.into(),
        service: service.into(),
        instance_id: id.into(),
        host: "127.0.0.1".into(),
        port: 8080,
        version: "1.0.0".into(),
        zone: "zone-a".into(),
        metadata: [("env".to_string(), "bench".to_string())].into(),
        ephemeral,
        ttl_seconds: if ephemeral { TTL_SECS } else { 0 },
        ..Instance::default()
    }
}

/// The value raw etcd writes: the record Weir would store for the same
/// registration, so both write the same number of bytes.
fn raw_value(id: &str) -> Vec<u8> {
    Instance {
        status: HealthStatus::Passing as i32,
        registered_at_unix_ms: 1_700_000_000_000,
        lease_id: 0x7fff_ffff_ffff,
        ..instance("bench-reg", id, true)
    }
    .encode_to_vec()
}

fn instance_ref(service: &str, id: &str) -> InstanceRef {
    InstanceRef {
        namespace: NAMESPACE.into(),
        service: service.into(),
        instance_id: id.into(),
    }
}

// ---------------------------------------------------------------------------
// Throughput

type OpFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
/// One operation of worker `w`, its `seq`-th.
type Op = Arc<dyn Fn(usize, u64) -> OpFuture + Send + Sync>;

fn op<F, Fut>(f: F) -> Op
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    Arc::new(move |w, seq| Box::pin(f(w, seq)))
}

#[derive(Default)]
struct Load {
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    secs: f64,
    latencies: Vec<Duration>,
    cpu: CpuSecs,
}

impl Load {
    /// Operations (times `per_op`) per second.
    fn rate(&self, per_op: f64) -> f64 {
        self.ops as f64 * per_op / self.secs.max(1e-9)
    }

    /// Cores used on average: (etcd, control plane, load generator, other).
    fn cores(&self) -> (f64, f64, f64, f64) {
        let s = self.secs.max(1e-9);
        (
            self.cpu.etcd / s,
            self.cpu.plane / s,
            self.cpu.bench / s,
            self.cpu.other() / s,
        )
    }

    fn add(&mut self, other: Load) {
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.secs += other.secs;
        self.latencies.extend(other.latencies);
        self.cpu = self.cpu.plus(other.cpu);
    }
}

/// `CONCURRENCY` workers each run `op` back to back until `duration` is up;
/// the rate counts every operation that completed, over the time until the
/// last one did.
async fn run_load(duration: Duration, op: &Op, cpu: &CpuMeter) -> Result<Load> {
    let before = cpu.read();
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            let mut seq = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                match op(w, seq).await {
                    Ok(()) => latencies.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
                seq += 1;
            }
            (latencies, errors, first_error)
        }));
    }
    let mut load = Load::default();
    for task in tasks {
        let (latencies, errors, first_error) = task.await?;
        load.ops += latencies.len() as u64;
        load.latencies.extend(latencies);
        load.errors += errors;
        if load.first_error.is_none() {
            load.first_error = first_error;
        }
    }
    load.secs = start.elapsed().as_secs_f64();
    load.cpu = cpu.read().minus(before);
    Ok(load)
}

/// Measures the operations of one comparison, interleaved: each gets a
/// warm-up, then `ROUNDS` rounds run every operation for `total / ROUNDS`
/// in turn, so load from outside the benchmark that comes and goes hits
/// Weir and raw etcd alike.
async fn compare(
    group: &str,
    ops: &[(&str, Op)],
    total: Duration,
    cpu: &CpuMeter,
) -> Result<Vec<Load>> {
    eprintln!("{group}:");
    for (name, op) in ops {
        let warm = run_load(WARMUP, op, cpu).await?;
        if warm.ops == 0 {
            bail!(
                "{name}: no operation succeeded in the warm-up: {}",
                warm.first_error.unwrap_or_default()
            );
        }
    }
    let mut loads: Vec<Load> = ops.iter().map(|_| Load::default()).collect();
    for _ in 0..ROUNDS {
        for ((_, op), load) in ops.iter().zip(&mut loads) {
            load.add(run_load(total / ROUNDS, op, cpu).await?);
        }
    }
    for ((name, _), load) in ops.iter().zip(&mut loads) {
        load.latencies.sort();
        let (etcd, plane, bench, other) = load.cores();
        eprintln!(
            "  {name:<40} {:>9.0} ops/s  p50 {:>8}  p99 {:>8}  errors {}  cores: etcd {etcd:.2} weir {plane:.2} bench {bench:.2} other {other:.2}",
            load.rate(1.0),
            fmt_ms(percentile(&load.latencies, 0.50)),
            fmt_ms(percentile(&load.latencies, 0.99)),
            load.errors,
        );
        if let Some(e) = &load.first_error {
            eprintln!("    first error: {e}");
        }
    }
    Ok(loads)
}

/// Runs `f(i)` for i in 0..n with `CONCURRENCY` in flight.
async fn for_all<F, Fut, T>(n: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    futures::stream::iter((0..n).map(f))
        .buffered(CONCURRENCY)
        .try_collect()
        .await
}

/// One KeepAlive stream: requests out, answers in.
type KeepAliveStream = (
    mpsc::Sender<KeepAliveRequest>,
    tonic::Streaming<KeepAliveResponse>,
);

/// One KeepAlive stream per worker.
async fn open_keep_alives(
    weir: &[RegistryClient<Channel>],
) -> Result<Arc<Vec<Mutex<KeepAliveStream>>>> {
    let mut streams = Vec::new();
    for w in 0..CONCURRENCY {
        let (tx, rx) = mpsc::channel(4);
        let mut c = weir[w % CHANNELS].clone();
        let inbound = c.keep_alive(ReceiverStream::new(rx)).await?.into_inner();
        streams.push(Mutex::new((tx, inbound)));
    }
    Ok(Arc::new(streams))
}

// ---------------------------------------------------------------------------
// Latency

#[derive(Default)]
struct Latency {
    /// Every watcher's observation, from the write call returning.
    all: Vec<Duration>,
    /// Per registration: from the write call returning until the last
    /// watcher saw it.
    last: Vec<Duration>,
    /// Per registration: from the write call starting until the last
    /// watcher saw it (includes the write itself).
    last_from_start: Vec<Duration>,
    /// The write call itself.
    call: Vec<Duration>,
    /// Observations that arrived before the write call returned (counted as 0).
    early: usize,
}

impl Latency {
    fn finish(&mut self) {
        self.all.sort();
        self.last.sort();
        self.last_from_start.sort();
        self.call.sort();
    }

    fn describe(&self) -> String {
        format!(
            "every observation p50 {} p99 {}; last watcher p50 {} p99 {}; from call start, last watcher p99 {}; write call p50 {} p99 {}; {} of {} observations before the call returned",
            fmt_ms(percentile(&self.all, 0.5)),
            fmt_ms(percentile(&self.all, 0.99)),
            fmt_ms(percentile(&self.last, 0.5)),
            fmt_ms(percentile(&self.last, 0.99)),
            fmt_ms(percentile(&self.last_from_start, 0.99)),
            fmt_ms(percentile(&self.call, 0.5)),
            fmt_ms(percentile(&self.call, 0.99)),
            self.early,
            self.all.len(),
        )
    }
}

/// What watcher tasks report: (sample number, when it was seen).
type Seen = mpsc::UnboundedReceiver<(u64, Instant)>;

/// Collects the `watchers` observations of sample `n`.
async fn collect(
    rx: &mut Seen,
    n: u64,
    watchers: usize,
    sent: Instant,
    returned: Instant,
    latency: &mut Latency,
) -> Result<()> {
    latency.call.push(returned - sent);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    let mut last = Duration::ZERO;
    while seen < watchers {
        let (m, at) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| {
                format!("only {seen} of {watchers} watchers saw sample {n} within 10 s")
            })?
            .context("every watcher ended")?;
        if m != n {
            continue;
        }
        seen += 1;
        if at < returned {
            latency.early += 1;
        }
        let d = at.saturating_duration_since(returned);
        latency.all.push(d);
        last = last.max(d);
    }
    latency.last.push(last);
    latency.last_from_start.push(returned - sent + last);
    Ok(())
}

fn sample_number(id: &str) -> Option<u64> {
    id.rsplit('/').next()?.strip_prefix("l-")?.parse().ok()
}

/// Aborts the watcher tasks when dropped (so an error path cleans up too).
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// `watchers` Weir Watch streams on one service, each past its snapshot.
async fn weir_watchers(
    clients: &[RegistryClient<Channel>],
    service: &str,
    watchers: usize,
) -> Result<(Tasks, Seen)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let opened = for_all(watchers, |i| {
        let mut c = clients[i % clients.len()].clone();
        let tx = tx.clone();
        let service = service.to_owned();
        async move {
            let mut stream = c
                .watch(WatchRequest {
                    namespace: NAMESPACE.into(),
                    service,
                    start_revision: 0,
                })
                .await?
                .into_inner();
            let (ready_tx, ready) = oneshot::channel();
            let task = tokio::spawn(async move {
                let mut ready_tx = Some(ready_tx);
                while let Ok(Some(m)) = stream.message().await {
                    let at = Instant::now();
                    if m.kind == Kind::Snapshot as i32 {
                        if m.snapshot_complete {
                            if let Some(r) = ready_tx.take() {
                                let _ = r.send(());
                            }
                        }
                        continue;
                    }
                    for e in &m.events {
                        if e.r#type != EventType::Put as i32 {
                            continue;
                        }
                        let n = e
                            .instance
                            .as_ref()
                            .and_then(|i| sample_number(&i.instance_id));
                        if let Some(n) = n {
                            let _ = tx.send((n, at));
                        }
                    }
                }
            });
            Ok::<_, anyhow::Error>((task, ready))
        }
    })
    .await?;
    let mut tasks = Tasks(Vec::new());
    let mut readies = Vec::new();
    for (task, ready) in opened {
        tasks.0.push(task);
        readies.push(ready);
    }
    for ready in readies {
        tokio::time::timeout(Duration::from_secs(30), ready)
            .await
            .context("a Weir watcher got no snapshot within 30 s")?
            .context("a Weir watch stream ended before its snapshot")?;
    }
    Ok((tasks, rx))
}

/// `watchers` raw etcd watches on one prefix, each created.
async fn raw_watchers(
    clients: &[etcd_client::Client],
    prefix: &str,
    watchers: usize,
) -> Result<(Tasks, Seen)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let opened = for_all(watchers, |i| {
        let mut w = clients[i % clients.len()].watch_client();
        let tx = tx.clone();
        let prefix = prefix.to_owned();
        async move {
            // Each watch() call is its own gRPC Watch stream.
            let mut stream = w
                .watch(prefix, Some(WatchOptions::new().with_prefix()))
                .await?;
            let created = stream
                .message()
                .await?
                .context("etcd watch stream ended at once")?;
            if !created.created() {
                bail!("first etcd watch response is not `created`");
            }
            Ok(tokio::spawn(async move {
                while let Ok(Some(m)) = stream.message().await {
                    let at = Instant::now();
                    for e in m.events() {
                        if e.event_type() != EtcdEventType::Put {
                            continue;
                        }
                        let n = e
                            .kv()
                            .and_then(|kv| kv.key_str().ok())
                            .and_then(sample_number);
                        if let Some(n) = n {
                            let _ = tx.send((n, at));
                        }
                    }
                }
            }))
        }
    })
    .await?;
    Ok((Tasks(opened), rx))
}

/// `watchers` Weir watchers and `watchers` raw etcd watchers, then `samples`
/// rounds of: register one new ephemeral instance through Weir and wait
/// until every Weir watcher saw it; grant a lease and put one new key in
/// etcd and wait until every raw watcher saw it. One write at a time.
async fn watch_latency(
    weir: &[RegistryClient<Channel>],
    raw: &[etcd_client::Client],
    watchers: usize,
    samples: u64,
) -> Result<(Latency, Latency)> {
    let service = format!("lat-{watchers}");
    let prefix = format!("{RAW_ROOT}/lat-{watchers}/");
    let (weir_tasks, mut weir_seen) = weir_watchers(weir, &service, watchers).await?;
    let (raw_tasks, mut raw_seen) = raw_watchers(raw, &prefix, watchers).await?;
    let mut c = weir[0].clone();
    let mut e = raw[0].clone();
    let (mut w, mut r) = (Latency::default(), Latency::default());
    for n in 0..samples {
        let id = format!("l-{n}");
        let sent = Instant::now();
        c.register(RegisterRequest {
            instance: Some(instance(&service, &id, true)),
            ..RegisterRequest::default()
        })
        .await?;
        let returned = Instant::now();
        collect(&mut weir_seen, n, watchers, sent, returned, &mut w).await?;

        let sent = Instant::now();
        let lease = e.lease_grant(i64::from(TTL_SECS), None).await?;
        e.put(
            format!("{prefix}{id}"),
            raw_value(&id),
            Some(PutOptions::new().with_lease(lease.id())),
        )
        .await?;
        let returned = Instant::now();
        collect(&mut raw_seen, n, watchers, sent, returned, &mut r).await?;
    }
    drop(weir_tasks);
    drop(raw_tasks);
    w.finish();
    r.finish();
    Ok((w, r))
}

// ---------------------------------------------------------------------------
// Report

fn fmt_ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn fmt_rate(r: f64) -> String {
    let n = r.round() as u64;
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    format!("{out}/s")
}

struct Row {
    metric: String,
    weir: String,
    raw: String,
    ratio: String,
    target: String,
    verdict: String,
    /// What the row gives for comparing two control-plane binaries.
    figures: Vec<Figure>,
}

enum Target {
    /// weir/raw at least this.
    AtLeast(f64),
    /// weir faster than raw.
    Faster,
    /// weir below this.
    Below(Duration),
    None,
}

fn throughput_row(metric: &str, weir: f64, raw: Option<f64>, target: Target) -> Row {
    let ratio = raw.map(|r| weir / r.max(1e-9));
    let (target, verdict) = match (target, ratio) {
        (Target::AtLeast(min), Some(x)) => (
            format!("≥ {min:.2}× raw"),
            if x >= min { "met" } else { "MISSED" }.to_owned(),
        ),
        (Target::Faster, Some(x)) => (
            "> 1.00× raw".to_owned(),
            if x > 1.0 { "met" } else { "MISSED" }.to_owned(),
        ),
        _ => ("—".to_owned(), String::new()),
    };
    // The rates themselves come from the loads (several rows share one).
    let figures = ratio
        .map(|x| Figure::higher(format!("{metric}: ratio weir/raw"), "×", x))
        .into_iter()
        .collect();
    Row {
        metric: metric.to_owned(),
        weir: fmt_rate(weir),
        raw: raw.map_or_else(|| "—".to_owned(), fmt_rate),
        ratio: ratio.map_or_else(|| "—".to_owned(), |x| format!("{x:.2}")),
        target,
        verdict,
        figures,
    }
}

fn latency_row(metric: &str, weir: Duration, raw: Duration, target: Target) -> Row {
    // A ratio to (nearly) zero says nothing.
    let ratio = if raw >= Duration::from_micros(50) {
        format!("{:.2}", weir.as_secs_f64() / raw.as_secs_f64())
    } else {
        "n/a".to_owned()
    };
    let (target, verdict) = match target {
        Target::Below(max) => (
            format!("< {} ms", max.as_millis()),
            if weir < max { "met" } else { "MISSED" }.to_owned(),
        ),
        _ => ("—".to_owned(), String::new()),
    };
    Row {
        metric: metric.to_owned(),
        weir: fmt_ms(weir),
        raw: fmt_ms(raw),
        ratio,
        target,
        verdict,
        figures: vec![Figure::ms(metric, weir)],
    }
}

fn print_table(rows: &[Row]) {
    let header = Row {
        metric: "metric".into(),
        weir: "weir".into(),
        raw: "raw etcd".into(),
        ratio: "ratio".into(),
        target: "target".into(),
        verdict: "verdict".into(),
        figures: Vec::new(),
    };
    let cells = |r: &Row| {
        [
            r.metric.clone(),
            r.weir.clone(),
            r.raw.clone(),
            r.ratio.clone(),
            r.target.clone(),
            r.verdict.clone(),
        ]
    };
    let mut widths = [0usize; 6];
    for r in std::iter::once(&header).chain(rows) {
        for (w, c) in widths.iter_mut().zip(cells(r)) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: [String; 6]| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (c, w))| {
                let pad = w.saturating_sub(c.chars().count());
                if i == 0 || i >= 4 {
                    format!("{c}{}", " ".repeat(pad))
                } else {
                    format!("{}{c}", " ".repeat(pad))
                }
            })
            .collect();
        println!("| {} |", parts.join(" | "));
    };
    line(cells(&header));
    let rule: Vec<String> = widths
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i == 0 || i >= 4 {
                "-".repeat(*w)
            } else {
                format!("{}:", "-".repeat(w.saturating_sub(1)))
            }
        })
        .collect();
    println!("|-{}-|", rule.join("-|-"));
    for r in rows {
        line(cells(r));
    }
}

// ---------------------------------------------------------------------------
// The run

/// One run on `binary`: prints its tables and returns its figures.
async fn run_once(binary: &Path) -> Result<Vec<Figure>> {
    let secs = Duration::from_secs(env_num("WEIR_BENCH_SECS", 4).max(1));
    let samples = env_num("WEIR_BENCH_SAMPLES", 300).max(1);
    let many = usize::try_from(env_num("WEIR_BENCH_WATCHERS", 1000).max(1))?;

    let etcd = private_etcd().await?;
    let prefix = unique_prefix("bench");
    let plane = start_plane(binary, &etcd, &prefix)?;
    let cpu = CpuMeter::new(vec![plane.pid()], etcd.pid());
    let etcd_version = Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load_at_start = loadavg();
    eprintln!(
        "registry benchmark: {etcd_version}; control plane {} (pid {:?}) at {}; etcd pid {:?}; \
         {cpus} CPUs, load average {load_at_start}",
        binary.display(),
        plane.pid(),
        plane.endpoint(),
        etcd.pid(),
    );

    let weir = Arc::new(weir_clients(&plane.endpoint()).await?);
    let raw = Arc::new(etcd_clients(&etcd).await?);

    // The control plane serves once its cache has loaded.
    let start = Instant::now();
    loop {
        let mut c = weir[0].clone();
        let ready = c
            .get_service(GetServiceRequest {
                namespace: NAMESPACE.into(),
                service: "bench-none".into(),
                ..GetServiceRequest::default()
            })
            .await;
        match ready {
            Ok(_) => break,
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                bail!("control plane not ready after 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }

    let mut rows = Vec::new();
    let mut loads: Vec<(&str, Load)> = Vec::new();

    // 1. Registrations: distinct instance ids (a global counter), ephemeral.
    let counter = Arc::new(AtomicU64::new(0));
    let weir_register = {
        let (weir, counter) = (weir.clone(), counter.clone());
        op(move |w, _| {
            let mut c = weir[w % CHANNELS].clone();
            let id = format!("r-{}", counter.fetch_add(1, Ordering::Relaxed));
            async move {
                let resp = c
                    .register(RegisterRequest {
                        instance: Some(instance("bench-reg", &id, true)),
                        ..RegisterRequest::default()
                    })
                    .await?
                    .into_inner();
                if resp.instance.is_none_or(|i| i.lease_id == 0) {
                    bail!("Register returned no leased instance");
                }
                Ok(())
            }
        })
    };
    let raw_register = {
        let (raw, counter) = (raw.clone(), counter.clone());
        op(move |w, _| {
            let c = raw[w % CHANNELS].clone();
            let id = format!("r-{}", counter.fetch_add(1, Ordering::Relaxed));
            async move {
                let lease = c.lease_client().grant(i64::from(TTL_SECS), None).await?;
                c.kv_client()
                    .put(
                        format!("{RAW_ROOT}/reg/{id}"),
                        raw_value(&id),
                        Some(PutOptions::new().with_lease(lease.id())),
                    )
                    .await?;
                Ok(())
            }
        })
    };
    let pre_granted = Arc::new(
        for_all(CONCURRENCY, |_| {
            let mut c = raw[0].clone();
            async move { Ok(c.lease_grant(i64::from(TTL_SECS), None).await?.id()) }
        })
        .await?,
    );
    let raw_put_leased = {
        let (raw, counter, leases) = (raw.clone(), counter.clone(), pre_granted.clone());
        op(move |w, _| {
            let c = raw[w % CHANNELS].clone();
            let id = format!("r-{}", counter.fetch_add(1, Ordering::Relaxed));
            let lease = leases[w];
            async move {
                c.kv_client()
                    .put(
                        format!("{RAW_ROOT}/reg-pre/{id}"),
                        raw_value(&id),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                    .await?;
                Ok(())
            }
        })
    };
    let mut group = compare(
        "registrations",
        &[
            ("weir Register", weir_register),
            ("raw etcd lease grant + put", raw_register),
            ("raw etcd put on a pre-granted lease", raw_put_leased),
        ],
        secs,
        &cpu,
    )
    .await?
    .into_iter();
    let (Some(reg_weir), Some(reg_raw), Some(reg_pre)) = (group.next(), group.next(), group.next())
    else {
        bail!("missing registration figures");
    };
    rows.push(throughput_row(
        "registrations/s vs raw grant + put",
        reg_weir.rate(1.0),
        Some(reg_raw.rate(1.0)),
        Target::AtLeast(0.70),
    ));
    rows.push(throughput_row(
        "registrations/s vs raw put on a pre-granted lease (reference)",
        reg_weir.rate(1.0),
        Some(reg_pre.rate(1.0)),
        Target::None,
    ));
    loads.push(("weir Register", reg_weir));
    loads.push(("raw lease grant + put", reg_raw));
    loads.push(("raw put on a pre-granted lease", reg_pre));

    // 2. Heartbeats on HEARTBEAT_INSTANCES registrations, 16 per worker.
    let per_worker = HEARTBEAT_INSTANCES / CONCURRENCY;
    let hb_id = move |w: usize, k: usize| format!("h-{}", w + CONCURRENCY * (k % per_worker));
    for_all(HEARTBEAT_INSTANCES, |i| {
        let mut c = weir[i % CHANNELS].clone();
        async move {
            c.register(RegisterRequest {
                instance: Some(instance("bench-hb", &format!("h-{i}"), true)),
                ..RegisterRequest::default()
            })
            .await?;
            Ok(())
        }
    })
    .await?;
    let weir_heartbeat = {
        let weir = weir.clone();
        op(move |w, seq| {
            let mut c = weir[w % CHANNELS].clone();
            let id = hb_id(w, usize::try_from(seq).unwrap_or(0));
            async move {
                let resp = c
                    .heartbeat(HeartbeatRequest {
                        instance: Some(instance_ref("bench-hb", &id)),
                    })
                    .await?
                    .into_inner();
                if resp.ttl_seconds == 0 {
                    bail!("Heartbeat returned TTL 0");
                }
                Ok(())
            }
        })
    };
    // KeepAlive: one stream per worker; each message names 1 (or 16) of the
    // worker's instances and waits for its answer.
    let keep_alive_op = |streams: Arc<Vec<Mutex<KeepAliveStream>>>, batch: usize| {
        op(move |w, seq| {
            let streams = streams.clone();
            let instances: Vec<InstanceRef> = (0..batch)
                .map(|k| {
                    let k = usize::try_from(seq).unwrap_or(0) * batch + k;
                    instance_ref("bench-hb", &hb_id(w, k))
                })
                .collect();
            async move {
                let mut stream = streams[w].lock().await;
                stream
                    .0
                    .send(KeepAliveRequest { instances })
                    .await
                    .context("KeepAlive stream closed")?;
                let resp = stream
                    .1
                    .message()
                    .await?
                    .context("KeepAlive stream ended")?;
                if resp.results.len() != batch || resp.results.iter().any(|r| !r.alive) {
                    bail!("KeepAlive: a renewal failed: {:?}", resp.results.first());
                }
                Ok(())
            }
        })
    };
    let raw_leases: Vec<i64> = for_all(HEARTBEAT_INSTANCES, |i| {
        let mut c = raw[i % CHANNELS].clone();
        async move { Ok(c.lease_grant(i64::from(TTL_SECS), None).await?.id()) }
    })
    .await?;
    // One keep-alive stream per lease, as the control plane keeps them.
    let raw_keepers = Arc::new(
        for_all(HEARTBEAT_INSTANCES, |i| {
            let mut l = raw[i % CHANNELS].lease_client();
            let lease = raw_leases[i];
            async move { Ok(Mutex::new(l.keep_alive(lease).await?)) }
        })
        .await?,
    );
    let raw_keep_alive = {
        let keepers = raw_keepers.clone();
        op(move |w, seq| {
            let keepers = keepers.clone();
            let k = w + CONCURRENCY * (usize::try_from(seq).unwrap_or(0) % per_worker);
            async move {
                let mut keeper = keepers[k].lock().await;
                keeper.0.keep_alive().await?;
                let resp = keeper
                    .1
                    .message()
                    .await?
                    .context("etcd keep-alive stream ended")?;
                if resp.ttl() <= 0 {
                    bail!("etcd lease {} is gone", resp.id());
                }
                Ok(())
            }
        })
    };
    let mut group = compare(
        "heartbeats",
        &[
            ("weir Heartbeat", weir_heartbeat),
            (
                "weir KeepAlive, 1 per message",
                keep_alive_op(open_keep_alives(&weir).await?, 1),
            ),
            (
                "weir KeepAlive, 16 per message",
                keep_alive_op(open_keep_alives(&weir).await?, KEEPALIVE_BATCH),
            ),
            ("raw etcd lease keep-alive", raw_keep_alive),
        ],
        secs,
        &cpu,
    )
    .await?
    .into_iter();
    let (Some(hb_weir), Some(ka_weir), Some(ka_batch), Some(hb_raw)) =
        (group.next(), group.next(), group.next(), group.next())
    else {
        bail!("missing heartbeat figures");
    };
    drop(raw_keepers);
    rows.push(throughput_row(
        "heartbeats/s: Heartbeat RPC vs lease keep-alive",
        hb_weir.rate(1.0),
        Some(hb_raw.rate(1.0)),
        Target::AtLeast(0.70),
    ));
    rows.push(throughput_row(
        "heartbeats/s: KeepAlive stream, 1 instance per message",
        ka_weir.rate(1.0),
        Some(hb_raw.rate(1.0)),
        Target::AtLeast(0.70),
    ));
    rows.push(throughput_row(
        "heartbeats/s: KeepAlive stream, 16 per message (1,024 in flight; reference)",
        ka_batch.rate(KEEPALIVE_BATCH as f64),
        Some(hb_raw.rate(1.0)),
        Target::None,
    ));
    loads.push(("weir Heartbeat", hb_weir));
    loads.push(("weir KeepAlive, 1 per message", ka_weir));
    loads.push(("weir KeepAlive, 16 per message (messages)", ka_batch));
    loads.push(("raw lease keep-alive", hb_raw));

    // 3. Discovery reads: one service of READ_INSTANCES persistent instances.
    for_all(READ_INSTANCES, |i| {
        let mut c = weir[0].clone();
        async move {
            c.register(RegisterRequest {
                instance: Some(instance("bench-read", &format!("i-{i}"), false)),
                ..RegisterRequest::default()
            })
            .await?;
            Ok(())
        }
    })
    .await?;
    // The same keys, as the control plane stores them.
    let read_prefix = format!("{prefix}/v1/instances/{NAMESPACE}/bench-read/");
    let check = raw[0]
        .kv_client()
        .get(
            read_prefix.clone(),
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await?;
    if check.kvs().len() != READ_INSTANCES {
        bail!(
            "expected {READ_INSTANCES} keys under {read_prefix}, found {}",
            check.kvs().len()
        );
    }
    let weir_get = {
        let weir = weir.clone();
        op(move |w, _| {
            let mut c = weir[w % CHANNELS].clone();
            async move {
                let resp = c
                    .get_service(GetServiceRequest {
                        namespace: NAMESPACE.into(),
                        service: "bench-read".into(),
                        ..GetServiceRequest::default()
                    })
                    .await?
                    .into_inner();
                let n = resp.service.map_or(0, |s| s.instances.len());
                if n != READ_INSTANCES {
                    bail!("GetService returned {n} instances");
                }
                Ok(())
            }
        })
    };
    let raw_range = {
        let (raw, read_prefix) = (raw.clone(), read_prefix.clone());
        op(move |w, _| {
            let mut kv = raw[w % CHANNELS].kv_client();
            let key = read_prefix.clone();
            async move {
                let resp = kv
                    .get(
                        key,
                        Some(GetOptions::new().with_prefix().with_serializable()),
                    )
                    .await?;
                if resp.kvs().len() != READ_INSTANCES {
                    bail!("range returned {} keys", resp.kvs().len());
                }
                Ok(())
            }
        })
    };
    let mut group = compare(
        "discovery reads",
        &[
            ("weir GetService (10 instances)", weir_get),
            ("raw etcd serializable range (same keys)", raw_range),
        ],
        secs,
        &cpu,
    )
    .await?
    .into_iter();
    let (Some(get_weir), Some(get_raw)) = (group.next(), group.next()) else {
        bail!("missing read figures");
    };
    rows.push(throughput_row(
        "GetService/s (10 instances) vs serializable range of the same keys",
        get_weir.rate(1.0),
        Some(get_raw.rate(1.0)),
        Target::Faster,
    ));
    loads.push(("weir GetService", get_weir));
    loads.push(("raw serializable range", get_raw));

    // 4. Register → watcher latency, Weir and raw samples alternating.
    eprintln!("register → watcher latency ({samples} sequential writes each):");
    let t = Instant::now();
    let (w1, r1) = watch_latency(&weir, &raw, 1, samples).await?;
    eprintln!("  weir, 1 watcher: {}", w1.describe());
    eprintln!("  raw,  1 watcher: {}", r1.describe());
    let (wn, rn) = watch_latency(&weir, &raw, many, samples).await?;
    eprintln!("  weir, {many} watchers: {}", wn.describe());
    eprintln!("  raw,  {many} watchers: {}", rn.describe());
    eprintln!("  ({:.1} s)", t.elapsed().as_secs_f64());
    let p50_p99 = [(0.5, "p50"), (0.99, "p99")];
    let ms = Duration::from_millis;
    // Primary: from the Register (raw: put) call returning.
    for (q, name) in p50_p99 {
        rows.push(latency_row(
            &format!("Register returned → watcher sees it, 1 watcher, {name}"),
            percentile(&w1.all, q),
            percentile(&r1.all, q),
            if q > 0.9 {
                Target::Below(ms(10))
            } else {
                Target::None
            },
        ));
    }
    for (q, name) in p50_p99 {
        rows.push(latency_row(
            &format!(
                "Register returned → watcher sees it, {many} watchers, all observations, {name}"
            ),
            percentile(&wn.all, q),
            percentile(&rn.all, q),
            if q > 0.9 {
                Target::Below(ms(50))
            } else {
                Target::None
            },
        ));
    }
    for (q, name) in p50_p99 {
        rows.push(latency_row(
            &format!("Register returned → last of {many} watchers sees it, {name}"),
            percentile(&wn.last, q),
            percentile(&rn.last, q),
            if q > 0.9 {
                Target::Below(ms(50))
            } else {
                Target::None
            },
        ));
    }
    // Secondary: from the call starting (includes the write itself).
    rows.push(latency_row(
        "Register called → watcher sees it, 1 watcher, p99",
        percentile(&w1.last_from_start, 0.99),
        percentile(&r1.last_from_start, 0.99),
        Target::None,
    ));
    rows.push(latency_row(
        &format!("Register called → last of {many} watchers sees it, p99"),
        percentile(&wn.last_from_start, 0.99),
        percentile(&rn.last_from_start, 0.99),
        Target::None,
    ));
    for (q, name) in p50_p99 {
        rows.push(latency_row(
            &format!("sequential Register call vs lease grant + put, {name}"),
            percentile(&w1.call, q),
            percentile(&r1.call, q),
            Target::None,
        ));
    }

    println!();
    println!(
        "Weir vs raw etcd. {etcd_version}; {cpus} CPUs shared by etcd, the control plane and the \
         load generator; load average {load_at_start} at start, {} at end. Throughput: \
         {CONCURRENCY} in flight over {CHANNELS} connections, {} s per figure ({ROUNDS} rounds, \
         interleaved). Latency: {samples} sequential writes per figure.",
        loadavg(),
        secs.as_secs(),
    );
    println!();
    print_table(&rows);
    println!();
    println!("Throughput figures in detail (cores: average CPU cores used while measuring):");
    println!();
    println!(
        "| figure | ops/s | p50 | p99 | errors | etcd | control plane | load generator | other processes |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (name, l) in &loads {
        let (etcd, plane, bench, other) = l.cores();
        println!(
            "| {name} | {} | {} | {} | {} | {etcd:.2} | {plane:.2} | {bench:.2} | {other:.2} |",
            fmt_rate(l.rate(1.0)),
            fmt_ms(percentile(&l.latencies, 0.5)),
            fmt_ms(percentile(&l.latencies, 0.99)),
            l.errors,
        );
    }
    println!();
    println!(
        "Watch observations that arrived before the write call returned (counted as 0 ms): \
         1 watcher: weir {} of {}, raw {} of {}; {many} watchers: weir {} of {}, raw {} of {}.",
        w1.early,
        w1.all.len(),
        r1.early,
        r1.all.len(),
        wn.early,
        wn.all.len(),
        rn.early,
        rn.all.len(),
    );
    drop(plane);
    drop(etcd);
    let mut figures: Vec<Figure> = rows.into_iter().flat_map(|r| r.figures).collect();
    for (name, l) in &loads {
        if name.starts_with("weir") {
            figures.push(Figure::higher(*name, "ops/s", l.rate(1.0)));
            let per_op = l.cpu.plane / (l.ops.max(1) as f64) * 1e6;
            figures.push(Figure::lower(
                format!("{name}: control-plane CPU per op"),
                "µs",
                per_op,
            ));
        } else {
            // Raw etcd is the same in every run: its spread is the noise.
            figures.push(Figure::new(
                format!("{name} (reference)"),
                "ops/s",
                l.rate(1.0),
                Better::Neither,
            ));
        }
    }
    Ok(figures)
}
