//! Crash consistency: random workloads on a small pool (4 KiB or 64 KiB blocks) run on a
//! [`CrashStorage`] that records every write and sync. The log is then
//! replayed, and at every sync — and at random points between syncs — a power
//! cut is simulated (see `thinpool::io::crash` for the crash model). Each
//! crash image must:
//!
//! 1. open;
//! 2. be at the last commit that completed before the cut (its superblock was
//!    synced), or at the one commit in flight if its superblock landed — never
//!    older, never a mix (checked through every volume's metadata and data);
//! 3. pass `check()` (every refcount equals the references found);
//! 4. stay usable (a sample of images is written to and committed again).
//!
//! # With the intent log (`crash_with_the_intent_log`)
//!
//! The same workloads run with logging on (as a served pool has it), a few
//! records per log half (so halves fill and commits restart the log), and
//! `Flush` ops (one fdatasync). The image opens at the last commit plus a
//! prefix of the log: the model state is that of the commit the replay
//! started from, and on top of the rule below, every change followed by a
//! flush or commit that returned before the cut must be there (the
//! versions allowed start at the last such one). Cuts are also made right
//! after every log record is written (between the append and its
//! fdatasync), and for a sample of images whose open replayed records,
//! the replay's own commit is cut at every I/O point: the pool must open
//! again, check clean and show exactly what the first replay showed.
//!
//! # What data a volume may hold after a cut (the acceptance rule)
//!
//! Let the image open at commit `g` whose model state is `S_g`. The set of
//! volumes, their names, ids, sizes and read-only flags must equal `S_g`
//! exactly. For data, take each volume `v` and each of its virtual blocks `b`:
//! let `V_0` be `S_g`'s contents of `b`, and `V_1..V_k` the contents after each
//! later write or discard to `(v, b)` issued before the cut (the model applies
//! them in order). Every 512-byte sector of `b` as read must equal that sector
//! of one of `V_0..V_k`.
//!
//! Why later versions are allowed: a block that `v` alone held at commit `g`
//! (count 1, shared with nothing in the committed state) is overwritten in
//! place, exactly like a disk, so any prefix of those writes may have reached
//! it, sector by sector (a crash tears at 512-byte sectors). A block shared at
//! `g` — with a snapshot, a clone, or through a shared map node — is never
//! written in place, so for every *other* volume (which saw none of `v`'s
//! writes) only `V_0` is accepted: a copy-on-write bug, or a freed block
//! reused before the commit that freed it, shows up as another volume's data.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use thinpool::format::{Superblock, SUPERBLOCK_SLOT_SIZE};
use thinpool::io::crash::{apply, crash_image, CrashMode, IoOp, Rng};
use thinpool::io::{CrashStorage, MemStorage};
use thinpool::{CreateOptions, Pool, VolumeId};

use super::{BS, LOG_FAILURES, LOG_SEEDS, POOL_SIZE, SEEDS};
const NAMES: usize = 6;
const SECTOR: usize = 512;

//------------------------------------------------------------------------------
// The model

type Block = Arc<Vec<u8>>;

#[derive(Clone, Debug)]
struct Vol {
    /// None when the op that made it failed (id unknown).
    id: Option<VolumeId>,
    size: u64,
    read_only: bool,
    /// Made with every block mapped (a snapshot or clone of it is not).
    preallocated: bool,
    /// The volume's annotation (committed with it).
    annotation: Option<Vec<u8>>,
    /// Absent blocks read as zeros.
    blocks: BTreeMap<u64, Block>,
}

type Model = BTreeMap<String, Vol>;

fn zero_block() -> Vec<u8> {
    vec![0; BS as usize]
}

/// Apply a write (`Some(data)`) or a zeroing (`None`) of `len` bytes at `offset`.
fn model_change(v: &mut Vol, offset: u64, len: u64, data: Option<&[u8]>) {
    let mut pos = 0u64;
    while pos < len {
        let at = offset + pos;
        let (vb, within) = (at / BS, (at % BS) as usize);
        let n = (BS as usize - within).min((len - pos) as usize);
        let mut blk = v
            .blocks
            .get(&vb)
            .map(|b| b.to_vec())
            .unwrap_or_else(zero_block);
        match data {
            Some(d) => blk[within..within + n].copy_from_slice(&d[pos as usize..pos as usize + n]),
            None => blk[within..within + n].fill(0),
        }
        v.blocks.insert(vb, Arc::new(blk));
        pos += n as u64;
    }
}

/// A data change, kept so a crash image may show it (see the module docs).
struct Event {
    /// Log position where the op started: it may have reached the disk in
    /// any crash after this point.
    log_start: usize,
    vid: VolumeId,
    offset: u64,
    len: u64,
    data: Option<Vec<u8>>,
    /// Index of the op that made it.
    op: usize,
    /// Log position where the first flush or commit after it returned:
    /// a crash from there on must show it (usize::MAX: none did).
    durable_from: usize,
}

