//! Compiles proto/muster/v1 with protox (no system protoc) and writes the encoded
//! descriptor set for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "types",
        "compute",
        "runs",
        "blobs",
        "agent",
        "cluster",
        "pipelines",
        "metrics",
        "sweeps",
        "access",
        "data",
        "secrets",
    ]
    .map(|f| root.join(format!("muster/v1/{f}.proto")));
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("muster_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
