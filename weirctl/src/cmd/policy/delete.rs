//! `weirctl policy delete SERVICE`.

use anyhow::{bail, Result};
use weir_client::Client;

#[derive(clap::Args, Debug)]
pub struct Args {
    service: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[arg(long)]
    expect_version: Option<u64>,
}

pub async fn run(client: &Client, args: Args) -> Result<()> {
    let Args {
        service,
        namespace,
        expect_version,
    } = args;
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
    Ok(())
}
