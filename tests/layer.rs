//! Layers through the library: commit digests, diff, send/receive.

use sha2::{Digest as _, Sha256};
use thinpool::io::MemStorage;
use thinpool::layer::{self, stream, ChangeKind, DiffRange};
use thinpool::{Error, Pool};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

#[path = "support/pool.rs"]
mod pool;
use pool::{assert_clean, pool_on};

fn mem_pool(bs: u32) -> Pool {
    pool_on(MemStorage::new(), 256 * MIB, bs)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
        .collect()
}

fn write(p: &mut Pool, name: &str, off: u64, data: &[u8]) {
    let id = p.lookup(name).unwrap();
    p.write(id, off, data).unwrap();
}

/// sha256 of a volume's content: every non-zero 4 KiB granule with its
/// offset (unmapped blocks read as zeros, so only mapped ones are read).
fn volume_sha(p: &mut Pool, name: &str) -> String {
    let id = p.lookup(name).unwrap();
    let size = p.volume_size(id).unwrap();
    let bs = p.block_size() as u64;
    let mut h = Sha256::new();
    h.update(size.to_le_bytes());
    let mut buf = vec![0u8; bs as usize];
    for vb in p.mapped_blocks(id).unwrap() {
        let n = (size - vb * bs).min(bs) as usize;
        p.read(id, vb * bs, &mut buf[..n]).unwrap();
        for (i, g) in buf[..n].chunks(4096).enumerate() {
            if g.iter().any(|&x| x != 0) {
                h.update((vb * bs + i as u64 * 4096).to_le_bytes());
                h.update(g);
            }
        }
    }
    layer::hex(&h.finalize())
}

/// base (16 MiB, a few scattered writes) -> layer2 (changes, a discard, an
/// all-zero write over data, a same-content rewrite, a write past the old end after a resize).
fn build_chain(p: &mut Pool) {
    p.create_volume("work", 16 * MIB).unwrap();
    write(p, "work", 0, &pattern(100_000, 1));
    write(p, "work", 5 * MIB + 123, &pattern(70_000, 2));
    write(p, "work", 16 * MIB - 10, &pattern(10, 3));
    layer::commit(p, "work", Some("base")).unwrap();
    p.snapshot("base", "work2", true).unwrap();
    write(p, "work2", 4096, &pattern(8192, 4)); // changes inside the first block
    write(p, "work2", 5 * MIB + 123, &pattern(70_000, 2)); // same bytes again: no change
    let id = p.lookup("work2").unwrap();
    p.discard(id, 40_000, 50_000).unwrap(); // zeroes part of the first write
    write(p, "work2", 16 * MIB - 10, &[0u8; 10]); // data -> zeros
    p.resize_volume("work2", 3 << 30).unwrap(); // deeper tree on some block sizes
    write(p, "work2", (3 << 30) - 5000, &pattern(5000, 5));
    layer::commit(p, "work2", Some("layer2")).unwrap();
}

#[test]
fn commit_digests_are_deterministic_across_pools_and_block_sizes() {
    let mut a = mem_pool(4096);
    let mut b = mem_pool(64 * 1024);
    build_chain(&mut a);
    build_chain(&mut b);
    for name in ["base", "layer2"] {
        let ia = a.volume_info(name).unwrap();
        let ib = b.volume_info(name).unwrap();
        assert!(ia.read_only, "{name} is read-only after commit");
        assert!(ia.diff_digest.is_some() && ia.chain_digest.is_some());
        assert_eq!(ia.diff_digest, ib.diff_digest, "{name}");
        assert_eq!(ia.chain_digest, ib.chain_digest, "{name}");
    }
    let base = a.volume_info("base").unwrap();
    let l2 = a.volume_info("layer2").unwrap();
    // OCI ChainID rule.
    assert_eq!(base.chain_digest, base.diff_digest);
    let d = |s: &Option<String>| layer::parse_digest(s.as_deref().unwrap()).unwrap();
    assert_eq!(
        d(&l2.chain_digest),
        layer::chain_digest(Some(&d(&base.chain_digest)), &d(&l2.diff_digest))
    );
    assert_ne!(l2.diff_digest, base.diff_digest);
    // A committed layer is frozen, and cannot be committed again.
    let id = a.lookup("layer2").unwrap();
    assert!(matches!(a.write(id, 0, b"x"), Err(Error::ReadOnly(_))));
    assert!(layer::commit(&mut a, "layer2", None).is_err());
    // A clone's digests are not inherited.
    a.snapshot("layer2", "c", true).unwrap();
    assert_eq!(a.volume_info("c").unwrap().chain_digest, None);
    // An empty change on top of a layer has the digest of "no changes", the same everywhere.
    layer::commit(&mut a, "c", None).unwrap();
    b.snapshot("layer2", "c", true).unwrap();
    layer::commit(&mut b, "c", None).unwrap();
    assert_eq!(
        a.volume_info("c").unwrap().chain_digest,
        b.volume_info("c").unwrap().chain_digest
    );
    assert_ne!(a.volume_info("c").unwrap().chain_digest, l2.chain_digest);
    // Commit needs a committed parent.
    a.create_volume("w", MIB).unwrap();
    a.snapshot("w", "w2", true).unwrap();
    let e = layer::commit(&mut a, "w2", None).unwrap_err();
    assert!(e.to_string().contains("not a committed layer"), "{e}");
    assert_clean(&mut a);
    assert_clean(&mut b);
}

