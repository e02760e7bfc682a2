//! `weirctl policy get SERVICE`.

use anyhow::Result;
use weir_client::Client;

use super::{to_json, version_json};
use crate::cmd::ServiceArg;
use crate::output::Format;

pub type Args = ServiceArg;

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args;
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
