//! Resumable downloads. A download of one version (root) of a file lives in
//! `DIR/.shoal/partial/<roothex>.part` (the data, sparse, at its final size)
//! beside `<roothex>.have` (which chunks it holds).
//!
//! The bitmap is only a hint: on open every chunk it claims is read back and
//! checked against the manifest, so a crash between writing data and writing
//! the bitmap, a torn write or a bit flip on disk costs a re-download of that
//! chunk, never a wrong byte in the finished file.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use log::{debug, info, warn};

use super::disk::{rename_noreplace, replace_atomically, sync_dir};
use super::manifest::{Manifest, hash_chunk};
use super::{StoreError, partial_dir};
use crate::wire::{FileName, Hash};

/// Opens a `.have` file, so a file of any other kind is never mistaken for one.
const HAVE_MAGIC: &[u8; 8] = b"shoalhav";
const HAVE_VERSION: u32 = 1;
/// Magic, version, root, chunk count; the bits follow.
const HAVE_HEADER_LEN: usize = 8 + 4 + 32 + 4;

/// A download in progress: its data file and which chunks are in it.
#[derive(Debug)]
pub struct PartialFile {
    manifest: Manifest,
    data: File,
    data_path: PathBuf,
    have_path: PathBuf,
    have: Vec<bool>,
    have_count: u32,
    /// Chunks were written (or claims dropped) since the bitmap was saved.
    unsaved: bool,
}

