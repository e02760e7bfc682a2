//! Policy propagation benchmark: how long after `Put` returns every agent
//! session has the new policy, and how long until the control plane has
//! recorded every acknowledgement.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-pbench cargo build --release --bins
//! CARGO_TARGET_DIR=/work/target-pbench cargo bench -p weir-tests --bench policy
//! ```
//!
//! Everything runs on loopback. For each session count (100, then 1,000) a
//! fresh private etcd (fresh data dir, auto-compaction on) and two real
//! `weir-control-plane` processes on it (release build, found next to this
//! benchmark's `deps/` directory) are started; the sessions are spread
//! evenly over the two replicas, [`SESSIONS_PER_CLIENT`] sessions per
//! `Client` (one HTTP/2 connection each, all of a client's sessions on the
//! same replica).
//!
//! Each stand-in agent is a task looping on `AgentSession::next`: when a
//! policy change for the benchmark service arrives it records
//! `Instant::now()` under the change's version in a shared map and acks it
//! at once (`Ok(())`).
//!
//! Then the benchmark changes the same service's policy over and over, one
//! `Put` at a time (expected version = the previous one), and after each:
//!
//! * push: `Put` returned → the last of the N agents received the change;
//! * recorded: `Put` returned → the N-th acknowledgement of that version
//!   was written to etcd by the control plane (that is the record
//!   `PolicyService.Status` reads). Seen through an etcd watch on the acks
//!   prefix opened by the benchmark itself, time-stamped when the watch
//!   response reaches this process, so the figure is not bounded by any
//!   polling and costs the control plane nothing;
//! * separately, after those, a few `Put`s timed until `Status` (polled
//!   every [`STATUS_POLL`]) shows `applied == N`, the operator's view.
//!
//! The next `Put` starts [`PAUSE`] after the previous one converged. The
//! first [`WARMUP`] `Put`s of a run are not counted.
//!
//! Memory: VmRSS of each control-plane process when idle (before any
//! session), with the sessions open, and at the end of the run, plus VmHWM
//! (peak) at the end; CPU time of every party over the measured `Put`s.
//!
//! Knobs (environment): `WEIR_BENCH_PUTS` (measured Puts per session count,
//! default 100), `WEIR_BENCH_STATUS_PUTS` (Puts timed through Status,
//! default 20), `WEIR_BENCH_SESSIONS` (session counts, default
//! "100,1000"), `WEIR_BENCH_BUDGET_SECS` (no new Put after this many seconds
//! of measuring per session count, default 150).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::task::JoinSet;
use weir_client::{
    agent::{Hello, PolicyChange},
    policy::{AgentPolicyState, Timeout, TrafficPolicy},
    AgentSession, Client, SessionEvent,
};
use weir_tests::{unique_prefix, ControlPlaneProcess, Etcd, EtcdOptions};

const NAMESPACE: &str = "default";
const SERVICE: &str = "orders";
/// Sessions sharing one `Client` (one HTTP/2 connection).
const SESSIONS_PER_CLIENT: usize = 50;
/// Sessions being opened at once.
const OPEN_CONCURRENCY: usize = 32;
/// Puts of a run that are not counted.
const WARMUP: usize = 3;
/// Pause between one Put's convergence and the next Put.
const PAUSE: Duration = Duration::from_millis(100);
/// How often the operator-view figure polls Status.
const STATUS_POLL: Duration = Duration::from_millis(2);
/// A Put that has not converged after this fails the run.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not, and a
    // test run must not take minutes.
    if !std::env::args().any(|a| a == "--bench") {
        println!("policy benchmark: run it with `cargo bench -p weir-tests --bench policy`");
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // etcd and the control planes are killed when their harness handles
    // drop, which happens on every way out of `run` (error or panic
    // included); agent tasks die with the runtime.
    let result = runtime.block_on(run());
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

// ---------------------------------------------------------------------------
// Small helpers

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest rank.
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self {
            n: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: samples.last().copied().unwrap_or_default(),
        }
    }
}

