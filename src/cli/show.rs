//! Human-readable output: the `info` summary, the `list` table, ages.
//! Pure functions of the library's structs, so they are unit-tested here.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use thinpool::pool::LogInfo;
use thinpool::size::format_size;
use thinpool::{PoolInfo, VolumeInfo};

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

pub(crate) fn pool_info(i: &PoolInfo) -> String {
    let data = i.data_used_bytes + i.data_free_bytes;
    let free_pct = pct(i.data_free_bytes, data);
    let rows = [
        ("pool", i.path.display().to_string()),
        ("uuid", i.uuid.clone()),
        (
            "format",
            format!("version {}, generation {}", i.format_version, i.generation),
        ),
        ("block size", format_size(i.block_size as u64)),
        (
            "size",
            format!(
                "{} ({} blocks, sparse)",
                format_size(i.size),
                i.total_blocks
            ),
        ),
        (
            "data used",
            format!(
                "{} ({:.1}%)",
                format_size(i.data_used_bytes),
                pct(i.data_used_bytes, data)
            ),
        ),
        (
            "data free",
            format!("{} ({free_pct:.1}%)", format_size(i.data_free_bytes)),
        ),
        (
            "metadata",
            format!(
                "{} ({:.1}%)",
                format_size(i.metadata_used_bytes),
                pct(i.metadata_used_bytes, i.size)
            ),
        ),
        ("volumes", volumes_row(i)),
    ];
    let mut rows = Vec::from(rows);
    if let Some(l) = &i.log {
        rows.push(("intent log", log_row(l)));
    }
    if let Some(d) = i.direct_io {
        rows.push(("direct I/O", if d { "yes" } else { "no" }.into()));
    }
    let mut out = String::new();
    for (k, v) in rows {
        let _ = writeln!(out, "{:<11} {v}", format!("{k}:"));
    }
    if i.low_space {
        let _ = writeln!(
            out,
            "warning: only {free_pct:.1}% of the pool is free (low-water mark {}%); remove \
             volumes, discard data or grow the pool (`thinpool resize POOL --size`) before \
             writes fail",
            i.low_water_pct
        );
    }
    out
}

/// "512K at block 2 (2 halves of 4096 records); 3 since the last commit
/// (0.1% of a half), logging": where the log is, and how near the write
/// path is to the commit a full half forces.
fn log_row(l: &LogInfo) -> String {
    let mut row = format!(
        "{} at block {} (2 halves of {} records); {} since the last commit ({:.1}% of a half)",
        format_size(l.bytes),
        l.start_block,
        l.records_per_half,
        l.pending_records,
        pct(l.pending_records, l.records_per_half as u64)
    );
    if l.logging {
        row.push_str(", logging");
    }
    row
}

/// "3", or "3 (1 preallocated, 10.0 GiB)".
fn volumes_row(i: &PoolInfo) -> String {
    match i.preallocated_volumes {
        0 => i.volumes.to_string(),
        n => format!(
            "{} ({n} preallocated, {})",
            i.volumes,
            format_size(i.preallocated_bytes)
        ),
    }
}

/// The short form of a digest, as `docker images` shows an id.
pub(crate) fn short(d: &str) -> &str {
    &d[..d.len().min(12)]
}

