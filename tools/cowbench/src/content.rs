//! The image content every backend gets: one big file of random data, a set
//! of 1 MiB files and a tree of small files. Generated once per run.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::util::{check_interrupt, Rng};

/// Name of the big file inside the image (the one written into and chmod'ed).
pub const BIG: &str = "big.bin";

pub struct Sizes {
    pub big: u64,
    pub medium_count: usize,
    pub medium: u64,
    pub small_count: usize,
}

pub fn generate(dir: &Path, s: &Sizes) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut rng = Rng::new(0x7468_696e_706f_6f6c);
    let mut buf = vec![0u8; 4 << 20];
    let mut f = std::fs::File::create(dir.join(BIG))?;
    let mut left = s.big;
    while left > 0 {
        check_interrupt()?;
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_all()?;
    let med = dir.join("medium");
    std::fs::create_dir_all(&med)?;
    for i in 0..s.medium_count {
        check_interrupt()?;
        let n = s.medium as usize;
        let mut b = vec![0u8; n];
        rng.fill(&mut b);
        std::fs::write(med.join(format!("m{i:03}.bin")), &b)?;
    }
    let small = dir.join("small");
    let per_dir = 100;
    for i in 0..s.small_count {
        if i % per_dir == 0 {
            check_interrupt()?;
            std::fs::create_dir_all(small.join(format!("d{:03}", i / per_dir)))?;
        }
        // 64 B .. 8 KiB, like a tree of config files, scripts and headers.
        let len = 64 + (rng.next_u64() % 8128) as usize;
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        let p = small.join(format!("d{:03}/f{:05}.dat", i / per_dir, i));
        std::fs::write(&p, &b).with_context(|| format!("write {}", p.display()))?;
    }
    Ok(())
}
