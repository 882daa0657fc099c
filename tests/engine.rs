//! Engine tests through the library API, on an in-memory storage and on files.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thinpool::io::{Hooked, MemStorage, Storage};
use thinpool::{CreateOptions, Error, Pool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[path = "support/pool.rs"]
mod pool;
use pool::{assert_clean, file_pool, kill, mem_pool, open_on, pattern, pool_on, reopen};

#[test]
fn unwritten_blocks_read_as_zeros_and_use_no_space() {
    let (_m, mut p) = mem_pool(64 * MIB, 64 * 1024);
    let id = p.create_volume("v", 1 << 40).unwrap();
    let before = p.info().unwrap().data_used_bytes;
    let mut buf = vec![1u8; 300_000];
    p.read(id, (1 << 40) - 300_000, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    assert_eq!(p.info().unwrap().data_used_bytes, before);
    assert_eq!(before, 0);
    assert_clean(&mut p);
}

#[test]
fn snapshot_shares_until_written_then_copies_one_block() {
    let (m, mut p) = mem_pool(64 * MIB, 64 * 1024);
    let v = p.create_volume("base", 8 * MIB).unwrap();
    let data = pattern(4 * MIB as usize, 7);
    p.write(v, 0, &data).unwrap();
    p.commit().unwrap();
    let used = p.info().unwrap().data_used_bytes;
    assert_eq!(used, 4 * MIB);
    let s = p.snapshot("base", "snap", false).unwrap();
    let c = p.snapshot("snap", "clone", true).unwrap();
    assert_eq!(
        p.info().unwrap().data_used_bytes,
        used,
        "snapshots must not copy data"
    );
    p.write(c, 100_000, b"hello").unwrap();
    assert_eq!(p.info().unwrap().data_used_bytes, used + 64 * KIB);
    let l = p.list().unwrap();
    let get = |n: &str| l.iter().find(|v| v.name == n).unwrap().clone();
    assert_eq!(get("clone").exclusive_bytes, 64 * KIB);
    assert_eq!(get("clone").mapped_bytes, 4 * MIB);
    assert_eq!(get("snap").parent.as_deref(), Some("base"));
    assert!(get("snap").read_only);
    assert!(matches!(p.write(s, 0, b"x"), Err(Error::ReadOnly(_))));
    let mut p = reopen(&m, p);
    let mut buf = vec![0u8; 4 * MIB as usize];
    p.read(s, 0, &mut buf).unwrap();
    assert_eq!(buf, data);
    p.read(c, 0, &mut buf).unwrap();
    let mut expect = data.clone();
    expect[100_000..100_005].copy_from_slice(b"hello");
    assert_eq!(buf, expect);
    assert_clean(&mut p);
    // Removing the clone gives back exactly its one block.
    p.remove_volume("clone").unwrap();
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    // Removing the origin keeps the snapshot whole.
    p.remove_volume("base").unwrap();
    let mut p = reopen(&m, p);
    p.read(s, 0, &mut buf).unwrap();
    assert_eq!(buf, data);
    assert_clean(&mut p);
    p.remove_volume("snap").unwrap();
    let i = p.info().unwrap();
    assert_eq!(i.data_used_bytes, 0);
    assert_clean(&mut p);
}

#[test]
fn discard_unmaps_whole_blocks_and_zeroes_the_rest() {
    let (_m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    p.write(v, 0, &vec![0xaa; MIB as usize]).unwrap();
    let used = p.info().unwrap().data_used_bytes;
    p.discard(v, 1000, 3 * 4096).unwrap(); // partial head, 2 whole blocks, partial tail
    assert_eq!(p.info().unwrap().data_used_bytes, used - 2 * 4096);
    let mut buf = vec![0u8; 5 * 4096];
    p.read(v, 0, &mut buf).unwrap();
    assert!(buf[..1000].iter().all(|&b| b == 0xaa));
    assert!(buf[1000..1000 + 3 * 4096].iter().all(|&b| b == 0));
    assert!(buf[1000 + 3 * 4096..].iter().all(|&b| b == 0xaa));
    assert_clean(&mut p);
}

#[test]
fn full_pool_is_enospc_and_recovers_after_free() {
    let (_m, mut p) = mem_pool(2 * MIB, 4096);
    let v = p.create_volume("v", 64 * MIB).unwrap();
    let mut written = 0u64;
    let err = loop {
        match p.write(v, written, &[0x55; 4096]) {
            Ok(()) => written += 4096,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, Error::NoSpace), "{err}");
    assert!(written > MIB);
    p.commit().unwrap();
    assert_clean(&mut p);
    p.discard(v, 0, 64 * 4096).unwrap();
    p.write(v, written, &[0x66; 4096]).unwrap();
    let mut b = [0u8; 4096];
    p.read(v, written - 4096, &mut b).unwrap();
    assert_eq!(b, [0x55; 4096]);
    assert_clean(&mut p);
}

#[test]
fn low_water_grow_and_read_only_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pool");
    let mut p = file_pool(&path, 8 * MIB, 4096);
    let v = p.create_volume("v", 64 * MIB).unwrap();
    let i = p.info().unwrap();
    assert_eq!((i.low_water_pct, i.low_space), (10, false));
    p.write(v, 0, &vec![1; (7 * MIB + MIB / 2) as usize])
        .unwrap();
    assert!(
        p.info().unwrap().low_space,
        "7.5 of 8 MiB used is below a 10% low-water mark"
    );
    p.set_low_water(5).unwrap();
    assert!(p.set_low_water(0).is_err());
    assert!(!p.info().unwrap().low_space, "about 6% free is above 5%");
    // Grow the pool: writes that did not fit now do.
    assert!(matches!(
        p.write(v, 8 * MIB, &vec![2; 4 * MIB as usize]),
        Err(Error::NoSpace)
    ));
    p.grow(64 * MIB).unwrap();
    assert!(matches!(p.grow(MIB), Err(Error::InvalidArgument(_))));
    p.write(v, 8 * MIB, &vec![2; 4 * MIB as usize]).unwrap();
    let i = p.info().unwrap();
    assert_eq!((i.size, i.low_water_pct, i.low_space), (64 * MIB, 5, false));
    assert_clean(&mut p);
    drop(p);
    // Inspection shares the lock; writers are refused while it is held.
    let mut r1 = Pool::open_read_only(&path).unwrap();
    let r2 = Pool::open_read_only(&path).unwrap();
    assert!(matches!(Pool::open(&path), Err(Error::InUse(_))));
    assert_eq!(r1.info().unwrap().size, 64 * MIB);
    let mut b = vec![0u8; 4096];
    r1.read(v, 10 * MIB, &mut b).unwrap();
    assert_eq!(b, vec![2; 4096]);
    assert!(r1.write(v, 0, b"x").is_err());
    assert!(r1.create_volume("w", MIB).is_err());
    assert!(r1.check().unwrap().is_clean());
    drop((r1, r2));
    Pool::open(&path).unwrap();
}

/// Growing a volume by several map levels on a full pool fails with ENOSPC
/// and leaves nothing behind (no half-built levels, no leaked node).
#[test]
fn failed_multi_level_grow_leaks_nothing() {
    let (_m, mut p) = mem_pool(2 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    let filler = p.create_volume("filler", 64 * MIB).unwrap();
    p.write(v, 0, &[1; 4096]).unwrap();
    let mut at = 0;
    while p.write(filler, at, &[2; 4096]).is_ok() {
        at += 4096;
    }
    p.commit().unwrap();
    // Free exactly one block: room for one new level, not two.
    p.discard(filler, 0, 4096).unwrap();
    p.commit().unwrap();
    let r = p.resize_volume("v", 3 << 30);
    assert!(matches!(r, Err(Error::NoSpace)), "{r:?}");
    p.commit().unwrap();
    assert_clean(&mut p);
    assert_eq!(p.volume_info("v").unwrap().virtual_size, MIB);
    let mut b = [0u8; 4096];
    p.read(v, 0, &mut b).unwrap();
    assert_eq!(b, [1; 4096]);
}

/// A valid page written by a later (unfinished) commit, sitting where the
/// commit being read expects its own page, is refused rather than used.
#[test]
fn a_page_newer_than_its_commit_is_refused() {
    use thinpool::format::{decode_page, encode_page, PageType};
    let (m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    p.write(v, 0, &[7; 4096]).unwrap();
    p.commit().unwrap();
    let g = p.generation();
    drop(p);
    // Re-stamp the volume's map node as if a later commit had rewritten it.
    let forged = m.with_bytes(|b| {
        for blk in 2..b.len() / 4096 {
            let page = &mut b[blk * 4096..(blk + 1) * 4096];
            if let Ok(mut h) = decode_page(page, PageType::MapNode, blk as u64) {
                h.generation = g + 2;
                encode_page(page, &h);
                return true;
            }
        }
        false
    });
    assert!(forged, "no map node found in the image");
    let mut p = open_on(m.clone());
    let mut b = [0u8; 4096];
    let e = p.read(v, 0, &mut b).unwrap_err();
    assert!(e.to_string().contains("written by generation"), "{e}");
}

#[test]
fn errors_are_typed() {
    let (_m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    assert!(matches!(
        p.create_volume("v", MIB),
        Err(Error::VolumeExists(_))
    ));
    assert!(matches!(
        p.snapshot("nope", "x", true),
        Err(Error::NoSuchVolume(_))
    ));
    assert!(matches!(
        p.write(v, MIB - 1, b"ab"),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        p.create_volume("a/b", MIB),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        p.resize_volume("v", 10),
        Err(Error::InvalidArgument(_))
    ));
    p.resize_volume("v", 1 << 50).unwrap();
    p.write(v, (1 << 50) - 4096, &[1; 4096]).unwrap();
    assert_clean(&mut p);
}

#[test]
fn file_pool_is_sparse_locked_and_versioned() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.pool");
    let p = file_pool(&path, 100 << 30, 64 * 1024);
    assert!(matches!(Pool::open(&path), Err(Error::InUse(_))));
    drop(p);
    use std::os::unix::fs::MetadataExt;
    let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
    // Metadata, and the intent log's 512 KiB reserved on the host.
    assert!(on_disk <= 1024 * 1024, "new 100G pool uses {on_disk} bytes");
    assert!(matches!(
        Pool::create(
            &path,
            &CreateOptions {
                size: 1 << 30,
                block_size: 65536
            }
        ),
        Err(Error::InvalidArgument(_))
    ));
    // A future format version is refused clearly.
    let mut bytes = std::fs::read(&path).unwrap();
    for slot in [0usize, 4096] {
        bytes[slot + 8] = 9;
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        Pool::open(&path),
        Err(Error::UnsupportedVersion { found: 9, .. })
    ));
    std::fs::write(&path, b"just some text file").unwrap();
    assert!(matches!(Pool::open(&path), Err(Error::NotAPool { .. })));
}

#[test]
fn torn_superblock_write_opens_at_previous_commit() {
    let m = MemStorage::new();
    // The next superblock write, once armed, is torn (half written, then an
    // error), as a power cut in the middle of a commit's last step would.
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = {
        let armed = armed.clone();
        Hooked::new(m.clone()).on_write(move |inner, buf, off| {
            if off < 8192 && armed.load(Ordering::SeqCst) {
                // Half the slot lands, the other half is garbage: a slot whose
                // old second half happened to equal the new one would be a
                // complete write, not a torn one (commits reuse page locations).
                let half = buf.len() / 2;
                inner.write_at(&buf[..half], off)?;
                inner.write_at(&vec![0xa5; buf.len() - half], off + half as u64)?;
                return Err(std::io::Error::other("power cut"));
            }
            inner.write_at(buf, off)
        })
    };
    let mut p = pool_on(s, 16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    p.write(v, 0, &[1; 4096]).unwrap();
    p.commit().unwrap();
    let snap = p.snapshot("v", "snap", false).unwrap();
    let g = p.generation();
    p.write(v, 0, &[2; 8192]).unwrap();
    armed.store(true, Ordering::SeqCst);
    assert!(p.remove_volume("snap").is_err(), "its commit is torn");
    assert!(
        p.commit().is_err(),
        "pool refuses work after a failed commit"
    );
    drop(p);
    let mut p = open_on(m.clone());
    assert_eq!(p.generation(), g);
    let mut b = [0u8; 4096];
    p.read(snap, 0, &mut b).unwrap();
    assert_eq!(b, [1; 4096], "the snapshot is intact at the last commit");
    assert_clean(&mut p);
}

#[test]
fn snapshot_cost_does_not_depend_on_mapped_size() {
    // Counting work, not time: a snapshot writes the same pages (its catalog
    // page, the refcount page of the root, their index pages, a superblock)
    // and changes one refcount, whatever the origin's size. A snapshot that
    // touched every block's count would dirty the refcount pages of all of
    // them: 128 MiB of 4 KiB blocks span 33 refcount pages.
    let c = Host::new(4096);
    let mut p = pool_on(c.clone(), 256 * MIB, 4096);
    p.create_volume("small", MIB).unwrap();
    let small = p.lookup("small").unwrap();
    p.write(small, 0, &[1u8; 4096]).unwrap();
    let big = p.create_volume("big", 128 * MIB).unwrap();
    p.write(big, 0, &vec![3u8; 128 * MIB as usize]).unwrap();
    p.commit().unwrap();
    let written = |p: &mut Pool, from: &str, to: &str| {
        let before = c.writes.load(Ordering::SeqCst);
        let rc_before = refcounts(&c.inner);
        p.snapshot(from, to, false).unwrap();
        let changed = refcounts(&c.inner)
            .iter()
            .zip(rc_before)
            .filter(|(a, b)| **a != *b)
            .count();
        (c.writes.load(Ordering::SeqCst) - before, changed)
    };
    let (w_small, rc_small) = written(&mut p, "small", "s1");
    let (w_big, rc_big) = written(&mut p, "big", "s2");
    assert_eq!(
        (w_small, rc_small),
        (w_big, rc_big),
        "a snapshot of 1 block and of 32,768 blocks wrote (pages, refcounts changed) \
         ({w_small}, {rc_small}) and ({w_big}, {rc_big})"
    );
    // One count goes up (the root's); the rest are the commit's own pages
    // moving (each freed old page and newly allocated one).
    assert!(w_big <= 8, "a snapshot wrote {w_big} blocks");
    assert_clean(&mut p);
}

/// Every block's reference count as committed in a pool image.
fn refcounts(m: &MemStorage) -> Vec<u32> {
    let f = thinpool::forge::Forge::new(m.snapshot()).unwrap();
    (0..f.sb.total_blocks)
        .map(|b| f.refcount(b).unwrap_or(0))
        .collect()
}

//------------------------------------------------------------------------------
// Zero writes stay unmapped (qcow2's detect-zeroes=unmap)

fn mapped(p: &mut Pool, name: &str) -> Vec<u64> {
    let id = p.lookup(name).unwrap();
    p.mapped_blocks(id).unwrap()
}

#[test]
fn a_zero_block_written_to_an_unmapped_block_maps_nothing() {
    let (_m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    let g = p.generation();
    let used = p.info().unwrap().data_used_bytes;
    p.write(v, 0, &vec![0u8; 64 * 4096]).unwrap();
    assert!(mapped(&mut p, "v").is_empty());
    // Not even a map node: the commit has nothing to write.
    p.commit().unwrap();
    assert_eq!(p.generation(), g);
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    // A partial block of zeros is an ordinary write (it may sit next to data).
    p.write(v, 4096 + 100, &[0u8; 100]).unwrap();
    assert_eq!(mapped(&mut p, "v"), vec![1]);
    assert_clean(&mut p);
}

#[test]
fn a_zero_block_written_over_an_owned_block_unmaps_it() {
    let (m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    p.write(v, 0, &pattern(8 * 4096, 1)).unwrap();
    p.commit().unwrap();
    let used = p.info().unwrap().data_used_bytes;
    // Blocks 2..5 zeroed, in one write with data around them.
    let mut buf = pattern(8 * 4096, 2);
    buf[2 * 4096..6 * 4096].fill(0);
    p.write(v, 0, &buf).unwrap();
    assert_eq!(mapped(&mut p, "v"), vec![0, 1, 6, 7]);
    p.commit().unwrap();
    assert_eq!(p.info().unwrap().data_used_bytes, used - 4 * 4096);
    let mut p = reopen(&m, p);
    let mut back = vec![1u8; 8 * 4096];
    p.read(v, 0, &mut back).unwrap();
    assert_eq!(back, buf);
    assert_clean(&mut p);
}

#[test]
fn a_zero_block_written_over_a_shared_block_drops_only_the_reference() {
    let (_m, mut p) = mem_pool(16 * MIB, 4096);
    let v = p.create_volume("v", MIB).unwrap();
    let data = pattern(4 * 4096, 3);
    p.write(v, 0, &data).unwrap();
    p.snapshot("v", "snap", false).unwrap();
    let used = p.info().unwrap().data_used_bytes;
    p.write(v, 4096, &vec![0u8; 2 * 4096]).unwrap();
    p.commit().unwrap();
    assert_eq!(mapped(&mut p, "v"), vec![0, 3]);
    assert_eq!(mapped(&mut p, "snap"), vec![0, 1, 2, 3]);
    // Nothing was copied; the snapshot now holds blocks 1 and 2 alone.
    assert_eq!(p.info().unwrap().data_used_bytes, used);
    let snap = p.volume_info("snap").unwrap();
    assert_eq!(snap.exclusive_bytes, 2 * 4096);
    let s = p.lookup("snap").unwrap();
    let mut back = vec![0u8; 4 * 4096];
    p.read(s, 0, &mut back).unwrap();
    assert_eq!(back, data);
    p.read(v, 0, &mut back).unwrap();
    assert_eq!(&back[4096..3 * 4096], &vec![0u8; 2 * 4096][..]);
    assert_eq!(&back[3 * 4096..], &data[3 * 4096..]);
    assert_clean(&mut p);
}

//------------------------------------------------------------------------------
// A full host file system

/// A memory storage that counts the writes through it (what a commit
/// costs), and whose "host" can be full: a block has host space once it was
/// written or reserved, until punched; while `full`, reserving or writing any
/// other block fails with ENOSPC, as on a full file system.
#[derive(Clone)]
struct Host {
    inner: MemStorage,
    bs: u64,
    writes: Arc<AtomicU64>,
    with_space: Arc<std::sync::Mutex<std::collections::HashSet<u64>>>,
    full: Arc<std::sync::atomic::AtomicBool>,
}

impl Host {
    fn new(bs: u64) -> Host {
        Host {
            inner: MemStorage::new(),
            bs,
            writes: Default::default(),
            with_space: Default::default(),
            full: Default::default(),
        }
    }

    fn blocks(&self, offset: u64, len: u64) -> std::ops::Range<u64> {
        offset / self.bs..(offset + len).div_ceil(self.bs)
    }

    /// Give the range host space (ENOSPC while full, unless it has it).
    fn take_space(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut s = self.with_space.lock().unwrap();
        let blocks = self.blocks(offset, len);
        if self.full.load(Ordering::SeqCst) && blocks.clone().any(|b| !s.contains(&b)) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        s.extend(blocks);
        Ok(())
    }
}

impl thinpool::io::Storage for Host {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.take_space(offset, buf.len() as u64)?;
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut s = self.with_space.lock().unwrap();
        for b in offset / self.bs..(offset + len) / self.bs {
            s.remove(&b);
        }
        self.inner.punch(offset, len)
    }
    fn reserve(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.take_space(offset, len)
    }
}

#[test]
fn a_full_host_fails_the_write_not_the_pool() {
    let host = Host::new(4096);
    let mut p = pool_on(host.clone(), 32 * MIB, 4096);
    let v = p.create_volume("v", 16 * MIB).unwrap();
    let first = pattern(MIB as usize, 1);
    p.write(v, 0, &first).unwrap();
    p.commit().unwrap();
    // Churn a little so that commits have freed metadata pages to reuse.
    for i in 0..4 {
        p.write(v, i * 4096, &pattern(4096, i as u8)).unwrap();
        p.commit().unwrap();
    }
    p.write(v, 0, &first).unwrap();
    p.commit().unwrap();

    host.full.store(true, Ordering::SeqCst);
    let e = p
        .write(v, 4 * MIB, &pattern(2 * MIB as usize, 2))
        .unwrap_err();
    assert!(matches!(e, Error::HostFull), "{e}");
    assert_eq!(e.errno(), libc::ENOSPC);
    // The pool is not failed: what was written before the error commits,
    // in-place overwrites still work, reads and check are fine.
    p.commit().unwrap();
    p.write(v, 0, &pattern(4096, 9)).unwrap();
    p.commit().unwrap();
    let mut back = vec![0u8; 4096];
    p.read(v, 4096, &mut back).unwrap();
    assert_eq!(back, first[4096..8192]);
    assert_clean(&mut p);

    host.full.store(false, Ordering::SeqCst);
    let later = pattern(2 * MIB as usize, 3);
    p.write(v, 4 * MIB, &later).unwrap();
    p.commit().unwrap();
    p.close().unwrap();
    let mut p = open_on(host.clone());
    let mut back = vec![0u8; 2 * MIB as usize];
    p.read(v, 4 * MIB, &mut back).unwrap();
    assert_eq!(back, later);
    assert_clean(&mut p);
}

#[test]
fn a_pool_open_read_only_refuses_changes_with_erofs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p");
    let mut p = file_pool(&path, 16 * MIB, 4096);
    p.create_volume("v", MIB).unwrap();
    p.close().unwrap();
    let mut p = Pool::open_read_only(&path).unwrap();
    let v = p.lookup("v").unwrap();
    for e in [
        p.discard(v, 0, 4096).unwrap_err(),
        p.write(v, 0, b"x").unwrap_err(),
    ] {
        assert!(matches!(e, Error::PoolReadOnly(_)), "{e}");
        assert_eq!(e.errno(), libc::EROFS);
    }
}

/// Rewrite both superblock slots as format version 1 (annotation fields
/// zero, as version 1 kept them), re-sealing the checksums.
fn make_version_1(m: &MemStorage) {
    use thinpool::io::Storage;
    for slot in [0u64, 4096] {
        let mut b = vec![0u8; 4096];
        m.read_at(&mut b, slot).unwrap();
        // The salt is whatever makes the stored checksum right.
        let stored = u32::from_le_bytes(b[12..16].try_into().unwrap());
        let salt = stored ^ crc32fast::hash(&b[16..]);
        assert!(
            b[2656..].iter().all(|&x| x == 0),
            "annotation or log fields in use"
        );
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&b[16..]) ^ salt;
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        m.write_at(&b, slot).unwrap();
    }
}

fn slot_versions(m: &MemStorage) -> [u32; 2] {
    use thinpool::io::Storage;
    [0u64, 4096].map(|slot| {
        let mut b = [0u8; 4];
        m.read_at(&mut b, slot + 8).unwrap();
        u32::from_le_bytes(b)
    })
}

#[test]
fn a_version_1_pool_opens_and_is_upgraded_by_its_first_commit() {
    // Versions 1 and 2 had no intent log.
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: 64 * MIB,
        block_size: 4096,
    };
    let mut p = Pool::create_without_log(Box::new(m.clone()), Path::new("mem"), &opts).unwrap();
    let id = p.create_volume("v", MIB).unwrap();
    p.write(id, 0, &pattern(8192, 3)).unwrap();
    p.close().unwrap();
    make_version_1(&m);
    assert_eq!(slot_versions(&m), [1, 1]);
    let mut p = open_on(m.clone());
    let mut buf = vec![0u8; 8192];
    p.read(id, 0, &mut buf).unwrap();
    assert_eq!(buf, pattern(8192, 3));
    assert_clean(&mut p);
    // The first commit writes version 3 into its slot, and places a log.
    assert_eq!(p.log_area(), (0, 0));
    p.snapshot("v", "s", false).unwrap();
    assert!(slot_versions(&m).contains(&thinpool::format::FORMAT_VERSION));
    assert_ne!(p.log_area(), (0, 0));
    let mut p = reopen(&m, p);
    assert_clean(&mut p);
}

#[test]
fn annotations_are_committed_with_their_volume() {
    let (m, mut p) = mem_pool(64 * MIB, 4096);
    p.create_volume("base", MIB).unwrap();
    let a = p
        .snapshot_annotated("base", "a", true, Some(b"record a".to_vec()))
        .unwrap();
    // Larger than a page: the stream spans pages.
    let big = pattern(10_000, 7);
    let b = p
        .snapshot_annotated("base", "b", false, Some(big.clone()))
        .unwrap();
    let mut p = reopen(&m, p);
    assert_eq!(p.annotation(a), Some(&b"record a"[..]));
    assert_eq!(p.annotation(b), Some(&big[..]));
    assert_clean(&mut p);
    // Replace + freeze in one commit; removing a volume drops its annotation.
    p.annotate(a, Some(b"now committed".to_vec()), true)
        .unwrap();
    p.remove_volume("b").unwrap();
    let mut p = reopen(&m, p);
    assert_eq!(p.annotation(a), Some(&b"now committed"[..]));
    assert!(p.is_read_only(a).unwrap());
    assert_eq!(p.annotated(), vec![a]);
    assert_clean(&mut p);
    assert!(matches!(
        p.snapshot_annotated("base", "c", true, Some(vec![0; 2 << 20])),
        Err(Error::InvalidArgument(_))
    ));
    assert!(p.lookup("c").is_err(), "a refused snapshot leaves nothing");
}

//------------------------------------------------------------------------------
// The intent log

/// A pool on memory whose fdatasyncs are counted.
fn counted_pool(size: u64, bs: u32) -> (MemStorage, Arc<AtomicU64>, Pool) {
    let m = MemStorage::new();
    let syncs = Arc::new(AtomicU64::new(0));
    let s = syncs.clone();
    let st = Hooked::new(m.clone()).on_sync(move |inner| {
        s.fetch_add(1, Ordering::SeqCst);
        inner.sync()
    });
    (m, syncs, pool_on(st, size, bs))
}

#[test]
fn with_the_log_a_flush_is_one_fdatasync_and_a_reopen_replays_it() {
    let (m, syncs, mut p) = counted_pool(64 * MIB, 4096);
    assert_ne!(p.log_area(), (0, 0), "a new pool has a log");
    let id = p.create_volume("v", 8 * MIB).unwrap();
    p.set_logging(true);
    // The first logged write starts an epoch with a commit.
    p.write(id, 0, &pattern(4096, 1)).unwrap();
    p.flush().unwrap();
    let g = p.generation();
    for i in 0..20u64 {
        let before = syncs.load(Ordering::SeqCst);
        // A fresh block, a partial write into it (copied again: it is
        // log-pinned) and a discard.
        p.write(id, (i + 1) * 8192, &pattern(4096, i as u8))
            .unwrap();
        p.write(id, (i + 1) * 8192 + 100, &pattern(300, 7)).unwrap();
        p.discard(id, 0, 4096).unwrap();
        p.write(id, 0, &pattern(4096, 3)).unwrap();
        p.flush().unwrap();
        assert_eq!(
            syncs.load(Ordering::SeqCst) - before,
            1,
            "one fdatasync per flush"
        );
    }
    assert_eq!(p.generation(), g, "flushes did not commit");
    assert!(p.log_records() >= 60);
    let mut want = vec![0u8; 8 * MIB as usize];
    p.read(id, 0, &mut want).unwrap();
    // A killed process: nothing more is committed.
    kill(p);
    let mut p = open_on(m.clone());
    let r = p.log_replay().unwrap().clone();
    assert_eq!(r.generation, g);
    assert!(r.records >= 60, "{r:?}");
    assert_eq!(p.generation(), g + 1, "the replay is committed");
    let mut got = vec![0u8; 8 * MIB as usize];
    p.read(id, 0, &mut got).unwrap();
    assert!(got == want);
    assert_clean(&mut p);
    // A second open finds the log restarted (nothing more to replay).
    let p = reopen(&m, p);
    assert_eq!(p.log_replay().unwrap().records, 0);
}

#[test]
fn a_read_only_open_replays_in_memory_and_repair_commits_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool");
    let mut p = file_pool(&path, 64 * MIB, 4096);
    let id = p.create_volume("v", MIB).unwrap();
    p.set_logging(true);
    p.write(id, 0, &pattern(3 * 4096, 9)).unwrap();
    p.flush().unwrap();
    let g = p.generation();
    kill(p);
    let mut ro = Pool::open_read_only(&path).unwrap();
    assert_eq!(ro.generation(), g, "nothing was written");
    let mut buf = vec![0u8; 3 * 4096];
    ro.read(id, 0, &mut buf).unwrap();
    assert!(
        buf == pattern(3 * 4096, 9),
        "list and read see the replayed log"
    );
    let report = ro.check().unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.log.as_ref().unwrap().records, 3);
    assert!(report.notes.iter().any(|n| n.contains("intent log")));
    assert_eq!(ro.list().unwrap()[0].mapped_bytes, 3 * 4096);
    drop(ro);
    let r = thinpool::repair::repair(&path).unwrap();
    assert!(
        r.fixed.iter().any(|f| f.contains("replayed 3")),
        "{:?}",
        r.fixed
    );
    assert!(r.new_generation > g);
    let mut p = Pool::open(&path).unwrap();
    assert_eq!(p.log_replay().unwrap().records, 0);
    p.read(id, 0, &mut buf).unwrap();
    assert!(buf == pattern(3 * 4096, 9));
    assert_clean(&mut p);
}

