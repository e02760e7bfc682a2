//! The calls a node's agent makes for the instances its session holds
//! (`weir.registry.v1.Registry` with `agent_node`): register them under the
//! session's lease, and report the health transitions of the checks it
//! runs. Deregistering one is the ordinary [`Client::deregister`]; it
//! never touches the session.
//!
//! The control plane answers `FAILED_PRECONDITION` ([`Error::Rpc`] with
//! [`tonic::Code::FailedPrecondition`]) when the node has no live session
//! (open it first with [`Client::open_session`]) or when the session does
//! not hold the instance named.

use async_trait::async_trait;
use weir_core::{
    health::checker::{SinkError, StatusSink, Transition},
    InstanceKey,
};
use weir_proto::registry::v1::{InstanceRef, ReportHealthRequest};

use crate::{Client, Error, Instance, RegisterResponse};

impl Client {
    /// Registers `instance` on behalf of `node`'s agent session: it is
    /// written under the session's lease, lives as long as the session
    /// (or until deregistered), and shows `agent_node = node`. It must be
    /// ephemeral; its `ttl_seconds` is the TTL the agent enforces on the
    /// local service, and is what the answer's `ttl_seconds` says. An
    /// empty `instance_id` is filled as by [`Client::register`].
    pub async fn register_for_node(
        &self,
        node: &str,
        instance: Instance,
    ) -> Result<RegisterResponse, Error> {
        self.register_as(instance, node.to_owned()).await
    }

    /// Reports that `instance` (the registration made at
    /// `registered_at_unix_ms`; 0 = whichever is there), held by `node`'s
    /// session, went `transition.from` → `transition.to`, as the agent's
    /// checker decided. The control plane stores it as its own checker
    /// would (status, detail with `checked_by = "agent:{node}"`, history).
    /// `Ok(false)`: the instance is gone or was registered anew, so stop
    /// checking that registration.
    pub async fn report_health(
        &self,
        node: &str,
        instance: &InstanceRef,
        registered_at_unix_ms: i64,
        transition: &Transition,
    ) -> Result<bool, Error> {
        let request = ReportHealthRequest {
            instance: Some(instance.clone()),
            agent_node: node.to_owned(),
            registered_at_unix_ms,
            from: transition.from as i32,
            to: transition.to as i32,
            detail: Some(transition.detail.clone()),
        };
        let r = self
            .call("ReportHealth", Some(self.unary()), |mut c| {
                let request = request.clone();
                async move { c.report_health(request).await }
            })
            .await?;
        Ok(r.recorded)
    }
}

/// The sink an agent gives `weir_core`'s health checker: each transition
/// of a check it runs for its node's instances goes to the control plane
/// through [`Client::report_health`]. A refused or failed report is an
/// error, which the checker retries after its next check.
#[derive(Clone, Debug)]
pub struct NodeStatusSink {
    client: Client,
    node: String,
}

impl NodeStatusSink {
    /// Reports for `node`'s session through `client`.
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Self {
            client,
            node: node.into(),
        }
    }
}

#[async_trait]
impl StatusSink for NodeStatusSink {
    async fn transition(
        &self,
        key: &InstanceKey,
        registered_at_unix_ms: i64,
        t: &Transition,
    ) -> Result<bool, SinkError> {
        self.client
            .report_health(
                &self.node,
                &InstanceRef::from(key),
                registered_at_unix_ms,
                t,
            )
            .await
            .map_err(|e| SinkError(e.to_string()))
    }

    /// Only persistent instances are deregistered by the checker, and a
    /// session holds none; kept for completeness.
    async fn deregister(&self, key: &InstanceKey) -> Result<(), SinkError> {
        self.client
            .deregister(&InstanceRef::from(key))
            .await
            .map(|_| ())
            .map_err(|e| SinkError(e.to_string()))
    }
}
