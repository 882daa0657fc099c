//! CLI verbs of the live export: serve, attach, detach, mount, umount.
//! Each is a thin wrapper over `thinpool::export`; see docs/EXPORT.md.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use thinpool::export::{self, Mkfs, MountOptions, ServeOptions};

/// Serve every volume of POOL as a file under DIR (FUSE), until unmounted or signalled.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Directory to mount the FUSE export on
    pub dir: PathBuf,
    /// FUSE worker threads (default: twice the CPU count, 4 to 16)
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Started by `attach`: exit when the last volume is detached (internal)
    #[arg(long, hide = true)]
    pub background: bool,
    /// Open the pool file with O_DIRECT: its blocks are not kept in the host
    /// page cache as well (see docs/EXPORT.md). Needs a file system with
    /// O_DIRECT (not ramfs, nor tmpfs before Linux 6.6)
    #[arg(long)]
    pub direct: bool,
    /// Take over from the server running for POOL (planned restart or
    /// upgrade): it hands over its FUSE connection, socket and pool and
    /// exits; attached volumes see a pause, not an error
    #[arg(long, conflicts_with = "supervise")]
    pub takeover: bool,
    /// Run a small holder process that keeps the FUSE connection and
    /// restarts the server if it dies (attached volumes see a pause)
    #[arg(long)]
    pub supervise: bool,
    /// Serve the bundle a holder sends on this descriptor (internal)
    #[arg(long, hide = true)]
    pub handover_fd: Option<i32>,
}

/// Serve POOL to containerd as a snapshotter: a proxy plugin answering
/// containerd's snapshots API on a Unix socket, plus everything `serve`
/// does (FUSE export, control socket for the other verbs).
///
/// containerd's config (version 2) names it:
///   [proxy_plugins.thinpool]
///     type = "snapshot"
///     address = "/run/thinpool/snapshotter.sock"
/// then `ctr image pull --snapshotter thinpool …`. The first start formats
/// an ext4 template in the pool; every layer and container is an O(1) clone.
#[derive(clap::Args, Debug)]
pub struct SnapshotterArgs {
    /// Pool file (made with `thinpool create`)
    pub pool: PathBuf,
    /// Unix socket to answer containerd on
    #[arg(long, default_value = "/run/thinpool/snapshotter.sock")]
    pub address: PathBuf,
    /// Directory for the FUSE export (default: next to the pool)
    #[arg(long)]
    pub export_dir: Option<PathBuf>,
    /// Size of every container's root file system (the ext4 template's
    /// virtual size; used when the template is first made), e.g. 10G
    #[arg(long, value_parser = super::size_arg, default_value = "10G")]
    pub volume_size: u64,
    /// Open the pool file with O_DIRECT (see `thinpool serve --direct`)
    #[arg(long)]
    pub direct: bool,
    /// Keep the export (FUSE connection, loop devices, sockets) in a holder
    /// process when the snapshotter stops, so that a snapshotter started
    /// again with the same arguments resumes it under running containers
    /// (a restart or a crash is a pause for them). The holder releases the
    /// export SECONDS (at least 1) after the snapshotter stopped if none
    /// came back (docs/EXPORT.md, "The containerd snapshotter")
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub hold: Option<u64>,
    /// Be the holder, taking the export from this descriptor (internal)
    #[arg(long, hide = true)]
    pub hold_fd: Option<i32>,
}

/// Attach a volume as a loop device and print /dev/loopN.
#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume name
    pub name: String,
    /// Attach read-only (snapshots always are)
    #[arg(long)]
    pub read_only: bool,
    /// If this starts the pool's server, it opens the pool file with
    /// O_DIRECT (see `thinpool serve --direct`)
    #[arg(long)]
    pub direct: bool,
}

/// Detach a loop device attached by `thinpool attach`.
#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    /// The loop device (/dev/loopN)
    pub device: PathBuf,
}

/// Attach a volume and mount the filesystem on it.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume name
    pub name: String,
    /// Mount point (an existing directory)
    pub dir: PathBuf,
    /// Make a filesystem first (ext4 or xfs); erases the volume
    #[arg(long, value_name = "FS")]
    pub mkfs: Option<Mkfs>,
    /// Attach and mount read-only
    #[arg(long)]
    pub read_only: bool,
    /// Mount options, passed to mount(8)
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Option<String>,
    /// If this starts the pool's server, it opens the pool file with
    /// O_DIRECT (see `thinpool serve --direct`)
    #[arg(long)]
    pub direct: bool,
}

/// Unmount a directory mounted by `thinpool mount` and detach its loop device.
#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    /// Mount point
    pub dir: PathBuf,
}

/// Start `thinpool serve POOL DIR --background` (this program) for `attach`
/// and `mount`: the library never runs a program itself.
fn start_server(pool: &Path, dir: &Path, log: File) -> std::io::Result<Child> {
    spawn_server(pool, dir, log, false)
}

/// `start_server` with `--direct`.
fn start_server_direct(pool: &Path, dir: &Path, log: File) -> std::io::Result<Child> {
    spawn_server(pool, dir, log, true)
}

