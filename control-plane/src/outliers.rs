//! Outliers in the registry: the passive half of the fused health model.
//!
//! Agents report the instances they have taken out of their rotation
//! (ejected after refused or reset connections, or with a circuit breaker
//! open), whole, whenever that set changes; the replica serving an agent's
//! stream keeps each report at `{root}/v1/outliers/{node}/{ns}/{svc}/{id}`
//! on the agent's session lease ([`crate::agents`]), so a report goes with
//! its agent.
//!
//! Once a second, each replica reads every report and, for the instances
//! it owns (the rendezvous owner of the instance, as for health checks),
//! decides ([`verdicts`]): when at least the quorum of agents report an
//! instance (`--outlier-quorum`, default 2, or every connected agent when
//! fewer are connected), it is marked WARNING, with the reason naming the
//! agents and what the first of them saw, `checked_by: "outliers"`; when
//! fewer do, an instance this marked goes back to PASSING (or UNKNOWN, for
//! a persistent instance without a check). A CRITICAL instance is left
//! alone (its checks say more), and so is one WARNING for another reason.
//! WARNING still takes traffic: the mark tells `weirctl get`, every agent
//! and the dashboard what the agents see; each agent's own breakers and
//! ejection decide its routing.
//!
//! With two or more agents connected, one agent alone is not a quorum by
//! default: the instance may be fine and the path from that node broken. The cost is one prefix read per
//! replica per second, and one write per change of verdict.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use prost::Message;
use weir_core::{health::checker::Transition, time::now_unix_ms, InstanceKey};
use weir_proto::{
    agent::v1::Outlier,
    registry::v1::{HealthDetail, HealthStatus, Instance},
};

use crate::{
    checks::AbortOnDrop,
    checks::{StoreSink, Writer},
    hub::Hub,
    keys::Keys,
    replicas::owner,
    store::{Store, StoreError},
};

/// Agents that must agree, by default.
pub const DEFAULT_QUORUM: u32 = 2;
/// How often each replica looks at the reports.
pub const EVERY: Duration = Duration::from_secs(1);
/// `HealthDetail.checked_by` of a WARNING this module wrote.
pub const CHECKED_BY: &str = "outliers";

/// Per instance, the reports of each node's agent.
pub type Reports = BTreeMap<InstanceKey, BTreeMap<String, Outlier>>;

/// The quorum with `connected` agents: `quorum`, or all of them when
/// fewer are connected (at least one).
pub fn effective_quorum(quorum: u32, connected: usize) -> usize {
    (quorum as usize).min(connected).max(1)
}

/// What an instance no longer reported goes back to: PASSING when
/// something else vouches for it (a lease or a check), else UNKNOWN.
fn restored(i: &Instance) -> HealthStatus {
    if i.ephemeral || i.health_check.is_some() {
        HealthStatus::Passing
    } else {
        HealthStatus::Unknown
    }
}

fn marked_here(i: &Instance) -> bool {
    i.status == HealthStatus::Warning as i32
        && i.health
            .as_ref()
            .is_some_and(|h| h.checked_by == CHECKED_BY)
}

