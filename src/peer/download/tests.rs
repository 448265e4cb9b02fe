//! The whole download against a simulated network, in virtual time.
//!
//! A simulated manager answers "who has" after a delay, listing each holder
//! from the time the scenario says; simulated holders each have a behaviour
//! (honest, silent, greeting only, corrupt, busy, vanishing, replacing their
//! version); a simulated disk keeps the partial file in a `Vec<u8>`. The loop
//! carries the core's actions out the way `node/downloads.rs` does, and
//! time jumps to the next delivery or deadline. Checked at every step: a
//! Send or Close names only a connection that is up and not closed; no
//! chunk is stored twice, unverified or over one already on disk; at most
//! `max_sources` connections; one outcome, and nothing after it; after
//! `handle_timeout` the next deadline is in the future; Finish and Done
//! only with the file equal to the original, byte for byte.
//!
//! `SIM_SEED=n` runs one seed of each scenario, `SIM_TRACE=1` prints every
//! event and action, `SIM_SEEDS=n` hunts over more seeds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fastrand::Rng;

use super::*;
use crate::peer::scheduler::SourceId;
use crate::store::{Manifest, hash_chunk};
use crate::wire::{
    self, ErrorCode, HolderGroup, Message, PROTOCOL_VERSION, PeerEntry, PeerId, Role,
};

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;
const CHUNK: u32 = wire::MIN_CHUNK_SIZE;
/// A run still going after this much virtual time hangs.
const HANG: u64 = 600 * SEC;

/// One version of the file: its bytes and manifest.
struct Version {
    data: Vec<u8>,
    manifest: Manifest,
}

impl Version {
    fn new(rng: &mut Rng, size: usize) -> Version {
        let mut data = vec![0u8; size];
        rng.fill(&mut data);
        let hashes = data.chunks(CHUNK as usize).map(hash_chunk).collect();
        let manifest = Manifest::from_hashes(size as u64, CHUNK, hashes);
        Version { data, manifest }
    }

    fn chunk(&self, index: u32) -> &[u8] {
        let start = self.manifest.chunk_offset(index) as usize;
        &self.data[start..start + self.manifest.chunk_len(index) as usize]
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Behaviour {
    Honest,
    /// The connect fails.
    Unreachable,
    /// Accepts the connection, then never sends a byte.
    Silent,
    /// Sends hello, then nothing.
    HelloOnly,
    /// Sends hello and the manifest, then nothing.
    ManifestOnly,
    /// Its chunks from the `n`th it sends on (0-based) are corrupt.
    Corrupt(u32),
    /// Answers a hello with Busy (and closes) until then, then serves.
    BusyUntil(u64),
    /// Leaves the network then: its connections close, the manager drops it.
    VanishAt(u64),
    /// Replaces the file with another version then: the old root is
    /// NotFound, and the manager lists it under the new one.
    ReplaceAt(u64),
}

#[derive(Debug, Clone, Copy)]
struct HolderSpec {
    behaviour: Behaviour,
    /// Bytes per second, per connection.
    rate: f64,
    /// One-way, in nanoseconds.
    latency: u64,
    /// The manager lists it from then on.
    listed_at: u64,
}

impl HolderSpec {
    fn random(rng: &mut Rng, behaviour: Behaviour) -> HolderSpec {
        HolderSpec {
            behaviour,
            rate: rng.f64() * 40e6 + 2e6,
            latency: rng.u64(MS / 10..30 * MS),
            listed_at: 0,
        }
    }
}

struct Scenario {
    config: DownloadConfig,
    size: usize,
    holders: Vec<HolderSpec>,
    /// Chunks already verified on disk (resume); empty means none.
    have: Vec<bool>,
    /// Writes fail with StorageFull past this many bytes.
    disk_limit: Option<u64>,
    /// What the disk reports as free space.
    free_space: Option<u64>,
    /// The manager's answer takes this long.
    manager_delay: u64,
    /// Until then the manager is away: a question to it fails.
    manager_away_until: u64,
}

impl Scenario {
    fn new(size: usize, holders: Vec<HolderSpec>) -> Scenario {
        Scenario {
            config: DownloadConfig::default(),
            size,
            holders,
            have: Vec::new(),
            disk_limit: None,
            free_space: None,
            manager_delay: 5 * MS,
            manager_away_until: 0,
        }
    }
}

/// A frame in flight to the core (chunks carry owned bytes).
#[derive(Debug, Clone)]
enum ToCore {
    Msg(Message<'static>),
    Chunk { index: u32, data: Vec<u8> },
}

#[derive(Debug, Clone)]
enum Event {
    /// The manager answers "who has" with its list as of now.
    Holders,
    /// The question could not be asked: the manager is away.
    QueryFailed,
    PeersChanged,
    Vanish(usize),
    Replace(usize),
    Connected(SourceId),
    /// The holder closed the connection (or the connect failed).
    Closed(SourceId),
    ToHolder(SourceId, Message<'static>),
    ToCore(SourceId, ToCore),
    /// The holder finished sending a chunk on this connection.
    Free(SourceId),
}

/// One connection as both ends see it.
struct Conn {
    holder: usize,
    /// `handle_connected` was called.
    up: bool,
    /// Chunk requests the holder has not started on.
    queue: std::collections::VecDeque<u32>,
    sending: bool,
}

struct Result {
    outcome: DownloadOutcome,
    end: u64,
    /// Bytes written to the partial file.
    written: u64,
    /// Verified chunks each holder delivered.
    served: Vec<u32>,
    /// When each holder answered Busy, and when it was connected to.
    busy_at: Vec<Vec<u64>>,
    connect_at: Vec<Vec<u64>>,
    finished: bool,
    /// When the partial file was opened (the manifest verified).
    opened_at: Option<u64>,
    /// When each holder's first corrupt chunk reached the core.
    corrupt_at: Vec<Option<u64>>,
}

struct Sim<'a> {
    scn: &'a Scenario,
    rng: Rng,
    base: Instant,
    now: u64,
    seq: u64,
    events: BinaryHeap<Reverse<(u64, u64, usize)>>,
    payloads: HashMap<usize, Event>,
    core: Download,
    original: Version,
    replacement: Version,
    /// Holder index by address.
    addrs: HashMap<SocketAddr, usize>,
    conns: BTreeMap<SourceId, Conn>,
    /// Every source the core ever named in a Connect.
    issued: std::collections::HashSet<SourceId>,
    replaced: Vec<bool>,
    vanished: Vec<bool>,
    sent_chunks: Vec<u32>,
    // The disk.
    disk: Vec<u8>,
    written: Vec<u32>,
    written_bytes: u64,
    opened: Option<u64>,
    finished: bool,
    outcome: Option<(DownloadOutcome, u64)>,
    served: Vec<u32>,
    busy_at: Vec<Vec<u64>>,
    connect_at: Vec<Vec<u64>>,
    corrupt_at: Vec<Option<u64>>,
    /// SIM_TRACE set: print every event and action.
    trace: bool,
}

fn describe_action(a: &Action) -> String {
    match a {
        Action::Send {
            source,
            msg: Message::Manifest { .. },
        } => format!("send {source:?} manifest"),
        other => format!("{other:?}"),
    }
}

fn describe_event(e: &Event) -> String {
    match e {
        Event::ToCore(s, ToCore::Chunk { index, .. }) => format!("{s:?} chunk {index}"),
        Event::ToCore(s, ToCore::Msg(Message::Manifest { .. })) => format!("{s:?} manifest"),
        other => format!("{other:?}"),
    }
}

fn addr(k: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (k >> 8) as u8, k as u8], 7000))
}

