//! End-to-end harness for Weir: real etcd processes, real
//! `weir-control-plane` binaries and in-process replicas on loopback.
//!
//! etcd: when `WEIR_TEST_ETCD_ENDPOINTS` is set (CI and `scripts/test.sh`
//! start one etcd for the whole run) tests share it, each under its own key
//! prefix; otherwise each [`Etcd::start`] spawns a private `etcd` from PATH
//! on free loopback ports with a fresh data dir, killed on drop.

use std::{
    io::{BufRead, BufReader},
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};

pub mod agent;
pub mod agents;
pub mod bench;
pub mod fixtures;
pub mod load;
pub mod sample;

/// Environment variable naming a shared etcd for tests.
pub const ETCD_ENV: &str = "WEIR_TEST_ETCD_ENDPOINTS";

/// A free loopback port (bound, then released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A key prefix no other test uses.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "/weir-test-{tag}-{:012x}",
        rand::random::<u64>() & 0xffff_ffff_ffff
    )
}

/// Waits until `check` returns true, polling every 20 ms, failing after
/// `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return Ok(());
        }
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `probe` every 20 ms until what it returns satisfies `done`, and
/// returns that; fails after `deadline`, saying what it saw last (probe
/// errors included). A bounded wait for a condition, not a sleep.
pub async fn poll_until<T, F, Fut>(
    deadline: Duration,
    what: &str,
    mut probe: F,
    done: impl Fn(&T) -> bool,
) -> Result<T>
where
    T: std::fmt::Debug,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let start = Instant::now();
    loop {
        let seen = probe().await;
        match &seen {
            Ok(value) if done(value) => return seen,
            _ if start.elapsed() > deadline => {
                bail!("after {deadline:?}, {what}: last seen {seen:?}")
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// GETs `path` over plain HTTP/1.1 from `addr`: the whole response, status
/// line and headers included. Fails after 5 s without the full answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await??;
    Ok(out)
}

/// The status code [`http_get`] answers with.
pub async fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let out = http_get(addr, path).await?;
    out.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {out:?}"))
}

/// An etcd for a test: shared (from the environment) or private.
#[derive(Debug)]
pub struct Etcd {
    endpoints: Vec<String>,
    child: Option<Child>,
    _data: Option<tempfile::TempDir>,
}

/// Options for a private etcd.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// Extra flags, e.g. auto-compaction for benchmarks.
    pub extra_args: Vec<String>,
    /// Always spawn a private etcd, even when a shared one is configured.
    pub private: bool,
}

impl Etcd {
    /// The shared etcd if configured, else a private one.
    pub async fn start() -> Result<Self> {
        Self::start_with(EtcdOptions::default()).await
    }

    pub async fn start_with(options: EtcdOptions) -> Result<Self> {
        if !options.private {
            if let Ok(endpoints) = std::env::var(ETCD_ENV) {
                let endpoints: Vec<String> = endpoints.split(',').map(str::to_owned).collect();
                return Ok(Self {
                    endpoints,
                    child: None,
                    _data: None,
                });
            }
        }
        // Free ports are found by binding and releasing, so a parallel test
        // can take the same one first: then etcd exits, and we try again.
        let mut last_error = None;
        for _ in 0..3 {
            match Self::spawn_private(&options).await {
                Ok(etcd) => return Ok(etcd),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow!("etcd did not start")))
    }

