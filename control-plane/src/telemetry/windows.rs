//! Traffic per edge over sliding windows: 10-second slots, the last 90
//! kept (15 minutes), each with outcome counts, retries and a latency
//! sketch. A window's figures merge its slots' sketches (exactly: a
//! DDSketch merge is the sketch of the union), so its percentiles are
//! within the sketch's relative error of the true ones, never an average
//! of percentiles.
//!
//! Slots are by this replica's clock when a report arrives: an agent's
//! clock never moves traffic into the future or the past.

use std::collections::HashMap;

use weir_core::sketch::Sketch;
use weir_proto::telemetry::v1::{self as pb, Edge, EdgeDelta, Outcomes, Traffic};

/// Seconds per slot.
pub const SLOT_SECONDS: u64 = 10;
/// Slots kept: 15 minutes.
pub const SLOTS: usize = 90;
/// Edges kept at most; reports of more are counted and dropped.
pub const MAX_EDGES: usize = 100_000;

/// An edge by its names: source, target and topic, each
/// (namespace, name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct EdgeKey {
    pub source: (String, String),
    pub target: (String, String),
    pub topic: (String, String),
}

impl EdgeKey {
    pub fn of(edge: &Edge) -> Self {
        let service = |s: &Option<pb::ServiceRef>| {
            s.as_ref()
                .map(|s| (s.namespace.clone(), s.name.clone()))
                .unwrap_or_default()
        };
        Self {
            source: service(&edge.source),
            target: service(&edge.target),
            topic: edge
                .topic
                .as_ref()
                .map(|t| (t.namespace.clone(), t.name.clone()))
                .unwrap_or_default(),
        }
    }

    pub fn to_proto(&self) -> Edge {
        let service = |(namespace, name): &(String, String)| pb::ServiceRef {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        Edge {
            source: Some(service(&self.source)),
            target: Some(service(&self.target)),
            topic: Some(pb::TopicRef {
                namespace: self.topic.0.clone(),
                name: self.topic.1.clone(),
            }),
        }
    }
}

/// Counts of one slot (or a window).
#[derive(Clone, Debug, Default)]
pub struct Counts {
    pub outcomes: [u64; 5],
    pub retries: u64,
    pub latency: Sketch,
}

impl Counts {
    pub fn requests(&self) -> u64 {
        self.outcomes.iter().sum()
    }

    fn add_outcomes(&mut self, o: &Outcomes) {
        for (mine, theirs) in self.outcomes.iter_mut().zip([
            o.ok,
            o.client_error,
            o.server_error,
            o.limited,
            o.rejected,
        ]) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Counts) {
        for (mine, theirs) in self.outcomes.iter_mut().zip(other.outcomes) {
            *mine = mine.saturating_add(theirs);
        }
        self.retries = self.retries.saturating_add(other.retries);
        // Every sketch here has the default alpha.
        let _ = self.latency.merge(&other.latency);
    }

    fn outcomes_proto(&self) -> Outcomes {
        let [ok, client_error, server_error, limited, rejected] = self.outcomes;
        Outcomes {
            ok,
            client_error,
            server_error,
            limited,
            rejected,
        }
    }
}

/// One edge's slots, oldest first.
#[derive(Debug, Default)]
struct Series {
    /// (slot number, counts).
    slots: std::collections::VecDeque<(u64, Counts)>,
}

impl Series {
    fn slot(&mut self, now_slot: u64) -> &mut Counts {
        if self.slots.back().is_none_or(|(n, _)| *n != now_slot) {
            self.slots.push_back((now_slot, Counts::default()));
        }
        while self
            .slots
            .front()
            .is_some_and(|(n, _)| *n + SLOTS as u64 <= now_slot)
        {
            self.slots.pop_front();
        }
        match self.slots.back_mut() {
            Some((_, c)) => c,
            None => unreachable!("a slot was just pushed"),
        }
    }
}

/// Why a delta was refused.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("edges[{0}]: the latency sketch is invalid: {1}")]
    Sketch(usize, weir_core::sketch::SketchError),
    #[error("edges[{0}]: the edge is missing")]
    NoEdge(usize),
    #[error("edges[{0}]: a name is longer than 253 bytes")]
    TooLong(usize),
}

/// A window's traffic, as a caller merges it from slots (and replicas).
#[derive(Clone, Debug, Default)]
pub struct Window {
    pub counts: Counts,
    /// Requests per slot, oldest first; `SLOTS` or fewer long.
    pub series: Vec<u64>,
}

