//! Publishing to topics through a node's agent (`weir.events.v1.Publisher`
//! on its ingress port) over one `PublishStream`.
//!
//! [`TopicPublisher`] is cloned freely and used from many tasks at once:
//! their events share one HTTP/2 stream, as a NATS or Kafka client's share
//! one connection, so publishing at a high rate costs a frame per event
//! rather than a request. The agent answers each event in order; each
//! caller gets its own answer. When the stream breaks (the agent
//! restarted, say), the events waiting for an answer fail with
//! [`PublishError::Unknown`] and the next publish opens a new stream.
//!
//! ```no_run
//! # async fn demo() -> Result<(), weir_client::PublishError> {
//! use weir_client::{CloudEvent, TopicPublisher};
//! let publisher = TopicPublisher::connect("http://127.0.0.1:7080").await?;
//! let answer = publisher
//!     .publish(
//!         "orders",
//!         CloudEvent {
//!             id: "o-1".into(),
//!             source: "/shop".into(),
//!             spec_version: "1.0".into(),
//!             r#type: "com.example.order.created".into(),
//!             ..CloudEvent::default()
//!         },
//!     )
//!     .await?;
//! println!("{} reaches {:?}", answer.id, answer.subscribers);
//! # Ok(()) }
//! ```

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    task::{Context, Poll},
};

use tokio::sync::{mpsc, oneshot};
use tonic::transport::{Channel, Endpoint};
use weir_proto::events::v1::{
    publish_stream_response, publisher_client::PublisherClient, PublishRequest,
    PublishStreamResponse,
};

pub use weir_proto::cloudevents::v1::CloudEvent;
pub use weir_proto::events::v1::{PublishRefusal, PublishResponse};

/// Events handed to a stream but not yet read by it, at most (the agent
/// itself works on up to 1,024 of a stream's events at once).
const QUEUED: usize = 1024;

/// Why a publish has no answer.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The agent refused the event: `code` is the gRPC code `Publish`
    /// would have answered, `reason` its `weir-reason`, and
    /// `retry_after_ms`, when not 0, when to try again.
    #[error("the agent refused the event ({}): {}", .0.reason, .0.message)]
    Refused(PublishRefusal),
    /// The stream broke before the event's answer: the agent may or may
    /// not have it. Publishing it again with the same id is safe:
    /// subscribers take events at least once, by (source, id).
    #[error("no answer from the agent ({0}); the event may or may not have been accepted")]
    Unknown(String),
    /// The agent could not be reached (or its address is bad): the event
    /// was not sent.
    #[error("the agent is unavailable: {0}")]
    Unavailable(String),
}

/// Publishes events to topics through one agent; see the [module
/// docs](self).
#[derive(Clone, Debug)]
pub struct TopicPublisher {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: PublisherClient<Channel>,
    namespace: String,
    /// `weir-source` on each stream: the publishing service, for the
    /// agent's telemetry.
    source: Option<tonic::metadata::AsciiMetadataValue>,
    /// The open stream, if any.
    current: Mutex<Option<Session>>,
    /// Held while a stream is being opened, so that concurrent publishers
    /// open one.
    opening: tokio::sync::Mutex<()>,
}

