//! Resumable downloads. A download of one version (root) of a file lives in
//! `DIR/.shoal/partial/<roothex>.part` (the data, sparse, at its final size)
//! beside `<roothex>.have` (which chunks it holds) and `<roothex>.name` (the
//! name it will get, so `ls` can show an abandoned download by name).
//!
//! The bitmap is only a hint: every chunk it claims is read back and checked
//! against the manifest before it counts, so a crash between writing data
//! and writing the bitmap, a torn write or a bit flip on disk costs a
//! re-download of that chunk, never a wrong byte in the finished file. That
//! check can be done at once ([`PartialFile::open`]) or a slice at a time
//! ([`PartialFile::open_unverified`], then [`PartialFile::verify_step`]).
//!
//! Every file here is opened relative to the handle on `.shoal/partial`,
//! never through a symlink, and the data file only if it has no other hard
//! link; the finished file is renamed into the folder with `RENAME_NOREPLACE`.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, SystemTime};

use fixedbitset::FixedBitSet;
use log::{debug, info, warn};
use rustix::fs::AtFlags;

use super::StoreError;
use super::dirs::{self, FolderDirs};
use super::manifest::{Manifest, hash_chunk};
use crate::wire::{FileName, Hash};

/// Opens a `.have` file, so a file of any other kind is never mistaken for one.
const HAVE_MAGIC: &[u8; 8] = b"shoalhav";
const HAVE_VERSION: u32 = 1;
/// Magic, version, root, chunk count; the bits follow.
const HAVE_HEADER_LEN: usize = 8 + 4 + 32 + 4;

/// A `.name` file longer than this is not ours (a name is at most a few
/// hundred bytes) and is not read.
const NAME_FILE_MAX: u64 = 4096;

/// The suffixes of a download's files in `.shoal/partial/`, the temp file
/// of an atomic replace included.
const SUFFIXES: [&str; 5] = [".part", ".have", ".have.tmp", ".name", ".name.tmp"];

/// A download in progress: its data file and which chunks are in it.
#[derive(Debug)]
pub struct PartialFile {
    manifest: Manifest,
    dirs: FolderDirs,
    /// Shared with chunk sends in progress: a peer still downloading serves
    /// the chunks it has verified straight from this file.
    data: Rc<File>,
    /// Names inside `.shoal/partial/`.
    data_name: String,
    have_name: String,
    /// For messages.
    data_path: PathBuf,
    /// Chunks on disk and verified.
    have: FixedBitSet,
    have_count: u32,
    /// Chunks the saved bitmap claims that are not checked yet.
    unverified: FixedBitSet,
    /// Claims checked and claims dropped, for the log line at the end.
    checked: u32,
    dropped: u32,
    /// Chunks were written (or claims dropped) since the bitmap was saved.
    unsaved: bool,
}

impl PartialFile {
    /// Opens or starts the download of `manifest` in the shared folder,
    /// keeping every chunk a previous run saved that still matches its hash.
    /// Reads every claimed chunk back before returning; see
    /// [`PartialFile::open_unverified`] to do that in slices.
    pub fn open(dirs: &FolderDirs, manifest: &Manifest) -> io::Result<PartialFile> {
        let mut partial = PartialFile::open_unverified(dirs, manifest)?;
        while !partial.verify_step(usize::MAX) {}
        Ok(partial)
    }

    /// Opens or starts the download without reading anything back: the
    /// chunks the saved bitmap claims are "unverified" (neither present nor
    /// missing) until [`PartialFile::verify_step`] has checked them.
    pub fn open_unverified(dirs: &FolderDirs, manifest: &Manifest) -> io::Result<PartialFile> {
        let hex = manifest.root.to_hex();
        let data_name = format!("{hex}.part");
        let have_name = format!("{hex}.have");
        let data_path = dirs.partial_path(&data_name);
        let (data, fresh) = open_data(dirs, &data_name, &data_path)?;
        if data.metadata()?.len() != manifest.size {
            // Sparse: reserves no disk blocks until chunks are written.
            data.set_len(manifest.size)?;
        }
        let count = manifest.hashes.len();
        let unverified = if fresh {
            FixedBitSet::with_capacity(count)
        } else {
            read_bitmap(dirs, &have_name, manifest)
        };
        Ok(PartialFile {
            manifest: manifest.clone(),
            dirs: dirs.clone(),
            data: Rc::new(data),
            data_name,
            have_name,
            data_path,
            have: FixedBitSet::with_capacity(count),
            have_count: 0,
            unverified,
            checked: 0,
            dropped: 0,
            unsaved: fresh,
        })
    }

