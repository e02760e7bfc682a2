//! `weirctl get SERVICE`: a service's instances.

use anyhow::Result;
use weir_client::{Client, GetServiceRequest};

use super::ServiceArg;
use crate::output::{instance_json, instance_row, table, Format, INSTANCE_HEADER};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    /// Only instances that are passing.
    #[arg(long)]
    healthy: bool,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let Args {
        target: ServiceArg { service, namespace },
        healthy,
    } = args;
    let resp = client
        .get_service(GetServiceRequest {
            namespace: namespace.clone(),
            service: service.clone(),
            healthy_only: healthy,
            ..GetServiceRequest::default()
        })
        .await?;
    let instances = resp.service.map(|s| s.instances).unwrap_or_default();
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({
                "namespace": namespace,
                "service": service,
                "revision": resp.revision,
                "instances": instances.iter().map(instance_json).collect::<Vec<_>>(),
            })
        ),
        Format::Table => {
            if instances.is_empty() {
                eprintln!("{namespace}/{service} has no instances");
            } else {
                let rows: Vec<_> = instances.iter().map(instance_row).collect();
                print!("{}", table(&INSTANCE_HEADER, &rows));
            }
        }
    }
    Ok(())
}
