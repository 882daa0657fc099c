//! What one server hands to the next: the bundle of descriptors (the FUSE
//! connection, the control socket's listener, the locked pool file) and the
//! state that goes with them, and the wire that carries them (a JSON line
//! with `SCM_RIGHTS`). Protocol: docs/EXPORT.md, "Handover protocol".

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::resume::InitInfo;
use super::ExportError;
use crate::pool::VolumeId;

/// The handover protocol's version; a peer speaking another is refused.
pub const VERSION: u32 = 1;
/// Descriptors in a bundle, in this order.
const FDS: [&str; 3] = ["fuse", "control", "pool"];
/// The optional fourth: the containerd snapshotter's gRPC listener (so that
/// containerd's reconnects wait in its backlog across a restart).
const GRPC_FD: &str = "grpc";
/// Longest message we accept (a state with many open volumes stays far below).
const MAX_MSG: usize = 1 << 20;

/// The state that travels with the descriptors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    pub pool: PathBuf,
    pub dir: PathBuf,
    pub background: bool,
    pub threads: usize,
    /// The kernel's INIT, once a server has answered it.
    pub init: Option<InitInfo>,
    /// Open files per volume (empty: rebuild from the loop devices).
    pub opens: Vec<(VolumeId, u32)>,
}

/// A server's descriptors and state.
pub struct Bundle {
    pub fuse: OwnedFd,
    pub control: UnixListener,
    /// The pool file, open read-write with the owner lock on it; `None` for a
    /// server given an already open `Pool` by a library user (it cannot hand over).
    pub pool: Option<File>,
    /// The snapshotter's gRPC listening socket (a `serve` has none).
    pub grpc: Option<UnixListener>,
    pub state: State,
}

impl Bundle {
    /// Copies of the descriptors (same open file descriptions), to send.
    pub fn try_clone(&self) -> io::Result<Bundle> {
        Ok(Bundle {
            fuse: self.fuse.try_clone()?,
            control: self.control.try_clone()?,
            pool: self.pool.as_ref().map(File::try_clone).transpose()?,
            grpc: self
                .grpc
                .as_ref()
                .map(UnixListener::try_clone)
                .transpose()?,
            state: self.state.clone(),
        })
    }

    /// Send the bundle on `sock` as one message (`{"ok":{...}}` for a control
    /// connection, or the bare state for the holder's socket pair).
    pub fn send(&self, sock: RawFd, wrap_ok: bool) -> io::Result<()> {
        let pool = self.pool.as_ref().ok_or_else(|| {
            io::Error::other("this server was started on an open pool and cannot hand it over")
        })?;
        let mut names: Vec<String> = FDS.iter().map(|s| s.to_string()).collect();
        let mut fds = vec![
            self.fuse.as_raw_fd(),
            self.control.as_raw_fd(),
            pool.as_raw_fd(),
        ];
        if let Some(g) = &self.grpc {
            names.push(GRPC_FD.to_string());
            fds.push(g.as_raw_fd());
        }
        let msg = BundleMsg {
            fds: names,
            state: self.state.clone(),
        };
        let value = serde_json::to_value(&msg).map_err(io::Error::other)?;
        let value = if wrap_ok {
            serde_json::json!({ "ok": value })
        } else {
            value
        };
        send_msg(sock, &value, &fds)
    }