impl PartialFile {
    /// Opens or starts the download of `manifest` into the shared folder
    /// `folder_dir`, keeping every chunk a previous run saved that still
    /// matches its hash.
    pub fn open(folder_dir: &Path, manifest: &Manifest) -> io::Result<PartialFile> {
        let dir = partial_dir(folder_dir);
        fs::create_dir_all(&dir)?;
        let hex = manifest.root.to_hex();
        let data_path = dir.join(format!("{hex}.part"));
        let have_path = dir.join(format!("{hex}.have"));
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&data_path)?;
        if data.metadata()?.len() != manifest.size {
            // Sparse: reserves no disk blocks until chunks are written.
            data.set_len(manifest.size)?;
        }
        let claimed = read_bitmap(&have_path, manifest);
        let mut partial = PartialFile {
            manifest: manifest.clone(),
            data,
            data_path,
            have_path,
            have: vec![false; manifest.hashes.len()],
            have_count: 0,
            unsaved: false,
        };
        partial.verify_claimed(&claimed)?;
        Ok(partial)
    }

    /// Reads back each claimed chunk and keeps only those whose bytes match
    /// the manifest.
    fn verify_claimed(&mut self, claimed: &[bool]) -> io::Result<()> {
        let claims = claimed.iter().filter(|&&c| c).count();
        if claims == 0 {
            return Ok(());
        }
        let mut buffer = vec![0u8; self.manifest.chunk_size as usize];
        let mut dropped = 0;
        for (index, _) in claimed.iter().enumerate().filter(|(_, c)| **c) {
            // Fits: claimed has one entry per chunk, at most MAX_CHUNKS.
            let index = index as u32;
            let chunk = &mut buffer[..self.manifest.chunk_len(index) as usize];
            self.data
                .read_exact_at(chunk, self.manifest.chunk_offset(index))?;
            if hash_chunk(chunk) == self.manifest.hashes[index as usize] {
                self.mark_present(index);
            } else {
                dropped += 1;
            }
        }
        if dropped > 0 {
            warn!(
                "download {}: {dropped} of {claims} saved chunks failed verification, refetching",
                self.manifest.root.short()
            );
            self.unsaved = true;
        }
        info!(
            "resuming download {}: {} of {} chunks present",
            self.manifest.root.short(),
            self.have_count,
            self.manifest.chunk_count()
        );
        Ok(())
    }

    fn mark_present(&mut self, index: u32) {
        let slot = &mut self.have[index as usize];
        if !*slot {
            *slot = true;
            self.have_count += 1;
        }
    }

    /// The manifest being downloaded.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// One entry per chunk: whether it is on disk and verified.
    pub fn have(&self) -> &[bool] {
        &self.have
    }

    /// Whether chunk `index` is present (false past the end).
    pub fn has(&self, index: u32) -> bool {
        self.have.get(index as usize).copied().unwrap_or(false)
    }

    /// How many chunks are present.
    pub fn have_count(&self) -> u32 {
        self.have_count
    }

    /// How many chunks are still to fetch.
    pub fn missing_count(&self) -> u32 {
        self.manifest.chunk_count() - self.have_count
    }

    /// The chunks still to fetch, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.manifest.chunk_count()).filter(|&index| !self.has(index))
    }

    /// Where the data is being written.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Stores chunk `index`, whose hash the caller has already checked. It
    /// counts as present at once but survives a crash only after the next
    /// [`PartialFile::save_progress`].
    pub fn write_chunk(&mut self, index: u32, data: &[u8]) -> io::Result<()> {
        if index >= self.manifest.chunk_count() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "chunk {index} is past the end ({} chunks)",
                    self.manifest.chunk_count()
                ),
            ));
        }
        let expected = self.manifest.chunk_len(index);
        if data.len() != expected as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("chunk {index} is {} bytes, expected {expected}", data.len()),
            ));
        }
        self.data
            .write_all_at(data, self.manifest.chunk_offset(index))?;
        self.mark_present(index);
        self.unsaved = true;
        Ok(())
    }

    /// Makes the chunks written so far survive a crash. The data is synced
    /// before the bitmap is replaced, so the bitmap never claims a chunk whose
    /// bytes might not be on disk. Call every few seconds and before exit.
    pub fn save_progress(&mut self) -> io::Result<()> {
        if !self.unsaved {
            return Ok(());
        }
        self.data.sync_data()?;
        replace_atomically(
            &self.have_path,
            &encode_bitmap(&self.manifest.root, &self.have),
        )?;
        self.unsaved = false;
        Ok(())
    }

    /// Moves the complete download to `dest_dir/name`, never replacing a file
    /// already there. On failure the download stays saved, so opening it again
    /// resumes with every chunk present.
    pub fn finish(mut self, dest_dir: &Path, name: &FileName) -> Result<PathBuf, StoreError> {
        self.save_progress()
            .map_err(|err| StoreError::io("save download progress to", &self.have_path, err))?;
        let missing = self.missing_count();
        if missing > 0 {
            return Err(StoreError::Incomplete { missing });
        }
        self.data
            .sync_all()
            .map_err(|err| StoreError::io("sync", &self.data_path, err))?;
        let dest = dest_dir.join(name.as_str());
        match rename_noreplace(&self.data_path, &dest) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists(dest));
            }
            Err(err) => return Err(StoreError::io("move the finished download to", &dest, err)),
        }
        remove_if_present(&self.have_path)
            .unwrap_or_else(|err| warn!("cannot remove {}: {err}", self.have_path.display()));
        sync_dir(dest_dir).map_err(|err| StoreError::io("sync", dest_dir, err))?;
        // The file is safe in its place; this only makes the cleanup durable.
        if let Some(partial) = self.have_path.parent() {
            sync_dir(partial)
                .unwrap_or_else(|err| warn!("cannot sync {}: {err}", partial.display()));
        }
        info!("finished {} ({} bytes)", dest.display(), self.manifest.size);
        Ok(dest)
    }

    /// Deletes the download's files, for a user who wants to start over.
    pub fn discard(self) -> io::Result<()> {
        remove_if_present(&self.data_path)?;
        remove_if_present(&self.have_path)?;
        debug!("discarded download {}", self.manifest.root.short());
        Ok(())
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

fn encode_bitmap(root: &Hash, have: &[bool]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HAVE_HEADER_LEN + have.len().div_ceil(8));
    out.extend_from_slice(HAVE_MAGIC);
    out.extend_from_slice(&HAVE_VERSION.to_be_bytes());
    out.extend_from_slice(&root.0);
    out.extend_from_slice(&(have.len() as u32).to_be_bytes());
    for bits in have.chunks(8) {
        let byte = bits
            .iter()
            .enumerate()
            .fold(0u8, |byte, (i, &bit)| byte | (u8::from(bit) << (7 - i)));
        out.push(byte);
    }
    out
}

