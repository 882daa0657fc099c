//! Just enough of ext4's on-disk format to find its journal (inode 8) and to
//! tell whether that journal is clean: read only, every field bounds-checked,
//! no checksums verified (the magic numbers are). Anything unexpected is an
//! [`Ext4Error`], never a panic: the caller then leaves the volume alone.
//!
//! ```text
//! ext4 superblock (byte 1024, little-endian)     jbd2 superblock (journal block 0, big-endian)
//!   0x00 s_inodes_count      0x04 s_blocks_count_lo   0x00 h_magic 0xC03B3998  0x04 h_blocktype
//!   0x14 s_first_data_block  0x18 s_log_block_size    0x0C s_blocksize          0x10 s_maxlen
//!   0x28 s_inodes_per_group  0x38 s_magic 0xEF53      0x14 s_first              0x1C s_start
//!   0x3A s_state             0x4C s_rev_level         0x20 s_errno
//!   0x58 s_inode_size        0x5C/0x60 compat/incompat
//!   0xE0 s_journal_inum      0xE4 s_journal_dev       inode: 0x00 i_mode  0x04 i_size_lo
//!   0xFE s_desc_size         0x150 s_blocks_count_hi         0x20 i_flags 0x28 i_block (extent root)
//!                                                            0x6C i_size_high
//! group descriptor: 0x08 bg_inode_table_lo, 0x28 bg_inode_table_hi (64-byte descriptors)
//! extent node: header (magic 0xF30A, entries, max, depth), then 12-byte entries:
//!   leaf  (ee_block u32, ee_len u16, ee_start_hi u16, ee_start_lo u32)
//!   index (ei_block u32, ei_leaf_lo u32, ei_leaf_hi u16, unused u16)
//! ```

use byteorder::{BigEndian as BE, ByteOrder, LittleEndian as LE};

//------------------------------------------------------------------------------
// Layout

const SB_OFFSET: u64 = 1024;
const SB_SIZE: usize = 1024;
const SB_INODES_COUNT: usize = 0x00;
const SB_BLOCKS_COUNT_LO: usize = 0x04;
const SB_FIRST_DATA_BLOCK: usize = 0x14;
const SB_LOG_BLOCK_SIZE: usize = 0x18;
const SB_INODES_PER_GROUP: usize = 0x28;
const SB_MAGIC: usize = 0x38;
const SB_STATE: usize = 0x3A;
const SB_REV_LEVEL: usize = 0x4C;
const SB_INODE_SIZE: usize = 0x58;
const SB_FEATURE_COMPAT: usize = 0x5C;
const SB_FEATURE_INCOMPAT: usize = 0x60;
const SB_JOURNAL_INUM: usize = 0xE0;
const SB_JOURNAL_DEV: usize = 0xE4;
const SB_DESC_SIZE: usize = 0xFE;
const SB_BLOCKS_COUNT_HI: usize = 0x150;

const EXT4_MAGIC: u16 = 0xEF53;
const STATE_VALID: u16 = 0x1;
const STATE_ERROR: u16 = 0x2;
const COMPAT_HAS_JOURNAL: u32 = 0x4;
/// The journal holds transactions not yet written back (mounted, or not
/// unmounted cleanly).
pub const INCOMPAT_RECOVER: u32 = 0x4;
const INCOMPAT_JOURNAL_DEV: u32 = 0x8;
const INCOMPAT_64BIT: u32 = 0x80;
const JOURNAL_INO: u32 = 8;

const GD_INODE_TABLE_LO: usize = 0x08;
const GD_INODE_TABLE_HI: usize = 0x28;

const I_MODE: usize = 0x00;
const I_SIZE_LO: usize = 0x04;
const I_FLAGS: usize = 0x20;
const I_BLOCK: usize = 0x28;
const I_BLOCK_LEN: usize = 60;
const I_SIZE_HIGH: usize = 0x6C;
const S_IFMT: u16 = 0xF000;
const S_IFREG: u16 = 0x8000;
const EXTENTS_FL: u32 = 0x80000;

const EXTENT_MAGIC: u16 = 0xF30A;
const EXTENT_HEADER: usize = 12;
const EXTENT_ENTRY: usize = 12;
/// ext4 allows at most 5 levels; more is a forged tree.
const EXTENT_MAX_DEPTH: u16 = 5;
/// A bound on the nodes read, so a forged tree cannot make us read forever.
const EXTENT_MAX_NODES: usize = 4096;
/// ee_len above this marks an unwritten extent of (len − this) blocks.
const EXTENT_INIT_MAX_LEN: u16 = 32768;

