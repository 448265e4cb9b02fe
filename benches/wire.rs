//! Wire codec speed: how fast a `Chunk` frame is built and parsed (bytes per
//! second of payload), and how many small control frames per second.
//!
//! Decoding a `Chunk` borrows its payload from the read buffer, so its cost
//! does not grow with the chunk: its "throughput" is header parsing only.
//! Encoding copies the payload once, which is what the two encode paths show:
//! `encode` (a whole `Message::Chunk`) and `encode_chunk_header` followed by
//! the payload, as the serving side does.

use std::hint::black_box;

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal::wire::{self, Hash, Message};

const SIZES: [(&str, usize); 2] = [("256KiB", 256 << 10), ("1MiB", 1 << 20)];

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect()
}

fn chunk_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire/chunk");
    for (label, len) in SIZES {
        let data = payload(len);
        group.throughput(Throughput::Bytes(len as u64));
        let mut out = Vec::with_capacity(len + 64);

        group.bench_function(format!("encode/{label}"), |b| {
            b.iter(|| {
                out.clear();
                let msg = Message::Chunk {
                    index: 7,
                    data: black_box(&data),
                };
                wire::encode(&msg, &mut out);
                black_box(out.len())
            })
        });

        group.bench_function(format!("encode_chunk_header/{label}"), |b| {
            b.iter(|| {
                out.clear();
                wire::encode_chunk_header(7, len as u32, &mut out);
                out.extend_from_slice(black_box(&data));
                black_box(out.len())
            })
        });

        let mut frame = Vec::new();
        wire::encode(
            &Message::Chunk {
                index: 7,
                data: &data,
            },
            &mut frame,
        );
        group.bench_function(format!("decode/{label}"), |b| {
            b.iter(|| match wire::decode(black_box(&frame)) {
                Ok(Some((Message::Chunk { index, data }, used))) => {
                    black_box((index, data.len(), used))
                }
                other => panic!("not a chunk frame: {other:?}"),
            })
        });
    }
    group.finish();
}

fn control_frames(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire/control");
    group.throughput(Throughput::Elements(1));
    let msg = Message::GetChunk {
        root: Hash([0xab; 32]),
        index: 4242,
    };
    let mut out = Vec::with_capacity(64);
    group.bench_function("encode/GetChunk", |b| {
        b.iter(|| {
            out.clear();
            wire::encode(black_box(&msg), &mut out);
            black_box(out.len())
        })
    });
    let mut frame = Vec::new();
    wire::encode(&msg, &mut frame);
    group.bench_function("decode/GetChunk", |b| {
        b.iter(|| match wire::decode(black_box(&frame)) {
            Ok(Some((m, used))) => black_box((m, used)),
            other => panic!("not a frame: {other:?}"),
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = common::short_config();
    targets = chunk_frames, control_frames
}
criterion_main!(benches);
