//! A pool shared by many threads (the export server): data I/O outside the
//! engine lock, and group commit.
//!
//! Locking rules (docs/DESIGN.md has the why):
//!
//! 1. The engine (`RwLock<Pool>`) is held only to plan: map lookups take it
//!    shared; allocation, refcounts, shadowing and every metadata change
//!    take it exclusive; so do the host-space reservation (fallocate) of a
//!    block just allocated and the unmapping of a whole block written with
//!    zeros. Preads and pwrites of data blocks happen after it
//!    is released, on blocks the plan pinned (`space::InFlight`): a pinned
//!    block that loses its last reference is not reused or punched until
//!    the I/O is done.
//! 2. A block given its first contents is *filling* until its pwrite is
//!    done: readers wait for it, and a commit waits for every fill before it
//!    writes the map that points there. Partial writes to blocks that must
//!    be copied are merged under the lock.
//! 3. One commit at a time (`commit_lock`, taken before the engine lock).
//!    A commit seals under the engine lock (pages written to the page
//!    cache), then syncs and writes the superblock *without* it, then
//!    finishes under it. Management requests take `commit_lock` too, since
//!    they commit before returning.
//! 4. A flush needs a commit that sealed after it arrived. Flushes that
//!    arrive while one is being written wait for the next and share it; a
//!    flush with nothing written since the last seal waits only for the
//!    commit in flight, if any.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use serde::{Deserialize, Serialize};

use super::commit::{write_sealed, How, Seal};
use super::{Pool, VolumeId, VolumeInfo};
use crate::check::CheckReport;
use crate::error::{Error, Result};
use crate::io::Storage;
use crate::space::InFlight;

/// Commits and flushes of a served pool since it was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStats {
    /// Flush requests (fsync, close, the ticker, `thinpool flush`).
    pub flushes: u64,
    /// Flushes that found nothing to wait for.
    pub flushes_free: u64,
    /// Flushes served by a commit another flush ran.
    pub flushes_shared: u64,
    /// Commits that wrote metadata (two fdatasyncs each).
    pub commits: u64,
    /// Data-only commits (one fdatasync each).
    pub data_syncs: u64,
    /// fdatasyncs of the pool file issued by flushes and commits.
    pub fdatasyncs: u64,
    /// Flushes made durable by one fdatasync of data and intent-log records.
    #[serde(default)]
    pub log_syncs: u64,
    /// Intent-log records written since the pool was opened.
    #[serde(default)]
    pub log_records: u64,
    /// Commits made because a half of the log was full.
    #[serde(default)]
    pub log_full_commits: u64,
}

#[derive(Default)]
struct Counters {
    flushes: AtomicU64,
    flushes_free: AtomicU64,
    flushes_shared: AtomicU64,
    commits: AtomicU64,
    data_syncs: AtomicU64,
    log_syncs: AtomicU64,
    log_full_commits: AtomicU64,
}

/// Commit sequence numbers: `started` commits began sealing, `done` ended.
#[derive(Default)]
struct Group {
    started: u64,
    done: u64,
}

pub struct SharedPool {
    engine: RwLock<Pool>,
    storage: Arc<dyn Storage>,
    inflight: Arc<InFlight>,
    /// Data written (or discarded) since the last seal.
    dirty: AtomicBool,
    commit_lock: Mutex<()>,
    group: Mutex<Group>,
    /// `group.started`, readable without the lock.
    started: AtomicU64,
    /// Per volume: the first commit that covers everything written to it
    /// so far (a flush of the volume waits for that one, no later).
    needs: Mutex<HashMap<VolumeId, u64>>,
    counters: Counters,
}

