//! Space management: a reference count per block, a free bitmap derived from
//! it, an allocator, and the rule that makes crashes safe: a block freed in
//! the open transaction is still referenced by the last commit, so it is not
//! handed out again until that transaction commits.

mod inflight;

pub use inflight::{InFlight, Ticket};

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use bitvec::prelude::*;

use crate::error::{Error, Result};

/// Blocks kept back for unmapping on a full pool: discarding shadows a few
/// map nodes before it frees anything.
pub const UNMAP_RESERVE: u64 = 16;

/// A vector of `n` copies of `v`, or an error instead of an abort when the
/// memory cannot be had (sizes come from a pool file, which may lie).
pub(crate) fn try_vec<T: Clone>(n: usize, v: T, what: &str) -> Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        Error::InvalidArgument(format!(
            "not enough memory for the {what} ({n} entries); the pool is too large for this machine"
        ))
    })?;
    out.resize(n, v);
    Ok(out)
}

fn try_bits(n: usize) -> Result<BitVec<u64, Lsb0>> {
    let words = try_vec(n.div_ceil(64), 0u64, "free-space bitmap")?;
    let mut b = BitVec::from_vec(words);
    b.truncate(n);
    Ok(b)
}

/// Free blocks with host space kept back for commits (at most; fewer when
/// the commit reserve is smaller): a commit on a full host takes these.
const KEPT_FOR_COMMIT: u64 = 64;

/// Which reserve an allocation may dip into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    /// Ordinary writes: leave both reserves alone.
    Write,
    /// Shadowing map nodes to unmap blocks (discard, remove).
    Unmap,
    /// The commit's own pages.
    Commit,
}

/// What a block holds; only used for accounting (data vs metadata use).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data,
    Meta,
}

pub struct SpaceMap {
    rc: Vec<u32>,
    /// Set = may be allocated now (and may be a hole in the pool file).
    free: BitVec<u64, Lsb0>,
    /// Free blocks that still hold their host space: metadata pages freed by
    /// a commit (only data blocks are punched). Commits take these first;
    /// other allocations leave `kept_floor` of them, so a commit finds
    /// blocks it can write even when the host file system is full.
    kept: BTreeSet<u64>,
    kept_floor: usize,
    /// Free blocks, `free` and `kept` together.
    free_count: u64,
    /// Allocated in the open transaction: invisible to the last commit, so it
    /// may be written in place and reused at once when freed.
    txn_new: BitVec<u64, Lsb0>,
    /// Blocks whose count fell from >= 2 in this transaction: the last commit
    /// may still share them, so they must not be overwritten in place.
    was_shared: HashSet<u64>,
    /// Metadata blocks whose count reached zero in this transaction; free
    /// (and kept) after the commit. Metadata pages are freed by every
    /// commit's shadowing and taken again soon after, so punching them would
    /// only make the host reallocate.
    pending_meta: Vec<u64>,
    /// Data blocks whose count reached zero in this transaction: free after
    /// the commit, and their space goes back to the host.
    pending_data: Vec<u64>,
    /// The last transaction's frees, `pending_meta` and `pending_data` as
    /// they were when it was sealed: its commit is being written, so they
    /// wait for it.
    sealed_meta: Vec<u64>,
    sealed_data: Vec<u64>,
    /// `was_shared` of the sealed transaction: until its commit is durable,
    /// the commit before it is the one a crash goes back to.
    sealed_shared: HashSet<u64>,
    /// Data blocks mapped by intent-log records of the open epoch, and of
    /// the sealed one: a crash replays those records, which check each
    /// block's content, so these are never written in place, and are not
    /// reused before the commit that ends their epoch.
    log_pinned: HashSet<u64>,
    sealed_log_pinned: HashSet<u64>,
    /// Freed while I/O on them was in flight: free once unpinned (with
    /// whether they still hold their host space).
    held: Vec<(u64, bool)>,
    inflight: Arc<InFlight>,
    /// Refcount pages (index into the persistent array) changed in this transaction.
    dirty_pages: BTreeSet<usize>,
    per_page: usize,
    reserved: u64,
    used: u64,
    meta: u64,
    hint: u64,
    /// Blocks kept back for the commit itself (shadowing refcount/catalog pages).
    commit_reserve: u64,
}

