//! Every byte the engine reads or writes goes through [`Storage`], so tests
//! can swap the file for memory or for a backend that simulates power loss.

#[cfg(feature = "test-support")]
pub mod crash;
mod direct;
mod file;
#[cfg(feature = "test-support")]
mod hooked;
mod mem;

#[cfg(feature = "test-support")]
pub use crash::CrashStorage;
pub use direct::DirectStorage;
pub use file::FileStorage;
#[cfg(feature = "test-support")]
pub use hooked::Hooked;
pub use mem::MemStorage;

use crate::error::{Error, Result};

use std::io;

#[allow(clippy::len_without_is_empty)] // a file's length, not a collection
pub trait Storage: Send + Sync {
    /// Fill `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset` (not durable until `sync`).
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every write so far durable.
    fn sync(&self) -> io::Result<()>;
    fn len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Give the range's space back to the host; it reads as zeros afterwards.
    fn punch(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Make sure the range has space on the host, so writing it later
    /// cannot fail for lack of room (ENOSPC now rather than then).
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Make the range read as zeros *and* hold its host space (the blocks
    /// of a preallocated volume). Unlike `punch`, this is not best effort.
    /// The default writes zeros; files use `FALLOC_FL_ZERO_RANGE`.
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        write_zeros(self, offset, len)
    }
    /// Reads and writes bypass the host page cache (`O_DIRECT`).
    fn is_direct(&self) -> bool {
        false
    }
}

/// `zero` by writing zeros, a MiB at a time.
pub(crate) fn write_zeros<S: Storage + ?Sized>(s: &S, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut at = 0;
    while at < len {
        let n = CHUNK.min(len - at);
        s.write_at(&zeros[..n as usize], offset + at)?;
        at += n;
    }
    Ok(())
}

/// `read_at` for metadata and data the pool points to: a read past the end of
/// the file means the pool file was truncated, which is corruption, not I/O.
pub(crate) fn read_pointed(
    storage: &dyn Storage,
    buf: &mut [u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<()> {
    storage.read_at(buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Error::corrupt(format!(
                "{} is past the end of the pool file (truncated?)",
                what()
            ))
        } else {
            Error::Io(e)
        }
    })
}

/// All zeros: what an unmapped block reads as.
pub fn is_zero(b: &[u8]) -> bool {
    // OR-folding fixed-size pieces vectorises; stopping per piece keeps the
    // early exit for data blocks.
    b.chunks(512)
        .all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
}
