//! The storage backends compared: each builds the image once, then creates,
//! mounts, unmounts and removes containers made from it, and says how much
//! space it uses. Everything they set up is registered in a [`Teardown`] so
//! it is undone on drop, also after an error or a signal.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::util::{
    cstr, du_bytes, fs_used_bytes, kill_pid, path_str, pid_alive, run, sync_all, umount_dir,
    Teardown, Undo,
};

pub const ALL: [&str; 5] = ["thinpool", "overlayfs", "fullcopy", "qcow2", "btrfs"];

/// Backends `--backends` also accepts, not run by default: qcow2 through the
/// host page cache (`cache.direct=off`), for like-with-like comparisons with
/// thinpool, which reads and writes its pool file through that cache.
pub const EXTRA: [&str; 1] = ["qcow2-cached"];

pub struct Params {
    pub volume_bytes: u64,
    pub block_size: u64,
    pub thinpool_bin: PathBuf,
}

pub trait Backend {
    fn name(&self) -> &'static str;
    fn space_method(&self) -> String;
    fn notes(&self) -> Vec<String>;
    /// Put the image content (a directory tree) into this backend's image.
    fn build_image(&mut self, content: &Path) -> Result<()>;
    /// Create a container (its writable layer) from the image; this is what is timed.
    fn create(&mut self, name: &str) -> Result<()>;
    /// Make a container usable; returns the directory showing its root.
    fn mount(&mut self, name: &str) -> Result<PathBuf>;
    fn umount(&mut self, name: &str) -> Result<()>;
    fn remove(&mut self, name: &str) -> Result<()>;
    /// Wait for background reclaim and write-back so that `space` is accurate (untimed).
    fn settle(&mut self) -> Result<()> {
        sync_all();
        Ok(())
    }
    /// Bytes of storage in use, as a total (the harness works with differences).
    fn space(&mut self) -> Result<u64>;
    /// The served pool's flush and commit counters (`commits` of `thinpool
    /// info --json`), for backends that have them.
    fn pool_counters(&mut self) -> Option<serde_json::Value> {
        None
    }
    /// Whether the serving process holds its storage file open with O_DIRECT
    /// (read from /proc), for backends with such a process; while mounted.
    fn storage_o_direct(&mut self) -> Option<bool> {
        None
    }
}

/// Is `file` open with O_DIRECT in process `pid`? (`flags` of /proc/PID/fdinfo, octal.)
pub(crate) fn open_o_direct(pid: i32, file: &Path) -> Option<bool> {
    let want = file.canonicalize().ok()?;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.flatten() {
        if std::fs::read_link(e.path()).ok().as_deref() != Some(want.as_path()) {
            continue;
        }
        let info =
            std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_str()?))
                .ok()?;
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())?;
        return Some(flags & libc::O_DIRECT as u32 != 0);
    }
    None
}

/// The tools a backend needs; `Some(reason)` if it has to be skipped.
pub fn missing(name: &str, p: &Params) -> Option<String> {
    let need: &[&str] = match name {
        "thinpool" => &["losetup", "mkfs.ext4"],
        "overlayfs" => &["cp"],
        "fullcopy" => &["cp"],
        "qcow2" | "qcow2-cached" => &["qemu-img", "qemu-storage-daemon", "losetup", "mkfs.ext4"],
        "btrfs" => &["mkfs.btrfs", "btrfs", "losetup"],
        _ => return Some(format!("unknown backend {name}")),
    };
    for t in need {
        if !crate::util::have_tool(t) {
            return Some(format!("{t} not installed (run tools/bench-setup.sh)"));
        }
    }
    let fs = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
    let has_fs = |f: &str| fs.lines().any(|l| l.split_whitespace().last() == Some(f));
    match name {
        "thinpool"
            if !p.thinpool_bin.is_file()
                && !crate::util::have_tool(path_str_lossy(&p.thinpool_bin).as_str()) =>
        {
            Some(format!(
                "thinpool binary {} not found (build with cargo build --release)",
                p.thinpool_bin.display()
            ))
        }
        "thinpool" | "qcow2" | "qcow2-cached" if !Path::new("/dev/fuse").exists() => {
            Some("/dev/fuse missing".into())
        }
        "overlayfs" if !has_fs("overlay") => Some("kernel has no overlay filesystem".into()),
        "btrfs" if !has_fs("btrfs") => Some("kernel has no btrfs filesystem".into()),
        _ => None,
    }
}

