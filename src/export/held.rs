//! The containerd snapshotter's holder: a process that keeps the export's
//! descriptors (FUSE connection, control socket, locked pool file, gRPC
//! listener) while the snapshotter worker that systemd runs comes and goes.
//! Unlike `serve --supervise`, the holder starts no worker: the first worker
//! starts the holder, and every later one (systemd's restart, the same
//! command line) finds it by its socket next to the pool, `POOL.holder.sock`.
//! See docs/EXPORT.md, "The containerd snapshotter".

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::control;
use super::handover::{self, Bundle};
use super::holder::{follow, seqpacket_pair, Crashes, Ended, StartWorker};
use super::server::{self, Cleanup, ServeOptions, SIGNALS};
use super::sys;
use super::ExportError;

/// How long a worker may take to ask for the bundle once connected, and the
/// first worker to wait for the holder it started.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(30);

/// The holder's socket: `POOL.holder.sock` next to the pool file.
pub fn socket_path(pool: &Path) -> PathBuf {
    let mut s = pool.as_os_str().to_owned();
    s.push(".holder.sock");
    PathBuf::from(s)
}

/// A connection to the live holder of `pool` (canonical path), if one
/// listens; a worker then calls [`super::serve_held`] on it.
/// A socket there that another user answers is not our holder: it would
/// hand us descriptors of its choosing (it is replaced when we start ours).
pub fn connect(pool: &Path) -> Option<OwnedFd> {
    let path = socket_path(pool);
    let conn = UnixStream::connect(&path).ok()?;
    match handover::peer_uid(conn.as_raw_fd()) {
        Ok(uid) if handover::trusted_uid(uid) => {}
        how => {
            say!(
                "thinpool: {} is answered by another user ({how:?}), not our holder; ignored",
                path.display()
            );
            return None;
        }
    }
    conn.set_read_timeout(Some(ATTACH_TIMEOUT)).ok()?;
    Some(conn.into())
}

/// The first worker, when no holder answers: lock the pool, mount the
/// export, bind the control socket and containerd's `grpc` address, and
/// start a holder (`start`, given the descriptor it inherits) that keeps
/// them; returns once the holder listens. It outlives this process.
pub fn start(
    pool: &Path,
    dir: &Path,
    opts: &ServeOptions,
    grpc: &Path,
    start: StartWorker<'_>,
) -> Result<(), ExportError> {
    let mut bundle = server::new_held_bundle(pool, dir, opts)?;
    let pool = bundle.state.pool.clone();
    // Until the holder has them, a failure takes everything away again.
    let undo = |bundle: Bundle| {
        let _ = sys::umount(&bundle.state.dir, true);
        let _ = std::fs::remove_file(control::socket_path(&pool));
    };
    let bound = clear_stale_socket(grpc).and_then(|()| UnixListener::bind(grpc));
    match bound {
        Ok(l) => bundle.grpc = Some(l),
        Err(source) => {
            undo(bundle);
            return Err(ExportError::Bind {
                socket: grpc.to_path_buf(),
                source,
            });
        }
    }
    let res = (|| -> Result<(), ExportError> {
        let (ours, theirs) = seqpacket_pair()?;
        let mut child = start(theirs.as_raw_fd()).map_err(ExportError::ServerSpawn)?;
        drop(theirs);
        let sent = bundle.send(ours.as_raw_fd(), false);
        let ready = sent.is_ok() && sys::readable(ours.as_raw_fd(), ATTACH_TIMEOUT);
        match ready.then(|| handover::recv_msg(ours.as_raw_fd())) {
            // It outlives us (never waited for).
            Some(Ok(Some((v, _)))) if v["event"] == "holding" => Ok(()),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(ExportError::Handover(format!(
                    "the holder (process {}) did not start; see its messages above",
                    child.id()
                )))
            }
        }
    })();
    // On success our copies go; the holder's keep the export (and the
    // pool lock).
    res.inspect_err(|_| {
        undo(bundle);
        let _ = std::fs::remove_file(grpc);
    })
}

