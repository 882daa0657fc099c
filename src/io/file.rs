//! The pool file: pread/pwrite, fdatasync, and hole punching.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};

use super::{write_zeros, Storage};

pub struct FileStorage {
    file: File,
    /// Opened for inspection: nothing is written, so no space is reserved.
    read_only: bool,
}

impl FileStorage {
    pub fn new(file: File) -> FileStorage {
        FileStorage {
            file,
            read_only: false,
        }
    }

    /// A file opened read-only (a replay in memory allocates blocks it
    /// never writes: reserving host space for them would fail).
    pub fn read_only(file: File) -> FileStorage {
        FileStorage {
            file,
            read_only: true,
        }
    }

    pub fn file(&self) -> &File {
        &self.file
    }
}

/// `fallocate(2)`; `Ok(false)` when the file system does not support `mode`
/// (a pool there still works: it just neither reserves space ahead nor gives
/// it back).
pub(super) fn fallocate(fd: RawFd, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    // SAFETY: plain syscall on an fd the caller owns; no memory is passed.
    let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(e),
    }
}

/// `Storage::zero` of a file: `ZERO_RANGE` (zeros, space kept), else a
/// punched hole then reserved (tmpfs has no `ZERO_RANGE`), else written zeros.
/// Never only a punch: that is best effort and may leave old bytes.
pub(super) fn zero_range<S: Storage + ?Sized>(
    s: &S,
    fd: RawFd,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    if fallocate(fd, libc::FALLOC_FL_ZERO_RANGE, offset, len)? {
        return Ok(());
    }
    let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // Mode 0 after the punch reserves the range and extends the file over it.
    if fallocate(fd, punch, offset, len)? && fallocate(fd, 0, offset, len)? {
        return Ok(());
    }
    write_zeros(s, offset, len)
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Mode 0 allocates (unwritten extents read as zeros) and costs next
        // to nothing where the range already has its space.
        fallocate(self.file.as_raw_fd(), 0, offset, len).map(drop)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        fallocate(self.file.as_raw_fd(), mode, offset, len).map(drop)
    }

    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        zero_range(self, self.file.as_raw_fd(), offset, len)
    }
}
