//! `weirctl health SERVICE`: instance health with recent transitions.

use anyhow::Result;
use weir_client::{Client, GetHealthRequest};

use crate::cmd::ServiceArg;
use crate::output::{health_json, health_table, Format};

pub type Args = ServiceArg;

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let ServiceArg { service, namespace } = args;
    let resp = client
        .get_health(GetHealthRequest {
            namespace: namespace.clone(),
            service: service.clone(),
            ..GetHealthRequest::default()
        })
        .await?;
    match format {
        Format::Json => println!("{}", health_json(&resp)),
        Format::Table => print!("{}", health_table(&namespace, &service, &resp)),
    }
    Ok(())
}
