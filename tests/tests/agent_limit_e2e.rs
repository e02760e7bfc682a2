//! Rate limits end to end: a real control plane on etcd, a real
//! `weir-agent` and an HTTP instance. A client sending 500 events/s at a
//! 100/s limit gets exactly the rate and the burst through, and 429s that
//! say when to come back and which limit refused; `QUEUE` holds requests
//! up to its wait instead; topic deliveries to a limited subscriber are
//! paced, not refused.

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use weir_client::policy::{
    rate_limit::{OnExcess, Scope},
    RateLimit, TrafficPolicy,
};
use weir_tests::{
    agent::AgentProcess,
    agents::put_policy_applied,
    fixtures::{instance, subscribe, HttpInstance},
    load::{event, http, Answer, Event, Http},
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);

/// One binary-mode event of `event_type` to `service` through the agent.
async fn send(http: &Http, agent: std::net::SocketAddr, service: &str, event_type: &str) -> Answer {
    let e = Event {
        agent,
        service,
        path: "/in",
        source: "/tests/limit",
        event_type,
    };
    event(http, &e).await
}

fn limit(rate: f64, burst: u32, on_excess: OnExcess, max_queue_wait_ms: u32) -> Option<RateLimit> {
    Some(RateLimit {
        requests_per_second: rate,
        burst,
        scope: Scope::PerAgent as i32,
        on_excess: on_excess as i32,
        max_queue_wait_ms,
        shadow: false,
    })
}

/// `orders` with one instance, and an agent routing to it.
async fn setup(
    tag: &str,
) -> Result<(
    weir_tests::Etcd,
    weir_tests::ControlPlaneProcess,
    weir_client::Client,
    HttpInstance,
    AgentProcess,
)> {
    let (etcd, plane, client) = start_one(tag).await?;
    let orders = HttpInstance::start().await?;
    client
        .register(instance(
            "default",
            "orders",
            "o0",
            u32::from(orders.port()),
        ))
        .await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    Ok((etcd, plane, client, orders, agent))
}

/// `orders`'s rate limit buckets in the agent's `/v1/state`.
async fn buckets(agent: &AgentProcess) -> Result<Vec<serde_json::Value>> {
    let state = agent.state().await?;
    Ok(state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == "orders"))
        .and_then(|r| r["limits"].as_array().cloned())
        .unwrap_or_default())
}

#[tokio::test]
async fn a_limit_lets_the_rate_and_the_burst_through_and_refuses_the_rest() -> Result<()> {
    let (_etcd, plane, client, orders, agent) = setup("limit-reject").await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            rate_limit: limit(100.0, 10, OnExcess::Reject, 0),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    poll_until(SETTLE, "the bucket", || buckets(&agent), |b| b.len() == 1).await?;

    // 500/s for 10 s: one event every 2 ms, each on its own task.
    let http = http();
    let addr = agent.ingress_addr();
    let mut ticks = tokio::time::interval(Duration::from_millis(2));
    let mut tasks = Vec::with_capacity(5_000);
    for _ in 0..5_000 {
        ticks.tick().await;
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            send(&http, addr, "orders", "com.example.order").await
        }));
    }
    let mut answers = Vec::with_capacity(tasks.len());
    for t in tasks {
        answers.push(t.await?);
    }
    let mut accepted: Vec<Instant> = Vec::new();
    let mut refused = 0usize;
    for a in answers {
        match a.status {
            200 => accepted.push(a.at),
            429 => {
                refused += 1;
                ensure!(a.reason == "rate-limited", "{a:?}");
                ensure!(a.limit == "default/orders/default", "{a:?}");
                ensure!(a.retry_after == "1", "{a:?}");
            }
            _ => anyhow::bail!("unexpected answer {a:?}"),
        }
    }
    accepted.sort();
    let (first, last) = (accepted[0], accepted[accepted.len() - 1]);
    let span = (last - first).as_secs_f64();
    let bound = 100.0 * span + 10.0 + 1.0;
    let n = accepted.len() as f64;
    eprintln!("{n} accepted, {refused} refused over {span:.3} s; the bound is {bound:.1}");
    ensure!(
        n <= bound && n >= 0.95 * bound,
        "{n} accepted over {span:.3} s: the bound is {bound:.1}"
    );
    ensure!(refused > 3_000, "{refused} refused");
    ensure!(
        orders.hits().len() == accepted.len(),
        "the instance got only what was accepted"
    );
    let out = weir_tests::weirctl_ok(&plane.endpoint(), &["-o", "json", "governance"]).await?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let limit = &json["limits"][0];
    ensure!(
        limit["service"] == "orders"
            && limit["rule"] == "default"
            && limit["rejected"].as_u64() == Some(refused as u64),
        "{out}"
    );
    let b = &buckets(&agent).await?[0];
    ensure!(
        b["rejected"].as_u64() == Some(refused as u64)
            && b["admitted"].as_u64() == Some(accepted.len() as u64),
        "{b}"
    );
    Ok(())
}

