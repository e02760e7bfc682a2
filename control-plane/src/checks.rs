//! The health checks this replica runs: its share of every instance with an
//! active check, by rendezvous hashing over the live replicas
//! ([`crate::replicas`]), with verdicts written to the store.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use prost::Message;
use tokio::task::JoinHandle;
use weir_core::{
    health::checker::{Checker, SinkError, StatusSink, Transition},
    InstanceKey,
};
use weir_proto::registry::v1::{HealthHistory, HealthTransition, Instance};

use crate::{
    hub::{decode_instance, Hub},
    keys::Keys,
    replicas::{owner, Membership},
    store::{CasOutcome, Store, StoreError},
};

/// Transitions kept per instance.
pub const HISTORY_LEN: usize = 32;

/// Writes verdicts next to the instance: status and detail into its record
/// (compare-and-put on its revision, keeping its lease), the transition into
/// its health history.
#[derive(Debug)]
pub struct StoreSink {
    store: Arc<dyn Store>,
    keys: Keys,
}

impl StoreSink {
    pub fn new(store: Arc<dyn Store>, keys: Keys) -> Self {
        Self { store, keys }
    }
}

fn sink_err(e: StoreError) -> SinkError {
    SinkError(e.to_string())
}

#[async_trait]
impl StatusSink for StoreSink {
    async fn transition(
        &self,
        key: &InstanceKey,
        registered_at_unix_ms: i64,
        t: &Transition,
    ) -> Result<bool, SinkError> {
        let record_key = self.keys.instance(key);
        let mut lease = None;
        let mut written = false;
        for _ in 0..5 {
            let Some(kv) = self.store.get(&record_key).await.map_err(sink_err)? else {
                return Ok(false);
            };
            let mut i = decode_instance(key, &kv.value, kv.mod_revision)
                .map_err(|e| SinkError(format!("undecodable instance record: {e}")))?;
            if i.registered_at_unix_ms != registered_at_unix_ms {
                return Ok(false);
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
                Err(StoreError::LeaseNotFound(_)) => return Ok(false),
                Err(e) => return Err(sink_err(e)),
            }
        }
        if !written {
            return Err(SinkError("the record kept changing; will retry".into()));
        }
        let history_key = self.keys.health(key);
        let mut history = match self.store.get(&history_key).await.map_err(sink_err)? {
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
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(true),
            Err(e) => {
                // The status is written; only the history entry is lost.
                tracing::warn!(error = %e, "could not append the health history");
                Ok(true)
            }
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

fn key_of(i: &Instance) -> InstanceKey {
    InstanceKey {
        namespace: i.namespace.clone(),
        service: i.service.clone(),
        instance_id: i.instance_id.clone(),
    }
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

/// A task that ends with its owner.
#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Checks {
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
            // Instances without an active check are skipped by the checker.
            hub.all_instances()
                .into_iter()
                .filter(|i| i.health_check.is_some())
                .filter(|i| owner(&replicas, &key_of(i)) == Some(me.as_str()))
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
