//! `weirctl`: Weir from the command line.
//!
//! ```text
//! weirctl register orders --host 10.0.0.7 --port 8080 --keep-alive
//! weirctl list
//! weirctl get orders -o json
//! weirctl watch orders
//! weirctl deregister orders orders-1a2b3c4d5e6f
//! ```

mod output;
mod policy;

use std::{collections::HashMap, io::Write, process::ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use weir_client::{
    health_check, Client, GetHealthRequest, GetServiceConfigRequest, GetServiceRequest, GrpcCheck,
    HealthCheck, HttpCheck, Instance, InstanceRef, ListServicesRequest, Protocol,
    RegistrationState, ServiceConfig, SetServiceConfigRequest, TcpCheck, TtlCheck, WatchUpdate,
    DEFAULT_ENDPOINT,
};

use output::*;

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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register an instance (persistent unless --ttl or --keep-alive).
    Register(Box<RegisterArgs>),
    /// Remove an instance.
    Deregister {
        service: String,
        instance_id: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// List services with their instance counts.
    List {
        /// Namespace; empty lists every namespace.
        #[arg(long, short = 'n', default_value = "")]
        namespace: String,
        /// Only services whose name starts with this.
        #[arg(long)]
        prefix: Option<String>,
        /// Only services with an instance carrying this metadata (k=v).
        #[arg(long = "meta", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
    },
    /// Show a service's instances.
    Get {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Only instances that are passing.
        #[arg(long)]
        healthy: bool,
    },
    /// Traffic policies: get, set -f, delete, list, history, rollback, status.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Health of a service's instances, with their recent transitions.
    Health {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Show a service's settings, or change them.
    ServiceConfig {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Protection threshold in percent (0 disables; "default" unsets).
        #[arg(long)]
        protection_threshold: Option<String>,
    },
    /// Follow changes live (a snapshot first, then every change).
    Watch {
        /// Service to watch; all services of the namespace when absent.
        service: Option<String>,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Resume after this revision instead of starting with a snapshot.
        #[arg(long)]
        from: Option<u64>,
        /// Exit after this many updates (snapshot, changes or progress).
        #[arg(long)]
        count: Option<u64>,
    },
}

#[derive(clap::Args, Debug)]
struct RegisterArgs {
    service: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
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
    #[arg(long = "meta", value_parser = parse_pair)]
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ProtocolArg {
    Http,
    Grpc,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
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
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let client = Client::connect(&cli.endpoint).await?;
    let format = cli.output;
    match cli.command {
        Command::Register(args) => register(&client, format, *args).await,
        Command::Deregister {
            service,
            instance_id,
            namespace,
        } => {
            let r = InstanceRef {
                namespace,
                service,
                instance_id,
            };
            let resp = client.deregister(&r).await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({"existed": resp.existed, "revision": resp.revision})
                ),
                Format::Table if resp.existed => println!(
                    "deregistered {}/{}/{} at revision {}",
                    r.namespace, r.service, r.instance_id, resp.revision
                ),
                Format::Table => bail!(
                    "{}/{}/{} is not registered",
                    r.namespace,
                    r.service,
                    r.instance_id
                ),
            }
            Ok(())
        }
        Command::List {
            namespace,
            prefix,
            metadata,
        } => {
            let resp = client
                .list_all_services(ListServicesRequest {
                    namespace,
                    name_prefix: prefix.unwrap_or_default(),
                    metadata: metadata.into_iter().collect::<HashMap<_, _>>(),
                    summary_only: true,
                    ..ListServicesRequest::default()
                })
                .await?;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({
                        "revision": resp.revision,
                        "services": resp.summaries.iter().map(summary_json).collect::<Vec<_>>(),
                    })
                ),
                Format::Table => {
                    let rows: Vec<_> = resp.summaries.iter().map(summary_row).collect();
                    print!("{}", table(&SUMMARY_HEADER, &rows));
                }
            }
            Ok(())
        }
        Command::Get {
            service,
            namespace,
            healthy,
        } => {
            let resp = client
                .get_service(GetServiceRequest {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    healthy_only: healthy,
                    ..GetServiceRequest::default()
                })
                .await?;
            let instances = resp.service.map(|s| s.instances).unwrap_or_default();
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({
                        "namespace": namespace,
                        "service": service,
                        "revision": resp.revision,
                        "instances": instances.iter().map(instance_json).collect::<Vec<_>>(),
                    })
                ),
                Format::Table => {
                    if instances.is_empty() {
                        eprintln!("{namespace}/{service} has no instances");
                    } else {
                        let rows: Vec<_> = instances.iter().map(instance_row).collect();
                        print!("{}", table(&INSTANCE_HEADER, &rows));
                    }
                }
            }
            Ok(())
        }
        Command::Watch {
            service,
            namespace,
            from,
            count,
        } => watch(&client, format, namespace, service, from, count).await,
        Command::Policy(command) => policy::run(&client, format, command).await,
        Command::Health { service, namespace } => {
            let resp = client
                .get_health(GetHealthRequest {
                    namespace: namespace.clone(),
                    service: service.clone(),
                    ..GetHealthRequest::default()
                })
                .await?;
            match format {
                Format::Json => println!("{}", health_json(&resp)),
                Format::Table => print!("{}", health_table(&namespace, &service, &resp)),
            }
            Ok(())
        }
        Command::ServiceConfig {
            service,
            namespace,
            protection_threshold,
        } => {
            if let Some(t) = protection_threshold {
                let threshold = if t == "default" {
                    None
                } else {
                    Some(t.parse::<u32>().with_context(|| {
                        format!("--protection-threshold must be 0-100 or \"default\" (got {t:?})")
                    })?)
                };
                client
                    .set_service_config(SetServiceConfigRequest {
                        namespace: namespace.clone(),
                        service: service.clone(),
                        config: Some(ServiceConfig {
                            protection_threshold_percent: threshold,
                        }),
                    })
                    .await?;
            }
            let resp = client
                .get_service_config(GetServiceConfigRequest {
                    namespace: namespace.clone(),
                    service: service.clone(),
                })
                .await?;
            let own = resp.config.and_then(|c| c.protection_threshold_percent);
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::json!({"namespace": namespace, "service": service,
                        "protection_threshold_percent": own,
                        "effective_protection_threshold_percent": resp.effective_protection_threshold_percent})
                ),
                Format::Table => println!(
                    "{namespace}/{service}: protection threshold {}%{}",
                    resp.effective_protection_threshold_percent,
                    if own.is_some() { "" } else { " (default)" }
                ),
            }
            Ok(())
        }
    }
}