    /// Reads back and checks claimed chunks, about `budget_bytes` of them (at
    /// least one chunk); each that matches the manifest becomes present, the
    /// others missing. Returns true once no claim is left unverified. A chunk
    /// that cannot be read counts as not matching.
    pub fn verify_step(&mut self, budget_bytes: usize) -> bool {
        let mut done = 0usize;
        let mut buffer = Vec::new();
        while done < budget_bytes.max(1) {
            let Some(slot) = self.unverified.minimum() else {
                break;
            };
            self.unverified.remove(slot);
            // Fits: the bitmap has one bit per chunk, at most MAX_CHUNKS.
            let index = slot as u32;
            let len = self.manifest.chunk_len(index) as usize;
            buffer.resize(len, 0);
            let read = self
                .data
                .read_exact_at(&mut buffer, self.manifest.chunk_offset(index));
            self.checked += 1;
            match read {
                Ok(()) if hash_chunk(&buffer) == self.manifest.hashes[slot] => {
                    self.mark_present(index);
                }
                Ok(()) => self.dropped += 1,
                Err(err) => {
                    debug!(
                        "cannot read back chunk {index} of {}: {err}",
                        self.data_name
                    );
                    self.dropped += 1;
                }
            }
            done = done.saturating_add(len.max(1));
        }
        let finished = self.unverified.is_clear();
        if finished && self.checked > 0 {
            self.log_verified();
        }
        finished
    }

    fn log_verified(&mut self) {
        if self.dropped > 0 {
            warn!(
                "download {}: {} of {} saved chunks failed verification, refetching",
                self.manifest.root.short(),
                self.dropped,
                self.checked
            );
            self.unsaved = true;
        }
        info!(
            "resuming download {}: {} of {} chunks present",
            self.manifest.root.short(),
            self.have_count,
            self.manifest.chunk_count()
        );
        (self.checked, self.dropped) = (0, 0);
    }

    fn mark_present(&mut self, index: u32) {
        if !self.have.put(index as usize) {
            self.have_count += 1;
        }
    }

    /// The manifest being downloaded.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// One bit per chunk: set when it is on disk and verified.
    pub fn have(&self) -> &FixedBitSet {
        &self.have
    }

    /// Whether chunk `index` is present and verified (false past the end).
    pub fn has(&self, index: u32) -> bool {
        self.have.contains(index as usize)
    }

    /// Whether chunk `index` is claimed by the saved bitmap but not checked
    /// yet: neither fetch it nor count it as present until it is.
    pub fn is_unverified(&self, index: u32) -> bool {
        self.unverified.contains(index as usize)
    }

    /// How many claims are still to check.
    pub fn unverified_count(&self) -> u32 {
        // Fits: at most one per chunk.
        self.unverified.count_ones(..) as u32
    }

    /// How many chunks are present.
    pub fn have_count(&self) -> u32 {
        self.have_count
    }

    /// How many chunks are not present (unverified ones included).
    pub fn missing_count(&self) -> u32 {
        self.manifest.chunk_count() - self.have_count
    }

