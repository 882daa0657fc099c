//! Real OCI images, built with umoci and skopeo, imported as block layers,
//! mounted and compared file by file with `umoci unpack`. Needs root (loop
//! devices, mounts); fails with a message otherwise. Installs the tools with
//! tools/install-image-tools.sh when they are missing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_thinpool");

/// Without root the test fails with a message instead of passing unrun.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() == 0 },
        "the image tests need root (loop devices, mounts): run them as root, \
         e.g. `sudo -E cargo test --test image` (CI runs the suite as root)"
    );
}

fn sh(script: &str, dir: &Path) {
    let out = Command::new("sh")
        .arg("-euc")
        .arg(script)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "script failed:\n{script}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn tp(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "thinpool {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&tp(args)).unwrap()
}

/// Unmounts on drop, even when the test panics.
struct Mounted(PathBuf);

impl Mounted {
    fn new(pool: &Path, name: &str, dir: &Path, read_only: bool) -> Mounted {
        fs::create_dir_all(dir).unwrap();
        let (p, d) = (pool.to_str().unwrap(), dir.to_str().unwrap());
        let mut args = vec!["mount", p, name, d];
        if read_only {
            args.push("--read-only");
        }
        tp(&args);
        Mounted(dir.to_path_buf())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new(BIN).arg("umount").arg(&self.0).status();
    }
}

fn ensure_tools() -> bool {
    let have = |t: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {t}"))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !(have("umoci") && have("skopeo")) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/install-image-tools.sh");
        let ok = Command::new("sh")
            .arg(script)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return false;
        }
    }
    have("umoci") && have("skopeo") && have("mkfs.ext4")
}

