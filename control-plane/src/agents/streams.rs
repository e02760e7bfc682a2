//! The agent streams open on this replica, and the requests waiting on
//! them for a reply.
//!
//! Each stream has a pending map, request id -> the waiter. A request is
//! sent down the stream and its waiter parked in the map; the agent's
//! reply (matched by id) wakes it. The entry leaves the map when the reply
//! comes, when the waiter gives up (deadline, or its caller went away: a
//! guard removes it on drop), and with the whole map when the stream
//! closes (every waiter then learns the stream is gone). At most
//! [`MAX_IN_FLIGHT`] requests wait on one agent; more are refused at once.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
};

use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tonic::Status;
use weir_proto::agent::v1::{
    agent_request, control_message, AgentReply, AgentRequest, ControlMessage,
};

/// Requests that may wait on one agent at a time.
pub const MAX_IN_FLIGHT: usize = 16;

/// Why a request got no reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AskError {
    #[error("{MAX_IN_FLIGHT} requests already wait on this agent; retry later")]
    Busy,
    #[error("the agent's stream closed before it replied")]
    Closed,
    #[error("the agent did not reply in time")]
    TimedOut,
}

/// The sending side of one agent's open stream.
pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

type Pending = HashMap<u64, oneshot::Sender<AgentReply>>;

/// One open agent stream on this replica.
#[derive(Debug)]
pub struct Stream {
    /// Tells this stream from a later one of the same node.
    id: u64,
    tx: Outbound,
    pending: Mutex<Pending>,
    next_request: AtomicU64,
}

/// Removes a waiter's entry when it stops waiting, however it stops.
struct Waiting<'a> {
    stream: &'a Stream,
    request_id: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.stream.pending().remove(&self.request_id);
    }
}

impl Stream {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `body` to the agent and waits for its reply until `deadline`.
    pub async fn ask(
        &self,
        body: agent_request::Body,
        deadline: Instant,
    ) -> Result<AgentReply, AskError> {
        let request_id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        {
            let mut pending = self.pending();
            if pending.len() >= MAX_IN_FLIGHT {
                return Err(AskError::Busy);
            }
            pending.insert(request_id, reply);
        }
        let _waiting = Waiting {
            stream: self,
            request_id,
        };
        let message = ControlMessage {
            kind: Some(control_message::Kind::Request(AgentRequest {
                request_id,
                body: Some(body),
            })),
        };
        let exchange = async {
            self.tx
                .send(Ok(message))
                .await
                .map_err(|_| AskError::Closed)?;
            answer.await.map_err(|_| AskError::Closed)
        };
        tokio::time::timeout_at(deadline, exchange)
            .await
            .map_err(|_| AskError::TimedOut)?
    }

    /// Sends `message` down the stream unless its buffer is full (the
    /// agent is not reading): for what is sent again soon anyway.
    pub fn send(&self, message: ControlMessage) -> bool {
        self.tx.try_send(Ok(message)).is_ok()
    }

    /// Hands a reply to its waiter; false when none waits for it (it gave
    /// up, or the id is unknown).
    pub fn answer(&self, reply: AgentReply) -> bool {
        match self.pending().remove(&reply.request_id) {
            Some(waiter) => waiter.send(reply).is_ok(),
            None => false,
        }
    }

    /// Requests waiting now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.pending().len()
    }
}

/// This replica's open agent streams, by node. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct LocalStreams {
    inner: Arc<Mutex<HashMap<String, Arc<Stream>>>>,
    next_id: Arc<AtomicU64>,
}

impl LocalStreams {
    fn map(&self) -> MutexGuard<'_, HashMap<String, Arc<Stream>>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers the stream `tx` of `node`, in place of an older one.
    pub fn open(&self, node: &str, tx: Outbound) -> Arc<Stream> {
        let stream = Arc::new(Stream {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
        });
        self.map().insert(node.to_owned(), stream.clone());
        stream
    }

    /// Forgets `stream` of `node` (not a newer one that replaced it) and
    /// wakes its waiters with [`AskError::Closed`].
    pub fn close(&self, node: &str, stream: &Stream) {
        {
            let mut map = self.map();
            if map.get(node).is_some_and(|s| s.id == stream.id) {
                map.remove(node);
            }
        }
        stream.pending().clear();
    }

