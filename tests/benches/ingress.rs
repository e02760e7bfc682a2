//! The agent's data path next to a direct connection and HAProxy, in one
//! run with interleaved rounds.
//!
//! ```text
//! cargo bench -p weir-tests --bench ingress
//! ```
//!
//! Set-up (once): two nginx upstreams (one worker each, answering 200 to a
//! 1 KiB POST), a `weir-control-plane --dev` with both registered as
//! instances of `bench`, one `weir-agent` (release build) routing to them
//! by round robin, and HAProxy 2.6 (`nbthread 2`, round robin, `http-reuse
//! always`) in front of the same two. The same two are also registered as
//! instances of three more services, each with a traffic policy put through
//! the control plane (the agent must have applied each, and route to both
//! instances of every service, before anything is measured):
//!
//! * `bench-p2c`: `load_balancer` `LEAST_REQUEST` (power of two choices);
//! * `bench-ewma`: `load_balancer` `PEAK_EWMA`;
//! * `bench-retry`: round robin with `retry` (3 attempts) and `timeout`
//!   (2 s total), so the agent holds each request body for a retry, counts
//!   the retry budget and runs the deadline timer. The upstreams are
//!   healthy, so no retry happens: this is the cost of having retries on.
//!
//! Needs `nginx`, `haproxy`, `wrk` and `h2load` (Debian: `apt-get install
//! nginx haproxy wrk nghttp2-client`).
//!
//! Each round measures seven targets in a rotated order: **direct** (nginx 1
//! itself), **agent** (`POST /v1/services/bench/`), **haproxy**, and the
//! same agent process on the policy services: **agent-p2c**
//! (`/v1/services/bench-p2c/`), **agent-ewma**, **agent-retry** and
//! **agent-guard** (a rate limit that never bites and a circuit breaker):
//!
//! * saturation: `wrk -t1 -c16` for `WEIR_BENCH_SECS` (default 5), requests
//!   per second, and the proxy's CPU time per request (from `/proc`; the
//!   agent targets all read the one agent process);
//! * latency at a fixed rate: `h2load --h1 -c16 --rps` at 1,000/s and, for
//!   direct, agent and haproxy, at half the agent's saturation (measured
//!   once before the rounds), p50 / p99 / p99.9 from h2load's per-request
//!   log (it times each request from its actual send, so a figure counts
//!   only when the achieved rate is within 5% of the target; otherwise it
//!   is reported as missing); "added" figures subtract the direct
//!   connection's;
//! * "CPU per request over agent" (for each policy target): its CPU time
//!   per request minus the plain agent's in the same round, the cost of
//!   the balancer or of retries and the deadline.
//!
//! After the rounds: the agent's and HAProxy's RSS idle and with 1,000
//! open keep-alive connections.
//!
//! Proxy, load generator and upstreams share the machine's cores, so
//! saturation figures measure CPU per request as much as the proxy; the
//! fixed-rate figures are the fairer comparison. Knobs: `WEIR_BENCH_ROUNDS`
//! (default 5), `WEIR_BENCH_SECS`, `WEIR_BENCH_SKIP_BUILD`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use weir_client::policy::{
    load_balancer::Algorithm, CircuitBreaker, LoadBalancer, RateLimit, Retry, Timeout,
    TrafficPolicy,
};
use weir_tests::{
    agent::AgentProcess,
    bench::{
        self, env_num,
        peers::{
            alive, cpu_secs, free_ports, need, nginx, wait_port, write_post_script, wrk, Guard,
        },
        rss_mib, Figure, Plan, Run,
    },
    fixtures::instance,
    poll_until, ControlPlaneProcess,
};

/// How long the agent may take to route a service or apply a policy.
const SETTLE: Duration = Duration::from_secs(10);

