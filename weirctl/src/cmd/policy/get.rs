//! `weirctl policy get SERVICE`.

use anyhow::Result;
use weir_client::Client;

use super::{to_json, version_json};
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    service: String,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let Args { service, namespace } = args;
    let v = client.get_policy(&namespace, &service).await?;
    match format {
        Format::Json => println!("{}", version_json(&v)?),
        Format::Table => {
            println!("# {namespace}/{service} version {}", v.version);
            if let Some(p) = &v.policy {
                print!("{}", serde_yaml::to_string(&to_json(p)?)?);
            }
        }
    }
    Ok(())
}
