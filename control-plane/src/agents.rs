//! `weir.agent.v1.AgentSessionService`: one bidirectional stream per agent.
//!
//! The session is an etcd lease held while a stream is open: the agent's
//! record (`{root}/v1/agents/{node}`) and its acknowledgements
//! (`{root}/v1/acks/{ns}/{svc}/{node}`) hang on it, and so do the outliers
//! it reports (`{root}/v1/outliers/{node}/{ns}/{svc}/{id}`, see
//! [`crate::outliers`]). A replica serving the
//! stream renews the lease every TTL/3; an agent that reconnects (to any
//! replica) before it expires keeps the same lease, so its acknowledgements
//! survive the move. When no stream renews it, the lease expires and the
//! agent leaves the convergence counts.
//!
//! Besides the leased records, each node has an unleased last-seen record
//! (`{root}/v1/agents-seen/{node}`), so `ListAgents` shows a node whose
//! session expired as "disconnected since". It is written when a stream
//! opens, when the agent reports a status change and when the stream
//! closes, and not when the lease is renewed: a renewal is a lease
//! keep-alive, which etcd neither logs nor watches, while a put every
//! TTL/3 per agent would be a revision in etcd's log and an event on every
//! replica's watch (300 writes/s for 1,000 agents) to move a timestamp
//! nobody needs finer than "connected". `sweep` marks the records of
//! streams that ended without a close and drops them after the retention.
//!
//! - `streams`: this replica's open streams and the requests waiting on
//!   them (AskAgent's local half).
//! - `api`: `weir.agent.v1.Agents` (ListAgents, AskAgent with forwarding).
//! - `sweep`: upkeep of the last-seen records.

pub(crate) mod api;
mod streams;
mod sweep;

pub use api::AgentsApi;
pub use streams::LocalStreams;
pub use sweep::{Sweeper, DEFAULT_RETENTION};

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weir_proto::{
    agent::v1::{
        agent_message, agent_session_service_server::AgentSessionService, control_message, Ack,
        AgentMessage, AgentRecord, AgentStatus, BucketDemand, ControlMessage, Hello, LimitDemand,
        Outlier, Outliers, Welcome,
    },
    policy::v1::AgentPolicyState,
};

use weir_core::{policy::sections, time::now_unix_ms, validate, InstanceKey};

use crate::{
    error::ApiError,
    hub::{Filter, Hub},
    keys::Keys,
    store::{LeaseId, Store, StoreError},
};

/// Session lease TTL.
pub const SESSION_TTL: Duration = Duration::from_secs(10);
/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_ERROR_LEN: usize = 1024;
/// Largest message an agent may send on its stream (a reply to a request
/// can list every policy it runs).
pub const MAX_SESSION_MESSAGE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug)]
pub struct SessionService {
    store: Arc<dyn Store>,
    hub: Hub,
    keys: Keys,
    replica_id: String,
    /// The gRPC address this replica advertises (where AskAgent is
    /// forwarded to reach the streams it holds).
    advertise_addr: String,
    streams: LocalStreams,
}

/// The lease of `node`'s live agent session, if it has one: the lease its
/// agent record hangs on, which also holds the instances registered on the
/// node's behalf (`RegisterRequest.agent_node`).
pub(crate) async fn session_lease(
    store: &dyn Store,
    keys: &Keys,
    node: &str,
) -> Result<Option<LeaseId>, StoreError> {
    Ok(store
        .get(&keys.agent(node))
        .await?
        .map(|kv| kv.lease)
        .filter(|lease| *lease != 0))
}

fn check_hello(h: &Hello) -> Result<(), ApiError> {
    validate::instance_id("hello.node_id", &h.node_id)?;
    validate::short_text("hello.zone", &h.zone)?;
    validate::short_text("hello.version", &h.version)?;
    if h.ingress_address.len() > 255 || !h.ingress_address.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid(
            "hello.ingress_address",
            "must be at most 255 printable ASCII characters without spaces",
        ));
    }
    validate::namespace_filter(&h.namespace)?;
    Ok(())
}

