//! Compiles every `.proto` under `ktd/` with tonic-prost-build, using the `protoc` binary vendored
//! from crates.io (no system protoc). Adding a file = adding it to `PROTOS`.

use std::path::PathBuf;

/// Every proto file of the crate, relative to the crate root (the include root).
const PROTOS: &[&str] = &[
    "ktd/v1/akd.proto",
    "ktd/v1/directory.proto",
    "ktd/cluster/v1/cluster.proto",
    "ktd/sequencer/v1/sequencer.proto",
    "ktd/raft/v1/raft.proto",
    "ktd/shard/v1/shard.proto",
    "ktd/auditor/v1/auditor.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // The vendored binary is handed to prost-build directly (the same effect as setting PROTOC,
    // without `std::env::set_var`, which is `unsafe` in edition 2024 and forbidden here).
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ktd_descriptor.bin"))
        .compile_with_config(config, PROTOS, &["."])?;
    Ok(())
}
