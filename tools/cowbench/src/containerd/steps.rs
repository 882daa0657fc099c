//! Where thinpool's snapshotter spends its part of a pull or a container start:
//! the step timings it prints with `THINPOOL_SNAPSHOTTER_TRACE` set, e.g.
//! `thinpool snapshotter: prepare KEY: lock 0.0 ms, lookup 0.0 ms, clone+commit
//! 3.1 ms, attach 6.2 ms, total 9.3 ms`, as medians per kind of call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// The kind of call: `prepare (container)`, `prepare (layer)`, `commit
    /// (layer)`, `remove (container)`, `remove (layer)`.
    pub call: String,
    pub step: String,
    pub median_ms: f64,
    pub count: usize,
}

/// containerd's keys: a layer is unpacked into `NS/N/extract-...`, committed as
/// its chain ID `sha256:...`; a container's snapshot is keyed by its ID.
fn kind(call: &str, key: &str) -> String {
    let layer = key.contains("/extract-") || key.contains("sha256:");
    format!("{call} ({})", if layer { "layer" } else { "container" })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn parse(log: &str) -> Vec<Step> {
    // (call kind, step) -> times, steps in the order they appear.
    let mut times: BTreeMap<(String, usize, String), Vec<f64>> = BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.strip_prefix("thinpool snapshotter: ") else {
            continue;
        };
        let Some((call, rest)) = rest.split_once(' ') else {
            continue;
        };
        if !["prepare", "commit", "remove"].contains(&call) {
            continue;
        }
        let Some((key, steps)) = rest.rsplit_once(": ") else {
            continue;
        };
        let k = kind(call, key);
        for (i, s) in steps.split(", ").enumerate() {
            let Some((name, v)) = s.trim().rsplit_once(' ').and_then(|(a, unit)| {
                (unit == "ms").then_some(())?;
                let (name, v) = a.rsplit_once(' ')?;
                Some((name.to_string(), v.parse::<f64>().ok()?))
            }) else {
                continue;
            };
            times.entry((k.clone(), i, name)).or_default().push(v);
        }
    }
    times
        .into_iter()
        .map(|((call, _, step), mut v)| Step {
            call,
            step,
            count: v.len(),
            median_ms: median(&mut v),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trace_lines() {
        let log = "thinpool snapshotter: prepare ns/3/extract-1 sha256:ab: lock 0.0 ms, clone+commit 3.0 ms, total 3.0 ms\n\
                   thinpool snapshotter: prepare ns/4/c1: lock 0.1 ms, clone+commit 5.0 ms, total 5.1 ms\n\
                   thinpool snapshotter: prepare ns/5/c2: lock 0.1 ms, clone+commit 7.0 ms, total 7.1 ms\n\
                   thinpool snapshotter: formatted the ext4 template (10G)\n";
        let s = parse(log);
        let c: Vec<_> = s
            .iter()
            .filter(|s| s.call == "prepare (container)")
            .collect();
        assert_eq!(c.len(), 3);
        assert_eq!(c[1].step, "clone+commit");
        assert_eq!(c[1].median_ms, 7.0);
        assert_eq!(c[1].count, 2);
        assert!(s.iter().any(|s| s.call == "prepare (layer)"));
    }
}
