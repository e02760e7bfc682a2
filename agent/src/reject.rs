//! Every answer the agent makes itself, in one place: why ([`Reason`]),
//! and how that reads to an HTTP caller (status, `weir-reason`,
//! `Retry-After`, a plain-text line a person can read) and to a gRPC
//! caller (a trailers-only response with `grpc-status` and `grpc-message`).
//! Each stage of the policy stack returns a [`Rejection`]; none builds a
//! response of its own.

use std::{borrow::Cow, time::Duration};

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

/// The `weir-reason` header.
pub const WEIR_REASON: &str = "weir-reason";

/// Why the agent answered instead of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The request names no service the registry knows.
    UnknownService,
    /// The request does not say which service it is for.
    NoTarget,
    /// The service has no instance that can take the request.
    NoEndpoint,
    /// A CloudEvent (or batch) is malformed; the detail names what.
    BadEvent,
    /// The body is larger than the agent reads whole.
    TooLarge,
    /// The instance could not be reached or broke the exchange.
    UpstreamUnavailable,
}

impl Reason {
    /// The `weir-reason` header value: stable, for programs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownService => "unknown-service",
            Reason::NoTarget => "no-target",
            Reason::NoEndpoint => "no-endpoint",
            Reason::BadEvent => "bad-event",
            Reason::TooLarge => "too-large",
            Reason::UpstreamUnavailable => "upstream-unavailable",
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Reason::UnknownService => StatusCode::NOT_FOUND,
            Reason::NoTarget | Reason::BadEvent => StatusCode::BAD_REQUEST,
            Reason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
        }
    }

    /// The gRPC status code (as in `google.rpc.Code`).
    pub fn grpc_code(self) -> u16 {
        match self {
            Reason::UnknownService => 5,                            // NOT_FOUND
            Reason::NoTarget | Reason::BadEvent => 3,               // INVALID_ARGUMENT
            Reason::TooLarge => 8,                                  // RESOURCE_EXHAUSTED
            Reason::NoEndpoint | Reason::UpstreamUnavailable => 14, // UNAVAILABLE
        }
    }

    /// Every reason, for metrics set up front.
    pub const ALL: [Reason; 6] = [
        Reason::UnknownService,
        Reason::NoTarget,
        Reason::NoEndpoint,
        Reason::BadEvent,
        Reason::TooLarge,
        Reason::UpstreamUnavailable,
    ];
}

/// An answer the agent makes itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", reason.as_str())]
pub struct Rejection {
    pub reason: Reason,
    /// What a person reads: which service, which attribute.
    pub detail: Cow<'static, str>,
    /// When to try again, if the stage knows.
    pub retry_after: Option<Duration>,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// The response for a caller; `grpc` when the request was gRPC.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let mut builder = Response::builder().header(WEIR_REASON, self.reason.as_str());
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: 0 would mean "now".
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            builder = builder.header(header::RETRY_AFTER, secs.max(1));
        }
        let response = if grpc {
            builder
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/grpc")
                .header("grpc-status", self.reason.grpc_code())
                .header("grpc-message", grpc_message(&self.detail))
                .body(Body::Empty)
        } else {
            builder
                .status(self.reason.http_status())
                .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                .body(Body::full(format!("{}\n", self.detail)))
        };
        // Every part above is a valid header value by construction.
        response.unwrap_or_else(|_| {
            let mut r = Response::new(Body::Empty);
            *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            r
        })
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2, "Responses").
fn grpc_message(text: &str) -> HeaderValue {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("rejected"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_rejections_carry_status_reason_and_a_readable_line() {
        let r = Rejection::new(
            Reason::NoEndpoint,
            "service default/orders has no usable instance",
        );
        let resp = r.into_response(false);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(resp.headers()[WEIR_REASON], "no-endpoint");
        assert!(resp.headers().get(header::RETRY_AFTER).is_none());
    }

    #[test]
    fn grpc_rejections_are_trailers_only_with_an_encoded_message() {
        let mut r = Rejection::new(Reason::BadEvent, "ce-type is required (100%)");
        r.retry_after = Some(Duration::from_millis(1500));
        let resp = r.into_response(true);
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["grpc-status"], "3");
        assert_eq!(
            resp.headers()["grpc-message"],
            "ce-type is required (100%25)"
        );
        assert_eq!(resp.headers()[header::RETRY_AFTER], "2");
        assert_eq!(resp.headers()[WEIR_REASON], "bad-event");
    }

    #[test]
    fn every_reason_has_distinct_wording() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r:?}");
        }
    }
}
