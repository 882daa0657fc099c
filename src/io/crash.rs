//! A storage that simulates power loss and failing disks, for tests.
//!
//! [`CrashStorage`] keeps two images: what reads see (every write so far) and
//! what is durable (the state at the last `sync`). Writes since the last sync
//! are *pending*. A simulated power cut ([`CrashStorage::crash`], or
//! [`crash_image`] on a recorded log) returns the durable image with an
//! arbitrary, seeded choice of the pending writes on top.
//!
//! The crash model is page-cache writeback at sector granularity: each
//! 512-byte sector touched since the last sync ends up holding either its
//! durable contents or its contents right after one of the pending writes
//! that touched it. That covers lost writes, reordered writes and torn writes
//! (some sectors of a write landed, others not) in one rule. A second mode
//! tears in order: every write before a random one lands, that one lands as a
//! prefix of its sectors, nothing after it does.
//!
//! An I/O-failure countdown makes the Nth write or sync from now fail, so a
//! test can see what the engine does with an error in the middle of a commit.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use super::Storage;

/// The sector size a write can be torn at.
pub const SECTOR: u64 = 512;

/// One call the engine made, as recorded by [`CrashStorage::take_log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoOp {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// Reads as zeros afterwards (hole punching).
    Punch {
        offset: u64,
        len: u64,
    },
    SetLen(u64),
    Sync,
}

/// How a simulated power cut treats the writes since the last sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// Every pending write reached the disk (but the sync never returned).
    AllLanded,
    /// None did.
    NoneLanded,
    /// Each touched sector independently holds its durable contents or its
    /// contents after one of the pending writes that touched it.
    Sectors,
    /// Writes land in order up to a random one, which lands as a prefix of
    /// its sectors; later writes are lost.
    TornPrefix,
}

#[derive(Default)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<IoOp>,
    log: Option<Vec<IoOp>>,
    writes: u64,
    syncs: u64,
    fail_write_in: Option<u64>,
    fail_sync_in: Option<u64>,
}

/// Memory storage with a durable image, pending writes and failure injection.
/// Clones share the same state, so a test keeps a handle while the pool owns another.
#[derive(Clone, Default)]
pub struct CrashStorage {
    state: Arc<Mutex<State>>,
}

impl CrashStorage {
    pub fn new() -> CrashStorage {
        CrashStorage::default()
    }

    /// Start from an image that is already durable.
    pub fn from_bytes(bytes: Vec<u8>) -> CrashStorage {
        let s = CrashStorage::new();
        {
            let mut st = s.lock();
            st.current = bytes.clone();
            st.durable = bytes;
        }
        s
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the image from the others.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record every call from now on (see [`take_log`](Self::take_log)).
    pub fn record(&self, on: bool) {
        self.lock().log = on.then(Vec::new);
    }

    /// The calls recorded since `record(true)` or the last `take_log`.
    pub fn take_log(&self) -> Vec<IoOp> {
        let mut st = self.lock();
        match &mut st.log {
            Some(l) => std::mem::take(l),
            None => Vec::new(),
        }
    }

    /// Calls recorded so far (a position in the log).
    pub fn log_len(&self) -> usize {
        self.lock().log.as_ref().map_or(0, Vec::len)
    }

    /// The image as of the last sync.
    pub fn durable(&self) -> Vec<u8> {
        self.lock().durable.clone()
    }

    /// The image every read sees (all writes so far).
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Writes (and punches, and length changes) not yet made durable.
    pub fn unsynced(&self) -> usize {
        self.lock().pending.len()
    }

    /// Writes and syncs served so far.
    pub fn counts(&self) -> (u64, u64) {
        let st = self.lock();
        (st.writes, st.syncs)
    }

    /// Simulate a power cut now: the durable image plus a seeded choice of
    /// the pending writes. The storage itself is unchanged.
    pub fn crash(&self, mode: CrashMode, seed: u64) -> Vec<u8> {
        let st = self.lock();
        crash_image(&st.durable, &st.pending, mode, seed)
    }

    /// Make the `n`th write from now (1 = the next) fail, and every write after
    /// it, until cleared with `None`: a disk that went away.
    pub fn fail_write_in(&self, n: Option<u64>) {
        self.lock().fail_write_in = n;
    }

    /// Same for syncs.
    pub fn fail_sync_in(&self, n: Option<u64>) {
        self.lock().fail_sync_in = n;
    }
}

/// Counts down; true once the countdown has reached zero (and stays there).
fn countdown(c: &mut Option<u64>) -> bool {
    match c {
        Some(0) => true,
        Some(n) => {
            *n -= 1;
            *n == 0
        }
        None => false,
    }
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl Storage for CrashStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let st = self.lock();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= st.current.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&st.current[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            )),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut st = self.lock();
        if countdown(&mut st.fail_write_in) {
            return Err(injected("write"));
        }
        st.writes += 1;
        let op = IoOp::Write {
            offset,
            data: buf.to_vec(),
        };
        apply(&mut st.current, &op);
        if let Some(l) = &mut st.log {
            l.push(op.clone());
        }
        st.pending.push(op);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        if countdown(&mut st.fail_sync_in) {
            return Err(injected("sync"));
        }
        st.syncs += 1;
        let pending = std::mem::take(&mut st.pending);
        for op in &pending {
            apply(&mut st.durable, op);
        }
        if let Some(l) = &mut st.log {
            l.push(IoOp::Sync);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let op = IoOp::SetLen(len);
        apply(&mut st.current, &op);
        if let Some(l) = &mut st.log {
            l.push(op.clone());
        }
        st.pending.push(op);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        let op = IoOp::Punch { offset, len };
        apply(&mut st.current, &op);
        if let Some(l) = &mut st.log {
            l.push(op.clone());
        }
        st.pending.push(op);
        Ok(())
    }
}

