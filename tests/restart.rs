//! Restarting the server under live volumes, for real: fio with
//! `verify=crc32c` (direct I/O) on a mounted ext4 of a thinpool volume, and a
//! second "container" (another volume, another ext4) doing fsync'd writes,
//! while the server is taken over (planned) or killed and restarted by its
//! holder. fio must end without an I/O or verify error, both file systems
//! check clean, the pool checks clean, and nothing is left mounted.
//!
//! Needs root, /dev/fuse, loop devices and fio (CI has them); fails with a
//! message saying so otherwise. Prints the pause fio saw (its longest
//! latency) for docs/EXPORT.md.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use thinpool::export::control;

#[path = "support/host.rs"]
mod host;
use host::{describe, fill, loops_under, sh};

/// fio's run: long enough to see a steady state on both sides of the event.
const FIO_SECONDS: u64 = 10;
/// When the takeover or the kill happens, after fio starts.
const EVENT_AFTER: Duration = Duration::from_secs(4);

fn require_root() {
    host::require_root("restart");
    assert!(
        Command::new("fio").arg("--version").output().is_ok(),
        "fio is missing: tools/install-deps.sh installs it"
    );
}

fn tp<S: AsRef<OsStr>>(args: &[S]) -> String {
    sh(env!("CARGO_BIN_EXE_thinpool"), args)
}

/// `losetup -d`, tolerating a device already gone (one with autoclear set,
/// as `losetup -D` run elsewhere on the host leaves it, goes at its umount).
fn detach(dev: &str) {
    let out = Command::new("losetup").args(["-d", dev]).output().unwrap();
    let name = dev.trim_start_matches("/dev/");
    let gone = !Path::new(&format!("/sys/block/{name}/loop/backing_file")).exists();
    assert!(
        out.status.success() || gone,
        "{}",
        describe("losetup", &["-d", dev], &out)
    );
}

fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, r)| !r.starts_with('Z'))
    })
}

