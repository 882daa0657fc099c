//! Importing container images as a chain of block layers.
//!
//! Sources: an OCI image layout directory (`index.json`, `blobs/sha256/...`)
//! or a `docker save` tarball (`manifest.json`, or an OCI layout inside).
//! For each layer, in order: clone the previous layer (the first: a fresh
//! volume with a new ext4), mount it, apply the layer tar with the OCI rules,
//! unmount, commit. Each layer volume is named after the layer's OCI ChainID
//! (`layer:<hex>`), so a layer any image already brought in is reused, as
//! Docker reuses shared layers. The image name is a read-only snapshot of the
//! top layer (it costs no data space).
//!
//! Layer application (see `apply_layer`): `.wh.NAME` deletes NAME from the
//! lower layers; `.wh..wh..opq` hides everything the lower layers had in its
//! directory; regular files, directories, symlinks, hard links, devices and
//! fifos are created with their owner, mode, mtime and `SCHILY.xattr.*`
//! extended attributes. Paths are resolved inside the root: absolute paths
//! and `..` are refused, and symlinks met on the way are followed as if the
//! root were `/`, never out of it.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::{BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{chain_digest, hex, parse_digest, Digest};
use crate::error::{Error, Result};
use crate::export::{Mkfs, MountOptions, ServeOptions, Server};
use crate::pool::Pool;

/// Prefix of layer volume names: `layer:<OCI ChainID hex>`.
pub const LAYER_PREFIX: &str = "layer:";

#[derive(Debug, Clone)]
pub struct ImportOptions {
    /// Virtual size of the first layer's volume (and so of every layer).
    pub size: u64,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions { size: 1 << 30 }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportedLayer {
    /// The layer volume (`layer:<chain id>`).
    pub volume: String,
    /// OCI DiffID: sha256 of the uncompressed layer tar.
    pub diff_id: String,
    /// OCI ChainID of the image's layers up to this one.
    pub chain_id: String,
    /// False when the pool already had this layer.
    pub imported: bool,
    /// Block-level digests of the layer volume (see `layer`).
    pub diff_digest: Option<String>,
    pub chain_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportReport {
    pub name: String,
    pub layers: Vec<ImportedLayer>,
}

/// An image in a pool, as `image list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub name: String,
    pub virtual_size: u64,
    /// Layer volumes, base first.
    pub layers: Vec<String>,
    pub chain_digest: Option<String>,
}

fn err(msg: impl Into<String>) -> Error {
    Error::Layer(msg.into())
}

fn io_err(what: &Path, e: std::io::Error) -> Error {
    err(format!("{}: {e}", what.display()))
}

//------------------------------------------------------------------------------
// Reading image sources

/// A layer to apply: its blob file and the DiffID the config promises.
struct LayerBlob {
    path: PathBuf,
    /// Digest of the (possibly compressed) blob, when the source names it.
    blob_digest: Option<Digest>,
    diff_id: Digest,
}

/// A directory removed (recursively) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Result<TempDir> {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("thinpool-{tag}.{}.{t:x}", std::process::id()));
        fs::create_dir_all(&p).map_err(|e| io_err(&p, e))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Never recurse into a mount that is still there.
        if !is_mountpoint(&self.0) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(canon) = fs::canonicalize(p) else {
        return false;
    };
    let Ok(mounts) = fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        l.split(' ').nth(1).map(|m| m.replace("\\040", " "))
            == Some(canon.to_string_lossy().into_owned())
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let s = fs::read(path).map_err(|e| io_err(path, e))?;
    serde_json::from_slice(&s).map_err(|e| err(format!("{}: not valid JSON: {e}", path.display())))
}

fn blob_path(root: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, h) = digest
        .split_once(':')
        .ok_or_else(|| err(format!("bad digest '{digest}'")))?;
    if alg != "sha256" {
        return Err(err(format!(
            "digest algorithm '{alg}' is not supported (sha256 only)"
        )));
    }
    parse_digest(h)?;
    Ok(root.join("blobs").join(alg).join(h))
}