/// Remove a socket file left at `path` by a snapshotter that was killed;
/// one that answers is another process's (a snapshotter of another pool
/// given the same `--address`): refused, not taken away from it.
pub fn clear_stale_socket(path: &Path) -> std::io::Result<()> {
    if UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another process answers on it",
        ));
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The holder (`thinpool snapshotter --hold-fd FD`): take the bundle the
/// first worker sends on `fd`, listen on `POOL.holder.sock`, and hand the
/// bundle to one worker at a time. When none is attached for `grace` (or
/// on SIGTERM/SIGINT/SIGHUP while none is), release the export.
pub fn hold(fd: OwnedFd, grace: Duration) -> Result<(), ExportError> {
    let mut bundle = Bundle::recv(fd.as_raw_fd())?;
    server::install_signal_handlers();
    let pool = bundle.state.pool.clone();
    let path = socket_path(&pool);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ExportError::Bind {
        socket: path.clone(),
        source,
    })?;
    let _holder_socket = Cleanup::new(path.clone(), None);
    // Whoever may connect may take the pool: our user only, whatever the
    // umask (attach also checks the peer's credentials).
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let grpc_path = bundle
        .grpc
        .as_ref()
        .and_then(|g| g.local_addr().ok())
        .and_then(|a| a.as_pathname().map(Path::to_path_buf));
    let sockets = Sockets {
        _guards: vec![
            Cleanup::new(control::socket_path(&pool), None),
            Cleanup::new(grpc_path.unwrap_or_default(), None),
        ],
    };
    listener.set_nonblocking(true)?;
    let ack = serde_json::json!({ "event": "holding", "pid": std::process::id() });
    handover::send_msg(fd.as_raw_fd(), &ack, &[])?;
    drop(fd);
    say!(
        "thinpool: holder {} keeps the export of {} on {} for the snapshotter \
         (released {} s after the last worker left)",
        std::process::id(),
        pool.display(),
        bundle.state.dir.display(),
        grace.as_secs()
    );
    let mut crashes = Crashes::default();
    let mut signals = SIGNALS.load(Ordering::SeqCst);
    loop {
        let Some(conn) = wait_for_worker(&listener, grace, &mut signals) else {
            release(bundle, sockets);
            return Ok(());
        };
        let pid = match attach(&conn, &bundle) {
            Ok(pid) => pid,
            Err(e) => {
                say!("thinpool: holder: a worker could not attach: {e}");
                continue;
            }
        };
        let followed = follow(conn.as_raw_fd(), &mut bundle, |f| {
            if SIGNALS.load(Ordering::SeqCst) > signals {
                return false;
            }
            // Another snapshotter while this one serves (not after it said
            // it hands back: that one waits in the backlog for its turn).
            if f.ended.is_none() {
                if let Ok((other, _)) = listener.accept() {
                    let msg = format!("the pool is served by snapshotter process {pid}");
                    let _ = handover::send_msg(
                        other.as_raw_fd(),
                        &serde_json::json!({ "error": msg }),
                        &[],
                    );
                }
            }
            true
        });
        if followed.left {
            // Signalled while a worker serves: it serves on without us.
            say!("thinpool: holder: signalled; process {pid} serves on without a holder");
            std::mem::forget(sockets);
            return Ok(());
        }
        match followed.ended(format!("process {pid}")) {
            Ended::Stopped => {
                say!("thinpool: holder: the snapshotter stopped the export");
                return Ok(());
            }
            Ended::Restart(opens) => {
                say!("thinpool: holder: process {pid} handed the export back");
                bundle.state.opens = opens;
            }
            Ended::Crashed(how) | Ended::NeverReady(how) => {
                bundle.state.opens.clear();
                if let Err(e) = crashes.count(&bundle, &format!("{how} died")) {
                    release(bundle, sockets);
                    return Err(e);
                }
                say!("thinpool: holder: {how} died; waiting for the next worker");
            }
        }
    }
}

/// Sockets the holder removes when it releases the export.
struct Sockets {
    _guards: Vec<Cleanup>,
}

/// The next worker's connection; `None` once `grace` has passed without
/// one or a signal came.
fn wait_for_worker(
    listener: &UnixListener,
    grace: Duration,
    signals: &mut usize,
) -> Option<UnixStream> {
    let deadline = Instant::now() + grace;
    loop {
        let now = SIGNALS.load(Ordering::SeqCst);
        if now > *signals {
            *signals = now;
            say!("thinpool: holder: signalled with no worker attached");
            return None;
        }
        if Instant::now() >= deadline {
            say!(
                "thinpool: holder: no snapshotter came back within {} s",
                grace.as_secs()
            );
            return None;
        }
        if !sys::readable(listener.as_raw_fd(), Duration::from_millis(100)) {
            continue;
        }
        if let Ok((conn, _)) = listener.accept() {
            let _ = conn.set_nonblocking(false);
            return Some(conn);
        }
    }
}

/// Read a worker's `snapshotter_attach` and send it the bundle; its pid.
fn attach(conn: &UnixStream, bundle: &Bundle) -> Result<u32, ExportError> {
    let refuse = |msg: String| {
        let _ = handover::send_msg(
            conn.as_raw_fd(),
            &serde_json::json!({ "error": msg.clone() }),
            &[],
        );
        ExportError::Handover(msg)
    };
    // The bundle is the pool and the FUSE connection: not for other users.
    let uid = handover::peer_uid(conn.as_raw_fd())?;
    if !handover::trusted_uid(uid) {
        return Err(refuse(format!(
            "a process of uid {uid} may not attach (the holder runs as uid {})",
            // SAFETY: geteuid cannot fail.
            unsafe { libc::geteuid() }
        )));
    }
    conn.set_read_timeout(Some(ATTACH_TIMEOUT))?;
    let (req, _) = handover::recv_msg(conn.as_raw_fd())?
        .ok_or_else(|| ExportError::Handover("closed before asking".into()))?;
    if req["op"] != "snapshotter_attach" {
        return Err(refuse(format!("unexpected request {req}")));
    }
    if req["version"] != handover::VERSION {
        return Err(refuse(format!(
            "the worker speaks handover version {}, this holder {}",
            req["version"],
            handover::VERSION
        )));
    }
    bundle.send(conn.as_raw_fd(), true)?;
    conn.set_read_timeout(None)?;
    Ok(req["pid"].as_u64().unwrap_or(0) as u32)
}

/// No worker came back: let go of the export as a stopped snapshotter
/// would after its stop timeout. Loop devices nothing mounts are detached;
/// mounted ones (running containers) see I/O errors and are freed by the
/// kernel when unmounted; the mount and the sockets go.
fn release(bundle: Bundle, sockets: Sockets) {
    let dir = bundle.state.dir.clone();
    say!(
        "thinpool: holder: releasing the export on {}",
        dir.display()
    );
    for d in sys::loop_devices() {
        if d.backing_file.parent() == Some(dir.as_path()) {
            let _ = d.detach();
        }
    }
    if sys::mount_at(&dir).is_some_and(|m| m.source.starts_with("thinpool:") && m.fstype == "fuse")
    {
        let _ = sys::umount(&dir, true);
    }
    drop(bundle);
    drop(sockets);
}
