//! `weirctl policy delete SERVICE`.

use anyhow::{bail, Result};
use weir_client::Client;

use crate::cmd::ServiceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    #[arg(long)]
    expect_version: Option<u64>,
}

pub async fn run(client: &Client, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args.target;
    let r = client
        .delete_policy(&namespace, &service, args.expect_version)
        .await?;
    if !r.existed {
        bail!("{namespace}/{service} has no policy");
    }
    println!(
        "deleted the policy of {namespace}/{service} at revision {}",
        r.revision
    );
    Ok(())
}
