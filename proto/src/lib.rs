//! Weir's gRPC API, generated from the `.proto` files under `proto/weir/`.
//!
//! Each package is a module named after it (`weir.registry.v1` is
//! [`registry::v1`]). [`FILE_DESCRIPTOR_SET`] feeds gRPC server reflection.
#![allow(missing_debug_implementations, clippy::all)]

pub mod codec;

/// Encoded `FileDescriptorSet` of every Weir proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("weir_descriptor");

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
