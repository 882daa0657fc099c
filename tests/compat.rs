//! Pools written by earlier builds open with this one (docs/FORMAT.md,
//! "Versions"): the fixtures under tests/fixtures/ are real pool files made
//! by the commits `tools/make-fixtures.sh` names (format version 1 by the
//! last commit before format 2, format version 2 by main before the intent
//! log), with the sha256 of every volume as the old build read it.
//!
//! Each is opened (a copy, in a temporary directory) through the CLI: read
//! only first (nothing may change, nothing is upgraded), then written, which
//! upgrades it to this build's `FORMAT_VERSION` at the first commit.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use sha2::{Digest, Sha256};
use tempfile::TempDir;
use thinpool::format::{FORMAT_VERSION, OLDEST_READABLE_VERSION};
use thinpool::Pool;

fn tp_out<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_thinpool"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run thinpool")
}

fn describe<S: AsRef<OsStr>>(args: &[S], out: &Output) -> String {
    let args: Vec<_> = args
        .iter()
        .map(|a| a.as_ref().to_string_lossy().into_owned())
        .collect();
    format!(
        "thinpool {}\nexit: {:?}\nstdout: {}\nstderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `thinpool ARGS`, which must succeed: its stdout.
fn tp<S: AsRef<OsStr>>(args: &[S]) -> Vec<u8> {
    let out = tp_out(args);
    assert!(out.status.success(), "{}", describe(args, &out));
    out.stdout
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn fixture_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(file)
}

/// The fixture `NAME.tp.gz` unpacked into a temporary directory.
fn unpack(name: &str) -> (TempDir, PathBuf, Vec<u8>) {
    let gz = fs::File::open(fixture_path(&format!("{name}.tp.gz"))).unwrap();
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_end(&mut bytes)
        .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let pool = tmp.path().join(format!("{name}.tp"));
    fs::write(&pool, &bytes).unwrap();
    (tmp, pool, bytes)
}

/// (volume, sha256 of its whole content) from `NAME.sha256`.
fn recorded_sums(name: &str) -> Vec<(String, String)> {
    let text = fs::read_to_string(fixture_path(&format!("{name}.sha256"))).unwrap();
    let sums: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let (sum, vol) = l.split_once("  ").expect("HASH  NAME lines");
            (vol.to_string(), sum.to_string())
        })
        .collect();
    assert!(sums.len() >= 5, "{name}.sha256 lists the volumes");
    sums
}

/// (version, generation) of both superblock slots, as stored.
fn slots(pool: &Path) -> [(u32, u64); 2] {
    let b = fs::read(pool).unwrap();
    [0usize, 4096].map(|s| {
        (
            u32::from_le_bytes(b[s + 8..s + 12].try_into().unwrap()),
            u64::from_le_bytes(b[s + 16..s + 24].try_into().unwrap()),
        )
    })
}

/// The format version of the newest superblock slot.
fn newest_version(pool: &Path) -> u32 {
    let [a, b] = slots(pool);
    if a.1 >= b.1 {
        a.0
    } else {
        b.0
    }
}

fn read_volume(pool: &Path, vol: &str) -> Vec<u8> {
    tp(&["read".as_ref(), pool.as_os_str(), vol.as_ref()])
}

fn assert_sums(pool: &Path, sums: &[(String, String)], what: &str) {
    for (vol, sum) in sums {
        assert_eq!(
            &sha256(&read_volume(pool, vol)),
            sum,
            "{what}: volume {vol} does not read what the old build wrote"
        );
    }
}

fn check_clean(pool: &Path) {
    let out = String::from_utf8(tp(&["check".as_ref(), pool.as_os_str()])).unwrap();
    assert!(out.contains("clean"), "check: {out}");
}

fn list(pool: &Path) -> Vec<serde_json::Value> {
    serde_json::from_slice(&tp(&["list".as_ref(), pool.as_os_str(), "--json".as_ref()])).unwrap()
}

/// The annotations of the pool (containerd snapshot records), by volume name.
fn annotations(pool: &Path) -> Vec<(String, Vec<u8>)> {
    let mut p = Pool::open_read_only(pool).unwrap();
    let names = p.list().unwrap();
    let mut out: Vec<(String, Vec<u8>)> = p
        .annotated()
        .into_iter()
        .map(|id| {
            let name = names.iter().find(|v| v.id == id).unwrap().name.clone();
            (name, p.annotation(id).unwrap().to_vec())
        })
        .collect();
    out.sort();
    out
}

