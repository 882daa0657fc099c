//! A snapshot's record, stored as its volume's annotation (so it is committed
//! with the volume, by the same superblock). Byte map (little-endian; also in
//! docs/FORMAT.md):
//!
//! ```text
//! offset size field
//!   0    4   magic "TPSN"
//!   4    1   record version (1)
//!   5    1   kind: 1 view, 2 active, 3 committed
//!   6    2   reserved, zero
//!   8    8   created, nanoseconds since the Unix epoch (i64)
//!  16    8   updated, nanoseconds since the Unix epoch (i64)
//!  24    4   key length K (the snapshot's key, or its name once committed)
//!  28    4   parent length P (the parent's name; 0 = none)
//!  32    4   label count N
//!  36    K   key (UTF-8), then P bytes of parent (UTF-8)
//!   .    .   N labels: key length u32, value length u32, key, value (UTF-8),
//!            sorted by key
//! ```

use std::collections::BTreeMap;

use byteorder::{ByteOrder, LittleEndian as LE};

const MAGIC: [u8; 4] = *b"TPSN";
const VERSION: u8 = 1;
const HEADER: usize = 36;
/// containerd limits a label's key + value to 4096 bytes; keys are paths.
pub const TEXT_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: Kind,
    pub key: String,
    pub parent: String,
    pub created_ns: i64,
    pub updated_ns: i64,
    pub labels: BTreeMap<String, String>,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; HEADER];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.kind as u8;
        LE::write_i64(&mut b[8..16], self.created_ns);
        LE::write_i64(&mut b[16..24], self.updated_ns);
        LE::write_u32(&mut b[24..28], self.key.len() as u32);
        LE::write_u32(&mut b[28..32], self.parent.len() as u32);
        LE::write_u32(&mut b[32..36], self.labels.len() as u32);
        b.extend_from_slice(self.key.as_bytes());
        b.extend_from_slice(self.parent.as_bytes());
        for (k, v) in &self.labels {
            let mut h = [0u8; 8];
            LE::write_u32(&mut h[..4], k.len() as u32);
            LE::write_u32(&mut h[4..], v.len() as u32);
            b.extend_from_slice(&h);
            b.extend_from_slice(k.as_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        b
    }

    /// Decode, checking every length against what is there.
    pub fn decode(b: &[u8]) -> Result<Record, String> {
        if b.len() < HEADER || b[0..4] != MAGIC {
            return Err("not a snapshot record".into());
        }
        if b[4] != VERSION {
            return Err(format!("snapshot record version {} is not supported", b[4]));
        }
        let kind = match b[5] {
            1 => Kind::View,
            2 => Kind::Active,
            3 => Kind::Committed,
            k => return Err(format!("bad snapshot kind {k}")),
        };
        let mut rest = &b[HEADER..];
        let key = take_str(&mut rest, LE::read_u32(&b[24..28]) as usize)?;
        let parent = take_str(&mut rest, LE::read_u32(&b[28..32]) as usize)?;
        let n = LE::read_u32(&b[32..36]) as usize;
        let mut labels = BTreeMap::new();
        for _ in 0..n {
            if rest.len() < 8 {
                return Err("label header past the end".into());
            }
            let (kl, vl) = (
                LE::read_u32(&rest[..4]) as usize,
                LE::read_u32(&rest[4..8]) as usize,
            );
            rest = &rest[8..];
            let k = take_str(&mut rest, kl)?;
            let v = take_str(&mut rest, vl)?;
            labels.insert(k, v);
        }
        if !rest.is_empty() {
            return Err("trailing bytes after the labels".into());
        }
        if key.is_empty() {
            return Err("empty snapshot key".into());
        }
        Ok(Record {
            kind,
            key,
            parent,
            created_ns: LE::read_i64(&b[8..16]),
            updated_ns: LE::read_i64(&b[16..24]),
            labels,
        })
    }
}

fn take_str(rest: &mut &[u8], n: usize) -> Result<String, String> {
    if n > rest.len() || n > TEXT_MAX {
        return Err(format!("string of {n} bytes past the end"));
    }
    let s = std::str::from_utf8(&rest[..n])
        .map_err(|_| "string is not UTF-8".to_string())?
        .to_string();
    *rest = &rest[n..];
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_damage() {
        let r = Record {
            kind: Kind::Committed,
            key: "ns/3/sha256:abc".into(),
            parent: "ns/1/sha256:def".into(),
            created_ns: 1_700_000_000_123_456_789,
            updated_ns: 1_700_000_001_000_000_000,
            labels: [("containerd.io/snapshot.ref".into(), "sha256:abc".into())].into(),
        };
        let b = r.encode();
        assert_eq!(Record::decode(&b).unwrap(), r);
        for cut in [0, 10, HEADER, b.len() - 1] {
            assert!(Record::decode(&b[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = b.clone();
        bad[5] = 9;
        assert!(Record::decode(&bad).is_err());
        let mut bad = b.clone();
        LE::write_u32(&mut bad[32..36], 1000);
        assert!(Record::decode(&bad).is_err());
    }
}
