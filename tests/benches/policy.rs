//! Policy propagation benchmark: how long after `Put` returns every agent
//! session has the new policy, and how long until the control plane has
//! recorded every acknowledgement.
//!
//! ```text
//! CARGO_TARGET_DIR=target/bench cargo bench -p weir-tests --bench policy
//! ```
//!
//! Everything runs on loopback. For each session count (100, then 1,000) a
//! fresh private etcd (fresh data dir, auto-compaction on) and two real
//! `weir-control-plane` processes on it (release build, built by the bench
//! toolkit next to this benchmark's `deps/` directory) are started. With
//! `WEIR_BENCH_BASE=<git rev>` the whole run is repeated in interleaved
//! rounds on that revision's control planes and this checkout's (see
//! `weir_tests::bench`). The sessions are spread
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
//! `Put` at a time (expected version = the previous one), in two phases of
//! `WEIR_BENCH_PUTS` / `WEIR_BENCH_STATUS_PUTS` Puts each. Every figure is
//! taken from the moment `Put` returned to the benchmark.
//!
//! Phase 1, nothing polls the control plane:
//!
//! * (a) push: until the last of the N agents received the change;
//! * stamped: until the latest `at_unix_ms` the control plane put on an ack
//!   of that version: taken when it handles the ack, just before the etcd
//!   write (wall clock, 1 ms resolution): a lower bound of (b);
//! * watch: until an etcd watch on the acks prefix, opened by the
//!   benchmark, delivered the N-th ack of that version to this process:
//!   an upper bound of (b) that includes etcd's watch delivery.
//!
//! Phase 2, the operator's view:
//!
//! * (b) recorded: until `PolicyService.Status` shows `applied == N`.
//!   Status is called again [`STATUS_POLL`] after each answer, so the
//!   figure is late by up to one Status call plus the poll pause. Status
//!   reads the acks with a linearizable etcd range, so this is when the
//!   control plane's record of every ack could be read.
//!
//! The next `Put` starts [`PAUSE`] after the previous one converged. The
//! first [`WARMUP`] `Put`s of a run are not counted.
//!
//! Memory: VmRSS of each control-plane process when idle (before any
//! session), with the sessions open, and at the end of the run, plus VmHWM
//! (peak) at the end; CPU time of every party over phase 1.
//!
//! Knobs (environment): `WEIR_BENCH_PUTS` (phase-1 Puts per session count,
//! default 100), `WEIR_BENCH_STATUS_PUTS` (phase-2 Puts, default 100),
//! `WEIR_BENCH_SESSIONS` (session counts, default "100,1000"),
//! `WEIR_BENCH_BUDGET_SECS` (no new phase-1 Put after this many seconds per
//! session count, default 150), `WEIR_BENCH_RULES` (rules in the policy,
//! to make it bigger, default 0), and the toolkit's `WEIR_BENCH_SKIP_BUILD`,
//! `WEIR_BENCH_BASE`, `WEIR_BENCH_ROUNDS`.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};
use weir_tests::bench::{
    self, env_counts, env_num, loadavg, now_unix_ms, percentile, private_etcd, rss_mib,
    start_plane, status_mib, CpuMeter, CpuSecs, Figure,
};

use anyhow::{bail, ensure, Context, Result};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use tokio::task::JoinSet;
use weir_client::{
    agent::{Hello, PolicyChange},
    policy::{AgentPolicyState, EventMatch, Rule, Timeout, TrafficPolicy},
    AckOutcome, AgentSession, Client, SessionEvent,
};
use weir_tests::{unique_prefix, ControlPlaneProcess, Etcd};

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

fn main() -> Result<()> {
    // Each run (this checkout's control planes, or base and this in
    // interleaved rounds) on a fresh etcd and replicas per session count.
    bench::main("policy", |plan| async move {
        plan.measure(|r| async move { run_once(r.binary()).await })
            .await
    })
}

// ---------------------------------------------------------------------------
// Small helpers

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

