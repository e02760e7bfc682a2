//! Keeping one registration alive in the background.
//!
//! The loop renews the lease about every TTL/3 (through the client's shared
//! `KeepAlive` stream), so two renewals in a row can
//! fail before the lease expires. A failed renewal is retried quickly with a
//! growing, jittered delay capped at TTL/6 (every try already goes through
//! each replica the client knows). When the control plane says the
//! registration is gone (its lease expired while the network was down, or an
//! operator removed it) the loop registers it again under the same id. The
//! loop never stops on its own: every failure is logged and shown in
//! [`RegistrationState`] until it succeeds or the handle is closed.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{watch, Notify},
    task::JoinHandle,
    time::Instant,
};

use weir_core::backoff;

use crate::{instance_ref, Client, Error, Instance, InstanceRef, RegisterResponse};

/// Where a [`Registration`] stands.
#[derive(Clone, Debug, PartialEq)]
pub enum RegistrationState {
    /// Registered; for an ephemeral instance, the lease was renewed (or
    /// granted) at `renewed_at` with `ttl` left.
    Alive {
        instance: Box<Instance>,
        ttl: Duration,
        renewed_at: Instant,
        /// Times the registration was lost and made again.
        reregistrations: u64,
    },
    /// The last try failed; the loop is retrying. `lease_lost` says the
    /// control plane reported the registration gone (it is being made
    /// again); otherwise the lease may still be alive.
    Retrying {
        attempt: u32,
        error: String,
        lease_lost: bool,
    },
    /// Closed by [`Registration::deregister`] or by dropping the handle.
    Closed,
}

impl RegistrationState {
    pub fn is_alive(&self) -> bool {
        matches!(self, RegistrationState::Alive { .. })
    }
}

/// The calls the renewal loop needs; [`Client`] is the real one. A trait so
/// the loop's timing can be tested under paused time.
pub(crate) trait Backend: Clone + Send + Sync + 'static {
    fn register(
        &self,
        instance: Instance,
    ) -> impl Future<Output = Result<RegisterResponse, Error>> + Send;
    /// Renews; each replica tried gets at most `bound`.
    fn heartbeat(
        &self,
        r: &InstanceRef,
        bound: Duration,
    ) -> impl Future<Output = Result<Duration, Error>> + Send;
    fn deregister(&self, r: &InstanceRef) -> impl Future<Output = Result<bool, Error>> + Send;
}

impl Backend for Client {
    async fn register(&self, instance: Instance) -> Result<RegisterResponse, Error> {
        Client::register(self, instance).await
    }
    async fn heartbeat(&self, r: &InstanceRef, bound: Duration) -> Result<Duration, Error> {
        Client::renew(self, r, bound).await
    }
    async fn deregister(&self, r: &InstanceRef) -> Result<bool, Error> {
        Ok(Client::deregister(self, r).await?.existed)
    }
}

/// Delay between renewals of a lease of `ttl`: a third of it, at least
/// 100 ms.
pub fn renew_interval(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(100))
}

/// Delay before retry number `attempt` (1-based) after a failure, for a
/// lease of `ttl`: 100 ms doubling per attempt, capped at TTL/6 (at least
/// 100 ms, at most 5 s), then scaled by `jitter` (expected in 0.5..=1.0,
/// clamped) so that many clients failing together spread out.
pub fn retry_delay(attempt: u32, ttl: Duration, jitter: f64) -> Duration {
    let base = Duration::from_millis(100);
    let cap = (ttl / 6).clamp(base, Duration::from_secs(5));
    backoff::exponential(base, cap, attempt).mul_f64(jitter.clamp(0.5, 1.0))
}

fn jitter() -> f64 {
    rand::random_range(0.5..=1.0)
}

/// A registration kept alive in the background. Dropping it stops the
/// renewals (an ephemeral instance then expires after its TTL);
/// [`Registration::deregister`] removes it at once.
#[derive(Debug)]
pub struct Registration {
    instance: InstanceRef,
    state: watch::Receiver<RegistrationState>,
    stop: Arc<Notify>,
    task: Option<JoinHandle<()>>,
    deregister: Box<dyn DeregisterFn>,
}

