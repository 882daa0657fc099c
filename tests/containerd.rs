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
        assert!(
            pids.len() >= 3,
            "expected containerd, a shim and the registry"
        );
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
