//! `weirctl agents [list]`: every agent the control plane knows, connected
//! or not; `weirctl agents describe NODE`: ask one agent, over its
//! session, what it holds and runs.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use serde_json::{json, Value};
use weir_client::{
    agent::{applied_policy::Outcome, AgentDescription, AgentInfo, AppliedPolicy},
    Client,
};

use crate::output::{ack_state, ago, dash, table, utc, Format};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List agents, connected or not (what `weirctl agents` does).
    List,
    /// Ask an agent to describe itself, over its session.
    Describe(DescribeArgs),
}

#[derive(clap::Args, Debug)]
struct DescribeArgs {
    /// The agent's node id.
    node: String,
    /// How long to wait for the agent's reply, 1-60000 ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    match args.command.unwrap_or(Command::List) {
        Command::List => list(client, format).await,
        Command::Describe(args) => describe(client, format, args).await,
    }
}

fn outcome(p: &AppliedPolicy) -> String {
    ack_state(p.outcome() != Outcome::Rejected, &p.unenforced)
}

fn policy_json(p: &AppliedPolicy) -> Value {
    json!({
        "namespace": p.namespace,
        "service": p.service,
        "version": p.version,
        "outcome": outcome(p),
        "unenforced": p.unenforced,
        "error": p.error,
        "at_unix_ms": p.at_unix_ms,
    })
}

/// `default/orders@42`, with how it was taken unless applied in full.
fn policy_cell(p: &AppliedPolicy) -> String {
    let name = format!("{}/{}@{}", p.namespace, p.service, p.version);
    match p.outcome() {
        Outcome::Applied => name,
        _ => format!("{name} {}", outcome(p)),
    }
}

/// `connected`, or `disconnected since <UTC> (<ago>)`.
fn state(a: &AgentInfo) -> String {
    if a.connected {
        "connected".into()
    } else if a.disconnected_since_unix_ms > 0 {
        format!(
            "disconnected since {} ({})",
            utc(a.disconnected_since_unix_ms),
            ago(a.disconnected_since_unix_ms)
        )
    } else {
        "disconnected".into()
    }
}

fn agent_row(a: &AgentInfo) -> Vec<String> {
    let status = a.status.clone().unwrap_or_default();
    let policies: Vec<String> = a.policies.iter().map(policy_cell).collect();
    vec![
        a.node_id.clone(),
        dash(&a.zone),
        dash(&a.version),
        dash(&a.replica_id),
        state(a),
        if status.degraded {
            format!("yes: {}", status.reason)
        } else {
            "no".into()
        },
        format!("{}/{}", status.local_instances, status.endpoints),
        dash(&policies.join(", ")),
    ]
}

fn agent_json(a: &AgentInfo) -> Value {
    let status = a.status.clone().unwrap_or_default();
    json!({
        "node_id": a.node_id,
        "zone": a.zone,
        "version": a.version,
        "ingress_address": a.ingress_address,
        "replica_id": a.replica_id,
        "connected": a.connected,
        "degraded": status.degraded,
        "degraded_reason": status.reason,
        "local_instances": status.local_instances,
        "endpoints": status.endpoints,
        "last_seen_unix_ms": a.last_seen_unix_ms,
        "disconnected_since_unix_ms": a.disconnected_since_unix_ms,
        "policies": a.policies.iter().map(policy_json).collect::<Vec<_>>(),
    })
}

