//! The endgame: once nothing is Missing, spare capacity duplicates the
//! chunks expected to arrive last, if the copy is expected to come sooner.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{ChunkState, Scheduler, Source, SourceId};

/// An in-flight chunk that could be duplicated in the endgame.
struct Candidate {
    index: u32,
    /// Seconds until its best holder is expected to deliver it.
    eta: f64,
    /// That holder's place in its own queue (1 = next to arrive).
    position: u32,
    /// That holder's `progress_base`.
    since: Instant,
    oldest_sent: Instant,
    copies: usize,
}

impl Scheduler {
    /// Gives spare capacity, fastest source first, duplicates of the chunks
    /// expected to arrive last, if the duplicate is expected to come sooner.
    pub(super) fn fill_endgame(&mut self, now: Instant) {
        let spare = |s: &Source| s.in_flight() < self.target_depth(s) as usize;
        if !self.sources.values().any(spare) {
            return;
        }
        let mut candidates = self.endgame_candidates(now);
        if candidates.is_empty() {
            return;
        }
        let mut order: Vec<(f64, SourceId)> = self
            .sources
            .iter()
            .map(|(&id, s)| (s.chunk_time(self.avg_len, now), id))
            .collect();
        order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        // A source that has delivered nothing yet may be one that never
        // will: while any source has proven itself, duplicates go only to
        // proven ones, or a chunk could sit at two silent sources until
        // both stall out.
        if order.first().is_some_and(|(tau, _)| tau.is_finite()) {
            order.retain(|(tau, _)| tau.is_finite());
        }
        for (tau, id) in order {
            loop {
                let src = &self.sources[&id];
                if src.in_flight() >= self.target_depth(src) as usize {
                    break;
                }
                let eta_here = (src.in_flight() + 1) as f64 * tau;
                let max_copies = self.max_copies();
                let Some(c) = candidates.iter_mut().find(|c| {
                    c.copies < max_copies && !src.holds(c.index) && src.has_chunk(c.index)
                }) else {
                    break;
                };
                if c.eta.is_finite() && eta_here >= c.eta {
                    // Not worth it yet; it will be once the holder is late
                    // enough that its expected time passes ours.
                    let wait = Duration::try_from_secs_f64(eta_here / f64::from(c.position));
                    if let Ok(wait) = wait {
                        let slack = Duration::from_millis(1);
                        let at = (c.since + wait + slack).max(now + slack);
                        self.endgame_recheck = Some(self.endgame_recheck.map_or(at, |t| t.min(at)));
                    }
                    break;
                }
                c.copies += 1;
                let index = c.index;
                log::trace!("endgame: chunk {index} duplicated to {id}");
                self.request(id, index, now);
            }
        }
    }

    /// In-flight chunks with room for another copy and no copy arrived,
    /// latest expected first, then requested longest ago.
    fn endgame_candidates(&self, now: Instant) -> Vec<Candidate> {
        let mut by_chunk: BTreeMap<u32, Candidate> = BTreeMap::new();
        let mut arrived = BTreeSet::new();
        for s in self.sources.values() {
            let tau = s.chunk_time(self.avg_len, now);
            let since = s.progress_base().unwrap_or(now);
            for (i, r) in s.outstanding().enumerate() {
                let (index, sent) = (r.index, r.sent);
                let position = i as u32 + 1;
                let eta = f64::from(position) * tau;
                let c = by_chunk.entry(index).or_insert(Candidate {
                    index,
                    eta,
                    position,
                    since,
                    oldest_sent: sent,
                    copies: 0,
                });
                if eta < c.eta {
                    (c.eta, c.position, c.since) = (eta, position, since);
                }
                c.oldest_sent = c.oldest_sent.min(sent);
            }
            arrived.extend(
                s.requests()
                    .filter(|r| r.arrived.is_some())
                    .map(|r| r.index),
            );
        }
        let max_copies = self.max_copies();
        let mut out: Vec<Candidate> = by_chunk
            .into_values()
            .filter(|c| !arrived.contains(&c.index))
            .map(|mut c| {
                if let ChunkState::InFlight(h) = &self.chunks[c.index as usize] {
                    c.copies = h.len();
                }
                c
            })
            .filter(|c| c.copies < max_copies)
            .collect();
        out.sort_by(|a, b| {
            b.eta
                .total_cmp(&a.eta)
                .then(a.oldest_sent.cmp(&b.oldest_sent))
                .then(a.index.cmp(&b.index))
        });
        out
    }
}
