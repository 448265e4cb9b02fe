//! Sharing the upload among the connections being served, pure: no clock
//! read, no I/O. [`FairQueue`] is deficit round robin (Shreedhar and
//! Varghese, 1995) by bytes: each connection with requests queued and room
//! in its socket takes a quantum of bytes per turn, so whatever the
//! bottleneck (the `--upload-limit` bucket or the sockets themselves),
//! downloaders of one seeder progress together instead of in arrival order.
//! [`Rotation`] decides who gives up a serving slot when more peers ask than
//! `--max-conns` allows (the rule is in `docs/state/serving.md`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::net::ConnId;

/// Bytes a connection may send per turn: one chunk of the usual size, so
/// turns alternate chunk by chunk.
pub const QUANTUM: u64 = 32 << 10;

/// The connections that may send now, in round-robin order, each with the
/// bytes it may still send in its turn (its deficit).
///
/// Only the head's turn has begun: it got its quantum when it became the
/// head; the others wait with what they left over (always less than the
/// chunk they could not send). A connection that leaves loses its
/// leftover, as in DRR a flow that goes idle does.
#[derive(Debug, Clone)]
pub struct FairQueue {
    quantum: u64,
    ring: VecDeque<Slot>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: ConnId,
    deficit: u64,
}

impl FairQueue {
    /// A queue giving `quantum` bytes per turn (at least one byte).
    pub fn new(quantum: u64) -> FairQueue {
        FairQueue {
            quantum: quantum.max(1),
            ring: VecDeque::new(),
        }
    }

    /// `id` has requests and room in its socket: it joins the back of the
    /// round (no-op if it is in already).
    pub fn join(&mut self, id: ConnId) {
        if self.contains(id) {
            return;
        }
        let deficit = if self.ring.is_empty() {
            self.quantum
        } else {
            0
        };
        self.ring.push_back(Slot { id, deficit });
    }

    /// `id` has nothing to send, its socket is full, or it closed.
    pub fn leave(&mut self, id: ConnId) {
        let Some(pos) = self.ring.iter().position(|s| s.id == id) else {
            return;
        };
        self.ring.remove(pos);
        if pos == 0 {
            self.begin_turn();
        }
    }

    pub fn contains(&self, id: ConnId) -> bool {
        self.ring.iter().any(|s| s.id == id)
    }

    /// Whose turn it is.
    pub fn head(&self) -> Option<ConnId> {
        self.ring.front().map(|s| s.id)
    }

    /// Whether the head may send `len` bytes in this turn. If not, its turn
    /// ends: it goes to the back (keeping what it has left) and the next one
    /// begins its turn; ask [`FairQueue::head`] again. A chunk longer than
    /// the quantum goes out once the head has saved up enough turns.
    pub fn fits(&mut self, len: u64) -> bool {
        let Some(head) = self.ring.front() else {
            return false;
        };
        if head.deficit >= len {
            return true;
        }
        self.ring.rotate_left(1);
        self.begin_turn();
        false
    }

    /// The head sent `len` bytes (after [`FairQueue::fits`] said it may).
    pub fn charge(&mut self, len: u64) {
        if let Some(head) = self.ring.front_mut() {
            head.deficit = head.deficit.saturating_sub(len);
        }
    }

    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    /// The connection at position `i` of the round (the head is 0), so the
    /// shell can visit them all without collecting them.
    pub fn at(&self, i: usize) -> Option<ConnId> {
        self.ring.get(i).map(|s| s.id)
    }

    fn begin_turn(&mut self) {
        if let Some(head) = self.ring.front_mut() {
            head.deficit = head.deficit.saturating_add(self.quantum);
        }
    }
}

/// When a serving slot changes hands.
#[derive(Debug, Clone, Copy)]
pub struct RotationConfig {
    /// A connection served this long may be asked to make room.
    pub turn: Duration,
    /// A refusal this recent means someone is waiting for a slot (the
    /// download core retries a Busy holder after 1 s, 2 s, 4 s, ...).
    pub window: Duration,
    /// A rotated-out connection that has not taken its last replies by
    /// then is closed anyway.
    pub drain: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            turn: Duration::from_secs(30),
            window: Duration::from_secs(10),
            drain: Duration::from_secs(10),
        }
    }
}

