//! `weirctl`: Weir from the command line.
//!
//! ```text
//! weirctl register orders --host 10.0.0.7 --port 8080 --keep-alive
//! weirctl list
//! weirctl get orders -o json
//! weirctl watch orders
//! weirctl deregister orders orders-1a2b3c4d5e6f
//! weirctl agents
//! weirctl agents describe node-1
//! weirctl governance orders
//! weirctl traces --service orders --outcome error --since 15m
//! weirctl traces show 4bf92f3577b34da6a3ce929d0e0e4736
//! weirctl topology --window 15m
//! weirctl stats orders
//! ```
//!
//! One module per command under `cmd/` (its clap `Args` and its `run`);
//! tables and JSON in `output`; duration flags and latencies in
//! `duration`; how a rejected request is shown in `rejection`.

mod cmd;
mod duration;
mod output;
mod rejection;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weir_client::{Client, DEFAULT_ENDPOINT};

use cmd::{
    agents, deregister, events, get, governance, health, list, policy, register, service_config,
    stats, topology, traces, watch,
};
use output::Format;

#[derive(Parser, Debug)]
#[command(name = "weirctl", version, about = "Operate a Weir control plane")]
struct Cli {
    /// Control-plane gRPC address(es); several (comma-separated or
    /// repeated) give failover between replicas.
    #[arg(
        long,
        short = 'e',
        global = true,
        env = "WEIR_ENDPOINT",
        value_delimiter = ',',
        default_value = DEFAULT_ENDPOINT
    )]
    endpoint: Vec<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register an instance (persistent unless --ttl or --keep-alive).
    Register(Box<register::Args>),
    /// Remove an instance.
    Deregister(deregister::Args),
    /// List services with their instance counts.
    List(list::Args),
    /// Show a service's instances.
    Get(get::Args),
    /// Traffic policies: get, set -f, delete, list, history, rollback, status.
    #[command(subcommand)]
    Policy(policy::Command),
    /// Health of a service's instances, with their recent transitions.
    Health(health::Args),
    /// Show a service's settings, or change them.
    ServiceConfig(service_config::Args),
    /// Follow changes live (a snapshot first, then every change).
    Watch(watch::Args),
    /// Agents, connected or not; `agents describe NODE` asks one.
    Agents(agents::Args),
    /// Dead letters of topic deliveries, asked of the agents: list, show,
    /// replay, purge; and publish an event by hand through an agent.
    #[command(subcommand)]
    Events(events::Command),
    /// What the agents' circuit breakers and rate limits are doing now.
    Governance(governance::Args),
    /// Recent traces, newest first; `traces show TRACE_ID` draws one as a
    /// tree of spans with their timings.
    Traces(traces::Args),
    /// Who talks to whom: edges between services and topics with rate,
    /// errors and p99.
    Topology(topology::Args),
    /// Traffic per service and per edge: outcomes, error ratio, latency
    /// percentiles.
    Stats(stats::Args),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", rejection::error_line(&e));
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::connect(&cli.endpoint).await?;
    let format = cli.output;
    match cli.command {
        Command::Register(args) => register::run(&client, format, *args).await,
        Command::Deregister(args) => deregister::run(&client, format, args).await,
        Command::List(args) => list::run(&client, format, args).await,
        Command::Get(args) => get::run(&client, format, args).await,
        Command::Policy(command) => policy::run(&client, format, command).await,
        Command::Health(args) => health::run(&client, format, args).await,
        Command::ServiceConfig(args) => service_config::run(&client, format, args).await,
        Command::Watch(args) => watch::run(&client, format, args).await,
        Command::Agents(args) => agents::run(&client, format, args).await,
        Command::Events(command) => events::run(&client, format, command).await,
        Command::Governance(args) => governance::run(&client, format, args).await,
        Command::Traces(args) => traces::run(&client, format, args).await,
        Command::Topology(args) => topology::run(&client, format, args).await,
        Command::Stats(args) => stats::run(&client, format, args).await,
    }
}
