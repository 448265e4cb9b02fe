//! The folder a peer shares: which files are in it, and their manifests.
//!
//! Only regular files directly in the folder are shared; hidden names
//! (including shoal's own `.shoal/`), subfolders and symlinks are not, so
//! nothing outside the folder can leak through a link. Every file is opened
//! relative to the folder's handle with `O_NOFOLLOW`, and a file opened for
//! serving must be the very inode that was hashed, at the same size and
//! mtime ([`SharedFolder::open_shared`]).
//!
//! Hashing is the slow part, so manifests are kept in a cache keyed by
//! (inode, size, mtime), and what the cache cannot vouch for is queued and
//! hashed a slice at a time by [`SharedFolder::do_work`], between events: a
//! peer that finds a huge new file keeps answering while it hashes, and the
//! file is shared once its hashes are known.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use log::{debug, info, warn};
use rustix::fs::{AtFlags, FileType};

use super::cache::{self, CACHE_FILE, CachedFile};
use super::dirs::{self, FileStamp, FolderDirs};
use super::manifest::{FileHasher, Manifest};
use super::{StoreError, partial_dir};
use crate::wire::{FileName, FileSummary, Hash};

/// What opening a file to hash costs in a slice's budget beyond its bytes,
/// so a folder of many tiny files is also cut into slices.
const PER_FILE_COST: usize = 64 << 10;

/// Files from this size on get a log line when their hashing starts.
const BIG_FILE: u64 = 64 << 20;

/// Files that joined the set are announced together, at most once per this
/// much hashing work (about a tenth of a second), and when the queue drains:
/// a folder of thousands of new small files must not cost a full file list
/// to the manager per slice.
const ANNOUNCE_EVERY: u64 = 256 << 20;

/// Save the cache after this many newly hashed bytes even while more work
/// is queued, so a crash halfway through a big folder keeps most of it.
const SAVE_EVERY_BYTES: u64 = 1 << 30;

/// One file this peer offers, as indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// The name other peers ask for.
    pub name: FileName,
    /// Where it is on disk (the folder joined with `name`), for messages:
    /// files are opened relative to the folder's handle, never by path.
    pub path: PathBuf,
    /// Its chunk layout and hashes at the time it was indexed.
    pub manifest: Manifest,
    /// The inode, size and mtime the hashes belong to: a file opened for
    /// serving must match it exactly.
    pub stamp: FileStamp,
}

impl SharedFile {
    /// Checks that `file` is still the file that was hashed: same device and
    /// inode (not swapped for another file or a symlink's target), same size
    /// and mtime (not edited in place).
    pub fn check(&self, file: &File) -> io::Result<()> {
        let now = FileStamp::of(&file.metadata()?);
        if now == self.stamp {
            return Ok(());
        }
        let what = if (now.dev, now.ino) != (self.stamp.dev, self.stamp.ino) {
            "was replaced by another file"
        } else {
            "was modified"
        };
        Err(io::Error::other(format!(
            "{} {what} since it was indexed; serving nothing until it is hashed again",
            self.name
        )))
    }
}

/// The shared folder and its index. Serving looks files up here by name or
/// root; the peer calls [`SharedFolder::rescan`] to notice new downloads and
/// user edits, and [`SharedFolder::do_work`] while
/// [`SharedFolder::has_pending_work`] to hash what they found.
#[derive(Debug)]
pub struct SharedFolder {
    dirs: FolderDirs,
    files: BTreeMap<FileName, SharedFile>,
    /// Root -> name of the first file (by name) with that content.
    by_root: HashMap<Hash, FileName>,
    /// Shareable files still to hash, with the stamp the scan saw.
    pending: BTreeMap<FileName, FileStamp>,
    /// The file being hashed now.
    hashing: Option<Hashing>,
    /// Files hashed since the last open or rescan.
    hashed_since_scan: usize,
    /// The index differs from the cache on disk.
    cache_dirty: bool,
    /// Bytes hashed since the cache was last saved.
    unsaved_bytes: u64,
    /// Files joined the set since [`SharedFolder::do_work`] last said so.
    unannounced: bool,
    /// Hashing work (bytes, plus a cost per file) since then.
    work_since_announce: u64,
}

/// A file being hashed a slice at a time.
#[derive(Debug)]
struct Hashing {
    name: FileName,
    /// What the scan saw: a later scan that sees the same lets hashing go on.
    scanned: FileStamp,
    file: File,
    /// What the open file was when hashing began.
    stamp: FileStamp,
    hasher: FileHasher,
}

