//! Live export tests: FUSE files, loop devices and ext4 on top, for real.
//!
//! They need root, /dev/fuse and loop devices (CI has them) and fail with a
//! message saying so otherwise. Every test cleans up what it set up through a
//! `Drop` guard, also when it fails: filesystems under its temporary directory
//! are unmounted, loop devices over its export detached, its server stopped.

use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use thinpool::export::{control, default_export_dir};

#[path = "support/host.rs"]
mod host;
use host::{describe, fill, loops_under, sh};

const MIB: u64 = 1 << 20;

//------------------------------------------------------------------------------
// Harness

/// These tests mount FUSE and attach loop devices: without root they fail
/// with a message instead of passing without having run.
fn require_root() {
    host::require_root("export");
}

fn run_tp<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinpool"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run thinpool")
}

/// Run `thinpool ARGS`, which must succeed; its stdout.
fn tp<S: AsRef<OsStr>>(args: &[S]) -> String {
    let out = run_tp(args);
    assert!(out.status.success(), "{}", describe("thinpool", args, &out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn e2fsck_clean(dev: &str) {
    sh("e2fsck", &["-fn", dev]);
}

/// One pool in a temporary directory, and everything a test sets up on it.
struct Env {
    tmp: TempDir,
    pool: PathBuf,
    /// `thinpool serve` run in the foreground by the test, if any.
    server: Option<Child>,
}

impl Env {
    fn new(pool_size: &str) -> Env {
        Env::with_pool(pool_size, None)
    }

    /// A pool file at `pool` instead of in the test's directory.
    fn with_pool(pool_size: &str, pool: Option<PathBuf>) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tp-export-")
            .tempdir_in("/tmp")
            .unwrap();
        let pool = pool.unwrap_or_else(|| tmp.path().join("pool"));
        tp(&[
            "create".as_ref(),
            pool.as_os_str(),
            "--size".as_ref(),
            pool_size.as_ref(),
        ]);
        Env {
            tmp,
            pool,
            server: None,
        }
    }

    fn p(&self) -> &str {
        self.pool.to_str().unwrap()
    }

    fn dir(&self, name: &str) -> PathBuf {
        let d = self.tmp.path().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn volume(&self, name: &str, size: &str) {
        tp(&["volume", "create", self.p(), name, "--size", size]);
    }

    fn mount(&self, name: &str, dir: &Path, extra: &[&str]) {
        let mut args = vec!["mount", self.p(), name, dir.to_str().unwrap()];
        args.extend_from_slice(extra);
        tp(&args);
    }

    fn umount(&self, dir: &Path) {
        tp(&["umount", dir.to_str().unwrap()]);
    }

    fn attach(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["attach", self.p(), name];
        args.extend_from_slice(extra);
        tp(&args)
    }

    fn info(&self) -> serde_json::Value {
        serde_json::from_str(&tp(&["info", self.p(), "--json"])).unwrap()
    }

    fn data_used(&self) -> u64 {
        self.info()["data_used_bytes"].as_u64().unwrap()
    }

    fn server_pid(&self) -> Option<u32> {
        control::status(&self.canonical_pool())
            .and_then(|r| r.ok())
            .map(|s| s.pid)
    }

    fn canonical_pool(&self) -> PathBuf {
        fs::canonicalize(&self.pool).unwrap_or_else(|_| self.pool.clone())
    }

    fn export_dir(&self) -> PathBuf {
        default_export_dir(&self.canonical_pool())
    }

    /// Wait until no server answers for this pool.
    fn wait_no_server(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while control::status(&self.canonical_pool()).is_some() {
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

fn mounts() -> Vec<(String, PathBuf)> {
    // (source, mountpoint); good enough for paths without spaces, which ours are.
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mp = left.split(' ').nth(4)?;
            let src = right.split(' ').nth(1)?;
            Some((src.to_string(), PathBuf::from(mp)))
        })
        .collect()
}

impl Drop for Env {
    fn drop(&mut self) {
        let tmp = self.tmp.path().to_path_buf();
        let export = self.export_dir();
        let canon_tmp = fs::canonicalize(&tmp).unwrap_or(tmp.clone());
        // Filesystems under our directory, topmost first.
        for (_, mp) in mounts().into_iter().rev() {
            if mp.starts_with(&canon_tmp) && mp != canon_tmp {
                let _ = Command::new("umount").arg("-l").arg(&mp).status();
            }
        }
        let mut dirs = vec![export.clone()];
        dirs.extend(self.server.as_ref().map(|_| canon_tmp.join("export")));
        for d in &dirs {
            for dev in loops_under(d) {
                let _ = Command::new("losetup").args(["-d", &dev]).status();
            }
        }
        if let Some(mut child) = self.server.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.server_pid() {
            // SAFETY: plain kill(2) of the server of our own pool.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if !self.wait_no_server(Duration::from_secs(10)) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                self.wait_no_server(Duration::from_secs(5));
            }
        }
        for d in &dirs {
            if mounts().iter().any(|(_, mp)| mp == d) {
                let _ = Command::new("umount").arg("-l").arg(d).status();
            }
        }
        let _ = fs::remove_dir(&export);
        if !thread::panicking() {
            let _ = fs::remove_file(export.with_extension("log"));
        }
        let _ = fs::remove_file(control::socket_path(&self.pool));
    }
}

/// Write `len` pseudo-random bytes to `path`; returns their sha256.
fn write_file(path: &Path, seed: u64, len: u64, fsync: bool) -> [u8; 32] {
    try_write_file(path, seed, len, fsync).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn try_write_file(path: &Path, seed: u64, len: u64, fsync: bool) -> std::io::Result<[u8; 32]> {
    let mut f = fs::File::create(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut left = len;
    let mut i = 0;
    while left > 0 {
        let n = left.min(MIB) as usize;
        fill(seed ^ (i << 32), &mut buf[..n]);
        f.write_all(&buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
        i += 1;
    }
    if fsync {
        f.sync_all()?;
    }
    Ok(h.finalize().into())
}

fn sha256_file(path: &Path) -> [u8; 32] {
    let mut f = fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().into()
}

/// A tree of small and medium files: (relative path, sha256).
fn write_tree(root: &Path, seed: u64) -> Vec<(PathBuf, [u8; 32])> {
    let mut out = Vec::new();
    for d in 0..4u64 {
        let dir = root.join(format!("dir{d}/sub{}", d % 2));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..12u64 {
            let len = [0, 1, 4095, 4096, 65537, 300_000][(f % 6) as usize] + d * 7;
            let rel = dir.strip_prefix(root).unwrap().join(format!("f{f}"));
            let sum = write_file(&root.join(&rel), seed + d * 100 + f, len, false);
            out.push((rel, sum));
        }
    }
    out
}

fn assert_no_leftovers(env: &Env) {
    let export = env.export_dir();
    assert!(
        loops_under(&export).is_empty(),
        "loop devices left over {}",
        export.display()
    );
    assert!(
        !mounts().iter().any(|(_, mp)| mp == &export),
        "FUSE mount left on {}",
        export.display()
    );
    assert!(
        env.wait_no_server(Duration::from_secs(10)),
        "background server still running"
    );
    assert!(
        !control::socket_path(&env.pool).exists(),
        "socket left behind"
    );
}

//------------------------------------------------------------------------------
// Acceptance

/// mkfs + files + 200 MiB file; snapshot, clone, change the clone; the
/// snapshot still reads the originals; both filesystems check clean.
#[test]
fn snapshot_and_clone_of_an_ext4_volume() {
    require_root();
    let env = Env::new("4G");
    env.volume("base", "1G");
    let m1 = env.dir("m1");
    env.mount("base", &m1, &["--mkfs", "ext4"]);
    let mut files = write_tree(&m1, 1);
    let big = PathBuf::from("big.bin");
    files.push((big.clone(), write_file(&m1.join(&big), 7, 200 * MIB, false)));
    env.umount(&m1);
    assert_no_leftovers(&env);

    tp(&["snapshot", env.p(), "base", "snap"]);
    tp(&["clone", env.p(), "snap", "clone"]);

    let m2 = env.dir("m2");
    env.mount("clone", &m2, &[]);
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m2.join(&big))
            .unwrap();
        f.write_all_at(&[0xa5; 4096], 100 * MIB + 12345).unwrap();
        f.sync_all().unwrap();
    }
    for (rel, _) in files.iter().take(10) {
        fs::remove_file(m2.join(rel)).unwrap();
    }
    assert_ne!(sha256_file(&m2.join(&big)), files.last().unwrap().1);
    env.umount(&m2);

    let m3 = env.dir("m3");
    env.mount("snap", &m3, &["--read-only"]);
    for (rel, sum) in &files {
        assert_eq!(
            &sha256_file(&m3.join(rel)),
            sum,
            "{} changed in the snapshot",
            rel.display()
        );
    }
    env.umount(&m3);

    let snap = env.attach("snap", &["--read-only"]);
    let clone = env.attach("clone", &[]);
    e2fsck_clean(&snap);
    e2fsck_clean(&clone);
    tp(&["detach", &snap]);
    tp(&["detach", &clone]);
    assert_no_leftovers(&env);
}

/// Snapshots of a mounted volume under a busy writer are clean filesystems
/// (the server freezes ext4 around each one).
#[test]
fn snapshots_under_a_busy_writer_are_consistent() {
    require_root();
    let env = Env::new("4G");
    env.volume("live", "512M");
    let m = env.dir("m");
    env.mount("live", &m, &["--mkfs", "ext4"]);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, m) = (stop.clone(), m.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let d = m.join(format!("d{}", i % 16));
                fs::create_dir_all(&d).unwrap();
                write_file(
                    &d.join(format!("f{i}")),
                    i,
                    64 * 1024 + (i % 7) * 4096,
                    false,
                );
                if i % 50 == 49 {
                    // Keep the volume from filling: the writer churns.
                    let _ = fs::remove_dir_all(m.join(format!("d{}", (i + 1) % 16)));
                }
                i += 1;
            }
            i
        })
    };
    for n in 0..5 {
        thread::sleep(Duration::from_millis(300));
        tp(&["snapshot", env.p(), "live", &format!("s{n}")]);
    }
    stop.store(true, Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > 10, "the writer barely ran ({written} files)");
    env.umount(&m);

    for n in 0..5 {
        let dev = env.attach(&format!("s{n}"), &[]);
        e2fsck_clean(&dev);
        tp(&["detach", &dev]);
    }
    assert_no_leftovers(&env);
}

