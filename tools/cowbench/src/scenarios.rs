//! The scenarios, run the same way on every backend.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::backends::Backend;
use crate::content::BIG;
use crate::model::Samples;
use crate::util::{
    check_interrupt, drop_caches, log, ms, path_str, run, secs, timed_write_fsync, Rng,
};

pub struct Plan {
    pub runs: usize,
    pub many: usize,
    /// Containers actually created in the "many" scenario for full copy (the rest extrapolated).
    pub fullcopy_many_cap: usize,
    pub big_bytes: u64,
    pub block_size: u64,
    pub fio: bool,
    pub fio_runtime_s: u64,
    pub fio_first_ios: u64,
    /// The big file of the generated content (what every container must read back).
    pub content_big: std::path::PathBuf,
}

/// Read back windows around the written places (cold cache) and compare with
/// the image content plus the writes: figures of a system that loses data are worthless.
fn verify(file: &Path, orig: &Path, writes: &[(u64, &[u8])], big: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    drop_caches();
    let f = std::fs::File::open(file)?;
    let o = std::fs::File::open(orig)?;
    for &(off, _) in writes {
        let start = off.saturating_sub(64 << 10);
        let end = (off + (128 << 10)).min(big);
        let mut got = vec![0u8; (end - start) as usize];
        let mut want = vec![0u8; (end - start) as usize];
        f.read_exact_at(&mut got, start)?;
        o.read_exact_at(&mut want, start)?;
        for &(o2, d2) in writes {
            if o2 >= start && o2 + d2.len() as u64 <= end {
                let i = (o2 - start) as usize;
                want[i..i + d2.len()].copy_from_slice(d2);
            }
        }
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            anyhow::bail!(
                "data check failed: {} differs from the image content + writes at byte {}",
                file.display(),
                start + first as u64
            );
        }
    }
    Ok(())
}

fn space(b: &mut dyn Backend) -> Result<f64> {
    b.settle()?;
    Ok(b.space()? as f64)
}

/// Create a container, first/second/third 4 KiB writes, remove it.
fn lifecycle(b: &mut dyn Backend, p: &Plan, r: usize, s: &mut Samples) -> Result<()> {
    let name = format!("w{r}");
    let s0 = space(b)?;
    let t = Instant::now();
    b.create(&name)?;
    s.add("create_ms", "ms", ms(t.elapsed()));
    let s1 = space(b)?;
    s.add("create_space_bytes", "B", s1 - s0);
    let t = Instant::now();
    let root = b.mount(&name)?;
    s.add("mount_ms", "ms", ms(t.elapsed()));
    let big = root.join(BIG);
    let mut data = vec![0u8; 4096];
    Rng::new(r as u64 + 77).fill(&mut data);
    let sm = space(b)?;
    drop_caches();
    let mid = (p.big_bytes / 2) & !4095;
    let w1 = timed_write_fsync(&big, mid, &data)?;
    s.add("write1_ms", "ms", ms(w1));
    let sw1 = space(b)?;
    s.add("write1_space_bytes", "B", sw1 - sm);
    data[0] ^= 0xff;
    let w2 = timed_write_fsync(&big, mid, &data)?;
    s.add("write2_ms", "ms", ms(w2));
    // A first write to another place of the file (another shared block).
    let q3 = (p.big_bytes / 4 * 3 + p.block_size / 2) & !4095;
    let w3 = timed_write_fsync(&big, q3, &data)?;
    s.add("write3_ms", "ms", ms(w3));
    let sw3 = space(b)?;
    s.add("writes_space_bytes", "B", sw3 - sm);
    verify(
        &big,
        &p.content_big,
        &[(mid, &data), (q3, &data)],
        p.big_bytes,
    )?;
    b.umount(&name)?;
    let held = space(b)? - s0;
    s.add("container_space_bytes", "B", held);
    let t = Instant::now();
    b.remove(&name)?;
    s.add("remove_ms", "ms", ms(t.elapsed()));
    let s5 = space(b)?;
    s.add("remove_freed_bytes", "B", (s0 + held) - s5);
    s.add("remove_left_bytes", "B", s5 - s0);
    Ok(())
}

