//! The agent's persisted view (`--data-dir`): an agent that starts while
//! no control plane answers routes on the view it saved, says it is
//! degraded, and reconnects when the control plane is back.

use std::{path::Path, time::Duration};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use prost::Message;
use weir_client::{agent::PersistedState, Client};
use weir_tests::{
    agent::AgentProcess,
    fixtures::{instance, HttpInstance},
    free_port, http_status, unique_prefix, wait_until, ControlPlaneProcess, Etcd,
};

const SETTLE: Duration = Duration::from_secs(10);

/// The instances in the agent's saved view, if the file reads.
fn saved_instances(file: &Path) -> Option<Vec<String>> {
    let bytes = std::fs::read(file).ok()?;
    let state = PersistedState::decode(bytes.as_slice()).ok()?;
    let mut ids: Vec<String> = state
        .registry?
        .events
        .into_iter()
        .filter_map(|e| e.instance.map(|i| i.instance_id))
        .collect();
    ids.sort();
    Some(ids)
}

async fn session_flags(agent: &AgentProcess) -> Result<(bool, bool)> {
    let state = agent.state().await?;
    let s = &state["session"];
    Ok((
        s["connected"].as_bool().context("session.connected")?,
        s["degraded"].as_bool().context("session.degraded")?,
    ))
}

#[tokio::test]
async fn an_agent_started_without_a_control_plane_routes_on_its_saved_view() -> Result<()> {
    let etcd = Etcd::start().await?;
    let cp_args = [
        format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
        format!("--etcd-prefix={}", unique_prefix("agent-persist")),
        format!("--grpc-addr=127.0.0.1:{}", free_port()?),
    ];
    let mut plane = ControlPlaneProcess::start_args(&cp_args)?;
    let endpoints = [plane.endpoint()];
    let client = Client::connect(endpoints.clone()).await?;
    let servers = [HttpInstance::start().await?, HttpInstance::start().await?];
    for (n, server) in servers.iter().enumerate() {
        client
            .register(instance(
                "default",
                "orders",
                &format!("i{n}"),
                u32::from(server.port()),
            ))
            .await?;
    }

    let data = tempfile::tempdir()?;
    // A directory the agent has to create.
    let dir = data.path().join("agent");
    let with_dir = [format!("--data-dir={}", dir.display())];
    let mut agent = AgentProcess::start(&endpoints, "node-p", &with_dir)?;
    agent
        .wait_for_endpoints("default", "orders", 2, SETTLE)
        .await?;
    let file = dir.join("view.pb");
    wait_until(SETTLE, "the agent to save a view of both instances", || {
        let seen = saved_instances(&file);
        async move { seen.as_deref() == Some(&["i0".to_owned(), "i1".to_owned()][..]) }
    })
    .await?;

    // The agent stops, then the control plane dies: the next agent starts
    // with nobody to ask.
    ensure!(agent.terminate()?.success(), "the agent stops cleanly");
    plane.kill()?;
    let agent = AgentProcess::start(&endpoints, "node-p", &with_dir)?;
    wait_until(SETTLE, "/readyz to pass on the saved view", || async {
        http_status(agent.admin_addr(), "/readyz").await.ok() == Some(200)
    })
    .await?;
    let (connected, degraded) = session_flags(&agent).await?;
    ensure!(
        !connected && degraded,
        "with no control plane the agent says it is degraded (connected {connected}, degraded {degraded})"
    );
    let http: HttpClient<HttpConnector, Full<Bytes>> =
        HttpClient::builder(TokioExecutor::new()).build_http();
    for _ in 0..20 {
        let request = Request::post(format!(
            "http://{}/v1/services/orders/saved",
            agent.ingress_addr()
        ))
        .body(Full::new(Bytes::from_static(b"{}")))?;
        let response = http.request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(
            status == 200,
            "through the saved view: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    for (n, server) in servers.iter().enumerate() {
        let hits = server.hits().iter().filter(|h| h.path == "/saved").count();
        ensure!(
            hits == 10,
            "instance i{n} got {hits} of 20 requests, not 10"
        );
    }

    // The control plane is back on the same address: the agent reconnects.
    let _plane = ControlPlaneProcess::start_args(&cp_args)?;
    wait_until(SETTLE * 2, "the agent to reconnect", || async {
        matches!(session_flags(&agent).await, Ok((true, false)))
    })
    .await?;
    agent
        .wait_for_endpoints("default", "orders", 2, SETTLE)
        .await?;
    Ok(())
}
