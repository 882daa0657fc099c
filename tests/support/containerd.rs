//! A private containerd, a private OCI registry and small images for tests.
//!
//! Self-contained (std + tempfile only) so that other crates of the workspace
//! can include it with `#[path = "…/tests/support/containerd.rs"] mod containerd;`.
//!
//! - [`Containerd`]: `containerd --config` with its own root, state, sockets
//!   and namespace in a temp dir; optional proxy snapshotters. Dropping it
//!   kills tasks, shims and containerd by PID, removes the namespace's cgroups,
//!   unmounts what is mounted under its dir and removes the shims' sockets.
//! - [`Registry`]: Debian's `docker-registry` on 127.0.0.1 and a free port.
//! - [`Layout`]: OCI images built with umoci and pushed with skopeo.
//!
//! Every command runs with a timeout, so a wedged daemon fails the test
//! instead of hanging it.
#![allow(dead_code)]

use std::fs;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// How long one `ctr`/`umoci`/`skopeo` command may take.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(120);

//------------------------------------------------------------------------------
// Commands

/// What a finished command printed.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// Run `cmd` to completion or kill it after `timeout`. Output goes through
/// temp files, so a chatty child can never block on a full pipe.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> io::Result<Output> {
    let mut out = tempfile::tempfile()?;
    let mut err = tempfile::tempfile()?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(err.try_clone()?)
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start {cmd:?}: {e}")))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{cmd:?} did not finish in {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let read = |f: &mut fs::File| -> io::Result<String> {
        use std::io::Seek;
        f.seek(io::SeekFrom::Start(0))?;
        let mut s = String::new();
        f.read_to_string(&mut s)?;
        Ok(s)
    };
    Ok(Output {
        status,
        stdout: read(&mut out)?,
        stderr: read(&mut err)?,
    })
}

/// Run a command and panic with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.ok(),
        "{desc} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        out.stdout,
        out.stderr
    );
    out.stdout
}

/// `sh -euc SCRIPT` in `dir`; panics with its output on failure.
pub fn sh(script: &str, dir: &Path) -> String {
    run_ok(Command::new("sh").arg("-euc").arg(script).current_dir(dir))
}

/// Is `tool` on PATH?
pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Panic with a clear message when not root or when a tool is missing (the
/// tests need root and the tools installed by tools/install-deps.sh).
pub fn require(tools: &[&str]) {
    // Reading /proc avoids a libc dependency: uid 0 is "Uid:\t0\t...".
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0");
    assert!(
        root,
        "this test needs root (containerd, runc, loop devices)"
    );
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !have(t)).collect();
    assert!(
        missing.is_empty(),
        "missing tools {missing:?}: run tools/install-deps.sh as root"
    );
}

fn wait_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return true;
        }
        thread::sleep(Duration::from_millis(50));
    }
    ready()
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Kill a child we started and reap it.
fn stop_child(child: &mut Child, grace: Duration) {
    if child.try_wait().ok().flatten().is_some() {
        return;
    }
    kill(child.id(), "-TERM");
    if !wait_until(grace, || child.try_wait().ok().flatten().is_some()) {
        let _ = child.kill();
    }
    let _ = child.wait();
}

//------------------------------------------------------------------------------
// Mounts, loop devices, processes

fn unescape_mount(s: &str) -> String {
    // /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points at or under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mount(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Lazily unmount everything at or under `dir`.
pub fn unmount_under(dir: &Path) {
    for m in mounts_under(dir) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&m)
            .stderr(Stdio::null())
            .status();
    }
}

/// Loop devices whose backing file lies under `dir`: ("/dev/loopN", file).
pub fn loops_under(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return v;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(file) = fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let file = PathBuf::from(file.trim_end().trim_end_matches(" (deleted)"));
        if file.starts_with(dir) {
            v.push((format!("/dev/{name}"), file));
        }
    }
    v
}

