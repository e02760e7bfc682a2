//! Circuit breakers end to end: a real control plane on etcd, a real
//! `weir-agent` and three HTTP instances of one service, under 50
//! requests/s. An instance that starts answering 500 (or answering
//! slowly) is broken off within a second and probed back once it
//! recovers; with all three failing, no more than the ejection cap leave
//! the rotation and the service fails fast with 503 `circuit-open`.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use weir_client::policy::{CircuitBreaker, TrafficPolicy};
use weir_tests::{
    agent::AgentProcess,
    agents::put_policy_applied,
    fixtures::{http_instances, HttpInstance},
    load::Load,
    poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);
const PATH: &str = "/in";

/// 50 events/s to `orders` through `agent` until dropped.
fn load(agent: &AgentProcess) -> Load {
    Load::start(agent.ingress_addr(), "orders", PATH, "/tests/breaker", 50)
}

/// `orders` with three instances (o0, o1, o2) under `breaker`, and an
/// agent routing to them.
async fn setup(
    tag: &str,
    breaker: CircuitBreaker,
) -> Result<(
    weir_tests::Etcd,
    weir_tests::ControlPlaneProcess,
    Vec<HttpInstance>,
    AgentProcess,
)> {
    let (etcd, plane, client) = start_one(tag).await?;
    let instances = http_instances(&client, "orders", "o", 3).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    put_policy_applied(
        &client,
        "orders",
        TrafficPolicy {
            circuit_breaker: Some(breaker),
            ..TrafficPolicy::default()
        },
    )
    .await?;
    Ok((etcd, plane, instances, agent))
}

/// Each endpoint's breaker in the agent's `/v1/state`, by instance id:
/// its state (`closed` before it saw a call) and whether it is capped.
async fn breakers(agent: &AgentProcess) -> Result<Vec<(String, String, bool)>> {
    let state = agent.state().await?;
    let endpoints = state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == "orders"))
        .and_then(|r| r["endpoints"].as_array().cloned())
        .context("no route for orders")?;
    let mut out: Vec<(String, String, bool)> = endpoints
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_owned(),
                e["breaker"]["state"]
                    .as_str()
                    .unwrap_or("closed")
                    .to_owned(),
                e["breaker"]["capped"].as_bool().unwrap_or(false),
            )
        })
        .collect();
    out.sort();
    Ok(out)
}

fn state_of<'a>(breakers: &'a [(String, String, bool)], id: &str) -> &'a str {
    breakers
        .iter()
        .find(|(i, _, _)| i == id)
        .map_or("", |(_, s, _)| s.as_str())
}

/// Waits until `id`'s breaker is in `state`: how long that took.
async fn until_state(
    agent: &AgentProcess,
    id: &str,
    state: &str,
    within: Duration,
) -> Result<Duration> {
    let start = Instant::now();
    poll_until(
        within,
        &format!("{id}'s breaker {state}"),
        || breakers(agent),
        |b| state_of(b, id) == state,
    )
    .await?;
    Ok(start.elapsed())
}

