//! Generates the gRPC server for containerd's snapshots API from
//! proto/snapshots.proto with protox (pure Rust: no `protoc` needed to build).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/snapshots.proto");
    let fds = protox::compile(["proto/snapshots.proto"], ["proto"])?;
    // The client only for the tests (feature test-support).
    let client = std::env::var_os("CARGO_FEATURE_TEST_SUPPORT").is_some();
    tonic_prost_build::configure()
        .build_client(client)
        .compile_fds(fds)?;
    Ok(())
}
