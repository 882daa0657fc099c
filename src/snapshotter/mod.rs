//! `thinpool snapshotter`: a containerd snapshotter (a proxy plugin answering
//! `containerd.services.snapshots.v1.Snapshots` over gRPC on a Unix socket).
//!
//! It is the pool's one server: it runs the FUSE export and control socket of
//! `thinpool serve` (so the CLI keeps working through the socket) and answers
//! containerd from the same process.
//!
//! - `record`: a snapshot's record, stored as its volume's annotation.
//! - `store`: containerd's semantics on volumes and loop devices.
//! - `filter`: containerd's List filters.
//! - `ext4`: finds an ext4 journal's blocks; `journal`: unmaps a committed
//!   layer's dead journal log.
//! - `service`: the gRPC service over the store.
//!
//! Set-up and figures: README ("Use with containerd"), docs/CONTAINERD.md.

pub mod ext4;
mod filter;
mod index;
mod journal;
mod record;
mod service;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::export::{default_export_dir, serve_with, ExportError, ServeOptions, ServerHandle};
use store::Store;

/// gRPC code generated from proto/snapshots.proto (containerd's wire contract).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod api {
    tonic::include_proto!("containerd.services.snapshots.v1");
}

#[derive(Debug, Clone)]
pub struct SnapshotterOptions {
    /// The Unix socket containerd's `[proxy_plugins]` entry points at.
    pub address: PathBuf,
    /// Where the volumes are exported (default: next to the pool).
    pub export_dir: Option<PathBuf>,
    /// Virtual size of the ext4 template, so of every container's root file
    /// system (used only when the template is first made).
    pub volume_size: u64,
    /// Open the pool file `O_DIRECT` (see `ServeOptions::direct`).
    pub direct: bool,
}

/// Serve `pool` to containerd until signalled (SIGTERM/SIGINT: detach the
/// snapshotter's idle loop devices and stop once nothing is in use).
pub fn run(pool: &Path, opts: &SnapshotterOptions) -> Result<(), ExportError> {
    let dir = opts
        .export_dir
        .clone()
        .unwrap_or_else(|| default_export_dir(pool));
    // A killed snapshotter leaves a dead FUSE mount there (serving clears
    // it) and its loop devices on the dead files: drop those first, while
    // their backing files still show where they were.
    if crate::export::sys::is_dead_fuse_mount(&dir) {
        let abs = std::path::absolute(&dir).unwrap_or_else(|_| dir.clone());
        for d in crate::export::sys::loop_devices() {
            if d.backing_file.parent() == Some(&abs) {
                eprintln!(
                    "thinpool snapshotter: detaching {} (left by a killed snapshotter)",
                    d.path().display()
                );
                let _ = crate::export::sys::losetup_detach(&d.path());
            }
        }
    } else {
        std::fs::create_dir_all(&dir).map_err(ExportError::path(&dir))?;
    }
    if let Some(parent) = opts.address.parent() {
        std::fs::create_dir_all(parent).map_err(ExportError::path(parent))?;
    }
    let address = opts.address.clone();
    let size = opts.volume_size;
    let res = serve_with(
        pool,
        &dir,
        &ServeOptions {
            direct: opts.direct,
            ..ServeOptions::default()
        },
        move |server| {
            std::thread::Builder::new()
                .name("snapshotter".into())
                .spawn(move || {
                    if let Err(e) = serve_grpc(server.clone(), &address, size) {
                        eprintln!("thinpool snapshotter: {e}");
                        server.stop();
                    }
                })?;
            Ok(())
        },
    );
    let _ = std::fs::remove_file(&opts.address);
    res
}

fn serve_grpc(server: ServerHandle, address: &Path, size: u64) -> Result<(), String> {
    let store = Arc::new(Store::new(server.clone()));
    store.start(size).map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the gRPC runtime: {e}"))?;
    let svc = service::Service {
        store: store.clone(),
    };
    rt.block_on(async move {
        // Nothing else may own the address: we hold the pool, and a socket
        // file left by a killed snapshotter answers no one.
        let _ = std::fs::remove_file(address);
        let listener = tokio::net::UnixListener::bind(address)
            .map_err(|e| format!("cannot bind {}: {e}", address.display()))?;
        eprintln!(
            "thinpool snapshotter: answering containerd on {}",
            address.display()
        );
        let stop = {
            let server = server.clone();
            async move {
                while !server.stopping() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                // Let the export stop: drop the loop devices nothing mounts
                // (a mounted one is freed when its container unmounts it).
                let s = store.clone();
                let _ = tokio::task::spawn_blocking(move || s.detach_all()).await;
            }
        };
        tonic::transport::Server::builder()
            .add_service(api::snapshots_server::SnapshotsServer::new(svc))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                stop,
            )
            .await
            .map_err(|e| format!("gRPC server: {e}"))
    })
}
