//! Outliers in the registry end to end: a real control plane on etcd, two
//! real `weir-agent`s sending events to three HTTP instances. When one
//! instance fails, both agents' breakers open, both report it, and the
//! control plane marks it WARNING with the reason, as `weirctl get`
//! shows; once it recovers, the mark goes.

use std::time::Duration;

use anyhow::{ensure, Result};
use weir_client::policy::{CircuitBreaker, TrafficPolicy};
use weir_tests::{
    agent::AgentProcess, agents::policy_status_until, fixtures::http_instances, load::Load,
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);
const PATH: &str = "/in";

/// `o1`'s status and reason in `weirctl get orders -o json`.
async fn o1(endpoint: &str) -> Result<(String, String)> {
    let out = weir_tests::weirctl_ok(endpoint, &["get", "orders", "-o", "json"]).await?;
    let json: serde_json::Value = serde_json::from_str(&out)?;
    let list = json["instances"].as_array().cloned().unwrap_or_default();
    let o1 = list
        .iter()
        .find(|i| i["instance_id"] == "o1")
        .cloned()
        .unwrap_or_default();
    Ok((
        o1["status"].as_str().unwrap_or_default().to_owned(),
        o1["health"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

#[tokio::test]
async fn an_instance_failing_for_two_agents_is_marked_warning_with_the_reason() -> Result<()> {
    let (_etcd, plane, client) = start_one("outliers").await?;
    let instances = http_instances(&client, "orders", "o", 3).await?;
    let a = AgentProcess::start(&[plane.endpoint()], "node-a", &[])?;
    let b = AgentProcess::start(&[plane.endpoint()], "node-b", &[])?;
    for agent in [&a, &b] {
        agent
            .wait_for_endpoints("default", "orders", 3, SETTLE)
            .await?;
    }
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: "orders".into(),
                circuit_breaker: Some(CircuitBreaker {
                    consecutive_failures: 3,
                    open_ms: 1_000,
                    ..CircuitBreaker::default()
                }),
                ..TrafficPolicy::default()
            },
            None,
        )
        .await?;
    policy_status_until(&client, "orders", "both agents applying the policy", |s| {
        s.applied == 2
    })
    .await?;
    let _loads = [&a, &b]
        .map(|agent| Load::start(agent.ingress_addr(), "orders", PATH, "/tests/outliers", 20));
    let endpoint = plane.endpoint();
    let before = o1(&endpoint).await?;
    ensure!(before.0 != "warning", "{before:?}");

    instances[1].set_status(PATH, 500);
    let (status, reason) = poll_until(
        SETTLE,
        "o1 WARNING in the registry",
        || o1(&endpoint),
        |(status, _)| status == "warning",
    )
    .await?;
    ensure!(
        reason.starts_with(
            "outlier: out of rotation on 2 agents (node-a, node-b): circuit breaker open"
        ),
        "{status} {reason}"
    );
    // The table shows it too.
    let table = weir_tests::weirctl_ok(&plane.endpoint(), &["get", "orders"]).await?;
    ensure!(
        table
            .lines()
            .any(|l| l.starts_with("o1") && l.contains("warning") && l.contains("outlier")),
        "{table}"
    );

    // Back: the breakers close, the agents report nothing, the mark goes.
    instances[1].set_status(PATH, 200);
    let (status, reason) = poll_until(
        Duration::from_secs(15),
        "o1 no longer warning",
        || o1(&endpoint),
        |(status, _)| status != "warning",
    )
    .await?;
    ensure!(
        status == "unknown" && reason.contains("no longer out of rotation"),
        "{status} {reason}"
    );
    Ok(())
}
