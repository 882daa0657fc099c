//! Crash safety with concurrent writers and group commit.
//!
//! Threads share one `SharedPool` (as the export server does) over a
//! [`CrashStorage`] that records every call, with syncs slowed down so that
//! flushes pile up and share commits. Each thread writes its own clone of a
//! base image (first writes copy shared blocks, later ones go in place) and
//! flushes often. Then the recorded log is cut at every sync, in every crash
//! mode, and at random points between syncs. Every image must:
//!
//! 1. open and pass `check()`;
//! 2. keep the base snapshot exactly as it was;
//! 3. hold, in every 512-byte sector of every thread's volume, the contents
//!    of one version of that block from the last one *flushed* before the cut
//!    (the flush had returned: its commit is durable) up to the last one whose
//!    write had started — never older, never anything else.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thinpool::io::crash::{apply, crash_image, CrashMode, IoOp, Rng};
use thinpool::io::{CrashStorage, Hooked, MemStorage, Storage};
use thinpool::{CreateOptions, Pool, SharedPool, VolumeId};

const THREADS: u64 = 3;
const SECTOR: usize = 512;

fn pattern(tag: u64, round: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new((tag + 1) << 32 ^ round);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

/// One thread's record: each block's versions (after which write, contents),
/// when each write started, and after each flush how many writes it covers.
struct History {
    id: VolumeId,
    versions: BTreeMap<u64, Vec<(usize, Vec<u8>)>>,
    write_starts: Vec<usize>,
    flushes: Vec<(usize, usize)>,
}

struct Trace {
    bs: u64,
    blocks: u64,
    base: Vec<u8>,
    base_id: VolumeId,
    start: Vec<u8>,
    log: Vec<IoOp>,
    threads: Vec<History>,
}

fn run_threads(bs: u64, blocks: u64, rounds: u64) -> Trace {
    let st = CrashStorage::new();
    let opts = CreateOptions {
        size: blocks * bs * 8 + (4 << 20),
        block_size: bs as u32,
    };
    let mut p = Pool::create_with(
        // Syncs take a while, like a disk's.
        Box::new(Hooked::new(st.clone()).on_sync(|inner| {
            std::thread::sleep(Duration::from_micros(700));
            inner.sync()
        })),
        Path::new("c"),
        &opts,
    )
    .unwrap();
    let size = blocks * bs;
    let base = pattern(99, 0, size as usize);
    let w = p.create_volume("base-w", size).unwrap();
    p.write(w, 0, &base).unwrap();
    let base_id = p.snapshot("base-w", "base", false).unwrap();
    let ids: Vec<VolumeId> = (0..THREADS)
        .map(|t| p.snapshot("base", &format!("own{t}"), true).unwrap())
        .collect();
    st.record(true);
    let start = st.durable();
    let pool = Arc::new(SharedPool::new(p));
    let log_pos = {
        let st = st.clone();
        Arc::new(Mutex::new(move || st.log_len()))
    };
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let (pool, log_pos, base) = (pool.clone(), log_pos.clone(), base.clone());
            let id = ids[t as usize];
            std::thread::spawn(move || {
                let pos = || (log_pos.lock().unwrap())();
                let mut rng = Rng::new(t + 7);
                let mut model = base;
                let mut h = History {
                    id,
                    versions: BTreeMap::new(),
                    write_starts: Vec::new(),
                    flushes: Vec::new(),
                };
                for round in 0..rounds {
                    let at = rng.below(size - 1);
                    let len = match rng.below(3) {
                        0 => bs - at % bs, // to the end of a block
                        1 => 1 + rng.below(bs),
                        _ => 1 + rng.below(2 * bs),
                    }
                    .min(size - at);
                    let d = pattern(t, round, len as usize);
                    h.write_starts.push(pos());
                    pool.write(id, at, &d).unwrap();
                    let (a, l) = (at as usize, len as usize);
                    model[a..a + l].copy_from_slice(&d);
                    let i = h.write_starts.len();
                    for vb in at / bs..(at + len).div_ceil(bs) {
                        let b = (vb * bs) as usize..((vb + 1) * bs) as usize;
                        h.versions
                            .entry(vb)
                            .or_default()
                            .push((i, model[b].to_vec()));
                    }
                    if rng.below(3) == 0 {
                        // What an fsync of the volume does.
                        pool.flush_volume(id).unwrap();
                        h.flushes.push((pos(), i));
                    }
                }
                h
            })
        })
        .collect();
    let threads: Vec<History> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let pool = Arc::into_inner(pool).expect("threads are done");
    let stats = pool.stats();
    eprintln!("group commit: {stats:?}");
    assert!(
        stats.flushes_shared > 0,
        "flushes that met shared a commit: {stats:?}"
    );
    assert!(stats.commits + stats.data_syncs < stats.flushes);
    drop(pool.into_inner());
    Trace {
        bs,
        blocks,
        base,
        base_id,
        start,
        log: st.take_log(),
        threads,
    }
}

