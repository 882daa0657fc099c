//! Opening and creating pools, and the owner lock on the pool file.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::geometry::{check_memory, refcounts_per_page};
use super::volumes::now;
use super::{CreateOptions, Pool, DEFAULT_LOW_WATER_PCT};
use crate::annotations::Annotations;
use crate::catalog::{Catalog, RecordLimits};
use crate::error::{Error, Result};
use crate::format::{
    self, PageType, SlotError, Superblock, FORMAT_VERSION, RC_INDEX_MAX, SUPERBLOCK_SLOT_SIZE,
};
use crate::io::{DirectStorage, FileStorage, Storage};
use crate::map::Nodes;
use crate::pdata::PagedArray;
use crate::space::{try_vec, SpaceMap};

thread_local! {
    /// `create_without_log` is running on this thread.
    static NO_LOG: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn new_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(f) = File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut u);
    }
    if u == [0u8; 16] {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        u.copy_from_slice(&(t ^ ((std::process::id() as u128) << 64)).to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

pub(super) fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Open an existing pool file and take its owner lock: exclusive to change
/// it (one process writes a pool at a time), shared to inspect it.
pub(crate) fn open_file(path: &Path, write: bool) -> Result<FileStorage> {
    let file = open_locked(path, write, false)?;
    Ok(if write {
        FileStorage::new(file)
    } else {
        FileStorage::read_only(file)
    })
}

/// `open_file` with `O_DIRECT`: the pool file bypasses the host page cache.
pub(crate) fn open_file_direct(path: &Path, write: bool) -> Result<DirectStorage> {
    Ok(DirectStorage::new(open_locked(path, write, true)?))
}

fn open_locked(path: &Path, write: bool, direct: bool) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = if direct { libc::O_DIRECT } else { 0 };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) if direct => Error::InvalidArgument(format!(
                "{}: the file system holding the pool does not support direct I/O \
                 (O_DIRECT; ramfs does not, nor tmpfs before Linux 6.6); open it without --direct",
                path.display()
            )),
            _ => Error::Io(e),
        })?;
    if !file.metadata()?.is_file() {
        return Err(Error::NotAPool {
            path: path.to_path_buf(),
        });
    }
    lock(
        &file,
        path,
        if write { libc::LOCK_EX } else { libc::LOCK_SH },
    )?;
    Ok(file)
}

/// Take the pool's owner lock: exclusive to write, shared to inspect.
fn lock(file: &File, path: &Path, how: libc::c_int) -> Result<()> {
    // SAFETY: flock on an fd we own.
    let r = unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        let who = lock_holder(file)
            .map_or_else(|| "another process".to_string(), |pid| format!("PID {pid}"));
        return Err(Error::InUse(format!(
            "pool {} is in use by {who} (is it being served?)",
            path.display()
        )));
    }
    Err(Error::Io(e))
}