const JBD2_MAGIC: u32 = 0xC03B_3998;
const JBD2_SUPERBLOCK_V1: u32 = 3;
const JBD2_SUPERBLOCK_V2: u32 = 4;
const JSB_SIZE: usize = 1024;
const JSB_MAGIC: usize = 0x00;
const JSB_BLOCKTYPE: usize = 0x04;
const JSB_BLOCKSIZE: usize = 0x0C;
const JSB_MAXLEN: usize = 0x10;
const JSB_FIRST: usize = 0x14;
const JSB_START: usize = 0x1C;
const JSB_ERRNO: usize = 0x20;

//------------------------------------------------------------------------------
// Errors

/// Why a volume's journal was not found or is not known to be clean.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    #[error("reading the volume failed: {0}")]
    Read(String),
    #[error("not an ext4 file system: {0}")]
    NotExt4(String),
    #[error("unsupported ext4 layout: {0}")]
    Unsupported(String),
    #[error("the journal is not clean: {0}")]
    NotClean(String),
    #[error("corrupt ext4 metadata: {0}")]
    Corrupt(String),
}

type Result<T> = std::result::Result<T, Ext4Error>;

fn corrupt(m: impl Into<String>) -> Ext4Error {
    Ext4Error::Corrupt(m.into())
}

/// Reads `buf.len()` bytes at a byte offset of the volume.
pub trait ReadAt {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String>;
}

impl<F: FnMut(u64, &mut [u8]) -> std::result::Result<(), String>> ReadAt for F {
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        self(offset, buf)
    }
}

//------------------------------------------------------------------------------
// Superblock

/// The fields of the ext4 superblock this module uses, checked.
#[derive(Debug, Clone)]
pub struct Superblock {
    pub block_size: u64,
    pub blocks_count: u64,
    pub first_data_block: u64,
    inodes_per_group: u32,
    inode_size: u64,
    desc_size: u64,
    state: u16,
    compat: u32,
    pub incompat: u32,
    journal_inum: u32,
    journal_dev: u32,
}

impl Superblock {
    /// Read and check the superblock of a volume of `volume_size` bytes.
    pub fn read(dev: &mut impl ReadAt, volume_size: u64) -> Result<Superblock> {
        let mut b = [0u8; SB_SIZE];
        if volume_size < SB_OFFSET + SB_SIZE as u64 {
            return Err(Ext4Error::NotExt4("the volume is too small".into()));
        }
        dev.read_at(SB_OFFSET, &mut b).map_err(Ext4Error::Read)?;
        let magic = LE::read_u16(&b[SB_MAGIC..]);
        if magic != EXT4_MAGIC {
            return Err(Ext4Error::NotExt4(format!("magic {magic:#06x}")));
        }
        let log = LE::read_u32(&b[SB_LOG_BLOCK_SIZE..]);
        // 1 KiB to 64 KiB blocks.
        if log > 6 {
            return Err(corrupt(format!("s_log_block_size {log}")));
        }
        let block_size = 1024u64 << log;
        let incompat = LE::read_u32(&b[SB_FEATURE_INCOMPAT..]);
        let bits64 = incompat & INCOMPAT_64BIT != 0;
        let hi = if bits64 {
            LE::read_u32(&b[SB_BLOCKS_COUNT_HI..]) as u64
        } else {
            0
        };
        let blocks_count = (hi << 32) | LE::read_u32(&b[SB_BLOCKS_COUNT_LO..]) as u64;
        if blocks_count == 0
            || blocks_count
                .checked_mul(block_size)
                .is_none_or(|n| n > volume_size)
        {
            return Err(corrupt(format!(
                "{blocks_count} blocks of {block_size} bytes on a volume of {volume_size} bytes"
            )));
        }
        let first_data_block = LE::read_u32(&b[SB_FIRST_DATA_BLOCK..]) as u64;
        if first_data_block != u64::from(block_size == 1024) {
            return Err(corrupt(format!("s_first_data_block {first_data_block}")));
        }
        let inode_size = if LE::read_u32(&b[SB_REV_LEVEL..]) == 0 {
            128
        } else {
            LE::read_u16(&b[SB_INODE_SIZE..]) as u64
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
            return Err(corrupt(format!("inode size {inode_size}")));
        }
        let desc_size = if bits64 {
            LE::read_u16(&b[SB_DESC_SIZE..]) as u64
        } else {
            32
        };
        if !(32..=1024).contains(&desc_size) || !desc_size.is_power_of_two() {
            return Err(corrupt(format!("descriptor size {desc_size}")));
        }
        let inodes_per_group = LE::read_u32(&b[SB_INODES_PER_GROUP..]);
        if inodes_per_group == 0 || inodes_per_group > LE::read_u32(&b[SB_INODES_COUNT..]) {
            return Err(corrupt(format!("s_inodes_per_group {inodes_per_group}")));
        }
        Ok(Superblock {
            block_size,
            blocks_count,
            first_data_block,
            inodes_per_group,
            inode_size,
            desc_size,
            state: LE::read_u16(&b[SB_STATE..]),
            compat: LE::read_u32(&b[SB_FEATURE_COMPAT..]),
            incompat,
            journal_inum: LE::read_u32(&b[SB_JOURNAL_INUM..]),
            journal_dev: LE::read_u32(&b[SB_JOURNAL_DEV..]),
        })
    }

