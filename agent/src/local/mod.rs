//! Node-local registration: the services on this node register with their
//! agent (`weir.registry.v1.Registry` on a loopback port), through
//! `weir-client` or `weirctl`, exactly as they would with the control plane.
//!
//! The agent registers each one at the control plane on behalf of its node
//! session (`RegisterRequest.agent_node`): the record hangs on the session's
//! lease, so one keep-alive per node carries them all and a dead node's
//! instances expire together. What the session no longer does for each
//! instance, the agent does:
//!
//! - **TTL**: every instance registered here must be ephemeral; the agent
//!   takes its heartbeats (`Heartbeat`, `KeepAlive`) and deregisters one
//!   whose TTL lapses ([`Holdings::lapsed`], swept every [`SWEEP`]).
//! - **New sessions**: when the control plane gives the node a new session
//!   (the old lease expired, e.g. during an outage), the records went with
//!   it; the agent registers every instance it holds again before it says
//!   it is ready ([`Local::register_all`]).
//! - **Checks**: active checks of local instances run here, with
//!   `weir-core`'s checker, reporting transitions to the control plane
//!   (whose own checker skips instances an agent holds).
//! - **Removal elsewhere**: an instance of this node deregistered at the
//!   control plane (`weirctl deregister`) is forgotten here too, so its
//!   next heartbeat gets NOT_FOUND and its client decides whether to
//!   register again; the session and the node's other instances stay.
//!
//! Reads: `GetService` answers from the agent's registry view, so
//! discovery keeps working while the control plane is away. The other
//! reads and `Watch` are the control plane's: they answer UNIMPLEMENTED
//! saying so.

mod service;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;
use weir_client::{Client, Instance, NodeStatusSink, RegisterResponse};
use weir_core::{health::checker::Checker, InstanceKey};

pub use service::LocalRegistry;

/// How long a registration waits for the node session to open.
pub const SESSION_WAIT: Duration = Duration::from_secs(5);

/// How often lapsed instances are looked for.
pub const SWEEP: Duration = Duration::from_millis(500);

/// One instance this agent holds.
#[derive(Debug, Clone)]
struct Held {
    /// As the service asked (id filled in), to register it again.
    spec: Instance,
    /// As the control plane stored it (status, registration time).
    record: Arc<Instance>,
    ttl: Duration,
    last_beat: Instant,
}

/// The instances this agent holds: pure bookkeeping, timed by the caller.
#[derive(Debug, Default)]
pub struct Holdings {
    held: HashMap<InstanceKey, Held>,
}

impl Holdings {
    fn hold(&mut self, spec: Instance, record: Instance, now: Instant) {
        let key = InstanceKey::of(&record);
        let ttl = Duration::from_secs(u64::from(spec.ttl_seconds.max(1)));
        self.held.insert(
            key,
            Held {
                spec,
                record: Arc::new(record),
                ttl,
                last_beat: now,
            },
        );
    }

    /// A heartbeat: the remaining TTL, or `None` for an instance not held.
    pub fn beat(&mut self, key: &InstanceKey, now: Instant) -> Option<Duration> {
        let h = self.held.get_mut(key)?;
        h.last_beat = now;
        Some(h.ttl)
    }

    /// Forgets an instance; whether it was held.
    pub fn forget(&mut self, key: &InstanceKey) -> bool {
        self.held.remove(key).is_some()
    }

    /// Pushes every heartbeat clock forward by `by` (capped at `now`): the
    /// agent itself was not running (suspended, frozen) for that long, so
    /// no service could reach it.
    pub fn excuse(&mut self, by: Duration, now: Instant) {
        for h in self.held.values_mut() {
            h.last_beat = (h.last_beat + by).min(now);
        }
    }

    /// The instances whose TTL ran out by `now`, forgotten.
    pub fn lapsed(&mut self, now: Instant) -> Vec<InstanceKey> {
        let gone: Vec<InstanceKey> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.last_beat) > h.ttl)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &gone {
            self.held.remove(k);
        }
        gone
    }

    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn records(&self) -> Vec<Arc<Instance>> {
        self.held.values().map(|h| h.record.clone()).collect()
    }

    fn specs(&self) -> Vec<Instance> {
        self.held.values().map(|h| h.spec.clone()).collect()
    }
}

