//! Feeds arbitrary bytes to `shoal::wire::decode` as a stream of frames.
//! Decoding must never panic, `consumed` must stay within the input, and
//! every decoded message must re-encode to bytes that decode to itself.
//!
//! Run with `cargo +nightly fuzz run decode` from the repository root.

#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal::wire::{HEADER_LEN, decode, encode};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    let mut out = Vec::new();
    while let Ok(Some((msg, consumed))) = decode(buf) {
        assert!(consumed >= HEADER_LEN && consumed <= buf.len());
        out.clear();
        encode(&msg, &mut out);
        assert_eq!(decode(&out), Ok(Some((msg, out.len()))));
        buf = &buf[consumed..];
    }
});
