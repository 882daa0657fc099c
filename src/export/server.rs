//! `thinpool serve`: owns the pool, mounts the FUSE export, answers the control
//! socket, commits on a timer, and stops cleanly on a signal or `umount DIR`.
//!
//! Threads: the fuser workers (one per request stream), one control-socket
//! acceptor plus one thread per connection, and a ticker that commits about
//! once a second when something was written and watches for stop requests.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use fuser::{Config, SessionACL};

use super::control::{socket_path, Reply, ServerRequest, ServerStatus, ShutdownReply};
use super::fs::{ino_of, ThinFs};
use super::handover::{self, Bundle, State};
use super::resume;
use super::state::{Gate, Shared};
use super::sys::{self, Frozen};
use super::ExportError;
use crate::control::{execute, Request, Response};
use crate::error::{Error, Result};
use crate::pool::{Pool, SharedPool, VolumeId};

/// Full commits on the timer; flushes between them cost one fdatasync
/// (the intent log), so this only bounds the log and the replay.
const COMMIT_INTERVAL: Duration = Duration::from_secs(3);
const TICK: Duration = Duration::from_millis(50);
/// How long a handover waits for the requests being served to finish.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new server waits for the old one to confirm or to exit.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// Started by `attach`: exit on `ExportShutdownIfIdle`, remove DIR on exit.
    pub background: bool,
    /// FUSE worker threads (0: pick from the CPU count).
    pub threads: usize,
    /// Open the pool file `O_DIRECT`: no copy in the host page cache.
    pub direct: bool,
}

//------------------------------------------------------------------------------
// Signals

pub(crate) static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

pub(crate) fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only touches an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

//------------------------------------------------------------------------------
// serve

/// Removes the socket (and the directory of a background server) on exit.
pub(crate) struct Cleanup {
    socket: PathBuf,
    /// (device, inode) of the socket this server bound.
    bound: Option<(u64, u64)>,
    dir: Option<PathBuf>,
}

impl Cleanup {
    pub(crate) fn new(socket: PathBuf, dir: Option<PathBuf>) -> Cleanup {
        Cleanup {
            bound: file_id(&socket),
            socket,
            dir,
        }
    }
}

/// Identity of the file at `path`, if any.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Once this server has let go of the pool lock, a new server may
        // already have bound its own socket at the same path: leave that one.
        if self.bound.is_some() && file_id(&self.socket) == self.bound {
            let _ = std::fs::remove_file(&self.socket);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Serve every volume of `pool_path` as a file under `dir` until it is
/// unmounted or the process is signalled (`thinpool serve`).
pub fn serve(pool_path: &Path, dir: &Path, opts: &ServeOptions) -> Result<(), ExportError> {
    serve_bundle(pool_path, dir, opts, true, |_| Ok(()))
}

/// `serve`, calling `on_ready` with a handle on the running server (FUSE
/// requests are already being served) before waiting for it to stop: the
/// containerd snapshotter starts its gRPC service there. Such a server
/// refuses a takeover: what `on_ready` started would not follow.
pub fn serve_with(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
    on_ready: impl FnOnce(ServerHandle) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    serve_bundle(pool_path, dir, opts, false, on_ready)
}

fn serve_bundle(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
    can_hand_over: bool,
    on_ready: impl FnOnce(ServerHandle) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let pool_path = not_served(pool_path)?;
    let file = handover::lock_pool(&pool_path, opts.direct)?;
    let pool = open_locked(&file, &pool_path)?;
    install_signal_handlers();
    let bundle = new_bundle(&pool_path, dir, opts, Some(file))?;
    let server = Server::from_bundle(pool, bundle, None)?;
    if !can_hand_over {
        server.sh.refuse_handover.store(true, Ordering::SeqCst);
    }
    run_server(server, opts.background, on_ready)
}

fn run_server(
    server: Server,
    background: bool,
    on_ready: impl FnOnce(ServerHandle) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let dir = server.dir().to_path_buf();
    if let Err(e) = on_ready(server.handle()) {
        let _ = server.stop();
        return Err(e);
    }
    server.wait()?;
    if background {
        // A clean exit leaves nothing to look at; failures keep their log.
        let _ = std::fs::remove_file(dir.with_extension("log"));
    }
    Ok(())
}

/// The canonical pool path, if no server serves it yet.
pub(crate) fn not_served(pool_path: &Path) -> Result<PathBuf, ExportError> {
    let pool_path = std::fs::canonicalize(pool_path).map_err(ExportError::path(pool_path))?;
    if let Some(Ok(st)) = super::control::status(&pool_path) {
        return Err(ExportError::AlreadyServed {
            pool: pool_path,
            pid: st.pid,
            dir: st.dir,
        });
    }
    Ok(pool_path)
}

/// A new export for a holder (which does no pool I/O): the pool locked, not
/// opened; the bundle's state names the canonical pool path.
pub(crate) fn new_held_bundle(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
) -> Result<Bundle, ExportError> {
    let pool_path = not_served(pool_path)?;
    let file = handover::lock_pool(&pool_path, opts.direct)?;
    new_bundle(&pool_path, dir, opts, Some(file))
}

/// Open the pool on its locked file (a copy of the descriptor: the lock
/// stays on the file description the bundle keeps).
fn open_locked(file: &File, pool_path: &Path) -> Result<Pool, ExportError> {
    let file = file.try_clone()?;
    // O_DIRECT travels with the open file (also across a handover).
    // SAFETY: F_GETFL on a descriptor we own has no other effect.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    let storage: Box<dyn crate::io::Storage> = if flags >= 0 && flags & libc::O_DIRECT != 0 {
        Box::new(crate::io::DirectStorage::new(file))
    } else {
        Box::new(crate::io::FileStorage::new(file))
    };
    Ok(Pool::open_with(storage, pool_path)?)
}

