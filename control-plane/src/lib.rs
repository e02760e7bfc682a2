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
//! (etcd and embedded), [`keys`] (key layout), [`error`] (the one mapping to
//! gRPC statuses), `readiness` (the checks behind `/readyz` and
//! `grpc.health.v1`). Input validation, health checking, policy validation
//! and the instance key come from `weir_core`, shared with the agent.

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

pub use config::Config;
pub use server::{ControlPlane, ServeError, ServerTask, TaskEnd};
