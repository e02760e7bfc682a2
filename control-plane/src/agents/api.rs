//! `weir.agent.v1.Agents`, for operators: `ListAgents` from the replica's
//! cache, and `AskAgent`, which puts a request to one agent over its
//! session stream wherever that stream is.
//!
//! AskAgent on the replica holding the node's stream sends the request
//! down it and waits for the reply ([`super::streams`]). Any other replica
//! forwards the call to the replica its session record names, at the
//! address that replica advertises (`--advertise-addr`), marking it with
//! the `weir-forwarded-by` header; a forwarded call is answered from local
//! streams only, so a stale record can cost one hop, never a loop.

use std::time::Duration;

use tokio::time::Instant;
use tonic::{transport::Endpoint, Request, Response, Status};
use weir_core::validate;
use weir_proto::agent::v1::{
    agents_client::AgentsClient, agents_server::Agents, AskAgentRequest, AskAgentResponse,
    ListAgentsRequest, ListAgentsResponse,
};

use super::streams::{AskError, LocalStreams};
use crate::{error::ApiError, hub::Hub};

/// Metadata on a forwarded AskAgent: the replica that forwarded it.
pub const FORWARDED_BY: &str = "weir-forwarded-by";
/// How long AskAgent waits for a reply when the caller says nothing.
pub const DEFAULT_ASK_TIMEOUT_MS: u32 = 5000;
pub const MAX_ASK_TIMEOUT_MS: u32 = 60_000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 500;
/// Bound on connecting to the replica a call is forwarded to.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Time a forwarded call's answer may take to come back after its
/// deadline (the holder answers DEADLINE_EXCEEDED at the deadline).
const FORWARD_SLACK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct AgentsApi {
    hub: Hub,
    streams: LocalStreams,
    replica_id: String,
}

fn page_size(requested: u32) -> Result<usize, ApiError> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE as usize),
        n if n <= MAX_PAGE_SIZE => Ok(n as usize),
        n => Err(ApiError::invalid(
            "page_size",
            format!("must be 0-{MAX_PAGE_SIZE} (got {n})"),
        )),
    }
}

/// The wait of an AskAgent call.
fn ask_timeout(requested: u32) -> Result<Duration, ApiError> {
    match requested {
        0 => Ok(Duration::from_millis(u64::from(DEFAULT_ASK_TIMEOUT_MS))),
        n if n <= MAX_ASK_TIMEOUT_MS => Ok(Duration::from_millis(u64::from(n))),
        n => Err(ApiError::invalid(
            "timeout_ms",
            format!("must be 0-{MAX_ASK_TIMEOUT_MS} (got {n})"),
        )),
    }
}

impl AgentsApi {
    pub fn new(hub: Hub, streams: LocalStreams, replica_id: String) -> Self {
        Self {
            hub,
            streams,
            replica_id,
        }
    }

    fn list(&self, req: ListAgentsRequest) -> Result<ListAgentsResponse, ApiError> {
        let limit = page_size(req.page_size)?;
        let after = if req.page_token.is_empty() {
            None
        } else {
            validate::instance_id("page_token", &req.page_token).map_err(|_| {
                ApiError::invalid(
                    "page_token",
                    "must be a next_page_token from a previous ListAgents response",
                )
            })?;
            Some(req.page_token.as_str())
        };
        if !self.hub.is_ready() {
            return Err(ApiError::NotReady);
        }
        let (agents, more, revision) = self.hub.agents_page(after, limit);
        let next_page_token = match agents.last() {
            Some(last) if more => last.node_id.clone(),
            _ => String::new(),
        };
        Ok(ListAgentsResponse {
            agents,
            next_page_token,
            revision,
        })
    }

