//! Annotations: opaque bytes a higher layer attaches to a volume (the
//! containerd snapshotter keeps each snapshot's record here). They live in
//! the pool and are committed by the same superblock as the catalog, so a
//! volume and what is said about it can never disagree after a crash.
//!
//! Kept whole in memory and stored as one byte stream in a paged array (see
//! `space::PagedArray`): per annotated volume, in id order,
//! `id u64 | length u32 | bytes`. A change re-encodes the stream; only pages
//! whose bytes differ are written. The table never shrinks (like the catalog),
//! so pages past the stream's end hold zeros.

use std::collections::{BTreeMap, BTreeSet};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, Result};
use crate::format::{PageType, ANNOT_INDEX_MAX, PAGE_HEADER_SIZE};
use crate::io::Storage;
use crate::pdata::PagedArray;

/// Largest annotation of one volume.
pub const ANNOTATION_MAX: usize = 1 << 20;
/// Largest stream (all annotations): what a superblock may claim is bounded
/// before memory is allocated for it.
pub const STREAM_MAX: u64 = 256 << 20;
const ENTRY_HEADER: usize = 12;

pub struct Annotations {
    by_id: BTreeMap<u64, Vec<u8>>,
    /// The encoded stream, as the next commit will write it.
    stream: Vec<u8>,
    payload: usize,
    dirty: BTreeSet<usize>,
    layout: PagedArray,
}

impl Annotations {
    pub fn new(block_size: u32) -> Result<Annotations> {
        Ok(Annotations {
            by_id: BTreeMap::new(),
            stream: Vec::new(),
            payload: block_size as usize - PAGE_HEADER_SIZE,
            dirty: BTreeSet::new(),
            layout: PagedArray::new(PageType::Annotations, block_size, 0, ANNOT_INDEX_MAX)?,
        })
    }

    /// Read the table a superblock points to. Volume ids are checked by the caller.
    pub fn load(
        block_size: u32,
        len: u64,
        n_pages: u32,
        index: &[u64],
        storage: &dyn Storage,
        total_blocks: u64,
        generation: u64,
    ) -> Result<Annotations> {
        let mut a = Annotations::new(block_size)?;
        let n_pages = n_pages as usize;
        PagedArray::check_shape(
            PageType::Annotations,
            block_size,
            n_pages,
            index.len(),
            ANNOT_INDEX_MAX,
        )?;
        let cap = (n_pages as u64).saturating_mul(a.payload as u64);
        if len > cap || len > STREAM_MAX {
            return Err(Error::corrupt(format!(
                "annotation stream of {len} bytes in {n_pages} pages"
            )));
        }
        let mut bytes = crate::space::try_vec(len as usize, 0u8, "annotation table")?;
        let payload = a.payload;
        let layout = PagedArray::new(PageType::Annotations, block_size, 0, ANNOT_INDEX_MAX)?.load(
            n_pages,
            index,
            storage,
            total_blocks,
            generation,
            |page, data| {
                // Pages past the stream's end hold zeros: only the stream is kept.
                let (lo, hi) = page_range(bytes.len(), page, payload);
                bytes[lo..hi].copy_from_slice(&data[..hi - lo]);
                Ok(())
            },
        )?;
        a.by_id = decode(&bytes).map_err(Error::corrupt)?;
        a.stream = bytes;
        a.layout = layout;
        Ok(a)
    }

    /// Where the table's pages live.
    pub fn layout(&self) -> &PagedArray {
        &self.layout
    }

    /// Give every dirty page a block the last commit does not use (see
    /// `PagedArray::shadow`); true if it allocated anything.
    pub fn shadow(
        &mut self,
        space: &mut crate::space::SpaceMap,
        storage: &dyn Storage,
    ) -> Result<bool> {
        self.layout.shadow(&self.dirty, space, storage)
    }

    pub fn get(&self, id: u64) -> Option<&[u8]> {
        self.by_id.get(&id).map(Vec::as_slice)
    }

