//! A private PostgreSQL cluster from Debian's packages: initdb into a data
//! directory, a postmaster run as the `postgres` user with its socket in a
//! private directory and no TCP listener, stopped by its PID on drop (also
//! after an error or a signal), and pgbench against it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{check_interrupt, path_str, vlog};

/// Where Debian puts PostgreSQL's programs (the newest version installed).
pub fn bin_dir() -> Option<PathBuf> {
    let mut vs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let b = e.path().join("bin");
            b.join("pgbench").is_file().then_some((v, b))
        })
        .collect();
    vs.sort();
    vs.pop().map(|(_, b)| b)
}

/// uid and gid of the `postgres` user (the postmaster refuses to run as root).
pub fn postgres_user() -> Option<(u32, u32)> {
    let name = std::ffi::CString::new("postgres").ok()?;
    // SAFETY: getpwnam with a valid C string; the result is read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null pointer returned by getpwnam.
    unsafe { Some(((*pw).pw_uid, (*pw).pw_gid)) }
}

pub fn chown(p: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", p.display()))
}

/// What one pgbench run printed.
#[derive(Debug, Clone, Default)]
pub struct PgbenchRun {
    pub tps: f64,
    pub latency_ms: f64,
    pub transactions: f64,
}

pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    uid: u32,
    gid: u32,
    log: PathBuf,
    child: Option<Child>,
}

impl Cluster {
    /// `initdb` into `data` (an empty directory it may create), as `postgres`.
    pub fn init(bin: &Path, data: &Path, sock: &Path, port: u16) -> Result<Cluster> {
        let (uid, gid) = postgres_user().context("no `postgres` user (install postgresql)")?;
        std::fs::create_dir_all(data)?;
        chown(data, uid, gid)?;
        std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        std::fs::create_dir_all(sock)?;
        chown(sock, uid, gid)?;
        let c = Cluster {
            bin: bin.to_path_buf(),
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            port,
            uid,
            gid,
            log: sock.join("postgres.log"),
            child: None,
        };
        c.run(
            "initdb",
            &[
                "-D",
                path_str(data)?,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )?;
        Ok(c)
    }

    fn cmd(&self, prog: &str) -> Command {
        let mut c = Command::new(self.bin.join(prog));
        // Rust drops the supplementary groups when root sets a uid.
        std::os::unix::process::CommandExt::uid(&mut c, self.uid);
        std::os::unix::process::CommandExt::gid(&mut c, self.gid);
        c.env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("LC_ALL", "C")
            .env("HOME", &self.sock)
            .current_dir(&self.sock)
            .stdin(Stdio::null());
        c
    }

    /// Run a PostgreSQL program as `postgres`; its stdout, or its output on failure.
    fn run(&self, prog: &str, args: &[&str]) -> Result<String> {
        check_interrupt()?;
        vlog(format!("$ {prog} {}", args.join(" ")));
        let out = self
            .cmd(prog)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {prog}"))?;
        if !out.status.success() {
            bail!(
                "{prog} {} failed ({}): {} {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn conn(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.to_string_lossy().into_owned(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    /// Start the postmaster (synchronous_commit and fsync on, the defaults,
    /// said explicitly) and wait until it accepts connections.
    pub fn start(&mut self) -> Result<()> {
        let log = std::fs::File::create(&self.log)?;
        let child = self
            .cmd("postgres")
            .arg("-D")
            .arg(&self.data)
            .arg("-k")
            .arg(&self.sock)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses="])
            .args(["-c", "synchronous_commit=on"])
            .args(["-c", "fsync=on"])
            .args(["-c", "full_page_writes=on"])
            .args(["-c", "logging_collector=off"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start postgres")?;
        self.child = Some(child);
        let t = Instant::now();
        loop {
            check_interrupt()?;
            let mut args = self.conn();
            args.truncate(4);
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            if self.run("pg_isready", &a).is_ok() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    bail!(
                        "postgres exited at start ({st}): {}",
                        std::fs::read_to_string(&self.log)
                            .unwrap_or_default()
                            .trim()
                    );
                }
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!("postgres did not accept connections within 60 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut args = self.conn();
        args.extend([
            "-X".into(),
            "-q".into(),
            "-c".into(),
            sql.into(),
            "postgres".into(),
        ]);
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        self.run("psql", &a)
    }

    /// `pgbench` with `extra` arguments; parses tps and latency when it ran transactions.
    pub fn pgbench(&self, extra: &[&str]) -> Result<PgbenchRun> {
        let mut args = self.conn();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.push("postgres".into());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = self.run("pgbench", &a)?;
        vlog(out.trim());
        Ok(parse_pgbench(&out))
    }

    /// Fast shutdown (SIGINT) by PID, then SIGKILL if it does not end in 60 s.
    pub fn stop(&mut self) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let pid = c.id() as i32;
        // SAFETY: signalling the postmaster we started.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let t = Instant::now();
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(60) {
                let _ = c.kill();
                let _ = c.wait();
                bail!("postgres (pid {pid}) did not stop within 60 s; killed");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            crate::util::log(format!("{e:#}"));
        }
    }
}

/// `tps = 1839.123 (without initial connection time)`, `latency average = 2.17 ms`,
/// `number of transactions actually processed: 36789`.
pub fn parse_pgbench(out: &str) -> PgbenchRun {
    let num = |l: &str, key: &str| -> Option<f64> {
        let rest = l.trim().strip_prefix(key)?;
        rest.split_whitespace()
            .next()?
            .split('/')
            .next()?
            .parse()
            .ok()
    };
    let mut r = PgbenchRun::default();
    for l in out.lines() {
        if let Some(v) = num(l, "tps = ") {
            r.tps = v;
        } else if let Some(v) = num(l, "latency average = ") {
            r.latency_ms = v;
        } else if let Some(v) = num(l, "number of transactions actually processed: ") {
            r.transactions = v;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_15_output() {
        let out = "pgbench (15.14 (Debian 15.14-0+deb12u1))\ntransaction type: <builtin: TPC-B (sort of)>\nscaling factor: 10\nquery mode: simple\nnumber of clients: 4\nnumber of threads: 2\nmaximum number of tries: 1\nduration: 20 s\nnumber of transactions actually processed: 36789\nnumber of failed transactions: 0 (0.000%)\nlatency average = 2.174 ms\ninitial connection time = 12.345 ms\ntps = 1839.459310 (without initial connection time)\n";
        let r = parse_pgbench(out);
        assert_eq!(r.transactions, 36789.0);
        assert!((r.latency_ms - 2.174).abs() < 1e-9);
        assert!((r.tps - 1839.45931).abs() < 1e-6);
    }
}