fn haproxy(dir: &Path, port: u16, upstreams: [u16; 2]) -> Result<Guard> {
    let conf = format!(
        "global\n  nbthread 2\n  maxconn 8000\n\
         defaults\n  mode http\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  default_backend be\n\
         backend be\n  balance roundrobin\n\
           server n1 127.0.0.1:{} pool-max-conn 256\n  server n2 127.0.0.1:{} pool-max-conn 256\n",
        upstreams[0], upstreams[1]
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let child = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start haproxy")?;
    Ok(Guard(child))
}

/// One thing requests are sent to.
struct Target {
    name: &'static str,
    url: String,
    /// The proxy's process, whose CPU time is measured.
    pid: Option<u32>,
    /// Whether latency is also measured at half the agent's saturation.
    half: bool,
}

/// The agent on a service of its own with a traffic policy: the same two
/// upstreams, the same agent process.
struct Variant {
    /// The target's name.
    name: &'static str,
    service: &'static str,
    /// Its policy (namespace and service are filled in).
    policy: TrafficPolicy,
    /// The balancer the agent's `/v1/state` shows once it applied it.
    balancer: &'static str,
}

fn variants() -> Vec<Variant> {
    let balancer = |algorithm: Algorithm| TrafficPolicy {
        load_balancer: Some(LoadBalancer {
            algorithm: algorithm as i32,
            ..LoadBalancer::default()
        }),
        ..TrafficPolicy::default()
    };
    vec![
        Variant {
            name: "agent-p2c",
            service: "bench-p2c",
            policy: balancer(Algorithm::LeastRequest),
            balancer: "least_request",
        },
        Variant {
            name: "agent-ewma",
            service: "bench-ewma",
            policy: balancer(Algorithm::PeakEwma),
            balancer: "peak_ewma",
        },
        Variant {
            name: "agent-retry",
            service: "bench-retry",
            policy: TrafficPolicy {
                retry: Some(Retry {
                    attempts: 3,
                    ..Retry::default()
                }),
                timeout: Some(Timeout {
                    total_ms: 2000,
                    shadow: false,
                }),
                ..TrafficPolicy::default()
            },
            balancer: "round_robin",
        },
        // A rate limit that never bites and a circuit breaker with every
        // trigger on: what the two cost per request when nothing trips.
        Variant {
            name: "agent-guard",
            service: "bench-guard",
            policy: TrafficPolicy {
                rate_limit: Some(RateLimit {
                    requests_per_second: 1_000_000.0,
                    burst: 1_000_000,
                    ..RateLimit::default()
                }),
                circuit_breaker: Some(CircuitBreaker {
                    consecutive_failures: 5,
                    failure_ratio: 0.5,
                    slow_call_ms: 1_000,
                    slow_call_ratio: 0.5,
                    ..CircuitBreaker::default()
                }),
                ..TrafficPolicy::default()
            },
            balancer: "round_robin",
        },
    ]
}

/// Puts `variant`'s policy and waits until the agent applies it in full
/// (the control plane's status) and routes by it (its `/v1/state`).
async fn apply(
    client: &weir_client::Client,
    agent: &AgentProcess,
    variant: &Variant,
) -> Result<()> {
    let service = variant.service;
    weir_tests::agents::put_policy_applied(client, service, variant.policy.clone())
        .await
        .with_context(|| format!("{service}'s policy"))?;
    let attempts = variant.policy.retry.as_ref().map(|r| u64::from(r.attempts));
    let total_ms = variant.policy.timeout.map(|t| u64::from(t.total_ms));
    poll_until(
        SETTLE,
        &format!("the agent routing {service} by its policy"),
        || async {
            let state = agent.state().await?;
            Ok(state["routes"]
                .as_array()
                .and_then(|routes| routes.iter().find(|r| r["service"] == service).cloned())
                .unwrap_or_default())
        },
        |r| {
            r["balancer"] == variant.balancer
                && r["failure"]["retry"]["attempts"].as_u64() == attempts
                && r["failure"]["timeout"]["total_ms"].as_u64() == total_ms
        },
    )
    .await
    .map(drop)
}

struct Setup {
    dir: PathBuf,
    targets: Vec<Target>,
    agent_pid: u32,
    haproxy_pid: u32,
    agent_addr: SocketAddr,
    haproxy_port: u16,
    secs: u64,
    half_rate: u64,
    _keep: (Vec<Guard>, ControlPlaneProcess, AgentProcess),
}

/// `wrk` saturation: (requests/s, requests).
/// Latency percentiles at a fixed rate, or `None` when the rate was not
/// reached.
struct Latency {
    p50: f64,
    p99: f64,
    p999: f64,
}

fn h2load(dir: &Path, url: &str, rate: u64, secs: u64) -> Result<Option<Latency>> {
    let clients = 16u64;
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let out = Command::new("h2load")
        .args(["--h1", "-t1", &format!("-c{clients}")])
        .arg(format!("--rps={}", (rate / clients).max(1)))
        .arg(format!("-D{secs}"))
        .arg("-d")
        .arg(dir.join("body1k"))
        .arg("--log-file")
        .arg(&log)
        .arg(url)
        .output()
        .context("cannot run h2load")?;
    ensure!(
        out.status.success(),
        "h2load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).context("h2load wrote no log")?;
    let mut micros: Vec<f64> = Vec::new();
    let mut failed = 0usize;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(status), Some(d)) = (fields.get(1), fields.get(2)) else {
            continue;
        };
        if *status != "200" {
            failed += 1;
            continue;
        }
        if let Ok(d) = d.parse::<f64>() {
            micros.push(d);
        }
    }
    ensure!(failed == 0, "{failed} requests to {url} did not get 200");
    let achieved = micros.len() as f64 / secs as f64;
    if achieved < rate as f64 * 0.95 {
        println!("  {url} at {rate}/s: only {achieved:.0}/s achieved; latency not reported");
        return Ok(None);
    }
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let rank = ((q * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
        micros[rank - 1] / 1000.0
    };
    Ok(Some(Latency {
        p50: at(0.5),
        p99: at(0.99),
        p999: at(0.999),
    }))
}

async fn set_up(plan: &Plan) -> Result<Setup> {
    for tool in ["nginx", "haproxy", "wrk", "h2load"] {
        need(tool)?;
    }
    let dir = tempfile::tempdir()?.keep();
    std::fs::write(dir.join("body1k"), vec![b'x'; 1024])?;
    write_post_script(&dir)?;
    let [n1, n2, haproxy_port] = free_ports::<3>()?;
    let ports = [n1, n2];
    let mut guards = vec![nginx(&dir, "n1", n1)?, nginx(&dir, "n2", n2)?];
    guards.push(haproxy(&dir, haproxy_port, ports)?);
    for (p, what) in [(n1, "nginx 1"), (n2, "nginx 2"), (haproxy_port, "haproxy")] {
        wait_port(p, what).await?;
    }
    for (guard, what) in guards.iter_mut().zip(["nginx 1", "nginx 2", "haproxy"]) {
        alive(guard, what)?;
    }
    let plane = ControlPlaneProcess::start_binary(&plan.this.binary, &["--dev".to_owned()])?;
    let client = weir_client::Client::connect([plane.endpoint()]).await?;
    let variants = variants();
    let services: Vec<&str> = std::iter::once("bench")
        .chain(variants.iter().map(|v| v.service))
        .collect();
    for service in &services {
        for (n, port) in ports.iter().enumerate() {
            client
                .register(instance(
                    "default",
                    service,
                    &format!("n{}", n + 1),
                    u32::from(*port),
                ))
                .await
                .with_context(|| format!("cannot register n{} of {service}", n + 1))?;
        }
    }
    let agent = AgentProcess::start(&[plane.endpoint()], "bench-node", &[])?;
    for service in &services {
        agent
            .wait_for_endpoints("default", service, 2, SETTLE)
            .await?;
    }
    for variant in &variants {
        apply(&client, &agent, variant).await?;
    }
    let agent_pid = agent.pid();
    let haproxy_pid = guards[2].0.id();
    let agent_addr = agent.ingress_addr();
    let mut targets = vec![
        Target {
            name: "direct",
            url: format!("http://127.0.0.1:{}/", ports[0]),
            pid: None,
            half: true,
        },
        Target {
            name: "agent",
            url: format!("http://{agent_addr}/v1/services/bench/"),
            pid: Some(agent_pid),
            half: true,
        },
        Target {
            name: "haproxy",
            url: format!("http://127.0.0.1:{haproxy_port}/"),
            pid: Some(haproxy_pid),
            half: true,
        },
    ];
    targets.extend(variants.iter().map(|v| Target {
        name: v.name,
        url: format!("http://{agent_addr}/v1/services/{}/", v.service),
        pid: Some(agent_pid),
        half: false,
    }));
    let secs = env_num("WEIR_BENCH_SECS", 5).max(1);
    // Warm-up, and the rate the "half saturation" figures use.
    let (agent_rate, _) = wrk(&dir, &targets[1].url, secs)?;
    // The policy services' connections and balancer state warm up too
    // (and wrk fails on any answer but 200: they are routed).
    for t in &targets[3..] {
        wrk(&dir, &t.url, 1).with_context(|| format!("warming up {}", t.name))?;
    }
    let half_rate = ((agent_rate / 2.0) as u64 / 1000).max(1) * 1000;
    println!(
        "agent saturation (warm-up): {agent_rate:.0} req/s; half-saturation rate: {half_rate}/s"
    );
    Ok(Setup {
        dir,
        targets,
        agent_pid,
        haproxy_pid,
        agent_addr,
        haproxy_port,
        secs,
        half_rate,
        _keep: (guards, plane, agent),
    })
}

async fn round(setup: &Setup, run: Run) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    let n = setup.targets.len();
    let mut p99 = std::collections::HashMap::new();
    let mut cpu_per_request = std::collections::HashMap::new();
    for k in 0..n {
        // Rotate who goes first, so drift within a round hits all alike.
        let t = &setup.targets[(k + run.round) % n];
        let before = cpu_secs(t.pid);
        let (rate, requests) = wrk(&setup.dir, &t.url, setup.secs)?;
        let cpu = cpu_secs(t.pid) - before;
        figures.push(Figure::higher(
            format!("{} saturation", t.name),
            "req/s",
            rate,
        ));
        if t.pid.is_some() {
            ensure!(
                cpu.is_finite() && cpu > 0.0,
                "{} used no CPU under load: is it still running?",
                t.name
            );
            let micros = cpu * 1e6 / requests;
            println!(
                "  {:11} saturation {rate:>9.0} req/s, {micros:.1} µs CPU per request",
                t.name
            );
            figures.push(Figure::lower(
                format!("{} CPU per request", t.name),
                "µs",
                micros,
            ));
            cpu_per_request.insert(t.name, micros);
        } else {
            println!("  {:11} saturation {rate:>9.0} req/s", t.name);
        }
        let rates = [("1000/s", 1000), ("half", setup.half_rate)];
        let rates = if t.half { &rates[..] } else { &rates[..1] };
        for &(label, rate) in rates {
            if let Some(l) = h2load(&setup.dir, &t.url, rate, setup.secs)? {
                println!(
                    "  {:11} at {rate:>6}/s: p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms",
                    t.name, l.p50, l.p99, l.p999
                );
                figures.push(Figure::lower(
                    format!("{} p50 @{label}", t.name),
                    "ms",
                    l.p50,
                ));
                figures.push(Figure::lower(
                    format!("{} p99 @{label}", t.name),
                    "ms",
                    l.p99,
                ));
                figures.push(Figure::lower(
                    format!("{} p99.9 @{label}", t.name),
                    "ms",
                    l.p999,
                ));
                p99.insert((t.name, label), l.p99);
            }
        }
    }
    for proxy in setup.targets.iter().filter(|t| t.pid.is_some()) {
        for label in ["1000/s", "half"] {
            let proxy = proxy.name;
            if let (Some(p), Some(d)) = (p99.get(&(proxy, label)), p99.get(&("direct", label))) {
                figures.push(Figure::lower(
                    format!("{proxy} added p99 @{label}"),
                    "ms",
                    p - d,
                ));
            }
        }
    }
    // What each policy costs: the same agent process, the same upstreams,
    // the same round.
    let plain = cpu_per_request.get("agent").copied();
    for t in setup
        .targets
        .iter()
        .filter(|t| t.name.starts_with("agent-"))
    {
        if let (Some(v), Some(a)) = (cpu_per_request.get(t.name), plain) {
            println!(
                "  {:11} CPU per request over agent: {:+.1} µs",
                t.name,
                v - a
            );
            figures.push(Figure::lower(
                format!("{} CPU per request over agent", t.name),
                "µs",
                v - a,
            ));
        }
    }
    Ok(figures)
}

