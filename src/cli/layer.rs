//! Layer verbs: commit, diff, send, receive, image import/list.
//! Thin wrappers over `thinpool::layer`; see docs/LAYERS.md.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use thinpool::layer::{self, image, stream, DiffSummary};
use thinpool::size::format_size;
use thinpool::Pool;

use super::size_arg;

/// Freeze a writable volume into a read-only, content-addressed layer.
#[derive(Args, Debug)]
pub(crate) struct CommitArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Writable volume or clone to freeze. Its parent (the layer it was cloned
    /// from) must be a committed layer; a volume without parent is a base layer
    pub name: String,
    /// Rename the committed layer to LAYER
    #[arg(long = "as", value_name = "LAYER")]
    pub as_name: Option<String>,
    /// Print the layer's digests as JSON
    #[arg(long)]
    pub json: bool,
}

/// The block ranges in which two volumes differ (like thin_delta).
#[derive(Args, Debug)]
pub(crate) struct DiffArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Volume to compare from
    pub a: String,
    /// Volume to compare to
    pub b: String,
    /// Print JSON (ranges, or the summary with --stat)
    #[arg(long)]
    pub json: bool,
    /// Print only a summary: ranges and blocks added, removed, changed
    #[arg(long)]
    pub stat: bool,
}

/// Write a layer as a send stream (full, or incremental with --from).
#[derive(Args, Debug)]
pub(crate) struct SendArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Layer (or any volume) to send
    pub name: String,
    /// Send only the changes against BASE, a committed layer the receiving
    /// pool has (zfs send -i)
    #[arg(long, value_name = "BASE")]
    pub from: Option<String>,
    /// Write the stream to FILE instead of stdout
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Read a send stream into a new read-only layer, verifying everything.
#[derive(Args, Debug)]
pub(crate) struct ReceiveArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Name of the new layer (default: the name it had on the sending side)
    pub name: Option<String>,
    /// Read the stream from FILE instead of stdin
    #[arg(short = 'i', long = "input", value_name = "FILE")]
    pub input: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub(crate) enum ImageCommand {
    /// Import an OCI image layout directory or a `docker save` tarball as a
    /// chain of layers; layers the pool already has are reused
    Import(ImageImportArgs),
    /// List imported images and their layers
    #[command(visible_alias = "ls")]
    List(ImageListArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ImageImportArgs {
    /// Pool file
    pub pool: PathBuf,
    /// OCI image layout directory, or a tarball from `docker save`
    pub source: PathBuf,
    /// Name of the image: a read-only snapshot of its top layer. Start a
    /// container with `thinpool clone POOL NAME CONTAINER`
    #[arg(long)]
    pub name: String,
    /// Virtual size of the image's filesystem (ext4), e.g. 1G
    #[arg(long, value_parser = size_arg, default_value = "1G")]
    pub size: u64,
}

#[derive(Args, Debug)]
pub(crate) struct ImageListArgs {
    /// Pool file
    pub pool: PathBuf,
    /// Print JSON
    #[arg(long)]
    pub json: bool,
}

/// Layer verbs move data, so they open the pool file themselves.
fn open(pool: &Path) -> Result<Pool> {
    super::open_unserved(pool, None)
}

/// `println!` that ends quietly on a closed pipe (see `super::print`).
macro_rules! out {
    ($($t:tt)*) => {
        super::print(&format!("{}\n", format_args!($($t)*)))?
    };
}

fn progress_bar(len: Option<u64>, what: &str) -> Option<ProgressBar> {
    if !io::stderr().is_terminal() {
        return None;
    }
    let pb = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let tmpl = match len {
        Some(_) => "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        None => "{msg} {spinner} {bytes} {bytes_per_sec}",
    };
    if let Ok(s) = ProgressStyle::with_template(tmpl) {
        pb.set_style(s.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    Some(pb)
}

pub(crate) fn commit(a: CommitArgs) -> Result<()> {
    let mut p = open(&a.pool)?;
    let info = layer::commit(&mut p, &a.name, a.as_name.as_deref())?;
    p.close()?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        out!(
            "committed {}{}: diff sha256:{} chain sha256:{} ({} changed)",
            info.name,
            info.parent
                .as_ref()
                .map(|p| format!(" on {p}"))
                .unwrap_or_default(),
            info.diff_digest,
            info.chain_digest,
            format_size(info.changed_bytes)
        );
    }
    Ok(())
}

pub(crate) fn diff(a: DiffArgs) -> Result<()> {
    let mut p = open(&a.pool)?;
    let ranges = layer::diff_volumes(&mut p, &a.a, &a.b)?;
    let bs = p.block_size() as u64;
    let sum = DiffSummary::of(&ranges);
    match (a.json, a.stat) {
        (true, true) => out!("{}", serde_json::to_string_pretty(&sum)?),
        (true, false) => out!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "block_size": bs, "ranges": ranges })
            )?
        ),
        (false, stat) => {
            let mut out = io::stdout().lock();
            if !stat {
                for r in &ranges {
                    let kind = format!("{:?}", r.kind).to_lowercase();
                    writeln!(
                        out,
                        "{kind:<8} blocks {}..{}  bytes {}..{}  ({})",
                        r.block,
                        r.block + r.blocks,
                        r.block * bs,
                        (r.block + r.blocks) * bs,
                        format_size(r.blocks * bs)
                    )?;
                }
            }
            writeln!(
                out,
                "{} ranges, {} blocks ({}) differ: {} added, {} removed, {} changed",
                sum.ranges,
                sum.total_blocks(),
                format_size(sum.total_blocks() * bs),
                sum.added_blocks,
                sum.removed_blocks,
                sum.changed_blocks
            )?;
        }
    }
    Ok(())
}

