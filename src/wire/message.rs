//! Every message, its kind byte, and its encode/decode. Layouts are in
//! docs/PROTOCOL.md; keep the two in step.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use byteorder::{BigEndian, ByteOrder, WriteBytesExt};
use fixedbitset::FixedBitSet;

use super::cursor::Cursor;
use super::types::{
    ErrorCode, FileCursor, FileName, FileSummary, Hash, HolderGroup, NetworkFile, PeerEntry,
    PeerId, PeerKey, Role,
};
use super::{
    DecodeError, HEADER_LEN, MAGIC, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_NAME_LEN, MAX_REASON_LEN,
    MAX_SHARE_FILES_BODY, MIN_CHUNK_SIZE,
};
use crate::text;

/// The kind byte of every frame (section 4 of docs/PROTOCOL.md).
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const ERROR: u8 = 0x02;
    pub const GOODBYE: u8 = 0x03;
    pub const PING: u8 = 0x04;
    pub const PONG: u8 = 0x05;
    pub const REGISTER: u8 = 0x10;
    pub const WELCOME: u8 = 0x11;
    pub const PEER_LIST: u8 = 0x12;
    pub const PEER_DELTA: u8 = 0x13;
    pub const SHARE_FILES: u8 = 0x14;
    pub const WHO_HAS: u8 = 0x15;
    pub const HOLDERS: u8 = 0x16;
    pub const LIST_FILES: u8 = 0x17;
    pub const FILE_LIST: u8 = 0x18;
    pub const LIST_PEERS: u8 = 0x19;
    pub const PEER_COUNT: u8 = 0x1a;
    pub const GET_MANIFEST: u8 = 0x20;
    pub const MANIFEST: u8 = 0x21;
    pub const GET_CHUNK: u8 = 0x22;
    pub const CHUNK: u8 = 0x23;
    pub const CANCEL: u8 = 0x24;
    pub const GET_HAVE_MAP: u8 = 0x25;
    pub const HAVE_MAP: u8 = 0x26;
    pub const HAVE: u8 = 0x27;
    pub const NO_CHUNK: u8 = 0x28;
}

/// Chunk indices one `Have` frame carries at most.
pub const MAX_HAVE_BATCH: usize = 1024;

/// Limit for frames that carry lists (peers, files, holders).
pub const LIST_BODY_MAX: usize = 8 << 20;
/// Limit for every fixed-size or short control frame.
pub const SMALL_BODY_MAX: usize = 4 << 10;
/// Smallest encoded socket address (IPv4: family, 4 bytes, port).
const MIN_ADDR_LEN: usize = 1 + 4 + 2;
const MIN_PEER_ENTRY_LEN: usize = 8 + MIN_ADDR_LEN + 32;

