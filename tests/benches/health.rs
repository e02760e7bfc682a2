//! Health-checking benchmark: how soon a dead instance is seen CRITICAL,
//! and how many checks one control-plane replica keeps up with.
//!
//! ```text
//! CARGO_TARGET_DIR=target/bench cargo bench -p weir-tests --bench health
//! ```
//!
//! Everything runs on loopback: one private etcd (fresh data dir) and a
//! real `weir-control-plane` process on it (the replica under test, release
//! build, built by the bench toolkit next to this benchmark's `deps/`
//! directory). With `WEIR_BENCH_BASE=<git rev>` the whole run is repeated
//! in interleaved rounds with that revision's replica under test and this
//! checkout's (see `weir_tests::bench`); the victims are always this
//! checkout's binary, so only the replica under test differs.
//!
//! 1. Detection. Each victim is a separate process: another
//!    `weir-control-plane --dev`, whose HTTP `/healthz` is the check. It is
//!    registered as a persistent instance with an HTTP check; once a
//!    `WatchView` on its service shows it PASSING the benchmark waits a
//!    random fraction of the check interval (so the kill lands at a random
//!    phase of the check cycle), kills it with SIGKILL and times how long
//!    until the same view shows it CRITICAL. [`VICTIMS_AT_ONCE`] victims run
//!    side by side, each measured on its own (own service, own view).
//!
//! 2. Capacity. N persistent instances with HTTP checks every 1000 ms, all
//!    paths (`/i/{k}`) on [`SERVERS`] small axum servers in this process that
//!    count what they get. After all are PASSING (and a settling pause) the
//!    benchmark counts checks received over a window and reads the CPU time
//!    of the control-plane process (and of etcd, this process, and the whole
//!    machine) from /proc. N grows through the steps until the replica falls
//!    behind.
//!
//! Knobs (environment): `WEIR_BENCH_KILLS` (kills per detection figure,
//! default 30), `WEIR_BENCH_STEPS` (instance counts, default
//! "500,1000,2000,4000,6000,8000,12000,16000"), `WEIR_BENCH_WINDOW_SECS`
//! (capacity window, default 5), `WEIR_BENCH_BUDGET_SECS` (no new capacity
//! step after this many seconds of capacity measuring, default 180), and
//! the toolkit's `WEIR_BENCH_SKIP_BUILD`, `WEIR_BENCH_BASE`,
//! `WEIR_BENCH_ROUNDS`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};
use weir_tests::bench::{
    self, clock_ticks, env_counts, env_num, loadavg, now_unix_ms, percentile, private_etcd,
    rss_mib, start_plane, CpuMeter, CpuSecs, Figure,
};
use weir_tests::{follow, status_in};

use anyhow::{bail, Context, Result};
use axum::{
    extract::State,
    http::{StatusCode, Uri},
    Router,
};
use futures::{StreamExt, TryStreamExt};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
    task::JoinHandle,
};
use weir_client::{
    health_check, Client, GetServiceRequest, HealthCheck, HealthStatus, HttpCheck, Instance,
    InstanceRef, WatchView,
};
use weir_tests::unique_prefix;

const NAMESPACE: &str = "default";
/// Detection configurations: (interval ms, failures_before_critical).
const DETECTION: [(u32, u32); 2] = [(1000, 2), (200, 2)];
/// Victims alive at once during a detection figure.
const VICTIMS_AT_ONCE: usize = 6;
/// Check interval of the capacity figures.
const CAPACITY_INTERVAL_MS: u32 = 1000;
/// Servers the capacity instances' paths are spread over.
const SERVERS: usize = 16;
/// Registrations in flight while filling a capacity step.
const REGISTER_CONCURRENCY: usize = 32;
/// Pause between "all PASSING" and the measuring window.
const SETTLE: Duration = Duration::from_secs(3);
/// A check counts as late when it follows the previous check of the same
/// instance by more than this many intervals.
const LATE_FACTOR: f64 = 1.5;

fn main() -> Result<()> {
    // Each run (this checkout's replica under test, or base and this in
    // interleaved rounds) on a fresh etcd and replicas; the victims are
    // always this checkout's binary.
    bench::main("health", |plan| async move {
        let victim = plan.this.binary.clone();
        plan.measure(|r| {
            let victim = victim.clone();
            async move { run_once(r.binary(), &victim).await }
        })
        .await
    })
}

// ---------------------------------------------------------------------------
// Small helpers

