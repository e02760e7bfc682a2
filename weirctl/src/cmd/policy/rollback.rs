//! `weirctl policy rollback SERVICE VERSION`: an earlier version made
//! current again, as a new version.

use anyhow::Result;
use weir_client::Client;

use crate::cmd::ServiceArg;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    /// The version to restore (see `history`).
    version: u64,
    #[arg(long)]
    expect_version: Option<u64>,
}

pub async fn run(client: &Client, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args.target;
    let version = args.version;
    let v = client
        .rollback_policy(&namespace, &service, version, args.expect_version)
        .await?;
    println!(
        "{namespace}/{service}: version {version} restored as version {}",
        v.version
    );
    Ok(())
}