/// The descriptors of a new export: the control socket bound next to the
/// pool and the FUSE export mounted on `dir` (not yet initialised).
pub(crate) fn new_bundle(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
    pool: Option<File>,
) -> Result<Bundle, ExportError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ExportError::NeedsRoot);
    }
    if sys::is_dead_fuse_mount(dir) {
        eprintln!(
            "thinpool: {} is a dead FUSE mount (its server died); unmounting it",
            dir.display()
        );
        let _ = sys::umount(dir, true);
    }
    if opts.background {
        std::fs::create_dir_all(dir).map_err(ExportError::path(dir))?;
    }
    let dir = std::fs::canonicalize(dir).map_err(ExportError::path(dir))?;
    let sock = socket_path(pool_path);
    // We hold the pool lock, so any socket file left here is stale.
    let _ = std::fs::remove_file(&sock);
    let control = UnixListener::bind(&sock).map_err(|source| ExportError::Bind {
        socket: sock.clone(),
        source,
    })?;
    let fuse =
        resume::mount(&dir, &format!("thinpool:{}", pool_path.display())).map_err(|source| {
            let _ = std::fs::remove_file(&sock);
            ExportError::FuseMount {
                dir: dir.clone(),
                source,
            }
        })?;
    Ok(Bundle {
        fuse,
        control,
        pool,
        grpc: None,
        state: State {
            version: handover::VERSION,
            pool: pool_path.to_path_buf(),
            dir,
            background: opts.background,
            threads: opts.threads,
            init: None,
            opens: Vec::new(),
        },
    })
}

/// `thinpool serve --takeover` of an unsupervised server `st` (the holder
/// decides, `holder::take_over`): take its export over (it hands over and
/// exits), then serve until stopped.
pub(crate) fn take_over_from(
    pool_path: PathBuf,
    st: ServerStatus,
    dir: &Path,
    opts: &ServeOptions,
) -> Result<(), ExportError> {
    let want = std::fs::canonicalize(dir).map_err(ExportError::path(dir))?;
    if want != st.dir {
        return Err(ExportError::Handover(format!(
            "the running server exports {}, not {}",
            st.dir.display(),
            want.display()
        )));
    }
    let mut conn = UnixStream::connect(socket_path(&pool_path))?;
    conn.set_read_timeout(Some(HANDOVER_TIMEOUT))?;
    let req = ServerRequest::ExportTakeover {
        version: handover::VERSION,
        pid: std::process::id(),
    };
    let mut line = serde_json::to_string(&req).map_err(std::io::Error::other)?;
    line.push('\n');
    conn.write_all(line.as_bytes())?;
    let started = Instant::now();
    let mut bundle = Bundle::recv(conn.as_raw_fd())?;
    bundle.state.threads = if opts.threads > 0 {
        opts.threads
    } else {
        bundle.state.threads
    };
    let background = bundle.state.background;
    let file = bundle
        .pool
        .as_ref()
        .ok_or_else(|| ExportError::Handover("no pool descriptor".into()))?
        .try_clone()?;
    // The old server holds the lock's description too, but no longer uses it.
    let got = started.elapsed();
    let pool = open_locked(&file, &pool_path)?;
    install_signal_handlers();
    let server = Server::from_bundle(pool, bundle, None)?;
    let ready = started.elapsed();
    conn.write_all(b"{\"op\":\"export_took_over\"}\n")?;
    // Its connection closes once every thread of the old server is gone:
    // only then may unanswered requests be resent (none of them may be
    // read again by the old server).
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut conn, &mut rest);
    server.resend();
    eprintln!(
        "thinpool: took over {} from process {} in {} ms (bundle after {} ms, pool open and \
         session ready after {} ms, old server gone and requests resent after {} ms)",
        pool_path.display(),
        st.pid,
        started.elapsed().as_millis(),
        got.as_millis(),
        ready.as_millis(),
        started.elapsed().as_millis()
    );
    run_server(server, background, |_| Ok(()))
}

/// A server started by a holder (`--handover-fd`): receive the bundle on
/// `fd`, serve, and tell the holder how it ended.
pub fn serve_handed(fd: OwnedFd) -> Result<(), ExportError> {
    let bundle = Bundle::recv(fd.as_raw_fd())?;
    run_handed(bundle, fd, false, |_| Ok(()))
}

