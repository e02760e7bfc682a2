//! The report task: about once a second, drains the agent's telemetry
//! into a batch and streams it to a control-plane replica, which
//! acknowledges each batch it holds.
//!
//! Batches wait in a bounded buffer until acknowledged: while no replica
//! answers, the buffer keeps the newest [`MAX_PENDING`] batches (and at
//! most `--telemetry-buffer-bytes` of them, encoded), dropping the oldest and counting them in
//! `weir_agent_telemetry_batches_dropped_total` and in the next batch
//! that gets through. Traffic never waits on any of this.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use prost::Message as _;
use tokio::sync::watch;
use weir_client::{
    agent::{BreakerInfo, GovernanceRequest},
    telemetry::{Batch, LimitDelta, ServiceRef},
    Client, ReportStream, REPORT_WINDOW,
};

use super::Telemetry;
use crate::view::Routes;

/// Each bucket's decision counts at the last batch, for the deltas.
type Counted = HashMap<(String, String, String), [u64; 4]>;

/// The breakers not closed now, and each bucket's decisions since the
/// last call.
fn governance(routes: &Routes, counted: &mut Counted) -> (Vec<BreakerInfo>, Vec<LimitDelta>) {
    let now = crate::session::governance(routes, &GovernanceRequest::default());
    let breakers = now
        .breakers
        .into_iter()
        .filter(|b| b.state != "closed")
        .collect();
    let mut limits = Vec::new();
    let mut seen = Counted::new();
    for l in now.limits {
        let key = (l.namespace.clone(), l.service.clone(), l.rule.clone());
        let total = [l.admitted, l.queued, l.rejected, l.shadow_rejected];
        let before = counted.get(&key).copied().unwrap_or_default();
        // A bucket made anew (a policy change) counts from zero again.
        let delta: Vec<u64> = total
            .iter()
            .zip(before)
            .map(|(t, b)| if *t >= b { t - b } else { *t })
            .collect();
        if delta.iter().any(|d| *d > 0) {
            limits.push(LimitDelta {
                service: Some(ServiceRef {
                    namespace: l.namespace,
                    name: l.service,
                }),
                rule: l.rule,
                admitted: delta[0],
                queued: delta[1],
                rejected: delta[2],
                shadow_rejected: delta[3],
            });
        }
        seen.insert(key, total);
    }
    *counted = seen;
    (breakers, limits)
}

/// How often a batch is made.
pub const EVERY: Duration = Duration::from_secs(1);
/// Batches kept unacknowledged at most (two minutes of reports).
pub const MAX_PENDING: usize = 120;
/// Bytes of unacknowledged batches (encoded) kept at most, by default.
pub const DEFAULT_BUFFER_BYTES: usize = 16 << 20;

/// A batch kept encoded: the buffer holds exactly the bytes it counts.
#[derive(Debug)]
struct Held {
    seq: u64,
    spans: u64,
    bytes: Vec<u8>,
}

/// Batches waiting for their acknowledgement.
#[derive(Debug, Default)]
struct Pending {
    max_bytes: usize,
    batches: VecDeque<Held>,
    bytes: usize,
    /// Dropped since the last batch that got through.
    dropped: u64,
    /// How many of `batches` (from the front) went on the open stream.
    sent: usize,
}

impl Pending {
    fn push(&mut self, batch: &Batch) {
        let held = Held {
            seq: batch.seq,
            spans: batch.spans.len() as u64,
            bytes: batch.encode_to_vec(),
        };
        self.bytes += held.bytes.len();
        self.batches.push_back(held);
        while self.batches.len() > MAX_PENDING || self.bytes > self.max_bytes {
            let Some(old) = self.batches.pop_front() else {
                break;
            };
            self.bytes -= old.bytes.len();
            self.sent = self.sent.saturating_sub(1);
            self.dropped += 1;
            metrics::counter!("weir_agent_telemetry_batches_dropped_total").increment(1);
            metrics::counter!("weir_agent_spans_dropped_total").increment(old.spans);
        }
    }

    /// Forgets the batches up to `seq`, acknowledged.
    fn acked(&mut self, seq: u64) {
        while self.batches.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = self.batches.pop_front() {
                self.bytes -= b.bytes.len();
                self.sent = self.sent.saturating_sub(1);
            }
        }
    }

    /// The `n`th batch held, as sent.
    fn batch(&self, n: usize) -> Option<Batch> {
        Batch::decode(self.batches.get(n)?.bytes.as_slice()).ok()
    }
}