impl Window {
    pub fn merge(&mut self, other: &Window) {
        self.counts.merge(&other.counts);
        if self.series.len() < other.series.len() {
            self.series.resize(other.series.len(), 0);
        }
        for (mine, theirs) in self.series.iter_mut().zip(&other.series) {
            *mine += theirs;
        }
    }

    /// The figures of a window of `seconds`; `raw` leaves out the
    /// percentiles (the asker computes them once, after merging).
    pub fn traffic(&self, seconds: u32, raw: bool) -> Traffic {
        let c = &self.counts;
        let requests = c.requests();
        let errors = c.outcomes[2] + c.outcomes[4];
        let q = |q: f64| {
            if raw {
                0.0
            } else {
                c.latency.quantile(q).unwrap_or(0.0)
            }
        };
        Traffic {
            outcomes: Some(c.outcomes_proto()),
            retries: c.retries,
            rate_per_second: requests as f64 / f64::from(seconds.max(1)),
            error_ratio: if requests == 0 {
                0.0
            } else {
                errors as f64 / requests as f64
            },
            p50_seconds: q(0.5),
            p90_seconds: q(0.9),
            p99_seconds: q(0.99),
            latency: Some(c.latency.to_proto()),
            series: self.series.clone(),
        }
    }

    /// A window back from a `Traffic` (a replica's raw answer).
    pub fn from_traffic(t: &Traffic) -> Option<Self> {
        let o = t.outcomes.unwrap_or_default();
        let mut counts = Counts {
            retries: t.retries,
            ..Counts::default()
        };
        counts.add_outcomes(&o);
        if let Some(s) = &t.latency {
            counts.latency = Sketch::from_proto(s).ok()?;
        }
        Some(Self {
            counts,
            series: t.series.iter().take(SLOTS).copied().collect(),
        })
    }
}

/// Every edge's series.
#[derive(Debug, Default)]
pub struct Windows {
    edges: HashMap<EdgeKey, Series>,
    /// Deltas dropped: past [`MAX_EDGES`].
    pub dropped: u64,
}

/// The slot of Unix time `secs`.
pub fn slot_of(secs: u64) -> u64 {
    secs / SLOT_SECONDS
}

impl Windows {
    /// Checks a batch's deltas before any is added.
    pub fn check(deltas: &[EdgeDelta]) -> Result<(), DeltaError> {
        for (i, d) in deltas.iter().enumerate() {
            let edge = d.edge.as_ref().ok_or(DeltaError::NoEdge(i))?;
            let key = EdgeKey::of(edge);
            let parts = [
                &key.source.0,
                &key.source.1,
                &key.target.0,
                &key.target.1,
                &key.topic.0,
                &key.topic.1,
            ];
            if parts.iter().any(|p| p.len() > 253) {
                return Err(DeltaError::TooLong(i));
            }
            if let Some(s) = &d.latency {
                Sketch::from_proto(s).map_err(|e| DeltaError::Sketch(i, e))?;
            }
        }
        Ok(())
    }

    /// Adds checked deltas into the slot of `now_secs`.
    pub fn add(&mut self, deltas: &[EdgeDelta], now_secs: u64) {
        let now = slot_of(now_secs);
        for d in deltas {
            let Some(edge) = &d.edge else {
                continue;
            };
            let key = EdgeKey::of(edge);
            if !self.edges.contains_key(&key) && self.edges.len() >= MAX_EDGES {
                self.dropped += 1;
                continue;
            }
            let slot = self.edges.entry(key).or_default().slot(now);
            slot.add_outcomes(&d.outcomes.unwrap_or_default());
            slot.retries = slot.retries.saturating_add(d.retries);
            if let Some(Ok(s)) = d.latency.as_ref().map(Sketch::from_proto) {
                let _ = slot.latency.merge(&s);
            }
        }
    }

    /// Forgets edges with no slot in the last 15 minutes.
    pub fn expire(&mut self, now_secs: u64) {
        let now = slot_of(now_secs);
        self.edges
            .retain(|_, s| s.slots.back().is_some_and(|(n, _)| n + SLOTS as u64 > now));
    }

    pub fn len(&self) -> usize {
        self.edges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.edges.is_empty()
    }