async fn register(client: &Client, format: Format, args: RegisterArgs) -> Result<()> {
    let ttl = match (args.ttl, args.keep_alive) {
        (Some(t), _) => Some(t),
        (None, true) => Some(10),
        (None, false) => None,
    };
    let instance = Instance {
        namespace: args.namespace,
        service: args.service,
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
    };
    if !args.keep_alive {
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

async fn watch(
    client: &Client,
    format: Format,
    namespace: String,
    service: Option<String>,
    from: Option<u64>,
    count: Option<u64>,
) -> Result<()> {
    let mut view = client.watch_view(&namespace, service.as_deref().unwrap_or(""));
    if let Some(r) = from {
        view = view.resume_from(r);
    }
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    while count.is_none_or(|c| seen < c) {
        let update = tokio::select! {
            _ = shutdown_signal() => return Ok(()),
            u = view.next() => u?,
        };
        seen += 1;
        match (&update, format) {
            (
                WatchUpdate::Snapshot {
                    revision,
                    resync_reason,
                    protection,
                },
                Format::Json,
            ) => {
                let instances: Vec<_> = view.instances().map(instance_json).collect();
                let protection: Vec<_> = protection.iter().map(protection_json).collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "snapshot", "revision": revision,
                        "resync_reason": resync_reason, "instances": instances,
                        "protection": protection})
                )?;
            }
            (
                WatchUpdate::Snapshot {
                    revision,
                    resync_reason,
                    protection,
                },
                Format::Table,
            ) => {
                match resync_reason {
                    Some(why) => {
                        writeln!(out, "# snapshot at revision {revision} (resync: {why})")?
                    }
                    None => writeln!(out, "# snapshot at revision {revision}")?,
                }
                for i in view.instances() {
                    let e = weir_client::Event {
                        r#type: weir_client::EventType::Put as i32,
                        instance: Some(i.clone()),
                        revision: i.revision,
                    };
                    writeln!(out, "{}", event_line(&e))?;
                }
                for p in protection {
                    writeln!(out, "{}", protection_line(*revision, p))?;
                }
            }
            (
                WatchUpdate::Changes {
                    events, protection, ..
                },
                Format::Json,
            ) => {
                for e in events {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"kind": "change", "event": event_json(e)})
                    )?;
                }
                for p in protection {
                    writeln!(
                        out,
                        "{}",
                        serde_json::json!({"kind": "protection", "protection": protection_json(p)})
                    )?;
                }
            }
            (
                WatchUpdate::Changes {
                    revision,
                    events,
                    protection,
                },
                Format::Table,
            ) => {
                for e in events {
                    writeln!(out, "{}", event_line(e))?;
                }
                for p in protection {
                    writeln!(out, "{}", protection_line(*revision, p))?;
                }
            }
            (WatchUpdate::Progress { revision }, Format::Json) => {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "progress", "revision": revision})
                )?;
            }
            (WatchUpdate::Progress { .. }, Format::Table) => {}
        }
        out.flush()?;
    }
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