    /// Receive a bundle sent by [`Bundle::send`].
    pub fn recv(sock: RawFd) -> Result<Bundle, ExportError> {
        let (value, mut fds) = recv_msg(sock)?
            .ok_or_else(|| ExportError::Handover("the other side closed the connection".into()))?;
        let value = match value.get("ok") {
            Some(v) => v.clone(),
            None if value.get("error").is_some() => {
                return Err(ExportError::Handover(format!(
                    "the running server refused: {}",
                    value["error"].as_str().unwrap_or("?")
                )))
            }
            None => value,
        };
        let msg: BundleMsg = serde_json::from_value(value)
            .map_err(|e| ExportError::Handover(format!("bad bundle: {e}")))?;
        if msg.state.version != VERSION {
            return Err(ExportError::Handover(format!(
                "the running server speaks handover version {}, this one {VERSION}",
                msg.state.version
            )));
        }
        let names: Vec<&str> = msg.fds.iter().map(String::as_str).collect();
        let with_grpc = names.len() == FDS.len() + 1
            && names[..FDS.len()] == FDS
            && names[FDS.len()] == GRPC_FD;
        if !(names == FDS || with_grpc) || fds.len() != names.len() {
            return Err(ExportError::Handover(format!(
                "expected descriptors {FDS:?} (and \"{GRPC_FD}\"), got {:?} ({} received)",
                msg.fds,
                fds.len()
            )));
        }
        let grpc = if with_grpc {
            fds.pop().map(UnixListener::from)
        } else {
            None
        };
        let pool = fds.pop().map(File::from);
        let control = fds.pop().map(UnixListener::from);
        let fuse = fds.pop();
        match (fuse, control, pool) {
            (Some(fuse), Some(control), pool) => Ok(Bundle {
                fuse,
                control,
                pool,
                grpc,
                state: msg.state,
            }),
            _ => Err(ExportError::Handover("descriptors missing".into())),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct BundleMsg {
    fds: Vec<String>,
    state: State,
}

//------------------------------------------------------------------------------
// The wire: one JSON line per message, descriptors as SCM_RIGHTS

/// Send `value` as one line, with `fds` attached.
pub fn send_msg(sock: RawFd, value: &serde_json::Value, fds: &[RawFd]) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut cbuf = vec![0u64; space.div_ceil(8)];
    let mut sent = 0;
    while sent < line.len() {
        let mut iov = libc::iovec {
            iov_base: line[sent..].as_mut_ptr().cast(),
            iov_len: line.len() - sent,
        };
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if sent == 0 && !fds.is_empty() {
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: the control buffer holds one header with `fds` after it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr().cast::<u8>(),
                    libc::CMSG_DATA(c),
                    fd_bytes,
                );
            }
        }
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        sent += n as usize;
    }
    Ok(())
}

/// Receive one line and the descriptors that came with it (close-on-exec).
/// `None`: the peer closed the connection before sending anything.
pub fn recv_msg(sock: RawFd) -> io::Result<Option<(serde_json::Value, Vec<OwnedFd>)>> {
    let Some((line, fds)) = recv_lines(sock)? else {
        return Ok(None);
    };
    let value =
        serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some((value, fds)))
}

/// Receive every whole line waiting, one value each: on a stream socket
/// (a snapshotter worker's connection to its holder) two messages sent
/// back to back arrive in one read. `None`: the peer closed the connection.
pub fn recv_msgs(sock: RawFd) -> io::Result<Option<Vec<serde_json::Value>>> {
    let Some((lines, _)) = recv_lines(sock)? else {
        return Ok(None);
    };
    let values = lines
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(Some(values))
}

/// Read until what was read ends a line (one line, or several that came
/// together) with the descriptors that came with it.
fn recv_lines(sock: RawFd) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    // Room for a few descriptors more than we expect: extras are closed.
    let mut cbuf = vec![0u64; 64];
    while !line.ends_with(b"\n") {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; pointers below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf[..]) as _;
        // SAFETY: msg points at live buffers.
        let n = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: walking the control messages the kernel just wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c);
                    let len = (*c).cmsg_len as usize - (data as usize - c as usize);
                    for i in 0..len / std::mem::size_of::<RawFd>() {
                        let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                        fds.push(OwnedFd::from_raw_fd(fd));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & libc::MSG_CTRUNC != 0 {
            return Err(io::Error::other("too many descriptors in one message"));
        }
        if n == 0 {
            if line.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        line.extend_from_slice(&buf[..n as usize]);
        if line.len() > MAX_MSG {
            return Err(io::Error::other("handover message too long"));
        }
    }
    Ok(Some((line, fds)))
}

