//! The manager's event loop: one mio `Poll` over the listener, every peer
//! connection (in a slab), stdin and the shutdown signals. It only moves
//! bytes: decoded frames go to the [`Registry`], and the registry's actions
//! come back out as frames to send and connections to close.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::registry::{Action, Registry, RegistryConfig};
use super::stats::{ConnState, ManagerStats};
use crate::metrics::http::MetricsServer;
use crate::net::allow::{self, AllowList};
use crate::net::noise::Keys;
use crate::net::{self, CloseReason, Conn, ConnId, Flow, ReadEnd, StdinLines};
use crate::wire::Message;

const LISTENER: Token = Token(usize::MAX - 1);
const STDIN: Token = Token(usize::MAX - 2);
const SIGNALS: Token = Token(usize::MAX - 3);

/// Bytes read at a time from a member: its frames are pongs and queries
/// (a `ShareFiles` of up to 1.2 MB still arrives, over more reads).
const MEMBER_READ_CHUNK: usize = 4 << 10;

/// Beyond this many queued outgoing bytes a peer is not reading its socket
/// (hung or stopped): it is dropped rather than grow our memory.
const MAX_OUTBOX: usize = 16 << 20;

/// Loop turns start at least this far apart. Twenty thousand members'
/// keepalives arrive spread over each heartbeat; waking for each would cost
/// a context switch per frame. Napping the rest of this gap before a
/// blocking poll lets one wakeup take everything that arrived meanwhile (at
/// most 1,000 wakeups a second), for at most this much added latency. An idle
/// manager still blocks in the poll at once.
const MIN_TURN_GAP: Duration = Duration::from_millis(1);

/// How the manager is run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub registry: RegistryConfig,
    /// Connections beyond this are refused with a `Busy` error.
    pub max_conns: usize,
    /// The network key and our identity: every connection is sealed.
    /// `None` is an open network (loopback, or `--open`).
    pub keys: Option<Keys>,
    /// Only peers whose key is listed here may join (`--allow FILE`).
    pub allow: Option<AllowList>,
    /// Serve Prometheus metrics on this address (`--metrics`).
    pub metrics: Option<SocketAddr>,
}

pub struct Server {
    poll: Poll,
    listener: TcpListener,
    acceptor: net::Acceptor,
    conns: Slab<Conn>,
    registry: Registry,
    stdin: StdinLines,
    signals: signal_hook_mio::v1_0::Signals,
    /// Connections whose read budget ran out: read again next turn.
    revisit: Vec<ConnId>,
    max_conns: usize,
    stopping: bool,
    keys: Option<Keys>,
    allow: Option<AllowList>,
    /// Sealed connections in their handshake, by deadline (all deadlines
    /// are accept time + the same timeout, so this is in order).
    handshakes: VecDeque<(Instant, ConnId)>,
    hangups: Option<signal_hook_mio::v1_0::Signals>,
    /// The `--metrics` endpoint, if asked for.
    metrics_http: Option<MetricsServer>,
    stats: ManagerStats,
    /// The registry's liveness sweep is what closes connections now.
    sweeping: bool,
    shared_frames: SharedFrames,
    /// When to look at the allow file for a change next.
    allow_check_at: Option<Instant>,
}

const HANGUP: Token = Token(usize::MAX - 4);