/// A pool served from this test: its processes, mounts and loop devices,
/// all taken away on drop (also when the test fails).
struct Env {
    tmp: TempDir,
    pool: PathBuf,
    export: PathBuf,
    /// Server processes we started (the first server, the one that took
    /// over, or the holder), stopped by PID.
    children: Vec<Child>,
    /// (loop device, mount point)
    mounted: Vec<(String, PathBuf)>,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("tp-restart-")
            .tempdir_in("/tmp")
            .unwrap();
        let tmp_path = fs::canonicalize(tmp.path()).unwrap();
        let pool = tmp_path.join("pool");
        let export = tmp_path.join("export");
        fs::create_dir(&export).unwrap();
        tp(&[
            "create".as_ref(),
            pool.as_os_str(),
            "--size".as_ref(),
            "3G".as_ref(),
        ]);
        for v in ["fio", "sync"] {
            tp(&[
                "volume".as_ref(),
                "create".as_ref(),
                pool.as_os_str(),
                v.as_ref(),
                "--size".as_ref(),
                "1G".as_ref(),
            ]);
        }
        Env {
            tmp,
            pool,
            export,
            children: Vec::new(),
            mounted: Vec::new(),
        }
    }

    /// `thinpool serve POOL EXPORT EXTRA...` in the background; wait until it answers.
    /// (During a takeover: until the new server answers.)
    fn serve(&mut self, extra: &[&str]) {
        self.serve_env(extra, &[]);
    }

    fn serve_env(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        let before = self.server_pid();
        let log = fs::File::create(
            self.tmp
                .path()
                .join(format!("serve{}.log", self.children.len())),
        )
        .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_thinpool"))
            .arg("serve")
            .arg(&self.pool)
            .arg(&self.export)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.server_pid().is_none() || self.server_pid() == before {
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn status(&self) -> Option<control::ServerStatus> {
        control::status(&self.pool).and_then(|r| r.ok())
    }

    fn server_pid(&self) -> Option<u32> {
        self.status().map(|s| s.pid)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for i in 0..self.children.len() {
            let p = self.tmp.path().join(format!("serve{i}.log"));
            out += &format!(
                "\n--- {}:\n{}",
                p.display(),
                fs::read_to_string(&p).unwrap_or_default()
            );
        }
        out
    }

    /// Attach `volume`'s file, make ext4 on it and mount it; the mount point.
    fn mount(&mut self, volume: &str) -> PathBuf {
        let file = self.export.join(volume);
        let dev = sh(
            "losetup",
            &[
                "--find".as_ref(),
                "--show".as_ref(),
                "--direct-io=on".as_ref(),
                file.as_os_str(),
            ],
        );
        let mp = self.tmp.path().join(format!("m-{volume}"));
        fs::create_dir_all(&mp).unwrap();
        self.mounted.push((dev.clone(), mp.clone()));
        sh(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &dev,
            ],
        );
        sh("mount", &[dev.as_ref(), mp.as_os_str()]);
        mp
    }

    /// Unmount, check each ext4 with `e2fsck -fn`, detach.
    fn unmount_and_check(&mut self) {
        // Each leaves the list only once done: a failure leaves the rest to Drop.
        while let Some((dev, mp)) = self.mounted.first().cloned() {
            sh("umount", &[mp.as_os_str()]);
            let fsck = Command::new("e2fsck").args(["-fn", &dev]).output().unwrap();
            detach(&dev);
            self.mounted.remove(0);
            assert!(
                fsck.status.success(),
                "{}",
                describe("e2fsck", &["-fn", &dev], &fsck)
            );
        }
    }

    /// SIGTERM every server process we started, wait for them to go.
    fn stop_servers(&mut self) {
        for c in &mut self.children {
            if c.try_wait().ok().flatten().is_none() {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        for c in &mut self.children {
            while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for (dev, mp) in self.mounted.drain(..).rev() {
            let _ = Command::new("umount").arg("-l").arg(&mp).status();
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        for dev in loops_under(&self.export) {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        // A server we did not start ourselves (a holder's) goes by its PID too.
        if let Some(st) = self.status() {
            // SAFETY: plain kill(2) of the server of our own pool.
            unsafe { libc::kill(st.pid as i32, libc::SIGTERM) };
        }
        self.stop_servers();
        if host::mount_points().contains(&self.export) {
            let _ = Command::new("umount").arg("-l").arg(&self.export).status();
        }
        if thread::panicking() {
            eprintln!("server logs:{}", self.logs());
        }
        // Lazy unmounts finish in the background: retry what TempDir would
        // give up on at its first error.
        for _ in 0..20 {
            match fs::remove_dir_all(self.tmp.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    thread::sleep(Duration::from_millis(100))
                }
                _ => break,
            }
        }
    }
}

/// fio, two jobs verified with crc32c as they go: 4 KiB random direct
/// overwrites of a laid-out file, and 64 KiB sequential direct writes into a
/// file that is not laid out (every pool block it touches is new: its map
/// change is what a crash can lose before the next commit).
fn start_fio(dir: &Path, out: &Path) -> Child {
    Command::new("fio")
        .args([
            "--direct=1",
            "--ioengine=libaio",
            "--iodepth=8",
            "--time_based",
            &format!("--runtime={FIO_SECONDS}"),
            "--verify=crc32c",
            "--verify_backlog=256",
            "--verify_fatal=1",
            "--output-format=json",
            // Jobs as threads: once fio has exited, none is still writing its logs.
            "--thread",
            // No verify-state files in the working directory (the checkout).
            "--verify_state_save=0",
            // Every I/O's latency, stamped with the wall clock at completion.
            "--log_avg_msec=0",
            "--log_unix_epoch=1",
        ])
        .arg(format!(
            "--write_lat_log={}",
            out.with_extension("lat").display()
        ))
        .arg(format!("--directory={}", dir.display()))
        .arg(format!("--output={}", out.display()))
        .args(["--name=rand", "--rw=randwrite", "--bs=4k", "--size=96M"])
        .args([
            "--name=fresh",
            "--rw=write",
            "--bs=64k",
            "--size=600M",
            "--fallocate=none",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio")
}

/// What fio reported over its jobs: errors and the longest latency (the pause).
struct FioResult {
    error: i64,
    max_lat_ms: f64,
    /// Longest latency of the I/Os that completed during the event (and
    /// the second after it), and of all the others.
    event_max_ms: f64,
    other_max_ms: f64,
    p9999_ms: f64,
    ios: u64,
}

/// fio's result, or its failure (its messages and report).
fn finish_fio(child: Child, out: &Path) -> Result<FioResult, String> {
    let o = child.wait_with_output().unwrap();
    let text = fs::read_to_string(out).unwrap_or_default();
    if !o.status.success() {
        return Err(format!(
            "fio failed ({:?}): {}\n{text}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    // fio may print notes before the JSON.
    let json = &text[text.find('{').expect("fio printed no JSON")..];
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let ms = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0) / 1e6;
    let mut r = FioResult {
        error: 0,
        max_lat_ms: 0.0,
        event_max_ms: 0.0,
        other_max_ms: 0.0,
        p9999_ms: 0.0,
        ios: 0,
    };
    for job in v["jobs"].as_array().expect("fio jobs") {
        r.error = r.error.max(job["error"].as_i64().unwrap_or(-1).abs());
        for dir in ["write", "read"] {
            r.max_lat_ms = r.max_lat_ms.max(ms(&job[dir]["lat_ns"]["max"]));
            r.p9999_ms = r
                .p9999_ms
                .max(ms(&job[dir]["clat_ns"]["percentile"]["99.990000"]));
            r.ios += job[dir]["total_ios"].as_u64().unwrap_or(0);
        }
    }
    Ok(r)
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1e3
}

/// From fio's per-I/O latency logs: the longest latency of the I/Os in
/// flight when the event began at `from` (issued before, completed after:
/// they waited through it), of those that completed from `from` to `to`
/// (unix ms), and of all the others.
fn latency_split(out: &Path, from: f64, to: f64) -> (f64, f64, f64) {
    let prefix = out.with_extension("lat");
    let name = prefix.file_name().unwrap().to_string_lossy().into_owned();
    let (mut spanning, mut inside, mut outside) = (0f64, 0f64, 0f64);
    for e in fs::read_dir(out.parent().unwrap()).unwrap().flatten() {
        let f = e.file_name().to_string_lossy().into_owned();
        if !f.starts_with(&format!("{name}_lat.")) {
            continue;
        }
        for line in fs::read_to_string(e.path()).unwrap().lines() {
            let mut it = line.split(',').map(|x| x.trim());
            let (Some(t), Some(lat)) = (it.next(), it.next()) else {
                continue;
            };
            let (Ok(t), Ok(lat)) = (t.parse::<f64>(), lat.parse::<f64>()) else {
                continue;
            };
            let lat = lat / 1e6;
            if t - lat <= from && t >= from {
                spanning = spanning.max(lat);
            }
            if t >= from && t <= to {
                inside = inside.max(lat);
            } else {
                outside = outside.max(lat);
            }
        }
    }
    (spanning, inside, outside)
}

/// A file whose fsync returned, and the sha256 of what it holds.
type Synced = (PathBuf, [u8; 32]);

/// The second container: files written and fsync'd one after another until
/// told to stop; returns (path, sha256) of every file whose fsync returned.
fn start_syncer(
    dir: PathBuf,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Result<Vec<Synced>, String>> {
    thread::spawn(move || {
        let mut done = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut i = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let path = dir.join(format!("f{}", i % 200));
            fill(i, &mut buf);
            let res = fs::File::create(&path).and_then(|mut f| {
                f.write_all(&buf)?;
                f.sync_all()
            });
            if let Err(e) = res {
                return Err(format!("fsync'd write {} failed: {e}", path.display()));
            }
            done.retain(|(p, _): &Synced| p != &path);
            done.push((path, Sha256::digest(&buf).into()));
            i += 1;
        }
        Ok(done)
    })
}

/// Run fio and the fsync'd writer, calling `event` in the middle; check
/// everything after; return fio's result.
fn run_with_event(env: &mut Env, what: &str, event: impl FnOnce(&mut Env)) -> FioResult {
    let fio_dir = env.mount("fio");
    let sync_dir = env.mount("sync");
    let out = env.tmp.path().join("fio.json");
    let fio = start_fio(&fio_dir, &out);
    let stop = Arc::new(AtomicBool::new(false));
    let syncer = start_syncer(sync_dir.clone(), stop.clone());
    thread::sleep(EVENT_AFTER);
    let t0 = unix_ms();
    event(env);
    // I/Os stuck in the event complete shortly after it: 1 s covers them.
    let window = (t0, unix_ms() + 1000.0);
    let fio = finish_fio(fio, &out);
    let (spanning, event_max, other_max) = latency_split(&out, window.0, window.1);
    eprintln!(
        "{what}: longest fio latency of the I/Os in flight when it began: {spanning:.1} ms; \
         of those completing from then to 1 s after it: {event_max:.1} ms; of all the \
         others: {other_max:.1} ms"
    );
    let mut res = fio.unwrap_or_else(|e| {
        let hint = if what.starts_with("crash") && e.contains("bad magic header 0") {
            "\n(blocks read back as zeros: writes acknowledged since the last commit were \
             lost with the killed process: the intent log's replay did not bring them back)"
        } else {
            ""
        };
        panic!("{what}: {e}{hint}")
    });
    (res.event_max_ms, res.other_max_ms) = (event_max, other_max);
    stop.store(true, Ordering::SeqCst);
    let files = syncer
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(res.error, 0, "{what}: fio reported an error");
    assert!(
        !files.is_empty(),
        "{what}: the fsync'd writer wrote nothing"
    );
    // Read back through a clean cache: what the writer was told is durable.
    sh("sh", &["-c", "echo 3 > /proc/sys/vm/drop_caches"]);
    for (p, sum) in &files {
        let got: [u8; 32] = Sha256::digest(fs::read(p).unwrap()).into();
        assert_eq!(
            &got,
            sum,
            "{what}: {} lost its fsync'd content",
            p.display()
        );
    }
    env.unmount_and_check();
    eprintln!(
        "{what}: fio {} I/Os, no error; longest latency {:.1} ms (I/Os completing from the \
         event to 1 s after it: {:.1} ms; all others: {:.1} ms), clat p99.99 {:.1} ms; \
         {} fsync'd files intact",
        res.ios,
        res.max_lat_ms,
        res.event_max_ms,
        res.other_max_ms,
        res.p9999_ms,
        files.len()
    );
    res
}

fn finish(mut env: Env) {
    env.stop_servers();
    // The servers' own account of the pause (shown with --nocapture).
    eprintln!("server logs:{}", env.logs());
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.status().is_some() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        env.status().is_none(),
        "a server still answers: {}",
        env.logs()
    );
    let check = tp(&["check".as_ref(), env.pool.as_os_str()]);
    assert!(check.contains("clean"), "thinpool check: {check}");
    assert!(loops_under(&env.export).is_empty(), "loop devices left");
    assert!(
        !host::mount_points().contains(&env.export),
        "FUSE mount left on the export"
    );
    assert!(
        !control::socket_path(&env.pool).exists(),
        "socket left behind"
    );
}

//------------------------------------------------------------------------------

/// The same run with no restart: the latencies the other two compare with.
#[test]
fn baseline_without_restart() {
    require_root();
    let mut env = Env::new();
    env.serve(&[]);
    let res = run_with_event(&mut env, "baseline", |_| {});
    assert!(res.ios > 0);
    finish(env);
}

/// Planned takeover: `thinpool serve --takeover` while fio and the fsync'd
/// writer run; the old server hands over and exits.
#[test]
fn takeover_under_fio_is_a_pause() {
    require_root();
    let mut env = Env::new();
    env.serve(&[]);
    let res = run_with_event(&mut env, "takeover", |env| {
        let old = env.server_pid().unwrap();
        let t = Instant::now();
        env.serve(&["--takeover"]);
        let new = env.server_pid().unwrap();
        assert_ne!(old, new, "the new server answers");
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(old) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        assert!(!alive(old), "the old server exited");
        eprintln!(
            "takeover: new server answering after {} ms",
            t.elapsed().as_millis()
        );
    });
    assert!(res.ios > 0);
    finish(env);
}

/// Crash restart: the serving process of `serve --supervise` is killed with
/// SIGKILL while fio and the fsync'd writer run; the holder starts another,
/// which asks the kernel to resend what the dead one had read.
///
/// Writes acknowledged since the last commit come back from the intent log
/// (issue 11): fio's verify fails here if its replay loses one.
#[test]
fn crash_restart_under_fio_is_a_pause() {
    require_root();
    let mut env = Env::new();
    env.serve(&["--supervise"]);
    let holder = env.status().unwrap().supervisor.expect("supervised");
    let res = run_with_event(&mut env, "crash restart", |env| {
        let old = env.server_pid().unwrap();
        let t = Instant::now();
        // SAFETY: killing the serving process of our own pool.
        unsafe { libc::kill(old as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if env.server_pid().is_some_and(|p| p != old) {
                break;
            }
            assert!(Instant::now() < deadline, "no new server: {}", env.logs());
            thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "crash restart: new server answering after {} ms",
            t.elapsed().as_millis()
        );
    });
    assert!(res.ios > 0);
    assert!(alive(holder), "the holder survives");
    finish(env);
}

/// On a kernel that cannot resend (played here by hiding FUSE_HAS_RESEND):
/// a takeover is refused with the reason and the server goes on; a killed
/// supervised server is not restarted, the holder says why and ends the
/// export, and the loop device fails its I/O as before.
#[test]
fn without_resend_takeover_is_refused_and_a_crash_ends_the_export() {
    require_root();
    let mut env = Env::new();
    env.serve_env(&["--supervise"], &[("THINPOOL_TEST_NO_RESEND", "1")]);
    let file = env.export.join("sync");
    let dev = sh(
        "losetup",
        &[
            "--find".as_ref(),
            "--show".as_ref(),
            "--direct-io=on".as_ref(),
            file.as_os_str(),
        ],
    );
    env.mounted.push((dev.clone(), PathBuf::new()));
    let pid = env.server_pid().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_thinpool"))
        .arg("serve")
        .arg(&env.pool)
        .arg(&env.export)
        .arg("--takeover")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot resend"),
        "takeover: {err}"
    );
    assert_eq!(env.server_pid(), Some(pid), "the server goes on");
    sh(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=64k",
            "count=16",
            "oflag=direct",
            "status=none",
        ],
    );

    // SAFETY: killing the serving process of our own pool.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let holder = &mut env.children[0];
    let deadline = Instant::now() + Duration::from_secs(10);
    while holder.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the holder did not give up");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        env.logs()
            .contains("cannot resend the requests it had read"),
        "{}",
        env.logs()
    );
    let out = Command::new("dd")
        .args([
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=64k",
            "count=16",
            "oflag=direct",
            "status=none",
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "I/O after the export ended must fail"
    );
    detach(&dev);
    env.mounted.clear();
    sh("umount", &["-l".as_ref(), env.export.as_os_str()]);
    let check = tp(&["check".as_ref(), env.pool.as_os_str()]);
    assert!(check.contains("clean"), "thinpool check: {check}");
}
