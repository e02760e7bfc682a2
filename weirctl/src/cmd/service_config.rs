//! `weirctl service-config SERVICE`: show a service's settings, or change
//! them.

use anyhow::{Context, Result};
use weir_client::{Client, GetServiceConfigRequest, ServiceConfig, SetServiceConfigRequest};

use super::ServiceArg;
use crate::output::Format;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    target: ServiceArg,
    /// Protection threshold in percent (0 disables; "default" unsets).
    #[arg(long)]
    protection_threshold: Option<String>,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let Args {
        target: ServiceArg { service, namespace },
        protection_threshold,
    } = args;
    if let Some(t) = protection_threshold {
        let threshold = if t == "default" {
            None
        } else {
            Some(t.parse::<u32>().with_context(|| {
                format!("--protection-threshold must be 0-100 or \"default\" (got {t:?})")
            })?)
        };
        client
            .set_service_config(SetServiceConfigRequest {
                namespace: namespace.clone(),
                service: service.clone(),
                config: Some(ServiceConfig {
                    protection_threshold_percent: threshold,
                }),
            })
            .await?;
    }
    let resp = client
        .get_service_config(GetServiceConfigRequest {
            namespace: namespace.clone(),
            service: service.clone(),
        })
        .await?;
    let own = resp.config.and_then(|c| c.protection_threshold_percent);
    match format {
        Format::Json => println!(
            "{}",
            serde_json::json!({"namespace": namespace, "service": service,
                "protection_threshold_percent": own,
                "effective_protection_threshold_percent": resp.effective_protection_threshold_percent})
        ),
        Format::Table => println!(
            "{namespace}/{service}: protection threshold {}%{}",
            resp.effective_protection_threshold_percent,
            if own.is_some() { "" } else { " (default)" }
        ),
    }
    Ok(())
}
