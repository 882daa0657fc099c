//! Where a persistent array's pages live: a two-level table (superblock ->
//! index pages -> data pages), all shadowed on change. Used for the refcounts
//! and the volume catalog. The array's contents are kept in memory by its
//! owner; this type only knows page locations and writes what it is handed.

use std::collections::{BTreeSet, HashSet};

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{alloc_block, read_page};
use crate::error::{Error, Result};
use crate::format::{encode_page, PageHeader, PageType, PAGE_HEADER_SIZE};
use crate::io::Storage;
use crate::space::{Budget, Kind, SpaceMap};

pub struct PagedArray {
    kind: PageType,
    block_size: usize,
    per_index: usize,
    max_index: usize,
    /// Location of each data page (0 = not written yet: all zero).
    pages: Vec<u64>,
    /// Location of each index page.
    index: Vec<u64>,
    dirty_index: BTreeSet<usize>,
}

impl PagedArray {
    pub fn new(
        kind: PageType,
        block_size: u32,
        n_pages: usize,
        max_index: usize,
    ) -> Result<PagedArray> {
        let mut a = PagedArray {
            kind,
            block_size: block_size as usize,
            per_index: crate::format::pointers_per_page(block_size),
            max_index,
            pages: Vec::new(),
            index: Vec::new(),
            dirty_index: BTreeSet::new(),
        };
        a.resize(n_pages)?;
        Ok(a)
    }

    pub fn payload_size(&self) -> usize {
        self.block_size - PAGE_HEADER_SIZE
    }

    pub fn n_pages(&self) -> usize {
        self.pages.len()
    }

    /// Largest number of data pages this array can address.
    pub fn capacity(&self) -> usize {
        self.per_index * self.max_index
    }

    pub fn index_pointers(&self) -> &[u64] {
        &self.index
    }

    pub fn page_locations(&self) -> &[u64] {
        &self.pages
    }

    /// Pages the commit may have to shadow at most (for the space reserve).
    pub fn worst_case_pages(&self) -> u64 {
        (self.pages.len() + self.index.len()) as u64
    }

    pub fn resize(&mut self, n_pages: usize) -> Result<()> {
        if n_pages > self.capacity() {
            return Err(Error::InvalidArgument(format!(
                "too large: the {} table would need {n_pages} pages, at most {} fit",
                self.kind.name(),
                self.capacity()
            )));
        }
        self.pages.resize(n_pages, 0);
        let n_index = n_pages.div_ceil(self.per_index);
        while self.index.len() < n_index {
            self.dirty_index.insert(self.index.len());
            self.index.push(0);
        }
        Ok(())
    }

    /// A table of `n_pages` data pages must have exactly the index pages that
    /// address them, within `max_index`. Callers check this before they
    /// allocate memory for what the table holds.
    pub fn check_shape(
        kind: PageType,
        block_size: u32,
        n_pages: usize,
        n_index: usize,
        max_index: usize,
    ) -> Result<()> {
        let per_index = crate::format::pointers_per_page(block_size);
        if n_pages > per_index * max_index || n_index != n_pages.div_ceil(per_index) {
            return Err(Error::corrupt(format!(
                "{} table: {n_index} index pages for {n_pages} pages",
                kind.name()
            )));
        }
        Ok(())
    }

