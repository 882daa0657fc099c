//! Reading one metadata page: bounds, checksum, type, and the rule that a
//! page written after the commit being read is not part of it.

use crate::error::{Error, Result};
use crate::format::{decode_page, PageHeader, PageType};
use crate::io::Storage;

/// Read and validate one metadata page.
pub fn read_page(
    storage: &dyn Storage,
    buf: &mut [u8],
    loc: u64,
    kind: PageType,
    total: u64,
    max_generation: u64,
) -> Result<PageHeader> {
    if loc == 0 || loc >= total {
        return Err(Error::corrupt(format!(
            "{} pointer {loc} is out of range",
            kind.name()
        )));
    }
    crate::io::read_pointed(storage, buf, loc * buf.len() as u64, || {
        format!("{} at block {loc}", kind.name())
    })?;
    let h = decode_page(buf, kind, loc).map_err(Error::Corrupt)?;
    // A valid page from a later, unfinished commit can sit where an older
    // commit's page was (freed pages are reused): it is not this commit's.
    if h.generation > max_generation {
        return Err(Error::corrupt(format!(
            "{} at block {loc} was written by generation {}, after the commit being read ({max_generation})",
            kind.name(),
            h.generation
        )));
    }
    Ok(h)
}
