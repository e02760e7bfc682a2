//! The agent's balancers end to end: a real control plane on etcd, a real
//! `weir-agent`, HTTP instances in the test. Consistent hash by a header,
//! least request (P2C) and peak EWMA around a slow instance, and zone
//! preference spilling over when the agent's zone runs short.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use axum::{extract::State, http::HeaderMap, Router};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use tokio::{net::TcpListener, task::JoinHandle};
use weir_client::{
    policy::{
        consistent_hash::Key, load_balancer::Algorithm, ConsistentHash, LoadBalancer,
        TrafficPolicy, ZonePreference,
    },
    Client, InstanceRef,
};
use weir_tests::{
    agent::AgentProcess, agents::put_policy_applied, fixtures::instance, poll_until, start_one,
};

const SETTLE: Duration = Duration::from_secs(10);
const KEY_HEADER: &str = "x-customer";

type Http = HttpClient<HttpConnector, Full<Bytes>>;

fn http() -> Http {
    HttpClient::builder(TokioExecutor::new()).build_http()
}

/// An HTTP instance that answers 200 after `delay`, recording the
/// [`KEY_HEADER`] of each request ("" when absent).
struct Instance {
    port: u16,
    keys: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl Instance {
    async fn start(delay: Duration) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let app = Router::new()
            .fallback(
                move |State(keys): State<Arc<Mutex<Vec<String>>>>, headers: HeaderMap| async move {
                    let key = headers
                        .get(KEY_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    keys.lock().unwrap_or_else(|p| p.into_inner()).push(key);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    "ok"
                },
            )
            .with_state(keys.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, keys, task })
    }

