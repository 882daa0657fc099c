//! Criterion micro-benchmarks of the engine's library API (no FUSE, no loop):
//! map lookup / read, snapshot creation on an empty volume vs one with a large
//! map, copy-on-write of a partial and of a full block, allocation.
//!
//! `cargo bench --bench engine` (set THINPOOL_BENCH_MAPPED_MIB to change the
//! size of the large map, default 1024 MiB at 4 KiB blocks = 262,144 entries).
//! Pools live in a temporary directory under $TMPDIR (default /var/tmp).

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use thinpool::{CreateOptions, Pool, VolumeId};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

struct Scratch {
    dir: tempfile::TempDir,
    n: u32,
}

impl Scratch {
    fn new() -> Scratch {
        let base = std::env::var_os("TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("thinpool-bench-")
                .tempdir_in(base)
                .expect("temp dir"),
            n: 0,
        }
    }
    fn pool(&mut self, block_size: u32, size: u64) -> Pool {
        self.n += 1;
        let p = self.dir.path().join(format!("p{}.pool", self.n));
        Pool::create(&p, &CreateOptions { size, block_size }).expect("create pool")
    }
}

/// Deterministic, incompressible bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Map `bytes` of volume `id` with full-block writes of 1 MiB (no reads needed).
fn fill(pool: &mut Pool, id: VolumeId, bytes: u64) {
    let chunk = pattern(MIB as usize, 7);
    let mut off = 0;
    while off < bytes {
        let n = (bytes - off).min(MIB) as usize;
        pool.write(id, off, &chunk[..n]).expect("fill");
        off += n as u64;
    }
    pool.commit().expect("commit");
}

fn mapped_mib() -> u64 {
    std::env::var("THINPOOL_BENCH_MAPPED_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

/// Random 4 KiB reads of a mapped volume (map lookup + pread) and of an
/// unmapped one (map lookup only, zeros).
fn bench_read(c: &mut Criterion) {
    let mut s = Scratch::new();
    let vol = 256 * MIB;
    let mut pool = s.pool(4096, 4 * GIB);
    let mapped = pool.create_volume("mapped", vol).unwrap();
    fill(&mut pool, mapped, vol);
    let empty = pool.create_volume("empty", vol).unwrap();
    let blocks = vol / 4096;
    let mut g = c.benchmark_group("read_4k");
    g.throughput(Throughput::Bytes(4096));
    let mut buf = vec![0u8; 4096];
    let mut x: u64 = 12345;
    g.bench_function("mapped_random", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((x >> 20) % blocks) * 4096;
            pool.read(mapped, off, &mut buf).unwrap();
            black_box(&buf);
        })
    });
    g.bench_function("unmapped_random", |b| {
        b.iter(|| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((x >> 20) % blocks) * 4096;
            pool.read(empty, off, &mut buf).unwrap();
            black_box(&buf);
        })
    });
    g.finish();
}

/// Snapshot creation (including its commit) of an empty volume and of one
/// whose map has `mapped_mib` MiB of 4 KiB blocks: O(1) means the same time.
fn bench_snapshot(c: &mut Criterion) {
    let mut s = Scratch::new();
    let big = mapped_mib() * MIB;
    let mut pool = s.pool(4096, big + 4 * GIB);
    let e = pool.create_volume("empty", 8 * GIB).unwrap();
    let _ = e;
    let m = pool.create_volume("mapped", big.max(8 * GIB)).unwrap();
    let t = Instant::now();
    fill(&mut pool, m, big);
    eprintln!(
        "snapshot bench: mapped {} MiB ({} map entries) in {:.1} s",
        big / MIB,
        big / 4096,
        t.elapsed().as_secs_f64()
    );
    let mut g = c.benchmark_group("snapshot");
    let mut n = 0u64;
    for (label, src) in [("empty_volume", "empty"), ("mapped_volume", "mapped")] {
        let id = BenchmarkId::new(label, if src == "empty" { 0 } else { big / MIB });
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let name = format!("s{n}");
                    let t = Instant::now();
                    pool.snapshot(src, &name, false).unwrap();
                    total += t.elapsed();
                    pool.remove_volume(&name).unwrap();
                }
                total
            })
        });
    }
    g.finish();
}

/// First write into a clone's shared 64 KiB block: a 4 KiB partial write
/// (read the old block, merge, write a new block) and a full 64 KiB write
/// (no read). Each iteration hits a block not yet written in the clone; a new
/// clone is made (untimed) when they run out. No commit in the timed part.
fn bench_cow(c: &mut Criterion) {
    let mut s = Scratch::new();
    let bs: u64 = 64 * KIB;
    let vol = 256 * MIB;
    let blocks = vol / bs;
    let mut pool = s.pool(bs as u32, 8 * GIB);
    let origin = pool.create_volume("origin", vol).unwrap();
    fill(&mut pool, origin, vol);
    let mut g = c.benchmark_group("cow_first_write");
    let mut clones = 0u64;
    for (label, len) in [("partial_4k", 4 * KIB), ("full_64k", bs)] {
        let data = pattern(len as usize, 3);
        g.throughput(Throughput::Bytes(len));
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = 0u64;
                let mut id = 0;
                let mut name = String::new();
                for _ in 0..iters {
                    if left == 0 {
                        if !name.is_empty() {
                            pool.remove_volume(&name).unwrap();
                        }
                        clones += 1;
                        name = format!("c{clones}");
                        id = pool.snapshot("origin", &name, true).unwrap();
                        left = blocks;
                    }
                    left -= 1;
                    // Spread over the volume; the middle of the block for partial writes.
                    let blk = (left * 7919) % blocks;
                    let off = blk * bs + if len < bs { bs / 2 } else { 0 };
                    let t = Instant::now();
                    pool.write(id, off, &data).unwrap();
                    total += t.elapsed();
                }
                if !name.is_empty() {
                    pool.remove_volume(&name).unwrap();
                }
                total
            })
        });
    }
    // For comparison: overwriting a block the volume already owns.
    let data = pattern(4096, 5);
    let mut i = 0u64;
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("overwrite_owned_4k", |b| {
        b.iter(|| {
            i += 1;
            let off = ((i * 7919) % blocks) * bs;
            pool.write(origin, off, &data).unwrap();
        })
    });
    g.finish();
}

/// Allocation: full-block 4 KiB writes into unmapped blocks of a thin volume
/// (allocate a block, map it, write it), in a 4 KiB-block pool.
fn bench_alloc(c: &mut Criterion) {
    let mut s = Scratch::new();
    let mut pool = s.pool(4096, 64 * GIB);
    let vol = 16 * GIB;
    let id = pool.create_volume("thin", vol).unwrap();
    let data = pattern(4096, 9);
    let mut next = 0u64;
    let mut g = c.benchmark_group("alloc");
    g.throughput(Throughput::Bytes(4096));
    g.bench_function("new_block_4k", |b| {
        b.iter(|| {
            pool.write(id, next * 4096 % vol, &data).unwrap();
            next += 1;
        })
    });
    g.finish();
    // The same with a commit every 256 blocks (what a flushing writer pays).
    let mut g = c.benchmark_group("alloc_commit");
    g.throughput(Throughput::Bytes(256 * 4096));
    g.sample_size(10);
    g.bench_function("256_blocks_then_commit", |b| {
        b.iter(|| {
            for _ in 0..256 {
                pool.write(id, next * 4096 % vol, &data).unwrap();
                next += 1;
            }
            pool.commit().unwrap();
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = engine;
    config = config();
    targets = bench_read, bench_snapshot, bench_cow, bench_alloc
}
criterion_main!(engine);
