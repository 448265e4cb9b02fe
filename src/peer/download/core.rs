//! The download state machine. Phases: `Locating` (asking the manager who
//! holds the file) -> `Manifest` (connecting to holders, asking a few of
//! them for the manifest at once) -> `Preparing` (the shell opens the
//! partial file and re-verifies what a previous run kept) -> `Transferring`
//! (the scheduler drives requests) -> `Finishing` (the shell moves the file
//! into the folder) -> `Ended`. Every wait has a deadline: a holder that
//! never greets, never answers the manifest or stalls mid-transfer is given
//! up on, and one that says Busy is asked again later with backoff.

use fixedbitset::FixedBitSet;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::GetRequest;
use super::outcome::{DownloadError, DownloadOutcome, DownloadSummary};
use crate::net::earliest;
use crate::peer::scheduler::{self, Arrival, DropReason, Scheduler, SchedulerConfig, SourceId};
use crate::store::{Manifest, hash_chunk};
use crate::wire::{
    Accept, ErrorCode, FileName, Hash, HolderGroup, Message, PROTOCOL_VERSION, PeerEntry, PeerId,
    PeerKey, Role, accept,
};

/// Limits and timers of one download.
#[derive(Debug, Clone)]
pub struct DownloadConfig {
    /// Most sources connected at once.
    pub max_sources: usize,
    /// Connect and hello must both finish within this.
    pub hello_timeout: Duration,
    /// A source asked for the manifest must answer within this.
    pub manifest_timeout: Duration,
    /// Sources asked for the manifest at once, so one silent holder cannot
    /// hold the download.
    pub manifest_fanout: usize,
    /// While no holder has answered the manifest, one more is asked each
    /// time this passes (a hedged request): one silent holder costs this
    /// much, and a prompt one means a single manifest is fetched.
    pub manifest_hedge: Duration,
    /// "Who has" answers with no holder before the download gives up.
    pub locate_attempts: u32,
    /// First wait before asking the manager again; doubles to `locate_max`.
    pub locate_retry: Duration,
    pub locate_max: Duration,
    /// With nothing from any source (the manifest, a verified chunk) for
    /// this long, the download fails: holders that accept and then say
    /// nothing count as none.
    pub no_source_limit: Duration,
    /// Answers in a row that list other versions but not ours before the
    /// download ends with `VersionGone`.
    pub version_gone_after: u32,
    /// How often verified chunks are made durable.
    pub save_interval: Duration,
    /// Wait before asking a holder again that was busy or unreachable;
    /// doubles per failure up to `retry_max`.
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub scheduler: SchedulerConfig,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            max_sources: 8,
            hello_timeout: Duration::from_secs(3),
            manifest_timeout: Duration::from_secs(3),
            manifest_fanout: 3,
            manifest_hedge: Duration::from_millis(500),
            locate_attempts: 5,
            locate_retry: Duration::from_secs(1),
            locate_max: Duration::from_secs(8),
            no_source_limit: Duration::from_secs(30),
            version_gone_after: 2,
            save_interval: Duration::from_secs(2),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
            scheduler: SchedulerConfig::default(),
        }
    }
}

/// One instruction for the shell.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ask the manager who holds `name`; answer with `handle_holders`.
    AskHolders(FileName),
    /// Open a connection; answer with `handle_connected` or `handle_closed`.
    Connect { source: SourceId, addr: SocketAddr },
    Send {
        source: SourceId,
        msg: Message<'static>,
    },
    /// Close the connection; the core has forgotten the source.
    Close { source: SourceId },
    /// Open (or create) the partial file for [`Download::manifest`],
    /// re-verify what it claims, and answer with `handle_partial_ready`.
    OpenPartial,
    /// Make verified chunks durable (sync data, then the bitmap).
    SaveProgress,
    /// Every chunk is verified: move the file into the folder and answer
    /// with `handle_finished`.
    Finish,
    /// The download is over; nothing more will come.
    Ended(DownloadOutcome),
}

/// A verified chunk the shell must write at `offset` (the bytes are the
/// ones it just handed in), then report with `handle_chunk_stored`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreChunk {
    pub index: u32,
    pub offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Locating,
    Manifest,
    Preparing,
    Transferring,
    Finishing,
    Ended,
}

/// Where a download stands, for `status` and progress bars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub name: FileName,
    pub phase: Phase,
    pub bytes_done: u64,
    pub size: Option<u64>,
    pub sources: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Connecting { since: Instant },
    AwaitingHello { since: Instant },
    Ready,
}