pub(crate) fn send(a: SendArgs) -> Result<()> {
    if a.output.is_none() && io::stdout().is_terminal() {
        bail!("refusing to write a binary stream to a terminal; use -o FILE or redirect stdout");
    }
    let mut p = open(&a.pool)?;
    let pb = progress_bar(None, &format!("send {}", a.name));
    let mut tick = |n: u64| {
        if let Some(pb) = &pb {
            pb.inc(n);
        }
    };
    let rep = match &a.output {
        Some(path) => {
            let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
            // A partial stream in a regular file is removed on failure; a
            // device (`-o /dev/null`) or a pipe never is.
            let ours = f.metadata().is_ok_and(|m| m.is_file());
            let mut w = BufWriter::new(f);
            let r = stream::send(&mut p, &a.name, a.from.as_deref(), &mut w, &mut tick)
                .and_then(|r| w.flush().map(|_| r).map_err(Into::into));
            if r.is_err() && ours {
                let _ = fs::remove_file(path);
            }
            r?
        }
        None => {
            let mut w = BufWriter::new(io::stdout().lock());
            let r = stream::send(&mut p, &a.name, a.from.as_deref(), &mut w, &mut tick)?;
            w.flush()?;
            r
        }
    };
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    eprintln!(
        "sent {}{}: {} ranges, {} of data, {} zeroed, stream {} (sha256:{})",
        rep.name,
        rep.base
            .as_ref()
            .map(|b| format!(" from {b}"))
            .unwrap_or_default(),
        rep.ranges,
        format_size(rep.data_bytes),
        format_size(rep.zero_bytes),
        format_size(rep.stream_bytes),
        super::show::short(&rep.stream_digest)
    );
    Ok(())
}

pub(crate) fn receive(a: ReceiveArgs) -> Result<()> {
    let mut p = open(&a.pool)?;
    let (mut input, len): (Box<dyn Read>, Option<u64>) = match &a.input {
        Some(path) => {
            let f = File::open(path).with_context(|| format!("open {}", path.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            (Box::new(BufReader::new(f)), len)
        }
        None => (Box::new(BufReader::new(io::stdin().lock())), None),
    };
    let pb = progress_bar(len, "receive");
    let mut tick = |n: u64| {
        if let Some(pb) = &pb {
            pb.inc(n);
        }
    };
    let rep = stream::receive(&mut p, a.name.as_deref(), &mut input, &mut tick);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let rep = rep.context("receive refused; nothing was stored")?;
    p.close()?;
    if rep.stored {
        eprintln!(
            "received {}{}: {} ranges, {} of data; chain sha256:{}",
            rep.name,
            rep.base
                .as_ref()
                .map(|b| format!(" on {b}"))
                .unwrap_or_default(),
            rep.ranges,
            format_size(rep.data_bytes),
            rep.chain_digest
        );
    } else {
        eprintln!(
            "layer sha256:{} is already in the pool as {}; nothing stored",
            rep.chain_digest, rep.name
        );
    }
    Ok(())
}

pub(crate) fn image(c: ImageCommand) -> Result<()> {
    match c {
        ImageCommand::Import(a) => image_import(a),
        ImageCommand::List(a) => image_list(a),
    }
}

fn image_import(a: ImageImportArgs) -> Result<()> {
    drop(open(&a.pool)?);
    let opts = image::ImportOptions { size: a.size };
    let rep = image::import(&a.pool, &a.source, &a.name, &opts, &mut |line| {
        eprintln!("{line}")
    })
    .with_context(|| format!("import {}", a.source.display()))?;
    let new = rep.layers.iter().filter(|l| l.imported).count();
    out!(
        "imported {} as {}: {} layers ({} new, {} reused)",
        a.source.display(),
        rep.name,
        rep.layers.len(),
        new,
        rep.layers.len() - new
    );
    Ok(())
}

fn image_list(a: ImageListArgs) -> Result<()> {
    let mut p = open(&a.pool)?;
    let images = image::list_images(&mut p)?;
    if a.json {
        out!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    out!("{:<24} {:>8} {:>7}  CHAIN", "IMAGE", "VSIZE", "LAYERS");
    for i in &images {
        out!(
            "{:<24} {:>8} {:>7}  {}",
            i.name,
            format_size(i.virtual_size),
            i.layers.len(),
            i.chain_digest
                .as_deref()
                .map(super::show::short)
                .unwrap_or("-")
        );
        for l in &i.layers {
            out!("  {l}");
        }
    }
    Ok(())
}
