//! Calls about agents (`weir.agent.v1.Agents`): list them, ask one.

use std::time::Duration;

use tonic::{transport::Channel, Code};
use weir_proto::agent::v1::{
    agent_reply, agent_request, agents_client::AgentsClient, AgentDescription, AgentRequest,
    AskAgentRequest, AskAgentResponse, DeadLetter, DeadLettersRequest, DescribeRequest,
    GovernanceReply, GovernanceRequest, ListAgentsRequest, ListAgentsResponse,
};

use crate::{each_page, Client, Error, MAX_RESPONSE_BYTES};

fn agents_client(ch: Channel) -> AgentsClient<Channel> {
    AgentsClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

/// Time an AskAgent answer may take past its own timeout (a forwarded call
/// crosses two replicas).
const ASK_SLACK: Duration = Duration::from_secs(2);

impl Client {
    /// One page of agents, connected or not.
    pub async fn list_agents(
        &self,
        request: ListAgentsRequest,
    ) -> Result<ListAgentsResponse, Error> {
        self.call_with("ListAgents", Some(self.unary()), agents_client, |mut c| {
            let request = request.clone();
            async move { c.list_agents(request).await }
        })
        .await
    }

    /// Every agent, page by page (the pages may come from different
    /// revisions).
    pub async fn list_all_agents(&self) -> Result<ListAgentsResponse, Error> {
        let mut all = ListAgentsResponse::default();
        each_page(
            "ListAgents",
            String::new(),
            |page_token| async move {
                let page = self
                    .list_agents(ListAgentsRequest {
                        page_token,
                        ..ListAgentsRequest::default()
                    })
                    .await?;
                let next = page.next_page_token.clone();
                Ok((page, next))
            },
            |page| {
                all.agents.extend(page.agents);
                all.revision = all.revision.max(page.revision);
            },
        )
        .await?;
        Ok(all)
    }

    /// Asks the agent of `node` something over its session and waits up to
    /// `timeout` (at most 60 s) for its reply. [`Error::NotFound`]: no
    /// connected agent of that node; `DEADLINE_EXCEEDED`: it did not reply
    /// in time. Only a replica that could not be reached is tried again on
    /// the next one: a request the agent may have received is not repeated.
    pub async fn ask_agent(
        &self,
        node: &str,
        body: agent_request::Body,
        timeout: Duration,
    ) -> Result<AskAgentResponse, Error> {
        let request = AskAgentRequest {
            node_id: node.to_owned(),
            request: Some(AgentRequest {
                request_id: 0,
                body: Some(body),
            }),
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
        };
        self.call_retrying(
            "AskAgent",
            Some(timeout + ASK_SLACK),
            |code| code == Code::Unavailable,
            agents_client,
            |mut c| {
                let request = request.clone();
                async move { c.ask_agent(request).await }
            },
        )
        .await
    }

    /// Asks the agent of `node` to describe itself ([`Client::ask_agent`]
    /// with a `DescribeRequest`): its description, and the replica whose
    /// stream carried the request. [`Error::Agent`] when it answered with
    /// an error of its own.
    pub async fn describe_agent(
        &self,
        node: &str,
        timeout: Duration,
    ) -> Result<(AgentDescription, String), Error> {
        let answer = self
            .ask_agent(
                node,
                agent_request::Body::Describe(DescribeRequest {}),
                timeout,
            )
            .await?;
        match answer.reply.and_then(|r| r.body) {
            Some(agent_reply::Body::Describe(d)) => Ok((d, answer.replica_id)),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the agent of `node` to list, replay or purge its dead letters
    /// ([`Client::ask_agent`] with a `DeadLettersRequest`): those the
    /// request matched. [`Error::Agent`] when it answered with an error of
    /// its own (an agent without an outbox, say).
    pub async fn dead_letters(
        &self,
        node: &str,
        request: DeadLettersRequest,
        timeout: Duration,
    ) -> Result<Vec<DeadLetter>, Error> {
        let answer = self
            .ask_agent(node, agent_request::Body::DeadLetters(request), timeout)
            .await?;
        match answer.reply.and_then(|r| r.body) {
            Some(agent_reply::Body::DeadLetters(d)) => Ok(d.letters),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the agent of `node` what its rate limits and circuit breakers
    /// are doing ([`Client::ask_agent`] with a `GovernanceRequest`).
    pub async fn governance(
        &self,
        node: &str,
        request: GovernanceRequest,
        timeout: Duration,
    ) -> Result<GovernanceReply, Error> {
        let answer = self
            .ask_agent(node, agent_request::Body::Governance(request), timeout)
            .await?;
        match answer.reply.and_then(|r| r.body) {
            Some(agent_reply::Body::Governance(g)) => Ok(g),
            other => Err(unexpected(other)),
        }
    }
}

/// An agent's reply that is not the one asked for: its own error, or a
/// protocol error.
fn unexpected(body: Option<agent_reply::Body>) -> Error {
    match body {
        Some(agent_reply::Body::Error(e)) => {
            Error::Agent(format!("{}: {}", e.kind().as_str_name(), e.message))
        }
        Some(_) => Error::Protocol("the agent answered another kind of request".into()),
        None => Error::Protocol("an empty reply from the agent".into()),
    }
}
