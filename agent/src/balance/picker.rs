//! What a route picks with: a [`Balancer`] over the usable endpoints, the
//! same algorithm over those in the agent's zone when the zone preference
//! holds, and the shadow balancer a `load_balancer` in shadow mode asks
//! for. Built from the view on change, like the balancers it holds.
//!
//! **Zone preference** is decided when the picker is built: the in-zone
//! balancer exists while the agent's zone holds at least the policy's
//! percentage of the usable endpoints. A pick tries it first and spills
//! over to every zone only when every in-zone endpoint is excluded (ejected
//! or already tried).
//!
//! **Shadow**: after each pick, the shadow picker picks too (it has its
//! own rotation and sees the same exclusions and key); when it would have
//! chosen another endpoint, a counter goes up. Nothing else changes.

use std::{sync::Arc, time::Duration};

use weir_core::policy::resolve::{Algorithm, HashKey};

use super::{
    policy::{Lb, Spec},
    Balance, Balancer, ConsistentHash, Endpoint, LeastRequest, PeakEwma, RoundRobin,
};

#[derive(Debug)]
pub struct Picker {
    all: Balancer,
    /// Over the endpoints of the agent's zone, while they are enough.
    in_zone: Option<Balancer>,
    /// The decay when latencies must be observed (peak EWMA applied or in
    /// shadow).
    ewma_decay: Option<Duration>,
    /// What to hash when a consistent hash is applied or in shadow.
    hash_key: Option<HashKey>,
    shadow: Option<Box<Shadow>>,
}

#[derive(Debug)]
struct Shadow {
    picker: Picker,
    disagreements: metrics::Counter,
}

/// `spec`'s algorithm over `endpoints`, a rotation starting at `start`.
fn build(spec: &Spec, endpoints: Vec<Arc<Endpoint>>, start: usize) -> Balancer {
    match &spec.algorithm {
        Algorithm::RoundRobin => Balancer::RoundRobin(RoundRobin::new(endpoints, start, false)),
        Algorithm::WeightedRoundRobin => {
            Balancer::RoundRobin(RoundRobin::new(endpoints, start, true))
        }
        Algorithm::LeastRequest { choices } => {
            Balancer::LeastRequest(LeastRequest::new(endpoints, *choices))
        }
        Algorithm::PeakEwma { decay } => Balancer::PeakEwma(PeakEwma::new(endpoints, *decay)),
        Algorithm::ConsistentHash { .. } => {
            Balancer::ConsistentHash(ConsistentHash::new(endpoints, start))
        }
    }
}

/// Whether `local` of `all` usable endpoints are enough to keep traffic in
/// the zone: at least `min_percent` percent, and at least one.
pub fn zone_holds(local: usize, all: usize, min_percent: u32) -> bool {
    local > 0 && local as u64 * 100 >= u64::from(min_percent) * all as u64
}

impl Picker {
    /// The picker `lb` asks for over `endpoints`, for an agent in `zone`
    /// (empty: no zone preference). `start`: where rotations begin (the
    /// previous picker's [`Picker::position`]). `disagreements` is called
    /// only when `lb` has a shadow.
    pub fn new(
        lb: &Lb,
        endpoints: &[Arc<Endpoint>],
        zone: &str,
        start: usize,
        disagreements: impl FnOnce() -> metrics::Counter,
    ) -> Self {
        let mut picker = Self::of(&lb.applied, endpoints, zone, start);
        if let Some(spec) = &lb.shadow {
            let shadow = Self::of(spec, endpoints, zone, start);
            picker.ewma_decay = picker.ewma_decay.or(shadow.ewma_decay);
            picker.hash_key = picker.hash_key.clone().or(shadow.hash_key.clone());
            picker.shadow = Some(Box::new(Shadow {
                picker: shadow,
                disagreements: disagreements(),
            }));
        }
        picker
    }

    fn of(spec: &Spec, endpoints: &[Arc<Endpoint>], zone: &str, start: usize) -> Self {
        let in_zone = spec
            .zone_min_percent
            .filter(|_| !zone.is_empty())
            .and_then(|min| {
                let local: Vec<Arc<Endpoint>> = endpoints
                    .iter()
                    .filter(|e| *e.zone == *zone)
                    .cloned()
                    .collect();
                zone_holds(local.len(), endpoints.len(), min).then(|| build(spec, local, start))
            });
        Self {
            all: build(spec, endpoints.to_vec(), start),
            in_zone,
            ewma_decay: match spec.algorithm {
                Algorithm::PeakEwma { decay } => Some(decay),
                _ => None,
            },
            hash_key: match &spec.algorithm {
                Algorithm::ConsistentHash { key } => Some(key.clone()),
                _ => None,
            },
            shadow: None,
        }
    }