fn name() -> wire::FileName {
    wire::FileName::new("file.bin").unwrap()
}

impl<'a> Sim<'a> {
    fn new(scn: &'a Scenario, seed: u64) -> Sim<'a> {
        let mut rng = Rng::with_seed(seed);
        let original = Version::new(&mut rng, scn.size);
        // Only a scenario whose holders replace the file needs a second version.
        let replaces = scn
            .holders
            .iter()
            .any(|h| matches!(h.behaviour, Behaviour::ReplaceAt(_)));
        let replacement = Version::new(&mut rng, if replaces { scn.size } else { 0 });
        let n = scn.holders.len();
        let base = Instant::now();
        let request = GetRequest {
            name: name(),
            hash: None,
        };
        let core = Download::new(request, None, scn.config.clone(), base);
        let mut sim = Sim {
            scn,
            rng,
            base,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            payloads: HashMap::new(),
            core,
            disk: vec![0; scn.size],
            original,
            replacement,
            addrs: (0..n).map(|k| (addr(k), k)).collect(),
            conns: BTreeMap::new(),
            issued: Default::default(),
            replaced: vec![false; n],
            vanished: vec![false; n],
            sent_chunks: vec![0; n],
            written: Vec::new(),
            written_bytes: 0,
            opened: None,
            finished: false,
            outcome: None,
            served: vec![0; n],
            busy_at: vec![Vec::new(); n],
            connect_at: vec![Vec::new(); n],
            corrupt_at: vec![None; n],
            trace: std::env::var_os("SIM_TRACE").is_some(),
        };
        for (k, h) in scn.holders.iter().enumerate() {
            match h.behaviour {
                Behaviour::VanishAt(t) => sim.push(t, Event::Vanish(k)),
                Behaviour::ReplaceAt(t) => sim.push(t, Event::Replace(k)),
                _ => {}
            }
        }
        sim
    }

    fn at(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn push(&mut self, t: u64, ev: Event) {
        self.seq += 1;
        self.payloads.insert(self.seq as usize, ev);
        self.events.push(Reverse((t, self.seq, self.seq as usize)));
    }

    fn run(mut self) -> Result {
        self.drain();
        let mut steps = 0u64;
        while self.outcome.is_none() {
            steps += 1;
            assert!(
                steps < 5_000_000 && self.now < HANG,
                "hangs at t={}ms in {:?}",
                self.now / MS,
                self.core.phase()
            );
            let next_event = self.events.peek().map(|Reverse((t, ..))| *t);
            let deadline = self
                .core
                .poll_timeout()
                .map(|d| d.duration_since(self.base).as_nanos() as u64);
            match (next_event, deadline) {
                (None, None) => panic!(
                    "stuck at t={}ms in {:?}: nothing pending",
                    self.now / MS,
                    self.core.phase()
                ),
                (ev, Some(d)) if ev.is_none_or(|e| d <= e) => {
                    self.now = self.now.max(d);
                    let now = self.at(self.now);
                    self.core.handle_timeout(now);
                    self.drain();
                    if let Some(t) = self.core.poll_timeout() {
                        assert!(
                            t > now,
                            "t={}ms: after handle_timeout the next deadline is not in the future",
                            self.now / MS
                        );
                    }
                }
                _ => {
                    // Invariant: peek just returned Some.
                    let Reverse((t, _, key)) = self.events.pop().unwrap();
                    self.now = t;
                    let ev = self.payloads.remove(&key).unwrap();
                    self.handle_event(ev);
                    self.drain();
                }
            }
        }
        // Nothing follows the outcome.
        assert!(self.core.poll_action().is_none());
        assert_eq!(self.core.poll_timeout(), None);
        let (outcome, end) = self.outcome.take().unwrap();
        if let DownloadOutcome::Done(summary) = &outcome {
            assert!(self.finished);
            assert_eq!(self.disk, self.original.data, "assembled file differs");
            assert_eq!(summary.size, self.scn.size as u64);
            assert_eq!(summary.root, self.original.manifest.root);
            assert_eq!(summary.fetched_bytes, self.written_bytes);
        }
        Result {
            outcome,
            end,
            written: self.written_bytes,
            served: self.served,
            busy_at: self.busy_at,
            connect_at: self.connect_at,
            finished: self.finished,
            opened_at: self.opened,
            corrupt_at: self.corrupt_at,
        }
    }

    /// The manager's answer now: every listed holder, by its current version.
    fn groups(&self) -> Vec<HolderGroup> {
        let mut groups: Vec<HolderGroup> = Vec::new();
        for (k, h) in self.scn.holders.iter().enumerate() {
            if h.listed_at > self.now || self.vanished[k] {
                continue;
            }
            let root = if self.replaced[k] {
                self.replacement.manifest.root
            } else {
                self.original.manifest.root
            };
            let entry = PeerEntry {
                id: PeerId(k as u64 + 1),
                addr: addr(k),
                key: Default::default(),
            };
            match groups.iter_mut().find(|g| g.root == root) {
                Some(g) => {
                    g.peers.push(entry);
                    g.holders += 1;
                }
                None => groups.push(HolderGroup {
                    root,
                    size: self.scn.size as u64,
                    peers: vec![entry],
                    holders: 1,
                }),
            }
        }
        groups
    }

    fn handle_event(&mut self, ev: Event) {
        let now = self.at(self.now);
        if self.trace {
            eprintln!(
                "{:>8.3}s  event {}",
                self.now as f64 / 1e9,
                describe_event(&ev)
            );
        }
        match ev {
            Event::QueryFailed => self.core.handle_query_failed(now),
            Event::Holders => {
                let groups = self.groups();
                self.core.handle_holders(groups, None, None, now)
            }
            Event::PeersChanged => {
                // The manager's delta names every holder that vanished.
                let left: Vec<PeerId> = (0..self.vanished.len())
                    .filter(|&k| self.vanished[k])
                    .map(|k| PeerId(k as u64 + 1))
                    .collect();
                self.core.handle_peers_left(&left, now);
            }
            Event::Vanish(k) => {
                self.vanished[k] = true;
                let ids: Vec<SourceId> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| c.holder == k)
                    .map(|(&s, _)| s)
                    .collect();
                for s in ids {
                    self.conns.remove(&s);
                    self.core.handle_closed(s, false, now);
                }
                let t = self.now + 50 * MS;
                self.push(t, Event::PeersChanged);
            }
            Event::Replace(k) => self.replaced[k] = true,
            Event::Connected(s) => {
                if let Some(c) = self.conns.get_mut(&s) {
                    c.up = true;
                    self.core.handle_connected(s, now);
                }
            }
            Event::Closed(s) => {
                if self.conns.remove(&s).is_some() {
                    self.core.handle_closed(s, false, now);
                }
            }
            Event::ToHolder(s, msg) => self.holder_gets(s, msg),
            Event::ToCore(s, msg) => {
                if !self.conns.contains_key(&s) {
                    return;
                }
                let k = self.conns[&s].holder;
                match msg {
                    ToCore::Msg(m) => {
                        let stored = self.core.handle_message(s, m, now);
                        assert_eq!(stored, None, "a non-chunk frame was stored");
                    }
                    ToCore::Chunk { index, data } => {
                        if index < self.original.manifest.chunk_count()
                            && data != self.original.chunk(index)
                        {
                            self.corrupt_at[k].get_or_insert(self.now);
                        }
                        if let Some(store) =
                            self.core
                                .handle_message(s, Message::Chunk { index, data: &data }, now)
                        {
                            let result = self.write(store, &data);
                            if result.is_ok() {
                                self.served[k] += 1;
                            }
                            self.core.handle_chunk_stored(s, index, result, now);
                        }
                    }
                }
            }
            Event::Free(s) => {
                if let Some(c) = self.conns.get_mut(&s) {
                    c.sending = false;
                    self.serve(s);
                }
            }
        }
    }

    /// The shell writes a chunk the core passed: it must be verified (equal
    /// to the original's) and never written before.
    fn write(&mut self, store: StoreChunk, data: &[u8]) -> io::Result<()> {
        assert!(
            self.opened.is_some(),
            "chunk stored before the partial file was opened"
        );
        let index = store.index;
        let m = &self.original.manifest;
        assert!(index < m.chunk_count(), "chunk {index} out of range");
        assert_eq!(store.offset, m.chunk_offset(index));
        assert_eq!(
            data,
            self.original.chunk(index),
            "t={}ms: chunk {index} stored unverified",
            self.now / MS
        );
        assert_eq!(
            self.written[index as usize], 0,
            "chunk {index} written twice"
        );
        assert!(
            !self.scn.have.get(index as usize).copied().unwrap_or(false),
            "chunk {index} was already on disk"
        );
        if let Some(limit) = self.scn.disk_limit
            && self.written_bytes + data.len() as u64 > limit
        {
            return Err(io::Error::new(io::ErrorKind::StorageFull, "no space left"));
        }
        self.written[index as usize] += 1;
        self.written_bytes += data.len() as u64;
        let start = store.offset as usize;
        self.disk[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Carries out the core's actions until it asks nothing, checking each.
    fn drain(&mut self) {
        while let Some(action) = self.core.poll_action() {
            assert!(
                self.outcome.is_none(),
                "t={}ms: {action:?} after the outcome",
                self.now / MS
            );
            self.check_action(&action);
            if self.trace {
                eprintln!(
                    "{:>8.3}s  {}",
                    self.now as f64 / 1e9,
                    describe_action(&action)
                );
            }
            self.apply(action);
            assert!(
                self.conns.len() <= self.scn.config.max_sources,
                "t={}ms: {} sources at once",
                self.now / MS,
                self.conns.len()
            );
        }
    }

    fn check_action(&self, action: &Action) {
        let t = self.now / MS;
        match action {
            Action::Send { source, msg } => {
                let c = self.conns.get(source);
                assert!(
                    c.is_some_and(|c| c.up),
                    "t={t}ms: {msg:?} to {source:?}, not connected or closed"
                );
            }
            Action::Close { source } => assert!(
                self.conns.contains_key(source),
                "t={t}ms: close of {source:?}, never connected or closed"
            ),
            Action::Connect { source, .. } => {
                assert!(!self.issued.contains(source), "{source:?} reused")
            }
            _ => {}
        }
    }

    fn apply(&mut self, action: Action) {
        let now = self.at(self.now);
        match action {
            Action::AskHolders(n) => {
                assert_eq!(n, name());
                if self.now < self.scn.manager_away_until {
                    // The link notices at once that it cannot ask.
                    return self.push(self.now + MS, Event::QueryFailed);
                }
                let t = self.now + self.scn.manager_delay;
                self.push(t, Event::Holders);
            }
            Action::Connect { source, addr } => {
                self.issued.insert(source);
                let k = self.addrs[&addr];
                self.connect_at[k].push(self.now);
                self.conns.insert(
                    source,
                    Conn {
                        holder: k,
                        up: false,
                        queue: Default::default(),
                        sending: false,
                    },
                );
                let h = self.scn.holders[k];
                let t = self.now + 2 * h.latency;
                if h.behaviour == Behaviour::Unreachable || self.vanished[k] {
                    self.push(t, Event::Closed(source));
                } else {
                    self.push(t, Event::Connected(source));
                }
            }
            Action::Send { source, msg } => {
                let k = self.conns[&source].holder;
                let t = self.now + self.scn.holders[k].latency;
                self.push(t, Event::ToHolder(source, msg));
            }
            Action::Close { source } => {
                self.conns.remove(&source);
            }
            Action::OpenPartial => {
                assert!(self.opened.is_none(), "partial file opened twice");
                self.opened = Some(self.now);
                let m = self.core.manifest().expect("OpenPartial without manifest");
                assert_eq!(m.root, self.original.manifest.root);
                let n = m.chunk_count() as usize;
                self.written = vec![0; n];
                let mut have = self.scn.have.clone();
                have.resize(n, false);
                for i in (0..n).filter(|&i| have[i]) {
                    let start = i * CHUNK as usize;
                    let chunk = self.original.chunk(i as u32).to_vec();
                    self.disk[start..start + chunk.len()].copy_from_slice(&chunk);
                }
                self.core
                    .handle_partial_ready(Ok((have, self.scn.free_space)), now);
            }
            Action::SaveProgress => {}
            Action::Finish => {
                assert!(!self.finished, "finished twice");
                assert_eq!(self.disk, self.original.data, "finishing mixed data");
                self.finished = true;
                self.core
                    .handle_finished(Ok(PathBuf::from("file.bin")), now);
            }
            Action::Ended(outcome) => {
                assert!(self.outcome.is_none(), "a second outcome");
                if !matches!(outcome, DownloadOutcome::Done(_)) {
                    assert!(!self.finished, "finished, yet {outcome:?}");
                }
                self.outcome = Some((outcome, self.now));
            }
        }
    }

    /// A holder's answer to one frame.
    fn holder_gets(&mut self, s: SourceId, msg: Message<'static>) {
        let Some(c) = self.conns.get(&s) else {
            return;
        };
        let k = c.holder;
        let h = self.scn.holders[k];
        let back = self.now + h.latency;
        let root = self.holder_root(k);
        match (msg, h.behaviour) {
            (_, Behaviour::Silent) => {}
            (Message::Hello { version, role }, b) => {
                assert_eq!((version, role), (PROTOCOL_VERSION, Role::Peer));
                if let Behaviour::BusyUntil(until) = b
                    && self.now < until
                {
                    self.busy_at[k].push(self.now);
                    self.reply(back, s, error(ErrorCode::Busy));
                    return self.push(back + 1, Event::Closed(s));
                }
                self.reply(
                    back,
                    s,
                    Message::Hello {
                        version: PROTOCOL_VERSION,
                        role: Role::Peer,
                    },
                );
            }
            (_, Behaviour::HelloOnly) => {}
            (
                Message::GetManifest {
                    name: n,
                    root: want,
                },
                _,
            ) => {
                assert_eq!(n, name());
                if want.is_some_and(|w| w != root) {
                    self.reply(back, s, error(ErrorCode::NotFound));
                    return self.push(back + 1, Event::Closed(s));
                }
                let m = if self.replaced[k] {
                    &self.replacement.manifest
                } else {
                    &self.original.manifest
                };
                let msg = Message::Manifest {
                    root: m.root,
                    size: m.size,
                    chunk_size: m.chunk_size,
                    hashes: m.hashes.clone(),
                };
                self.reply(back, s, msg);
            }
            (Message::GetHaveMap { root: want }, _) => {
                if want != root {
                    self.reply(back, s, error(ErrorCode::NotFound));
                    return self.push(back + 1, Event::Closed(s));
                }
                let chunks = self.original.manifest.chunk_count();
                let msg = Message::HaveMap {
                    root,
                    chunks,
                    have: None,
                };
                self.reply(back, s, msg);
            }
            (_, Behaviour::ManifestOnly) => {}
            (Message::GetChunk { root: want, index }, _) => {
                if let Some(c) = self.conns.get_mut(&s) {
                    c.queue.push_back(index);
                }
                if want != root {
                    self.reply(back, s, error(ErrorCode::NotFound));
                    return self.push(back + 1, Event::Closed(s));
                }
                self.serve(s);
            }
            (Message::Cancel { index, .. }, _) => {
                if let Some(c) = self.conns.get_mut(&s) {
                    c.queue.retain(|&i| i != index);
                }
            }
            (other, _) => panic!("a holder got {other:?}"),
        }
    }

    fn holder_root(&self, k: usize) -> wire::Hash {
        if self.replaced[k] {
            self.replacement.manifest.root
        } else {
            self.original.manifest.root
        }
    }

    fn reply(&mut self, t: u64, s: SourceId, msg: Message<'static>) {
        self.push(t, Event::ToCore(s, ToCore::Msg(msg)));
    }

    /// Starts sending the next queued chunk, if the holder is idle.
    fn serve(&mut self, s: SourceId) {
        let Some(c) = self.conns.get_mut(&s) else {
            return;
        };
        if c.sending {
            return;
        }
        let Some(index) = c.queue.pop_front() else {
            return;
        };
        c.sending = true;
        let k = c.holder;
        let h = self.scn.holders[k];
        if self.replaced[k] {
            let t = self.now + h.latency;
            self.reply(t, s, error(ErrorCode::NotFound));
            return self.push(t + 1, Event::Closed(s));
        }
        let mut data = self.original.chunk(index).to_vec();
        if let Behaviour::Corrupt(from) = h.behaviour
            && self.sent_chunks[k] >= from
        {
            let at = self.rng.usize(..data.len());
            data[at] ^= 1 << self.rng.u32(..8);
        }
        self.sent_chunks[k] += 1;
        let send = (data.len() as f64 / h.rate * 1e9) as u64;
        self.push(self.now + send, Event::Free(s));
        self.push(
            self.now + send + h.latency,
            Event::ToCore(s, ToCore::Chunk { index, data }),
        );
    }
}

fn error(code: ErrorCode) -> Message<'static> {
    Message::Error {
        code,
        reason: format!("{code:?}"),
    }
}

/// Runs `make`'s scenario over `seeds` seeds and hands each result to `check`.
fn each_seed(
    seeds: u64,
    make: impl Fn(&mut Rng) -> Scenario,
    check: impl Fn(u64, &Scenario, &Result),
) {
    // SIM_SEED=n runs that seed alone (with SIM_TRACE, to read one run).
    // SIM_SEEDS=n runs n seeds instead (a longer hunt).
    let var = |name| std::env::var(name).ok().and_then(|s| s.parse::<u64>().ok());
    let seeds = var("SIM_SEEDS").unwrap_or(seeds);
    for seed in var("SIM_SEED").map_or(0..seeds, |s| s..s + 1) {
        let mut rng = Rng::with_seed(seed ^ 0x5ea1);
        let scn = make(&mut rng);
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Sim::new(&scn, seed).run()));
        match result {
            Ok(r) => check(seed, &scn, &r),
            Err(e) => {
                eprintln!("seed {seed} failed: {:?}", scn.holders);
                std::panic::resume_unwind(e)
            }
        }
    }
}

