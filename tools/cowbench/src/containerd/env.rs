//! The project's containerd test harness (tests/support/containerd.rs: a
//! private containerd and registry, stopped by PID on drop) seen the way the
//! scenario uses it: `ctr` calls that fail with an error instead of a panic.

#[path = "../../../../tests/support/containerd.rs"]
mod harness;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};

use crate::util::{path_str, run};

pub use harness::{detach_loops_under, unmount_under, Proxy};

/// How long one `ctr` command may take.
const CTR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(900);

pub struct Env {
    // Dropped in this order: containerd (tasks, shims, mounts) before the registry.
    ctrd: harness::Containerd,
    registry: harness::Registry,
}

/// The harness reports a daemon that does not come up by panicking (it is made
/// for tests); here that becomes an error, after its guards have run.
fn unpanic<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        anyhow!("{what}: {msg}")
    })
}

impl Env {
    /// A registry and a containerd with `proxies` as proxy snapshotters. Their
    /// temp dirs go under `workdir` (not a tmpfs, so that figures mean something).
    pub fn start(workdir: &Path, proxies: &[Proxy]) -> Result<Env> {
        std::env::set_var("TMPDIR", workdir);
        let registry = unpanic("start docker-registry", harness::Registry::start)?;
        let ctrd = unpanic("start containerd", || harness::Containerd::start(proxies))?;
        Ok(Env { ctrd, registry })
    }

    /// `ctr --address A -n NS ARGS`; fails with its stderr.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        crate::util::vlog(format!("$ ctr {}", args.join(" ")));
        let out = self
            .ctr_raw(args)
            .map_err(|e| anyhow!("ctr {}: {e}", args.join(" ")))?;
        if !out.ok() {
            bail!(
                "ctr {} failed ({}): {}",
                args.join(" "),
                out.status,
                out.stderr.trim()
            );
        }
        Ok(out.stdout)
    }

    /// Like the harness's `ctr`, with a longer timeout: removing 21 full copies
    /// (native) on a loaded machine took more than the harness's 120 s.
    fn ctr_raw(&self, args: &[&str]) -> std::io::Result<harness::Output> {
        harness::run_timeout(
            std::process::Command::new("ctr")
                .arg("--address")
                .arg(&self.ctrd.address)
                .arg("-n")
                .arg(&self.ctrd.namespace)
                .args(args),
            CTR_TIMEOUT,
        )
    }

    /// containerd's root directory (the built-in snapshotters keep their data below it).
    pub fn root(&self) -> PathBuf {
        self.ctrd.dir().join("root")
    }

    /// Options `ctr run` needs to keep runc state and fifos in the temp dir.
    pub fn run_args(&self) -> Vec<String> {
        let d = self.ctrd.dir();
        vec![
            "--runc-root".into(),
            d.join("runc").to_string_lossy().into_owned(),
            "--fifo-dir".into(),
            d.join("fifo").to_string_lossy().into_owned(),
        ]
    }

    /// Push tag `tag` of the OCI layout `oci` as `name:tag`; returns the reference.
    pub fn push(&self, oci: &Path, tag: &str, name: &str) -> Result<String> {
        let r = format!("{}/{name}:{tag}", self.registry.host());
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
        if let Ok(ids) = self.ctr(&["containers", "ls", "-q"]) {
            for id in ids.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr_raw(&["task", "kill", "-s", "SIGKILL", id]);
                let _ = self.ctr_raw(&["task", "delete", "-f", id]);
                let _ = self.ctr_raw(&["containers", "rm", id]);
            }
        }
        if let Ok(refs) = self.ctr(&["images", "ls", "-q"]) {
            for r in refs.lines().filter(|l| !l.is_empty()) {
                let _ = self.ctr_raw(&["images", "rm", "--sync", r]);
            }
        }
    }
}
