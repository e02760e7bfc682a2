//! The agent side of the agent session (`weir.agent.v1`): open a session,
//! follow the registry and the policies it pushes, acknowledge each policy
//! version (applied, in part, or rejected), report the agent's status, and
//! answer the control plane's requests. The weir-agent uses this; so do
//! the tests that stand in for agents.

use std::collections::BTreeMap;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weir_proto::agent::v1::{
    agent_message, agent_reply, agent_session_service_client::AgentSessionServiceClient,
    control_message, policy_update, Ack, AgentMessage, AgentReply, AgentRequest, AgentStatus,
    ControlMessage, Hello, PolicyChange, PolicyUpdate, Welcome,
};
use weir_proto::registry::v1::WatchResponse;

use crate::{Client, Error};

/// What one [`AgentSession::next`] brought. More kinds may come: match
/// with a wildcard arm.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A registry message (apply it like a Watch stream's).
    Registry(WatchResponse),
    /// Policies changed (or a snapshot replaced them): the changes, as
    /// applied to [`AgentSession::policies`].
    Policies(PolicyUpdate),
    /// The control plane asks something: answer with
    /// [`AgentSession::reply`] and the request's `request_id`. Answer one
    /// whose body is unset (a kind this build does not know) with a
    /// `ReplyError` of kind `UNSUPPORTED`.
    Request(AgentRequest),
    /// The agent's shares of GLOBAL rate limits (about once a second).
    Shares(weir_proto::agent::v1::LimitShares),
}

/// How an agent took a policy version ([`AgentSession::ack`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Enforced in full.
    Applied,
    /// Enforced but for these top-level sections (`rate_limit`,
    /// `circuit_breaker`, ...; see `weir_core::policy::sections`). An
    /// empty list is the same as [`AckOutcome::Applied`].
    Partly(Vec<String>),
    /// Not enforced; the reason (at most 1024 bytes).
    Rejected(String),
}

impl AckOutcome {
    /// The acknowledgement of `version` of `namespace/service`.
    fn ack(self, namespace: &str, service: &str, version: u64) -> Ack {
        let (accepted, error, unenforced) = match self {
            AckOutcome::Applied => (true, String::new(), Vec::new()),
            AckOutcome::Partly(sections) => (true, String::new(), sections),
            AckOutcome::Rejected(reason) => (false, reason, Vec::new()),
        };
        Ack {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            version,
            accepted,
            error,
            unenforced,
        }
    }
}

/// An open agent session on one control-plane replica.
#[derive(Debug)]
pub struct AgentSession {
    node_id: String,
    welcome: Welcome,
    outbound: mpsc::Sender<AgentMessage>,
    inbound: tonic::Streaming<ControlMessage>,
    policies: BTreeMap<(String, String), PolicyChange>,
    policy_revision: u64,
    registry_revision: u64,
}

