//! The agent's failure handling end to end: a real control plane on etcd,
//! a real `weir-agent`, and instances that die, fail, refuse or hang.
//! kill -9 of an instance under load costs no caller an event; 4xx is
//! never retried and a 5xx storm stays within the retry budget; a gRPC
//! UNAVAILABLE is retried on another instance; a deadline answers 504 but
//! never cuts a stream.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use weir_client::{
    policy::{Retry, Timeout, TrafficPolicy},
    Protocol,
};
use weir_tests::{
    agent::AgentProcess,
    agents::put_policy_applied,
    fixtures::{instance, HttpInstance, SubscriberInstance},
    poll_until,
    sample::SampleProcess,
    start_one,
};

const SETTLE: Duration = Duration::from_secs(10);

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

fn retry(attempts: u32) -> Option<Retry> {
    Some(Retry {
        attempts,
        backoff_base_ms: 5,
        backoff_max_ms: 50,
        ..Retry::default()
    })
}

/// One binary-mode CloudEvent to `service` through the agent: the status
/// and the `weir-reason` header.
async fn event(
    http: &Http,
    agent: &AgentProcess,
    service: &str,
    id: usize,
) -> Result<(u16, String)> {
    let request = Request::post(format!(
        "http://{}/v1/services/{service}/work",
        agent.ingress_addr()
    ))
    .header("ce-specversion", "1.0")
    .header("ce-id", format!("e-{id}"))
    .header("ce-source", "/tests/retry")
    .header("ce-type", "com.example.work")
    .header("content-type", "application/json")
    .body(Full::new(Bytes::from_static(b"{\"n\":1}")))?;
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("weir-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    response.into_body().collect().await?;
    Ok((status, reason))
}

/// `service`'s endpoints in the agent's `/v1/state`.
async fn endpoints(agent: &AgentProcess, service: &str) -> Result<Vec<serde_json::Value>> {
    let state = agent.state().await?;
    state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == service))
        .and_then(|r| r["endpoints"].as_array().cloned())
        .with_context(|| format!("no route for {service} in {state}"))
}

/// The sum of a counter over the series of the agent's `/metrics` whose
/// line starts with `name{` and contains every one of `labels`.
async fn counter(agent: &AgentProcess, name: &str, labels: &[&str]) -> Result<f64> {
    let raw = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
    let mut sum = 0.0;
    for line in raw.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !rest.starts_with('{') || !labels.iter().all(|l| rest.contains(l)) {
            continue;
        }
        let value = rest.rsplit(' ').next().unwrap_or("");
        sum += value
            .parse::<f64>()
            .with_context(|| format!("metric line {line:?}"))?;
    }
    Ok(sum)
}

