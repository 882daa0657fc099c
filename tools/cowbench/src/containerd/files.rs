//! The equal-files check: programs of the image's second layer (python3,
//! sqlite3) run in a container on each snapshotter, and python3 lists every
//! file it sees on the root file system (type, mode, owner, size, sha256 or link
//! target). The listings of every snapshotter are compared with overlayfs's.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::cycle::run_container;
use super::env::Env;

/// Runs inside the container (python3-minimal has os, stat and hashlib). Stays
/// on the root file system: /proc, /sys, /dev... are the runtime's, not the image's.
/// One line per entry, tab-separated: type, path, mode, uid:gid, then size and
/// sha256 (files) or the target (symlinks).
const LIST_PY: &str = r#"
import hashlib, os, stat, sys
dev = os.lstat("/").st_dev
out = []
def walk(d):
    for e in sorted(os.scandir(d), key=lambda e: e.name):
        p = e.path
        s = os.lstat(p)
        if s.st_dev != dev:
            continue
        m = s.st_mode
        head = "%s\t%o\t%d:%d" % (p, stat.S_IMODE(m), s.st_uid, s.st_gid)
        if stat.S_ISREG(m):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    h.update(b)
            out.append("f\t%s\t%d\t%s" % (head, s.st_size, h.hexdigest()))
        elif stat.S_ISLNK(m):
            out.append("l\t%s\t%s" % (head, os.readlink(p)))
        elif stat.S_ISDIR(m):
            out.append("d\t" + head)
            walk(p)
        else:
            out.append("o\t%s\t%o" % (head, stat.S_IFMT(m)))
walk("/")
sys.stdout.write("\n".join(out) + "\n")
"#;

/// A program that only the second layer has, with its answer.
const SQLITE: [&str; 3] = [
    "sqlite3",
    ":memory:",
    "select 'sqlite', sqlite_version(), 6*7;",
];

/// What one snapshotter's container saw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Listing {
    pub snapshotter: String,
    pub files: usize,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    pub symlinks: usize,
    pub dirs: usize,
    pub other: usize,
    /// sha256 of the whole listing (equal listings, equal digests).
    pub digest: String,
    /// What `sqlite3` printed in the same image.
    pub sqlite: String,
    /// Listing lines that differ from overlayfs's (`-` only there, `+` only here), at most 20.
    pub diff: Vec<String>,
    pub diff_count: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FilesCheck {
    pub image: String,
    pub listings: Vec<Listing>,
    /// Every snapshotter saw exactly the files overlayfs saw.
    pub equal: bool,
    /// Entries left out of the comparison, and why.
    pub ignored: Vec<String>,
}

/// ext4's own directory at the root of every ext4 volume: the file system's,
/// not the image's.
const IGNORED: &str = "/lost+found";

/// Path -> line, without what the comparison leaves out.
fn parse(listing: &str) -> BTreeMap<String, String> {
    listing
        .lines()
        .filter_map(|l| {
            let path = l.split('\t').nth(1)?;
            let ignored = path == IGNORED || path.starts_with(&format!("{IGNORED}/"));
            (!ignored).then(|| (path.to_string(), l.to_string()))
        })
        .collect()
}

/// One snapshotter's listing against the reference's.
fn summarize(
    snapshotter: &str,
    map: &BTreeMap<String, String>,
    reference: &BTreeMap<String, String>,
    digest: String,
    sqlite: String,
) -> Listing {
    let count = |t: &str| map.values().filter(|l| l.starts_with(t)).count();
    let bytes = map
        .values()
        .filter(|l| l.starts_with("f\t"))
        .filter_map(|l| l.split('\t').nth(4)?.parse::<u64>().ok())
        .sum();
    let mut diff = Vec::new();
    for (p, l) in reference {
        if map.get(p) != Some(l) {
            diff.push(format!("- {l}"));
        }
    }
    for (p, l) in map {
        if reference.get(p) != Some(l) {
            diff.push(format!("+ {l}"));
        }
    }
    Listing {
        snapshotter: snapshotter.to_string(),
        files: count("f\t"),
        bytes,
        symlinks: count("l\t"),
        dirs: count("d\t"),
        other: count("o\t"),
        digest,
        sqlite,
        diff_count: diff.len(),
        diff: diff.into_iter().take(20).collect(),
    }
}

