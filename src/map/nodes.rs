//! The node cache: decoded map nodes by block number. Nodes written in the
//! open transaction stay here (dirty) until the commit writes them.
//!
//! Clean nodes are readable through `&self` (the cache has its own small
//! lock), so lookups can run side by side under a shared engine lock; dirty
//! nodes change only through `&mut self`.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::{encode_page, PageHeader, PageType, PAGE_HEADER_SIZE};
use crate::io::Storage;
use crate::pdata::read_page;

#[derive(Clone)]
pub struct Node {
    level: u8,
    entries: Vec<u64>,
}

impl Deref for Node {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        &self.entries
    }
}

pub struct Nodes {
    block_size: usize,
    fanout: usize,
    total_blocks: u64,
    first_block: u64,
    /// Generation of the last commit: a page written later is not part of it.
    generation: u64,
    /// Clean nodes (as committed), shared with readers.
    cache: Mutex<HashMap<u64, Arc<Node>>>,
    /// Nodes written in the open transaction.
    dirty: HashMap<u64, Arc<Node>>,
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
            cache: Mutex::new(HashMap::new()),
            dirty: HashMap::new(),
            max_cached,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
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
    pub fn get(&self, storage: &dyn Storage, node: u64, level: u8) -> Result<Arc<Node>> {
        // (An empty map answers without hashing.)
        let n = match self.dirty.get(&node) {
            Some(n) => n.clone(),
            None => {
                let cached = self.lock_cache().get(&node).cloned();
                match cached {
                    Some(n) => n,
                    None => {
                        // Read outside the cache lock: two readers may load
                        // the same node; both get the same contents.
                        let n = Arc::new(self.load(storage, node, level)?);
                        let mut cache = self.lock_cache();
                        if cache.len() >= self.max_cached {
                            Self::evict(&mut cache, self.max_cached / 2);
                        }
                        cache.insert(node, n.clone());
                        n
                    }
                }
            }
        };
        if n.level != level {
            return Err(Error::corrupt(format!(
                "map node at block {node} is at level {}, expected {level}",
                n.level
            )));
        }
        Ok(n)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Node>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries of a node written in this transaction.
    pub fn get_mut(&mut self, node: u64) -> Result<&mut Vec<u64>> {
        self.dirty
            .get_mut(&node)
            .map(|n| &mut Arc::make_mut(n).entries)
            .ok_or_else(|| Error::corrupt(format!("map node {node} vanished from the cache")))
    }

    pub fn insert_dirty(&mut self, node: u64, level: u8, entries: Vec<u64>) {
        self.cache
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
        self.dirty.insert(node, Arc::new(Node { level, entries }));
    }

    /// A node freed in this transaction: if it was never written, don't write it.
    pub fn forget(&mut self, node: u64) {
        self.dirty.remove(&node);
        self.cache
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&node);
    }

    fn evict(cache: &mut HashMap<u64, Arc<Node>>, keep: usize) {
        let mut keep = keep;
        cache.retain(|_, _| {
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

    /// Write every node changed in this transaction (not yet durable); they
    /// are clean from now on.
    pub fn write_dirty(&mut self, storage: &dyn Storage, generation: u64) -> Result<()> {
        let mut buf = vec![0u8; self.block_size];
        let mut dirty: Vec<(u64, Arc<Node>)> = self.dirty.drain().collect();
        dirty.sort_unstable_by_key(|(b, _)| *b);
        for (b, n) in &dirty {
            buf.fill(0);
            LE::write_u64_into(
                &n.entries,
                &mut buf[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + 8 * self.fanout],
            );
            encode_page(
                &mut buf,
                &PageHeader {
                    kind: PageType::MapNode,
                    location: *b,
                    generation,
                    level: n.level,
                },
            );
            storage.write_at(&buf, b * self.block_size as u64)?;
        }
        let cache = self.cache.get_mut().unwrap_or_else(|p| p.into_inner());
        if cache.len() + dirty.len() > self.max_cached {
            Self::evict(cache, self.max_cached / 2);
        }
        cache.extend(dirty);
        Ok(())
    }

    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}