/// The chunks a saved bitmap claims, or none if there is no bitmap or it is
/// not exactly the bitmap of this manifest.
fn read_bitmap(path: &Path, manifest: &Manifest) -> Vec<bool> {
    let count = manifest.hashes.len();
    let none = vec![false; count];
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return none,
        Err(err) => {
            warn!("cannot read {}: {err}; starting over", path.display());
            return none;
        }
    };
    let mut header = Vec::with_capacity(HAVE_HEADER_LEN);
    header.extend_from_slice(HAVE_MAGIC);
    header.extend_from_slice(&HAVE_VERSION.to_be_bytes());
    header.extend_from_slice(&manifest.root.0);
    header.extend_from_slice(&(count as u32).to_be_bytes());
    if bytes.len() != HAVE_HEADER_LEN + count.div_ceil(8) || !bytes.starts_with(&header) {
        warn!("ignoring {}: not this download's bitmap", path.display());
        return none;
    }
    let bits = &bytes[HAVE_HEADER_LEN..];
    (0..count)
        .map(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0)
        .collect()
}

/// Where a download's files live, for tests that tamper with them.
#[cfg(test)]
fn paths(folder_dir: &Path, root: &Hash) -> (PathBuf, PathBuf) {
    let dir = partial_dir(folder_dir);
    let hex = root.to_hex();
    (
        dir.join(format!("{hex}.part")),
        dir.join(format!("{hex}.have")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MIN_CHUNK_SIZE;

    const CHUNK: usize = MIN_CHUNK_SIZE as usize;

    /// Five full chunks and a short sixth, each byte telling its position.
    fn sample() -> (Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..5 * CHUNK + 1000).map(|i| (i * 7 % 253) as u8).collect();
        let hashes = data.chunks(CHUNK).map(hash_chunk).collect();
        let manifest = Manifest::from_hashes(data.len() as u64, CHUNK as u32, hashes);
        (data, manifest)
    }

    fn chunk(data: &[u8], index: u32) -> &[u8] {
        data.chunks(CHUNK).nth(index as usize).unwrap()
    }

    #[test]
    fn resume_keeps_saved_chunks_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        assert_eq!(partial.missing_count(), 6);
        for index in [0, 2, 5] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        // Written but never saved: must not be trusted after a "crash".
        partial.write_chunk(3, chunk(&data, 3)).unwrap();
        assert_eq!(partial.have_count(), 4);
        drop(partial);

        let resumed = PartialFile::open(tmp.path(), &manifest).unwrap();
        assert_eq!(resumed.have(), [true, false, true, false, false, true]);
        assert_eq!(resumed.missing().collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(resumed.missing_count(), 3);
    }

    #[test]
    fn resume_drops_a_claimed_chunk_corrupted_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        for index in [1, 4] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        drop(partial);
        let (data_path, _) = paths(tmp.path(), &manifest.root);
        let file = OpenOptions::new().write(true).open(&data_path).unwrap();
        file.write_all_at(b"X", manifest.chunk_offset(4) + 17)
            .unwrap();

        let mut resumed = PartialFile::open(tmp.path(), &manifest).unwrap();
        assert!(resumed.has(1));
        assert!(!resumed.has(4));
        // The corrected bitmap is saved even with no new chunk written.
        resumed.save_progress().unwrap();
        drop(resumed);
        let (_, have_path) = paths(tmp.path(), &manifest.root);
        assert!(!read_bitmap(&have_path, &manifest)[4]);
    }

    #[test]
    fn foreign_or_garbage_bitmap_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let (_, have_path) = paths(tmp.path(), &manifest.root);
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        partial.write_chunk(0, chunk(&data, 0)).unwrap();
        partial.save_progress().unwrap();
        drop(partial);
        let mut other_root = manifest.root;
        other_root.0[0] ^= 1;
        fs::write(&have_path, encode_bitmap(&other_root, &[true; 6])).unwrap();
        assert_eq!(
            PartialFile::open(tmp.path(), &manifest)
                .unwrap()
                .have_count(),
            0
        );
        fs::write(&have_path, b"shoalhav garbage").unwrap();
        assert_eq!(
            PartialFile::open(tmp.path(), &manifest)
                .unwrap()
                .have_count(),
            0
        );
    }

    #[test]
    fn write_chunk_refuses_wrong_length_and_index() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        let short = &chunk(&data, 0)[..CHUNK - 1];
        let err = partial.write_chunk(0, short).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = partial.write_chunk(5, chunk(&data, 0)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let err = partial.write_chunk(6, &[]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(partial.have_count(), 0);
        partial.write_chunk(5, chunk(&data, 5)).unwrap();
        assert!(partial.has(5));
    }

    #[test]
    fn finish_moves_the_file_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let name = FileName::new("got.bin").unwrap();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        for index in (0..6).rev() {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
            if index == 1 {
                let err = partial.finish(tmp.path(), &name).unwrap_err();
                assert!(matches!(err, StoreError::Incomplete { missing: 1 }));
                partial = PartialFile::open(tmp.path(), &manifest).unwrap();
                assert_eq!(partial.have_count(), 5, "finish saved progress");
            }
        }
        let dest = partial.finish(tmp.path(), &name).unwrap();
        assert_eq!(dest, tmp.path().join("got.bin"));
        assert_eq!(fs::read(&dest).unwrap(), data);
        let (data_path, have_path) = paths(tmp.path(), &manifest.root);
        assert!(!data_path.exists());
        assert!(!have_path.exists());
    }

    #[test]
    fn finish_refuses_to_overwrite_and_stays_resumable() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let name = FileName::new("taken").unwrap();
        fs::write(tmp.path().join("taken"), b"user data").unwrap();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        for index in 0..6 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        let err = partial.finish(tmp.path(), &name).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(ref p) if p.ends_with("taken")));
        assert!(err.to_string().contains("already exists"));
        assert_eq!(fs::read(tmp.path().join("taken")).unwrap(), b"user data");
        let again = PartialFile::open(tmp.path(), &manifest).unwrap();
        assert_eq!(again.missing_count(), 0);
        let other = FileName::new("free").unwrap();
        assert_eq!(
            fs::read(again.finish(tmp.path(), &other).unwrap()).unwrap(),
            data
        );
    }

    #[test]
    fn empty_file_finishes_at_once_and_discard_removes_files() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = Manifest::from_hashes(0, CHUNK as u32, vec![]);
        let partial = PartialFile::open(tmp.path(), &empty).unwrap();
        assert_eq!(partial.missing_count(), 0);
        let dest = partial
            .finish(tmp.path(), &FileName::new("e").unwrap())
            .unwrap();
        assert_eq!(fs::metadata(dest).unwrap().len(), 0);

        let (data, manifest) = sample();
        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        partial.write_chunk(0, chunk(&data, 0)).unwrap();
        partial.save_progress().unwrap();
        partial.discard().unwrap();
        let (data_path, have_path) = paths(tmp.path(), &manifest.root);
        assert!(!data_path.exists() && !have_path.exists());
    }

    /// A download of 4 GiB + 2 chunks + a short tail: chunks past the 4 GiB
    /// mark must land at their exact u64 offset and survive a resume.
    #[test]
    fn writes_past_4_gib_land_at_the_exact_offset() {
        let tmp = tempfile::tempdir().unwrap();
        let chunk_size = 256u64 << 10;
        let size = (4u64 << 30) + 2 * chunk_size + 1000;
        let count = size.div_ceil(chunk_size) as usize;
        let past = 16385u32; // starts at 4 GiB + one chunk
        let tail = 16386u32; // the short last chunk
        let past_bytes = vec![0xabu8; chunk_size as usize];
        let tail_bytes = vec![0xcdu8; 1000];
        let mut hashes = vec![Hash::default(); count];
        hashes[past as usize] = hash_chunk(&past_bytes);
        hashes[tail as usize] = hash_chunk(&tail_bytes);
        let manifest = Manifest::from_hashes(size, chunk_size as u32, hashes);
        assert_eq!(manifest.chunk_len(tail), 1000);

        let mut partial = PartialFile::open(tmp.path(), &manifest).unwrap();
        partial.write_chunk(past, &past_bytes).unwrap();
        partial.write_chunk(tail, &tail_bytes).unwrap();
        partial.save_progress().unwrap();
        let file = File::open(partial.data_path()).unwrap();
        assert_eq!(file.metadata().unwrap().len(), size);
        let mut back = vec![0u8; 1 + chunk_size as usize + 1];
        file.read_exact_at(&mut back, (4u64 << 30) + chunk_size - 1)
            .unwrap();
        assert_eq!(back[0], 0, "byte before the chunk untouched");
        assert!(back[1..=chunk_size as usize].iter().all(|&b| b == 0xab));
        assert_eq!(back[chunk_size as usize + 1], 0xcd);
        drop(partial);

        let resumed = PartialFile::open(tmp.path(), &manifest).unwrap();
        assert_eq!(resumed.have_count(), 2);
        assert!(resumed.has(past) && resumed.has(tail));
    }
}
