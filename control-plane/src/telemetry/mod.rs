//! What the control plane does with the telemetry agents report: a
//! bounded store of recent traces ([`traces`]), traffic per edge over
//! sliding windows ([`windows`]), the `weir.telemetry.v1` service and the
//! cluster-wide queries ([`service`]), the JSON API ([`http`]) and
//! export to tracing backends ([`export`]).

pub mod export;
pub mod governance;
pub mod http;
pub mod service;
pub mod traces;
pub mod windows;
