//! Forged pools: metadata that is checksum-valid but lies.
//!
//! `thinpool::forge::variants` decodes a real pool, changes fields of its
//! structures and re-seals every page, so each variant gets past every
//! checksum. Every verb of the command line runs on every variant in its own
//! process, under a 20 s timeout and a 1 GiB address-space limit: it must
//! exit with a code (no panic, no abort, no signal), refuse with one line if
//! it fails, and never try to allocate what a lying header claims (an
//! infallible allocation beyond the limit aborts). `check` must not call any
//! variant clean. A property test then runs the library in-process on
//! random structure mutations (`thinpool::forge::mutate`).

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use thinpool::forge;
use thinpool::io::MemStorage;
use thinpool::Pool;

const BS: u64 = 4096;
const TIMEOUT: Duration = Duration::from_secs(20);
const ADDRESS_SPACE: u64 = 1 << 30;

fn base_image() -> &'static [u8] {
    forge::sample_pool()
}

struct Run {
    code: Option<i32>,
    signal: Option<i32>,
    stderr: String,
    took: Duration,
}

/// Run the CLI with a timeout and an address-space limit; stdout is dropped.
fn thinpool(args: &[&str]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_thinpool"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: ADDRESS_SPACE,
                rlim_max: ADDRESS_SPACE,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run thinpool {args:?}: {e}"));
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    Run {
        code: status.code(),
        signal: status.signal(),
        stderr: reader.join().unwrap(),
        took: start.elapsed(),
    }
}

/// Every verb that reads or changes a pool, on the pool file `pool`.
fn verbs(pool: &str) -> Vec<Vec<String>> {
    let out = format!("{pool}.stream");
    let mut v: Vec<Vec<&str>> = vec![
        vec!["info", pool],
        vec!["list", pool, "--json"],
        vec!["check", pool, "--json"],
        vec!["diff", pool, "layer1", "layer2"],
        vec!["diff", pool, "snap", "big"],
        vec!["send", pool, "layer2", "--from", "layer1", "-o", &out],
        vec!["send", pool, "big", "-o", &out],
        vec!["image", "list", pool],
    ];
    for name in ["layer2", "big", "snap"] {
        v.push(vec!["read", pool, name, "--length", "256K"]);
    }
    // Changes last: each may leave the pool different for the next one.
    v.push(vec!["snapshot", pool, "big", "s-new"]);
    v.push(vec!["remove", pool, "container"]);
    v.push(vec!["check", pool]);
    v.into_iter()
        .map(|a| a.into_iter().map(str::to_string).collect())
        .collect()
}

/// What a verb did wrong on a hostile pool, if anything.
fn misbehaviour(r: &Run, check: bool) -> Option<String> {
    if r.took > TIMEOUT {
        return Some(format!("hung (killed after {:?})", r.took));
    }
    if let Some(s) = r.signal {
        return Some(format!("killed by signal {s} (abort?): {}", r.stderr));
    }
    if r.stderr.contains("internal error") || r.stderr.contains("panicked") {
        return Some(format!("panicked: {}", r.stderr));
    }
    // `check` lists the problems it found on stdout and exits 1.
    if r.code != Some(0) && !(check && r.code == Some(1)) {
        let lines = r.stderr.lines().filter(|l| !l.trim().is_empty()).count();
        if lines != 1 || !r.stderr.starts_with("thinpool: ") {
            return Some(format!("refused without one clear line: {:?}", r.stderr));
        }
    }
    None
}

