//! `weir.telemetry.v1.Telemetry`: the agents' report streams, and the
//! queries any replica answers for the whole cluster.
//!
//! **Why fan-out at query time.** Each replica keeps what its own agents
//! report, in memory; nothing goes through etcd, whose write rate and
//! history are no place for per-second telemetry. A query asks every
//! other live replica (from the registry of replicas, with
//! `weir-forwarded-by`, so they answer from their own data only) and
//! merges: latency sketches merge exactly and counts add, so the merged
//! percentiles are those of the whole cluster, within the sketch's
//! relative error. Replicas are few (3-5), queries are people and pages,
//! not traffic: N small calls per query cost less than shipping every
//! report to every replica. A replica that does not answer within
//! [`PEER_TIMEOUT`] is named in `missing_replicas`; the rest is answered.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{future::join_all, Stream, StreamExt as _};
use tokio::sync::mpsc;
use tonic::{transport::Channel, Request, Response, Status};
use weir_proto::telemetry::v1::{
    telemetry_client::TelemetryClient, telemetry_server::Telemetry, Batch, EdgeStats,
    GetStatsRequest, GetStatsResponse, GetTopologyRequest, GetTopologyResponse, GetTraceRequest,
    GetTraceResponse, ListTracesRequest, ListTracesResponse, ReportAck, ServiceRef, ServiceStats,
    Span, TopologyEdge, TopologyNode, TraceSummary,
};

use super::{
    export::Exporters,
    governance::{self, Governance},
    traces::{self, Limits, Query, TraceStore},
    windows::{EdgeKey, Window, Windows},
};
use crate::{agents::api::FORWARDED_BY, error::ApiError, hub::Hub};

/// How long a replica waits for another's part of an answer.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest report batch a replica reads.
pub const MAX_BATCH_BYTES: usize = 4 << 20;
/// Most traces one ListTraces answers.
pub const MAX_LIST: u32 = 1_000;
/// The window when a request names none.
pub const DEFAULT_WINDOW: u32 = 60;
/// The longest window kept.
pub const MAX_WINDOW: u32 = 900;
/// Breakers one report may list at most.
pub const MAX_BREAKERS_PER_BATCH: usize = 10_000;

/// What a replica holds of the cluster's telemetry.
#[derive(Debug)]
pub struct TelemetryState {
    traces: Mutex<TraceStore>,
    windows: Mutex<Windows>,
    governance: Mutex<Governance>,
    exporters: Exporters,
    hub: Hub,
    replica_id: String,
    /// Channels to the other replicas, by address.
    peers: Mutex<HashMap<String, Channel>>,
    received: Received,
}

/// Counters of what reports brought.
#[derive(Debug)]
struct Received {
    batches: metrics::Counter,
    spans: metrics::Counter,
    invalid_spans: metrics::Counter,
    invalid_edges: metrics::Counter,
    agent_dropped_spans: metrics::Counter,
    agent_dropped_batches: metrics::Counter,
}

impl Received {
    fn new() -> Self {
        Self {
            batches: metrics::counter!("weir_control_plane_telemetry_batches_total"),
            spans: metrics::counter!("weir_control_plane_telemetry_spans_total"),
            invalid_spans: metrics::counter!(
                "weir_control_plane_telemetry_invalid_total", "what" => "span"
            ),
            invalid_edges: metrics::counter!(
                "weir_control_plane_telemetry_invalid_total", "what" => "edge"
            ),
            agent_dropped_spans: metrics::counter!("weir_control_plane_agent_dropped_spans_total"),
            agent_dropped_batches: metrics::counter!(
                "weir_control_plane_agent_dropped_batches_total"
            ),
        }
    }
}

fn now_secs() -> u64 {
    u64::try_from(weir_core::time::now_unix_ms().max(0)).unwrap_or(0) / 1_000
}