#[tokio::test]
async fn a_failing_instance_is_broken_off_within_a_second_and_probed_back() -> Result<()> {
    let (_etcd, _plane, instances, agent) = setup(
        "breaker-5xx",
        CircuitBreaker {
            failure_ratio: 0.5,
            window_ms: 1_000,
            minimum_requests: 5,
            open_ms: 1_000,
            half_open_probes: 2,
            ..CircuitBreaker::default()
        },
    )
    .await?;
    let load = load(&agent);
    load.wait_for(10, SETTLE).await?;
    instances[1].set_status(PATH, 500);
    let took = until_state(&agent, "o1", "open", Duration::from_secs(3)).await?;
    ensure!(
        took < Duration::from_secs(1),
        "o1's breaker opened after {took:?}"
    );
    // Out of rotation: for most of the open second, o1 gets nothing and
    // the callers get the other two's 200s.
    let opened = Instant::now();
    load.reset();
    let answers = load.wait_for(25, SETTLE).await?;
    ensure!(
        instances[1]
            .hits_since(PATH, opened + Duration::from_millis(50))
            .is_empty()
            || state_of(&breakers(&agent).await?, "o1") != "open",
        "o1 got requests while its breaker was open"
    );
    ensure!(
        answers.len() >= 25 && answers.iter().all(|a| a.status == 200),
        "{} answers while o1 is out: {:?}",
        answers.len(),
        answers
            .iter()
            .filter(|a| a.status != 200)
            .take(5)
            .collect::<Vec<_>>()
    );
    // o1 recovers: half-open probes bring it back.
    instances[1].set_status(PATH, 200);
    until_state(&agent, "o1", "closed", Duration::from_secs(5)).await?;
    let back = Instant::now();
    poll_until(
        Duration::from_secs(2),
        "o1 back in rotation",
        || async { Ok(instances[1].hits_since(PATH, back).len()) },
        |n| *n >= 3,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_slow_instance_is_broken_off_by_the_slow_call_ratio() -> Result<()> {
    let (_etcd, _plane, instances, agent) = setup(
        "breaker-slow",
        CircuitBreaker {
            slow_call_ms: 100,
            slow_call_ratio: 0.5,
            window_ms: 1_000,
            minimum_requests: 5,
            open_ms: 1_000,
            half_open_probes: 2,
            ..CircuitBreaker::default()
        },
    )
    .await?;
    let load = load(&agent);
    load.wait_for(10, SETTLE).await?;
    instances[2].delay_when("ce-source", "/tests/breaker", Duration::from_millis(300));
    let took = until_state(&agent, "o2", "open", Duration::from_secs(3)).await?;
    ensure!(
        took < Duration::from_millis(1_500),
        "o2's breaker opened after {took:?}"
    );
    let b = breakers(&agent).await?;
    ensure!(
        state_of(&b, "o0") == "closed" && state_of(&b, "o1") == "closed",
        "only the slow one: {b:?}"
    );
    instances[2].clear_delays();
    until_state(&agent, "o2", "closed", Duration::from_secs(5)).await?;
    Ok(())
}

#[tokio::test]
async fn all_failing_no_more_than_the_cap_leaves_and_the_service_fails_fast() -> Result<()> {
    let (_etcd, plane, instances, agent) = setup(
        "breaker-all",
        CircuitBreaker {
            consecutive_failures: 3,
            open_ms: 2_000,
            half_open_probes: 1,
            max_ejection_percent: 50,
            ..CircuitBreaker::default()
        },
    )
    .await?;
    let load = load(&agent);
    for i in &instances {
        i.set_status(PATH, 500);
    }
    let b = poll_until(
        Duration::from_secs(5),
        "every breaker tripped",
        || breakers(&agent),
        |b| b.iter().all(|(_, s, _)| s != "closed"),
    )
    .await?;
    // Of three instances, 50% lets one leave the rotation.
    let excluded = b.iter().filter(|(_, _, capped)| !capped).count();
    ensure!(excluded == 1, "{b:?}");
    // weirctl shows them, through the control plane.
    let out = weir_tests::weirctl_ok(&plane.endpoint(), &["governance", "orders"]).await?;
    ensure!(
        out.lines().filter(|l| l.starts_with("node-1")).count() == 3
            && out.matches("(capped, in rotation)").count() == 2
            && out.contains("3 failures in a row"),
        "{out}"
    );
    load.reset();
    let answers = load.wait_for(15, SETTLE).await?;
    let fast = answers
        .iter()
        .filter(|a| a.status == 503 && a.reason == "circuit-open" && !a.retry_after.is_empty())
        .count();
    // All but the odd half-open probe fail fast.
    ensure!(
        answers.len() >= 15 && fast + 3 >= answers.len(),
        "{fast} of {} failed fast: {:?}",
        answers.len(),
        answers.iter().take(5).collect::<Vec<_>>()
    );
    // Back: probes find the instances well again and traffic flows.
    for i in &instances {
        i.set_status(PATH, 200);
    }
    poll_until(
        Duration::from_secs(8),
        "every breaker closed",
        || breakers(&agent),
        |b| b.iter().all(|(_, s, _)| s == "closed"),
    )
    .await?;
    load.reset();
    let answers = load.wait_for(10, SETTLE).await?;
    ensure!(
        !answers.is_empty() && answers.iter().all(|a| a.status == 200),
        "{answers:?}"
    );
    Ok(())
}
