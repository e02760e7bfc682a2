//! The names that identify an instance. The control plane maps them onto
//! its etcd key layout; the agent onto its node's local registrations.

use std::fmt;

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
