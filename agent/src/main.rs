//! `weir-agent`: parses configuration, sets up logging and signals, and
//! runs the agent from the library.

use clap::Parser;
use weir_agent::{config::Args, Agent, Config};
use weir_core::signal::shutdown_signal;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::resolve(Args::parse())?;
    weir_core::logging::init(config.log_format);
    let agent = Agent::start(config).await?;
    // One machine-readable line on stdout, for scripts and the test harness.
    println!(
        "weir-agent ready ingress={} admin={} registry={}",
        agent.ingress_addr(),
        agent.admin_addr(),
        agent.registry_addr()
    );
    agent.serve_until(shutdown_signal()).await?;
    Ok(())
}