/// chmod of the big file in a fresh container (cold cache).
fn chmod(b: &mut dyn Backend, r: usize, s: &mut Samples) -> Result<()> {
    let name = format!("m{r}");
    b.create(&name)?;
    let root = b.mount(&name)?;
    let big = root.join(BIG);
    let s0 = space(b)?;
    drop_caches();
    let t = Instant::now();
    let c = crate::util::cstr(&big);
    // SAFETY: chmod(2) with a valid path.
    let rc = unsafe { libc::chmod(c.as_ptr(), 0o600) };
    if rc != 0 {
        anyhow::bail!("chmod: {}", std::io::Error::last_os_error());
    }
    s.add("chmod_ms", "ms", ms(t.elapsed()));
    let s1 = space(b)?;
    s.add("chmod_space_bytes", "B", s1 - s0);
    b.umount(&name)?;
    b.remove(&name)?;
    b.settle()?;
    Ok(())
}

/// Create (and then remove) many containers.
fn many(b: &mut dyn Backend, p: &Plan, r: usize, s: &mut Samples) -> Result<()> {
    let n = if b.name() == "fullcopy" {
        p.many.min(p.fullcopy_many_cap).max(1)
    } else {
        p.many
    };
    let scale = p.many as f64 / n as f64;
    let s0 = space(b)?;
    let names: Vec<String> = (0..n).map(|i| format!("r{r}c{i:03}")).collect();
    let t = Instant::now();
    for nm in &names {
        check_interrupt()?;
        b.create(nm)?;
    }
    s.add("many_create_s", "s", secs(t.elapsed()) * scale);
    let s1 = space(b)?;
    s.add("many_space_bytes", "B", (s1 - s0) * scale);
    let t = Instant::now();
    for nm in &names {
        b.remove(nm)?;
    }
    s.add("many_remove_s", "s", secs(t.elapsed()) * scale);
    let s2 = space(b)?;
    s.add("many_left_bytes", "B", (s2 - s0).max(0.0));
    if scale != 1.0 {
        s.add("many_extrapolated_from", "containers", n as f64);
    }
    Ok(())
}

/// One fio job on `file`; returns the parsed JSON and the wall time.
fn fio(file: &Path, name: &str, extra: &[String]) -> Result<(serde_json::Value, f64)> {
    let mut args: Vec<String> = vec![
        format!("--name={name}"),
        format!("--filename={}", path_str(file)?),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        "--iodepth=16".into(),
        "--numjobs=1".into(),
        "--output-format=json".into(),
        "--randrepeat=0".into(),
    ];
    args.extend(extra.iter().cloned());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let t = Instant::now();
    let out = run("fio", &a)?;
    let wall = t.elapsed().as_secs_f64();
    let start = out.find('{').context("fio printed no JSON")?;
    let v: serde_json::Value = serde_json::from_str(&out[start..]).context("fio JSON")?;
    Ok((v, wall))
}

fn fio_get(v: &serde_json::Value, dir: &str, key: &str) -> f64 {
    v["jobs"][0][dir][key].as_f64().unwrap_or(0.0)
}

