//! Damaged and hostile pool images.
//!
//! - The damage generator (`thinpool::repair::damage`) makes each kind of
//!   damage `check` must find: a leaked block, a wrong refcount, a checksum
//!   error in a map node, a mapping past a volume's end, a damaged newest
//!   commit. `repair` fixes the ones it can and `check` is clean afterwards;
//!   the others are reported and left alone.
//! - A property test flips bytes in metadata pages and superblocks, truncates
//!   the file, or overwrites ranges with random bytes, and asserts that open,
//!   check, list and reads return errors (or open the older valid commit) —
//!   never panic.

use std::path::Path;

use proptest::prelude::*;
use thinpool::check::IssueKind;
use thinpool::io::{MemStorage, Storage};
use thinpool::repair::{damage, repair_with};
use thinpool::{CreateOptions, Pool};

const BS: u64 = 4096;

/// A pool with a few volumes, a snapshot and a clone, some shared blocks and
/// a two-level map; returns the storage and the generation of the last commit.
fn sample_pool() -> (MemStorage, u64) {
    let m = MemStorage::new();
    let opts = CreateOptions {
        size: 8 << 20,
        block_size: BS as u32,
    };
    let mut p = Pool::create_with(Box::new(m.clone()), Path::new("mem"), &opts).unwrap();
    let a = p.create_volume("a", 64 * BS).unwrap();
    p.write(a, 0, &vec![0x11; 10 * BS as usize]).unwrap();
    p.snapshot("a", "snap", false).unwrap();
    let c = p.snapshot("snap", "clone", true).unwrap();
    p.write(c, 3 * BS + 5, b"changed").unwrap();
    let big = p.create_volume("big", 2000 * BS).unwrap();
    p.write(big, 1500 * BS, &vec![0x22; 3 * BS as usize])
        .unwrap();
    p.write(big, 7, b"head").unwrap();
    p.commit().unwrap();
    let g = p.generation();
    p.close().unwrap();
    (m, g)
}

fn open(m: &MemStorage) -> thinpool::Result<Pool> {
    Pool::open_with(Box::new(m.clone()), Path::new("mem"))
}

fn repair(m: &MemStorage, dir: &Path) -> thinpool::repair::RepairReport {
    let m2 = m.clone();
    let opener = move || -> thinpool::Result<Box<dyn Storage>> { Ok(Box::new(m2.clone())) };
    repair_with(&opener, Path::new("mem"), &dir.join("pool.repair-backup-")).unwrap()
}

fn read_all(p: &mut Pool, name: &str) -> thinpool::Result<Vec<u8>> {
    let id = p.lookup(name)?;
    let mut buf = vec![0u8; p.volume_size(id)? as usize];
    p.read(id, 0, &mut buf)?;
    Ok(buf)
}

#[test]
fn leaked_block_is_found_and_freed_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = sample_pool();
    let mut p = open(&m).unwrap();
    let before = read_all(&mut p, "clone").unwrap();
    let free_before = p.info().unwrap().data_free_bytes;
    let b = damage::leak_block(&mut p).unwrap();
    let r = p.check().unwrap();
    assert_eq!(r.issues.len(), 1, "{:#?}", r.issues);
    assert_eq!(r.issues[0].kind, IssueKind::LeakedBlock);
    assert_eq!(r.issues[0].block, Some(b));
    assert!(
        r.problems[0].contains(&format!("block {b}: leaked")),
        "{}",
        r.problems[0]
    );
    p.close().unwrap();
    let rep = repair(&m, dir.path());
    assert!(rep.is_clean(), "{rep:#?}");
    assert_eq!(rep.fixed.len(), 1, "{rep:#?}");
    assert!(rep.backup.as_ref().unwrap().exists());
    let mut p = open(&m).unwrap();
    assert!(p.check().unwrap().is_clean());
    assert_eq!(p.info().unwrap().data_free_bytes, free_before);
    assert_eq!(read_all(&mut p, "clone").unwrap(), before);
}