/// Detach every loop device backed by a file under `dir`.
pub fn detach_loops_under(dir: &Path) {
    for (dev, _) in loops_under(dir) {
        let _ = Command::new("losetup")
            .args(["-d", &dev])
            .stderr(Stdio::null())
            .status();
    }
}

/// PIDs whose command line contains `needle` (never our own process).
pub fn pids_with_arg(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut v = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return v;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = fs::read(e.path().join("cmdline")) {
            if cmd.split(|&b| b == 0).any(|a| a == needle.as_bytes()) {
                v.push(pid);
            }
        }
    }
    v
}

pub fn alive(pid: u32) -> bool {
    // A zombie is as good as gone (PID 1 here may reap late).
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// Remove the cgroups named `name` (and all below them) in every hierarchy,
/// deepest first; processes in them must be dead already.
pub fn remove_cgroups(name: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut tops = vec![root.join(name)];
    if let Ok(entries) = fs::read_dir(root) {
        for e in entries.flatten() {
            tops.push(e.path().join(name));
        }
    }
    for top in tops {
        if top.is_dir() {
            rmdir_tree(&top);
        }
    }
}

fn rmdir_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                rmdir_tree(&e.path());
            }
        }
    }
    // A cgroup may stay busy for a moment after its last process died.
    wait_until(Duration::from_secs(2), || {
        fs::remove_dir(dir).is_ok() || !dir.exists()
    });
}

/// A free TCP port on 127.0.0.1 (free when asked; bind it soon).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

//------------------------------------------------------------------------------
// Registry

/// Debian's `docker-registry` (the OCI distribution registry) on 127.0.0.1.
pub struct Registry {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("tp-registry")
            .tempdir()
            .expect("temp dir");
        let mut last = String::new();
        // The port is free when picked; another process could take it first.
        for _ in 0..5 {
            let port = free_port();
            let conf = dir.path().join("config.yml");
            fs::write(
                &conf,
                format!(
                    "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    dir.path().join("data").display()
                ),
            )
            .expect("write registry config");
            let log = fs::File::create(dir.path().join("registry.log")).expect("log");
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .expect("cannot start docker-registry (tools/install-deps.sh installs it)");
            let up = wait_until(Duration::from_secs(20), || {
                child.try_wait().ok().flatten().is_none() && http_ok(port, "/v2/")
            });
            if up {
                return Registry {
                    child,
                    port,
                    _dir: dir,
                };
            }
            stop_child(&mut child, Duration::from_secs(2));
            last = fs::read_to_string(dir.path().join("registry.log")).unwrap_or_default();
        }
        panic!("docker-registry did not start: {last}");
    }

    /// `127.0.0.1:PORT`, the host part of image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
    }
}

/// Does `GET path` on 127.0.0.1:port answer with HTTP 200?
fn http_ok(port: u16, path: &str) -> bool {
    use std::io::Write;
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).unwrap_or(0);
    let head = String::from_utf8_lossy(&buf[..n]);
    head.starts_with("HTTP/1.") && head.split(' ').nth(1) == Some("200")
}

//------------------------------------------------------------------------------
// containerd

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A proxy snapshotter for containerd's config: `[proxy_plugins.NAME]`.
#[derive(Debug, Clone)]
pub struct Proxy {
    pub name: String,
    pub socket: PathBuf,
}

/// A private containerd (config, root, state, sockets and a namespace of its
/// own under a temp dir). Stopped with everything it started on drop.
/// Its garbage collector runs after every deletion (`deletion_threshold =
/// 1`), so a removed container's snapshot reaches the snapshotter promptly
/// rather than after 100 changes; [`Containerd::wait_for`] waits for it.
pub struct Containerd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// gRPC socket (`ctr --address`).
    pub address: PathBuf,
    /// The namespace every `ctr` call of this harness uses.
    pub namespace: String,
    /// Containers started with [`Containerd::run`] / [`Containerd::start_task`].
    containers: Vec<String>,
}

