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

use crate::export::{
    default_export_dir, held, serve_held, serve_with, ExportError, ServeOptions, ServerHandle,
    StartWorker,
};
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
    /// Keep the export in a holder process across restarts of the
    /// snapshotter, and release it this long after the last one stopped
    /// without another starting (`None`: no holder; a stop ends the export).
    pub hold: Option<Duration>,
}

/// Serve `pool` to containerd until signalled (SIGTERM/SIGINT: detach the
/// snapshotter's idle loop devices and stop once nothing is in use; with
/// `hold`, hand the export back to the holder and exit instead).
/// `start_holder` starts the holder process (`hold` only; the library runs
/// no program itself): the binary with the descriptor it inherits.
pub fn run(
    pool: &Path,
    opts: &SnapshotterOptions,
    start_holder: StartWorker<'_>,
) -> Result<(), ExportError> {
    let dir = opts
        .export_dir
        .clone()
        .unwrap_or_else(|| default_export_dir(pool));
    let canon = std::fs::canonicalize(pool).map_err(ExportError::path(pool))?;
    let held = held::connect(&canon);
    if held.is_some() && opts.hold.is_none() {
        // Its export would block every look at the mount until a worker came.
        return Err(ExportError::Handover(format!(
            "a holder keeps the export of {} (socket {}): start the snapshotter with --hold, \
             or stop the holder first",
            canon.display(),
            held::socket_path(&canon).display()
        )));
    }
    if held.is_some() {
        eprintln!("thinpool snapshotter: found the holder of the export; resuming");
    } else {
        clear_dead_export(&dir)?;
    }
    if let Some(parent) = opts.address.parent() {
        std::fs::create_dir_all(parent).map_err(ExportError::path(parent))?;
    }
    let address = opts.address.clone();
    let size = opts.volume_size;
    // What stopped the export if the gRPC side did: the run then fails
    // (exit status 1: a failure, for systemd and whoever started it).
    let failed = Failed::default();
    let serve_opts = ServeOptions {
        direct: opts.direct,
        ..ServeOptions::default()
    };
    if opts.hold.is_some() {
        let conn = match held {
            Some(c) => c,
            None => {
                held::start(pool, &dir, &serve_opts, &opts.address, start_holder)?;
                held::connect(&canon).ok_or_else(|| {
                    ExportError::Handover("the holder started but does not answer".into())
                })?
            }
        };
        // The holder keeps the address (and removes it when it releases).
        let f = failed.clone();
        serve_held(conn, move |server, listener| {
            spawn_grpc(server, Some(listener), address, size, f)
        })?;
        return failed.result();
    }
    let f = failed.clone();
    let res = serve_with(pool, &dir, &serve_opts, move |server| {
        spawn_grpc(server, None, address, size, f)
    });
    if failed.0.lock().map(|e| e.is_none()).unwrap_or(false) {
        // Ours (a failed bind leaves another process's socket alone).
        let _ = std::fs::remove_file(&opts.address);
    }
    res.and_then(|()| failed.result())
}

/// The gRPC side's error, once it has stopped the export.
#[derive(Clone, Default)]
struct Failed(Arc<std::sync::Mutex<Option<String>>>);

impl Failed {
    fn set(&self, e: String) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    fn result(&self) -> Result<(), ExportError> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(ExportError::Snapshotter(e)),
            None => Ok(()),
        }
    }
}

/// A killed snapshotter (and no holder) leaves a dead FUSE mount at `dir`
/// (serving clears it) and its loop devices on the dead files: drop those
/// first, while their backing files still show where they were.
fn clear_dead_export(dir: &Path) -> Result<(), ExportError> {
    if crate::export::sys::is_dead_fuse_mount(dir) {
        let abs = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
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
        std::fs::create_dir_all(dir).map_err(ExportError::path(dir))?;
    }
    Ok(())
}

