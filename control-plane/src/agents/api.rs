//! `weir.agent.v1.Agents`, for operators: `ListAgents` from the replica's
//! cache.

use tonic::{Request, Response, Status};
use weir_core::validate;
use weir_proto::agent::v1::{agents_server::Agents, ListAgentsRequest, ListAgentsResponse};

use crate::{error::ApiError, hub::Hub};

pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 500;

#[derive(Clone, Debug)]
pub struct AgentsApi {
    hub: Hub,
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

impl AgentsApi {
    pub fn new(hub: Hub) -> Self {
        Self { hub }
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
}

#[tonic::async_trait]
impl Agents for AgentsApi {
    async fn list_agents(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner())?))
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
    }
}