/// One decoded frame. Only `Chunk` borrows from the input buffer: chunk
/// payloads are large and hot, everything else is small control traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Opens every connection, from both sides. The magic is implied: it is
    /// checked on decode and written on encode.
    Hello {
        version: u16,
        role: Role,
    },
    /// A refusal or failure; the sender closes the connection after it.
    /// A decoded `reason` is already sanitized (`text::sanitize_within`):
    /// controls and bidi characters arrive as `\x1b`-style escapes.
    Error {
        code: ErrorCode,
        reason: String,
    },
    /// A clean leave: the manager drops the peer at once, no timeout needed.
    Goodbye,
    /// Liveness probe; the other side answers `Pong` with the same nonce.
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },

    /// Peer -> manager: join as a sharing peer serving on `listen_port`
    /// (at the address the manager sees, unless `advertise` names one).
    Register {
        listen_port: u16,
        advertise: Option<SocketAddr>,
    },
    /// Manager -> peer: registration accepted; the timers the peer should expect.
    Welcome {
        peer_id: PeerId,
        heartbeat_ms: u32,
        peer_timeout_ms: u32,
    },
    /// Live peers in id order, one page: on join the pages follow each other
    /// (`more` set on all but the last); in answer to `ListPeers`, one page,
    /// and `more` means ask again after the last id.
    PeerList {
        peers: Vec<PeerEntry>,
        more: bool,
    },
    /// Changes since the last list or delta this connection was sent.
    PeerDelta {
        added: Vec<PeerEntry>,
        removed: Vec<PeerId>,
    },
    /// Peer -> manager: the complete set of files this peer shares now.
    ShareFiles {
        files: Vec<FileSummary>,
    },
    /// Who holds `name`? Answered by `Holders`.
    WhoHas {
        name: FileName,
    },
    /// The holders of `name`, grouped by version (root hash), most-held
    /// first. `truncated`: some versions or holders were left out (limits
    /// in `wire`).
    Holders {
        name: FileName,
        truncated: bool,
        groups: Vec<HolderGroup>,
    },
    /// Ask for one page of the files on the network, strictly after `after`
    /// (from the start if `None`); answered by `FileList`.
    ListFiles {
        after: Option<FileCursor>,
    },
    /// One page of files in (name, root, size) order; `more`: ask again
    /// with the last entry as the cursor.
    FileList {
        files: Vec<NetworkFile>,
        more: bool,
    },
    /// Ask for one page of live peers with ids above `after` (0: from the
    /// start); answered by `PeerList`.
    ListPeers {
        after: PeerId,
    },
    /// Manager -> peer: how many live peers the network has. Above the
    /// full-list threshold it replaces the join list and the deltas: the
    /// member stops following the list (docs/PROTOCOL.md, section 5).
    PeerCount {
        total: u32,
    },

    /// Peer -> peer: describe `name` (only the version `root`, if given).
    GetManifest {
        name: FileName,
        root: Option<Hash>,
    },
    /// A file's description: its chunk hashes, whose root is `root`.
    Manifest {
        root: Hash,
        size: u64,
        chunk_size: u32,
        hashes: Vec<Hash>,
    },
    /// Ask for chunk `index` of the file whose root is `root`.
    GetChunk {
        root: Hash,
        index: u32,
    },
    /// One chunk's bytes, answering a `GetChunk` on this connection.
    Chunk {
        index: u32,
        data: &'a [u8],
    },
    /// Withdraw a `GetChunk` not yet answered (endgame duplicates).
    Cancel {
        root: Hash,
        index: u32,
    },
    /// Downloader -> holder: which chunks of `root` do you hold? Answered by
    /// `HaveMap`, then a `Have` for each batch verified later.
    GetHaveMap {
        root: Hash,
    },
    /// The chunks of `root` the sender holds: `None` for every one of them
    /// (a complete file), else a set of exactly `chunks` bits.
    HaveMap {
        root: Hash,
        chunks: u32,
        have: Option<FixedBitSet>,
    },
    /// Chunks of `root` the sender has verified since its `HaveMap`.
    Have {
        root: Hash,
        indices: Vec<u32>,
    },
    /// The answer to a `GetChunk` for a chunk the sender does not hold (yet).
    NoChunk {
        root: Hash,
        index: u32,
    },
}

impl Message<'_> {
    /// This message's kind byte.
    pub fn kind(&self) -> u8 {
        message_kind(self)
    }
}

/// The name of a kind byte, for logs ("unknown" for kinds we do not know).
pub fn kind_name(kind: u8) -> &'static str {
    match kind {
        kind::HELLO => "hello",
        kind::ERROR => "error",
        kind::GOODBYE => "goodbye",
        kind::PING => "ping",
        kind::PONG => "pong",
        kind::REGISTER => "register",
        kind::WELCOME => "welcome",
        kind::PEER_LIST => "peer-list",
        kind::PEER_DELTA => "peer-delta",
        kind::SHARE_FILES => "share-files",
        kind::WHO_HAS => "who-has",
        kind::HOLDERS => "holders",
        kind::LIST_FILES => "list-files",
        kind::FILE_LIST => "file-list",
        kind::LIST_PEERS => "list-peers",
        kind::PEER_COUNT => "peer-count",
        kind::GET_MANIFEST => "get-manifest",
        kind::MANIFEST => "manifest",
        kind::GET_CHUNK => "get-chunk",
        kind::CHUNK => "chunk",
        kind::CANCEL => "cancel",
        kind::GET_HAVE_MAP => "get-have-map",
        kind::HAVE_MAP => "have-map",
        kind::HAVE => "have",
        kind::NO_CHUNK => "no-chunk",
        _ => "unknown",
    }
}

