//! `weirctl deregister SERVICE INSTANCE_ID`.

use anyhow::{bail, Result};
use weir_client::{Client, InstanceRef};

use super::ServiceArg;
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    instance_id: String,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let r = InstanceRef {
        namespace: args.target.namespace,
        service: args.target.service,
        instance_id: args.instance_id,
    };
    let resp = client.deregister(&r).await?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({"existed": resp.existed, "revision": resp.revision})
        ),
        Format::Table if resp.existed => println!(
            "deregistered {}/{}/{} at revision {}",
            r.namespace, r.service, r.instance_id, resp.revision
        ),
        Format::Table => bail!(
            "{}/{}/{} is not registered",
            r.namespace,
            r.service,
            r.instance_id
        ),
    }
    Ok(())
}
