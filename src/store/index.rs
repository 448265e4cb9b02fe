//! The folder a peer shares: which files are in it, and their manifests.
//!
//! Only regular files directly in the folder are shared; hidden names
//! (including shoal's own `.shoal/`), subfolders and symlinks are not, so
//! nothing outside the folder can leak through a link. Hashing is the slow
//! part, so manifests are kept in a cache keyed by (size, mtime) and a file is
//! rehashed only when either changes.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, DirEntry, OpenOptions, ReadDir};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use log::{debug, info, warn};

use super::cache::{self, CACHE_FILE};
use super::manifest::{Manifest, hash_file};
use super::{META_DIR, StoreError, disk, partial_dir};
use crate::wire::{FileName, FileSummary, Hash};

/// One file this peer offers, as indexed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedFile {
    /// The name other peers ask for.
    pub name: FileName,
    /// Where it is on disk (the folder joined with `name`).
    pub path: PathBuf,
    /// Its chunk layout and hashes at the time it was indexed.
    pub manifest: Manifest,
    /// Modification time (ns since the Unix epoch) when it was hashed; with
    /// the size, the cache key that says whether it must be hashed again.
    pub mtime_ns: i128,
}

/// The shared folder and its index. Serving looks files up here by name or
/// root; the peer calls [`SharedFolder::rescan`] to notice new downloads and
/// user edits.
#[derive(Debug)]
pub struct SharedFolder {
    dir: PathBuf,
    files: BTreeMap<FileName, SharedFile>,
    /// Root -> name of the first file (by name) with that content.
    by_root: HashMap<Hash, FileName>,
    hashed_last_scan: usize,
}

/// What one pass over the folder found.
struct Scan {
    files: BTreeMap<FileName, SharedFile>,
    /// Files whose contents were read and hashed.
    hashed: usize,
    /// A name came, went or changed content.
    set_changed: bool,
    /// Anything the cache records changed (including a bare mtime change).
    cache_dirty: bool,
}

impl SharedFolder {
    /// Opens `dir` for sharing: creates shoal's state folders in it, loads
    /// the hash cache and indexes every shareable file, hashing only those
    /// the cache does not vouch for.
    pub fn open(dir: &Path) -> Result<SharedFolder, StoreError> {
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(StoreError::NotAFolder(dir.to_path_buf())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::FolderMissing(dir.to_path_buf()));
            }
            Err(err) => return Err(StoreError::io("read shared folder", dir, err)),
        }
        let partial = partial_dir(dir);
        fs::create_dir_all(&partial).map_err(|err| StoreError::io("create", &partial, err))?;

        let (cached, cache_was_bad) = load_cache(dir);
        let entries = read_folder(dir)?;
        let scan = scan(dir, entries, cached);
        let mut folder = SharedFolder {
            dir: dir.to_path_buf(),
            files: BTreeMap::new(),
            by_root: HashMap::new(),
            hashed_last_scan: 0,
        };
        folder.apply(scan.files, scan.hashed, scan.cache_dirty || cache_was_bad);
        info!(
            "sharing {} files from {} ({} hashed)",
            folder.files.len(),
            dir.display(),
            folder.hashed_last_scan
        );
        Ok(folder)
    }

    /// Reads the folder again and updates the index. Returns whether the
    /// shared set changed (a file added, removed, or with new contents), which
    /// is when the manager must be told. Costs one readdir and one stat per
    /// file when nothing changed.
    pub fn rescan(&mut self) -> Result<bool, StoreError> {
        let entries = read_folder(&self.dir)?;
        let prior = std::mem::take(&mut self.files);
        let scan = scan(&self.dir, entries, prior);
        self.apply(scan.files, scan.hashed, scan.cache_dirty);
        if scan.set_changed {
            info!("shared set changed: now {} files", self.files.len());
        }
        Ok(scan.set_changed)
    }

    /// Shares a file a download just wrote into the folder, with the manifest
    /// every chunk of it was verified against: no need to read it all again.
    /// Size and mtime are taken from the file now, so a later rescan sees it
    /// as unchanged (and rehashes it if anyone edits it).
    pub fn add_downloaded(&mut self, name: FileName, manifest: Manifest) -> Result<(), StoreError> {
        let path = self.dir.join(name.as_str());
        let meta = fs::symlink_metadata(&path).map_err(|err| StoreError::io("stat", &path, err))?;
        if !meta.is_file() || meta.len() != manifest.size {
            // Not what we wrote: let the next rescan index whatever it is.
            warn!(
                "{} changed since it was downloaded; it will be rehashed",
                path.display()
            );
            return Ok(());
        }
        let file = SharedFile {
            name: name.clone(),
            path,
            manifest,
            mtime_ns: mtime_ns(&meta),
        };
        let mut files = std::mem::take(&mut self.files);
        files.insert(name, file);
        self.apply(files, 0, true);
        Ok(())
    }

    fn apply(&mut self, files: BTreeMap<FileName, SharedFile>, hashed: usize, cache_dirty: bool) {
        self.files = files;
        self.hashed_last_scan = hashed;
        self.by_root.clear();
        for file in self.files.values() {
            self.by_root
                .entry(file.manifest.root)
                .or_insert_with(|| file.name.clone());
        }
        if cache_dirty {
            self.save_cache();
        }
    }

    /// The cache only saves time, so failing to write it is a warning.
    fn save_cache(&self) {
        let path = self.dir.join(META_DIR).join(CACHE_FILE);
        let bytes = cache::encode(self.files.values());
        match disk::replace_atomically(&path, &bytes) {
            Ok(()) => debug!(
                "wrote hash cache {} ({} bytes)",
                path.display(),
                bytes.len()
            ),
            Err(err) => warn!("cannot write hash cache {}: {err}", path.display()),
        }
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
        &self.dir
    }

    /// Where this folder's downloads in progress live.
    pub fn partial_dir(&self) -> PathBuf {
        partial_dir(&self.dir)
    }

    /// How many files the last open or rescan had to read and hash; the rest
    /// came from the cache. For logs and tests.
    pub fn hashed_files(&self) -> usize {
        self.hashed_last_scan
    }
}

