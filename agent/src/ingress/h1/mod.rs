//! An HTTP/1.1 client for instances, one connection pool per ingress
//! worker, that does its work on the caller's task.
//!
//! hyper's client hands each request to a connection task through a
//! channel and the response back through another: two task hand-offs and
//! their allocations per request, which the benchmark against HAProxy
//! measured. Here the task handling a request writes the request head and
//! body to the connection itself and reads the response head; a response
//! body already in the buffer (the common small answer) is handed over
//! whole and the connection goes back to the pool at once; a longer one is
//! read as the caller polls it ([`ResponseBody`]), and the connection goes
//! back when it ends.
//!
//! Connections are kept per `host:port`. One whose instance closed it
//! while idle shows as readable and is dropped at checkout, without a
//! system call. A request that a reused connection failed before any
//! answer arrived goes once more on a fresh connection when that is safe:
//! its body is in hand, and either the write itself failed or the method
//! is idempotent.

pub mod codec;

use std::{
    collections::HashMap,
    io::{self, IoSlice},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use http::{uri::Authority, HeaderMap, Method, Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::{io::Interest, net::TcpStream};

use crate::body::{Body, BodyError};
use codec::{Decoded, ProtocolError, RequestFraming, ResponseFraming, ResponseHead};

/// Idle connections kept per instance and worker.
const MAX_IDLE: usize = 256;
/// Instances with a pool entry, per worker, before entries that hold no
/// connection (instances gone from the registry) are dropped.
const MAX_AUTHORITIES: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// What a read asks for at least.
const READ_CHUNK: usize = 16 * 1024;

/// Why a request did not get a (whole) response.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("connect {0}: {1}")]
    Connect(Authority, io::Error),
    #[error("connect {0}: timed out after {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(Authority),
    #[error("sending the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    #[error("the instance closed the connection before answering")]
    Closed,
    #[error("the instance closed the connection in the middle of the response")]
    Truncated,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("the request body could not be read: {0}")]
    RequestBody(Box<BodyError>),
    #[error("the request body is longer than its content-length")]
    BodyTooLong,
}

impl H1Error {
    /// The failure left no trace of an answer: nothing was read.
    fn before_answer(&self) -> bool {
        matches!(self, H1Error::Write(_) | H1Error::Closed)
            || matches!(self, H1Error::Read(e) if e.kind() == io::ErrorKind::ConnectionReset)
    }
}

/// One connection to an instance.
#[derive(Debug)]
struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// It carried a request before this one.
    reused: bool,
}

