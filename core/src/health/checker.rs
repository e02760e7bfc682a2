//! The checker: runs each assigned instance's check on its interval through
//! a [`Prober`], feeds the results through the hysteresis [`Tracker`], and
//! reports transitions to a [`StatusSink`] (the store, in the control
//! plane). A transition that could not be written is written again after
//! the next check; nothing is written while the status holds.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::{task::JoinHandle, time::Instant};
use weir_proto::registry::v1::{HealthDetail, HealthStatus, Instance};

use super::{
    hysteresis::Tracker,
    probe::{NetProber, ProbeResult, Prober},
    spec::{self, CheckSpec},
};
use crate::{keys::InstanceKey, time::now_unix_ms};

/// A status change to record.
#[derive(Clone, Debug, PartialEq)]
pub struct Transition {
    pub from: HealthStatus,
    pub to: HealthStatus,
    pub detail: HealthDetail,
}

/// Why a sink could not record something.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SinkError(pub String);

/// Where the checker's verdicts go.
#[async_trait]
pub trait StatusSink: Send + Sync + std::fmt::Debug + 'static {
    /// Records that `key` (the registration made at `registered_at_unix_ms`)
    /// is now `t.to`. Returns Ok(false) if the instance is gone or was
    /// registered anew meanwhile (the checker then stops writing for it).
    async fn transition(
        &self,
        key: &InstanceKey,
        registered_at_unix_ms: i64,
        t: &Transition,
    ) -> Result<bool, SinkError>;

    /// Removes a persistent instance that stayed CRITICAL past its bound.
    async fn deregister(&self, key: &InstanceKey) -> Result<(), SinkError>;
}

#[derive(Debug)]
struct Running {
    spec: CheckSpec,
    registered_at: i64,
    task: JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs checks; see the module docs.
#[derive(Debug)]
pub struct Checker {
    sink: Arc<dyn StatusSink>,
    prober: Arc<dyn Prober>,
    checked_by: String,
    running: Mutex<HashMap<InstanceKey, Running>>,
    probes: Arc<AtomicU64>,
}

impl Checker {
    /// `checked_by` names this checker in every [`HealthDetail`]. Checks
    /// go over the network ([`NetProber`]).
    pub fn new(sink: Arc<dyn StatusSink>, checked_by: impl Into<String>) -> Self {
        Self::with_prober(sink, checked_by, Arc::new(NetProber))
    }

    /// Like [`Checker::new`], with checks run by `prober`.
    pub fn with_prober(
        sink: Arc<dyn StatusSink>,
        checked_by: impl Into<String>,
        prober: Arc<dyn Prober>,
    ) -> Self {
        Self {
            sink,
            prober,
            checked_by: checked_by.into(),
            running: Mutex::default(),
            probes: Arc::default(),
        }
    }

    /// Checks run so far.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Instances being checked now.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes the running set exactly `assigned`: starts checks for new
    /// instances (first check at once), restarts those whose check or
    /// registration changed, stops the rest. Instances without an active
    /// check are skipped.
    pub fn sync<'a>(&self, assigned: impl IntoIterator<Item = &'a Arc<Instance>>) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = HashMap::with_capacity(running.len());
        for instance in assigned {
            let Some(spec) = spec::resolve(instance) else {
                continue;
            };
            let key = InstanceKey::of(instance);
            match running.remove(&key) {
                Some(r) if r.spec == spec && r.registered_at == instance.registered_at_unix_ms => {
                    next.insert(key, r);
                }
                _ => {
                    let task = tokio::spawn(check_loop(
                        self.sink.clone(),
                        self.prober.clone(),
                        self.checked_by.clone(),
                        key.clone(),
                        instance.clone(),
                        spec.clone(),
                        self.probes.clone(),
                    ));
                    next.insert(
                        key,
                        Running {
                            spec,
                            registered_at: instance.registered_at_unix_ms,
                            task,
                        },
                    );
                }
            }
        }
        // Whatever is left in `running` is no longer ours: dropped = aborted.
        *running = next;
    }

    /// Stops every check.
    pub fn clear(&self) {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.clear();
    }
}

