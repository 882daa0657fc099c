//! The model test (`model/harness.rs`) at the default 64 KiB block size.

const BS: u64 = 64 * 1024;
const POOL_SIZE: u64 = 256 << 20;
const GROW_BLOCKS: u64 = 100;
const CASES: u32 = 96;

#[path = "model/harness.rs"]
mod harness;
