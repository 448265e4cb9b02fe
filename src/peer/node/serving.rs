//! Serving other peers: accepting connections, feeding their frames to a
//! [`ServeSession`] each, and moving the chunks they ask for from disk to the
//! socket (by `sendfile`) as fast as the socket drains and the upload limit allows.

use std::time::Instant;

use mio::Token;

use super::swarm::ServingCatalog;
use super::*;
use crate::net::allow::AllowList;
use crate::net::{self, ConnId, Flow, ReadEnd};
use crate::peer::serve::{Catalog, ChunkRequest, ServeAction, ServeConfig, ServeSession};
use crate::wire::{self, ErrorCode, Message};

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
            let session = Box::new(ServeSession::new(ServeConfig::default(), now));
            conn.set_accept(session.accepts());
            if let Some(keys) = &self.config.keys {
                conn.seal(keys, false, now);
            }
            entry.insert(PeerConn::Serving {
                conn,
                session,
                manifest: None,
            });
            self.rotation.handle_accepted(id, now);
            // Our hello goes out now, not when the other side first speaks.
            if self.apply_serve_actions(id) {
                self.pump_serving(id, now);
            }
        }
        self.handle_rotation(now);
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
        let catalog = ServingCatalog {
            store: &self.store,
            downloads: &self.downloads,
        };
        let end = conn.read_frames(|msg| {
            session.handle_message(msg, &catalog, now);
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
                // A key just added must not wait for the next check.
                let changed = self.config.allow.as_mut().is_some_and(AllowList::refresh);
                if let Some(allow) = &self.config.allow
                    && !allow.contains(&key)
                {
                    log::warn!(
                        "refusing {}: its key {key} is not in the allow list {}",
                        conn.peer_addr(),
                        allow.path().display()
                    );
                    conn.send(&not_allowed());
                    self.close_peer(id);
                    if changed {
                        self.drop_unlisted();
                    }
                    return;
                }
                if changed {
                    self.drop_unlisted();
                }
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
        let catalog = ServingCatalog {
            store: &self.store,
            downloads: &self.downloads,
        };
        let mut close = false;
        while let Some(action) = session.poll_action() {
            match action {
                ServeAction::Send(msg) => conn.send(&msg),
                ServeAction::SendManifest(root) => match catalog.find_by_root(&root) {
                    // Streamed by `pump_serving` as the socket drains; no
                    // more requests are read until it is out.
                    Some(m) if manifest.is_none() => {
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

    /// Moves this connection's own replies on (what is queued, a manifest
    /// being streamed), then gives every connection with requests its share
    /// of the upload (see [`Node::serve_round`]).
    pub(super) fn pump_serving(&mut self, id: ConnId, now: Instant) {
        match self.pump_own(id) {
            Own::Closed => return,
            Own::Ready => self.fair.join(id),
            Own::Idle => self.fair.leave(id),
        }
        self.serve_round(now);
        self.settle_serving(id);
    }

    /// Flushes `id` and streams its manifest as far as the socket drains;
    /// closes it if it was rotated out and its last reply is sent.
    fn pump_own(&mut self, id: ConnId) -> Own {
        let Some(PeerConn::Serving { conn, manifest, .. }) = self.conns.get_mut(id.0) else {
            return Own::Closed;
        };
        loop {
            if conn.flush().is_err() {
                self.close_peer(id);
                return Own::Closed;
            }
            if conn.pending_write_bytes() >= SEND_LOW_WATER {
                return Own::Idle;
            }
            let Some(stream) = manifest.as_mut() else {
                break;
            };
            // The frame was begun: without the file it cannot be ended.
            let catalog = ServingCatalog {
                store: &self.store,
                downloads: &self.downloads,
            };
            let Some(m) = catalog.find_by_root(&stream.root) else {
                self.close_peer(id);
                return Own::Closed;
            };
            let hashes = &m.hashes[stream.next.min(m.hashes.len())..];
            let slice = &hashes[..hashes.len().min(MANIFEST_SLICE)];
            conn.send_with(|out| wire::encode_manifest_hashes(slice, out));
            stream.next += slice.len();
            if slice.len() == hashes.len() {
                *manifest = None;
                conn.set_hold_reads(false);
            }
        }
        if self.rotation.is_leaving(id) {
            if !conn.has_pending_writes() {
                self.close_peer(id);
                return Own::Closed;
            }
            return Own::Idle;
        }
        match self.conns.get(id.0) {
            Some(PeerConn::Serving { session, .. }) if session.peek_request().is_some() => {
                Own::Ready
            }
            _ => Own::Idle,
        }
    }

    /// Deficit round robin over the connections with requests queued and
    /// room in their sockets: each in turn sends up to a quantum of bytes,
    /// until every one has left (no requests, socket full) or the upload
    /// limit has no tokens (the head keeps its turn for the next round).
    /// So the limit, and the sockets' own pace, are shared by bytes.
    pub(super) fn serve_round(&mut self, now: Instant) {
        // No request is read during a round, so once no connection has a
        // fresh one, none will until the next: the scan (connections x 32
        // requests) is not repeated per chunk of a file already sent out.
        let mut fresh_left = true;
        while let Some(id) = self.fair.head() {
            // A chunk sent to nobody yet goes first, whoever asked for it
            // (`SentChunks`); out of turn, so the round's shares stand.
            if fresh_left && !self.has_fresh_request(id) {
                match self.fresh_elsewhere() {
                    None => fresh_left = false,
                    Some(other) => match self.serve_turn(other, now, true) {
                        Turn::Sent => continue,
                        Turn::NoTokens => break,
                        Turn::Over | Turn::Leave | Turn::Closed => {}
                    },
                }
            }
            match self.serve_turn(id, now, false) {
                Turn::Sent | Turn::Over | Turn::Closed => {}
                Turn::Leave => {
                    self.fair.leave(id);
                    self.settle_serving(id);
                }
                Turn::NoTokens => break,
            }
        }
        // Waiting for tokens: their sockets carry on with what is queued.
        let mut i = 0;
        while let Some(id) = self.fair.at(i) {
            if !self.settle_serving(id) {
                i += 1;
            }
        }
    }

    /// Whether `id` has a request for a chunk sent to nobody yet.
    fn has_fresh_request(&self, id: ConnId) -> bool {
        let sent = &self.sent_chunks;
        matches!(self.conns.get(id.0), Some(PeerConn::Serving { session, .. })
            if session.fresh_request(|r| sent.is_fresh(&r.root, r.index)).is_some())
    }

    /// A connection in the round, with room in its socket, that has a
    /// request for a chunk sent to nobody yet.
    fn fresh_elsewhere(&self) -> Option<ConnId> {
        (0..self.fair.len())
            .filter_map(|i| self.fair.at(i))
            .find(|&id| {
                let room = matches!(self.conns.get(id.0), Some(PeerConn::Serving { conn, manifest: None, .. })
                    if conn.pending_write_bytes() < SEND_LOW_WATER);
                room && !self.rotation.is_leaving(id) && self.has_fresh_request(id)
            })
    }

    /// One step of `id`'s turn: one chunk sent, or why not. Its request for
    /// a chunk sent to nobody yet goes before its others; `out_of_turn`
    /// serves only such a request and charges no share of the round.
    fn serve_turn(&mut self, id: ConnId, now: Instant, out_of_turn: bool) -> Turn {
        let Some(PeerConn::Serving {
            conn,
            session,
            manifest,
        }) = self.conns.get_mut(id.0)
        else {
            return Turn::Leave;
        };
        if conn.flush().is_err() {
            self.close_peer(id);
            return Turn::Closed;
        }
        if manifest.is_some()
            || conn.pending_write_bytes() >= SEND_LOW_WATER
            || self.rotation.is_leaving(id)
        {
            return Turn::Leave;
        }
        let sent = &self.sent_chunks;
        let fresh = session.fresh_request(|r| sent.is_fresh(&r.root, r.index));
        let pos = match (fresh, out_of_turn) {
            (Some(pos), _) => pos,
            (None, false) => 0,
            (None, true) => return Turn::Leave,
        };
        let Some(req) = session.request_at(pos).copied() else {
            return Turn::Leave;
        };
        if !out_of_turn && !self.fair.fits(u64::from(req.len)) {
            return Turn::Over;
        }
        if let Some(bucket) = self.limiter.as_mut()
            && !bucket.try_take(u64::from(req.len), now)
        {
            let at = bucket.ready_at(u64::from(req.len), now);
            self.limiter_wake = net::earliest(self.limiter_wake, Some(at));
            return Turn::NoTokens;
        }
        let _ = session.take_request_at(pos);
        if !out_of_turn {
            self.fair.charge(u64::from(req.len));
        }
        self.sent_chunks.mark(&req.root, req.index);
        if !self.serve_one_request(id, req) {
            return Turn::Closed;
        }
        // Into the socket now: the next turn may be someone else's.
        let flushed = self
            .conns
            .get_mut(id.0)
            .is_some_and(|pc| pc.conn().flush().is_ok());
        if !flushed {
            self.close_peer(id);
            return Turn::Closed;
        }
        Turn::Sent
    }

    /// Queues the chunk `req` names on `id` (payload by `sendfile`); false
    /// if that failed and the connection is closing.
    fn serve_one_request(&mut self, id: ConnId, req: ChunkRequest) -> bool {
        let Some(PeerConn::Serving { conn, session, .. }) = self.conns.get_mut(id.0) else {
            return false;
        };
        let catalog = ServingCatalog {
            store: &self.store,
            downloads: &self.downloads,
        };
        if let Some(file) = catalog.partial_file(&req.root) {
            // A download in progress: the session checked the chunk is verified.
            conn.send_chunk_from_file(req.index, file, req.offset, req.len);
            self.partial_chunks_served += 1;
            self.stats.bytes_served += u64::from(req.len);
            return true;
        }
        let why = match self.store.by_root(&req.root) {
            None => format!("file {} is no longer shared", req.root.short()),
            Some(file) => match self.open_files.get(&self.store, file) {
                Ok(f) => {
                    conn.send_chunk_from_file(req.index, f, req.offset, req.len);
                    self.stats.bytes_served += u64::from(req.len);
                    return true;
                }
                Err(e) => format!("cannot open {}: {e}", file.name),
            },
        };
        log::warn!("{why}");
        session.handle_read_failed(why);
        self.apply_serve_actions(id);
        self.close_peer(id);
        false
    }

    /// Registers for WRITABLE while bytes wait, and reads again if replies
    /// had held reads; returns true if the connection closed.
    fn settle_serving(&mut self, id: ConnId) -> bool {
        let Some(PeerConn::Serving { conn, .. }) = self.conns.get_mut(id.0) else {
            return true;
        };
        if conn
            .sync_interest(self.poll.registry(), Token(id.0))
            .is_err()
        {
            self.close_peer(id);
            return true;
        }
        if conn.should_resume_reading() {
            self.revisit.push(id);
        }
        false
    }

    /// Rotation at the connection cap (docs/state/serving.md): rotates the
    /// longest-served connection out if the rule says so, and closes
    /// rotated-out ones that did not take their last replies in time.
    pub(super) fn handle_rotation(&mut self, now: Instant) {
        if self.acceptor.take_refused() > 0 {
            self.rotation.handle_refused(now);
        }
        while let Some(id) = self.rotation.poll_expired(now) {
            self.close_peer(id);
        }
        let serving = self
            .conns
            .iter()
            .filter(|(_, pc)| matches!(pc, PeerConn::Serving { .. }))
            .count();
        let at_cap = serving >= self.config.max_conns;
        if let Some(id) = self.rotation.poll_rotate(at_cap, now) {
            self.rotate_out(id, now);
        }
    }

    /// Tells `id` it is Busy after the chunks already queued for it, serves
    /// it nothing more, and closes it once that is sent.
    fn rotate_out(&mut self, id: ConnId, now: Instant) {
        let Some(PeerConn::Serving { conn, session, .. }) = self.conns.get_mut(id.0) else {
            return;
        };
        log::info!(
            "rotating {} out: a peer is waiting for a serving slot",
            conn.peer_addr()
        );
        while session.pop_request().is_some() {}
        conn.set_hold_reads(true);
        conn.send(&wire::Message::Error {
            code: wire::ErrorCode::Busy,
            reason: format!(
                "this peer serves at most {} connections; others are waiting",
                self.config.max_conns
            ),
        });
        self.fair.leave(id);
        self.pump_serving(id, now);
    }

    /// After the allow file changed: closes every serving connection whose
    /// key it no longer lists.
    pub(super) fn drop_unlisted(&mut self) {
        let Some(allow) = &self.config.allow else {
            return;
        };
        let unlisted: Vec<ConnId> = self
            .conns
            .iter_mut()
            .filter_map(|(key, pc)| match pc {
                PeerConn::Serving { conn, manifest, .. } => {
                    let peer = conn.remote_key()?;
                    if allow.contains(&peer) {
                        return None;
                    }
                    log::warn!(
                        "dropping {}: its key {peer} was removed from the allow list {}",
                        conn.peer_addr(),
                        allow.path().display()
                    );
                    // Not in the middle of a manifest's body.
                    if manifest.is_none() {
                        conn.send(&not_allowed());
                    }
                    Some(ConnId(key))
                }
                PeerConn::Source { .. } => None,
            })
            .collect();
        for id in unlisted {
            self.close_peer(id);
        }
    }

    pub(super) fn close_peer(&mut self, id: ConnId) {
        self.fair.leave(id);
        self.rotation.handle_closed(id);
        if let Some(pc) = self.conns.try_remove(id.0) {
            pc.into_conn().close(self.poll.registry());
        }
    }
}

/// Where a connection stands after its own replies moved on.
enum Own {
    Closed,
    /// Has requests, room in its socket, and nothing else to send first.
    Ready,
    Idle,
}

/// How one step of a connection's turn ended.
enum Turn {
    Sent,
    /// Its quantum is used up; the next connection's turn began.
    Over,
    /// Nothing to send or no room: out of the round until it has.
    Leave,
    Closed,
    /// The upload limit is out of tokens: the round waits for the bucket.
    NoTokens,
}

/// Hashes per slice of a streamed manifest (64 KiB of the frame).
const MANIFEST_SLICE: usize = 2048;

/// A manifest frame being sent: its header is queued, its hashes follow
/// from the index as the socket drains.
pub(in crate::peer) struct ManifestStream {
    root: wire::Hash,
    next: usize,
}

/// What a peer not on our allow list is told before we close.
fn not_allowed() -> Message<'static> {
    Message::Error {
        code: ErrorCode::Incompatible,
        reason: "this peer serves only the keys on its allow list".into(),
    }
}