/// A containerd snapshotter's worker (docs/EXPORT.md, "The containerd
/// snapshotter"): ask the holder connected on `conn` for the bundle, serve
/// it, and call `on_ready` with the server and the gRPC listener. A signal
/// then hands the export back to the holder instead of stopping it.
pub fn serve_held(
    conn: OwnedFd,
    on_ready: impl FnOnce(ServerHandle, UnixListener) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let req = serde_json::json!({
        "op": "snapshotter_attach",
        "version": handover::VERSION,
        "pid": std::process::id(),
    });
    let asked = handover::send_msg(conn.as_raw_fd(), &req, &[]);
    // Read the answer even if asking failed: a holder may refuse (and
    // close) before it reads the request. A lost connection is an error
    // of its own, not an I/O one: a broken pipe would exit 0, and systemd
    // would not start the snapshotter again.
    let mut bundle = match Bundle::recv(conn.as_raw_fd()) {
        Ok(b) => b,
        Err(ExportError::Io(e)) => {
            let asked = asked.err().map(|a| format!("; asking: {a}"));
            return Err(ExportError::Handover(format!(
                "the holder closed the connection ({e}{}): it released the export or went away",
                asked.unwrap_or_default()
            )));
        }
        Err(e) => return Err(e),
    };
    let grpc = bundle
        .grpc
        .take()
        .ok_or_else(|| ExportError::Handover("the holder sent no gRPC listener".into()))?;
    run_handed(bundle, conn, true, move |h| on_ready(h, grpc))
}

fn run_handed(
    bundle: Bundle,
    fd: OwnedFd,
    held: bool,
    on_ready: impl FnOnce(ServerHandle) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let t = Instant::now();
    let pool_path = bundle.state.pool.clone();
    let file = bundle
        .pool
        .as_ref()
        .ok_or_else(|| ExportError::Handover("no pool descriptor".into()))?
        .try_clone()?;
    let pool = open_locked(&file, &pool_path)?;
    let opened = t.elapsed();
    install_signal_handlers();
    let resumed = bundle.state.init.is_some();
    let background = bundle.state.background;
    let server = Server::from_bundle(pool, bundle, Some(fd))?;
    if held {
        server.sh.hand_back.store(true, Ordering::SeqCst);
        server.sh.refuse_handover.store(true, Ordering::SeqCst);
    }
    if resumed {
        // The previous server has exited (the holder waited for it).
        server.resend();
        eprintln!(
            "thinpool: resumed the export of {} (pool open and requests resent in {} ms; \
             the pool's open {} ms)",
            pool_path.display(),
            t.elapsed().as_millis(),
            opened.as_millis()
        );
    }
    let init = *server.sh.init.lock().unwrap_or_else(|p| p.into_inner());
    let _ = server
        .sh
        .tell_holder(serde_json::json!({ "event": "ready", "init": init }));
    let sh = server.sh.clone();
    let res = run_server(server, background, on_ready);
    let _ = sh.tell_holder(serde_json::json!({ "event": "stopped" }));
    res
}

/// A running export of one open pool, served from threads of this process:
/// the FUSE session, the control socket and the commit ticker. `serve` runs
/// one until it is stopped; a library user (image import) starts one, uses
/// the volumes through loop devices and the pool through [`Server::with_pool`],
/// and stops it — the pool stays open in this process throughout.
pub struct Server {
    sh: Arc<Shared>,
    session: Option<thread::JoinHandle<std::io::Result<()>>>,
    /// The acceptor and the ticker: joined on exit, so that the pool (and
    /// its lock) is let go of by the time `wait` returns.
    helpers: Vec<thread::JoinHandle<()>>,
    _cleanup: Cleanup,
}

impl Server {
    /// Mount the FUSE export of `pool` (opened from its canonical path) on
    /// `dir`. Such a server cannot hand over (it does not hold the pool's
    /// descriptor): library users stop and start theirs.
    pub fn start(pool: Pool, dir: &Path, opts: &ServeOptions) -> Result<Server, ExportError> {
        let pool_path = pool.path().to_path_buf();
        let bundle = new_bundle(&pool_path, dir, opts, None)?;
        Server::from_bundle(pool, bundle, None)
    }

    /// Serve `pool` from a bundle: a new export, or one handed over (its
    /// state carries the kernel's INIT; call [`Server::resend`] once the
    /// previous server is gone).
    pub(crate) fn from_bundle(
        pool: Pool,
        bundle: Bundle,
        holder: Option<OwnedFd>,
    ) -> Result<Server, ExportError> {
        let block_size = pool.block_size();
        let st = bundle.state.clone();
        let sock = socket_path(&st.pool);
        let cleanup = Cleanup::new(sock.clone(), st.background.then(|| st.dir.clone()));
        let sh = Arc::new(Shared {
            pool: SharedPool::new(pool),
            pool_path: st.pool.clone(),
            dir: st.dir.clone(),
            background: st.background,
            started: SystemTime::now(),
            block_size,
            stopping: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            opens: Mutex::new(st.opens.iter().copied().collect()),
            idle: Condvar::new(),
            notifier: Mutex::new(None),
            gate: Gate::default(),
            init: Mutex::new(st.init),
            bundle: Mutex::new(None),
            holder,
            refuse_handover: AtomicBool::new(false),
            hand_back: AtomicBool::new(false),
            hand_back_asked: AtomicBool::new(false),
        });
        if st.init.is_some() && st.opens.is_empty() {
            // Resumed after a crash: the loop devices over our files are
            // what holds them open.
            sh.recount_opens();
        }

        let threads = if st.threads > 0 {
            st.threads
        } else {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 8)
                * 2
        };
        let mut config = Config::default();
        config.acl = SessionACL::All;
        config.n_threads = Some(threads);
        // Every thread reads the bundle's own descriptor: a request read
        // from it survives this process (see docs/EXPORT.md).
        config.clone_fd = false;

