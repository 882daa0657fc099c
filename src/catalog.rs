//! The volume catalog: every volume's record, kept in memory and persisted as
//! a paged array of fixed-size records (see `format::record`).

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Result};
use crate::format::{
    PageType, VolumeRecord, CAT_INDEX_MAX, MAX_VOLUME_SIZE, NAME_MAX, RECORD_SIZE,
};
use crate::io::Storage;
use crate::pdata::PagedArray;

/// What a volume record is checked against at open.
pub struct RecordLimits {
    pub block_size: u32,
    pub fanout: usize,
    pub total_blocks: u64,
    /// First block after the superblock area.
    pub first_block: u64,
    pub next_volume_id: u64,
}

pub struct Catalog {
    slots: Vec<Option<VolumeRecord>>,
    by_name: HashMap<String, usize>,
    by_id: HashMap<u64, usize>,
    per_page: usize,
    dirty: BTreeSet<usize>,
    layout: PagedArray,
}

/// Names become file names in the export: keep them portable and unambiguous.
pub fn validate_name(name: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._-:@+".contains(c);
    if name.is_empty() || name.len() > NAME_MAX {
        return Err(Error::InvalidArgument(format!(
            "volume name must be 1 to {NAME_MAX} bytes long"
        )));
    }
    if !name.chars().all(ok_char) || name.starts_with('.') || name.starts_with('-') {
        return Err(Error::InvalidArgument(format!(
            "invalid volume name '{name}': use letters, digits and . _ - : @ + (not starting with . or -)"
        )));
    }
    Ok(())
}

impl Catalog {
    pub fn new(block_size: u32) -> Result<Catalog> {
        let layout = PagedArray::new(PageType::Catalog, block_size, 0, CAT_INDEX_MAX)?;
        Ok(Catalog::with_layout(layout, Vec::new()))
    }

    fn with_layout(layout: PagedArray, slots: Vec<Option<VolumeRecord>>) -> Catalog {
        let per_page = layout.payload_size() / RECORD_SIZE;
        let mut c = Catalog {
            slots,
            by_name: HashMap::new(),
            by_id: HashMap::new(),
            per_page,
            dirty: BTreeSet::new(),
            layout,
        };
        for (i, r) in c.slots.iter().enumerate() {
            if let Some(r) = r {
                c.by_name.insert(r.name.clone(), i);
                c.by_id.insert(r.id, i);
            }
        }
        c
    }

    pub fn load(
        block_size: u32,
        n_slots: u64,
        index: &[u64],
        storage: &dyn Storage,
        total_blocks: u64,
        generation: u64,
    ) -> Result<Catalog> {
        let per_page = (block_size as usize - crate::format::PAGE_HEADER_SIZE) / RECORD_SIZE;
        let n_slots = usize::try_from(n_slots).map_err(|_| Error::corrupt("catalog size"))?;
        let n_pages = n_slots.div_ceil(per_page);
        // Check the table's shape before reading it.
        PagedArray::check_shape(
            PageType::Catalog,
            block_size,
            n_pages,
            index.len(),
            CAT_INDEX_MAX,
        )?;
        // Every catalog page of a real pool has been written (a slot is only
        // added by writing a record into it), so slots grow only as pages are
        // read: memory follows what the file holds, not what its header claims.
        let mut slots: Vec<Option<VolumeRecord>> = Vec::new();
        let unwritten = |page: usize| {
            Error::corrupt(format!(
                "catalog page {page} of {n_pages} was never written"
            ))
        };
        let layout = PagedArray::new(PageType::Catalog, block_size, 0, CAT_INDEX_MAX)?.load(
            n_pages,
            index,
            storage,
            total_blocks,
            generation,
            |page, bytes| {
                if slots.len() != page * per_page {
                    return Err(unwritten(slots.len() / per_page));
                }
                for j in 0..per_page.min(n_slots - page * per_page) {
                    let slot = page * per_page + j;
                    let rec = VolumeRecord::decode(&bytes[j * RECORD_SIZE..][..RECORD_SIZE])
                        .map_err(|e| Error::corrupt(format!("catalog slot {slot}: {e}")))?;
                    slots.push(rec);
                }
                Ok(())
            },
        )?;
        if slots.len() != n_slots {
            return Err(unwritten(slots.len() / per_page));
        }
        let c = Catalog::with_layout(layout, slots);
        let live = c.slots.iter().flatten().count();
        if c.by_name.len() != live || c.by_id.len() != live {
            return Err(Error::corrupt("catalog has duplicate volume names or ids"));
        }
        Ok(c)
    }

