//! The peer's connection to the manager: connecting, moving frames between
//! the socket and the [`ManagerLink`] core, and acting on what the link reports.

use std::time::Instant;

use super::*;
use crate::net::{Conn, Flow, ReadEnd};
use crate::peer::link::{LinkAction, LinkEvent, Query};
use crate::wire::accept;

impl Node {
    pub(super) fn handle_manager_event(&mut self, event: &mio::event::Event, now: Instant) {
        let Some(conn) = self.manager_conn.as_mut() else {
            return;
        };
        if !self.manager_connected {
            match conn.is_connected() {
                Ok(true) => {
                    self.manager_connected = true;
                    log::debug!("connected to the manager at {}", self.config.manager);
                    self.link.handle_connected(now);
                }
                Ok(false) if !event.is_error() && !event.is_write_closed() => return,
                Ok(false) => return self.manager_lost(now, "connection refused".into()),
                Err(e) => return self.manager_lost(now, e.to_string()),
            }
        }
        self.handle_manager_readable(now);
    }

    pub(super) fn handle_manager_readable(&mut self, now: Instant) {
        if !self.manager_connected {
            return;
        }
        let Some(conn) = self.manager_conn.as_mut() else {
            return;
        };
        let link = &mut self.link;
        let end = conn.read_frames(|msg| {
            link.handle_message(msg, now);
            Flow::Continue
        });
        match end {
            ReadEnd::Open { revisit } => self.revisit_manager |= revisit,
            ReadEnd::Authenticated(key) => {
                let addr = self.config.manager;
                let dirs = Some(self.store.dirs());
                if let Err(why) =
                    crate::peer::check_manager_key(dirs, addr, key, self.config.manager_key)
                {
                    // Not retried: the same manager would prove the same key.
                    log::error!("{why}");
                    if let Some(conn) = self.manager_conn.take() {
                        conn.close(self.poll.registry());
                    }
                    self.manager_connected = false;
                    self.finish(Err(NodeError::Manager(why)));
                    return;
                }
                self.revisit_manager = true;
            }
            ReadEnd::Closed(why) => {
                if let crate::net::CloseReason::Handshake(_) = why {
                    log::error!("the manager at {}: {why}", self.config.manager);
                }
                return self.manager_lost(now, why.to_string());
            }
        }
        self.apply_link_actions(now);
        self.flush_manager(now);
    }

    pub(super) fn manager_lost(&mut self, now: Instant, why: String) {
        if let Some(mut conn) = self.manager_conn.take() {
            conn.deregister(self.poll.registry());
        }
        self.manager_connected = false;
        log::debug!("manager connection lost: {why}");
        self.link.handle_disconnected(now);
        self.apply_link_actions(now);
    }

    pub(super) fn flush_manager(&mut self, now: Instant) {
        let Some(conn) = self.manager_conn.as_mut() else {
            return;
        };
        if !self.manager_connected {
            return;
        }
        if let Err(e) = conn
            .flush()
            .and_then(|_| conn.sync_interest(self.poll.registry(), MANAGER))
        {
            self.manager_lost(now, e.to_string());
        }
    }

    pub(super) fn apply_link_actions(&mut self, now: Instant) {
        while let Some(action) = self.link.poll_action() {
            match action {
                LinkAction::Connect => self.connect_manager(now),
                LinkAction::Send(msg) => {
                    if let Some(conn) = self.manager_conn.as_mut() {
                        conn.send(&msg);
                    }
                }
                LinkAction::Close => {
                    if let Some(conn) = self.manager_conn.take() {
                        conn.close(self.poll.registry());
                    }
                    self.manager_connected = false;
                }
                LinkAction::Event(event) => self.handle_link_event(event, now),
            }
        }
        self.flush_manager(now);
    }

    pub(super) fn connect_manager(&mut self, now: Instant) {
        let addr = self.config.manager;
        match Conn::connect(addr, self.poll.registry(), MANAGER, accept::LINK) {
            Ok(mut conn) => {
                if let Some(keys) = &self.config.keys {
                    conn.seal(keys, true, now);
                }
                log::debug!("connecting to the manager at {addr}");
                self.manager_conn = Some(conn);
                self.manager_connected = false;
            }
            Err(e) => {
                log::debug!("cannot connect to the manager at {addr}: {e}");
                self.link.handle_disconnected(now);
            }
        }
    }

    pub(super) fn handle_link_event(&mut self, event: LinkEvent, now: Instant) {
        match event {
            LinkEvent::Registered(_) => {}
            LinkEvent::PeersLeft(ids) => self.handle_peers_left(&ids, now),
            LinkEvent::Holders(name, groups) => self.handle_holders(name, groups, now),
            LinkEvent::Files(files) => self.say(&crate::peer::output::network_files(&files)),
            LinkEvent::Peers(peers) => self.say(&crate::peer::output::peer_entries(&peers, None)),
            LinkEvent::PeerPage { peers, total } => self.say(&crate::peer::output::peer_page(
                &peers,
                total,
                self.link.peer_id(),
            )),
            LinkEvent::QueryFailed(query) => {
                let for_download = match &query {
                    Query::WhoHas(name) => self.handle_holders_failed(name, now),
                    _ => false,
                };
                if !for_download {
                    let what = match query {
                        Query::ListFiles => "list the network's files".to_string(),
                        Query::ListPeers => "list the peers".to_string(),
                        Query::WhoHas(name) => format!("find the holders of {name}"),
                    };
                    self.say(&format!(
                        "cannot {what}: the manager at {} is not reachable now; retrying in the background\n",
                        self.config.manager
                    ));
                }
            }
            LinkEvent::Lost { retry_in, first } => {
                // Said once per outage; the retries are only debug lines.
                if first {
                    log::warn!(
                        "cannot reach the manager at {}; retrying in the background",
                        self.config.manager
                    );
                } else {
                    log::debug!("manager still away; next try in {retry_in:?}");
                }
            }
            LinkEvent::GaveUp(why) => {
                self.finish(Err(NodeError::Manager(why.message(self.config.manager))));
            }
            LinkEvent::Refused(why) => log::error!("{why}"),
        }
    }
}
