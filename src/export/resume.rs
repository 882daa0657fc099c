//! The kernel side of a server that can be replaced: mounting the export on a
//! `/dev/fuse` descriptor we keep, starting a fuser session on a connection
//! that is already initialised, and asking the kernel to resend what a
//! previous server read but never answered. See docs/EXPORT.md, "Restarting
//! the server".

use std::ffi::CString;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use fuser::{Config, Filesystem, InitFlags, Session};
use serde::{Deserialize, Serialize};

const FUSE_INIT: u32 = 26;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (Linux 6.9, protocol 7.40).
const FUSE_NOTIFY_RESEND: i32 = 7;
const IN_HEADER_LEN: usize = 40;
const INIT_IN_LEN: usize = 64;
const OUT_HEADER_LEN: usize = 16;

/// What the kernel said in its INIT: enough to replay it to a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitInfo {
    pub major: u32,
    pub minor: u32,
    /// The kernel's capability flags (`FUSE_INIT_EXT` left out).
    pub flags: u64,
}

impl InitInfo {
    /// The kernel can resend requests a dead server had read (Linux ≥ 6.9).
    pub fn has_resend(&self) -> bool {
        self.flags & InitFlags::FUSE_HAS_RESEND.bits() != 0
    }

    fn request(&self) -> Vec<u8> {
        let flags = self.flags | InitFlags::FUSE_INIT_EXT.bits();
        let mut b = Vec::with_capacity(IN_HEADER_LEN + INIT_IN_LEN);
        // fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, extlen+padding
        b.extend_from_slice(&((IN_HEADER_LEN + INIT_IN_LEN) as u32).to_ne_bytes());
        b.extend_from_slice(&FUSE_INIT.to_ne_bytes());
        b.extend_from_slice(&2u64.to_ne_bytes());
        b.extend_from_slice(&[0u8; 8 + 4 + 4 + 4 + 4]);
        // fuse_init_in: major, minor, max_readahead, flags, flags2, unused[11]
        b.extend_from_slice(&self.major.to_ne_bytes());
        b.extend_from_slice(&self.minor.to_ne_bytes());
        b.extend_from_slice(&(128u32 << 10).to_ne_bytes());
        b.extend_from_slice(&(flags as u32).to_ne_bytes());
        b.extend_from_slice(&((flags >> 32) as u32).to_ne_bytes());
        b.resize(IN_HEADER_LEN + INIT_IN_LEN, 0);
        b
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Open /dev/fuse and mount it on `dir` (root only: no fusermount), named
/// `fsname` in the mount table. The descriptor is the connection.
pub(crate) fn mount(dir: &Path, fsname: &str) -> io::Result<OwnedFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let data = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
        dev.as_raw_fd()
    );
    let c = |s: &[u8]| CString::new(s).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput));
    let (src, target, fstype, data) = (
        c(fsname.as_bytes())?,
        c(dir.as_os_str().as_bytes())?,
        c(b"fuse")?,
        c(data.as_bytes())?,
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_NOATIME;
    // SAFETY: every pointer is a NUL-terminated string alive for the call.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })?;
    Ok(dev.into())
}

/// A fuser session serving the connection `fuse`. `init: None`: the
/// connection is fresh and fuser answers the kernel's INIT itself. `Some`:
/// the connection was initialised by an earlier server; fuser is given a
/// synthetic INIT with the same parameters over a socket pair, and its
/// descriptor is then replaced by the real one (fuser is not patched).
pub(crate) fn session<FS: Filesystem>(
    fs: FS,
    fuse: &OwnedFd,
    init: Option<InitInfo>,
    config: Config,
) -> io::Result<Session<FS>> {
    let acl = config.acl;
    let Some(init) = init else {
        return Session::from_fd(fs, fuse.try_clone()?, acl, config);
    };
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just created and are ours alone.
    let (ours, theirs) = unsafe {
        use std::os::fd::FromRawFd;
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    let req = init.request();
    // SAFETY: writing a buffer we own to a descriptor we own.
    let n = unsafe { libc::write(ours.as_raw_fd(), req.as_ptr().cast(), req.len()) };
    if n != req.len() as isize {
        return Err(io::Error::last_os_error());
    }
    let session = Session::from_fd(fs, theirs, acl, config)?;
    let mut reply = [0u8; 4096];
    // SAFETY: reading into a buffer we own.
    let n = unsafe { libc::read(ours.as_raw_fd(), reply.as_mut_ptr().cast(), reply.len()) };
    if n < OUT_HEADER_LEN as isize {
        return Err(io::Error::other("no reply to the synthetic FUSE INIT"));
    }
    let error = i32::from_ne_bytes(reply[4..8].try_into().unwrap_or_default());
    if error != 0 {
        return Err(io::Error::other(format!(
            "the filesystem refused the synthetic FUSE INIT (error {error})"
        )));
    }
    // The session's descriptor now becomes the real connection; nothing
    // reads or writes it until `run`.
    let slot = session.as_fd().as_raw_fd();
    // SAFETY: dup3 atomically makes `slot` (owned by the session, idle)
    // refer to the connection; `fuse` stays valid and ours.
    cvt(unsafe { libc::dup3(fuse.as_raw_fd(), slot, libc::O_CLOEXEC) })?;
    Ok(session)
}

/// Ask the kernel to put every request that is read but unanswered back in
/// the queue (`FUSE_NOTIFY_RESEND`). Call it only once no other process
/// reads the connection. Fails on kernels before 6.9.
pub(crate) fn notify_resend(fuse: &OwnedFd) -> io::Result<()> {
    let mut h = [0u8; OUT_HEADER_LEN];
    h[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writing a buffer we own to the connection.
    let n = unsafe { libc::write(fuse.as_raw_fd(), h.as_ptr().cast(), h.len()) };
    if n != h.len() as isize {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_init_has_the_kernel_layout() {
        let i = InitInfo {
            major: 7,
            minor: 44,
            flags: (1 << 39) | 1,
        };
        assert!(i.has_resend());
        let b = i.request();
        assert_eq!(b.len(), 104);
        assert_eq!(u32::from_ne_bytes(b[0..4].try_into().unwrap()), 104);
        assert_eq!(u32::from_ne_bytes(b[4..8].try_into().unwrap()), FUSE_INIT);
        assert_eq!(u32::from_ne_bytes(b[40..44].try_into().unwrap()), 7);
        assert_eq!(u32::from_ne_bytes(b[44..48].try_into().unwrap()), 44);
        let lo = u32::from_ne_bytes(b[52..56].try_into().unwrap());
        let hi = u32::from_ne_bytes(b[56..60].try_into().unwrap());
        assert_eq!(lo, 1 | (1 << 30), "FUSE_INIT_EXT must be set for flags2");
        assert_eq!(hi, 1 << 7);
        assert!(!InitInfo { flags: 1, ..i }.has_resend());
    }
}