/// The transitions to write: for each instance `owns` says is this
/// replica's, reported by at least `quorum` agents (marked WARNING) or
/// marked here and no longer so reported (restored). `instance` gives the
/// registry's current record; `now` stamps the transitions.
pub fn verdicts<'a>(
    reports: &Reports,
    marked: impl IntoIterator<Item = &'a Instance>,
    instance: impl Fn(&InstanceKey) -> Option<Arc<Instance>>,
    quorum: usize,
    owns: impl Fn(&InstanceKey) -> bool,
    now: i64,
) -> Vec<(InstanceKey, Transition)> {
    let mut keys: BTreeSet<InstanceKey> = reports.keys().cloned().collect();
    keys.extend(
        marked
            .into_iter()
            .filter(|i| marked_here(i))
            .map(InstanceKey::of),
    );
    let mut out = Vec::new();
    for key in keys.into_iter().filter(|k| owns(k)) {
        let Some(i) = instance(&key) else {
            continue;
        };
        let from = HealthStatus::try_from(i.status).unwrap_or(HealthStatus::Unknown);
        let by = reports.get(&key).filter(|r| r.len() >= quorum);
        match by {
            Some(by) => {
                let nodes: Vec<&str> = by.keys().map(String::as_str).collect();
                let first = by.values().next().map_or("", |o| o.reason.as_str());
                let reason = format!(
                    "outlier: out of rotation on {} agents ({}): {first}",
                    nodes.len(),
                    nodes.join(", ")
                );
                let reason: String = reason.chars().take(1024).collect();
                let unchanged =
                    marked_here(&i) && i.health.as_ref().is_some_and(|h| h.reason == reason);
                let other_verdict = from == HealthStatus::Critical
                    || (from == HealthStatus::Warning && !marked_here(&i));
                if unchanged || other_verdict {
                    continue;
                }
                out.push((
                    key,
                    Transition {
                        from,
                        to: HealthStatus::Warning,
                        detail: HealthDetail {
                            reason,
                            since_unix_ms: now,
                            checked_by: CHECKED_BY.to_owned(),
                            consecutive: u32::try_from(nodes.len()).unwrap_or(u32::MAX),
                            ..HealthDetail::default()
                        },
                    },
                ));
            }
            None if marked_here(&i) => {
                out.push((
                    key,
                    Transition {
                        from,
                        to: restored(&i),
                        detail: HealthDetail {
                            reason: "outlier: no longer out of rotation on enough agents"
                                .to_owned(),
                            since_unix_ms: now,
                            checked_by: CHECKED_BY.to_owned(),
                            ..HealthDetail::default()
                        },
                    },
                ));
            }
            None => {}
        }
    }
    out
}

/// Reads every report in the store.
async fn read_reports(store: &dyn Store, keys: &Keys) -> Result<Reports, StoreError> {
    let mut reports = Reports::new();
    for kv in store.range(&keys.outliers_prefix(None)).await?.kvs {
        let Some((node, key)) = keys.parse_outlier(&kv.key) else {
            continue;
        };
        let Ok(o) = Outlier::decode(kv.value.as_slice()) else {
            tracing::warn!(key = %kv.key, "skipping an undecodable outlier report");
            continue;
        };
        reports.entry(key).or_default().insert(node, o);
    }
    Ok(reports)
}

/// One look at the reports: writes this replica's verdicts.
async fn pass(
    store: &Arc<dyn Store>,
    keys: &Keys,
    hub: &Hub,
    me: &str,
    quorum: u32,
) -> Result<(), StoreError> {
    if !hub.is_ready() {
        return Ok(());
    }
    let reports = read_reports(store.as_ref(), keys).await?;
    let mut replicas = hub.replicas();
    if !replicas.iter().any(|r| r == me) {
        replicas.push(me.to_owned());
        replicas.sort();
    }
    let quorum = effective_quorum(quorum, hub.agents().len());
    let all = hub.all_instances();
    let transitions = verdicts(
        &reports,
        all.iter().map(|i| &**i),
        |k| hub.instance(k),
        quorum,
        |k| owner(&replicas, k) == Some(me),
        now_unix_ms(),
    );
    let sink = StoreSink::new(store.clone(), keys.clone());
    for (key, t) in transitions {
        tracing::info!(namespace = %key.namespace, service = %key.service, instance = %key.instance_id,
            to = t.to.as_str_name(), reason = %t.detail.reason, "outlier verdict");
        if let Err(e) = sink.record(&key, 0, &t, Writer::Outliers).await {
            tracing::warn!(instance = %key.instance_id, error = %e, "could not write an outlier verdict");
        }
    }
    Ok(())
}

/// Looks at the reports every [`EVERY`] until dropped.
#[derive(Debug)]
pub struct OutlierJudge {
    _task: AbortOnDrop,
}

