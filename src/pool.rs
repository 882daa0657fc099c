//! The pool: open/create, transactions and commit, the volume catalog and the
//! data path. (Engine work in progress: public signatures are final.)

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::Result;

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
        CreateOptions { size: 0, block_size: 64 * 1024 }
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
}

pub struct Pool {
    _private: (),
}

#[allow(unused_variables)]
impl Pool {
    /// Create a new pool file (fails if `path` exists).
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Pool> { todo!() }
    /// Open an existing pool for reading and writing (exclusive lock).
    pub fn open(path: &Path) -> Result<Pool> { todo!() }
    pub fn path(&self) -> &Path { todo!() }
    pub fn block_size(&self) -> u32 { todo!() }
    pub fn info(&mut self) -> Result<PoolInfo> { todo!() }
    /// Every volume, in creation order. Reads metadata only, never data blocks.
    pub fn list(&mut self) -> Result<Vec<VolumeInfo>> { todo!() }
    pub fn volume_info(&mut self, name: &str) -> Result<VolumeInfo> { todo!() }
    /// Name -> id (errors with `NoSuchVolume`).
    pub fn lookup(&self, name: &str) -> Result<VolumeId> { todo!() }
    /// Virtual size of a volume.
    pub fn volume_size(&self, id: VolumeId) -> Result<u64> { todo!() }
    pub fn is_read_only(&self, id: VolumeId) -> Result<bool> { todo!() }
    /// Create an empty thin volume of `size` bytes (commits).
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<VolumeId> { todo!() }
    /// O(1) snapshot (`writable == false`) or clone (`true`) of `source` (commits).
    pub fn snapshot(&mut self, source: &str, name: &str, writable: bool) -> Result<VolumeId> { todo!() }
    /// Remove a volume, freeing blocks only it held (commits).
    pub fn remove_volume(&mut self, name: &str) -> Result<()> { todo!() }
    pub fn rename_volume(&mut self, old: &str, new: &str) -> Result<()> { todo!() }
    /// Grow a volume's virtual size (commits).
    pub fn resize_volume(&mut self, name: &str, size: u64) -> Result<()> { todo!() }
    /// Read `buf.len()` bytes at `offset`; unmapped blocks read as zeros.
    pub fn read(&mut self, id: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> { todo!() }
    /// Write at `offset`, copying shared blocks on first write.
    pub fn write(&mut self, id: VolumeId, offset: u64, data: &[u8]) -> Result<()> { todo!() }
    /// Unmap whole blocks in the range (dropping references); zero the partial rest.
    pub fn discard(&mut self, id: VolumeId, offset: u64, len: u64) -> Result<()> { todo!() }
    /// Make the range read as zeros (same as discard: unmapped blocks read as zeros).
    pub fn write_zeroes(&mut self, id: VolumeId, offset: u64, len: u64) -> Result<()> { todo!() }
    /// Make everything written so far durable (two-phase commit).
    pub fn commit(&mut self) -> Result<()> { todo!() }
}