impl SpaceMap {
    /// Build from persisted refcounts. Blocks below `reserved` hold the superblocks.
    pub fn from_refcounts(
        rc: Vec<u32>,
        reserved: u64,
        meta: u64,
        per_page: usize,
    ) -> Result<SpaceMap> {
        let n = rc.len();
        let mut free = try_bits(n)?;
        let mut used = 0;
        for (b, &c) in rc.iter().enumerate().skip(reserved as usize) {
            if c == 0 {
                free.set(b, true);
            } else {
                used += 1;
            }
        }
        let free_count = free.count_ones() as u64;
        Ok(SpaceMap {
            rc,
            free,
            free_count,
            txn_new: try_bits(n)?,
            was_shared: HashSet::new(),
            kept: BTreeSet::new(),
            kept_floor: 0,
            pending_meta: Vec::new(),
            pending_data: Vec::new(),
            sealed_meta: Vec::new(),
            sealed_data: Vec::new(),
            sealed_shared: HashSet::new(),
            log_pinned: HashSet::new(),
            sealed_log_pinned: HashSet::new(),
            held: Vec::new(),
            inflight: Arc::new(InFlight::default()),
            dirty_pages: BTreeSet::new(),
            per_page,
            reserved,
            used,
            meta,
            hint: reserved,
            commit_reserve: 0,
        })
    }

    /// A fresh pool: every block free except the superblock area.
    pub fn new(total: u64, reserved: u64, per_page: usize) -> Result<SpaceMap> {
        let mut rc = try_vec(total as usize, 0u32, "refcount table")?;
        rc[..reserved as usize].fill(1);
        let mut s = SpaceMap::from_refcounts(rc, reserved, 0, per_page)?;
        s.dirty_pages
            .extend(0..(reserved as usize).div_ceil(per_page));
        Ok(s)
    }

    pub fn total(&self) -> u64 {
        self.rc.len() as u64
    }
    pub fn reserved(&self) -> u64 {
        self.reserved
    }
    /// Blocks in use (data + metadata), superblock area excluded.
    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn meta(&self) -> u64 {
        self.meta
    }
    pub fn refcounts(&self) -> &[u32] {
        &self.rc
    }
    pub fn rc(&self, b: u64) -> u32 {
        self.rc[b as usize]
    }
    pub fn set_commit_reserve(&mut self, n: u64) {
        self.commit_reserve = n;
        self.kept_floor = n.min(KEPT_FOR_COMMIT) as usize;
    }
    pub fn is_txn_new(&self, b: u64) -> bool {
        self.txn_new[b as usize]
    }
    pub fn dirty_pages(&self) -> &BTreeSet<usize> {
        &self.dirty_pages
    }
    /// Frees wait for a commit (or for I/O in flight) before they can be used.
    pub fn has_pending(&self) -> bool {
        !self.pending_meta.is_empty()
            || !self.pending_data.is_empty()
            || !self.sealed_meta.is_empty()
            || !self.sealed_data.is_empty()
            || !self.held.is_empty()
    }

    /// The registry of blocks with I/O in flight (shared with the data path).
    pub fn inflight(&self) -> &Arc<InFlight> {
        &self.inflight
    }

    /// A data block may be overwritten in place only if this volume alone
    /// holds it now, the last commit did not share it, and no log record
    /// waiting for a commit names it.
    pub fn can_overwrite(&self, b: u64) -> bool {
        self.rc[b as usize] == 1
            && (self.is_txn_new(b) || !self.was_shared(b))
            && !self.is_log_pinned(b)
    }

    /// A log record of the open epoch maps `b` (see `log_pinned`).
    pub fn pin_logged(&mut self, b: u64) {
        self.log_pinned.insert(b);
    }

    pub fn is_log_pinned(&self, b: u64) -> bool {
        !self.log_pinned.is_empty() && self.log_pinned.contains(&b)
            || !self.sealed_log_pinned.is_empty() && self.sealed_log_pinned.contains(&b)
    }

