//! containerd with real images from a real registry: the built-in overlayfs
//! snapshotter (the harness's own check, and the baseline the docs compare
//! with) and thinpool's snapshotter. Root only: they fail with a message
//! otherwise.

#[path = "support/containerd.rs"]
mod containerd;

use std::fs;
use std::path::Path;

use containerd::{busybox_rootfs, require, Containerd, Layout, Registry};

const TOOLS: &[&str] = &[
    "containerd",
    "ctr",
    "runc",
    "docker-registry",
    "umoci",
    "skopeo",
];

/// Tags `base` (busybox-static) and `app` (base plus a layer that adds,
/// changes and deletes files, and removes a directory).
fn build_images(work: &Path) -> Layout {
    let mut l = Layout::init(work);
    l.layer(None, "base", |r| {
        busybox_rootfs(r);
        fs::create_dir_all(r.join("data/gone-dir")).unwrap();
        fs::write(r.join("data/keep"), "from base\n").unwrap();
        fs::write(r.join("data/change-me"), "old\n").unwrap();
        fs::write(r.join("data/delete-me"), "doomed\n").unwrap();
        fs::write(r.join("data/gone-dir/x"), "x\n").unwrap();
    });
    l.layer(Some("base"), "app", |r| {
        fs::write(r.join("data/added"), "from app\n").unwrap();
        fs::write(r.join("data/change-me"), "new\n").unwrap();
        fs::remove_file(r.join("data/delete-me")).unwrap();
        fs::remove_dir_all(r.join("data/gone-dir")).unwrap();
    });
    l
}

/// What a container of `app` checks: files of both layers, the deletions,
/// and a write of its own.
const CHECK_APP: &str = "set -e; \
    [ \"$(cat /data/keep)\" = 'from base' ]; \
    [ \"$(cat /data/added)\" = 'from app' ]; \
    [ \"$(cat /data/change-me)\" = new ]; \
    [ ! -e /data/delete-me ]; [ ! -e /data/gone-dir ]; \
    echo hello > /data/written; sync; [ \"$(cat /data/written)\" = hello ]; \
    echo ok";

#[test]
fn overlayfs_pull_and_run() {
    require(TOOLS);
    let work = tempfile::tempdir().unwrap();
    let layout = build_images(work.path());
    let registry = Registry::start();
    let app = layout.push("app", &registry, "busy");
    let mut ctrd = Containerd::start(&[]);
    ctrd.pull("overlayfs", &app);
    let out = ctrd.run("overlayfs", &app, "c1", &["sh", "-c", CHECK_APP]);
    assert!(
        out.ok() && out.stdout.trim() == "ok",
        "container failed: {out:?}\n{}",
        ctrd.log()
    );
    assert!(ctrd.snapshots("overlayfs").len() >= 2);
    // The baseline docs/CONTAINERD.md compares thinpool's figures with.
    five_containers(&mut ctrd, "overlayfs");
    // A task left running is what a failing test leaves: drop must clear it.
    ctrd.start_task("overlayfs", &app, "left", &["sleep", "600"]);
    let survivors = Survivors::of(&ctrd, &registry);
    ctrd.remove_images();
    drop(ctrd);
    drop(registry);
    survivors.assert_gone();
}

#[test]
fn overlayfs_gc_removes_snapshots() {
    require(TOOLS);
    let work = tempfile::tempdir().unwrap();
    let layout = build_images(work.path());
    let registry = Registry::start();
    let app = layout.push("app", &registry, "busy");
    let ctrd = Containerd::start(&[]);
    ctrd.pull("overlayfs", &app);
    assert_eq!(ctrd.snapshots("overlayfs").len(), 2);
    ctrd.remove_images();
    assert!(
        ctrd.snapshots("overlayfs").is_empty(),
        "GC left snapshots: {:?}",
        ctrd.snapshots("overlayfs")
    );
}

/// What a harness started, to check after drop that none of it is left.
struct Survivors {
    address: String,
    dir: std::path::PathBuf,
    namespace: String,
    pids: Vec<u32>,
}

impl Survivors {
    fn of(c: &Containerd, r: &Registry) -> Survivors {
        let address = c.address.display().to_string();
        let mut pids = containerd::pids_with_arg(&address);
        pids.extend(c.pid());
        pids.push(r.pid());
        assert!(pids.len() >= 2, "expected containerd and the registry");
        Survivors {
            address,
            dir: c.dir().to_path_buf(),
            namespace: c.namespace.clone(),
            pids,
        }
    }

    fn assert_gone(&self) {
        let alive: Vec<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|&p| containerd::alive(p))
            .collect();
        assert!(alive.is_empty(), "processes left: {alive:?}");
        let by_address: Vec<u32> = containerd::pids_with_arg(&self.address)
            .into_iter()
            .filter(|&p| containerd::alive(p))
            .collect();
        assert!(by_address.is_empty(), "processes left: {by_address:?}");
        assert!(containerd::mounts_under(&self.dir).is_empty());
        assert!(containerd::loops_under(&self.dir).is_empty());
        for h in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            let cg = h.path().join(&self.namespace);
            assert!(!cg.exists(), "cgroup left: {}", cg.display());
        }
    }
}

//------------------------------------------------------------------------------
// thinpool's snapshotter

const BIN: &str = env!("CARGO_BIN_EXE_thinpool");
const SNAP: &str = "thinpool";

/// `thinpool ARGS` (through the control socket while the snapshotter runs).
fn tp(args: &[&str]) -> String {
    containerd::run_ok(std::process::Command::new(BIN).args(args))
}

/// A private directory for a snapshotter's pool, sockets and export.
fn snap_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tp-snap")
        .tempdir()
        .unwrap()
}

/// A `thinpool snapshotter` process on a pool of its own. Stopped (and its
/// export unmounted, its loop devices detached) on drop.
struct Snapshotter {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    pool: String,
    /// `--hold SECONDS` (a holder keeps the export across restarts).
    hold: Option<u32>,
    /// Extra `thinpool snapshotter` options (`--direct`).
    extra: &'static [&'static str],
}

impl Snapshotter {
    fn new() -> Snapshotter {
        Snapshotter::make(None, &[])
    }

    /// As systemd's unit runs it: `--hold`, so that a restart or a crash
    /// of the snapshotter is a pause for running containers.
    fn new_held() -> Snapshotter {
        Snapshotter::make(Some(30), &[])
    }

