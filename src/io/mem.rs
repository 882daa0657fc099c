//! An in-memory storage, for tests and fuzzing.

use std::io;
use std::sync::{Arc, Mutex};

use super::Storage;

/// A growable byte vector behind a shared handle: clones see the same bytes,
/// so a test can keep a handle, drop the pool, and reopen or corrupt the image.
#[derive(Clone, Default)]
pub struct MemStorage {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemStorage {
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    pub fn from_bytes(bytes: Vec<u8>) -> MemStorage {
        MemStorage {
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }

    /// A copy of the current image.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    pub fn with_bytes<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.bytes.lock().unwrap())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let b = self.bytes.lock().unwrap();
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|e| *e <= b.len() as u64);
        match end {
            Some(end) => {
                buf.copy_from_slice(&b[offset as usize..end as usize]);
                Ok(())
            }
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past end",
            )),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut b = self.bytes.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > b.len() {
            b.resize(end, 0);
        }
        b[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.bytes.lock().unwrap().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.bytes.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut b = self.bytes.lock().unwrap();
        let start = (offset as usize).min(b.len());
        let end = (offset as usize).saturating_add(len as usize).min(b.len());
        b[start..end].fill(0);
        Ok(())
    }
}
