//! The pool checker (like thin_check): looks at both superblock slots, walks
//! every volume's map from the catalog (validating each node's checksum,
//! type, level and pointers), recomputes every block's reference count and
//! compares it with the stored refcounts. Reads metadata only.
//!
//! Each problem names what is wrong and the path to it: the volume, the chain
//! of map slots from its root, the virtual and physical block, and the
//! expected vs found value. A damaged subtree is reported once and skipped;
//! the walk goes on so one bad node does not hide the rest.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::{Superblock, SUPERBLOCK_SLOT_SIZE};
use crate::map::View;
use crate::pool::Pool;
use crate::space::try_vec;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckReport {
    pub generation: u64,
    pub volumes: usize,
    pub map_nodes: u64,
    pub data_blocks: u64,
    pub metadata_blocks: u64,
    /// One line per problem, naming the volume / block concerned.
    pub problems: Vec<String>,
    /// The same problems, structured (for `--json` consumers and `repair`).
    #[serde(default)]
    pub issues: Vec<Issue>,
    /// Things worth knowing that are not damage (e.g. a superblock slot torn
    /// by a crash, which the next commit rewrites).
    #[serde(default)]
    pub notes: Vec<String>,
    /// The intent log as the open found it: records replayed on top of the
    /// last commit, and where (and why) the log ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<crate::pool::LogReplay>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// What kind of damage a problem is, and whether `repair` can fix it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueKind {
    /// Allocated but referenced by nothing (repair frees it).
    LeakedBlock,
    /// Stored count differs from the references found (repair rebuilds it).
    WrongRefcount,
    /// Referenced but stored as free (repair rebuilds the count).
    UsedButFree,
    /// A volume record's mapped-block count is wrong (repair recounts).
    MappedCount,
    /// Metadata block count in the superblock is wrong (repair recounts).
    MetadataCount,
    /// A map node is unreadable: checksum, type, level, pointer range.
    BadNode,
    /// A virtual block past the volume's end is mapped.
    MappedPastEnd,
    /// One block used both as data and as metadata.
    DataIsMetadata,
    /// A map node reached at two different places (level or virtual
    /// block): a real pool shares a node only where it was shadowed from.
    MisplacedNode,
}

