//! The health checks this replica runs: its share of every instance with an
//! active check, by rendezvous hashing over the live replicas
//! ([`crate::replicas`]), with verdicts written to the store.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use prost::Message;
use weir_core::{
    health::checker::{Checker, SinkError, StatusSink, Transition},
    InstanceKey,
};
use weir_proto::registry::v1::{HealthHistory, HealthTransition, Instance};

use crate::{
    hub::{decode_instance, Hub},
    keys::Keys,
    replicas::{owner, Membership},
    store::{CasOutcome, LeaseId, Store, StoreError},
};

/// Transitions kept per instance.
pub const HISTORY_LEN: usize = 32;

/// Writes verdicts next to the instance: status and detail into its record
/// (compare-and-put on its revision, keeping its lease), the transition into
/// its health history. The control plane's checker writes through it, and
/// so do agents reporting their node's checks (`Registry/ReportHealth`).
#[derive(Debug)]
pub struct StoreSink {
    store: Arc<dyn Store>,
    keys: Keys,
}

/// Who may write a verdict on an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer<'a> {
    /// This control plane's checker: only instances no agent session holds.
    Checker,
    /// The agent of `node`, whose live session has `lease`: only the
    /// instances that session holds.
    Agent { node: &'a str, lease: LeaseId },
    /// The outlier verdicts of a quorum of agents ([`crate::outliers`]):
    /// any instance.
    Outliers,
}

/// What became of a transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// Status, detail and history written.
    Written,
    /// The instance is gone or was registered anew (or, for the checker,
    /// is now held by an agent session): nothing was written.
    Gone,
    /// The agent's session does not hold the instance; `holder` is the node
    /// that does (empty: registered directly, or by a session that lapsed).
    NotHeld { holder: String },
}

/// Why a transition could not be written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("undecodable instance record: {0}")]
    Undecodable(#[source] prost::DecodeError),
    #[error("the record kept changing; will retry")]
    Contended,
}

impl StoreSink {
    pub fn new(store: Arc<dyn Store>, keys: Keys) -> Self {
        Self { store, keys }
    }

    /// Records that `key` (the registration made at `registered_at_unix_ms`;
    /// 0 = whichever is there) is now `t.to`, if `writer` may write it.
    pub async fn record(
        &self,
        key: &InstanceKey,
        registered_at_unix_ms: i64,
        t: &Transition,
        writer: Writer<'_>,
    ) -> Result<Recorded, WriteError> {
        let record_key = self.keys.instance(key);
        let mut lease = None;
        let mut written = false;
        for _ in 0..5 {
            let Some(kv) = self.store.get(&record_key).await? else {
                return Ok(Recorded::Gone);
            };
            let mut i = decode_instance(key, &kv.value, kv.mod_revision)
                .map_err(WriteError::Undecodable)?;
            if registered_at_unix_ms != 0 && i.registered_at_unix_ms != registered_at_unix_ms {
                return Ok(Recorded::Gone);
            }
            match writer {
                // Taken over by an agent since the assigner last looked.
                Writer::Checker if !i.agent_node.is_empty() => return Ok(Recorded::Gone),
                Writer::Agent { node, lease } if i.agent_node != node || kv.lease != lease => {
                    return Ok(Recorded::NotHeld {
                        holder: i.agent_node,
                    })
                }
                _ => {}
            }
            i.status = t.to as i32;
            i.health = Some(t.detail.clone());
            i.revision = 0;
            lease = (kv.lease != 0).then_some(kv.lease);
            match self
                .store
                .put_if(&record_key, i.encode_to_vec(), lease, kv.mod_revision)
                .await
            {
                Ok(CasOutcome::Written { .. }) => {
                    written = true;
                    break;
                }
                Ok(CasOutcome::Conflict { .. }) => continue,
                // The lease expired under us: the instance is gone.
                Err(StoreError::LeaseNotFound(_)) => return Ok(Recorded::Gone),
                Err(e) => return Err(e.into()),
            }
        }
        if !written {
            return Err(WriteError::Contended);
        }
        let history_key = self.keys.health(key);
        let mut history = match self.store.get(&history_key).await? {
            Some(kv) => HealthHistory::decode(kv.value.as_slice()).unwrap_or_default(),
            None => HealthHistory::default(),
        };
        history.transitions.push(HealthTransition {
            at_unix_ms: t.detail.since_unix_ms,
            from: t.from as i32,
            to: t.to as i32,
            reason: t.detail.reason.clone(),
        });
        let excess = history.transitions.len().saturating_sub(HISTORY_LEN);
        history.transitions.drain(..excess);
        match self
            .store
            .put(&history_key, history.encode_to_vec(), lease)
            .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => {}
            Err(e) => {
                // The status is written; only the history entry is lost.
                tracing::warn!(error = %e, "could not append the health history");
            }
        }
        Ok(Recorded::Written)
    }
}