fn policy(version_hint: u32) -> TrafficPolicy {
    TrafficPolicy {
        namespace: NAMESPACE.into(),
        service: SERVICE.into(),
        // A real change each time: a different total deadline.
        timeout: Some(Timeout {
            total_ms: 1000 + version_hint,
            shadow: false,
        }),
        ..TrafficPolicy::default()
    }
}

fn hello(node: &str) -> Hello {
    Hello {
        node_id: node.into(),
        zone: "bench".into(),
        version: "bench".into(),
        ingress_address: "127.0.0.1:9000".into(),
        ..Hello::default()
    }
}

// ---------------------------------------------------------------------------
// CPU and memory from /proc

/// utime + stime of a process, in ticks.
fn proc_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = text.rfind(')')?;
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    // After the comm: state(3) ppid(4) ... utime(14) stime(15).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Our etcd child, found by name and parent.
fn find_etcd() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?;
        let ppid: u32 = text
            .get(close + 1..)?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        (comm == "etcd" && ppid == me).then_some(pid)
    })
}

/// Busy ticks of all CPUs (everything but idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let line = text.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let all: u64 = fields.iter().take(8).sum();
    Some(all - fields.get(3)? - fields.get(4)?)
}

/// A `/proc/<pid>/status` figure in kB (VmRSS, VmHWM), as MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim_start_matches(':')
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn rss(pid: u32) -> f64 {
    status_mib(pid, "VmRSS").unwrap_or(f64::NAN)
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// CPU ticks used so far by each party.
#[derive(Clone, Copy, Debug, Default)]
struct Ticks {
    planes: u64,
    etcd: u64,
    bench: u64,
    machine: u64,
}

impl Ticks {
    fn read(planes: &[u32], etcd: Option<u32>) -> Self {
        Self {
            planes: planes.iter().filter_map(|p| proc_ticks(*p)).sum(),
            etcd: etcd.and_then(proc_ticks).unwrap_or(0),
            bench: proc_ticks(std::process::id()).unwrap_or(0),
            machine: machine_busy_ticks().unwrap_or(0),
        }
    }
}

/// CPU seconds each party used between two readings.
#[derive(Clone, Copy, Debug, Default)]
struct CpuUse {
    planes: f64,
    etcd: f64,
    bench: f64,
    machine: f64,
    wall: f64,
}

impl CpuUse {
    fn between(a: Ticks, b: Ticks, wall: Duration, hz: f64) -> Self {
        let secs = |x: u64, y: u64| y.saturating_sub(x) as f64 / hz;
        Self {
            planes: secs(a.planes, b.planes),
            etcd: secs(a.etcd, b.etcd),
            bench: secs(a.bench, b.bench),
            machine: secs(a.machine, b.machine),
            wall: wall.as_secs_f64(),
        }
    }

    /// Share of the machine's two cores, percent.
    fn pct(&self, secs: f64) -> f64 {
        if self.wall == 0.0 {
            return 0.0;
        }
        100.0 * secs / self.wall
    }
}

// ---------------------------------------------------------------------------
// Agents and acknowledgements

/// When agents received each version of the benchmark service's policy.
#[derive(Debug, Default)]
struct Receipts {
    by_version: Mutex<HashMap<u64, Seen>>,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    count: usize,
    first: Instant,
    last: Instant,
}

impl Receipts {
    fn record(&self, version: u64, at: Instant) {
        let mut map = self.by_version.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(version)
            .and_modify(|s| {
                s.count += 1;
                s.first = s.first.min(at);
                s.last = s.last.max(at);
            })
            .or_insert(Seen {
                count: 1,
                first: at,
                last: at,
            });
    }

    fn get(&self, version: u64) -> Option<Seen> {
        self.by_version
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&version)
            .copied()
    }
}

