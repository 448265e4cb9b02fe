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
    let refused = |why: String| {
        NodeError::Manager(format!(
            "cannot reach the manager at {manager}: {why} (is the manager running there? check --manager)"
        ))
    };
    let silent = |stage: Stage| {
        let secs = QUERY_LIMIT.as_secs();
        NodeError::Manager(match stage {
            Stage::Connecting => format!(
                "no answer from the manager at {manager} within {secs} s (check --manager, and that no firewall drops the connection)"
            ),
            Stage::Connected => format!(
                "the manager at {manager} took the connection but did not answer within {secs} s (is a shoal manager listening there? check --manager)"
            ),
        })
    };
    let mut poll =
        Poll::new().map_err(|e| NodeError::Setup(format!("cannot create the event loop: {e}")))?;
    // The hard deadline below reports a mute manager; the link's own
    // timeout must not fire first and reconnect.
    let config = LinkConfig {
        connect_timeout: QUERY_LIMIT + Duration::from_secs(1),
        ..LinkConfig::default()
    };
    let mut link = ManagerLink::new(LinkMode::QueryOnly, config, start);
    link.ask(query);
    let mut conn: Option<Conn> = None;
    let mut stage = Stage::Connecting;
    let mut closed: Option<NodeError> = None;
    let mut events = Events::with_capacity(16);
    loop {
        while let Some(action) = link.poll_action() {
            match action {
                LinkAction::Connect => {
                    let mut c = Conn::connect(manager, poll.registry(), MANAGER, accept::LINK)
                        .map_err(|e| refused(e.to_string()))?;
                    if let Some(keys) = keys {
                        c.seal(keys, true, Instant::now());
                    }
                    conn = Some(c);
                }
                LinkAction::Send(msg) => {
                    if let Some(c) = conn.as_mut() {
                        c.send(&msg);
                    }
                }
                LinkAction::Close => {}
                LinkAction::Event(LinkEvent::Peers(peers)) => return Ok(Answer::Peers(peers)),
                LinkAction::Event(LinkEvent::PeerPage { peers, total }) => {
                    return Ok(Answer::PeerPage { peers, total });
                }
                LinkAction::Event(LinkEvent::Files(files)) => return Ok(Answer::Files(files)),
                LinkAction::Event(LinkEvent::Lost { .. }) => {
                    return Err(closed.take().unwrap_or_else(|| silent(stage)));
                }
                LinkAction::Event(LinkEvent::Refused(why)) => return Err(NodeError::Manager(why)),
                LinkAction::Event(_) => {}
            }
        }
        if let (Some(c), Stage::Connected) = (conn.as_mut(), stage) {
            c.flush()
                .and_then(|_| c.sync_interest(poll.registry(), MANAGER))
                .map_err(|e| refused(e.to_string()))?;
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(silent(stage));
        }
        let timeout = net::timeout_until(net::earliest(link.poll_timeout(), Some(deadline)), now);
        if let Err(e) = poll.poll(&mut events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(NodeError::Loop(e));
        }
        let now = Instant::now();
        if !events.is_empty() {
            let Some(c) = conn.as_mut() else { continue };
            if stage == Stage::Connecting {
                match c.is_connected() {
                    Ok(true) => {
                        stage = Stage::Connected;
                        link.handle_connected(now);
                    }
                    Ok(false) if events.iter().any(|e| e.is_error() || e.is_write_closed()) => {
                        return Err(refused("connection refused".into()));
                    }
                    Ok(false) => continue,
                    Err(e) => return Err(refused(e.to_string())),
                }
            }
            loop {
                let end = c.read_frames(|msg| {
                    link.handle_message(msg, now);
                    Flow::Continue
                });
                match end {
                    // One connection only: read the rest of a burst now.
                    ReadEnd::Open { revisit: true } => continue,
                    ReadEnd::Authenticated(key) => {
                        check_key(key).map_err(NodeError::Manager)?;
                        c.flush()
                            .and_then(|_| c.sync_interest(poll.registry(), MANAGER))
                            .map_err(|e| refused(e.to_string()))?;
                        continue;
                    }
                    ReadEnd::Closed(CloseReason::Handshake(e)) => {
                        return Err(NodeError::Manager(format!("the manager at {manager}: {e}")));
                    }
                    ReadEnd::Open { revisit: false } => {}
                    ReadEnd::Closed(CloseReason::BadFrame(e)) => {
                        return Err(NodeError::Manager(format!(
                            "the manager at {manager} sent a bad frame: {e}"
                        )));
                    }
                    ReadEnd::Closed(why) => {
                        // An answer read just before the close still comes
                        // out of the link first; the error is for when none did.
                        closed = Some(match why {
                            CloseReason::Io(e) => refused(e.to_string()),
                            _ => NodeError::Manager(format!(
                                "the manager at {manager} closed the connection without answering (is a shoal manager listening there? check --manager)"
                            )),
                        });
                        link.handle_disconnected(now);
                    }
                }
                break;
            }
        }
        link.handle_timeout(now);
    }
}