    /// The chunks still to fetch, in order: neither present nor waiting to
    /// be verified.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.manifest.chunk_count())
            .filter(|&index| !self.has(index) && !self.is_unverified(index))
    }

    /// The data file, for serving the chunks [`PartialFile::have`] names.
    pub fn data_file(&self) -> Rc<File> {
        self.data.clone()
    }

    /// Where the data is being written.
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Stores chunk `index`, whose hash the caller has already checked. It
    /// counts as present at once (an unverified claim on it is settled) but
    /// survives a crash only after the next [`PartialFile::save_progress`].
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
        self.unverified.remove(index as usize);
        self.mark_present(index);
        self.unsaved = true;
        Ok(())
    }

    /// Makes the chunks written so far survive a crash. The data is synced
    /// before the bitmap is replaced, so the bitmap never claims a chunk whose
    /// bytes might not be on disk. Claims not yet verified are kept in it.
    /// Call every few seconds and before exit.
    pub fn save_progress(&mut self) -> io::Result<()> {
        if !self.unsaved {
            return Ok(());
        }
        self.data.sync_data()?;
        let mut claims = self.have.clone();
        claims.union_with(&self.unverified);
        dirs::replace_atomically(
            self.dirs.partial(),
            &self.have_name,
            &encode_bitmap(&self.manifest.root, &claims),
        )?;
        self.unsaved = false;
        Ok(())
    }

    /// Moves the complete download into the shared folder as `name`, never
    /// replacing a file already there. On failure the download stays saved,
    /// so opening it again resumes with every chunk present.
    pub fn finish(mut self, name: &FileName) -> Result<PathBuf, StoreError> {
        let have_path = self.dirs.partial_path(&self.have_name);
        self.save_progress()
            .map_err(|err| StoreError::io("save download progress to", &have_path, err))?;
        let missing = self.missing_count();
        if missing > 0 {
            return Err(StoreError::Incomplete { missing });
        }
        self.data
            .sync_all()
            .map_err(|err| StoreError::io("sync", &self.data_path, err))?;
        self.check_still_ours()
            .map_err(|err| StoreError::io("move", &self.data_path, err))?;
        let dest = self.dirs.path().join(name.as_str());
        let (partial, root) = (self.dirs.partial(), self.dirs.root());
        match dirs::rename_noreplace(partial, &self.data_name, root, name.as_str()) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AlreadyExists(dest));
            }
            Err(err) => return Err(StoreError::io("move the finished download to", &dest, err)),
        }
        dirs::remove_if_present(partial, &self.have_name)
            .unwrap_or_else(|err| warn!("cannot remove {}: {err}", have_path.display()));
        dirs::remove_if_present(partial, &name_file(&self.manifest.root))
            .unwrap_or_else(|err| warn!("cannot remove the name of {}: {err}", dest.display()));
        dirs::sync(root).map_err(|err| StoreError::io("sync", self.dirs.path(), err))?;
        // The file is safe in its place; this only makes the cleanup durable.
        dirs::sync(partial).unwrap_or_else(|err| warn!("cannot sync .shoal/partial: {err}"));
        info!("finished {} ({} bytes)", dest.display(), self.manifest.size);
        Ok(dest)
    }

    /// The name we are about to rename must still be the file we wrote: not
    /// a symlink or another file put in its place meanwhile.
    fn check_still_ours(&self) -> io::Result<()> {
        let ours = self.data.metadata()?;
        let there = rustix::fs::statat(
            self.dirs.partial(),
            &*self.data_name,
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        #[allow(clippy::unnecessary_cast)] // widths differ between platforms
        let same = there.st_ino as u64 == ours.ino() && there.st_dev as u64 == ours.dev();
        if same {
            Ok(())
        } else {
            Err(io::Error::other(
                "the partial file was replaced by something else",
            ))
        }
    }

    /// Records the name the download will get, for `ls` to show while it
    /// is abandoned; skipped when the file already says so.
    pub fn record_name(&self, name: &FileName) -> io::Result<()> {
        let file = name_file(&self.manifest.root);
        if read_name(&self.dirs, &file).as_ref() == Some(name) {
            return Ok(());
        }
        dirs::replace_atomically(self.dirs.partial(), &file, name.as_str().as_bytes())
    }

    /// Deletes the download's files, for a user who wants to start over.
    pub fn discard(self) -> io::Result<()> {
        remove_partial(&self.dirs, &self.manifest.root)?;
        debug!("discarded download {}", self.manifest.root.short());
        Ok(())
    }
}

/// Opens the data file, or creates it; returns whether it is new (so no saved
/// claim can be about it). Anything but our own plain file at its name (a
/// symlink, a file with another hard link) is removed, never written through.
fn open_data(dirs: &FolderDirs, name: &str, path: &Path) -> io::Result<(File, bool)> {
    match dirs::open_own(dirs.partial(), name) {
        Ok(file) => return Ok((file, false)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            warn!("replacing {}: {err}", path.display());
            dirs::remove_if_present(dirs.partial(), name)?;
        }
    }
    Ok((
        dirs::create_new(dirs.partial(), name, dirs::USER_FILE)?,
        true,
    ))
}

