//! The intent log (issue 11; docs/DESIGN.md "The intent log"): map changes
//! of the data path are described by 64-byte records written to the pool
//! file before the write is acknowledged, so a flush needs one fdatasync
//! (data and records together) instead of a full commit. Opening replays
//! the valid records that follow the last commit.
//!
//! Records of the epoch after commit `G` go to half `G % 2`, so the commit
//! being written never overwrites records a crash before its superblock
//! would still need. A block a record maps is *log-pinned* until the commit
//! ending its epoch is durable: never written in place (the record's data
//! crc must stay true), never reused.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{Pool, VolumeId};
use crate::error::{Error, Result};
use crate::format::{self, data_crc, LogKind, LogRecord, Superblock, LOG_RECORD_SIZE};
use crate::io::Storage;
use crate::space::Kind;

/// Bytes of one half of the log of a new pool (two halves).
const HALF_BYTES: u64 = 256 * 1024;
/// The log takes at most this fraction of a small pool's blocks.
const POOL_FRACTION: u64 = 256;

/// Log size (blocks, even) for a pool of `total` blocks of `bs` bytes:
/// two halves of 256 KiB (at least one block each), 0 for tiny pools.
pub(super) fn log_blocks_for(bs: u32, total: u64) -> u32 {
    let half = HALF_BYTES.div_ceil(bs as u64);
    let half = half.min(total / POOL_FRACTION / 2);
    (2 * half) as u32
}

/// A fresh nonce per commit: distinct within a process (the counter) and
/// across processes (time and pid), so a record left by an unfinished
/// commit of the same generation is never taken for one of this epoch.
fn next_nonce() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut z = t
        ^ ((std::process::id() as u64) << 40)
        ^ COUNTER
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// The log's place and the state of the current epoch.
#[derive(Debug, Default)]
pub(crate) struct Log {
    start: u64,
    blocks: u32,
    block_size: u64,
    /// Epoch: the commit the records follow, and its nonce.
    generation: u64,
    nonce: u64,
    /// Next free slot of the epoch's half.
    next: u32,
    /// Logging turned on (`Pool::set_logging`).
    enabled: bool,
    /// The epoch started with logging on: its records describe every map
    /// change since the last commit, so a flush may be a log sync. False
    /// after opening until the next commit (the half may hold records of
    /// an unfinished earlier run with this epoch's generation and nonce).
    usable: bool,
    /// Records appended since the last sync.
    pub(super) unsynced: bool,
    /// Records appended since the pool was opened.
    pub(super) appended: u64,
    /// A run for the log was looked for (pools from before version 3).
    tried: bool,
    /// Tests: fewer records per half than fit, so halves fill often.
    limit: Option<u32>,
}

impl Log {
    pub(super) fn new(sb: &Superblock) -> Log {
        Log {
            start: sb.log_start,
            blocks: sb.log_blocks,
            block_size: sb.block_size as u64,
            generation: sb.generation,
            nonce: sb.log_nonce,
            ..Log::default()
        }
    }

    fn records_per_half(&self) -> u32 {
        ((self.blocks as u64 / 2) * self.block_size / LOG_RECORD_SIZE as u64) as u32
    }

    /// Do not look for a run for the log (in this session).
    pub(super) fn set_tried(&mut self, tried: bool) {
        self.tried = tried;
    }

    /// Records the write path may put in a half.
    fn capacity(&self) -> u32 {
        let n = self.records_per_half();
        self.limit.map_or(n, |l| l.min(n))
    }

    /// Byte offset of the half that epoch `generation` writes.
    fn half_offset(&self, generation: u64) -> u64 {
        (self.start + (generation % 2) * (self.blocks as u64 / 2)) * self.block_size
    }

    /// Records are being written.
    pub(super) fn active(&self) -> bool {
        self.enabled && self.blocks > 0
    }

    /// A flush may be one fdatasync: every change since the last commit is
    /// in this epoch's records.
    pub(super) fn covers_changes(&self) -> bool {
        self.active() && self.usable
    }

