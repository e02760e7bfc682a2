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
//! **weir fast** (`bench.fast`, answered once written), **stream dur.**
//! and **stream fast** (the same two topics through
//! `weir_client::TopicPublisher`: every publisher's events share one
//! `Publisher/PublishStream`, as JetStream's publishers share one
//! connection), **jetstream**
//! (publish with ack from `async-nats`, no consumer) and **js+consumer**
//! (the same to a subject a pull consumer in this process takes and acks
//! message by message, as the agent delivers to its subscriber), at 1,
//! 16 and 128 concurrent
//! publishers, each sending 1 KiB events one after another for
//! `WEIR_BENCH_SECS` (default 3): events per second and the latency from
//! request to answer (p50, p99). Weir's publishers each hold one
//! keep-alive HTTP/1.1 connection and write requests the way `wrk` does
//! (a lean client: the load generator shares the 2 cores with what it
//! measures); JetStream's share `async-nats`'s one connection. After
//! each Weir and js+consumer figure the bench waits until everything
//! published was delivered (consumed) and reports the end-to-end rate
//! (events over publishing plus draining time), and the server's CPU per
//! event (the agent's, or nats-server's, from `/proc`, over publishing
//! and draining); after every figure it runs `sync`,
//! so no target's writes slow the next one's fsyncs. JetStream 2.9
//! acknowledges before any fsync (it syncs every 2 minutes and cannot be
//! told otherwise): its ack means "in the page cache", a weaker promise
//! than Weir's durable answer.
//!
//! Knobs: `WEIR_BENCH_ROUNDS` (default 3), `WEIR_BENCH_SECS`,
//! `WEIR_BENCH_TARGETS` (only the targets whose names contain one of
//! these comma-separated words, for profiling one of them).

use std::{
    path::Path,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use weir_client::{
    policy::{Delivery, TrafficPolicy},
    CloudEvent, TopicPublisher,
};
use weir_tests::{
    agent::AgentProcess,
    agents::put_policy_applied,
    bench::{
        self, clock_ticks, cpu_ticks, env_num,
        peers::{alive, free_ports, need, nginx, wait_port, Guard},
        percentile, Plan,
    },
    fixtures::instance,
    poll_until, ControlPlaneProcess,
};

const SETTLE: Duration = Duration::from_secs(10);
/// The longest the agent may take to deliver what a measurement left.
const DRAIN: Duration = Duration::from_secs(120);
const PUBLISHERS: [usize; 3] = [1, 16, 128];

/// Where one target's events go.
#[derive(Clone)]
enum Target {
    /// The agent's ingress, `POST {path}`.
    Weir {
        addr: std::net::SocketAddr,
        path: String,
    },
    /// The agent's `PublishStream` through `weir-client`: every publisher
    /// shares one stream (as JetStream's share one connection).
    WeirStream {
        publisher: TopicPublisher,
        topic: &'static str,
    },
    JetStream(JetStream),
}

/// A JetStream subject to publish to; with `consumed`, a pull consumer
/// takes and acks every message published there, the way the agent
/// delivers every event to its subscriber.
#[derive(Clone)]
struct JetStream {
    js: async_nats::jetstream::Context,
    subject: &'static str,
    consumed: Option<Consumed>,
}

/// Messages published (and acked by the server) and taken (and acked) by
/// the consumer.
#[derive(Clone, Default)]
struct Consumed {
    published: Arc<AtomicU64>,
    taken: Arc<AtomicU64>,
}

/// One publisher's link to its target.
enum Link {
    Weir(H1),
    WeirStream(TopicPublisher, &'static str),
    JetStream(JetStream),
}

/// A minimal HTTP/1.1 keep-alive client, one request at a time, as `wrk`
/// sends them: the load generator shares the 2 cores with what it
/// measures, so it should cost little (hyper's pooled client took about
/// twice the CPU per request).
struct H1 {
    stream: tokio::net::TcpStream,
    path: String,
    out: Vec<u8>,
    read: Vec<u8>,
}

impl H1 {
    async fn connect(addr: std::net::SocketAddr, path: &str) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            path: path.to_owned(),
            out: Vec::with_capacity(2048),
            read: Vec::with_capacity(1024),
        })
    }

    /// Sends one binary-mode CloudEvent; its answer's status.
    async fn post(&mut self, id: u64, body: &[u8]) -> Result<u16> {
        use std::io::Write as _;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.out.clear();
        write!(
            self.out,
            "POST {} HTTP/1.1\r\nhost: bench\r\nce-specversion: 1.0\r\nce-id: {id}\r\nce-source: /bench\r\nce-type: bench.event\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
            self.path,
            body.len()
        )?;
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out).await?;
        self.read.clear();
        loop {
            if let Some(end) = self.read.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.read[..end])?;
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .context("no status in the answer")?;
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse().ok())?
                    })
                    .context("an answer without content-length")?;
                let total = end + 4 + length;
                while self.read.len() < total {
                    if self.stream.read_buf(&mut self.read).await? == 0 {
                        anyhow::bail!("the agent closed the connection");
                    }
                }
                return Ok(status);
            }
            if self.stream.read_buf(&mut self.read).await? == 0 {
                anyhow::bail!("the agent closed the connection");
            }
        }
    }
}

