//! End-to-end tests of the control plane's side of the agent session:
//! partial acknowledgements, the agent listing (connected or not), and
//! requests to an agent wherever its stream is. Real etcd, real
//! control-plane processes, stand-in agents on `weir_client::AgentSession`.

use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tokio::task::JoinSet;
use weir_client::{
    agent::{
        agent_request, applied_policy::Outcome, AgentDescription, AgentInfo, AgentStatus,
        DescribeRequest,
    },
    policy::{RateLimit, Retry, TrafficPolicy},
    AckOutcome, Client, Error,
};
use weir_tests::{
    agents::{hello, next_policies, policy_status_until, run_stand_in, StandIn},
    start_one, start_replicas, wait_until, weirctl, weirctl_ok,
};

/// A policy with a retry and a rate-limit section.
fn policy(service: &str) -> TrafficPolicy {
    TrafficPolicy {
        namespace: "default".into(),
        service: service.into(),
        retry: Some(Retry {
            attempts: 2,
            ..Retry::default()
        }),
        rate_limit: Some(RateLimit {
            requests_per_second: 100.0,
            ..RateLimit::default()
        }),
        ..TrafficPolicy::default()
    }
}

/// The listing entry of `node` on `client`, if listed.
async fn listed(client: &Client, node: &str) -> Result<Option<AgentInfo>> {
    Ok(client
        .list_all_agents()
        .await?
        .agents
        .into_iter()
        .find(|a| a.node_id == node))
}

/// Waits up to `deadline` until `node`'s listing entry on `client`
/// satisfies `done`; returns it.
async fn listed_until(
    client: &Client,
    node: &str,
    deadline: Duration,
    what: &str,
    done: impl Fn(&AgentInfo) -> bool,
) -> Result<AgentInfo> {
    let done = &done;
    wait_until(deadline, what, || async move {
        listed(client, node)
            .await
            .ok()
            .flatten()
            .is_some_and(|a| done(&a))
    })
    .await?;
    listed(client, node).await?.context("listed")
}

#[tokio::test]
async fn a_partial_ack_is_counted_apart_and_weirctl_names_the_sections() -> Result<()> {
    let (_etcd, plane, client) = start_one("partly").await?;
    let v = client.put_policy(policy("orders"), None).await?;

    let mut full = client.open_session(hello("node-full")).await?;
    let mut part = client.open_session(hello("node-part")).await?;
    for s in [&mut full, &mut part] {
        let snapshot = next_policies(s).await?;
        ensure!(snapshot.changes.iter().any(|c| c.version == v.version));
    }
    full.ack("default", "orders", v.version, AckOutcome::Applied)
        .await?;
    part.ack(
        "default",
        "orders",
        v.version,
        AckOutcome::Partly(vec!["rate_limit".into()]),
    )
    .await?;
    policy_status_until(&client, "orders", "one applied, one partly", |s| {
        s.applied == 1 && s.partly == 1
    })
    .await?;
    let status = client.policy_status("default", "orders").await?;
    ensure!(
        status.connected_agents == 2 && status.rejected == 0 && status.pending == 0,
        "{status:?}"
    );
    let part_state = status
        .agents
        .iter()
        .find(|a| a.node_id == "node-part")
        .context("node-part reported")?;
    ensure!(part_state.accepted && part_state.unenforced == ["rate_limit"]);

    let text = weirctl_ok(&plane.endpoint(), &["policy", "status", "orders"]).await?;
    ensure!(
        text.contains("1 of 2 agents applied, 1 partly, 0 rejected"),
        "{text}"
    );
    ensure!(
        text.lines()
            .any(|l| l.starts_with("node-part") && l.contains("partly (rate_limit)")),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &weirctl_ok(
            &plane.endpoint(),
            &["policy", "status", "orders", "-o", "json"],
        )
        .await?,
    )?;
    ensure!(json["partly"] == 1 && json["applied"] == 1, "{json}");

    // The listing carries the outcome too.
    let info = listed_until(
        &client,
        "node-part",
        Duration::from_secs(10),
        "its ack",
        |a| !a.policies.is_empty(),
    )
    .await?;
    ensure!(
        info.policies[0].outcome() == Outcome::Partly && info.policies[0].version == v.version,
        "{info:?}"
    );

    // A section name that breaks the rules is refused, naming it; the
    // stream ends with the rejection.
    part.ack(
        "default",
        "orders",
        v.version,
        AckOutcome::Partly(vec!["rate_limit".into(), "Rate Limit".into()]),
    )
    .await?;
    let err = loop {
        match tokio::time::timeout(Duration::from_secs(10), part.next()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => bail!("the stream ended without the rejection"),
            Err(e) => break e,
        }
    };
    ensure!(
        err.field_violations()
            .iter()
            .any(|v| v.field == "ack.unenforced[1]"),
        "{err:?}"
    );
    Ok(())
}