#[test]
fn wrong_refcount_is_found_and_rebuilt_by_repair() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = sample_pool();
    let mut p = open(&m).unwrap();
    let a = p.lookup("a").unwrap();
    let root = damage::root_block(&p, "a").unwrap();
    damage::bump_refcount(&mut p, root).unwrap();
    let r = p.check().unwrap();
    let is = r
        .issues
        .iter()
        .find(|i| i.kind == IssueKind::WrongRefcount)
        .expect("found");
    assert_eq!(
        (is.block, is.expected, is.found),
        (Some(root), Some(2), Some(3)),
        "{is:?}"
    );
    let data = read_all(&mut p, "a").unwrap();
    p.close().unwrap();
    let rep = repair(&m, dir.path());
    assert!(rep.is_clean(), "{rep:#?}");
    let mut p = open(&m).unwrap();
    assert!(p.check().unwrap().is_clean());
    // The rebuilt count is right: writing through the shared root still copies.
    p.write(a, 0, b"new").unwrap();
    assert_eq!(&read_all(&mut p, "snap").unwrap()[..3], &data[..3]);
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn checksum_error_in_a_map_node_is_reported_with_its_path_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (m, _) = sample_pool();
    let p = open(&m).unwrap();
    let big = damage::root_block(&p, "big").unwrap();
    // The root of 'big' is level 1; damage the leaf under slot 2 (blocks 1008..1512).
    let mut root = vec![0u8; BS as usize];
    m.read_at(&mut root, big * BS).unwrap();
    let leaf = u64::from_le_bytes(root[64 + 8 * 2..64 + 8 * 3].try_into().unwrap());
    assert_ne!(leaf, 0);
    drop(p);
    m.with_bytes(|b| b[(leaf * BS + 900) as usize] ^= 0x10);
    let mut p = open(&m).unwrap();
    let r = p.check().unwrap();
    let is = r
        .issues
        .iter()
        .find(|i| i.kind == IssueKind::BadNode)
        .expect("found");
    assert_eq!(is.volume.as_deref(), Some("big"));
    assert_eq!(is.path, vec![2]);
    assert_eq!(is.block, Some(leaf));
    assert!(is.message.contains("checksum"), "{}", is.message);
    assert!(
        read_all(&mut p, "big").is_err(),
        "reading through the bad node is an error"
    );
    assert!(
        read_all(&mut p, "clone").is_ok(),
        "other volumes still read"
    );
    drop(p);
    let rep = repair(&m, dir.path());
    assert!(!rep.is_clean());
    assert!(
        rep.unfixed.iter().any(|u| u.contains("checksum")),
        "{rep:#?}"
    );
}

#[test]
fn mapping_past_the_end_is_reported() {
    let (m, _) = sample_pool();
    let mut p = open(&m).unwrap();
    damage::shrink_record(&mut p, "big", 1000 * BS).unwrap();
    let r = p.check().unwrap();
    let is = r
        .issues
        .iter()
        .find(|i| i.kind == IssueKind::MappedPastEnd)
        .expect("found");
    assert_eq!(is.virtual_block, Some(1502));
    assert!(is.message.contains("'big'"));
}

#[test]
fn damaged_newest_commit_falls_back_to_the_older_one() {
    // Metadata pages freed by commit g+1 are reused only by later commits, so
    // until then commit g is intact: repair goes back to it when g+1's own
    // pages are damaged, and its commit replaces the newest slot.
    let dir = tempfile::tempdir().unwrap();
    let (m, g0) = sample_pool();
    let mut p = open(&m).unwrap();
    let a = p.lookup("a").unwrap();
    p.write(a, 0, &[0x99; 4096]).unwrap();
    p.commit().unwrap();
    let g = p.generation();
    assert_eq!(g, g0 + 1);
    drop(p);
    let slot = ((g % 2) * 4096) as usize;
    let sb = thinpool::format::Superblock::decode(&m.snapshot()[slot..slot + 4096]).unwrap();
    let mut idx = vec![0u8; BS as usize];
    m.read_at(&mut idx, sb.rc_index[0] * BS).unwrap();
    let rc_page = u64::from_le_bytes(idx[64..72].try_into().unwrap());
    m.with_bytes(|b| b[(rc_page * BS + 200) as usize] ^= 1);
    let e = open(&m).err().expect("does not open").to_string();
    assert!(e.contains("refcount page") && e.contains("checksum"), "{e}");
    let rep = repair(&m, dir.path());
    assert_eq!(rep.generation, g0);
    assert!(rep.fixed[0].contains("went back to generation"), "{rep:#?}");
    assert!(rep.is_clean(), "{rep:#?}");
    let mut p = open(&m).unwrap();
    assert_eq!(p.generation(), g0 + 1);
    assert_eq!(
        read_all(&mut p, "a").unwrap()[0],
        0x11,
        "the older commit's data"
    );
    assert!(p.check().unwrap().is_clean());
}