/// A span the store and exporters can take: 16- and 8-byte ids (an
/// 8-byte parent or none), at most 256 attributes.
fn valid_span(s: &Span) -> bool {
    s.trace_id.len() == 16
        && s.span_id.len() == 8
        && (s.parent_span_id.is_empty() || s.parent_span_id.len() == 8)
        && s.attributes.len() <= 256
        && s.end_unix_nanos >= s.start_unix_nanos
}

impl TelemetryState {
    pub fn new(hub: Hub, replica_id: String, limits: Limits, exporters: Exporters) -> Arc<Self> {
        Arc::new(Self {
            traces: Mutex::new(TraceStore::new(limits)),
            windows: Mutex::new(Windows::default()),
            governance: Mutex::new(Governance::default()),
            exporters,
            hub,
            replica_id,
            peers: Mutex::new(HashMap::new()),
            received: Received::new(),
        })
    }

    /// Takes one batch: spans into the store and the exporters, edge
    /// deltas into the windows (and the cluster counters). Invalid spans
    /// and deltas are counted and left out; the rest is kept.
    pub fn ingest(&self, batch: Batch) {
        self.ingest_at(batch, now_secs());
    }

    fn ingest_at(&self, batch: Batch, now: u64) {
        let r = &self.received;
        r.batches.increment(1);
        r.agent_dropped_spans.increment(batch.spans_dropped);
        r.agent_dropped_batches.increment(batch.batches_dropped);
        let (spans, invalid): (Vec<Span>, Vec<Span>) =
            batch.spans.into_iter().partition(valid_span);
        if !invalid.is_empty() {
            r.invalid_spans.increment(invalid.len() as u64);
            tracing::debug!(node = %batch.node_id, spans = invalid.len(), "invalid spans in a report left out");
        }
        r.spans.increment(spans.len() as u64);
        let edges: Vec<_> = batch
            .edges
            .into_iter()
            .filter(|d| {
                let ok = Windows::check(std::slice::from_ref(d)).is_ok();
                if !ok {
                    r.invalid_edges.increment(1);
                }
                ok
            })
            .collect();
        for d in &edges {
            count_cluster(d);
        }
        if !spans.is_empty() {
            self.exporters.offer(&spans);
            lock(&self.traces).add(spans);
        }
        lock(&self.windows).add(&edges, now);
        let breakers = batch
            .breakers
            .into_iter()
            .take(MAX_BREAKERS_PER_BATCH)
            .collect();
        let limits: Vec<_> = batch
            .limits
            .into_iter()
            .filter(|l| {
                l.rule.len() <= 253 && l.service.as_ref().is_none_or(|s| s.name.len() <= 253)
            })
            .collect();
        lock(&self.governance).add(&batch.node_id, breakers, &limits, now);
    }

    /// Forgets what fell out of every window; run now and then.
    pub fn expire(&self) {
        lock(&self.windows).expire(now_secs());
        lock(&self.governance).expire(now_secs());
        let traces = lock(&self.traces);
        metrics::gauge!("weir_control_plane_traces").set(traces.len() as f64);
        metrics::gauge!("weir_control_plane_trace_bytes").set(traces.bytes() as f64);
    }

    /// The other live replicas, by (id, address).
    fn others(&self) -> Vec<(String, String)> {
        self.hub
            .replica_addresses()
            .into_iter()
            .filter(|(id, _)| *id != self.replica_id)
            .collect()
    }