const SEEDS: u64 = 200;

fn done(seed: u64, r: &Result) -> &DownloadSummary {
    match &r.outcome {
        DownloadOutcome::Done(s) => s,
        other => panic!("seed {seed}: {other:?} at t={}ms", r.end / MS),
    }
}

fn honest(rng: &mut Rng) -> HolderSpec {
    HolderSpec::random(rng, Behaviour::Honest)
}

/// A file of a few dozen chunks, the last one usually short.
fn small_size(rng: &mut Rng) -> usize {
    rng.usize(20..60) * CHUNK as usize - rng.usize(0..CHUNK as usize)
}

fn bad_behaviour(rng: &mut Rng) -> Behaviour {
    match rng.u32(0..4) {
        0 => Behaviour::Unreachable,
        1 => Behaviour::Silent,
        2 => Behaviour::HelloOnly,
        _ => Behaviour::ManifestOnly,
    }
}

#[test]
fn manifest_falls_back_past_holders_that_never_answer() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(1..5))
                .map(|_| {
                    let b = bad_behaviour(rng);
                    HolderSpec::random(rng, b)
                })
                .collect();
            holders.extend((0..rng.usize(1..3)).map(|_| honest(rng)));
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.config.max_sources = rng.usize(1..9);
            scn
        },
        |seed, _, r| {
            done(seed, r);
        },
    );
}