fn text_bound(field: &str, value: &str) -> Result<(), ApiError> {
    if value.len() > MAX_ERROR_LEN {
        return Err(ApiError::invalid(
            field,
            format!("at most {MAX_ERROR_LEN} bytes"),
        ));
    }
    Ok(())
}

/// Checks an acknowledgement; returns its service's (namespace, name).
fn check_ack(ack: &Ack) -> Result<(String, String), ApiError> {
    let name = validate::service_name(&ack.namespace, &ack.service)?;
    text_bound("ack.error", &ack.error)?;
    sections::unenforced("ack.unenforced", &ack.unenforced)?;
    if !ack.accepted && !ack.unenforced.is_empty() {
        return Err(ApiError::invalid(
            "ack.unenforced",
            "only with accepted = true (a rejected version is not enforced at all)",
        ));
    }
    Ok(name)
}

/// The most outliers one report may carry.
pub const MAX_OUTLIERS: usize = 10_000;

/// Checks an outlier report: each instance named by valid names, a known
/// kind, a bounded reason, no instance twice.
fn check_outliers(
    report: &Outliers,
) -> Result<std::collections::BTreeMap<InstanceKey, Outlier>, ApiError> {
    if report.outliers.len() > MAX_OUTLIERS {
        return Err(ApiError::invalid(
            "outliers.outliers",
            format!("at most {MAX_OUTLIERS}"),
        ));
    }
    let mut set = std::collections::BTreeMap::new();
    for (i, o) in report.outliers.iter().enumerate() {
        let field = |f: &str| format!("outliers.outliers[{i}].{f}");
        validate::service_name(&o.namespace, &o.service)?;
        validate::instance_id(&field("instance_id"), &o.instance_id)?;
        if !matches!(o.kind.as_str(), "ejected" | "breaker") {
            return Err(ApiError::invalid(
                field("kind"),
                "must be \"ejected\" or \"breaker\"",
            ));
        }
        text_bound(&field("reason"), &o.reason)?;
        let key = InstanceKey {
            namespace: o.namespace.clone(),
            service: o.service.clone(),
            instance_id: o.instance_id.clone(),
        };
        if set.insert(key, o.clone()).is_some() {
            return Err(ApiError::invalid(
                field("instance_id"),
                "names an instance reported already",
            ));
        }
    }
    Ok(set)
}

/// The most buckets one demand report may carry.
pub const MAX_DEMAND_BUCKETS: usize = 1_000;

/// (namespace, service, rule).
type Bucket = (String, String, String);

/// Checks a demand report: valid names, rates of 0-1e9, no bucket twice.
fn check_demand(report: &LimitDemand) -> Result<std::collections::BTreeMap<Bucket, f64>, ApiError> {
    if report.buckets.len() > MAX_DEMAND_BUCKETS {
        return Err(ApiError::invalid(
            "demand.buckets",
            format!("at most {MAX_DEMAND_BUCKETS}"),
        ));
    }
    let mut set = std::collections::BTreeMap::new();
    for (i, b) in report.buckets.iter().enumerate() {
        let field = |f: &str| format!("demand.buckets[{i}].{f}");
        validate::service_name(&b.namespace, &b.service)?;
        validate::dns_label(&field("rule"), &b.rule)?;
        let rate = b.requests_per_second;
        if !(rate.is_finite() && (0.0..=1e9).contains(&rate)) {
            return Err(ApiError::invalid(
                field("requests_per_second"),
                "must be 0-1e9",
            ));
        }
        let key = (b.namespace.clone(), b.service.clone(), b.rule.clone());
        if set.insert(key, rate).is_some() {
            return Err(ApiError::invalid(
                field("rule"),
                "names a bucket reported already",
            ));
        }
    }
    Ok(set)
}

/// A demand report in this many is checked against the store.
const DEMAND_REFRESH: u64 = 5;

/// Whether a demand moved enough from what was written to write it again:
/// by a tenth, or to or from nothing.
fn moved(written: f64, now: f64) -> bool {
    (written == 0.0) != (now == 0.0) || (now - written).abs() > 0.1 * written.max(1.0)
}

