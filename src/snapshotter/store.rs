//! containerd's snapshot semantics on pool volumes. Every snapshot is one
//! volume named `ctrd-…`, and its record (key, kind, parent, labels, times)
//! is that volume's annotation: both are committed together, so the pool is
//! the only source of truth and a restart reads the state back from it.
//!
//! - Prepare without a parent clones the pool's ext4 template; with a parent
//!   it clones the parent's (read-only) volume; View makes a read-only
//!   snapshot. All O(1).
//! - Commit detaches the active snapshot's loop device and makes the same
//!   volume read-only under its new name: no copy.
//! - Mounts are ext4 on a loop device over the volume's exported file.
//!
//! Locking: one mutex serializes the snapshotter's operations; the pool lock
//! is taken inside it and never held while a loop device is set up (the loop
//! device opens the exported file, which the FUSE workers serve under the
//! pool lock).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::record::{Kind, Record};
use crate::control::Request;
use crate::error::Error;
use crate::export::{sys, ServerHandle};
use crate::pool::{Pool, VolumeId};

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

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

pub struct Store {
    server: ServerHandle,
    /// Loop devices this process attached, per volume.
    loops: Mutex<HashMap<VolumeId, PathBuf>>,
}

/// A snapshot found by key: its volume and record.
struct Found {
    id: VolumeId,
    volume: String,
    rec: Record,
}