/// Loads the hash cache. A missing cache is normal (first run); a bad one is
/// logged and reported so it gets rewritten.
fn load_cache(dir: &Path) -> (BTreeMap<FileName, SharedFile>, bool) {
    let path = dir.join(META_DIR).join(CACHE_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return (BTreeMap::new(), false),
        Err(err) => {
            warn!(
                "cannot read hash cache {}: {err}; rehashing",
                path.display()
            );
            return (BTreeMap::new(), true);
        }
    };
    match cache::decode(&bytes, dir) {
        Ok(files) => (files, false),
        Err(reason) => {
            warn!(
                "ignoring hash cache {}: {reason}; rehashing",
                path.display()
            );
            (BTreeMap::new(), true)
        }
    }
}

fn read_folder(dir: &Path) -> Result<ReadDir, StoreError> {
    fs::read_dir(dir).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => StoreError::FolderMissing(dir.to_path_buf()),
        _ => StoreError::io("read shared folder", dir, err),
    })
}

/// Indexes the folder, taking each unchanged file's manifest from `prior`
/// (the cache, or the previous scan) and hashing the rest. A file that cannot
/// be read is left out with a warning rather than failing the whole scan.
fn scan(dir: &Path, entries: ReadDir, mut prior: BTreeMap<FileName, SharedFile>) -> Scan {
    let mut found = Scan {
        files: BTreeMap::new(),
        hashed: 0,
        set_changed: false,
        cache_dirty: false,
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(err) => {
                warn!("cannot read an entry of {}: {err}", dir.display());
                continue;
            }
        };
        let Some((name, size, mtime_ns)) = shareable(&entry) else {
            continue;
        };
        // Moved, not cloned: a big file's hash list can be megabytes.
        let old = match prior.remove(&name) {
            Some(old) if old.manifest.size == size && old.mtime_ns == mtime_ns => {
                found.files.insert(name, old);
                continue;
            }
            old => old,
        };
        let path = dir.join(name.as_str());
        let Some(file) = index_file(name, path) else {
            found.set_changed |= old.is_some();
            found.cache_dirty |= old.is_some();
            continue;
        };
        found.hashed += 1;
        found.cache_dirty = true;
        found.set_changed |= old.is_none_or(|old| old.manifest.root != file.manifest.root);
        found.files.insert(file.name.clone(), file);
    }
    if !prior.is_empty() {
        debug!("{} shared files are gone", prior.len());
        found.set_changed = true;
        found.cache_dirty = true;
    }
    found
}

/// The name, size and mtime of a directory entry that should be shared, or
/// `None` for entries that are not: hidden names, non-regular files, and names
/// another peer could not ask for (warned about, since the user may wonder
/// why they are missing).
fn shareable(entry: &DirEntry) -> Option<(FileName, u64, i128)> {
    let os_name = entry.file_name();
    if os_name.as_bytes().starts_with(b".") {
        return None;
    }
    // file_type and metadata of a DirEntry do not follow symlinks.
    let meta = match entry.metadata() {
        Ok(meta) => meta,
        Err(err) => {
            warn!("cannot stat {}: {err}", entry.path().display());
            return None;
        }
    };
    if !meta.file_type().is_file() {
        debug!("not sharing {}: not a regular file", entry.path().display());
        return None;
    }
    let Some(text) = os_name.to_str() else {
        warn!("not sharing {:?}: its name is not UTF-8", entry.path());
        return None;
    };
    let name = match FileName::new(text) {
        Ok(name) => name,
        Err(err) => {
            warn!("not sharing {text:?}: {err}");
            return None;
        }
    };
    Some((name, meta.len(), mtime_ns(&meta)))
}

