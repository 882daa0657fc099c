//! Where the PostgreSQL data directory goes: each target is a [`Backend`] whose
//! "container" holds an ext4 (or btrfs, or host) directory. The copy-on-write
//! targets clone an image with content; the plain ones use the image itself.
//! Every target exists with and without the host page cache under it
//! (issue 11, item 4), except the host directory.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::backends::{
    copy_tree, losetup, mount_dev, Backend, Btrfs, Params, Qcow2, Thinpool, MKFS_EXT4,
};
use crate::util::{fs_used_bytes, path_str, run, sync_all, Teardown, Undo};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A clone of a committed base volume (ext4), served by `thinpool mount`.
    ThinpoolClone,
    /// A volume made by `volume create --preallocate` (ext4), used directly.
    ThinpoolPrealloc,
    /// ext4 on a loop device over a plain sparse file.
    Loop,
    /// ext4 in a qcow2 overlay over a base qcow2, served by qemu-storage-daemon.
    Qcow2,
    /// A snapshot of a subvolume of a btrfs on a loop file.
    Btrfs,
    /// A directory on the host's own file system.
    Host,
}

pub struct Target {
    pub name: &'static str,
    pub kind: Kind,
    /// The image file's I/O goes through the host page cache.
    pub page_cache: bool,
    pub what: &'static str,
}

/// Every target, in report order: pairs with and without the host page cache.
pub const ALL: &[Target] = &[
    Target {
        name: "thinpool",
        kind: Kind::ThinpoolClone,
        page_cache: true,
        what: "ext4 in a thinpool clone of a committed base volume (64 KiB blocks), `thinpool mount` (FUSE + loop `--direct-io=on`); pool file read and written through the host page cache",
    },
    Target {
        name: "thinpool-direct",
        kind: Kind::ThinpoolClone,
        page_cache: false,
        what: "the same, mounted with `thinpool mount --direct` (pool file opened O_DIRECT)",
    },
    Target {
        name: "thinpool-prealloc",
        kind: Kind::ThinpoolPrealloc,
        page_cache: true,
        what: "ext4 in a volume made by `thinpool volume create --preallocate`, used directly (no clone)",
    },
    Target {
        name: "thinpool-prealloc-direct",
        kind: Kind::ThinpoolPrealloc,
        page_cache: false,
        what: "the same, mounted with `thinpool mount --direct`",
    },
    Target {
        name: "loop-cached",
        kind: Kind::Loop,
        page_cache: true,
        what: "ext4 on a loop device over a plain sparse file, `losetup --direct-io=off`",
    },
    Target {
        name: "loop-direct",
        kind: Kind::Loop,
        page_cache: false,
        what: "the same with `losetup --direct-io=on`",
    },
    Target {
        name: "qcow2-cached",
        kind: Kind::Qcow2,
        page_cache: true,
        what: "ext4 in a qcow2 overlay (64 KiB clusters) over a base qcow2, qemu-storage-daemon `cache.direct=off` on both file nodes, FUSE export + buffered loop",
    },
    Target {
        name: "qcow2-direct",
        kind: Kind::Qcow2,
        page_cache: false,
        what: "the same with `cache.direct=on` (the loop device over the qsd export stays buffered: see the caveat above)",
    },
    Target {
        name: "btrfs-cached",
        kind: Kind::Btrfs,
        page_cache: true,
        what: "a snapshot of a subvolume on a btrfs on a loop file, `losetup --direct-io=off`",
    },
    Target {
        name: "btrfs-direct",
        kind: Kind::Btrfs,
        page_cache: false,
        what: "the same with `losetup --direct-io=on`",
    },
    Target {
        name: "host",
        kind: Kind::Host,
        page_cache: true,
        what: "a directory on the host's ext4 (the work dir's file system)",
    },
];

pub fn find(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}

