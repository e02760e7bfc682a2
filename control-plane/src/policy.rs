//! Traffic policies: the `weir.policy.v1.PolicyService` (validation and
//! resolution live in `weir_core::policy`).
//!
//! A policy lives at `{root}/v1/policies/{namespace}/{service}` as a
//! `PolicyRecord`: the current policy plus its previous versions (newest
//! first, bounded), so a write and its history are one atomic put. The
//! version of a policy is the etcd revision of the write that made it; Put
//! and Rollback compare it in a transaction (compare-and-put on the key's
//! revision), so concurrent editors cannot overwrite each other silently.
//!
//! `weir.policy.v1.PolicyService`: writes go to the store with
//! compare-and-put on the policy key's revision; reads come from the hub.

use std::{collections::HashMap, sync::Arc, time::Duration};

use prost::Message;
use tonic::{Request, Response, Status};
use weir_core::{policy::validate::policy as validate_policy, time::now_unix_ms, validate};
use weir_proto::policy::v1::{
    policy_service_server::PolicyService, AgentPolicyState, DeletePolicyRequest,
    DeletePolicyResponse, GetPolicyRequest, GetPolicyResponse, ListPoliciesRequest,
    ListPoliciesResponse, PolicyHistoryRequest, PolicyHistoryResponse, PolicyRecord,
    PolicyStatusRequest, PolicyStatusResponse, PolicyVersion, PutPolicyRequest, PutPolicyResponse,
    RollbackPolicyRequest, RollbackPolicyResponse, TrafficPolicy,
};

use crate::{
    error::ApiError,
    hub::Hub,
    keys::Keys,
    store::{CasOutcome, KeyValue, Store},
};

/// Versions kept in a record besides the current one.
pub const PREVIOUS_VERSIONS: usize = 19;
/// How long a read waits for the replica to see the caller's own write.
const OWN_WRITE_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct PolicyServiceImpl {
    store: Arc<dyn Store>,
    hub: Hub,
    keys: Keys,
}

fn conflict(namespace: &str, service: &str, current: u64, expected: u64) -> ApiError {
    ApiError::Conflict {
        kind: "policy",
        name: format!("{namespace}/{service}"),
        current,
        expected,
    }
}

fn decode(kv: &KeyValue) -> Result<PolicyRecord, ApiError> {
    PolicyRecord::decode(kv.value.as_slice()).map_err(|e| {
        ApiError::internal(
            "a stored policy record cannot be read",
            format!("stored policy {} does not decode: {e}", kv.key),
        )
    })
}

fn current_version(record: &PolicyRecord, version: u64) -> PolicyVersion {
    PolicyVersion {
        policy: record.policy.clone(),
        version,
        updated_at_unix_ms: record.updated_at_unix_ms,
        restored_from: record.restored_from,
    }
}

impl PolicyServiceImpl {
    pub fn new(store: Arc<dyn Store>, hub: Hub, keys: Keys) -> Self {
        Self { store, hub, keys }
    }

    /// Writes `policy` as the new current version if the stored one is at
    /// `expected` (None = whatever it is).
    async fn write(
        &self,
        policy: TrafficPolicy,
        expected: Option<u64>,
        restored_from: u64,
    ) -> Result<PolicyVersion, ApiError> {
        let key = self.keys.policy(&policy.namespace, &policy.service);
        // Unconditional writes retry a lost race; conditional ones report it.
        for _ in 0..5 {
            let existing = self.store.get(&key).await?;
            let current = existing.as_ref().map_or(0, |kv| kv.mod_revision);
            if let Some(expected) = expected {
                if expected != current {
                    return Err(conflict(
                        &policy.namespace,
                        &policy.service,
                        current,
                        expected,
                    ));
                }
            }
            let mut previous = Vec::new();
            if let Some(kv) = &existing {
                let old = decode(kv)?;
                previous.push(current_version(&old, kv.mod_revision));
                previous.extend(old.previous);
                previous.truncate(PREVIOUS_VERSIONS);
            }
            let record = PolicyRecord {
                policy: Some(policy.clone()),
                updated_at_unix_ms: now_unix_ms(),
                restored_from,
                previous,
            };
            match self
                .store
                .put_if(&key, record.encode_to_vec(), None, current)
                .await?
            {
                CasOutcome::Written { revision } => {
                    tracing::info!(
                        namespace = %policy.namespace,
                        service = %policy.service,
                        version = revision,
                        "policy written"
                    );
                    self.hub.wait_for(revision, OWN_WRITE_WAIT).await;
                    return Ok(current_version(&record, revision));
                }
                CasOutcome::Conflict { current: now } => {
                    if let Some(expected) = expected {
                        let now = now.map_or(0, |kv| kv.mod_revision);
                        return Err(conflict(&policy.namespace, &policy.service, now, expected));
                    }
                }
            }
        }
        Err(ApiError::Aborted(format!(
            "policy {}/{} kept changing under this write; retry",
            policy.namespace, policy.service
        )))
    }

