//! The volume data path: read, write (copy-on-write of shared blocks),
//! discard and write-zeroes.

use super::{Pool, VolumeId};
use crate::error::{Error, Result};
use crate::format::VolumeRecord;
use crate::io::is_zero;
use crate::map;
use crate::pdata::alloc_block;
use crate::space::{Budget, Kind};

impl Pool {
    pub(super) fn check_writable(&self, id: VolumeId) -> Result<()> {
        let r = self.catalog.get(id)?;
        if r.read_only {
            return Err(Error::ReadOnly(r.name.clone()));
        }
        Ok(())
    }

    pub(super) fn check_range(&self, id: VolumeId, offset: u64, len: u64) -> Result<&VolumeRecord> {
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
            match self.view().lookup(root, depth, vb)? {
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
                if n == bs as usize && is_zero(chunk) {
                    // A whole block of zeros reads the same unmapped
                    // (qcow2's detect-zeroes=unmap): map nothing, or drop
                    // this volume's reference to what was there.
                    match self.unmap_if_mapped(id, vb) {
                        Err(Error::NoSpace | Error::HostFull) if self.space.has_pending() => {
                            self.write_runs(data, &mut runs)?;
                            self.commit()?;
                            self.unmap_if_mapped(id, vb)?
                        }
                        r => r?,
                    }
                    pos += n;
                    continue;
                }
                let placed = match self.place_block(id, vb, within, chunk) {
                    // Frees may be waiting for a commit: write what is placed,
                    // commit, and try once more before reporting ENOSPC.
                    Err(Error::NoSpace | Error::HostFull) if self.space.has_pending() => {
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
            Err(Error::NoSpace | Error::HostFull) if self.space.has_pending() => {
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
        if let Some(b) = self.view().lookup_private(root, depth, vb)? {
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
        let bs64 = bs as u64;
        let new = alloc_block(
            &mut self.space,
            &*self.storage,
            bs64,
            Kind::Data,
            Budget::Write,
        )?;
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
            .view()
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
        if self.view().lookup(root, depth, offset / bs)?.is_none() {
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

    /// `unmap_block`, but an unmapped block touches no map node at all.
    fn unmap_if_mapped(&mut self, id: VolumeId, vb: u64) -> Result<()> {
        let rec = self.catalog.get(id)?;
        if self.view().lookup(rec.root, rec.depth, vb)?.is_none() {
            return Ok(());
        }
        self.unmap_block(id, vb)
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
            .view()
            .mapped_in_range(root, depth, 0, n)?
            .into_iter()
            .map(|(v, _)| v)
            .collect())
    }
}
