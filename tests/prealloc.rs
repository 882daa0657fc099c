//! Preallocated volumes (`volume create --preallocate`) through the library.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thinpool::io::{Hooked, MemStorage, Storage};
use thinpool::{Error, Pool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const BS: u64 = 64 * KIB;

#[path = "support/pool.rs"]
mod pool;
use pool::{assert_clean, open_on, pool_on};

/// A pool in memory of 64 KiB blocks.
fn mem_pool(size: u64) -> (MemStorage, Pool) {
    pool::mem_pool(size, BS as u32)
}

fn no_progress() -> impl FnMut(u64, u64) {
    |_, _| {}
}

#[test]
fn every_block_is_mapped_contiguously_and_reads_zero() {
    let (m, mut p) = mem_pool(64 * MIB);
    // Old bytes where the volume's blocks will go: a thin volume's written
    // blocks, removed (their punch is best effort; zeroing is not).
    let t = p.create_volume("old", 8 * MIB).unwrap();
    p.write(t, 0, &vec![0xee; 8 * MIB as usize]).unwrap();
    let old = p.block_map(t).unwrap();
    p.remove_volume("old").unwrap();
    // A punch that did nothing: the freed blocks keep their bytes.
    for &(_, b) in &old {
        m.write_at(&vec![0xee; BS as usize], b * BS).unwrap();
    }
    let size = 10 * MIB + 100; // a partial last block
    let mut steps = Vec::new();
    let id = p
        .create_volume_preallocated("db", size, &mut |d, n| steps.push((d, n)))
        .unwrap();
    let n = size.div_ceil(BS);
    assert_eq!(steps.first(), Some(&(0, n)));
    assert_eq!(steps.last(), Some(&(n, n)));
    let map = p.block_map(id).unwrap();
    assert_eq!(map.len() as u64, n);
    assert!(
        map.iter().any(|&(_, b)| old.iter().any(|&(_, o)| o == b)),
        "the test means to reuse the old blocks"
    );
    assert!(map.iter().enumerate().all(|(i, &(v, _))| v == i as u64));
    // An empty pool: one run.
    assert!(
        map.windows(2).all(|w| w[1].1 == w[0].1 + 1),
        "not contiguous: {map:?}"
    );
    let info = p.volume_info("db").unwrap();
    assert!(info.preallocated);
    assert_eq!(info.mapped_bytes, n * BS);
    assert_eq!(info.exclusive_bytes, n * BS);
    let mut buf = vec![1u8; size as usize];
    p.read(id, 0, &mut buf).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "a preallocated volume reads zeros"
    );
    let pi = p.info().unwrap();
    assert_eq!((pi.preallocated_volumes, pi.preallocated_bytes), (1, size));
    assert_clean(&mut p);
    assert!(p.check().unwrap().notes.is_empty());
    // The flag is committed: it survives a reopen.
    p.close().unwrap();
    let mut p = open_on(m);
    assert!(p.volume_info("db").unwrap().preallocated);
    assert_eq!(p.block_map(id).unwrap(), map);
    assert_clean(&mut p);
}

#[test]
fn writes_overwrite_in_place_and_never_change_the_map() {
    let (m, mut p) = mem_pool(64 * MIB);
    let id = p
        .create_volume_preallocated("db", 4 * MIB, &mut no_progress())
        .unwrap();
    let map = p.block_map(id).unwrap();
    let used = p.info().unwrap().data_used_bytes;
    let gen = p.generation();
    let mut model = vec![0u8; 4 * MIB as usize];
    let writes: [(u64, usize, u8); 5] = [
        (0, 4096, 1),
        (BS - 100, 300, 2),
        (3 * BS, BS as usize, 3),
        // Whole zero blocks are written, not unmapped.
        (3 * BS, BS as usize, 0),
        (MIB, 2 * MIB as usize, 5),
    ];
    for (off, len, val) in writes {
        p.write(id, off, &vec![val; len]).unwrap();
        model[off as usize..off as usize + len].fill(val);
    }
    // Discards and write-zeroes zero the blocks in place.
    p.discard(id, 2 * MIB, MIB).unwrap();
    model[2 * MIB as usize..3 * MIB as usize].fill(0);
    p.write_zeroes(id, 100, 2 * BS).unwrap();
    model[100..100 + 2 * BS as usize].fill(0);
    assert_eq!(p.generation(), gen, "no write committed anything");
    assert_eq!(p.block_map(id).unwrap(), map, "the map did not change");
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    let mut buf = vec![0u8; model.len()];
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf == model);
    p.commit().unwrap();
    assert_eq!(p.block_map(id).unwrap(), map);
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    assert_clean(&mut p);
    p.close().unwrap();
    let mut p = open_on(m);
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf == model);
}

