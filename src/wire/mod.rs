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
    LIST_BODY_MAX, MAX_HAVE_BATCH, Message, SMALL_BODY_MAX, decode, encode, encode_chunk_header,
    encode_manifest, encode_manifest_hashes, encode_manifest_prefix, kind, kind_name, max_body_len,
    peek_header,
};
pub use types::{
    ErrorCode, FileCursor, FileName, FileSummary, Hash, HolderGroup, NetworkFile, PeerEntry,
    PeerId, PeerKey, Role, base32_decode, base32_encode,
};

/// Four bytes that open every hello: "SHOL". Lets either side spot a stranger
/// (an HTTP client, an old build) at once instead of misparsing its bytes.
pub const MAGIC: [u8; 4] = *b"SHOL";

/// Bumped on any incompatible change to a frame layout.
/// Version 2: `ListFiles`/`ListPeers` carry a cursor and `FileList`/`PeerList`
/// a `more` flag (paged answers); `Holders` carries a `truncated` flag and a
/// holder count per group. Version 3: every peer entry carries the peer's
/// public key (section 9). Version 4: swarming (`HaveMap`, `Have`,
/// `NoChunk`: partial holders serve what they have) and networks above the
/// full-list threshold (`PeerCount`). Version 5: liveness is a lease the
/// member renews (an unsolicited `Pong` every heartbeat); the manager pings
/// each member only every [`PROBE_HEARTBEATS`] heartbeats.
pub const PROTOCOL_VERSION: u16 = 5;

/// The manager pings each member at least once in this many heartbeats (on
/// each member's own schedule), so a member that hears nothing for that
/// long plus the peer timeout knows the manager is gone. Between pings the
/// manager's only cost per member is reading its keepalive.
pub const PROBE_HEARTBEATS: u32 = 10;

/// Shortest heartbeat a peer follows, whatever a manager's `Welcome` says
/// (a heartbeat of 0 must not make it send keepalives in a loop); a manager
/// refuses to start with a shorter one, which would drop live peers.
pub const MIN_HEARTBEAT_MS: u32 = 100;

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

/// Largest file a manifest can describe (2^19 chunks of 4 MiB = 2 TiB); a
/// share claiming more is a lie and is refused.
pub const MAX_FILE_SIZE: u64 = MAX_CHUNKS as u64 * MAX_CHUNK_SIZE as u64;

/// Most distinct files one registration may share. Bounds the cost of one
/// `ShareFiles` (the manager re-indexes the whole set) and of a leave.
pub const MAX_SHARED_FILES: usize = 4096;

/// Largest `ShareFiles` body: [`MAX_SHARED_FILES`] entries of the longest
/// name (2 + 255 + 8 + 32 bytes each) plus the count.
pub const MAX_SHARE_FILES_BODY: usize = 4 + MAX_SHARED_FILES * (2 + MAX_NAME_LEN + 8 + 32);

/// Most entries in one `FileList` page (each at most 301 bytes: 1.2 MB).
pub const FILE_PAGE: usize = 4096;

/// Most peers in one `PeerList` page, and in each list of one `PeerDelta`
/// (each at most 27 bytes: 221 KB).
pub const PEER_PAGE: usize = 8192;

/// Most versions one `Holders` answer lists (the most-held first).
pub const MAX_HOLDER_GROUPS: usize = 32;

/// Most peers listed per version in one `Holders` answer.
pub const MAX_HOLDERS_PER_GROUP: usize = 256;