    fn with(extra: &'static [&'static str]) -> Snapshotter {
        Snapshotter::make(None, extra)
    }

    fn make(hold: Option<u32>, extra: &'static [&'static str]) -> Snapshotter {
        let mut s = Snapshotter::unstarted(snap_dir(), "20G", hold, extra);
        s.start();
        s
    }

    /// A pool of `size` in `dir`, its snapshotter not started yet.
    fn unstarted(
        dir: tempfile::TempDir,
        size: &str,
        hold: Option<u32>,
        extra: &'static [&'static str],
    ) -> Snapshotter {
        let pool = dir.path().join("pool.tp").display().to_string();
        // 4 KiB blocks: the set-up docs/CONTAINERD.md recommends.
        tp(&["create", &pool, "--size", size, "--block-size", "4K"]);
        Snapshotter {
            child: None,
            dir,
            pool,
            hold,
            extra,
        }
    }

    fn socket(&self) -> std::path::PathBuf {
        self.dir.path().join("snap.sock")
    }

    fn export(&self) -> std::path::PathBuf {
        self.dir.path().join("export")
    }

    fn proxy(&self) -> containerd::Proxy {
        containerd::Proxy {
            name: SNAP.into(),
            socket: self.socket(),
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("snapshotter.log")).unwrap_or_default()
    }

    /// The snapshotter's command line (the same every time, as systemd's).
    fn command(&self, hold: Option<u32>) -> std::process::Command {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["snapshotter", &self.pool, "--volume-size", "1G"])
            .args(self.extra)
            .arg("--address")
            .arg(self.socket())
            .arg("--export-dir")
            .arg(self.export());
        if let Some(s) = hold {
            cmd.args(["--hold", &s.to_string()]);
        }
        cmd
    }

    fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotter.log"))
            .unwrap();
        let child = self
            .command(self.hold)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let ready = |log: &str| log.matches("answering containerd").count();
        let before = ready(&self.log());
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while ready(&self.log()) == before {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "snapshotter did not start:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// As `start`, but the snapshotter's stderr (so the holder's, which
    /// inherits it) is a pipe, closed once it answers: as the terminal it
    /// was started from by hand goes away with the session.
    fn start_on_closing_stderr(&mut self) {
        use std::io::{BufRead, Write};
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotter.log"))
            .unwrap();
        let mut child = self
            .command(self.hold)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let err = std::io::BufReader::new(child.stderr.take().unwrap());
        self.child = Some(child);
        for line in err.lines() {
            let line = line.unwrap();
            writeln!(log, "{line}").unwrap();
            if line.contains("answering containerd") {
                return;
            }
        }
        panic!("snapshotter did not start:\n{}", self.log());
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Live processes of this pool other than the worker: the holder.
    fn holder_pids(&self) -> Vec<u32> {
        let worker = self.child.as_ref().map(|c| c.id());
        containerd::pids_with_arg(&self.pool)
            .into_iter()
            .filter(|&p| Some(p) != worker && containerd::alive(p))
            .collect()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; the exit status once it has stopped (within 20 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        containerd::run_ok(std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                return st;
            }
            if std::time::Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("the snapshotter did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn info(&self) -> serde_json::Value {
        serde_json::from_str(&tp(&["info", &self.pool, "--json"])).unwrap()
    }

    fn data_used(&self) -> u64 {
        self.info()["data_used_bytes"].as_u64().unwrap()
    }

    /// The pool's volumes (name, read-only, exclusive bytes).
    fn volumes(&self) -> Vec<serde_json::Value> {
        let v: serde_json::Value =
            serde_json::from_str(&tp(&["list", &self.pool, "--json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    fn snapshot_volumes(&self) -> usize {
        self.volumes()
            .iter()
            .filter(|v| {
                let n = v["name"].as_str().unwrap();
                n.starts_with("ctrd-") && n != "ctrd-template"
            })
            .count()
    }

    fn check(&self) {
        let out = std::process::Command::new(BIN)
            .args(["check", &self.pool])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "thinpool check: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            containerd::run_timeout(
                std::process::Command::new("kill").args(["-TERM", &c.id().to_string()]),
                std::time::Duration::from_secs(5),
            )
            .ok();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        // The holder (its command line names our pool): SIGTERM with no
        // worker attached releases the export.
        for pid in self.holder_pids() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while containerd::alive(pid) && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
        containerd::detach_loops_under(self.dir.path());
        containerd::unmount_under(self.dir.path());
    }
}

/// An ext4 mount of a loop device the test attached itself: unmounted and
/// detached on drop (before the snapshotter, which is stopped after it).
struct LoopMount {
    dev: String,
    dir: std::path::PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn new(file: &Path, dir: std::path::PathBuf) -> LoopMount {
        let dev = containerd::run_ok(
            std::process::Command::new("losetup")
                .args(["--find", "--show", "--direct-io=on"])
                .arg(file),
        )
        .trim()
        .to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        fs::create_dir_all(&dir).unwrap();
        let mut m = LoopMount {
            dev,
            dir,
            mounted: false,
        };
        // The snapshotter's mount options for an active snapshot.
        containerd::run_ok(
            std::process::Command::new("mount")
                .args(["-t", "ext4", "-o", "rw,noatime,noinit_itable", &m.dev])
                .arg(&m.dir),
        );
        m.mounted = true;
        m
    }

    fn umount(&mut self) {
        containerd::run_ok(std::process::Command::new("umount").arg(&self.dir));
        self.mounted = false;
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted {
            let _ = std::process::Command::new("umount").arg(&self.dir).status();
        }
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.dev])
            .status();
    }
}

/// The template is made with `mkfs.ext4 -E packed_meta_blocks=1`: ext4's
/// bitmaps, inode tables and the journal's start at the front of the volume
/// (mkfs's default puts the journal in the middle), so a container that
/// writes a 5-byte file changes blocks under few block-map nodes. Measured
/// like `tools/snapshotter-trace.sh`: a clone of the template, mounted with
/// the snapshotter's options, a 5-byte file, umount.
#[test]
fn a_writing_container_copies_few_map_nodes() {
    require(&["losetup", "mkfs.ext4", "debugfs"]);
    let snap = Snapshotter::new();
    let template = snap.export().join("ctrd-template");
    let journal = containerd::run_ok(
        std::process::Command::new("debugfs")
            .args(["-R", "bmap <8> 0"])
            .arg(&template),
    );
    let journal: u64 = journal.trim().parse().unwrap();
    // Group 0 (ext4 blocks 0..32768) holds the packed metadata; mkfs's
    // default puts the journal of a 1G volume at block 131072.
    assert!(
        journal < 32768,
        "the journal starts at ext4 block {journal}"
    );

    let used = || {
        let i = snap.info();
        let n = |k: &str| i[k].as_u64().unwrap();
        (n("data_used_bytes"), n("metadata_used_bytes"))
    };
    let (d0, m0) = used();
    tp(&["clone", &snap.pool, "ctrd-template", "w"]);
    let mut m = LoopMount::new(&snap.export().join("w"), snap.dir.path().join("mnt"));
    fs::write(m.dir.join("hello.txt"), "hello").unwrap();
    m.umount();
    drop(m);
    let (d1, m1) = used();
    let (data, meta) = ((d1 - d0) / 4096, (m1 - m0) / 4096);
    eprintln!("a writing container: {data} data blocks, {meta} metadata pages");
    // ext4's own writes: 16 or 19 blocks of 4 KiB (tools/ext4-floor.sh).
    assert!((7..=20).contains(&data), "{data} data blocks");
    // The map nodes on the paths to those blocks, copied for the clone: the
    // root, a level-1 node and the leaves over the front metadata, the
    // journal and the file's data: 5 on this 1G volume, 6 with mkfs's
    // default layout (the journal in a leaf of its own); on the default 10G
    // volume 6 against 8 (tools/snapshotter-trace.sh).
    assert!(meta <= 5, "{meta} metadata pages for one writing container");
}

/// Images `base` and `app` (see `build_images`) plus `other`: the same base
/// layer under a different second layer.
fn build_three(work: &Path) -> Layout {
    let mut l = build_images(work);
    l.layer(Some("base"), "other", |r| {
        fs::write(r.join("data/other"), "other\n").unwrap();
    });
    l
}

/// The Docker docs' example: five running containers of `app`, three of
/// which wrote a 5-byte file (w0..w2; w3, w4 wrote nothing). Checks and
/// prints what `ctr snapshots usage` shows; returns (writers, idle) bytes.
fn five_containers(ctrd: &mut Containerd, snapshotter: &str) -> (Vec<u64>, Vec<u64>) {
    let app = ctrd.ctr_ok(&["image", "ls", "-q"]);
    let app = app
        .lines()
        .find(|l| l.ends_with(":app"))
        .expect("image app pulled")
        .to_string();
    for i in 0..5 {
        let cmd = if i < 3 {
            "printf hello > /hello && sync && echo ready && sleep 600"
        } else {
            "sync && echo ready && sleep 600"
        };
        ctrd.start_task(snapshotter, &app, &format!("w{i}"), &["sh", "-c", cmd]);
    }
    // The writes are flushed when each task's `sync` has run.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let u = usage(ctrd, snapshotter);
    eprintln!("ctr snapshots --snapshotter {snapshotter} usage:\n{u:#?}");
    let w: Vec<u64> = (0..3).map(|i| u[&format!("w{i}")]).collect();
    let idle: Vec<u64> = (3..5).map(|i| u[&format!("w{i}")]).collect();
    for (i, x) in w.iter().enumerate() {
        assert!(*x > 0, "w{i} wrote but uses nothing");
        assert!(*x <= 1 << 20, "w{i} uses {x} bytes for 5 bytes");
    }
    for x in &idle {
        assert!(
            w.iter().all(|y| y > x),
            "an idle container uses as much as a writer: {u:?}"
        );
    }
    (w, idle)
}

/// `ctr snapshots usage`: snapshot name -> bytes.
fn usage(c: &Containerd, snapshotter: &str) -> std::collections::BTreeMap<String, u64> {
    let out = c.ctr_ok(&["snapshots", "--snapshotter", snapshotter, "usage"]);
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3).then(|| (f[0].to_string(), parse_human(&format!("{}{}", f[1], f[2]))))
        })
        .collect()
}

