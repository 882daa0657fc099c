//! Structure-aware: the input is a list of field changes (superblock,
//! volume records, map node entries and headers, refcounts, index entries)
//! applied to a real pool by `thinpool::forge::mutate`, which re-seals every
//! page it touches, so each input is a checksum-valid pool that lies. Every
//! verb runs on it (`forge::exercise`): errors are fine; panics, hangs and
//! huge allocations are bugs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinpool::forge;

fuzz_target!(|data: &[u8]| {
    forge::exercise(forge::mutate(forge::sample_pool(), data));
});
