//! Wire format tests: golden bytes for every message, then every way a frame
//! can be wrong, then random and mutated input that must never panic.
//!
//! Golden frames are written out by hand from the layouts in docs/PROTOCOL.md,
//! never produced by `encode`, so a change to the encoder that changes the
//! bytes on the wire fails here.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use super::*;

/// One message and the frame it must be, byte for byte.
type Case = (Message<'static>, Vec<u8>);

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn name(s: &str) -> FileName {
    FileName::new(s).unwrap()
}

fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(Ipv4Addr::new(a, b, c, d).into(), port)
}

fn v6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

fn encoded(msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out);
    out
}

/// A frame around `body` with a correct header: for hostile-body tests.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32 + 1).to_be_bytes().to_vec();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Golden, parse, emit, round trip and every truncation for one case.
fn check(msg: &Message<'_>, golden: &[u8]) {
    assert_eq!(
        decode(golden),
        Ok(Some((msg.clone(), golden.len()))),
        "decode of golden bytes for {msg:?}"
    );
    assert_eq!(encoded(msg), golden, "encode of {msg:?}");

    // Encode appends: it must not disturb what is already in the buffer.
    let mut out = b"xyz".to_vec();
    encode(msg, &mut out);
    assert_eq!(&out[..3], b"xyz");
    assert_eq!(&out[3..], golden);

    let bytes = encoded(msg);
    let (back, n) = decode(&bytes).unwrap().unwrap();
    assert_eq!((&back, n), (msg, bytes.len()), "round trip");

    for cut in 0..golden.len() {
        assert_eq!(
            decode(&golden[..cut]),
            Ok(None),
            "{cut}-byte prefix of {msg:?}"
        );
    }
}

fn hello_cases() -> Vec<Case> {
    vec![
        (
            Message::Hello {
                version: 1,
                role: Role::Peer,
            },
            vec![0, 0, 0, 8, 0x01, b'S', b'H', b'O', b'L', 0x00, 0x01, 0x03],
        ),
        (
            Message::Hello {
                version: 0x0102,
                role: Role::Manager,
            },
            vec![0, 0, 0, 8, 0x01, b'S', b'H', b'O', b'L', 0x01, 0x02, 0x02],
        ),
        (
            Message::Hello {
                version: 1,
                role: Role::ManagerClient,
            },
            vec![0, 0, 0, 8, 0x01, b'S', b'H', b'O', b'L', 0x00, 0x01, 0x01],
        ),
    ]
}

fn error_cases() -> Vec<Case> {
    vec![
        (
            Message::Error {
                code: ErrorCode::NotFound,
                reason: "no such file".into(),
            },
            cat(&[
                &[0, 0, 0, 0x11, 0x02, 0x00, 0x03, 0x00, 0x0c],
                b"no such file",
            ]),
        ),
        (
            Message::Error {
                code: ErrorCode::Incompatible,
                reason: String::new(),
            },
            vec![0, 0, 0, 5, 0x02, 0x00, 0x01, 0x00, 0x00],
        ),
        (
            Message::Error {
                code: ErrorCode::Other,
                reason: "é".into(),
            },
            vec![0, 0, 0, 7, 0x02, 0xff, 0xff, 0x00, 0x02, 0xc3, 0xa9],
        ),
    ]
}

fn goodbye_cases() -> Vec<Case> {
    vec![(Message::Goodbye, vec![0, 0, 0, 1, 0x03])]
}

fn ping_cases() -> Vec<Case> {
    vec![(
        Message::Ping {
            nonce: 0x0102_0304_0506_0708,
        },
        vec![0, 0, 0, 9, 0x04, 1, 2, 3, 4, 5, 6, 7, 8],
    )]
}

fn pong_cases() -> Vec<Case> {
    vec![(
        Message::Pong {
            nonce: 0xdead_beef_0000_0001,
        },
        vec![0, 0, 0, 9, 0x05, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1],
    )]
}

fn register_cases() -> Vec<Case> {
    vec![
        (
            Message::Register {
                listen_port: 7001,
                advertise: None,
            },
            vec![0, 0, 0, 4, 0x10, 0x1b, 0x59, 0x00],
        ),
        (
            Message::Register {
                listen_port: 7001,
                advertise: Some(v4(192, 168, 1, 20, 7002)),
            },
            vec![
                0, 0, 0, 0x0a, 0x10, 0x1b, 0x59, 0x04, 192, 168, 1, 20, 0x1b, 0x5a,
            ],
        ),
        (
            Message::Register {
                listen_port: 7001,
                advertise: Some(v6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 443)),
            },
            cat(&[
                &[0, 0, 0, 0x16, 0x10, 0x1b, 0x59, 0x06],
                &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                &[0x01, 0xbb],
            ]),
        ),
    ]
}

fn welcome_cases() -> Vec<Case> {
    vec![(
        Message::Welcome {
            peer_id: PeerId(42),
            heartbeat_ms: 5000,
            peer_timeout_ms: 15000,
        },
        vec![
            0, 0, 0, 0x11, 0x11, 0, 0, 0, 0, 0, 0, 0, 42, 0x00, 0x00, 0x13, 0x88, 0x00, 0x00, 0x3a,
            0x98,
        ],
    )]
}

