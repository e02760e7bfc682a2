//! Calling `weir.events.v1.Subscriber/Deliver` on a gRPC instance, over
//! the worker's HTTP/2 pool ([`Upstreams`]): no second pool, no tonic
//! channel per instance.
//!
//! A unary gRPC call is small enough to do by hand: one length-prefixed
//! message out ([`frame`]), and an answer read whole and judged by a pure
//! function ([`read_answer`]): the instance's status (from the trailers,
//! or the headers of a trailers-only answer) and, on OK, its one
//! `DeliverResponse`. What is not a gRPC answer is a [`Broken`] exchange,
//! which [`Broken::into_rejection`] turns into the agent's own
//! [`Rejection`] in one place.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::{header, uri::PathAndQuery, HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Limited};
use prost::Message as _;
use weir_proto::events::v1::{DeliverRequest, DeliverResponse};

use super::forward::{Failed, Upstreams};
use crate::{
    balance::Endpoint,
    body::Body,
    reject::{Reason, Rejection},
    retry::Class,
};

/// The method's path (`/{package}.{service}/{method}`).
pub const DELIVER_PATH: &str = "/weir.events.v1.Subscriber/Deliver";

/// How a delivery that did not end with OK ended.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// The agent's own answer: the instance could not be reached, broke
    /// the exchange, or answered more than the agent reads; with how it
    /// failed, for retries.
    #[error("{}", .0.rejection)]
    Failed(Failed),
    /// The instance answered a status other than OK.
    #[error("the instance answered {}: {}", .0.code(), .0.message())]
    Refused(tonic::Status),
}

impl From<Failed> for DeliverError {
    fn from(f: Failed) -> Self {
        Self::Failed(f)
    }
}

impl From<Rejection> for DeliverError {
    fn from(r: Rejection) -> Self {
        Self::Failed(r.into())
    }
}

/// An answer that is not a gRPC answer to a unary call.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error("answered HTTP {0} without a grpc-status (is it a gRPC server?)")]
    HttpStatus(StatusCode),
    #[error("ended its answer without a grpc-status")]
    NoStatus,
    #[error("answered OK without a DeliverResponse")]
    NoMessage,
    #[error("answered OK with more than one message")]
    ExtraMessage,
    #[error("sent a compressed message the agent did not ask for")]
    Compressed,
    #[error("sent a truncated message")]
    Truncated,
    #[error("sent a DeliverResponse that does not decode: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("broke off its answer: {0}")]
    Interrupted(String),
    #[error("answered more than {0} bytes")]
    TooLarge(usize),
}

impl Broken {
    /// The one place a broken exchange becomes the agent's answer: too
    /// large is `too-large`, the rest `upstream-unavailable`, naming the
    /// instance.
    pub fn into_rejection(self, endpoint: &Endpoint) -> Rejection {
        let reason = match self {
            Broken::TooLarge(_) => Reason::TooLarge,
            _ => Reason::UpstreamUnavailable,
        };
        Rejection::new(
            reason,
            format!(
                "instance {} at {} {self} to {DELIVER_PATH}",
                endpoint.id, endpoint.authority
            ),
        )
    }
}

/// `message` as a gRPC length-prefixed message: flag 0 (not compressed),
/// the length as a big-endian u32, the bytes.
pub fn frame(message: &DeliverRequest) -> Result<Bytes, Rejection> {
    let len = message.encoded_len();
    let prefix = u32::try_from(len).map_err(|_| {
        Rejection::new(
            Reason::TooLarge,
            format!("the DeliverRequest is {len} bytes, more than gRPC frames carry"),
        )
    })?;
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(prefix);
    // Capacity is reserved above: encoding into it cannot run out.
    message.encode(&mut buf).map_err(|e| {
        Rejection::new(
            Reason::TooLarge,
            format!("the DeliverRequest does not encode: {e}"),
        )
    })?;
    Ok(buf.freeze())
}

/// Calls `Deliver` on `endpoint`, reading at most `max` bytes of answer.
/// OK: the `DeliverResponse` as the instance encoded it.
pub async fn deliver(
    upstreams: &Upstreams,
    endpoint: &Endpoint,
    message: &DeliverRequest,
    max: usize,
    trace: Option<crate::telemetry::Propagation>,
) -> Result<Bytes, DeliverError> {
    let mut request = Request::new(Body::full(frame(message)?));
    *request.method_mut() = Method::POST;
    let headers = request.headers_mut();
    if let Some(t) = trace {
        t.apply(headers);
    }
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    let response = upstreams
        .send(
            endpoint,
            request,
            Some(PathAndQuery::from_static(DELIVER_PATH)),
            true,
        )
        .await?;
    let (parts, body) = response.into_parts();
    let collected = match Limited::new(body, max).collect().await {
        Ok(c) => c,
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Broken::TooLarge(max).into_rejection(endpoint).into())
        }
        Err(e) => {
            // Broken off after the head: as a reset.
            return Err(Failed {
                class: Some(Class::Reset),
                rejection: Broken::Interrupted(e.to_string()).into_rejection(endpoint),
            }
            .into());
        }
    };
    let trailers = collected.trailers().cloned();
    match read_answer(
        parts.status,
        &parts.headers,
        collected.to_bytes(),
        trailers.as_ref(),
    ) {
        Ok(Answer::Ok(body)) => Ok(body),
        Ok(Answer::Refused(status)) => Err(DeliverError::Refused(status)),
        Err(broken) => Err(broken.into_rejection(endpoint).into()),
    }
}