trait DeregisterFn: Send + Sync + std::fmt::Debug {
    fn call(
        &self,
        r: InstanceRef,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, Error>> + Send + '_>>;
}

#[derive(Debug)]
struct Deregisterer<B>(B);

impl<B: Backend + std::fmt::Debug> DeregisterFn for Deregisterer<B> {
    fn call(
        &self,
        r: InstanceRef,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<bool, Error>> + Send + '_>> {
        Box::pin(async move { self.0.deregister(&r).await })
    }
}

impl Registration {
    /// Registers `instance` and starts renewing it. Fails if the first
    /// registration fails (bad input is reported here, not retried).
    pub(crate) async fn start<B: Backend + std::fmt::Debug>(
        backend: B,
        mut instance: Instance,
    ) -> Result<Self, Error> {
        if instance.instance_id.is_empty() {
            // Fix the id now so that re-registrations reuse it.
            instance.instance_id = crate::generated_id(&instance.service);
        }
        let first = backend.register(instance.clone()).await?;
        let stored = first
            .instance
            .ok_or_else(|| Error::Protocol("RegisterResponse without an instance".into()))?;
        let r = instance_ref(&stored);
        let ttl = Duration::from_secs(u64::from(first.ttl_seconds));
        let (tx, rx) = watch::channel(RegistrationState::Alive {
            instance: Box::new(stored),
            ttl,
            renewed_at: Instant::now(),
            reregistrations: 0,
        });
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(renew_loop(
            backend.clone(),
            instance,
            r.clone(),
            ttl,
            tx,
            stop.clone(),
        ));
        Ok(Self {
            instance: r,
            state: rx,
            stop,
            task: Some(task),
            deregister: Box::new(Deregisterer(backend)),
        })
    }

    /// Which instance this is.
    pub fn instance(&self) -> &InstanceRef {
        &self.instance
    }

