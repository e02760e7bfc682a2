//! `weirctl events`: the dead letters of topic deliveries, asked of the
//! agents over their sessions through the control plane (every connected
//! agent, or the one `--node` names): `dead-letters` lists them, `show ID`
//! shows one, `replay` delivers the matching ones again with their
//! original ids, `purge` removes them.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use weir_client::{
    agent::{dead_letters_request::Action, DeadLetter, DeadLettersRequest},
    Client,
};

use crate::output::{table, utc, Format};

#[derive(Subcommand, Debug)]
pub enum Command {
    /// List dead letters.
    DeadLetters(Filter),
    /// Show one dead letter (by CloudEvents id).
    Show {
        /// The event's id.
        #[arg(value_name = "ID")]
        event_id: String,
        #[command(flatten)]
        filter: Filter,
    },
    /// Deliver the matching dead letters again, with their original ids.
    Replay(Filter),
    /// Remove the matching dead letters.
    Purge(Filter),
}

/// Which dead letters, and where to ask.
#[derive(clap::Args, Debug, Clone)]
pub struct Filter {
    /// Only this agent's (node id); default: every connected agent.
    #[arg(long)]
    node: Option<String>,
    /// The subscribing service the delivery failed to reach.
    #[arg(long)]
    service: Option<String>,
    #[arg(long)]
    topic: Option<String>,
    /// The CloudEvents type.
    #[arg(long = "type")]
    event_type: Option<String>,
    /// The CloudEvents id.
    #[arg(long)]
    id: Option<String>,
    /// How long to wait for each agent's reply, 1-60000 ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub async fn run(client: &Client, format: Format, command: Command) -> Result<()> {
    let (action, filter) = match command {
        Command::DeadLetters(f) => (Action::List, f),
        Command::Show {
            event_id,
            mut filter,
        } => {
            filter.id = Some(event_id);
            (Action::List, filter)
        }
        Command::Replay(f) => (Action::Replay, f),
        Command::Purge(f) => (Action::Purge, f),
    };
    let nodes = match &filter.node {
        Some(node) => vec![node.clone()],
        None => client
            .list_all_agents()
            .await?
            .agents
            .into_iter()
            .filter(|a| a.connected)
            .map(|a| a.node_id)
            .collect(),
    };
    let request = DeadLettersRequest {
        action: action as i32,
        service: filter.service.clone().unwrap_or_default(),
        topic: filter.topic.clone().unwrap_or_default(),
        r#type: filter.event_type.clone().unwrap_or_default(),
        id: filter.id.clone().unwrap_or_default(),
    };
    let timeout = Duration::from_millis(filter.timeout_ms);
    let mut found: Vec<(String, DeadLetter)> = Vec::new();
    let mut failed = Vec::new();
    for node in &nodes {
        match client.dead_letters(node, request.clone(), timeout).await {
            Ok(letters) => found.extend(letters.into_iter().map(|d| (node.clone(), d))),
            Err(e) => failed.push(format!("{node}: {e}")),
        }
    }
    for f in &failed {
        eprintln!("warning: {f}");
    }
    if !failed.is_empty() && failed.len() == nodes.len() {
        bail!("no agent answered");
    }
    let verb = match action {
        Action::Replay => Some("replayed"),
        Action::Purge => Some("purged"),
        _ => None,
    };
    match format {
        Format::Json => {
            let letters: Vec<Value> = found.iter().map(|(n, d)| letter_json(n, d)).collect();
            match verb {
                Some(v) => println!("{}", json!({ v: letters.len(), "letters": letters })),
                None => println!("{}", json!({ "letters": letters })),
            }
        }
        Format::Table => {
            if let Some(v) = verb {
                println!("{v} {} dead letter(s)", found.len());
            }
            if found.is_empty() {
                eprintln!("no dead letters match");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = found
                .iter()
                .map(|(node, d)| {
                    vec![
                        node.clone(),
                        format!("{}/{}", d.namespace, d.service),
                        d.topic.clone(),
                        d.id.clone(),
                        d.r#type.clone(),
                        d.attempts.to_string(),
                        utc(d.dead_unix_ms),
                        d.reason.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NODE",
                        "SERVICE",
                        "TOPIC",
                        "ID",
                        "TYPE",
                        "ATTEMPTS",
                        "DEAD SINCE",
                        "REASON"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

fn letter_json(node: &str, d: &DeadLetter) -> Value {
    json!({
        "node": node,
        "namespace": d.namespace,
        "service": d.service,
        "topic": d.topic,
        "id": d.id,
        "type": d.r#type,
        "source": d.source,
        "attempts": d.attempts,
        "reason": d.reason,
        "dead_unix_ms": d.dead_unix_ms,
        "accepted_unix_ms": d.accepted_unix_ms,
        "seq": d.seq,
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }

    #[test]
    fn the_commands_parse_with_their_filters() {
        let c = Cli::try_parse_from(["t", "show", "e-1", "--node", "n1"]).expect("parses");
        assert!(
            matches!(c.command, Command::Show { ref event_id, ref filter }
            if event_id == "e-1" && filter.node.as_deref() == Some("n1"))
        );
        let c = Cli::try_parse_from(["t", "replay", "--service", "billing", "--type", "t"])
            .expect("parses");
        assert!(matches!(c.command, Command::Replay(ref f)
            if f.service.as_deref() == Some("billing") && f.event_type.as_deref() == Some("t")));
        assert!(
            Cli::try_parse_from(["t", "show"]).is_err(),
            "ID is required"
        );
    }
}
