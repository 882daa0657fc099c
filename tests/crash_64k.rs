//! The crash harness (`crash/harness.rs`) at the default 64 KiB block size.

const BS: u64 = 64 * 1024;
const POOL_SIZE: u64 = 256 << 20;
const SEEDS: u64 = 6;
/// Workloads and injected failures with the intent log on.
const LOG_SEEDS: u64 = 2;
const LOG_FAILURES: u64 = 8;

#[path = "crash/harness.rs"]
mod harness;