/// One lease expiry (10 s) covers both ways a stream ends: node-clean
/// closes its stream on replica a; node-crash loses its replica b to
/// kill -9, so nothing records its close and replica a's sweep must.
#[tokio::test]
async fn agents_are_listed_connected_then_disconnected_since() -> Result<()> {
    let (_etcd, [a, mut b]) = start_replicas("listing").await?;
    let on_a = Client::connect([a.endpoint()]).await?;
    let v = on_a.put_policy(policy("orders"), None).await?;

    let mut clean = on_a.open_session(hello("node-clean")).await?;
    next_policies(&mut clean).await?;
    clean
        .ack("default", "orders", v.version, AckOutcome::Applied)
        .await?;
    clean
        .report_status(AgentStatus {
            degraded: true,
            reason: "no route to zone b".into(),
            local_instances: 2,
            endpoints: 5,
        })
        .await?;
    let crash_session = Client::connect([b.endpoint()])
        .await?
        .open_session(hello("node-crash"))
        .await?;
    let crash = tokio::spawn(run_stand_in(crash_session, StandIn::default()));

    let info = listed_until(
        &on_a,
        "node-clean",
        Duration::from_secs(10),
        "node-clean connected with its status and ack",
        |i| i.connected && i.status.is_some() && !i.policies.is_empty(),
    )
    .await?;
    let status = info.status.clone().unwrap_or_default();
    ensure!(
        status.degraded && status.reason == "no route to zone b" && status.endpoints == 5,
        "{info:?}"
    );
    ensure!(info.zone == "a" && info.version == "test" && info.disconnected_since_unix_ms == 0);
    ensure!(info.replica_id == clean.welcome().replica_id, "{info:?}");
    ensure!(info.policies[0].outcome() == Outcome::Applied);
    listed_until(
        &on_a,
        "node-crash",
        Duration::from_secs(10),
        "node-crash connected",
        |i| i.connected,
    )
    .await?;
    let table = weirctl_ok(&a.endpoint(), &["agents"]).await?;
    ensure!(
        table.lines().any(|l| l.starts_with("node-clean")
            && l.contains("connected")
            && l.contains("yes: no route to zone b")
            && l.contains("default/orders@")),
        "{table}"
    );

    // node-clean closes its stream: disconnected at once (its lease waits
    // for a resume). node-crash's replica dies.
    let closed_at = weir_core::time::now_unix_ms();
    drop(clean);
    let gone = listed_until(
        &on_a,
        "node-clean",
        Duration::from_secs(10),
        "node-clean disconnected",
        |i| !i.connected,
    )
    .await?;
    let since = gone.disconnected_since_unix_ms;
    ensure!(since >= closed_at, "{gone:?}");
    let killed_at = weir_core::time::now_unix_ms();
    b.kill()?;
    crash.abort();

    // Both sessions expire (TTL 10 s); then both are listed as
    // disconnected, node-crash since its expiry was noticed.
    wait_until(Duration::from_secs(30), "both sessions expired", || async {
        on_a.policy_status("default", "orders")
            .await
            .is_ok_and(|s| s.connected_agents == 0)
    })
    .await?;
    let crashed = listed_until(
        &on_a,
        "node-crash",
        Duration::from_secs(15),
        "node-crash marked disconnected by the sweep",
        |i| !i.connected && i.disconnected_since_unix_ms >= killed_at,
    )
    .await?;
    ensure!(
        crashed.disconnected_since_unix_ms >= killed_at + 5_000,
        "recorded once its lease expired, not at the kill: {crashed:?}"
    );
    let clean = listed(&on_a, "node-clean").await?.context("still listed")?;
    ensure!(
        !clean.connected && clean.disconnected_since_unix_ms == since,
        "{clean:?}"
    );
    ensure!(
        clean.policies.is_empty(),
        "acks expire with the session: {clean:?}"
    );
    ensure!(clean.status.is_some_and(|s| s.degraded), "last status kept");

    let table = weirctl_ok(&a.endpoint(), &["agents"]).await?;
    for node in ["node-clean", "node-crash"] {
        ensure!(
            table
                .lines()
                .any(|l| l.starts_with(node) && l.contains("disconnected since ")),
            "{table}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(&weirctl_ok(&a.endpoint(), &["agents", "-o", "json"]).await?)?;
    ensure!(
        json["agents"]
            .as_array()
            .is_some_and(|l| l.len() == 2 && l.iter().all(|a| a["connected"] == false)),
        "{json}"
    );
    Ok(())
}

#[tokio::test]
async fn ask_agent_reaches_an_agent_on_the_other_replica() -> Result<()> {
    let (_etcd, [a, b]) = start_replicas("ask").await?;
    let on_a = Client::connect([a.endpoint()]).await?;
    let on_b = Client::connect([b.endpoint()]).await?;
    on_a.put_policy(policy("orders"), None).await?;

    let session = on_b.open_session(hello("node-b")).await?;
    let b_id = session.welcome().replica_id.clone();
    let mut agents = JoinSet::new();
    agents.spawn(run_stand_in(
        session,
        StandIn {
            describe: Some(AgentDescription {
                version: "test".into(),
                services: 3,
                endpoints: 7,
                ..AgentDescription::default()
            }),
            ..StandIn::default()
        },
    ));
    // A's cache learns where node-b's stream is.
    listed_until(
        &on_a,
        "node-b",
        Duration::from_secs(10),
        "node-b on a",
        |i| i.connected,
    )
    .await?;

    let (d, via) = on_a
        .describe_agent("node-b", Duration::from_secs(5))
        .await?;
    ensure!(via == b_id, "answered through {via}, not {b_id}");
    ensure!(
        d.services == 3 && d.endpoints == 7 && d.policy_revision > 0,
        "{d:?}"
    );
    // The same from the replica that holds the stream.
    let (d_local, via) = on_b
        .describe_agent("node-b", Duration::from_secs(5))
        .await?;
    ensure!(via == b_id && d_local.services == 3);
    // And from weirctl, through replica a.
    let text = weirctl_ok(&a.endpoint(), &["agents", "describe", "node-b"]).await?;
    ensure!(
        text.contains(&format!("stream on replica {b_id}"))
            && text
                .lines()
                .any(|l| l.starts_with("endpoints:") && l.ends_with(" 7")),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(
        &weirctl_ok(
            &a.endpoint(),
            &["agents", "describe", "node-b", "-o", "json"],
        )
        .await?,
    )?;
    ensure!(
        json["services"] == 3 && json["replica_id"] == b_id,
        "{json}"
    );
    Ok(())
}

#[tokio::test]
async fn ask_agent_says_not_found_deadline_exceeded_and_invalid_argument() -> Result<()> {
    let (_etcd, [a, b]) = start_replicas("askerr").await?;
    let on_a = Client::connect([a.endpoint()]).await?;
    let on_b = Client::connect([b.endpoint()]).await?;
    let describe = || agent_request::Body::Describe(DescribeRequest {});

    // Nobody of that name, on either replica.
    for client in [&on_a, &on_b] {
        let r = client
            .ask_agent("nobody", describe(), Duration::from_secs(2))
            .await;
        ensure!(
            matches!(&r, Err(Error::NotFound(m)) if m.contains("nobody")),
            "{r:?}"
        );
    }
    let out = weirctl(&a.endpoint(), &["agents", "describe", "nobody"]).await?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(err.contains("not found") && err.contains("nobody"), "{err}");

    // An agent on b that never answers: both the holder and a forwarding
    // replica give up at the deadline.
    let mut agents = JoinSet::new();
    agents.spawn(run_stand_in(
        on_b.open_session(hello("node-mute")).await?,
        StandIn {
            describe: None,
            ..StandIn::default()
        },
    ));
    listed_until(
        &on_a,
        "node-mute",
        Duration::from_secs(10),
        "node-mute on a",
        |i| i.connected,
    )
    .await?;
    for client in [&on_b, &on_a] {
        let start = Instant::now();
        let r = client
            .ask_agent("node-mute", describe(), Duration::from_millis(400))
            .await;
        let took = start.elapsed();
        ensure!(
            matches!(
                &r,
                Err(Error::Rpc {
                    code: tonic::Code::DeadlineExceeded,
                    message,
                }) if message.contains("node-mute")
            ),
            "{r:?}"
        );
        ensure!(
            took >= Duration::from_millis(400) && took < Duration::from_secs(3),
            "answered after {took:?}"
        );
    }

    // Bad input names its field.
    for (node, timeout, field) in [
        ("node-mute", Duration::from_secs(61), "timeout_ms"),
        ("bad node", Duration::from_secs(1), "node_id"),
    ] {
        let r = on_a.ask_agent(node, describe(), timeout).await;
        ensure!(
            r.as_ref()
                .err()
                .is_some_and(|e| e.field_violations().iter().any(|v| v.field == field)),
            "{field}: {r:?}"
        );
    }
    let out = weirctl(
        &a.endpoint(),
        &["agents", "describe", "node-mute", "--timeout-ms", "61000"],
    )
    .await?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("invalid argument: timeout_ms:"),
        "{err}"
    );
    Ok(())
}
