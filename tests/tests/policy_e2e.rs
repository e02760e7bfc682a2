//! End-to-end tests of traffic policies and the agent session: real etcd,
//! real control-plane processes, session clients speaking the protocol the
//! agent will speak (`weir_client::AgentSession`).

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use tokio::task::JoinSet;
use weir_client::{
    agent::policy_update,
    policy::{rate_limit, RateLimit, Retry, TrafficPolicy},
    AckOutcome, Client, Error, Instance, SessionEvent,
};
use weir_tests::{
    agents::{hello, next_policies, policy_status_until, run_stand_in, StandIn},
    start_one, start_replicas, workspace_binary,
};

fn policy(service: &str, attempts: u32) -> TrafficPolicy {
    TrafficPolicy {
        namespace: "default".into(),
        service: service.into(),
        retry: Some(Retry {
            attempts,
            ..Retry::default()
        }),
        ..TrafficPolicy::default()
    }
}

#[tokio::test]
async fn a_policy_change_reaches_100_sessions_and_all_acknowledge_it() -> Result<()> {
    let (_etcd, [a, b]) = start_replicas("push").await?;
    let client = Client::connect([a.endpoint()]).await?;
    let mut agents = JoinSet::new();
    for k in 0..100 {
        // Half the agents on each replica.
        let c = Client::connect([if k % 2 == 0 {
            a.endpoint()
        } else {
            b.endpoint()
        }])
        .await?;
        let session = c.open_session(hello(&format!("node-{k}"))).await?;
        agents.spawn(run_stand_in(session, StandIn::default()));
    }
    policy_status_until(&client, "orders", "100 sessions connected", |s| {
        s.connected_agents == 100
    })
    .await?;
    let v = client.put_policy(policy("orders", 3), None).await?;
    policy_status_until(&client, "orders", "every agent applied it", |s| {
        s.applied == 100
    })
    .await?;
    let status = client.policy_status("default", "orders").await?;
    ensure!(status.current_version == v.version);
    ensure!(status.rejected == 0 && status.pending == 0, "{status:?}");
    ensure!(status
        .agents
        .iter()
        .all(|a| a.version == v.version && a.accepted));
    agents.abort_all();
    Ok(())
}

#[tokio::test]
async fn concurrent_puts_with_the_same_expected_version_let_exactly_one_win() -> Result<()> {
    let (_etcd, _plane, client) = start_one("cas").await?;
    let first = client.put_policy(policy("cart", 2), Some(0)).await?;
    // Creating again "only if none exists" fails.
    let again = client.put_policy(policy("cart", 2), Some(0)).await;
    ensure!(
        matches!(
            &again,
            Err(Error::Rpc {
                code: tonic::Code::FailedPrecondition,
                ..
            })
        ),
        "{again:?}"
    );

    for round in 0..5 {
        let current = client.get_policy("default", "cart").await?.version;
        let (x, y) = tokio::join!(
            client.put_policy(policy("cart", 4 + round), Some(current)),
            client.put_policy(policy("cart", 5 + round), Some(current)),
        );
        let (winner, loser) = match (x, y) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => bail!("round {round}: not exactly one winner: {other:?}"),
        };
        match &loser {
            Error::Rpc {
                code: tonic::Code::FailedPrecondition,
                message,
            } => ensure!(
                message.contains(&format!("current_version={}", winner.version)),
                "the loser is told the current version: {message}"
            ),
            other => bail!("loser got {other:?}"),
        }
    }
    ensure!(first.version > 0);
    Ok(())
}

#[tokio::test]
async fn invalid_policies_are_rejected_naming_the_field_and_weirctl_points_at_it() -> Result<()> {
    let (_etcd, plane, client) = start_one("badpol").await?;
    let mut bad = policy("pay", 3);
    bad.rate_limit = Some(RateLimit {
        requests_per_second: -5.0,
        on_excess: rate_limit::OnExcess::Reject as i32,
        ..RateLimit::default()
    });
    match client.put_policy(bad, None).await {
        Err(Error::InvalidArgument { message: m, .. }) => {
            ensure!(
                m.starts_with("policy.rate_limit.requests_per_second"),
                "{m}"
            )
        }
        other => bail!("expected InvalidArgument, got {other:?}"),
    }

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("pay.yaml");
    std::fs::write(
        &file,
        "service: pay\nrules:\n  - name: slow\n    match:\n      type_prefix: com.pay.\n    retry:\n      attempts: 99\n",
    )?;
    let out = tokio::process::Command::new(workspace_binary("weirctl")?)
        .args(["--endpoint", &plane.endpoint(), "policy", "set", "-f"])
        .arg(&file)
        .output()
        .await?;
    ensure!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        err.lines()
            .any(|l| l.contains("attempts: 99") && l.contains("# <--")),
        "the error is shown next to the field:\n{err}"
    );
    ensure!(err.contains("policy.rules[0].retry.attempts"), "{err}");
    Ok(())
}

