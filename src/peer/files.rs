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

    /// The open handle for `shared`, opening it if needed. Fails, and forgets
    /// the handle, when the file on disk is no longer the one indexed; the
    /// error says why, for the log.
    pub fn get(&mut self, store: &SharedFolder, shared: &SharedFile) -> io::Result<Rc<File>> {
        let root = &shared.manifest.root;
        if let Some(pos) = self.files.iter().position(|(r, _)| r == root) {
            let entry = self.files.remove(pos);
            shared.check(&entry.1)?;
            self.files.push(entry);
        } else {
            if self.files.len() >= self.capacity {
                self.files.remove(0);
            }
            self.files
                .push((*root, Rc::new(store.open_shared(shared)?)));
        }
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
