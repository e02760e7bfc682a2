//! Topic delivery end to end: a real control plane on etcd, a real
//! `weir-agent` with a data dir, HTTP subscribers in the test. Every
//! subscribing service gets each published event; a kill -9 of the agent
//! loses no event it answered 2xx.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use weir_tests::{
    agent::AgentProcess,
    fixtures::{instance, subscribe, HttpInstance},
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// Publishes one binary-mode event with id `id` to `topic`: the status and
/// the answer's body.
async fn publish(
    http: &Http,
    agent: std::net::SocketAddr,
    topic: &str,
    id: &str,
) -> Result<(u16, String)> {
    let data = Bytes::from_static(b"{\"total\":1}");
    let (status, _, body) = publish_data(http, agent, topic, id, data).await?;
    Ok((status, body))
}

/// Publishes `data` as event `id`: status, `weir-reason` and body.
async fn publish_data(
    http: &Http,
    agent: std::net::SocketAddr,
    topic: &str,
    id: &str,
    data: Bytes,
) -> Result<(u16, String, String)> {
    let request = Request::post(format!("http://{agent}/v1/topics/{topic}"))
        .header("ce-specversion", "1.0")
        .header("ce-id", id)
        .header("ce-source", "/tests/topics")
        .header("ce-type", "com.example.order.created")
        .header("content-type", "application/json")
        .body(Full::new(data))?;
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    let reason = response
        .headers()
        .get("weir-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, reason, String::from_utf8_lossy(&body).into_owned()))
}

/// The `ce-id`s an instance got, with how many times each.
fn received(server: &HttpInstance) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for hit in server.hits() {
        if let Some(id) = hit.headers.get("ce-id").and_then(|v| v.to_str().ok()) {
            *ids.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    ids
}

/// An agent for node-1 on `plane`, its data (and outbox) in `data`.
fn agent_on(
    plane: &weir_tests::ControlPlaneProcess,
    data: &std::path::Path,
) -> Result<AgentProcess> {
    AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &[format!("--data-dir={}", data.display())],
    )
}

/// Sets `service`'s policy to deliver events in order of their
/// `partitionkey`, and waits until the agents applied it.
async fn order_deliveries(client: &weir_client::Client, service: &str) -> Result<()> {
    use weir_client::policy::{Delivery, TrafficPolicy};
    weir_tests::agents::put_policy_applied(
        client,
        service,
        TrafficPolicy {
            delivery: Some(Delivery {
                ordered: true,
                ..Delivery::default()
            }),
            ..TrafficPolicy::default()
        },
    )
    .await
    .map(drop)
}

/// Waits until the agent knows `n` subscribing services of `topic`.
async fn wait_for_subscribers(agent: &AgentProcess, topic: &str, n: usize) -> Result<()> {
    poll_until(
        SETTLE,
        &format!("{n} subscribers of {topic}"),
        || agent.state(),
        |s| {
            s["subscriptions"]
                .as_array()
                .is_some_and(|a| a.iter().filter(|x| x["topic"] == topic).count() == n)
        },
    )
    .await
    .map(drop)
}

#[tokio::test]
async fn every_subscribing_service_gets_each_event_once() -> Result<()> {
    let (_etcd, plane, client) = start_one("topics-fanout").await?;
    let billing = HttpInstance::start().await?;
    let billing_old = HttpInstance::start().await?;
    let audit = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    // Mid-rollout: this instance of billing does not list the topic.
    subscribe(&client, "billing", "b1", &billing_old, &[]).await?;
    // Audit takes its deliveries at a path of its own.
    let mut a0 = instance("default", "audit", "a0", u32::from(audit.port()));
    a0.topics = vec!["orders".into(), "refunds".into()];
    a0.metadata
        .insert("weir.delivery.path".into(), "/events/in".into());
    client.register(a0).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 2).await?;
    let http = http();
    const N: usize = 200;
    for n in 0..N {
        let (status, body) =
            publish(&http, agent.ingress_addr(), "orders", &format!("o-{n}")).await?;
        ensure!(status == 202, "{status} {body}");
        if n == 0 {
            let answer: serde_json::Value = serde_json::from_str(&body)?;
            ensure!(answer["id"] == "o-0", "{answer}");
            ensure!(
                answer["subscribers"] == serde_json::json!(["audit", "billing"]),
                "{answer}"
            );
        }
    }
    poll_until(
        SETTLE,
        "both services got every event",
        || async { Ok((received(&billing).len(), received(&audit).len())) },
        |(b, a)| *b == N && *a == N,
    )
    .await?;
    ensure!(
        received(&billing).values().all(|n| *n == 1),
        "a duplicate without a failure"
    );
    let metrics = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
    let delivered = metrics
        .lines()
        .find(|l| {
            l.starts_with("weir_agent_outbox_deliveries_total{")
                && l.contains("service=\"audit\"")
                && l.contains("outcome=\"delivered\"")
        })
        .context("audit's delivered count")?;
    ensure!(delivered.ends_with(&format!(" {N}")), "{delivered}");
    ensure!(
        billing_old.hits().is_empty(),
        "an instance not listing the topic got events"
    );
    let hit = &audit.hits()[0];
    ensure!(
        hit.path == "/events/in",
        "audit got its events at {}",
        hit.path
    );
    ensure!(billing.hits()[0].path == "/", "{}", billing.hits()[0].path);
    ensure!(hit.headers["ce-type"] == "com.example.order.created");
    ensure!(hit.body == Bytes::from_static(b"{\"total\":1}"));
    // Nobody subscribes: accepted and dropped (the agent's default).
    let (status, body) = publish(&http, agent.ingress_addr(), "nobody", "x-1").await?;
    ensure!(
        status == 202 && body.contains("\"subscribers\":[]"),
        "{status} {body}"
    );
    // Not a CloudEvent: a 400 that says so.
    let plain = http
        .request(
            Request::post(format!("http://{}/v1/topics/orders", agent.ingress_addr()))
                .body(Full::new(Bytes::from_static(b"hello")))?,
        )
        .await?;
    ensure!(plain.status() == 400);
    Ok(())
}