/// A stand-in agent: time-stamps and acknowledges every policy change it
/// gets, at once.
async fn run_agent(mut session: AgentSession, receipts: Arc<Receipts>) -> Result<()> {
    while let Some(event) = session.next().await? {
        let SessionEvent::Policies(update) = event else {
            continue;
        };
        let now = Instant::now();
        let changes: Vec<&PolicyChange> = update
            .changes
            .iter()
            .filter(|c| c.policy.is_some())
            .collect();
        for c in &changes {
            if c.namespace == NAMESPACE && c.service == SERVICE {
                receipts.record(c.version, now);
            }
        }
        for c in changes {
            session
                .ack(&c.namespace, &c.service, c.version, Ok(()))
                .await?;
        }
    }
    bail!("session {} closed by the server", session.node_id())
}

/// Acknowledgements of the benchmark service as etcd has them: per
/// version, the nodes that accepted it, and when the watch response that
/// completed `target` nodes reached this process.
#[derive(Debug, Default)]
struct Acks {
    inner: Mutex<AcksInner>,
}

#[derive(Debug, Default)]
struct AcksInner {
    target: usize,
    nodes: HashMap<u64, HashSet<String>>,
    complete: HashMap<u64, Instant>,
    error: Option<String>,
}

impl Acks {
    fn lock(&self) -> std::sync::MutexGuard<'_, AcksInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn complete(&self, version: u64) -> Result<Option<Instant>> {
        let inner = self.lock();
        if let Some(e) = &inner.error {
            bail!("ack watch failed: {e}");
        }
        Ok(inner.complete.get(&version).copied())
    }

    fn count(&self, version: u64) -> usize {
        self.lock().nodes.get(&version).map_or(0, HashSet::len)
    }
}

/// Follows `{prefix}/v1/acks/{ns}/{svc}/` in etcd.
async fn watch_acks(etcd: &Etcd, prefix: &str, target: usize) -> Result<Arc<Acks>> {
    let acks = Arc::new(Acks::default());
    acks.lock().target = target;
    let key = format!("{prefix}/v1/acks/{NAMESPACE}/{SERVICE}/");
    let mut client = etcd.client().await?;
    let mut stream = client
        .watch(
            key.as_str(),
            Some(etcd_client::WatchOptions::new().with_prefix()),
        )
        .await?;
    let out = acks.clone();
    tokio::spawn(async move {
        let fail = |e: String| out.lock().error = Some(e);
        loop {
            let resp = match stream.message().await {
                Ok(Some(r)) => r,
                Ok(None) => return fail("watch stream ended".into()),
                Err(e) => return fail(e.to_string()),
            };
            let now = Instant::now();
            if resp.canceled() {
                return fail(format!("watch canceled: {}", resp.cancel_reason()));
            }
            let mut inner = out.lock();
            for ev in resp.events() {
                if ev.event_type() != etcd_client::EventType::Put {
                    continue;
                }
                let Some(kv) = ev.kv() else { continue };
                let Ok(state) = AgentPolicyState::decode(kv.value()) else {
                    continue;
                };
                if !state.accepted {
                    continue;
                }
                let target = inner.target;
                let nodes = inner.nodes.entry(state.version).or_default();
                nodes.insert(state.node_id);
                if nodes.len() == target {
                    inner.complete.entry(state.version).or_insert(now);
                }
            }
        }
    });
    Ok(acks)
}

// ---------------------------------------------------------------------------
// One session count

#[derive(Debug, Default)]
struct RunResult {
    sessions: usize,
    open_secs: f64,
    put_rtt: Summary,
    push: Summary,
    recorded: Summary,
    /// Agents that had the change before Put returned (summed over Puts).
    early: usize,
    status_view: Summary,
    rss_idle: Vec<f64>,
    rss_open: Vec<f64>,
    rss_end: Vec<f64>,
    hwm_end: Vec<f64>,
    etcd_rss_end: f64,
    cpu: CpuUse,
    load_before: String,
    load_after: String,
}