/// Regression: the scheduler's Stalled drop neither banned nor backed off
/// the holder, so the next "who has" handed the same stallers straight back
/// ahead of the honest holder listed after them, forever. Then, backed off
/// but back each time the backoff ended, they still came first in list
/// order, ahead of the honest holder never tried.
#[test]
fn stalling_holders_listed_first_do_not_crowd_out_a_good_one() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(2..5))
                .map(|_| HolderSpec::random(rng, Behaviour::ManifestOnly))
                .collect();
            holders.push(honest(rng));
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.config.max_sources = rng.usize(1..scn.holders.len());
            scn
        },
        |seed, scn, r| {
            done(seed, r);
            // No staller is tried twice before the honest holder once.
            let good = scn.holders.len() - 1;
            let first = r.connect_at[good][0];
            for (k, at) in r.connect_at[..good].iter().enumerate() {
                let before = at.iter().filter(|&&t| t < first).count();
                assert!(
                    before <= 1,
                    "seed {seed}: holder {k} tried {before} times first"
                );
            }
        },
    );
}

#[test]
fn three_silent_holders_before_an_honest_one_finish_within_5s() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..3)
                .map(|_| HolderSpec::random(rng, Behaviour::Silent))
                .collect();
            holders.push(HolderSpec {
                behaviour: Behaviour::Honest,
                rate: rng.f64() * 90e6 + 10e6,
                latency: rng.u64(MS / 10..20 * MS),
                listed_at: 0,
            });
            Scenario::new(2 << 20, holders)
        },
        |seed, _, r| {
            done(seed, r);
            assert!(r.end < 5 * SEC, "seed {seed}: took {}ms", r.end / MS);
        },
    );
}