#[test]
fn a_pool_without_a_log_gains_one_at_its_first_commit() {
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: 64 * MIB,
        block_size: 4096,
    };
    let mut p = Pool::create_without_log(Box::new(m.clone()), Path::new("mem"), &opts).unwrap();
    assert_eq!(p.log_area(), (0, 0));
    let id = p.create_volume("v", MIB).unwrap();
    p.set_logging(true);
    assert!(!p.logging(), "no log: every flush commits");
    let g = p.generation();
    p.write(id, 0, &pattern(4096, 1)).unwrap();
    p.flush().unwrap();
    assert_eq!(p.generation(), g + 1);
    assert_eq!(p.log_area(), (0, 0), "not in the session that made it");
    let mut p = reopen(&m, p);
    let g = p.generation();
    p.write(id, 4096, &pattern(4096, 2)).unwrap();
    p.commit().unwrap();
    assert_eq!(p.generation(), g + 1);
    let (start, blocks) = p.log_area();
    // Two halves of 256 KiB, or 1/256 of a small pool.
    assert!(start > 0 && blocks == 64, "{start} {blocks}");
    assert_clean(&mut p);
    p.set_logging(true);
    assert!(p.logging());
    p.write(id, 8192, &pattern(4096, 3)).unwrap();
    p.flush().unwrap();
    kill(p);
    let mut p = open_on(m);
    let mut buf = vec![0u8; 3 * 4096];
    p.read(id, 0, &mut buf).unwrap();
    assert_eq!(&buf[8192..], &pattern(4096, 3)[..]);
    assert_clean(&mut p);
}