    /// The journal is inode 8 of this file system, and nothing says it holds
    /// a log to replay or that the file system has errors.
    fn check_clean(&self) -> Result<()> {
        if self.compat & COMPAT_HAS_JOURNAL == 0 {
            return Err(Ext4Error::Unsupported("no journal".into()));
        }
        if self.incompat & INCOMPAT_JOURNAL_DEV != 0 || self.journal_dev != 0 {
            return Err(Ext4Error::Unsupported("an external journal".into()));
        }
        if self.journal_inum != JOURNAL_INO {
            return Err(Ext4Error::Unsupported(format!(
                "the journal is inode {}",
                self.journal_inum
            )));
        }
        if self.incompat & INCOMPAT_RECOVER != 0 {
            return Err(Ext4Error::NotClean("needs_recovery is set".into()));
        }
        if self.state & STATE_VALID == 0 || self.state & STATE_ERROR != 0 {
            return Err(Ext4Error::NotClean(format!("s_state {:#x}", self.state)));
        }
        Ok(())
    }

    fn read_block(&self, dev: &mut impl ReadAt, block: u64, buf: &mut [u8]) -> Result<()> {
        if block >= self.blocks_count {
            return Err(corrupt(format!("block {block} is beyond the file system")));
        }
        dev.read_at(block * self.block_size, buf)
            .map_err(Ext4Error::Read)
    }
}

//------------------------------------------------------------------------------
// The journal inode and its extents

/// `len` file-system blocks of the journal from its block `logical` are at
/// block `physical`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub len: u64,
}

/// Where the journal is: its extents, sorted, covering its blocks
/// `0..blocks` without holes or overlaps, inside the file system.
#[derive(Debug, Clone)]
pub struct Journal {
    pub sb: Superblock,
    pub blocks: u64,
    pub extents: Vec<Extent>,
}

/// Find the journal's blocks (does not look at whether it is clean).
pub fn journal(dev: &mut impl ReadAt, volume_size: u64) -> Result<Journal> {
    let sb = Superblock::read(dev, volume_size)?;
    journal_of(dev, sb)
}

/// [`journal`], given the file system's superblock, already read.
fn journal_of(dev: &mut impl ReadAt, sb: Superblock) -> Result<Journal> {
    if sb.journal_inum != JOURNAL_INO || sb.compat & COMPAT_HAS_JOURNAL == 0 {
        return Err(Ext4Error::Unsupported("no journal in inode 8".into()));
    }
    let inode = read_inode(dev, &sb, JOURNAL_INO)?;
    if LE::read_u16(&inode[I_MODE..]) & S_IFMT != S_IFREG {
        return Err(corrupt("the journal inode is not a regular file"));
    }
    if LE::read_u32(&inode[I_FLAGS..]) & EXTENTS_FL == 0 {
        return Err(Ext4Error::Unsupported(
            "the journal inode has no extent tree (block map)".into(),
        ));
    }
    let size = (LE::read_u32(&inode[I_SIZE_HIGH..]) as u64) << 32
        | LE::read_u32(&inode[I_SIZE_LO..]) as u64;
    if size == 0 || !size.is_multiple_of(sb.block_size) {
        return Err(corrupt(format!("journal size {size}")));
    }
    let blocks = size / sb.block_size;
    if blocks > sb.blocks_count {
        return Err(corrupt(format!("journal of {blocks} blocks")));
    }
    let mut extents = Vec::new();
    let mut nodes = 0;
    let root = &inode[I_BLOCK..I_BLOCK + I_BLOCK_LEN];
    walk(dev, &sb, root, None, &mut nodes, &mut extents)?;
    check_extents(&sb, blocks, &mut extents)?;
    Ok(Journal {
        sb,
        blocks,
        extents,
    })
}

