//! `weirctl policy history SERVICE`: the kept versions, newest first.

use anyhow::Result;
use serde_json::json;
use weir_client::Client;

use super::version_json;
use crate::cmd::ServiceArg;
use crate::output::{table, Format};

pub type Args = ServiceArg;

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let versions = client
        .policy_history(&args.namespace, &args.service)
        .await?;
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
    Ok(())
}
