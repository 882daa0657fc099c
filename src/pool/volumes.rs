//! Volume management: create, snapshot/clone, remove, rename, resize, list.
//! Every change commits before returning.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{Pool, VolumeId, VolumeInfo, MAX_VOLUME_SIZE};
use crate::catalog::validate_name;
use crate::error::{Error, Result};
use crate::format::{self, VolumeRecord};
use crate::map;

pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Pool {
    /// What `list` shows of one volume (walks its exclusive map nodes).
    pub(crate) fn record_info(&self, r: &VolumeRecord) -> Result<VolumeInfo> {
        let n_blocks = r.size.div_ceil(self.block_size() as u64);
        let excl = self.view().exclusive_blocks(r.root, r.depth, n_blocks)?;
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
            preallocated: r.preallocated,
            virtual_size: r.size,
            mapped_bytes: r.mapped_blocks * bs,
            exclusive_bytes: excl * bs,
            created: r.created,
            diff_digest: format::digest_hex(&r.diff_digest),
            chain_digest: format::digest_hex(&r.chain_digest),
        })
    }

    /// Every volume, in creation order. Reads metadata only, never data blocks.
    pub fn list(&mut self) -> Result<Vec<VolumeInfo>> {
        self.check_ok()?;
        let recs: Vec<VolumeRecord> = self.catalog.iter().cloned().collect();
        recs.iter().map(|r| self.record_info(r)).collect()
    }

    pub fn volume_info(&self, name: &str) -> Result<VolumeInfo> {
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
        let id = self.stage_create(name, size)?;
        self.commit()?;
        Ok(id)
    }

    /// `create_volume` without the commit (see `SharedPool::change`).
    pub fn stage_create(&mut self, name: &str, size: u64) -> Result<VolumeId> {
        self.check_mutable()?;
        validate_name(name)?;
        if size == 0 || size > MAX_VOLUME_SIZE {
            return Err(Error::InvalidArgument(format!(
                "volume size must be from 1 byte to 8E, not {size}"
            )));
        }
        let fanout = format::pointers_per_page(self.block_size());
        let id = self.new_volume_id()?;
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
        Ok(id)
    }

    /// O(1) snapshot (`writable == false`) or clone (`true`) of `source` (commits).
    pub fn snapshot(&mut self, source: &str, name: &str, writable: bool) -> Result<VolumeId> {
        self.snapshot_annotated(source, name, writable, None)
    }

    /// `snapshot`, with the new volume's annotation in the same commit.
    pub fn snapshot_annotated(
        &mut self,
        source: &str,
        name: &str,
        writable: bool,
        annotation: Option<Vec<u8>>,
    ) -> Result<VolumeId> {
        let id = self.stage_snapshot(source, name, writable, annotation)?;
        self.commit()?;
        Ok(id)
    }

    /// `snapshot_annotated` without the commit: a served pool commits it
    /// outside the engine lock (`SharedPool::change`).
    pub fn stage_snapshot(
        &mut self,
        source: &str,
        name: &str,
        writable: bool,
        annotation: Option<Vec<u8>>,
    ) -> Result<VolumeId> {
        self.check_mutable()?;
        if annotation
            .as_ref()
            .is_some_and(|a| a.len() > crate::annotations::ANNOTATION_MAX)
        {
            return Err(Error::InvalidArgument("annotation too large".into()));
        }
        validate_name(name)?;
        if self.catalog.id_of(name).is_ok() {
            return Err(Error::VolumeExists(name.to_string()));
        }
        let src = self.catalog.get_by_name(source)?.clone();
        // A snapshot must not change once taken: let writes in flight land.
        self.space.inflight().wait_no_writes();
        let id = self.new_volume_id()?;
        if annotation.is_some() {
            // First: the one step here that can fail for its size.
            self.annotations.set(id, annotation)?;
        }
        if let Err(e) = self.catalog.insert(VolumeRecord {
            id,
            parent_id: src.id,
            created: now(),
            read_only: !writable,
            // Its blocks are shared now: the copy allocates as it writes.
            preallocated: false,
            name: name.to_string(),
            // A copy is not the committed layer itself (`layer::commit` sets these).
            diff_digest: [0; 32],
            chain_digest: [0; 32],
            ..src.clone()
        }) {
            self.annotations.set(id, None)?;
            return Err(e);
        }
        if src.root != 0 {
            // The whole tree is shared by one more owner: one increment.
            let r = self.space.inc(src.root);
            self.fail_on_corrupt(r)?;
        }
        Ok(id)
    }

    /// The id for a new volume (ids are never reused), taken.
    fn new_volume_id(&mut self) -> Result<VolumeId> {
        let id = self.sb.next_volume_id;
        self.sb.next_volume_id = id
            .checked_add(1)
            .ok_or_else(|| Error::corrupt("the next volume id is at its largest value"))?;
        Ok(id)
    }

    /// Remove a volume, freeing blocks only it held (commits).
    pub fn remove_volume(&mut self, name: &str) -> Result<()> {
        self.stage_remove(name)?;
        self.commit()
    }

    /// `remove_volume` without the commit (see `SharedPool::change`).
    pub fn stage_remove(&mut self, name: &str) -> Result<()> {
        self.check_mutable()?;
        let id = self.catalog.id_of(name)?;
        let rec = self.catalog.remove(id)?;
        self.annotations.set(id, None)?;
        if rec.root != 0 {
            let r = self.ctx().release(rec.root, rec.depth - 1);
            self.fail_on_corrupt(r)?;
        }
        Ok(())
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
        let bs = self.block_size() as u64;
        let (old_n, new_n) = (rec.size.div_ceil(bs), size.div_ceil(bs));
        // A preallocated volume stays one: its new blocks are taken (and
        // zeroed) before anything changes, and mapped once the tree is tall enough.
        let runs = match rec.preallocated {
            true => self.prealloc_for_growth(name, old_n, new_n, need)?,
            false => Vec::new(),
        };
        let (mut root, mut depth) = (rec.root, rec.depth);
        if let Err(e) = self.ctx().grow(&mut root, &mut depth, need) {
            if !runs.is_empty() {
                // Taken blocks no map holds must not be committed.
                self.fail(&format!(
                    "growing a preallocated volume failed half way: {e}"
                ));
            }
            return Err(e);
        }
        let r = self.catalog.get_mut(id)?;
        r.root = root;
        r.depth = depth;
        r.size = size;
        if !runs.is_empty() {
            self.map_runs(id, old_n, &runs)?;
        }
        self.commit()
    }

    /// Make volume `id` a read-only committed layer with these digests
    /// (committed by the caller).
    pub(crate) fn mark_layer(
        &mut self,
        id: VolumeId,
        diff: [u8; 32],
        chain: [u8; 32],
    ) -> Result<()> {
        let r = self.catalog.get_mut(id)?;
        r.read_only = true;
        r.diff_digest = diff;
        r.chain_digest = chain;
        Ok(())
    }
}
