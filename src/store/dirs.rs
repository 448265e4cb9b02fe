//! The shared folder's directory handles, and every file-system step on
//! shoal's own state taken relative to them.
//!
//! `DIR`, `DIR/.shoal` and `DIR/.shoal/partial` are each opened once, the
//! last two with `O_NOFOLLOW | O_DIRECTORY`; every later open, create,
//! rename and unlink names one plain component relative to one of these
//! handles, never a path. So no symlink planted in the folder (at `.shoal`,
//! at a partial file, at a temp file) can lead a write, a truncation or a read
//! outside the folder, and renaming the folder's parents cannot redirect us.
//! Files are opened with `O_NOFOLLOW` and checked to be regular; files we
//! create are created with `O_EXCL`, so a name that appeared in the meantime
//! fails the step instead of being followed.

use std::fs::{File, Metadata};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{AtFlags, CWD, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::pins::{MANAGERS_FILE, Pins};
use super::{META_DIR, PARTIAL_DIR, StoreError};

/// Handles on the shared folder and shoal's state folders in it. Cheap to
/// clone (the handles are shared), so a download keeps its own copy.
#[derive(Debug, Clone)]
pub struct FolderDirs(Rc<Handles>);

#[derive(Debug)]
struct Handles {
    path: PathBuf,
    root: OwnedFd,
    meta: OwnedFd,
    partial: OwnedFd,
}

impl FolderDirs {
    /// Opens `dir` and creates (or opens) `.shoal/` and `.shoal/partial/` in
    /// it. Refuses, with a message saying what to do, when either is not a
    /// real directory: a symlink there may point anywhere.
    pub fn open(dir: &Path) -> Result<FolderDirs, StoreError> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        // DIR itself is the user's choice, so a symlink to it is followed.
        let root = rustix::fs::openat(CWD, dir, flags, Mode::empty()).map_err(|err| match err {
            Errno::NOENT => StoreError::FolderMissing(dir.to_path_buf()),
            Errno::NOTDIR => StoreError::NotAFolder(dir.to_path_buf()),
            err => StoreError::io("open shared folder", dir, err.into()),
        })?;
        let meta_path = dir.join(META_DIR);
        let meta = open_state_dir(root.as_fd(), META_DIR, &meta_path)?;
        let partial_path = meta_path.join(PARTIAL_DIR);
        let partial = open_state_dir(meta.as_fd(), PARTIAL_DIR, &partial_path)?;
        Ok(FolderDirs(Rc::new(Handles {
            path: dir.to_path_buf(),
            root,
            meta,
            partial,
        })))
    }

    /// The folder as the user named it, for messages.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    pub(crate) fn root(&self) -> BorrowedFd<'_> {
        self.0.root.as_fd()
    }

    pub(crate) fn meta(&self) -> BorrowedFd<'_> {
        self.0.meta.as_fd()
    }

    pub(crate) fn partial(&self) -> BorrowedFd<'_> {
        self.0.partial.as_fd()
    }

    /// Bytes an unprivileged user can still write where downloads go, asked
    /// of the folder's handle (see [`free_space`]).
    pub fn free_space(&self) -> io::Result<u64> {
        let stats = rustix::fs::fstatvfs(self.partial())?;
        Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
    }

    /// This peer's 32-byte identity secret in `DIR/.shoal/identity`,
    /// created from `fresh` (mode 0600, never over an existing file) on
    /// first use.
    pub fn identity_secret(
        &self,
        fresh: impl FnOnce() -> io::Result<[u8; 32]>,
    ) -> Result<[u8; 32], StoreError> {
        let path = self.0.path.join(META_DIR).join(IDENTITY_FILE);
        let read = |path: &Path| -> Result<Option<[u8; 32]>, StoreError> {
            match read_state_file(self.meta(), IDENTITY_FILE) {
                Ok(None) => Ok(None),
                Ok(Some(bytes)) => <[u8; 32]>::try_from(bytes.as_slice())
                    .map(Some)
                    .map_err(|_| {
                        StoreError::io(
                            "read the identity (not 32 bytes; move it away to make a new one)",
                            path,
                            io::Error::from(io::ErrorKind::InvalidData),
                        )
                    }),
                Err(err) => Err(StoreError::io("read", path, err)),
            }
        };
        if let Some(secret) = read(&path)? {
            return Ok(secret);
        }
        let secret = fresh().map_err(|err| StoreError::io("make", &path, err))?;
        match create_new(self.meta(), IDENTITY_FILE, PRIVATE) {
            Ok(mut file) => {
                file.write_all(&secret)
                    .and_then(|()| file.sync_all())
                    .map_err(|err| StoreError::io("write", &path, err))?;
                sync(self.meta()).map_err(|err| StoreError::io("sync", &path, err))?;
                Ok(secret)
            }
            // Another process made it meanwhile: use that one.
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                read(&path)?.ok_or_else(|| {
                    StoreError::io("read", &path, io::Error::from(io::ErrorKind::NotFound))
                })
            }
            Err(err) => Err(StoreError::io("create", &path, err)),
        }
    }

    /// `DIR/.shoal/managers`, for messages.
    pub fn manager_pins_path(&self) -> PathBuf {
        self.0.path.join(META_DIR).join(MANAGERS_FILE)
    }

    /// The manager keys this folder has met (`.shoal/managers`; empty if
    /// there is none yet).
    pub fn manager_pins(&self) -> Result<Pins, StoreError> {
        match read_state_file(self.meta(), MANAGERS_FILE) {
            Ok(None) => Ok(Pins::parse("")),
            Ok(Some(bytes)) => Ok(Pins::parse(&String::from_utf8_lossy(&bytes))),
            Err(err) => Err(StoreError::io("read", &self.manager_pins_path(), err)),
        }
    }

    /// Replaces `.shoal/managers` (0600) with `pins`, atomically.
    pub fn save_manager_pins(&self, pins: &Pins) -> Result<(), StoreError> {
        replace_atomically(self.meta(), MANAGERS_FILE, pins.render().as_bytes())
            .map_err(|err| StoreError::io("write", &self.manager_pins_path(), err))
    }

    /// `DIR/.shoal/partial/name`, for messages.
    pub(crate) fn partial_path(&self, name: &str) -> PathBuf {
        self.0.path.join(META_DIR).join(PARTIAL_DIR).join(name)
    }
}

