//! Health checking: check specs, probes, hysteresis, and the checker that
//! runs them.
//!
//! The [`checker::Checker`] runs the checks it is given and reports status
//! transitions to a [`checker::StatusSink`]. It knows nothing of who decides
//! which instances to check: in the control plane, [`sharing`] assigns each
//! instance to one live replica by rendezvous hashing; the agent will give
//! it its node's instances.

pub mod checker;
pub mod hysteresis;
pub mod probe;
pub mod sharing;
pub mod spec;
