//! The shoal wire format: frames, messages and their byte-exact encoding.
//!
//! Every frame is `u32` big-endian length (of kind + body), `u8` kind, body.
//! This module does no I/O: [`decode`] takes bytes and returns a borrowed
//! [`Message`] or "need more"; [`encode`] appends to a reused `Vec<u8>`.
//! `docs/PROTOCOL.md` documents every frame byte by byte.

pub mod accept;
mod cursor;
mod error;
mod message;
mod types;

#[cfg(test)]
mod tests;

pub use accept::Accept;
pub use error::DecodeError;
pub use message::{
    Message, decode, encode, encode_chunk_header, encode_manifest, encode_manifest_hashes,
    encode_manifest_prefix, kind_name, max_body_len, peek_header,
};
pub use types::{
    ErrorCode, FileName, FileSummary, Hash, HolderGroup, NetworkFile, PeerEntry, PeerId, PeerKey,
    Role, base32_decode, base32_encode,
};

/// Four bytes that open every hello: "SHOL". Lets either side spot a stranger
/// (an HTTP client, an old build) at once instead of misparsing its bytes.
pub const MAGIC: [u8; 4] = *b"SHOL";

/// Bumped on any incompatible change to a frame layout.
pub const PROTOCOL_VERSION: u16 = 3;

/// Bytes before the body: `u32` length + `u8` kind.
pub const HEADER_LEN: usize = 5;

/// Largest chunk a peer will send or accept. Chunk sizes are powers of two
/// between [`MIN_CHUNK_SIZE`] and this.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;

/// Smallest chunk size a manifest may declare (keeps the hash list bounded).
pub const MIN_CHUNK_SIZE: u32 = 16 << 10;

/// Most chunk hashes one manifest may carry (16 MiB of hashes); with 4 MiB
/// chunks that is files up to 2 TiB.
pub const MAX_CHUNKS: u32 = 1 << 19;

/// Longest file name, in bytes (the common filesystem limit).
pub const MAX_NAME_LEN: usize = 255;

/// Longest human-readable reason in an error frame.
pub const MAX_REASON_LEN: usize = 1024;