/// A 64 MiB pool with a 256 MiB volume "big" and a volume "other" holding
/// 24 MiB (removing it is how the full-pool tests free space).
fn nearly_full_pool() -> Env {
    let env = Env::new("64M");
    env.volume("big", "256M");
    env.volume("other", "32M");
    let other = env.attach("other", &[]);
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={other}"),
            "bs=1M",
            "count=24",
            "oflag=direct",
            "status=none",
        ],
    );
    tp(&["detach", &other]);
    env
}

/// A full pool fails the write with an error the kernel passes up (ENOSPC
/// through FUSE and the loop device), stays consistent, and takes writes
/// again once space is freed.
#[test]
fn full_pool_fails_writes_cleanly_and_recovers() {
    require_root();
    let env = nearly_full_pool();

    let dev = env.attach("big", &[]);
    let out = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={dev}"),
            "bs=1M",
            "count=200",
            "oflag=direct",
            "status=none",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a 200 MiB write into a 64 MiB pool succeeded"
    );
    assert!(
        err.contains("No space left") || err.contains("Input/output error"),
        "dd failed with: {err}"
    );
    tp(&["check", env.p()]);

    // Free space by removing the other volume: writes past the old end of
    // what was written need new blocks, and now get them.
    tp(&["remove", env.p(), "other"]);
    let probe = env.dir("probe");
    let data = probe.join("data");
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", data.display()),
            "bs=1M",
            "count=8",
            "status=none",
        ],
    );
    sh(
        "dd",
        &[
            &format!("if={}", data.display()),
            &format!("of={dev}"),
            "bs=1M",
            "seek=240",
            "oflag=direct",
            "conv=fsync",
            "status=none",
        ],
    );
    let back = Command::new("dd")
        .args([
            &format!("if={dev}"),
            "bs=1M",
            "skip=240",
            "count=8",
            "iflag=direct",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(
        back.stdout == fs::read(&data).unwrap(),
        "data written after freeing space reads back wrong"
    );
    // A served pool reports its flushes and commits (`info --json`).
    let commits = &env.info()["commits"];
    assert!(commits["flushes"].as_u64().unwrap() >= 1, "{commits}");
    assert!(commits["fdatasyncs"].as_u64().unwrap() >= 1, "{commits}");
    tp(&["detach", &dev]);
    assert!(env.wait_no_server(Duration::from_secs(10)));
    tp(&["check", env.p()]);
    assert_no_leftovers(&env);
}

/// Filling a pool through a mounted ext4: the writer gets an error (fsync
/// fails with ENOSPC, or EROFS when the ENOSPC hit one of ext4's journal
/// writes and ext4 turned itself read-only, as it does on any device
/// error), the pool stays consistent, and once another volume is removed
/// and the filesystem remounted, new writes succeed and it checks clean.
#[test]
fn full_pool_through_mounted_ext4() {
    require_root();
    let env = nearly_full_pool();

    let m = env.dir("m");
    env.mount("big", &m, &["--mkfs", "ext4"]);
    let fill = m.join("fill");
    let out = Command::new("dd")
        .args([
            "if=/dev/urandom",
            &format!("of={}", fill.display()),
            "bs=1M",
            "count=200",
            "conv=fsync",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "200 MiB fitted into a 64 MiB pool");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("No space left")
            || err.contains("Input/output error")
            || err.contains("Read-only file system"),
        "dd failed with: {err}"
    );
    tp(&["check", env.p()]);

    tp(&["remove", env.p(), "other"]);
    env.umount(&m);
    env.mount("big", &m, &[]);
    fs::remove_file(&fill).unwrap();
    let sum = write_file(&m.join("after"), 3, 16 * MIB, true);
    env.umount(&m);
    tp(&["check", env.p()]);
    let dev = env.attach("big", &[]);
    e2fsck_clean(&dev);
    tp(&["detach", &dev]);
    env.mount("big", &m, &["--read-only"]);
    assert_eq!(sha256_file(&m.join("after")), sum);
    env.umount(&m);
    assert_no_leftovers(&env);
}

/// A small ext4 of its own, loop-mounted, for a pool file to fill up.
/// Unmounted (and its loop device, set up with autoclear, detached) on drop.
struct HostFs {
    _tmp: TempDir,
    dir: PathBuf,
}

impl HostFs {
    fn new(size_mib: u64) -> HostFs {
        let tmp = tempfile::Builder::new()
            .prefix("tp-hostfs-")
            .tempdir_in("/tmp")
            .unwrap();
        let img = tmp.path().join("host.img");
        fs::File::create(&img)
            .unwrap()
            .set_len(size_mib * MIB)
            .unwrap();
        sh("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let dir = tmp.path().join("mnt");
        fs::create_dir(&dir).unwrap();
        sh(
            "mount",
            &["-o", "loop", img.to_str().unwrap(), dir.to_str().unwrap()],
        );
        HostFs { _tmp: tmp, dir }
    }
}

impl Drop for HostFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// The file system under the pool file fills up: the writer gets ENOSPC
/// (the pool reserves host space when it allocates a block, so the data and
/// commit writes after that cannot fail), the pool keeps serving and stays
/// consistent, and once host space is freed writes work again.
#[test]
fn full_host_file_system_fails_the_writer_not_the_pool() {
    require_root();
    let host = HostFs::new(320);
    let env = Env::with_pool("4G", Some(host.dir.join("pool")));
    env.volume("raw", "1G");
    env.volume("v", "1G");
    let ballast = host.dir.join("ballast");
    write_file(&ballast, 2, 64 * MIB, true);

    // A writer on the served, attached device.
    let dev = env.attach("raw", &[]);
    let first = env.dir("probe").join("first");
    write_file(&first, 5, 8 * MIB, false);
    let dd = |from: &Path, seek_mib: u64, count: u64| {
        Command::new("dd")
            .args([
                &format!("if={}", from.display()),
                &format!("of={dev}"),
                "bs=1M",
                &format!("seek={seek_mib}"),
                &format!("count={count}"),
                "oflag=direct",
                "conv=fsync",
                "status=none",
            ])
            .output()
            .unwrap()
    };
    assert!(dd(&first, 0, 8).status.success());
    let out = dd(Path::new("/dev/urandom"), 8, 600);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "600 MiB fitted on a 320 MiB host file system"
    );
    assert!(
        err.contains("No space left") || err.contains("Input/output error"),
        "dd failed with: {err}"
    );
    // Still served and consistent: the server answers, checks clean, and
    // what was written before reads back.
    tp(&["list", env.p()]);
    tp(&["check", env.p()]);
    let read_back = |seek_mib: u64| {
        Command::new("dd")
            .args([
                &format!("if={dev}"),
                "bs=1M",
                &format!("skip={seek_mib}"),
                "count=8",
                "iflag=direct",
                "status=none",
            ])
            .output()
            .unwrap()
            .stdout
    };
    assert!(read_back(0) == fs::read(&first).unwrap());

    // Host space freed: the same device takes writes again, no restart.
    fs::remove_file(&ballast).unwrap();
    assert!(
        dd(&first, 900, 8).status.success(),
        "write after freeing host space failed"
    );
    assert!(read_back(900) == fs::read(&first).unwrap());
    tp(&["detach", &dev]);
    // Removing the volume punches its blocks out: the host gets them back.
    tp(&["remove", env.p(), "raw"]);

    // Through a mounted ext4: the writer fails (ext4 may also turn itself
    // read-only when a journal write fails: its choice on any device error);
    // after a remount, with host space freed, it works again and checks clean.
    write_file(&ballast, 6, 48 * MIB, true);
    let m = env.dir("m");
    env.mount("v", &m, &["--mkfs", "ext4"]);
    let before = write_file(&m.join("before"), 1, 8 * MIB, true);
    let r = try_write_file(&m.join("fill"), 3, 600 * MIB, true);
    let err = r.expect_err("600 MiB fitted on a 320 MiB host file system");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOSPC) | Some(libc::EIO) | Some(libc::EROFS)
        ),
        "the writer failed with {err}"
    );
    tp(&["check", env.p()]);
    env.umount(&m);
    fs::remove_file(&ballast).unwrap();
    env.mount("v", &m, &[]);
    let _ = fs::remove_file(m.join("fill"));
    let after = write_file(&m.join("after"), 4, 16 * MIB, true);
    assert_eq!(sha256_file(&m.join("before")), before);
    env.umount(&m);
    tp(&["check", env.p()]);
    let dev = env.attach("v", &[]);
    e2fsck_clean(&dev);
    tp(&["detach", &dev]);
    env.mount("v", &m, &["--read-only"]);
    assert_eq!(sha256_file(&m.join("before")), before);
    assert_eq!(sha256_file(&m.join("after")), after);
    env.umount(&m);
    assert_no_leftovers(&env);
    drop(env);
    drop(host);
}

