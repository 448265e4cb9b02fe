//! How a file is cut into chunks and named by one root hash.
//!
//! A file of `size` bytes is cut into chunks of `chunk_size` bytes (the last
//! one shorter); each chunk is named by its BLAKE3 hash, and the whole file by
//! the root: BLAKE3 over a domain tag, the size, the chunk size and every
//! chunk hash. Two files with the same root have the same bytes, so the root
//! is the file's identity on the network and every chunk can be checked alone.

use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::wire::{Hash, MAX_CHUNK_SIZE, MAX_CHUNKS, MIN_CHUNK_SIZE};

/// Chunk size for files up to 2 GiB. Chosen by measurement (1 GiB, one
/// seeder, loopback, median of 7): 1 MiB chunks 650 MB/s, 256 KiB 900-1100,
/// 64 KiB 1300, 32 KiB 1600. A small chunk is received, hashed and written
/// while it is still in the CPU cache; per-chunk overhead stays small.
const BASE_CHUNK_SIZE: u32 = 32 << 10;

/// Chunk counts above this double the chunk size, keeping manifests of big
/// files to a few megabytes of hashes.
const TARGET_MAX_CHUNKS: u64 = 1 << 16;

/// Separates shoal roots from any other BLAKE3 use, and lets a later format
/// change its layout without colliding with this one.
const ROOT_DOMAIN: &[u8] = b"shoal-root-v1";

/// The chunk size a peer uses when it indexes a file of `file_size` bytes.
pub fn chunk_size_for(file_size: u64) -> u32 {
    let mut chunk_size = BASE_CHUNK_SIZE;
    while file_size.div_ceil(u64::from(chunk_size)) > TARGET_MAX_CHUNKS
        && chunk_size < MAX_CHUNK_SIZE
    {
        chunk_size *= 2;
    }
    chunk_size
}

/// The name of one chunk's bytes, checked on every chunk a peer receives.
pub fn hash_chunk(data: &[u8]) -> Hash {
    Hash(*blake3::hash(data).as_bytes())
}

/// The name of a whole file, computed from its chunk hashes. Binding the size
/// and chunk size in means a manifest cannot be reinterpreted with another
/// layout and still match its root.
pub fn root_hash(size: u64, chunk_size: u32, hashes: &[Hash]) -> Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(ROOT_DOMAIN);
    hasher.update(&size.to_be_bytes());
    hasher.update(&chunk_size.to_be_bytes());
    for hash in hashes {
        hasher.update(&hash.0);
    }
    Hash(*hasher.finalize().as_bytes())
}

/// Everything needed to download and verify one version of a file.
///
/// The fields are public for building wire messages; one that came from the
/// network must go through [`Manifest::from_wire`] before it is trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The file's identity: [`root_hash`] of the other fields.
    pub root: Hash,
    /// File length in bytes.
    pub size: u64,
    /// Bytes per chunk (the last chunk may be shorter).
    pub chunk_size: u32,
    /// One hash per chunk, in file order.
    pub hashes: Vec<Hash>,
}

impl Manifest {
    /// Builds the manifest of a file whose chunk hashes are known, computing
    /// its root.
    pub fn from_hashes(size: u64, chunk_size: u32, hashes: Vec<Hash>) -> Manifest {
        Manifest {
            root: root_hash(size, chunk_size, &hashes),
            size,
            chunk_size,
            hashes,
        }
    }

