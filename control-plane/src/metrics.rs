//! The control plane's own metrics on `/metrics` (Prometheus text):
//! registry size, agent sessions, feed subscribers, store call latency,
//! checks run, and the telemetry counters (see `docs/metrics.md`).

use std::time::Instant;

use weir_core::health::checker::Checker;

use crate::{
    hub::Hub,
    store::{Call, Layer, Op},
};

/// Sets the gauges read from the hub's cache and the checker (each
/// scrape, and every few seconds).
pub fn refresh(hub: &Hub, checker: &Checker) {
    metrics::counter!("weir_control_plane_checks_total").absolute(checker.probes());
    metrics::gauge!("weir_control_plane_checked_instances").set(checker.len() as f64);
    let (instances, services, sessions, subscribers) = hub.sizes();
    metrics::gauge!("weir_control_plane_registry_instances").set(instances as f64);
    metrics::gauge!("weir_control_plane_registry_services").set(services as f64);
    metrics::gauge!("weir_control_plane_agent_sessions").set(sessions as f64);
    metrics::gauge!("weir_control_plane_watchers").set(subscribers as f64);
}

/// The metrics as Prometheus text.
pub fn render(hub: &Hub, checker: &Checker) -> String {
    refresh(hub, checker);
    weir_core::prometheus::handle().render()
}

/// A store [`Layer`] that times each call:
/// `weir_control_plane_store_request_duration_seconds{op}`, and counts
/// failures in `weir_control_plane_store_errors_total{op}`. Watches are
/// timed while they open.
#[derive(Debug, Default, Clone, Copy)]
pub struct Timed;

fn op_name(op: &Op<'_>) -> &'static str {
    match op {
        Op::Get { .. } => "get",
        Op::Range { .. } => "range",
        Op::RangePage { .. } => "range_page",
        Op::Put { .. } => "put",
        Op::Replace { .. } => "replace",
        Op::PutIf { .. } => "put_if",
        Op::Delete { .. } => "delete",
        Op::GrantLease { .. } => "grant_lease",
        Op::KeepAlive { .. } => "keep_alive",
        Op::RevokeLease { .. } => "revoke_lease",
        Op::Watch { .. } => "watch",
        Op::History { .. } => "history",
        Op::Compact { .. } => "compact",
    }
}

impl Layer for Timed {
    fn around<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: Call<'a, T>) -> Call<'a, T> {
        let name = op_name(&op);
        Box::pin(async move {
            let start = Instant::now();
            let result = call.await;
            metrics::histogram!("weir_control_plane_store_request_duration_seconds", "op" => name)
                .record(start.elapsed().as_secs_f64());
            if result.is_err() {
                metrics::counter!("weir_control_plane_store_errors_total", "op" => name)
                    .increment(1);
            }
            result
        })
    }
}
