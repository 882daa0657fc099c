//! The FUSE filesystem: one flat directory in which every volume is a regular
//! file of its virtual size. Reads, writes, discards and flushes go straight to
//! the engine; files are opened with direct I/O, so the kernel keeps no copy
//! of a volume's pages above the engine. (The pool file below it is cached
//! by the host unless the server opened it `O_DIRECT`: docs/EXPORT.md.)
//!
//! Inode numbers: the root is 1, volume `id` is `id + 2` (ids are never reused,
//! so an inode never changes meaning while a file is open).

use std::cell::RefCell;
use std::ffi::OsStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};

use super::resume::InitInfo;
use super::state::Shared;
use crate::error::Error;
use crate::pool::VolumeId;

const ROOT: u64 = 1;
/// Attributes change only through the control socket, which invalidates them.
const TTL: Duration = Duration::from_secs(1);
/// Largest request the kernel sends (it caps FUSE requests at 256 pages by default).
const MAX_WRITE: u32 = 1 << 20;

pub(crate) fn ino_of(id: VolumeId) -> INodeNo {
    INodeNo(id + 2)
}

fn id_of(ino: INodeNo) -> Option<VolumeId> {
    ino.0.checked_sub(2)
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

thread_local! {
    /// One read buffer per serving thread, reused: no allocation per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub(crate) struct ThinFs {
    pub sh: Arc<Shared>,
}

impl ThinFs {
    fn attr(&self, ino: u64, size: u64, dir: bool, read_only: bool) -> FileAttr {
        let t = self.sh.started;
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind: if dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if dir {
                0o755
            } else if read_only {
                0o444
            } else {
                0o644
            },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: self.sh.block_size,
            flags: 0,
        }
    }

    fn volume_attr(&self, id: VolumeId) -> Result<FileAttr, Errno> {
        let pool = self.sh.pool.read_engine();
        let size = pool.volume_size(id).map_err(|e| errno(&e))?;
        let ro = pool.is_read_only(id).map_err(|e| errno(&e))?;
        Ok(self.attr(ino_of(id).0, size, false, ro))
    }

    /// Make what was written to `ino` durable: a commit that covers the
    /// volume's writes, shared with other flushes (group commit).
    fn commit(&self, ino: INodeNo) -> Result<(), Errno> {
        let r = match id_of(ino) {
            Some(id) => self.sh.pool.flush_volume(id),
            None => self.sh.commit(),
        };
        r.map_err(|e| errno(&e))
    }
}