fn path_str_lossy(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

pub fn make(name: &str, dir: &Path, p: &Params) -> Result<Box<dyn Backend>> {
    std::fs::create_dir_all(dir)?;
    Ok(match name {
        "thinpool" => Box::new(Thinpool::new(dir, p)),
        "overlayfs" => Box::new(Overlay::new(dir)?),
        "fullcopy" => Box::new(FullCopy::new(dir)?),
        "qcow2" => Box::new(Qcow2::new(dir, p, true)?),
        "qcow2-cached" => Box::new(Qcow2::new(dir, p, false)?),
        "btrfs" => Box::new(Btrfs::new(dir, p, true)?),
        _ => bail!("unknown backend {name}"),
    })
}

/// `cp -a SRC/. DST/` (the image content into a fresh filesystem or dir).
pub(crate) fn copy_tree(src: &Path, dst: &Path) -> Result<()> {
    let s = format!("{}/.", path_str(src)?);
    run("cp", &["-a", &s, path_str(dst)?])?;
    Ok(())
}

/// mkfs.ext4 options used for every ext4 image we format ourselves: no lazy
/// init, so no background zeroing runs later inside a container.
pub(crate) const MKFS_EXT4: &[&str] = &["-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0"];

pub(crate) fn mount_dev(dev: &str, dir: &Path, fstype: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    run("mount", &["-t", fstype, dev, path_str(dir)?])?;
    Ok(())
}

/// Attach a file as a loop device, with direct I/O if asked (falls back to buffered).
pub(crate) fn losetup(file: &Path, direct: bool) -> Result<String> {
    let f = path_str(file)?;
    let out = match direct {
        true => match run("losetup", &["--direct-io=on", "-f", "--show", f]) {
            Ok(o) => o,
            Err(_) => run("losetup", &["-f", "--show", f])?,
        },
        false => run("losetup", &["-f", "--show", f])?,
    };
    Ok(out.trim().to_string())
}

// ---------------------------------------------------------------- thinpool

pub struct Thinpool {
    bin: String,
    pool: PathBuf,
    mnt: PathBuf,
    block_size: u64,
    volume_bytes: u64,
    /// Mount with `--direct` (the pool file opened O_DIRECT).
    direct: bool,
    /// The image is a preallocated volume (`volume create --preallocate`),
    /// used as it is: "containers" are the image itself, nothing is cloned.
    preallocate: bool,
    mounted: HashMap<String, (PathBuf, u64)>,
    td: Teardown,
}

impl Thinpool {
    fn new(dir: &Path, p: &Params) -> Thinpool {
        Thinpool::with_options(dir, p, false, false)
    }

    pub(crate) fn with_options(
        dir: &Path,
        p: &Params,
        direct: bool,
        preallocate: bool,
    ) -> Thinpool {
        Thinpool {
            bin: path_str_lossy(&p.thinpool_bin),
            pool: dir.join("bench.pool"),
            mnt: dir.join("mnt"),
            block_size: p.block_size,
            volume_bytes: p.volume_bytes,
            direct,
            preallocate,
            mounted: HashMap::new(),
            td: Teardown::default(),
        }
    }

    /// The volume a container name stands for.
    fn vol<'a>(&self, name: &'a str) -> &'a str {
        if self.preallocate {
            "image"
        } else {
            name
        }
    }

    /// Run a thinpool command; while a server that is shutting down still
    /// holds the pool ("in use"), retry for up to a minute.
    fn tp(&self, args: &[&str]) -> Result<String> {
        let t = Instant::now();
        loop {
            match run(&self.bin, args) {
                Err(e)
                    if format!("{e:#}").contains("in use")
                        && t.elapsed() < Duration::from_secs(60) =>
                {
                    crate::util::check_interrupt()?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                r => {
                    if t.elapsed() > Duration::from_millis(500) && r.is_ok() {
                        crate::util::vlog(format!(
                            "thinpool {}: waited {:.1} s for the pool to be released",
                            args[0],
                            t.elapsed().as_secs_f64()
                        ));
                    }
                    return r;
                }
            }
        }
    }

    fn pool_s(&self) -> String {
        path_str_lossy(&self.pool)
    }

    fn mount_vol(&mut self, name: &str, mkfs: bool) -> Result<PathBuf> {
        let dir = self.mnt.join(name);
        std::fs::create_dir_all(&dir)?;
        let pool = self.pool_s();
        let d = path_str(&dir)?.to_string();
        let mut args = vec!["mount", pool.as_str(), name, d.as_str()];
        if mkfs {
            args.extend(["--mkfs", "ext4"]);
        }
        if self.direct {
            args.push("--direct");
        }
        let id = self.td.push(Undo::Command(
            vec![self.bin.clone(), "umount".into(), d.clone()],
            Some(dir.clone()),
        ));
        if let Err(e) = self.tp(&args) {
            self.td.undo(id);
            return Err(e);
        }
        self.mounted.insert(name.to_string(), (dir.clone(), id));
        Ok(dir)
    }

    /// Processes whose command line names our pool file (the path is unique to this run).
    fn server_pids(&self) -> Vec<i32> {
        let want = self.pool_s();
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let me = std::process::id() as i32;
        rd.flatten()
            .filter_map(|e| {
                let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd);
                (pid != me && cmd.split('\0').any(|a| a == want)).then_some(pid)
            })
            .collect()
    }

    /// Any server process still serving our pool file after the last umount
    /// (ours: the path is unique to this run) is stopped by its pid.
    fn stop_servers(&self) {
        for pid in self.server_pids() {
            kill_pid(pid);
        }
    }
}