        let session = resume::session(ThinFs { sh: sh.clone() }, &bundle.fuse, st.init, config)
            .map_err(|source| ExportError::FuseMount {
                dir: st.dir.clone(),
                source,
            })?;
        *sh.notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.notifier());
        bundle.control.set_nonblocking(true)?;
        let listener = bundle.control.try_clone()?;
        *sh.bundle.lock().unwrap_or_else(|p| p.into_inner()) = Some(bundle);
        eprintln!(
            "thinpool: serving {} on {} ({} threads, control socket {}){}",
            st.pool.display(),
            st.dir.display(),
            threads,
            sock.display(),
            if st.init.is_some() { ", resumed" } else { "" }
        );
        let session = thread::Builder::new()
            .name("fuse".into())
            .spawn(move || session.run())?;
        let mut helpers = Vec::new();
        {
            let sh = sh.clone();
            helpers.push(
                thread::Builder::new()
                    .name("control".into())
                    .spawn(move || accept_loop(listener, sh))?,
            );
        }
        {
            let sh = sh.clone();
            helpers.push(
                thread::Builder::new()
                    .name("ticker".into())
                    .spawn(move || ticker(sh))?,
            );
        }
        Ok(Server {
            sh,
            session: Some(session),
            helpers,
            _cleanup: cleanup,
        })
    }

    /// Ask the kernel to resend what the previous server read but did not
    /// answer. Without kernel support (before 6.9) those requests stay
    /// unanswered: say so.
    pub(crate) fn resend(&self) {
        let bundle = self.sh.bundle.lock().unwrap_or_else(|p| p.into_inner());
        let Some(b) = bundle.as_ref() else { return };
        if let Err(e) = resume::notify_resend(&b.fuse) {
            eprintln!(
                "thinpool: the kernel cannot resend the requests the previous server \
                 had not answered (FUSE_NOTIFY_RESEND needs Linux 6.9): {e}; \
                 those requests stay unanswered"
            );
        }
    }

    /// The export directory (one file per volume).
    pub fn dir(&self) -> &Path {
        &self.sh.dir
    }

    /// A handle for other threads of this process.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle(self.sh.clone())
    }

    /// Run `f` on the served pool (under the engine lock).
    pub fn with_pool<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        self.sh.pool.with(f)
    }

    /// Stop once no volume is open any more (detach them first), commit,
    /// and take the export away.
    pub fn stop(self) -> Result<(), ExportError> {
        self.sh.stopping.store(true, Ordering::SeqCst);
        self.wait()
    }

    /// Wait until the export is unmounted (a stop request, a signal, or
    /// `umount DIR`), then commit and clean up.
    pub fn wait(mut self) -> Result<(), ExportError> {
        let res = match self.session.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the FUSE session panicked")),
            None => Ok(()),
        };
        self.end();
        let commit = self.sh.commit();
        self.join_helpers();
        res.map_err(ExportError::Session)?;
        commit?;
        Ok(())
    }

    fn end(&self) {
        let sh = &self.sh;
        sh.stopping.store(true, Ordering::SeqCst);
        *sh.notifier.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let dir = &sh.dir;
        if sys::mount_at(dir)
            .is_some_and(|m| m.source.starts_with("thinpool:") && m.fstype == "fuse")
        {
            let _ = sys::umount(dir, true);
        }
        if !sh.ended.swap(true, Ordering::SeqCst) {
            eprintln!("thinpool: stopped serving {}", sh.pool_path.display());
        }
    }

    fn join_helpers(&mut self) {
        for h in self.helpers.drain(..) {
            let _ = h.join();
        }
    }
}

/// A running server, for code that shares its process (the containerd
/// snapshotter): the pool under the server's lock and the control socket's rules.
#[derive(Clone)]
pub struct ServerHandle(Arc<Shared>);

