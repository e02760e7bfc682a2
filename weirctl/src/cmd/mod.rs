//! One module per command: its clap `Args` and an `async fn run`.

pub mod deregister;
pub mod get;
pub mod health;
pub mod list;
pub mod policy;
pub mod register;
pub mod service_config;
pub mod watch;

/// Parses a `key=value` argument.
pub fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}