fn peer_list_cases() -> Vec<Case> {
    vec![
        (
            Message::PeerList {
                peers: vec![
                    PeerEntry {
                        id: PeerId(1),
                        addr: v4(10, 0, 0, 1, 7001),
                        key: PeerKey([0x11; 32]),
                    },
                    PeerEntry {
                        id: PeerId(2),
                        addr: v6(Ipv6Addr::LOCALHOST, 7002),
                        key: PeerKey([0x22; 32]),
                    },
                ],
                more: true,
            },
            cat(&[
                &[0, 0, 0, 0x70, 0x12],
                &[0, 0, 0, 2],
                &[0, 0, 0, 0, 0, 0, 0, 1, 0x04, 10, 0, 0, 1, 0x1b, 0x59],
                &[0x11; 32],
                &[0, 0, 0, 0, 0, 0, 0, 2, 0x06],
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                &[0x1b, 0x5a],
                &[0x22; 32],
                &[0x01],
            ]),
        ),
        (
            Message::PeerList {
                peers: vec![],
                more: false,
            },
            vec![0, 0, 0, 6, 0x12, 0, 0, 0, 0, 0x00],
        ),
    ]
}

fn peer_delta_cases() -> Vec<Case> {
    vec![
        (
            Message::PeerDelta {
                added: vec![PeerEntry {
                    id: PeerId(3),
                    addr: v4(127, 0, 0, 1, 9000),
                    key: PeerKey([0x33; 32]),
                }],
                removed: vec![PeerId(1), PeerId(0x0102_0304_0506_0708)],
            },
            cat(&[
                &[0, 0, 0, 0x48, 0x13],
                &[0, 0, 0, 1],
                &[0, 0, 0, 0, 0, 0, 0, 3, 0x04, 127, 0, 0, 1, 0x23, 0x28],
                &[0x33; 32],
                &[0, 0, 0, 2],
                &[0, 0, 0, 0, 0, 0, 0, 1],
                &[1, 2, 3, 4, 5, 6, 7, 8],
            ]),
        ),
        (
            Message::PeerDelta {
                added: vec![],
                removed: vec![],
            },
            vec![0, 0, 0, 9, 0x13, 0, 0, 0, 0, 0, 0, 0, 0],
        ),
    ]
}

fn share_files_cases() -> Vec<Case> {
    vec![
        (
            Message::ShareFiles {
                files: vec![
                    FileSummary {
                        name: name("a.txt"),
                        size: 1000,
                        root: Hash([0xaa; 32]),
                    },
                    FileSummary {
                        name: name("b"),
                        size: 0,
                        root: Hash([0xbb; 32]),
                    },
                ],
            },
            cat(&[
                &[0, 0, 0, 0x5f, 0x14],
                &[0, 0, 0, 2],
                &[0x00, 0x05],
                b"a.txt",
                &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
                &[0xaa; 32],
                &[0x00, 0x01, b'b'],
                &[0, 0, 0, 0, 0, 0, 0, 0],
                &[0xbb; 32],
            ]),
        ),
        (
            Message::ShareFiles { files: vec![] },
            vec![0, 0, 0, 5, 0x14, 0, 0, 0, 0],
        ),
    ]
}

fn who_has_cases() -> Vec<Case> {
    vec![(
        Message::WhoHas {
            name: name("a.txt"),
        },
        cat(&[&[0, 0, 0, 8, 0x15, 0x00, 0x05], b"a.txt"]),
    )]
}

fn holders_cases() -> Vec<Case> {
    vec![
        (
            Message::Holders {
                name: name("a.txt"),
                truncated: true,
                groups: vec![
                    HolderGroup {
                        root: Hash([0xaa; 32]),
                        size: 1000,
                        holders: 3,
                        peers: vec![PeerEntry {
                            id: PeerId(1),
                            addr: v4(10, 0, 0, 1, 7001),
                            key: PeerKey([0x44; 32]),
                        }],
                    },
                    HolderGroup {
                        root: Hash([0xbb; 32]),
                        size: 5,
                        holders: 0,
                        peers: vec![],
                    },
                ],
            },
            cat(&[
                &[0, 0, 0, 0x9c, 0x16],
                &[0x00, 0x05],
                b"a.txt",
                &[0x01],
                &[0, 0, 0, 2],
                &[0xaa; 32],
                &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
                &[0, 0, 0, 3],
                &[0, 0, 0, 1],
                &[0, 0, 0, 0, 0, 0, 0, 1, 0x04, 10, 0, 0, 1, 0x1b, 0x59],
                &[0x44; 32],
                &[0xbb; 32],
                &[0, 0, 0, 0, 0, 0, 0, 5],
                &[0, 0, 0, 0],
                &[0, 0, 0, 0],
            ]),
        ),
        (
            Message::Holders {
                name: name("x"),
                truncated: false,
                groups: vec![],
            },
            vec![0, 0, 0, 9, 0x16, 0x00, 0x01, b'x', 0x00, 0, 0, 0, 0],
        ),
    ]
}

fn list_files_cases() -> Vec<Case> {
    vec![
        (
            Message::ListFiles { after: None },
            vec![0, 0, 0, 2, 0x17, 0x00],
        ),
        (
            Message::ListFiles {
                after: Some(FileCursor {
                    name: name("a.txt"),
                    root: Hash([0xaa; 32]),
                    size: 1000,
                }),
            },
            cat(&[
                &[0, 0, 0, 0x31, 0x17, 0x01],
                &[0x00, 0x05],
                b"a.txt",
                &[0xaa; 32],
                &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            ]),
        ),
    ]
}

