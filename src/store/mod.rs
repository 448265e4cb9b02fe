//! The shared folder: file index with hash cache, chunk hashing, partial downloads.
//!
//! - `manifest`: how a file is cut into chunks and named by one root hash.
//! - `index`: the folder a peer shares, with a hash cache so a restart does
//!   not rehash unchanged files.
//! - `partial`: resumable downloads under `DIR/.shoal/partial/`, whose
//!   progress survives a crash without ever trusting an unverified chunk.
//!
//! This is the only module that touches the disk for file contents; it does
//! blocking I/O and is called from the event loop between polls.

mod cache;
mod dirs;
mod index;
mod manifest;
mod partial;
pub mod pins;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

pub use dirs::{FileStamp, FolderDirs, free_space};
pub use index::{SharedFile, SharedFolder};
pub use manifest::{
    FileHasher, Manifest, ManifestError, chunk_size_for, hash_chunk, hash_file, root_hash,
};
pub use partial::{PartialFile, PartialInfo, list_partials, remove_partial, sweep_stale_partials};

/// Folder inside a shared folder where shoal keeps its own state; its leading
/// dot keeps it (and every other hidden name) out of the shared set.
const META_DIR: &str = ".shoal";

/// Inside `META_DIR`: downloads in progress.
const PARTIAL_DIR: &str = "partial";

/// Where downloads in progress live, inside the shared folder so the final
/// rename stays on one filesystem and is atomic.
pub fn partial_dir(folder_dir: &Path) -> PathBuf {
    folder_dir.join(META_DIR).join(PARTIAL_DIR)
}

/// What can go wrong with the shared folder or a download's files. Every
/// message says what the user can do about it.
#[derive(Debug)]
pub enum StoreError {
    /// The folder to share is not there.
    FolderMissing(PathBuf),
    /// The path to share names something that is not a folder.
    NotAFolder(PathBuf),
    /// `DIR/.shoal` (or `partial/` in it) is a symlink or a file: shoal keeps
    /// its state only in a real directory, so nothing is written elsewhere.
    StateNotADirectory(PathBuf),
    /// A download cannot be finished while chunks are missing.
    Incomplete { missing: u32 },
    /// Finishing a download would replace a file the user already has.
    AlreadyExists(PathBuf),
    /// The operating system refused `action` on `path`.
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl StoreError {
    /// Wraps an I/O error with the path and the step that failed, so the
    /// message points at the file to fix.
    pub fn io(action: &'static str, path: &Path, source: io::Error) -> StoreError {
        StoreError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Paths are escaped: they end in names from the network or the folder.
impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::FolderMissing(path) => write!(
                f,
                "shared folder {} does not exist: create it or pass --dir",
                crate::text::escape_path(path)
            ),
            StoreError::NotAFolder(path) => write!(
                f,
                "{} is not a directory: pass the folder to share with --dir",
                crate::text::escape_path(path)
            ),
            StoreError::StateNotADirectory(path) => write!(
                f,
                "{} is not a real directory (a symlink or a file): shoal keeps its state \
                 only in a directory of its own; remove it and start again",
                path.display()
            ),
            StoreError::Incomplete { missing } => write!(
                f,
                "download is not complete ({missing} chunks missing): keep downloading"
            ),
            StoreError::AlreadyExists(path) => write!(
                f,
                "{} already exists and was left untouched: move it away and download \
                 again to finish (the downloaded data is kept)",
                crate::text::escape_path(path)
            ),
            StoreError::Io {
                action,
                path,
                source,
            } => write!(
                f,
                "cannot {action} {}: {source}",
                crate::text::escape_path(path)
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_say_what_to_do() {
        let missing = StoreError::FolderMissing(PathBuf::from("peer9"));
        assert_eq!(
            missing.to_string(),
            "shared folder peer9 does not exist: create it or pass --dir"
        );
        let io = StoreError::io(
            "create",
            Path::new("/x/.shoal"),
            io::Error::from(io::ErrorKind::PermissionDenied),
        );
        assert!(io.to_string().starts_with("cannot create /x/.shoal: "));
        assert!(std::error::Error::source(&io).is_some());
        assert_eq!(
            partial_dir(Path::new("/d")),
            PathBuf::from("/d/.shoal/partial")
        );
    }
}
