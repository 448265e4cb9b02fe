//! The mio plumbing both binaries share: buffered framed connections, stdin
//! and signals as event sources, and deadline arithmetic for poll timeouts.
//! Nothing here knows the protocol's rules; that lives in the pure cores.

mod conn;
pub mod noise;
mod stdin;

pub use conn::{CloseReason, Conn, Flow, HANDSHAKE_TIMEOUT, IoStatus, NEEDS_KEY, ReadEnd};
pub use stdin::StdinLines;

use std::time::{Duration, Instant};

/// A connection's key in its event loop's slab (and its mio `Token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// Bytes read from one connection per loop turn before the others get their
/// turn; the connection is revisited on the next turn.
pub const READ_BUDGET: usize = 4 << 20;

/// Accepts every connection waiting on `listener` (edge-triggered: until
/// `WouldBlock`), with Nagle off, as unregistered `Conn`s. An accept error
/// (EMFILE and friends) is logged and ends the round; the next event retries.
pub fn accept_pending(listener: &mio::net::TcpListener) -> Vec<Conn> {
    let mut accepted = Vec::new();
    loop {
        match listener.accept() {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                accepted.push(Conn::new(stream, addr));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::warn!("accept failed: {e}");
                break;
            }
        }
    }
    accepted
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The poll timeout that wakes the loop at `deadline` (rounded up to a whole
/// millisecond so a timer is never fired a hair early and spun on).
pub fn timeout_until(deadline: Option<Instant>, now: Instant) -> Option<Duration> {
    deadline.map(|d| {
        let left = d.saturating_duration_since(now);
        let ms = left.as_micros().div_ceil(1000) as u64;
        Duration::from_millis(ms)
    })
}

/// SIGINT and SIGTERM as a mio event source, so Ctrl-C is handled by the
/// event loop like any other event (graceful goodbye, partial files saved).
pub fn shutdown_signals() -> std::io::Result<signal_hook_mio::v1_0::Signals> {
    signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn earliest_picks_the_sooner_deadline() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        assert_eq!(earliest(Some(now), Some(later)), Some(now));
        assert_eq!(earliest(None, Some(later)), Some(later));
        assert_eq!(earliest(None, None), None);
    }

    #[test]
    fn timeout_rounds_up_to_whole_millis() {
        let now = Instant::now();
        let t = timeout_until(Some(now + Duration::from_micros(1500)), now);
        assert_eq!(t, Some(Duration::from_millis(2)));
        assert_eq!(
            timeout_until(Some(now), now + Duration::from_secs(1)),
            Some(Duration::ZERO)
        );
        assert_eq!(timeout_until(None, now), None);
    }
}
