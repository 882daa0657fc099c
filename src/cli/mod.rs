//! The command line: argument definitions, dispatch, and the one place where
//! errors become a line on stderr and an exit code.
//!
//! - `manage.rs`: pool and volume management (create, info, list, snapshot...),
//!   sent to the pool's server when one runs, else run on the opened pool.
//! - `data.rs`: `read` / `write` of bytes at an offset.
//! - `image.rs`: `import` / `export` of raw, sparse images.
//! - `check.rs`: `check`, the pool's invariants verified.
//! - `show.rs`: human-readable rendering (tables, sizes, ages).
//! - `export.rs`: the live export verbs (serve, attach, mount...).

mod check;
mod data;
pub mod export;
mod image;
mod layer;
mod manage;
mod show;

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use thinpool::control::{self, Request, Response};
use thinpool::size::parse_size;
use thinpool::Pool;

/// Bytes moved per library call by the bulk verbs: large enough to keep the
/// disk busy, and a multiple of every legal block size (4 KiB to 2 MiB).
pub(crate) const CHUNK: usize = 4 << 20;

//------------------------------------------------------------------------------
// Arguments

/// Thin-provisioned block volumes with O(1) copy-on-write snapshots and clones,
/// kept in one sparse pool file.
///
/// A pool is a file of fixed-size blocks that grows only as blocks are written.
/// Volumes in it are thin: a 10G volume uses no space until written. Snapshots
/// (read-only) and clones (writable) share every block with their source until
/// one of them writes it.
#[derive(Parser, Debug)]
#[command(name = "thinpool", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new pool file (sparse: it grows only as blocks are used)
    ///
    /// Refuses to overwrite an existing file. A new pool of any size takes a
    /// few hundred KiB on disk.
    Create(CreateArgs),
    /// Show the pool's size, block size and data/metadata use
    Info(InfoArgs),
    /// Verify every invariant of the pool (refcounts, maps), reading metadata only
    ///
    /// Exits 0 when clean, 1 listing the problems when any is found, 2 when
    /// the pool cannot be read. A served pool is checked by its server.
    Check(CheckArgs),
    /// Fix what can be fixed without guessing data: rebuild refcounts from the
    /// maps (frees leaked blocks), replace a torn newest superblock
    ///
    /// Writes a backup of the metadata it changes first (POOL.repair-backup-GEN).
    /// Exits 0 when the pool is clean afterwards, 1 when problems remain, 2 when
    /// the pool cannot be read.
    Repair(check::RepairArgs),
    /// Manage volumes (see `thinpool volume create --help`)
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Take a read-only snapshot of a volume, snapshot or clone (O(1))
    ///
    /// A snapshot freezes SOURCE as it is now: it can be read, exported,
    /// cloned, but never written. It shares every block with SOURCE, so it
    /// costs no data space until SOURCE changes; taking it costs the same for
    /// an empty volume and a full one. Use `clone` for a writable copy.
    Snapshot(SnapshotArgs),
    /// Make a writable clone of a volume, snapshot or clone (O(1))
    ///
    /// A clone starts as an exact copy of SOURCE and can be written (a
    /// container's writable layer on top of an image snapshot). Only the
    /// blocks it writes use new space: writing part of a shared block copies
    /// that one block (copy-on-write). Use `snapshot` for a read-only copy.
    Clone(SnapshotArgs),
    /// List the volumes, snapshots and clones with their space use
    ///
    /// VSIZE is the virtual size; MAPPED the bytes of written blocks it can
    /// read (ZFS `referenced`); EXCLUSIVE the bytes of blocks no other volume
    /// shares, i.e. what `remove` frees (`docker ps -s` size). Listing reads
    /// metadata only.
    #[command(visible_alias = "ls")]
    List(ListArgs),
    /// Remove a volume, freeing the blocks that only it held
    #[command(visible_alias = "rm")]
    Remove(RemoveArgs),
    /// Rename a volume
    Rename(RenameArgs),
    /// Grow a volume's virtual size, or without NAME the pool's maximum size
    ///
    /// Neither uses space until blocks are written: volumes and the pool file
    /// are sparse. Nothing shrinks.
    Resize(ResizeArgs),
    /// Change pool settings: the low-water mark
    Set(SetArgs),
    /// Write bytes from FILE (or stdin) into a volume at an offset
    Write(WriteArgs),
    /// Copy bytes of a volume to stdout
    Read(ReadArgs),
    /// Import a raw disk image as a new volume (all-zero blocks are not stored)
    Import(ImportArgs),
    /// Export a volume to a raw disk image (sparse where the volume reads zeros)
    Export(ExportArgs),
    /// Freeze a writable volume into a read-only layer with content digests
    ///
    /// Records the layer's diff digest (sha256 of its changes against the
    /// layer it was cloned from) and chain digest (OCI ChainID rule). See
    /// docs/LAYERS.md.
    Commit(layer::CommitArgs),
    /// Show the block ranges in which two volumes differ (from the maps only)
    Diff(layer::DiffArgs),
    /// Write a layer as a verifiable stream, full or incremental (--from)
    Send(layer::SendArgs),
    /// Receive a stream from `send` as a new read-only layer (all verified)
    Receive(layer::ReceiveArgs),
    /// Import and list container images (OCI layout, docker save) as layers
    #[command(subcommand)]
    Image(layer::ImageCommand),
    /// Serve every volume of a pool as a file under a directory (FUSE)
    Serve(export::ServeArgs),
    /// Attach a volume as a loop device and print /dev/loopN
    Attach(export::AttachArgs),
    /// Detach a loop device attached by `thinpool attach`
    Detach(export::DetachArgs),
    /// Serve the pool to containerd as a snapshotter (proxy plugin over gRPC)
    Snapshotter(export::SnapshotterArgs),
    /// Attach a volume and mount the filesystem on it
    Mount(export::MountArgs),
    /// Unmount a directory mounted by `thinpool mount` and detach its loop device
    Umount(export::UmountArgs),
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create an empty volume that reads as zeros: thin (no space until
    /// written), or with --preallocate every block allocated now
    Create(VolumeCreateArgs),
}

