//! containerd's snapshot semantics on pool volumes. Every snapshot is one
//! volume named `ctrd-…`, and its record (key, kind, parent, labels, times)
//! is that volume's annotation: both are committed together, so the pool is
//! the only source of truth and a restart reads the state back from it.
//!
//! - Prepare without a parent clones the pool's ext4 template; with a parent
//!   it clones the parent's (read-only) volume; View makes a read-only
//!   snapshot. All O(1).
//! - Commit detaches the active snapshot's loop device, unmaps its ext4's
//!   dead journal log (`journal.rs`) and makes the same volume read-only
//!   under its new name: no copy.
//! - Mounts are ext4 on a loop device over the volume's exported file.
//!
//! - The records are read from the pool once, at start, into an [`Index`]
//!   (a cache checked against the pool on every use; see `index.rs`).
//!
//! Locking: one mutex serializes the snapshotter's operations; the pool lock
//! is taken inside it and never held while a loop device is set up (the loop
//! device opens the exported file, which the FUSE workers serve under the
//! pool lock).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::index::{Entry, Index};
use super::record::{Kind, Record};
use crate::control::Request;
use crate::error::Error;
use crate::export::{attach_file, sys, ServerHandle};
use crate::pool::VolumeId;

/// Volumes of the snapshotter are named with this prefix.
pub const VOLUME_PREFIX: &str = "ctrd-";
/// The empty, formatted ext4 every parentless snapshot is cloned from.
pub const TEMPLATE: &str = "ctrd-template";
/// A template being formatted (a crash can leave it; it is redone).
const TEMPLATE_NEW: &str = "ctrd-template-new";
/// The label carrying a layer's chain ID during unpack.
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// Labels with this prefix are the ones a snapshotter keeps.
pub const INHERITED_PREFIX: &str = "containerd.io/snapshot/";
/// Options of the ext4 mounts: the template's inode tables are left
/// uninitialised (tracked by the group descriptors); without
/// `noinit_itable` every mount would zero them in the background and copy
/// megabytes per container.
const RW_OPTIONS: &[&str] = &["rw", "noatime", "noinit_itable"];
const RO_OPTIONS: &[&str] = &["ro"];
/// `mkfs.ext4 -E` of the template (made once per pool: pools made before a
/// change keep the template they have).
/// - `lazy_itable_init`, `lazy_journal_init`: mkfs leaves the inode tables
///   and the journal unwritten (holes in the volume), so they cost nothing.
/// - `packed_meta_blocks`: the bitmaps, inode tables and the journal's start
///   at the front of the file system, not spread over it: the blocks a
///   container's ext4 writes fall under fewer block-map nodes, and its clone
///   copies 2 of them (8 KiB) less (docs/CONTAINERD.md, `tools/ext4-floor.sh`).
///   Placement only: the same features, journal and mount options.
const TEMPLATE_EXTENDED_OPTIONS: &str =
    "lazy_itable_init=1,lazy_journal_init=1,nodiscard,packed_meta_blocks=1";
/// ext4's block size: a pool block of this size holds exactly one ext4
/// block, so a container's metadata write copies nothing beside it.
const RECOMMENDED_BLOCK_SIZE: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

impl From<Error> for SnapError {
    fn from(e: Error) -> SnapError {
        match e {
            Error::InUse(m) => SnapError::FailedPrecondition(m),
            Error::InvalidArgument(m) => SnapError::InvalidArgument(m),
            e => SnapError::Internal(e.to_string()),
        }
    }
}

