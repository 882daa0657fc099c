//! thinpool: a block-level copy-on-write storage engine.
//!
//! A pool is one sparse file of fixed-size blocks with a refcounted block map.
//! Volumes are thin; snapshots and clones share every block with their origin
//! until it is written (copy-on-write), and cost O(1) to create.
//!
//! Layout of the crate (you know your room from the path):
//! - [`format`]: on-disk structures only (superblock, page headers, checksums).
//! - [`io`]: the `Storage` trait every byte of I/O goes through.
//! - [`space`]: refcounts, free bitmap, allocator, deferred frees.
//! - [`pdata`]: validated page reads and shadowed page arrays (persistent data).
//! - [`map`]: per-volume radix block map with shared, refcounted nodes.
//! - [`pool`]: the public `Pool` over the engine's rooms (open, commit, data
//!   path, volumes, settings) and `SharedPool`, the pool shared by threads.
//! - [`control`]: the request set shared by the CLI and the control socket.
//! - [`export`]: FUSE export, loop devices, control socket server.

pub mod annotations;
pub mod catalog;
pub mod check;
pub mod control;
pub mod error;
pub mod export;
#[cfg(feature = "test-support")]
#[doc(hidden)]
pub mod forge;
pub mod format;
pub mod io;
pub mod layer;
pub mod map;
pub mod pdata;
pub mod pool;
pub mod repair;
pub mod size;
pub mod snapshotter;
pub mod space;

pub use check::CheckReport;
pub use error::{Error, Result};
pub use pool::{CreateOptions, Pool, PoolInfo, SharedPool, VolumeId, VolumeInfo};
