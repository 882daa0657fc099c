//! Control socket: the wire format and the client side used by the CLI.
//!
//! One request per connection line, one reply line, both JSON:
//! ```text
//! -> {"op":"snapshot","source":"base","name":"s1","writable":false}
//! <- {"ok":{"kind":"volume","value":{...}}}
//! <- {"error":"no volume named 'base'","errno":2,"kind":"no_such_volume","args":["base"]}
//! ```
//! Requests are the library's [`Request`] set plus a few server-only ones
//! ([`ServerRequest`]) the export verbs use to find and stop a background server.
//! Errors travel as their variant and arguments so the CLI prints exactly the
//! message it would print when it opens the pool itself.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::control::{Request, Response};
use crate::error::{Error, Result};

/// The control socket of a pool: `POOL.sock` next to the pool file.
pub fn socket_path(pool: &Path) -> PathBuf {
    let mut s = pool.as_os_str().to_owned();
    s.push(".sock");
    PathBuf::from(s)
}

/// Send `req` to the server of `pool` if one is serving it.
/// `None` means no server runs for this pool: open the file directly.
pub fn request(pool: &Path, req: &Request) -> Option<Result<Response>> {
    let line = match serde_json::to_string(req) {
        Ok(l) => l,
        Err(e) => {
            return Some(Err(Error::InvalidArgument(format!(
                "cannot encode request: {e}"
            ))))
        }
    };
    match call(pool, &line)? {
        Ok(value) => Some(serde_json::from_value(value).map_err(|e| bad_reply(&e.to_string()))),
        Err(e) => Some(Err(e)),
    }
}

//------------------------------------------------------------------------------
// Server-only requests

/// Requests only a serving process answers (never executed on an open pool).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ServerRequest {
    /// Who serves this pool, where, and what is open.
    ExportStatus,
    /// Stop if nothing is open (waiting up to `wait_ms` for deferred loop
    /// releases). Honoured only by servers started in the background by `attach`.
    ExportShutdownIfIdle { wait_ms: u64 },
    /// Handover protocol (docs/EXPORT.md): the new server asks for the
    /// bundle; the answer carries descriptors.
    ExportTakeover { version: u32, pid: u32 },
    /// The new server has the export: the old one exits.
    ExportTookOver,
    /// A supervised server: quiesce and exit; the holder starts the binary again.
    ExportRestart,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerStatus {
    pub pid: u32,
    pub pool: PathBuf,
    /// The FUSE directory in which every volume is a file.
    pub dir: PathBuf,
    /// Started by `attach`/`mount`; exits when its last volume is released.
    pub background: bool,
    /// The server is shutting down: wait for it to go, then start another.
    pub stopping: bool,
    /// Volumes with open files (loop devices hold theirs open), with open counts.
    pub open: Vec<(String, u32)>,
    /// The holder process that restarts this server (`serve --supervise`).
    #[serde(default)]
    pub supervisor: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShutdownReply {
    pub stopping: bool,
    pub reason: String,
}

/// Status of the server of `pool`, `None` when no server answers.
pub fn status(pool: &Path) -> Option<Result<ServerStatus>> {
    server_call(pool, &ServerRequest::ExportStatus)
}

/// Ask a supervised server to hand back to its holder and exit.
pub fn restart(pool: &Path) -> Option<Result<()>> {
    server_call::<serde_json::Value>(pool, &ServerRequest::ExportRestart).map(|r| r.map(drop))
}

/// Ask a background server to exit if none of its volumes is in use.
pub fn shutdown_if_idle(pool: &Path, wait: Duration) -> Option<Result<ShutdownReply>> {
    let wait_ms = wait.as_millis() as u64;
    server_call(pool, &ServerRequest::ExportShutdownIfIdle { wait_ms })
}

fn server_call<T: for<'de> Deserialize<'de>>(
    pool: &Path,
    req: &ServerRequest,
) -> Option<Result<T>> {
    let line = serde_json::to_string(req).expect("server requests always encode");
    match call(pool, &line)? {
        Ok(value) => Some(serde_json::from_value(value).map_err(|e| bad_reply(&e.to_string()))),
        Err(e) => Some(Err(e)),
    }
}

/// One round trip. `None`: no server (no socket, or a stale one nobody listens on).
fn call(pool: &Path, line: &str) -> Option<Result<serde_json::Value>> {
    let path = socket_path(pool);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return None
        }
        Err(e) => return Some(Err(Error::Io(e))),
    };
    Some(round_trip(stream, line))
}

fn round_trip(mut stream: UnixStream, line: &str) -> Result<serde_json::Value> {
    // Generous: a snapshot of a mounted volume waits for the filesystem to freeze.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    // A server may refuse (and close) before it reads the request: read its
    // reply even if sending failed. A closed connection is a bad reply, not
    // a broken pipe (on which the CLI exits 0, as for `| head`).
    let sent = stream
        .write_all(line.as_bytes())
        .and_then(|()| stream.write_all(b"\n"));
    let mut reply = String::new();
    let got = BufReader::new(stream).read_line(&mut reply);
    if reply.is_empty() {
        if let Err(e) = sent {
            return Err(bad_reply(&format!(
                "the server closed the connection ({e})"
            )));
        }
        got?;
        return Err(bad_reply(
            "the server closed the connection without replying",
        ));
    }
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| bad_reply(&e.to_string()))?;
    match reply {
        Reply { ok: Some(v), .. } => Ok(v),
        Reply { error: Some(e), .. } => Err(e.into_error()),
        _ => Err(bad_reply("neither ok nor error")),
    }
}

fn bad_reply(why: &str) -> Error {
    Error::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        format!("bad reply from the pool server: {why}"),
    ))
}

