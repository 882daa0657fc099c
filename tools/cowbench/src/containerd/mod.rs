//! The containerd scenario: one real two-layer Debian image (tools/build-debian-image.sh)
//! pushed to a private registry on 127.0.0.1, pulled and run by a private
//! containerd on each snapshotter in turn — thinpool's, and containerd's built-in
//! `overlayfs` and `native` — interleaved run by run, then the equal-files check.

mod cycle;
mod env;
mod files;
mod report;
mod snapshotters;
mod steps;
mod thinpool;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::model::{BackendResult, Machine, Samples, Stat, Status};
use crate::util::{check_interrupt, interrupted, log, path_str, run};
use env::Env;
use snapshotters::Snapshotter;

pub use snapshotters::ALL;

/// The tag of the two-layer image in the layout the script builds.
const TAG: &str = "app";

pub struct Opts {
    pub snapshotters: Vec<String>,
    pub runs: usize,
    /// Containers after the first one, per cycle.
    pub more: usize,
    /// An OCI layout with tag `app`; built by tools/build-debian-image.sh when absent.
    pub image: Option<PathBuf>,
    pub thinpool_bin: PathBuf,
    pub workdir: PathBuf,
    pub out: PathBuf,
    pub doc: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageInfo {
    pub description: String,
    /// Compressed size of each layer as pushed (bytes).
    pub layers: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CtrdReport {
    pub tool: String,
    pub command: String,
    pub machine: Machine,
    pub containerd: String,
    pub runc: String,
    /// `uptime` before and after the run (the machine is shared).
    pub load_before: String,
    pub load_after: String,
    pub image: ImageInfo,
    pub runs: usize,
    pub more: usize,
    pub snapshotters: Vec<BackendResult>,
    /// `ctr content fetch` of the image alone, once per run (no unpack).
    pub fetch_s: Option<Stat>,
    /// A `ctr` call that does nothing (`ctr version`), ms: in every `ctr` figure.
    pub ctr_call_ms: f64,
    /// Per thinpool snapshotter: the median time of each step of its calls.
    #[serde(default)]
    pub steps: Vec<(String, Vec<steps::Step>)>,
    pub files: Option<files::FilesCheck>,
    pub total_seconds: f64,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/build-debian-image.sh")
}

fn describe(oci: &Path) -> Result<ImageInfo> {
    let read = |p: PathBuf| -> Result<serde_json::Value> {
        let t = std::fs::read_to_string(&p).with_context(|| format!("read {}", p.display()))?;
        Ok(serde_json::from_str(&t)?)
    };
    let index = read(oci.join("index.json"))?;
    let m = index["manifests"]
        .as_array()
        .and_then(|ms| {
            ms.iter()
                .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == TAG)
        })
        .with_context(|| format!("{}: no tag {TAG}", oci.display()))?;
    let digest = m["digest"].as_str().context("manifest digest")?;
    let manifest = read(
        oci.join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:")),
    )?;
    let layers = manifest["layers"]
        .as_array()
        .context("manifest layers")?
        .iter()
        .filter_map(|l| l["size"].as_u64())
        .collect();
    Ok(ImageInfo {
        description: "Debian 12 `debootstrap --variant=minbase bookworm` as layer 1; layer 2 installs python3-minimal and sqlite3 (--no-install-recommends) and deletes /usr/share/doc, man, info and the apt lists (tools/build-debian-image.sh)".into(),
        layers,
    })
}

fn version(cmd: &str) -> String {
    run(cmd, &["--version"])
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|_| "not installed".into())
}

pub fn missing_tools() -> Option<String> {
    for t in [
        "containerd",
        "ctr",
        "runc",
        "docker-registry",
        "skopeo",
        "umoci",
        "curl",
    ] {
        if !crate::util::have_tool(t) {
            return Some(format!("{t} not installed (run tools/bench-setup.sh)"));
        }
    }
    None
}