impl Store {
    pub fn new(server: ServerHandle) -> Store {
        Store {
            server,
            loops: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<VolumeId, PathBuf>> {
        self.loops.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn file(&self, volume: &str) -> PathBuf {
        self.server.export_dir().join(volume)
    }

    /// Every snapshot record in the pool (a record that cannot be decoded
    /// is reported and skipped: it is not containerd's).
    fn records(pool: &Pool) -> Vec<(VolumeId, Record)> {
        let mut v = Vec::new();
        for id in pool.annotated() {
            match pool.annotation(id).map(Record::decode) {
                Some(Ok(r)) => v.push((id, r)),
                Some(Err(e)) => eprintln!("thinpool snapshotter: volume #{id}: {e}"),
                None => {}
            }
        }
        v
    }

    fn find(pool: &Pool, key: &str) -> Option<Found> {
        Store::records(pool)
            .into_iter()
            .find(|(_, r)| r.key == key)
            .map(|(id, rec)| Found {
                id,
                volume: pool.volume_name(id).unwrap_or_default(),
                rec,
            })
    }

    fn get(pool: &Pool, key: &str) -> Result<Found> {
        Store::find(pool, key)
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {key} does not exist")))
    }

    //--------------------------------------------------------------------------
    // Start-up

    /// Make the pool ready: format the template once per pool (again if a
    /// crash interrupted it).
    pub fn start(&self, volume_size: u64) -> Result<()> {
        let _g = self.lock();
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
        let dev = sys::losetup_attach(&self.file(TEMPLATE_NEW), false)?;
        let made = sys::run(
            std::process::Command::new("mkfs.ext4")
                .args(["-q", "-F", "-L", "thinpool"])
                .args(["-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard"])
                .arg(&dev),
        );
        let _ = sys::losetup_detach(&dev);
        made?;
        self.wait_released(id);
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

    fn attach(&self, loops: &mut HashMap<VolumeId, PathBuf>, f: &Found) -> Result<PathBuf> {
        if let Some(d) = loops.get(&f.id) {
            return Ok(d.clone());
        }
        let dev = sys::losetup_attach(&self.file(&f.volume), f.rec.kind != Kind::Active)?;
        loops.insert(f.id, dev.clone());
        Ok(dev)
    }

    fn detach(&self, loops: &mut HashMap<VolumeId, PathBuf>, id: VolumeId) {
        if let Some(d) = loops.remove(&id) {
            if let Err(e) = sys::losetup_detach(&d) {
                eprintln!("thinpool snapshotter: {e}");
            }
        }
    }

    /// A detached loop device lets go of its file a moment later.
    fn wait_released(&self, id: VolumeId) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.in_use(id) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }

    fn remove_volume(&self, id: VolumeId, name: &str) -> Result<()> {
        self.wait_released(id);
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
        let mut loops = self.lock();
        let found = {
            let pool = self.server.pool();
            let records = Store::records(&pool);
            if records.iter().any(|(_, r)| r.key == key) {
                return Err(SnapError::AlreadyExists(format!(
                    "snapshot {key} already exists"
                )));
            }
            // The remote-snapshotter protocol: the layer is already here.
            if let Some(target) = labels.get(SNAPSHOT_REF) {
                if records.iter().any(|(_, r)| {
                    r.kind == Kind::Committed
                        && r.labels.get(SNAPSHOT_REF) == Some(target)
                        && r.parent == parent
                }) {
                    return Err(SnapError::AlreadyExists(format!(
                        "target snapshot {target} already exists"
                    )));
                }
            }
            let source = if parent.is_empty() {
                TEMPLATE.to_string()
            } else {
                match records.iter().find(|(_, r)| r.key == parent) {
                    Some((id, r)) if r.kind == Kind::Committed => pool.volume_name(*id)?,
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
            };
            drop(pool);
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
            let id = self.server.change(|p| {
                p.stage_snapshot(&source, &volume, kind == Kind::Active, Some(rec.encode()))
            })?;
            Found { id, volume, rec }
        };
        match self.attach(&mut loops, &found) {
            Ok(dev) => Ok(self.mounts_of(&dev, kind)),
            Err(e) => {
                // Leave nothing half-made behind.
                let _ = self.remove_volume(found.id, &found.volume);
                Err(e)
            }
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let mut loops = self.lock();
        let f = Store::get(&self.server.pool(), key)?;
        if f.rec.kind == Kind::Committed {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is committed: it has no mounts (view or prepare on it)"
            )));
        }
        let dev = self.attach(&mut loops, &f)?;
        Ok(self.mounts_of(&dev, f.rec.kind))
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(SnapError::InvalidArgument("empty snapshot name".into()));
        }
        let mut loops = self.lock();
        let f = {
            let pool = self.server.pool();
            if Store::find(&pool, name).is_some() {
                return Err(SnapError::AlreadyExists(format!(
                    "snapshot {name} already exists"
                )));
            }
            Store::get(&pool, key)?
        };
        if f.rec.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is not active"
            )));
        }
        self.detach(&mut loops, f.id);
        if !self.wait_released(f.id) {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key} is still in use (mounted?)"
            )));
        }
        let t = now_ns();
        let rec = Record {
            kind: Kind::Committed,
            key: name.to_string(),
            parent: f.rec.parent,
            created_ns: t,
            updated_ns: t,
            labels: inherited(labels),
        };
        self.server
            .change(|p| p.stage_annotation(f.id, Some(rec.encode()), true))?;
        Ok(())
    }

    pub fn remove(&self, key: &str) -> Result<()> {
        let mut loops = self.lock();
        let f = {
            let pool = self.server.pool();
            let f = Store::get(&pool, key)?;
            if Store::records(&pool).iter().any(|(_, r)| r.parent == key) {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key} has children"
                )));
            }
            f
        };
        self.detach(&mut loops, f.id);
        self.remove_volume(f.id, &f.volume)
    }

    pub fn stat(&self, key: &str) -> Result<Record> {
        let _g = self.lock();
        Ok(Store::get(&self.server.pool(), key)?.rec)
    }

    /// Update labels (the only mutable field): `paths` as in a field mask,
    /// `labels` (all of them) or `labels.KEY` (one); none means all labels.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Record> {
        let _g = self.lock();
        let f = Store::get(&self.server.pool(), key)?;
        let mut rec = f.rec;
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
        self.server
            .change(|p| p.stage_annotation(f.id, Some(rec.encode()), false))?;
        Ok(rec)
    }

    /// Snapshots matching any of `filters` (all when empty).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Record>> {
        let filters = filters
            .iter()
            .map(|f| super::filter::Filter::parse(f))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(SnapError::InvalidArgument)?;
        let _g = self.lock();
        let pool = self.server.pool();
        Ok(Store::records(&pool)
            .into_iter()
            .map(|(_, r)| r)
            .filter(|r| filters.is_empty() || filters.iter().any(|f| f.matches(r)))
            .collect())
    }

    /// Bytes only this snapshot holds (its parent's excluded), from the block
    /// map's reference counts: no data block is read. Inodes are not counted
    /// (0): that would mean reading the file system.
    pub fn usage(&self, key: &str) -> Result<(i64, i64)> {
        let _g = self.lock();
        let pool = self.server.pool();
        let f = Store::get(&pool, key)?;
        let info = pool.volume_info(&f.volume)?;
        Ok((info.exclusive_bytes as i64, 0))
    }

    /// Remove what a crash left half-made: snapshot volumes without a record,
    /// and loop devices of volumes that are gone or committed.
    pub fn cleanup(&self) -> Result<()> {
        let mut loops = self.lock();
        let (orphans, stale): (Vec<(VolumeId, String)>, Vec<VolumeId>) = {
            let pool = self.server.pool();
            let orphans = pool
                .volume_names()
                .into_iter()
                .filter(|(id, n)| {
                    n.starts_with(VOLUME_PREFIX) && n != TEMPLATE && pool.annotation(*id).is_none()
                })
                .collect();
            let stale = loops
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
            self.detach(&mut loops, id);
        }
        for (id, name) in orphans {
            eprintln!("thinpool snapshotter: cleanup removes half-made volume {name}");
            self.detach(&mut loops, id);
            self.remove_volume(id, &name)?;
        }
        Ok(())
    }

    /// Detach every loop device this process attached (on shutdown).
    pub fn detach_all(&self) {
        let mut loops = self.lock();
        let ids: Vec<VolumeId> = loops.keys().copied().collect();
        for id in ids {
            self.detach(&mut loops, id);
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