/// One workload's record: the I/O log, the data changes, and the model at
/// each commit generation (with the number of events before it).
struct Trace {
    seed: u64,
    /// Logging was on; where the log is (first block, blocks).
    logging: bool,
    log_area: (u64, u32),
    base: Vec<u8>,
    log: Vec<IoOp>,
    events: Vec<Event>,
    states: BTreeMap<u64, (usize, Model)>,
}

#[derive(Debug, Clone)]
enum Op {
    Create {
        name: String,
        blocks: u64,
        /// `create_volume_preallocated`: every block mapped in its commit.
        prealloc: bool,
    },
    Snapshot {
        src: String,
        name: String,
        writable: bool,
    },
    Write {
        vol: String,
        offset: u64,
        data: Vec<u8>,
    },
    Discard {
        vol: String,
        offset: u64,
        len: u64,
    },
    Remove {
        vol: String,
    },
    Rename {
        vol: String,
        name: String,
    },
    Grow {
        vol: String,
        blocks: u64,
    },
    /// A snapshot with an annotation, as the containerd snapshotter makes one.
    SnapshotAnnotated {
        src: String,
        name: String,
        writable: bool,
        annotation: Vec<u8>,
    },
    /// Replace a volume's annotation (and maybe freeze it) in one commit.
    Annotate {
        vol: String,
        annotation: Option<Vec<u8>>,
        freeze: bool,
    },
    Commit,
    /// `Pool::flush`: with the log on, one fdatasync of data and records.
    Flush,
}

impl Op {
    fn commits(&self) -> bool {
        !matches!(self, Op::Write { .. } | Op::Discard { .. })
    }

    fn changes_data(&self) -> bool {
        matches!(self, Op::Write { .. } | Op::Discard { .. })
    }
}

fn name(i: u64) -> String {
    format!("v{i}")
}

/// A random op that is valid against `model` (errors are not what this tests).
fn gen_op(rng: &mut Rng, model: &Model) -> Op {
    let names: Vec<&String> = model.keys().collect();
    let writable: Vec<&String> = model
        .iter()
        .filter(|(_, v)| !v.read_only)
        .map(|(n, _)| n)
        .collect();
    let free: Vec<String> = (0..NAMES as u64)
        .map(name)
        .filter(|n| !model.contains_key(n))
        .collect();
    loop {
        match rng.below(20) {
            0..=1 if !free.is_empty() => {
                // Some volumes need a two-level map (> 504 blocks).
                let blocks = if rng.chance(1, 3) {
                    505 + rng.below(1200)
                } else {
                    1 + rng.below(48)
                };
                // Preallocated ones stay small: they take their space at once.
                let prealloc = rng.chance(1, 4);
                return Op::Create {
                    name: free[rng.below(free.len() as u64) as usize].clone(),
                    // (A deep preallocated map has its own test below.)
                    blocks: if prealloc { blocks.min(40) } else { blocks },
                    prealloc,
                };
            }
            2..=3 if !free.is_empty() && !names.is_empty() => {
                return Op::Snapshot {
                    src: names[rng.below(names.len() as u64) as usize].clone(),
                    name: free[rng.below(free.len() as u64) as usize].clone(),
                    writable: rng.chance(2, 3),
                }
            }
            4..=12 if !writable.is_empty() => {
                let vol = writable[rng.below(writable.len() as u64) as usize].clone();
                let size = model[&vol].size;
                // Hot spots make overwrites (in place and copy-on-write) common.
                let nb = size / BS;
                let vb = match rng.below(3) {
                    0 => rng.below(nb.min(8)),
                    1 => (nb / 2 + rng.below(4)).min(nb - 1),
                    _ => rng.below(nb),
                };
                let (offset, len) = if rng.chance(1, 2) {
                    (vb * BS, BS * (1 + rng.below(3)))
                } else {
                    (vb * BS + rng.below(BS), 1 + rng.below(2 * BS))
                };
                let len = len.min(size - offset);
                let mut data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
                // Whole blocks of zeros unmap instead of being written.
                if rng.chance(1, 5) {
                    data.fill(0);
                }
                return Op::Write { vol, offset, data };
            }
            13..=14 if !writable.is_empty() => {
                let vol = writable[rng.below(writable.len() as u64) as usize].clone();
                let size = model[&vol].size;
                let offset = rng.below(size);
                let len = (1 + rng.below(6 * BS)).min(size - offset);
                return Op::Discard { vol, offset, len };
            }
            15 if !names.is_empty() => {
                return Op::Remove {
                    vol: names[rng.below(names.len() as u64) as usize].clone(),
                }
            }
            16 if !names.is_empty() && !free.is_empty() => {
                return Op::Rename {
                    vol: names[rng.below(names.len() as u64) as usize].clone(),
                    name: free[rng.below(free.len() as u64) as usize].clone(),
                }
            }
            17 if !writable.is_empty() => {
                let vol = writable[rng.below(writable.len() as u64) as usize].clone();
                let more = if model[&vol].preallocated { 64 } else { 600 };
                let blocks = model[&vol].size / BS + rng.below(more);
                return Op::Grow { vol, blocks };
            }
            18 if !free.is_empty() && !names.is_empty() => {
                let n = rng.below(300) as usize;
                return Op::SnapshotAnnotated {
                    src: names[rng.below(names.len() as u64) as usize].clone(),
                    name: free[rng.below(free.len() as u64) as usize].clone(),
                    writable: rng.chance(2, 3),
                    annotation: (0..n).map(|_| rng.next_u64() as u8).collect(),
                };
            }
            19 if !names.is_empty() && rng.chance(1, 2) => {
                let n = rng.below(6000) as usize;
                return Op::Annotate {
                    vol: names[rng.below(names.len() as u64) as usize].clone(),
                    annotation: rng
                        .chance(4, 5)
                        .then(|| (0..n).map(|_| rng.next_u64() as u8).collect()),
                    freeze: rng.chance(1, 4),
                };
            }
            19 => return Op::Commit,
            _ => {}
        }
    }
}

