//! A forger of hostile pools, for tests and fuzzing (not part of the API).
//!
//! Flipping random bytes of a pool file almost always stops at a page
//! checksum, so the checks behind it are never reached. The forger decodes a
//! real pool image into its structures (superblock, volume records, map
//! nodes, refcounts, index pages), lets the caller change fields, and
//! re-seals every page it touched with a valid checksum: the result is a
//! pool whose metadata is checksum-valid but lies.
//!
//! [`variants`] makes named hostile pools, one per kind of lie (every one is
//! inconsistent, so `check` must not call it clean); [`mutate`] applies a
//! list of field changes driven by fuzzer bytes; [`exercise`] runs every
//! verb on an image. [`stream`] builds send streams with valid checksums
//! from fuzzer-chosen records, for the `receive` parser.

use std::path::Path;

use byteorder::{ByteOrder, LittleEndian as LE};
use sha2::{Digest as _, Sha256};

use crate::format::{
    encode_page, pointers_per_page, PageHeader, PageType, Superblock, VolumeRecord,
    PAGE_HEADER_SIZE, RECORD_SIZE, SUPERBLOCK_SLOT_SIZE,
};
use crate::io::MemStorage;
use crate::{CreateOptions, Pool};

/// A small real pool (4 KiB blocks): two committed layers (`layer1`,
/// `layer2`), a clone of the second (`container`), a volume with a
/// two-level map (`big`) and a snapshot of it (`snap`) — every kind of
/// record and shared subtree. Built once per process.
pub fn sample_pool() -> &'static [u8] {
    static IMG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMG.get_or_init(|| build_sample().expect("the sample pool builds"))
}

fn build_sample() -> crate::Result<Vec<u8>> {
    const BS: u64 = 4096;
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: 8 << 20,
        block_size: BS as u32,
    };
    let mut p = Pool::create_with(Box::new(m.clone()), Path::new("mem"), &opts)?;
    let a = p.create_volume("base", 64 * BS)?;
    p.write(a, 0, &vec![0x11; 10 * BS as usize])?;
    crate::layer::commit(&mut p, "base", Some("layer1"))?;
    let c = p.snapshot("layer1", "app", true)?;
    p.write(c, 3 * BS + 5, b"changed")?;
    p.write(c, 20 * BS, &vec![0x33; BS as usize])?;
    crate::layer::commit(&mut p, "app", Some("layer2"))?;
    p.snapshot("layer2", "container", true)?;
    let big = p.create_volume("big", 2000 * BS)?;
    p.write(big, 1500 * BS, &vec![0x22; 3 * BS as usize])?;
    p.write(big, 7, b"head")?;
    p.snapshot("big", "snap", false)?;
    p.write(big, 9 * BS, b"after the snapshot")?;
    p.close()?;
    Ok(m.snapshot())
}

/// Every verb of the library on a pool image (of the sample pool's shape):
/// open, check, info, image list, diff, send, list, read, mapped blocks,
/// write, snapshot, remove, commit. Errors are expected on hostile images;
/// a panic, an abort or a hang is a bug.
pub fn exercise(img: Vec<u8>) {
    let m = MemStorage::from_bytes(img);
    let Ok(mut p) = Pool::open_with(Box::new(m), Path::new("mem")) else {
        return;
    };
    let _ = p.check();
    let _ = p.info();
    let _ = crate::layer::image::list_images(&mut p);
    let _ = crate::layer::diff_volumes(&mut p, "layer1", "layer2");
    let _ = crate::layer::diff_volumes(&mut p, "snap", "big");
    let mut sink = std::io::sink();
    let _ = crate::layer::stream::send(&mut p, "layer2", Some("layer1"), &mut sink, &mut |_| {});
    let _ = crate::layer::stream::send(&mut p, "big", None, &mut sink, &mut |_| {});
    if let Ok(vols) = p.list() {
        for v in vols {
            let mut buf = vec![0u8; v.virtual_size.min(64 << 10) as usize];
            let _ = p.read(v.id, 0, &mut buf);
            let _ = p.mapped_blocks(v.id);
            if !v.read_only {
                let _ = p.write(v.id, 0, &vec![1; buf.len().min(5000)]);
            }
        }
    }
    let _ = p.snapshot("big", "s2", true);
    let _ = p.remove_volume("container");
    let _ = p.commit();
    let _ = p.check();
}

const TYPES: [PageType; 4] = [
    PageType::MapNode,
    PageType::Index,
    PageType::Refcount,
    PageType::Catalog,
];

/// A decoded pool image being forged.
#[derive(Clone)]
pub struct Forge {
    img: Vec<u8>,
    bs: usize,
    /// The newest superblock; `finish` writes it into both slots, so the
    /// forged pool has no older commit to fall back to.
    pub sb: Superblock,
}