fn file_list_cases() -> Vec<Case> {
    vec![(
        Message::FileList {
            files: vec![NetworkFile {
                name: name("a.txt"),
                size: 1000,
                root: Hash([0xaa; 32]),
                holders: 3,
            }],
            more: true,
        },
        cat(&[
            &[0, 0, 0, 0x39, 0x18],
            &[0, 0, 0, 1],
            &[0x00, 0x05],
            b"a.txt",
            &[0, 0, 0, 0, 0, 0, 0x03, 0xe8],
            &[0xaa; 32],
            &[0, 0, 0, 3],
            &[0x01],
        ]),
    )]
}

fn list_peers_cases() -> Vec<Case> {
    vec![(
        Message::ListPeers {
            after: PeerId(0x0102_0304_0506_0708),
        },
        vec![0, 0, 0, 9, 0x19, 1, 2, 3, 4, 5, 6, 7, 8],
    )]
}

fn peer_count_cases() -> Vec<Case> {
    vec![(
        Message::PeerCount { total: 19_900 },
        vec![0, 0, 0, 5, 0x1a, 0, 0, 0x4d, 0xbc],
    )]
}

fn get_manifest_cases() -> Vec<Case> {
    vec![
        (
            Message::GetManifest {
                name: name("a.txt"),
                root: None,
            },
            cat(&[&[0, 0, 0, 9, 0x20, 0x00, 0x05], b"a.txt", &[0x00]]),
        ),
        (
            Message::GetManifest {
                name: name("a.txt"),
                root: Some(Hash([0xaa; 32])),
            },
            cat(&[
                &[0, 0, 0, 0x29, 0x20, 0x00, 0x05],
                b"a.txt",
                &[0x01],
                &[0xaa; 32],
            ]),
        ),
    ]
}

fn manifest_cases() -> Vec<Case> {
    vec![(
        Message::Manifest {
            root: Hash([0xcc; 32]),
            size: 300_000,
            chunk_size: 256 << 10,
            hashes: vec![Hash([0x01; 32]), Hash([0x02; 32])],
        },
        cat(&[
            &[0, 0, 0, 0x71, 0x21],
            &[0xcc; 32],
            &[0, 0, 0, 0, 0, 0x04, 0x93, 0xe0],
            &[0x00, 0x04, 0x00, 0x00],
            &[0, 0, 0, 2],
            &[0x01; 32],
            &[0x02; 32],
        ]),
    )]
}

fn get_chunk_cases() -> Vec<Case> {
    vec![(
        Message::GetChunk {
            root: Hash([0xaa; 32]),
            index: 7,
        },
        cat(&[&[0, 0, 0, 0x25, 0x22], &[0xaa; 32], &[0, 0, 0, 7]]),
    )]
}

fn chunk_cases() -> Vec<Case> {
    vec![
        (
            Message::Chunk {
                index: 1,
                data: b"hello",
            },
            vec![
                0, 0, 0, 0x0a, 0x23, 0, 0, 0, 1, b'h', b'e', b'l', b'l', b'o',
            ],
        ),
        (
            Message::Chunk {
                index: 2,
                data: b"",
            },
            vec![0, 0, 0, 5, 0x23, 0, 0, 0, 2],
        ),
    ]
}

fn cancel_cases() -> Vec<Case> {
    vec![(
        Message::Cancel {
            root: Hash([0xaa; 32]),
            index: 0x0102_0304,
        },
        cat(&[&[0, 0, 0, 0x25, 0x24], &[0xaa; 32], &[1, 2, 3, 4]]),
    )]
}

fn get_have_map_cases() -> Vec<Case> {
    vec![(
        Message::GetHaveMap {
            root: Hash([0xaa; 32]),
        },
        cat(&[&[0, 0, 0, 0x21, 0x25], &[0xaa; 32]]),
    )]
}

fn have_map_cases() -> Vec<Case> {
    // Chunks 0, 3 and 9 of 10: bit i is bit i % 8 of byte i / 8.
    let mut some = fixedbitset::FixedBitSet::with_capacity(10);
    for i in [0, 3, 9] {
        some.insert(i);
    }
    vec![
        (
            Message::HaveMap {
                root: Hash([0xaa; 32]),
                chunks: 10,
                have: Some(some),
            },
            cat(&[
                &[0, 0, 0, 0x28, 0x26],
                &[0xaa; 32],
                &[0, 0, 0, 10, 0],
                &[0b0000_1001, 0b0000_0010],
            ]),
        ),
        (
            Message::HaveMap {
                root: Hash([0xaa; 32]),
                chunks: 10,
                have: None,
            },
            cat(&[&[0, 0, 0, 0x26, 0x26], &[0xaa; 32], &[0, 0, 0, 10, 1]]),
        ),
    ]
}

fn have_cases() -> Vec<Case> {
    vec![(
        Message::Have {
            root: Hash([0xaa; 32]),
            indices: vec![5, 0x0102_0304],
        },
        cat(&[
            &[0, 0, 0, 0x2b, 0x27],
            &[0xaa; 32],
            &[0, 2, 0, 0, 0, 5, 1, 2, 3, 4],
        ]),
    )]
}

