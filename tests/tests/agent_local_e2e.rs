//! Node-local registration through real agents: services register with
//! their node's agent, which holds them on its session at the control
//! plane; they leave with it (kill -9: within the session TTL; SIGTERM:
//! at once) and come back through it.

use std::time::Duration;

use anyhow::{ensure, Result};
use weir_client::{Client, GetServiceRequest, Instance, InstanceRef};
use weir_tests::{agent::AgentProcess, fixtures::ephemeral, poll_until, start_one};

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
    let what = format!("{what} (the control plane's {service} instances)");
    poll_until(deadline, &what, || held(client, service), |s| done(s))
        .await
        .map(drop)
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

/// Counts of requests sent through the agents while something happens.
#[derive(Default)]
struct Traffic {
    ok: std::sync::atomic::AtomicUsize,
    failed: std::sync::Mutex<Vec<String>>,
    stop: std::sync::atomic::AtomicBool,
}

/// Sends a request through each agent every 20 ms until told to stop.
async fn keep_sending(traffic: std::sync::Arc<Traffic>, ingresses: Vec<std::net::SocketAddr>) {
    use std::sync::atomic::Ordering;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<hyper::body::Bytes>>();
    while !traffic.stop.load(Ordering::Relaxed) {
        for addr in &ingresses {
            let request = hyper::Request::post(format!("http://{addr}/v1/services/orders/tick"))
                .body(http_body_util::Full::new(hyper::body::Bytes::from_static(
                    b"x",
                )));
            let outcome = match request {
                Ok(r) => match http.request(r).await {
                    Ok(resp) if resp.status().is_success() => Ok(()),
                    Ok(resp) => Err(format!(
                        "{} {:?}",
                        resp.status(),
                        resp.headers().get("weir-reason")
                    )),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(()) => {
                    traffic.ok.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => traffic
                    .failed
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(format!("via {addr}: {e}")),
            }
        }
        // Pacing, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls an agent's `/v1/state` until `done` holds; fails after `deadline`.
async fn state_until(
    agent: &AgentProcess,
    deadline: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> Result<()> {
    poll_until(deadline, what, || agent.state(), done)
        .await
        .map(drop)
}

#[tokio::test]
async fn agents_ride_out_a_control_plane_outage_longer_than_the_session_ttl() -> Result<()> {
    use std::sync::{atomic::Ordering, Arc};
    use weir_tests::{fixtures::HttpInstance, unique_prefix, ControlPlaneProcess, Etcd};

    let etcd = Etcd::start().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let args = [
        format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
        format!("--etcd-prefix={}", unique_prefix("agent-outage")),
        format!("--grpc-addr=127.0.0.1:{port}"),
    ];
    let mut plane = ControlPlaneProcess::start_args(&args)?;
    let client = Client::connect([plane.endpoint()]).await?;
    let agents = [
        AgentProcess::start(&[plane.endpoint()], "node-1", &[])?,
        AgentProcess::start(&[plane.endpoint()], "node-2", &[])?,
    ];
    let servers = [
        HttpInstance::start().await?,
        HttpInstance::start().await?,
        HttpInstance::start().await?,
    ];
    let on_node = |n: usize| Client::connect([agents[n].registry_endpoint()]);
    let (at_1, at_2) = (on_node(0).await?, on_node(1).await?);
    let mut keepers = Vec::new();
    for (n, id) in ["a", "b"].iter().enumerate() {
        let mut i = local(id, 5);
        i.port = u32::from(servers[n].port());
        keepers.push(at_1.register_and_keep_alive(i).await?);
    }
    for agent in &agents {
        agent
            .wait_for_endpoints("default", "orders", 2, SETTLE)
            .await?;
    }
    // One sender per agent, so a frozen agent holds up only its own.
    let traffic = Arc::new(Traffic::default());
    let senders: Vec<_> = agents
        .iter()
        .map(|a| tokio::spawn(keep_sending(traffic.clone(), vec![a.ingress_addr()])))
        .collect();

    // The control plane goes away for 30 s, three session TTLs.
    let outage = Duration::from_secs(30);
    let down_at = tokio::time::Instant::now();
    plane.kill()?;
    for agent in &agents {
        state_until(agent, SETTLE, "the agent says it is degraded", |s| {
            s["session"]["degraded"] == true
        })
        .await?;
    }
    // The outage itself: a duration of the scenario, not a wait for a condition.
    tokio::time::sleep_until(down_at + outage).await;
    let during = traffic.ok.load(Ordering::Relaxed);
    // node-1 is frozen while node-2 reconnects first: node-2 learns that
    // a and b are gone (their session expired) before node-1 can register
    // them again, and keeps routing to them as stale meanwhile.
    agents[0].pause()?;
    let plane = ControlPlaneProcess::start_args(&args)?;
    let resumed = state_until(
        &agents[1],
        SETTLE,
        "node-2 back, routing to a and b as stale",
        |s| s["session"]["connected"] == true && s["session"]["stale_instances"] == 2,
    )
    .await;
    agents[0].resume()?;
    resumed?;

    // Both sessions expired during the outage: node-1 registers its
    // instances again on its new session, well within the grace period.
    until(
        &client,
        "orders",
        Duration::from_secs(25),
        "a and b back on node-1",
        |s| {
            s == [
                ("a".to_owned(), "node-1".to_owned()),
                ("b".to_owned(), "node-1".to_owned()),
            ]
        },
    )
    .await?;
    for agent in &agents {
        state_until(agent, SETTLE, "the agent is connected again", |s| {
            s["session"]["connected"] == true && s["session"]["degraded"] == false
        })
        .await?;
    }
    // A registration made after the restart reaches both agents.
    let mut c = local("c", 5);
    c.port = u32::from(servers[2].port());
    keepers.push(at_2.register_and_keep_alive(c).await?);
    for agent in &agents {
        agent
            .wait_for_endpoints("default", "orders", 3, SETTLE)
            .await?;
    }
    state_until(&agents[1], SETTLE, "nothing stale any more", |s| {
        s["session"]["stale_instances"] == 0
    })
    .await?;
    traffic.stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await?;
    }
    let failed = traffic
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let ok = traffic.ok.load(Ordering::Relaxed);
    ensure!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    ensure!(
        during > 1000,
        "traffic flowed during the outage ({during} requests by its end)"
    );
    drop(plane);
    Ok(())
}