/// Opens `n` keep-alive connections, each with one request answered, and
/// returns them (open).
async fn hold_connections(
    addr: SocketAddr,
    path: &str,
    n: usize,
) -> Result<Vec<tokio::net::TcpStream>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await?;
        let mut buf = [0u8; 512];
        let got = s.read(&mut buf).await?;
        ensure!(got > 0, "connection closed");
        held.push(s);
    }
    Ok(held)
}

async fn memory(setup: &Setup) -> Result<()> {
    let idle = (rss_mib(setup.agent_pid), rss_mib(setup.haproxy_pid));
    let a = hold_connections(setup.agent_addr, "/v1/services/bench/", 1000).await?;
    let h = hold_connections(
        SocketAddr::from(([127, 0, 0, 1], setup.haproxy_port)),
        "/",
        1000,
    )
    .await?;
    let busy = (rss_mib(setup.agent_pid), rss_mib(setup.haproxy_pid));
    drop((a, h));
    let f = |v: Option<f64>| v.map_or("?".to_owned(), |m| format!("{m:.1}"));
    println!();
    println!("| RSS (MiB) | after the rounds, idle | 1,000 open connections |");
    println!("|---|---:|---:|");
    println!("| weir-agent | {} | {} |", f(idle.0), f(busy.0));
    println!("| haproxy | {} | {} |", f(idle.1), f(busy.1));
    Ok(())
}

fn main() -> Result<()> {
    bench::main("ingress", |plan| async move {
        let rounds = usize::try_from(env_num("WEIR_BENCH_ROUNDS", 5).max(1))?;
        let plan = Plan::of(plan.this.clone(), None, rounds);
        let setup = set_up(&plan).await?;
        let idle = rss_mib(setup.agent_pid);
        println!(
            "weir-agent RSS at start, idle: {:.1} MiB",
            idle.unwrap_or(f64::NAN)
        );
        plan.measure(|run| round(&setup, run)).await?;
        memory(&setup).await
    })
}