impl SharedFolder {
    /// Opens `dir` for sharing: opens (creating if needed) shoal's state
    /// folders in it, loads the hash cache, shares at once every file the
    /// cache vouches for and queues the rest for [`SharedFolder::do_work`].
    pub fn open(dir: &Path) -> Result<SharedFolder, StoreError> {
        let dirs = FolderDirs::open(dir)?;
        let (cached, cache_was_bad) = load_cache(&dirs);
        let mut folder = SharedFolder {
            dirs,
            files: BTreeMap::new(),
            by_root: HashMap::new(),
            pending: BTreeMap::new(),
            hashing: None,
            hashed_since_scan: 0,
            cache_dirty: cache_was_bad,
            unsaved_bytes: 0,
            unannounced: false,
            work_since_announce: 0,
        };
        folder.scan(cached)?;
        info!(
            "sharing {} files from {} ({} to hash)",
            folder.files.len(),
            dir.display(),
            folder.pending.len()
        );
        folder.save_cache_if_idle();
        Ok(folder)
    }

    /// Reads the folder again and updates the index. Returns whether the
    /// shared set changed now (a file removed, or changed and so withdrawn
    /// until it is hashed again), which is when the manager must be told.
    /// New and changed files are queued for [`SharedFolder::do_work`]. Costs
    /// one readdir and one stat per file when nothing changed.
    pub fn rescan(&mut self) -> Result<bool, StoreError> {
        self.hashed_since_scan = 0;
        let changed = self.scan(BTreeMap::new())?;
        if changed {
            info!("shared set changed: now {} files", self.files.len());
            // The caller announces the whole set, additions included.
            self.unannounced = false;
        }
        self.save_cache_if_idle();
        Ok(changed)
    }

    /// Whether files are waiting to be hashed: call
    /// [`SharedFolder::do_work`] soon.
    pub fn has_pending_work(&self) -> bool {
        self.hashing.is_some() || !self.pending.is_empty()
    }

    /// Hashes about `budget_bytes` of the queued files (at least one chunk).
    /// Returns true when the shared set changed and should be announced now:
    /// files that finished hashing are shared at once, and announced
    /// together at most once per 256 MiB of hashing work (so a big file as
    /// soon as it is done) and whenever the queue drains.
    pub fn do_work(&mut self, budget_bytes: usize) -> bool {
        let start = budget_bytes.max(1);
        let mut left = start;
        while left > 0 {
            if self.hashing.is_none() {
                let Some((name, scanned)) = self.pending.pop_first() else {
                    break;
                };
                left = left.saturating_sub(PER_FILE_COST);
                self.hashing = self.start_hashing(name, scanned);
                continue;
            }
            let Some(hashing) = self.hashing.as_mut() else {
                break;
            };
            let before = hashing.hasher.hashed();
            let step = hashing.hasher.step(&hashing.file, left);
            let spent = hashing.hasher.hashed() - before;
            self.unsaved_bytes += spent;
            left = left.saturating_sub(usize::try_from(spent).unwrap_or(usize::MAX));
            match step {
                Ok(false) => {}
                Ok(true) => {
                    if let Some(hashing) = self.hashing.take() {
                        self.unannounced |= self.finish_hashing(hashing);
                    }
                }
                Err(err) => {
                    if let Some(hashing) = self.hashing.take() {
                        self.hashing_failed(hashing, &err);
                    }
                }
            }
        }
        if self.unsaved_bytes >= SAVE_EVERY_BYTES {
            self.save_cache();
        }
        self.save_cache_if_idle();
        self.work_since_announce += (start - left) as u64;
        let due = !self.has_pending_work() || self.work_since_announce >= ANNOUNCE_EVERY;
        if self.unannounced && due {
            self.unannounced = false;
            self.work_since_announce = 0;
            return true;
        }
        false
    }

    /// Hashes everything queued before returning, for tests and tools that
    /// have no event loop to keep responsive.
    pub fn finish_pending_work(&mut self) -> bool {
        let mut changed = false;
        while self.has_pending_work() {
            changed |= self.do_work(usize::MAX);
        }
        changed
    }

    fn start_hashing(&mut self, name: FileName, scanned: FileStamp) -> Option<Hashing> {
        let started =
            dirs::open_regular(self.dirs.root(), name.as_str()).and_then(|(file, meta)| {
                let stamp = FileStamp::of(&meta);
                let hasher = FileHasher::new(&file, stamp.size)?;
                Ok((file, stamp, hasher))
            });
        match started {
            Ok((file, stamp, hasher)) => {
                if stamp.size >= BIG_FILE {
                    info!("hashing {name} ({} bytes); shared once hashed", stamp.size);
                } else {
                    debug!("hashing {name} ({} bytes)", stamp.size);
                }
                Some(Hashing {
                    name,
                    scanned,
                    file,
                    stamp,
                    hasher,
                })
            }
            Err(err) => {
                warn!("not sharing {name}: {err}");
                None
            }
        }
    }

