//! SIGKILL of a serving process: what survives it.
//!
//! The server is a child of the test (`thinpool serve POOL DIR`, PID owned
//! here) on a pool in a temporary directory. The kernel side (loop device,
//! ext4) is attached by the test itself. After each kill the dead mounts and
//! loop devices are cleaned up, a new server is started on the same pool, and
//! what was acknowledged is read back.
//!
//! Needs root, /dev/fuse and loop devices (fails with a message otherwise).
//! Everything set up (mounts, loop devices, servers) is undone by `Drop`
//! guards, also when an assertion fails.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use thinpool::export::control;

#[path = "support/host.rs"]
mod host;
use host::{describe, fill, is_mounted, loops_under, quietly, sh as run};

//------------------------------------------------------------------------------
// Harness

fn require_root() {
    host::require_root("kill");
}

fn tp<S: AsRef<OsStr>>(args: &[S]) -> String {
    run(env!("CARGO_BIN_EXE_thinpool"), args)
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill(seed, &mut v);
    v
}

/// A pool in a temporary directory, served by a child `thinpool serve`
/// process, and what the test attached and mounted on it.
struct Env {
    tmp: TempDir,
    pool: PathBuf,
    /// The export directory (`serve POOL DIR`), canonical.
    export: PathBuf,
    server: Option<Child>,
    /// Loop devices attached by the test.
    loops: Vec<String>,
    /// ext4 mount points (canonical).
    mounts: Vec<PathBuf>,
}

impl Env {
    fn new(size: &str, block_size: &str) -> Env {
        let env = Env::empty();
        tp(&[
            "create".as_ref(),
            env.pool.as_os_str(),
            "--size".as_ref(),
            size.as_ref(),
            "--block-size".as_ref(),
            block_size.as_ref(),
        ]);
        env
    }

    /// A copy of the pool file `tests/fixtures/NAME.tp.gz`.
    fn from_fixture(name: &str) -> Env {
        let env = Env::empty();
        let gz = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(format!("{name}.tp.gz"));
        let mut bytes = Vec::new();
        flate2::read::GzDecoder::new(fs::File::open(gz).unwrap())
            .read_to_end(&mut bytes)
            .unwrap();
        fs::write(&env.pool, bytes).unwrap();
        env
    }

