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