/// Creates `name` in `parent` if missing and opens it without following a
/// symlink.
fn open_state_dir(parent: BorrowedFd<'_>, name: &str, path: &Path) -> Result<OwnedFd, StoreError> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(err) => return Err(StoreError::io("create", path, err.into())),
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rustix::fs::openat(parent, name, flags, Mode::empty()).map_err(|err| match err {
        Errno::LOOP | Errno::NOTDIR => StoreError::StateNotADirectory(path.to_path_buf()),
        err => StoreError::io("open", path, err.into()),
    })
}

/// What identifies the exact file that was indexed: which inode on which
/// device, at which size and modification time. A file opened later for
/// serving must match it, or it is not the file whose hashes we announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    /// Nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Status change time, which no user can set: any write, `utimes`,
    /// rename or new file moves it, so a file rewritten with its old size
    /// and mtime (or a new file that got a freed inode's number) still shows.
    pub ctime_ns: i128,
}

impl FileStamp {
    pub fn of(meta: &Metadata) -> FileStamp {
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            ctime_ns: i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        }
    }

    /// Whether the file seen now with stamp `now` is, to the file system,
    /// the file hashed under `self`. The device is left out: a remount may
    /// renumber it (serving still compares all of it).
    pub fn unchanged(&self, now: &FileStamp) -> bool {
        self.same_contents(now) && self.ctime_ns == now.ctime_ns
    }

    /// Whether a file with stamp `now` still has the contents hashed under
    /// `self`, as far as the file system can tell without reading it, on the
    /// fields the hash cache keeps. The device is left out: some file systems
    /// renumber it across reboots, which must not make a restart rehash
    /// everything; so is the ctime, which a backup restore or a `chmod`
    /// moves.
    pub fn same_contents(&self, now: &FileStamp) -> bool {
        self.ino == now.ino && self.size == now.size && self.mtime_ns == now.mtime_ns
    }
}

/// Opens the regular file `name` in `dir` for reading, without following a
/// symlink or blocking on a FIFO, and returns it with its metadata.
pub(crate) fn open_regular(dir: BorrowedFd<'_>, name: &str) -> io::Result<(File, Metadata)> {
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(nofollow)?);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((file, meta))
}

/// ELOOP from `O_NOFOLLOW` reads as "too many levels of symbolic links";
/// say what it means here.
fn nofollow(err: Errno) -> io::Error {
    if err == Errno::LOOP {
        io::Error::other("is a symlink, which shoal never follows")
    } else {
        err.into()
    }
}

