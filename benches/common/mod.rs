//! Helpers the benches share.
#![allow(dead_code)] // each bench uses a part

use std::io::Write;
use std::time::Duration;

use criterion::Criterion;

/// Writes `len` bytes (a whole number of MiB) of seeded pseudo-random data:
/// it neither compresses nor repeats, and needs no data file.
pub fn write_pseudo_random(out: &mut impl Write, len: u64, seed: u64) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..len / block.len() as u64 {
        rng.fill(&mut block);
        out.write_all(&block).expect("write bench data");
    }
    out.flush().expect("flush bench data");
}

/// Shorter runs than criterion's default keep `cargo bench` brief; the
/// micro-benchmarks settle quickly.
pub fn short_config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}
