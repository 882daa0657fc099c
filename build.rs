//! Generates the gRPC server for containerd's snapshots API from
//! proto/snapshots.proto with protox (pure Rust: no `protoc` needed to build).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/snapshots.proto");
    let fds = protox::compile(["proto/snapshots.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .compile_fds(fds)?;
    Ok(())
}
