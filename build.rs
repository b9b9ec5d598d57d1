//! Compiles `proto/` with protox (a pure-Rust protobuf compiler: no `protoc`
//! needed):
//! - `joinery/v1` → prost messages and tonic services, plus the descriptor
//!   set served by gRPC reflection;
//! - the standard message library `interop/**` (with `buf/validate` and
//!   `joinery/rules`) → a descriptor set embedded in the binary, from which
//!   the schema registry starts.

use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);

    let protos = [
        "proto/joinery/v1/broker.proto",
        "proto/joinery/v1/admin.proto",
        "proto/joinery/v1/schemas.proto",
        "proto/joinery/v1/bench.proto",
    ];
    let fds = protox::compile(protos, ["proto"])?;
    std::fs::write(
        out.join("joinery_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::StrictCodec")
        // A payload decoded from a request or a stored value is a slice of
        // the buffer it came in, not a copy.
        .bytes(".joinery.v1.Envelope.payload")
        .compile_fds(fds)?;

    let mut library = vec![
        "joinery/rules/v1/rules.proto".to_string(),
        // For the broker's own messages (delivery reports).
        "joinery/v1/broker.proto".to_string(),
        // For `joinery bench` load runs.
        "joinery/v1/bench.proto".to_string(),
    ];
    collect_protos(Path::new("proto"), Path::new("proto/interop"), &mut library)?;
    library.sort();
    // Encoded by protox itself: prost_types would drop the custom options
    // (buf.validate and joinery rules) that validation reads.
    let library = protox::Compiler::new(["proto"])?
        .include_imports(true)
        .include_source_info(true)
        .open_files(&library)?
        .encode_file_descriptor_set();
    std::fs::write(out.join("interop_library.bin"), library)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

/// Every `.proto` under `dir`, as paths relative to `root`.
fn collect_protos(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            println!("cargo:rerun-if-changed={}", path.display());
            collect_protos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            let relative = path
                .strip_prefix(root)?
                .to_string_lossy()
                .replace('\\', "/");
            out.push(relative);
        }
    }
    Ok(())
}
