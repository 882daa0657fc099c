//! `import` and `export` of raw disk images, sparse-aware both ways: zero
//! blocks of an image are never stored, and blocks of a volume that read as
//! zeros become holes in the exported file.

use std::fs::{self, File, OpenOptions};
use std::io::{self, ErrorKind, IsTerminal, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use thinpool::io::is_zero;
use thinpool::{Pool, VolumeId};

use super::data::fill;
use super::{open_unserved, ExportArgs, ImportArgs, CHUNK};

/// Commit a long import every so often, so its dirty metadata stays bounded.
const COMMIT_EVERY: u64 = 1 << 30;

pub(crate) fn import(a: ImportArgs) -> Result<()> {
    let mut src =
        File::open(&a.image).with_context(|| format!("cannot open image {}", a.image.display()))?;
    // Seeking to the end also sizes block devices, whose metadata length is 0.
    let size = src.seek(SeekFrom::End(0))?;
    src.seek(SeekFrom::Start(0))?;

    let mut pool = open_unserved(&a.pool, Some(&a.name))?;
    let id = pool.create_volume(&a.name, size)?;
    if let Err(e) = copy_in(&mut pool, id, &mut src, size) {
        // Leave no half-imported volume behind.
        return Err(match pool.remove_volume(&a.name) {
            Ok(()) => e,
            Err(e2) => anyhow!(
                "{e:#} (and removing the half-imported volume '{}' failed: {e2})",
                a.name
            ),
        });
    }
    Ok(())
}

fn copy_in(pool: &mut Pool, id: VolumeId, src: &mut File, size: u64) -> Result<()> {
    let bs = pool.block_size() as usize;
    let bar = progress(size, "import");
    let mut buf = vec![0u8; CHUNK];
    let (mut offset, mut uncommitted) = (0u64, 0u64);
    while offset < size {
        let want = (size - offset).min(CHUNK as u64) as usize;
        let n = fill(src, &mut buf[..want]).context("cannot read the image")?;
        if n < want {
            bail!(
                "the image shrank while being read (ended at byte {})",
                offset + n as u64
            );
        }
        for (start, end) in data_runs(&buf[..n], bs) {
            pool.write(id, offset + start as u64, &buf[start..end])?;
        }
        offset += n as u64;
        uncommitted += n as u64;
        if uncommitted >= COMMIT_EVERY {
            pool.commit()?;
            uncommitted = 0;
        }
        bar.set_position(offset);
    }
    pool.commit()?;
    Ok(())
}

pub(crate) fn export(a: ExportArgs) -> Result<()> {
    let mut pool = open_unserved(&a.pool, Some(&a.name))?;
    let id = pool.lookup(&a.name)?;
    let size = pool.volume_size(id)?;

    // `--force` truncates: never let that be the pool itself.
    if let (Ok(img), Ok(pf)) = (fs::metadata(&a.image), fs::metadata(&a.pool)) {
        if (img.dev(), img.ino()) == (pf.dev(), pf.ino()) {
            bail!(
                "{} is the pool file itself; export to another path",
                a.image.display()
            );
        }
    }
    let mut opts = OpenOptions::new();
    match a.force {
        true => opts.write(true).create(true).truncate(true),
        false => opts.write(true).create_new(true),
    };
    let out = opts.open(&a.image).map_err(|e| match e.kind() {
        ErrorKind::AlreadyExists => anyhow!(
            "{}: file already exists (use --force to overwrite it)",
            a.image.display()
        ),
        _ => anyhow!("{}: cannot create image: {e}", a.image.display()),
    })?;
    if let Err(e) = copy_out(&mut pool, id, &out, size) {
        // A partial image looks like a whole one: do not leave it around.
        if out.metadata().is_ok_and(|m| m.is_file()) {
            let _ = fs::remove_file(&a.image);
        }
        return Err(e.context(format!(
            "exporting '{}' to {} failed",
            a.name,
            a.image.display()
        )));
    }
    Ok(())
}

fn copy_out(pool: &mut Pool, id: VolumeId, out: &File, size: u64) -> Result<()> {
    let bs = pool.block_size() as usize;
    let bar = progress(size, "export");
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < size {
        let n = (size - offset).min(CHUNK as u64) as usize;
        pool.read(id, offset, &mut buf[..n])?;
        // Zero blocks are skipped: the file stays a hole there.
        for (start, end) in data_runs(&buf[..n], bs) {
            out.write_all_at(&buf[start..end], offset + start as u64)?;
        }
        offset += n as u64;
        bar.set_position(offset);
    }
    // Gives the file its full length even when it ends in a hole.
    out.set_len(size)?;
    out.sync_all()?;
    Ok(())
}

/// Byte ranges of `buf` made of consecutive `bs`-sized pieces that are not all
/// zeros (the last piece may be short), so each run is one I/O call.
fn data_runs(buf: &[u8], bs: usize) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, piece) in buf.chunks(bs).enumerate() {
        if is_zero(piece) {
            continue;
        }
        let (start, end) = (i * bs, i * bs + piece.len());
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// A byte progress bar on stderr, only when a person is watching it.
pub(crate) fn progress(len: u64, verb: &'static str) -> ProgressBar {
    if !io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len)
        .with_message(verb)
        .with_finish(ProgressFinish::AndClear);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_skip_zero_blocks_and_merge_neighbours() {
        let bs = 4;
        let mut b = vec![0u8; 22];
        b[1] = 1; // block 0
        b[5] = 1; // block 1
        b[13] = 1; // block 3
        b[21] = 1; // short last block 5
        assert_eq!(data_runs(&b, bs), vec![(0, 8), (12, 16), (20, 22)]);
        assert!(data_runs(&[0u8; 4096], 512).is_empty());
        assert!(is_zero(&[0u8; 1000]));
        let mut z = vec![0u8; 1000];
        z[999] = 7;
        assert!(!is_zero(&z));
    }
}