impl Forge {
    /// Decode an image (None if it has no valid superblock).
    pub fn new(img: Vec<u8>) -> Option<Forge> {
        let sb = (0..2)
            .filter_map(|s| {
                let at = s * SUPERBLOCK_SLOT_SIZE;
                Superblock::decode(img.get(at..at + SUPERBLOCK_SLOT_SIZE)?).ok()
            })
            .max_by_key(|sb| sb.generation)?;
        Some(Forge {
            bs: sb.block_size as usize,
            img,
            sb,
        })
    }

    /// The forged image.
    pub fn finish(mut self) -> Vec<u8> {
        let sb = self.sb.encode();
        for s in 0..2 {
            self.img[s * SUPERBLOCK_SLOT_SIZE..][..SUPERBLOCK_SLOT_SIZE].copy_from_slice(&sb);
        }
        self.img
    }

    pub fn block_size(&self) -> u64 {
        self.bs as u64
    }

    fn page(&self, b: u64) -> Option<&[u8]> {
        let at = usize::try_from(b).ok()?.checked_mul(self.bs)?;
        self.img.get(at..at.checked_add(self.bs)?)
    }

    fn page_mut(&mut self, b: u64) -> Option<&mut [u8]> {
        let at = usize::try_from(b).ok()?.checked_mul(self.bs)?;
        let end = at.checked_add(self.bs)?;
        self.img.get_mut(at..end)
    }

    /// The type of the page at `b`, going by its magic.
    pub fn page_kind(&self, b: u64) -> Option<PageType> {
        let p = self.page(b)?;
        let magic = LE::read_u32(&p[0..4]);
        TYPES.into_iter().find(|t| t.magic() == magic)
    }

    /// Every block holding a page of `kind` (by magic), ascending.
    pub fn pages(&self, kind: PageType) -> Vec<u64> {
        (0..(self.img.len() / self.bs) as u64)
            .filter(|&b| b > 0 && self.page_kind(b) == Some(kind))
            .collect()
    }

    /// Recompute the checksum of the page at `b` (its header kept).
    fn reseal(&mut self, b: u64) {
        let Some(kind) = self.page_kind(b) else {
            return;
        };
        let p = self.page_mut(b).expect("page exists");
        let h = PageHeader {
            kind,
            location: LE::read_u64(&p[8..16]),
            generation: LE::read_u64(&p[16..24]),
            level: p[24],
        };
        encode_page(p, &h);
    }

    /// Change the payload of the page at `b` and re-seal it.
    pub fn edit_page(&mut self, b: u64, f: impl FnOnce(&mut [u8])) -> bool {
        let Some(p) = self.page_mut(b) else {
            return false;
        };
        f(&mut p[PAGE_HEADER_SIZE..]);
        self.reseal(b);
        true
    }

    /// Change a header field of the page at `b`: its level and generation.
    pub fn set_header(&mut self, b: u64, level: u8, generation: u64) -> bool {
        let Some(p) = self.page_mut(b) else {
            return false;
        };
        p[24] = level;
        LE::write_u64(&mut p[16..24], generation);
        self.reseal(b);
        true
    }

    //--------------------------------------------------------------------------
    // Map nodes

    /// (level, entries) of the map node at `b`.
    pub fn node(&self, b: u64) -> Option<(u8, Vec<u64>)> {
        let p = self.page(b)?;
        let n = pointers_per_page(self.bs as u32);
        let mut e = vec![0u64; n];
        LE::read_u64_into(&p[PAGE_HEADER_SIZE..PAGE_HEADER_SIZE + 8 * n], &mut e);
        Some((p[24], e))
    }

    pub fn set_entry(&mut self, node: u64, slot: usize, value: u64) -> bool {
        self.edit_page(node, |p| LE::write_u64(&mut p[8 * slot..][..8], value))
    }

    /// Write a new map node past the end of the image; returns its block.
    pub fn add_node(&mut self, level: u8, entries: &[(usize, u64)]) -> u64 {
        let b = self.img.len().div_ceil(self.bs) as u64;
        self.img.resize((b as usize + 1) * self.bs, 0);
        let generation = self.sb.generation;
        let p = self.page_mut(b).expect("just added");
        for &(slot, v) in entries {
            LE::write_u64(&mut p[PAGE_HEADER_SIZE + 8 * slot..][..8], v);
        }
        encode_page(
            p,
            &PageHeader {
                kind: PageType::MapNode,
                location: b,
                generation,
                level,
            },
        );
        b
    }

    //--------------------------------------------------------------------------
    // Tables: refcounts and the catalog