#[async_trait]
impl StatusSink for StoreSink {
    async fn transition(
        &self,
        key: &InstanceKey,
        registered_at_unix_ms: i64,
        t: &Transition,
    ) -> Result<bool, SinkError> {
        match self
            .record(key, registered_at_unix_ms, t, Writer::Checker)
            .await
        {
            Ok(Recorded::Written) => Ok(true),
            Ok(Recorded::Gone | Recorded::NotHeld { .. }) => Ok(false),
            Err(e) => Err(SinkError(e.to_string())),
        }
    }

    async fn deregister(&self, key: &InstanceKey) -> Result<(), SinkError> {
        self.store
            .delete(&self.keys.instance(key))
            .await
            .map_err(sink_err)?;
        self.store
            .delete(&self.keys.health(key))
            .await
            .map_err(sink_err)?;
        Ok(())
    }
}

fn sink_err(e: StoreError) -> SinkError {
    SinkError(e.to_string())
}

/// Whether this control plane checks `i` (on some replica): it has an
/// active check and no agent session holds it (its agent checks it and
/// reports through `ReportHealth`).
fn checked_here(i: &Instance) -> bool {
    i.health_check.is_some() && i.agent_node.is_empty()
}

/// How long etcd may take, past a lease's TTL, to notice it expired (its
/// lessor looks every 500 ms), plus the watch and the share recomputation.
const EXPIRY_SLACK: Duration = Duration::from_secs(1);

/// The membership lease that lets the others take a dead replica's checks
/// over within `takeover`: a lease expires up to TTL after the last renewal,
/// and etcd notices it up to half a second later.
pub fn lease_for_takeover(takeover: Duration) -> Duration {
    takeover
        .saturating_sub(EXPIRY_SLACK)
        .max(Duration::from_secs(2))
}

/// This replica's checks: its membership, the checker, and the task that
/// keeps the checker's set equal to this replica's share.
#[derive(Debug)]
pub struct Checks {
    membership: Membership,
    checker: Arc<Checker>,
    assigner: AbortOnDrop,
}

pub(crate) use weir_core::task::AbortOnDrop;

impl Checks {
    /// The checker, for its counts.
    pub fn checker(&self) -> Arc<Checker> {
        self.checker.clone()
    }

    /// Joins the replicas and starts checking this replica's share.
    pub async fn start(
        store: Arc<dyn Store>,
        keys: Keys,
        hub: Hub,
        replica_id: String,
        info: Vec<u8>,
        takeover: Duration,
    ) -> Result<Self, StoreError> {
        let membership = Membership::start(
            store.clone(),
            &keys,
            &replica_id,
            info,
            lease_for_takeover(takeover),
        )
        .await?;
        let checker = Arc::new(Checker::new(
            Arc::new(StoreSink::new(store, keys)),
            replica_id.clone(),
        ));
        let assigner = AbortOnDrop(tokio::spawn(assign(hub, checker.clone(), replica_id)));
        Ok(Self {
            membership,
            checker,
            assigner,
        })
    }

    /// Instances this replica checks now.
    pub fn checking(&self) -> usize {
        self.checker.len()
    }

    /// Stops checking and leaves the replica set at once, so the others
    /// take this replica's instances over without waiting for its lease.
    pub async fn stop(self) {
        drop(self.assigner);
        self.checker.clear();
        self.membership.leave().await;
    }
}

