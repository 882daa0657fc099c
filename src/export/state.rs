//! What the FUSE workers, the control socket and the ticker of one server
//! share: the pool, the open files per volume, the stop flag.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

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
    /// Every FUSE and control request passes it; a handover closes it.
    pub gate: Gate,
    /// What the kernel said in its INIT (recorded by `ThinFs::init`).
    pub init: Mutex<Option<super::resume::InitInfo>>,
    /// Copies of this server's descriptors, for a handover.
    pub bundle: Mutex<Option<super::handover::Bundle>>,
    /// The holder's socket pair, when a holder started this server.
    pub holder: Option<std::os::fd::OwnedFd>,
    /// In-process clients (the snapshotter) depend on this process: no handover.
    pub refuse_handover: AtomicBool,
    /// A snapshotter worker: a signal asks for a hand-back to the holder
    /// (which keeps the export for the next worker), not for a stop.
    pub hand_back: AtomicBool,
    /// A signal asked for that hand-back; the snapshotter does it.
    pub hand_back_asked: AtomicBool,
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

    /// Open counts from the loop devices over our files (after a crash,
    /// the only record of what the kernel holds open).
    pub fn recount_opens(&self) {
        let pool = self.pool.read_engine();
        let mut opens = self.lock_opens();
        for d in super::sys::loop_devices() {
            if d.backing_file.parent() != Some(self.dir.as_path()) {
                continue;
            }
            let name = d.backing_file.file_name().and_then(|n| n.to_str());
            if let Some(id) = name.and_then(|n| pool.lookup(n).ok()) {
                *opens.entry(id).or_insert(0) += 1;
            }
        }
    }

    /// Tell the holder (if a holder started us) about an event; a holder
    /// that is gone is not an error: we serve on without one.
    pub fn tell_holder(&self, event: serde_json::Value) -> std::io::Result<()> {
        match &self.holder {
            Some(fd) => {
                use std::os::fd::AsRawFd;
                super::handover::send_msg(fd.as_raw_fd(), &event, &[])
            }
            None => Ok(()),
        }
    }

    /// A holder started us and is still there (its end of the pair is open).
    pub fn holder_alive(&self) -> bool {
        let Some(fd) = &self.holder else {
            return false;
        };
        use std::os::fd::AsRawFd;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        r == 0 || (r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) == 0)
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

//------------------------------------------------------------------------------
// Gate

/// Lets requests through until a handover closes it; then new requests
/// wait there (forever, if the handover succeeds: they stay unanswered on
/// the connection and the next server gets them resent).
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    closed: bool,
    inside: usize,
}

pub(crate) struct Pass<'a>(&'a Gate);

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until the gate is open and go in.
    pub fn enter(&self) -> Pass<'_> {
        let mut st = self.lock();
        while st.closed {
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.inside += 1;
        Pass(self)
    }

    /// Go in only if the gate is open now.
    pub fn try_enter(&self) -> Option<Pass<'_>> {
        let mut st = self.lock();
        if st.closed {
            return None;
        }
        st.inside += 1;
        Some(Pass(self))
    }

    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Close the gate and wait for the requests inside to leave; `false`
    /// (and the gate open again) if they do not within `timeout`.
    pub fn close(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        st.closed = true;
        while st.inside > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                st.closed = false;
                self.cv.notify_all();
                return false;
            }
            st = self
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }

    pub fn open(&self) {
        self.lock().closed = false;
        self.cv.notify_all();
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.inside -= 1;
        if st.inside == 0 {
            self.0.cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn gate_waits_for_requests_inside_and_holds_new_ones() {
        let g = Arc::new(Gate::default());
        let pass = g.enter();
        // A request inside keeps `close` from succeeding.
        assert!(!g.close(Duration::from_millis(50)));
        assert!(!g.is_closed());
        drop(pass);
        assert!(g.close(Duration::from_millis(50)));
        assert!(g.try_enter().is_none());
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = {
            let (g, entered) = (g.clone(), entered.clone());
            std::thread::spawn(move || {
                let _p = g.enter();
                entered.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!entered.load(std::sync::atomic::Ordering::SeqCst));
        g.open();
        t.join().unwrap();
        assert!(entered.load(std::sync::atomic::Ordering::SeqCst));
    }
}
