//! `check` and `repair`: verify every invariant of a pool (like thin_check),
//! and fix what can be fixed without guessing data (like thin_repair).
//!
//! Exit codes (both verbs): 0 clean, 1 problems found (or left unfixed),
//! 2 the pool could not be read at all.

use std::fmt::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use thinpool::check::CheckReport;
use thinpool::control::{Request, Response};

use super::{open_unserved, print, CheckArgs};

#[derive(Args, Debug)]
pub(crate) struct RepairArgs {
    /// Pool file (not while it is being served)
    pub pool: PathBuf,
    /// Print the repair report as JSON
    #[arg(long)]
    pub json: bool,
}

/// Could not read the pool: one line on stderr, exit 2.
fn unreadable(what: impl std::fmt::Display) -> ! {
    eprintln!("thinpool: {what}");
    std::process::exit(2)
}

pub(crate) fn check(a: CheckArgs) -> Result<()> {
    let r = match thinpool::export::control::request(&a.pool, &Request::Check) {
        // A served pool is checked by its server, which owns the file.
        Some(Ok(Response::Check(r))) => r,
        // A server that does not run checks: say where the pool is instead.
        Some(Ok(other)) => match open_unserved(&a.pool, None) {
            // Like every verb refused on a served pool: exit 1.
            Err(e) => return Err(e.context(format!("the server answered {other:?} to a check"))),
            Ok(_) => unreadable(format!("unexpected answer from the server: {other:?}")),
        },
        Some(Err(e)) => unreadable(format!("{}: {e}", a.pool.display())),
        None => check_local(&a).unwrap_or_else(|e| unreadable(format!("{e:#}"))),
    };
    let mut out = String::new();
    if a.json {
        out = serde_json::to_string_pretty(&r)? + "\n";
    } else {
        for p in &r.problems {
            writeln!(out, "problem: {p}")?;
        }
        for n in &r.notes {
            writeln!(out, "note: {n}")?;
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
        if !a.json {
            eprintln!(
                "thinpool: pool {} has {} problem(s); `thinpool repair` fixes refcount problems",
                a.pool.display(),
                r.problems.len()
            );
        }
        std::process::exit(1);
    }
    Ok(())
}

fn check_local(a: &CheckArgs) -> Result<CheckReport> {
    // Inspection only: share the lock with `info` and `list`.
    let mut pool = super::open_pool_with(&a.pool, thinpool::Pool::open_read_only)?;
    // A bar on a terminal, for pools with many volumes (hidden otherwise).
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("checking {bar:30} {pos}/{len} volumes")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let r = pool.check_with_progress(&mut |done, total| {
        if total >= 64 {
            bar.set_length(total);
            bar.set_position(done);
        }
    });
    bar.finish_and_clear();
    Ok(r?)
}

pub(crate) fn repair(a: RepairArgs) -> Result<()> {
    if let Some(server) = thinpool::export::control::status(&a.pool) {
        let who = server
            .map(|s| format!("pid {}", s.pid))
            .unwrap_or_else(|e| e.to_string());
        unreadable(format!(
            "pool {} is being served ({who}); stop the server before repairing it",
            a.pool.display()
        ));
    }
    let r = thinpool::repair::repair(&a.pool)
        .unwrap_or_else(|e| unreadable(format!("{}: {e}", a.pool.display())));
    let mut out = String::new();
    if a.json {
        out = serde_json::to_string_pretty(&r)? + "\n";
    } else {
        if let Some(b) = &r.backup {
            writeln!(out, "backup of the metadata changed: {}", b.display())?;
        }
        for f in &r.fixed {
            writeln!(out, "fixed: {f}")?;
        }
        for u in &r.unfixed {
            writeln!(out, "not fixed: {u}")?;
        }
        let state = match (r.fixed.is_empty(), r.is_clean()) {
            (true, true) => "clean, nothing to repair",
            (false, true) => "repaired, now clean",
            _ => "still DAMAGED",
        };
        writeln!(
            out,
            "{}: {state} (generation {} -> {})",
            a.pool.display(),
            r.generation,
            r.new_generation
        )?;
    }
    print(&out)?;
    if !r.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}