#[tokio::test]
async fn a_killed_instance_costs_no_caller_an_event() -> Result<()> {
    let (_etcd, plane, client) = start_one("retry-kill").await?;
    let mut samples = Vec::new();
    for n in 0..3 {
        samples.push(SampleProcess::start(
            &plane.endpoint(),
            "orders",
            &format!("orders-{n}"),
            &[],
        )?);
    }
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            retry: retry(3),
            ..TrafficPolicy::default()
        },
    )
    .await?;

    // 16 callers, each sending events one after another until stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let failures: Arc<Mutex<Vec<String>>> = Arc::default();
    let agent = Arc::new(agent);
    let mut callers = Vec::new();
    for caller in 0..16 {
        let (stop, sent, failures, agent) =
            (stop.clone(), sent.clone(), failures.clone(), agent.clone());
        callers.push(tokio::spawn(async move {
            let http = http();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = caller * 1_000_000 + n;
                n += 1;
                let outcome = event(&http, &agent, "orders", id).await;
                sent.fetch_add(1, Ordering::Relaxed);
                match outcome {
                    Ok((status, _)) if (200..300).contains(&status) => {}
                    Ok((status, reason)) => failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("event {id}: {status} {reason}")),
                    Err(e) => failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("event {id}: {e:#}")),
                }
            }
        }));
    }
    let counted = |n: usize| {
        let sent = sent.clone();
        async move {
            poll_until(
                SETTLE,
                &format!("{n} events sent"),
                || async { Ok(sent.load(Ordering::Relaxed)) },
                |s| *s >= n,
            )
            .await
            .map(drop)
        }
    };
    counted(300).await?;

    samples[1].kill()?;
    let killed = Instant::now();
    let before = sent.load(Ordering::Relaxed);
    // Ejected at the first refused or reset connection: how long after
    // the kill, from the agent's own account (`ejected_ms` is the time
    // since the ejection).
    let dead = poll_until(
        SETTLE,
        "orders-1 ejected",
        || endpoints(&agent, "orders"),
        |eps| {
            eps.iter()
                .any(|e| e["id"] == "orders-1" && e["ejected_ms"].is_u64())
        },
    )
    .await?
    .into_iter()
    .find(|e| e["id"] == "orders-1")
    .context("orders-1")?;
    let ejected_after = killed.elapsed().saturating_sub(Duration::from_millis(
        dead["ejected_ms"].as_u64().unwrap_or(0),
    ));
    ensure!(
        ejected_after <= Duration::from_secs(1),
        "ejected {ejected_after:?} after the kill"
    );
    // More load: the dead instance stays out (were it picked again, the
    // agent would have had to admit it back and eject it once more).
    counted(before + 600).await?;
    let retried_before =
        counter(&agent, "weir_agent_retries_total", &["service=\"orders\""]).await?;
    counted(before + 900).await?;
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await?;
    }
    let dead = endpoints(&agent, "orders")
        .await?
        .into_iter()
        .find(|e| e["id"] == "orders-1")
        .context("orders-1")?;
    ensure!(
        dead["ejected_ms"].is_u64() && dead["ejections"] == 1,
        "orders-1 stayed out of rotation: {dead}"
    );
    let failures = failures.lock().unwrap_or_else(|p| p.into_inner()).clone();
    ensure!(
        failures.is_empty(),
        "{} of {} callers' events failed: {:?}",
        failures.len(),
        sent.load(Ordering::Relaxed),
        &failures[..failures.len().min(5)]
    );
    // The kill was felt: some attempts hit the dead instance and were
    // retried, and none after it was out of rotation.
    let retried = counter(&agent, "weir_agent_retries_total", &["service=\"orders\""]).await?;
    eprintln!(
        "kill -9: ejected {ejected_after:?} after the kill; {} events, {retried} retries, 0 failed",
        sent.load(Ordering::Relaxed)
    );
    ensure!(retried >= 1.0, "no retry: the kill went unnoticed");
    ensure!(
        retried == retried_before,
        "retries went on after the ejection: {retried_before} then {retried}"
    );
    Ok(())
}

#[tokio::test]
async fn a_4xx_is_never_retried_and_a_5xx_storm_stays_within_the_budget() -> Result<()> {
    let (_etcd, plane, client) = start_one("retry-budget").await?;
    let servers = [
        HttpInstance::start().await?,
        HttpInstance::start().await?,
        HttpInstance::start().await?,
    ];
    for (n, s) in servers.iter().enumerate() {
        client
            .register(instance(
                "default",
                "orders",
                &format!("i{n}"),
                u32::from(s.port()),
            ))
            .await?;
    }
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            retry: Some(Retry {
                budget_percent: 20.0,
                ..retry(3).expect("some")
            }),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    let http = http();
    let attempts = || -> usize {
        servers
            .iter()
            .map(|s| s.hits().iter().filter(|h| h.path == "/work").count())
            .sum()
    };

    for s in &servers {
        s.set_status("/work", 409);
    }
    const FOUR: usize = 100;
    for id in 0..FOUR {
        let (status, _) = event(&http, &agent, "orders", id).await?;
        ensure!(status == 409, "the instance's 409 passes on: {status}");
    }
    ensure!(
        attempts() == FOUR,
        "a 4xx was retried: {} attempts",
        attempts()
    );

    // Every instance fails. Without a budget: 3 attempts each.
    for s in &servers {
        s.set_status("/work", 503);
    }
    const FIVE: usize = 300;
    for id in 0..FIVE {
        let (status, _) = event(&http, &agent, "orders", FOUR + id).await?;
        ensure!(status == 503, "the last 503 passes on: {status}");
    }
    let storm = attempts() - FOUR;
    // 20% of the window's requests (the 4xx ones count too) plus the
    // floor of 3 a second over 10 seconds.
    let bound = FIVE + (FOUR + FIVE) / 5 + 30;
    ensure!(
        storm <= bound,
        "{storm} attempts for {FIVE} requests, more than the budget's {bound}"
    );
    ensure!(storm > FIVE, "5xx were retried at all: {storm}");
    eprintln!(
        "5xx storm: {storm} attempts for {FIVE} requests (budget bound {bound}, 3x = {})",
        3 * FIVE
    );
    let exhausted = counter(
        &agent,
        "weir_agent_retry_budget_exhausted_total",
        &["service=\"orders\""],
    )
    .await?;
    ensure!(exhausted >= 1.0, "the budget ran out and it was counted");
    Ok(())
}

