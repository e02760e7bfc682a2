//! Upkeep of the unleased last-seen records (`{root}/v1/agents-seen/`).
//!
//! Nothing expires them by itself, so each replica sweeps the records it
//! owns (rendezvous over the live replicas by node id, as checks are
//! shared): every [`SWEEP_EVERY`] it reads its cache and
//! - marks a record still saying "connected" as disconnected, now, once
//!   its node's session is gone: the stream ended without a close (its
//!   replica died) and the session lease expired;
//! - drops a record whose node has had no session for longer than the
//!   agent retention (default 24 h, `--agent-retention-seconds`).
//!
//! The mark is a compare-and-put on the record's revision, so a record
//! that a reconnect rewrote meanwhile is left alone. The drop is a plain
//! delete (the store has no compare-and-delete yet): a node that
//! reconnects in that instant loses its record until its next status
//! report or close rewrites it, and is listed from its session record
//! meanwhile.

use std::{sync::Arc, time::Duration};

use prost::Message;
use tokio::task::JoinHandle;
use weir_core::time::now_unix_ms;
use weir_proto::agent::v1::AgentRecord;

use crate::{
    hub::{Hub, Seen},
    keys::Keys,
    replicas::owner_of,
    store::{CasOutcome, Store},
};

/// How often a replica sweeps its share of the last-seen records.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Default time a disconnected agent stays listed.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// What the sweep does to one record.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Write `record` (now disconnected) if the stored one is still at
    /// `mod_revision`.
    Ended {
        record: AgentRecord,
        mod_revision: u64,
    },
    /// Delete the node's record.
    Drop { node: String },
}

/// The actions on the records `me` owns among `replicas`, at `now_ms`.
pub fn plan(
    seen: &[(Seen, Option<Arc<AgentRecord>>)],
    now_ms: i64,
    retention: Duration,
    replicas: &[String],
    me: &str,
) -> Vec<Action> {
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    seen.iter()
        .filter(|(_, session)| session.is_none())
        .filter(|(s, _)| owner_of(replicas, &[s.record.node_id.as_bytes()]) == Some(me))
        .filter_map(|(s, _)| {
            if s.record.connected {
                let mut record = (*s.record).clone();
                record.connected = false;
                record.last_seen_unix_ms = now_ms;
                Some(Action::Ended {
                    record,
                    mod_revision: s.mod_revision,
                })
            } else if now_ms.saturating_sub(s.record.last_seen_unix_ms) > retention_ms {
                Some(Action::Drop {
                    node: s.record.node_id.clone(),
                })
            } else {
                None
            }
        })
        .collect()
}

/// The running sweep; it stops when dropped.
#[derive(Debug)]
pub struct Sweeper {
    task: JoinHandle<()>,
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sweeper {
    pub fn start(
        store: Arc<dyn Store>,
        keys: Keys,
        hub: Hub,
        me: String,
        retention: Duration,
    ) -> Self {
        Self {
            task: tokio::spawn(run(store, keys, hub, me, retention)),
        }
    }
}

async fn run(store: Arc<dyn Store>, keys: Keys, hub: Hub, me: String, retention: Duration) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        if !hub.is_ready() {
            continue;
        }
        // Count this replica even before its own announcement arrives, as
        // the check assigner does.
        let mut replicas = hub.replicas();
        if !replicas.contains(&me) {
            replicas.push(me.clone());
            replicas.sort();
        }
        for action in plan(&hub.agents_seen(), now_unix_ms(), retention, &replicas, &me) {
            apply(store.as_ref(), &keys, action).await;
        }
    }
}

