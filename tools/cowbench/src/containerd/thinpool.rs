//! thinpool's snapshotter service for the scenario: a fresh pool in the work
//! dir and `thinpool snapshotter POOL --address SOCK` in front of it. Dropped
//! after containerd: loop devices and mounts over its export are undone, then
//! the service is stopped by PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::env::{detach_loops_under, unmount_under, Proxy};
use crate::util::{kill_pid, path_str, run};

/// The pool's maximum size: sparse, it uses only what is written.
const POOL_SIZE: &str = "64G";

pub struct Service {
    /// The proxy plugin's name (`thinpool`, `thinpool-64k`).
    pub name: &'static str,
    pub block_size: &'static str,
    child: Option<Child>,
    dir: PathBuf,
    pub pool: PathBuf,
    pub socket: PathBuf,
    pub bin: PathBuf,
}

impl Service {
    /// A pool with `block_size` blocks in `dir` and its snapshotter, which
    /// prints the time of each Prepare/Commit/Remove step to its log.
    pub fn start(
        bin: &Path,
        dir: &Path,
        name: &'static str,
        block_size: &'static str,
    ) -> Result<Service> {
        std::fs::create_dir_all(dir)?;
        let pool = dir.join("containers.pool");
        let socket = dir.join("snapshotter.sock");
        let b = path_str(bin)?;
        run(
            b,
            &[
                "create",
                path_str(&pool)?,
                "--size",
                POOL_SIZE,
                "--block-size",
                block_size,
            ],
        )?;
        let log = std::fs::File::create(dir.join("snapshotter.log"))?;
        let child = Command::new(bin)
            .env("THINPOOL_SNAPSHOTTER_TRACE", "1")
            .arg("snapshotter")
            .arg(&pool)
            .arg("--address")
            .arg(&socket)
            .arg("--export-dir")
            .arg(dir.join("export"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {b} snapshotter"))?;
        let mut s = Service {
            name,
            block_size,
            child: Some(child),
            dir: dir.to_path_buf(),
            pool,
            socket,
            bin: bin.to_path_buf(),
        };
        // Ready once it says so (the first start also formats the ext4 template).
        let t = Instant::now();
        let log = dir.join("snapshotter.log");
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("answering containerd")
        {
            let exited = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || t.elapsed() > Duration::from_secs(120) {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!("thinpool snapshotter did not come up: {}", log.trim());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(s)
    }

    pub fn proxy(&self) -> Proxy {
        Proxy {
            name: self.name.into(),
            socket: self.socket.clone(),
        }
    }

    /// The snapshotter's log: its step timings (`THINPOOL_SNAPSHOTTER_TRACE`).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("snapshotter.log")).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        // What a failed run left attached over the export, before the export goes.
        unmount_under(&self.dir);
        detach_loops_under(&self.dir);
        if let Some(c) = self.child.take() {
            kill_pid(c.id() as i32);
        }
        unmount_under(&self.dir);
    }
}
