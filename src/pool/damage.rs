//! A small damage generator for tests (thin-provisioning-tools has one too):
//! each function commits one specific kind of damage to an open pool. Built
//! only with the `test-support` feature: it is test machinery, not API.

use super::Pool;
use crate::error::Result;
use crate::space::{Budget, Kind};

/// Allocate a block nothing references, and commit it. Returns the block.
pub fn leak_block(pool: &mut Pool) -> Result<u64> {
    let b = pool.space.alloc(Kind::Data, Budget::Write)?;
    pool.commit_forced()?;
    Ok(b)
}

/// Add one to a block's stored count, and commit.
pub fn bump_refcount(pool: &mut Pool, block: u64) -> Result<()> {
    pool.space.inc(block)?;
    pool.commit_forced()
}

/// Shrink a volume's recorded size (its map keeps the blocks past the new end).
pub fn shrink_record(pool: &mut Pool, name: &str, size: u64) -> Result<()> {
    let id = pool.catalog.id_of(name)?;
    pool.catalog.get_mut(id)?.size = size;
    pool.commit_forced()
}

/// The block holding a volume's map root (0 if it has none).
pub fn root_block(pool: &Pool, name: &str) -> Result<u64> {
    Ok(pool.catalog.get_by_name(name)?.root)
}

/// Set a volume's preallocated flag without mapping its blocks.
pub fn mark_preallocated(pool: &mut Pool, name: &str) -> Result<()> {
    let id = pool.catalog.id_of(name)?;
    pool.catalog.get_mut(id)?.preallocated = true;
    pool.commit_forced()
}