    /// Data page locations of a table, from its index pages.
    fn table(&self, index: &[u64]) -> Vec<u64> {
        let per = pointers_per_page(self.bs as u32);
        let mut out = Vec::new();
        for &ip in index {
            if let Some(p) = self.page(ip) {
                for j in 0..per {
                    out.push(LE::read_u64(&p[PAGE_HEADER_SIZE + 8 * j..][..8]));
                }
            }
        }
        out
    }

    fn per_rc(&self) -> usize {
        (self.bs - PAGE_HEADER_SIZE) / 4
    }

    pub fn refcount(&self, b: u64) -> Option<u32> {
        let per = self.per_rc();
        let page = *self.table(&self.sb.rc_index).get(b as usize / per)?;
        let at = PAGE_HEADER_SIZE + 4 * (b as usize % per);
        (page != 0).then(|| LE::read_u32(&self.page(page).expect("rc page")[at..at + 4]))
    }

    pub fn set_refcount(&mut self, b: u64, v: u32) -> bool {
        let per = self.per_rc();
        let Some(&page) = self.table(&self.sb.rc_index).get(b as usize / per) else {
            return false;
        };
        let at = 4 * (b as usize % per);
        page != 0 && self.edit_page(page, |p| LE::write_u32(&mut p[at..at + 4], v))
    }

    fn per_cat(&self) -> usize {
        (self.bs - PAGE_HEADER_SIZE) / RECORD_SIZE
    }

    /// The live volume records with their catalog slots.
    pub fn records(&self) -> Vec<(usize, VolumeRecord)> {
        let per = self.per_cat();
        let pages = self.table(&self.sb.cat_index);
        (0..self.sb.catalog_slots as usize)
            .filter_map(|slot| {
                let page = self.page(*pages.get(slot / per)?)?;
                let raw = &page[PAGE_HEADER_SIZE + RECORD_SIZE * (slot % per)..][..RECORD_SIZE];
                Some((slot, VolumeRecord::decode(raw).ok()??))
            })
            .collect()
    }

    /// Change the raw bytes of the record in `slot`.
    pub fn edit_record(&mut self, slot: usize, f: impl FnOnce(&mut [u8])) -> bool {
        let per = self.per_cat();
        let Some(&page) = self.table(&self.sb.cat_index).get(slot / per) else {
            return false;
        };
        let at = RECORD_SIZE * (slot % per);
        self.edit_page(page, |p| f(&mut p[at..at + RECORD_SIZE]))
    }

    pub fn set_record(&mut self, slot: usize, r: &VolumeRecord) -> bool {
        self.edit_record(slot, |b| r.encode(b))
    }

    /// Data page locations of the refcount and catalog tables.
    pub fn table_pages(&self) -> (Vec<u64>, Vec<u64>) {
        (
            self.table(&self.sb.rc_index),
            self.table(&self.sb.cat_index),
        )
    }
}

//------------------------------------------------------------------------------
// Named hostile variants

/// One forged pool and what it lies about.
pub struct Variant {
    pub name: String,
    pub image: Vec<u8>,
}

