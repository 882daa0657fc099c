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
        head = "%s %o %d:%d" % (p, stat.S_IMODE(m), s.st_uid, s.st_gid)
        if stat.S_ISREG(m):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for b in iter(lambda: f.read(1 << 20), b""):
                    h.update(b)
            out.append("f %s %d %s" % (head, s.st_size, h.hexdigest()))
        elif stat.S_ISLNK(m):
            out.append("l %s -> %s" % (head, os.readlink(p)))
        elif stat.S_ISDIR(m):
            out.append("d " + head)
            walk(p)
        else:
            out.append("o %s %o" % (head, stat.S_IFMT(m)))
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
/// not the image's (containerd's devmapper snapshotter shows it too).
const IGNORED: &str = "/lost+found";

fn parse(listing: &str) -> BTreeMap<String, String> {
    listing
        .lines()
        .filter(|l| l.len() > 2)
        .filter_map(|l| {
            let path = l[2..].split(' ').next()?;
            (path != IGNORED && !path.starts_with("/lost+found/"))
                .then(|| (path.to_string(), l.to_string()))
        })
        .collect()
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
    let mut listings = Vec::new();
    for (snap, map, digest, sqlite) in raw {
        let count = |t: char| map.values().filter(|l| l.starts_with(t)).count();
        // "f PATH MODE UID:GID SIZE SHA256": the size is the next-to-last field.
        let bytes = map
            .values()
            .filter(|l| l.starts_with('f'))
            .filter_map(|l| l.rsplit(' ').nth(1)?.parse::<u64>().ok())
            .sum();
        let mut diff = Vec::new();
        for (p, l) in &reference {
            if map.get(p) != Some(l) {
                diff.push(format!("- {l}"));
            }
        }
        for (p, l) in &map {
            if reference.get(p) != Some(l) {
                diff.push(format!("+ {l}"));
            }
        }
        listings.push(Listing {
            snapshotter: snap,
            files: count('f'),
            bytes,
            symlinks: count('l'),
            dirs: count('d'),
            other: count('o'),
            digest,
            sqlite,
            diff_count: diff.len(),
            diff: diff.into_iter().take(20).collect(),
        });
    }
    Ok(FilesCheck {
        image: image.to_string(),
        equal: listings.iter().all(|l| l.diff_count == 0),
        listings,
        ignored: vec![format!(
            "{IGNORED}: ext4's own directory on the thinpool volumes, not part of the image"
        )],
    })
}