/// Apply `op` to the model (it succeeded, or its commit may have landed).
fn model_apply(model: &mut Model, op: &Op, id: Option<VolumeId>) {
    match op {
        Op::Create {
            name,
            blocks,
            prealloc,
        } => {
            model.insert(
                name.clone(),
                Vol {
                    id,
                    size: blocks * BS,
                    read_only: false,
                    preallocated: *prealloc,
                    annotation: None,
                    blocks: BTreeMap::new(),
                },
            );
        }
        Op::Snapshot {
            src,
            name,
            writable,
        } => {
            let v = Vol {
                id,
                read_only: !writable,
                preallocated: false,
                annotation: None,
                ..model[src].clone()
            };
            model.insert(name.clone(), v);
        }
        Op::SnapshotAnnotated {
            src,
            name,
            writable,
            annotation,
        } => {
            let v = Vol {
                id,
                read_only: !writable,
                preallocated: false,
                annotation: Some(annotation.clone()),
                ..model[src].clone()
            };
            model.insert(name.clone(), v);
        }
        Op::Annotate {
            vol,
            annotation,
            freeze,
        } => {
            let v = model.get_mut(vol).unwrap();
            v.annotation = annotation.clone();
            v.read_only |= *freeze;
        }
        Op::Write { vol, offset, data } => model_change(
            model.get_mut(vol).unwrap(),
            *offset,
            data.len() as u64,
            Some(data),
        ),
        Op::Discard { vol, offset, len } => {
            model_change(model.get_mut(vol).unwrap(), *offset, *len, None)
        }
        Op::Remove { vol } => {
            model.remove(vol);
        }
        Op::Rename { vol, name } => {
            let v = model.remove(vol).unwrap();
            model.insert(name.clone(), v);
        }
        Op::Grow { vol, blocks } => model.get_mut(vol).unwrap().size = blocks * BS,
        Op::Commit | Op::Flush => {}
    }
}

fn pool_apply(p: &mut Pool, op: &Op) -> thinpool::Result<Option<VolumeId>> {
    Ok(match op {
        Op::Create {
            name,
            blocks,
            prealloc: false,
        } => Some(p.create_volume(name, blocks * BS)?),
        Op::Create { name, blocks, .. } => {
            Some(p.create_volume_preallocated(name, blocks * BS, &mut |_, _| {})?)
        }
        Op::Snapshot {
            src,
            name,
            writable,
        } => Some(p.snapshot(src, name, *writable)?),
        Op::Write { vol, offset, data } => {
            let id = p.lookup(vol)?;
            p.write(id, *offset, data)?;
            None
        }
        Op::Discard { vol, offset, len } => {
            let id = p.lookup(vol)?;
            p.discard(id, *offset, *len)?;
            None
        }
        Op::Remove { vol } => {
            p.remove_volume(vol)?;
            None
        }
        Op::Rename { vol, name } => {
            p.rename_volume(vol, name)?;
            None
        }
        Op::Grow { vol, blocks } => {
            p.resize_volume(vol, blocks * BS)?;
            None
        }
        Op::SnapshotAnnotated {
            src,
            name,
            writable,
            annotation,
        } => Some(p.snapshot_annotated(src, name, *writable, Some(annotation.clone()))?),
        Op::Annotate {
            vol,
            annotation,
            freeze,
        } => {
            let id = p.lookup(vol)?;
            p.annotate(id, annotation.clone(), *freeze)?;
            None
        }
        Op::Commit => {
            p.commit()?;
            None
        }
        Op::Flush => {
            p.flush()?;
            None
        }
    })
}

