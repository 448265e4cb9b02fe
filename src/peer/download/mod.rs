//! One download as a pure state machine ([`Download`]): ask the manager who
//! holds the file, pick the version, connect to holders, fetch and check the
//! manifest, then let the [`Scheduler`](super::scheduler::Scheduler) decide
//! which chunk to ask of whom, verifying every chunk's hash on arrival. It
//! takes decoded messages, holder lists, disk results and `now`, and hands
//! back [`Action`]s (connect, send, close, ask the manager, open the partial
//! file, store a chunk, finish) and its next deadline; it touches no socket,
//! clock or file. The peer's event loop (`node/downloads.rs`) carries the
//! actions out. States and invariants: docs/state/download.md.

mod core;
mod outcome;

#[cfg(test)]
mod tests;

pub use self::core::{Action, Download, DownloadConfig, Phase, Status, StoreChunk};
pub use outcome::{DownloadError, DownloadOutcome, DownloadSummary};

use crate::wire::{FileName, Hash};

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GetRequest {
    pub name: FileName,
    /// Only this version (root hash), if given.
    pub hash: Option<Hash>,
}
