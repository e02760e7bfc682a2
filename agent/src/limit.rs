//! Rate limiting: one token bucket per (target service, rule that sets a
//! `rate_limit` of its own), shared by every connection and worker of the
//! agent, decided as a request is handled (never by delaying readiness).
//!
//! The bucket is the generic cell rate algorithm (GCRA, as in ATM and in
//! the `governor` crate): one atomic "theoretical arrival time" (TAT)
//! instead of a token count and a refill timer. With an emission interval
//! `T = 1 / rate` and a tolerance `τ = burst × T`, a request at `now`
//! conforms when `max(TAT, now) + T - now ≤ τ`, and then moves the TAT to
//! `max(TAT, now) + T`. So `burst` requests pass at once from a full
//! bucket, then one every `T`; over any span `d`, at most
//! `burst + d / T` pass. The state is one `u64` updated by
//! compare-and-swap: no lock, no allocation, no task per request.
//!
//! `QUEUE` falls out of the same arithmetic: a request that does not
//! conform now reserves the slot it would conform at, when that is
//! within `max_queue_wait_ms`, and waits for it. Reservations are taken
//! in the order requests arrive, so the queue is first come, first
//! served without a queue.
//!
//! Why not `governor` itself: a policy change must carry the bucket's
//! level over in proportion ([`Limiter::successor`]), `QUEUE` needs a
//! reservation, and the outbox scheduler paces deliveries by reserving
//! too; governor keeps its state private and takes its clock from its own
//! trait rather than tokio's, which the paused-time tests need.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use weir_core::policy::resolve::{OnExcess, RateLimit, Scope};

use crate::reject::{Reason, Rejection};

/// The clock buckets count from (nanoseconds since the first use).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// What a bucket says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Conforms: go now.
    Go,
    /// Go after waiting this long (`QUEUE`; its slot is reserved).
    Wait(Duration),
    /// Refused: it would conform after this long.
    Reject(Duration),
}

/// The counters of one bucket's decisions.
#[derive(Debug)]
struct Counters {
    admitted: metrics::Counter,
    queued: metrics::Counter,
    rejected: metrics::Counter,
    shadow_rejected: metrics::Counter,
}

/// The part of a `GLOBAL` limit this agent enforces.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Share {
    pub requests_per_second: f64,
    pub burst: u32,
    /// `allocated` by the control plane, or `fallback` (limit ÷ agents,
    /// once allocations stopped coming).
    pub source: &'static str,
}

/// Local counts, for the admin API (the `metrics` handles cannot be read).
#[derive(Debug, Default)]
struct Tally {
    admitted: AtomicU64,
    queued: AtomicU64,
    rejected: AtomicU64,
    shadow_rejected: AtomicU64,
}

/// One token bucket.
#[derive(Debug)]
pub struct Limiter {
    /// `default` for the service's own limit, else the rule's name.
    pub rule: Arc<str>,
    /// `{namespace}/{service}/{rule}`, for `weir-limit`.
    name: Arc<str>,
    pub spec: RateLimit,
    /// `T`, in nanoseconds (a `GLOBAL` limit's share changes it).
    interval: AtomicU64,
    /// `τ`, in nanoseconds.
    tolerance: AtomicU64,
    /// The theoretical arrival time, in nanoseconds since [`epoch`].
    tat: AtomicU64,
    /// Requests that reached the bucket (admitted or not) since the last
    /// [`Limiter::take_arrivals`]: a `GLOBAL` limit's demand.
    arrivals: AtomicU64,
    /// What a `GLOBAL` limit runs now, if not the whole limit.
    share: std::sync::Mutex<Option<Share>>,
    counters: Counters,
    tally: Arc<Tally>,
}

/// The name a service's own (default) limit goes by, where a rule's name
/// would be.
pub const SERVICE_RULE: &str = "default";

impl Limiter {
    /// A full bucket for `spec`, counted under `namespace`, `service` and
    /// `rule`.
    pub fn new(namespace: &str, service: &str, rule: &str, spec: &RateLimit) -> Self {
        Self::with_tally(namespace, service, rule, spec, Arc::default())
    }