    /// A read failed: if the file changed under us (say it was truncated),
    /// hash it again as it is now; otherwise leave it out.
    fn hashing_failed(&mut self, hashing: Hashing, err: &io::Error) {
        match hashing.file.metadata().map(|meta| FileStamp::of(&meta)) {
            Ok(now) if now != hashing.stamp => {
                debug!(
                    "{} changed while it was hashed; hashing it again",
                    hashing.name
                );
                self.pending.insert(hashing.name, now);
            }
            _ => warn!("not sharing {}: {err}", hashing.name),
        }
    }

    /// Shares a file whose hashing is done, unless it changed meanwhile (then
    /// it is queued again). Returns whether it joined the shared set.
    fn finish_hashing(&mut self, hashing: Hashing) -> bool {
        let Hashing {
            name,
            file,
            stamp,
            hasher,
            ..
        } = hashing;
        match file.metadata().map(|meta| FileStamp::of(&meta)) {
            Ok(now) if now == stamp => {}
            Ok(now) => {
                debug!("{name} changed while it was hashed; hashing it again");
                self.pending.insert(name, now);
                return false;
            }
            Err(err) => {
                warn!("not sharing {name}: {err}");
                return false;
            }
        }
        let manifest = hasher.finish();
        debug!(
            "hashed {name}: {} bytes, root {}",
            manifest.size,
            manifest.root.short()
        );
        self.hashed_since_scan += 1;
        self.insert(SharedFile {
            path: self.dirs.path().join(name.as_str()),
            name,
            manifest,
            stamp,
        });
        true
    }

    /// Adds one file to the index and its root lookup.
    fn insert(&mut self, file: SharedFile) {
        match self.by_root.get(&file.manifest.root) {
            Some(first) if *first <= file.name => {}
            _ => {
                self.by_root.insert(file.manifest.root, file.name.clone());
            }
        }
        self.files.insert(file.name.clone(), file);
        self.cache_dirty = true;
    }

    /// Lists the folder and brings the index up to date with it: unchanged
    /// files stay, files `cached` vouches for join, gone or changed files
    /// leave, and the rest are queued. Returns whether files left.
    fn scan(&mut self, mut cached: BTreeMap<FileName, CachedFile>) -> Result<bool, StoreError> {
        let listing = list_folder(&self.dirs)?;
        let mut prior = std::mem::take(&mut self.files);
        let hashing = self.hashing.take();
        self.pending.clear();
        let mut removed = false;
        for (name, stamp) in listing {
            // Moved, not cloned: a big file's hash list can be megabytes.
            if let Some(old) = prior.remove(&name) {
                if old.stamp.unchanged(&stamp) {
                    // The device may be renumbered (a remount); serving
                    // checks against what the file system says now.
                    self.files.insert(name, SharedFile { stamp, ..old });
                    continue;
                }
                debug!("{name} changed; withdrawn until it is hashed again");
                removed = true;
                self.cache_dirty = true;
            } else if let Some(entry) = cached.remove(&name)
                && entry.vouches_for(&stamp)
            {
                self.files.insert(
                    name.clone(),
                    SharedFile {
                        path: self.dirs.path().join(name.as_str()),
                        name,
                        manifest: entry.manifest,
                        stamp,
                    },
                );
                continue;
            }
            self.pending.insert(name, stamp);
        }
        if !prior.is_empty() {
            debug!("{} shared files are gone", prior.len());
            removed = true;
            self.cache_dirty = true;
        }
        if !cached.is_empty() {
            self.cache_dirty = true;
        }
        // Hashing goes on only if the file is still there, as it was.
        if let Some(hashing) = hashing
            && self.pending.get(&hashing.name) == Some(&hashing.scanned)
        {
            self.pending.remove(&hashing.name);
            self.hashing = Some(hashing);
        }
        self.rebuild_by_root();
        Ok(removed)
    }

    fn rebuild_by_root(&mut self) {
        self.by_root.clear();
        for file in self.files.values() {
            self.by_root
                .entry(file.manifest.root)
                .or_insert_with(|| file.name.clone());
        }
    }

