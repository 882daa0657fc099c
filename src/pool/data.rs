//! The volume data path: read, write (copy-on-write of shared blocks),
//! discard and write-zeroes.

use super::{Pool, VolumeId};
use crate::error::{Error, Result};
use crate::format::VolumeRecord;
use crate::io::{is_zero, Storage};
use crate::map;
use crate::pdata::alloc_block;
use crate::space::{Budget, InFlight, Kind, Ticket};

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
        let plan = self.plan_read(id, offset, buf.len())?;
        plan.run(&*self.storage, self.space.inflight(), buf)
    }

    /// Where the bytes of a read come from, with its blocks pinned: the
    /// pread itself needs no engine lock.
    pub(crate) fn plan_read(&self, id: VolumeId, offset: u64, len: usize) -> Result<ReadPlan> {
        self.check_ok()?;
        let r = self.check_range(id, offset, len as u64)?;
        let (root, depth) = (r.root, r.depth);
        let bs = self.block_size() as u64;
        let view = self.view();
        let mut runs: Vec<Run> = Vec::new();
        let mut zeros: Vec<(usize, usize)> = Vec::new();
        let mut blocks = Vec::new();
        let mut pos = 0usize;
        while pos < len {
            let at = offset + pos as u64;
            let (vb, within) = (at / bs, (at % bs) as usize);
            let n = (bs as usize - within).min(len - pos);
            match view.lookup(root, depth, vb)? {
                None => zeros.push((pos, n)),
                Some(p) => {
                    blocks.push(p);
                    push_run(&mut runs, p * bs + within as u64, pos, n);
                }
            }
            pos += n;
        }
        let ticket = self.space.inflight().begin(blocks, Vec::new(), false);
        Ok(ReadPlan {
            runs,
            zeros,
            ticket,
        })
    }

    /// Write at `offset`, copying shared blocks on first write.
    pub fn write(&mut self, id: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let mut pos = 0;
        let mut committed = false;
        loop {
            let (plan, placed) = self.plan_write(id, offset + pos as u64, &data[pos..]);
            let planned = plan.planned;
            if let Err(e) = plan.run(&*self.storage, self.space.inflight(), &data[pos..]) {
                self.fail(&format!("data write failed: {e}"));
                return Err(e);
            }
            pos += planned;
            match placed {
                // Frees may be waiting for a commit: commit, and try again
                // before reporting ENOSPC.
                Err(Error::NoSpace | Error::HostFull)
                    if self.space.has_pending() && (planned > 0 || !committed) =>
                {
                    self.commit()?;
                    committed = true;
                }
                // The log's half is full: commit (the log restarts).
                Err(Error::LogFull) if planned > 0 || !committed => {
                    self.commit_forced()?;
                    committed = true;
                }
                r => return r,
            }
        }
    }

    /// Map the blocks of a write (copying shared ones: a partial write to a
    /// block that must be copied is merged and written here, under the lock)
    /// and plan the rest of its bytes, which need no engine lock. The plan
    /// covers `planned` bytes from the start of `data`; blocks it maps must
    /// get their data whatever the result says (it stops at the first error).
    pub(crate) fn plan_write(
        &mut self,
        id: VolumeId,
        offset: u64,
        data: &[u8],
    ) -> (WritePlan, Result<()>) {
        let mut runs: Vec<Run> = Vec::new();
        let (mut blocks, mut fills) = (Vec::new(), Vec::new());
        let mut pos = 0usize;
        let bs = self.block_size() as u64;
        let result = (|| {
            self.check_mutable()?;
            self.check_writable(id)?;
            self.check_range(id, offset, data.len() as u64)?;
            // A preallocated volume keeps every block mapped.
            let unmap_zeros = !self.catalog.get(id)?.preallocated;
            while pos < data.len() {
                let at = offset + pos as u64;
                let (vb, within) = (at / bs, (at % bs) as usize);
                let n = (bs as usize - within).min(data.len() - pos);
                let chunk = &data[pos..pos + n];
                if unmap_zeros && n == bs as usize && is_zero(chunk) {
                    // A whole block of zeros reads the same unmapped
                    // (qcow2's detect-zeroes=unmap): map nothing, or drop
                    // this volume's reference to what was there. A block
                    // with I/O in flight stays pinned until that is done.
                    self.unmap_if_mapped(id, vb)?;
                    pos += n;
                    continue;
                }
                match self.place_block(id, vb, within, chunk)? {
                    Placed::Merged => {}
                    Placed::InPlace(b) => {
                        blocks.push(b);
                        push_run(&mut runs, b * bs + within as u64, pos, n);
                    }
                    Placed::Fresh(b) => {
                        blocks.push(b);
                        fills.push(b);
                        push_run(&mut runs, b * bs, pos, n);
                    }
                }
                pos += n;
            }
            Ok(())
        })();
        // A map that fails validation stops the pool: nothing half done
        // may be committed.
        let result = self.fail_on_corrupt(result);
        let ticket = self.space.inflight().begin(blocks, fills, true);
        let plan = WritePlan {
            runs,
            ticket,
            planned: pos,
        };
        (plan, result)
    }

    /// A full pool may only look full because frees wait for the commit:
    /// commit once and try again before reporting ENOSPC.
    fn retry_on_full(&mut self, mut op: impl FnMut(&mut Pool) -> Result<()>) -> Result<()> {
        match op(self) {
            Err(Error::NoSpace | Error::HostFull) if self.space.has_pending() => {
                self.commit()?;
                op(self)
            }
            // The log's half is full: commit (the log restarts) and go on.
            Err(Error::LogFull) => {
                self.commit_forced()?;
                op(self)
            }
            r => r,
        }
    }

    /// Map `chunk` of virtual block `vb` to a block this volume may write.
    fn place_block(
        &mut self,
        id: VolumeId,
        vb: u64,
        within: usize,
        chunk: &[u8],
    ) -> Result<Placed> {
        let bs = self.block_size() as usize;
        let rec = self.catalog.get(id)?;
        let (root, depth) = (rec.root, rec.depth);
        if let Some(b) = self.view().lookup_private(root, depth, vb)? {
            self.data_dirty = true;
            return Ok(Placed::InPlace(b));
        }
        // A copy changes the map, which the log must be able to record.
        self.log_room()?;
        let leaf = self
            .leaf_for_update(id, vb, true)?
            .expect("create=true always yields a leaf");
        let s = map::slot(vb, 0, self.nodes.fanout());
        let old = self.nodes.get_mut(leaf)?[s];
        self.data_dirty = true;
        if old != 0 && self.space.can_overwrite(old) {
            return Ok(Placed::InPlace(old));
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
            self.remap(id, leaf, s, old, new)?;
            self.log_map(id, vb, new, chunk)?;
            Placed::Fresh(new)
        } else {
            let mut buf = vec![0u8; bs];
            if old != 0 {
                // A log-pinned block is copied even while its first
                // contents are on their way: merge on top of them.
                self.space.inflight().wait_filled(&[old]);
            }
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
            self.remap(id, leaf, s, old, new)?;
            self.log_map(id, vb, new, &buf)?;
            Placed::Merged
        };
        Ok(placed)
    }

    /// Point slot `s` of `leaf` (volume `id`) at `new` instead of `old`.
    fn remap(&mut self, id: VolumeId, leaf: u64, s: usize, old: u64, new: u64) -> Result<()> {
        self.nodes.get_mut(leaf)?[s] = new;
        if old != 0 {
            self.space.dec(old, Kind::Data)?;
        } else {
            self.catalog.get_mut(id)?.mapped_blocks += 1;
        }
        Ok(())
    }

    /// Map `vb` of volume `id` to `new`, a block already taken (replay).
    pub(super) fn set_mapping(&mut self, id: VolumeId, vb: u64, new: u64) -> Result<()> {
        let leaf = self
            .leaf_for_update(id, vb, true)?
            .expect("create=true always yields a leaf");
        let s = map::slot(vb, 0, self.nodes.fanout());
        let old = self.nodes.get_mut(leaf)?[s];
        self.remap(id, leaf, s, old, new)
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
        if self.catalog.get(id)?.preallocated {
            let r = self.zero_mapped(id, &mapped);
            if let Err(Error::Io(e)) = &r {
                // Like a failed in-place write: what the blocks hold is unknown.
                self.fail(&format!("zeroing data failed: {e}"));
            }
            return self.fail_on_corrupt(r);
        }
        for (vb, _) in mapped {
            let r = self.retry_on_full(|p| p.unmap_block(id, vb));
            self.fail_on_corrupt(r)?;
        }
        Ok(())
    }

    /// Discard on a preallocated volume: its blocks stay mapped and are
    /// zeroed — in place (runs coalesced) where this volume alone holds them,
    /// by copy-on-write of a zero block where a snapshot shares them.
    fn zero_mapped(&mut self, id: VolumeId, mapped: &[(u64, u64)]) -> Result<()> {
        let bs = self.block_size() as u64;
        let mut run: Option<(u64, u64)> = None;
        let mut shared = Vec::new();
        for &(vb, _) in mapped {
            let rec = self.catalog.get(id)?;
            match self.view().lookup_private(rec.root, rec.depth, vb)? {
                Some(b) => match &mut run {
                    Some((start, len)) if *start + *len == b => *len += 1,
                    _ => {
                        if let Some((start, len)) = run.replace((b, 1)) {
                            self.storage.zero(start * bs, len * bs)?;
                        }
                    }
                },
                None => shared.push(vb),
            }
        }
        if let Some((start, len)) = run {
            self.storage.zero(start * bs, len * bs)?;
        }
        self.data_dirty = true;
        let zeros = vec![0u8; bs as usize];
        for vb in shared {
            self.write(id, vb * bs, &zeros)?;
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
    pub(super) fn leaf_for_update(
        &mut self,
        id: VolumeId,
        vb: u64,
        create: bool,
    ) -> Result<Option<u64>> {
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

    pub(super) fn unmap_block(&mut self, id: VolumeId, vb: u64) -> Result<()> {
        self.log_room()?;
        let Some(leaf) = self.leaf_for_update(id, vb, false)? else {
            return Ok(());
        };
        let s = map::slot(vb, 0, self.nodes.fanout());
        let old = std::mem::take(&mut self.nodes.get_mut(leaf)?[s]);
        if old != 0 {
            self.log_unmap(id, vb)?;
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

    /// (virtual, physical) block of every mapped block of `id`, ascending
    /// (metadata only): where a volume's data lies in the pool file.
    pub fn block_map(&mut self, id: VolumeId) -> Result<Vec<(u64, u64)>> {
        self.check_ok()?;
        let r = self.catalog.get(id)?;
        let (root, depth, n) = (r.root, r.depth, r.size.div_ceil(self.block_size() as u64));
        self.view().mapped_in_range(root, depth, 0, n)
    }

    /// Virtual block numbers that are mapped in `id`, ascending (metadata only).
    pub fn mapped_blocks(&mut self, id: VolumeId) -> Result<Vec<u64>> {
        Ok(self.block_map(id)?.into_iter().map(|(v, _)| v).collect())
    }
}

/// Where one chunk of a write went.
enum Placed {
    /// Merged with the old contents and written (under the lock).
    Merged,
    /// Into a block this volume alone holds: overwritten in place.
    InPlace(u64),
    /// Into a block just allocated, which gets its first contents.
    Fresh(u64),
}

/// Bytes `start..start + len` of a request at byte `at` of the pool file.
#[derive(Debug)]
struct Run {
    at: u64,
    start: usize,
    len: usize,
}

/// Extend the last run if both the file and the request continue it.
fn push_run(runs: &mut Vec<Run>, at: u64, start: usize, len: usize) {
    match runs.last_mut() {
        Some(r) if r.at + r.len as u64 == at && r.start + r.len == start => r.len += len,
        _ => runs.push(Run { at, start, len }),
    }
}

/// A read planned under the engine lock; [`ReadPlan::run`] does the I/O.
pub(crate) struct ReadPlan {
    runs: Vec<Run>,
    zeros: Vec<(usize, usize)>,
    ticket: Ticket,
}

impl ReadPlan {
    /// Fill `buf`: zeros for unmapped blocks, preads for the rest (once any
    /// write giving them their first contents is done).
    pub(crate) fn run(
        self,
        storage: &dyn Storage,
        inflight: &InFlight,
        buf: &mut [u8],
    ) -> Result<()> {
        if !self.runs.is_empty() {
            inflight.wait_filled(self.ticket.pins());
            if inflight.writes_failed() {
                inflight.end(self.ticket);
                return Err(Error::Corrupt(
                    "a data write failed; reopen the pool to continue from its last commit".into(),
                ));
            }
        }
        for &(start, len) in &self.zeros {
            buf[start..start + len].fill(0);
        }
        let mut result = Ok(());
        for r in &self.runs {
            result =
                crate::io::read_pointed(storage, &mut buf[r.start..r.start + r.len], r.at, || {
                    format!("data at byte {}", r.at)
                });
            if result.is_err() {
                break;
            }
        }
        inflight.end(self.ticket);
        result
    }
}

/// A write planned under the engine lock; [`WritePlan::run`] does the I/O.
pub(crate) struct WritePlan {
    runs: Vec<Run>,
    ticket: Ticket,
    /// Bytes of the request the plan covers (all of it unless planning failed).
    pub planned: usize,
}

impl WritePlan {
    /// Write the planned runs of `data`. The maps already point at these
    /// blocks, so on an I/O error the caller must fail the pool back to its
    /// last commit rather than expose stale block contents.
    pub(crate) fn run(self, storage: &dyn Storage, inflight: &InFlight, data: &[u8]) -> Result<()> {
        let mut result = Ok(());
        for r in &self.runs {
            if let Err(e) = storage.write_at(&data[r.start..r.start + r.len], r.at) {
                inflight.write_failed();
                result = Err(e.into());
                break;
            }
        }
        inflight.end(self.ticket);
        result
    }
}
