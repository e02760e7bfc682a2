//! The outbox's records and their state: what was accepted, and where
//! each (event, subscribing service) delivery stands.
//!
//! Every change is a [`Record`] appended to the [`log`](super::log): an
//! [`Accepted`] event (durably, before the publisher is answered) and then
//! [`Update`]s (attempted, delivered, dead, dropped, replayed, purged),
//! written without waiting for an fsync. The state in memory is what
//! replaying the records gives, so after a crash the agent knows every
//! accepted event and redelivers what it cannot prove was delivered: an
//! update lost with the crash costs a duplicate, never an event.
//!
//! An event stays while any of its deliveries is pending or dead-lettered;
//! the log's compaction ([`Outbox::compact`]) drops the rest.

use std::{
    collections::{BTreeMap, HashSet},
    path::Path,
    sync::{
        atomic::{
            AtomicBool, AtomicU64,
            Ordering::{Acquire, Relaxed, Release},
        },
        Arc, Mutex, MutexGuard,
    },
};

use bytes::Bytes;
use prost::Message;
use weir_proto::{
    cloudevents::v1::CloudEvent,
    outbox::v1::{record::Kind, Accepted, Checkpoint, Outcome, Record, Target, Update},
};

use super::log::{self, Appender, LogError, Options};

/// Why the outbox could not open or record.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("outbox record {index} does not decode: {source}; the files are left as they are")]
    Decode {
        index: usize,
        source: prost::DecodeError,
    },
    #[error("the outbox writer could not start: {0}")]
    Thread(std::io::Error),
}

/// Where a published event comes from: the publish's trace context and
/// the publishing service (`namespace/name`), each "" when unknown.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin<'a> {
    pub traceparent: &'a str,
    pub tracestate: &'a str,
    pub publisher: &'a str,
}

/// An accepted event, shared by its deliveries.
#[derive(Debug)]
pub struct Stored {
    pub seq: u64,
    pub namespace: String,
    pub topic: String,
    pub event: CloudEvent,
    pub traceparent: String,
    /// The publish's caller's W3C `tracestate`, or "".
    pub tracestate: String,
    /// The publishing service (`namespace/name`), or "".
    pub publisher: String,
    pub accepted_unix_ms: i64,
    /// The size of its record in the log.
    record_bytes: u64,
    /// Its record is in the log (fsync'd, when durable): only then is it
    /// delivered. Records are written in batches from several threads,
    /// so without this a delivery's SENDING marker could reach the log
    /// before the event's own record, and a restart would not know the
    /// delivery may have been made.
    written: AtomicBool,
}

/// Where one delivery stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub target: Target,
    /// Being sent: a SENDING record came last.
    pub sending: bool,
    pub attempts: u32,
    /// Not before this (0: at once).
    pub next_attempt_unix_ms: i64,
    pub last_error: String,
}

/// A delivery that failed for good and was kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    pub delivery: Delivery,
    pub reason: String,
    pub dead_unix_ms: i64,
}

/// A delivery due now, with its event.
#[derive(Clone, Debug)]
pub struct Due {
    pub event: Arc<Stored>,
    pub delivery: Delivery,
}

/// A subscribing service's delivery queue: the service, in the
/// namespace of the events it subscribed to. Services of the same name in
/// two namespaces are two queues, each with its own window and order.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Queue {
    pub namespace: Box<str>,
    pub service: Box<str>,
}

impl Queue {
    pub fn new(namespace: &str, service: &str) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
        }
    }
}

/// A delivery: its queue and its event's seq. An event's targets are
/// services of its own namespace, so (service, seq) alone names a
/// delivery, as the log's records do.
type Key = (Queue, u64);

#[derive(Debug, Default)]
struct State {
    /// Each event with the number of its deliveries pending or dead.
    events: BTreeMap<u64, (Arc<Stored>, usize)>,
    /// By (queue, seq): each queue in publish order.
    pending: BTreeMap<Key, Delivery>,
    dead: BTreeMap<Key, DeadLetter>,
    /// What the held events' records take in the log: a compaction can
    /// gain at most the rest, known without a snapshot.
    live_bytes: u64,
}

impl State {
    /// Adds an accepted event, whose record takes `record_bytes`; one
    /// already known is left as it is (the original record read back
    /// after a checkpoint that holds it).
    fn accept(
        &mut self,
        accepted: Accepted,
        record_bytes: u64,
        written: bool,
    ) -> Option<Arc<Stored>> {
        if self.events.contains_key(&accepted.seq) {
            return None;
        }
        let Accepted {
            seq,
            namespace,
            topic,
            event,
            traceparent,
            accepted_unix_ms,
            targets,
            publisher,
            tracestate,
        } = accepted;
        let refs = targets.len();
        for target in targets {
            self.pending.insert(
                (Queue::new(&namespace, &target.service), seq),
                Delivery {
                    target,
                    sending: false,
                    attempts: 0,
                    next_attempt_unix_ms: 0,
                    last_error: String::new(),
                },
            );
        }
        if refs == 0 {
            return None;
        }
        let stored = Arc::new(Stored {
            seq,
            namespace,
            topic,
            event: owned(event.unwrap_or_default()),
            traceparent,
            tracestate,
            publisher,
            accepted_unix_ms,
            record_bytes,
            written: AtomicBool::new(written),
        });
        self.live_bytes += record_bytes;
        self.events.insert(seq, (stored.clone(), refs));
        Some(stored)
    }

