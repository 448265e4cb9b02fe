//! The peer's connection to the manager: connecting, moving frames between
//! the socket and the [`ManagerLink`] core, and acting on what the link reports.

use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::*;
use crate::net::{self, Conn, IoStatus};
use crate::peer::link::{LinkAction, LinkEvent, Query};

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
        let Some(conn) = self.manager_conn.as_mut() else {
            return;
        };
        let status = conn.fill(net::READ_BUDGET);
        loop {
            let Some(conn) = self.manager_conn.as_mut() else {
                return;
            };
            match conn.next_frame() {
                Ok(Some((msg, used))) => {
                    self.link.handle_message(msg, now);
                    conn.consume(used);
                }
                Ok(None) => break,
                Err(e) => return self.manager_lost(now, format!("bad frame: {e}")),
            }
        }
        match status {
            Ok(IoStatus::Done) => {
                return self.manager_lost(now, "manager closed the connection".into());
            }
            Err(e) => return self.manager_lost(now, e.to_string()),
            _ => {}
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
                    if let Some(mut conn) = self.manager_conn.take() {
                        conn.deregister(self.poll.registry());
                        conn.flush_and_close();
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
        let result = TcpStream::connect(addr).and_then(|mut stream| {
            let _ = stream.set_nodelay(true);
            self.poll.registry().register(
                &mut stream,
                MANAGER,
                Interest::READABLE | Interest::WRITABLE,
            )?;
            Ok(stream)
        });
        match result {
            Ok(stream) => {
                log::debug!("connecting to the manager at {addr}");
                self.manager_conn = Some(Conn::new_registered(
                    stream,
                    addr,
                    Interest::READABLE | Interest::WRITABLE,
                ));
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
            LinkEvent::Registered(_) | LinkEvent::PeersChanged => {
                if self.download.is_some() {
                    self.with_download(now, |d, ctx| d.handle_peers_changed(ctx));
                }
            }
            LinkEvent::Holders(name, groups) => {
                if self.download.is_some() {
                    self.with_download(now, |d, ctx| d.handle_holders(name, groups, ctx));
                }
            }
            LinkEvent::Files(files) => say(&crate::peer::output::network_files(&files)),
            LinkEvent::Peers(peers) => say(&crate::peer::output::peer_entries(&peers, None)),
            LinkEvent::QueryFailed(query) => {
                if let (Query::WhoHas(_), true) = (&query, self.download.is_some()) {
                    self.with_download(now, |d, ctx| d.handle_query_failed(ctx));
                } else {
                    let what = match query {
                        Query::ListFiles => "list the network's files".to_string(),
                        Query::ListPeers => "list the peers".to_string(),
                        Query::WhoHas(name) => format!("find the holders of {name}"),
                    };
                    say(&format!(
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
                self.finish(Err(NodeError(why.message(self.config.manager))));
            }
            LinkEvent::Refused(why) => log::error!("{why}"),
        }
    }
}