    fn empty() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tp-kill-")
            .tempdir_in("/tmp")
            .unwrap();
        let root = fs::canonicalize(tmp.path()).unwrap();
        let pool = root.join("pool");
        let export = root.join("export");
        fs::create_dir(&export).unwrap();
        Env {
            tmp,
            pool,
            export,
            server: None,
            loops: Vec::new(),
            mounts: Vec::new(),
        }
    }

    fn p(&self) -> &str {
        self.pool.to_str().unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = fs::canonicalize(self.tmp.path()).unwrap().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    /// Start `thinpool serve` and wait until it answers and its directory
    /// shows the volumes.
    fn start_server(&mut self) {
        assert!(self.server.is_none());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("serve.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_thinpool"))
            .args(["serve", self.p(), self.export.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn thinpool serve");
        self.server = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let up = matches!(control::status(&self.pool), Some(Ok(st)) if !st.stopping)
                && is_mounted(&self.export);
            if up {
                return;
            }
            let exited = self.server.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "thinpool serve did not come up ({exited:?}): {}",
                fs::read_to_string(self.tmp.path().join("serve.log")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the server and reap it.
    fn kill_server(&mut self) {
        let mut child = self.server.take().expect("a server runs");
        // SAFETY: kill(2) of our own child, not yet reaped.
        let r = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL),
            "the server died of SIGKILL"
        );
    }

    /// SIGTERM the server: it commits and exits 0 (nothing may be attached).
    fn stop_server(&mut self) {
        let mut child = self.server.take().expect("a server runs");
        // SAFETY: kill(2) of our own child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        assert!(status.success(), "serve exited with {status}");
        assert!(!is_mounted(&self.export));
    }

    /// Attach the volume file as a loop device (direct I/O, as `attach` does).
    fn attach(&mut self, name: &str) -> String {
        let file = self.export.join(name);
        let dev = run(
            "losetup",
            &["--direct-io=on", "--find", "--show", file.to_str().unwrap()],
        );
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        self.loops.push(dev.clone());
        dev
    }

    fn detach(&mut self, dev: &str) {
        run("losetup", &["-d", dev]);
        self.loops.retain(|d| d != dev);
    }

    fn mount(&mut self, dev: &str, dir: &Path) {
        run("mount", &[dev, dir.to_str().unwrap()]);
        self.mounts.push(dir.to_path_buf());
    }

    fn umount(&mut self, dir: &Path) {
        run("umount", &[dir]);
        self.mounts.retain(|m| m != dir);
    }

    /// After a kill: lazily unmount the filesystems on the dead device,
    /// detach the loop devices (their I/O fails with EIO now) and unmount the
    /// dead FUSE export, so that a new server can serve the same directory.
    fn clean_up_dead(&mut self) {
        assert!(self.server.is_none());
        for m in std::mem::take(&mut self.mounts).iter().rev() {
            run("umount", &["-l".as_ref(), m.as_os_str()]);
        }
        for d in std::mem::take(&mut self.loops) {
            // The dead server's files fail every request; the loop device
            // passes that on as EIO.
            let mut buf = Aligned::new(4096);
            let err = open_direct(Path::new(&d), false)
                .read_exact_at(buf.get(), 0)
                .expect_err("a read through the dead server's loop device");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{d}: {err}");
            run("losetup", &["-d", &d]);
        }
        if is_mounted(&self.export) {
            run("umount", &["-l".as_ref(), self.export.as_os_str()]);
        }
        assert!(!is_mounted(&self.export), "dead FUSE mount left");
    }

    fn assert_no_leftovers(&self) {
        assert!(self.server.is_none() && self.loops.is_empty() && self.mounts.is_empty());
        assert!(loops_under(&self.export).is_empty(), "loop device left");
        assert!(!is_mounted(&self.export), "FUSE mount left");
        assert!(
            !control::socket_path(&self.pool).exists(),
            "socket left behind"
        );
    }

    /// `thinpool check` exits 0 only when clean; served or not.
    fn check_pool(&self) {
        let out = tp(&["check", self.p()]);
        assert!(out.contains("clean"), "check: {out}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            quietly("umount", &["-l".as_ref(), m.as_os_str()]);
        }
        let mut loops = std::mem::take(&mut self.loops);
        loops.extend(loops_under(&self.export));
        for d in loops {
            quietly("losetup", &["-d".as_ref(), d.as_ref()]);
        }
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.export) {
            quietly("umount", &["-l".as_ref(), self.export.as_os_str()]);
        }
        let _ = fs::remove_file(control::socket_path(&self.pool));
    }
}

//------------------------------------------------------------------------------
// Part 1: a mounted ext4 with fsyncs, killed several times

/// A file whose `fsync` (and its directory's) returned before the kill.
#[derive(Clone)]
struct Synced {
    rel: String,
    seed: u64,
    len: usize,
}

/// Writes files of known content: most are written, fsynced, their
/// directory fsynced, and only then recorded; every fourth is left unsynced.
/// Stops at the first error (the server is gone) or when told.
fn writer(
    dir: PathBuf,
    round: u64,
    acked: Arc<Mutex<Vec<Synced>>>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let sub = format!("r{round}");
        let subdir = dir.join(&sub);
        let mut i = 0u64;
        let res = (|| -> std::io::Result<()> {
            fs::create_dir(&subdir)?;
            fs::File::open(&dir)?.sync_all()?;
            let dirf = fs::File::open(&subdir)?;
            while !stop.load(Ordering::SeqCst) {
                let seed = round << 32 | i;
                // 1 byte to ~300 KiB: inline, partial and multi-block files.
                let len = [1usize, 4095, 4096, 12_345, 65_536, 300_001][(i % 6) as usize];
                let synced = i % 4 != 3;
                let rel = format!("{sub}/{}{i}", if synced { "s" } else { "u" });
                let mut f = fs::File::create(dir.join(&rel))?;
                f.write_all(&content(seed, len))?;
                if synced {
                    f.sync_all()?;
                    dirf.sync_all()?;
                    acked.lock().unwrap().push(Synced { rel, seed, len });
                }
                i += 1;
            }
            Ok(())
        })();
        if let Err(e) = res {
            // Expected once the server is gone: EIO, or a read-only ext4.
            eprintln!("round {round}: writer stopped after {i} files: {e}");
        }
        i
    })
}