#[derive(Args, Debug)]
pub(crate) struct SetArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Warn (in `info`) when less than this share of the pool is free,
    /// e.g. 10 or 10% (dm-thin's low-water mark)
    #[arg(long, value_parser = percent_arg)]
    pub low_water: u32,
}

fn percent_arg(s: &str) -> Result<u32, String> {
    s.trim()
        .trim_end_matches('%')
        .parse::<u32>()
        .ok()
        .filter(|p| (1..=99).contains(p))
        .ok_or_else(|| format!("'{s}' is not a percentage from 1 to 99"))
}

#[derive(Args, Debug)]
pub(crate) struct CreateArgs {
    /// Path of the new pool file (must not exist)
    pub pool: PathBuf,
    /// Maximum size of the pool, e.g. 100G. The file is sparse: it starts at a
    /// few hundred KiB and grows only as blocks are written
    #[arg(long, value_parser = size_arg)]
    pub size: u64,
    /// Block size: the unit of allocation and copy-on-write, a power of two
    /// from 4K to 2M. Smaller blocks make snapshots share more; larger blocks
    /// make the map smaller and sequential I/O faster. Fixed at creation
    #[arg(long, value_parser = block_size_arg, default_value = "64K")]
    pub block_size: u32,
    /// Warn (in `info`) when less than this share of the pool is free
    #[arg(long, value_parser = percent_arg, default_value = "10%")]
    pub low_water: u32,
}

#[derive(Args, Debug)]
pub(crate) struct InfoArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Print the pool's figures as one JSON object (sizes in bytes)
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct CheckArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Print the checker's report as JSON
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct VolumeCreateArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Name of the new volume (unique in the pool)
    pub name: String,
    /// Virtual size, e.g. 10G. May exceed the pool's size (thin provisioning)
    #[arg(long, value_parser = size_arg)]
    pub size: u64,
    /// Allocate every block now, contiguously where the pool allows, and
    /// hold its space: writes then overwrite in place, never copying,
    /// allocating or changing the map (a database's volume). Refused if the
    /// pool lacks the free blocks. Snapshots of it still work (copy-on-write
    /// applies to blocks they share); its clones are thin
    #[arg(long)]
    pub preallocate: bool,
}

