//! End-to-end tests of instances held by an agent session: real etcd, a
//! real control-plane process, and stand-in agents that open their
//! session with `weir_client::AgentSession` and make the calls the agent
//! makes for its node (`Client::register_for_node`, `Client::deregister`,
//! `Client::report_health` through weir-core's checker).

use std::{sync::Arc, time::Duration};

use anyhow::{bail, ensure, Context, Result};
use tokio::{task::JoinHandle, time::Instant};
use tonic::Code;
use weir_client::{
    instance_ref, Client, EventType, GetHealthRequest, GetServiceRequest, HealthDetail,
    HealthStatus, Instance, NodeStatusSink, WatchRequest,
};
use weir_core::health::checker::{Checker, Transition};
use weir_tests::{
    agents::hello,
    fixtures::{checked, ephemeral, http_check, instance, HttpInstance},
    follow, instances, never_removed, start_one, status_in, wait_until, weirctl_ok,
};

/// The agent-session lease TTL the control plane grants.
const SESSION_TTL: Duration = Duration::from_secs(10);

/// A stand-in agent's open session: read in the background as an agent
/// reads it, closed (its stream dropped, nothing said) when this is.
struct Session(JoinHandle<()>);

impl Session {
    async fn open(client: &Client, node: &str) -> Result<Self> {
        let mut session = client.open_session(hello(node)).await?;
        Ok(Self(tokio::spawn(async move {
            while let Ok(Some(_)) = session.next().await {}
        })))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The ids of `default/service`, sorted.
async fn ids(client: &Client, service: &str) -> Result<Vec<String>> {
    let mut ids: Vec<String> = instances(client, service)
        .await?
        .into_iter()
        .map(|i| i.instance_id)
        .collect();
    ids.sort();
    Ok(ids)
}

fn refused(r: Result<impl std::fmt::Debug, weir_client::Error>, code: Code) -> Result<String> {
    match r {
        Err(e) if e.code() == Some(code) => Ok(e.to_string()),
        other => bail!("expected {code:?}, got {other:?}"),
    }
}

/// The one test that waits out session TTLs.
#[tokio::test]
async fn a_nodes_instances_live_on_its_session_and_leave_together_when_it_ends() -> Result<()> {
    let (_etcd, plane, client) = start_one("held").await?;
    let endpoint = plane.endpoint();
    let session = Session::open(&client, "node-1").await?;
    for id in ["o-0", "o-1", "o-2"] {
        // Their own TTL, 2 s, is the agent's business: the session holds
        // them here.
        let r = client
            .register_for_node("node-1", ephemeral("default", "orders", id, 2))
            .await?;
        ensure!(r.ttl_seconds == 2, "{r:?}");
    }
    let held = instances(&client, "orders").await?;
    ensure!(held.len() == 3, "{held:?}");
    let lease = held[0].lease_id;
    ensure!(
        lease != 0
            && held
                .iter()
                .all(|i| i.agent_node == "node-1" && i.lease_id == lease),
        "one session lease holds them all: {held:?}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&weirctl_ok(&endpoint, &["get", "orders", "-o", "json"]).await?)?;
    let nodes: Vec<&str> = json["instances"]
        .as_array()
        .context("instances")?
        .iter()
        .filter_map(|i| i["agent_node"].as_str())
        .collect();
    ensure!(nodes == ["node-1"; 3], "{json}");
    let table = weirctl_ok(&endpoint, &["get", "orders"]).await?;
    ensure!(table.contains("agent node-1 (ttl 2s)"), "{table}");

    // An operator removes one at the control plane: only its key goes.
    let out = weirctl_ok(&endpoint, &["deregister", "orders", "o-0"]).await?;
    ensure!(out.contains("deregistered default/orders/o-0"), "{out}");
    ensure!(ids(&client, "orders").await? == ["o-1", "o-2"]);
    // The session's lease still renews: the other two outlive its TTL (and
    // their own) by far.
    let mut view = client.watch_view("default", "orders");
    follow(&mut view, Duration::from_secs(5), "the snapshot", |v| {
        v.instances().count() == 2
    })
    .await?;
    never_removed(
        &mut view,
        "orders",
        &["o-1", "o-2"],
        Instant::now() + SESSION_TTL + Duration::from_secs(2),
    )
    .await?;

    // The session ends without a word (a dead node): after its TTL, all
    // of the node's instances leave in one deletion.
    let at = client
        .get_service(GetServiceRequest {
            namespace: "default".into(),
            service: "orders".into(),
            ..GetServiceRequest::default()
        })
        .await?
        .revision;
    let mut watch = client
        .watch(WatchRequest {
            namespace: "default".into(),
            service: "orders".into(),
            start_revision: at,
        })
        .await?;
    let ended = Instant::now();
    drop(session);
    let mut deletions = Vec::new();
    while deletions.len() < 2 {
        let message = tokio::time::timeout_at(
            ended + SESSION_TTL + Duration::from_secs(5),
            watch.message(),
        )
        .await
        .context("the node's instances leave within the session TTL")??
        .context("watch open")?;
        for e in message.events {
            ensure!(
                e.r#type == EventType::Delete as i32,
                "not a deletion: {e:?}"
            );
            let id = e.instance.map(|i| i.instance_id).unwrap_or_default();
            deletions.push((id, e.revision));
        }
    }
    deletions.sort();
    ensure!(
        deletions[0].0 == "o-1" && deletions[1].0 == "o-2" && deletions[0].1 == deletions[1].1,
        "together, at one revision: {deletions:?}"
    );
    ensure!(ids(&client, "orders").await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn registering_for_a_node_needs_its_session_and_its_instances_are_renewed_by_it() -> Result<()>
{
    let (_etcd, _plane, client) = start_one("held-refused").await?;
    let message = refused(
        client
            .register_for_node("ghost", ephemeral("default", "orders", "o-1", 5))
            .await,
        Code::FailedPrecondition,
    )?;
    ensure!(
        message.contains("\"ghost\" has no live agent session"),
        "{message}"
    );
    let persistent = client
        .register_for_node("ghost", instance("default", "orders", "o-1", 8080))
        .await
        .expect_err("persistent");
    ensure!(
        persistent
            .field_violations()
            .first()
            .is_some_and(|v| v.field == "instance.ephemeral"),
        "{persistent:?}"
    );
    ensure!(ids(&client, "orders").await?.is_empty());

    let _session = Session::open(&client, "node-1").await?;
    let held = client
        .register_for_node("node-1", ephemeral("default", "orders", "o-1", 5))
        .await?
        .instance
        .context("record")?;
    let direct = client
        .register(ephemeral("default", "orders", "o-2", 5))
        .await?
        .instance
        .context("record")?;
    ensure!(held.agent_node == "node-1" && direct.agent_node.is_empty());
    ensure!(held.lease_id != direct.lease_id);
    // A heartbeat, alone or on the shared KeepAlive stream, is answered
    // FAILED_PRECONDITION naming the holder: the agent renews it, not us.
    let r = instance_ref(&held);
    for outcome in [
        client.heartbeat(&r).await,
        client.renew(&r, Duration::from_secs(2)).await,
    ] {
        let message = refused(outcome, Code::FailedPrecondition)?;
        ensure!(message.contains("node \"node-1\""), "{message}");
    }
    // ... while a direct registration beside it renews as ever.
    client.heartbeat(&instance_ref(&direct)).await?;
    ensure!(ids(&client, "orders").await? == ["o-1", "o-2"]);
    Ok(())
}

#[tokio::test]
async fn the_agent_checks_its_instances_and_the_control_plane_leaves_them_alone() -> Result<()> {
    let (_etcd, _plane, client) = start_one("held-checks").await?;
    let server = HttpInstance::start().await?;
    let start = std::time::Instant::now();
    let _node1 = Session::open(&client, "node-1").await?;
    let _node2 = Session::open(&client, "node-2").await?;
    let held = client
        .register_for_node(
            "node-1",
            Instance {
                ephemeral: true,
                ttl_seconds: 5,
                ..checked("web", "held", server.port(), http_check("/held"), 100)
            },
        )
        .await?
        .instance
        .context("record")?;
    // The control: a direct instance on the same server, which the
    // control plane checks.
    let direct = client
        .register(checked(
            "web",
            "direct",
            server.port(),
            http_check("/direct"),
            100,
        ))
        .await?
        .instance
        .context("record")?;

    // The stand-in agent runs weir-core's checker, reporting through the
    // client's NodeStatusSink.
    let checker = Checker::new(
        Arc::new(NodeStatusSink::new(client.clone(), "node-1")),
        "agent:node-1",
    );
    checker.sync([&Arc::new(held.clone())]);
    let mut view = client.watch_view("default", "web");
    let status = |v: &weir_client::WatchView, id| status_in(v, "web", id);
    follow(&mut view, Duration::from_secs(10), "both PASSING", |v| {
        status(v, "held") == Some(HealthStatus::Passing)
            && status(v, "direct") == Some(HealthStatus::Passing)
    })
    .await?;
    server.set_status("/held", 500);
    follow(&mut view, Duration::from_secs(10), "held CRITICAL", |v| {
        status(v, "held") == Some(HealthStatus::Critical)
    })
    .await?;
    let record = view.get("default", "web", "held").context("held")?;
    let detail = record.health.clone().context("detail")?;
    ensure!(
        detail.checked_by == "agent:node-1" && detail.reason.contains("HTTP 500"),
        "{detail:?}"
    );
    ensure!(
        record.lease_id == held.lease_id,
        "still on the session lease"
    );

    // Let the control plane's checker run a good while (it probes the
    // direct instance every 100 ms) ...
    wait_until(
        Duration::from_secs(10),
        "20 control-plane checks of the direct instance",
        || async { server.hits_since("/direct", start).len() >= 20 },
    )
    .await?;
    // ... it never probed the held one: every probe of /held is the agent's.
    let by_control_plane = server.hits_since("/direct", start);
    ensure!(
        by_control_plane
            .iter()
            .all(|h| !h.checker.is_empty() && h.checker != "agent:node-1"),
        "{by_control_plane:?}"
    );
    let held_hits = server.hits_since("/held", start);
    ensure!(!held_hits.is_empty(), "the agent checked it");
    let strangers: Vec<_> = held_hits
        .iter()
        .filter(|h| h.checker != "agent:node-1")
        .collect();
    ensure!(strangers.is_empty(), "probed by others: {strangers:?}");

    // A report from a node that does not hold an instance is refused, and
    // changes nothing.
    let forged = Transition {
        from: HealthStatus::Critical,
        to: HealthStatus::Passing,
        detail: HealthDetail {
            reason: "forged".into(),
            ..HealthDetail::default()
        },
    };
    let message = refused(
        client
            .report_health("node-2", &instance_ref(&held), 0, &forged)
            .await,
        Code::FailedPrecondition,
    )?;
    ensure!(
        message.contains("held by the agent session of node \"node-1\""),
        "{message}"
    );
    let message = refused(
        client
            .report_health("node-1", &instance_ref(&direct), 0, &forged)
            .await,
        Code::FailedPrecondition,
    )?;
    ensure!(message.contains("registered directly"), "{message}");
    let now = instances(&client, "web").await?;
    ensure!(
        now.iter()
            .all(|i| i.health.as_ref().is_some_and(|h| h.reason != "forged")),
        "{now:?}"
    );

    // The holder's own recovery brings it back, and the history has it all.
    server.set_status("/held", 200);
    follow(
        &mut view,
        Duration::from_secs(10),
        "held PASSING again",
        |v| status(v, "held") == Some(HealthStatus::Passing),
    )
    .await?;
    let moves = || async {
        let health = client
            .get_health(GetHealthRequest {
                namespace: "default".into(),
                service: "web".into(),
                instance_id: "held".into(),
            })
            .await?;
        let moves: Vec<(i32, i32)> = health
            .instances
            .first()
            .map(|i| i.transitions.iter().map(|t| (t.from, t.to)).collect())
            .unwrap_or_default();
        anyhow::Ok(moves)
    };
    wait_until(Duration::from_secs(5), "three transitions", || async {
        moves().await.is_ok_and(|m| m.len() >= 3)
    })
    .await?;
    let moves = moves().await?;
    let (unknown, passing, critical) = (
        HealthStatus::Unknown as i32,
        HealthStatus::Passing as i32,
        HealthStatus::Critical as i32,
    );
    ensure!(
        moves == [(unknown, passing), (passing, critical), (critical, passing)],
        "{moves:?}"
    );
    checker.clear();
    Ok(())
}