#[tokio::test]
async fn a_slow_delivery_holds_up_only_its_own_key() -> Result<()> {
    const SLOW: Duration = Duration::from_secs(3);
    let (_etcd, plane, client) = start_one("topics-slow").await?;
    let billing = HttpInstance::start().await?;
    billing.delay_when("ce-id", "slow", SLOW);
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    order_deliveries(&client, "billing").await?;
    let http = http();
    let publish_keyed = |id: String, key: &'static str| {
        let request = Request::post(format!("http://{}/v1/topics/orders", agent.ingress_addr()))
            .header("ce-specversion", "1.0")
            .header("ce-id", id.as_str())
            .header("ce-source", "/tests/topics")
            .header("ce-type", "com.example.order.created")
            .header("ce-partitionkey", key)
            .body(Full::new(Bytes::from_static(b"{}")));
        let http = http.clone();
        async move {
            let response = http.request(request?).await?;
            ensure!(response.status() == 202, "{id}: {}", response.status());
            anyhow::Ok(())
        }
    };
    publish_keyed("slow".into(), "a").await?;
    let slow = poll_until(
        SETTLE,
        "the slow delivery at billing",
        || async { Ok(billing.hits()) },
        |hits| !hits.is_empty(),
    )
    .await?[0]
        .at;
    // While it is in flight, the window goes on: key b's events pass, and
    // key a's next waits for it, in order.
    publish_keyed("a-2".into(), "a").await?;
    for n in 0..20 {
        publish_keyed(format!("b-{n}"), "b").await?;
    }
    let hits = poll_until(
        SETTLE,
        "every event at billing",
        || async { Ok(billing.hits()) },
        |hits| hits.len() == 22,
    )
    .await?;
    let at = |id: &str| {
        hits.iter()
            .find(|h| h.headers.get("ce-id").is_some_and(|v| v == id))
            .map(|h| h.at)
            .with_context(|| format!("{id} never came"))
    };
    for n in 0..20 {
        let b = at(&format!("b-{n}"))?;
        ensure!(
            b < slow + SLOW,
            "b-{n} came {:?} after the slow one, held up by it",
            b - slow
        );
    }
    ensure!(
        at("a-2")? >= slow + SLOW,
        "a-2 passed the slow event of its key"
    );
    Ok(())
}