/// Regression: the no-source clock was reset by every accepted connection
/// and only ran with no connection at all, so holders that accept and say
/// nothing (reconnected after each backoff) kept the download going forever.
/// The same with holders that greet and then say nothing: once the honest
/// holder's manifest starts the transfer, they are handed to the scheduler
/// too. Fails for 3 of the first 200 seeds (7, 120, 172: done at 5.09 to
/// 5.11 s): in the endgame the scheduler gives the duplicate of a chunk one
/// such holder owes to another such holder (which has delivered nothing,
/// while the honest one delivers a chunk a millisecond), and with
/// `max_endgame_duplicates` = 2 the honest holder never gets a copy, so the
/// file waits out `stall_timeout`. A scheduler matter
/// (src/peer/scheduler/endgame.rs), not the download core's.
#[test]

fn greeting_only_holders_before_an_honest_one_finish_within_5s() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..3)
                .map(|_| HolderSpec::random(rng, Behaviour::HelloOnly))
                .collect();
            holders.push(HolderSpec {
                behaviour: Behaviour::Honest,
                rate: rng.f64() * 90e6 + 10e6,
                latency: rng.u64(MS / 10..20 * MS),
                listed_at: 0,
            });
            Scenario::new(2 << 20, holders)
        },
        |seed, _, r| {
            done(seed, r);
            assert!(r.end < 5 * SEC, "seed {seed}: took {}ms", r.end / MS);
        },
    );
}

