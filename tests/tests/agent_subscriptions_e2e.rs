//! Subscriptions across an agent restart: a real control plane on etcd, a
//! real `weir-agent` with a data dir, HTTP subscribers in the test. A
//! subscriber whose instances are gone stays subscribed for its retention
//! even when the agent is killed and started again meanwhile, so what is
//! published after the restart still reaches it when it comes back.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{client::legacy::Client as HttpClient, rt::TokioExecutor};
use prost::Message;
use weir_client::{agent::PersistedState, InstanceRef};
use weir_tests::{
    agent::AgentProcess,
    fixtures::{subscribe, HttpInstance},
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);

/// An agent for node-1 on `plane`, its data (view and outbox) in `data`.
fn agent_on(plane: &weir_tests::ControlPlaneProcess, data: &Path) -> Result<AgentProcess> {
    AgentProcess::start(
        &[plane.endpoint()],
        "node-1",
        &[format!("--data-dir={}", data.display())],
    )
}

/// `(service, listed)` of every subscription to `topic` in `/v1/state`,
/// sorted.
async fn subscriptions(agent: &AgentProcess, topic: &str) -> Result<Vec<(String, bool)>> {
    let state = agent.state().await?;
    let mut all: Vec<(String, bool)> = state["subscriptions"]
        .as_array()
        .context("subscriptions in /v1/state")?
        .iter()
        .filter(|s| s["namespace"] == "default" && s["topic"] == topic)
        .filter_map(|s| Some((s["service"].as_str()?.to_owned(), s["listed"].as_bool()?)))
        .collect();
    all.sort();
    Ok(all)
}

/// `(service, unlisted since)` of saved subscriptions.
type Saved = Vec<(String, i64)>;

/// What the agent saved in its data dir (`view.pb`): the instance ids of
/// its view, and `(service, unlisted since)` of the subscriptions to
/// `topic` (since 0: listed), sorted.
fn saved_view(data: &Path, topic: &str) -> Result<(Vec<String>, Saved)> {
    let bytes = std::fs::read(data.join("view.pb"))?;
    let state = PersistedState::decode(bytes.as_slice())?;
    let instances = state
        .registry
        .map(|r| {
            r.events
                .into_iter()
                .filter_map(|e| e.instance.map(|i| i.instance_id))
                .collect()
        })
        .unwrap_or_default();
    let mut subscriptions: Saved = state
        .subscriptions
        .into_iter()
        .filter(|s| s.namespace == "default" && s.topic == topic)
        .map(|s| (s.service, s.unlisted_since_unix_ms))
        .collect();
    subscriptions.sort();
    Ok((instances, subscriptions))
}

/// The subscriptions to `topic` in `view.pb`, as [`saved_view`] gives them.
fn saved_subscriptions(data: &Path, topic: &str) -> Result<Saved> {
    Ok(saved_view(data, topic)?.1)
}

