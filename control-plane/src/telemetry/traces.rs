//! The trace store: recent traces this replica received, bounded by
//! count and bytes.
//!
//! Traces are evicted oldest first (by first arrival), but a trace with an
//! error span or a slow span is *kept longer*: ordinary traces go first,
//! and only when none is left do kept ones go, oldest first. A trace holds
//! at most [`MAX_SPANS_PER_TRACE`] spans (more are counted and dropped).

use std::collections::{BTreeSet, HashMap, VecDeque};

use prost::Message as _;
use weir_core::telemetry_json::hex;
use weir_proto::telemetry::v1::{Span, TraceSummary};

/// Spans kept of one trace at most.
pub const MAX_SPANS_PER_TRACE: usize = 2_000;

pub type TraceId = [u8; 16];

/// Limits of the store.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_traces: usize,
    pub max_bytes: usize,
    /// A span at least this long (ns) makes its trace one kept longer.
    pub slow_nanos: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_traces: 20_000,
            max_bytes: 128 << 20,
            slow_nanos: 1_000_000_000,
        }
    }
}

#[derive(Debug)]
struct Entry {
    spans: Vec<Span>,
    bytes: usize,
    start: u64,
    end: u64,
    error: bool,
    kept: bool,
}

/// What a query asks for.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// `namespace/name` or a name; empty: any.
    pub service: String,
    /// Some(true): with an error; Some(false): without.
    pub error: Option<bool>,
    pub min_duration_nanos: u64,
    pub since_nanos: u64,
    /// 0: unbounded.
    pub until_nanos: u64,
    pub limit: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct TraceStore {
    limits: Limits,
    traces: HashMap<TraceId, Entry>,
    /// Eviction order of ordinary traces, and of kept ones.
    ordinary: VecDeque<TraceId>,
    kept: VecDeque<TraceId>,
    bytes: usize,
    /// Spans refused (a full trace), and traces evicted, since start.
    pub spans_refused: u64,
    pub evicted: u64,
}

fn trace_id(span: &Span) -> Option<TraceId> {
    span.trace_id.as_slice().try_into().ok()
}

impl TraceStore {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            traces: HashMap::new(),
            ordinary: VecDeque::new(),
            kept: VecDeque::new(),
            bytes: 0,
            spans_refused: 0,
            evicted: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds spans (of any traces); ones without a 16-byte trace id and
    /// an 8-byte span id are ignored (the caller validated them).
    pub fn add(&mut self, spans: Vec<Span>) {
        for span in spans {
            let Some(id) = trace_id(&span) else {
                continue;
            };
            let bytes = span.encoded_len();
            let slow =
                span.end_unix_nanos.saturating_sub(span.start_unix_nanos) >= self.limits.slow_nanos;
            let entry = self.traces.entry(id).or_insert_with(|| {
                self.ordinary.push_back(id);
                Entry {
                    spans: Vec::new(),
                    bytes: 0,
                    start: u64::MAX,
                    end: 0,
                    error: false,
                    kept: false,
                }
            });
            if entry.spans.len() >= MAX_SPANS_PER_TRACE {
                self.spans_refused += 1;
                continue;
            }
            entry.start = entry.start.min(span.start_unix_nanos);
            entry.end = entry.end.max(span.end_unix_nanos);
            entry.error |= span.error;
            if (span.error || slow) && !entry.kept {
                entry.kept = true;
                self.kept.push_back(id);
            }
            entry.bytes += bytes;
            self.bytes += bytes;
            entry.spans.push(span);
        }
        self.evict();
    }

    fn evict(&mut self) {
        while self.traces.len() > self.limits.max_traces || self.bytes > self.limits.max_bytes {
            // An ordinary trace first; ids of traces gone, or since kept
            // (they are in the other queue), are skipped.
            let next = loop {
                match self.ordinary.pop_front() {
                    Some(id) if self.traces.get(&id).is_some_and(|e| !e.kept) => break Some(id),
                    Some(_) => continue,
                    None => break None,
                }
            };
            let next = next.or_else(|| loop {
                match self.kept.pop_front() {
                    Some(id) if self.traces.contains_key(&id) => break Some(id),
                    Some(_) => continue,
                    None => break None,
                }
            });
            let Some(id) = next else {
                break;
            };
            if let Some(e) = self.traces.remove(&id) {
                self.bytes -= e.bytes;
                self.evicted += 1;
            }
        }
    }

