//! Peer servers a benchmark starts on loopback (nginx upstreams, HAProxy,
//! NATS), and the small tools around them: free ports chosen together, a
//! guard that stops a server, a wait for a port.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};

/// A process stopped when dropped: SIGTERM, then SIGKILL if it is still
/// there after 5 s. Not SIGKILL first: nginx's master stops its workers
/// on SIGTERM, and killed outright it leaves them running on their ports.
#[derive(Debug)]
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        // Not yet reaped, so the pid is still this process's.
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(self.0.id().to_string())
                .status();
            let end = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < end {
                if !matches!(self.0.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `N` distinct free loopback ports. The listeners are held until all
/// are chosen: a port given back at once can be handed out again, and two
/// servers would then race for it (one of them silently gone).
pub fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let mut held = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        *port = listener.local_addr()?.port();
        held.push(listener);
    }
    Ok(ports)
}

/// Fails if a server this benchmark started has exited.
pub fn alive(guard: &mut Guard, what: &str) -> Result<()> {
    if let Some(status) = guard.0.try_wait()? {
        bail!("{what} exited ({status}); its port may be taken");
    }
    Ok(())
}

pub fn need(tool: &str) -> Result<()> {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()?
        .success();
    ensure!(
        found,
        "{tool} not found: apt-get install nginx haproxy wrk nghttp2-client"
    );
    Ok(())
}

pub async fn wait_port(port: u16, what: &str) -> Result<()> {
    let end = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if tokio::time::Instant::now() > end {
            bail!("{what} did not listen on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

pub fn nginx(dir: &Path, name: &str, port: u16) -> Result<Guard> {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1; pid {d}/{name}.pid; error_log {d}/{name}.err warn; daemon off;\n\
         events {{ worker_connections 4096; }}\n\
         http {{ access_log off; client_body_temp_path {d}/{name}-body; proxy_temp_path {d}/{name}-proxy;\n\
           fastcgi_temp_path {d}/{name}-fcgi; uwsgi_temp_path {d}/{name}-uwsgi; scgi_temp_path {d}/{name}-scgi;\n\
           keepalive_requests 1000000;\n\
           server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n"
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-c")
        .arg(&path)
        .arg("-p")
        .arg(dir)
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start nginx")?;
    Ok(Guard(child))
}

/// Writes `post1k.lua` into `dir`: the wrk script [`wrk`] sends (a 1 KiB
/// POST).
pub fn write_post_script(dir: &Path) -> Result<()> {
    std::fs::write(
        dir.join("post1k.lua"),
        "wrk.method = \"POST\"\nwrk.body = string.rep(\"x\", 1024)\nwrk.headers[\"Content-Type\"] = \"application/octet-stream\"\n",
    )?;
    Ok(())
}

/// `wrk -t1 -c16` POSTing 1 KiB to `url` for `secs` (the script from
/// [`write_post_script`] in `dir`): requests per second and requests
/// made. Any answer but 2xx, or a socket error, fails it.
pub fn wrk(dir: &Path, url: &str, secs: u64) -> Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{secs}s"), "-s"])
        .arg(dir.join("post1k.lua"))
        .arg(url)
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output: {text}"))?;
    let requests = text
        .lines()
        .find_map(|l| {
            l.trim()
                .split_once(" requests in ")
                .map(|(n, _)| n.to_owned())
        })
        .and_then(|n| n.trim().parse::<f64>().ok())
        .with_context(|| format!("no request count in wrk output: {text}"))?;
    let errors = text.contains("Non-2xx") || text.contains("Socket errors");
    ensure!(!errors, "wrk saw errors on {url}: {text}");
    Ok((rate, requests))
}

/// CPU seconds `pid` used so far (NaN without one).
pub fn cpu_secs(pid: Option<u32>) -> f64 {
    pid.and_then(super::cpu_ticks)
        .map_or(f64::NAN, |t| t as f64 / super::clock_ticks())
}