fn read_inode(dev: &mut impl ReadAt, sb: &Superblock, ino: u32) -> Result<Vec<u8>> {
    let index = ino - 1;
    if index >= sb.inodes_per_group {
        // Only group 0's descriptor is read (meta_bg moves the others).
        return Err(Ext4Error::Unsupported(format!(
            "{} inodes per group",
            sb.inodes_per_group
        )));
    }
    // Group 0's descriptor opens the block after the superblock's.
    let mut gd = vec![0u8; sb.block_size as usize];
    sb.read_block(dev, sb.first_data_block + 1, &mut gd)?;
    let lo = LE::read_u32(&gd[GD_INODE_TABLE_LO..]) as u64;
    let hi = if sb.desc_size >= 64 {
        LE::read_u32(&gd[GD_INODE_TABLE_HI..]) as u64
    } else {
        0
    };
    let table = (hi << 32) | lo;
    let byte = index as u64 * sb.inode_size;
    let block = table
        .checked_add(byte / sb.block_size)
        .filter(|b| *b > sb.first_data_block)
        .ok_or_else(|| corrupt(format!("inode table at block {table}")))?;
    let mut buf = vec![0u8; sb.block_size as usize];
    sb.read_block(dev, block, &mut buf)?;
    let at = (byte % sb.block_size) as usize;
    // inode_size divides block_size (both powers of two, checked).
    Ok(buf[at..at + sb.inode_size as usize].to_vec())
}

/// Collect the leaf extents under `node` (an extent header and its entries),
/// which must be at `depth` when its parent says so.
fn walk(
    dev: &mut impl ReadAt,
    sb: &Superblock,
    node: &[u8],
    depth: Option<u16>,
    nodes: &mut usize,
    out: &mut Vec<Extent>,
) -> Result<()> {
    *nodes += 1;
    if *nodes > EXTENT_MAX_NODES {
        return Err(corrupt("too many extent tree nodes"));
    }
    if LE::read_u16(&node[0..]) != EXTENT_MAGIC {
        return Err(corrupt("bad extent header magic"));
    }
    let entries = LE::read_u16(&node[2..]) as usize;
    let max = LE::read_u16(&node[4..]) as usize;
    let d = LE::read_u16(&node[6..]);
    if max > (node.len() - EXTENT_HEADER) / EXTENT_ENTRY || entries > max {
        return Err(corrupt(format!(
            "extent node with {entries} of {max} entries"
        )));
    }
    if d > EXTENT_MAX_DEPTH || depth.is_some_and(|want| want != d) {
        return Err(corrupt(format!("extent node at depth {d}")));
    }
    for i in 0..entries {
        let e = &node[EXTENT_HEADER + i * EXTENT_ENTRY..][..EXTENT_ENTRY];
        let logical = LE::read_u32(&e[0..]) as u64;
        if d == 0 {
            let raw = LE::read_u16(&e[4..]);
            let len = if raw > EXTENT_INIT_MAX_LEN {
                raw - EXTENT_INIT_MAX_LEN
            } else {
                raw
            };
            let physical = (LE::read_u16(&e[6..]) as u64) << 32 | LE::read_u32(&e[8..]) as u64;
            if len == 0 {
                return Err(corrupt("an empty extent"));
            }
            out.push(Extent {
                logical,
                physical,
                len: len as u64,
            });
        } else {
            let child = (LE::read_u16(&e[8..]) as u64) << 32 | LE::read_u32(&e[4..]) as u64;
            if child <= sb.first_data_block {
                return Err(corrupt(format!("extent node at block {child}")));
            }
            let mut buf = vec![0u8; sb.block_size as usize];
            sb.read_block(dev, child, &mut buf)?;
            walk(dev, sb, &buf, Some(d - 1), nodes, out)?;
        }
    }
    Ok(())
}

/// The extents cover the journal's blocks `0..blocks` exactly, and lie in
/// the file system past its superblock, without overlapping each other.
fn check_extents(sb: &Superblock, blocks: u64, extents: &mut [Extent]) -> Result<()> {
    extents.sort_by_key(|e| e.logical);
    let mut next = 0u64;
    for e in extents.iter() {
        if e.logical != next {
            return Err(corrupt(format!(
                "journal block {next} is not mapped (or mapped twice)"
            )));
        }
        next += e.len;
        let end = e.physical.checked_add(e.len);
        if e.physical <= sb.first_data_block || end.is_none_or(|end| end > sb.blocks_count) {
            return Err(corrupt(format!(
                "journal extent at blocks {}+{} is outside the file system's {} blocks",
                e.physical, e.len, sb.blocks_count
            )));
        }
    }
    if next != blocks {
        return Err(corrupt(format!(
            "the extents map {next} journal blocks, the inode has {blocks}"
        )));
    }
    let mut by_physical: Vec<&Extent> = extents.iter().collect();
    by_physical.sort_by_key(|e| e.physical);
    if by_physical
        .windows(2)
        .any(|w| w[0].physical + w[0].len > w[1].physical)
    {
        return Err(corrupt("journal extents overlap"));
    }
    Ok(())
}

