//! Every answer the agent makes itself, in one place: why ([`Reason`]),
//! and how that reads to an HTTP caller (status, `weir-reason`,
//! `Retry-After`, a plain-text line a person can read) and to a gRPC
//! caller (a trailers-only response with `grpc-status` and `grpc-message`,
//! or, for the services the agent serves itself, a [`tonic::Status`] with
//! `weir-reason` metadata). Each stage of the policy stack returns a [`Rejection`]; none builds a
//! response of its own.

use std::{borrow::Cow, time::Duration};

use http::{header, HeaderValue, Response, StatusCode};

use crate::body::Body;

/// The `weir-reason` header.
pub const WEIR_REASON: &str = "weir-reason";

/// The header naming the bucket that refused a request (`rate-limited`):
/// `{namespace}/{service}/{rule}`, the rule `default` for the service's
/// own limit.
pub const WEIR_LIMIT: &str = "weir-limit";

/// `weir-reason` on a status a gRPC instance answered itself and the agent
/// passes on (`Publisher/Send` to a `Subscriber`): not a [`Reason`], since
/// the agent did not refuse.
pub const INSTANCE_STATUS: &str = "instance-status";

/// The metadata entry naming the instance whose status is passed on.
pub const WEIR_INSTANCE: &str = "weir-instance";

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
    /// The policy's deadline (total or per try) passed before an answer.
    Timeout,
    /// A publish to a topic no service subscribes to (agent setting).
    NoSubscriber,
    /// The outbox cannot take the event: not configured (`--data-dir`),
    /// not readable, or stopped after a write error.
    OutboxUnavailable,
    /// The outbox is at its quota (`--outbox-max-bytes`).
    OutboxFull,
    /// The target's rate limit refused the request (`weir-limit` names
    /// which).
    RateLimited,
    /// Every endpoint of the service has its circuit breaker open: the
    /// agent fails fast rather than sending to a failing service.
    CircuitOpen,
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
            Reason::Timeout => "timeout",
            Reason::NoSubscriber => "no-subscriber",
            Reason::OutboxUnavailable => "outbox-unavailable",
            Reason::OutboxFull => "outbox-full",
            Reason::RateLimited => "rate-limited",
            Reason::CircuitOpen => "circuit-open",
        }
    }

    pub fn http_status(self) -> StatusCode {
        match self {
            Reason::UnknownService => StatusCode::NOT_FOUND,
            Reason::NoTarget | Reason::BadEvent => StatusCode::BAD_REQUEST,
            Reason::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reason::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Reason::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Reason::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Reason::NoSubscriber => StatusCode::NOT_FOUND,
            Reason::OutboxUnavailable | Reason::OutboxFull => StatusCode::SERVICE_UNAVAILABLE,
            Reason::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Reason::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The gRPC status code (as in `google.rpc.Code`).
    pub fn grpc_code(self) -> u16 {
        match self {
            Reason::UnknownService => 5,                            // NOT_FOUND
            Reason::NoTarget | Reason::BadEvent => 3,               // INVALID_ARGUMENT
            Reason::TooLarge => 8,                                  // RESOURCE_EXHAUSTED
            Reason::NoEndpoint | Reason::UpstreamUnavailable => 14, // UNAVAILABLE
            Reason::Timeout => 4,                                   // DEADLINE_EXCEEDED
            Reason::NoSubscriber => 5,                              // NOT_FOUND
            Reason::OutboxUnavailable => 14,                        // UNAVAILABLE
            Reason::OutboxFull => 8,                                // RESOURCE_EXHAUSTED
            Reason::RateLimited => 8,                               // RESOURCE_EXHAUSTED
            Reason::CircuitOpen => 14,                              // UNAVAILABLE
        }
    }

    /// Every reason, for metrics set up front.
    pub const ALL: [Reason; 12] = [
        Reason::UnknownService,
        Reason::NoTarget,
        Reason::NoEndpoint,
        Reason::BadEvent,
        Reason::TooLarge,
        Reason::UpstreamUnavailable,
        Reason::Timeout,
        Reason::NoSubscriber,
        Reason::OutboxUnavailable,
        Reason::OutboxFull,
        Reason::RateLimited,
        Reason::CircuitOpen,
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
    /// The request field at fault, when a gRPC request names it: a
    /// `google.rpc.BadRequest` violation in [`Rejection::into_status`].
    pub field: Option<Cow<'static, str>>,
    /// The bucket that refused, for `weir-limit`.
    pub limit: Option<std::sync::Arc<str>>,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<Cow<'static, str>>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            retry_after: None,
            field: None,
            limit: None,
        }
    }

    /// The same, naming the request field at fault.
    pub fn with_field(mut self, field: impl Into<Cow<'static, str>>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// The status for a caller of a gRPC service the agent serves itself
    /// (`weir.events.v1.Publisher`): the reason's code, the detail as the
    /// message, `weir-reason` (and `retry-after`) metadata, and a
    /// `google.rpc.BadRequest` naming the field when there is one.
    pub fn into_status(self) -> tonic::Status {
        let code = tonic::Code::from_i32(i32::from(self.reason.grpc_code()));
        let mut status = match &self.field {
            Some(field) => {
                use tonic_types::StatusExt;
                tonic::Status::with_error_details(
                    code,
                    self.detail.to_string(),
                    tonic_types::ErrorDetails::with_bad_request_violation(
                        field.to_string(),
                        self.detail.to_string(),
                    ),
                )
            }
            None => tonic::Status::new(code, self.detail.to_string()),
        };
        let metadata = status.metadata_mut();
        metadata.insert(
            WEIR_REASON,
            tonic::metadata::MetadataValue::from_static(self.reason.as_str()),
        );
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            metadata.insert("retry-after", secs.max(1).into());
        }
        if let Some(limit) = self.limit.as_deref() {
            if let Ok(v) = limit.parse() {
                metadata.insert(WEIR_LIMIT, v);
            }
        }
        status
    }

    /// The response for a caller; `grpc` when the request was gRPC.
    pub fn into_response(self, grpc: bool) -> Response<Body> {
        let mut builder = Response::builder().header(WEIR_REASON, self.reason.as_str());
        if let Some(after) = self.retry_after {
            // Whole seconds, rounded up: 0 would mean "now".
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            builder = builder.header(header::RETRY_AFTER, secs.max(1));
        }
        if let Some(limit) = self.limit.as_deref() {
            builder = builder.header(WEIR_LIMIT, limit);
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
    fn statuses_carry_code_reason_and_the_field_at_fault() {
        use tonic_types::StatusExt;
        let s = Rejection::new(Reason::BadEvent, "event.type is required")
            .with_field("event.type")
            .into_status();
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "event.type is required");
        assert_eq!(
            s.metadata().get(WEIR_REASON).map(|v| v.as_encoded_bytes()),
            Some(&b"bad-event"[..])
        );
        let details = s.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "event.type");

        let s = Rejection::new(Reason::UpstreamUnavailable, "gone").into_status();
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert!(s.get_error_details().bad_request().is_none());
        let s = Rejection::new(Reason::UnknownService, "none").into_status();
        assert_eq!(s.code(), tonic::Code::NotFound);
    }

    #[test]
    fn every_reason_has_distinct_wording() {
        let mut seen = std::collections::HashSet::new();
        for r in Reason::ALL {
            assert!(seen.insert(r.as_str()), "{r:?}");
        }
        assert!(
            seen.insert(INSTANCE_STATUS),
            "an instance's status reads as the agent's"
        );
    }
}
