//! The mio plumbing both binaries share: buffered framed connections, stdin
//! and signals as event sources, and deadline arithmetic for poll timeouts.
//! Nothing here knows the protocol's rules; that lives in the pure cores.

pub mod allow;
mod conn;
pub mod noise;
mod stdin;

pub use conn::{CloseReason, Conn, Flow, HANDSHAKE_TIMEOUT, NEEDS_KEY, ReadEnd};
pub use stdin::StdinLines;

use std::time::{Duration, Instant};

/// A connection's key in its event loop's slab (and its mio `Token`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub usize);

/// Bytes read from one connection per loop turn before the others get their
/// turn; the connection is revisited on the next turn.
pub const READ_BUDGET: usize = 4 << 20;

/// Connections the kernel may hold completed but not yet accepted. mio's
/// `TcpListener::bind` asks for 128, like std: a burst of thousands of
/// peers connecting at once then overflows the queue while one loop turn
/// runs, and every dropped handshake waits for TCP's retransmits (1 s,
/// 3 s, 7 s, 15 s...), or hangs half-open until the client times out. The
/// kernel caps this at `net.core.somaxconn` (4096 by default).
pub const LISTEN_BACKLOG: i32 = 65535;

/// A nonblocking listener on `addr` with [`LISTEN_BACKLOG`] (otherwise
/// as mio's `TcpListener::bind`: `SO_REUSEADDR`, close-on-exec).
pub fn listen(addr: std::net::SocketAddr) -> std::io::Result<mio::net::TcpListener> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    let family = match addr {
        std::net::SocketAddr::V4(_) => AddressFamily::INET,
        std::net::SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let fd = rustix::net::socket_with(
        family,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    rustix::net::sockopt::set_socket_reuseaddr(&fd, true)?;
    rustix::net::bind(&fd, &addr)?;
    rustix::net::listen(&fd, LISTEN_BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(
        std::net::TcpListener::from(fd),
    ))
}

/// Accepting connections without ever wedging: a spare descriptor is kept
/// so that, when the process is out of descriptors (EMFILE), the waiting
/// connection can still be accepted, told `Busy` and closed, rather than
/// left in the queue where an edge-triggered listener never reports it
/// again.
pub struct Acceptor {
    reserve: Option<std::fs::File>,
    /// The last round ended before the queue was empty: accept again on the
    /// next turn, since no new edge will announce what still waits.
    retry: bool,
    /// Connections turned away over the cap since [`Acceptor::take_refused`].
    refused: usize,
}

/// Accept errors in a row (other than running out of descriptors) before a
/// round gives up and retries next turn.
const MAX_ACCEPT_ERRORS: usize = 64;

/// Wait before accepting again after a round that could not finish.
const ACCEPT_RETRY: Duration = Duration::from_millis(20);

impl Acceptor {
    pub fn new() -> Acceptor {
        Acceptor {
            reserve: open_reserve(),
            retry: false,
            refused: 0,
        }
    }

    /// Whether connections may still wait from an unfinished round.
    pub fn wants_retry(&self) -> bool {
        self.retry
    }

    /// Accepts every waiting connection (until `WouldBlock`), Nagle off.
    /// The first `room` come back unregistered; each beyond that is told
    /// `Busy` with `why` and closed at once, so a burst over the cap never
    /// holds descriptors.
    pub fn accept(
        &mut self,
        listener: &mio::net::TcpListener,
        room: usize,
        why: &str,
    ) -> Vec<Conn> {
        self.retry = false;
        let mut accepted = Vec::new();
        let (mut errors, mut refused) = (0, 0);
        loop {
            match listener.accept() {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let conn = Conn::new(stream, addr);
                    if accepted.len() < room {
                        accepted.push(conn);
                    } else {
                        conn.refuse_busy(why.to_string());
                        refused += 1;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if is_out_of_descriptors(&e) => {
                    if !self.refuse_one_with_reserve(listener) {
                        log::warn!("accept failed: {e}; retrying next turn");
                        self.retry = true;
                        break;
                    }
                }
                Err(e) => {
                    log::debug!("accept failed: {e}");
                    errors += 1;
                    if errors >= MAX_ACCEPT_ERRORS {
                        self.retry = true;
                        break;
                    }
                }
            }
        }
        self.refused += refused;
        if refused > 0 {
            // One line per burst, not one per connection.
            log::warn!("refused {refused} connections as busy: {why}");
        }
        accepted
    }

    /// How many were turned away over the cap since the last call (a
    /// seeder rotates who it serves when peers are waiting).
    pub fn take_refused(&mut self) -> usize {
        std::mem::take(&mut self.refused)
    }

    /// When to try again after an unfinished round: soon, but not a spin
    /// while the process is out of descriptors.
    pub fn retry_at(&self, now: Instant) -> Option<Instant> {
        self.retry.then(|| now + ACCEPT_RETRY)
    }

    /// Out of descriptors: frees the spare one to accept a waiting
    /// connection, tells it Busy, closes it, and takes the spare back.
    fn refuse_one_with_reserve(&mut self, listener: &mio::net::TcpListener) -> bool {
        if self.reserve.take().is_none() {
            self.reserve = open_reserve();
            return false;
        }
        let refused = match listener.accept() {
            Ok((stream, addr)) => {
                log::warn!("out of file descriptors: refusing {addr} as busy");
                Conn::new(stream, addr).refuse_busy("out of file descriptors".into());
                true
            }
            Err(_) => false,
        };
        self.reserve = open_reserve();
        refused
    }
}

impl Default for Acceptor {
    fn default() -> Self {
        Acceptor::new()
    }
}

fn open_reserve() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(code) if code == rustix::io::Errno::MFILE.raw_os_error()
            || code == rustix::io::Errno::NFILE.raw_os_error()
    )
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
