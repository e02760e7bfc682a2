//! The etcd store: the production [`Store`], over the `etcd-client` crate.
//!
//! Keys are used as given (the registry layer puts every key under its root
//! prefix). Leases are etcd leases; renewing one reuses a keep-alive stream
//! per lease, opened on first use and closed after it has been idle for a
//! while, because `etcd-client` binds a keep-alive stream to one lease and
//! opening a stream per renewal would cost a round trip more.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaseKeepAliveStream,
    LeaseKeeper, PutOptions, Txn, TxnOp, WatchOptions,
};
use futures::StreamExt;
use tokio::time::Instant;

use super::{
    prefix_end, CasOutcome, Deleted, EventKind, History, KeyValue, Lease, LeaseId, Page, PageRead,
    Replaced, Snapshot, Store, StoreError, WatchEvent, WatchMessage, WatchStream,
};

/// Settings of the etcd store.
#[derive(Clone, Debug)]
pub struct EtcdStoreConfig {
    /// etcd client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    pub connect_timeout: Duration,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Keep-alive streams idle for longer than this are closed.
    pub keeper_idle: Duration,
}

impl EtcdStoreConfig {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            connect_timeout: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            keeper_idle: Duration::from_secs(60),
        }
    }
}

/// Key (under the prefix being read) that a history read writes as a fence.
pub const FENCE_KEY: &str = "fence";

struct Keeper {
    keeper: LeaseKeeper,
    responses: LeaseKeepAliveStream,
    last_used: Instant,
}

type KeeperSlot = Arc<tokio::sync::Mutex<Option<Keeper>>>;

/// Store on an etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    config: EtcdStoreConfig,
    keepers: Arc<Mutex<HashMap<LeaseId, KeeperSlot>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.config.endpoints)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: etcd_client::Error) -> StoreError {
    StoreError::Unavailable(Box::new(e))
}

fn to_u64(rev: i64) -> u64 {
    u64::try_from(rev).unwrap_or(0)
}

fn to_i64(rev: u64) -> i64 {
    i64::try_from(rev).unwrap_or(i64::MAX)
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|e| StoreError::Protocol(format!("non-UTF-8 key in etcd: {e}")))?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        create_revision: to_u64(kv.create_revision()),
        mod_revision: to_u64(kv.mod_revision()),
        lease: kv.lease(),
    })
}

/// A watch event as a [`WatchEvent`]; with `keep_removed`, a delete carries
/// the previous value (the watch must ask for prev_kv).
fn convert_event(
    ev: &etcd_client::Event,
    keep_removed: bool,
) -> Result<Option<WatchEvent>, StoreError> {
    let Some(kv) = ev.kv() else { return Ok(None) };
    let mut kv = convert(kv)?;
    let kind = match ev.event_type() {
        EventType::Put => EventKind::Put,
        EventType::Delete => {
            kv.value = match (keep_removed, ev.prev_kv()) {
                (true, Some(prev)) => prev.value().to_vec(),
                _ => Vec::new(),
            };
            EventKind::Delete
        }
    };
    Ok(Some(WatchEvent { kind, kv }))
}

/// etcd's answer to a read at a compacted revision.
fn is_compacted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.message().contains("required revision has been compacted"))
}

/// The client refused an answer larger than its decoding limit (4 MiB).
fn is_too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large"))
}

fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => s.message().contains("lease not found"),
        etcd_client::Error::LeaseKeepAliveError(m) => m.contains("lease not found"),
        _ => false,
    }
}