#[derive(Debug)]
struct Source {
    peer: PeerId,
    addr: SocketAddr,
    /// The key the manager listed for this holder (unknown on an open network).
    key: PeerKey,
    link: Link,
    /// Asked for the manifest at this time and not yet answered. Such a
    /// source may still send its manifest after another's arrived.
    manifest_asked: Option<Instant>,
    /// Handed to the scheduler.
    scheduled: bool,
    /// Its answer to `GetHaveMap`, until it is handed to the scheduler:
    /// `None` before the answer, `Some(None)` for a complete holder,
    /// `Some(Some(bits))` for one still downloading (`Have`s add bits).
    holding: Option<Option<FixedBitSet>>,
    /// Asked for its have-map at this time and not yet answered.
    have_asked: Option<Instant>,
}

/// A holder to leave alone until `until`; `delay` doubles per failure.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    until: Instant,
    delay: Duration,
}

pub struct Download {
    config: DownloadConfig,
    request: GetRequest,
    phase: Phase,
    /// The version being fetched, once chosen.
    target: Option<HolderGroup>,
    /// Root of the same-named file already in the folder, if any.
    local_root: Option<Hash>,
    /// "Who has" answers so far that listed no holder (before a target).
    locate_attempts: u32,
    locate_wait: Duration,
    locate_at: Option<Instant>,
    /// "Who has" answers in a row listing other versions but not ours.
    version_missing: u32,
    sources: BTreeMap<SourceId, Source>,
    next_source: u32,
    /// Peers that lied or broke the protocol: never asked again.
    banned: HashSet<PeerId>,
    backoff: HashMap<PeerId, Backoff>,
    manifest: Option<Manifest>,
    scheduler: Option<Scheduler>,
    started: Instant,
    resumed_bytes: u64,
    /// When a source last gave something (the manifest, a verified chunk),
    /// or the download started or its file was opened.
    progress_at: Instant,
    next_save: Option<Instant>,
    peers_used: HashSet<PeerId>,
    actions: VecDeque<Action>,
    /// The latest `now` an input carried (scheduler actions carry none).
    last_now: Instant,
    /// Chunks that failed their hash check (for metrics).
    corrupt_chunks: u64,
}

impl Download {
    /// A download of `request` into a folder whose file of that name (if
    /// any) has root `local_root`. It starts by asking who holds the file.
    pub fn new(
        request: GetRequest,
        local_root: Option<Hash>,
        config: DownloadConfig,
        now: Instant,
    ) -> Download {
        let locate_wait = config.locate_retry;
        let mut d = Download {
            config,
            request,
            phase: Phase::Locating,
            target: None,
            local_root,
            locate_attempts: 0,
            locate_wait,
            locate_at: None,
            version_missing: 0,
            sources: BTreeMap::new(),
            next_source: 0,
            banned: HashSet::new(),
            backoff: HashMap::new(),
            manifest: None,
            scheduler: None,
            started: now,
            resumed_bytes: 0,
            progress_at: now,
            next_save: None,
            peers_used: HashSet::new(),
            actions: VecDeque::new(),
            last_now: now,
            corrupt_chunks: 0,
        };
        match (local_root, d.request.hash) {
            (Some(local), Some(wanted)) => d.same_or_clash(local, wanted),
            _ => d.locate(),
        }
        d
    }