/// Does `thinpool SUBCOMMAND --help` mention `flag`? (Options that other
/// branches add: the scenario runs them when the binary has them.)
fn thinpool_has(bin: &Path, sub: &[&str], flag: &str) -> bool {
    let mut args: Vec<&str> = sub.to_vec();
    args.push("--help");
    std::process::Command::new(bin)
        .args(&args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

/// Why a target cannot run here, if it cannot.
pub fn unavailable(t: &Target, p: &Params) -> Option<String> {
    let base = match t.kind {
        Kind::ThinpoolClone | Kind::ThinpoolPrealloc => "thinpool",
        Kind::Loop => "loop",
        Kind::Qcow2 => "qcow2",
        Kind::Btrfs => "btrfs",
        Kind::Host => "host",
    };
    if matches!(base, "thinpool" | "qcow2" | "btrfs") {
        if let Some(why) = crate::backends::missing(base, p) {
            return Some(why);
        }
    }
    if base == "loop" && !crate::util::have_tool("losetup") {
        return Some("losetup not installed".into());
    }
    let bin = &p.thinpool_bin;
    if t.kind == Kind::ThinpoolPrealloc
        && !thinpool_has(bin, &["volume", "create"], "--preallocate")
    {
        return Some(
            "not available in this build (`thinpool volume create` has no --preallocate)".into(),
        );
    }
    if base == "thinpool" && !t.page_cache && !thinpool_has(bin, &["mount"], "--direct") {
        return Some("not available in this build (`thinpool mount` has no --direct)".into());
    }
    None
}

pub fn make(t: &Target, dir: &Path, p: &Params) -> Result<Box<dyn Backend>> {
    std::fs::create_dir_all(dir)?;
    Ok(match t.kind {
        Kind::ThinpoolClone => Box::new(Thinpool::with_options(dir, p, !t.page_cache, false)),
        Kind::ThinpoolPrealloc => Box::new(Thinpool::with_options(dir, p, !t.page_cache, true)),
        Kind::Loop => Box::new(PlainLoop::new(dir, p, !t.page_cache)),
        Kind::Qcow2 => Box::new(Qcow2::new(dir, p, !t.page_cache)?),
        Kind::Btrfs => Box::new(Btrfs::new(dir, p, !t.page_cache)?),
        Kind::Host => Box::new(HostDir::new(dir)),
    })
}

/// `/sys/block/loopN/loop/dio`: whether a loop device really does direct I/O
/// (`losetup --direct-io=on` can fall back to buffered).
pub fn loop_dio(dev: &str) -> Option<bool> {
    let name = Path::new(dev).file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).ok()?;
    Some(s.trim() == "1")
}

// ------------------------------------------------------------- plain loop

/// ext4 on a loop device over a plain file; the "container" is the image itself.
pub struct PlainLoop {
    img: PathBuf,
    fs: PathBuf,
    volume_bytes: u64,
    direct: bool,
    dio: Option<bool>,
    td: Teardown,
}

impl PlainLoop {
    fn new(dir: &Path, p: &Params, direct: bool) -> PlainLoop {
        PlainLoop {
            img: dir.join("plain.img"),
            fs: dir.join("fs"),
            volume_bytes: p.volume_bytes,
            direct,
            dio: None,
            td: Teardown::default(),
        }
    }
}

impl Drop for PlainLoop {
    fn drop(&mut self) {
        self.td.all();
    }
}

impl Backend for PlainLoop {
    fn name(&self) -> &'static str {
        if self.direct {
            "loop-direct"
        } else {
            "loop-cached"
        }
    }
    fn space_method(&self) -> String {
        "used blocks of the ext4 (statvfs)".into()
    }
    fn notes(&self) -> Vec<String> {
        vec![format!(
            "a {} sparse file, `losetup --direct-io={}` (the kernel reports dio={}), mkfs.ext4; no copy-on-write: every run uses the image itself",
            crate::report::fmt_bytes(self.volume_bytes as f64),
            if self.direct { "on" } else { "off" },
            match self.dio {
                Some(true) => "1",
                Some(false) => "0",
                None => "?",
            }
        )]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        let f = std::fs::File::create(&self.img)?;
        f.set_len(self.volume_bytes)?;
        drop(f);
        let dev = losetup(&self.img, self.direct)?;
        self.td.push(Undo::Loop(dev.clone()));
        self.dio = loop_dio(&dev);
        let mut m: Vec<&str> = MKFS_EXT4.to_vec();
        m.push(&dev);
        run("mkfs.ext4", &m)?;
        mount_dev(&dev, &self.fs, "ext4")?;
        self.td.push(Undo::Umount(self.fs.clone()));
        copy_tree(content, &self.fs)?;
        sync_all();
        Ok(())
    }
    fn create(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn mount(&mut self, _name: &str) -> Result<PathBuf> {
        Ok(self.fs.clone())
    }
    fn umount(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn remove(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        fs_used_bytes(&self.fs)
    }
}

// ------------------------------------------------------------- host dir

/// A directory on the host's file system; the "container" is the image itself.
pub struct HostDir {
    dir: PathBuf,
}

impl HostDir {
    fn new(dir: &Path) -> HostDir {
        HostDir {
            dir: dir.join("image"),
        }
    }
}

impl Backend for HostDir {
    fn name(&self) -> &'static str {
        "host"
    }
    fn space_method(&self) -> String {
        "allocated blocks of the directory (du)".into()
    }
    fn notes(&self) -> Vec<String> {
        let fs = run(
            "findmnt",
            &[
                "-no",
                "FSTYPE,SOURCE,OPTIONS",
                "-T",
                &self.dir.to_string_lossy(),
            ],
        )
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
        vec![format!(
            "a directory on the host file system ({fs}); no copy-on-write"
        )]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        copy_tree(content, &self.dir)?;
        sync_all();
        Ok(())
    }
    fn create(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn mount(&mut self, _name: &str) -> Result<PathBuf> {
        Ok(self.dir.clone())
    }
    fn umount(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn remove(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        crate::util::du_bytes(&self.dir)
    }
}

/// The device a directory's file system sits on, when it is a loop device
/// (`/dev/loopN`), for its flush counters.
pub fn loop_of(dir: &Path) -> Option<String> {
    let src = run("findmnt", &["-no", "SOURCE", "-T", path_str(dir).ok()?]).ok()?;
    // btrfs prints "/dev/loop3[/subvol]".
    let src = src.trim().split('[').next()?.to_string();
    let is_loop = Path::new(&src)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("loop"));
    is_loop.then_some(src)
}