impl Conn {
    async fn open(authority: &Authority) -> Result<Conn, H1Error> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(authority.as_str()))
            .await
            .map_err(|_| H1Error::ConnectTimeout(authority.clone()))?
            .map_err(|e| H1Error::Connect(authority.clone(), e))?;
        // Small requests must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            rbuf: BytesMut::new(),
            wbuf: Vec::with_capacity(1024),
            reused: false,
        })
    }

    /// An idle connection with something to read was closed by its
    /// instance (or sent what nobody asked for): either way, unusable. No
    /// system call: the runtime already knows whether it is readable.
    fn idle_and_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        self.rbuf.is_empty() && self.stream.poll_read_ready(&mut cx).is_pending()
    }

    /// Reads what is there into `rbuf`; `Ok(0)`: the instance closed.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            if self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
                self.rbuf.reserve(READ_CHUNK);
            }
            let spare = self.rbuf.capacity() - self.rbuf.len();
            match self.stream.try_read_buf(&mut self.rbuf) {
                Ok(n) => {
                    if n > 0 && n < spare {
                        // A short read drained the socket. Tell the runtime,
                        // so the next read waits for the next readiness
                        // event instead of making a system call that would
                        // only say "nothing yet". Data arriving from now on
                        // raises a new event.
                        let _ = self.stream.try_io(Interest::READABLE, || {
                            Err::<(), _>(io::ErrorKind::WouldBlock.into())
                        });
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if self.stream.poll_read_ready(cx)?.is_pending() {
                        return Poll::Pending;
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    async fn read(&mut self) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read(cx)).await
    }

    /// Writes all of `parts`. `Ok(false)`: the instance answered (or
    /// closed) before taking all of it, so the answer should be read now.
    async fn write_all(&mut self, parts: &mut [&[u8]]) -> Result<bool, H1Error> {
        let mut first = 0;
        while first < parts.len() {
            if parts[first].is_empty() {
                first += 1;
                continue;
            }
            let slices: [IoSlice<'_>; 4] = std::array::from_fn(|i| {
                IoSlice::new(parts.get(first + i).copied().unwrap_or_default())
            });
            let count = (parts.len() - first).min(4);
            match self.stream.try_write_vectored(&slices[..count]) {
                Ok(mut n) => {
                    while n > 0 {
                        let take = n.min(parts[first].len());
                        parts[first] = &parts[first][take..];
                        n -= take;
                        if parts[first].is_empty() {
                            first += 1;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The instance stopped reading: it may be answering
                    // early (413, say) rather than slow.
                    tokio::select! {
                        ready = self.stream.writable() => ready.map_err(H1Error::Write)?,
                        ready = self.stream.readable() => {
                            ready.map_err(H1Error::Write)?;
                            return Ok(false);
                        }
                    }
                }
                Err(e) => return Err(H1Error::Write(e)),
            }
        }
        Ok(true)
    }

    /// Writes the request: `wbuf` holds its head; the body follows,
    /// framed as `framing` says. `Ok(false)`: not all was written (the
    /// instance answered early); the connection cannot be reused.
    async fn write_request(
        &mut self,
        body: &mut Outgoing,
        framing: RequestFraming,
    ) -> Result<bool, H1Error> {
        let head = std::mem::take(&mut self.wbuf);
        let result = self.write_body(&head, body, framing).await;
        self.wbuf = head;
        result
    }

    async fn write_body(
        &mut self,
        head: &[u8],
        body: &mut Outgoing,
        framing: RequestFraming,
    ) -> Result<bool, H1Error> {
        let stream = match body {
            Outgoing::InHand(bytes) => {
                let bytes = bytes.as_deref().unwrap_or_default();
                return self.write_all(&mut [head, bytes]).await;
            }
            Outgoing::Stream(stream) => stream,
        };
        let mut head = Some(head);
        let mut left = match framing {
            RequestFraming::Length { n, .. } => Some(n),
            RequestFraming::Chunked => None,
        };
        let mut size_line = Vec::new();
        let mut trailers: Option<HeaderMap> = None;
        while let Some(frame) = stream.frame().await {
            let frame = frame.map_err(|e| H1Error::RequestBody(Box::new(e)))?;
            let data = match frame.into_data() {
                Ok(data) => data,
                Err(frame) => {
                    trailers = frame.into_trailers().ok();
                    continue;
                }
            };
            if data.is_empty() {
                continue;
            }
            let head_part = head.take().unwrap_or_default();
            let all = match &mut left {
                Some(left) => {
                    *left = left
                        .checked_sub(data.len() as u64)
                        .ok_or(H1Error::BodyTooLong)?;
                    self.write_all(&mut [head_part, &data]).await?
                }
                None => {
                    size_line.clear();
                    codec::encode_chunk_size(&mut size_line, data.len());
                    self.write_all(&mut [head_part, &size_line, &data, b"\r\n"])
                        .await?
                }
            };
            if !all {
                return Ok(false);
            }
        }
        let head_part = head.take().unwrap_or_default();
        match left {
            // hyper checks the caller's body against its content-length;
            // one that ended short is an error from `frame`.
            Some(_) => self.write_all(&mut [head_part]).await,
            None => {
                size_line.clear();
                codec::encode_last_chunk(&mut size_line, trailers.as_ref());
                self.write_all(&mut [head_part, &size_line]).await
            }
        }
    }

    async fn read_head(&mut self, method: &Method) -> Result<ResponseHead, H1Error> {
        loop {
            if !self.rbuf.is_empty() {
                if let Some(head) = codec::parse_response_head(&mut self.rbuf, method)? {
                    return Ok(head);
                }
            }
            let had = self.rbuf.len();
            match self.read().await {
                Ok(0) if had == 0 => return Err(H1Error::Closed),
                Ok(0) => return Err(H1Error::Truncated),
                Ok(_) => {}
                Err(e) => return Err(H1Error::Read(e)),
            }
        }
    }
}

/// A request body on its way out.
enum Outgoing {
    /// Bytes in hand (sent again as they are if a retry is needed).
    InHand(Option<Bytes>),
    Stream(Body),
}

impl Outgoing {
    /// The body and its framing on the wire.
    fn new(body: Body, method: &Method, declared_length: bool) -> (Self, RequestFraming) {
        use http_body::Body as _;
        let explicit_zero =
            declared_length || matches!(*method, Method::POST | Method::PUT | Method::PATCH);
        let length = |n: u64| RequestFraming::Length { n, explicit_zero };
        match body {
            Body::Empty => (Outgoing::InHand(None), length(0)),
            Body::Full(bytes) => {
                let n = bytes.as_ref().map_or(0, |b| b.len() as u64);
                (Outgoing::InHand(bytes), length(n))
            }
            stream if stream.is_end_stream() => (Outgoing::InHand(None), length(0)),
            stream => match stream.size_hint().exact() {
                Some(n) => (Outgoing::Stream(stream), length(n)),
                None => (Outgoing::Stream(stream), RequestFraming::Chunked),
            },
        }
    }
}

/// HTTP/1.1 connections of one ingress worker.
#[derive(Debug, Default)]
pub struct H1Pool {
    /// FNV: keys come from the registry, not from callers, and SipHash
    /// showed in the profile.
    idle: Mutex<HashMap<Authority, Vec<Conn>, fnv::FnvBuildHasher>>,
}

impl H1Pool {
    /// An idle connection to `authority` still usable, if there is one.
    fn checkout(&self, authority: &Authority) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let conns = idle.get_mut(authority)?;
        while let Some(conn) = conns.pop() {
            if conn.idle_and_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn checkin(&self, authority: &Authority, mut conn: Conn) {
        conn.reused = true;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_AUTHORITIES && !idle.contains_key(authority) {
            idle.retain(|_, conns| {
                conns.retain(Conn::idle_and_usable);
                !conns.is_empty()
            });
        }
        let conns = idle.entry(authority.clone()).or_default();
        if conns.len() < MAX_IDLE {
            conns.push(conn);
        }
    }

    /// Sends `request` (origin-form URI, `Host` set) to `authority`.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        request: Request<Body>,
    ) -> Result<Response<Body>, H1Error> {
        let (parts, body) = request.into_parts();
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let declared = parts.headers.contains_key(http::header::CONTENT_LENGTH);
        let (mut body, framing) = Outgoing::new(body, &parts.method, declared);
        let mut conn = match self.checkout(authority) {
            Some(conn) => conn,
            None => Conn::open(authority).await?,
        };
        let (head, complete) = loop {
            conn.wbuf.clear();
            codec::encode_request_head(
                &mut conn.wbuf,
                &parts.method,
                path,
                &parts.headers,
                framing,
            );
            let attempt = async {
                let complete = match conn.write_request(&mut body, framing).await {
                    Ok(complete) => complete,
                    // The instance may have answered before it closed.
                    Err(H1Error::Write(e)) => match conn.read_head(&parts.method).await {
                        Ok(head) => return Ok((head, false)),
                        Err(_) => return Err(H1Error::Write(e)),
                    },
                    Err(e) => return Err(e),
                };
                Ok::<_, H1Error>((conn.read_head(&parts.method).await?, complete))
            };
            match attempt.await {
                Ok(answer) => break answer,
                Err(e)
                    if conn.reused
                        && e.before_answer()
                        && matches!(body, Outgoing::InHand(_))
                        && (matches!(e, H1Error::Write(_)) || parts.method.is_idempotent()) =>
                {
                    tracing::debug!(%authority, error = %e, "reused connection failed; once more on a new one");
                    conn = Conn::open(authority).await?;
                }
                Err(e) => return Err(e),
            }
        };
        let ResponseHead {
            status,
            version,
            headers,
            framing,
            keep_alive,
        } = head;
        let keep_alive = keep_alive && complete;
        let mut response = Response::new(Body::Empty);
        *response.status_mut() = status;
        *response.version_mut() = version;
        *response.headers_mut() = headers;
        let body = match framing {
            ResponseFraming::Length(0) => {
                self.done(authority, conn, keep_alive);
                Body::Empty
            }
            ResponseFraming::Length(n) if (conn.rbuf.len() as u64) >= n => {
                // The whole body is here already.
                let bytes = conn.rbuf.split_to(n as usize).freeze();
                self.done(authority, conn, keep_alive);
                Body::full(bytes)
            }
            framing => Body::Upstream(ResponseBody {
                conn: Some(conn),
                framing,
                keep_alive,
                pool: self.clone(),
                authority: authority.clone(),
            }),
        };
        *response.body_mut() = body;
        Ok(response)
    }

    /// A response was read to its end: the connection goes back to the
    /// pool when it can carry another request.
    fn done(&self, authority: &Authority, conn: Conn, keep_alive: bool) {
        // Bytes past the response: the instance is out of step.
        if keep_alive && conn.rbuf.is_empty() {
            self.checkin(authority, conn);
        }
    }
}

/// A response body read from its connection as the caller polls it; the
/// connection goes back to its pool at the end.
pub struct ResponseBody {
    conn: Option<Conn>,
    framing: ResponseFraming,
    keep_alive: bool,
    pool: Arc<H1Pool>,
    authority: Authority,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("framing", &self.framing)
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.done(&self.authority, conn, self.keep_alive);
        }
    }

    pub fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    pub fn size_hint(&self) -> http_body::SizeHint {
        match (&self.conn, &self.framing) {
            (None, _) => http_body::SizeHint::with_exact(0),
            (Some(_), ResponseFraming::Length(n)) => http_body::SizeHint::with_exact(*n),
            _ => http_body::SizeHint::default(),
        }
    }

    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let frame = match &mut self.framing {
                ResponseFraming::Length(0) => None,
                ResponseFraming::Length(left) if !conn.rbuf.is_empty() => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(conn.rbuf.len());
                    *left -= n as u64;
                    Some(Some(Frame::data(conn.rbuf.split_to(n).freeze())))
                }
                ResponseFraming::Length(_) => None,
                ResponseFraming::Chunked(state) => match state.decode(&mut conn.rbuf) {
                    Ok(Decoded::Data(data)) => Some(Some(Frame::data(data))),
                    Ok(Decoded::End(trailers)) => Some(trailers.map(Frame::trailers)),
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                ResponseFraming::Close if !conn.rbuf.is_empty() => {
                    Some(Some(Frame::data(conn.rbuf.split().freeze())))
                }
                ResponseFraming::Close => None,
            };
            let ended = match &self.framing {
                ResponseFraming::Length(0) => true,
                ResponseFraming::Chunked(state) => *state == codec::Chunked::Done,
                _ => false,
            };
            if let Some(frame) = frame {
                if ended {
                    self.finish();
                }
                match frame {
                    Some(frame) => return Poll::Ready(Some(Ok(frame))),
                    None => return Poll::Ready(None),
                }
            }
            if ended {
                self.finish();
                return Poll::Ready(None);
            }
            match conn.poll_read(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    self.conn = None;
                    return if self.framing == ResponseFraming::Close {
                        Poll::Ready(None)
                    } else {
                        Poll::Ready(Some(Err(H1Error::Truncated)))
                    };
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(H1Error::Read(e))));
                }
            }
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        ResponseBody::poll_frame(self.get_mut(), cx)
    }

    fn is_end_stream(&self) -> bool {
        ResponseBody::is_end_stream(self)
    }

    fn size_hint(&self) -> http_body::SizeHint {
        ResponseBody::size_hint(self)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::atomic::{AtomicUsize, Ordering},
    };

    use http::header;
    use hyper::{body::Incoming, server::conn::http1 as server, service::service_fn};
    use hyper_util::rt::TokioIo;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
        sync::mpsc,
    };

    use super::*;

    type FrameResult = Result<Frame<Bytes>, Infallible>;
    type Held = Arc<Mutex<Vec<mpsc::Sender<FrameResult>>>>;

    /// An HTTP/1.1 server (hyper) on loopback, counting connections:
    /// `/` answers "ok"; `/open` answers a chunked body that goes on while
    /// the test holds its sender; `/big` answers 1 MiB with a length;
    /// `/echo` answers the request body, chunked.
    async fn upstream() -> (Authority, Arc<AtomicUsize>, Held) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
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
                    service_fn(move |req: Request<Incoming>| {
                        let keep = keep.clone();
                        async move {
                            let (tx, rx) = mpsc::channel::<FrameResult>(4);
                            match req.uri().path() {
                                "/open" => keep.lock().expect("lock").push(tx),
                                "/big" => {
                                    let body = Bytes::from(vec![7u8; 1 << 20]);
                                    return Ok::<_, Infallible>(Response::new(
                                        http_body_util::Either::Left(http_body_util::Full::new(
                                            body,
                                        )),
                                    ));
                                }
                                "/echo" => {
                                    let body = req.into_body().collect().await.map_or_else(
                                        |_| Bytes::from_static(b"broken"),
                                        |c| c.to_bytes(),
                                    );
                                    let _ = tx.try_send(Ok(Frame::data(body)));
                                }
                                _ => {
                                    let _ = tx.try_send(Ok(Frame::data("ok".into())));
                                }
                            }
                            let body = http_body_util::StreamBody::new(
                                tokio_stream::wrappers::ReceiverStream::new(rx),
                            );
                            Ok(Response::new(http_body_util::Either::Right(body)))
                        }
                    }),
                ));
            }
        });
        (addr.to_string().parse().expect("authority"), accepted, held)
    }

    fn request_to(authority: &Authority, method: Method, path: &str, body: Body) -> Request<Body> {
        Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, authority.as_str())
            .body(body)
            .expect("request")
    }

    fn post(authority: &Authority, path: &str) -> Request<Body> {
        request_to(authority, Method::POST, path, Body::full("x"))
    }

    async fn text(response: Response<Body>) -> String {
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_was_read() {
        let (authority, accepted, held) = upstream().await;
        let pool = Arc::new(H1Pool::default());
        for _ in 0..5 {
            let response = pool
                .send(&authority, post(&authority, "/"))
                .await
                .expect("answer");
            assert_eq!(text(response).await, "ok");
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            1,
            "one connection for sequential requests"
        );

        // While a response body is still coming, its connection is busy:
        // the next request gets another one.
        let mut open = pool
            .send(&authority, post(&authority, "/open"))
            .await
            .expect("answer");
        let next = pool
            .send(&authority, post(&authority, "/"))
            .await
            .expect("answer");
        assert_eq!(text(next).await, "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);

        // The open body streams as the instance sends, and its connection
        // is reused once it ended.
        let tx = held.lock().expect("lock").pop().expect("held");
        for piece in ["a", "b"] {
            tx.send(Ok(Frame::data(Bytes::from(piece))))
                .await
                .expect("send");
            let frame = open.body_mut().frame().await.expect("frame").expect("data");
            assert_eq!(frame.into_data().expect("data"), piece);
        }
        drop(tx);
        assert!(
            open.body_mut().frame().await.is_none(),
            "the chunked body ends"
        );
        for _ in 0..3 {
            let response = pool
                .send(&authority, post(&authority, "/"))
                .await
                .expect("answer");
            assert_eq!(text(response).await, "ok");
        }
        assert_eq!(
            accepted.load(Ordering::Relaxed),
            2,
            "both connections were reused"
        );
    }

    #[tokio::test]
    async fn a_long_body_streams_through_and_frees_its_connection() {
        let (authority, accepted, _held) = upstream().await;
        let pool = Arc::new(H1Pool::default());
        for _ in 0..2 {
            let response = pool
                .send(
                    &authority,
                    request_to(&authority, Method::GET, "/big", Body::Empty),
                )
                .await
                .expect("answer");
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            assert_eq!(body.len(), 1 << 20);
            assert!(body.iter().all(|b| *b == 7));
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let authority: Authority = format!("127.0.0.1:{port}").parse().expect("authority");
        let e = Arc::new(H1Pool::default())
            .send(&authority, post(&authority, "/"))
            .await
            .expect_err("nobody listens");
        assert!(matches!(e, H1Error::Connect(..)), "{e:?}");
    }

    /// A raw server: answers each connection's first request with
    /// `answer`, then closes it. Counts connections.
    async fn one_shot(answer: &'static [u8]) -> (Authority, Arc<AtomicUsize>) {
        raw_server(answer, false).await
    }

    /// As [`one_shot`]; `hold`: keeps each connection open, unread, after
    /// answering.
    async fn raw_server(answer: &'static [u8], hold: bool) -> (Authority, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = stream.read(&mut buf).await;
                    let _ = stream.write_all(answer).await;
                    if hold {
                        // Until the client closes; nothing more is read.
                        let _ = stream.readable().await;
                        std::future::pending::<()>().await;
                    }
                });
            }
        });
        (authority, accepted)
    }

    #[tokio::test]
    async fn a_connection_its_instance_closed_while_idle_is_not_used() {
        // The server says keep-alive, then closes anyway.
        let (authority, accepted) =
            one_shot(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = Arc::new(H1Pool::default());
        let response = pool
            .send(&authority, post(&authority, "/"))
            .await
            .expect("answer");
        assert_eq!(text(response).await, "ok");
        // Wait until the runtime has seen the close (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let usable = {
                let idle = pool.idle.lock().expect("lock");
                idle.get(&authority)
                    .is_some_and(|c| c.iter().any(Conn::idle_and_usable))
            };
            if !usable {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close was never seen"
            );
            tokio::task::yield_now().await;
        }
        // A POST, which could not be sent twice: it goes on a new
        // connection from the start.
        let response = pool
            .send(&authority, post(&authority, "/"))
            .await
            .expect("answer");
        assert_eq!(text(response).await, "ok");
        assert_eq!(accepted.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn bad_answers_are_errors_and_close_the_connection() {
        for (answer, check) in [
            (&b"SSH-2.0-x\r\n\r\n"[..], "bad response head"),
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
                "middle of the response",
            ),
            (b"", "before answering"),
        ] {
            let (authority, _) = one_shot(answer).await;
            let pool = Arc::new(H1Pool::default());
            let error = match pool.send(&authority, post(&authority, "/")).await {
                Err(e) => e.to_string(),
                Ok(r) => match r.into_body().collect().await {
                    Err(e) => e.to_string(),
                    Ok(_) => String::from("a whole answer"),
                },
            };
            assert!(error.contains(check), "{error:?} should say {check:?}");
            assert!(pool.idle.lock().expect("lock").values().all(Vec::is_empty));
        }
    }

    #[tokio::test]
    async fn an_early_answer_stops_a_large_upload() {
        // The instance refuses after the head, without reading the body.
        let (authority, _) = raw_server(
            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            true,
        )
        .await;
        let pool = Arc::new(H1Pool::default());
        let big = Body::full(vec![0u8; 32 << 20]);
        let response = tokio::time::timeout(
            Duration::from_secs(10),
            pool.send(&authority, request_to(&authority, Method::POST, "/", big)),
        )
        .await
        .expect("no deadlock")
        .expect("answer");
        assert_eq!(response.status(), http::StatusCode::PAYLOAD_TOO_LARGE);
    }

    /// A request body of unknown length (chunked from the caller) streams
    /// to the instance chunked, through a proxy made of this client.
    #[tokio::test]
    async fn a_streamed_request_body_goes_chunked() {
        let (authority, _, _) = upstream().await;
        let pool = Arc::new(H1Pool::default());
        let proxy = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let proxy_addr = proxy.local_addr().expect("addr");
        let target = authority.clone();
        tokio::spawn(async move {
            let (stream, _) = proxy.accept().await.expect("accept");
            let service = service_fn(move |req: Request<Incoming>| {
                let (pool, target) = (pool.clone(), target.clone());
                async move {
                    let (parts, body) = req.into_parts();
                    let request = Request::from_parts(parts, Body::Stream(body));
                    pool.send(&target, request).await
                }
            });
            let _ = server::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        let stream = TcpStream::connect(proxy_addr).await.expect("connect");
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        let (tx, rx) = mpsc::channel::<FrameResult>(4);
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let request = Request::post("/echo")
            .header(header::HOST, authority.as_str())
            .body(body)
            .expect("request");
        let sent = tokio::spawn(async move {
            for piece in ["one ", "two ", "three"] {
                tx.send(Ok(Frame::data(Bytes::from(piece))))
                    .await
                    .expect("send");
            }
        });
        let response = sender.send_request(request).await.expect("answer");
        sent.await.expect("sender");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(body, "one two three");
    }
}
