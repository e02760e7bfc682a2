//! What telemetry costs the agent, in one run with interleaved rounds.
//!
//! ```text
//! cargo bench -p weir-tests --bench telemetry
//! ```
//!
//! Set-up (once): two nginx upstreams (one worker each, answering 200 to a
//! 1 KiB POST), a `weir-control-plane --dev` with both registered as
//! instances of `bench`, and two `weir-agent`s (release builds) routing to
//! them by round robin: **on** with the defaults (telemetry on: a span per
//! request and attempt, 1% head sampling, errors and slow requests kept,
//! edge counts and histograms, a report to the control plane each second)
//! and **off** (`--telemetry=false`: no spans, no edge counts, no trace
//! context sent on).
//!
//! Each round measures both in a rotated order: `wrk -t1 -c16` for
//! `WEIR_BENCH_SECS` (default 5), requests per second and the agent's CPU
//! time per request (from `/proc`), and the ratio on ÷ off of the two
//! rates (target: at least 0.95, median over rounds).
//!
//! Then memory with the control plane down: a third agent (telemetry on,
//! `--trace-sample-rate=1`, so every request's spans are kept until the
//! spans-per-second cap: the worst case for its buffers) routes `bench`;
//! the control plane is stopped, and `h2load` sends
//! `WEIR_BENCH_LOAD_RATE` (default 2,000) requests a second through it
//! for `WEIR_BENCH_MEMORY_SECS` (default 600, ten minutes), its RSS read
//! every 30 s. Target: flat after the buffers fill, bounded by them
//! (20,000 spans in the shards, 120 batches or 16 MiB unacknowledged).
//!
//! Needs `nginx`, `wrk` and `h2load` (Debian: `apt-get install nginx wrk
//! nghttp2-client`). Knobs: `WEIR_BENCH_ROUNDS` (default 5),
//! `WEIR_BENCH_SECS`, `WEIR_BENCH_MEMORY_SECS`, `WEIR_BENCH_LOAD_RATE`,
//! `WEIR_BENCH_MEMORY_TELEMETRY=off` (the memory run with telemetry off,
//! for comparison).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use weir_tests::{
    agent::AgentProcess,
    bench::{
        self, env_num,
        peers::{cpu_secs, free_ports, need, nginx, wait_port, write_post_script, wrk, Guard},
        rss_mib, Figure, Plan, Run,
    },
    fixtures::instance,
    ControlPlaneProcess,
};

const SETTLE: Duration = Duration::from_secs(10);

struct Setup {
    dir: PathBuf,
    on: AgentProcess,
    off: AgentProcess,
    plane: Option<ControlPlaneProcess>,
    secs: u64,
    _upstreams: Vec<Guard>,
}

async fn set_up(plan: &Plan) -> Result<Setup> {
    for tool in ["nginx", "wrk", "h2load"] {
        need(tool)?;
    }
    let dir = tempfile::tempdir()?.keep();
    std::fs::write(dir.join("body1k"), vec![b'x'; 1024])?;
    write_post_script(&dir)?;
    let ports = free_ports::<2>()?;
    let upstreams = vec![nginx(&dir, "n1", ports[0])?, nginx(&dir, "n2", ports[1])?];
    for (p, what) in [(ports[0], "nginx 1"), (ports[1], "nginx 2")] {
        wait_port(p, what).await?;
    }
    let plane = ControlPlaneProcess::start_binary(&plan.this.binary, &["--dev".to_owned()])?;
    let client = weir_client::Client::connect([plane.endpoint()]).await?;
    for (n, port) in ports.iter().enumerate() {
        client
            .register(instance(
                "default",
                "bench",
                &format!("n{}", n + 1),
                u32::from(*port),
            ))
            .await?;
    }
    let on = AgentProcess::start(&[plane.endpoint()], "bench-on", &[])?;
    let off = AgentProcess::start(
        &[plane.endpoint()],
        "bench-off",
        &["--telemetry=false".to_owned()],
    )?;
    for agent in [&on, &off] {
        agent
            .wait_for_endpoints("default", "bench", 2, SETTLE)
            .await?;
    }
    let secs = env_num("WEIR_BENCH_SECS", 5).max(1);
    // Warm-up: connections, pools, the first reports.
    for agent in [&on, &off] {
        wrk(&dir, &url(agent), 2)?;
    }
    Ok(Setup {
        dir,
        on,
        off,
        plane: Some(plane),
        secs,
        _upstreams: upstreams,
    })
}

fn url(agent: &AgentProcess) -> String {
    format!("http://{}/v1/services/bench/", agent.ingress_addr())
}