#[test]
fn diff_reports_changed_block_ranges_from_the_maps() {
    let mut p = mem_pool(4096);
    p.create_volume("v", 64 * MIB).unwrap();
    write(&mut p, "v", 0, &pattern(4096, 1));
    write(&mut p, "v", 5 * 4096, &pattern(3 * 4096, 2));
    p.snapshot("v", "s1", false).unwrap();
    assert_eq!(layer::diff_volumes(&mut p, "v", "s1").unwrap(), vec![]);
    p.snapshot("v", "c", true).unwrap();
    let id = p.lookup("c").unwrap();
    p.discard(id, 0, 4096).unwrap();
    write(&mut p, "c", 6 * 4096, &pattern(100, 3));
    write(&mut p, "c", 50 * MIB, &pattern(2 * 4096, 4));
    let r = layer::diff_volumes(&mut p, "s1", "c").unwrap();
    let blk = 50 * MIB / 4096;
    assert_eq!(
        r,
        vec![
            DiffRange {
                block: 0,
                blocks: 1,
                kind: ChangeKind::Removed
            },
            DiffRange {
                block: 6,
                blocks: 1,
                kind: ChangeKind::Changed
            },
            DiffRange {
                block: blk,
                blocks: 2,
                kind: ChangeKind::Added
            },
        ]
    );
    // Reversed: added and removed swap.
    let r2 = layer::diff_volumes(&mut p, "c", "s1").unwrap();
    assert_eq!(r2[0].kind, ChangeKind::Added);
    assert_eq!(r2[2].kind, ChangeKind::Removed);
    // Different depths: grow the clone far past the snapshot.
    p.resize_volume("c", 1 << 40).unwrap();
    write(&mut p, "c", (1 << 40) - 4096, &pattern(4096, 5));
    let r3 = layer::diff_volumes(&mut p, "s1", "c").unwrap();
    assert_eq!(r3.len(), 4, "{r3:?}");
    assert_eq!(
        r3[3],
        DiffRange {
            block: (1 << 40) / 4096 - 1,
            blocks: 1,
            kind: ChangeKind::Added
        }
    );
    assert_eq!(&r3[..3], &r[..]);
    // Unrelated volumes: everything mapped differs.
    p.create_volume("other", MIB).unwrap();
    let r4 = layer::diff_volumes(&mut p, "other", "v").unwrap();
    assert_eq!(r4.iter().map(|r| r.blocks).sum::<u64>(), 4);
}

fn send(p: &mut Pool, name: &str, from: Option<&str>) -> (Vec<u8>, stream::SendReport) {
    let mut out = Vec::new();
    let rep = stream::send(p, name, from, &mut out, &mut |_| {}).unwrap();
    assert_eq!(rep.stream_bytes, out.len() as u64);
    (out, rep)
}

fn receive(p: &mut Pool, name: Option<&str>, s: &[u8]) -> thinpool::Result<stream::ReceiveReport> {
    stream::receive(p, name, &mut &s[..], &mut |_| {})
}

