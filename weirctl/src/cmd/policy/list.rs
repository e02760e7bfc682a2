//! `weirctl policy list`: policies with their versions.

use anyhow::Result;
use serde_json::json;
use weir_client::Client;

use super::version_json;
use crate::output::{table, Format};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Namespace; empty lists every namespace.
    #[arg(long, short = 'n', default_value = "")]
    namespace: String,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let r = client.list_policies(&args.namespace).await?;
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
    Ok(())
}
