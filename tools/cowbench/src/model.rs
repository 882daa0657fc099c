//! Result types written to JSON, and the statistics over repeated runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Median, min and max over the runs of one figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub unit: String,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn from_samples(samples: &[f64], unit: &str) -> Option<Stat> {
        if samples.is_empty() {
            return None;
        }
        let mut s = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: s[0],
            max: s[n - 1],
            unit: unit.to_string(),
            samples: samples.to_vec(),
        })
    }
}

/// Samples collected for one backend, keyed by metric name.
#[derive(Debug, Default)]
pub struct Samples {
    pub map: BTreeMap<String, (String, Vec<f64>)>,
}

impl Samples {
    pub fn add(&mut self, key: &str, unit: &str, v: f64) {
        self.map
            .entry(key.to_string())
            .or_insert_with(|| (unit.to_string(), Vec::new()))
            .1
            .push(v);
    }

    pub fn stats(&self) -> BTreeMap<String, Stat> {
        self.map
            .iter()
            .filter_map(|(k, (u, v))| Stat::from_samples(v, u).map(|s| (k.clone(), s)))
            .collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Skipped,
    Failed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackendResult {
    pub name: String,
    pub status: Status,
    /// Why it was skipped or where it failed (partial figures are kept).
    pub reason: Option<String>,
    /// How this backend's space figures are measured.
    pub space_method: String,
    /// What "create" and "mount" mean for this backend.
    pub notes: Vec<String>,
    pub metrics: BTreeMap<String, Stat>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cores: usize,
    pub mem_gib: f64,
    pub kernel: String,
    pub workdir_fs: String,
    pub tools: BTreeMap<String, String>,
    pub overlay_metacopy: String,
    /// Time to fork+exec a trivial program: part of every CLI-driven figure.
    pub spawn_ms: f64,
    pub date: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    pub mode: String,
    pub runs: usize,
    pub big_file_bytes: u64,
    pub medium_files: usize,
    pub medium_file_bytes: u64,
    pub small_files: usize,
    pub many_containers: usize,
    pub volume_bytes: u64,
    pub block_size: u64,
    pub fio_runtime_s: u64,
    pub fio_first_write_ios: u64,
    pub fullcopy_many_cap: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub machine: Machine,
    pub config: Config,
    pub backends: Vec<BackendResult>,
    pub total_seconds: f64,
}
