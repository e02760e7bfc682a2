//! How weirctl shows an error, and in particular a rejected request: the
//! offending fields come from the `google.rpc.BadRequest` details of the
//! INVALID_ARGUMENT (read by `weir-client` into
//! [`weir_client::Error::field_violations`]), never from splitting the
//! message text. Without details the plain message is shown.

use weir_client::FieldViolation;

/// Each offending field with its rule: `field: rule; field: rule`.
pub fn fields(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// The text after `error: ` for a failed command. A request the control
/// plane rejected with field details names each field and its rule;
/// anything else is the error with its causes.
pub fn error_line(e: &anyhow::Error) -> String {
    // Only a client error passed up as it is: one with context added says
    // more than the fields alone.
    let bare = e.chain().count() == 1;
    match e.downcast_ref::<weir_client::Error>() {
        Some(client) if bare && !client.field_violations().is_empty() => {
            format!("invalid argument: {}", fields(client.field_violations()))
        }
        _ => format!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};
    use tonic_types::{ErrorDetails, StatusExt as _};

    use super::*;

    fn rejected(message: &str, details: ErrorDetails) -> anyhow::Error {
        weir_client::Error::from(Status::with_error_details(
            Code::InvalidArgument,
            message,
            details,
        ))
        .into()
    }

    #[test]
    fn the_offending_field_comes_from_the_bad_request_details() {
        // A message that names no field: what is shown must come from the
        // details.
        let e = rejected(
            "the instance is invalid",
            ErrorDetails::with_bad_request_violation(
                "instance.service",
                "must be lowercase letters, digits and '-' (got \"Bad_Name\")",
            ),
        );
        assert_eq!(
            error_line(&e),
            "invalid argument: instance.service: must be lowercase letters, digits and '-' (got \"Bad_Name\")"
        );
        let two = rejected(
            "the instance is invalid",
            ErrorDetails::with_bad_request(vec![
                tonic_types::FieldViolation::new("instance.port", "must be 1-65535"),
                tonic_types::FieldViolation::new("instance.weight", "must be 1-10000"),
            ]),
        );
        assert_eq!(
            error_line(&two),
            "invalid argument: instance.port: must be 1-65535; instance.weight: must be 1-10000"
        );
    }

    #[test]
    fn without_details_the_plain_message_is_shown() {
        let e: anyhow::Error =
            weir_client::Error::from(Status::invalid_argument("instance.port: must be 1-65535"))
                .into();
        assert_eq!(
            error_line(&e),
            "invalid argument: instance.port: must be 1-65535"
        );
        let e: anyhow::Error = weir_client::Error::from(Status::unavailable("down")).into();
        assert_eq!(error_line(&e), "control plane unavailable: down");
        // Context added by a command is kept.
        let e = rejected(
            "bad",
            ErrorDetails::with_bad_request_violation("instance.port", "must be 1-65535"),
        )
        .context("registering orders");
        assert_eq!(error_line(&e), "registering orders: invalid argument: bad");
    }
}