    pub fn name(&self) -> &FileName {
        &self.request.name
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The verified manifest, once known.
    pub fn manifest(&self) -> Option<&Manifest> {
        self.manifest.as_ref()
    }

    /// Peers this download is using: their departure from the network
    /// matters to it.
    pub fn source_peers(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.sources.values().map(|s| s.peer)
    }

    pub fn status(&self) -> Status {
        let bytes_done = self
            .scheduler
            .as_ref()
            .map_or(0, |s| s.progress().bytes_done);
        Status {
            name: self.request.name.clone(),
            phase: self.phase,
            bytes_done,
            size: self.manifest.as_ref().map(|m| m.size),
            sources: self.sources.len(),
        }
    }

    /// Chunks so far that did not match their hash (`--metrics`).
    pub fn corrupt_chunks(&self) -> u64 {
        self.corrupt_chunks
    }

    /// Whether `source` is still one of this download's sources.
    pub fn has_source(&self, source: SourceId) -> bool {
        self.sources.contains_key(&source)
    }

    /// What the next frame from `source` may be.
    pub fn accepts(&self, source: SourceId) -> Accept {
        match self.sources.get(&source) {
            Some(s) if s.link == Link::Ready && s.manifest_asked.is_some() => {
                accept::SOURCE_AWAITING_MANIFEST
            }
            Some(s) if s.link == Link::Ready => accept::SOURCE_TRANSFERRING,
            _ => accept::PEER_BEFORE_HELLO,
        }
    }

    // ---- inputs -------------------------------------------------------

    /// The manager's answer to "who has": holders grouped by version. `me`
    /// is this peer's own id (never a holder for itself).
    pub fn handle_holders(
        &mut self,
        groups: Vec<HolderGroup>,
        me: Option<PeerId>,
        local_root: Option<Hash>,
        now: Instant,
    ) {
        if self.phase == Phase::Ended {
            return;
        }
        self.local_root = local_root;
        let mut groups = groups;
        for g in &mut groups {
            g.peers.retain(|p| Some(p.id) != me);
            dedup_peers(&mut g.peers);
        }
        groups.retain(|g| !g.peers.is_empty());
        // Most holders first; the root breaks ties so the choice is stable.
        groups.sort_by(|a, b| b.holders.cmp(&a.holders).then(a.root.cmp(&b.root)));
        let wanted = self.target.as_ref().map(|t| t.root).or(self.request.hash);
        let chosen = match wanted {
            Some(root) => groups.iter().find(|g| g.root == root),
            None => groups.first(),
        };
        let Some(group) = chosen.cloned() else {
            return self.nobody_holds(&groups, now);
        };
        self.version_missing = 0;
        if self.target.is_none() {
            if let Some(local) = self.local_root {
                return self.same_or_clash(local, group.root);
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
            self.set_phase(Phase::Manifest);
        }
        self.target = Some(group.clone());
        let mut holders = group.peers;
        // Untried holders first, then those that failed least (the sort is
        // stable): one that keeps failing, back again each time its backoff
        // ends, must not crowd out holders listed after it.
        holders.sort_by_key(|p| self.backoff.get(&p.id).map(|b| b.delay));
        for holder in holders {
            if self.sources.len() >= self.config.max_sources {
                break;
            }
            let usable = !self.banned.contains(&holder.id)
                && self.backoff.get(&holder.id).is_none_or(|b| b.until <= now)
                && !self.sources.values().any(|s| s.peer == holder.id);
            if usable {
                self.connect(holder, now);
            }
        }
        self.schedule_locate(now);
    }

    /// The manager could not be asked (it is away); ask again later.
    pub fn handle_query_failed(&mut self, now: Instant) {
        if self.phase != Phase::Ended {
            self.locate_at = Some(now + self.config.locate_retry);
        }
    }

    /// The manager says these peers left the network (or were swept): their
    /// sources are dropped at once. Ids of peers we do not use are ignored.
    pub fn handle_peers_left(&mut self, left: &[PeerId], now: Instant) {
        let gone: Vec<SourceId> = self
            .sources
            .iter()
            .filter(|(_, s)| left.contains(&s.peer))
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            log::info!("source left the network; its chunks go to the others");
            self.drop_source(id, now);
        }
    }

    /// The connection to `source` is up: greet it.
    pub fn handle_connected(&mut self, source: SourceId, now: Instant) {
        let Some(s) = self.sources.get_mut(&source) else {
            return;
        };
        if let Link::Connecting { .. } = s.link {
            s.link = Link::AwaitingHello { since: now };
            log::debug!("connected to peer {} at {}", s.peer, s.addr);
            self.send(
                source,
                Message::Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Peer,
                },
            );
        }
    }

    /// The sealed connection to `source` proved the static key `remote`. A
    /// holder the manager listed with another key is not the peer we meant
    /// (a registration advertising someone else's address): it is dropped
    /// and not tried again in this download.
    pub fn handle_authenticated(&mut self, source: SourceId, remote: PeerKey, now: Instant) {
        let Some(s) = self.sources.get(&source) else {
            return;
        };
        if s.key == remote {
            return;
        }
        log::warn!(
            "dropping peer {} at {}: it proved key {remote}, but the manager listed {} for it",
            s.peer,
            s.addr,
            if s.key.is_known() {
                s.key.to_text()
            } else {
                "no key".to_string()
            },
        );
        self.banned.insert(s.peer);
        self.drop_source(source, now);
    }

    /// The connection to `source` failed or closed. `misbehaved` when it
    /// sent a frame that did not decode or was wrong for the state.
    pub fn handle_closed(&mut self, source: SourceId, misbehaved: bool, now: Instant) {
        if let Some(s) = self.sources.get(&source) {
            let peer = s.peer;
            if misbehaved {
                self.banned.insert(peer);
            } else if s.link != Link::Ready {
                self.back_off(peer, now);
            }
            self.forget_source(source, now);
        }
    }

