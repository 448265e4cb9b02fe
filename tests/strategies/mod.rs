//! proptest strategies shared by the property tests: every `Message` the
//! decoder can produce, with values drawn from small pools (so names, roots
//! and peer ids collide and lookups hit) mixed with arbitrary ones, and names
//! and reasons full of controls and bidi characters.
#![allow(dead_code)] // each test binary uses a different part

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use shoal::wire::{
    ErrorCode, FileName, FileSummary, Hash, HolderGroup, MAX_CHUNK_SIZE, MAX_REASON_LEN,
    MIN_CHUNK_SIZE, Message, NetworkFile, PeerEntry, PeerId, Role,
};

/// Backing bytes for `Chunk` payloads (messages borrow their data).
pub static PAYLOAD: [u8; 256] = [0x5a; 256];

/// Names the tests' catalogs hold; strategies pick them often.
pub const POOL_NAMES: [&str; 3] = ["a.txt", "b.bin", "c\u{1b}[2J\u{202e}.txt"];

pub fn pool_root(i: usize) -> Hash {
    Hash([i as u8 + 1; 32])
}

fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        2 => any::<char>(),
        1 => proptest::char::range('\0', '\x7f'),
        1 => proptest::char::range('\u{80}', '\u{9f}'),
        1 => prop::sample::select(vec!['\u{202e}', '\u{2066}', '\u{200f}', '\u{feff}', '\u{1b}', '\u{8}', '\n', '/', '\\', '.']),
    ]
}

pub fn text(max_chars: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..max_chars).prop_map(String::from_iter)
}

pub fn name() -> impl Strategy<Value = FileName> {
    prop_oneof![
        3 => prop::sample::select(POOL_NAMES.to_vec()).prop_map(String::from),
        2 => text(40),
    ]
    .prop_map(|s| valid_name(&s))
}

/// Makes `s` a valid name (no filtering, so long runs never run out of
/// accepted cases): separators and NUL become `_`, `.`/`..`/empty get a prefix.
fn valid_name(s: &str) -> FileName {
    let mut s = s.replace(['/', '\\', '\0'], "_");
    if s.is_empty() || s == "." || s == ".." {
        s.insert(0, 'x');
    }
    FileName::new(&s).unwrap_or_else(|_| FileName::new("x").expect("a plain name"))
}

pub fn root() -> impl Strategy<Value = Hash> {
    prop_oneof![
        3 => (0..POOL_NAMES.len()).prop_map(pool_root),
        1 => any::<[u8; 32]>().prop_map(Hash),
    ]
}

pub fn peer_id() -> impl Strategy<Value = PeerId> {
    prop_oneof![3 => (0u64..6).prop_map(PeerId), 1 => any::<u64>().prop_map(PeerId)]
}

pub fn addr() -> impl Strategy<Value = SocketAddr> {
    let ip = prop_oneof![
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
    ];
    (ip, any::<u16>()).prop_map(|(ip, port)| SocketAddr::new(ip, port))
}

pub fn peer_entry() -> impl Strategy<Value = PeerEntry> {
    (peer_id(), addr(), any::<[u8; 32]>()).prop_map(|(id, addr, key)| PeerEntry {
        id,
        addr,
        key: shoal::wire::PeerKey(key),
    })
}

pub fn peers() -> impl Strategy<Value = Vec<PeerEntry>> {
    prop::collection::vec(peer_entry(), 0..4)
}

pub fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::Incompatible,
        ErrorCode::Protocol,
        ErrorCode::NotFound,
        ErrorCode::OutOfRange,
        ErrorCode::Busy,
        ErrorCode::Internal,
        ErrorCode::Other,
    ])
}

pub fn role() -> impl Strategy<Value = Role> {
    prop::sample::select(vec![Role::ManagerClient, Role::Manager, Role::Peer])
}

fn version() -> impl Strategy<Value = u16> {
    prop_oneof![4 => Just(shoal::wire::PROTOCOL_VERSION), 1 => any::<u16>()]
}

fn index() -> impl Strategy<Value = u32> {
    prop_oneof![4 => 0u32..12, 1 => any::<u32>()]
}

fn chunk_size() -> impl Strategy<Value = u32> {
    (MIN_CHUNK_SIZE.trailing_zeros()..=MAX_CHUNK_SIZE.trailing_zeros()).prop_map(|b| 1 << b)
}

