//! The crash harness at 4 KiB blocks. The harness itself (what it checks,
//! and why) is in `crash/harness.rs`; `crash_64k.rs` runs it at the default
//! block size.

const BS: u64 = 4096;
const POOL_SIZE: u64 = 24 << 20;
const SEEDS: u64 = 6;
/// Workloads and injected failures with the intent log on.
const LOG_SEEDS: u64 = 6;
const LOG_FAILURES: u64 = 30;

#[path = "crash/harness.rs"]
mod harness;
