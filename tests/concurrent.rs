//! Real threads sharing one served pool (`SharedPool`, exactly what the FUSE
//! server uses: no test-side mutex), checked against models.
//!
//! - own writers: each writes, discards, reads back and flushes a clone of
//!   the base image (first writes copy shared blocks; later ones go in place);
//! - lane writers: each owns one quarter ("lane") of every block of one
//!   shared clone and writes only there, so partial writes to the same blocks
//!   meet: copy-on-write merges, in-place writes and reads of one block from
//!   several threads at once. The last lane is never written: it must keep
//!   the base image's bytes whatever the others did;
//! - readers: read the base snapshot (never changes) and the untouched lane;
//! - a manager: snapshots the shared clone (each snapshot's untouched lane
//!   must be the base's too), creates, writes and removes scratch clones (so
//!   blocks are freed and reused while I/O is in flight; the clones through
//!   `SharedPool::change`, annotated), lists, flushes.
//!
//! Afterwards every volume must match its model and `check` must be clean,
//! before and after a reopen. Run at 4 KiB and at the default 64 KiB blocks.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thinpool::io::crash::Rng;
use thinpool::io::{Hooked, MemStorage, Storage};
use thinpool::{CreateOptions, Pool, SharedPool, VolumeId};

const OWN: u64 = 3;
const LANES: u64 = 4; // lane LANES-1 is never written
const READERS: u64 = 2;

fn pattern(tag: u64, round: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(tag << 32 ^ round);
    (0..len).map(|_| r.next_u64() as u8).collect()
}

/// The last lane of the block at `start` of volume `id` still holds the base's bytes.
fn untouched_lane_ok(pool: &SharedPool, base: &[u8], id: VolumeId, start: u64, lane: usize) {
    let off = start as usize + (LANES as usize - 1) * lane;
    let mut buf = vec![0u8; lane];
    pool.read(id, off as u64, &mut buf).unwrap();
    assert!(
        buf == base[off..off + lane],
        "volume {id}: the untouched lane at byte {off} changed"
    );
}

struct Setup {
    bs: u64,
    blocks: u64,
    rounds: u64,
}