/// Open a fixture made by an older build: read-only verbs see everything and
/// change nothing; the first write upgrades it; it stays clean and right.
/// `snapshot_keys`: the containerd snapshots whose records it holds.
fn opens_reads_and_upgrades(name: &str, made_as: u32, snapshot_keys: &[&str]) {
    let (tmp, pool, original) = unpack(name);
    let p = pool.as_os_str();
    assert_eq!(
        slots(&pool).map(|s| s.0),
        [made_as; 2],
        "{name} is a version {made_as} pool"
    );
    let sums = recorded_sums(name);

    // Read-only: list, info, read, check.
    let vols = list(&pool);
    let names: Vec<&str> = vols.iter().map(|v| v["name"].as_str().unwrap()).collect();
    let mut want: Vec<&str> = sums.iter().map(|(v, _)| v.as_str()).collect();
    let mut got = names.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want, "{name}: list shows the volumes");
    let by_name = |n: &str| vols.iter().find(|v| v["name"] == n).unwrap().clone();
    assert_eq!(by_name("layer1")["parent"], "layer0");
    assert_eq!(by_name("app")["parent"], "layer1");
    assert_eq!(by_name("base-snap")["read_only"], true);
    assert_eq!(by_name("app")["read_only"], false);
    let info: serde_json::Value =
        serde_json::from_slice(&tp(&["info".as_ref(), p, "--json".as_ref()])).unwrap();
    assert_eq!(info["volumes"], sums.len());
    assert_eq!(info["block_size"], 4096);
    assert_eq!(
        info["format_version"], made_as,
        "{name}: info shows the pool's own version before the upgrade"
    );
    // The snapshot records (format 2's annotations) are there, one a volume.
    let records = annotations(&pool);
    assert_eq!(
        records.len(),
        snapshot_keys.len(),
        "{name}: annotated volumes"
    );
    for key in snapshot_keys {
        assert!(
            records.iter().any(|(vol, r)| vol.starts_with("ctrd-")
                && r.starts_with(b"TPSN")
                && r.windows(key.len()).any(|w| w == key.as_bytes())),
            "{name}: no record of snapshot {key}"
        );
    }
    assert_sums(&pool, &sums, name);
    check_clean(&pool);
    // The layers kept the digests `commit` recorded: `list` shows the same
    // chain ids as the old build's `list` (NAME.list).
    let chains = |text: &str| -> Vec<(String, String)> {
        text.lines()
            .filter(|l| l.starts_with("layer"))
            .map(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                (cols[0].to_string(), cols[cols.len() - 1].to_string())
            })
            .collect()
    };
    let old = chains(&fs::read_to_string(fixture_path(&format!("{name}.list"))).unwrap());
    let now = chains(&String::from_utf8(tp(&["list".as_ref(), p])).unwrap());
    assert_eq!(old.len(), 2, "{name}.list shows two layers");
    assert!(old.iter().all(|(_, c)| c.len() == 12), "{old:?}");
    assert_eq!(now, old, "{name}: the layers' chain ids");
    assert!(
        fs::read(&pool).unwrap() == original,
        "{name}: a read-only verb changed the pool file"
    );

    // The first write commits, and the commit writes this build's version.
    let mut app = read_volume(&pool, "app");
    let patch: Vec<u8> = (0..10_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let data = tmp.path().join("patch");
    fs::write(&data, &patch).unwrap();
    let at = 300 * 1024 + 123;
    tp(&[
        "write".as_ref(),
        p,
        "app".as_ref(),
        "--offset".as_ref(),
        at.to_string().as_ref(),
        data.as_os_str(),
    ]);
    app[at..at + patch.len()].copy_from_slice(&patch);
    assert_eq!(
        newest_version(&pool),
        FORMAT_VERSION,
        "{name}: the first commit writes format version {FORMAT_VERSION}"
    );
    // Reopened by the next verbs: clean, upgraded, data right.
    check_clean(&pool);
    let info: serde_json::Value =
        serde_json::from_slice(&tp(&["info".as_ref(), p, "--json".as_ref()])).unwrap();
    assert_eq!(info["format_version"], FORMAT_VERSION);
    assert_eq!(info["volumes"], sums.len());
    assert!(
        annotations(&pool) == records,
        "{name}: records after the upgrade"
    );
    assert!(
        read_volume(&pool, "app") == app,
        "{name}: app after the write"
    );
    let unchanged: Vec<_> = sums.iter().filter(|(v, _)| v != "app").cloned().collect();
    assert_sums(&pool, &unchanged, &format!("{name} after the upgrade"));
    // Management works on the upgraded pool too.
    tp(&["snapshot".as_ref(), p, "app".as_ref(), "app-snap".as_ref()]);
    tp(&["remove".as_ref(), p, "base-snap".as_ref()]);
    check_clean(&pool);
    assert!(read_volume(&pool, "app-snap") == app);
    assert_eq!(list(&pool).len(), sums.len());
    assert_eq!(newest_version(&pool), FORMAT_VERSION);
}

#[test]
fn a_version_1_pool_from_the_last_version_1_build_opens_and_upgrades() {
    opens_reads_and_upgrades("pool-v1", 1, &[]);
}

#[test]
fn a_version_2_pool_from_main_before_the_log_opens_and_upgrades() {
    opens_reads_and_upgrades("pool-v2", 2, &["layer-a", "ctr1"]);
}

/// A pool claiming a version from the future is refused by every verb with a
/// message naming its version and the ones this build reads, and is left
/// untouched. (tests/engine.rs checks the library's error value.)
#[test]
fn a_future_version_is_refused_by_name() {
    let (_tmp, pool, mut bytes) = unpack("pool-v2");
    for slot in [0usize, 4096] {
        let b = &mut bytes[slot..slot + 4096];
        // Keep the checksum right, so that only the version is wrong.
        let stored = u32::from_le_bytes(b[12..16].try_into().unwrap());
        let salt = stored ^ crc32fast::hash(&b[16..]);
        b[8..12].copy_from_slice(&99u32.to_le_bytes());
        let crc = crc32fast::hash(&b[16..]) ^ salt;
        b[12..16].copy_from_slice(&crc.to_le_bytes());
    }
    fs::write(&pool, &bytes).unwrap();
    let p = pool.as_os_str();
    let want = format!(
        "format version 99 is not supported by this build \
         (it reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})"
    );
    for args in [
        vec!["info".as_ref(), p],
        vec!["list".as_ref(), p],
        vec!["check".as_ref(), p],
        vec![
            "volume".as_ref(),
            "create".as_ref(),
            p,
            "x".as_ref(),
            "--size".as_ref(),
            "1M".as_ref(),
        ],
    ] {
        let out = tp_out(&args);
        assert!(!out.status.success(), "{}", describe(&args, &out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&want), "{}", describe(&args, &out));
    }
    assert!(
        fs::read(&pool).unwrap() == bytes,
        "a refused pool was written"
    );
}
