//! The one place where internal errors become gRPC statuses, with a message
//! a caller can act on and no internals beyond that.

use weir_core::validate::ValidationError;

use crate::store::StoreError;

/// Errors of registry operations.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this replica is still loading the registry; retry shortly")]
    NotReady,
}

impl From<RegistryError> for tonic::Status {
    fn from(e: RegistryError) -> Self {
        match &e {
            RegistryError::Invalid(v) => tonic::Status::invalid_argument(v.to_string()),
            RegistryError::NotFound(m) => tonic::Status::not_found(m.clone()),
            RegistryError::Store(StoreError::LeaseNotFound(_)) => {
                tonic::Status::not_found(e.to_string())
            }
            RegistryError::Store(s) => {
                tracing::warn!(error = %s, "store error");
                tonic::Status::unavailable(format!("registry store unavailable: {s}"))
            }
            RegistryError::NotReady => tonic::Status::unavailable(e.to_string()),
        }
    }
}
