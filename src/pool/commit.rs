//! The commit: the one place a commit happens.
//!
//! Two-phase, shadowing: metadata reachable from the last committed
//! superblock is never overwritten. A commit writes every dirty map node,
//! gives every dirty refcount/catalog/annotation page a fresh location and writes it,
//! syncs, writes the superblock slot `generation % 2`, and syncs again.
//! Blocks freed during the transaction become allocatable only afterwards.

use byteorder::{ByteOrder, LittleEndian as LE};

use super::geometry::refcounts_per_page;
use super::Pool;
use crate::error::{Error, Result};
use crate::format::SUPERBLOCK_SLOT_SIZE;
use crate::io::Storage;

/// What a caller needs made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum How {
    /// Everything acknowledged so far: with the intent log, one fdatasync
    /// of data and records; without it, a full commit.
    Flush,
    /// A full commit of whatever changed.
    Full,
    /// A full commit even with nothing changed (a new superblock; the log
    /// restarts in its other half).
    Forced,
}

/// What the first half of a commit left for the second.
pub(crate) enum Seal {
    /// Nothing changed since the last commit.
    Nothing,
    /// Only data written in place: one fdatasync makes it durable.
    SyncOnly,
    /// Data and intent-log records: one fdatasync makes them durable.
    LogSync,
    /// Pages written; the superblock makes them the new commit.
    Pages(Sealed),
}

/// A commit whose pages are written but not yet durable.
pub(crate) struct Sealed {
    sb: Vec<u8>,
    slot: u64,
}

/// The middle of a commit, needing only the storage (no engine lock):
/// sync the pages, write the superblock into its slot, sync again.
pub(crate) fn write_sealed(storage: &dyn Storage, s: &Sealed) -> Result<()> {
    storage.sync()?;
    storage.write_at(&s.sb, s.slot)?;
    storage.sync()?;
    Ok(())
}

impl Pool {
    pub(super) fn update_reserve(&mut self) {
        let n = self.rc_layout.worst_case_pages()
            + self.catalog.layout().worst_case_pages()
            + self.annotations.layout().worst_case_pages()
            + 4;
        self.space.set_commit_reserve(n);
        // A served pool (logging) commits rarely: keep room for a commit.
        if !self.read_only && self.log.active() {
            let bs = self.block_size() as u64;
            for b in self.space.top_up_kept() {
                if self.storage.reserve(b * bs, bs).is_err() {
                    self.space.unkeep(b);
                }
            }
        }
    }

    /// A full commit of everything changed (also what was logged).
    pub fn commit(&mut self) -> Result<()> {
        self.check_ok()?;
        self.commit_as(How::Full)
    }

    /// Make every write so far durable: with the intent log on, one
    /// fdatasync (the records replay at open); else a commit.
    pub fn flush(&mut self) -> Result<()> {
        self.check_ok()?;
        self.commit_as(How::Flush)
    }

    /// Commit even with nothing changed: writes a new superblock into the
    /// other slot (repair uses it to replace a damaged slot).
    pub(crate) fn commit_forced(&mut self) -> Result<()> {
        self.check_ok()?;
        self.commit_as(How::Forced)
    }

    pub(super) fn commit_inner(&mut self, force: bool) -> Result<()> {
        self.commit_as(if force { How::Forced } else { How::Full })
    }

    pub(super) fn commit_as(&mut self, how: How) -> Result<()> {
        match self.seal(how, || false)? {
            Seal::Nothing => Ok(()),
            Seal::SyncOnly | Seal::LogSync => self.sync_data(),
            Seal::Pages(sealed) => {
                let written = write_sealed(&*self.storage, &sealed);
                self.finish(written)
            }
        }
    }

    /// Something changed since the last commit (metadata, or data in place).
    pub(crate) fn has_changes(&self) -> bool {
        self.data_dirty || self.meta_dirty()
    }

    /// Metadata pages wait to be written: the next commit has work to do.
    fn meta_dirty(&self) -> bool {
        self.nodes.has_dirty()
            || !self.space.dirty_pages().is_empty()
            || !self.catalog.dirty_pages().is_empty()
            || !self.annotations.dirty_pages().is_empty()
    }

    /// A data-only commit: in-place writes need only reach the disk.
    pub(crate) fn sync_data(&mut self) -> Result<()> {
        self.storage.sync().map_err(|e| {
            // After a failed fdatasync the kernel may have dropped the pages.
            self.failed = Some(format!("data sync failed: {e}"));
            e.into()
        })
    }