/// containerd prints sizes like `0.0 B`, `4.0 KiB`, `1.2 MiB`.
fn parse_human(s: &str) -> u64 {
    let (num, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let n: f64 = num.trim().parse().unwrap_or(f64::NAN);
    let mult = match unit {
        "B" | "" => 1.0,
        "KiB" | "kB" => 1024.0,
        "MiB" | "MB" => 1024.0 * 1024.0,
        "GiB" | "GB" => 1024.0 * 1024.0 * 1024.0,
        u => panic!("unit {u} in {s}"),
    };
    (n * mult) as u64
}

#[test]
fn thinpool_pull_run_share_and_free() {
    require(TOOLS);
    let work = tempfile::tempdir().unwrap();
    let layout = build_three(work.path());
    let registry = Registry::start();
    let app = layout.push("app", &registry, "busy");
    let other = layout.push("other", &registry, "busy");
    let snap = Snapshotter::new();
    let template_used = snap.data_used();
    let mut ctrd = Containerd::start(&[snap.proxy()]);

    // Pull: two layers, two committed volumes.
    ctrd.pull(SNAP, &app);
    assert_eq!(snap.snapshot_volumes(), 2, "{:?}", snap.volumes());
    snap.check();

    // A container sees both layers and the deletions, and writes.
    let out = ctrd.run(SNAP, &app, "c1", &["sh", "-c", CHECK_APP]);
    assert!(
        out.ok() && out.stdout.trim() == "ok",
        "container failed: {out:?}\n{}\n{}",
        ctrd.log(),
        snap.log()
    );
    ctrd.wait_for("GC of c1's snapshot", || snap.snapshot_volumes() == 2);
    snap.check();

    // A second image on the same base unpacks only its own layer.
    ctrd.pull(SNAP, &other);
    assert_eq!(snap.snapshot_volumes(), 3, "{:?}", snap.volumes());
    snap.check();

    // The Docker docs' example: five containers, three write 5 bytes.
    let before = snap.data_used();
    five_containers(&mut ctrd, SNAP);
    snap.check();
    for i in 0..5 {
        ctrd.remove_container(&format!("w{i}"));
    }
    ctrd.wait_for("GC of the containers' snapshots", || {
        snap.snapshot_volumes() == 3
    });
    assert_eq!(
        snap.data_used(),
        before,
        "removing containers frees their blocks"
    );
    snap.check();

    // Removing the images and letting GC run leaves the template alone.
    ctrd.remove_images();
    assert_eq!(snap.snapshot_volumes(), 0, "{:?}", snap.volumes());
    assert_eq!(snap.data_used(), template_used);
    snap.check();

    let survivors = Survivors::of(&ctrd, &registry);
    let (snap_pid, export) = (snap.pid(), snap.export());
    drop(ctrd);
    drop(snap);
    drop(registry);
    survivors.assert_gone();
    assert!(!containerd::alive(snap_pid), "snapshotter still runs");
    assert!(containerd::mounts_under(&export).is_empty());
    assert!(containerd::loops_under(&export).is_empty());
}

/// The journal's log blocks of a committed layer, as ext4 block runs
/// (`debugfs -R 'stat <8>'` on the exported file, the journal's superblock,
/// its block 0, left out), and ext4's block size.
fn journal_log(file: &Path) -> (Vec<(u64, u64)>, u64) {
    let out = containerd::run_ok(
        std::process::Command::new("debugfs")
            .args(["-R", "stat <8>"])
            .arg(file),
    );
    let list = out.split("EXTENTS:").nth(1).expect("journal extents");
    let mut runs = Vec::new();
    for e in list
        .split(',')
        .map(str::trim)
        .filter(|e| e.starts_with("(") && !e.starts_with("(ETB"))
    {
        let (l, p) = e.split_once(':').unwrap();
        let l0: u64 = l
            .trim_matches(|c| c == '(' || c == ')')
            .split('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let mut p = p.split('-').map(|x| x.trim().parse::<u64>().unwrap());
        let p0 = p.next().unwrap();
        let p1 = p.next().unwrap_or(p0);
        let p0 = if l0 == 0 { p0 + 1 } else { p0 };
        if p0 <= p1 {
            runs.push((p0, p1 + 1));
        }
    }
    let stats = containerd::run_ok(
        std::process::Command::new("dumpe2fs")
            .args(["-h"])
            .arg(file),
    );
    let bs = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .expect("block size")
        .trim()
        .parse()
        .unwrap();
    (runs, bs)
}

/// A read-only loop device the test attached itself; detached on drop.
struct RoLoop(String);

impl RoLoop {
    fn new(file: &Path) -> RoLoop {
        let dev = containerd::run_ok(
            std::process::Command::new("losetup")
                .args(["--find", "--show", "--read-only"])
                .arg(file),
        );
        RoLoop(dev.trim().to_string())
    }
}

impl Drop for RoLoop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.0])
            .status();
    }
}

/// At Commit the snapshotter unmaps the layer's dead journal log (ext4 was
/// unmounted cleanly by the unpacker): after a pull, no committed layer maps
/// a block of its journal but the journal's superblock, e2fsck finds each
/// layer clean, and a container on them runs and writes.
#[test]
fn committed_layers_drop_their_dead_journal_log() {
    let mut tools = TOOLS.to_vec();
    tools.extend(["debugfs", "dumpe2fs", "e2fsck", "losetup"]);
    require(&tools);
    let work = tempfile::tempdir().unwrap();
    let layout = build_images(work.path());
    let registry = Registry::start();
    let app = layout.push("app", &registry, "busy");
    let mut snap = Snapshotter::new();
    let template_used = snap.data_used();
    let mut ctrd = Containerd::start(&[snap.proxy()]);
    ctrd.pull(SNAP, &app);
    let layers: Vec<String> = snap
        .volumes()
        .iter()
        .filter(|v| v["read_only"].as_bool().unwrap())
        .map(|v| v["name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("ctrd-") && n != "ctrd-template")
        .collect();
    assert_eq!(layers.len(), 2, "{:?}", snap.volumes());

    // Each Commit says what it unmapped (the before/after of its volume).
    let log = snap.log();
    assert!(!log.contains("journal log kept"), "{log}");
    let unmapped: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split("unmapped ").nth(1))
        .map(|l| l.split(' ').next().unwrap().parse().unwrap())
        .collect();
    eprintln!(
        "journal log unmapped per layer: {unmapped:?} bytes; pool data {} bytes over the template",
        snap.data_used() - template_used
    );
    assert_eq!(unmapped.len(), 2, "{log}");
    assert!(unmapped.iter().all(|n| *n > 0), "{unmapped:?}");

    let mut logs = Vec::new();
    for name in &layers {
        let file = snap.export().join(name);
        let dev = RoLoop::new(&file);
        containerd::run_ok(std::process::Command::new("e2fsck").args(["-fn", &dev.0]));
        logs.push(journal_log(&file));
    }
    snap.check();

    // Blocks a layer maps that the template does not (`thinpool diff`, on
    // the pool at rest): none in its journal's log (the template's journal
    // is unwritten: lazy_journal_init).
    assert!(snap.terminate().success(), "{}", snap.log());
    for (name, (runs, ext4_block)) in layers.iter().zip(&logs) {
        assert!(!runs.is_empty());
        let diff: serde_json::Value =
            serde_json::from_str(&tp(&["diff", &snap.pool, "ctrd-template", name, "--json"]))
                .unwrap();
        let pool_block = diff["block_size"].as_u64().unwrap();
        let ranges = diff["ranges"].as_array().unwrap();
        assert!(!ranges.is_empty());
        for r in ranges {
            let (b, n) = (r["block"].as_u64().unwrap(), r["blocks"].as_u64().unwrap());
            let (start, end) = (b * pool_block, (b + n) * pool_block);
            for &(j0, j1) in runs {
                let (j0, j1) = (j0 * ext4_block, j1 * ext4_block);
                assert!(
                    end <= j0 || start >= j1,
                    "{name} maps bytes {start}..{end}, in its journal log {j0}..{j1}"
                );
            }
        }
    }
    snap.start();
    // containerd's connection to the old socket broke; its gRPC client
    // fails calls fast until its reconnect backoff ends (up to ~1 s).
    ctrd.wait_for("containerd to reach the restarted snapshotter", || {
        ctrd.ctr(&["snapshots", "--snapshotter", SNAP, "ls"])
            .is_ok_and(|o| o.status.success())
    });

    let out = ctrd.run(SNAP, &app, "c1", &["sh", "-c", CHECK_APP]);
    assert!(
        out.ok() && out.stdout.trim() == "ok",
        "container failed: {out:?}\n{}\n{}",
        ctrd.log(),
        snap.log()
    );
    snap.check();
}

#[test]
fn thinpool_kill9_during_pull_recovers_from_the_pool() {
    require(TOOLS);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::init(work.path());
    layout.layer(None, "base", busybox_rootfs);
    // A layer large enough to take a moment to unpack.
    let mut sums = String::new();
    layout.layer(Some("base"), "big", |r| {
        containerd::sh(
            "mkdir big && for i in 1 2 3 4; do head -c 16M /dev/urandom > big/f$i; done",
            r,
        );
        sums = containerd::sh("cd big && sha256sum f1 f4", r);
    });
    let registry = Registry::start();
    let big = layout.push("big", &registry, "big");
    let mut snap = Snapshotter::new();
    let ctrd = Containerd::start(&[snap.proxy()]);

    let mut pull = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&ctrd.address)
        .args(["-n", &ctrd.namespace, "image", "pull", "--plain-http"])
        .args(["--snapshotter", SNAP, &big])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill -9 while a layer is being unpacked into an active snapshot.
    ctrd.wait_for("an active snapshot", || {
        snap.volumes().iter().any(|v| {
            v["name"].as_str().unwrap().starts_with("ctrd-") && !v["read_only"].as_bool().unwrap()
        })
    });
    snap.kill9();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while pull.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "ctr pull hangs");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // Started again, it finds its state in the pool alone.
    snap.start();
    snap.check();
    // containerd's gRPC connection to the proxy reconnects with a backoff:
    // the first calls after the restart may fail "unavailable". Retry.
    let pull_args = ["image", "pull", "--plain-http", "--snapshotter", SNAP, &big];
    let mut tries = 0;
    while !ctrd.ctr(&pull_args).unwrap().ok() {
        tries += 1;
        assert!(tries < 20, "pull fails after the restart:\n{}", snap.log());
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    snap.check();
    let mut ctrd = ctrd;
    let out = ctrd.run(
        SNAP,
        &big,
        "reader",
        &["sh", "-c", "cd /big && sha256sum f1 f4 && ls /bin/busybox"],
    );
    assert!(out.ok(), "{out:?}\n{}", snap.log());
    assert_eq!(
        out.stdout,
        format!("{sums}/bin/busybox\n"),
        "the layer's files"
    );

    // Once containerd's GC has run (and called Cleanup), the pool holds no
    // volume containerd does not know: only the template.
    ctrd.remove_images();
    ctrd.wait_for("GC of every snapshot", || snap.snapshot_volumes() == 0);
    let names: Vec<String> = snap
        .volumes()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["ctrd-template"]);
    snap.check();
    eprintln!("{}", snap.log());
    let (dir, export) = (ctrd.dir().to_path_buf(), snap.export());
    drop(ctrd);
    drop(snap);
    for d in [dir, export] {
        assert!(containerd::mounts_under(&d).is_empty(), "mounts left");
        assert!(containerd::loops_under(&d).is_empty(), "loop devices left");
    }
}

