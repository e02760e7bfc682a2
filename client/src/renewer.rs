//! One `KeepAlive` stream per [`Client`](crate::Client) that renews every registration the
//! client keeps alive: renewals that come due together travel in one
//! message (up to 1,024), and no renewal pays for a new HTTP/2 stream. When
//! the stream's replica fails, the next renewal opens a stream on the next
//! replica.

use std::{future::Future, pin::Pin, sync::Weak, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::{wrappers::ReceiverStream, Stream, StreamExt as _};
use tonic::{Code, Status};
use weir_proto::registry::v1::{
    registry_client::RegistryClient, InstanceRef, KeepAliveRequest, KeepAliveResponse,
};

use crate::{Error, Inner};

/// Most instances in one KeepAlive message (the server's limit).
const MAX_BATCH: usize = 1024;

#[derive(Debug)]
pub(crate) struct Renewal {
    pub instance: InstanceRef,
    /// How long this renewal may take on one replica.
    pub bound: Duration,
    pub reply: oneshot::Sender<Result<Duration, Error>>,
}

/// What the renewer needs of a client: its replicas in the order to try
/// them, and a `KeepAlive` stream to one of them. The client's `Inner` is
/// the real one; a trait so that failover can be tested under paused time
/// with streams that break or go silent on cue.
pub(crate) trait Replicas: Send + Sync + 'static {
    /// Replica indexes to try, the preferred one first.
    fn order(&self) -> Vec<usize>;
    /// Makes `index` the replica tried first.
    fn prefer(&self, index: usize);
    /// Opens a `KeepAlive` stream on replica `index`.
    fn open(&self, index: usize) -> impl Future<Output = Result<KeepAliveStream, Error>> + Send;
}

/// Boxed so the real (`tonic::Streaming`) and fake streams share one type.
type Responses = Pin<Box<dyn Stream<Item = Result<KeepAliveResponse, Status>> + Send>>;

/// An open `KeepAlive` stream: batches go in, one answer per batch comes
/// back, in order.
pub(crate) struct KeepAliveStream {
    pub requests: mpsc::Sender<KeepAliveRequest>,
    pub responses: Responses,
}

impl Replicas for Inner {
    fn order(&self) -> Vec<usize> {
        Inner::order(self).collect()
    }

    fn prefer(&self, index: usize) {
        Inner::prefer(self, index);
    }

    async fn open(&self, index: usize) -> Result<KeepAliveStream, Error> {
        let (requests, rx) = mpsc::channel(4);
        let mut raw = RegistryClient::new(self.channel(index));
        let responses = raw
            .keep_alive(ReceiverStream::new(rx))
            .await
            .map_err(Error::from)?
            .into_inner();
        Ok(KeepAliveStream {
            requests,
            responses: Box::pin(responses),
        })
    }
}

/// Starts the renewer of `replicas`; it ends when they are dropped (the
/// last handle of the client).
pub(crate) fn spawn<R: Replicas>(replicas: Weak<R>) -> mpsc::Sender<Renewal> {
    let (tx, rx) = mpsc::channel(MAX_BATCH);
    tokio::spawn(run(replicas, rx));
    tx
}

/// Why an exchange failed.
enum Failure {
    /// The stream broke: the next replica can be tried at once.
    Broken(Error),
    /// No answer within the bound, which is spent.
    Silent(Error),
}

/// Sends one batch on `stream` and waits (bounded) for its answer.
async fn exchange(
    stream: &mut KeepAliveStream,
    instances: Vec<InstanceRef>,
    bound: Duration,
) -> Result<KeepAliveResponse, Failure> {
    let n = instances.len();
    stream
        .requests
        .send(KeepAliveRequest { instances })
        .await
        .map_err(|_| Failure::Broken(Error::Unavailable("keep-alive stream closed".into())))?;
    let answer = tokio::time::timeout(bound, stream.responses.next())
        .await
        .map_err(|_| {
            Failure::Silent(Error::Unavailable(format!(
                "no keep-alive answer within {bound:?}"
            )))
        })?
        .ok_or_else(|| Failure::Broken(Error::Unavailable("keep-alive stream ended".into())))?
        .map_err(|status| Failure::Broken(Error::from(status)))?;
    if answer.results.len() != n {
        return Err(Failure::Broken(Error::Protocol(format!(
            "{} keep-alive results for {n} instances",
            answer.results.len()
        ))));
    }
    Ok(answer)
}

