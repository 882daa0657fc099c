//! Runs the cowbench harness in quick mode (small image, one run; thinpool,
//! overlayfs and full copy) so that it cannot rot, and checks that its figures
//! make sense: overlayfs copies the whole file on the first write, thinpool
//! copies about one block; a thinpool container costs almost nothing to create.
//!
//! Needs root (mounts, loop devices, FUSE); fails with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Without root the test fails with a message instead of passing unrun.
fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() == 0 },
        "cowbench needs root (mounts, loop devices, FUSE): run the test as root, \
         e.g. `sudo -E cargo test --test bench_quick` (CI runs the suite as root)"
    );
}

/// Build the harness (a workspace member) with the same profile as this test's
/// binaries, into the same target dir, and return its path.
fn build_cowbench(thinpool: &Path) -> PathBuf {
    let profile_dir = thinpool.parent().expect("target profile dir");
    let release = profile_dir
        .file_name()
        .map(|n| n == "release")
        .unwrap_or(false);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "-p", "cowbench"]);
    if release {
        cmd.arg("--release");
    }
    if std::env::var_os("CARGO_TARGET_DIR").is_none() {
        if let Some(target) = profile_dir.parent() {
            cmd.env("CARGO_TARGET_DIR", target);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    let st = cmd.status().expect("run cargo build -p cowbench");
    assert!(st.success(), "cargo build -p cowbench failed");
    let exe = profile_dir.join("cowbench");
    assert!(exe.is_file(), "{} not built", exe.display());
    exe
}

fn metric(b: &Value, key: &str) -> f64 {
    b["metrics"][key]["median"]
        .as_f64()
        .unwrap_or_else(|| panic!("{}: no figure {key}", b["name"]))
}

#[test]
fn cowbench_quick_mode() {
    require_root();
    let thinpool = PathBuf::from(env!("CARGO_BIN_EXE_thinpool"));
    let exe = build_cowbench(&thinpool);
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(&exe)
        .args([
            "--quick",
            "--backends",
            "thinpool,overlayfs,fullcopy",
            "--out",
        ])
        .arg(out.path())
        .arg("--thinpool-bin")
        .arg(&thinpool)
        .status()
        .expect("run cowbench");
    let json = std::fs::read_to_string(out.path().join("results.json")).expect("results.json");
    let r: Value = serde_json::from_str(&json).unwrap();
    assert!(status.success(), "cowbench --quick failed:\n{json}");
    for f in ["results.md", "cow_latency.svg", "space.svg"] {
        assert!(out.path().join(f).is_file(), "{f} not written");
    }
    let big = r["config"]["big_file_bytes"].as_f64().unwrap();
    let block = r["config"]["block_size"].as_f64().unwrap();
    let find = |name: &str| -> Value {
        let b = r["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("no backend {name}"))
            .clone();
        assert_eq!(b["status"], "ok", "{name}: {}", b["reason"]);
        b
    };
    let (tp, ov, fc) = (find("thinpool"), find("overlayfs"), find("fullcopy"));

    // overlayfs copies the whole 1 GiB (here: big) file up on the first write and on chmod.
    assert!(metric(&ov, "write1_space_bytes") >= big * 0.99);
    assert!(metric(&ov, "chmod_space_bytes") >= big * 0.99);
    // A full copy holds the whole image from creation on.
    assert!(metric(&fc, "create_space_bytes") >= big);
    // thinpool: a clone costs no data block; the first 4 KiB write copies one
    // block, plus what ext4's journal commit writes (a few blocks) and metadata.
    assert!(metric(&tp, "create_space_bytes") < 1024.0 * 1024.0);
    let w1 = metric(&tp, "write1_space_bytes");
    assert!(w1 >= block, "thinpool: first write used only {w1} bytes");
    assert!(
        w1 <= 8.0 * block + 256.0 * 1024.0,
        "thinpool: first write used {w1} bytes"
    );
    assert!(w1 * 16.0 < metric(&ov, "write1_space_bytes"));
    // 5 clones together cost less than one full copy; removal gives space back.
    assert!(metric(&tp, "many_space_bytes") < big / 4.0);
    assert!(metric(&tp, "remove_left_bytes") <= 2.0 * block);
    assert!(metric(&tp, "remove_freed_bytes") > 0.0);
    // Latencies are positive and finite.
    for b in [&tp, &ov, &fc] {
        for k in ["create_ms", "write1_ms", "write2_ms", "chmod_ms"] {
            let v = metric(b, k);
            assert!(v.is_finite() && v >= 0.0, "{}: {k} = {v}", b["name"]);
        }
    }
}