fn run(s: Setup) {
    let Setup { bs, blocks, rounds } = s;
    let size = blocks * bs;
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: (blocks * bs) * 24 + (8 << 20),
        block_size: bs as u32,
    };
    let mut p = Pool::create_with(Box::new(m.clone()), Path::new("mem"), &opts).unwrap();
    let base_id = p.create_volume("base-w", size).unwrap();
    let base = pattern(999, 0, size as usize);
    p.write(base_id, 0, &base).unwrap();
    p.snapshot("base-w", "base", false).unwrap();
    let own: Vec<VolumeId> = (0..OWN)
        .map(|t| p.snapshot("base", &format!("own{t}"), true).unwrap())
        .collect();
    let shared = p.snapshot("base", "shared", true).unwrap();
    let base_snap = p.lookup("base").unwrap();
    let pool = Arc::new(SharedPool::new(p));
    let base = Arc::new(base);
    let stop = Arc::new(AtomicBool::new(false));
    let lane = (bs / LANES) as usize;

    // Own writers: the model is the whole volume.
    let mut writers = Vec::new();
    for t in 0..OWN {
        let (pool, base) = (pool.clone(), base.clone());
        let id = own[t as usize];
        writers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(t + 1);
            let mut model = base.to_vec();
            for round in 0..rounds {
                let at = rng.below(size - 1);
                let len = (1 + rng.below(3 * bs)).min(size - at);
                let (a, l) = (at as usize, len as usize);
                match rng.below(10) {
                    0 => {
                        pool.discard(id, at, len).unwrap();
                        model[a..a + l].fill(0);
                    }
                    1 => pool.flush_volume(id).unwrap(),
                    _ => {
                        let d = pattern(t, round, l);
                        pool.write(id, at, &d).unwrap();
                        model[a..a + l].copy_from_slice(&d);
                    }
                }
                let (ra, rl) = (rng.below(size - 1), bs as usize);
                let rl = rl.min((size - ra) as usize);
                let mut buf = vec![0u8; rl];
                pool.read(id, ra, &mut buf).unwrap();
                assert!(
                    buf == model[ra as usize..ra as usize + rl],
                    "own{t}: read at {ra} differs from the model (round {round})"
                );
            }
            (id, model)
        }));
    }
    // Lane writers: each owns lane k of every block of `shared`.
    let mut lanes = Vec::new();
    for k in 0..LANES - 1 {
        let pool = pool.clone();
        lanes.push(std::thread::spawn(move || {
            let mut rng = Rng::new(100 + k);
            let mut model: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
            for round in 0..rounds {
                let vb = rng.below(blocks);
                let at = vb * bs + k * lane as u64;
                let d = pattern(100 + k, round, lane);
                pool.write(shared, at, &d).unwrap();
                model.insert(vb, d);
                if rng.below(8) == 0 {
                    pool.flush().unwrap();
                }
                let vb = *model
                    .keys()
                    .nth(rng.below(model.len() as u64) as usize)
                    .unwrap();
                let mut buf = vec![0u8; lane];
                pool.read(shared, vb * bs + k * lane as u64, &mut buf)
                    .unwrap();
                assert!(buf == model[&vb], "lane {k}: block {vb} lost a write");
            }
            model
        }));
    }
    // Readers: the base snapshot and the untouched lane of `shared`.
    let mut readers = Vec::new();
    for r in 0..READERS {
        let (pool, base, stop) = (pool.clone(), base.clone(), stop.clone());
        readers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(200 + r);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) || n < 20 {
                n += 1;
                let at = rng.below(size - 1);
                let len = (1 + rng.below(4 * bs)).min(size - at) as usize;
                let mut buf = vec![0u8; len];
                pool.read(base_snap, at, &mut buf).unwrap();
                assert!(
                    buf == base[at as usize..at as usize + len],
                    "base read at {at}"
                );
                let vb = rng.below(blocks);
                untouched_lane_ok(&pool, &base, shared, vb * bs, lane);
            }
        }));
    }
    // The manager: snapshots, scratch clones, list, flush.
    let manager = {
        let (pool, base, stop) = (pool.clone(), base.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng::new(300);
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) || i < 4 {
                i += 1;
                let snap = format!("snap{i}");
                pool.with(|p| p.snapshot("shared", &snap, false)).unwrap();
                let sid = pool.read_engine().lookup(&snap).unwrap();
                let vb = rng.below(blocks);
                untouched_lane_ok(&pool, &base, sid, vb * bs, lane);
                if i > 2 {
                    let old = format!("snap{}", i - 2);
                    pool.with(|p| p.remove_volume(&old)).unwrap();
                }
                // Scratch clones as the containerd snapshotter makes them:
                // staged under the engine lock, synced without it.
                let scratch = format!("scratch{i}");
                let note = i.to_le_bytes().to_vec();
                let cid = pool
                    .change(|p| p.stage_snapshot("base", &scratch, true, Some(note.clone())))
                    .unwrap();
                assert_eq!(pool.read_engine().annotation(cid), Some(&note[..]));
                let d = pattern(300, i, (2 * bs) as usize);
                let at = rng.below(blocks - 2) * bs;
                pool.write(cid, at, &d).unwrap();
                let mut back = vec![0u8; d.len()];
                pool.read(cid, at, &mut back).unwrap();
                assert!(back == d, "scratch clone reads back its write");
                pool.change(|p| p.stage_remove(&scratch)).unwrap();
                assert!(pool.list().unwrap().len() >= 4);
                pool.flush().unwrap();
            }
            2 * i // commits by `change`
        })
    };
    let own_models: Vec<(VolumeId, Vec<u8>)> =
        writers.into_iter().map(|h| h.join().unwrap()).collect();
    let lane_models: Vec<BTreeMap<u64, Vec<u8>>> =
        lanes.into_iter().map(|h| h.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    for h in readers {
        h.join().unwrap();
    }
    let changes = manager.join().unwrap();

    let verify = |read: &mut dyn FnMut(VolumeId, u64, &mut [u8])| {
        for (id, model) in &own_models {
            let mut buf = vec![0u8; size as usize];
            read(*id, 0, &mut buf);
            assert!(buf == *model, "volume {id} differs from its model");
        }
        let mut expect = base.to_vec();
        for (k, m) in lane_models.iter().enumerate() {
            for (vb, d) in m {
                let off = (*vb * bs) as usize + k * lane;
                expect[off..off + lane].copy_from_slice(d);
            }
        }
        let mut buf = vec![0u8; size as usize];
        read(shared, 0, &mut buf);
        assert!(
            buf == expect,
            "the shared clone differs from its lanes' models"
        );
    };
    verify(&mut |id, at, buf| pool.read(id, at, buf).unwrap());
    let report = pool.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let s = pool.stats();
    assert!(s.commits > 0 && s.flushes + changes >= s.commits);
    let pool = Arc::into_inner(pool).expect("threads are done");
    pool.into_inner().close().unwrap();
    let mut p = Pool::open_with(Box::new(m), Path::new("mem")).unwrap();
    verify(&mut |id, at, buf| p.read(id, at, buf).unwrap());
    let report = p.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

#[test]
fn threads_sharing_a_served_pool_at_4k_blocks() {
    run(Setup {
        bs: 4096,
        blocks: 96,
        rounds: 1500,
    });
}

#[test]
fn threads_sharing_a_served_pool_at_64k_blocks() {
    run(Setup {
        bs: 64 * 1024,
        blocks: 24,
        rounds: 600,
    });
}

/// A write that fails after planning must never have its mapping committed:
/// a commit waiting for that block's fill must not go on to make it durable
/// (the block still holds what a removed volume's data left there).
#[test]
fn a_failed_fill_is_never_committed() {
    let bs = 4096usize;
    let m = MemStorage::new();
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(1);
    let (go, go_rx) = std::sync::mpsc::channel();
    // The write of the one marked full block stops until let go, then fails
    // (a host disk that went away mid-write).
    let go_rx = std::sync::Mutex::new(go_rx);
    let st = Hooked::new(m.clone()).on_write(move |inner, buf, offset| {
        if buf.len() == bs && buf.iter().all(|&b| b == 0xEE) {
            entered_tx.send(()).unwrap();
            go_rx.lock().unwrap().recv().unwrap();
            return Err(std::io::Error::other("injected write failure"));
        }
        inner.write_at(buf, offset)
    });
    let opts = CreateOptions {
        size: 4 << 20,
        block_size: bs as u32,
    };
    let mut p = Pool::create_with(Box::new(st), Path::new("mem"), &opts).unwrap();
    let secret_vol = p.create_volume("secret", bs as u64).unwrap();
    let victim = p.create_volume("victim", 2 * bs as u64).unwrap();
    let pool = Arc::new(SharedPool::new(p));
    pool.write(victim, 0, &vec![1; bs]).unwrap(); // its map exists
                                                  // Written and discarded in one transaction: the block is free again at
                                                  // once, unpunched, and the next allocation takes it.
    pool.write(secret_vol, 0, &vec![0x5E; bs]).unwrap();
    pool.discard(secret_vol, 0, bs as u64).unwrap();
    let writer = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.write(victim, bs as u64, &vec![0xEE; bs]))
    };
    entered.recv().unwrap();
    let flusher = {
        let pool = pool.clone();
        std::thread::spawn(move || pool.flush())
    };
    // Let the flush reach the wait for the fill (it holds the engine).
    std::thread::sleep(std::time::Duration::from_millis(300));
    go.send(()).unwrap();
    assert!(writer.join().unwrap().is_err());
    let flushed = flusher.join().unwrap();
    assert!(
        flushed.is_err(),
        "the flush covering a failed write succeeded"
    );
    drop(pool);
    let mut p = Pool::open_with(Box::new(m), Path::new("mem")).unwrap();
    let mut buf = vec![0u8; bs];
    p.read(victim, bs as u64, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "the failed write's block was committed: victim reads {:#x}",
        buf[0]
    );
}

