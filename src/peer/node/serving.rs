//! Serving other peers: accepting connections, feeding their frames to a
//! [`ServeSession`] each, and moving the chunks they ask for from disk to the
//! socket (by `sendfile`) as fast as the socket drains and the upload limit allows.

use std::time::Instant;

use mio::Token;

use super::*;
use crate::net::{self, ConnId, Flow, ReadEnd};
use crate::peer::serve::{ServeAction, ServeConfig, ServeSession};
use crate::wire;

impl Node {
    pub(super) fn accept_all(&mut self, now: Instant) {
        let serving = self
            .conns
            .iter()
            .filter(|(_, pc)| matches!(pc, PeerConn::Serving { .. }))
            .count();
        let room = self.config.max_conns.saturating_sub(serving);
        let why = format!(
            "this peer serves at most {} connections",
            self.config.max_conns
        );
        for mut conn in self.acceptor.accept(&self.listener, room, &why) {
            let addr = conn.peer_addr();
            let entry = self.conns.vacant_entry();
            let id = ConnId(entry.key());
            if let Err(e) = conn.register(self.poll.registry(), Token(id.0)) {
                log::warn!("cannot register {addr}: {e}");
                continue;
            }
            log::debug!("serving {addr} on connection {}", id.0);
            let session = ServeSession::new(ServeConfig::default(), now);
            conn.set_accept(session.accepts());
            if let Some(keys) = &self.config.keys {
                conn.seal(keys, false, now);
            }
            entry.insert(PeerConn::Serving {
                conn,
                session,
                manifest: None,
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
            Some(PeerConn::Source { .. }) => self.handle_source_readable(id, now),
            None => {}
        }
    }

    pub(super) fn handle_peer_writable(&mut self, id: ConnId, now: Instant) {
        match self.conns.get(id.0) {
            Some(PeerConn::Serving { .. }) => self.pump_serving(id, now),
            Some(PeerConn::Source { .. }) => self.handle_source_writable(id, now),
            None => {}
        }
    }

    pub(super) fn handle_serving_readable(&mut self, id: ConnId, now: Instant) {
        let Some(PeerConn::Serving { conn, session, .. }) = self.conns.get_mut(id.0) else {
            return;
        };
        let store = &self.store;
        let end = conn.read_frames(|msg| {
            session.handle_message(msg, store, now);
            // A reply (a manifest above all) is queued before the next
            // request is read, so backpressure can hold a client that does
            // not read.
            if session.has_actions() {
                Flow::Yield
            } else {
                Flow::Expect(session.accepts())
            }
        });
        conn.set_accept(session.accepts());
        match end {
            ReadEnd::Open { revisit } => {
                if revisit {
                    self.revisit.push(id);
                }
            }
            ReadEnd::Authenticated(key) => {
                log::debug!("{}: sealed, key {key}", conn.peer_addr());
                self.revisit.push(id);
                // Our hello waited for the handshake.
                self.pump_serving(id, now);
                return;
            }
            ReadEnd::Closed(why) => {
                match why {
                    net::CloseReason::Handshake(_) | net::CloseReason::Tampered(_) => {
                        log::warn!("refusing {}: {why}", conn.peer_addr())
                    }
                    _ => log::debug!("{}: {why}", conn.peer_addr()),
                }
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
        let Some(PeerConn::Serving {
            conn,
            session,
            manifest,
        }) = self.conns.get_mut(id.0)
        else {
            return false;
        };
        let mut close = false;
        while let Some(action) = session.poll_action() {
            match action {
                ServeAction::Send(msg) => conn.send(&msg),
                ServeAction::SendManifest(root) => match self.store.by_root(&root) {
                    // Streamed by `pump_serving` as the socket drains; no
                    // more requests are read until it is out.
                    Some(f) if manifest.is_none() => {
                        let m = &f.manifest;
                        conn.send_with(|out| {
                            wire::encode_manifest_prefix(
                                &m.root,
                                m.size,
                                m.chunk_size,
                                m.hashes.len() as u32,
                                out,
                            )
                        });
                        *manifest = Some(ManifestStream { root, next: 0 });
                        conn.set_hold_reads(true);
                    }
                    // Rescanned away since the request was checked, or a
                    // second manifest while one streams (reads are held, so
                    // only a broken client gets here).
                    _ => close = true,
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
        let Some(PeerConn::Serving {
            conn,
            session,
            manifest,
        }) = self.conns.get_mut(id.0)
        else {
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
            if let Some(stream) = manifest.as_mut() {
                // The frame was begun: without the file it cannot be ended.
                let Some(file) = self.store.by_root(&stream.root) else {
                    failed = Some(String::new());
                    break;
                };
                let hashes = &file.manifest.hashes[stream.next.min(file.manifest.hashes.len())..];
                let slice = &hashes[..hashes.len().min(MANIFEST_SLICE)];
                conn.send_with(|out| wire::encode_manifest_hashes(slice, out));
                stream.next += slice.len();
                if slice.len() == hashes.len() {
                    *manifest = None;
                    conn.set_hold_reads(false);
                }
                continue;
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
                Ok(f) => {
                    conn.send_chunk_from_file(req.index, f, req.offset, req.len);
                    self.stats.bytes_served += req.len as u64;
                }
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
                } else if conn.should_resume_reading() {
                    self.revisit.push(id);
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
        if let Some(pc) = self.conns.try_remove(id.0) {
            pc.into_conn().close(self.poll.registry());
        }
    }
}

/// Hashes per slice of a streamed manifest (64 KiB of the frame).
const MANIFEST_SLICE: usize = 2048;

/// A manifest frame being sent: its header is queued, its hashes follow
/// from the index as the socket drains.
pub(in crate::peer) struct ManifestStream {
    root: wire::Hash,
    next: usize,
}