    /// Ids of the annotated volumes, in order.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_id.keys().copied()
    }

    /// Set (or with `None` drop) a volume's annotation; written at the next commit.
    pub fn set(&mut self, id: u64, bytes: Option<Vec<u8>>) -> Result<()> {
        if let Some(b) = &bytes {
            if b.len() > ANNOTATION_MAX {
                return Err(Error::InvalidArgument(format!(
                    "annotation of {} bytes is larger than {ANNOTATION_MAX}",
                    b.len()
                )));
            }
        }
        let old = match bytes {
            Some(b) => self.by_id.insert(id, b),
            None => self.by_id.remove(&id),
        };
        let new_stream = encode(&self.by_id);
        let pages = new_stream.len().div_ceil(self.payload);
        let grown = if new_stream.len() as u64 > STREAM_MAX {
            Err(Error::InvalidArgument(format!(
                "annotations would take {} bytes, more than {STREAM_MAX}",
                new_stream.len()
            )))
        } else if pages > self.layout.n_pages() {
            self.layout.resize(pages)
        } else {
            Ok(())
        };
        if let Err(e) = grown {
            // Too large for the table: undo.
            match old {
                Some(o) => self.by_id.insert(id, o),
                None => self.by_id.remove(&id),
            };
            return Err(e);
        }
        let p = self.payload;
        let end = new_stream.len().max(self.stream.len());
        for page in 0..end.div_ceil(p) {
            let (lo, hi) = page_range(self.stream.len(), page, p);
            let a = &self.stream[lo..hi];
            let (lo, hi) = page_range(new_stream.len(), page, p);
            let b = &new_stream[lo..hi];
            // Compare as zero-padded pages: trailing zeros are what is on disk.
            let n = a.len().min(b.len());
            if a[..n] != b[..n] || a[n..].iter().chain(&b[n..]).any(|&x| x != 0) {
                self.dirty.insert(page);
            }
        }
        self.stream = new_stream;
        Ok(())
    }

    pub fn stream_len(&self) -> u64 {
        self.stream.len() as u64
    }

    pub fn dirty_pages(&self) -> &BTreeSet<usize> {
        &self.dirty
    }

    pub fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    /// Write the dirty pages to the locations `layout.shadow` gave them.
    pub fn write_dirty(&mut self, storage: &dyn Storage, generation: u64) -> Result<()> {
        let Annotations {
            stream,
            payload,
            dirty,
            layout,
            ..
        } = self;
        let p = *payload;
        layout.write(dirty, storage, generation, |page, buf| {
            let (lo, hi) = page_range(stream.len(), page, p);
            buf[..hi - lo].copy_from_slice(&stream[lo..hi]);
        })
    }
}

/// The bytes of a stream of `len` bytes that page `page` holds, `payload` a page.
fn page_range(len: usize, page: usize, payload: usize) -> (usize, usize) {
    ((page * payload).min(len), ((page + 1) * payload).min(len))
}

fn encode(by_id: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    for (id, b) in by_id {
        let mut h = [0u8; ENTRY_HEADER];
        LE::write_u64(&mut h[..8], *id);
        LE::write_u32(&mut h[8..], b.len() as u32);
        out.extend_from_slice(&h);
        out.extend_from_slice(b);
    }
    out
}

fn decode(mut b: &[u8]) -> std::result::Result<BTreeMap<u64, Vec<u8>>, String> {
    let mut m = BTreeMap::new();
    let mut last = 0u64;
    while !b.is_empty() {
        if b.len() < ENTRY_HEADER {
            return Err("annotation stream ends inside an entry header".into());
        }
        let id = LE::read_u64(&b[..8]);
        let len = LE::read_u32(&b[8..12]) as usize;
        if id == 0 || id <= last {
            return Err(format!("annotation for volume {id} out of order"));
        }
        if len > ANNOTATION_MAX || len > b.len() - ENTRY_HEADER {
            return Err(format!("annotation of volume {id}: bad length {len}"));
        }
        m.insert(id, b[ENTRY_HEADER..ENTRY_HEADER + len].to_vec());
        b = &b[ENTRY_HEADER + len..];
        last = id;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_roundtrip_and_damage() {
        let mut m = BTreeMap::new();
        m.insert(3, b"abc".to_vec());
        m.insert(9, vec![]);
        let s = encode(&m);
        assert_eq!(decode(&s).unwrap(), m);
        assert!(decode(&s[..s.len() - 1]).is_err());
        let mut bad = s.clone();
        LE::write_u32(&mut bad[8..12], 1 << 30);
        assert!(decode(&bad).is_err());
    }

    #[test]
    fn only_changed_pages_are_dirty() {
        let mut a = Annotations::new(4096).unwrap();
        a.set(1, Some(vec![1; 5000])).unwrap();
        assert_eq!(a.dirty_pages().len(), 2);
        a.clear_dirty();
        a.set(2, Some(vec![2; 10])).unwrap();
        assert_eq!(a.dirty_pages().iter().copied().collect::<Vec<_>>(), [1]);
        a.clear_dirty();
        a.set(1, None).unwrap();
        assert_eq!(a.layout.n_pages(), 2, "the table does not shrink");
        assert!(a.dirty_pages().contains(&0) && a.dirty_pages().contains(&1));
        assert_eq!(a.get(2), Some(&[2u8; 10][..]));
    }
}
