//! Serving other peers: accepting connections, feeding their frames to a
//! [`ServeSession`] each, and moving the chunks they ask for from disk to the
//! socket (by `sendfile`) as fast as the socket drains and the upload limit allows.

use std::time::Instant;

use mio::Token;

use super::*;
use crate::net::{self, ConnId, IoStatus};
use crate::peer::serve::{ServeAction, ServeConfig, ServeSession};
use crate::wire::{self, ErrorCode, Message};

impl Node {
    pub(super) fn accept_all(&mut self, now: Instant) {
        for mut conn in net::accept_pending(&self.listener) {
            let addr = conn.peer_addr();
            let serving = self
                .conns
                .iter()
                .filter(|(_, pc)| matches!(pc, PeerConn::Serving { .. }))
                .count();
            if serving >= self.config.max_conns {
                conn.refuse_busy(format!(
                    "this peer serves at most {} connections",
                    self.config.max_conns
                ));
                continue;
            }
            let entry = self.conns.vacant_entry();
            let id = ConnId(entry.key());
            if let Err(e) = conn.register(self.poll.registry(), Token(id.0)) {
                log::warn!("cannot register {addr}: {e}");
                continue;
            }
            log::debug!("serving {addr} on connection {}", id.0);
            entry.insert(PeerConn::Serving {
                conn,
                session: ServeSession::new(ServeConfig::default(), now),
            });
            // Our hello goes out now, not when the other side first speaks.
            if self.apply_serve_actions(id) {
                self.pump_serving(id, now);
            }
        }
    }

    pub(super) fn handle_peer_readable(&mut self, id: ConnId, now: Instant) {
        match self.conns.get(id.0) {
            Some(PeerConn::Serving { .. }) => self.handle_serving_readable(id, now),
            Some(PeerConn::Source { .. }) => {
                self.with_download(now, |d, ctx| d.handle_source_readable(id, ctx));
            }
            None => {}
        }
    }

    pub(super) fn handle_peer_writable(&mut self, id: ConnId, now: Instant) {
        match self.conns.get(id.0) {
            Some(PeerConn::Serving { .. }) => self.pump_serving(id, now),
            Some(PeerConn::Source { .. }) => {
                self.with_download(now, |d, ctx| d.handle_source_writable(id, ctx));
            }
            None => {}
        }
    }

    pub(super) fn handle_serving_readable(&mut self, id: ConnId, now: Instant) {
        let Some(PeerConn::Serving { conn, session }) = self.conns.get_mut(id.0) else {
            return;
        };
        let status = conn.fill(net::READ_BUDGET);
        loop {
            match conn.next_frame() {
                Ok(Some((msg, used))) => {
                    session.handle_message(msg, &self.store, now);
                    conn.consume(used);
                }
                Ok(None) => break,
                Err(e) => {
                    log::warn!("{}: {e}; closing", conn.peer_addr());
                    let code = match e {
                        wire::DecodeError::BadFileName(_) => ErrorCode::NotFound,
                        _ => ErrorCode::Protocol,
                    };
                    conn.send(&Message::Error {
                        code,
                        reason: e.to_string(),
                    });
                    self.close_peer(id);
                    return;
                }
            }
        }
        match status {
            Ok(IoStatus::WouldBlock) => {}
            Ok(IoStatus::Budget) => self.revisit.push(id),
            Ok(IoStatus::Done) | Err(_) => {
                log::debug!("{} closed", conn.peer_addr());
                self.close_peer(id);
                return;
            }
        }
        if self.apply_serve_actions(id) {
            self.pump_serving(id, now);
        }
    }

    /// Sends what the session queued; returns false if it closed the connection.
    pub(super) fn apply_serve_actions(&mut self, id: ConnId) -> bool {
        let Some(PeerConn::Serving { conn, session }) = self.conns.get_mut(id.0) else {
            return false;
        };
        let mut close = false;
        while let Some(action) = session.poll_action() {
            match action {
                ServeAction::Send(msg) => conn.send(&msg),
                ServeAction::SendManifest(root) => match self.store.by_root(&root) {
                    Some(f) => {
                        let m = &f.manifest;
                        conn.send_with(|out| {
                            wire::encode_manifest(&m.root, m.size, m.chunk_size, &m.hashes, out)
                        });
                    }
                    // Rescanned away since the request was checked.
                    None => close = true,
                },
                ServeAction::Close => close = true,
            }
        }
        if close {
            self.close_peer(id);
            return false;
        }
        true
    }

    /// Moves queued chunk requests from disk into the socket, as far as the
    /// socket drains and the upload limit allows.
    pub(super) fn pump_serving(&mut self, id: ConnId, now: Instant) {
        let Some(PeerConn::Serving { conn, session }) = self.conns.get_mut(id.0) else {
            return;
        };
        let mut failed = None;
        loop {
            if conn.flush().is_err() {
                failed = Some(String::new());
                break;
            }
            if conn.pending_write_bytes() >= SEND_LOW_WATER {
                break;
            }
            let Some(req) = session.peek_request().copied() else {
                break;
            };
            if let Some(bucket) = self.limiter.as_mut()
                && !bucket.try_take(req.len as u64, now)
            {
                let at = bucket.ready_at(req.len as u64, now);
                self.limiter_wake = net::earliest(self.limiter_wake, Some(at));
                break;
            }
            let _ = session.pop_request();
            let Some(file) = self.store.by_root(&req.root) else {
                failed = Some(format!("file {} is no longer shared", req.root.short()));
                break;
            };
            match self.open_files.get(&self.store, file) {
                Ok(f) => conn.send_chunk_from_file(req.index, f, req.offset, req.len),
                Err(e) => {
                    failed = Some(format!("cannot open {}: {e}", file.name));
                    break;
                }
            }
        }
        match failed {
            None => {
                if conn
                    .sync_interest(self.poll.registry(), Token(id.0))
                    .is_err()
                {
                    self.close_peer(id);
                }
            }
            Some(why) if why.is_empty() => self.close_peer(id),
            Some(why) => {
                log::warn!("{why}");
                session.handle_read_failed(why);
                self.apply_serve_actions(id);
            }
        }
    }

    pub(super) fn close_peer(&mut self, id: ConnId) {
        if let Some(mut pc) = self.conns.try_remove(id.0) {
            let conn = pc.conn();
            conn.deregister(self.poll.registry());
            conn.flush_and_close();
        }
    }
}
