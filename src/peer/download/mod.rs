//! One download, as the event loop runs it: ask the manager who holds the
//! file, pick the version, connect to the holders, fetch and check the
//! manifest, then let the [`Scheduler`] decide which chunk to ask of whom.
//! Every chunk is hashed on arrival and written at its offset into a partial
//! file under `.shoal/partial/`; the finished file is renamed into the folder.

mod sources;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Poll;
use slab::Slab;

use super::link::{ManagerLink, Query};
use super::node::PeerConn;
use super::progress::ProgressReport;
use super::scheduler::{Scheduler, SourceId};
use crate::net::{self, ConnId};
use crate::store::{Manifest, PartialFile, SharedFolder};
use crate::wire::{FileName, Hash, HolderGroup, PeerEntry, PeerId};

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

    /// The name and verified manifest of the file, once it is complete.
    pub fn completed_file(&self) -> Option<(FileName, Manifest)> {
        let done = self.scheduler.as_ref().is_some_and(|s| s.is_complete());
        let manifest = self.manifest.clone().filter(|_| done)?;
        Some((self.request.name.clone(), manifest))
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
        // By votes (one per registration), not by how many the answer lists:
        // the manager lists at most MAX_HOLDERS_PER_GROUP per version.
        groups.sort_by(|a, b| b.holders.cmp(&a.holders).then(a.root.cmp(&b.root)));
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

    pub fn handle_timeout(&mut self, ctx: &mut Ctx<'_>) {
        if let Some(sched) = self.scheduler.as_mut() {
            sched.handle_timeout(ctx.now);
        }
        self.drive(ctx);
        if self.locate_at.is_some_and(|t| t <= ctx.now) {
            if ctx.link.is_ready() {
                self.locate(ctx);
            } else {
                // The manager is away: try again later rather than leave a
                // deadline in the past (the loop would spin on it).
                self.locate_at = Some(ctx.now + LOCATE_RETRY);
            }
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