#[test]
fn every_verb_exits_cleanly_on_every_forged_pool_and_check_reports_each() {
    let variants = forge::variants(base_image());
    assert!(
        variants.len() >= 100,
        "only {} forged variants",
        variants.len()
    );
    let dir = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let slowest = Mutex::new((Duration::ZERO, String::new()));
    let worker = || loop {
        let i = next.fetch_add(1, Ordering::SeqCst);
        let Some(v) = variants.get(i) else { break };
        let path: PathBuf = dir.path().join(format!("v{i}.tp"));
        std::fs::write(&path, &v.image).unwrap();
        let pool = path.to_str().unwrap();
        let mut checked = false;
        for args in verbs(pool) {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let r = thinpool(&a);
            {
                let mut s = slowest.lock().unwrap();
                if r.took > s.0 {
                    *s = (r.took, format!("{} on '{}'", a[0], v.name));
                }
            }
            if let Some(why) = misbehaviour(&r, a[0] == "check") {
                failures.lock().unwrap().push(format!(
                    "'{}': `{}`: {why}",
                    v.name,
                    a[..1].join(" ")
                ));
            }
            if a[0] == "check" && !checked {
                checked = true;
                // 0 = clean; 1 = problems listed; 2 = the pool could not be read.
                if r.code == Some(0) {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("'{}': check called it clean", v.name));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(format!("{pool}.stream"));
    };
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(worker);
        }
    });
    let failures = failures.into_inner().unwrap();
    let (t, what) = slowest.into_inner().unwrap();
    eprintln!(
        "{} forged variants, {} verbs each; slowest verb {t:?} ({what})",
        variants.len(),
        verbs("P").len()
    );
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn the_base_pool_itself_is_clean_and_every_verb_succeeds() {
    // The same runs on the unforged pool all succeed: a verb that always
    // failed would make the forged test above pass for nothing.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("base.tp");
    std::fs::write(&path, base_image()).unwrap();
    for args in verbs(path.to_str().unwrap()) {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = thinpool(&a);
        assert_eq!(r.code, Some(0), "{a:?}: {}", r.stderr);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_structure_mutations_give_errors_not_panics(
        ops in prop::collection::vec(any::<u8>(), 11..80)
    ) {
        forge::exercise(forge::mutate(base_image(), &ops));
    }

    #[test]
    fn forged_send_streams_give_errors_not_panics(
        data in prop::collection::vec(any::<u8>(), 0..400)
    ) {
        forge::receive(&forge::stream(&data));
    }
}

#[test]
fn a_forged_stream_gets_past_the_checksums() {
    // The stream forger seals what it makes: an empty stream of a 1 MiB
    // layer is refused for its digests, the last check, not its checksums.
    let m = MemStorage::from_bytes(base_image().to_vec());
    let mut p = Pool::open_with(Box::new(m), Path::new("mem")).unwrap();
    let s = forge::stream(&[]);
    let e = thinpool::layer::stream::receive(&mut p, Some("r"), &mut &s[..], &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("digests"), "{e}");
    assert!(p.check().unwrap().is_clean());
    assert!(
        p.lookup("r").is_err(),
        "nothing is left of a refused stream"
    );
}

#[test]
fn every_forged_variant_is_checksum_valid() {
    // The variants must reach the checks behind the checksums: every page
    // (found by its magic) still validates, so refusing a variant is the
    // work of those checks.
    use thinpool::format::{decode_page, PageType, SlotError, Superblock};
    let kinds = [
        PageType::MapNode,
        PageType::Catalog,
        PageType::Refcount,
        PageType::Index,
        PageType::Annotations,
    ];
    for v in forge::variants(base_image()) {
        for slot in v.image[..8192].chunks(4096) {
            let r = Superblock::decode(slot);
            assert!(
                !matches!(r, Err(SlotError::Checksum | SlotError::BadMagic)),
                "'{}': superblock {r:?}",
                v.name
            );
        }
        for (b, page) in v.image.chunks_exact(BS as usize).enumerate().skip(2) {
            let magic = u32::from_le_bytes(page[0..4].try_into().unwrap());
            let Some(&kind) = kinds.iter().find(|k| k.magic() == magic) else {
                continue;
            };
            assert!(
                decode_page(page, kind, b as u64).is_ok(),
                "'{}': {} at block {b} does not validate",
                v.name,
                kind.name()
            );
        }
    }
}

#[test]
fn a_node_shared_within_one_map_is_reported_by_name() {
    // An internal node whose every entry is the same child: a real pool
    // never reaches a node from two places, and check says so precisely
    // instead of counting the multiplied paths.
    let mut seen = 0;
    for v in forge::variants(base_image()) {
        if !v.name.contains("(level 1): every entry = the first") {
            continue;
        }
        seen += 1;
        let m = MemStorage::from_bytes(v.image);
        let mut p = Pool::open_with(Box::new(m), Path::new("mem")).unwrap();
        let report = p.check().unwrap();
        assert!(
            report
                .issues
                .iter()
                .any(|i| i.kind == thinpool::check::IssueKind::MisplacedNode),
            "'{}': {:?}",
            v.name,
            report.problems
        );
        // The walks refuse instead of following every path.
        let big = p.lookup("big").unwrap();
        assert!(p.mapped_blocks(big).is_err() || p.list().is_err());
    }
    assert!(seen > 0, "no variant shares an internal node");
}
