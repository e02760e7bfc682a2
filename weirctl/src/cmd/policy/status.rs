//! `weirctl policy status SERVICE`: which agents run the current version,
//! which rejected it.

use anyhow::Result;
use serde_json::json;
use weir_client::Client;

use crate::cmd::ServiceArg;
use crate::output::{table, Format};

pub type Args = ServiceArg;

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args;
    let s = client.policy_status(&namespace, &service).await?;
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "current_version": s.current_version,
                "connected_agents": s.connected_agents,
                "applied": s.applied, "rejected": s.rejected, "pending": s.pending,
                "agents": s.agents.iter().map(|a| json!({
                    "node_id": a.node_id, "version": a.version,
                    "accepted": a.accepted, "error": a.error,
                })).collect::<Vec<_>>(),
            })
        ),
        Format::Table => {
            println!(
                "{namespace}/{service} version {}: {} of {} agents applied, {} rejected, {} pending",
                s.current_version, s.applied, s.connected_agents, s.rejected, s.pending
            );
            let rows: Vec<Vec<String>> = s
                .agents
                .iter()
                .map(|a| {
                    let state = if a.version == 0 {
                        "pending"
                    } else if a.version != s.current_version {
                        "older version"
                    } else if a.accepted {
                        "applied"
                    } else {
                        "rejected"
                    };
                    vec![
                        a.node_id.clone(),
                        if a.version == 0 {
                            "-".into()
                        } else {
                            a.version.to_string()
                        },
                        state.into(),
                        a.error.clone(),
                    ]
                })
                .collect();
            print!("{}", table(&["NODE", "VERSION", "STATE", "ERROR"], &rows));
        }
    }
    Ok(())
}