#[test]
fn a_torn_or_dataless_record_ends_the_replay_there() {
    let (m, _syncs, mut p) = counted_pool(64 * MIB, 4096);
    let id = p.create_volume("v", MIB).unwrap();
    p.set_logging(true);
    for i in 0..4u64 {
        p.write(id, i * 4096, &pattern(4096, i as u8 + 1)).unwrap();
    }
    p.flush().unwrap();
    let (start, blocks) = p.log_area();
    let g = p.generation();
    kill(p);
    let img = m.snapshot();
    let half = (start + (g % 2) * (blocks as u64 / 2)) * 4096;
    // The third record torn: two are replayed.
    let mut torn = img.clone();
    torn[half as usize + 2 * 64 + 40] ^= 1;
    let mut p = open_on(MemStorage::from_bytes(torn));
    let r = p.log_replay().unwrap();
    assert_eq!((r.records, r.end_slot), (2, 2), "{r:?}");
    assert!(r.end.contains("checksum"), "{r:?}");
    assert_eq!(p.mapped_blocks(id).unwrap(), vec![0, 1]);
    assert_clean(&mut p);
    // The second record's data never landed: it is skipped (that write was
    // never acknowledged), the records after it are replayed.
    let mut lost = img.clone();
    let at = half as usize + 64 + 48;
    let b = u64::from_le_bytes(lost[at..at + 8].try_into().unwrap()) as usize;
    lost[b * 4096 + 7] ^= 1;
    let mut p = open_on(MemStorage::from_bytes(lost));
    let r = p.log_replay().unwrap();
    assert_eq!((r.records, r.end_slot), (3, 4), "{r:?}");
    assert_eq!(p.mapped_blocks(id).unwrap(), vec![0, 2, 3]);
    assert_clean(&mut p);
}