fn no_chunk_cases() -> Vec<Case> {
    vec![(
        Message::NoChunk {
            root: Hash([0xaa; 32]),
            index: 7,
        },
        cat(&[&[0, 0, 0, 0x25, 0x28], &[0xaa; 32], &[0, 0, 0, 7]]),
    )]
}

#[test]
fn a_have_map_with_spare_bits_set_or_too_many_chunks_is_refused() {
    let mut frame = cat(&[
        &[0, 0, 0, 0x28, 0x26],
        &[0xaa; 32],
        &[0, 0, 0, 10, 0],
        &[0, 0b100],
    ]);
    assert!(decode(&frame).is_err(), "bit 10 of a 10-chunk map");
    frame[43] = 0b10;
    assert!(decode(&frame).is_ok());
    let too_many = cat(&[
        &[0, 0, 0, 0x26, 0x26],
        &[0xaa; 32],
        &[0xff, 0xff, 0xff, 0xff],
        &[1],
    ]);
    assert!(decode(&too_many).is_err());
}

fn all_cases() -> Vec<Case> {
    [
        hello_cases(),
        error_cases(),
        goodbye_cases(),
        ping_cases(),
        pong_cases(),
        register_cases(),
        welcome_cases(),
        peer_list_cases(),
        peer_delta_cases(),
        share_files_cases(),
        who_has_cases(),
        holders_cases(),
        list_files_cases(),
        file_list_cases(),
        list_peers_cases(),
        peer_count_cases(),
        get_manifest_cases(),
        manifest_cases(),
        get_chunk_cases(),
        chunk_cases(),
        cancel_cases(),
        get_have_map_cases(),
        have_map_cases(),
        have_cases(),
        no_chunk_cases(),
    ]
    .concat()
}

/// Which variant a message is. Exhaustive on purpose: a new variant does not
/// compile here until it has golden cases.
fn variant(msg: &Message<'_>) -> usize {
    match msg {
        Message::Hello { .. } => 0,
        Message::Error { .. } => 1,
        Message::Goodbye => 2,
        Message::Ping { .. } => 3,
        Message::Pong { .. } => 4,
        Message::Register { .. } => 5,
        Message::Welcome { .. } => 6,
        Message::PeerList { .. } => 7,
        Message::PeerDelta { .. } => 8,
        Message::ShareFiles { .. } => 9,
        Message::WhoHas { .. } => 10,
        Message::Holders { .. } => 11,
        Message::ListFiles { .. } => 12,
        Message::FileList { .. } => 13,
        Message::ListPeers { .. } => 14,
        Message::GetManifest { .. } => 15,
        Message::Manifest { .. } => 16,
        Message::GetChunk { .. } => 17,
        Message::Chunk { .. } => 18,
        Message::Cancel { .. } => 19,
        Message::GetHaveMap { .. } => 20,
        Message::HaveMap { .. } => 21,
        Message::Have { .. } => 22,
        Message::NoChunk { .. } => 23,
        Message::PeerCount { .. } => 24,
    }
}
const VARIANTS: usize = 25;

macro_rules! golden_tests {
    ($($test:ident => $cases:ident,)*) => {
        $(
            #[test]
            fn $test() {
                for (msg, golden) in $cases() {
                    check(&msg, &golden);
                }
            }
        )*
    };
}

golden_tests! {
    golden_hello => hello_cases,
    golden_error => error_cases,
    golden_goodbye => goodbye_cases,
    golden_ping => ping_cases,
    golden_pong => pong_cases,
    golden_register => register_cases,
    golden_welcome => welcome_cases,
    golden_peer_list => peer_list_cases,
    golden_peer_delta => peer_delta_cases,
    golden_share_files => share_files_cases,
    golden_who_has => who_has_cases,
    golden_holders => holders_cases,
    golden_list_files => list_files_cases,
    golden_file_list => file_list_cases,
    golden_list_peers => list_peers_cases,
    golden_peer_count => peer_count_cases,
    golden_get_manifest => get_manifest_cases,
    golden_manifest => manifest_cases,
    golden_get_chunk => get_chunk_cases,
    golden_chunk => chunk_cases,
    golden_cancel => cancel_cases,
    golden_get_have_map => get_have_map_cases,
    golden_have_map => have_map_cases,
    golden_have => have_cases,
    golden_no_chunk => no_chunk_cases,
}

#[test]
fn golden_cases_cover_every_variant_and_kind() {
    let cases = all_cases();
    let mut seen = [false; VARIANTS];
    for (msg, _) in &cases {
        seen[variant(msg)] = true;
    }
    assert!(seen.iter().all(|&s| s), "variants without a case: {seen:?}");

    // The kinds the golden frames use are exactly the kinds with a limit.
    let mut kinds: Vec<u8> = cases.iter().map(|(_, g)| g[4]).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let known: Vec<u8> = (0..=255u8).filter(|&k| max_body_len(k).is_some()).collect();
    assert_eq!(kinds, known);
    for k in known {
        assert_ne!(kind_name(k), "unknown", "kind 0x{k:02x}");
    }
}

// ---- framing -------------------------------------------------------------