    fn apply(&mut self, u: &Update) {
        // Every delivery's event is held until its last delivery is
        // resolved: one not held has nothing left to update.
        let Some((event, _)) = self.events.get(&u.seq) else {
            return;
        };
        let key: Key = (Queue::new(&event.namespace, &u.service), u.seq);
        match Outcome::try_from(u.outcome).unwrap_or(Outcome::Unspecified) {
            Outcome::Sending => {
                if let Some(d) = self.pending.get_mut(&key) {
                    d.sending = true;
                }
            }
            Outcome::Attempted => {
                if let Some(d) = self.pending.get_mut(&key) {
                    d.sending = false;
                    d.attempts = u.attempts;
                    d.next_attempt_unix_ms = u.next_attempt_unix_ms;
                    d.last_error.clone_from(&u.error);
                }
            }
            Outcome::Delivered | Outcome::Dropped => {
                if self.pending.remove(&key).is_some() {
                    self.release(u.seq);
                }
            }
            Outcome::Dead => {
                if let Some(mut d) = self.pending.remove(&key) {
                    d.attempts = u.attempts;
                    self.dead.insert(
                        key,
                        DeadLetter {
                            delivery: d,
                            reason: u.error.clone(),
                            dead_unix_ms: u.at_unix_ms,
                        },
                    );
                }
            }
            Outcome::Replayed => {
                if let Some(dead) = self.dead.remove(&key) {
                    let mut d = dead.delivery;
                    d.sending = false;
                    d.attempts = 0;
                    d.next_attempt_unix_ms = 0;
                    d.last_error.clear();
                    // A replay has the policy's whole age again.
                    d.target.deadline_unix_ms = u.next_attempt_unix_ms;
                    self.pending.insert(key, d);
                }
            }
            Outcome::Purged => {
                if self.dead.remove(&key).is_some() {
                    self.release(u.seq);
                }
            }
            Outcome::Unspecified => {}
        }
    }

    /// Takes back an event whose record could not be written.
    fn forget(&mut self, seq: u64) {
        if let Some((e, _)) = self.events.remove(&seq) {
            self.live_bytes -= e.record_bytes;
            self.pending.retain(|(_, s), _| *s != seq);
        }
    }

    /// The whole state as records, after a checkpoint: each event with the
    /// targets it still has, then where each of those stands.
    fn snapshot(&self, next_seq: u64) -> Vec<Bytes> {
        let mut targets: BTreeMap<u64, Vec<Target>> = BTreeMap::new();
        let mut updates = Vec::new();
        for ((Queue { service, .. }, seq), d) in &self.pending {
            targets.entry(*seq).or_default().push(d.target.clone());
            if d.sending {
                updates.push(Update {
                    seq: *seq,
                    service: service.to_string(),
                    outcome: Outcome::Sending as i32,
                    attempts: d.attempts,
                    next_attempt_unix_ms: 0,
                    error: String::new(),
                    at_unix_ms: 0,
                });
            }
            if d.attempts > 0 {
                updates.push(Update {
                    seq: *seq,
                    service: service.to_string(),
                    outcome: Outcome::Attempted as i32,
                    attempts: d.attempts,
                    next_attempt_unix_ms: d.next_attempt_unix_ms,
                    error: d.last_error.clone(),
                    at_unix_ms: 0,
                });
            }
        }
        for ((Queue { service, .. }, seq), dead) in &self.dead {
            targets
                .entry(*seq)
                .or_default()
                .push(dead.delivery.target.clone());
            updates.push(Update {
                seq: *seq,
                service: service.to_string(),
                outcome: Outcome::Dead as i32,
                attempts: dead.delivery.attempts,
                next_attempt_unix_ms: 0,
                error: dead.reason.clone(),
                at_unix_ms: dead.dead_unix_ms,
            });
        }
        let mut out = vec![encode(Kind::Checkpoint(Checkpoint { next_seq }))];
        for (seq, targets) in targets {
            let Some((e, _)) = self.events.get(&seq) else {
                continue;
            };
            out.push(encode(Kind::Accepted(Accepted {
                seq,
                namespace: e.namespace.clone(),
                topic: e.topic.clone(),
                event: Some(e.event.clone()),
                traceparent: e.traceparent.clone(),
                accepted_unix_ms: e.accepted_unix_ms,
                targets,
                publisher: e.publisher.clone(),
                tracestate: e.tracestate.clone(),
            })));
        }
        out.extend(updates.into_iter().map(|u| encode(Kind::Update(u))));
        out
    }