fn check_status(status: &AgentStatus) -> Result<(), ApiError> {
    text_bound("status.reason", &status.reason)
}

impl SessionService {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Hub,
        keys: Keys,
        replica_id: String,
        advertise_addr: String,
        streams: LocalStreams,
    ) -> Self {
        Self {
            store,
            hub,
            keys,
            replica_id,
            advertise_addr,
            streams,
        }
    }

    /// Takes over the node's live lease, or grants a new one. Returns the
    /// lease and whether it was taken over.
    async fn lease_for(&self, node: &str) -> Result<(LeaseId, bool), ApiError> {
        if let Some(kv) = self.store.get(&self.keys.agent(node)).await? {
            if kv.lease != 0 && self.store.keep_alive(kv.lease).await?.is_some() {
                return Ok((kv.lease, true));
            }
        }
        Ok((self.store.grant_lease(SESSION_TTL).await?.id, false))
    }

    async fn record_ack(&self, node: &str, lease: LeaseId, ack: Ack) -> Result<(), ApiError> {
        let (namespace, service) = check_ack(&ack)?;
        let state = AgentPolicyState {
            node_id: node.to_owned(),
            version: ack.version,
            accepted: ack.accepted,
            error: ack.error,
            at_unix_ms: now_unix_ms(),
            unenforced: ack.unenforced,
        };
        self.store
            .put(
                &self.keys.ack(&namespace, &service, node),
                state.encode_to_vec(),
                Some(lease),
            )
            .await?;
        if !state.accepted {
            tracing::warn!(node, %namespace, %service, version = state.version, error = %state.error, "agent rejected a policy");
        } else if !state.unenforced.is_empty() {
            tracing::info!(node, %namespace, %service, version = state.version, unenforced = ?state.unenforced, "agent applied a policy in part");
        }
        Ok(())
    }

    /// Keeps the outliers `node`'s agent reported, on its session's lease:
    /// writes those new or changed since `last` and deletes those it no
    /// longer reports. `last` is `None` on a stream's first report: then
    /// whatever an earlier stream of the node left is read and replaced.
    async fn record_outliers(
        &self,
        node: &str,
        lease: LeaseId,
        report: Outliers,
        last: &mut Option<std::collections::BTreeMap<InstanceKey, Outlier>>,
    ) -> Result<(), ApiError> {
        let now = check_outliers(&report)?;
        let before = match last.take() {
            Some(before) => before,
            None => {
                let prefix = self.keys.outliers_prefix(Some(node));
                let mut before = std::collections::BTreeMap::new();
                for kv in self.store.range(&prefix).await?.kvs {
                    if let Some((_, key)) = self.keys.parse_outlier(&kv.key) {
                        before.insert(
                            key,
                            Outlier::decode(kv.value.as_slice()).unwrap_or_default(),
                        );
                    }
                }
                before
            }
        };
        for (key, o) in &now {
            if before.get(key) != Some(o) {
                self.store
                    .put(
                        &self.keys.outlier(node, key),
                        o.encode_to_vec(),
                        Some(lease),
                    )
                    .await?;
            }
        }
        for key in before.keys().filter(|k| !now.contains_key(*k)) {
            self.store.delete(&self.keys.outlier(node, key)).await?;
        }
        if now.len() != before.len() || now.keys().ne(before.keys()) {
            tracing::info!(node, outliers = now.len(), "agent outliers");
        }
        *last = Some(now);
        Ok(())
    }

    /// Keeps `node`'s demand on GLOBAL rate limits ([`crate::quota`]) on
    /// its session's lease: a bucket's demand is written when it is new
    /// or moved by a tenth since last written (`written`), and deleted when
    /// no longer reported. `written` is `None` on a stream's first report:
    /// then what an earlier stream left is read and replaced. Every
    /// [`DEMAND_REFRESH`]th report rewrites it all, in case the end of an
    /// earlier stream of the node (on another replica) deleted it.
    async fn record_demand(
        &self,
        node: &str,
        lease: LeaseId,
        report: LimitDemand,
        written: &mut Option<std::collections::BTreeMap<Bucket, f64>>,
        reports: &mut u64,
    ) -> Result<(), ApiError> {
        let now = check_demand(&report)?;
        *reports += 1;
        let mut before = match written.take() {
            Some(_) if (*reports).is_multiple_of(DEMAND_REFRESH) => self.read_demand(node).await?,
            Some(before) => before,
            None => self.read_demand(node).await?,
        };
        for ((ns, svc, rule), rate) in &now {
            let key = (ns.clone(), svc.clone(), rule.clone());
            if before.get(&key).is_some_and(|w| !moved(*w, *rate)) {
                continue;
            }
            let demand = BucketDemand {
                namespace: ns.clone(),
                service: svc.clone(),
                rule: rule.clone(),
                requests_per_second: *rate,
            };
            self.store
                .put(
                    &self.keys.demand(node, ns, svc, rule),
                    demand.encode_to_vec(),
                    Some(lease),
                )
                .await?;
            before.insert(key, *rate);
        }
        let gone: Vec<Bucket> = before
            .keys()
            .filter(|k| !now.contains_key(*k))
            .cloned()
            .collect();
        for (ns, svc, rule) in gone {
            self.store
                .delete(&self.keys.demand(node, &ns, &svc, &rule))
                .await?;
            before.remove(&(ns, svc, rule));
        }
        *written = Some(before);
        Ok(())
    }

    /// What demand of `node` the store holds.
    async fn read_demand(
        &self,
        node: &str,
    ) -> Result<std::collections::BTreeMap<Bucket, f64>, ApiError> {
        let mut out = std::collections::BTreeMap::new();
        for kv in self
            .store
            .range(&self.keys.demand_prefix(Some(node)))
            .await?
            .kvs
        {
            if let (Some((_, bucket)), Ok(d)) = (
                self.keys.parse_demand(&kv.key),
                BucketDemand::decode(kv.value.as_slice()),
            ) {
                out.insert(bucket, d.requests_per_second);
            }
        }
        Ok(out)
    }

    /// The stream of `node` ended: its demand goes at once (its share goes
    /// back to the others), unless a newer stream of the node is open.
    async fn forget_demand(&self, node: &str) -> Result<(), ApiError> {
        if self.streams.get(node).is_some() {
            return Ok(());
        }
        for (ns, svc, rule) in self.read_demand(node).await?.into_keys() {
            self.store
                .delete(&self.keys.demand(node, &ns, &svc, &rule))
                .await?;
        }
        Ok(())
    }

    /// Writes the node's last-seen record: `record` as of now.
    async fn record_seen(&self, mut record: AgentRecord) -> Result<(), ApiError> {
        record.last_seen_unix_ms = now_unix_ms();
        self.store
            .put(
                &self.keys.agent_seen(&record.node_id),
                record.encode_to_vec(),
                None,
            )
            .await?;
        Ok(())
    }

    /// Records a status report in the last-seen record `seen` of this
    /// stream. A report that changes nothing writes nothing, so an agent
    /// repeating itself costs no store write.
    async fn record_status(
        &self,
        seen: &mut AgentRecord,
        status: AgentStatus,
    ) -> Result<(), ApiError> {
        check_status(&status)?;
        if seen.status.as_ref() == Some(&status) {
            return Ok(());
        }
        tracing::info!(
            node = %seen.node_id,
            degraded = status.degraded,
            reason = %status.reason,
            local_instances = status.local_instances,
            endpoints = status.endpoints,
            "agent status"
        );
        seen.status = Some(status);
        self.record_seen(seen.clone()).await
    }

    /// Records that the stream `seen` describes (the last-seen record it
    /// last wrote) has ended, unless the node's session already belongs to
    /// a newer stream (it reconnected, here or elsewhere, before this end
    /// was noticed).
    async fn record_closed(&self, mut seen: AgentRecord) -> Result<(), ApiError> {
        if let Some(kv) = self.store.get(&self.keys.agent(&seen.node_id)).await? {
            let live = AgentRecord::decode(kv.value.as_slice()).unwrap_or_default();
            if live.connected_at_unix_ms != seen.connected_at_unix_ms
                || live.replica_id != seen.replica_id
            {
                return Ok(());
            }
        }
        seen.connected = false;
        self.record_seen(seen).await
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn message(kind: control_message::Kind) -> Result<ControlMessage, Status> {
    Ok(ControlMessage { kind: Some(kind) })
}

type Outbound = mpsc::Receiver<Result<ControlMessage, Status>>;

impl SessionService {
    /// Opens the session of an agent that said Hello: takes over or grants
    /// its lease, records it, and starts the tasks that feed the stream.
    async fn open(
        &self,
        hello: Hello,
        mut inbound: Streaming<AgentMessage>,
    ) -> Result<Outbound, ApiError> {
        check_hello(&hello)?;
        if !self.hub.is_ready() {
            return Err(ApiError::NotReady);
        }
        let node = hello.node_id.clone();
        let (lease, resumed) = self.lease_for(&node).await?;
        let session = AgentRecord {
            node_id: node.clone(),
            zone: hello.zone.clone(),
            version: hello.version.clone(),
            ingress_address: hello.ingress_address.clone(),
            replica_id: self.replica_id.clone(),
            replica_address: self.advertise_addr.clone(),
            connected_at_unix_ms: now_unix_ms(),
            ..AgentRecord::default()
        };
        self.store
            .put(
                &self.keys.agent(&node),
                session.encode_to_vec(),
                Some(lease),
            )
            .await?;
        // A status is reported anew on every stream, so none is carried
        // over from an earlier one.
        let mut seen = AgentRecord {
            connected: true,
            ..session
        };
        self.record_seen(seen.clone()).await?;
        tracing::info!(node, resumed, lease, "agent session opened");

        let (tx, rx) = mpsc::channel::<Result<ControlMessage, Status>>(64);
        tx.send(message(control_message::Kind::Welcome(Welcome {
            replica_id: self.replica_id.clone(),
            lease_ttl_seconds: u32::try_from(SESSION_TTL.as_secs()).unwrap_or(10),
            resumed_session: resumed,
        })))
        .await
        .map_err(|_| ApiError::Cancelled("agent left"))?;
        let stream = self.streams.open(&node, tx.clone());

        // Registry and policy streams, multiplexed onto the one response.
        let mut registry = self.hub.subscribe(
            Filter {
                namespace: hello.namespace.clone(),
                service: String::new(),
            },
            hello.registry_revision,
        );
        let mut policies = self.hub.subscribe_policies(hello.policy_revision);
        let out = tx.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    r = registry.recv() => r.map(control_message::Kind::Registry),
                    p = policies.recv() => p.map(control_message::Kind::Policies),
                };
                let Some(kind) = next else { return };
                if out.send(message(kind)).await.is_err() {
                    return;
                }
            }
        });

        // Keep the lease alive while the agent is connected.
        let store = self.store.clone();
        let out = tx.clone();
        let keeper_node = node.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SESSION_TTL / 3);
            every.tick().await;
            loop {
                tokio::select! {
                    _ = out.closed() => return,
                    _ = every.tick() => {}
                }
                match store.keep_alive(lease).await {
                    Ok(Some(_)) => {}
                    Ok(None) => {
                        tracing::warn!(
                            node = keeper_node,
                            "agent session lease lost; closing the stream"
                        );
                        let _ = out
                            .send(Err(
                                ApiError::Unavailable("session lease lost; reconnect").into()
                            ))
                            .await;
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(node = keeper_node, error = %e, "renewing the agent session failed")
                    }
                }
            }
        });

        // What the agent sends: acknowledgements, status, replies, outliers.
        let service = self.clone();
        tokio::spawn(async move {
            let mut outliers = None;
            let mut demand = None;
            let mut demand_reports = 0;
            while let Some(message) = inbound.next().await {
                let outcome = match message {
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Ack(ack)),
                    }) => service.record_ack(&node, lease, ack).await,
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Status(status)),
                    }) => service.record_status(&mut seen, status).await,
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Demand(report)),
                    }) => {
                        service
                            .record_demand(&node, lease, report, &mut demand, &mut demand_reports)
                            .await
                    }
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Outliers(report)),
                    }) => {
                        service
                            .record_outliers(&node, lease, report, &mut outliers)
                            .await
                    }
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Reply(reply)),
                    }) => {
                        let id = reply.request_id;
                        if !stream.answer(reply) {
                            tracing::debug!(
                                node,
                                request_id = id,
                                "reply to no waiting request (it gave up)"
                            );
                        }
                        Ok(())
                    }
                    Ok(AgentMessage {
                        kind: Some(agent_message::Kind::Hello(_)),
                    }) => Err(ApiError::invalid(
                        "hello",
                        "sent once, at the start of the stream",
                    )),
                    Ok(AgentMessage { kind: None }) => {
                        Err(ApiError::invalid("kind", "is required"))
                    }
                    Err(status) => {
                        // Gone, or a message that does not decode: tell it
                        // why (if it still listens).
                        tracing::debug!(node, error = %status, "agent stream ended");
                        let _ = tx.send(Err(status)).await;
                        break;
                    }
                };
                if let Err(e) = outcome {
                    let _ = tx.send(Err(e.into())).await;
                    break;
                }
            }
            service.streams.close(&node, &stream);
            if let Err(e) = service.forget_demand(&node).await {
                tracing::warn!(node, error = %e, "could not drop the demand of an ended agent stream");
            }
            if let Err(e) = service.record_closed(seen).await {
                tracing::warn!(node, error = %e, "could not record the end of an agent stream");
            }
            tracing::info!(
                node,
                "agent session stream closed; the lease expires unless it reconnects"
            );
        });
        Ok(rx)
    }
}