/// Regression: the no-source clock was reset by every accepted connection
/// and only ran with no connection at all, so holders that accept and say
/// nothing (reconnected after each backoff) kept the download going forever.
#[test]
fn no_reachable_holder_ends_unreachable_within_the_limit() {
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..6))
                .map(|_| {
                    // Unreachable or silent, as the limit promises; or
                    // useless in some later way (greets only, stalls after
                    // the manifest, busy for ever).
                    let b = match rng.u32(0..3) {
                        0 => Behaviour::Unreachable,
                        1 => Behaviour::Silent,
                        _ => match rng.u32(0..3) {
                            0 => Behaviour::HelloOnly,
                            1 => Behaviour::ManifestOnly,
                            _ => Behaviour::BusyUntil(HANG),
                        },
                    };
                    HolderSpec::random(rng, b)
                })
                .collect();
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.config.max_sources = rng.usize(1..9);
            scn
        },
        |seed, scn, r| {
            assert!(
                matches!(
                    r.outcome,
                    DownloadOutcome::Failed(DownloadError::Unreachable { .. })
                ),
                "seed {seed}: {:?}",
                r.outcome
            );
            // From the last thing gained: the start, or the manifest.
            let limit = scn.config.no_source_limit.as_nanos() as u64;
            let from = r.opened_at.unwrap_or(0);
            assert!(
                r.end >= from + limit && r.end <= from + limit + SEC / 10,
                "seed {seed}: ended at {}ms",
                r.end / MS
            );
            assert!(!r.finished);
        },
    );
}