/// Hostile variants of `base`, across every class of lie: superblock counts
/// and pointers, volume records (sizes, depths, roots, parents, ids, names,
/// counts), map nodes (levels, generations, pointers, sharing that
/// multiplies paths, entries past the end, deep forged maps), refcounts and
/// table indexes. Every one is inconsistent.
pub fn variants(base: &[u8]) -> Vec<Variant> {
    let f0 = Forge::new(base.to_vec()).expect("base image is a pool");
    let mut out = Vec::new();
    let mut add = |name: String, f: Forge| {
        // A change that found nothing to change would be no lie at all.
        if f.img != f0.img || f.sb != f0.sb {
            out.push(Variant {
                name,
                image: f.finish(),
            })
        }
    };
    let sb = f0.sb.clone();
    let bs = f0.block_size();
    let total = sb.total_blocks;
    let fanout = pointers_per_page(bs as u32);
    let recs = f0.records();
    let nodes = f0.pages(PageType::MapNode);
    let (rc_pages, cat_pages) = f0.table_pages();
    let rc_pages: Vec<u64> = rc_pages.into_iter().filter(|&p| p != 0).collect();
    let cat_pages: Vec<u64> = cat_pages.into_iter().filter(|&p| p != 0).collect();
    let data_block = recs
        .iter()
        .find_map(|(_, r)| {
            let (lvl, e) = f0.node(r.root)?;
            (lvl == 0)
                .then(|| e.into_iter().find(|&x| x != 0))
                .flatten()
        })
        .unwrap_or(total - 1);

    let highest_node = nodes.iter().copied().max().unwrap_or(3);
    let free_block = (3..total)
        .find(|&b| f0.refcount(b) == Some(0))
        .unwrap_or(total - 1);

    // Superblock: counts, sizes and pointers.
    let sb_lies: Vec<(&str, Superblock)> = vec![
        (
            "sb total_blocks u64::MAX/bs",
            Superblock {
                total_blocks: u64::MAX / bs,
                ..sb.clone()
            },
        ),
        (
            "sb total_blocks 2^40",
            Superblock {
                total_blocks: 1 << 40,
                ..sb.clone()
            },
        ),
        (
            "sb total_blocks 2^34",
            Superblock {
                total_blocks: 1 << 34,
                ..sb.clone()
            },
        ),
        (
            "sb total_blocks below a map node",
            Superblock {
                total_blocks: highest_node,
                ..sb.clone()
            },
        ),
        (
            "sb total_blocks minimum",
            Superblock {
                total_blocks: 3,
                ..sb.clone()
            },
        ),
        (
            "sb catalog_slots u64::MAX",
            Superblock {
                catalog_slots: u64::MAX,
                ..sb.clone()
            },
        ),
        (
            "sb catalog_slots 2^32",
            Superblock {
                catalog_slots: 1 << 32,
                ..sb.clone()
            },
        ),
        (
            "sb catalog_slots +1000 pages",
            Superblock {
                catalog_slots: sb.catalog_slots + 1000 * (bs / 512),
                ..sb.clone()
            },
        ),
        (
            "sb catalog_slots 0",
            Superblock {
                catalog_slots: 0,
                ..sb.clone()
            },
        ),
        (
            "sb metadata_blocks u64::MAX",
            Superblock {
                metadata_blocks: u64::MAX,
                ..sb.clone()
            },
        ),
        (
            "sb metadata_blocks +1",
            Superblock {
                metadata_blocks: sb.metadata_blocks + 1,
                ..sb.clone()
            },
        ),
        (
            "sb metadata_blocks 0",
            Superblock {
                metadata_blocks: 0,
                ..sb.clone()
            },
        ),
        (
            "sb next_volume_id 0",
            Superblock {
                next_volume_id: 0,
                ..sb.clone()
            },
        ),
        (
            "sb next_volume_id 2",
            Superblock {
                next_volume_id: 2,
                ..sb.clone()
            },
        ),
        (
            "sb rc_index empty",
            Superblock {
                rc_index: vec![],
                ..sb.clone()
            },
        ),
        (
            "sb rc_index 256 copies",
            Superblock {
                rc_index: vec![sb.rc_index[0]; 256],
                ..sb.clone()
            },
        ),
        (
            "sb cat_index 64 copies",
            Superblock {
                cat_index: vec![sb.cat_index[0]; 64],
                catalog_slots: 64 * fanout as u64 * (bs / 512),
                ..sb.clone()
            },
        ),
        (
            "sb cat_index = rc index",
            Superblock {
                cat_index: sb.rc_index.clone(),
                ..sb.clone()
            },
        ),
        (
            "sb rc_index = cat index",
            Superblock {
                rc_index: sb.cat_index.clone(),
                ..sb.clone()
            },
        ),
        (
            "sb rc_index -> map node",
            Superblock {
                rc_index: vec![nodes[0]],
                ..sb.clone()
            },
        ),
        (
            "sb annot_len without pages",
            Superblock {
                annot_len: 100,
                annot_pages: 0,
                annot_index: vec![],
                ..sb.clone()
            },
        ),
        (
            "sb annot_len u64::MAX",
            Superblock {
                annot_len: u64::MAX,
                annot_pages: 1,
                annot_index: sb.cat_index.clone(),
                ..sb.clone()
            },
        ),
        (
            "sb annot_pages 2^31",
            Superblock {
                annot_pages: 1 << 31,
                annot_index: vec![],
                ..sb.clone()
            },
        ),
        (
            "sb annot_index 64 copies",
            Superblock {
                annot_len: 16,
                annot_pages: 1,
                annot_index: vec![sb.cat_index[0]; 64],
                ..sb.clone()
            },
        ),
        (
            "sb annot_index = cat index",
            Superblock {
                annot_len: 16,
                annot_pages: 1,
                annot_index: sb.cat_index.clone(),
                ..sb.clone()
            },
        ),
        (
            "sb annot_index -> map node",
            Superblock {
                annot_len: 16,
                annot_pages: 1,
                annot_index: vec![nodes[0]],
                ..sb.clone()
            },
        ),
        (
            "sb generation u64::MAX",
            Superblock {
                generation: u64::MAX,
                ..sb.clone()
            },
        ),
        (
            "sb generation 0",
            Superblock {
                generation: 0,
                ..sb.clone()
            },
        ),
    ];
    for (name, lie) in sb_lies {
        let mut f = f0.clone();
        f.sb = lie;
        add(name.to_string(), f);
    }

    // Volume records.
    for (slot, r) in &recs {
        let n_blocks = r.size.div_ceil(bs);
        let v = &r.name;
        let mut rec_lie = |what: &str, change: &dyn Fn(&mut VolumeRecord)| {
            let mut f = f0.clone();
            let mut lie = r.clone();
            change(&mut lie);
            f.set_record(*slot, &lie);
            add(format!("record '{v}': {what}"), f);
        };
        rec_lie("size 0", &|r| r.size = 0);
        rec_lie("size 2^63+1", &|r| r.size = (1 << 63) + 1);
        rec_lie("size u64::MAX", &|r| r.size = u64::MAX);
        rec_lie("size 2^63 (depth too small)", &|r| r.size = 1 << 63);
        rec_lie("depth +1", &|r| r.depth += 1);
        rec_lie("depth +8", &|r| r.depth += 8);
        rec_lie("depth 64", &|r| r.depth = 64);
        rec_lie("parent = itself", &|r| r.parent_id = r.id);
        rec_lie("parent in the future", &|r| r.parent_id = r.id + 1);
        rec_lie("parent u64::MAX", &|r| r.parent_id = u64::MAX);
        rec_lie("id >= next id", &|r| r.id = sb.next_volume_id + 5);
        rec_lie("mapped u64::MAX", &|r| r.mapped_blocks = u64::MAX);
        rec_lie("mapped +1", &|r| {
            r.mapped_blocks = (r.mapped_blocks + 1).min(n_blocks)
        });
        rec_lie("root 1 (superblock)", &|r| r.root = 1);
        rec_lie("root past the pool", &|r| r.root = total + 7);
        rec_lie("root -> refcount page", &|r| r.root = rc_pages[0]);
        rec_lie("root -> data block", &|r| r.root = data_block);
        rec_lie("root 0 (map dropped)", &|r| r.root = 0);
        for (what, name) in [
            ("name empty", &b""[..]),
            ("name with '/'", b"a/b"),
            ("name '..'", b".."),
            ("name starting with '-'", b"-rf"),
            ("name not UTF-8", b"\xff\xfe"),
            ("name with a newline", b"x\ny"),
        ] {
            let mut f = f0.clone();
            f.edit_record(*slot, |b| {
                LE::write_u16(&mut b[50..52], name.len() as u16);
                b[64..192].fill(0);
                b[64..64 + name.len()].copy_from_slice(name);
            });
            add(format!("record '{v}': {what}"), f);
        }
        let mut f = f0.clone();
        f.edit_record(*slot, |b| LE::write_u16(&mut b[50..52], 200));
        add(format!("record '{v}': name length 200"), f);
        if r.root != 0 {
            // Another volume's root: shares a tree without a reference.
            if let Some((_, o)) = recs
                .iter()
                .find(|(_, o)| o.root != 0 && o.root != r.root && o.depth == r.depth)
            {
                let mut f = f0.clone();
                let mut lie = r.clone();
                lie.root = o.root;
                f.set_record(*slot, &lie);
                add(format!("record '{v}': root of '{}'", o.name), f);
            }
        }
    }
    // Two volumes that are each other's parent, and a duplicate id and name.
    if let [(s0, r0), (s1, r1), ..] = &recs[..] {
        let lie = |changes: &[(usize, VolumeRecord)]| {
            let mut f = f0.clone();
            for (slot, r) in changes {
                f.set_record(*slot, r);
            }
            f
        };
        let with = |r: &VolumeRecord, change: &dyn Fn(&mut VolumeRecord)| {
            let mut r = r.clone();
            change(&mut r);
            r
        };
        add(
            "records: parent cycle".into(),
            lie(&[
                (*s0, with(r0, &|r| r.parent_id = r1.id)),
                (*s1, with(r1, &|r| r.parent_id = r0.id)),
            ]),
        );
        add(
            "records: duplicate id".into(),
            lie(&[(*s1, with(r1, &|r| r.id = r0.id))]),
        );
        add(
            "records: duplicate name".into(),
            lie(&[(*s1, with(r1, &|r| r.name = r0.name.clone()))]),
        );
    }

    // Map nodes.
    for (i, &n) in nodes.iter().enumerate() {
        let Some((level, entries)) = f0.node(n) else {
            continue;
        };
        let first = entries.iter().position(|&e| e != 0);
        let mut node_lie = |what: &str, change: &dyn Fn(&mut Forge)| {
            let mut f = f0.clone();
            change(&mut f);
            add(format!("node {n} (level {level}): {what}"), f);
        };
        node_lie("level +1", &|f| {
            f.set_header(n, level + 1, sb.generation);
        });
        node_lie("generation after the commit", &|f| {
            f.set_header(n, level, sb.generation + 1);
        });
        node_lie("entry past the pool", &|f| {
            f.set_entry(n, fanout - 1, total + 3);
        });
        node_lie("entry -> superblock", &|f| {
            f.set_entry(n, first.unwrap_or(0), 1);
        });
        node_lie("entry -> catalog page", &|f| {
            f.set_entry(n, first.unwrap_or(0), cat_pages[0]);
        });
        node_lie("entry -> itself", &|f| {
            f.set_entry(n, first.unwrap_or(0), n);
        });
        if let Some(s) = first {
            let child = entries[s];
            node_lie("every entry = the first (paths multiply)", &|f| {
                f.edit_page(n, |p| {
                    for j in 0..fanout {
                        LE::write_u64(&mut p[8 * j..][..8], child);
                    }
                });
            });
            node_lie("first entry dropped", &|f| {
                f.set_entry(n, s, 0);
            });
            node_lie("last entry = the first (past the end)", &|f| {
                f.set_entry(n, fanout - 1, child);
            });
            if i % 2 == 0 {
                node_lie("first entry -> another node", &|f| {
                    let other = nodes
                        .iter()
                        .copied()
                        .find(|&o| o != n && o != child)
                        .unwrap_or(n);
                    f.set_entry(n, s, other);
                });
            }
        }
    }

    // A node reached at two levels, and a deep forged map on a huge volume
    // whose only entry lies past the end (the virtual block would wrap in
    // 64 bits if the walk trusted the depth).
    if let Some((slot, r)) = recs.iter().find(|(_, r)| r.root != 0) {
        let mut f = f0.clone();
        let leaf = f.add_node(0, &[(0, data_block)]);
        let mid = f.add_node(1, &[(0, leaf), (1, leaf)]);
        let top = f.add_node(2, &[(0, mid), (1, leaf)]);
        f.sb.total_blocks = f.sb.total_blocks.max(top + 1);
        let mut lie = r.clone();
        lie.root = top;
        lie.size = (fanout as u64).pow(2) * bs * 2;
        lie.depth = 3;
        f.set_record(*slot, &lie);
        add(
            format!("record '{}': leaf reached at levels 0 and 1", r.name),
            f,
        );

        // A 2^63-byte volume whose map is one chain of forged nodes,
        // each holding `entries(child)` at every level.
        let depth = crate::map::depth_for((1u64 << 63) / bs, fanout);
        let huge = |entries: &dyn Fn(u64) -> Vec<(usize, u64)>| {
            let mut f = f0.clone();
            let mut below = f.add_node(0, &entries(data_block));
            for level in 1..depth {
                below = f.add_node(level, &entries(below));
            }
            let mut lie = r.clone();
            lie.root = below;
            lie.size = 1 << 63;
            lie.depth = depth;
            f.set_record(*slot, &lie);
            f
        };
        add(
            format!("record '{}': deep forged map, entry past the end", r.name),
            huge(&|child| vec![(fanout - 1, child)]),
        );
        add(
            format!(
                "record '{}': 2^63-byte volume of one shared path per level",
                r.name
            ),
            huge(&|child| (0..fanout).map(|j| (j, child)).collect()),
        );
    }

    // Refcounts.
    let used: Vec<u64> = nodes.iter().copied().chain([data_block]).collect();
    for (k, &b) in used.iter().enumerate().take(12) {
        let Some(c) = f0.refcount(b) else { continue };
        for (what, v) in [("0", 0), ("+1", c + 1), ("u32::MAX", u32::MAX)] {
            if k % 3 != 0 && what == "u32::MAX" {
                continue;
            }
            let mut f = f0.clone();
            f.set_refcount(b, v);
            add(format!("refcount of block {b}: {what}"), f);
        }
    }
    for (what, b, v) in [
        ("superblock block 0", 0u64, 0u32),
        ("superblock block 0 = 2", 0, 2),
        ("free block = 3", free_block, 3),
        ("rc page = 0", rc_pages[0], 0),
        ("catalog page = 0", cat_pages[0], 0),
    ] {
        let mut f = f0.clone();
        f.set_refcount(b, v);
        add(format!("refcount: {what}"), f);
    }

    // Index pages.
    for (what, idx, value) in [
        ("rc index -> catalog page", sb.rc_index[0], cat_pages[0]),
        ("rc index -> past the pool", sb.rc_index[0], total + 1),
        ("catalog index -> 0", sb.cat_index[0], 0),
        ("catalog index -> rc page", sb.cat_index[0], rc_pages[0]),
        ("catalog index -> map node", sb.cat_index[0], nodes[0]),
    ] {
        let mut f = f0.clone();
        f.edit_page(idx, |p| LE::write_u64(&mut p[0..8], value));
        add(format!("index: {what}"), f);
    }
    out
}

