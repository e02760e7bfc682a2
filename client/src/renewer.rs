//! One `KeepAlive` stream per [`Client`] that renews every registration the
//! client keeps alive: renewals that come due together travel in one
//! message (up to 1,024), and no renewal pays for a new HTTP/2 stream. When
//! the stream's replica fails, the next renewal opens a stream on the next
//! replica.

use std::{sync::Weak, time::Duration};

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use weir_proto::registry::v1::{
    registry_client::RegistryClient, InstanceRef, KeepAliveRequest, KeepAliveResponse,
};

use crate::{Client, Error, Inner};

/// Most instances in one KeepAlive message (the server's limit).
const MAX_BATCH: usize = 1024;

#[derive(Debug)]
pub(crate) struct Renewal {
    pub instance: InstanceRef,
    /// How long this renewal may take on one replica.
    pub bound: Duration,
    pub reply: oneshot::Sender<Result<Duration, Error>>,
}

/// Starts the renewer of `inner`; it ends when the client is dropped.
pub(crate) fn spawn(inner: Weak<Inner>) -> mpsc::Sender<Renewal> {
    let (tx, rx) = mpsc::channel(MAX_BATCH);
    tokio::spawn(run(inner, rx));
    tx
}

struct Stream {
    index: usize,
    requests: mpsc::Sender<KeepAliveRequest>,
    responses: tonic::Streaming<KeepAliveResponse>,
}

async fn open(client: &Client, index: usize) -> Result<Stream, Error> {
    let (requests, rx) = mpsc::channel(4);
    let mut raw = RegistryClient::new(client.channel(index));
    let responses = raw
        .keep_alive(ReceiverStream::new(rx))
        .await
        .map_err(Error::from)?
        .into_inner();
    Ok(Stream {
        index,
        requests,
        responses,
    })
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
    stream: &mut Stream,
    instances: Vec<InstanceRef>,
    bound: Duration,
) -> Result<KeepAliveResponse, Failure> {
    let n = instances.len();
    stream
        .requests
        .send(KeepAliveRequest { instances })
        .await
        .map_err(|_| Failure::Broken(Error::Unavailable("keep-alive stream closed".into())))?;
    let answer = tokio::time::timeout(bound, stream.responses.message())
        .await
        .map_err(|_| {
            Failure::Silent(Error::Unavailable(format!(
                "no keep-alive answer within {bound:?}"
            )))
        })?
        .map_err(|status| Failure::Broken(Error::from(status)))?
        .ok_or_else(|| Failure::Broken(Error::Unavailable("keep-alive stream ended".into())))?;
    if answer.results.len() != n {
        return Err(Failure::Broken(Error::Protocol(format!(
            "{} keep-alive results for {n} instances",
            answer.results.len()
        ))));
    }
    Ok(answer)
}

async fn run(inner: Weak<Inner>, mut rx: mpsc::Receiver<Renewal>) {
    let mut stream: Option<Stream> = None;
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let client = Client { inner };
        let bound = batch
            .iter()
            .map(|r| r.bound)
            .min()
            .unwrap_or(client.unary());
        let instances: Vec<InstanceRef> = batch.iter().map(|r| r.instance.clone()).collect();
        let mut outcome = Err(Error::NoEndpoints);
        // Each replica at most once per batch, the preferred one first; a
        // broken stream moves on at once, a silent one only after `bound`.
        for index in client.order().collect::<Vec<_>>() {
            if stream.as_ref().is_some_and(|s| s.index != index) {
                stream = None;
            }
            if stream.is_none() {
                match tokio::time::timeout(bound, open(&client, index)).await {
                    Ok(Ok(s)) => stream = Some(s),
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
            let Some(s) = stream.as_mut() else { continue };
            match exchange(s, instances.clone(), bound).await {
                Ok(answer) => {
                    client.prefer(index);
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
                        let n = client.order().count();
                        client.prefer((index + 1) % n.max(1));
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
                        Err(Error::from(tonic::Status::new(
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
