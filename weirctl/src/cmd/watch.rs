//! `weirctl watch [SERVICE]`: follow changes live, a snapshot first.

use std::io::Write as _;

use anyhow::Result;
use weir_client::{Client, Event, EventType, WatchUpdate};
use weir_core::signal::shutdown_signal;

use crate::output::{
    event_json, event_line, instance_json, protection_json, protection_line, Format,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Service to watch; all services of the namespace when absent.
    service: Option<String>,
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Resume after this revision instead of starting with a snapshot.
    #[arg(long)]
    from: Option<u64>,
    /// Exit after this many updates (snapshot, changes or progress).
    #[arg(long)]
    count: Option<u64>,
}

pub async fn run(client: &Client, format: Format, args: Args) -> Result<()> {
    let mut view = client.watch_view(&args.namespace, args.service.as_deref().unwrap_or(""));
    if let Some(r) = args.from {
        view = view.resume_from(r);
    }
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    while args.count.is_none_or(|c| seen < c) {
        let update = tokio::select! {
            _ = shutdown_signal() => return Ok(()),
            u = view.next() => u?,
        };
        seen += 1;
        match (&update, format) {
            (
                WatchUpdate::Snapshot {
                    revision,
                    resync_reason,
                    protection,
                },
                Format::Json,
            ) => {
                let instances: Vec<_> = view.instances().map(instance_json).collect();
                let protection: Vec<_> = protection.iter().map(protection_json).collect();
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "snapshot", "revision": revision,
                        "resync_reason": resync_reason, "instances": instances,
                        "protection": protection})
                )?;
            }
            (
                WatchUpdate::Snapshot {
                    revision,
                    resync_reason,
                    protection,
                },
                Format::Table,
            ) => {
                match resync_reason {
                    Some(why) => {
                        writeln!(out, "# snapshot at revision {revision} (resync: {why})")?
                    }
                    None => writeln!(out, "# snapshot at revision {revision}")?,
                }
                for i in view.instances() {
                    let e = Event {
                        r#type: EventType::Put as i32,
                        instance: Some(i.clone()),
                        revision: i.revision,
                    };
                    writeln!(out, "{}", event_line(&e))?;
                }
                for p in protection {
                    writeln!(out, "{}", protection_line(*revision, p))?;
                }
            }
            (
                WatchUpdate::Changes {
                    events, protection, ..
                },
                Format::Json,
            ) => {
                let changes = events
                    .iter()
                    .map(|e| serde_json::json!({"kind": "change", "event": event_json(e)}));
                let protection = protection.iter().map(
                    |p| serde_json::json!({"kind": "protection", "protection": protection_json(p)}),
                );
                for line in changes.chain(protection) {
                    writeln!(out, "{line}")?;
                }
            }
            (
                WatchUpdate::Changes {
                    revision,
                    events,
                    protection,
                },
                Format::Table,
            ) => {
                for e in events {
                    writeln!(out, "{}", event_line(e))?;
                }
                for p in protection {
                    writeln!(out, "{}", protection_line(*revision, p))?;
                }
            }
            (WatchUpdate::Progress { revision }, Format::Json) => {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({"kind": "progress", "revision": revision})
                )?;
            }
            (WatchUpdate::Progress { .. }, Format::Table) => {}
        }
        out.flush()?;
    }
    Ok(())
}
