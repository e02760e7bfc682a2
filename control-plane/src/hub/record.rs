//! Stored records as the hub's subscribers receive them. Pure decoding: a
//! record that does not decode is logged and skipped, never fatal.

use prost::Message;
use weir_proto::{
    agent::v1::PolicyChange,
    policy::v1::PolicyRecord,
    registry::v1::{Event, EventType, Instance},
};

use weir_core::InstanceKey;

use crate::{
    keys::Keys,
    store::{EventKind, WatchEvent},
};

/// Decodes a stored instance record; the key is the truth for its names.
pub fn decode_instance(
    key: &InstanceKey,
    value: &[u8],
    mod_revision: u64,
) -> Result<Instance, prost::DecodeError> {
    let mut i = Instance::decode(value)?;
    i.namespace.clone_from(&key.namespace);
    i.service.clone_from(&key.service);
    i.instance_id.clone_from(&key.instance_id);
    i.revision = mod_revision;
    Ok(i)
}

/// A stored policy record as the change agents receive.
pub(super) fn decode_policy(
    namespace: &str,
    service: &str,
    value: &[u8],
    version: u64,
) -> Option<PolicyChange> {
    match PolicyRecord::decode(value) {
        Ok(record) => Some(PolicyChange {
            namespace: namespace.to_owned(),
            service: service.to_owned(),
            version,
            policy: record.policy,
        }),
        Err(e) => {
            tracing::warn!(namespace, service, error = %e, "skipping undecodable policy record");
            None
        }
    }
}

/// A watched (or historical) change of a policy key as agents receive it:
/// the new policy, or none for a deletion.
pub(super) fn policy_change(
    namespace: String,
    service: String,
    change: &WatchEvent,
) -> Option<PolicyChange> {
    match change.kind {
        EventKind::Put => decode_policy(
            &namespace,
            &service,
            &change.kv.value,
            change.kv.mod_revision,
        ),
        EventKind::Delete => Some(PolicyChange {
            namespace,
            service,
            version: change.kv.mod_revision,
            policy: None,
        }),
    }
}

/// A change read back from the store's history as a watch event (a delete
/// there carries the removed record).
pub(super) fn history_event(keys: &Keys, change: WatchEvent) -> Option<Event> {
    let key = keys.parse_instance(&change.kv.key)?;
    let revision = change.kv.mod_revision;
    let decoded = decode_instance(&key, &change.kv.value, revision);
    let (r#type, instance) = match (change.kind, decoded) {
        (EventKind::Put, Ok(i)) => (EventType::Put, i),
        (EventKind::Put, Err(e)) => {
            tracing::warn!(key = %change.kv.key, error = %e, "skipping undecodable instance record in history");
            return None;
        }
        (EventKind::Delete, Ok(i)) => (EventType::Delete, i),
        // The removed record did not decode: the key still says which
        // instance left.
        (EventKind::Delete, Err(_)) => (
            EventType::Delete,
            Instance {
                namespace: key.namespace,
                service: key.service,
                instance_id: key.instance_id,
                revision,
                ..Instance::default()
            },
        ),
    };
    Some(Event {
        r#type: r#type as i32,
        instance: Some(instance),
        revision,
    })
}