/// Apply one call to an image. Punching never extends the image.
pub fn apply(img: &mut Vec<u8>, op: &IoOp) {
    match op {
        IoOp::Write { offset, data } => {
            let (start, end) = (*offset as usize, *offset as usize + data.len());
            if end > img.len() {
                img.resize(end, 0);
            }
            img[start..end].copy_from_slice(data);
        }
        IoOp::Punch { offset, len } => {
            let start = (*offset as usize).min(img.len());
            let end = (*offset as usize)
                .saturating_add(*len as usize)
                .min(img.len());
            img[start..end].fill(0);
        }
        IoOp::SetLen(len) => img.resize(*len as usize, 0),
        IoOp::Sync => {}
    }
}

//------------------------------------------------------------------------------
// Power cuts

/// SplitMix64: small, seedable, good enough to pick which writes survive.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c909)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// The pending calls' range of sectors, `[first, end)`, or None for none.
fn sectors_of(op: &IoOp, img_len: u64) -> Option<(u64, u64)> {
    let (off, len) = match op {
        IoOp::Write { offset, data } => (*offset, data.len() as u64),
        IoOp::Punch { offset, len } => (*offset, (*len).min(img_len.saturating_sub(*offset))),
        IoOp::SetLen(_) | IoOp::Sync => return None,
    };
    (len > 0).then(|| (off / SECTOR, (off + len).div_ceil(SECTOR)))
}

/// What is on the disk after a power cut: `durable` with `pending` (the calls
/// since the last sync, oldest first) treated as `mode` says.
///
/// The image is as long as the longest it could be: a file's length survives
/// a crash independently of its data, and bytes never written read as zeros.
pub fn crash_image(durable: &[u8], pending: &[IoOp], mode: CrashMode, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut img = durable.to_vec();
    let mut full = durable.to_vec();
    for op in pending {
        apply(&mut full, op);
    }
    match mode {
        CrashMode::AllLanded => return full,
        CrashMode::NoneLanded => {}
        CrashMode::TornPrefix => {
            let cut = rng.below(pending.len() as u64 + 1) as usize;
            for op in &pending[..cut] {
                apply(&mut img, op);
            }
            if let Some(op) = pending.get(cut) {
                if let Some((first, end)) = sectors_of(op, img.len() as u64) {
                    let keep = rng.below(end - first + 1);
                    apply_sectors(&mut img, op, first, first + keep);
                }
            }
        }
        CrashMode::Sectors => {
            // Replay sector by sector, keeping one version per sector by
            // reservoir sampling: uniform over {durable, after write 1, ...}.
            let mut cur = durable.to_vec();
            let mut seen: HashMap<u64, (u64, Option<Vec<u8>>)> = HashMap::new();
            for op in pending {
                apply(&mut cur, op);
                let Some((first, end)) = sectors_of(op, cur.len() as u64) else {
                    continue;
                };
                for s in first..end {
                    let e = seen.entry(s).or_insert((1, None));
                    e.0 += 1;
                    if rng.below(e.0) == 0 {
                        let (a, b) = sector_bounds(s, cur.len());
                        e.1 = Some(cur[a..b].to_vec());
                    }
                }
            }
            for (s, (_, version)) in seen {
                if let Some(v) = version {
                    let (a, _) = sector_bounds(s, img.len());
                    if img.len() < a + v.len() {
                        img.resize(a + v.len(), 0);
                    }
                    img[a..a + v.len()].copy_from_slice(&v);
                }
            }
        }
    }
    if img.len() < full.len() {
        img.resize(full.len(), 0);
    }
    img
}

