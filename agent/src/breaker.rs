//! Circuit breakers, one per endpoint of a service whose policy has a
//! `circuit_breaker` section.
//!
//! [`Breaker`] is the pure state machine (closed, open, half open), fed
//! each call's outcome and latency and the time, and tested on tokio's
//! paused clock. [`Gate`] is what the data path reads on every pick: a
//! few atomics on the [`Endpoint`](crate::balance::Endpoint) saying
//! whether the endpoint is out of rotation and how many half-open probes
//! may go, so a pick never takes a lock. [`Cell`] holds both and applies
//! the policy's `max_ejection_percent` and shadow mode as a breaker
//! opens.
//!
//! **Triggers** (closed state): `consecutive_failures` in a row; a
//! `failure_ratio` of failures over the last `window_ms`; a
//! `slow_call_ratio` of calls slower than `slow_call_ms` over the same
//! window; the two ratios only once `minimum_requests` calls were seen in
//! the window. A failure is a call that got no answer (connect failure,
//! reset, timeout) or a 5xx (gRPC UNAVAILABLE); a 429 is the instance
//! pacing its callers, not failing, and counts as a success.
//!
//! **Open** for `open_ms`, then **half open**: `half_open_probes` calls go
//! through as probes; when all succeed the breaker closes, and the next
//! opening starts from `open_ms` again; a failed (or slow) probe opens it
//! again for twice as long, up to `max_open_ms`.
//!
//! The window is ten buckets of a tenth of `window_ms` each, so it slides
//! by tenths: a call leaves the window between 0.9 and 1 `window_ms`
//! after it was made.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed},
        Mutex, OnceLock,
    },
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use weir_core::policy::resolve::CircuitBreaker as Spec;

/// Buckets of the sliding window.
const BUCKETS: usize = 10;

/// Where a breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// A change of state, for the log and the metrics.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// Opened from closed (or again after a failed probe) for `period`,
    /// because of `why`.
    Opened {
        why: String,
        period: Duration,
    },
    HalfOpened,
    Closed,
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    /// Which tenth of the window this bucket counts (`now / width`).
    slot: u64,
    calls: u32,
    failures: u32,
    slow: u32,
}