async fn list(client: &Client, format: Format) -> Result<()> {
    let all = client.list_all_agents().await?;
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "revision": all.revision,
                "agents": all.agents.iter().map(agent_json).collect::<Vec<_>>(),
            })
        ),
        Format::Table => {
            if all.agents.is_empty() {
                eprintln!("no agents");
                return Ok(());
            }
            let rows: Vec<_> = all.agents.iter().map(agent_row).collect();
            print!(
                "{}",
                table(
                    &[
                        "NODE",
                        "ZONE",
                        "VERSION",
                        "REPLICA",
                        "STATE",
                        "DEGRADED",
                        "LOCAL/ENDPOINTS",
                        "POLICIES",
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

fn description_json(node: &str, replica: &str, d: &AgentDescription) -> Value {
    json!({
        "node_id": node,
        "replica_id": replica,
        "version": d.version,
        "degraded": d.degraded,
        "degraded_reason": d.degraded_reason,
        "services": d.services,
        "endpoints": d.endpoints,
        "local_instances": d.local_instances,
        "registry_revision": d.registry_revision,
        "policy_revision": d.policy_revision,
        "policies": d.policies.iter().map(policy_json).collect::<Vec<_>>(),
    })
}

fn description_text(node: &str, replica: &str, d: &AgentDescription) -> String {
    let degraded = if d.degraded {
        format!("yes: {}", d.degraded_reason)
    } else {
        "no".into()
    };
    let mut out = format!(
        "node {node} (stream on replica {replica})\n\
         version:            {}\n\
         degraded:           {degraded}\n\
         services:           {}\n\
         endpoints:          {}\n\
         local instances:    {}\n\
         registry revision:  {}\n\
         policy revision:    {}\n",
        dash(&d.version),
        d.services,
        d.endpoints,
        d.local_instances,
        d.registry_revision,
        d.policy_revision
    );
    if !d.policies.is_empty() {
        let rows: Vec<Vec<String>> = d
            .policies
            .iter()
            .map(|p| {
                vec![
                    p.namespace.clone(),
                    p.service.clone(),
                    p.version.to_string(),
                    outcome(p),
                    dash(&p.error),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&table(
            &["NAMESPACE", "SERVICE", "VERSION", "STATE", "ERROR"],
            &rows,
        ));
    }
    out
}

async fn describe(client: &Client, format: Format, args: DescribeArgs) -> Result<()> {
    let (d, replica) = client
        .describe_agent(&args.node, Duration::from_millis(args.timeout_ms))
        .await?;
    match format {
        Format::Json => println!("{}", description_json(&args.node, &replica, &d)),
        Format::Table => print!("{}", description_text(&args.node, &replica, &d)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use weir_client::agent::AgentStatus;

    use super::*;

    fn policy(service: &str, outcome: Outcome, unenforced: &[&str]) -> AppliedPolicy {
        AppliedPolicy {
            namespace: "default".into(),
            service: service.into(),
            version: 42,
            outcome: outcome as i32,
            unenforced: unenforced.iter().map(|s| (*s).to_owned()).collect(),
            ..AppliedPolicy::default()
        }
    }

    #[test]
    fn a_row_says_how_each_policy_was_taken_and_since_when_it_is_gone() {
        let a = AgentInfo {
            node_id: "node-1".into(),
            zone: "a".into(),
            replica_id: "cp-1".into(),
            connected: false,
            disconnected_since_unix_ms: 1_714_564_803_000,
            status: Some(AgentStatus {
                degraded: true,
                reason: "no control plane".into(),
                local_instances: 2,
                endpoints: 9,
            }),
            policies: vec![
                policy("orders", Outcome::Applied, &[]),
                policy("pay", Outcome::Partly, &["rate_limit"]),
                policy("cart", Outcome::Rejected, &[]),
            ],
            ..AgentInfo::default()
        };
        let row = agent_row(&a);
        assert_eq!(row[0], "node-1");
        assert_eq!(row[2], "-", "no version given");
        assert!(
            row[4].starts_with("disconnected since 2024-05-01T12:00:03Z ("),
            "{}",
            row[4]
        );
        assert_eq!(row[5], "yes: no control plane");
        assert_eq!(row[6], "2/9");
        assert_eq!(
            row[7],
            "default/orders@42, default/pay@42 partly (rate_limit), default/cart@42 rejected"
        );
        let j = agent_json(&a);
        assert_eq!(j["policies"][1]["outcome"], "partly (rate_limit)");
        assert_eq!(j["degraded"], true);
        assert_eq!(
            state(&AgentInfo {
                connected: true,
                ..AgentInfo::default()
            }),
            "connected"
        );
    }
}
