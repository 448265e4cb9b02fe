//! Small file-system steps that must survive a crash or must not clobber a
//! user's file: atomic replace, no-replace rename, directory sync, free space.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes` so that after a crash it holds either the old
/// or the new contents, never a mix: write a sibling `.tmp`, fsync it, rename
/// it over, fsync the directory.
pub(crate) fn replace_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = tmp_path(path);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// `name.ext` -> `name.ext.tmp`, beside the original so the rename stays on
/// one filesystem.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Makes renames and creations inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Renames `from` to `to`, failing with `AlreadyExists` instead of replacing
/// a file at `to`. Uses `renameat2(RENAME_NOREPLACE)`, which is atomic; where
/// the kernel or filesystem lacks it, a hard link (which also refuses to
/// replace) and an unlink; where links are missing too, a check then rename.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    match renameat2_noreplace(from, to) {
        Err(err) if is_unsupported(&err) => {}
        other => return other,
    }
    match fs::hard_link(from, to) {
        Ok(()) => return fs::remove_file(from),
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => return Err(err),
        Err(err) if is_unsupported(&err) || err.raw_os_error() == Some(libc::EPERM) => {}
        Err(err) => return Err(err),
    }
    // Last resort: racy, but only against another writer of the same name.
    if fs::symlink_metadata(to).is_ok() {
        return Err(io::Error::from(io::ErrorKind::AlreadyExists));
    }
    fs::rename(from, to)
}

fn is_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP)
    )
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn renameat2_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE as _,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn renameat2_noreplace(_from: &Path, _to: &Path) -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Bytes an unprivileged user can still write on the filesystem holding
/// `dir`, so a download that cannot fit is refused up front with a clear
/// "disk full" message instead of failing halfway.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let path = c_path(dir)?;
    // SAFETY: statvfs is plain data, so all-zero is a valid value.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `stats` is a valid, writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stats) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::useless_conversion)] // the field widths differ between platforms
    let (blocks, block_size) = (u64::from(stats.f_bavail), u64::from(stats.f_frsize));
    Ok(blocks.saturating_mul(block_size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_atomically_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        replace_atomically(&path, b"one").unwrap();
        replace_atomically(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!dir.path().join("state.tmp").exists());
    }

    #[test]
    fn rename_noreplace_never_clobbers() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&from, b"new").unwrap();
        fs::write(&to, b"mine").unwrap();
        let err = rename_noreplace(&from, &to).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&to).unwrap(), b"mine");
        fs::remove_file(&to).unwrap();
        rename_noreplace(&from, &to).unwrap();
        assert_eq!(fs::read(&to).unwrap(), b"new");
        assert!(!from.exists());
    }

    #[test]
    fn free_space_reports_something_and_errors_on_missing_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        assert!(free_space(&dir.path().join("nope")).is_err());
    }
}
