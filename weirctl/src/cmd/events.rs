//! `weirctl events`: the dead letters of topic deliveries, asked of the
//! agents over their sessions through the control plane (every connected
//! agent, or the one `--node` names): `dead-letters` lists them, `show ID`
//! shows one, `replay` delivers the matching ones again with their
//! original ids, `purge` removes them. And `publish TOPIC`, one event by
//! hand through a node's agent (its ingress, not the control plane).

use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use weir_client::{
    agent::{dead_letters_request::Action, DeadLetter, DeadLettersRequest},
    Client, CloudEvent, PublishError, TopicPublisher,
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
    /// Publish one event to a topic through a node's agent.
    Publish(Box<PublishArgs>),
}

/// One event to publish by hand.
#[derive(clap::Args, Debug, Clone)]
pub struct PublishArgs {
    /// The topic.
    #[arg(value_name = "TOPIC")]
    topic: String,
    /// The agent's ingress address (not the control plane's).
    #[arg(long, env = "WEIR_AGENT", default_value = "http://127.0.0.1:7080")]
    agent: String,
    /// The topic's namespace; default: the agent's.
    #[arg(long)]
    namespace: Option<String>,
    /// The CloudEvents type.
    #[arg(long = "type")]
    event_type: String,
    /// The CloudEvents source.
    #[arg(long, default_value = "/weirctl")]
    source: String,
    /// The CloudEvents id; default: a new one.
    #[arg(long)]
    id: Option<String>,
    /// The data, as text.
    #[arg(long)]
    data: Option<String>,
    /// The data's content type.
    #[arg(long, default_value = "application/json")]
    content_type: String,
    /// The CloudEvents subject.
    #[arg(long)]
    subject: Option<String>,
    /// The CloudEvents partitionkey (ordered delivery keys on it).
    #[arg(long)]
    partition_key: Option<String>,
}

/// The event `args` describe.
fn event_of(args: &PublishArgs) -> CloudEvent {
    use weir_client::cloudevents::cloud_event::{
        cloud_event_attribute_value::Attr, CloudEventAttributeValue, Data,
    };
    let text = |s: &str| CloudEventAttributeValue {
        attr: Some(Attr::CeString(s.to_owned())),
    };
    let mut attributes = std::collections::HashMap::new();
    let mut data = None;
    if let Some(d) = &args.data {
        attributes.insert("datacontenttype".to_owned(), text(&args.content_type));
        data = Some(Data::TextData(d.clone()));
    }
    if let Some(s) = &args.subject {
        attributes.insert("subject".to_owned(), text(s));
    }
    if let Some(k) = &args.partition_key {
        attributes.insert("partitionkey".to_owned(), text(k));
    }
    let id = args.id.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        format!("weirctl-{}-{}", now.as_micros(), std::process::id())
    });
    CloudEvent {
        id,
        source: args.source.clone(),
        spec_version: "1.0".into(),
        r#type: args.event_type.clone(),
        attributes,
        data,
    }
}

async fn publish(format: Format, args: &PublishArgs) -> Result<()> {
    let mut publisher = TopicPublisher::connect(args.agent.clone())
        .await
        .with_context(|| format!("cannot reach the agent at {}", args.agent))?;
    if let Some(ns) = &args.namespace {
        publisher = publisher.in_namespace(ns.clone());
    }
    let answer = match publisher.publish(args.topic.clone(), event_of(args)).await {
        Ok(a) => a,
        Err(PublishError::Refused(r)) => {
            let field = if r.field.is_empty() {
                String::new()
            } else {
                format!(" (field {})", r.field)
            };
            bail!(
                "the agent refused the event, {}: {}{field}",
                r.reason,
                r.message
            )
        }
        Err(e) => return Err(e.into()),
    };
    match format {
        Format::Json => println!(
            "{}",
            json!({
                "id": answer.id,
                "topic": args.topic,
                "subscribers": answer.subscribers,
                "durable": answer.durable,
            })
        ),
        Format::Table if answer.subscribers.is_empty() => println!(
            "published {} to {}: nobody subscribes, so the agent dropped it",
            answer.id, args.topic
        ),
        Format::Table => println!(
            "published {} to {}{}: reaches {}",
            answer.id,
            args.topic,
            if answer.durable { " (on disk)" } else { "" },
            answer.subscribers.join(", ")
        ),
    }
    Ok(())
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
        Command::Publish(args) => return publish(format, &args).await,
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
    let nodes = super::nodes(client, filter.node.as_ref()).await?;
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

    #[test]
    fn publish_makes_the_event_its_flags_describe() {
        use weir_client::cloudevents::cloud_event::{cloud_event_attribute_value::Attr, Data};
        let c = Cli::try_parse_from([
            "t",
            "publish",
            "orders",
            "--type",
            "com.example.t",
            "--id",
            "h-1",
            "--data",
            "{\"a\":1}",
            "--partition-key",
            "k1",
        ])
        .expect("parses");
        let Command::Publish(args) = c.command else {
            panic!("not publish: {:?}", c.command);
        };
        assert_eq!(args.topic, "orders");
        let e = event_of(&args);
        assert_eq!((e.id.as_str(), e.source.as_str()), ("h-1", "/weirctl"));
        assert_eq!(e.data, Some(Data::TextData("{\"a\":1}".into())));
        let attr = |name: &str| match &e.attributes[name].attr {
            Some(Attr::CeString(s)) => s.clone(),
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(attr("datacontenttype"), "application/json");
        assert_eq!(attr("partitionkey"), "k1");
        // Without an id, a new one each time.
        let c = Cli::try_parse_from(["t", "publish", "orders", "--type", "t"]).expect("parses");
        let Command::Publish(args) = c.command else {
            panic!("not publish");
        };
        assert!(event_of(&args).id.starts_with("weirctl-"));
        assert!(
            Cli::try_parse_from(["t", "publish", "orders"]).is_err(),
            "--type is required"
        );
    }
}