//------------------------------------------------------------------------------
// The dead log

/// A clean journal's log: every journal block but its superblock (block 0),
/// as file-system block runs. Dead because nothing reads it: with
/// `s_start == 0` a mount starts a new log and e2fsck replays nothing.
#[derive(Debug, Clone)]
pub struct DeadLog {
    pub block_size: u64,
    /// The journal superblock's file-system block (kept).
    pub superblock: u64,
    pub runs: Vec<Extent>,
}

/// The dead log of an unmounted, clean ext4 file system; an error when
/// anything says otherwise or does not add up.
pub fn dead_log(dev: &mut impl ReadAt, volume_size: u64) -> Result<DeadLog> {
    let sb = Superblock::read(dev, volume_size)?;
    sb.check_clean()?;
    let j = journal_of(dev, sb)?;
    let sb = &j.sb;
    let first = j.extents[0];
    let mut b = vec![0u8; JSB_SIZE.min(sb.block_size as usize)];
    sb.read_block(dev, first.physical, &mut b)?;
    let magic = BE::read_u32(&b[JSB_MAGIC..]);
    if magic != JBD2_MAGIC {
        return Err(corrupt(format!("jbd2 magic {magic:#010x}")));
    }
    let kind = BE::read_u32(&b[JSB_BLOCKTYPE..]);
    if kind != JBD2_SUPERBLOCK_V1 && kind != JBD2_SUPERBLOCK_V2 {
        return Err(corrupt(format!("jbd2 superblock type {kind}")));
    }
    let bs = BE::read_u32(&b[JSB_BLOCKSIZE..]) as u64;
    let maxlen = BE::read_u32(&b[JSB_MAXLEN..]) as u64;
    let first_log = BE::read_u32(&b[JSB_FIRST..]) as u64;
    if bs != sb.block_size || maxlen > j.blocks || first_log == 0 || first_log >= maxlen {
        return Err(corrupt(format!(
            "jbd2 superblock: block size {bs}, {maxlen} blocks, log from {first_log} \
             (the journal inode: {} blocks of {})",
            j.blocks, sb.block_size
        )));
    }
    let start = BE::read_u32(&b[JSB_START..]);
    if start != 0 {
        return Err(Ext4Error::NotClean(format!(
            "the log starts at journal block {start}"
        )));
    }
    let errno = BE::read_u32(&b[JSB_ERRNO..]);
    if errno != 0 {
        return Err(Ext4Error::NotClean(format!(
            "the journal records error {errno}"
        )));
    }
    let runs = j
        .extents
        .iter()
        .filter_map(|e| {
            // Drop journal block 0 (the journal's superblock).
            let skip = u64::from(e.logical == 0);
            (e.len > skip).then(|| Extent {
                logical: e.logical + skip,
                physical: e.physical + skip,
                len: e.len - skip,
            })
        })
        .collect();
    Ok(DeadLog {
        block_size: sb.block_size,
        superblock: first.physical,
        runs,
    })
}

impl DeadLog {
    /// The byte ranges to unmap on a volume of `pool_block`-byte blocks:
    /// the whole pool blocks inside the runs (a partial one would be a
    /// write of zeros, and the one holding the journal's superblock is kept).
    pub fn pool_ranges(&self, pool_block: u64) -> Vec<(u64, u64)> {
        self.runs
            .iter()
            .filter_map(|r| {
                let start = (r.physical * self.block_size).div_ceil(pool_block) * pool_block;
                let end = (r.physical + r.len) * self.block_size / pool_block * pool_block;
                (start < end).then_some((start, end - start))
            })
            .collect()
    }

    /// File-system blocks in the runs.
    pub fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum()
    }
}

