//! cowbench: what does copy-on-write cost? thinpool (block CoW through a FUSE
//! export + loop device) against overlayfs, full copies, qcow2 overlays served
//! by qemu-storage-daemon, and btrfs snapshots, on the same image content.
//!
//! Run as root. `cowbench --quick` (small sizes, one run), `cowbench --full
//! --out docs/bench` (the committed comparison), `cowbench --containerd` (a real
//! Debian image pulled and run through containerd on thinpool's snapshotter,
//! overlayfs and native), `cowbench --pgbench --label before` (PostgreSQL's
//! pgbench and first writes on every storage target, with and without the
//! host page cache).

mod backends;
mod containerd;
mod content;
mod model;
mod pgbench;
mod report;
mod scenarios;
mod util;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use model::{BackendResult, Config, Machine, Report, Samples, Status};
use util::log;

#[derive(Parser, Debug)]
#[command(
    name = "cowbench",
    about = "Block-level CoW (thinpool) vs overlayfs, full copy, qcow2 and btrfs"
)]
struct Args {
    /// Small sizes, one run, thinpool + overlayfs + fullcopy (used by the test suite).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Full sizes (1 GiB file, 100 x 1 MiB, 10,000 small files), 3 runs, every backend.
    #[arg(long)]
    full: bool,
    /// The containerd scenario instead: a two-layer Debian image from a local registry,
    /// pulled and run on each snapshotter (default out: docs/bench/containerd).
    #[arg(long, conflicts_with_all = ["quick", "full"])]
    containerd: bool,
    /// With --containerd: comma-separated snapshotters: thinpool (pool with 4 KiB
    /// blocks), thinpool-64k (64 KiB blocks), overlayfs, native.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "thinpool,thinpool-64k,overlayfs,native"
    )]
    snapshotters: Vec<String>,
    /// With --containerd: containers run after the first one, per cycle.
    #[arg(long, default_value_t = 20)]
    containers: usize,
    /// With --containerd: an OCI layout with tag `app` (default: tools/build-debian-image.sh).
    #[arg(long)]
    image: Option<PathBuf>,
    /// The pgbench scenario instead (issue 11): PostgreSQL on thinpool, plain loop,
    /// qcow2, btrfs and the host, each with and without the host page cache, plus
    /// first 4 KiB write + fsync per target (default out: docs/bench/pgbench/LABEL).
    /// With --quick: a smoke run (small image, scale 1, 2 s, thinpool only).
    #[arg(long, conflicts_with_all = ["full", "containerd"])]
    pgbench: bool,
    /// With --pgbench: comma-separated targets (default: all; those this build or
    /// machine lacks are reported as skipped).
    #[arg(long, value_delimiter = ',')]
    targets: Option<Vec<String>>,
    /// With --pgbench: names the run ("before", "after"); its own section of the page.
    #[arg(long, default_value = "run")]
    label: String,
    /// With --pgbench: fresh containers per target for the first-write figure.
    #[arg(long)]
    first_writes: Option<usize>,
    /// With --pgbench: `pgbench -i -s N`.
    #[arg(long)]
    pg_scale: Option<u32>,
    /// With --pgbench: pgbench clients (-c).
    #[arg(long, default_value_t = 4)]
    pg_clients: u32,
    /// With --pgbench: pgbench threads (-j).
    #[arg(long, default_value_t = 2)]
    pg_threads: u32,
    /// With --pgbench: seconds of the timed pgbench run (-T).
    #[arg(long)]
    pg_seconds: Option<u32>,
    /// With --pgbench: fsyncs per series of the flush-counting probe.
    #[arg(long)]
    fsyncs: Option<usize>,
    /// Comma-separated backends: thinpool,overlayfs,fullcopy,qcow2,btrfs (default: all
    /// five), and qcow2-cached (qcow2 with cache.direct=off, through the host page cache).
    #[arg(long, value_delimiter = ',')]
    backends: Option<Vec<String>>,
    /// Output directory for results.json, results.md and the SVG plots.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Markdown page whose generated section is rewritten (default with --full: OUT/../BENCHMARKS.md).
    #[arg(long)]
    doc: Option<PathBuf>,
    /// The thinpool binary (default: target/release/thinpool, else `thinpool` on PATH).
    #[arg(long)]
    thinpool_bin: Option<PathBuf>,
    /// Runs per figure (default 3 full, 1 quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Where the temporary work directories go (must not be tmpfs to be meaningful).
    #[arg(long, default_value = "/var/tmp")]
    workdir: PathBuf,
    /// Block / cluster size for thinpool and qcow2, in bytes.
    #[arg(long, default_value_t = 65536)]
    block_size: u64,
    /// Skip the fio scenario.
    #[arg(long)]
    no_fio: bool,
    /// Seconds per steady-state fio job.
    #[arg(long)]
    fio_runtime: Option<u64>,
    /// Full copies actually made in the 100-container scenario (the rest is extrapolated).
    #[arg(long, default_value_t = 5)]
    fullcopy_cap: usize,
    /// Print every command.
    #[arg(long, short)]
    verbose: bool,
}