#[tokio::test]
async fn a_killed_agent_loses_no_event_it_answered() -> Result<()> {
    let (_etcd, plane, client) = start_one("topics-kill").await?;
    let billing = HttpInstance::start().await?;
    let audit = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    subscribe(&client, "audit", "a0", &audit, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let flags = [
        format!("--data-dir={}", data.path().display()),
        "--durable-by-default=true".to_owned(),
    ];
    let mut agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    wait_for_subscribers(&agent, "orders", 2).await?;
    let ingress = agent.ingress_addr();

    // 16 publishers until the agent dies under them.
    let accepted: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..16 {
        let (accepted, stop) = (accepted.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let http = http();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("k-{p}-{n}");
                n += 1;
                match publish(&http, ingress, "orders", &id).await {
                    Ok((202, _)) => {
                        accepted
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(id);
                    }
                    // Refused or cut off by the kill: not promised.
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        }));
    }
    poll_until(
        Duration::from_secs(120),
        "10,000 events accepted",
        || async { Ok(accepted.lock().unwrap_or_else(|e| e.into_inner()).len()) },
        |n| *n >= 10_000,
    )
    .await?;
    agent.kill()?;
    stop.store(true, Ordering::Relaxed);
    for p in publishers {
        p.await?;
    }
    let promised = accepted.lock().unwrap_or_else(|e| e.into_inner()).clone();
    // Restarted on the same data dir, it delivers the rest.
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    let missing = |server: &HttpInstance| {
        let got = received(server);
        promised.iter().filter(|id| !got.contains_key(*id)).count()
    };
    poll_until(
        Duration::from_secs(120),
        "every accepted event at both services",
        || async { Ok((missing(&billing), missing(&audit))) },
        |(b, a)| *b == 0 && *a == 0,
    )
    .await
    .context("after the restart")?;
    let duplicates: usize = [&billing, &audit]
        .iter()
        .map(|s| received(s).values().map(|n| n - 1).sum::<usize>())
        .sum();
    eprintln!(
        "kill -9: {} events answered 202 before the kill, all delivered to both services after the restart; {duplicates} duplicates",
        promised.len()
    );
    // At most the in-flight window of each subscriber, redelivered; and
    // each one counted by the restarted agent as a possible duplicate (a
    // delivery it found being sent, without an outcome).
    ensure!(duplicates <= 2 * 64, "{duplicates} duplicates");
    let metrics = weir_tests::http_get(agent.admin_addr(), "/metrics").await?;
    let possible: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weir_agent_outbox_possible_duplicates_total "))
        .and_then(|v| v.trim().parse().ok())
        .context("the possible duplicates count")?;
    eprintln!("kill -9: {possible} deliveries counted as possible duplicates");
    ensure!(
        duplicates as u64 <= possible,
        "{duplicates} duplicates, {possible} counted"
    );
    drop(agent);
    Ok(())
}

