//! One timed cycle on one snapshotter, from an empty content store to an empty
//! snapshotter again: pull + unpack, the first container, N more that each write
//! a small file, their space, removal of the containers and of the image (GC).

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::env::Env;
use super::snapshotters::Snapshotter;
use crate::model::Samples;
use crate::util::{check_interrupt, drop_caches, ms, secs, sync_all};

/// What every container runs: Docker's example, 5 bytes written into its root.
const WRITE_CMD: [&str; 3] = ["sh", "-c", "printf hello > /hello.txt"];

/// The 1-minute load average (the machine is shared).
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// `ctr run` of `cmd` in a new container `id` (kept: not --rm); fails unless it exits 0.
pub fn run_container(
    env: &Env,
    snap: &str,
    image: &str,
    id: &str,
    rm: bool,
    cmd: &[&str],
) -> Result<String> {
    let extra = env.run_args();
    let mut a: Vec<&str> = vec!["run", "--snapshotter", snap];
    if rm {
        a.push("--rm");
    }
    a.extend(extra.iter().map(|s| s.as_str()));
    a.push(image);
    a.push(id);
    a.extend_from_slice(cmd);
    env.ctr(&a).with_context(|| format!("ctr run {id}"))
}

fn non_empty_lines(s: &str) -> Vec<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// The content store and the snapshotter must start empty, or the pull is not a pull.
fn ensure_clean(env: &Env, snap: &Snapshotter) -> Result<()> {
    let content = non_empty_lines(&env.ctr(&["content", "ls", "-q"])?);
    let snaps = non_empty_lines(&env.ctr(&["snapshots", "--snapshotter", snap.name(), "ls"])?);
    // `snapshots ls` prints a header line.
    if !content.is_empty() || snaps.len() > 1 {
        bail!(
            "not clean before the pull: {} blobs in the content store, {} snapshots in {}",
            content.len(),
            snaps.len().saturating_sub(1),
            snap.name()
        );
    }
    Ok(())
}

/// What containerd reports for these snapshots (`ctr snapshots usage -b`), summed.
fn usage(env: &Env, snap: &str, keys: &[String]) -> Result<u64> {
    let mut a: Vec<&str> = vec!["snapshots", "--snapshotter", snap, "usage", "-b"];
    a.extend(keys.iter().map(|s| s.as_str()));
    let out = env.ctr(&a)?;
    let mut total = 0;
    // KEY SIZE INODES, after a header line.
    for l in out.lines().skip(1) {
        if let Some(v) = l.split_whitespace().nth(1) {
            total += v
                .parse::<u64>()
                .with_context(|| format!("snapshots usage: {l}"))?;
        }
    }
    Ok(total)
}

/// Fetch the image's blobs alone (no unpack; the same work for every
/// snapshotter), then delete them again. Returns the fetch time in seconds.
pub fn fetch_only(env: &Env, image: &str) -> Result<f64> {
    drop_caches();
    let t = Instant::now();
    env.ctr(&["content", "fetch", "--plain-http", image])
        .context("content fetch")?;
    let d = secs(t.elapsed());
    let blobs = non_empty_lines(&env.ctr(&["content", "ls", "-q"])?);
    let mut a: Vec<&str> = vec!["content", "rm"];
    a.extend(blobs.iter().map(|s| s.as_str()));
    env.ctr(&a).context("content rm")?;
    Ok(d)
}

/// Wall time of a `ctr` call that does nothing (`ctr version`): part of every
/// `ctr` figure. Median of 10, in ms.
pub fn ctr_call_ms(env: &Env) -> Result<f64> {
    let mut v = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        env.ctr(&["version"])?;
        v.push(ms(t.elapsed()));
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// One cycle; `more` containers after the first. Samples go into `s` as they are
/// measured, so a failure keeps what came before it.
pub fn cycle(
    env: &Env,
    snap: &Snapshotter,
    image: &str,
    tag: &str,
    more: usize,
    s: &mut Samples,
) -> Result<()> {
    let name = snap.name();
    ensure_clean(env, snap)?;
    s.add("load1", "", load1());
    let s0 = snap.space()? as f64;
    drop_caches();

    let t = Instant::now();
    env.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        name,
        image,
    ])
    .context("pull")?;
    s.add("pull_s", "s", secs(t.elapsed()));
    sync_all();
    s.add("pull_sync_s", "s", secs(t.elapsed()));
    let s1 = snap.space()? as f64;
    s.add("image_space_bytes", "B", s1 - s0);
    check_interrupt()?;

    let first = format!("{name}-{tag}-0");
    let t = Instant::now();
    run_container(env, name, image, &first, false, &WRITE_CMD)?;
    s.add("first_run_ms", "ms", ms(t.elapsed()));
    let s2 = snap.space()? as f64;

    let ids: Vec<String> = (1..=more).map(|i| format!("{name}-{tag}-{i}")).collect();
    let t = Instant::now();
    let mut each = Vec::new();
    for id in &ids {
        check_interrupt()?;
        let t1 = Instant::now();
        run_container(env, name, image, id, false, &WRITE_CMD)?;
        each.push(ms(t1.elapsed()));
    }
    s.add("more_run_s", "s", secs(t.elapsed()));
    // The median of the cycle's containers: one load spike does not move it.
    each.sort_by(f64::total_cmp);
    s.add("per_run_ms", "ms", each[each.len() / 2]);
    let s3 = snap.space()? as f64;
    s.add("containers_space_bytes", "B", s3 - s2);
    s.add(
        "containers_usage_bytes",
        "B",
        usage(env, name, &ids)? as f64,
    );

    let mut all: Vec<&str> = vec!["containers", "rm", &first];
    all.extend(ids.iter().map(|s| s.as_str()));
    let t = Instant::now();
    env.ctr(&all).context("remove containers")?;
    s.add("remove_containers_s", "s", secs(t.elapsed()));
    let t = Instant::now();
    env.ctr(&["image", "rm", "--sync", image])
        .context("remove image")?;
    s.add("remove_image_s", "s", secs(t.elapsed()));
    let s4 = snap.space()? as f64;
    s.add("left_bytes", "B", s4 - s0);
    ensure_clean(env, snap).context("after removing containers and image")?;
    snap.check().context("consistency check after the cycle")
}
