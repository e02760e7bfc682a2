//! `weirctl policy ...`: traffic policies from YAML or JSON files, one
//! module per subcommand.

mod delete;
mod get;
mod history;
mod list;
mod rollback;
mod set;
mod status;

use anyhow::Result;
use clap::Subcommand;
use serde_json::json;
use weir_client::{policy::PolicyVersion, policy::TrafficPolicy, Client};

use crate::output::Format;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a service's current policy (YAML; -o json for JSON).
    Get(get::Args),
    /// Create or replace a policy from a YAML or JSON file.
    Set(set::Args),
    /// Remove a service's policy.
    Delete(delete::Args),
    /// List policies with their versions.
    List(list::Args),
    /// The kept versions of a policy, newest first.
    History(history::Args),
    /// Make an earlier version current again (as a new version).
    Rollback(rollback::Args),
    /// Which agents run the current version, which rejected it.
    Status(status::Args),
}

pub async fn run(client: &Client, format: Format, command: Command) -> Result<()> {
    match command {
        Command::Get(args) => get::run(client, format, args).await,
        Command::Set(args) => set::run(client, format, args).await,
        Command::Delete(args) => delete::run(client, args).await,
        Command::List(args) => list::run(client, format, args).await,
        Command::History(args) => history::run(client, format, args).await,
        Command::Rollback(args) => rollback::run(client, args).await,
        Command::Status(args) => status::run(client, format, args).await,
    }
}

/// A policy as proto3 JSON (enum names, camelCase fields).
fn to_json(p: &TrafficPolicy) -> Result<serde_json::Value> {
    Ok(serde_json::to_value(p)?)
}

fn version_json(v: &PolicyVersion) -> Result<serde_json::Value> {
    Ok(json!({
        "version": v.version,
        "updated_at_unix_ms": v.updated_at_unix_ms,
        "restored_from": v.restored_from,
        "policy": v.policy.as_ref().map(to_json).transpose()?,
    }))
}