impl Server {
    /// Binds the listening socket and sets up the loop.
    pub fn bind(config: ServerConfig) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = net::listen(config.listen)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = net::shutdown_signals()?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let stdin = StdinLines::register(poll.registry(), STDIN);
        let hangups = match &config.allow {
            Some(_) => {
                let mut hup = signal_hook_mio::v1_0::Signals::new([signal_hook::consts::SIGHUP])?;
                poll.registry()
                    .register(&mut hup, HANGUP, Interest::READABLE)?;
                Some(hup)
            }
            None => None,
        };
        let metrics_http = match config.metrics {
            Some(addr) => Some(MetricsServer::bind(addr, poll.registry())?),
            None => None,
        };
        Ok(Server {
            poll,
            listener,
            acceptor: net::Acceptor::new(),
            conns: Slab::new(),
            registry: Registry::new(config.registry),
            stdin,
            signals,
            revisit: Vec::new(),
            max_conns: config.max_conns,
            stopping: false,
            keys: config.keys,
            allow_check_at: config
                .allow
                .as_ref()
                .map(|_| Instant::now() + allow::CHECK_EVERY),
            allow: config.allow,
            handshakes: VecDeque::new(),
            hangups,
            metrics_http,
            stats: ManagerStats::new(),
            sweeping: false,
            shared_frames: SharedFrames::default(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Where `--metrics` listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<io::Result<SocketAddr>> {
        self.metrics_http.as_ref().map(|m| m.local_addr())
    }

    /// Runs until `close`, SIGINT or SIGTERM.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut woke_at = Instant::now();
        for line in self.stdin.take_preloaded() {
            self.handle_command(&line);
        }
        while !self.stopping {
            let now = Instant::now();
            let deadline = net::earliest(
                self.registry.poll_timeout(),
                self.handshakes.front().map(|&(t, _)| t),
            );
            let deadline = net::earliest(deadline, self.acceptor.retry_at(now));
            let deadline = net::earliest(
                deadline,
                self.metrics_http.as_ref().and_then(|m| m.poll_timeout()),
            );
            let deadline = net::earliest(deadline, self.allow_check_at);
            let timeout = if self.revisit.is_empty() {
                nap_before_poll(net::timeout_until(deadline, now), woke_at.elapsed())
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            woke_at = now;
            if self.acceptor.wants_retry() {
                self.accept_all(now);
            }
            for conn in std::mem::take(&mut self.revisit) {
                self.handle_readable(conn, now);
            }
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_all(now),
                    STDIN => {
                        for line in self.stdin.read_lines(self.poll.registry()) {
                            self.handle_command(&line);
                        }
                    }
                    SIGNALS => {
                        if self.signals.pending().next().is_some() {
                            log::info!("signal received, shutting down");
                            self.stopping = true;
                        }
                    }
                    HANGUP => {
                        let hup = self.hangups.as_mut().map(|h| h.pending().count());
                        if hup.unwrap_or(0) > 0
                            && let Some(allow) = &mut self.allow
                            && allow.reload()
                        {
                            self.drop_unlisted(now);
                        }
                    }
                    token if MetricsServer::owns(token) => {
                        if let Some(http) = &mut self.metrics_http {
                            let (stats, conns) = (&self.stats, &self.conns);
                            http.handle_event(token, self.poll.registry(), now, || {
                                render_metrics(stats, conns)
                            });
                        }
                    }
                    Token(key) => {
                        let conn = ConnId(key);
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.handle_readable(conn, now);
                        }
                        if event.is_writable() {
                            self.flush(conn, now);
                        }
                    }
                }
            }
            self.expire_handshakes(now);
            if self.allow_check_at.is_some_and(|at| at <= now) {
                self.allow_check_at = Some(now + allow::CHECK_EVERY);
                if self.allow.as_mut().is_some_and(AllowList::refresh) {
                    self.drop_unlisted(now);
                }
            }
            self.registry.handle_timeout(now);
            // What the core closes now, its sweep closes: a member
            // here timed out (every handler above applied its own actions).
            self.sweeping = true;
            self.apply_actions(now);
            self.sweeping = false;
            if let Some(http) = &mut self.metrics_http {
                http.handle_timeout(self.poll.registry(), now);
            }
            self.stats.handle_turn(now.elapsed());
        }
        log::info!("manager stopped ({} connections closed)", self.conns.len());
        for (_, conn) in self.conns.iter_mut() {
            conn.flush_and_close();
        }
        Ok(())
    }

    fn accept_all(&mut self, now: Instant) {
        let room = self.max_conns.saturating_sub(self.conns.len());
        let why = format!("manager is at its limit of {} connections", self.max_conns);
        for mut conn in self.acceptor.accept(&self.listener, room, &why) {
            let addr = conn.peer_addr();
            let entry = self.conns.vacant_entry();
            let id = ConnId(entry.key());
            if let Err(e) = conn.register(self.poll.registry(), Token(id.0)) {
                log::warn!("cannot register connection from {addr}: {e}");
                continue;
            }
            conn.set_accept(crate::wire::accept::MANAGER_BEFORE_HELLO);
            conn.set_frame_stats(self.stats.frames.clone());
            // Thousands of mostly idle members: no buffer kept between frames.
            conn.set_release_idle_buffers(true);
            conn.set_read_chunk(MEMBER_READ_CHUNK);
            if let Some(keys) = &self.keys {
                conn.seal(keys, false, now);
                self.handshakes
                    .push_back((now + net::HANDSHAKE_TIMEOUT, id));
            }
            entry.insert(conn);
            log::debug!("connection {} from {addr}", id.0);
            self.registry.handle_connected(id, now);
        }
        self.apply_actions(now);
    }

