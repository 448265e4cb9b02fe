//! The scheduler's invariants (docs/state/download-scheduler.md, "Download scheduler"), checked
//! in full: the simulation runs this after every step.

use super::{Action, ChunkState, Scheduler};

impl Scheduler {
    /// Checks the invariants listed in `docs/state/download-scheduler.md`; O(chunks + in
    /// flight). For tests and debugging.
    pub fn check_invariants(&self) -> Result<(), String> {
        let (mut missing, mut done, mut bytes, mut copies) = (0usize, 0u32, 0u64, 0usize);
        for (i, state) in self.chunks.iter().enumerate() {
            match state {
                ChunkState::Missing => missing += 1,
                ChunkState::Done => {
                    done += 1;
                    bytes += u64::from(self.chunk_lens[i]);
                }
                ChunkState::InFlight(holders) => {
                    if holders.is_empty() || holders.len() > self.max_copies() {
                        return Err(format!("chunk {i} has {} holders", holders.len()));
                    }
                    if holders
                        .iter()
                        .enumerate()
                        .any(|(k, h)| holders[..k].contains(h))
                    {
                        return Err(format!("chunk {i} holders repeat: {holders:?}"));
                    }
                    copies += holders.len();
                }
            }
        }
        if missing != self.picker.missing_count() {
            return Err(format!(
                "{missing} chunks missing, counted {}",
                self.picker.missing_count()
            ));
        }
        self.picker
            .check(self.sources.values().filter_map(|s| s.has.as_ref()), |i| {
                self.chunks[i as usize] == ChunkState::Missing
            })?;
        if done != self.chunks_done || bytes != self.bytes_done {
            return Err(format!(
                "counters: done {done}/{}, bytes {bytes}/{}",
                self.chunks_done, self.bytes_done
            ));
        }
        for (id, s) in &self.sources {
            if self.retired.contains(id) {
                return Err(format!("{id} is both active and retired"));
            }
            if s.in_flight() > self.config.max_inflight.max(1) as usize {
                return Err(format!("{id} has {} in flight", s.in_flight()));
            }
            // Every (source, chunk) pair here is one of the chunks' holders;
            // with the counts equal (below), the two views are the same.
            for (k, r) in s.requests().enumerate() {
                let index = r.index;
                if s.requests().take(k).any(|o| o.index == index) {
                    return Err(format!("{id} has chunk {index} in flight twice"));
                }
                let held = matches!(self.chunks.get(index as usize),
                    Some(ChunkState::InFlight(h)) if h.contains(id));
                if !held {
                    return Err(format!("{id} has chunk {index} in flight, chunk disagrees"));
                }
            }
            copies = copies.wrapping_sub(s.in_flight());
            if let Some(has) = &s.has {
                let useful = has
                    .ones()
                    .filter(|&i| self.chunks.get(i) == Some(&ChunkState::Missing))
                    .count();
                if useful != s.useful || has.count_ones(..) != s.has_count {
                    return Err(format!("{id}: useful/has counts are stale"));
                }
                if let Some(r) = s.requests().find(|r| !has.contains(r.index as usize)) {
                    return Err(format!(
                        "{id} was asked for chunk {}, which it lacks",
                        r.index
                    ));
                }
            }
            for index in &s.cancelled {
                if s.holds(*index) || self.chunks.get(*index as usize) != Some(&ChunkState::Done) {
                    return Err(format!("{id} cancelled chunk {index}, which is not done"));
                }
            }
        }
        if copies != 0 {
            return Err("a chunk names a holder that does not hold it".to_string());
        }
        for a in &self.actions {
            let ok = match *a {
                Action::Request { source, index } => {
                    self.sources.get(&source).is_some_and(|s| s.holds(index))
                }
                Action::Cancel { source, index } => self
                    .sources
                    .get(&source)
                    .is_some_and(|s| s.cancelled.contains(&index)),
                Action::DropSource { source, .. } => self.retired.contains(&source),
            };
            if !ok {
                return Err(format!("queued {a:?} contradicts the state"));
            }
        }
        Ok(())
    }
}
