//! CLI verbs of the live export: serve, attach, detach, mount, umount.
//! (Owned by the export work; stubs until it lands.)

use std::path::PathBuf;

use anyhow::{bail, Result};

/// Serve every volume of POOL as a file under DIR (FUSE), until unmounted or signalled.
#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Directory to mount the FUSE export on
    pub dir: PathBuf,
}

/// Attach a volume as a loop device and print /dev/loopN.
#[derive(clap::Args, Debug)]
pub struct AttachArgs {
    pub pool: PathBuf,
    pub name: String,
    #[arg(long)]
    pub read_only: bool,
}

/// Detach a loop device attached by `thinpool attach`.
#[derive(clap::Args, Debug)]
pub struct DetachArgs {
    pub device: PathBuf,
}

/// Attach a volume and mount the filesystem on it.
#[derive(clap::Args, Debug)]
pub struct MountArgs {
    pub pool: PathBuf,
    pub name: String,
    pub dir: PathBuf,
}

/// Unmount a directory mounted by `thinpool mount` and detach its loop device.
#[derive(clap::Args, Debug)]
pub struct UmountArgs {
    pub dir: PathBuf,
}

pub fn serve(_a: ServeArgs) -> Result<()> {
    bail!("serve: not built yet")
}
pub fn attach(_a: AttachArgs) -> Result<()> {
    bail!("attach: not built yet")
}
pub fn detach(_a: DetachArgs) -> Result<()> {
    bail!("detach: not built yet")
}
pub fn mount(_a: MountArgs) -> Result<()> {
    bail!("mount: not built yet")
}
pub fn umount(_a: UmountArgs) -> Result<()> {
    bail!("umount: not built yet")
}
