//! Health checking in the control plane: the checker itself (specs,
//! probes, hysteresis, the check loop) is `weir_core::health`, shared with
//! the agent; what is the control plane's own is [`sharing`], which assigns
//! each instance to one live replica by rendezvous hashing.

pub mod sharing;