    /// The current state.
    pub fn state(&self) -> RegistrationState {
        self.state.borrow().clone()
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Stops renewing and removes the instance. Returns whether it was still
    /// registered.
    pub async fn deregister(mut self) -> Result<bool, Error> {
        self.stop_renewals().await;
        self.deregister.call(self.instance.clone()).await
    }

    async fn stop_renewals(&mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            // The loop ends at its next await point; an abort covers a call
            // in flight.
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn renew_loop<B: Backend>(
    backend: B,
    spec: Instance,
    r: InstanceRef,
    mut ttl: Duration,
    state: watch::Sender<RegistrationState>,
    stop: Arc<Notify>,
) {
    let persistent = ttl.is_zero();
    let mut delay = renew_interval(ttl);
    let mut attempt: u32 = 0;
    let mut lease_lost = false;
    let mut reregistrations: u64 = 0;
    loop {
        if persistent {
            // Nothing to renew: wait to be closed.
            stop.notified().await;
            break;
        }
        tokio::select! {
            _ = stop.notified() => break,
            _ = tokio::time::sleep(delay) => {}
        }
        let outcome = if lease_lost {
            backend.register(spec.clone()).await.and_then(|resp| {
                let stored = resp.instance.ok_or_else(|| {
                    Error::Protocol("RegisterResponse without an instance".into())
                })?;
                Ok((
                    Some(stored),
                    Duration::from_secs(u64::from(resp.ttl_seconds)),
                ))
            })
        } else {
            // A replica gets at most TTL/4 per try, so a hung one leaves
            // time to renew through another before the lease expires.
            let bound = (ttl / 4).max(Duration::from_millis(200));
            backend.heartbeat(&r, bound).await.map(|left| (None, left))
        };
        match outcome {
            Ok((stored, left)) => {
                if let Some(stored) = stored {
                    reregistrations += 1;
                    tracing::info!(instance = %describe(&r), "registered again after the registration was lost");
                    ttl = left;
                    state.send_replace(RegistrationState::Alive {
                        instance: Box::new(stored),
                        ttl,
                        renewed_at: Instant::now(),
                        reregistrations,
                    });
                } else {
                    state.send_modify(|s| match s {
                        RegistrationState::Alive {
                            ttl: t, renewed_at, ..
                        } => {
                            *t = left;
                            *renewed_at = Instant::now();
                        }
                        other => {
                            // Recovered from failures without losing the
                            // lease: rebuild the Alive state.
                            *other = RegistrationState::Alive {
                                instance: Box::new(spec_with_id(&spec, &r)),
                                ttl: left,
                                renewed_at: Instant::now(),
                                reregistrations,
                            }
                        }
                    });
                }
                if attempt > 0 {
                    tracing::info!(instance = %describe(&r), attempts = attempt, "lease renewal recovered");
                }
                attempt = 0;
                lease_lost = false;
                delay = renew_interval(ttl);
            }
            Err(e) => {
                attempt = attempt.saturating_add(1);
                if matches!(e, Error::NotFound(_)) {
                    // The registration is gone: make it again right away.
                    lease_lost = true;
                    delay = Duration::ZERO;
                    tracing::warn!(instance = %describe(&r), error = %e, "registration lost; registering again");
                } else {
                    delay = retry_delay(attempt, ttl, jitter());
                    tracing::warn!(instance = %describe(&r), error = %e, attempt, retry_in = ?delay, "lease renewal failed; retrying");
                    if lease_lost {
                        // Registering again failed: do not hammer.
                        delay = delay.max(Duration::from_millis(100));
                    }
                }
                state.send_replace(RegistrationState::Retrying {
                    attempt,
                    error: e.to_string(),
                    lease_lost,
                });
            }
        }
    }
    state.send_replace(RegistrationState::Closed);
}

fn spec_with_id(spec: &Instance, r: &InstanceRef) -> Instance {
    Instance {
        instance_id: r.instance_id.clone(),
        ..spec.clone()
    }
}

fn describe(r: &InstanceRef) -> String {
    format!("{}/{}/{}", r.namespace, r.service, r.instance_id)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn retry_delays_grow_and_stay_well_inside_the_ttl() {
        let ttl = Duration::from_secs(6);
        let d: Vec<_> = (1..=6).map(|a| retry_delay(a, ttl, 1.0)).collect();
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[2], Duration::from_millis(400));
        assert_eq!(d[3], Duration::from_millis(800));
        // Capped at TTL/6 = 1 s, so at least five retries fit in a TTL.
        assert_eq!(d[4], Duration::from_secs(1));
        assert_eq!(d[5], Duration::from_secs(1));
        assert_eq!(
            retry_delay(3, ttl, 0.5),
            Duration::from_millis(200),
            "jitter scales down"
        );
        assert_eq!(
            retry_delay(u32::MAX, Duration::from_secs(3600), 1.0),
            Duration::from_secs(5)
        );
        assert_eq!(
            retry_delay(1, Duration::from_secs(1), 1.0),
            Duration::from_millis(100)
        );
        assert_eq!(
            renew_interval(Duration::from_secs(3)),
            Duration::from_secs(1)
        );
    }

    /// What the fake control plane answers, in order; an empty script means
    /// success.
    #[derive(Clone, Debug, Default)]
    struct Scripted {
        calls: Arc<Mutex<Vec<(&'static str, Instant)>>>,
        heartbeat_errors: Arc<Mutex<Vec<Error>>>,
        register_errors: Arc<Mutex<Vec<Error>>>,
    }

    impl Scripted {
        fn calls(&self, kind: &str) -> Vec<Duration> {
            let calls = self.calls.lock().expect("lock");
            let start = calls.first().map(|c| c.1);
            calls
                .iter()
                .filter(|c| c.0 == kind)
                .filter_map(|c| start.map(|s| c.1 - s))
                .collect()
        }
    }

    impl Backend for Scripted {
        async fn register(&self, instance: Instance) -> Result<RegisterResponse, Error> {
            self.calls
                .lock()
                .expect("lock")
                .push(("register", Instant::now()));
            if let Some(e) = self.register_errors.lock().expect("lock").pop() {
                return Err(e);
            }
            Ok(RegisterResponse {
                ttl_seconds: instance.ttl_seconds,
                instance: Some(instance),
            })
        }
        async fn heartbeat(&self, _: &InstanceRef, _: Duration) -> Result<Duration, Error> {
            self.calls
                .lock()
                .expect("lock")
                .push(("heartbeat", Instant::now()));
            match self.heartbeat_errors.lock().expect("lock").pop() {
                Some(e) => Err(e),
                None => Ok(Duration::from_secs(3)),
            }
        }
        async fn deregister(&self, _: &InstanceRef) -> Result<bool, Error> {
            self.calls
                .lock()
                .expect("lock")
                .push(("deregister", Instant::now()));
            Ok(true)
        }
    }

    fn spec() -> Instance {
        Instance {
            service: "orders".into(),
            namespace: "default".into(),
            host: "127.0.0.1".into(),
            port: 80,
            ephemeral: true,
            ttl_seconds: 3,
            ..Instance::default()
        }
    }

    /// A registration of [`spec`] on `backend`, which must take it.
    async fn started(backend: &Scripted) -> Registration {
        Registration::start(backend.clone(), spec())
            .await
            .expect("registered")
    }

    async fn wait_for(
        rx: &mut watch::Receiver<RegistrationState>,
        what: impl Fn(&RegistrationState) -> bool,
    ) -> RegistrationState {
        let s = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| what(s)))
            .await
            .expect("state reached in time")
            .expect("sender alive");
        s.clone()
    }

    #[tokio::test(start_paused = true)]
    async fn renews_every_third_of_the_ttl() {
        let backend = Scripted::default();
        let reg = started(&backend).await;
        assert!(reg.state().is_alive());
        assert!(reg.instance().instance_id.starts_with("orders-"));
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        let beats = backend.calls("heartbeat");
        let expected: Vec<_> = (1..=10).map(Duration::from_secs).collect();
        assert_eq!(beats, expected, "one heartbeat per second for TTL 3 s");
        assert!(reg.deregister().await.expect("deregistered"));
        assert_eq!(backend.calls("deregister").len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn registers_again_at_once_when_the_lease_was_lost() {
        let backend = Scripted::default();
        backend
            .heartbeat_errors
            .lock()
            .expect("lock")
            .push(Error::NotFound("lease expired".into()));
        let reg = started(&backend).await;
        let mut rx = reg.subscribe();
        // The Retrying { lease_lost: true } state in between is too short to
        // observe here: registering again starts without delay.
        wait_for(&mut rx, |s| {
            matches!(
                s,
                RegistrationState::Alive {
                    reregistrations: 1,
                    ..
                }
            )
        })
        .await;
        let registers = backend.calls("register");
        assert_eq!(registers.len(), 2);
        assert_eq!(
            registers[1],
            Duration::from_secs(1),
            "no delay after NotFound"
        );
        drop(reg);
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_retrying_through_an_outage_and_says_so() {
        let backend = Scripted::default();
        {
            let mut errors = backend.heartbeat_errors.lock().expect("lock");
            for _ in 0..5 {
                errors.push(Error::Unavailable("connection refused".into()));
            }
        }
        let reg = started(&backend).await;
        let mut rx = reg.subscribe();
        let failing = wait_for(&mut rx, |s| {
            matches!(s, RegistrationState::Retrying { attempt: 5, .. })
        })
        .await;
        assert!(
            matches!(&failing, RegistrationState::Retrying { error, lease_lost: false, .. } if error.contains("connection refused"))
        );
        wait_for(&mut rx, |s| s.is_alive()).await;
        let beats = backend.calls("heartbeat");
        assert_eq!(beats.len(), 6);
        // Retries come faster than the renewal interval and stay within the
        // TTL/6 cap (500 ms for TTL 3 s).
        for w in beats.windows(2) {
            let gap = w[1] - w[0];
            assert!(
                gap >= Duration::from_millis(50) && gap <= Duration::from_millis(500),
                "gap {gap:?}"
            );
        }
        assert_eq!(
            backend.calls("register").len(),
            1,
            "the lease was never reported lost"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_stops_renewals() {
        let backend = Scripted::default();
        let reg = started(&backend).await;
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        drop(reg);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(backend.calls("heartbeat").len(), 2);
        assert!(backend.calls("deregister").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_registration_error_is_returned() {
        let backend = Scripted::default();
        backend
            .register_errors
            .lock()
            .expect("lock")
            .push(Error::InvalidArgument {
                message: "port: must be 1-65535".into(),
                violations: Vec::new(),
            });
        let err = Registration::start(backend.clone(), spec())
            .await
            .expect_err("rejected");
        assert!(matches!(err, Error::InvalidArgument { message, .. } if message.contains("port")));
    }
}
