//! The cache's view of the agents: session records (leased), last-seen
//! records (unleased) and acknowledgements, as the store watch delivers
//! them. Pure, like the rest of the cache; `ListAgents`, `AskAgent` and the
//! last-seen sweep read it through the hub.
//!
//! "Connected" is decided here, once: an agent is connected while its
//! session record lives and its last-seen record does not say that very
//! stream (the one `connected_at_unix_ms` names) has ended. So a clean
//! close shows at once, while the session lease still waits (TTL) for a
//! resume, and a stream that moved to another replica is not mistaken for
//! a closed one.

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Bound,
    sync::Arc,
};

use prost::Message;
use weir_proto::{
    agent::v1::{applied_policy::Outcome, AgentInfo, AgentRecord, AppliedPolicy},
    policy::v1::AgentPolicyState,
};

use crate::{
    keys::Keys,
    store::{EventKind, KeyValue},
};

/// A last-seen record and the revision it was read at (for a
/// compare-and-put that must not overwrite a newer write).
#[derive(Clone, Debug)]
pub struct Seen {
    pub record: Arc<AgentRecord>,
    pub mod_revision: u64,
}

/// (namespace, service).
type ServiceName = (String, String);

#[derive(Debug, Default)]
pub(super) struct AgentTable {
    /// Nodes with a live session, by node id.
    sessions: BTreeMap<String, Arc<AgentRecord>>,
    /// Last-seen records, by node id.
    seen: BTreeMap<String, Seen>,
    /// Per node, its acknowledgement of each service's policy.
    acks: BTreeMap<String, BTreeMap<ServiceName, AgentPolicyState>>,
}

/// A session record. One that does not decode (written by an older
/// replica, as text) still says the node is connected.
fn session_record(node: &str, value: &[u8]) -> AgentRecord {
    AgentRecord::decode(value).unwrap_or_else(|_| AgentRecord {
        node_id: node.to_owned(),
        ..AgentRecord::default()
    })
}

/// How an acknowledgement reads in a listing.
fn applied_policy(namespace: &str, service: &str, s: &AgentPolicyState) -> AppliedPolicy {
    let outcome = if !s.accepted {
        Outcome::Rejected
    } else if s.unenforced.is_empty() {
        Outcome::Applied
    } else {
        Outcome::Partly
    };
    AppliedPolicy {
        namespace: namespace.to_owned(),
        service: service.to_owned(),
        version: s.version,
        outcome: outcome as i32,
        unenforced: s.unenforced.clone(),
        error: s.error.clone(),
        at_unix_ms: s.at_unix_ms,
    }
}