impl Containerd {
    /// Start containerd with the built-in snapshotters and `proxies`.
    pub fn start(proxies: &[Proxy]) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix("tp-ctrd")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        let namespace = format!(
            "tp{}x{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let mut conf = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\n\
             [grpc]\n  address = \"{sock}\"\n\n\
             [ttrpc]\n  address = \"{ttrpc}\"\n\n\
             [debug]\n  address = \"\"\n  level = \"info\"\n\n\
             [metrics]\n  address = \"\"\n\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n\n\
             [plugins.\"io.containerd.gc.v1.scheduler\"]\n  deletion_threshold = 1\n  \
             schedule_delay = \"0s\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            ttrpc = d.join("containerd.ttrpc.sock").display(),
            opt = d.join("opt").display(),
        );
        for p in proxies {
            conf.push_str(&format!(
                "\n[proxy_plugins.\"{}\"]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                p.name,
                p.socket.display()
            ));
        }
        fs::write(d.join("config.toml"), conf).expect("write containerd config");
        for sub in ["root", "state", "runc", "fifo", "opt"] {
            fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let log = fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start containerd (tools/install-deps.sh installs it)");
        let mut c = Containerd {
            child: Some(child),
            address: d.join("containerd.sock"),
            namespace,
            dir,
            containers: Vec::new(),
        };
        let up = wait_until(Duration::from_secs(30), || {
            c.child_alive() && c.ctr(&["version"]).is_ok_and(|o| o.ok())
        });
        assert!(up, "containerd did not start:\n{}", c.log());
        c
    }

