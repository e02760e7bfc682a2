//! The one place where the errors of the gRPC services become
//! `tonic::Status`, with a message a caller can act on and no internals.
//!
//! Services return [`ApiError`] from their handlers (`?` converts a
//! [`ValidationError`] or a [`StoreError`]); the single
//! `From<ApiError> for tonic::Status` below picks the code, the message and
//! the structured details:
//!
//! | case | code | details |
//! |---|---|---|
//! | [`ApiError::Invalid`] | INVALID_ARGUMENT | `google.rpc.BadRequest`, one field violation per broken rule |
//! | [`ApiError::NotFound`], lease not found | NOT_FOUND | |
//! | [`ApiError::Conflict`] | FAILED_PRECONDITION | `google.rpc.ErrorInfo` with `current_version` and `expected_version` |
//! | [`ApiError::FailedPrecondition`] | FAILED_PRECONDITION | |
//! | [`ApiError::Aborted`] | ABORTED | |
//! | [`ApiError::Exhausted`] | RESOURCE_EXHAUSTED | |
//! | [`ApiError::NotReady`], [`ApiError::Unavailable`], store unreachable | UNAVAILABLE | |
//! | [`ApiError::DeadlineExceeded`], store too slow | DEADLINE_EXCEEDED | |
//! | [`ApiError::Cancelled`] | CANCELLED | |
//! | [`ApiError::Internal`] | INTERNAL | |
//!
//! Store and internal errors are logged here with their full detail and
//! answered with a fixed sentence: the etcd client's text never reaches a
//! caller.

use std::{collections::HashMap, error::Error as StdError, fmt};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use weir_core::validate::ValidationError;

use crate::store::StoreError;

/// `google.rpc.ErrorInfo` domain of Weir's structured errors.
pub const ERROR_DOMAIN: &str = "weir.dev";
/// `ErrorInfo.reason` of [`ApiError::Conflict`].
pub const REASON_VERSION_CONFLICT: &str = "VERSION_CONFLICT";

/// Why a call of Weir's gRPC API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request broke one or more rules (never empty).
    #[error("{}", Violations(.0))]
    Invalid(Vec<ValidationError>),
    /// What the caller named does not exist; the message says what.
    #[error("{0}")]
    NotFound(String),
    /// A write conditioned on a version found another one.
    #[error(
        "{kind} {name} {}, not the expected version {expected}; read it again and retry (current_version={current})",
        Now { kind, current: *current }
    )]
    Conflict {
        /// What kind of record, e.g. "policy".
        kind: &'static str,
        /// Which one, e.g. "default/orders".
        name: String,
        /// Its version now (0: none).
        current: u64,
        /// The version the caller expected.
        expected: u64,
    },
    /// The call needs a state the caller must bring about first (e.g. an
    /// agent session for a registration on a node's behalf); the message
    /// says which.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The write lost races too often; the message says what to retry.
    #[error("{0}")]
    Aborted(String),
    /// A bound on work in flight is reached (e.g. requests waiting on one
    /// agent); the message says which.
    #[error("{0}")]
    Exhausted(String),
    /// This replica has not loaded its cache yet.
    #[error("this replica is still loading the registry; retry shortly")]
    NotReady,
    /// A state the caller should reconnect or retry from (e.g. a session
    /// whose lease was lost).
    #[error("{0}")]
    Unavailable(&'static str),
    /// A wait bounded by the server ran out; the message says which.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller went away before the answer.
    #[error("{0}")]
    Cancelled(&'static str),
    /// The store failed or did not answer in time.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A bug or corrupt stored data: `message` is for the caller, `source`
    /// only for the log.
    #[error("{message}")]
    Internal {
        message: String,
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Invalid(vec![e])
    }
}

impl ApiError {
    /// One broken rule.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            rule: rule.into(),
        }
        .into()
    }

    /// A bug or corrupt data: `message` is what the caller reads.
    pub fn internal(
        message: impl Into<String>,
        source: impl Into<Box<dyn StdError + Send + Sync>>,
    ) -> Self {
        ApiError::Internal {
            message: message.into(),
            source: source.into(),
        }
    }

    /// The gRPC code this error is answered with.
    pub fn code(&self) -> Code {
        match self {
            ApiError::Invalid(_) => Code::InvalidArgument,
            ApiError::NotFound(_) | ApiError::Store(StoreError::LeaseNotFound(_)) => Code::NotFound,
            ApiError::Conflict { .. } | ApiError::FailedPrecondition(_) => Code::FailedPrecondition,
            ApiError::Aborted(_) => Code::Aborted,
            ApiError::Exhausted(_) => Code::ResourceExhausted,
            ApiError::NotReady | ApiError::Unavailable(_) => Code::Unavailable,
            ApiError::DeadlineExceeded(_) | ApiError::Store(StoreError::Timeout(_)) => {
                Code::DeadlineExceeded
            }
            ApiError::Store(StoreError::Unavailable(_) | StoreError::Protocol(_)) => {
                Code::Unavailable
            }
            ApiError::Cancelled(_) => Code::Cancelled,
            ApiError::Internal { .. } => Code::Internal,
        }
    }
}

/// Field violations joined for the status message: `field: rule; ...`.
struct Violations<'a>(&'a [ValidationError]);

impl fmt::Display for Violations<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, v) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// How a conflicting record stands now.
struct Now<'a> {
    kind: &'a str,
    current: u64,
}