fn data_event(op: &Op, model: &Model, log_start: usize, step: usize) -> Option<Event> {
    let (vol, offset, len, data) = match op {
        Op::Write { vol, offset, data } => (vol, *offset, data.len() as u64, Some(data.clone())),
        Op::Discard { vol, offset, len } => (vol, *offset, *len, None),
        _ => return None,
    };
    let vid = model[vol].id?;
    Some(Event {
        log_start,
        vid,
        offset,
        len,
        data,
        op: step,
        durable_from: usize::MAX,
    })
}

/// Run `n_ops` random ops. With `fail`, the storage starts failing writes
/// (or syncs) at that countdown and the workload stops at the first error.
fn run_workload(seed: u64, n_ops: usize, fail: Option<(bool, u64)>, logging: bool) -> Trace {
    let mut rng = Rng::new(seed);
    let st = CrashStorage::new();
    let opts = CreateOptions {
        size: POOL_SIZE,
        block_size: BS as u32,
    };
    let mut pool = Pool::create_with(Box::new(st.clone()), Path::new("crash"), &opts).unwrap();
    if logging {
        pool.set_logging(true);
        // A few records per half: halves fill and commits restart the log.
        pool.limit_log(4 + rng.below(28) as u32);
    }
    let log_area = pool.log_area();
    st.record(true);
    let base = st.durable();
    let mut model = Model::new();
    let mut events = Vec::new();
    let mut states = BTreeMap::new();
    // (op index, log position) of every flush or commit that returned.
    let mut flushes: Vec<(usize, usize)> = Vec::new();
    states.insert(pool.generation(), (0, model.clone()));
    match fail {
        Some((true, n)) => st.fail_write_in(Some(n)),
        Some((false, n)) => st.fail_sync_in(Some(n)),
        None => {}
    }
    for step in 0..n_ops {
        // The last op commits, so dropping the pool commits nothing new.
        let op = if step + 1 == n_ops {
            Op::Commit
        } else if logging && rng.chance(1, 6) {
            Op::Flush
        } else {
            gen_op(&mut rng, &model)
        };
        let gen = pool.generation();
        let log_start = st.log_len();
        let n_before = events.len();
        // A write or discard may commit half way (a full log half, or frees
        // waiting for a commit): such a commit holds part of it, so its
        // state is the one before the op, with the op as a later change.
        let before = op.changes_data().then(|| model.clone());
        events.extend(data_event(&op, &model, log_start, step));
        match pool_apply(&mut pool, &op) {
            Ok(id) => {
                model_apply(&mut model, &op, id);
                let now = pool.generation();
                if let Some(before) = &before {
                    for g in gen + 1..=now {
                        states.insert(g, (n_before, before.clone()));
                    }
                } else if now != gen {
                    assert_eq!(
                        now,
                        gen + 1,
                        "seed {seed} step {step}: {op:?} committed twice"
                    );
                    states.insert(now, (events.len(), model.clone()));
                }
                if op.commits() {
                    flushes.push((step, st.log_len()));
                }
            }
            Err(e) => {
                assert!(
                    fail.is_some(),
                    "seed {seed} step {step}: {op:?} failed: {e}"
                );
                if std::env::var("CRASH_DEBUG").is_ok() {
                    eprintln!(
                        "seed {seed} step {step} gen {gen}: {:?} failed: {e}",
                        std::mem::discriminant(&op)
                    );
                }
                if let Some(before) = before {
                    states.insert(gen + 1, (n_before, before));
                } else if op.commits() {
                    // Its superblock may have landed before the failing sync.
                    let mut m = model.clone();
                    model_apply(&mut m, &op, None);
                    states.insert(gen + 1, (events.len(), m));
                }
                break;
            }
        }
    }
    // A failed pool does not commit again; a healthy one commits on drop.
    drop(pool);
    for e in &mut events {
        if let Some(&(_, at)) = flushes.iter().find(|(op, _)| *op > e.op) {
            e.durable_from = at;
        }
    }
    Trace {
        seed,
        logging,
        log_area,
        base,
        log: st.take_log(),
        events,
        states,
    }
}

//------------------------------------------------------------------------------
// Verifying one crash image

/// Generation of the newest valid superblock in an image (0: none).
fn newest_generation(img: &[u8]) -> u64 {
    (0..2)
        .filter_map(|s| {
            let slot = img.get(s * SUPERBLOCK_SLOT_SIZE..(s + 1) * SUPERBLOCK_SLOT_SIZE)?;
            Superblock::decode(slot).ok().map(|sb| sb.generation)
        })
        .max()
        .unwrap_or(0)
}

struct Verifier<'a> {
    trace: &'a Trace,
    points: usize,
    reused: usize,
    /// Images whose open replayed log records, and how many of those had
    /// their replay cut (crash points in the replay's commit).
    replayed: usize,
    replay_cuts: usize,
    replay_points: usize,
}

/// What a pool shows, to compare two opens of one image: each volume's
/// record, and the crc of every mapped block.
type Contents = Vec<(String, u64, bool, Vec<(u64, u32)>)>;