/// Sends `n` events at once (each on its own task): the answers.
async fn at_once(agent: &AgentProcess, n: usize) -> Result<Vec<Answer>> {
    let http = http();
    let addr = agent.ingress_addr();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { send(&http, addr, "orders", "com.example.order").await })
        })
        .collect();
    let mut answers = Vec::with_capacity(n);
    for t in tasks {
        answers.push(t.await?);
    }
    Ok(answers)
}

#[tokio::test]
async fn queue_holds_requests_up_to_its_wait_and_a_change_applies_live() -> Result<()> {
    let (_etcd, _plane, client, _orders, agent) = setup("limit-queue").await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            rate_limit: limit(50.0, 5, OnExcess::Queue, 200),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    poll_until(SETTLE, "the bucket", || buckets(&agent), |b| b.len() == 1).await?;

    // 5 go at once; then one every 20 ms, for those that would wait at
    // most 200 ms: about 10 more. The rest are refused at once.
    let answers = at_once(&agent, 20).await?;
    let (ok, refused): (Vec<&Answer>, Vec<&Answer>) = answers.iter().partition(|a| a.status == 200);
    ensure!(
        (15..=17).contains(&ok.len()),
        "{} accepted: {answers:?}",
        ok.len()
    );
    let slowest = ok.iter().map(|a| a.took).max().unwrap_or_default();
    ensure!(
        slowest >= Duration::from_millis(150) && slowest < Duration::from_millis(450),
        "the last accepted waited {slowest:?}"
    );
    for a in &refused {
        ensure!(a.status == 429 && a.reason == "rate-limited", "{a:?}");
        ensure!(
            a.took < Duration::from_millis(150),
            "refused only after {:?}",
            a.took
        );
    }
    let b = &buckets(&agent).await?[0];
    ensure!(
        b["on_excess"] == "queue" && b["queued"].as_u64() >= Some(9),
        "{b}"
    );

    // Full again, then a new limit: the bucket stays full, at the new
    // burst, and refuses past it.
    poll_until(
        SETTLE,
        "a full bucket",
        || buckets(&agent),
        |b| {
            b.first()
                .and_then(|b| b["tokens"].as_f64())
                .is_some_and(|t| t > 4.99)
        },
    )
    .await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            rate_limit: limit(20.0, 20, OnExcess::Reject, 0),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    poll_until(
        SETTLE,
        "the new limit",
        || buckets(&agent),
        |b| b.first().is_some_and(|b| b["burst"] == 20),
    )
    .await?;
    let answers = at_once(&agent, 26).await?;
    let ok = answers.iter().filter(|a| a.status == 200).count();
    ensure!(
        (20..=21).contains(&ok),
        "{ok} accepted of 26 at a burst of 20: {answers:?}"
    );
    ensure!(
        answers
            .iter()
            .all(|a| a.status == 200 || (a.status == 429 && a.took < Duration::from_millis(150))),
        "{answers:?}"
    );
    Ok(())
}

#[tokio::test]
async fn deliveries_to_a_limited_subscriber_are_paced_not_refused() -> Result<()> {
    let (_etcd, plane, client) = start_one("limit-topic").await?;
    let billing = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let agent = AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &[format!("--data-dir={}", data.path().display())],
    )?;
    put_policy_applied(
        &client,
        "billing",
        TrafficPolicy {
            rate_limit: limit(20.0, 1, OnExcess::Reject, 0),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    poll_until(
        SETTLE,
        "billing subscribes",
        || agent.state(),
        |s| s["subscriptions"].as_array().is_some_and(|a| !a.is_empty()),
    )
    .await?;
    let http = http();
    const N: usize = 30;
    for n in 0..N {
        let request = Request::post(format!("http://{}/v1/topics/orders", agent.ingress_addr()))
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("o-{n}"))
            .header("ce-source", "/tests/limit")
            .header("ce-type", "com.example.order")
            .body(Full::new(Bytes::from_static(b"{}")))?;
        let response = http.request(request).await?;
        ensure!(
            response.status() == 202,
            "publish {n}: {}",
            response.status()
        );
        response.into_body().collect().await?;
    }
    poll_until(
        SETTLE,
        "every event delivered",
        || async { Ok(billing.hits().len()) },
        |n| *n >= N,
    )
    .await?;
    let hits = billing.hits();
    ensure!(hits.len() == N, "{} deliveries of {N} events", hits.len());
    // One every 50 ms: 29 intervals take at least 1.45 s.
    let span = hits[N - 1].at - hits[0].at;
    ensure!(
        span >= Duration::from_millis(1_400),
        "{N} deliveries within {span:?}"
    );
    for w in hits.windows(2) {
        ensure!(
            w[1].at - w[0].at >= Duration::from_millis(40),
            "two deliveries {:?} apart",
            w[1].at - w[0].at
        );
    }
    let metrics = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
    ensure!(
        !metrics
            .lines()
            .any(|l| l.starts_with("weir_agent_outbox_deliveries_total{")
                && !l.contains("outcome=\"delivered\"")
                && !l.ends_with(" 0")),
        "a delivery failed or was refused: {metrics}"
    );
    Ok(())
}