    fn handle_readable(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return; // stale token: already closed this turn
        };
        let remote = conn.peer_addr();
        let registry = &mut self.registry;
        let end = conn.read_frames(|msg| {
            registry.handle_message(id, remote, msg, now);
            // Queue each answer before decoding the next request, so a
            // client that does not read is held by backpressure.
            if registry.has_actions() {
                Flow::Yield
            } else {
                Flow::Expect(registry.accepts(id))
            }
        });
        conn.set_accept(self.registry.accepts(id));
        match end {
            ReadEnd::Open { revisit } => {
                if revisit {
                    self.revisit.push(id);
                }
            }
            ReadEnd::Authenticated(key) => {
                let reread = self.allow.as_mut().is_some_and(AllowList::refresh);
                if let Some(allow) = &self.allow
                    && !allow.contains(&key)
                {
                    log::warn!(
                        "refusing {remote}: its key {key} is not in the allow list {}",
                        allow.path().display()
                    );
                    self.registry.handle_disconnected(id, now);
                    self.close(id);
                } else {
                    log::debug!("{remote}: sealed, key {key}");
                    self.registry.handle_authenticated(id, key);
                    self.flush(id, now);
                    self.revisit.push(id);
                }
                if reread {
                    self.drop_unlisted(now);
                }
            }
            ReadEnd::Closed(why) => {
                match why {
                    CloseReason::Handshake(_) | CloseReason::Tampered(_) => {
                        log::warn!("refusing {remote}: {why}")
                    }
                    _ => log::debug!("{remote}: {why}"),
                }
                self.registry.handle_disconnected(id, now);
                self.close(id);
            }
        }
        self.apply_actions(now);
    }

    /// After the allow list was reread: closes every connection whose proven
    /// key it no longer lists (members leave as on any disconnect, so the
    /// others hear of it in the next broadcast).
    fn drop_unlisted(&mut self, now: Instant) {
        let Some(allow) = &self.allow else {
            return;
        };
        let removed: Vec<(ConnId, crate::wire::PeerKey)> = self
            .conns
            .iter()
            .filter_map(|(i, c)| Some((ConnId(i), c.remote_key()?)))
            .filter(|(_, key)| !allow.contains(key))
            .collect();
        let path = allow.path().display().to_string();
        for (id, key) in removed {
            if let Some(conn) = self.conns.get_mut(id.0) {
                log::warn!(
                    "dropping {}: its key {key} was removed from the allow list {path}",
                    conn.peer_addr(),
                );
                conn.send(&Message::Error {
                    code: crate::wire::ErrorCode::Incompatible,
                    reason: "this peer's key was removed from the manager's allow list".into(),
                });
            }
            self.registry.handle_disconnected(id, now);
            self.close(id);
        }
        self.apply_actions(now);
    }

    /// Closes the sealed connections whose handshake is past its deadline
    /// (a client that sends a byte and stops holds nothing for long).
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.handshakes.front() {
            if at > now {
                break;
            }
            self.handshakes.pop_front();
            let Some(conn) = self.conns.get(id.0) else {
                continue;
            };
            // The slot may hold a newer connection by now: its own
            // deadline decides.
            if conn.handshake_deadline().is_some_and(|d| d <= now) {
                log::warn!(
                    "refusing {}: no handshake within {:?}",
                    conn.peer_addr(),
                    net::HANDSHAKE_TIMEOUT
                );
                self.registry.handle_disconnected(id, now);
                self.close(id);
            }
        }
    }

    fn flush(&mut self, id: ConnId, now: Instant) {
        let Some(conn) = self.conns.get_mut(id.0) else {
            return;
        };
        let result = conn
            .flush()
            .and_then(|_| conn.sync_interest(self.poll.registry(), Token(id.0)));
        if conn.pending_write_bytes() > MAX_OUTBOX || result.is_err() {
            log::warn!(
                "{}: not reading ({} bytes queued) or gone; dropping",
                conn.peer_addr(),
                conn.pending_write_bytes()
            );
            self.registry.handle_disconnected(id, now);
            self.close(id);
        } else if conn.should_resume_reading() {
            self.revisit.push(id);
        }
    }

    fn apply_actions(&mut self, now: Instant) {
        let mut touched = Vec::new();
        while let Some(action) = self.registry.poll_action() {
            match action {
                Action::Send(id, msg) => {
                    if let Some(conn) = self.conns.get_mut(id.0) {
                        if let Message::Welcome { .. } = msg {
                            self.stats.handle_welcome(id);
                        }
                        conn.send(&msg);
                        touched.push(id);
                    }
                }
                // Shared frames (a window's join list, a delta, a ping) are
                // encoded once, whoever they go to.
                Action::SendShared(id, msgs) => {
                    let frames = self.shared_frames.encoded(&msgs);
                    if let Some(conn) = self.conns.get_mut(id.0) {
                        frames.iter().for_each(|f| conn.send_encoded(f));
                        touched.push(id);
                    }
                }
                Action::Broadcast(ids, msgs) => {
                    let frames = self.shared_frames.encoded(&msgs);
                    for id in ids {
                        if let Some(conn) = self.conns.get_mut(id.0) {
                            frames.iter().for_each(|f| conn.send_encoded(f));
                            touched.push(id);
                        }
                    }
                }
                Action::Close(id) => self.close(id),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.flush(id, now);
        }
    }

    fn close(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.try_remove(id.0) {
            self.stats.handle_closed(id, self.sweeping);
            conn.close(self.poll.registry());
        }
    }

    fn handle_command(&mut self, line: &str) {
        let mut out = io::stdout().lock();
        let _ = match line {
            "" => Ok(()),
            "peers" => {
                let peers = self.registry.peer_list();
                let mut text = format!("{} live peers\n", peers.len());
                for p in peers {
                    text += &format!("  {:<6} {}\n", p.id.to_string(), p.addr);
                }
                out.write_all(text.as_bytes())
            }
            "files" => {
                let files = self.registry.network_files();
                let mut text = format!("{} files on the network\n", files.len());
                for f in files {
                    text += &format!(
                        "  {:<32} {:>12} bytes  {} holders  {}\n",
                        f.name,
                        f.size,
                        f.holders,
                        f.root.short()
                    );
                }
                out.write_all(text.as_bytes())
            }
            "close" | "c" | "quit" => {
                log::info!("close requested on stdin");
                self.stopping = true;
                Ok(())
            }
            "help" | "?" => out.write_all(b"commands: peers, files, close (c)\n"),
            other => writeln!(out, "unknown command {other:?}; try: peers, files, close"),
        };
        let _ = out.flush();
    }
}