fn sector_bounds(s: u64, len: usize) -> (usize, usize) {
    let a = (s * SECTOR) as usize;
    (a.min(len), (a + SECTOR as usize).min(len))
}

/// Apply only the part of `op` inside sectors `[first, end)`.
fn apply_sectors(img: &mut Vec<u8>, op: &IoOp, first: u64, end: u64) {
    let (lo, hi) = (first * SECTOR, end * SECTOR);
    match op {
        IoOp::Write { offset, data } => {
            let a = (*offset).max(lo);
            let b = (*offset + data.len() as u64).min(hi);
            if a < b {
                let part = data[(a - offset) as usize..(b - offset) as usize].to_vec();
                apply(
                    img,
                    &IoOp::Write {
                        offset: a,
                        data: part,
                    },
                );
            }
        }
        IoOp::Punch { offset, len } => {
            let a = (*offset).max(lo);
            let b = (*offset + *len).min(hi);
            if a < b {
                apply(
                    img,
                    &IoOp::Punch {
                        offset: a,
                        len: b - a,
                    },
                );
            }
        }
        IoOp::SetLen(_) | IoOp::Sync => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_only_after_sync() {
        let s = CrashStorage::new();
        s.write_at(&[1; 1024], 0).unwrap();
        assert_eq!(s.crash(CrashMode::NoneLanded, 0), vec![0; 1024]);
        assert_eq!(s.crash(CrashMode::AllLanded, 0), vec![1; 1024]);
        s.sync().unwrap();
        s.write_at(&[2; 512], 512).unwrap();
        for seed in 0..20 {
            let img = s.crash(CrashMode::Sectors, seed);
            assert_eq!(&img[..512], &[1; 512]);
            assert!(img[512..] == [1; 512] || img[512..] == [2; 512]);
        }
    }

    #[test]
    fn torn_writes_keep_a_prefix_and_sectors_mix_versions() {
        let s = CrashStorage::new();
        s.write_at(&[7; 4096], 0).unwrap();
        let mut torn = false;
        for seed in 0..64 {
            let img = s.crash(CrashMode::TornPrefix, seed);
            let landed = img.iter().take_while(|&&b| b == 7).count();
            assert_eq!(landed % 512, 0);
            assert!(img[landed..].iter().all(|&b| b == 0));
            torn |= landed > 0 && landed < 4096;
        }
        assert!(torn, "some seed tears the write");
        s.write_at(&[8; 4096], 0).unwrap();
        for seed in 0..32 {
            let img = s.crash(CrashMode::Sectors, seed);
            for sector in img.chunks(512) {
                let v = sector[0];
                assert!([0, 7, 8].contains(&v) && sector.iter().all(|&b| b == v));
            }
        }
    }

    #[test]
    fn failure_countdown() {
        let s = CrashStorage::new();
        s.fail_write_in(Some(2));
        assert!(s.write_at(&[1], 0).is_ok());
        assert!(s.write_at(&[1], 0).is_err());
        assert!(s.write_at(&[1], 0).is_err());
        s.fail_write_in(None);
        assert!(s.write_at(&[1], 0).is_ok());
        s.fail_sync_in(Some(1));
        assert!(s.sync().is_err());
        assert_eq!(s.unsynced(), 2);
    }
}
