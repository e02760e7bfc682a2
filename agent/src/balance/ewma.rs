//! Peak EWMA (Finagle, linkerd, tower's `PeakEwma`): each endpoint keeps an
//! exponentially weighted moving average of its latency (the time to the
//! response head) that is peak-sensitive: an observation above the average
//! replaces it at once, lower ones pull it down with weight
//! `1 - e^(-elapsed/decay)`. The estimate also decays toward zero while no
//! observation arrives, so an endpoint that was avoided for a while gets
//! probed again. A pick samples two endpoints (P2C) and takes the lower
//! cost: estimate × (requests in flight + 1) / weight.

use std::{
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use super::{least_request::p2c, Balance, Endpoint};

/// The estimate of an endpoint never observed: low enough that a new
/// endpoint gets tried soon, high enough that it does not take every
/// request of a fast service until its first answer.
pub const DEFAULT_RTT: Duration = Duration::from_millis(5);

/// The decay an endpoint's estimate uses before any route observed it.
const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// One endpoint's latency estimate. A tiny lock: held for a few float
/// operations, taken only on routes that balance (or shadow) by peak EWMA,
/// once per response and twice per pick.
#[derive(Debug)]
pub struct Ewma(Mutex<State>);

#[derive(Debug, Clone, Copy)]
struct State {
    /// Nanoseconds, as of `at`.
    estimate: f64,
    at: Instant,
    /// The decay of the last observation, for readers without their own.
    decay: Duration,
}

impl Default for Ewma {
    fn default() -> Self {
        Self(Mutex::new(State {
            estimate: DEFAULT_RTT.as_nanos() as f64,
            at: Instant::now(),
            decay: DEFAULT_DECAY,
        }))
    }
}

fn weight(elapsed: Duration, decay: Duration) -> f64 {
    (-elapsed.as_secs_f64() / decay.as_secs_f64().max(1e-9)).exp()
}

impl Ewma {
    fn state(&self) -> State {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one latency, decaying with `decay`.
    pub fn observe(&self, latency: Duration, decay: Duration) {
        let now = Instant::now();
        let rtt = latency.as_nanos() as f64;
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        s.estimate = if rtt > s.estimate {
            rtt
        } else {
            let w = weight(now.saturating_duration_since(s.at), decay);
            s.estimate * w + rtt * (1.0 - w)
        };
        s.at = now;
        s.decay = decay;
    }

    /// The estimate at `now` in nanoseconds, decayed toward zero since the
    /// last observation.
    pub fn estimate(&self, now: Instant, decay: Duration) -> f64 {
        let s = self.state();
        s.estimate * weight(now.saturating_duration_since(s.at), decay)
    }

    /// The estimate now, in milliseconds, for the admin API.
    pub fn millis(&self) -> f64 {
        let s = self.state();
        let now = Instant::now();
        s.estimate * weight(now.saturating_duration_since(s.at), s.decay) / 1e6
    }
}

#[derive(Debug)]
pub struct PeakEwma {
    endpoints: Vec<Arc<Endpoint>>,
    decay: Duration,
}

impl PeakEwma {
    pub fn new(endpoints: Vec<Arc<Endpoint>>, decay: Duration) -> Self {
        Self { endpoints, decay }
    }

    pub fn decay(&self) -> Duration {
        self.decay
    }
}

impl Balance for PeakEwma {
    fn pick(
        &self,
        _key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        let now = Instant::now();
        p2c(&self.endpoints, 2, exclude, |e| {
            let pending = e.in_flight.load(Ordering::Relaxed) as f64 + 1.0;
            e.ewma.estimate(now, self.decay) * pending / f64::from(e.weight.max(1))
        })
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{any, test_endpoint};

    const DECAY: Duration = Duration::from_secs(10);

    fn ms(e: &Ewma) -> f64 {
        e.estimate(Instant::now(), DECAY) / 1e6
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() < 0.01
    }

    #[tokio::test(start_paused = true)]
    async fn a_peak_replaces_the_average_at_once() {
        let e = Ewma::default();
        assert!(close(ms(&e), DEFAULT_RTT.as_secs_f64() * 1e3));
        e.observe(Duration::from_millis(10), DECAY);
        assert!(close(ms(&e), 10.0), "{}", ms(&e));
        tokio::time::advance(Duration::from_millis(1)).await;
        e.observe(Duration::from_millis(80), DECAY);
        assert!(close(ms(&e), 80.0), "{}", ms(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn lower_observations_pull_it_down_exponentially() {
        let e = Ewma::default();
        e.observe(Duration::from_millis(50), DECAY);
        // One decay period later a 10 ms answer weighs 1 - 1/e.
        tokio::time::advance(DECAY).await;
        e.observe(Duration::from_millis(10), DECAY);
        let want = 50.0 / std::f64::consts::E + 10.0 * (1.0 - 1.0 / std::f64::consts::E);
        assert!(close(ms(&e), want), "{} != {want}", ms(&e));
        // Right after, another 10 ms answer barely moves it.
        e.observe(Duration::from_millis(10), DECAY);
        assert!(close(ms(&e), want), "{} != {want}", ms(&e));
        // Many answers over many periods converge on 10 ms.
        for _ in 0..10 {
            tokio::time::advance(DECAY).await;
            e.observe(Duration::from_millis(10), DECAY);
        }
        assert!(close(ms(&e), 10.0), "{}", ms(&e));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_estimate_decays_toward_zero_so_it_is_probed_again() {
        let e = Ewma::default();
        e.observe(Duration::from_millis(100), DECAY);
        tokio::time::advance(DECAY * 2).await;
        let want = 100.0 / std::f64::consts::E.powi(2);
        assert!(close(ms(&e), want), "{} != {want}", ms(&e));
        assert!(close(e.millis(), want), "the admin view decays alike");
    }

    #[tokio::test(start_paused = true)]
    async fn picks_the_lower_cost_and_counts_requests_in_flight() {
        let a = test_endpoint("a", 100, "");
        let b = test_endpoint("b", 100, "");
        a.ewma.observe(Duration::from_millis(10), DECAY);
        b.ewma.observe(Duration::from_millis(100), DECAY);
        let balancer = PeakEwma::new(vec![a.clone(), b.clone()], DECAY);
        for _ in 0..20 {
            assert_eq!(&*balancer.pick(None, &any).expect("one").id, "a");
        }
        // 10 ms × 20 in flight costs more than 100 ms × 1.
        a.in_flight.store(19, Ordering::Relaxed);
        assert_eq!(&*balancer.pick(None, &any).expect("one").id, "b");
        // Excluding b still answers, with a.
        let not_b = |e: &Endpoint| &*e.id == "b";
        assert_eq!(&*balancer.pick(None, &not_b).expect("one").id, "a");
        assert!(balancer.pick(None, &|_| true).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_endpoint_avoided_for_long_is_probed_again() {
        let a = test_endpoint("a", 100, "");
        let b = test_endpoint("b", 100, "");
        b.ewma.observe(Duration::from_millis(100), DECAY);
        let balancer = PeakEwma::new(vec![a.clone(), b.clone()], DECAY);
        a.ewma.observe(Duration::from_millis(10), DECAY);
        assert_eq!(&*balancer.pick(None, &any).expect("one").id, "a");
        // a stays at 10 ms (observed all along); b, unobserved for 30 s,
        // decays below it.
        for _ in 0..30 {
            tokio::time::advance(Duration::from_secs(1)).await;
            a.ewma.observe(Duration::from_millis(10), DECAY);
        }
        assert_eq!(&*balancer.pick(None, &any).expect("one").id, "b");
    }
}