/// Recomputes this replica's share whenever the cache changes (bursts of
/// changes are coalesced for 100 ms). This replica counts itself as live
/// even while its own announcement is missing (at start-up, or while an
/// overloaded replica re-announces after its lease lapsed): checking a few
/// instances twice for a moment beats leaving them unchecked.
async fn assign(hub: Hub, checker: Arc<Checker>, me: String) {
    let mut changes = hub.changes();
    loop {
        let mut replicas = hub.replicas();
        if !replicas.contains(&me) {
            replicas.push(me.clone());
            replicas.sort();
        }
        let mine: Vec<Arc<Instance>> = if hub.is_ready() {
            // Instances without an active check are skipped by the checker
            // too; filtering here keeps them out of the hashing.
            hub.all_instances()
                .into_iter()
                .filter(|i| checked_here(i))
                .filter(|i| owner(&replicas, &InstanceKey::of(i)) == Some(me.as_str()))
                .collect()
        } else {
            Vec::new()
        };
        let before = checker.len();
        checker.sync(mine.iter());
        if checker.len() != before {
            tracing::debug!(
                replicas = replicas.len(),
                checking = checker.len(),
                "check share changed"
            );
        }
        if changes.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        changes.borrow_and_update();
    }
}

#[cfg(test)]
mod tests {
    use weir_proto::registry::v1::{
        health_check::Kind, HealthCheck, HealthDetail, HealthStatus, TcpCheck,
    };

    use super::*;
    use crate::store::{EmbeddedStore, EmbeddedStoreConfig};

    fn checked(agent_node: &str) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "i-1".into(),
            host: "127.0.0.1".into(),
            port: 9,
            ephemeral: true,
            registered_at_unix_ms: 7,
            agent_node: agent_node.into(),
            health_check: Some(HealthCheck {
                kind: Some(Kind::Tcp(TcpCheck {})),
                ..HealthCheck::default()
            }),
            ..Instance::default()
        }
    }

    #[test]
    fn replicas_check_only_instances_no_agent_holds() {
        assert!(checked_here(&checked("")));
        assert!(!checked_here(&checked("node-1")));
        assert!(!checked_here(&Instance {
            health_check: None,
            ..checked("")
        }));
    }

    #[tokio::test]
    async fn the_checker_never_writes_an_instance_an_agent_holds() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let sink = StoreSink::new(store.clone(), keys.clone());
        let key = InstanceKey::of(&checked(""));
        let lease = store
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("lease");
        let revision = store
            .put(
                &keys.instance(&key),
                checked("node-1").encode_to_vec(),
                Some(lease.id),
            )
            .await
            .expect("put");
        let t = Transition {
            from: HealthStatus::Unknown,
            to: HealthStatus::Critical,
            detail: HealthDetail::default(),
        };
        // The control plane's checker (e.g. a verdict in flight when an
        // agent took the instance over) is told it is gone ...
        assert!(!sink.transition(&key, 7, &t).await.expect("answered"));
        // ... and so is an agent whose session does not hold it.
        let other = Writer::Agent {
            node: "node-2",
            lease: lease.id,
        };
        assert_eq!(
            sink.record(&key, 7, &t, other).await.expect("answered"),
            Recorded::NotHeld {
                holder: "node-1".into()
            }
        );
        let kv = store.get(&keys.instance(&key)).await.expect("read");
        assert_eq!(
            kv.map(|kv| kv.mod_revision),
            Some(revision),
            "nothing written"
        );
        let holder = Writer::Agent {
            node: "node-1",
            lease: lease.id,
        };
        assert_eq!(
            sink.record(&key, 7, &t, holder).await.expect("written"),
            Recorded::Written
        );
        let kv = store
            .get(&keys.instance(&key))
            .await
            .expect("read")
            .expect("kv");
        assert_eq!(kv.lease, lease.id, "the record keeps its lease");
        let i = Instance::decode(kv.value.as_slice()).expect("decode");
        assert_eq!(i.status, HealthStatus::Critical as i32);
    }
}