/// The user id of the process at the other end of the Unix socket `sock`
/// (`SO_PEERCRED`: as it was when it connected, whatever the socket's mode).
pub fn peer_uid(sock: RawFd) -> io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: u32::MAX,
        gid: u32::MAX,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether a peer of user `uid` may be given this process's descriptors (a
/// bundle hands out the pool and the FUSE connection): root or our own user.
pub fn trusted_uid(uid: u32) -> bool {
    // SAFETY: geteuid cannot fail.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

/// Open the pool file read-write and take its owner lock, as `Pool::open`
/// does; the returned file is the lock (and the bundle's pool descriptor).
pub fn lock_pool(path: &Path, direct: bool) -> Result<File, ExportError> {
    if direct {
        let storage = crate::pool::open::open_file_direct(path, true)?;
        return Ok(storage.file().try_clone()?);
    }
    let storage = crate::pool::open::open_file(path, true)?;
    Ok(storage.file().try_clone()?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn messages_carry_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let v = serde_json::json!({"x": 1, "s": "y".repeat(100_000)});
        let sender = std::thread::spawn(move || {
            send_msg(a.as_raw_fd(), &v, &[f.as_raw_fd()]).unwrap();
            drop(a);
        });
        let (got, fds) = recv_msg(b.as_raw_fd()).unwrap().unwrap();
        sender.join().unwrap();
        assert_eq!(got["x"], 1);
        assert_eq!(got["s"].as_str().unwrap().len(), 100_000);
        assert_eq!(fds.len(), 1);
        // The received descriptor is the same open file.
        let mut file = File::from(fds.into_iter().next().unwrap());
        use std::io::{Seek, Write};
        file.write_all(b"abc").unwrap();
        assert_eq!(file.stream_position().unwrap(), 3);
        assert!(recv_msg(b.as_raw_fd()).unwrap().is_none());
    }

    /// A bundle of throwaway descriptors (also the holder's tests').
    pub(crate) fn bundle(dir: &Path, grpc: bool) -> Bundle {
        let listen = |n: &str| UnixListener::bind(dir.join(n)).unwrap();
        Bundle {
            fuse: tempfile::tempfile().unwrap().into(),
            control: listen("control"),
            pool: Some(tempfile::tempfile().unwrap()),
            grpc: grpc.then(|| listen("grpc")),
            state: State {
                version: VERSION,
                pool: dir.join("pool"),
                dir: dir.to_path_buf(),
                background: false,
                threads: 2,
                init: None,
                opens: vec![(3, 1)],
            },
        }
    }

    #[test]
    fn a_bundle_carries_three_or_four_descriptors_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        for grpc in [false, true] {
            let sub = dir.path().join(grpc.to_string());
            std::fs::create_dir(&sub).unwrap();
            let (a, b) = UnixStream::pair().unwrap();
            bundle(&sub, grpc).send(a.as_raw_fd(), true).unwrap();
            let got = Bundle::recv(b.as_raw_fd()).unwrap();
            assert_eq!(got.grpc.is_some(), grpc);
            let name = got.grpc.map(|g| g.local_addr().unwrap());
            assert_eq!(
                name.as_ref().and_then(|n| n.as_pathname()),
                grpc.then(|| sub.join("grpc")).as_deref()
            );
            assert_eq!(got.state.opens, vec![(3, 1)]);
        }
        // A fifth descriptor, or the fourth under another name: refused.
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        let fd = f.as_raw_fd();
        let bad = dir.path().join("bad");
        std::fs::create_dir(&bad).unwrap();
        let msg = serde_json::json!({"ok": {
            "fds": ["fuse", "control", "pool", "other"],
            "state": serde_json::to_value(bundle(&bad, false).state).ok(),
        }});
        send_msg(a.as_raw_fd(), &msg, &[fd, fd, fd, fd]).unwrap();
        let e = Bundle::recv(b.as_raw_fd()).err().expect("refused");
        assert!(e.to_string().contains("expected descriptors"), "{e}");
    }
}