#[test]
fn torn_newest_superblock_opens_the_previous_commit_and_repair_rewrites_it() {
    use thinpool::io::CrashStorage;
    let dir = tempfile::tempdir().unwrap();
    let (m, g) = sample_pool();
    // A commit whose superblock write is cut short by a power failure.
    let st = CrashStorage::from_bytes(m.snapshot());
    let mut p = Pool::open_with(Box::new(st.clone()), Path::new("mem")).unwrap();
    let a = p.lookup("a").unwrap();
    p.write(a, 0, &[0x99; 4096]).unwrap();
    st.fail_sync_in(Some(2));
    assert!(p.commit().is_err());
    drop(p);
    let mut img = st.current();
    let torn = (((g + 1) % 2) * 4096) as usize;
    img[torn + 2048..torn + 4096].fill(0);
    let m = MemStorage::from_bytes(img);
    let mut p = open(&m).unwrap();
    assert_eq!(p.generation(), g, "opens the last complete commit");
    let r = p.check().unwrap();
    assert!(r.is_clean(), "{:?}", r.problems);
    assert!(
        r.notes.iter().any(|n| n.contains("invalid")),
        "{:?}",
        r.notes
    );
    assert_eq!(read_all(&mut p, "a").unwrap()[0], 0x11);
    drop(p);
    let rep = repair(&m, dir.path());
    assert!(rep.is_clean(), "{rep:#?}");
    assert!(
        rep.fixed.iter().any(|f| f.contains("superblock slot")),
        "{rep:#?}"
    );
    let mut p = open(&m).unwrap();
    assert_eq!(p.generation(), g + 1);
    let r = p.check().unwrap();
    assert!(r.is_clean() && r.notes.is_empty(), "{r:?}");
}

//------------------------------------------------------------------------------
// Hostile images

/// Byte offsets of every metadata page in an image (found by page magic).
fn metadata_pages(img: &[u8]) -> Vec<usize> {
    let magics: [u32; 4] = [0x4e4d_5054, 0x5849_5054, 0x4352_5054, 0x5443_5054];
    (2..img.len() / BS as usize)
        .map(|b| b * BS as usize)
        .filter(|&o| magics.contains(&u32::from_le_bytes(img[o..o + 4].try_into().unwrap())))
        .collect()
}

/// Everything a user can do to a pool that might trip over damage. Errors
/// are fine; panics are not.
fn exercise(img: Vec<u8>) {
    let m = MemStorage::from_bytes(img);
    let Ok(mut p) = open(&m) else { return };
    let _ = p.check();
    let _ = p.info();
    if let Ok(vols) = p.list() {
        for v in vols {
            let _ = read_all(&mut p, &v.name);
            let _ = p.mapped_blocks(v.id);
            if !v.read_only {
                let _ = p.write(v.id, 0, &vec![1; 5000.min(v.virtual_size as usize)]);
            }
        }
    }
    let _ = p.snapshot("a", "s2", true);
    let _ = p.remove_volume("clone");
    let _ = p.commit();
    let _ = p.check();
}

#[derive(Debug, Clone)]
enum Damage {
    /// Flip bits in one of the metadata pages (index into the page list).
    FlipMeta {
        page: usize,
        offset: usize,
        bits: u8,
    },
    /// Flip bits in the superblock area.
    FlipSuper {
        offset: usize,
        bits: u8,
    },
    Truncate {
        len: usize,
    },
    /// Overwrite a range with random bytes.
    Scribble {
        offset: usize,
        bytes: Vec<u8>,
    },
}