/// What a manager sends to a peer once the link is up (arbitrary contents).
pub fn from_manager() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        2 => (peers(), any::<bool>()).prop_map(|(peers, more)| Message::PeerList { peers, more }),
        3 => (peers(), prop::collection::vec(peer_id(), 0..4))
            .prop_map(|(added, removed)| Message::PeerDelta { added, removed }),
        2 => any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        1 => any::<u32>().prop_map(|total| Message::PeerCount { total }),
        1 => (
            name(),
            prop::collection::vec(
                (root(), any::<u64>(), peers(), any::<u32>()).prop_map(|(root, size, peers, holders)| HolderGroup { root, size, peers, holders }),
                0..3
            ),
            any::<bool>()
        )
            .prop_map(|(name, groups, truncated)| Message::Holders { name, groups, truncated }),
        1 => prop::collection::vec(
            (name(), any::<u64>(), root(), any::<u32>())
                .prop_map(|(name, size, root, holders)| NetworkFile { name, size, root, holders }),
            0..4
        )
        .prop_flat_map(|files| any::<bool>().prop_map(move |more| Message::FileList { files: files.clone(), more })),
    ]
}

/// Any message the decoder can hand a core: every field in its domain, the
/// values themselves arbitrary (wrong for the state, unknown roots, ...).
pub fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        3 => (version(), role()).prop_map(|(version, role)| Message::Hello { version, role }),
        1 => (error_code(), text(60)).prop_map(|(code, r)| Message::Error {
            code,
            reason: shoal::text::sanitize_within(&r, MAX_REASON_LEN),
        }),
        1 => Just(Message::Goodbye),
        1 => any::<u64>().prop_map(|nonce| Message::Ping { nonce }),
        1 => any::<u64>().prop_map(|nonce| Message::Pong { nonce }),
        2 => (any::<u16>(), prop::option::of(addr()))
            .prop_map(|(listen_port, advertise)| Message::Register { listen_port, advertise }),
        2 => (peer_id(), any::<u32>(), any::<u32>()).prop_map(|(peer_id, h, t)| Message::Welcome {
            peer_id,
            heartbeat_ms: h,
            peer_timeout_ms: t,
        }),
        1 => (peers(), any::<bool>()).prop_map(|(peers, more)| Message::PeerList { peers, more }),
        1 => (peers(), prop::collection::vec(peer_id(), 0..4))
            .prop_map(|(added, removed)| Message::PeerDelta { added, removed }),
        2 => prop::collection::vec(
            (name(), any::<u64>(), root()).prop_map(|(name, size, root)| FileSummary { name, size, root }),
            0..4
        )
        .prop_map(|files| Message::ShareFiles { files }),
        2 => name().prop_map(|name| Message::WhoHas { name }),
        1 => (
            name(),
            prop::collection::vec(
                (root(), any::<u64>(), peers(), any::<u32>()).prop_map(|(root, size, peers, holders)| HolderGroup { root, size, peers, holders }),
                0..3
            ),
            any::<bool>()
        )
            .prop_map(|(name, groups, truncated)| Message::Holders { name, groups, truncated }),
        1 => Just(Message::ListFiles { after: None }),
        1 => prop::collection::vec(
            (name(), any::<u64>(), root(), any::<u32>())
                .prop_map(|(name, size, root, holders)| NetworkFile { name, size, root, holders }),
            0..4
        )
        .prop_flat_map(|files| any::<bool>().prop_map(move |more| Message::FileList { files: files.clone(), more })),
        1 => (0u64..8).prop_map(|id| Message::ListPeers { after: shoal::wire::PeerId(id) }),
        1 => any::<u32>().prop_map(|total| Message::PeerCount { total }),
        3 => (name(), prop::option::of(root())).prop_map(|(name, root)| Message::GetManifest { name, root }),
        1 => (root(), any::<u64>(), chunk_size(), prop::collection::vec(any::<[u8; 32]>().prop_map(Hash), 0..4))
            .prop_map(|(root, size, chunk_size, hashes)| Message::Manifest { root, size, chunk_size, hashes }),
        4 => (root(), index()).prop_map(|(root, index)| Message::GetChunk { root, index }),
        1 => (index(), 0..PAYLOAD.len()).prop_map(|(index, n)| Message::Chunk { index, data: &PAYLOAD[..n] }),
        2 => (root(), index()).prop_map(|(root, index)| Message::Cancel { root, index }),
        1 => root().prop_map(|root| Message::GetHaveMap { root }),
        2 => (root(), 0u32..40, prop::collection::vec(any::<bool>(), 40))
            .prop_map(|(root, chunks, bits)| {
                let mut have = fixedbitset::FixedBitSet::with_capacity(chunks as usize);
                for i in (0..chunks as usize).filter(|&i| bits[i]) {
                    have.insert(i);
                }
                Message::HaveMap { root, chunks, have: Some(have) }
            }),
        1 => (root(), 0u32..40).prop_map(|(root, chunks)| Message::HaveMap { root, chunks, have: None }),
        2 => (root(), prop::collection::vec(index(), 0..6)).prop_map(|(root, indices)| Message::Have { root, indices }),
        1 => (root(), index()).prop_map(|(root, index)| Message::NoChunk { root, index }),
    ]
}