async fn round(setup: &Setup, run: Run) -> Result<Vec<Figure>> {
    let targets = [("on", &setup.on), ("off", &setup.off)];
    let mut figures = Vec::new();
    let mut rates = std::collections::HashMap::new();
    for k in 0..targets.len() {
        let (name, agent) = targets[(k + run.round) % targets.len()];
        let pid = Some(agent.pid());
        let before = cpu_secs(pid);
        let (rate, requests) = wrk(&setup.dir, &url(agent), setup.secs)?;
        let cpu = cpu_secs(pid) - before;
        ensure!(cpu.is_finite() && cpu > 0.0, "agent {name} used no CPU");
        let micros = cpu * 1e6 / requests;
        println!("  telemetry {name:3}: {rate:>9.0} req/s, {micros:.1} µs CPU per request");
        figures.push(Figure::higher(
            format!("telemetry {name} saturation"),
            "req/s",
            rate,
        ));
        figures.push(Figure::lower(
            format!("telemetry {name} CPU per request"),
            "µs",
            micros,
        ));
        rates.insert(name, (rate, micros));
    }
    if let (Some(on), Some(off)) = (rates.get("on"), rates.get("off")) {
        let ratio = on.0 / off.0;
        println!(
            "  on / off: {ratio:.3} of the rate, {:+.2} µs CPU per request",
            on.1 - off.1
        );
        figures.push(Figure::higher("telemetry on / off rate", "ratio", ratio));
        figures.push(Figure::lower(
            "telemetry on CPU per request over off",
            "µs",
            on.1 - off.1,
        ));
    }
    Ok(figures)
}

/// `h2load` at `rate` a second for `secs` against `url`; requests that
/// got 200.
fn load(dir: &Path, url: &str, rate: u64, secs: u64) -> Result<u64> {
    let clients = 16u64;
    let out = Command::new("h2load")
        .args(["--h1", "-t1", &format!("-c{clients}")])
        .arg(format!("--rps={}", (rate / clients).max(1)))
        .arg(format!("-D{secs}"))
        .arg("-d")
        .arg(dir.join("body1k"))
        .arg(url)
        .output()
        .context("cannot run h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("status codes:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no status codes in h2load output: {text}"))?;
    Ok(ok)
}

/// The agent's memory over a long load while no control plane answers.
async fn memory_with_the_control_plane_down(setup: &mut Setup) -> Result<()> {
    let total = env_num("WEIR_BENCH_MEMORY_SECS", 600).max(30);
    let rate = env_num("WEIR_BENCH_LOAD_RATE", 2_000).max(100);
    let plane = setup.plane.as_ref().context("the control plane")?;
    // WEIR_BENCH_MEMORY_TELEMETRY=off: the same with telemetry off, to
    // tell its share from the rest of the agent's.
    let off = std::env::var("WEIR_BENCH_MEMORY_TELEMETRY").is_ok_and(|v| v == "off");
    let flags = if off {
        "--telemetry=false"
    } else {
        "--trace-sample-rate=1"
    };
    let agent = AgentProcess::start(&[plane.endpoint()], "bench-down", &[flags.to_owned()])?;
    agent
        .wait_for_endpoints("default", "bench", 2, SETTLE)
        .await?;
    let pid = agent.pid();
    // The control plane goes; the agent routes on its last view.
    drop(setup.plane.take());
    let start = rss_mib(pid).unwrap_or(f64::NAN);
    println!();
    println!(
        "memory, control plane down: {rate} req/s for {total} s through an agent {}",
        if off {
            "with telemetry off"
        } else {
            "sampling every trace"
        }
    );
    println!("| after (s) | requests | weir-agent RSS (MiB) |");
    println!("|---:|---:|---:|");
    println!("| 0 | 0 | {start:.1} |");
    let mut elapsed = 0;
    let mut sent = 0;
    let mut samples = Vec::new();
    while elapsed < total {
        let chunk = 30.min(total - elapsed);
        sent += load(&setup.dir, &url(&agent), rate, chunk)?;
        elapsed += chunk;
        let rss = rss_mib(pid).unwrap_or(f64::NAN);
        samples.push((elapsed, rss));
        println!("| {elapsed} | {sent} | {rss:.1} |");
    }
    let after_first_minute = samples
        .iter()
        .find(|(t, _)| *t >= 60)
        .map_or(start, |(_, r)| *r);
    let last = samples.last().map_or(start, |(_, r)| *r);
    let peak = samples.iter().map(|(_, r)| *r).fold(start, f64::max);
    println!(
        "RSS: {start:.1} MiB at the start, {after_first_minute:.1} after a minute, {last:.1} at the end (peak {peak:.1}); growth after the first minute {:+.1} MiB",
        last - after_first_minute
    );
    let metrics = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
    for name in [
        "weir_agent_spans_dropped_total",
        "weir_agent_telemetry_batches_dropped_total",
    ] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("(none)");
        println!("{line}");
    }
    Ok(())
}

fn main() -> Result<()> {
    bench::main("telemetry", |plan| async move {
        let rounds = usize::try_from(env_num("WEIR_BENCH_ROUNDS", 5).max(1))?;
        let plan = Plan::of(plan.this.clone(), None, rounds);
        let mut setup = set_up(&plan).await?;
        plan.measure(|run| round(&setup, run)).await?;
        memory_with_the_control_plane_down(&mut setup).await
    })
}