    async fn spawn_private(options: &EtcdOptions) -> Result<Self> {
        let data = tempfile::tempdir()?;
        let client = free_port()?;
        let peer = free_port()?;
        let client_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let child = Command::new("etcd")
            .arg("--name=weir-test")
            .arg(format!("--data-dir={}", data.path().display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=weir-test={peer_url}"))
            .arg("--log-level=error")
            .args(&options.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context(
                "cannot start `etcd` (install etcd-server, or set WEIR_TEST_ETCD_ENDPOINTS)",
            )?;
        let mut etcd = Self {
            endpoints: vec![client_url],
            child: Some(child),
            _data: Some(data),
        };
        let start = Instant::now();
        // Generous: on a busy 2-core machine several tests start etcd at once.
        while start.elapsed() < Duration::from_secs(60) {
            if let Some(status) = etcd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("etcd exited at start ({status}); port taken?");
            }
            if etcd_answers(&etcd.endpoints).await {
                return Ok(etcd);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("etcd did not answer within 60 s")
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Process id of a private etcd (None for the shared one, which a test
    /// must never stop), e.g. to SIGSTOP it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A client of this etcd.
    pub async fn client(&self) -> Result<etcd_client::Client> {
        Ok(etcd_client::Client::connect(&self.endpoints, None).await?)
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn etcd_answers(endpoints: &[String]) -> bool {
    let attempt = async {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_timeout(Duration::from_secs(1));
        let mut c = etcd_client::Client::connect(endpoints, Some(options))
            .await
            .ok()?;
        c.status().await.ok()
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Path of a workspace binary built next to the running test.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .ok_or_else(|| anyhow!("unexpected test binary location {}", exe.display()))?;
    let path = dir.join(name);
    if !path.exists() {
        bail!(
            "{} not found: build the binaries first (`cargo build --bins`, which scripts/test.sh does)",
            path.display()
        );
    }
    Ok(path)
}

/// `FLAG=127.0.0.1:0` (a free loopback port) for each of `flags` that
/// `given` does not set, so a test can fix one port (to restart a process
/// on it) and leave the rest free.
pub fn free_ports_unless_given(command: &mut Command, given: &[String], flags: &[&str]) {
    for flag in flags {
        if !given.iter().any(|g| g.starts_with(flag)) {
            command.arg(format!("{flag}=127.0.0.1:0"));
        }
    }
}

/// SIGTERM to `child`, then waits for its exit status.
pub fn sigterm(child: &mut Child) -> Result<std::process::ExitStatus> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()?;
    if !status.success() {
        bail!("kill -TERM failed");
    }
    Ok(child.wait()?)
}

/// Starts `command` (stdout piped, stderr inherited, `RUST_LOG=warn`
/// unless set) and waits up to 30 s for the first line it prints, the
/// ready line Weir's binaries print once their listeners are bound. A
/// process that cannot start exits, which ends stdout.
pub fn spawn_ready(mut command: Command, what: &str) -> Result<(Child, String)> {
    let mut child = command
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        let _ = tx.send(first);
        // Keep draining so the process never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(Ok(line))) => Ok((child, line)),
        other => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not become ready: {other:?}");
        }
    }
}

/// The address after `name` (`grpc=`, `ingress=`) in a ready line.
pub fn ready_field(line: &str, name: &str) -> Result<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .ok_or_else(|| anyhow!("no {name} in ready line {line:?}"))?
        .parse()
        .with_context(|| format!("bad {name} in {line:?}"))
}

/// A `weir-control-plane` process.
#[derive(Debug)]
pub struct ControlPlaneProcess {
    child: Child,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl ControlPlaneProcess {
    /// Starts a replica on `etcd` under `prefix` with free ports and waits
    /// for its ready line.
    pub fn start(etcd: &Etcd, prefix: &str) -> Result<Self> {
        Self::start_args(&[
            format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
            format!("--etcd-prefix={prefix}"),
        ])
    }

    /// Starts a replica with these flags (listen addresses are added).
    pub fn start_args(args: &[String]) -> Result<Self> {
        Self::start_binary(&workspace_binary("weir-control-plane")?, args)
    }

    /// Starts this control-plane binary (e.g. another revision's, for a
    /// benchmark) with these flags (listen addresses are added).
    pub fn start_binary(binary: &std::path::Path, args: &[String]) -> Result<Self> {
        let mut command = Command::new(binary);
        command.args(args);
        free_ports_unless_given(&mut command, args, &["--grpc-addr", "--http-addr"]);
        let (child, line) = spawn_ready(command, "weir-control-plane")?;
        let grpc_addr = ready_field(&line, "grpc=")?;
        let http_addr = ready_field(&line, "http=")?;
        Ok(Self {
            child,
            grpc_addr,
            http_addr,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Process id, e.g. to read its CPU time from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `http://ip:port` of the gRPC listener.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// kill -9.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        sigterm(&mut self.child)
    }
}

impl Drop for ControlPlaneProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Installs a test log subscriber once (RUST_LOG decides; default warn).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Installs tracing, then starts (or joins) etcd and `N` control-plane
/// replicas sharing one new prefix tagged `tag`.
pub async fn start_replicas<const N: usize>(tag: &str) -> Result<(Etcd, [ControlPlaneProcess; N])> {
    init_tracing();
    let etcd = Etcd::start().await?;
    let prefix = unique_prefix(tag);
    let mut planes = Vec::with_capacity(N);
    for _ in 0..N {
        planes.push(ControlPlaneProcess::start(&etcd, &prefix)?);
    }
    let planes = planes
        .try_into()
        .map_err(|_| anyhow!("started a different number of replicas than {N}"))?;
    Ok((etcd, planes))
}

/// [`start_replicas`] with one replica, and a client of it.
pub async fn start_one(tag: &str) -> Result<(Etcd, ControlPlaneProcess, weir_client::Client)> {
    let (etcd, [plane]) = start_replicas(tag).await?;
    let client = weir_client::Client::connect([plane.endpoint()]).await?;
    Ok((etcd, plane, client))
}

/// Runs `weirctl --endpoint endpoint args...`.
pub async fn weirctl(endpoint: &str, args: &[&str]) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(workspace_binary("weirctl")?)
        .arg("--endpoint")
        .arg(endpoint)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await?)
}

/// [`weirctl`] that must succeed; returns its standard output.
pub async fn weirctl_ok(endpoint: &str, args: &[&str]) -> Result<String> {
    let out = weirctl(endpoint, args).await?;
    if !out.status.success() {
        bail!(
            "weirctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The instances of `default/service`.
pub async fn instances(
    client: &weir_client::Client,
    service: &str,
) -> Result<Vec<weir_client::Instance>> {
    Ok(client
        .get_service(weir_client::GetServiceRequest {
            namespace: "default".into(),
            service: service.into(),
            ..weir_client::GetServiceRequest::default()
        })
        .await?
        .service
        .map(|s| s.instances)
        .unwrap_or_default())
}

/// Feeds a [`weir_client::WatchView`] until `done` holds; fails after
/// `deadline`. Returns when it was seen.
pub async fn follow(
    view: &mut weir_client::WatchView,
    deadline: Duration,
    what: &str,
    mut done: impl FnMut(&weir_client::WatchView) -> bool,
) -> Result<Instant> {
    let end = tokio::time::Instant::now() + deadline;
    while !done(view) {
        match tokio::time::timeout_at(end, view.next()).await {
            Ok(update) => {
                update?;
            }
            Err(_) => bail!("timed out after {deadline:?} waiting for {what}"),
        }
    }
    Ok(Instant::now())
}

/// Feeds `view` (of the default namespace) until `deadline`, failing on
/// any removal of one of `ids` of `service`.
pub async fn never_removed(
    view: &mut weir_client::WatchView,
    service: &str,
    ids: &[&str],
    deadline: tokio::time::Instant,
) -> Result<()> {
    loop {
        match tokio::time::timeout_at(deadline, view.next()).await {
            Err(_) => return Ok(()),
            Ok(update) => {
                if let weir_client::WatchUpdate::Changes { events, .. } = update? {
                    for e in events {
                        let gone = e.r#type == weir_client::EventType::Delete as i32;
                        if let Some(i) =
                            e.instance.as_ref().filter(|i| gone && i.service == service)
                        {
                            if ids.contains(&i.instance_id.as_str()) {
                                bail!("{} was removed at revision {}", i.instance_id, e.revision);
                            }
                        }
                    }
                }
                for id in ids {
                    if view.get("default", service, id).is_none() {
                        bail!("{id} missing from the view at revision {}", view.revision());
                    }
                }
            }
        }
    }
}

/// The health status of an instance in a view of the default namespace.
pub fn status_in(
    view: &weir_client::WatchView,
    service: &str,
    id: &str,
) -> Option<weir_client::HealthStatus> {
    view.get("default", service, id).map(|i| {
        weir_client::HealthStatus::try_from(i.status).unwrap_or(weir_client::HealthStatus::Unknown)
    })
}

/// The reason of the last health decision on an instance in a view of the
/// default namespace (empty when there is none).
pub fn reason_in(view: &weir_client::WatchView, service: &str, id: &str) -> String {
    view.get("default", service, id)
        .and_then(|i| i.health.as_ref())
        .map(|h| h.reason.clone())
        .unwrap_or_default()
}
