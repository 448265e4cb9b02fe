//! Connection deadlines in buckets one `tick` wide: a connection sits in the
//! bucket of its deadline, rounded up to the next tick, so a bucket is due
//! when its end has passed, and a deadline fires late by at most one tick,
//! never early. A tick looks only at the buckets that are due, so its cost
//! does not grow with the number of connections; the owner re-arms, lazily,
//! a connection heard from since it was bucketed (one move per timeout, not
//! one per frame), and recognises an entry left behind by a connection that
//! moved or closed by the bucket number it keeps with the connection.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::net::ConnId;

/// A bucket's number: ticks since the wheel's epoch.
pub(super) type Slot = u64;

#[derive(Debug)]
pub(super) struct Wheel {
    tick: Duration,
    /// The moment slot 0 ends: the `now` of the first deadline armed.
    epoch: Option<Instant>,
    buckets: BTreeMap<Slot, Vec<ConnId>>,
}

impl Wheel {
    pub fn new(tick: Duration) -> Wheel {
        Wheel {
            tick: tick.max(Duration::from_millis(1)),
            epoch: None,
            buckets: BTreeMap::new(),
        }
    }

    /// Puts `conn` in the bucket of `at` (not before `now`); the owner
    /// keeps the slot to know the entry is its current one.
    pub fn arm(&mut self, conn: ConnId, at: Instant, now: Instant) -> Slot {
        let epoch = *self.epoch.get_or_insert(now);
        let tick = self.tick.as_nanos();
        let slot = at
            .saturating_duration_since(epoch)
            .as_nanos()
            .div_ceil(tick);
        let slot = u64::try_from(slot).unwrap_or(u64::MAX);
        self.buckets.entry(slot).or_default().push(conn);
        slot
    }

    /// When the first bucket is due.
    pub fn next_due(&self) -> Option<Instant> {
        let (&slot, _) = self.buckets.first_key_value()?;
        self.slot_end(slot)
    }

    /// Takes the first bucket if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Slot, Vec<ConnId>)> {
        let (&slot, _) = self.buckets.first_key_value()?;
        if self.slot_end(slot)? > now {
            return None;
        }
        self.buckets.pop_first()
    }

    /// Whether `conn` has an entry in `slot` (for invariant checks).
    pub fn holds(&self, slot: Slot, conn: ConnId) -> bool {
        self.buckets.get(&slot).is_some_and(|b| b.contains(&conn))
    }

    /// Entries, current or stale (for tests).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buckets.values().map(Vec::len).sum()
    }

    fn slot_end(&self, slot: Slot) -> Option<Instant> {
        // Set by the first `arm`, so there whenever a bucket is.
        let epoch = self.epoch?;
        let ticks = u32::try_from(slot).unwrap_or(u32::MAX);
        let end = epoch.checked_add(self.tick.saturating_mul(ticks));
        Some(end.unwrap_or(epoch + Duration::from_secs(86_400 * 365)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_fires_late_by_less_than_a_tick_never_early() {
        let t0 = Instant::now();
        let tick = Duration::from_millis(100);
        let mut w = Wheel::new(tick);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut due: Vec<(Instant, ConnId)> = Vec::new();
        for c in 0..500 {
            let at = t0 + Duration::from_millis(rng.u64(0..5_000));
            w.arm(ConnId(c), at, t0);
            due.push((at, ConnId(c)));
        }
        let mut now = t0;
        let mut fired = 0;
        while let Some(next) = w.next_due() {
            now = now.max(next);
            while let Some((_, conns)) = w.pop_due(now) {
                for c in conns {
                    let at = due[c.0].0;
                    assert!(at <= now, "early");
                    assert!(now < at + tick, "late by a tick or more");
                    fired += 1;
                }
            }
        }
        assert_eq!(fired, 500);
        assert_eq!(w.len(), 0);
    }
}
