//! The pool file: pread/pwrite, fdatasync, and hole punching.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use super::Storage;

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

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            _ if r == 0 => Ok(()),
            // A filesystem without fallocate still works: it just neither
            // reserves space ahead nor gives it back.
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
            _ => Err(e),
        }
    }
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
        self.fallocate(0, offset, len)
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
    }
}