//------------------------------------------------------------------------------
// Wire format (shared with the server)

/// One reply line: exactly one of `ok` and `error` is set.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ok: Option<serde_json::Value>,
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

impl Reply {
    pub(crate) fn ok(v: impl Serialize) -> Reply {
        Reply {
            ok: Some(serde_json::to_value(v).unwrap_or(serde_json::Value::Null)),
            error: None,
        }
    }
    pub(crate) fn err(e: &Error) -> Reply {
        Reply {
            ok: None,
            error: Some(WireError::from_error(e)),
        }
    }
}

/// An [`Error`] as it crosses the socket: the message for humans, the errno for
/// exit codes, and the variant with its arguments to rebuild the same error.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WireError {
    pub error: String,
    pub errno: i32,
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nums: Vec<u64>,
}

impl WireError {
    pub(crate) fn from_error(e: &Error) -> WireError {
        let (kind, args, nums): (&str, Vec<String>, Vec<u64>) = match e {
            Error::NoSpace => ("no_space", vec![], vec![]),
            Error::VolumeExists(n) => ("volume_exists", vec![n.clone()], vec![]),
            Error::NoSuchVolume(n) => ("no_such_volume", vec![n.clone()], vec![]),
            Error::ReadOnly(n) => ("read_only", vec![n.clone()], vec![]),
            Error::InvalidArgument(m) => ("invalid_argument", vec![m.clone()], vec![]),
            Error::InUse(m) => ("in_use", vec![m.clone()], vec![]),
            Error::Corrupt(m) => ("corrupt", vec![m.clone()], vec![]),
            Error::OutOfRange {
                volume,
                offset,
                len,
                size,
            } => (
                "out_of_range",
                vec![volume.clone()],
                vec![*offset, *len, *size],
            ),
            Error::Io(io) => ("io", vec![io.to_string()], vec![]),
            _ => ("other", vec![], vec![]),
        };
        WireError {
            error: e.to_string(),
            errno: e.errno(),
            kind: kind.to_string(),
            args,
            nums,
        }
    }

    pub(crate) fn into_error(self) -> Error {
        let arg = |i: usize| self.args.get(i).cloned().unwrap_or_default();
        match (self.kind.as_str(), self.nums.as_slice()) {
            ("no_space", _) => Error::NoSpace,
            ("volume_exists", _) => Error::VolumeExists(arg(0)),
            ("no_such_volume", _) => Error::NoSuchVolume(arg(0)),
            ("read_only", _) => Error::ReadOnly(arg(0)),
            ("invalid_argument", _) => Error::InvalidArgument(arg(0)),
            ("in_use", _) => Error::InUse(arg(0)),
            ("corrupt", _) => Error::Corrupt(arg(0)),
            ("out_of_range", &[offset, len, size]) => Error::OutOfRange {
                volume: arg(0),
                offset,
                len,
                size,
            },
            ("io", _) => Error::Io(os_error(self.errno, arg(0))),
            _ => Error::Io(os_error(self.errno, self.error)),
        }
    }
}

fn os_error(errno: i32, msg: String) -> io::Error {
    let os = io::Error::from_raw_os_error(errno);
    if os.to_string() == msg {
        os
    } else {
        io::Error::new(os.kind(), msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(e: Error) -> Error {
        let line = serde_json::to_string(&Reply::err(&e)).unwrap();
        let r: Reply = serde_json::from_str(&line).unwrap();
        assert!(r.ok.is_none());
        r.error.unwrap().into_error()
    }

    #[test]
    fn errors_keep_their_message_and_errno() {
        let cases = vec![
            Error::NoSpace,
            Error::VolumeExists("a".into()),
            Error::NoSuchVolume("b".into()),
            Error::ReadOnly("c".into()),
            Error::InvalidArgument("bad size".into()),
            Error::InUse("volume 'x' is in use".into()),
            Error::Corrupt("page 7".into()),
            Error::OutOfRange {
                volume: "v".into(),
                offset: 1,
                len: 2,
                size: 3,
            },
            Error::Io(io::Error::from_raw_os_error(libc::ENOENT)),
            Error::Io(io::Error::other("disk on fire")),
        ];
        for e in cases {
            let back = round(clone_error(&e));
            assert_eq!(back.to_string(), e.to_string());
            if !matches!(e, Error::Io(_)) {
                assert_eq!(back.errno(), e.errno());
            }
        }
    }

    fn clone_error(e: &Error) -> Error {
        WireError::from_error(e).into_error()
    }

    #[test]
    fn ok_replies_round_trip() {
        let line = serde_json::to_string(&Reply::ok(Response::Ok)).unwrap();
        assert_eq!(line, r#"{"ok":{"kind":"ok"}}"#);
        let r: Reply = serde_json::from_str(&line).unwrap();
        let resp: Response = serde_json::from_value(r.ok.unwrap()).unwrap();
        assert!(matches!(resp, Response::Ok));
    }

    #[test]
    fn server_requests_do_not_parse_as_pool_requests() {
        let line = serde_json::to_string(&ServerRequest::ExportStatus).unwrap();
        assert!(serde_json::from_str::<Request>(&line).is_err());
        let line = serde_json::to_string(&Request::List).unwrap();
        assert!(serde_json::from_str::<ServerRequest>(&line).is_err());
    }

    #[test]
    fn no_server_means_none() {
        let dir = tempfile::tempdir().unwrap();
        let pool = dir.path().join("p");
        assert!(request(&pool, &Request::List).is_none());
        // A stale socket file nobody listens on is the same as no server.
        drop(std::os::unix::net::UnixListener::bind(socket_path(&pool)).unwrap());
        assert!(request(&pool, &Request::List).is_none());
    }
}
