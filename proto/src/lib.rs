//! Weir's gRPC API, generated from the `.proto` files under `proto/weir/`,
//! and the CloudEvents protobuf format (`proto/io/cloudevents/`).
//!
//! Each package is a module named after it (`weir.registry.v1` is
//! [`registry::v1`], `io.cloudevents.v1` is [`cloudevents::v1`]).
//! Well-known types (`google.protobuf.Any`, `Timestamp`) are
//! [`prost_types`]'s. [`FILE_DESCRIPTOR_SET`] feeds the control plane's
//! gRPC server reflection.
#![allow(missing_debug_implementations, clippy::all)]

pub mod codec;

/// Encoded `FileDescriptorSet` of the control plane's protos (registry,
/// policy, agent session), for its server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weir_descriptor");

/// Encoded `FileDescriptorSet` of `weir.events.v1` (with the CloudEvents
/// format it imports), which agents serve on their ingress.
pub const EVENTS_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("weir_events_descriptor");

pub mod registry {
    pub mod v1 {
        tonic::include_proto!("weir.registry.v1");
    }
}

pub mod policy {
    pub mod v1 {
        tonic::include_proto!("weir.policy.v1");
        // serde in the proto3 JSON mapping (enum names, camelCase accepted).
        include!(concat!(env!("OUT_DIR"), "/weir.policy.v1.serde.rs"));
    }
}

pub mod agent {
    pub mod v1 {
        tonic::include_proto!("weir.agent.v1");
    }
}

pub mod telemetry {
    pub mod v1 {
        tonic::include_proto!("weir.telemetry.v1");
    }
}

pub mod events {
    pub mod v1 {
        tonic::include_proto!("weir.events.v1");
    }
}

/// The CloudEvents protobuf format (`io.cloudevents.v1`), as the spec
/// defines it.
pub mod outbox {
    pub mod v1 {
        tonic::include_proto!("weir.outbox.v1");
    }
}

pub mod cloudevents {
    pub mod v1 {
        tonic::include_proto!("io.cloudevents.v1");
    }
}

pub use prost_types;
