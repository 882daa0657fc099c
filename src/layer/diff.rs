//! Comparing two volumes' block maps (thin_delta).
//!
//! Map nodes are shared between volumes by pointer: a snapshot shares its
//! origin's root, and a write shadows only the path to the block written.
//! So two trees are walked side by side and an identical pointer on both
//! sides means an identical subtree, skipped without being read. Only the
//! nodes on paths that differ are read, and no data block is.
//!
//! Trees of different depths (a volume grown after the snapshot) are
//! compared by lifting the shallower one: `grow` puts the old root in slot 0
//! of each new top node, so the shallower tree is read as if it had such
//! nodes above it.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::format::VolumeRecord;
use crate::map::{self, Reached, View};

/// A volume's map: root block (0 = empty), depth, and the volume's size in
/// blocks (the walk never looks past it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    pub root: u64,
    pub depth: u8,
    pub blocks: u64,
}

impl Tree {
    pub const EMPTY: Tree = Tree {
        root: 0,
        depth: 1,
        blocks: 0,
    };

    /// The map of a volume record.
    pub fn of(r: &VolumeRecord, block_size: u32) -> Tree {
        Tree {
            root: r.root,
            depth: r.depth,
            blocks: r.size.div_ceil(block_size as u64),
        }
    }
}

/// A block whose map entry differs: its physical block in A and in B (0 = unmapped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockChange {
    pub vblock: u64,
    pub a: u64,
    pub b: u64,
}

/// How a range differs, going from A to B.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Mapped only in B (written since A).
    Added,
    /// Mapped only in A (discarded in B).
    Removed,
    /// Mapped in both, to different blocks (rewritten).
    Changed,
}

/// Consecutive blocks that differ the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffRange {
    /// First virtual block.
    pub block: u64,
    /// Number of blocks.
    pub blocks: u64,
    pub kind: ChangeKind,
}

/// Totals of a diff (`--stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffSummary {
    pub ranges: u64,
    pub added_blocks: u64,
    pub removed_blocks: u64,
    pub changed_blocks: u64,
}

impl DiffSummary {
    pub fn of(ranges: &[DiffRange]) -> DiffSummary {
        let mut s = DiffSummary {
            ranges: ranges.len() as u64,
            ..Default::default()
        };
        for r in ranges {
            match r.kind {
                ChangeKind::Added => s.added_blocks += r.blocks,
                ChangeKind::Removed => s.removed_blocks += r.blocks,
                ChangeKind::Changed => s.changed_blocks += r.blocks,
            }
        }
        s
    }

    pub fn total_blocks(&self) -> u64 {
        self.added_blocks + self.removed_blocks + self.changed_blocks
    }
}

/// A node seen at some level of the comparison; `level` is its real level,
/// lower than the comparison level when the tree is being lifted.
#[derive(Debug, Clone, Copy)]
struct Ref {
    block: u64,
    level: u8,
}

const NONE: Ref = Ref { block: 0, level: 0 };

fn same(x: Ref, y: Ref) -> bool {
    x.block == y.block && (x.block == 0 || x.level == y.level)
}

/// One side of the comparison: where its volume ends, and the nodes read.
struct Side {
    end: u64,
    seen: Reached,
}

fn children(ctx: &View<'_>, side: &mut Side, r: Ref, level: u8, base: u128) -> Result<Vec<Ref>> {
    let f = ctx.nodes.fanout();
    let mut v = vec![NONE; f];
    if r.block == 0 || base >= side.end as u128 {
        return Ok(v);
    }
    if level > r.level {
        v[0] = r;
        return Ok(v);
    }
    side.seen.first_visit(r.block)?;
    let entries = ctx.nodes.get(ctx.storage, r.block, level)?;
    let child_level = level.saturating_sub(1);
    for (i, c, _) in map::children(&entries, level, base as u64, f, side.end) {
        v[i] = Ref {
            block: c,
            level: child_level,
        };
    }
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn compare(
    ctx: &View<'_>,
    sides: &mut [Side; 2],
    a: Ref,
    b: Ref,
    level: u8,
    base: u128,
    out: &mut dyn FnMut(BlockChange) -> Result<()>,
) -> Result<()> {
    if same(a, b) {
        return Ok(());
    }
    let ca = children(ctx, &mut sides[0], a, level, base)?;
    let cb = children(ctx, &mut sides[1], b, level, base)?;
    let span = map::span(level, ctx.nodes.fanout());
    for (i, (&x, &y)) in ca.iter().zip(&cb).enumerate() {
        if same(x, y) {
            continue;
        }
        let vb = base + i as u128 * span;
        if level == 0 {
            out(BlockChange {
                // Below one side's end, so it fits in 64 bits.
                vblock: vb as u64,
                a: x.block,
                b: y.block,
            })?;
        } else {
            compare(ctx, sides, x, y, level - 1, vb, out)?;
        }
    }
    Ok(())
}

/// Call `out` for every virtual block whose map entry differs between `a`
/// and `b`, in ascending order. Each map is read only up to its volume's
/// end; past it, it counts as unmapped.
pub fn changed_blocks(
    ctx: &View<'_>,
    a: Tree,
    b: Tree,
    out: &mut dyn FnMut(BlockChange) -> Result<()>,
) -> Result<()> {
    let top = a.depth.max(b.depth).max(1) - 1;
    let ra = Ref {
        block: a.root,
        level: a.depth.max(1) - 1,
    };
    let rb = Ref {
        block: b.root,
        level: b.depth.max(1) - 1,
    };
    let mut sides = [a.blocks, b.blocks].map(|end| Side {
        end,
        seen: Reached::default(),
    });
    compare(ctx, &mut sides, ra, rb, top, 0, out)
}

/// The differing blocks of `a` and `b` as maximal ranges of one kind.
pub fn ranges(ctx: &View<'_>, a: Tree, b: Tree) -> Result<Vec<DiffRange>> {
    let mut out: Vec<DiffRange> = Vec::new();
    changed_blocks(ctx, a, b, &mut |c| {
        let kind = match (c.a, c.b) {
            (0, _) => ChangeKind::Added,
            (_, 0) => ChangeKind::Removed,
            _ => ChangeKind::Changed,
        };
        match out.last_mut() {
            Some(r) if r.kind == kind && r.block + r.blocks == c.vblock => r.blocks += 1,
            _ => out.push(DiffRange {
                block: c.vblock,
                blocks: 1,
                kind,
            }),
        }
        Ok(())
    })?;
    Ok(out)
}