#[test]
fn send_full_and_incremental_receive_bit_identical() {
    let mut a = mem_pool(4096);
    build_chain(&mut a);
    let (full, rep) = send(&mut a, "base", None);
    assert_eq!(rep.parent_chain_digest, None);
    // Zero regions are not sent: the stream is about the data written.
    assert!(full.len() < 300_000, "full stream is {} bytes", full.len());
    let (incr, rep2) = send(&mut a, "layer2", Some("base"));
    assert_eq!(
        rep2.chain_digest,
        a.volume_info("layer2").unwrap().chain_digest.unwrap()
    );
    assert!(rep2.zero_bytes > 0, "{rep2:?}");

    // Into a pool with another block size.
    let mut b = mem_pool(64 * 1024);
    let r1 = receive(&mut b, None, &full).unwrap();
    assert!(r1.stored);
    assert_eq!(r1.name, "base");
    let r2 = receive(&mut b, Some("l2"), &incr).unwrap();
    assert!(r2.stored);
    assert_eq!(r2.base.as_deref(), Some("base"));
    for (x, y) in [("base", "base"), ("layer2", "l2")] {
        assert_eq!(volume_sha(&mut a, x), volume_sha(&mut b, y), "{x}");
        let ia = a.volume_info(x).unwrap();
        let ib = b.volume_info(y).unwrap();
        assert_eq!(ia.diff_digest, ib.diff_digest);
        assert_eq!(ia.chain_digest, ib.chain_digest);
        assert_eq!(ia.virtual_size, ib.virtual_size);
        assert!(ib.read_only);
    }
    assert_eq!(b.volume_info("l2").unwrap().parent.as_deref(), Some("base"));
    // The received layer shares its base's blocks.
    let used = b.info().unwrap().data_used_bytes;
    assert!(used < 2 * MIB, "{used}");

    // The same layer again: recognised, not stored twice.
    let before = (b.list().unwrap().len(), b.info().unwrap().data_used_bytes);
    let again = receive(&mut b, Some("l2-again"), &incr).unwrap();
    assert!(!again.stored);
    assert_eq!(again.name, "l2");
    assert_eq!(
        (b.list().unwrap().len(), b.info().unwrap().data_used_bytes),
        before
    );

    // A full stream of layer2 flattens it: same content, digests of a base layer.
    let (flat, rep3) = send(&mut a, "layer2", None);
    let r3 = receive(&mut b, Some("flat"), &flat).unwrap();
    assert!(r3.stored);
    assert_eq!(volume_sha(&mut b, "flat"), volume_sha(&mut a, "layer2"));
    assert_eq!(
        b.volume_info("flat").unwrap().chain_digest,
        Some(rep3.chain_digest.clone())
    );
    assert_eq!(rep3.chain_digest, rep3.diff_digest);
    assert_clean(&mut b);

    // Sending an uncommitted volume works too; the result is a layer.
    a.snapshot("layer2", "scratch", true).unwrap();
    write(&mut a, "scratch", 77, b"hello");
    let (s, _) = send(&mut a, "scratch", Some("layer2"));
    let r4 = receive(&mut b, None, &s).unwrap();
    assert_eq!(r4.base.as_deref(), Some("l2"));
    assert_eq!(volume_sha(&mut b, "scratch"), volume_sha(&mut a, "scratch"));
    assert_clean(&mut b);
}

/// A receive that died (killed mid-stream) left its committed temporary
/// volume behind; the next receive removes it. A live receiver's is kept.
#[test]
fn receive_removes_what_a_dead_receive_left_behind() {
    let mut a = mem_pool(4096);
    build_chain(&mut a);
    let (full, _) = send(&mut a, "base", None);
    let mut b = mem_pool(4096);
    // PID 4194304 is above Linux's pid_max: no such process.
    b.create_volume("receiving.4194304.1", MIB).unwrap();
    write(&mut b, "receiving.4194304.1", 0, &pattern(MIB as usize, 9));
    let live = format!("receiving.{}.1", std::process::id());
    b.create_volume(&live, MIB).unwrap();
    receive(&mut b, None, &full).unwrap();
    let names: Vec<String> = b.list().unwrap().into_iter().map(|v| v.name).collect();
    assert!(
        !names.iter().any(|n| n == "receiving.4194304.1"),
        "{names:?}"
    );
    assert!(names.contains(&live), "{names:?}");
    assert_clean(&mut b);
}