impl OutlierJudge {
    pub fn start(
        store: Arc<dyn Store>,
        keys: Keys,
        hub: Hub,
        replica_id: String,
        quorum: u32,
    ) -> Self {
        Self {
            _task: AbortOnDrop(tokio::spawn(async move {
                loop {
                    if let Err(e) = pass(&store, &keys, &hub, &replica_id, quorum).await {
                        tracing::warn!(error = %e, "reading the agents' outlier reports failed");
                    }
                    tokio::time::sleep(EVERY).await;
                }
            })),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(id: &str, status: HealthStatus, ephemeral: bool) -> Arc<Instance> {
        Arc::new(Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
            status: status as i32,
            ephemeral,
            ..Instance::default()
        })
    }

    fn key(id: &str) -> InstanceKey {
        InstanceKey {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
        }
    }

    fn report(reports: &mut Reports, id: &str, node: &str, reason: &str) {
        reports.entry(key(id)).or_default().insert(
            node.into(),
            Outlier {
                namespace: "default".into(),
                service: "orders".into(),
                instance_id: id.into(),
                kind: "breaker".into(),
                reason: reason.into(),
                since_unix_ms: 1,
            },
        );
    }

    fn judge(
        reports: &Reports,
        instances: &[Arc<Instance>],
        quorum: usize,
    ) -> Vec<(String, HealthStatus, String)> {
        verdicts(
            reports,
            instances.iter().map(|i| &**i),
            |k| instances.iter().find(|i| InstanceKey::of(i) == *k).cloned(),
            quorum,
            |_| true,
            7,
        )
        .into_iter()
        .map(|(k, t)| (k.instance_id, t.to, t.detail.reason))
        .collect()
    }

    #[test]
    fn a_quorum_of_agents_marks_an_instance_and_fewer_restore_it() {
        let mut reports = Reports::new();
        report(&mut reports, "o1", "node-a", "3 failures in a row");
        let fine = vec![
            instance("o1", HealthStatus::Passing, true),
            instance("o2", HealthStatus::Passing, true),
        ];
        assert!(
            judge(&reports, &fine, 2).is_empty(),
            "one agent is not a quorum"
        );
        report(&mut reports, "o1", "node-b", "refused or reset connections");
        let v = judge(&reports, &fine, 2);
        assert_eq!(
            v,
            [(
                "o1".to_owned(),
                HealthStatus::Warning,
                "outlier: out of rotation on 2 agents (node-a, node-b): 3 failures in a row"
                    .to_owned()
            )]
        );
        // Once written, the same verdict is not written again.
        let marked = Arc::new(Instance {
            status: HealthStatus::Warning as i32,
            health: Some(HealthDetail {
                reason: v[0].2.clone(),
                checked_by: CHECKED_BY.into(),
                ..HealthDetail::default()
            }),
            ..(*fine[0]).clone()
        });
        let now = vec![marked.clone(), fine[1].clone()];
        assert!(judge(&reports, &now, 2).is_empty());
        // One agent closes its breaker: back to PASSING (ephemeral) ...
        reports.get_mut(&key("o1")).expect("o1").remove("node-b");
        let v = judge(&reports, &now, 2);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].1, HealthStatus::Passing);
        // ... or UNKNOWN, for a persistent instance without a check.
        let persistent = Arc::new(Instance {
            ephemeral: false,
            ..(*marked).clone()
        });
        assert_eq!(
            judge(&reports, &[persistent], 2)[0].1,
            HealthStatus::Unknown
        );
    }

    #[test]
    fn other_verdicts_stand_and_the_quorum_follows_the_connected_agents() {
        let mut reports = Reports::new();
        report(&mut reports, "o1", "node-a", "x");
        report(&mut reports, "o1", "node-b", "x");
        let critical = vec![instance("o1", HealthStatus::Critical, true)];
        assert!(
            judge(&reports, &critical, 2).is_empty(),
            "CRITICAL says more"
        );
        let warned = Arc::new(Instance {
            status: HealthStatus::Warning as i32,
            health: Some(HealthDetail {
                reason: "HTTP 429 from GET /healthz".into(),
                checked_by: "cp-1".into(),
                ..HealthDetail::default()
            }),
            ..(*critical[0]).clone()
        });
        assert!(
            judge(&reports, &[warned], 2).is_empty(),
            "a check's WARNING stands"
        );
        assert_eq!(effective_quorum(2, 1), 1, "a lone agent is the quorum");
        assert_eq!(effective_quorum(2, 5), 2);
        assert_eq!(effective_quorum(3, 0), 1);
        // Reports of an instance gone from the registry are skipped.
        assert!(judge(&reports, &[], 1).is_empty());
    }
}