    /// The spans of one trace, by start time.
    pub fn get(&self, id: &TraceId) -> Vec<Span> {
        let mut spans = self
            .traces
            .get(id)
            .map(|e| e.spans.clone())
            .unwrap_or_default();
        spans.sort_by_key(|s| s.start_unix_nanos);
        spans
    }

    /// Summaries of the traces `q` asks for, newest first.
    pub fn list(&self, q: &Query) -> Vec<TraceSummary> {
        let mut found: Vec<(&TraceId, &Entry)> = self
            .traces
            .iter()
            .filter(|(_, e)| {
                q.error.is_none_or(|want| e.error == want)
                    && e.end.saturating_sub(e.start) >= q.min_duration_nanos
                    && e.start >= q.since_nanos
                    && (q.until_nanos == 0 || e.start < q.until_nanos)
                    && (q.service.is_empty() || e.spans.iter().any(|s| names(s, &q.service)))
            })
            .collect();
        found.sort_by_key(|(_, e)| std::cmp::Reverse(e.start));
        found
            .into_iter()
            .take(q.limit)
            .map(|(id, e)| summary(id, &e.spans))
            .collect()
    }
}

/// Whether `span` has `service` (`namespace/name`, or a name in any
/// namespace) as its source or target.
fn names(span: &Span, service: &str) -> bool {
    let (ns, name) = match service.split_once('/') {
        Some((ns, name)) => (Some(ns), name),
        None => (None, service),
    };
    [&span.source, &span.target]
        .into_iter()
        .flatten()
        .any(|s| !s.name.is_empty() && s.name == name && ns.is_none_or(|ns| ns == s.namespace))
}

/// A trace's summary from its spans (of this replica).
pub fn summary(id: &TraceId, spans: &[Span]) -> TraceSummary {
    let start = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let end = spans.iter().map(|s| s.end_unix_nanos).max().unwrap_or(0);
    let ids: BTreeSet<&[u8]> = spans.iter().map(|s| s.span_id.as_slice()).collect();
    // The root: a span without a parent, else one whose parent is not
    // here; the earliest of those.
    let root = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .min_by_key(|s| s.start_unix_nanos)
        .or_else(|| {
            spans
                .iter()
                .filter(|s| !ids.contains(s.parent_span_id.as_slice()))
                .min_by_key(|s| s.start_unix_nanos)
        });
    let mut services = BTreeSet::new();
    for s in spans {
        for r in [&s.source, &s.target].into_iter().flatten() {
            if !r.name.is_empty() {
                services.insert(format!("{}/{}", r.namespace, r.name));
            }
        }
    }
    TraceSummary {
        trace_id: hex(id),
        root_name: root.map(|s| s.name.clone()).unwrap_or_default(),
        services: services.into_iter().collect(),
        start_unix_ms: start / 1_000_000,
        duration_us: end.saturating_sub(start) / 1_000,
        spans: spans.len() as u32,
        error: spans.iter().any(|s| s.error),
    }
}

