//! BLAKE3 speed as shoal uses it: one chunk at a time (every chunk a peer
//! receives is hashed before it is written), and a whole file as a peer
//! indexes its folder (read at offsets into one reused buffer, then hashed).

use std::hint::black_box;
use std::time::Duration;

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal::store::{hash_chunk, hash_file};

const FILE_SIZE: u64 = 64 << 20;

fn chunks(c: &mut Criterion) {
    let mut group = c.benchmark_group("hash_chunk");
    for (label, len) in [("256KiB", 256usize << 10), ("1MiB", 1 << 20)] {
        let data: Vec<u8> = (0..len).map(|i| (i.wrapping_mul(131) >> 5) as u8).collect();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function(label, |b| b.iter(|| hash_chunk(black_box(&data))));
    }
    group.finish();
}

fn whole_file(c: &mut Criterion) {
    let mut file = tempfile::tempfile().expect("create a temp file");
    common::write_pseudo_random(&mut file, FILE_SIZE, 0x9e37_79b9_7f4a_7c15);
    // One pass first, so the measured ones read from a warm page cache.
    hash_file(&file, FILE_SIZE).expect("hash the temp file");

    let mut group = c.benchmark_group("hash_file");
    group.throughput(Throughput::Bytes(FILE_SIZE));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("64MiB", |b| {
        b.iter(|| hash_file(black_box(&file), FILE_SIZE).expect("hash the temp file"))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::short_config();
    targets = chunks, whole_file
}
criterion_main!(benches);
