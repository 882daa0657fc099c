//! A private containerd and OCI registry for the benchmark: own config, root,
//! state, sockets and a port on 127.0.0.1, all in a temp dir; stopped by PID
//! on drop (also after an error or a signal-triggered unwind).
//!
//! TEMPORARY: replaced by the project's harness (tests/support/containerd.rs)
//! once it exists; the scenario only uses `ctr`, `root`, `push` and `run_args`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{kill_pid, path_str, run, run_quiet};

pub const NAMESPACE: &str = "cowbench";

pub struct Env {
    dir: PathBuf,
    address: String,
    registry: String,
    containerd: Option<Child>,
    registry_proc: Option<Child>,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not come up within {secs} s")
}

impl Env {
    /// Start containerd (with `proxies` as proxy snapshotter plugins: name, socket)
    /// and a registry.
    pub fn start(dir: &Path, proxies: &[(String, PathBuf)]) -> Result<Env> {
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let address = dir.join("containerd.sock").to_string_lossy().into_owned();
        let mut conf = format!(
            "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{address}\"\n[ttrpc]\n  address = \"{address}.ttrpc\"\n\
             [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{r}/opt\"\n",
            r = dir.display()
        );
        for (name, sock) in proxies {
            conf.push_str(&format!(
                "[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
                sock.display()
            ));
        }
        std::fs::write(dir.join("containerd.toml"), conf)?;
        let port = free_port()?;
        let registry = format!("127.0.0.1:{port}");
        std::fs::write(
            dir.join("registry.yml"),
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}/registry\n  delete:\n    enabled: true\nhttp:\n  addr: {registry}\n",
                dir.display()
            ),
        )?;
        let mut env = Env {
            dir: dir.clone(),
            address,
            registry,
            containerd: None,
            registry_proc: None,
        };
        let log = std::fs::File::create(dir.join("containerd.log"))?;
        env.containerd = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(dir.join("containerd.toml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start containerd")?,
        );
        let log = std::fs::File::create(dir.join("registry.log"))?;
        env.registry_proc = Some(
            Command::new("docker-registry")
                .arg("serve")
                .arg(dir.join("registry.yml"))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start docker-registry")?,
        );
        let a = env.address.clone();
        wait_for("containerd", 30, || {
            run_quiet("ctr", &["--address", &a, "version"])
        })?;
        let url = format!("http://{}/v2/", env.registry);
        wait_for("registry", 30, || {
            run_quiet("curl", &["-sf", "-o", "/dev/null", &url])
        })?;
        Ok(env)
    }

    /// `ctr --address A -n cowbench ARGS`; fails with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["--address", &self.address, "-n", NAMESPACE];
        a.extend_from_slice(args);
        run("ctr", &a)
    }

    /// containerd's root directory (the built-in snapshotters keep their data below it).
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Options `ctr run` needs to keep runc state and fifos in the temp dir.
    pub fn run_args(&self) -> Vec<String> {
        vec![
            "--runc-root".into(),
            self.dir.join("runc").to_string_lossy().into_owned(),
            "--fifo-dir".into(),
            self.dir.join("fifo").to_string_lossy().into_owned(),
        ]
    }

    /// Push tag `tag` of the OCI layout `oci` as `name:tag`; returns the reference.
    pub fn push(&self, oci: &Path, tag: &str, name: &str) -> Result<String> {
        let r = format!("{}/{name}:{tag}", self.registry);
        run(
            "skopeo",
            &[
                "copy",
                "-q",
                "--dest-tls-verify=false",
                &format!("oci:{}:{tag}", path_str(oci)?),
                &format!("docker://{r}"),
            ],
        )?;
        Ok(r)
    }

    /// Back to an empty namespace after a failure: tasks killed, containers and
    /// images removed, garbage collected.
    pub fn reset(&self) {
        let quiet = |args: &[&str]| {
            let mut a = vec!["--address", &self.address, "-n", NAMESPACE];
            a.extend_from_slice(args);
            run_quiet("ctr", &a)
        };
        if let Ok(ids) = self.ctr(&["containers", "ls", "-q"]) {
            for id in ids.lines().filter(|l| !l.is_empty()) {
                quiet(&["task", "kill", "-s", "SIGKILL", id]);
                quiet(&["task", "delete", "-f", id]);
                quiet(&["containers", "rm", id]);
            }
        }
        if let Ok(refs) = self.ctr(&["images", "ls", "-q"]) {
            for r in refs.lines().filter(|l| !l.is_empty()) {
                quiet(&["images", "rm", "--sync", r]);
            }
        }
    }

    fn teardown(&mut self) {
        self.reset();
        for c in [self.containerd.take(), self.registry_proc.take()]
            .into_iter()
            .flatten()
        {
            kill_pid(c.id() as i32);
        }
        // runc-v2 shims of this containerd (they write no pid file in 1.6).
        if let Ok(rd) = std::fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                let cmd = String::from_utf8_lossy(&cmd);
                if cmd.contains("containerd-shim") && cmd.contains(&self.address) {
                    kill_pid(pid);
                }
            }
        }
        let cg = Path::new("/sys/fs/cgroup").join(NAMESPACE);
        if let Ok(rd) = std::fs::read_dir(&cg) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
        let _ = std::fs::remove_dir(&cg);
        // Snapshot mounts left by a failed run (below the root only).
        if let Ok(mi) = std::fs::read_to_string("/proc/self/mountinfo") {
            let root = self.dir.to_string_lossy().into_owned();
            let mut mps: Vec<&str> = mi
                .lines()
                .filter_map(|l| l.split(' ').nth(4))
                .filter(|m| m.starts_with(&root))
                .collect();
            mps.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in mps {
                crate::util::umount_dir(Path::new(m));
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}
