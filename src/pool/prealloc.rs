//! Preallocated volumes (`volume create --preallocate`): every block is
//! allocated, zeroed and mapped when the volume is made (or grown), so a
//! write to it overwrites in place — no copy, no allocation, no map change —
//! until a snapshot shares its blocks. The whole creation is one commit.

use super::{Pool, VolumeId};
use crate::error::{Error, Result};
use crate::map;
use crate::space::{Budget, Kind};

/// Progress of a preallocation: (blocks zeroed so far, blocks in all).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Blocks zeroed per `Storage::zero` call (and progress step).
const ZERO_STEP: u64 = 256 << 20;

impl Pool {
    /// Create a volume of `size` bytes with every block allocated, zeroed
    /// (it reads as zeros) and mapped, contiguously where the pool allows
    /// (commits once; on failure there is no volume).
    pub fn create_volume_preallocated(
        &mut self,
        name: &str,
        size: u64,
        progress: Progress,
    ) -> Result<VolumeId> {
        let id = self.stage_create_preallocated(name, size, progress)?;
        self.commit()?;
        Ok(id)
    }

    /// `create_volume_preallocated` without the commit.
    pub fn stage_create_preallocated(
        &mut self,
        name: &str,
        size: u64,
        progress: Progress,
    ) -> Result<VolumeId> {
        let id = self.stage_create(name, size)?;
        let n = size.div_ceil(self.block_size() as u64);
        let depth = self.catalog.get(id)?.depth;
        let runs = match self
            .check_prealloc_space(name, n, depth)
            .and_then(|_| self.take_zeroed(n, progress))
        {
            Ok(runs) => runs,
            Err(e) => {
                // Nothing is mapped yet: dropping the record undoes it all.
                self.catalog.remove(id)?;
                return Err(e);
            }
        };
        self.catalog.get_mut(id)?.preallocated = true;
        self.map_runs(id, 0, &runs)?;
        Ok(id)
    }

    /// Preallocate blocks `from..to` of a preallocated volume that is being
    /// grown to `depth` levels: take and zero them before anything changes
    /// (`map_grown` then maps them, after the tree has grown).
    pub(super) fn prealloc_for_growth(
        &mut self,
        name: &str,
        from: u64,
        to: u64,
        depth: u8,
    ) -> Result<Vec<(u64, u64)>> {
        let n = to.saturating_sub(from);
        self.check_prealloc_space(name, n, depth)?;
        self.take_zeroed(n, &mut |_, _| {})
    }

    /// Refuse, before anything is taken, a preallocation the pool cannot
    /// hold: `n` data blocks plus the map nodes over them.
    fn check_prealloc_space(&self, name: &str, n: u64, depth: u8) -> Result<()> {
        let fanout = self.fanout() as u64;
        // Nodes per level over n blocks, plus a path's shadows at the ends.
        let mut nodes = depth as u64;
        let mut per = n;
        for _ in 0..depth {
            per = per.div_ceil(fanout);
            nodes += per;
        }
        let need = n.saturating_add(nodes);
        let have = self.space.available(Budget::Write);
        if need > have {
            let bs = self.block_size() as u64;
            return Err(Error::NotEnoughSpace(format!(
                "cannot preallocate volume '{name}': it needs {need} free blocks ({}, map \
                 included) but the pool has {have} ({}) to give; grow the pool (`thinpool \
                 resize POOL --size`) or free space first",
                crate::size::format_size(need.saturating_mul(bs)),
                crate::size::format_size(have.saturating_mul(bs)),
            )));
        }
        Ok(())
    }

    /// Allocate `n` data blocks in runs and make them read as zeros with
    /// their host space held. On failure nothing stays allocated.
    fn take_zeroed(&mut self, n: u64, progress: Progress) -> Result<Vec<(u64, u64)>> {
        let runs = self.space.alloc_runs(n, Budget::Write)?;
        let bs = self.block_size() as u64;
        let step = (ZERO_STEP / bs).max(1);
        let mut done = 0;
        progress(0, n);
        let zeroed = (|| {
            for &(start, len) in &runs {
                let mut k = 0;
                while k < len {
                    let m = step.min(len - k);
                    self.storage.zero((start + k) * bs, m * bs).map_err(|e| {
                        match e.raw_os_error() {
                            Some(libc::ENOSPC) => Error::HostFull,
                            _ => Error::Io(e),
                        }
                    })?;
                    k += m;
                    done += m;
                    progress(done, n);
                }
            }
            Ok(())
        })();
        if let Err(e) = zeroed {
            for &(start, len) in &runs {
                // Best effort: the blocks are free again either way.
                let _ = self.storage.punch(start * bs, len * bs);
                for b in start..start + len {
                    self.space.unalloc(b, Kind::Data)?;
                }
            }
            return Err(e);
        }
        Ok(runs)
    }

    /// Map `runs` at virtual blocks `first..` of volume `id`, a leaf at a
    /// time. The space was checked first, so a failure here is damage: the
    /// pool stops (and reopens at its last commit, without the change).
    pub(super) fn map_runs(&mut self, id: VolumeId, first: u64, runs: &[(u64, u64)]) -> Result<()> {
        let r = self.map_runs_inner(id, first, runs);
        if let Err(e) = &r {
            self.fail(&format!("preallocation failed half way: {e}"));
        }
        r
    }

    fn map_runs_inner(&mut self, id: VolumeId, first: u64, runs: &[(u64, u64)]) -> Result<()> {
        let fanout = self.fanout();
        let mut vb = first;
        let mut total = 0;
        for &(start, len) in runs {
            let mut k = 0;
            while k < len {
                let leaf = self
                    .leaf_for_update(id, vb, true)?
                    .ok_or_else(|| Error::corrupt("no leaf for a preallocated block"))?;
                let s = map::slot(vb, 0, fanout);
                let m = ((fanout - s) as u64).min(len - k);
                let node = self.nodes.get_mut(leaf)?;
                for j in 0..m as usize {
                    if node[s + j] != 0 {
                        return Err(Error::corrupt(format!(
                            "volume {id}: block {} is mapped past the volume's end",
                            vb + j as u64
                        )));
                    }
                    node[s + j] = start + k + j as u64;
                }
                vb += m;
                k += m;
                total += m;
            }
        }
        self.catalog.get_mut(id)?.mapped_blocks += total;
        Ok(())
    }
}