pub fn main(o: Opts) -> Result<()> {
    if let Some(why) = missing_tools() {
        bail!("containerd scenario: {why}");
    }
    for s in &o.snapshotters {
        if !ALL.contains(&s.as_str()) {
            bail!("unknown snapshotter '{s}' (known: {})", ALL.join(","));
        }
    }
    let started = Instant::now();
    std::fs::create_dir_all(&o.workdir)?;
    let work = tempfile::Builder::new()
        .prefix("cowbench-ctrd-")
        .tempdir_in(&o.workdir)
        .context("temp dir")?;
    let oci = match &o.image {
        Some(p) => p.clone(),
        None => {
            let oci = work.path().join("image");
            log("building the Debian image (tools/build-debian-image.sh; cached)");
            run(path_str(&script())?, &[path_str(&oci)?])?;
            oci
        }
    };
    let image_info = describe(&oci)?;
    let machine = crate::machine_info(work.path());
    let load_before = run("uptime", &[])?.trim().to_string();

    // Declared before containerd, so dropped after it (its mounts come off first).
    let services = snapshotters::THINPOOL
        .iter()
        .filter(|(name, _)| o.snapshotters.iter().any(|s| s == name))
        .map(|(name, bs)| {
            thinpool::Service::start(&o.thinpool_bin, &work.path().join(name), name, bs)
        })
        .collect::<Result<Vec<_>>>()?;
    let proxies: Vec<env::Proxy> = services.iter().map(|s| s.proxy()).collect();
    let env = Env::start(work.path(), &proxies)?;
    let image = env.push(&oci, TAG, "cowbench/debian")?;
    log(format!(
        "image {image} pushed; {} layers",
        image_info.layers.len()
    ));
    let snaps: Vec<Snapshotter> = o
        .snapshotters
        .iter()
        .map(|s| match services.iter().find(|svc| svc.name == s) {
            Some(svc) => Ok(Snapshotter::Thinpool {
                name: svc.name,
                block_size: svc.block_size,
                pool: svc.pool.clone(),
                bin: svc.bin.clone(),
            }),
            None => Snapshotter::builtin(s, &env.root()),
        })
        .collect::<Result<_>>()?;

    let mut samples: Vec<Samples> = snaps.iter().map(|_| Samples::default()).collect();
    let mut failed: Vec<Option<String>> = vec![None; snaps.len()];
    let ctr_call_ms = cycle::ctr_call_ms(&env)?;
    let mut fetches = Vec::new();
    for r in 0..o.runs {
        // Interrupted: stop here, but still write what was measured.
        if interrupted() {
            break;
        }
        fetches.push(cycle::fetch_only(&env, &image)?);
        // Rotate the order run by run, so that no snapshotter always goes first.
        for k in 0..snaps.len() {
            let i = (k + r) % snaps.len();
            if failed[i].is_some() || interrupted() {
                continue;
            }
            let name = snaps[i].name();
            log(format!("{name}: run {}/{}", r + 1, o.runs));
            if let Err(e) = cycle::cycle(
                &env,
                &snaps[i],
                &image,
                &format!("r{r}"),
                o.more,
                &mut samples[i],
            ) {
                log(format!("{name}: FAILED: {e:#}"));
                failed[i] = Some(format!("{e:#}"));
                env.reset();
            }
        }
    }
    let files = if o.snapshotters.iter().any(|s| s == "overlayfs") && !interrupted() {
        log("equal-files check");
        let names: Vec<&str> = o.snapshotters.iter().map(|s| s.as_str()).collect();
        match files::check(&env, &image, &names) {
            Ok(f) => Some(f),
            Err(e) => {
                log(format!("equal-files check FAILED: {e:#}"));
                env.reset();
                None
            }
        }
    } else {
        None
    };
    drop(env);
    let steps = services
        .iter()
        .map(|svc| (svc.name.to_string(), steps::parse(&svc.log())))
        .collect();
    drop(services);
    let report = CtrdReport {
        tool: format!("cowbench {}", env!("CARGO_PKG_VERSION")),
        command: format!(
            "cowbench --containerd --snapshotters {} --runs {} --containers {}",
            o.snapshotters.join(","),
            o.runs,
            o.more
        ),
        machine,
        containerd: version("containerd"),
        runc: version("runc"),
        load_before,
        load_after: run("uptime", &[])
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        image: image_info,
        runs: o.runs,
        more: o.more,
        snapshotters: snaps
            .iter()
            .zip(samples)
            .zip(failed)
            .map(|((s, smp), f)| BackendResult {
                name: s.name().to_string(),
                status: if f.is_some() {
                    Status::Failed
                } else {
                    Status::Ok
                },
                reason: f,
                space_method: s.space_method(),
                notes: s.notes(),
                metrics: smp.stats(),
            })
            .collect(),
        fetch_s: Stat::from_samples(&fetches, "s"),
        ctr_call_ms,
        steps,
        files,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    report::write_all(&report, &o.out, o.doc.as_deref())?;
    log(format!(
        "results in {} ({:.0} s)",
        o.out.display(),
        report.total_seconds
    ));
    check_interrupt()?;
    if let Some(f) = &report.files {
        if !f.equal {
            bail!("equal-files check: the snapshotters' files differ (see the report)");
        }
    }
    Ok(())
}
