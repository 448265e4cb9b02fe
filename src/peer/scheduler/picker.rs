//! Which Missing chunk goes out next: rarest first among the connected
//! sources, ties broken by a per-download rotation of the chunk order.
//!
//! Availability counts only sources that hold part of the file (swarm
//! peers still downloading): a complete source holds every chunk, which
//! changes no chunk's rank. So with only complete sources every count is
//! zero and chunks go out in rotated index order, sequential on disk; the
//! rotation's start is random per download, so downloaders of one seeder
//! fetch different chunks first and have something to trade.

use std::collections::BTreeSet;

use fixedbitset::FixedBitSet;

#[derive(Debug)]
pub(super) struct Picker {
    chunks: u32,
    /// Rank 0 is this chunk; ranks follow in index order, wrapping.
    start: u32,
    /// Partial sources holding each chunk.
    avail: Vec<u16>,
    /// The Missing chunks as (availability, rank): rarest, then next in
    /// the rotation, first.
    missing: BTreeSet<(u16, u32)>,
}

impl Picker {
    /// Every chunk Missing; nobody holds any part of the file yet.
    pub fn new(chunks: u32, start: u32) -> Picker {
        let start = if chunks == 0 { 0 } else { start % chunks };
        Picker {
            chunks,
            start,
            avail: vec![0; chunks as usize],
            missing: (0..chunks).map(|rank| (0, rank)).collect(),
        }
    }

    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    fn rank(&self, index: u32) -> u32 {
        // Both below `chunks`, so the sum cannot overflow a u64.
        ((u64::from(index) + u64::from(self.chunks) - u64::from(self.start))
            % u64::from(self.chunks)) as u32
    }

    fn index(&self, rank: u32) -> u32 {
        ((u64::from(rank) + u64::from(self.start)) % u64::from(self.chunks)) as u32
    }

    fn key(&self, index: u32) -> (u16, u32) {
        (self.avail[index as usize], self.rank(index))
    }

    pub fn is_missing(&self, index: u32) -> bool {
        self.missing.contains(&self.key(index))
    }

    /// The chunk became Missing (again).
    pub fn insert(&mut self, index: u32) {
        self.missing.insert(self.key(index));
    }

    /// The chunk is no longer Missing (asked for, or done).
    pub fn remove(&mut self, index: u32) {
        self.missing.remove(&self.key(index));
    }

    /// One more (or, with `delta` -1, one fewer) partial source holds `index`.
    pub fn change_holders(&mut self, index: u32, delta: i32) {
        let was_missing = self.missing.remove(&self.key(index));
        let a = &mut self.avail[index as usize];
        *a = if delta >= 0 {
            a.saturating_add(1)
        } else {
            a.saturating_sub(1)
        };
        if was_missing {
            self.missing.insert(self.key(index));
        }
    }

    /// The rarest Missing chunk (for a source holding every chunk).
    pub fn rarest(&self) -> Option<u32> {
        self.missing.first().map(|&(_, rank)| self.index(rank))
    }

    /// The rarest Missing chunk among `has` (`has_count` of its bits set),
    /// walking whichever of the two sets is smaller.
    pub fn rarest_in(&self, has: &FixedBitSet, has_count: usize) -> Option<u32> {
        if has_count < self.missing.len() {
            has.ones()
                .map(|i| i as u32)
                .filter(|&i| i < self.chunks && self.is_missing(i))
                .min_by_key(|&i| self.key(i))
        } else {
            // A chunk `has` holds counts `has` among its holders: start at 1.
            self.missing
                .range((1, 0)..)
                .map(|&(_, rank)| self.index(rank))
                .find(|&i| has.contains(i as usize))
        }
    }

    /// Checks the counts against the holders' maps and the Missing set
    /// against `is_missing` (for the scheduler's invariants).
    pub fn check<'a>(
        &self,
        holders: impl Iterator<Item = &'a FixedBitSet>,
        is_missing: impl Fn(u32) -> bool,
    ) -> Result<(), String> {
        let mut counts = vec![0u16; self.chunks as usize];
        let n = counts.len();
        for has in holders {
            for i in has.ones().filter(|&i| i < n) {
                counts[i] += 1;
            }
        }
        if counts != self.avail {
            return Err("availability counts disagree with the sources' maps".to_string());
        }
        let expected: BTreeSet<(u16, u32)> = (0..self.chunks)
            .filter(|&i| is_missing(i))
            .map(|i| self.key(i))
            .collect();
        if expected != self.missing {
            return Err("the picker's Missing set disagrees with the chunks".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(n: usize, ones: &[usize]) -> FixedBitSet {
        let mut b = FixedBitSet::with_capacity(n);
        for &i in ones {
            b.insert(i);
        }
        b
    }

    #[test]
    fn with_no_partial_holders_chunks_go_in_rotated_order() {
        let mut p = Picker::new(5, 3);
        let mut order = Vec::new();
        while let Some(i) = p.rarest() {
            p.remove(i);
            order.push(i);
        }
        assert_eq!(order, [3, 4, 0, 1, 2]);
    }

    #[test]
    fn the_chunk_fewest_partial_holders_have_goes_first() {
        let mut p = Picker::new(4, 0);
        // Chunks 0 and 1 are held by two partial peers, 2 by one.
        for i in [0, 1, 0, 1, 2] {
            p.change_holders(i, 1);
        }
        assert_eq!(p.rarest(), Some(3), "nobody else has 3");
        p.remove(3);
        assert_eq!(p.rarest(), Some(2));
        // A partial holder of {0, 1, 2} is asked for its rarest: 2.
        let has = bits(4, &[0, 1, 2]);
        assert_eq!(p.rarest_in(&has, 3), Some(2));
        assert_eq!(p.rarest_in(&has, 99), Some(2), "either walk agrees");
        p.remove(2);
        p.change_holders(1, -1);
        assert_eq!(p.rarest_in(&has, 3), Some(1));
        assert_eq!(p.rarest_in(&bits(4, &[3]), 1), None, "3 is not missing");
    }
}
