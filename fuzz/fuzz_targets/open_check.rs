//! Open and check a mutated pool image: errors are fine, panics, hangs and
//! huge allocations are bugs. The corpus seeds are small valid pools
//! (`cargo fuzz run open_check` makes one itself when the corpus is empty).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use thinpool::io::MemStorage;
use thinpool::Pool;

/// The input is a pool image, or, when it starts with 0xff, a list of
/// (offset u16, xor u8) edits applied to a built-in valid pool, so the fuzzer
/// reaches deep metadata without having to discover checksums first.
fn image(data: &[u8]) -> Vec<u8> {
    if data.first() != Some(&0xff) {
        return data.to_vec();
    }
    static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let mut img = BASE
        .get_or_init(|| {
            let m = MemStorage::new();
            let opts = thinpool::CreateOptions { size: 4 << 20, block_size: 4096 };
            let mut p = Pool::create_with(Box::new(m.clone()), Path::new("fuzz"), &opts).unwrap();
            let v = p.create_volume("v", 3 << 20).unwrap();
            p.write(v, 4096, &[7; 10000]).unwrap();
            p.snapshot("v", "s", false).unwrap();
            p.write(v, 0, b"after").unwrap();
            p.close().unwrap();
            m.snapshot()
        })
        .clone();
    for e in data[1..].chunks_exact(3) {
        let at = u16::from_le_bytes([e[0], e[1]]) as usize * 4 % img.len();
        img[at] ^= e[2];
    }
    img
}

fuzz_target!(|data: &[u8]| {
    let m = MemStorage::from_bytes(image(data));
    let Ok(mut p) = Pool::open_with(Box::new(m), Path::new("fuzz")) else { return };
    let _ = p.check();
    if let Ok(vols) = p.list() {
        for v in vols {
            let mut buf = vec![0u8; v.virtual_size.min(1 << 22) as usize];
            let _ = p.read(v.id, 0, &mut buf);
        }
    }
    let _ = p.write(1, 0, b"x");
    let _ = p.commit();
});
