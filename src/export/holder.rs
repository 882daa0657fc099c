//! `thinpool serve --supervise`: the holder. It locks the pool, binds the
//! control socket and mounts the export, then runs the serving process and
//! hands it the bundle; it does no pool I/O and answers no request. When the
//! server dies, the holder still holds the FUSE connection (so loop devices
//! see a pause, not an error) and starts a new server with the same bundle.
//! See docs/EXPORT.md, "Restarting the server".

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Child;
use std::sync::atomic::Ordering;
use std::thread;
use std::time::{Duration, Instant};

use super::control;
use super::handover::{self, Bundle};
use super::resume::InitInfo;
use super::server::{self, Cleanup, ServeOptions, SIGNALS};
use super::sys;
use super::ExportError;
use crate::pool::VolumeId;

/// A server that dies this often this quickly is not started again.
const MAX_CRASHES: usize = 5;
const CRASH_WINDOW: Duration = Duration::from_secs(30);
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// Starts the serving process (the binary supplies it: the library never
/// runs a program): `thinpool serve --handover-fd FD`, `FD` inherited.
pub type StartWorker<'a> = &'a mut dyn FnMut(RawFd) -> std::io::Result<Child>;

/// How a server run ended, from what it told the holder.
pub(super) enum Ended {
    /// It stopped (signal, unmount): the holder stops too.
    Stopped,
    /// Planned restart: start the binary again with these open counts.
    Restart(Vec<(VolumeId, u32)>),
    /// It died after it was serving (how, if known).
    Crashed(String),
    /// It died before it was serving: starting it again would fail again.
    NeverReady(String),
}

/// Hold the export of `pool_path` on `dir` and keep a server running on it.
pub fn supervise(
    pool_path: &Path,
    dir: &Path,
    opts: &ServeOptions,
    start: StartWorker<'_>,
) -> Result<(), ExportError> {
    server::install_signal_handlers();
    let mut bundle = server::new_held_bundle(pool_path, dir, opts)?;
    let pool_path = bundle.state.pool.clone();
    let _cleanup = Cleanup::new(
        control::socket_path(&pool_path),
        opts.background.then(|| bundle.state.dir.clone()),
    );
    say!(
        "thinpool: holder {} keeps the export of {} on {}",
        std::process::id(),
        pool_path.display(),
        bundle.state.dir.display()
    );
    let mut crashes = Crashes::default();
    loop {
        match run_once(&mut bundle, start)? {
            Ended::Stopped => return Ok(()),
            Ended::Restart(opens) => {
                say!("thinpool: holder: planned restart of the server");
                bundle.state.opens = opens;
            }
            Ended::NeverReady(status) => {
                return Err(ExportError::Handover(format!(
                    "the server exited before serving ({status}); see its messages above"
                )))
            }
            Ended::Crashed(status) => {
                bundle.state.opens.clear();
                crashes.count(&bundle, &status)?;
                say!("thinpool: holder: the server died ({status}); starting another");
            }
        }
    }
}

/// The server's recent crashes: a holder resumes the export after a crash
/// only if the kernel can resend, and not for a server that crashes in a loop.
#[derive(Default)]
pub(super) struct Crashes(VecDeque<Instant>);

impl Crashes {
    /// Count a crash (`how`: the exit status, if known); an error says why
    /// the export must end instead.
    pub(super) fn count(&mut self, bundle: &Bundle, how: &str) -> Result<(), ExportError> {
        if !bundle.state.init.is_some_and(|i: InitInfo| i.has_resend()) {
            // Today's behaviour: closing our descriptors ends the
            // connection, and the loop devices see I/O errors.
            return Err(ExportError::Handover(format!(
                "the server died ({how}) and this kernel cannot resend the \
                 requests it had read (FUSE_NOTIFY_RESEND needs Linux 6.9): \
                 ending the export"
            )));
        }
        let now = Instant::now();
        self.0.retain(|t| now.duration_since(*t) < CRASH_WINDOW);
        self.0.push_back(now);
        if self.0.len() > MAX_CRASHES {
            return Err(ExportError::Handover(format!(
                "the server died {} times within {} s (last: {how}); ending the export",
                self.0.len(),
                CRASH_WINDOW.as_secs()
            )));
        }
        Ok(())
    }
}

/// Start one server, hand it the bundle, and follow it until it exits.
fn run_once(bundle: &mut Bundle, start: StartWorker<'_>) -> Result<Ended, ExportError> {
    let (ours, theirs) = seqpacket_pair()?;
    let mut child = start(theirs.as_raw_fd()).map_err(ExportError::ServerSpawn)?;
    drop(theirs);
    if let Err(e) = bundle.send(ours.as_raw_fd(), false) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e.into());
    }
    let mut forwarded = SIGNALS.load(Ordering::SeqCst);
    let followed = follow(ours.as_raw_fd(), bundle, |_| {
        // Signals to the holder go to the server, once each.
        let signals = SIGNALS.load(Ordering::SeqCst);
        if signals > forwarded {
            forwarded = signals;
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        }
        true
    });
    let status = child.wait()?;
    Ok(followed.ended(status.to_string()))
}

/// What a worker told its holder so far.
pub(super) struct Followed {
    pub ready: bool,
    pub ended: Option<Ended>,
    /// `on_tick` asked to stop following (the worker may still run).
    pub left: bool,
}

