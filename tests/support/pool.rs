//! Library-level plumbing shared by the engine tests (engine, prealloc,
//! log_replay, direct, layer): pools on memory, on any storage and on files,
//! opening again after a clean close or a kill, `check`, test data.
#![allow(dead_code)]

use std::path::Path;

use thinpool::io::{MemStorage, Storage};
use thinpool::{CreateOptions, Pool};

/// A new pool of `size` bytes in blocks of `bs` on `storage`.
pub fn pool_on(storage: impl Storage + 'static, size: u64, bs: u32) -> Pool {
    Pool::create_with(
        Box::new(storage),
        Path::new("mem"),
        &CreateOptions {
            size,
            block_size: bs,
        },
    )
    .unwrap()
}

/// A new pool in memory, and the memory (a handle: clones share it).
pub fn mem_pool(size: u64, bs: u32) -> (MemStorage, Pool) {
    let m = MemStorage::new();
    let p = pool_on(m.clone(), size, bs);
    (m, p)
}

/// A new pool file at `path`.
pub fn file_pool(path: &Path, size: u64, bs: u32) -> Pool {
    Pool::create(
        path,
        &CreateOptions {
            size,
            block_size: bs,
        },
    )
    .unwrap()
}

/// Open the pool on `storage` (its last commit plus its intent log).
pub fn open_on(storage: impl Storage + 'static) -> Pool {
    Pool::open_with(Box::new(storage), Path::new("mem")).unwrap()
}

/// Close `p` (a last commit) and open its memory again.
pub fn reopen(m: &MemStorage, p: Pool) -> Pool {
    p.close().unwrap();
    open_on(m.clone())
}

/// What a killed process leaves: nothing more is committed (not even on
/// drop), so what survives is the last commit and the intent log.
pub fn kill(mut p: Pool) {
    p.fail("killed");
    drop(p);
}

pub fn assert_clean(p: &mut Pool) {
    let r = p.check().unwrap();
    assert!(r.is_clean(), "check found problems: {:#?}", r.problems);
}

/// `len` bytes that differ from block to block and with `seed`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