impl ServerHandle {
    /// The pool, for lookups (the engine lock, shared).
    pub fn pool(&self) -> RwLockReadGuard<'_, Pool> {
        self.0.pool.read_engine()
    }

    /// A management change (`Pool::stage_*`), committed before it returns
    /// without holding the engine lock across the fdatasyncs.
    pub fn change<R>(&self, f: impl FnOnce(&mut Pool) -> Result<R>) -> Result<R> {
        // Through the gate: a hand-back waits for it and holds new ones.
        let _pass = self.0.gate.enter();
        self.0.pool.change(f)
    }

    /// Read a volume through the engine (unmapped blocks read as zeros).
    pub fn read(&self, id: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.pool.read(id, offset, buf)
    }

    /// Unmap whole blocks of a volume in the ranges if nothing has its file
    /// open (checked under the engine lock, as an open counts itself): the
    /// export's discard path, made durable by the next commit. Ok(false):
    /// the file is open, nothing was unmapped.
    pub fn discard_unless_open(&self, id: VolumeId, ranges: &[(u64, u64)]) -> Result<bool> {
        // A change of the pool like [`Self::change`]: through the gate, so a
        // hand-back never leaves it writing after the next worker opened.
        let _pass = self.0.gate.enter();
        self.0.pool.discard_unless(id, ranges, || self.0.in_use(id))
    }

    /// Where the volumes are exported as files.
    pub fn export_dir(&self) -> &Path {
        &self.0.dir
    }

    /// Is the volume's exported file open (a loop device holds it)?
    pub fn in_use(&self, id: VolumeId) -> bool {
        self.0.in_use(id)
    }

    /// A control-socket request, under the same rules (in-use checks, cache
    /// invalidation) as one coming from the CLI.
    pub fn execute(&self, req: Request) -> Result<Response> {
        let _pass = self.0.gate.enter();
        handle_request(&self.0, req)
    }

    /// A signal asked this snapshotter worker to hand its export back to
    /// the holder (see [`serve_held`]).
    pub fn hand_back_asked(&self) -> bool {
        self.0.hand_back_asked.load(Ordering::SeqCst)
    }

    /// Quiesce (no FUSE request inside, committed), give the open counts
    /// to the holder and exit, leaving mount, sockets and loop devices to
    /// the next worker. Returns only if that failed (nothing changed).
    pub fn hand_back(&self) -> Result<()> {
        let t = Instant::now();
        restart(&self.0)?;
        eprintln!(
            "thinpool: handed the export back to the holder in {} ms; exiting",
            t.elapsed().as_millis()
        );
        std::process::exit(0)
    }

    /// Ask the server to stop (as a signal would).
    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::SeqCst);
    }

    pub fn stopping(&self) -> bool {
        self.0.stopping.load(Ordering::SeqCst)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(t) = self.session.take() {
            // Dropped without a stop (an error path): take the export away now.
            self.sh.stopping.store(true, Ordering::SeqCst);
            let _ = sys::umount(&self.sh.dir, true);
            let _ = t.join();
        }
        self.end();
        self.join_helpers();
    }
}

/// Commits on a timer and turns stop requests into an unmount of DIR once no
/// volume is open: a stop while loop devices are attached waits for them to
/// be detached (new opens are refused meanwhile), so `detach` still works.
fn ticker(sh: Arc<Shared>) {
    let mut last_commit = Instant::now();
    let mut handled_signals = 0;
    let mut waiting_logged = false;
    let mut unmounted = false;
    while !sh.ended.load(Ordering::SeqCst) {
        thread::sleep(TICK);
        // Nothing happens here while a handover holds the gate.
        let Some(_pass) = sh.gate.try_enter() else {
            continue;
        };
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals > handled_signals && sh.hand_back.load(Ordering::SeqCst) && sh.holder_alive() {
            if handled_signals == 0 {
                eprintln!("thinpool: signalled: handing the export back to the holder");
                handled_signals = signals;
                sh.hand_back_asked.store(true, Ordering::SeqCst);
                continue;
            }
            // Second signal: leave as a crash would; the holder keeps the
            // export for the next worker (requests are resent to it).
            eprintln!("thinpool: second signal: exiting; the holder keeps the export");
            let _ = sh.commit();
            std::process::exit(1);
        }
        if signals > handled_signals {
            if handled_signals > 0 && !unmounted {
                // Second signal while volumes are still attached: commit and go.
                // Closing /dev/fuse aborts the connection; loop devices see EIO.
                eprintln!("thinpool: second signal, exiting with volumes still attached");
                let _ = sh.commit();
                let _ = std::fs::remove_file(socket_path(&sh.pool_path));
                let _ = sys::umount(&sh.dir, true);
                let _ = sh.tell_holder(serde_json::json!({ "event": "stopped" }));
                std::process::exit(1);
            }
            handled_signals = signals;
            sh.stopping.store(true, Ordering::SeqCst);
        }
        if sh.stopping.load(Ordering::SeqCst) && !unmounted {
            if sh.lock_opens().is_empty() {
                unmounted = true;
                if let Err(e) = sh.commit() {
                    eprintln!("thinpool: commit failed: {e}");
                }
                stop_mount(&sh.dir);
            } else if !waiting_logged {
                waiting_logged = true;
                let attached: Vec<String> = sys::loop_devices()
                    .into_iter()
                    .filter(|d| d.backing_file.starts_with(&sh.dir))
                    .map(|d| d.path().display().to_string())
                    .collect();
                eprintln!(
                    "thinpool: stopping once every volume is released (in use: {}); \
                     signal again to exit now",
                    if attached.is_empty() {
                        "open files".to_string()
                    } else {
                        attached.join(", ")
                    }
                );
            }
        }
        if last_commit.elapsed() >= COMMIT_INTERVAL {
            last_commit = Instant::now();
            // A full commit: flushes between two are intent-log syncs.
            if sh.pool.needs_commit() {
                if let Err(e) = sh.pool.commit() {
                    eprintln!("thinpool: periodic commit failed: {e}");
                }
            }
        }
    }
}