impl IssueKind {
    /// `repair` fixes this kind without guessing data.
    pub fn repairable(self) -> bool {
        matches!(
            self,
            IssueKind::LeakedBlock
                | IssueKind::WrongRefcount
                | IssueKind::UsedButFree
                | IssueKind::MappedCount
                | IssueKind::MetadataCount
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issue {
    pub kind: IssueKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// Slots from the volume's root down to the problem (root first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_block: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<u64>,
    pub message: String,
}

impl Issue {
    fn new(kind: IssueKind, message: String) -> Issue {
        Issue {
            kind,
            volume: None,
            path: Vec::new(),
            virtual_block: None,
            block: None,
            expected: None,
            found: None,
            message,
        }
    }
}

/// What the walk of all maps found, kept for `repair`.
pub(crate) struct Census {
    /// References to each block found by walking every map and table.
    pub expected: Vec<u32>,
    /// Mapped blocks counted per volume id.
    pub mapped: HashMap<u64, u64>,
    /// Blocks found holding metadata.
    pub meta_blocks: u64,
}

/// Per distinct node: (mapped entries below it, highest mapped block offset + 1).
type Summary = (u64, u64);

/// Where a node was first reached, and what lies below it (None: unreadable).
struct Seen {
    level: u8,
    base: u64,
    summary: Option<Summary>,
}

struct Walk<'a> {
    expected: Vec<u32>,
    is_meta: Vec<bool>,
    is_data: Vec<bool>,
    memo: HashMap<u64, Seen>,
    issues: &'a mut Vec<Issue>,
    fanout: u128,
    volume: String,
}

impl Pool {
    /// Check every invariant of the pool as it stands (committed + open transaction).
    pub fn check(&mut self) -> Result<CheckReport> {
        self.check_with_progress(&mut |_, _| {})
    }

    /// `check`, calling `progress(done, total)` as volumes are walked.
    pub fn check_with_progress(
        &mut self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        Ok(self.census(progress)?.0)
    }

    pub(crate) fn census(
        &mut self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(CheckReport, Census)> {
        let total = self.space().total() as usize;
        let reserved = self.space().reserved() as usize;
        let mut report = CheckReport {
            generation: self.generation(),
            volumes: self.records().count(),
            ..Default::default()
        };
        self.check_superblocks(&mut report.notes);
        if let Some(r) = self.log_replay() {
            if r.records > 0 {
                report.notes.push(format!(
                    "intent log: {} records after generation {} replayed; the log ends at slot {}: {}",
                    r.records, r.generation, r.end_slot, r.end
                ));
            }
            report.log = Some(r.clone());
        }
        let mut issues = Vec::new();
        let mut w = Walk {
            expected: try_vec(total, 0, "check's reference counts")?,
            is_meta: try_vec(total, false, "check's block kinds")?,
            is_data: try_vec(total, false, "check's block kinds")?,
            memo: HashMap::new(),
            issues: &mut issues,
            fanout: self.fanout() as u128,
            volume: String::new(),
        };
        w.expected[..reserved].fill(1);
        // The intent log's blocks belong to the superblock, like the tables.
        for p in self.table_pages().chain(self.log_blocks()) {
            w.expected[p as usize] = w.expected[p as usize].saturating_add(1);
            w.is_meta[p as usize] = true;
        }
        let bs = self.block_size() as u64;
        let recs: Vec<_> = self.records().cloned().collect();
        let mut mapped = HashMap::new();
        let n_vols = recs.len() as u64;
        for (i, r) in recs.iter().enumerate() {
            progress(i as u64, n_vols);
            w.volume = r.name.clone();
            let mut count_end = (0, 0);
            if r.root != 0 {
                w.expected[r.root as usize] = w.expected[r.root as usize].saturating_add(1);
                let ctx = self.view();
                let mut path = Vec::new();
                count_end = w
                    .visit(&ctx, r.root, r.depth - 1, 0, &mut path)
                    .unwrap_or((0, 0));
            }
            let (count, end) = count_end;
            mapped.insert(r.id, count);
            if count != r.mapped_blocks {
                let mut is = Issue::new(
                    IssueKind::MappedCount,
                    format!(
                        "volume '{}': records {} mapped blocks, its map holds {count}",
                        r.name, r.mapped_blocks
                    ),
                );
                is.volume = Some(r.name.clone());
                is.expected = Some(count);
                is.found = Some(r.mapped_blocks);
                w.issues.push(is);
            }
            let n_blocks = r.size.div_ceil(bs);
            if r.preallocated && count < n_blocks {
                // Not damage (the holes read as zeros), but its writes there
                // will allocate: the engine never leaves one.
                report.notes.push(format!(
                    "volume '{}' is preallocated but {} of its {n_blocks} blocks are unmapped",
                    r.name,
                    n_blocks - count
                ));
            }
            if end > n_blocks {
                let mut is = Issue::new(
                    IssueKind::MappedPastEnd,
                    format!(
                        "volume '{}': virtual block {} is mapped past the end (the volume has {n_blocks} blocks)",
                        r.name,
                        end - 1
                    ),
                );
                is.volume = Some(r.name.clone());
                is.virtual_block = Some(end - 1);
                w.issues.push(is);
            }
        }
        progress(n_vols, n_vols);
        let rc = self.space().refcounts();
        for (b, &stored) in rc.iter().enumerate().skip(reserved) {
            let found = w.expected[b];
            if found != stored {
                let (kind, what) = match (stored, found) {
                    (_, 0) => (
                        IssueKind::LeakedBlock,
                        "leaked: allocated but nothing references it",
                    ),
                    (0, _) => (IssueKind::UsedButFree, "in use but marked free"),
                    _ => (
                        IssueKind::WrongRefcount,
                        "refcount does not match the references found",
                    ),
                };
                let mut is = Issue::new(
                    kind,
                    format!("block {b}: {what} (stored {stored}, found {found})"),
                );
                is.block = Some(b as u64);
                is.expected = Some(found as u64);
                is.found = Some(stored as u64);
                w.issues.push(is);
            }
            if found > 0 {
                if w.is_meta[b] {
                    report.metadata_blocks += 1;
                } else {
                    report.data_blocks += 1;
                }
            }
        }
        if report.metadata_blocks != self.space().meta() {
            let mut is = Issue::new(
                IssueKind::MetadataCount,
                format!(
                    "superblock counts {} metadata blocks, {} found",
                    self.space().meta(),
                    report.metadata_blocks
                ),
            );
            is.expected = Some(report.metadata_blocks);
            is.found = Some(self.space().meta());
            w.issues.push(is);
        }
        report.map_nodes = w.memo.len() as u64;
        let census = Census {
            expected: w.expected,
            mapped,
            meta_blocks: report.metadata_blocks,
        };
        report.problems = issues.iter().map(|i| i.message.clone()).collect();
        report.issues = issues;
        Ok((report, census))
    }

    /// Both slots: note a damaged one (a torn write from a crash looks the same
    /// as media damage; the next commit rewrites that slot either way).
    fn check_superblocks(&self, notes: &mut Vec<String>) {
        let mut buf = vec![0u8; SUPERBLOCK_SLOT_SIZE];
        for slot in 0..2u64 {
            if self
                .storage()
                .read_at(&mut buf, slot * SUPERBLOCK_SLOT_SIZE as u64)
                .is_err()
            {
                notes.push(format!("superblock slot {slot}: unreadable"));
                continue;
            }
            match Superblock::decode(&buf) {
                Ok(sb) if sb.generation > self.generation() => notes.push(format!(
                    "superblock slot {slot}: generation {} is newer than the one in use ({})",
                    sb.generation,
                    self.generation()
                )),
                Ok(_) => {}
                Err(_) if buf.iter().all(|&b| b == 0) => {}
                Err(e) => notes.push(format!(
                    "superblock slot {slot}: invalid ({e:?}); the pool is at generation {} from the other slot",
                    self.generation()
                )),
            }
        }
    }
}

impl Walk<'_> {
    fn problem_at(
        &mut self,
        kind: IssueKind,
        path: &[usize],
        vblock: Option<u64>,
        block: u64,
        what: String,
    ) {
        let route: Vec<String> = path.iter().map(|s| s.to_string()).collect();
        let mut msg = format!("volume '{}': ", self.volume);
        if !path.is_empty() {
            msg += &format!("map path root/{}: ", route.join("/"));
        }
        if let Some(vb) = vblock {
            msg += &format!("virtual block {vb}: ");
        }
        msg += &what;
        let mut is = Issue::new(kind, msg);
        is.volume = Some(self.volume.clone());
        is.path = path.to_vec();
        is.virtual_block = vblock;
        is.block = Some(block);
        self.issues.push(is);
    }

    /// Walk the subtree at `node`; None if it could not be read (reported).
    fn visit(
        &mut self,
        ctx: &View,
        node: u64,
        level: u8,
        base: u64,
        path: &mut Vec<usize>,
    ) -> Option<Summary> {
        if let Some(s) = self.memo.get(&node) {
            if (s.level, s.base) == (level, base) {
                return s.summary;
            }
            let what = format!(
                "map node at block {node} is reached at level {level}, virtual block {base}, \
                 and also at level {}, virtual block {}",
                s.level, s.base
            );
            self.problem_at(IssueKind::MisplacedNode, path, Some(base), node, what);
            return None;
        }
        self.is_meta[node as usize] = true;
        if self.is_data[node as usize] {
            self.problem_at(
                IssueKind::DataIsMetadata,
                path,
                None,
                node,
                format!("block {node} is a map node and also mapped as data"),
            );
        }
        let entries = match ctx.nodes.get(ctx.storage, node, level) {
            Ok(e) => e,
            Err(e) => {
                let span = self.fanout.pow(level as u32 + 1);
                let what = format!(
                    "map node at block {node} (level {level}, virtual blocks {base}..{}) is unreadable: {e}",
                    (base as u128 + span).min(u64::MAX as u128)
                );
                self.problem_at(IssueKind::BadNode, path, None, node, what);
                self.memo.insert(
                    node,
                    Seen {
                        level,
                        base,
                        summary: None,
                    },
                );
                return None;
            }
        };
        let span = self.fanout.pow(level as u32);
        let (mut count, mut end) = (0u64, 0u64);
        for (i, &c) in entries.iter().enumerate() {
            if c == 0 {
                continue;
            }
            self.expected[c as usize] = self.expected[c as usize].saturating_add(1);
            let off = (i as u128 * span) as u64;
            path.push(i);
            if level == 0 {
                if self.is_meta[c as usize] {
                    self.problem_at(
                        IssueKind::DataIsMetadata,
                        path,
                        Some(base + off),
                        c,
                        format!("data block {c} is also metadata"),
                    );
                }
                self.is_data[c as usize] = true;
                count += 1;
                end = off + 1;
            } else if let Some((n, e)) = self.visit(ctx, c, level - 1, base + off, path) {
                count += n;
                if n > 0 {
                    end = off + e;
                }
            }
            path.pop();
        }
        let summary = Some((count, end));
        self.memo.insert(
            node,
            Seen {
                level,
                base,
                summary,
            },
        );
        summary
    }
}
