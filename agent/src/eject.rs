//! Passive ejection: an endpoint that refuses or drops connections leaves
//! this agent's rotation at the first such failure (every worker's picks
//! skip it from then on), and a prober of its own brings it back once a
//! TCP connect succeeds again: after 100 ms, then doubling up to 10 s,
//! each delay jittered into its upper half so a fleet of agents does not
//! probe in step. This is the gate the circuit breakers act through too.
//!
//! The agent fails open: when every endpoint of a service is ejected, a
//! pick takes an ejected one rather than none (see `ingress::attempts`).
//! The prober holds the endpoint weakly: when the instance leaves the
//! registry (and the routes drop it), probing stops.

use std::{
    future::Future,
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc, OnceLock, Weak,
    },
    time::Duration,
};

use http::uri::Authority;
use tokio::time::Instant;
use weir_core::backoff::{Backoff, Jitter};

use crate::{balance::Endpoint, retry::Class};

/// The first probe's delay.
pub const PROBE_FIRST: Duration = Duration::from_millis(100);
/// The longest delay between probes.
pub const PROBE_MAX: Duration = Duration::from_secs(10);
/// How long a probe's connect may take.
pub const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// An endpoint's ejection state, shared by every worker.
#[derive(Debug, Default)]
pub struct Ejection {
    /// 0: in rotation; otherwise when it was ejected, in milliseconds
    /// since [`epoch`], plus one.
    since: AtomicU64,
    /// Ejections so far.
    count: AtomicU64,
}

/// The clock ejection times count from.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    Instant::now()
        .saturating_duration_since(epoch())
        .as_millis() as u64
        + 1
}

impl Ejection {
    /// Whether picks skip the endpoint now.
    #[inline]
    pub fn is_ejected(&self) -> bool {
        self.since.load(Relaxed) != 0
    }

    /// For how long it has been out of rotation.
    pub fn ejected_for(&self) -> Option<Duration> {
        match self.since.load(Relaxed) {
            0 => None,
            since => Some(Duration::from_millis(now_ms().saturating_sub(since))),
        }
    }

    /// Ejections so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Takes it out of rotation; `true` when it was in rotation (the
    /// caller then starts the prober).
    fn eject(&self) -> bool {
        let ejected = self
            .since
            .compare_exchange(0, now_ms(), Relaxed, Relaxed)
            .is_ok();
        if ejected {
            self.count.fetch_add(1, Relaxed);
        }
        ejected
    }

    fn restore(&self) {
        self.since.store(0, Relaxed);
    }
}

/// What an ejection is counted in, per service.
#[derive(Debug, Clone)]
pub struct EjectionMetrics {
    pub ejections: metrics::Counter,
    pub ejected: metrics::Gauge,
}

impl EjectionMetrics {
    pub fn new(labels: &[(&'static str, String); 2]) -> Self {
        Self {
            ejections: metrics::counter!("weir_agent_ejections_total", labels),
            ejected: metrics::gauge!("weir_agent_ejected_endpoints", labels),
        }
    }
}

/// Takes `endpoint` out of rotation after `why`, and starts probing it
/// back, unless it is out already.
pub fn eject(endpoint: &Arc<Endpoint>, why: Class, metrics: &EjectionMetrics) {
    if !endpoint.ejection.eject() {
        return;
    }
    tracing::warn!(instance = %endpoint.id, address = %endpoint.authority, why = why.as_str(),
        "instance ejected from this agent's rotation; probing it with TCP connects");
    metrics.ejections.increment(1);
    metrics.ejected.increment(1.0);
    let gauge = metrics.ejected.clone();
    tokio::spawn(probe_back(
        Arc::downgrade(endpoint),
        schedule(),
        connects,
        gauge,
    ));
}

/// The delays between probes.
pub fn schedule() -> Backoff {
    Backoff::new(PROBE_FIRST, PROBE_MAX).with_jitter(Jitter::Half)
}

/// One probe: whether a TCP connection to `authority` opens in time.
async fn connects(authority: Authority) -> bool {
    let connect = tokio::net::TcpStream::connect(authority.as_str());
    matches!(
        tokio::time::timeout(PROBE_CONNECT_TIMEOUT, connect).await,
        Ok(Ok(_))
    )
}

/// Probes `endpoint` after each of `delays` until `probe` succeeds (back
/// in rotation) or the endpoint is gone.
async fn probe_back<F, Fut>(
    endpoint: Weak<Endpoint>,
    mut delays: Backoff,
    probe: F,
    ejected: metrics::Gauge,
) where
    F: Fn(Authority) -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        tokio::time::sleep(delays.next_delay()).await;
        let Some(authority) = endpoint.upgrade().map(|e| e.authority.clone()) else {
            ejected.decrement(1.0);
            return;
        };
        if probe(authority).await {
            if let Some(e) = endpoint.upgrade() {
                tracing::info!(instance = %e.id, address = %e.authority, probes = delays.attempt(),
                    "instance accepts connections again; back in rotation");
                e.ejection.restore();
            }
            ejected.decrement(1.0);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::balance::test_endpoint;

    #[tokio::test(start_paused = true)]
    async fn probes_back_off_from_100ms_to_10s_and_restore_on_success() {
        let endpoint = test_endpoint("a", 1, "");
        assert!(endpoint.ejection.eject());
        assert!(!endpoint.ejection.eject(), "once");
        assert!(endpoint.ejection.is_ejected());
        let start = Instant::now();
        let probes: Arc<Mutex<Vec<Duration>>> = Arc::default();
        let seen = probes.clone();
        let probe = move |_: Authority| {
            let mut p = seen.lock().expect("lock");
            p.push(start.elapsed());
            let ok = p.len() == 10;
            async move { ok }
        };
        probe_back(
            Arc::downgrade(&endpoint),
            schedule(),
            probe,
            metrics::Gauge::noop(),
        )
        .await;
        assert!(!endpoint.ejection.is_ejected(), "restored");
        assert_eq!(endpoint.ejection.count(), 1);
        let probes = probes.lock().expect("lock");
        let gaps: Vec<Duration> = std::iter::once(probes[0])
            .chain(probes.windows(2).map(|w| w[1] - w[0]))
            .collect();
        // Each delay is in the upper half of 100 ms × 2^n, capped at 10 s.
        for (n, gap) in gaps.iter().enumerate() {
            let full = (PROBE_FIRST * (1 << n)).min(PROBE_MAX);
            assert!(
                *gap >= full / 2 && *gap <= full,
                "probe {n}: {gap:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
        assert!(gaps[9] >= Duration::from_secs(5), "capped at 10 s");
    }

    #[tokio::test(start_paused = true)]
    async fn probing_stops_when_the_endpoint_is_gone() {
        let endpoint = test_endpoint("a", 1, "");
        assert!(endpoint.ejection.eject());
        let weak = Arc::downgrade(&endpoint);
        drop(endpoint);
        let probed = Arc::new(AtomicU64::new(0));
        let count = probed.clone();
        probe_back(
            weak,
            schedule(),
            move |_| {
                count.fetch_add(1, Relaxed);
                async { false }
            },
            metrics::Gauge::noop(),
        )
        .await;
        assert_eq!(probed.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn a_probe_is_a_tcp_connect() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let open: Authority = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        assert!(connects(open.clone()).await);
        drop(listener);
        assert!(!connects(open).await, "refused once closed");
    }
}
