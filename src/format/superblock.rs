//! The superblock: two 4 KiB slots at bytes 0 and 4096. A commit writes the
//! slot `generation % 2`; at open the valid slot with the highest generation
//! wins, so a torn superblock write falls back to the previous commit.
//!
//! ```text
//! offset size field
//!    0    8   magic "THINPOOL"
//!    8    4   format version (3; versions 1 and 2 are read too)
//!   12    4   checksum crc32(slot[16..4096]) XOR SB_SALT
//!   16    8   generation (commit number, starts at 1)
//!   24    4   block size in bytes
//!   28    4   low-water mark, percent of free blocks (0 = default 10)
//!   32    8   total blocks (pool maximum size / block size)
//!   40   16   uuid
//!   56    8   created (seconds since the Unix epoch)
//!   64    8   next volume id
//!   72    8   metadata blocks in use
//!   80    8   catalog slots
//!   88    4   refcount index pages in use (n <= 256)
//!   92    4   catalog index pages in use (m <= 64)
//!   96 2048   refcount index page pointers (256 x u64; unused = 0)
//! 2144  512   catalog index page pointers (64 x u64; unused = 0)
//! 2656    8   annotation stream length in bytes (version 2; 0 in version 1)
//! 2664    4   annotation index pages in use (k <= 16)
//! 2668    4   annotation data pages
//! 2672  128   annotation index page pointers (16 x u64; unused = 0)
//! 2800    8   log start: first block of the intent log (version 3; 0 = none)
//! 2808    4   log blocks (even; 0 = no log: every flush is a full commit)
//! 2812    4   reserved, zero
//! 2816    8   log nonce: records of the epoch after this commit carry it
//! 2824 1272   reserved, zero
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

use super::{FORMAT_VERSION, MAGIC, OLDEST_READABLE_VERSION};

pub const SUPERBLOCK_SLOT_SIZE: usize = 4096;
pub const RC_INDEX_MAX: usize = 256;
pub const CAT_INDEX_MAX: usize = 64;
pub const ANNOT_INDEX_MAX: usize = 16;
const SB_SALT: u32 = 0x3e5a_9d17;

const OFF_RC_INDEX: usize = 96;
const OFF_CAT_INDEX: usize = OFF_RC_INDEX + 8 * RC_INDEX_MAX;
const OFF_ANNOT_LEN: usize = OFF_CAT_INDEX + 8 * CAT_INDEX_MAX;
const OFF_ANNOT_N: usize = OFF_ANNOT_LEN + 8;
const OFF_ANNOT_INDEX: usize = OFF_ANNOT_N + 8;
const OFF_LOG_START: usize = OFF_ANNOT_INDEX + 8 * ANNOT_INDEX_MAX;
const OFF_LOG_BLOCKS: usize = OFF_LOG_START + 8;
const OFF_LOG_NONCE: usize = OFF_LOG_BLOCKS + 8;
const OFF_END: usize = OFF_LOG_NONCE + 8;
const _: () = assert!(OFF_END <= SUPERBLOCK_SLOT_SIZE);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// The format version the slot was written in (encode always writes
    /// this build's, `FORMAT_VERSION`).
    pub version: u32,
    pub generation: u64,
    pub block_size: u32,
    pub low_water_pct: u32,
    pub total_blocks: u64,
    pub uuid: [u8; 16],
    pub created: u64,
    pub next_volume_id: u64,
    pub metadata_blocks: u64,
    pub catalog_slots: u64,
    pub rc_index: Vec<u64>,
    pub cat_index: Vec<u64>,
    /// Length of the annotation stream (bytes) and its index pages.
    pub annot_len: u64,
    pub annot_pages: u32,
    pub annot_index: Vec<u64>,
    /// The intent log (version 3): `log_blocks` blocks from `log_start`,
    /// two halves; 0 blocks = no log. Zero in versions 1 and 2.
    pub log_start: u64,
    pub log_blocks: u32,
    /// Records of the epoch after this commit carry this number, so a
    /// record of an unfinished commit with the same generation is stale.
    pub log_nonce: u64,
}

