//! Governance state from agents' reports: each node's circuit breakers
//! that are not closed (its latest report, forgotten after
//! [`BREAKERS_FRESH`] without one), and rate-limit decisions per bucket in
//! the same 10-second slots as traffic.

use std::collections::{BTreeMap, HashMap, VecDeque};

use weir_proto::{
    agent::v1::BreakerInfo,
    telemetry::v1::{LimitDelta, LimitStats, NodeBreaker, ServiceRef},
};

use super::windows::{slot_of, SLOTS, SLOT_SECONDS};

/// A node's breakers count while its last report is this recent.
pub const BREAKERS_FRESH: u64 = 30;
/// Nodes and buckets kept at most.
pub const MAX_KEYS: usize = 100_000;

/// A bucket: (namespace, service, rule).
pub type Bucket = (String, String, String);

#[derive(Debug, Default)]
pub struct Governance {
    breakers: HashMap<String, (u64, Vec<BreakerInfo>)>,
    limits: HashMap<Bucket, VecDeque<(u64, [u64; 4])>>,
}

impl Governance {
    /// A node's report at `now` (Unix seconds).
    pub fn add(&mut self, node: &str, breakers: Vec<BreakerInfo>, limits: &[LimitDelta], now: u64) {
        if self.breakers.contains_key(node) || self.breakers.len() < MAX_KEYS {
            self.breakers.insert(node.to_owned(), (now, breakers));
        }
        let slot = slot_of(now);
        for l in limits {
            let s = l.service.clone().unwrap_or_default();
            let key = (s.namespace, s.name, l.rule.clone());
            if !self.limits.contains_key(&key) && self.limits.len() >= MAX_KEYS {
                continue;
            }
            let series = self.limits.entry(key).or_default();
            if series.back().is_none_or(|(n, _)| *n != slot) {
                series.push_back((slot, [0; 4]));
            }
            while series
                .front()
                .is_some_and(|(n, _)| n + SLOTS as u64 <= slot)
            {
                series.pop_front();
            }
            if let Some((_, counts)) = series.back_mut() {
                for (c, d) in
                    counts
                        .iter_mut()
                        .zip([l.admitted, l.queued, l.rejected, l.shadow_rejected])
                {
                    *c = c.saturating_add(d);
                }
            }
        }
    }

    /// Forgets stale nodes and buckets without a slot in 15 minutes.
    pub fn expire(&mut self, now: u64) {
        self.breakers
            .retain(|_, (at, _)| at.saturating_add(BREAKERS_FRESH) >= now);
        let slot = slot_of(now);
        self.limits
            .retain(|_, s| s.back().is_some_and(|(n, _)| n + SLOTS as u64 > slot));
    }

    /// Breakers not closed on nodes heard from lately, `wanted` choosing
    /// by (namespace, service).
    pub fn breakers(&self, now: u64, wanted: impl Fn(&str, &str) -> bool) -> Vec<NodeBreaker> {
        let mut out: Vec<NodeBreaker> = self
            .breakers
            .iter()
            .filter(|(_, (at, _))| at.saturating_add(BREAKERS_FRESH) >= now)
            .flat_map(|(node, (_, list))| {
                list.iter()
                    .filter(|b| wanted(&b.namespace, &b.service))
                    .map(|b| NodeBreaker {
                        node_id: node.clone(),
                        breaker: Some(b.clone()),
                    })
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Decisions per bucket over the last `seconds`.
    pub fn limits(
        &self,
        seconds: u32,
        now: u64,
        wanted: impl Fn(&str, &str) -> bool,
    ) -> BTreeMap<Bucket, [u64; 4]> {
        let now = slot_of(now);
        let n = u64::from(seconds)
            .div_ceil(SLOT_SECONDS)
            .clamp(1, SLOTS as u64);
        let first = now + 1 - n.min(now + 1);
        let mut out = BTreeMap::new();
        for (key, series) in &self.limits {
            if !wanted(&key.0, &key.1) {
                continue;
            }
            let mut sum = [0u64; 4];
            let mut any = false;
            for (slot, counts) in series {
                if *slot >= first && *slot <= now {
                    any = true;
                    for (s, c) in sum.iter_mut().zip(counts) {
                        *s += c;
                    }
                }
            }
            if any {
                out.insert(key.clone(), sum);
            }
        }
        out
    }
}

/// The wire form of a bucket's window.
pub fn limit_stats(key: &Bucket, counts: [u64; 4], seconds: u32) -> LimitStats {
    LimitStats {
        service: Some(ServiceRef {
            namespace: key.0.clone(),
            name: key.1.clone(),
        }),
        rule: key.2.clone(),
        admitted: counts[0],
        queued: counts[1],
        rejected: counts[2],
        shadow_rejected: counts[3],
        rejected_per_second: counts[2] as f64 / f64::from(seconds.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(rule: &str, admitted: u64, rejected: u64) -> LimitDelta {
        LimitDelta {
            service: Some(ServiceRef {
                namespace: "shop".into(),
                name: "orders".into(),
            }),
            rule: rule.into(),
            admitted,
            rejected,
            ..LimitDelta::default()
        }
    }

    fn open(instance: &str) -> BreakerInfo {
        BreakerInfo {
            namespace: "shop".into(),
            service: "orders".into(),
            instance_id: instance.into(),
            state: "open".into(),
            ..BreakerInfo::default()
        }
    }

    #[test]
    fn breakers_follow_each_nodes_latest_report_and_limits_add_up() {
        let mut g = Governance::default();
        let t = 1_000_000;
        g.add("n1", vec![open("o1")], &[delta("default", 10, 5)], t);
        g.add(
            "n2",
            vec![open("o1"), open("o2")],
            &[delta("default", 20, 0)],
            t,
        );
        let any = |_: &str, _: &str| true;
        assert_eq!(g.breakers(t, any).len(), 3);
        // n1's breaker closed: its next report has none.
        g.add("n1", Vec::new(), &[delta("default", 1, 1)], t + 1);
        assert_eq!(g.breakers(t + 1, any).len(), 2);
        let limits = g.limits(60, t + 1, any);
        let counts = limits[&("shop".into(), "orders".into(), "default".into())];
        assert_eq!((counts[0], counts[2]), (31, 6));
        let s = limit_stats(
            &("shop".into(), "orders".into(), "default".into()),
            counts,
            60,
        );
        assert!((s.rejected_per_second - 0.1).abs() < 1e-9);
        // n2 falls silent: its breakers no longer count after 30 s.
        assert!(g.breakers(t + 40, any).is_empty());
        assert!(g.limits(60, t + 120, any).is_empty());
        g.expire(t + 2_000);
        assert!(g.limits(900, t + 2_000, any).is_empty());
        assert!(g.breakers.is_empty());
    }
}