    fn child_alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The temp dir holding config, root, state and sockets.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir().join("containerd.log")).unwrap_or_default()
    }

    /// `ctr --address A -n NS ARGS`.
    pub fn ctr(&self, args: &[&str]) -> io::Result<Output> {
        run_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .arg("-n")
                .arg(&self.namespace)
                .args(args),
            CMD_TIMEOUT,
        )
    }

    /// `ctr` in another namespace of the same containerd (the caller removes
    /// what it makes there; drop cleans only [`Containerd::namespace`]).
    pub fn ctr_ns(&self, namespace: &str, args: &[&str]) -> io::Result<Output> {
        run_timeout(
            Command::new("ctr")
                .arg("--address")
                .arg(&self.address)
                .arg("-n")
                .arg(namespace)
                .args(args),
            CMD_TIMEOUT,
        )
    }

    /// `ctr ARGS`, panicking with its output (and containerd's log tail) on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self
            .ctr(args)
            .unwrap_or_else(|e| panic!("ctr {args:?}: {e}\n{}", tail(&self.log(), 30)));
        assert!(
            out.ok(),
            "ctr {args:?} failed ({}):\nstdout: {}\nstderr: {}\ncontainerd log:\n{}",
            out.status,
            out.stdout,
            out.stderr,
            tail(&self.log(), 30)
        );
        out.stdout
    }

    /// `ctr image pull --plain-http [--snapshotter S] REF`.
    pub fn pull(&self, snapshotter: &str, reference: &str) -> String {
        self.ctr_ok(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            snapshotter,
            reference,
        ])
    }

    fn run_args(&self, snapshotter: &str) -> Vec<String> {
        let runc = self.dir().join("runc").display().to_string();
        let fifo = self.dir().join("fifo").display().to_string();
        [
            "run",
            "--snapshotter",
            snapshotter,
            "--runc-root",
            &runc,
            "--fifo-dir",
            &fifo,
        ]
        .map(str::to_string)
        .to_vec()
    }

    /// `ctr run --rm` of `cmd` in a new container `id`; returns what the
    /// command printed. The container is removed even if the command fails.
    pub fn run(&mut self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) -> Output {
        let mut args = self.run_args(snapshotter);
        args.extend(
            [&["--rm", image, id][..], cmd]
                .concat()
                .into_iter()
                .map(str::to_string),
        );
        self.containers.push(id.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ctr(&args).unwrap_or_else(|e| panic!("ctr run: {e}"));
        self.forget(id);
        out
    }

    /// Start `cmd` in a new container `id` in the background (`ctr run -d`);
    /// it stays until [`Containerd::remove_container`] or drop.
    pub fn start_task(&mut self, snapshotter: &str, image: &str, id: &str, cmd: &[&str]) {
        self.start_task_with(snapshotter, image, id, &[], cmd);
    }

    /// [`Containerd::start_task`] with more `ctr run` options (e.g. `--mount`).
    pub fn start_task_with(
        &mut self,
        snapshotter: &str,
        image: &str,
        id: &str,
        options: &[&str],
        cmd: &[&str],
    ) {
        let mut args = self.run_args(snapshotter);
        args.extend(options.iter().map(|s| s.to_string()));
        args.extend(
            [&["-d", image, id][..], cmd]
                .concat()
                .into_iter()
                .map(str::to_string),
        );
        self.containers.push(id.to_string());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.ctr_ok(&args);
    }

    /// Create container `id` (its snapshot is prepared) without starting a task.
    pub fn create_container(&mut self, snapshotter: &str, image: &str, id: &str) {
        self.containers.push(id.to_string());
        self.ctr_ok(&[
            "container",
            "create",
            "--snapshotter",
            snapshotter,
            image,
            id,
        ]);
    }

    fn forget(&mut self, id: &str) {
        self.containers.retain(|c| c != id);
    }

    /// Kill its task (if any) and delete the container with its snapshot.
    pub fn remove_container(&mut self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        // A killed task needs a moment before it can be deleted.
        wait_until(Duration::from_secs(10), || {
            self.ctr(&["task", "delete", id])
                .is_ok_and(|o| o.ok() || o.stderr.contains("not found"))
        });
        self.ctr_ok(&["container", "delete", id]);
        self.forget(id);
    }

    /// Remove every image and run containerd's garbage collection (`ctr
    /// image rm --sync` waits for it), so unreferenced snapshots are removed.
    pub fn remove_images(&self) {
        let list = self.ctr_ok(&["image", "ls", "-q"]);
        let refs: Vec<&str> = list.lines().filter(|l| !l.is_empty()).collect();
        if !refs.is_empty() {
            let mut args = vec!["image", "rm", "--sync"];
            args.extend(&refs);
            self.ctr_ok(&args);
        }
    }

    /// Poll `done` (every 50 ms, up to 30 s): garbage collection is asynchronous.
    pub fn wait_for(&self, what: &str, mut done: impl FnMut() -> bool) {
        assert!(
            wait_until(Duration::from_secs(30), &mut done),
            "timed out waiting for {what}"
        );
    }

    /// Snapshot keys/names of `snapshotter`, from `ctr snapshots ls`.
    pub fn snapshots(&self, snapshotter: &str) -> Vec<String> {
        let out = self.ctr_ok(&["snapshots", "--snapshotter", snapshotter, "ls"]);
        out.lines()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    /// Kill containerd with SIGKILL (as a crash would), leaving shims running.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Everything this containerd started, found by its socket address in
    /// the command line (runc v2 shims write no pid file in 1.6).
    fn shim_pids(&self) -> Vec<u32> {
        pids_with_arg(&self.address.display().to_string())
    }

    fn task_dir(&self) -> PathBuf {
        self.dir()
            .join("state/io.containerd.runtime.v2.task")
            .join(&self.namespace)
    }

    fn teardown(&mut self) {
        // The polite way first, while containerd runs.
        if self.child_alive() {
            let tasks = self
                .ctr(&["task", "ls", "-q"])
                .map(|o| o.stdout)
                .unwrap_or_default();
            let mut ids: Vec<String> = tasks.lines().map(str::to_string).collect();
            ids.append(&mut self.containers);
            ids.sort();
            ids.dedup();
            for id in ids.iter().filter(|i| !i.is_empty()) {
                let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
                let _ = wait_until(Duration::from_secs(5), || {
                    self.ctr(&["task", "delete", id])
                        .is_ok_and(|o| o.ok() || o.stderr.contains("not found"))
                });
                let _ = self.ctr(&["container", "delete", id]);
            }
        }
        // Then by PID: container inits, shims, containerd itself.
        let mut sockets = Vec::new();
        if let Ok(entries) = fs::read_dir(self.task_dir()) {
            for e in entries.flatten() {
                if let Some(pid) = fs::read_to_string(e.path().join("init.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<u32>().ok())
                {
                    kill(pid, "-KILL");
                }
                if let Ok(a) = fs::read_to_string(e.path().join("address")) {
                    sockets.push(a.trim().trim_start_matches("unix://").to_string());
                }
            }
        }
        let shims = self.shim_pids();
        for &pid in &shims {
            kill(pid, "-KILL");
        }
        if let Some(mut c) = self.child.take() {
            stop_child(&mut c, Duration::from_secs(10));
        }
        wait_until(Duration::from_secs(5), || shims.iter().all(|&p| !alive(p)));
        for s in sockets {
            let _ = fs::remove_file(s);
        }
        remove_cgroups(&self.namespace);
        unmount_under(self.dir.path());
        detach_loops_under(self.dir.path());
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

//------------------------------------------------------------------------------
// Images

/// An OCI image layout built with umoci. Each [`Layout::layer`] stacks one
/// layer on a tag and names the result with a new tag.
pub struct Layout {
    /// The directory holding `oci/` (the layout) and scratch bundles.
    work: PathBuf,
    seq: usize,
}

impl Layout {
    /// `umoci init` a layout under `work` (which must exist).
    pub fn init(work: &Path) -> Layout {
        sh("umoci init --layout oci", work);
        Layout {
            work: work.to_path_buf(),
            seq: 0,
        }
    }

    /// The layout's directory (for `oci:DIR:TAG` references).
    pub fn path(&self) -> PathBuf {
        self.work.join("oci")
    }

    /// Add a layer to `from` (None: an empty image) filled by `fill(rootfs)`,
    /// tagged `to`. A fresh unpack per layer: repacking one bundle twice
    /// would replace its layer instead of stacking a new one.
    pub fn layer(&mut self, from: Option<&str>, to: &str, fill: impl FnOnce(&Path)) {
        self.seq += 1;
        let bundle = format!("bundle{}", self.seq);
        let base = match from {
            Some(f) => f.to_string(),
            None => {
                sh(&format!("umoci new --image oci:{to}"), &self.work);
                to.to_string()
            }
        };
        sh(
            &format!("umoci unpack --image oci:{base} {bundle} >/dev/null"),
            &self.work,
        );
        fill(&self.work.join(&bundle).join("rootfs"));
        sh(
            &format!(
                "umoci repack --image oci:{to} {bundle} >/dev/null && \
                 umoci config --image oci:{to} --config.env PATH=/bin:/usr/bin:/sbin \
                 --config.cmd /bin/sh && rm -rf {bundle}"
            ),
            &self.work,
        );
    }

    /// Push tag `tag` to `registry` as `name:tag` (plain HTTP).
    pub fn push(&self, tag: &str, registry: &Registry, name: &str) -> String {
        let reference = format!("{}/{name}:{tag}", registry.host());
        sh(
            &format!("skopeo copy -q --dest-tls-verify=false oci:oci:{tag} docker://{reference}"),
            &self.work,
        );
        reference
    }
}

/// Fill `rootfs` with a busybox-static system: /bin/busybox and a link per
/// applet, /etc/passwd and the directories runc and ctr's default spec mount
/// on (/proc, /sys, /dev, /run), as a distribution image has them.
pub fn busybox_rootfs(rootfs: &Path) {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is not installed (tools/install-deps.sh installs it)");
    sh(
        &format!(
            "mkdir -p bin etc proc sys dev run tmp root var/tmp usr/bin
             cp {busybox} bin/busybox
             for a in $(bin/busybox --list); do [ -e bin/$a ] || ln -s busybox bin/$a; done
             echo 'root:x:0:0:root:/root:/bin/sh' > etc/passwd
             echo 'root:x:0:' > etc/group
             chmod 1777 tmp var/tmp"
        ),
        rootfs,
    );
}