#[test]
fn holders_listed_late_are_found() {
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..5))
                .map(|_| HolderSpec {
                    listed_at: rng.u64(SEC / 2..3 * SEC),
                    ..honest(rng)
                })
                .collect();
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.manager_delay = rng.u64(MS..200 * MS);
            if rng.bool() {
                scn.manager_away_until = rng.u64(0..10 * SEC);
            }
            scn
        },
        |seed, _, r| {
            done(seed, r);
        },
    );
}

#[test]
fn resume_fetches_only_the_missing_chunks() {
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..4)).map(|_| honest(rng)).collect();
            let mut scn = Scenario::new(small_size(rng), holders);
            let chunks = scn.size.div_ceil(CHUNK as usize);
            let keep = rng.f64();
            scn.have = (0..chunks).map(|_| rng.f64() < keep).collect();
            if rng.bool() {
                // Exactly the room the rest needs is enough.
                let have: usize = (0..chunks)
                    .filter(|&i| scn.have[i])
                    .map(|i| (scn.size - i * CHUNK as usize).min(CHUNK as usize))
                    .sum();
                scn.free_space = Some((scn.size - have) as u64);
                scn.disk_limit = scn.free_space;
            }
            scn
        },
        |seed, scn, r| {
            let s = done(seed, r);
            let resumed: u64 = (0..scn.have.len())
                .filter(|&i| scn.have[i])
                .map(|i| (scn.size - i * CHUNK as usize).min(CHUNK as usize) as u64)
                .sum();
            assert_eq!(s.fetched_bytes, scn.size as u64 - resumed, "seed {seed}");
            assert_eq!(r.written, scn.size as u64 - resumed, "seed {seed}");
        },
    );
}

#[test]
fn every_holder_replacing_the_version_ends_version_gone() {
    // Seeds where chunks were being fetched when the version went.
    let mid = std::cell::Cell::new(0);
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..5))
                .map(|_| HolderSpec {
                    behaviour: Behaviour::ReplaceAt(rng.u64(SEC / 20..SEC / 2)),
                    rate: rng.f64() * 150e3 + 50e3,
                    ..honest(rng)
                })
                .collect();
            Scenario::new(small_size(rng), holders)
        },
        |seed, _, r| {
            assert!(
                matches!(
                    r.outcome,
                    DownloadOutcome::Failed(DownloadError::VersionGone { .. })
                ),
                "seed {seed}: {:?} at {}ms",
                r.outcome,
                r.end / MS
            );
            assert!(r.end < 30 * SEC, "seed {seed}: took {}ms", r.end / MS);
            assert!(!r.finished);
            if r.served.iter().any(|&n| n > 0) {
                mid.set(mid.get() + 1);
            }
        },
    );
    assert!(
        mid.get() > SEEDS / 2,
        "only {} seeds mid-transfer",
        mid.get()
    );
}

#[test]
fn a_full_disk_fails_the_download_and_finishes_nothing() {
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..4)).map(|_| honest(rng)).collect();
            let mut scn = Scenario::new(small_size(rng), holders);
            if rng.bool() {
                // The free space is known up front and too small.
                scn.free_space = Some(rng.u64(0..scn.size as u64));
            } else {
                // Or unknown, and a write runs out.
                scn.disk_limit = Some(rng.u64(0..scn.size as u64 - CHUNK as u64));
            }
            scn
        },
        |seed, scn, r| {
            match &r.outcome {
                DownloadOutcome::Failed(DownloadError::DiskFull { need, free, .. }) => {
                    assert_eq!(*need, scn.size as u64, "seed {seed}");
                    assert_eq!(Some(*free), scn.free_space, "seed {seed}");
                }
                DownloadOutcome::Failed(DownloadError::Disk { error, .. }) => {
                    assert!(scn.disk_limit.is_some(), "seed {seed}: {error}");
                    assert!(error.contains("disk full"), "seed {seed}: {error}");
                }
                other => panic!("seed {seed}: {other:?}"),
            }
            assert!(!r.finished);
        },
    );
}

#[test]
fn busy_holders_are_asked_again_later_with_backoff() {
    each_seed(
        SEEDS,
        |rng| {
            let holders = (0..rng.usize(1..4))
                .map(|_| HolderSpec {
                    behaviour: Behaviour::BusyUntil(rng.u64(SEC / 2..5 * SEC)),
                    ..honest(rng)
                })
                .collect();
            Scenario::new(small_size(rng), holders)
        },
        |seed, scn, r| {
            done(seed, r);
            assert!(
                r.served
                    .iter()
                    .zip(&r.busy_at)
                    .any(|(&n, b)| n > 0 && !b.is_empty()),
                "seed {seed}: no holder served after saying Busy"
            );
            let min = scn.config.retry_min.as_nanos() as u64;
            for (k, busy) in r.busy_at.iter().enumerate() {
                for &b in busy {
                    // The next connect to it waits out the backoff (the
                    // Busy reaches us one latency after the holder sent it).
                    let next = r.connect_at[k].iter().find(|&&c| c > b);
                    if let Some(&c) = next {
                        assert!(
                            c >= b + min,
                            "seed {seed}: holder {k} reconnected {}ms after Busy",
                            (c - b) / MS
                        );
                    }
                }
            }
        },
    );
}

