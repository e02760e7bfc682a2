use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let protos = [
        "weir/registry/v1/registry.proto",
        "weir/policy/v1/policy.proto",
        "weir/agent/v1/agent.proto",
    ];
    let descriptor = out.join("weir_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptor)
        .compile_protos(&protos, &["."])?;
    // Proto3 JSON (and so YAML) for policies: `weirctl policy set -f`.
    let descriptor_set = std::fs::read(&descriptor)?;
    pbjson_build::Builder::new()
        .register_descriptors(&descriptor_set)?
        .build(&[".weir.policy"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