struct Stand {
    // Field order is drop order: agents and clients first, then the
    // replicas, then etcd.
    agents: JoinSet<Result<()>>,
    admin: Client,
    planes: Vec<ControlPlaneProcess>,
    etcd: Etcd,
    prefix: String,
}

impl Stand {
    async fn start() -> Result<Self> {
        let etcd = Etcd::start_with(EtcdOptions {
            extra_args: vec![
                "--auto-compaction-mode=revision".into(),
                "--auto-compaction-retention=10000".into(),
            ],
            private: true,
        })
        .await?;
        let prefix = unique_prefix("pbench");
        let planes = vec![
            ControlPlaneProcess::start(&etcd, &prefix)?,
            ControlPlaneProcess::start(&etcd, &prefix)?,
        ];
        let admin = Client::connect([planes[0].endpoint()]).await?;
        Ok(Self {
            agents: JoinSet::new(),
            admin,
            planes,
            etcd,
            prefix,
        })
    }

    fn pids(&self) -> Vec<u32> {
        self.planes.iter().map(ControlPlaneProcess::pid).collect()
    }

    fn rss(&self) -> Vec<f64> {
        self.pids().into_iter().map(rss).collect()
    }

    /// Fails if an agent task ended (they only end on an error).
    fn check_agents(&mut self) -> Result<()> {
        if let Some(done) = self.agents.try_join_next() {
            match done {
                Ok(Err(e)) => return Err(e.context("a stand-in agent failed")),
                Ok(Ok(())) => bail!("a stand-in agent ended"),
                Err(e) => bail!("a stand-in agent panicked: {e}"),
            }
        }
        Ok(())
    }

    /// Opens `n` sessions, [`SESSIONS_PER_CLIENT`] per client, clients
    /// alternating between the replicas.
    async fn open_sessions(&mut self, n: usize, receipts: &Arc<Receipts>) -> Result<()> {
        let endpoints: Vec<String> = self
            .planes
            .iter()
            .map(ControlPlaneProcess::endpoint)
            .collect();
        let mut clients = Vec::new();
        for c in 0..n.div_ceil(SESSIONS_PER_CLIENT) {
            clients.push(Client::connect([endpoints[c % endpoints.len()].as_str()]).await?);
        }
        let opened: Vec<AgentSession> = futures::stream::iter(0..n)
            .map(|k| {
                let client = clients[k / SESSIONS_PER_CLIENT].clone();
                async move {
                    client
                        .open_session(hello(&format!("node-{k:04}")))
                        .await
                        .with_context(|| format!("opening session {k}"))
                }
            })
            .buffer_unordered(OPEN_CONCURRENCY)
            .try_collect()
            .await?;
        for session in opened {
            self.agents.spawn(run_agent(session, receipts.clone()));
        }
        Ok(())
    }

