//! The `receive` stream parser. An input starting with 0 is a stream as is;
//! any other is turned by `thinpool::forge::stream` into a stream whose
//! header, record and trailer checksums are all valid (records, bounds,
//! order and counts chosen by the input), so the checks behind the
//! checksums are reached. Received into a copy of a real pool with base
//! layers; errors are fine, panics and hangs are bugs, and a refused stream
//! must leave the pool checking clean.
#![no_main]

use libfuzzer_sys::fuzz_target;
use thinpool::forge;

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((0, raw)) => forge::receive(raw),
        _ => forge::receive(&forge::stream(data)),
    }
});
