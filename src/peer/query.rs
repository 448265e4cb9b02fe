//! `peer --manager ADDR peers|files`: ask the manager one question without
//! joining, return the answer, exit. Same link core and the same kind of
//! event loop as a full peer, just with one connection, and a hard bound on
//! the whole exchange so a manager that is down, unreachable or mute is
//! reported within [`QUERY_LIMIT`].

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token};

use super::link::{LinkAction, LinkConfig, LinkEvent, LinkMode, ManagerLink, Query};
use super::node::NodeError;
use crate::net::noise::Keys;
use crate::net::{self, CloseReason, Conn, Flow, ReadEnd};
use crate::wire::{NetworkFile, PeerEntry, accept};

const MANAGER: Token = Token(0);

/// The whole question, from connect to answer, must take less than this.
pub const QUERY_LIMIT: Duration = Duration::from_secs(4);

/// What the manager answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Peers(Vec<PeerEntry>),
    /// A network above the full-list limit: the first page, and the total.
    PeerPage {
        peers: Vec<PeerEntry>,
        total: u32,
    },
    Files(Vec<NetworkFile>),
}

/// How far the exchange got, for an error that says what to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connecting,
    Connected,
}

/// Asks `query` (`ListPeers` or `ListFiles`) and returns the answer.
/// With `keys` the connection is sealed (a keyed network).
pub fn ask(manager: SocketAddr, query: Query, keys: Option<&Keys>) -> Result<Answer, NodeError> {
    ask_checked(manager, query, keys, |_| Ok(()))
}

/// [`ask`], with `check_key` judging the static key a sealed manager
/// proves before anything is asked (see [`crate::peer::check_manager_key`]);
/// its error ends the query.
pub fn ask_checked(
    manager: SocketAddr,
    query: Query,
    keys: Option<&Keys>,
    mut check_key: impl FnMut(crate::wire::PeerKey) -> Result<(), String>,
) -> Result<Answer, NodeError> {
    let start = Instant::now();
    let deadline = start + QUERY_LIMIT;
    let mut q = OneQuery::new(manager, query, start)?;
    let mut events = Events::with_capacity(16);
    loop {
        if let Some(answer) = q.apply_link_actions(keys)? {
            return Ok(answer);
        }
        if let (Some(c), Stage::Connected) = (q.conn.as_mut(), q.stage) {
            c.flush()
                .and_then(|_| c.sync_interest(q.poll.registry(), MANAGER))
                .map_err(|e| q.refused(e.to_string()))?;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(q.silent());
        }
        let timeout = net::timeout_until(net::earliest(q.link.poll_timeout(), Some(deadline)), now);
        if let Err(e) = q.poll.poll(&mut events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(NodeError::Loop(e));
        }
        let now = Instant::now();
        if !events.is_empty() && q.connected(&events, now)? {
            q.read(now, &mut check_key)?;
        }
        q.link.handle_timeout(now);
    }
}

/// The one connection of a query and how far it got.
struct OneQuery {
    manager: SocketAddr,
    poll: Poll,
    link: ManagerLink,
    conn: Option<Conn>,
    stage: Stage,
    /// Why the connection closed, if it did before an answer came out.
    closed: Option<NodeError>,
}

impl OneQuery {
    fn new(manager: SocketAddr, query: Query, now: Instant) -> Result<OneQuery, NodeError> {
        let poll = Poll::new()
            .map_err(|e| NodeError::Setup(format!("cannot create the event loop: {e}")))?;
        // The hard deadline reports a mute manager; the link's own timeout
        // must not fire first and reconnect.
        let config = LinkConfig {
            connect_timeout: QUERY_LIMIT + Duration::from_secs(1),
            ..LinkConfig::default()
        };
        let mut link = ManagerLink::new(LinkMode::QueryOnly, config, now);
        link.ask(query);
        Ok(OneQuery {
            manager,
            poll,
            link,
            conn: None,
            stage: Stage::Connecting,
            closed: None,
        })
    }

    fn refused(&self, why: String) -> NodeError {
        let manager = self.manager;
        NodeError::Manager(format!(
            "cannot reach the manager at {manager}: {why} (is the manager running there? check --manager)"
        ))
    }

