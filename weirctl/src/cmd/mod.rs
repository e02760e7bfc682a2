//! One module per command: its clap `Args` and an `async fn run`.

pub mod agents;
pub mod deregister;
pub mod events;
pub mod get;
pub mod governance;
pub mod health;
pub mod list;
pub mod policy;
pub mod register;
pub mod service_config;
pub mod stats;
pub mod topology;
pub mod traces;
pub mod watch;

// Every command that names one service takes it the same way: SERVICE, then
// `--namespace/-n` (default "default"). Flattened into each command's Args.
#[derive(clap::Args, Debug)]
pub struct ServiceArg {
    pub service: String,
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
}

/// The sliding window a telemetry query covers: the control plane keeps
/// exactly these two, so anything else is refused here rather than there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Window {
    #[default]
    #[value(name = "1m")]
    OneMinute,
    #[value(name = "15m")]
    FifteenMinutes,
}

impl Window {
    pub fn seconds(self) -> u32 {
        match self {
            Window::OneMinute => 60,
            Window::FifteenMinutes => 900,
        }
    }
}

/// The agents to ask: the one `node` names, else every connected one.
pub async fn nodes(
    client: &weir_client::Client,
    node: Option<&String>,
) -> anyhow::Result<Vec<String>> {
    Ok(match node {
        Some(node) => vec![node.clone()],
        None => client
            .list_all_agents()
            .await?
            .agents
            .into_iter()
            .filter(|a| a.connected)
            .map(|a| a.node_id)
            .collect(),
    })
}

/// Parses a `key=value` argument.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cmd {
        #[command(flatten)]
        target: ServiceArg,
    }

    #[test]
    fn a_service_is_in_the_default_namespace_unless_named() {
        let c = Cmd::try_parse_from(["t", "orders"]).expect("parses");
        assert_eq!(
            (c.target.service.as_str(), c.target.namespace.as_str()),
            ("orders", "default")
        );
        let c = Cmd::try_parse_from(["t", "orders", "-n", "shop"]).expect("parses");
        assert_eq!(c.target.namespace, "shop");
        assert!(Cmd::try_parse_from(["t"]).is_err(), "SERVICE is required");
    }
}