#[tokio::test]
async fn rollback_restores_a_previous_version_and_pushes_it() -> Result<()> {
    let (_etcd, _plane, client) = start_one("rollback").await?;
    let v1 = client.put_policy(policy("inv", 2), None).await?;
    let v2 = client
        .put_policy(policy("inv", 7), Some(v1.version))
        .await?;
    let mut session = client.open_session(hello("node-r")).await?;
    let snapshot = next_policies(&mut session).await?;
    ensure!(snapshot.kind == policy_update::Kind::Snapshot as i32);
    ensure!(session.policies().values().any(|p| p.version == v2.version));

    let v3 = client
        .rollback_policy("default", "inv", v1.version, None)
        .await?;
    ensure!(v3.version > v2.version && v3.restored_from == v1.version);
    let update = next_policies(&mut session).await?;
    let pushed = update.changes.first().context("a change")?;
    ensure!(pushed.version == v3.version, "pushed {pushed:?}");
    let attempts = pushed
        .policy
        .as_ref()
        .and_then(|p| p.retry.as_ref())
        .map(|r| r.attempts);
    ensure!(
        attempts == Some(2),
        "version 1's content is back: {attempts:?}"
    );
    let history = client.policy_history("default", "inv").await?;
    ensure!(
        history.iter().map(|v| v.version).collect::<Vec<_>>()
            == [v3.version, v2.version, v1.version],
        "{history:?}"
    );
    // Rolling back to a version that was never kept is a clear error.
    let missing = client.rollback_policy("default", "inv", 1, None).await;
    ensure!(
        matches!(&missing, Err(Error::InvalidArgument { message: m, .. }) if m.contains("to_version")),
        "{missing:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_session_that_moves_to_another_replica_gets_exactly_what_changed_meanwhile() -> Result<()>
{
    let (_etcd, [a, b]) = start_replicas("resume").await?;
    let on_a = Client::connect([a.endpoint()]).await?;
    let on_b = Client::connect([b.endpoint()]).await?;
    let p1 = on_a.put_policy(policy("one", 2), None).await?;
    let p2 = on_a.put_policy(policy("two", 2), None).await?;
    on_a.register(Instance {
        service: "one".into(),
        instance_id: "one-1".into(),
        host: "127.0.0.1".into(),
        port: 8080,
        ..Instance::default()
    })
    .await?;

    let mut first = on_a.open_session(hello("node-m")).await?;
    ensure!(!first.welcome().resumed_session);
    // Policies and the registry come on the same stream, in either order.
    let mut snapshot = None;
    let mut saw_instance = false;
    while snapshot.is_none() || !saw_instance {
        match tokio::time::timeout(Duration::from_secs(10), first.next()).await?? {
            Some(SessionEvent::Registry(r)) => {
                saw_instance |= r.events.iter().any(|e| {
                    e.instance
                        .as_ref()
                        .is_some_and(|i| i.instance_id == "one-1")
                })
            }
            Some(SessionEvent::Policies(u)) => snapshot = Some(u),
            Some(_) => {}
            None => bail!("session closed"),
        }
    }
    let snapshot = snapshot.context("policy snapshot")?;
    ensure!(snapshot.kind == policy_update::Kind::Snapshot as i32 && snapshot.changes.len() == 2);
    for c in &snapshot.changes {
        first
            .ack(&c.namespace, &c.service, c.version, AckOutcome::Applied)
            .await?;
    }
    policy_status_until(&on_a, "two", "acks recorded", |s| s.applied == 1).await?;

    // The agent goes away; meanwhile one policy changes, one is deleted,
    // one is created.
    let resume = first.resume_hello(hello("node-m"));
    drop(first);
    let p1b = on_a.put_policy(policy("one", 5), Some(p1.version)).await?;
    let deleted = on_a
        .delete_policy("default", "two", Some(p2.version))
        .await?;
    let p3 = on_a.put_policy(policy("three", 1), None).await?;

    let mut second = on_b.open_session(resume).await?;
    ensure!(
        second.welcome().resumed_session,
        "the session lease was taken over"
    );
    let update = next_policies(&mut second).await?;
    ensure!(
        update.kind == policy_update::Kind::Changes as i32,
        "a resume, not a resend: {update:?}"
    );
    let got: Vec<(String, u64, bool)> = update
        .changes
        .iter()
        .map(|c| (c.service.clone(), c.version, c.policy.is_some()))
        .collect();
    ensure!(
        got == [
            ("one".to_string(), p1b.version, true),
            ("two".to_string(), deleted.revision, false),
            ("three".to_string(), p3.version, true),
        ],
        "exactly what changed while away: {got:?}"
    );
    // Its earlier acknowledgement survived the move (same session lease).
    let one = on_b.policy_status("default", "one").await?;
    ensure!(one.connected_agents == 1 && one.pending == 1, "{one:?}");
    second
        .ack(
            "default",
            "one",
            p1b.version,
            AckOutcome::Rejected("retry.attempts 5 is over this node's cap".into()),
        )
        .await?;
    policy_status_until(&on_b, "one", "the rejection is reported", |s| {
        s.rejected == 1
    })
    .await?;
    let one = on_b.policy_status("default", "one").await?;
    ensure!(
        one.agents[0].error.contains("over this node's cap"),
        "{one:?}"
    );
    Ok(())
}

#[test]
fn the_example_policy_in_the_docs_is_valid() -> Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../docs/examples/orders-policy.yaml");
    let text = std::fs::read_to_string(&path)?;
    let parsed: TrafficPolicy = serde_yaml::from_str(&text)?;
    let valid = weir_core::policy::validate::policy(Some(&parsed))
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    ensure!(valid.rules.len() == 2 && valid.service == "orders");
    Ok(())
}