    /// Shares a file a download just wrote into the folder, with the manifest
    /// every chunk of it was verified against: no need to read it all again.
    /// Its stamp is taken from the file now, so a later rescan sees it as
    /// unchanged (and rehashes it if anyone edits it).
    pub fn add_downloaded(&mut self, name: FileName, manifest: Manifest) -> Result<(), StoreError> {
        let path = self.dirs.path().join(name.as_str());
        let meta = match dirs::open_regular(self.dirs.root(), name.as_str()) {
            Ok((_, meta)) => meta,
            Err(err) => return Err(StoreError::io("open", &path, err)),
        };
        if meta.len() != manifest.size {
            // Not what we wrote: let the next rescan index whatever it is.
            warn!(
                "{} changed since it was downloaded; it will be rehashed",
                path.display()
            );
            return Ok(());
        }
        self.pending.remove(&name);
        if self.hashing.as_ref().is_some_and(|h| h.name == name) {
            self.hashing = None;
        }
        self.files.remove(&name);
        self.rebuild_by_root();
        self.insert(SharedFile {
            name,
            path,
            manifest,
            stamp: FileStamp::of(&meta),
        });
        self.save_cache_if_idle();
        Ok(())
    }

    /// Opens a shared file for serving: relative to the folder, never through
    /// a symlink, and only if it is still exactly the file that was hashed
    /// (see [`SharedFile::check`]). Serving nothing beats serving another
    /// file's bytes under this file's hashes.
    pub fn open_shared(&self, shared: &SharedFile) -> io::Result<File> {
        let (file, _) = dirs::open_regular(self.dirs.root(), shared.name.as_str())
            .map_err(|err| io::Error::new(err.kind(), format!("{}: {err}", shared.name)))?;
        shared.check(&file)?;
        Ok(file)
    }

    fn save_cache_if_idle(&mut self) {
        if self.cache_dirty && !self.has_pending_work() {
            self.save_cache();
        }
    }

    /// The cache only saves time, so failing to write it is a warning.
    fn save_cache(&mut self) {
        let bytes = cache::encode(
            self.files
                .values()
                .map(|file| (&file.name, &file.stamp, &file.manifest)),
        );
        match dirs::replace_atomically(self.dirs.meta(), CACHE_FILE, &bytes) {
            Ok(()) => debug!("wrote hash cache ({} bytes)", bytes.len()),
            Err(err) => warn!("cannot write hash cache in .shoal: {err}"),
        }
        self.cache_dirty = false;
        self.unsaved_bytes = 0;
    }

    /// Every shared file, sorted by name.
    pub fn files(&self) -> impl Iterator<Item = &SharedFile> {
        self.files.values()
    }

    /// The file shared as `name`, if any.
    pub fn by_name(&self, name: &FileName) -> Option<&SharedFile> {
        self.files.get(name)
    }

    /// A file with exactly this content, if any: what serving a chunk request
    /// needs, since requests name a version by root.
    pub fn by_root(&self, root: &Hash) -> Option<&SharedFile> {
        self.files.get(self.by_root.get(root)?)
    }

    /// The shared set as the manager is told it, sorted by name.
    pub fn summaries(&self) -> Vec<FileSummary> {
        self.files
            .values()
            .map(|file| FileSummary {
                name: file.name.clone(),
                size: file.manifest.size,
                root: file.manifest.root,
            })
            .collect()
    }

    /// The folder being shared.
    pub fn dir(&self) -> &Path {
        self.dirs.path()
    }

    /// The handles on the folder and its state folders, which partial files
    /// and every other step on shoal's state go through.
    pub fn dirs(&self) -> &FolderDirs {
        &self.dirs
    }

    /// Where this folder's downloads in progress live.
    pub fn partial_dir(&self) -> PathBuf {
        partial_dir(self.dirs.path())
    }

    /// How many files were hashed since the last open or rescan; the rest
    /// came from the cache. For logs and tests.
    pub fn hashed_files(&self) -> usize {
        self.hashed_since_scan
    }

    /// How many files wait to be hashed (the one being hashed included).
    pub fn pending_files(&self) -> usize {
        self.pending.len() + usize::from(self.hashing.is_some())
    }
}

/// Loads the hash cache. A missing cache is normal (first run); a bad one is
/// logged and reported so it gets rewritten.
fn load_cache(dirs: &FolderDirs) -> (BTreeMap<FileName, CachedFile>, bool) {
    let bytes = match dirs::read_state_file(dirs.meta(), CACHE_FILE) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return (BTreeMap::new(), false),
        Err(err) => {
            warn!("cannot read hash cache .shoal/{CACHE_FILE}: {err}; rehashing");
            return (BTreeMap::new(), true);
        }
    };
    match cache::decode(&bytes) {
        Ok(files) => (files, false),
        Err(reason) => {
            warn!("ignoring hash cache .shoal/{CACHE_FILE}: {reason}; rehashing");
            (BTreeMap::new(), true)
        }
    }
}