impl Drop for Thinpool {
    fn drop(&mut self) {
        self.td.all();
        self.stop_servers();
    }
}

impl Backend for Thinpool {
    fn name(&self) -> &'static str {
        "thinpool"
    }
    fn space_method(&self) -> String {
        "`thinpool info POOL --json`: data_used_bytes + metadata_used_bytes of the pool (blocks in use, shared ones counted once)".into()
    }
    fn notes(&self) -> Vec<String> {
        vec![
            format!(
                "pool with {} KiB blocks; image = a {} thin volume formatted ext4 by `thinpool mount --mkfs ext4`",
                self.block_size / 1024,
                crate::report::fmt_bytes(self.volume_bytes as f64)
            ),
            "create = `thinpool clone POOL image NAME`; mount = `thinpool mount` (FUSE export + loop device + ext4)".into(),
        ]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        let pool = self.pool_s();
        let bs = self.block_size.to_string();
        let size = (self.volume_bytes * 4).to_string();
        self.tp(&["create", &pool, "--size", &size, "--block-size", &bs])?;
        let vs = self.volume_bytes.to_string();
        let mut args = vec!["volume", "create", &pool, "image", "--size", &vs];
        if self.preallocate {
            args.push("--preallocate");
        }
        self.tp(&args)?;
        let dir = self.mount_vol("image", true)?;
        copy_tree(content, &dir)?;
        sync_all();
        self.umount("image")
    }
    fn create(&mut self, name: &str) -> Result<()> {
        if self.preallocate {
            return Ok(());
        }
        let pool = self.pool_s();
        self.tp(&["clone", &pool, "image", name])?;
        Ok(())
    }
    fn mount(&mut self, name: &str) -> Result<PathBuf> {
        self.mount_vol(self.vol(name), false)
    }
    fn umount(&mut self, name: &str) -> Result<()> {
        let name = self.vol(name);
        let Some((dir, id)) = self.mounted.remove(name) else {
            bail!("{name} is not mounted");
        };
        let r = self.tp(&["umount", path_str(&dir)?]);
        if r.is_err() {
            self.td.undo(id);
        } else {
            self.td.forget(id);
        }
        r?;
        // `thinpool umount` can return before the server has let go of the
        // pool file: wait (untimed) until the pool answers again.
        self.tp(&["info", &self.pool_s(), "--json"])?;
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<()> {
        if self.preallocate {
            return Ok(());
        }
        let pool = self.pool_s();
        self.tp(&["remove", &pool, name])?;
        Ok(())
    }
    fn storage_o_direct(&mut self) -> Option<bool> {
        self.server_pids()
            .into_iter()
            .find_map(|pid| open_o_direct(pid, &self.pool))
    }
    fn pool_counters(&mut self) -> Option<serde_json::Value> {
        let out = self.tp(&["info", &self.pool_s(), "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        v.get("commits").filter(|c| !c.is_null()).cloned()
    }
    fn space(&mut self) -> Result<u64> {
        let pool = self.pool_s();
        let out = self.tp(&["info", &pool, "--json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&out).with_context(|| format!("thinpool info --json: {out}"))?;
        let get = |k: &str| v.get(k).and_then(|x| x.as_u64());
        let data = get("data_used_bytes").context("info --json has no data_used_bytes")?;
        Ok(data + get("metadata_used_bytes").unwrap_or(0))
    }
}

// ---------------------------------------------------------------- overlayfs

pub struct Overlay {
    lower: PathBuf,
    root: PathBuf,
    mounted: HashMap<String, (PathBuf, u64)>,
    td: Teardown,
}

impl Overlay {
    fn new(dir: &Path) -> Result<Overlay> {
        let o = Overlay {
            lower: dir.join("lower"),
            root: dir.join("containers"),
            mounted: HashMap::new(),
            td: Teardown::default(),
        };
        std::fs::create_dir_all(&o.lower)?;
        std::fs::create_dir_all(&o.root)?;
        Ok(o)
    }
}

impl Backend for Overlay {
    fn name(&self) -> &'static str {
        "overlayfs"
    }
    fn space_method(&self) -> String {
        "allocated blocks (st_blocks, like `du`) of every container's upper and work dirs".into()
    }
    fn notes(&self) -> Vec<String> {
        vec![
            "image = a lower dir on the host's ext4 (Docker's overlay2); create = mkdir upper/work/merged; mount = mount(2) of overlay".into(),
        ]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        copy_tree(content, &self.lower)?;
        sync_all();
        Ok(())
    }
    fn create(&mut self, name: &str) -> Result<()> {
        let c = self.root.join(name);
        for d in ["upper", "work", "merged"] {
            std::fs::create_dir_all(c.join(d))?;
        }
        Ok(())
    }
    fn mount(&mut self, name: &str) -> Result<PathBuf> {
        let c = self.root.join(name);
        let merged = c.join("merged");
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}",
            path_str(&self.lower)?,
            path_str(&c.join("upper"))?,
            path_str(&c.join("work"))?
        );
        let src = std::ffi::CString::new("overlay")?;
        let opts_c = std::ffi::CString::new(opts)?;
        // SAFETY: mount(2) with valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                cstr(&merged).as_ptr(),
                src.as_ptr(),
                0,
                opts_c.as_ptr() as *const libc::c_void,
            )
        };
        if rc != 0 {
            bail!("mount overlay: {}", std::io::Error::last_os_error());
        }
        let id = self.td.push(Undo::Umount(merged.clone()));
        self.mounted.insert(name.to_string(), (merged.clone(), id));
        Ok(merged)
    }
    fn umount(&mut self, name: &str) -> Result<()> {
        if let Some((_, id)) = self.mounted.remove(name) {
            self.td.undo(id);
        }
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<()> {
        std::fs::remove_dir_all(self.root.join(name))?;
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        du_bytes(&self.root)
    }
}