    fn with_tally(
        namespace: &str,
        service: &str,
        rule: &str,
        spec: &RateLimit,
        tally: Arc<Tally>,
    ) -> Self {
        let interval = interval_of(spec.requests_per_second);
        let labels = |decision: &'static str| {
            [
                ("namespace", namespace.to_owned()),
                ("service", service.to_owned()),
                ("rule", rule.to_owned()),
                ("decision", decision.to_owned()),
            ]
        };
        let counter = |d: &'static str| {
            metrics::counter!("weir_agent_rate_limit_decisions_total", &labels(d))
        };
        Self {
            rule: rule.into(),
            name: format!("{namespace}/{service}/{rule}").into(),
            spec: spec.clone(),
            interval: AtomicU64::new(interval),
            tolerance: AtomicU64::new(interval.saturating_mul(u64::from(spec.burst.max(1)))),
            tat: AtomicU64::new(0),
            arrivals: AtomicU64::new(0),
            share: std::sync::Mutex::new(None),
            counters: Counters {
                admitted: counter("admitted"),
                queued: counter("queued"),
                rejected: counter("rejected"),
                shadow_rejected: counter("shadow_rejected"),
            },
            tally,
        }
    }

    /// The bucket for `spec` that takes over from `self` after a policy
    /// change: as full, in proportion, as `self` is now (a bucket at half
    /// its burst stays at half the new burst), with the same counts.
    pub fn successor(&self, namespace: &str, service: &str, spec: &RateLimit) -> Self {
        let next = Self::with_tally(namespace, service, &self.rule, spec, self.tally.clone());
        let now = nanos(Instant::now());
        let fill = self.fill(now);
        // Empty by (1 - fill) of the new tolerance.
        let owed = ((1.0 - fill) * next.tolerance.load(Relaxed) as f64) as u64;
        next.tat.store(now.saturating_add(owed), Relaxed);
        next
    }

    /// Whether this is a `GLOBAL` limit (shared among agents).
    pub fn is_global(&self) -> bool {
        self.spec.scope == Scope::Global
    }

    /// Counts a request reaching a `GLOBAL` bucket (its demand); a
    /// per-agent bucket keeps no count, so its requests touch only the
    /// bucket's own cache line.
    #[inline]
    fn arrive(&self) {
        if self.is_global() {
            self.arrivals.fetch_add(1, Relaxed);
        }
    }

    /// Requests that reached the bucket since the last call.
    pub fn take_arrivals(&self) -> u64 {
        self.arrivals.swap(0, Relaxed)
    }

    /// Runs the bucket at `share` of a `GLOBAL` limit from now on (`None`:
    /// the whole limit), as full in proportion as it is now.
    pub fn retune(&self, share: Option<Share>) {
        let mut current = self.share.lock().unwrap_or_else(|p| p.into_inner());
        if *current == share {
            return;
        }
        let (rate, burst) = share.map_or((self.spec.requests_per_second, self.spec.burst), |s| {
            (s.requests_per_second, s.burst)
        });
        let now = nanos(Instant::now());
        let fill = self.fill(now);
        let interval = interval_of(rate);
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)));
        self.interval.store(interval, Relaxed);
        self.tolerance.store(tolerance, Relaxed);
        let owed = ((1.0 - fill) * tolerance as f64) as u64;
        self.tat.store(now.saturating_add(owed), Relaxed);
        *current = share;
    }

    /// Whether `spec` is what this bucket runs.
    pub fn runs(&self, spec: &RateLimit) -> bool {
        self.spec == *spec
    }

    /// How full the bucket is at `now`, in [0, 1].
    fn fill(&self, now: u64) -> f64 {
        let tat = self.tat.load(Relaxed).max(now);
        let owed = tat - now;
        let tolerance = self.tolerance.load(Relaxed);
        if tolerance == 0 {
            return 0.0;
        }
        (1.0 - owed as f64 / tolerance as f64).clamp(0.0, 1.0)
    }

    /// The burst the bucket runs now.
    fn burst(&self) -> u32 {
        self.share
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map_or(self.spec.burst, |s| s.burst)
    }

    /// Tokens in the bucket now (what a burst could take at once).
    pub fn tokens(&self) -> f64 {
        self.fill(nanos(Instant::now())) * f64::from(self.burst())
    }

    /// Takes one token at `now`, or reserves the next slot when one comes
    /// within `max_wait` (`None`: never wait). The bucket changes only
    /// when the answer is `Go` or `Wait`.
    fn take(&self, now: u64, max_wait: Option<Duration>) -> Decision {
        let max_wait = max_wait.map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let (interval, tolerance) = (self.interval.load(Relaxed), self.tolerance.load(Relaxed));
        let mut current = self.tat.load(Relaxed);
        loop {
            let next = current.max(now).saturating_add(interval);
            let late = (next - now).saturating_sub(tolerance);
            if late > max_wait {
                return Decision::Reject(Duration::from_nanos(late));
            }
            match self
                .tat
                .compare_exchange_weak(current, next, Relaxed, Relaxed)
            {
                Ok(_) if late == 0 => return Decision::Go,
                Ok(_) => return Decision::Wait(Duration::from_nanos(late)),
                Err(actual) => current = actual,
            }
        }
    }

    /// The decision for a request arriving now, as the policy's
    /// `on_excess` says, counted. In shadow mode the answer is always
    /// `Go`, and what the limit would have done is counted.
    pub fn admit(&self) -> Decision {
        let max_wait = match self.spec.on_excess {
            OnExcess::Reject => None,
            OnExcess::Queue { max_wait } => Some(max_wait),
        };
        self.arrive();
        let decision = self.take(nanos(Instant::now()), max_wait);
        match decision {
            Decision::Go => {
                self.counters.admitted.increment(1);
                self.tally.admitted.fetch_add(1, Relaxed);
            }
            Decision::Wait(_) if self.spec.shadow => {
                // It would have waited; it goes now.
                self.counters.admitted.increment(1);
                self.tally.admitted.fetch_add(1, Relaxed);
                return Decision::Go;
            }
            Decision::Wait(_) => {
                self.counters.queued.increment(1);
                self.tally.queued.fetch_add(1, Relaxed);
            }
            Decision::Reject(_) if self.spec.shadow => {
                self.counters.shadow_rejected.increment(1);
                self.tally.shadow_rejected.fetch_add(1, Relaxed);
                return Decision::Go;
            }
            Decision::Reject(_) => {
                self.counters.rejected.increment(1);
                self.tally.rejected.fetch_add(1, Relaxed);
            }
        }
        decision
    }

    /// For the outbox scheduler: waits until a token can be taken, and
    /// takes it. Topic deliveries are paced, never refused. They take
    /// tokens as they come and reserve none ahead, so a backlog in the
    /// outbox competes with addressed traffic for the rate rather than
    /// booking all of it in advance. In shadow mode nothing waits.
    pub async fn paced(&self) {
        self.arrive();
        loop {
            match self.take(nanos(Instant::now()), None) {
                Decision::Go => break,
                Decision::Reject(_) if self.spec.shadow => {
                    self.counters.shadow_rejected.increment(1);
                    self.tally.shadow_rejected.fetch_add(1, Relaxed);
                    return;
                }
                Decision::Reject(after) | Decision::Wait(after) => {
                    tokio::time::sleep(after).await;
                }
            }
        }
        self.counters.admitted.increment(1);
        self.tally.admitted.fetch_add(1, Relaxed);
    }

    /// The answer to a request this bucket refused, `after` being when a
    /// token comes.
    pub fn rejection(&self, after: Duration) -> Rejection {
        let mut r = Rejection::new(
            Reason::RateLimited,
            format!(
                "rate limit {} ({} per second, burst {}) reached; the next token comes in {} ms",
                self.name,
                self.spec.requests_per_second,
                self.spec.burst,
                after.as_millis().max(1)
            ),
        );
        r.retry_after = Some(after);
        r.limit = Some(self.name.clone());
        r
    }

    /// The bucket as the admin API shows it.
    pub fn state(&self) -> LimitState {
        let share = *self.share.lock().unwrap_or_else(|p| p.into_inner());
        LimitState {
            rule: self.rule.to_string(),
            requests_per_second: self.spec.requests_per_second,
            burst: self.spec.burst,
            scope: match self.spec.scope {
                Scope::PerAgent => "per_agent",
                Scope::Global => "global",
            },
            on_excess: match self.spec.on_excess {
                OnExcess::Reject => "reject",
                OnExcess::Queue { .. } => "queue",
            },
            max_queue_wait_ms: match self.spec.on_excess {
                OnExcess::Reject => 0,
                OnExcess::Queue { max_wait } => max_wait.as_millis() as u64,
            },
            shadow: self.spec.shadow,
            share,
            tokens: self.tokens(),
            admitted: self.tally.admitted.load(Relaxed),
            queued: self.tally.queued.load(Relaxed),
            rejected: self.tally.rejected.load(Relaxed),
            shadow_rejected: self.tally.shadow_rejected.load(Relaxed),
        }
    }
}