    /// Waits until Status shows `n` connected agents that applied `version`.
    async fn wait_applied(&mut self, n: usize, version: u64, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_agents()?;
            let s = self.admin.policy_status(NAMESPACE, SERVICE).await;
            if let Ok(s) = &s {
                if s.current_version == version
                    && s.connected_agents as usize == n
                    && s.applied as usize == n
                {
                    return Ok(());
                }
            }
            if start.elapsed() > deadline {
                bail!("{n} agents did not all apply version {version} within {deadline:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn run_sessions(
    n: usize,
    puts: usize,
    status_puts: usize,
    budget: Duration,
) -> Result<RunResult> {
    let hz = clock_ticks();
    let mut stand = Stand::start().await?;
    let etcd_pid = find_etcd();
    let mut result = RunResult {
        sessions: n,
        ..RunResult::default()
    };
    // Let the replicas settle (store watch, replica keys) before measuring idle memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    result.rss_idle = stand.rss();

    let first = stand.admin.put_policy(policy(0), Some(0)).await?;
    let receipts = Arc::new(Receipts::default());
    let opening = Instant::now();
    stand.open_sessions(n, &receipts).await?;
    stand
        .wait_applied(n, first.version, Duration::from_secs(120))
        .await?;
    result.open_secs = opening.elapsed().as_secs_f64();
    println!(
        "  {n} sessions open and acked the first version in {:.1} s",
        result.open_secs
    );
    let acks = watch_acks(&stand.etcd, &stand.prefix, n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    result.rss_open = stand.rss();

    // Measured Puts.
    let mut version = first.version;
    let mut rtts = Vec::new();
    let mut pushes = Vec::new();
    let mut records = Vec::new();
    result.load_before = loadavg();
    let pids = stand.pids();
    let mut ticks_start = Ticks::read(&pids, etcd_pid);
    let mut measure_start = Instant::now();
    for i in 0..WARMUP + puts {
        if i == WARMUP {
            ticks_start = Ticks::read(&pids, etcd_pid);
            measure_start = Instant::now();
        }
        if i > WARMUP && measure_start.elapsed() > budget {
            println!("  budget of {budget:?} spent after {} Puts", i - WARMUP);
            break;
        }
        stand.check_agents()?;
        let hint = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let started = Instant::now();
        let written = stand.admin.put_policy(policy(hint), Some(version)).await?;
        let returned = Instant::now();
        version = written.version;
        let recorded = loop {
            if let Some(at) = acks.complete(version)? {
                break at;
            }
            if returned.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "version {version}: {} of {n} acks after {CONVERGE_TIMEOUT:?}, {} agents received it",
                    acks.count(version),
                    receipts.get(version).map_or(0, |s| s.count)
                );
            }
            stand.check_agents()?;
            // Only decides when to look again: the time was taken by the
            // watch task.
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let seen = receipts
            .get(version)
            .ok_or_else(|| anyhow!("no agent recorded version {version}"))?;
        ensure!(
            seen.count == n,
            "version {version}: {} receipts for {n} sessions (all acks were written first)",
            seen.count
        );
        if i >= WARMUP {
            rtts.push(returned - started);
            pushes.push(seen.last.saturating_duration_since(returned));
            records.push(recorded.saturating_duration_since(returned));
            if seen.first < returned {
                // Some agents may get it before the answer reaches us.
                result.early += 1;
            }
        }
        tokio::time::sleep(PAUSE).await;
    }
    let ticks_end = Ticks::read(&pids, etcd_pid);
    result.cpu = CpuUse::between(ticks_start, ticks_end, measure_start.elapsed(), hz);
    result.load_after = loadavg();
    result.put_rtt = Summary::of(rtts);
    result.push = Summary::of(pushes);
    result.recorded = Summary::of(records);

    // Operator view: Status polled until applied == n.
    let mut views = Vec::new();
    for i in 0..status_puts {
        stand.check_agents()?;
        let hint = u32::try_from(10_000 + i).unwrap_or(u32::MAX);
        let written = stand.admin.put_policy(policy(hint), Some(version)).await?;
        let returned = Instant::now();
        version = written.version;
        loop {
            let s = stand.admin.policy_status(NAMESPACE, SERVICE).await?;
            if s.current_version == version && s.applied as usize == n {
                views.push(returned.elapsed());
                break;
            }
            if returned.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "Status did not show {n} applied for version {version}: {} applied",
                    s.applied
                );
            }
            tokio::time::sleep(STATUS_POLL).await;
        }
        tokio::time::sleep(PAUSE).await;
    }
    result.status_view = Summary::of(views);

    let status = stand.admin.policy_status(NAMESPACE, SERVICE).await?;
    ensure!(
        status.connected_agents as usize == n
            && status.applied as usize == n
            && status.rejected == 0
            && status.pending == 0,
        "final status: {} connected, {} applied, {} rejected, {} pending",
        status.connected_agents,
        status.applied,
        status.rejected,
        status.pending
    );
    result.rss_end = stand.rss();
    result.hwm_end = stand
        .pids()
        .into_iter()
        .map(|p| status_mib(p, "VmHWM").unwrap_or(f64::NAN))
        .collect();
    result.etcd_rss_end = etcd_pid.map_or(f64::NAN, rss);
    stand.check_agents()?;
    stand.agents.shutdown().await;
    Ok(result)
}

// ---------------------------------------------------------------------------
// Report

fn mib_list(v: &[f64]) -> String {
    let parts: Vec<String> = v.iter().map(|m| format!("{m:.1}")).collect();
    format!("{} MiB", parts.join(" + "))
}

fn report(r: &RunResult) {
    let n = r.sessions;
    println!();
    println!("### {n} sessions (2 replicas, {} per replica)", n / 2);
    println!();
    println!("| figure | samples | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    for (name, s) in [
        ("Put call (client round trip)", r.put_rtt),
        ("push: Put returned → last agent received", r.push),
        (
            "recorded: Put returned → last ack written to etcd",
            r.recorded,
        ),
        (
            "Status shows applied == N (polled every 2 ms)",
            r.status_view,
        ),
    ] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            s.n,
            ms(s.p50),
            ms(s.p99),
            ms(s.max)
        );
    }
    println!();
    println!(
        "Puts where some agent had the change before Put returned: {} of {}",
        r.early, r.push.n
    );
    println!(
        "Opening {n} sessions (until all acked the first version): {:.1} s",
        r.open_secs
    );
    println!(
        "Control-plane RSS: idle {}, sessions open {}, end {}; peak (VmHWM) {}; etcd RSS at end {:.1} MiB",
        mib_list(&r.rss_idle),
        mib_list(&r.rss_open),
        mib_list(&r.rss_end),
        mib_list(&r.hwm_end),
        r.etcd_rss_end
    );
    let c = &r.cpu;
    println!(
        "CPU over the measured Puts ({:.1} s wall, 200% = both cores): control planes {:.0}%, etcd {:.0}%, benchmark process {:.0}%, whole machine {:.0}%",
        c.wall,
        c.pct(c.planes),
        c.pct(c.etcd),
        c.pct(c.bench),
        c.pct(c.machine)
    );
    if r.push.n > 0 {
        println!(
            "Control-plane CPU per Put: {:.1} ms",
            1000.0 * c.planes / r.push.n as f64
        );
    }
    println!(
        "Load average before / after: {} / {}",
        r.load_before, r.load_after
    );
}

