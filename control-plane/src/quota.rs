//! Global rate limits without a token server.
//!
//! A `GLOBAL` rate limit is shared among the agents that send to the
//! service. Each agent measures its demand on the bucket (requests per
//! second reaching it, admitted or not) and reports it over its session
//! about once a second; the replica serving the stream keeps it at
//! `{root}/v1/demand/{node}/{ns}/{svc}/{rule}` on the session lease,
//! rewritten only when it moved by a tenth, and deletes the node's demand
//! as soon as its stream ends (a killed agent's share goes back at once,
//! not after the lease). Once a second, the replica that owns the limit by
//! rendezvous hashing (of namespace, service and rule, over the live
//! replicas) reads the demands and allocates ([`allocate`]), and writes
//! the allocation at `{root}/v1/shares/{ns}/{svc}/{rule}` when it changed;
//! every replica sends each of its agents its shares once a second. No
//! request waits on the network: each agent enforces its share in its own
//! bucket.
//!
//! [`allocate`] is max-min fair on the agents' wants, a want being the
//! measured demand with a tenth (and one request) of headroom, so an
//! agent whose demand grows keeps up until the next allocation: an agent
//! that wants less than an equal split gets what it wants, and what it
//! leaves is split among the others the same way; when everyone's wants
//! fit, the rest is split equally. The shares always sum to the limit.
//! The burst is split in proportion to the shares.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use prost::Message;
use weir_core::{
    policy::resolve::{self, Scope},
    time::now_unix_ms,
};
use weir_proto::agent::v1::{
    control_message, BucketDemand, ControlMessage, LimitAllocation, LimitShare, LimitShares,
    NodeShare,
};

use crate::{
    agents::LocalStreams,
    checks::AbortOnDrop,
    hub::Hub,
    keys::Keys,
    replicas::owner_of,
    store::{Store, StoreError},
};

/// How often demands are allocated and shares sent.
pub const EVERY: Duration = Duration::from_secs(1);
/// Headroom on a demand: the want is `demand × (1 + HEADROOM) + 1`.
pub const HEADROOM: f64 = 0.1;

/// (namespace, service, rule).
pub type Bucket = (String, String, String);

/// Splits `limit` (and `burst`) among agents by their measured `demands`
/// (node, requests per second), max-min fair on their wants; see the
/// module docs. Shares come in the order of `demands`.
pub fn allocate(limit: f64, burst: u32, demands: &[(String, f64)]) -> Vec<NodeShare> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let wants: Vec<f64> = demands
        .iter()
        .map(|(_, d)| d.max(0.0) * (1.0 + HEADROOM) + 1.0)
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| wants[a].total_cmp(&wants[b]));
    let mut shares = vec![0.0; n];
    let mut left = limit;
    for (done, &i) in order.iter().enumerate() {
        let fair = left / (n - done) as f64;
        shares[i] = wants[i].min(fair);
        left -= shares[i];
    }
    // Everyone's wants fit: the rest is headroom for all alike.
    let extra = left.max(0.0) / n as f64;
    demands
        .iter()
        .zip(shares)
        .map(|((node, demand), share)| {
            let rps = share + extra;
            NodeShare {
                node_id: node.clone(),
                demand: *demand,
                requests_per_second: rps,
                burst: ((f64::from(burst) * rps / limit).ceil() as u32).max(1),
            }
        })
        .collect()
}

/// The `GLOBAL` rate limit of `rule` (`default`: the service's own) in
/// the service's current policy, if it has one.
fn global_limit(hub: &Hub, (namespace, service, rule): &Bucket) -> Option<resolve::RateLimit> {
    let change = hub.policy(namespace, service)?;
    let resolved = resolve::resolve(change.policy.as_ref()?);
    let limit = if rule == "default" {
        resolved.defaults.rate_limit
    } else {
        resolved
            .rules
            .into_iter()
            .find(|r| r.name == *rule)?
            .sections
            .rate_limit
    }?;
    (limit.scope == Scope::Global).then_some(limit)
}

/// Reads every agent's demand, by bucket.
async fn demands(
    store: &dyn Store,
    keys: &Keys,
) -> Result<BTreeMap<Bucket, Vec<(String, f64)>>, StoreError> {
    let mut out: BTreeMap<Bucket, Vec<(String, f64)>> = BTreeMap::new();
    for kv in store.range(&keys.demand_prefix(None)).await?.kvs {
        let Some((node, bucket)) = keys.parse_demand(&kv.key) else {
            continue;
        };
        let Ok(d) = BucketDemand::decode(kv.value.as_slice()) else {
            continue;
        };
        out.entry(bucket)
            .or_default()
            .push((node, d.requests_per_second));
    }
    Ok(out)
}