async fn run<R: Replicas>(replicas: Weak<R>, mut rx: mpsc::Receiver<Renewal>) {
    // The open stream and the replica it goes to.
    let mut stream: Option<(usize, KeepAliveStream)> = None;
    while let Some(first) = rx.recv().await {
        let mut bound = first.bound;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => {
                    bound = bound.min(r.bound);
                    batch.push(r);
                }
                Err(_) => break,
            }
        }
        let Some(replicas) = replicas.upgrade() else {
            return;
        };
        let instances: Vec<InstanceRef> = batch.iter().map(|r| r.instance.clone()).collect();
        let order = replicas.order();
        let mut outcome = Err(Error::NoEndpoints);
        // Each replica at most once per batch, the preferred one first; a
        // broken stream moves on at once, a silent one only after `bound`.
        for &index in &order {
            if stream.as_ref().is_some_and(|(at, _)| *at != index) {
                stream = None;
            }
            if stream.is_none() {
                match tokio::time::timeout(bound, replicas.open(index)).await {
                    Ok(Ok(s)) => stream = Some((index, s)),
                    Ok(Err(e)) => {
                        outcome = Err(e);
                        continue;
                    }
                    Err(_) => {
                        outcome = Err(Error::Unavailable(format!(
                            "could not open a keep-alive stream within {bound:?}"
                        )));
                        continue;
                    }
                }
            }
            let Some((_, s)) = stream.as_mut() else {
                continue;
            };
            match exchange(s, instances.clone(), bound).await {
                Ok(answer) => {
                    replicas.prefer(index);
                    outcome = Ok(answer);
                    break;
                }
                Err(failure) => {
                    stream = None;
                    let (e, timed_out) = match failure {
                        Failure::Broken(e) => (e, false),
                        Failure::Silent(e) => (e, true),
                    };
                    tracing::debug!(error = %e, "keep-alive stream failed; trying the next replica");
                    outcome = Err(e);
                    if timed_out {
                        // The bound is spent: let the caller retry, on the
                        // next replica first.
                        replicas.prefer((index + 1) % order.len().max(1));
                        break;
                    }
                }
            }
        }
        match outcome {
            Ok(answer) => {
                for (renewal, result) in batch.into_iter().zip(answer.results) {
                    let r = if result.alive {
                        Ok(Duration::from_secs(u64::from(result.ttl_seconds)))
                    } else {
                        Err(Error::from(Status::new(
                            failure_code(result.code),
                            result.error,
                        )))
                    };
                    let _ = renewal.reply.send(r);
                }
            }
            Err(e) => {
                let message = e.to_string();
                for renewal in batch {
                    let _ = renewal.reply.send(Err(Error::Unavailable(message.clone())));
                }
            }
        }
    }
}

