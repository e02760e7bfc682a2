//! `weirctl policy set -f FILE`: create or replace a policy from a YAML or
//! JSON file. A file the control plane rejects is shown back with the
//! rule written next to each offending field.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use weir_client::{policy::TrafficPolicy, Client, Error, FieldViolation};

use super::version_json;
use crate::{output::Format, rejection};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The policy file (`-` reads stdin).
    #[arg(long, short = 'f')]
    file: PathBuf,
    /// Write only if the current version is this one (0 = only if none
    /// exists). Without it the write is unconditional.
    #[arg(long)]
    expect_version: Option<u64>,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let Args {
        file,
        expect_version,
    } = args;
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
    };
    let policy = parse(&text).with_context(|| format!("{} is not a policy", file.display()))?;
    match client.put_policy(policy, expect_version).await {
        Ok(v) => match format {
            Format::Json => println!("{}", version_json(&v)?),
            Format::Table => {
                let p = v.policy.unwrap_or_default();
                println!("{}/{} is at version {}", p.namespace, p.service, v.version);
            }
        },
        Err(e @ Error::InvalidArgument { .. }) => {
            let (shown, error) = rejected(&file, &text, &e);
            if let Some(shown) = shown {
                eprint!("{shown}");
            }
            return Err(error);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// What weirctl says of a file the control plane rejected: the file
/// annotated at each field named in the rejection's details (None when it
/// has none, or none of them is found in the file), and the error. The
/// message text is shown as it is, never taken apart.
fn rejected(file: &Path, text: &str, e: &Error) -> (Option<String>, anyhow::Error) {
    let violations = e.field_violations();
    let why = match e {
        Error::InvalidArgument { message, .. } if violations.is_empty() => message.clone(),
        _ if violations.is_empty() => e.to_string(),
        _ => rejection::fields(violations),
    };
    (
        annotate(text, violations),
        anyhow!("{} was rejected: {why}", file.display()),
    )
}

/// Parses a policy file (YAML, of which JSON is a subset).
pub fn parse(text: &str) -> Result<TrafficPolicy> {
    serde_yaml::from_str::<TrafficPolicy>(text).map_err(|e| match e.location() {
        Some(at) => anyhow!("line {}, column {}: {e}", at.line(), at.column()),
        None => anyhow!("{e}"),
    })
}

/// The line (0-based) of `field` (a path like `policy.rules[1].retry.attempts`,
/// the `policy.` optional) in a YAML document, found by walking its keys
/// and list items by indentation. Best effort: None when the path cannot
/// be followed.
pub fn locate(text: &str, field: &str) -> Option<usize> {
    let path = field.strip_prefix("policy.").unwrap_or(field);
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut from = 0usize;
    let mut min_indent = 0usize;
    let mut found = None;
    for segment in path.split('.') {
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

/// The file with each violation's rule written next to its field's line;
/// None when no field is found in it.
pub fn annotate(text: &str, violations: &[FieldViolation]) -> Option<String> {
    let mut notes: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for v in violations {
        if let Some(at) = locate(text, &v.field) {
            notes.entry(at).or_default().push(&v.description);
        }
    }
    if notes.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (i, line) in text.lines().enumerate() {
        out.push_str(line);
        if let Some(rules) = notes.get(&i) {
            out.push_str("    # <-- ");
            out.push_str(&rules.join("; "));
        }
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};
    use tonic_types::{ErrorDetails, StatusExt as _};

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

    fn violation(field: &str, description: &str) -> FieldViolation {
        FieldViolation {
            field: field.into(),
            description: description.into(),
        }
    }

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
        assert_eq!(locate(DOC, "rules[0].retry.attempts"), Some(9));
        let shown = annotate(
            DOC,
            &[violation("policy.rules[0].retry.attempts", "must be 1-10")],
        )
        .expect("found");
        assert!(
            shown.contains("attempts: 99    # <-- must be 1-10"),
            "{shown}"
        );
        assert_eq!(locate(DOC, "policy.circuit_breaker.open_ms"), None);
        assert_eq!(
            annotate(DOC, &[violation("policy.circuit_breaker.open_ms", "x")]),
            None
        );
    }

    #[test]
    fn a_rejected_file_is_annotated_from_the_bad_request_details() {
        // The message names no field: the annotation can only come from
        // the details.
        let e = Error::from(Status::with_error_details(
            Code::InvalidArgument,
            "the policy is invalid",
            ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new(
                    "policy.rules[0].retry.attempts",
                    "must be 1-10 (got 99)",
                ),
                tonic_types::FieldViolation::new("policy.retry.attempts", "must be 1-10 (got 3)"),
            ]),
        ));
        let (shown, error) = rejected(Path::new("pay.yaml"), DOC, &e);
        let shown = shown.expect("annotated");
        assert!(
            shown.contains("\n      attempts: 99    # <-- must be 1-10 (got 99)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("\n  attempts: 3    # <-- must be 1-10 (got 3)\n"),
            "{shown}"
        );
        assert_eq!(shown.matches("# <--").count(), 2, "{shown}");
        assert_eq!(
            error.to_string(),
            "pay.yaml was rejected: policy.rules[0].retry.attempts: must be 1-10 (got 99); \
             policy.retry.attempts: must be 1-10 (got 3)"
        );
    }

    #[test]
    fn without_details_the_plain_message_is_shown() {
        let e = Error::from(Status::invalid_argument(
            "policy.rules[0].retry.attempts: must be 1-10",
        ));
        let (shown, error) = rejected(Path::new("pay.yaml"), DOC, &e);
        assert_eq!(shown, None, "the message is not taken apart");
        assert_eq!(
            error.to_string(),
            "pay.yaml was rejected: policy.rules[0].retry.attempts: must be 1-10"
        );
    }
}