#[test]
fn after_commit_writes_touch_only_their_blocks() {
    // Count the bytes the storage is asked to write: an overwrite of a
    // committed preallocated block writes that block and nothing else
    // until the next commit.
    let m = MemStorage::new();
    let written = Arc::new(AtomicU64::new(0));
    let w = written.clone();
    let st = Hooked::new(m.clone()).on_write(move |s, buf, off| {
        w.fetch_add(buf.len() as u64, Ordering::SeqCst);
        s.write_at(buf, off)
    });
    let mut p = pool_on(st, 64 * MIB, BS as u32);
    let id = p
        .create_volume_preallocated("db", 2 * MIB, &mut no_progress())
        .unwrap();
    written.store(0, Ordering::SeqCst);
    for i in 0..8u64 {
        p.write(id, i * BS + 512, &[7u8; 4096]).unwrap();
    }
    assert_eq!(written.load(Ordering::SeqCst), 8 * 4096);
}

#[test]
fn a_snapshot_shares_the_blocks_and_copy_on_write_applies_again() {
    let (_m, mut p) = mem_pool(64 * MIB);
    let id = p
        .create_volume_preallocated("db", 2 * MIB, &mut no_progress())
        .unwrap();
    p.write(id, 0, &vec![9u8; 2 * MIB as usize]).unwrap();
    let map = p.block_map(id).unwrap();
    p.snapshot("db", "snap", false).unwrap();
    let clone = p.snapshot("db", "clone", true).unwrap();
    assert!(!p.volume_info("snap").unwrap().preallocated);
    assert!(!p.volume_info("clone").unwrap().preallocated);
    let used = p.info().unwrap().data_used_bytes;
    // The origin's write copies the shared block; the snapshot keeps its data.
    p.write(id, 10, &[1u8; 100]).unwrap();
    let after = p.block_map(id).unwrap();
    assert_ne!(after[0].1, map[0].1, "a shared block was written in place");
    assert_eq!(&after[1..], &map[1..]);
    assert_eq!(p.info().unwrap().data_used_bytes, used + BS);
    // A discard of a shared block keeps the origin mapped (a zero copy).
    p.discard(id, BS, BS).unwrap();
    assert_eq!(p.block_map(id).unwrap().len(), map.len());
    let snap = p.lookup("snap").unwrap();
    let mut buf = vec![0u8; 2 * MIB as usize];
    p.read(snap, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 9));
    p.read(id, 0, &mut buf[..BS as usize * 2]).unwrap();
    assert_eq!(&buf[..10], &[9u8; 10]);
    assert_eq!(&buf[10..110], &[1u8; 100]);
    assert!(buf[BS as usize..2 * BS as usize].iter().all(|&b| b == 0));
    // The clone is thin: a zero block unmaps there.
    p.write(clone, 0, &vec![0u8; BS as usize]).unwrap();
    assert_eq!(p.block_map(clone).unwrap().len(), map.len() - 1);
    assert_clean(&mut p);
    // Once the snapshots go, the origin writes in place again.
    p.remove_volume("snap").unwrap();
    p.remove_volume("clone").unwrap();
    let before = p.block_map(id).unwrap();
    p.write(id, 5 * BS, &[3u8; 10]).unwrap();
    assert_eq!(p.block_map(id).unwrap(), before);
    assert_clean(&mut p);
}

#[test]
fn remove_frees_every_block() {
    let (_m, mut p) = mem_pool(64 * MIB);
    let base = p.info().unwrap();
    p.create_volume_preallocated("db", 20 * MIB, &mut no_progress())
        .unwrap();
    assert!(p.info().unwrap().data_used_bytes >= 20 * MIB);
    p.remove_volume("db").unwrap();
    p.commit().unwrap();
    let now = p.info().unwrap();
    assert_eq!(now.data_used_bytes, base.data_used_bytes);
    assert_clean(&mut p);
}

