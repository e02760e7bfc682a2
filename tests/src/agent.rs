//! A `weir-agent` process for end-to-end tests and benchmarks.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::Duration,
};

use anyhow::{bail, Result};

use crate::{
    free_ports_unless_given, http_get, poll_until, ready_field, spawn_ready, workspace_binary,
};

/// A running `weir-agent` (killed when dropped).
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    ingress_addr: SocketAddr,
    admin_addr: SocketAddr,
    registry_addr: SocketAddr,
}

impl AgentProcess {
    /// Starts this checkout's agent for node `node` on the control planes
    /// `endpoints`, on free loopback ports unless `extra` gives an address
    /// (a fixed `--registry-addr`, say).
    pub fn start(endpoints: &[String], node: &str, extra: &[String]) -> Result<Self> {
        Self::start_binary(&workspace_binary("weir-agent")?, endpoints, node, extra)
    }

    pub fn start_binary(
        binary: &Path,
        endpoints: &[String],
        node: &str,
        extra: &[String],
    ) -> Result<Self> {
        let mut command = Command::new(binary);
        command
            .arg(format!("--node-id={node}"))
            .arg(format!("--control-plane={}", endpoints.join(",")));
        free_ports_unless_given(
            &mut command,
            extra,
            &["--ingress-addr", "--admin-addr", "--registry-addr"],
        );
        command.args(extra);
        let (child, line) = spawn_ready(command, "weir-agent")?;
        Ok(Self {
            ingress_addr: ready_field(&line, "ingress=")?,
            admin_addr: ready_field(&line, "admin=")?,
            registry_addr: ready_field(&line, "registry=")?,
            child,
        })
    }

    pub fn ingress_addr(&self) -> SocketAddr {
        self.ingress_addr
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn registry_addr(&self) -> SocketAddr {
        self.registry_addr
    }

    /// `http://ip:port` of the local registry, for `weir-client`.
    pub fn registry_endpoint(&self) -> String {
        format!("http://{}", self.registry_addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /v1/state` of the admin API, parsed.
    pub async fn state(&self) -> Result<serde_json::Value> {
        let raw = http_get(self.admin_addr, "/v1/state").await?;
        let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok(serde_json::from_str(body)?)
    }

    /// The endpoint ids the agent routes `namespace/service` to.
    pub async fn endpoints(&self, namespace: &str, service: &str) -> Result<Vec<String>> {
        let state = self.state().await?;
        let routes = state["routes"].as_array().cloned().unwrap_or_default();
        Ok(routes
            .iter()
            .filter(|r| r["namespace"] == namespace && r["service"] == service)
            .flat_map(|r| r["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until the agent routes `namespace/service` to `count`
    /// endpoints; fails after `deadline`.
    pub async fn wait_for_endpoints(
        &self,
        namespace: &str,
        service: &str,
        count: usize,
        deadline: Duration,
    ) -> Result<()> {
        poll_until(
            deadline,
            &format!("the agent routing {namespace}/{service} to {count} endpoints"),
            || self.endpoints(namespace, service),
            |seen| seen.len() == count,
        )
        .await
        .map(drop)
    }

    /// SIGSTOP: the process is frozen (its sockets stay open) until
    /// [`AgentProcess::resume`].
    pub fn pause(&self) -> Result<()> {
        self.signal("-STOP")
    }

    /// SIGCONT after [`AgentProcess::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal("-CONT")
    }

    fn signal(&self, which: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(which)
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            bail!("kill {which} failed");
        }
        Ok(())
    }

    /// kill -9.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        crate::sigterm(&mut self.child)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