    fn silent(&self) -> NodeError {
        let (manager, secs) = (self.manager, QUERY_LIMIT.as_secs());
        NodeError::Manager(match self.stage {
            Stage::Connecting => format!(
                "no answer from the manager at {manager} within {secs} s (check --manager, and that no firewall drops the connection)"
            ),
            Stage::Connected => format!(
                "the manager at {manager} took the connection but did not answer within {secs} s (is a shoal manager listening there? check --manager)"
            ),
        })
    }

    /// Does what the link asks; the answer, once it has one.
    fn apply_link_actions(&mut self, keys: Option<&Keys>) -> Result<Option<Answer>, NodeError> {
        while let Some(action) = self.link.poll_action() {
            match action {
                LinkAction::Connect => {
                    let registry = self.poll.registry();
                    let mut c = Conn::connect(self.manager, registry, MANAGER, accept::LINK)
                        .map_err(|e| self.refused(e.to_string()))?;
                    if let Some(keys) = keys {
                        c.seal(keys, true, Instant::now());
                    }
                    self.conn = Some(c);
                }
                LinkAction::Send(msg) => {
                    if let Some(c) = self.conn.as_mut() {
                        c.send(&msg);
                    }
                }
                LinkAction::Close => {}
                LinkAction::Event(LinkEvent::Peers(peers)) => {
                    return Ok(Some(Answer::Peers(peers)));
                }
                LinkAction::Event(LinkEvent::PeerPage { peers, total }) => {
                    return Ok(Some(Answer::PeerPage { peers, total }));
                }
                LinkAction::Event(LinkEvent::Files(files)) => {
                    return Ok(Some(Answer::Files(files)));
                }
                LinkAction::Event(LinkEvent::Lost { .. }) => {
                    return Err(self.closed.take().unwrap_or_else(|| self.silent()));
                }
                LinkAction::Event(LinkEvent::Refused(why)) => return Err(NodeError::Manager(why)),
                LinkAction::Event(_) => {}
            }
        }
        Ok(None)
    }

    /// Whether the connection is up (finishing the connect if these events
    /// say how it went).
    fn connected(&mut self, events: &Events, now: Instant) -> Result<bool, NodeError> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(false);
        };
        if self.stage == Stage::Connected {
            return Ok(true);
        }
        match c.is_connected() {
            Ok(true) => {
                self.stage = Stage::Connected;
                self.link.handle_connected(now);
                Ok(true)
            }
            Ok(false) if events.iter().any(|e| e.is_error() || e.is_write_closed()) => {
                Err(self.refused("connection refused".into()))
            }
            Ok(false) => Ok(false),
            Err(e) => Err(self.refused(e.to_string())),
        }
    }

    /// Reads what the manager sent into the link, all of it (one connection
    /// only, so a burst is read now).
    fn read(
        &mut self,
        now: Instant,
        check_key: &mut impl FnMut(crate::wire::PeerKey) -> Result<(), String>,
    ) -> Result<(), NodeError> {
        let manager = self.manager;
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        loop {
            let link = &mut self.link;
            let end = c.read_frames(|msg| {
                link.handle_message(msg, now);
                Flow::Continue
            });
            match end {
                ReadEnd::Open { revisit: true } => continue,
                ReadEnd::Open { revisit: false } => return Ok(()),
                ReadEnd::Authenticated(key) => {
                    check_key(key).map_err(NodeError::Manager)?;
                    let flushed = c
                        .flush()
                        .and_then(|_| c.sync_interest(self.poll.registry(), MANAGER));
                    if let Err(e) = flushed {
                        return Err(self.refused(e.to_string()));
                    }
                }
                ReadEnd::Closed(CloseReason::Handshake(e)) => {
                    return Err(NodeError::Manager(format!("the manager at {manager}: {e}")));
                }
                ReadEnd::Closed(CloseReason::BadFrame(e)) => {
                    return Err(NodeError::Manager(format!(
                        "the manager at {manager} sent a bad frame: {e}"
                    )));
                }
                ReadEnd::Closed(why) => {
                    // An answer read just before the close still comes out
                    // of the link first; the error is for when none did.
                    self.closed = Some(match why {
                        CloseReason::Io(e) => self.refused(e.to_string()),
                        _ => NodeError::Manager(format!(
                            "the manager at {manager} closed the connection without answering (is a shoal manager listening there? check --manager)"
                        )),
                    });
                    self.link.handle_disconnected(now);
                    return Ok(());
                }
            }
        }
    }
}
