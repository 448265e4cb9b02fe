//! The live members by id, in one flat vector. Ids only grow (a join takes
//! the next one), so a join appends and the vector stays sorted; a leave
//! leaves a hole that a lookup skips, and the holes are swept out once they
//! outnumber the members. Compared with a `BTreeMap` this is one allocation,
//! no per-node overhead (about 80 bytes a member), O(1) joins and
//! O(log n) lookups and ranges.

use crate::net::ConnId;
use crate::wire::PeerId;

use super::registry::Live;

/// Holes tolerated before a sweep, whatever the member count.
const MIN_HOLES: usize = 1024;

#[derive(Debug, Default)]
pub(super) struct Members {
    /// Sorted by id; `None` is a member that left.
    slots: Vec<(PeerId, Option<Live>)>,
    live: usize,
}

impl Members {
    pub fn len(&self) -> usize {
        self.live
    }

    /// Adds a member whose id is above every id before it (the registry
    /// hands ids out in order); `false`, and nothing added, otherwise.
    pub fn push(&mut self, id: PeerId, live: Live) -> bool {
        if self.slots.last().is_some_and(|(last, _)| *last >= id) {
            return false;
        }
        self.slots.push((id, Some(live)));
        self.live += 1;
        true
    }

    pub fn get(&self, id: PeerId) -> Option<&Live> {
        let i = self.slots.binary_search_by_key(&id, |s| s.0).ok()?;
        self.slots[i].1.as_ref()
    }

    pub fn remove(&mut self, id: PeerId) -> Option<Live> {
        let i = self.slots.binary_search_by_key(&id, |s| s.0).ok()?;
        let live = self.slots[i].1.take()?;
        self.live -= 1;
        let holes = self.slots.len() - self.live;
        if holes > MIN_HOLES.max(self.live) {
            self.slots.retain(|s| s.1.is_some());
            // Return the memory of a burst that left.
            if self.slots.capacity() > 2 * self.slots.len().max(MIN_HOLES) {
                self.slots.shrink_to(self.slots.len() * 5 / 4);
            }
        }
        Some(live)
    }

    /// Members with ids above `after`, in id order.
    pub fn after(&self, after: PeerId) -> impl Iterator<Item = (PeerId, &Live)> {
        let start = self.slots.partition_point(|s| s.0 <= after);
        self.slots[start..]
            .iter()
            .filter_map(|(id, l)| l.as_ref().map(|l| (*id, l)))
    }

    /// Every member, in id order.
    pub fn iter(&self) -> impl Iterator<Item = (PeerId, &Live)> {
        self.after(PeerId(0))
    }

    /// Every member's connection.
    pub fn conns(&self) -> Vec<ConnId> {
        let mut all = Vec::with_capacity(self.live);
        all.extend(self.iter().map(|(_, l)| l.conn));
        all
    }

    /// For tests: the count matches the slots and the ids are in order.
    pub fn check_invariants(&self) {
        let live = self.slots.iter().filter(|s| s.1.is_some()).count();
        assert_eq!(live, self.live, "member count");
        assert!(
            self.slots.windows(2).all(|w| w[0].0 < w[1].0),
            "member ids in order"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PeerKey;
    use std::collections::BTreeMap;

    fn live(conn: usize) -> Live {
        Live {
            conn: ConnId(conn),
            addr: ([10, 0, 0, 1], 7000).into(),
            key: PeerKey::UNKNOWN,
        }
    }

    /// Against a `BTreeMap` under random pushes and removes.
    #[test]
    fn behaves_like_a_sorted_map() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut m = Members::default();
        let mut model: BTreeMap<PeerId, usize> = BTreeMap::new();
        let mut next = 1u64;
        for step in 0..20_000 {
            if rng.u8(..) < 120 || model.is_empty() {
                let id = PeerId(next);
                next += rng.u64(1..3);
                assert!(m.push(id, live(step)));
                model.insert(id, step);
            } else {
                let id = PeerId(rng.u64(0..next + 1));
                let got = m.remove(id).map(|l| l.conn.0);
                assert_eq!(got, model.remove(&id));
            }
            if step % 97 == 0 {
                m.check_invariants();
                let after = PeerId(rng.u64(0..next + 1));
                let ours: Vec<(PeerId, usize)> =
                    m.after(after).map(|(i, l)| (i, l.conn.0)).collect();
                let theirs: Vec<(PeerId, usize)> = model
                    .range(PeerId(after.0 + 1)..)
                    .map(|(i, c)| (*i, *c))
                    .collect();
                assert_eq!(ours, theirs);
                assert_eq!(m.len(), model.len());
            }
        }
    }

    #[test]
    fn an_id_out_of_order_is_refused() {
        let mut m = Members::default();
        assert!(m.push(PeerId(5), live(1)));
        assert!(!m.push(PeerId(5), live(2)));
        assert!(!m.push(PeerId(3), live(2)));
        assert_eq!(m.len(), 1);
    }
}