#[derive(Args, Debug)]
pub(crate) struct SnapshotArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume, snapshot or clone to copy. It is not changed, and it may be
    /// written or removed afterwards without affecting the copy
    pub source: String,
    /// Name of the new snapshot or clone (unique in the pool)
    pub name: String,
}

#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Print a JSON array of volumes (sizes in bytes, `created` in seconds
    /// since the Unix epoch)
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RemoveArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume to remove. Blocks it shares with other volumes stay with them;
    /// clones of a removed snapshot stay intact
    pub name: String,
}

#[derive(Args, Debug)]
pub(crate) struct RenameArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Current name
    pub old: String,
    /// New name (unique in the pool)
    pub new: String,
}

#[derive(Args, Debug)]
pub(crate) struct ResizeArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume to grow; without it, the pool itself grows
    pub name: Option<String>,
    /// New size, e.g. 20G; volumes and pools only grow
    #[arg(long, value_parser = size_arg)]
    pub size: u64,
}

#[derive(Args, Debug)]
pub(crate) struct WriteArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume or clone to write into (snapshots are read-only)
    pub name: String,
    /// Byte offset in the volume where the data goes, e.g. 0, 4096, 1M.
    /// The data must fit inside the volume's virtual size
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub offset: u64,
    /// File to read the data from; stdin when absent
    pub file: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub(crate) struct ReadArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume, snapshot or clone to read
    pub name: String,
    /// Byte offset to start at, e.g. 0, 4096, 1M
    #[arg(long, value_parser = size_arg, default_value = "0")]
    pub offset: u64,
    /// Number of bytes to read; up to the end of the volume when absent.
    /// Unwritten ranges read as zeros
    #[arg(long, value_parser = size_arg)]
    pub length: Option<u64>,
}

#[derive(Args, Debug)]
pub(crate) struct ImportArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Name of the new volume; its size is exactly the image's size
    pub name: String,
    /// Raw image file (or block device) to read. Blocks that are all zeros
    /// are not stored, so holes in the image cost no space in the pool
    pub image: PathBuf,
}

#[derive(Args, Debug)]
pub(crate) struct ExportArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume, snapshot or clone to export
    pub name: String,
    /// Raw image file to write, as large as the volume. Blocks that read as
    /// zeros become holes, so the file is sparse
    pub image: PathBuf,
    /// Overwrite IMAGE if it exists
    #[arg(long)]
    pub force: bool,
}

/// clap value parser for sizes and offsets: `10G`, `64K`, `1.5M`, `4096`.
fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| match e {
        thinpool::Error::InvalidArgument(msg) => msg,
        other => other.to_string(),
    })
}

/// Block sizes are checked by the library (power of two, 4K..2M) so the rule
/// lives in one place; here we only make sure the number fits its type.
fn block_size_arg(s: &str) -> Result<u32, String> {
    let v = size_arg(s)?;
    u32::try_from(v).map_err(|_| format!("block size {s} is far too large (use 4K to 2M)"))
}

//------------------------------------------------------------------------------
// Dispatch and error reporting

