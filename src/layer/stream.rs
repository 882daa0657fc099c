//! Send streams (`zfs send -i` / `receive`): a layer's changes against a
//! base layer (or against nothing: a full stream), verified range by range
//! and as a whole. Byte layout: docs/FORMAT.md, "Send stream".

use std::io::{ErrorKind, Read, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    chain_digest, compute_digests, find_layer, for_each_change, hex, parent_record, set_layer,
    Change, DiffHasher, Digest, LayerDigests, GRANULE,
};
use crate::error::{Error, Result};
use crate::format::VolumeRecord;
use crate::pool::{Pool, MAX_VOLUME_SIZE};

pub const MAGIC: [u8; 8] = *b"THINSEND";
pub const VERSION: u32 = 1;
/// Largest data range in a stream (the receiver's buffer).
pub const MAX_DATA_RANGE: usize = 1 << 20;
const FLAG_INCREMENTAL: u32 = 1;
const TAG_DATA: u8 = b'D';
const TAG_ZERO: u8 = b'Z';
const TAG_END: u8 = b'E';
const NAME_MAX: usize = crate::format::NAME_MAX;

/// The stream header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Block size of the sending pool (informational: digests and ranges do
    /// not depend on it, so any pool can receive the stream).
    pub block_size: u32,
    pub virtual_size: u64,
    /// Chain digest of the base layer the receiver must have (incremental).
    pub parent_chain: Option<Digest>,
    pub diff: Digest,
    pub chain: Digest,
    /// Name of the layer on the sending side.
    pub name: String,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160);
        b.extend_from_slice(&MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&(GRANULE as u32).to_le_bytes());
        let flags = if self.parent_chain.is_some() {
            FLAG_INCREMENTAL
        } else {
            0
        };
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&self.virtual_size.to_le_bytes());
        b.extend_from_slice(&self.parent_chain.unwrap_or([0; 32]));
        b.extend_from_slice(&self.diff);
        b.extend_from_slice(&self.chain);
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        let sum = super::sha256(&b);
        b.extend_from_slice(&sum);
        b
    }

    fn decode(r: &mut HashReader<'_>) -> Result<Header> {
        let mut fixed = [0u8; 8 + 4 * 4 + 8 + 3 * 32 + 2];
        r.read_exact(&mut fixed, "the header")?;
        if fixed[..8] != MAGIC {
            return Err(bad("this is not a thinpool send stream (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(fixed[o..o + 4].try_into().unwrap());
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "send stream version {version} is not supported (this build reads version {VERSION})"
            )));
        }
        let name_len = u16::from_le_bytes(fixed[fixed.len() - 2..].try_into().unwrap()) as usize;
        if name_len > NAME_MAX {
            return Err(bad("send stream header is corrupt (name too long)"));
        }
        let mut name = vec![0u8; name_len];
        r.read_exact(&mut name, "the header")?;
        let mut sum = [0u8; 32];
        let mut h = Sha256::new();
        h.update(fixed);
        h.update(&name);
        r.read_exact(&mut sum, "the header")?;
        if Digest::from(h.finalize()) != sum {
            return Err(bad("send stream header is corrupt (checksum mismatch)"));
        }
        let flags = u32_at(20);
        let digest_at = |o: usize| -> Digest { fixed[o..o + 32].try_into().unwrap() };
        let hdr = Header {
            block_size: u32_at(12),
            virtual_size: u64::from_le_bytes(fixed[24..32].try_into().unwrap()),
            parent_chain: (flags & FLAG_INCREMENTAL != 0).then(|| digest_at(32)),
            diff: digest_at(64),
            chain: digest_at(96),
            name: String::from_utf8(name)
                .map_err(|_| bad("send stream header: name is not UTF-8"))?,
        };
        if u32_at(16) != GRANULE as u32 {
            return Err(bad(format!(
                "send stream granule {} is not supported",
                u32_at(16)
            )));
        }
        if flags & !FLAG_INCREMENTAL != 0 {
            return Err(bad(format!("send stream has unknown flags {flags:#x}")));
        }
        if hdr.virtual_size == 0 || hdr.virtual_size > MAX_VOLUME_SIZE {
            return Err(bad("send stream header has an invalid virtual size"));
        }
        if chain_digest(hdr.parent_chain.as_ref(), &hdr.diff) != hdr.chain {
            return Err(bad("send stream header is inconsistent: chain digest does not follow from its parent and diff digests"));
        }
        Ok(hdr)
    }
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Layer(msg.into())
}

/// What `send` wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendReport {
    pub name: String,
    pub base: Option<String>,
    pub diff_digest: String,
    pub chain_digest: String,
    pub parent_chain_digest: Option<String>,
    pub ranges: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub stream_bytes: u64,
    pub stream_digest: String,
}