    /// The open stream of `node` on this replica.
    pub fn get(&self, node: &str) -> Option<Arc<Stream>> {
        self.map().get(node).cloned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use weir_proto::agent::v1::{agent_reply, AgentDescription, DescribeRequest};

    use super::*;

    fn describe() -> agent_request::Body {
        agent_request::Body::Describe(DescribeRequest {})
    }

    fn reply(request_id: u64) -> AgentReply {
        AgentReply {
            request_id,
            body: Some(agent_reply::Body::Describe(AgentDescription {
                services: 3,
                ..AgentDescription::default()
            })),
        }
    }

    /// The request id of the next request the agent receives.
    async fn received(rx: &mut mpsc::Receiver<Result<ControlMessage, Status>>) -> u64 {
        match rx.recv().await {
            Some(Ok(ControlMessage {
                kind: Some(control_message::Kind::Request(r)),
            })) => r.request_id,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_reaches_the_request_with_its_id() {
        let streams = LocalStreams::default();
        let (tx, mut rx) = mpsc::channel(8);
        let stream = streams.open("n1", tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        let (a, b) = (stream.clone(), stream.clone());
        let first = tokio::spawn(async move { a.ask(describe(), deadline).await });
        let second = tokio::spawn(async move { b.ask(describe(), deadline).await });
        let (x, y) = (received(&mut rx).await, received(&mut rx).await);
        assert_ne!(x, y);
        // Answered in the other order, each reaches its own waiter.
        assert!(stream.answer(reply(y)));
        assert!(stream.answer(reply(x)));
        let mut got = [
            first.await.expect("joins").expect("reply").request_id,
            second.await.expect("joins").expect("reply").request_id,
        ];
        got.sort_unstable();
        let mut want = [x, y];
        want.sort_unstable();
        assert_eq!(got, want);
        assert!(!stream.answer(reply(x)), "a second answer has no waiter");
        assert_eq!(stream.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out_and_leaves_no_entry() {
        let streams = LocalStreams::default();
        let (tx, mut rx) = mpsc::channel(8);
        let stream = streams.open("n1", tx);
        let start = Instant::now();
        let asked = stream.ask(describe(), start + Duration::from_millis(300));
        let (result, id) = tokio::join!(asked, received(&mut rx));
        assert_eq!(result, Err(AskError::TimedOut));
        assert_eq!(Instant::now() - start, Duration::from_millis(300));
        assert_eq!(stream.in_flight(), 0, "the entry left with the waiter");
        assert!(!stream.answer(reply(id)), "a late reply is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_bounded() {
        let streams = LocalStreams::default();
        let (tx, _rx) = mpsc::channel(64);
        let stream = streams.open("n1", tx);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut waiting = Vec::new();
        for _ in 0..MAX_IN_FLIGHT {
            let s = stream.clone();
            waiting.push(tokio::spawn(
                async move { s.ask(describe(), deadline).await },
            ));
        }
        tokio::task::yield_now().await;
        while stream.in_flight() < MAX_IN_FLIGHT {
            tokio::task::yield_now().await;
        }
        assert_eq!(stream.ask(describe(), deadline).await, Err(AskError::Busy));
        for w in waiting {
            assert_eq!(w.await.expect("joins"), Err(AskError::TimedOut));
        }
        assert_eq!(stream.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn closing_a_stream_wakes_its_waiters_and_spares_a_newer_stream() {
        let streams = LocalStreams::default();
        let (tx, mut rx) = mpsc::channel(8);
        let old = streams.open("n1", tx);
        let deadline = Instant::now() + Duration::from_secs(60);
        let o = old.clone();
        let waiter = tokio::spawn(async move { o.ask(describe(), deadline).await });
        received(&mut rx).await;
        // The node reconnects on this replica before the old stream's end
        // is noticed.
        let (tx2, _rx2) = mpsc::channel(8);
        let new = streams.open("n1", tx2);
        streams.close("n1", &old);
        assert_eq!(waiter.await.expect("joins"), Err(AskError::Closed));
        assert!(
            streams.get("n1").is_some_and(|s| Arc::ptr_eq(&s, &new)),
            "the newer stream stays"
        );
        streams.close("n1", &new);
        assert!(streams.get("n1").is_none());

        // A stream whose receiver is gone fails the send at once.
        let (tx, rx) = mpsc::channel(8);
        drop(rx);
        let gone = streams.open("n2", tx);
        assert_eq!(gone.ask(describe(), deadline).await, Err(AskError::Closed));
    }
}
