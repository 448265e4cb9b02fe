//! The hash cache `DIR/.shoal/index.v1`: every shared file's manifest with the
//! size, mtime and inode it was hashed at, so a restart rehashes only what
//! changed. (Version 1 of the file name; version 2 of the layout, which added
//! the inode.)
//!
//! Layout, all integers big-endian:
//! ```text
//! magic "shoalidx" | version u32 | entry count u32 | entries | blake3 of all before (32)
//! entry: name len u16 | name | size u64 | mtime ns i128 | inode u64 | chunk size u32
//!        | root (32) | hash count u32 | hashes (32 each)
//! ```
//! The file is only a hint: anything odd about it (truncated, corrupt, written
//! by another version) makes the caller discard it and rehash.

use std::collections::BTreeMap;
use std::io::Read;

use byteorder::{BigEndian, ReadBytesExt};

use super::dirs::FileStamp;
use super::manifest::Manifest;
use crate::wire::{FileName, Hash, MAX_CHUNKS, MAX_NAME_LEN};

const MAGIC: &[u8; 8] = b"shoalidx";
const VERSION: u32 = 2;
const CHECKSUM_LEN: usize = 32;

/// The cache file's name inside `DIR/.shoal/`.
pub(crate) const CACHE_FILE: &str = "index.v1";

/// One file as the cache remembers it: enough to tell, from a stat alone,
/// whether `manifest` still describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CachedFile {
    pub ino: u64,
    pub mtime_ns: i128,
    pub manifest: Manifest,
}

impl CachedFile {
    /// Whether a file seen with `stamp` still has the cached contents.
    pub fn vouches_for(&self, stamp: &FileStamp) -> bool {
        self.ino == stamp.ino && self.mtime_ns == stamp.mtime_ns && self.manifest.size == stamp.size
    }
}

/// Serializes the shared set, given in name order as (name, stamp, manifest).
pub(crate) fn encode<'a>(
    files: impl ExactSizeIterator<Item = (&'a FileName, &'a FileStamp, &'a Manifest)>,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(files.len() as u32).to_be_bytes());
    for (name, stamp, manifest) in files {
        let name = name.as_str().as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&manifest.size.to_be_bytes());
        out.extend_from_slice(&stamp.mtime_ns.to_be_bytes());
        out.extend_from_slice(&stamp.ino.to_be_bytes());
        out.extend_from_slice(&manifest.chunk_size.to_be_bytes());
        out.extend_from_slice(&manifest.root.0);
        out.extend_from_slice(&manifest.chunk_count().to_be_bytes());
        for hash in &manifest.hashes {
            out.extend_from_slice(&hash.0);
        }
    }
    let checksum = blake3::hash(&out);
    out.extend_from_slice(checksum.as_bytes());
    out
}

/// Parses a cache file. The reason on failure is for a log line; the caller
/// then rehashes everything.
pub(crate) fn decode(bytes: &[u8]) -> Result<BTreeMap<FileName, CachedFile>, &'static str> {
    if !bytes.starts_with(MAGIC) {
        return Err("not a shoal index");
    }
    let mut rest = &bytes[MAGIC.len()..];
    let version = rest.read_u32::<BigEndian>().map_err(|_| "truncated")?;
    if version != VERSION {
        return Err("written by another shoal version");
    }
    // Magic, version, entry count and checksum at least.
    if bytes.len() < MAGIC.len() + 8 + CHECKSUM_LEN {
        return Err("truncated");
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if blake3::hash(body).as_bytes() != checksum {
        return Err("checksum mismatch (truncated or corrupt)");
    }
    rest = &body[MAGIC.len() + 4..];
    let count = rest.read_u32::<BigEndian>().map_err(|_| "truncated")?;
    let mut files = BTreeMap::new();
    for _ in 0..count {
        let (name, file) = read_entry(&mut rest)?;
        if files.insert(name, file).is_some() {
            return Err("duplicate entry");
        }
    }
    if !rest.is_empty() {
        return Err("trailing bytes");
    }
    Ok(files)
}