/// The contents of regular file `name` in `dir`, or `None` if there is none.
pub(crate) fn read_state_file(dir: BorrowedFd<'_>, name: &str) -> io::Result<Option<Vec<u8>>> {
    let (mut file, meta) = match open_regular(dir, name) {
        Ok(opened) => opened,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let mut bytes = Vec::with_capacity(meta.len().min(1 << 20) as usize);
    file.read_to_end(&mut bytes)?;
    Ok(Some(bytes))
}

/// Creates `name` in `dir` for reading and writing, with `mode` (less the
/// umask); fails if anything (a file, a symlink) is already there.
pub(crate) fn create_new(dir: BorrowedFd<'_>, name: &str, mode: u32) -> io::Result<File> {
    let flags = OFlags::RDWR | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(mode as rustix::fs::RawMode);
    Ok(File::from(rustix::fs::openat(dir, name, flags, mode)?))
}

/// This peer's identity secret, in `.shoal/`.
const IDENTITY_FILE: &str = "identity";

/// Mode for shoal's private state files.
pub(crate) const PRIVATE: u32 = 0o600;
/// Mode for a download, which becomes the user's file: as any new file.
pub(crate) const USER_FILE: u32 = 0o666;

/// Opens our own existing file `name` in `dir` for reading and writing:
/// never through a symlink, and only a regular file with no other name (a
/// hard link planted there would make us write someone else's inode).
pub(crate) fn open_own(dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
    let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let file = File::from(rustix::fs::openat(dir, name, flags, Mode::empty()).map_err(nofollow)?);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(io::Error::other("has other hard links"));
    }
    Ok(file)
}

/// Replaces `name` in `dir` with `bytes` so that after a crash it holds
/// either the old or the new contents, never a mix: write `name.tmp`
/// (created fresh, so nothing planted there is followed), fsync it, rename it
/// over, fsync the directory.
pub(crate) fn replace_atomically(dir: BorrowedFd<'_>, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}.tmp");
    // A leftover of a crash, or something planted: unlinking a symlink
    // removes the link, never its target.
    remove_if_present(dir, &tmp)?;
    let mut file = create_new(dir, &tmp, PRIVATE)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| file.sync_all())
        .and_then(|()| Ok(rustix::fs::renameat(dir, &tmp, dir, name)?));
    if written.is_err() {
        let _ = remove_if_present(dir, &tmp);
    }
    written?;
    sync(dir)
}

/// Removes `name` from `dir` (the name itself, even if it is a symlink).
pub(crate) fn remove_if_present(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    match rustix::fs::unlinkat(dir, name, AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// The names in `dir` (read through the handle, so no path is resolved).
pub(crate) fn list_names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        // A name that is not UTF-8 is none of ours.
        if let Ok(name) = entry.file_name().to_str()
            && name != "."
            && name != ".."
        {
            names.push(name.to_string());
        }
    }
    Ok(names)
}

/// Size and last modification of `name` in `dir` if it is a regular file
/// (a symlink is not followed, so it reads as absent).
pub(crate) fn regular_stat(
    dir: BorrowedFd<'_>,
    name: &str,
) -> io::Result<Option<(u64, std::time::SystemTime)>> {
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Ok(None);
    }
    let secs = u64::try_from(st.st_mtime).unwrap_or(0);
    let nanos = u32::try_from(st.st_mtime_nsec)
        .unwrap_or(0)
        .min(999_999_999);
    let modified = std::time::UNIX_EPOCH + std::time::Duration::new(secs, nanos);
    Ok(Some((u64::try_from(st.st_size).unwrap_or(0), modified)))
}

/// Makes renames and creations inside `dir` durable.
pub(crate) fn sync(dir: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::fsync(dir)?)
}

/// Renames `from` in `from_dir` to `to` in `to_dir`, failing with
/// `AlreadyExists` instead of replacing anything at `to`. Uses
/// `renameat2(RENAME_NOREPLACE)`, which is atomic; where the kernel or file
/// system lacks it, a hard link (which also refuses to replace) and an
/// unlink; where links are missing too, a check then a rename.
pub(crate) fn rename_noreplace(
    from_dir: BorrowedFd<'_>,
    from: &str,
    to_dir: BorrowedFd<'_>,
    to: &str,
) -> io::Result<()> {
    match rustix::fs::renameat_with(from_dir, from, to_dir, to, RenameFlags::NOREPLACE) {
        Err(err) if is_unsupported(err) => {}
        other => return Ok(other?),
    }
    match rustix::fs::linkat(from_dir, from, to_dir, to, AtFlags::empty()) {
        Ok(()) => return Ok(rustix::fs::unlinkat(from_dir, from, AtFlags::empty())?),
        Err(Errno::EXIST) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(err) if is_unsupported(err) || err == Errno::PERM => {}
        Err(err) => return Err(err.into()),
    }
    // Last resort: racy, but only against another writer of the same name.
    match rustix::fs::statat(to_dir, to, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(_) => return Err(io::Error::from(io::ErrorKind::AlreadyExists)),
        Err(Errno::NOENT) => {}
        Err(err) => return Err(err.into()),
    }
    Ok(rustix::fs::renameat(from_dir, from, to_dir, to)?)
}