    /// Parses a manifest a peer sent: accepted only if its layout is one this
    /// build allows and its hashes really produce `root`, so a download can
    /// trust every chunk hash it checks against.
    pub fn from_wire(
        root: Hash,
        size: u64,
        chunk_size: u32,
        hashes: Vec<Hash>,
    ) -> Result<Manifest, ManifestError> {
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size)
        {
            return Err(ManifestError::BadChunkSize(chunk_size));
        }
        let expected = size.div_ceil(u64::from(chunk_size));
        if expected > u64::from(MAX_CHUNKS) {
            return Err(ManifestError::TooManyChunks(expected));
        }
        if hashes.len() as u64 != expected {
            return Err(ManifestError::WrongHashCount {
                expected,
                got: hashes.len(),
            });
        }
        let manifest = Manifest::from_hashes(size, chunk_size, hashes);
        if manifest.root != root {
            return Err(ManifestError::RootMismatch);
        }
        Ok(manifest)
    }

    /// How many chunks the file has (zero for an empty file).
    pub fn chunk_count(&self) -> u32 {
        // A valid manifest has at most MAX_CHUNKS hashes; saturate rather
        // than wrap for one built by hand.
        u32::try_from(self.hashes.len()).unwrap_or(u32::MAX)
    }

    /// Where chunk `index` starts in the file. In u64 so files past 4 GiB work.
    pub fn chunk_offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size)
    }

    /// How many bytes chunk `index` holds: `chunk_size`, except the last one,
    /// which holds what is left. Zero for an index past the end.
    pub fn chunk_len(&self, index: u32) -> u32 {
        let left = self.size.saturating_sub(self.chunk_offset(index));
        // Fits: it is at most chunk_size.
        left.min(u64::from(self.chunk_size)) as u32
    }
}

/// Why a manifest from the network was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Not a power of two between the minimum and maximum chunk sizes.
    BadChunkSize(u32),
    /// The file would need more chunk hashes than any manifest may carry.
    TooManyChunks(u64),
    /// The hash list does not have one hash per chunk.
    WrongHashCount { expected: u64, got: usize },
    /// The hashes do not produce the root they came with.
    RootMismatch,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::BadChunkSize(size) => write!(
                f,
                "chunk size {size} is not a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            ),
            ManifestError::TooManyChunks(count) => {
                write!(f, "{count} chunks is over the limit of {MAX_CHUNKS}")
            }
            ManifestError::WrongHashCount { expected, got } => {
                write!(f, "manifest has {got} chunk hashes, expected {expected}")
            }
            ManifestError::RootMismatch => f.write_str("chunk hashes do not match the root hash"),
        }
    }
}

impl std::error::Error for ManifestError {}

/// Hashes the first `size` bytes of `file` chunk by chunk, all at once. See
/// [`FileHasher`] for hashing in slices.
pub fn hash_file(file: &File, size: u64) -> io::Result<Manifest> {
    let mut hasher = FileHasher::new(file, size)?;
    while !hasher.step(file, usize::MAX)? {}
    Ok(hasher.finish())
}

/// Hashes a file a slice at a time, so the event loop can hash a huge file
/// between events instead of stopping for it. Reads at explicit offsets into
/// one reused buffer, so memory stays at one chunk whatever the file size.
/// Chunks lying wholly in a hole of a sparse file are known to be zeros and
/// are not read (finding holes moves the file position).
#[derive(Debug)]
pub struct FileHasher {
    size: u64,
    chunk_size: u32,
    hashes: Vec<Hash>,
    /// Where the next chunk starts.
    offset: u64,
    holes: Holes,
    zero_chunk_hash: Option<Hash>,
    buffer: Vec<u8>,
}

