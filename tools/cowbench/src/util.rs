//! Small helpers: running commands, timing, teardown guards, signals, space.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turn SIGINT/SIGTERM/SIGHUP into a flag so that the run unwinds through the
/// teardown guards instead of dying with mounts and loop devices left behind.
pub fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Fail with "interrupted" once a signal arrived (checked between steps).
pub fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted by signal");
    }
    Ok(())
}

pub fn set_verbose(v: bool) {
    VERBOSE.store(v, Ordering::SeqCst);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::SeqCst)
}

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[cowbench] {}", msg.as_ref());
}

pub fn vlog(msg: impl AsRef<str>) {
    if verbose() {
        log(msg);
    }
}

/// Run a program, fail with its stderr if it exits non-zero; return stdout.
pub fn run(prog: &str, args: &[&str]) -> Result<String> {
    check_interrupt()?;
    vlog(format!("$ {} {}", prog, args.join(" ")));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {prog}"))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            prog,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run and ignore failures (teardown paths).
pub fn run_quiet(prog: &str, args: &[&str]) -> bool {
    vlog(format!("$ {} {} (teardown)", prog, args.join(" ")));
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

pub fn have_tool(name: &str) -> bool {
    if name.contains('/') {
        return Path::new(name).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false)
}

pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

pub fn is_mountpoint(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Ok(canon) = dir.canonicalize() else {
        return false;
    };
    let want = canon.to_string_lossy().replace(' ', "\\040");
    text.lines()
        .any(|l| l.split(' ').nth(4).map(|m| m == want).unwrap_or(false))
}

/// Unmount, retrying while busy, lazily as a last resort.
pub fn umount_dir(dir: &Path) {
    for _ in 0..20 {
        if !is_mountpoint(dir) {
            return;
        }
        // SAFETY: plain syscall with a valid C string.
        let rc = unsafe { libc::umount2(cstr(dir).as_ptr(), 0) };
        if rc == 0 {
            continue;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if is_mountpoint(dir) {
        // SAFETY: as above.
        unsafe { libc::umount2(cstr(dir).as_ptr(), libc::MNT_DETACH) };
    }
}

/// `sync(2)` then drop the page cache, dentries and inodes (cold runs).
pub fn drop_caches() {
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

pub fn sync_all() {
    // SAFETY: sync has no arguments.
    unsafe { libc::sync() };
}

/// Allocated bytes of a path (st_blocks * 512), recursing into directories and
/// staying on its filesystem; hard links counted once. What `du -s --block-size=1` says.
pub fn du_bytes(path: &Path) -> Result<u64> {
    use std::collections::HashSet;
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let root =
        std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let dev = root.dev();
    let mut total = 0u64;
    let mut stack = vec![(path.to_path_buf(), root)];
    while let Some((p, md)) = stack.pop() {
        if md.dev() != dev {
            continue;
        }
        if md.nlink() > 1 && !md.is_dir() && !seen.insert(md.ino()) {
            continue;
        }
        total += md.blocks() * 512;
        if md.is_dir() {
            for e in std::fs::read_dir(&p).with_context(|| format!("read {}", p.display()))? {
                let e = e?;
                let m = e.metadata()?;
                stack.push((e.path(), m));
            }
        }
    }
    Ok(total)
}

/// Used bytes of the filesystem holding `path` (statvfs: blocks - free).
pub fn fs_used_bytes(path: &Path) -> Result<u64> {
    // SAFETY: statvfs fills the zeroed struct; the path is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(cstr(path).as_ptr(), &mut st) };
    if rc != 0 {
        bail!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}

/// What a teardown guard undoes.
#[derive(Debug, Clone)]
pub enum Undo {
    /// umount(2) a directory.
    Umount(PathBuf),
    /// `losetup -d` a loop device.
    Loop(String),
    /// Read a pid from a file and kill that process (daemonized helpers).
    KillPidFile(PathBuf),
    /// A command to run (e.g. `thinpool umount DIR`), then make sure DIR is unmounted.
    Command(Vec<String>, Option<PathBuf>),
}

impl Undo {
    fn apply(&self) {
        match self {
            Undo::Umount(d) => umount_dir(d),
            Undo::Loop(dev) => {
                run_quiet("losetup", &["-d", dev]);
            }
            Undo::KillPidFile(f) => {
                if let Some(pid) = std::fs::read_to_string(f)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    kill_pid(pid);
                }
            }
            Undo::Command(argv, dir) => {
                if let Some((p, a)) = argv.split_first() {
                    let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
                    run_quiet(p, &a);
                }
                if let Some(d) = dir {
                    umount_dir(d);
                }
            }
        }
    }
}

pub fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks existence.
    unsafe { libc::kill(pid, 0) == 0 }
}

pub fn kill_pid(pid: i32) {
    if pid <= 1 {
        return;
    }
    // SAFETY: signalling a pid we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    for _ in 0..50 {
        // Reap it if it is our child; ignore errors otherwise.
        // SAFETY: non-blocking waitpid on a specific pid.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
        if !pid_alive(pid) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// A stack of things to undo, applied in reverse order on drop (normal end,
/// error, panic or signal-triggered unwind alike).
#[derive(Default)]
pub struct Teardown {
    items: Vec<(u64, Undo)>,
    next: u64,
}

impl Teardown {
    pub fn push(&mut self, u: Undo) -> u64 {
        self.next += 1;
        self.items.push((self.next, u));
        self.next
    }

    /// Apply one item now (normal path) and forget it.
    pub fn undo(&mut self, id: u64) {
        if let Some(i) = self.items.iter().position(|(k, _)| *k == id) {
            let (_, u) = self.items.remove(i);
            u.apply();
        }
    }

    /// Forget an item that was undone some other way.
    pub fn forget(&mut self, id: u64) {
        self.items.retain(|(k, _)| *k != id);
    }

    pub fn all(&mut self) {
        while let Some((_, u)) = self.items.pop() {
            u.apply();
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.all();
    }
}

/// Write `len` bytes at `off` into `file` with pwrite + fsync; return the latency.
pub fn timed_write_fsync(file: &Path, off: u64, data: &[u8]) -> Result<Duration> {
    use std::os::unix::fs::FileExt;
    let t = Instant::now();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .with_context(|| format!("open {}", file.display()))?;
    f.write_all_at(data, off)?;
    f.sync_all()?;
    drop(f);
    Ok(t.elapsed())
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A fast deterministic generator for incompressible content (splitmix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let v = self.next_u64().to_le_bytes();
        let n = rest.len();
        rest.copy_from_slice(&v[..n]);
    }
}