    /// An endpoint for a request whose consistent-hash key hashes to `key`
    /// (`None`: no key, or none needed), skipping those `exclude` rejects.
    #[inline]
    pub fn pick(
        &self,
        key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let picked = match &self.in_zone {
            None => self.all.pick(key, exclude),
            Some(local) => local
                .pick(key, exclude)
                .or_else(|| self.all.pick(key, exclude)),
        };
        if let Some(shadow) = &self.shadow {
            let would = shadow.picker.pick(key, exclude);
            let same = match (picked, would) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if !same {
                shadow.disagreements.increment(1);
            }
        }
        picked
    }

    /// Records the time `endpoint` (picked here) took to answer, when a
    /// peak EWMA balances or shadows: call it when the response head came.
    #[inline]
    pub fn observe(&self, endpoint: &Endpoint, latency: Duration) {
        if let Some(decay) = self.ewma_decay {
            endpoint.ewma.observe(latency, decay);
        }
    }

    /// Whether latencies are worth measuring ([`Picker::observe`]).
    #[inline]
    pub fn observes(&self) -> bool {
        self.ewma_decay.is_some()
    }

    /// What a request's key is read from, when a consistent hash needs
    /// one; `None` on every other route, which then reads nothing.
    #[inline]
    pub fn hash_key(&self) -> Option<&HashKey> {
        self.hash_key.as_ref()
    }

