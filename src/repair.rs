//! `repair` (like thin_repair, but in place): fixes what can be fixed without
//! guessing data, and reports the rest.
//!
//! - A newest superblock whose commit does not open is passed over for the
//!   older slot's commit; the repair's own commit then overwrites it.
//! - Refcounts are rebuilt from the references found by walking every map
//!   (leaked blocks are freed, wrong counts corrected), along with each
//!   volume's mapped-block count and the metadata block count.
//! - A damaged map node, a mapping past a volume's end, or a block used as
//!   both data and metadata is reported and left alone: fixing those would
//!   mean deciding which data to keep. When a map node is unreadable the walk
//!   is incomplete, so refcounts are *not* rebuilt either (the blocks under
//!   the damaged node would look leaked and be freed).
//!
//! Before changing anything it writes a backup of the metadata it changes:
//! `POOL.repair-backup-<generation>`, a list of (offset u64 LE, length u64 LE,
//! bytes) records after a one-line header, holding both superblock slots and
//! the refcount and catalog pages of the commit it repairs. Repair writes new
//! pages copy-on-write, so writing the superblock records back undoes it, as
//! long as the pool was not used since.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::check::{CheckReport, IssueKind};
use crate::error::{Error, Result};
use crate::format::{Superblock, SUPERBLOCK_AREA, SUPERBLOCK_SLOT_SIZE};
use crate::io::Storage;
use crate::pool::Pool;

pub const BACKUP_HEADER: &[u8] = b"THINPOOL-REPAIR-BACKUP v1\n";

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    /// Generation of the commit that was repaired.
    pub generation: u64,
    /// Generation after the repair's commit (equal when nothing changed).
    pub new_generation: u64,
    /// What was fixed, one line each.
    pub fixed: Vec<String>,
    /// What could not be fixed (left as it was).
    pub unfixed: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
    /// The check after the repair.
    pub after: CheckReport,
}

impl RepairReport {
    pub fn is_clean(&self) -> bool {
        self.unfixed.is_empty() && self.after.is_clean()
    }
}

/// Repair the pool file at `path` (takes the owner lock).
pub fn repair(path: &Path) -> Result<RepairReport> {
    let open =
        || -> Result<Box<dyn Storage>> { Ok(Box::new(crate::pool::open::open_file(path, true)?)) };
    let mut backup = path.as_os_str().to_owned();
    backup.push(".repair-backup-");
    repair_with(&open, path, &PathBuf::from(backup))
}

/// Repair a pool on any storage; `open` yields a fresh handle per attempt,
/// `backup_prefix` gets the generation appended.
pub fn repair_with(
    open: &dyn Fn() -> Result<Box<dyn Storage>>,
    path: &Path,
    backup_prefix: &Path,
) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let slots = read_slots(&*open()?)?;
    let mut candidates: Vec<(usize, Superblock)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.clone().map(|sb| (i, sb)))
        .collect();
    candidates.sort_by_key(|(_, sb)| std::cmp::Reverse(sb.generation));
    if candidates.is_empty() {
        return Err(Error::corrupt(
            "no valid superblock in either slot; nothing to repair from",
        ));
    }
    let newest = candidates[0].1.generation;
    let mut pool = None;
    let mut failures = Vec::new();
    for (slot, sb) in &candidates {
        match Pool::open_at(open()?, path, sb.clone()) {
            Ok(p) => {
                pool = Some((*slot, p));
                break;
            }
            Err(e) => failures.push(format!(
                "generation {} (slot {slot}) does not open: {e}",
                sb.generation
            )),
        }
    }
    let Some((slot, mut pool)) = pool else {
        return Err(Error::corrupt(format!(
            "no commit opens, cannot repair: {}",
            failures.join("; ")
        )));
    };
    report.generation = pool.generation();
    let fell_back = pool.generation() != newest;
    let (before, census) = pool.census(&mut |_, _| {})?;
    let slot_damaged = slots.iter().any(|s| s.is_none());
    // Records of the intent log were replayed in memory: commit them.
    let replayed = pool.log_replay().map_or(0, |r| r.records);
    if before.is_clean() && !fell_back && !slot_damaged && replayed == 0 {
        report.new_generation = report.generation;
        report.after = before;
        return Ok(report);
    }
    let backup = PathBuf::from(format!("{}{}", backup_prefix.display(), report.generation));
    write_backup(&pool, &backup)?;
    report.backup = Some(backup);
    if fell_back {
        report.fixed.push(format!(
            "newest commit (generation {newest}) is damaged ({}); went back to generation {} from slot {slot}",
            failures.join("; "),
            report.generation
        ));
    } else if slot_damaged {
        report
            .fixed
            .push(format!("rewrote the damaged superblock slot {}", 1 - slot));
    }
    if let Some(r) = pool.log_replay().filter(|r| r.records > 0) {
        report.fixed.push(format!(
            "replayed {} intent log records after generation {}; the log ends at slot {} ({}), the rest is not trusted",
            r.records, r.generation, r.end_slot, r.end
        ));
    }
    let walk_complete = !before.issues.iter().any(|i| i.kind == IssueKind::BadNode);
    for is in &before.issues {
        if !is.kind.repairable() {
            report.unfixed.push(is.message.clone());
        } else if !walk_complete {
            report.unfixed.push(format!(
                "{} (not rebuilt: a map node is unreadable, the walk is incomplete)",
                is.message
            ));
        }
    }
    if walk_complete {
        for is in &before.issues {
            if is.kind.repairable() {
                report.fixed.push(is.message.clone());
            }
        }
        pool.rebuild_counts(&census.expected, census.meta_blocks, &census.mapped)?;
    }
    pool.commit_forced()?;
    report.new_generation = pool.generation();
    report.after = pool.check()?;
    pool.close()?;
    Ok(report)
}

/// Both superblock slots, None where a slot is invalid.
fn read_slots(storage: &dyn Storage) -> Result<[Option<Superblock>; 2]> {
    let mut buf = vec![0u8; SUPERBLOCK_AREA as usize];
    let n = (storage.len()? as usize).min(buf.len());
    storage.read_at(&mut buf[..n], 0)?;
    let s0 = Superblock::decode(&buf[..SUPERBLOCK_SLOT_SIZE]).ok();
    let s1 = Superblock::decode(&buf[SUPERBLOCK_SLOT_SIZE..]).ok();
    Ok([s0, s1])
}

fn write_backup(pool: &Pool, path: &Path) -> Result<()> {
    let bs = pool.block_size() as u64;
    let mut out = Vec::new();
    out.extend_from_slice(BACKUP_HEADER);
    let mut record = |offset: u64, len: u64| -> Result<()> {
        let mut buf = vec![0u8; len as usize];
        pool.storage().read_at(&mut buf, offset)?;
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&buf);
        Ok(())
    };
    record(0, SUPERBLOCK_AREA)?;
    for p in pool.table_pages() {
        record(p * bs, bs)?;
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| {
            Error::InvalidArgument(format!(
                "cannot write the repair backup {}: {e}",
                path.display()
            ))
        })?;
    f.write_all(&out)?;
    f.sync_all()?;
    Ok(())
}

//------------------------------------------------------------------------------

/// Damage for tests (test machinery, only with the `test-support` feature).
#[cfg(feature = "test-support")]
pub use crate::pool::damage;
