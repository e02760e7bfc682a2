//! Traffic per edge in one shard: outcome counts, retries and a latency
//! sketch since the last report, and the edge's Prometheus histograms.
//!
//! A request finds its edge by a hash of the names it carries (no
//! allocation); an edge's strings are copied once, when it first appears.
//! Edges are capped per process ([`MAX_EDGES`]): past the cap a new
//! caller's requests count under the unknown caller, and past twice the
//! cap they are counted only in `weir_agent_metric_series_dropped_total`.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::Duration,
};

use weir_core::sketch::Sketch;
use weir_proto::telemetry::v1 as pb;

use super::{Outcome, Trace};

/// Edges one agent keeps at most (per-edge series on `/metrics`).
pub const MAX_EDGES: usize = 1_000;

/// An edge, by reference into a trace.
#[derive(Clone, Copy, Debug)]
pub(super) struct Key<'a> {
    source: (&'a str, &'a str),
    target: (&'a str, &'a str),
    topic: (&'a str, &'a str),
}

impl<'a> Key<'a> {
    pub(super) fn of(t: &'a Trace) -> Self {
        Self {
            source: (&t.source.namespace, &t.source.name),
            target: t
                .target
                .as_ref()
                .map_or(("", ""), |r| (&r.namespace, &r.service)),
            topic: t.topic.as_ref().map_or(("", ""), |(ns, t)| (ns, t)),
        }
    }

    fn parts(&self) -> [&'a str; 6] {
        [
            self.source.0,
            self.source.1,
            self.target.0,
            self.target.1,
            self.topic.0,
            self.topic.1,
        ]
    }

    fn hash(&self) -> u64 {
        // FNV-1a, with a separator after each part.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in self.parts() {
            for b in part.bytes().chain([0xff]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

#[derive(Debug)]
struct Cell {
    parts: [Box<str>; 6],
    outcomes: [u64; 5],
    retries: u64,
    latency: Sketch,
    histograms: [metrics::Histogram; 5],
}

impl Cell {
    fn new(key: &Key<'_>) -> Self {
        let parts = key.parts().map(Box::<str>::from);
        let source = if key.source.1.is_empty() {
            "unknown".to_owned()
        } else {
            format!("{}/{}", key.source.0, key.source.1)
        };
        let namespace = if key.target.0.is_empty() {
            key.topic.0
        } else {
            key.target.0
        };
        let histograms = Outcome::ALL.map(|o| {
            let labels = [
                ("namespace", namespace.to_owned()),
                ("service", key.target.1.to_owned()),
                ("source", source.clone()),
                ("topic", key.topic.1.to_owned()),
                ("outcome", o.as_str().to_owned()),
            ];
            metrics::histogram!("weir_agent_request_duration_seconds", &labels)
        });
        Self {
            parts,
            outcomes: [0; 5],
            retries: 0,
            latency: Sketch::default(),
            histograms,
        }
    }

    fn is(&self, key: &Key<'_>) -> bool {
        self.parts.iter().zip(key.parts()).all(|(a, b)| &**a == b)
    }

    fn service(&self, i: usize) -> pb::ServiceRef {
        pb::ServiceRef {
            namespace: self.parts[i].to_string(),
            name: self.parts[i + 1].to_string(),
        }
    }
}

/// Keys already hashed (FNV-1a over the edge's names): the map uses
/// them as they are.
#[derive(Debug, Default, Clone, Copy)]
struct Prehashed(u64);

impl std::hash::Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; anything else folds in.
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One shard's edges.
#[derive(Debug, Default)]
pub(super) struct Edges {
    cells: HashMap<u64, Vec<Cell>, std::hash::BuildHasherDefault<Prehashed>>,
}

impl Edges {
    /// Counts one request on `key`'s edge; `count` is the process's edge
    /// count, for the cap.
    pub(super) fn record(
        &mut self,
        count: &AtomicUsize,
        key: Key<'_>,
        outcome: Outcome,
        retries: u64,
        elapsed: Duration,
    ) {
        // Over the cap: the unknown caller's edge, within twice it.
        let unknown = Key {
            source: ("", ""),
            ..key
        };
        let key = if self.has(&key) || count.load(Relaxed) < MAX_EDGES {
            key
        } else {
            unknown
        };
        let Some(cell) = self.cell(count, key) else {
            metrics::counter!("weir_agent_metric_series_dropped_total").increment(1);
            return;
        };
        let i = outcome as usize;
        cell.outcomes[i] += 1;
        cell.retries += retries;
        let seconds = elapsed.as_secs_f64();
        cell.latency.insert(seconds);
        cell.histograms[i].record(seconds);
    }

    fn has(&self, key: &Key<'_>) -> bool {
        self.cells
            .get(&key.hash())
            .is_some_and(|b| b.iter().any(|c| c.is(key)))
    }

    fn cell(&mut self, count: &AtomicUsize, key: Key<'_>) -> Option<&mut Cell> {
        let bucket = self.cells.entry(key.hash()).or_default();
        if let Some(at) = bucket.iter().position(|c| c.is(&key)) {
            return Some(&mut bucket[at]);
        }
        let limit = if key.source.1.is_empty() {
            2 * MAX_EDGES
        } else {
            MAX_EDGES
        };
        if count.fetch_add(1, Relaxed) >= limit {
            count.fetch_sub(1, Relaxed);
            return None;
        }
        bucket.push(Cell::new(&key));
        bucket.last_mut()
    }

    /// Moves the counts since the last drain into `out`, one delta per
    /// edge with traffic.
    pub(super) fn drain_into(&mut self, out: &mut Vec<pb::EdgeDelta>) {
        for cell in self.cells.values_mut().flatten() {
            if cell.outcomes.iter().all(|n| *n == 0) {
                continue;
            }
            let [ok, client_error, server_error, limited, rejected] =
                std::mem::take(&mut cell.outcomes);
            let latency = std::mem::take(&mut cell.latency);
            out.push(pb::EdgeDelta {
                edge: Some(pb::Edge {
                    source: Some(cell.service(0)),
                    target: Some(cell.service(2)),
                    topic: Some(pb::TopicRef {
                        namespace: cell.parts[4].to_string(),
                        name: cell.parts[5].to_string(),
                    }),
                }),
                outcomes: Some(pb::Outcomes {
                    ok,
                    client_error,
                    server_error,
                    limited,
                    rejected,
                }),
                retries: std::mem::take(&mut cell.retries),
                latency: Some(latency.to_proto()),
            });
        }
    }
}