/// Whether two allocations differ by more than rounding: the same agents,
/// each share within 1% (of the limit).
fn same(a: &LimitAllocation, b: &LimitAllocation) -> bool {
    a.limit == b.limit
        && a.burst == b.burst
        && a.shares.len() == b.shares.len()
        && a.shares.iter().zip(&b.shares).all(|(x, y)| {
            x.node_id == y.node_id
                && (x.requests_per_second - y.requests_per_second).abs() <= a.limit * 0.01
        })
}

/// Allocates the limits this replica owns; returns the allocations read
/// or written, by bucket.
async fn allocate_owned(
    store: &Arc<dyn Store>,
    keys: &Keys,
    hub: &Hub,
    me: &str,
    written: &mut BTreeMap<Bucket, LimitAllocation>,
) -> Result<(), StoreError> {
    let mut replicas = hub.replicas();
    if !replicas.iter().any(|r| r == me) {
        replicas.push(me.to_owned());
        replicas.sort();
    }
    let demands = demands(store.as_ref(), keys).await?;
    let mut mine = BTreeMap::new();
    for (bucket, nodes) in demands {
        let (ns, svc, rule) = &bucket;
        let name = [ns.as_bytes(), svc.as_bytes(), rule.as_bytes()];
        if owner_of(&replicas, &name) != Some(me) {
            continue;
        }
        let Some(limit) = global_limit(hub, &bucket) else {
            continue;
        };
        let allocation = LimitAllocation {
            limit: limit.requests_per_second,
            burst: limit.burst,
            shares: allocate(limit.requests_per_second, limit.burst, &nodes),
            at_unix_ms: now_unix_ms(),
        };
        mine.insert(bucket, allocation);
    }
    for (bucket, allocation) in &mine {
        if written.get(bucket).is_some_and(|w| same(w, allocation)) {
            continue;
        }
        let (ns, svc, rule) = bucket;
        tracing::debug!(namespace = %ns, service = %svc, rule = %rule,
            shares = ?allocation.shares.iter().map(|s| (&s.node_id, s.requests_per_second)).collect::<Vec<_>>(),
            "global rate limit allocated");
        store
            .put(
                &keys.shares(ns, svc, rule),
                allocation.encode_to_vec(),
                None,
            )
            .await?;
        written.insert(bucket.clone(), allocation.clone());
    }
    // Limits this replica no longer allocates (another owns them, no
    // demand is left, or the policy changed): forget what was written, and
    // delete the allocations nobody has demand for.
    let gone: Vec<Bucket> = written
        .keys()
        .filter(|b| !mine.contains_key(*b))
        .cloned()
        .collect();
    for bucket in gone {
        written.remove(&bucket);
        let (ns, svc, rule) = &bucket;
        let name = [ns.as_bytes(), svc.as_bytes(), rule.as_bytes()];
        if owner_of(&replicas, &name) == Some(me) {
            store.delete(&keys.shares(ns, svc, rule)).await?;
        }
    }
    Ok(())
}

/// Sends each agent with a stream on this replica its shares.
async fn send_shares(
    store: &dyn Store,
    keys: &Keys,
    streams: &LocalStreams,
) -> Result<(), StoreError> {
    let mut per_node: BTreeMap<String, Vec<LimitShare>> = BTreeMap::new();
    for kv in store.range(&keys.shares_prefix()).await?.kvs {
        let Some((ns, svc, rule)) = keys.parse_shares(&kv.key) else {
            continue;
        };
        let Ok(a) = LimitAllocation::decode(kv.value.as_slice()) else {
            continue;
        };
        let agents = u32::try_from(a.shares.len()).unwrap_or(u32::MAX);
        for s in &a.shares {
            per_node
                .entry(s.node_id.clone())
                .or_default()
                .push(LimitShare {
                    namespace: ns.clone(),
                    service: svc.clone(),
                    rule: rule.clone(),
                    requests_per_second: s.requests_per_second,
                    burst: s.burst,
                    agents,
                });
        }
    }
    for (node, shares) in per_node {
        if let Some(stream) = streams.get(&node) {
            stream.send(ControlMessage {
                kind: Some(control_message::Kind::Shares(LimitShares { shares })),
            });
        }
    }
    Ok(())
}

/// Allocates and sends shares every [`EVERY`] until dropped.
#[derive(Debug)]
pub struct QuotaAllocator {
    _task: AbortOnDrop,
}