async fn run() -> Result<()> {
    let puts = usize::try_from(env_num("WEIR_BENCH_PUTS", 100))?;
    let status_puts = usize::try_from(env_num("WEIR_BENCH_STATUS_PUTS", 20))?;
    let budget = Duration::from_secs(env_num("WEIR_BENCH_BUDGET_SECS", 150));
    let counts: Vec<usize> = std::env::var("WEIR_BENCH_SESSIONS")
        .unwrap_or_else(|_| "100,1000".into())
        .split(',')
        .map(|s| s.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .context("WEIR_BENCH_SESSIONS: comma-separated session counts")?;
    println!(
        "policy propagation: {} CPUs, {puts} measured Puts (+{WARMUP} warm-up) and {status_puts} Status-timed Puts per session count, {SESSIONS_PER_CLIENT} sessions per client connection",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let mut results = Vec::new();
    for n in counts {
        println!("{n} sessions ...");
        let r = run_sessions(n, puts, status_puts, budget)
            .await
            .with_context(|| format!("run with {n} sessions"))?;
        report(&r);
        results.push(r);
    }
    println!();
    println!("## Summary (Put returned → …)");
    println!();
    println!("| sessions | push p50 | push p99 | push max | recorded p50 | recorded p99 | recorded max | Status view p50 | Status view p99 | CP RSS with sessions (sum) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB |",
            r.sessions,
            ms(r.push.p50),
            ms(r.push.p99),
            ms(r.push.max),
            ms(r.recorded.p50),
            ms(r.recorded.p99),
            ms(r.recorded.max),
            ms(r.status_view.p50),
            ms(r.status_view.p99),
            r.rss_open.iter().sum::<f64>()
        );
    }
    Ok(())
}