// ---------------------------------------------------------------- full copy

pub struct FullCopy {
    image: PathBuf,
    root: PathBuf,
}

impl FullCopy {
    fn new(dir: &Path) -> Result<FullCopy> {
        let f = FullCopy {
            image: dir.join("image"),
            root: dir.join("containers"),
        };
        std::fs::create_dir_all(&f.image)?;
        std::fs::create_dir_all(&f.root)?;
        Ok(f)
    }
}

impl Backend for FullCopy {
    fn name(&self) -> &'static str {
        "fullcopy"
    }
    fn space_method(&self) -> String {
        "allocated blocks (st_blocks, like `du`) of the container directories".into()
    }
    fn notes(&self) -> Vec<String> {
        vec!["image = a dir on the host's ext4; create = `cp -a` of it (Docker's vfs driver); mount = nothing".into()]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        copy_tree(content, &self.image)?;
        sync_all();
        Ok(())
    }
    fn create(&mut self, name: &str) -> Result<()> {
        let dst = self.root.join(name);
        std::fs::create_dir_all(&dst)?;
        copy_tree(&self.image, &dst)?;
        // The copy is only made when it is on disk: count the write-back too.
        let f = std::fs::File::open(&dst)?;
        // SAFETY: syncfs on an open fd.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
        Ok(())
    }
    fn mount(&mut self, name: &str) -> Result<PathBuf> {
        Ok(self.root.join(name))
    }
    fn umount(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<()> {
        std::fs::remove_dir_all(self.root.join(name))?;
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        du_bytes(&self.root)
    }
}

