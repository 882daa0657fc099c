//! The verbs around a server: attach/detach a volume as a loop device, mount
//! and unmount a filesystem on it, and start/stop a background server.
//!
//! Nothing is recorded on disk: a loop device's backing file names the export
//! directory, and the FUSE mount of that directory names its pool
//! (`thinpool:/path/to/pool` in the mount table).

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use super::control::{self, ServerStatus};
use super::sys::{self, LoopDev};
use super::ExportError;

/// Where background servers mount their pools.
pub const RUN_DIR: &str = "/run/thinpool";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping server waits for loop devices to release their files.
const RELEASE_WAIT: Duration = Duration::from_secs(5);
const FSNAME_PREFIX: &str = "thinpool:";

/// Filesystems `mount --mkfs` can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mkfs {
    Ext4,
    Xfs,
}

impl std::str::FromStr for Mkfs {
    type Err = String;
    fn from_str(s: &str) -> Result<Mkfs, String> {
        match s {
            "ext4" => Ok(Mkfs::Ext4),
            "xfs" => Ok(Mkfs::Xfs),
            _ => Err(format!("unsupported filesystem '{s}' (use ext4 or xfs)")),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct MountOptions {
    pub mkfs: Option<Mkfs>,
    pub read_only: bool,
    /// Passed to mount(8) as `-o`.
    pub options: Option<String>,
}

/// The export directory of a background server: `/run/thinpool/<hash of the pool path>`.
pub fn default_export_dir(pool: &Path) -> PathBuf {
    // FNV-1a: stable across builds and runs, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in pool.as_os_str().as_encoded_bytes() {
        h = (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    Path::new(RUN_DIR).join(format!("{h:016x}"))
}

fn canonical(p: &Path) -> Result<PathBuf, ExportError> {
    fs::canonicalize(p).map_err(ExportError::path(p))
}

//------------------------------------------------------------------------------
// Servers

/// Starts `thinpool serve POOL DIR --background` as a process of its own,
/// its output going to `log`. The binary supplies this: the library never
/// runs a program itself.
pub type StartServer = fn(pool: &Path, dir: &Path, log: fs::File) -> std::io::Result<Child>;

/// The running server of `pool`, starting one in the background if none runs.
/// Returns its status and whether we started it.
pub fn ensure_server(pool: &Path, start: StartServer) -> Result<(ServerStatus, bool), ExportError> {
    let pool = canonical(pool)?;
    match control::status(&pool) {
        Some(Ok(st)) if !st.stopping => return Ok((st, false)),
        Some(Ok(st)) => wait_gone(&pool, Some(st.pid), STOP_TIMEOUT)?,
        Some(Err(e)) => return Err(e.into()),
        None => {}
    }
    start_background(&pool, start).map(|st| (st, true))
}

fn start_background(pool: &Path, start: StartServer) -> Result<ServerStatus, ExportError> {
    let dir = default_export_dir(pool);
    fs::create_dir_all(RUN_DIR).map_err(ExportError::path(Path::new(RUN_DIR)))?;
    let log_path = dir.with_extension("log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(ExportError::path(&log_path))?;
    let mut child = start(pool, &dir, log).map_err(ExportError::ServerSpawn)?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        match control::status(pool) {
            Some(Ok(st)) if !st.stopping => return Ok(st),
            Some(Err(e)) => return Err(e.into()),
            _ => {}
        }
        let exited = matches!(child.try_wait(), Ok(Some(_)));
        if exited || Instant::now() > deadline {
            // Another attach may have won the race to serve this pool.
            if let Some(Ok(st)) = control::status(pool) {
                return Ok(st);
            }
            if !exited {
                let _ = child.kill();
                let _ = child.wait();
            }
            let tail = fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(ExportError::ServerDidNotStart {
                pool: pool.to_path_buf(),
                exited,
                log: log_path,
                log_tail: if tail.is_empty() {
                    String::new()
                } else {
                    format!(":\n  {}", tail.join("\n  "))
                },
            });
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// Wait until no server answers for `pool` (its socket is gone or refuses)
/// and its process `pid` has exited, so the pool file is free again.
fn wait_gone(pool: &Path, pid: Option<u32>, timeout: Duration) -> Result<(), ExportError> {
    let deadline = Instant::now() + timeout;
    while control::status(pool).is_some() || pid.is_some_and(alive) {
        if Instant::now() > deadline {
            return Err(ExportError::ServerDidNotStop(pool.to_path_buf()));
        }
        thread::sleep(Duration::from_millis(25));
    }
    Ok(())
}

/// A process that has not exited (a zombie has: its files are closed).
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z')),
        Err(_) => false,
    }
}

/// Stop the background server of `pool` if nothing of it is in use any more,
/// and wait for it to be gone. A server started by `thinpool serve` stays.
pub fn stop_if_idle(pool: &Path) -> Result<(), ExportError> {
    let pid = match control::status(pool) {
        Some(Ok(st)) => Some(st.pid),
        _ => None,
    };
    match control::shutdown_if_idle(pool, RELEASE_WAIT) {
        Some(Ok(r)) if r.stopping => wait_gone(pool, pid, STOP_TIMEOUT),
        Some(Ok(_)) | None => Ok(()),
        Some(Err(e)) => Err(e.into()),
    }
}

//------------------------------------------------------------------------------
// attach / detach

/// Attach volume `name` of `pool` as a loop device (direct I/O) and return it.
pub fn attach(
    pool: &Path,
    name: &str,
    read_only: bool,
    start: StartServer,
) -> Result<PathBuf, ExportError> {
    let pool = canonical(pool)?;
    let (st, started) = ensure_server(&pool, start)?;
    let res = attach_file(&st.dir, name, read_only);
    if res.is_err() && started {
        let _ = stop_if_idle(&pool);
    }
    res
}

/// Attach the volume file `name` of the export in `dir` as a loop device.
pub fn attach_file(dir: &Path, name: &str, read_only: bool) -> Result<PathBuf, ExportError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(crate::Error::NoSuchVolume(name.to_string()).into());
    }
    let file = dir.join(name);
    let meta = match fs::metadata(&file) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(crate::Error::NoSuchVolume(name.to_string()).into())
        }
        Err(e) => return Err(ExportError::path(&file)(e)),
    };
    // Snapshots are 0444: attach them read-only rather than fail.
    let read_only =
        read_only || std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o200 == 0;
    sys::losetup_attach(&file, read_only)
}

/// What a thinpool loop device is attached to.
struct Attachment {
    dev: LoopDev,
    pool: PathBuf,
    dir: PathBuf,
}

fn attachment(device: &Path) -> Result<Attachment, ExportError> {
    let real = canonical(device)?;
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let not_ours = || ExportError::NotOurDevice(device.to_path_buf());
    if !name.starts_with("loop") {
        return Err(not_ours());
    }
    let dev = sys::loop_device(&name).ok_or_else(not_ours)?;
    let dir = dev
        .backing_file
        .parent()
        .ok_or_else(not_ours)?
        .to_path_buf();
    let pool = pool_of_export(&dir).ok_or_else(not_ours)?;
    Ok(Attachment { dev, pool, dir })
}

/// The pool served on `dir`, from the FUSE mount's source (`thinpool:/pool`).
fn pool_of_export(dir: &Path) -> Option<PathBuf> {
    let m = sys::mount_at(dir)?;
    let pool = m.source.strip_prefix(FSNAME_PREFIX)?;
    (m.fstype == "fuse").then(|| PathBuf::from(pool))
}

/// Detach a loop device attached by `attach`; stop its background server if
/// that was the last thing using the pool.
pub fn detach(device: &Path) -> Result<(), ExportError> {
    let a = attachment(device)?;
    a.dev.detach()?;
    after_detach(&a)
}

fn after_detach(a: &Attachment) -> Result<(), ExportError> {
    if control::status(&a.pool).is_some() {
        return stop_if_idle(&a.pool);
    }
    // The server died: its socket is stale (nobody listens), and once
    // nothing uses its dead mount, take that away too.
    let sock = control::socket_path(&a.pool);
    if std::os::unix::net::UnixStream::connect(&sock)
        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    {
        let _ = fs::remove_file(&sock);
    }
    // The detached device lets go of its file, and a killed server of its
    // FUSE connection, asynchronously: wait for the kernel to finish both,
    // then look once whether another device still uses the dead mount.
    let released = || {
        !sys::loop_devices()
            .iter()
            .any(|d| d.name == a.dev.name && d.backing_file.starts_with(&a.dir))
            && sys::is_dead_fuse_mount(&a.dir)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !released() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    let others = sys::loop_devices()
        .into_iter()
        .any(|d| d.backing_file.starts_with(&a.dir));
    if !others && sys::is_dead_fuse_mount(&a.dir) {
        let _ = sys::umount(&a.dir, true);
        if a.dir.starts_with(RUN_DIR) {
            let _ = fs::remove_dir(&a.dir);
        }
    }
    Ok(())
}

//------------------------------------------------------------------------------
// mount / umount

/// Detaches a loop device unless disarmed (for the error paths of `mount`).
struct AttachGuard(Option<PathBuf>);

impl Drop for AttachGuard {
    fn drop(&mut self) {
        if let Some(dev) = self.0.take() {
            if let Err(e) = detach(&dev) {
                eprintln!("thinpool: cleanup: {e}");
            }
        }
    }
}

/// Attach `name`, optionally make a filesystem on it, and mount it on `dir`.
pub fn mount(
    pool: &Path,
    name: &str,
    dir: &Path,
    opts: &MountOptions,
    start: StartServer,
) -> Result<PathBuf, ExportError> {
    let dir = mount_point(dir, opts)?;
    let dev = attach(pool, name, opts.read_only, start)?;
    mount_device(dev, &dir, opts)
}

/// Mount the volume `name` of a server running in this process (see
/// [`super::Server`]) on `dir`, like [`mount`].
pub fn mount_served(
    server: &super::Server,
    name: &str,
    dir: &Path,
    opts: &MountOptions,
) -> Result<PathBuf, ExportError> {
    let dir = mount_point(dir, opts)?;
    let dev = attach_file(server.dir(), name, opts.read_only)?;
    mount_device(dev, &dir, opts)
}

fn mount_point(dir: &Path, opts: &MountOptions) -> Result<PathBuf, ExportError> {
    let dir = canonical(dir)?;
    if !dir.is_dir() {
        return Err(ExportError::NotADirectory(dir));
    }
    if opts.mkfs.is_some() && opts.read_only {
        return Err(crate::Error::InvalidArgument(
            "--mkfs and --read-only do not go together".into(),
        )
        .into());
    }
    Ok(dir)
}

/// Make the filesystem asked for on the attached `dev` and mount it on
/// `dir`; detach `dev` if that fails.
fn mount_device(dev: PathBuf, dir: &Path, opts: &MountOptions) -> Result<PathBuf, ExportError> {
    let mut guard = AttachGuard(Some(dev.clone()));
    match opts.mkfs {
        Some(Mkfs::Ext4) => sys::run(
            // Initialise inode tables and journal now: ext4's lazy init would
            // otherwise write them after mount, into every later clone too.
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&dev),
        )?,
        Some(Mkfs::Xfs) => sys::run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&dev))?,
        None => String::new(),
    };
    let mount = |options: Option<&str>| {
        let mut cmd = Command::new("mount");
        if opts.read_only {
            cmd.arg("-r");
        }
        if let Some(o) = options {
            cmd.arg("-o").arg(o);
        }
        sys::run(cmd.arg(&dev).arg(dir))
    };
    if let Err(e) = mount(opts.options.as_deref()) {
        // A snapshot of a live filesystem is taken frozen: its metadata is
        // in place, but its log/journal still asks for recovery, which a
        // read-only device cannot do. Mount it without log recovery (and,
        // for xfs, beside its origin's identical UUID).
        let fallback = match (opts.read_only, &opts.options) {
            (true, None) => no_recovery_options(&dev),
            _ => None,
        };
        match fallback {
            Some(o) if mount(Some(o)).is_ok() => {}
            _ => return Err(e),
        }
    }
    guard.0 = None;
    Ok(dev)
}

/// Mount options that skip log recovery for the filesystem on `dev`.
fn no_recovery_options(dev: &Path) -> Option<&'static str> {
    let out = Command::new("blkid")
        .args(["-o", "value", "-s", "TYPE"])
        .arg(dev)
        .output()
        .ok()?;
    match String::from_utf8_lossy(&out.stdout).trim() {
        "xfs" => Some("norecovery,nouuid"),
        "ext4" | "ext3" => Some("noload"),
        _ => None,
    }
}

/// Unmount `dir` (mounted by `mount`), detach its loop device, and stop the
/// background server if nothing else of its pool is in use.
pub fn umount(dir: &Path) -> Result<(), ExportError> {
    let dir = canonical(dir)?;
    let not_ours = || ExportError::NotOurMount(dir.clone());
    let m = sys::mount_at(&dir).ok_or_else(not_ours)?;
    let a = attachment(Path::new(&m.source)).map_err(|_| not_ours())?;
    sys::run(Command::new("umount").arg(&dir))?;
    // The same device may still be mounted elsewhere (bind mounts): keep it.
    if sys::mounts().iter().any(|o| o.majmin == a.dev.majmin) {
        return Ok(());
    }
    a.dev.detach()?;
    after_detach(&a)
}