/// Runs until `stop` says so; `local` lists the node's local services
/// (read each tick: one of them alone is the caller of requests that name
/// none).
pub async fn run(
    telemetry: Arc<Telemetry>,
    client: Client,
    routes: Arc<Routes>,
    local: impl Fn() -> Vec<(String, String)>,
    mut stop: watch::Receiver<bool>,
) {
    let mut counted = Counted::new();
    // A batch follows the last one with open breakers, so the control
    // plane learns they closed.
    let mut had_breakers = false;
    if !telemetry.settings().enabled {
        return;
    }
    let mut every = tokio::time::interval(EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Pending {
        max_bytes: telemetry.settings().buffer_bytes,
        ..Pending::default()
    };
    let mut stream: Option<ReportStream> = None;
    let mut seq = 0u64;
    let mut retry_at = tokio::time::Instant::now();
    let connected = metrics::gauge!("weir_agent_telemetry_connected");
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = every.tick() => {}
            ack = async {
                match stream.as_mut() {
                    Some(s) => s.acks.message().await,
                    None => std::future::pending().await,
                }
            } => {
                match ack {
                    Ok(Some(ack)) => pending.acked(ack.seq),
                    Ok(None) | Err(_) => {
                        if let Err(e) = ack {
                            tracing::debug!(error = %e, "telemetry report stream broke");
                        }
                        stream = None;
                        pending.sent = 0;
                        connected.set(0.0);
                    }
                }
                continue;
            }
        }
        telemetry.set_local_services(&local());
        let drained = telemetry.drain();
        let (breakers, limits) = governance(&routes, &mut counted);
        if !drained.spans.is_empty()
            || !drained.edges.is_empty()
            || drained.spans_dropped > 0
            || !breakers.is_empty()
            || had_breakers
            || !limits.is_empty()
        {
            had_breakers = !breakers.is_empty();
            seq += 1;
            pending.push(&Batch {
                node_id: telemetry.settings().node_id.clone(),
                spans: drained.spans,
                edges: drained.edges,
                spans_dropped: drained.spans_dropped,
                batches_dropped: 0,
                sent_unix_ms: weir_core::time::now_unix_ms().max(0) as u64,
                sample_rate: telemetry.settings().sample_rate,
                seq,
                breakers,
                limits,
            });
        }
        if stream.is_none() && !pending.batches.is_empty() {
            let now = tokio::time::Instant::now();
            if now < retry_at {
                continue;
            }
            match client.open_report().await {
                Ok(s) => {
                    stream = Some(s);
                    pending.sent = 0;
                    connected.set(1.0);
                }
                Err(e) => {
                    tracing::debug!(error = %e, buffered = pending.batches.len(), "no replica takes telemetry; buffering");
                    retry_at = now + Duration::from_secs(2);
                    continue;
                }
            }
        }
        let Some(s) = stream.as_ref() else {
            continue;
        };
        // Send what has not gone on this stream, within the window.
        while pending.sent < pending.batches.len() && pending.sent < REPORT_WINDOW {
            let Some(mut batch) = pending.batch(pending.sent) else {
                // Our own encoding always decodes; were it not to, the
                // batch is skipped (forgotten with the next ack).
                pending.sent += 1;
                continue;
            };
            if pending.sent == 0 {
                batch.batches_dropped = std::mem::take(&mut pending.dropped);
            }
            match s.batches.try_send(batch) {
                Ok(()) => pending.sent += 1,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => break,
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    stream = None;
                    pending.sent = 0;
                    connected.set(0.0);
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(seq: u64) -> Batch {
        Batch {
            seq,
            node_id: "n".into(),
            ..Batch::default()
        }
    }

    #[test]
    fn pending_batches_are_bounded_and_forgotten_once_acknowledged() {
        let mut p = Pending {
            max_bytes: DEFAULT_BUFFER_BYTES,
            ..Pending::default()
        };
        for seq in 1..=(MAX_PENDING as u64 + 5) {
            p.push(&batch(seq));
        }
        assert_eq!(p.batches.len(), MAX_PENDING);
        assert_eq!(p.dropped, 5);
        assert_eq!(p.batches.front().map(|b| b.seq), Some(6));
        assert_eq!(p.dropped, 5);
        p.sent = 10;
        p.acked(10);
        assert_eq!(p.batches.front().map(|b| b.seq), Some(11));
        assert_eq!(p.sent, 5);
        let bytes: usize = p.batches.iter().map(|b| b.bytes.len()).sum();
        assert_eq!(p.bytes, bytes);
        assert_eq!(p.batch(0).map(|b| b.seq), Some(11));
    }
}