#[test]
fn setup_script_adds_the_proxy_plugin_once() {
    require(&["containerd"]);
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("config.toml");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/setup-containerd.sh");
    for _ in 0..2 {
        containerd::run_ok(
            std::process::Command::new("sh")
                .arg(&script)
                .arg("--config-only")
                .arg(&conf),
        );
    }
    let text = fs::read_to_string(&conf).unwrap();
    assert_eq!(
        text.matches("[proxy_plugins.thinpool]").count(),
        1,
        "{text}"
    );
    // containerd itself reads it: the plugin is in its parsed configuration.
    let dump = containerd::run_ok(
        std::process::Command::new("containerd")
            .arg("--config")
            .arg(&conf)
            .args(["config", "dump"]),
    );
    assert!(
        dump.contains("[proxy_plugins.thinpool]")
            && dump.contains("address = \"/run/thinpool/snapshotter.sock\""),
        "{dump}"
    );
}

//------------------------------------------------------------------------------
// The snapshots API itself, through a gRPC client (containerd's rules that
// containerd 1.6's own metadata layer would otherwise enforce before us)

mod grpc {
    use std::collections::HashMap;

    pub use thinpool::snapshotter::api::snapshots_client::SnapshotsClient;
    pub use thinpool::snapshotter::api::*;
    use tonic::transport::Channel;

    pub async fn connect(sock: std::path::PathBuf) -> SnapshotsClient<Channel> {
        let ch = tonic::transport::Endpoint::try_from("http://[::]:0")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        SnapshotsClient::new(ch)
    }

    /// The error code of a call that must fail.
    pub fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
        r.unwrap_err().code()
    }

    pub fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }
}

