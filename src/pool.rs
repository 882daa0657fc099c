//! The pool: open/create, the commit protocol, volumes and the data path.
//!
//! Commit (two-phase, shadowing): metadata reachable from the last committed
//! superblock is never overwritten. A commit writes every dirty map node,
//! gives every dirty refcount/catalog page a fresh location and writes it,
//! syncs, writes the superblock slot `generation % 2`, and syncs again.
//! Blocks freed during the transaction become allocatable only afterwards.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use byteorder::{ByteOrder, LittleEndian as LE};
use serde::{Deserialize, Serialize};

use crate::catalog::{validate_name, Catalog, RecordLimits};
use crate::error::{Error, Result};
use crate::format::{
    self, PageType, SlotError, Superblock, VolumeRecord, FORMAT_VERSION, PAGE_HEADER_SIZE,
    RC_INDEX_MAX, SUPERBLOCK_SLOT_SIZE,
};
use crate::io::{FileStorage, Storage};
use crate::map::{self, Ctx, Nodes};
use crate::space::{try_vec, Budget, Kind, PagedArray, SpaceMap};

/// Stable identifier of a volume inside its pool (never reused).
pub type VolumeId = u64;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Maximum pool size in bytes (the file is sparse and grows as blocks are used).
    pub size: u64,
    /// Block size in bytes: a power of two from 4 KiB to 2 MiB.
    pub block_size: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            block_size: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    pub id: VolumeId,
    pub name: String,
    /// Name of the volume this one was snapshotted/cloned from, if it still exists.
    pub parent: Option<String>,
    pub parent_id: Option<VolumeId>,
    pub read_only: bool,
    pub virtual_size: u64,
    /// Bytes of mapped blocks (ZFS `referenced`, Docker's virtual size).
    pub mapped_bytes: u64,
    /// Bytes of blocks no other volume shares (Docker's `size`, what `remove` frees).
    pub exclusive_bytes: u64,
    /// Creation time, seconds since the Unix epoch.
    pub created: u64,
    /// Committed layers: sha256 of the layer's changes against its parent
    /// (hex, see docs/LAYERS.md); None for volumes never committed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_digest: Option<String>,
    /// Committed layers: OCI-style chain digest over the parent chain (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    pub path: PathBuf,
    pub uuid: String,
    pub format_version: u32,
    pub generation: u64,
    pub block_size: u32,
    /// Maximum pool size in bytes.
    pub size: u64,
    pub total_blocks: u64,
    pub data_used_bytes: u64,
    pub data_free_bytes: u64,
    pub metadata_used_bytes: u64,
    pub volumes: usize,
    /// Warn when free space falls below this percentage of the pool
    /// (dm-thin's low-water mark).
    pub low_water_pct: u32,
    /// Free space is below the low-water mark.
    pub low_space: bool,
}

/// Low-water mark of a pool created without one.
pub const DEFAULT_LOW_WATER_PCT: u32 = 10;

pub use crate::format::MAX_VOLUME_SIZE;