fn encode_bitmap(root: &Hash, have: &FixedBitSet) -> Vec<u8> {
    let count = have.len();
    let mut out = Vec::with_capacity(HAVE_HEADER_LEN + count.div_ceil(8));
    out.extend_from_slice(HAVE_MAGIC);
    out.extend_from_slice(&HAVE_VERSION.to_be_bytes());
    out.extend_from_slice(&root.0);
    out.extend_from_slice(&(count as u32).to_be_bytes());
    let mut bits = vec![0u8; count.div_ceil(8)];
    for i in have.ones() {
        bits[i / 8] |= 0x80 >> (i % 8);
    }
    out.extend_from_slice(&bits);
    out
}

/// The chunks a saved bitmap claims, or none if there is no bitmap or it is
/// not exactly the bitmap of this manifest.
fn read_bitmap(dirs: &FolderDirs, name: &str, manifest: &Manifest) -> FixedBitSet {
    let count = manifest.hashes.len();
    let mut claims = FixedBitSet::with_capacity(count);
    let bytes = match dirs::read_state_file(dirs.partial(), name) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return claims,
        Err(err) => {
            warn!("cannot read .shoal/partial/{name}: {err}; starting over");
            return claims;
        }
    };
    let mut header = Vec::with_capacity(HAVE_HEADER_LEN);
    header.extend_from_slice(HAVE_MAGIC);
    header.extend_from_slice(&HAVE_VERSION.to_be_bytes());
    header.extend_from_slice(&manifest.root.0);
    header.extend_from_slice(&(count as u32).to_be_bytes());
    if bytes.len() != HAVE_HEADER_LEN + count.div_ceil(8) || !bytes.starts_with(&header) {
        warn!("ignoring .shoal/partial/{name}: not this download's bitmap");
        return claims;
    }
    let bits = &bytes[HAVE_HEADER_LEN..];
    for i in (0..count).filter(|i| bits[i / 8] & (0x80 >> (i % 8)) != 0) {
        claims.insert(i);
    }
    claims
}

fn name_file(root: &Hash) -> String {
    format!("{}.name", root.to_hex())
}

/// The name recorded in `.name` file `file`, if it holds a valid one.
fn read_name(dirs: &FolderDirs, file: &str) -> Option<FileName> {
    let (f, meta) = dirs::open_regular(dirs.partial(), file).ok()?;
    if meta.len() > NAME_FILE_MAX {
        return None;
    }
    let mut bytes = Vec::new();
    f.take(NAME_FILE_MAX).read_to_end(&mut bytes).ok()?;
    FileName::new(std::str::from_utf8(&bytes).ok()?).ok()
}

/// A download's files found in `.shoal/partial/`, running or abandoned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialInfo {
    pub root: Hash,
    /// As recorded when the download started; `None` for files from before
    /// names were recorded, or a `.name` file that is not valid.
    pub name: Option<FileName>,
    /// The data file's size (the file's full size), 0 if it is missing.
    pub size: u64,
    /// From the saved bitmap: chunks in all, and chunks it claims (each
    /// verified when written, and read back again on resume). Both 0 when
    /// there is no valid bitmap.
    pub chunks: u32,
    pub saved: u32,
    /// The latest change to any of its files.
    pub modified: SystemTime,
}

impl PartialInfo {
    /// Share of the chunks saved, 0 to 100.
    pub fn percent(&self) -> f64 {
        if self.chunks == 0 {
            0.0
        } else {
            f64::from(self.saved) * 100.0 / f64::from(self.chunks)
        }
    }
}

/// Every download with files in `.shoal/partial/`, by root. Names there that
/// are not `<64 hex digits>` and one of our suffixes are ignored, as are
/// symlinks and anything that is not a regular file.
pub fn list_partials(dirs: &FolderDirs) -> io::Result<Vec<PartialInfo>> {
    let mut roots: Vec<Hash> = dirs::list_names(dirs.partial())?
        .iter()
        .filter_map(|name| {
            let (hex, suffix) = name.split_at_checked(64)?;
            SUFFIXES.contains(&suffix).then(|| Hash::from_hex(hex))?
        })
        .collect();
    roots.sort();
    roots.dedup();
    let mut out = Vec::with_capacity(roots.len());
    for root in roots {
        let hex = root.to_hex();
        let mut size = 0;
        let mut modified = None;
        let mut found = false;
        for suffix in SUFFIXES {
            if let Some((len, time)) =
                dirs::regular_stat(dirs.partial(), &format!("{hex}{suffix}"))?
            {
                found = true;
                if suffix == ".part" {
                    size = len;
                }
                modified = modified.max(Some(time));
            }
        }
        if !found {
            continue;
        }
        let (chunks, saved) = bitmap_counts(dirs, &format!("{hex}.have"), &root);
        out.push(PartialInfo {
            root,
            name: read_name(dirs, &name_file(&root)),
            size,
            chunks,
            saved,
            modified: modified.unwrap_or(SystemTime::UNIX_EPOCH),
        });
    }
    Ok(out)
}