fn main() {
    util::install_signal_handlers();
    let args = Args::parse();
    util::set_verbose(args.verbose);
    match real_main(args) {
        Ok(()) => {}
        Err(e) => {
            eprintln!("cowbench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn default_thinpool_bin() -> PathBuf {
    for c in ["target/release/thinpool", "target/debug/thinpool"] {
        let p = Path::new(c);
        if p.is_file() {
            return p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
        }
    }
    PathBuf::from("thinpool")
}

fn real_main(args: Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("cowbench needs root (mounts, loop devices, drop_caches)");
    }
    if args.containerd {
        return containerd_main(args);
    }
    if args.pgbench {
        return pgbench_main(args);
    }
    let quick = !args.full;
    let backends: Vec<String> = match &args.backends {
        Some(b) => b
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None if quick => vec!["thinpool".into(), "overlayfs".into(), "fullcopy".into()],
        None => backends::ALL.iter().map(|s| s.to_string()).collect(),
    };
    for b in &backends {
        if !backends::ALL.contains(&b.as_str()) && !backends::EXTRA.contains(&b.as_str()) {
            bail!(
                "unknown backend '{b}' (known: {},{})",
                backends::ALL.join(","),
                backends::EXTRA.join(",")
            );
        }
    }
    let out = args.out.clone().unwrap_or_else(|| {
        if quick {
            PathBuf::from("cowbench-quick")
        } else {
            PathBuf::from("docs/bench")
        }
    });
    let doc = args
        .doc
        .clone()
        .or_else(|| (!quick).then(|| out.parent().unwrap_or(Path::new(".")).join("BENCHMARKS.md")));
    let thinpool_bin = match &args.thinpool_bin {
        Some(p) => p.canonicalize().unwrap_or_else(|_| p.clone()),
        None => default_thinpool_bin(),
    };
    let (sizes, volume_bytes) = if quick {
        (
            content::Sizes {
                big: 64 << 20,
                medium_count: 10,
                medium: 1 << 20,
                small_count: 300,
            },
            512u64 << 20,
        )
    } else {
        (
            content::Sizes {
                big: 1 << 30,
                medium_count: 100,
                medium: 1 << 20,
                small_count: 10_000,
            },
            4u64 << 30,
        )
    };
    let runs = args.runs.unwrap_or(if quick { 1 } else { 3 }).max(1);
    let fio_ok = !args.no_fio && util::have_tool("fio");
    let plan = scenarios::Plan {
        runs,
        many: if quick { 5 } else { 100 },
        fullcopy_many_cap: args.fullcopy_cap,
        big_bytes: sizes.big,
        block_size: args.block_size,
        fio: fio_ok,
        fio_runtime_s: args.fio_runtime.unwrap_or(if quick { 1 } else { 3 }),
        fio_first_ios: if quick { 512 } else { 16384 },
        content_big: PathBuf::new(),
    };
    let config = Config {
        mode: if quick { "quick".into() } else { "full".into() },
        runs,
        big_file_bytes: sizes.big,
        medium_files: sizes.medium_count,
        medium_file_bytes: sizes.medium,
        small_files: sizes.small_count,
        many_containers: plan.many,
        volume_bytes,
        block_size: args.block_size,
        fio_runtime_s: if fio_ok { plan.fio_runtime_s } else { 0 },
        fio_first_write_ios: plan.fio_first_ios,
        fullcopy_many_cap: plan.fullcopy_many_cap,
    };
    let started = Instant::now();
    std::fs::create_dir_all(&args.workdir)?;
    let work = tempfile::Builder::new()
        .prefix("cowbench-")
        .tempdir_in(&args.workdir)
        .context("temp dir")?;
    let machine = machine_info(work.path());
    log(format!(
        "work dir {}; generating image content",
        work.path().display()
    ));
    let content_dir = work.path().join("content");
    content::generate(&content_dir, &sizes)?;
    let mut plan = plan;
    plan.content_big = content_dir.join(content::BIG);

    let params = backends::Params {
        volume_bytes,
        block_size: args.block_size,
        thinpool_bin,
    };
    let mut results = Vec::new();
    for name in &backends {
        util::check_interrupt()?;
        results.push(run_backend(name, work.path(), &params, &plan));
        if util::interrupted() {
            break;
        }
    }
    drop(work);
    let report = Report {
        tool: format!("cowbench {}", env!("CARGO_PKG_VERSION")),
        machine,
        config,
        backends: results,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_all(&report, &out, doc.as_deref())?;
    log(format!(
        "results in {} ({:.0} s)",
        out.display(),
        report.total_seconds
    ));
    if util::interrupted() {
        bail!("interrupted; partial results written");
    }
    Ok(())
}

fn containerd_main(args: Args) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("docs/bench/containerd"));
    // The page two levels up (docs/bench/containerd -> docs/BENCHMARKS.md), if there is one.
    let doc = args.doc.clone().or_else(|| {
        out.parent()
            .and_then(Path::parent)
            .map(|p| p.join("BENCHMARKS.md"))
            .filter(|p| p.is_file())
    });
    containerd::main(containerd::Opts {
        snapshotters: args
            .snapshotters
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        runs: args.runs.unwrap_or(3).max(1),
        more: args.containers.max(1),
        image: args.image.clone(),
        thinpool_bin: match &args.thinpool_bin {
            Some(p) => p.canonicalize().unwrap_or_else(|_| p.clone()),
            None => default_thinpool_bin(),
        },
        workdir: args.workdir.clone(),
        out,
        doc,
    })
}

fn pgbench_main(args: Args) -> Result<()> {
    let quick = args.quick;
    let label = args.label.clone();
    if label.is_empty()
        || !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("--label: letters, digits, - and _ only");
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("docs/bench/pgbench").join(&label));
    // The page three levels up (docs/bench/pgbench/LABEL -> docs/BENCHMARKS.md), if there is one.
    let doc = args.doc.clone().or_else(|| {
        out.ancestors()
            .nth(3)
            .map(|p| p.join("BENCHMARKS.md"))
            .filter(|p| !quick && p.is_file())
    });
    let targets = match &args.targets {
        Some(t) => t
            .iter()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
        None if quick => vec!["thinpool".to_string()],
        None => pgbench::ALL.iter().map(|t| t.name.to_string()).collect(),
    };
    pgbench::main(pgbench::Opts {
        targets,
        runs: args.runs.unwrap_or(1).max(1),
        first_writes: args
            .first_writes
            .unwrap_or(if quick { 1 } else { 5 })
            .max(1),
        scale: args.pg_scale.unwrap_or(if quick { 1 } else { 10 }).max(1),
        clients: args.pg_clients.max(1),
        threads: args.pg_threads.max(1),
        seconds: args.pg_seconds.unwrap_or(if quick { 2 } else { 20 }).max(1),
        fsyncs: args.fsyncs.unwrap_or(if quick { 10 } else { 100 }).max(1),
        big_bytes: if quick { 64 << 20 } else { 1 << 30 },
        volume_bytes: if quick { 512 << 20 } else { 4 << 30 },
        block_size: args.block_size,
        thinpool_bin: match &args.thinpool_bin {
            Some(p) => p.canonicalize().unwrap_or_else(|_| p.clone()),
            None => default_thinpool_bin(),
        },
        workdir: args.workdir.clone(),
        out,
        doc,
        label,
    })
}