/// The longest body a frame of `kind` may have, or `None` for unknown kinds.
/// Checked from the header alone, before any body byte is buffered.
pub fn max_body_len(kind: u8) -> Option<usize> {
    Some(match kind {
        kind::CHUNK => 4 + MAX_CHUNK_SIZE as usize,
        kind::MANIFEST => 32 + 8 + 4 + 4 + 32 * MAX_CHUNKS as usize,
        kind::SHARE_FILES => MAX_SHARE_FILES_BODY,
        kind::PEER_LIST | kind::PEER_DELTA | kind::HOLDERS | kind::FILE_LIST => LIST_BODY_MAX,
        kind::HAVE_MAP => 32 + 4 + 1 + (MAX_CHUNKS as usize).div_ceil(8),
        kind::HAVE => 32 + 2 + 4 * MAX_HAVE_BATCH,
        kind::HELLO
        | kind::ERROR
        | kind::GOODBYE
        | kind::PING
        | kind::PONG
        | kind::REGISTER
        | kind::WELCOME
        | kind::WHO_HAS
        | kind::LIST_FILES
        | kind::LIST_PEERS
        | kind::PEER_COUNT
        | kind::GET_MANIFEST
        | kind::GET_CHUNK
        | kind::CANCEL
        | kind::GET_HAVE_MAP
        | kind::NO_CHUNK => SMALL_BODY_MAX,
        _ => return None,
    })
}

/// Reads a frame header: `Ok(None)` if fewer than 5 bytes are buffered,
/// otherwise the kind and the body length, already checked against the
/// kind's limit. Lets a reader refuse a hostile length before buffering it.
pub fn peek_header(buf: &[u8]) -> Result<Option<(u8, usize)>, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let len = BigEndian::read_u32(&buf[..4]) as usize;
    let kind = buf[4];
    let max = max_body_len(kind).ok_or(DecodeError::UnknownKind(kind))?;
    // `len` counts the kind byte too, so a valid frame has len >= 1.
    let body_len = len.checked_sub(1).ok_or(DecodeError::Truncated { kind })?;
    if body_len > max {
        return Err(DecodeError::TooLong {
            kind,
            len: body_len,
            max,
        });
    }
    Ok(Some((kind, body_len)))
}

/// Decodes the first frame in `buf`. `Ok(None)` means "need more bytes";
/// `Ok(Some((msg, consumed)))` hands back the message and how many bytes to
/// drop from the front of `buf` once the borrow ends.
pub fn decode(buf: &[u8]) -> Result<Option<(Message<'_>, usize)>, DecodeError> {
    let Some((kind, body_len)) = peek_header(buf)? else {
        return Ok(None);
    };
    let frame_len = HEADER_LEN + body_len;
    if buf.len() < frame_len {
        return Ok(None);
    }
    let mut c = Cursor::new(kind, &buf[HEADER_LEN..frame_len]);
    let msg = decode_body(kind, &mut c)?;
    c.finish()?;
    Ok(Some((msg, frame_len)))
}