fn verify_file(path: &Path, want: &Digest) -> Result<()> {
    let mut f = File::open(path).map_err(|e| io_err(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| io_err(path, e))?;
    let got: Digest = h.finalize().into();
    if got != *want {
        return Err(err(format!(
            "{}: content digest sha256:{} does not match sha256:{}",
            path.display(),
            hex(&got),
            hex(want)
        )));
    }
    Ok(())
}

fn diff_ids(config: &serde_json::Value, what: &Path) -> Result<Vec<Digest>> {
    let ids = config["rootfs"]["diff_ids"].as_array().ok_or_else(|| {
        err(format!(
            "{}: image config has no rootfs.diff_ids",
            what.display()
        ))
    })?;
    ids.iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| err("diff_id is not a string"))
                .and_then(parse_digest)
        })
        .collect()
}

/// Layers of an OCI image layout at `root`: the manifest tagged `tag`
/// (`org.opencontainers.image.ref.name`), or the only/first one.
fn oci_layers(root: &Path, tag: Option<&str>) -> Result<Vec<LayerBlob>> {
    let index = read_json(&root.join("index.json"))?;
    let list = index["manifests"].as_array().cloned().unwrap_or_default();
    let mut desc = match tag {
        None => list.first().cloned(),
        Some(t) => list
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == t)
            .cloned(),
    }
    .ok_or_else(|| match tag {
        None => err(format!("{}: index.json lists no manifest", root.display())),
        Some(t) => err(format!(
            "{}: no image tagged '{t}' in index.json",
            root.display()
        )),
    })?;
    // A nested index (multi-platform): take its linux/amd64 manifest, or the first.
    for _ in 0..4 {
        let mt = desc["mediaType"].as_str().unwrap_or("");
        if !mt.contains("index") && !mt.contains("manifest.list") {
            break;
        }
        let d = desc["digest"]
            .as_str()
            .ok_or_else(|| err("index entry without digest"))?;
        let inner = read_json(&blob_path(root, d)?)?;
        let list = inner["manifests"].as_array().cloned().unwrap_or_default();
        desc = list
            .iter()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == "amd64")
            .or(list.first())
            .cloned()
            .ok_or_else(|| err("nested index lists no manifest"))?;
    }
    let mdigest = desc["digest"]
        .as_str()
        .ok_or_else(|| err("manifest descriptor without digest"))?;
    let mpath = blob_path(root, mdigest)?;
    verify_file(&mpath, &parse_digest(mdigest)?)?;
    let manifest = read_json(&mpath)?;
    let cdigest = manifest["config"]["digest"]
        .as_str()
        .ok_or_else(|| err("manifest without config"))?;
    let cpath = blob_path(root, cdigest)?;
    verify_file(&cpath, &parse_digest(cdigest)?)?;
    let ids = diff_ids(&read_json(&cpath)?, &cpath)?;
    let layers = manifest["layers"].as_array().cloned().unwrap_or_default();
    same_count("manifest", layers.len(), ids.len())?;
    layers
        .iter()
        .zip(ids)
        .map(|(l, diff_id)| {
            let mt = l["mediaType"].as_str().unwrap_or("");
            if mt.contains("zstd") {
                return Err(err(format!(
                    "layer media type {mt} is not supported (use gzip or plain tar)"
                )));
            }
            let d = l["digest"]
                .as_str()
                .ok_or_else(|| err("layer without digest"))?;
            Ok(LayerBlob {
                path: blob_path(root, d)?,
                blob_digest: Some(parse_digest(d)?),
                diff_id,
            })
        })
        .collect()
}

/// A manifest and its config must list the same number of layers.
fn same_count(manifest: &str, layers: usize, diff_ids: usize) -> Result<()> {
    if layers != diff_ids {
        return Err(err(format!(
            "{manifest} lists {layers} layers but the config {diff_ids} diff_ids"
        )));
    }
    Ok(())
}