/// A pool handed to the server with changes not yet committed: the first
/// flush must make them durable, not find "nothing new".
#[test]
fn a_flush_covers_what_the_pool_had_before_it_was_shared() {
    let bs = 4096u64;
    let st = thinpool::io::CrashStorage::new();
    let opts = CreateOptions {
        size: 4 << 20,
        block_size: bs as u32,
    };
    let mut p = Pool::create_with(Box::new(st.clone()), Path::new("c"), &opts).unwrap();
    let id = p.create_volume("v", bs).unwrap();
    p.write(id, 0, &vec![0x42; bs as usize]).unwrap();
    let pool = SharedPool::new(p);
    pool.flush().unwrap();
    let durable = st.durable();
    pool.fail("simulated power cut");
    drop(pool);
    let mut p = Pool::open_with(Box::new(MemStorage::from_bytes(durable)), Path::new("c")).unwrap();
    let mut buf = vec![0u8; bs as usize];
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0x42), "flushed write lost");
}

/// The same for a change that dirtied only the annotation table.
#[test]
fn a_flush_covers_an_annotation_staged_before_the_pool_was_shared() {
    let st = thinpool::io::CrashStorage::new();
    let opts = CreateOptions {
        size: 4 << 20,
        block_size: 4096,
    };
    let mut p = Pool::create_with(Box::new(st.clone()), Path::new("c"), &opts).unwrap();
    let id = p.create_volume("v", 4096).unwrap();
    p.stage_annotation(id, Some(b"record".to_vec()), false)
        .unwrap();
    let pool = SharedPool::new(p);
    pool.flush().unwrap();
    let durable = st.durable();
    pool.fail("simulated power cut");
    drop(pool);
    let p = Pool::open_with(Box::new(MemStorage::from_bytes(durable)), Path::new("c")).unwrap();
    assert_eq!(
        p.annotation(id),
        Some(&b"record"[..]),
        "flushed annotation lost"
    );
}