fn spawn_grpc(
    server: ServerHandle,
    listener: Option<std::os::unix::net::UnixListener>,
    address: PathBuf,
    size: u64,
    failed: Failed,
) -> Result<(), ExportError> {
    std::thread::Builder::new()
        .name("snapshotter".into())
        .spawn(move || {
            if let Err(e) = serve_grpc(server.clone(), listener, &address, size) {
                eprintln!("thinpool snapshotter: {e}");
                failed.set(e);
                server.stop();
            }
        })?;
    Ok(())
}

/// How long a hand-back waits for containerd's calls in flight to finish.
const GRPC_DRAIN: Duration = Duration::from_secs(10);
/// How long a hand-back serves on after it stopped accepting, before the
/// graceful shutdown: a connection accepted just before has sent its first
/// request by then (hyper closes one still in its handshake at once, and
/// that call fails instead of waiting for the next worker).
const GRPC_SETTLE: Duration = Duration::from_millis(100);

/// The listener's connections while `accepting`; after it, pending (not
/// ended, which would start tonic's shutdown): new connections wait in the
/// backlog for the next worker while those accepted are still served.
struct Accepting {
    inner: tokio_stream::wrappers::UnixListenerStream,
    accepting: Arc<std::sync::atomic::AtomicBool>,
}

impl tokio_stream::Stream for Accepting {
    type Item = std::io::Result<tokio::net::UnixStream>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        if !self.accepting.load(std::sync::atomic::Ordering::SeqCst) {
            // tonic's loop is woken by its shutdown signal, not by us.
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.inner).poll_next(cx)
    }
}

fn serve_grpc(
    server: ServerHandle,
    listener: Option<std::os::unix::net::UnixListener>,
    address: &Path,
    size: u64,
) -> Result<(), String> {
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
    let (srv, st) = (server.clone(), store.clone());
    let handing_back = rt.block_on(async move {
        let (server, store) = (srv, st);
        let listener = match listener {
            // The holder's listener: containerd's connections made while no
            // worker ran wait in its backlog.
            Some(l) => l
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(l))
                .map_err(|e| format!("cannot use the gRPC listener: {e}"))?,
            None => {
                // A socket file left by a killed snapshotter answers no one.
                held::clear_stale_socket(address)
                    .and_then(|()| tokio::net::UnixListener::bind(address))
                    .map_err(|e| format!("cannot bind {}: {e}", address.display()))?
            }
        };
        eprintln!(
            "thinpool snapshotter: answering containerd on {}",
            address.display()
        );
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let accepting = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let incoming = Accepting {
            inner: tokio_stream::wrappers::UnixListenerStream::new(listener),
            accepting: accepting.clone(),
        };
        let grpc = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(api::snapshots_server::SnapshotsServer::new(svc))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.await;
                }),
        );
        while !server.stopping() && !server.hand_back_asked() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let handing_back = !server.stopping();
        if !handing_back {
            // Let the export stop: drop the loop devices nothing mounts
            // (a mounted one is freed when its container unmounts it).
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.detach_all()).await;
        }
        if handing_back {
            // New connections wait in the backlog for the next worker.
            accepting.store(false, std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(GRPC_SETTLE).await;
        }
        // Stop; calls in flight finish (bounded for a hand-back).
        let _ = tx.send(());
        let t = std::time::Instant::now();
        match tokio::time::timeout(GRPC_DRAIN, grpc).await {
            Ok(Ok(Err(e))) => eprintln!("thinpool snapshotter: gRPC server: {e}"),
            Err(_) => eprintln!(
                "thinpool snapshotter: gRPC calls still running after {} s",
                GRPC_DRAIN.as_secs()
            ),
            _ => {}
        }
        if handing_back {
            eprintln!(
                "thinpool snapshotter: gRPC stopped in {} ms",
                t.elapsed().as_millis()
            );
        }
        Ok::<bool, String>(handing_back)
    })?;
    if handing_back {
        // Exits on success; on failure the export stops as without a holder.
        if let Err(e) = server.hand_back() {
            eprintln!("thinpool snapshotter: cannot hand the export back ({e}); stopping");
            store.detach_all();
            server.stop();
        }
    }
    Ok(())
}