impl Target {
    async fn link(&self) -> Result<Link> {
        Ok(match self {
            Target::Weir { addr, path } => Link::Weir(H1::connect(*addr, path).await?),
            Target::WeirStream { publisher, topic } => Link::WeirStream(publisher.clone(), topic),
            Target::JetStream(j) => Link::JetStream(j.clone()),
        })
    }
}

impl Link {
    async fn publish(&mut self, id: u64, body: &Bytes) -> Result<()> {
        match self {
            Link::Weir(h1) => {
                let status = h1.post(id, body).await?;
                anyhow::ensure!(status == 202, "the agent answered {status}");
            }
            Link::WeirStream(publisher, topic) => {
                use weir_proto::cloudevents::v1::cloud_event::Data;
                publisher
                    .publish(
                        *topic,
                        CloudEvent {
                            id: id.to_string(),
                            source: "/bench".into(),
                            spec_version: "1.0".into(),
                            r#type: "bench.event".into(),
                            data: Some(Data::BinaryData(body.clone())),
                            ..CloudEvent::default()
                        },
                    )
                    .await?;
            }
            Link::JetStream(j) => {
                j.js.publish(j.subject, body.clone())
                    .await?
                    .await
                    .map_err(|e| anyhow::anyhow!("no ack: {e}"))?;
                if let Some(c) = &j.consumed {
                    c.published.fetch_add(1, Relaxed);
                }
            }
        }
        Ok(())
    }
}