/// Chunks in all and chunks claimed by bitmap `name`, or (0, 0) unless it
/// is a well-formed bitmap of `root`.
fn bitmap_counts(dirs: &FolderDirs, name: &str, root: &Hash) -> (u32, u32) {
    let Ok(Some(bytes)) = dirs::read_state_file(dirs.partial(), name) else {
        return (0, 0);
    };
    let Some(header) = bytes.get(..HAVE_HEADER_LEN) else {
        return (0, 0);
    };
    let mut count = [0u8; 4];
    count.copy_from_slice(&header[44..48]);
    let count = u32::from_be_bytes(count);
    let well_formed = header[..8] == HAVE_MAGIC[..]
        && header[8..12] == HAVE_VERSION.to_be_bytes()
        && header[12..44] == root.0
        && bytes.len() - HAVE_HEADER_LEN == (count as usize).div_ceil(8);
    if !well_formed {
        return (0, 0);
    }
    let mut saved = 0u32;
    for i in 0..count as usize {
        if bytes[HAVE_HEADER_LEN + i / 8] & (0x80 >> (i % 8)) != 0 {
            saved += 1;
        }
    }
    (count, saved)
}

/// Removes every file of the download of `root` (data, bitmap, name and
/// leftover temp files); the caller makes sure it is not running.
pub fn remove_partial(dirs: &FolderDirs, root: &Hash) -> io::Result<()> {
    let hex = root.to_hex();
    for suffix in SUFFIXES {
        dirs::remove_if_present(dirs.partial(), &format!("{hex}{suffix}"))?;
    }
    dirs::sync(dirs.partial())?;
    debug!("removed partial download {}", root.short());
    Ok(())
}

/// Removes the downloads whose files were all left untouched for longer
/// than `max_age` before `now`, and returns them. Meant for start-up, when no
/// download runs. One that cannot be removed is logged and not returned.
pub fn sweep_stale_partials(
    dirs: &FolderDirs,
    max_age: Duration,
    now: SystemTime,
) -> io::Result<Vec<PartialInfo>> {
    let mut removed = Vec::new();
    for info in list_partials(dirs)? {
        let stale = now
            .duration_since(info.modified)
            .is_ok_and(|age| age > max_age);
        if !stale {
            continue;
        }
        match remove_partial(dirs, &info.root) {
            Ok(()) => removed.push(info),
            Err(err) => warn!(
                "cannot remove stale partial download {}: {err}",
                info.root.short()
            ),
        }
    }
    Ok(removed)
}