    fn channel(&self, address: &str) -> Option<Channel> {
        let mut peers = lock(&self.peers);
        if let Some(c) = peers.get(address) {
            return Some(c.clone());
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .ok()?
            .connect_timeout(PEER_TIMEOUT)
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        peers.insert(address.to_owned(), channel.clone());
        Some(channel)
    }

    /// Asks every other replica `call` with `request`, marked as
    /// forwarded (so they answer from their own data); their answers, and
    /// the ids of those that gave none.
    async fn ask_others<Q, T, F, Fut>(&self, request: &Q, call: F) -> (Vec<T>, Vec<String>)
    where
        Q: Clone,
        F: Fn(TelemetryClient<Channel>, Request<Q>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let me: tonic::metadata::MetadataValue<_> = match self.replica_id.parse() {
            Ok(v) => v,
            Err(_) => return (Vec::new(), Vec::new()),
        };
        let asks = self.others().into_iter().map(|(id, address)| {
            let channel = self.channel(&address);
            let call = &call;
            let mut forwarded = Request::new(request.clone());
            forwarded.metadata_mut().insert(FORWARDED_BY, me.clone());
            async move {
                let Some(channel) = channel else {
                    return Err(id);
                };
                let client = TelemetryClient::new(channel)
                    .max_decoding_message_size(64 << 20);
                match tokio::time::timeout(PEER_TIMEOUT, call(client, forwarded)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(status)) if status.code() == tonic::Code::NotFound => Err(String::new()),
                    Ok(Err(status)) => {
                        tracing::debug!(replica = %id, code = ?status.code(), message = status.message(), "a replica did not give its part");
                        Err(id)
                    }
                    Err(_) => Err(id),
                }
            }
        });
        let mut answers = Vec::new();
        let mut missing = Vec::new();
        for result in join_all(asks).await {
            match result {
                Ok(a) => answers.push(a),
                Err(id) if !id.is_empty() => missing.push(id),
                Err(_) => {}
            }
        }
        (answers, missing)
    }

    /// Each edge's window of `seconds` (merged over replicas unless
    /// `forwarded`), edges filtered by `service` (source or target).
    async fn edges(
        &self,
        seconds: u32,
        service: &str,
        forwarded: bool,
    ) -> (
        BTreeMap<EdgeKey, Window>,
        Vec<String>,
        Vec<String>,
        Vec<GetStatsResponse>,
    ) {
        let filter = |k: &EdgeKey| {
            service.is_empty()
                || matches_service(&k.source, service)
                || matches_service(&k.target, service)
        };
        let mut merged: BTreeMap<EdgeKey, Window> = BTreeMap::new();
        for (k, w) in lock(&self.windows).window(seconds, now_secs(), filter) {
            merged.entry(k).or_default().merge(&w);
        }
        let mut replicas = vec![self.replica_id.clone()];
        let mut missing = Vec::new();
        let mut parts = Vec::new();
        if !forwarded {
            let request = GetStatsRequest {
                window_seconds: seconds,
                service: service.to_owned(),
                raw: true,
            };
            let (answers, gone) = self
                .ask_others(&request, |mut c, r| async move { c.get_stats(r).await })
                .await;
            missing = gone;
            for mut answer in answers {
                replicas.append(&mut answer.replicas);
                for e in std::mem::take(&mut answer.edges) {
                    let (Some(edge), Some(t)) = (&e.edge, &e.traffic) else {
                        continue;
                    };
                    if let Some(w) = Window::from_traffic(t) {
                        merged.entry(EdgeKey::of(edge)).or_default().merge(&w);
                    }
                }
                parts.push(answer);
            }
        }
        (merged, replicas, missing, parts)
    }