pub struct Pool {
    path: PathBuf,
    pub(crate) storage: Box<dyn Storage>,
    /// The last committed superblock, updated in memory for the next commit.
    pub(crate) sb: Superblock,
    pub(crate) space: SpaceMap,
    pub(crate) rc_layout: PagedArray,
    pub(crate) catalog: Catalog,
    pub(crate) nodes: Nodes,
    /// Data was written in place since the last sync.
    data_dirty: bool,
    /// Set when a commit failed half way: memory no longer matches the file,
    /// so nothing more is done until the pool is reopened (at its last commit).
    failed: Option<String>,
    /// Opened for inspection (shared lock): nothing may change.
    read_only: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

fn uuid_string(u: &[u8; 16]) -> String {
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
    let file = OpenOptions::new().read(true).write(write).open(path)?;
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
    Ok(FileStorage::new(file))
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

/// The refcount table and two bitmaps live in memory (a little over 4 bytes a
/// block): refuse a pool that could not fit instead of aborting on allocation
/// (and a crafted superblock that claims such a pool).
fn check_memory(total_blocks: u64, block_size: u32) -> Result<()> {
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

fn refcounts_per_page(block_size: u32) -> usize {
    (block_size as usize - PAGE_HEADER_SIZE) / 4
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
        };
        let mut pool = Pool {
            path: path.to_path_buf(),
            storage,
            sb,
            space: SpaceMap::new(total, reserved, per_rc)?,
            rc_layout,
            catalog: Catalog::new(bs)?,
            nodes: Nodes::new(bs, total, reserved, 0),
            data_dirty: false,
            failed: None,
            read_only: false,
        };
        pool.commit_inner(true)?;
        Ok(pool)
    }

    /// Open for inspection only (info, list, check): a shared lock, so
    /// several readers may look at an unserved pool at once; nothing changes.
    pub fn open_read_only(path: &Path) -> Result<Pool> {
        let mut pool = Pool::open_with(Box::new(open_file(path, false)?), path)?;
        pool.read_only = true;
        Ok(pool)
    }

    /// Open an existing pool for reading and writing (exclusive lock).
    pub fn open(path: &Path) -> Result<Pool> {
        Pool::open_with(Box::new(open_file(path, true)?), path)
    }

    /// Open a pool on any storage, at its newest valid commit.
    pub fn open_with(storage: Box<dyn Storage>, path: &Path) -> Result<Pool> {
        let sb = Pool::read_superblock(&*storage, path)?;
        Pool::open_at(storage, path, sb)
    }

    /// Open at a given commit's superblock (repair tries the older slot).
    pub(crate) fn open_at(storage: Box<dyn Storage>, path: &Path, sb: Superblock) -> Result<Pool> {
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
        let committed = sb.generation;
        let mut pool = Pool {
            path: path.to_path_buf(),
            storage,
            sb,
            space,
            rc_layout,
            catalog,
            nodes: Nodes::new(bs, total, reserved, committed),
            data_dirty: false,
            failed: None,
            read_only: false,
        };
        pool.check_table_pages()?;
        pool.update_reserve();
        Ok(pool)
    }

    /// No block may hold two table pages (each table checked its own at load).
    fn check_table_pages(&self) -> Result<()> {
        let mut seen = std::collections::HashSet::new();
        for p in self.table_pages() {
            if !seen.insert(p) {
                return Err(Error::corrupt(format!(
                    "block {p} holds pages of both the refcount and the catalog table"
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

    /// Keep back enough blocks that a commit can always shadow its pages.
    fn update_reserve(&mut self) {
        let n = self.rc_layout.worst_case_pages() + self.catalog.layout.worst_case_pages() + 4;
        self.space.set_commit_reserve(n);
    }

    fn check_ok(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(m) => Err(Error::Corrupt(format!(
                "an earlier commit failed ({m}); reopen the pool to continue from its last commit"
            ))),
        }
    }

    pub(crate) fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            nodes: &mut self.nodes,
            space: &mut self.space,
            storage: &*self.storage,
        }
    }

    /// Blocks holding the refcount and catalog tables (data and index pages).
    pub(crate) fn table_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let rc = &self.rc_layout;
        let cat = &self.catalog.layout;
        rc.page_locations()
            .iter()
            .chain(rc.index_pointers())
            .chain(cat.page_locations())
            .chain(cat.index_pointers())
            .copied()
            .filter(|&p| p != 0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn block_size(&self) -> u32 {
        self.sb.block_size
    }

    pub fn uuid(&self) -> String {
        uuid_string(&self.sb.uuid)
    }

    /// Commit generation of the last commit.
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }

    pub fn info(&mut self) -> Result<PoolInfo> {
        let bs = self.block_size() as u64;
        let meta = self.space.meta();
        let used = self.space.used();
        let usable = self.space.total() - self.space.reserved();
        Ok(PoolInfo {
            path: self.path.clone(),
            uuid: self.uuid(),
            format_version: FORMAT_VERSION,
            generation: self.sb.generation,
            block_size: self.block_size(),
            size: self.space.total() * bs,
            total_blocks: self.space.total(),
            data_used_bytes: (used - meta) * bs,
            data_free_bytes: (usable - used) * bs,
            metadata_used_bytes: (meta + self.space.reserved()) * bs,
            volumes: self.catalog.len(),
            low_water_pct: self.low_water_pct(),
            low_space: (usable - used) * 100 < usable * self.low_water_pct() as u64,
        })
    }

    fn low_water_pct(&self) -> u32 {
        match self.sb.low_water_pct {
            0 => DEFAULT_LOW_WATER_PCT,
            p => p,
        }
    }

    /// Set the low-water mark: `info` warns when free space falls below
    /// `pct` percent of the pool (commits).
    pub fn set_low_water(&mut self, pct: u32) -> Result<()> {
        self.check_mutable()?;
        if !(1..=99).contains(&pct) {
            return Err(Error::InvalidArgument(format!(
                "low-water mark must be from 1% to 99%, not {pct}%"
            )));
        }
        self.sb.low_water_pct = pct;
        self.commit_inner(true)
    }

    /// Grow the pool's maximum size to `size` bytes (commits). The file is
    /// sparse, so this costs only the larger refcount table.
    pub fn grow(&mut self, size: u64) -> Result<()> {
        self.check_mutable()?;
        let bs = self.block_size() as u64;
        let total = size / bs;
        let old = self.space.total();
        if total < old {
            return Err(Error::InvalidArgument(format!(
                "the pool is {}; shrinking a pool is not supported",
                crate::size::format_size(old * bs)
            )));
        }
        if total == old {
            return Ok(());
        }
        if usize::try_from(total).is_err() {
            return Err(Error::InvalidArgument("pool size too large".into()));
        }
        check_memory(total, self.block_size())?;
        let pages = (total as usize).div_ceil(refcounts_per_page(self.block_size()));
        self.rc_layout.resize(pages).map_err(|_| {
            Error::InvalidArgument(format!(
                "{} is too large for a pool of {} blocks",
                crate::size::format_size(size),
                crate::size::format_size(bs)
            ))
        })?;
        self.space.grow(total);
        self.sb.total_blocks = total;
        self.nodes.set_total_blocks(total);
        self.commit_inner(true)
    }

    /// Stop using this pool: memory may no longer match a consistent state
    /// (a panic half way through a change). Nothing more is committed; the
    /// pool reopens at its last commit.
    pub fn fail(&mut self, why: &str) {
        if self.failed.is_none() {
            self.failed = Some(why.to_string());
        }
    }

    /// Refuse to change a pool opened for inspection only.
    fn check_mutable(&self) -> Result<()> {
        self.check_ok()?;
        if self.read_only {
            return Err(Error::InvalidArgument(format!(
                "pool {} is open read-only",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn record_info(&mut self, r: &VolumeRecord) -> Result<VolumeInfo> {
        let n_blocks = r.size.div_ceil(self.block_size() as u64);
        let excl = self.ctx().exclusive_blocks(r.root, r.depth, n_blocks)?;
        let parent = (r.parent_id != 0)
            .then(|| self.catalog.get(r.parent_id).ok().map(|p| p.name.clone()))
            .flatten();
        let bs = self.block_size() as u64;
        Ok(VolumeInfo {
            id: r.id,
            name: r.name.clone(),
            parent,
            parent_id: (r.parent_id != 0).then_some(r.parent_id),
            read_only: r.read_only,
            virtual_size: r.size,
            mapped_bytes: r.mapped_blocks * bs,
            exclusive_bytes: excl * bs,
            created: r.created,
            diff_digest: crate::layer::digest_hex(&r.diff_digest),
            chain_digest: crate::layer::digest_hex(&r.chain_digest),
        })
    }

    /// Every volume, in creation order. Reads metadata only, never data blocks.
    pub fn list(&mut self) -> Result<Vec<VolumeInfo>> {
        self.check_ok()?;
        let recs: Vec<VolumeRecord> = self.catalog.iter().cloned().collect();
        recs.iter().map(|r| self.record_info(r)).collect()
    }

    pub fn volume_info(&mut self, name: &str) -> Result<VolumeInfo> {
        self.check_ok()?;
        let r = self.catalog.get_by_name(name)?.clone();
        self.record_info(&r)
    }

    /// (id, name) of every volume in creation order: the catalog alone, no
    /// usage walk (what a directory listing needs).
    pub fn volume_names(&self) -> Vec<(VolumeId, String)> {
        self.catalog
            .iter()
            .map(|r| (r.id, r.name.clone()))
            .collect()
    }

    /// Name -> id (errors with `NoSuchVolume`).
    pub fn lookup(&self, name: &str) -> Result<VolumeId> {
        self.catalog.id_of(name)
    }

    /// Virtual size of a volume.
    pub fn volume_size(&self, id: VolumeId) -> Result<u64> {
        Ok(self.catalog.get(id)?.size)
    }

    pub fn is_read_only(&self, id: VolumeId) -> Result<bool> {
        Ok(self.catalog.get(id)?.read_only)
    }

    pub fn volume_name(&self, id: VolumeId) -> Result<String> {
        Ok(self.catalog.get(id)?.name.clone())
    }

    /// Create an empty thin volume of `size` bytes (commits).
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<VolumeId> {
        self.check_mutable()?;
        validate_name(name)?;
        if size == 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::InvalidArgument(format!(
                "volume size must be from 1 byte to 8E, not {size}"
            )));
        }
        let fanout = format::pointers_per_page(self.block_size());
        let id = self.sb.next_volume_id;
        self.catalog.insert(VolumeRecord {
            id,
            parent_id: 0,
            root: 0,
            size,
            mapped_blocks: 0,
            created: now(),
            depth: map::depth_for(size.div_ceil(self.block_size() as u64), fanout),
            read_only: false,
            name: name.to_string(),
            ..Default::default()
        })?;
        self.sb.next_volume_id += 1;
        self.commit()?;
        Ok(id)
    }

    /// O(1) snapshot (`writable == false`) or clone (`true`) of `source` (commits).
    pub fn snapshot(&mut self, source: &str, name: &str, writable: bool) -> Result<VolumeId> {
        self.check_mutable()?;
        validate_name(name)?;
        if self.catalog.id_of(name).is_ok() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let src = self.catalog.get_by_name(source)?.clone();
        let id = self.sb.next_volume_id;
        self.catalog.insert(VolumeRecord {
            id,
            parent_id: src.id,
            created: now(),
            read_only: !writable,
            name: name.to_string(),
            // A copy is not the committed layer itself (`layer::commit` sets these).
            diff_digest: [0; 32],
            chain_digest: [0; 32],
            ..src.clone()
        })?;
        if src.root != 0 {
            // The whole tree is shared by one more owner: one increment.
            self.space.inc(src.root)?;
        }
        self.sb.next_volume_id += 1;
        self.commit()?;
        Ok(id)
    }

    /// Remove a volume, freeing blocks only it held (commits).
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        self.check_mutable()?;
        let id = self.catalog.id_of(name)?;
        let rec = self.catalog.remove(id)?;
        if rec.root != 0 {
            let r = self.ctx().release(rec.root, rec.depth - 1);
            self.fail_on_corrupt(r)?;
        }
        self.commit()
    }

    pub fn rename_volume(&mut self, old: &str, new: &str) -> Result<()> {
        self.check_mutable()?;
        self.catalog.rename(old, new)?;
        self.commit()
    }

    /// Grow a volume's virtual size (commits).
    pub fn resize_volume(&mut self, name: &str, size: u64) -> Result<()> {
        self.check_mutable()?;
        let id = self.catalog.id_of(name)?;
        let rec = self.catalog.get(id)?.clone();
        if rec.read_only {
            return Err(Error::ReadOnly(name.to_string()));
        }
        if size < rec.size {
            return Err(Error::InvalidArgument(format!(
                "volume '{name}' is {} bytes; shrinking is not supported",
                rec.size
            )));
        }
        if size > MAX_VOLUME_SIZE {
            return Err(Error::InvalidArgument(
                "volume size must be at most 8E".into(),
            ));
        }
        let need = map::depth_for(
            size.div_ceil(self.block_size() as u64),
            format::pointers_per_page(self.block_size()),
        );
        let (mut root, mut depth) = (rec.root, rec.depth);
        self.ctx().grow(&mut root, &mut depth, need)?;
        let r = self.catalog.get_mut(id)?;
        r.root = root;
        r.depth = depth;
        r.size = size;
        self.commit()
    }

    fn check_writable(&self, id: VolumeId) -> Result<()> {
        let r = self.catalog.get(id)?;
        if r.read_only {
            return Err(Error::ReadOnly(r.name.clone()));
        }
        Ok(())
    }

    fn check_range(&self, id: VolumeId, offset: u64, len: u64) -> Result<&VolumeRecord> {
        let r = self.catalog.get(id)?;
        if offset.checked_add(len).is_none_or(|end| end > r.size) {
            return Err(Error::OutOfRange {
                volume: r.name.clone(),
                offset,
                len,
                size: r.size,
            });
        }
        Ok(r)
    }

    /// Read `buf.len()` bytes at `offset`; unmapped blocks read as zeros.
    pub fn read(&mut self, id: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_ok()?;
        let r = self.check_range(id, offset, buf.len() as u64)?;
        let (root, depth) = (r.root, r.depth);
        let bs = self.block_size() as u64;
        // Coalesce physically contiguous blocks into one read.
        let mut run: Option<(u64, usize, usize)> = None; // (file offset, buf start, len)
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (vb, within) = (at / bs, (at % bs) as usize);
            let n = (bs as usize - within).min(buf.len() - pos);
            match self.ctx().lookup(root, depth, vb)? {
                None => {
                    self.flush_run(&mut run, buf)?;
                    buf[pos..pos + n].fill(0);
                }
                Some(p) => {
                    let phys = p * bs + within as u64;
                    match &mut run {
                        Some((o, _, l)) if *o + *l as u64 == phys => *l += n,
                        _ => {
                            self.flush_run(&mut run, buf)?;
                            run = Some((phys, pos, n));
                        }
                    }
                }
            }
            pos += n;
        }
        self.flush_run(&mut run, buf)
    }

    fn flush_run(&self, run: &mut Option<(u64, usize, usize)>, buf: &mut [u8]) -> Result<()> {
        if let Some((o, start, len)) = run.take() {
            crate::io::read_pointed(&*self.storage, &mut buf[start..start + len], o, || {
                format!("data at byte {o}")
            })?;
        }
        Ok(())
    }

    /// Write at `offset`, copying shared blocks on first write.
    pub fn write(&mut self, id: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        self.check_mutable()?;
        self.check_writable(id)?;
        self.check_range(id, offset, data.len() as u64)?;
        let bs = self.block_size() as u64;
        // Bytes that go straight from `data` to the file, merged into runs
        // that are contiguous in both: (file offset, data start, length).
        let mut runs: Vec<(u64, usize, usize)> = Vec::new();
        let mut pos = 0usize;
        let result = (|| {
            while pos < data.len() {
                let at = offset + pos as u64;
                let (vb, within) = (at / bs, (at % bs) as usize);
                let n = (bs as usize - within).min(data.len() - pos);
                let chunk = &data[pos..pos + n];
                let placed = match self.place_block(id, vb, within, chunk) {
                    // Frees may be waiting for a commit: write what is placed,
                    // commit, and try once more before reporting ENOSPC.
                    Err(Error::NoSpace) if self.space.has_pending() => {
                        self.write_runs(data, &mut runs)?;
                        self.commit()?;
                        self.place_block(id, vb, within, chunk)?
                    }
                    r => r?,
                };
                if let Some(phys) = placed {
                    match runs.last_mut() {
                        Some((o, start, len))
                            if *o + *len as u64 == phys && *start + *len == pos =>
                        {
                            *len += n
                        }
                        _ => runs.push((phys, pos, n)),
                    }
                }
                pos += n;
            }
            Ok(())
        })();
        // Blocks already mapped must get their data whatever happened after.
        self.write_runs(data, &mut runs)?;
        self.fail_on_corrupt(result)
    }

    /// Damage found half way through a change leaves the open transaction
    /// inconsistent: stop using the pool (it reopens at its last commit)
    /// rather than commit a half-made change.
    fn fail_on_corrupt<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Error::Corrupt(m)) = &r {
            self.fail(m);
        }
        r
    }

    /// Write the planned runs. The maps already point at these blocks, so an
    /// I/O error here leaves the open transaction unusable: fail the pool
    /// back to its last commit rather than expose stale block contents.
    fn write_runs(&mut self, data: &[u8], runs: &mut Vec<(u64, usize, usize)>) -> Result<()> {
        for (o, start, len) in runs.drain(..) {
            if let Err(e) = self.storage.write_at(&data[start..start + len], o) {
                self.failed = Some(format!("data write failed: {e}"));
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// A full pool may only look full because frees wait for the commit:
    /// commit once and try again before reporting ENOSPC.
    fn retry_on_full(&mut self, mut op: impl FnMut(&mut Pool) -> Result<()>) -> Result<()> {
        match op(self) {
            Err(Error::NoSpace) if self.space.has_pending() => {
                self.commit()?;
                op(self)
            }
            r => r,
        }
    }

    /// Map `chunk` of virtual block `vb` to a block this volume may write.
    /// Returns the file offset where `chunk` goes when it can be written
    /// as is (in place, or a whole new block); a partial write to a block
    /// that must be copied is merged and written here, returning None.
    fn place_block(
        &mut self,
        id: VolumeId,
        vb: u64,
        within: usize,
        chunk: &[u8],
    ) -> Result<Option<u64>> {
        let bs = self.block_size() as usize;
        let rec = self.catalog.get(id)?;
        let (root, depth) = (rec.root, rec.depth);
        if let Some(b) = self.ctx().lookup_private(root, depth, vb)? {
            self.data_dirty = true;
            return Ok(Some(b * bs as u64 + within as u64));
        }
        let leaf = self
            .leaf_for_update(id, vb, true)?
            .expect("create=true always yields a leaf");
        let s = map::slot(vb, 0, self.nodes.fanout());
        let old = self.nodes.get_mut(leaf)?[s];
        self.data_dirty = true;
        if old != 0 && self.space.can_overwrite(old) {
            return Ok(Some(old * bs as u64 + within as u64));
        }
        let new = self.space.alloc(Kind::Data, Budget::Write)?;
        let placed = if chunk.len() == bs {
            // A whole block needs no read of the old one.
            Some(new * bs as u64)
        } else {
            let mut buf = vec![0u8; bs];
            let merged = (|| {
                if old != 0 {
                    self.storage.read_at(&mut buf, old * bs as u64)?;
                }
                buf[within..within + chunk.len()].copy_from_slice(chunk);
                self.storage.write_at(&buf, new * bs as u64)
            })();
            if let Err(e) = merged {
                self.space.dec(new, Kind::Data)?;
                return Err(e.into());
            }
            None
        };
        self.nodes.get_mut(leaf)?[s] = new;
        if old != 0 {
            self.space.dec(old, Kind::Data)?;
        } else {
            self.catalog.get_mut(id)?.mapped_blocks += 1;
        }
        Ok(placed)
    }

    /// Unmap whole blocks in the range (dropping references); zero the partial rest.
    pub fn discard(&mut self, id: VolumeId, offset: u64, len: u64) -> Result<()> {
        self.check_mutable()?;
        self.check_writable(id)?;
        self.check_range(id, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.block_size() as u64;
        let end = offset + len;
        let first_full = offset.div_ceil(bs);
        let end_full = end / bs;
        // Partial head and tail: zero them in place (only if mapped).
        if first_full > end_full {
            return self.zero_partial(id, offset, len);
        }
        if offset < first_full * bs {
            self.zero_partial(id, offset, first_full * bs - offset)?;
        }
        if end_full * bs < end {
            self.zero_partial(id, end_full * bs, end - end_full * bs)?;
        }
        let rec = self.catalog.get(id)?;
        let (root, depth) = (rec.root, rec.depth);
        let mapped = self
            .ctx()
            .mapped_in_range(root, depth, first_full, end_full)?;
        for (vb, _) in mapped {
            let r = self.retry_on_full(|p| p.unmap_block(id, vb));
            self.fail_on_corrupt(r)?;
        }
        Ok(())
    }

    fn zero_partial(&mut self, id: VolumeId, offset: u64, len: u64) -> Result<()> {
        let bs = self.block_size() as u64;
        let rec = self.catalog.get(id)?;
        let (root, depth) = (rec.root, rec.depth);
        if self.ctx().lookup(root, depth, offset / bs)?.is_none() {
            return Ok(());
        }
        let zeros = vec![0u8; len as usize];
        self.write(id, offset, &zeros)
    }

    /// Shadow the path to `vb` in volume `id` (see `Ctx::leaf_for_update`),
    /// recording a new root even if shadowing failed half way.
    fn leaf_for_update(&mut self, id: VolumeId, vb: u64, create: bool) -> Result<Option<u64>> {
        let rec = self.catalog.get(id)?;
        let (mut root, depth) = (rec.root, rec.depth);
        let leaf = self.ctx().leaf_for_update(&mut root, depth, vb, create);
        if root != self.catalog.get(id)?.root {
            self.catalog.get_mut(id)?.root = root;
        }
        leaf
    }

    fn unmap_block(&mut self, id: VolumeId, vb: u64) -> Result<()> {
        let Some(leaf) = self.leaf_for_update(id, vb, false)? else {
            return Ok(());
        };
        let s = map::slot(vb, 0, self.nodes.fanout());
        let old = std::mem::take(&mut self.nodes.get_mut(leaf)?[s]);
        if old != 0 {
            self.space.dec(old, Kind::Data)?;
            let r = self.catalog.get_mut(id)?;
            r.mapped_blocks = r.mapped_blocks.checked_sub(1).ok_or_else(|| {
                Error::corrupt(format!(
                    "volume '{}': mapped block count is too low",
                    r.name
                ))
            })?;
        }
        Ok(())
    }

    /// Make the range read as zeros (same as discard: unmapped blocks read as zeros).
    pub fn write_zeroes(&mut self, id: VolumeId, offset: u64, len: u64) -> Result<()> {
        self.discard(id, offset, len)
    }

    /// Virtual block numbers that are mapped in `id`, ascending (metadata only).
    pub fn mapped_blocks(&mut self, id: VolumeId) -> Result<Vec<u64>> {
        self.check_ok()?;
        let r = self.catalog.get(id)?;
        let (root, depth, n) = (r.root, r.depth, r.size.div_ceil(self.block_size() as u64));
        Ok(self
            .ctx()
            .mapped_in_range(root, depth, 0, n)?
            .into_iter()
            .map(|(v, _)| v)
            .collect())
    }

    /// Make everything written so far durable (two-phase commit).
    pub fn commit(&mut self) -> Result<()> {
        self.check_ok()?;
        self.commit_inner(false)
    }

    /// Commit even with nothing changed: writes a new superblock into the
    /// other slot (repair uses it to replace a damaged slot).
    pub(crate) fn commit_forced(&mut self) -> Result<()> {
        self.check_ok()?;
        self.commit_inner(true)
    }

    fn commit_inner(&mut self, force: bool) -> Result<()> {
        let meta_dirty = self.nodes.has_dirty()
            || !self.space.dirty_pages().is_empty()
            || !self.catalog.dirty_pages().is_empty();
        if self.read_only {
            if meta_dirty || force || self.data_dirty {
                return Err(Error::InvalidArgument("pool is open read-only".into()));
            }
            return Ok(());
        }
        if !meta_dirty && !force {
            if self.data_dirty {
                self.storage.sync()?;
                self.data_dirty = false;
            }
            return Ok(());
        }
        match self.write_commit() {
            Ok(()) => {
                self.data_dirty = false;
                let freed = self.space.end_transaction();
                self.catalog.clear_dirty();
                self.punch(freed);
                // The catalog or the pool may have grown: so may the reserve.
                self.update_reserve();
                Ok(())
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn write_commit(&mut self) -> Result<()> {
        let generation = self.sb.generation + 1;
        self.nodes.write_dirty(&*self.storage, generation)?;
        // Shadowing a page allocates, which dirties refcount pages: repeat
        // until every dirty page has a home the last commit does not use.
        loop {
            let cat_dirty = self.catalog.dirty_pages().clone();
            let a = self.catalog.layout.shadow(&cat_dirty, &mut self.space)?;
            let rc_dirty = self.space.dirty_pages().clone();
            let b = self.rc_layout.shadow(&rc_dirty, &mut self.space)?;
            if !a && !b {
                break;
            }
        }
        self.catalog.write_dirty(&*self.storage, generation)?;
        let per_rc = refcounts_per_page(self.block_size());
        let rc = self.space.refcounts();
        self.rc_layout.write(
            self.space.dirty_pages(),
            &*self.storage,
            generation,
            |p, buf| {
                let first = p * per_rc;
                let n = per_rc.min(rc.len() - first);
                LE::write_u32_into(&rc[first..first + n], &mut buf[..4 * n]);
            },
        )?;
        self.storage.sync()?;
        let mut sb = self.sb.clone();
        sb.generation = generation;
        sb.metadata_blocks = self.space.meta();
        sb.catalog_slots = self.catalog.n_slots();
        sb.rc_index = self.rc_layout.index_pointers().to_vec();
        sb.cat_index = self.catalog.layout.index_pointers().to_vec();
        let slot = (generation % 2) * SUPERBLOCK_SLOT_SIZE as u64;
        self.storage.write_at(&sb.encode(), slot)?;
        self.storage.sync()?;
        self.sb = sb;
        self.nodes.set_generation(generation);
        Ok(())
    }

    /// Give freed blocks' space back to the host file system (best effort).
    fn punch(&self, mut freed: Vec<u64>) {
        freed.sort_unstable();
        let bs = self.block_size() as u64;
        let mut i = 0;
        while i < freed.len() {
            let start = freed[i];
            let mut end = start + 1;
            while i + 1 < freed.len() && freed[i + 1] == end {
                i += 1;
                end += 1;
            }
            let _ = self.storage.punch(start * bs, (end - start) * bs);
            i += 1;
        }
    }

    /// Commit and close. Dropping a pool commits too, but cannot report errors.
    pub fn close(mut self) -> Result<()> {
        let r = self.commit();
        self.failed = Some("closed".into());
        r
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.failed.is_none() {
            let _ = self.commit_inner(false);
        }
    }
}
