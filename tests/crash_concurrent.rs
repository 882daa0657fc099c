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
//!
//! A served pool writes its intent log (`SharedPool` turns it on): a flush
//! is then one fdatasync of data and records, and a crash is recovered by
//! replaying the records after the last commit. A pool too small for a log
//! (the 64 KiB run without it) flushes with commits instead. With the log,
//! halves are kept small so they fill and commits restart the log, and the
//! log is also cut after every single call (every data write and every
//! record), not only at syncs.

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

/// How the pool logs: not at all (too small for a log), or with at most
/// this many records per log half.
#[derive(Clone, Copy, PartialEq)]
enum Logging {
    None,
    Records(u32),
}

fn run_threads(bs: u64, blocks: u64, rounds: u64, logging: Logging) -> Trace {
    let st = CrashStorage::new();
    let size = blocks * bs * 8 + (4 << 20);
    let opts = CreateOptions {
        // A log takes 1/256 of the pool at most, so the pool must have 512
        // blocks or more to get the smallest (a block a half). The file only
        // grows to what is used.
        size: match logging {
            Logging::None => size,
            Logging::Records(_) => size.max(1024 * bs),
        },
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
    if let Logging::Records(n) = logging {
        p.limit_log(n);
    }
    st.record(true);
    let start = st.durable();
    let pool = Arc::new(SharedPool::new(p));
    let logs = pool.read_engine().logging();
    assert_eq!(logs, logging != Logging::None, "the pool logs");
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
    if logs {
        // Flushes were log syncs, and halves filled.
        assert!(stats.log_syncs > 0 && stats.log_records > 0, "{stats:?}");
        assert!(stats.log_full_commits > 0, "{stats:?}");
    } else {
        assert_eq!(stats.log_records, 0, "{stats:?}");
    }
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

/// Check one crash image cut at log position `cut`; returns the intent
/// log records its open replayed.
fn verify(t: &Trace, img: Vec<u8>, cut: usize, what: &str) -> u64 {
    let ctx = format!("cut at {cut} ({what})");
    let bs = t.bs as usize;
    let mut p = Pool::open_with(Box::new(MemStorage::from_bytes(img)), Path::new("c"))
        .unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
    let replayed = p.log_replay().map_or(0, |r| r.records);
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
    replayed
}

/// Where the recorded log is cut.
#[derive(Clone, Copy)]
enum Cuts {
    /// At every sync (every mode) and at this many random points between
    /// two syncs.
    AtSyncs(usize),
    /// At every sync (every mode) and after every other call (each data
    /// write and log record: every pending write landed, and in a random
    /// other mode).
    AfterEveryCall,
}

/// What the cuts covered.
#[derive(Debug, Default)]
struct Covered {
    points: usize,
    /// Images whose open replayed intent log records.
    replayed_images: usize,
}

/// Cut the log as `cuts` says, and verify every image.
fn crash_everywhere(t: &Trace, cuts: Cuts) -> Covered {
    let mut rng = Rng::new(5);
    let modes = [
        CrashMode::AllLanded,
        CrashMode::NoneLanded,
        CrashMode::Sectors,
        CrashMode::TornPrefix,
    ];
    let mut durable = t.start.clone();
    let mut epoch = 0;
    let mut covered = Covered::default();
    let mut cut = |durable: &[u8], epoch: usize, at: usize, mode: CrashMode, rng: &mut Rng| {
        let img = crash_image(durable, &t.log[epoch..at], mode, rng.next_u64());
        if verify(t, img, at, &format!("{mode:?}")) > 0 {
            covered.replayed_images += 1;
        }
        covered.points += 1;
    };
    for (i, op) in t.log.iter().enumerate() {
        if *op != IoOp::Sync {
            // Right after the call before this one, which was no sync.
            if matches!(cuts, Cuts::AfterEveryCall) && i > epoch {
                cut(&durable, epoch, i, CrashMode::AllLanded, &mut rng);
                let m = modes[1 + rng.below(3) as usize];
                cut(&durable, epoch, i, m, &mut rng);
            }
            continue;
        }
        for m in modes {
            cut(&durable, epoch, i, m, &mut rng);
        }
        if let Cuts::AtSyncs(between) = cuts {
            for _ in 0..between {
                if i > epoch + 1 {
                    let at = epoch + 1 + rng.below((i - epoch - 1) as u64) as usize;
                    let m = modes[rng.below(4) as usize];
                    cut(&durable, epoch, at, m, &mut rng);
                }
            }
        }
        for op in &t.log[epoch..i] {
            apply(&mut durable, op);
        }
        epoch = i + 1;
    }
    cut(&durable, epoch, t.log.len(), CrashMode::Sectors, &mut rng);
    covered
}

#[test]
fn concurrent_writers_and_group_commit_survive_a_crash_anywhere() {
    let t = run_threads(4096, 48, 450, Logging::Records(128));
    let syncs = t.log.iter().filter(|o| **o == IoOp::Sync).count();
    let c = crash_everywhere(&t, Cuts::AtSyncs(4));
    eprintln!("concurrent crash harness (4 KiB, intent log): {syncs} syncs, {c:?}");
    assert!(c.points >= 2000, "{c:?}");
    assert!(
        c.replayed_images > 0,
        "no image was recovered by the log: {c:?}"
    );
}

/// 64 KiB blocks on a pool too small for an intent log: every flush commits.
#[test]
fn concurrent_writers_and_group_commit_at_64k_blocks() {
    let t = run_threads(64 * 1024, 12, 150, Logging::None);
    let c = crash_everywhere(&t, Cuts::AtSyncs(2));
    eprintln!("concurrent crash harness (64 KiB, no log): {c:?}");
    assert!(c.points >= 300, "{c:?}");
    assert_eq!(c.replayed_images, 0);
}

/// 64 KiB blocks with the intent log: writes acknowledged through records,
/// flushes that are log syncs, halves of 24 records (so they fill and
/// commits restart the log); cut after every call.
#[test]
fn concurrent_writers_with_the_intent_log_at_64k_blocks() {
    let t = run_threads(64 * 1024, 12, 150, Logging::Records(24));
    let c = crash_everywhere(&t, Cuts::AfterEveryCall);
    let calls = t.log.len();
    eprintln!("concurrent crash harness (64 KiB, intent log): {calls} calls, {c:?}");
    assert!(c.points >= 2 * (calls - 10), "{c:?}");
    assert!(
        c.replayed_images * 4 > c.points,
        "few images were recovered by the log: {c:?}"
    );
}
