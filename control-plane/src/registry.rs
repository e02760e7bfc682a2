//! The `weir.registry.v1.Registry` gRPC service.
//!
//! Writes go to the store (linearizable); reads are served from the replica's
//! hub cache, with `min_revision` for read-your-writes.
//!
//! Instances registered on behalf of a node (`RegisterRequest.agent_node`)
//! hang on that node's agent-session lease instead of a lease of their own:
//! they are never renewed through `Heartbeat`, never take a lease down with
//! them when they leave, and have their health reported by their agent
//! (`ReportHealth`), not checked by the replicas.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
use futures::Stream;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::{wrappers::ReceiverStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use weir_core::{
    health::{self, checker::Transition},
    time::now_unix_ms,
    validate, InstanceKey,
};
use weir_proto::registry::v1::{
    keep_alive_response, registry_server::Registry, DeregisterRequest, DeregisterResponse,
    GetHealthRequest, GetHealthResponse, GetServiceConfigRequest, GetServiceConfigResponse,
    GetServiceRequest, GetServiceResponse, HealthHistory, HealthStatus, HeartbeatRequest,
    HeartbeatResponse, Instance, InstanceHealth, InstanceRef, KeepAliveRequest, KeepAliveResponse,
    ListServicesRequest, ListServicesResponse, RegisterRequest, RegisterResponse,
    ReportHealthRequest, ReportHealthResponse, Service, ServiceConfig, ServiceSummary,
    SetServiceConfigRequest, SetServiceConfigResponse, WatchRequest, WatchResponse,
};

use crate::{
    agents::session_lease,
    checks::{Recorded, StoreSink, WriteError, Writer},
    error::ApiError,
    hub::{decode_instance, Filter, Hub},
    keys::Keys,
    store::{KeyValue, LeaseId, Store, StoreError},
};

/// How long a read waits for `min_revision`.
const MIN_REVISION_WAIT: Duration = Duration::from_secs(5);
const DEFAULT_PAGE_SIZE: u32 = 100;
const MAX_PAGE_SIZE: u32 = 1000;
/// Longest `HealthDetail.reason` an agent may report.
const MAX_REASON_BYTES: usize = 1024;

/// The registry service of one replica.
#[derive(Clone, Debug)]
pub struct RegistryService {
    store: Arc<dyn Store>,
    hub: Hub,
    keys: Keys,
    /// Highest revision this replica has written: registrations wait for the
    /// cache to reach it, so a caller's own earlier writes are seen.
    last_write: Arc<AtomicU64>,
    /// Where agents' health reports are written: the checker's own path.
    verdicts: Arc<StoreSink>,
}

fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The caller-settable part of a record, for idempotency checks.
fn spec_of(i: &Instance) -> Instance {
    Instance {
        status: 0,
        revision: 0,
        registered_at_unix_ms: 0,
        lease_id: 0,
        health: None,
        ..i.clone()
    }
}

fn ttl_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn no_session(node: &str) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "node {node:?} has no live agent session; its agent must open one (AgentSessionService/Session) first"
    ))
}

fn held_by_agent(key: &InstanceKey, node: &str) -> ApiError {
    ApiError::FailedPrecondition(format!(
        "{key} is held by the agent session of node {node:?}, which keeps it alive; heartbeat it through that agent"
    ))
}

/// Whether a stored record replaced by a write was held by an agent
/// session: its lease is then the session's and must outlive it. A record
/// that does not decode is treated as held (its lease is left to expire).
fn held_by_session(prev: &KeyValue) -> bool {
    Instance::decode(prev.value.as_slice()).map_or(true, |i| !i.agent_node.is_empty())
}

impl RegistryService {
    pub fn new(store: Arc<dyn Store>, hub: Hub, keys: Keys) -> Self {
        Self {
            verdicts: Arc::new(StoreSink::new(store.clone(), keys.clone())),
            store,
            hub,
            keys,
            last_write: Arc::default(),
        }
    }

    /// The lease of `node`'s live agent session.
    async fn session_of(&self, node: &str) -> Result<LeaseId, ApiError> {
        session_lease(self.store.as_ref(), &self.keys, node)
            .await?
            .ok_or_else(|| no_session(node))
    }

    /// Reads the stored record (not the cache): writes decide on the truth.
    async fn stored(&self, key: &InstanceKey) -> Result<Option<Instance>, ApiError> {
        let Some(kv) = self.store.get(&self.keys.instance(key)).await? else {
            return Ok(None);
        };
        match decode_instance(key, &kv.value, kv.mod_revision) {
            Ok(i) => Ok(Some(i)),
            Err(e) => {
                // A record we cannot read is replaced by the next write.
                tracing::warn!(instance = %key, error = %e, "undecodable instance record");
                Ok(None)
            }
        }
    }