/// The `--metrics` page: the counters, and each open connection's state.
/// Sleeps out what is left of [`MIN_TURN_GAP`] since the last wakeup (no
/// longer than the poll would wait anyway) and returns the poll's timeout
/// less the nap. A turn with work waiting (`Some(ZERO)`) never naps.
fn nap_before_poll(timeout: Option<Duration>, since_woke: Duration) -> Option<Duration> {
    let rest = MIN_TURN_GAP.saturating_sub(since_woke);
    let nap = timeout.map_or(rest, |t| t.min(rest));
    if nap.is_zero() {
        return timeout;
    }
    std::thread::sleep(nap);
    timeout.map(|t| t - nap)
}

/// The bytes of the last shared frames the registry handed out, so that the
/// join list a whole broadcast window shares is encoded once, not per joiner.
#[derive(Default)]
struct SharedFrames {
    last: Option<(Rc<[Message<'static>]>, EncodedFrames)>,
}

/// Frames as bytes, one `Vec` each (so each is counted by its kind).
type EncodedFrames = Rc<[Vec<u8>]>;

impl SharedFrames {
    fn encoded(&mut self, msgs: &Rc<[Message<'static>]>) -> EncodedFrames {
        if let Some((m, frames)) = &self.last
            && Rc::ptr_eq(m, msgs)
        {
            return frames.clone();
        }
        let frames: EncodedFrames = msgs
            .iter()
            .map(|msg| {
                let mut frame = Vec::new();
                crate::wire::encode(msg, &mut frame);
                frame
            })
            .collect();
        self.last = Some((msgs.clone(), frames.clone()));
        frames
    }
}

fn render_metrics(stats: &ManagerStats, conns: &Slab<Conn>) -> String {
    stats.render(conns.iter().map(|(key, conn)| {
        if conn.handshake_deadline().is_some() {
            ConnState::Handshake
        } else if stats.is_member(ConnId(key)) {
            ConnState::Member
        } else {
            ConnState::Other
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PeerId;

    #[test]
    fn shared_frames_are_encoded_once_and_match_the_encoder() {
        let ping = Message::Ping { nonce: 7 };
        let count = Message::PeerCount { total: 20_000 };
        let msgs: Rc<[Message<'static>]> = Rc::new([count.clone(), ping.clone()]);
        let mut shared = SharedFrames::default();
        let first = shared.encoded(&msgs);
        let again = shared.encoded(&msgs.clone());
        assert!(Rc::ptr_eq(&first, &again), "encoded a second time");
        for (frame, msg) in first.iter().zip([count, ping]) {
            let mut expected = Vec::new();
            crate::wire::encode(&msg, &mut expected);
            assert_eq!(frame, &expected);
        }
        // Another broadcast: encoded anew.
        let other: Rc<[Message<'static>]> = Rc::new([Message::PeerDelta {
            added: Vec::new(),
            removed: vec![PeerId(3)],
        }]);
        let third = shared.encoded(&other);
        assert!(!Rc::ptr_eq(&first, &third));
        assert_eq!(third.len(), 1);
    }
}