/// Every shareable entry of the folder with its stamp, read through the
/// folder's handle. Entries that are not shared are skipped: hidden names,
/// anything but a regular file (a symlink is never followed), and names
/// another peer could not ask for (warned about, since the user may wonder
/// why they are missing). A file that cannot be read is left out with a
/// warning rather than failing the whole scan.
fn list_folder(dirs: &FolderDirs) -> Result<Vec<(FileName, FileStamp)>, StoreError> {
    let unreadable = |err| StoreError::io("read shared folder", dirs.path(), io::Error::from(err));
    // The handle outlives a deleted folder, which then lists as empty.
    if rustix::fs::fstat(dirs.root()).map_err(unreadable)?.st_nlink == 0 {
        return Err(StoreError::FolderMissing(dirs.path().to_path_buf()));
    }
    let dir = rustix::fs::Dir::read_from(dirs.root()).map_err(unreadable)?;
    let mut found = Vec::new();
    for entry in dir {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                warn!("cannot read an entry of {}: {err}", dirs.path().display());
                continue;
            }
        };
        let raw = entry.file_name().to_bytes();
        if raw.starts_with(b".") {
            continue;
        }
        let os_name = OsStr::from_bytes(raw);
        let stat =
            match rustix::fs::statat(dirs.root(), entry.file_name(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(stat) => stat,
                Err(err) => {
                    warn!("cannot stat {os_name:?}: {err}");
                    continue;
                }
            };
        if !FileType::from_raw_mode(stat.st_mode).is_file() {
            debug!("not sharing {os_name:?}: not a regular file");
            continue;
        }
        let Some(text) = os_name.to_str() else {
            warn!("not sharing {os_name:?}: its name is not UTF-8");
            continue;
        };
        match FileName::new(text) {
            Ok(name) => found.push((name, stamp_of(&stat))),
            Err(err) => warn!("not sharing {text:?}: {err}"),
        }
    }
    Ok(found)
}

