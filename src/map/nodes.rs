//! The node cache: decoded map nodes by block number. Nodes written in the
//! open transaction stay here (dirty) until the commit writes them.

use std::collections::{HashMap, HashSet};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::{encode_page, PageHeader, PageType, PAGE_HEADER_SIZE};
use crate::io::Storage;
use crate::space::read_page;

struct Node {
    level: u8,
    entries: Vec<u64>,
}

pub struct Nodes {
    block_size: usize,
    fanout: usize,
    total_blocks: u64,
    first_block: u64,
    /// Generation of the last commit: a page written later is not part of it.
    generation: u64,
    cache: HashMap<u64, Node>,
    dirty: HashSet<u64>,
    max_cached: usize,
}

impl Nodes {
    pub fn new(block_size: u32, total_blocks: u64, first_block: u64, generation: u64) -> Nodes {
        let fanout = crate::format::pointers_per_page(block_size);
        // Keep roughly 256 MiB of clean nodes.
        let max_cached = ((256usize << 20) / block_size as usize).max(64);
        Nodes {
            block_size: block_size as usize,
            fanout,
            total_blocks,
            first_block,
            generation,
            cache: HashMap::new(),
            dirty: HashSet::new(),
            max_cached,
        }
    }

    pub fn fanout(&self) -> usize {
        self.fanout
    }

    /// The last commit's generation (after each commit).
    pub fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }

    pub fn set_total_blocks(&mut self, total: u64) {
        self.total_blocks = total;
    }

    /// Entries of `node`, which must be a map node at `level`.
    pub fn get(&mut self, storage: &dyn Storage, node: u64, level: u8) -> Result<&[u64]> {
        if !self.cache.contains_key(&node) {
            let n = self.load(storage, node, level)?;
            if self.cache.len() >= self.max_cached {
                self.evict();
            }
            self.cache.insert(node, n);
        }
        let n = &self.cache[&node];
        if n.level != level {
            return Err(Error::corrupt(format!(
                "map node at block {node} is at level {}, expected {level}",
                n.level
            )));
        }
        Ok(&n.entries)
    }

    /// Entries of a node written in this transaction.
    pub fn get_mut(&mut self, node: u64) -> Result<&mut Vec<u64>> {
        debug_assert!(self.dirty.contains(&node));
        self.cache
            .get_mut(&node)
            .map(|n| &mut n.entries)
            .ok_or_else(|| Error::corrupt(format!("map node {node} vanished from the cache")))
    }

    pub fn insert_dirty(&mut self, node: u64, level: u8, entries: Vec<u64>) {
        self.cache.insert(node, Node { level, entries });
        self.dirty.insert(node);
    }

    /// A node freed in this transaction: if it was never written, don't write it.
    pub fn forget(&mut self, node: u64) {
        self.dirty.remove(&node);
        self.cache.remove(&node);
    }

    fn evict(&mut self) {
        let dirty = &self.dirty;
        let mut keep = self.max_cached / 2;
        self.cache.retain(|b, _| {
            if dirty.contains(b) {
                return true;
            }
            if keep > 0 {
                keep -= 1;
                return true;
            }
            false
        });
    }

    fn load(&self, storage: &dyn Storage, node: u64, level: u8) -> Result<Node> {
        if node < self.first_block || node >= self.total_blocks {
            return Err(Error::corrupt(format!(
                "map pointer {node} is out of range"
            )));
        }
        let mut buf = vec![0u8; self.block_size];
        let h = read_page(
            storage,
            &mut buf,
            node,
            PageType::MapNode,
            self.total_blocks,
            self.generation,
        )?;
        if h.level != level {
            return Err(Error::corrupt(format!(
                "map node at block {node} is at level {}, expected {level}",
                h.level
            )));
        }
        let mut entries = vec![0u64; self.fanout];
        LE::read_u64_into(
            &buf[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + 8 * self.fanout],
            &mut entries,
        );
        for &e in &entries {
            if e != 0 && (e < self.first_block || e >= self.total_blocks) {
                return Err(Error::corrupt(format!(
                    "map node at block {node} points to block {e}, outside the pool"
                )));
            }
        }
        Ok(Node { level, entries })
    }

    /// Write every node changed in this transaction (not yet durable).
    pub fn write_dirty(&mut self, storage: &dyn Storage, generation: u64) -> Result<()> {
        let mut buf = vec![0u8; self.block_size];
        let mut dirty: Vec<u64> = self.dirty.drain().collect();
        dirty.sort_unstable();
        for b in dirty {
            let n = &self.cache[&b];
            buf.fill(0);
            LE::write_u64_into(
                &n.entries,
                &mut buf[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + 8 * self.fanout],
            );
            encode_page(
                &mut buf,
                &PageHeader {
                    kind: PageType::MapNode,
                    location: b,
                    generation,
                    level: n.level,
                },
            );
            storage.write_at(&buf, b * self.block_size as u64)?;
        }
        Ok(())
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// Forget everything (after a failed commit the cache can't be trusted).
    pub fn clear(&mut self) {
        self.cache.clear();
        self.dirty.clear();
    }
}
