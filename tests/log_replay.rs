//! The intent log's replay where it meets the data path, kills, damage and I/O errors (found by review).

use std::path::Path;

use thinpool::io::{Hooked, MemStorage, Storage};
use thinpool::Pool;

const MIB: u64 = 1024 * 1024;

#[path = "support/pool.rs"]
mod pool;
use pool::{file_pool, kill, open_on, pool_on};

/// A 64 MiB pool of 4 KiB blocks on `storage`.
fn small_pool(storage: impl Storage + 'static) -> Pool {
    pool_on(storage, 64 * MIB, 4096)
}

/// A killed server loses nothing it acknowledged (docs/DESIGN.md, intent
/// log, consequence 3), also when another write's fill was still on its
/// way: write A's record is in the file but its data pwrite never ran (the
/// process died first; A was not acknowledged), write B came after it and
/// was acknowledged. The replay must keep B.
#[test]
fn a_kill_mid_fill_of_one_write_keeps_a_later_acknowledged_write() {
    let m = MemStorage::new();
    // The pwrite of a block of 0xAA never happens (the kill came first).
    let st = Hooked::new(m.clone()).on_write(|inner, buf, off| {
        if buf.len() == 4096 && buf.iter().all(|&b| b == 0xAA) {
            return Ok(());
        }
        inner.write_at(buf, off)
    });
    let mut p = small_pool(st);
    let id = p.create_volume("v", MIB).unwrap();
    p.set_logging(true);
    p.write(id, 0, &[1u8; 4096]).unwrap();
    p.flush().unwrap();
    let g = p.generation();
    // A: its record is written, its data is not.
    p.write(id, 4096, &[0xAA; 4096]).unwrap();
    // B: acknowledged after A's record.
    p.write(id, 8192, &[0xBB; 4096]).unwrap();
    kill(p);
    let mut p = open_on(m);
    assert_eq!(p.log_replay().unwrap().generation, g);
    let mut buf = vec![0u8; 3 * 4096];
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1));
    assert!(
        buf[4096..8192].iter().all(|&b| b == 0),
        "A was never written: its block reads as before"
    );
    assert!(
        buf[8192..].iter().all(|&b| b == 0xBB),
        "B was acknowledged before the kill: {:?}",
        p.log_replay()
    );
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

/// A map record of a block of zeros whose block lies past the end of the
/// file (its data write never happened: the file never grew to it) is not
/// replayed: the missing bytes read as zeros to the crc check, but a read
/// of the block fails (the file ends first).
#[test]
fn a_zero_record_past_the_end_of_the_file_is_not_replayed() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let m = MemStorage::new();
    let drop_zeros = Arc::new(AtomicBool::new(false));
    let d = drop_zeros.clone();
    let st = Hooked::new(m.clone()).on_write(move |inner, buf, off| {
        if d.load(Ordering::SeqCst) && buf.len() == 4096 && buf.iter().all(|&b| b == 0) {
            return Ok(());
        }
        inner.write_at(buf, off)
    });
    let mut p = small_pool(st);
    let id = p
        .create_volume_preallocated("p", 4 * 4096, &mut |_, _| {})
        .unwrap();
    p.write(id, 0, &[7u8; 4096]).unwrap();
    p.snapshot("p", "s", false).unwrap();
    p.set_logging(true);
    p.write(id, 4096, &[1u8; 4096]).unwrap();
    p.flush().unwrap();
    // A block of zeros to a block the snapshot shares: a copy (a record),
    // whose data write never reaches the file.
    drop_zeros.store(true, Ordering::SeqCst);
    p.write(id, 0, &[0u8; 4096]).unwrap();
    let len = m.snapshot().len() as u64;
    let b = p.block_map(id).unwrap()[0].1;
    assert!(
        (b + 1) * 4096 > len,
        "the copy lies past the end of the file"
    );
    kill(p);
    let mut p = open_on(m);
    let mut buf = vec![0u8; 2 * 4096];
    p.read(id, 0, &mut buf)
        .unwrap_or_else(|e| panic!("{e}; {:?}", p.log_replay()));
    assert!(
        buf[..4096].iter().all(|&b| b == 7),
        "the write never happened"
    );
    assert!(buf[4096..].iter().all(|&b| b == 1));
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