/// Who is served, since when, and who is leaving: at the connection cap,
/// with a peer turned away within `window`, the connection served longest,
/// if for more than `turn`, is rotated out: told Busy after the replies
/// already queued for it, then closed. One refusal rotates at most one
/// connection out; the refused peer comes back by itself (its download
/// backs off and retries), and the rotated one does the same later.
#[derive(Debug, Clone)]
pub struct Rotation {
    config: RotationConfig,
    /// Serving connections and when each was accepted, oldest first.
    served: VecDeque<(ConnId, Instant)>,
    /// Rotated out, and when to close each even if it still has bytes queued.
    leaving: Vec<(ConnId, Instant)>,
    refused_at: Option<Instant>,
}

impl Rotation {
    pub fn new(config: RotationConfig) -> Rotation {
        Rotation {
            config,
            served: VecDeque::new(),
            leaving: Vec::new(),
            refused_at: None,
        }
    }

    pub fn handle_accepted(&mut self, id: ConnId, now: Instant) {
        self.handle_closed(id);
        self.served.push_back((id, now));
    }

    /// `id` is gone (slab keys are reused: forget it everywhere).
    pub fn handle_closed(&mut self, id: ConnId) {
        self.served.retain(|&(c, _)| c != id);
        self.leaving.retain(|&(c, _)| c != id);
    }

    /// A peer was turned away as Busy.
    pub fn handle_refused(&mut self, now: Instant) {
        self.refused_at = Some(now);
    }

    /// The connection to rotate out now, if the rule says so: `at_cap` is
    /// whether every serving slot is taken. The one returned is marked
    /// leaving; the shell tells it Busy and closes it once its queued
    /// replies are out (or at [`Rotation::poll_timeout`]).
    #[must_use]
    pub fn poll_rotate(&mut self, at_cap: bool, now: Instant) -> Option<ConnId> {
        let refused = self.refused_at?;
        if now.saturating_duration_since(refused) > self.config.window {
            self.refused_at = None;
            return None;
        }
        if !at_cap {
            return None;
        }
        let &(id, since) = self.served.front()?;
        if now.saturating_duration_since(since) < self.config.turn {
            return None;
        }
        self.served.pop_front();
        self.leaving.push((id, now + self.config.drain));
        self.refused_at = None;
        Some(id)
    }

    /// Whether `id` was rotated out and is only finishing its replies.
    pub fn is_leaving(&self, id: ConnId) -> bool {
        self.leaving.iter().any(|&(c, _)| c == id)
    }

    /// A leaving connection whose drain time is up (call until `None`).
    #[must_use]
    pub fn poll_expired(&mut self, now: Instant) -> Option<ConnId> {
        let pos = self.leaving.iter().position(|&(_, at)| at <= now)?;
        Some(self.leaving.swap_remove(pos).0)
    }

    /// When [`Rotation::poll_rotate`] or [`Rotation::poll_expired`] may next
    /// have something: the oldest connection's turn ends while the last
    /// refusal is still recent, or a drain time is up.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut at = self.leaving.iter().map(|&(_, t)| t).min();
        if let (Some(refused), Some(&(_, since))) = (self.refused_at, self.served.front()) {
            let turn_over = since + self.config.turn;
            if turn_over <= refused + self.config.window {
                at = Some(at.map_or(turn_over, |a| a.min(turn_over)));
            }
        }
        at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves every active connection from its queue of chunk lengths until
    /// `budget` bytes are sent; returns the bytes each sent.
    fn run(q: &mut FairQueue, queues: &mut [Vec<u64>], mut budget: u64) -> Vec<u64> {
        let mut sent = vec![0; queues.len()];
        while let Some(id) = q.head() {
            let Some(&len) = queues[id.0].first() else {
                q.leave(id);
                continue;
            };
            if !q.fits(len) {
                continue;
            }
            if budget < len {
                break;
            }
            budget -= len;
            q.charge(len);
            queues[id.0].remove(0);
            sent[id.0] += len;
        }
        sent
    }