    pub async fn stats(
        &self,
        request: &GetStatsRequest,
        forwarded: bool,
    ) -> Result<GetStatsResponse, ApiError> {
        let seconds = window(request.window_seconds)?;
        let (edges, replicas, missing, parts) =
            self.edges(seconds, &request.service, forwarded).await;
        let raw = request.raw;
        let wanted = |ns: &str, name: &str| {
            request.service.is_empty()
                || matches_service(&(ns.to_owned(), name.to_owned()), &request.service)
        };
        let (mut breakers, mut limits) = {
            let g = lock(&self.governance);
            (
                g.breakers(now_secs(), wanted),
                g.limits(seconds, now_secs(), wanted),
            )
        };
        for part in parts {
            breakers.extend(part.breakers);
            for l in part.limits {
                let s = l.service.unwrap_or_default();
                let counts = limits.entry((s.namespace, s.name, l.rule)).or_default();
                for (c, d) in
                    counts
                        .iter_mut()
                        .zip([l.admitted, l.queued, l.rejected, l.shadow_rejected])
                {
                    *c += d;
                }
            }
        }
        let mut services: BTreeMap<(String, String), Window> = BTreeMap::new();
        for (k, w) in &edges {
            if !k.target.1.is_empty()
                && (request.service.is_empty() || matches_service(&k.target, &request.service))
            {
                services.entry(k.target.clone()).or_default().merge(w);
            }
        }
        Ok(GetStatsResponse {
            window_seconds: seconds,
            services: if raw {
                Vec::new()
            } else {
                services
                    .into_iter()
                    .map(|((namespace, name), w)| ServiceStats {
                        service: Some(ServiceRef { namespace, name }),
                        traffic: Some(w.traffic(seconds, false)),
                    })
                    .collect()
            },
            edges: edges
                .into_iter()
                .map(|(k, w)| EdgeStats {
                    edge: Some(k.to_proto()),
                    traffic: Some(w.traffic(seconds, raw)),
                })
                .collect(),
            replicas,
            missing_replicas: missing,
            breakers,
            limits: limits
                .iter()
                .map(|(k, c)| governance::limit_stats(k, *c, seconds))
                .collect(),
        })
    }

    pub async fn topology(
        &self,
        request: &GetTopologyRequest,
    ) -> Result<GetTopologyResponse, ApiError> {
        let seconds = window(request.window_seconds)?;
        let (edges, _, _, _) = self.edges(seconds, "", false).await;
        Ok(topology(&edges, seconds))
    }

    pub async fn list_traces(
        &self,
        request: &ListTracesRequest,
        forwarded: bool,
    ) -> Result<ListTracesResponse, ApiError> {
        let limit = match request.limit {
            0 => 50,
            n if n > MAX_LIST => {
                return Err(ApiError::invalid(
                    "limit",
                    format!("must be at most {MAX_LIST} (got {n})"),
                ))
            }
            n => n,
        };
        let error = match request.outcome.as_str() {
            "" => None,
            "error" => Some(true),
            "ok" => Some(false),
            other => {
                return Err(ApiError::invalid(
                    "outcome",
                    format!("must be \"ok\", \"error\" or empty (got {other:?})"),
                ))
            }
        };
        if request.service.len() > 253 {
            return Err(ApiError::invalid("service", "at most 253 characters"));
        }
        let ms = |v: u64| v.saturating_mul(1_000_000);
        let query = Query {
            service: request.service.clone(),
            error,
            min_duration_nanos: ms(request.min_duration_ms),
            since_nanos: ms(request.since_unix_ms),
            until_nanos: ms(request.until_unix_ms),
            limit: limit as usize,
        };
        let mut found = lock(&self.traces).list(&query);
        if !forwarded {
            let (answers, _) = self
                .ask_others(request, |mut c, r| async move { c.list_traces(r).await })
                .await;
            for a in answers {
                found.extend(a.traces);
            }
            found = merge_summaries(found);
        }
        found.sort_by_key(|s| std::cmp::Reverse(s.start_unix_ms));
        found.truncate(limit as usize);
        Ok(ListTracesResponse { traces: found })
    }

