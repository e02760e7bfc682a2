//! Publishing to a topic through the agent, durable and not, next to NATS
//! JetStream, in one run with interleaved rounds.
//!
//! ```text
//! cargo bench -p weir-tests --bench topics
//! ```
//!
//! Set-up: one nginx upstream (answering 200 to every POST) registered as
//! the one instance of two services, `durable-sub` (its policy sets
//! `delivery.durable_outbox`) subscribed to topic `bench.durable`, and
//! `fast-sub` (no policy) subscribed to `bench.fast`; a `weir-control-plane
//! --dev` and one release `weir-agent` with a data dir on the checkout's
//! disk; and `nats-server` 2.9 with JetStream (file storage) and a stream
//! on `bench.>`. Needs `nginx` and `nats-server` (Debian: `apt-get install
//! nginx nats-server`).
//!
//! Each round measures, in a rotated order, **weir durable** (`POST
//! /v1/topics/bench.durable`, answered once the event is fsync'd),
//! **weir fast** (`bench.fast`, answered once written) and **jetstream**
//! (publish with ack from `async-nats`), at 1, 16 and 128 concurrent
//! publishers, each sending 1 KiB events one after another for
//! `WEIR_BENCH_SECS` (default 3): events per second and the latency from
//! request to answer (p50, p99). JetStream 2.9 acknowledges before any
//! fsync (it syncs every 2 minutes and cannot be told otherwise): its ack
//! means "in the page cache", a weaker promise than Weir's durable answer.
//!
//! Knobs: `WEIR_BENCH_ROUNDS` (default 3), `WEIR_BENCH_SECS`.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use weir_client::policy::{Delivery, TrafficPolicy};
use weir_tests::{
    agent::AgentProcess,
    agents::put_policy_applied,
    bench::{
        self, env_num,
        peers::{alive, free_ports, need, nginx, wait_port, Guard},
        percentile, Plan,
    },
    fixtures::instance,
    poll_until, ControlPlaneProcess,
};

const SETTLE: Duration = Duration::from_secs(10);
const PUBLISHERS: [usize; 3] = [1, 16, 128];

type Http = HttpClient<HttpConnector, Full<Bytes>>;

/// Where one target's events go.
#[derive(Clone)]
enum Target {
    Weir { url: String, http: Http },
    JetStream(async_nats::jetstream::Context),
}

impl Target {
    async fn publish(&self, id: u64, body: &Bytes) -> Result<()> {
        match self {
            Target::Weir { url, http } => {
                let request = hyper::Request::post(url.as_str())
                    .header("ce-specversion", "1.0")
                    .header("ce-id", id.to_string())
                    .header("ce-source", "/bench")
                    .header("ce-type", "bench.event")
                    .header("content-type", "application/octet-stream")
                    .body(Full::new(body.clone()))?;
                let response = http.request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                anyhow::ensure!(status == 202, "the agent answered {status}");
            }
            Target::JetStream(js) => {
                js.publish("bench.events", body.clone())
                    .await?
                    .await
                    .map_err(|e| anyhow::anyhow!("no ack: {e}"))?;
            }
        }
        Ok(())
    }
}

/// `publishers` closed-loop publishers for `secs`: (events/s, p50 ms,
/// p99 ms).
async fn measure(target: &Target, publishers: usize, secs: u64) -> Result<(f64, f64, f64)> {
    let body = Bytes::from(vec![b'x'; 1024]);
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let (target, body) = (target.clone(), body.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut id = (p as u64) << 40;
                while Instant::now() < end {
                    let sent = Instant::now();
                    target.publish(id, &body).await?;
                    latencies.push(sent.elapsed());
                    id += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok((
        all.len() as f64 / elapsed,
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.99)),
    ))
}