/// A snapshot of a mounted xfs (taken frozen) mounts read-only beside its
/// origin, whose UUID it shares, and holds what was written before it.
#[test]
fn live_xfs_snapshot_mounts_read_only_beside_its_origin() {
    require_root();
    // tools/install-deps.sh installs xfsprogs.
    assert!(
        Command::new("mkfs.xfs").arg("-V").output().is_ok(),
        "mkfs.xfs is missing: run tools/install-deps.sh"
    );
    let env = Env::new("2G");
    env.volume("x", "1G");
    let m = env.dir("m");
    env.mount("x", &m, &["--mkfs", "xfs"]);
    let sum = write_file(&m.join("before"), 11, 8 * MIB, true);
    tp(&["snapshot", env.p(), "x", "xs"]);
    write_file(&m.join("after"), 12, MIB, true);
    let m2 = env.dir("m2");
    env.mount("xs", &m2, &["--read-only"]);
    assert_eq!(sha256_file(&m2.join("before")), sum);
    assert!(!m2.join("after").exists());
    env.umount(&m2);
    env.umount(&m);
    assert_no_leftovers(&env);
}

/// Deleting files and running fstrim gives the space back to the pool.
/// A container writing zeros (dd from /dev/zero, a database zero-filling
/// its log segments) maps nothing: whole blocks of zeros reach the pool as
/// writes and stay unmapped, and zeros written over data unmap it.
#[test]
fn zeros_written_through_ext4_take_no_pool_space() {
    require_root();
    let env = Env::new("2G");
    env.volume("fs", "1G");
    let m = env.dir("m");
    env.mount("fs", &m, &["--mkfs", "ext4"]);
    let dd = |name: &str, from: &str, extra: &[&str]| {
        let of = format!("of={}", m.join(name).display());
        let mut args = vec![format!("if={from}"), of, "bs=1M".into(), "count=64".into()];
        args.extend(["oflag=direct".to_string(), "conv=fsync".to_string()]);
        args.extend(extra.iter().map(|s| s.to_string()));
        sh("dd", &args);
    };
    let base = env.data_used();
    dd("zeros", "/dev/zero", &[]);
    let after_zeros = env.data_used();
    dd("data", "/dev/urandom", &[]);
    let after_data = env.data_used();
    // The same file overwritten in place with zeros gives its blocks back.
    dd("data", "/dev/zero", &["conv=notrunc"]);
    let after_rezero = env.data_used();
    eprintln!(
        "pool data: {base} after mkfs, {after_zeros} after 64 MiB of zeros, \
         {after_data} after 64 MiB of data, {after_rezero} after zeroing that data"
    );
    // What it does take is ext4's own: journal commits, the extent tree.
    assert!(
        after_zeros - base < 12 * MIB,
        "64 MiB of zeros took {} bytes",
        after_zeros - base
    );
    assert!(after_data - after_zeros >= 64 * MIB);
    assert!(
        after_data - after_rezero >= 60 * MIB,
        "zeroing 64 MiB of data gave back only {} bytes",
        after_data - after_rezero
    );
    sh(
        "cmp",
        &[
            "-n",
            "67108864",
            m.join("data").to_str().unwrap(),
            "/dev/zero",
        ],
    );
    env.umount(&m);
    let dev = env.attach("fs", &[]);
    e2fsck_clean(&dev);
    tp(&["detach", &dev]);
    let r = run_tp(&["check", env.p()]);
    assert!(r.status.success(), "{}", describe("check", &["check"], &r));
    assert_no_leftovers(&env);
}

