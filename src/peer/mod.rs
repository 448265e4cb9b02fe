//! The peer: pure cores (manager link, serving, download scheduler) and the
//! event loop that drives them.

pub mod commands;
pub mod download;
pub mod fair;
mod files;
pub mod link;
pub mod node;
pub mod output;
mod progress;
pub mod query;
pub mod ratelimit;
pub mod scheduler;
pub mod serve;

use std::path::Path;

use crate::net::noise::Identity;
use crate::store::FolderDirs;

/// This peer's identity, kept in `DIR/.shoal/identity` (made on first use).
pub fn identity(dir: &Path) -> Result<Identity, String> {
    let dirs = FolderDirs::open(dir).map_err(|e| e.to_string())?;
    let secret = dirs
        .identity_secret(|| Identity::generate().map(|id| *id.private_bytes()))
        .map_err(|e| e.to_string())?;
    Identity::from_private(secret)
        .map_err(|e| format!("cannot use the identity in {}: {e}", dir.display()))
}