fn sha256_hex(text: &str) -> Result<String> {
    use std::io::Write;
    let mut c = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("sha256sum")?;
    c.stdin
        .take()
        .context("stdin")?
        .write_all(text.as_bytes())?;
    let out = c.wait_with_output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string())
}

/// Pull `image` on each snapshotter, run sqlite3 and the listing, compare with
/// overlayfs's. The image is removed again afterwards.
pub fn check(env: &Env, image: &str, snaps: &[&str]) -> Result<FilesCheck> {
    let mut raw: Vec<(String, BTreeMap<String, String>, String, String)> = Vec::new();
    for &snap in snaps {
        env.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            snap,
            image,
        ])
        .with_context(|| format!("pull on {snap}"))?;
        let sqlite = run_container(
            env,
            snap,
            image,
            &format!("files-sqlite-{snap}"),
            true,
            &SQLITE,
        )?;
        let listing = run_container(
            env,
            snap,
            image,
            &format!("files-list-{snap}"),
            true,
            &["python3", "-c", LIST_PY],
        )?;
        let map = parse(&listing);
        let canon: String = map.values().map(|l| format!("{l}\n")).collect();
        raw.push((
            snap.to_string(),
            map,
            sha256_hex(&canon)?,
            sqlite.trim().to_string(),
        ));
    }
    env.ctr(&["image", "rm", "--sync", image])?;
    let reference = raw
        .iter()
        .find(|(n, ..)| n == "overlayfs")
        .map(|(_, m, ..)| m.clone())
        .context("the files check needs overlayfs as the reference")?;
    let listings: Vec<Listing> = raw
        .into_iter()
        .map(|(snap, map, digest, sqlite)| summarize(&snap, &map, &reference, digest, sqlite))
        .collect();
    Ok(FilesCheck {
        image: image.to_string(),
        equal: listings.iter().all(|l| l.diff_count == 0),
        listings,
        ignored: vec![format!(
            "{IGNORED}: ext4's own directory on the thinpool volumes, not part of the image"
        )],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const REF: &str = "d\t/etc\t755\t0:0\n\
        f\t/etc/a\t644\t0:0\t5\tabc\n\
        l\t/bin\t777\t0:0\tusr/bin\n\
        f\t/big\t600\t0:0\t1000\tdef\n";

    #[test]
    fn equal_listings_but_lost_found() {
        let r = parse(REF);
        let other = parse(&format!(
            "d\t/lost+found\t700\t0:0\nf\t/lost+found/x\t600\t0:0\t1\tz\n{REF}"
        ));
        let l = summarize("thinpool", &other, &r, "d".into(), "s".into());
        assert_eq!(l.diff_count, 0, "{:?}", l.diff);
        assert_eq!(
            (l.files, l.bytes, l.symlinks, l.dirs, l.other),
            (2, 1005, 1, 1, 0)
        );
    }

    #[test]
    fn a_changed_digest_and_a_missing_file_are_differences() {
        let r = parse(REF);
        let changed = REF
            .replace("1000\tdef", "1000\tdee")
            .replace("l\t/bin\t777\t0:0\tusr/bin\n", "");
        let l = summarize("x", &parse(&changed), &r, "d".into(), "s".into());
        assert_eq!(l.diff_count, 3, "{:?}", l.diff);
        assert!(l.diff.contains(&"- l\t/bin\t777\t0:0\tusr/bin".to_string()));
        assert!(l
            .diff
            .contains(&"+ f\t/big\t600\t0:0\t1000\tdee".to_string()));
    }
}