/// A damaged map node on the path a log record changes: the read-only
/// open (`check`, `info`, `read`) still opens the pool and reports the
/// damage, as it does without a log, instead of failing outright.
#[test]
fn a_damaged_node_under_a_log_record_leaves_the_pool_inspectable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let mut p = file_pool(&path, 64 * MIB, 4096);
    let id = p.create_volume("v", MIB).unwrap();
    let other = p.create_volume("w", MIB).unwrap();
    p.write(id, 0, &[5u8; 4096]).unwrap();
    p.write(other, 0, &[6u8; 4096]).unwrap();
    p.commit().unwrap();
    p.set_logging(true);
    p.write(id, 4096, &[9u8; 4096]).unwrap();
    p.flush().unwrap();
    kill(p);
    // Damage v's map (one leaf: its root) as committed.
    let img = std::fs::read(&path).unwrap();
    let f = thinpool::forge::Forge::new(img.clone()).unwrap();
    let root = f
        .records()
        .into_iter()
        .find(|(_, r)| r.id == id)
        .unwrap()
        .1
        .root;
    let mut img = img;
    img[root as usize * 4096 + 200] ^= 0xff;
    std::fs::write(&path, &img).unwrap();
    let mut ro = Pool::open_read_only(&path).expect("the pool opens for inspection");
    let report = ro.check().unwrap();
    assert!(!report.is_clean(), "the damaged node is reported");
    let mut buf = vec![0u8; 4096];
    ro.read(other, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 6), "an undamaged volume reads");
}

/// An I/O error while the open replays the log fails the open, and
/// commits nothing: a later open replays the same records (before, the
/// half-replayed pool was committed when dropped, and the log restarted
/// without the flushed write).
#[test]
fn an_io_error_during_replay_commits_nothing() {
    io_error_during_replay(false);
}

/// The same, for a read of the block a record maps (before, the record
/// was taken for one whose data never arrived, and dropped).
#[test]
fn an_io_error_reading_a_logged_block_fails_the_open() {
    io_error_during_replay(true);
}

fn io_error_during_replay(on_data: bool) {
    let m = MemStorage::new();
    let mut p = small_pool(m.clone());
    let id = p.create_volume("v", MIB).unwrap();
    p.write(id, 0, &[5u8; 4096]).unwrap();
    p.commit().unwrap();
    p.set_logging(true);
    p.write(id, 4096, &[9u8; 4096]).unwrap();
    p.flush().unwrap();
    let g = p.generation();
    let log = p.log_area();
    kill(p);
    let f = thinpool::forge::Forge::new(m.snapshot()).unwrap();
    let root = f
        .records()
        .into_iter()
        .find(|(_, r)| r.id == id)
        .unwrap()
        .1
        .root;
    let at = match on_data {
        // The block the log's one record (slot 0) names.
        true => {
            let half = (log.0 + (g % 2) * (log.1 as u64 / 2)) * 4096 + 48;
            let img = m.snapshot();
            u64::from_le_bytes(img[half as usize..][..8].try_into().unwrap())
        }
        false => root,
    };
    // Reads of that block fail (a transient EIO).
    let st = Hooked::new(m.clone()).on_read(move |inner, buf, offset| {
        if offset == at * 4096 {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        inner.read_at(buf, offset)
    });
    assert!(Pool::open_with(Box::new(st), Path::new("mem")).is_err());
    // The error has passed: the next open finds the pool as the kill left it.
    let mut p = open_on(m);
    let r = p.log_replay().unwrap();
    assert_eq!((r.generation, r.records), (g, 1), "{r:?}");
    let mut buf = vec![0u8; 4096];
    p.read(id, 4096, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 9), "the flushed write is there");
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}

/// `SharedPool::change` stages a new volume under the engine lock, lets
/// it go, and seals the commit under it again: a write to the new volume
/// in between is logged in the epoch of the commit before it, where the
/// volume does not exist. A kill before that commit is durable must not
/// lose the acknowledged writes logged after it (to other volumes).
#[test]
fn a_record_for_a_volume_staged_after_the_commit_does_not_end_the_log() {
    let m = MemStorage::new();
    let mut p = small_pool(m.clone());
    let x = p.create_volume("x", MIB).unwrap();
    p.set_logging(true);
    p.write(x, 0, &[1u8; 4096]).unwrap();
    p.flush().unwrap();
    let g = p.generation();
    let n = p.stage_create("n", MIB).unwrap();
    p.write(n, 0, &[2u8; 4096]).unwrap();
    p.write(x, 4096, &[3u8; 4096]).unwrap();
    kill(p);
    let mut p = open_on(m);
    assert_eq!(p.log_replay().unwrap().generation, g);
    let mut buf = vec![0u8; 2 * 4096];
    p.read(x, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1));
    assert!(
        buf[4096..].iter().all(|&b| b == 3),
        "acknowledged before the kill: {:?}",
        p.log_replay()
    );
    assert!(p.lookup("n").is_err(), "the creation was never committed");
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
}
