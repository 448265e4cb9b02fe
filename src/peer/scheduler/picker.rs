//! Which Missing chunk goes out next: rarest first among the connected
//! sources, ties broken by a per-download rotation of the chunk order.
//!
//! Availability counts only sources that hold part of the file (swarm
//! peers still downloading): a complete source holds every chunk, which
//! changes no chunk's rank. So with only complete sources every count is
//! zero and the tie-break alone sets the order: runs of [`RUN`] chunks in
//! index order (sequential on disk), the runs in an order shuffled per
//! download. Downloaders of one seeder so fetch different chunks and have
//! something to trade. A rotation (one random start, then index order)
//! was tried first: two downloaders whose starts were close met and then
//! asked the seeder for the same chunks in lockstep, and a simulated swarm
//! of 16 took 2.9 x its lower bound.

use std::collections::BTreeSet;

use fixedbitset::FixedBitSet;

/// Chunks in index order before the tie-break jumps elsewhere (256 KiB
/// of 32 KiB chunks).
const RUN: u32 = 8;

#[derive(Debug)]
pub(super) struct Picker {
    chunks: u32,
    /// The runs' order: run `r` goes out `(mul * r + add) % runs`-th, a
    /// bijection since `mul` and `runs` are coprime.
    runs: u32,
    mul: u32,
    add: u32,
    /// Partial sources holding each chunk.
    avail: Vec<u16>,
    /// The Missing chunks as (availability, rank, index): rarest, then
    /// first in the tie-break order, first.
    missing: BTreeSet<(u16, u32, u32)>,
}

impl Picker {
    /// Every chunk Missing; nobody holds any part of the file yet. `seed`
    /// shuffles the tie-break; 0 keeps index order.
    pub fn new(chunks: u32, seed: u32) -> Picker {
        let runs = chunks.div_ceil(RUN).max(1);
        let (mut mul, add) = match seed {
            0 => (1, 0),
            _ => {
                let h = u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                ((h >> 32) as u32 % runs, h as u32 % runs)
            }
        };
        while gcd(mul, runs) != 1 {
            mul += 1;
        }
        let mut p = Picker {
            chunks,
            runs,
            mul,
            add,
            avail: vec![0; chunks as usize],
            missing: BTreeSet::new(),
        };
        p.missing = (0..chunks).map(|i| p.key(i)).collect();
        p
    }

    pub fn missing_count(&self) -> usize {
        self.missing.len()
    }

    /// Place in the tie-break order (unique per chunk).
    fn rank(&self, index: u32) -> u32 {
        let run = (u64::from(self.mul) * u64::from(index / RUN) + u64::from(self.add))
            % u64::from(self.runs);
        run as u32 * RUN + index % RUN
    }

    fn key(&self, index: u32) -> (u16, u32, u32) {
        (self.avail[index as usize], self.rank(index), index)
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
        self.missing.first().map(|&(_, _, index)| index)
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
                .range((1, 0, 0)..)
                .map(|&(_, _, index)| index)
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
        let expected: BTreeSet<(u16, u32, u32)> = (0..self.chunks)
            .filter(|&i| is_missing(i))
            .map(|i| self.key(i))
            .collect();
        if expected != self.missing {
            return Err("the picker's Missing set disagrees with the chunks".to_string());
        }
        Ok(())
    }
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
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

    fn order(mut p: Picker) -> Vec<u32> {
        let mut order = Vec::new();
        while let Some(i) = p.rarest() {
            p.remove(i);
            order.push(i);
        }
        order
    }

    #[test]
    fn with_no_partial_holders_chunks_go_in_shuffled_runs() {
        assert_eq!(order(Picker::new(20, 0)), (0..20).collect::<Vec<_>>());
        for seed in 1..50 {
            let got = order(Picker::new(100, seed));
            let mut sorted = got.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..100).collect::<Vec<_>>(), "a permutation");
            // Within a run, index order: sequential on disk.
            for w in got.windows(2) {
                if w[0] % RUN != RUN - 1 && w[0] + 1 < 100 {
                    assert_eq!(w[1], w[0] + 1, "seed {seed}: {got:?}");
                }
            }
        }
        let a = order(Picker::new(1000, 7));
        let b = order(Picker::new(1000, 8));
        let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
        assert!(same < 100, "two seeds share {same} of 1000 places");
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
