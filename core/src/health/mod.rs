//! Health checking: check specs, probes, hysteresis, and the checker that
//! runs them.
//!
//! The [`checker::Checker`] runs the checks it is given, through a
//! [`probe::Prober`] (the network one by default, a fake in tests), and
//! reports status transitions to a [`checker::StatusSink`]. It knows nothing
//! of who decides which instances to check: the control plane gives it its
//! share of the agentless instances (rendezvous hashing across replicas);
//! the agent will give it its node's instances.

pub mod checker;
pub mod hysteresis;
pub mod probe;
pub mod spec;

use weir_proto::registry::v1::{HealthStatus, Instance};

/// The registry's `healthy_only` rule, which consumers (GetService, the
/// agent's balancers) share: every instance but a CRITICAL one takes
/// traffic. (A service in protection takes it on all of them; that is
/// decided per service, by the caller.)
pub fn takes_traffic(i: &Instance) -> bool {
    i.status != HealthStatus::Critical as i32
}
