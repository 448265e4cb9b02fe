//! A download's sources: connecting to holders, the handshake and the
//! manifest, verifying and storing each chunk as it arrives, and turning the
//! scheduler's decisions into requests, cancels and dropped connections.

use std::time::Instant;

use mio::net::TcpStream;
use mio::{Interest, Token};

use super::*;
use crate::net::{self, Conn, ConnId, IoStatus};
use crate::peer::node::PeerConn;
use crate::peer::progress::ProgressReport;
use crate::peer::scheduler::{Action, Arrival, Scheduler, SchedulerConfig, SourceId};
use crate::store::{self, Manifest, PartialFile};
use crate::wire::{Message, PROTOCOL_VERSION, PeerEntry, PeerId, Role};

/// Bytes read per call on a source connection. Measured (1 GiB, one seeder,
/// 32 KiB chunks, median of 7): 64 KiB 1380 MB/s, 256 KiB 1580, 512 KiB
/// 1465, 1 MiB 1430: fewer reads and loop turns per chunk, while a read's
/// worth of chunks is still in cache when it is hashed and written.
const SOURCE_READ_CHUNK: usize = 256 << 10;

impl Download {
    pub(super) fn connect(&mut self, holder: PeerEntry, ctx: &mut Ctx<'_>) {
        let result = TcpStream::connect(holder.addr).and_then(|stream| {
            let _ = stream.set_nodelay(true);
            let entry = ctx.conns.vacant_entry();
            let id = ConnId(entry.key());
            let mut stream = stream;
            ctx.poll.registry().register(
                &mut stream,
                Token(id.0),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let mut conn =
                Conn::new_registered(stream, holder.addr, Interest::READABLE | Interest::WRITABLE);
            conn.set_read_chunk(SOURCE_READ_CHUNK);
            entry.insert(PeerConn::Source {
                conn,
                connected: false,
            });
            Ok(id)
        });
        match result {
            Ok(id) => {
                log::debug!("connecting to peer {} at {}", holder.id, holder.addr);
                self.next_source += 1;
                self.sources.insert(
                    id,
                    Source {
                        peer: holder.id,
                        addr: holder.addr,
                        id: SourceId(self.next_source),
                        connected: false,
                        scheduled: false,
                    },
                );
            }
            Err(e) => log::warn!(
                "cannot connect to peer {} at {}: {e}",
                holder.id,
                holder.addr
            ),
        }
    }

    pub fn handle_source_writable(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        let Some(source) = self.sources.get_mut(&id) else {
            return;
        };
        let Some(PeerConn::Source { conn, connected }) = ctx.conns.get_mut(id.0) else {
            return;
        };
        if !*connected {
            match conn.is_connected() {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => {
                    log::warn!(
                        "cannot connect to peer {} at {}: {e}",
                        source.peer,
                        source.addr
                    );
                    return self.drop_source(id, ctx);
                }
            }
            *connected = true;
            source.connected = true;
            self.no_source_since = None;
            conn.send(&Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Peer,
            });
            log::debug!("connected to peer {} at {}", source.peer, source.addr);
            self.source_ready(id, ctx);
        }
        self.flush(id, ctx);
    }

    /// A newly connected source: ask it for the manifest if nobody is being
    /// asked, or hand it to the scheduler if the manifest is known.
    pub(super) fn source_ready(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        if self.manifest.is_none() {
            if self.manifest_from.is_none() {
                self.ask_manifest(id, ctx);
            }
            return;
        }
        if let (Some(sched), Some(source)) = (self.scheduler.as_mut(), self.sources.get_mut(&id))
            && source.connected
            && !source.scheduled
        {
            source.scheduled = true;
            sched.add_source(source.id, ctx.now);
        }
        self.drive(ctx);
    }

    pub(super) fn ask_manifest(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        let Some(PeerConn::Source { conn, .. }) = ctx.conns.get_mut(id.0) else {
            return;
        };
        conn.send(&Message::GetManifest {
            name: self.request.name.clone(),
            root: self.target.as_ref().map(|t| t.root),
        });
        self.manifest_from = Some(id);
        self.flush(id, ctx);
    }