/// What `receive` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiveReport {
    /// The layer holding the stream's content (an existing one if `!stored`).
    pub name: String,
    /// False when a layer with the same chain digest was already in the pool.
    pub stored: bool,
    pub base: Option<String>,
    pub diff_digest: String,
    pub chain_digest: String,
    pub ranges: u64,
    pub data_bytes: u64,
    pub stream_bytes: u64,
}

struct HashWriter<'a> {
    out: &'a mut dyn Write,
    h: Sha256,
    n: u64,
}

impl HashWriter<'_> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b)?;
        self.h.update(b);
        self.n += b.len() as u64;
        Ok(())
    }
}

struct HashReader<'a> {
    inp: &'a mut dyn Read,
    h: Sha256,
    n: u64,
    progress: &'a mut dyn FnMut(u64),
}

impl HashReader<'_> {
    /// Read exactly `buf.len()` bytes (hashed); a short stream is "truncated".
    fn read_exact(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        self.read_raw(buf, what)?;
        self.h.update(&*buf);
        Ok(())
    }

    fn read_raw(&mut self, buf: &mut [u8], what: &str) -> Result<()> {
        match self.inp.read_exact(buf) {
            Ok(()) => {
                self.n += buf.len() as u64;
                (self.progress)(buf.len() as u64);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => Err(bad(format!(
                "send stream is truncated: it ends inside {what} (after about {} bytes)",
                self.n
            ))),
            Err(e) => Err(Error::Io(e)),
        }
    }
}

fn record_sum(tag: u8, offset: u64, len: u64, data: &[u8]) -> Digest {
    let mut h = Sha256::new();
    h.update([tag]);
    h.update(offset.to_le_bytes());
    h.update(len.to_le_bytes());
    h.update(data);
    h.finalize().into()
}

/// Write the stream of layer `name` against `from` (a committed layer, the
/// receiver's base) or, without `from`, a full stream. `progress` gets the
/// number of bytes written as they go.
pub fn send(
    pool: &mut Pool,
    name: &str,
    from: Option<&str>,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64),
) -> Result<SendReport> {
    let layer = pool.record(name)?.clone();
    let base: Option<VolumeRecord> = match from {
        None => None,
        Some(b) => {
            let r = pool.record(b)?.clone();
            if r.chain_digest == [0; 32] {
                return Err(Error::InvalidArgument(format!(
                    "base '{b}' is not a committed layer; a receiver could not recognise it (commit it first)"
                )));
            }
            if r.id == layer.id {
                return Err(Error::InvalidArgument(format!(
                    "'{name}' cannot be sent against itself"
                )));
            }
            Some(r)
        }
    };
    // The recorded digests hold when the base is the layer's own parent.
    let recorded = layer.chain_digest != [0; 32]
        && match &base {
            None => layer.parent_id == 0,
            Some(b) => b.id == layer.parent_id,
        };
    let digests = if recorded {
        LayerDigests {
            diff: layer.diff_digest,
            chain: layer.chain_digest,
            parent_chain: base.as_ref().map(|b| b.chain_digest),
        }
    } else {
        compute_digests(pool, base.as_ref(), &layer)?.0
    };
    let hdr = Header {
        block_size: pool.block_size(),
        virtual_size: layer.size,
        parent_chain: digests.parent_chain,
        diff: digests.diff,
        chain: digests.chain,
        name: layer.name.clone(),
    };
    let mut w = HashWriter {
        out,
        h: Sha256::new(),
        n: 0,
    };
    w.put(&hdr.encode())?;
    progress(w.n);
    let mut check = DiffHasher::new(layer.size);
    let (mut ranges, mut data_bytes, mut zero_bytes) = (0u64, 0u64, 0u64);
    for_each_change(pool, base.as_ref(), &layer, MAX_DATA_RANGE, &mut |c| {
        check.add(&c);
        let before = w.n;
        match c {
            Change::Data { offset, data } => {
                let len = data.len() as u64;
                w.put(&[TAG_DATA])?;
                w.put(&offset.to_le_bytes())?;
                w.put(&(len as u32).to_le_bytes())?;
                w.put(data)?;
                w.put(&record_sum(TAG_DATA, offset, len, data))?;
                data_bytes += len;
            }
            Change::Zero { offset, len } => {
                w.put(&[TAG_ZERO])?;
                w.put(&offset.to_le_bytes())?;
                w.put(&len.to_le_bytes())?;
                w.put(&record_sum(TAG_ZERO, offset, len, &[]))?;
                zero_bytes += len;
            }
        }
        ranges += 1;
        progress(w.n - before);
        Ok(())
    })?;
    if check.finish() != digests.diff {
        // The trailer is not written, so no receiver accepts what went out.
        return Err(Error::Corrupt(format!(
            "the content of '{name}' does not match its recorded diff digest {}",
            hex(&digests.diff)
        )));
    }
    w.put(&[TAG_END])?;
    w.put(&ranges.to_le_bytes())?;
    w.put(&data_bytes.to_le_bytes())?;
    let sum: Digest = w.h.clone().finalize().into();
    w.out.write_all(&sum)?;
    w.out.flush()?;
    let total = w.n + 32;
    progress(32);
    Ok(SendReport {
        name: layer.name,
        base: base.map(|b| b.name),
        diff_digest: hex(&digests.diff),
        chain_digest: hex(&digests.chain),
        parent_chain_digest: digests.parent_chain.map(|d| hex(&d)),
        ranges,
        data_bytes,
        zero_bytes,
        stream_bytes: total,
        stream_digest: hex(&sum),
    })
}