impl From<crate::export::ExportError> for SnapError {
    fn from(e: crate::export::ExportError) -> SnapError {
        match e {
            crate::export::ExportError::Pool(e) => e.into(),
            e => SnapError::Internal(e.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, SnapError>;

/// One mount of a snapshot, as containerd's `Mount` message carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Keep the labels a snapshotter stores: containerd's own metadata store
/// holds the rest.
pub fn inherited(labels: BTreeMap<String, String>) -> BTreeMap<String, String> {
    labels
        .into_iter()
        .filter(|(k, _)| k == SNAPSHOT_REF || k.starts_with(INHERITED_PREFIX))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub struct Store {
    server: ServerHandle,
    state: Mutex<State>,
    /// `THINPOOL_SNAPSHOTTER_TRACE` set: print how long each step of
    /// Prepare/Commit/Remove took (where a container's start time goes).
    trace: bool,
}

/// What the store's one mutex guards.
#[derive(Default)]
struct State {
    /// Loop devices this process attached, per volume.
    loops: HashMap<VolumeId, PathBuf>,
    /// The snapshot records, by key.
    index: Index,
}

fn not_found(key: &str) -> SnapError {
    SnapError::NotFound(format!("snapshot {key} does not exist"))
}

impl Store {
    pub fn new(server: ServerHandle) -> Store {
        Store {
            server,
            state: Mutex::new(State::default()),
            trace: std::env::var_os("THINPOOL_SNAPSHOTTER_TRACE").is_some(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// With tracing on, print `what` and the time of each step since `t0`.
    fn trace(&self, what: &str, key: &str, steps: &[(&str, Instant)], t0: Instant) {
        if !self.trace {
            return;
        }
        let mut last = t0;
        let mut line = format!("thinpool snapshotter: {what} {key}:");
        for (name, t) in steps {
            line.push_str(&format!(" {name} {:.1} ms,", ms(t.duration_since(last))));
            last = *t;
        }
        line.push_str(&format!(" total {:.1} ms", ms(last.duration_since(t0))));
        eprintln!("{line}");
    }

    /// The snapshot named `key`.
    fn get(&self, st: &mut State, key: &str) -> Result<Entry> {
        st.index
            .get(&self.server.pool(), key)
            .ok_or_else(|| not_found(key))
    }

    /// A change to the pool, keeping the index honest when it fails (the
    /// commit may or may not have happened).
    fn change<R>(
        &self,
        st: &mut State,
        f: impl FnOnce(&mut crate::pool::Pool) -> crate::error::Result<R>,
    ) -> Result<R> {
        self.server.change(f).map_err(|e| {
            st.index.mark_stale();
            e.into()
        })
    }

    //--------------------------------------------------------------------------
    // Start-up

    /// Make the pool ready: format the template once per pool (again if a
    /// crash interrupted it).
    pub fn start(&self, volume_size: u64) -> Result<()> {
        let mut st = self.lock();
        self.make_template(volume_size)?;
        let pool = self.server.pool();
        let bs = pool.block_size();
        if bs > RECOMMENDED_BLOCK_SIZE {
            eprintln!(
                "thinpool snapshotter: the pool's blocks are {} KiB: every ext4 metadata block a \
                 container writes copies {} KiB (pools made with --block-size 4K copy 4 KiB; \
                 docs/CONTAINERD.md)",
                bs / 1024,
                bs / 1024
            );
        }
        st.index = Index::load(&pool);
        drop(pool);
        self.adopt_loops(&mut st);
        Ok(())
    }

    /// Loop devices a previous snapshotter attached over our files (it was
    /// restarted under running containers, the holder kept the export):
    /// ours now, so Mounts answers the same device and Remove detaches it.
    fn adopt_loops(&self, st: &mut State) {
        let dir = self.server.export_dir();
        let pool = self.server.pool();
        let mut adopted = Vec::new();
        for d in sys::loop_devices() {
            if d.backing_file.parent() != Some(dir) {
                continue;
            }
            let name = d.backing_file.file_name().and_then(|n| n.to_str());
            let Some(id) = name.and_then(|n| pool.lookup(n).ok()) else {
                continue;
            };
            if pool.annotation(id).is_some() && !st.loops.contains_key(&id) {
                st.loops.insert(id, d.path());
                adopted.push(d.name);
            }
        }
        if !adopted.is_empty() {
            eprintln!(
                "thinpool snapshotter: adopted the loop devices of running snapshots: {}",
                adopted.join(", ")
            );
        }
    }

    fn make_template(&self, volume_size: u64) -> Result<()> {
        let have = |name: &str| self.server.pool().lookup(name).ok();
        if let Some(id) = have(TEMPLATE) {
            if self.server.pool().is_read_only(id)? {
                if let Some(id) = have(TEMPLATE_NEW) {
                    self.remove_volume(id, TEMPLATE_NEW)?;
                }
                return Ok(());
            }
            self.remove_volume(id, TEMPLATE)?;
        }
        if let Some(id) = have(TEMPLATE_NEW) {
            self.remove_volume(id, TEMPLATE_NEW)?;
        }
        let id = self
            .server
            .change(|p| p.stage_create(TEMPLATE_NEW, volume_size))?;
        let dev = attach_file(self.server.export_dir(), TEMPLATE_NEW, false)?;
        let made = sys::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "thinpool"])
                .args(["-E", TEMPLATE_EXTENDED_OPTIONS])
                .arg(&dev),
        );
        let _ = sys::losetup_detach(&dev);
        made?;
        if !self.wait_released(id) {
            return Err(SnapError::Internal(format!(
                "{TEMPLATE_NEW} is still held after its loop device was detached"
            )));
        }
        self.server
            .change(|p| p.stage_snapshot(TEMPLATE_NEW, TEMPLATE, false, None))?;
        self.remove_volume(id, TEMPLATE_NEW)?;
        eprintln!(
            "thinpool snapshotter: formatted the ext4 template ({})",
            crate::size::format_size(volume_size)
        );
        Ok(())
    }

    //--------------------------------------------------------------------------
    // Loop devices

    /// The volume's loop device: the one this process attached, or a new one
    /// (the export's one attach path; committed snapshots and views read-only).
    fn attach(&self, loops: &mut HashMap<VolumeId, PathBuf>, e: &Entry) -> Result<PathBuf> {
        if let Some(d) = loops.get(&e.id) {
            return Ok(d.clone());
        }
        let volume = self.server.pool().volume_name(e.id)?;
        let dev = attach_file(
            self.server.export_dir(),
            &volume,
            e.rec.kind != Kind::Active,
        )?;
        loops.insert(e.id, dev.clone());
        Ok(dev)
    }

    fn detach(&self, loops: &mut HashMap<VolumeId, PathBuf>, id: VolumeId) {
        if let Some(d) = loops.remove(&id) {
            if let Err(e) = sys::losetup_detach(&d) {
                eprintln!("thinpool snapshotter: {e}");
            }
        }
    }

    /// A detached loop device lets go of its file a moment later (or, while
    /// a file system is still mounted on it, when that is unmounted).
    fn wait_released(&self, id: VolumeId) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.in_use(id) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }

    /// Remove a volume once nothing holds its file; FailedPrecondition if
    /// something still does (containerd retries Remove at its next GC).
    fn remove_volume(&self, id: VolumeId, name: &str) -> Result<()> {
        if !self.wait_released(id) {
            return Err(SnapError::FailedPrecondition(format!(
                "volume {name} is still in use (mounted?); not removed"
            )));
        }
        self.server.execute(Request::Remove {
            name: name.to_string(),
        })?;
        Ok(())
    }

    fn mounts_of(&self, dev: &Path, kind: Kind) -> Vec<Mount> {
        let opts = if kind == Kind::Active {
            RW_OPTIONS
        } else {
            RO_OPTIONS
        };
        vec![Mount {
            fstype: "ext4".into(),
            source: dev.display().to_string(),
            options: opts.iter().map(|s| s.to_string()).collect(),
        }]
    }

    //--------------------------------------------------------------------------
    // The API

    /// Prepare (`kind` Active) or View (`kind` View) `key` on `parent`.
    pub fn prepare(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("empty snapshot key".into()));
        }
        let labels = inherited(labels);
        let t0 = Instant::now();
        let mut st = self.lock();
        let locked = Instant::now();
        let source = {
            let pool = self.server.pool();
            if st.index.get(&pool, key).is_some() {
                return Err(SnapError::AlreadyExists(format!(
                    "snapshot {key} already exists"
                )));
            }
            // The remote-snapshotter protocol: the layer is already here.
            if let Some(target) = labels.get(SNAPSHOT_REF) {
                if st
                    .index
                    .committed_ref(&pool, SNAPSHOT_REF, target, parent)
                    .is_some()
                {
                    return Err(SnapError::AlreadyExists(format!(
                        "target snapshot {target} already exists"
                    )));
                }
            }
            if parent.is_empty() {
                TEMPLATE.to_string()
            } else {
                match st.index.get(&pool, parent) {
                    Some(e) if e.rec.kind == Kind::Committed => pool.volume_name(e.id)?,
                    Some(_) => {
                        return Err(SnapError::FailedPrecondition(format!(
                            "parent {parent} is not a committed snapshot"
                        )))
                    }
                    None => {
                        return Err(SnapError::NotFound(format!(
                            "parent snapshot {parent} does not exist"
                        )))
                    }
                }
            }
        };
        let t = now_ns();
        let rec = Record {
            kind,
            key: key.to_string(),
            parent: parent.to_string(),
            created_ns: t,
            updated_ns: t,
            labels,
        };
        let volume = volume_name(key, t);
        let raw = rec.encode();
        let looked = Instant::now();
        let id = self.change(&mut st, |p| {
            p.stage_snapshot(&source, &volume, kind == Kind::Active, Some(raw))
        })?;
        let committed = Instant::now();
        let entry = Entry::new(id, rec);
        st.index.insert(entry.clone());
        match self.attach(&mut st.loops, &entry) {
            Ok(dev) => {
                let steps = [
                    ("lock", locked),
                    ("lookup", looked),
                    ("clone+commit", committed),
                    ("attach", Instant::now()),
                ];
                self.trace("prepare", key, &steps, t0);
                Ok(self.mounts_of(&dev, kind))
            }
            Err(e) => {
                // Leave nothing half-made behind.
                if self.remove_volume(id, &volume).is_ok() {
                    st.index.remove(key);
                } else {
                    st.index.mark_stale();
                }
                Err(e)
            }
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let mut st = self.lock();
        let e = self.get(&mut st, key)?;
        if e.rec.kind == Kind::Committed {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts (view or prepare on it)"
            )));
        }
        let dev = self.attach(&mut st.loops, &e)?;
        Ok(self.mounts_of(&dev, e.rec.kind))
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(SnapError::InvalidArgument("empty snapshot name".into()));
        }
        let t0 = Instant::now();
        let mut st = self.lock();
        let e = {
            let pool = self.server.pool();
            if st.index.get(&pool, name).is_some() {
                return Err(SnapError::AlreadyExists(format!(
                    "snapshot {name} already exists"
                )));
            }
            st.index.get(&pool, key).ok_or_else(|| not_found(key))?
        };
        if e.rec.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        let looked = Instant::now();
        self.detach(&mut st.loops, e.id);
        let detached = Instant::now();
        if !self.wait_released(e.id) {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is still in use (mounted?)"
            )));
        }
        let released = Instant::now();
        // The layer's ext4 is unmounted: its journal's log is dead weight.
        match super::journal::punch_dead_log(&self.server, e.id) {
            super::journal::Punched::Unmapped(n) => {
                eprintln!(
                    "thinpool snapshotter: commit {key}: unmapped {n} bytes of dead journal log"
                )
            }
            super::journal::Punched::Skipped(why) => {
                eprintln!("thinpool snapshotter: commit {key}: journal log kept: {why}")
            }
        }
        let punched = Instant::now();
        let t = now_ns();
        let rec = Record {
            kind: Kind::Committed,
            key: name.to_string(),
            parent: e.rec.parent,
            created_ns: t,
            updated_ns: t,
            labels: inherited(labels),
        };
        let raw = rec.encode();
        self.change(&mut st, |p| p.stage_annotation(e.id, Some(raw), true))?;
        st.index.replace(key, Entry::new(e.id, rec));
        let steps = [
            ("lookup", looked),
            ("detach", detached),
            ("release", released),
            ("punch journal", punched),
            ("freeze+commit", Instant::now()),
        ];
        self.trace("commit", key, &steps, t0);
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let t0 = Instant::now();
        let mut st = self.lock();
        let (e, volume) = {
            let pool = self.server.pool();
            let e = st.index.get(&pool, key).ok_or_else(|| not_found(key))?;
            if st.index.has_children(&pool, key) {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key} has children"
                )));
            }
            let volume = pool.volume_name(e.id)?;
            (e, volume)
        };
        let looked = Instant::now();
        self.detach(&mut st.loops, e.id);
        let detached = Instant::now();
        if let Err(err) = self.remove_volume(e.id, &volume) {
            st.index.mark_stale();
            return Err(err);
        }
        st.index.remove(key);
        let steps = [
            ("lookup", looked),
            ("detach", detached),
            ("release+remove", Instant::now()),
        ];
        self.trace("remove", key, &steps, t0);
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Record> {
        let mut st = self.lock();
        Ok(self.get(&mut st, key)?.rec)
    }

    /// Update labels (the only mutable field): `paths` as in a field mask,
    /// `labels` (all of them) or `labels.KEY` (one); none means all labels.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        let mut st = self.lock();
        let e = self.get(&mut st, key)?;
        let mut rec = e.rec;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            rec.labels = labels;
        } else {
            for p in paths {
                let Some(k) = p.strip_prefix("labels.") else {
                    return Err(SnapError::InvalidArgument(format!(
                        "cannot update field {p}: only labels are mutable"
                    )));
                };
                match labels.get(k) {
                    Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                    None => rec.labels.remove(k),
                };
            }
        }
        rec.labels = inherited(rec.labels);
        rec.updated_ns = now_ns();
        let raw = rec.encode();
        self.change(&mut st, |p| p.stage_annotation(e.id, Some(raw), false))?;
        st.index.replace(key, Entry::new(e.id, rec.clone()));
        Ok(rec)
    }

    /// Snapshots matching any of `filters` (all when empty).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Record>> {
        let filters = filters
            .iter()
            .map(|f| super::filter::Filter::parse(f))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(SnapError::InvalidArgument)?;
        let mut st = self.lock();
        let pool = self.server.pool();
        Ok(st
            .index
            .all(&pool)
            .into_iter()
            .filter(|r| filters.is_empty() || filters.iter().any(|f| f.matches(r)))
            .collect())
    }

    /// Bytes only this snapshot holds (its parent's excluded), from the block
    /// map's reference counts: no data block is read. Inodes are not counted
    /// (0): that would mean reading the file system.
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let mut st = self.lock();
        let pool = self.server.pool();
        let e = st.index.get(&pool, key).ok_or_else(|| not_found(key))?;
        let info = pool.volume_info(&pool.volume_name(e.id)?)?;
        Ok((info.exclusive_bytes as i64, 0))
    }

    /// Remove what a crash left half-made: snapshot volumes without a record,
    /// and loop devices of volumes that are gone or committed.
    pub fn cleanup(&self) -> Result<()> {
        let mut st = self.lock();
        let (orphans, stale): (Vec<(VolumeId, String)>, Vec<VolumeId>) = {
            let pool = self.server.pool();
            let orphans = pool
                .volume_names()
                .into_iter()
                .filter(|(id, n)| {
                    n.starts_with(VOLUME_PREFIX) && n != TEMPLATE && pool.annotation(*id).is_none()
                })
                .collect();
            let stale = st
                .loops
                .keys()
                .copied()
                .filter(|id| {
                    pool.annotation(*id)
                        .and_then(|a| Record::decode(a).ok())
                        .is_none_or(|r| r.kind == Kind::Committed)
                })
                .collect();
            (orphans, stale)
        };
        for id in stale {
            self.detach(&mut st.loops, id);
        }
        for (id, name) in orphans {
            eprintln!("thinpool snapshotter: cleanup removes half-made volume {name}");
            self.detach(&mut st.loops, id);
            self.remove_volume(id, &name)?;
        }
        Ok(())
    }

    /// Detach every loop device this process attached (on shutdown).
    pub fn detach_all(&self) {
        let mut st = self.lock();
        let ids: Vec<VolumeId> = st.loops.keys().copied().collect();
        for id in ids {
            self.detach(&mut st.loops, id);
        }
    }
}

/// A volume name for a new snapshot: unique per (key, time), valid as a
/// volume name whatever the key holds.
fn volume_name(key: &str, t: i64) -> String {
    let mut seed = key.as_bytes().to_vec();
    seed.extend_from_slice(&t.to_le_bytes());
    let d = crate::layer::sha256(&seed);
    format!("{VOLUME_PREFIX}{}", crate::layer::hex(&d[..8]))
}