    #[test]
    fn equal_chunks_alternate_one_by_one() {
        let mut q = FairQueue::new(QUANTUM);
        for i in 0..3 {
            q.join(ConnId(i));
        }
        let mut order = Vec::new();
        for _ in 0..9 {
            let id = q.head().unwrap();
            if !q.fits(QUANTUM) {
                // One chunk per turn: the second does not fit.
                let id = q.head().unwrap();
                assert!(q.fits(QUANTUM));
                q.charge(QUANTUM);
                order.push(id.0);
                continue;
            }
            q.charge(QUANTUM);
            order.push(id.0);
        }
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_shared_budget_is_split_evenly_whoever_came_first() {
        let mut q = FairQueue::new(QUANTUM);
        let mut queues = vec![vec![QUANTUM; 100]; 3];
        for i in 0..3 {
            q.join(ConnId(i));
        }
        let sent = run(&mut q, &mut queues, 30 * QUANTUM);
        assert_eq!(sent, [10 * QUANTUM; 3]);
    }

    #[test]
    fn big_chunks_wait_for_enough_turns_and_bytes_stay_even() {
        // Connection 0 asks for 128 KiB chunks, 1 for 32 KiB ones: over a
        // long run both get the same bytes, not the same chunk count.
        let mut q = FairQueue::new(QUANTUM);
        let mut queues = vec![vec![4 * QUANTUM; 100], vec![QUANTUM; 400]];
        q.join(ConnId(0));
        q.join(ConnId(1));
        let sent = run(&mut q, &mut queues, 80 * QUANTUM);
        assert_eq!(sent[0] + sent[1], 80 * QUANTUM);
        assert!(sent[0].abs_diff(sent[1]) <= 4 * QUANTUM, "uneven: {sent:?}");
    }

    #[test]
    fn a_connection_that_leaves_and_rejoins_goes_to_the_back() {
        let mut q = FairQueue::new(QUANTUM);
        q.join(ConnId(7));
        q.join(ConnId(8));
        q.join(ConnId(9));
        q.join(ConnId(8)); // already in: no second slot
        assert_eq!(q.len(), 3);
        // 7's socket fills: it leaves, and 8's turn begins at once.
        q.leave(ConnId(7));
        assert_eq!(q.head(), Some(ConnId(8)));
        assert!(q.fits(QUANTUM));
        q.charge(QUANTUM);
        // Writable again: 7 queues behind 9.
        q.join(ConnId(7));
        assert!(!q.fits(QUANTUM));
        assert_eq!(q.head(), Some(ConnId(9)));
        assert!(q.fits(QUANTUM));
        q.charge(QUANTUM);
        assert!(!q.fits(QUANTUM));
        assert_eq!(q.head(), Some(ConnId(7)));
        assert!(q.fits(QUANTUM));
        assert_eq!(
            (0..q.len()).filter_map(|i| q.at(i)).collect::<Vec<_>>(),
            [ConnId(7), ConnId(8), ConnId(9)]
        );
        // Leaving from the middle keeps the head's turn going.
        q.leave(ConnId(8));
        assert_eq!(q.head(), Some(ConnId(7)));
        assert!(q.fits(QUANTUM));
        q.leave(ConnId(42)); // not in: no-op
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn an_empty_queue_has_no_turn() {
        let mut q = FairQueue::new(QUANTUM);
        assert!(q.is_empty());
        assert_eq!(q.head(), None);
        assert!(!q.fits(1));
        q.charge(5);
        q.join(ConnId(1));
        q.leave(ConnId(1));
        assert!(q.is_empty());
    }

    #[test]
    fn random_joins_and_leaves_keep_active_connections_within_a_chunk() {
        // Every connection that stays active gets the same bytes, within
        // one chunk plus a quantum, however others come and go.
        for seed in 0..50 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut q = FairQueue::new(QUANTUM);
            let steady = [ConnId(0), ConnId(1), ConnId(2)];
            for &id in &steady {
                q.join(id);
            }
            let mut sent = [0u64; 8];
            for _ in 0..3000 {
                if rng.u8(..10) == 0 {
                    let id = ConnId(rng.usize(3..8));
                    if rng.bool() { q.join(id) } else { q.leave(id) }
                }
                let id = q.head().unwrap();
                let len = if id.0 == 1 { 3 * QUANTUM / 2 } else { QUANTUM };
                if q.fits(len) {
                    q.charge(len);
                    sent[id.0] += len;
                }
            }
            let steady_sent: Vec<u64> = steady.iter().map(|c| sent[c.0]).collect();
            let (lo, hi) = (
                *steady_sent.iter().min().unwrap(),
                *steady_sent.iter().max().unwrap(),
            );
            assert!(
                hi - lo <= 3 * QUANTUM,
                "seed {seed}: steady connections got {steady_sent:?}"
            );
        }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn nobody_rotates_without_a_recent_refusal_or_below_the_cap() {
        let t0 = Instant::now();
        let mut r = Rotation::new(RotationConfig::default());
        r.handle_accepted(ConnId(1), t0);
        assert_eq!(r.poll_rotate(true, t0 + secs(100)), None);
        assert_eq!(r.poll_timeout(), None);
        r.handle_refused(t0 + secs(100));
        assert_eq!(r.poll_rotate(false, t0 + secs(101)), None);
        // Too long ago: the refused peer found a slot elsewhere or gave up.
        assert_eq!(r.poll_rotate(true, t0 + secs(111)), None);
        assert_eq!(r.poll_rotate(true, t0 + secs(112)), None);
        assert!(!r.is_leaving(ConnId(1)));
    }

    #[test]
    fn the_longest_served_makes_room_once_its_turn_is_over() {
        let t0 = Instant::now();
        let cfg = RotationConfig::default();
        let mut r = Rotation::new(cfg);
        r.handle_accepted(ConnId(4), t0);
        r.handle_accepted(ConnId(5), t0 + secs(5));
        // Refused at 25 s: 4's turn ends at 30 s, within the window.
        r.handle_refused(t0 + secs(25));
        assert_eq!(r.poll_rotate(true, t0 + secs(25)), None);
        assert_eq!(r.poll_timeout(), Some(t0 + cfg.turn));
        assert_eq!(r.poll_rotate(true, t0 + secs(30)), Some(ConnId(4)));
        assert!(r.is_leaving(ConnId(4)));
        // One refusal, one rotation.
        assert_eq!(r.poll_rotate(true, t0 + secs(31)), None);
        assert_eq!(r.poll_timeout(), Some(t0 + secs(30) + cfg.drain));
        // 4 drained its replies in time and was closed.
        r.handle_closed(ConnId(4));
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(r.poll_expired(t0 + secs(100)), None);
        // The next refusal rotates 5, the oldest left.
        r.handle_refused(t0 + secs(40));
        assert_eq!(r.poll_rotate(true, t0 + secs(40)), Some(ConnId(5)));
    }

    #[test]
    fn a_leaving_connection_that_never_drains_is_closed_at_its_deadline() {
        let t0 = Instant::now();
        let cfg = RotationConfig::default();
        let mut r = Rotation::new(cfg);
        r.handle_accepted(ConnId(2), t0);
        r.handle_refused(t0 + secs(31));
        assert_eq!(r.poll_rotate(true, t0 + secs(31)), Some(ConnId(2)));
        let due = t0 + secs(31) + cfg.drain;
        assert_eq!(r.poll_expired(due - secs(1)), None);
        assert_eq!(r.poll_expired(due), Some(ConnId(2)));
        assert_eq!(r.poll_expired(due), None);
        assert!(!r.is_leaving(ConnId(2)));
    }

    #[test]
    fn a_turn_that_ends_after_the_window_sets_no_deadline() {
        let t0 = Instant::now();
        let mut r = Rotation::new(RotationConfig::default());
        r.handle_accepted(ConnId(3), t0);
        r.handle_refused(t0 + secs(1));
        // 3's turn ends at 30 s, the refusal is stale by 11 s.
        assert_eq!(r.poll_timeout(), None);
        // A reused slab key starts a new turn.
        r.handle_accepted(ConnId(3), t0 + secs(50));
        r.handle_refused(t0 + secs(60));
        assert_eq!(r.poll_rotate(true, t0 + secs(60)), None);
    }
}