fn spawn_server(pool: &Path, dir: &Path, log: File, direct: bool) -> std::io::Result<Child> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("serve").arg(pool).arg(dir).arg("--background");
    if direct {
        cmd.arg("--direct");
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe; it detaches the server from our
    // session so a Ctrl-C aimed at the CLI does not reach it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn()
}

pub fn serve(a: ServeArgs) -> Result<()> {
    let opts = ServeOptions {
        background: a.background,
        threads: a.threads,
        direct: a.direct,
    };
    let ctx = || format!("serve {}", a.pool.display());
    if let Some(fd) = a.handover_fd {
        // SAFETY: the holder passed us this descriptor and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        export::serve_handed(fd).with_context(ctx)?;
    } else if a.takeover {
        export::take_over(&a.pool, &a.dir, &opts).with_context(ctx)?;
    } else if a.supervise {
        // The binary as it is now on disk: a planned restart runs the new one.
        let exe = std::env::current_exe()?;
        let threads = a.threads;
        let mut start = |fd: RawFd| start_worker(&exe, fd, threads);
        export::supervise(&a.pool, &a.dir, &opts, &mut start).with_context(ctx)?;
    } else {
        export::serve(&a.pool, &a.dir, &opts).with_context(ctx)?;
    }
    Ok(())
}

/// Start `thinpool serve --handover-fd FD` for the holder, in its own
/// process group (a Ctrl-C reaches the holder, which forwards it once).
fn start_worker(exe: &Path, fd: RawFd, threads: usize) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    // POOL and DIR come with the bundle; these two only satisfy the parser.
    cmd.args(["serve", "-", "-", "--handover-fd", &fd.to_string()]);
    cmd.args(["--threads", &threads.to_string()]);
    cmd.stdin(Stdio::null()).process_group(0);
    inherit_fd(&mut cmd, fd, false);
    cmd.spawn()
}

pub fn snapshotter(a: SnapshotterArgs) -> Result<()> {
    let ctx = || format!("snapshotter {}", a.pool.display());
    let hold = a.hold.map(std::time::Duration::from_secs);
    if let Some(fd) = a.hold_fd {
        // SAFETY: the first worker passed us this descriptor and nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        export::held::hold(fd, hold.unwrap_or_default()).with_context(ctx)?;
        return Ok(());
    }
    // The holder runs in / and names these again: absolute paths.
    let address = std::path::absolute(&a.address)?;
    let pool = std::path::absolute(&a.pool)?;
    let opts = thinpool::snapshotter::SnapshotterOptions {
        address: address.clone(),
        export_dir: a.export_dir.clone(),
        volume_size: a.volume_size,
        direct: a.direct,
        hold,
    };
    let exe = std::env::current_exe()?;
    let secs = a.hold.unwrap_or(0);
    let mut start = |fd: RawFd| start_holder(&exe, &pool, &address, secs, fd);
    thinpool::snapshotter::run(&a.pool, &opts, &mut start).with_context(ctx)?;
    Ok(())
}

/// Start `thinpool snapshotter POOL --hold-fd FD` (the holder) in a session
/// of its own: it outlives this process and no signal aimed at this one's
/// process group reaches it (systemd: `KillMode=process`).
fn start_holder(
    exe: &Path,
    pool: &Path,
    address: &Path,
    secs: u64,
    fd: RawFd,
) -> std::io::Result<Child> {
    let mut cmd = Command::new(exe);
    cmd.arg("snapshotter")
        .arg(pool)
        .arg("--address")
        .arg(address);
    cmd.args(["--hold", &secs.to_string(), "--hold-fd", &fd.to_string()]);
    cmd.stdin(Stdio::null()).current_dir("/");
    inherit_fd(&mut cmd, fd, true);
    cmd.spawn()
}

/// Let `fd` survive the exec of `cmd`; `setsid`: in a session of its own.
fn inherit_fd(cmd: &mut Command, fd: RawFd, setsid: bool) {
    // SAFETY: fcntl and setsid are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if setsid {
                libc::setsid();
            }
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

pub fn attach(a: AttachArgs) -> Result<()> {
    let start = if a.direct {
        start_server_direct
    } else {
        start_server
    };
    let dev = export::attach(&a.pool, &a.name, a.read_only, start)
        .with_context(|| format!("attach '{}' of {}", a.name, a.pool.display()))?;
    super::print(&format!("{}\n", dev.display()))?;
    Ok(())
}

pub fn detach(a: DetachArgs) -> Result<()> {
    export::detach(&a.device).with_context(|| format!("detach {}", a.device.display()))?;
    Ok(())
}

pub fn mount(a: MountArgs) -> Result<()> {
    let opts = MountOptions {
        mkfs: a.mkfs,
        read_only: a.read_only,
        options: a.options,
    };
    let start = if a.direct {
        start_server_direct
    } else {
        start_server
    };
    let dev = export::mount(&a.pool, &a.name, &a.dir, &opts, start).with_context(|| {
        format!(
            "mount '{}' of {} on {}",
            a.name,
            a.pool.display(),
            a.dir.display()
        )
    })?;
    eprintln!(
        "{} mounted on {} ({})",
        a.name,
        a.dir.display(),
        dev.display()
    );
    Ok(())
}

pub fn umount(a: UmountArgs) -> Result<()> {
    export::umount(&a.dir).with_context(|| format!("umount {}", a.dir.display()))?;
    Ok(())
}
