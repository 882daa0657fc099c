//! Many threads on one pool (`Arc<Mutex<Pool>>`, the way the FUSE server
//! shares it): some write their own volume, some write interleaved blocks of
//! one shared volume (so they shadow the same map nodes), one commits and
//! snapshots now and then. Afterwards every volume and snapshot must read
//! back what the threads' own models say, nothing may be allocated twice,
//! and `check()` must be clean — before and after a reopen.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use thinpool::io::crash::Rng;
use thinpool::io::MemStorage;
use thinpool::{CreateOptions, Pool};

const BS: u64 = 4096;
const OWN: u64 = 6;
const SHARED_WRITERS: u64 = 4;
const VOL_BLOCKS: u64 = 1200;
const ROUNDS: usize = 400;

fn block(tag: u64, round: usize) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    for (i, x) in b.chunks_mut(8).enumerate() {
        x.copy_from_slice(&(tag << 40 | (round as u64) << 16 | i as u64).to_le_bytes());
    }
    b
}

#[test]
fn threads_writing_own_and_shared_volumes_lose_nothing() {
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: 96 << 20,
        block_size: BS as u32,
    };
    let mut p = Pool::create_with(Box::new(m.clone()), Path::new("mem"), &opts).unwrap();
    let own: Vec<u64> = (0..OWN)
        .map(|t| {
            p.create_volume(&format!("own{t}"), VOL_BLOCKS * BS)
                .unwrap()
        })
        .collect();
    let shared = p.create_volume("shared", VOL_BLOCKS * BS).unwrap();
    let pool = Arc::new(Mutex::new(p));
    let mut handles = Vec::new();
    for t in 0..OWN + SHARED_WRITERS {
        let pool = pool.clone();
        let own = own.clone();
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(t);
            let mut model: BTreeMap<(u64, u64), Vec<u8>> = BTreeMap::new();
            for round in 0..ROUNDS {
                let (vol, vb) = if t < OWN {
                    (own[t as usize], rng.below(VOL_BLOCKS))
                } else {
                    // Interleaved: writer k owns blocks k, k+4, k+8...
                    let k = t - OWN;
                    (
                        shared,
                        k + SHARED_WRITERS * rng.below(VOL_BLOCKS / SHARED_WRITERS),
                    )
                };
                let data = block(t, round);
                // Partial writes too: they read the old block under the lock.
                let (off, len) = if rng.chance(1, 3) {
                    (8 * rng.below(BS / 16), BS / 2)
                } else {
                    (0, BS)
                };
                pool.lock()
                    .unwrap()
                    .write(vol, vb * BS + off, &data[..len as usize])
                    .unwrap();
                let e = model
                    .entry((vol, vb))
                    .or_insert_with(|| vec![0; BS as usize]);
                e[off as usize..(off + len) as usize].copy_from_slice(&data[..len as usize]);
                if rng.chance(1, 50) {
                    pool.lock().unwrap().commit().unwrap();
                }
            }
            model
        }));
    }
    // Meanwhile: snapshots of the shared volume force copy-on-write under the writers.
    for i in 0..5 {
        std::thread::sleep(std::time::Duration::from_millis(20));
        pool.lock()
            .unwrap()
            .snapshot("shared", &format!("snap{i}"), false)
            .unwrap();
    }
    let mut model = BTreeMap::new();
    for h in handles {
        model.extend(h.join().unwrap());
    }
    let mut p = Arc::try_unwrap(pool).ok().unwrap().into_inner().unwrap();
    let verify = |p: &mut Pool| {
        let r = p.check().unwrap();
        assert!(r.is_clean(), "{:#?}", r.problems);
        let mut buf = vec![0u8; BS as usize];
        for ((vol, vb), want) in &model {
            p.read(*vol, vb * BS, &mut buf).unwrap();
            assert_eq!(&buf, want, "volume {vol} block {vb}");
        }
        // Blocks no thread wrote are still unmapped.
        for &vol in own.iter().chain([&shared]) {
            let mapped = p.mapped_blocks(vol).unwrap();
            let written = model.keys().filter(|(v, _)| *v == vol).count();
            assert_eq!(mapped.len(), written, "volume {vol}");
        }
    };
    verify(&mut p);
    p.close().unwrap();
    let mut p = Pool::open_with(Box::new(m), Path::new("mem")).unwrap();
    verify(&mut p);
    // Snapshots of the shared volume hold only the shared writers' data, each
    // block only its own writer's (no block was handed to two volumes).
    let mut buf = vec![0u8; BS as usize];
    for i in 0..5 {
        let s = p.lookup(&format!("snap{i}")).unwrap();
        for vb in p.mapped_blocks(s).unwrap() {
            p.read(s, vb * BS, &mut buf).unwrap();
            for w in buf.chunks(8) {
                let t = u64::from_le_bytes(w.try_into().unwrap()) >> 40;
                assert!(
                    t == 0 || t == OWN + vb % SHARED_WRITERS,
                    "snap{i} block {vb} holds writer {t}'s data"
                );
            }
        }
    }
}

#[test]
fn second_opener_is_told_who_owns_the_pool_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pool");
    let mut p = Pool::create(
        &path,
        &CreateOptions {
            size: 64 << 20,
            block_size: BS as u32,
        },
    )
    .unwrap();
    let v = p.create_volume("v", 1 << 20).unwrap();
    p.write(v, 0, b"owner").unwrap();
    p.commit().unwrap();
    let before = std::fs::read(&path).unwrap();
    let e = Pool::open(&path)
        .err()
        .expect("second opener refused")
        .to_string();
    assert!(
        e.contains(&format!("in use by PID {}", std::process::id())),
        "{e}"
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the refused opener wrote nothing"
    );
    drop(p);
    let mut p = Pool::open(&path).unwrap();
    assert!(p.check().unwrap().is_clean());
}