    /// One delivery of `seq` is resolved: the event goes with its last.
    fn release(&mut self, seq: u64) {
        if let Some((_, refs)) = self.events.get_mut(&seq) {
            *refs -= 1;
            if *refs == 0 {
                if let Some((e, _)) = self.events.remove(&seq) {
                    self.live_bytes -= e.record_bytes;
                }
            }
        }
    }
}

/// `event` with bytes of its own. Decoded bytes fields are slices of the
/// buffer they were read from (hyper's and tonic's receive buffers, a
/// whole log segment read back at start), and a held slice keeps all of
/// it alive: 200,000 held events of 1 KiB took 1.6 GB. A held event
/// copies its payload (and any bytes attribute) out instead.
fn owned(mut event: CloudEvent) -> CloudEvent {
    use weir_proto::cloudevents::v1::cloud_event::{cloud_event_attribute_value::Attr, Data};
    if let Some(Data::BinaryData(b)) = &mut event.data {
        *b = Bytes::copy_from_slice(b);
    }
    for value in event.attributes.values_mut() {
        if let Some(Attr::CeBytes(b)) = &mut value.attr {
            *b = Bytes::copy_from_slice(b);
        }
    }
    event
}

/// What [`Outbox::open`] read back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub events: usize,
    pub pending: usize,
    pub dead: usize,
    /// Deliveries that were being sent when the agent stopped: their
    /// redelivery may be a duplicate.
    pub unproven: usize,
    /// Bytes of a torn tail cut off.
    pub truncated: u64,
}

