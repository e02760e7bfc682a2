//! Traffic policies: the `weir.policy.v1.PolicyService` (validation and
//! resolution live in `weir_core::policy`).
//!
//! A policy lives at `{root}/v1/policies/{namespace}/{service}` as a
//! `PolicyRecord`: the current policy plus its previous versions (newest
//! first, bounded), so a write and its history are one atomic put. The
//! version of a policy is the etcd revision of the write that made it; Put
//! and Rollback compare it in a transaction (compare-and-put on the key's
//! revision), so concurrent editors cannot overwrite each other silently.

pub mod service;