/// One open `PublishStream`.
#[derive(Clone, Debug)]
struct Session {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Job {
    request: PublishRequest,
    answer: oneshot::Sender<Result<PublishResponse, PublishError>>,
}

/// What a stream's request side and its answer reader share.
#[derive(Debug)]
struct Shared {
    closed: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// Events not yet handed to the stream.
    jobs: mpsc::Receiver<Job>,
    /// Who waits for each answer still to come, in request order.
    waiting: VecDeque<oneshot::Sender<Result<PublishResponse, PublishError>>>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The stream ended: every event not answered gets `why`, and no more
    /// are taken.
    fn close(&self, why: &str) {
        self.closed.store(true, Ordering::Release);
        let mut state = self.state();
        state.jobs.close();
        let waiting = std::mem::take(&mut state.waiting);
        let mut unsent = Vec::new();
        while let Ok(job) = state.jobs.try_recv() {
            unsent.push(job.answer);
        }
        drop(state);
        for w in waiting {
            let _ = w.send(Err(PublishError::Unknown(why.to_owned())));
        }
        for w in unsent {
            // Never handed to the stream: certainly not accepted.
            let _ = w.send(Err(PublishError::Unavailable(why.to_owned())));
        }
    }
}

/// The request side of a stream: takes the next event and queues its
/// caller for the answer in the same step, so answers find their callers
/// in order.
struct Requests(Arc<Shared>);

impl tokio_stream::Stream for Requests {
    type Item = PublishRequest;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<PublishRequest>> {
        let mut state = self.0.state();
        match state.jobs.poll_recv(cx) {
            Poll::Ready(Some(job)) => {
                state.waiting.push_back(job.answer);
                Poll::Ready(Some(job.request))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl TopicPublisher {
    /// Connects to the agent at `endpoint` (its ingress, such as
    /// `http://127.0.0.1:7080`), publishing in its default namespace.
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, PublishError> {
        let endpoint = endpoint.into();
        let channel = Endpoint::from_shared(endpoint.clone())
            .map_err(|e| PublishError::Unavailable(format!("invalid endpoint {endpoint:?}: {e}")))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| PublishError::Unavailable(format!("{endpoint}: {e}")))?;
        Ok(Self::new(channel))
    }

    /// Publishes over `channel`, in the agent's default namespace.
    pub fn new(channel: Channel) -> Self {
        Self::with(PublisherClient::new(channel), String::new(), None)
    }

    /// The same agent, publishing in `namespace` (a new stream).
    pub fn in_namespace(&self, namespace: impl Into<String>) -> Self {
        Self::with(
            self.inner.client.clone(),
            namespace.into(),
            self.inner.source.clone(),
        )
    }

    /// The same agent, naming `service` (`name`, or `namespace/name`) as
    /// the publisher (a new stream): the agent's spans and traffic
    /// figures show it as the caller (the `weir-source` header). An
    /// invalid name is [`PublishError::Unavailable`] at once.
    pub fn as_service(&self, service: &str) -> Result<Self, PublishError> {
        let value = service
            .parse()
            .map_err(|_| PublishError::Unavailable(format!("invalid service name {service:?}")))?;
        Ok(Self::with(
            self.inner.client.clone(),
            self.inner.namespace.clone(),
            Some(value),
        ))
    }

    fn with(
        client: PublisherClient<Channel>,
        namespace: String,
        source: Option<tonic::metadata::AsciiMetadataValue>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                namespace,
                source,
                current: Mutex::new(None),
                opening: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// Publishes `event` to `topic`: its answer once the agent accepted it
    /// (after an fsync when the publish is durable).
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        event: CloudEvent,
    ) -> Result<PublishResponse, PublishError> {
        let mut request = PublishRequest {
            namespace: self.inner.namespace.clone(),
            topic: topic.into(),
            event: Some(event),
        };
        // A stream that closed before taking the event: once more on a
        // new one.
        for _ in 0..2 {
            let session = self.session().await?;
            let (answer, answered) = oneshot::channel();
            match session.jobs.send(Job { request, answer }).await {
                Ok(()) => {
                    return answered.await.unwrap_or_else(|_| {
                        Err(PublishError::Unknown("the stream went away".into()))
                    })
                }
                Err(mpsc::error::SendError(job)) => request = job.request,
            }
        }
        Err(PublishError::Unavailable(
            "the agent closed two streams in a row".into(),
        ))
    }

    /// The open stream, or a new one.
    async fn session(&self) -> Result<Session, PublishError> {
        if let Some(s) = self.open_session() {
            return Ok(s);
        }
        let _opening = self.inner.opening.lock().await;
        if let Some(s) = self.open_session() {
            return Ok(s);
        }
        let (jobs, receiver) = mpsc::channel(QUEUED);
        let shared = Arc::new(Shared {
            closed: AtomicBool::new(false),
            state: Mutex::new(State {
                jobs: receiver,
                waiting: VecDeque::new(),
            }),
        });
        let mut client = self.inner.client.clone();
        let mut call = tonic::Request::new(Requests(shared.clone()));
        if let Some(source) = &self.inner.source {
            call.metadata_mut().insert("weir-source", source.clone());
        }
        let answers = match client.publish_stream(call).await {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return Err(PublishError::Unavailable(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )))
            }
        };
        tokio::spawn(read_answers(shared.clone(), answers));
        let session = Session { jobs, shared };
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session.clone());
        Ok(session)
    }

    fn open_session(&self) -> Option<Session> {
        let current = self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current
            .as_ref()
            .filter(|s| !s.shared.closed.load(Ordering::Acquire))
            .cloned()
    }
}

/// Hands each answer of a stream to the caller waiting for it, until the
/// stream ends.
async fn read_answers(shared: Arc<Shared>, mut answers: tonic::Streaming<PublishStreamResponse>) {
    let why = loop {
        match answers.message().await {
            Ok(Some(answer)) => {
                let waiting = shared.state().waiting.pop_front();
                let Some(waiting) = waiting else {
                    break "the agent answered more events than were sent".to_owned();
                };
                let _ = waiting.send(match answer.result {
                    Some(publish_stream_response::Result::Published(p)) => Ok(p),
                    Some(publish_stream_response::Result::Refused(r)) => {
                        Err(PublishError::Refused(r))
                    }
                    None => Err(PublishError::Unknown(
                        "the agent sent an empty answer".into(),
                    )),
                });
            }
            Ok(None) => break "the agent ended the stream".to_owned(),
            Err(status) => break format!("{:?}: {}", status.code(), status.message()),
        }
    };
    tracing::debug!(%why, "publish stream ended");
    shared.close(&why);
}