/// `publishers` closed-loop publishers for `secs`: (events, seconds,
/// p50 ms, p99 ms).
async fn measure(target: &Target, publishers: usize, secs: u64) -> Result<(usize, f64, f64, f64)> {
    let body = Bytes::from(vec![b'x'; 1024]);
    let mut links = Vec::with_capacity(publishers);
    for _ in 0..publishers {
        links.push(target.link().await?);
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = links
        .into_iter()
        .enumerate()
        .map(|(p, mut link)| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut id = (p as u64) << 40;
                while Instant::now() < end {
                    let sent = Instant::now();
                    link.publish(id, &body).await?;
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
        all.len(),
        elapsed,
        ms(percentile(&all, 0.50)),
        ms(percentile(&all, 0.99)),
    ))
}

/// Waits until the consumer has taken every message published; how long
/// that took.
async fn consumed(c: &Consumed) -> Result<Duration> {
    let start = Instant::now();
    poll_until(
        DRAIN,
        "the consumer took every message",
        || async { Ok((c.published.load(Relaxed), c.taken.load(Relaxed))) },
        |(published, taken)| taken >= published,
    )
    .await?;
    Ok(start.elapsed())
}

/// Waits until the agent has delivered everything it accepted; how long
/// that took.
async fn drained(agent: &AgentProcess) -> Result<Duration> {
    let start = Instant::now();
    poll_until(
        DRAIN,
        "the outbox drained",
        || async {
            let metrics = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
            Ok(metrics
                .lines()
                .find_map(|l| l.strip_prefix("weir_agent_outbox_pending_deliveries "))
                .and_then(|v| v.trim().parse::<f64>().ok()))
        },
        |pending| *pending == Some(0.0),
    )
    .await?;
    Ok(start.elapsed())
}

struct Setup {
    targets: Vec<(&'static str, Target)>,
    secs: u64,
    agent: AgentProcess,
    /// nats-server's pid, for its CPU time.
    nats_pid: u32,
    _keep: (Vec<Guard>, ControlPlaneProcess, tempfile::TempDir),
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
    let nats_pid = guards[1].0.id();
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
    let ingress = agent.ingress_addr();
    let js = async_nats::jetstream::new(
        async_nats::connect(format!("127.0.0.1:{nats_port}"))
            .await
            .context("cannot connect to nats-server")?,
    );
    let stream = js
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".into(),
            subjects: vec!["bench.>".into()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the stream: {e}"))?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("bench-sub".into()),
            filter_subject: "bench.consumed".into(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("cannot create the consumer: {e}"))?;
    let consumed = Consumed::default();
    {
        let taken = consumed.taken.clone();
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| anyhow::anyhow!("cannot consume: {e}"))?;
        tokio::spawn(async move {
            use futures::StreamExt as _;
            while let Some(Ok(m)) = messages.next().await {
                if m.ack().await.is_err() {
                    break;
                }
                taken.fetch_add(1, Relaxed);
            }
        });
    }
    let publisher = TopicPublisher::connect(format!("http://{ingress}")).await?;
    let targets = vec![
        (
            "weir durable",
            Target::Weir {
                addr: ingress,
                path: "/v1/topics/bench.durable".to_owned(),
            },
        ),
        (
            "weir fast",
            Target::Weir {
                addr: ingress,
                path: "/v1/topics/bench.fast".to_owned(),
            },
        ),
        (
            "stream dur.",
            Target::WeirStream {
                publisher: publisher.clone(),
                topic: "bench.durable",
            },
        ),
        (
            "stream fast",
            Target::WeirStream {
                publisher,
                topic: "bench.fast",
            },
        ),
        (
            "jetstream",
            Target::JetStream(JetStream {
                js: js.clone(),
                subject: "bench.events",
                consumed: None,
            }),
        ),
        (
            "js+consumer",
            Target::JetStream(JetStream {
                js,
                subject: "bench.consumed",
                consumed: Some(consumed),
            }),
        ),
    ];
    let targets = match std::env::var("WEIR_BENCH_TARGETS") {
        Ok(only) => targets
            .into_iter()
            .filter(|(name, _)| only.split(',').any(|w| name.contains(w.trim())))
            .collect(),
        Err(_) => targets,
    };
    anyhow::ensure!(!targets.is_empty(), "WEIR_BENCH_TARGETS left no target");
    // Warm-up: every target answers.
    for (name, t) in &targets {
        t.link()
            .await?
            .publish(0, &Bytes::from_static(b"warm-up"))
            .await
            .with_context(|| format!("warming up {name}"))?;
    }
    Ok(Setup {
        targets,
        secs: env_num("WEIR_BENCH_SECS", 3).max(1),
        agent,
        nats_pid,
        _keep: (guards, plane, data),
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
                    // The server's CPU: the agent's, or nats-server's.
                    let server = match target {
                        Target::JetStream(_) => setup.nats_pid,
                        _ => setup.agent.pid(),
                    };
                    for p in PUBLISHERS {
                        let cpu_before = cpu_ticks(server);
                        let (events, secs, p50, p99) = measure(target, p, setup.secs).await?;
                        let rate = events as f64 / secs;
                        // What the agent accepted it also delivers (and
                        // the JetStream consumer takes), while publishes
                        // come and after: the next figure starts once it
                        // is done.
                        let drain = match target {
                            Target::Weir { .. } | Target::WeirStream { .. } => {
                                Some(drained(&setup.agent).await?)
                            }
                            Target::JetStream(JetStream {
                                consumed: Some(c), ..
                            }) => Some(consumed(c).await?),
                            Target::JetStream(_) => None,
                        };
                        let delivered = drain.map_or(String::new(), |drain| {
                            let drain = drain.as_secs_f64();
                            let rate = events as f64 / (secs + drain);
                            figures.push(bench::Figure::higher(
                                format!("{name} delivered/s @{p}"),
                                "ev/s",
                                rate,
                            ));
                            format!(", all delivered {drain:.2} s after the last answer ({rate:.0} events/s end to end)")
                        });
                        // Per event accepted, with its delivery (or
                        // consumption) included.
                        let cpu_us = match (cpu_before, cpu_ticks(server)) {
                            (Some(a), Some(b)) if events > 0 => {
                                (b - a) as f64 / clock_ticks() * 1e6 / events as f64
                            }
                            _ => f64::NAN,
                        };
                        figures.push(bench::Figure::lower(
                            format!("{name} server CPU @{p}"),
                            "µs/ev",
                            cpu_us,
                        ));
                        // What this target left in the page cache is
                        // written out before the next one runs, so that
                        // it does not slow the next one's fsyncs.
                        tokio::process::Command::new("sync").status().await?;
                        println!(
                            "  {name:12} {p:>3} publishers: {rate:>8.0} events/s, p50 {p50:.2} ms, p99 {p99:.2} ms, server CPU {cpu_us:.1} µs/event{delivered}"
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