/// The field widths of `stat` differ between platforms; these casts only
/// widen or keep them.
#[allow(clippy::unnecessary_cast)]
fn stamp_of(stat: &rustix::fs::Stat) -> FileStamp {
    FileStamp {
        dev: stat.st_dev as u64,
        ino: stat.st_ino as u64,
        size: stat.st_size as u64,
        mtime_ns: i128::from(stat.st_mtime as i64) * 1_000_000_000
            + i128::from(stat.st_mtime_nsec as i64),
        ctime_ns: i128::from(stat.st_ctime as i64) * 1_000_000_000
            + i128::from(stat.st_ctime_nsec as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::hash_chunk;
    use std::fs::{self, OpenOptions};
    use std::os::unix::fs::{MetadataExt, symlink};
    use std::time::{Duration, SystemTime};

    /// Opens and hashes everything, as a peer does before its first turn.
    fn open_all(dir: &Path) -> SharedFolder {
        let mut folder = SharedFolder::open(dir).unwrap();
        folder.finish_pending_work();
        folder
    }

    fn rescan_all(folder: &mut SharedFolder) -> bool {
        let removed = folder.rescan().unwrap();
        folder.finish_pending_work() | removed
    }

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    /// Moves a file's mtime, so a change is seen even on coarse-mtime filesystems.
    fn set_mtime(path: &Path, secs_ago: u64) {
        let when = SystemTime::now() - Duration::from_secs(secs_ago);
        let file = OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(when).unwrap();
    }

    fn names(folder: &SharedFolder) -> Vec<&str> {
        folder.files().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn open_refuses_missing_folder_and_plain_file() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("peer9");
        let err = SharedFolder::open(&missing).unwrap_err();
        assert!(matches!(err, StoreError::FolderMissing(_)));
        assert!(err.to_string().contains("create it or pass --dir"));
        let file = tmp.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(matches!(
            SharedFolder::open(&file),
            Err(StoreError::NotAFolder(_))
        ));
    }

    #[test]
    fn shares_only_regular_top_level_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("b.txt"), b"bee").unwrap();
        fs::write(dir.join("a.bin"), b"").unwrap();
        fs::write(dir.join(".hidden"), b"secret").unwrap();
        fs::create_dir(dir.join("sub")).unwrap();
        fs::write(dir.join("sub/inner.txt"), b"inner").unwrap();
        symlink(dir.join("b.txt"), dir.join("link.txt")).unwrap();
        symlink("/etc/passwd", dir.join("escape")).unwrap();
        fs::write(dir.join("back\\slash"), b"odd").unwrap();
        let folder = open_all(dir);
        assert!(dir.join(".shoal/partial").is_dir());
        assert_eq!(names(&folder), ["a.bin", "b.txt"]);
        let b = folder.by_name(&name("b.txt")).unwrap();
        assert_eq!(b.path, dir.join("b.txt"));
        assert_eq!(b.manifest.hashes, [hash_chunk(b"bee")]);
        assert_eq!(
            folder.by_root(&b.manifest.root).unwrap().name,
            name("b.txt")
        );
        assert_eq!(
            folder
                .by_name(&name("a.bin"))
                .unwrap()
                .manifest
                .chunk_count(),
            0
        );
        let summaries = folder.summaries();
        assert_eq!(summaries.len(), 2);
        assert_eq!(summaries[1].size, 3);
        assert_eq!(summaries[1].root, b.manifest.root);
    }

    #[test]
    fn cache_avoids_rehashing_unchanged_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("one"), b"1").unwrap();
        fs::write(dir.join("two"), b"2").unwrap();
        let mut first = SharedFolder::open(dir).unwrap();
        assert_eq!(first.pending_files(), 2);
        first.finish_pending_work();
        assert_eq!(first.hashed_files(), 2);
        assert!(dir.join(".shoal/index.v1").is_file());
        // Every rewrite renames a new file in, so the inode tells whether it was.
        let cache_inode = || fs::metadata(dir.join(".shoal/index.v1")).unwrap().ino();
        let first_inode = cache_inode();

        let again = SharedFolder::open(dir).unwrap();
        assert!(!again.has_pending_work());
        assert_eq!(again.summaries(), first.summaries());
        assert_eq!(cache_inode(), first_inode, "unchanged cache rewritten");

        set_mtime(&dir.join("two"), 100);
        let touched = open_all(dir);
        assert_eq!(touched.hashed_files(), 1);
        assert_ne!(cache_inode(), first_inode, "new mtime not recorded");
        assert_eq!(open_all(dir).hashed_files(), 0);
    }

    #[test]
    fn a_downloaded_file_is_shared_without_rehashing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut folder = open_all(dir);
        let data = vec![7u8; 100_000];
        fs::write(dir.join("got.bin"), &data).unwrap();
        let chunk = super::super::chunk_size_for(data.len() as u64);
        let hashes = data
            .chunks(chunk as usize)
            .map(super::super::hash_chunk)
            .collect();
        let manifest = Manifest::from_hashes(data.len() as u64, chunk, hashes);
        let root = manifest.root;
        folder.add_downloaded(name("got.bin"), manifest).unwrap();
        assert_eq!(folder.by_root(&root).unwrap().name, name("got.bin"));
        assert!(!folder.rescan().unwrap(), "already known: no change");
        assert_eq!(folder.hashed_files(), 0);
        assert_eq!(open_all(dir).hashed_files(), 0, "cached too");
    }

    #[test]
    fn corrupt_cache_is_ignored_and_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("one"), b"1").unwrap();
        let good = open_all(dir).summaries();
        let cache_path = dir.join(".shoal/index.v1");
        let bytes = fs::read(&cache_path).unwrap();
        for bad in [&bytes[..bytes.len() / 2], b"garbage", &[]] {
            fs::write(&cache_path, bad).unwrap();
            let folder = open_all(dir);
            assert_eq!(folder.hashed_files(), 1);
            assert_eq!(folder.summaries(), good);
            assert_eq!(fs::read(&cache_path).unwrap(), bytes, "cache rewritten");
        }
    }

    #[test]
    fn rescan_detects_add_remove_and_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("keep"), b"k").unwrap();
        fs::write(dir.join("edit"), b"before").unwrap();
        let mut folder = open_all(dir);
        assert!(!rescan_all(&mut folder));
        assert_eq!(folder.hashed_files(), 0);

        fs::write(dir.join("new"), b"n").unwrap();
        assert!(!folder.rescan().unwrap(), "nothing left the set");
        assert_eq!(names(&folder), ["edit", "keep"], "shared once hashed");
        assert!(folder.has_pending_work());
        assert!(folder.do_work(1 << 20));
        assert_eq!(names(&folder), ["edit", "keep", "new"]);
        assert_eq!(folder.hashed_files(), 1);

        fs::remove_file(dir.join("new")).unwrap();
        assert!(folder.rescan().unwrap());
        assert_eq!(names(&folder), ["edit", "keep"]);

        let old_root = folder.by_name(&name("edit")).unwrap().manifest.root;
        fs::write(dir.join("edit"), b"after!").unwrap();
        set_mtime(&dir.join("edit"), 50);
        assert!(
            folder.rescan().unwrap(),
            "the old version is withdrawn at once"
        );
        assert!(folder.by_root(&old_root).is_none());
        assert!(folder.finish_pending_work());
        let new_root = folder.by_name(&name("edit")).unwrap().manifest.root;
        assert_ne!(new_root, old_root);

        // A bare touch rehashes and comes back with the same root.
        let before = folder.summaries();
        set_mtime(&dir.join("edit"), 10);
        assert!(rescan_all(&mut folder));
        assert_eq!(folder.hashed_files(), 1);
        assert_eq!(folder.summaries(), before);
        assert!(!rescan_all(&mut folder));
        assert_eq!(folder.hashed_files(), 0);
    }

    /// Eight chunks' worth, so a small budget takes several slices.
    fn big_sample(dir: &Path, file: &str) -> Vec<u8> {
        let data: Vec<u8> = (0..8 * (32 << 10) + 5).map(|i| (i % 251) as u8).collect();
        fs::write(dir.join(file), &data).unwrap();
        data
    }

    #[test]
    fn a_new_file_is_hashed_in_slices_and_shared_when_done() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("small"), b"s").unwrap();
        let data = big_sample(dir, "big");
        let mut folder = SharedFolder::open(dir).unwrap();
        assert!(names(&folder).is_empty(), "nothing hashed in open");
        assert_eq!(folder.pending_files(), 2);
        let mut turns = 0;
        let mut announced_at = Vec::new();
        let mut big_shared_at = None;
        while folder.has_pending_work() {
            turns += 1;
            if folder.do_work(32 << 10) {
                announced_at.push(turns);
            }
            if big_shared_at.is_none() && folder.by_name(&name("big")).is_some() {
                big_shared_at = Some(turns);
            }
            assert!(turns < 100);
        }
        // "big" first (name order): 8 full chunks and a tail, a chunk a turn.
        assert!(turns >= 9, "{turns} turns");
        assert!(big_shared_at.unwrap() < turns, "shared as soon as hashed");
        // Small files are announced together, when the queue drains.
        assert_eq!(announced_at, [turns]);
        let expected =
            super::super::hash_file(&File::open(dir.join("big")).unwrap(), data.len() as u64)
                .unwrap();
        assert_eq!(folder.by_name(&name("big")).unwrap().manifest, expected);
        assert_eq!(names(&folder), ["big", "small"]);
        assert!(!folder.do_work(1 << 20), "no work left");
        // The cache was written once idle.
        assert_eq!(SharedFolder::open(dir).unwrap().pending_files(), 0);
    }

    #[test]
    fn a_big_file_is_announced_when_done_without_waiting_for_the_queue() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // Sparse: each counts as 300 MiB of work and hashes in no time.
        for big in ["a.big", "b.big"] {
            File::create(dir.join(big))
                .unwrap()
                .set_len(300 << 20)
                .unwrap();
        }
        let mut folder = SharedFolder::open(dir).unwrap();
        while !folder.do_work(4 << 20) {
            assert!(folder.has_pending_work(), "never announced");
        }
        assert_eq!(names(&folder), ["a.big"]);
        assert!(folder.has_pending_work(), "b.big still being hashed");
        while !folder.do_work(4 << 20) {}
        assert_eq!(names(&folder), ["a.big", "b.big"]);
    }

    #[test]
    fn rescan_during_hashing_keeps_progress_drops_gone_and_redoes_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        big_sample(dir, "big");
        let mut folder = SharedFolder::open(dir).unwrap();
        // The open costs 64 KiB of budget; four chunks are hashed.
        assert!(!folder.do_work(192 << 10));
        assert!(!folder.rescan().unwrap());
        // Progress kept: what is left takes fewer turns than the whole.
        let mut turns = 0;
        while !folder.do_work(32 << 10) {
            turns += 1;
        }
        assert_eq!(turns, 4, "hashing restarted");

        fs::remove_file(dir.join("big")).unwrap();
        assert!(folder.rescan().unwrap());
        big_sample(dir, "again");
        folder.rescan().unwrap();
        assert!(!folder.do_work(64 << 10));
        fs::remove_file(dir.join("again")).unwrap();
        folder.rescan().unwrap();
        assert!(
            !folder.has_pending_work(),
            "a file gone mid-hash is dropped"
        );
        assert!(names(&folder).is_empty());

        // Changed while being hashed: hashed again from the start.
        big_sample(dir, "moving");
        folder.rescan().unwrap();
        assert!(!folder.do_work(64 << 10));
        fs::write(dir.join("moving"), b"short now").unwrap();
        set_mtime(&dir.join("moving"), 30);
        folder.finish_pending_work();
        let got = folder.by_name(&name("moving")).unwrap();
        assert_eq!(got.manifest.hashes, [hash_chunk(b"short now")]);
    }

    #[test]
    fn a_file_swapped_after_indexing_is_never_served() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("secret"));
        fs::create_dir(&dir).unwrap();
        fs::write(&outside, b"outside!").unwrap();
        fs::write(dir.join("a.txt"), b"inside!!").unwrap();
        let folder = open_all(&dir);
        let shared = folder.by_name(&name("a.txt")).unwrap().clone();
        let mut read = String::new();
        io::Read::read_to_string(&mut folder.open_shared(&shared).unwrap(), &mut read).unwrap();
        assert_eq!(read, "inside!!");

        // A symlink to a file outside: never followed.
        fs::remove_file(dir.join("a.txt")).unwrap();
        symlink(&outside, dir.join("a.txt")).unwrap();
        let err = folder.open_shared(&shared).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");

        // Another file of the same size and mtime (maybe even the freed
        // inode's number): the ctime tells.
        fs::remove_file(dir.join("a.txt")).unwrap();
        fs::copy(&outside, dir.join("a.txt")).unwrap();
        let file = OpenOptions::new()
            .write(true)
            .open(dir.join("a.txt"))
            .unwrap();
        let mtime = SystemTime::UNIX_EPOCH
            + Duration::from_nanos(u64::try_from(shared.stamp.mtime_ns).unwrap());
        file.set_modified(mtime).unwrap();
        drop(file);
        let err = folder.open_shared(&shared).unwrap_err();
        assert!(err.to_string().contains("since it was indexed"), "{err}");

        // A handle opened before an in-place edit is refused at its next use.
        let tmp2 = tempfile::tempdir().unwrap();
        fs::write(tmp2.path().join("b"), b"bbbb").unwrap();
        let folder = open_all(tmp2.path());
        let b = folder.by_name(&name("b")).unwrap();
        let handle = folder.open_shared(b).unwrap();
        fs::write(tmp2.path().join("b"), b"bbbbbbbb").unwrap();
        assert!(
            b.check(&handle)
                .unwrap_err()
                .to_string()
                .contains("modified")
        );
    }

    #[test]
    fn the_cache_is_never_read_or_written_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("outside"));
        fs::create_dir(&dir).unwrap();
        fs::write(&outside, b"precious").unwrap();
        fs::write(dir.join("one"), b"1").unwrap();
        fs::create_dir(dir.join(".shoal")).unwrap();
        symlink(&outside, dir.join(".shoal/index.v1")).unwrap();
        symlink(&outside, dir.join(".shoal/index.v1.tmp")).unwrap();
        let folder = open_all(&dir);
        assert_eq!(names(&folder), ["one"]);
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        let cache = fs::symlink_metadata(dir.join(".shoal/index.v1")).unwrap();
        assert!(cache.is_file(), "the link was replaced by a real cache");
        assert_eq!(open_all(&dir).hashed_files(), 0);
    }

    #[test]
    fn the_cache_does_not_vouch_for_another_inode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("f"), b"first").unwrap();
        let first = open_all(dir).by_name(&name("f")).unwrap().stamp;
        // Same size and mtime, other contents, other inode.
        fs::write(dir.join("g"), b"other").unwrap();
        let file = OpenOptions::new().write(true).open(dir.join("g")).unwrap();
        let mtime =
            SystemTime::UNIX_EPOCH + Duration::from_nanos(u64::try_from(first.mtime_ns).unwrap());
        file.set_modified(mtime).unwrap();
        drop(file);
        fs::rename(dir.join("g"), dir.join("f")).unwrap();
        assert_ne!(fs::metadata(dir.join("f")).unwrap().ino(), first.ino);
        let again = open_all(dir);
        assert_eq!(again.hashed_files(), 1);
        assert_eq!(
            again.by_name(&name("f")).unwrap().manifest.hashes,
            [hash_chunk(b"other")]
        );
    }

    #[test]
    fn rescan_of_a_deleted_folder_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        fs::create_dir(&dir).unwrap();
        let mut folder = open_all(&dir);
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(folder.rescan(), Err(StoreError::FolderMissing(_))));
    }
}