fn decode_body<'a>(kind: u8, c: &mut Cursor<'a>) -> Result<Message<'a>, DecodeError> {
    Ok(match kind {
        kind::HELLO => {
            let magic: [u8; 4] = c.array()?;
            if magic != MAGIC {
                return Err(DecodeError::BadMagic(magic));
            }
            let version = c.u16()?;
            let role = Role::from_u8(c.u8()?).ok_or_else(|| c.bad("role"))?;
            Message::Hello { version, role }
        }
        kind::ERROR => {
            let code = ErrorCode::from_u16(c.u16()?);
            // Sanitized here, once, so no printer downstream can forget.
            let reason = text::sanitize_within(c.str(MAX_REASON_LEN)?, MAX_REASON_LEN);
            Message::Error { code, reason }
        }
        kind::GOODBYE => Message::Goodbye,
        kind::PING => Message::Ping { nonce: c.u64()? },
        kind::PONG => Message::Pong { nonce: c.u64()? },
        kind::REGISTER => Message::Register {
            listen_port: c.u16()?,
            advertise: read_opt_addr(c)?,
        },
        kind::WELCOME => Message::Welcome {
            peer_id: PeerId(c.u64()?),
            heartbeat_ms: c.u32()?,
            peer_timeout_ms: c.u32()?,
        },
        kind::PEER_LIST => Message::PeerList {
            peers: read_peer_entries(c)?,
            more: read_flag(c, "more flag")?,
        },
        kind::PEER_DELTA => {
            let added = read_peer_entries(c)?;
            let n = c.count(8)?;
            let removed = (0..n)
                .map(|_| c.u64().map(PeerId))
                .collect::<Result<_, _>>()?;
            Message::PeerDelta { added, removed }
        }
        kind::SHARE_FILES => {
            let n = c.count(2 + 1 + 8 + 32)?;
            let files = (0..n)
                .map(|_| {
                    Ok(FileSummary {
                        name: read_name(c)?,
                        size: c.u64()?,
                        root: Hash(c.array()?),
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::ShareFiles { files }
        }
        kind::WHO_HAS => Message::WhoHas {
            name: read_name(c)?,
        },
        kind::HOLDERS => {
            let name = read_name(c)?;
            let truncated = read_flag(c, "truncated flag")?;
            let n = c.count(32 + 8 + 4 + 4)?;
            let groups = (0..n)
                .map(|_| {
                    Ok(HolderGroup {
                        root: Hash(c.array()?),
                        size: c.u64()?,
                        holders: c.u32()?,
                        peers: read_peer_entries(c)?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::Holders {
                name,
                truncated,
                groups,
            }
        }
        kind::LIST_FILES => {
            let after = match read_flag(c, "cursor flag")? {
                false => None,
                true => Some(FileCursor {
                    name: read_name(c)?,
                    root: Hash(c.array()?),
                    size: c.u64()?,
                }),
            };
            Message::ListFiles { after }
        }
        kind::FILE_LIST => {
            let n = c.count(2 + 1 + 8 + 32 + 4)?;
            let files = (0..n)
                .map(|_| {
                    Ok(NetworkFile {
                        name: read_name(c)?,
                        size: c.u64()?,
                        root: Hash(c.array()?),
                        holders: c.u32()?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::FileList {
                files,
                more: read_flag(c, "more flag")?,
            }
        }
        kind::LIST_PEERS => Message::ListPeers {
            after: PeerId(c.u64()?),
        },
        kind::PEER_COUNT => Message::PeerCount { total: c.u32()? },
        kind::GET_MANIFEST => {
            let name = read_name(c)?;
            let root = match c.u8()? {
                0 => None,
                1 => Some(Hash(c.array()?)),
                _ => return Err(c.bad("root flag")),
            };
            Message::GetManifest { name, root }
        }
        kind::MANIFEST => {
            let root = Hash(c.array()?);
            let size = c.u64()?;
            let chunk_size = c.u32()?;
            if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
                || !chunk_size.is_power_of_two()
            {
                return Err(c.bad("chunk size"));
            }
            let n = c.count(32)?;
            let hashes = (0..n)
                .map(|_| c.array().map(Hash))
                .collect::<Result<_, _>>()?;
            Message::Manifest {
                root,
                size,
                chunk_size,
                hashes,
            }
        }
        kind::GET_CHUNK => Message::GetChunk {
            root: Hash(c.array()?),
            index: c.u32()?,
        },
        kind::CHUNK => Message::Chunk {
            index: c.u32()?,
            data: c.rest(),
        },
        kind::CANCEL => Message::Cancel {
            root: Hash(c.array()?),
            index: c.u32()?,
        },
        kind::GET_HAVE_MAP => Message::GetHaveMap {
            root: Hash(c.array()?),
        },
        kind::HAVE_MAP => {
            let root = Hash(c.array()?);
            let chunks = c.u32()?;
            if chunks > MAX_CHUNKS {
                return Err(c.bad("chunk count"));
            }
            let have = match c.u8()? {
                1 => None,
                0 => Some(read_have_bits(c, chunks)?),
                _ => return Err(c.bad("complete flag")),
            };
            Message::HaveMap { root, chunks, have }
        }
        kind::HAVE => {
            let root = Hash(c.array()?);
            let n = c.u16()? as usize;
            if n > MAX_HAVE_BATCH {
                return Err(c.bad("have count"));
            }
            let indices = (0..n).map(|_| c.u32()).collect::<Result<_, _>>()?;
            Message::Have { root, indices }
        }
        kind::NO_CHUNK => Message::NoChunk {
            root: Hash(c.array()?),
            index: c.u32()?,
        },
        other => return Err(DecodeError::UnknownKind(other)),
    })
}

/// A have-map's bits: `chunks` of them, bit `i` being bit `i % 8` (least
/// significant first) of byte `i / 8`; the spare bits of the last byte are 0.
fn read_have_bits(c: &mut Cursor<'_>, chunks: u32) -> Result<FixedBitSet, DecodeError> {
    let bytes = c.bytes((chunks as usize).div_ceil(8))?;
    let mut have = FixedBitSet::with_capacity(chunks as usize);
    for (i, &b) in bytes.iter().enumerate() {
        for bit in (0..8).filter(|bit| b & (1 << bit) != 0) {
            let index = i * 8 + bit;
            if index >= chunks as usize {
                return Err(c.bad("have-map spare bits"));
            }
            have.insert(index);
        }
    }
    Ok(have)
}

fn put_have_bits(out: &mut Vec<u8>, have: &FixedBitSet, chunks: u32) {
    let len = (chunks as usize).div_ceil(8);
    let at = out.len();
    out.resize(at + len, 0);
    for index in have.ones().filter(|&i| i < chunks as usize) {
        out[at + index / 8] |= 1 << (index % 8);
    }
}

/// A `u8` that must be 0 or 1.
fn read_flag(c: &mut Cursor<'_>, what: &'static str) -> Result<bool, DecodeError> {
    match c.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(c.bad(what)),
    }
}

fn read_name(c: &mut Cursor<'_>) -> Result<FileName, DecodeError> {
    FileName::new(c.str(MAX_NAME_LEN)?)
}

fn read_opt_addr(c: &mut Cursor<'_>) -> Result<Option<SocketAddr>, DecodeError> {
    let ip: IpAddr = match c.u8()? {
        0 => return Ok(None),
        4 => Ipv4Addr::from(c.array::<4>()?).into(),
        6 => Ipv6Addr::from(c.array::<16>()?).into(),
        _ => return Err(c.bad("address family")),
    };
    Ok(Some(SocketAddr::new(ip, c.u16()?)))
}

fn read_addr(c: &mut Cursor<'_>) -> Result<SocketAddr, DecodeError> {
    read_opt_addr(c)?.ok_or_else(|| c.bad("address family"))
}

fn read_peer_entries(c: &mut Cursor<'_>) -> Result<Vec<PeerEntry>, DecodeError> {
    let n = c.count(MIN_PEER_ENTRY_LEN)?;
    (0..n)
        .map(|_| {
            Ok(PeerEntry {
                id: PeerId(c.u64()?),
                addr: read_addr(c)?,
                key: PeerKey(c.array()?),
            })
        })
        .collect()
}

/// Appends `msg` as one frame to `out`. Writing to a `Vec` cannot fail, and
/// the length prefix is patched in once the body is written.
pub fn encode(msg: &Message<'_>, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, message_kind(msg)]);
    encode_body(msg, out);
    let len = (out.len() - start - 4) as u32;
    BigEndian::write_u32(&mut out[start..start + 4], len);
}

/// Appends the header of a `Chunk` frame carrying `data_len` bytes; the
/// caller appends (or sends from the file) exactly `data_len` bytes after it.
/// Lets the serving side read a chunk straight into its send buffer.
pub fn encode_chunk_header(index: u32, data_len: u32, out: &mut Vec<u8>) {
    out.write_u32::<BigEndian>(1 + 4 + data_len).unwrap_or(());
    out.push(kind::CHUNK);
    out.write_u32::<BigEndian>(index).unwrap_or(());
}

/// Appends a `Manifest` frame built from borrowed hashes: the same bytes as
/// `encode(&Message::Manifest { .. })`, without copying a hash list that can
/// be megabytes long into a message first.
pub fn encode_manifest(
    root: &Hash,
    size: u64,
    chunk_size: u32,
    hashes: &[Hash],
    out: &mut Vec<u8>,
) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind::MANIFEST]);
    put_manifest_body(out, root, size, chunk_size, hashes);
    let len = (out.len() - start - 4) as u32;
    BigEndian::write_u32(&mut out[start..start + 4], len);
}

/// The front of a manifest frame of `count` hashes (header, root, size,
/// chunk size, count), for a sender that streams the hashes after it with
/// [`encode_manifest_hashes`] as its socket drains, rather than encoding
/// megabytes of hashes at once for a client that may never read them.
pub fn encode_manifest_prefix(
    root: &Hash,
    size: u64,
    chunk_size: u32,
    count: u32,
    out: &mut Vec<u8>,
) {
    let len = 1 + 32 + 8 + 4 + 4 + 32 * count as usize;
    put_u32(out, len as u32);
    out.push(kind::MANIFEST);
    out.extend_from_slice(&root.0);
    put_u64(out, size);
    put_u32(out, chunk_size);
    put_u32(out, count);
}

/// The next hashes of a manifest begun with [`encode_manifest_prefix`].
pub fn encode_manifest_hashes(hashes: &[Hash], out: &mut Vec<u8>) {
    out.reserve(32 * hashes.len());
    for h in hashes {
        out.extend_from_slice(&h.0);
    }
}

fn put_manifest_body(out: &mut Vec<u8>, root: &Hash, size: u64, chunk_size: u32, hashes: &[Hash]) {
    out.reserve(32 + 8 + 4 + 4 + 32 * hashes.len());
    out.extend_from_slice(&root.0);
    put_u64(out, size);
    put_u32(out, chunk_size);
    put_u32(out, hashes.len() as u32);
    for h in hashes {
        out.extend_from_slice(&h.0);
    }
}

fn message_kind(msg: &Message<'_>) -> u8 {
    match msg {
        Message::Hello { .. } => kind::HELLO,
        Message::Error { .. } => kind::ERROR,
        Message::Goodbye => kind::GOODBYE,
        Message::Ping { .. } => kind::PING,
        Message::Pong { .. } => kind::PONG,
        Message::Register { .. } => kind::REGISTER,
        Message::Welcome { .. } => kind::WELCOME,
        Message::PeerList { .. } => kind::PEER_LIST,
        Message::PeerDelta { .. } => kind::PEER_DELTA,
        Message::ShareFiles { .. } => kind::SHARE_FILES,
        Message::WhoHas { .. } => kind::WHO_HAS,
        Message::Holders { .. } => kind::HOLDERS,
        Message::ListFiles { .. } => kind::LIST_FILES,
        Message::FileList { .. } => kind::FILE_LIST,
        Message::ListPeers { .. } => kind::LIST_PEERS,
        Message::PeerCount { .. } => kind::PEER_COUNT,
        Message::GetManifest { .. } => kind::GET_MANIFEST,
        Message::Manifest { .. } => kind::MANIFEST,
        Message::GetChunk { .. } => kind::GET_CHUNK,
        Message::Chunk { .. } => kind::CHUNK,
        Message::Cancel { .. } => kind::CANCEL,
        Message::GetHaveMap { .. } => kind::GET_HAVE_MAP,
        Message::HaveMap { .. } => kind::HAVE_MAP,
        Message::Have { .. } => kind::HAVE,
        Message::NoChunk { .. } => kind::NO_CHUNK,
    }
}

fn encode_body(msg: &Message<'_>, out: &mut Vec<u8>) {
    match msg {
        Message::Hello { version, role } => {
            out.extend_from_slice(&MAGIC);
            put_u16(out, *version);
            out.push(*role as u8);
        }
        Message::Error { code, reason } => {
            put_u16(out, *code as u16);
            put_str(out, truncate_utf8(reason, MAX_REASON_LEN));
        }
        Message::Goodbye => {}
        Message::ListFiles { after } => match after {
            None => out.push(0),
            Some(c) => {
                out.push(1);
                put_str(out, c.name.as_str());
                out.extend_from_slice(&c.root.0);
                put_u64(out, c.size);
            }
        },
        Message::ListPeers { after } => put_u64(out, after.0),
        Message::PeerCount { total } => put_u32(out, *total),
        Message::Ping { nonce } | Message::Pong { nonce } => put_u64(out, *nonce),
        Message::Register {
            listen_port,
            advertise,
        } => {
            put_u16(out, *listen_port);
            put_opt_addr(out, advertise.as_ref());
        }
        Message::Welcome {
            peer_id,
            heartbeat_ms,
            peer_timeout_ms,
        } => {
            put_u64(out, peer_id.0);
            put_u32(out, *heartbeat_ms);
            put_u32(out, *peer_timeout_ms);
        }
        Message::PeerList { peers, more } => {
            put_peer_entries(out, peers);
            out.push(u8::from(*more));
        }
        Message::PeerDelta { added, removed } => {
            put_peer_entries(out, added);
            put_u32(out, removed.len() as u32);
            for id in removed {
                put_u64(out, id.0);
            }
        }
        Message::ShareFiles { files } => {
            put_u32(out, files.len() as u32);
            for f in files {
                put_str(out, f.name.as_str());
                put_u64(out, f.size);
                out.extend_from_slice(&f.root.0);
            }
        }
        Message::WhoHas { name } => put_str(out, name.as_str()),
        Message::Holders {
            name,
            truncated,
            groups,
        } => {
            put_str(out, name.as_str());
            out.push(u8::from(*truncated));
            put_u32(out, groups.len() as u32);
            for g in groups {
                out.extend_from_slice(&g.root.0);
                put_u64(out, g.size);
                put_u32(out, g.holders);
                put_peer_entries(out, &g.peers);
            }
        }
        Message::FileList { files, more } => {
            put_u32(out, files.len() as u32);
            for f in files {
                put_str(out, f.name.as_str());
                put_u64(out, f.size);
                out.extend_from_slice(&f.root.0);
                put_u32(out, f.holders);
            }
            out.push(u8::from(*more));
        }
        Message::GetManifest { name, root } => {
            put_str(out, name.as_str());
            match root {
                None => out.push(0),
                Some(root) => {
                    out.push(1);
                    out.extend_from_slice(&root.0);
                }
            }
        }
        Message::Manifest {
            root,
            size,
            chunk_size,
            hashes,
        } => put_manifest_body(out, root, *size, *chunk_size, hashes),
        Message::GetHaveMap { root } => out.extend_from_slice(&root.0),
        Message::HaveMap { root, chunks, have } => {
            out.extend_from_slice(&root.0);
            put_u32(out, *chunks);
            match have {
                None => out.push(1),
                Some(have) => {
                    out.push(0);
                    put_have_bits(out, have, *chunks);
                }
            }
        }
        Message::Have { root, indices } => {
            out.extend_from_slice(&root.0);
            // Senders batch at most MAX_HAVE_BATCH (the decoder's limit).
            put_u16(out, indices.len().min(MAX_HAVE_BATCH) as u16);
            for index in indices.iter().take(MAX_HAVE_BATCH) {
                put_u32(out, *index);
            }
        }
        Message::GetChunk { root, index }
        | Message::Cancel { root, index }
        | Message::NoChunk { root, index } => {
            out.extend_from_slice(&root.0);
            put_u32(out, *index);
        }
        Message::Chunk { index, data } => {
            put_u32(out, *index);
            out.extend_from_slice(data);
        }
    }
}

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u16(out, s.len() as u16);
    out.extend_from_slice(s.as_bytes());
}

/// Cuts `s` to at most `max` bytes on a character boundary, so an over-long
/// reason still encodes as valid UTF-8 within the decoder's limit.
fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn put_opt_addr(out: &mut Vec<u8>, addr: Option<&SocketAddr>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            put_u16(out, a.port());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            put_u16(out, a.port());
        }
    }
}

fn put_peer_entries(out: &mut Vec<u8>, peers: &[PeerEntry]) {
    put_u32(out, peers.len() as u32);
    for p in peers {
        put_u64(out, p.id.0);
        put_opt_addr(out, Some(&p.addr));
        out.extend_from_slice(&p.key.0);
    }
}
