//! Layers: content-addressed commits, map diffs, send/receive streams and
//! OCI image import (usage in docs/LAYERS.md, stream bytes in docs/FORMAT.md).
//!
//! - [`diff`]: compare two volumes' block maps node by node; identical
//!   subtree pointers are skipped without reading anything below them.
//! - this file: the canonical change stream of a layer against its parent,
//!   its digests, and `commit` (freeze a volume into a read-only layer).
//! - [`stream`]: `send` / `receive`.
//! - [`image`]: import of OCI image layouts and `docker save` tarballs.
//!
//! # Digests
//! A layer's *diff digest* is the sha256 of its canonical change stream: the
//! 4 KiB granules whose content differs from the parent's (the parent reads
//! as zeros where it has nothing), in ascending order, each as data or as
//! "zero". It is a function of the two contents only: not of the pool's
//! block size, of which physical blocks hold the data, or of whether a block
//! was rewritten with the bytes it already had. The *chain digest* is derived
//! as OCI derives a ChainID: the diff digest for a layer without parent, else
//! `sha256("sha256:<parent chain hex> sha256:<diff hex>")`.

pub mod diff;
pub mod image;
pub mod stream;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::format::VolumeRecord;
use crate::io::is_zero;
use crate::pool::Pool;

pub use diff::{ChangeKind, DiffRange, DiffSummary};

/// A sha256 digest; all zeros means "none" in volume records.
pub type Digest = [u8; 32];

/// Unit of the canonical change stream, independent of the pool's block size.
pub const GRANULE: usize = 4096;

const DIFF_MAGIC: &[u8] = b"thinpool-layer-diff-v1\n";

/// Lower-case hex of any bytes.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub use crate::format::digest_hex;