impl FileHasher {
    /// Starts hashing the first `size` bytes of `file`; the same file must be
    /// passed to every [`FileHasher::step`].
    pub fn new(file: &File, size: u64) -> io::Result<FileHasher> {
        let chunk_size = chunk_size_for(size);
        let count = size.div_ceil(u64::from(chunk_size));
        if count > u64::from(MAX_CHUNKS) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("file of {size} bytes is too big to share"),
            ));
        }
        // Checked up front: past the end of the file SEEK_DATA would report a
        // hole, which must not pass for zeros.
        if file.metadata()?.len() < size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("file is shorter than {size} bytes"),
            ));
        }
        Ok(FileHasher {
            size,
            chunk_size,
            hashes: Vec::with_capacity(count as usize),
            offset: 0,
            holes: Holes { data_from: None },
            zero_chunk_hash: None,
            buffer: Vec::new(),
        })
    }

    /// Hashes whole chunks until about `budget` bytes are done (at least one
    /// chunk). Returns whether the file is done.
    pub fn step(&mut self, file: &File, budget: usize) -> io::Result<bool> {
        let chunk_size = u64::from(self.chunk_size);
        if self.buffer.is_empty() {
            self.buffer = vec![0u8; self.size.min(chunk_size) as usize];
        }
        let mut done = 0usize;
        while self.offset < self.size && done < budget {
            let len = (self.size - self.offset).min(chunk_size) as usize;
            let end = self.offset + len as u64;
            let chunk = &mut self.buffer[..len];
            let hash = if !self.holes.is_hole(file, self.offset, end) {
                file.read_exact_at(chunk, self.offset)?;
                hash_chunk(chunk)
            } else if len == self.chunk_size as usize {
                *self
                    .zero_chunk_hash
                    .get_or_insert_with(|| hash_chunk(&vec![0; len]))
            } else {
                chunk.fill(0);
                hash_chunk(chunk)
            };
            self.hashes.push(hash);
            self.offset = end;
            done = done.saturating_add(len);
        }
        Ok(self.offset >= self.size)
    }

    /// Bytes hashed so far.
    pub fn hashed(&self) -> u64 {
        self.offset
    }

    /// The manifest, once [`FileHasher::step`] said the file is done.
    pub fn finish(self) -> Manifest {
        Manifest::from_hashes(self.size, self.chunk_size, self.hashes)
    }
}

/// Answers "is this byte range all hole?" for a file read front to back,
/// with one `lseek(SEEK_DATA)` per data chunk and one per hole.
#[derive(Debug)]
struct Holes {
    /// Where data starts at or after the last offset asked about; true for
    /// every later offset up to it.
    data_from: Option<u64>,
}

impl Holes {
    fn is_hole(&mut self, file: &File, start: u64, end: u64) -> bool {
        let data_from = match self.data_from {
            Some(known) if start <= known => known,
            _ => {
                let found = seek_data(file, start).unwrap_or(start);
                self.data_from = Some(found);
                found
            }
        };
        data_from >= end
    }
}