/// The code of a failed result; none (an older server) counts as
/// transient.
fn failure_code(code: i32) -> Code {
    match Code::from_i32(code) {
        Code::Ok => Code::Unavailable,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    };

    use tokio::time::Instant;
    use weir_proto::registry::v1::keep_alive_response;

    use super::*;

    /// How a fake replica's streams behave.
    #[derive(Clone, Copy, Debug)]
    enum Replica {
        /// Renews every instance of every batch.
        Answers,
        /// Fails the stream on its first batch (a reset connection).
        Breaks,
        /// Takes batches and never answers (a hung replica).
        Silent,
    }

    #[derive(Debug)]
    struct Fake {
        replicas: Vec<Replica>,
        current: AtomicUsize,
        /// The replica of every stream opened, in order.
        opened: Mutex<Vec<usize>>,
        /// The replica of every batch answered, in order.
        answered: Arc<Mutex<Vec<usize>>>,
    }

    impl Fake {
        fn new(replicas: &[Replica]) -> Arc<Self> {
            Arc::new(Self {
                replicas: replicas.to_vec(),
                current: AtomicUsize::new(0),
                opened: Mutex::default(),
                answered: Arc::default(),
            })
        }

        fn opened(&self) -> Vec<usize> {
            self.opened.lock().expect("lock").clone()
        }

        fn answered(&self) -> Vec<usize> {
            self.answered.lock().expect("lock").clone()
        }
    }

    impl Replicas for Fake {
        fn order(&self) -> Vec<usize> {
            let n = self.replicas.len();
            let start = self.current.load(Ordering::SeqCst) % n;
            (0..n).map(|k| (start + k) % n).collect()
        }

        fn prefer(&self, index: usize) {
            self.current.store(index, Ordering::SeqCst);
        }

        async fn open(&self, index: usize) -> Result<KeepAliveStream, Error> {
            self.opened.lock().expect("lock").push(index);
            let (requests, mut batches) = mpsc::channel::<KeepAliveRequest>(4);
            let (answers, responses) = mpsc::channel(4);
            let behaviour = self.replicas[index];
            let answered = self.answered.clone();
            tokio::spawn(async move {
                while let Some(batch) = batches.recv().await {
                    match behaviour {
                        Replica::Answers => {
                            answered.lock().expect("lock").push(index);
                            let results = batch
                                .instances
                                .into_iter()
                                .map(|instance| keep_alive_response::Result {
                                    instance: Some(instance),
                                    alive: true,
                                    ttl_seconds: 3,
                                    ..Default::default()
                                })
                                .collect();
                            let _ = answers.send(Ok(KeepAliveResponse { results })).await;
                        }
                        Replica::Breaks => {
                            let _ = answers
                                .send(Err(Status::unavailable("connection reset")))
                                .await;
                            return;
                        }
                        // Holding `answers` keeps the stream open and mute.
                        Replica::Silent => {}
                    }
                }
            });
            Ok(KeepAliveStream {
                requests,
                responses: Box::pin(ReceiverStream::new(responses)),
            })
        }
    }

    const BOUND: Duration = Duration::from_secs(1);

    async fn renew(renewer: &mpsc::Sender<Renewal>) -> Result<Duration, Error> {
        let (reply, answer) = oneshot::channel();
        renewer
            .send(Renewal {
                instance: InstanceRef {
                    namespace: "default".into(),
                    service: "orders".into(),
                    instance_id: "o-1".into(),
                },
                bound: BOUND,
                reply,
            })
            .await
            .expect("renewer running");
        answer.await.expect("renewer answers")
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_stream_fails_over_to_the_next_replica_at_once() {
        let fake = Fake::new(&[Replica::Breaks, Replica::Answers]);
        let renewer = spawn(Arc::downgrade(&fake));
        let start = Instant::now();
        let ttl = renew(&renewer)
            .await
            .expect("renewed on the second replica");
        assert_eq!(ttl, Duration::from_secs(3));
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a broken stream does not wait for its bound"
        );
        assert_eq!(fake.order()[0], 1, "the replica that answered is preferred");
        for _ in 0..3 {
            renew(&renewer).await.expect("renewed");
        }
        assert_eq!(fake.opened(), [0, 1], "one stream per replica, kept");
        assert_eq!(fake.answered(), [1, 1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_fails_over_after_its_bound() {
        let fake = Fake::new(&[Replica::Silent, Replica::Answers]);
        let renewer = spawn(Arc::downgrade(&fake));
        let start = Instant::now();
        let err = renew(&renewer).await.expect_err("no answer in time");
        let waited = start.elapsed();
        assert!(
            matches!(&err, Error::Unavailable(m) if m.contains("no keep-alive answer")),
            "{err}"
        );
        assert!(err.is_transient());
        assert!(
            waited >= BOUND && waited < BOUND + Duration::from_millis(10),
            "gave up after the bound, not before nor much after: {waited:?}"
        );
        assert_eq!(
            fake.order()[0],
            1,
            "the next try starts on the next replica"
        );

        let start = Instant::now();
        let ttl = renew(&renewer)
            .await
            .expect("renewed on the second replica");
        assert_eq!(ttl, Duration::from_secs(3));
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..3 {
            renew(&renewer).await.expect("renewed");
        }
        assert_eq!(fake.opened(), [0, 1], "the silent replica is not retried");
        assert_eq!(fake.answered(), [1, 1, 1, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_renewer_stops_with_its_client() {
        let fake = Fake::new(&[Replica::Answers]);
        let renewer = spawn(Arc::downgrade(&fake));
        renew(&renewer).await.expect("renewed");
        drop(fake);
        let (reply, answer) = oneshot::channel();
        let sent = renewer
            .send(Renewal {
                instance: InstanceRef::default(),
                bound: BOUND,
                reply,
            })
            .await;
        // Either the task already ended (send fails) or it ends on this
        // renewal without answering it.
        if sent.is_ok() {
            assert!(answer.await.is_err(), "no answer once the client is gone");
        }
        tokio::time::timeout(Duration::from_secs(1), renewer.closed())
            .await
            .expect("the renewer task ended");
    }
}