/// Where a download's files live, for tests that tamper with them.
#[cfg(test)]
fn paths(folder_dir: &Path, root: &Hash) -> (PathBuf, PathBuf) {
    let dir = super::partial_dir(folder_dir);
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
    use std::fs::{self, OpenOptions};

    const CHUNK: usize = MIN_CHUNK_SIZE as usize;

    /// Five full chunks and a short sixth, each byte telling its position.
    fn sample() -> (Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..5 * CHUNK + 1000).map(|i| (i * 7 % 253) as u8).collect();
        let hashes = data.chunks(CHUNK).map(hash_chunk).collect();
        let manifest = Manifest::from_hashes(data.len() as u64, CHUNK as u32, hashes);
        (data, manifest)
    }

    fn dirs(path: &Path) -> FolderDirs {
        FolderDirs::open(path).unwrap()
    }

    fn chunk(data: &[u8], index: u32) -> &[u8] {
        data.chunks(CHUNK).nth(index as usize).unwrap()
    }

    #[test]
    fn resume_keeps_saved_chunks_only() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(partial.missing_count(), 6);
        for index in [0, 2, 5] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        // Written but never saved: must not be trusted after a "crash".
        partial.write_chunk(3, chunk(&data, 3)).unwrap();
        assert_eq!(partial.have_count(), 4);
        drop(partial);

        let resumed = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(resumed.have().ones().collect::<Vec<_>>(), [0, 2, 5]);
        assert_eq!(resumed.missing().collect::<Vec<_>>(), [1, 3, 4]);
        assert_eq!(resumed.missing_count(), 3);
    }

    #[test]
    fn resume_drops_a_claimed_chunk_corrupted_on_disk() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        for index in [1, 4] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        drop(partial);
        let (data_path, _) = paths(tmp.path(), &manifest.root);
        let file = OpenOptions::new().write(true).open(&data_path).unwrap();
        file.write_all_at(b"X", manifest.chunk_offset(4) + 17)
            .unwrap();

        let mut resumed = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert!(resumed.has(1));
        assert!(!resumed.has(4));
        // The corrected bitmap is saved even with no new chunk written.
        resumed.save_progress().unwrap();
        drop(resumed);
        let have_name = format!("{}.have", manifest.root.to_hex());
        assert!(!read_bitmap(&dirs(tmp.path()), &have_name, &manifest).contains(4));
    }

    #[test]
    fn foreign_or_garbage_bitmap_is_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let (_, have_path) = paths(tmp.path(), &manifest.root);
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        partial.write_chunk(0, chunk(&data, 0)).unwrap();
        partial.save_progress().unwrap();
        drop(partial);
        let mut other_root = manifest.root;
        other_root.0[0] ^= 1;
        let mut all = FixedBitSet::with_capacity(6);
        all.insert_range(..);
        fs::write(&have_path, encode_bitmap(&other_root, &all)).unwrap();
        assert_eq!(
            PartialFile::open(&dirs(tmp.path()), &manifest)
                .unwrap()
                .have_count(),
            0
        );
        fs::write(&have_path, b"shoalhav garbage").unwrap();
        assert_eq!(
            PartialFile::open(&dirs(tmp.path()), &manifest)
                .unwrap()
                .have_count(),
            0
        );
    }

    #[test]
    fn write_chunk_refuses_wrong_length_and_index() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
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
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        for index in (0..6).rev() {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
            if index == 1 {
                let err = partial.finish(&name).unwrap_err();
                assert!(matches!(err, StoreError::Incomplete { missing: 1 }));
                partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
                assert_eq!(partial.have_count(), 5, "finish saved progress");
            }
        }
        let dest = partial.finish(&name).unwrap();
        assert_eq!(dest, tmp.path().join("got.bin"));
        // The user's file gets the mode any new file gets, not our 0600.
        fs::write(tmp.path().join("plain"), b"").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions();
        assert_eq!(mode(&dest), mode(&tmp.path().join("plain")));
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
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        for index in 0..6 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        let err = partial.finish(&name).unwrap_err();
        assert!(matches!(err, StoreError::AlreadyExists(ref p) if p.ends_with("taken")));
        assert!(err.to_string().contains("already exists"));
        assert_eq!(fs::read(tmp.path().join("taken")).unwrap(), b"user data");
        let again = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(again.missing_count(), 0);
        let other = FileName::new("free").unwrap();
        assert_eq!(fs::read(again.finish(&other).unwrap()).unwrap(), data);
    }

    #[test]
    fn empty_file_finishes_at_once_and_discard_removes_files() {
        let tmp = tempfile::tempdir().unwrap();
        let empty = Manifest::from_hashes(0, CHUNK as u32, vec![]);
        let partial = PartialFile::open(&dirs(tmp.path()), &empty).unwrap();
        assert_eq!(partial.missing_count(), 0);
        let dest = partial.finish(&FileName::new("e").unwrap()).unwrap();
        assert_eq!(fs::metadata(dest).unwrap().len(), 0);

        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        partial.write_chunk(0, chunk(&data, 0)).unwrap();
        partial.save_progress().unwrap();
        partial.discard().unwrap();
        let (data_path, have_path) = paths(tmp.path(), &manifest.root);
        assert!(!data_path.exists() && !have_path.exists());
    }

    #[test]
    fn resume_verification_in_slices() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        for index in [0, 2, 3, 5] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        drop(partial);
        let (data_path, _) = paths(tmp.path(), &manifest.root);
        let file = OpenOptions::new().write(true).open(&data_path).unwrap();
        file.write_all_at(b"X", manifest.chunk_offset(3)).unwrap();

        let mut resumed = PartialFile::open_unverified(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(resumed.have_count(), 0);
        assert_eq!(resumed.unverified_count(), 4);
        assert_eq!(
            resumed.missing().collect::<Vec<_>>(),
            [1, 4],
            "claims are not fetched"
        );
        // A claim settled by a fresh write is not read back.
        resumed.write_chunk(5, chunk(&data, 5)).unwrap();
        assert!(!resumed.is_unverified(5));
        // Saving mid-way keeps the claims still to check.
        resumed.save_progress().unwrap();
        let mut steps = 1;
        while !resumed.verify_step(CHUNK) {
            steps += 1;
        }
        assert_eq!(steps, 3, "one chunk per step");
        assert_eq!(resumed.have().ones().collect::<Vec<_>>(), [0, 2, 5]);
        assert_eq!(resumed.missing().collect::<Vec<_>>(), [1, 3, 4]);
        assert!(resumed.verify_step(CHUNK), "done stays done");
        resumed.save_progress().unwrap();
        drop(resumed);
        let again = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(again.have().ones().collect::<Vec<_>>(), [0, 2, 5]);
    }

    /// Symlinks and hard links planted at each of the download's names,
    /// pointing outside: the download still completes and the outside file is
    /// never written, truncated or read into the download.
    #[test]
    fn links_planted_at_the_download_files_lead_nowhere() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("victim"));
        fs::create_dir(&dir).unwrap();
        let precious = vec![0x5au8; 3 * CHUNK];
        fs::write(&outside, &precious).unwrap();
        let (data, manifest) = sample();
        let dirs = dirs(&dir);
        let (data_path, have_path) = paths(&dir, &manifest.root);
        let have_tmp = have_path.with_extension("have.tmp");
        for planted in [&data_path, &have_path, &have_tmp] {
            std::os::unix::fs::symlink(&outside, planted).unwrap();
        }
        let mut partial = PartialFile::open(&dirs, &manifest).unwrap();
        assert_eq!(partial.have_count(), 0);
        for index in 0..3 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        assert!(fs::symlink_metadata(&have_path).unwrap().is_file());
        drop(partial);
        assert_eq!(fs::read(&outside).unwrap(), precious);

        // A hard link at the data file's name is not written through either.
        fs::remove_file(&data_path).unwrap();
        fs::hard_link(&outside, &data_path).unwrap();
        let mut partial = PartialFile::open(&dirs, &manifest).unwrap();
        assert_eq!(
            partial.have_count(),
            0,
            "claims about a replaced file are void"
        );
        for index in 0..6 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        let name = FileName::new("got").unwrap();
        let dest = partial.finish(&name).unwrap();
        assert_eq!(fs::read(dest).unwrap(), data);
        assert_eq!(fs::read(&outside).unwrap(), precious);
    }

    #[test]
    fn finish_refuses_a_data_file_swapped_for_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (data, manifest) = sample();
        let dirs = dirs(tmp.path());
        let mut partial = PartialFile::open(&dirs, &manifest).unwrap();
        for index in 0..6 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        let (data_path, _) = paths(tmp.path(), &manifest.root);
        fs::remove_file(&data_path).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &data_path).unwrap();
        let err = partial.finish(&FileName::new("got").unwrap()).unwrap_err();
        assert!(err.to_string().contains("replaced"), "{err}");
        assert!(!tmp.path().join("got").exists());
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

        let mut partial = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
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

        let resumed = PartialFile::open(&dirs(tmp.path()), &manifest).unwrap();
        assert_eq!(resumed.have_count(), 2);
        assert!(resumed.has(past) && resumed.has(tail));
    }

    /// Sets every file of the download of `root` to `age` ago.
    fn back_date(dirs: &FolderDirs, root: &Hash, age: Duration) {
        let then = SystemTime::now() - age;
        let secs = then
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let stamp = rustix::fs::Timespec {
            tv_sec: secs as _,
            tv_nsec: 0,
        };
        let times = rustix::fs::Timestamps {
            last_access: stamp,
            last_modification: stamp,
        };
        for suffix in SUFFIXES {
            let name = format!("{}{suffix}", root.to_hex());
            match rustix::fs::utimensat(dirs.partial(), &*name, &times, AtFlags::SYMLINK_NOFOLLOW) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(err) => panic!("{name}: {err}"),
            }
        }
    }

    #[test]
    fn partials_are_listed_with_name_and_progress_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = dirs(tmp.path());
        let (data, manifest) = sample();
        assert!(list_partials(&dirs).unwrap().is_empty());
        let mut partial = PartialFile::open(&dirs, &manifest).unwrap();
        let name = FileName::new("my file.bin").unwrap();
        partial.record_name(&name).unwrap();
        partial.record_name(&name).unwrap();
        for index in [0, 2, 4] {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.save_progress().unwrap();
        drop(partial);
        // Strangers in the directory are ignored, symlinks never followed.
        let dir = super::super::partial_dir(tmp.path());
        fs::write(dir.join("notes.txt"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join(format!("{}.part", "cd".repeat(32))))
            .unwrap();

        let list = list_partials(&dirs).unwrap();
        assert_eq!(list.len(), 1, "{list:?}");
        let info = &list[0];
        assert_eq!(info.root, manifest.root);
        assert_eq!(info.name.as_ref(), Some(&name));
        assert_eq!(info.size, manifest.size);
        assert_eq!((info.chunks, info.saved), (6, 3));
        assert_eq!(info.percent(), 50.0);
        assert!(info.modified.elapsed().unwrap() < Duration::from_secs(60));

        // A hostile name file is not taken for a name.
        fs::write(dir.join(name_file(&manifest.root)), b"../../etc").unwrap();
        assert_eq!(list_partials(&dirs).unwrap()[0].name, None);

        remove_partial(&dirs, &manifest.root).unwrap();
        assert!(list_partials(&dirs).unwrap().is_empty());
        assert!(dir.join("notes.txt").exists(), "only its own files go");
        assert!(fs::read("/etc/passwd").is_ok());
    }

    #[test]
    fn finishing_removes_the_recorded_name() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = dirs(tmp.path());
        let (data, manifest) = sample();
        let mut partial = PartialFile::open(&dirs, &manifest).unwrap();
        partial.record_name(&FileName::new("n").unwrap()).unwrap();
        for index in 0..6 {
            partial.write_chunk(index, chunk(&data, index)).unwrap();
        }
        partial.finish(&FileName::new("n").unwrap()).unwrap();
        assert!(list_partials(&dirs).unwrap().is_empty());
    }

    #[test]
    fn sweep_removes_only_stale_partials() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = dirs(tmp.path());
        let (data, manifest) = sample();
        let old = Manifest::from_hashes(10, CHUNK as u32, vec![hash_chunk(&[1u8; 10])]);
        for m in [&manifest, &old] {
            let mut partial = PartialFile::open(&dirs, m).unwrap();
            partial.record_name(&FileName::new("x").unwrap()).unwrap();
            partial
                .write_chunk(0, &data[..m.chunk_len(0) as usize])
                .unwrap();
            partial.save_progress().unwrap();
        }
        back_date(&dirs, &old.root, Duration::from_secs(8 * 86400));
        let week = Duration::from_secs(7 * 86400);
        let removed = sweep_stale_partials(&dirs, week, SystemTime::now()).unwrap();
        assert_eq!(
            removed.iter().map(|i| i.root).collect::<Vec<_>>(),
            [old.root]
        );
        let left = list_partials(&dirs).unwrap();
        assert_eq!(
            left.iter().map(|i| i.root).collect::<Vec<_>>(),
            [manifest.root]
        );
        // A partial with one fresh file is not stale.
        back_date(&dirs, &manifest.root, Duration::from_secs(8 * 86400));
        PartialFile::open(&dirs, &manifest)
            .unwrap()
            .record_name(&FileName::new("y").unwrap())
            .unwrap();
        assert!(
            sweep_stale_partials(&dirs, week, SystemTime::now())
                .unwrap()
                .is_empty()
        );
    }

    proptest::proptest! {
        /// Any set of chunks survives the bitmap's encoding exactly.
        #[test]
        fn bitmap_round_trips(bits in proptest::collection::vec(proptest::prelude::any::<bool>(), 0..300)) {
            let tmp = tempfile::tempdir().unwrap();
            let hashes = vec![Hash::default(); bits.len()];
            let manifest = Manifest::from_hashes(bits.len() as u64 * CHUNK as u64, CHUNK as u32, hashes);
            let mut set = FixedBitSet::with_capacity(bits.len());
            for (i, &bit) in bits.iter().enumerate() {
                set.set(i, bit);
            }
            let dirs = dirs(tmp.path());
            dirs::replace_atomically(dirs.partial(), "x.have", &encode_bitmap(&manifest.root, &set)).unwrap();
            proptest::prop_assert_eq!(read_bitmap(&dirs, "x.have", &manifest), set);
        }
    }
}
