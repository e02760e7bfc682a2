//! `weirctl policy ...`: traffic policies from YAML or JSON files.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;
use weir_client::{policy::PolicyVersion, policy::TrafficPolicy, Client, Error};

use crate::{output::table, Format};

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Show a service's current policy (YAML; -o json for JSON).
    Get {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Create or replace a policy from a YAML or JSON file.
    Set {
        /// The policy file (`-` reads stdin).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Write only if the current version is this one (0 = only if none
        /// exists). Without it the write is unconditional.
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Remove a service's policy.
    Delete {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// List policies with their versions.
    List {
        /// Namespace; empty lists every namespace.
        #[arg(long, short = 'n', default_value = "")]
        namespace: String,
    },
    /// The kept versions of a policy, newest first.
    History {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
    /// Make an earlier version current again (as a new version).
    Rollback {
        service: String,
        /// The version to restore (see `history`).
        version: u64,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Which agents run the current version, which rejected it.
    Status {
        service: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
}

fn to_json(p: &TrafficPolicy) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(p)?)
}

fn version_json(v: &PolicyVersion) -> Result<serde_json::Value> {
    Ok(json!({
        "version": v.version,
        "updated_at_unix_ms": v.updated_at_unix_ms,
        "restored_from": v.restored_from,
        "policy": v.policy.as_ref().map(to_json).transpose()?,
    }))
}

/// Parses a policy file (YAML, of which JSON is a subset).
pub fn parse(text: &str) -> Result<TrafficPolicy> {
    serde_yaml::from_str::<TrafficPolicy>(text).map_err(|e| match e.location() {
        Some(at) => anyhow::anyhow!("line {}, column {}: {e}", at.line(), at.column()),
        None => anyhow::anyhow!("{e}"),
    })
}

/// The line (0-based) of `field` (a path like `policy.rules[1].retry.attempts`)
/// in a YAML document, found by walking its keys and list items by
/// indentation. Best effort: None when the path cannot be followed.
pub fn locate(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut from = 0usize;
    let mut min_indent = 0usize;
    let mut found = None;
    for segment in field.split('.').skip(1) {
        let (name, index) = match segment.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (segment, None),
        };
        let camel = to_camel(name);
        let key_line = (from..lines.len()).find(|&i| {
            let t = lines[i].trim_start().trim_start_matches("- ");
            indent(lines[i]) >= min_indent
                && (t.starts_with(&format!("{name}:")) || t.starts_with(&format!("{camel}:")))
        })?;
        found = Some(key_line);
        from = key_line + 1;
        min_indent = indent(lines[key_line]) + 1;
        if let Some(k) = index {
            // The k-th "- " item below the key.
            let items: Vec<usize> = (from..lines.len())
                .take_while(|&i| lines[i].trim().is_empty() || indent(lines[i]) >= min_indent - 1)
                .filter(|&i| lines[i].trim_start().starts_with("- "))
                .collect();
            let item = *items.get(k)?;
            found = Some(item);
            from = item;
            min_indent = indent(lines[item]);
        }
    }
    found
}

fn to_camel(s: &str) -> String {
    let mut out = String::new();
    let mut up = false;
    for c in s.chars() {
        if c == '_' {
            up = true;
        } else if up {
            out.extend(c.to_uppercase());
            up = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The file with the error written next to the offending line.
pub fn annotate(text: &str, field: &str, message: &str) -> Option<String> {
    let at = locate(text, field)?;
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        out.push_str(line);
        if i == at {
            out.push_str(&format!("    # <-- {message}"));
        }
        out.push('\n');
    }
    Some(out)
}

pub async fn run(client: &Client, format: Format, command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Get { service, namespace } => {
            let v = client.get_policy(&namespace, &service).await?;
            match format {
                Format::Json => println!("{}", version_json(&v)?),
                Format::Table => {
                    println!("# {namespace}/{service} version {}", v.version);
                    if let Some(p) = &v.policy {
                        print!("{}", serde_yaml::to_string(&to_json(p)?)?);
                    }
                }
            }
        }
        PolicyCommand::Set {
            file,
            expect_version,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let policy =
                parse(&text).with_context(|| format!("{} is not a policy", file.display()))?;
            match client.put_policy(policy, expect_version).await {
                Ok(v) => match format {
                    Format::Json => println!("{}", version_json(&v)?),
                    Format::Table => {
                        let p = v.policy.unwrap_or_default();
                        println!("{}/{} is at version {}", p.namespace, p.service, v.version);
                    }
                },
                Err(Error::InvalidArgument(message)) => {
                    if let Some((field, rule)) = message.split_once(": ") {
                        if let Some(shown) = annotate(&text, field, rule) {
                            eprint!("{shown}");
                        }
                    }
                    bail!("{} was rejected: {message}", file.display());
                }
                Err(e) => return Err(e.into()),
            }
        }
        PolicyCommand::Delete {
            service,
            namespace,
            expect_version,
        } => {
            let r = client
                .delete_policy(&namespace, &service, expect_version)
                .await?;
            if !r.existed {
                bail!("{namespace}/{service} has no policy");
            }
            println!(
                "deleted the policy of {namespace}/{service} at revision {}",
                r.revision
            );
        }
        PolicyCommand::List { namespace } => {
            let r = client.list_policies(&namespace).await?;
            match format {
                Format::Json => {
                    let list: Result<Vec<_>> = r.policies.iter().map(version_json).collect();
                    println!("{}", json!({"revision": r.revision, "policies": list?}));
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = r
                        .policies
                        .iter()
                        .map(|v| {
                            let p = v.policy.clone().unwrap_or_default();
                            vec![
                                p.namespace,
                                p.service,
                                v.version.to_string(),
                                p.rules.len().to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(&["NAMESPACE", "SERVICE", "VERSION", "RULES"], &rows)
                    );
                }
            }
        }
        PolicyCommand::History { service, namespace } => {
            let versions = client.policy_history(&namespace, &service).await?;
            match format {
                Format::Json => {
                    let list: Result<Vec<_>> = versions.iter().map(version_json).collect();
                    println!("{}", json!({"versions": list?}));
                }
                Format::Table => {
                    let rows: Vec<Vec<String>> = versions
                        .iter()
                        .enumerate()
                        .map(|(k, v)| {
                            vec![
                                v.version.to_string(),
                                if k == 0 {
                                    "current".into()
                                } else {
                                    String::new()
                                },
                                if v.restored_from > 0 {
                                    format!("rollback to {}", v.restored_from)
                                } else {
                                    String::new()
                                },
                            ]
                        })
                        .collect();
                    print!("{}", table(&["VERSION", "", "NOTE"], &rows));
                }
            }
        }
        PolicyCommand::Rollback {
            service,
            version,
            namespace,
            expect_version,
        } => {
            let v = client
                .rollback_policy(&namespace, &service, version, expect_version)
                .await?;
            println!(
                "{namespace}/{service}: version {version} restored as version {}",
                v.version
            );
        }
        PolicyCommand::Status { service, namespace } => {
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
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "namespace: default
service: orders
retry:
  attempts: 3
rules:
  - name: fast
    match:
      typePrefix: com.shop.
    retry:
      attempts: 99
  - name: slow
    timeout:
      total_ms: 10
";

    #[test]
    fn yaml_parses_with_enum_names_and_either_field_case() {
        let p = parse(
            "service: orders\nloadBalancer:\n  algorithm: LEAST_REQUEST\nrate_limit:\n  requests_per_second: 50\n  on_excess: QUEUE\n",
        )
        .expect("parses");
        assert_eq!(p.service, "orders");
        assert_eq!(p.load_balancer.expect("lb").algorithm, 3);
        assert_eq!(p.rate_limit.expect("rl").on_excess, 2);
        let e = parse("service: orders\nretry:\n  attempts: lots\n").expect_err("bad");
        assert!(e.to_string().contains("line 3"), "{e}");
    }

    #[test]
    fn errors_are_shown_next_to_their_field() {
        assert_eq!(locate(DOC, "policy.retry.attempts"), Some(3));
        assert_eq!(locate(DOC, "policy.rules[0].retry.attempts"), Some(9));
        assert_eq!(locate(DOC, "policy.rules[1].timeout.total_ms"), Some(12));
        assert_eq!(locate(DOC, "policy.rules[0].match.type_prefix"), Some(7));
        let shown = annotate(DOC, "policy.rules[0].retry.attempts", "must be 1-10").expect("found");
        assert!(
            shown.contains("attempts: 99    # <-- must be 1-10"),
            "{shown}"
        );
        assert_eq!(locate(DOC, "policy.circuit_breaker.open_ms"), None);
    }
}