pub fn main() -> ExitCode {
    install_panic_hook();
    // Usage errors exit with 2 (and --help/--version with 0) inside parse().
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `thinpool read ... | head`: the reader went away, nothing to report.
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` joins the context chain with ": " on one line.
            eprintln!("thinpool: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Create(a) => manage::create(a),
        Command::Info(a) => manage::info(a),
        Command::Check(a) => check::check(a),
        Command::Repair(a) => check::repair(a),
        Command::Volume(VolumeCommand::Create(a)) => manage::volume_create(a),
        Command::Snapshot(a) => manage::snapshot(a, false),
        Command::Clone(a) => manage::snapshot(a, true),
        Command::List(a) => manage::list(a),
        Command::Remove(a) => manage::remove(a),
        Command::Rename(a) => manage::rename(a),
        Command::Resize(a) => manage::resize(a),
        Command::Set(a) => manage::set(a),
        Command::Write(a) => data::write(a),
        Command::Read(a) => data::read(a),
        Command::Import(a) => image::import(a),
        Command::Export(a) => image::export(a),
        Command::Commit(a) => layer::commit(a),
        Command::Diff(a) => layer::diff(a),
        Command::Send(a) => layer::send(a),
        Command::Receive(a) => layer::receive(a),
        Command::Image(c) => layer::image(c),
        Command::Serve(a) => export::serve(a),
        Command::Attach(a) => export::attach(a),
        Command::Detach(a) => export::detach(a),
        Command::Snapshotter(a) => export::snapshotter(a),
        Command::Mount(a) => export::mount(a),
        Command::Umount(a) => export::umount(a),
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = match c.downcast_ref::<thinpool::Error>() {
            Some(thinpool::Error::Io(io)) => Some(io),
            _ => c.downcast_ref::<std::io::Error>(),
        };
        io.is_some_and(|io| io.kind() == ErrorKind::BrokenPipe)
    })
}

/// A panic is a bug, but the user still gets one line, not a backtrace dump
/// (unless they asked for one with RUST_BACKTRACE).
fn install_panic_hook() {
    if std::env::var_os("RUST_BACKTRACE").is_some() {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("panic");
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("thinpool: internal error (a bug; please report it): {msg}{at}");
    }));
}

/// Print to stdout, reporting a closed pipe (`thinpool list | head -1`) as an
/// error instead of panicking the way `print!` does.
pub(crate) fn print(text: &str) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()?;
    Ok(())
}

//------------------------------------------------------------------------------
// Reaching the pool

/// Open a pool file, turning "file missing" and friends into a message that
/// names the file. Library errors already name it, so they pass through.
pub(crate) fn open_pool(path: &Path) -> Result<Pool> {
    open_pool_with(path, Pool::open)
}

pub(crate) fn open_pool_with(
    path: &Path,
    open: fn(&Path) -> thinpool::Result<Pool>,
) -> Result<Pool> {
    open(path).map_err(|e| match e {
        thinpool::Error::Io(io) if io.kind() == ErrorKind::NotFound => {
            anyhow!("{}: no such pool file", path.display())
        }
        thinpool::Error::Io(io) => anyhow!("{}: cannot open pool: {io}", path.display()),
        other => other.into(),
    })
}

/// Run a management request: the pool's server answers it when one is
/// serving the pool (it owns the file); otherwise we open the pool ourselves.
pub(crate) fn request(pool: &Path, req: Request) -> Result<Response> {
    if let Some(answer) = thinpool::export::control::request(pool, &req) {
        return Ok(answer?);
    }
    // Inspection shares the lock with other readers; changes take it alone.
    let mut p = match req {
        Request::Info | Request::List | Request::Check => {
            open_pool_with(pool, Pool::open_read_only)?
        }
        _ => open_pool(pool)?,
    };
    Ok(control::execute(&mut p, req)?)
}

/// Open a pool for the data verbs, which move bulk bytes and so do not go
/// through the control socket: while a server owns the pool, the volume's
/// exported file is the way in. `volume: None` for whole-pool verbs (check).
pub(crate) fn open_unserved(pool: &Path, volume: Option<&str>) -> Result<Pool> {
    let server = match thinpool::export::control::status(pool) {
        None => return open_pool(pool),
        Some(s) => s,
    };
    let way_in = match (&server, volume) {
        (Ok(st), Some(v)) => format!("use the exported file {}", st.dir.join(v).display()),
        (Ok(st), None) => format!("its volumes are files under {}", st.dir.display()),
        (Err(_), Some(v)) => {
            format!("use the exported file DIR/{v} (DIR as given to `thinpool serve`)")
        }
        (Err(_), None) => {
            "its volumes are files under the directory given to `thinpool serve`".into()
        }
    };
    let who = match &server {
        Ok(st) => format!("pid {}", st.pid),
        Err(e) => format!("server: {e}"),
    };
    bail!(
        "pool {} is being served ({who}); {way_in}, or stop the server first",
        pool.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn arguments_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn block_size_must_fit() {
        assert_eq!(block_size_arg("64K"), Ok(65536));
        assert!(block_size_arg("8G").is_err());
        assert!(size_arg("ten").unwrap_err().contains("cannot read size"));
    }
}