/// What an instance answered a unary call.
#[derive(Debug)]
pub enum Answer {
    /// OK, with its `DeliverResponse` as encoded.
    Ok(Bytes),
    /// Any other status.
    Refused(tonic::Status),
}

/// Judges a whole answer: the status from the headers (a trailers-only
/// answer) or the trailers, and on OK exactly one uncompressed message
/// that decodes as a `DeliverResponse`.
pub fn read_answer(
    http_status: StatusCode,
    headers: &HeaderMap,
    body: Bytes,
    trailers: Option<&HeaderMap>,
) -> Result<Answer, Broken> {
    let status = match grpc_status(headers) {
        Some(s) => s,
        None if http_status != StatusCode::OK => return Err(Broken::HttpStatus(http_status)),
        None => trailers.and_then(grpc_status).ok_or(Broken::NoStatus)?,
    };
    if status.code() != tonic::Code::Ok {
        return Ok(Answer::Refused(status));
    }
    if body.is_empty() {
        return Err(Broken::NoMessage);
    }
    if body.len() < 5 {
        return Err(Broken::Truncated);
    }
    if body[0] != 0 {
        return Err(Broken::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let end = 5usize.checked_add(len).ok_or(Broken::Truncated)?;
    if body.len() < end {
        return Err(Broken::Truncated);
    }
    if body.len() > end {
        return Err(Broken::ExtraMessage);
    }
    let message = body.slice(5..end);
    DeliverResponse::decode(message.clone())?;
    Ok(Answer::Ok(message))
}

/// The status in `grpc-status`, `grpc-message` (percent-decoded) and
/// `grpc-status-details-bin` (base64), if `headers` has a `grpc-status`.
/// Written here rather than `tonic::Status::from_header_map`, which panics
/// on details that are not base64: an instance's bad trailer must not.
fn grpc_status(headers: &HeaderMap) -> Option<tonic::Status> {
    let code = tonic::Code::from_bytes(headers.get("grpc-status")?.as_bytes());
    let message = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    let details =
        headers
            .get("grpc-status-details-bin")
            .and_then(|v| match base64_decode(v.as_bytes()) {
                Ok(d) => Some(d),
                Err(e) => {
                    tracing::debug!(error = %e, "grpc-status-details-bin is not base64; dropped");
                    None
                }
            });
    Some(match details {
        Some(d) => tonic::Status::with_details(code, message, Bytes::from(d)),
        None => tonic::Status::new(code, message),
    })
}

/// Base64 as gRPC sends binary metadata: standard alphabet, padding
/// optional.
fn base64_decode(text: &[u8]) -> Result<Vec<u8>, base64::DecodeError> {
    use base64::engine::{general_purpose, DecodePaddingMode, GeneralPurpose};
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        general_purpose::GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(text)
}

/// `grpc-message` is percent-encoded; a bad escape is kept as it is.
fn percent_decode(text: &[u8]) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'%' && i + 2 < text.len() {
            if let (Some(h), Some(l)) = (hex(text[i + 1]), hex(text[i + 2])) {
                // Two hex digits: at most 0xff.
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(text[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use weir_proto::{cloudevents::v1::CloudEvent, events::v1::subscriber_server::SERVICE_NAME};

    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        crate::ingress::test_headers(pairs)
    }

    fn ok_body(message: &[u8]) -> Bytes {
        let mut b = vec![0, 0, 0, 0, message.len() as u8];
        b.extend_from_slice(message);
        Bytes::from(b)
    }

    #[test]
    fn the_path_is_the_generated_service_name() {
        assert_eq!(DELIVER_PATH, format!("/{SERVICE_NAME}/Deliver"));
    }

    #[test]
    fn a_frame_is_flag_length_and_message() {
        let message = DeliverRequest {
            event: Some(CloudEvent {
                id: "e-1".into(),
                ..CloudEvent::default()
            }),
            attempt: 1,
            path: "/".into(),
            ..DeliverRequest::default()
        };
        let f = frame(&message).expect("encodes");
        assert_eq!(f[0], 0);
        let len = u32::from_be_bytes([f[1], f[2], f[3], f[4]]) as usize;
        assert_eq!(len, f.len() - 5);
        assert_eq!(DeliverRequest::decode(&f[5..]).expect("decodes"), message);
    }

    #[test]
    fn ok_with_one_message_is_delivered() {
        let trailers = headers(&[("grpc-status", "0")]);
        let answer = read_answer(
            StatusCode::OK,
            &HeaderMap::new(),
            ok_body(b""),
            Some(&trailers),
        );
        assert!(
            matches!(&answer, Ok(Answer::Ok(b)) if b.is_empty()),
            "{answer:?}"
        );
    }

    #[test]
    fn a_status_in_the_trailers_or_trailers_only_is_a_refusal() {
        let trailers = headers(&[
            ("grpc-status", "8"),
            ("grpc-message", "slow down: 100%25 full %zz"),
        ]);
        let Ok(Answer::Refused(s)) = read_answer(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::new(),
            Some(&trailers),
        ) else {
            panic!("a refusal");
        };
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(s.message(), "slow down: 100% full %zz");

        // Trailers-only: the status in the headers, whatever follows.
        let head = headers(&[("grpc-status", "3"), ("grpc-message", "bad")]);
        let Ok(Answer::Refused(s)) = read_answer(StatusCode::OK, &head, Bytes::new(), None) else {
            panic!("a refusal");
        };
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "bad");
    }

    #[test]
    fn details_pass_and_bad_details_are_dropped_without_a_panic() {
        let trailers = headers(&[
            ("grpc-status", "14"),
            ("grpc-status-details-bin", "CAE"), // base64 of [8, 1], unpadded
        ]);
        let Ok(Answer::Refused(s)) = read_answer(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::new(),
            Some(&trailers),
        ) else {
            panic!("a refusal");
        };
        assert_eq!(s.details(), &[8, 1]);

        let trailers = headers(&[("grpc-status", "14"), ("grpc-status-details-bin", "!!")]);
        let Ok(Answer::Refused(s)) = read_answer(
            StatusCode::OK,
            &HeaderMap::new(),
            Bytes::new(),
            Some(&trailers),
        ) else {
            panic!("a refusal");
        };
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.details().is_empty());
    }

    #[test]
    fn what_is_not_a_grpc_answer_is_broken() {
        let none = HeaderMap::new();
        let ok = headers(&[("grpc-status", "0")]);
        let read = |status, body: Bytes, trailers: Option<&HeaderMap>| {
            read_answer(status, &none, body, trailers).expect_err("broken")
        };
        assert_eq!(
            read(StatusCode::NOT_FOUND, Bytes::new(), None),
            Broken::HttpStatus(StatusCode::NOT_FOUND)
        );
        assert_eq!(read(StatusCode::OK, Bytes::new(), None), Broken::NoStatus);
        assert_eq!(
            read(StatusCode::OK, Bytes::new(), Some(&ok)),
            Broken::NoMessage
        );
        assert_eq!(
            read(StatusCode::OK, Bytes::from_static(&[0, 0, 0]), Some(&ok)),
            Broken::Truncated
        );
        assert_eq!(
            read(
                StatusCode::OK,
                Bytes::from_static(&[0, 0, 0, 0, 2, 8]),
                Some(&ok)
            ),
            Broken::Truncated
        );
        assert_eq!(
            read(
                StatusCode::OK,
                Bytes::from_static(&[1, 0, 0, 0, 0]),
                Some(&ok)
            ),
            Broken::Compressed
        );
        assert_eq!(
            read(
                StatusCode::OK,
                Bytes::from_static(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                Some(&ok)
            ),
            Broken::ExtraMessage
        );
        // Field 1, wire type 7: not a message.
        assert!(matches!(
            read(StatusCode::OK, ok_body(&[0x0f]), Some(&ok)),
            Broken::Decode(_)
        ));
    }

    #[test]
    fn broken_exchanges_are_the_agents_answers_naming_the_instance() {
        let endpoint = Endpoint::new(
            "g0",
            "127.0.0.1:1".parse().expect("authority"),
            crate::balance::Protocol::Grpc,
            1,
            "",
        );
        let r = Broken::NoStatus.into_rejection(&endpoint);
        assert_eq!(r.reason, Reason::UpstreamUnavailable);
        assert!(
            r.detail.contains("instance g0 at 127.0.0.1:1"),
            "{}",
            r.detail
        );
        let r = Broken::TooLarge(10).into_rejection(&endpoint);
        assert_eq!(r.reason, Reason::TooLarge);
    }
}