fn mtime_ns(meta: &fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

/// Hashes one file. Size and mtime come from the open file itself, so a swap
/// between the directory scan and the open cannot pair one file's stamp with
/// another's hashes.
fn index_file(name: FileName, path: PathBuf) -> Option<SharedFile> {
    let opened = OpenOptions::new()
        .read(true)
        // Never follow a symlink swapped in since the scan, nor block on a FIFO.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path);
    let result = opened.and_then(|file| {
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("no longer a regular file"));
        }
        let manifest = hash_file(&file, meta.len())?;
        Ok((manifest, mtime_ns(&meta)))
    });
    match result {
        Ok((manifest, mtime_ns)) => {
            debug!(
                "hashed {name}: {} bytes, root {}",
                manifest.size,
                manifest.root.short()
            );
            Some(SharedFile {
                name,
                path,
                manifest,
                mtime_ns,
            })
        }
        Err(err) => {
            warn!("not sharing {}: {err}", path.display());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::hash_chunk;
    use std::os::unix::fs::symlink;
    use std::time::{Duration, SystemTime};

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
        let folder = SharedFolder::open(dir).unwrap();
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
        let first = SharedFolder::open(dir).unwrap();
        assert_eq!(first.hashed_files(), 2);
        assert!(dir.join(".shoal/index.v1").is_file());
        // Every rewrite renames a new file in, so the inode tells whether it was.
        let cache_inode = || fs::metadata(dir.join(".shoal/index.v1")).unwrap().ino();
        let first_inode = cache_inode();

        let again = SharedFolder::open(dir).unwrap();
        assert_eq!(again.hashed_files(), 0);
        assert_eq!(again.summaries(), first.summaries());
        assert_eq!(cache_inode(), first_inode, "unchanged cache rewritten");

        set_mtime(&dir.join("two"), 100);
        let touched = SharedFolder::open(dir).unwrap();
        assert_eq!(touched.hashed_files(), 1);
        assert_ne!(cache_inode(), first_inode, "new mtime not recorded");
        assert_eq!(SharedFolder::open(dir).unwrap().hashed_files(), 0);
    }

    #[test]
    fn a_downloaded_file_is_shared_without_rehashing() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut folder = SharedFolder::open(dir).unwrap();
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
        assert_eq!(
            SharedFolder::open(dir).unwrap().hashed_files(),
            0,
            "cached too"
        );
    }

    #[test]
    fn corrupt_cache_is_ignored_and_rewritten() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join("one"), b"1").unwrap();
        let good = SharedFolder::open(dir).unwrap().summaries();
        let cache_path = dir.join(".shoal/index.v1");
        let bytes = fs::read(&cache_path).unwrap();
        for bad in [&bytes[..bytes.len() / 2], b"garbage", &[]] {
            fs::write(&cache_path, bad).unwrap();
            let folder = SharedFolder::open(dir).unwrap();
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
        let mut folder = SharedFolder::open(dir).unwrap();
        assert!(!folder.rescan().unwrap());
        assert_eq!(folder.hashed_files(), 0);

        fs::write(dir.join("new"), b"n").unwrap();
        assert!(folder.rescan().unwrap());
        assert_eq!(names(&folder), ["edit", "keep", "new"]);
        assert_eq!(folder.hashed_files(), 1);

        fs::remove_file(dir.join("new")).unwrap();
        assert!(folder.rescan().unwrap());
        assert_eq!(names(&folder), ["edit", "keep"]);

        let old_root = folder.by_name(&name("edit")).unwrap().manifest.root;
        fs::write(dir.join("edit"), b"after!").unwrap();
        set_mtime(&dir.join("edit"), 50);
        assert!(folder.rescan().unwrap());
        let new_root = folder.by_name(&name("edit")).unwrap().manifest.root;
        assert_ne!(new_root, old_root);
        assert!(folder.by_root(&old_root).is_none());

        // A bare touch rehashes but does not change the shared set.
        set_mtime(&dir.join("edit"), 10);
        assert!(!folder.rescan().unwrap());
        assert_eq!(folder.hashed_files(), 1);
        assert!(!folder.rescan().unwrap());
        assert_eq!(folder.hashed_files(), 0);
    }

    #[test]
    fn rescan_of_a_deleted_folder_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("shared");
        fs::create_dir(&dir).unwrap();
        let mut folder = SharedFolder::open(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(folder.rescan(), Err(StoreError::FolderMissing(_))));
    }
}