    /// First half of a commit, under the engine lock: wait for the writes
    /// whose mappings it will make durable, then write every dirty page to
    /// a block the last commit does not use. From here on, changes belong
    /// to the next transaction. `data_written()` tells whether data was
    /// written in place since the last commit (read once the fills are done).
    /// With `How::Flush` and the intent log covering every change, nothing
    /// is written: the records are already in the pool file.
    pub(crate) fn seal(&mut self, how: How, data_written: impl FnOnce() -> bool) -> Result<Seal> {
        let force = how == How::Forced;
        self.check_ok()?;
        self.space.inflight().wait_no_fills();
        if self.space.inflight().writes_failed() {
            // The maps point at blocks whose data never arrived.
            self.fail("a data write failed");
            self.check_ok()?;
        }
        let data_dirty = std::mem::take(&mut self.data_dirty) | data_written();
        if how == How::Flush && self.log.covers_changes() && !self.read_only {
            // Every fill is done: no record the sync makes durable names
            // a block whose data is still on its way.
            let logged = std::mem::take(&mut self.log.unsynced);
            return Ok(if logged || data_dirty {
                Seal::LogSync
            } else {
                Seal::Nothing
            });
        }
        let meta_dirty = self.meta_dirty();
        if self.read_only {
            if meta_dirty || force || data_dirty {
                return Err(Error::PoolReadOnly(self.path.clone()));
            }
            return Ok(Seal::Nothing);
        }
        if !meta_dirty && !force {
            return Ok(if data_dirty {
                Seal::SyncOnly
            } else {
                Seal::Nothing
            });
        }
        self.write_pages().map(Seal::Pages).inspect_err(|e| {
            self.failed = Some(e.to_string());
        })
    }

    /// Last half: the superblock is durable (or failed to be). The sealed
    /// transaction's frees become free, and their space goes back to the host.
    pub(crate) fn finish(&mut self, written: Result<()>) -> Result<()> {
        if let Err(e) = written {
            self.failed = Some(e.to_string());
            return Err(e);
        }
        let freed = self.space.finish();
        self.punch(freed);
        // The catalog or the pool may have grown: so may the reserve.
        self.update_reserve();
        Ok(())
    }

    fn write_pages(&mut self) -> Result<Sealed> {
        let generation = self.sb.generation.checked_add(1).ok_or_else(|| {
            Error::corrupt(format!(
                "generation {} has no successor",
                self.sb.generation
            ))
        })?;
        self.ensure_log()?;
        self.nodes.write_dirty(&*self.storage, generation)?;
        // Shadowing a page allocates, which dirties refcount pages: repeat
        // until every dirty page has a home the last commit does not use.
        loop {
            let a = self.catalog.shadow(&mut self.space, &*self.storage)?;
            let c = self.annotations.shadow(&mut self.space, &*self.storage)?;
            let rc_dirty = self.space.dirty_pages().clone();
            let b = self
                .rc_layout
                .shadow(&rc_dirty, &mut self.space, &*self.storage)?;
            if !a && !b && !c {
                break;
            }
        }
        self.catalog.write_dirty(&*self.storage, generation)?;
        self.annotations.write_dirty(&*self.storage, generation)?;
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
        self.sb.generation = generation;
        // A commit writes this build's format (an older pool is upgraded).
        self.sb.version = crate::format::FORMAT_VERSION;
        self.sb.metadata_blocks = self.space.meta();
        self.sb.catalog_slots = self.catalog.n_slots();
        self.sb.rc_index = self.rc_layout.index_pointers().to_vec();
        self.sb.cat_index = self.catalog.layout().index_pointers().to_vec();
        self.sb.annot_len = self.annotations.stream_len();
        self.sb.annot_pages = self.annotations.layout().n_pages() as u32;
        self.sb.annot_index = self.annotations.layout().index_pointers().to_vec();
        // Records from here on follow this commit (the other half).
        self.seal_log();
        // Pages of this generation are ours to read back from now on.
        self.nodes.set_generation(generation);
        self.catalog.clear_dirty();
        self.annotations.clear_dirty();
        self.space.seal();
        Ok(Sealed {
            sb: self.sb.encode(),
            slot: (generation % 2) * SUPERBLOCK_SLOT_SIZE as u64,
        })
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
        // A read-only pool may hold a replayed log in memory: nothing to write.
        let r = if self.read_only {
            self.check_ok()
        } else {
            self.commit()
        };
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