/// Why a slot could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotError {
    BadMagic,
    /// Valid magic, but a version this build does not read.
    Version(u32),
    Checksum,
    Geometry(String),
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SLOT_SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        LE::write_u32(&mut b[8..12], FORMAT_VERSION);
        LE::write_u64(&mut b[16..24], self.generation);
        LE::write_u32(&mut b[24..28], self.block_size);
        LE::write_u32(&mut b[28..32], self.low_water_pct);
        LE::write_u64(&mut b[32..40], self.total_blocks);
        b[40..56].copy_from_slice(&self.uuid);
        LE::write_u64(&mut b[56..64], self.created);
        LE::write_u64(&mut b[64..72], self.next_volume_id);
        LE::write_u64(&mut b[72..80], self.metadata_blocks);
        LE::write_u64(&mut b[80..88], self.catalog_slots);
        LE::write_u32(&mut b[88..92], self.rc_index.len() as u32);
        LE::write_u32(&mut b[92..96], self.cat_index.len() as u32);
        for (i, p) in self.rc_index.iter().enumerate() {
            LE::write_u64(&mut b[OFF_RC_INDEX + 8 * i..][..8], *p);
        }
        for (i, p) in self.cat_index.iter().enumerate() {
            LE::write_u64(&mut b[OFF_CAT_INDEX + 8 * i..][..8], *p);
        }
        LE::write_u64(&mut b[OFF_ANNOT_LEN..][..8], self.annot_len);
        LE::write_u32(&mut b[OFF_ANNOT_N..][..4], self.annot_index.len() as u32);
        LE::write_u32(&mut b[OFF_ANNOT_N + 4..][..4], self.annot_pages);
        for (i, p) in self.annot_index.iter().enumerate() {
            LE::write_u64(&mut b[OFF_ANNOT_INDEX + 8 * i..][..8], *p);
        }
        LE::write_u64(&mut b[OFF_LOG_START..][..8], self.log_start);
        LE::write_u32(&mut b[OFF_LOG_BLOCKS..][..4], self.log_blocks);
        LE::write_u64(&mut b[OFF_LOG_NONCE..][..8], self.log_nonce);
        let crc = crc32fast::hash(&b[16..]) ^ SB_SALT;
        LE::write_u32(&mut b[12..16], crc);
        b
    }

    /// Decode one slot. Geometry is checked before any of it is trusted.
    pub fn decode(b: &[u8]) -> Result<Superblock, SlotError> {
        if b.len() < SUPERBLOCK_SLOT_SIZE || b[0..8] != MAGIC {
            return Err(SlotError::BadMagic);
        }
        let version = LE::read_u32(&b[8..12]);
        let crc = crc32fast::hash(&b[16..SUPERBLOCK_SLOT_SIZE]) ^ SB_SALT;
        if LE::read_u32(&b[12..16]) != crc {
            // A future version may checksum differently: report the version first.
            if !readable(version) {
                return Err(SlotError::Version(version));
            }
            return Err(SlotError::Checksum);
        }
        if !readable(version) {
            return Err(SlotError::Version(version));
        }
        let n_rc = LE::read_u32(&b[88..92]) as usize;
        let n_cat = LE::read_u32(&b[92..96]) as usize;
        // Version 1 kept these bytes reserved (zero): no annotation table.
        let n_annot = LE::read_u32(&b[OFF_ANNOT_N..][..4]) as usize;
        if n_rc > RC_INDEX_MAX || n_cat > CAT_INDEX_MAX || n_annot > ANNOT_INDEX_MAX {
            return Err(SlotError::Geometry(format!(
                "index counts {n_rc}/{n_cat}/{n_annot} exceed {RC_INDEX_MAX}/{CAT_INDEX_MAX}/{ANNOT_INDEX_MAX}"
            )));
        }
        let sb = Superblock {
            version,
            generation: LE::read_u64(&b[16..24]),
            block_size: LE::read_u32(&b[24..28]),
            low_water_pct: LE::read_u32(&b[28..32]),
            total_blocks: LE::read_u64(&b[32..40]),
            uuid: b[40..56].try_into().unwrap(),
            created: LE::read_u64(&b[56..64]),
            next_volume_id: LE::read_u64(&b[64..72]),
            metadata_blocks: LE::read_u64(&b[72..80]),
            catalog_slots: LE::read_u64(&b[80..88]),
            rc_index: (0..n_rc)
                .map(|i| LE::read_u64(&b[OFF_RC_INDEX + 8 * i..][..8]))
                .collect(),
            cat_index: (0..n_cat)
                .map(|i| LE::read_u64(&b[OFF_CAT_INDEX + 8 * i..][..8]))
                .collect(),
            annot_len: LE::read_u64(&b[OFF_ANNOT_LEN..][..8]),
            annot_pages: LE::read_u32(&b[OFF_ANNOT_N + 4..][..4]),
            annot_index: (0..n_annot)
                .map(|i| LE::read_u64(&b[OFF_ANNOT_INDEX + 8 * i..][..8]))
                .collect(),
            // Versions 1 and 2 kept these bytes reserved (zero): no log.
            log_start: LE::read_u64(&b[OFF_LOG_START..][..8]),
            log_blocks: LE::read_u32(&b[OFF_LOG_BLOCKS..][..4]),
            log_nonce: LE::read_u64(&b[OFF_LOG_NONCE..][..8]),
        };
        sb.check_geometry().map_err(SlotError::Geometry)?;
        Ok(sb)
    }

    fn check_geometry(&self) -> Result<(), String> {
        if !super::valid_block_size(self.block_size) {
            return Err(format!("invalid block size {}", self.block_size));
        }
        let bs = self.block_size as u64;
        let min = super::reserved_blocks(self.block_size) + 1;
        if self.total_blocks < min || self.total_blocks.checked_mul(bs).is_none() {
            return Err(format!("invalid total block count {}", self.total_blocks));
        }
        // The next commit writes generation + 1: the last number is never valid.
        if self.generation == u64::MAX {
            return Err(format!("invalid generation {}", self.generation));
        }
        if self.low_water_pct > 100 {
            return Err(format!("invalid low-water mark {}%", self.low_water_pct));
        }
        let in_range = |p: &u64| *p < self.total_blocks;
        if !self.rc_index.iter().all(in_range)
            || !self.cat_index.iter().all(in_range)
            || !self.annot_index.iter().all(in_range)
        {
            return Err("index pointer past the end of the pool".into());
        }
        if self.log_blocks > 0 {
            let first = super::reserved_blocks(self.block_size);
            let end = self.log_start.checked_add(self.log_blocks as u64);
            if !self.log_blocks.is_multiple_of(2)
                || self.log_start < first
                || end.is_none_or(|e| e > self.total_blocks)
            {
                return Err(format!(
                    "invalid log: {} blocks at block {}",
                    self.log_blocks, self.log_start
                ));
            }
        } else if self.log_start != 0 {
            return Err(format!("log start {} without log blocks", self.log_start));
        }
        Ok(())
    }
}

