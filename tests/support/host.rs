//! Host plumbing shared by the tests that run for real as root (export,
//! kill, restart): running tools, the mount table, loop devices, and
//! deterministic data.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// Fail (never skip) when the suite cannot run here: these tests mount FUSE
/// and attach loop devices.
pub fn require_root(suite: &str) {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the {suite} tests need root (FUSE mounts, loop devices): run them as root, \
         e.g. `sudo -E cargo test --test {suite}` (CI runs the suite as root)"
    );
    for dev in ["/dev/fuse", "/dev/loop-control"] {
        assert!(
            Path::new(dev).exists(),
            "{dev} is missing: the {suite} tests need FUSE and loop devices (modprobe fuse loop)"
        );
    }
}

/// A command line and what it printed, for assertion messages.
pub fn describe<S: AsRef<OsStr>>(what: &str, args: &[S], out: &Output) -> String {
    let args: Vec<_> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    format!(
        "{what} {}\nexit: {:?}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run a program, which must succeed; its stdout.
pub fn sh<S: AsRef<OsStr>>(prog: &str, args: &[S]) -> String {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog}: {e}"));
    assert!(out.status.success(), "{}", describe(prog, args, &out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Best effort, for cleanup: never panics.
pub fn quietly(prog: &str, args: &[&OsStr]) {
    let _ = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Mount points (from /proc/self/mountinfo); our paths have no spaces.
pub fn mount_points() -> Vec<PathBuf> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect()
}

pub fn is_mounted(dir: &Path) -> bool {
    mount_points().iter().any(|m| m == dir)
}

/// Loop devices whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in fs::read_dir("/sys/block").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Ok(b) = fs::read_to_string(e.path().join("loop/backing_file")) {
            // A dead FUSE file shows as "PATH (deleted)" on some kernels.
            let b = b.trim().trim_end_matches(" (deleted)");
            if Path::new(b).starts_with(dir) {
                out.push(format!("/dev/{name}"));
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for hundreds of MiB.
pub fn fill(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}