    /// A frame from `source`. For a chunk that passes its hash check the
    /// answer says where to write it.
    pub fn handle_message(
        &mut self,
        source: SourceId,
        msg: Message<'_>,
        now: Instant,
    ) -> Option<StoreChunk> {
        self.last_now = now;
        let s = self.sources.get(&source)?;
        let peer = s.peer;
        match msg {
            Message::Chunk { index, data } => return self.handle_chunk(source, index, data, now),
            Message::Hello { version, role } if matches!(s.link, Link::AwaitingHello { .. }) => {
                if version != PROTOCOL_VERSION || role != Role::Peer {
                    log::warn!(
                        "peer {peer} at {} speaks protocol {version} as {role:?}; we need {PROTOCOL_VERSION}",
                        s.addr
                    );
                    self.banned.insert(peer);
                    self.drop_source(source, now);
                } else {
                    self.handle_greeted(source, now);
                }
            }
            Message::Manifest {
                root,
                size,
                chunk_size,
                hashes,
            } if s.manifest_asked.is_some() => {
                match Manifest::from_wire(root, size, chunk_size, hashes) {
                    Ok(m) => self.handle_manifest(source, m, now),
                    Err(e) => {
                        log::warn!("peer {peer} sent a bad manifest: {e}");
                        self.banned.insert(peer);
                        self.drop_source(source, now);
                    }
                }
            }
            Message::HaveMap { root, chunks, have } if s.holding.is_none() && !s.scheduled => {
                if !self.is_our_version(root, chunks) {
                    self.protocol_violation(source, "a have-map of another version", now);
                } else if let Some(s) = self.sources.get_mut(&source) {
                    s.holding = Some(have);
                    s.have_asked = None;
                    self.schedule_source(source, now);
                }
            }
            Message::Have { root, indices } => self.handle_have(source, root, &indices, now),
            Message::NoChunk { root, index } if self.is_our_version(root, 0) => {
                log::debug!("peer {peer} does not hold chunk {index} yet");
                if let Some(sched) = self.scheduler.as_mut() {
                    sched.handle_no_chunk(source, index, now);
                }
            }
            Message::Error { code, reason } => {
                log::warn!("peer {peer} at {} refused: {reason} ({code:?})", s.addr);
                match code {
                    // Full, or no longer holding this version: maybe later.
                    ErrorCode::Busy | ErrorCode::NotFound | ErrorCode::Internal => {
                        self.back_off(peer, now)
                    }
                    _ => {
                        self.banned.insert(peer);
                    }
                }
                self.drop_source(source, now);
            }
            Message::Pong { .. } => {}
            Message::Goodbye => self.drop_source(source, now),
            other => {
                log::warn!("peer {peer} sent unexpected {}", describe(&other));
                self.banned.insert(peer);
                self.drop_source(source, now);
            }
        }
        None
    }

    /// The shell wrote (or failed to write) a chunk `handle_message` passed.
    pub fn handle_chunk_stored(
        &mut self,
        source: SourceId,
        index: u32,
        result: std::io::Result<()>,
        now: Instant,
    ) {
        self.last_now = now;
        let Some(sched) = self.scheduler.as_mut() else {
            return;
        };
        match result {
            Ok(()) => {
                self.progress_at = now;
                sched.handle_chunk_verified(source, index, now);
                if let Some(s) = self.sources.get(&source) {
                    self.peers_used.insert(s.peer);
                    // It serves again: a later Busy (a seeder rotating who it
                    // serves) starts the wait from the shortest again.
                    self.backoff.remove(&s.peer);
                }
            }
            Err(e) => {
                let error = if e.kind() == std::io::ErrorKind::StorageFull {
                    format!(
                        "{e} (disk full: free some space and run get again; verified chunks are kept)"
                    )
                } else {
                    e.to_string()
                };
                self.fail(DownloadError::Disk {
                    name: self.request.name.clone(),
                    error,
                });
            }
        }
    }

    /// The partial file is open: `have[i]` for each chunk already verified
    /// on disk, and the free space left where it lives (if known).
    pub fn handle_partial_ready(
        &mut self,
        result: std::io::Result<(Vec<bool>, Option<u64>)>,
        now: Instant,
    ) {
        if self.phase != Phase::Preparing {
            return;
        }
        let Some(manifest) = self.manifest.as_ref() else {
            return;
        };
        let name = self.request.name.clone();
        let (have, free) = match result {
            Ok(r) => r,
            Err(e) => {
                return self.fail(DownloadError::Disk {
                    name,
                    error: format!("cannot open the partial file: {e}"),
                });
            }
        };
        let have_bytes: u64 = (0..manifest.chunk_count())
            .filter(|&i| have.get(i as usize).copied().unwrap_or(false))
            .map(|i| manifest.chunk_len(i) as u64)
            .sum();
        let need = manifest.size - have_bytes;
        if let Some(free) = free
            && free < need
        {
            return self.fail(DownloadError::DiskFull { name, need, free });
        }
        if have_bytes > 0 {
            log::info!(
                "resuming {name}: {have_bytes} of {} bytes already verified",
                manifest.size
            );
        }
        self.resumed_bytes = have_bytes;
        let lens = (0..manifest.chunk_count())
            .map(|i| manifest.chunk_len(i))
            .collect();
        self.scheduler = Some(Scheduler::new(lens, &have, self.config.scheduler.clone()));
        self.started = now;
        // Re-verifying a large partial file may take long: that is no
        // source's fault.
        self.progress_at = now;
        self.next_save = Some(now + self.config.save_interval);
        self.set_phase(Phase::Transferring);
        let ready: Vec<SourceId> = self
            .sources
            .iter()
            .filter(|(_, s)| s.link == Link::Ready && s.holding.is_some())
            .map(|(&id, _)| id)
            .collect();
        for id in ready {
            self.schedule_source(id, now);
        }
    }