#[test]
fn peek_header_needs_five_bytes() {
    let golden = encoded(&Message::Ping { nonce: 1 });
    for cut in 0..HEADER_LEN {
        assert_eq!(peek_header(&golden[..cut]), Ok(None));
    }
    assert_eq!(peek_header(&golden[..HEADER_LEN]), Ok(Some((0x04, 8))));
}

#[test]
fn oversize_is_refused_from_the_header_alone() {
    for kind in (0..=255u8).filter(|&k| max_body_len(k).is_some()) {
        let max = max_body_len(kind).unwrap();
        // Exactly at the limit is fine: the header is accepted, body awaited.
        let mut header = (max as u32 + 1).to_be_bytes().to_vec();
        header.push(kind);
        assert_eq!(peek_header(&header), Ok(Some((kind, max))));
        assert_eq!(decode(&header), Ok(None));

        // One byte over is refused with nothing but the 5 header bytes.
        let mut header = (max as u32 + 2).to_be_bytes().to_vec();
        header.push(kind);
        let want = DecodeError::TooLong {
            kind,
            len: max + 1,
            max,
        };
        assert_eq!(peek_header(&header), Err(want.clone()));
        assert_eq!(decode(&header), Err(want));

        let mut header = u32::MAX.to_be_bytes().to_vec();
        header.push(kind);
        assert!(matches!(decode(&header), Err(DecodeError::TooLong { .. })));
    }
}

#[test]
fn small_frames_have_small_limits() {
    // A control frame may not announce megabytes, even though chunks can.
    for kind in [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x10, 0x11, 0x15, 0x17, 0x19, 0x1a,
    ] {
        assert!(max_body_len(kind).unwrap() <= 4096, "kind 0x{kind:02x}");
    }
    assert_eq!(max_body_len(0x23), Some(4 + MAX_CHUNK_SIZE as usize));
    assert_eq!(
        max_body_len(0x21),
        Some(48 + 32 * MAX_CHUNKS as usize),
        "manifest limit fits exactly MAX_CHUNKS hashes"
    );
}

#[test]
fn unknown_kinds_are_refused() {
    let mut unknown = 0;
    for kind in 0..=255u8 {
        if max_body_len(kind).is_some() {
            continue;
        }
        unknown += 1;
        assert_eq!(kind_name(kind), "unknown");
        let f = [0, 0, 0, 1, kind];
        assert_eq!(peek_header(&f), Err(DecodeError::UnknownKind(kind)));
        assert_eq!(decode(&f), Err(DecodeError::UnknownKind(kind)));
        // Refused from the header even when the body is not there yet.
        let f = [0, 0, 0, 100, kind];
        assert_eq!(decode(&f), Err(DecodeError::UnknownKind(kind)));
    }
    assert_eq!(unknown, 256 - VARIANTS);
}

#[test]
fn http_request_is_not_a_frame() {
    // "GET /" reads as a ~1.2 GB frame of kind '/': refused at once.
    assert!(decode(b"GET / HTTP/1.1\r\n").is_err());
}

#[test]
fn length_zero_is_an_error() {
    for kind in (0..=255u8).filter(|&k| max_body_len(k).is_some()) {
        let f = [0, 0, 0, 0, kind];
        assert_eq!(peek_header(&f), Err(DecodeError::Truncated { kind }));
        assert_eq!(decode(&f), Err(DecodeError::Truncated { kind }));
    }
}

#[test]
fn two_frames_back_to_back() {
    let first = Message::Chunk {
        index: 9,
        data: b"abc",
    };
    let second = Message::WhoHas {
        name: name("a.txt"),
    };
    let mut buf = Vec::new();
    encode(&first, &mut buf);
    let first_len = buf.len();
    encode(&second, &mut buf);
    let second_len = buf.len() - first_len;
    // Half of a third frame: present but not complete.
    buf.extend_from_slice(&[0, 0, 0, 9, 0x04, 1, 2]);

    let (msg, n) = decode(&buf).unwrap().unwrap();
    assert_eq!((msg, n), (first, first_len));
    let rest = &buf[n..];
    let (msg, m) = decode(rest).unwrap().unwrap();
    assert_eq!((msg, m), (second, second_len));
    assert_eq!(decode(&rest[m..]), Ok(None));
}

#[test]
fn chunk_header_plus_payload_is_a_chunk() {
    let data = b"some chunk bytes";
    let mut split = Vec::new();
    encode_chunk_header(77, data.len() as u32, &mut split);
    assert_eq!(split.len(), HEADER_LEN + 4);
    split.extend_from_slice(data);

    let whole = encoded(&Message::Chunk { index: 77, data });
    assert_eq!(split, whole);
    assert_eq!(
        decode(&split),
        Ok(Some((Message::Chunk { index: 77, data }, whole.len())))
    );

    // The decoded payload borrows the input: no copy.
    let Some((Message::Chunk { data: got, .. }, _)) = decode(&split).unwrap() else {
        panic!("not a chunk");
    };
    assert_eq!(got.as_ptr(), split[HEADER_LEN + 4..].as_ptr());
}

// ---- bad fields ----------------------------------------------------------

#[test]
fn hello_with_bad_magic() {
    let f = [0, 0, 0, 8, 0x01, b'H', b'T', b'T', b'P', 0, 1, 3];
    assert_eq!(decode(&f), Err(DecodeError::BadMagic(*b"HTTP")));
}