    /// The commit `sb` was sealed: records from now on belong to its epoch.
    pub(super) fn start_epoch(&mut self, sb: &Superblock) {
        self.block_size = sb.block_size as u64;
        self.start = sb.log_start;
        self.blocks = sb.log_blocks;
        self.generation = sb.generation;
        self.nonce = sb.log_nonce;
        self.next = 0;
        self.usable = self.active();
    }
}

/// The intent log as `info` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogInfo {
    /// First block of the log area, and its length in blocks (two halves).
    pub start_block: u64,
    pub blocks: u32,
    pub bytes: u64,
    /// Records one half holds: the records one epoch (the time between two
    /// commits) may write before the write path must commit.
    pub records_per_half: u32,
    /// Records since the last commit: written by the server in this epoch,
    /// or (an unserved pool) found by the replay at open, which a read-only
    /// open keeps in memory (the next read-write open commits them).
    pub pending_records: u64,
    /// Map changes are being logged now (a served pool).
    pub logging: bool,
}

/// What the replay at open found (`check` reports it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogReplay {
    /// The commit the log follows: the pool opened at it.
    pub generation: u64,
    /// Records replayed (the valid prefix of the log, less map records
    /// whose data never arrived: skipped).
    pub records: u64,
    /// The slot where the log ends, and why.
    pub end_slot: u64,
    pub end: String,
}

/// Fill `buf` from `offset`; bytes past the end of the file read as zeros
/// (a log area never written may lie beyond it).
fn read_or_zero(storage: &dyn Storage, buf: &mut [u8], offset: u64) -> Result<()> {
    let len = storage.len()?;
    let n = len.saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[n..].fill(0);
    if n > 0 {
        storage.read_at(&mut buf[..n], offset)?;
    }
    Ok(())
}

impl Pool {
    /// Turn the intent log on (the export server does) or off. With it on,
    /// a flush ([`Pool::flush`]) costs one fdatasync; without it, every
    /// flush is a full commit. A pool without a log ignores this.
    pub fn set_logging(&mut self, on: bool) {
        self.log.enabled = on;
        if !on {
            self.log.usable = false;
        }
        self.update_reserve();
    }

    /// Test machinery: let the write path put at most `records` records in
    /// a half (at least 1), so tests see halves fill and commits restart
    /// the log. The format is unchanged: replay reads the whole half.
    #[doc(hidden)]
    pub fn limit_log(&mut self, records: u32) {
        self.log.limit = Some(records.max(1));
    }

    /// Whether map changes are being logged.
    pub fn logging(&self) -> bool {
        self.log.active()
    }

    /// What the replay of the intent log at open found (None: no log, or a
    /// pool opened beside its owner).
    pub fn log_replay(&self) -> Option<&LogReplay> {
        self.replayed.as_ref()
    }

    /// Records written since the pool was opened.
    pub fn log_records(&self) -> u64 {
        self.log.appended
    }

    /// The intent log's place: (first block, blocks); (0, 0) = none.
    pub fn log_area(&self) -> (u64, u32) {
        (self.sb.log_start, self.sb.log_blocks)
    }

    /// Where the log is and how full its current half is; None for a pool
    /// without one (made before format version 3, or too small for one).
    pub fn log_info(&self) -> Option<LogInfo> {
        let l = &self.log;
        if l.blocks == 0 {
            return None;
        }
        // A read-write open commits what it replayed; a read-only one
        // shows the replayed records on top of the last commit.
        let replayed = match (&self.replayed, self.read_only) {
            (Some(r), true) => r.records,
            _ => 0,
        };
        Some(LogInfo {
            start_block: l.start,
            blocks: l.blocks,
            bytes: l.blocks as u64 * l.block_size,
            records_per_half: l.records_per_half(),
            pending_records: l.next as u64 + replayed,
            logging: l.active(),
        })
    }

    /// Room for one more record (or no record needed): else `LogFull`, and
    /// the caller commits and tries again.
    pub(super) fn log_room(&self) -> Result<()> {
        let l = &self.log;
        if !l.active() || (l.usable && l.next < l.capacity()) {
            Ok(())
        } else {
            Err(Error::LogFull)
        }
    }