impl AgentTable {
    /// Takes a put or delete of an agent, last-seen or ack key; false if
    /// the key is none of these.
    pub(super) fn apply(&mut self, keys: &Keys, kind: EventKind, kv: &KeyValue) -> bool {
        if let Some(node) = keys.parse_agent(&kv.key) {
            match kind {
                EventKind::Put => {
                    self.sessions
                        .insert(node.clone(), Arc::new(session_record(&node, &kv.value)));
                }
                EventKind::Delete => {
                    self.sessions.remove(&node);
                }
            }
        } else if let Some(node) = keys.parse_agent_seen(&kv.key) {
            match kind {
                EventKind::Put => match AgentRecord::decode(kv.value.as_slice()) {
                    Ok(mut record) => {
                        // The key is the truth for the node's name.
                        record.node_id.clone_from(&node);
                        self.seen.insert(
                            node,
                            Seen {
                                record: Arc::new(record),
                                mod_revision: kv.mod_revision,
                            },
                        );
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "skipping undecodable last-seen record");
                    }
                },
                EventKind::Delete => {
                    self.seen.remove(&node);
                }
            }
        } else if let Some((namespace, service, node)) = keys.parse_ack(&kv.key) {
            match kind {
                EventKind::Put => match AgentPolicyState::decode(kv.value.as_slice()) {
                    Ok(state) => {
                        self.acks
                            .entry(node)
                            .or_default()
                            .insert((namespace, service), state);
                    }
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "skipping undecodable ack");
                    }
                },
                EventKind::Delete => {
                    if let Some(acks) = self.acks.get_mut(&node) {
                        acks.remove(&(namespace, service));
                        if acks.is_empty() {
                            self.acks.remove(&node);
                        }
                    }
                }
            }
        } else {
            return false;
        }
        true
    }

    /// Nodes with a live session.
    pub(super) fn sessions(&self) -> BTreeSet<String> {
        self.sessions.keys().cloned().collect()
    }

    /// The session record of a node, while its session lives.
    pub(super) fn session(&self, node: &str) -> Option<Arc<AgentRecord>> {
        self.sessions.get(node).cloned()
    }

    /// Every last-seen record with the session record of its node, if any.
    pub(super) fn seen(&self) -> Vec<(Seen, Option<Arc<AgentRecord>>)> {
        self.seen
            .iter()
            .map(|(node, s)| (s.clone(), self.sessions.get(node).cloned()))
            .collect()
    }

    /// The agents after `after` (exclusive) in node order, at most `limit`,
    /// and whether more follow.
    pub(super) fn page(&self, after: Option<&str>, limit: usize) -> (Vec<AgentInfo>, bool) {
        let from = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Unbounded,
        };
        let range = (from, Bound::Unbounded);
        // The first limit + 1 nodes of the union are among the first
        // limit + 1 of each map.
        let mut nodes: BTreeSet<&String> = self
            .sessions
            .range::<String, _>(range.clone())
            .map(|(n, _)| n)
            .take(limit + 1)
            .collect();
        nodes.extend(
            self.seen
                .range::<String, _>(range)
                .map(|(n, _)| n)
                .take(limit + 1),
        );
        let more = nodes.len() > limit;
        let page = nodes
            .into_iter()
            .take(limit)
            .map(|node| self.info(node))
            .collect();
        (page, more)
    }

    fn info(&self, node: &str) -> AgentInfo {
        let session = self.sessions.get(node).map(|r| &**r);
        let seen = self.seen.get(node).map(|s| &*s.record);
        let stream_ended = seen.is_some_and(|s| {
            !s.connected && session.is_none_or(|r| r.connected_at_unix_ms == s.connected_at_unix_ms)
        });
        let connected = session.is_some() && !stream_ended;
        let base = session.or(seen).cloned().unwrap_or_default();
        let last_seen_unix_ms = seen.map_or(base.connected_at_unix_ms, |s| s.last_seen_unix_ms);
        let policies = self
            .acks
            .get(node)
            .map(|acks| {
                acks.iter()
                    .map(|((ns, svc), state)| applied_policy(ns, svc, state))
                    .collect()
            })
            .unwrap_or_default();
        AgentInfo {
            node_id: node.to_owned(),
            zone: base.zone,
            version: base.version,
            ingress_address: base.ingress_address,
            replica_id: base.replica_id,
            connected,
            status: seen.and_then(|s| s.status.clone()),
            last_seen_unix_ms,
            disconnected_since_unix_ms: if connected { 0 } else { last_seen_unix_ms },
            policies,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::new("/t")
    }

    fn kv(key: &str, value: Vec<u8>, mod_revision: u64) -> KeyValue {
        KeyValue {
            key: key.to_owned(),
            value,
            create_revision: mod_revision,
            mod_revision,
            lease: 0,
        }
    }

    fn record(node: &str, connected_at: i64, connected: bool, last_seen: i64) -> AgentRecord {
        AgentRecord {
            node_id: node.into(),
            zone: "z1".into(),
            replica_id: "cp-a".into(),
            connected_at_unix_ms: connected_at,
            connected,
            last_seen_unix_ms: last_seen,
            ..AgentRecord::default()
        }
    }

    fn put(t: &mut AgentTable, key: &str, value: Vec<u8>, rev: u64) {
        assert!(t.apply(&keys(), EventKind::Put, &kv(key, value, rev)));
    }

    fn del(t: &mut AgentTable, key: &str, rev: u64) {
        assert!(t.apply(&keys(), EventKind::Delete, &kv(key, Vec::new(), rev)));
    }

    fn one(t: &AgentTable) -> AgentInfo {
        let (page, more) = t.page(None, 10);
        assert!(!more);
        assert_eq!(page.len(), 1, "{page:?}");
        page.into_iter().next().expect("one")
    }

    #[test]
    fn connected_follows_the_session_and_the_end_of_its_stream() {
        let k = keys();
        let mut t = AgentTable::default();
        // Open: session and last-seen for stream 100.
        put(
            &mut t,
            &k.agent("n1"),
            record("n1", 100, true, 0).encode_to_vec(),
            2,
        );
        put(
            &mut t,
            &k.agent_seen("n1"),
            record("n1", 100, true, 100).encode_to_vec(),
            3,
        );
        let a = one(&t);
        assert!(a.connected && a.disconnected_since_unix_ms == 0, "{a:?}");
        assert_eq!((a.zone.as_str(), a.last_seen_unix_ms), ("z1", 100));

        // The stream closes: disconnected at once, the lease still alive.
        put(
            &mut t,
            &k.agent_seen("n1"),
            record("n1", 100, false, 150).encode_to_vec(),
            4,
        );
        let a = one(&t);
        assert!(!a.connected && a.disconnected_since_unix_ms == 150, "{a:?}");

        // It reconnects (stream 200) before the old stream's close was
        // recorded: the old close does not hide the new stream.
        put(
            &mut t,
            &k.agent("n1"),
            record("n1", 200, true, 0).encode_to_vec(),
            5,
        );
        assert!(one(&t).connected);

        // The session expires without a close (its replica died): not
        // connected, since the last time it was recorded.
        put(
            &mut t,
            &k.agent_seen("n1"),
            record("n1", 200, true, 210).encode_to_vec(),
            6,
        );
        del(&mut t, &k.agent("n1"), 7);
        let a = one(&t);
        assert!(!a.connected && a.disconnected_since_unix_ms == 210, "{a:?}");
        assert_eq!(a.replica_id, "cp-a", "from the last-seen record");

        // Gone from both: not listed.
        del(&mut t, &k.agent_seen("n1"), 8);
        assert!(t.page(None, 10).0.is_empty());
    }

    #[test]
    fn an_old_text_session_record_still_counts_as_connected() {
        let k = keys();
        let mut t = AgentTable::default();
        put(&mut t, &k.agent("n1"), b"replica=cp-a zone=z".to_vec(), 2);
        let a = one(&t);
        assert!(a.connected && a.node_id == "n1", "{a:?}");
        assert_eq!(t.sessions().len(), 1);
    }

    #[test]
    fn acks_are_listed_per_service_with_their_outcome() {
        let k = keys();
        let mut t = AgentTable::default();
        put(
            &mut t,
            &k.agent("n1"),
            record("n1", 1, true, 0).encode_to_vec(),
            2,
        );
        let state = |version, accepted, unenforced: &[&str]| AgentPolicyState {
            node_id: "n1".into(),
            version,
            accepted,
            unenforced: unenforced.iter().map(|s| (*s).to_owned()).collect(),
            ..AgentPolicyState::default()
        };
        put(
            &mut t,
            &k.ack("ns", "b", "n1"),
            state(7, true, &["rate_limit"]).encode_to_vec(),
            3,
        );
        put(
            &mut t,
            &k.ack("ns", "a", "n1"),
            state(5, true, &[]).encode_to_vec(),
            4,
        );
        put(
            &mut t,
            &k.ack("ns", "c", "n1"),
            state(9, false, &[]).encode_to_vec(),
            5,
        );
        let got: Vec<(String, u64, Outcome)> = one(&t)
            .policies
            .iter()
            .map(|p| (p.service.clone(), p.version, p.outcome()))
            .collect();
        assert_eq!(
            got,
            [
                ("a".into(), 5, Outcome::Applied),
                ("b".into(), 7, Outcome::Partly),
                ("c".into(), 9, Outcome::Rejected),
            ]
        );
        for svc in ["a", "b", "c"] {
            del(&mut t, &k.ack("ns", svc, "n1"), 6);
        }
        assert!(t.acks.is_empty(), "no empty entry stays behind");
    }

    #[test]
    fn pages_cover_the_union_of_sessions_and_last_seen_records_once() {
        let k = keys();
        let mut t = AgentTable::default();
        // Sessions on even nodes, last-seen records on nodes 0..10.
        for n in 0..10 {
            let node = format!("n{n}");
            if n % 2 == 0 {
                put(
                    &mut t,
                    &k.agent(&node),
                    record(&node, 1, true, 0).encode_to_vec(),
                    2,
                );
            }
            put(
                &mut t,
                &k.agent_seen(&node),
                record(&node, 1, true, 1).encode_to_vec(),
                2,
            );
        }
        put(
            &mut t,
            &k.agent("n99"),
            record("n99", 1, true, 0).encode_to_vec(),
            3,
        );
        let mut after: Option<String> = None;
        let mut all = Vec::new();
        loop {
            let (page, more) = t.page(after.as_deref(), 3);
            assert!(page.len() <= 3);
            after = page.last().map(|a| a.node_id.clone());
            all.extend(page.into_iter().map(|a| a.node_id));
            if !more {
                break;
            }
        }
        let want: Vec<String> = (0..10)
            .map(|n| format!("n{n}"))
            .chain(["n99".to_owned()])
            .collect();
        assert_eq!(all, want);
    }

    #[test]
    fn other_keys_are_not_taken() {
        let k = keys();
        let mut t = AgentTable::default();
        assert!(!t.apply(&k, EventKind::Put, &kv(&k.replica("r"), Vec::new(), 1)));
        assert!(!t.apply(&k, EventKind::Put, &kv(&k.policy("ns", "s"), Vec::new(), 1)));
    }
}