#[test]
fn hello_with_unknown_role() {
    for role in [0x00, 0x04, 0xff] {
        let f = [0, 0, 0, 8, 0x01, b'S', b'H', b'O', b'L', 0, 1, role];
        assert_eq!(
            decode(&f),
            Err(DecodeError::BadValue {
                kind: 0x01,
                what: "role"
            })
        );
    }
}

#[test]
fn bad_address_family() {
    let bad_family = DecodeError::BadValue {
        kind: 0x10,
        what: "address family",
    };
    for family in [1, 5, 0xff] {
        let f = frame(0x10, &[0x1b, 0x59, family, 10, 0, 0, 1, 0, 1]);
        assert_eq!(decode(&f), Err(bad_family.clone()));
    }
    // A peer entry must have an address: family 0 is refused there.
    let body = cat(&[&[0, 0, 0, 1], &[0; 8], &[0x00, 0, 0, 0, 0, 0, 0], &[0; 32]]);
    assert_eq!(
        decode(&frame(0x12, &body)),
        Err(DecodeError::BadValue {
            kind: 0x12,
            what: "address family"
        })
    );
}

#[test]
fn bad_root_flag() {
    for flag in [2, 0xff] {
        let body = cat(&[&[0, 1, b'a', flag], &[0xaa; 32]]);
        assert_eq!(
            decode(&frame(0x20, &body)),
            Err(DecodeError::BadValue {
                kind: 0x20,
                what: "root flag"
            })
        );
    }
}

#[test]
fn manifest_chunk_size_must_be_a_power_of_two_in_range() {
    let manifest = |chunk_size: u32| {
        frame(
            0x21,
            &cat(&[
                &[0xcc; 32],
                &[0; 8],
                &chunk_size.to_be_bytes(),
                &[0, 0, 0, 0],
            ]),
        )
    };
    for good in [MIN_CHUNK_SIZE, 256 << 10, MAX_CHUNK_SIZE] {
        assert!(decode(&manifest(good)).is_ok(), "{good}");
    }
    let bad_size = DecodeError::BadValue {
        kind: 0x21,
        what: "chunk size",
    };
    for bad in [
        0,
        1,
        MIN_CHUNK_SIZE / 2,
        MIN_CHUNK_SIZE + 1,
        3 << 16,
        MAX_CHUNK_SIZE * 2,
        u32::MAX,
    ] {
        assert_eq!(decode(&manifest(bad)), Err(bad_size.clone()), "{bad}");
    }
}

#[test]
fn trailing_bytes_are_refused() {
    for (msg, golden) in all_cases() {
        if matches!(msg, Message::Chunk { .. }) {
            continue; // a chunk's payload is the rest of the frame
        }
        let mut body = golden[HEADER_LEN..].to_vec();
        body.push(0);
        let kind = golden[4];
        assert_eq!(
            decode(&frame(kind, &body)),
            Err(DecodeError::TrailingBytes { kind }),
            "{msg:?}"
        );
    }
}

#[test]
fn short_bodies_are_truncated_errors() {
    // A complete frame whose body stops early is an error, not "need more".
    for (msg, golden) in all_cases() {
        let kind = golden[4];
        for cut in HEADER_LEN..golden.len() {
            let f = frame(kind, &golden[HEADER_LEN..cut]);
            let got = decode(&f);
            let ok_shorter = match msg {
                // Lists and payloads have shorter valid forms.
                Message::Chunk { .. } => cut >= HEADER_LEN + 4,
                _ => false,
            };
            if ok_shorter {
                continue;
            }
            assert!(got.is_err(), "{msg:?} cut to body {cut}: {got:?}");
        }
    }
}

#[test]
fn strings_must_be_utf8() {
    assert_eq!(
        decode(&frame(0x02, &[0, 2, 0, 1, 0xff])),
        Err(DecodeError::BadUtf8 { kind: 0x02 })
    );
    assert_eq!(
        decode(&frame(0x15, &[0, 2, 0xc3, 0x28])),
        Err(DecodeError::BadUtf8 { kind: 0x15 })
    );
    let body = cat(&[&[0, 0, 0, 1, 0, 1, 0x80], &[0; 8], &[0; 32]]);
    assert_eq!(
        decode(&frame(0x14, &body)),
        Err(DecodeError::BadUtf8 { kind: 0x14 })
    );
}

#[test]
fn hostile_file_names_are_refused() {
    let hostile: [&[u8]; 7] = [
        b"../x",
        b"/etc/passwd",
        b"a/b",
        b"",
        b"a\0b",
        b"..",
        b"a\\b",
    ];
    for bad in hostile {
        let name = cat(&[&(bad.len() as u16).to_be_bytes(), bad]);
        let who_has = frame(0x15, &name);
        let get_manifest = frame(0x20, &cat(&[&name, &[0]]));
        // One spare byte, so an empty name still passes the count check.
        let share = frame(
            0x14,
            &cat(&[&[0, 0, 0, 1], &name, &[0; 8], &[0xaa; 32], &[0]]),
        );
        for f in [who_has, get_manifest, share] {
            assert!(
                matches!(decode(&f), Err(DecodeError::BadFileName(_))),
                "{bad:?} in kind 0x{:02x}: {:?}",
                f[4],
                decode(&f)
            );
        }
    }
    // Over 255 bytes is refused before it is even read as UTF-8.
    let long = cat(&[&[1, 0], &[b'x'; 256]]);
    assert!(decode(&frame(0x15, &long)).is_err());
    let ok = cat(&[&[0, 255], &[b'x'; 255]]);
    assert!(decode(&frame(0x15, &ok)).is_ok());
}

