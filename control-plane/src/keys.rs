//! Key layout in the store. Everything lives under one root (default
//! `/weir`), versioned so a later layout can live beside this one:
//!
//! ```text
//! {root}/v1/instances/{namespace}/{service}/{instance_id}   Instance (protobuf), leased when ephemeral (its own
//!                                                           lease, or its agent session's); status + HealthDetail
//! {root}/v1/health/{namespace}/{service}/{instance_id}      HealthHistory (last transitions), leased with the instance
//! {root}/v1/services/{namespace}/{service}                  ServiceConfig (protection threshold)
//! {root}/v1/replicas/{replica_id}                           control-plane replica, leased (check sharing)
//! {root}/v1/policies/{namespace}/{service}                  PolicyRecord (current policy + previous versions)
//! {root}/v1/agents/{node_id}                                AgentRecord, leased by the agent's session
//! {root}/v1/agents-seen/{node_id}                           AgentRecord, the last-seen record: no lease,
//!                                                           dropped after the agent retention
//! {root}/v1/acks/{namespace}/{service}/{node_id}            AgentPolicyState, leased by the agent's session
//! {root}/v1/outliers/{node_id}/{namespace}/{service}/{id}   Outlier an agent reported, leased by its session
//! {root}/v1/demand/{node_id}/{namespace}/{service}/{rule}   BucketDemand on a GLOBAL limit, leased by its session
//! {root}/v1/shares/{namespace}/{service}/{rule}             LimitAllocation of a GLOBAL limit among agents
//! ```
//!
//! Names are validated before they become keys (DNS labels for namespace and
//! service; no '/' in instance ids), and every prefix ends with '/', so the
//! range of service `a` never includes service `ab`.

use weir_core::InstanceKey;

/// Builds and parses keys under one root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    root: String,
}

impl Keys {
    /// `root` like `/weir`; a trailing '/' is ignored.
    pub fn new(root: &str) -> Self {
        Self {
            root: format!("{}/v1/", root.trim_end_matches('/')),
        }
    }

    /// Prefix of every key Weir owns (what a replica watches).
    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn instance(&self, k: &InstanceKey) -> String {
        format!(
            "{}instances/{}/{}/{}",
            self.root, k.namespace, k.service, k.instance_id
        )
    }

    pub fn health(&self, k: &InstanceKey) -> String {
        format!(
            "{}health/{}/{}/{}",
            self.root, k.namespace, k.service, k.instance_id
        )
    }

    /// Prefix of the health histories of one service.
    pub fn health_prefix(&self, namespace: &str, service: &str) -> String {
        format!("{}health/{namespace}/{service}/", self.root)
    }

    pub fn service_config(&self, namespace: &str, service: &str) -> String {
        format!("{}services/{namespace}/{service}", self.root)
    }

    /// (namespace, service) of a service-config key.
    pub fn parse_service_config(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("services/")?;
        let (namespace, service) = rest.split_once('/')?;
        if namespace.is_empty() || service.is_empty() || service.contains('/') {
            return None;
        }
        Some((namespace.to_owned(), service.to_owned()))
    }

    pub fn policy(&self, namespace: &str, service: &str) -> String {
        format!("{}policies/{namespace}/{service}", self.root)
    }

    /// Prefix of the policies of a namespace (all when empty).
    pub fn policies_prefix(&self, namespace: &str) -> String {
        if namespace.is_empty() {
            format!("{}policies/", self.root)
        } else {
            format!("{}policies/{namespace}/", self.root)
        }
    }

