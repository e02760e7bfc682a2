//! A GLOBAL rate limit end to end: a real control plane on etcd and four
//! real `weir-agent`s sending 50, 100, 200 and 400 events/s to one service
//! limited to 300/s across them. The control plane allocates max-min fair
//! shares from the demand the agents report; each agent enforces its own.
//! The shares never sum past the limit, the total accepted is within 5%
//! of the limit, the 50/s agent is never limited, and once one agent is
//! killed the others take its share within 5 s.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use weir_client::policy::{
    rate_limit::{OnExcess, Scope},
    RateLimit, TrafficPolicy,
};
use weir_tests::{
    agent::AgentProcess,
    agents::policy_status_until,
    fixtures::{instance, HttpInstance},
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);
const LIMIT: f64 = 300.0;
const RATES: [u64; 4] = [50, 100, 200, 400];

/// Answers one sender got.
#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    limited: AtomicU64,
    other: AtomicU64,
}

/// Sends `rate` events/s to `orders` through `agent` until `stop`.
fn send(agent: &AgentProcess, rate: u64, stop: Arc<AtomicBool>) -> Arc<Counts> {
    let counts = Arc::new(Counts::default());
    let http: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    let addr = agent.ingress_addr();
    let out = counts.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        while !stop.load(Ordering::Relaxed) {
            ticks.tick().await;
            let (http, out) = (http.clone(), out.clone());
            tokio::spawn(async move {
                let Ok(request) = Request::post(format!("http://{addr}/v1/services/orders/in"))
                    .header("ce-specversion", "1.0")
                    .header("ce-id", "1")
                    .header("ce-source", "/tests/global")
                    .header("ce-type", "com.example.order")
                    .body(Full::new(Bytes::from_static(b"{}")))
                else {
                    return;
                };
                let counter = match http.request(request).await {
                    Ok(r) => {
                        let status = r.status().as_u16();
                        let _ = r.into_body().collect().await;
                        match status {
                            200 => &out.ok,
                            429 => &out.limited,
                            _ => &out.other,
                        }
                    }
                    Err(_) => &out.other,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    counts
}

/// The agent's share of the limit now (`None`: none allocated yet).
async fn share(agent: &AgentProcess) -> Result<Option<f64>> {
    let state = agent.state().await?;
    Ok(state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == "orders"))
        .and_then(|r| r["limits"][0]["share"].as_object().cloned())
        .filter(|s| s["source"] == "allocated")
        .and_then(|s| s["requests_per_second"].as_f64()))
}

async fn shares(agents: &[AgentProcess]) -> Result<Vec<Option<f64>>> {
    let mut out = Vec::new();
    for a in agents {
        out.push(share(a).await?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_share_a_global_limit_max_min_fair() -> Result<()> {
    let (_etcd, plane, client) = start_one("global-limit").await?;
    let orders = HttpInstance::start().await?;
    client
        .register(instance(
            "default",
            "orders",
            "o0",
            u32::from(orders.port()),
        ))
        .await?;
    let mut agents = Vec::new();
    for n in 0..4 {
        agents.push(AgentProcess::start(
            &[plane.endpoint()],
            &format!("node-{n}"),
            &[],
        )?);
    }
    for a in &agents {
        a.wait_for_endpoints("default", "orders", 1, SETTLE).await?;
    }
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: "orders".into(),
                rate_limit: Some(RateLimit {
                    requests_per_second: LIMIT,
                    burst: 30,
                    scope: Scope::Global as i32,
                    on_excess: OnExcess::Reject as i32,
                    ..RateLimit::default()
                }),
                ..TrafficPolicy::default()
            },
            None,
        )
        .await?;
    policy_status_until(
        &client,
        "orders",
        "four agents applying the limit in full",
        |s| s.applied == 4,
    )
    .await?;

    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<Counts>> = agents
        .iter()
        .zip(RATES)
        .map(|(a, rate)| send(a, rate, stop.clone()))
        .collect();
    // Converged: every agent has an allocated share, and the 400/s one no
    // more than an even split of what the 50/s one leaves.
    poll_until(
        SETTLE,
        "allocated shares on every agent",
        || shares(&agents),
        |s| s.iter().all(Option::is_some) && s[3].is_some_and(|x| x < 90.0),
    )
    .await?;

    // 10 s of traffic: count what was accepted, and look at the shares
    // every half second.
    let before: Vec<(u64, u64)> = counts
        .iter()
        .map(|c| {
            (
                c.ok.load(Ordering::Relaxed),
                c.limited.load(Ordering::Relaxed),
            )
        })
        .collect();
    let start = Instant::now();
    let mut max_sum: f64 = 0.0;
    while start.elapsed() < Duration::from_secs(10) {
        let s = shares(&agents).await?;
        let sum: f64 = s.iter().flatten().sum();
        max_sum = max_sum.max(sum);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let span = start.elapsed().as_secs_f64();
    let after: Vec<(u64, u64)> = counts
        .iter()
        .map(|c| {
            (
                c.ok.load(Ordering::Relaxed),
                c.limited.load(Ordering::Relaxed),
            )
        })
        .collect();
    let accepted: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a.0 - b.0).collect();
    let limited: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a.1 - b.1).collect();
    let rate = accepted.iter().sum::<u64>() as f64 / span;
    eprintln!(
        "accepted {accepted:?} limited {limited:?} over {span:.2} s: {rate:.1}/s; most shares summed to {max_sum:.2}"
    );
    ensure!(max_sum <= LIMIT + 1e-6, "the shares summed to {max_sum}");
    ensure!(
        (rate - LIMIT).abs() <= 0.05 * LIMIT,
        "{rate:.1}/s accepted against {LIMIT}/s"
    );
    ensure!(
        counts[0].limited.load(Ordering::Relaxed) == 0,
        "the 50/s agent was limited {} times",
        counts[0].limited.load(Ordering::Relaxed)
    );
    ensure!(
        counts.iter().all(|c| c.other.load(Ordering::Relaxed) == 0),
        "answers other than 200 and 429"
    );

    // The 400/s agent goes: within 5 s the others hold the whole limit.
    let killed = Instant::now();
    agents[3].kill()?;
    let rest = &agents[..3];
    poll_until(
        Duration::from_secs(5),
        "the others taking the killed agent's share",
        || shares(rest),
        |s| s.iter().flatten().sum::<f64>() > LIMIT - 1.0,
    )
    .await?;
    eprintln!("shares moved {:?} after the kill", killed.elapsed());
    stop.store(true, Ordering::Relaxed);
    Ok(())
}
