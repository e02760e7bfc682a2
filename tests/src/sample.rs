//! A `weir-sample` process (`src/bin/weir-sample.rs`) for end-to-end tests:
//! a sample service that registers itself, answers events and counts
//! them, and optionally emits CloudEvents through an agent.

use std::{
    net::SocketAddr,
    process::{Child, Command, ExitStatus},
    time::Duration,
};

use anyhow::{bail, Context, Result};

use crate::{http_get, ready_field, spawn_ready, workspace_binary};

/// A running `weir-sample` (killed when dropped).
#[derive(Debug)]
pub struct SampleProcess {
    child: Child,
    instance: String,
    addr: SocketAddr,
}

impl SampleProcess {
    /// Starts instance `instance` of `service`, registered at `registry`,
    /// on a free loopback port, with `extra` flags; returns once it is
    /// serving and registered (its ready line).
    pub fn start(registry: &str, service: &str, instance: &str, extra: &[String]) -> Result<Self> {
        let mut command = Command::new(workspace_binary("weir-sample")?);
        command
            .arg(format!("--service={service}"))
            .arg(format!("--instance-id={instance}"))
            .arg(format!("--registry={registry}"))
            .arg("--port=0")
            .args(extra);
        let (child, line) = spawn_ready(command, "weir-sample")?;
        if !line.contains(&format!("instance={instance} ")) {
            bail!("unexpected ready line {line:?}");
        }
        Ok(Self {
            instance: instance.to_owned(),
            addr: ready_field(&line, "addr=")?,
            child,
        })
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /stats`, parsed.
    pub async fn stats(&self) -> Result<serde_json::Value> {
        let raw = http_get(self.addr, "/stats").await?;
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        serde_json::from_str(body).with_context(|| format!("/stats answered {raw:?}"))
    }

    /// Waits up to `deadline` for the process to exit on its own.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<ExitStatus> {
        let end = tokio::time::Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if tokio::time::Instant::now() >= end {
                bail!("{} still running after {deadline:?}", self.instance);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL (kill -9): the process gets no chance to close anything;
    /// the kernel resets its connections and refuses new ones.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        crate::sigterm(&mut self.child)
    }
}

impl Drop for SampleProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
