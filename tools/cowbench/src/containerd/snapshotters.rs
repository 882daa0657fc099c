//! The snapshotters compared: containerd's built-in `overlayfs` and `native`,
//! and thinpool's proxy snapshotter; how each one's space is measured.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::util::{du_bytes, path_str, run, sync_all};

pub const ALL: [&str; 4] = ["thinpool", "thinpool-64k", "overlayfs", "native"];

/// thinpool's variants: the snapshotter's name and its pool's block size.
/// `thinpool` is the recommended set-up (4 KiB blocks: a container's ext4
/// metadata writes copy 4 KiB each); `thinpool-64k` the pool's default size.
pub const THINPOOL: [(&str, &str); 2] = [("thinpool", "4K"), ("thinpool-64k", "64K")];

pub enum Snapshotter {
    /// A snapshotter built into containerd; its data lives under ROOT/io.containerd.snapshotter.v1.NAME.
    Builtin { name: &'static str, dir: PathBuf },
    /// thinpool's snapshotter service over POOL (`thinpool snapshotter`).
    Thinpool {
        name: &'static str,
        block_size: &'static str,
        pool: PathBuf,
        bin: PathBuf,
    },
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
            Snapshotter::Thinpool { name, .. } => name,
        }
    }

    pub fn space_method(&self) -> String {
        match self {
            Snapshotter::Builtin { name, .. } => format!(
                "allocated blocks (st_blocks, like `du`) of containerd's `io.containerd.snapshotter.v1.{name}` directory"
            ),
            Snapshotter::Thinpool { .. } => "`thinpool info POOL --json`: data_used_bytes + metadata_used_bytes of the pool (blocks in use, shared ones counted once)".into(),
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
            Snapshotter::Thinpool { block_size, .. } => vec![format!(
                "`thinpool snapshotter` (proxy plugin, gRPC on a Unix socket) over a pool made with `--block-size {block_size}`; each layer and container is a thin volume holding ext4 (a clone of its parent, O(1)), mounted through a loop device over the volume's export"
            )],
        }
    }

    /// The snapshotter's own consistency check, where it has one (`thinpool check`).
    pub fn check(&self) -> Result<()> {
        match self {
            Snapshotter::Builtin { .. } => Ok(()),
            Snapshotter::Thinpool { pool, bin, .. } => {
                run(path_str(bin)?, &["check", path_str(pool)?]).map(|_| ())
            }
        }
    }

    /// Bytes in use after `sync` (the scenario works with differences).
    pub fn space(&self) -> Result<u64> {
        sync_all();
        match self {
            Snapshotter::Builtin { dir, .. } => du_bytes(dir),
            Snapshotter::Thinpool { pool, bin, .. } => {
                let out = run(path_str(bin)?, &["info", path_str(pool)?, "--json"])?;
                let v: serde_json::Value =
                    serde_json::from_str(&out).context("thinpool info --json")?;
                let field = |k: &str| {
                    v[k].as_u64()
                        .with_context(|| format!("thinpool info --json: no {k}"))
                };
                Ok(field("data_used_bytes")? + field("metadata_used_bytes")?)
            }
        }
    }
}
