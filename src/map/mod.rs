//! Per-volume block map: virtual block -> physical block, as a radix tree of
//! one-block nodes. Nodes are refcounted like data blocks, so a snapshot
//! shares the whole tree by taking one reference on the root (dm-thin's
//! "clone the origin, an inc will do"). Writing through a shared node shadows
//! it: copy, take a reference on each child, drop one on the original.
//!
//! Level 0 nodes are leaves (entries are data blocks); a volume of depth `d`
//! has its root at level `d - 1`. Entry 0 means "nothing mapped here".

mod nodes;

pub use nodes::{Node, Nodes};

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::io::Storage;
use crate::pdata::alloc_block;
use crate::space::{Budget, Kind, SpaceMap};

/// Levels needed to address `n_blocks` with `fanout` entries per node.
pub fn depth_for(n_blocks: u64, fanout: usize) -> u8 {
    let mut depth = 1u8;
    let mut cap = fanout as u128;
    while cap < n_blocks as u128 {
        cap *= fanout as u128;
        depth += 1;
    }
    depth
}

/// The slot of `vblock` in the node at `level`.
pub fn slot(vblock: u64, level: u8, fanout: usize) -> usize {
    let span = (fanout as u128).pow(level as u32);
    ((vblock as u128 / span) % fanout as u128) as usize
}

/// What a read-only tree walk needs: usable under a shared engine lock.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub nodes: &'a Nodes,
    pub space: &'a SpaceMap,
    pub storage: &'a dyn Storage,
}

/// Everything a tree operation touches.
pub struct Ctx<'a> {
    pub nodes: &'a mut Nodes,
    pub space: &'a mut SpaceMap,
    pub storage: &'a dyn Storage,
}

impl View<'_> {
    /// The data block mapped at `vblock`, if any. Reads metadata only.
    pub fn lookup(&self, root: u64, depth: u8, vblock: u64) -> Result<Option<u64>> {
        let f = self.nodes.fanout();
        let mut node = root;
        for level in (0..depth).rev() {
            if node == 0 {
                return Ok(None);
            }
            node = self.nodes.get(self.storage, node, level)?[slot(vblock, level, f)];
        }
        Ok((node != 0).then_some(node))
    }

    /// The data block at `vblock` if this volume alone reaches it, now and
    /// in the last commit: every node on the path and the block itself has
    /// one owner and was not shared when last committed. Such a block can be
    /// overwritten in place without touching the map (and so without making
    /// the next commit rewrite map nodes).
    pub fn lookup_private(&self, root: u64, depth: u8, vblock: u64) -> Result<Option<u64>> {
        let f = self.nodes.fanout();
        let private = |s: &SpaceMap, b: u64| s.rc(b) == 1 && !s.was_shared(b);
        let mut node = root;
        for level in (0..depth).rev() {
            if node == 0 || !private(self.space, node) {
                return Ok(None);
            }
            node = self.nodes.get(self.storage, node, level)?[slot(vblock, level, f)];
        }
        Ok((node != 0 && self.space.can_overwrite(node)).then_some(node))
    }
}

impl Ctx<'_> {
    /// The same tree, read-only.
    pub fn view(&self) -> View<'_> {
        View {
            nodes: self.nodes,
            space: self.space,
            storage: self.storage,
        }
    }

    /// Make `node` private to this transaction and this tree: returns the
    /// block to write to (itself if it already is).
    fn shadow(&mut self, node: u64, level: u8, budget: Budget) -> Result<u64> {
        if self.space.is_txn_new(node) && self.space.rc(node) == 1 {
            return Ok(node);
        }
        let entries = self.nodes.get(self.storage, node, level)?.to_vec();
        let new = self.alloc(budget)?;
        if self.space.was_shared(node) {
            // The last commit reaches these children through the old node too:
            // they must be copied, not overwritten, if written later.
            for &c in entries.iter().filter(|&&c| c != 0) {
                self.space.mark_shared(c);
            }
        }
        if self.space.rc(node) > 1 {
            // The original stays with its other owners; the copy owns children too.
            for &c in entries.iter().filter(|&&c| c != 0) {
                self.space.inc(c)?;
            }
        }
        // Count 1: the copy takes over the children's references as they are.
        if self.space.dec(node, Kind::Meta)? {
            self.nodes.forget(node);
        }
        self.nodes.insert_dirty(new, level, entries);
        Ok(new)
    }

    /// Shadow (or create) the path to `vblock` and return the writable leaf.
    /// With `create == false` a missing path returns None and allocates nothing.
    pub fn leaf_for_update(
        &mut self,
        root: &mut u64,
        depth: u8,
        vblock: u64,
        create: bool,
    ) -> Result<Option<u64>> {
        let f = self.nodes.fanout();
        let top = depth - 1;
        let budget = if create { Budget::Write } else { Budget::Unmap };
        if *root == 0 {
            if !create {
                return Ok(None);
            }
            *root = self.new_node(top)?;
        } else {
            *root = self.shadow(*root, top, budget)?;
        }
        let mut node = *root;
        for level in (1..depth).rev() {
            let s = slot(vblock, level, f);
            let child = self.nodes.get(self.storage, node, level)?[s];
            let child = if child == 0 {
                if !create {
                    return Ok(None);
                }
                self.new_node(level - 1)?
            } else {
                self.shadow(child, level - 1, budget)?
            };
            self.nodes.get_mut(node)?[s] = child;
            node = child;
        }
        Ok(Some(node))
    }

    /// A block for a map node, its host space reserved.
    fn alloc(&mut self, budget: Budget) -> Result<u64> {
        let bs = self.nodes.block_size() as u64;
        alloc_block(self.space, self.storage, bs, Kind::Meta, budget)
    }

    fn new_node(&mut self, level: u8) -> Result<u64> {
        let b = self.alloc(Budget::Write)?;
        let f = self.nodes.fanout();
        self.nodes.insert_dirty(b, level, vec![0; f]);
        Ok(b)
    }

    /// Drop a tree's reference on `node`; if that was the last, drop its
    /// children too. Shared subtrees stop the walk at once.
    pub fn release(&mut self, node: u64, level: u8) -> Result<()> {
        let entries = self.nodes.get(self.storage, node, level)?;
        if !self.space.dec(node, Kind::Meta)? {
            return Ok(());
        }
        self.nodes.forget(node);
        for c in entries.iter().copied().filter(|&c| c != 0) {
            if level == 0 {
                self.space.dec(c, Kind::Data)?;
            } else {
                self.release(c, level - 1)?;
            }
        }
        Ok(())
    }

    /// Add levels on top until the tree has `new_depth` levels.
    /// On failure (no space) the tree is left as it was.
    pub fn grow(&mut self, root: &mut u64, depth: &mut u8, new_depth: u8) -> Result<()> {
        let (old_root, old_depth) = (*root, *depth);
        while *depth < new_depth {
            if *root != 0 {
                let top = match self.new_node(*depth) {
                    Ok(t) => t,
                    Err(e) => {
                        // Undo the levels added so far: they are new in this
                        // transaction, so dropping them frees them at once.
                        while *root != old_root {
                            let below = self.nodes.get_mut(*root)?[0];
                            self.space.dec(*root, Kind::Meta)?;
                            self.nodes.forget(*root);
                            *root = below;
                        }
                        *depth = old_depth;
                        return Err(e);
                    }
                };
                // The old root moves under the new one: its one reference moves too.
                self.nodes.get_mut(top)?[0] = *root;
                *root = top;
            }
            *depth += 1;
        }
        Ok(())
    }
}