async fn check_loop(
    sink: Arc<dyn StatusSink>,
    prober: Arc<dyn Prober>,
    checked_by: String,
    key: InstanceKey,
    instance: Arc<Instance>,
    spec: CheckSpec,
    probes: Arc<AtomicU64>,
) {
    let stored = HealthStatus::try_from(instance.status).unwrap_or(HealthStatus::Unknown);
    let mut tracker = Tracker::new(
        stored,
        spec.failures_before_critical,
        spec.successes_before_passing,
    );
    let mut written = stored;
    let mut last_transition: Option<Transition> = None;
    // When the instance went CRITICAL, for deregister_critical_after.
    let mut critical_since = (stored == HealthStatus::Critical).then(|| {
        let since = instance.health.as_ref().map_or(0, |h| h.since_unix_ms);
        let ago = u64::try_from(now_unix_ms().saturating_sub(since)).unwrap_or(0);
        Instant::now()
            .checked_sub(Duration::from_millis(ago))
            .unwrap_or_else(Instant::now)
    });
    let mut probe = prober.start(&spec, &checked_by);
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result: ProbeResult = probe.run().await;
        probes.fetch_add(1, Ordering::Relaxed);
        if let Some((to, consecutive)) = tracker.record(result.outcome) {
            let from = last_transition.as_ref().map_or(written, |t| t.to);
            tracing::info!(
                instance = %key,
                from = from.as_str_name(),
                to = to.as_str_name(),
                reason = %result.output,
                "health changed"
            );
            critical_since = (to == HealthStatus::Critical).then(Instant::now);
            last_transition = Some(Transition {
                from,
                to,
                detail: HealthDetail {
                    reason: result.output.clone(),
                    latency_us: u64::try_from(result.latency.as_micros()).unwrap_or(u64::MAX),
                    consecutive,
                    since_unix_ms: now_unix_ms(),
                    checked_by: checked_by.clone(),
                },
            });
        }
        if tracker.status() != written {
            if let Some(t) = &last_transition {
                match sink
                    .transition(&key, instance.registered_at_unix_ms, t)
                    .await
                {
                    Ok(true) => written = t.to,
                    Ok(false) => {
                        tracing::debug!(instance = %key, "instance gone or re-registered; stopping its check");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %key, error = %e, "could not record a health change; retrying after the next check");
                    }
                }
            }
        }
        if let (Some(bound), Some(since)) = (spec.deregister_critical_after, critical_since) {
            if written == HealthStatus::Critical && since.elapsed() >= bound {
                match sink.deregister(&key).await {
                    Ok(()) => {
                        tracing::info!(instance = %key, after = ?bound, "deregistered after staying critical");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(instance = %key, error = %e, "could not deregister a critical instance")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use weir_proto::registry::v1::{health_check::Kind, HealthCheck, HttpCheck};

    use super::*;
    use crate::health::{hysteresis::Outcome, probe::CheckProbe};

    const SEC: Duration = Duration::from_secs(1);

    /// A prober whose outcome the test sets, recording when it ran.
    #[derive(Debug, Default)]
    struct FakeProber {
        state: Arc<Mutex<FakeState>>,
    }

    #[derive(Debug)]
    struct FakeState {
        outcome: Outcome,
        /// Time of each probe run, from the test's start.
        runs: Vec<Duration>,
        start: Instant,
    }

    impl Default for FakeState {
        fn default() -> Self {
            Self {
                outcome: Outcome::Pass,
                runs: Vec::new(),
                start: Instant::now(),
            }
        }
    }

    impl FakeProber {
        fn set(&self, outcome: Outcome) {
            self.state.lock().expect("lock").outcome = outcome;
        }

        fn runs(&self) -> Vec<Duration> {
            self.state.lock().expect("lock").runs.clone()
        }
    }

    impl Prober for FakeProber {
        fn start(&self, _: &CheckSpec, _: &str) -> Box<dyn CheckProbe> {
            Box::new(FakeProbe(self.state.clone()))
        }
    }

    #[derive(Debug)]
    struct FakeProbe(Arc<Mutex<FakeState>>);

    #[async_trait]
    impl CheckProbe for FakeProbe {
        async fn run(&mut self) -> ProbeResult {
            let mut s = self.0.lock().expect("lock");
            let at = s.start.elapsed();
            s.runs.push(at);
            ProbeResult {
                outcome: s.outcome,
                output: format!("{:?}", s.outcome),
                latency: Duration::ZERO,
            }
        }
    }

    /// A sink that records what it is told, and answers from a script
    /// (then Ok(true)).
    #[derive(Debug)]
    struct FakeSink {
        start: Instant,
        calls: Mutex<Vec<(Duration, HealthStatus, HealthStatus)>>,
        deregistered: Mutex<Vec<(Duration, InstanceKey)>>,
        answers: Mutex<VecDeque<Result<bool, SinkError>>>,
    }

    impl FakeSink {
        fn new(answers: Vec<Result<bool, SinkError>>) -> Arc<Self> {
            Arc::new(Self {
                start: Instant::now(),
                calls: Mutex::default(),
                deregistered: Mutex::default(),
                answers: Mutex::new(answers.into()),
            })
        }

        fn calls(&self) -> Vec<(Duration, HealthStatus, HealthStatus)> {
            self.calls.lock().expect("lock").clone()
        }
    }

    #[async_trait]
    impl StatusSink for FakeSink {
        async fn transition(
            &self,
            key: &InstanceKey,
            registered_at_unix_ms: i64,
            t: &Transition,
        ) -> Result<bool, SinkError> {
            assert_eq!(key.to_string(), "default/orders/i-1");
            assert_eq!(registered_at_unix_ms, 7);
            assert_eq!(t.detail.checked_by, "test-checker");
            self.calls
                .lock()
                .expect("lock")
                .push((self.start.elapsed(), t.from, t.to));
            self.answers
                .lock()
                .expect("lock")
                .pop_front()
                .unwrap_or(Ok(true))
        }

        async fn deregister(&self, key: &InstanceKey) -> Result<(), SinkError> {
            self.deregistered
                .lock()
                .expect("lock")
                .push((self.start.elapsed(), key.clone()));
            Ok(())
        }
    }

    /// A stored instance with a 1 s HTTP check, f = 2 and s = 2.
    fn instance(status: HealthStatus) -> Arc<Instance> {
        Arc::new(Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: "i-1".into(),
            host: "127.0.0.1".into(),
            port: 9,
            status: status as i32,
            registered_at_unix_ms: 7,
            health_check: Some(HealthCheck {
                kind: Some(Kind::Http(HttpCheck {
                    path: "/".into(),
                    expected_status_min: 200,
                    expected_status_max: 399,
                })),
                interval_ms: 1000,
                timeout_ms: 500,
                failures_before_critical: 2,
                successes_before_passing: 2,
                ..HealthCheck::default()
            }),
            ..Instance::default()
        })
    }

    fn checker(sink: Arc<FakeSink>, prober: &Arc<FakeProber>) -> Checker {
        Checker::with_prober(sink, "test-checker", prober.clone())
    }

    /// Lets time run to `t` after the test's start, plus half a tick, so
    /// every check due at or before `t` has run and none after it.
    async fn run_until(start: Instant, t: Duration) {
        tokio::time::sleep_until(start + t + SEC / 2).await;
    }

    #[tokio::test(start_paused = true)]
    async fn checks_run_on_their_interval() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        let sink = FakeSink::new(vec![]);
        let checker = checker(sink.clone(), &prober);
        checker.sync([&instance(HealthStatus::Passing)]);
        assert_eq!(checker.len(), 1);
        run_until(start, 4 * SEC).await;
        // The first at once, then one per interval.
        assert_eq!(prober.runs(), [0, 1, 2, 3, 4].map(|s| s * SEC));
        assert_eq!(checker.probes(), 5);
        assert!(sink.calls().is_empty(), "a steady status writes nothing");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_go_critical_and_passes_come_back() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        prober.set(Outcome::Fail);
        let sink = FakeSink::new(vec![]);
        let checker = checker(sink.clone(), &prober);
        checker.sync([&instance(HealthStatus::Passing)]);

        // One failure (t = 0) is not enough; the second (t = 1 s) is.
        run_until(start, Duration::ZERO).await;
        assert!(sink.calls().is_empty());
        run_until(start, SEC).await;
        assert_eq!(
            sink.calls(),
            [(SEC, HealthStatus::Passing, HealthStatus::Critical)]
        );

        // Still failing: nothing more is written. Then two passes (4 s and
        // 5 s) bring it back, not one.
        run_until(start, 3 * SEC).await;
        prober.set(Outcome::Pass);
        run_until(start, 4 * SEC).await;
        assert_eq!(sink.calls().len(), 1);
        run_until(start, 5 * SEC).await;
        assert_eq!(
            sink.calls()[1],
            (5 * SEC, HealthStatus::Critical, HealthStatus::Passing)
        );
        assert_eq!(sink.calls().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_is_retried_after_the_next_check() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        prober.set(Outcome::Fail);
        let sink = FakeSink::new(vec![Err(SinkError("store down".into()))]);
        let checker = checker(sink.clone(), &prober);
        checker.sync([&instance(HealthStatus::Passing)]);
        run_until(start, 4 * SEC).await;
        // Refused at 1 s, written at 2 s, then nothing while it holds.
        assert_eq!(
            sink.calls(),
            [
                (SEC, HealthStatus::Passing, HealthStatus::Critical),
                (2 * SEC, HealthStatus::Passing, HealthStatus::Critical),
            ]
        );
        assert_eq!(prober.runs().len(), 5, "checks go on meanwhile");
    }

    #[tokio::test(start_paused = true)]
    async fn a_gone_instance_stops_its_check() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        prober.set(Outcome::Fail);
        let sink = FakeSink::new(vec![Ok(false)]);
        let checker = checker(sink.clone(), &prober);
        checker.sync([&instance(HealthStatus::Passing)]);
        run_until(start, 5 * SEC).await;
        assert_eq!(sink.calls().len(), 1);
        assert_eq!(prober.runs(), [0, 1].map(|s| s * SEC));
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_a_check_stops_its_probes() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        let sink = FakeSink::new(vec![]);
        let checker = checker(sink.clone(), &prober);
        let i = instance(HealthStatus::Passing);
        checker.sync([&i]);
        run_until(start, SEC).await;
        assert_eq!(prober.runs().len(), 2);

        // The same spec and registration: the running check is kept, not
        // restarted (a restart would probe at once).
        checker.sync([&i]);
        run_until(start, 2 * SEC).await;
        assert_eq!(prober.runs(), [0, 1, 2].map(|s| s * SEC));

        checker.sync([]);
        assert!(checker.is_empty());
        run_until(start, 6 * SEC).await;
        assert_eq!(prober.runs().len(), 3, "no probe after the stop");

        // clear() (and dropping the checker) stops every check too.
        checker.sync([&i]);
        run_until(start, 7 * SEC).await;
        let before = prober.runs().len();
        checker.clear();
        run_until(start, 10 * SEC).await;
        assert_eq!(prober.runs().len(), before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_persistent_instance_critical_too_long_is_deregistered() {
        let start = Instant::now();
        let prober = Arc::new(FakeProber::default());
        prober.set(Outcome::Fail);
        let sink = FakeSink::new(vec![]);
        let checker = checker(sink.clone(), &prober);
        let mut i = (*instance(HealthStatus::Passing)).clone();
        if let Some(c) = i.health_check.as_mut() {
            c.deregister_critical_after_seconds = 10;
        }
        checker.sync([&Arc::new(i)]);
        // CRITICAL at 1 s; deregistered at the first check 10 s later.
        run_until(start, 10 * SEC).await;
        assert!(sink.deregistered.lock().expect("lock").is_empty());
        run_until(start, 13 * SEC).await;
        let deregistered = sink.deregistered.lock().expect("lock").clone();
        assert_eq!(deregistered.len(), 1);
        assert_eq!(deregistered[0].0, 11 * SEC);
        assert_eq!(deregistered[0].1.to_string(), "default/orders/i-1");
        assert_eq!(prober.runs().len(), 12, "the check ends with it");
    }
}