/// Layers of an unpacked `docker save` archive at `root`.
fn docker_layers(root: &Path) -> Result<Vec<LayerBlob>> {
    let mpath = root.join("manifest.json");
    let m = read_json(&mpath)?;
    let entry = m
        .as_array()
        .and_then(|a| a.first())
        .ok_or_else(|| err("manifest.json lists no image"))?;
    let config = entry["Config"]
        .as_str()
        .ok_or_else(|| err("manifest.json: no Config"))?;
    let cpath = safe_join(root, Path::new(config))?;
    let ids = diff_ids(&read_json(&cpath)?, &cpath)?;
    let layers = entry["Layers"].as_array().cloned().unwrap_or_default();
    same_count("manifest.json", layers.len(), ids.len())?;
    layers
        .iter()
        .zip(ids)
        .map(|(l, diff_id)| {
            let p = l
                .as_str()
                .ok_or_else(|| err("manifest.json: layer is not a path"))?;
            Ok(LayerBlob {
                path: safe_join(root, Path::new(p))?,
                blob_digest: None,
                diff_id,
            })
        })
        .collect()
}

/// Join a relative archive path under `root`, refusing anything that leaves it.
fn safe_join(root: &Path, p: &Path) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => return Err(err(format!("path '{}' leaves the image", p.display()))),
        }
    }
    Ok(out)
}