#[tokio::test]
async fn a_dead_letter_is_listed_and_replayed_with_its_id() -> Result<()> {
    use weir_client::policy::{Delivery, TrafficPolicy};
    use weir_tests::agents::put_policy_applied;

    let (_etcd, plane, client) = start_one("topics-dead").await?;
    let billing = HttpInstance::start().await?;
    billing.set_status("/", 500);
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    // Subscribes to the compensation topic.
    let ops = HttpInstance::start().await?;
    subscribe(&client, "ops", "o0", &ops, &["orders.failed"]).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    wait_for_subscribers(&agent, "orders.failed", 1).await?;
    put_policy_applied(
        &client,
        "billing",
        TrafficPolicy {
            delivery: Some(Delivery {
                max_attempts: 2,
                dead_letter: true,
                compensation_topic: "orders.failed".into(),
                ..Delivery::default()
            }),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    let http = http();
    for id in ["d-1", "d-2"] {
        let (status, body) = publish(&http, agent.ingress_addr(), "orders", id).await?;
        ensure!(status == 202, "{status} {body}");
    }
    // Two attempts each (a second apart), then dead letters.
    let dead = poll_until(
        SETTLE,
        "two dead letters",
        || async {
            let raw = weir_tests::http_get(agent.admin_addr(), "/v1/dead-letters?service=billing")
                .await?;
            let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            Ok(serde_json::from_str::<serde_json::Value>(body).unwrap_or_default())
        },
        |v| v.as_array().is_some_and(|a| a.len() == 2),
    )
    .await?;
    ensure!(dead[0]["id"] == "d-1" && dead[0]["attempts"] == 2, "{dead}");
    ensure!(
        dead[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("500")),
        "{dead}"
    );
    ensure!(received(&billing).get("d-1") == Some(&2), "two attempts");
    // The publisher's side hears of it on the compensation topic.
    poll_until(
        SETTLE,
        "two compensation events",
        || async { Ok(ops.hits().len()) },
        |n| *n == 2,
    )
    .await?;
    let hit = ops
        .hits()
        .into_iter()
        .find(|h| {
            h.headers
                .get("ce-id")
                .is_some_and(|v| v == "d-1.failed.billing")
        })
        .context("d-1's compensation event")?;
    ensure!(hit.headers["ce-type"] == "weir.delivery.failed");
    let data: serde_json::Value = serde_json::from_slice(&hit.body)?;
    ensure!(
        data["id"] == "d-1" && data["service"] == "billing" && data["attempts"] == 2,
        "{data}"
    );
    // The subscriber is fixed; one is replayed by id, the other purged.
    billing.set_status("/", 200);
    let admin = |path: &str| {
        let path = path.to_owned();
        let http = http.clone();
        let addr = agent.admin_addr();
        async move {
            let response = http
                .request(
                    Request::post(format!("http://{addr}{path}")).body(Full::new(Bytes::new()))?,
                )
                .await?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
    };
    // Through the control plane, as an operator does.
    let listed = weir_tests::weirctl(&plane.endpoint(), &["events", "dead-letters"]).await?;
    let text = String::from_utf8_lossy(&listed.stdout);
    ensure!(
        listed.status.success() && text.contains("d-1") && text.contains("node-1"),
        "{text} {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let shown =
        weir_tests::weirctl(&plane.endpoint(), &["-o", "json", "events", "show", "d-2"]).await?;
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout)?;
    ensure!(shown["letters"][0]["service"] == "billing", "{shown}");
    let replayed =
        weir_tests::weirctl(&plane.endpoint(), &["events", "replay", "--id", "d-1"]).await?;
    let text = String::from_utf8_lossy(&replayed.stdout);
    ensure!(
        replayed.status.success() && text.contains("replayed 1"),
        "{text}"
    );
    poll_until(
        SETTLE,
        "d-1 delivered after the replay",
        || async { Ok(received(&billing).get("d-1").copied()) },
        |n| *n == Some(3),
    )
    .await?;
    let (status, body) = admin("/v1/dead-letters/purge?service=billing").await?;
    ensure!(
        status == 200 && body.contains("\"purged\":1"),
        "{status} {body}"
    );
    let state = agent.state().await?;
    ensure!(
        state["outbox"]["dead_letters"] == 0 && state["outbox"]["pending"] == 0,
        "{}",
        state["outbox"]
    );
    Ok(())
}

#[tokio::test]
async fn a_full_outbox_refuses_with_a_reason_and_takes_events_again_once_drained() -> Result<()> {
    let (_etcd, plane, client) = start_one("topics-quota").await?;
    let billing = HttpInstance::start().await?;
    billing.set_status("/", 503);
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let agent = AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &[
            format!("--data-dir={}", data.path().display()),
            "--outbox-max-bytes=1048576".to_owned(),
            "--durable-by-default=true".to_owned(),
        ],
    )?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let http = http();
    let body = Bytes::from(vec![b'x'; 4096]);
    let mut accepted = Vec::new();
    let refusal = loop {
        let id = format!("q-{}", accepted.len());
        let (status, reason, text) =
            publish_data(&http, agent.ingress_addr(), "orders", &id, body.clone()).await?;
        match status {
            202 => accepted.push(id),
            _ => break (status, reason, text),
        }
        ensure!(accepted.len() < 1000, "the quota never bit");
    };
    ensure!(
        refusal.0 == 503 && refusal.1 == "outbox-full" && refusal.2.contains("1048576"),
        "{refusal:?}"
    );
    // The subscriber comes back and drains it: publishing works again.
    billing.set_status("/", 200);
    let again = poll_until(
        SETTLE,
        "publishing accepted again",
        || {
            let (http, body) = (http.clone(), body.clone());
            let addr = agent.ingress_addr();
            async move { publish_data(&http, addr, "orders", "q-after", body).await }
        },
        |(status, _, _)| *status == 202,
    )
    .await?;
    ensure!(again.0 == 202);
    let got = received(&billing);
    let lost: Vec<&String> = accepted
        .iter()
        .filter(|id| !got.contains_key(*id))
        .collect();
    ensure!(lost.is_empty(), "accepted and never delivered: {lost:?}");
    eprintln!("quota: {} events of 4 KiB accepted into 1 MiB, then 503 outbox-full; all delivered once the subscriber was back", accepted.len());
    Ok(())
}

#[tokio::test]
async fn a_damaged_outbox_is_reported_and_left_alone_while_traffic_flows() -> Result<()> {
    let (_etcd, plane, client) = start_one("topics-damage").await?;
    let billing = HttpInstance::start().await?;
    billing.set_status("/", 500);
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let orders = HttpInstance::start().await?;
    client
        .register(instance(
            "default",
            "orders",
            "o0",
            u32::from(orders.port()),
        ))
        .await?;
    let data = tempfile::tempdir()?;
    let flags = [format!("--data-dir={}", data.path().display())];
    let mut agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let http = http();
    for n in 0..20 {
        let (status, body) =
            publish(&http, agent.ingress_addr(), "orders", &format!("c-{n}")).await?;
        ensure!(status == 202, "{status} {body}");
    }
    agent.kill()?;
    // Damage in the middle of the segment.
    let segment = std::fs::read_dir(data.path().join("outbox"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "log"))
        .context("a segment")?;
    let mut bytes = std::fs::read(&segment)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&segment, &bytes)?;

    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    let ready = weir_tests::http_get(agent.admin_addr(), "/readyz").await?;
    ensure!(
        ready.starts_with("HTTP/1.1 503")
            && ready.contains("outbox")
            && ready.contains("corrupted"),
        "{ready}"
    );
    let (status, reason, _) = publish_data(
        &http,
        agent.ingress_addr(),
        "orders",
        "c-late",
        Bytes::from_static(b"{}"),
    )
    .await?;
    ensure!(
        status == 503 && reason == "outbox-unavailable",
        "{status} {reason}"
    );
    // Addressed traffic is not the outbox's business.
    agent
        .wait_for_endpoints("default", "orders", 1, SETTLE)
        .await?;
    let answer = http
        .request(
            Request::post(format!(
                "http://{}/v1/services/orders/x",
                agent.ingress_addr()
            ))
            .body(Full::new(Bytes::from_static(b"hi")))?,
        )
        .await?;
    ensure!(answer.status() == 200);
    ensure!(
        std::fs::read(&segment)? == bytes,
        "the damaged file was touched"
    );
    drop(agent);
    // Asked to, the agent refuses to start on it instead.
    let mut strict = flags.to_vec();
    strict.push("--outbox-required=true".to_owned());
    ensure!(
        AgentProcess::start(&[plane.endpoint()], "node-1", &strict).is_err(),
        "started on a damaged outbox with --outbox-required"
    );
    Ok(())
}

#[tokio::test]
async fn grpc_publish_reaches_a_grpc_subscriber_with_the_topic() -> Result<()> {
    use weir_proto::{
        cloudevents::v1::CloudEvent,
        events::v1::{publisher_client::PublisherClient, PublishRequest},
    };
    use weir_tests::fixtures::SubscriberInstance;

    let (_etcd, plane, client) = start_one("topics-grpc").await?;
    let audit = SubscriberInstance::start().await?;
    let mut i = instance("default", "audit", "g0", u32::from(audit.port()));
    i.protocol = weir_client::Protocol::Grpc as i32;
    i.topics = vec!["orders".into()];
    client.register(i).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let mut publisher =
        PublisherClient::connect(format!("http://{}", agent.ingress_addr())).await?;
    let event = CloudEvent {
        id: "g-1".into(),
        source: "/tests/grpc".into(),
        spec_version: "1.0".into(),
        r#type: "com.example.order.created".into(),
        ..CloudEvent::default()
    };
    let answer = publisher
        .publish(PublishRequest {
            namespace: String::new(),
            topic: "orders".into(),
            event: Some(event.clone()),
        })
        .await?
        .into_inner();
    ensure!(
        answer.id == "g-1" && answer.subscribers == ["audit"],
        "{answer:?}"
    );
    let delivered = poll_until(
        SETTLE,
        "the gRPC subscriber's Deliver",
        || async { Ok(audit.deliveries()) },
        |d| !d.is_empty(),
    )
    .await?;
    ensure!(
        delivered[0].topic == "orders" && delivered[0].attempt == 1,
        "{:?}",
        delivered[0]
    );
    ensure!(delivered[0].subscription == "audit");
    ensure!(delivered[0].event.as_ref().is_some_and(|e| e.id == "g-1"));
    // A bad request names the field.
    let status = publisher
        .publish(PublishRequest {
            namespace: String::new(),
            topic: String::new(),
            event: Some(event),
        })
        .await
        .expect_err("no topic");
    ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
    Ok(())
}

#[tokio::test]
async fn a_subscriber_away_past_its_registration_gets_everything_in_key_order() -> Result<()> {
    use weir_client::InstanceRef;

    let (_etcd, plane, client) = start_one("topics-away").await?;
    let first = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &first, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    order_deliveries(&client, "billing").await?;
    // It goes away: its server stops and its registration is gone, as
    // when its TTL lapses.
    drop(first);
    client
        .deregister(&InstanceRef {
            namespace: "default".into(),
            service: "billing".into(),
            instance_id: "b0".into(),
        })
        .await?;
    poll_until(
        SETTLE,
        "billing gone from the routes",
        || agent.state(),
        |s| {
            s["routes"]
                .as_array()
                .is_some_and(|r| !r.iter().any(|x| x["service"] == "billing"))
        },
    )
    .await?;
    // Published meanwhile, three keys interleaved.
    let http = http();
    const N: usize = 60;
    for n in 0..N {
        let key = format!("customer-{}", n % 3);
        let request = Request::post(format!("http://{}/v1/topics/orders", agent.ingress_addr()))
            .header("ce-specversion", "1.0")
            .header("ce-id", format!("a-{n}"))
            .header("ce-source", "/tests/topics")
            .header("ce-type", "com.example.order.created")
            .header("ce-partitionkey", key)
            .body(Full::new(Bytes::from_static(b"{}")))?;
        let response = http.request(request).await?;
        ensure!(response.status() == 202, "{}", response.status());
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(
            String::from_utf8_lossy(&body).contains("billing"),
            "the subscription outlived its instance"
        );
    }
    // Back, on another port.
    let back = HttpInstance::start().await?;
    subscribe(&client, "billing", "b1", &back, &["orders"]).await?;
    poll_until(
        SETTLE,
        "everything published meanwhile delivered",
        || async { Ok(received(&back).len()) },
        |n| *n == N,
    )
    .await?;
    for k in 0..3 {
        let key = format!("customer-{k}");
        let order: Vec<usize> = back
            .hits()
            .iter()
            .filter(|h| {
                h.headers
                    .get("ce-partitionkey")
                    .is_some_and(|v| v == key.as_str())
            })
            .filter_map(|h| {
                h.headers
                    .get("ce-id")?
                    .to_str()
                    .ok()?
                    .strip_prefix("a-")?
                    .parse()
                    .ok()
            })
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        ensure!(order == sorted, "{key} out of publish order: {order:?}");
    }
    Ok(())
}

#[tokio::test]
async fn a_publish_stream_answers_each_event_in_order_and_reopens_after_a_restart() -> Result<()> {
    use weir_client::{CloudEvent, PublishError, TopicPublisher};

    let (_etcd, plane, client) = start_one("topics-stream").await?;
    let billing = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let mut flags = vec![
        format!("--data-dir={}", data.path().display()),
        "--durable-by-default=true".to_owned(),
    ];
    let mut agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let ingress = agent.ingress_addr();
    let publisher = TopicPublisher::connect(format!("http://{ingress}")).await?;
    let event = |id: String| CloudEvent {
        id,
        source: "/tests/stream".into(),
        spec_version: "1.0".into(),
        r#type: "com.example.order.created".into(),
        ..CloudEvent::default()
    };

    // 1,500 publishers at once on one stream (past the agent's window of
    // 1,024): each gets its own answer.
    let tasks: Vec<_> = (0..1500)
        .map(|n| {
            let (publisher, event) = (publisher.clone(), event(format!("s-{n}")));
            tokio::spawn(async move { publisher.publish("orders", event).await })
        })
        .collect();
    for (n, task) in tasks.into_iter().enumerate() {
        let answer = task.await??;
        ensure!(
            answer.id == format!("s-{n}") && answer.subscribers == ["billing"] && answer.durable,
            "event {n}: {answer:?}"
        );
    }
    // A refused event is answered as refused, and the stream goes on.
    let mut untyped = event("s-bad".into());
    untyped.r#type.clear();
    match publisher.publish("orders", untyped).await {
        Err(PublishError::Refused(r)) => ensure!(
            r.reason == "bad-event"
                && r.code == tonic::Code::InvalidArgument as i32
                && r.field == "event.type",
            "{r:?}"
        ),
        other => anyhow::bail!("an event without a type: {other:?}"),
    }
    match publisher
        .publish("no such topic", event("s-x".into()))
        .await
    {
        Err(PublishError::Refused(r)) => ensure!(r.reason == "no-target", "{r:?}"),
        other => anyhow::bail!("a topic with spaces: {other:?}"),
    }
    publisher.publish("orders", event("s-1500".into())).await?;
    let missing = |got: &HashMap<String, usize>| {
        (0..=1500)
            .filter(|n| !got.contains_key(&format!("s-{n}")))
            .count()
    };
    poll_until(
        SETTLE,
        "the 1,501 accepted events at billing",
        || async { Ok(missing(&received(&billing))) },
        |missing| *missing == 0,
    )
    .await?;

    // The agent goes away: a publish fails; once it is back on the same
    // address, the publisher opens a new stream by itself.
    agent.kill()?;
    let gone = publisher.publish("orders", event("s-gone".into())).await;
    ensure!(
        matches!(
            gone,
            Err(PublishError::Unknown(_) | PublishError::Unavailable(_))
        ),
        "{gone:?}"
    );
    flags.push(format!("--ingress-addr={ingress}"));
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &flags)?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let mut n = 0;
    poll_until(
        SETTLE,
        "a publish through a new stream",
        || {
            n += 1;
            let (publisher, event) = (publisher.clone(), event(format!("s-back-{n}")));
            async move { Ok(publisher.publish("orders", event).await.is_ok()) }
        },
        |ok| *ok,
    )
    .await?;
    drop(agent);
    Ok(())
}