/// Reads one entry. Every length is checked against the bytes actually left
/// before anything is allocated from it.
fn read_entry(rest: &mut &[u8]) -> Result<(FileName, CachedFile), &'static str> {
    const TRUNCATED: &str = "truncated";
    let name_len = usize::from(rest.read_u16::<BigEndian>().map_err(|_| TRUNCATED)?);
    if name_len > MAX_NAME_LEN || name_len > rest.len() {
        return Err("bad name length");
    }
    let (name, tail) = rest.split_at(name_len);
    *rest = tail;
    let name = std::str::from_utf8(name).map_err(|_| "name not UTF-8")?;
    let name = FileName::new(name).map_err(|_| "bad name")?;
    let size = rest.read_u64::<BigEndian>().map_err(|_| TRUNCATED)?;
    let mtime_ns = rest.read_i128::<BigEndian>().map_err(|_| TRUNCATED)?;
    let ino = rest.read_u64::<BigEndian>().map_err(|_| TRUNCATED)?;
    let chunk_size = rest.read_u32::<BigEndian>().map_err(|_| TRUNCATED)?;
    let root = read_hash(rest)?;
    let hash_count = rest.read_u32::<BigEndian>().map_err(|_| TRUNCATED)?;
    if hash_count > MAX_CHUNKS || hash_count as usize * 32 > rest.len() {
        return Err("bad hash count");
    }
    let hashes = (0..hash_count)
        .map(|_| read_hash(rest))
        .collect::<Result<Vec<_>, _>>()?;
    let manifest =
        Manifest::from_wire(root, size, chunk_size, hashes).map_err(|_| "bad manifest")?;
    Ok((
        name,
        CachedFile {
            ino,
            mtime_ns,
            manifest,
        },
    ))
}

fn read_hash(rest: &mut &[u8]) -> Result<Hash, &'static str> {
    let mut hash = [0u8; 32];
    rest.read_exact(&mut hash).map_err(|_| "truncated")?;
    Ok(Hash(hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::hash_chunk;

    fn sample() -> Vec<(FileName, FileStamp, Manifest)> {
        ["a.txt", "b.bin"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let hashes = vec![hash_chunk(name.as_bytes()); i + 1];
                let manifest = Manifest::from_hashes(300_000 * i as u64 + 1, 256 << 10, hashes);
                let stamp = FileStamp {
                    dev: 7,
                    ino: 1 << 40 | i as u64,
                    size: manifest.size,
                    mtime_ns: -5 + i as i128 * 1_700_000_000_123_456_789,
                    ctime_ns: 3,
                };
                (FileName::new(name).unwrap(), stamp, manifest)
            })
            .collect()
    }

    fn encoded(files: &[(FileName, FileStamp, Manifest)]) -> Vec<u8> {
        encode(files.iter().map(|(n, s, m)| (n, s, m)))
    }

    #[test]
    fn round_trip() {
        let files = sample();
        let decoded = decode(&encoded(&files)).unwrap();
        assert_eq!(decoded.len(), files.len());
        for ((name, stamp, manifest), (got_name, got)) in files.iter().zip(&decoded) {
            assert_eq!(got_name, name);
            assert_eq!(&got.manifest, manifest);
            assert!(got.vouches_for(stamp));
            let moved = FileStamp {
                ino: stamp.ino + 1,
                ..*stamp
            };
            assert!(!got.vouches_for(&moved), "another inode is another file");
            let touched = FileStamp {
                mtime_ns: stamp.mtime_ns + 1,
                ..*stamp
            };
            assert!(!got.vouches_for(&touched));
        }
    }

    #[test]
    fn every_truncation_and_bit_flip_is_refused() {
        let bytes = encoded(&sample());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "truncated to {len}");
        }
        for i in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[i] ^= 0x10;
            assert!(decode(&flipped).is_err(), "flip at {i}");
        }
    }

    #[test]
    fn huge_counts_with_a_valid_checksum_do_not_allocate() {
        // A well-formed checksum over lying lengths: only the length checks stand
        // between this and a giant allocation.
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&VERSION.to_be_bytes());
        body.extend_from_slice(&1u32.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.push(b'x');
        body.extend_from_slice(&[0; 8 + 16 + 8 + 4 + 32]);
        body.extend_from_slice(&u32::MAX.to_be_bytes());
        let checksum = *blake3::hash(&body).as_bytes();
        body.extend_from_slice(&checksum);
        assert_eq!(decode(&body), Err("bad hash count"));
    }
}