    /// Registers one instance, directly or (with a non-empty `agent_node`)
    /// on behalf of that node's agent session; returns the stored record
    /// and the lease TTL (for a session-held instance, its own TTL, which
    /// its agent enforces).
    pub async fn register(
        &self,
        instance: Option<&Instance>,
        agent_node: &str,
    ) -> Result<(Instance, u32), ApiError> {
        let (mut instance, session) = if agent_node.is_empty() {
            (validate::registration(instance)?, None)
        } else {
            let instance = validate::session_registration(instance, agent_node)?;
            (instance, Some(self.session_of(agent_node).await?))
        };
        if instance.instance_id.is_empty() {
            instance.instance_id = new_instance_id();
        }
        let key = InstanceKey {
            namespace: instance.namespace.clone(),
            service: instance.service.clone(),
            instance_id: instance.instance_id.clone(),
        };
        // The cache decides idempotency and keeps `registered_at`; the write
        // itself returns the record it replaced, which decides which old
        // lease to revoke. So a registration is one lease grant and one put.
        let seen = self.last_write.load(Ordering::Acquire);
        let cached = if self.hub.wait_for(seen, MIN_REVISION_WAIT).await {
            self.hub.instance(&key)
        } else {
            self.stored(&key).await?.map(Arc::new)
        };
        if let Some(old) = &cached {
            if spec_of(old) == instance {
                // Idempotent re-registration: same spec and still alive
                // (for a session-held one: on the session's lease, which
                // is alive, and which a registration does not renew).
                if let Some(session) = session {
                    if old.lease_id == session {
                        return Ok(((**old).clone(), instance.ttl_seconds));
                    }
                } else if !instance.ephemeral && old.lease_id == 0 {
                    return Ok(((**old).clone(), 0));
                }
                if instance.ephemeral && old.lease_id != 0 {
                    if let Some(ttl) = self.store.keep_alive(old.lease_id).await? {
                        return Ok(((**old).clone(), ttl_secs(ttl)));
                    }
                }
            }
        }
        instance.registered_at_unix_ms = cached
            .as_ref()
            .map_or_else(now_unix_ms, |old| old.registered_at_unix_ms);
        let (lease, ttl) = if let Some(session) = session {
            (Some(session), instance.ttl_seconds)
        } else if instance.ephemeral {
            let lease = self
                .store
                .grant_lease(Duration::from_secs(u64::from(instance.ttl_seconds)))
                .await?;
            (Some(lease.id), ttl_secs(lease.ttl))
        } else {
            (None, 0)
        };
        instance.lease_id = lease.unwrap_or(0);
        // An instance with an active check is UNKNOWN until its first
        // check; an ephemeral one without is PASSING while its lease lives.
        instance.status = if instance.ephemeral && health::spec::resolve(&instance).is_none() {
            HealthStatus::Passing as i32
        } else {
            HealthStatus::Unknown as i32
        };
        let written = self
            .store
            .replace(&self.keys.instance(&key), instance.encode_to_vec(), lease)
            .await;
        let written = match written {
            Ok(written) => written,
            // The session expired between the lookup and the write.
            Err(StoreError::LeaseNotFound(_)) if session.is_some() => {
                return Err(no_session(agent_node));
            }
            Err(e) => {
                if let Some(lease) = lease.filter(|_| session.is_none()) {
                    self.revoke_quietly(lease).await;
                }
                return Err(e.into());
            }
        };
        let revision = written.revision;
        self.last_write.fetch_max(revision, Ordering::AcqRel);
        // Read-your-writes on this replica: answer once its cache (which
        // serves reads and watches) has the write; it normally takes well
        // under a millisecond.
        self.hub.wait_for(revision, MIN_REVISION_WAIT).await;
        if let Some(prev) = written.prev {
            // The replaced record's own lease goes with it; a session's
            // lease holds the node's other instances and stays.
            if prev.lease != 0 && prev.lease != instance.lease_id && !held_by_session(&prev) {
                self.revoke_quietly(prev.lease).await;
            }
        }
        instance.revision = revision;
        tracing::info!(
            instance = %key,
            host = %instance.host,
            port = instance.port,
            ephemeral = instance.ephemeral,
            agent_node = %instance.agent_node,
            revision,
            "registered"
        );
        Ok((instance, ttl))
    }