#[test]
fn lying_counts_fail_without_allocating() {
    let huge = u32::MAX.to_be_bytes();
    // Each would ask for gigabytes if the count were believed.
    let frames = [
        frame(0x12, &cat(&[&huge, &[0; 15]])),
        frame(0x13, &cat(&[&[0, 0, 0, 0], &huge, &[0; 8]])),
        frame(0x13, &cat(&[&huge])),
        frame(0x14, &cat(&[&huge, &[0; 43]])),
        frame(0x16, &cat(&[&[0, 1, b'a', 0], &huge, &[0; 48]])),
        frame(
            0x16,
            &cat(&[&[0, 1, b'a', 0, 0, 0, 0, 1], &[0; 44], &huge, &[0; 15]]),
        ),
        frame(0x18, &cat(&[&huge, &[0; 47]])),
        frame(
            0x21,
            &cat(&[&[0; 32], &[0; 8], &[0, 4, 0, 0], &huge, &[0; 32]]),
        ),
    ];
    for f in &frames {
        assert!(
            matches!(decode(f), Err(DecodeError::Truncated { .. })),
            "kind 0x{:02x}: {:?}",
            f[4],
            decode(f)
        );
    }
    // One more than the bytes present is already refused.
    let f = frame(0x12, &cat(&[&[0, 0, 0, 2], &[0; 15]]));
    assert_eq!(decode(&f), Err(DecodeError::Truncated { kind: 0x12 }));
}

// ---- error frames --------------------------------------------------------

#[test]
fn long_reason_is_cut_on_a_char_boundary() {
    // 'a' then 2-byte chars: byte 1024 falls inside a character.
    let reason = format!("a{}", "é".repeat(600));
    let msg = Message::Error {
        code: ErrorCode::Protocol,
        reason,
    };
    let bytes = encoded(&msg);
    let Some((Message::Error { code, reason }, n)) = decode(&bytes).unwrap() else {
        panic!("not an error frame");
    };
    assert_eq!(n, bytes.len());
    assert_eq!(code, ErrorCode::Protocol);
    assert_eq!(reason.len(), MAX_REASON_LEN - 1);
    assert_eq!(reason, format!("a{}", "é".repeat(511)));

    // 4-byte characters, cut mid-character too.
    let msg = Message::Error {
        code: ErrorCode::Busy,
        reason: format!("ab{}", "🦀".repeat(300)),
    };
    let bytes = encoded(&msg);
    let (back, _) = decode(&bytes).unwrap().unwrap();
    let Message::Error { reason, .. } = back else {
        panic!("not an error frame");
    };
    assert!(reason.len() <= MAX_REASON_LEN && reason.len() > MAX_REASON_LEN - 4);
    assert!(reason.starts_with("ab🦀"));

    // Exactly at the limit nothing is cut.
    let msg = Message::Error {
        code: ErrorCode::Internal,
        reason: "r".repeat(MAX_REASON_LEN),
    };
    assert_eq!(decode(&encoded(&msg)).unwrap().unwrap().0, msg);

    // A reason over the limit on the wire is refused, not cut.
    let body = cat(&[&[0, 2], &1025u16.to_be_bytes(), &[b'r'; 1025]]);
    assert!(decode(&frame(0x02, &body)).is_err());
}

#[test]
fn hostile_reasons_are_sanitized_at_decode() {
    let raw = "bad\n[ERROR] forged\u{1b}[2J\u{202e}\u{8}\u{85} \\x1b é 文";
    let body = cat(&[&[0, 6], &(raw.len() as u16).to_be_bytes(), raw.as_bytes()]);
    let Some((Message::Error { code, reason }, _)) = decode(&frame(0x02, &body)).unwrap() else {
        panic!("not an error frame");
    };
    assert_eq!(code, ErrorCode::Internal);
    assert_eq!(
        reason,
        "bad\\n[ERROR] forged\\x1b[2J\\u{202e}\\x08\\u{85} \\x1b é 文"
    );
    // Sanitized text is stable: it re-encodes and decodes to itself.
    let msg = Message::Error { code, reason };
    assert_eq!(decode(&encoded(&msg)).unwrap().unwrap().0, msg);

    // Escapes can grow the text; it is still cut to the limit, on a whole escape.
    let raw = "\u{1b}".repeat(MAX_REASON_LEN);
    let body = cat(&[&[0, 2], &(raw.len() as u16).to_be_bytes(), raw.as_bytes()]);
    let Some((Message::Error { reason, .. }, _)) = decode(&frame(0x02, &body)).unwrap() else {
        panic!("not an error frame");
    };
    assert_eq!(reason, "\\x1b".repeat(MAX_REASON_LEN / 4));
}