    /// Read the table of an empty array made by `new` and hand each data
    /// page's payload to `load(page, bytes)`.
    pub fn load(
        mut self,
        n_pages: usize,
        index_ptrs: &[u64],
        storage: &dyn Storage,
        total_blocks: u64,
        generation: u64,
        mut load: impl FnMut(usize, &[u8]) -> Result<()>,
    ) -> Result<PagedArray> {
        let a = &mut self;
        let kind = a.kind;
        PagedArray::check_shape(
            kind,
            a.block_size as u32,
            n_pages,
            index_ptrs.len(),
            a.max_index,
        )?;
        let mut buf = vec![0u8; a.block_size];
        for (i, &ip) in index_ptrs.iter().enumerate() {
            read_page(
                storage,
                &mut buf,
                ip,
                PageType::Index,
                total_blocks,
                generation,
            )?;
            let first = i * a.per_index;
            let n = a.per_index.min(n_pages - first);
            for j in 0..n {
                let p = LE::read_u64(&buf[PAGE_HEADER_SIZE + 8 * j..][..8]);
                if p >= total_blocks {
                    return Err(Error::corrupt(format!(
                        "{} table: page {} points past the end (block {p})",
                        kind.name(),
                        first + j
                    )));
                }
                a.pages.push(p);
            }
        }
        a.index = index_ptrs.to_vec();
        // A real table never uses one block twice; a forged one could make
        // the owner allocate for the same page over and over.
        let mut seen = HashSet::new();
        for &p in a.index.iter().chain(&a.pages).filter(|&&p| p != 0) {
            if !seen.insert(p) {
                return Err(Error::corrupt(format!(
                    "{} table: block {p} is used by two of its pages",
                    kind.name()
                )));
            }
        }
        for (i, &p) in a.pages.iter().enumerate() {
            if p == 0 {
                continue;
            }
            read_page(storage, &mut buf, p, kind, total_blocks, generation)?;
            load(i, &buf[PAGE_HEADER_SIZE..])?;
        }
        Ok(self)
    }

    /// Give every dirty page (and the index pages above it) a location that
    /// the last commit does not use. Returns true if it allocated anything;
    /// allocating dirties refcount pages, so the caller repeats until false.
    pub fn shadow(
        &mut self,
        dirty: &BTreeSet<usize>,
        space: &mut SpaceMap,
        storage: &dyn Storage,
    ) -> Result<bool> {
        let bs = self.block_size as u64;
        let mut changed = false;
        for &p in dirty {
            if relocate(&mut self.pages[p], space, storage, bs)? {
                self.dirty_index.insert(p / self.per_index);
                changed = true;
            }
        }
        for &i in &self.dirty_index {
            changed |= relocate(&mut self.index[i], space, storage, bs)?;
        }
        Ok(changed)
    }

    /// Write the dirty pages (contents from `fill(page, payload)`) and index pages.
    pub fn write(
        &mut self,
        dirty: &BTreeSet<usize>,
        storage: &dyn Storage,
        generation: u64,
        mut fill: impl FnMut(usize, &mut [u8]),
    ) -> Result<()> {
        let mut buf = vec![0u8; self.block_size];
        for &p in dirty {
            buf.fill(0);
            fill(p, &mut buf[PAGE_HEADER_SIZE..]);
            self.put(storage, &mut buf, self.pages[p], self.kind, generation)?;
        }
        for &i in &self.dirty_index {
            buf.fill(0);
            let first = i * self.per_index;
            let last = (first + self.per_index).min(self.pages.len());
            for (j, p) in self.pages[first..last].iter().enumerate() {
                LE::write_u64(&mut buf[PAGE_HEADER_SIZE + 8 * j..][..8], *p);
            }
            self.put(
                storage,
                &mut buf,
                self.index[i],
                PageType::Index,
                generation,
            )?;
        }
        self.dirty_index.clear();
        Ok(())
    }

    fn put(
        &self,
        storage: &dyn Storage,
        buf: &mut [u8],
        loc: u64,
        kind: PageType,
        generation: u64,
    ) -> Result<()> {
        debug_assert!(loc != 0);
        encode_page(
            buf,
            &PageHeader {
                kind,
                location: loc,
                generation,
                level: 0,
            },
        );
        storage.write_at(buf, loc * self.block_size as u64)?;
        Ok(())
    }
}

/// Move a page the last commit may use to a fresh block (true if moved).
fn relocate(
    loc: &mut u64,
    space: &mut SpaceMap,
    storage: &dyn Storage,
    block_size: u64,
) -> Result<bool> {
    if *loc != 0 && space.is_txn_new(*loc) {
        return Ok(false);
    }
    let new = alloc_block(space, storage, block_size, Kind::Meta, Budget::Commit)?;
    if *loc != 0 {
        space.dec(*loc, Kind::Meta)?;
    }
    *loc = new;
    Ok(true)
}
