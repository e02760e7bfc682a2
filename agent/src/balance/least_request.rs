//! Least request by the power of `choices` choices: sample `choices`
//! distinct endpoints at random and take the one with the fewest requests
//! in flight relative to its weight. Sampling instead of scanning keeps a
//! pick O(choices) and avoids the herd a global minimum causes when many
//! agents see the same counts (Mitzenmacher; Envoy's and linkerd's default).
//!
//! [`p2c`] is the sampling core, shared with [`super::PeakEwma`], which
//! only measures load differently.

use std::sync::{atomic::Ordering, Arc};

use super::{random_below, Balance, Endpoint};

/// Most choices a policy may ask for (`validate::MAX_CHOICES`).
const MAX_CHOICES: usize = 8;

#[derive(Debug)]
pub struct LeastRequest {
    endpoints: Vec<Arc<Endpoint>>,
    choices: usize,
}

impl LeastRequest {
    /// Over `endpoints`, sampling `choices` (2-8, clamped) per pick.
    pub fn new(endpoints: Vec<Arc<Endpoint>>, choices: u32) -> Self {
        Self {
            endpoints,
            choices: (choices as usize).clamp(2, MAX_CHOICES),
        }
    }
}

/// Requests in flight on `e` plus the one about to be sent, per unit of
/// weight (so weight 200 takes twice the load of weight 100).
fn load(e: &Endpoint) -> f64 {
    (e.in_flight.load(Ordering::Relaxed) as f64 + 1.0) / f64::from(e.weight.max(1))
}

impl Balance for LeastRequest {
    fn pick(
        &self,
        _key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        p2c(&self.endpoints, self.choices, exclude, load)
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

/// The least loaded by `load` of `choices` distinct endpoints sampled at
/// random, skipping excluded ones; ties go to a random one of them. When
/// every sampled one is excluded, the least loaded of all that are not (a
/// scan, bounded by the endpoint count), so a pick fails only when
/// everything is excluded.
pub(super) fn p2c<'a>(
    endpoints: &'a [Arc<Endpoint>],
    choices: usize,
    exclude: &dyn Fn(&Endpoint) -> bool,
    load: impl Fn(&Endpoint) -> f64,
) -> Option<&'a Arc<Endpoint>> {
    let n = endpoints.len();
    let least = |candidates: &mut dyn Iterator<Item = &'a Arc<Endpoint>>| {
        let mut best: Option<(&'a Arc<Endpoint>, f64)> = None;
        for e in candidates {
            if exclude(e) {
                continue;
            }
            let l = load(e);
            if best.is_none_or(|(_, b)| l < b) {
                best = Some((e, l));
            }
        }
        best.map(|(e, _)| e)
    };
    // From a random place, so that ties (idle endpoints) do not all go to
    // the first one.
    let all = || {
        let start = random_below(n.max(1));
        (0..n).map(move |k| &endpoints[(start + k) % n])
    };
    if n <= choices {
        return least(&mut all());
    }
    let mut sampled = [0usize; MAX_CHOICES];
    let mut k = 0;
    // Distinct indices; with choices < n a draw repeats with probability
    // below choices / n, so this loop ends after a few draws.
    while k < choices {
        let i = random_below(n);
        if !sampled[..k].contains(&i) {
            sampled[k] = i;
            k += 1;
        }
    }
    least(&mut sampled[..k].iter().map(|&i| &endpoints[i])).or_else(|| least(&mut all()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balance::{any, test_endpoint};

    fn counts(b: &LeastRequest, n: usize) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for _ in 0..n {
            let e = b.pick(None, &any).expect("one");
            *counts.entry(e.id.to_string()).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn a_busy_endpoint_is_avoided() {
        let eps: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|id| test_endpoint(id, 100, ""))
            .collect();
        eps[0].in_flight.store(10, Ordering::Relaxed);
        let b = LeastRequest::new(eps, 2);
        let c = counts(&b, 3000);
        // a loses every draw it is in: it is never picked.
        assert_eq!(c.get("a"), None, "{c:?}");
        assert!(c["b"] > 1200 && c["c"] > 1200, "{c:?}");
    }

    #[test]
    fn with_equal_load_picks_spread_evenly() {
        let eps: Vec<_> = (0..4)
            .map(|i| test_endpoint(&format!("e{i}"), 100, ""))
            .collect();
        let c = counts(&LeastRequest::new(eps, 2), 8000);
        for (id, n) in &c {
            assert!((1600..=2400).contains(n), "{id}: {n} of 8000: {c:?}");
        }
    }

    #[test]
    fn idle_endpoints_share_even_when_there_are_no_more_than_choices() {
        let eps = vec![test_endpoint("a", 100, ""), test_endpoint("b", 100, "")];
        let c = counts(&LeastRequest::new(eps, 2), 2000);
        assert!(c["a"] > 800 && c["b"] > 800, "{c:?}");
    }

    #[test]
    fn weight_scales_the_load() {
        let eps = vec![
            test_endpoint("heavy", 400, ""),
            test_endpoint("light", 100, ""),
        ];
        // 3 in flight on weight 400 is less load than 1 on weight 100.
        eps[0].in_flight.store(3, Ordering::Relaxed);
        eps[1].in_flight.store(1, Ordering::Relaxed);
        let b = LeastRequest::new(eps, 2);
        assert_eq!(&*b.pick(None, &any).expect("one").id, "heavy");
    }

    #[test]
    fn excluded_endpoints_are_never_picked_even_when_least_loaded() {
        let eps: Vec<_> = (0..5)
            .map(|i| test_endpoint(&format!("e{i}"), 100, ""))
            .collect();
        for e in &eps[1..] {
            e.in_flight.store(50, Ordering::Relaxed);
        }
        let b = LeastRequest::new(eps, 2);
        let not_e0 = |e: &Endpoint| &*e.id == "e0";
        for _ in 0..200 {
            let e = b.pick(None, &not_e0).expect("four remain");
            assert_ne!(&*e.id, "e0");
        }
        // Only e3 allowed: found even when the sample misses it.
        let only_e3 = |e: &Endpoint| &*e.id != "e3";
        for _ in 0..50 {
            assert_eq!(&*b.pick(None, &only_e3).expect("e3").id, "e3");
        }
        assert!(b.pick(None, &|_| true).is_none());
        assert!(LeastRequest::new(Vec::new(), 2).pick(None, &any).is_none());
    }

    #[test]
    fn more_choices_find_the_idle_one_more_often() {
        let eps: Vec<_> = (0..8)
            .map(|i| test_endpoint(&format!("e{i}"), 100, ""))
            .collect();
        for e in &eps[1..] {
            e.in_flight.store(5, Ordering::Relaxed);
        }
        let idle = |choices| {
            let b = LeastRequest::new(eps.clone(), choices);
            counts(&b, 4000).get("e0").copied().unwrap_or(0)
        };
        // P(e0 sampled) is 2/8 with two choices, 6/8 with six.
        let (two, six) = (idle(2), idle(6));
        assert!((800..=1200).contains(&two), "two choices: {two}");
        assert!((2800..=3200).contains(&six), "six choices: {six}");
    }
}
