//! Sizes derived from the block size, and what a pool of a given size needs.

use crate::error::{Error, Result};
use crate::format::PAGE_HEADER_SIZE;

/// The refcount table and two bitmaps live in memory (a little over 4 bytes a
/// block): refuse a pool that could not fit instead of aborting on allocation
/// (and a crafted superblock that claims such a pool).
pub(super) fn check_memory(total_blocks: u64, block_size: u32) -> Result<()> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let ram = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    let need = total_blocks.saturating_mul(4) + total_blocks / 4;
    if ram > 0 && need > ram / 2 {
        return Err(Error::InvalidArgument(format!(
            "a pool of {} blocks of {} needs {} of memory for its refcounts; this machine has {} \
             (use a larger block size)",
            total_blocks,
            crate::size::format_size(block_size as u64),
            crate::size::format_size(need),
            crate::size::format_size(ram)
        )));
    }
    Ok(())
}

pub(super) fn refcounts_per_page(block_size: u32) -> usize {
    (block_size as usize - PAGE_HEADER_SIZE) / 4
}