    /// The shell moved the finished file into the folder (or could not).
    pub fn handle_finished(&mut self, result: Result<std::path::PathBuf, String>, now: Instant) {
        if self.phase != Phase::Finishing {
            return;
        }
        let Some(m) = self.manifest.as_ref() else {
            return;
        };
        let outcome = match result {
            Ok(path) => DownloadOutcome::Done(DownloadSummary {
                name: self.request.name.clone(),
                size: m.size,
                root: m.root,
                fetched_bytes: m.size - self.resumed_bytes,
                seconds: now.saturating_duration_since(self.started).as_secs_f64(),
                sources: self.peers_used.len(),
                path,
            }),
            Err(error) => DownloadOutcome::Failed(DownloadError::Disk {
                name: self.request.name.clone(),
                error,
            }),
        };
        self.end(outcome);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = now;
        if self.phase == Phase::Ended {
            return;
        }
        self.ask_manifests(now);
        let expired: Vec<(SourceId, &'static str)> = self
            .sources
            .iter()
            .filter_map(|(&id, s)| self.expiry(s, now).map(|why| (id, why)))
            .collect();
        for (id, why) in expired {
            if let Some(s) = self.sources.get(&id) {
                log::warn!("giving up on peer {} at {}: {why}", s.peer, s.addr);
                let peer = s.peer;
                self.back_off(peer, now);
            }
            self.drop_source(id, now);
        }
        if let Some(sched) = self.scheduler.as_mut() {
            sched.handle_timeout(now);
        }
        if self.locate_at.is_some_and(|t| t <= now) {
            self.locate();
        }
        if self.next_save.is_some_and(|t| t <= now) {
            self.next_save = Some(now + self.config.save_interval);
            self.actions.push_back(Action::SaveProgress);
        }
        if self.progress_at + self.config.no_source_limit <= now
            && matches!(self.phase, Phase::Manifest | Phase::Transferring)
        {
            self.fail(DownloadError::Unreachable {
                name: self.request.name.clone(),
                secs: self.config.no_source_limit.as_secs(),
            });
        }
    }

    /// The next instruction; call until `None` after every input.
    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        loop {
            if let Some(a) = self.actions.pop_front() {
                return Some(a);
            }
            let sched = self.scheduler.as_mut()?;
            let Some(action) = sched.poll_action() else {
                if self.phase == Phase::Transferring && sched.is_complete() {
                    self.set_phase(Phase::Finishing);
                    self.next_save = None;
                    return Some(Action::Finish);
                }
                return None;
            };
            self.translate(action);
        }
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Ended {
            return None;
        }
        let mut t = earliest(self.locate_at, self.next_save);
        t = earliest(t, self.manifest_hedge_at());
        for s in self.sources.values() {
            t = earliest(t, self.deadline(s));
        }
        if let Some(sched) = &self.scheduler {
            t = earliest(t, sched.poll_timeout());
        }
        if matches!(self.phase, Phase::Manifest | Phase::Transferring) {
            t = earliest(t, Some(self.progress_at + self.config.no_source_limit));
        }
        t
    }

    // ---- internals ----------------------------------------------------

    fn set_phase(&mut self, phase: Phase) {
        if self.phase != phase {
            log::debug!(
                "download {}: {:?} => {phase:?}",
                self.request.name,
                self.phase
            );
            self.phase = phase;
        }
    }

    fn locate(&mut self) {
        self.locate_at = None;
        log::debug!("asking the manager who has {}", self.request.name);
        self.actions
            .push_back(Action::AskHolders(self.request.name.clone()));
    }

    /// Below the source cap and not done: ask again for holders, less
    /// often the longer nothing changes.
    fn schedule_locate(&mut self, now: Instant) {
        let wanting = matches!(
            self.phase,
            Phase::Manifest | Phase::Preparing | Phase::Transferring
        ) && self.sources.len() < self.config.max_sources;
        if wanting && self.locate_at.is_none() {
            self.locate_at = Some(now + self.locate_wait);
            self.locate_wait = (self.locate_wait * 2).min(self.config.locate_max);
        }
    }