impl SharedPool {
    /// Share `pool`, with its intent log on: a flush costs one fdatasync,
    /// full commits happen on [`commit`](Self::commit), management
    /// changes, a full log and at the end.
    pub fn new(mut pool: Pool) -> SharedPool {
        pool.set_logging(true);
        let changed = pool.has_changes();
        SharedPool {
            storage: pool.storage_arc(),
            inflight: pool.space().inflight().clone(),
            engine: RwLock::new(pool),
            // What the pool had not committed yet: the first flush covers it.
            dirty: AtomicBool::new(changed),
            commit_lock: Mutex::new(()),
            group: Mutex::new(Group::default()),
            started: AtomicU64::new(0),
            needs: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// The engine, shared: for lookups (a panic elsewhere fails the pool).
    pub fn read_engine(&self) -> RwLockReadGuard<'_, Pool> {
        if self.engine.is_poisoned() {
            drop(self.write_engine());
        }
        self.engine.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_engine(&self) -> RwLockWriteGuard<'_, Pool> {
        self.engine.write().unwrap_or_else(|p| {
            // A request panicked half way through a change: nothing half
            // done may be committed; the pool reopens at its last commit.
            let mut pool = p.into_inner();
            pool.fail("a request panicked while holding the pool");
            self.engine.clear_poison();
            pool
        })
    }

    fn lock_commits(&self) -> MutexGuard<'_, ()> {
        self.commit_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_group(&self) -> MutexGuard<'_, Group> {
        self.group.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run a management change (it may commit) with the engine to itself.
    pub fn with<R>(&self, f: impl FnOnce(&mut Pool) -> R) -> R {
        let _commits = self.lock_commits();
        f(&mut self.write_engine())
    }

    /// Read `buf.len()` bytes at `offset` (unmapped blocks read as zeros).
    pub fn read(&self, id: VolumeId, offset: u64, buf: &mut [u8]) -> Result<()> {
        let plan = self.read_engine().plan_read(id, offset, buf.len())?;
        plan.run(&*self.storage, &self.inflight, buf)
    }

    /// Write at `offset`; returns once the data is in the pool file (durable
    /// at the next commit, see [`flush`](Self::flush)).
    pub fn write(&self, id: VolumeId, offset: u64, data: &[u8]) -> Result<()> {
        let mut pos = 0;
        let mut flushed = false;
        loop {
            let (plan, placed) =
                self.write_engine()
                    .plan_write(id, offset + pos as u64, &data[pos..]);
            let planned = plan.planned;
            let ran = plan.run(&*self.storage, &self.inflight, &data[pos..]);
            self.written(id);
            if let Err(e) = ran {
                self.write_engine().fail(&format!("data write failed: {e}"));
                return Err(e);
            }
            pos += planned;
            match placed {
                // Frees may be waiting for a commit: commit, and try again
                // before reporting ENOSPC.
                // A full host (no space for the pool file to grow) is
                // ENOSPC of this request, not a failure of the pool.
                Err(e @ (Error::NoSpace | Error::HostFull)) if planned > 0 || !flushed => {
                    if !self.read_engine().space().has_pending() {
                        return Err(e);
                    }
                    self.commit_with(How::Full)?;
                    flushed = true;
                }
                // The log's half is full: commit (the log restarts in the
                // other half) and go on.
                // Other writers may fill it again first: no retry limit
                // but a commit that fails.
                Err(Error::LogFull) => {
                    self.counters
                        .log_full_commits
                        .fetch_add(1, Ordering::Relaxed);
                    self.commit_with(How::Forced)?;
                    flushed = true;
                }
                r => return r,
            }
        }
    }

    /// Unmap the whole blocks of the range, zero the rest.
    pub fn discard(&self, id: VolumeId, offset: u64, len: u64) -> Result<()> {
        let r = self.with(|p| p.discard(id, offset, len));
        self.written(id);
        r
    }

    /// Unmap the whole blocks of each range unless `refuse()`, asked under
    /// the engine lock (under which the export counts an open), says not to.
    pub fn discard_unless(
        &self,
        id: VolumeId,
        ranges: &[(u64, u64)],
        refuse: impl FnOnce() -> bool,
    ) -> Result<bool> {
        let r = self.with(|p| {
            if refuse() {
                return Ok(false);
            }
            for &(offset, len) in ranges {
                p.discard(id, offset, len)?;
            }
            Ok(true)
        });
        self.written(id);
        r
    }

    /// Note a write (or discard) of `id` whose data is in the pool file.
    fn written(&self, id: VolumeId) {
        // Set after the data is in: a commit that seals after this covers
        // it, and the next one to start (`started + 1`) does seal after.
        self.dirty.store(true, Ordering::SeqCst);
        let need = self.started.load(Ordering::SeqCst) + 1;
        let mut needs = self.needs.lock().unwrap_or_else(|p| p.into_inner());
        let n = needs.entry(id).or_insert(0);
        *n = (*n).max(need);
    }

    /// Make every write acknowledged before this call durable, sharing the
    /// commit with every other flush waiting for one (group commit).
    pub fn flush(&self) -> Result<()> {
        let fresh = self.dirty.load(Ordering::SeqCst);
        // Nothing new: only a commit already under way may be needed.
        let target = self.started.load(Ordering::SeqCst) + fresh as u64;
        self.flush_to(target)
    }

    /// Make every write to volume `id` acknowledged before this call durable
    /// (fsync of one volume): a commit that started after the last of them
    /// covers them, even if it started for another volume's flush.
    pub fn flush_volume(&self, id: VolumeId) -> Result<()> {
        let target = {
            let needs = self.needs.lock().unwrap_or_else(|p| p.into_inner());
            needs.get(&id).copied().unwrap_or(0)
        };
        self.flush_to(target)
    }

    /// A full commit of everything written so far (the server's timer;
    /// the intent log restarts), shared with flushes waiting meanwhile.
    pub fn commit(&self) -> Result<()> {
        self.commit_with(How::Full)
    }

    fn commit_with(&self, how: How) -> Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        let _commits = self.lock_commits();
        self.commit_numbered(how)
    }