impl Client {
    /// Opens an agent session with `hello` on the first replica that takes
    /// it. Resume by passing the revisions of an earlier session
    /// ([`AgentSession::resume_hello`]).
    pub async fn open_session(&self, hello: Hello) -> Result<AgentSession, Error> {
        let mut last = Error::NoEndpoints;
        for index in self.order() {
            let (tx, rx) = mpsc::channel(64);
            tx.send(AgentMessage {
                kind: Some(agent_message::Kind::Hello(hello.clone())),
            })
            .await
            .map_err(|_| Error::Protocol("session channel closed".into()))?;
            let (inbound, welcome) = match self.handshake(index, rx).await {
                Ok(opened) => opened,
                Err(e) if e.is_transient() => {
                    last = e;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.prefer(index);
            return Ok(AgentSession {
                node_id: hello.node_id.clone(),
                welcome,
                outbound: tx,
                inbound,
                policies: BTreeMap::new(),
                policy_revision: hello.policy_revision,
                registry_revision: hello.registry_revision,
            });
        }
        Err(last)
    }

    /// Opens the session stream on replica `index`, sending what `rx`
    /// yields, and reads the Welcome it must start with.
    async fn handshake(
        &self,
        index: usize,
        rx: mpsc::Receiver<AgentMessage>,
    ) -> Result<(tonic::Streaming<ControlMessage>, Welcome), Error> {
        let mut raw = AgentSessionServiceClient::new(self.channel(index));
        let mut inbound = raw.session(ReceiverStream::new(rx)).await?.into_inner();
        match inbound.message().await? {
            Some(ControlMessage {
                kind: Some(control_message::Kind::Welcome(w)),
            }) => Ok((inbound, w)),
            other => Err(Error::Protocol(format!("expected Welcome, got {other:?}"))),
        }
    }
}

impl AgentSession {
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The policies as of [`AgentSession::policy_revision`].
    pub fn policies(&self) -> &BTreeMap<(String, String), PolicyChange> {
        &self.policies
    }

    pub fn policy_revision(&self) -> u64 {
        self.policy_revision
    }

    pub fn registry_revision(&self) -> u64 {
        self.registry_revision
    }

    /// A Hello that resumes this session's streams where they are, for a
    /// reconnect (to any replica). `policies` of the new session start
    /// empty on a resume: carry them over with [`AgentSession::adopt`].
    pub fn resume_hello(&self, mut hello: Hello) -> Hello {
        hello.policy_revision = self.policy_revision;
        hello.registry_revision = self.registry_revision;
        hello
    }

    /// Takes the policy set of an earlier session (before a resume).
    pub fn adopt(&mut self, earlier: &AgentSession) {
        self.policies = earlier.policies.clone();
    }

    /// Takes a policy set saved earlier (by an agent, on disk), as of the
    /// revision this session was opened from (`Hello.policy_revision`).
    /// Like [`AgentSession::adopt`] when there is no earlier session in
    /// memory: a resumed stream sends only the changes after that
    /// revision, so the set must be seeded for them to apply to.
    pub fn seed_policies(&mut self, policies: BTreeMap<(String, String), PolicyChange>) {
        self.policies = policies;
    }

    /// The next message, applied. `Ok(None)` when the server closed the
    /// stream.
    pub async fn next(&mut self) -> Result<Option<SessionEvent>, Error> {
        let message = match self.inbound.message().await? {
            Some(m) => m,
            None => return Ok(None),
        };
        match message.kind {
            Some(control_message::Kind::Registry(r)) => {
                if r.revision > 0 {
                    self.registry_revision = r.revision;
                }
                Ok(Some(SessionEvent::Registry(r)))
            }
            Some(control_message::Kind::Policies(update)) => {
                let kind = policy_update::Kind::try_from(update.kind).map_err(|_| {
                    Error::Protocol(format!("unknown policy update kind {}", update.kind))
                })?;
                if kind == policy_update::Kind::Snapshot {
                    self.policies.clear();
                }
                for c in &update.changes {
                    let key = (c.namespace.clone(), c.service.clone());
                    if c.policy.is_some() {
                        self.policies.insert(key, c.clone());
                    } else {
                        self.policies.remove(&key);
                    }
                }
                self.policy_revision = self.policy_revision.max(update.revision);
                if kind == policy_update::Kind::Snapshot {
                    self.policy_revision = update.revision;
                }
                Ok(Some(SessionEvent::Policies(update)))
            }
            Some(control_message::Kind::Request(request)) => {
                Ok(Some(SessionEvent::Request(request)))
            }
            Some(control_message::Kind::Shares(shares)) => Ok(Some(SessionEvent::Shares(shares))),
            Some(control_message::Kind::Welcome(_)) | None => Err(Error::Protocol(
                "unexpected message on an open session".into(),
            )),
        }
    }

    async fn send(&self, kind: agent_message::Kind) -> Result<(), Error> {
        self.outbound
            .send(AgentMessage { kind: Some(kind) })
            .await
            .map_err(|_| Error::Unavailable("the session stream is closed".into()))
    }

    /// Reports how policy `version` of `namespace/service` was taken.
    pub async fn ack(
        &self,
        namespace: &str,
        service: &str,
        version: u64,
        outcome: AckOutcome,
    ) -> Result<(), Error> {
        self.send(agent_message::Kind::Ack(
            outcome.ack(namespace, service, version),
        ))
        .await
    }

    /// Reports the agent's status. Send it at the start of every session
    /// (the control plane keeps none from an earlier stream) and whenever
    /// it changes.
    pub async fn report_status(&self, status: AgentStatus) -> Result<(), Error> {
        self.send(agent_message::Kind::Status(status)).await
    }

    /// Reports the demand on the agent's GLOBAL rate limit buckets, the
    /// whole set, about once a second while it has any.
    pub async fn report_demand(
        &self,
        demand: weir_proto::agent::v1::LimitDemand,
    ) -> Result<(), Error> {
        self.send(agent_message::Kind::Demand(demand)).await
    }

    /// Reports the instances the agent has taken out of its rotation, the
    /// whole set: at the start of every session and whenever it changes.
    pub async fn report_outliers(
        &self,
        outliers: weir_proto::agent::v1::Outliers,
    ) -> Result<(), Error> {
        self.send(agent_message::Kind::Outliers(outliers)).await
    }

    /// Answers request `request_id` (from [`SessionEvent::Request`]).
    pub async fn reply(&self, request_id: u64, body: agent_reply::Body) -> Result<(), Error> {
        self.send(agent_message::Kind::Reply(AgentReply {
            request_id,
            body: Some(body),
        }))
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_become_acks() {
        let a = AckOutcome::Applied.ack("ns", "svc", 7);
        assert!(a.accepted && a.error.is_empty() && a.unenforced.is_empty());
        assert_eq!(
            (a.namespace.as_str(), a.service.as_str(), a.version),
            ("ns", "svc", 7)
        );
        let p = AckOutcome::Partly(vec!["rate_limit".into()]).ack("ns", "svc", 7);
        assert!(p.accepted && p.unenforced == ["rate_limit"]);
        let r = AckOutcome::Rejected("too many rules".into()).ack("ns", "svc", 7);
        assert!(!r.accepted && r.error == "too many rules" && r.unenforced.is_empty());
    }
}