fn is_unsupported(err: Errno) -> bool {
    matches!(err, Errno::NOSYS | Errno::INVAL | Errno::NOTSUP)
}

/// Bytes an unprivileged user can still write on the filesystem holding
/// `dir`, so a download that cannot fit is refused up front with a clear
/// "disk full" message instead of failing halfway.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let stats = rustix::fs::statvfs(dir)?;
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    #[test]
    fn a_symlinked_or_plain_state_dir_is_refused_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("outside"));
        fs::create_dir_all(&dir).unwrap();
        fs::create_dir_all(&outside).unwrap();
        symlink(&outside, dir.join(".shoal")).unwrap();
        let err = FolderDirs::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::StateNotADirectory(_)), "{err}");
        assert!(err.to_string().contains("not a real directory"), "{err}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        fs::remove_file(dir.join(".shoal")).unwrap();
        fs::write(dir.join(".shoal"), b"x").unwrap();
        let err = FolderDirs::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::StateNotADirectory(_)), "{err}");

        fs::remove_file(dir.join(".shoal")).unwrap();
        fs::create_dir(dir.join(".shoal")).unwrap();
        symlink(&outside, dir.join(".shoal/partial")).unwrap();
        let err = FolderDirs::open(&dir).unwrap_err();
        assert!(matches!(err, StoreError::StateNotADirectory(ref p) if p.ends_with("partial")));
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn replace_atomically_replaces_and_never_writes_through_a_planted_tmp() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = FolderDirs::open(tmp.path()).unwrap();
        let target = tmp.path().join("victim");
        fs::write(&target, b"precious").unwrap();
        symlink(&target, tmp.path().join(".shoal/state.tmp")).unwrap();
        replace_atomically(dirs.meta(), "state", b"one").unwrap();
        replace_atomically(dirs.meta(), "state", b"two").unwrap();
        assert_eq!(fs::read(tmp.path().join(".shoal/state")).unwrap(), b"two");
        assert!(!tmp.path().join(".shoal/state.tmp").exists());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        // A symlink at the name itself is replaced, not written through.
        fs::remove_file(tmp.path().join(".shoal/state")).unwrap();
        symlink(&target, tmp.path().join(".shoal/state")).unwrap();
        replace_atomically(dirs.meta(), "state", b"three").unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"precious");
        assert!(
            fs::symlink_metadata(tmp.path().join(".shoal/state"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn state_files_are_never_read_or_opened_through_links() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = FolderDirs::open(tmp.path()).unwrap();
        let target = tmp.path().join("victim");
        fs::write(&target, b"precious").unwrap();
        symlink(&target, tmp.path().join(".shoal/link")).unwrap();
        fs::hard_link(&target, tmp.path().join(".shoal/hard")).unwrap();
        assert!(read_state_file(dirs.meta(), "link").is_err());
        assert_eq!(read_state_file(dirs.meta(), "missing").unwrap(), None);
        let err = open_own(dirs.meta(), "link").unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let err = open_own(dirs.meta(), "hard").unwrap_err();
        assert!(err.to_string().contains("hard links"), "{err}");
        assert!(create_new(dirs.meta(), "link", PRIVATE).is_err());
        assert_eq!(fs::read(&target).unwrap(), b"precious");
    }

    #[test]
    fn rename_noreplace_never_clobbers() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = FolderDirs::open(tmp.path()).unwrap();
        fs::write(tmp.path().join("a"), b"new").unwrap();
        fs::write(tmp.path().join("b"), b"mine").unwrap();
        let err = rename_noreplace(dirs.root(), "a", dirs.root(), "b").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(tmp.path().join("b")).unwrap(), b"mine");
        // Nor a dangling symlink's target.
        fs::remove_file(tmp.path().join("b")).unwrap();
        symlink(tmp.path().join("nowhere"), tmp.path().join("b")).unwrap();
        let err = rename_noreplace(dirs.root(), "a", dirs.root(), "b").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!tmp.path().join("nowhere").exists());
        fs::remove_file(tmp.path().join("b")).unwrap();
        rename_noreplace(dirs.root(), "a", dirs.root(), "b").unwrap();
        assert_eq!(fs::read(tmp.path().join("b")).unwrap(), b"new");
        assert!(!tmp.path().join("a").exists());
    }

    #[test]
    fn free_space_reports_something_and_errors_on_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        assert!(FolderDirs::open(dir.path()).unwrap().free_space().unwrap() > 0);
        assert!(free_space(&dir.path().join("nope")).is_err());
    }
}
