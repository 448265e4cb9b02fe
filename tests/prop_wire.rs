//! Property tests of `wire::decode`, the first code every network byte meets:
//! arbitrary bytes, mutated valid frames and frames split at every byte
//! boundary. Decoding must never panic, never claim more bytes than it was
//! given, and whatever it accepts must re-encode to a frame that decodes to
//! the same message.
//!
//! Case counts are small so CI stays fast; `decoder_long` (ignored by
//! default) runs the decoder for 10 million inputs:
//! `cargo test --release --test prop_wire -- --ignored decoder_long --nocapture`
//! (`SHOAL_FUZZ_ITERS` changes the count).

mod strategies;

use std::time::Instant;

use proptest::prelude::*;
use shoal::wire::{HEADER_LEN, MAX_REASON_LEN, Message, decode, encode};
use strategies::message;

/// Cases per property: small for CI; `SHOAL_PROP_CASES=100000` for a long run.
fn cases() -> u32 {
    std::env::var("SHOAL_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// Decodes `input` as a stream, checking every accepted frame; returns how
/// many frames decoded before the first error or "need more".
fn check_stream(input: &[u8]) -> usize {
    let mut buf = input;
    let mut frames = 0;
    let mut out = Vec::new();
    while let Ok(Some((msg, used))) = decode(buf) {
        assert!(
            used >= HEADER_LEN && used <= buf.len(),
            "consumed {used} of {}",
            buf.len()
        );
        check_reencodes(&msg, &mut out);
        buf = &buf[used..];
        frames += 1;
    }
    frames
}

/// A decoded message re-encodes to exactly one frame that decodes to itself,
/// and decoded text is already safe to print.
fn check_reencodes(msg: &Message<'_>, out: &mut Vec<u8>) {
    out.clear();
    encode(msg, out);
    assert_eq!(decode(out), Ok(Some((msg.clone(), out.len()))));
    if let Message::Error { reason, .. } = msg {
        assert!(reason.len() <= MAX_REASON_LEN);
        assert!(!shoal::text::needs_sanitizing(reason), "{reason:?}");
    }
}

fn encode_all(msgs: &[Message<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in msgs {
        encode(m, &mut out);
    }
    out
}

/// Reads `stream` the way a connection does when the bytes arrive in two
/// reads, the first ending at `split`: decode what is complete, keep the
/// rest, append the next read. Returns each decoded frame re-encoded.
fn read_in_two(stream: &[u8], split: usize) -> Vec<Vec<u8>> {
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for part in [&stream[..split], &stream[split..]] {
        buf.extend_from_slice(part);
        loop {
            let used = match decode(&buf).expect("valid frames decode") {
                None => break,
                Some((msg, used)) => {
                    let mut one = Vec::new();
                    encode(&msg, &mut one);
                    got.push(one);
                    used
                }
            };
            buf.drain(..used);
        }
    }
    assert!(buf.is_empty(), "{} bytes left over", buf.len());
    got
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_stream(&bytes);
    }

    /// Arbitrary bodies behind a header of every known kind, so the body
    /// parsers (not just the header check) see the garbage.
    #[test]
    fn arbitrary_bodies_of_every_kind_never_panic(
        kind in prop::sample::select(vec![
            0x01u8, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17,
            0x18, 0x19, 0x1a, 0x20, 0x21, 0x22, 0x23, 0x24,
        ]),
        body in prop::collection::vec(any::<u8>(), 0..400),
    ) {
        let mut frame = (1 + body.len() as u32).to_be_bytes().to_vec();
        frame.push(kind);
        frame.extend_from_slice(&body);
        check_stream(&frame);
    }

    #[test]
    fn valid_messages_round_trip(msg in message()) {
        let bytes = encode_all(std::slice::from_ref(&msg));
        let (back, used) = decode(&bytes).unwrap().unwrap();
        prop_assert_eq!(used, bytes.len());
        prop_assert_eq!(back, msg);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        msgs in prop::collection::vec(message(), 1..4),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let mut bytes = encode_all(&msgs);
        for (at, byte, op) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match op {
                0 => bytes[i] = byte,
                1 => bytes[i] ^= 1 << (byte % 8),
                2 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
        }
        check_stream(&bytes);
    }

    /// However the stream is cut into two reads, the same frames come out.
    #[test]
    fn frames_split_at_every_byte_boundary_decode_the_same(
        msgs in prop::collection::vec(message(), 1..4),
    ) {
        let stream = encode_all(&msgs);
        let whole: Vec<Vec<u8>> = msgs.iter().map(|m| encode_all(std::slice::from_ref(m))).collect();
        for split in 0..=stream.len() {
            prop_assert_eq!(&read_in_two(&stream, split), &whole, "split at {}", split);
        }
    }
}

/// A seeded generator, so the long run needs no proptest machinery per
/// input and any failure reprints its seed.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n.max(1))
    }
}

/// Valid frames of every kind to mutate, from the proptest strategy.
fn seed_corpus() -> Vec<Vec<u8>> {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = prop::collection::vec(message(), 1..4);
    (0..512)
        .map(|_| encode_all(&strategy.new_tree(&mut runner).unwrap().current()))
        .collect()
}

/// Runs the decoder on `iters` inputs: a third arbitrary bytes, the rest
/// valid frame sequences with 1–8 random edits. Returns how many frames
/// decoded.
fn run_decoder(iters: u64, seed: u64) -> u64 {
    let corpus = seed_corpus();
    let mut rng = Rng::new(seed);
    let mut input = Vec::with_capacity(4096);
    let mut frames = 0u64;
    for _ in 0..iters {
        input.clear();
        if rng.below(3) == 0 {
            let len = rng.below(300);
            input.extend((0..len).map(|_| rng.next() as u8));
        } else {
            input.extend_from_slice(&corpus[rng.below(corpus.len())]);
            for _ in 0..=rng.below(8) {
                if input.is_empty() {
                    break;
                }
                let i = rng.below(input.len());
                match rng.below(5) {
                    0 => input[i] = rng.next() as u8,
                    1 => input[i] ^= 1 << rng.below(8),
                    2 => input.truncate(i),
                    3 => input.insert(i, rng.next() as u8),
                    // A length field a little off, the classic parser bug.
                    _ => input[i] = input[i].wrapping_add(rng.below(3) as u8).wrapping_sub(1),
                }
            }
        }
        frames += check_stream(&input) as u64;
    }
    frames
}

#[test]
fn decoder_quick_run() {
    assert!(
        run_decoder(20_000, 7) > 0,
        "no input decoded: the corpus is broken"
    );
}

#[test]
#[ignore = "long run (10M inputs, about 10 s in release): --ignored decoder_long"]
fn decoder_long() {
    let iters = std::env::var("SHOAL_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000u64);
    let seed = std::env::var("SHOAL_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_0001u64);
    let start = Instant::now();
    let frames = run_decoder(iters, seed);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "decoder_long: {iters} inputs (seed {seed:#x}), {frames} frames accepted, \
         {secs:.1} s, {:.0} inputs/s",
        iters as f64 / secs
    );
}
