//! Weir control plane: the service registry.
//!
//! A replica serves the `weir.registry.v1.Registry` gRPC API (plus
//! `grpc.health.v1` and server reflection) and `/healthz` + `/readyz` over
//! HTTP. The registry lives in a [`store::Store`]: etcd in production, the
//! embedded store in `--dev` mode. Each replica runs one store watch and fans
//! it out to its watchers through the [`hub::Hub`] cache, which also serves
//! reads. Replicas are stateless: any number can share one etcd.
//!
//! Module map: [`config`] (file/env/flags), [`server`] (wiring),
//! [`registry`] (the gRPC service), [`hub`] (cache + fan-out), [`store`]
//! (etcd and embedded), [`keys`] (key layout), [`validate`] (input rules),
//! [`error`] (the one mapping to gRPC statuses), `readiness` (the checks
//! behind `/readyz` and `grpc.health.v1`).

pub mod checks;
pub mod config;
pub mod error;
pub mod health;
pub mod hub;
pub mod keys;
pub mod policy;
mod readiness;
pub mod registry;
pub mod server;
pub mod session;
pub mod store;
pub mod validate;

pub use config::Config;
pub use server::{ControlPlane, ServeError, ServerTask, TaskEnd};

/// Wall-clock time in unix milliseconds, as records store it.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