/// Streams large files without any fsync, so that a kill finds unsynced
/// data in flight through the loop device as well.
fn bulk_writer(dir: PathBuf, round: u64, stop: Arc<AtomicBool>) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let chunk = content(round ^ 0x5555, 256 * 1024);
        let mut j = 0;
        let res = (|| -> std::io::Result<()> {
            while !stop.load(Ordering::SeqCst) {
                let mut f = fs::File::create(dir.join(format!("bulk-r{round}-{}", j % 4)))?;
                for _ in 0..8 {
                    f.write_all(&chunk)?;
                }
                j += 1;
            }
            Ok(())
        })();
        if let Err(e) = res {
            eprintln!("round {round}: bulk writer stopped after {j} files: {e}");
        }
    })
}

/// Tells the writer threads to stop when dropped (also on a panic).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn verify_synced(m: &Path, acked: &[Synced]) {
    for s in acked {
        let got = fs::read(m.join(&s.rel))
            .unwrap_or_else(|e| panic!("{} (fsync returned before the kill): {e}", s.rel));
        assert!(
            got.len() == s.len && got == content(s.seed, s.len),
            "{}: fsync returned before the kill, but it reads {} bytes that differ from the {} written",
            s.rel,
            got.len(),
            s.len
        );
    }
}

/// Kill the server while ext4 runs fsyncs, three times: after each, every
/// file whose fsync returned is there with its exact content, the
/// filesystem and the pool check clean.
#[test]
fn sigkill_mid_workload_keeps_every_fsynced_file() {
    require_root();
    let mut env = Env::new("1G", "4K");
    tp(&["volume", "create", env.p(), "v", "--size", "256M"]);
    env.start_server();
    let dev = env.attach("v");
    run("mkfs.ext4", &["-q", "-F", &dev]);
    let m = env.dir("m");
    env.mount(&dev, &m);

    let mut all: Vec<Synced> = Vec::new();
    for (round, kill_after) in [(0u64, 10usize), (1, 45), (2, 120)] {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // Dropped before `env` if an assertion fails: the writers stop first.
        let _stop = StopOnDrop(stop.clone());
        let w = writer(m.clone(), round, acked.clone(), stop.clone());
        let bulk = bulk_writer(m.clone(), round, stop.clone());
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < kill_after {
            assert!(
                !w.is_finished() && Instant::now() < deadline,
                "round {round}: the writer stopped before {kill_after} fsyncs"
            );
            thread::sleep(Duration::from_millis(1));
        }
        // Hold the list while killing: what is in it returned before the kill.
        let before = {
            let g = acked.lock().unwrap();
            env.kill_server();
            g.clone()
        };
        stop.store(true, Ordering::SeqCst);
        let written = w.join().unwrap();
        bulk.join().unwrap();
        eprintln!(
            "round {round}: killed after {} fsyncs ({written} files started)",
            before.len()
        );
        all.extend(before);

        env.clean_up_dead();
        // The pool file as the kill left it, before a server opens it.
        env.check_pool();
        env.start_server();
        let dev = env.attach("v");
        // Mounting replays ext4's journal.
        env.mount(&dev, &m);
        verify_synced(&m, &all);
        env.umount(&m);
        run("e2fsck", &["-fn", &dev]);
        env.check_pool();
        env.mount(&dev, &m);
    }
    env.umount(&m);
    let dev = env.loops[0].clone();
    env.detach(&dev);
    env.stop_server();
    env.check_pool();
    env.assert_no_leftovers();
}

//------------------------------------------------------------------------------
// Part 2: acknowledged but not flushed

/// A buffer aligned for O_DIRECT.
struct Aligned {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let buf = vec![0u8; len + 4096];
        let off = buf.as_ptr().align_offset(4096);
        Aligned { buf, off, len }
    }
    fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

fn open_direct(path: &Path, write: bool) -> fs::File {
    fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} O_DIRECT: {e}", path.display()))
}

const UNFLUSHED_BS: usize = 4096;
const UNFLUSHED_BLOCKS: u64 = 8192; // the 32 MiB volume "raw"
const UNFLUSHED_WRITES: u64 = 600;

/// Where unflushed write `i` goes: distinct blocks in a scattered order
/// (7919 is prime to 8192).
fn unflushed_offset(i: u64) -> u64 {
    (i * 7919 + 11) % UNFLUSHED_BLOCKS * UNFLUSHED_BS as u64
}

