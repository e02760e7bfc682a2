//! `weirctl list`: services with their instance counts.

use std::collections::HashMap;

use anyhow::Result;
use weir_client::{Client, ListServicesRequest};

use crate::output::{summary_json, summary_row, table, Format, SUMMARY_HEADER};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Namespace; empty lists every namespace.
    #[arg(long, short = 'n', default_value = "")]
    namespace: String,
    /// Only services whose name starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// Only services with an instance carrying this metadata (k=v).
    #[arg(long = "meta", value_parser = super::parse_pair)]
    metadata: Vec<(String, String)>,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let resp = client
        .list_all_services(ListServicesRequest {
            namespace: args.namespace,
            name_prefix: args.prefix.unwrap_or_default(),
            metadata: args.metadata.into_iter().collect::<HashMap<_, _>>(),
            summary_only: true,
            ..ListServicesRequest::default()
        })
        .await?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "revision": resp.revision,
                "services": resp.summaries.iter().map(summary_json).collect::<Vec<_>>(),
            })
        ),
        Format::Table => {
            let rows: Vec<_> = resp.summaries.iter().map(summary_row).collect();
            print!("{}", table(&SUMMARY_HEADER, &rows));
        }
    }
    Ok(())
}
