//! Any bytes as a pool image: open it and run every verb. Errors are fine;
//! panics, hangs and huge allocations are bugs. Random bytes rarely get past
//! the superblock checksum: `forged_pool` is the target that goes deep.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    thinpool::forge::exercise(data.to_vec());
});
