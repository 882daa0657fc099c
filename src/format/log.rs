//! Intent log records (format version 3): fixed 64-byte records in the log
//! area the superblock names (`log_start`, `log_blocks`). The log is two
//! halves of `log_blocks / 2` blocks; records of the epoch that follows
//! commit `G` go to half `G % 2`, slot 0, 1, 2, ... (slot `i` of a half is
//! bytes `64 * i ..` of it).
//!
//! ```text
//! offset size field
//!    0    4   magic "TPLG" (0x474c5054 read as u32 LE)
//!    4    4   checksum: crc32(record[8..64]) XOR LOG_SALT
//!    8    8   generation G of the commit the epoch follows
//!   16    8   nonce: the superblock's log nonce of commit G
//!   24    4   seq: the record's slot in its half (0, 1, 2, ...)
//!   28    1   kind: 1 = map, 2 = unmap
//!   29    3   reserved, zero
//!   32    8   volume id
//!   40    8   virtual block
//!   48    8   physical block (map; 0 for unmap)
//!   56    4   crc32 of the physical block's whole content (map; 0 for unmap)
//!   60    4   reserved, zero
//! ```

use byteorder::{ByteOrder, LittleEndian as LE};

pub const LOG_RECORD_SIZE: usize = 64;
pub const LOG_MAGIC: u32 = 0x474c_5054;
const LOG_SALT: u32 = 0x5d2c_9e41;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// Virtual block `vblock` of `volume` now maps to `pblock`, whose
    /// content has crc `data_crc`.
    Map,
    /// Virtual block `vblock` of `volume` is unmapped (reads as zeros).
    Unmap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecord {
    pub generation: u64,
    pub nonce: u64,
    pub seq: u32,
    pub kind: LogKind,
    pub volume: u64,
    pub vblock: u64,
    pub pblock: u64,
    pub data_crc: u32,
}

/// Why a slot does not hold a record of the expected epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// No magic: never written, or written over (the end of the log).
    Empty,
    /// Magic, but the checksum fails: a torn or damaged record.
    Checksum,
    /// Valid record of another epoch (a stale one from an older commit).
    Stale { generation: u64 },
    /// Valid record of this epoch in the wrong slot.
    Seq { seq: u32 },
    /// Valid checksum but fields no writer makes.
    Invalid(String),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Empty => write!(f, "no record (end of the log)"),
            RecordError::Checksum => write!(f, "torn or damaged record (checksum)"),
            RecordError::Stale { generation } => {
                write!(f, "stale record of generation {generation}")
            }
            RecordError::Seq { seq } => write!(f, "record with sequence number {seq}"),
            RecordError::Invalid(m) => write!(f, "invalid record: {m}"),
        }
    }
}

impl LogRecord {
    pub fn encode(&self) -> [u8; LOG_RECORD_SIZE] {
        let mut b = [0u8; LOG_RECORD_SIZE];
        LE::write_u32(&mut b[0..4], LOG_MAGIC);
        LE::write_u64(&mut b[8..16], self.generation);
        LE::write_u64(&mut b[16..24], self.nonce);
        LE::write_u32(&mut b[24..28], self.seq);
        b[28] = match self.kind {
            LogKind::Map => 1,
            LogKind::Unmap => 2,
        };
        LE::write_u64(&mut b[32..40], self.volume);
        LE::write_u64(&mut b[40..48], self.vblock);
        LE::write_u64(&mut b[48..56], self.pblock);
        LE::write_u32(&mut b[56..60], self.data_crc);
        let crc = crc32fast::hash(&b[8..]) ^ LOG_SALT;
        LE::write_u32(&mut b[4..8], crc);
        b
    }

    /// Decode slot `seq` of the epoch after commit `generation` with log
    /// nonce `nonce`: anything else is the end of the log.
    pub fn decode(b: &[u8], generation: u64, nonce: u64, seq: u32) -> Result<Self, RecordError> {
        if b.len() < LOG_RECORD_SIZE || LE::read_u32(&b[0..4]) != LOG_MAGIC {
            return Err(RecordError::Empty);
        }
        let b = &b[..LOG_RECORD_SIZE];
        if LE::read_u32(&b[4..8]) != crc32fast::hash(&b[8..]) ^ LOG_SALT {
            return Err(RecordError::Checksum);
        }
        let g = LE::read_u64(&b[8..16]);
        if g != generation || LE::read_u64(&b[16..24]) != nonce {
            return Err(RecordError::Stale { generation: g });
        }
        let s = LE::read_u32(&b[24..28]);
        if s != seq {
            return Err(RecordError::Seq { seq: s });
        }
        let kind = match b[28] {
            1 => LogKind::Map,
            2 => LogKind::Unmap,
            k => return Err(RecordError::Invalid(format!("kind {k}"))),
        };
        let r = LogRecord {
            generation: g,
            nonce,
            seq: s,
            kind,
            volume: LE::read_u64(&b[32..40]),
            vblock: LE::read_u64(&b[40..48]),
            pblock: LE::read_u64(&b[48..56]),
            data_crc: LE::read_u32(&b[56..60]),
        };
        if b[29..32] != [0; 3] || b[60..64] != [0; 4] {
            return Err(RecordError::Invalid("reserved bytes are not zero".into()));
        }
        if r.kind == LogKind::Unmap && (r.pblock != 0 || r.data_crc != 0) {
            return Err(RecordError::Invalid("unmap with a block".into()));
        }
        Ok(r)
    }
}

/// crc32 of a data block's content, as a map record carries it.
pub fn data_crc(block: &[u8]) -> u32 {
    crc32fast::hash(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u32) -> LogRecord {
        LogRecord {
            generation: 7,
            nonce: 0xfeed,
            seq,
            kind: LogKind::Map,
            volume: 3,
            vblock: 99,
            pblock: 1234,
            data_crc: 0xdead_beef,
        }
    }

    #[test]
    fn roundtrip() {
        let r = rec(5);
        assert_eq!(LogRecord::decode(&r.encode(), 7, 0xfeed, 5), Ok(r));
        let u = LogRecord {
            kind: LogKind::Unmap,
            pblock: 0,
            data_crc: 0,
            ..rec(6)
        };
        assert_eq!(LogRecord::decode(&u.encode(), 7, 0xfeed, 6), Ok(u));
    }

    #[test]
    fn torn_stale_misplaced_and_empty_records_end_the_log() {
        let b = rec(5).encode();
        assert_eq!(
            LogRecord::decode(&[0u8; 64], 7, 0xfeed, 5),
            Err(RecordError::Empty)
        );
        // Torn at any byte after the magic: the checksum catches it.
        for i in 4..64 {
            let mut t = b;
            t[i] ^= 0x10;
            assert_eq!(
                LogRecord::decode(&t, 7, 0xfeed, 5),
                Err(RecordError::Checksum),
                "byte {i}"
            );
        }
        // A record of an older epoch, or of an unfinished commit with the
        // same generation but another nonce.
        assert_eq!(
            LogRecord::decode(&b, 8, 0xfeed, 5),
            Err(RecordError::Stale { generation: 7 })
        );
        assert_eq!(
            LogRecord::decode(&b, 7, 0xbeef, 5),
            Err(RecordError::Stale { generation: 7 })
        );
        assert_eq!(
            LogRecord::decode(&b, 7, 0xfeed, 4),
            Err(RecordError::Seq { seq: 5 })
        );
        let mut k = rec(5);
        k.kind = LogKind::Unmap;
        assert!(matches!(
            LogRecord::decode(&k.encode(), 7, 0xfeed, 5),
            Err(RecordError::Invalid(_))
        ));
    }
}