    /// Take a free block for the intent log's replay: the record that maps
    /// it was written after the last commit, where the block was free.
    /// False if it is not free.
    pub fn claim(&mut self, b: u64) -> bool {
        let i = b as usize;
        if b < self.reserved || i >= self.rc.len() || self.rc[i] != 0 || !self.free[i] {
            return false;
        }
        self.free.set(i, false);
        self.free_count -= 1;
        self.txn_new.set(i, true);
        self.rc[i] = 1;
        self.used += 1;
        self.touch(b);
        true
    }

    /// Allocate `n` contiguous free metadata blocks (the intent log), or
    /// None when no such run is free. Leaves the reserves alone.
    pub fn alloc_run(&mut self, n: u64) -> Option<u64> {
        if n == 0 || self.free_count <= self.commit_reserve + UNMAP_RESERVE + n {
            return None;
        }
        let (mut start, mut len) = (0usize, 0u64);
        for i in self.free.iter_ones() {
            if len > 0 && i == start + len as usize {
                len += 1;
            } else {
                (start, len) = (i, 1);
            }
            if len == n {
                break;
            }
        }
        if len < n {
            return None;
        }
        for i in start..start + n as usize {
            self.free.set(i, false);
            self.txn_new.set(i, true);
            self.rc[i] = 1;
            self.touch(i as u64);
        }
        self.free_count -= n;
        self.used += n;
        self.meta += n;
        Some(start as u64)
    }

    /// The last commit may reach `b` through a path that is not the caller's.
    pub fn was_shared(&self, b: u64) -> bool {
        self.was_shared.contains(&b) || self.sealed_shared.contains(&b)
    }

    /// Mark `b` as reachable from the last commit through another path
    /// (a child of a node that was shared there).
    pub fn mark_shared(&mut self, b: u64) {
        if !self.txn_new[b as usize] {
            self.was_shared.insert(b);
        }
    }

    fn touch(&mut self, b: u64) {
        self.dirty_pages.insert(b as usize / self.per_page);
    }

    /// Free blocks (holes) to give host space to, so that `kept` holds
    /// `kept_floor` blocks: a commit finds room on a full host even when
    /// no commit since the open has freed metadata pages to keep (with the
    /// intent log, commits are rare). The caller reserves their space, and
    /// gives back with [`unkeep`](Self::unkeep) those it could not.
    pub fn top_up_kept(&mut self) -> Vec<u64> {
        let n = self.kept_floor.saturating_sub(self.kept.len());
        let blocks: Vec<u64> = self.free.iter_ones().take(n).map(|b| b as u64).collect();
        for &b in &blocks {
            self.free.set(b as usize, false);
            self.kept.insert(b);
        }
        blocks
    }

    /// A block from `top_up_kept` whose host space could not be had.
    pub fn unkeep(&mut self, b: u64) {
        if self.kept.remove(&b) {
            self.free.set(b as usize, true);
            self.hint = self.hint.min(b);
        }
    }

    /// Allocate a block with count 1, leaving the reserves `budget` may not use.
    pub fn alloc(&mut self, kind: Kind, budget: Budget) -> Result<u64> {
        let keep = self.keep(budget);
        if self.free_count <= keep {
            return Err(Error::NoSpace);
        }
        let from_kept = |s: &mut SpaceMap| s.kept.pop_first().map(|b| b as usize);
        let h = self.hint as usize;
        let b = match budget {
            Budget::Commit => from_kept(self),
            _ if self.kept.len() > self.kept_floor => from_kept(self),
            _ => None,
        };
        let b = match b
            .or_else(|| self.free[h..].first_one().map(|i| h + i))
            .or_else(|| self.free[..h].first_one())
        {
            Some(b) => {
                self.free.set(b, false);
                b
            }
            None => from_kept(self).ok_or(Error::NoSpace)?,
        };
        self.free_count -= 1;
        self.txn_new.set(b, true);
        self.rc[b] = 1;
        self.used += 1;
        if kind == Kind::Meta {
            self.meta += 1;
        }
        self.hint = b as u64 + 1;
        if self.hint >= self.total() {
            self.hint = self.reserved;
        }
        self.touch(b as u64);
        Ok(b as u64)
    }