    fn keys(&self) -> Vec<String> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn hits(&self) -> usize {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Registers `servers` as instances `i0..` of `service`, in `zones` (by
/// index; none when shorter).
async fn register(
    client: &Client,
    service: &str,
    servers: &[Instance],
    zones: &[&str],
) -> Result<()> {
    for (n, server) in servers.iter().enumerate() {
        let mut i = instance("default", service, &format!("i{n}"), u32::from(server.port));
        i.zone = zones.get(n).copied().unwrap_or("").to_owned();
        client.register(i).await?;
    }
    Ok(())
}

async fn deregister(client: &Client, service: &str, id: &str) -> Result<()> {
    client
        .deregister(&InstanceRef {
            namespace: "default".into(),
            service: service.into(),
            instance_id: id.into(),
        })
        .await?;
    Ok(())
}

/// Puts `lb` as `service`'s default balancer and waits until `applied`
/// agents apply it in full.
async fn set_balancer(client: &Client, service: &str, lb: LoadBalancer) -> Result<()> {
    let policy = TrafficPolicy {
        load_balancer: Some(lb),
        ..TrafficPolicy::default()
    };
    put_policy_applied(client, service, policy).await
}

/// `service`'s route in the agent's `/v1/state`.
async fn route(agent: &AgentProcess, service: &str) -> Result<serde_json::Value> {
    let state = agent.state().await?;
    state["routes"]
        .as_array()
        .and_then(|routes| routes.iter().find(|r| r["service"] == service).cloned())
        .with_context(|| format!("no route for {service} in {state}"))
}

/// Waits until the agent balances `service` with `algorithm`.
async fn wait_for_algorithm(agent: &AgentProcess, service: &str, algorithm: &str) -> Result<()> {
    poll_until(
        SETTLE,
        &format!("{service} balanced by {algorithm}"),
        || route(agent, service),
        |r| r["balancer"] == algorithm,
    )
    .await
    .map(drop)
}

/// One request to `service` through the agent; its status.
async fn call(http: &Http, agent: &AgentProcess, service: &str, key: Option<&str>) -> Result<u16> {
    let mut request = Request::post(format!(
        "http://{}/v1/services/{service}/work",
        agent.ingress_addr()
    ));
    if let Some(key) = key {
        request = request.header(KEY_HEADER, key);
    }
    let response = http
        .request(request.body(Full::new(Bytes::from_static(b"x")))?)
        .await?;
    let status = response.status().as_u16();
    response.into_body().collect().await?;
    Ok(status)
}

/// Which instance each key went to (every request of a key must have gone
/// to one instance).
fn owners(servers: &[Instance]) -> Result<HashMap<String, usize>> {
    let mut owner: HashMap<String, usize> = HashMap::new();
    for (n, s) in servers.iter().enumerate() {
        for key in s.keys().into_iter().filter(|k| !k.is_empty()) {
            if let Some(other) = owner.insert(key.clone(), n) {
                ensure!(other == n, "key {key} went to i{other} and to i{n}");
            }
        }
    }
    Ok(owner)
}

#[tokio::test]
async fn consistent_hash_keeps_keys_and_moves_few_when_one_leaves() -> Result<()> {
    let (_etcd, plane, client) = start_one("balance-ch").await?;
    let servers = [
        Instance::start(Duration::ZERO).await?,
        Instance::start(Duration::ZERO).await?,
        Instance::start(Duration::ZERO).await?,
    ];
    register(&client, "orders", &servers, &[]).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    set_balancer(
        &client,
        "orders",
        LoadBalancer {
            algorithm: Algorithm::ConsistentHash as i32,
            consistent_hash: Some(ConsistentHash {
                key: Key::Header as i32,
                header: KEY_HEADER.into(),
            }),
            ..LoadBalancer::default()
        },
    )
    .await?;
    wait_for_algorithm(&agent, "orders", "consistent_hash").await?;

    let http = http();
    const KEYS: usize = 300;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("customer-{k}")).collect();
    for round in 0..2 {
        for key in &keys {
            let status = call(&http, &agent, "orders", Some(key)).await?;
            ensure!(status == 200, "round {round}, {key}: {status}");
        }
    }
    let before = owners(&servers)?;
    ensure!(before.len() == KEYS, "every key seen: {}", before.len());
    let shares: Vec<usize> = (0..3)
        .map(|n| before.values().filter(|o| **o == n).count())
        .collect();
    ensure!(
        shares.iter().all(|s| *s >= KEYS / 6),
        "keys spread over all three: {shares:?}"
    );
    // A request without the key still goes somewhere (round robin).
    ensure!(call(&http, &agent, "orders", None).await? == 200);

    // One of three leaves: its keys move, and at most 1.5/3 of all keys.
    deregister(&client, "orders", "i1").await?;
    agent
        .wait_for_endpoints("default", "orders", 2, SETTLE)
        .await?;
    let seen_before: Vec<usize> = servers.iter().map(Instance::hits).collect();
    for key in &keys {
        ensure!(call(&http, &agent, "orders", Some(key)).await? == 200);
    }
    let mut after: HashMap<String, usize> = HashMap::new();
    for (n, (server, skip)) in servers.iter().zip(&seen_before).enumerate() {
        for key in server.keys().into_iter().skip(*skip) {
            ensure!(n != 1, "{key} went to i1 after it left");
            after.insert(key, n);
        }
    }
    ensure!(after.len() == KEYS, "every key answered after the leave");
    let moved = keys
        .iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .count();
    let owned_by_leaver = before.values().filter(|o| **o == 1).count();
    ensure!(
        moved >= owned_by_leaver && moved * 2 <= KEYS,
        "{moved} of {KEYS} keys moved (i1 owned {owned_by_leaver}; the bound is 1.5/3)"
    );
    Ok(())
}

/// Sends `total` requests to `service` from 16 concurrent callers.
async fn load(agent: &AgentProcess, service: &str, total: usize) -> Result<()> {
    const CALLERS: usize = 16;
    let http = http();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let (http, url) = (
            http.clone(),
            format!("http://{}/v1/services/{service}/work", agent.ingress_addr()),
        );
        let n = total / CALLERS + usize::from(c < total % CALLERS);
        tasks.spawn(async move {
            for _ in 0..n {
                let response = http
                    .request(Request::post(&url).body(Full::new(Bytes::from_static(b"x")))?)
                    .await?;
                let status = response.status().as_u16();
                response.into_body().collect().await?;
                ensure!(status == 200, "{url}: {status}");
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

#[tokio::test]
async fn p2c_and_peak_ewma_send_a_slow_instance_little() -> Result<()> {
    let (_etcd, plane, client) = start_one("balance-slow").await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    const TOTAL: usize = 1500;
    for (service, lb, algorithm) in [
        (
            "p2c",
            LoadBalancer {
                algorithm: Algorithm::LeastRequest as i32,
                ..LoadBalancer::default()
            },
            "least_request",
        ),
        (
            "ewma",
            LoadBalancer {
                algorithm: Algorithm::PeakEwma as i32,
                ewma_decay_ms: 2000,
                ..LoadBalancer::default()
            },
            "peak_ewma",
        ),
    ] {
        // i0 answers 20 ms later than the others.
        let servers = [
            Instance::start(Duration::from_millis(20)).await?,
            Instance::start(Duration::ZERO).await?,
            Instance::start(Duration::ZERO).await?,
        ];
        register(&client, service, &servers, &[]).await?;
        agent
            .wait_for_endpoints("default", service, 3, SETTLE)
            .await?;
        set_balancer(&client, service, lb).await?;
        wait_for_algorithm(&agent, service, algorithm).await?;
        load(&agent, service, TOTAL).await?;
        let hits: Vec<usize> = servers.iter().map(Instance::hits).collect();
        eprintln!("{service}: slow i0 and fast i1, i2 got {hits:?}");
        ensure!(
            hits.iter().sum::<usize>() == TOTAL,
            "{service}: {hits:?} do not add up to {TOTAL}"
        );
        ensure!(
            hits[0] * 5 < TOTAL,
            "{service}: the slow instance got {} of {TOTAL} requests ({hits:?}), not under 20%",
            hits[0]
        );
        if service == "ewma" {
            let r = route(&agent, service).await?;
            let ewma: Vec<f64> = r["endpoints"]
                .as_array()
                .context("endpoints")?
                .iter()
                .map(|e| e["ewma_ms"].as_f64().context("ewma_ms on an EWMA route"))
                .collect::<Result<_>>()?;
            ensure!(ewma.len() == 3, "{r}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn zone_preference_stays_in_zone_until_it_runs_short() -> Result<()> {
    let (_etcd, plane, client) = start_one("balance-zone").await?;
    let servers = [
        Instance::start(Duration::ZERO).await?,
        Instance::start(Duration::ZERO).await?,
        Instance::start(Duration::ZERO).await?,
    ];
    register(&client, "orders", &servers, &["a", "a", "b"]).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &["--zone=a".into()])?;
    agent
        .wait_for_endpoints("default", "orders", 3, SETTLE)
        .await?;
    set_balancer(
        &client,
        "orders",
        LoadBalancer {
            algorithm: Algorithm::RoundRobin as i32,
            zone_preference: Some(ZonePreference {
                enabled: true,
                min_usable_percent: 60,
            }),
            ..LoadBalancer::default()
        },
    )
    .await?;
    poll_until(
        SETTLE,
        "orders kept in zone a",
        || route(&agent, "orders"),
        |r| r["in_zone"] == true,
    )
    .await?;
    let http = http();
    for _ in 0..300 {
        ensure!(call(&http, &agent, "orders", None).await? == 200);
    }
    let hits: Vec<usize> = servers.iter().map(Instance::hits).collect();
    ensure!(
        hits[2] == 0 && hits[0] > 100 && hits[1] > 100,
        "zone a holds 2 of 3 (67% >= 60%): {hits:?}"
    );

    // One of zone a's instances leaves: 1 of 2 (50%) is under 60%.
    deregister(&client, "orders", "i1").await?;
    agent
        .wait_for_endpoints("default", "orders", 2, SETTLE)
        .await?;
    poll_until(
        SETTLE,
        "orders spilling over to zone b",
        || route(&agent, "orders"),
        |r| r["in_zone"] == false,
    )
    .await?;
    let before: Vec<usize> = servers.iter().map(Instance::hits).collect();
    for _ in 0..300 {
        ensure!(call(&http, &agent, "orders", None).await? == 200);
    }
    let after: Vec<usize> = servers
        .iter()
        .zip(&before)
        .map(|(s, b)| s.hits() - b)
        .collect();
    ensure!(
        after[0] == 150 && after[2] == 150,
        "spilled over to both zones by round robin: {after:?}"
    );
    Ok(())
}