/// A trace id from 32 hex digits.
pub fn parse_id(text: &str) -> Option<TraceId> {
    if text.len() != 32 || !text.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut id = [0u8; 16];
    for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        id[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(id)
}

#[cfg(test)]
mod tests {
    use weir_proto::telemetry::v1::ServiceRef;

    use super::*;

    fn span(trace: u8, id: u8, parent: Option<u8>, start: u64, len: u64, error: bool) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("span {id}"),
            start_unix_nanos: start,
            end_unix_nanos: start + len,
            error,
            source: Some(ServiceRef {
                namespace: "shop".into(),
                name: "web".into(),
            }),
            target: Some(ServiceRef {
                namespace: "shop".into(),
                name: format!("svc{trace}"),
            }),
            ..Span::default()
        }
    }

    #[test]
    fn traces_gather_their_spans_and_answer_queries() {
        let mut store = TraceStore::new(Limits::default());
        store.add(vec![
            span(1, 1, None, 1_000, 5_000_000, false),
            span(1, 2, Some(1), 2_000, 1_000, false),
            span(2, 3, None, 10_000, 100, true),
        ]);
        // The second half of trace 1 comes in another batch.
        store.add(vec![span(1, 4, Some(2), 3_000, 10, false)]);
        assert_eq!(store.len(), 2);
        let spans = store.get(&[1; 16]);
        assert_eq!(spans.len(), 3);
        let s = summary(&[1; 16], &spans);
        assert_eq!(s.root_name, "span 1");
        assert_eq!(s.spans, 3);
        assert_eq!(s.duration_us, 5_000);
        assert_eq!(s.services, ["shop/svc1", "shop/web"]);
        let all = store.list(&Query {
            limit: 10,
            ..Query::default()
        });
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].trace_id, hex(&[2; 16]), "newest first");
        let errors = store.list(&Query {
            error: Some(true),
            limit: 10,
            ..Query::default()
        });
        assert_eq!(errors.len(), 1);
        let slow = store.list(&Query {
            min_duration_nanos: 1_000_000,
            limit: 10,
            ..Query::default()
        });
        assert_eq!(slow[0].trace_id, hex(&[1; 16]));
        let by_service = store.list(&Query {
            service: "shop/svc2".into(),
            limit: 10,
            ..Query::default()
        });
        assert_eq!(by_service.len(), 1);
        let by_name = store.list(&Query {
            service: "web".into(),
            limit: 10,
            ..Query::default()
        });
        assert_eq!(by_name.len(), 2);
        assert!(store
            .list(&Query {
                service: "other/web".into(),
                limit: 10,
                ..Query::default()
            })
            .is_empty());
    }

    #[test]
    fn ordinary_traces_go_first_and_the_bounds_hold() {
        let mut store = TraceStore::new(Limits {
            max_traces: 3,
            max_bytes: usize::MAX,
            slow_nanos: 1_000,
        });
        store.add(vec![span(1, 1, None, 0, 10, true)]);
        store.add(vec![span(2, 2, None, 1, 10, false)]);
        store.add(vec![span(3, 3, None, 2, 5_000, false)]);
        store.add(vec![span(4, 4, None, 3, 10, false)]);
        store.add(vec![span(5, 5, None, 4, 10, false)]);
        // 2 and 4 (ordinary) went; 1 (error) and 3 (slow) stay.
        let ids: BTreeSet<String> = store
            .list(&Query {
                limit: 10,
                ..Query::default()
            })
            .into_iter()
            .map(|s| s.trace_id)
            .collect();
        assert_eq!(
            ids,
            [hex(&[1; 16]), hex(&[3; 16]), hex(&[5; 16])]
                .into_iter()
                .collect()
        );
        assert_eq!(store.evicted, 2);
        // Only kept ones and more arrive: the oldest kept goes.
        store.add(vec![span(6, 6, None, 5, 10, true)]);
        store.add(vec![span(7, 7, None, 6, 10, true)]);
        assert!(store.get(&[1; 16]).is_empty());
        assert_eq!(store.len(), 3);
        // Bytes bound too.
        let mut small = TraceStore::new(Limits {
            max_traces: 100,
            max_bytes: 200,
            slow_nanos: u64::MAX,
        });
        for t in 1..=20 {
            small.add(vec![span(t, t, None, u64::from(t), 10, false)]);
        }
        assert!(small.bytes() <= 200);
        assert!(small.len() < 20);
    }

    #[test]
    fn ids_parse_from_hex() {
        assert_eq!(parse_id(&hex(&[0xab; 16])), Some([0xab; 16]));
        assert_eq!(parse_id("xyz"), None);
        assert_eq!(parse_id(&"g".repeat(32)), None);
    }
}