    async fn revoke_quietly(&self, lease: LeaseId) {
        if let Err(e) = self.store.revoke_lease(lease).await {
            // Not fatal: an orphaned lease holds no key and expires by itself.
            tracing::warn!(lease, error = %e, "could not revoke lease; it will expire");
        }
    }

    pub async fn deregister(&self, r: Option<&InstanceRef>) -> Result<(bool, u64), ApiError> {
        let key = validate::instance_ref("instance", r)?;
        let existing = self.stored(&key).await?;
        let deleted = self.store.delete(&self.keys.instance(&key)).await?;
        // A delete that removed nothing reports the store's current
        // revision, which may belong to keys outside this replica's watch
        // (a shared etcd): only a real deletion is worth waiting for.
        if deleted.existed {
            self.last_write
                .fetch_max(deleted.revision, Ordering::AcqRel);
            self.hub.wait_for(deleted.revision, MIN_REVISION_WAIT).await;
        }
        if let Err(e) = self.store.delete(&self.keys.health(&key)).await {
            tracing::warn!(instance = %key, error = %e, "could not delete the health history");
        }
        // An instance's own lease holds nothing else; a session's lease
        // holds the node's other instances and its agent record.
        let own_lease = existing
            .filter(|i| i.agent_node.is_empty())
            .map(|i| i.lease_id)
            .filter(|l| *l != 0);
        if let Some(lease) = own_lease {
            self.revoke_quietly(lease).await;
        }
        if deleted.existed {
            tracing::info!(instance = %key, revision = deleted.revision, "deregistered");
        }
        Ok((deleted.existed, deleted.revision))
    }

    /// Renews one registration's lease; returns the TTL. An instance held
    /// by an agent session is refused (FAILED_PRECONDITION) and nothing is
    /// renewed: renewing the session here would let one instance keep a
    /// dead node's instances alive.
    pub async fn heartbeat(&self, key: &InstanceKey) -> Result<u32, ApiError> {
        let gone = || {
            ApiError::NotFound(format!(
                "registration {} is gone (lease expired or deregistered); register it again",
                key
            ))
        };
        let cached = self
            .hub
            .instance(key)
            .filter(|i| i.agent_node.is_empty())
            .map(|i| i.lease_id);
        if let Some(lease) = cached.filter(|l| *l != 0) {
            if let Some(ttl) = self.store.keep_alive(lease).await? {
                return Ok(ttl_secs(ttl));
            }
        }
        // Not in this replica's cache yet, held by a session, or the cache
        // holds an older lease (re-registered through another replica a
        // moment ago): ask the store.
        let stored = self.stored(key).await?.ok_or_else(gone)?;
        if !stored.agent_node.is_empty() {
            return Err(held_by_agent(key, &stored.agent_node));
        }
        if stored.lease_id == 0 {
            return Err(ApiError::invalid(
                "instance",
                format!(
                    "{} is persistent; only ephemeral instances take heartbeats",
                    key
                ),
            ));
        }
        if cached == Some(stored.lease_id) {
            return Err(gone());
        }
        match self.store.keep_alive(stored.lease_id).await? {
            Some(ttl) => Ok(ttl_secs(ttl)),
            None => Err(gone()),
        }
    }

    async fn keep_alive_batch(
        &self,
        request: KeepAliveRequest,
    ) -> Result<KeepAliveResponse, ApiError> {
        if request.instances.len() > validate::MAX_KEEPALIVE_BATCH {
            return Err(ApiError::invalid(
                "instances",
                format!(
                    "at most {} instances per message (got {})",
                    validate::MAX_KEEPALIVE_BATCH,
                    request.instances.len()
                ),
            ));
        }
        let renewals = request
            .instances
            .into_iter()
            .enumerate()
            .map(|(n, r)| async move {
                let outcome = match validate::instance_ref(&format!("instances[{n}]"), Some(&r)) {
                    Ok(key) => self.heartbeat(&key).await,
                    Err(e) => Err(e.into()),
                };
                match outcome {
                    Ok(ttl) => keep_alive_response::Result {
                        instance: Some(r),
                        alive: true,
                        ttl_seconds: ttl,
                        error: String::new(),
                        code: 0,
                    },
                    Err(e) => {
                        let status = Status::from(e);
                        keep_alive_response::Result {
                            instance: Some(r),
                            alive: false,
                            ttl_seconds: 0,
                            error: status.message().to_owned(),
                            code: status.code() as i32,
                        }
                    }
                }
            });
        Ok(KeepAliveResponse {
            results: futures::future::join_all(renewals).await,
        })
    }