fn stop_mount(dir: &Path) {
    match sys::umount(dir, false) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            // Something raced us to open a file, or a process sits in DIR.
            eprintln!("thinpool: {} is busy; detaching it lazily", dir.display());
            let _ = sys::umount(dir, true);
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {} // already unmounted
        Err(e) => eprintln!("thinpool: cannot unmount {}: {e}", dir.display()),
    }
}

//------------------------------------------------------------------------------
// Control socket

/// Accepts control connections (the listener is non-blocking: it may be
/// shared with another server during a handover). Stops accepting while a
/// handover holds the gate: connections then wait in the backlog for the
/// next server.
fn accept_loop(listener: UnixListener, sh: Arc<Shared>) {
    let fd = listener.as_raw_fd();
    while !sh.ended.load(Ordering::SeqCst) {
        if sh.gate.is_closed() {
            thread::sleep(TICK);
            continue;
        }
        if !sys::readable(fd, TICK) {
            continue;
        }
        let Ok((stream, _)) = listener.accept() else {
            continue;
        };
        let _ = stream.set_nonblocking(false);
        // Its requests change volumes and a takeover hands out the pool and
        // the FUSE connection: our user (or root) only, whatever the umask
        // left the socket's mode at.
        match handover::peer_uid(stream.as_raw_fd()) {
            Ok(uid) if handover::trusted_uid(uid) => {}
            uid => {
                let e = Error::InvalidArgument(format!(
                    "a process of uid {uid:?} may not use the server of {}",
                    sh.pool_path.display()
                ));
                if let Ok(mut text) = serde_json::to_string(&Reply::err(&e)) {
                    text.push('\n');
                    let _ = (&stream).write_all(text.as_bytes());
                }
                continue;
            }
        }
        let sh = sh.clone();
        let _ = thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || serve_conn(stream, &sh));
    }
}