impl View<'_> {
    /// Data blocks reachable from `root` that no other volume can reach,
    /// among the volume's first `n_blocks` virtual blocks.
    pub fn exclusive_blocks(&self, root: u64, depth: u8, n_blocks: u64) -> Result<u64> {
        let mut seen = Reached::default();
        self.exclusive_node(root, depth - 1, 0, n_blocks, &mut seen)
    }

    fn exclusive_node(
        &self,
        node: u64,
        level: u8,
        base: u64,
        n_blocks: u64,
        seen: &mut Reached,
    ) -> Result<u64> {
        if node == 0 || self.space.rc(node) != 1 {
            return Ok(0);
        }
        seen.first_visit(node)?;
        let entries = self.nodes.get(self.storage, node, level)?;
        let mut n = 0;
        for (_, c, lo) in children(&entries, level, base, self.nodes.fanout(), n_blocks) {
            n += if level == 0 {
                (self.space.rc(c) == 1) as u64
            } else {
                self.exclusive_node(c, level - 1, lo, n_blocks, seen)?
            };
        }
        Ok(n)
    }

    /// Mapped blocks with `first <= vblock < end`, as (vblock, pblock), ascending.
    /// Unmapped subtrees are skipped without being read. `end` must not be
    /// past the volume's end: the walk never looks beyond it.
    pub fn mapped_in_range(
        &self,
        root: u64,
        depth: u8,
        first: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        if root != 0 && first < end {
            let mut seen = Reached::default();
            self.range_node(root, depth - 1, 0, (first, end), &mut out, &mut seen)?;
        }
        Ok(out)
    }

    fn range_node(
        &self,
        node: u64,
        level: u8,
        base: u64,
        (first, end): (u64, u64),
        out: &mut Vec<(u64, u64)>,
        seen: &mut Reached,
    ) -> Result<()> {
        seen.first_visit(node)?;
        let span = span(level, self.nodes.fanout());
        let entries = self.nodes.get(self.storage, node, level)?;
        for (_, c, lo) in children(&entries, level, base, self.nodes.fanout(), end) {
            if (lo as u128 + span) <= first as u128 {
                continue;
            }
            if level == 0 {
                out.push((lo, c));
            } else {
                self.range_node(c, level - 1, lo, (first, end), out, seen)?;
            }
        }
        Ok(())
    }
}

/// Virtual blocks under one entry of a node at `level`.
pub fn span(level: u8, fanout: usize) -> u128 {
    (fanout as u128).saturating_pow(level as u32)
}

/// The mapped entries of a node at `level` whose virtual range starts below
/// `end`, as (slot, child, first virtual block). A walk that goes through
/// this never looks past a volume's end, however the node was forged.
pub fn children(
    entries: &[u64],
    level: u8,
    base: u64,
    fanout: usize,
    end: u64,
) -> impl Iterator<Item = (usize, u64, u64)> + '_ {
    let span = span(level, fanout);
    entries
        .iter()
        .enumerate()
        .map(move |(i, &c)| (i, c, base as u128 + i as u128 * span))
        .take_while(move |&(_, _, lo)| lo < end as u128)
        .filter(|&(_, c, _)| c != 0)
        .map(|(i, c, lo)| (i, c, lo as u64))
}

/// The nodes one walk of one tree has read. In a real pool a node is
/// reached through one path of a tree; a forged map can share a node many
/// times over, and a walk that followed every path would multiply its work.
#[derive(Default)]
pub struct Reached(HashSet<u64>);

impl Reached {
    pub fn first_visit(&mut self, node: u64) -> Result<()> {
        if !self.0.insert(node) {
            return Err(Error::corrupt(format!(
                "map node at block {node} is reached through two paths of one map"
            )));
        }
        Ok(())
    }
}
