//! Balancing: which endpoint of a service takes the next request.
//!
//! A service's balancer is built from its usable endpoints when that set
//! changes (an instance registered, left, or changed health), never per
//! request; picking is lock-free. [`Balance`] is the seam later balancers
//! (least-request P2C, peak EWMA, consistent hash, zone preference) plug
//! into: a pick may exclude endpoints (ejected ones, ones a retry already
//! tried), which tower's `p2c::Balance` cannot, hence a balancer of our own.
//! [`policy`] says which balancer a service's policy asks for, by default
//! and per rule (CloudEvents `type` and `source`).

pub mod policy;
mod round_robin;

use std::{
    fmt,
    sync::{atomic::AtomicUsize, Arc},
};

use http::uri::Authority;

pub use policy::Balancing;
pub use round_robin::RoundRobin;

/// The wire protocol an endpoint speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (CloudEvents over HTTP).
    Http,
    /// gRPC: HTTP/2 with trailers.
    Grpc,
}

/// One instance of a service, as the data path sees it.
#[derive(Debug)]
pub struct Endpoint {
    /// The instance id.
    pub id: Box<str>,
    /// `host:port` requests go to.
    pub authority: Authority,
    pub protocol: Protocol,
    /// Relative share of requests, at least 1.
    pub weight: u32,
    pub zone: Box<str>,
    /// Requests sent and not yet answered.
    pub in_flight: AtomicUsize,
}

/// Picks endpoints for one service.
pub trait Balance: Send + Sync + fmt::Debug {
    /// The next endpoint, skipping those `exclude` rejects; `None` when
    /// every endpoint is excluded or there is none.
    fn pick(&self, exclude: &dyn Fn(&Endpoint) -> bool) -> Option<&Arc<Endpoint>>;

    /// The endpoints it picks from.
    fn endpoints(&self) -> &[Arc<Endpoint>];
}

/// Excludes nothing.
pub fn any(_: &Endpoint) -> bool {
    false
}