fn run_backend(
    name: &str,
    work: &Path,
    params: &backends::Params,
    plan: &scenarios::Plan,
) -> BackendResult {
    let mut res = BackendResult {
        name: name.to_string(),
        status: Status::Ok,
        reason: None,
        space_method: String::new(),
        notes: Vec::new(),
        metrics: BTreeMap::new(),
    };
    if let Some(why) = backends::missing(name, params) {
        log(format!("{name}: skipped: {why}"));
        res.status = Status::Skipped;
        res.reason = Some(why);
        return res;
    }
    let dir = work.join(name);
    let mut samples = Samples::default();
    let outcome = (|| -> Result<()> {
        let mut b = backends::make(name, &dir, params)?;
        res.space_method = b.space_method();
        res.notes = b.notes();
        log(format!("{name}: building the image"));
        let t = Instant::now();
        b.build_image(&work.join("content"))
            .context("building the image")?;
        samples.add("image_build_s", "s", t.elapsed().as_secs_f64());
        scenarios::run_all(b.as_mut(), plan, &mut samples)
        // `b` drops here: unmount, detach, stop daemons.
    })();
    if let Err(e) = outcome {
        log(format!("{name}: FAILED: {e:#}"));
        res.status = Status::Failed;
        res.reason = Some(format!("{e:#}"));
    }
    let _ = std::fs::remove_dir_all(&dir);
    res.metrics = samples.stats();
    res
}

fn first_line(cmd: &str, args: &[&str]) -> String {
    util::run(cmd, args)
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| "not installed".into())
}

fn machine_info(work: &Path) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let workdir_fs = util::run(
        "findmnt",
        &["-no", "FSTYPE,SOURCE", "-T", &work.to_string_lossy()],
    )
    .map(|s| s.trim().to_string())
    .unwrap_or_default();
    let mut tools = BTreeMap::new();
    tools.insert("fio".into(), first_line("fio", &["--version"]));
    tools.insert("qemu-img".into(), first_line("qemu-img", &["--version"]));
    tools.insert("btrfs-progs".into(), first_line("btrfs", &["--version"]));
    tools.insert("e2fsprogs".into(), {
        let o = std::process::Command::new("mkfs.ext4").arg("-V").output();
        o.map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
    });
    let overlay_metacopy = std::fs::read_to_string("/sys/module/overlay/parameters/metacopy")
        .unwrap_or_else(|_| "unknown".into())
        .trim()
        .to_string();
    let mut spawns = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let _ = std::process::Command::new("true").status();
        spawns.push(util::ms(t.elapsed()));
    }
    let spawn_ms = model::Stat::from_samples(&spawns, "ms")
        .map(|s| s.median)
        .unwrap_or(0.0);
    let date = util::run("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        cores,
        mem_gib: mem_kib / 1024.0 / 1024.0,
        kernel,
        workdir_fs,
        tools,
        overlay_metacopy,
        spawn_ms,
        date,
    }
}