    pub async fn trace(
        &self,
        request: &GetTraceRequest,
        forwarded: bool,
    ) -> Result<GetTraceResponse, ApiError> {
        let id = traces::parse_id(&request.trace_id).ok_or_else(|| {
            ApiError::invalid(
                "trace_id",
                format!("must be 32 hex digits (got {:?})", request.trace_id),
            )
        })?;
        let mut spans = lock(&self.traces).get(&id);
        if !forwarded {
            let (answers, _) = self
                .ask_others(request, |mut c, r| async move { c.get_trace(r).await })
                .await;
            for a in answers {
                spans.extend(a.spans);
            }
            spans.sort_by(|a, b| {
                (a.start_unix_nanos, &a.span_id).cmp(&(b.start_unix_nanos, &b.span_id))
            });
            spans.dedup_by(|a, b| a.span_id == b.span_id && a.trace_id == b.trace_id);
        }
        if spans.is_empty() {
            return Err(ApiError::NotFound(format!(
                "no replica holds trace {}",
                request.trace_id
            )));
        }
        Ok(GetTraceResponse { spans })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A window's length from a request: 0 means [`DEFAULT_WINDOW`].
fn window(seconds: u32) -> Result<u32, ApiError> {
    match seconds {
        0 => Ok(DEFAULT_WINDOW),
        s if s <= MAX_WINDOW => Ok(s),
        s => Err(ApiError::invalid(
            "window_seconds",
            format!("must be at most {MAX_WINDOW} (got {s})"),
        )),
    }
}

/// Whether `(namespace, name)` is `service` (`namespace/name`, or a name
/// in any namespace).
fn matches_service(s: &(String, String), service: &str) -> bool {
    match service.split_once('/') {
        Some((ns, name)) => s.0 == ns && s.1 == name,
        None => s.1 == service,
    }
}

/// Counts a delta in the cluster aggregates: what this replica's agents
/// reported, so the sum over replicas is the cluster's.
fn count_cluster(d: &weir_proto::telemetry::v1::EdgeDelta) {
    let Some(edge) = &d.edge else {
        return;
    };
    let k = EdgeKey::of(edge);
    let o = d.outcomes.unwrap_or_default();
    let source = if k.source.1.is_empty() {
        "unknown".to_owned()
    } else {
        format!("{}/{}", k.source.0, k.source.1)
    };
    let namespace = if k.target.0.is_empty() {
        &k.topic.0
    } else {
        &k.target.0
    };
    for (outcome, n) in [
        ("ok", o.ok),
        ("client_error", o.client_error),
        ("server_error", o.server_error),
        ("limited", o.limited),
        ("rejected", o.rejected),
    ] {
        if n > 0 {
            let labels = [
                ("namespace", namespace.clone()),
                ("service", k.target.1.clone()),
                ("source", source.clone()),
                ("topic", k.topic.1.clone()),
                ("outcome", outcome.to_owned()),
            ];
            metrics::counter!("weir_cluster_requests_total", &labels).increment(n);
        }
    }
}

/// Summaries of one trace from several replicas, as one.
fn merge_summaries(all: Vec<TraceSummary>) -> Vec<TraceSummary> {
    let mut by_id: BTreeMap<String, TraceSummary> = BTreeMap::new();
    for s in all {
        match by_id.get_mut(&s.trace_id) {
            None => {
                by_id.insert(s.trace_id.clone(), s);
            }
            Some(m) => {
                let end = (m.start_unix_ms * 1_000 + m.duration_us)
                    .max(s.start_unix_ms * 1_000 + s.duration_us);
                if s.start_unix_ms < m.start_unix_ms {
                    m.root_name = s.root_name.clone();
                }
                m.start_unix_ms = m.start_unix_ms.min(s.start_unix_ms);
                m.duration_us = end.saturating_sub(m.start_unix_ms * 1_000);
                m.spans += s.spans;
                m.error |= s.error;
                m.services.extend(s.services);
                m.services.sort();
                m.services.dedup();
            }
        }
    }
    by_id.into_values().collect()
}

/// The graph of `edges`: services and topics as nodes; a request is
/// source → target, a publish source → topic, a delivery topic → target
/// (over every publisher).
pub fn topology(edges: &BTreeMap<EdgeKey, Window>, seconds: u32) -> GetTopologyResponse {
    let service_id = |(ns, name): &(String, String)| {
        if name.is_empty() {
            "service:unknown".to_owned()
        } else {
            format!("service:{ns}/{name}")
        }
    };
    let topic_id = |(ns, name): &(String, String)| format!("topic:{ns}/{name}");
    let mut nodes: BTreeMap<String, TopologyNode> = BTreeMap::new();
    let mut node = |id: String, kind: &str, (ns, name): &(String, String)| {
        nodes.entry(id.clone()).or_insert_with(|| TopologyNode {
            id,
            kind: kind.to_owned(),
            name: if name.is_empty() {
                "unknown".into()
            } else {
                name.clone()
            },
            namespace: ns.clone(),
        });
    };
    let mut links: BTreeMap<(String, String), Window> = BTreeMap::new();
    for (k, w) in edges {
        let has_topic = !k.topic.1.is_empty();
        let has_target = !k.target.1.is_empty();
        let source = service_id(&k.source);
        node(source.clone(), "service", &k.source);
        let pairs: Vec<(String, String)> = match (has_topic, has_target) {
            (false, _) => {
                let target = service_id(&k.target);
                node(target.clone(), "service", &k.target);
                vec![(source, target)]
            }
            (true, false) => {
                let topic = topic_id(&k.topic);
                node(topic.clone(), "topic", &k.topic);
                vec![(source, topic)]
            }
            (true, true) => {
                let (topic, target) = (topic_id(&k.topic), service_id(&k.target));
                node(topic.clone(), "topic", &k.topic);
                node(target.clone(), "service", &k.target);
                vec![(topic, target)]
            }
        };
        for pair in pairs {
            links.entry(pair).or_default().merge(w);
        }
    }
    GetTopologyResponse {
        nodes: nodes.into_values().collect(),
        edges: links
            .into_iter()
            .map(|((from, to), w)| {
                let t = w.traffic(seconds, false);
                TopologyEdge {
                    from,
                    to,
                    rate_per_second: t.rate_per_second,
                    error_ratio: t.error_ratio,
                    p99_seconds: t.p99_seconds,
                }
            })
            .collect(),
    }
}

/// The gRPC service over a replica's [`TelemetryState`].
#[derive(Debug, Clone)]
pub struct TelemetryService {
    state: Arc<TelemetryState>,
}

impl TelemetryService {
    pub fn new(state: Arc<TelemetryState>) -> Self {
        Self { state }
    }
}

fn forwarded<T>(r: &Request<T>) -> bool {
    r.metadata().get(FORWARDED_BY).is_some()
}

type AckStream = Pin<Box<dyn Stream<Item = Result<ReportAck, Status>> + Send>>;

#[tonic::async_trait]
impl Telemetry for TelemetryService {
    type ReportStream = AckStream;

    async fn report(
        &self,
        request: Request<tonic::Streaming<Batch>>,
    ) -> Result<Response<AckStream>, Status> {
        let mut inbound = request.into_inner();
        let state = self.state.clone();
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(async move {
            while let Some(next) = inbound.next().await {
                let batch = match next {
                    Ok(b) => b,
                    Err(status) => {
                        tracing::debug!(code = ?status.code(), message = status.message(), "a report stream ended");
                        return;
                    }
                };
                let seq = batch.seq;
                state.ingest(batch);
                if tx.send(Ok(ReportAck { seq })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn list_traces(
        &self,
        request: Request<ListTracesRequest>,
    ) -> Result<Response<ListTracesResponse>, Status> {
        let f = forwarded(&request);
        Ok(Response::new(
            self.state.list_traces(request.get_ref(), f).await?,
        ))
    }

    async fn get_trace(
        &self,
        request: Request<GetTraceRequest>,
    ) -> Result<Response<GetTraceResponse>, Status> {
        let f = forwarded(&request);
        Ok(Response::new(self.state.trace(request.get_ref(), f).await?))
    }

    async fn get_stats(
        &self,
        request: Request<GetStatsRequest>,
    ) -> Result<Response<GetStatsResponse>, Status> {
        let f = forwarded(&request);
        Ok(Response::new(self.state.stats(request.get_ref(), f).await?))
    }

    async fn get_topology(
        &self,
        request: Request<GetTopologyRequest>,
    ) -> Result<Response<GetTopologyResponse>, Status> {
        Ok(Response::new(self.state.topology(request.get_ref()).await?))
    }
}

#[cfg(test)]
mod tests {
    use weir_core::sketch::Sketch;
    use weir_proto::telemetry::v1::{EdgeDelta, Outcomes};

    use super::*;

    fn key(source: &str, target: &str, topic: &str) -> EdgeKey {
        let pair = |s: &str| {
            if s.is_empty() {
                Default::default()
            } else {
                ("shop".to_owned(), s.to_owned())
            }
        };
        EdgeKey {
            source: pair(source),
            target: pair(target),
            topic: pair(topic),
        }
    }

    fn win(ok: u64, err: u64) -> Window {
        let mut w = Window::default();
        w.counts.outcomes = [ok, 0, err, 0, 0];
        for _ in 0..ok + err {
            w.counts.latency.insert(0.01);
        }
        w
    }

    #[test]
    fn topology_links_publishers_topics_and_subscribers() {
        let mut edges = BTreeMap::new();
        edges.insert(key("web", "orders", ""), win(60, 0));
        edges.insert(key("orders", "", "placed"), win(30, 0));
        edges.insert(key("orders", "billing", "placed"), win(27, 3));
        edges.insert(key("", "billing", "placed"), win(10, 0));
        let t = topology(&edges, 60);
        let ids: Vec<&str> = t.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "service:shop/billing",
                "service:shop/orders",
                "service:shop/web",
                "service:unknown",
                "topic:shop/placed"
            ]
        );
        let link = |from: &str, to: &str| {
            t.edges
                .iter()
                .find(|e| e.from == from && e.to == to)
                .cloned()
                .expect("edge")
        };
        assert!(
            (link("service:shop/web", "service:shop/orders").rate_per_second - 1.0).abs() < 1e-9
        );
        assert!(
            (link("service:shop/orders", "topic:shop/placed").rate_per_second - 0.5).abs() < 1e-9
        );
        // Deliveries from both publishers, as one edge.
        let d = link("topic:shop/placed", "service:shop/billing");
        assert!((d.rate_per_second - 40.0 / 60.0).abs() < 1e-9);
        assert!((d.error_ratio - 3.0 / 40.0).abs() < 1e-9);
        assert_eq!(t.edges.len(), 3);
    }

    #[test]
    fn summaries_of_one_trace_from_several_replicas_merge() {
        let a = TraceSummary {
            trace_id: "t".into(),
            root_name: "publish placed".into(),
            services: vec!["shop/orders".into()],
            start_unix_ms: 1_000,
            duration_us: 2_000,
            spans: 2,
            error: false,
        };
        let b = TraceSummary {
            root_name: "deliver placed".into(),
            services: vec!["shop/billing".into()],
            start_unix_ms: 1_001,
            duration_us: 5_000,
            spans: 3,
            error: true,
            ..a.clone()
        };
        let m = merge_summaries(vec![b, a]);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].root_name, "publish placed");
        assert_eq!(m[0].duration_us, 6_000);
        assert_eq!(m[0].spans, 5);
        assert!(m[0].error);
        assert_eq!(m[0].services, ["shop/billing", "shop/orders"]);
    }

    #[test]
    fn bad_requests_name_their_field() {
        assert!(window(0).is_ok());
        let e = super::window(901).expect_err("too long");
        assert!(e.to_string().contains("window_seconds"), "{e}");
        let mut sketch = Sketch::default();
        sketch.insert(0.1);
        let ok = EdgeDelta {
            edge: Some(key("web", "orders", "").to_proto()),
            outcomes: Some(Outcomes {
                ok: 1,
                ..Outcomes::default()
            }),
            retries: 0,
            latency: Some(sketch.to_proto()),
        };
        assert!(Windows::check(&[ok]).is_ok());
    }
}
