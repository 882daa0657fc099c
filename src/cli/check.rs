//! `check`: verify every invariant of a pool (like thin_check), reading
//! metadata only.

use std::fmt::Write;

use anyhow::{bail, Result};

use super::{open_unserved, print, CheckArgs};

pub(crate) fn check(a: CheckArgs) -> Result<()> {
    // The checker walks the whole pool, so it needs the file to itself.
    let mut pool = open_unserved(&a.pool, None)?;
    let r = pool.check()?;
    let mut out = String::new();
    if a.json {
        out = serde_json::to_string_pretty(&r)? + "\n";
    } else {
        for p in &r.problems {
            writeln!(out, "problem: {p}")?;
        }
        writeln!(
            out,
            "{}: {} (generation {}, {} volumes, {} map nodes, {} data blocks, {} metadata blocks)",
            a.pool.display(),
            if r.is_clean() { "clean" } else { "DAMAGED" },
            r.generation,
            r.volumes,
            r.map_nodes,
            r.data_blocks,
            r.metadata_blocks
        )?;
    }
    print(&out)?;
    if !r.is_clean() {
        bail!(
            "pool {} has {} problem(s)",
            a.pool.display(),
            r.problems.len()
        );
    }
    Ok(())
}
