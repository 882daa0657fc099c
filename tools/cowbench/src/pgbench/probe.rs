//! Counting what a container's fsync costs below it: flushes the loop device
//! received (`/sys/block/loopN/stat`) and, for thinpool, the flushes and pool
//! fdatasyncs of the served pool (`commits` of `thinpool info --json`), read
//! around a known number of fsyncs.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::backends::Backend;
use crate::model::Samples;
use crate::util::Rng;

/// Flush requests a block device completed (field 16 of `/sys/block/DEV/stat`).
pub fn device_flushes(dev: &str) -> Option<u64> {
    let name = Path::new(dev).file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/stat")).ok()?;
    s.split_whitespace().nth(15)?.parse().ok()
}

/// One reading of every counter a target has.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub loop_flushes: Option<u64>,
    pub pool_flushes: Option<u64>,
    pub pool_fdatasyncs: Option<u64>,
}

pub fn read(b: &mut dyn Backend, loopdev: Option<&str>) -> Counters {
    let pool = b.pool_counters();
    let get = |k: &str| {
        pool.as_ref()
            .and_then(|p| p.get(k))
            .and_then(|v| v.as_u64())
    };
    Counters {
        loop_flushes: loopdev.and_then(device_flushes),
        pool_flushes: get("flushes"),
        pool_fdatasyncs: get("fdatasyncs"),
    }
}

/// Record `after - before` of each counter divided by `per`, as `PREFIX_KEY`.
pub fn add_ratios(s: &mut Samples, prefix: &str, a: Counters, b: Counters, per: f64) {
    let d = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) if y >= x && per > 0.0 => Some((y - x) as f64 / per),
        _ => None,
    };
    if let Some(v) = d(a.loop_flushes, b.loop_flushes) {
        s.add(&format!("{prefix}_loop_flushes"), "", v);
    }
    if let Some(v) = d(a.pool_flushes, b.pool_flushes) {
        s.add(&format!("{prefix}_pool_flushes"), "", v);
    }
    if let Some(v) = d(a.pool_fdatasyncs, b.pool_fdatasyncs) {
        s.add(&format!("{prefix}_pool_fdatasyncs"), "", v);
    }
}

/// Pool fdatasyncs per pool flush between two readings.
pub fn fdatasyncs_per_flush(a: Counters, b: Counters) -> Option<f64> {
    let f = b.pool_flushes?.checked_sub(a.pool_flushes?)?;
    let d = b.pool_fdatasyncs?.checked_sub(a.pool_fdatasyncs?)?;
    (f > 0).then(|| d as f64 / f as f64)
}

/// `n` fsyncs of a container file, two ways, with the counters read around
/// each series: 4 KiB appends + fsync (ext4 commits its journal each time: the
/// size changes), and 4 KiB overwrites of an allocated file + fdatasync (what
/// PostgreSQL does to its preallocated WAL segments).
pub fn fsyncs(
    b: &mut dyn Backend,
    dir: &Path,
    loopdev: Option<&str>,
    n: usize,
    s: &mut Samples,
) -> Result<()> {
    let path = dir.join("fsync-probe.bin");
    let mut buf = vec![0u8; 4096];
    let mut rng = Rng::new(11);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("open {}", path.display()))?;
    // One series: n writes of fresh random bytes at 0, 4K, 8K..., each
    // followed by `sync`; its time per call and its counter ratios.
    let mut series = |name: &str, sync: fn(&std::fs::File) -> std::io::Result<()>| {
        let c0 = read(b, loopdev);
        let t = Instant::now();
        for i in 0..n {
            rng.fill(&mut buf);
            f.write_all_at(&buf, (i * 4096) as u64)?;
            sync(&f)?;
        }
        s.add(
            &format!("{name}_ms"),
            "ms",
            t.elapsed().as_secs_f64() * 1e3 / n as f64,
        );
        add_ratios(s, name, c0, read(b, loopdev), n as f64);
        anyhow::Ok(())
    };
    series("append_fsync", std::fs::File::sync_all)?;
    series("overwrite_fdatasync", std::fs::File::sync_data)?;
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(())
}