#[test]
fn a_mix_of_bad_holders_and_one_good_one_completes() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(0..7))
                .map(|_| {
                    let b = match rng.u32(0..7) {
                        0..=3 => bad_behaviour(rng),
                        4 => Behaviour::Corrupt(rng.u32(0..10)),
                        5 => Behaviour::VanishAt(rng.u64(0..2 * SEC)),
                        _ => Behaviour::BusyUntil(rng.u64(0..3 * SEC)),
                    };
                    HolderSpec {
                        listed_at: rng.u64(0..SEC),
                        ..HolderSpec::random(rng, b)
                    }
                })
                .collect();
            let good = rng.usize(0..=holders.len());
            holders.insert(good, honest(rng));
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.config.max_sources = rng.usize(1..9);
            scn
        },
        |seed, _, r| {
            done(seed, r);
        },
    );
}

#[test]
fn corrupt_holders_are_banned_and_the_file_still_completes() {
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(1..4))
                .map(|_| {
                    let b = Behaviour::Corrupt(rng.u32(0..8));
                    HolderSpec::random(rng, b)
                })
                .collect();
            holders.insert(rng.usize(0..=holders.len()), honest(rng));
            Scenario::new(small_size(rng), holders)
        },
        |seed, _, r| {
            done(seed, r);
            for (k, bad) in r.corrupt_at.iter().enumerate() {
                if let Some(t) = *bad {
                    assert!(
                        r.connect_at[k].iter().all(|&c| c < t),
                        "seed {seed}: holder {k} reconnected after a corrupt chunk"
                    );
                }
            }
        },
    );
}

#[test]
fn holders_vanishing_mid_transfer_leave_their_chunks_to_the_others() {
    // Seeds where a holder served chunks and then left: the scenario tests
    // what it says only if that is common.
    let mid = std::cell::Cell::new(0);
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(1..5))
                .map(|_| HolderSpec {
                    behaviour: Behaviour::VanishAt(rng.u64(SEC / 10..SEC)),
                    rate: rng.f64() * 400e3 + 100e3,
                    ..honest(rng)
                })
                .collect();
            let slow = HolderSpec {
                rate: rng.f64() * 200e3 + 100e3,
                ..honest(rng)
            };
            holders.insert(rng.usize(0..=holders.len()), slow);
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.config.max_sources = rng.usize(1..9);
            scn
        },
        |seed, scn, r| {
            done(seed, r);
            for (k, h) in scn.holders.iter().enumerate() {
                if let Behaviour::VanishAt(t) = h.behaviour {
                    // Once the manager stopped listing it, it is not tried.
                    assert!(
                        r.connect_at[k].iter().all(|&c| c <= t + scn.manager_delay),
                        "seed {seed}: holder {k} tried after it left"
                    );
                    if r.served[k] > 0 && t < r.end {
                        mid.set(mid.get() + 1);
                    }
                }
            }
        },
    );
    assert!(
        mid.get() > SEEDS / 4,
        "only {} seeds vanish mid-transfer",
        mid.get()
    );
}

#[test]
fn a_holder_keeping_the_version_finishes_it_when_others_replace_theirs() {
    let mid = std::cell::Cell::new(0);
    each_seed(
        SEEDS,
        |rng| {
            let mut holders: Vec<HolderSpec> = (0..rng.usize(1..5))
                .map(|_| HolderSpec {
                    behaviour: Behaviour::ReplaceAt(rng.u64(SEC / 10..SEC)),
                    rate: rng.f64() * 400e3 + 100e3,
                    ..honest(rng)
                })
                .collect();
            holders.insert(
                rng.usize(0..=holders.len()),
                HolderSpec {
                    rate: rng.f64() * 200e3 + 100e3,
                    ..honest(rng)
                },
            );
            Scenario::new(small_size(rng), holders)
        },
        |seed, scn, r| {
            done(seed, r);
            let replaced_mid = scn.holders.iter().enumerate().any(|(k, h)| {
                matches!(h.behaviour, Behaviour::ReplaceAt(t) if t < r.end && r.served[k] > 0)
            });
            mid.set(mid.get() + u64::from(replaced_mid));
        },
    );
    assert!(
        mid.get() > SEEDS / 4,
        "only {} seeds replace mid-transfer",
        mid.get()
    );
}

/// The manager restarts: away for a while, then back with the holders
/// registering again over the next moments. Its first answers are empty,
/// but only answers count against `locate_attempts`, not questions that
/// could not be asked.
#[test]
fn a_manager_away_for_a_while_then_back_without_holders_yet() {
    each_seed(
        SEEDS,
        |rng| {
            let back = rng.u64(5 * SEC..20 * SEC);
            let holders = (0..rng.usize(1..4))
                .map(|_| HolderSpec {
                    listed_at: back + rng.u64(0..2 * SEC),
                    ..honest(rng)
                })
                .collect();
            let mut scn = Scenario::new(small_size(rng), holders);
            scn.manager_away_until = back;
            scn
        },
        |seed, _, r| {
            done(seed, r);
        },
    );
}
