//! What `manager --metrics` reports, counted by the shell as it moves
//! bytes: membership is seen in the frames and closes the shell already
//! handles (a `Welcome` sent is a join; a member's connection closed is a
//! leave, or a timeout when the registry's sweep closed it), so the
//! registry core needs no hook. Every metric is in docs/METRICS.md.

use std::rc::Rc;
use std::time::Duration;

use fixedbitset::FixedBitSet;

use crate::metrics::{self, Encoder, FrameStats, Histogram};
use crate::net::ConnId;

/// Counters and gauges of one manager process.
pub struct ManagerStats {
    /// Frame bytes by kind, shared with every connection.
    pub frames: Rc<FrameStats>,
    /// Connections (by slab key) that are members: got a `Welcome`.
    members: FixedBitSet,
    live: u64,
    joins: u64,
    leaves: u64,
    timeouts: u64,
    turn_max: Duration,
    turns: Histogram,
}

/// Where a connection stands, for `shoal_manager_connections{state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// A sealed connection still in its Noise handshake.
    Handshake,
    /// A registered peer.
    Member,
    /// Anything else: before its `Register`, or a one-shot query.
    Other,
}

impl Default for ManagerStats {
    fn default() -> Self {
        ManagerStats {
            frames: Rc::new(FrameStats::new()),
            members: FixedBitSet::new(),
            live: 0,
            joins: 0,
            leaves: 0,
            timeouts: 0,
            turn_max: Duration::ZERO,
            turns: Histogram::new(&metrics::TURN_BUCKETS),
        }
    }
}

impl ManagerStats {
    pub fn new() -> ManagerStats {
        ManagerStats::default()
    }

    /// A `Welcome` went to `conn`: it joined.
    pub fn handle_welcome(&mut self, conn: ConnId) {
        if conn.0 >= self.members.len() {
            self.members.grow((conn.0 + 1).next_power_of_two());
        }
        if !self.members.put(conn.0) {
            self.live += 1;
            self.joins += 1;
        }
    }

    /// `conn` was closed; `swept` if the registry's liveness sweep closed it.
    pub fn handle_closed(&mut self, conn: ConnId, swept: bool) {
        if conn.0 < self.members.len() && self.members.contains(conn.0) {
            self.members.set(conn.0, false);
            self.live -= 1;
            if swept {
                self.timeouts += 1;
            } else {
                self.leaves += 1;
            }
        }
    }

    pub fn is_member(&self, conn: ConnId) -> bool {
        conn.0 < self.members.len() && self.members.contains(conn.0)
    }

    /// One loop turn (from poll's return to the next poll) took `took`.
    pub fn handle_turn(&mut self, took: Duration) {
        self.turn_max = self.turn_max.max(took);
        self.turns.observe(took.as_secs_f64());
    }

    /// The page, given each open connection's state.
    pub fn render(&self, conns: impl Iterator<Item = ConnState>) -> String {
        let mut by_state = [0u64; 3];
        for state in conns {
            by_state[state as usize] += 1;
        }
        let mut out = Encoder::new();
        out.gauge("shoal_manager_peers", "registered live peers", self.live);
        out.counter(
            "shoal_manager_joins_total",
            "peers welcomed since start",
            self.joins,
        );
        out.counter(
            "shoal_manager_leaves_total",
            "members gone by goodbye, disconnect or protocol error",
            self.leaves,
        );
        out.counter(
            "shoal_manager_timeouts_total",
            "members dropped by the liveness sweep (silent past the peer timeout)",
            self.timeouts,
        );
        out.header(
            "shoal_manager_connections",
            "gauge",
            "open peer connections by state",
        );
        for (name, n) in ["handshake", "member", "other"].iter().zip(by_state) {
            out.sample_labeled("shoal_manager_connections", "state", name, n);
        }
        self.frames.encode("shoal_manager", &mut out);
        out.gauge(
            "shoal_manager_loop_turn_max_seconds",
            "longest event-loop turn since start",
            self.turn_max.as_secs_f64(),
        );
        self.turns.encode(
            "shoal_manager_loop_turn_seconds",
            "event-loop turn time, from poll's return to the next poll",
            &mut out,
        );
        metrics::encode_rss("shoal_manager", &mut out);
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_leaves_and_timeouts_follow_members_only() {
        let mut s = ManagerStats::new();
        s.handle_welcome(ConnId(3));
        s.handle_welcome(ConnId(3)); // a repeat is not a second join
        s.handle_welcome(ConnId(200));
        s.handle_closed(ConnId(7), false); // never a member
        s.handle_closed(ConnId(3), false);
        s.handle_closed(ConnId(200), true);
        s.handle_closed(ConnId(200), true);
        assert_eq!((s.live, s.joins, s.leaves, s.timeouts), (0, 2, 1, 1));
        s.handle_welcome(ConnId(3)); // the slot reused by a new peer
        assert!(s.is_member(ConnId(3)));
        let text = s.render([ConnState::Member, ConnState::Other, ConnState::Member].into_iter());
        assert!(text.contains("shoal_manager_peers 1\n"), "{text}");
        assert!(text.contains("shoal_manager_joins_total 3\n"), "{text}");
        assert!(text.contains("shoal_manager_timeouts_total 1\n"), "{text}");
        assert!(
            text.contains("shoal_manager_connections{state=\"member\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_manager_connections{state=\"handshake\"} 0\n"),
            "{text}"
        );
    }
}