#[test]
fn unknown_error_codes_decode_as_other() {
    for code in [0x0000u16, 0x0008, 0x0042, 0x8000, 0xfffe, 0xffff] {
        let body = cat(&[&code.to_be_bytes(), &[0, 1, b'?']]);
        assert_eq!(
            decode(&frame(0x02, &body)).unwrap().unwrap().0,
            Message::Error {
                code: ErrorCode::Other,
                reason: "?".into()
            }
        );
    }
    let known = [
        (0x0001, ErrorCode::Incompatible),
        (0x0002, ErrorCode::Protocol),
        (0x0003, ErrorCode::NotFound),
        (0x0004, ErrorCode::OutOfRange),
        (0x0005, ErrorCode::Busy),
        (0x0006, ErrorCode::Internal),
    ];
    for (wire, code) in known {
        let body = cat(&[&u16::to_be_bytes(wire), &[0, 0]]);
        assert_eq!(
            decode(&frame(0x02, &body)).unwrap().unwrap().0,
            Message::Error {
                code,
                reason: String::new()
            }
        );
        assert_eq!(code as u16, wire);
    }
}

#[test]
fn decode_errors_display_without_panicking() {
    let errors = [
        DecodeError::TooLong {
            kind: 1,
            len: 5000,
            max: 4096,
        },
        DecodeError::UnknownKind(0xee),
        DecodeError::Truncated { kind: 2 },
        DecodeError::TrailingBytes { kind: 3 },
        DecodeError::BadMagic(*b"HTTP"),
        DecodeError::BadValue {
            kind: 4,
            what: "role",
        },
        DecodeError::BadFileName("../x".into()),
        DecodeError::BadUtf8 { kind: 5 },
    ];
    for e in errors {
        assert!(!e.to_string().is_empty());
    }
}

// ---- random input --------------------------------------------------------

/// Seeded, so a failure replays.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    fn below(&mut self, n: usize) -> usize {
        self.0.usize(..n)
    }

    fn byte(&mut self) -> u8 {
        self.0.u8(..)
    }
}

/// Decodes `input` as a stream, checking what must always hold: no panic,
/// `consumed` within the input and past the header, and a decoded message
/// re-encodes to something that decodes to the same message.
fn check_stream(input: &[u8]) -> usize {
    let mut buf = input;
    let mut frames = 0;
    while let Ok(Some((msg, n))) = decode(buf) {
        assert!(
            n <= buf.len() && n >= HEADER_LEN,
            "consumed {n} of {}",
            buf.len()
        );
        let again = encoded(&msg);
        assert_eq!(decode(&again), Ok(Some((msg, again.len()))));
        buf = &buf[n..];
        frames += 1;
    }
    frames
}

#[test]
fn random_bytes_never_panic() {
    let mut rng = Rng::new(0x5eed_f00d_cafe_babe);
    let mut decoded = 0;
    for _ in 0..20_000 {
        let len = rng.below(80);
        let mut input: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        // Mostly plausible headers, so bodies get parsed too.
        if len >= HEADER_LEN && rng.below(4) != 0 {
            // Frame length: one short, exact, or one past the input.
            let len_field = (len - HEADER_LEN + rng.below(3)) as u32;
            input[..4].copy_from_slice(&len_field.to_be_bytes());
            const KINDS: [u8; 15] = [
                0x01, 0x02, 0x04, 0x10, 0x11, 0x12, 0x13, 0x14, 0x16, 0x18, 0x20, 0x21, 0x22, 0x23,
                0x24,
            ];
            input[4] = KINDS[rng.below(KINDS.len())];
        }
        decoded += check_stream(&input);
    }
    assert!(
        decoded > 0,
        "no random input ever decoded: the test is too weak"
    );
}

#[test]
fn mutated_frames_never_panic() {
    let mut rng = Rng::new(0x1234_5678_9abc_def1);
    let cases = all_cases();
    let mut decoded = 0;
    let mut refused = 0;
    for _ in 0..20_000 {
        let (_, golden) = &cases[rng.below(cases.len())];
        let mut input = golden.clone();
        for _ in 0..=rng.below(3) {
            match rng.below(5) {
                0 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input[i] = rng.byte();
                }
                1 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input[i] ^= 1 << rng.below(8);
                }
                2 => {
                    let i = rng.below(input.len() + 1);
                    input.insert(i, rng.byte());
                }
                3 if !input.is_empty() => {
                    input.remove(rng.below(input.len()));
                }
                _ => {
                    // Another whole frame after this one.
                    input.extend_from_slice(&cases[rng.below(cases.len())].1);
                }
            }
        }
        // Keep the length field honest half the time, so the body is parsed.
        if input.len() >= HEADER_LEN && rng.below(2) == 0 {
            let len = (input.len() - 4) as u32;
            input[..4].copy_from_slice(&len.to_be_bytes());
        }
        match decode(&input) {
            Ok(Some(_)) => decoded += 1,
            Err(_) => refused += 1,
            Ok(None) => {}
        }
        check_stream(&input);
    }
    assert!(
        decoded > 1000 && refused > 1000,
        "{decoded} decoded, {refused} refused"
    );
}

#[test]
fn encode_manifest_matches_encoding_the_message() {
    let hashes: Vec<Hash> = (0..3u8).map(|i| Hash([i; 32])).collect();
    let msg = Message::Manifest {
        root: Hash([9; 32]),
        size: 70_000,
        chunk_size: 32 << 10,
        hashes: hashes.clone(),
    };
    let mut expected = vec![0xaa];
    encode(&msg, &mut expected);
    let mut got = vec![0xaa];
    encode_manifest(&Hash([9; 32]), 70_000, 32 << 10, &hashes, &mut got);
    assert_eq!(got, expected);
}