/// `snapshotter --direct`: the pool it serves is opened O_DIRECT (`info`
/// asks the running snapshotter), with the intent log on; a snapshot
/// prepared over gRPC mounts and takes an fsynced file; after SIGTERM the
/// pool checks clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshotter_direct_serves_the_pool_o_direct() {
    use grpc::*;
    require(&["losetup", "mkfs.ext4"]);
    let mut snap = tokio::task::spawn_blocking(|| Snapshotter::with(&["--direct"]))
        .await
        .unwrap();
    let info = snap.info();
    assert_eq!(info["direct_io"], true, "{info}");
    assert_eq!(info["log"]["logging"], true, "{info}");
    let mut c = connect(snap.socket()).await;
    let m = c
        .prepare(PrepareSnapshotRequest {
            snapshotter: SNAP.into(),
            key: "a".into(),
            parent: String::new(),
            labels: labels(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1, "{m:?}");
    let dir = snap.dir.path().join("m");
    fs::create_dir(&dir).unwrap();
    let target = dir.display().to_string();
    run_host(&[
        "mount",
        "-t",
        &m[0].r#type,
        "-o",
        &m[0].options.join(","),
        &m[0].source,
        &target,
    ]);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    {
        use std::io::Write;
        let mut f = fs::File::create(dir.join("f")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    run_host(&["umount", &target]);
    run_host(&[
        "mount",
        "-t",
        &m[0].r#type,
        "-o",
        "ro",
        &m[0].source,
        &target,
    ]);
    let back = fs::read(dir.join("f")).unwrap();
    run_host(&["umount", &target]);
    assert!(back == data, "the file reads back different");
    assert!(snap.info()["commits"]["flushes"].as_u64().unwrap() >= 1);
    drop(c);
    let st = tokio::task::block_in_place(|| snap.terminate());
    assert!(st.success(), "{st}:\n{}", snap.log());
    snap.check();
}

/// Run a host program, which must succeed.
fn run_host(args: &[&str]) -> String {
    containerd::run_ok(std::process::Command::new(args[0]).args(&args[1..]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_api_follows_containerds_rules() {
    use grpc::*;
    use tonic::Code;
    require(&["losetup", "mkfs.ext4"]);
    let mut snap = tokio::task::spawn_blocking(Snapshotter::new).await.unwrap();
    let mut c = connect(snap.socket()).await;
    let prep = |key: &str, parent: &str, l: &[(&str, &str)]| PrepareSnapshotRequest {
        snapshotter: SNAP.into(),
        key: key.into(),
        parent: parent.into(),
        labels: labels(l),
    };
    let stat = |c: &mut SnapshotsClient<_>, key: &str| {
        let req = StatSnapshotRequest {
            snapshotter: SNAP.into(),
            key: key.into(),
        };
        let mut c = c.clone();
        async move { c.stat(req).await.map(|r| r.into_inner().info.unwrap()) }
    };

    // Prepare without parent: ext4 on a loop device, read-write.
    let m = c
        .prepare(prep("a", "", &[]))
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(m.len(), 1);
    assert_eq!(m[0].r#type, "ext4");
    assert!(m[0].source.starts_with("/dev/loop"), "{m:?}");
    assert!(m[0].options.contains(&"rw".to_string()));
    // The same key gives the same mounts.
    let again = c
        .mounts(MountsRequest {
            snapshotter: SNAP.into(),
            key: "a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(again, m);
    assert_eq!(
        code(c.prepare(prep("a", "", &[])).await),
        Code::AlreadyExists
    );

    // Commit keeps only containerd.io/snapshot/ labels and the chain-ID label.
    let ref_label = ("containerd.io/snapshot.ref", "sha256:layer1");
    let commit = |name: &str, key: &str, l: &[(&str, &str)]| CommitSnapshotRequest {
        snapshotter: SNAP.into(),
        name: name.into(),
        key: key.into(),
        labels: labels(l),
    };
    c.commit(commit(
        "layer1",
        "a",
        &[
            ref_label,
            ("containerd.io/snapshot/x", "1"),
            ("other", "dropped"),
        ],
    ))
    .await
    .unwrap();
    let l1 = stat(&mut c, "layer1").await.unwrap();
    assert_eq!(l1.kind, Kind::Committed as i32);
    assert_eq!(
        l1.labels,
        labels(&[ref_label, ("containerd.io/snapshot/x", "1")])
    );
    assert_eq!(stat(&mut c, "a").await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        code(c.commit(commit("layer1", "a", &[])).await),
        Code::AlreadyExists
    );
    assert_eq!(
        code(c.commit(commit("n2", "layer1", &[])).await),
        Code::FailedPrecondition,
        "commit of a committed snapshot"
    );

    // The chain-ID label of a layer the pool holds: AlreadyExists, and the
    // List filter containerd then uses finds it.
    assert_eq!(
        code(c.prepare(prep("extract-2", "", &[ref_label])).await),
        Code::AlreadyExists
    );
    let list = |c: &mut SnapshotsClient<_>, f: &[&str]| {
        let req = ListSnapshotsRequest {
            snapshotter: SNAP.into(),
            filters: f.iter().map(|s| s.to_string()).collect(),
        };
        let mut c = c.clone();
        async move {
            let mut s = c.list(req).await.unwrap().into_inner();
            let mut names = Vec::new();
            while let Some(m) = s.message().await.unwrap() {
                names.extend(m.info.into_iter().map(|i| i.name));
            }
            names.sort();
            names
        }
    };
    let f = r#"labels."containerd.io/snapshot.ref"==sha256:layer1,parent=="""#;
    assert_eq!(list(&mut c, &[f]).await, ["layer1"]);

    // Children, views, bad parents.
    c.prepare(prep("c", "layer1", &[])).await.unwrap();
    let v = c
        .view(ViewSnapshotRequest {
            snapshotter: SNAP.into(),
            key: "v".into(),
            parent: "layer1".into(),
            labels: labels(&[]),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert_eq!(v[0].options, ["ro"]);
    assert_eq!(
        code(c.prepare(prep("d", "nope", &[])).await),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prep("e", "c", &[])).await),
        Code::FailedPrecondition,
        "an active parent"
    );
    let remove = |key: &str| RemoveSnapshotRequest {
        snapshotter: SNAP.into(),
        key: key.into(),
    };
    assert_eq!(
        code(c.remove(remove("layer1")).await),
        Code::FailedPrecondition,
        "a parent with children"
    );

    // The pool stays the source of truth: a layer whose volume is removed
    // behind the snapshotter's back (through the CLI) is gone for containerd
    // too, though the snapshotter had it in its index.
    let names = |s: &Snapshotter| -> Vec<String> {
        s.volumes()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect()
    };
    let old = names(&snap);
    c.prepare(prep("b", "", &[])).await.unwrap();
    let vol = names(&snap)
        .into_iter()
        .find(|n| !old.contains(n))
        .expect("Prepare made a volume");
    c.commit(commit("layer2", "b", &[])).await.unwrap();
    assert_eq!(stat(&mut c, "layer2").await.unwrap().name, "layer2");
    tp(&["rm", &snap.pool, &vol]);
    assert_eq!(
        stat(&mut c, "layer2").await.unwrap_err().code(),
        Code::NotFound
    );
    assert_eq!(
        code(c.prepare(prep("b2", "layer2", &[])).await),
        Code::NotFound
    );

    // Update changes labels only.
    let mut info = stat(&mut c, "c").await.unwrap();
    info.labels = labels(&[("containerd.io/snapshot/y", "2")]);
    info.kind = Kind::Committed as i32;
    c.update(UpdateSnapshotRequest {
        snapshotter: SNAP.into(),
        info: Some(info),
        update_mask: Some(prost_types::FieldMask {
            paths: vec!["labels".into()],
        }),
    })
    .await
    .unwrap();
    let ci = stat(&mut c, "c").await.unwrap();
    assert_eq!(ci.kind, Kind::Active as i32);
    assert_eq!(ci.labels, labels(&[("containerd.io/snapshot/y", "2")]));
    assert!(ci.updated_at.unwrap().seconds >= ci.created_at.unwrap().seconds);

    // An untouched clone holds nothing of its own.
    let u = c
        .usage(UsageRequest {
            snapshotter: SNAP.into(),
            key: "c".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((u.size, u.inodes), (0, 0));

    // kill -9 and restart: the same snapshots, from the pool alone.
    let before = list(&mut c, &[]).await;
    assert_eq!(before, ["c", "layer1", "v"]);
    let mut snap = tokio::task::spawn_blocking(move || {
        snap.kill9();
        snap.start();
        snap
    })
    .await
    .unwrap();
    let mut c = connect(snap.socket()).await;
    assert_eq!(list(&mut c, &[]).await, before);
    assert_eq!(stat(&mut c, "c").await.unwrap(), ci);
    let m = c
        .mounts(MountsRequest {
            snapshotter: SNAP.into(),
            key: "c".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    assert!(m[0].source.starts_with("/dev/loop"));

    // SIGTERM with a loop device attached (nothing mounts it): the
    // snapshotter detaches it, commits and exits 0; then it starts again.
    let snap = tokio::task::spawn_blocking(move || {
        let st = snap.terminate();
        assert!(st.success(), "exit status {st}: {}", snap.log());
        assert!(containerd::loops_under(&snap.export()).is_empty());
        snap.start();
        snap
    })
    .await
    .unwrap();
    let mut c = connect(snap.socket()).await;
    snap.check();

    // Remove detaches what it attached; children first, then the parent.
    for k in ["c", "v", "layer1"] {
        c.remove(remove(k)).await.unwrap();
    }
    assert!(list(&mut c, &[]).await.is_empty());
    // What a crash could leave: a snapshotter volume without a record.
    // Cleanup removes it (made here through the control socket, as the CLI
    // works while the snapshotter serves the pool).
    tp(&[
        "volume",
        "create",
        &snap.pool,
        "ctrd-orphan",
        "--size",
        "1M",
    ]);
    c.cleanup(CleanupRequest {
        snapshotter: SNAP.into(),
    })
    .await
    .unwrap();
    assert!(containerd::loops_under(&snap.export()).is_empty());
    assert!(
        !tp(&["list", &snap.pool]).contains("ctrd-orphan"),
        "cleanup left a half-made volume"
    );
    tokio::task::spawn_blocking(move || {
        snap.check();
        assert_eq!(snap.snapshot_volumes(), 0);
        drop(snap);
    })
    .await
    .unwrap();
}

//------------------------------------------------------------------------------
// Restarting the snapshotter under a running container (`--hold`)

/// What the container runs: write a 64 KiB file, fsync it, record its md5
/// (fsync'd too) and the time (/proc/uptime) in /out/progress on the host,
/// until /out/stop appears; then check every file against its md5.
const WRITER: &str = "set -e; mkdir -p /w; i=0; \
    while [ ! -e /out/stop ]; do \
      head -c 65536 /dev/urandom > /w/f$i; sync /w/f$i; \
      md5sum /w/f$i >> /w/sums; sync /w/sums; \
      [ $i -eq 0 ] || grep -q \" /w/f$((i-1))\\$\" /w/sums; \
      read up idle < /proc/uptime; echo \"$i $up\" >> /out/progress; \
      i=$((i+1)); \
    done; \
    md5sum -c -s /w/sums; echo \"done $i\" > /out/status";

/// The host's /proc/uptime, in seconds (the container's clock too).
fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The container's completed iterations: (index, uptime when fsync'd).
fn progress(out: &Path) -> Vec<(u64, f64)> {
    fs::read_to_string(out.join("progress"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect()
}

/// Wait until the container has completed `n` more iterations.
fn wait_progress(out: &Path, n: usize, snap: &Snapshotter) {
    let start = progress(out).len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while progress(out).len() < start + n {
        assert!(
            std::time::Instant::now() < deadline,
            "the container stopped making progress:\n{}",
            snap.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The longest gap between two completed iterations in [from, to), and the
/// time from `event` to the first iteration completed after it (ms).
fn gaps(p: &[(u64, f64)], from: f64, to: f64, event: f64) -> (f64, f64) {
    let ts: Vec<f64> = p
        .iter()
        .map(|x| x.1)
        .filter(|t| *t >= from && *t < to)
        .collect();
    let longest = ts.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    let first = p
        .iter()
        .map(|x| x.1)
        .find(|t| *t > event)
        .unwrap_or(f64::NAN);
    (longest * 1000.0, (first - event) * 1000.0)
}

/// `ctr task ls`: the task's (pid, status).
fn task(ctrd: &Containerd, id: &str) -> (String, String) {
    let out = ctrd.ctr_ok(&["task", "ls"]);
    let line = out.lines().find(|l| l.starts_with(id)).unwrap_or("");
    let f: Vec<&str> = line.split_whitespace().collect();
    (
        f.get(1).unwrap_or(&"").to_string(),
        f.get(2).unwrap_or(&"").to_string(),
    )
}

/// Unmounts (lazily) on drop: a mount the test made itself.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        containerd::unmount_under(&self.0);
    }
}

#[test]
fn thinpool_restart_and_crash_leave_a_running_container_running() {
    require(TOOLS);
    require(&["e2fsck"]);
    let work = tempfile::tempdir().unwrap();
    let mut layout = Layout::init(work.path());
    layout.layer(None, "base", busybox_rootfs);
    let registry = Registry::start();
    let base = layout.push("base", &registry, "busy");
    let mut snap = Snapshotter::new_held();
    let holder = snap.holder_pids();
    assert_eq!(holder.len(), 1, "one holder: {holder:?}\n{}", snap.log());
    let mut ctrd = Containerd::start(&[snap.proxy()]);
    ctrd.pull(SNAP, &base);
    let out = tempfile::tempdir().unwrap();
    let bind = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out.path().display()
    );
    ctrd.start_task_with(
        SNAP,
        &base,
        "writer",
        &["--mount", &bind],
        &["sh", "-c", WRITER],
    );
    wait_progress(out.path(), 20, &snap);
    let (pid, status) = task(&ctrd, "writer");
    assert_eq!(status, "RUNNING");
    let t0 = uptime();
    wait_progress(out.path(), 20, &snap);
    let snapshots = ctrd.snapshots(SNAP);
    let info = ctrd.ctr_ok(&["snapshots", "--snapshotter", SNAP, "info", "writer"]);

    // (a) systemctl restart: SIGTERM, exit, the same command line again.
    // (b) a crash and Restart=always: SIGKILL, the same command line.
    let mut figures = Vec::new();
    // (c) a SIGKILL with the next start 0.5 s later, while containerd asks
    // for the snapshots: the call waits in the held listener's backlog.
    for how in ["SIGTERM", "SIGKILL", "SIGKILL, a call waiting"] {
        let old = snap.pid();
        let event = uptime();
        if how == "SIGTERM" {
            let st = snap.terminate();
            assert!(st.success(), "exit status {st} on SIGTERM:\n{}", snap.log());
        } else {
            snap.kill9();
        }
        if how.contains("waiting") {
            let listed = std::thread::scope(|sc| {
                let call = sc.spawn(|| ctrd.ctr(&["snapshots", "--snapshotter", SNAP, "ls"]));
                std::thread::sleep(std::time::Duration::from_millis(500));
                snap.start();
                call.join().unwrap().unwrap()
            });
            assert!(listed.ok(), "a call during the restart: {listed:?}");
            let names: Vec<&str> = listed
                .stdout
                .lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            assert_eq!(names, snapshots, "a call during the restart");
        } else {
            snap.start();
        }
        assert_ne!(snap.pid(), old);
        assert_eq!(snap.holder_pids(), holder, "the same holder");
        wait_progress(out.path(), 20, &snap);
        assert_eq!(
            task(&ctrd, "writer"),
            (pid.clone(), "RUNNING".into()),
            "{how}"
        );
        let p = progress(out.path());
        let (longest, first) = gaps(&p, event - 1.0, uptime(), event);
        // A pause, not a hang that happened to end: well under containerd's
        // and the kernel's timeouts even on a loaded machine.
        assert!(
            longest < 10_000.0,
            "{how}: the container waited {longest} ms"
        );
        figures.push((how, longest, first));

        // containerd goes on working with the new snapshotter.
        assert_eq!(ctrd.snapshots(SNAP), snapshots, "after {how}");
        let again = ctrd.ctr_ok(&["snapshots", "--snapshotter", SNAP, "info", "writer"]);
        assert_eq!(again, info, "Stat after {how}");
        let u = usage(&ctrd, SNAP);
        assert!(u.contains_key("writer"), "{u:?}");
        let o = ctrd.run(
            SNAP,
            &base,
            "probe",
            &["sh", "-c", "echo ok > /x && sync && cat /x"],
        );
        assert!(o.ok() && o.stdout.trim() == "ok", "{o:?}\n{}", snap.log());
        ctrd.wait_for("GC of the probe", || ctrd.snapshots(SNAP) == snapshots);
        snap.check();
    }
    let p = progress(out.path());
    let (baseline, _) = gaps(&p, t0, figures_start(&p, t0), t0);
    for (how, longest, first) in &figures {
        eprintln!(
            "PAUSE {how}: longest gap between two fsync'd writes of the container from 1 s \
             before the signal on: {longest:.0} ms (20 iterations before any restart: \
             {baseline:.0} ms); first write completed {first:.0} ms after the signal"
        );
    }
    for l in snap.log().lines() {
        if ["resumed the export", "handed the export back", "quiesced"]
            .iter()
            .any(|k| l.contains(k))
        {
            eprintln!("  {l}");
        }
    }

    // Every file the container wrote reads back right: through the export
    // once the host's caches are dropped.
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    fs::write(out.path().join("stop"), "").unwrap();
    ctrd.wait_for("the writer to finish", || {
        task(&ctrd, "writer").1 == "STOPPED"
    });
    let status = fs::read_to_string(out.path().join("status")).unwrap_or_default();
    assert!(
        status.starts_with("done "),
        "the writer failed: '{status}'\n{}",
        snap.log()
    );
    let deleted = ctrd.ctr(&["task", "delete", "writer"]).unwrap();
    assert!(deleted.ok(), "exit status of the writer: {deleted:?}");

    // The container's volume: e2fsck clean, and its files as written.
    let m = ctrd.ctr_ok(&[
        "snapshots",
        "--snapshotter",
        SNAP,
        "mounts",
        "/mnt",
        "writer",
    ]);
    let dev = m
        .split_whitespace()
        .find(|w| w.starts_with("/dev/loop"))
        .unwrap()
        .to_string();
    let fsck = containerd::run_timeout(
        std::process::Command::new("e2fsck").args(["-fn", &dev]),
        std::time::Duration::from_secs(120),
    )
    .unwrap();
    assert!(fsck.ok(), "e2fsck -fn {dev}: {fsck:?}");
    let mnt = tempfile::tempdir().unwrap();
    containerd::run_ok(
        std::process::Command::new("mount")
            .args(["-o", "ro,noload", &dev])
            .arg(mnt.path()),
    );
    let _mounted = Mounted(mnt.path().to_path_buf());
    let n = containerd::sh(
        "sed 's#  /w/#  w/#' w/sums | md5sum -c --quiet - && wc -l < w/sums",
        mnt.path(),
    );
    assert!(n.trim().parse::<usize>().unwrap() >= 100, "{n}");
    drop(_mounted);
    ctrd.remove_container("writer");
    snap.check();

    let survivors = Survivors::of(&ctrd, &registry);
    let export = snap.export();
    drop(ctrd);
    drop(snap);
    drop(registry);
    survivors.assert_gone();
    assert!(
        holder.iter().all(|&p| !containerd::alive(p)),
        "the holder still runs"
    );
    assert!(containerd::mounts_under(&export).is_empty());
    assert!(containerd::loops_under(&export).is_empty());
}

/// The time of the 20th iteration after `t0` (the baseline's window).
fn figures_start(p: &[(u64, f64)], t0: f64) -> f64 {
    p.iter()
        .map(|x| x.1)
        .filter(|t| *t >= t0)
        .nth(19)
        .unwrap_or(t0)
}

/// The systemd unit parses (`systemd-analyze verify`, which needs no
/// systemd running) and runs the snapshotter the way the restart test does:
/// `--hold`, and only the main process signalled, so the holder survives.
#[test]
fn systemd_unit_verifies_and_keeps_the_holder() {
    require(&["systemd-analyze"]);
    let unit = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/systemd/thinpool-snapshotter.service"),
    )
    .unwrap();
    let directives: Vec<&str> = unit.lines().filter(|l| !l.starts_with('#')).collect();
    for want in ["KillMode=process", "Restart=always"] {
        assert!(directives.contains(&want), "the unit lacks {want}");
    }
    assert!(
        directives
            .iter()
            .any(|l| l.starts_with("ExecStart=") && l.contains(" --hold ")),
        "ExecStart without --hold"
    );
    let verify = |text: &str| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("thinpool-snapshotter.service");
        // The binary under test: verify checks that ExecStart's program exists.
        fs::write(&path, text.replace("/usr/local/bin/thinpool", BIN)).unwrap();
        containerd::run_timeout(
            std::process::Command::new("systemd-analyze")
                .arg("verify")
                .arg(&path),
            std::time::Duration::from_secs(60),
        )
        .unwrap()
    };
    let out = verify(&unit);
    assert!(
        out.ok() && out.stderr.trim().is_empty() && out.stdout.trim().is_empty(),
        "systemd-analyze verify: {out:?}"
    );
    // The check can fail: a directive systemd cannot parse is reported.
    let bad = verify(&unit.replace("KillMode=process", "KillMode=procss"));
    assert!(bad.stderr.contains("kill mode"), "{bad:?}");
}

/// `systemctl stop` with `--hold`: the snapshotter hands back and exits; no
/// other comes back within the hold time, so the holder releases the export
/// (loop devices detached, FUSE unmounted, sockets removed) and exits. While
/// a snapshotter serves, a second one on the same pool is refused.
#[test]
fn thinpool_holder_releases_the_export_when_no_snapshotter_comes_back() {
    require(&["losetup", "mkfs.ext4"]);
    let mut snap = Snapshotter::make(Some(2), &[]);
    let holder = snap.holder_pids();
    assert_eq!(holder.len(), 1, "{}", snap.log());
    for hold in [Some(2), None] {
        let out =
            containerd::run_timeout(&mut snap.command(hold), std::time::Duration::from_secs(60))
                .unwrap();
        assert!(!out.ok(), "a second snapshotter started: {out:?}");
        let why = if hold.is_some() {
            format!("the pool is served by snapshotter process {}", snap.pid())
        } else {
            "a holder keeps the export".to_string()
        };
        assert!(out.stderr.contains(&why), "{out:?}");
    }
    tp(&["volume", "create", &snap.pool, "v", "--size", "64M"]);
    let dev = tp(&["attach", &snap.pool, "v"]).trim().to_string();
    let sockets = [
        format!("{}.sock", snap.pool),
        format!("{}.holder.sock", snap.pool),
        snap.socket().display().to_string(),
    ];

    let st = snap.terminate();
    assert!(st.success(), "exit status {st}: {}", snap.log());
    // Held: the device, the mount and the sockets are still there.
    let export = snap.export();
    assert!(containerd::loops_under(&export)
        .iter()
        .any(|(d, _)| *d == dev));
    assert!(!containerd::mounts_under(&export).is_empty());
    assert!(sockets.iter().all(|s| Path::new(s).exists()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while holder.iter().any(|&p| containerd::alive(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "the holder did not let go:\n{}",
            snap.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        snap.log().contains("releasing the export"),
        "{}",
        snap.log()
    );
    assert!(
        containerd::loops_under(&export).is_empty(),
        "loop devices left"
    );
    assert!(containerd::mounts_under(&export).is_empty(), "mount left");
    for s in &sockets {
        assert!(!Path::new(s).exists(), "{s} left");
    }

    // Started again: a new holder, the pool as it was.
    snap.start();
    let again = snap.holder_pids();
    assert!(again.len() == 1 && again != holder, "{again:?}");
    assert!(snap.volumes().iter().any(|v| v["name"] == "v"));
    snap.check();

    // The holder killed: the snapshotter serves on without one, and its
    // SIGTERM stops the export as without --hold (nothing is attached).
    for &p in &again {
        containerd::run_ok(std::process::Command::new("kill").args(["-KILL", &p.to_string()]));
    }
    let st = snap.terminate();
    assert!(st.success(), "exit status {st}: {}", snap.log());
    assert!(snap.log().contains("stopped serving"), "{}", snap.log());
    assert!(containerd::mounts_under(&export).is_empty(), "mount left");
    snap.start();
    assert_eq!(snap.holder_pids().len(), 1, "{}", snap.log());
    snap.check();
}

/// A Commit unmaps nothing of a journal that may still be read: the layer's
/// ext4 is written through a real mount and cleanly unmounted, then its
/// superblock says needs_recovery (or its journal says the log starts at
/// block 1): the Commit keeps every block and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_keeps_a_journal_that_is_not_clean() {
    use grpc::*;
    use std::os::unix::fs::FileExt;
    require(&["losetup", "mkfs.ext4", "debugfs", "mount"]);
    let snap = tokio::task::spawn_blocking(Snapshotter::new).await.unwrap();
    let mut c = connect(snap.socket()).await;
    let active = |snap: &Snapshotter| -> Vec<serde_json::Value> {
        snap.volumes()
            .into_iter()
            .filter(|v| {
                let n = v["name"].as_str().unwrap();
                n.starts_with("ctrd-") && n != "ctrd-template" && !v["read_only"].as_bool().unwrap()
            })
            .collect()
    };
    // (what, byte offset in the volume: None = the journal's superblock, bytes)
    let cases: [(&str, Option<u64>, u32); 2] = [
        // s_feature_incompat with needs_recovery (0x4) on top of the template's.
        ("needs_recovery is set", Some(1024 + 0x60), 0x4),
        // jbd2 s_start (big-endian) = 1.
        ("the log starts at journal block 1", None, 1),
    ];
    for (i, (why, at, value)) in cases.into_iter().enumerate() {
        let key = format!("dirty{i}");
        let m = c
            .prepare(PrepareSnapshotRequest {
                snapshotter: SNAP.into(),
                key: key.clone(),
                parent: String::new(),
                labels: Default::default(),
            })
            .await
            .unwrap()
            .into_inner()
            .mounts;
        let dir = snap.dir.path().join(format!("mnt{i}"));
        fs::create_dir_all(&dir).unwrap();
        containerd::run_ok(
            std::process::Command::new("mount")
                .args(["-t", "ext4", "-o", &m[0].options.join(",")])
                .arg(&m[0].source)
                .arg(&dir),
        );
        for f in 0..20 {
            fs::write(dir.join(format!("f{f}")), "data\n").unwrap();
        }
        containerd::run_ok(std::process::Command::new("umount").arg(&dir));

        let vols = active(&snap);
        assert_eq!(vols.len(), 1, "{vols:?}");
        let name = vols[0]["name"].as_str().unwrap().to_string();
        let file = snap.export().join(&name);
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&file)
            .unwrap();
        match at {
            Some(at) => {
                let mut b = [0u8; 4];
                f.read_exact_at(&mut b, at).unwrap();
                let v = u32::from_le_bytes(b) | value;
                f.write_all_at(&v.to_le_bytes(), at).unwrap();
            }
            None => {
                let jsb: u64 = containerd::run_ok(
                    std::process::Command::new("debugfs")
                        .args(["-R", "bmap <8> 0"])
                        .arg(&file),
                )
                .trim()
                .parse()
                .unwrap();
                f.write_all_at(&value.to_be_bytes(), jsb * 4096 + 0x1C)
                    .unwrap();
            }
        }
        f.sync_all().unwrap();
        drop(f);
        let mapped = |snap: &Snapshotter| {
            snap.volumes()
                .into_iter()
                .find(|v| v["name"] == name.as_str())
                .map(|v| v["mapped_bytes"].as_u64().unwrap())
                .unwrap()
        };
        let before = mapped(&snap);
        c.commit(CommitSnapshotRequest {
            snapshotter: SNAP.into(),
            name: format!("layer{i}"),
            key,
            labels: Default::default(),
        })
        .await
        .unwrap();
        assert_eq!(mapped(&snap), before, "{why}: the commit unmapped blocks");
        let log = snap.log();
        assert!(
            log.lines()
                .any(|l| l.contains("journal log kept") && l.contains(why)),
            "{why}: not in the log:\n{log}"
        );
        snap.check();
    }
}

/// The holder hands the export's descriptors (the FUSE connection, the pool
/// open read-write and locked) to whoever asks on `POOL.holder.sock`: only
/// its own user (or root) may ask. The socket is made 0600 whatever the
/// umask, and a process of another user that reaches it anyway (here: the
/// socket left 0777, as a umask of 0 would) is refused by its credentials
/// (`SO_PEERCRED`); the next real snapshotter then resumes the export.
#[test]
fn thinpool_holder_refuses_another_user() {
    require(&["losetup", "mkfs.ext4", "setpriv"]);
    let mut snap = Snapshotter::make(Some(30), &[]);
    let holder_sock = format!("{}.holder.sock", snap.pool);
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(&holder_sock).unwrap().permissions().mode() & 0o777;
    fs::set_permissions(&holder_sock, fs::Permissions::from_mode(0o777)).unwrap();
    // The pool's directory reachable, as /var/lib/thinpool is.
    fs::set_permissions(snap.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    // No worker attached: the holder would give the bundle to the next one.
    let st = snap.terminate();
    assert!(st.success(), "exit status {st}: {}", snap.log());
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(snap.command(Some(30)).get_args());
    // Several times: the holder refuses before reading the request, and
    // a refused snapshotter must still fail (not exit 0 on the broken pipe,
    // as if it had stopped cleanly).
    for _ in 0..10 {
        match containerd::run_timeout(&mut cmd, std::time::Duration::from_secs(30)) {
            Ok(out) => {
                assert!(!out.ok(), "uid 65534: {out:?}\n{}", snap.log());
                assert!(out.stderr.contains("may not attach"), "{out:?}");
            }
            Err(e) => panic!(
                "uid 65534 took the export and served it ({e}):\n{}",
                snap.log()
            ),
        }
    }
    assert!(snap.log().contains("uid 65534"), "{}", snap.log());
    snap.start();
    assert!(
        snap.log().contains("found the holder of the export"),
        "{}",
        snap.log()
    );
    snap.check();
    assert_eq!(mode, 0o600, "{holder_sock} was made {mode:o}");
    // The serving worker's control socket likewise (a takeover through it
    // hands out the same descriptors; its requests change volumes).
    let control = format!("{}.sock", snap.pool);
    fs::set_permissions(&control, fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", BIN])
        .args(["volume", "create", &snap.pool, "theirs", "--size", "1M"]);
    // Several times, as above: the refusal comes before the request is
    // read, and must not end as a broken pipe (exit 0, nothing said).
    for _ in 0..10 {
        let out = containerd::run_timeout(&mut cmd, std::time::Duration::from_secs(30)).unwrap();
        assert!(
            !out.ok() && out.stderr.contains("may not use the server"),
            "{out:?}"
        );
    }
    assert!(!snap.volumes().iter().any(|v| v["name"] == "theirs"));
}

/// The holder outlives the terminal (or journal stream) it was started
/// with: a message it cannot write must not end it, and with it the export
/// under running containers. Here its stderr is a closed pipe when the
/// worker is killed; the holder notes the crash (a write that fails) and a
/// new worker still resumes the export from it.
#[test]
fn thinpool_holder_survives_its_stderr_going_away() {
    require(&["losetup", "mkfs.ext4"]);
    let mut snap = Snapshotter::unstarted(snap_dir(), "4G", Some(30), &[]);
    snap.start_on_closing_stderr();
    let holder = snap.holder_pids();
    assert_eq!(holder.len(), 1, "{}", snap.log());
    tp(&["volume", "create", &snap.pool, "v", "--size", "64M"]);
    let dev = tp(&["attach", &snap.pool, "v"]).trim().to_string();
    snap.kill9();
    snap.start();
    assert!(
        snap.log().contains("found the holder of the export"),
        "the holder did not survive:\n{}",
        snap.log()
    );
    assert_eq!(snap.holder_pids(), holder, "{}", snap.log());
    // The device attached before is still served.
    let out = containerd::run_ok(
        std::process::Command::new("dd")
            .args(["bs=4096", "count=1", "status=none"])
            .arg(format!("if={dev}")),
    );
    assert_eq!(out.len(), 4096);
    snap.check();
}

/// Workers killed at every point of their start (before they connect,
/// after they took the bundle, while they replay the log and resume, just
/// after they resumed), one after the other, while a writer keeps writing
/// to an attached volume with `O_DIRECT|O_SYNC`: the holder keeps the
/// export through all of them (no crash limit reached, no release), the
/// next whole worker resumes it, the writer finishes without an error and
/// every byte it was told is written reads back (after the host's caches
/// are dropped), as does what was written before.
#[test]
fn thinpool_workers_killed_while_starting_lose_no_acknowledged_write() {
    require(&["losetup", "mkfs.ext4", "dd", "md5sum"]);
    let mut snap = Snapshotter::make(Some(30), &[]);
    let holder = snap.holder_pids();
    assert_eq!(holder.len(), 1, "{}", snap.log());
    tp(&["volume", "create", &snap.pool, "v", "--size", "256M"]);
    let dev = tp(&["attach", &snap.pool, "v"]).trim().to_string();
    let work = snap.dir.path().to_path_buf();
    let sh = |script: &str| containerd::sh(script, &work);
    // 16 MiB written and fsynced before anything.
    sh(&format!(
        "head -c 16M /dev/urandom > before && \
         dd if=before of={dev} bs=1M oflag=direct conv=fsync status=none"
    ));
    // The writer: 64 MiB from offset 32 MiB, 64 KiB at a time, synchronous.
    sh("head -c 64M /dev/urandom > during");
    let mut writer = std::process::Command::new("dd")
        .arg("if=during")
        .arg(format!("of={dev}"))
        .args(["bs=64K", "seek=512", "oflag=direct,sync", "status=none"])
        .current_dir(&work)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    snap.kill9();
    for delay_ms in [0u64, 5, 20, 40, 80] {
        let mut w = snap
            .command(snap.hold)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = w.kill();
        let _ = w.wait();
    }
    // (At most 5 deaths: the holder's limit is more than 5 in 30 s.)
    assert!(
        writer.try_wait().unwrap().is_none(),
        "the writer finished before the kills"
    );
    snap.start();
    assert_eq!(snap.holder_pids(), holder, "{}", snap.log());
    let st = writer.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    writer
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        st.success(),
        "the writer failed ({st}): {err}\n{}",
        snap.log()
    );
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let sums = sh(&format!(
        "dd if={dev} bs=1M count=16 iflag=direct status=none | md5sum; md5sum < before; \
         dd if={dev} bs=1M skip=32 count=64 iflag=direct status=none | md5sum; md5sum < during"
    ));
    let sums: Vec<&str> = sums.lines().collect();
    assert_eq!(sums[0], sums[1], "what was written before changed");
    assert_eq!(sums[2], sums[3], "what the writer wrote is not all there");
    snap.check();
}

/// A snapshotter of another pool given the same `--address` (a copied unit
/// file) fails: before, it removed the socket of the one serving there and
/// bound its own, so containerd's calls went to the wrong pool.
#[test]
fn thinpool_snapshotter_does_not_take_a_live_address() {
    require(&["losetup", "mkfs.ext4"]);
    let snap = Snapshotter::new_held();
    let other = snap_dir();
    let pool = other.path().join("pool.tp").display().to_string();
    tp(&["create", &pool, "--size", "4G", "--block-size", "4K"]);
    let sock_id = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(p).map(|m| m.ino()).ok()
    };
    let before = sock_id(&snap.socket());
    assert!(before.is_some());
    for hold in [Some("2"), None] {
        let mut cmd = std::process::Command::new(BIN);
        cmd.args(["snapshotter", &pool, "--volume-size", "64M"])
            .arg("--address")
            .arg(snap.socket())
            .arg("--export-dir")
            .arg(other.path().join("export"));
        if let Some(h) = hold {
            cmd.args(["--hold", h]);
        }
        let out = containerd::run_timeout(&mut cmd, std::time::Duration::from_secs(30));
        // (A run that took the address serves until killed: its holder,
        // with --hold 2, then lets go of its export by itself.)
        let out = out.unwrap_or_else(|e| panic!("it took the address ({e})"));
        assert!(
            !out.ok() && out.stderr.contains("another process answers on it"),
            "{out:?}"
        );
        assert_eq!(sock_id(&snap.socket()), before, "the socket was replaced");
        assert!(containerd::mounts_under(other.path()).is_empty());
        assert!(!Path::new(&format!("{pool}.sock")).exists());
        assert!(!Path::new(&format!("{pool}.holder.sock")).exists());
    }
    assert_eq!(snap.snapshot_volumes(), 0);
}

/// containerd's calls while the snapshotter restarts (`--hold`, SIGTERM and
/// the same command line, three times): a client preparing and removing
/// snapshots in a loop, on a new connection for every call, sees every call
/// succeed (a call in flight at the SIGTERM finishes; one made meanwhile
/// waits in the held listener's backlog for the next worker), and nothing
/// is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thinpool_calls_across_sigterm_restarts_all_succeed() {
    use grpc::*;
    require(&["losetup", "mkfs.ext4"]);
    let snap = tokio::task::spawn_blocking(Snapshotter::new_held)
        .await
        .unwrap();
    let sock = snap.socket();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let key = format!("k{i}");
                let mut c = connect(sock.clone()).await;
                let p = c
                    .prepare(PrepareSnapshotRequest {
                        snapshotter: SNAP.into(),
                        key: key.clone(),
                        parent: String::new(),
                        labels: labels(&[]),
                    })
                    .await;
                if let Err(e) = p {
                    errors.push(format!("prepare {key}: {e}"));
                }
                let mut c = connect(sock.clone()).await;
                let r = c
                    .remove(RemoveSnapshotRequest {
                        snapshotter: SNAP.into(),
                        key: key.clone(),
                    })
                    .await;
                if let Err(e) = r {
                    errors.push(format!("remove {key}: {e}"));
                }
                i += 1;
            }
            (i, errors)
        })
    };
    let snap = tokio::task::spawn_blocking(move || {
        let mut snap = snap;
        for _ in 0..3 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            let st = snap.terminate();
            assert!(st.success(), "exit status {st}: {}", snap.log());
            snap.start();
        }
        std::thread::sleep(std::time::Duration::from_millis(400));
        snap
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (calls, errors) = caller.await.unwrap();
    assert!(calls > 3, "only {calls} rounds");
    eprintln!("{calls} rounds of prepare and remove across 3 restarts");
    assert!(
        errors.is_empty(),
        "{} of {calls} rounds failed: {errors:#?}\n{}",
        errors.len(),
        snap.log()
    );
    assert_eq!(
        snap.log()
            .matches("handed the export back to the holder")
            .count(),
        3
    );
    let snap = tokio::task::spawn_blocking(move || {
        assert_eq!(snap.snapshot_volumes(), 0);
        assert!(containerd::loops_under(&snap.export()).is_empty());
        snap.check();
        snap
    })
    .await
    .unwrap();
    drop(snap);
}

/// The other way round: in a directory others may write to (here 1777, as
/// /tmp), another user binds `POOL.holder.sock` first. The snapshotter
/// does not take that socket for its holder (it would hand it its attach
/// request and serve whatever descriptors came back): it notes it, starts
/// its own holder in its place and serves.
#[test]
fn thinpool_snapshotter_ignores_a_holder_socket_of_another_user() {
    require(&["losetup", "mkfs.ext4", "setpriv", "/usr/bin/python3"]);
    use std::os::unix::fs::PermissionsExt;
    let dir = snap_dir();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o1777)).unwrap();
    let mut snap = Snapshotter::unstarted(dir, "4G", Some(30), &[]);
    let fake = format!("{}.holder.sock", snap.pool);
    let imposter = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
        ])
        .arg(
            "import socket, sys, time\n\
             s = socket.socket(socket.AF_UNIX)\n\
             s.bind(sys.argv[1]); s.listen(8)\n\
             while True: s.accept()[0].recv(4096); time.sleep(0.1)\n",
        )
        .arg(&fake)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed (by its PID) whatever happens below.
    struct Imposter(std::process::Child);
    impl Drop for Imposter {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let imposter = Imposter(imposter);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !Path::new(&fake).exists() {
        assert!(std::time::Instant::now() < deadline, "no imposter socket");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    snap.start();
    drop(imposter);
    assert!(
        snap.log().contains("answered by another user"),
        "{}",
        snap.log()
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(&fake).unwrap().uid(), 0, "{}", snap.log());
    assert_eq!(snap.holder_pids().len(), 1, "{}", snap.log());
    snap.check();
}