fn unflushed_data(i: u64) -> Vec<u8> {
    content(0xabc0_0000 + i, UNFLUSHED_BS)
}

/// A served 4 KiB-block pool; `UNFLUSHED_WRITES` distinct blocks pwritten
/// (O_DIRECT) to its volume "raw" without any flush, then the server killed
/// and its remains cleaned up. Returns the pool and how many pwrites returned.
///
/// The export opens files with FOPEN_DIRECT_IO (no page cache, no writeback
/// cache), so a pwrite returns only when the server has replied to its
/// FUSE_WRITE (after the data is in the pool file).
fn write_unflushed_and_kill() -> (Env, u64) {
    let mut env = Env::new("256M", "4K");
    tp(&["volume", "create", env.p(), "raw", "--size", "32M"]);
    env.start_server();
    let file = env.export.join("raw");
    let mut buf = Aligned::new(UNFLUSHED_BS);
    let f = open_direct(&file, true);
    let mut returned = 0u64;
    for i in 0..UNFLUSHED_WRITES {
        buf.get().copy_from_slice(&unflushed_data(i));
        f.write_all_at(buf.get(), unflushed_offset(i)).unwrap();
        returned += 1;
    }
    // The server has them: they read back through it before the kill.
    let g = open_direct(&file, false);
    for i in 0..UNFLUSHED_WRITES {
        g.read_exact_at(buf.get(), unflushed_offset(i)).unwrap();
        assert!(buf.get() == unflushed_data(i));
    }
    // No close before the kill: closing a written file commits.
    env.kill_server();
    drop((f, g));
    env.clean_up_dead();
    (env, returned)
}

/// The writes of `0..returned` that `read(i)` does not give back; with what
/// they read instead, and whether their data is in the pool file, in words.
fn lost_writes(env: &Env, returned: u64, mut read: impl FnMut(u64) -> Vec<u8>) -> Option<String> {
    let mut lost = Vec::new();
    let mut zeros = 0;
    for i in 0..returned {
        let got = read(i);
        if got != unflushed_data(i) {
            zeros += got.iter().all(|&b| b == 0) as usize;
            lost.push(i);
        }
    }
    if lost.is_empty() {
        return None;
    }
    // Why: is the lost data in the pool file (the pwrite reached it, only
    // the map change died with the process)?
    let wanted: std::collections::HashSet<Vec<u8>> =
        lost.iter().map(|&i| unflushed_data(i)).collect();
    let in_file = fs::read(&env.pool)
        .unwrap()
        .chunks(UNFLUSHED_BS)
        .filter(|c| wanted.contains(*c))
        .count();
    Some(format!(
        "{} of {returned} acknowledged pwrites did not survive SIGKILL of the server: \
         writes {}; {zeros} of them read as zeros, and the data of {in_file} is in the \
         pool file but no committed map points at it",
        lost.len(),
        ranges(&lost)
    ))
}

/// pwrite distinct blocks to a served volume without any flush, SIGKILL the
/// server, restart it: every pwrite that returned reads back.
///
/// The intent log (issue 11) claims this: its records reach the host page
/// cache before the reply. Without it, map changes not yet committed (the
/// server commits about once a second) die with the process.
#[test]
fn sigkill_loses_no_acknowledged_write() {
    require_root();
    let (mut env, returned) = write_unflushed_and_kill();
    env.start_server();
    let g = open_direct(&env.export.join("raw"), false);
    let mut buf = Aligned::new(UNFLUSHED_BS);
    let lost = lost_writes(&env, returned, |i| {
        g.read_exact_at(buf.get(), unflushed_offset(i)).unwrap();
        buf.get().to_vec()
    });
    drop(g);
    env.stop_server();
    env.check_pool();
    env.assert_no_leftovers();
    if let Some(msg) = lost {
        panic!("{msg}");
    }
}