impl Followed {
    /// How the run ended once the worker has gone (`how`: its exit status,
    /// if known).
    pub fn ended(self, how: String) -> Ended {
        match self.ended {
            Some(e) => e,
            None if self.ready => Ended::Crashed(how),
            None => Ended::NeverReady(how),
        }
    }
}

/// Read a worker's events on `conn` until it closes (every descriptor of
/// the worker is closed: it has exited) or `on_tick` (called about every
/// 100 ms) returns false. Only the end of the connection ends it: a message
/// it cannot read does not mean the worker has gone, and the bundle must
/// not go to another one while it may still serve.
pub(super) fn follow(
    conn: RawFd,
    bundle: &mut Bundle,
    mut on_tick: impl FnMut(&Followed) -> bool,
) -> Followed {
    let mut f = Followed {
        ready: false,
        ended: None,
        left: false,
    };
    loop {
        if !on_tick(&f) {
            f.left = true;
            return f;
        }
        if !sys::readable(conn, Duration::from_millis(100)) {
            continue;
        }
        let events = match handover::recv_msgs(conn) {
            Ok(Some(events)) => events,
            Ok(None) => return f,
            Err(e) => {
                say!("thinpool: holder: unreadable message from the worker: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        for event in events {
            match event["event"].as_str() {
                Some("ready") => {
                    f.ready = true;
                    if let Ok(Some(init)) = serde_json::from_value(event["init"].clone()) {
                        bundle.state.init = Some(init);
                    }
                }
                Some("stopped") => f.ended = Some(Ended::Stopped),
                Some("restart") => {
                    let opens = serde_json::from_value(event["opens"].clone()).unwrap_or_default();
                    f.ended = Some(Ended::Restart(opens));
                }
                _ => {}
            }
        }
    }
}

pub(super) fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `serve --takeover` of a supervised server: ask it to hand back to its
/// holder, and wait until the server the holder starts answers.
pub(crate) fn restart(pool: &Path, old_pid: u32, holder: u32) -> Result<(), ExportError> {
    let t = Instant::now();
    match control::restart(pool) {
        Some(Ok(())) => {}
        Some(Err(e)) => return Err(e.into()),
        None => return Err(ExportError::Handover("the server went away".into())),
    }
    while t.elapsed() < RESTART_TIMEOUT {
        if let Some(Ok(st)) = control::status(pool) {
            if st.pid != old_pid {
                say!(
                    "thinpool: holder {holder} restarted the server of {} (process {} -> {}) in {} ms",
                    pool.display(),
                    old_pid,
                    st.pid,
                    t.elapsed().as_millis()
                );
                return Ok(());
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    Err(ExportError::Handover(format!(
        "no new server answered within {} s",
        RESTART_TIMEOUT.as_secs()
    )))
}

/// `thinpool serve --takeover`: a supervised server is restarted by its
/// holder (which starts the binary as it now is); any other hands its
/// export over to this process, which then serves until stopped.
pub fn take_over(pool_path: &Path, dir: &Path, opts: &ServeOptions) -> Result<(), ExportError> {
    let pool_path = std::fs::canonicalize(pool_path).map_err(ExportError::path(pool_path))?;
    let st = match control::status(&pool_path) {
        Some(Ok(st)) => st,
        Some(Err(e)) => return Err(e.into()),
        None => {
            return Err(ExportError::Handover(format!(
                "no server is serving {}",
                pool_path.display()
            )))
        }
    };
    if let Some(holder) = st.supervisor {
        return restart(&pool_path, st.pid, holder);
    }
    server::take_over_from(pool_path, st, dir, opts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::handover::send_msg;
    use std::os::unix::net::UnixStream;

    fn bundle(dir: &Path) -> Bundle {
        handover::tests::bundle(dir, false)
    }

    /// A worker's connection to the snapshotter's holder is a stream: a
    /// `ready` and a `restart` sent back to back (a SIGTERM right after the
    /// start, a holder slow to read) arrive in one read. Both count; before,
    /// the read failed to parse and the holder took the worker for dead.
    #[test]
    fn events_sent_back_to_back_are_all_read() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle(dir.path());
        let (worker, holder) = UnixStream::pair().unwrap();
        send_msg(
            worker.as_raw_fd(),
            &serde_json::json!({"event": "ready"}),
            &[],
        )
        .unwrap();
        let restart = serde_json::json!({"event": "restart", "opens": [[3, 1]]});
        send_msg(worker.as_raw_fd(), &restart, &[]).unwrap();
        drop(worker);
        let f = follow(holder.as_raw_fd(), &mut b, |_| true);
        assert!(f.ready && !f.left);
        match f.ended("exited".into()) {
            Ended::Restart(opens) => assert_eq!(opens, vec![(3, 1)]),
            _ => panic!("the restart was not read"),
        }
    }

    /// A message the holder cannot read does not end the worker's turn:
    /// only the end of its connection (its exit) does.
    #[test]
    fn an_unreadable_message_is_not_the_end_of_the_worker() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle(dir.path());
        let (worker, holder) = UnixStream::pair().unwrap();
        send_msg(
            worker.as_raw_fd(),
            &serde_json::json!({"event": "ready"}),
            &[],
        )
        .unwrap();
        use std::io::Write;
        (&worker).write_all(b"not json\n").unwrap();
        let mut ticks = 0;
        let f = follow(holder.as_raw_fd(), &mut b, |_| {
            ticks += 1;
            ticks < 5
        });
        assert!(f.left, "follow returned as if the worker had exited");
        drop(worker);
        let f = follow(holder.as_raw_fd(), &mut b, |_| true);
        assert!(!f.left);
    }
}
