//! The host side of an export: loop devices (through `losetup`), the mount
//! table, filesystem freeze, and the external tools (`mkfs`, `mount`).
//! Nothing here knows about pools.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ExportError;

//------------------------------------------------------------------------------
// External commands

/// Run a tool; on failure the error carries its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String, ExportError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ExportError::ToolMissing {
            command: shown.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ExportError::ToolFailed {
            command: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

//------------------------------------------------------------------------------
// Loop devices

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoopDev {
    /// `loop3`
    pub name: String,
    /// `7:3`, as in /proc/self/mountinfo
    pub majmin: String,
    pub backing_file: PathBuf,
}

impl LoopDev {
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }
}

/// Every configured loop device (from sysfs; no device is opened).
pub(crate) fn loop_devices() -> Vec<LoopDev> {
    let mut out = Vec::new();
    let Ok(dir) = fs::read_dir("/sys/block") else {
        return out;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Some(dev) = loop_device(&name) {
            out.push(dev);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// A loop device by name (`loop3`), if it has a backing file.
pub(crate) fn loop_device(name: &str) -> Option<LoopDev> {
    let base = Path::new("/sys/block").join(name);
    let backing = fs::read_to_string(base.join("loop/backing_file")).ok()?;
    let backing = backing.trim_end_matches('\n');
    let backing = backing.strip_suffix(" (deleted)").unwrap_or(backing);
    let majmin = fs::read_to_string(base.join("dev"))
        .ok()?
        .trim()
        .to_string();
    Some(LoopDev {
        name: name.to_string(),
        majmin,
        backing_file: PathBuf::from(backing),
    })
}

/// Loop devices whose backing file is `file`.
pub(crate) fn loops_backed_by(file: &Path) -> Vec<LoopDev> {
    loop_devices()
        .into_iter()
        .filter(|d| d.backing_file == file)
        .collect()
}

/// `losetup --find --show --direct-io=on FILE`: the new device.
pub(crate) fn losetup_attach(file: &Path, read_only: bool) -> Result<PathBuf, ExportError> {
    let mut cmd = Command::new("losetup");
    cmd.args(["--find", "--show", "--direct-io=on"]);
    if read_only {
        cmd.arg("--read-only");
    }
    cmd.arg(file);
    let dev = run(&mut cmd)?;
    if !dev.starts_with("/dev/") {
        return Err(ExportError::NoLoopDevice {
            file: file.to_path_buf(),
            output: dev,
        });
    }
    Ok(PathBuf::from(dev))
}

pub(crate) fn losetup_detach(dev: &Path) -> Result<(), ExportError> {
    run(Command::new("losetup").arg("-d").arg(dev)).map(drop)
}

impl LoopDev {
    /// Detach this device if it is still the one we found: a device that
    /// has gone meanwhile (autoclear after its last unmount) may already
    /// carry someone else's file under the same name, and detaching that
    /// would break their mount. Gone counts as detached.
    pub(crate) fn detach(&self) -> Result<(), ExportError> {
        let still_ours =
            || loop_device(&self.name).is_some_and(|d| d.backing_file == self.backing_file);
        if !still_ours() {
            return Ok(());
        }
        match losetup_detach(&self.path()) {
            Err(_) if !still_ours() => Ok(()),
            r => r,
        }
    }
}

/// Flush a block device's cache down to its backing file (fsync of the device).
pub(crate) fn flush_device(dev: &Path) -> io::Result<()> {
    fs::File::open(dev)?.sync_all()
}

//------------------------------------------------------------------------------
// Mount table

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountEntry {
    pub majmin: String,
    pub mountpoint: PathBuf,
    pub fstype: String,
    pub source: String,
    pub read_only: bool,
}

/// Parse /proc/self/mountinfo (mount order: later entries are on top).
pub(crate) fn mounts() -> Vec<MountEntry> {
    fs::read_to_string("/proc/self/mountinfo")
        .map(|s| parse_mountinfo(&s))
        .unwrap_or_default()
}

pub(crate) fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        // id parent maj:min root mountpoint options [optional...] - fstype source superoptions
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 6 || r.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            majmin: l[2].to_string(),
            mountpoint: PathBuf::from(unescape(l[4])),
            read_only: l[5].split(',').any(|o| o == "ro"),
            fstype: unescape(r[0]),
            source: unescape(r[1]),
        });
    }
    out
}

/// The kernel writes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount at `dir`.
pub(crate) fn mount_at(dir: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mountpoint == dir)
}

pub(crate) fn umount(dir: &Path, lazy: bool) -> io::Result<()> {
    let c = CString::new(dir.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True if `dir` is a FUSE mount whose server has gone (every access: ENOTCONN).
/// Asked with statfs(2), which always reaches the FUSE server: stat(2) is
/// answered from the kernel's attribute cache for up to the export's TTL after
/// the server died, so a restart right after a kill -9 took the dead mount for
/// a live one and then failed to mount over it (ENOTCONN).
pub(crate) fn is_dead_fuse_mount(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `st` has room for the
    // struct statfs the call writes.
    let r = unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) };
    r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

//------------------------------------------------------------------------------
// Freeze

const FIFREEZE: libc::c_ulong = 0xC004_5877; // _IOWR('X', 119, int)
const FITHAW: libc::c_ulong = 0xC004_5878; // _IOWR('X', 120, int)

/// A frozen filesystem (as `fsfreeze -f`); thawed when dropped, whatever happens.
pub(crate) struct Frozen {
    dir: fs::File,
    path: PathBuf,
}

impl Frozen {
    pub fn freeze(mountpoint: &Path) -> io::Result<Frozen> {
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(mountpoint)?;
        let mut arg: libc::c_int = 0;
        // SAFETY: FIFREEZE takes an int argument and the fd is a valid directory.
        if unsafe { libc::ioctl(dir.as_raw_fd(), FIFREEZE as _, &mut arg) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Frozen {
            dir,
            path: mountpoint.to_path_buf(),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mut arg: libc::c_int = 0;
        // SAFETY: as in freeze.
        if unsafe { libc::ioctl(self.dir.as_raw_fd(), FITHAW as _, &mut arg) } != 0 {
            eprintln!(
                "thinpool: cannot thaw {}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
        }
    }
}

/// Whether `fd` has something to read (or a peer that hung up) within
/// `timeout`: the holder's and the server's listeners and connections wait
/// in short slices like this, so they can look at signals in between.
pub fn readable(fd: std::os::fd::RawFd, timeout: std::time::Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, timeout.as_millis().min(i32::MAX as u128) as i32) > 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse() {
        let text =
            "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 35 7:3 / /srv ro,relatime - ext4 /dev/loop3 ro\n\
                    41 35 0:52 / /run/thinpool/x rw,nosuid,nodev - fuse thinpool:/p\\134q rw\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/a b"));
        assert!(!m[0].read_only);
        assert_eq!(m[1].majmin, "7:3");
        assert!(m[1].read_only);
        assert_eq!(m[1].source, "/dev/loop3");
        assert_eq!(m[2].fstype, "fuse");
        assert_eq!(m[2].source, "thinpool:/p\\q");
    }
}