#[tonic::async_trait]
impl AgentSessionService for SessionService {
    type SessionStream = BoxStream<ControlMessage>;

    async fn session(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Ok(Some(Ok(AgentMessage {
                kind: Some(agent_message::Kind::Hello(h)),
            }))) => h,
            // The stream's own failure (e.g. an undecodable message), as
            // tonic reported it.
            Ok(Some(Err(status))) => return Err(status),
            Ok(_) => {
                return Err(ApiError::invalid("hello", "the first message must be a Hello").into())
            }
            Err(_) => {
                return Err(ApiError::invalid(
                    "hello",
                    format!("must be sent within {HELLO_TIMEOUT:?}"),
                )
                .into())
            }
        };
        let rx = self.open(hello, inbound).await?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlier(id: &str) -> Outlier {
        Outlier {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
            kind: "breaker".into(),
            reason: "3 failures in a row".into(),
            since_unix_ms: 1,
        }
    }

    fn field_of(e: ApiError) -> String {
        Status::from(e).message().to_owned()
    }

    #[test]
    fn outlier_reports_name_what_is_wrong() {
        let good = Outliers {
            outliers: vec![outlier("o1"), outlier("o2")],
        };
        assert_eq!(check_outliers(&good).expect("valid").len(), 2);
        let twice = Outliers {
            outliers: vec![outlier("o1"), outlier("o1")],
        };
        let e = field_of(check_outliers(&twice).expect_err("a repeat"));
        assert!(e.contains("outliers.outliers[1].instance_id"), "{e}");
        let kind = Outliers {
            outliers: vec![Outlier {
                kind: "slow".into(),
                ..outlier("o1")
            }],
        };
        let e = field_of(check_outliers(&kind).expect_err("a kind"));
        assert!(e.contains("outliers.outliers[0].kind"), "{e}");
        let long = Outliers {
            outliers: vec![Outlier {
                reason: "x".repeat(MAX_ERROR_LEN + 1),
                ..outlier("o1")
            }],
        };
        let e = field_of(check_outliers(&long).expect_err("a long reason"));
        assert!(e.contains("outliers.outliers[0].reason"), "{e}");
        let many = Outliers {
            outliers: (0..=MAX_OUTLIERS)
                .map(|n| outlier(&format!("o{n}")))
                .collect(),
        };
        assert!(check_outliers(&many).is_err());
        let bad_id = Outliers {
            outliers: vec![outlier("a/b")],
        };
        assert!(check_outliers(&bad_id).is_err());
    }
}