/// Applies whatever the view has pending, until it is quiet for `quiet`.
async fn drain(view: &mut WatchView, quiet: Duration) -> Result<()> {
    while let Ok(update) = tokio::time::timeout(quiet, view.next()).await {
        update?;
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn checked_instance(
    service: &str,
    id: &str,
    port: u16,
    path: &str,
    interval_ms: u32,
    failures: u32,
) -> Instance {
    Instance {
        namespace: NAMESPACE.into(),
        service: service.into(),
        instance_id: id.into(),
        host: "127.0.0.1".into(),
        port: u32::from(port),
        health_check: Some(HealthCheck {
            kind: Some(health_check::Kind::Http(HttpCheck {
                path: path.into(),
                ..HttpCheck::default()
            })),
            interval_ms,
            failures_before_critical: failures,
            ..HealthCheck::default()
        }),
        ..Instance::default()
    }
}

async fn wait_ready(client: &Client) -> Result<()> {
    let start = Instant::now();
    loop {
        let answer = client
            .get_service(GetServiceRequest {
                namespace: NAMESPACE.into(),
                service: "bench-none".into(),
                ..GetServiceRequest::default()
            })
            .await;
        match answer {
            Ok(_) | Err(weir_client::Error::NotFound(_)) => return Ok(()),
            Err(e) if start.elapsed() > Duration::from_secs(30) => {
                bail!("control plane not ready after 30 s: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// 1. Detection

/// A victim: a separate `weir-control-plane --dev` process whose HTTP
/// `/healthz` is checked. Killed (SIGKILL) when dropped.
struct Victim {
    child: Child,
    http_port: u16,
}

impl Victim {
    async fn start(binary: &Path) -> Result<Self> {
        let mut child = Command::new(binary)
            .args([
                "--dev",
                "--grpc-addr=127.0.0.1:0",
                "--http-addr=127.0.0.1:0",
            ])
            // Quiet: every dev-mode replica warns that nothing persists.
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a victim weir-control-plane")?;
        let stdout = child.stdout.take().context("victim has no stdout")?;
        // `weir-control-plane ready grpc=ADDR http=ADDR store=embedded`
        let line = tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).lines().next_line(),
        )
        .await
        .context("victim not ready within 30 s")??
        .context("victim exited before its ready line")?;
        let http: SocketAddr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("http="))
            .with_context(|| format!("no http= in victim ready line {line:?}"))?
            .parse()
            .with_context(|| format!("bad http= in victim ready line {line:?}"))?;
        Ok(Self {
            child,
            http_port: http.port(),
        })
    }

    /// kill -9, then reaps it.
    async fn kill(&mut self) -> Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// One kill.
#[derive(Clone, Debug)]
struct Kill {
    /// Kill to CRITICAL seen on the watch.
    seen: Duration,
    /// Kill to the checker's verdict (`HealthDetail.since_unix_ms`).
    decided: Duration,
    reason: String,
}

async fn detect_slot(
    client: Client,
    binary: PathBuf,
    service: String,
    interval_ms: u32,
    failures: u32,
    rounds: usize,
    slot: usize,
) -> Result<Vec<Kill>> {
    // Stagger the slots so victims do not all start at once.
    let stagger = u64::from(interval_ms) * u64::try_from(slot)? / VICTIMS_AT_ONCE as u64;
    tokio::time::sleep(Duration::from_millis(stagger)).await;
    let mut view = client.watch_view(NAMESPACE, &service);
    let mut kills = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut victim = Victim::start(&binary).await?;
        let id = format!("r{round}");
        client
            .register(checked_instance(
                &service,
                &id,
                victim.http_port,
                "/healthz",
                interval_ms,
                failures,
            ))
            .await?;
        follow(&mut view, Duration::from_secs(20), "victim PASSING", |v| {
            status_in(v, &service, &id) == Some(HealthStatus::Passing)
        })
        .await?;
        // Kill at a random phase of the check cycle.
        let phase = rand::random_range(0..u64::from(interval_ms));
        tokio::time::sleep(Duration::from_millis(phase)).await;
        let killed_unix = now_unix_ms();
        let killed = Instant::now();
        victim.kill().await?;
        let seen = follow(&mut view, Duration::from_secs(30), "victim CRITICAL", |v| {
            status_in(v, &service, &id) == Some(HealthStatus::Critical)
        })
        .await?;
        let detail = view
            .get(NAMESPACE, &service, &id)
            .and_then(|i| i.health.clone())
            .unwrap_or_default();
        let decided_ms = u64::try_from(detail.since_unix_ms - killed_unix).unwrap_or(0);
        kills.push(Kill {
            seen: seen - killed,
            decided: Duration::from_millis(decided_ms),
            reason: detail.reason,
        });
        client
            .deregister(&InstanceRef {
                namespace: NAMESPACE.into(),
                service: service.clone(),
                instance_id: id,
            })
            .await?;
    }
    Ok(kills)
}

struct DetectionRow {
    interval_ms: u32,
    failures: u32,
    kills: Vec<Kill>,
    took: Duration,
}

async fn detection(
    client: &Client,
    binary: &Path,
    interval_ms: u32,
    failures: u32,
    kills: usize,
) -> Result<DetectionRow> {
    let rounds = kills.div_ceil(VICTIMS_AT_ONCE);
    let start = Instant::now();
    // Polled together in this task (not spawned), so an error drops, and
    // thereby kills, every victim still alive.
    let slots = (0..VICTIMS_AT_ONCE).map(|slot| {
        detect_slot(
            client.clone(),
            binary.to_owned(),
            format!("victim-{interval_ms}-{slot}"),
            interval_ms,
            failures,
            rounds,
            slot,
        )
    });
    let kills: Vec<Kill> = futures::future::try_join_all(slots)
        .await?
        .into_iter()
        .flatten()
        .collect();
    Ok(DetectionRow {
        interval_ms,
        failures,
        kills,
        took: start.elapsed(),
    })
}

fn print_detection(rows: &[DetectionRow]) {
    println!();
    println!("Detection: kill -9 of a checked instance to CRITICAL on a watch");
    println!();
    println!(
        "| interval × failures | bound I×f | kills | min | p50 | p99 | max | \
         kill→verdict p50 (max) | verdict→watch p50 (max) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let mut seen: Vec<Duration> = row.kills.iter().map(|k| k.seen).collect();
        seen.sort();
        let mut decided: Vec<Duration> = row.kills.iter().map(|k| k.decided).collect();
        decided.sort();
        let mut propagation: Vec<Duration> = row
            .kills
            .iter()
            .map(|k| k.seen.saturating_sub(k.decided))
            .collect();
        propagation.sort();
        println!(
            "| {} ms × {} | {} ms | {} | {} | {} | {} | {} | {} ({}) | {} ({}) |",
            row.interval_ms,
            row.failures,
            row.interval_ms * row.failures,
            seen.len(),
            ms(percentile(&seen, 0.0)),
            ms(percentile(&seen, 0.5)),
            ms(percentile(&seen, 0.99)),
            ms(percentile(&seen, 1.0)),
            ms(percentile(&decided, 0.5)),
            ms(percentile(&decided, 1.0)),
            ms(percentile(&propagation, 0.5)),
            ms(percentile(&propagation, 1.0)),
        );
    }
    for row in rows {
        let mut reasons: Vec<String> = row
            .kills
            .iter()
            .map(|k| {
                // "connect 127.0.0.1:PORT: Connection refused ..." -> drop the port.
                k.reason
                    .split_whitespace()
                    .filter(|w| !w.starts_with("127.0.0.1:"))
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        reasons.sort();
        reasons.dedup();
        println!(
            "  {} ms: {} kills in {:.0} s; verdict reasons: {}",
            row.interval_ms,
            row.kills.len(),
            row.took.as_secs_f64(),
            reasons.join(" | ")
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Capacity

/// What the capacity servers received, per instance.
struct Counters {
    base: Instant,
    total: AtomicU64,
    hits: Vec<AtomicU64>,
    /// Time of the last check of each instance, µs since `base` (0 = none).
    last_us: Vec<AtomicU64>,
    /// Checks that came more than LATE_FACTOR intervals after the previous.
    late: AtomicU64,
    /// Longest gap between two checks of one instance, µs.
    max_gap_us: AtomicU64,
    late_after_us: u64,
}

impl Counters {
    fn new(instances: usize) -> Self {
        Self {
            base: Instant::now(),
            total: AtomicU64::new(0),
            hits: (0..instances).map(|_| AtomicU64::new(0)).collect(),
            last_us: (0..instances).map(|_| AtomicU64::new(0)).collect(),
            late: AtomicU64::new(0),
            max_gap_us: AtomicU64::new(0),
            late_after_us: (f64::from(CAPACITY_INTERVAL_MS) * 1000.0 * LATE_FACTOR) as u64,
        }
    }

    fn hit(&self, k: usize) -> bool {
        let (Some(hits), Some(last)) = (self.hits.get(k), self.last_us.get(k)) else {
            return false;
        };
        let now = u64::try_from(self.base.elapsed().as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        self.total.fetch_add(1, Ordering::Relaxed);
        hits.fetch_add(1, Ordering::Relaxed);
        let previous = last.swap(now, Ordering::Relaxed);
        if previous != 0 {
            let gap = now.saturating_sub(previous);
            self.max_gap_us.fetch_max(gap, Ordering::Relaxed);
            if gap > self.late_after_us {
                self.late.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn per_instance(&self, n: usize) -> Vec<u64> {
        self.hits
            .iter()
            .take(n)
            .map(|h| h.load(Ordering::Relaxed))
            .collect()
    }
}

async fn answer(State(counters): State<Arc<Counters>>, uri: Uri) -> StatusCode {
    let k = uri
        .path()
        .strip_prefix("/i/")
        .and_then(|k| k.parse::<usize>().ok());
    match k {
        Some(k) if counters.hit(k) => StatusCode::OK,
        _ => StatusCode::NOT_FOUND,
    }
}

/// The capacity servers; stopped on drop.
struct Servers {
    ports: Vec<u16>,
    tasks: Vec<JoinHandle<()>>,
}

impl Servers {
    async fn start(counters: &Arc<Counters>) -> Result<Self> {
        let mut ports = Vec::with_capacity(SERVERS);
        let mut tasks = Vec::with_capacity(SERVERS);
        for _ in 0..SERVERS {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            ports.push(listener.local_addr()?.port());
            let app = Router::new().fallback(answer).with_state(counters.clone());
            tasks.push(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }
        Ok(Self { ports, tasks })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct CapacityRow {
    instances: usize,
    to_passing: Duration,
    /// Control-plane CPU seconds from the step's first registration until
    /// all were PASSING.
    ramp_cpu: f64,
    window: Duration,
    received: u64,
    late: u64,
    max_gap: Duration,
    /// Fewest and most checks one instance got in the window.
    per_instance: (u64, u64),
    cpu: CpuSecs,
    rss_mib: f64,
    not_passing: usize,
}

impl CapacityRow {
    fn target(&self) -> f64 {
        self.instances as f64 * 1000.0 / f64::from(CAPACITY_INTERVAL_MS)
    }

    fn rate(&self) -> f64 {
        self.received as f64 / self.window.as_secs_f64()
    }

    fn cores(&self, secs: f64) -> f64 {
        secs / self.window.as_secs_f64()
    }

    fn behind(&self) -> bool {
        self.rate() < 0.95 * self.target()
            || self.late as f64 > 0.01 * self.received as f64
            || self.per_instance.0 == 0
            || self.not_passing > 0
    }
}

const CAPACITY_SERVICE: &str = "fleet";

async fn capacity(
    client: &Client,
    cpu: &CpuMeter,
    plane_pid: u32,
    steps: &[usize],
    window: Duration,
    budget: Duration,
) -> Result<(Vec<CapacityRow>, Option<String>)> {
    let most = steps.iter().copied().max().unwrap_or(0);
    let counters = Arc::new(Counters::new(most));
    let servers = Servers::start(&counters).await?;
    let mut view = client.watch_view(NAMESPACE, CAPACITY_SERVICE);
    let mut rows = Vec::new();
    let mut registered = 0;
    let mut failed = None;
    let start = Instant::now();
    for &n in steps {
        if n <= registered {
            continue;
        }
        if start.elapsed() > budget {
            println!("  (capacity: time budget used up; no step of {n})");
            break;
        }
        let step_start = Instant::now();
        let ramp_before = cpu.read();
        let ports = &servers.ports;
        let passing = |v: &WatchView| {
            v.instances()
                .filter(|i| i.status == HealthStatus::Passing as i32)
                .count()
        };
        let ramp = async {
            futures::stream::iter(registered..n)
                .map(|k| {
                    let client = client.clone();
                    let instance = checked_instance(
                        CAPACITY_SERVICE,
                        &format!("i-{k}"),
                        ports[k % SERVERS],
                        &format!("/i/{k}"),
                        CAPACITY_INTERVAL_MS,
                        0,
                    );
                    async move { client.register(instance).await }
                })
                .buffer_unordered(REGISTER_CONCURRENCY)
                .try_for_each(|_| async { Ok(()) })
                .await?;
            follow(
                &mut view,
                Duration::from_secs(120),
                &format!("{n} instances PASSING"),
                |v| passing(v) == n,
            )
            .await
        };
        // A step that cannot be set up is a result too: the last one.
        if let Err(e) = ramp.await {
            println!("  (capacity: the step of {n} instances failed: {e:#}; stopping)");
            failed = Some(format!("{n} instances: {e:#}"));
            break;
        }
        registered = n;
        let to_passing = step_start.elapsed();
        let ramp_cpu = cpu.read().minus(ramp_before).plane;
        tokio::time::sleep(SETTLE).await;
        drain(&mut view, Duration::from_millis(100)).await?;

        // The window.
        let hits_before = counters.per_instance(n);
        let total_before = counters.total.load(Ordering::Relaxed);
        let late_before = counters.late.load(Ordering::Relaxed);
        counters.max_gap_us.store(0, Ordering::Relaxed);
        let cpu_before = cpu.read();
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let elapsed = t0.elapsed();
        let used = cpu.read().minus(cpu_before);
        let received = counters.total.load(Ordering::Relaxed) - total_before;
        let late = counters.late.load(Ordering::Relaxed) - late_before;
        let max_gap = Duration::from_micros(counters.max_gap_us.load(Ordering::Relaxed));
        let diffs: Vec<u64> = counters
            .per_instance(n)
            .iter()
            .zip(&hits_before)
            .map(|(after, before)| after - before)
            .collect();
        let per_instance = (
            diffs.iter().copied().min().unwrap_or(0),
            diffs.iter().copied().max().unwrap_or(0),
        );
        drain(&mut view, Duration::from_millis(300)).await?;
        let not_passing = n - passing(&view);
        let row = CapacityRow {
            instances: n,
            to_passing,
            ramp_cpu,
            window: elapsed,
            received,
            late,
            max_gap,
            per_instance,
            cpu: used,
            rss_mib: rss_mib(plane_pid).unwrap_or(0.0),
            not_passing,
        };
        eprintln!(
            "  capacity {n}: {:.0}/s of {:.0}/s, control plane {:.2} cores, load {}",
            row.rate(),
            row.target(),
            row.cores(row.cpu.plane),
            loadavg()
        );
        let behind = row.behind();
        rows.push(row);
        if behind {
            println!("  (capacity: fell behind at {n} instances; stopping)");
            break;
        }
    }
    drop(servers);
    Ok((rows, failed))
}

fn print_capacity(rows: &[CapacityRow], failed: Option<&str>) {
    println!();
    println!(
        "Capacity: one replica, HTTP checks every {CAPACITY_INTERVAL_MS} ms, \
         {SERVERS} servers in the benchmark process"
    );
    println!();
    println!(
        "| instances | target checks/s | received checks/s | late (gap > {LATE_FACTOR}×I) | \
         max gap | checks per instance min–max | control plane CPU, cores (kernel) | \
         % of a core per 1,000 checks/s | etcd | bench | rest of machine | \
         control plane RSS | new instances → all PASSING (control plane CPU-s) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let rate = r.rate();
        let plane = r.cores(r.cpu.plane);
        let per_k = if rate > 0.0 {
            plane * 100.0 / (rate / 1000.0)
        } else {
            0.0
        };
        let rest = r.cpu.machine - r.cpu.plane - r.cpu.etcd - r.cpu.bench;
        println!(
            "| {} | {:.0} | {:.0} ({:.1}%) | {} | {} | {}–{} | {:.2} ({:.2}) | {:.1}% | {:.2} | {:.2} | {:.2} | {:.0} MiB | {:.1} s ({:.1}) |",
            r.instances,
            r.target(),
            rate,
            rate * 100.0 / r.target(),
            r.late,
            ms(r.max_gap),
            r.per_instance.0,
            r.per_instance.1,
            plane,
            r.cores(r.cpu.plane_sys),
            per_k,
            r.cores(r.cpu.etcd),
            r.cores(r.cpu.bench),
            r.cores(rest.max(0.0)),
            r.rss_mib,
            r.to_passing.as_secs_f64(),
            r.ramp_cpu,
        );
        if r.not_passing > 0 {
            println!("  {} instances not PASSING after the window", r.not_passing);
        }
    }
    if let Some(f) = failed {
        println!("  next step failed: {f}");
    }
}

// ---------------------------------------------------------------------------

/// One run with `binary` as the replica under test (victims: `victim`):
/// prints its tables and returns its figures.
async fn run_once(binary: &Path, victim: &Path) -> Result<Vec<Figure>> {
    let kills = usize::try_from(env_num("WEIR_BENCH_KILLS", 30).max(1))?;
    let window = Duration::from_secs(env_num("WEIR_BENCH_WINDOW_SECS", 5).max(1));
    let budget = Duration::from_secs(env_num("WEIR_BENCH_BUDGET_SECS", 180));
    let steps = env_counts(
        "WEIR_BENCH_STEPS",
        "500,1000,2000,4000,6000,8000,12000,16000",
    )?;

    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    eprintln!(
        "health benchmark: control plane {}; {cpus} CPUs (shared by etcd, the control plane, \
         the victims and this process), CLK_TCK {}, load average {}",
        binary.display(),
        clock_ticks(),
        loadavg()
    );
    let etcd = private_etcd().await?;

    // 1. Detection, on its own replica.
    let mut rows = Vec::new();
    {
        let plane = start_plane(binary, &etcd, &unique_prefix("hbench-detect"))?;
        let client = Client::connect([plane.endpoint()]).await?;
        wait_ready(&client).await?;
        for (interval_ms, failures) in DETECTION {
            let row = detection(&client, victim, interval_ms, failures, kills).await?;
            eprintln!(
                "  detection {interval_ms} ms × {failures}: {} kills in {:.0} s",
                row.kills.len(),
                row.took.as_secs_f64()
            );
            rows.push(row);
        }
    }
    print_detection(&rows);

    // 2. Capacity, on a fresh replica (new prefix, nothing else to check).
    let plane = start_plane(binary, &etcd, &unique_prefix("hbench-capacity"))?;
    let client = Client::connect([plane.endpoint()]).await?;
    wait_ready(&client).await?;
    let cpu = CpuMeter::new(vec![plane.pid()], etcd.pid());
    let (capacity_rows, failed) =
        capacity(&client, &cpu, plane.pid(), &steps, window, budget).await?;
    print_capacity(&capacity_rows, failed.as_deref());
    println!();
    println!(
        "{cpus} CPUs shared by etcd, the control plane and the load side; load average at the end {}",
        loadavg()
    );
    Ok(figures(&rows, &capacity_rows))
}

/// What a run gives for comparing two control-plane binaries.
fn figures(detection: &[DetectionRow], capacity: &[CapacityRow]) -> Vec<Figure> {
    let mut out = Vec::new();
    for row in detection {
        let config = format!("{} ms × {}", row.interval_ms, row.failures);
        let mut seen: Vec<Duration> = row.kills.iter().map(|k| k.seen).collect();
        seen.sort();
        let mut decided: Vec<Duration> = row.kills.iter().map(|k| k.decided).collect();
        decided.sort();
        out.push(Figure::ms(
            format!("detection {config}: kill → CRITICAL on a watch, p50"),
            percentile(&seen, 0.5),
        ));
        out.push(Figure::ms(
            format!("detection {config}: kill → CRITICAL on a watch, p99"),
            percentile(&seen, 0.99),
        ));
        out.push(Figure::ms(
            format!("detection {config}: kill → verdict, p50"),
            percentile(&decided, 0.5),
        ));
    }
    for r in capacity {
        let n = r.instances;
        let rate = r.rate();
        out.push(Figure::higher(
            format!("capacity {n}: received checks/s (target {:.0})", r.target()),
            "checks/s",
            rate,
        ));
        if rate > 0.0 {
            out.push(Figure::lower(
                format!("capacity {n}: control plane, % of a core per 1,000 checks/s"),
                "%",
                r.cores(r.cpu.plane) * 100.0 / (rate / 1000.0),
            ));
        }
        out.push(Figure::lower(
            format!("capacity {n}: control plane RSS"),
            "MiB",
            r.rss_mib,
        ));
        out.push(Figure::lower(
            format!("capacity {n}: new instances → all PASSING"),
            "s",
            r.to_passing.as_secs_f64(),
        ));
        out.push(Figure::lower(
            format!("capacity {n}: control plane CPU during that ramp"),
            "CPU-s",
            r.ramp_cpu,
        ));
    }
    let kept_up = capacity
        .iter()
        .filter(|r| !r.behind())
        .map(|r| r.instances)
        .max()
        .unwrap_or(0);
    out.push(Figure::higher(
        "capacity: most instances kept up with (steps tried)",
        "instances",
        kept_up as f64,
    ));
    out
}