/// The process holding a flock on `file`, from /proc/locks (what lslocks reads):
/// lines like `1: FLOCK ADVISORY WRITE 4242 fd:01:123456 0 EOF`.
fn lock_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let md = file.metadata().ok()?;
    let dev = md.dev();
    let want = format!(
        "{:02x}:{:02x}:{}",
        libc::major(dev),
        libc::minor(dev),
        md.ino()
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // A blocked waiter's line starts with "->"; skip those.
        (f.len() >= 6 && f[1] == "FLOCK" && f[5] == want)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

impl Pool {
    /// Create a new pool file (fails if `path` exists). On failure nothing is left behind.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Pool> {
        Pool::check_create_options(opts)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::InvalidArgument(format!(
                        "{} already exists; not overwriting it",
                        path.display()
                    ))
                } else {
                    Error::Io(e)
                }
            })?;
        let result = lock(&file, path, libc::LOCK_EX)
            .and_then(|_| Pool::create_with(Box::new(FileStorage::new(file)), path, opts));
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    fn check_create_options(opts: &CreateOptions) -> Result<()> {
        if !format::valid_block_size(opts.block_size) {
            return Err(Error::InvalidArgument(format!(
                "block size {} is not a power of two from 4K to 2M",
                opts.block_size
            )));
        }
        let min = (format::reserved_blocks(opts.block_size) + 16) * opts.block_size as u64;
        if opts.size < min {
            return Err(Error::InvalidArgument(format!(
                "pool size {} is too small (at least {} with {} blocks)",
                crate::size::format_size(opts.size),
                crate::size::format_size(min),
                crate::size::format_size(opts.block_size as u64)
            )));
        }
        Ok(())
    }

    /// Create a pool on any storage (tests use memory).
    pub fn create_with(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: &CreateOptions,
    ) -> Result<Pool> {
        Pool::check_create_options(opts)?;
        let bs = opts.block_size;
        let total = opts.size / bs as u64;
        if usize::try_from(total).is_err() {
            return Err(Error::InvalidArgument("pool size too large".into()));
        }
        check_memory(total, bs)?;
        let per_rc = refcounts_per_page(bs);
        let rc_layout = PagedArray::new(
            PageType::Refcount,
            bs,
            (total as usize).div_ceil(per_rc),
            RC_INDEX_MAX,
        )
        .map_err(|_| {
            Error::InvalidArgument(format!(
                "pool size {} is too large for {} blocks; use a larger block size",
                crate::size::format_size(opts.size),
                crate::size::format_size(bs as u64)
            ))
        })?;
        let reserved = format::reserved_blocks(bs);
        let sb = Superblock {
            version: crate::format::FORMAT_VERSION,
            generation: 0,
            block_size: bs,
            low_water_pct: DEFAULT_LOW_WATER_PCT,
            total_blocks: total,
            uuid: new_uuid(),
            created: now(),
            next_volume_id: 1,
            metadata_blocks: 0,
            catalog_slots: 0,
            rc_index: Vec::new(),
            cat_index: Vec::new(),
            annot_len: 0,
            annot_pages: 0,
            annot_index: Vec::new(),
            log_start: 0,
            log_blocks: 0,
            log_nonce: 0,
        };
        let mut pool = Pool {
            path: path.to_path_buf(),
            storage: storage.into(),
            sb,
            space: SpaceMap::new(total, reserved, per_rc)?,
            rc_layout,
            catalog: Catalog::new(bs)?,
            annotations: Annotations::new(bs)?,
            nodes: Nodes::new(bs, total, reserved, 0),
            data_dirty: false,
            failed: None,
            read_only: false,
            log: Default::default(),
            replayed: None,
        };
        // The first commit also places the intent log (`ensure_log`).
        pool.log.set_tried(NO_LOG.with(|c| c.get()));
        pool.commit_inner(true)?;
        Ok(pool)
    }

    /// Test machinery: a pool as versions 1 and 2 made it, without an
    /// intent log (it gains one at its first commit after a reopen).
    #[doc(hidden)]
    pub fn create_without_log(
        storage: Box<dyn Storage>,
        path: &Path,
        opts: &CreateOptions,
    ) -> Result<Pool> {
        NO_LOG.with(|c| c.set(true));
        let r = Pool::create_with(storage, path, opts);
        NO_LOG.with(|c| c.set(false));
        r
    }

    /// Open for inspection only (info, list, check): a shared lock, so
    /// several readers may look at an unserved pool at once; nothing changes.
    /// The intent log is replayed in memory, so what it shows is the
    /// pool's true state; nothing is written.
    pub fn open_read_only(path: &Path) -> Result<Pool> {
        let storage = Box::new(open_file(path, false)?);
        let sb = Pool::read_superblock(&*storage, path)?;
        let mut pool = Pool::open_at_inspect(storage, path, sb)?;
        pool.read_only = true;
        Ok(pool)
    }

    /// Open an existing pool for reading and writing (exclusive lock).
    pub fn open(path: &Path) -> Result<Pool> {
        Pool::open_with(Box::new(open_file(path, true)?), path)
    }

    /// `open`, with the pool file opened `O_DIRECT` (`serve --direct`):
    /// no copy of its blocks in the host page cache.
    pub fn open_direct(path: &Path) -> Result<Pool> {
        Pool::open_with(Box::new(open_file_direct(path, true)?), path)
    }

    /// Open a pool on any storage, at its newest valid commit plus the
    /// valid prefix of its intent log, which is then committed (a crash
    /// before that commit is durable replays the same records again).
    pub fn open_with(storage: Box<dyn Storage>, path: &Path) -> Result<Pool> {
        let sb = Pool::read_superblock(&*storage, path)?;
        let mut pool = Pool::open_at(storage, path, sb)?;
        if pool.replayed.as_ref().is_some_and(|r| r.records > 0) {
            pool.commit()?;
        }
        Ok(pool)
    }

    /// Open at a given commit's superblock (repair tries the older slot),
    /// with its intent log replayed in memory (not committed).
    pub(crate) fn open_at(storage: Box<dyn Storage>, path: &Path, sb: Superblock) -> Result<Pool> {
        let mut pool = Pool::open_shared(storage.into(), path, sb)?;
        pool.replay_log()?;
        Ok(pool)
    }

    /// `open_at` for inspection: a log that cannot be applied to
    /// this commit's maps (a damaged node on a record's path) is left out,
    /// and the commit is shown as it is (with the damage, which `check`
    /// reports), rather than not opening at all.
    pub(crate) fn open_at_inspect(
        storage: Box<dyn Storage>,
        path: &Path,
        sb: Superblock,
    ) -> Result<Pool> {
        let storage: Arc<dyn Storage> = storage.into();
        let mut pool = Pool::open_shared(storage.clone(), path, sb.clone())?;
        let Err(e) = pool.replay_log() else {
            return Ok(pool);
        };
        // Half applied: nothing of it may be committed.
        pool.fail("the intent log could not be replayed");
        let Error::Corrupt(why) = e else {
            return Err(e);
        };
        let generation = sb.generation;
        let mut pool = Pool::open_shared(storage, path, sb)?;
        pool.replayed = Some(super::LogReplay {
            generation,
            records: 0,
            end_slot: 0,
            end: format!("not replayed: {why}"),
        });
        Ok(pool)
    }

    /// The last commit of `storage`, for inspection only, beside the pool
    /// that owns the storage (which must not commit meanwhile). Its log
    /// is the owner's: not replayed.
    pub(crate) fn open_committed(storage: Arc<dyn Storage>, path: &Path) -> Result<Pool> {
        let sb = Pool::read_superblock(&*storage, path)?;
        let mut pool = Pool::open_shared(storage, path, sb)?;
        pool.read_only = true;
        Ok(pool)
    }

    fn open_shared(storage: Arc<dyn Storage>, path: &Path, sb: Superblock) -> Result<Pool> {
        let bs = sb.block_size;
        let total = sb.total_blocks;
        let per_rc = refcounts_per_page(bs);
        let n_rc_pages = usize::try_from(total)
            .map_err(|_| Error::corrupt("pool too large for this machine"))?
            .div_ceil(per_rc);
        // Allocate only once the table's shape is known to be sane.
        PagedArray::check_shape(
            PageType::Refcount,
            bs,
            n_rc_pages,
            sb.rc_index.len(),
            RC_INDEX_MAX,
        )?;
        check_memory(total, bs)?;
        let mut rc = try_vec(total as usize, 0u32, "refcount table")?;
        let rc_layout = PagedArray::new(PageType::Refcount, bs, 0, RC_INDEX_MAX)?.load(
            n_rc_pages,
            &sb.rc_index,
            &*storage,
            total,
            sb.generation,
            |page, bytes| {
                let first = page * per_rc;
                let n = per_rc.min(rc.len() - first);
                LE::read_u32_into(&bytes[..4 * n], &mut rc[first..first + n]);
                Ok(())
            },
        )?;
        let reserved = format::reserved_blocks(bs);
        if rc[..reserved as usize].iter().any(|&c| c != 1) {
            return Err(Error::corrupt("refcounts of the superblock area are not 1"));
        }
        let space = SpaceMap::from_refcounts(rc, reserved, sb.metadata_blocks, per_rc)?;
        if sb.metadata_blocks > space.used() {
            return Err(Error::corrupt(format!(
                "superblock counts {} metadata blocks but only {} blocks are in use",
                sb.metadata_blocks,
                space.used()
            )));
        }
        let catalog = Catalog::load(
            bs,
            sb.catalog_slots,
            &sb.cat_index,
            &*storage,
            total,
            sb.generation,
        )?;
        catalog.validate(&RecordLimits {
            block_size: bs,
            fanout: format::pointers_per_page(bs),
            total_blocks: total,
            first_block: reserved,
            next_volume_id: sb.next_volume_id,
        })?;
        let annotations = Annotations::load(
            bs,
            sb.annot_len,
            sb.annot_pages,
            &sb.annot_index,
            &*storage,
            total,
            sb.generation,
        )?;
        if let Some(id) = annotations.ids().find(|&id| catalog.get(id).is_err()) {
            return Err(Error::corrupt(format!(
                "annotation for volume {id}, which does not exist"
            )));
        }
        let committed = sb.generation;
        let mut pool = Pool {
            path: path.to_path_buf(),
            storage,
            sb,
            space,
            rc_layout,
            catalog,
            annotations,
            nodes: Nodes::new(bs, total, reserved, committed),
            data_dirty: false,
            failed: None,
            read_only: false,
            log: Default::default(),
            replayed: None,
        };
        pool.log = super::log::Log::new(&pool.sb);
        pool.check_table_pages()?;
        pool.update_reserve();
        Ok(pool)
    }

    /// No block may hold two table pages (each table checked its own at
    /// load), nor a table page and the log; the log's blocks are in use.
    fn check_table_pages(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for p in self.table_pages() {
            if !seen.insert(p) {
                return Err(Error::corrupt(format!(
                    "block {p} holds pages of both the refcount and the catalog table"
                )));
            }
        }
        for b in self.log_blocks() {
            if seen.contains(&b) || self.space.rc(b) != 1 {
                return Err(Error::corrupt(format!(
                    "intent log block {b} is also a table page or not counted as used (refcount {})",
                    self.space.rc(b)
                )));
            }
        }
        Ok(())
    }

    /// The valid superblock slot with the highest generation.
    fn read_superblock(storage: &dyn Storage, path: &Path) -> Result<Superblock> {
        let len = storage.len()?;
        let mut buf = vec![0u8; 2 * SUPERBLOCK_SLOT_SIZE];
        let n = (len as usize).min(buf.len());
        if n < 8 {
            return Err(Error::NotAPool {
                path: path.to_path_buf(),
            });
        }
        storage.read_at(&mut buf[..n], 0)?;
        let slots = [
            Superblock::decode(&buf[..SUPERBLOCK_SLOT_SIZE]),
            Superblock::decode(&buf[SUPERBLOCK_SLOT_SIZE..]),
        ];
        for s in &slots {
            if let Err(SlotError::Version(v)) = s {
                return Err(Error::UnsupportedVersion {
                    path: path.to_path_buf(),
                    found: *v,
                    supported: FORMAT_VERSION,
                });
            }
        }
        if slots.iter().all(|s| matches!(s, Err(SlotError::BadMagic))) {
            return Err(Error::NotAPool {
                path: path.to_path_buf(),
            });
        }
        let best = slots
            .iter()
            .filter_map(|s| s.as_ref().ok())
            .max_by_key(|s| s.generation);
        match best {
            Some(sb) => Ok(sb.clone()),
            None => Err(Error::corrupt(format!(
                "no valid superblock (slot 0: {:?}, slot 1: {:?})",
                slots[0].as_ref().err(),
                slots[1].as_ref().err()
            ))),
        }
    }
}
