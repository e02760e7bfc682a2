//! Policy calls (`weir.policy.v1.PolicyService`).

use weir_proto::policy::v1::{
    policy_service_client::PolicyServiceClient, DeletePolicyRequest, DeletePolicyResponse,
    GetPolicyRequest, ListPoliciesRequest, ListPoliciesResponse, PolicyHistoryRequest,
    PolicyStatusRequest, PolicyStatusResponse, PolicyVersion, PutPolicyRequest,
    RollbackPolicyRequest, TrafficPolicy,
};

use crate::{Client, Error};

fn policy_client(ch: tonic::transport::Channel) -> PolicyServiceClient<tonic::transport::Channel> {
    PolicyServiceClient::new(ch).max_decoding_message_size(64 * 1024 * 1024)
}

fn current(v: Option<PolicyVersion>) -> Result<PolicyVersion, Error> {
    v.ok_or_else(|| Error::Protocol("answer without the current version".into()))
}

impl Client {
    /// The current policy of a service ([`Error::NotFound`] if none).
    pub async fn get_policy(&self, namespace: &str, service: &str) -> Result<PolicyVersion, Error> {
        let request = GetPolicyRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        };
        let r = self
            .call_with("policy Get", Some(self.unary()), policy_client, |mut c| {
                let request = request.clone();
                async move { c.get(request).await }
            })
            .await?;
        current(r.current)
    }

    /// Writes a policy. `expected_version`: None = unconditional, Some(0) =
    /// only if none exists, Some(v) = only if the current version is v
    /// (else `FailedPrecondition`, naming the current version).
    pub async fn put_policy(
        &self,
        policy: TrafficPolicy,
        expected_version: Option<u64>,
    ) -> Result<PolicyVersion, Error> {
        let request = PutPolicyRequest {
            policy: Some(policy),
            expected_version,
        };
        let r = self
            .call_with("policy Put", Some(self.unary()), policy_client, |mut c| {
                let request = request.clone();
                async move { c.put(request).await }
            })
            .await?;
        current(r.current)
    }

    pub async fn delete_policy(
        &self,
        namespace: &str,
        service: &str,
        expected_version: Option<u64>,
    ) -> Result<DeletePolicyResponse, Error> {
        let request = DeletePolicyRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            expected_version,
        };
        self.call_with(
            "policy Delete",
            Some(self.unary()),
            policy_client,
            |mut c| {
                let request = request.clone();
                async move { c.delete(request).await }
            },
        )
        .await
    }

    pub async fn list_policies(&self, namespace: &str) -> Result<ListPoliciesResponse, Error> {
        let request = ListPoliciesRequest {
            namespace: namespace.to_owned(),
        };
        self.call_with("policy List", Some(self.unary()), policy_client, |mut c| {
            let request = request.clone();
            async move { c.list(request).await }
        })
        .await
    }

    /// Versions, newest (current) first.
    pub async fn policy_history(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<Vec<PolicyVersion>, Error> {
        let request = PolicyHistoryRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        };
        Ok(self
            .call_with(
                "policy History",
                Some(self.unary()),
                policy_client,
                |mut c| {
                    let request = request.clone();
                    async move { c.history(request).await }
                },
            )
            .await?
            .versions)
    }

    pub async fn rollback_policy(
        &self,
        namespace: &str,
        service: &str,
        to_version: u64,
        expected_version: Option<u64>,
    ) -> Result<PolicyVersion, Error> {
        let request = RollbackPolicyRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            to_version,
            expected_version,
        };
        let r = self
            .call_with(
                "policy Rollback",
                Some(self.unary()),
                policy_client,
                |mut c| {
                    let request = request.clone();
                    async move { c.rollback(request).await }
                },
            )
            .await?;
        current(r.current)
    }

    /// Which connected agents run, rejected, or have yet to report on the
    /// current version.
    pub async fn policy_status(
        &self,
        namespace: &str,
        service: &str,
    ) -> Result<PolicyStatusResponse, Error> {
        let request = PolicyStatusRequest {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
        };
        self.call_with(
            "policy Status",
            Some(self.unary()),
            policy_client,
            |mut c| {
                let request = request.clone();
                async move { c.status(request).await }
            },
        )
        .await
    }
}