struct Setup {
    targets: Vec<(&'static str, Target)>,
    secs: u64,
    _keep: (
        Vec<Guard>,
        ControlPlaneProcess,
        AgentProcess,
        tempfile::TempDir,
    ),
}

fn nats(dir: &Path, port: u16, monitor: u16) -> Result<Guard> {
    let conf = dir.join("js.conf");
    std::fs::write(
        &conf,
        format!(
            "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\njetstream {{ store_dir: \"{}\", max_file_store: 8G, max_memory_store: 256M }}\n",
            dir.join("store").display()
        ),
    )?;
    let child = std::process::Command::new("nats-server")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start nats-server")?;
    Ok(Guard(child))
}

async fn set_up(plan: &Plan) -> Result<Setup> {
    for tool in ["nginx", "nats-server"] {
        need(tool)?;
    }
    // On the checkout's disk (not a tmpfs): fsyncs are what is measured.
    let data = tempfile::Builder::new()
        .prefix("weir-topics-bench")
        .tempdir_in(std::env::current_dir()?)?;
    let [upstream, nats_port, nats_monitor] = free_ports::<3>()?;
    let mut guards = vec![
        nginx(data.path(), "sub", upstream)?,
        nats(data.path(), nats_port, nats_monitor)?,
    ];
    wait_port(upstream, "nginx").await?;
    wait_port(nats_port, "nats-server").await?;
    for (guard, what) in guards.iter_mut().zip(["nginx", "nats-server"]) {
        alive(guard, what)?;
    }
    let plane = ControlPlaneProcess::start_binary(&plan.this.binary, &["--dev".to_owned()])?;
    let client = weir_client::Client::connect([plane.endpoint()]).await?;
    for (service, topic) in [("durable-sub", "bench.durable"), ("fast-sub", "bench.fast")] {
        let mut i = instance("default", service, "n1", u32::from(upstream));
        i.topics = vec![topic.to_owned()];
        client.register(i).await?;
    }
    let agent = AgentProcess::start(
        &[plane.endpoint()],
        "bench-node",
        &[format!(
            "--data-dir={}",
            data.path().join("agent").display()
        )],
    )?;
    put_policy_applied(
        &client,
        "durable-sub",
        TrafficPolicy {
            delivery: Some(Delivery {
                durable_outbox: true,
                ..Delivery::default()
            }),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    poll_until(
        SETTLE,
        "both subscriptions",
        || agent.state(),
        |s| s["subscriptions"].as_array().is_some_and(|a| a.len() == 2),
    )
    .await?;
    let http: Http = HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let ingress = agent.ingress_addr();
    let js = async_nats::jetstream::new(
        async_nats::connect(format!("127.0.0.1:{nats_port}"))
            .await
            .context("cannot connect to nats-server")?,
    );
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("cannot create the stream: {e}"))?;
    let targets = vec![
        (
            "weir durable",
            Target::Weir {
                url: format!("http://{ingress}/v1/topics/bench.durable"),
                http: http.clone(),
            },
        ),
        (
            "weir fast",
            Target::Weir {
                url: format!("http://{ingress}/v1/topics/bench.fast"),
                http,
            },
        ),
        ("jetstream", Target::JetStream(js)),
    ];
    // Warm-up: every target answers.
    for (name, t) in &targets {
        t.publish(0, &Bytes::from_static(b"warm-up"))
            .await
            .with_context(|| format!("warming up {name}"))?;
    }
    Ok(Setup {
        targets,
        secs: env_num("WEIR_BENCH_SECS", 3).max(1),
        _keep: (guards, plane, agent, data),
    })
}

fn main() -> Result<()> {
    bench::main("topics", |plan| async move {
        let rounds = usize::try_from(env_num("WEIR_BENCH_ROUNDS", 3).max(1))?;
        let plan = Plan::of(plan.this.clone(), None, rounds);
        let setup = Arc::new(set_up(&plan).await?);
        plan.measure(|run| {
            let setup = setup.clone();
            async move {
                let mut figures = Vec::new();
                let n = setup.targets.len();
                for k in 0..n {
                    let (name, target) = &setup.targets[(k + run.round) % n];
                    for p in PUBLISHERS {
                        let (rate, p50, p99) = measure(target, p, setup.secs).await?;
                        println!(
                            "  {name:12} {p:>3} publishers: {rate:>8.0} events/s, p50 {p50:.2} ms, p99 {p99:.2} ms"
                        );
                        figures.push(bench::Figure::higher(
                            format!("{name} events/s @{p}"),
                            "ev/s",
                            rate,
                        ));
                        figures.push(bench::Figure::lower(
                            format!("{name} p50 @{p}"),
                            "ms",
                            p50,
                        ));
                        figures.push(bench::Figure::lower(
                            format!("{name} p99 @{p}"),
                            "ms",
                            p99,
                        ));
                    }
                }
                Ok(figures)
            }
        })
        .await
    })
}
