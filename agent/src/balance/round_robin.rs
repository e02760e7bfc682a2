//! Round robin, weighted and smooth: each endpoint gets requests in
//! proportion to its weight, spread out rather than in runs (weights 5, 1, 1
//! give a a b a c a a, not a a a a a b c), as nginx's smooth weighted
//! round robin. The sequence is computed once when the endpoint set
//! changes; a pick is one atomic increment.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use super::{Balance, Endpoint};

/// Longest precomputed sequence. Weights whose (gcd-reduced) sum is larger
/// are scaled down to fit, keeping every endpoint at least once.
const MAX_SEQUENCE: u64 = 1 << 16;

#[derive(Debug)]
pub struct RoundRobin {
    endpoints: Vec<Arc<Endpoint>>,
    /// Indexes into `endpoints`, in pick order.
    sequence: Vec<u32>,
    cursor: AtomicUsize,
    weighted: bool,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The smooth weighted round-robin order of `weights` (all at least 1).
fn smooth_sequence(weights: &[u64]) -> Vec<u32> {
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        out.push(best as u32);
    }
    out
}

impl RoundRobin {
    /// A balancer over `endpoints` starting its rotation at `start` (pass
    /// the previous balancer's [`RoundRobin::position`] so a change of the
    /// set does not send the next requests to the first endpoints again).
    /// `weighted`: by the endpoints' weights (the policy's
    /// `WEIGHTED_ROUND_ROBIN`), else one turn each (`ROUND_ROBIN`, the
    /// default).
    pub fn new(endpoints: Vec<Arc<Endpoint>>, start: usize, weighted: bool) -> Self {
        let mut weights: Vec<u64> = endpoints
            .iter()
            .map(|e| {
                if weighted {
                    u64::from(e.weight.max(1))
                } else {
                    1
                }
            })
            .collect();
        let g = weights.iter().copied().fold(0, gcd).max(1);
        weights.iter_mut().for_each(|w| *w /= g);
        let total: u64 = weights.iter().sum();
        if total > MAX_SEQUENCE {
            let scale = total.div_ceil(MAX_SEQUENCE);
            weights.iter_mut().for_each(|w| *w = (*w / scale).max(1));
        }
        let sequence = if weights.iter().all(|w| *w == 1) {
            (0..endpoints.len() as u32).collect()
        } else {
            smooth_sequence(&weights)
        };
        Self {
            endpoints,
            sequence,
            cursor: AtomicUsize::new(start),
            weighted,
        }
    }

    /// Whether it follows the endpoints' weights.
    pub fn weighted(&self) -> bool {
        self.weighted
    }

    /// Where the rotation is.
    pub fn position(&self) -> usize {
        self.cursor.load(Ordering::Relaxed)
    }
}

impl Balance for RoundRobin {
    #[inline]
    fn pick(
        &self,
        _key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let n = self.sequence.len();
        if n == 0 {
            return None;
        }
        // At most one lap: after it every position was offered.
        for _ in 0..n {
            let at = self.cursor.fetch_add(1, Ordering::Relaxed) % n;
            let e = &self.endpoints[self.sequence[at] as usize];
            if !exclude(e) {
                return Some(e);
            }
        }
        None
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balance::any;

    fn ep(id: &str, weight: u32) -> Arc<Endpoint> {
        crate::balance::test_endpoint(id, weight, "")
    }

    fn picks(rr: &RoundRobin, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| rr.pick(None, &any).expect("an endpoint").id.to_string())
            .collect()
    }

    #[test]
    fn equal_weights_rotate_in_order() {
        let rr = RoundRobin::new(vec![ep("a", 100), ep("b", 100), ep("c", 100)], 0, true);
        assert_eq!(picks(&rr, 6), ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn weights_are_followed_and_spread_out() {
        let rr = RoundRobin::new(vec![ep("a", 5), ep("b", 1), ep("c", 1)], 0, true);
        assert_eq!(picks(&rr, 7), ["a", "a", "b", "a", "c", "a", "a"]);
        let rr = RoundRobin::new(vec![ep("a", 300), ep("b", 200), ep("c", 100)], 0, true);
        let mut counts = HashMap::new();
        for id in picks(&rr, 6000) {
            *counts.entry(id).or_insert(0) += 1;
        }
        assert_eq!(counts["a"], 3000);
        assert_eq!(counts["b"], 2000);
        assert_eq!(counts["c"], 1000);
    }

    #[test]
    fn plain_round_robin_ignores_weights() {
        let rr = RoundRobin::new(vec![ep("a", 5), ep("b", 1), ep("c", 1)], 0, false);
        assert_eq!(picks(&rr, 6), ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn huge_weight_sums_are_scaled_not_dropped() {
        let rr = RoundRobin::new(vec![ep("a", 10_000), ep("b", 9_999), ep("c", 1)], 0, true);
        assert!(rr.sequence.len() as u64 <= MAX_SEQUENCE);
        let seen = picks(&rr, rr.sequence.len());
        assert!(
            seen.iter().any(|s| s == "c"),
            "the lightest still gets a turn"
        );
    }

    #[test]
    fn excluded_endpoints_are_skipped_and_all_excluded_is_none() {
        let rr = RoundRobin::new(vec![ep("a", 1), ep("b", 1), ep("c", 1)], 0, true);
        let not_b = |e: &Endpoint| &*e.id == "b";
        let seen: Vec<String> = (0..4)
            .map(|_| rr.pick(None, &not_b).expect("one").id.to_string())
            .collect();
        assert_eq!(seen, ["a", "c", "a", "c"]);
        assert!(rr.pick(None, &|_| true).is_none());
        assert!(RoundRobin::new(Vec::new(), 0, true)
            .pick(None, &any)
            .is_none());
    }

    #[test]
    fn a_rebuilt_balancer_continues_the_rotation() {
        let first = RoundRobin::new(vec![ep("a", 1), ep("b", 1), ep("c", 1)], 0, true);
        assert_eq!(picks(&first, 1), ["a"]);
        let next = RoundRobin::new(
            vec![ep("a", 1), ep("b", 1), ep("c", 1), ep("d", 1)],
            first.position(),
            true,
        );
        assert_eq!(picks(&next, 3), ["b", "c", "d"]);
    }
}
