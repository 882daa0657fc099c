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

/// A `thinpool snapshotter` process on a pool of its own. Stopped (and its
/// export unmounted, its loop devices detached) on drop.
struct Snapshotter {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    pool: String,
}

impl Snapshotter {
    fn new() -> Snapshotter {
        let dir = tempfile::Builder::new()
            .prefix("tp-snap")
            .tempdir()
            .unwrap();
        let pool = dir.path().join("pool.tp").display().to_string();
        tp(&["create", &pool, "--size", "20G"]);
        let mut s = Snapshotter {
            child: None,
            dir,
            pool,
        };
        s.start();
        s
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

    fn start(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("snapshotter.log"))
            .unwrap();
        let child = std::process::Command::new(BIN)
            .args(["snapshotter", &self.pool, "--volume-size", "1G"])
            .arg("--address")
            .arg(self.socket())
            .arg("--export-dir")
            .arg(self.export())
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.log().contains("answering containerd") {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && std::time::Instant::now() < deadline,
                "snapshotter did not start:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
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
        containerd::detach_loops_under(self.dir.path());
        containerd::unmount_under(self.dir.path());
    }
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

/// `ctr snapshots usage`: snapshot name -> bytes.
fn usage(c: &Containerd) -> std::collections::BTreeMap<String, u64> {
    let out = c.ctr_ok(&["snapshots", "--snapshotter", SNAP, "usage"]);
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
    assert_eq!(
        snap.snapshot_volumes(),
        2,
        "the container's snapshot is gone"
    );
    snap.check();

    // A second image on the same base unpacks only its own layer.
    ctrd.pull(SNAP, &other);
    assert_eq!(snap.snapshot_volumes(), 3, "{:?}", snap.volumes());
    snap.check();

    // The Docker docs' example: five containers, three write 5 bytes.
    let before = snap.data_used();
    for i in 0..5 {
        let cmd = if i < 3 {
            "printf hello > /hello && sync && sleep 600"
        } else {
            "sync && sleep 600"
        };
        ctrd.start_task(SNAP, &app, &format!("w{i}"), &["sh", "-c", cmd]);
    }
    // The writes are flushed when the task's `sync` has run.
    std::thread::sleep(std::time::Duration::from_secs(2));
    let u = usage(&ctrd);
    eprintln!("ctr snapshots usage:\n{u:#?}");
    let (w, idle): (Vec<u64>, Vec<u64>) = {
        let w = (0..3).map(|i| u[&format!("w{i}")]).collect();
        let idle = (3..5).map(|i| u[&format!("w{i}")]).collect();
        (w, idle)
    };
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