/// The same kill, then the read-only verbs on the pool file before any
/// server opens it again: `check` is clean, `read` gives every acknowledged
/// write (the log's records replayed in memory), and they write nothing
/// (docs/FORMAT.md: read-only opens upgrade and change nothing).
#[test]
fn a_killed_pool_shows_acknowledged_writes_to_read_only_verbs() {
    require_root();
    let (env, returned) = write_unflushed_and_kill();
    let before = fs::read(&env.pool).unwrap();
    env.check_pool();
    let out = Command::new(env!("CARGO_BIN_EXE_thinpool"))
        .args(["read", env.p(), "raw"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        describe("thinpool read", &[env.p()], &out)
    );
    let volume = out.stdout;
    assert_eq!(volume.len() as u64, UNFLUSHED_BLOCKS * UNFLUSHED_BS as u64);
    let lost = lost_writes(&env, returned, |i| {
        let at = unflushed_offset(i) as usize;
        volume[at..at + UNFLUSHED_BS].to_vec()
    });
    assert!(
        fs::read(&env.pool).unwrap() == before,
        "a read-only verb wrote to the pool file"
    );
    // The dead server's socket is stale (the verbs above found nobody behind
    // it); a new server would replace it.
    fs::remove_file(control::socket_path(&env.pool)).unwrap();
    env.assert_no_leftovers();
    if let Some(msg) = lost {
        panic!("read-only open: {msg}");
    }
}

/// 0,1,2,5,7,8 -> "0..=2, 5, 7..=8"
fn ranges(v: &[u64]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            v[i].to_string()
        } else {
            format!("{}..={}", v[i], v[j])
        });
        i = j + 1;
    }
    out.join(", ")
}

//------------------------------------------------------------------------------
// An older pool, served

/// The newest superblock slot's format version.
fn newest_version(pool: &Path) -> u32 {
    let b = fs::read(pool).unwrap();
    let slot = |s: usize| {
        (
            u64::from_le_bytes(b[s + 16..s + 24].try_into().unwrap()),
            u32::from_le_bytes(b[s + 8..s + 12].try_into().unwrap()),
        )
    };
    slot(0).max(slot(4096)).1
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A version 1 pool (tests/fixtures, made by the last version 1 build) served
/// and written: its first commit upgrades it, and a SIGKILL after an fsync
/// loses none of the fsynced blocks, nor anything of the other volumes.
#[test]
fn a_served_version_1_pool_upgrades_and_keeps_fsynced_writes_across_sigkill() {
    require_root();
    const BS: usize = 4096;
    let mut env = Env::from_fixture("pool-v1");
    assert_eq!(newest_version(&env.pool), 1);
    let sums = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pool-v1.sha256"),
    )
    .unwrap();
    env.start_server();
    let file = env.export.join("app");
    // Blocks of the 1 MiB clone: shared with its layers (copy-on-write),
    // never written (fresh), and the clone's own.
    let blocks: Vec<u64> = vec![0, 1, 7, 64, 65, 100, 200, 255, 17, 3];
    let mut buf = Aligned::new(BS);
    let f = open_direct(&file, true);
    for (i, b) in blocks.iter().enumerate() {
        fill(0x7e57_0000 + i as u64, buf.get());
        f.write_all_at(buf.get(), b * BS as u64).unwrap();
    }
    f.sync_all().unwrap();
    assert_eq!(
        newest_version(&env.pool),
        thinpool::format::FORMAT_VERSION,
        "the fsync's commit upgrades the pool"
    );
    // Unflushed writes after it, to blocks of their own: the kill may or may
    // not keep them (see sigkill_loses_no_acknowledged_write).
    for b in 128..160u64 {
        fill(b, buf.get());
        f.write_all_at(buf.get(), b * BS as u64).unwrap();
    }
    env.kill_server();
    drop(f);
    env.clean_up_dead();
    env.check_pool();

    env.start_server();
    let g = open_direct(&file, false);
    for (i, b) in blocks.iter().enumerate() {
        g.read_exact_at(buf.get(), b * BS as u64).unwrap();
        assert!(
            buf.get().to_vec() == content(0x7e57_0000 + i as u64, BS),
            "block {b} of app lost its fsynced content"
        );
    }
    drop(g);
    env.stop_server();
    env.check_pool();
    assert_eq!(newest_version(&env.pool), thinpool::format::FORMAT_VERSION);
    for line in sums.lines() {
        let (sum, vol) = line.split_once("  ").unwrap();
        if vol != "app" {
            let out = Command::new(env!("CARGO_BIN_EXE_thinpool"))
                .args(["read", env.p(), vol])
                .output()
                .unwrap();
            assert!(out.status.success());
            assert_eq!(sha256_hex(&out.stdout), sum, "volume {vol} changed");
        }
    }
    env.assert_no_leftovers();
}