/// Build `img` (an OCI layout) with tags v1 (1 layer), v2 (2 layers: changes,
/// whiteouts, additions, links, modes) and v3 (v2 plus a third layer).
fn build_images(dir: &Path) {
    sh(
        r#"
umoci init --layout img
umoci new --image img:v1
umoci unpack --image img:v1 b1 >/dev/null
R=b1/rootfs
mkdir -p $R/etc $R/usr/bin $R/usr/share/doc $R/data/sub $R/opq/keep $R/var/empty
for i in $(seq 1 60); do echo "doc $i" > $R/usr/share/doc/f$i.txt; done
# A few thousand files, as in a small distribution's /usr.
for d in $(seq 1 40); do mkdir -p $R/usr/lib/pkg$d; for i in $(seq 1 50); do echo "pkg $d file $i" > $R/usr/lib/pkg$d/m$i; done; done
head -c 200000 /dev/urandom > $R/usr/bin/tool; chmod 755 $R/usr/bin/tool
echo hello > $R/etc/hostname; chmod 600 $R/etc/hostname
echo gone > $R/data/delete-me; echo old > $R/data/change-me; chown 1000:1000 $R/data/change-me
echo lower > $R/opq/keep/a; echo lower2 > $R/opq/b
mkdir $R/data/gone-dir; echo x > $R/data/gone-dir/x
ln -s ../etc/hostname $R/data/link; ln -s /usr/bin/tool $R/usr/bin/abs-link
chmod 1777 $R/var/empty
umoci repack --image img:v1 b1 >/dev/null
umoci unpack --image img:v1 b2 >/dev/null
R=b2/rootfs
rm $R/data/delete-me; rm -r $R/data/gone-dir; echo new > $R/data/change-me
echo added > $R/data/added; ln $R/data/added $R/data/hard
rm -rf $R/opq/*; echo top > $R/opq/c; mkfifo $R/data/fifo
chmod 4755 $R/usr/bin/tool; chown 123:456 $R/etc/hostname
ln -sf hostname $R/etc/alias; rm $R/usr/share/doc/f7.txt
mkdir -p $R/new/deep/er; printf 'deep' > $R/new/deep/er/file; chmod 0640 $R/new/deep/er/file
umoci repack --image img:v2 b2 >/dev/null
umoci unpack --image img:v2 b3 >/dev/null
R=b3/rootfs
echo three > $R/etc/three; rm $R/data/link; echo replaced > $R/data/link
rm -r $R/usr/lib/pkg3; for i in $(seq 1 50); do echo "v3 $i" > $R/usr/lib/pkg5/m$i; done
umoci repack --image img:v3 b3 >/dev/null
skopeo copy -q oci:img:v2 docker-archive:app-v2.tar:app:v2
rm -rf b1 b2 b3
umoci unpack --image img:v3 ref3 >/dev/null
umoci unpack --image img:v2 ref2 >/dev/null
"#,
        dir,
    );
}

/// Everything about a tree that an image defines, by relative path.
fn tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, String> = BTreeMap::new();
    walk(root, root, &mut out, &mut inodes);
    out
}

fn walk(
    root: &Path,
    dir: &Path,
    out: &mut BTreeMap<String, String>,
    inodes: &mut BTreeMap<u64, String>,
) {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel == "lost+found" {
            continue; // made by mkfs.ext4, not by the image
        }
        let m = fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let perm = m.mode() & 0o7777;
        let owner = format!("{}:{}", m.uid(), m.gid());
        let what = if ft.is_symlink() {
            format!("symlink -> {}", fs::read_link(&p).unwrap().display())
        } else if ft.is_dir() {
            format!("dir {perm:o} {owner}")
        } else if ft.is_file() {
            let data = fs::read(&p).unwrap();
            let sum = thinpool::layer::hex(&thinpool::layer::sha256(&data));
            // Hard links: name the first path of the inode.
            let first = inodes.entry(m.ino()).or_insert_with(|| rel.clone()).clone();
            format!(
                "file {perm:o} {owner} {} {} links={} first={first}",
                data.len(),
                &sum[..16],
                m.nlink()
            )
        } else if ft.is_fifo() {
            format!("fifo {perm:o} {owner}")
        } else {
            format!("special {perm:o} {owner} rdev={}", m.rdev())
        };
        out.insert(rel, what);
        if ft.is_dir() {
            walk(root, &p, out, inodes);
        }
    }
}

fn assert_same_tree(ours: &Path, reference: &Path) {
    let a = tree(ours);
    let b = tree(reference);
    let mut diffs = Vec::new();
    for k in a
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        if a.get(k) != b.get(k) {
            diffs.push(format!(
                "{k}:\n  ours:  {:?}\n  umoci: {:?}",
                a.get(k),
                b.get(k)
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
    assert!(a.len() > 1900, "tree too small: {}", a.len());
}

fn volumes(pool: &str) -> BTreeMap<String, serde_json::Value> {
    let v = json(&["list", pool, "--json"]);
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap().to_string(), x.clone()))
        .collect()
}

#[test]
fn oci_images_import_share_layers_and_match_umoci_unpack() {
    require_root();
    assert!(
        ensure_tools(),
        "umoci, skopeo or mkfs.ext4 missing and not installable: run tools/install-deps.sh"
    );
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    build_images(d);
    let pool = d.join("p.pool");
    let ps = pool.to_str().unwrap();
    tp(&["create", ps, "--size", "2G"]);

    // Image 1: two layers.
    let src2 = format!("{}:v2", d.join("img").display());
    tp(&[
        "image", "import", ps, &src2, "--name", "app", "--size", "128M",
    ]);
    let used1 = json(&["info", ps, "--json"])["data_used_bytes"]
        .as_u64()
        .unwrap();
    // Image 2: the same two layers plus one.
    let src3 = format!("oci:{}:v3", d.join("img").display());
    tp(&[
        "image", "import", ps, &src3, "--name", "app2", "--size", "128M",
    ]);
    let used2 = json(&["info", ps, "--json"])["data_used_bytes"]
        .as_u64()
        .unwrap();

    let imgs = json(&["image", "list", ps, "--json"]);
    let imgs = imgs.as_array().unwrap();
    assert_eq!(imgs.len(), 2, "{imgs:?}");
    let l1 = imgs[0]["layers"].as_array().unwrap();
    let l2 = imgs[1]["layers"].as_array().unwrap();
    assert_eq!((l1.len(), l2.len()), (2, 3));
    assert_eq!(
        &l2[..2],
        &l1[..],
        "the second image reuses the first two layers"
    );
    let vols = volumes(ps);
    let layer_vols: Vec<_> = vols.keys().filter(|n| n.starts_with("layer:")).collect();
    assert_eq!(
        layer_vols.len(),
        3,
        "shared layers stored once: {layer_vols:?}"
    );
    // Every layer is a committed, read-only layer with digests; the images
    // carry their top layer's digests.
    for n in &layer_vols {
        assert_eq!(vols[*n]["read_only"], true);
        assert!(vols[*n]["chain_digest"].is_string());
    }
    let top2 = l2[2].as_str().unwrap();
    assert_eq!(vols["app2"]["chain_digest"], vols[top2]["chain_digest"]);
    assert_eq!(
        vols["app"]["chain_digest"],
        vols[l1[1].as_str().unwrap()]["chain_digest"]
    );
    // Space: the second import added only its own layer's blocks.
    let bs = json(&["info", ps, "--json"])["block_size"]
        .as_u64()
        .unwrap();
    let stat = json(&[
        "diff",
        ps,
        l2[1].as_str().unwrap(),
        top2,
        "--stat",
        "--json",
    ]);
    let own =
        (stat["added_blocks"].as_u64().unwrap() + stat["changed_blocks"].as_u64().unwrap()) * bs;
    assert!(
        used2 - used1 <= own,
        "second import used {} more bytes, its layer holds {own}",
        used2 - used1
    );
    println!("data used: {used1} after app, {used2} after app2 (its own layer: {own})");

    // The mounted top layers equal what umoci unpacks.
    {
        let m = Mounted::new(&pool, "app2", &d.join("m3"), true);
        assert_same_tree(&m.0, &d.join("ref3/rootfs"));
        let m2 = Mounted::new(&pool, "app", &d.join("m2"), true);
        assert_same_tree(&m2.0, &d.join("ref2/rootfs"));
    }

    // A docker save archive of v2 into another pool: same layers (by OCI
    // ChainID), same tree.
    let pool_b = d.join("b.pool");
    let pb = pool_b.to_str().unwrap();
    tp(&["create", pb, "--size", "1G"]);
    let tar = d.join("app-v2.tar");
    tp(&[
        "image",
        "import",
        pb,
        tar.to_str().unwrap(),
        "--name",
        "dock",
        "--size",
        "128M",
    ]);
    let dock = json(&["image", "list", pb, "--json"]);
    assert_eq!(dock[0]["layers"].as_array().unwrap(), l1);
    {
        let m = Mounted::new(&pool_b, "dock", &d.join("md"), true);
        assert_same_tree(&m.0, &d.join("ref2/rootfs"));
    }
    // Importing again under another name stores nothing new.
    let before = json(&["info", pb, "--json"])["data_used_bytes"]
        .as_u64()
        .unwrap();
    tp(&[
        "image",
        "import",
        pb,
        tar.to_str().unwrap(),
        "--name",
        "dock2",
    ]);
    assert_eq!(
        json(&["info", pb, "--json"])["data_used_bytes"]
            .as_u64()
            .unwrap(),
        before
    );

    // Containers (`docker ps -s`): five clones cost nothing; three write a
    // 5-byte file each and show a few blocks, the other two stay at 0.
    for i in 1..=5 {
        tp(&["clone", ps, "app2", &format!("c{i}")]);
    }
    let vols = volumes(ps);
    for i in 1..=5 {
        assert_eq!(
            vols[&format!("c{i}")]["exclusive_bytes"],
            0,
            "c{i} right after clone"
        );
    }
    for i in 1..=3 {
        let m = Mounted::new(&pool, &format!("c{i}"), &d.join(format!("mc{i}")), false);
        fs::write(m.0.join("hello.txt"), b"hello").unwrap();
    }
    let vols = volumes(ps);
    for i in 1..=5 {
        let ex = vols[&format!("c{i}")]["exclusive_bytes"].as_u64().unwrap();
        println!("c{i}: exclusive {ex} bytes = {} blocks of {bs}", ex / bs);
        if i <= 3 {
            assert!(ex > 0 && ex <= 16 * bs, "c{i}: {ex}");
        } else {
            assert_eq!(ex, 0, "c{i} was never mounted");
        }
    }
    let chk = Command::new(BIN).args(["check", ps]).output().unwrap();
    assert!(
        chk.status.success(),
        "{}",
        String::from_utf8_lossy(&chk.stdout)
    );
}
