//! The manager's file index: who holds which version of which name, kept so
//! that every answer costs O(its size), never O(network).
//!
//! A version is a (root, size) pair: the root commits to the size, so honest
//! holders never split, and a liar claiming someone else's root with another
//! size gets a group of its own instead of poisoning the honest one. Each
//! registration holds at most one version per name (the registry refuses a
//! share that lists two), so a version's holder set is its vote count.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use crate::wire::{
    FileCursor, FileName, Hash, HolderGroup, MAX_HOLDER_GROUPS, MAX_HOLDERS_PER_GROUP, NetworkFile,
    PeerEntry, PeerId,
};

/// One version of a name: (root, size).
type Version = (Hash, u64);

#[derive(Debug, Default)]
struct NameEntry {
    /// Every version of the name with its holders (one vote each).
    versions: BTreeMap<Version, BTreeSet<PeerId>>,
    /// The same versions ordered by votes, most first, so the top groups of
    /// a `WhoHas` are read off the front.
    by_votes: BTreeSet<(Reverse<usize>, Version)>,
}

/// Every (name, version) shared by a live registration.
#[derive(Debug, Default)]
pub struct FileIndex {
    names: BTreeMap<FileName, NameEntry>,
    /// (name, version) pairs held by at least one registration.
    entries: usize,
}

impl FileIndex {
    /// Counts `peer` as a holder of (`name`, `root`, `size`). A peer already
    /// counted is not counted twice.
    pub fn add(&mut self, peer: PeerId, name: &FileName, root: Hash, size: u64) {
        let entry = match self.names.get_mut(name) {
            Some(e) => e,
            None => self.names.entry(name.clone()).or_default(),
        };
        let holders = entry.versions.entry((root, size)).or_default();
        let before = holders.len();
        if !holders.insert(peer) {
            return;
        }
        if before == 0 {
            self.entries += 1;
        } else {
            entry.by_votes.remove(&(Reverse(before), (root, size)));
        }
        entry.by_votes.insert((Reverse(before + 1), (root, size)));
    }

    /// Undoes [`FileIndex::add`]; a name or version left with no holder is
    /// forgotten.
    pub fn remove(&mut self, peer: PeerId, name: &FileName, root: Hash, size: u64) {
        let Some(entry) = self.names.get_mut(name) else {
            return;
        };
        let Some(holders) = entry.versions.get_mut(&(root, size)) else {
            return;
        };
        let before = holders.len();
        if !holders.remove(&peer) {
            return;
        }
        entry.by_votes.remove(&(Reverse(before), (root, size)));
        if before == 1 {
            entry.versions.remove(&(root, size));
            self.entries -= 1;
            if entry.versions.is_empty() {
                self.names.remove(name);
            }
        } else {
            entry.by_votes.insert((Reverse(before - 1), (root, size)));
        }
    }

    /// How many (name, version) pairs are shared.
    pub(super) fn len(&self) -> usize {
        self.entries
    }

    /// The answer to `WhoHas name`: at most [`MAX_HOLDER_GROUPS`] versions,
    /// most-voted first (ties by root), each listing at most
    /// [`MAX_HOLDERS_PER_GROUP`] holders starting at a point picked by
    /// `rotate`, so a popular file's load spreads over all its holders.
    /// The flag says something was left out. O(answer · log n).
    pub fn holders(
        &self,
        name: &FileName,
        rotate: u64,
        peer: impl Fn(PeerId) -> Option<PeerEntry>,
    ) -> (Vec<HolderGroup>, bool) {
        let Some(entry) = self.names.get(name) else {
            return (Vec::new(), false);
        };
        let mut truncated = entry.versions.len() > MAX_HOLDER_GROUPS;
        let mut groups = Vec::new();
        for &(Reverse(votes), version) in entry.by_votes.iter().take(MAX_HOLDER_GROUPS) {
            let Some(holders) = entry.versions.get(&version) else {
                continue; // by_votes mirrors versions; see check_invariants
            };
            truncated |= holders.len() > MAX_HOLDERS_PER_GROUP;
            let start = PeerId(rotate);
            let peers = holders
                .range(start..)
                .chain(holders.range(..start))
                .take(MAX_HOLDERS_PER_GROUP)
                .filter_map(|&id| peer(id))
                .collect();
            groups.push(HolderGroup {
                root: version.0,
                size: version.1,
                holders: u32::try_from(votes).unwrap_or(u32::MAX),
                peers,
            });
        }
        (groups, truncated)
    }

    /// One page of at most `limit` entries in (name, root, size) order,
    /// strictly after `after`, and whether more follow. O(page · log n).
    pub fn page(&self, after: Option<&FileCursor>, limit: usize) -> (Vec<NetworkFile>, bool) {
        let start = match after {
            Some(c) => Bound::Included(&c.name),
            None => Bound::Unbounded,
        };
        let mut files: Vec<NetworkFile> = self
            .names
            .range::<FileName, _>((start, Bound::Unbounded))
            .flat_map(|(name, e)| {
                let versions = match after {
                    Some(c) if &c.name == name => e
                        .versions
                        .range((Bound::Excluded((c.root, c.size)), Bound::Unbounded)),
                    _ => e.versions.range(..),
                };
                versions.map(move |(&(root, size), holders)| NetworkFile {
                    name: name.clone(),
                    size,
                    root,
                    holders: u32::try_from(holders.len()).unwrap_or(u32::MAX),
                })
            })
            .take(limit.saturating_add(1))
            .collect();
        let more = files.len() > limit;
        files.truncate(limit);
        (files, more)
    }

