//! The commit: the one place a commit happens.
//!
//! Two-phase, shadowing: metadata reachable from the last committed
//! superblock is never overwritten. A commit writes every dirty map node,
//! gives every dirty refcount/catalog page a fresh location and writes it,
//! syncs, writes the superblock slot `generation % 2`, and syncs again.
//! Blocks freed during the transaction become allocatable only afterwards.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::geometry::refcounts_per_page;
use super::Pool;
use crate::error::{Error, Result};
use crate::format::SUPERBLOCK_SLOT_SIZE;

impl Pool {
    pub(super) fn update_reserve(&mut self) {
        let n = self.rc_layout.worst_case_pages() + self.catalog.layout.worst_case_pages() + 4;
        self.space.set_commit_reserve(n);
    }

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

    pub(super) fn commit_inner(&mut self, force: bool) -> Result<()> {
        let meta_dirty = self.nodes.has_dirty()
            || !self.space.dirty_pages().is_empty()
            || !self.catalog.dirty_pages().is_empty();
        if self.read_only {
            if meta_dirty || force || self.data_dirty {
                return Err(Error::PoolReadOnly(self.path.clone()));
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
            let a = self
                .catalog
                .layout
                .shadow(&cat_dirty, &mut self.space, &*self.storage)?;
            let rc_dirty = self.space.dirty_pages().clone();
            let b = self
                .rc_layout
                .shadow(&rc_dirty, &mut self.space, &*self.storage)?;
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