    /// Every record must be one this build could have written: a forged
    /// record is refused before anything walks its map or follows its parent.
    pub fn validate(&self, g: &RecordLimits) -> Result<()> {
        for r in self.iter() {
            // The name comes from the file: escape it, it may hold anything.
            let bad =
                |what: String| Error::corrupt(format!("volume {:?}: {what}", r.name.as_str()));
            if validate_name(&r.name).is_err() {
                return Err(bad("a name this build would refuse".into()));
            }
            if r.size == 0 || r.size > MAX_VOLUME_SIZE {
                return Err(bad(format!("virtual size {} is not in 1..=2^63", r.size)));
            }
            let n_blocks = r.size.div_ceil(g.block_size as u64);
            let need = crate::map::depth_for(n_blocks, g.fanout);
            if r.depth != need {
                return Err(bad(format!(
                    "map depth {} (a volume of {n_blocks} blocks has depth {need})",
                    r.depth
                )));
            }
            if r.root != 0 && (r.root < g.first_block || r.root >= g.total_blocks) {
                return Err(bad(format!("map root {} is outside the pool", r.root)));
            }
            if r.mapped_blocks > n_blocks {
                return Err(bad(format!(
                    "records {} mapped blocks but has only {n_blocks}",
                    r.mapped_blocks
                )));
            }
            if r.id >= g.next_volume_id {
                return Err(bad(format!(
                    "id {} is not below the next volume id {}",
                    r.id, g.next_volume_id
                )));
            }
            // A parent is always created first, so its id is lower: this also
            // rules out cycles. A lower id that is gone was removed, which is fine.
            if r.parent_id != 0 && r.parent_id >= r.id {
                return Err(bad(format!(
                    "parent id {} is not older than the volume (id {})",
                    r.parent_id, r.id
                )));
            }
        }
        Ok(())
    }

    /// Where the catalog's pages live.
    pub fn layout(&self) -> &PagedArray {
        &self.layout
    }

    /// Give every dirty page a block the last commit does not use (see
    /// `PagedArray::shadow`); true if it allocated anything.
    pub fn shadow(
        &mut self,
        space: &mut crate::space::SpaceMap,
        storage: &dyn crate::io::Storage,
    ) -> Result<bool> {
        self.layout.shadow(&self.dirty, space, storage)
    }

    pub fn n_slots(&self) -> u64 {
        self.slots.len() as u64
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    pub fn dirty_pages(&self) -> &BTreeSet<usize> {
        &self.dirty
    }

    pub fn clear_dirty(&mut self) {
        self.dirty.clear();
    }

    pub fn id_of(&self, name: &str) -> Result<u64> {
        self.by_name
            .get(name)
            .and_then(|&s| self.slots[s].as_ref())
            .map(|r| r.id)
            .ok_or_else(|| Error::NoSuchVolume(name.to_string()))
    }

    pub fn get(&self, id: u64) -> Result<&VolumeRecord> {
        self.by_id
            .get(&id)
            .and_then(|&s| self.slots[s].as_ref())
            .ok_or_else(|| Error::NoSuchVolume(format!("#{id}")))
    }

    pub fn get_by_name(&self, name: &str) -> Result<&VolumeRecord> {
        self.get(self.id_of(name)?)
    }

    /// The record, marked for writing at the next commit.
    pub fn get_mut(&mut self, id: u64) -> Result<&mut VolumeRecord> {
        let slot = *self
            .by_id
            .get(&id)
            .ok_or_else(|| Error::NoSuchVolume(format!("#{id}")))?;
        self.dirty.insert(slot / self.per_page);
        Ok(self.slots[slot]
            .as_mut()
            .expect("indexed slot holds a record"))
    }

    /// Volumes in id (creation) order.
    pub fn iter(&self) -> impl Iterator<Item = &VolumeRecord> {
        let mut ids: Vec<_> = self.by_id.iter().map(|(id, s)| (*id, *s)).collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(move |(_, s)| self.slots[s].as_ref())
    }

    pub fn insert(&mut self, rec: VolumeRecord) -> Result<()> {
        validate_name(&rec.name)?;
        if self.by_name.contains_key(&rec.name) {
            return Err(Error::VolumeExists(rec.name));
        }
        let slot = match self.slots.iter().position(|s| s.is_none()) {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.layout
                    .resize(self.slots.len().div_ceil(self.per_page))?;
                self.slots.len() - 1
            }
        };
        self.by_name.insert(rec.name.clone(), slot);
        self.by_id.insert(rec.id, slot);
        self.slots[slot] = Some(rec);
        self.dirty.insert(slot / self.per_page);
        Ok(())
    }

    pub fn remove(&mut self, id: u64) -> Result<VolumeRecord> {
        let slot = self
            .by_id
            .remove(&id)
            .ok_or_else(|| Error::NoSuchVolume(format!("#{id}")))?;
        let rec = self.slots[slot]
            .take()
            .expect("indexed slot holds a record");
        self.by_name.remove(&rec.name);
        self.dirty.insert(slot / self.per_page);
        Ok(rec)
    }

    pub fn rename(&mut self, old: &str, new: &str) -> Result<()> {
        validate_name(new)?;
        if self.by_name.contains_key(new) {
            return Err(Error::VolumeExists(new.to_string()));
        }
        let id = self.id_of(old)?;
        let slot = self.by_name.remove(old).expect("name was found");
        self.by_name.insert(new.to_string(), slot);
        self.get_mut(id)?.name = new.to_string();
        Ok(())
    }

    /// Write the dirty catalog pages to the locations `layout.shadow` gave them.
    pub fn write_dirty(&mut self, storage: &dyn Storage, generation: u64) -> Result<()> {
        let Catalog {
            slots,
            per_page,
            dirty,
            layout,
            ..
        } = self;
        let per_page = *per_page;
        layout.write(dirty, storage, generation, |page, payload| {
            for j in 0..per_page {
                if let Some(Some(r)) = slots.get(page * per_page + j) {
                    r.encode(&mut payload[j * RECORD_SIZE..][..RECORD_SIZE]);
                }
            }
        })
    }
}
