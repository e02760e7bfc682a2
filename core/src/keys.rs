//! The names that identify an instance. The control plane maps them onto
//! its etcd key layout; the agent onto its node's local registrations.

use std::fmt;

use weir_proto::registry::v1::{Instance, InstanceRef};

/// The three names that identify an instance. Displays as
/// `namespace/service/instance_id`, the form logs and messages use.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    pub namespace: String,
    pub service: String,
    pub instance_id: String,
}

impl fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.namespace, self.service, self.instance_id
        )
    }
}

impl InstanceKey {
    /// The key of an instance record (its namespace as stored: records
    /// carry it filled in).
    pub fn of(i: &Instance) -> Self {
        Self {
            namespace: i.namespace.clone(),
            service: i.service.clone(),
            instance_id: i.instance_id.clone(),
        }
    }
}

impl From<&InstanceKey> for InstanceRef {
    fn from(k: &InstanceKey) -> Self {
        Self {
            namespace: k.namespace.clone(),
            service: k.service.clone(),
            instance_id: k.instance_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_a_path() {
        let k = InstanceKey {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "i-1".into(),
        };
        assert_eq!(k.to_string(), "default/orders/i-1");
    }
}