#[tokio::test]
async fn weirctl_publishes_an_event_by_hand() -> Result<()> {
    let (_etcd, plane, client) = start_one("topics-weirctl").await?;
    let billing = HttpInstance::start().await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let agent = agent_on(&plane, data.path())?;
    wait_for_subscribers(&agent, "orders", 1).await?;
    let ingress = format!("http://{}", agent.ingress_addr());
    let out = weir_tests::weirctl_ok(
        &plane.endpoint(),
        &[
            "-o",
            "json",
            "events",
            "publish",
            "orders",
            "--agent",
            &ingress,
            "--type",
            "com.example.order.created",
            "--id",
            "h-1",
            "--data",
            "{\"total\":3}",
        ],
    )
    .await?;
    let answer: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        answer["id"] == "h-1" && answer["subscribers"] == serde_json::json!(["billing"]),
        "{answer}"
    );
    let hits = poll_until(
        SETTLE,
        "h-1 at billing",
        || async { Ok(billing.hits()) },
        |hits| !hits.is_empty(),
    )
    .await?;
    ensure!(hits[0].headers["ce-id"] == "h-1");
    ensure!(hits[0].headers["ce-source"] == "/weirctl");
    ensure!(hits[0].headers["content-type"] == "application/json");
    ensure!(hits[0].body == Bytes::from_static(b"{\"total\":3}"));
    // A refusal says why, and fails.
    let refused = weir_tests::weirctl(
        &plane.endpoint(),
        &[
            "events",
            "publish",
            "no such topic",
            "--agent",
            &ingress,
            "--type",
            "t",
        ],
    )
    .await?;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    ensure!(
        !refused.status.success() && stderr.contains("no-target"),
        "{stderr}"
    );
    Ok(())
}