/// Calls, failures and slow calls over the last `window`.
#[derive(Clone, Debug)]
struct Window {
    width_ms: u64,
    buckets: [Bucket; BUCKETS],
}

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            width_ms: (window.as_millis() as u64 / BUCKETS as u64).max(1),
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn add(&mut self, now_ms: u64, failed: bool, slow: bool) {
        let slot = now_ms / self.width_ms;
        let b = &mut self.buckets[(slot % BUCKETS as u64) as usize];
        if b.slot != slot {
            *b = Bucket {
                slot,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failures += u32::from(failed);
        b.slow += u32::from(slow);
    }

    /// (calls, failures, slow) in the window ending at `now_ms`.
    fn sums(&self, now_ms: u64) -> (u32, u32, u32) {
        let slot = now_ms / self.width_ms;
        self.buckets
            .iter()
            .filter(|b| b.calls > 0 && b.slot + (BUCKETS as u64) > slot && b.slot <= slot)
            .fold((0, 0, 0), |(c, f, s), b| {
                (c + b.calls, f + b.failures, s + b.slow)
            })
    }

    fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

/// The clock breakers count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`], plus one (so 0 can mean "none").
fn ms(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64 + 1
}

/// Nanoseconds since [`epoch`], plus one (so 0 can mean "none"): what a
/// gate stores, exact to the machine's own clock, so a gate never lets a
/// probe go before the machine's open period ended (the probe's outcome
/// would land on an open breaker).
fn stamp(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// One endpoint's breaker: the pure state machine.
#[derive(Clone, Debug)]
pub struct Breaker {
    state: State,
    /// When it entered `state`.
    since: Instant,
    /// Why it last opened.
    why: String,
    consecutive: u32,
    window: Window,
    /// The open period now: `open_ms`, doubled on each re-open.
    period: Duration,
    /// When the open period ends.
    until: Instant,
    /// Half open: probes that succeeded.
    probes_ok: u32,
    /// Openings so far.
    opens: u64,
}

impl Breaker {
    pub fn new(spec: &Spec, now: Instant) -> Self {
        Self {
            state: State::Closed,
            since: now,
            why: String::new(),
            consecutive: 0,
            window: Window::new(spec.window),
            period: spec.open,
            until: now,
            probes_ok: 0,
            opens: 0,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the open period ends (meaningful while open).
    pub fn until(&self) -> Instant {
        self.until
    }

    /// Moves from open to half open once the open period passed.
    pub fn tick(&mut self, now: Instant) -> Option<Transition> {
        if self.state == State::Open && now >= self.until {
            self.state = State::HalfOpen;
            self.since = now;
            self.probes_ok = 0;
            return Some(Transition::HalfOpened);
        }
        None
    }

    fn open(&mut self, spec: &Spec, now: Instant, why: String) -> Transition {
        self.state = State::Open;
        self.since = now;
        self.until = now + self.period;
        self.why.clone_from(&why);
        self.opens += 1;
        self.consecutive = 0;
        self.window.clear();
        let period = self.period;
        // The next opening, if it comes from half open, lasts twice as
        // long.
        self.period = (self.period * 2).min(spec.max_open);
        Transition::Opened { why, period }
    }

    /// One call's outcome at `now`: whether it failed, and how long it
    /// took. Calls that end while the breaker is open (sent before it
    /// opened) are not counted.
    pub fn record(
        &mut self,
        spec: &Spec,
        now: Instant,
        failed: bool,
        latency: Duration,
    ) -> Option<Transition> {
        let ticked = self.tick(now);
        let slow = spec.slow_call.is_some_and(|s| latency > s.threshold);
        match self.state {
            State::Open => ticked,
            State::HalfOpen => {
                if failed || slow {
                    let why = if failed {
                        "a half-open probe failed".to_owned()
                    } else {
                        format!("a half-open probe took {} ms", latency.as_millis())
                    };
                    return Some(self.open(spec, now, why));
                }
                self.probes_ok += 1;
                if self.probes_ok >= spec.half_open_probes.max(1) {
                    self.state = State::Closed;
                    self.since = now;
                    self.period = spec.open;
                    self.consecutive = 0;
                    self.window.clear();
                    return Some(Transition::Closed);
                }
                ticked
            }
            State::Closed => {
                self.consecutive = if failed { self.consecutive + 1 } else { 0 };
                let now_ms = ms(now);
                self.window.add(now_ms, failed, slow);
                if let Some(n) = spec.consecutive_failures {
                    if self.consecutive >= n {
                        return Some(self.open(spec, now, format!("{n} failures in a row")));
                    }
                }
                let (calls, failures, slows) = self.window.sums(now_ms);
                if calls < spec.minimum_requests.max(1) {
                    return None;
                }
                let window_ms = spec.window.as_millis();
                if let Some(ratio) = spec.failure_ratio {
                    if f64::from(failures) >= ratio * f64::from(calls) {
                        return Some(self.open(
                            spec,
                            now,
                            format!("{failures} of {calls} calls failed in {window_ms} ms"),
                        ));
                    }
                }
                if let Some(s) = spec.slow_call {
                    if f64::from(slows) >= s.ratio * f64::from(calls) {
                        return Some(self.open(
                            spec,
                            now,
                            format!(
                                "{slows} of {calls} calls took over {} ms in {window_ms} ms",
                                s.threshold.as_millis()
                            ),
                        ));
                    }
                }
                None
            }
        }
    }
}

/// What a pick reads of an endpoint's breaker: lock-free.
#[derive(Debug, Default)]
pub struct Gate {
    /// 0: closed. Otherwise the breaker is open or half open ("tripped")
    /// and this is when its open period ends ([`stamp`]).
    until: AtomicU64,
    /// Tripped but left in rotation: the service's ejection cap was
    /// reached (or the breaker is in shadow mode).
    capped: AtomicBool,
    /// Half-open probes that may still start.
    probes: AtomicU32,
}

impl Gate {
    /// Whether the breaker is open or half open, capped or not.
    #[inline]
    pub fn tripped(&self) -> bool {
        self.until.load(Relaxed) != 0
    }

    /// Whether picks skip the endpoint now: its breaker is open and not
    /// capped, or half open with no probe left to start.
    #[inline]
    pub fn blocks(&self) -> bool {
        let until = self.until.load(Relaxed);
        until != 0 && !self.capped.load(Relaxed) && !self.probing(until)
    }

    /// Whether the endpoint is out of rotation by its breaker (for the
    /// ejection cap): tripped and not capped.
    pub fn excludes(&self) -> bool {
        self.tripped() && !self.capped.load(Relaxed)
    }

    /// Half open with a probe left.
    fn probing(&self, until: u64) -> bool {
        stamp(Instant::now()) >= until && self.probes.load(Relaxed) > 0
    }

    /// Whether a probe may go now (the open period passed and a probe is
    /// left).
    pub fn may_probe(&self) -> bool {
        let until = self.until.load(Relaxed);
        until != 0 && self.probing(until)
    }

    /// When the open period ends, if tripped.
    pub fn reopens_in(&self) -> Option<Duration> {
        match self.until.load(Relaxed) {
            0 => None,
            until => Some(Duration::from_nanos(
                until.saturating_sub(stamp(Instant::now())),
            )),
        }
    }

    /// A pick chose the endpoint: when it is half open, this call is a
    /// probe and takes a probe's place (given back if it ends without an
    /// outcome, see [`Probe`]).
    pub fn picked(&self) -> Option<Probe<'_>> {
        let until = self.until.load(Relaxed);
        if until == 0 || stamp(Instant::now()) < until {
            return None;
        }
        self.probes
            .fetch_update(Relaxed, Relaxed, |p| p.checked_sub(1))
            .ok()
            .map(|_| Probe(self))
    }

    fn trip(&self, until: Instant, probes: u32, capped: bool) {
        self.capped.store(capped, Relaxed);
        self.probes.store(probes, Relaxed);
        self.until.store(stamp(until), Relaxed);
    }

    fn close(&self) {
        self.until.store(0, Relaxed);
        self.capped.store(false, Relaxed);
    }
}

/// A half-open probe under way: its place goes back when it ends without
/// an outcome (the caller went away), so the breaker is not left waiting
/// for a probe that never reports.
#[derive(Debug)]
pub struct Probe<'a>(&'a Gate);

impl Probe<'_> {
    /// The probe reported its outcome.
    pub fn done(self) {
        std::mem::forget(self);
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.probes.fetch_add(1, Relaxed);
    }
}

/// An endpoint's breaker: the state machine behind a lock (taken once per
/// call's outcome on routes with a breaker) and the gate picks read.
#[derive(Debug, Default)]
pub struct Cell {
    pub gate: Gate,
    machine: Mutex<Option<Breaker>>,
}

/// An endpoint's breaker as the admin API shows it.
#[derive(Debug, Serialize)]
pub struct BreakerState {
    pub state: State,
    /// For how long it has been in this state.
    pub since_ms: u64,
    /// Why it last opened.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub why: String,
    /// Open but left in rotation: the ejection cap was reached, or the
    /// breaker is in shadow mode.
    pub capped: bool,
    pub opens: u64,
}

impl Cell {
    fn machine(&self) -> std::sync::MutexGuard<'_, Option<Breaker>> {
        self.machine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records one call's outcome under `spec`. When the breaker opens,
    /// `may_exclude` says whether the service's ejection cap lets it
    /// leave the rotation; in shadow mode it never does.
    /// `probe` is the half-open place the call took, if any: it is used
    /// up when the outcome counted, and given back when the breaker
    /// ignored it (it ended on an open breaker).
    pub fn record(
        &self,
        spec: &Spec,
        failed: bool,
        latency: Duration,
        probe: Option<Probe<'_>>,
        may_exclude: impl FnOnce() -> bool,
    ) -> Option<Transition> {
        let now = Instant::now();
        let mut machine = self.machine();
        let breaker = machine.get_or_insert_with(|| Breaker::new(spec, now));
        let transition = breaker.record(spec, now, failed, latency);
        if let Some(p) = probe {
            if breaker.state() != State::Open || transition.is_some() {
                p.done();
            }
        }
        let transition = transition?;
        match &transition {
            Transition::Opened { .. } => {
                let capped = spec.shadow || !may_exclude();
                self.gate
                    .trip(breaker.until(), spec.half_open_probes.max(1), capped);
            }
            Transition::Closed => self.gate.close(),
            Transition::HalfOpened => {}
        }
        Some(transition)
    }

    /// Forgets the breaker (the policy no longer has one).
    pub fn reset(&self) {
        *self.machine() = None;
        self.gate.close();
    }

    /// The breaker now, if it ever saw a call.
    pub fn state(&self) -> Option<BreakerState> {
        let now = Instant::now();
        let mut machine = self.machine();
        let b = machine.as_mut()?;
        b.tick(now);
        Some(BreakerState {
            state: b.state,
            since_ms: now.saturating_duration_since(b.since).as_millis() as u64,
            why: b.why.clone(),
            capped: self.gate.tripped() && self.gate.capped.load(Relaxed),
            opens: b.opens,
        })
    }
}

/// The breakers of a rule that sets its own `circuit_breaker`: one per
/// endpoint, by instance id, apart from the service's (an endpoint's
/// [`Endpoint::breaker`](crate::balance::Endpoint)), for the events the
/// rule matches only.
#[derive(Debug)]
pub struct RuleBreakers {
    pub rule: Box<str>,
    pub spec: Spec,
    cells: std::collections::HashMap<Box<str>, std::sync::Arc<Cell>>,
}

impl RuleBreakers {
    /// Breakers for `endpoints` under `spec`, keeping those of `previous`
    /// (the same rule's in the route before) when its spec is the same.
    pub fn new<'a>(
        rule: &str,
        spec: &Spec,
        endpoints: impl IntoIterator<Item = &'a str>,
        previous: Option<&RuleBreakers>,
    ) -> Self {
        let previous = previous.filter(|p| p.spec == *spec);
        let cells = endpoints
            .into_iter()
            .map(|id| {
                let cell = previous
                    .and_then(|p| p.cells.get(id).cloned())
                    .unwrap_or_default();
                (Box::from(id), cell)
            })
            .collect();
        Self {
            rule: rule.into(),
            spec: spec.clone(),
            cells,
        }
    }

    /// Each endpoint's breaker, by instance id.
    pub fn cells(&self) -> impl Iterator<Item = (&str, &Cell)> {
        self.cells.iter().map(|(id, c)| (&**id, &**c))
    }
}

/// Which breakers a request runs under: the service's (each endpoint's
/// own), or a rule's.
#[derive(Clone, Copy, Debug)]
pub enum Breakers<'r> {
    Service(&'r Spec),
    Rule(&'r RuleBreakers),
}

/// A breaker no endpoint uses: what an endpoint unknown to a rule's set
/// reads (closed, never recording).
fn closed() -> &'static Cell {
    static CLOSED: OnceLock<Cell> = OnceLock::new();
    CLOSED.get_or_init(Cell::default)
}

impl<'r> Breakers<'r> {
    pub fn spec(self) -> &'r Spec {
        match self {
            Breakers::Service(spec) => spec,
            Breakers::Rule(r) => &r.spec,
        }
    }

    /// `endpoint`'s breaker in this set.
    pub fn cell<'e>(self, endpoint: &'e crate::balance::Endpoint) -> &'e Cell
    where
        'r: 'e,
    {
        match self {
            Breakers::Service(_) => &endpoint.breaker,
            Breakers::Rule(r) => r.cells.get(&*endpoint.id).map_or(closed(), |c| &**c),
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_core::policy::resolve::SlowCall;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn spec() -> Spec {
        Spec {
            consecutive_failures: None,
            failure_ratio: None,
            window: Duration::from_secs(1),
            minimum_requests: 5,
            slow_call: None,
            open: Duration::from_secs(1),
            max_open: Duration::from_secs(4),
            half_open_probes: 2,
            max_ejection_percent: 50,
            shadow: false,
        }
    }

    fn opened(t: Option<Transition>) -> Duration {
        match t {
            Some(Transition::Opened { period, .. }) => period,
            other => panic!("expected it to open, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let s = Spec {
            consecutive_failures: Some(3),
            ..spec()
        };
        let mut b = Breaker::new(&s, Instant::now());
        let now = Instant::now();
        assert_eq!(b.record(&s, now, true, MS), None);
        assert_eq!(b.record(&s, now, true, MS), None);
        assert_eq!(b.record(&s, now, false, MS), None, "a success in between");
        assert_eq!(b.record(&s, now, true, MS), None);
        assert_eq!(b.record(&s, now, true, MS), None);
        assert_eq!(opened(b.record(&s, now, true, MS)), Duration::from_secs(1));
        assert_eq!(b.state(), State::Open);
        // Calls that were under way when it opened do not count.
        assert_eq!(b.record(&s, now, true, MS), None);
        assert_eq!(b.record(&s, now, false, MS), None);
        assert_eq!(b.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn the_failure_ratio_opens_it_once_enough_calls_were_seen() {
        let s = Spec {
            failure_ratio: Some(0.5),
            ..spec()
        };
        let mut b = Breaker::new(&s, Instant::now());
        // 4 failures of 4 calls: below the 5 calls it needs.
        for _ in 0..4 {
            assert_eq!(b.record(&s, Instant::now(), true, MS), None);
        }
        // The window slides: after a second, those 4 are gone.
        tokio::time::advance(Duration::from_millis(1_100)).await;
        for _ in 0..3 {
            assert_eq!(b.record(&s, Instant::now(), false, MS), None);
        }
        assert_eq!(b.record(&s, Instant::now(), true, MS), None);
        // 2 of 5 failed: under half.
        assert_eq!(b.record(&s, Instant::now(), true, MS), None);
        // 3 of 6.
        let t = b.record(&s, Instant::now(), true, MS);
        match &t {
            Some(Transition::Opened { why, .. }) => {
                assert_eq!(why, "3 of 6 calls failed in 1000 ms")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn slow_calls_open_it_and_a_slow_probe_counts_as_failed() {
        let s = Spec {
            slow_call: Some(SlowCall {
                threshold: Duration::from_millis(100),
                ratio: 0.6,
            }),
            ..spec()
        };
        let mut b = Breaker::new(&s, Instant::now());
        let fast = 10 * MS;
        let slow = 150 * MS;
        for latency in [fast, slow, slow, fast] {
            assert_eq!(b.record(&s, Instant::now(), false, latency), None);
        }
        // 3 slow of 5.
        opened(b.record(&s, Instant::now(), false, slow));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.tick(Instant::now()), Some(Transition::HalfOpened));
        // A probe that answers, but slowly: open again, for twice as long.
        assert_eq!(
            opened(b.record(&s, Instant::now(), false, slow)),
            2 * Duration::from_secs(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_open_period_doubles_up_to_the_cap_and_resets_once_closed() {
        let s = Spec {
            consecutive_failures: Some(1),
            ..spec()
        };
        let mut b = Breaker::new(&s, Instant::now());
        assert_eq!(
            opened(b.record(&s, Instant::now(), true, MS)),
            Duration::from_secs(1)
        );
        let mut periods = Vec::new();
        for _ in 0..4 {
            // Not half open a millisecond early.
            tokio::time::advance(b.until() - Instant::now() - MS).await;
            assert_eq!(b.tick(Instant::now()), None);
            tokio::time::advance(MS).await;
            assert_eq!(b.tick(Instant::now()), Some(Transition::HalfOpened));
            periods.push(opened(b.record(&s, Instant::now(), true, MS)));
        }
        let secs: Vec<u64> = periods.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [2, 4, 4, 4], "doubling to max_open_ms");
        // Recovery: both probes succeed, and it closes.
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(
            b.record(&s, Instant::now(), false, MS),
            Some(Transition::HalfOpened)
        );
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(
            b.record(&s, Instant::now(), false, MS),
            Some(Transition::Closed)
        );
        // The next opening starts from open_ms again.
        assert_eq!(
            opened(b.record(&s, Instant::now(), true, MS)),
            Duration::from_secs(1)
        );
        assert_eq!(b.opens, 6);
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_blocks_while_open_lets_the_probes_through_then_blocks_again() {
        let s = Spec {
            consecutive_failures: Some(1),
            ..spec()
        };
        let cell = Cell::default();
        assert!(!cell.gate.blocks() && !cell.gate.tripped());
        opened(cell.record(&s, true, MS, None, || true));
        assert!(cell.gate.blocks() && cell.gate.tripped());
        assert!(cell.gate.picked().is_none(), "no probe while open");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!cell.gate.blocks() && cell.gate.may_probe());
        let first = cell.gate.picked().expect("a probe");
        // A probe whose caller went away gives its place back.
        drop(cell.gate.picked().expect("the second probe"));
        let second = cell.gate.picked().expect("the second probe, again");
        assert!(cell.gate.blocks(), "both probes under way");
        assert!(cell.gate.picked().is_none());
        assert_eq!(
            cell.record(&s, false, MS, Some(first), || true),
            Some(Transition::HalfOpened)
        );
        assert_eq!(
            cell.record(&s, false, MS, Some(second), || true),
            Some(Transition::Closed)
        );
        assert!(!cell.gate.blocks() && !cell.gate.tripped());
        let state = cell.state().expect("a breaker");
        assert_eq!((state.state, state.opens), (State::Closed, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn no_probe_goes_before_the_open_period_ends_to_the_microsecond() {
        let s = Spec {
            consecutive_failures: Some(1),
            open: Duration::from_micros(1_000_400),
            ..spec()
        };
        let cell = Cell::default();
        opened(cell.record(&s, true, MS, None, || true));
        // Within the last millisecond of the period: the machine is still
        // open, so the gate lets no probe go (its outcome would be
        // ignored and its place lost).
        tokio::time::advance(Duration::from_micros(1_000_100)).await;
        assert!(!cell.gate.may_probe() && cell.gate.picked().is_none());
        tokio::time::advance(Duration::from_micros(300)).await;
        let probe = cell.gate.picked().expect("the period ended");
        assert_eq!(
            cell.record(&s, false, MS, Some(probe), || true),
            Some(Transition::HalfOpened),
            "counted: half open, one probe of two done"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_capped_or_shadow_breaker_trips_without_leaving_the_rotation() {
        let s = Spec {
            consecutive_failures: Some(1),
            ..spec()
        };
        let capped = Cell::default();
        opened(capped.record(&s, true, MS, None, || false));
        assert!(capped.gate.tripped() && !capped.gate.blocks() && !capped.gate.excludes());
        assert!(capped.state().expect("state").capped);
        let shadow = Spec { shadow: true, ..s };
        let cell = Cell::default();
        opened(cell.record(&shadow, true, MS, None, || {
            panic!("shadow mode never asks the cap")
        }));
        assert!(cell.gate.tripped() && !cell.gate.blocks());
        cell.reset();
        assert!(!cell.gate.tripped() && cell.state().is_none());
    }
}