impl EtcdStore {
    /// Connects to etcd and checks that it answers.
    pub async fn connect(config: EtcdStoreConfig) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let mut client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(unavailable)?;
        client.status().await.map_err(unavailable)?;
        let store = Self {
            client,
            config,
            keepers: Arc::default(),
        };
        tokio::spawn(close_idle_keepers(
            Arc::downgrade(&store.keepers),
            store.config.keeper_idle,
        ));
        Ok(store)
    }

    /// The underlying etcd client, for tools and benchmarks that compare
    /// against raw etcd.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    fn slot(&self, lease: LeaseId) -> KeeperSlot {
        let mut keepers = self.keepers.lock().unwrap_or_else(|e| e.into_inner());
        keepers.entry(lease).or_default().clone()
    }

    fn forget(&self, lease: LeaseId) {
        let mut keepers = self.keepers.lock().unwrap_or_else(|e| e.into_inner());
        keepers.remove(&lease);
    }

    /// One renewal on the lease's stream, opening it if needed.
    async fn renew(&self, lease: LeaseId) -> Result<Option<Duration>, etcd_client::Error> {
        let slot = self.slot(lease);
        let mut guard = slot.lock().await;
        // Out of the slot while in use: a renewal abandoned half-way (its
        // caller's time bound ran out) drops the stream with it, rather than
        // leave an answer behind that the next renewal would take for its own.
        if let Some(mut keeper) = guard.take() {
            keeper.last_used = Instant::now();
            keeper.keeper.keep_alive().await?;
            let ttl = match keeper.responses.message().await? {
                Some(resp) if resp.ttl() > 0 => Some(Duration::from_secs(to_u64(resp.ttl()))),
                Some(_) => None,
                None => {
                    return Err(etcd_client::Error::LeaseKeepAliveError(
                        "keep-alive stream closed".into(),
                    ))
                }
            };
            *guard = Some(keeper);
            return Ok(ttl);
        }
        // Opening the stream sends the first renewal and reads its answer.
        let (keeper, responses) = match self.client.lease_client().keep_alive(lease).await {
            Ok(pair) => pair,
            Err(e) if is_lease_not_found(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        // The opening answer was consumed by `keep_alive`; ask for the TTL.
        // Report the granted TTL, as later renewals do: `ttl()` is the time
        // left, truncated to a second short. A negative one: lease gone.
        let resp = self.client.lease_client().time_to_live(lease, None).await?;
        let ttl = if resp.ttl() < 0 {
            0
        } else {
            resp.granted_ttl()
        };
        *guard = Some(Keeper {
            keeper,
            responses,
            last_used: Instant::now(),
        });
        Ok((ttl > 0).then(|| Duration::from_secs(to_u64(ttl))))
    }
}

async fn close_idle_keepers(
    keepers: std::sync::Weak<Mutex<HashMap<LeaseId, KeeperSlot>>>,
    idle: Duration,
) {
    let mut tick = tokio::time::interval(idle.max(Duration::from_secs(1)) / 2);
    loop {
        tick.tick().await;
        let Some(keepers) = keepers.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut map = keepers.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, slot| match slot.try_lock() {
            Ok(keeper) => keeper
                .as_ref()
                .is_some_and(|k| now.duration_since(k.last_used) < idle),
            // In use right now.
            Err(_) => true,
        });
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(key, None)
            .await
            .map_err(unavailable)?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn range(&self, prefix: &str) -> Result<Snapshot, StoreError> {
        let resp = self
            .client
            .kv_client()
            .get(
                prefix,
                Some(GetOptions::new().with_range(prefix_end(prefix))),
            )
            .await
            .map_err(unavailable)?;
        let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
        let kvs = resp.kvs().iter().map(convert).collect::<Result<_, _>>()?;
        Ok(Snapshot { kvs, revision })
    }

    async fn range_page(
        &self,
        prefix: &str,
        revision: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<PageRead, StoreError> {
        // The smallest key greater than `after` is `after` + NUL.
        let start = match after {
            Some(after) if after >= prefix => {
                let mut start = after.as_bytes().to_vec();
                start.push(0);
                start
            }
            _ => prefix.as_bytes().to_vec(),
        };
        // A count bound keeps typical pages small, but a few large records
        // can still pass the client's 4 MiB answer limit: then the same page
        // is asked again with half the keys.
        let mut limit = limit.max(1);
        loop {
            let mut options = GetOptions::new()
                .with_range(prefix_end(prefix))
                .with_limit(i64::try_from(limit).unwrap_or(i64::MAX));
            if revision > 0 {
                options = options.with_revision(to_i64(revision));
            }
            let resp = match self
                .client
                .kv_client()
                .get(start.clone(), Some(options))
                .await
            {
                Ok(resp) => resp,
                Err(e) if is_compacted(&e) => return Ok(PageRead::Compacted),
                Err(e) if is_too_large(&e) && limit > 1 => {
                    limit /= 2;
                    tracing::debug!(prefix, limit, "range page too large; asking for fewer keys");
                    continue;
                }
                Err(e) => return Err(unavailable(e)),
            };
            let revision = if revision > 0 {
                revision
            } else {
                resp.header().map_or(0, |h| to_u64(h.revision()))
            };
            let kvs = resp.kvs().iter().map(convert).collect::<Result<_, _>>()?;
            return Ok(PageRead::Page(Page {
                kvs,
                revision,
                more: resp.more(),
            }));
        }
    }

    async fn replace(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Replaced, StoreError> {
        let mut options = PutOptions::new().with_prev_key();
        if let Some(l) = lease {
            options = options.with_lease(l);
        }
        match self.client.kv_client().put(key, value, Some(options)).await {
            Ok(resp) => Ok(Replaced {
                revision: resp.header().map_or(0, |h| to_u64(h.revision())),
                prev: resp.prev_key().map(convert).transpose()?,
            }),
            Err(e) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(lease.unwrap_or(0))),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn put_if(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
        expected: u64,
    ) -> Result<CasOutcome, StoreError> {
        let compare = Compare::mod_revision(key, CompareOp::Equal, to_i64(expected));
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::put(key, value, options)])
            .or_else([TxnOp::get(key, None)]);
        let resp = match self.client.kv_client().txn(txn).await {
            Ok(resp) => resp,
            Err(e) if is_lease_not_found(&e) => {
                return Err(StoreError::LeaseNotFound(lease.unwrap_or(0)))
            }
            Err(e) => return Err(unavailable(e)),
        };
        if resp.succeeded() {
            let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
            return Ok(CasOutcome::Written { revision });
        }
        let mut current = None;
        for op in resp.op_responses() {
            if let etcd_client::TxnOpResponse::Get(get) = op {
                current = get.kvs().first().map(convert).transpose()?;
            }
        }
        Ok(CasOutcome::Conflict { current })
    }

    async fn delete(&self, key: &str) -> Result<Deleted, StoreError> {
        let resp = self
            .client
            .kv_client()
            .delete(key, None)
            .await
            .map_err(unavailable)?;
        Ok(Deleted {
            existed: resp.deleted() > 0,
            revision: resp.header().map_or(0, |h| to_u64(h.revision())),
        })
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<Lease, StoreError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .client
            .lease_client()
            .grant(secs, None)
            .await
            .map_err(unavailable)?;
        if !resp.error().is_empty() {
            return Err(StoreError::Protocol(format!(
                "lease grant: {}",
                resp.error()
            )));
        }
        Ok(Lease {
            id: resp.id(),
            ttl: Duration::from_secs(to_u64(resp.ttl())),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Duration>, StoreError> {
        // A broken stream (e.g. etcd restarted) is replaced once.
        for attempt in 0..2 {
            match self.renew(lease).await {
                Ok(Some(ttl)) => return Ok(Some(ttl)),
                Ok(None) => {
                    self.forget(lease);
                    return Ok(None);
                }
                Err(e) => {
                    self.forget(lease);
                    if attempt == 1 {
                        return Err(unavailable(e));
                    }
                    tracing::debug!(lease, error = %e, "lease keep-alive stream broke; reopening");
                }
            }
        }
        Err(StoreError::Protocol("unreachable keep-alive retry".into()))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.forget(lease);
        match self.client.lease_client().revoke(lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_lease_not_found(&e) => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn watch(&self, prefix: &str, after_revision: u64) -> Result<WatchStream, StoreError> {
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(to_i64(after_revision + 1))
            .with_progress_notify();
        let stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        let messages = stream
            .map(|resp| -> Result<Option<WatchMessage>, StoreError> {
                let resp = resp.map_err(unavailable)?;
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        return Ok(Some(WatchMessage::Compacted {
                            compact_revision: to_u64(resp.compact_revision()),
                        }));
                    }
                    return Err(StoreError::Protocol(format!(
                        "watch canceled: {}",
                        resp.cancel_reason()
                    )));
                }
                if resp.created() && resp.events().is_empty() {
                    return Ok(None);
                }
                if resp.events().is_empty() {
                    let revision = resp.header().map_or(0, |h| to_u64(h.revision()));
                    return Ok(Some(WatchMessage::Progress { revision }));
                }
                let events = resp
                    .events()
                    .iter()
                    .filter_map(|ev| convert_event(ev, false).transpose())
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(WatchMessage::Events(events)))
            })
            .filter_map(|r| async move { r.transpose() });
        // etcd keeps the gRPC stream open after canceling a watch: end ours
        // after Compacted or an error, as the trait promises.
        let messages = futures::stream::unfold(Some(Box::pin(messages)), |stream| async move {
            let mut stream = stream?;
            let message = stream.next().await?;
            let last = matches!(message, Ok(WatchMessage::Compacted { .. }) | Err(_));
            Some((message, (!last).then_some(stream)))
        });
        Ok(Box::pin(messages))
    }

    async fn history(&self, prefix: &str, after: u64, until: u64) -> Result<History, StoreError> {
        let options = WatchOptions::new()
            .with_range(prefix_end(prefix))
            .with_start_revision(to_i64(after + 1))
            .with_prev_key();
        let mut stream = self
            .client
            .watch_client()
            .watch(prefix, Some(options))
            .await
            .map_err(unavailable)?;
        // The watch replays the history from `after`, but nothing tells when
        // it has delivered everything up to `until` on a quiet key space
        // (etcd 3.4 answers a progress request at once, caught up or not).
        // A write under the prefix is a fence: its event comes after every
        // change up to `until`.
        let fence = format!("{prefix}{FENCE_KEY}");
        self.client
            .kv_client()
            .put(fence, Vec::new(), None)
            .await
            .map_err(unavailable)?;
        let mut events = Vec::new();
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let message = tokio::time::timeout_at(deadline, stream.message())
                .await
                .map_err(|_| StoreError::Protocol("history read timed out".into()))?
                .map_err(unavailable)?;
            let Some(resp) = message else {
                return Err(StoreError::Protocol("history watch closed".into()));
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return Ok(History::Compacted {
                        compact_revision: to_u64(resp.compact_revision()),
                    });
                }
                return Err(StoreError::Protocol(format!(
                    "history watch canceled: {}",
                    resp.cancel_reason()
                )));
            }
            for ev in resp.events() {
                if let Some(event) = convert_event(ev, true)? {
                    if event.kv.mod_revision > until {
                        return Ok(History::Events(events));
                    }
                    events.push(event);
                }
            }
        }
    }

    async fn compact(&self, revision: u64) -> Result<(), StoreError> {
        self.client
            .kv_client()
            .compact(to_i64(revision), None)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