#[test]
fn too_large_is_refused_and_leaves_nothing() {
    let (_m, mut p) = mem_pool(16 * MIB);
    let gen = p.generation();
    let before = p.info().unwrap();
    let e = p
        .create_volume_preallocated("db", 16 * MIB, &mut no_progress())
        .unwrap_err();
    assert!(matches!(e, Error::NotEnoughSpace(_)), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("cannot preallocate volume 'db'"), "{msg}");
    assert!(msg.contains("free blocks"), "{msg}");
    assert_eq!(p.generation(), gen);
    assert!(p.list().unwrap().is_empty());
    assert_eq!(p.info().unwrap().data_free_bytes, before.data_free_bytes);
    // What does fit still works after the refusal.
    p.create_volume_preallocated("db", 8 * MIB, &mut no_progress())
        .unwrap();
    assert_clean(&mut p);
}

#[test]
fn a_failed_zeroing_leaves_no_volume_and_no_used_block() {
    // The host cannot hold the range: ENOSPC from the zeroing.
    let m = MemStorage::new();
    let st = Hooked::new(m.clone()).on_write(|s, buf, off| {
        if off >= 4 * MIB && buf.iter().all(|&b| b == 0) && buf.len() as u64 >= BS {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        s.write_at(buf, off)
    });
    let mut p = pool_on(st, 64 * MIB, BS as u32);
    let before = p.info().unwrap();
    let e = p
        .create_volume_preallocated("db", 8 * MIB, &mut no_progress())
        .unwrap_err();
    assert!(matches!(e, Error::HostFull), "{e}");
    assert!(p.list().unwrap().is_empty());
    assert_eq!(p.info().unwrap().data_used_bytes, before.data_used_bytes);
    p.commit().unwrap();
    assert_clean(&mut p);
}

#[test]
fn growing_a_preallocated_volume_preallocates_the_new_part() {
    let (_m, mut p) = mem_pool(64 * MIB);
    let id = p
        .create_volume_preallocated("db", MIB, &mut no_progress())
        .unwrap();
    // Past one map node (fanout 8184 at 64 KiB): 1 MiB -> 16 blocks, then
    // a deeper tree would need > 8184 blocks; grow within the pool.
    p.resize_volume("db", 3 * MIB).unwrap();
    let map = p.block_map(id).unwrap();
    assert_eq!(map.len() as u64, 3 * MIB / BS);
    let mut buf = vec![1u8; 3 * MIB as usize];
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_clean(&mut p);
    // Growing beyond the free space is refused and changes nothing.
    let e = p.resize_volume("db", 200 * MIB).unwrap_err();
    assert!(matches!(e, Error::NotEnoughSpace(_)), "{e}");
    assert_eq!(p.volume_info("db").unwrap().virtual_size, 3 * MIB);
    assert_clean(&mut p);
}

#[test]
fn a_deep_map_at_4k_blocks_is_mapped_whole() {
    // 4 KiB blocks: 504 pointers a node, so 2000 blocks need two levels.
    let m = MemStorage::new();
    let mut p = pool_on(m.clone(), 16 * MIB, 4096);
    let id = p
        .create_volume_preallocated("db", 2000 * 4096, &mut no_progress())
        .unwrap();
    assert_eq!(p.block_map(id).unwrap().len(), 2000);
    p.resize_volume("db", 3000 * 4096).unwrap();
    assert_eq!(p.block_map(id).unwrap().len(), 3000);
    assert_clean(&mut p);
}

#[test]
fn growing_inside_the_last_block_takes_nothing() {
    let (_m, mut p) = mem_pool(64 * MIB);
    let id = p
        .create_volume_preallocated("db", BS + 10, &mut no_progress())
        .unwrap();
    let used = p.info().unwrap().data_used_bytes;
    p.resize_volume("db", 2 * BS).unwrap();
    assert_eq!(p.block_map(id).unwrap().len(), 2);
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    assert_clean(&mut p);
}

#[test]
fn check_notes_a_preallocated_volume_with_holes() {
    let (_m, mut p) = mem_pool(64 * MIB);
    let id = p.create_volume("v", 8 * BS).unwrap();
    p.write(id, 0, &[1u8; 100]).unwrap();
    thinpool::pool::damage::mark_preallocated(&mut p, "v").unwrap();
    let r = p.check().unwrap();
    // Not damage: the holes read as zeros.
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert!(
        r.notes
            .iter()
            .any(|n| n.contains("'v' is preallocated but 7 of its 8 blocks are unmapped")),
        "{:?}",
        r.notes
    );
}
