//! Weir control plane: the service registry.
//!
//! A replica serves the `weir.registry.v1.Registry` gRPC API (plus
//! `grpc.health.v1` and server reflection) and `/healthz` + `/readyz` over
//! HTTP. The registry lives in a [`store::Store`]: etcd in production, the
//! embedded store in `--dev` mode. Each replica runs one store watch and fans
//! it out to its watchers through the [`hub::Hub`] cache, which also serves
//! reads. Replicas are stateless: any number can share one etcd.
//!
//! Modules by feature:
//! - `registry`: the `weir.registry.v1.Registry` service. Writes go to the
//!   store; reads come from the hub's cache.
//! - `policy`: `weir.policy.v1.PolicyService` (validation and resolution
//!   are `weir_core::policy`).
//! - `agents`: `weir.agent.v1.AgentSessionService`, one stream per agent;
//!   `weir.agent.v1.Agents` (list agents, connected or not; ask one a
//!   question over its stream, forwarded to the replica holding it); the
//!   sweep of the agents' last-seen records.
//! - `checks`: this replica's share of the active health checks (the
//!   checker itself is `weir_core::health`), verdicts written to the store.
//! - `replicas`: membership under a lease and rendezvous sharing of checks.
//! - [`telemetry`]: what agents report; [`telemetry::export`] forwards
//!   their spans to OTLP/gRPC and Zipkin backends.
//!
//! And what they stand on: `hub` (one store watch per replica, the cache,
//! the fan-out to watchers and agents), [`store`] (the contract, etcd and
//! the embedded dev store), [`keys`] (the key layout), `error` (the one
//! mapping to gRPC statuses), `readiness` (`/readyz` and `grpc.health.v1`),
//! [`config`] (file/env/flags) and `server` (wiring a replica together).
//! Input validation, health checking, policy validation and the instance
//! key come from `weir_core`, shared with the agent.

mod agents;
mod checks;
pub mod config;
mod error;
mod hub;
pub mod keys;
mod metrics;
mod outliers;
mod policy;
mod quota;
mod readiness;
mod registry;
mod replicas;
mod server;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use server::{ControlPlane, ServeError, ServerTask, TaskEnd};