    /// Blocks `alloc` may hand out under `budget` (its reserves left out).
    pub fn available(&self, budget: Budget) -> u64 {
        self.free_count.saturating_sub(self.keep(budget))
    }

    fn keep(&self, budget: Budget) -> u64 {
        match budget {
            Budget::Write => self.commit_reserve + UNMAP_RESERVE,
            Budget::Unmap => self.commit_reserve,
            Budget::Commit => 0,
        }
    }

    /// Allocate `n` data blocks (count 1 each) in as few contiguous runs as
    /// the free map allows: the first free run that holds all of them, else
    /// the longest runs, else (last) kept metadata blocks one by one.
    /// Returns the runs `(first, len)` in ascending order; `NoSpace` (and
    /// nothing taken) if fewer than `n` blocks are available.
    pub fn alloc_runs(&mut self, n: u64, budget: Budget) -> Result<Vec<(u64, u64)>> {
        if n > self.available(budget) {
            return Err(Error::NoSpace);
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let mut runs = self.free_runs();
        let mut taken: Vec<(u64, u64)> = match runs.iter().find(|r| r.1 >= n) {
            Some(&(start, _)) => vec![(start, n)],
            None => {
                // Longest first (ties: lowest first), then back in disk order.
                runs.sort_by_key(|&(start, len)| (std::cmp::Reverse(len), start));
                let mut left = n;
                let mut t = Vec::new();
                for (start, len) in runs {
                    if left == 0 {
                        break;
                    }
                    let k = len.min(left);
                    t.push((start, k));
                    left -= k;
                }
                // The rest (if any) from the kept blocks.
                while left > 0 {
                    let b = self.kept.pop_first().ok_or(Error::NoSpace)?;
                    self.free.set(b as usize, true);
                    t.push((b, 1));
                    left -= 1;
                }
                t.sort_unstable();
                t
            }
        };
        for &(start, len) in &taken {
            for b in start..start + len {
                let i = b as usize;
                debug_assert!(self.free[i]);
                self.free.set(i, false);
                self.txn_new.set(i, true);
                self.rc[i] = 1;
                self.touch(b);
            }
            self.free_count -= len;
            self.used += len;
        }
        // Merge runs that meet (a kept block next to a free run).
        taken.dedup_by(|next, prev| {
            let meets = prev.0 + prev.1 == next.0;
            if meets {
                prev.1 += next.1;
            }
            meets
        });
        Ok(taken)
    }

    /// Maximal runs of blocks free in the bitmap (kept blocks not included).
    fn free_runs(&self) -> Vec<(u64, u64)> {
        let mut runs = Vec::new();
        let mut at = 0usize;
        let n = self.free.len();
        while at < n {
            let Some(s) = self.free[at..].first_one() else {
                break;
            };
            let start = at + s;
            let len = self.free[start..].first_zero().unwrap_or(n - start);
            runs.push((start as u64, len as u64));
            at = start + len;
        }
        runs
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        let c = &mut self.rc[b as usize];
        if *c == 0 {
            return Err(Error::corrupt(format!("reference to free block {b}")));
        }
        *c = c
            .checked_add(1)
            .ok_or_else(|| Error::corrupt(format!("refcount overflow on block {b}")))?;
        self.touch(b);
        Ok(())
    }

    /// Drop one reference; returns true when the block has no owner left.
    pub fn dec(&mut self, b: u64, kind: Kind) -> Result<bool> {
        let i = b as usize;
        let old = self.rc[i];
        if old == 0 || b < self.reserved {
            return Err(Error::corrupt(format!("double free of block {b}")));
        }
        self.rc[i] = old - 1;
        self.touch(b);
        if old >= 2 {
            if !self.txn_new[i] {
                self.was_shared.insert(b);
            }
            return Ok(false);
        }
        self.used -= 1;
        if kind == Kind::Meta {
            self.meta -= 1;
        }
        if self.txn_new[i] && !self.is_log_pinned(b) {
            // Never committed: nobody else can see it, reuse at once.
            self.txn_new.set(i, false);
            self.release(b, false);
        } else if kind == Kind::Data {
            // A logged block waits like a committed one: a crash replays
            // the record that maps it, which checks its content.
            self.txn_new.set(i, false);
            self.pending_data.push(b);
        } else {
            self.pending_meta.push(b);
        }
        Ok(true)
    }

    /// Give back a block allocated in this transaction that was never used
    /// and has no host space (the host could not reserve it).
    pub fn unalloc(&mut self, b: u64, kind: Kind) -> Result<()> {
        let i = b as usize;
        if !self.txn_new[i] || self.rc[i] != 1 {
            return Err(Error::corrupt(format!("block {b} was not just allocated")));
        }
        self.rc[i] = 0;
        self.touch(b);
        self.used -= 1;
        if kind == Kind::Meta {
            self.meta -= 1;
        }
        self.txn_new.set(i, false);
        self.release(b, false);
        Ok(())
    }

    /// `b` is free again, unless I/O on it is still in flight (then once it
    /// is done); `holds_space`: it still has its host space.
    fn release(&mut self, b: u64, holds_space: bool) {
        if self.inflight.is_pinned(b) {
            self.held.push((b, holds_space));
            return;
        }
        if holds_space {
            self.kept.insert(b);
        } else {
            self.free.set(b as usize, true);
            self.hint = self.hint.min(b);
        }
        self.free_count += 1;
    }

    /// The transaction's commit is being written: what changes from now on
    /// belongs to the next one. Its frees wait for [`finish`](Self::finish).
    pub fn seal(&mut self) {
        debug_assert!(self.sealed_meta.is_empty() && self.sealed_data.is_empty());
        debug_assert!(self.sealed_shared.is_empty());
        self.sealed_meta = std::mem::take(&mut self.pending_meta);
        self.sealed_data = std::mem::take(&mut self.pending_data);
        self.sealed_shared = std::mem::take(&mut self.was_shared);
        self.sealed_log_pinned = std::mem::take(&mut self.log_pinned);
        self.txn_new.fill(false);
        self.dirty_pages.clear();
    }

    /// The sealed transaction's commit is durable: its frees become free
    /// (those with I/O in flight once it is done). Returns the data blocks
    /// freed, whose space the caller gives back to the host.
    pub fn finish(&mut self) -> Vec<u64> {
        for (b, holds_space) in std::mem::take(&mut self.held) {
            self.release(b, holds_space);
        }
        for b in std::mem::take(&mut self.sealed_meta) {
            self.release(b, true);
        }
        let mut data = std::mem::take(&mut self.sealed_data);
        for &b in &data {
            self.release(b, false);
        }
        self.sealed_shared.clear();
        self.sealed_log_pinned.clear();
        // Those still pinned are held: their I/O may still need the space.
        data.retain(|&b| self.free[b as usize]);
        data
    }

    /// Seal and finish at once (a commit with nothing running beside it).
    pub fn end_transaction(&mut self) -> Vec<u64> {
        self.seal();
        self.finish()
    }

    /// Grow the pool to `total` blocks.
    pub fn grow(&mut self, total: u64) {
        let old = self.rc.len();
        self.rc.resize(total as usize, 0);
        self.free.resize(total as usize, true);
        self.txn_new.resize(total as usize, false);
        self.free_count += total - old as u64;
        for p in old / self.per_page..(total as usize).div_ceil(self.per_page) {
            self.dirty_pages.insert(p);
        }
    }

    /// Set a block's count outright (repair). A block dropping to zero is
    /// freed only after the commit, like any other free.
    pub fn set_count(&mut self, b: u64, count: u32) {
        let i = b as usize;
        let old = self.rc[i];
        if old == count || b < self.reserved {
            return;
        }
        self.rc[i] = count;
        self.touch(b);
        if old == 0 {
            if self.free[i] {
                self.free.set(i, false);
                self.free_count -= 1;
            } else if self.kept.remove(&b) {
                self.free_count -= 1;
            }
            self.used += 1;
        } else if count == 0 {
            self.used -= 1;
            self.pending_data.push(b);
        }
    }

    /// Set the metadata block count outright (repair).
    pub fn set_meta(&mut self, meta: u64) {
        self.meta = meta;
    }

    /// Free blocks that may be allocated (pending frees not yet counted).
    pub fn free_count(&self) -> u64 {
        self.free_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_is_not_free_until_commit() {
        let mut s = SpaceMap::new(24 + UNMAP_RESERVE, 1, 1024).unwrap();
        let a = s.alloc(Kind::Data, Budget::Write).unwrap();
        s.end_transaction(); // a is now committed
        assert!(s.dec(a, Kind::Data).unwrap());
        // The committed state still references a: it must not come back yet.
        let mut got = vec![];
        while let Ok(b) = s.alloc(Kind::Data, Budget::Write) {
            got.push(b);
        }
        assert!(!got.contains(&a));
        assert_eq!(s.end_transaction(), vec![a]);
        assert_eq!(s.alloc(Kind::Data, Budget::Write).unwrap(), a);
    }

    #[test]
    fn txn_new_blocks_reuse_at_once_and_shared_blocks_are_not_overwritten() {
        let mut s = SpaceMap::new(8 + UNMAP_RESERVE, 1, 1024).unwrap();
        let a = s.alloc(Kind::Data, Budget::Write).unwrap();
        assert!(s.dec(a, Kind::Data).unwrap());
        assert_eq!(s.alloc(Kind::Data, Budget::Write).unwrap(), a);
        s.inc(a).unwrap();
        s.end_transaction();
        assert!(!s.can_overwrite(a));
        assert!(!s.dec(a, Kind::Data).unwrap());
        // Count is 1 now, but the commit shares it: still no in-place write.
        assert!(!s.can_overwrite(a));
        s.end_transaction();
        assert!(s.can_overwrite(a));
    }

    #[test]
    fn runs_are_contiguous_where_the_map_allows() {
        let mut s = SpaceMap::new(40 + UNMAP_RESERVE, 1, 1024).unwrap();
        assert_eq!(s.alloc_runs(10, Budget::Write).unwrap(), vec![(1, 10)]);
        // The write budget leaves the unmap reserve: 29 blocks are left.
        assert!(matches!(
            s.alloc_runs(30, Budget::Write),
            Err(Error::NoSpace)
        ));
        assert_eq!(s.alloc_runs(29, Budget::Write).unwrap(), vec![(11, 29)]);
        for b in [5, 6, 7, 20, 21, 22, 23, 24] {
            s.dec(b, Kind::Data).unwrap();
        }
        // Free runs now: 5..8, 20..25, 40..56. The first that fits wins.
        assert_eq!(s.alloc_runs(4, Budget::Write).unwrap(), vec![(20, 4)]);
        // None fits 19: the longest runs, in disk order.
        assert_eq!(
            s.alloc_runs(19, Budget::Commit).unwrap(),
            vec![(5, 3), (40, 16)]
        );
        assert_eq!(s.free_count(), 1);
        assert!(matches!(
            s.alloc_runs(2, Budget::Commit),
            Err(Error::NoSpace)
        ));
        assert_eq!(s.free_count(), 1);
        assert_eq!(s.rc(41), 1);
        assert!(s.is_txn_new(41));
    }

    #[test]
    fn reserve_is_kept_for_commits() {
        let mut s = SpaceMap::new(6 + UNMAP_RESERVE, 1, 1024).unwrap();
        s.set_commit_reserve(2);
        assert!(s.alloc(Kind::Data, Budget::Write).is_ok());
        assert!(s.alloc(Kind::Data, Budget::Write).is_ok());
        assert!(s.alloc(Kind::Data, Budget::Write).is_ok());
        assert!(matches!(
            s.alloc(Kind::Data, Budget::Write),
            Err(Error::NoSpace)
        ));
        assert!(s.alloc(Kind::Meta, Budget::Commit).is_ok());
    }
}