#[test]
fn fstrim_returns_space_to_the_pool() {
    require_root();
    let env = Env::new("2G");
    env.volume("v", "1G");
    let m = env.dir("m");
    env.mount("v", &m, &["--mkfs", "ext4"]);
    for i in 0..15 {
        write_file(&m.join(format!("f{i}")), i, 10 * MIB, false);
    }
    sh("sync", &["-f", m.to_str().unwrap()]);
    let before = env.data_used();
    for i in 0..15 {
        fs::remove_file(m.join(format!("f{i}"))).unwrap();
    }
    // ext4 trims only blocks whose freeing is committed to its journal.
    sh("sync", &["-f", m.to_str().unwrap()]);
    sh("fstrim", &[m.to_str().unwrap()]);
    let after = env.data_used();
    assert!(
        before.saturating_sub(after) >= 100 * MIB,
        "data_used_bytes went from {before} to {after}: less than 100 MiB freed"
    );
    env.umount(&m);
    assert_no_leftovers(&env);
}

/// SIGKILL the server mid-workload: after cleanup and a restart, every file
/// fsynced before the kill is intact and the filesystem checks clean.
#[test]
fn server_killed_mid_workload_loses_nothing_fsynced() {
    require_root();
    let env = Env::new("2G");
    env.volume("v", "512M");
    let m = env.dir("m");
    env.mount("v", &m, &["--mkfs", "ext4"]);
    let mut synced = Vec::new();
    for i in 0..20u64 {
        let rel = format!("synced{i}");
        synced.push((
            rel.clone(),
            write_file(&m.join(&rel), 1000 + i, 256 * 1024 + i * 512, true),
        ));
    }
    let dirf = fs::File::open(&m).unwrap();
    dirf.sync_all().unwrap();
    drop(dirf);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, m) = (stop.clone(), m.clone());
        thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                // Errors are expected once the server is gone.
                if try_write_file(
                    &m.join(format!("busy{}", i % 64)),
                    i,
                    MIB,
                    i.is_multiple_of(3),
                )
                .is_err()
                {
                    break;
                }
                i += 1;
            }
        })
    };
    thread::sleep(Duration::from_millis(700));
    let pid = env
        .server_pid()
        .expect("a background server serves the pool");
    // SAFETY: killing the server of our own pool.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(env.wait_no_server(Duration::from_secs(5)));

    // Unmount what is left (ext4 on a dead device, the dead FUSE mount).
    env.umount(&m);
    assert_no_leftovers(&env);

    env.mount("v", &m, &[]);
    for (rel, sum) in &synced {
        assert_eq!(
            &sha256_file(&m.join(rel)),
            sum,
            "{rel} lost its fsynced content"
        );
    }
    env.umount(&m);
    let dev = env.attach("v", &[]);
    e2fsck_clean(&dev);
    tp(&["detach", &dev]);
    assert_no_leftovers(&env);
}

