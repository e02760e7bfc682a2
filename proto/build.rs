use std::{
    env,
    path::{Path, PathBuf},
};

use prost_build::{Service, ServiceGenerator};

/// Generates clients with tonic's prost codec and servers with
/// `weir_proto::codec::RequestCodec`, which answers an undecodable request
/// with INVALID_ARGUMENT (tonic's codec says INTERNAL, which blames the
/// server for the caller's bytes). A client decoding a server's answer
/// keeps tonic's behaviour.
struct SplitCodecs {
    clients: Box<dyn ServiceGenerator>,
    servers: Box<dyn ServiceGenerator>,
}

impl ServiceGenerator for SplitCodecs {
    fn generate(&mut self, service: Service, buf: &mut String) {
        self.clients.generate(service.clone(), buf);
        self.servers.generate(service, buf);
    }

    fn finalize(&mut self, buf: &mut String) {
        self.clients.finalize(buf);
        self.servers.finalize(buf);
    }

    fn finalize_package(&mut self, package: &str, buf: &mut String) {
        self.clients.finalize_package(package, buf);
        self.servers.finalize_package(package, buf);
    }
}

/// A config for protos with services: tonic clients and servers, one
/// descriptor set.
fn grpc_config(out: &Path, descriptor: &Path) -> prost_build::Config {
    let mut config = prost_build::Config::new();
    config
        .out_dir(out)
        // As tonic-prost-build's own compile_protos does.
        .type_attribute(".", "#[allow(clippy::all)]")
        .file_descriptor_set_path(descriptor)
        .service_generator(Box::new(SplitCodecs {
            clients: tonic_prost_build::configure()
                .build_server(false)
                .service_generator(),
            servers: tonic_prost_build::configure()
                .build_client(false)
                .codec_path("crate::codec::RequestCodec")
                .service_generator(),
        }));
    config
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // What the control plane serves (and lists through reflection).
    let protos = [
        "weir/registry/v1/registry.proto",
        "weir/policy/v1/policy.proto",
        "weir/agent/v1/agent.proto",
        "weir/telemetry/v1/telemetry.proto",
        // No services: what an agent keeps on disk (`--data-dir`).
        "weir/agent/v1/state.proto",
    ];
    let descriptor = out.join("weir_descriptor.bin");
    grpc_config(&out, &descriptor).compile_protos(&protos, &["."])?;
    // Proto3 JSON (and so YAML) for policies: `weirctl policy set -f`.
    let descriptor_set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .build(&[".weir.policy"])?;

    // The CloudEvents format has no services. It is generated on its own
    // and referred to by path: prost would otherwise refer to it relative
    // to `weir.*` (three `super`s), which our one-module-per-package
    // layout (`crate::cloudevents::v1`) does not match.
    let cloudevents = "io/cloudevents/v1/cloudevents.proto";
    prost_build::Config::new()
        .out_dir(&out)
        .type_attribute(".", "#[allow(clippy::all)]")
        // Event data passes through the agent without a copy.
        .bytes(["."])
        .compile_protos(&[cloudevents], &["."])?;
    // What the agent serves on its ingress: a descriptor set of its own,
    // so the control plane's reflection does not list it.
    let events = "weir/events/v1/events.proto";
    grpc_config(&out, &out.join("weir_events_descriptor.bin"))
        .extern_path(".io.cloudevents.v1", "crate::cloudevents::v1")
        .bytes([".weir.events.v1"])
        .compile_protos(&[events], &["."])?;

    // What the agent's outbox writes to its own log: no services.
    let outbox = "weir/outbox/v1/outbox.proto";
    prost_build::Config::new()
        .out_dir(&out)
        .extern_path(".io.cloudevents.v1", "crate::cloudevents::v1")
        .compile_protos(&[outbox], &["."])?;

    for p in protos.iter().chain([&cloudevents, &events, &outbox]) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