    /// (namespace, service) of a policy key.
    pub fn parse_policy(&self, key: &str) -> Option<(String, String)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("policies/")?;
        let (namespace, service) = rest.split_once('/')?;
        if namespace.is_empty() || service.is_empty() || service.contains('/') {
            return None;
        }
        Some((namespace.to_owned(), service.to_owned()))
    }

    pub fn agent(&self, node_id: &str) -> String {
        format!("{}agents/{node_id}", self.root)
    }

    /// The node id of an agent key.
    pub fn parse_agent(&self, key: &str) -> Option<String> {
        let id = key.strip_prefix(&self.root)?.strip_prefix("agents/")?;
        (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
    }

    /// The unleased last-seen record of an agent.
    pub fn agent_seen(&self, node_id: &str) -> String {
        format!("{}agents-seen/{node_id}", self.root)
    }

    /// The node id of a last-seen key.
    pub fn parse_agent_seen(&self, key: &str) -> Option<String> {
        let id = key.strip_prefix(&self.root)?.strip_prefix("agents-seen/")?;
        (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
    }

    pub fn ack(&self, namespace: &str, service: &str, node_id: &str) -> String {
        format!("{}acks/{namespace}/{service}/{node_id}", self.root)
    }

    pub fn acks_prefix(&self, namespace: &str, service: &str) -> String {
        format!("{}acks/{namespace}/{service}/", self.root)
    }

    /// What `node`'s agent reported about an instance.
    pub fn outlier(&self, node_id: &str, k: &InstanceKey) -> String {
        format!(
            "{}outliers/{node_id}/{}/{}/{}",
            self.root, k.namespace, k.service, k.instance_id
        )
    }

    /// Prefix of every outlier report, or of one node's.
    pub fn outliers_prefix(&self, node_id: Option<&str>) -> String {
        match node_id {
            Some(node) => format!("{}outliers/{node}/", self.root),
            None => format!("{}outliers/", self.root),
        }
    }

    /// (node, instance) of an outlier key.
    pub fn parse_outlier(&self, key: &str) -> Option<(String, InstanceKey)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("outliers/")?;
        let mut parts = rest.splitn(4, '/');
        let node = parts.next()?;
        let namespace = parts.next()?;
        let service = parts.next()?;
        let instance_id = parts.next()?;
        if [node, namespace, service, instance_id]
            .iter()
            .any(|p| p.is_empty())
            || instance_id.contains('/')
        {
            return None;
        }
        Some((
            node.to_owned(),
            InstanceKey {
                namespace: namespace.to_owned(),
                service: service.to_owned(),
                instance_id: instance_id.to_owned(),
            },
        ))
    }

    /// `node`'s demand on a GLOBAL rate limit bucket.
    pub fn demand(&self, node_id: &str, namespace: &str, service: &str, rule: &str) -> String {
        format!("{}demand/{node_id}/{namespace}/{service}/{rule}", self.root)
    }

    /// Prefix of every demand, or of one node's.
    pub fn demand_prefix(&self, node_id: Option<&str>) -> String {
        match node_id {
            Some(node) => format!("{}demand/{node}/", self.root),
            None => format!("{}demand/", self.root),
        }
    }

    /// (node, (namespace, service, rule)) of a demand key.
    pub fn parse_demand(&self, key: &str) -> Option<(String, (String, String, String))> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("demand/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [node, ns, svc, rule] if parts.iter().all(|p| !p.is_empty()) => Some((
                (*node).to_owned(),
                ((*ns).to_owned(), (*svc).to_owned(), (*rule).to_owned()),
            )),
            _ => None,
        }
    }

    /// The allocation of a GLOBAL rate limit.
    pub fn shares(&self, namespace: &str, service: &str, rule: &str) -> String {
        format!("{}shares/{namespace}/{service}/{rule}", self.root)
    }

    pub fn shares_prefix(&self) -> String {
        format!("{}shares/", self.root)
    }

    /// (namespace, service, rule) of an allocation key.
    pub fn parse_shares(&self, key: &str) -> Option<(String, String, String)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("shares/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [ns, svc, rule] if parts.iter().all(|p| !p.is_empty()) => {
                Some(((*ns).to_owned(), (*svc).to_owned(), (*rule).to_owned()))
            }
            _ => None,
        }
    }

    /// (namespace, service, node) of an ack key.
    pub fn parse_ack(&self, key: &str) -> Option<(String, String, String)> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("acks/")?;
        let mut parts = rest.splitn(3, '/');
        let (namespace, service, node) = (parts.next()?, parts.next()?, parts.next()?);
        if namespace.is_empty() || service.is_empty() || node.is_empty() || node.contains('/') {
            return None;
        }
        Some((namespace.to_owned(), service.to_owned(), node.to_owned()))
    }

    pub fn replica(&self, id: &str) -> String {
        format!("{}replicas/{id}", self.root)
    }

    /// The id of a replica key.
    pub fn parse_replica(&self, key: &str) -> Option<String> {
        let id = key.strip_prefix(&self.root)?.strip_prefix("replicas/")?;
        (!id.is_empty() && !id.contains('/')).then(|| id.to_owned())
    }

    /// Parses an instance key; None for keys of other kinds or malformed ones.
    pub fn parse_instance(&self, key: &str) -> Option<InstanceKey> {
        let rest = key.strip_prefix(&self.root)?.strip_prefix("instances/")?;
        let mut parts = rest.splitn(3, '/');
        let namespace = parts.next()?;
        let service = parts.next()?;
        let instance_id = parts.next()?;
        if namespace.is_empty()
            || service.is_empty()
            || instance_id.is_empty()
            || instance_id.contains('/')
        {
            return None;
        }
        Some(InstanceKey {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            instance_id: instance_id.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_prefix_safety() {
        let keys = Keys::new("/weir/");
        let k = InstanceKey {
            namespace: "default".into(),
            service: "a".into(),
            instance_id: "i-1".into(),
        };
        let key = keys.instance(&k);
        assert_eq!(key, "/weir/v1/instances/default/a/i-1");
        assert_eq!(keys.parse_instance(&key), Some(k.clone()));
        assert!(!"/weir/v1/instances/default/ab/i-1".starts_with("/weir/v1/instances/default/a/"));
        assert_eq!(keys.parse_instance("/weir/v1/policies/default/a"), None);
        assert_eq!(keys.parse_instance("/other/v1/instances/default/a/i"), None);
        assert_eq!(keys.parse_instance("/weir/v1/instances/default/a/"), None);
        assert_eq!(
            keys.parse_replica(&keys.replica("cp-1")),
            Some("cp-1".into())
        );
        assert_eq!(keys.parse_replica("/weir/v1/replicas/"), None);
        assert_eq!(
            keys.parse_service_config(&keys.service_config("default", "a")),
            Some(("default".into(), "a".into()))
        );
        assert_eq!(keys.parse_instance(&keys.health(&k)), None);
        assert_eq!(
            keys.parse_policy(&keys.policy("default", "a")),
            Some(("default".into(), "a".into()))
        );
        assert_eq!(keys.parse_policy(&keys.ack("default", "a", "n1")), None);
        assert_eq!(
            keys.parse_agent(&keys.agent("node-1")),
            Some("node-1".into())
        );
        // The last-seen record is not a session record, nor the reverse.
        let seen = keys.agent_seen("node-1");
        assert_eq!(keys.parse_agent(&seen), None);
        assert_eq!(keys.parse_agent_seen(&seen), Some("node-1".into()));
        assert_eq!(keys.parse_agent_seen(&keys.agent("node-1")), None);
        assert_eq!(
            keys.parse_ack(&keys.ack("default", "a", "n1")),
            Some(("default".into(), "a".into(), "n1".into()))
        );
        assert_eq!(keys.parse_ack("/weir/v1/acks/default/a/"), None);
        assert_eq!(
            keys.parse_outlier(&keys.outlier("n1", &k)),
            Some(("n1".into(), k.clone()))
        );
        assert!(keys
            .outlier("n1", &k)
            .starts_with(&keys.outliers_prefix(Some("n1"))));
        assert_eq!(keys.parse_instance(&keys.outlier("n1", &k)), None);
        assert_eq!(keys.parse_outlier("/weir/v1/outliers/n1/default/a/"), None);
        let bucket = ("default".to_owned(), "a".to_owned(), "bulk".to_owned());
        assert_eq!(
            keys.parse_demand(&keys.demand("n1", "default", "a", "bulk")),
            Some(("n1".into(), bucket.clone()))
        );
        assert!(keys
            .demand("n1", "default", "a", "bulk")
            .starts_with(&keys.demand_prefix(Some("n1"))));
        assert_eq!(
            keys.parse_shares(&keys.shares("default", "a", "bulk")),
            Some(bucket)
        );
        assert_eq!(
            keys.parse_shares(&keys.demand("n1", "default", "a", "bulk")),
            None
        );
        assert_eq!(
            keys.parse_instance(&keys.shares("default", "a", "bulk")),
            None
        );
        assert_eq!(keys.parse_ack(&keys.policy("default", "a")), None);
    }
}