    fn nobody_holds(&mut self, groups: &[HolderGroup], now: Instant) {
        let name = self.request.name.clone();
        if let Some(target) = &self.target
            && !groups.is_empty()
        {
            // Ours is gone, others are there: the file was replaced.
            self.version_missing += 1;
            if self.version_missing >= self.config.version_gone_after {
                let root = target.root;
                let now_roots = groups.iter().map(|g| g.root).collect();
                return self.fail(DownloadError::VersionGone {
                    name,
                    root,
                    now: now_roots,
                });
            }
            self.locate_at = Some(now + self.config.locate_retry);
            return;
        }
        if self.target.is_some() {
            // Nobody lists it right now; sources we have may still serve,
            // and the no-source limit ends the wait.
            self.locate_at = Some(now + self.locate_wait);
            return;
        }
        // Only answers count: a question the manager never got (it was
        // away) says nothing about the file.
        self.locate_attempts += 1;
        if self.locate_attempts < self.config.locate_attempts {
            self.locate_at = Some(now + self.config.locate_retry);
            return;
        }
        let error = match self.request.hash {
            Some(wanted) if !groups.is_empty() => DownloadError::NoSuchVersion {
                name,
                wanted,
                available: groups.iter().map(|g| g.root).collect(),
            },
            _ => DownloadError::NotOnNetwork { name },
        };
        self.fail(error);
    }

    fn same_or_clash(&mut self, local: Hash, wanted: Hash) {
        let name = self.request.name.clone();
        if local == wanted {
            self.end(DownloadOutcome::AlreadyHave { name });
        } else {
            self.fail(DownloadError::Clash {
                name,
                local,
                wanted,
            });
        }
    }

    fn connect(&mut self, holder: PeerEntry, now: Instant) {
        self.next_source += 1;
        let id = SourceId(self.next_source);
        log::debug!("connecting to peer {} at {}", holder.id, holder.addr);
        self.sources.insert(
            id,
            Source {
                peer: holder.id,
                addr: holder.addr,
                key: holder.key,
                link: Link::Connecting { since: now },
                manifest_asked: None,
                scheduled: false,
                holding: None,
                have_asked: None,
            },
        );
        self.actions.push_back(Action::Connect {
            source: id,
            addr: holder.addr,
        });
    }

