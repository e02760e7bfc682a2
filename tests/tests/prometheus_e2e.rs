//! Debian's `prometheus` scrapes a real agent and a real control plane:
//! a PromQL query returns exactly the requests sent, from the agent's own
//! series and from the control plane's cluster aggregate (a distinct
//! name, so a sum over both jobs never counts twice).
//!
//! Needs the `prometheus` binary (`scripts/test.sh` installs it).

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::{body::Bytes, Request};
use weir_tests::{agent::AgentProcess, fixtures::http_instances, poll_until, start_one};

/// The first sample is queryable ~6 s after start, even at 1 s scrapes.
const SCRAPED: Duration = Duration::from_secs(60);

/// A prometheus process, killed on drop.
struct Prometheus {
    child: Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes each (job, host:port) every second.
    fn start(targets: &[(&str, std::net::SocketAddr)]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, addr) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "prometheus must be installed (apt-get install prometheus; scripts/test.sh does)",
            )?;
        Ok(Self {
            child,
            addr,
            _dir: dir,
        })
    }

    /// The value of an instant query returning one sample, if any.
    async fn scalar(&self, query: &str) -> Result<Option<f64>> {
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let request = Request::get(format!("http://{}/api/v1/query?query={encoded}", self.addr))
            .body(Full::new(Bytes::new()))?;
        let Ok(response) = http.request(request).await else {
            return Ok(None);
        };
        let body = response.into_body().collect().await?.to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        let value = json["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|v| v.parse().ok());
        Ok(value)
    }
}

#[tokio::test]
async fn prometheus_counts_exactly_the_requests_sent() -> Result<()> {
    let (_etcd, plane, client) = start_one("prometheus").await?;
    let _orders = http_instances(&client, "orders", "o", 2).await?;
    let agent = AgentProcess::start(&[plane.endpoint()], "node-1", &[])?;
    agent
        .wait_for_endpoints("default", "orders", 2, Duration::from_secs(15))
        .await?;
    let prometheus = Prometheus::start(&[
        ("agents", agent.admin_addr()),
        ("control_plane", plane.http_addr()),
    ])?;
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    const N: u64 = 57;
    for n in 0..N {
        let request = Request::post(format!(
            "http://{}/v1/services/orders/",
            agent.ingress_addr()
        ))
        .header("weir-source", "web")
        .header("ce-specversion", "1.0")
        .header("ce-id", format!("e{n}"))
        .header("ce-source", "/tests/prometheus")
        .header("ce-type", "com.shop.order.created")
        .body(Full::new(Bytes::from_static(b"{}")))?;
        let response = http.request(request).await?;
        ensure!(response.status() == 200, "{}", response.status());
        let _ = response.into_body().collect().await;
    }
    let agents = "sum(weir_agent_request_duration_seconds_count{job=\"agents\",service=\"orders\",source=\"default/web\"})";
    let got = poll_until(
        SCRAPED,
        "prometheus has the agent's count",
        || prometheus.scalar(agents),
        |v| *v == Some(N as f64),
    )
    .await?;
    ensure!(got == Some(N as f64), "{got:?}");
    // The control plane's aggregate of what agents reported: the same
    // count, under its own name.
    let cluster =
        "sum(weir_cluster_requests_total{job=\"control_plane\",service=\"orders\",outcome=\"ok\"})";
    poll_until(
        SCRAPED,
        "prometheus has the cluster count",
        || prometheus.scalar(cluster),
        |v| *v == Some(N as f64),
    )
    .await?;
    // The control plane's own metrics are there too.
    poll_until(
        SCRAPED,
        "the registry size",
        || prometheus.scalar("weir_control_plane_registry_instances{job=\"control_plane\"}"),
        |v| *v == Some(2.0),
    )
    .await?;
    Ok(())
}