//------------------------------------------------------------------------------
// The served directory and the control socket

/// `thinpool serve` in the foreground: files appear and vanish with the
/// catalog, data goes through, discards read as zeros, snapshots are
/// read-only, attached volumes cannot be removed, SIGTERM stops it cleanly.
#[test]
fn serve_exports_volumes_as_files() {
    require_root();
    let mut env = Env::new("1G");
    env.volume("a", "16M");
    let dir = env.dir("export");
    let child = Command::new(env!("CARGO_BIN_EXE_thinpool"))
        .args(["serve", env.p(), dir.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    env.server = Some(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.server_pid().is_none() {
        assert!(Instant::now() < deadline, "server did not come up");
        thread::sleep(Duration::from_millis(20));
    }

    // A volume created through the socket shows up at once.
    tp(&["volume", "create", env.p(), "b", "--size", "8M"]);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(fs::metadata(dir.join("b")).unwrap().len(), 8 * MIB);

    // Data through the file.
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.join("a"))
        .unwrap();
    let mut data = vec![0u8; 300_000];
    fill(5, &mut data);
    f.write_all_at(&data, 70_000).unwrap();
    f.sync_all().unwrap();
    let mut back = vec![0u8; data.len()];
    f.read_exact_at(&mut back, 70_000).unwrap();
    assert!(back == data);
    // Reads stop at the end of the volume.
    f.seek(SeekFrom::Start(16 * MIB - 10)).unwrap();
    let mut tail = Vec::new();
    f.read_to_end(&mut tail).unwrap();
    assert_eq!(tail.len(), 10);
    // At and past the end a read returns 0 bytes (end of file), not EINVAL.
    let mut past = vec![0u8; 4096];
    assert_eq!(f.read_at(&mut past, 16 * MIB).unwrap(), 0);
    assert_eq!(f.read_at(&mut past, 16 * MIB + 5 * 4096).unwrap(), 0);
    // A volume does not grow through fallocate: EFBIG.
    // SAFETY: fallocate on an open fd.
    let r = unsafe {
        libc::fallocate(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            0,
            0,
            (32 * MIB) as i64,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EFBIG)
    );

    // Punch a hole over whole blocks and partial ones: reads as zeros.
    // SAFETY: fallocate on an open fd with in-range arguments.
    let r = unsafe {
        libc::fallocate(
            std::os::unix::io::AsRawFd::as_raw_fd(&f),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            100_000,
            200_000,
        )
    };
    assert_eq!(r, 0, "punch hole: {}", std::io::Error::last_os_error());
    f.read_exact_at(&mut back, 70_000).unwrap();
    assert!(back[..30_000] == data[..30_000]);
    assert!(back[30_000..230_000].iter().all(|b| *b == 0));
    assert!(back[230_000..] == data[230_000..]);
    drop(f);

    // Snapshots are read-only files.
    tp(&["snapshot", env.p(), "a", "a-snap"]);
    let meta = fs::metadata(dir.join("a-snap")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o444);
    let err = fs::OpenOptions::new()
        .write(true)
        .open(dir.join("a-snap"))
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    let mut snap = vec![0u8; 1000];
    fs::File::open(dir.join("a-snap"))
        .unwrap()
        .read_exact_at(&mut snap, 70_000)
        .unwrap();
    assert!(snap == data[..1000]);

    // An attached volume cannot be removed or renamed.
    let dev = env.attach("b", &[]);
    for args in [
        vec!["remove", env.p(), "b"],
        vec!["rename", env.p(), "b", "c"],
    ] {
        let out = run_tp(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("volume 'b' is in use"), "{err}");
    }
    tp(&["detach", &dev]);
    // Detaching does not stop a server started by `serve`.
    assert!(env.server_pid().is_some());
    tp(&["remove", env.p(), "b"]);
    assert!(!dir.join("b").exists());

    // SIGTERM: commit, unmount, remove the socket, exit 0.
    let mut child = env.server.take().unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "serve exited with {status}");
    assert!(!control::socket_path(&env.pool).exists());
    let canon = fs::canonicalize(&dir).unwrap();
    assert!(!mounts().iter().any(|(_, mp)| mp == &canon));
    // The pool is closed and holds what was written.
    let out = run_tp(&[
        "read",
        env.p(),
        "a",
        "--offset",
        "70000",
        "--length",
        "1000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        describe("thinpool read", &["a"], &out)
    );
    assert!(out.stdout == data[..1000]);
}

/// Errors of the export verbs are clear and leave nothing behind.
#[test]
fn export_errors_clean_up() {
    require_root();
    let env = Env::new("1G");
    env.volume("v", "64M");
    let m = env.dir("m");
    let out = run_tp(&["mount", env.p(), "nope", m.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named 'nope'"));
    // No filesystem on the volume: mount fails, the loop device and server go.
    let out = run_tp(&["mount", env.p(), "v", m.to_str().unwrap()]);
    assert!(!out.status.success());
    assert_no_leftovers(&env);
    let out = run_tp(&["umount", m.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not mounted from a thinpool volume"));
    let out = run_tp(&["detach", "/dev/null"]);
    assert!(!out.status.success());
}

/// `attach --direct`: the server it starts opens the pool file O_DIRECT
/// (`info` says so, and that the intent log is being written). O_DIRECT
/// writes through the loop device, whole blocks and a few sectors inside a
/// block (read-modify-write on the direct storage), read back the same
/// through the device, and after detach (the server exits) through
/// `thinpool read`, and the pool checks clean.
#[test]
fn attach_direct_serves_the_pool_o_direct() {
    require_root();
    let env = Env::new("1G");
    env.volume("v", "64M");
    let dev = env.attach("v", &["--direct"]);
    let info = env.info();
    assert_eq!(info["direct_io"], true, "{info}");
    assert_eq!(info["log"]["logging"], true, "{info}");
    let text = tp(&["info", env.p()]);
    assert!(text.contains("direct I/O: yes"), "{text}");
    assert!(text.contains(", logging"), "{text}");

    let dir = env.dir("data");
    let mut whole = vec![0u8; 3 * MIB as usize];
    fill(21, &mut whole);
    let mut sectors = vec![0u8; 7 * 512];
    fill(22, &mut sectors);
    fs::write(dir.join("whole"), &whole).unwrap();
    fs::write(dir.join("sectors"), &sectors).unwrap();
    // 3 MiB at 1 MiB; 7 sectors at sector 10001 (inside a 64K block, past
    // the 3 MiB).
    for (name, bs, seek) in [("whole", "1M", "1"), ("sectors", "512", "10001")] {
        sh(
            "dd",
            &[
                &format!("if={}", dir.join(name).display()),
                &format!("of={dev}"),
                &format!("bs={bs}"),
                &format!("seek={seek}"),
                "oflag=direct",
                "conv=fsync,notrunc",
                "status=none",
            ],
        );
    }
    let direct_read = |skip: &str, count: &str, bs: &str| {
        let out = Command::new("dd")
            .args([
                &format!("if={dev}"),
                &format!("bs={bs}"),
                &format!("skip={skip}"),
                &format!("count={count}"),
                "iflag=direct",
                "status=none",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    assert!(
        direct_read("1", "3", "1M") == whole,
        "3 MiB read back wrong"
    );
    assert!(
        direct_read("10001", "7", "512") == sectors,
        "sectors read back wrong"
    );
    let commits = &env.info()["commits"];
    assert!(commits["flushes"].as_u64().unwrap() >= 2, "{commits}");

    tp(&["detach", &dev]);
    assert_no_leftovers(&env);
    let read = |offset: u64, len: usize| {
        let out = run_tp(&[
            "read",
            env.p(),
            "v",
            "--offset",
            &offset.to_string(),
            "--length",
            &len.to_string(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            describe("read", &[env.p()], &out)
        );
        out.stdout
    };
    assert!(read(MIB, whole.len()) == whole, "3 MiB differ after detach");
    assert!(
        read(10001 * 512, sectors.len()) == sectors,
        "sectors differ after detach"
    );
    // Nothing else was written: the rest of the volume reads as zeros.
    assert!(read(0, MIB as usize).iter().all(|&b| b == 0));
    let check = tp(&["check", env.p()]);
    assert!(check.contains(": clean ("), "{check}");
}

/// `mount --direct`: the server opens the pool file O_DIRECT and ext4 works
/// end to end on it — a thin volume and a preallocated one (whose writes
/// take no pool space: its blocks were all taken at creation). Files are
/// fsynced, everything unmounted, both file systems check clean, and the
/// files read back through a buffered server.
#[test]
fn direct_io_server_carries_ext4_end_to_end() {
    require_root();
    let env = Env::new("2G");
    env.volume("v", "512M");
    tp(&[
        "volume",
        "create",
        env.p(),
        "db",
        "--size",
        "256M",
        "--preallocate",
    ]);
    let m = env.dir("m");
    // Drop the pool file's (clean) cached pages, so what is cached after the
    // writes is what the server put there.
    sh("sync", &[env.p()]);
    {
        let f = fs::File::open(&env.pool).unwrap();
        // SAFETY: fadvise on an fd we own.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    env.mount("v", &m, &["--mkfs", "ext4", "--direct"]);
    assert_eq!(
        env.info()["direct_io"],
        true,
        "the server opened the pool O_DIRECT"
    );
    let mut files = write_tree(&m, 3);
    let big = PathBuf::from("big.bin");
    files.push((big.clone(), write_file(&m.join(&big), 9, 40 * MIB, true)));
    // 40 MiB went through the pool file; none of it stays in the host cache.
    let cached: u64 = sh(
        "fincore",
        &["--bytes", "--noheadings", "--output", "RES", env.p()],
    )
    .parse()
    .unwrap();
    assert!(
        cached < 4 * MIB,
        "{cached} bytes of the pool file are cached"
    );
    // Unaligned writes through the volume reach the direct storage as RMW.
    {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(m.join(&big))
            .unwrap();
        f.write_all_at(&[0x5a; 1000], 12345).unwrap();
        f.sync_all().unwrap();
    }
    files.pop();
    files.push((big.clone(), sha256_file(&m.join(&big))));
    // A preallocation the server makes (the CLI sends it over the socket).
    tp(&[
        "volume",
        "create",
        env.p(),
        "db2",
        "--size",
        "64M",
        "--preallocate",
    ]);
    let list: serde_json::Value = serde_json::from_str(&tp(&["list", env.p(), "--json"])).unwrap();
    let db2 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "db2")
        .unwrap();
    assert_eq!(db2["preallocated"], true, "{db2}");
    assert_eq!(db2["mapped_bytes"], 64 * MIB, "{db2}");
    // Unmounted first: ext4's late writeback on `v` would allocate pool
    // blocks while the preallocated volume's usage is measured.
    env.umount(&m);
    assert_no_leftovers(&env);
    // The preallocated volume, on a direct server again.
    let m2 = env.dir("m2");
    env.mount("db", &m2, &["--mkfs", "ext4", "--direct"]);
    assert_eq!(env.info()["direct_io"], true);
    sh("sync", &["-f", m2.to_str().unwrap()]);
    let used = env.data_used();
    let db_sum = write_file(&m2.join("table"), 11, 30 * MIB, true);
    sh("sync", &["-f", m2.to_str().unwrap()]);
    assert_eq!(
        env.data_used(),
        used,
        "writes to a preallocated volume took pool space"
    );
    env.umount(&m2);
    assert_no_leftovers(&env);

    // A buffered server now: same pool, same bytes.
    let dev = env.attach("v", &[]);
    let dev2 = env.attach("db", &[]);
    e2fsck_clean(&dev);
    e2fsck_clean(&dev2);
    tp(&["detach", &dev]);
    tp(&["detach", &dev2]);
    env.mount("v", &m, &["--read-only"]);
    assert_eq!(env.info()["direct_io"], false);
    for (rel, sum) in &files {
        assert_eq!(&sha256_file(&m.join(rel)), sum, "{}", rel.display());
    }
    // Buffered, the same 40 MiB read back do stay in the host cache.
    let cached: u64 = sh(
        "fincore",
        &["--bytes", "--noheadings", "--output", "RES", env.p()],
    )
    .parse()
    .unwrap();
    assert!(
        cached >= 30 * MIB,
        "only {cached} bytes of the pool file are cached"
    );
    env.umount(&m);
    env.mount("db", &m2, &["--read-only"]);
    assert_eq!(sha256_file(&m2.join("table")), db_sum);
    env.umount(&m2);
    let check = tp(&["check", env.p()]);
    assert!(check.contains(": clean ("), "{check}");
    assert_no_leftovers(&env);
}
