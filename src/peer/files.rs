//! Open file handles for serving, kept across requests: opening the file
//! once per chunk would cost two syscalls per chunk for nothing. Handles are
//! reference-counted because a chunk being sent from a file keeps it open.
//!
//! A handle is only ever the file that was hashed: it is opened through
//! [`SharedFolder::open_shared`] (relative to the folder, no symlink, same
//! inode, size and mtime as indexed) and checked again with one `fstat` each
//! time it is used, so a file edited in place is not served either.

use std::fs::File;
use std::io;
use std::rc::Rc;

use super::serve::Catalog;
use crate::store::{Manifest, SharedFile, SharedFolder};
use crate::wire::{FileName, Hash};

pub struct OpenFiles {
    capacity: usize,
    /// Most recently used last. Shared with chunk sends still in progress.
    files: Vec<(Hash, Rc<File>)>,
}

impl OpenFiles {
    pub fn new(capacity: usize) -> OpenFiles {
        OpenFiles {
            capacity: capacity.max(1),
            files: Vec::new(),
        }
    }

    /// The open handle for `shared`, opening it if needed. A kept handle that
    /// is no longer that file (another name now holds the root, or the file
    /// was edited) is dropped and the file opened afresh; that fails, with an
    /// error saying why for the log, when the file on disk is no longer the
    /// one indexed.
    pub fn get(&mut self, store: &SharedFolder, shared: &SharedFile) -> io::Result<Rc<File>> {
        let root = &shared.manifest.root;
        if let Some(pos) = self.files.iter().position(|(r, _)| r == root) {
            let entry = self.files.remove(pos);
            if shared.check(&entry.1).is_ok() {
                let handle = entry.1.clone();
                self.files.push(entry);
                return Ok(handle);
            }
        }
        if self.files.len() >= self.capacity {
            self.files.remove(0);
        }
        self.files
            .push((*root, Rc::new(store.open_shared(shared)?)));
        // The entry was pushed just above.
        Ok(self.files.last().expect("entry just pushed").1.clone())
    }

    /// Forget every handle (the folder changed: a path may now be another file).
    pub fn clear(&mut self) {
        self.files.clear();
    }
}

impl Catalog for SharedFolder {
    fn find_by_name(&self, name: &FileName) -> Option<&Manifest> {
        self.by_name(name).map(|f| &f.manifest)
    }

    fn find_by_root(&self, root: &Hash) -> Option<&Manifest> {
        self.by_root(root).map(|f| &f.manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn handles_are_kept_and_refused_once_the_file_is_not_the_indexed_one() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join("a"), b"aaaa").unwrap();
        fs::write(tmp.path().join("b"), b"bbbb").unwrap();
        let mut folder = SharedFolder::open(tmp.path()).unwrap();
        folder.finish_pending_work();
        let a = folder
            .by_name(&FileName::new("a").unwrap())
            .unwrap()
            .clone();
        let b = folder
            .by_name(&FileName::new("b").unwrap())
            .unwrap()
            .clone();
        let mut open = OpenFiles::new(1);
        let first = open.get(&folder, &a).unwrap();
        assert!(Rc::ptr_eq(&first, &open.get(&folder, &a).unwrap()), "kept");
        open.get(&folder, &b).unwrap();
        assert!(
            !Rc::ptr_eq(&first, &open.get(&folder, &a).unwrap()),
            "evicted"
        );

        // Edited in place: the kept handle is refused, and so is a new one.
        fs::write(tmp.path().join("a"), b"AAAA").unwrap();
        let err = open.get(&folder, &a).unwrap_err();
        assert!(err.to_string().contains("since it was indexed"), "{err}");
        // Gone: refused with the name in the message.
        fs::remove_file(tmp.path().join("b")).unwrap();
        let err = open.get(&folder, &b).unwrap_err();
        assert!(err.to_string().starts_with("b: "), "{err}");
    }
}