    /// Log that `vb` of volume `id` now maps to `pblock`, whose content is
    /// `content` (under the engine lock, before the write is acknowledged).
    pub(super) fn log_map(
        &mut self,
        id: VolumeId,
        vb: u64,
        pblock: u64,
        content: &[u8],
    ) -> Result<()> {
        if !self.log.active() {
            return Ok(());
        }
        self.space.pin_logged(pblock);
        self.log_append(LogKind::Map, id, vb, pblock, data_crc(content))
    }

    /// Log that `vb` of volume `id` was unmapped.
    pub(super) fn log_unmap(&mut self, id: VolumeId, vb: u64) -> Result<()> {
        if !self.log.active() {
            return Ok(());
        }
        self.log_append(LogKind::Unmap, id, vb, 0, 0)
    }

    fn log_append(
        &mut self,
        kind: LogKind,
        volume: VolumeId,
        vblock: u64,
        pblock: u64,
        crc: u32,
    ) -> Result<()> {
        // Callers check for room before they change the map.
        self.log_room()?;
        let l = &mut self.log;
        let rec = LogRecord {
            generation: l.generation,
            nonce: l.nonce,
            seq: l.next,
            kind,
            volume,
            vblock,
            pblock,
            data_crc: crc,
        };
        let at = l.half_offset(l.generation) + l.next as u64 * LOG_RECORD_SIZE as u64;
        if let Err(e) = self.storage.write_at(&rec.encode(), at) {
            // The map already holds the change the record was to describe.
            self.fail(&format!("log write failed: {e}"));
            return Err(e.into());
        }
        let l = &mut self.log;
        l.next += 1;
        l.unsynced = true;
        l.appended += 1;
        Ok(())
    }

    /// Before a commit's pages are written: a pool without a log (made by
    /// an older version) gets one if a contiguous run of free blocks can be
    /// had. Its blocks are metadata with refcount 1, owned by the superblock.
    pub(super) fn ensure_log(&mut self) -> Result<()> {
        if self.sb.log_blocks > 0 || self.log.tried {
            return Ok(());
        }
        self.log.tried = true;
        let bs = self.block_size();
        let n = log_blocks_for(bs, self.space.total());
        if n == 0 {
            return Ok(());
        }
        let Some(start) = self.space.alloc_run(n as u64) else {
            return Ok(());
        };
        let (off, len) = (start * bs as u64, n as u64 * bs as u64);
        if self.storage.reserve(off, len).is_err() {
            // No host space for it: no log (flushes commit, as before).
            for b in start..start + n as u64 {
                self.space.unalloc(b, Kind::Meta)?;
            }
            return Ok(());
        }
        self.sb.log_start = start;
        self.sb.log_blocks = n;
        Ok(())
    }

    /// When a commit is sealed: its superblock gets a fresh nonce, and
    /// records from now on belong to the epoch after it.
    pub(super) fn seal_log(&mut self) {
        self.sb.log_nonce = if self.sb.log_blocks > 0 {
            next_nonce()
        } else {
            0
        };
        self.log.start_epoch(&self.sb);
        self.log.unsynced = false;
    }

