//! The pool file opened `O_DIRECT` (`serve --direct`): the engine's core
//! cases over it, its refusal where O_DIRECT is missing, and read-modify-write under
//! concurrency. O_DIRECT needs a file system that supports it: the files go
//! under /var/tmp (on a disk), and a refusal there fails the test.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use thinpool::io::{DirectStorage, Storage};
use thinpool::Pool;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[path = "support/pool.rs"]
mod pool;
use pool::{assert_clean, file_pool, pattern};

fn disk_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/var/tmp").expect("a temp dir under /var/tmp")
}

fn open_direct(path: &Path) -> Pool {
    Pool::open_direct(path).unwrap_or_else(|e| {
        panic!(
            "O_DIRECT was refused for {} (this test needs a file system that supports it): {e}",
            path.display()
        )
    })
}

#[test]
fn core_cases_over_direct_io() {
    for bs in [4096u32, 64 * 1024] {
        let dir = disk_dir();
        let path = dir.path().join("pool");
        file_pool(&path, 256 * MIB, bs).close().unwrap();
        let mut p = open_direct(&path);
        let v = p.create_volume("v", 16 * MIB).unwrap();
        // Aligned, unaligned (offset and length), and block-spanning writes.
        let a = pattern(MIB as usize, 1);
        let b = pattern(1000, 2);
        let c = pattern(3 * bs as usize + 17, 3);
        p.write(v, 0, &a).unwrap();
        p.write(v, 4 * MIB + 333, &b).unwrap();
        p.write(v, 8 * MIB - 5, &c).unwrap();
        p.snapshot("v", "snap", false).unwrap();
        // Copy-on-write of a partial block under the snapshot.
        p.write(v, 100, &[0xaa; 50]).unwrap();
        p.commit().unwrap();
        let db = p
            .create_volume_preallocated("db", 2 * MIB, &mut |_, _| {})
            .unwrap();
        p.write(db, 4097, &b).unwrap();
        p.close().unwrap();

        let mut p = open_direct(&path);
        let s = p.lookup("snap").unwrap();
        let mut got = vec![0u8; a.len()];
        p.read(s, 0, &mut got).unwrap();
        assert!(got == a, "{bs}: snapshot data");
        p.read(v, 0, &mut got).unwrap();
        assert_eq!(&got[100..150], &[0xaa; 50]);
        assert_eq!(&got[..100], &a[..100]);
        assert_eq!(&got[150..], &a[150..]);
        let mut got = vec![0u8; b.len()];
        p.read(v, 4 * MIB + 333, &mut got).unwrap();
        assert!(got == b);
        let mut got = vec![0u8; c.len()];
        p.read(v, 8 * MIB - 5, &mut got).unwrap();
        assert!(got == c);
        let mut got = vec![1u8; 2 * MIB as usize];
        p.read(db, 0, &mut got).unwrap();
        assert_eq!(&got[4097..4097 + b.len()], &b[..]);
        assert!(got[..4097].iter().all(|&x| x == 0));
        assert!(got[4097 + b.len()..].iter().all(|&x| x == 0));
        assert_clean(&mut p);
        p.close().unwrap();
        // And the buffered open reads the same pool.
        let mut p = Pool::open(&path).unwrap();
        assert_clean(&mut p);
    }
}

/// A ramfs mounted on a temp dir for one test, unmounted on drop.
struct Ramfs {
    dir: tempfile::TempDir,
}

impl Ramfs {
    fn mount() -> Ramfs {
        // SAFETY: geteuid has no preconditions.
        assert!(
            unsafe { libc::geteuid() } == 0,
            "this test mounts a ramfs: run it as root (CI does)"
        );
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "ramfs", "thinpool-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount -t ramfs failed");
        Ramfs { dir }
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

/// A file system without O_DIRECT (ramfs; tmpfs too before Linux 6.6):
/// `--direct` is refused with a message that says why and what to do.
#[test]
fn a_file_system_without_o_direct_is_refused_clearly() {
    let ram = Ramfs::mount();
    let path = ram.dir.path().join("pool");
    file_pool(&path, 64 * MIB, 65536).close().unwrap();
    let e = Pool::open_direct(&path)
        .err()
        .expect("ramfs refuses O_DIRECT");
    let msg = e.to_string();
    assert!(msg.contains("does not support direct I/O"), "{msg}");
    assert!(msg.contains("without --direct"), "{msg}");
    // The buffered open still works.
    Pool::open(&path).unwrap().close().unwrap();
}

fn direct_file(path: &Path, len: u64) -> DirectStorage {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("O_DIRECT refused for {}: {e}", path.display()));
    f.set_len(len).unwrap();
    DirectStorage::new(f)
}