/// Split `[oci:]PATH[:TAG]` into the path and tag (a path that exists as
/// given wins over a tag split).
fn parse_source(source: &Path) -> (PathBuf, Option<String>) {
    let s = source.to_string_lossy();
    let s = s
        .strip_prefix("oci:")
        .or_else(|| s.strip_prefix("docker-archive:"))
        .unwrap_or(&s);
    if Path::new(s).exists() {
        return (PathBuf::from(s), None);
    }
    match s.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') && Path::new(p).exists() => {
            (PathBuf::from(p), Some(t.to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

/// The layers `image import` would apply from `source`, base first: blob
/// file and DiffID (hex). For tests and fuzzing of the manifest handling.
#[doc(hidden)]
pub fn source_layer_files(source: &Path, scratch: &Path) -> Result<Vec<(PathBuf, String)>> {
    Ok(source_layers(source, scratch)?
        .into_iter()
        .map(|l| (l.path, hex(&l.diff_id)))
        .collect())
}

/// Find the layers of `source`; a tarball is unpacked into `scratch` first.
fn source_layers(source: &Path, scratch: &Path) -> Result<Vec<LayerBlob>> {
    let (path, tag) = parse_source(source);
    let source = path.as_path();
    let meta = fs::metadata(source).map_err(|e| io_err(source, e))?;
    let root = if meta.is_dir() {
        source.to_path_buf()
    } else {
        let f = File::open(source).map_err(|e| io_err(source, e))?;
        let mut a = tar::Archive::new(BufReader::new(f));
        a.unpack(scratch)
            .map_err(|e| err(format!("{}: cannot unpack: {e}", source.display())))?;
        scratch.to_path_buf()
    };
    if root.join("manifest.json").is_file() {
        docker_layers(&root)
    } else if root.join("index.json").is_file() {
        oci_layers(&root, tag.as_deref())
    } else {
        Err(err(format!(
            "{}: neither an OCI image layout (index.json) nor a docker save archive (manifest.json)",
            source.display()
        )))
    }
}

//------------------------------------------------------------------------------
// Applying a layer

/// Reads through and hashes everything read.
struct Hashing<R> {
    inner: R,
    h: Sha256,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| err(format!("path {} contains NUL", p.display())))
}

fn check(r: libc::c_int, what: &str, p: &Path) -> Result<()> {
    if r != 0 {
        return Err(err(format!(
            "{what} {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// The relative, normalised path of an archive entry; None for the root.
fn entry_path(raw: &Path) -> Result<Option<PathBuf>> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            _ => {
                return Err(err(format!(
                    "layer entry '{}' is absolute or leaves the root",
                    raw.display()
                )))
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Resolve `rel` (relative to the image root) to a host path inside `root`,
/// following symlinks in the *parent* components as if `root` were `/`.
/// The last component is never followed.
fn resolve(root: &Path, rel: &Path) -> Result<PathBuf> {
    use std::ffi::OsString;
    let comps: Vec<OsString> = rel
        .components()
        .map(|c| c.as_os_str().to_os_string())
        .collect();
    let Some((last, parents)) = comps.split_last() else {
        return Ok(root.to_path_buf());
    };
    let mut cur: Vec<OsString> = Vec::new();
    // A stack of components still to walk, next on top.
    let mut todo: Vec<OsString> = parents.iter().rev().cloned().collect();
    let mut hops = 0;
    while let Some(n) = todo.pop() {
        if n == ".." {
            cur.pop();
            continue;
        }
        if n == "." || n == "/" {
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&cur);
        here.push(&n);
        match fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                hops += 1;
                if hops > 40 {
                    return Err(err(format!(
                        "too many symlinks resolving '{}'",
                        rel.display()
                    )));
                }
                let target = fs::read_link(&here).map_err(|e| io_err(&here, e))?;
                if target.is_absolute() {
                    cur.clear();
                }
                todo.extend(
                    target
                        .components()
                        .rev()
                        .map(|c| c.as_os_str().to_os_string()),
                );
            }
            _ => cur.push(n),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&cur);
    out.push(last);
    Ok(out)
}

fn remove_any(p: &Path) -> Result<()> {
    match fs::symlink_metadata(p) {
        Err(_) => Ok(()),
        Ok(m) if m.is_dir() => fs::remove_dir_all(p).map_err(|e| io_err(p, e)),
        Ok(_) => fs::remove_file(p).map_err(|e| io_err(p, e)),
    }
}

/// Make the parent directories of `p` exist (as directories, 0755).
fn make_parents(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent() {
        if !parent.is_dir() {
            fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
    }
    Ok(())
}

/// Opaque directory: remove what lower layers had in `dir`, keeping what
/// this layer (paths in `created`) put there already.
fn make_opaque(dir: &Path, created: &HashSet<PathBuf>) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd {
        let p = e.map_err(|e| io_err(dir, e))?.path();
        if !created.contains(&p) {
            remove_any(&p)?;
        } else if fs::symlink_metadata(&p)
            .map(|m| m.is_dir())
            .unwrap_or(false)
        {
            make_opaque(&p, created)?;
        }
    }
    Ok(())
}

fn set_meta(
    path: &Path,
    h: &tar::Header,
    xattrs: &[(String, Vec<u8>)],
    is_link: bool,
) -> Result<()> {
    let c = cstr(path)?;
    let uid = h.uid().unwrap_or(0) as libc::uid_t;
    let gid = h.gid().unwrap_or(0) as libc::gid_t;
    // SAFETY: c is a valid NUL-terminated path.
    let r = unsafe { libc::lchown(c.as_ptr(), uid, gid) };
    // Without root (applying into a plain directory), ownership is best effort.
    // SAFETY: geteuid has no preconditions.
    if !(r != 0 && unsafe { libc::geteuid() } != 0) {
        check(r, "chown", path)?;
    }
    for (k, v) in xattrs {
        let name = CString::new(k.as_bytes()).map_err(|_| err("xattr name contains NUL"))?;
        // SAFETY: valid C strings and a buffer of v.len() bytes.
        let r =
            unsafe { libc::lsetxattr(c.as_ptr(), name.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
        check(r, &format!("setxattr {k} on"), path)?;
    }
    if !is_link {
        // After chown, which clears set-id bits.
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io_err(path, e))?;
    }
    set_mtime(path, h.mtime().unwrap_or(0))
}

fn set_mtime(path: &Path, mtime: u64) -> Result<()> {
    let c = cstr(path)?;
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r, "set mtime of", path)
}

/// Apply one layer tar (plain or gzip: detected by magic) onto `root`.
/// Returns the sha256 of the uncompressed tar (its OCI DiffID).
pub fn apply_layer(root: &Path, blob: &mut dyn Read) -> Result<Digest> {
    let mut head = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        match blob.read(&mut head[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => return Err(Error::Io(e)),
        }
    }
    let rest = std::io::Cursor::new(head[..got].to_vec()).chain(blob);
    let inner: Box<dyn Read + '_> = if got == 2 && head == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(rest))
    } else {
        Box::new(rest)
    };
    let mut hashing = Hashing {
        inner,
        h: Sha256::new(),
    };
    let mut created: HashSet<PathBuf> = HashSet::new();
    let mut dir_times: Vec<(PathBuf, u64)> = Vec::new();
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let entries = archive
            .entries()
            .map_err(|e| err(format!("layer is not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| err(format!("layer tar is damaged: {e}")))?;
            apply_entry(root, &mut entry, &mut created, &mut dir_times)?;
        }
    }
    // The DiffID covers the whole tar, padding included.
    std::io::copy(&mut hashing, &mut std::io::sink()).map_err(Error::Io)?;
    // Directory mtimes last: creating their children changed them.
    dir_times.sort_by_key(|d| std::cmp::Reverse(d.0.components().count()));
    for (p, t) in dir_times {
        if p.exists() {
            set_mtime(&p, t)?;
        }
    }
    Ok(hashing.h.finalize().into())
}

fn apply_entry<R: Read>(
    root: &Path,
    entry: &mut tar::Entry<'_, R>,
    created: &mut HashSet<PathBuf>,
    dir_times: &mut Vec<(PathBuf, u64)>,
) -> Result<()> {
    let raw = entry
        .path()
        .map_err(|e| err(format!("bad entry path: {e}")))?
        .into_owned();
    let kind = entry.header().entry_type();
    let Some(rel) = entry_path(&raw)? else {
        // The root itself: take its metadata.
        if kind.is_dir() {
            let h = entry.header().clone();
            set_meta(root, &h, &[], false)?;
            dir_times.push((root.to_path_buf(), h.mtime().unwrap_or(0)));
        }
        return Ok(());
    };
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = resolve(root, &rel)?;
    if name == ".wh..wh..opq" {
        let dir = path.parent().unwrap_or(root).to_path_buf();
        return make_opaque(&dir, created);
    }
    if let Some(victim) = name.strip_prefix(".wh.") {
        let target = path.with_file_name(victim);
        if !created.contains(&target) {
            remove_any(&target)?;
        }
        return Ok(());
    }
    let mut xattrs = Vec::new();
    if let Ok(Some(pax)) = entry.pax_extensions() {
        for ext in pax.flatten() {
            if let Some(k) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr.")) {
                xattrs.push((k.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    let h = entry.header().clone();
    make_parents(&path)?;
    let existing = fs::symlink_metadata(&path).ok();
    use tar::EntryType as T;
    match kind {
        T::Directory => {
            if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                remove_any(&path)?;
                fs::create_dir(&path).map_err(|e| io_err(&path, e))?;
            }
            set_meta(&path, &h, &xattrs, false)?;
            dir_times.push((path.clone(), h.mtime().unwrap_or(0)));
        }
        T::Regular | T::Continuous | T::GNUSparse => {
            remove_any(&path)?;
            let mut f = File::create(&path).map_err(|e| io_err(&path, e))?;
            std::io::copy(entry, &mut f).map_err(|e| io_err(&path, e))?;
            drop(f);
            set_meta(&path, &h, &xattrs, false)?;
        }
        T::Symlink => {
            let target = entry
                .link_name()
                .map_err(|e| err(format!("bad symlink target: {e}")))?
                .ok_or_else(|| err(format!("symlink '{}' without target", rel.display())))?;
            remove_any(&path)?;
            symlink(&*target, &path).map_err(|e| io_err(&path, e))?;
            set_meta(&path, &h, &xattrs, true)?;
        }
        T::Link => {
            let target = entry
                .link_name()
                .map_err(|e| err(format!("bad hard link target: {e}")))?
                .ok_or_else(|| err(format!("hard link '{}' without target", rel.display())))?;
            let trel = entry_path(&target)?
                .ok_or_else(|| err(format!("hard link '{}' to the root", rel.display())))?;
            let src = resolve(root, &trel)?;
            if src != path {
                remove_any(&path)?;
                fs::hard_link(&src, &path).map_err(|e| {
                    err(format!(
                        "hard link {} -> {}: {e}",
                        rel.display(),
                        trel.display()
                    ))
                })?;
            }
        }
        T::Char | T::Block | T::Fifo => {
            remove_any(&path)?;
            let fmt = match kind {
                T::Char => libc::S_IFCHR,
                T::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let major = h.device_major().ok().flatten().unwrap_or(0);
            let minor = h.device_minor().ok().flatten().unwrap_or(0);
            let c = cstr(&path)?;
            let dev = libc::makedev(major, minor);
            // SAFETY: valid path; mode and dev are plain integers.
            check(
                unsafe { libc::mknod(c.as_ptr(), fmt | 0o600, dev) },
                "mknod",
                &path,
            )?;
            set_meta(&path, &h, &xattrs, false)?;
        }
        // PAX/GNU metadata records are consumed by the tar reader.
        _ => return Ok(()),
    }
    created.insert(path);
    Ok(())
}

//------------------------------------------------------------------------------
// Import

/// Unmounts (and detaches) a directory on drop unless disarmed.
struct MountGuard(Option<PathBuf>);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            if let Err(e) = crate::export::umount(&d) {
                eprintln!("thinpool: cleanup: umount {}: {e}", d.display());
            }
        }
    }
}

fn export_err(e: crate::export::ExportError) -> Error {
    match e {
        crate::export::ExportError::Pool(p) => p,
        other => err(other.to_string()),
    }
}

/// Mount the volume `volume` of the pool served in this process on `dir`,
/// making an ext4 on it first if `mkfs`.
fn mount_volume(server: &Server, volume: &str, dir: &Path, mkfs: bool) -> Result<MountGuard> {
    let opts = MountOptions {
        mkfs: mkfs.then_some(Mkfs::Ext4),
        ..Default::default()
    };
    crate::export::mount_served(server, volume, dir, &opts).map_err(export_err)?;
    Ok(MountGuard(Some(dir.to_path_buf())))
}

/// Who holds the pool during an import: the import itself, or (when layers
/// must be applied through a mounted filesystem) a server in this process.
/// Either way the pool stays open here from start to end: nothing reopens
/// it, so nothing can race with a server of our own making.
enum Holder {
    Open(Box<Pool>),
    Served(Server, PathBuf),
}

impl Holder {
    fn with<R>(&mut self, f: impl FnOnce(&mut Pool) -> R) -> R {
        match self {
            Holder::Open(p) => f(p),
            Holder::Served(s, _) => s.with_pool(f),
        }
    }

    fn server(&self) -> Result<&Server> {
        match self {
            Holder::Served(s, _) => Ok(s),
            Holder::Open(_) => Err(err("internal: the pool is not served")),
        }
    }

    fn close(self) -> Result<()> {
        match self {
            Holder::Open(p) => p.close(),
            Holder::Served(s, dir) => {
                let r = s.stop().map_err(export_err);
                let _ = fs::remove_dir(&dir);
                r
            }
        }
    }
}

/// A committed layer's digests, from the catalog (no usage walk).
fn digests_of(p: &Pool, volume: &str) -> Result<(Option<String>, Option<String>)> {
    let r = p.record(volume)?;
    Ok((
        super::digest_hex(&r.diff_digest),
        super::digest_hex(&r.chain_digest),
    ))
}

/// Import the image at `source` into the pool file `pool` as `name`.
/// The pool must not be open elsewhere: the import opens it once and, to
/// apply layers through a filesystem, serves it from this process.
/// `progress` gets one line per step.
pub fn import(
    pool: &Path,
    source: &Path,
    name: &str,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ImportReport> {
    let pool = fs::canonicalize(pool).map_err(|e| io_err(pool, e))?;
    let p = Pool::open(&pool)?;
    crate::catalog::validate_name(name)?;
    if p.lookup(name).is_ok() {
        return Err(Error::VolumeExists(name.to_string()));
    }
    let scratch = TempDir::new("image")?;
    let layers = source_layers(source, &scratch.0)?;
    if layers.is_empty() {
        return Err(err("the image has no layers"));
    }
    let mut chain: Option<Digest> = None;
    let chains: Vec<Digest> = layers
        .iter()
        .map(|l| {
            let c = chain_digest(chain.as_ref(), &l.diff_id);
            chain = Some(c);
            c
        })
        .collect();
    let volume_of = |c: &Digest| format!("{LAYER_PREFIX}{}", hex(c));
    let mut holder = if chains.iter().all(|c| p.lookup(&volume_of(c)).is_ok()) {
        Holder::Open(Box::new(p))
    } else {
        let dir = crate::export::default_export_dir(&pool);
        fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let server = Server::start(p, &dir, &ServeOptions::default()).map_err(export_err)?;
        Holder::Served(server, dir)
    };
    let result = import_layers(&mut holder, &layers, &chains, name, opts, progress);
    let closed = holder.close();
    let report = result?;
    closed?;
    Ok(report)
}

fn import_layers(
    holder: &mut Holder,
    layers: &[LayerBlob],
    chains: &[Digest],
    name: &str,
    opts: &ImportOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ImportReport> {
    let mut report = ImportReport {
        name: name.to_string(),
        layers: Vec::new(),
    };
    let mut prev: Option<String> = None;
    for (i, (l, c)) in layers.iter().zip(chains).enumerate() {
        let volume = format!("{LAYER_PREFIX}{}", hex(c));
        let present = holder.with(|p| p.lookup(&volume).is_ok());
        let (imported, (diff_digest, chain_digest)) = if present {
            let digests = holder.with(|p| digests_of(p, &volume))?;
            progress(&format!(
                "layer {}/{}: sha256:{} already present",
                i + 1,
                layers.len(),
                &hex(&l.diff_id)[..12]
            ));
            (false, digests)
        } else {
            progress(&format!(
                "layer {}/{}: applying sha256:{}",
                i + 1,
                layers.len(),
                &hex(&l.diff_id)[..12]
            ));
            let work = format!("importing.{}.{i}", std::process::id());
            holder.with(|p| match &prev {
                None => p.create_volume(&work, opts.size),
                Some(pv) => p.snapshot(pv, &work, true),
            })?;
            let r = apply_to_volume(holder.server()?, &work, l, prev.is_none());
            let r = holder.with(|p| {
                let r = r.and_then(|_| super::commit(p, &work, Some(&volume)).map(|_| ()));
                if r.is_err() && p.lookup(&work).is_ok() {
                    let _ = p.remove_volume(&work);
                }
                r.and_then(|_| digests_of(p, &volume))
            });
            (true, r?)
        };
        report.layers.push(ImportedLayer {
            volume: volume.clone(),
            diff_id: hex(&l.diff_id),
            chain_id: hex(c),
            imported,
            diff_digest,
            chain_digest,
        });
        prev = Some(volume);
    }
    let top = prev.expect("at least one layer");
    holder.with(|p| {
        p.snapshot(&top, name, false)?;
        // The image is its top layer: same content, same digests.
        let t = p.record(&top)?.clone();
        let id = p.lookup(name)?;
        p.mark_layer(id, t.diff_digest, t.chain_digest)?;
        p.commit()
    })?;
    Ok(report)
}

fn apply_to_volume(server: &Server, work: &str, l: &LayerBlob, first: bool) -> Result<()> {
    if let Some(d) = &l.blob_digest {
        verify_file(&l.path, d)?;
    }
    let mnt = TempDir::new("mnt")?;
    let mut guard = mount_volume(server, work, &mnt.0, first)?;
    let f = File::open(&l.path).map_err(|e| io_err(&l.path, e))?;
    let diff_id = apply_layer(&mnt.0, &mut BufReader::new(f))?;
    if diff_id != l.diff_id {
        return Err(err(format!(
            "layer {}: uncompressed digest sha256:{} does not match its diff_id sha256:{}",
            l.path.display(),
            hex(&diff_id),
            hex(&l.diff_id)
        )));
    }
    guard.0 = None;
    crate::export::umount(&mnt.0).map_err(export_err)?;
    Ok(())
}

/// Images in the pool: read-only volumes that are snapshots of a layer
/// volume with the same chain digest, with their layers base first.
pub fn list_images(pool: &mut Pool) -> Result<Vec<ImageInfo>> {
    let recs: Vec<_> = pool.records().cloned().collect();
    let by_id = |id: u64| recs.iter().find(|r| r.id == id);
    let mut out = Vec::new();
    for r in &recs {
        if r.name.starts_with(LAYER_PREFIX) || !r.read_only {
            continue;
        }
        let Some(top) = by_id(r.parent_id) else {
            continue;
        };
        if !top.name.starts_with(LAYER_PREFIX) || top.chain_digest != r.chain_digest {
            continue;
        }
        let mut layers = vec![top.name.clone()];
        let mut cur = top;
        while let Some(p) = by_id(cur.parent_id) {
            if !p.name.starts_with(LAYER_PREFIX) {
                break;
            }
            layers.push(p.name.clone());
            cur = p;
        }
        layers.reverse();
        out.push(ImageInfo {
            name: r.name.clone(),
            virtual_size: r.size,
            layers,
            chain_digest: super::digest_hex(&r.chain_digest),
        });
    }
    Ok(out)
}