    async fn ask(
        &self,
        mut req: AskAgentRequest,
        forwarded: bool,
    ) -> Result<AskAgentResponse, Status> {
        let node = req.node_id.clone();
        validate::instance_id("node_id", &node).map_err(ApiError::from)?;
        let body = req
            .request
            .as_ref()
            .and_then(|r| r.body.as_ref())
            .cloned()
            .ok_or_else(|| ApiError::invalid("request.body", "is required"))?;
        let timeout = ask_timeout(req.timeout_ms)?;
        let deadline = Instant::now() + timeout;

        if let Some(stream) = self.streams.get(&node) {
            let reply = stream.ask(body, deadline).await.map_err(|e| match e {
                AskError::Busy => ApiError::Exhausted(format!("node {node}: {e}")),
                AskError::Closed => {
                    ApiError::Unavailable("the agent's stream closed before it replied; retry")
                }
                AskError::TimedOut => ApiError::DeadlineExceeded(format!(
                    "node {node} did not reply within {} ms",
                    timeout.as_millis()
                )),
            })?;
            return Ok(AskAgentResponse {
                reply: Some(reply),
                replica_id: self.replica_id.clone(),
            });
        }
        let not_connected = || ApiError::NotFound(format!("no connected agent of node {node}"));
        if forwarded {
            return Err(ApiError::NotFound(format!(
                "node {node} has no open stream on replica {}",
                self.replica_id
            ))
            .into());
        }
        let session = self.hub.agent_session(&node).ok_or_else(not_connected)?;
        // Named here but not open here: it closed, and its lease waits for
        // a resume. An old record may name no address.
        if session.replica_id == self.replica_id || session.replica_address.is_empty() {
            return Err(not_connected().into());
        }
        req.timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(MAX_ASK_TIMEOUT_MS);
        self.forward(&session.replica_id, &session.replica_address, req, deadline)
            .await
    }

    /// Asks the replica at `address`, which holds the stream, to answer.
    async fn forward(
        &self,
        holder: &str,
        address: &str,
        req: AskAgentRequest,
        deadline: Instant,
    ) -> Result<AskAgentResponse, Status> {
        tracing::debug!(node = %req.node_id, holder, address, "forwarding AskAgent");
        let unreachable = |error: &dyn std::fmt::Display| {
            tracing::warn!(holder, address, %error, "cannot reach the replica holding an agent's stream");
            ApiError::Unavailable("the replica holding the agent's stream is unreachable; retry")
        };
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| unreachable(&e))?
            .connect_timeout(FORWARD_CONNECT_TIMEOUT);
        let channel = endpoint.connect().await.map_err(|e| unreachable(&e))?;
        let mut request = Request::new(req);
        if let Ok(me) = self.replica_id.parse() {
            request.metadata_mut().insert(FORWARDED_BY, me);
        }
        let mut client = AgentsClient::new(channel);
        match tokio::time::timeout_at(deadline + FORWARD_SLACK, client.ask_agent(request)).await {
            Ok(answer) => answer.map(Response::into_inner),
            Err(_) => Err(ApiError::DeadlineExceeded(format!(
                "replica {holder} did not answer in time"
            ))
            .into()),
        }
    }
}

#[tonic::async_trait]
impl Agents for AgentsApi {
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner())?))
    }

    async fn ask_agent(
        &self,
        request: Request<AskAgentRequest>,
    ) -> Result<Response<AskAgentResponse>, Status> {
        let forwarded = request.metadata().get(FORWARDED_BY).is_some();
        Ok(Response::new(
            self.ask(request.into_inner(), forwarded).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_checked_naming_the_field() {
        assert_eq!(page_size(0).expect("default"), 100);
        assert_eq!(page_size(MAX_PAGE_SIZE).expect("max"), 500);
        let e = Status::from(page_size(MAX_PAGE_SIZE + 1).expect_err("over"));
        assert!(e.message().starts_with("page_size:"), "{e:?}");
        assert_eq!(ask_timeout(0).expect("default"), Duration::from_secs(5));
        assert_eq!(ask_timeout(1).expect("min"), Duration::from_millis(1));
        let e = Status::from(ask_timeout(MAX_ASK_TIMEOUT_MS + 1).expect_err("over"));
        assert!(e.message().starts_with("timeout_ms:"), "{e:?}");
    }
}
