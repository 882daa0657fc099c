//! Metadata page header, shared by every metadata page type.
//!
//! ```text
//! offset size field
//!  0      4   magic      (per page type, see PageType)
//!  4      4   checksum   crc32(page[8..block_size]) XOR salt(type)
//!  8      8   location   block number this page was written to
//! 16      8   generation transaction that wrote it
//! 24      1   level      map nodes: 0 = leaf; other pages: 0
//! 25     39   reserved   zero
//! 64      .   payload
//! ```
//! The salt makes a page read as the wrong type fail validation; the location
//! catches misdirected writes (a valid page found at the wrong place).

use byteorder::{ByteOrder, LittleEndian as LE};

pub const PAGE_HEADER_SIZE: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageType {
    /// Block-map node (radix tree, internal or leaf).
    MapNode,
    /// Index page of a persistent array: pointers to its data pages.
    Index,
    /// Data page of the refcount array (u32 per block).
    Refcount,
    /// Data page of the volume catalog (fixed-size records).
    Catalog,
    /// Data page of the annotation stream (per-volume opaque bytes).
    Annotations,
}

impl PageType {
    pub fn magic(self) -> u32 {
        match self {
            PageType::MapNode => 0x4e4d_5054,     // "TPMN"
            PageType::Index => 0x5849_5054,       // "TPIX"
            PageType::Refcount => 0x4352_5054,    // "TPRC"
            PageType::Catalog => 0x5443_5054,     // "TPCT"
            PageType::Annotations => 0x4e41_5054, // "TPAN"
        }
    }

    fn salt(self) -> u32 {
        match self {
            PageType::MapNode => 0x1c6b_3d21,
            PageType::Index => 0x5a0f_77e3,
            PageType::Refcount => 0x2b84_a1c9,
            PageType::Catalog => 0x7e12_c05b,
            PageType::Annotations => 0x61d3_4b8f,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            PageType::MapNode => "map node",
            PageType::Index => "index page",
            PageType::Refcount => "refcount page",
            PageType::Catalog => "catalog page",
            PageType::Annotations => "annotation page",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub kind: PageType,
    pub location: u64,
    pub generation: u64,
    pub level: u8,
}

/// Fill in the header of `page` (payload already written) and its checksum.
pub fn encode_page(page: &mut [u8], h: &PageHeader) {
    LE::write_u32(&mut page[0..4], h.kind.magic());
    LE::write_u64(&mut page[8..16], h.location);
    LE::write_u64(&mut page[16..24], h.generation);
    page[24] = h.level;
    page[25..PAGE_HEADER_SIZE].fill(0);
    let crc = crc32fast::hash(&page[8..]) ^ h.kind.salt();
    LE::write_u32(&mut page[4..8], crc);
}

/// Validate a page read from block `location` that must be of type `kind`.
/// Returns its header, or a message saying precisely what is wrong.
pub fn decode_page(page: &[u8], kind: PageType, location: u64) -> Result<PageHeader, String> {
    if page.len() < PAGE_HEADER_SIZE {
        return Err(format!(
            "{} at block {location}: page too small",
            kind.name()
        ));
    }
    let magic = LE::read_u32(&page[0..4]);
    if magic != kind.magic() {
        return Err(format!(
            "{} at block {location}: wrong magic {magic:#010x} (expected {:#010x})",
            kind.name(),
            kind.magic()
        ));
    }
    let stored = LE::read_u32(&page[4..8]);
    let crc = crc32fast::hash(&page[8..]) ^ kind.salt();
    if stored != crc {
        return Err(format!(
            "{} at block {location}: checksum mismatch (stored {stored:#010x}, computed {crc:#010x})",
            kind.name()
        ));
    }
    let loc = LE::read_u64(&page[8..16]);
    if loc != location {
        return Err(format!(
            "{} at block {location}: page says it belongs at block {loc} (misdirected write)",
            kind.name()
        ));
    }
    Ok(PageHeader {
        kind,
        location,
        generation: LE::read_u64(&page[16..24]),
        level: page[24],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_salt() {
        let mut p = vec![0u8; 4096];
        p[100] = 7;
        let h = PageHeader {
            kind: PageType::MapNode,
            location: 9,
            generation: 3,
            level: 1,
        };
        encode_page(&mut p, &h);
        assert_eq!(decode_page(&p, PageType::MapNode, 9).unwrap(), h);
        // Same bytes read as another type fail (magic, and salt if magic were forged).
        assert!(decode_page(&p, PageType::Refcount, 9).is_err());
        // Misdirected.
        assert!(decode_page(&p, PageType::MapNode, 10)
            .unwrap_err()
            .contains("misdirected"));
        // Bit flip in payload.
        p[4000] ^= 1;
        assert!(decode_page(&p, PageType::MapNode, 9)
            .unwrap_err()
            .contains("checksum"));
    }
}
