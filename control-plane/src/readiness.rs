//! Readiness: whether this replica can do its job now, for `/readyz` and
//! `grpc.health.v1`.
//!
//! Two checks, as kube-apiserver lists its own: `store` (a background probe
//! reads one key every [`PROBE_EVERY`] with a [`PROBE_TIMEOUT`]; requests add
//! no load) and `cache` (the hub has loaded its first snapshot). The probe
//! logs each change with the store's own error; the checks name only a
//! short reason.

use std::{fmt, sync::Arc, time::Duration};

use tokio::{sync::watch, task::JoinHandle};

use crate::{hub::Hub, store::Store};

/// Time between the end of one store probe and the start of the next.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A probe that takes longer fails.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the last store probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreCheck {
    /// No probe has finished yet.
    Pending,
    Ok,
    /// The store answered with an error (detail in the log).
    Unreachable,
    /// The store did not answer within [`PROBE_TIMEOUT`].
    TimedOut,
}

/// One named check and, if it fails, a short reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub failure: Option<&'static str>,
}

impl fmt::Display for Check {
    /// kube-apiserver's `/readyz?verbose` line: `[+]store ok`,
    /// `[-]store failed: unreachable`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.failure {
            None => write!(f, "[+]{} ok", self.name),
            Some(reason) => write!(f, "[-]{} failed: {reason}", self.name),
        }
    }
}

/// The checks of one replica. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Readiness {
    store: watch::Receiver<StoreCheck>,
    hub: Hub,
}

impl Readiness {
    pub fn new(store: watch::Receiver<StoreCheck>, hub: Hub) -> Self {
        Self { store, hub }
    }

    /// Every check, in a fixed order.
    pub fn checks(&self) -> [Check; 2] {
        let store = match *self.store.borrow() {
            StoreCheck::Ok => None,
            StoreCheck::Pending => Some("not probed yet"),
            StoreCheck::Unreachable => Some("unreachable"),
            StoreCheck::TimedOut => Some("no answer within the probe timeout"),
        };
        let cache = (!self.hub.is_ready()).then_some("initial load not finished");
        [
            Check {
                name: "store",
                failure: store,
            },
            Check {
                name: "cache",
                failure: cache,
            },
        ]
    }

    pub fn is_ready(&self) -> bool {
        self.checks().iter().all(|c| c.failure.is_none())
    }

    /// The `/readyz?verbose` body: one line per check, then the verdict.
    pub fn verbose(&self) -> String {
        let checks = self.checks();
        let mut out = String::new();
        for c in &checks {
            out.push_str(&c.to_string());
            out.push('\n');
        }
        if checks.iter().all(|c| c.failure.is_none()) {
            out.push_str("readyz check passed\n");
        } else {
            out.push_str("readyz check failed\n");
        }
        out
    }
}

/// Probes the store until dropped.
#[derive(Debug)]
pub struct StoreProbe {
    task: JoinHandle<()>,
}

impl Drop for StoreProbe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StoreProbe {
    /// Starts probing `store` by reading `key` (a key that need not exist).
    pub fn start(
        store: Arc<dyn Store>,
        key: String,
        every: Duration,
        timeout: Duration,
    ) -> (Self, watch::Receiver<StoreCheck>) {
        let (tx, rx) = watch::channel(StoreCheck::Pending);
        let task = tokio::spawn(async move {
            loop {
                let check = match tokio::time::timeout(timeout, store.get(&key)).await {
                    Ok(Ok(_)) => StoreCheck::Ok,
                    Ok(Err(e)) => {
                        if *tx.borrow() != StoreCheck::Unreachable {
                            tracing::warn!(store = store.kind(), error = %e, "store probe failed; not ready");
                        }
                        StoreCheck::Unreachable
                    }
                    Err(_) => {
                        if *tx.borrow() != StoreCheck::TimedOut {
                            tracing::warn!(
                                store = store.kind(),
                                ?timeout,
                                "store probe got no answer; not ready"
                            );
                        }
                        StoreCheck::TimedOut
                    }
                };
                let before = tx.send_replace(check);
                if check == StoreCheck::Ok
                    && before != StoreCheck::Ok
                    && before != StoreCheck::Pending
                {
                    tracing::info!(store = store.kind(), "store reachable again");
                }
                tokio::time::sleep(every).await;
            }
        });
        (Self { task }, rx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;
    use crate::{
        hub::HubConfig,
        keys::Keys,
        store::{Call, EmbeddedStore, EmbeddedStoreConfig, Layer, Layered, Op, StoreError},
    };

    const OK: u8 = 0;
    const FAILING: u8 = 1;
    const HUNG: u8 = 2;

    /// Makes the `get` of the store it wraps fail or hang.
    #[derive(Debug)]
    struct Switchable {
        mode: AtomicU8,
    }

    impl Layer for Switchable {
        fn around<'a, T: Send + 'a>(&'a self, op: Op<'a>, call: Call<'a, T>) -> Call<'a, T> {
            if !matches!(op, Op::Get { .. }) {
                return call;
            }
            match self.mode.load(Ordering::SeqCst) {
                OK => call,
                FAILING => {
                    Box::pin(async { Err(StoreError::Unavailable("connection refused".into())) })
                }
                _ => Box::pin(std::future::pending()),
            }
        }
    }

    async fn settle(rx: &mut watch::Receiver<StoreCheck>, want: StoreCheck) {
        tokio::time::timeout(Duration::from_secs(30), rx.wait_for(|c| *c == want))
            .await
            .expect("probe result in time")
            .expect("probe running");
    }

    #[tokio::test(start_paused = true)]
    async fn the_store_check_follows_the_probe_and_the_cache_check_the_hub() {
        let store = Arc::new(Layered::wrap(
            Arc::new(EmbeddedStore::new(EmbeddedStoreConfig::default())),
            Switchable {
                mode: AtomicU8::new(OK),
            },
        ));
        let (hub, _hub_task) = Hub::start(store.clone(), Keys::new("/t"), HubConfig::default());
        let (_probe, mut rx) =
            StoreProbe::start(store.clone(), "/t/probe".into(), PROBE_EVERY, PROBE_TIMEOUT);
        let readiness = Readiness::new(rx.clone(), hub.clone());
        settle(&mut rx, StoreCheck::Ok).await;
        tokio::time::timeout(Duration::from_secs(5), async {
            while !hub.is_ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("hub loads");
        assert!(readiness.is_ready());
        assert_eq!(
            readiness.verbose(),
            "[+]store ok\n[+]cache ok\nreadyz check passed\n"
        );

        store.layer().mode.store(FAILING, Ordering::SeqCst);
        settle(&mut rx, StoreCheck::Unreachable).await;
        assert!(!readiness.is_ready());
        assert_eq!(
            readiness.verbose(),
            "[-]store failed: unreachable\n[+]cache ok\nreadyz check failed\n"
        );

        store.layer().mode.store(HUNG, Ordering::SeqCst);
        let started = tokio::time::Instant::now();
        settle(&mut rx, StoreCheck::TimedOut).await;
        assert!(started.elapsed() <= PROBE_EVERY + PROBE_TIMEOUT);
        assert!(!readiness.is_ready());

        store.layer().mode.store(OK, Ordering::SeqCst);
        settle(&mut rx, StoreCheck::Ok).await;
        assert!(readiness.is_ready());
    }
}
