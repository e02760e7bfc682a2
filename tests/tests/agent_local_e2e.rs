//! Node-local registration through real agents: services register with
//! their node's agent, which holds them on its session at the control
//! plane; they leave with it (kill -9: within the session TTL; SIGTERM:
//! at once) and come back through it.

use std::time::Duration;

use anyhow::{ensure, Result};
use weir_client::{Client, GetServiceRequest, Instance, InstanceRef};
use weir_tests::{agent::AgentProcess, fixtures::ephemeral, start_one};

const SETTLE: Duration = Duration::from_secs(10);
/// The session TTL (10 s) and a margin for the lease to be noticed.
const SESSION_GONE: Duration = Duration::from_secs(16);

/// (instance id, agent_node) of a service at the control plane.
async fn held(client: &Client, service: &str) -> Result<Vec<(String, String)>> {
    let r = client
        .get_service(GetServiceRequest {
            namespace: "default".into(),
            service: service.into(),
            ..GetServiceRequest::default()
        })
        .await?;
    let mut v: Vec<(String, String)> = r
        .service
        .map(|s| s.instances)
        .unwrap_or_default()
        .into_iter()
        .map(|i| (i.instance_id, i.agent_node))
        .collect();
    v.sort();
    Ok(v)
}

/// Polls until `held` returns what `done` accepts; fails after `deadline`.
async fn until(
    client: &Client,
    service: &str,
    deadline: Duration,
    what: &str,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Result<()> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        let seen = held(client, service).await?;
        if done(&seen) {
            return Ok(());
        }
        ensure!(
            tokio::time::Instant::now() < end,
            "after {deadline:?}, {what}: the control plane shows {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn local(id: &str, ttl: u32) -> Instance {
    ephemeral("default", "orders", id, ttl)
}

#[tokio::test]
async fn instances_registered_at_an_agent_live_and_leave_with_it() -> Result<()> {
    let (_etcd, plane, client) = start_one("agent-local").await?;
    let registry_port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let fixed = [format!("--registry-addr=127.0.0.1:{registry_port}")];
    let mut agent = AgentProcess::start(&[plane.endpoint()], "node-1", &fixed)?;
    let other = AgentProcess::start(&[plane.endpoint()], "node-2", &[])?;
    let at_agent = Client::connect([agent.registry_endpoint()]).await?;

    // Three services register with their node's agent, and keep beating.
    let mut keepers = Vec::new();
    for id in ["a", "b", "c"] {
        keepers.push(at_agent.register_and_keep_alive(local(id, 3)).await?);
    }
    until(&client, "orders", SETTLE, "three held by node-1", |s| {
        s.len() == 3 && s.iter().all(|(_, node)| node == "node-1")
    })
    .await?;
    // The other node routes to them.
    other
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;

    // A persistent registration at an agent is refused, naming the field.
    let refused = at_agent
        .register(Instance {
            ephemeral: false,
            ..local("p", 0)
        })
        .await
        .expect_err("persistent at an agent");
    ensure!(
        refused
            .field_violations()
            .iter()
            .any(|v| v.field == "instance.ephemeral"),
        "{refused:?}"
    );
    // Reads come from the agent's view.
    let seen = at_agent
        .get_service(GetServiceRequest {
            namespace: "default".into(),
            service: "orders".into(),
            ..GetServiceRequest::default()
        })
        .await?;
    ensure!(seen.service.map_or(0, |s| s.instances.len()) == 3);

    // Deregistered at the control plane: only that one goes; the session
    // and the node's other instances stay.
    client
        .deregister(&InstanceRef {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "c".into(),
        })
        .await?;
    until(&client, "orders", SETTLE, "c gone, a and b kept", |s| {
        s.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>() == ["a", "b"]
    })
    .await?;
    drop(keepers.pop());
    let state = agent.state().await?;
    ensure!(state["session"]["connected"] == true, "{state}");

    // A service that stops beating is deregistered by its agent after its
    // own TTL (3 s), long before the session's.
    drop(keepers.pop());
    until(&client, "orders", SETTLE, "b lapsed", |s| {
        s.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>() == ["a"]
    })
    .await?;

    // kill -9: the node's instances leave with its session, within the TTL.
    agent.kill()?;
    until(
        &client,
        "orders",
        SESSION_GONE,
        "node-1's instances gone",
        |s| s.is_empty(),
    )
    .await?;
    // Restarted on the same port: the service's keeper finds its instance
    // unknown (NOT_FOUND) and registers it again, through the agent.
    let mut agent = AgentProcess::start(&[plane.endpoint()], "node-1", &fixed)?;
    until(&client, "orders", SETTLE, "a back through node-1", |s| {
        s == [("a".to_owned(), "node-1".to_owned())]
    })
    .await?;

    // SIGTERM: the agent deregisters its instances before it exits.
    let status = agent.terminate()?;
    ensure!(status.success(), "agent exit: {status}");
    let gone = held(&client, "orders").await?;
    ensure!(
        gone.is_empty(),
        "SIGTERM took them at once, not after the TTL: {gone:?}"
    );
    drop(keepers);
    Ok(())
}
