//! A bounds-checked reader over one frame body. Every accessor checks the
//! remaining length first, so no field read can panic, and list lengths are
//! checked against the bytes actually present before anything is allocated.

use byteorder::{BigEndian, ByteOrder};

use super::DecodeError;

pub(super) struct Cursor<'a> {
    body: &'a [u8],
    kind: u8,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(kind: u8, body: &'a [u8]) -> Self {
        Cursor { body, kind }
    }

    pub(super) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.body.len() < n {
            return Err(DecodeError::Truncated { kind: self.kind });
        }
        let (head, rest) = self.body.split_at(n);
        self.body = rest;
        Ok(head)
    }

    pub(super) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(BigEndian::read_u16(self.bytes(2)?))
    }

    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(BigEndian::read_u32(self.bytes(4)?))
    }

    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(BigEndian::read_u64(self.bytes(8)?))
    }

    /// A `u16`-length-prefixed UTF-8 string of at most `max` bytes.
    pub(super) fn str(&mut self, max: usize) -> Result<&'a str, DecodeError> {
        let len = self.u16()? as usize;
        if len > max {
            return Err(self.bad("string length"));
        }
        std::str::from_utf8(self.bytes(len)?).map_err(|_| DecodeError::BadUtf8 { kind: self.kind })
    }

    /// A `u32` element count, checked so that `count * min_elem_len` bytes are
    /// really left: a lying count cannot make us allocate.
    pub(super) fn count(&mut self, min_elem_len: usize) -> Result<usize, DecodeError> {
        let count = self.u32()? as usize;
        match count.checked_mul(min_elem_len) {
            Some(need) if need <= self.body.len() => Ok(count),
            _ => Err(DecodeError::Truncated { kind: self.kind }),
        }
    }

    pub(super) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.body)
    }

    pub(super) fn bad(&self, what: &'static str) -> DecodeError {
        DecodeError::BadValue {
            kind: self.kind,
            what,
        }
    }

    pub(super) fn finish(self) -> Result<(), DecodeError> {
        if self.body.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes { kind: self.kind })
        }
    }
}
