//! `manager --allow FILE` and `peer --allow FILE`: the public keys of the
//! peers admitted to a network of known machines (by the manager, to
//! register or ask; by a peer, to fetch from it). One key per line (the form
//! `peer --show-id` prints), optionally followed by a note; `#` starts a
//! comment. The file is reread when it changes (checked as each sealed
//! handshake completes and every [`CHECK_EVERY`]; the manager also on
//! SIGHUP); a file that stops parsing keeps the last good list. After a reread the owner closes the
//! connections whose key is no longer listed.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::wire::PeerKey;

/// How often the owner looks at the file's stamp for a change.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct AllowList {
    path: PathBuf,
    keys: HashSet<PeerKey>,
    /// (inode, size, mtime ns) of the file as last read.
    stamp: Option<(u64, u64, i128)>,
}

/// Parses an allow file's text; the error names the first bad line.
pub fn parse(text: &str) -> Result<HashSet<PeerKey>, String> {
    let mut keys = HashSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(word) = line.split_whitespace().next() else {
            continue;
        };
        let key = PeerKey::from_text(word).ok_or_else(|| {
            format!(
                "line {}: {word:?} is not a peer key (52 letters, as `peer --show-id` prints)",
                n + 1
            )
        })?;
        keys.insert(key);
    }
    Ok(keys)
}

fn stamp(path: &Path) -> Option<(u64, u64, i128)> {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.ino(),
        m.size(),
        i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    ))
}

impl AllowList {
    /// Reads the list at start-up; an unreadable or bad file is an error.
    pub fn load(path: &Path) -> Result<AllowList, String> {
        let stamp = stamp(path);
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read allow file {}: {e}", path.display()))?;
        let keys = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        log::info!("allow list {}: {} keys", path.display(), keys.len());
        Ok(AllowList {
            path: path.to_path_buf(),
            keys,
            stamp,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rereads the file; on failure the last good list stays (logged).
    /// True when a new list was read (the caller then drops whoever it no
    /// longer admits).
    pub fn reload(&mut self) -> bool {
        match AllowList::load(&self.path) {
            Ok(fresh) => {
                *self = fresh;
                true
            }
            Err(e) => {
                log::warn!("{e}; keeping the previous allow list");
                // Not read again until it changes once more.
                self.stamp = stamp(&self.path);
                false
            }
        }
    }

    /// Rereads the file if it changed since it was last read; true when a
    /// new list was read.
    pub fn refresh(&mut self) -> bool {
        stamp(&self.path) != self.stamp && self.reload()
    }

    /// Whether `key` is in the list as last read.
    pub fn contains(&self, key: &PeerKey) -> bool {
        self.keys.contains(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_comments_and_notes_parse_and_a_bad_line_is_named() {
        let a = PeerKey([1; 32]);
        let b = PeerKey([2; 32]);
        let text = format!("# office\n{a}  laptop\n\n   {b} # the server\n");
        let keys = parse(&text).unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&a) && keys.contains(&b));
        let err = parse(&format!("{a}\nnot-a-key\n")).unwrap_err();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn a_changed_file_is_reread_and_a_broken_one_keeps_the_old_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("allow");
        let (a, b) = (PeerKey([1; 32]), PeerKey([2; 32]));
        std::fs::write(&path, format!("{a}\n")).unwrap();
        let mut list = AllowList::load(&path).unwrap();
        assert!(!list.refresh(), "unchanged");
        assert!(list.contains(&a) && !list.contains(&b));
        std::fs::write(&path, format!("{a}\n{b}\n")).unwrap();
        assert!(list.refresh());
        assert!(list.contains(&b));
        std::fs::write(&path, "garbage that is longer than before\n").unwrap();
        assert!(!list.refresh(), "a broken file is no new list");
        assert!(list.contains(&b), "a broken file keeps the last good list");
        assert!(!list.refresh(), "and is not reread until it changes");
        std::fs::write(&path, format!("{b}\n")).unwrap();
        assert!(list.refresh());
        assert!(!list.contains(&a), "a removed key is gone");
    }
}
