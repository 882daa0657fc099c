//! The pgbench scenario (issue 11): PostgreSQL's data directory on each
//! storage target — a thinpool clone, a preallocated thinpool volume, a plain
//! loop device, qcow2 through qemu-storage-daemon, btrfs, the host's ext4 —
//! each with and without the host page cache under it, in one run. Per
//! target: the first 4 KiB write + fsync into the image's 1 GiB file (median of
//! N fresh containers), then pgbench (`-i -s 10`, `-c 4 -j 2 -T 20`), then a
//! known number of fsyncs with the flush counters read around them.

mod postgres;
mod probe;
mod report;
mod targets;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::backends::{Backend, Params};
use crate::content::{self, BIG};
use crate::model::{BackendResult, Machine, Samples, Status};
use crate::util::{check_interrupt, drop_caches, interrupted, log, ms, run, Rng};
use postgres::Cluster;
use targets::{Kind, Target};

pub use targets::ALL;

pub struct Opts {
    pub targets: Vec<String>,
    /// pgbench cycles per target.
    pub runs: usize,
    /// Fresh containers per target for the first-write figure.
    pub first_writes: usize,
    pub scale: u32,
    pub clients: u32,
    pub threads: u32,
    pub seconds: u32,
    /// fsyncs per series of the flush-counting probe.
    pub fsyncs: usize,
    pub big_bytes: u64,
    pub volume_bytes: u64,
    pub block_size: u64,
    pub thinpool_bin: PathBuf,
    pub workdir: PathBuf,
    pub out: PathBuf,
    pub doc: Option<PathBuf>,
    /// Names this run in the page ("before", "after"): its own generated section.
    pub label: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgReport {
    pub tool: String,
    pub label: String,
    pub command: String,
    pub git: String,
    pub machine: Machine,
    pub postgres: String,
    pub thinpool: String,
    pub load_before: String,
    pub load_after: String,
    pub runs: usize,
    pub first_writes: usize,
    pub scale: u32,
    pub clients: u32,
    pub threads: u32,
    pub seconds: u32,
    pub fsyncs: usize,
    pub big_bytes: u64,
    pub volume_bytes: u64,
    pub block_size: u64,
    pub targets: Vec<BackendResult>,
    pub total_seconds: f64,
}

struct Slot {
    target: &'static Target,
    backend: Option<Box<dyn Backend>>,
    samples: Samples,
    status: Status,
    reason: Option<String>,
    notes: Vec<String>,
    space_method: String,
}

impl Slot {
    fn fail(&mut self, what: &str, e: anyhow::Error) {
        log(format!("{}: FAILED ({what}): {e:#}", self.target.name));
        self.status = Status::Failed;
        self.reason = Some(format!("{what}: {e:#}"));
        // Teardown now: unmount, detach, stop its servers.
        self.backend = None;
    }
}

fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

fn uptime() -> String {
    run("uptime", &[])
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn command_line(o: &Opts) -> String {
    format!(
        "cowbench --pgbench --label {} --targets {} --runs {} --first-writes {} --pg-scale {} --pg-clients {} --pg-threads {} --pg-seconds {} --fsyncs {}",
        o.label,
        o.targets.join(","),
        o.runs,
        o.first_writes,
        o.scale,
        o.clients,
        o.threads,
        o.seconds,
        o.fsyncs
    )
}

pub fn main(o: Opts) -> Result<()> {
    for t in &o.targets {
        if targets::find(t).is_none() {
            let known: Vec<&str> = ALL.iter().map(|t| t.name).collect();
            bail!("unknown target '{t}' (known: {})", known.join(","));
        }
    }
    let pgbin = postgres::bin_dir()
        .context("PostgreSQL not found under /usr/lib/postgresql (apt-get install postgresql)")?;
    postgres::postgres_user().context("no `postgres` user (apt-get install postgresql)")?;
    let started = Instant::now();
    std::fs::create_dir_all(&o.workdir)?;
    let work = tempfile::Builder::new()
        .prefix("cowbench-pg-")
        .tempdir_in(&o.workdir)
        .context("temp dir")?;
    // The postgres user must reach the data directories below it.
    std::fs::set_permissions(
        work.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let machine = crate::machine_info(work.path());
    let load_before = uptime();
    log(format!(
        "work dir {}; generating the image content",
        work.path().display()
    ));
    let content_dir = work.path().join("content");
    content::generate(
        &content_dir,
        &content::Sizes {
            big: o.big_bytes,
            medium_count: 10,
            medium: 1 << 20,
            small_count: 300,
        },
    )?;
    let params = Params {
        volume_bytes: o.volume_bytes,
        block_size: o.block_size,
        thinpool_bin: o.thinpool_bin.clone(),
    };
    let sock = work.path().join("pgsock");
    let mut slots: Vec<Slot> = Vec::new();
    for name in &o.targets {
        let t = targets::find(name).expect("checked above");
        let mut slot = Slot {
            target: t,
            backend: None,
            samples: Samples::default(),
            status: Status::Ok,
            reason: None,
            notes: vec![t.what.to_string()],
            space_method: String::new(),
        };
        if let Some(why) = targets::unavailable(t, &params) {
            log(format!("{}: skipped: {why}", t.name));
            slot.status = Status::Skipped;
            slot.reason = Some(why);
            slots.push(slot);
            continue;
        }
        if interrupted() {
            break;
        }
        log(format!("{}: building the image", t.name));
        let tm = Instant::now();
        let made = targets::make(t, &work.path().join(t.name), &params).and_then(|mut b| {
            b.build_image(&content_dir)?;
            Ok(b)
        });
        match made {
            Ok(b) => {
                slot.samples
                    .add("image_build_s", "s", tm.elapsed().as_secs_f64());
                // The loop's notes say whether the kernel really does direct I/O.
                if t.kind == Kind::Loop {
                    slot.notes.extend(b.notes());
                }
                slot.space_method = b.space_method();
                slot.backend = Some(b);
            }
            Err(e) => slot.fail("building the image", e),
        }
        slots.push(slot);
    }

    // First writes, then pgbench: target by target within a round, the order
    // rotating each round, so that load from the rest of the machine falls on all.
    take_turns(&mut slots, o.first_writes, "first write", |b, t, i, s| {
        first_write(b, t, i, &o, s)
    });
    take_turns(&mut slots, o.runs, "pgbench", |b, t, r, s| {
        cycle(b, t, r, &pgbin, &sock, &o, s)
    });
    // Tear everything down before writing (and before the work dir goes).
    for s in slots.iter_mut().rev() {
        s.backend = None;
    }
    drop(work);
    let report = PgReport {
        tool: format!("cowbench {}", env!("CARGO_PKG_VERSION")),
        label: o.label.clone(),
        command: command_line(&o),
        git: run(
            "git",
            &[
                "-C",
                env!("CARGO_MANIFEST_DIR"),
                "log",
                "-1",
                "--format=%h %s",
            ],
        )
        .map(|s| s.trim().chars().take(100).collect())
        .unwrap_or_default(),
        machine,
        postgres: run(&pgbin.join("postgres").to_string_lossy(), &["--version"])
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        thinpool: run(&o.thinpool_bin.to_string_lossy(), &["--version"])
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        load_before,
        load_after: uptime(),
        runs: o.runs,
        first_writes: o.first_writes,
        scale: o.scale,
        clients: o.clients,
        threads: o.threads,
        seconds: o.seconds,
        fsyncs: o.fsyncs,
        big_bytes: o.big_bytes,
        volume_bytes: o.volume_bytes,
        block_size: o.block_size,
        targets: slots
            .into_iter()
            .map(|s| BackendResult {
                name: s.target.name.to_string(),
                status: s.status,
                reason: s.reason,
                space_method: s.space_method,
                notes: s.notes,
                metrics: s.samples.stats(),
            })
            .collect(),
        total_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_all(&report, &o.out, o.doc.as_deref())?;
    log(format!(
        "results in {} ({:.0} s)",
        o.out.display(),
        report.total_seconds
    ));
    check_interrupt()?;
    let failed: Vec<&str> = report
        .targets
        .iter()
        .filter(|t| t.status == Status::Failed)
        .map(|t| t.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("failed: {} (see the report)", failed.join(", "));
    }
    Ok(())
}

/// Copy-on-write targets give every container the image's file unwritten;
/// the others reuse one file system, so each round writes another place.
fn is_cow(t: &Target) -> bool {
    matches!(t.kind, Kind::ThinpoolClone | Kind::Qcow2 | Kind::Btrfs)
}

/// In a fresh container, cold cache: pwrite 4 KiB into the middle of the
/// image's big file + fsync; then the same 4 KiB again; read back and compare.
/// `rounds` rounds of `step` (named `what`) over every target still standing,
/// target by target, the order rotating each round; a failed step fails its
/// target, which then sits out the rest.
fn take_turns(
    slots: &mut [Slot],
    rounds: usize,
    what: &str,
    mut step: impl FnMut(&mut dyn Backend, &'static Target, usize, &mut Samples) -> Result<()>,
) {
    let n = slots.len();
    for i in 0..rounds {
        for k in 0..n {
            let slot = &mut slots[(k + i) % n];
            let Some(b) = slot.backend.as_mut() else {
                continue;
            };
            if interrupted() {
                break;
            }
            log(format!("{}: {what} {}/{rounds}", slot.target.name, i + 1));
            if let Err(e) = step(b.as_mut(), slot.target, i, &mut slot.samples) {
                slot.fail(what, e);
            }
        }
    }
}

fn first_write(b: &mut dyn Backend, t: &Target, i: usize, o: &Opts, s: &mut Samples) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let name = format!("fw{i}");
    b.create(&name)?;
    let root = b.mount(&name)?;
    let big = root.join(BIG);
    let mid = (o.big_bytes / 2) & !4095;
    let off = if is_cow(t) {
        mid
    } else {
        // Another block each round, never written since the image was made.
        ((mid + (i as u64 + 1) * 2 * o.block_size) % o.big_bytes) & !4095
    };
    let mut data = vec![0u8; 4096];
    Rng::new(i as u64 + 1234).fill(&mut data);
    let loopdev = targets::loop_of(&root);
    drop_caches();
    let c0 = probe::read(b, loopdev.as_deref());
    let w1 = crate::util::timed_write_fsync(&big, off, &data)?;
    s.add("first_write_ms", "ms", ms(w1));
    let c1 = probe::read(b, loopdev.as_deref());
    probe::add_ratios(s, "first_write", c0, c1, 1.0);
    data[0] ^= 0xff;
    let w2 = crate::util::timed_write_fsync(&big, off, &data)?;
    s.add("second_write_ms", "ms", ms(w2));
    drop_caches();
    let mut got = vec![0u8; 4096];
    std::fs::File::open(&big)?.read_exact_at(&mut got, off)?;
    if got != data {
        bail!("read back after the writes differs: data lost");
    }
    b.umount(&name)?;
    b.remove(&name)?;
    Ok(())
}

/// One pgbench cycle in a fresh container: initdb, start, `pgbench -i`,
/// CHECKPOINT, the timed run with the counters around it, the fsync probe,
/// stop by PID, unmount, remove.
fn cycle(
    b: &mut dyn Backend,
    t: &Target,
    r: usize,
    pgbin: &Path,
    sock: &Path,
    o: &Opts,
    s: &mut Samples,
) -> Result<()> {
    s.add("load1", "", load1());
    let name = format!("pg{r}");
    b.create(&name)?;
    let root = b.mount(&name)?;
    if let Some(d) = b.storage_o_direct() {
        s.add("storage_o_direct", "", if d { 1.0 } else { 0.0 });
    }
    let loopdev = targets::loop_of(&root);
    let data = root.join(format!("pgdata-{r}"));
    let tm = Instant::now();
    let mut cluster = Cluster::init(pgbin, &data, sock, 5432)?;
    s.add("initdb_s", "s", tm.elapsed().as_secs_f64());
    cluster.start()?;
    let tm = Instant::now();
    cluster.pgbench(&["-i", "-q", "-s", &o.scale.to_string()])?;
    s.add("pg_init_s", "s", tm.elapsed().as_secs_f64());
    // Start the timed run without a checkpoint pending from the load.
    cluster.psql("CHECKPOINT")?;
    let c0 = probe::read(b, loopdev.as_deref());
    let run = cluster.pgbench(&[
        "-c",
        &o.clients.to_string(),
        "-j",
        &o.threads.to_string(),
        "-T",
        &o.seconds.to_string(),
    ])?;
    let c1 = probe::read(b, loopdev.as_deref());
    if run.tps <= 0.0 || run.transactions <= 0.0 {
        bail!("pgbench reported no transactions");
    }
    s.add("tps", "TPS", run.tps);
    s.add("latency_ms", "ms", run.latency_ms);
    probe::add_ratios(s, "txn", c0, c1, run.transactions);
    if let Some(v) = probe::fdatasyncs_per_flush(c0, c1) {
        s.add("run_fdatasyncs_per_flush", "", v);
    }
    cluster.stop()?;
    drop(cluster);
    probe::fsyncs(b, &root, loopdev.as_deref(), o.fsyncs, s)?;
    if !is_cow(t) {
        // The file system is reused by the next cycle.
        std::fs::remove_dir_all(&data)?;
    }
    b.umount(&name)?;
    b.remove(&name)?;
    Ok(())
}
