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

/// A `thinpool snapshotter` process on a pool of its own. Stopped (and its
/// export unmounted, its loop devices detached) on drop.
struct Snapshotter {
    child: Option<std::process::Child>,
    dir: tempfile::TempDir,
    pool: String,
    /// Extra `thinpool snapshotter` options (`--direct`).
    extra: &'static [&'static str],
}

impl Snapshotter {
    fn new() -> Snapshotter {
        Snapshotter::with(&[])
    }

    fn with(extra: &'static [&'static str]) -> Snapshotter {
        let dir = tempfile::Builder::new()
            .prefix("tp-snap")
            .tempdir()
            .unwrap();
        let pool = dir.path().join("pool.tp").display().to_string();
        // 4 KiB blocks: the set-up docs/CONTAINERD.md recommends.
        tp(&["create", &pool, "--size", "20G", "--block-size", "4K"]);
        let mut s = Snapshotter {
            child: None,
            dir,
            pool,
            extra,
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
            .args(self.extra)
            .arg("--address")
            .arg(self.socket())
            .arg("--export-dir")
            .arg(self.export())
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

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
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