    /// Each edge's window of the last `seconds` (rounded up to slots),
    /// `filter` choosing edges.
    pub fn window(
        &self,
        seconds: u32,
        now_secs: u64,
        filter: impl Fn(&EdgeKey) -> bool,
    ) -> Vec<(EdgeKey, Window)> {
        let now = slot_of(now_secs);
        let n = (u64::from(seconds))
            .div_ceil(SLOT_SECONDS)
            .clamp(1, SLOTS as u64);
        let first = now + 1 - n.min(now + 1);
        let mut out = Vec::new();
        for (key, series) in &self.edges {
            if !filter(key) {
                continue;
            }
            let mut w = Window {
                counts: Counts::default(),
                series: vec![0; n as usize],
            };
            let mut any = false;
            for (slot, counts) in &series.slots {
                if *slot < first || *slot > now {
                    continue;
                }
                any = true;
                w.counts.merge(counts);
                w.series[(*slot - first) as usize] += counts.requests();
            }
            if any {
                out.push((key.clone(), w));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(source: &str, target: &str, ok: u64, err: u64, latencies: &[f64]) -> EdgeDelta {
        let mut sketch = Sketch::default();
        for l in latencies {
            sketch.insert(*l);
        }
        EdgeDelta {
            edge: Some(
                EdgeKey {
                    source: ("shop".into(), source.into()),
                    target: ("shop".into(), target.into()),
                    topic: Default::default(),
                }
                .to_proto(),
            ),
            outcomes: Some(Outcomes {
                ok,
                server_error: err,
                ..Outcomes::default()
            }),
            retries: 0,
            latency: Some(sketch.to_proto()),
        }
    }

    #[test]
    fn windows_merge_slots_and_drop_the_old() {
        let mut w = Windows::default();
        let t0 = 1_000_000;
        w.add(&[delta("web", "orders", 9, 1, &[0.01; 10])], t0);
        w.add(&[delta("web", "orders", 10, 0, &[0.02; 10])], t0 + 30);
        w.add(&[delta("web", "billing", 5, 0, &[0.5; 5])], t0 + 30);
        let last_minute = w.window(60, t0 + 30, |_| true);
        assert_eq!(last_minute.len(), 2);
        let orders = last_minute
            .iter()
            .find(|(k, _)| k.target.1 == "orders")
            .map(|(_, w)| w.clone())
            .expect("orders");
        assert_eq!(orders.counts.requests(), 20);
        assert_eq!(orders.series.iter().sum::<u64>(), 20);
        assert_eq!(orders.series.len(), 6);
        let t = orders.traffic(60, false);
        assert!((t.error_ratio - 0.05).abs() < 1e-9);
        assert!((t.rate_per_second - 20.0 / 60.0).abs() < 1e-9);
        // p50 of ten 10 ms and ten 20 ms: 10 ms within 1%.
        assert!((t.p50_seconds - 0.01).abs() <= 0.0001, "{}", t.p50_seconds);
        // Out of the one-minute window after 10 more minutes; gone from
        // the 15-minute one after 15.
        assert!(w.window(60, t0 + 700, |_| true).is_empty());
        assert_eq!(w.window(900, t0 + 700, |_| true).len(), 2);
        w.expire(t0 + 1_000);
        assert!(w.is_empty());
    }

    #[test]
    fn a_raw_window_round_trips_and_bad_deltas_are_refused() {
        let mut w = Windows::default();
        w.add(&[delta("web", "orders", 3, 0, &[0.1, 0.2, 0.3])], 100);
        let (_, win) = w.window(60, 100, |_| true).remove(0);
        let back = Window::from_traffic(&win.traffic(60, true)).expect("valid");
        assert_eq!(back.counts.requests(), 3);
        assert_eq!(back.counts.latency, win.counts.latency);
        let mut bad = delta("web", "orders", 1, 0, &[0.1]);
        if let Some(s) = bad.latency.as_mut() {
            s.alpha = 7.0;
        }
        assert!(matches!(
            Windows::check(&[bad]),
            Err(DeltaError::Sketch(0, _))
        ));
        let mut long = delta("web", "orders", 1, 0, &[]);
        if let Some(e) = long.edge.as_mut() {
            e.source = Some(pb::ServiceRef {
                namespace: "x".repeat(300),
                name: "web".into(),
            });
        }
        assert!(matches!(
            Windows::check(&[long]),
            Err(DeltaError::TooLong(0))
        ));
    }
}
