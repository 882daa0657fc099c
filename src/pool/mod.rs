//! The pool: a small public façade over the engine, whose parts each have
//! their own room (file):
//!
//! - `open`: create and open a pool file, and its owner lock;
//! - `commit`: the commit protocol (the one place a commit happens);
//! - `data`: the volume data path (read, write, discard, write-zeroes);
//! - `volumes`: volume management (create, snapshot, clone, remove, ...);
//! - `settings`: pool-wide settings and usage (info, low-water, grow);
//! - `annotate`: per-volume annotations (the containerd snapshotter's records);
//! - `log`: the intent log (records of map changes, replay at open);
//! - `shared`: the pool shared by many threads (the export server), with
//!   data I/O outside the engine lock and group commit.

mod annotate;
mod commit;
#[cfg(feature = "test-support")]
pub mod damage;
mod data;
mod geometry;
mod log;
pub(crate) mod open;
mod prealloc;
mod settings;
mod shared;
mod volumes;

pub use log::{LogInfo, LogReplay};
pub use prealloc::Progress;
pub use shared::{CommitStats, SharedPool};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::annotations::Annotations;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::format::{Superblock, VolumeRecord};
use crate::io::Storage;
use crate::map::{Ctx, Nodes, View};
use crate::pdata::PagedArray;
use crate::space::SpaceMap;

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
    /// Every block allocated and mapped at creation (`volume create --preallocate`).
    #[serde(default)]
    pub preallocated: bool,
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
    /// Volumes created with `--preallocate`, and their virtual bytes.
    #[serde(default)]
    pub preallocated_volumes: usize,
    #[serde(default)]
    pub preallocated_bytes: u64,
    /// The pool file is opened `O_DIRECT` (only known of a served pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_io: Option<bool>,
    /// Warn when free space falls below this percentage of the pool
    /// (dm-thin's low-water mark).
    pub low_water_pct: u32,
    /// Free space is below the low-water mark.
    pub low_space: bool,
    /// Flushes and commits since the pool was opened, when it is served
    /// (`thinpool info --json` asks the server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<CommitStats>,
    /// The intent log: where, how big, records since the last commit
    /// (None: the pool has no log).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<LogInfo>,
}

/// Low-water mark of a pool created without one.
pub const DEFAULT_LOW_WATER_PCT: u32 = 10;

pub use crate::format::MAX_VOLUME_SIZE;

pub struct Pool {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    /// The last committed superblock, updated in memory for the next commit.
    sb: Superblock,
    space: SpaceMap,
    rc_layout: PagedArray,
    catalog: Catalog,
    annotations: Annotations,
    nodes: Nodes,
    /// Data was written in place since the last sync.
    data_dirty: bool,
    /// Set when a commit failed half way: memory no longer matches the file,
    /// so nothing more is done until the pool is reopened (at its last commit).
    failed: Option<String>,
    /// Opened for inspection (shared lock): nothing may change.
    read_only: bool,
    /// The intent log: where it is and the current epoch.
    log: log::Log,
    /// What replaying the log at open found.
    replayed: Option<LogReplay>,
}

impl Pool {
    pub(crate) fn check_ok(&self) -> Result<()> {
        match &self.failed {
            None => Ok(()),
            Some(m) => Err(Error::Corrupt(format!(
                "an earlier commit failed ({m}); reopen the pool to continue from its last commit"
            ))),
        }
    }

    /// The maps, read-only.
    pub(crate) fn view(&self) -> View<'_> {
        View {
            nodes: &self.nodes,
            space: &self.space,
            storage: &*self.storage,
        }
    }

    pub(crate) fn ctx(&mut self) -> Ctx<'_> {
        Ctx {
            nodes: &mut self.nodes,
            space: &mut self.space,
            storage: &*self.storage,
        }
    }

    /// The pool file (or the storage standing in for it).
    pub(crate) fn storage(&self) -> &dyn Storage {
        &*self.storage
    }

    /// The storage, shared with I/O done outside the engine lock.
    pub(crate) fn storage_arc(&self) -> Arc<dyn Storage> {
        self.storage.clone()
    }

    /// Refcounts and free space (read-only: only the engine changes them).
    pub(crate) fn space(&self) -> &SpaceMap {
        &self.space
    }

    /// Map node fan-out: pointers per node.
    pub(crate) fn fanout(&self) -> usize {
        self.nodes.fanout()
    }

    /// Every volume record, in creation order.
    pub(crate) fn records(&self) -> impl Iterator<Item = &VolumeRecord> + '_ {
        self.catalog.iter()
    }

    /// The record of volume `name`.
    pub(crate) fn record(&self, name: &str) -> Result<&VolumeRecord> {
        self.catalog.get_by_name(name)
    }

    /// The record of volume `id`.
    pub(crate) fn record_by_id(&self, id: VolumeId) -> Result<&VolumeRecord> {
        self.catalog.get(id)
    }

    /// Blocks holding the refcount, catalog and annotation tables (data and index pages).
    pub(crate) fn table_pages(&self) -> impl Iterator<Item = u64> + '_ {
        let rc = &self.rc_layout;
        let cat = self.catalog.layout();
        let ann = self.annotations.layout();
        rc.page_locations()
            .iter()
            .chain(rc.index_pointers())
            .chain(cat.page_locations())
            .chain(cat.index_pointers())
            .chain(ann.page_locations())
            .chain(ann.index_pointers())
            .copied()
            .filter(|&p| p != 0)
    }

    /// Blocks of the intent log (metadata, refcount 1, owned by the superblock).
    pub(crate) fn log_blocks(&self) -> std::ops::Range<u64> {
        self.sb.log_start..self.sb.log_start + self.sb.log_blocks as u64
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn block_size(&self) -> u32 {
        self.sb.block_size
    }

    /// Commit generation of the last commit.
    pub fn generation(&self) -> u64 {
        self.sb.generation
    }

    /// Stop using this pool: memory may no longer match a consistent state
    /// (a panic half way through a change). Nothing more is committed; the
    /// pool reopens at its last commit.
    pub fn fail(&mut self, why: &str) {
        if self.failed.is_none() {
            self.failed = Some(why.to_string());
        }
    }

    /// Damage found half way through a change leaves the open transaction
    /// inconsistent: stop using the pool (it reopens at its last commit)
    /// rather than commit a half-made change.
    pub(super) fn fail_on_corrupt<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(Error::Corrupt(m)) = &r {
            self.fail(m);
        }
        r
    }

    /// Refuse to change a pool opened for inspection only.
    pub(super) fn check_mutable(&self) -> Result<()> {
        self.check_ok()?;
        if self.read_only {
            return Err(Error::PoolReadOnly(self.path.clone()));
        }
        Ok(())
    }
}