#[test]
fn damaged_streams_are_refused_and_leave_nothing_behind() {
    let mut a = mem_pool(4096);
    build_chain(&mut a);
    let (full, _) = send(&mut a, "base", None);
    let (incr, _) = send(&mut a, "layer2", Some("base"));

    let mut b = mem_pool(4096);
    // Missing base.
    let e = receive(&mut b, None, &incr).unwrap_err();
    assert!(e.to_string().contains("base layer"), "{e}");
    assert!(b.list().unwrap().is_empty());
    receive(&mut b, None, &full).unwrap();

    let state = |p: &mut Pool| {
        let names: Vec<String> = p.list().unwrap().into_iter().map(|v| v.name).collect();
        (names, p.info().unwrap().data_used_bytes)
    };
    let before = state(&mut b);
    let mut positions: Vec<usize> = vec![0, 9, 40, 100, 150, 200, 1000, 5000, incr.len() / 2];
    positions.extend([
        incr.len() - 60,
        incr.len() - 40,
        incr.len() - 20,
        incr.len() - 1,
    ]);
    for &pos in &positions {
        let mut bad = incr.clone();
        bad[pos] ^= 0x20;
        let e = receive(&mut b, None, &bad).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("corrupt")
                || msg.contains("magic")
                || msg.contains("version")
                || msg.contains("base layer")
                || msg.contains("inconsistent"),
            "flip at {pos}: {msg}"
        );
        assert_eq!(state(&mut b), before, "flip at {pos} left something behind");
    }
    for cut in [
        0,
        10,
        120,
        200,
        4000,
        incr.len() / 2,
        incr.len() - 33,
        incr.len() - 1,
    ] {
        let e = receive(&mut b, None, &incr[..cut]).unwrap_err();
        assert!(e.to_string().contains("truncated"), "cut at {cut}: {e}");
        assert_eq!(state(&mut b), before, "cut at {cut} left something behind");
    }
    let mut long = incr.clone();
    long.push(0);
    assert!(receive(&mut b, None, &long)
        .unwrap_err()
        .to_string()
        .contains("trailing"));
    assert_eq!(state(&mut b), before);
    assert_clean(&mut b);
    // The intact stream still goes in.
    receive(&mut b, None, &incr).unwrap();
    assert_eq!(volume_sha(&mut a, "layer2"), volume_sha(&mut b, "layer2"));
    assert_clean(&mut b);
}

/// A layer tar from entries: (path, kind, content or link target).
fn layer_tar(entries: &[(&str, char, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(path, kind, content) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match kind {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            'f' => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(content.len() as u64);
                b.append_data(&mut h, path, content.as_bytes()).unwrap();
            }
            'l' | 'h' => {
                h.set_entry_type(if kind == 'l' {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_mode(0o777);
                h.set_size(0);
                b.append_link(&mut h, path, content).unwrap();
            }
            _ => unreachable!(),
        }
    }
    b.into_inner().unwrap()
}

#[test]
fn layer_application_follows_oci_rules_and_stays_inside_the_root() {
    use thinpool::layer::image::apply_layer;
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    let lower = layer_tar(&[
        ("dir/", 'd', ""),
        ("dir/a", 'f', "a"),
        ("dir/sub/", 'd', ""),
        ("dir/sub/b", 'f', "b"),
        ("keep", 'f', "keep"),
        ("gone", 'f', "gone"),
        ("esc", 'l', "/../../outside"),
        ("up", 'l', "../.."),
    ]);
    let d = apply_layer(&root, &mut &lower[..]).unwrap();
    assert_eq!(d, layer::sha256(&lower), "diff_id is the sha256 of the tar");
    // gzip is detected by magic.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(
        &mut gz,
        &layer_tar(&[
            ("dir/new", 'f', "new"), // this layer's own entry before the marker stays
            ("dir/.wh..wh..opq", 'f', ""),
            (".wh.gone", 'f', ""),
            ("hard", 'h', "keep"),
            ("esc/x", 'f', "through an absolute symlink"),
            ("up/y", 'f', "through a relative one"),
        ]),
    )
    .unwrap();
    let gz = gz.finish().unwrap();
    apply_layer(&root, &mut &gz[..]).unwrap();
    let names = |p: &std::path::Path| {
        let mut v: Vec<String> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&root.join("dir")),
        ["new"],
        "opaque dir keeps only this layer's entries"
    );
    assert!(!root.join("gone").exists() && !root.join(".wh.gone").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(root.join("hard")).unwrap().ino(),
        std::fs::metadata(root.join("keep")).unwrap().ino()
    );
    // Symlinks are resolved inside the root: nothing lands outside it.
    assert!(names(&outside).is_empty(), "{:?}", names(&outside));
    assert_eq!(
        std::fs::read_to_string(root.join("outside/x")).unwrap(),
        "through an absolute symlink"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("y")).unwrap(),
        "through a relative one"
    );
    // `..` and absolute entry names are refused.
    for bad in ["../evil", "/abs"] {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(1);
        h.set_mode(0o644);
        // Write the raw name: the builder itself refuses such paths.
        h.as_old_mut().name[..bad.len()].copy_from_slice(bad.as_bytes());
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(&[b'x'; 512][..]);
        raw[512..].fill(0);
        raw[512] = b'x';
        raw.extend_from_slice(&[0u8; 1024]);
        let e = apply_layer(&root, &mut &raw[..]).unwrap_err();
        assert!(e.to_string().contains("leaves the root"), "{bad}: {e}");
    }
    assert!(!t.path().join("evil").exists());
}