fn contents(p: &mut Pool) -> Contents {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BS as usize];
    for v in p.list().unwrap() {
        let blocks = p
            .mapped_blocks(v.id)
            .unwrap()
            .into_iter()
            .map(|vb| {
                p.read(v.id, vb * BS, &mut buf).unwrap();
                (vb, crc32(&buf))
            })
            .collect();
        out.push((v.name, v.virtual_size, v.read_only, blocks));
    }
    out
}

fn crc32(b: &[u8]) -> u32 {
    // FNV-1a is enough to tell blocks apart here.
    b.iter().fold(0x811c_9dc5u32, |h, &x| {
        (h ^ x as u32).wrapping_mul(0x0100_0193)
    })
}

impl Verifier<'_> {
    /// `img` is a power cut after log position `cut`; `durable_gen` is the
    /// newest commit synced before it, `landed_gen` the newest if every
    /// pending write had landed.
    fn verify(&mut self, img: Vec<u8>, cut: usize, durable_gen: u64, landed_gen: u64, what: &str) {
        let t = self.trace;
        let ctx = format!("seed {} cut at log position {cut} ({what})", t.seed);
        self.points += 1;
        let keep = t.logging.then(|| img.clone());
        let mem = MemStorage::from_bytes(img);
        let mut p = Pool::open_with(Box::new(mem), Path::new("crash"))
            .unwrap_or_else(|e| panic!("{ctx}: the pool does not open: {e}"));
        // With the log, the pool is at a commit plus the records replayed
        // on top of it (and committed).
        let replayed = p.log_replay().filter(|r| r.records > 0).cloned();
        let g = replayed.as_ref().map_or(p.generation(), |r| r.generation);
        assert!(
            g == durable_gen || g == landed_gen,
            "{ctx}: opened at generation {g}, expected {durable_gen} (last completed commit) or {landed_gen}"
        );
        let report = p
            .check()
            .unwrap_or_else(|e| panic!("{ctx}: check failed: {e}"));
        assert!(
            report.is_clean(),
            "{ctx}: check found problems: {:#?}",
            report.problems
        );
        let (first_event, model) = t
            .states
            .get(&g)
            .unwrap_or_else(|| panic!("{ctx}: no model for generation {g}"));
        let later: Vec<&Event> = t.events[*first_event..]
            .iter()
            .filter(|e| e.log_start < cut)
            .collect();
        let listed = p.list().unwrap();
        let names: BTreeSet<&String> = listed.iter().map(|v| &v.name).collect();
        assert_eq!(
            names,
            model.keys().collect(),
            "{ctx}: volumes differ from the model at generation {g}"
        );
        for info in &listed {
            let v = &model[&info.name];
            let vctx = format!("{ctx}, generation {g}, volume '{}'", info.name);
            if let Some(id) = v.id {
                assert_eq!(info.id, id, "{vctx}: id");
            }
            assert_eq!(info.virtual_size, v.size, "{vctx}: size");
            assert_eq!(info.read_only, v.read_only, "{vctx}: read-only flag");
            assert_eq!(info.preallocated, v.preallocated, "{vctx}: preallocated");
            if v.preallocated {
                assert_eq!(
                    info.mapped_bytes,
                    v.size.div_ceil(BS) * BS,
                    "{vctx}: a preallocated volume maps every block"
                );
            }
            assert_eq!(
                p.annotation(info.id),
                v.annotation.as_deref(),
                "{vctx}: annotation"
            );
            let mine: Vec<&&Event> = later.iter().filter(|e| Some(e.vid) == v.id).collect();
            let mut to_check: BTreeSet<u64> = v.blocks.keys().copied().collect();
            to_check.extend(p.mapped_blocks(info.id).unwrap());
            for e in &mine {
                to_check.extend(e.offset / BS..(e.offset + e.len).div_ceil(BS));
            }
            let mut buf = vec![0u8; BS as usize];
            for vb in to_check.into_iter().filter(|&vb| vb < v.size / BS) {
                p.read(info.id, vb * BS, &mut buf)
                    .unwrap_or_else(|e| panic!("{vctx}: read block {vb}: {e}"));
                let mut versions = vec![v
                    .blocks
                    .get(&vb)
                    .map(|b| b.to_vec())
                    .unwrap_or_else(zero_block)];
                // Changes followed by a flush or commit that returned are
                // durable: versions before the last of them are not allowed.
                let mut floor = 0;
                let mut scratch = Vol {
                    id: None,
                    size: v.size,
                    read_only: false,
                    preallocated: false,
                    annotation: None,
                    blocks: BTreeMap::new(),
                };
                scratch.blocks.insert(vb, Arc::new(versions[0].clone()));
                for e in mine
                    .iter()
                    .filter(|e| e.offset < (vb + 1) * BS && e.offset + e.len > vb * BS)
                {
                    // Only the part of the change inside this block matters.
                    let (a, b) = (e.offset.max(vb * BS), (e.offset + e.len).min((vb + 1) * BS));
                    let part = e
                        .data
                        .as_ref()
                        .map(|d| &d[(a - e.offset) as usize..(b - e.offset) as usize]);
                    model_change(&mut scratch, a, b - a, part);
                    versions.push(scratch.blocks[&vb].to_vec());
                    if e.durable_from <= cut {
                        floor = versions.len() - 1;
                    }
                }
                for (s, got) in buf.chunks(SECTOR).enumerate() {
                    let r = s * SECTOR..(s + 1) * SECTOR;
                    if !versions[floor..].iter().any(|ver| ver[r.clone()] == *got) {
                        let older = versions[..floor].iter().any(|ver| ver[r.clone()] == *got);
                        panic!(
                            "{vctx}: block {vb} sector {s} holds data of no allowed version \
                             ({} versions, the first {floor} not allowed (flushed later): {}; \
                             first bytes {:?}, committed {:?})",
                            versions.len(),
                            if older {
                                "it holds one of those"
                            } else {
                                "nor one of those"
                            },
                            &got[..8],
                            &versions[0][r.start..r.start + 8]
                        );
                    }
                }
            }
        }
        if let (Some(img), Some(r)) = (keep, &replayed) {
            self.replayed += 1;
            // Cut the replay's own commit, for a sample of replays.
            if self.replayed % 10 == 1 {
                self.crash_the_replay(img, &ctx, r.records, &mut p);
            }
        }
        // A sample of images must stay usable: write, commit, check again.
        if self.points.is_multiple_of(8) {
            self.reused += 1;
            if let Some(info) = listed.iter().find(|v| !v.read_only) {
                p.write(info.id, 0, &[0xa5; BS as usize])
                    .unwrap_or_else(|e| panic!("{ctx}: write after recovery: {e}"));
            }
            p.create_volume("after-crash", BS)
                .unwrap_or_else(|e| panic!("{ctx}: create after recovery: {e}"));
            let r = p.check().unwrap();
            assert!(
                r.is_clean(),
                "{ctx}: after recovery and new writes: {:#?}",
                r.problems
            );
        }
    }
}

