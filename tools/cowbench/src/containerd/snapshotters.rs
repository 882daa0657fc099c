//! The snapshotters compared: containerd's built-in `overlayfs` and `native`,
//! and thinpool's proxy snapshotter; how each one's space is measured.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::util::{du_bytes, sync_all};

pub const ALL: [&str; 3] = ["thinpool", "overlayfs", "native"];

pub enum Snapshotter {
    /// A snapshotter built into containerd; its data lives under ROOT/io.containerd.snapshotter.v1.NAME.
    Builtin { name: &'static str, dir: PathBuf },
}

impl Snapshotter {
    pub fn builtin(name: &str, containerd_root: &Path) -> Result<Snapshotter> {
        let name = match name {
            "overlayfs" => "overlayfs",
            "native" => "native",
            _ => bail!("{name} is not a built-in snapshotter"),
        };
        Ok(Snapshotter::Builtin {
            name,
            dir: containerd_root.join(format!("io.containerd.snapshotter.v1.{name}")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Snapshotter::Builtin { name, .. } => name,
        }
    }

    pub fn space_method(&self) -> String {
        match self {
            Snapshotter::Builtin { name, .. } => format!(
                "allocated blocks (st_blocks, like `du`) of containerd's `io.containerd.snapshotter.v1.{name}` directory"
            ),
        }
    }

    pub fn notes(&self) -> Vec<String> {
        match self {
            Snapshotter::Builtin { name: "overlayfs", .. } => vec![
                "each layer unpacked into its own directory; a container is an overlay mount with its own upper dir".into(),
            ],
            Snapshotter::Builtin { .. } => vec![
                "each layer and each container is a full copy of its parent's directory tree".into(),
            ],
        }
    }

    /// Bytes in use after `sync` (the scenario works with differences).
    pub fn space(&self) -> Result<u64> {
        sync_all();
        match self {
            Snapshotter::Builtin { dir, .. } => du_bytes(dir),
        }
    }
}