impl QuotaAllocator {
    pub fn start(
        store: Arc<dyn Store>,
        keys: Keys,
        hub: Hub,
        streams: LocalStreams,
        replica_id: String,
    ) -> Self {
        Self {
            _task: AbortOnDrop(tokio::spawn(async move {
                let mut written = BTreeMap::new();
                loop {
                    if hub.is_ready() {
                        if let Err(e) =
                            allocate_owned(&store, &keys, &hub, &replica_id, &mut written).await
                        {
                            tracing::warn!(error = %e, "allocating global rate limits failed");
                        }
                        if let Err(e) = send_shares(store.as_ref(), &keys, &streams).await {
                            tracing::warn!(error = %e, "sending rate limit shares failed");
                        }
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

    fn demands(d: &[f64]) -> Vec<(String, f64)> {
        d.iter()
            .enumerate()
            .map(|(i, d)| (format!("node-{i}"), *d))
            .collect()
    }

    fn rates(shares: &[NodeShare]) -> Vec<f64> {
        shares
            .iter()
            .map(|s| (s.requests_per_second * 100.0).round() / 100.0)
            .collect()
    }

    #[test]
    fn shares_are_max_min_fair_on_the_wants_and_sum_to_the_limit() {
        // 50, 100, 200 and 400/s against 300/s: the 50/s agent wants 56
        // and gets it; the rest is split evenly among the other three.
        let shares = allocate(300.0, 30, &demands(&[50.0, 100.0, 200.0, 400.0]));
        assert_eq!(rates(&shares), [56.0, 81.33, 81.33, 81.33]);
        let sum: f64 = shares.iter().map(|s| s.requests_per_second).sum();
        assert!((sum - 300.0).abs() < 1e-9, "{sum}");
        assert_eq!(
            shares.iter().map(|s| s.burst).collect::<Vec<_>>(),
            [6, 9, 9, 9],
            "the burst in proportion, rounded up"
        );
        // Everyone fits: wants met, the rest split alike.
        let shares = allocate(300.0, 30, &demands(&[10.0, 20.0]));
        assert_eq!(rates(&shares), [144.5, 155.5]);
        // Nobody asks for anything: an equal split.
        assert_eq!(
            rates(&allocate(90.0, 9, &demands(&[0.0, 0.0, 0.0]))),
            [30.0; 3]
        );
        assert!(allocate(90.0, 9, &[]).is_empty());
    }

    /// Agents with offered loads, measuring their demand each second and
    /// getting a new allocation each second: simulated on tokio's paused
    /// clock, as the control plane's loop runs.
    #[tokio::test(start_paused = true)]
    async fn the_allocation_converges_and_follows_a_demand_change_within_two_seconds() {
        let mut offered = [50.0, 100.0, 200.0, 400.0];
        let limit = 300.0;
        let mut shares = vec![limit / 4.0; 4];
        let mut history = Vec::new();
        let start = tokio::time::Instant::now();
        for second in 0..10 {
            if second == 5 {
                // The 400/s agent drops to 20/s.
                offered[3] = 20.0;
            }
            tokio::time::sleep(EVERY).await;
            // What each agent measured over the last second: what reached
            // its bucket, admitted or not.
            let measured: Vec<(String, f64)> = offered
                .iter()
                .enumerate()
                .map(|(i, o)| (format!("node-{i}"), *o))
                .collect();
            shares = allocate(limit, 30, &measured)
                .iter()
                .map(|s| s.requests_per_second)
                .collect();
            let sum: f64 = shares.iter().sum();
            assert!(sum <= limit + 1e-9, "second {second}: {sum}");
            history.push((start.elapsed(), shares.clone()));
        }
        // Converged before the change: the 50/s agent is never limited;
        // the others split the rest.
        let (_, before) = &history[3];
        assert!(before[0] >= 50.0);
        assert!((before[1] - before[3]).abs() < 1e-9);
        // Within 2 s of the change (at 5 s), the freed share moved: the
        // 20/s agent holds only what it wants, and the 200/s agent has
        // most of what it asks for.
        let (at, after) = history
            .iter()
            .find(|(at, _)| *at >= Duration::from_secs(6))
            .expect("after the change");
        assert!(*at <= Duration::from_secs(7));
        assert!((after[3] - 23.0).abs() < 1e-9, "{after:?}");
        assert!(
            after[2] > 100.0 && after[2] < 200.0 * 1.1 + 1.0,
            "{after:?}"
        );
        assert_eq!(shares, *after);
    }
}
