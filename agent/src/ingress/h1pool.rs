//! HTTP/1.1 connections to instances, one pool per ingress worker.
//!
//! hyper-util's pooled client costs, per request, a pool checkout through
//! a shared lock and a spawned task that hands the connection back once the
//! response ends. Here each worker keeps its own idle connections per
//! `host:port` (a lock nobody else takes): a request takes a connection
//! that is ready, or opens one, and puts it back as soon as the response
//! head arrives; it is taken again once its body was read through
//! (`SendRequest::is_ready`). A request that a pooled connection could not
//! even start (the instance closed it meanwhile) goes once more on a fresh
//! connection; nothing was sent, so that is safe for any method.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use http::{uri::Authority, Request, Response};
use hyper::{
    body::Incoming,
    client::conn::http1::{self, SendRequest},
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::Body;

/// Idle connections kept per instance and worker.
const MAX_IDLE: usize = 256;
/// Instances with a pool entry, per worker, before entries that hold no
/// open connection (instances gone from the registry) are dropped.
const MAX_AUTHORITIES: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect {0}: {1}")]
    Connect(Authority, std::io::Error),
    #[error("connect {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

#[derive(Debug, Default)]
pub struct H1Pool {
    idle: Mutex<HashMap<Authority, Vec<SendRequest<Body>>>>,
}

impl H1Pool {
    /// A ready connection to `authority`, if one is idle. Closed ones are
    /// dropped; busy ones (a response body still being read) stay.
    fn checkout(&self, authority: &Authority) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(authority)?;
        conns.retain(|c| !c.is_closed());
        let ready = conns.iter().rposition(SendRequest::is_ready)?;
        Some(conns.swap_remove(ready))
    }

    fn checkin(&self, authority: &Authority, conn: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_AUTHORITIES && !idle.contains_key(authority) {
            idle.retain(|_, conns| {
                conns.retain(|c| !c.is_closed());
                !conns.is_empty()
            });
        }
        let conns = idle.entry(authority.clone()).or_default();
        if conns.len() < MAX_IDLE {
            conns.push(conn);
        }
    }

    async fn connect(authority: &Authority) -> Result<SendRequest<Body>, H1Error> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority.as_str()))
            .await
            .map_err(|_| H1Error::ConnectTimeout(authority.clone()))?
            .map_err(|e| H1Error::Connect(authority.clone(), e))?;
        // Small requests must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Sends `request` (origin-form URI, `Host` set) to `authority`.
    pub async fn send(
        &self,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Incoming>, H1Error> {
        let request = match self.checkout(authority) {
            Some(mut conn) => match conn.try_send_request(request).await {
                Ok(response) => {
                    self.checkin(authority, conn);
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection went away in between.
                    Some(request) => request,
                    None => return Err(e.into_error().into()),
                },
            },
            None => request,
        };
        let mut conn = Self::connect(authority).await?;
        let response = conn.send_request(request).await?;
        self.checkin(authority, conn);
        Ok(response)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use http_body_util::BodyExt;
    use hyper::{server::conn::http1 as server, service::service_fn};

    use super::*;

    type Held = Arc<std::sync::Mutex<Vec<tokio::sync::mpsc::Sender<FrameResult>>>>;
    type FrameResult = Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>;

    /// An HTTP/1.1 server on loopback: `/` answers "ok"; `/open` answers a
    /// head and a body that does not end while the test holds it. Counts
    /// connections.
    async fn upstream() -> (Authority, Arc<AtomicUsize>, Held) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let held: Held = Arc::default();
        let (count, keep) = (accepted.clone(), held.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let keep = keep.clone();
                tokio::spawn(server::Builder::new().serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |req: Request<hyper::body::Incoming>| {
                        let keep = keep.clone();
                        async move {
                            let (tx, rx) = tokio::sync::mpsc::channel::<FrameResult>(1);
                            if req.uri().path() == "/open" {
                                keep.lock().expect("lock").push(tx);
                            } else {
                                let _ = tx.try_send(Ok(hyper::body::Frame::data("ok".into())));
                            }
                            let body = http_body_util::StreamBody::new(
                                tokio_stream::wrappers::ReceiverStream::new(rx),
                            );
                            Ok::<_, std::convert::Infallible>(Response::new(body))
                        }
                    }),
                ));
            }
        });
        (addr.to_string().parse().expect("authority"), accepted, held)
    }

    fn request(authority: &Authority) -> Request<Body> {
        request_to(authority, "/")
    }

    fn request_to(authority: &Authority, path: &str) -> Request<Body> {
        Request::post(path)
            .header(http::header::HOST, authority.as_str())
            .body(Body::full("x"))
            .expect("request")
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let (authority, accepted, _held) = upstream().await;
        let pool = H1Pool::default();
        for _ in 0..5 {
            let response = pool
                .send(&authority, request(&authority))
                .await
                .expect("answer");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(body, "ok");
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection for sequential requests"
        );

        // While a response body is still coming, its connection is busy:
        // the next request gets another one.
        let open = pool
            .send(&authority, request_to(&authority, "/open"))
            .await
            .expect("answer");
        let next = pool
            .send(&authority, request(&authority))
            .await
            .expect("answer");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
        drop((open, next));
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let authority: Authority = format!("127.0.0.1:{port}").parse().expect("authority");
        let e = H1Pool::default()
            .send(&authority, request(&authority))
            .await
            .expect_err("nobody listens");
        assert!(matches!(e, H1Error::Connect(..)), "{e:?}");
    }
}