fn damage_strategy() -> impl Strategy<Value = Vec<Damage>> {
    let one = prop_oneof![
        5 => (any::<usize>(), 0..BS as usize, 1..=255u8).prop_map(|(page, offset, bits)| Damage::FlipMeta { page, offset, bits }),
        2 => (0..8192usize, 1..=255u8).prop_map(|(offset, bits)| Damage::FlipSuper { offset, bits }),
        1 => any::<usize>().prop_map(|len| Damage::Truncate { len }),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..600)).prop_map(|(offset, bytes)| Damage::Scribble { offset, bytes }),
    ];
    prop::collection::vec(one, 1..4)
}

fn base_image() -> &'static [u8] {
    static IMG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMG.get_or_init(|| sample_pool().0.snapshot())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn damaged_images_give_errors_not_panics(damages in damage_strategy()) {
        let mut img = base_image().to_vec();
        let pages = metadata_pages(&img);
        for d in &damages {
            match d {
                Damage::FlipMeta { page, offset, bits } => {
                    let at = pages[page % pages.len()] + offset;
                    // (an earlier truncation may have cut the page off)
                    if at < img.len() { img[at] ^= bits; }
                }
                Damage::FlipSuper { offset, bits } => if *offset < img.len() { img[*offset] ^= bits },
                Damage::Truncate { len } => { let l = len % img.len().max(1); img.truncate(l); }
                Damage::Scribble { .. } if img.is_empty() => {}
                Damage::Scribble { offset, bytes } => {
                    let at = offset % img.len();
                    let end = (at + bytes.len()).min(img.len());
                    img[at..end].copy_from_slice(&bytes[..end - at]);
                }
            }
        }
        exercise(img);
    }

    #[test]
    fn random_files_are_not_pools(bytes in prop::collection::vec(any::<u8>(), 0..20000)) {
        let m = MemStorage::from_bytes(bytes);
        prop_assert!(open(&m).is_err());
    }
}

#[test]
fn a_superblock_with_valid_checksum_but_hostile_geometry_is_refused() {
    // Forge superblocks that pass their checksum but lie about sizes: the
    // open must refuse them without allocating what they claim.
    let (m, g) = sample_pool();
    let img = m.snapshot();
    let slot = ((g % 2) * 4096) as usize;
    let sb = thinpool::format::Superblock::decode(&img[slot..slot + 4096]).unwrap();
    let lies = [
        thinpool::format::Superblock {
            total_blocks: u64::MAX / 4096,
            ..sb.clone()
        },
        thinpool::format::Superblock {
            total_blocks: 1 << 40,
            ..sb.clone()
        },
        thinpool::format::Superblock {
            catalog_slots: u64::MAX,
            ..sb.clone()
        },
        thinpool::format::Superblock {
            metadata_blocks: u64::MAX,
            ..sb.clone()
        },
        thinpool::format::Superblock {
            rc_index: vec![],
            ..sb.clone()
        },
        thinpool::format::Superblock {
            next_volume_id: 0,
            ..sb.clone()
        },
        // An annotation table claiming terabytes, or more bytes than pages.
        thinpool::format::Superblock {
            annot_len: u64::MAX,
            annot_pages: u32::MAX,
            ..sb.clone()
        },
        thinpool::format::Superblock {
            annot_len: 1 << 40,
            ..sb.clone()
        },
    ];
    for (i, lie) in lies.iter().enumerate() {
        let mut bad = img.clone();
        bad[slot..slot + 4096].copy_from_slice(&lie.encode());
        let mut other = bad.clone();
        let o = 4096 - slot;
        other[o..o + 4096].fill(0);
        for candidate in [bad, other] {
            let m = MemStorage::from_bytes(candidate);
            if let Ok(mut p) = open(&m) {
                // Opening at the older slot is fine; a lie that opens must check dirty.
                if p.generation() == g {
                    assert!(
                        !p.check().unwrap().is_clean(),
                        "lie {i} opened and checked clean"
                    );
                }
            }
        }
    }
}
