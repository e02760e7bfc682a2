//! The checker: runs each assigned instance's check on its interval, feeds
//! the results through the hysteresis [`Tracker`], and reports transitions
//! to a [`StatusSink`] (the store, in the control plane). A transition that
//! could not be written is written again after the next check; nothing is
//! written while the status holds.

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
    probe::{self, ProbeResult},
    spec::{self, CheckSpec, Probe},
};
use crate::{keys::InstanceKey, now_unix_ms};

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
    checked_by: String,
    running: Mutex<HashMap<InstanceKey, Running>>,
    probes: Arc<AtomicU64>,
}

impl Checker {
    /// `checked_by` names this checker in every [`HealthDetail`].
    pub fn new(sink: Arc<dyn StatusSink>, checked_by: impl Into<String>) -> Self {
        Self {
            sink,
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
            let key = InstanceKey {
                namespace: instance.namespace.clone(),
                service: instance.service.clone(),
                instance_id: instance.instance_id.clone(),
            };
            match running.remove(&key) {
                Some(r) if r.spec == spec && r.registered_at == instance.registered_at_unix_ms => {
                    next.insert(key, r);
                }
                _ => {
                    let task = tokio::spawn(check_loop(
                        self.sink.clone(),
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
    let grpc = match spec.probe {
        Probe::Grpc { .. } => probe::grpc_channel(&spec),
        _ => None,
    };
    let mut ticks = tokio::time::interval(spec.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result: ProbeResult = probe::run(&spec, grpc.as_ref(), &checked_by).await;
        probes.fetch_add(1, Ordering::Relaxed);
        if let Some((to, consecutive)) = tracker.record(result.outcome) {
            let from = last_transition.as_ref().map_or(written, |t| t.to);
            tracing::info!(
                instance = %format!("{}/{}/{}", key.namespace, key.service, key.instance_id),
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
                        tracing::debug!(instance = ?key, "instance gone or re-registered; stopping its check");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(instance = ?key, error = %e, "could not record a health change; retrying after the next check");
                    }
                }
            }
        }
        if let (Some(bound), Some(since)) = (spec.deregister_critical_after, critical_since) {
            if written == HealthStatus::Critical && since.elapsed() >= bound {
                match sink.deregister(&key).await {
                    Ok(()) => {
                        tracing::info!(instance = ?key, after = ?bound, "deregistered after staying critical");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(instance = ?key, error = %e, "could not deregister a critical instance")
                    }
                }
            }
        }
    }
}