//------------------------------------------------------------------------------
// Fuzzer-driven mutation

/// Apply field changes read from `data` to `base` and re-seal: each change
/// is (what, which, value) — a superblock field, a record field, a map node
/// entry or header, a refcount, or an index entry; `which` picks the target
/// among those of the image, `value` is one of the interesting numbers of
/// this image (other blocks, limits) or raw. Returns `base` unchanged if it
/// is not a pool.
pub fn mutate(base: &[u8], data: &[u8]) -> Vec<u8> {
    let Some(mut f) = Forge::new(base.to_vec()) else {
        return base.to_vec();
    };
    let nodes = f.pages(PageType::MapNode);
    let recs = f.records();
    let (rc, cat) = f.table_pages();
    let total = f.sb.total_blocks;
    let mut interesting: Vec<u64> = vec![
        0,
        1,
        2,
        3,
        f.block_size(),
        total - 1,
        total,
        total + 1,
        u32::MAX as u64,
        1 << 32,
        1 << 63,
        (1 << 63) + 1,
        u64::MAX,
        f.sb.generation,
        f.sb.generation + 1,
        f.sb.next_volume_id,
    ];
    interesting.extend(&nodes);
    interesting.extend(rc.iter().chain(&cat).filter(|&&p| p != 0));
    interesting.extend(recs.iter().flat_map(|(_, r)| [r.id, r.root, r.size]));
    let mut ops = data.chunks_exact(11);
    for op in &mut ops {
        let (what, which) = (op[0], op[1] as usize);
        let raw = LE::read_u64(&op[3..11]);
        let value = if op[2] < 0xc0 {
            interesting[op[2] as usize % interesting.len()]
        } else {
            raw
        };
        match what % 6 {
            0 => {
                let sb = &mut f.sb;
                match which % 11 {
                    0 => sb.total_blocks = value,
                    1 => sb.catalog_slots = value,
                    2 => sb.metadata_blocks = value,
                    3 => sb.next_volume_id = value,
                    4 => sb.generation = value,
                    5 if !sb.rc_index.is_empty() => {
                        let i = (raw as usize) % sb.rc_index.len();
                        sb.rc_index[i] = value;
                    }
                    6 if !sb.cat_index.is_empty() => {
                        let i = (raw as usize) % sb.cat_index.len();
                        sb.cat_index[i] = value;
                    }
                    7 => sb.annot_len = value,
                    8 => sb.annot_pages = value as u32,
                    9 if sb.annot_index.is_empty() => sb.annot_index.push(value),
                    9 => {
                        let i = (raw as usize) % sb.annot_index.len();
                        sb.annot_index[i] = value;
                    }
                    _ => sb.low_water_pct = value as u32 % 101,
                }
            }
            1 if !recs.is_empty() => {
                let (slot, r) = &recs[which % recs.len()];
                let mut lie = r.clone();
                match (raw >> 60) % 8 {
                    0 => lie.id = value,
                    1 => lie.parent_id = value,
                    2 => lie.root = value,
                    3 => lie.size = value,
                    4 => lie.mapped_blocks = value,
                    5 => lie.depth = value as u8,
                    6 => lie.read_only = !lie.read_only,
                    _ => lie.chain_digest[0] ^= value as u8 | 1,
                }
                f.set_record(*slot, &lie);
            }
            2 if !nodes.is_empty() => {
                let n = nodes[which % nodes.len()];
                let fanout = pointers_per_page(f.block_size() as u32);
                f.set_entry(n, (raw as usize >> 8) % fanout, value);
            }
            3 if !nodes.is_empty() => {
                let n = nodes[which % nodes.len()];
                if let Some((level, _)) = f.node(n) {
                    if raw & 1 == 0 {
                        f.set_header(n, value as u8, f.sb.generation);
                    } else {
                        f.set_header(n, level, value);
                    }
                }
            }
            4 => {
                let b = interesting[which % interesting.len()] % total.max(1);
                f.set_refcount(b, value as u32);
            }
            5 => {
                let ix: Vec<u64> =
                    f.sb.rc_index
                        .iter()
                        .chain(&f.sb.cat_index)
                        .copied()
                        .collect();
                if !ix.is_empty() {
                    let ip = ix[which % ix.len()];
                    f.edit_page(ip, |p| {
                        let j = (raw as usize >> 8) % (p.len() / 8);
                        LE::write_u64(&mut p[8 * j..][..8], value);
                    });
                }
            }
            _ => {}
        }
    }
    f.finish()
}

