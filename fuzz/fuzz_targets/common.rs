#![allow(dead_code)] // each target uses a different part
//! Shared by the core fuzz targets: turns fuzz input into a sequence of ops.
//! Each op is one byte, some followed by arguments; a message op carries a
//! `u16` length and that many bytes, decoded with `shoal::wire::decode`, so
//! the cores only ever see what the network could deliver.

use std::time::Duration;

use shoal::wire::{Message, decode};

pub struct Ops<'a>(pub &'a [u8]);

pub enum Op<'a> {
    /// Open (or, if open, close) connection `n`; for single-connection
    /// cores: connect / disconnect.
    Toggle(u8),
    Msg(u8, Message<'a>),
    Advance(Duration),
    /// Fire the timer even if not due.
    Timeout,
    /// Core-specific extra op with an argument byte.
    Extra(u8, u8),
}

impl<'a> Ops<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    pub fn next_op(&mut self) -> Option<Op<'a>> {
        loop {
            let op = self.byte()?;
            let arg = self.byte().unwrap_or(0);
            return Some(match op % 5 {
                0 => Op::Toggle(arg),
                1 => {
                    let len = usize::from(self.byte()?) << 8 | usize::from(self.byte()?);
                    let len = len.min(self.0.len());
                    let (frame, rest) = self.0.split_at(len);
                    self.0 = rest;
                    match decode(frame) {
                        Ok(Some((msg, _))) => Op::Msg(arg, msg),
                        _ => continue,
                    }
                }
                2 => Op::Advance(Duration::from_millis(u64::from(arg) * u64::from(arg) * 4)),
                3 => Op::Timeout,
                _ => Op::Extra(op / 5, arg),
            });
        }
    }
}

/// The other side must be able to decode every frame a core sends.
pub fn assert_decodable(msg: &Message<'_>) {
    let mut out = Vec::new();
    shoal::wire::encode(msg, &mut out);
    assert!(
        matches!(decode(&out), Ok(Some((_, n))) if n == out.len()),
        "{msg:?}"
    );
}