/// Read and check the records after the header, handing each verified range
/// to `apply` (None when only verifying). Returns (ranges, data bytes).
fn read_records(
    r: &mut HashReader<'_>,
    size: u64,
    apply: &mut dyn FnMut(Change<'_>) -> Result<()>,
) -> Result<(u64, u64)> {
    let (mut ranges, mut data_bytes, mut end) = (0u64, 0u64, 0u64);
    let mut buf = Vec::new();
    loop {
        let mut tag = [0u8; 1];
        r.read_exact(&mut tag, "a range record")?;
        match tag[0] {
            TAG_DATA | TAG_ZERO => {
                let mut off = [0u8; 8];
                r.read_exact(&mut off, "a range record")?;
                let offset = u64::from_le_bytes(off);
                let len = if tag[0] == TAG_DATA {
                    let mut l = [0u8; 4];
                    r.read_exact(&mut l, "a range record")?;
                    u32::from_le_bytes(l) as u64
                } else {
                    let mut l = [0u8; 8];
                    r.read_exact(&mut l, "a range record")?;
                    u64::from_le_bytes(l)
                };
                let at = ranges + 1;
                let range_end = offset.checked_add(len).filter(|&e| e <= size);
                if len == 0
                    || offset % GRANULE as u64 != 0
                    || offset < end
                    || range_end.is_none()
                    || (tag[0] == TAG_DATA && len > MAX_DATA_RANGE as u64)
                {
                    return Err(bad(format!(
                        "send stream is corrupt: range {at} ({offset}+{len}) is out of order, unaligned or out of bounds"
                    )));
                }
                buf.clear();
                if tag[0] == TAG_DATA {
                    buf.resize(len as usize, 0);
                    r.read_exact(&mut buf, "range data")?;
                }
                let mut sum = [0u8; 32];
                r.read_exact(&mut sum, "a range checksum")?;
                if record_sum(tag[0], offset, len, &buf) != sum {
                    return Err(bad(format!(
                        "send stream is corrupt: range {at} (bytes {offset}..{}) fails its sha256 check",
                        offset + len
                    )));
                }
                end = offset + len;
                ranges += 1;
                if tag[0] == TAG_DATA {
                    data_bytes += len;
                    apply(Change::Data { offset, data: &buf })?;
                } else {
                    apply(Change::Zero { offset, len })?;
                }
            }
            TAG_END => {
                let mut counts = [0u8; 16];
                r.read_exact(&mut counts, "the trailer")?;
                let n = u64::from_le_bytes(counts[..8].try_into().unwrap());
                let d = u64::from_le_bytes(counts[8..].try_into().unwrap());
                let expect: Digest = r.h.clone().finalize().into();
                let mut sum = [0u8; 32];
                r.read_raw(&mut sum, "the trailer")?;
                if sum != expect {
                    return Err(bad("send stream is corrupt: the digest of the whole stream does not match its trailer"));
                }
                if n != ranges || d != data_bytes {
                    return Err(bad(
                        "send stream is corrupt: the trailer's range count does not match",
                    ));
                }
                let mut extra = [0u8; 1];
                loop {
                    match r.inp.read(&mut extra) {
                        Ok(0) => break,
                        Ok(_) => {
                            return Err(bad("send stream has trailing bytes after its trailer"))
                        }
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) => return Err(Error::Io(e)),
                    }
                }
                return Ok((ranges, data_bytes));
            }
            t => {
                return Err(bad(format!(
                    "send stream is corrupt: unknown record type {t:#04x} after {ranges} ranges"
                )))
            }
        }
    }
}