    /// `by_votes` mirrors `versions` exactly, no version or name is empty,
    /// and `entries` counts the versions. For tests.
    pub fn check_invariants(&self) {
        let mut entries = 0;
        for (name, e) in &self.names {
            assert!(!e.versions.is_empty(), "{name}: empty name kept");
            assert_eq!(e.versions.len(), e.by_votes.len(), "{name}");
            for (v, holders) in &e.versions {
                assert!(!holders.is_empty(), "{name}: empty version kept");
                assert!(e.by_votes.contains(&(Reverse(holders.len()), *v)), "{name}");
            }
            entries += e.versions.len();
        }
        assert_eq!(entries, self.entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn name(i: u8) -> FileName {
        FileName::new(&format!("n{i}")).unwrap() // a plain name
    }

    fn addr(id: PeerId) -> Option<PeerEntry> {
        Some(PeerEntry {
            id,
            addr: ([10, 0, 0, 1], id.0 as u16).into(),
            key: Default::default(),
        })
    }

    proptest! {
        /// Against a naive model (a set of (peer, name, root, size)), under
        /// random adds and removes: the listing pages reassemble to the
        /// model's counts, and holders match the model's holder sets.
        #[test]
        fn index_matches_a_naive_model(
            ops in prop::collection::vec((any::<bool>(), 0u64..6, 0u8..4, 0u8..3, 0u64..2), 0..200),
            page in 1usize..5,
        ) {
            let mut index = FileIndex::default();
            let mut model: BTreeSet<(PeerId, u8, u8, u64)> = BTreeSet::new();
            for (add, peer, n, root, size) in ops {
                let (peer, h) = (PeerId(peer), Hash([root; 32]));
                if add {
                    index.add(peer, &name(n), h, size);
                    model.insert((peer, n, root, size));
                } else {
                    index.remove(peer, &name(n), h, size);
                    model.remove(&(peer, n, root, size));
                }
                index.check_invariants();
            }
            let mut want: BTreeMap<(FileName, Hash, u64), u32> = BTreeMap::new();
            for &(_, n, root, size) in &model {
                *want.entry((name(n), Hash([root; 32]), size)).or_default() += 1;
            }
            let mut got = Vec::new();
            let mut after: Option<FileCursor> = None;
            loop {
                let (files, more) = index.page(after.as_ref(), page);
                prop_assert!(files.len() <= page);
                after = files.last().map(NetworkFile::cursor).or(after);
                got.extend(files);
                if !more { break; }
            }
            let got: Vec<_> = got.into_iter().map(|f| ((f.name, f.root, f.size), f.holders)).collect();
            prop_assert_eq!(got, want.into_iter().collect::<Vec<_>>());
            for n in 0..4u8 {
                let (groups, truncated) = index.holders(&name(n), 0, addr);
                prop_assert!(!truncated);
                for w in groups.windows(2) {
                    prop_assert!(w[0].holders >= w[1].holders, "not most-held first");
                }
                for g in &groups {
                    let ids: BTreeSet<PeerId> = g.peers.iter().map(|p| p.id).collect();
                    let model_ids: BTreeSet<PeerId> = model.iter()
                        .filter(|&&(_, mn, r, s)| mn == n && Hash([r; 32]) == g.root && s == g.size)
                        .map(|&(p, ..)| p).collect();
                    prop_assert_eq!(g.holders as usize, model_ids.len());
                    prop_assert_eq!(ids, model_ids);
                }
            }
        }
    }

    #[test]
    fn holders_are_capped_flagged_and_rotated() {
        let mut index = FileIndex::default();
        let n = name(0);
        for v in 0..(MAX_HOLDER_GROUPS as u64 + 5) {
            index.add(PeerId(100_000 + v), &n, Hash([1; 32]), v);
        }
        let big = MAX_HOLDERS_PER_GROUP as u64 * 3;
        for p in 0..big {
            index.add(PeerId(p), &n, Hash([2; 32]), 7);
        }
        let (groups, truncated) = index.holders(&n, 0, addr);
        assert!(truncated);
        assert_eq!(groups.len(), MAX_HOLDER_GROUPS);
        assert_eq!(groups[0].root, Hash([2; 32]), "most-held first");
        assert_eq!(groups[0].holders as u64, big, "the true vote count");
        assert_eq!(groups[0].peers.len(), MAX_HOLDERS_PER_GROUP);
        let (later, _) = index.holders(&n, big / 2, addr);
        assert_eq!(later[0].peers[0].id, PeerId(big / 2), "rotation start");
        assert_ne!(later[0].peers, groups[0].peers);
    }
}