impl fmt::Display for Now<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.current == 0 {
            write!(f, "has no {}", self.kind)
        } else {
            write!(f, "is at version {}", self.current)
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        match e {
            ApiError::Invalid(violations) => {
                let message = Violations(&violations).to_string();
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.rule))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(code, message, details)
            }
            ApiError::Conflict {
                current, expected, ..
            } => {
                let message = e.to_string();
                let details = ErrorDetails::with_error_info(
                    REASON_VERSION_CONFLICT,
                    ERROR_DOMAIN,
                    HashMap::from([
                        ("current_version".to_owned(), current.to_string()),
                        ("expected_version".to_owned(), expected.to_string()),
                    ]),
                );
                Status::with_error_details(code, message, details)
            }
            ApiError::Store(StoreError::LeaseNotFound(_)) => Status::new(code, e.to_string()),
            ApiError::Store(StoreError::Timeout(limit)) => {
                tracing::warn!(timeout = ?limit, "store call timed out");
                Status::new(
                    code,
                    format!(
                        "the registry store did not answer within {}s; the change may or may not have been applied; retry",
                        limit.as_secs_f32()
                    ),
                )
            }
            ApiError::Store(store) => {
                tracing::warn!(error = %store, "store call failed");
                Status::new(code, "the registry store is unavailable; retry")
            }
            ApiError::Internal { message, source } => {
                tracing::error!(error = %source, %message, "internal error");
                Status::new(
                    code,
                    format!("{message} (a server-side fault, logged by the control plane)"),
                )
            }
            other => Status::new(code, other.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn violation(field: &str, rule: &str) -> ValidationError {
        ValidationError {
            field: field.into(),
            rule: rule.into(),
        }
    }

    #[test]
    fn invalid_carries_bad_request_field_violations() {
        let e = ApiError::Invalid(vec![
            violation("instance.port", "must be 1-65535 (got 0)"),
            violation("instance.host", "is required"),
        ]);
        let status = Status::from(e);
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "instance.port: must be 1-65535 (got 0); instance.host: is required"
        );
        let bad = status.get_details_bad_request().expect("BadRequest");
        let fields: Vec<(&str, &str)> = bad
            .field_violations
            .iter()
            .map(|v| (v.field.as_str(), v.description.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("instance.port", "must be 1-65535 (got 0)"),
                ("instance.host", "is required")
            ]
        );
    }

    #[test]
    fn conflict_keeps_its_message_and_adds_the_versions() {
        let e = ApiError::Conflict {
            kind: "policy",
            name: "default/cart".into(),
            current: 7,
            expected: 5,
        };
        let status = Status::from(e);
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "policy default/cart is at version 7, not the expected version 5; read it again and retry (current_version=7)"
        );
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, REASON_VERSION_CONFLICT);
        assert_eq!(info.metadata["current_version"], "7");
        assert_eq!(info.metadata["expected_version"], "5");

        let none = Status::from(ApiError::Conflict {
            kind: "policy",
            name: "default/cart".into(),
            current: 0,
            expected: 3,
        });
        assert!(
            none.message()
                .starts_with("policy default/cart has no policy,"),
            "{}",
            none.message()
        );
    }

    #[test]
    fn store_errors_are_answered_without_their_internals() {
        let secret = "etcdserver: request timed out, grpc://10.0.0.7:2379";
        let status = Status::from(ApiError::Store(StoreError::Unavailable(secret.into())));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("etcdserver"), "{status:?}");
        assert!(!status.message().contains("10.0.0.7"), "{status:?}");

        let status = Status::from(ApiError::Store(StoreError::Protocol(secret.into())));
        assert_eq!(status.code(), Code::Unavailable);
        assert!(!status.message().contains("etcdserver"), "{status:?}");

        let status = Status::from(ApiError::Store(StoreError::Timeout(Duration::from_secs(3))));
        assert_eq!(status.code(), Code::DeadlineExceeded);
        assert!(status.message().contains("within 3s"), "{status:?}");

        let status = Status::from(ApiError::internal(
            "the stored policy of default/cart cannot be read",
            secret,
        ));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("etcdserver"), "{status:?}");
        assert!(status.message().contains("default/cart"), "{status:?}");
    }

    #[test]
    fn lease_not_found_stays_not_found() {
        let status = Status::from(ApiError::Store(StoreError::LeaseNotFound(42)));
        assert_eq!(status.code(), Code::NotFound);
        assert!(status.message().contains("42"), "{status:?}");
    }

    #[test]
    fn the_other_cases_keep_their_codes() {
        for (e, code) in [
            (
                ApiError::NotFound("no policy for a/b".into()),
                Code::NotFound,
            ),
            (ApiError::Aborted("retry".into()), Code::Aborted),
            (
                ApiError::FailedPrecondition("node n1 has no live agent session".into()),
                Code::FailedPrecondition,
            ),
            (ApiError::Exhausted("busy".into()), Code::ResourceExhausted),
            (ApiError::NotReady, Code::Unavailable),
            (ApiError::Unavailable("reconnect"), Code::Unavailable),
            (
                ApiError::DeadlineExceeded("min_revision".into()),
                Code::DeadlineExceeded,
            ),
            (ApiError::Cancelled("agent left"), Code::Cancelled),
        ] {
            let message = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }
}