/// The benchmark service's policy: a total deadline that differs on each
/// write, and `rules` per-event-type rules (`WEIR_BENCH_RULES`, default 0)
/// to make it bigger.
fn policy(version_hint: u32, rules: usize) -> TrafficPolicy {
    TrafficPolicy {
        namespace: NAMESPACE.into(),
        service: SERVICE.into(),
        timeout: Some(Timeout {
            total_ms: 1000 + version_hint,
            shadow: false,
        }),
        rules: (0..rules)
            .map(|k| Rule {
                name: format!("kind-{k}"),
                r#match: Some(EventMatch {
                    type_prefix: format!("com.example.orders.kind{k}."),
                    ..EventMatch::default()
                }),
                timeout: Some(Timeout {
                    total_ms: 500 + version_hint,
                    shadow: false,
                }),
                ..Rule::default()
            })
            .collect(),
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
// Memory from /proc

fn rss(pid: u32) -> f64 {
    rss_mib(pid).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------
// Agents and acknowledgements

/// When agents received each version of the benchmark service's policy.
#[derive(Debug, Default)]
struct Receipts {
    by_version: Mutex<HashMap<u64, Seen>>,
    /// Snapshots sent to replace changes an agent missed (a subscriber
    /// that fell behind the hub, or a hub reload).
    resyncs: AtomicUsize,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    /// Agents that received it, the first and the last at.
    count: usize,
    first: Instant,
    last: Instant,
    /// Agents whose ack call returned (handed to the session's outbound
    /// queue), the last at.
    sent: usize,
    sent_last: Option<Instant>,
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
                sent: 0,
                sent_last: None,
            });
    }

    fn record_sent(&self, version: u64, at: Instant) {
        let mut map = self.by_version.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get_mut(&version) {
            s.sent += 1;
            s.sent_last = Some(s.sent_last.map_or(at, |l| l.max(at)));
        }
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
        if !update.resync_reason.is_empty() {
            receipts.resyncs.fetch_add(1, Ordering::Relaxed);
        }
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
                .ack(&c.namespace, &c.service, c.version, AckOutcome::Applied)
                .await?;
            if c.namespace == NAMESPACE && c.service == SERVICE {
                receipts.record_sent(c.version, Instant::now());
            }
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
    /// Latest `at_unix_ms` the control plane stamped on an ack of a version
    /// (taken just before its etcd write).
    stamped: HashMap<u64, i64>,
    error: Option<String>,
    /// Watch responses that carried ack events, and the events.
    responses: usize,
    events: usize,
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

    fn stamped(&self, version: u64) -> Option<i64> {
        self.lock().stamped.get(&version).copied()
    }

    /// (responses, events) so far.
    fn counters(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.responses, inner.events)
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
            if !resp.events().is_empty() {
                inner.responses += 1;
                inner.events += resp.events().len();
            }
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
                let stamp = inner.stamped.entry(state.version).or_insert(0);
                *stamp = (*stamp).max(state.at_unix_ms);
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

/// What one Put gave; instants are taken from the moment Put returned.
#[derive(Clone, Copy, Debug)]
struct PutTiming {
    rtt: Duration,
    /// The last agent received the change.
    push: Duration,
    /// The last agent's ack call returned.
    sent: Duration,
    /// The N-th ack reached etcd (seen by the benchmark's watch).
    recorded: Duration,
    /// The latest stamp the control plane put on this version's acks
    /// (before writing them), ms resolution.
    stamped: Duration,
    /// Status first showed applied == N (the Status-timed Puts only), the
    /// Status calls made, and how long the last one took.
    status_view: Option<Duration>,
    status_calls: usize,
    status_rtt: Duration,
    /// Some agent had the change before Put returned.
    early: bool,
    /// Watch responses / events that carried this version's acks.
    responses: usize,
    events: usize,
}

#[derive(Debug, Default)]
struct RunResult {
    sessions: usize,
    open_secs: f64,
    measured: Vec<PutTiming>,
    status_timed: Vec<PutTiming>,
    /// Median Status call with no session, and with the sessions open.
    status_call_idle: Duration,
    status_call_open: Duration,
    resyncs: usize,
    rss_idle: Vec<f64>,
    rss_open: Vec<f64>,
    rss_end: Vec<f64>,
    hwm_end: Vec<f64>,
    etcd_rss_end: f64,
    /// CPU seconds of each party over phase 1, and its wall time.
    cpu: CpuSecs,
    wall: f64,
    load_before: String,
    load_after: String,
}

struct Stand {
    // Field order is drop order: agents and the admin client first, then
    // the replicas, then etcd.
    agents: JoinSet<Result<()>>,
    admin: Client,
    planes: Vec<ControlPlaneProcess>,
    etcd: Etcd,
    prefix: String,
    receipts: Arc<Receipts>,
    version: u64,
    rules: usize,
}

impl Stand {
    async fn start(binary: &Path, rules: usize) -> Result<Self> {
        let etcd = private_etcd().await?;
        let prefix = unique_prefix("pbench");
        let planes = vec![
            start_plane(binary, &etcd, &prefix)?,
            start_plane(binary, &etcd, &prefix)?,
        ];
        let admin = Client::connect([planes[0].endpoint()]).await?;
        Ok(Self {
            agents: JoinSet::new(),
            admin,
            planes,
            etcd,
            prefix,
            receipts: Arc::new(Receipts::default()),
            version: 0,
            rules,
        })
    }

    /// Median duration of a few Status calls in a row.
    async fn status_call(&self) -> Result<Duration> {
        let mut times = Vec::new();
        for _ in 0..7 {
            let call = Instant::now();
            self.admin.policy_status(NAMESPACE, SERVICE).await?;
            times.push(call.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Summary::of(times).p50)
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
    async fn open_sessions(&mut self, n: usize) -> Result<()> {
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
            self.agents.spawn(run_agent(session, self.receipts.clone()));
        }
        Ok(())
    }

    /// Waits until Status shows `n` connected agents that applied the
    /// current version.
    async fn wait_applied(&mut self, n: usize, deadline: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            self.check_agents()?;
            let s = self.admin.policy_status(NAMESPACE, SERVICE).await;
            if let Ok(s) = &s {
                if s.current_version == self.version
                    && s.connected_agents as usize == n
                    && s.applied as usize == n
                {
                    return Ok(());
                }
            }
            if start.elapsed() > deadline {
                bail!(
                    "{n} agents did not all apply version {} within {deadline:?}: {s:?}",
                    self.version
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One Put (expected version = the current one) and its convergence
    /// on `n` sessions; with `poll_status`, Status is polled every
    /// [`STATUS_POLL`] until it shows `applied == n`.
    async fn one_put(
        &mut self,
        n: usize,
        acks: &Acks,
        hint: u32,
        poll_status: bool,
    ) -> Result<PutTiming> {
        let (responses0, events0) = acks.counters();
        let started = Instant::now();
        let written = self
            .admin
            .put_policy(policy(hint, self.rules), Some(self.version))
            .await?;
        let returned = Instant::now();
        let returned_unix_ms = now_unix_ms();
        let version = written.version;
        self.version = version;
        let (mut status_view, mut status_calls, mut status_rtt) = (None, 0, Duration::ZERO);
        if poll_status {
            loop {
                let call = Instant::now();
                let s = self.admin.policy_status(NAMESPACE, SERVICE).await?;
                status_rtt = call.elapsed();
                status_calls += 1;
                if s.current_version == version && s.applied as usize == n {
                    status_view = Some(returned.elapsed());
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
        }
        // The times are taken by the agents and the watch task; this loop
        // only decides when to look.
        let (recorded, seen, sent_last) = loop {
            let seen = self.receipts.get(version);
            if let (Some(at), Some(seen)) = (acks.complete(version)?, seen) {
                if let (n_sent, Some(sent_last)) = (seen.sent, seen.sent_last) {
                    if n_sent == n {
                        break (at, seen, sent_last);
                    }
                }
            }
            if returned.elapsed() > CONVERGE_TIMEOUT {
                bail!(
                    "version {version}: {} of {n} acks written after {CONVERGE_TIMEOUT:?}; {} agents received it, {} sent their ack",
                    acks.count(version),
                    seen.map_or(0, |s| s.count),
                    seen.map_or(0, |s| s.sent),
                );
            }
            self.check_agents()?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        ensure!(
            seen.count == n,
            "version {version}: {} receipts for {n} sessions",
            seen.count
        );
        let (responses1, events1) = acks.counters();
        let stamp_ms = acks.stamped(version).unwrap_or(0) - returned_unix_ms;
        Ok(PutTiming {
            rtt: returned - started,
            push: seen.last.saturating_duration_since(returned),
            sent: sent_last.saturating_duration_since(returned),
            recorded: recorded.saturating_duration_since(returned),
            stamped: Duration::from_millis(u64::try_from(stamp_ms).unwrap_or(0)),
            status_view,
            status_calls,
            status_rtt,
            early: seen.first < returned,
            responses: responses1 - responses0,
            events: events1 - events0,
        })
    }
}

async fn run_sessions(
    binary: &Path,
    n: usize,
    puts: usize,
    status_puts: usize,
    budget: Duration,
) -> Result<RunResult> {
    let rules = usize::try_from(env_num("WEIR_BENCH_RULES", 0))?;
    let mut stand = Stand::start(binary, rules).await?;
    let etcd_pid = stand.etcd.pid();
    let mut result = RunResult {
        sessions: n,
        ..RunResult::default()
    };
    // Let the replicas settle (store watch, replica keys) before reading
    // their idle memory.
    tokio::time::sleep(Duration::from_secs(1)).await;
    result.rss_idle = stand.rss();

    stand.version = stand
        .admin
        .put_policy(policy(0, rules), Some(0))
        .await?
        .version;
    result.status_call_idle = stand.status_call().await?;
    let opening = Instant::now();
    stand.open_sessions(n).await?;
    stand.wait_applied(n, Duration::from_secs(120)).await?;
    result.open_secs = opening.elapsed().as_secs_f64();
    println!(
        "  {n} sessions open and acked the first version in {:.1} s",
        result.open_secs
    );
    let acks = watch_acks(&stand.etcd, &stand.prefix, n).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    result.rss_open = stand.rss();
    result.status_call_open = stand.status_call().await?;

    // Measured Puts.
    result.load_before = loadavg();
    let cpu = CpuMeter::new(stand.pids(), etcd_pid);
    let mut cpu_start = cpu.read();
    let mut measure_start = Instant::now();
    for i in 0..WARMUP + puts {
        if i == WARMUP {
            cpu_start = cpu.read();
            measure_start = Instant::now();
        }
        if i > WARMUP && measure_start.elapsed() > budget {
            println!("  budget of {budget:?} spent after {} Puts", i - WARMUP);
            break;
        }
        stand.check_agents()?;
        let hint = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let timing = stand.one_put(n, &acks, hint, false).await?;
        if i >= WARMUP {
            result.measured.push(timing);
        }
        tokio::time::sleep(PAUSE).await;
    }
    result.cpu = cpu.read().minus(cpu_start);
    result.wall = measure_start.elapsed().as_secs_f64();
    result.load_after = loadavg();

    // The operator's view: Status polled until applied == n.
    for i in 0..status_puts {
        stand.check_agents()?;
        let hint = u32::try_from(10_000 + i).unwrap_or(u32::MAX);
        result
            .status_timed
            .push(stand.one_put(n, &acks, hint, true).await?);
        tokio::time::sleep(PAUSE).await;
    }

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
    result.resyncs = stand.receipts.resyncs.load(Ordering::Relaxed);
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

fn summary(timings: &[PutTiming], f: impl Fn(&PutTiming) -> Option<Duration>) -> Summary {
    Summary::of(timings.iter().filter_map(f).collect())
}

fn row(name: &str, s: Summary) {
    println!(
        "| {name} | {} | {} | {} | {} |",
        s.n,
        ms(s.p50),
        ms(s.p99),
        ms(s.max)
    );
}

fn report(r: &RunResult) {
    let n = r.sessions;
    let m = &r.measured;
    println!();
    println!("### {n} sessions (2 replicas, {} per replica)", n / 2);
    println!();
    println!("| figure (from Put returned) | Puts | p50 | p99 | max |");
    println!("|---|---:|---:|---:|---:|");
    row(
        "(a) phase 1: push, last agent received",
        summary(m, |t| Some(t.push)),
    );
    row(
        "phase 1: last agent's ack handed to its stream",
        summary(m, |t| Some(t.sent)),
    );
    row(
        "phase 1: stamped, last ack taken in hand by the control plane (before its etcd write; 1 ms resolution)",
        summary(m, |t| Some(t.stamped)),
    );
    row(
        "phase 1: watch, last ack written to etcd, seen by a watch",
        summary(m, |t| Some(t.recorded)),
    );
    row(
        "(b) phase 2: Status shows applied == N (polled 2 ms after each answer)",
        summary(&r.status_timed, |t| t.status_view),
    );
    row(
        "  phase 2: last ack written to etcd, seen by a watch",
        summary(&r.status_timed, |t| Some(t.recorded)),
    );
    row(
        "  phase 2: duration of the Status call that showed it",
        summary(&r.status_timed, |t| Some(t.status_rtt)),
    );
    row(
        "phase 1: the Put call itself (client round trip)",
        summary(m, |t| Some(t.rtt)),
    );
    println!();
    println!(
        "Status call (median of 7, nothing changing): {} with no session, {} with {n} sessions",
        ms(r.status_call_idle),
        ms(r.status_call_open)
    );
    let calls: usize = r.status_timed.iter().map(|t| t.status_calls).sum();
    if !r.status_timed.is_empty() {
        println!(
            "Status calls per Status-timed Put: {:.1} on average",
            calls as f64 / r.status_timed.len() as f64
        );
    }
    println!(
        "Resync snapshots sent to agents during the run (a session fell behind): {}",
        r.resyncs
    );
    let early = m.iter().filter(|t| t.early).count();
    println!(
        "Puts where some agent had the change before Put returned: {early} of {}",
        m.len()
    );
    let (resp, ev): (usize, usize) = m
        .iter()
        .fold((0, 0), |(a, b), t| (a + t.responses, b + t.events));
    if !m.is_empty() {
        println!(
            "etcd watch responses carrying a phase-1 Put's acks: {:.1} on average ({:.1} events each)",
            resp as f64 / m.len() as f64,
            ev as f64 / resp.max(1) as f64
        );
    }
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
    // Share of the machine's cores, percent.
    let pct = |secs: f64| {
        if r.wall == 0.0 {
            0.0
        } else {
            100.0 * secs / r.wall
        }
    };
    println!(
        "CPU over phase 1 ({:.1} s wall, 200% = both cores): control planes {:.0}%, etcd {:.0}%, benchmark process {:.0}%, whole machine {:.0}%",
        r.wall,
        pct(c.plane),
        pct(c.etcd),
        pct(c.bench),
        pct(c.machine)
    );
    if !m.is_empty() {
        println!(
            "CPU per Put: control planes (both) {:.1} ms, etcd {:.1} ms, benchmark process {:.1} ms",
            1000.0 * c.plane / m.len() as f64,
            1000.0 * c.etcd / m.len() as f64,
            1000.0 * c.bench / m.len() as f64
        );
    }
    println!(
        "Load average before / after: {} / {}",
        r.load_before, r.load_after
    );
}

/// One run on `binary`: prints its tables and returns its figures.
async fn run_once(binary: &Path) -> Result<Vec<Figure>> {
    let puts = usize::try_from(env_num("WEIR_BENCH_PUTS", 100))?;
    let status_puts = usize::try_from(env_num("WEIR_BENCH_STATUS_PUTS", 100))?;
    let budget = Duration::from_secs(env_num("WEIR_BENCH_BUDGET_SECS", 150));
    let counts = env_counts("WEIR_BENCH_SESSIONS", "100,1000")?;
    println!(
        "policy propagation: {} CPUs, {puts} measured Puts (+{WARMUP} warm-up) and {status_puts} Status-timed Puts per session count, {SESSIONS_PER_CLIENT} sessions per client connection; load average {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        loadavg()
    );
    let rules = usize::try_from(env_num("WEIR_BENCH_RULES", 0))?;
    println!(
        "policy: {rules} rules, {} bytes encoded",
        policy(1, rules).encoded_len()
    );
    let mut results = Vec::new();
    for n in counts {
        println!("{n} sessions ...");
        let r = run_sessions(binary, n, puts, status_puts, budget)
            .await
            .with_context(|| format!("run with {n} sessions"))?;
        report(&r);
        results.push(r);
    }
    println!();
    println!("## Summary (from Put returned)");
    println!();
    println!("| sessions | (a) push p50 | p99 | max | (b) stamped p50 | p99 | (b) watch p50 | p99 | (b) Status p50 | p99 | max | CP RSS, sessions open (sum) |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &results {
        let push = summary(&r.measured, |t| Some(t.push));
        let stamped = summary(&r.measured, |t| Some(t.stamped));
        let watch = summary(&r.measured, |t| Some(t.recorded));
        let view = summary(&r.status_timed, |t| t.status_view);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} MiB |",
            r.sessions,
            ms(push.p50),
            ms(push.p99),
            ms(push.max),
            ms(stamped.p50),
            ms(stamped.p99),
            ms(watch.p50),
            ms(watch.p99),
            ms(view.p50),
            ms(view.p99),
            ms(view.max),
            r.rss_open.iter().sum::<f64>()
        );
    }
    println!();
    println!("(b) stamped: phase 1, last ack taken in hand by the control plane (lower bound); watch: phase 1, last ack seen written by an etcd watch (includes watch delivery); Status: phase 2, Status shows applied == N, polled.");
    Ok(results.iter().flat_map(figures).collect())
}

/// What one session count gives for comparing two control-plane binaries.
fn figures(r: &RunResult) -> Vec<Figure> {
    let n = r.sessions;
    let mut out = Vec::new();
    let mut latency = |what: &str, s: Summary| {
        out.push(Figure::ms(format!("{n} sessions: {what}, p50"), s.p50));
        out.push(Figure::ms(format!("{n} sessions: {what}, p99"), s.p99));
    };
    latency(
        "(a) push, last agent received",
        summary(&r.measured, |t| Some(t.push)),
    );
    latency(
        "stamped, last ack taken in hand",
        summary(&r.measured, |t| Some(t.stamped)),
    );
    latency(
        "watch, last ack seen written to etcd",
        summary(&r.measured, |t| Some(t.recorded)),
    );
    latency(
        "(b) Status shows applied == N",
        summary(&r.status_timed, |t| t.status_view),
    );
    latency("Put call", summary(&r.measured, |t| Some(t.rtt)));
    out.push(Figure::ms(
        format!("{n} sessions: Status call with the sessions open, median"),
        r.status_call_open,
    ));
    out.push(Figure::lower(
        format!("{n} sessions: control-plane RSS, sessions open (sum)"),
        "MiB",
        r.rss_open.iter().sum(),
    ));
    out.push(Figure::lower(
        format!("{n} sessions: control-plane peak RSS (VmHWM, sum)"),
        "MiB",
        r.hwm_end.iter().sum(),
    ));
    if !r.measured.is_empty() {
        let puts = r.measured.len() as f64;
        out.push(Figure::lower(
            format!("{n} sessions: control-plane CPU per Put (both)"),
            "ms",
            1000.0 * r.cpu.plane / puts,
        ));
        out.push(Figure::lower(
            format!("{n} sessions: etcd CPU per Put"),
            "ms",
            1000.0 * r.cpu.etcd / puts,
        ));
    }
    out
}