// ---------------------------------------------------------------- qcow2

/// One running qemu-storage-daemon exporting one qcow2 as a FUSE file, with
/// a loop device and a mount on top.
struct QsdMount {
    dir: PathBuf,
    loopdev: String,
    pidfile: PathBuf,
    ids: Vec<u64>,
}

pub struct Qcow2 {
    base: PathBuf,
    cdir: PathBuf,
    xdir: PathBuf,
    mnt: PathBuf,
    volume_bytes: u64,
    block_size: u64,
    /// `cache.direct` of qsd's file nodes: on = O_DIRECT, off = through the host page cache.
    cache_direct: bool,
    mounted: HashMap<String, QsdMount>,
    td: Teardown,
}

impl Qcow2 {
    pub(crate) fn new(dir: &Path, p: &Params, cache_direct: bool) -> Result<Qcow2> {
        let q = Qcow2 {
            cache_direct,
            base: dir.join("base.qcow2"),
            cdir: dir.join("containers"),
            xdir: dir.join("export"),
            mnt: dir.join("mnt"),
            volume_bytes: p.volume_bytes,
            block_size: p.block_size,
            mounted: HashMap::new(),
            td: Teardown::default(),
        };
        for d in [&q.cdir, &q.xdir, &q.mnt] {
            std::fs::create_dir_all(d)?;
        }
        Ok(q)
    }

    fn file_of(&self, name: &str) -> PathBuf {
        if name == "image" {
            self.base.clone()
        } else {
            self.cdir.join(format!("{name}.qcow2"))
        }
    }