/// `docker ps -s` / `zfs list` style: one row per volume, sizes readable.
pub(crate) fn volume_table(vols: &[VolumeInfo], now: u64) -> String {
    const HEAD: [&str; 7] = [
        "NAME",
        "PARENT",
        "RO",
        "VSIZE",
        "MAPPED",
        "EXCLUSIVE",
        "CREATED",
    ];
    // Text columns align left, sizes right.
    const RIGHT: [bool; 7] = [false, false, false, true, true, true, false];
    let rows: Vec<[String; 7]> = vols
        .iter()
        .map(|v| {
            [
                v.name.clone(),
                v.parent.clone().unwrap_or_else(|| "-".into()),
                if v.read_only { "yes" } else { "no" }.into(),
                format_size(v.virtual_size),
                format_size(v.mapped_bytes),
                format_size(v.exclusive_bytes),
                ago(now.saturating_sub(v.created)),
            ]
        })
        .collect();
    let mut width = HEAD.map(str::len);
    for r in &rows {
        for (w, cell) in width.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let head = HEAD.map(String::from);
    // Committed layers: a short chain digest (full ones in `list --json`).
    let chain_col = vols.iter().any(|v| v.chain_digest.is_some());
    // Preallocated volumes: a PREALLOC column, only when there are any.
    let prealloc_col = vols.iter().any(|v| v.preallocated);
    for (n, r) in std::iter::once(&head).chain(&rows).enumerate() {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            let w = width[i];
            let _ = match RIGHT[i] {
                true => write!(line, "{cell:>w$}  "),
                false => write!(line, "{cell:<w$}  "),
            };
        }
        if prealloc_col {
            let cell = match n {
                0 => "PREALLOC",
                _ if vols[n - 1].preallocated => "yes",
                _ => "no",
            };
            let _ = write!(line, "{cell:<8}  ");
        }
        if chain_col {
            let chain = match n {
                0 => Some("CHAIN"),
                _ => vols[n - 1].chain_digest.as_deref().map(short),
            };
            line.push_str(chain.unwrap_or("-"));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// "3 minutes ago", like `docker ps`: no calendar or time zone needed.
pub(crate) fn ago(secs: u64) -> String {
    const UNITS: [(u64, &str); 6] = [
        (365 * 86400, "year"),
        (30 * 86400, "month"),
        (7 * 86400, "week"),
        (86400, "day"),
        (3600, "hour"),
        (60, "minute"),
    ];
    if secs < 60 {
        return if secs < 2 {
            "just now".into()
        } else {
            format!("{secs} seconds ago")
        };
    }
    let (unit, name) = UNITS
        .iter()
        .copied()
        .find(|(u, _)| secs >= *u)
        .unwrap_or((60, "minute"));
    match secs / unit {
        1 => format!("1 {name} ago"),
        n => format!("{n} {name}s ago"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(name: &str, parent: Option<&str>, ro: bool) -> VolumeInfo {
        VolumeInfo {
            id: 1,
            name: name.into(),
            parent: parent.map(Into::into),
            parent_id: None,
            read_only: ro,
            preallocated: false,
            virtual_size: 10 << 30,
            mapped_bytes: 3 << 20,
            exclusive_bytes: 65536,
            created: 1000,
            diff_digest: None,
            chain_digest: None,
        }
    }

    #[test]
    fn table_aligns_columns() {
        let t = volume_table(
            &[vol("base", None, false), vol("layer-1", Some("base"), true)],
            1000 + 7200,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAME     PARENT  RO   VSIZE  MAPPED  EXCLUSIVE  CREATED"),
            "{t}"
        );
        assert!(
            lines[2] == "layer-1  base    yes    10G    3.0M        64K  2 hours ago",
            "{t}"
        );
        assert!(lines[1].contains(" -  "), "{t}");
    }

    #[test]
    fn preallocated_volumes_get_a_column() {
        let mut db = vol("db", None, false);
        db.preallocated = true;
        let t = volume_table(&[vol("base", None, false), db], 1000);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].ends_with("CREATED   PREALLOC"), "{t}");
        assert!(lines[1].ends_with("no"), "{t}");
        assert!(lines[2].ends_with("yes"), "{t}");
        // Without one, the table is as before.
        let t = volume_table(&[vol("base", None, false)], 1000);
        assert!(!t.contains("PREALLOC"), "{t}");
    }

    #[test]
    fn ages() {
        assert_eq!(ago(0), "just now");
        assert_eq!(ago(59), "59 seconds ago");
        assert_eq!(ago(60), "1 minute ago");
        assert_eq!(ago(3 * 3600 + 5), "3 hours ago");
        assert_eq!(ago(400 * 86400), "1 year ago");
    }

    #[test]
    fn info_warns_when_nearly_full() {
        let mut i = PoolInfo {
            path: "p".into(),
            uuid: "u".into(),
            format_version: 1,
            generation: 2,
            block_size: 65536,
            size: 1 << 30,
            total_blocks: 16384,
            data_used_bytes: 100 << 20,
            data_free_bytes: 900 << 20,
            metadata_used_bytes: 1 << 20,
            volumes: 2,
            preallocated_volumes: 0,
            preallocated_bytes: 0,
            direct_io: None,
            low_water_pct: 10,
            low_space: false,
            commits: None,
            log: None,
        };
        let s = pool_info(&i);
        assert!(s.contains("data used:  100M (10.0%)"), "{s}");
        assert!(s.contains("volumes:    2\n"), "{s}");
        i.preallocated_volumes = 1;
        i.preallocated_bytes = 1 << 30;
        assert!(
            pool_info(&i).contains("volumes:    2 (1 preallocated, 1.0G)"),
            "{}",
            pool_info(&i)
        );
        assert!(!s.contains("warning"), "{s}");
        i.data_used_bytes = 950 << 20;
        i.data_free_bytes = 50 << 20;
        i.low_space = true;
        assert!(
            pool_info(&i).contains("warning: only 5.0% of the pool is free (low-water mark 10%)")
        );
        assert!(
            !s.contains("intent log") && !s.contains("direct I/O"),
            "{s}"
        );
        i.log = Some(LogInfo {
            start_block: 2,
            blocks: 8,
            bytes: 512 << 10,
            records_per_half: 4096,
            pending_records: 41,
            logging: true,
        });
        i.direct_io = Some(true);
        let s = pool_info(&i);
        assert!(
            s.contains(
                "intent log: 512K at block 2 (2 halves of 4096 records); 41 since the last \
                 commit (1.0% of a half), logging\n"
            ),
            "{s}"
        );
        assert!(s.contains("direct I/O: yes\n"), "{s}");
    }
}
