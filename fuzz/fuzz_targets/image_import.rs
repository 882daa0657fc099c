//! `image import`'s handling of untrusted images, without a pool or mounts:
//! - input starting with 0: the rest is a layer tar applied to an empty
//!   directory (`apply_layer`: whiteouts, opaque directories, links,
//!   paths that try to leave the root);
//! - any other first byte: the rest is split into index.json, a manifest and
//!   a config (at 0xff bytes) and written as an OCI layout whose manifest and config
//!   blobs carry the digests they claim; `source_layer_files` reads it.
//! Errors are fine; panics and hangs are bugs. Run it as an unprivileged
//! user (docs/RELIABILITY.md): a bug could otherwise write outside its
//! directory with root's rights.
#![no_main]

use std::fs;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use thinpool::layer::{hex, image, sha256};

fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tp-fuzz-image-")
        .tempdir()
        .expect("temporary directory")
}

fn layout(dir: &Path, data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0xff);
    let index = parts.next().unwrap_or_default();
    let manifest = parts.next().unwrap_or_default();
    let config = parts.next().unwrap_or_default();
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    for b in [manifest, config] {
        fs::write(blobs.join(hex(&sha256(b))), b).unwrap();
    }
    // The index may name the manifest by its real digest: put it where a
    // fuzzer-written "sha256:" digest of 64 zeros would point too.
    fs::write(blobs.join("0".repeat(64)), manifest).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(dir.join("index.json"), index).unwrap();
}

fuzz_target!(|data: &[u8]| {
    let dir = scratch();
    match data.split_first() {
        Some((0, tar)) => {
            let root = dir.path().join("root");
            fs::create_dir(&root).unwrap();
            let _ = image::apply_layer(&root, &mut &tar[..]);
        }
        Some((_, rest)) => {
            let src = dir.path().join("oci");
            layout(&src, rest);
            let scratch = dir.path().join("scratch");
            fs::create_dir(&scratch).unwrap();
            let _ = image::source_layer_files(&src, &scratch);
        }
        None => {}
    }
});