fn readable(version: u32) -> bool {
    (OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            generation: 5,
            block_size: 65536,
            low_water_pct: 10,
            total_blocks: 1000,
            uuid: [7; 16],
            created: 1,
            next_volume_id: 3,
            metadata_blocks: 4,
            catalog_slots: 10,
            rc_index: vec![2],
            cat_index: vec![3],
            annot_len: 100,
            annot_pages: 1,
            annot_index: vec![4],
            log_start: 10,
            log_blocks: 8,
            log_nonce: 0x1234_5678_9abc,
        }
    }

    #[test]
    fn reads_version_1() {
        // A version 1 slot is a version 3 slot with the annotation and log
        // fields zero.
        let mut s = sample();
        s.log_start = 0;
        s.log_blocks = 0;
        s.log_nonce = 0;
        s.annot_len = 0;
        s.annot_pages = 0;
        s.annot_index = vec![];
        let mut b = s.encode();
        LE::write_u32(&mut b[8..12], 1);
        let crc = crc32fast::hash(&b[16..]) ^ SB_SALT;
        LE::write_u32(&mut b[12..16], crc);
        s.version = 1;
        assert_eq!(Superblock::decode(&b).unwrap(), s);
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }

    #[test]
    fn detects_damage() {
        let mut b = sample().encode();
        b[200] ^= 0x40;
        assert_eq!(Superblock::decode(&b), Err(SlotError::Checksum));
        let mut b = sample().encode();
        LE::write_u32(&mut b[8..12], 99);
        assert_eq!(Superblock::decode(&b), Err(SlotError::Version(99)));
        assert_eq!(Superblock::decode(&[0u8; 4096]), Err(SlotError::BadMagic));
        let mut s = sample();
        s.rc_index = vec![5000];
        assert!(matches!(
            Superblock::decode(&s.encode()),
            Err(SlotError::Geometry(_))
        ));
        for (start, blocks) in [(0, 8), (995, 8), (10, 7), (u64::MAX - 2, 4), (5, 0)] {
            let mut s = sample();
            s.log_start = start;
            s.log_blocks = blocks;
            assert!(
                matches!(Superblock::decode(&s.encode()), Err(SlotError::Geometry(_))),
                "log {blocks} at {start}"
            );
        }
    }

    #[test]
    fn reads_version_2_without_a_log() {
        let mut s = sample();
        (s.log_start, s.log_blocks, s.log_nonce) = (0, 0, 0);
        let mut b = s.encode();
        LE::write_u32(&mut b[8..12], 2);
        let crc = crc32fast::hash(&b[16..]) ^ SB_SALT;
        LE::write_u32(&mut b[12..16], crc);
        s.version = 2;
        assert_eq!(Superblock::decode(&b).unwrap(), s);
    }
}
