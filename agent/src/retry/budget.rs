//! A retry budget per service: retries may be at most `budget_percent` of
//! the requests of the last [`WINDOW`] seconds, plus a floor of
//! [`FLOOR_PER_SECOND`] retries a second (so a service with little traffic
//! can still retry at all). In an outage where every attempt fails, load on
//! the instances grows by at most that share instead of multiplying by the
//! attempts (Finagle's budget, without its token arithmetic).
//!
//! Counted in one-second slots of atomics shared by every worker, so
//! counting a request costs two relaxed atomic operations and no lock.
//! Two workers starting a new second at once may lose a count or two of
//! that second: a budget needs no more exactness than that.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use tokio::time::Instant;

/// Seconds the budget looks back.
pub const WINDOW: u64 = 10;
/// Retries a second always allowed.
pub const FLOOR_PER_SECOND: u64 = 3;

#[derive(Debug, Default)]
struct Slot {
    /// The second (since the budget's start) this slot counts, plus one:
    /// 0 is a slot never used.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// One service's retry budget.
#[derive(Debug)]
pub struct Budget {
    start: Instant,
    slots: [Slot; WINDOW as usize],
}

impl Default for Budget {
    fn default() -> Self {
        Self::new()
    }
}

impl Budget {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            slots: Default::default(),
        }
    }

    /// The slot of `now`, emptied first when it last counted an older
    /// second; and `now`'s second (plus one).
    fn slot(&self, now: Instant) -> (&Slot, u64) {
        let second = now.saturating_duration_since(self.start).as_secs() + 1;
        let slot = &self.slots[(second % WINDOW) as usize];
        let seen = slot.second.load(Relaxed);
        if seen != second
            && slot
                .second
                .compare_exchange(seen, second, Relaxed, Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Relaxed);
            slot.retries.store(0, Relaxed);
        }
        (slot, second)
    }

    /// Counts one request (its first attempt).
    #[inline]
    pub fn request(&self, now: Instant) {
        self.slot(now).0.requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget if it has one: `true` (and counted)
    /// while retries of the window stay under `percent` of its requests
    /// plus the floor.
    pub fn try_retry(&self, now: Instant, percent: f64) -> bool {
        let (current, second) = self.slot(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for slot in &self.slots {
            let s = slot.second.load(Relaxed);
            if s != 0 && s <= second && second - s < WINDOW {
                requests += slot.requests.load(Relaxed);
                retries += slot.retries.load(Relaxed);
            }
        }
        let allowed = (requests as f64 * percent / 100.0) as u64 + FLOOR_PER_SECOND * WINDOW;
        if retries >= allowed {
            return false;
        }
        current.retries.fetch_add(1, Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn take(b: &Budget, percent: f64) -> u64 {
        let mut n = 0;
        while b.try_retry(Instant::now(), percent) {
            n += 1;
            assert!(n < 1_000_000, "the budget never runs out");
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests_plus_a_floor() {
        let b = Budget::new();
        // No traffic: the floor only, 3 a second over 10 seconds.
        assert_eq!(take(&b, 20.0), 30);
        let b = Budget::new();
        for _ in 0..1000 {
            b.request(Instant::now());
        }
        assert_eq!(take(&b, 20.0), 200 + 30);
        // More requests earn more retries.
        for _ in 0..100 {
            b.request(Instant::now());
        }
        assert_eq!(take(&b, 20.0), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_slides() {
        let b = Budget::new();
        for _ in 0..1000 {
            b.request(Instant::now());
        }
        assert_eq!(take(&b, 10.0), 130);
        // 9 s on: the requests and the retries still count.
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(take(&b, 10.0), 0);
        // 10 s on, they have left the window: the floor again.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(take(&b, 10.0), 30);
        // A second later, the floor's retries still count.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(take(&b, 10.0), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_outage_grows_load_by_at_most_the_share() {
        // Every attempt fails, 3 attempts allowed: without a budget 3x.
        let b = Budget::new();
        let (mut requests, mut attempts) = (0u64, 0u64);
        for _second in 0..30 {
            for _ in 0..100 {
                b.request(Instant::now());
                requests += 1;
                attempts += 1;
                for _retry in 0..2 {
                    if !b.try_retry(Instant::now(), 20.0) {
                        break;
                    }
                    attempts += 1;
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        let extra = (attempts - requests) as f64 / requests as f64;
        // 20% plus the floor (3 of 100 a second).
        assert!(extra <= 0.23 + 1e-9, "{extra}");
        assert!(extra >= 0.15, "the budget is used: {extra}");
    }
}
