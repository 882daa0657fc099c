//! `thinpool serve`: owns the pool, mounts the FUSE export, answers the control
//! socket, commits on a timer, and stops cleanly on a signal or `umount DIR`.
//!
//! Threads: the fuser workers (one per request stream), one control-socket
//! acceptor plus one thread per connection, and a ticker that commits about
//! once a second when something was written and watches for stop requests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLockReadGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use fuser::{Config, MountOption, Session, SessionACL};

use super::control::{socket_path, Reply, ServerRequest, ServerStatus, ShutdownReply};
use super::fs::{ino_of, ThinFs};
use super::state::Shared;
use super::sys::{self, Frozen};
use super::ExportError;
use crate::control::{execute, Request, Response};
use crate::error::{Error, Result};
use crate::pool::{Pool, SharedPool, VolumeId};

const COMMIT_INTERVAL: Duration = Duration::from_secs(1);
const TICK: Duration = Duration::from_millis(50);

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

static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn install_signal_handlers() {
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
struct Cleanup {
    socket: PathBuf,
    /// (device, inode) of the socket this server bound.
    bound: Option<(u64, u64)>,
    dir: Option<PathBuf>,
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
    serve_with(pool_path, dir, opts, |_| Ok(()))
}

/// `serve`, calling `on_ready` with a handle on the running server (FUSE
/// requests are already being served) before waiting for it to stop: the
/// containerd snapshotter starts its gRPC service there.
pub fn serve_with(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
    on_ready: impl FnOnce(ServerHandle) -> Result<(), ExportError>,
) -> Result<(), ExportError> {
    let pool_path = std::fs::canonicalize(pool_path).map_err(ExportError::path(pool_path))?;
    if let Some(Ok(st)) = super::control::status(&pool_path) {
        return Err(ExportError::AlreadyServed {
            pool: pool_path,
            pid: st.pid,
            dir: st.dir,
        });
    }
    // The one place a served pool is opened.
    let pool = match opts.direct {
        true => Pool::open_direct(&pool_path)?,
        false => Pool::open(&pool_path)?,
    };
    install_signal_handlers();
    let server = Server::start(pool, dir, opts)?;
    let background = opts.background;
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
    /// Mount the FUSE export of `pool` (opened from its canonical path) on `dir`.
    pub fn start(pool: Pool, dir: &Path, opts: &ServeOptions) -> Result<Server, ExportError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ExportError::NeedsRoot);
        }
        let pool_path = pool.path().to_path_buf();
        let block_size = pool.block_size();
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

        let sock = socket_path(&pool_path);
        // We hold the pool lock, so any socket file left here is stale.
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock).map_err(|source| ExportError::Bind {
            socket: sock.clone(),
            source,
        })?;
        let cleanup = Cleanup {
            bound: file_id(&sock),
            socket: sock.clone(),
            dir: opts.background.then(|| dir.clone()),
        };

        let sh = Arc::new(Shared {
            pool: SharedPool::new(pool),
            pool_path: pool_path.clone(),
            dir: dir.clone(),
            background: opts.background,
            started: SystemTime::now(),
            block_size,
            stopping: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            opens: Mutex::new(HashMap::new()),
            idle: Condvar::new(),
            notifier: Mutex::new(None),
        });

        let threads = if opts.threads > 0 {
            opts.threads
        } else {
            thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .clamp(2, 8)
                * 2
        };
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(format!("thinpool:{}", pool_path.display())),
            MountOption::DefaultPermissions,
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
            MountOption::NoAtime,
        ];
        config.acl = SessionACL::All;
        config.n_threads = Some(threads);
        config.clone_fd = true;

        let session = Session::new(ThinFs { sh: sh.clone() }, &dir, &config).map_err(|source| {
            ExportError::FuseMount {
                dir: dir.clone(),
                source,
            }
        })?;
        *sh.notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some(session.notifier());
        eprintln!(
            "thinpool: serving {} on {} ({} threads, control socket {})",
            pool_path.display(),
            dir.display(),
            threads,
            sock.display()
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
            // Wake the acceptor so that it sees `ended` and lets go.
            let _ = UnixStream::connect(socket_path(&sh.pool_path));
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
        self.0.pool.change(f)
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
        handle_request(&self.0, req)
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
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals > handled_signals {
            if handled_signals > 0 && !unmounted {
                // Second signal while volumes are still attached: commit and go.
                // Closing /dev/fuse aborts the connection; loop devices see EIO.
                eprintln!("thinpool: second signal, exiting with volumes still attached");
                let _ = sh.commit();
                let _ = std::fs::remove_file(socket_path(&sh.pool_path));
                let _ = sys::umount(&sh.dir, true);
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
            if sh.pool.is_dirty() {
                if let Err(e) = sh.commit() {
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

fn accept_loop(listener: UnixListener, sh: Arc<Shared>) {
    for stream in listener.incoming() {
        if sh.ended.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
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
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = handle_line(sh, &line);
        let mut text = serde_json::to_string(&reply)
            .unwrap_or_else(|_| r#"{"error":"encode","errno":5}"#.into());
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

fn handle_line(sh: &Shared, line: &str) -> Reply {
    if let Ok(req) = serde_json::from_str::<ServerRequest>(line) {
        return match req {
            ServerRequest::ExportStatus => Reply::ok(status(sh)),
            ServerRequest::ExportShutdownIfIdle { wait_ms } => {
                Reply::ok(shutdown_if_idle(sh, wait_ms))
            }
        };
    }
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
