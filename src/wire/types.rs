//! Value types carried in frames. Each one is parsed, not merely checked:
//! once a `FileName` exists it is known to be safe to join onto a folder.

use std::fmt;
use std::net::SocketAddr;

use super::{DecodeError, MAX_NAME_LEN};
use crate::text::escape;

/// The manager's name for one registration; never reused within a manager run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerId(pub u64);

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A BLAKE3 digest: of one chunk, or the root over a whole file's manifest.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// Lowercase hex, as users see and type it.
    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// Parses exactly 64 hex digits (the form `to_hex` prints; either case),
    /// nothing else: no sign, no space, no prefix.
    pub fn from_hex(s: &str) -> Option<Hash> {
        blake3::Hash::from_hex(s).ok().map(|h| Hash(*h.as_bytes()))
    }

    /// The first 12 hex digits: enough to tell versions apart in logs.
    pub fn short(&self) -> String {
        self.to_hex()[..12].to_string()
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({})", self.short())
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A shared file's name: exactly one plain path component, so joining it onto
/// the shared folder can never escape it. Refuses empty names, `.`, `..`,
/// anything with `/`, `\` or NUL, and names over 255 bytes.
///
/// Any other character is allowed, controls and bidi overrides included (a
/// name that cannot be shown faithfully is still listed): `Display` and
/// `Debug` show the name escaped (`crate::text::escape`), `as_str` gives the
/// raw name for lookups, paths and the wire. Never print `as_str()`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileName(String);

impl FileName {
    pub fn new(name: &str) -> Result<FileName, DecodeError> {
        let bad = name.is_empty()
            || name == "."
            || name == ".."
            || name.len() > MAX_NAME_LEN
            || name.contains(['/', '\\', '\0']);
        if bad {
            Err(DecodeError::BadFileName(name.chars().take(64).collect()))
        } else {
            Ok(FileName(name.to_string()))
        }
    }

    /// The raw name, for lookups, paths and encoding; not for printing.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Escaped: a name from the network may hold controls and bidi overrides.
impl fmt::Display for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&escape(&self.0), f)
    }
}

impl fmt::Debug for FileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileName({:?})", escape(&self.0))
    }
}

/// Which side of which link a hello comes from; lets the manager refuse a
/// peer-to-peer hello on its port with a clear message, and vice versa.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A peer talking to the manager (registering, or only asking questions).
    ManagerClient = 0x01,
    /// The manager answering a `ManagerClient`.
    Manager = 0x02,
    /// Either end of a peer-to-peer data connection.
    Peer = 0x03,
}

impl Role {
    pub(super) fn from_u8(v: u8) -> Option<Role> {
        match v {
            0x01 => Some(Role::ManagerClient),
            0x02 => Some(Role::Manager),
            0x03 => Some(Role::Peer),
            _ => None,
        }
    }
}

/// Machine-readable reason in an error frame; the text beside it is for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Magic, version or role did not match.
    Incompatible = 0x0001,
    /// A frame that did not decode, or was wrong for the connection's state.
    Protocol = 0x0002,
    /// The named file or version is not shared here.
    NotFound = 0x0003,
    /// A chunk index past the end of the file.
    OutOfRange = 0x0004,
    /// Too many connections or queued requests; try elsewhere or later.
    Busy = 0x0005,
    /// The server hit a local problem (unreadable file, ...).
    Internal = 0x0006,
    /// The frame broke a documented limit (too many files, two versions of
    /// one name, an absurd size, a frame too long for the sender's state).
    Limit = 0x0007,
    /// A code this build does not know (kept so newer peers can add codes).
    Other = 0xffff,
}

impl ErrorCode {
    pub(super) fn from_u16(v: u16) -> ErrorCode {
        match v {
            0x0001 => ErrorCode::Incompatible,
            0x0002 => ErrorCode::Protocol,
            0x0003 => ErrorCode::NotFound,
            0x0004 => ErrorCode::OutOfRange,
            0x0005 => ErrorCode::Busy,
            0x0006 => ErrorCode::Internal,
            0x0007 => ErrorCode::Limit,
            _ => ErrorCode::Other,
        }
    }
}

/// One live peer as the manager lists it: who, where it serves chunks, and
/// the public key its Noise handshake proved (all zero on an open network).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerEntry {
    pub id: PeerId,
    pub addr: SocketAddr,
    pub key: PeerKey,
}

/// A peer's static X25519 public key, as its handshake authenticated it.
/// [`PeerKey::UNKNOWN`] (all zero) stands for "not authenticated": an open
/// network, where nobody proves a key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct PeerKey(pub [u8; 32]);

impl PeerKey {
    pub const UNKNOWN: PeerKey = PeerKey([0; 32]);

    pub fn is_known(&self) -> bool {
        *self != PeerKey::UNKNOWN
    }

    /// The 52-letter form users see, copy and list in `--allow` files.
    pub fn to_text(&self) -> String {
        base32_encode(&self.0)
    }

