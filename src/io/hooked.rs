//! A storage that forwards everything to another, except the reads, writes
//! and syncs its hooks take over: fault injection for tests without a wrapper
//! type (and its six forwarding methods) per fault.

use std::io;

use super::Storage;

type ReadHook<S> = Box<dyn Fn(&S, &mut [u8], u64) -> io::Result<()> + Send + Sync>;
type WriteHook<S> = Box<dyn Fn(&S, &[u8], u64) -> io::Result<()> + Send + Sync>;
type SyncHook<S> = Box<dyn Fn(&S) -> io::Result<()> + Send + Sync>;

pub struct Hooked<S> {
    inner: S,
    read: ReadHook<S>,
    write: WriteHook<S>,
    sync: SyncHook<S>,
}

impl<S: Storage> Hooked<S> {
    pub fn new(inner: S) -> Self {
        Hooked {
            inner,
            read: Box::new(|s, buf, offset| s.read_at(buf, offset)),
            write: Box::new(|s, buf, offset| s.write_at(buf, offset)),
            sync: Box::new(|s| s.sync()),
        }
    }

    /// Reads go through `f`, which is given the inner storage.
    pub fn on_read(
        mut self,
        f: impl Fn(&S, &mut [u8], u64) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.read = Box::new(f);
        self
    }

    /// Writes go through `f`, which is given the inner storage.
    pub fn on_write(
        mut self,
        f: impl Fn(&S, &[u8], u64) -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        self.write = Box::new(f);
        self
    }

    /// Syncs go through `f`, which is given the inner storage.
    pub fn on_sync(mut self, f: impl Fn(&S) -> io::Result<()> + Send + Sync + 'static) -> Self {
        self.sync = Box::new(f);
        self
    }
}

impl<S: Storage> Storage for Hooked<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (self.read)(&self.inner, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (self.write)(&self.inner, buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (self.sync)(&self.inner)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.reserve(offset, len)
    }
    fn zero(&self, offset: u64, len: u64) -> io::Result<()> {
        // As written zeros, so the write hook sees (and may fail) them.
        super::write_zeros(self, offset, len)
    }
    fn is_direct(&self) -> bool {
        self.inner.is_direct()
    }
}
