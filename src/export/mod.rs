//! Exporting volumes to the kernel: a FUSE file per volume, loop devices on
//! top, and the control socket through which the CLI talks to a serving pool.
//!
//! - [`server`]: `thinpool serve` (FUSE session, control socket, commit timer).
//! - `fs`: the FUSE filesystem itself (one flat directory of volume files).
//! - [`client`]: attach/detach/mount/umount and background servers.
//! - [`control`]: the socket's wire format and client.
//! - `sys`: loop devices, the mount table, freeze, external tools.
//!
//! Usage and figures: docs/EXPORT.md.

pub mod client;
pub mod control;
mod fs;
pub mod server;
mod state;
mod sys;

pub use client::{
    attach, attach_file, default_export_dir, detach, mount, mount_served, umount, Mkfs,
    MountOptions, StartServer,
};
pub use server::{serve, ServeOptions, Server};

/// Errors of the export verbs: the pool's own, or the host's (tools, mounts).
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Pool(#[from] crate::Error),
    #[error("{0}")]
    Msg(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
