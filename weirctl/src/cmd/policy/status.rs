//! `weirctl policy status SERVICE`: which agents run the current version
//! (in full or in part), which rejected it.

use anyhow::Result;
use serde_json::json;
use weir_client::{policy::AgentPolicyState, Client};

use crate::cmd::ServiceArg;
use crate::output::{ack_state, table, Format};

pub type Args = ServiceArg;

/// The state of one agent's report against the current version.
fn state(a: &AgentPolicyState, current_version: u64) -> String {
    if a.version == 0 {
        "pending".into()
    } else if a.version != current_version {
        "older version".into()
    } else {
        ack_state(a.accepted, &a.unenforced)
    }
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args;
    let s = client.policy_status(&namespace, &service).await?;
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "current_version": s.current_version,
                "connected_agents": s.connected_agents,
                "applied": s.applied, "partly": s.partly,
                "rejected": s.rejected, "pending": s.pending,
                "agents": s.agents.iter().map(|a| json!({
                    "node_id": a.node_id, "version": a.version,
                    "accepted": a.accepted, "unenforced": a.unenforced,
                    "error": a.error,
                })).collect::<Vec<_>>(),
            })
        ),
        Format::Table => {
            println!(
                "{namespace}/{service} version {}: {} of {} agents applied, {} partly, {} rejected, {} pending",
                s.current_version,
                s.applied,
                s.connected_agents,
                s.partly,
                s.rejected,
                s.pending
            );
            let rows: Vec<Vec<String>> = s
                .agents
                .iter()
                .map(|a| {
                    vec![
                        a.node_id.clone(),
                        if a.version == 0 {
                            "-".into()
                        } else {
                            a.version.to_string()
                        },
                        state(a, s.current_version),
                        a.error.clone(),
                    ]
                })
                .collect();
            print!("{}", table(&["NODE", "VERSION", "STATE", "ERROR"], &rows));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_against_the_current_version() {
        let a = |version, accepted, unenforced: &[&str]| AgentPolicyState {
            version,
            accepted,
            unenforced: unenforced.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentPolicyState::default()
        };
        assert_eq!(state(&a(0, false, &[]), 7), "pending");
        assert_eq!(state(&a(5, true, &[]), 7), "older version");
        assert_eq!(state(&a(7, true, &[]), 7), "applied");
        assert_eq!(
            state(&a(7, true, &["circuit_breaker"]), 7),
            "partly (circuit_breaker)"
        );
        assert_eq!(state(&a(7, false, &[]), 7), "rejected");
    }
}