/// Remove what a receive that died (killed, power cut) left behind: its
/// temporary volume was committed, but its process is gone.
fn remove_stale_receives(pool: &mut Pool) -> Result<()> {
    let stale: Vec<String> = pool
        .volume_names()
        .into_iter()
        .map(|(_, n)| n)
        .filter(|n| {
            let Some(pid) = n
                .strip_prefix("receiving.")
                .and_then(|r| r.split('.').next())
            else {
                return false;
            };
            let Ok(pid) = pid.parse::<i32>() else {
                return false;
            };
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
            pid != std::process::id() as i32 && !alive
        })
        .collect();
    for n in stale {
        pool.remove_volume(&n)?;
    }
    Ok(())
}

fn temp_name() -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "receiving.{}.{:x}",
        std::process::id(),
        t & 0xffff_ffff_ffff
    )
}

/// Receive a stream into a new read-only layer named `name` (default: the
/// sender's name). Everything is verified; on any error nothing is left in
/// the pool. A layer whose chain digest the pool already has is not stored
/// again (the stream is still read and verified).
pub fn receive(
    pool: &mut Pool,
    name: Option<&str>,
    input: &mut dyn Read,
    progress: &mut dyn FnMut(u64),
) -> Result<ReceiveReport> {
    remove_stale_receives(pool)?;
    let mut r = HashReader {
        inp: input,
        h: Sha256::new(),
        n: 0,
        progress,
    };
    let hdr = Header::decode(&mut r)?;
    let target = name.map(str::to_string).unwrap_or_else(|| hdr.name.clone());
    crate::catalog::validate_name(&target)?;
    let base = match &hdr.parent_chain {
        None => None,
        Some(pc) => match find_layer(pool, pc) {
            Some(n) => Some(pool.record(&n)?.clone()),
            None => {
                return Err(bad(format!(
                    "the base layer of this incremental stream (chain digest sha256:{}) is not in the pool; receive the stream of its base first",
                    hex(pc)
                )))
            }
        },
    };
    if let Some(b) = &base {
        if b.size > hdr.virtual_size {
            return Err(bad(format!(
                "the stream's volume ({} bytes) is smaller than its base '{}' ({} bytes)",
                hdr.virtual_size, b.name, b.size
            )));
        }
    }
    let report = |name: String, stored: bool, ranges: u64, data: u64, n: u64| ReceiveReport {
        name,
        stored,
        base: base.as_ref().map(|b| b.name.clone()),
        diff_digest: hex(&hdr.diff),
        chain_digest: hex(&hdr.chain),
        ranges,
        data_bytes: data,
        stream_bytes: n,
    };
    if let Some(existing) = find_layer(pool, &hdr.chain) {
        let (ranges, data) = read_records(&mut r, hdr.virtual_size, &mut |_| Ok(()))?;
        return Ok(report(existing, false, ranges, data, r.n));
    }
    if pool.lookup(&target).is_ok() {
        return Err(Error::VolumeExists(target));
    }
    let tmp = temp_name();
    match &base {
        Some(b) => {
            pool.snapshot(&b.name, &tmp, true)?;
            if hdr.virtual_size > b.size {
                if let Err(e) = pool.resize_volume(&tmp, hdr.virtual_size) {
                    let _ = pool.remove_volume(&tmp);
                    return Err(e);
                }
            }
        }
        None => {
            pool.create_volume(&tmp, hdr.virtual_size)?;
        }
    }
    let result = (|| -> Result<(u64, u64)> {
        let id = pool.lookup(&tmp)?;
        let counts = read_records(&mut r, hdr.virtual_size, &mut |c| match c {
            Change::Data { offset, data } => pool.write(id, offset, data),
            Change::Zero { offset, len } => pool.discard(id, offset, len),
        })?;
        // The stream checked out; now check the layer it built.
        let rec = pool.record_by_id(id)?.clone();
        let parent = parent_record(pool, &rec)?;
        let (d, _) = compute_digests(pool, parent.as_ref(), &rec)?;
        if d.diff != hdr.diff || d.chain != hdr.chain {
            return Err(bad(format!(
                "the received layer's digests (diff sha256:{}) do not match the stream's (diff sha256:{})",
                hex(&d.diff),
                hex(&hdr.diff)
            )));
        }
        set_layer(pool, &tmp, &d)?;
        pool.rename_volume(&tmp, &target)?;
        pool.commit()?;
        Ok(counts)
    })();
    match result {
        Ok((ranges, data)) => Ok(report(target, true, ranges, data, r.n)),
        Err(e) => {
            if pool.lookup(&tmp).is_ok() {
                let _ = pool.remove_volume(&tmp);
            } else if pool.lookup(&target).is_ok() {
                // Renamed but the commit failed: take it away again.
                let _ = pool.remove_volume(&target);
            }
            Err(e)
        }
    }
}