/// Where data resumes at or after `offset` (`u64::MAX` for "only holes till
/// the end"), or `None` when the filesystem cannot tell, so every chunk is read.
fn seek_data(file: &File, offset: u64) -> Option<u64> {
    match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(offset)) {
        Ok(found) => Some(found),
        Err(rustix::io::Errno::NXIO) => Some(u64::MAX),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const GIB: u64 = 1 << 30;

    fn sample_hashes(n: usize) -> Vec<Hash> {
        (0..n).map(|i| hash_chunk(&i.to_be_bytes())).collect()
    }

    #[test]
    fn chunk_size_grows_only_for_big_files() {
        assert_eq!(chunk_size_for(0), 32 << 10);
        assert_eq!(chunk_size_for(2 * GIB), 32 << 10);
        assert_eq!(chunk_size_for(2 * GIB + 1), 64 << 10);
        assert_eq!(chunk_size_for(16 * GIB + 1), 512 << 10);
        assert_eq!(chunk_size_for(256 * GIB), 4 << 20);
        assert_eq!(chunk_size_for(u64::MAX), MAX_CHUNK_SIZE);
    }

    #[test]
    fn root_binds_size_chunk_size_and_order() {
        let hashes = sample_hashes(3);
        let root = root_hash(600_000, 256 << 10, &hashes);
        assert_ne!(root, root_hash(600_001, 256 << 10, &hashes));
        assert_ne!(root, root_hash(600_000, 512 << 10, &hashes));
        let swapped = [hashes[1], hashes[0], hashes[2]];
        assert_ne!(root, root_hash(600_000, 256 << 10, &swapped));
        // The empty file has a root too, over no chunks.
        assert_ne!(root_hash(0, 256 << 10, &[]), root_hash(1, 256 << 10, &[]));
    }

    #[test]
    fn from_wire_accepts_a_manifest_round_trip() {
        let built = Manifest::from_hashes(600_000, 256 << 10, sample_hashes(3));
        let parsed = Manifest::from_wire(
            built.root,
            built.size,
            built.chunk_size,
            built.hashes.clone(),
        )
        .unwrap();
        assert_eq!(parsed, built);
        let empty = Manifest::from_hashes(0, 256 << 10, vec![]);
        assert_eq!(
            Manifest::from_wire(empty.root, 0, 256 << 10, vec![]),
            Ok(empty)
        );
    }

    #[test]
    fn from_wire_rejects_each_kind_of_bad_manifest() {
        let good = Manifest::from_hashes(600_000, 256 << 10, sample_hashes(3));
        let parse =
            |size, chunk_size, hashes| Manifest::from_wire(good.root, size, chunk_size, hashes);
        for bad_size in [
            0,
            1000,
            (256 << 10) + 1,
            MIN_CHUNK_SIZE / 2,
            MAX_CHUNK_SIZE * 2,
        ] {
            assert_eq!(
                parse(600_000, bad_size, sample_hashes(3)),
                Err(ManifestError::BadChunkSize(bad_size))
            );
        }
        assert_eq!(
            parse(600_000, 256 << 10, sample_hashes(2)),
            Err(ManifestError::WrongHashCount {
                expected: 3,
                got: 2
            })
        );
        assert_eq!(
            parse(600_000, 256 << 10, sample_hashes(4)),
            Err(ManifestError::WrongHashCount {
                expected: 3,
                got: 4
            })
        );
        let huge = u64::from(MAX_CHUNKS) * u64::from(MIN_CHUNK_SIZE) + 1;
        assert_eq!(
            parse(huge, MIN_CHUNK_SIZE, vec![]),
            Err(ManifestError::TooManyChunks(u64::from(MAX_CHUNKS) + 1))
        );
        let mut tampered = sample_hashes(3);
        tampered[2].0[0] ^= 1;
        assert_eq!(
            parse(600_000, 256 << 10, tampered),
            Err(ManifestError::RootMismatch)
        );
        assert_eq!(
            parse(600_001, 256 << 10, sample_hashes(3)),
            Err(ManifestError::RootMismatch)
        );
    }

    #[test]
    fn last_chunk_is_shorter() {
        let m = Manifest::from_hashes(600_000, 256 << 10, sample_hashes(3));
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.chunk_len(0), 256 << 10);
        assert_eq!(m.chunk_offset(2), 2 * (256 << 10));
        assert_eq!(m.chunk_len(2), 600_000 - 2 * (256 << 10));
        assert_eq!(m.chunk_len(3), 0);
        let exact = Manifest::from_hashes(2 * (256 << 10), 256 << 10, sample_hashes(2));
        assert_eq!(exact.chunk_len(1), 256 << 10);
    }

    #[test]
    fn chunk_offsets_do_not_wrap_past_4_gib() {
        let m = Manifest::from_hashes(8 * GIB, 256 << 10, sample_hashes(32768));
        assert_eq!(m.chunk_offset(32767), 8 * GIB - (256 << 10));
        assert_eq!(m.chunk_len(32767), 256 << 10);
    }

    #[test]
    fn hash_file_matches_hashing_the_bytes() {
        let data: Vec<u8> = (0..600_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&data).unwrap();
        let m = hash_file(&file, data.len() as u64).unwrap();
        let chunk = chunk_size_for(600_000);
        let expected: Vec<Hash> = data.chunks(chunk as usize).map(hash_chunk).collect();
        assert!(expected.len() > 2, "several chunks, the last one short");
        assert_eq!(m.hashes, expected);
        assert_eq!(m.root, root_hash(600_000, chunk, &expected));
        assert_eq!(hash_file(&file, 0).unwrap().hashes, vec![]);
    }

    #[test]
    fn hash_file_of_a_sparse_file_matches_hashing_the_bytes() {
        let chunk = chunk_size_for(0) as usize;
        let size = 10 * chunk + 1234;
        assert_eq!(chunk_size_for(size as u64) as usize, chunk);
        let file = tempfile::tempfile().unwrap();
        file.set_len(size as u64).unwrap();
        // Data in chunk 1 only at its very end, in chunk 5 across a chunk
        // boundary, and in the short last chunk; holes everywhere else.
        for (offset, byte) in [
            (2 * chunk - 1, 1u8),
            (6 * chunk - 3, 2),
            (10 * chunk + 100, 3),
        ] {
            file.write_all_at(&[byte; 7], offset as u64).unwrap();
        }
        let mut data = vec![0u8; size];
        file.read_exact_at(&mut data, 0).unwrap();
        let expected: Vec<Hash> = data.chunks(chunk).map(hash_chunk).collect();
        assert_eq!(hash_file(&file, size as u64).unwrap().hashes, expected);

        let trailing_hole = tempfile::tempfile().unwrap();
        trailing_hole.set_len(size as u64).unwrap();
        trailing_hole.write_all_at(b"head", 0).unwrap();
        let mut data = vec![0u8; size];
        data[..4].copy_from_slice(b"head");
        let expected: Vec<Hash> = data.chunks(chunk).map(hash_chunk).collect();
        assert_eq!(
            hash_file(&trailing_hole, size as u64).unwrap().hashes,
            expected
        );
    }

    #[test]
    fn hash_file_of_a_file_shorter_than_claimed_fails() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7; 1000]).unwrap();
        let err = hash_file(&file, 2000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// A sparse file of 4 GiB + 3 chunks with known chunks written around the
    /// 4 GiB mark: u32 truncation anywhere would hash the wrong bytes.
    #[test]
    fn hash_file_reads_past_4_gib() {
        // Over 4 GiB the chunk size is 128 KiB (65536 chunks at most).
        let chunk = 128u64 << 10;
        let size = 4 * GIB + 3 * chunk;
        assert_eq!(u64::from(chunk_size_for(size)), chunk);
        let at_4gib = (4 * GIB / chunk) as u32;
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        let marks: Vec<(u32, Vec<u8>)> = [at_4gib - 1, at_4gib, at_4gib + 2]
            .iter()
            .map(|&i| (i, vec![i as u8 | 1; chunk as usize]))
            .collect();
        for (index, bytes) in &marks {
            file.write_all_at(bytes, u64::from(*index) * chunk).unwrap();
        }
        let m = hash_file(&file, size).unwrap();
        assert_eq!(m.chunk_count(), at_4gib + 3);
        for (index, bytes) in &marks {
            assert_eq!(
                m.hashes[*index as usize],
                hash_chunk(bytes),
                "chunk {index}"
            );
        }
        let zeros = hash_chunk(&vec![0; chunk as usize]);
        assert_eq!(m.hashes[0], zeros);
        assert_eq!(m.hashes[at_4gib as usize + 1], zeros);
        assert_eq!(m.root, root_hash(size, chunk as u32, &m.hashes));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Hashing in slices of any budget gives the manifest of hashing the
        /// bytes, holes included.
        #[test]
        fn sliced_hashing_matches_the_bytes(
            len in 0usize..300_000,
            hole in proptest::option::of((0usize..300_000, 1usize..200_000)),
            budget in 1usize..100_000,
            seed in proptest::prelude::any::<u8>(),
        ) {
            let mut data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            let mut file = tempfile::tempfile().unwrap();
            file.write_all(&data).unwrap();
            if let Some((start, hole_len)) = hole {
                let start = start.min(len);
                let end = (start + hole_len).min(len);
                data[start..end].fill(0);
                // Punch it as a real hole where the file system can.
                let _ = rustix::fs::fallocate(
                    &file,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    start as u64,
                    (end - start) as u64,
                );
            }
            let chunk = chunk_size_for(len as u64) as usize;
            let expected: Vec<Hash> = data.chunks(chunk).map(hash_chunk).collect();
            let mut hasher = FileHasher::new(&file, len as u64).unwrap();
            let mut steps = 0;
            while !hasher.step(&file, budget).unwrap() {
                steps += 1;
                proptest::prop_assert!(steps <= expected.len());
            }
            proptest::prop_assert_eq!(hasher.hashed(), len as u64);
            proptest::prop_assert_eq!(hasher.finish().hashes, expected);
        }
    }
}