/// The node's local instances, and what is done with them.
#[derive(Debug)]
pub struct Local {
    node: String,
    client: Client,
    /// The node session's state: registrations wait for it to be open.
    session: tokio::sync::watch::Receiver<crate::session::SessionState>,
    holdings: Mutex<Holdings>,
    checker: Checker,
}

/// Why a local registration failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{field}: {rule}")]
    Invalid { field: String, rule: String },
    /// The agent has no open session with the control plane (starting,
    /// or the control plane is away): try again shortly.
    #[error("this agent has no session with the control plane right now; try again shortly")]
    NoSession,
    #[error(transparent)]
    ControlPlane(#[from] weir_client::Error),
}

impl Local {
    pub fn new(
        node: String,
        client: Client,
        session: tokio::sync::watch::Receiver<crate::session::SessionState>,
    ) -> Self {
        let sink = Arc::new(NodeStatusSink::new(client.clone(), node.clone()));
        let checker = Checker::new(sink, format!("agent:{node}"));
        Self {
            node,
            client,
            session,
            holdings: Mutex::default(),
            checker,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Holdings) -> T) -> T {
        f(&mut self.holdings.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs exactly the checks of the instances held now.
    fn sync_checks(&self) {
        let records = self.with(|h| h.records());
        self.checker.sync(records.iter());
    }

    /// How many instances this agent holds.
    pub fn len(&self) -> usize {
        self.with(|h| h.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The services (namespace, name) of the instances held, each once.
    pub fn services(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self.with(|h| {
            h.held
                .values()
                .map(|i| (i.spec.namespace.clone(), i.spec.service.clone()))
                .collect()
        });
        out.sort();
        out.dedup();
        out
    }

    /// Registers `instance` at the control plane for this node's session
    /// and holds it.
    pub async fn register(&self, mut instance: Instance) -> Result<RegisterResponse, LocalError> {
        if !instance.ephemeral || instance.ttl_seconds == 0 {
            return Err(LocalError::Invalid {
                field: "instance.ephemeral".into(),
                rule: "an instance registered at an agent lives as long as its heartbeats: set ephemeral with ttl_seconds".into(),
            });
        }
        if instance.instance_id.is_empty() {
            // A stable id, so a retried registration replaces, not adds.
            instance.instance_id = format!("{:016x}", rand::random::<u64>());
        }
        // The control plane registers for a node only while its session is
        // open: a service that starts with its agent waits for it, briefly.
        let mut session = self.session.clone();
        let open = tokio::time::timeout(SESSION_WAIT, async {
            session.wait_for(|s| s.connected).await.is_ok()
        })
        .await;
        if open != Ok(true) {
            return Err(LocalError::NoSession);
        }
        let response = match self
            .client
            .register_for_node(&self.node, instance.clone())
            .await
        {
            // The session ended between the check and the call.
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => {
                return Err(LocalError::NoSession)
            }
            other => other?,
        };
        let record = response
            .instance
            .clone()
            .unwrap_or_else(|| instance.clone());
        self.with(|h| h.hold(instance, record, Instant::now()));
        self.sync_checks();
        Ok(response)
    }

    /// Deregisters one instance (here and at the control plane).
    pub async fn deregister(&self, key: &InstanceKey) -> Result<bool, LocalError> {
        self.with(|h| h.forget(key));
        self.sync_checks();
        Ok(self.client.deregister(&key.into()).await?.existed)
    }

    /// A heartbeat from the instance's service.
    pub fn beat(&self, key: &InstanceKey) -> Option<Duration> {
        self.with(|h| h.beat(key, Instant::now()))
    }

    /// The control plane deleted `i`, an instance of this node (as last
    /// stored). Forgotten here only when it is the registration held now:
    /// the deletions of an expired session's records, which arrive after
    /// the new session registered them again, are older.
    pub fn removed_elsewhere(&self, i: &Instance) {
        if i.agent_node != self.node {
            return;
        }
        let key = InstanceKey::of(i);
        let forgotten = self.with(|h| match h.held.get(&key) {
            Some(held) if i.revision >= held.record.revision => h.forget(&key),
            _ => false,
        });
        if forgotten {
            tracing::info!(namespace = %i.namespace, service = %i.service, instance = %i.instance_id,
                "a local instance was removed at the control plane; forgotten here");
            self.sync_checks();
        }
    }

    /// Deregisters the instances whose TTL lapsed. `stalled`: how much
    /// later than due this sweep runs; a gap the agent itself caused
    /// (suspended, frozen) is not held against the services.
    pub async fn sweep(&self, stalled: Duration) {
        let now = Instant::now();
        let lapsed = self.with(|h| {
            if stalled > SWEEP {
                h.excuse(stalled, now);
            }
            h.lapsed(now)
        });
        if lapsed.is_empty() {
            return;
        }
        self.sync_checks();
        for k in lapsed {
            tracing::info!(namespace = %k.namespace, service = %k.service, instance = %k.instance_id,
                "a local instance stopped heartbeating; deregistering it");
            if let Err(e) = self.client.deregister(&(&k).into()).await {
                // The session lease still bounds its life.
                tracing::warn!(error = %e, "deregistering a lapsed instance failed");
            }
        }
    }

    /// Registers every held instance again (a new session: the old
    /// records left with the old lease). Returns how many failed.
    pub async fn register_all(&self) -> usize {
        let specs = self.with(|h| h.specs());
        let mut failed = 0;
        for spec in specs {
            match self
                .client
                .register_for_node(&self.node, spec.clone())
                .await
            {
                Ok(response) => {
                    let record = response.instance.unwrap_or_else(|| spec.clone());
                    // Keep the heartbeat clock: re-registering is not a beat.
                    self.with(|h| {
                        let key = InstanceKey::of(&record);
                        let last = h.held.get(&key).map(|x| x.last_beat);
                        h.hold(spec, record, last.unwrap_or_else(Instant::now));
                    });
                }
                Err(e) => {
                    failed += 1;
                    tracing::warn!(error = %e, instance = %spec.instance_id, "registering a local instance again failed");
                }
            }
        }
        self.sync_checks();
        failed
    }

    /// Deregisters everything (the agent is stopping).
    pub async fn deregister_all(&self) {
        let records = self.with(|h| std::mem::take(&mut h.held));
        self.checker.clear();
        for (k, _) in records {
            if let Err(e) = self.client.deregister(&(&k).into()).await {
                tracing::warn!(error = %e, instance = %k, "deregistering on shutdown failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, ttl: u32) -> Instance {
        Instance {
            namespace: "default".into(),
            service: "orders".into(),
            instance_id: id.into(),
            ephemeral: true,
            ttl_seconds: ttl,
            ..Instance::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn instances_lapse_after_their_own_ttl_without_heartbeats() {
        let mut h = Holdings::default();
        let t0 = Instant::now();
        h.hold(inst("a", 2), inst("a", 2), t0);
        h.hold(inst("b", 6), inst("b", 6), t0);
        let a = InstanceKey::of(&inst("a", 2));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(h.beat(&a, Instant::now()), Some(Duration::from_secs(2)));
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert!(
            h.lapsed(Instant::now()).is_empty(),
            "a beat 1.5 s ago, b is within 6 s"
        );
        tokio::time::advance(Duration::from_millis(2100)).await;
        let gone = h.lapsed(Instant::now());
        assert_eq!(
            gone,
            std::slice::from_ref(&a),
            "a's 2 s ran out; b has 0.9 s left"
        );
        assert_eq!(
            h.beat(&a, Instant::now()),
            None,
            "a lapsed instance is forgotten"
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(h.lapsed(Instant::now()).len(), 1);
        assert!(h.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_agent_was_not_running_is_excused() {
        let mut h = Holdings::default();
        h.hold(inst("a", 2), inst("a", 2), Instant::now());
        tokio::time::advance(Duration::from_secs(10)).await;
        // The agent was frozen for 9.5 of those 10 s.
        h.excuse(Duration::from_millis(9500), Instant::now());
        assert!(h.lapsed(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_millis(1600)).await;
        assert_eq!(
            h.lapsed(Instant::now()).len(),
            1,
            "the rest of its TTL still counts"
        );
    }
}
