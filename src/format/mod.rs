//! On-disk structures only: byte layouts, encode/decode, checksums.
//! No I/O and no policy live here; `docs/FORMAT.md` is the byte map.

mod log;
mod page;
mod record;
mod superblock;

pub use log::{data_crc, LogKind, LogRecord, RecordError, LOG_RECORD_SIZE};
pub use page::{decode_page, encode_page, PageHeader, PageType, PAGE_HEADER_SIZE};
pub use record::{digest_hex, VolumeRecord, MAX_VOLUME_SIZE, NAME_MAX, RECORD_SIZE};
pub use superblock::{
    SlotError, Superblock, ANNOT_INDEX_MAX, CAT_INDEX_MAX, RC_INDEX_MAX, SUPERBLOCK_SLOT_SIZE,
};

/// "THINPOOL" — the first eight bytes of both superblock slots.
pub const MAGIC: [u8; 8] = *b"THINPOOL";
/// Format version written by this build. Every format change bumps it; a
/// build reads every version from `OLDEST_READABLE_VERSION` to its own, and
/// the first commit of an older pool writes this version (which older builds
/// then refuse by name). History: 1 = the original format; 2 = adds the
/// annotation table (per-volume metadata such as containerd snapshot records);
/// 3 = adds the intent log (superblock bytes 2800..2824, `TPLG` records).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this build opens.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Bytes reserved at the start of the file for the two superblock slots.
pub const SUPERBLOCK_AREA: u64 = 2 * SUPERBLOCK_SLOT_SIZE as u64;
pub const MIN_BLOCK_SIZE: u32 = 4096;
pub const MAX_BLOCK_SIZE: u32 = 2 * 1024 * 1024;

/// Number of blocks at the start of the file that hold the superblocks.
pub fn reserved_blocks(block_size: u32) -> u64 {
    SUPERBLOCK_AREA.div_ceil(block_size as u64)
}

/// Entries (u64 pointers) in a map node or index page of `block_size` bytes.
pub fn pointers_per_page(block_size: u32) -> usize {
    (block_size as usize - PAGE_HEADER_SIZE) / 8
}

pub fn valid_block_size(bs: u32) -> bool {
    bs.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs)
}
