//! A forged intent log's size costs the open no more
//! memory than a block (the log is read a block at a time). Its own test
//! binary: it measures the process's peak memory.

use byteorder::{ByteOrder, LittleEndian as LE};
use thinpool::forge::Forge;
use thinpool::io::MemStorage;

const MIB: u64 = 1024 * 1024;

#[path = "support/pool.rs"]
mod pool;
use pool::{open_on, pool_on};

fn max_rss_bytes() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as u64 * 1024
}

#[test]
fn a_forged_huge_log_does_not_make_the_open_take_its_size_in_memory() {
    let bs = 2 * MIB;
    let m = MemStorage::new();
    let p = pool_on(m.clone(), 64 * 1024 * MIB, bs as u32);
    p.close().unwrap();
    let mut f = Forge::new(m.snapshot()).unwrap();
    // A log of 1024 blocks (halves of 1 GiB) in blocks the pool counts as
    // used: nothing at open tells it from a real one.
    let (start, n) = (16_000u64, 1024u32);
    let (rc, _) = f.table_pages();
    assert!(rc[0] != 0, "one refcount page covers the pool");
    assert!(f.edit_page(rc[0], |p| {
        for b in start..start + n as u64 {
            LE::write_u32(&mut p[4 * b as usize..][..4], 1);
        }
    }));
    f.sb.log_start = start;
    f.sb.log_blocks = n;
    let img = f.finish();
    let before = max_rss_bytes();
    let p = open_on(MemStorage::from_bytes(img));
    assert_eq!(p.log_replay().unwrap().records, 0);
    let grew = max_rss_bytes().saturating_sub(before);
    assert!(
        grew < 256 * MIB,
        "the open took {} MiB for a log of {} MiB halves",
        grew / MIB,
        n as u64 / 2 * bs / MIB
    );
}
