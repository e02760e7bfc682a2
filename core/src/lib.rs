//! Weir core: what the control plane and the agent both need, free of etcd,
//! gRPC servers and HTTP frameworks.
//!
//! - [`health`]: health-check specs, the probes (HTTP, TCP, gRPC
//!   `grpc.health.v1`) behind the [`health::probe::Prober`] seam, the
//!   hysteresis state machine and the checker loop that reports transitions
//!   to a [`health::checker::StatusSink`].
//! - [`validate`]: the [`validate::ValidationError`] every input check
//!   returns (field path + rule), its helpers, and registration validation.
//! - [`policy`]: traffic-policy validation and [`policy::resolve()`], which
//!   turns a stored policy into typed, defaulted settings an agent enforces.
//! - [`keys::InstanceKey`]: the names that identify an instance.
//! - [`time`] (wall clock as records store it) and [`backoff`] (capped
//!   exponential backoff with optional jitter).
//! - [`signal::shutdown_signal`]: Ctrl-C or SIGTERM, for every binary.
//! - [`task::AbortOnDrop`]: a background task that ends with its owner.
//! - [`sketch::Sketch`]: a mergeable latency histogram with a bounded
//!   relative error (DDSketch), for telemetry's percentiles.
//! - `logging` and `config` (feature `cli`): the log format switch and
//!   set-up, and the config-file reading, that the binaries share.
//! - `prometheus` (feature `prometheus`): the process's `/metrics`
//!   recorder; `telemetry_json` (feature `json`): telemetry answers as
//!   the JSON the control plane's API and `weirctl -o json` share.
//!
//! The control plane adds the store, the gRPC services and replica
//! coordination on top; the agent will add its node session and policy
//! stack. Nothing here opens a listening socket.

pub mod backoff;
#[cfg(feature = "cli")]
pub mod config;
pub mod health;
pub mod keys;
#[cfg(feature = "cli")]
pub mod logging;
pub mod policy;
#[cfg(feature = "prometheus")]
pub mod prometheus;
pub mod signal;
pub mod sketch;
pub mod task;
#[cfg(feature = "json")]
pub mod telemetry_json;
pub mod time;
pub mod validate;

pub use keys::InstanceKey;
