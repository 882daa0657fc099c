//! Exporting volumes to the kernel: a FUSE file per volume, loop devices on
//! top, and the control socket through which the CLI talks to a serving pool.
//!
//! - [`server`]: `thinpool serve` (FUSE session, control socket, commit timer).
//! - `fs`: the FUSE filesystem itself (one flat directory of volume files).
//! - [`client`]: attach/detach/mount/umount and background servers.
//! - [`control`]: the socket's wire format and client.
//! - `sys`: loop devices, the mount table, freeze, external tools.
//! - [`handover`]: the bundle one server passes to the next (SCM_RIGHTS).
//! - `resume`: mounting, serving an initialised connection, resend.
//! - `holder`: `serve --supervise`, the process that keeps the descriptors.
//! - [`held`]: the containerd snapshotter's holder (outlives its workers).
//!
//! Usage and figures: docs/EXPORT.md.

/// `eprintln!` for the processes that keep an export (the holders): a
/// stderr that went away (the terminal they were started from, by hand)
/// must not panic them and so end the export under running containers.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod client;
pub mod control;
mod fs;
pub mod handover;
pub mod held;
mod holder;
mod resume;
pub mod server;
mod state;
pub(crate) mod sys;

pub use client::{
    attach, attach_file, default_export_dir, detach, mount, mount_served, umount, Mkfs,
    MountOptions, StartServer,
};
pub use holder::{supervise, take_over, StartWorker};
pub use server::{serve, serve_handed, serve_held, serve_with, ServeOptions, Server, ServerHandle};

use std::path::{Path, PathBuf};

/// Errors of the export verbs: the pool's own, or the host's (paths, tools,
/// loop devices, mounts, the pool server).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    #[error(transparent)]
    Pool(#[from] crate::Error),
    /// A file or directory the verb works on could not be used.
    #[error("{}: {source}", path.display())]
    Path {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// An external tool (losetup, mount, mkfs...) could not be started.
    #[error("cannot run {command}: {source}")]
    ToolMissing {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    ToolFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("losetup printed no device for {}: '{output}'", file.display())]
    NoLoopDevice { file: PathBuf, output: String },
    #[error("{} is not a loop device attached by thinpool", .0.display())]
    NotOurDevice(PathBuf),
    #[error("{} is not mounted from a thinpool volume", .0.display())]
    NotOurMount(PathBuf),
    #[error("serving needs root (it mounts FUSE without fusermount)")]
    NeedsRoot,
    #[error("{} is already served by process {pid} on {}", pool.display(), dir.display())]
    AlreadyServed {
        pool: PathBuf,
        pid: u32,
        dir: PathBuf,
    },
    #[error("cannot start the pool server: {0}")]
    ServerSpawn(std::io::Error),
    /// The background server did not answer; `log_tail`: its last log lines.
    #[error(
        "the pool server for {} did not start{} (log: {}){}",
        pool.display(),
        if *exited { "" } else { " in time" },
        log.display(),
        log_tail
    )]
    ServerDidNotStart {
        pool: PathBuf,
        exited: bool,
        log: PathBuf,
        log_tail: String,
    },
    #[error("the server of {} did not stop in time", .0.display())]
    ServerDidNotStop(PathBuf),
    #[error("cannot bind {}: {source}", socket.display())]
    Bind {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot mount FUSE on {}: {source}", dir.display())]
    FuseMount {
        dir: PathBuf,
        source: std::io::Error,
    },
    /// A takeover or restart of the server could not be done.
    #[error("handover: {0}")]
    Handover(String),
    /// The containerd snapshotter's gRPC side failed (the export stopped).
    #[error("{0}")]
    Snapshotter(String),
    #[error("FUSE session ended with an error: {0}")]
    Session(std::io::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ExportError {
    /// A path-bound I/O error, for `map_err`.
    pub(crate) fn path(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
        move |source| ExportError::Path {
            path: path.to_path_buf(),
            source,
        }
    }
}