#[test]
fn unaligned_requests_round_trip_and_reads_past_the_end_fail() {
    let dir = disk_dir();
    let s = direct_file(&dir.path().join("f"), 64 * KIB);
    assert!(s.is_direct());
    let data = pattern(10_000, 9);
    s.write_at(&data, 1234).unwrap();
    // Bytes around it stay zero; one byte at a unit's edge; a misaligned buffer.
    let mut got = vec![1u8; 12_000];
    s.read_at(&mut got, 0).unwrap();
    assert!(got[..1234].iter().all(|&b| b == 0));
    assert_eq!(&got[1234..11_234], &data[..]);
    assert!(got[11_234..].iter().all(|&b| b == 0));
    s.write_at(&[7], 4095).unwrap();
    let mut one = [0u8; 2];
    s.read_at(&mut one, 4095).unwrap();
    assert_eq!(one, [7, data[4096 - 1234]]);
    let mut odd = vec![0u8; 4096 + 1];
    s.read_at(&mut odd[1..], 4096).unwrap();
    assert_eq!(&odd[1..], &got[4096..8192]);
    let e = s.read_at(&mut [0u8; 10], 64 * KIB - 5).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    // A write past the end extends the file.
    s.write_at(&[3u8; 10], 64 * KIB + 100).unwrap();
    assert_eq!(s.len().unwrap(), 64 * KIB + 4096);
    s.zero(0, 8192).unwrap();
    s.read_at(&mut got[..8192], 0).unwrap();
    assert!(got[..8192].iter().all(|&b| b == 0));
}

#[test]
fn concurrent_read_modify_writes_of_one_page_lose_nothing() {
    // Eight threads write interleaved, disjoint, unaligned pieces of the
    // same pages again and again; each piece must end as its thread's last
    // round, and whole-unit writers beside them must not be undone.
    const THREADS: usize = 8;
    const PAGES: u64 = 16;
    const ROUNDS: u8 = 40;
    let dir = disk_dir();
    let s = Arc::new(direct_file(&dir.path().join("f"), PAGES * 4096 * 2));
    let piece = |t: usize, page: u64| (page * 4096 + 3 + t as u64 * 500, 311usize);
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let s = s.clone();
        handles.push(std::thread::spawn(move || {
            for round in 1..=ROUNDS {
                for page in 0..PAGES {
                    let (off, len) = piece(t, page);
                    s.write_at(&vec![round.wrapping_mul(7) ^ t as u8; len], off)
                        .unwrap();
                }
            }
        }));
    }
    // Whole pages of the second half: aligned writes beside the RMWs.
    let w = s.clone();
    handles.push(std::thread::spawn(move || {
        for round in 1..=ROUNDS {
            for page in PAGES..2 * PAGES {
                w.write_at(&[round; 4096], page * 4096).unwrap();
            }
        }
    }));
    for h in handles {
        h.join().unwrap();
    }
    let mut img = vec![0u8; (2 * PAGES * 4096) as usize];
    s.read_at(&mut img, 0).unwrap();
    for t in 0..THREADS {
        for page in 0..PAGES {
            let (off, len) = piece(t, page);
            let want = ROUNDS.wrapping_mul(7) ^ t as u8;
            assert!(
                img[off as usize..off as usize + len]
                    .iter()
                    .all(|&b| b == want),
                "thread {t} page {page}: a piece was lost"
            );
        }
    }
    assert!(img[(PAGES * 4096) as usize..].iter().all(|&b| b == ROUNDS));
}
