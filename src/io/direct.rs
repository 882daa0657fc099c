//! The pool file opened `O_DIRECT`: reads and writes bypass the host page
//! cache (`thinpool serve --direct`, docs/EXPORT.md).
//!
//! `O_DIRECT` wants the file offset, the length and the memory address all
//! aligned to the file system's direct-I/O unit. Aligned requests go straight
//! to pread/pwrite; the rest go through an aligned bounce buffer, and a write
//! that covers part of a unit reads the covering units first
//! (read-modify-write). Two writes whose units overlap, one of them a
//! read-modify-write, are serialised by a range lock: otherwise the second
//! write-back could put back bytes the first had replaced.
//!
//! Plain pread/pwrite from many threads keep many requests in flight (the
//! FUSE workers each have one), which is why this uses no io_uring (see
//! docs/EXPORT.md, "Direct I/O").

use std::alloc::{self, Layout};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::{Condvar, Mutex};

use super::file::zero_range;
use super::FileStorage;
use super::Storage;

/// Direct-I/O unit: 4 KiB covers every logical block size Linux file
/// systems use on common disks (512 B and 4 KiB); pool blocks are 4 KiB or
/// more, so engine I/O of whole blocks is always aligned.
pub const DIRECT_ALIGN: usize = 4096;

pub struct DirectStorage {
    /// The file, whose sync, length and fallocate O_DIRECT does not change;
    /// reads and writes go through the aligned paths below.
    plain: FileStorage,
    /// Unit ranges `[start, end)` of writes in progress, and whether each is a
    /// read-modify-write.
    writing: Mutex<Vec<(u64, u64, bool)>>,
    done: Condvar,
}

impl DirectStorage {
    /// Wrap a file opened with `O_DIRECT` (see `pool::open`).
    pub fn new(file: File) -> DirectStorage {
        DirectStorage {
            plain: FileStorage::new(file),
            writing: Mutex::new(Vec::new()),
            done: Condvar::new(),
        }
    }

    pub fn file(&self) -> &File {
        self.plain.file()
    }

    /// Wait until no write in progress conflicts with `[start, end)`, then
    /// register it. Plain writes only wait for read-modify-writes (and those
    /// for every write): two plain writes may overlap as on a disk.
    fn begin_write(&self, start: u64, end: u64, rmw: bool) -> WriteGuard<'_> {
        let mut w = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        while w
            .iter()
            .any(|&(s, e, other_rmw)| s < end && start < e && (rmw || other_rmw))
        {
            w = self.done.wait(w).unwrap_or_else(|p| p.into_inner());
        }
        w.push((start, end, rmw));
        WriteGuard {
            s: self,
            range: (start, end, rmw),
        }
    }

    /// Read `buf.len()` bytes at aligned `offset` into aligned `buf`; false if
    /// the file ends first.
    fn pread_aligned(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        let mut done = 0;
        while done < buf.len() {
            match self.file().read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => return Ok(false),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Read the covering units of `[offset, offset+len)`; bytes past the end
    /// of the file read as zeros (only a write does this: it extends the file).
    fn read_cover(&self, bounce: &mut AlignedBuf, start: u64, upto: usize) -> io::Result<()> {
        let b = bounce.as_mut();
        let mut done = 0;
        while done < upto {
            match self.file().read_at(&mut b[done..upto], start + done as u64) {
                Ok(0) => {
                    b[done..upto].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

struct WriteGuard<'a> {
    s: &'a DirectStorage,
    range: (u64, u64, bool),
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        let mut w = self.s.writing.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = w.iter().position(|r| *r == self.range) {
            w.swap_remove(i);
        }
        self.s.done.notify_all();
    }
}

fn aligned(x: u64) -> bool {
    x.is_multiple_of(DIRECT_ALIGN as u64)
}

/// `[offset, offset+len)` widened to whole units.
fn cover(offset: u64, len: usize) -> (u64, u64) {
    let a = DIRECT_ALIGN as u64;
    (offset / a * a, (offset + len as u64).div_ceil(a) * a)
}

impl Storage for DirectStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let eof = || {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the pool file",
            )
        };
        if aligned(offset) && aligned(buf.len() as u64) && aligned(buf.as_ptr() as u64) {
            return if self.pread_aligned(buf, offset)? {
                Ok(())
            } else {
                Err(eof())
            };
        }
        let (start, end) = cover(offset, buf.len());
        let mut bounce = AlignedBuf::new((end - start) as usize)?;
        let skip = (offset - start) as usize;
        // The last unit may be the file's partial tail: read what is there.
        let b = bounce.as_mut();
        let mut done = 0;
        while done < skip + buf.len() {
            match self.file().read_at(&mut b[done..], start + done as u64) {
                Ok(0) => return Err(eof()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.copy_from_slice(&b[skip..skip + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let (start, end) = cover(offset, buf.len());
        let whole = aligned(offset) && aligned(buf.len() as u64);
        let _guard = self.begin_write(start, end, !whole);
        if whole && aligned(buf.as_ptr() as u64) {
            return self.file().write_all_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new((end - start) as usize)?;
        let skip = (offset - start) as usize;
        if !whole {
            // Only the first and last units hold bytes we do not replace.
            let unit = DIRECT_ALIGN;
            let n = (end - start) as usize;
            if skip != 0 {
                self.read_cover(&mut bounce, start, unit)?;
            }
            let tail = (end - (offset + buf.len() as u64)) as usize;
            if tail != 0 && (n > unit || skip == 0) {
                let mut last = AlignedBuf::new(unit)?;
                self.read_cover(&mut last, end - unit as u64, unit)?;
                bounce.as_mut()[n - unit..].copy_from_slice(last.as_mut());
            }
        }
        bounce.as_mut()[skip..skip + buf.len()].copy_from_slice(buf);
        self.file().write_all_at(bounce.as_mut(), start)
    }

    fn sync(&self) -> io::Result<()> {
        // O_DIRECT skips the page cache, not the disk's cache or the file
        // system's metadata (allocations): fdatasync is still the barrier.
        self.plain.sync()
    }

    fn len(&self) -> io::Result<u64> {
        self.plain.len()
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.plain.set_len(len)
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plain.reserve(offset, len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.plain.punch(offset, len)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        // Its fallback writes zeros through the aligned path.
        zero_range(self, self.file().as_raw_fd(), offset, len)
    }

    fn is_direct(&self) -> bool {
        true
    }
}

/// A heap buffer aligned for `O_DIRECT`.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(DIRECT_ALIGN), DIRECT_ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "no memory for a direct-I/O buffer",
            ));
        }
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes we own.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr, self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cover_widens_to_units() {
        assert_eq!(cover(0, 4096), (0, 4096));
        assert_eq!(cover(100, 10), (0, 4096));
        assert_eq!(cover(4000, 200), (0, 8192));
        assert_eq!(cover(8192, 1), (8192, 12288));
    }
}