    /// Replay the records that follow the last commit (in memory: the
    /// caller commits). Records are accepted in slot order while they are
    /// whole, of this epoch, and name a volume block and a free block; the
    /// first that is not ends the log. A map record whose block does not
    /// hold what it logged is skipped (its write was never acknowledged).
    pub(super) fn replay_log(&mut self) -> Result<()> {
        self.log = Log::new(&self.sb);
        if self.sb.log_blocks == 0 {
            return Ok(());
        }
        let (g, nonce) = (self.sb.generation, self.sb.log_nonce);
        let n = self.log.records_per_half() as usize;
        let at = self.log.half_offset(g);
        // A block at a time: the log's size comes from the file, which
        // may lie; memory must not follow it.
        let mut block = vec![0u8; self.block_size() as usize];
        let per_block = block.len() / LOG_RECORD_SIZE;
        let mut records = Vec::new();
        let mut claimed = HashSet::new();
        let mut end = None;
        let mut end_slot = 0;
        for slot in 0..n {
            let within = slot % per_block;
            if within == 0 {
                read_or_zero(
                    &*self.storage,
                    &mut block,
                    at + (slot / per_block) as u64 * self.log.block_size,
                )?;
            }
            let bytes = &block[within * LOG_RECORD_SIZE..][..LOG_RECORD_SIZE];
            end_slot = slot as u64 + 1;
            let why = match LogRecord::decode(bytes, g, nonce, slot as u32) {
                Ok(r) => match self.replayable(&r, &claimed).inspect_err(|e| {
                    self.fail(&format!("the intent log could not be read: {e}"));
                })? {
                    Ok(true) => {
                        if r.kind == LogKind::Map {
                            claimed.insert(r.pblock);
                        }
                        records.push(r);
                        continue;
                    }
                    // A write whose data never arrived: skipped, not an end.
                    Ok(false) => continue,
                    Err(why) => why,
                },
                Err(e) => e.to_string(),
            };
            end_slot = slot as u64;
            end = Some(why);
            break;
        }
        let replay = LogReplay {
            generation: g,
            records: records.len() as u64,
            end_slot,
            end: end.unwrap_or_else(|| "the half is full".into()),
        };
        // Claim every block first, so the map nodes the replay shadows
        // are never put on one; keep them pinned, so a block a later record
        // replaces is not reused before the replay's commit is durable.
        for r in records.iter().filter(|r| r.kind == LogKind::Map) {
            if !self.space.claim(r.pblock) {
                self.fail("the intent log could not be replayed");
                return Err(Error::corrupt(format!(
                    "log record {}: block {} is not free",
                    r.seq, r.pblock
                )));
            }
            self.space.pin_logged(r.pblock);
        }
        for r in &records {
            let applied = match r.kind {
                LogKind::Map => self.set_mapping(r.volume, r.vblock, r.pblock),
                LogKind::Unmap => self.unmap_block(r.volume, r.vblock),
            };
            if let Err(e) = applied {
                // Half replayed: nothing of it may be committed (dropping
                // the pool would), or the log would restart without it.
                self.fail(&format!("the intent log could not be replayed: {e}"));
                return Err(e);
            }
        }
        self.replayed = Some(replay);
        Ok(())
    }

    /// Whether record `r` is replayed (false: its write's data never
    /// arrived, so it is skipped), or why it ends the log there.
    fn replayable(&self, r: &LogRecord, claimed: &HashSet<u64>) -> Result<Result<bool, String>> {
        let Ok(v) = self.catalog.get(r.volume) else {
            // A volume staged after this commit (`SharedPool::change` lets
            // writes in before it seals): its creation was never durable,
            // nor its writes; records after it may be of acknowledged ones.
            return Ok(Ok(false));
        };
        let bs = self.block_size() as u64;
        if v.read_only || r.vblock >= v.size.div_ceil(bs) {
            return Ok(Err(format!(
                "record {}: volume '{}' has no writable block {}",
                r.seq, v.name, r.vblock
            )));
        }
        if r.kind == LogKind::Unmap {
            return Ok(Ok(true));
        }
        let b = r.pblock;
        if b < format::reserved_blocks(self.block_size()) || b >= self.space.total() {
            return Ok(Err(format!(
                "record {}: block {b} is outside the pool",
                r.seq
            )));
        }
        if self.space.rc(b) != 0 || claimed.contains(&b) {
            return Ok(Err(format!(
                "record {}: block {b} was not free at the last commit",
                r.seq
            )));
        }
        let mut data = vec![0u8; bs as usize];
        // A block past the end of the file was never written (even if its
        // logged data is zeros, which the missing bytes would match).
        // An I/O error fails the open (a skip would lose a flushed write).
        let past_end = (b + 1) * bs > self.storage.len()?;
        if past_end || {
            self.storage.read_at(&mut data, b * bs)?;
            data_crc(&data) != r.data_crc
        } {
            // Its data never reached the file: that write was neither
            // flushed nor acknowledged. Later records may still be whole
            // (concurrent writes: a killed process had acknowledged them),
            // and none depends on this one (a merge into its block waits
            // for the data), so it is skipped, not the end of the log.
            return Ok(Ok(false));
        }
        Ok(Ok(true))
    }
}
