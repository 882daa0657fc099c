//! The management requests shared by the CLI and the control socket.
//!
//! While a pool is served, the server owns the pool file and the CLI sends it
//! one of these requests instead of opening the file; without a server the CLI
//! opens the pool and calls [`execute`] itself. One code path either way.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::pool::{Pool, PoolInfo, VolumeInfo};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Info,
    List,
    CreateVolume {
        name: String,
        size: u64,
        /// Allocate and map every block now (`volume create --preallocate`).
        #[serde(default)]
        preallocate: bool,
    },
    /// `writable: false` is a read-only snapshot, `true` a clone.
    Snapshot {
        source: String,
        name: String,
        writable: bool,
    },
    Remove {
        name: String,
    },
    Rename {
        old: String,
        new: String,
    },
    Resize {
        name: String,
        size: u64,
    },
    /// Grow the pool's maximum size.
    GrowPool {
        size: u64,
    },
    /// Set the low-water mark (percent of the pool that must stay free).
    SetLowWater {
        pct: u32,
    },
    Flush,
    /// Run the checker (metadata only) and return its report.
    Check,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Info(PoolInfo),
    List(Vec<VolumeInfo>),
    Volume(VolumeInfo),
    Check(crate::check::CheckReport),
}

/// Run a request against an open pool. Mutating requests commit before returning.
pub fn execute(pool: &mut Pool, req: Request) -> Result<Response> {
    Ok(match req {
        Request::Info => Response::Info(pool.info()?),
        Request::List => Response::List(pool.list()?),
        Request::CreateVolume {
            name,
            size,
            preallocate,
        } => {
            match preallocate {
                true => pool.create_volume_preallocated(&name, size, &mut |_, _| {})?,
                false => pool.create_volume(&name, size)?,
            };
            Response::Volume(pool.volume_info(&name)?)
        }
        Request::Snapshot {
            source,
            name,
            writable,
        } => {
            pool.snapshot(&source, &name, writable)?;
            Response::Volume(pool.volume_info(&name)?)
        }
        Request::Remove { name } => {
            pool.remove_volume(&name)?;
            Response::Ok
        }
        Request::Rename { old, new } => {
            pool.rename_volume(&old, &new)?;
            Response::Ok
        }
        Request::Resize { name, size } => {
            pool.resize_volume(&name, size)?;
            Response::Ok
        }
        Request::Check => Response::Check(pool.check()?),
        Request::GrowPool { size } => {
            pool.grow(size)?;
            Response::Info(pool.info()?)
        }
        Request::SetLowWater { pct } => {
            pool.set_low_water(pct)?;
            Response::Info(pool.info()?)
        }
        Request::Flush => {
            pool.commit()?;
            Response::Ok
        }
    })
}
