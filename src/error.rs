//! One error type for the library. Every failure a user can cause is a typed
//! variant with a message that says what to do; corruption is never a panic.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    #[error("{path}: not a thinpool pool file (bad magic)")]
    NotAPool { path: PathBuf },

    #[error("{path}: pool format version {found} is not supported by this build (it reads versions 1 to {supported}); use a newer thinpool")]
    UnsupportedVersion {
        path: PathBuf,
        found: u32,
        supported: u32,
    },

    #[error("pool metadata is corrupt: {0}")]
    Corrupt(String),

    #[error(
        "pool is full: no free block left (free space by removing volumes or discarding data)"
    )]
    NoSpace,

    /// The file system holding the pool file has no room for a block the
    /// pool is about to use; the pool itself is consistent.
    #[error("the file system holding the pool is full (free space there and retry; the pool is unharmed)")]
    HostFull,

    /// Not enough free blocks for an all-at-once allocation (says how many).
    #[error("{0}")]
    NotEnoughSpace(String),

    #[error("volume '{0}' already exists")]
    VolumeExists(String),

    #[error("no volume named '{0}'")]
    NoSuchVolume(String),

    /// The pool was opened for inspection only (info, list, check).
    #[error("pool {} is open read-only", .0.display())]
    PoolReadOnly(PathBuf),

    #[error("volume '{0}' is a read-only snapshot")]
    ReadOnly(String),

    #[error("range {offset}+{len} is past the end of volume '{volume}' ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("{0}")]
    InUse(String),

    /// A send stream or image that cannot be received (says what is wrong).
    #[error("{0}")]
    Layer(String),

    /// Internal: the intent log's half is full (or its epoch was not
    /// started with logging on); the write path commits and retries.
    #[error("the intent log is full; a commit is needed")]
    LogFull,
}

impl Error {
    /// The errno a kernel caller (FUSE) should see for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NoSpace | Error::HostFull | Error::NotEnoughSpace(_) => libc::ENOSPC,
            Error::ReadOnly(_) | Error::PoolReadOnly(_) => libc::EROFS,
            Error::OutOfRange { .. } | Error::InvalidArgument(_) => libc::EINVAL,
            Error::NoSuchVolume(_) => libc::ENOENT,
            Error::VolumeExists(_) => libc::EEXIST,
            Error::InUse(_) => libc::EBUSY,
            Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
            _ => libc::EIO,
        }
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
        Error::Corrupt(msg.into())
    }
}