/// `1 / rate` in nanoseconds, at least 1.
fn interval_of(rate: f64) -> u64 {
    if rate.is_finite() && rate > 0.0 {
        ((1e9 / rate) as u64).max(1)
    } else {
        u64::MAX
    }
}

/// A bucket as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct LimitState {
    /// `default` for the service's own limit, else the rule's name.
    pub rule: String,
    pub requests_per_second: f64,
    pub burst: u32,
    pub scope: &'static str,
    pub on_excess: &'static str,
    pub max_queue_wait_ms: u64,
    pub shadow: bool,
    /// A `GLOBAL` limit: this agent's part of it now (absent: the whole
    /// limit, before the first allocation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<Share>,
    /// Tokens in the bucket now.
    pub tokens: f64,
    /// Decisions since the bucket was first made (kept across policy
    /// changes).
    pub admitted: u64,
    pub queued: u64,
    pub rejected: u64,
    pub shadow_rejected: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn spec(rate: f64, burst: u32, on_excess: OnExcess) -> RateLimit {
        RateLimit {
            requests_per_second: rate,
            burst,
            scope: Scope::PerAgent,
            on_excess,
            shadow: false,
        }
    }

    fn limiter(rate: f64, burst: u32) -> Limiter {
        Limiter::new(
            "default",
            "orders",
            SERVICE_RULE,
            &spec(rate, burst, OnExcess::Reject),
        )
    }

    /// Requests admitted in a row now.
    fn drain(l: &Limiter) -> usize {
        std::iter::from_fn(|| (l.admit() == Decision::Go).then_some(()))
            .take(10_000)
            .count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_lets_the_burst_through_to_the_token_then_the_rate() {
        let l = limiter(100.0, 10);
        assert_eq!(drain(&l), 10, "the burst, to the token");
        // The 11th is refused, and told when the next token comes.
        match l.admit() {
            Decision::Reject(after) => assert_eq!(after, 10 * MS),
            other => panic!("expected a rejection, got {other:?}"),
        }
        tokio::time::advance(9 * MS).await;
        assert!(matches!(l.admit(), Decision::Reject(_)), "not yet");
        tokio::time::advance(MS).await;
        assert_eq!(l.admit(), Decision::Go, "one token every 10 ms");
        assert!(matches!(l.admit(), Decision::Reject(_)));
        // 55 ms later: 5 tokens more, no more.
        tokio::time::advance(55 * MS).await;
        assert_eq!(drain(&l), 5);
        // Refilled to the burst and no further, however long it waits.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(drain(&l), 10);
        let s = l.state();
        assert_eq!((s.admitted, s.rejected), (26, 6));
    }

    #[tokio::test(start_paused = true)]
    async fn over_a_span_no_more_than_the_rate_and_the_burst_pass() {
        // 500/s offered to 100/s with burst 10 for 10 s, one every 2 ms.
        let l = limiter(100.0, 10);
        let mut admitted = 0u64;
        for _ in 0..5_000 {
            if l.admit() == Decision::Go {
                admitted += 1;
            }
            tokio::time::advance(2 * MS).await;
        }
        // 10 at once, then 100/s over 9.998 s.
        assert_eq!(admitted, 10 + 999);
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rates_and_a_burst_of_one() {
        let l = limiter(0.5, 1);
        assert_eq!(drain(&l), 1);
        tokio::time::advance(Duration::from_millis(1_999)).await;
        assert!(matches!(l.admit(), Decision::Reject(_)));
        tokio::time::advance(MS).await;
        assert_eq!(drain(&l), 1, "one every 2 s");
    }

    #[tokio::test(start_paused = true)]
    async fn queue_reserves_slots_in_arrival_order_up_to_the_wait() {
        let l = Limiter::new(
            "default",
            "orders",
            SERVICE_RULE,
            &spec(100.0, 2, OnExcess::Queue { max_wait: 35 * MS }),
        );
        let decisions: Vec<Decision> = (0..7).map(|_| l.admit()).collect();
        assert_eq!(
            decisions,
            [
                Decision::Go,
                Decision::Go,
                Decision::Wait(10 * MS),
                Decision::Wait(20 * MS),
                Decision::Wait(30 * MS),
                // 40 ms is past the 35 ms it may wait: refused, and the
                // refusal reserves nothing.
                Decision::Reject(40 * MS),
                Decision::Reject(40 * MS),
            ]
        );
        tokio::time::advance(10 * MS).await;
        assert_eq!(l.admit(), Decision::Wait(30 * MS), "after those queued");
        let s = l.state();
        assert_eq!((s.admitted, s.queued, s.rejected), (2, 4, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_change_keeps_the_bucket_full_in_proportion() {
        let l = limiter(100.0, 10);
        for _ in 0..5 {
            assert_eq!(l.admit(), Decision::Go);
        }
        // Half full: half of the new burst of 40.
        let next = l.successor("default", "orders", &spec(200.0, 40, OnExcess::Reject));
        assert!((next.tokens() - 20.0).abs() < 1e-6, "{}", next.tokens());
        assert_eq!(drain(&next), 20);
        // The new rate: one every 5 ms.
        tokio::time::advance(5 * MS).await;
        assert_eq!(drain(&next), 1);
        // An empty bucket stays empty at a smaller burst, and the counts
        // carry over.
        let small = next.successor("default", "orders", &spec(10.0, 2, OnExcess::Reject));
        assert!(small.tokens() < 1e-6);
        assert!(matches!(small.admit(), Decision::Reject(_)));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(drain(&small), 1);
        let s = small.state();
        assert_eq!((s.admitted, s.rejected, s.burst), (27, 4, 2));
        assert!(small.runs(&spec(10.0, 2, OnExcess::Reject)));
        assert!(!small.runs(&spec(10.0, 3, OnExcess::Reject)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_global_share_retunes_the_bucket_in_proportion_and_demand_is_counted() {
        let mut global = spec(100.0, 10, OnExcess::Reject);
        global.scope = Scope::Global;
        let l = Limiter::new("default", "orders", SERVICE_RULE, &global);
        assert!(l.is_global());
        assert_eq!(drain(&l), 10);
        assert_eq!(l.take_arrivals(), 11, "admitted or not");
        assert_eq!(l.take_arrivals(), 0);
        // A share of 20/s, burst 2: empty, so it stays empty; one token
        // every 50 ms.
        let share = Share {
            requests_per_second: 20.0,
            burst: 2,
            source: "allocated",
        };
        l.retune(Some(share));
        assert!(l.tokens() < 1e-6);
        tokio::time::advance(49 * MS).await;
        assert!(matches!(l.admit(), Decision::Reject(_)));
        tokio::time::advance(MS).await;
        assert_eq!(drain(&l), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(drain(&l), 2, "the share's burst");
        assert_eq!(l.state().share, Some(share));
        // Back to the whole limit, full in proportion.
        l.retune(None);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(drain(&l), 10);
        assert_eq!(l.state().share, None);
    }

    #[tokio::test(start_paused = true)]
    async fn shadow_mode_counts_what_it_would_refuse_and_lets_everything_go() {
        let mut s = spec(100.0, 2, OnExcess::Reject);
        s.shadow = true;
        let l = Limiter::new("default", "orders", SERVICE_RULE, &s);
        let decisions: Vec<Decision> = (0..5).map(|_| l.admit()).collect();
        assert_eq!(decisions, [Decision::Go; 5]);
        let state = l.state();
        assert_eq!(
            (state.admitted, state.shadow_rejected, state.rejected),
            (2, 3, 0)
        );
        let start = Instant::now();
        l.paced().await;
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "deliveries are not held back"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn paced_deliveries_take_tokens_as_they_come() {
        let l = Arc::new(limiter(50.0, 1));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    l.paced().await;
                    start.elapsed()
                })
            })
            .collect();
        let mut ended = Vec::new();
        for t in tasks {
            ended.push(t.await.expect("a task"));
        }
        ended.sort();
        assert_eq!(ended, [Duration::ZERO, 20 * MS, 40 * MS, 60 * MS]);
        // They reserved nothing ahead: the next token comes 20 ms after
        // the last.
        assert_eq!(l.admit(), Decision::Reject(20 * MS));
        let r = l.rejection(20 * MS);
        assert_eq!(r.reason, Reason::RateLimited);
        assert_eq!(r.limit.as_deref(), Some("default/orders/default"));
        assert_eq!(r.retry_after, Some(20 * MS));
    }
}