#[tokio::test]
async fn a_retained_subscription_survives_a_kill_of_the_agent() -> Result<()> {
    let (_etcd, plane, client) = start_one("subs-restart").await?;
    let audit = HttpInstance::start().await?;
    let billing = HttpInstance::start().await?;
    subscribe(&client, "audit", "a0", &audit, &["orders"]).await?;
    subscribe(&client, "billing", "b0", &billing, &["orders"]).await?;
    let data = tempfile::tempdir()?;
    let mut agent = agent_on(&plane, data.path())?;
    let both = vec![("audit".to_owned(), true), ("billing".to_owned(), true)];
    poll_until(
        SETTLE,
        "both subscriptions listed",
        || subscriptions(&agent, "orders"),
        |s| *s == both,
    )
    .await?;

    // Billing goes away: its server stops, its registration is gone.
    drop(billing);
    client
        .deregister(&InstanceRef {
            namespace: "default".into(),
            service: "billing".into(),
            instance_id: "b0".into(),
        })
        .await?;
    let retained = vec![("audit".to_owned(), true), ("billing".to_owned(), false)];
    poll_until(
        SETTLE,
        "billing retained, not listed",
        || subscriptions(&agent, "orders"),
        |s| *s == retained,
    )
    .await?;
    // Saved (debounced by a second) before the kill.
    let saved = poll_until(
        SETTLE,
        "the retained subscription saved in view.pb",
        || async { saved_subscriptions(data.path(), "orders") },
        |s| s.len() == 2 && s[0] == ("audit".to_owned(), 0) && s[1].0 == "billing" && s[1].1 > 0,
    )
    .await?;
    let since = saved[1].1;

    // kill -9, and start again on the same data dir.
    agent.kill()?;
    drop(agent);
    let agent = agent_on(&plane, data.path())?;
    // Restored from the file, before and after the control plane's fresh
    // view (which lists no billing instance).
    poll_until(
        SETTLE,
        "billing retained after the restart",
        || subscriptions(&agent, "orders"),
        |s| *s == retained,
    )
    .await?;
    // Something registered after the restart shows the session's view is
    // the control plane's now.
    let marker = HttpInstance::start().await?;
    subscribe(&client, "marker", "m0", &marker, &[]).await?;
    agent
        .wait_for_endpoints("default", "marker", 1, SETTLE)
        .await?;
    ensure!(
        subscriptions(&agent, "orders").await? == retained,
        "the fresh view dropped billing's retained subscription"
    );
    // Saved again with the marker, billing on its original retention
    // clock: not restarted by the restart (which took over a second).
    let resaved = poll_until(
        SETTLE,
        "view.pb rewritten after the restart",
        || async { saved_view(data.path(), "orders") },
        |(instances, _)| instances.iter().any(|i| i == "m0"),
    )
    .await?;
    let billing_since = resaved
        .1
        .iter()
        .find(|(svc, _)| svc == "billing")
        .map(|(_, since)| *since)
        .context("billing's subscription saved again")?;
    ensure!(
        (billing_since - since).abs() < 100,
        "unlisted since {billing_since} after the restart, {since} before"
    );

    // Published while billing is away, after the restart.
    let http = HttpClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = Request::post(format!("http://{}/v1/topics/orders", agent.ingress_addr()))
        .header("ce-specversion", "1.0")
        .header("ce-id", "after-restart-1")
        .header("ce-source", "/tests/subscriptions")
        .header("ce-type", "com.example.order.created")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(b"{\"total\":1}")))?;
    let response = http.request(request).await?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    let answer: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("{status} {}", String::from_utf8_lossy(&body)))?;
    ensure!(status == 202, "{status} {answer}");
    ensure!(
        answer["subscribers"] == serde_json::json!(["audit", "billing"]),
        "billing is still a subscriber: {answer}"
    );

    // Billing comes back, on another port: it gets the event, and its
    // subscription is listed again.
    let back = HttpInstance::start().await?;
    subscribe(&client, "billing", "b1", &back, &["orders"]).await?;
    let got = |server: &HttpInstance| {
        server
            .hits()
            .iter()
            .filter(|h| {
                h.headers
                    .get("ce-id")
                    .is_some_and(|v| v == "after-restart-1")
            })
            .count()
    };
    poll_until(
        SETTLE,
        "billing and audit got the event published while billing was away",
        || async { Ok((got(&back), got(&audit))) },
        |(b, a)| *b >= 1 && *a >= 1,
    )
    .await?;
    poll_until(
        SETTLE,
        "both subscriptions listed again",
        || subscriptions(&agent, "orders"),
        |s| *s == both,
    )
    .await?;
    poll_until(
        SETTLE,
        "billing listed again in view.pb",
        || async { saved_subscriptions(data.path(), "orders") },
        |s| s.len() == 2 && s.iter().all(|(_, since)| *since == 0),
    )
    .await?;
    Ok(())
}
