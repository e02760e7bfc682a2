//! Balancing: which endpoint of a service takes the next request.
//!
//! A service's balancers are built from its usable endpoints when that set
//! or the policy changes (an instance registered, left, or changed health),
//! never per request. Each algorithm is a pure core with its own tests:
//! [`RoundRobin`] (plain or smooth weighted), [`LeastRequest`] (power of
//! `choices` choices), [`PeakEwma`] and [`ConsistentHash`] (Maglev). The
//! [`Balancer`] enum dispatches among them without a `Box<dyn>`, and a
//! [`Picker`] (what a route holds, by default and per rule) wraps one with
//! the zone preference and the shadow balancer of the policy.
//!
//! Every pick may exclude endpoints (ejected ones, ones a retry already
//! tried), which tower's `p2c::Balance` cannot, hence balancers of our own.
//! [`policy`] says which balancer a service's policy asks for, by default
//! and per rule (CloudEvents `type` and `source`).

mod consistent_hash;
mod ewma;
mod least_request;
mod picker;
pub mod policy;
mod round_robin;

use std::{
    fmt,
    sync::{atomic::AtomicUsize, Arc},
};

use http::uri::{Authority, PathAndQuery};

use crate::eject::Ejection;

pub use consistent_hash::{key_hash, ConsistentHash};
pub use ewma::{Ewma, PeakEwma};
pub use least_request::LeastRequest;
pub use picker::Picker;
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

/// One instance of a service, as the data path sees it. Shared by every
/// balancer of the route and every ingress worker; kept across rebuilds
/// while the instance does not change, so its load counters carry over.
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
    /// Peak EWMA of the time to the response head; fed only on routes
    /// balanced (or shadowed) by [`PeakEwma`].
    pub ewma: Ewma,
    /// Out of this agent's rotation after refused or dropped connections.
    pub ejection: Ejection,
    /// The endpoint's circuit breaker, on routes whose policy has one.
    pub breaker: crate::breaker::Cell,
    /// The topics the instance subscribes to (sorted): a topic's events go
    /// only to instances that list it.
    pub topics: Box<[Box<str>]>,
    /// Where an HTTP instance takes topic deliveries: its metadata's
    /// `weir.delivery.path`, else `/`.
    pub delivery_path: PathAndQuery,
}

impl Endpoint {
    /// An endpoint with nothing in flight and no latency observed.
    pub fn new(
        id: &str,
        authority: Authority,
        protocol: Protocol,
        weight: u32,
        zone: &str,
    ) -> Self {
        Self {
            id: id.into(),
            authority,
            protocol,
            weight,
            zone: zone.into(),
            in_flight: AtomicUsize::new(0),
            ewma: Ewma::default(),
            ejection: Ejection::default(),
            breaker: crate::breaker::Cell::default(),
            topics: Box::default(),
            delivery_path: PathAndQuery::from_static("/"),
        }
    }

    /// The same endpoint, taking topic deliveries at `path`.
    pub fn with_delivery_path(mut self, path: PathAndQuery) -> Self {
        self.delivery_path = path;
        self
    }

    /// The same endpoint, subscribed to `topics`.
    pub fn with_topics<'a>(mut self, topics: impl IntoIterator<Item = &'a str>) -> Self {
        let mut topics: Vec<Box<str>> = topics.into_iter().map(Box::from).collect();
        topics.sort();
        topics.dedup();
        self.topics = topics.into();
        self
    }

    /// Whether the instance lists `topic`.
    pub fn subscribes(&self, topic: &str) -> bool {
        self.topics.binary_search_by(|t| (**t).cmp(topic)).is_ok()
    }
}

/// Picks endpoints for one service.
pub trait Balance: Send + Sync + fmt::Debug {
    /// The next endpoint, skipping those `exclude` rejects; `None` when
    /// every endpoint is excluded or there is none. `key` is the hash of
    /// the request's consistent-hash key ([`key_hash`]); only
    /// [`ConsistentHash`] reads it.
    fn pick(&self, key: Option<u64>, exclude: &dyn Fn(&Endpoint) -> bool)
        -> Option<&Arc<Endpoint>>;

    /// The endpoints it picks from.
    fn endpoints(&self) -> &[Arc<Endpoint>];
}

/// One balancing algorithm over a set of endpoints.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    LeastRequest(LeastRequest),
    PeakEwma(PeakEwma),
    ConsistentHash(ConsistentHash),
}

impl Balancer {
    /// The algorithm's name, as the admin API shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::RoundRobin(rr) if rr.weighted() => "weighted_round_robin",
            Self::RoundRobin(_) => "round_robin",
            Self::LeastRequest(_) => "least_request",
            Self::PeakEwma(_) => "peak_ewma",
            Self::ConsistentHash(_) => "consistent_hash",
        }
    }
}

impl Balance for Balancer {
    #[inline]
    fn pick(
        &self,
        key: Option<u64>,
        exclude: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<&Arc<Endpoint>> {
        match self {
            Self::RoundRobin(b) => b.pick(key, exclude),
            Self::LeastRequest(b) => b.pick(key, exclude),
            Self::PeakEwma(b) => b.pick(key, exclude),
            Self::ConsistentHash(b) => b.pick(key, exclude),
        }
    }

    fn endpoints(&self) -> &[Arc<Endpoint>] {
        match self {
            Self::RoundRobin(b) => b.endpoints(),
            Self::LeastRequest(b) => b.endpoints(),
            Self::PeakEwma(b) => b.endpoints(),
            Self::ConsistentHash(b) => b.endpoints(),
        }
    }
}

/// Excludes nothing.
pub fn any(_: &Endpoint) -> bool {
    false
}

/// A random number below `n` (> 0), from a per-thread xorshift generator:
/// P2C samples on the hot path and needs no cryptographic quality.
pub(crate) fn random_below(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(rand::random::<u64>() | 1);
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        // Multiply-shift maps x onto 0..n without the bias of a modulo
        // worth caring about here.
        ((u128::from(x) * n as u128) >> 64) as usize
    })
}

#[cfg(test)]
pub(crate) fn test_endpoint(id: &str, weight: u32, zone: &str) -> Arc<Endpoint> {
    Arc::new(Endpoint::new(
        id,
        "127.0.0.1:1".parse().expect("authority"),
        Protocol::Http,
        weight,
        zone,
    ))
}