fn fio_p99_ms(v: &serde_json::Value, dir: &str) -> f64 {
    v["jobs"][0][dir]["clat_ns"]["percentile"]["99.000000"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e6
}

/// fio on the big file of a fresh container: first writes to shared data,
/// a full overwrite, then steady-state random and sequential I/O.
fn fio_suite(b: &mut dyn Backend, p: &Plan, r: usize, s: &mut Samples) -> Result<()> {
    let name = format!("f{r}");
    b.create(&name)?;
    let root = b.mount(&name)?;
    let big = root.join(BIG);
    let size = format!("--size={}", p.big_bytes);
    let rt = format!("--runtime={}", p.fio_runtime_s);
    drop_caches();
    // Random 4 KiB writes, each into a different block (aligned to the block
    // size), so that every one is a first write to shared data.
    let ios = p.fio_first_ios.min(p.big_bytes / p.block_size);
    let (v, wall) = fio(
        &big,
        "first_randwrite",
        &[
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            format!("--blockalign={}", p.block_size),
            size.clone(),
            format!("--number_ios={ios}"),
        ],
    )?;
    s.add(
        "fio_first_randwrite_iops",
        "IOPS",
        fio_get(&v, "write", "iops"),
    );
    s.add("fio_first_randwrite_p99_ms", "ms", fio_p99_ms(&v, "write"));
    s.add("fio_first_randwrite_wall_s", "s", wall);
    check_interrupt()?;
    // Sequential 1 MiB overwrite of the whole file: CoW of full blocks.
    let (v, _) = fio(
        &big,
        "first_seqwrite",
        &["--rw=write".into(), "--bs=1M".into(), size.clone()],
    )?;
    s.add(
        "fio_first_seqwrite_mibs",
        "MiB/s",
        fio_get(&v, "write", "bw") / 1024.0,
    );
    check_interrupt()?;
    let steady = |rw: &str, bs: &str| -> Vec<String> {
        vec![
            format!("--rw={rw}"),
            format!("--bs={bs}"),
            size.clone(),
            "--time_based".into(),
            rt.clone(),
        ]
    };
    let (v, _) = fio(&big, "randwrite", &steady("randwrite", "4k"))?;
    s.add("fio_randwrite_iops", "IOPS", fio_get(&v, "write", "iops"));
    s.add("fio_randwrite_p99_ms", "ms", fio_p99_ms(&v, "write"));
    check_interrupt()?;
    let (v, _) = fio(&big, "randread", &steady("randread", "4k"))?;
    s.add("fio_randread_iops", "IOPS", fio_get(&v, "read", "iops"));
    s.add("fio_randread_p99_ms", "ms", fio_p99_ms(&v, "read"));
    check_interrupt()?;
    let (v, _) = fio(&big, "seqread", &steady("read", "1M"))?;
    s.add(
        "fio_seqread_mibs",
        "MiB/s",
        fio_get(&v, "read", "bw") / 1024.0,
    );
    check_interrupt()?;
    let (v, _) = fio(&big, "seqwrite", &steady("write", "1M"))?;
    s.add(
        "fio_seqwrite_mibs",
        "MiB/s",
        fio_get(&v, "write", "bw") / 1024.0,
    );
    b.umount(&name)?;
    b.remove(&name)?;
    b.settle()?;
    Ok(())
}

/// Every scenario, `runs` times, collecting samples as it goes (so a failure
/// keeps the figures measured before it).
pub fn run_all(b: &mut dyn Backend, p: &Plan, s: &mut Samples) -> Result<()> {
    for r in 0..p.runs {
        check_interrupt()?;
        log(format!(
            "{}: run {}/{}: container lifecycle",
            b.name(),
            r + 1,
            p.runs
        ));
        lifecycle(b, p, r, s).context("container lifecycle")?;
        check_interrupt()?;
        log(format!("{}: run {}/{}: chmod", b.name(), r + 1, p.runs));
        chmod(b, r, s).context("chmod")?;
        check_interrupt()?;
        log(format!(
            "{}: run {}/{}: {} containers",
            b.name(),
            r + 1,
            p.runs,
            p.many
        ));
        many(b, p, r, s).context("many containers")?;
        if p.fio {
            check_interrupt()?;
            log(format!("{}: run {}/{}: fio", b.name(), r + 1, p.runs));
            fio_suite(b, p, r, s).context("fio")?;
        }
    }
    Ok(())
}