impl Verifier<'_> {
    /// `img` opened by replaying `records` log records into `first`: open
    /// it again on a recording storage, then cut the power at every I/O
    /// point of the replay's commit. Each image must open, check clean
    /// and show exactly what `first` shows.
    fn crash_the_replay(&mut self, img: Vec<u8>, ctx: &str, records: u64, first: &mut Pool) {
        self.replay_cuts += 1;
        let want = contents(first);
        let st = CrashStorage::from_bytes(img.clone());
        st.record(true);
        let p = Pool::open_with(Box::new(st.clone()), Path::new("crash")).unwrap();
        assert_eq!(
            p.log_replay().map(|r| r.records),
            Some(records),
            "{ctx}: replay again"
        );
        drop(p);
        let log = st.take_log();
        assert!(
            log.contains(&IoOp::Sync),
            "{ctx}: the replay committed nothing"
        );
        let mut rng = Rng::new(self.replay_cuts as u64);
        let modes = [
            CrashMode::AllLanded,
            CrashMode::NoneLanded,
            CrashMode::Sectors,
            CrashMode::TornPrefix,
        ];
        let (mut durable, mut epoch) = (img, 0);
        for cut in 0..=log.len() {
            let at_sync = log.get(cut) == Some(&IoOp::Sync);
            let ms: Vec<CrashMode> = if at_sync || cut == log.len() {
                modes.to_vec()
            } else {
                vec![modes[rng.below(4) as usize]]
            };
            for m in ms {
                self.replay_points += 1;
                let img = crash_image(&durable, &log[epoch..cut], m, rng.next_u64());
                let rctx = format!("{ctx}: replay cut at {cut} of {} ({m:?})", log.len());
                let mut p = Pool::open_with(Box::new(MemStorage::from_bytes(img)), Path::new("c"))
                    .unwrap_or_else(|e| panic!("{rctx}: does not open: {e}"));
                let r = p.check().unwrap();
                assert!(r.is_clean(), "{rctx}: {:#?}", r.problems);
                assert!(
                    contents(&mut p) == want,
                    "{rctx}: not what the first replay showed"
                );
            }
            if at_sync {
                for op in &log[epoch..cut] {
                    apply(&mut durable, op);
                }
                epoch = cut + 1;
            }
        }
    }
}

/// Positions in `log` (between `from` and `to`) right after an intent log
/// record was written.
fn after_records(t: &Trace, from: usize, to: usize) -> Vec<usize> {
    let (start, blocks) = t.log_area;
    let (lo, hi) = (start * BS, (start + blocks as u64) * BS);
    (from..to)
        .filter(|&i| {
            matches!(&t.log[i], IoOp::Write { offset, data }
                if data.len() == 64 && (lo..hi).contains(offset))
        })
        .map(|i| i + 1)
        .collect()
}

