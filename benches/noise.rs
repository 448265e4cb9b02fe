//! Sealing and opening one 32 KiB chunk frame with the network's Noise
//! transport (AES-256-GCM via ring), in bytes per second: the cost a keyed
//! network adds per chunk on each side.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use shoal::net::noise::{self, Handshake, Identity, Keys, NetworkKey, Step, Transport};

fn pair() -> (Box<Transport>, Box<Transport>) {
    let keys = |id| Keys {
        network: NetworkKey::from_bytes([9; 32]),
        identity: id,
    };
    let a = keys(Identity::generate().expect("randomness"));
    let b = keys(Identity::generate().expect("randomness"));
    let (mut to_b, mut to_a) = (Vec::new(), Vec::new());
    let mut ia = Some(Box::new(
        Handshake::initiator(&a, &mut to_b).expect("initiator"),
    ));
    let mut rb = Some(Box::new(Handshake::responder(&b).expect("responder")));
    let (mut ta, mut tb) = (None, None);
    while ta.is_none() || tb.is_none() {
        if let Some(h) = rb.take() {
            let (step, h) = h.feed(&to_b, &mut to_a).expect("handshake");
            if let Step::Done { used, transport } = step {
                to_b.drain(..used);
                tb = Some(transport);
            } else if let Step::More { used } = step {
                to_b.drain(..used);
            }
            rb = h;
        }
        if let Some(h) = ia.take() {
            let (step, h) = h.feed(&to_a, &mut to_b).expect("handshake");
            if let Step::Done { used, transport } = step {
                to_a.drain(..used);
                ta = Some(transport);
            } else if let Step::More { used } = step {
                to_a.drain(..used);
            }
            ia = h;
        }
    }
    (ta.expect("done"), tb.expect("done"))
}

fn seal_open(c: &mut Criterion) {
    let (mut tx, _) = pair();
    let chunk = vec![0x5au8; 32 << 10];
    let mut wire = Vec::with_capacity(64 << 10);
    let mut plain = vec![0u8; noise::MAX_MESSAGE];
    let mut group = c.benchmark_group("noise");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.bench_function("seal_32KiB", |b| {
        b.iter(|| {
            wire.clear();
            tx.seal(black_box(&chunk), &mut wire);
            black_box(wire.len())
        })
    });
    // A fresh pair: the seal-only run moved the sender's nonce on alone.
    let (mut tx, mut rx) = pair();
    group.bench_function("seal_and_open_32KiB", |b| {
        b.iter(|| {
            wire.clear();
            tx.seal(black_box(&chunk), &mut wire);
            let n = rx.open(&wire, &mut plain).expect("opens");
            black_box(n)
        })
    });
    group.finish();
}

criterion_group!(benches, seal_open);
criterion_main!(benches);