//------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    //! On real file systems made by mkfs.ext4 in temp files (root for the
    //! mounting ones; they fail otherwise, like the other root tests).

    use super::*;
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::process::Command;

    struct Image {
        _dir: tempfile::TempDir,
        path: PathBuf,
        size: u64,
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn mkfs(size: u64, args: &[&str]) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fs.img");
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        run(Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .args(args)
            .arg(&path));
        Image {
            _dir: dir,
            path,
            size,
        }
    }

    /// The snapshotter's template options.
    fn template(size: u64) -> Image {
        mkfs(
            size,
            &[
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1,nodiscard,packed_meta_blocks=1",
            ],
        )
    }

    fn reader(path: &Path) -> impl FnMut(u64, &mut [u8]) -> std::result::Result<(), String> {
        let f = std::fs::File::open(path).unwrap();
        move |off, buf| f.read_exact_at(buf, off).map_err(|e| e.to_string())
    }

    /// The journal's extents as `debugfs -R 'stat <8>'` prints them:
    /// `(0-957):129091-130048, (958):131000, (ETB0):134211, …`.
    fn debugfs_extents(path: &Path) -> Vec<Extent> {
        let out = run(Command::new("debugfs").args(["-R", "stat <8>"]).arg(path));
        let list = out
            .split("EXTENTS:")
            .nth(1)
            .expect("EXTENTS in debugfs's output");
        let range = |s: &str| -> (u64, u64) {
            match s.split_once('-') {
                Some((a, b)) => (a.trim().parse().unwrap(), b.trim().parse().unwrap()),
                None => {
                    let a = s.trim().parse().unwrap();
                    (a, a)
                }
            }
        };
        list.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty() && !e.starts_with("(ETB"))
            .map(|e| {
                let (l, p) = e.split_once(':').unwrap();
                let (l0, l1) = range(l.trim_matches(|c| c == '(' || c == ')'));
                let (p0, p1) = range(p);
                assert_eq!(l1 - l0, p1 - p0, "{e}");
                Extent {
                    logical: l0,
                    physical: p0,
                    len: l1 - l0 + 1,
                }
            })
            .collect()
    }

    fn patch(img: &Image, offset: u64, bytes: &[u8]) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&img.path)
            .unwrap();
        f.write_all_at(bytes, offset).unwrap();
    }

    fn read_bytes(img: &Image, offset: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        reader(&img.path)(offset, &mut b).unwrap();
        b
    }

    fn dead(img: &Image) -> Result<DeadLog> {
        dead_log(&mut reader(&img.path), img.size)
    }

    #[test]
    fn journal_extents_match_debugfs() {
        // The template (one extent), 1 KiB blocks (three), and small groups
        // without flex_bg (18 extents under an index node: depth 1).
        let images = [
            template(1 << 30),
            mkfs(256 << 20, &["-b", "1024", "-J", "size=64"]),
            mkfs(
                256 << 20,
                &[
                    "-b", "1024", "-g", "1024", "-O", "^flex_bg", "-J", "size=16",
                ],
            ),
        ];
        for img in &images {
            let j = journal(&mut reader(&img.path), img.size).unwrap();
            assert_eq!(j.extents, debugfs_extents(&img.path));
            assert_eq!(j.blocks, j.extents.iter().map(|e| e.len).sum::<u64>());
            let log = dead(img).unwrap();
            assert_eq!(log.superblock, j.extents[0].physical);
            assert_eq!(log.blocks(), j.blocks - 1);
        }
        assert!(
            images[2].size > 0
                && journal(&mut reader(&images[2].path), images[2].size)
                    .unwrap()
                    .extents
                    .len()
                    > 4
        );
    }

    #[test]
    fn pool_ranges_keep_the_journal_superblock_and_whole_blocks_only() {
        let img = template(1 << 30);
        let log = dead(&img).unwrap();
        let jsb = log.superblock * log.block_size;
        for pool_block in [4096u64, 65536] {
            let ranges = log.pool_ranges(pool_block);
            assert!(!ranges.is_empty());
            for (off, len) in ranges {
                assert_eq!(off % pool_block, 0);
                assert_eq!(len % pool_block, 0);
                assert!(
                    off > jsb,
                    "{off} would unmap the journal superblock at {jsb}"
                );
                let inside = log.runs.iter().any(|r| {
                    off >= r.physical * log.block_size
                        && off + len <= (r.physical + r.len) * log.block_size
                });
                assert!(inside, "{off}+{len} is outside the journal's log");
            }
        }
    }

    /// A file system that was mounted, written and cleanly unmounted: its
    /// log is dead, and zeroing it (what unmapping reads as), all of it or
    /// part, leaves a file system e2fsck finds clean and that mounts, keeps
    /// its files and takes writes.
    #[test]
    fn a_used_clean_journal_can_be_zeroed() {
        let img = template(1 << 30);
        let mnt = tempfile::tempdir().unwrap();
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&img.path))
        .trim()
        .to_string();
        struct Detach(String);
        impl Drop for Detach {
            fn drop(&mut self) {
                let _ = Command::new("losetup").args(["-d", &self.0]).status();
            }
        }
        let _d = Detach(dev.clone());
        run(Command::new("mount").arg(&dev).arg(mnt.path()));
        for i in 0..50 {
            std::fs::write(mnt.path().join(format!("f{i}")), format!("file {i}\n")).unwrap();
        }
        run(&mut Command::new("sync"));
        // Mounted: needs_recovery is on disk.
        match dead(&img) {
            Err(Ext4Error::NotClean(_)) => {}
            r => panic!("a mounted file system: {r:?}"),
        }
        run(Command::new("umount").arg(mnt.path()));
        drop(_d);

        let log = dead(&img).unwrap();
        let written = log
            .runs
            .iter()
            .flat_map(|r| r.physical..r.physical + r.len)
            .filter(|b| {
                read_bytes(&img, b * log.block_size, 4096)
                    .iter()
                    .any(|x| *x != 0)
            })
            .count();
        assert!(written > 0, "the unmount left no log blocks written");
        // All of the log (the punch), and every other block of it (a crash
        // part way through the punch, before the commit that freezes the
        // layer: the volume stays an active snapshot).
        for every in [1u64, 2] {
            let dir = tempfile::tempdir().unwrap();
            let copy = Image {
                path: dir.path().join("copy.img"),
                _dir: dir,
                size: img.size,
            };
            run(Command::new("cp")
                .arg("--sparse=always")
                .arg(&img.path)
                .arg(&copy.path));
            let zero = vec![0u8; log.block_size as usize];
            for r in &log.runs {
                for b in (r.physical..r.physical + r.len).step_by(every as usize) {
                    patch(&copy, b * log.block_size, &zero);
                }
            }
            run(Command::new("e2fsck").arg("-fn").arg(&copy.path));
            let d = Detach(
                run(Command::new("losetup")
                    .args(["--find", "--show"])
                    .arg(&copy.path))
                .trim()
                .to_string(),
            );
            run(Command::new("mount").arg(&d.0).arg(mnt.path()));
            assert_eq!(
                std::fs::read_to_string(mnt.path().join("f49")).unwrap(),
                "file 49\n"
            );
            std::fs::write(mnt.path().join("after"), "x").unwrap();
            run(Command::new("umount").arg(mnt.path()));
            drop(d);
            run(Command::new("e2fsck").arg("-fn").arg(&copy.path));
            // And its log is dead again.
            assert!(dead(&copy).is_ok());
        }
    }

    /// What to patch (name, byte offset, bytes) and the refusal expected.
    type Case = (&'static str, u64, Vec<u8>, fn(&Ext4Error) -> bool);

    /// Every sign of a journal that may be read, and every forged field,
    /// refuses: no dead log, so nothing is unmapped.
    #[test]
    fn refuses_dirty_or_forged_file_systems() {
        let base = template(1 << 30);
        let j = journal(&mut reader(&base.path), base.size).unwrap();
        let bs = j.sb.block_size;
        let jsb = j.extents[0].physical * bs;
        let sb = SB_OFFSET;
        let incompat = LE::read_u32(&read_bytes(&base, sb + SB_FEATURE_INCOMPAT as u64, 4));
        // The journal inode's first extent entry (depth 0 in the template).
        let gd = read_bytes(&base, (j.sb.first_data_block + 1) * bs, 64);
        let table = LE::read_u32(&gd[GD_INODE_TABLE_LO..]) as u64;
        let inode = table * bs + 7 * j.sb.inode_size;
        let first_extent = inode + (I_BLOCK + EXTENT_HEADER) as u64;

        let be = |v: u32| v.to_be_bytes().to_vec();
        let le = |v: u32| v.to_le_bytes().to_vec();
        let cases: Vec<Case> = vec![
            (
                "needs_recovery",
                sb + SB_FEATURE_INCOMPAT as u64,
                le(incompat | INCOMPAT_RECOVER),
                |e| matches!(e, Ext4Error::NotClean(_)),
            ),
            ("s_start != 0", jsb + JSB_START as u64, be(1), |e| {
                matches!(e, Ext4Error::NotClean(_))
            }),
            ("journal errno", jsb + JSB_ERRNO as u64, be(5), |e| {
                matches!(e, Ext4Error::NotClean(_))
            }),
            ("ext4 magic", sb + SB_MAGIC as u64, vec![0x54, 0xEF], |e| {
                matches!(e, Ext4Error::NotExt4(_))
            }),
            ("jbd2 magic", jsb, be(0xC03B_3999), |e| {
                matches!(e, Ext4Error::Corrupt(_))
            }),
            ("error state", sb + SB_STATE as u64, vec![3, 0], |e| {
                matches!(e, Ext4Error::NotClean(_))
            }),
            (
                "extent out of range",
                first_extent + 8,
                le(0xFFFF_FF00),
                |e| matches!(e, Ext4Error::Corrupt(_)),
            ),
            (
                "extent longer than the journal",
                first_extent + 4,
                vec![0xFF, 0x7F],
                |e| matches!(e, Ext4Error::Corrupt(_)),
            ),
            ("extent at block 0", first_extent + 8, le(0), |e| {
                matches!(e, Ext4Error::Corrupt(_))
            }),
            (
                "extent header magic",
                inode + I_BLOCK as u64,
                vec![0, 0],
                |e| matches!(e, Ext4Error::Corrupt(_)),
            ),
            (
                "extent depth 1 in a 60-byte root",
                inode + I_BLOCK as u64 + 6,
                vec![1, 0],
                |e| matches!(e, Ext4Error::Corrupt(_)),
            ),
            ("journal size", inode + I_SIZE_LO as u64, le(12345), |e| {
                matches!(e, Ext4Error::Corrupt(_))
            }),
            (
                "blocks beyond the volume",
                sb + SB_BLOCKS_COUNT_LO as u64,
                le(u32::MAX),
                |e| matches!(e, Ext4Error::Corrupt(_)),
            ),
            ("block size", sb + SB_LOG_BLOCK_SIZE as u64, le(20), |e| {
                matches!(e, Ext4Error::Corrupt(_))
            }),
        ];
        for (what, at, bytes, expected) in cases {
            let img = template(1 << 30);
            patch(&img, at, &bytes);
            match dead(&img) {
                Err(e) => assert!(expected(&e), "{what}: {e}"),
                Ok(l) => panic!("{what}: accepted, would unmap {} blocks", l.blocks()),
            }
        }
        // Not ext4 at all, and a volume too small for a superblock.
        let zeros = mkfs(1 << 20, &[]);
        patch(&zeros, 0, &vec![0u8; 1 << 20]);
        assert!(matches!(dead(&zeros), Err(Ext4Error::NotExt4(_))));
        assert!(matches!(
            dead_log(&mut reader(&zeros.path), 1500),
            Err(Ext4Error::NotExt4(_))
        ));
    }

    /// Random damage to the metadata the parser reads: an answer or an
    /// error, never a panic; and what it accepts stays inside the journal.
    #[test]
    fn random_damage_never_panics() {
        let base = template(1 << 30);
        let j = journal(&mut reader(&base.path), base.size).unwrap();
        let bs = j.sb.block_size;
        let gd = read_bytes(&base, (j.sb.first_data_block + 1) * bs, 64);
        let table = LE::read_u32(&gd[GD_INODE_TABLE_LO..]) as u64;
        let inode = (table * bs + 7 * j.sb.inode_size) as usize;
        let meta = read_bytes(&base, 0, inode + j.sb.inode_size as usize);
        let jsb = read_bytes(&base, j.extents[0].physical * bs, bs as usize);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..2000 {
            let mut m = meta.clone();
            let mut s = jsb.clone();
            for _ in 0..(1 + next() % 4) {
                let r = next();
                let flip = (r >> 40) as u8 | 1;
                // The superblock, group 0's descriptor, inode 8 or the
                // journal's superblock.
                let at = (r >> 8) as usize;
                match r % 4 {
                    0 => m[1024 + at % 1024] ^= flip,
                    1 => m[bs as usize * (j.sb.first_data_block as usize + 1) + at % 64] ^= flip,
                    2 => m[inode + at % j.sb.inode_size as usize] ^= flip,
                    _ => s[at % 64] ^= flip,
                }
            }
            let jsb_at = j.extents[0].physical * bs;
            let mut read = |off: u64, buf: &mut [u8]| -> std::result::Result<(), String> {
                reader(&base.path)(off, buf)?;
                for (i, b) in buf.iter_mut().enumerate() {
                    let o = off + i as u64;
                    if o < m.len() as u64 {
                        *b = m[o as usize];
                    } else if o >= jsb_at && o < jsb_at + bs {
                        *b = s[(o - jsb_at) as usize];
                    }
                }
                Ok(())
            };
            if let Ok(log) = dead_log(&mut read, base.size) {
                accepted += 1;
                for r in &log.runs {
                    assert!(r.physical > 0 && (r.physical + r.len) * log.block_size <= base.size);
                }
            }
        }
        eprintln!("random damage: {accepted} of 2000 accepted");
    }
}
