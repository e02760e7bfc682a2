//! Stand-in agents: sessions opened through `weir_client::AgentSession`,
//! speaking the protocol the weir-agent speaks, and the waits the agent
//! e2e tests share.

use std::time::Duration;

use anyhow::{bail, Result};
use weir_client::{
    agent::{
        agent_reply, agent_request, reply_error, AgentDescription, Hello, PolicyUpdate, ReplyError,
    },
    policy::{PolicyStatusResponse, TrafficPolicy},
    AckOutcome, AgentSession, Client, SessionEvent,
};

use crate::wait_until;

/// A Hello for `node` in zone `a`.
pub fn hello(node: &str) -> Hello {
    Hello {
        node_id: node.into(),
        zone: "a".into(),
        version: "test".into(),
        ingress_address: "127.0.0.1:9000".into(),
        ..Hello::default()
    }
}

/// The next policy update of a session (other messages skipped), bounded.
pub async fn next_policies(session: &mut AgentSession) -> Result<PolicyUpdate> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), session.next()).await?? {
            Some(SessionEvent::Policies(u)) => return Ok(u),
            Some(_) => continue,
            None => bail!("session closed"),
        }
    }
}

/// Waits up to 10 s until the policy status of `default/service` on
/// `client` satisfies `done`.
pub async fn policy_status_until(
    client: &Client,
    service: &str,
    what: &str,
    done: impl Fn(&PolicyStatusResponse) -> bool,
) -> Result<()> {
    let done = &done;
    wait_until(Duration::from_secs(10), what, || {
        let client = client.clone();
        async move {
            client
                .policy_status("default", service)
                .await
                .is_ok_and(|s| done(&s))
        }
    })
    .await
}

/// Puts `policy` as `default/service`'s and waits up to 10 s until the
/// one connected agent runs it in full.
pub async fn put_policy_applied(
    client: &Client,
    service: &str,
    policy: TrafficPolicy,
) -> Result<()> {
    client
        .put_policy(
            TrafficPolicy {
                namespace: "default".into(),
                service: service.into(),
                ..policy
            },
            None,
        )
        .await?;
    policy_status_until(
        client,
        service,
        &format!("the agent applying {service}'s policy in full"),
        |s| s.applied == 1,
    )
    .await
}

/// How a stand-in agent behaves.
#[derive(Clone, Debug)]
pub struct StandIn {
    /// How it acknowledges every policy it is sent.
    pub ack: AckOutcome,
    /// Its answer to a DescribeRequest (its policy revision is filled in);
    /// None: it never answers a request.
    pub describe: Option<AgentDescription>,
}

impl Default for StandIn {
    fn default() -> Self {
        Self {
            ack: AckOutcome::Applied,
            describe: Some(AgentDescription {
                version: "test".into(),
                ..AgentDescription::default()
            }),
        }
    }
}

/// Runs a stand-in agent on `session` until the server closes it.
pub async fn run_stand_in(mut session: AgentSession, behaviour: StandIn) -> Result<()> {
    while let Some(event) = session.next().await? {
        match event {
            SessionEvent::Policies(update) => {
                for c in update.changes.iter().filter(|c| c.policy.is_some()) {
                    session
                        .ack(&c.namespace, &c.service, c.version, behaviour.ack.clone())
                        .await?;
                }
            }
            SessionEvent::Request(request) => {
                let Some(describe) = &behaviour.describe else {
                    continue;
                };
                let body = match request.body {
                    Some(agent_request::Body::Describe(_)) => {
                        agent_reply::Body::Describe(AgentDescription {
                            policy_revision: session.policy_revision(),
                            registry_revision: session.registry_revision(),
                            ..describe.clone()
                        })
                    }
                    // A stand-in has no outbox, limits or breakers.
                    Some(
                        agent_request::Body::DeadLetters(_) | agent_request::Body::Governance(_),
                    )
                    | None => agent_reply::Body::Error(ReplyError {
                        kind: reply_error::Kind::Unsupported as i32,
                        message: "an unknown request".into(),
                    }),
                };
                session.reply(request.request_id, body).await?;
            }
            _ => {}
        }
    }
    Ok(())
}