    /// Wait for commit number `target` to be done, running it if nobody is.
    fn flush_to(&self, target: u64) -> Result<()> {
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        {
            let g = self.lock_group();
            if g.done >= target {
                drop(g);
                self.counters.flushes_free.fetch_add(1, Ordering::Relaxed);
                return self.read_engine().check_ok();
            }
        }
        let _commits = self.lock_commits();
        if self.lock_group().done >= target {
            self.counters.flushes_shared.fetch_add(1, Ordering::Relaxed);
            return self.read_engine().check_ok();
        }
        self.commit_numbered(How::Flush)
    }

    /// A management change committed before it returns, like one made with
    /// `with`, but made and sealed under the engine lock and synced without
    /// it: `f` must leave its change uncommitted (`Pool::stage_*`). The
    /// commit counts as a group commit, so waiting flushes share it.
    pub fn change<R>(&self, f: impl FnOnce(&mut Pool) -> Result<R>) -> Result<R> {
        let _commits = self.lock_commits();
        let r = f(&mut self.write_engine())?;
        self.commit_numbered(How::Full)?;
        Ok(r)
    }

    /// Take the next commit number and run that commit; the caller holds
    /// `commit_lock`.
    fn commit_numbered(&self, how: How) -> Result<()> {
        let mine = {
            let mut g = self.lock_group();
            g.started += 1;
            self.started.store(g.started, Ordering::SeqCst);
            g.started
        };
        let r = self.commit_now(how);
        self.lock_group().done = mine;
        r
    }

    /// One commit; the caller holds `commit_lock`.
    fn commit_now(&self, how: How) -> Result<()> {
        let seal = self
            .write_engine()
            .seal(how, || self.dirty.swap(false, Ordering::SeqCst))?;
        match seal {
            Seal::Nothing => Ok(()),
            Seal::SyncOnly | Seal::LogSync => {
                let c = match seal {
                    Seal::LogSync => &self.counters.log_syncs,
                    _ => &self.counters.data_syncs,
                };
                c.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.storage.sync() {
                    self.write_engine().fail(&format!("data sync failed: {e}"));
                    return Err(e.into());
                }
                Ok(())
            }
            Seal::Pages(sealed) => {
                self.counters.commits.fetch_add(1, Ordering::Relaxed);
                // The engine is free meanwhile: reads and writes go on.
                let written = write_sealed(&*self.storage, &sealed);
                self.write_engine().finish(written)
            }
        }
    }

    /// Every volume; each one's usage walk takes the engine lock on its own,
    /// so writes go on between volumes.
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let ids: Vec<VolumeId> = {
            let p = self.read_engine();
            p.check_ok()?;
            p.records().map(|r| r.id).collect()
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            // The record as it is now: its map may have moved since.
            let p = self.read_engine();
            let Ok(r) = p.record_by_id(id).cloned() else {
                continue; // removed while we were listing
            };
            out.push(p.record_info(&r)?);
        }
        Ok(out)
    }

    /// Commit, then check that commit as it is in the pool file, without
    /// the engine lock: commits wait meanwhile (their frees could reuse the
    /// pages being read), reads and writes do not.
    pub fn check(&self) -> Result<CheckReport> {
        self.commit()?;
        let _commits = self.lock_commits();
        let path = self.read_engine().path().to_path_buf();
        let mut committed = Pool::open_committed(self.storage.clone(), &path)?;
        let report = committed.check();
        committed.fail("inspection only");
        report
    }

    /// Counters of flushes and commits (`info --json` of a served pool).
    pub fn stats(&self) -> CommitStats {
        let c = &self.counters;
        let commits = c.commits.load(Ordering::Relaxed);
        let data_syncs = c.data_syncs.load(Ordering::Relaxed);
        let log_syncs = c.log_syncs.load(Ordering::Relaxed);
        CommitStats {
            flushes: c.flushes.load(Ordering::Relaxed),
            flushes_free: c.flushes_free.load(Ordering::Relaxed),
            flushes_shared: c.flushes_shared.load(Ordering::Relaxed),
            commits,
            data_syncs,
            fdatasyncs: 2 * commits + data_syncs + log_syncs,
            log_syncs,
            log_records: self.read_engine().log_records(),
            log_full_commits: c.log_full_commits.load(Ordering::Relaxed),
        }
    }

    /// Data written since the last flush.
    pub fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::SeqCst)
    }

    /// Something is not in a full commit yet (maybe only in the log).
    pub fn needs_commit(&self) -> bool {
        self.is_dirty() || self.read_engine().has_changes()
    }

    /// Stop using the pool (see [`Pool::fail`]).
    pub fn fail(&self, why: &str) {
        self.write_engine().fail(why);
    }

    /// Commit what is left and hand the pool back.
    pub fn into_inner(self) -> Pool {
        self.engine.into_inner().unwrap_or_else(|p| {
            let mut pool = p.into_inner();
            pool.fail("a request panicked while holding the pool");
            pool
        })
    }
}