    /// Writes a health transition an agent reports for an instance its
    /// node's session holds, through the checker's own write path.
    /// Returns whether it was written (false: the instance is gone or was
    /// registered anew).
    pub async fn report_health(&self, req: ReportHealthRequest) -> Result<bool, ApiError> {
        let key = validate::instance_ref("instance", req.instance.as_ref())?;
        validate::instance_id("agent_node", &req.agent_node)?;
        let from = HealthStatus::try_from(req.from).map_err(|_| {
            ApiError::invalid("from", format!("must be a HealthStatus (got {})", req.from))
        })?;
        let to = HealthStatus::try_from(req.to)
            .ok()
            .filter(|s| *s != HealthStatus::Unknown)
            .ok_or_else(|| {
                ApiError::invalid(
                    "to",
                    format!("must be PASSING, WARNING or CRITICAL (got {})", req.to),
                )
            })?;
        let mut detail = req.detail.unwrap_or_default();
        if detail.reason.len() > MAX_REASON_BYTES {
            return Err(ApiError::invalid(
                "detail.reason",
                format!(
                    "must be at most {MAX_REASON_BYTES} bytes (got {})",
                    detail.reason.len()
                ),
            ));
        }
        if detail.since_unix_ms < 0 {
            return Err(ApiError::invalid(
                "detail.since_unix_ms",
                format!(
                    "must be 0 (now) or a unix time in ms (got {})",
                    detail.since_unix_ms
                ),
            ));
        }
        if detail.since_unix_ms == 0 {
            detail.since_unix_ms = now_unix_ms();
        }
        detail.checked_by = format!("agent:{}", req.agent_node);
        let node = req.agent_node.as_str();
        let lease = self.session_of(node).await?;
        let transition = Transition { from, to, detail };
        let recorded = self
            .verdicts
            .record(
                &key,
                req.registered_at_unix_ms,
                &transition,
                Writer::Agent { node, lease },
            )
            .await
            .map_err(|e| match e {
                WriteError::Store(e) => ApiError::Store(e),
                WriteError::Contended => {
                    ApiError::Aborted(format!("the record of {key} kept changing; retry"))
                }
                e @ WriteError::Undecodable(_) => {
                    ApiError::internal(format!("the stored record of {key} cannot be read"), e)
                }
            })?;
        match recorded {
            Recorded::Written => {
                tracing::info!(instance = %key, node, to = to.as_str_name(), "agent reported a health change");
                Ok(true)
            }
            Recorded::Gone => Ok(false),
            Recorded::NotHeld { holder } => {
                Err(ApiError::FailedPrecondition(if holder.is_empty() {
                    format!("{key} is not held by an agent session (registered directly); the control plane checks it")
                } else if holder == node {
                    format!("{key} is held by an earlier session of node {node:?}, not its live one; register it again")
                } else {
                    format!(
                        "{key} is held by the agent session of node {holder:?}, not of {node:?}"
                    )
                }))
            }
        }
    }

    async fn await_revision(&self, min_revision: u64) -> Result<(), ApiError> {
        if !self.hub.is_ready() {
            return Err(ApiError::NotReady);
        }
        if min_revision > 0 && !self.hub.wait_for(min_revision, MIN_REVISION_WAIT).await {
            return Err(ApiError::DeadlineExceeded(format!(
                "this replica is at revision {} and did not reach min_revision {min_revision} within {}s",
                self.hub.revision(),
                MIN_REVISION_WAIT.as_secs()
            )));
        }
        Ok(())
    }
}

/// Routable: anything but CRITICAL (UNKNOWN = not checked yet or no
/// check; WARNING = degraded but serving).
fn summary(namespace: &str, name: &str, instances: &[Arc<Instance>]) -> ServiceSummary {
    ServiceSummary {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        instance_count: u32::try_from(instances.len()).unwrap_or(u32::MAX),
        passing_count: u32::try_from(
            instances
                .iter()
                .filter(|i| i.status == HealthStatus::Passing as i32)
                .count(),
        )
        .unwrap_or(u32::MAX),
    }
}

fn page_token(namespace: &str, service: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{namespace}/{service}"))
}

fn parse_page_token(token: &str) -> Result<(String, String), validate::ValidationError> {
    let bad = || validate::ValidationError {
        field: "page_token".into(),
        rule: "must be a next_page_token from a previous ListServices response".into(),
    };
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ns, svc) = text.split_once('/').ok_or_else(bad)?;
    validate::dns_label("page_token", ns).map_err(|_| bad())?;
    validate::dns_label("page_token", svc).map_err(|_| bad())?;
    Ok((ns.to_owned(), svc.to_owned()))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The reads and config writes behind the trait, typed: `?` turns