/// Replay a trace, cutting the power at every sync (in every crash mode) and
/// at `between` random points between syncs. Returns (crash points, reused).
/// What a run of crash points covered.
#[derive(Default, Debug)]
struct Counts {
    points: usize,
    reused: usize,
    replayed: usize,
    replay_cuts: usize,
    replay_points: usize,
}

fn crash_everywhere(t: &Trace, seed: u64, between: usize) -> Counts {
    let mut rng = Rng::new(seed);
    let mut v = Verifier {
        trace: t,
        points: 0,
        reused: 0,
        replayed: 0,
        replay_cuts: 0,
        replay_points: 0,
    };
    let mut durable = t.base.clone();
    let mut durable_gen = newest_generation(&durable);
    let mut epoch = 0usize;
    let modes = [
        CrashMode::AllLanded,
        CrashMode::NoneLanded,
        CrashMode::Sectors,
        CrashMode::TornPrefix,
    ];
    let cut_at = |v: &mut Verifier,
                  durable: &[u8],
                  durable_gen: u64,
                  epoch: usize,
                  cut: usize,
                  modes: &[CrashMode],
                  rng: &mut Rng| {
        let pending = &t.log[epoch..cut];
        let mut all = durable.to_vec();
        for op in pending {
            apply(&mut all, op);
        }
        let landed_gen = newest_generation(&all).max(durable_gen);
        for &m in modes {
            let img = crash_image(durable, pending, m, rng.next_u64());
            v.verify(
                img,
                cut,
                durable_gen,
                landed_gen,
                &format!("{m:?}, {} pending calls", pending.len()),
            );
        }
    };
    for (i, op) in t.log.iter().enumerate() {
        if *op != IoOp::Sync {
            continue;
        }
        // At the sync: every mode, plus a second random sector mix.
        cut_at(&mut v, &durable, durable_gen, epoch, i, &modes, &mut rng);
        cut_at(
            &mut v,
            &durable,
            durable_gen,
            epoch,
            i,
            &[CrashMode::Sectors],
            &mut rng,
        );
        // Right after each log record was written, before its fdatasync.
        if t.logging {
            for cut in after_records(t, epoch, i) {
                let m = modes[rng.below(4) as usize];
                cut_at(&mut v, &durable, durable_gen, epoch, cut, &[m], &mut rng);
            }
        }
        // Between the previous sync and this one.
        for _ in 0..between {
            if i > epoch + 1 {
                let cut = epoch + 1 + rng.below((i - epoch - 1) as u64) as usize;
                let m = modes[rng.below(4) as usize];
                cut_at(&mut v, &durable, durable_gen, epoch, cut, &[m], &mut rng);
            }
        }
        for op in &t.log[epoch..i] {
            apply(&mut durable, op);
        }
        durable_gen = newest_generation(&durable).max(durable_gen);
        epoch = i + 1;
    }
    if epoch < t.log.len() {
        cut_at(
            &mut v,
            &durable,
            durable_gen,
            epoch,
            t.log.len(),
            &modes,
            &mut rng,
        );
    }
    Counts {
        points: v.points,
        reused: v.reused,
        replayed: v.replayed,
        replay_cuts: v.replay_cuts,
        replay_points: v.replay_points,
    }
}

//------------------------------------------------------------------------------
// Tests