#[test]
fn cli_commit_diff_send_receive() {
    let bin = env!("CARGO_BIN_EXE_thinpool");
    let t = tempfile::tempdir().unwrap();
    let run = |args: &[&str], stdin: Option<&[u8]>| {
        use std::io::Write;
        let mut c = std::process::Command::new(bin)
            .args(args)
            .current_dir(t.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut si = c.stdin.take().unwrap();
        si.write_all(stdin.unwrap_or(b"")).unwrap();
        drop(si);
        c.wait_with_output().unwrap()
    };
    let ok = |args: &[&str], stdin: Option<&[u8]>| {
        let o = run(args, stdin);
        assert!(
            o.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        o.stdout
    };
    ok(&["create", "a.tp", "--size", "256M"], None);
    ok(&["volume", "create", "a.tp", "v", "--size", "8M"], None);
    ok(
        &["write", "a.tp", "v", "--offset", "100K"],
        Some(&pattern(200_000, 9)),
    );
    ok(&["commit", "a.tp", "v", "--as", "base"], None);
    ok(&["clone", "a.tp", "base", "w"], None);
    ok(
        &["write", "a.tp", "w", "--offset", "4M"],
        Some(b"layer two"),
    );
    let c: serde_json::Value =
        serde_json::from_slice(&ok(&["commit", "a.tp", "w", "--as", "top", "--json"], None))
            .unwrap();
    assert_eq!(c["parent"], "base");
    let d: serde_json::Value =
        serde_json::from_slice(&ok(&["diff", "a.tp", "base", "top", "--json"], None)).unwrap();
    assert_eq!(d["ranges"].as_array().unwrap().len(), 1);
    assert_eq!(d["ranges"][0]["kind"], "added");
    ok(&["send", "a.tp", "base", "-o", "base.s"], None);
    let incr = ok(&["send", "a.tp", "top", "--from", "base"], None);
    ok(&["create", "b.tp", "--size", "256M"], None);
    // Missing base: refused, nothing stored.
    let o = run(&["receive", "b.tp"], Some(&incr));
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("base layer"));
    ok(&["receive", "b.tp", "-i", "base.s"], None);
    let mut bad = incr.clone();
    let n = bad.len();
    bad[n / 2] ^= 1;
    let o = run(&["receive", "b.tp"], Some(&bad));
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("corrupt"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&["receive", "b.tp"], Some(&incr));
    let list = |p: &str| -> serde_json::Value {
        serde_json::from_slice(&ok(&["list", p, "--json"], None)).unwrap()
    };
    let (la, lb) = (list("a.tp"), list("b.tp"));
    let names: Vec<&str> = lb
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["base", "top"]);
    for i in 0..2 {
        assert_eq!(la[i]["chain_digest"], lb[i]["chain_digest"]);
    }
    assert_eq!(
        ok(&["read", "a.tp", "top"], None),
        ok(&["read", "b.tp", "top"], None)
    );
    let chk = run(&["check", "b.tp"], None);
    assert!(
        chk.status.success(),
        "{}",
        String::from_utf8_lossy(&chk.stdout)
    );
}