/// validation and store errors into [`ApiError`], and the trait methods
/// below convert once.
impl RegistryService {
    async fn heartbeat_ref(&self, r: Option<&InstanceRef>) -> Result<u32, ApiError> {
        let key = validate::instance_ref("instance", r)?;
        self.heartbeat(&key).await
    }

    async fn service_view(&self, req: GetServiceRequest) -> Result<GetServiceResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        self.await_revision(req.min_revision).await?;
        let (instances, revision) = self.hub.service(&namespace, &service);
        let protection = self.hub.protection(&namespace, &service);
        // In protection, healthy_only returns everything: better to spread
        // load over all instances than to crush the few left.
        let only_healthy = req.healthy_only && !protection.active;
        let instances = instances
            .into_iter()
            .filter(|i| !only_healthy || weir_core::health::takes_traffic(i))
            .map(|i| (*i).clone())
            .collect();
        Ok(GetServiceResponse {
            service: Some(Service {
                namespace,
                name: service,
                instances,
                protection: Some(protection),
            }),
            revision,
        })
    }

    async fn health_view(&self, req: GetHealthRequest) -> Result<GetHealthResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        if !req.instance_id.is_empty() {
            validate::instance_id("instance_id", &req.instance_id)?;
        }
        self.await_revision(0).await?;
        let (instances, revision) = self.hub.service(&namespace, &service);
        let histories = self
            .store
            .range(&self.keys.health_prefix(&namespace, &service))
            .await?;
        let mut by_id: std::collections::HashMap<String, HealthHistory> = histories
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let id = kv.key.rsplit('/').next()?.to_owned();
                HealthHistory::decode(kv.value.as_slice())
                    .ok()
                    .map(|h| (id, h))
            })
            .collect();
        let instances = instances
            .iter()
            .filter(|i| req.instance_id.is_empty() || i.instance_id == req.instance_id)
            .map(|i| InstanceHealth {
                instance_id: i.instance_id.clone(),
                status: i.status,
                detail: i.health.clone(),
                transitions: by_id
                    .remove(&i.instance_id)
                    .map(|h| h.transitions)
                    .unwrap_or_default(),
            })
            .collect();
        Ok(GetHealthResponse {
            instances,
            protection: Some(self.hub.protection(&namespace, &service)),
            revision,
        })
    }

    async fn set_config(
        &self,
        req: SetServiceConfigRequest,
    ) -> Result<SetServiceConfigResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        let config = req.config.unwrap_or_default();
        if let Some(t) = config.protection_threshold_percent {
            if t > 100 {
                return Err(ApiError::invalid(
                    "config.protection_threshold_percent",
                    format!("must be 0-100 (0 disables protection) (got {t})"),
                ));
            }
        }
        let key = self.keys.service_config(&namespace, &service);
        let revision = if config == ServiceConfig::default() {
            self.store.delete(&key).await?.revision
        } else {
            self.store.put(&key, config.encode_to_vec(), None).await?
        };
        self.last_write.fetch_max(revision, Ordering::AcqRel);
        tracing::info!(namespace, service, ?config, revision, "service config set");
        Ok(SetServiceConfigResponse { revision })
    }

    async fn config_view(
        &self,
        req: GetServiceConfigRequest,
    ) -> Result<GetServiceConfigResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        self.await_revision(0).await?;
        let config = self
            .hub
            .service_config(&namespace, &service)
            .unwrap_or_default();
        let effective = config
            .protection_threshold_percent
            .unwrap_or_else(|| self.hub.default_protection_threshold());
        Ok(GetServiceConfigResponse {
            config: Some(config),
            effective_protection_threshold_percent: effective,
        })
    }

    async fn list(&self, req: ListServicesRequest) -> Result<ListServicesResponse, ApiError> {
        validate::namespace_filter(&req.namespace)?;
        if req.name_prefix.len() > 63 {
            return Err(ApiError::invalid(
                "name_prefix",
                "must be at most 63 characters",
            ));
        }
        validate::metadata("metadata", &req.metadata)?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n if n <= MAX_PAGE_SIZE => n,
            n => {
                return Err(ApiError::invalid(
                    "page_size",
                    format!("must be 0-{MAX_PAGE_SIZE} (got {n})"),
                ))
            }
        };
        let after = if req.page_token.is_empty() {
            None
        } else {
            Some(parse_page_token(&req.page_token)?)
        };
        self.await_revision(0).await?;
        let (services, more, revision) = self.hub.services(
            &req.namespace,
            after.as_ref().map(|(ns, svc)| (ns.as_str(), svc.as_str())),
            page_size as usize,
            |_, name, instances| {
                if !name.starts_with(&req.name_prefix) {
                    return None;
                }
                if req.metadata.is_empty() {
                    return Some(instances);
                }
                let kept: Vec<_> = instances
                    .into_iter()
                    .filter(|i| {
                        req.metadata
                            .iter()
                            .all(|(k, v)| i.metadata.get(k) == Some(v))
                    })
                    .collect();
                (!kept.is_empty()).then_some(kept)
            },
        );
        let next_page_token = match services.last() {
            Some((ns, svc, _)) if more => page_token(ns, svc),
            _ => String::new(),
        };
        let summaries = services
            .iter()
            .map(|(ns, svc, instances)| summary(ns, svc, instances))
            .collect();
        let services = services
            .into_iter()
            .map(|(namespace, name, instances)| Service {
                protection: Some(self.hub.protection(&namespace, &name)),
                namespace,
                name,
                instances: if req.summary_only {
                    Vec::new()
                } else {
                    instances.iter().map(|i| (**i).clone()).collect()
                },
            })
            .collect();
        Ok(ListServicesResponse {
            services,
            summaries,
            next_page_token,
            revision,
        })
    }

    fn watch_filter(req: &WatchRequest) -> Result<Filter, ApiError> {
        validate::namespace_filter(&req.namespace)?;
        let mut filter = Filter {
            namespace: req.namespace.clone(),
            service: String::new(),
        };
        if !req.service.is_empty() {
            validate::dns_label("service", &req.service)?;
            if filter.namespace.is_empty() {
                filter.namespace = validate::DEFAULT_NAMESPACE.to_owned();
            }
            filter.service = req.service.clone();
        }
        Ok(filter)
    }
}