/// The outbox: records through the log's writer, state in memory.
#[derive(Debug)]
pub struct Outbox {
    appender: Appender,
    max_bytes: u64,
    /// Shared with a compaction's snapshot, taken on the log's thread.
    state: Arc<Mutex<State>>,
    next_seq: Arc<AtomicU64>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode(kind: Kind) -> Bytes {
    Bytes::from(Record { kind: Some(kind) }.encode_to_vec())
}

impl Outbox {
    /// Opens the outbox in `dir` and rebuilds its state from the log.
    pub fn open(dir: &Path, options: Options) -> Result<(Self, Opened), OutboxError> {
        let (log, recovered) = log::Log::open(dir, options)?;
        let mut state = State::default();
        let mut next_seq = 1;
        for (index, bytes) in recovered.records.into_iter().enumerate() {
            let size = bytes.len() as u64;
            let record =
                Record::decode(bytes).map_err(|source| OutboxError::Decode { index, source })?;
            match record.kind {
                Some(Kind::Accepted(a)) => {
                    next_seq = next_seq.max(a.seq + 1);
                    state.accept(a, size, true);
                }
                Some(Kind::Update(u)) => state.apply(&u),
                Some(Kind::Checkpoint(c)) => {
                    // What follows is the whole state.
                    state = State::default();
                    next_seq = next_seq.max(c.next_seq);
                }
                None => {}
            }
        }
        let unproven = state.pending.values().filter(|d| d.sending).count();
        // Sent again from the start, like any pending delivery.
        for d in state.pending.values_mut() {
            d.sending = false;
        }
        let opened = Opened {
            events: state.events.len(),
            pending: state.pending.len(),
            dead: state.dead.len(),
            unproven,
            truncated: recovered.truncated,
        };
        let (appender, _thread) = log::spawn(log).map_err(OutboxError::Thread)?;
        Ok((
            Self {
                appender,
                max_bytes: options.max_bytes,
                state: Arc::new(Mutex::new(state)),
                next_seq: Arc::new(AtomicU64::new(next_seq)),
            },
            opened,
        ))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Accepts `event` for `targets`; with `durable`, returns only once it
    /// is on disk (group commit). Its sequence number.
    pub async fn accept(
        &self,
        namespace: &str,
        topic: &str,
        event: CloudEvent,
        origin: Origin<'_>,
        targets: Vec<Target>,
        durable: bool,
    ) -> Result<u64, OutboxError> {
        let seq = self.next_seq.fetch_add(1, Relaxed);
        let accepted = Accepted {
            seq,
            namespace: namespace.to_owned(),
            topic: topic.to_owned(),
            event: Some(event),
            traceparent: origin.traceparent.to_owned(),
            accepted_unix_ms: weir_core::time::now_unix_ms(),
            targets,
            publisher: origin.publisher.to_owned(),
            tracestate: origin.tracestate.to_owned(),
        };
        // `Record { accepted }` encoded from a borrow (field 1 of the
        // oneof), so the event is not copied before it moves into the
        // state.
        let mut buf = Vec::with_capacity(accepted.encoded_len() + 6);
        prost::encoding::message::encode(1, &accepted, &mut buf);
        let bytes = Bytes::from(buf);
        // In the state before the log, so a compaction that runs while
        // this is being written holds it (see `compact`).
        let stored = self.state().accept(accepted, bytes.len() as u64, false);
        // Run by the log once the record is written, even if this
        // publish is dropped meanwhile (its publisher went away).
        let state = self.state.clone();
        let done: log::Done = Box::new(move |written| match (stored, written) {
            (Some(stored), true) => stored.written.store(true, Release),
            (_, false) => lock(&state).forget(seq),
            (None, true) => {}
        });
        if let Err(e) = self
            .appender
            .append_then(vec![bytes], durable, Some(done))
            .await
        {
            self.state().forget(seq);
            return Err(e.into());
        }
        Ok(seq)
    }

    /// Records what happened to a delivery (written with the next group,
    /// not waited on).
    pub async fn update(&self, update: Update) -> Result<(), OutboxError> {
        self.update_all(vec![update]).await
    }

    /// Records several outcomes with one hand-over to the writer (a
    /// scheduler window's markers), in order.
    pub async fn update_all(&self, updates: Vec<Update>) -> Result<(), OutboxError> {
        if updates.is_empty() {
            return Ok(());
        }
        {
            let mut state = self.state();
            for u in &updates {
                state.apply(u);
            }
        }
        let records = updates
            .into_iter()
            .map(|u| encode(Kind::Update(u)))
            .collect();
        self.appender.append(records, false).await?;
        Ok(())
    }

    /// Up to `limit` of `queue`'s deliveries due at `now`, in publish
    /// order, but for those `in_flight` (by seq); of deliveries with the
    /// same ordering key only the oldest, so one that keeps failing (or is
    /// in flight) holds back its own key and no other.
    pub fn due(
        &self,
        queue: &Queue,
        now_unix_ms: i64,
        limit: usize,
        in_flight: &HashSet<u64>,
    ) -> Vec<Due> {
        let state = self.state();
        let mut keys_seen: HashSet<&str> = HashSet::new();
        let mut out = Vec::with_capacity(limit.min(state.pending.len()));
        let from: Key = (queue.clone(), 0);
        for ((q, seq), d) in state.pending.range(from..) {
            if q != queue || out.len() >= limit {
                break;
            }
            let key = d.target.ordering_key.as_str();
            let first_of_key = key.is_empty() || keys_seen.insert(key);
            if first_of_key && d.next_attempt_unix_ms <= now_unix_ms && !in_flight.contains(seq) {
                // One not yet written holds back its key like one not due.
                if let Some((event, _)) = state.events.get(seq) {
                    if event.written.load(Acquire) {
                        out.push(Due {
                            event: event.clone(),
                            delivery: d.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The queues with deliveries pending.
    pub fn pending_queues(&self) -> Vec<Queue> {
        let state = self.state();
        let mut out: Vec<Queue> = Vec::new();
        let mut at = state.pending.keys().next().map(|(q, _)| q.clone());
        // One step per queue, not per delivery.
        while let Some(queue) = at {
            at = state
                .pending
                .range((queue.clone(), u64::MAX)..)
                .find(|((q, _), _)| *q != queue)
                .map(|((q, _), _)| q.clone());
            out.push(queue);
        }
        out
    }

    /// Whether `queue` has deliveries pending (due or not).
    pub fn has_pending(&self, queue: &Queue) -> bool {
        let from: Key = (queue.clone(), 0);
        self.state()
            .pending
            .range(from..)
            .next()
            .is_some_and(|((q, _), _)| q == queue)
    }

    /// `queue`'s dead letters, in publish order.
    pub fn dead_letters(&self, queue: &Queue) -> Vec<(Arc<Stored>, DeadLetter)> {
        let state = self.state();
        let from: Key = (queue.clone(), 0);
        state
            .dead
            .range(from..)
            .take_while(|((q, _), _)| q == queue)
            .filter_map(|((_, seq), d)| Some((state.events.get(seq)?.0.clone(), d.clone())))
            .collect()
    }

    /// Every dead letter: (service, event, where it stands), by queue and
    /// publish order.
    pub fn all_dead_letters(&self) -> Vec<(Box<str>, Arc<Stored>, DeadLetter)> {
        let state = self.state();
        state
            .dead
            .iter()
            .filter_map(|((q, seq), d)| {
                Some((
                    q.service.clone(),
                    state.events.get(seq)?.0.clone(),
                    d.clone(),
                ))
            })
            .collect()
    }

    /// When the oldest event still held was accepted (unix ms).
    pub fn oldest_accepted_unix_ms(&self) -> Option<i64> {
        let state = self.state();
        state
            .events
            .values()
            .next()
            .map(|(e, _)| e.accepted_unix_ms)
    }

    /// (events held, deliveries pending, dead letters).
    pub fn depth(&self) -> (usize, usize, usize) {
        let state = self.state();
        (state.events.len(), state.pending.len(), state.dead.len())
    }

    /// Compacts the log when it holds more than `min_bytes` and at least
    /// twice what the live state takes: the state is written after a
    /// checkpoint to a fresh segment and the older segments are deleted.
    /// `true` when it compacted.
    ///
    /// Consistent without stopping appenders for long: events and
    /// updates enter the state before their records are written, and the
    /// snapshot is taken under the log's lock, so every record already
    /// written is reflected in it and every later one follows the
    /// checkpoint; a change in the snapshot whose record is written after
    /// it is read back as a repeat, which changes nothing (an event
    /// already known is kept as is; an update is applied again to the
    /// same effect). Whether it is worth it is judged from the held
    /// events' record sizes, without a snapshot.
    pub async fn compact(&self, min_bytes: u64) -> Result<bool, OutboxError> {
        let used = self.appender.stats().used_bytes.load(Relaxed);
        if used <= min_bytes {
            return Ok(false);
        }
        let live = self.state().live_bytes;
        if live.saturating_mul(2) > used {
            return Ok(false);
        }
        let (state, next_seq) = (self.state.clone(), self.next_seq.clone());
        self.appender
            .checkpoint(move || lock(&state).snapshot(next_seq.load(Relaxed)))
            .await?;
        tracing::info!(
            before = used,
            after = self.appender.stats().used_bytes.load(Relaxed),
            "outbox compacted"
        );
        Ok(true)
    }

    /// Bytes the log takes now.
    pub fn used_bytes(&self) -> u64 {
        self.appender.stats().used_bytes.load(Relaxed)
    }

    /// The quota for durable appends.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    pub fn log_stats(&self) -> &Arc<log::LogStats> {
        self.appender.stats()
    }
}

#[cfg(test)]
mod tests {
    use weir_proto::cloudevents::v1::cloud_event::{
        cloud_event_attribute_value::Attr, CloudEventAttributeValue,
    };

    use super::*;

    fn event(id: &str, key: &str) -> CloudEvent {
        let mut e = CloudEvent {
            id: id.into(),
            source: "/tests".into(),
            spec_version: "1.0".into(),
            r#type: "com.example.t".into(),
            ..CloudEvent::default()
        };
        if !key.is_empty() {
            e.attributes.insert(
                "partitionkey".into(),
                CloudEventAttributeValue {
                    attr: Some(Attr::CeString(key.into())),
                },
            );
        }
        e
    }

    fn target(service: &str, key: &str) -> Target {
        Target {
            service: service.into(),
            deadline_unix_ms: i64::MAX,
            max_attempts: 5,
            dead_letter: true,
            ordering_key: key.into(),
            compensation_topic: String::new(),
        }
    }

    fn update(seq: u64, service: &str, outcome: Outcome) -> Update {
        Update {
            seq,
            service: service.into(),
            outcome: outcome as i32,
            attempts: 1,
            next_attempt_unix_ms: 0,
            error: String::new(),
            at_unix_ms: 1,
        }
    }

    /// `service`'s queue in the tests' namespace.
    fn q(service: &str) -> Queue {
        Queue::new("default", service)
    }

    fn ids(due: &[Due]) -> Vec<&str> {
        due.iter().map(|d| d.event.event.id.as_str()).collect()
    }

    #[tokio::test]
    async fn accepted_events_survive_a_restart_until_every_service_has_them() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, opened) = Outbox::open(dir.path(), Options::default()).expect("opens");
        assert_eq!(opened, Opened::default());
        let mut seqs = Vec::new();
        for n in 0..3 {
            let seq = outbox
                .accept(
                    "default",
                    "orders",
                    event(&format!("e{n}"), ""),
                    Origin {
                        traceparent: "00-abc-def-01",
                        tracestate: "",
                        publisher: "",
                    },
                    vec![target("billing", ""), target("audit", "")],
                    true,
                )
                .await
                .expect("accepted");
            seqs.push(seq);
        }
        outbox
            .update(update(seqs[0], "billing", Outcome::Delivered))
            .await
            .expect("recorded");
        for svc in ["billing", "audit"] {
            outbox
                .update(update(seqs[1], svc, Outcome::Delivered))
                .await
                .expect("recorded");
        }
        // Every update above was written before it was answered.
        drop(outbox);
        let (outbox, opened) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!(opened.events, 2, "e1 reached both and is gone");
        assert_eq!(
            ids(&outbox.due(&q("billing"), 0, 10, &HashSet::new())),
            ["e2"]
        );
        assert_eq!(
            ids(&outbox.due(&q("audit"), 0, 10, &HashSet::new())),
            ["e0", "e2"]
        );
        let due = outbox.due(&q("audit"), 0, 10, &HashSet::new());
        assert_eq!(due[0].event.traceparent, "00-abc-def-01");
        assert_eq!(due[0].event.topic, "orders");
        // New events continue the sequence.
        let next = outbox
            .accept(
                "default",
                "orders",
                event("e3", ""),
                Origin::default(),
                vec![target("audit", "")],
                true,
            )
            .await
            .expect("accepted");
        assert!(next > seqs[2]);
    }

    #[tokio::test]
    async fn attempts_dead_letters_replays_and_purges_are_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let seq = outbox
            .accept(
                "default",
                "t",
                event("e0", ""),
                Origin::default(),
                vec![target("billing", "")],
                true,
            )
            .await
            .expect("accepted");
        let mut tried = update(seq, "billing", Outcome::Attempted);
        tried.attempts = 2;
        tried.next_attempt_unix_ms = 5_000;
        tried.error = "503".into();
        outbox.update(tried).await.expect("recorded");
        assert!(
            outbox
                .due(&q("billing"), 4_999, 10, &HashSet::new())
                .is_empty(),
            "not before its time"
        );
        let due = outbox.due(&q("billing"), 5_000, 10, &HashSet::new());
        assert_eq!(due[0].delivery.attempts, 2);
        assert_eq!(due[0].delivery.last_error, "503");
        let mut dead = update(seq, "billing", Outcome::Dead);
        dead.error = "5 attempts".into();
        outbox.update(dead).await.expect("recorded");
        drop(outbox);
        let (outbox, opened) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!((opened.pending, opened.dead), (0, 1));
        let letters = outbox.dead_letters(&q("billing"));
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].1.reason, "5 attempts");
        assert_eq!(letters[0].0.event.id, "e0", "with its original id");
        let mut replay = update(seq, "billing", Outcome::Replayed);
        replay.next_attempt_unix_ms = 99_000;
        outbox.update(replay).await.expect("recorded");
        let due = outbox.due(&q("billing"), 0, 10, &HashSet::new());
        assert_eq!(ids(&due), ["e0"]);
        assert_eq!(due[0].delivery.attempts, 0);
        assert_eq!(due[0].delivery.target.deadline_unix_ms, 99_000);
        outbox
            .update(update(seq, "billing", Outcome::Dead))
            .await
            .expect("recorded");
        outbox
            .update(update(seq, "billing", Outcome::Purged))
            .await
            .expect("recorded");
        assert_eq!(outbox.depth(), (0, 0, 0), "purged: nothing held");
    }

    #[tokio::test]
    async fn an_event_is_due_once_written_even_if_its_publish_is_dropped() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let mut publish = Box::pin(outbox.accept(
            "default",
            "t",
            event("e1", ""),
            Origin::default(),
            vec![target("billing", "")],
            true,
        ));
        let polled = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(publish.as_mut(), cx))
        })
        .await;
        assert!(polled.is_pending(), "waits for its fsync");
        assert!(
            outbox.due(&q("billing"), 0, 10, &HashSet::new()).is_empty(),
            "not delivered before its record is written"
        );
        // The publisher goes away; the record is written all the same.
        drop(publish);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while outbox.due(&q("billing"), 0, 10, &HashSet::new()).is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "never became due");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(
            ids(&outbox.due(&q("billing"), 0, 10, &HashSet::new())),
            ["e1"]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_racing_compactions_are_all_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let outbox = Arc::new(outbox);
        let publishing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // Each publisher keeps one event of two and resolves the other,
        // so the log keeps growing past what is live.
        let publishers: Vec<_> = (0..4)
            .map(|p| {
                let outbox = outbox.clone();
                tokio::spawn(async move {
                    for n in 0..150 {
                        for (id, kept) in
                            [(format!("p{p}-{n}"), true), (format!("x{p}-{n}"), false)]
                        {
                            let seq = outbox
                                .accept(
                                    "default",
                                    "t",
                                    event(&id, ""),
                                    Origin::default(),
                                    vec![target("billing", "")],
                                    n % 2 == 0,
                                )
                                .await
                                .expect("accepted");
                            if !kept {
                                outbox
                                    .update(update(seq, "billing", Outcome::Delivered))
                                    .await
                                    .expect("recorded");
                            }
                        }
                    }
                })
            })
            .collect();
        let compactor = {
            let (outbox, publishing) = (outbox.clone(), publishing.clone());
            tokio::spawn(async move {
                let mut compactions = 0;
                while publishing.load(Relaxed) {
                    compactions += usize::from(outbox.compact(0).await.expect("compacts"));
                    tokio::task::yield_now().await;
                }
                compactions
            })
        };
        for p in publishers {
            p.await.expect("publisher");
        }
        publishing.store(false, Relaxed);
        let compactions = compactor.await.expect("compactor");
        assert!(compactions > 0, "no compaction ran while publishing");
        let mut expected: Vec<String> = (0..4)
            .flat_map(|p| (0..150).map(move |n| format!("p{p}-{n}")))
            .collect();
        expected.sort();
        let held = |o: &Outbox| {
            let mut got: Vec<String> = ids(&o.due(&q("billing"), 0, 10_000, &HashSet::new()))
                .into_iter()
                .map(str::to_owned)
                .collect();
            got.sort();
            got
        };
        assert_eq!(held(&outbox), expected);
        drop(outbox);
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!(held(&outbox), expected, "read back after compactions");
    }

    #[tokio::test]
    async fn compaction_keeps_what_is_live_and_a_crash_midway_changes_nothing() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let mut seqs = Vec::new();
        for n in 0..50 {
            let targets = vec![target("billing", ""), target("audit", "")];
            let seq = outbox
                .accept(
                    "default",
                    "t",
                    event(&format!("e{n}"), ""),
                    Origin::default(),
                    targets,
                    false,
                )
                .await
                .expect("accepted");
            seqs.push(seq);
        }
        for seq in &seqs[..45] {
            for svc in ["billing", "audit"] {
                outbox
                    .update(update(*seq, svc, Outcome::Delivered))
                    .await
                    .expect("recorded");
            }
        }
        let mut tried = update(seqs[45], "audit", Outcome::Attempted);
        tried.attempts = 3;
        tried.next_attempt_unix_ms = 7;
        outbox.update(tried).await.expect("recorded");
        outbox
            .update(update(seqs[46], "billing", Outcome::Dead))
            .await
            .expect("recorded");
        let segment = |d: &Path| {
            let mut s: Vec<_> = std::fs::read_dir(d)
                .expect("dir")
                .map(|e| e.expect("entry").path())
                .collect();
            s.sort();
            s
        };
        let old = segment(dir.path()).pop().expect("a segment");
        let old_bytes = std::fs::read(&old).expect("read");
        let before = outbox.log_stats().used_bytes.load(Relaxed);
        assert!(
            outbox.compact(0).await.expect("compacts"),
            "mostly resolved"
        );
        let after = outbox.log_stats().used_bytes.load(Relaxed);
        assert!(after * 2 < before, "{before} -> {after}");
        assert_eq!(segment(dir.path()).len(), 1, "the old segment is gone");
        assert!(
            !outbox.compact(0).await.expect("no need"),
            "nothing to gain now"
        );
        let expect = |o: &Outbox| {
            assert_eq!(o.depth(), (5, 9, 1));
            assert_eq!(
                ids(&o.due(&q("audit"), 0, 10, &HashSet::new())),
                ["e46", "e47", "e48", "e49"]
            );
            let due = o.due(&q("audit"), 7, 10, &HashSet::new());
            assert_eq!(due[0].delivery.attempts, 3);
            assert_eq!(
                ids(&o.due(&q("billing"), 0, 10, &HashSet::new())),
                ["e45", "e47", "e48", "e49"]
            );
            assert_eq!(o.dead_letters(&q("billing"))[0].0.event.id, "e46");
        };
        expect(&outbox);
        // Writing goes on after the checkpoint.
        let late = outbox
            .accept(
                "default",
                "t",
                event("e50", ""),
                Origin::default(),
                vec![target("audit", "")],
                true,
            )
            .await
            .expect("accepted");
        assert!(late > seqs[49]);
        drop(outbox);
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!(
            ids(&outbox.due(&q("audit"), 0, 10, &HashSet::new())).last(),
            Some(&"e50")
        );
        outbox
            .update(update(late, "audit", Outcome::Delivered))
            .await
            .expect("recorded");
        expect(&outbox);
        drop(outbox);
        // A crash after the checkpoint, before the old segment was deleted.
        let name = old.file_name().expect("name").to_owned();
        std::fs::write(dir.path().join(name), old_bytes).expect("restore");
        assert_eq!(segment(dir.path()).len(), 2);
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        expect(&outbox);
    }

    #[tokio::test]
    async fn deliveries_being_sent_at_a_stop_are_counted_as_possible_duplicates() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let mut seqs = Vec::new();
        for n in 0..3 {
            seqs.push(
                outbox
                    .accept(
                        "default",
                        "t",
                        event(&format!("e{n}"), ""),
                        Origin::default(),
                        vec![target("s", "")],
                        true,
                    )
                    .await
                    .expect("accepted"),
            );
        }
        // e0 sent and delivered; e1 being sent; e2 sent and failed.
        for seq in [seqs[0], seqs[1], seqs[2]] {
            outbox
                .update(update(seq, "s", Outcome::Sending))
                .await
                .expect("recorded");
        }
        outbox
            .update(update(seqs[0], "s", Outcome::Delivered))
            .await
            .expect("recorded");
        outbox
            .update(update(seqs[2], "s", Outcome::Attempted))
            .await
            .expect("recorded");
        drop(outbox);
        let (outbox, opened) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!(opened.unproven, 1, "only e1 may have arrived unrecorded");
        assert_eq!(
            ids(&outbox.due(&q("s"), 0, 10, &HashSet::new())),
            ["e1", "e2"]
        );
        assert!(outbox
            .due(&q("s"), 0, 10, &HashSet::new())
            .iter()
            .all(|d| !d.delivery.sending));
    }

    #[tokio::test]
    async fn an_ordering_key_holds_back_only_its_own_events() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let mut seqs = Vec::new();
        for (id, key) in [
            ("a1", "a"),
            ("b1", "b"),
            ("a2", "a"),
            ("n1", ""),
            ("b2", "b"),
        ] {
            seqs.push(
                outbox
                    .accept(
                        "default",
                        "t",
                        event(id, key),
                        Origin::default(),
                        vec![target("s", key)],
                        false,
                    )
                    .await
                    .expect("accepted"),
            );
        }
        assert_eq!(
            ids(&outbox.due(&q("s"), 0, 10, &HashSet::new())),
            ["a1", "b1", "n1"]
        );
        // a1 keeps failing: a2 waits; b moves on.
        let mut tried = update(seqs[0], "s", Outcome::Attempted);
        tried.next_attempt_unix_ms = 1_000;
        outbox.update(tried).await.expect("recorded");
        outbox
            .update(update(seqs[1], "s", Outcome::Delivered))
            .await
            .expect("recorded");
        assert_eq!(
            ids(&outbox.due(&q("s"), 0, 10, &HashSet::new())),
            ["n1", "b2"]
        );
        assert_eq!(
            ids(&outbox.due(&q("s"), 1_000, 10, &HashSet::new())),
            ["a1", "n1", "b2"]
        );
        assert_eq!(
            ids(&outbox.due(&q("s"), 1_000, 2, &HashSet::new())),
            ["a1", "n1"],
            "bounded"
        );
        // In flight: not due again, and it holds back its key.
        let flying = HashSet::from([seqs[0], seqs[3]]);
        assert_eq!(ids(&outbox.due(&q("s"), 1_000, 10, &flying)), ["b2"]);
    }

    #[tokio::test]
    async fn same_named_services_of_two_namespaces_are_two_queues() {
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        let mut seqs = Vec::new();
        for (namespace, id) in [("shop", "s1"), ("lab", "l1"), ("shop", "s2"), ("lab", "l2")] {
            seqs.push(
                outbox
                    .accept(
                        namespace,
                        "t",
                        event(id, "k"),
                        Origin::default(),
                        vec![target("billing", "k")],
                        true,
                    )
                    .await
                    .expect("accepted"),
            );
        }
        let (shop, lab) = (Queue::new("shop", "billing"), Queue::new("lab", "billing"));
        assert_eq!(outbox.pending_queues(), [lab.clone(), shop.clone()]);
        // Each has its own order: shop's s1 failing holds back s2, not l1.
        let mut failed = update(seqs[0], "billing", Outcome::Attempted);
        failed.next_attempt_unix_ms = 1_000;
        outbox.update(failed).await.expect("recorded");
        assert!(outbox.due(&shop, 0, 10, &HashSet::new()).is_empty());
        assert_eq!(ids(&outbox.due(&lab, 0, 10, &HashSet::new())), ["l1"]);
        // An update names the service; the event says which namespace.
        outbox
            .update(update(seqs[1], "billing", Outcome::Delivered))
            .await
            .expect("recorded");
        assert_eq!(ids(&outbox.due(&lab, 0, 10, &HashSet::new())), ["l2"]);
        assert_eq!(ids(&outbox.due(&shop, 1_000, 10, &HashSet::new())), ["s1"]);
        // And so after a restart.
        drop(outbox);
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("reopens");
        assert_eq!(ids(&outbox.due(&lab, 0, 10, &HashSet::new())), ["l2"]);
        assert_eq!(ids(&outbox.due(&shop, 1_000, 10, &HashSet::new())), ["s1"]);
        assert!(outbox.has_pending(&shop) && !outbox.has_pending(&q("billing")));
    }

    #[tokio::test]
    async fn a_held_event_does_not_keep_the_buffer_it_was_read_from() {
        use weir_proto::cloudevents::v1::cloud_event::Data;
        let dir = tempfile::tempdir().expect("tmp");
        let (outbox, _) = Outbox::open(dir.path(), Options::default()).expect("opens");
        // As a receive buffer holds many requests: the event's data is a
        // slice of it.
        let received = Bytes::from(vec![7u8; 64 << 10]);
        let mut e = event("e1", "");
        e.data = Some(Data::BinaryData(received.slice(1024..2048)));
        outbox
            .accept(
                "default",
                "t",
                e,
                Origin::default(),
                vec![target("s", "")],
                false,
            )
            .await
            .expect("accepted");
        let due = outbox.due(&q("s"), 0, 10, &HashSet::new());
        let Some(Data::BinaryData(held)) = &due[0].event.event.data else {
            panic!("the data is gone: {:?}", due[0].event.event.data);
        };
        assert_eq!(held, &received.slice(1024..2048));
        let within = received.as_ptr_range();
        assert!(
            !within.contains(&held.as_ptr()),
            "the held event shares the 64 KiB buffer it came in"
        );
    }
}
