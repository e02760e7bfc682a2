//! Calls about agents (`weir.agent.v1.Agents`).

use tonic::transport::Channel;
use weir_proto::agent::v1::{agents_client::AgentsClient, ListAgentsRequest, ListAgentsResponse};

use crate::{each_page, Client, Error, MAX_RESPONSE_BYTES};

fn agents_client(ch: Channel) -> AgentsClient<Channel> {
    AgentsClient::new(ch).max_decoding_message_size(MAX_RESPONSE_BYTES)
}

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
}