    async fn stored(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Option<(PolicyRecord, u64)>, ApiError> {
        match self
            .store
            .get(&self.keys.policy(namespace, service))
            .await?
        {
            Some(kv) => Ok(Some((decode(&kv)?, kv.mod_revision))),
            None => Ok(None),
        }
    }
}

fn not_found(namespace: &str, service: &str) -> ApiError {
    ApiError::NotFound(format!("no policy for {namespace}/{service}"))
}

/// The calls behind the trait, typed: `?` turns validation and store
/// errors into [`ApiError`], and the trait methods below convert once.
impl PolicyServiceImpl {
    /// The current record of a policy that must exist.
    async fn existing(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<(String, String, PolicyRecord, u64), ApiError> {
        let (namespace, service) = validate::service_name(namespace, service)?;
        let (record, version) = self
            .stored(&namespace, &service)
            .await?
            .ok_or_else(|| not_found(&namespace, &service))?;
        Ok((namespace, service, record, version))
    }

    async fn get_policy(&self, req: GetPolicyRequest) -> Result<GetPolicyResponse, ApiError> {
        let (_, _, record, version) = self.existing(&req.namespace, &req.service).await?;
        Ok(GetPolicyResponse {
            current: Some(current_version(&record, version)),
        })
    }

    async fn put_policy(&self, req: PutPolicyRequest) -> Result<PutPolicyResponse, ApiError> {
        let policy = validate_policy(req.policy.as_ref())?;
        let current = self.write(policy, req.expected_version, 0).await?;
        Ok(PutPolicyResponse {
            current: Some(current),
        })
    }

    async fn delete_policy(
        &self,
        req: DeletePolicyRequest,
    ) -> Result<DeletePolicyResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        if let Some(expected) = req.expected_version {
            let current = self
                .stored(&namespace, &service)
                .await?
                .map_or(0, |(_, v)| v);
            if current != expected {
                return Err(conflict(&namespace, &service, current, expected));
            }
        }
        let deleted = self
            .store
            .delete(&self.keys.policy(&namespace, &service))
            .await?;
        if deleted.existed {
            tracing::info!(%namespace, %service, revision = deleted.revision, "policy deleted");
        }
        Ok(DeletePolicyResponse {
            existed: deleted.existed,
            revision: deleted.revision,
        })
    }

    fn list_policies(&self, req: ListPoliciesRequest) -> Result<ListPoliciesResponse, ApiError> {
        validate::namespace_filter(&req.namespace)?;
        if !self.hub.is_ready() {
            return Err(ApiError::NotReady);
        }
        let (policies, revision) = self.hub.policies(&req.namespace);
        Ok(ListPoliciesResponse {
            policies: policies
                .iter()
                .map(|p| PolicyVersion {
                    policy: p.policy.clone(),
                    version: p.version,
                    ..PolicyVersion::default()
                })
                .collect(),
            revision,
        })
    }

    async fn policy_history(
        &self,
        req: PolicyHistoryRequest,
    ) -> Result<PolicyHistoryResponse, ApiError> {
        let (_, _, record, version) = self.existing(&req.namespace, &req.service).await?;
        let mut versions = vec![current_version(&record, version)];
        versions.extend(record.previous);
        Ok(PolicyHistoryResponse { versions })
    }