impl Filesystem for ThinFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Recorded for the next server, which replays it (see `resume`).
        let abi = config.kernel_abi();
        let mut flags = config.capabilities();
        if std::env::var_os("THINPOOL_TEST_NO_RESEND").is_some() {
            // Tests play a kernel before 6.9 (docs/EXPORT.md, "Limits").
            flags.remove(InitFlags::FUSE_HAS_RESEND);
        }
        *self.sh.init.lock().unwrap_or_else(|p| p.into_inner()) = Some(InitInfo {
            major: abi.0,
            minor: abi.1,
            flags: flags.bits(),
        });
        // The loop device submits asynchronous direct I/O: let the kernel keep
        // several requests in flight instead of waiting for each one.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_background(128);
        let _ = config.set_congestion_threshold(96);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _pass = self.sh.gate.enter();
        if parent.0 != ROOT {
            return reply.error(Errno::ENOENT);
        }
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let id = match self.sh.pool.read_engine().lookup(name) {
            Ok(id) => id,
            Err(e) => return reply.error(errno(&e)),
        };
        match self.volume_attr(id) {
            Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _pass = self.sh.gate.enter();
        if ino.0 == ROOT {
            return reply.attr(&TTL, &self.attr(ROOT, 0, true, false));
        }
        match id_of(ino)
            .ok_or(Errno::ENOENT)
            .and_then(|id| self.volume_attr(id))
        {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _pass = self.sh.gate.enter();
        // Sizes change with `thinpool resize`, modes follow the volume: only
        // no-op changes (and time updates, which are not kept) are accepted.
        let attr = if ino.0 == ROOT {
            Ok(self.attr(ROOT, 0, true, false))
        } else {
            id_of(ino)
                .ok_or(Errno::ENOENT)
                .and_then(|id| self.volume_attr(id))
        };
        match attr {
            Ok(a) if size.is_some_and(|s| s != a.size) => reply.error(Errno::EPERM),
            Ok(a) if mode.is_some_and(|m| m & 0o7777 != a.perm as u32) => reply.error(Errno::EPERM),
            Ok(_) if uid.is_some_and(|u| u != 0) || gid.is_some_and(|g| g != 0) => {
                reply.error(Errno::EPERM)
            }
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.sh.gate.enter();
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::EISDIR);
        };
        if self.sh.stopping.load(Ordering::SeqCst) {
            return reply.error(Errno::ESHUTDOWN);
        }
        let writing = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        {
            // Counted under the pool lock so `remove` sees a consistent picture.
            let pool = self.sh.pool.read_engine();
            match pool.is_read_only(id) {
                Ok(true) if writing => return reply.error(Errno::EROFS),
                Ok(_) => {}
                Err(e) => return reply.error(errno(&e)),
            }
            self.sh.opened(id);
        }
        let fl = FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES;
        reply.opened(FileHandle(id), fl);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.sh.gate.enter();
        if let Some(id) = id_of(ino) {
            // A detach is a natural point to make everything durable.
            if self.sh.pool.is_dirty() {
                let _ = self.sh.commit();
            }
            self.sh.released(id);
        }
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = self.sh.gate.enter();
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::EISDIR);
        };
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let pool = &self.sh.pool;
            let vsize = pool.read_engine().volume_size(id);
            let res = vsize.and_then(|vsize| {
                let n = vsize.saturating_sub(offset).min(size as u64) as usize;
                if n == 0 {
                    // At or past the end of the file: 0 bytes, as for any file.
                    return Ok(0);
                }
                if buf.len() < n {
                    buf.resize(n, 0);
                }
                pool.read(id, offset, &mut buf[..n]).map(|()| n)
            });
            match res {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = self.sh.gate.enter();
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let res = self.sh.pool.write(id, offset, data);
        match res {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _pass = self.sh.gate.enter();
        // close(2): commit only if this volume was written since its last commit.
        if let Err(e) = self.commit(ino) {
            return reply.error(e);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.sh.gate.enter();
        match self.commit(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.sh.gate.enter();
        let Some(id) = id_of(ino) else {
            return reply.error(Errno::EISDIR);
        };
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && zero) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let vsize = self.sh.pool.read_engine().volume_size(id);
        let res = vsize.and_then(|vsize| {
            let end = offset.saturating_add(length);
            if !punch && !zero {
                // Plain allocation: every block of a thin volume is "allocated"
                // in the sense that writes within the size are accepted.
                return if end > vsize && mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                    Err(Error::InvalidArgument(
                        "volumes cannot grow through fallocate".into(),
                    ))
                } else {
                    Ok(())
                };
            }
            let len = end.min(vsize).saturating_sub(offset);
            if len == 0 {
                return Ok(());
            }
            // Both unmap: unmapped blocks read as zeros.
            self.sh.pool.discard(id, offset, len)
        });
        match res {
            Ok(()) => reply.ok(),
            Err(Error::InvalidArgument(_)) => reply.error(Errno::EFBIG),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.sh.gate.enter();
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _pass = self.sh.gate.enter();
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let vols = self.sh.pool.read_engine().volume_names();
        let entries = [
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ]
        .into_iter()
        .chain(
            vols.into_iter()
                .map(|(id, name)| (id + 2, FileType::RegularFile, name)),
        );
        for (i, (ino, kind, name)) in entries.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _pass = self.sh.gate.enter();
        // f_bsize is the pool block size: the loop device takes it as its
        // discard granularity, so fstrim sends whole pool blocks.
        let info = self.sh.pool.read_engine().info();
        match info {
            Ok(i) => {
                let bs = i.block_size as u64;
                let free = i.data_free_bytes / bs;
                reply.statfs(
                    i.total_blocks,
                    free,
                    free,
                    i.volumes as u64,
                    0,
                    i.block_size,
                    255,
                    i.block_size,
                )
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        let _pass = self.sh.gate.enter();
        reply.ok();
    }
}
