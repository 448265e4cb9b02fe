//! One download, as the event loop runs it: ask the manager who holds the
//! file, pick the version, connect to the holders, fetch and check the
//! manifest, then let the [`Scheduler`] decide which chunk to ask of whom.
//! Every chunk is hashed on arrival and written at its offset into a partial
//! file under `.shoal/partial/`; the finished file is renamed into the folder.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Poll, Token};
use slab::Slab;

use super::link::{ManagerLink, Query};
use super::node::PeerConn;
use super::progress::ProgressReport;
use super::scheduler::{Action, Arrival, Scheduler, SchedulerConfig, SourceId};
use crate::net::{self, Conn, ConnId, IoStatus};
use crate::store::{self, Manifest, PartialFile, SharedFolder};
use crate::wire::{
    FileName, Hash, HolderGroup, Message, PROTOCOL_VERSION, PeerEntry, PeerId, Role,
};

/// What the user asked for.
#[derive(Debug, Clone)]
pub struct GetRequest {
    pub name: FileName,
    /// Only this version (root hash), if given.
    pub hash: Option<Hash>,
}

/// How a download ended.
#[derive(Debug, Clone)]
pub enum DownloadOutcome {
    /// The summary line for the user.
    Done(String),
    /// Nothing to do: the same content is already in the folder.
    AlreadyHave(String),
    Failed(String),
}

/// What a download may touch in the event loop, lent for one call.
pub(super) struct Ctx<'a> {
    pub now: Instant,
    pub poll: &'a Poll,
    pub conns: &'a mut Slab<PeerConn>,
    pub link: &'a mut ManagerLink,
    pub store: &'a SharedFolder,
    pub max_peers: usize,
    pub progress_bar: bool,
    pub revisit: &'a mut Vec<ConnId>,
}

/// How many times "who has" may come back empty before we give up: the
/// manager may have just restarted and not heard from the holders yet.
const LOCATE_ATTEMPTS: u32 = 5;
const LOCATE_RETRY: Duration = Duration::from_secs(1);
/// With no source at all for this long, the download fails.
const NO_SOURCE_LIMIT: Duration = Duration::from_secs(30);
/// How often verified progress is made durable (data synced, bitmap written).
const SAVE_INTERVAL: Duration = Duration::from_secs(2);
const TICK: Duration = Duration::from_millis(500);

struct Source {
    peer: PeerId,
    addr: SocketAddr,
    id: SourceId,
    connected: bool,
    /// Added to the scheduler (connected, and the manifest is known).
    scheduled: bool,
}

pub(super) struct Download {
    request: GetRequest,
    /// The version being fetched, once chosen.
    target: Option<HolderGroup>,
    locate_attempts: u32,
    locate_at: Option<Instant>,
    sources: BTreeMap<ConnId, Source>,
    /// Peers that lied or broke the protocol: never asked again this download.
    banned: HashSet<PeerId>,
    next_source: u32,
    manifest_from: Option<ConnId>,
    manifest: Option<Manifest>,
    partial: Option<PartialFile>,
    scheduler: Option<Scheduler>,
    started: Instant,
    resumed_bytes: u64,
    no_source_since: Option<Instant>,
    next_save: Instant,
    next_tick: Instant,
    peers_used: HashSet<PeerId>,
    progress: Option<ProgressReport>,
    outcome: Option<DownloadOutcome>,
}

impl Download {
    /// Checks the request against the folder. A file of that name with the
    /// requested hash is already done.
    pub fn start(request: GetRequest, store: &SharedFolder) -> Result<Download, DownloadOutcome> {
        if let (Some(local), Some(hash)) = (store.by_name(&request.name), request.hash) {
            return Err(same_or_clash(&request.name, &local.manifest, hash, store));
        }
        let now = Instant::now();
        Ok(Download {
            request,
            target: None,
            locate_attempts: 0,
            locate_at: None,
            sources: BTreeMap::new(),
            banned: HashSet::new(),
            next_source: 0,
            manifest_from: None,
            manifest: None,
            partial: None,
            scheduler: None,
            started: now,
            resumed_bytes: 0,
            no_source_since: Some(now),
            next_save: now + SAVE_INTERVAL,
            next_tick: now + TICK,
            peers_used: HashSet::new(),
            progress: None,
            outcome: None,
        })
    }

    pub fn name(&self) -> &FileName {
        &self.request.name
    }

    pub fn take_outcome(&mut self) -> Option<DownloadOutcome> {
        self.outcome.take()
    }

    pub fn begin(&mut self, ctx: &mut Ctx<'_>) {
        self.started = ctx.now;
        self.no_source_since = Some(ctx.now);
        self.locate(ctx);
    }

    fn locate(&mut self, ctx: &mut Ctx<'_>) {
        self.locate_attempts += 1;
        self.locate_at = None;
        log::debug!("asking the manager who has {}", self.request.name);
        ctx.link.ask(Query::WhoHas(self.request.name.clone()));
    }

