//! `read` and `write`: bytes at an offset, to stdout / from a file or stdin.

use std::fs::File;
use std::io::{self, Read, Write};

use anyhow::{Context, Result};

use super::{open_unserved, ReadArgs, WriteArgs, CHUNK};

pub(crate) fn write(a: WriteArgs) -> Result<()> {
    let mut pool = open_unserved(&a.pool, Some(&a.name))?;
    let id = pool.lookup(&a.name)?;
    let mut input: Box<dyn Read> = match &a.file {
        Some(path) => {
            let f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            // A file's length is known up front: refuse before writing anything
            // rather than after the chunks that still fit.
            let meta = f.metadata()?;
            let (len, size) = (meta.len(), pool.volume_size(id)?);
            if meta.is_file() && a.offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(thinpool::Error::OutOfRange {
                    volume: a.name,
                    offset: a.offset,
                    len,
                    size,
                }
                .into());
            }
            Box::new(f)
        }
        None => Box::new(io::stdin().lock()),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut offset = a.offset;
    loop {
        let n = fill(&mut input, &mut buf).context("cannot read the input")?;
        // An empty input still goes to the library once, so a read-only or
        // out-of-range target is reported even with nothing to write.
        if n > 0 || offset == a.offset {
            pool.write(id, offset, &buf[..n])?;
        }
        offset += n as u64;
        if n < buf.len() {
            break;
        }
    }
    pool.commit()?;
    Ok(())
}

pub(crate) fn read(a: ReadArgs) -> Result<()> {
    let mut pool = super::open_unserved_read_only(&a.pool, Some(&a.name))?;
    let id = pool.lookup(&a.name)?;
    let size = pool.volume_size(id)?;
    let length = a.length.unwrap_or(size.saturating_sub(a.offset));
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; CHUNK.min(usize::try_from(length).unwrap_or(CHUNK))];
    let (mut offset, end) = (a.offset, a.offset.saturating_add(length));
    // As with write, a zero-length read still asks the library to check the range.
    loop {
        let n = (end - offset).min(buf.len() as u64) as usize;
        pool.read(id, offset, &mut buf[..n])?;
        out.write_all(&buf[..n])?;
        offset += n as u64;
        if offset >= end {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

/// Read until `buf` is full or the input ends; returns the bytes read.
pub(crate) fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
