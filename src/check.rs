//! The pool checker (like thin_check): walks every volume's map from the
//! catalog, recomputes every block's reference count, and compares it with
//! the stored refcounts. Reads metadata only.

use std::collections::HashMap;

use serde::Serialize;

use crate::error::Result;
use crate::map::Ctx;
use crate::pool::Pool;

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub generation: u64,
    pub volumes: usize,
    pub map_nodes: u64,
    pub data_blocks: u64,
    pub metadata_blocks: u64,
    /// One line per problem, naming the volume / block concerned.
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Per distinct node: (mapped entries below it, highest mapped block offset + 1).
type Summary = (u64, u64);

struct Walk<'a> {
    expected: Vec<u32>,
    is_meta: Vec<bool>,
    memo: HashMap<u64, Summary>,
    problems: &'a mut Vec<String>,
}

impl Pool {
    /// Check every invariant of the pool as it stands (committed + open transaction).
    pub fn check(&mut self) -> Result<CheckReport> {
        let total = self.space.total() as usize;
        let reserved = self.space.reserved() as usize;
        let mut report = CheckReport {
            generation: self.generation(),
            volumes: self.catalog.len(),
            ..Default::default()
        };
        let mut w = Walk {
            expected: vec![0; total],
            is_meta: vec![false; total],
            memo: HashMap::new(),
            problems: &mut report.problems,
        };
        w.expected[..reserved].fill(1);
        let pages = self.rc_layout.page_locations().iter().chain(self.rc_layout.index_pointers());
        let cat = self.catalog.layout.page_locations().iter().chain(self.catalog.layout.index_pointers());
        for &p in pages.chain(cat).filter(|&&p| p != 0) {
            w.expected[p as usize] += 1;
            w.is_meta[p as usize] = true;
        }
        let bs = self.block_size() as u64;
        let recs: Vec<_> = self.catalog.iter().cloned().collect();
        let fanout = self.nodes.fanout() as u128;
        for r in &recs {
            if r.root == 0 {
                if r.mapped_blocks != 0 {
                    w.problems.push(format!("volume '{}': records {} mapped blocks but has no map", r.name, r.mapped_blocks));
                }
                continue;
            }
            w.expected[r.root as usize] += 1;
            let mut ctx = Ctx { nodes: &mut self.nodes, space: &mut self.space, storage: &*self.storage };
            let (count, end) = match w.visit(&mut ctx, r.root, r.depth - 1, fanout) {
                Ok(s) => s,
                Err(e) => {
                    w.problems.push(format!("volume '{}': {e}", r.name));
                    continue;
                }
            };
            if count != r.mapped_blocks {
                w.problems.push(format!(
                    "volume '{}': records {} mapped blocks, its map holds {count}",
                    r.name, r.mapped_blocks
                ));
            }
            let n_blocks = r.size.div_ceil(bs);
            if end > n_blocks {
                w.problems.push(format!(
                    "volume '{}': virtual block {} is mapped past the end ({n_blocks} blocks)",
                    r.name,
                    end - 1
                ));
            }
        }
        let rc = self.space.refcounts();
        for b in reserved..total {
            let (found, stored) = (w.expected[b], rc[b]);
            if found != stored {
                let what = match (stored, found) {
                    (_, 0) => "leaked: allocated but nothing references it",
                    (0, _) => "in use but marked free",
                    _ => "refcount does not match the references found",
                };
                w.problems.push(format!("block {b}: {what} (stored {stored}, found {found})"));
            }
            if found > 0 {
                if w.is_meta[b] {
                    report.metadata_blocks += 1;
                } else {
                    report.data_blocks += 1;
                }
            }
        }
        if report.metadata_blocks != self.space.meta() {
            w.problems.push(format!(
                "superblock counts {} metadata blocks, {} found",
                self.space.meta(),
                report.metadata_blocks
            ));
        }
        report.map_nodes = w.memo.len() as u64;
        Ok(report)
    }
}

impl Walk<'_> {
    fn visit(&mut self, ctx: &mut Ctx, node: u64, level: u8, fanout: u128) -> Result<Summary> {
        if let Some(s) = self.memo.get(&node) {
            return Ok(*s);
        }
        self.is_meta[node as usize] = true;
        let entries = ctx.nodes.get(ctx.storage, node, level)?.to_vec();
        let span = fanout.pow(level as u32);
        let (mut count, mut end) = (0u64, 0u64);
        for (i, c) in entries.into_iter().enumerate() {
            if c == 0 {
                continue;
            }
            self.expected[c as usize] += 1;
            let base = (i as u128 * span) as u64;
            if level == 0 {
                if self.is_meta[c as usize] {
                    self.problems.push(format!("block {c} is mapped as data but is also metadata"));
                }
                count += 1;
                end = base + 1;
            } else {
                let (n, e) = self.visit(ctx, c, level - 1, fanout)?;
                count += n;
                if n > 0 {
                    end = base + e;
                }
            }
        }
        self.memo.insert(node, (count, end));
        Ok((count, end))
    }
}
