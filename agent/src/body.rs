//! The one body type the agent's HTTP paths use, both ways: a streamed
//! body passed through untouched, an instance's HTTP/1.1 answer read off
//! the agent's own connection, bytes the agent holds (a structured event,
//! a rejection), or nothing. An enum, not a boxed trait object, so
//! proxying a request costs no allocation for its body.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::ingress::h1::{H1Error, ResponseBody};

/// Why a body could not be read through.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error(transparent)]
    Peer(#[from] hyper::Error),
    #[error(transparent)]
    Instance(#[from] H1Error),
}

#[derive(Debug, Default)]
pub enum Body {
    /// A body streamed from a peer.
    Stream(Incoming),
    /// An instance's answer on an HTTP/1.1 connection of the agent's own.
    Upstream(ResponseBody),
    /// Bytes in hand (taken once).
    Full(Option<Bytes>),
    /// A peer's body of which the agent read the start (looking for its
    /// end, to keep it for a retry): that start, the trailers if the end
    /// came with them, then the rest of the stream, if any.
    Resumed {
        read: Option<Bytes>,
        trailers: Option<http::HeaderMap>,
        rest: Option<Incoming>,
    },
    #[default]
    Empty,
}

impl Body {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }
}

impl From<Incoming> for Body {
    fn from(b: Incoming) -> Self {
        Self::Stream(b)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            Body::Stream(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            Body::Upstream(b) => b
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(BodyError::from))),
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Resumed {
                read,
                trailers,
                rest,
            } => {
                if let Some(b) = read.take() {
                    return Poll::Ready(Some(Ok(Frame::data(b))));
                }
                if let Some(t) = trailers.take() {
                    return Poll::Ready(Some(Ok(Frame::trailers(t))));
                }
                match rest {
                    Some(r) => Pin::new(r)
                        .poll_frame(cx)
                        .map(|f| f.map(|f| f.map_err(BodyError::from))),
                    None => Poll::Ready(None),
                }
            }
            Body::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream(b) => b.is_end_stream(),
            Body::Upstream(b) => b.is_end_stream(),
            Body::Full(b) => b.is_none(),
            Body::Resumed {
                read,
                trailers,
                rest,
            } => {
                read.is_none()
                    && trailers.is_none()
                    && rest.as_ref().is_none_or(|r| r.is_end_stream())
            }
            Body::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream(b) => b.size_hint(),
            Body::Upstream(b) => b.size_hint(),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Full(None) | Body::Empty => SizeHint::with_exact(0),
            Body::Resumed { read, rest, .. } => {
                let read = read.as_ref().map_or(0, |b| b.len() as u64);
                let rest = rest
                    .as_ref()
                    .map_or_else(|| SizeHint::with_exact(0), |r| r.size_hint());
                let mut hint = SizeHint::new();
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + read);
                }
                hint.set_lower(rest.lower() + read);
                hint
            }
        }
    }
}
