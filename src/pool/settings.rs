//! Pool-wide settings and usage: `info`, the low-water mark, growing the pool.

use std::collections::HashMap;

use super::geometry::{check_memory, refcounts_per_page};
use super::open::uuid_string;
use super::{Pool, PoolInfo, VolumeId, DEFAULT_LOW_WATER_PCT};
use crate::error::{Error, Result};

impl Pool {
    pub fn uuid(&self) -> String {
        uuid_string(&self.sb.uuid)
    }

    pub fn info(&self) -> Result<PoolInfo> {
        let bs = self.block_size() as u64;
        let meta = self.space.meta();
        let used = self.space.used();
        let usable = self.space.total() - self.space.reserved();
        Ok(PoolInfo {
            path: self.path.clone(),
            uuid: self.uuid(),
            format_version: self.sb.version,
            generation: self.sb.generation,
            block_size: self.block_size(),
            size: self.space.total() * bs,
            total_blocks: self.space.total(),
            data_used_bytes: (used - meta) * bs,
            data_free_bytes: (usable - used) * bs,
            metadata_used_bytes: (meta + self.space.reserved()) * bs,
            volumes: self.catalog.len(),
            preallocated_volumes: self.catalog.iter().filter(|r| r.preallocated).count(),
            preallocated_bytes: self
                .catalog
                .iter()
                .filter(|r| r.preallocated)
                .map(|r| r.size)
                .sum(),
            direct_io: None,
            low_water_pct: self.low_water_pct(),
            low_space: (usable - used) * 100 < usable * self.low_water_pct() as u64,
            commits: None,
            log: self.log_info(),
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

    /// Set every block's count, the metadata count and each volume's mapped
    /// count to what a full walk found (repair; committed by the caller).
    pub(crate) fn rebuild_counts(
        &mut self,
        counts: &[u32],
        meta_blocks: u64,
        mapped: &HashMap<VolumeId, u64>,
    ) -> Result<()> {
        for (b, &count) in counts.iter().enumerate() {
            self.space.set_count(b as u64, count);
        }
        self.space.set_meta(meta_blocks);
        for (id, n) in mapped {
            if self.catalog.get(*id)?.mapped_blocks != *n {
                self.catalog.get_mut(*id)?.mapped_blocks = *n;
            }
        }
        Ok(())
    }
}
