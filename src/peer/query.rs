//! `peer --manager ADDR peers|files`: ask the manager one question without
//! joining, print the answer, exit. Same link core and the same kind of
//! event loop as a full peer, just with one connection.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::{Events, Poll, Token};

use super::link::{LinkAction, LinkConfig, LinkEvent, LinkMode, ManagerLink, Query};
use super::node::NodeError;
use super::output;
use crate::net::{self, CloseReason, Conn, Flow, ReadEnd};
use crate::wire::accept;

const MANAGER: Token = Token(0);

/// Asks `query` and returns the answer formatted for printing.
pub fn ask(manager: SocketAddr, query: Query) -> Result<String, NodeError> {
    let unreachable = |why: String| {
        NodeError::Manager(format!(
            "cannot reach the manager at {manager}: {why} (is it running? see --manager)"
        ))
    };
    let mut poll =
        Poll::new().map_err(|e| NodeError::Setup(format!("cannot create the event loop: {e}")))?;
    let mut link = ManagerLink::new(LinkMode::QueryOnly, LinkConfig::default(), Instant::now());
    link.ask(query);
    let mut conn: Option<Conn> = None;
    let mut connected = false;
    let mut events = Events::with_capacity(16);
    loop {
        while let Some(action) = link.poll_action() {
            match action {
                LinkAction::Connect => {
                    let c = Conn::connect(manager, poll.registry(), MANAGER, accept::LINK)
                        .map_err(|e| unreachable(e.to_string()))?;
                    conn = Some(c);
                }
                LinkAction::Send(msg) => {
                    if let Some(c) = conn.as_mut() {
                        c.send(&msg);
                    }
                }
                LinkAction::Close => {}
                LinkAction::Event(LinkEvent::Peers(peers)) => {
                    return Ok(output::peer_entries(&peers, None));
                }
                LinkAction::Event(LinkEvent::Files(files)) => {
                    return Ok(output::network_files(&files));
                }
                LinkAction::Event(LinkEvent::Lost { .. }) => {
                    return Err(unreachable("connection lost or refused".into()));
                }
                LinkAction::Event(LinkEvent::Refused(why)) => return Err(NodeError::Manager(why)),
                LinkAction::Event(_) => {}
            }
        }
        if let (Some(c), true) = (conn.as_mut(), connected) {
            c.flush()
                .and_then(|_| c.sync_interest(poll.registry(), MANAGER))
                .map_err(|e| unreachable(e.to_string()))?;
        }
        let now = Instant::now();
        if let Err(e) = poll.poll(&mut events, net::timeout_until(link.poll_timeout(), now))
            && e.kind() != io::ErrorKind::Interrupted
        {
            return Err(NodeError::Loop(e));
        }
        let now = Instant::now();
        if !events.is_empty() {
            let Some(c) = conn.as_mut() else { continue };
            if !connected {
                match c.is_connected() {
                    Ok(true) => {
                        connected = true;
                        link.handle_connected(now);
                    }
                    Ok(false) => continue,
                    Err(e) => return Err(unreachable(e.to_string())),
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
                    ReadEnd::Open { revisit: false } => {}
                    ReadEnd::Closed(CloseReason::BadFrame(e)) => {
                        return Err(unreachable(e.to_string()));
                    }
                    ReadEnd::Closed(_) => link.handle_disconnected(now),
                }
                break;
            }
        }
        link.handle_timeout(now);
    }
}
