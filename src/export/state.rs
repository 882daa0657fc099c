//! What the FUSE workers, the control socket and the ticker of one server
//! share: the pool, the open files per volume, the stop flag.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

use fuser::Notifier;

use crate::error::Result;
use crate::pool::{SharedPool, VolumeId};

/// State shared by the FUSE workers, the control socket and the ticker.
pub(crate) struct Shared {
    pub pool: SharedPool,
    pub pool_path: PathBuf,
    pub dir: PathBuf,
    pub background: bool,
    pub started: SystemTime,
    pub block_size: u32,
    /// Shutting down: refuse new opens and requests.
    pub stopping: AtomicBool,
    /// The server has stopped: its helper threads exit.
    pub ended: AtomicBool,
    /// Open FUSE files per volume (a loop device holds one open while attached).
    pub opens: Mutex<HashMap<VolumeId, u32>>,
    pub idle: Condvar,
    pub notifier: Mutex<Option<Notifier>>,
}

impl Shared {
    pub fn lock_opens(&self) -> MutexGuard<'_, HashMap<VolumeId, u32>> {
        self.opens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Commit if needed and make it durable (group commit: see `SharedPool::flush`).
    pub fn commit(&self) -> Result<()> {
        self.pool.flush()
    }

    pub fn opened(&self, id: VolumeId) {
        *self.lock_opens().entry(id).or_insert(0) += 1;
    }

    pub fn released(&self, id: VolumeId) {
        let mut opens = self.lock_opens();
        if let Some(n) = opens.get_mut(&id) {
            *n -= 1;
            if *n == 0 {
                opens.remove(&id);
            }
        }
        if opens.is_empty() {
            self.idle.notify_all();
        }
    }

    pub fn in_use(&self, id: VolumeId) -> bool {
        self.lock_opens().contains_key(&id)
    }

    pub fn notify(&self, f: impl FnOnce(&Notifier) -> std::io::Result<()>) {
        if let Some(n) = self
            .notifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            // ENOENT just means the kernel had nothing cached.
            let _ = f(n);
        }
    }
}
