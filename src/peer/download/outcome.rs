//! How a download ends, as values: the binary maps them to messages and
//! exit codes in one place.

use std::fmt;
use std::path::PathBuf;

use crate::wire::{FileName, Hash};

/// A finished download, for the summary line and `--json`.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadSummary {
    pub name: FileName,
    pub size: u64,
    pub root: Hash,
    /// Bytes fetched in this run (less than `size` after a resume).
    pub fetched_bytes: u64,
    /// From the first request to the last verified chunk.
    pub seconds: f64,
    /// Peers that sent at least one verified chunk.
    pub sources: usize,
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DownloadOutcome {
    Done(DownloadSummary),
    /// Nothing to do: the same content is already in the folder.
    AlreadyHave {
        name: FileName,
    },
    Failed(DownloadError),
}

/// Why a download failed; each message says what to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DownloadError {
    /// No live peer shares a file of that name.
    NotOnNetwork { name: FileName },
    /// `--hash` named a version nobody has.
    NoSuchVersion {
        name: FileName,
        wanted: Hash,
        available: Vec<Hash>,
    },
    /// Holders are listed but none could be reached, for this long.
    Unreachable { name: FileName, secs: u64 },
    /// Every holder replaced the version being fetched with another.
    VersionGone {
        name: FileName,
        root: Hash,
        now: Vec<Hash>,
    },
    /// A different file of that name is already in the folder.
    Clash {
        name: FileName,
        local: Hash,
        wanted: Hash,
    },
    /// Not enough free space for the rest of the file.
    DiskFull {
        name: FileName,
        need: u64,
        free: u64,
    },
    /// Writing the partial file or moving it into the folder failed.
    Disk { name: FileName, error: String },
}

impl fmt::Display for DownloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DownloadError::NotOnNetwork { name } => write!(
                f,
                "{name} is not on the network: no live peer shares it (try `files`)"
            ),
            DownloadError::NoSuchVersion {
                name,
                wanted,
                available,
            } => write!(
                f,
                "no peer holds {name} with hash {}; versions on the network: {}",
                wanted.short(),
                short_list(available)
            ),
            DownloadError::Unreachable { name, secs } => write!(
                f,
                "no holder of {name} was reachable for {secs}s (every holder failed, refused or left); the verified part is kept, run get again later"
            ),
            DownloadError::VersionGone { name, root, now } => write!(
                f,
                "{name} changed on the network while downloading: no peer holds version {} any more (now: {}); run get again to fetch the new version",
                root.short(),
                short_list(now)
            ),
            DownloadError::Clash {
                name,
                local,
                wanted,
            } => write!(
                f,
                "the folder already holds a different {name} (hash {}, wanted {}); move or rename it first, it is never overwritten",
                local.short(),
                wanted.short()
            ),
            DownloadError::DiskFull { name, need, free } => write!(
                f,
                "disk full: {name} needs {need} more bytes but only {free} are free; free some space and run get again (verified chunks are kept)"
            ),
            DownloadError::Disk { name, error } => {
                write!(f, "cannot store {name}: {error}")
            }
        }
    }
}

impl std::error::Error for DownloadError {}

fn short_list(roots: &[Hash]) -> String {
    if roots.is_empty() {
        return "none".into();
    }
    roots
        .iter()
        .map(|r| r.short())
        .collect::<Vec<_>>()
        .join(", ")
}