#[test]
fn crash_at_every_sync_and_between() {
    let seeds: u64 = std::env::var("CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let first: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (mut points, mut reused, mut syncs) = (0, 0, 0);
    for seed in first..first + seeds {
        let t = run_workload(seed, 160, None, false);
        syncs += t.log.iter().filter(|o| **o == IoOp::Sync).count();
        let c = crash_everywhere(&t, seed, 2);
        points += c.points;
        reused += c.reused;
    }
    eprintln!("crash harness: {seeds} workloads, {syncs} syncs, {points} crash points, {reused} recovered pools reused");
    assert!(points >= 2000, "only {points} crash points");
}

#[test]
fn io_failure_anywhere_leaves_the_last_commit() {
    let mut points = 0;
    for n in 1..60u64 {
        for on_write in [true, false] {
            let count = if on_write { n * 7 } else { n };
            let t = run_workload(1000 + n, 60, Some((on_write, count)), false);
            // The storage's log ends where the failure stopped everything.
            points += crash_everywhere(&t, n, 0).points;
        }
    }
    eprintln!("I/O failure: {points} crash points after injected failures");
}

/// A preallocating create, cut at every call it makes (every write, zeroing
/// and sync), in every crash mode: the pool opens without the volume, or
/// with it whole (every block mapped, reading zeros), and checks clean.
#[test]
fn crash_at_every_call_of_a_preallocating_create() {
    let st = CrashStorage::new();
    let opts = CreateOptions {
        size: POOL_SIZE,
        block_size: BS as u32,
    };
    let mut pool = Pool::create_with(Box::new(st.clone()), Path::new("crash"), &opts).unwrap();
    // Stale bytes in free blocks, as a freed block whose punch did nothing
    // leaves them: a thin volume written, then removed.
    let t = pool.create_volume("old", 600 * BS).unwrap();
    pool.write(t, 0, &vec![0xee; 600 * BS as usize]).unwrap();
    pool.commit().unwrap();
    let keep = pool.create_volume("keep", 4 * BS).unwrap();
    pool.write(keep, 0, &vec![0x5a; 4 * BS as usize]).unwrap();
    pool.remove_volume("old").unwrap();
    pool.commit().unwrap();
    st.record(true);
    let base = st.durable();
    let g0 = pool.generation();
    // Two map levels at 4 KiB blocks (> 504 blocks).
    let blocks = if BS == 4096 { 700 } else { 90 };
    pool.create_volume_preallocated("db", blocks * BS, &mut |_, _| {})
        .unwrap();
    assert_eq!(pool.generation(), g0 + 1);
    drop(pool);
    let log = st.take_log();
    let mut rng = Rng::new(7);
    let mut points = 0;
    let mut seen = [false; 2];
    for cut in 0..=log.len() {
        let last_sync = log[..cut].iter().rposition(|o| *o == IoOp::Sync);
        let mut durable = base.clone();
        let epoch = last_sync.map_or(0, |i| i + 1);
        for op in &log[..epoch] {
            apply(&mut durable, op);
        }
        for mode in [
            CrashMode::AllLanded,
            CrashMode::NoneLanded,
            CrashMode::Sectors,
            CrashMode::TornPrefix,
        ] {
            let img = crash_image(&durable, &log[epoch..cut], mode, rng.next_u64());
            let ctx = format!("cut at call {cut} of {} ({mode:?})", log.len());
            let mut p = Pool::open_with(Box::new(MemStorage::from_bytes(img)), Path::new("crash"))
                .unwrap_or_else(|e| panic!("{ctx}: does not open: {e}"));
            let r = p.check().unwrap();
            assert!(r.is_clean(), "{ctx}: {:#?}", r.problems);
            let mut buf = vec![0u8; 4 * BS as usize];
            p.read(keep, 0, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == 0x5a), "{ctx}: 'keep' changed");
            match p.lookup("db") {
                Err(_) => {
                    assert_eq!(p.generation(), g0, "{ctx}");
                    seen[0] = true;
                }
                Ok(id) => {
                    assert_eq!(p.generation(), g0 + 1, "{ctx}");
                    let info = p.volume_info("db").unwrap();
                    assert!(info.preallocated, "{ctx}");
                    assert_eq!(p.block_map(id).unwrap().len() as u64, blocks, "{ctx}");
                    let mut all = vec![1u8; (blocks * BS) as usize];
                    p.read(id, 0, &mut all).unwrap();
                    assert!(all.iter().all(|&b| b == 0), "{ctx}: stale bytes show");
                    seen[1] = true;
                }
            }
            points += 1;
        }
    }
    assert_eq!(seen, [true, true], "both outcomes were reached");
    eprintln!(
        "preallocating create: {} calls, {points} crash points",
        log.len()
    );
}

#[test]
fn crash_with_the_intent_log() {
    let seeds: u64 = std::env::var("CRASH_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(LOG_SEEDS);
    let first: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (mut total, mut syncs, mut records) = (Counts::default(), 0, 0);
    for seed in first..first + seeds {
        let t = run_workload(100 + seed, 160, None, true);
        syncs += t.log.iter().filter(|o| **o == IoOp::Sync).count();
        records += after_records(&t, 0, t.log.len()).len();
        let c = crash_everywhere(&t, seed, 2);
        total.points += c.points;
        total.reused += c.reused;
        total.replayed += c.replayed;
        total.replay_cuts += c.replay_cuts;
        total.replay_points += c.replay_points;
    }
    let all = total.points + total.replay_points;
    eprintln!(
        "crash harness with the intent log: {seeds} workloads, {syncs} syncs, {records} log records, \
         {all} crash points ({} in workloads, {} of them opened by replaying records; \
         {} in the commits of {} replays), {} recovered pools reused",
        total.points, total.replayed, total.replay_points, total.replay_cuts, total.reused
    );
    assert!(
        total.replayed > 100,
        "too few images replayed records: {total:?}"
    );
    assert!(
        total.replay_points > 200,
        "too few cuts in replays: {total:?}"
    );
    assert!(all >= 2000, "only {all} crash points");
}

#[test]
fn io_failure_with_the_intent_log_leaves_a_commit_and_a_log_prefix() {
    let mut points = 0;
    for n in 1..LOG_FAILURES {
        for on_write in [true, false] {
            let count = if on_write { n * 5 } else { n };
            let t = run_workload(2000 + n, 60, Some((on_write, count)), true);
            points += crash_everywhere(&t, n, 0).points;
        }
    }
    eprintln!("I/O failure with the intent log: {points} crash points after injected failures");
}