#[tokio::test]
async fn a_grpc_unavailable_is_retried_on_another_instance() -> Result<()> {
    use std::collections::HashMap;

    use weir_proto::{
        cloudevents::v1::CloudEvent,
        events::v1::{publisher_client::PublisherClient, SendRequest},
    };

    let (_etcd, plane, client) = start_one("retry-grpc").await?;
    let subscribers = [
        SubscriberInstance::start().await?,
        SubscriberInstance::start().await?,
    ];
    for (n, s) in subscribers.iter().enumerate() {
        let mut i = instance("default", "audit", &format!("g{n}"), u32::from(s.port()));
        i.protocol = Protocol::Grpc as i32;
        client.register(i).await?;
    }
    subscribers[0].refuse_with(Some(tonic::Status::unavailable("draining")));
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "audit", 2, SETTLE)
        .await?;
    put_policy_applied(
        &client,
        "audit",
        TrafficPolicy {
            retry: retry(2),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    let mut publisher =
        PublisherClient::connect(format!("http://{}", agent.ingress_addr())).await?;
    let send = |id: usize| SendRequest {
        namespace: String::new(),
        service: "audit".into(),
        path: String::new(),
        event: Some(CloudEvent {
            id: format!("a-{id}"),
            source: "/tests/retry".into(),
            spec_version: "1.0".into(),
            r#type: "com.example.audit".into(),
            attributes: HashMap::new(),
            data: None,
        }),
    };
    const N: usize = 20;
    for id in 0..N {
        let answer = publisher.send(send(id)).await?.into_inner();
        ensure!(answer.instance_id == "g1", "{answer:?}");
    }
    let refused = subscribers[0].deliveries().len();
    ensure!(subscribers[1].deliveries().len() == N);
    ensure!(
        (N / 4..=N).contains(&refused),
        "round robin tried g0 first about every other time: {refused}"
    );
    // A status that is no outage is the instance's answer: not retried.
    subscribers[0].refuse_with(Some(tonic::Status::invalid_argument("no")));
    let (mut invalid, before) = (0, subscribers[1].deliveries().len());
    for id in N..2 * N {
        match publisher.send(send(id)).await {
            Ok(_) => {}
            Err(status) => {
                ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
                invalid += 1;
            }
        }
    }
    ensure!(invalid > 0, "g0 answered some");
    ensure!(
        subscribers[1].deliveries().len() - before == N - invalid,
        "an INVALID_ARGUMENT was retried"
    );
    Ok(())
}

#[tokio::test]
async fn a_deadline_answers_504_and_never_cuts_a_stream() -> Result<()> {
    use tokio_stream::StreamExt;
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };

    let (_etcd, plane, client) = start_one("retry-deadline").await?;
    // An instance that accepts connections and never answers.
    let hang = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let hang_port = hang.local_addr()?.port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = hang.accept().await {
            open.push(socket);
        }
    });
    client
        .register(instance("default", "hang", "h0", u32::from(hang_port)))
        .await?;
    // A gRPC instance with a server stream (health Watch).
    let health = weir_tests::fixtures::HealthInstance::start("shop").await?;
    let mut g = instance("default", "health", "g0", u32::from(health.port()));
    g.protocol = Protocol::Grpc as i32;
    client.register(g).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "hang", 1, SETTLE)
        .await?;
    agent
        .wait_for_endpoints("default", "health", 1, SETTLE)
        .await?;
    const DEADLINE: Duration = Duration::from_millis(300);
    let deadline = Some(Timeout {
        total_ms: DEADLINE.as_millis() as u32,
        shadow: false,
    });
    for service in ["hang", "health"] {
        put_policy_applied(
            &client,
            service,
            TrafficPolicy {
                timeout: deadline,
                ..TrafficPolicy::default()
            },
        )
        .await?;
    }

    let start = Instant::now();
    let (status, reason) = event(&http(), &agent, "hang", 1).await?;
    ensure!(status == 504 && reason == "timeout", "{status} {reason}");
    ensure!(
        start.elapsed() < DEADLINE * 10,
        "answered {:?} after the deadline",
        start.elapsed()
    );

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", agent.ingress_addr()))?
            .origin("http://health".parse()?)
            .connect()
            .await?;
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: "shop".into(),
        })
        .await?
        .into_inner();
    let first = tokio::time::timeout(SETTLE, watch.next())
        .await?
        .context("stream open")??;
    ensure!(first.status == ServingStatus::Serving as i32);
    // Well past the deadline, the stream is still there.
    tokio::time::sleep(DEADLINE * 3).await;
    health
        .set("shop", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(SETTLE, watch.next())
        .await?
        .context("the stream was cut")??;
    ensure!(second.status == ServingStatus::NotServing as i32);
    held.abort();
    Ok(())
}