    /// Parses the form [`PeerKey::to_text`] prints (either case).
    pub fn from_text(s: &str) -> Option<PeerKey> {
        base32_decode(s).map(PeerKey)
    }
}

impl fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerKey({})", self.to_text())
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// RFC 4648 base32, lowercase, no padding: 32 bytes become 52 letters and
/// digits, nothing a shell or a command line treats specially.
pub fn base32_encode(bytes: &[u8; 32]) -> String {
    let mut out = String::with_capacity(52);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(BASE32[((acc >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(BASE32[((acc << (5 - bits)) & 31) as usize] as char);
    }
    out
}

/// The inverse of [`base32_encode`]: exactly 52 symbols whose last one
/// carries no stray bits (so each key has one text form).
pub fn base32_decode(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 52 {
        return None;
    }
    let mut out = [0u8; 32];
    let (mut acc, mut bits, mut n) = (0u32, 0u32, 0usize);
    for &c in s {
        let v = BASE32.iter().position(|&x| x == c.to_ascii_lowercase())? as u32;
        acc = (acc << 5) | v;
        bits += 5;
        if bits >= 8 {
            bits -= 8;
            *out.get_mut(n)? = (acc >> bits) as u8;
            n += 1;
        }
        acc &= (1 << bits) - 1;
    }
    (n == 32 && acc == 0).then_some(out)
}

/// One file a peer shares, as reported to the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSummary {
    pub name: FileName,
    pub size: u64,
    pub root: Hash,
}

/// One file on the network, as the manager lists it (per name and version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkFile {
    pub name: FileName,
    pub size: u64,
    pub root: Hash,
    pub holders: u32,
}

/// The peers holding one version of a file. `holders` is how many live
/// registrations hold it (one vote each); `peers` may list only some of them
/// (at most [`super::MAX_HOLDERS_PER_GROUP`]), so choose versions by `holders`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HolderGroup {
    pub root: Hash,
    pub size: u64,
    pub holders: u32,
    pub peers: Vec<PeerEntry>,
}

/// Where a `ListFiles` page starts: strictly after this (name, root, size),
/// the order `FileList` entries come in. A key, not an offset, so a page
/// costs the manager O(page) and stays correct while the index changes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FileCursor {
    pub name: FileName,
    pub root: Hash,
    pub size: u64,
}

impl NetworkFile {
    /// The cursor that asks for the page after this entry.
    pub fn cursor(&self) -> FileCursor {
        FileCursor {
            name: self.name.clone(),
            root: self.root,
            size: self.size,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_name_refuses_anything_but_one_component() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            "a\\b",
            "a\0b",
            &"x".repeat(256),
        ] {
            assert!(FileName::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["file1.txt", "..hidden", "a..b", "é.bin", &"x".repeat(255)] {
            assert_eq!(FileName::new(good).unwrap().as_str(), good);
        }
    }

    #[test]
    fn file_names_display_escaped_but_stay_raw_for_lookups() {
        let raw = "a\u{1b}[2J\nb\u{202e}c\u{8}.txt";
        let name = FileName::new(raw).unwrap();
        assert_eq!(name.as_str(), raw);
        assert_eq!(name.to_string(), "a\\x1b[2J\\nb\\u{202e}c\\x08.txt");
        assert_eq!(
            format!("{name:?}"),
            "FileName(\"a\\x1b[2J\\nb\\u{202e}c\\x08.txt\")"
        );
        assert_eq!(format!("{:<6}|", FileName::new("\n").unwrap()), "\\n    |");
        for good in ["café.txt", "文件.txt"] {
            assert_eq!(FileName::new(good).unwrap().to_string(), good);
        }
    }

    #[test]
    fn peer_key_text_round_trips_and_is_canonical() {
        for k in [[0u8; 32], [0xff; 32], std::array::from_fn(|i| i as u8 * 37)] {
            let key = PeerKey(k);
            let text = key.to_text();
            assert_eq!(text.len(), 52);
            assert_eq!(PeerKey::from_text(&text), Some(key));
            assert_eq!(PeerKey::from_text(&text.to_uppercase()), Some(key));
        }
        // The last symbol of 0xff.. carries one bit ('q' = 10000); 'r' sets a stray bit.
        let mut t = PeerKey([0xff; 32]).to_text();
        assert!(t.ends_with('q'));
        t.pop();
        assert_eq!(PeerKey::from_text(&(t.clone() + "r")), None);
        assert_eq!(PeerKey::from_text(&t), None);
        assert_eq!(PeerKey::from_text(&(t + "1")), None);
    }

    #[test]
    fn hash_hex_round_trips() {
        let h = Hash(std::array::from_fn(|i| i as u8 * 7));
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
        // from_str_radix takes a sign: "+f" must not pass for a hex pair.
        let signed = format!("+f{}", &h.to_hex()[2..]);
        assert_eq!(Hash::from_hex(&signed), None);
        assert_eq!(Hash::from_hex(&format!(" {}", &h.to_hex()[1..])), None);
        assert_eq!(Hash::from_hex(&h.to_hex().to_uppercase()), Some(h));
    }
}