    async fn rollback_policy(
        &self,
        req: RollbackPolicyRequest,
    ) -> Result<RollbackPolicyResponse, ApiError> {
        let (namespace, service, record, version) =
            self.existing(&req.namespace, &req.service).await?;
        if req.to_version == version {
            return Err(ApiError::invalid(
                "to_version",
                format!("{version} is already the current version"),
            ));
        }
        let target = record
            .previous
            .iter()
            .find(|v| v.version == req.to_version)
            .and_then(|v| v.policy.clone())
            .ok_or_else(|| {
                let kept: Vec<String> = record
                    .previous
                    .iter()
                    .map(|v| v.version.to_string())
                    .collect();
                ApiError::invalid(
                    "to_version",
                    format!(
                        "{} is not among the kept versions of {namespace}/{service} ({})",
                        req.to_version,
                        kept.join(", ")
                    ),
                )
            })?;
        // Restore it as written then; it is validated again (rules may have
        // tightened since).
        let target = validate_policy(Some(&target))?;
        let expected = Some(req.expected_version.unwrap_or(version));
        let current = self.write(target, expected, req.to_version).await?;
        Ok(RollbackPolicyResponse {
            current: Some(current),
        })
    }

    async fn policy_status(
        &self,
        req: PolicyStatusRequest,
    ) -> Result<PolicyStatusResponse, ApiError> {
        let (namespace, service) = validate::service_name(&req.namespace, &req.service)?;
        let current_version = self
            .hub
            .policy(&namespace, &service)
            .map_or(0, |p| p.version);
        let connected = self.hub.agents();
        let acks = self
            .store
            .range(&self.keys.acks_prefix(&namespace, &service))
            .await?;
        let mut states: HashMap<String, AgentPolicyState> = HashMap::new();
        for kv in acks.kvs {
            if let Ok(state) = AgentPolicyState::decode(kv.value.as_slice()) {
                states.insert(state.node_id.clone(), state);
            }
        }
        let (mut applied, mut partly, mut rejected, mut pending) = (0u32, 0u32, 0u32, 0u32);
        let mut agents = Vec::new();
        for node in &connected {
            match states.remove(node) {
                Some(s) if s.version == current_version && s.accepted => {
                    if s.unenforced.is_empty() {
                        applied += 1;
                    } else {
                        partly += 1;
                    }
                    agents.push(s);
                }
                Some(s) if s.version == current_version => {
                    rejected += 1;
                    agents.push(s);
                }
                Some(s) => {
                    pending += 1;
                    agents.push(s);
                }
                None => {
                    pending += 1;
                    agents.push(AgentPolicyState {
                        node_id: node.clone(),
                        ..AgentPolicyState::default()
                    });
                }
            }
        }
        Ok(PolicyStatusResponse {
            current_version,
            connected_agents: u32::try_from(connected.len()).unwrap_or(u32::MAX),
            applied,
            partly,
            rejected,
            pending,
            agents,
        })
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyServiceImpl {
    async fn get(
        &self,
        request: Request<GetPolicyRequest>,
    ) -> Result<Response<GetPolicyResponse>, Status> {
        Ok(Response::new(self.get_policy(request.into_inner()).await?))
    }

    async fn put(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PutPolicyResponse>, Status> {
        Ok(Response::new(self.put_policy(request.into_inner()).await?))
    }

    async fn delete(
        &self,
        request: Request<DeletePolicyRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        Ok(Response::new(
            self.delete_policy(request.into_inner()).await?,
        ))
    }

    async fn list(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        Ok(Response::new(self.list_policies(request.into_inner())?))
    }

    async fn history(
        &self,
        request: Request<PolicyHistoryRequest>,
    ) -> Result<Response<PolicyHistoryResponse>, Status> {
        Ok(Response::new(
            self.policy_history(request.into_inner()).await?,
        ))
    }

    async fn rollback(
        &self,
        request: Request<RollbackPolicyRequest>,
    ) -> Result<Response<RollbackPolicyResponse>, Status> {
        Ok(Response::new(
            self.rollback_policy(request.into_inner()).await?,
        ))
    }

    async fn status(
        &self,
        request: Request<PolicyStatusRequest>,
    ) -> Result<Response<PolicyStatusResponse>, Status> {
        Ok(Response::new(
            self.policy_status(request.into_inner()).await?,
        ))
    }
}