    /// The holder said hello: ask what it holds of our version (a complete
    /// holder answers "all", a peer still downloading its bits), and the
    /// manifest if we have none. It is handed to the scheduler once it has
    /// answered and the partial file is open.
    fn handle_greeted(&mut self, source: SourceId, now: Instant) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.link = Link::Ready;
        }
        if self.phase == Phase::Manifest {
            self.ask_manifests(now);
        }
        if let Some(root) = self.target.as_ref().map(|t| t.root) {
            if let Some(s) = self.sources.get_mut(&source) {
                s.have_asked = Some(now);
            }
            self.send(source, Message::GetHaveMap { root });
        }
    }

    /// Whether `root` (and `chunks`, unless 0) name the version we fetch.
    fn is_our_version(&self, root: Hash, chunks: u32) -> bool {
        self.target.as_ref().is_some_and(|t| t.root == root)
            && (chunks == 0
                || self
                    .manifest
                    .as_ref()
                    .is_none_or(|m| m.chunk_count() == chunks))
    }

    /// A `Have` batch: chunks `source` verified since its have-map.
    fn handle_have(&mut self, source: SourceId, root: Hash, indices: &[u32], now: Instant) {
        let chunks = self.manifest.as_ref().map_or(u32::MAX, |m| m.chunk_count());
        if !self.is_our_version(root, 0) || indices.iter().any(|&i| i >= chunks) {
            return self.protocol_violation(source, "a have of another version", now);
        }
        let Some(s) = self.sources.get_mut(&source) else {
            return;
        };
        match (&mut s.holding, s.scheduled) {
            (_, true) => {
                if let Some(sched) = self.scheduler.as_mut() {
                    for &i in indices {
                        sched.handle_have(source, i, now);
                    }
                }
            }
            (Some(Some(bits)), false) => {
                for &i in indices {
                    bits.grow(i as usize + 1);
                    bits.insert(i as usize);
                }
            }
            (Some(None), false) => {} // complete: it had them all along
            (None, false) => self.protocol_violation(source, "a have before its have-map", now),
        }
    }

    /// `source` broke the protocol: never asked again.
    fn protocol_violation(&mut self, source: SourceId, what: &str, now: Instant) {
        if let Some(s) = self.sources.get(&source) {
            log::warn!("peer {} at {} sent {what}; dropping it", s.peer, s.addr);
            self.banned.insert(s.peer);
        }
        self.drop_source(source, now);
    }

    /// When the next hedged manifest request is due, if one may be sent.
    fn manifest_hedge_at(&self) -> Option<Instant> {
        if self.phase != Phase::Manifest {
            return None;
        }
        let asked = self.sources.values().filter_map(|s| s.manifest_asked);
        let (count, newest) = asked.fold((0, None), |(n, t): (usize, Option<Instant>), a| {
            (n + 1, Some(t.map_or(a, |t| t.max(a))))
        });
        let idle = self
            .sources
            .values()
            .any(|s| s.link == Link::Ready && s.manifest_asked.is_none());
        if !idle || count >= self.config.manifest_fanout {
            return None;
        }
        Some(newest.map_or(self.last_now, |t| t + self.config.manifest_hedge))
    }

    /// Asks one more greeted source for the manifest if none is asked, or
    /// if the last ask has gone unanswered for `manifest_hedge`, up to
    /// `manifest_fanout` at once.
    fn ask_manifests(&mut self, now: Instant) {
        if self.manifest_hedge_at().is_none_or(|t| t > now) {
            return;
        }
        let Some(root) = self.target.as_ref().map(|t| t.root) else {
            return;
        };
        let idle: Vec<SourceId> = self
            .sources
            .iter()
            .filter(|(_, s)| s.link == Link::Ready && s.manifest_asked.is_none())
            .map(|(&id, _)| id)
            .take(1)
            .collect();
        for id in idle {
            if let Some(s) = self.sources.get_mut(&id) {
                s.manifest_asked = Some(now);
            }
            self.send(
                id,
                Message::GetManifest {
                    name: self.request.name.clone(),
                    root: Some(root),
                },
            );
        }
    }

    fn handle_manifest(&mut self, source: SourceId, manifest: Manifest, now: Instant) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.manifest_asked = None;
        }
        let expected = self.target.as_ref().map(|t| t.root);
        if expected.is_some_and(|r| r != manifest.root) {
            if let Some(s) = self.sources.get(&source) {
                log::warn!("peer {} sent the manifest of another version", s.peer);
                self.banned.insert(s.peer);
            }
            self.drop_source(source, now);
            return self.ask_manifests(now);
        }
        match self.phase {
            Phase::Manifest => {
                log::debug!("manifest: {} chunks", manifest.chunk_count());
                self.manifest = Some(manifest);
                self.progress_at = now;
                self.set_phase(Phase::Preparing);
                self.actions.push_back(Action::OpenPartial);
            }
            // A second copy (asked in parallel): the source is now just a source.
            Phase::Transferring => self.schedule_source(source, now),
            _ => {}
        }
    }

    fn schedule_source(&mut self, source: SourceId, now: Instant) {
        let (Some(sched), Some(s), Some(m)) = (
            self.scheduler.as_mut(),
            self.sources.get_mut(&source),
            self.manifest.as_ref(),
        ) else {
            return;
        };
        if s.link != Link::Ready || s.manifest_asked.is_some() || s.scheduled {
            return;
        }
        let Some(holding) = s.holding.take() else {
            return; // its have-map is still to come
        };
        if holding
            .as_ref()
            .is_some_and(|h| h.len() > m.chunk_count() as usize)
        {
            return self.protocol_violation(source, "a have-map of another size", now);
        }
        s.scheduled = true;
        sched.add_source_holding(source, holding, now);
    }

    fn handle_chunk(
        &mut self,
        source: SourceId,
        index: u32,
        data: &[u8],
        now: Instant,
    ) -> Option<StoreChunk> {
        let (Some(sched), Some(manifest)) = (self.scheduler.as_mut(), self.manifest.as_ref())
        else {
            // Before the manifest nobody was asked for a chunk.
            let peer = self.sources.get(&source)?.peer;
            log::warn!("peer {peer} sent a chunk nobody asked for");
            self.banned.insert(peer);
            self.drop_source(source, now);
            return None;
        };
        match sched.handle_chunk_arrived(source, index, now) {
            Arrival::Discard => None,
            Arrival::Verify => {
                let good = data.len() == manifest.chunk_len(index) as usize
                    && hash_chunk(data) == manifest.hashes[index as usize];
                if good {
                    return Some(StoreChunk {
                        index,
                        offset: manifest.chunk_offset(index),
                    });
                }
                self.corrupt_chunks += 1;
                if let Some(s) = self.sources.get(&source) {
                    log::warn!("peer {} sent a corrupt chunk {index}; dropping it", s.peer);
                    self.banned.insert(s.peer);
                }
                // The scheduler queues a DropSource, which closes it.
                sched.handle_chunk_corrupt(source, index, now);
                None
            }
        }
    }

    fn translate(&mut self, action: scheduler::Action) {
        let Some(root) = self.manifest.as_ref().map(|m| m.root) else {
            return;
        };
        match action {
            scheduler::Action::Request { source, index } => {
                self.send(source, Message::GetChunk { root, index })
            }
            scheduler::Action::Cancel { source, index } => {
                self.send(source, Message::Cancel { root, index })
            }
            scheduler::Action::DropSource { source, reason } => {
                if let Some(s) = self.sources.get(&source) {
                    log::warn!("dropping peer {} at {}: {reason}", s.peer, s.addr);
                    let peer = s.peer;
                    match reason {
                        // Not asked again at once: the next "who has" would
                        // hand it straight back, ahead of holders untried.
                        DropReason::Stalled | DropReason::Lacking => {
                            self.back_off(peer, self.last_now)
                        }
                        DropReason::Corrupt | DropReason::Unrequested => {
                            self.banned.insert(peer);
                        }
                    }
                }
                // The scheduler already forgot it.
                if let Some(s) = self.sources.get_mut(&source) {
                    s.scheduled = false;
                }
                self.forget_source(source, self.last_now);
                self.actions.push_back(Action::Close { source });
            }
        }
    }

    /// Drops a source we still hold a connection to.
    fn drop_source(&mut self, source: SourceId, now: Instant) {
        if self.sources.contains_key(&source) {
            self.forget_source(source, now);
            self.actions.push_back(Action::Close { source });
        }
    }

    /// Forgets a source whose connection is closed (or being closed): its
    /// chunks go back to the others, and a manifest it owed is asked of
    /// another.
    fn forget_source(&mut self, source: SourceId, now: Instant) {
        let Some(s) = self.sources.remove(&source) else {
            return;
        };
        if s.scheduled
            && let Some(sched) = self.scheduler.as_mut()
        {
            sched.remove_source(source, now);
        }
        self.locate_wait = self.config.locate_retry;
        self.ask_manifests(now);
        self.schedule_locate(now);
    }

    fn back_off(&mut self, peer: PeerId, now: Instant) {
        let delay = self.backoff.get(&peer).map_or(self.config.retry_min, |b| {
            (b.delay * 2).min(self.config.retry_max)
        });
        self.backoff.insert(
            peer,
            Backoff {
                until: now + delay,
                delay,
            },
        );
    }

    fn deadline(&self, s: &Source) -> Option<Instant> {
        match s.link {
            Link::Connecting { since } | Link::AwaitingHello { since } => {
                Some(since + self.config.hello_timeout)
            }
            Link::Ready => {
                earliest(s.manifest_asked, s.have_asked).map(|t| t + self.config.manifest_timeout)
            }
        }
    }

    fn expiry(&self, s: &Source, now: Instant) -> Option<&'static str> {
        self.deadline(s).filter(|&d| d <= now)?;
        Some(match s.link {
            Link::Connecting { .. } => "connect timed out",
            Link::AwaitingHello { .. } => "no hello",
            Link::Ready if s.manifest_asked.is_some() => "no manifest",
            Link::Ready => "no have-map",
        })
    }

    fn send(&mut self, source: SourceId, msg: Message<'static>) {
        self.actions.push_back(Action::Send { source, msg });
    }

    fn fail(&mut self, error: DownloadError) {
        self.end(DownloadOutcome::Failed(error));
    }

    fn end(&mut self, outcome: DownloadOutcome) {
        if self.phase == Phase::Ended {
            return;
        }
        self.set_phase(Phase::Ended);
        for id in std::mem::take(&mut self.sources).into_keys() {
            self.actions.push_back(Action::Close { source: id });
        }
        self.scheduler = None;
        self.locate_at = None;
        self.next_save = None;
        // Whatever was verified stays resumable.
        if self.manifest.is_some() && !matches!(outcome, DownloadOutcome::Done(_)) {
            self.actions.push_back(Action::SaveProgress);
        }
        self.actions.push_back(Action::Ended(outcome));
    }
}

/// One registration is one vote: a peer listed twice counts once.
fn dedup_peers(peers: &mut Vec<PeerEntry>) {
    let mut seen = HashSet::new();
    peers.retain(|p| seen.insert(p.id));
}

/// A short description of a message for logs (never a whole chunk).
fn describe(msg: &Message<'_>) -> String {
    match msg {
        Message::Chunk { index, data } => format!("chunk {index} ({} bytes)", data.len()),
        Message::Manifest { root, .. } => format!("manifest {}", root.short()),
        other => format!("{other:?}"),
    }
}