    pub fn handle_source_readable(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        let Some(PeerConn::Source { conn, .. }) = ctx.conns.get_mut(id.0) else {
            return;
        };
        let status = conn.fill(net::READ_BUDGET);
        while let Some(PeerConn::Source { conn, .. }) = ctx.conns.get_mut(id.0) {
            let (msg, used) = match conn.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    log::warn!("peer at {}: {e}", conn.peer_addr());
                    self.ban(id);
                    return self.drop_source(id, ctx);
                }
            };
            let keep = match msg {
                Message::Chunk { index, data } => {
                    let Some(source) = self.sources.get(&id) else {
                        return;
                    };
                    let sid = source.id;
                    let peer = source.peer;
                    self.handle_chunk(sid, peer, index, data, ctx.now)
                }
                Message::Hello { version, role } => {
                    let ok = version == PROTOCOL_VERSION && role == Role::Peer;
                    if !ok {
                        log::warn!(
                            "peer at {} speaks protocol {version} as {role:?}; we need {PROTOCOL_VERSION}",
                            conn.peer_addr()
                        );
                    }
                    ok
                }
                Message::Manifest {
                    root,
                    size,
                    chunk_size,
                    hashes,
                } => {
                    let manifest = Manifest::from_wire(root, size, chunk_size, hashes);
                    conn.consume(used);
                    match manifest {
                        Ok(m) => self.handle_manifest(id, m, ctx),
                        Err(e) => {
                            log::warn!("peer sent a bad manifest: {e}");
                            self.ban(id);
                            self.drop_source(id, ctx);
                        }
                    }
                    continue;
                }
                Message::Error { code, reason } => {
                    log::warn!("peer at {} refused: {reason} ({code:?})", conn.peer_addr());
                    false
                }
                Message::Pong { .. } => true,
                other => {
                    log::warn!("peer at {} sent unexpected {other:?}", conn.peer_addr());
                    self.ban(id);
                    false
                }
            };
            if let Some(PeerConn::Source { conn, .. }) = ctx.conns.get_mut(id.0) {
                conn.consume(used);
            }
            if !keep {
                return self.drop_source(id, ctx);
            }
            if self.outcome.is_some() {
                return;
            }
        }
        match status {
            Ok(IoStatus::WouldBlock) => {}
            Ok(IoStatus::Budget) => ctx.revisit.push(id),
            Ok(IoStatus::Done) | Err(_) => {
                if let Some(s) = self.sources.get(&id) {
                    log::info!("peer {} at {} went away", s.peer, s.addr);
                }
                return self.drop_source(id, ctx);
            }
        }
        self.drive(ctx);
        self.check_complete(ctx);
    }

    /// Verifies and stores one chunk. Returns false if the source must go.
    pub(super) fn handle_chunk(
        &mut self,
        sid: SourceId,
        peer: PeerId,
        index: u32,
        data: &[u8],
        now: Instant,
    ) -> bool {
        let (Some(sched), Some(manifest), Some(partial)) = (
            self.scheduler.as_mut(),
            self.manifest.as_ref(),
            self.partial.as_mut(),
        ) else {
            return false; // a chunk before the manifest: not something we asked for
        };
        match sched.handle_chunk_arrived(sid, index, now) {
            Arrival::Discard => true,
            Arrival::Verify => {
                let good = data.len() == manifest.chunk_len(index) as usize
                    && store::hash_chunk(data) == manifest.hashes[index as usize];
                if !good {
                    log::warn!("peer {peer} sent a corrupt chunk {index}; dropping it");
                    sched.handle_chunk_corrupt(sid, index, now);
                    self.banned.insert(peer);
                    return true; // the scheduler's DropSource closes it
                }
                if let Err(e) = partial.write_chunk(index, data) {
                    self.outcome = Some(DownloadOutcome::Failed(format!(
                        "cannot write {} into the partial file: {e}{}",
                        self.request.name,
                        if e.raw_os_error() == Some(libc::ENOSPC) {
                            " (disk full: free some space and run get again; verified chunks are kept)"
                        } else {
                            ""
                        }
                    )));
                    return true;
                }
                sched.handle_chunk_verified(sid, index, now);
                self.peers_used.insert(peer);
                true
            }
        }
    }

    pub(super) fn handle_manifest(&mut self, id: ConnId, manifest: Manifest, ctx: &mut Ctx<'_>) {
        let expected = self.target.as_ref().map(|t| t.root);
        if self.manifest.is_some() {
            return;
        }
        if expected.is_some_and(|r| r != manifest.root) {
            log::warn!("peer sent the manifest of another version; asking another peer");
            self.ban(id);
            return self.drop_source(id, ctx);
        }
        let dir = ctx.store.dir().to_path_buf();
        let partial = match PartialFile::open(ctx.store.dirs(), &manifest) {
            Ok(p) => p,
            Err(e) => {
                self.outcome = Some(DownloadOutcome::Failed(format!(
                    "cannot create the partial file in {}: {e}",
                    dir.display()
                )));
                return;
            }
        };
        let have: Vec<bool> = (0..manifest.chunk_count())
            .map(|i| partial.has(i))
            .collect();
        let have_bytes: u64 = (0..manifest.chunk_count())
            .filter(|&i| have[i as usize])
            .map(|i| manifest.chunk_len(i) as u64)
            .sum();
        let need = manifest.size - have_bytes;
        if let Ok(free) = store::free_space(&dir)
            && free < need
        {
            self.outcome = Some(DownloadOutcome::Failed(format!(
                "disk full: {} needs {need} more bytes but {} has only {free} free",
                self.request.name,
                dir.display()
            )));
            return;
        }
        if have_bytes > 0 {
            log::info!(
                "resuming {}: {} of {} bytes already verified",
                self.request.name,
                have_bytes,
                manifest.size
            );
        }
        self.resumed_bytes = have_bytes;
        self.scheduler = Some(Scheduler::new(
            (0..manifest.chunk_count())
                .map(|i| manifest.chunk_len(i))
                .collect(),
            &have,
            SchedulerConfig::default(),
        ));
        if ctx.progress_bar || log::log_enabled!(log::Level::Info) {
            self.progress = Some(ProgressReport::new(
                &self.request.name,
                manifest.size,
                have_bytes,
                ctx.progress_bar,
                ctx.now,
            ));
        }
        self.partial = Some(partial);
        self.manifest = Some(manifest);
        self.manifest_from = None;
        let ready: Vec<ConnId> = self
            .sources
            .iter()
            .filter(|(_, s)| s.connected)
            .map(|(&k, _)| k)
            .collect();
        log::debug!("manifest from connection {}: {} chunks", id.0, have.len());
        for id in ready {
            self.source_ready(id, ctx);
        }
        self.check_complete(ctx);
    }

    /// Turns the scheduler's decisions into frames and closes.
    pub(super) fn drive(&mut self, ctx: &mut Ctx<'_>) {
        let Some(sched) = self.scheduler.as_mut() else {
            return;
        };
        let Some(root) = self.manifest.as_ref().map(|m| m.root) else {
            return;
        };
        // A handful of sources: a scan beats building a map on every call.
        let sources = &self.sources;
        let conn_of = |sid: SourceId| sources.iter().find(|(_, s)| s.id == sid).map(|(&k, _)| k);
        let mut touched = Vec::new();
        let mut dropped = Vec::new();
        while let Some(action) = sched.poll_action() {
            match action {
                Action::Request { source, index } | Action::Cancel { source, index } => {
                    let Some(id) = conn_of(source) else {
                        continue;
                    };
                    if let Some(PeerConn::Source { conn, .. }) = ctx.conns.get_mut(id.0) {
                        let msg = if matches!(action, Action::Request { .. }) {
                            Message::GetChunk { root, index }
                        } else {
                            Message::Cancel { root, index }
                        };
                        conn.send(&msg);
                        touched.push(id);
                    }
                }
                Action::DropSource { source, reason } => {
                    if let Some((id, s)) =
                        conn_of(source).and_then(|id| Some((id, sources.get(&id)?)))
                    {
                        log::warn!("dropping peer {} at {}: {reason}", s.peer, s.addr);
                        dropped.push(id);
                    }
                }
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.flush(id, ctx);
        }
        for id in dropped {
            self.close_source(id, ctx);
        }
        self.refill_sources(ctx);
    }

    pub(super) fn flush(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        let Some(PeerConn::Source { conn, connected }) = ctx.conns.get_mut(id.0) else {
            return;
        };
        if !*connected {
            return;
        }
        let ok =
            conn.flush().is_ok() && conn.sync_interest(ctx.poll.registry(), Token(id.0)).is_ok();
        if !ok {
            self.drop_source(id, ctx);
        }
    }

    pub(super) fn ban(&mut self, id: ConnId) {
        if let Some(s) = self.sources.get(&id) {
            self.banned.insert(s.peer);
        }
    }

    /// The source is gone or misbehaved: its chunks go back to the others.
    pub(super) fn drop_source(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        if let (Some(s), Some(sched)) = (self.sources.get(&id), self.scheduler.as_mut())
            && s.scheduled
        {
            sched.remove_source(s.id, ctx.now);
        }
        self.close_source(id, ctx);
        if self.manifest_from == Some(id) {
            self.manifest_from = None;
            let next = self
                .sources
                .iter()
                .find(|(_, s)| s.connected)
                .map(|(&k, _)| k);
            if let Some(next) = next {
                self.ask_manifest(next, ctx);
            }
        }
        self.drive(ctx);
    }

    pub(super) fn close_source(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
        self.sources.remove(&id);
        if let Some(mut pc) = ctx.conns.try_remove(id.0) {
            let conn = pc.conn();
            conn.deregister(ctx.poll.registry());
            conn.flush_and_close();
        }
        if self.sources.is_empty() && self.no_source_since.is_none() {
            self.no_source_since = Some(ctx.now);
        }
    }

    /// Below the source cap: ask the manager again for holders we may add.
    pub(super) fn refill_sources(&mut self, ctx: &mut Ctx<'_>) {
        if self.outcome.is_none()
            && self.sources.len() < ctx.max_peers
            && self.locate_at.is_none()
            && self.scheduler.as_ref().is_none_or(|s| !s.is_complete())
        {
            self.locate_at = Some(ctx.now + LOCATE_RETRY);
        }
    }

    /// Drops sources the manager no longer lists (they left or were swept).
    pub fn handle_peers_changed(&mut self, ctx: &mut Ctx<'_>) {
        if !ctx.link.is_ready() {
            return;
        }
        let gone: Vec<ConnId> = self
            .sources
            .iter()
            .filter(|(_, s)| !ctx.link.peers().contains_key(&s.peer))
            .map(|(&k, _)| k)
            .collect();
        for id in gone {
            log::info!("source left the network; its chunks go to the others");
            self.drop_source(id, ctx);
        }
    }
}
