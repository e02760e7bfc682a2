//! `weir-control-plane`: parses configuration, sets up logging and signals,
//! and runs a replica from the library.

use clap::Parser;
use weir_control_plane::{
    config::{Args, StoreConfig},
    Config, ControlPlane,
};
use weir_core::signal::shutdown_signal;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::resolve(Args::parse())?;
    weir_core::logging::init(config.log_format);
    match &config.store {
        StoreConfig::Embedded => {
            tracing::warn!("dev mode: embedded in-process store, single node, nothing persists")
        }
        StoreConfig::Etcd { endpoints } => {
            tracing::info!(endpoints = ?endpoints, prefix = %config.etcd_prefix, "using etcd")
        }
    }
    let plane = ControlPlane::start(config).await?;
    // One machine-readable line on stdout, for scripts and the test harness.
    println!(
        "weir-control-plane ready grpc={} http={} store={}",
        plane.grpc_addr(),
        plane.http_addr(),
        plane.store_kind()
    );
    plane.serve_until(shutdown_signal()).await?;
    Ok(())
}
