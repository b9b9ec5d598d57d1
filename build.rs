//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no `protoc`
//! needed) and generates prost messages and tonic services from it. The
//! file descriptor set is also written out for server reflection.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/joinery/v1/broker.proto",
        "proto/joinery/v1/admin.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("joinery_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