    /// Every usable endpoint of the route.
    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        self.all.endpoints()
    }

    /// The algorithm applied, by its admin name.
    pub fn algorithm(&self) -> &'static str {
        self.all.name()
    }

    /// The algorithm in shadow mode, if any.
    pub fn shadow_algorithm(&self) -> Option<&'static str> {
        self.shadow.as_ref().map(|s| s.picker.algorithm())
    }

    /// Whether picks stay in the agent's zone now.
    pub fn in_zone(&self) -> bool {
        self.in_zone.is_some()
    }

    /// Where its rotation is, for the next picker to carry on.
    pub fn position(&self) -> usize {
        match &self.all {
            Balancer::RoundRobin(rr) => rr.position(),
            Balancer::ConsistentHash(ch) => ch.position(),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::balance::{any, test_endpoint};

    fn spec(algorithm: Algorithm, zone_min_percent: Option<u32>) -> Spec {
        Spec {
            algorithm,
            zone_min_percent,
        }
    }

    fn lb(applied: Spec) -> Lb {
        Lb {
            applied,
            shadow: None,
        }
    }

    fn zones(zones: &[&str]) -> Vec<Arc<Endpoint>> {
        zones
            .iter()
            .enumerate()
            .map(|(i, z)| test_endpoint(&format!("{z}{i}"), 100, z))
            .collect()
    }

    fn counts(p: &Picker, n: usize, exclude: &dyn Fn(&Endpoint) -> bool) -> HashMap<String, usize> {
        let mut c = HashMap::new();
        for _ in 0..n {
            let e = p.pick(None, exclude).expect("one");
            *c.entry(e.zone.to_string()).or_insert(0) += 1;
        }
        c
    }

    #[test]
    fn the_threshold_is_a_share_of_usable_endpoints() {
        assert!(zone_holds(2, 3, 60));
        assert!(!zone_holds(1, 2, 60));
        assert!(zone_holds(1, 2, 50));
        assert!(!zone_holds(0, 0, 0), "an empty zone never holds");
        assert!(zone_holds(1, 4, 25));
        assert!(!zone_holds(1, 5, 25));
    }

    #[test]
    fn traffic_stays_in_zone_until_the_zone_falls_under_the_threshold() {
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::LeastRequest { choices: 2 },
            Algorithm::PeakEwma {
                decay: Duration::from_secs(10),
            },
        ] {
            let preferring = lb(spec(algorithm.clone(), Some(60)));
            let p = Picker::new(&preferring, &zones(&["a", "a", "b"]), "a", 0, || {
                unreachable!("no shadow")
            });
            assert!(p.in_zone());
            assert_eq!(counts(&p, 300, &any).get("b"), None, "{algorithm:?}");
            // One of zone a's two is gone: 1 of 2 is under 60%.
            let p = Picker::new(&preferring, &zones(&["a", "b"]), "a", 0, || {
                unreachable!("no shadow")
            });
            assert!(!p.in_zone());
            // Requests stay in flight, so load-aware algorithms spread too.
            let mut c: HashMap<String, usize> = HashMap::new();
            for _ in 0..300 {
                let e = p.pick(None, &any).expect("one");
                e.in_flight
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                *c.entry(e.zone.to_string()).or_insert(0) += 1;
            }
            assert!(c.get("b").is_some_and(|n| *n > 50), "{algorithm:?}: {c:?}");
        }
    }

    #[test]
    fn excluded_in_zone_endpoints_spill_over_and_no_zone_means_no_preference() {
        let preferring = lb(spec(Algorithm::RoundRobin, Some(25)));
        let eps = zones(&["a", "a", "b", "b"]);
        let p = Picker::new(&preferring, &eps, "a", 0, || unreachable!());
        let no_a = |e: &Endpoint| &*e.zone == "a";
        assert_eq!(counts(&p, 10, &no_a)["b"], 10);
        // An agent without a zone, or a policy without the preference.
        let p = Picker::new(&preferring, &eps, "", 0, || unreachable!());
        assert!(!p.in_zone());
        let p = Picker::new(
            &lb(spec(Algorithm::RoundRobin, None)),
            &eps,
            "a",
            0,
            || unreachable!(),
        );
        assert_eq!(counts(&p, 8, &any)["b"], 4);
    }

    #[test]
    fn only_hashing_and_ewma_routes_read_keys_and_latencies() {
        let eps = zones(&["a", "b"]);
        let rr = Picker::new(&Lb::default(), &eps, "a", 0, || unreachable!());
        assert!(rr.hash_key().is_none() && !rr.observes());
        assert_eq!(rr.algorithm(), "round_robin");
        let shadow_hash = Lb {
            applied: Spec::default(),
            shadow: Some(spec(
                Algorithm::ConsistentHash {
                    key: HashKey::Subject,
                },
                None,
            )),
        };
        let p = Picker::new(&shadow_hash, &eps, "a", 0, metrics::Counter::noop);
        assert_eq!(p.hash_key(), Some(&HashKey::Subject), "the shadow needs it");
        assert_eq!(p.algorithm(), "round_robin");
        assert_eq!(p.shadow_algorithm(), Some("consistent_hash"));
        let ewma = Picker::new(
            &lb(spec(
                Algorithm::PeakEwma {
                    decay: Duration::from_secs(1),
                },
                None,
            )),
            &eps,
            "a",
            0,
            || unreachable!(),
        );
        assert!(ewma.observes() && ewma.hash_key().is_none());
    }

    #[test]
    fn shadow_picks_change_nothing_and_disagreements_are_counted() {
        use std::sync::atomic::{AtomicU64, Ordering};

        #[derive(Debug)]
        struct Count(AtomicU64);
        impl metrics::CounterFn for Count {
            fn increment(&self, n: u64) {
                self.0.fetch_add(n, Ordering::Relaxed);
            }
            fn absolute(&self, n: u64) {
                self.0.store(n, Ordering::Relaxed);
            }
        }
        let count = Arc::new(Count(AtomicU64::new(0)));
        let eps = zones(&["a", "a", "b"]);
        // Shadow: a consistent hash that sends every key "k" to one endpoint.
        let shadow = Lb {
            applied: Spec::default(),
            shadow: Some(spec(
                Algorithm::ConsistentHash {
                    key: HashKey::Subject,
                },
                None,
            )),
        };
        let p = Picker::new(&shadow, &eps, "a", 0, || {
            metrics::Counter::from_arc(count.clone())
        });
        let key = Some(crate::balance::key_hash(b"k"));
        let seen: Vec<String> = (0..9)
            .map(|_| p.pick(key, &any).expect("one").id.to_string())
            .collect();
        assert_eq!(
            seen,
            ["a0", "a1", "b2", "a0", "a1", "b2", "a0", "a1", "b2"],
            "round robin applies"
        );
        // The hash agrees with round robin on one endpoint in three.
        assert_eq!(count.0.load(Ordering::Relaxed), 6);
    }
}
