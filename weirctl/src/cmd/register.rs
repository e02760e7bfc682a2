//! `weirctl register SERVICE --host H --port P`: register an instance, and
//! with `--keep-alive` keep it registered until interrupted.

use std::io::Write as _;

use anyhow::{Context, Result};
use clap::ValueEnum;
use weir_client::{
    health_check, Client, GrpcCheck, HealthCheck, HttpCheck, Instance, Protocol, RegistrationState,
    TcpCheck, TtlCheck,
};
use weir_core::signal::shutdown_signal;

use super::ServiceArg;
use crate::output::{instance_json, instance_row, table, Format, INSTANCE_HEADER};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    /// Instance id; generated when absent (and printed).
    #[arg(long)]
    id: Option<String>,
    #[arg(long)]
    host: String,
    #[arg(long)]
    port: u16,
    #[arg(long, value_enum, default_value_t = ProtocolArg::Http)]
    protocol: ProtocolArg,
    /// Relative weight, 1-10000 (default 100).
    #[arg(long)]
    weight: Option<u32>,
    #[arg(long)]
    version: Option<String>,
    #[arg(long)]
    zone: Option<String>,
    /// Metadata entry k=v; repeat for more.
    #[arg(long = "meta", value_parser = super::parse_pair)]
    metadata: Vec<(String, String)>,
    /// Subscribed topic; repeat for more.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Make the instance ephemeral with this lease TTL in seconds.
    #[arg(long)]
    ttl: Option<u32>,
    /// Stay running and keep the (ephemeral) registration alive until
    /// interrupted, then deregister.
    #[arg(long)]
    keep_alive: bool,
    /// Active health check: http[:/path], tcp, grpc[:service] or ttl.
    #[arg(long, value_parser = parse_check)]
    check: Option<health_check::Kind>,
    /// Check interval, ms (default 1000).
    #[arg(long)]
    check_interval_ms: Option<u32>,
    /// Check timeout, ms (default min(interval, 1000)).
    #[arg(long)]
    check_timeout_ms: Option<u32>,
    /// Failed checks (within a window) before CRITICAL (default 2).
    #[arg(long)]
    check_failures: Option<u32>,
    /// Passing checks in a row before PASSING again (default 2).
    #[arg(long)]
    check_successes: Option<u32>,
    /// Deregister a persistent instance CRITICAL this long, seconds.
    #[arg(long)]
    deregister_critical_after: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Http,
    Grpc,
}

fn parse_check(s: &str) -> Result<health_check::Kind, String> {
    let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
    Ok(match kind {
        "http" => health_check::Kind::Http(HttpCheck {
            path: arg.to_owned(),
            ..HttpCheck::default()
        }),
        "tcp" if arg.is_empty() => health_check::Kind::Tcp(TcpCheck {}),
        "grpc" => health_check::Kind::Grpc(GrpcCheck {
            service: arg.to_owned(),
        }),
        "ttl" if arg.is_empty() => health_check::Kind::Ttl(TtlCheck {}),
        _ => {
            return Err(format!(
                "expected http[:/path], tcp, grpc[:service] or ttl, got {s:?}"
            ))
        }
    })
}

/// The instance the arguments describe.
fn instance(args: Args) -> Instance {
    let ttl = match (args.ttl, args.keep_alive) {
        (Some(t), _) => Some(t),
        (None, true) => Some(10),
        (None, false) => None,
    };
    Instance {
        namespace: args.target.namespace,
        service: args.target.service,
        instance_id: args.id.unwrap_or_default(),
        host: args.host,
        port: u32::from(args.port),
        protocol: match args.protocol {
            ProtocolArg::Http => Protocol::Http,
            ProtocolArg::Grpc => Protocol::Grpc,
        } as i32,
        weight: args.weight.unwrap_or(0),
        version: args.version.unwrap_or_default(),
        zone: args.zone.unwrap_or_default(),
        metadata: args.metadata.into_iter().collect(),
        ephemeral: ttl.is_some(),
        ttl_seconds: ttl.unwrap_or(0),
        topics: args.topics,
        health_check: args.check.map(|kind| HealthCheck {
            kind: Some(kind),
            interval_ms: args.check_interval_ms.unwrap_or(0),
            timeout_ms: args.check_timeout_ms.unwrap_or(0),
            failures_before_critical: args.check_failures.unwrap_or(0),
            successes_before_passing: args.check_successes.unwrap_or(0),
            deregister_critical_after_seconds: args.deregister_critical_after.unwrap_or(0),
            port: 0,
        }),
        ..Instance::default()
    }
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let keep_alive = args.keep_alive;
    let instance = instance(args);
    if !keep_alive {
        let resp = client.register(instance).await?;
        let stored = resp.instance.context("no instance in the answer")?;
        print_registered(format, &stored)?;
        if stored.ephemeral {
            eprintln!(
                "note: ephemeral, expires in {}s without heartbeats (use --keep-alive to keep it)",
                resp.ttl_seconds
            );
        }
        return Ok(());
    }
    let registration = client.register_and_keep_alive(instance).await?;
    if let RegistrationState::Alive { instance, .. } = registration.state() {
        print_registered(format, &instance)?;
    }
    eprintln!("keeping the registration alive; Ctrl-C or SIGTERM deregisters it");
    let mut states = registration.subscribe();
    let mut was_alive = true;
    loop {
        tokio::select! {
            _ = shutdown_signal() => break,
            changed = states.changed() => {
                if changed.is_err() { break; }
                let state = states.borrow_and_update().clone();
                match state {
                    RegistrationState::Retrying { attempt, error, lease_lost } => {
                        eprintln!("renewal failed (attempt {attempt}{}): {error}", if lease_lost { ", registering again" } else { "" });
                        was_alive = false;
                    }
                    RegistrationState::Alive { ttl, reregistrations, .. } if !was_alive => {
                        eprintln!("registration alive again (ttl {}s, re-registered {reregistrations} times)", ttl.as_secs());
                        was_alive = true;
                    }
                    _ => {}
                }
            }
        }
    }
    let r = registration.instance().clone();
    let existed = registration.deregister().await?;
    eprintln!(
        "deregistered {}/{}/{}{}",
        r.namespace,
        r.service,
        r.instance_id,
        if existed {
            ""
        } else {
            " (it was already gone)"
        }
    );
    Ok(())
}

fn print_registered(format: Format, i: &Instance) -> Result<()> {
    match format {
        Format::Json => println!("{}", instance_json(i)),
        Format::Table => print!("{}", table(&INSTANCE_HEADER, &[instance_row(i)])),
    }
    std::io::stdout().flush().context("writing to stdout")
}
