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

/// Trust on first use for the manager's static key: `proven` is the key
/// the manager at `addr` proved in its handshake. With a folder (`dirs`),
/// the first key met at an address is recorded in `DIR/.shoal/managers`
/// and any later other key is refused; `explicit` (`--manager-key`) pins
/// a key outright (and is recorded). The error says what changed and how
/// to accept a new manager key.
pub fn check_manager_key(
    dirs: Option<&FolderDirs>,
    addr: std::net::SocketAddr,
    proven: crate::wire::PeerKey,
    explicit: Option<crate::wire::PeerKey>,
) -> Result<(), String> {
    use crate::store::pins::{Verdict, check};
    let pins = match dirs {
        Some(d) => Some(d.manager_pins().map_err(|e| e.to_string())?),
        None => None,
    };
    let pinned = pins.as_ref().and_then(|p| p.get(addr));
    match check(proven, pinned, explicit) {
        Verdict::Known => Ok(()),
        Verdict::Pin => {
            if let (Some(d), Some(mut pins)) = (dirs, pins) {
                pins.set(addr, proven);
                // Not recording it (say another process of this folder is
                // writing the file now) only means it is pinned later.
                match d.save_manager_pins(&pins) {
                    Ok(()) => log::info!(
                        "the manager at {addr} has the key {proven}; recorded in {}",
                        d.manager_pins_path().display()
                    ),
                    Err(e) => log::warn!("the manager's key is not recorded: {e}"),
                }
            }
            Ok(())
        }
        Verdict::Changed {
            expected,
            explicit: true,
        } => Err(format!(
            "the manager at {addr} proved the key {proven}, not the one given with --manager-key ({expected}): refusing it"
        )),
        Verdict::Changed { expected, .. } => {
            let path = dirs.map_or_else(
                || ".shoal/managers".to_string(),
                |d| d.manager_pins_path().display().to_string(),
            );
            Err(format!(
                "the manager at {addr} proved the key {proven}, but this folder met the key {expected} there before ({path}): \
                 it may be an impostor, or the manager was given a new identity. \
                 If you trust the new key, delete the line for {addr} in {path} or pass --manager-key {proven}"
            ))
        }
    }
}