//------------------------------------------------------------------------------
// Send streams

/// A send stream (docs/FORMAT.md, "Send stream") made from fuzzer bytes, with
/// every checksum valid so the receiver's checks behind them are reached:
/// a header (size, flags, digests, name chosen by `data`), then records
/// (tag, offset, length, payload) in the order `data` gives them, each with
/// its sha256, and a trailer whose counts are right or not. The digests of
/// the layer will not match unless the fuzzer finds them, which is fine: the
/// parser's bounds, order and count checks are what this reaches.
pub fn stream(data: &[u8]) -> Vec<u8> {
    let mut r = data.iter().copied();
    let mut next = |n: usize| -> Vec<u8> { (0..n).map(|_| r.next().unwrap_or(0)).collect() };
    let flags = next(1)[0];
    let size_sel = next(1)[0];
    let virtual_size = match size_sel % 4 {
        0 => 1 << 20,
        1 => 4096 * (1 + next(1)[0] as u64),
        2 => u64::from_le_bytes(next(8).try_into().unwrap()),
        _ => 1 << 63,
    };
    let incremental = flags & 1 != 0;
    let parent = [next(1)[0]; 32];
    let diff = [next(1)[0]; 32];
    let chain = if flags & 2 != 0 {
        [next(1)[0]; 32]
    } else if incremental {
        crate::layer::chain_digest(Some(&parent), &diff)
    } else {
        diff
    };
    let name_len = (next(1)[0] % 20) as usize;
    let name = next(name_len);
    let mut out = Vec::new();
    out.extend_from_slice(b"THINSEND");
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&4096u32.to_le_bytes());
    out.extend_from_slice(&4096u32.to_le_bytes());
    out.extend_from_slice(&(incremental as u32).to_le_bytes());
    out.extend_from_slice(&virtual_size.to_le_bytes());
    out.extend_from_slice(&if incremental { parent } else { [0; 32] });
    out.extend_from_slice(&diff);
    out.extend_from_slice(&chain);
    out.extend_from_slice(&(name.len() as u16).to_le_bytes());
    out.extend_from_slice(&name);
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&sum);
    let (mut ranges, mut bytes) = (0u64, 0u64);
    let n_records = next(1)[0] % 8;
    for _ in 0..n_records {
        let tag = if next(1)[0] & 1 == 0 { b'D' } else { b'Z' };
        let offset = match next(1)[0] % 3 {
            0 => 4096 * next(1)[0] as u64,
            1 => u64::from_le_bytes(next(8).try_into().unwrap()),
            _ => 4096 * (ranges + 1),
        };
        let sum_of = |len: u64, payload: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update([tag]);
            h.update(offset.to_le_bytes());
            h.update(len.to_le_bytes());
            h.update(payload);
            h.finalize().into()
        };
        out.push(tag);
        out.extend_from_slice(&offset.to_le_bytes());
        if tag == b'D' {
            let len = (next(1)[0] as usize % 3) * 4096 + next(1)[0] as usize;
            let payload = next(len);
            out.extend_from_slice(&(len as u32).to_le_bytes());
            out.extend_from_slice(&payload);
            out.extend_from_slice(&sum_of(len as u64, &payload));
            bytes += len as u64;
        } else {
            let len = 4096 * next(1)[0] as u64;
            out.extend_from_slice(&len.to_le_bytes());
            out.extend_from_slice(&sum_of(len, &[]));
        }
        ranges += 1;
    }
    let lie = next(1)[0];
    out.push(b'E');
    out.extend_from_slice(&(ranges + (lie & 1) as u64).to_le_bytes());
    out.extend_from_slice(&(bytes + (lie & 2) as u64).to_le_bytes());
    let sum: [u8; 32] = Sha256::digest(&out).into();
    out.extend_from_slice(&sum);
    // Whatever is left of the input: trailing bytes after the trailer.
    out.extend(r);
    out
}

/// Receive `stream` into a copy of the sample pool (which has `layer1` and
/// `layer2` as bases for incremental streams). Errors are expected.
pub fn receive(stream: &[u8]) {
    let m = MemStorage::from_bytes(sample_pool().to_vec());
    let Ok(mut p) = Pool::open_with(Box::new(m), Path::new("mem")) else {
        return;
    };
    let mut input = stream;
    let _ = crate::layer::stream::receive(&mut p, Some("received"), &mut input, &mut |_| {});
    let _ = p.check();
}