    pub fn handle_query_failed(&mut self, ctx: &mut Ctx<'_>) {
        // The manager is away; the link reconnects, and we ask again.
        self.locate_at = Some(ctx.now + LOCATE_RETRY);
    }

    pub fn handle_holders(&mut self, name: FileName, groups: Vec<HolderGroup>, ctx: &mut Ctx<'_>) {
        if name != self.request.name || self.outcome.is_some() {
            return;
        }
        // We may be listed as a holder of our own (different) file of that
        // name: only other peers' copies count.
        let me = ctx.link.peer_id();
        let mut groups = groups;
        for g in &mut groups {
            g.peers.retain(|p| Some(p.id) != me);
        }
        groups.retain(|g| !g.peers.is_empty());
        groups.sort_by(|a, b| b.peers.len().cmp(&a.peers.len()).then(a.root.cmp(&b.root)));
        let chosen = match self.request.hash {
            Some(hash) => groups.iter().find(|g| g.root == hash),
            None => self
                .target
                .as_ref()
                .and_then(|t| groups.iter().find(|g| g.root == t.root))
                .or(groups.first()),
        };
        let Some(group) = chosen.cloned() else {
            return self.nobody_holds(&groups, ctx);
        };
        if self.target.is_none() {
            if let Some(local) = ctx.store.by_name(&self.request.name) {
                let outcome =
                    same_or_clash(&self.request.name, &local.manifest, group.root, ctx.store);
                self.outcome = Some(outcome);
                return;
            }
            if groups.len() > 1 {
                log::warn!(
                    "{} exists in {} versions; fetching {} ({} holders)",
                    self.request.name,
                    groups.len(),
                    group.root.short(),
                    group.peers.len()
                );
            }
        }
        let holders: Vec<PeerEntry> = group
            .peers
            .iter()
            .filter(|p| !self.banned.contains(&p.id))
            .copied()
            .collect();
        self.target = Some(group);
        if holders.is_empty() {
            return self.nobody_holds(&[], ctx);
        }
        for holder in holders {
            if self.sources.len() >= ctx.max_peers {
                break;
            }
            if !self.sources.values().any(|s| s.peer == holder.id) {
                self.connect(holder, ctx);
            }
        }
    }

