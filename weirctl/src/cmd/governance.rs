//! `weirctl governance [SERVICE]`: what the agents' circuit breakers and
//! rate limits are doing, asked of every connected agent (or the one
//! `--node` names) through the control plane: the breakers that are open
//! or half open (every one with `--all`), and every rate limit bucket
//! with its decisions so far.

use std::time::Duration;

use anyhow::{bail, Result};
use serde_json::{json, Value};
use weir_client::{
    agent::{BreakerInfo, GovernanceRequest, LimitInfo},
    Client,
};

use crate::output::{table, Format};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Only this service (default: every one).
    service: Option<String>,
    /// Only this namespace (default: every one).
    #[arg(long, short = 'n')]
    namespace: Option<String>,
    /// Ask only this node's agent.
    #[arg(long)]
    node: Option<String>,
    /// Show closed breakers too.
    #[arg(long)]
    all: bool,
    /// How long to wait for each agent's reply, 1-60000 ms.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let nodes = super::nodes(client, args.node.as_ref()).await?;
    let request = GovernanceRequest {
        namespace: args.namespace.clone().unwrap_or_default(),
        service: args.service.clone().unwrap_or_default(),
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut breakers: Vec<(String, BreakerInfo)> = Vec::new();
    let mut limits: Vec<(String, LimitInfo)> = Vec::new();
    let mut failed = Vec::new();
    for node in &nodes {
        match client.governance(node, request.clone(), timeout).await {
            Ok(reply) => {
                breakers.extend(
                    reply
                        .breakers
                        .into_iter()
                        .filter(|b| args.all || b.state != "closed")
                        .map(|b| (node.clone(), b)),
                );
                limits.extend(reply.limits.into_iter().map(|l| (node.clone(), l)));
            }
            Err(e) => failed.push(format!("{node}: {e}")),
        }
    }
    for f in &failed {
        eprintln!("warning: {f}");
    }
    if !failed.is_empty() && failed.len() == nodes.len() {
        bail!("no agent answered");
    }
    match format {
        Format::Json => {
            let breakers: Vec<Value> = breakers.iter().map(|(n, b)| breaker_json(n, b)).collect();
            let limits: Vec<Value> = limits.iter().map(|(n, l)| limit_json(n, l)).collect();
            println!("{}", json!({ "breakers": breakers, "limits": limits }));
        }
        Format::Table => {
            if breakers.is_empty() {
                println!("no circuit breaker open");
            } else {
                let rows: Vec<Vec<String>> =
                    breakers.iter().map(|(n, b)| breaker_row(n, b)).collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NODE", "SERVICE", "INSTANCE", "ADDRESS", "BREAKER", "SINCE", "OPENS",
                            "WHY"
                        ],
                        &rows
                    )
                );
            }
            println!();
            if limits.is_empty() {
                println!("no rate limit");
            } else {
                let rows: Vec<Vec<String>> = limits.iter().map(|(n, l)| limit_row(n, l)).collect();
                print!(
                    "{}",
                    table(
                        &[
                            "NODE",
                            "SERVICE",
                            "RULE",
                            "LIMIT",
                            "ON EXCESS",
                            "TOKENS",
                            "ADMITTED",
                            "QUEUED",
                            "REJECTED"
                        ],
                        &rows
                    )
                );
            }
        }
    }
    Ok(())
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s ago", ms as f64 / 1000.0)
}

fn breaker_row(node: &str, b: &BreakerInfo) -> Vec<String> {
    let mut state = b.state.clone();
    if b.shadow {
        state.push_str(" (shadow)");
    } else if b.capped {
        state.push_str(" (capped, in rotation)");
    }
    let service = match b.rule.as_str() {
        "" | "default" => format!("{}/{}", b.namespace, b.service),
        rule => format!("{}/{} (rule {rule})", b.namespace, b.service),
    };
    vec![
        node.to_owned(),
        service,
        b.instance_id.clone(),
        b.address.clone(),
        state,
        seconds(b.since_ms),
        b.opens.to_string(),
        b.why.clone(),
    ]
}

fn limit_row(node: &str, l: &LimitInfo) -> Vec<String> {
    let mut limit = format!("{}/s burst {}", l.requests_per_second, l.burst);
    if l.scope == "global" {
        match l.share_source.as_str() {
            "" => limit.push_str(" global (no share yet)"),
            source => limit.push_str(&format!(
                " global (share {:.1}/s, {source})",
                l.share_requests_per_second
            )),
        }
    }
    let rejected = if l.shadow {
        format!("{} (shadow)", l.shadow_rejected)
    } else {
        l.rejected.to_string()
    };
    vec![
        node.to_owned(),
        format!("{}/{}", l.namespace, l.service),
        l.rule.clone(),
        limit,
        l.on_excess.clone(),
        format!("{:.1}", l.tokens),
        l.admitted.to_string(),
        l.queued.to_string(),
        rejected,
    ]
}

fn breaker_json(node: &str, b: &BreakerInfo) -> Value {
    json!({
        "node": node,
        "namespace": b.namespace,
        "service": b.service,
        "instance_id": b.instance_id,
        "address": b.address,
        "state": b.state,
        "since_ms": b.since_ms,
        "why": b.why,
        "capped": b.capped,
        "opens": b.opens,
        "shadow": b.shadow,
        "rule": b.rule,
    })
}

fn limit_json(node: &str, l: &LimitInfo) -> Value {
    json!({
        "node": node,
        "namespace": l.namespace,
        "service": l.service,
        "rule": l.rule,
        "requests_per_second": l.requests_per_second,
        "burst": l.burst,
        "scope": l.scope,
        "on_excess": l.on_excess,
        "shadow": l.shadow,
        "tokens": l.tokens,
        "admitted": l.admitted,
        "queued": l.queued,
        "rejected": l.rejected,
        "shadow_rejected": l.shadow_rejected,
        "share_requests_per_second": l.share_requests_per_second,
        "share_source": l.share_source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_say_when_a_breaker_stays_in_rotation_and_what_a_shadow_limit_would_refuse() {
        let b = BreakerInfo {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "o1".into(),
            state: "open".into(),
            since_ms: 1_500,
            capped: true,
            ..BreakerInfo::default()
        };
        let row = breaker_row("node-1", &b);
        assert_eq!(row[4], "open (capped, in rotation)");
        assert_eq!(row[5], "1.5s ago");
        let l = LimitInfo {
            requests_per_second: 100.0,
            burst: 10,
            shadow: true,
            shadow_rejected: 7,
            rejected: 0,
            ..LimitInfo::default()
        };
        let row = limit_row("node-1", &l);
        assert_eq!(row[3], "100/s burst 10");
        assert_eq!(row[8], "7 (shadow)");
    }
}
