//! The model test at 4 KiB blocks (many blocks per volume, deep maps).
//! The test itself is in `model/harness.rs`; `model_64k.rs` runs it at the
//! default block size.

const BS: u64 = 4096;
const POOL_SIZE: u64 = 16 << 20;
const GROW_BLOCKS: u64 = 1200;
const CASES: u32 = 256;

#[path = "model/harness.rs"]
mod harness;