/// Check one crash image cut at log position `cut`.
fn verify(t: &Trace, img: Vec<u8>, cut: usize, what: &str) {
    let ctx = format!("cut at {cut} ({what})");
    let bs = t.bs as usize;
    let mut p = Pool::open_with(Box::new(MemStorage::from_bytes(img)), Path::new("c"))
        .unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{ctx}: {:?}", r.problems);
    let mut all = vec![0u8; t.base.len()];
    p.read(t.base_id, 0, &mut all).unwrap();
    assert!(all == t.base, "{ctx}: the base snapshot changed");
    for h in &t.threads {
        // Writes covered by a flush that returned before the cut are durable.
        let durable = h
            .flushes
            .iter()
            .filter(|(at, _)| *at <= cut)
            .map(|(_, n)| *n)
            .max()
            .unwrap_or(0);
        let started = h.write_starts.iter().filter(|&&s| s < cut).count();
        p.read(h.id, 0, &mut all).unwrap();
        for vb in 0..t.blocks {
            let got = &all[vb as usize * bs..(vb as usize + 1) * bs];
            let hist = h.versions.get(&vb);
            let mut allowed: Vec<&[u8]> = Vec::new();
            let older = hist.into_iter().flatten().rfind(|(i, _)| *i <= durable);
            match older {
                Some((_, v)) => allowed.push(v),
                None => allowed.push(&t.base[vb as usize * bs..(vb as usize + 1) * bs]),
            }
            allowed.extend(
                hist.into_iter()
                    .flatten()
                    .filter(|(i, _)| *i > durable && *i <= started)
                    .map(|(_, v)| v.as_slice()),
            );
            for (s, sector) in got.chunks(SECTOR).enumerate() {
                let r = s * SECTOR..(s + 1) * SECTOR;
                assert!(
                    allowed.iter().any(|v| v[r.clone()] == *sector),
                    "{ctx}: volume {} block {vb} sector {s}: not one of the {} allowed versions \
                     ({durable} writes flushed, {started} started)",
                    h.id,
                    allowed.len()
                );
            }
        }
    }
}

/// Cut the log at every sync (every mode) and at `between` random points
/// between syncs; returns the number of crash points.
fn crash_everywhere(t: &Trace, between: usize) -> usize {
    let mut rng = Rng::new(5);
    let modes = [
        CrashMode::AllLanded,
        CrashMode::NoneLanded,
        CrashMode::Sectors,
        CrashMode::TornPrefix,
    ];
    let mut durable = t.start.clone();
    let mut epoch = 0;
    let mut points = 0;
    let mut cut = |durable: &[u8], epoch: usize, at: usize, mode: CrashMode, rng: &mut Rng| {
        let img = crash_image(durable, &t.log[epoch..at], mode, rng.next_u64());
        verify(t, img, at, &format!("{mode:?}"));
        points += 1;
    };
    for (i, op) in t.log.iter().enumerate() {
        if *op != IoOp::Sync {
            continue;
        }
        for m in modes {
            cut(&durable, epoch, i, m, &mut rng);
        }
        for _ in 0..between {
            if i > epoch + 1 {
                let at = epoch + 1 + rng.below((i - epoch - 1) as u64) as usize;
                let m = modes[rng.below(4) as usize];
                cut(&durable, epoch, at, m, &mut rng);
            }
        }
        for op in &t.log[epoch..i] {
            apply(&mut durable, op);
        }
        epoch = i + 1;
    }
    cut(&durable, epoch, t.log.len(), CrashMode::Sectors, &mut rng);
    points
}

#[test]
fn concurrent_writers_and_group_commit_survive_a_crash_anywhere() {
    let t = run_threads(4096, 48, 450);
    let syncs = t.log.iter().filter(|o| **o == IoOp::Sync).count();
    let points = crash_everywhere(&t, 4);
    eprintln!("concurrent crash harness (4 KiB): {syncs} syncs, {points} crash points");
    assert!(points >= 2000, "only {points} crash points");
}

#[test]
fn concurrent_writers_and_group_commit_at_64k_blocks() {
    let t = run_threads(64 * 1024, 12, 150);
    let points = crash_everywhere(&t, 2);
    eprintln!("concurrent crash harness (64 KiB): {points} crash points");
    assert!(points >= 300, "only {points} crash points");
}