    /// Start qsd on `name` (image or container), attach a loop device, optionally mkfs, mount.
    fn start(&mut self, name: &str, mkfs: bool) -> Result<PathBuf> {
        let export = self.xdir.join(format!("{name}.raw"));
        std::fs::write(&export, b"")?;
        let pidfile = self.xdir.join(format!("{name}.pid"));
        let _ = std::fs::remove_file(&pidfile);
        let base = path_str(&self.base)?.to_string();
        let cache = if self.cache_direct { "on" } else { "off" };
        let mut args: Vec<String> = Vec::new();
        let top = if name == "image" {
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name=basef,filename={base},cache.direct={cache}"
            ));
            args.push("--blockdev".into());
            args.push("driver=qcow2,node-name=top,file=basef".into());
            "top"
        } else {
            let f = path_str(&self.file_of(name))?.to_string();
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name=basef,filename={base},cache.direct={cache},read-only=on"
            ));
            args.push("--blockdev".into());
            args.push("driver=qcow2,node-name=base,file=basef,read-only=on".into());
            args.push("--blockdev".into());
            args.push(format!(
                "driver=file,node-name=topf,filename={f},cache.direct={cache}"
            ));
            args.push("--blockdev".into());
            args.push("driver=qcow2,node-name=top,file=topf,backing=base".into());
            "top"
        };
        args.push("--export".into());
        args.push(format!(
            "type=fuse,id=exp,node-name={top},mountpoint={},writable=on",
            path_str(&export)?
        ));
        args.push("--pidfile".into());
        args.push(path_str(&pidfile)?.to_string());
        args.push("--daemonize".into());
        let kill_id = self.td.push(Undo::KillPidFile(pidfile.clone()));
        let fuse_id = self.td.push(Undo::Umount(export.clone()));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        run("qemu-storage-daemon", &a)?;
        // Buffered loop: with `--direct-io=on` over the qsd FUSE file, multi-page
        // writes were lost on this kernel (see docs/BENCHMARKS.md).
        let loopdev = losetup(&export, false)?;
        let loop_id = self.td.push(Undo::Loop(loopdev.clone()));
        if mkfs {
            let mut m: Vec<&str> = MKFS_EXT4.to_vec();
            m.push(&loopdev);
            run("mkfs.ext4", &m)?;
        }
        let dir = self.mnt.join(name);
        mount_dev(&loopdev, &dir, "ext4")?;
        let mnt_id = self.td.push(Undo::Umount(dir.clone()));
        self.mounted.insert(
            name.to_string(),
            QsdMount {
                dir: dir.clone(),
                loopdev,
                pidfile,
                ids: vec![kill_id, fuse_id, loop_id, mnt_id],
            },
        );
        Ok(dir)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        self.td.all();
    }
}

