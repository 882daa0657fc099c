//! Data I/O in flight outside the engine lock.
//!
//! A read or write plans its blocks under the engine lock and does its
//! pread/pwrite after letting go of it. Until it is done, its blocks are
//! *pinned*: a pinned block that loses its last reference is not handed out
//! again (nor punched) until it is unpinned, so no I/O ever lands on a block
//! that has meanwhile become someone else's. A write that gives a block its
//! first contents (a block just allocated and mapped) also marks it
//! *filling*: readers that find it mapped wait for the fill, and a commit
//! waits for every fill, because it is about to make that mapping durable.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

/// Block numbers hash to themselves: they are already well spread, and this
/// map is touched twice per request.
#[derive(Default)]
struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type BlockMap = HashMap<u64, u32, BuildHasherDefault<BlockHasher>>;

#[derive(Default)]
struct State {
    pins: BlockMap,
    filling: BlockMap,
    writes: usize,
    /// Threads waiting on `done`: wake them only if there are any (a
    /// wake-up is a system call, and most requests have nobody waiting).
    waiters: usize,
}

/// Blocks with I/O in flight (see the module docs).
#[derive(Default)]
pub struct InFlight {
    state: Mutex<State>,
    done: Condvar,
    /// Blocks being filled, readable without the lock: most reads find none.
    fills: AtomicUsize,
    /// A write's I/O failed: its blocks (already mapped) hold stale contents.
    failed: AtomicBool,
}

/// What one request has in flight: released by [`InFlight::end`].
#[derive(Debug, Default)]
pub struct Ticket {
    pins: Vec<u64>,
    fills: Vec<u64>,
    write: bool,
}

impl Ticket {
    /// The blocks this request pinned.
    pub fn pins(&self) -> &[u64] {
        &self.pins
    }
}

impl InFlight {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pin `blocks` for a request (under the engine lock); `fills` are the
    /// blocks among them that get their first contents; `write` counts the
    /// request as a write in flight.
    pub fn begin(&self, blocks: Vec<u64>, fills: Vec<u64>, write: bool) -> Ticket {
        if blocks.is_empty() && !write {
            return Ticket::default();
        }
        let mut st = self.lock();
        for &b in &blocks {
            *st.pins.entry(b).or_insert(0) += 1;
        }
        for &b in &fills {
            *st.filling.entry(b).or_insert(0) += 1;
        }
        self.fills.fetch_add(fills.len(), Ordering::SeqCst);
        st.writes += write as usize;
        Ticket {
            pins: blocks,
            fills,
            write,
        }
    }

    /// The request's I/O is over (done or failed).
    pub fn end(&self, t: Ticket) {
        if t.pins.is_empty() && !t.write {
            return;
        }
        let n_fills = t.fills.len();
        let mut st = self.lock();
        for b in t.pins {
            if let Some(n) = st.pins.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    st.pins.remove(&b);
                }
            }
        }
        for b in t.fills {
            if let Some(n) = st.filling.get_mut(&b) {
                *n -= 1;
                if *n == 0 {
                    st.filling.remove(&b);
                }
            }
        }
        st.writes -= t.write as usize;
        self.fills.fetch_sub(n_fills, Ordering::SeqCst);
        let wake = st.waiters > 0;
        drop(st);
        if wake {
            self.done.notify_all();
        }
    }

    /// A request's write failed; called before its ticket ends, so whoever
    /// waited for its fills learns of it (see [`writes_failed`](Self::writes_failed)).
    pub fn write_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// A write failed: mapped blocks may hold stale data, so nothing may be
    /// read from them nor committed (the pool must go back to its last commit).
    pub fn writes_failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Wait on `done` until `busy` is false.
    fn wait_while(&self, mut busy: impl FnMut(&State) -> bool) {
        let mut st = self.lock();
        while busy(&st) {
            st.waiters += 1;
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
            st.waiters -= 1;
        }
    }

    pub fn is_pinned(&self, b: u64) -> bool {
        self.lock().pins.contains_key(&b)
    }

    /// Wait until none of `blocks` is being filled.
    pub fn wait_filled(&self, blocks: &[u64]) {
        // A fill of one of these was registered before the caller planned
        // (both under the engine lock), so a zero here means none is left.
        if self.fills.load(Ordering::SeqCst) == 0 {
            return;
        }
        self.wait_while(|st| blocks.iter().any(|b| st.filling.contains_key(b)));
    }

    /// Wait until no block is being filled (a commit is about to make their
    /// mappings durable). New fills start only under the engine lock, which
    /// the caller holds.
    pub fn wait_no_fills(&self) {
        self.wait_while(|st| !st.filling.is_empty());
    }

    /// Wait until no write is in flight (a snapshot must not change after
    /// it is taken). The caller holds the engine lock.
    pub fn wait_no_writes(&self) {
        self.wait_while(|st| st.writes > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pins_and_fills_are_released_by_their_ticket() {
        let f = Arc::new(InFlight::default());
        let t = f.begin(vec![5, 6], vec![6], true);
        assert!(f.is_pinned(5) && f.is_pinned(6));
        let f2 = f.clone();
        let waiter = std::thread::spawn(move || {
            f2.wait_filled(&[6]);
            f2.wait_no_writes();
            f2.is_pinned(6)
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!waiter.is_finished(), "waits for the fill");
        f.end(t);
        assert!(!waiter.join().unwrap());
        assert!(!f.is_pinned(5));
    }
}