fn serve_conn(stream: UnixStream, sh: &Shared) {
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut out = write_half;
    let mut lines = BufReader::new(stream).lines();
    while let Some(Ok(line)) = lines.next() {
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<ServerRequest>(&line) {
            Ok(ServerRequest::ExportTakeover { version, pid }) => {
                match hand_over(sh, &out, &mut lines, version, pid) {
                    Ok(()) => unreachable_after_handover(),
                    Err(e) => Reply::err(&e),
                }
            }
            Ok(ServerRequest::ExportRestart) => {
                match refuse_in_process(sh).and_then(|()| restart(sh)) {
                    Ok(()) => {
                        let _ = out.write_all(b"{\"ok\":\"restarting\"}\n");
                        eprintln!("thinpool: handed back to the holder; exiting");
                        std::process::exit(0);
                    }
                    Err(e) => Reply::err(&e),
                }
            }
            _ => handle_line(sh, &line),
        };
        let mut text = serde_json::to_string(&reply)
            .unwrap_or_else(|_| r#"{"error":"encode","errno":5}"#.into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// The new server has the export: leave at once, touching nothing (no
/// commit, no unmount, no socket removal; requests waiting at the gate are
/// resent to the new server).
fn unreachable_after_handover() -> ! {
    std::process::exit(0)
}

/// Stop serving and commit: close the gate, wait for the requests inside.
fn quiesce_for_handover(sh: &Shared) -> Result<()> {
    if sh.stopping.load(Ordering::SeqCst) {
        return Err(Error::InUse("the server is stopping".into()));
    }
    // Commit once while still serving: the fdatasync of everything written
    // so far happens outside the pause, the one under the gate is small.
    let t = Instant::now();
    sh.commit()?;
    let early = t.elapsed();
    let t = Instant::now();
    if !sh.gate.close(QUIESCE_TIMEOUT) {
        return Err(Error::InUse(format!(
            "requests did not finish within {} s; nothing changed, retry",
            QUIESCE_TIMEOUT.as_secs()
        )));
    }
    let drained = t.elapsed();
    if let Err(e) = sh.commit() {
        sh.gate.open();
        return Err(e);
    }
    eprintln!(
        "thinpool: quiesced (commit while serving {} ms; under the gate: requests drained in {} ms, \
         commit {} ms)",
        early.as_millis(),
        drained.as_millis(),
        (t.elapsed() - drained).as_millis()
    );
    Ok(())
}

/// A takeover or restart asked through the control socket would leave the
/// in-process clients (the containerd snapshotter's gRPC service) behind.
fn refuse_in_process(sh: &Shared) -> Result<()> {
    if sh.refuse_handover.load(Ordering::SeqCst) {
        return Err(Error::InvalidArgument(
            "this server also serves in-process clients (the containerd snapshotter), \
             which a takeover would not carry over; restart it instead (docs/EXPORT.md)"
                .into(),
        ));
    }
    Ok(())
}

/// This server's bundle with its current state, to give away.
fn current_bundle(sh: &Shared) -> Result<Bundle> {
    let guard = sh.bundle.lock().unwrap_or_else(|p| p.into_inner());
    let b = guard.as_ref().filter(|b| b.pool.is_some()).ok_or_else(|| {
        Error::InvalidArgument(
            "this server was started on an open pool by a library user; it cannot hand over".into(),
        )
    })?;
    let mut b = b.try_clone()?;
    b.state.init = *sh.init.lock().unwrap_or_else(|p| p.into_inner());
    b.state.opens = sh.lock_opens().iter().map(|(k, v)| (*k, *v)).collect();
    Ok(b)
}

/// Planned takeover (handover protocol, docs/EXPORT.md): quiesce, send the
/// bundle, and on the new server's confirmation exit; on anything else
/// reopen the gate and go on serving.
fn hand_over(
    sh: &Shared,
    out: &UnixStream,
    lines: &mut std::io::Lines<BufReader<UnixStream>>,
    version: u32,
    pid: u32,
) -> Result<()> {
    if version != handover::VERSION {
        return Err(Error::InvalidArgument(format!(
            "handover version {version} asked, this server speaks {}",
            handover::VERSION
        )));
    }
    refuse_in_process(sh)?;
    if sh.holder_alive() {
        return Err(Error::InvalidArgument(
            "this server is supervised: ask for export_restart".into(),
        ));
    }
    let bundle = current_bundle(sh)?;
    if bundle.state.init.is_none() {
        return Err(Error::InUse(
            "the FUSE connection is not initialised yet".into(),
        ));
    }
    if !bundle.state.init.is_some_and(|i| i.has_resend()) {
        return Err(Error::InvalidArgument(
            "this kernel cannot resend FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9): \
             a takeover would leave requests unanswered; stop and start the server instead"
                .into(),
        ));
    }
    quiesce_for_handover(sh)?;
    let t = Instant::now();
    if let Err(e) = bundle.send(out.as_raw_fd(), true) {
        sh.gate.open();
        return Err(e.into());
    }
    let _ = out.set_read_timeout(Some(HANDOVER_TIMEOUT));
    match lines.next() {
        Some(Ok(l)) if l.contains("\"export_took_over\"") => {
            eprintln!(
                "thinpool: handed {} over to process {pid} ({} ms after the bundle); exiting",
                sh.pool_path.display(),
                t.elapsed().as_millis()
            );
            Ok(())
        }
        other => {
            // Safe because we committed with the gate closed: the intent
            // log after that commit is empty, so the new server's open
            // replayed nothing and wrote nothing. Were it ever to commit
            // at open, a failed new server would have moved the pool past
            // our state, and we must not serve on from memory.
            eprintln!(
                "thinpool: process {pid} did not take over ({}); serving on",
                match other {
                    Some(Ok(l)) => l,
                    Some(Err(e)) => e.to_string(),
                    None => "connection closed".into(),
                }
            );
            sh.gate.open();
            Err(Error::InUse("the new server did not take over".into()))
        }
    }
}

/// Planned restart of a supervised server: quiesce, hand the state back to
/// the holder (which keeps the descriptors) and let it start the new binary.
fn restart(sh: &Shared) -> Result<()> {
    if !sh.holder_alive() {
        return Err(Error::InvalidArgument(
            "this server is not supervised (or its holder is gone): use the takeover".into(),
        ));
    }
    let bundle = current_bundle(sh)?;
    if !bundle.state.init.is_some_and(|i| i.has_resend()) {
        return Err(Error::InvalidArgument(
            "this kernel cannot resend FUSE requests (FUSE_NOTIFY_RESEND needs Linux 6.9): \
             a restart would leave requests unanswered"
                .into(),
        ));
    }
    quiesce_for_handover(sh)?;
    if let Err(e) =
        sh.tell_holder(serde_json::json!({ "event": "restart", "opens": bundle.state.opens }))
    {
        sh.gate.open();
        return Err(Error::Io(e));
    }
    Ok(())
}

fn handle_line(sh: &Shared, line: &str) -> Reply {
    if let Ok(req) = serde_json::from_str::<ServerRequest>(line) {
        return match req {
            ServerRequest::ExportStatus => Reply::ok(status(sh)),
            ServerRequest::ExportShutdownIfIdle { wait_ms } => {
                let _pass = sh.gate.enter();
                Reply::ok(shutdown_if_idle(sh, wait_ms))
            }
            ServerRequest::ExportTakeover { .. }
            | ServerRequest::ExportTookOver
            | ServerRequest::ExportRestart => {
                Reply::err(&Error::InvalidArgument("not a request on its own".into()))
            }
        };
    }
    let _pass = sh.gate.enter();
    match serde_json::from_str::<Request>(line) {
        Ok(_) if sh.stopping.load(Ordering::SeqCst) => Reply::err(&Error::InUse(format!(
            "the server of {} is shutting down; retry",
            sh.pool_path.display()
        ))),
        Ok(req) => match handle_request(sh, req) {
            Ok(resp) => Reply::ok(resp),
            Err(e) => Reply::err(&e),
        },
        Err(e) => Reply::err(&Error::InvalidArgument(format!("bad request: {e}"))),
    }
}

fn status(sh: &Shared) -> ServerStatus {
    let opens: Vec<(VolumeId, u32)> = sh.lock_opens().iter().map(|(k, v)| (*k, *v)).collect();
    let pool = sh.pool.read_engine();
    let mut open: Vec<(String, u32)> = opens
        .into_iter()
        .map(|(id, n)| (pool.volume_name(id).unwrap_or_else(|_| format!("#{id}")), n))
        .collect();
    drop(pool);
    open.sort();
    ServerStatus {
        pid: std::process::id(),
        pool: sh.pool_path.clone(),
        dir: sh.dir.clone(),
        background: sh.background,
        stopping: sh.stopping.load(Ordering::SeqCst),
        open,
        // SAFETY: getppid has no preconditions.
        supervisor: sh.holder_alive().then(|| unsafe { libc::getppid() } as u32),
    }
}

fn shutdown_if_idle(sh: &Shared, wait_ms: u64) -> ShutdownReply {
    if !sh.background {
        return ShutdownReply {
            stopping: false,
            reason: "started by 'thinpool serve'; stop it yourself".into(),
        };
    }
    // A detached loop device releases its file asynchronously (and later
    // still if udev has it open): give it a moment.
    let deadline = Instant::now() + Duration::from_millis(wait_ms);
    let mut opens = sh.lock_opens();
    while !opens.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return ShutdownReply {
                stopping: false,
                reason: "volumes are still in use".into(),
            };
        }
        opens = sh
            .idle
            .wait_timeout(opens, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    sh.stopping.store(true, Ordering::SeqCst);
    ShutdownReply {
        stopping: true,
        reason: "idle".into(),
    }
}

/// `execute` plus the rules that only make sense while volumes are exported.
fn handle_request(sh: &Shared, req: Request) -> Result<Response> {
    match req {
        Request::Remove { ref name } | Request::Rename { old: ref name, .. } => {
            let name = name.clone();
            let check = |pool: &mut Pool| -> Result<()> {
                let id = pool.lookup(&name)?;
                if sh.in_use(id) {
                    return Err(in_use(sh, &name));
                }
                Ok(())
            };
            let resp = match req {
                // The release walk under the engine lock, the syncs after it.
                Request::Remove { .. } => sh.pool.change(|pool| {
                    check(pool)?;
                    pool.stage_remove(&name)?;
                    Ok(Response::Ok)
                })?,
                _ => sh.pool.with(|pool| {
                    check(pool)?;
                    execute(pool, req)
                })?,
            };
            sh.notify(|n| n.inval_entry(fuser::INodeNo(1), std::ffi::OsStr::new(&name)));
            Ok(resp)
        }
        Request::Snapshot { ref source, .. } => {
            let source = source.clone();
            let id = sh.pool.read_engine().lookup(&source)?;
            // Hold the freeze (if any) across the snapshot; thawed on drop.
            let _frozen = if sh.in_use(id) {
                quiesce(sh, &source)?
            } else {
                None
            };
            sh.pool.with(|pool| execute(pool, req))
        }
        Request::Resize { ref name, .. } => {
            let name = name.clone();
            let resp = sh.pool.with(|pool| -> Result<_> {
                let r = execute(pool, req)?;
                Ok((r, pool.lookup(&name)?))
            })?;
            sh.notify(|n| n.inval_inode(ino_of(resp.1), 0, 0));
            Ok(resp.0)
        }
        Request::Flush => {
            sh.commit()?;
            Ok(Response::Ok)
        }
        Request::Info => {
            let engine = sh.pool.read_engine();
            let mut info = engine.info()?;
            info.direct_io = Some(engine.storage().is_direct());
            drop(engine);
            info.commits = Some(sh.pool.stats());
            Ok(Response::Info(info))
        }
        // Neither holds the engine lock for its whole walk.
        Request::List => Ok(Response::List(sh.pool.list()?)),
        Request::Check => Ok(Response::Check(sh.pool.check()?)),
        other => sh.pool.with(|pool| execute(pool, other)),
    }
}

fn in_use(sh: &Shared, name: &str) -> Error {
    let file = sh.dir.join(name);
    let devs: Vec<String> = sys::loops_backed_by(&file)
        .iter()
        .map(|d| d.path().display().to_string())
        .collect();
    if devs.is_empty() {
        Error::InUse(format!(
            "volume '{name}' is in use (open in {})",
            sh.dir.display()
        ))
    } else {
        Error::InUse(format!(
            "volume '{name}' is in use (attached as {})",
            devs.join(", ")
        ))
    }
}

/// Make a live volume consistent for a snapshot: freeze the filesystem mounted
/// on its loop device (which flushes it through us), or flush the device.
fn quiesce(sh: &Shared, name: &str) -> Result<Option<Frozen>> {
    let file = sh.dir.join(name);
    let devs = sys::loops_backed_by(&file);
    let mounts = sys::mounts();
    for dev in &devs {
        if let Some(m) = mounts
            .iter()
            .find(|m| m.majmin == dev.majmin && !m.read_only)
        {
            match Frozen::freeze(&m.mountpoint) {
                Ok(f) => return Ok(Some(f)),
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                Err(e) => {
                    return Err(Error::Io(std::io::Error::new(
                        e.kind(),
                        format!(
                            "cannot freeze {} for a consistent snapshot: {e}",
                            m.mountpoint.display()
                        ),
                    )))
                }
            }
        }
    }
    for dev in &devs {
        if let Err(e) = sys::flush_device(&dev.path()) {
            eprintln!("thinpool: cannot flush {}: {e}", dev.path().display());
        }
    }
    Ok(None)
}
