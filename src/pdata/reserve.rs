//! Allocating a block together with the host space behind it.
//!
//! The pool file is sparse: a block the allocator hands out may be a hole,
//! and writing it later needs space on the host file system. Reserving that
//! space when the block is allocated (fallocate) turns a full host into an
//! error for the write that asked for the block, before the map points at
//! it, instead of a failed data or commit write that leaves the open
//! transaction unusable.

use crate::error::{Error, Result};
use crate::io::Storage;
use crate::space::{Budget, Kind, SpaceMap};

/// Free blocks tried before giving up. A commit takes the free blocks that
/// still hold host space first (see `SpaceMap`), so it rarely needs this.
const TRIES: usize = 64;

/// Allocate a block (as `SpaceMap::alloc`) whose bytes on the host are
/// reserved. A block whose space the host cannot give is passed over; if
/// none can be had, `Error::HostFull`.
pub fn alloc_block(
    space: &mut SpaceMap,
    storage: &dyn Storage,
    block_size: u64,
    kind: Kind,
    budget: Budget,
) -> Result<u64> {
    let mut passed_over = Vec::new();
    let result = loop {
        let b = match space.alloc(kind, budget) {
            Ok(b) => b,
            Err(Error::NoSpace) if !passed_over.is_empty() => break Err(host_full()),
            Err(e) => break Err(e),
        };
        match storage.reserve(b * block_size, block_size) {
            Ok(()) => break Ok(b),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                passed_over.push(b);
                if passed_over.len() >= TRIES {
                    break Err(host_full());
                }
            }
            Err(e) => {
                passed_over.push(b);
                break Err(e.into());
            }
        }
    };
    // Allocated in this transaction, never used, no host space: free again.
    for b in passed_over {
        space.unalloc(b, kind)?;
    }
    result
}

fn host_full() -> Error {
    Error::HostFull
}