/// Parse `sha256:<64 hex>` or `<64 hex>`.
pub fn parse_digest(s: &str) -> Result<Digest> {
    let h = s.strip_prefix("sha256:").unwrap_or(s);
    let bad = || Error::InvalidArgument(format!("'{s}' is not a sha256 digest (64 hex digits)"));
    if h.len() != 64 || !h.is_ascii() {
        return Err(bad());
    }
    let mut d = [0u8; 32];
    for (i, out) in d.iter_mut().enumerate() {
        *out = u8::from_str_radix(&h[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(d)
}

pub fn sha256(data: &[u8]) -> Digest {
    Sha256::digest(data).into()
}

/// OCI ChainID rule: `chain(L0) = diff(L0)`,
/// `chain(Ln) = sha256("sha256:" + chain(Ln-1) + " sha256:" + diff(Ln))`.
pub fn chain_digest(parent_chain: Option<&Digest>, diff: &Digest) -> Digest {
    match parent_chain {
        None => *diff,
        Some(p) => sha256(format!("sha256:{} sha256:{}", hex(p), hex(diff)).as_bytes()),
    }
}

/// The digests of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerDigests {
    pub diff: Digest,
    pub chain: Digest,
    /// Chain digest of the parent layer (None: the layer has no parent).
    pub parent_chain: Option<Digest>,
}

/// What `commit` made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    pub name: String,
    pub parent: Option<String>,
    pub diff_digest: String,
    pub chain_digest: String,
    /// Bytes of changed 4 KiB granules against the parent (data and zeroed).
    pub changed_bytes: u64,
}

/// One changed granule run of the canonical change stream.
pub enum Change<'a> {
    /// The layer has these bytes at `offset` (granule-aligned; the last
    /// granule of a volume may be shorter than 4 KiB).
    Data { offset: u64, data: &'a [u8] },
    /// The layer reads zeros in `offset..offset + len` where the parent did not.
    Zero { offset: u64, len: u64 },
}

/// Feeds the canonical change stream into sha256.
pub struct DiffHasher {
    h: Sha256,
    bytes: u64,
}

impl DiffHasher {
    pub fn new(virtual_size: u64) -> DiffHasher {
        let mut h = Sha256::new();
        h.update(DIFF_MAGIC);
        h.update(virtual_size.to_le_bytes());
        DiffHasher { h, bytes: 0 }
    }

    /// Add a change; data is split into granules, all-zero granules count as zero.
    pub fn add(&mut self, c: &Change<'_>) {
        match *c {
            Change::Data { offset, data } => {
                for (i, g) in data.chunks(GRANULE).enumerate() {
                    let off = offset + (i * GRANULE) as u64;
                    self.granule(off, (!is_zero(g)).then_some(g), g.len() as u64);
                }
            }
            Change::Zero { offset, len } => {
                let mut off = offset;
                while off < offset + len {
                    self.granule(off, None, (offset + len - off).min(GRANULE as u64));
                    off += GRANULE as u64;
                }
            }
        }
    }

    fn granule(&mut self, offset: u64, data: Option<&[u8]>, len: u64) {
        self.h.update(offset.to_le_bytes());
        match data {
            None => self.h.update([0u8]),
            Some(d) => {
                self.h.update([1u8]);
                self.h.update(d);
            }
        }
        self.bytes += len;
    }

    pub fn finish(self) -> Digest {
        self.h.finalize().into()
    }
}

fn read_block(pool: &Pool, pblock: u64, buf: &mut [u8]) -> Result<()> {
    if pblock == 0 {
        buf.fill(0);
        return Ok(());
    }
    crate::io::read_pointed(
        pool.storage(),
        buf,
        pblock * pool.block_size() as u64,
        || format!("data block {pblock}"),
    )
}

/// Walk the canonical changes of `layer` against `parent` (None: against
/// an empty volume), in ascending offset order, as maximal runs of
/// consecutive data granules (at most `max_run` bytes each) or zero granules.
/// Only blocks whose map entries differ are read.
pub fn for_each_change(
    pool: &mut Pool,
    parent: Option<&VolumeRecord>,
    layer: &VolumeRecord,
    max_run: usize,
    f: &mut dyn FnMut(Change<'_>) -> Result<()>,
) -> Result<()> {
    let bs = pool.block_size() as usize;
    let size = layer.size;
    if let Some(p) = parent {
        if p.size > layer.size {
            return Err(Error::InvalidArgument(format!(
                "'{}' ({} bytes) is larger than '{}' ({} bytes): a layer cannot shrink its parent",
                p.name, p.size, layer.name, layer.size
            )));
        }
    }
    let a = parent
        .map(|p| diff::Tree::of(p, pool.block_size()))
        .unwrap_or(diff::Tree::EMPTY);
    let b = diff::Tree::of(layer, pool.block_size());
    let mut blocks = Vec::new();
    diff::changed_blocks(&pool.view(), a, b, &mut |c| {
        blocks.push(c);
        Ok(())
    })?;
    let max_run = max_run.max(GRANULE) / GRANULE * GRANULE;
    let mut old = vec![0u8; bs];
    let mut new = vec![0u8; bs];
    // Pending run: (offset, data bytes) or (offset, zero length).
    let mut run_data: Vec<u8> = Vec::new();
    let mut run: Run = None;
    for c in blocks {
        let start = c.vblock * bs as u64;
        if start >= size {
            continue;
        }
        read_block(pool, c.a, &mut old)?;
        read_block(pool, c.b, &mut new)?;
        let valid = (size - start).min(bs as u64) as usize;
        for g in (0..valid).step_by(GRANULE) {
            let end = (g + GRANULE).min(valid);
            let (o, n) = (&old[g..end], &new[g..end]);
            if o == n {
                continue;
            }
            let off = start + g as u64;
            let is_data = !is_zero(n);
            let glen = (end - g) as u64;
            let extends = matches!(run, Some((ro, rd, rl)) if rd == is_data && ro + rl == off
                && (!is_data || (rl as usize) < max_run));
            if extends {
                let r = run.as_mut().expect("run exists");
                r.2 += glen;
            } else {
                flush_run(&mut run, &mut run_data, f)?;
                run = Some((off, is_data, glen));
            }
            if is_data {
                run_data.extend_from_slice(n);
            }
        }
    }
    flush_run(&mut run, &mut run_data, f)
}

type Run = Option<(u64, bool, u64)>; // (offset, is_data, len)

fn flush_run(
    run: &mut Run,
    data: &mut Vec<u8>,
    f: &mut dyn FnMut(Change<'_>) -> Result<()>,
) -> Result<()> {
    if let Some((offset, is_data, len)) = run.take() {
        if is_data {
            f(Change::Data { offset, data })?;
            data.clear();
        } else {
            f(Change::Zero { offset, len })?;
        }
    }
    Ok(())
}

/// Compute the digests `layer` has against `parent` (whose chain digest is
/// `parent_chain`). Returns the digests and the changed bytes.
pub fn compute_digests(
    pool: &mut Pool,
    parent: Option<&VolumeRecord>,
    layer: &VolumeRecord,
) -> Result<(LayerDigests, u64)> {
    let parent_chain = match parent {
        None => None,
        Some(p) => Some(layer_chain(p)?),
    };
    let mut h = DiffHasher::new(layer.size);
    for_each_change(pool, parent, layer, 1 << 20, &mut |c| {
        h.add(&c);
        Ok(())
    })?;
    let bytes = h.bytes;
    let diff = h.finish();
    let chain = chain_digest(parent_chain.as_ref(), &diff);
    Ok((
        LayerDigests {
            diff,
            chain,
            parent_chain,
        },
        bytes,
    ))
}

/// The chain digest of a committed layer, or an error saying to commit it.
fn layer_chain(r: &VolumeRecord) -> Result<Digest> {
    if r.chain_digest == [0; 32] {
        return Err(Error::InvalidArgument(format!(
            "'{}' is not a committed layer (run `thinpool commit` on it first)",
            r.name
        )));
    }
    Ok(r.chain_digest)
}

/// The record of the parent a layer's changes are counted against.
pub(crate) fn parent_record(pool: &Pool, r: &VolumeRecord) -> Result<Option<VolumeRecord>> {
    if r.parent_id == 0 {
        return Ok(None);
    }
    match pool.record_by_id(r.parent_id) {
        Ok(p) => Ok(Some(p.clone())),
        Err(_) => Err(Error::InvalidArgument(format!(
            "the volume '{}' was cloned from has been removed, so its changes cannot be computed",
            r.name
        ))),
    }
}

/// A committed layer with this chain digest, if the pool has one.
pub fn find_layer(pool: &Pool, chain: &Digest) -> Option<String> {
    if *chain == [0; 32] {
        return None;
    }
    pool.records()
        .find(|r| r.read_only && r.chain_digest == *chain)
        .map(|r| r.name.clone())
}

/// Record digests on a volume and make it read-only (committed by the caller).
pub(crate) fn set_layer(pool: &mut Pool, name: &str, d: &LayerDigests) -> Result<()> {
    let id = pool.lookup(name)?;
    pool.mark_layer(id, d.diff, d.chain)
}

/// containerd's Commit: freeze the writable volume `name` into a read-only
/// layer, record its digests against its parent, and rename it to `as_name`
/// if given. The parent (the volume it was cloned from) must itself be a
/// committed layer; a volume without parent is a base layer.
pub fn commit(pool: &mut Pool, name: &str, as_name: Option<&str>) -> Result<LayerInfo> {
    let r = pool.record(name)?.clone();
    if r.chain_digest != [0; 32] {
        return Err(Error::InvalidArgument(format!(
            "'{name}' is already a committed layer"
        )));
    }
    if let Some(n) = as_name {
        crate::catalog::validate_name(n)?;
        if n != name && pool.lookup(n).is_ok() {
            return Err(Error::VolumeExists(n.to_string()));
        }
    }
    let parent = parent_record(pool, &r)?;
    let (d, changed) = compute_digests(pool, parent.as_ref(), &r)?;
    set_layer(pool, name, &d)?;
    let final_name = match as_name {
        Some(n) if n != name => {
            pool.rename_volume(name, n)?;
            n.to_string()
        }
        _ => name.to_string(),
    };
    pool.commit()?;
    Ok(LayerInfo {
        name: final_name,
        parent: parent.map(|p| p.name),
        diff_digest: hex(&d.diff),
        chain_digest: hex(&d.chain),
        changed_bytes: changed,
    })
}

/// Changed block ranges between volumes `a` and `b`, from their maps only.
pub fn diff_volumes(pool: &mut Pool, a: &str, b: &str) -> Result<Vec<DiffRange>> {
    let ra = pool.record(a)?.clone();
    let rb = pool.record(b)?.clone();
    let bs = pool.block_size();
    diff::ranges(
        &pool.view(),
        diff::Tree::of(&ra, bs),
        diff::Tree::of(&rb, bs),
    )
}
