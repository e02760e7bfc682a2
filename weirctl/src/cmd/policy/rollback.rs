//! `weirctl policy rollback SERVICE VERSION`: an earlier version made
//! current again, as a new version.

use anyhow::Result;
use weir_client::Client;

#[derive(clap::Args, Debug)]
pub struct Args {
    service: String,
    /// The version to restore (see `history`).
    version: u64,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    #[arg(long)]
    expect_version: Option<u64>,
}

pub async fn run(client: &Client, args: Args) -> Result<()> {
    let Args {
        service,
        version,
        namespace,
        expect_version,
    } = args;
    let v = client
        .rollback_policy(&namespace, &service, version, expect_version)
        .await?;
    println!(
        "{namespace}/{service}: version {version} restored as version {}",
        v.version
    );
    Ok(())
}