#[tonic::async_trait]
impl Registry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.get_ref();
        let (instance, ttl_seconds) =
            RegistryService::register(self, request.instance.as_ref(), &request.agent_node).await?;
        Ok(Response::new(RegisterResponse {
            instance: Some(instance),
            ttl_seconds,
        }))
    }

    async fn deregister(
        &self,
        request: Request<DeregisterRequest>,
    ) -> Result<Response<DeregisterResponse>, Status> {
        let (existed, revision) =
            RegistryService::deregister(self, request.get_ref().instance.as_ref()).await?;
        Ok(Response::new(DeregisterResponse { existed, revision }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let ttl_seconds = self
            .heartbeat_ref(request.get_ref().instance.as_ref())
            .await?;
        Ok(Response::new(HeartbeatResponse { ttl_seconds }))
    }

    async fn report_health(
        &self,
        request: Request<ReportHealthRequest>,
    ) -> Result<Response<ReportHealthResponse>, Status> {
        let recorded = RegistryService::report_health(self, request.into_inner()).await?;
        Ok(Response::new(ReportHealthResponse { recorded }))
    }

    type KeepAliveStream = BoxStream<KeepAliveResponse>;

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<Self::KeepAliveStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                let reply = match message {
                    Ok(request) => service.keep_alive_batch(request).await.map_err(Into::into),
                    Err(status) => {
                        // The caller went away, or sent a message that does
                        // not decode: tell it why (if it still listens).
                        tracing::debug!(error = %status, "keep-alive stream ended by the caller");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                let fatal = reply.is_err();
                if tx.send(reply).await.is_err() || fatal {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_service(
        &self,
        request: Request<GetServiceRequest>,
    ) -> Result<Response<GetServiceResponse>, Status> {
        Ok(Response::new(
            self.service_view(request.into_inner()).await?,
        ))
    }

    async fn get_health(
        &self,
        request: Request<GetHealthRequest>,
    ) -> Result<Response<GetHealthResponse>, Status> {
        Ok(Response::new(self.health_view(request.into_inner()).await?))
    }

    async fn set_service_config(
        &self,
        request: Request<SetServiceConfigRequest>,
    ) -> Result<Response<SetServiceConfigResponse>, Status> {
        Ok(Response::new(self.set_config(request.into_inner()).await?))
    }

    async fn get_service_config(
        &self,
        request: Request<GetServiceConfigRequest>,
    ) -> Result<Response<GetServiceConfigResponse>, Status> {
        Ok(Response::new(self.config_view(request.into_inner()).await?))
    }

    async fn list_services(
        &self,
        request: Request<ListServicesRequest>,
    ) -> Result<Response<ListServicesResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    type WatchStream = BoxStream<WatchResponse>;

    async fn watch(
        &self,
        request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let filter = Self::watch_filter(&req)?;
        let rx = self.hub.subscribe(filter, req.start_revision);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx).map(Ok))))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;
    use weir_proto::registry::v1::HealthDetail;

    use super::*;
    use crate::{
        agents::SESSION_TTL,
        hub::HubConfig,
        store::{EmbeddedStore, EmbeddedStoreConfig},
    };

    /// A registry on an embedded store, with its hub loaded.
    struct Fixture {
        registry: RegistryService,
        store: Arc<dyn Store>,
        keys: Keys,
        _hub: crate::hub::HubTask,
    }

    impl Fixture {
        async fn new() -> Self {
            let store: Arc<dyn Store> =
                Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
            let keys = Keys::new("/t");
            let (hub, task) = Hub::start(store.clone(), keys.clone(), HubConfig::default());
            let loaded = async {
                while !hub.is_ready() {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(5), loaded)
                .await
                .expect("the hub loads");
            Self {
                registry: RegistryService::new(store.clone(), hub, keys.clone()),
                store,
                keys,
                _hub: task,
            }
        }

        /// What an agent session writes: the node's record on a new lease.
        async fn open_session(&self, node: &str) -> LeaseId {
            let lease = self.store.grant_lease(SESSION_TTL).await.expect("lease");
            self.store
                .put(
                    &self.keys.agent(node),
                    b"replica=test".to_vec(),
                    Some(lease.id),
                )
                .await
                .expect("agent record");
            lease.id
        }

        async fn register(&self, id: &str, node: &str) -> Result<(Instance, u32), ApiError> {
            let i = Instance {
                service: "orders".into(),
                instance_id: id.into(),
                host: "127.0.0.1".into(),
                port: 8080,
                ephemeral: true,
                ttl_seconds: 4,
                ..Instance::default()
            };
            self.registry.register(Some(&i), node).await
        }

        async fn lease_alive(&self, lease: LeaseId) -> bool {
            self.store.keep_alive(lease).await.expect("store").is_some()
        }
    }

    fn key(id: &str) -> InstanceKey {
        InstanceKey {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
        }
    }

    fn reference(id: &str) -> InstanceRef {
        InstanceRef {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
        }
    }

    fn report(id: &str, node: &str, to: HealthStatus) -> ReportHealthRequest {
        ReportHealthRequest {
            instance: Some(reference(id)),
            agent_node: node.into(),
            registered_at_unix_ms: 0,
            from: HealthStatus::Passing as i32,
            to: to as i32,
            detail: Some(HealthDetail {
                reason: "HTTP 500 from GET /healthz".into(),
                consecutive: 2,
                checked_by: "forged".into(),
                ..HealthDetail::default()
            }),
        }
    }

    fn failed_precondition(r: Result<impl std::fmt::Debug, ApiError>) -> String {
        match r {
            Err(e) if e.code() == Code::FailedPrecondition => e.to_string(),
            other => panic!("expected FAILED_PRECONDITION, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn registering_for_a_node_without_a_session_is_refused() {
        let f = Fixture::new().await;
        let message = failed_precondition(f.register("i-1", "node-1").await);
        assert!(
            message.contains("\"node-1\" has no live agent session"),
            "{message}"
        );
        assert!(f
            .registry
            .stored(&key("i-1"))
            .await
            .expect("read")
            .is_none());
    }

    #[tokio::test]
    async fn session_held_instances_share_the_session_lease_and_never_revoke_it() {
        let f = Fixture::new().await;
        let session = f.open_session("node-1").await;
        for id in ["i-1", "i-2", "i-3"] {
            let (i, ttl) = f.register(id, "node-1").await.expect("registered");
            assert_eq!((i.lease_id, i.agent_node.as_str()), (session, "node-1"));
            assert_eq!(ttl, 4, "the instance's own TTL, which its agent enforces");
            assert_eq!(i.status, HealthStatus::Passing as i32);
        }
        // Registering the same again changes nothing (and renews nothing).
        let (again, _) = f.register("i-1", "node-1").await.expect("again");
        let stored = f.registry.stored(&key("i-1")).await.expect("read");
        assert_eq!(stored.map(|i| i.revision), Some(again.revision));

        // Deregistering one removes its key only.
        let (existed, _) = f
            .registry
            .deregister(Some(&reference("i-1")))
            .await
            .expect("deregistered");
        assert!(existed);
        assert!(f.lease_alive(session).await, "the session lease survives");
        for id in ["i-2", "i-3"] {
            assert!(f.registry.stored(&key(id)).await.expect("read").is_some());
        }

        // Heartbeats are refused, naming the holder, and renew nothing.
        let message = failed_precondition(f.registry.heartbeat(&key("i-2")).await);
        assert!(message.contains("node \"node-1\""), "{message}");
        let batch = f
            .registry
            .keep_alive_batch(KeepAliveRequest {
                instances: vec![reference("i-2")],
            })
            .await
            .expect("batch");
        assert_eq!(batch.results[0].code, Code::FailedPrecondition as i32);
        assert!(!batch.results[0].alive);

        // Taken over by a direct registration: it gets a lease of its own,
        // and the session's stays.
        let (direct, _) = f.register("i-3", "").await.expect("direct");
        assert!(direct.agent_node.is_empty());
        assert_ne!(direct.lease_id, session);
        assert!(f.lease_alive(session).await);
        // ... and back under the session: its own lease goes.
        f.register("i-3", "node-1").await.expect("held again");
        assert!(!f.lease_alive(direct.lease_id).await);

        // The session ends: its instances leave with it.
        assert!(f.store.revoke_lease(session).await.expect("revoked"));
        for id in ["i-2", "i-3"] {
            assert!(f.registry.stored(&key(id)).await.expect("read").is_none());
        }
        failed_precondition(f.register("i-2", "node-1").await);
    }

    #[tokio::test]
    async fn health_reports_are_written_only_for_the_holding_session() {
        let f = Fixture::new().await;
        f.open_session("node-1").await;
        f.open_session("node-2").await;
        let (held, _) = f.register("i-1", "node-1").await.expect("held");
        f.register("i-2", "").await.expect("direct");

        let message = failed_precondition(
            f.registry
                .report_health(report("i-1", "node-2", HealthStatus::Critical))
                .await,
        );
        assert!(
            message.contains("held by the agent session of node \"node-1\""),
            "{message}"
        );
        let message = failed_precondition(
            f.registry
                .report_health(report("i-2", "node-1", HealthStatus::Critical))
                .await,
        );
        assert!(message.contains("registered directly"), "{message}");
        let message = failed_precondition(
            f.registry
                .report_health(report("i-1", "node-3", HealthStatus::Critical))
                .await,
        );
        assert!(message.contains("no live agent session"), "{message}");
        let e = f
            .registry
            .report_health(report("i-1", "node-1", HealthStatus::Unknown))
            .await
            .expect_err("UNKNOWN is no verdict");
        assert!(
            matches!(&e, ApiError::Invalid(v) if v[0].field == "to"),
            "{e:?}"
        );
        let unchanged = f.registry.stored(&key("i-1")).await.expect("read");
        assert_eq!(unchanged.map(|i| i.revision), Some(held.revision));

        // A report for another registration of the instance is not written.
        let mut stale = report("i-1", "node-1", HealthStatus::Critical);
        stale.registered_at_unix_ms = held.registered_at_unix_ms - 1;
        assert!(!f.registry.report_health(stale).await.expect("answered"));

        let mut current = report("i-1", "node-1", HealthStatus::Critical);
        current.registered_at_unix_ms = held.registered_at_unix_ms;
        assert!(f.registry.report_health(current).await.expect("written"));
        let i = f
            .registry
            .stored(&key("i-1"))
            .await
            .expect("read")
            .expect("instance");
        assert_eq!(i.status, HealthStatus::Critical as i32);
        assert_eq!(
            i.lease_id, held.lease_id,
            "the record keeps the session lease"
        );
        let detail = i.health.expect("detail");
        assert_eq!(detail.checked_by, "agent:node-1");
        assert!(detail.since_unix_ms > 0);
        let history = f
            .store
            .get(&f.keys.health(&key("i-1")))
            .await
            .expect("read")
            .expect("history");
        assert_eq!(history.lease, held.lease_id);
        let history = HealthHistory::decode(history.value.as_slice()).expect("decode");
        assert_eq!(history.transitions.len(), 1);
        assert_eq!(history.transitions[0].to, HealthStatus::Critical as i32);
    }

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        let t = page_token("default", "orders");
        assert_eq!(
            parse_page_token(&t).expect("valid"),
            ("default".into(), "orders".into())
        );
        for bad in [
            "",
            "!!!",
            &URL_SAFE_NO_PAD.encode("noslash"),
            &URL_SAFE_NO_PAD.encode("A/b"),
        ] {
            let e = parse_page_token(bad).expect_err(bad);
            assert_eq!(e.field, "page_token");
        }
    }
}