impl Backend for Qcow2 {
    fn name(&self) -> &'static str {
        if self.cache_direct {
            "qcow2"
        } else {
            "qcow2-cached"
        }
    }
    fn space_method(&self) -> String {
        "allocated size (st_blocks) of the containers' qcow2 overlay files".into()
    }
    fn notes(&self) -> Vec<String> {
        vec![
            format!("image = a {} qcow2 ({} KiB clusters) formatted ext4; create = `qemu-img create -f qcow2 -b base.qcow2 -F qcow2`", crate::report::fmt_bytes(self.volume_bytes as f64), self.block_size / 1024),
            format!("mount = qemu-storage-daemon (cache.direct={} on both file nodes) --export type=fuse + `losetup` (buffered: with --direct-io=on, multi-page writes through the qsd FUSE file were lost on this kernel) + mount ext4", if self.cache_direct { "on" } else { "off" }),
        ]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        let cs = format!("cluster_size={}", self.block_size);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &cs,
                path_str(&self.base)?,
                &self.volume_bytes.to_string(),
            ],
        )?;
        let dir = self.start("image", true)?;
        copy_tree(content, &dir)?;
        sync_all();
        self.umount("image")
    }
    fn create(&mut self, name: &str) -> Result<()> {
        let f = self.file_of(name);
        let cs = format!("cluster_size={}", self.block_size);
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &cs,
                "-b",
                path_str(&self.base)?,
                "-F",
                "qcow2",
                path_str(&f)?,
            ],
        )?;
        Ok(())
    }
    fn mount(&mut self, name: &str) -> Result<PathBuf> {
        self.start(name, false)
    }
    fn umount(&mut self, name: &str) -> Result<()> {
        let Some(m) = self.mounted.remove(name) else {
            bail!("{name} is not mounted");
        };
        umount_dir(&m.dir);
        run("losetup", &["-d", &m.loopdev])?;
        // The loop device goes away asynchronously; qsd must stop after it.
        let pid: Option<i32> = std::fs::read_to_string(&m.pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok());
        if let Some(pid) = pid {
            kill_pid(pid);
            let t = Instant::now();
            while pid_alive(pid) && t.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for id in m.ids.iter().rev() {
            self.td.undo(*id);
        }
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<()> {
        std::fs::remove_file(self.file_of(name))?;
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        du_bytes(&self.cdir)
    }
}

// ---------------------------------------------------------------- btrfs

pub struct Btrfs {
    img: PathBuf,
    fs: PathBuf,
    volume_bytes: u64,
    /// The loop device under it with `--direct-io=on` (else through the host page cache).
    loop_direct: bool,
    td: Teardown,
}

impl Btrfs {
    pub(crate) fn new(dir: &Path, p: &Params, loop_direct: bool) -> Result<Btrfs> {
        Ok(Btrfs {
            img: dir.join("btrfs.img"),
            fs: dir.join("fs"),
            volume_bytes: p.volume_bytes,
            loop_direct,
            td: Teardown::default(),
        })
    }
    fn sub(&self, name: &str) -> PathBuf {
        self.fs.join(name)
    }
}

impl Drop for Btrfs {
    fn drop(&mut self) {
        self.td.all();
    }
}

impl Backend for Btrfs {
    fn name(&self) -> &'static str {
        "btrfs"
    }
    fn space_method(&self) -> String {
        "`btrfs filesystem df --raw`: used bytes of data, metadata and system, times 2 for DUP profiles, after `btrfs filesystem sync` (and `subvolume sync` after deletes)".into()
    }
    fn notes(&self) -> Vec<String> {
        vec![
            format!("a {} btrfs on a sparse loop file (`losetup --direct-io={}`); image = a subvolume", crate::report::fmt_bytes((self.volume_bytes * 4) as f64), if self.loop_direct { "on" } else { "off" }),
            "create = `btrfs subvolume snapshot image NAME`; mount = nothing (snapshots are visible in the mounted fs); remove = `btrfs subvolume delete`".into(),
        ]
    }
    fn build_image(&mut self, content: &Path) -> Result<()> {
        let f = std::fs::File::create(&self.img)?;
        f.set_len(self.volume_bytes * 4)?;
        drop(f);
        let dev = losetup(&self.img, self.loop_direct)?;
        self.td.push(Undo::Loop(dev.clone()));
        run("mkfs.btrfs", &["-q", "-f", &dev])?;
        mount_dev(&dev, &self.fs, "btrfs")?;
        self.td.push(Undo::Umount(self.fs.clone()));
        let image = self.sub("image");
        run("btrfs", &["-q", "subvolume", "create", path_str(&image)?])?;
        copy_tree(content, &image)?;
        sync_all();
        Ok(())
    }
    fn create(&mut self, name: &str) -> Result<()> {
        let image = self.sub("image");
        let c = self.sub(name);
        run(
            "btrfs",
            &[
                "-q",
                "subvolume",
                "snapshot",
                path_str(&image)?,
                path_str(&c)?,
            ],
        )?;
        Ok(())
    }
    fn mount(&mut self, name: &str) -> Result<PathBuf> {
        Ok(self.sub(name))
    }
    fn umount(&mut self, _name: &str) -> Result<()> {
        Ok(())
    }
    fn remove(&mut self, name: &str) -> Result<()> {
        let c = self.sub(name);
        run("btrfs", &["-q", "subvolume", "delete", path_str(&c)?])?;
        Ok(())
    }
    fn settle(&mut self) -> Result<()> {
        let fs = path_str(&self.fs)?.to_string();
        run("btrfs", &["subvolume", "sync", &fs])?;
        run("btrfs", &["filesystem", "sync", &fs])?;
        Ok(())
    }
    fn space(&mut self) -> Result<u64> {
        let fs = path_str(&self.fs)?.to_string();
        run("btrfs", &["filesystem", "sync", &fs])?;
        let out = run("btrfs", &["filesystem", "df", "--raw", &fs])?;
        let mut total = 0u64;
        for line in out.lines() {
            // "Data, single: total=..., used=12345"
            let Some((kind, rest)) = line.split_once(':') else {
                continue;
            };
            if kind.contains("GlobalReserve") {
                continue;
            }
            let copies = if kind.contains("DUP") || kind.contains("RAID1") {
                2
            } else {
                1
            };
            if let Some(u) = rest.split("used=").nth(1) {
                let n: u64 = u
                    .trim()
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap_or(0);
                total += n * copies;
            }
        }
        if total == 0 {
            return fs_used_bytes(&self.fs);
        }
        Ok(total)
    }
}
