//! A volume record in the catalog: 512 bytes, little-endian.
//!
//! ```text
//! offset size field
//!   0    8   id (0 = empty slot)
//!   8    8   parent id (0 = none)
//!  16    8   map root block (0 = nothing mapped)
//!  24    8   virtual size in bytes
//!  32    8   mapped blocks
//!  40    8   created (seconds since the Unix epoch)
//!  48    1   map depth (levels of the radix tree, >= 1)
//!  49    1   flags: bit 0 = read-only, bit 1 = preallocated; other bits
//!            must be zero (a record with one set is refused, not guessed at)
//!  50    2   name length (<= 128)
//!  52   12   reserved, zero
//!  64  128   name (UTF-8, zero padded)
//! 192   32   diff digest (sha256; zero = none)
//! 224   32   chain digest (sha256; zero = none)
//! 256  256   reserved, zero
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

pub const RECORD_SIZE: usize = 512;
pub const NAME_MAX: usize = 128;
/// Largest virtual size of a volume.
pub const MAX_VOLUME_SIZE: u64 = 1 << 63;
const FLAG_READ_ONLY: u8 = 1;
/// Every block was allocated and mapped at creation (`volume create --preallocate`).
const FLAG_PREALLOCATED: u8 = 2;
const FLAGS_KNOWN: u8 = FLAG_READ_ONLY | FLAG_PREALLOCATED;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VolumeRecord {
    pub id: u64,
    pub parent_id: u64,
    pub root: u64,
    pub size: u64,
    pub mapped_blocks: u64,
    pub created: u64,
    pub depth: u8,
    pub read_only: bool,
    /// Fully mapped from creation: writes overwrite in place, zero writes
    /// and discards zero blocks instead of unmapping them.
    pub preallocated: bool,
    pub name: String,
    pub diff_digest: [u8; 32],
    pub chain_digest: [u8; 32],
}

impl VolumeRecord {
    pub fn encode(&self, b: &mut [u8]) {
        b[..RECORD_SIZE].fill(0);
        LE::write_u64(&mut b[0..8], self.id);
        LE::write_u64(&mut b[8..16], self.parent_id);
        LE::write_u64(&mut b[16..24], self.root);
        LE::write_u64(&mut b[24..32], self.size);
        LE::write_u64(&mut b[32..40], self.mapped_blocks);
        LE::write_u64(&mut b[40..48], self.created);
        b[48] = self.depth;
        b[49] = (if self.read_only { FLAG_READ_ONLY } else { 0 })
            | (if self.preallocated {
                FLAG_PREALLOCATED
            } else {
                0
            });
        let name = self.name.as_bytes();
        LE::write_u16(&mut b[50..52], name.len() as u16);
        b[64..64 + name.len()].copy_from_slice(name);
        b[192..224].copy_from_slice(&self.diff_digest);
        b[224..256].copy_from_slice(&self.chain_digest);
    }

    /// `Ok(None)` for an empty slot.
    pub fn decode(b: &[u8]) -> Result<Option<VolumeRecord>, String> {
        let id = LE::read_u64(&b[0..8]);
        if id == 0 {
            return Ok(None);
        }
        let name_len = LE::read_u16(&b[50..52]) as usize;
        if name_len == 0 || name_len > NAME_MAX {
            return Err(format!("volume {id}: bad name length {name_len}"));
        }
        let name = std::str::from_utf8(&b[64..64 + name_len])
            .map_err(|_| format!("volume {id}: name is not UTF-8"))?
            .to_string();
        let depth = b[48];
        if depth == 0 || depth > 64 {
            return Err(format!("volume '{name}': bad map depth {depth}"));
        }
        let flags = b[49];
        if flags & !FLAGS_KNOWN != 0 {
            return Err(format!(
                "volume '{name}': unknown flags {flags:#04x} (written by a newer thinpool?)"
            ));
        }
        Ok(Some(VolumeRecord {
            id,
            parent_id: LE::read_u64(&b[8..16]),
            root: LE::read_u64(&b[16..24]),
            size: LE::read_u64(&b[24..32]),
            mapped_blocks: LE::read_u64(&b[32..40]),
            created: LE::read_u64(&b[40..48]),
            depth,
            read_only: flags & FLAG_READ_ONLY != 0,
            preallocated: flags & FLAG_PREALLOCATED != 0,
            name,
            diff_digest: b[192..224].try_into().unwrap(),
            chain_digest: b[224..256].try_into().unwrap(),
        }))
    }
}

/// A recorded digest in hex, or None for "not a committed layer" (all zero).
pub fn digest_hex(d: &[u8; 32]) -> Option<String> {
    (*d != [0; 32]).then(|| d.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let r = VolumeRecord {
            id: 4,
            parent_id: 2,
            root: 77,
            size: 1 << 40,
            mapped_blocks: 12,
            created: 1700000000,
            depth: 3,
            read_only: true,
            preallocated: true,
            name: "layer-1".into(),
            diff_digest: [1; 32],
            chain_digest: [2; 32],
        };
        let mut b = vec![0u8; RECORD_SIZE];
        r.encode(&mut b);
        assert_eq!(VolumeRecord::decode(&b).unwrap(), Some(r));
        assert_eq!(VolumeRecord::decode(&[0u8; RECORD_SIZE]).unwrap(), None);
    }

    #[test]
    fn unknown_flags_are_refused() {
        let r = VolumeRecord {
            id: 1,
            size: 4096,
            depth: 1,
            name: "v".into(),
            ..Default::default()
        };
        let mut b = vec![0u8; RECORD_SIZE];
        r.encode(&mut b);
        b[49] |= 0x04;
        let e = VolumeRecord::decode(&b).unwrap_err();
        assert!(e.contains("unknown flags 0x04"), "{e}");
    }
}