    fn nobody_holds(&mut self, groups: &[HolderGroup], ctx: &mut Ctx<'_>) {
        if !self.sources.is_empty() {
            return; // still fetching from the ones we have
        }
        if self.locate_attempts < LOCATE_ATTEMPTS {
            self.locate_at = Some(ctx.now + LOCATE_RETRY);
            return;
        }
        let name = &self.request.name;
        let msg = match (self.request.hash, groups.is_empty()) {
            (Some(h), false) => format!(
                "no peer holds {name} with hash {}; versions on the network: {}",
                h.short(),
                groups
                    .iter()
                    .map(|g| g.root.short())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            _ if self.target.is_some() => {
                format!("no holder of {name} is reachable (every holder failed or left)")
            }
            _ => format!("{name} is not on the network: no live peer shares it (try `files`)"),
        };
        self.outcome = Some(DownloadOutcome::Failed(msg));
    }

    fn connect(&mut self, holder: PeerEntry, ctx: &mut Ctx<'_>) {
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
            let conn =
                Conn::new_registered(stream, holder.addr, Interest::READABLE | Interest::WRITABLE);
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
    fn source_ready(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
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

    fn ask_manifest(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
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
                    version == PROTOCOL_VERSION && role == Role::Peer
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
    fn handle_chunk(
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

    fn handle_manifest(&mut self, id: ConnId, manifest: Manifest, ctx: &mut Ctx<'_>) {
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
        let partial = match PartialFile::open(&dir, &manifest) {
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
    fn drive(&mut self, ctx: &mut Ctx<'_>) {
        let Some(sched) = self.scheduler.as_mut() else {
            return;
        };
        let Some(root) = self.manifest.as_ref().map(|m| m.root) else {
            return;
        };
        let by_sid: BTreeMap<SourceId, ConnId> =
            self.sources.iter().map(|(&k, s)| (s.id, k)).collect();
        let mut touched = Vec::new();
        let mut dropped = Vec::new();
        while let Some(action) = sched.poll_action() {
            match action {
                Action::Request { source, index } | Action::Cancel { source, index } => {
                    let Some(&id) = by_sid.get(&source) else {
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
                    if let Some(&id) = by_sid.get(&source) {
                        log::warn!(
                            "dropping source at {:?}: {reason:?}",
                            self.sources.get(&id).map(|s| s.addr)
                        );
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

    fn flush(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
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

    fn ban(&mut self, id: ConnId) {
        if let Some(s) = self.sources.get(&id) {
            self.banned.insert(s.peer);
        }
    }

    /// The source is gone or misbehaved: its chunks go back to the others.
    fn drop_source(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
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

    fn close_source(&mut self, id: ConnId, ctx: &mut Ctx<'_>) {
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
    fn refill_sources(&mut self, ctx: &mut Ctx<'_>) {
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

    pub fn handle_timeout(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(sched) = self.scheduler.as_mut() {
            sched.handle_timeout(ctx.now);
        }
        self.drive(ctx);
        if self.locate_at.is_some_and(|t| t <= ctx.now) && ctx.link.is_ready() {
            self.locate(ctx);
        }
        if ctx.now >= self.next_save {
            self.next_save = ctx.now + SAVE_INTERVAL;
            self.save_progress();
        }
        if ctx.now >= self.next_tick {
            self.next_tick = ctx.now + TICK;
            if let (Some(p), Some(s)) = (self.progress.as_mut(), self.scheduler.as_ref()) {
                p.update(s.progress().bytes_done, self.sources.len(), ctx.now);
            }
        }
        if self
            .no_source_since
            .is_some_and(|t| self.sources.is_empty() && t + NO_SOURCE_LIMIT <= ctx.now)
        {
            self.outcome = Some(DownloadOutcome::Failed(format!(
                "no holder of {} was reachable for {}s",
                self.request.name,
                NO_SOURCE_LIMIT.as_secs()
            )));
        }
        self.check_complete(ctx);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = net::earliest(self.locate_at, Some(self.next_tick));
        if self.manifest.is_some() {
            t = net::earliest(t, Some(self.next_save));
        }
        if let Some(s) = &self.scheduler {
            t = net::earliest(t, s.poll_timeout());
        }
        if let Some(since) = self.no_source_since {
            t = net::earliest(t, Some(since + NO_SOURCE_LIMIT));
        }
        t
    }

    fn check_complete(&mut self, ctx: &mut Ctx<'_>) {
        if self.outcome.is_some() || !self.scheduler.as_ref().is_some_and(|s| s.is_complete()) {
            return;
        }
        let (Some(partial), Some(manifest)) = (self.partial.take(), self.manifest.as_ref()) else {
            return;
        };
        if let Some(sched) = self.scheduler.as_ref() {
            for s in self.sources.values() {
                if let Some(st) = sched.source_stats(s.id) {
                    log::debug!(
                        "source {} at {}: {} chunks, {:.0} MB/s, depth {}, best latency {:?}",
                        s.peer,
                        s.addr,
                        st.chunks_received,
                        st.rate.unwrap_or(0.0) / 1e6,
                        st.target_depth,
                        st.min_latency
                    );
                }
            }
        }
        let secs = ctx.now.duration_since(self.started).as_secs_f64().max(1e-6);
        let fetched = manifest.size - self.resumed_bytes;
        let outcome = match partial.finish(ctx.store.dir(), &self.request.name) {
            Ok(path) => DownloadOutcome::Done(format!(
                "downloaded {} ({} bytes, {} fetched) in {:.2}s: {:.1} MB/s from {} peers; root {}; saved to {}\n",
                self.request.name,
                manifest.size,
                fetched,
                secs,
                fetched as f64 / secs / 1e6,
                self.peers_used.len(),
                manifest.root,
                path.display()
            )),
            Err(e) => DownloadOutcome::Failed(e.to_string()),
        };
        if let Some(p) = self.progress.take() {
            p.finish();
        }
        self.outcome = Some(outcome);
    }

    /// Makes verified chunks durable so a crash keeps them.
    pub fn save_progress(&mut self) {
        if let Some(p) = self.partial.as_mut()
            && let Err(e) = p.save_progress()
        {
            log::warn!("cannot save download progress: {e}");
        }
    }

    pub(super) fn close_sources(&mut self, poll: &Poll, conns: &mut Slab<PeerConn>) {
        for (id, _) in std::mem::take(&mut self.sources) {
            if let Some(mut pc) = conns.try_remove(id.0) {
                let conn = pc.conn();
                conn.deregister(poll.registry());
                conn.flush_and_close();
            }
        }
    }

    pub fn status_line(&self) -> String {
        match (&self.scheduler, &self.manifest) {
            (Some(s), Some(m)) => {
                let p = s.progress();
                format!(
                    "{}: {} of {} bytes, {} of {} chunks, {} sources\n",
                    self.request.name,
                    p.bytes_done,
                    m.size,
                    p.chunks_done,
                    p.chunks_total,
                    self.sources.len()
                )
            }
            _ => format!(
                "{}: locating holders ({} connecting)\n",
                self.request.name,
                self.sources.len()
            ),
        }
    }
}

/// A file of the requested name is already here: done if it is the same
/// content, an error (never an overwrite) if it is not.
fn same_or_clash(
    name: &FileName,
    local: &Manifest,
    wanted: Hash,
    store: &SharedFolder,
) -> DownloadOutcome {
    if local.root == wanted {
        DownloadOutcome::AlreadyHave(format!(
            "{name} is already in {} with the same content; nothing to do",
            store.dir().display()
        ))
    } else {
        DownloadOutcome::Failed(format!(
            "{} already holds a different {name} (hash {}, wanted {}); move or rename it first, it is never overwritten",
            store.dir().display(),
            local.root.short(),
            wanted.short()
        ))
    }
}
