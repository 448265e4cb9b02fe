//! Helpers the benches share.
#![allow(dead_code)] // each bench uses a part

use std::io::Write;
use std::time::Duration;

use criterion::Criterion;

/// Writes `len` bytes (a whole number of MiB) of xorshift output: data that
/// neither compresses nor repeats, made without a crate or a data file.
pub fn write_pseudo_random(out: &mut impl Write, len: u64, seed: u64) {
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..len / block.len() as u64 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
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