async fn apply(store: &dyn Store, keys: &Keys, action: Action) {
    match action {
        Action::Ended {
            record,
            mod_revision,
        } => {
            let key = keys.agent_seen(&record.node_id);
            match store
                .put_if(&key, record.encode_to_vec(), None, mod_revision)
                .await
            {
                Ok(CasOutcome::Written { .. }) => tracing::info!(
                    node = %record.node_id,
                    replica = %record.replica_id,
                    "agent session expired without its stream closing; recorded as disconnected"
                ),
                Ok(CasOutcome::Conflict { .. }) => {
                    tracing::debug!(node = %record.node_id, "last-seen record changed meanwhile; left alone")
                }
                Err(e) => {
                    tracing::warn!(node = %record.node_id, error = %e, "could not mark an agent disconnected")
                }
            }
        }
        Action::Drop { node } => match store.delete(&keys.agent_seen(&node)).await {
            Ok(_) => tracing::info!(
                node,
                "dropped the last-seen record of an agent gone longer than the retention"
            ),
            Err(e) => tracing::warn!(node, error = %e, "could not drop a last-seen record"),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::{
        hub::HubConfig,
        store::{EmbeddedStore, EmbeddedStoreConfig},
    };

    use super::*;

    const HOUR_MS: i64 = 3600 * 1000;

    fn seen(node: &str, connected: bool, last_seen: i64) -> Seen {
        Seen {
            record: Arc::new(AgentRecord {
                node_id: node.into(),
                connected,
                last_seen_unix_ms: last_seen,
                ..AgentRecord::default()
            }),
            mod_revision: 7,
        }
    }

    #[test]
    fn a_record_is_marked_ended_then_dropped_after_the_retention() {
        let me = vec!["cp-a".to_owned()];
        let retention = Duration::from_secs(24 * 3600);
        let now = 100 * HOUR_MS;
        let session = Some(Arc::new(AgentRecord::default()));
        let records = vec![
            // Connected with a live session: nothing to do.
            (seen("live", true, now - 48 * HOUR_MS), session.clone()),
            // Closed, its lease still waiting for a resume: nothing yet.
            (seen("closing", false, now - 48 * HOUR_MS), session),
            // Its session expired without a close: marked ended, now.
            (seen("crashed", true, now - 48 * HOUR_MS), None),
            // Closed, within the retention: kept.
            (seen("recent", false, now - 23 * HOUR_MS), None),
            // Closed longer than the retention: dropped.
            (seen("old", false, now - 25 * HOUR_MS), None),
        ];
        let actions = plan(&records, now, retention, &me, "cp-a");
        assert_eq!(actions.len(), 2, "{actions:?}");
        match &actions[0] {
            Action::Ended {
                record,
                mod_revision,
            } => {
                assert_eq!(record.node_id, "crashed");
                assert!(!record.connected && record.last_seen_unix_ms == now);
                assert_eq!(*mod_revision, 7);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(actions[1], Action::Drop { node: "old".into() });
    }

    #[test]
    fn each_record_is_swept_by_exactly_one_replica() {
        let replicas: Vec<String> = ["cp-a", "cp-b", "cp-c"].map(String::from).to_vec();
        let records: Vec<_> = (0..300)
            .map(|n| (seen(&format!("node-{n}"), true, 0), None))
            .collect();
        let mut total = 0;
        for me in &replicas {
            let mine = plan(&records, 1, DEFAULT_RETENTION, &replicas, me).len();
            assert!((60..=140).contains(&mine), "{me} sweeps {mine} of 300");
            total += mine;
        }
        assert_eq!(total, 300);
    }

    /// The loop on a real (embedded) store, under paused time: the records
    /// change in the store, not only in a plan.
    #[tokio::test(start_paused = true)]
    async fn the_sweep_marks_and_drops_records_in_the_store() {
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default()));
        let keys = Keys::new("/t");
        let (hub, _hub_task) = Hub::start(store.clone(), keys.clone(), HubConfig::default());
        let now = now_unix_ms();
        let put = |node: &str, connected: bool, last_seen: i64| {
            let record = AgentRecord {
                node_id: node.into(),
                connected,
                last_seen_unix_ms: last_seen,
                ..AgentRecord::default()
            };
            let (store, key) = (store.clone(), keys.agent_seen(node));
            async move { store.put(&key, record.encode_to_vec(), None).await.unwrap() }
        };
        put("old", false, now - 25 * HOUR_MS).await;
        put("crashed", true, now - HOUR_MS).await;
        put("live", true, now).await;
        let lease = store.grant_lease(Duration::from_secs(10)).await.unwrap();
        let last = store
            .put(
                &keys.agent("live"),
                AgentRecord::default().encode_to_vec(),
                Some(lease.id),
            )
            .await
            .unwrap();
        assert!(hub.wait_for(last, Duration::from_secs(5)).await);

        let _sweeper = Sweeper::start(
            store.clone(),
            keys.clone(),
            hub.clone(),
            "cp-a".into(),
            DEFAULT_RETENTION,
        );
        let record = |node: &str| {
            let (store, key) = (store.clone(), keys.agent_seen(node));
            async move {
                store
                    .get(&key)
                    .await
                    .unwrap()
                    .map(|kv| AgentRecord::decode(kv.value.as_slice()).unwrap())
            }
        };
        let mut swept = false;
        for _ in 0..100 {
            let crashed = record("crashed").await.unwrap();
            if record("old").await.is_none() && !crashed.connected {
                assert!(crashed.last_seen_unix_ms >= now, "marked at the sweep");
                swept = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(swept, "the sweep ran within 10 s of tokio time");
        assert!(record("live").await.unwrap().connected, "a live one stays");
    }
}
