//! Membership in virtual time: one manager [`Registry`] and N peer
//! [`ManagerLink`]s joined by in-memory connections.
//!
//! Every frame either side sends is encoded with `wire::encode`, carried as
//! bytes, and decoded with `wire::decode` on arrival, so the codec is in the
//! loop. Each connection is two FIFO byte streams (like TCP): a frame is
//! delivered after a seeded random delay, but never before an earlier frame
//! on the same stream. Time jumps to the next delivery or the next deadline
//! of any core; nothing here reads the real clock except for the one starting
//! `Instant`.
//!
//! Faults: a link can be *stopped* (SIGSTOP: it processes and sends nothing,
//! its connection stays open; what arrives is held until it resumes), can
//! *crash* (its connection closes), and the manager can be killed and
//! restarted. Raw connections send hand-made frames, to check refusals.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use shoal::manager::registry::{Action, Registry, RegistryConfig};
use shoal::net::ConnId;
use shoal::peer::link::{LinkAction, LinkConfig, LinkEvent, LinkMode, ManagerLink, Query};
use shoal::wire::{
    self, ErrorCode, FileName, FileSummary, Hash, HolderGroup, Message, NetworkFile,
    PROTOCOL_VERSION, PeerId, Role,
};

const MS: Duration = Duration::from_millis(1);

/// Seeded, so a failing seed replays.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(fastrand::Rng::with_seed(seed))
    }

    fn next(&mut self) -> u64 {
        self.0.u64(..)
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        self.0.u64(lo..=hi)
    }
}

/// Who holds the far end of a connection from the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Link(usize),
    Raw(usize),
}

/// The two byte streams of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Dir {
    ToRegistry,
    ToEnd,
}

#[derive(Debug)]
enum Ev {
    /// A link's connect completes (or is refused if no manager runs).
    Connected {
        link: usize,
        conn: ConnId,
    },
    ToRegistry {
        conn: ConnId,
        frame: Vec<u8>,
    },
    /// The far end closed; the registry sees EOF.
    RegistryEof {
        conn: ConnId,
    },
    ToEnd {
        conn: ConnId,
        frame: Vec<u8>,
    },
    /// The registry closed (or died); the far end sees EOF.
    EndEof {
        conn: ConnId,
    },
}

struct Scheduled {
    at: Instant,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    /// Reversed: `BinaryHeap` is a max-heap and we want the earliest first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Conn {
    end: End,
    /// The address the registry sees the connection come from.
    remote: SocketAddr,
    /// The registry side has it open (connected, not closed or dead).
    registry_open: bool,
}

struct SimLink {
    core: ManagerLink,
    mode: LinkMode,
    ip: IpAddr,
    /// The connection the link currently owns (pending or open).
    conn: Option<ConnId>,
    stopped: bool,
    crashed: bool,
    /// Deliveries that arrived while stopped, replayed on resume.
    held: Vec<Ev>,
    /// `PeerDelta` frames delivered to this link.
    deltas: usize,
    /// When each `Connect` action came out.
    connects: Vec<Instant>,
    events: Vec<(Instant, LinkEvent)>,
}

#[derive(Default)]
struct Raw {
    inbox: Vec<Vec<u8>>,
    closed: bool,
}

struct Sim {
    now: Instant,
    rng: Rng,
    /// Per-frame delay range, in milliseconds.
    delay_ms: (u64, u64),
    registry: Option<Registry>,
    registry_config: RegistryConfig,
    link_config: LinkConfig,
    links: Vec<SimLink>,
    raws: Vec<Raw>,
    conns: HashMap<ConnId, Conn>,
    next_conn: usize,
    queue: BinaryHeap<Scheduled>,
    seq: u64,
    /// Latest delivery time per stream, to keep each stream FIFO.
    stream_tail: HashMap<(ConnId, Dir), Instant>,
    /// When the registry last got a frame on each connection.
    last_heard: HashMap<ConnId, Instant>,
}

impl Sim {
    fn new(seed: u64) -> Sim {
        Sim::with_delays(seed, (1, 20))
    }

    fn with_delays(seed: u64, delay_ms: (u64, u64)) -> Sim {
        let registry_config = RegistryConfig::default();
        Sim {
            now: Instant::now(),
            rng: Rng::new(seed),
            delay_ms,
            registry: Some(Registry::new(registry_config)),
            registry_config,
            link_config: LinkConfig::default(),
            links: Vec::new(),
            raws: Vec::new(),
            conns: HashMap::new(),
            next_conn: 1,
            queue: BinaryHeap::new(),
            seq: 0,
            stream_tail: HashMap::new(),
            last_heard: HashMap::new(),
        }
    }

    fn max_delay(&self) -> Duration {
        MS * self.delay_ms.1 as u32
    }

    fn registry(&self) -> &Registry {
        self.registry.as_ref().expect("manager is running")
    }

    // ---- scenario controls ----

    fn add_link(&mut self, mode: LinkMode) -> usize {
        let i = self.links.len();
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8));
        self.links.push(SimLink {
            core: ManagerLink::new(mode, self.link_config, self.now),
            mode,
            ip,
            conn: None,
            stopped: false,
            crashed: false,
            held: Vec::new(),
            deltas: 0,
            connects: Vec::new(),
            events: Vec::new(),
        });
        self.drain();
        i
    }

    /// A sharing peer. Every third one advertises an explicit address, so
    /// both forms of `Register` cross the codec.
    fn add_member(&mut self) -> usize {
        let i = self.links.len();
        let advertise = (i % 3 == 2)
            .then(|| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 7, i as u8)), 9000));
        self.add_link(LinkMode::Member {
            listen_port: 7000 + i as u16,
            advertise,
        })
    }

    /// The address the registry should list for link `i`.
    fn expected_addr(&self, i: usize) -> SocketAddr {
        match self.links[i].mode {
            LinkMode::Member {
                advertise: Some(a), ..
            } => a,
            LinkMode::Member { listen_port, .. } => SocketAddr::new(self.links[i].ip, listen_port),
            LinkMode::QueryOnly => panic!("a query-only link has no listed address"),
        }
    }

    fn shutdown(&mut self, i: usize) {
        self.links[i].core.shutdown();
        self.drain();
    }

    fn crash(&mut self, i: usize) {
        let link = &mut self.links[i];
        link.crashed = true;
        while link.core.poll_action().is_some() {}
        if let Some(conn) = link.conn.take() {
            self.schedule_on(conn, Dir::ToRegistry, Ev::RegistryEof { conn });
        }
    }

    fn stop(&mut self, i: usize) {
        self.links[i].stopped = true;
    }

    fn resume(&mut self, i: usize) {
        self.links[i].stopped = false;
        for ev in std::mem::take(&mut self.links[i].held) {
            self.deliver(ev);
            self.drain();
        }
    }

    /// The manager process dies: every connection it had sees EOF.
    fn kill_manager(&mut self) {
        self.registry = None;
        let open: Vec<ConnId> = self
            .conns
            .iter_mut()
            .filter(|(_, c)| c.registry_open)
            .map(|(&id, c)| {
                c.registry_open = false;
                id
            })
            .collect();
        for conn in open {
            self.schedule_on(conn, Dir::ToEnd, Ev::EndEof { conn });
        }
    }

    fn start_manager(&mut self) {
        self.registry = Some(Registry::new(self.registry_config));
    }

    /// A hand-driven connection to the registry, accepted at once.
    fn raw_connect(&mut self) -> (usize, ConnId) {
        let r = self.raws.len();
        self.raws.push(Raw::default());
        let conn = self.new_conn(End::Raw(r), IpAddr::V4(Ipv4Addr::new(172, 16, 0, r as u8)));
        self.conns.get_mut(&conn).unwrap().registry_open = true;
        let now = self.now;
        self.registry.as_mut().unwrap().handle_connected(conn, now);
        self.drain();
        (r, conn)
    }

    fn raw_send(&mut self, conn: ConnId, msg: &Message<'_>) {
        let mut frame = Vec::new();
        wire::encode(msg, &mut frame);
        self.schedule_on(conn, Dir::ToRegistry, Ev::ToRegistry { conn, frame });
    }

    /// A raw connection that says hello and registers (it never answers pings).
    fn raw_member(&mut self) -> (usize, ConnId) {
        let (r, conn) = self.raw_connect();
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        };
        self.raw_send(conn, &hello);
        let register = Message::Register {
            listen_port: 9000,
            advertise: None,
        };
        self.raw_send(conn, &register);
        (r, conn)
    }

    fn raw_inbox(&self, r: usize) -> Vec<Message<'_>> {
        self.raws[r].inbox.iter().map(|f| decode_whole(f)).collect()
    }

    /// Asks link `i` a question and returns the answer event (after 500 ms).
    fn ask(&mut self, i: usize, query: Query) -> LinkEvent {
        let before = self.links[i].events.len();
        self.links[i].core.ask(query.clone());
        self.drain();
        self.run_for(500 * MS);
        self.links[i].events[before..]
            .iter()
            .map(|(_, e)| e.clone())
            .find(|e| {
                matches!(
                    e,
                    LinkEvent::Holders(..)
                        | LinkEvent::Files(_)
                        | LinkEvent::Peers(_)
                        | LinkEvent::QueryFailed(_)
                )
            })
            .unwrap_or_else(|| panic!("link {i} got no answer to {query:?}"))
    }

    // ---- views for assertions ----

    fn registry_peers(&self) -> BTreeMap<PeerId, SocketAddr> {
        self.registry()
            .peer_list()
            .into_iter()
            .map(|p| (p.id, p.addr))
            .collect()
    }

    fn id(&self, i: usize) -> PeerId {
        self.links[i]
            .core
            .peer_id()
            .unwrap_or_else(|| panic!("link {i} is not registered"))
    }

    /// Links that are running and mean to be members.
    fn live_members(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.links.len()).filter(|&i| {
            let l = &self.links[i];
            let shut_down = l.core.poll_timeout().is_none(); // only Closed has no deadline
            !l.crashed && !l.stopped && !shut_down && l.mode != LinkMode::QueryOnly
        })
    }

    /// Every live member is registered, the registry lists exactly them,
    /// and each one's view equals the registry's.
    fn assert_converged(&self, what: &str) {
        self.registry().check_invariants();
        let reg = self.registry_peers();
        let mut ids = BTreeSet::new();
        for i in self.live_members() {
            let id = self.links[i].core.peer_id();
            let id = id.unwrap_or_else(|| panic!("{what}: live link {i} not registered"));
            assert!(ids.insert(id), "{what}: id {id} given twice");
            assert_eq!(
                reg.get(&id),
                Some(&self.expected_addr(i)),
                "{what}: link {i}"
            );
            assert_eq!(self.links[i].core.peers(), &reg, "{what}: link {i}'s list");
        }
        let listed: BTreeSet<PeerId> = reg.keys().copied().collect();
        assert_eq!(listed, ids, "{what}: registry lists someone not live");
    }

    // ---- the event loop ----

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        self.run_until(until);
    }

    fn run_until(&mut self, until: Instant) {
        self.drain(); // what the test just asked of the cores
        let mut spins = 0;
        loop {
            let next_ev = self.queue.peek().map(|s| s.at);
            let next = [next_ev, self.next_deadline()].into_iter().flatten().min();
            let Some(next) = next.filter(|&t| t <= until) else {
                break;
            };
            if next <= self.now {
                spins += 1;
                assert!(
                    spins < 100_000,
                    "simulation makes no progress at a fixed time"
                );
            } else {
                spins = 0;
                self.now = next;
            }
            while self.queue.peek().is_some_and(|s| s.at <= self.now) {
                let s = self.queue.pop().unwrap(); // just peeked
                self.deliver(s.ev);
                self.drain(); // before the next delivery can close the connection
            }
            self.fire_timers();
            self.drain();
        }
        self.now = self.now.max(until);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let links = self
            .links
            .iter()
            .filter(|l| !l.stopped && !l.crashed)
            .filter_map(|l| l.core.poll_timeout());
        self.registry
            .as_ref()
            .and_then(|r| r.poll_timeout())
            .into_iter()
            .chain(links)
            .min()
    }

    fn fire_timers(&mut self) {
        let now = self.now;
        if let Some(r) = self.registry.as_mut()
            && r.poll_timeout().is_some_and(|t| t <= now)
        {
            r.handle_timeout(now);
        }
        for l in self.links.iter_mut().filter(|l| !l.stopped && !l.crashed) {
            if l.core.poll_timeout().is_some_and(|t| t <= now) {
                l.core.handle_timeout(now);
            }
        }
    }

    fn deliver(&mut self, ev: Ev) {
        let now = self.now;
        match ev {
            Ev::Connected { link, conn } => {
                let l = &mut self.links[link];
                if l.crashed || l.conn != Some(conn) {
                    return; // gave up on this connect before it finished
                }
                if l.stopped {
                    l.held.push(Ev::Connected { link, conn });
                    return;
                }
                match self.registry.as_mut() {
                    Some(r) => {
                        self.conns.get_mut(&conn).unwrap().registry_open = true;
                        r.handle_connected(conn, now);
                        l.core.handle_connected(now);
                    }
                    None => {
                        l.conn = None;
                        l.core.handle_disconnected(now);
                    }
                }
            }
            Ev::ToRegistry { conn, frame } => {
                let c = &self.conns[&conn];
                let (Some(r), true) = (self.registry.as_mut(), c.registry_open) else {
                    return; // reset: the registry closed this connection
                };
                // As the connection driver does: the per-state table first.
                let (kind, body) = (frame[4], frame.len() - wire::HEADER_LEN);
                if r.max_frame_body(conn, kind).is_none_or(|max| body > max) {
                    r.handle_refused_frame(conn, kind, body, now);
                    return;
                }
                r.handle_message(conn, c.remote, decode_whole(&frame), now);
                self.last_heard.insert(conn, now);
            }
            Ev::RegistryEof { conn } => {
                let c = self.conns.get_mut(&conn).unwrap();
                if let (Some(r), true) = (self.registry.as_mut(), c.registry_open) {
                    c.registry_open = false;
                    r.handle_disconnected(conn, now);
                }
            }
            Ev::ToEnd { conn, frame } => match self.conns[&conn].end {
                End::Raw(r) => {
                    if !self.raws[r].closed {
                        self.raws[r].inbox.push(frame);
                    }
                }
                End::Link(i) => {
                    let l = &mut self.links[i];
                    if l.stopped {
                        l.held.push(Ev::ToEnd { conn, frame });
                    } else if !l.crashed && l.conn == Some(conn) {
                        let msg = decode_whole(&frame);
                        if matches!(msg, Message::PeerDelta { .. }) {
                            l.deltas += 1;
                        }
                        l.core.handle_message(msg, now);
                    }
                }
            },
            Ev::EndEof { conn } => match self.conns[&conn].end {
                End::Raw(r) => self.raws[r].closed = true,
                End::Link(i) => {
                    let l = &mut self.links[i];
                    if l.stopped {
                        l.held.push(Ev::EndEof { conn });
                    } else if !l.crashed && l.conn == Some(conn) {
                        l.conn = None;
                        l.core.handle_disconnected(now);
                    }
                }
            },
        }
    }

    /// Carries out every action the cores have queued.
    fn drain(&mut self) {
        loop {
            let mut progress = false;
            while let Some(action) = self.registry.as_mut().and_then(|r| r.poll_action()) {
                progress = true;
                self.apply_registry(action);
            }
            for i in 0..self.links.len() {
                if self.links[i].stopped || self.links[i].crashed {
                    continue;
                }
                while let Some(action) = self.links[i].core.poll_action() {
                    progress = true;
                    self.apply_link(i, action);
                }
            }
            if !progress {
                break;
            }
        }
    }

    fn apply_registry(&mut self, action: Action) {
        match action {
            Action::SendShared(conn, msgs) => {
                for msg in msgs.iter() {
                    self.apply_registry(Action::Send(conn, msg.clone()));
                }
            }
            Action::Broadcast(conns, msgs) => {
                for conn in conns {
                    self.apply_registry(Action::SendShared(conn, msgs.clone()));
                }
            }
            Action::Send(conn, msg) => {
                if self.conns[&conn].registry_open {
                    let mut frame = Vec::new();
                    wire::encode(&msg, &mut frame);
                    let body = frame.len() - wire::HEADER_LEN;
                    let max = wire::max_body_len(frame[4]).expect("a known kind");
                    assert!(
                        body <= max,
                        "registry sent {body} bytes of kind {:#x}",
                        frame[4]
                    );
                    self.schedule_on(conn, Dir::ToEnd, Ev::ToEnd { conn, frame });
                }
            }
            Action::Close(conn) => {
                let c = self.conns.get_mut(&conn).unwrap();
                if c.registry_open {
                    c.registry_open = false;
                    self.schedule_on(conn, Dir::ToEnd, Ev::EndEof { conn });
                }
            }
        }
    }

    fn apply_link(&mut self, i: usize, action: LinkAction) {
        let now = self.now;
        match action {
            LinkAction::Connect => {
                let conn = self.new_conn(End::Link(i), self.links[i].ip);
                self.links[i].conn = Some(conn);
                self.links[i].connects.push(now);
                // On the link's outgoing stream, so its first frames follow it.
                self.schedule_on(conn, Dir::ToRegistry, Ev::Connected { link: i, conn });
            }
            LinkAction::Send(msg) => {
                let Some(conn) = self.links[i].conn else {
                    panic!("link {i} sends {msg:?} with no connection");
                };
                let mut frame = Vec::new();
                wire::encode(&msg, &mut frame);
                self.schedule_on(conn, Dir::ToRegistry, Ev::ToRegistry { conn, frame });
            }
            LinkAction::Close => {
                if let Some(conn) = self.links[i].conn.take() {
                    self.schedule_on(conn, Dir::ToRegistry, Ev::RegistryEof { conn });
                }
            }
            LinkAction::Event(e) => self.links[i].events.push((now, e)),
        }
    }

    fn new_conn(&mut self, end: End, ip: IpAddr) -> ConnId {
        let conn = ConnId(self.next_conn);
        self.next_conn += 1;
        let remote = SocketAddr::new(ip, 40_000 + (conn.0 % 20_000) as u16);
        self.conns.insert(
            conn,
            Conn {
                end,
                remote,
                registry_open: false,
            },
        );
        conn
    }

    /// Queues `ev` after a random delay, but not before anything already
    /// queued on the same stream.
    fn schedule_on(&mut self, conn: ConnId, dir: Dir, ev: Ev) {
        let delay = MS * self.rng.between(self.delay_ms.0, self.delay_ms.1) as u32;
        let tail = self.stream_tail.entry((conn, dir)).or_insert(self.now);
        let at = (self.now + delay).max(*tail);
        *tail = at;
        self.seq += 1;
        self.queue.push(Scheduled {
            at,
            seq: self.seq,
            ev,
        });
    }
}

/// One whole frame back into a message; the frame came from `wire::encode`,
/// so anything else is a codec bug.
fn decode_whole(frame: &[u8]) -> Message<'_> {
    let (msg, used) = wire::decode(frame)
        .expect("own frame decodes")
        .expect("own frame is complete");
    assert_eq!(used, frame.len(), "one frame, fully consumed");
    msg
}

fn name(s: &str) -> FileName {
    FileName::new(s).unwrap()
}

fn file(n: &str, version: u8) -> FileSummary {
    FileSummary {
        name: name(n),
        size: 1000 * version as u64,
        root: Hash([version; 32]),
    }
}

/// Each group's version and holders (as a set: their order is not promised).
fn holder_ids(groups: &[HolderGroup]) -> Vec<(Hash, BTreeSet<PeerId>)> {
    groups
        .iter()
        .map(|g| (g.root, g.peers.iter().map(|p| p.id).collect()))
        .collect()
}

fn set<const N: usize>(ids: [PeerId; N]) -> BTreeSet<PeerId> {
    ids.into_iter().collect()
}

// ---- tests ----

#[test]
fn three_peers_join_and_agree_on_the_list() {
    let mut sim = Sim::new(1);
    let links: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));

    let reg = sim.registry_peers();
    assert_eq!(reg.len(), 3);
    let ids: BTreeSet<PeerId> = links.iter().map(|&i| sim.id(i)).collect();
    assert_eq!(ids.len(), 3, "ids are unique");
    for &i in &links {
        assert!(
            sim.links[i].core.peers().contains_key(&sim.id(i)),
            "lists itself"
        );
        assert_eq!(sim.links[i].core.peers(), &reg);
        assert_eq!(reg[&sim.id(i)], sim.expected_addr(i));
    }
    sim.assert_converged("after join");
}

#[test]
fn keepalives_keep_members_listed_and_sparse_pings_keep_links_connected() {
    let mut sim = Sim::new(11);
    let links: Vec<usize> = (0..5).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));
    let ids: Vec<PeerId> = links.iter().map(|&i| sim.id(i)).collect();
    let cfg = sim.registry_config;
    // Far longer than the peer timeout and than a member's silence timeout
    // would be if it still expected a ping every heartbeat; nothing but
    // keepalives and the manager's sparse pings on the wire.
    sim.run_for(cfg.heartbeat * 30);
    for (&i, &id) in links.iter().zip(&ids) {
        assert_eq!(sim.id(i), id, "link {i} re-registered");
        assert_eq!(sim.links[i].connects.len(), 1, "link {i} reconnected");
        let conn = sim.links[i].conn.expect("connected");
        let heard = sim.now.duration_since(sim.last_heard[&conn]);
        assert!(
            heard <= cfg.heartbeat + sim.max_delay(),
            "link {i} last heard {heard:?} ago: no keepalives"
        );
    }
    assert_eq!(sim.registry_peers().len(), links.len());
    sim.assert_converged("after 30 heartbeats");
}

#[test]
fn goodbye_removes_a_peer_at_once() {
    let mut sim = Sim::new(2);
    let links: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));
    let gone = sim.id(links[1]);

    sim.shutdown(links[1]);
    // The leaver stays silent with its connection open: only the goodbye can
    // remove it this fast (the sweep would take the peer timeout).
    let bound = sim.registry_config.broadcast_delay + 3 * sim.max_delay();
    assert!(bound * 10 < sim.registry_config.peer_timeout);
    sim.run_for(bound);

    assert!(!sim.registry_peers().contains_key(&gone));
    for i in [links[0], links[2]] {
        assert!(!sim.links[i].core.peers().contains_key(&gone), "link {i}");
        assert_eq!(sim.links[i].core.peers().len(), 2);
    }
    assert_eq!(sim.links[links[1]].conn, None, "the manager closed it");
    let refused = sim.links[links[1]]
        .events
        .iter()
        .any(|(_, e)| matches!(e, LinkEvent::Refused(_)));
    assert!(!refused, "a goodbye is a clean leave, not a protocol error");
    sim.assert_converged("after goodbye");
}

#[test]
fn crash_removes_a_peer_at_once() {
    let mut sim = Sim::new(3);
    let links: Vec<usize> = (0..4).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));
    let gone = sim.id(links[2]);

    sim.crash(links[2]);
    sim.run_for(sim.registry_config.broadcast_delay + 3 * sim.max_delay());

    assert!(!sim.registry_peers().contains_key(&gone));
    for i in [links[0], links[1], links[3]] {
        assert!(!sim.links[i].core.peers().contains_key(&gone), "link {i}");
    }
    sim.assert_converged("after crash");
}

#[test]
fn stopped_peer_is_swept_after_the_timeout_and_not_before() {
    let mut sim = Sim::new(4);
    let links: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_millis(3300)); // past a heartbeat or so
    let quiet = links[1];
    let quiet_id = sim.id(quiet);
    let quiet_conn = sim.links[quiet].conn.unwrap();
    let cfg = sim.registry_config;

    let stopped_at = sim.now;
    sim.stop(quiet);
    sim.run_for(2 * sim.max_delay()); // frames already sent still arrive
    let last_heard = sim.last_heard[&quiet_conn];
    assert!(last_heard <= stopped_at + sim.max_delay());

    sim.run_until(last_heard + cfg.peer_timeout - MS);
    assert!(
        sim.registry_peers().contains_key(&quiet_id),
        "swept before the peer timeout"
    );
    for &i in &links {
        assert!(sim.links[i].core.peers().contains_key(&quiet_id));
    }

    sim.run_until(stopped_at + cfg.peer_timeout + cfg.heartbeat + cfg.broadcast_delay);
    assert!(!sim.registry_peers().contains_key(&quiet_id), "not swept");
    for i in [links[0], links[2]] {
        assert!(
            !sim.links[i].core.peers().contains_key(&quiet_id),
            "link {i}"
        );
    }

    // SIGCONT: it finds its connection closed, reconnects and rejoins.
    sim.resume(quiet);
    sim.run_for(Duration::from_secs(2));
    assert_ne!(sim.id(quiet), quiet_id, "a new registration, a new id");
    sim.assert_converged("after resume");
}

#[test]
fn a_burst_of_joins_costs_each_member_one_or_two_deltas() {
    let mut sim = Sim::with_delays(5, (1, 5));
    let window = sim.registry_config.broadcast_delay;
    let mut links = Vec::new();
    for _ in 0..100 {
        links.push(sim.add_member());
        sim.run_for(window * 3 / 4 / 100);
    }
    sim.run_for(Duration::from_secs(1));

    assert_eq!(sim.registry_peers().len(), 100);
    sim.assert_converged("after the burst");
    for &i in &links[..10] {
        let n = sim.links[i].deltas;
        assert!((1..=2).contains(&n), "link {i} got {n} deltas");
    }
    let total: usize = links.iter().map(|&i| sim.links[i].deltas).sum();
    assert!(total <= 2 * links.len(), "{total} deltas for 100 joins");
}

#[test]
fn a_peer_that_joins_and_crashes_within_one_window_leaves_no_trace() {
    // b and c join while a broadcast is pending; c's join list names b; b
    // crashes before the broadcast. The delta must still tell c to drop b,
    // though b was never in a broadcast.
    let mut sim = Sim::with_delays(6, (1, 1));
    let a = sim.add_member();
    sim.run_for(Duration::from_secs(1));
    let b = sim.add_member();
    sim.run_for(5 * MS);
    let c = sim.add_member();
    sim.run_for(5 * MS);
    assert!(sim.links[c].core.peers().contains_key(&sim.id(b)));
    sim.crash(b);
    sim.run_for(Duration::from_secs(1));

    assert_eq!(sim.registry_peers().len(), 2);
    assert_eq!(sim.links[a].core.peers().len(), 2);
    sim.assert_converged("after join and crash");
}

#[test]
fn lists_converge_under_random_delays_and_churn() {
    for seed in 0..50 {
        let mut sim = Sim::new(1000 + seed);
        let what = format!("seed {seed}");
        for _ in 0..sim.rng.between(2, 6) {
            sim.add_member();
        }
        let settle = Duration::from_millis(sim.rng.between(0, 300));
        sim.run_for(settle);
        for _ in 0..40 {
            let live: Vec<usize> = sim.live_members().collect();
            let pick = |sim: &mut Sim| live[sim.rng.next() as usize % live.len()];
            let roll = sim.rng.between(0, 99);
            if roll < 45 || live.len() < 2 {
                sim.add_member();
            } else if roll < 65 {
                let i = pick(&mut sim);
                sim.shutdown(i);
            } else if roll < 85 {
                let i = pick(&mut sim);
                sim.crash(i);
            } else {
                let i = pick(&mut sim);
                let v = sim.rng.between(1, 3) as u8;
                sim.links[i].core.set_shared(vec![file("f", v)]);
            }
            let pause = Duration::from_millis(sim.rng.between(0, 60));
            sim.run_for(pause);
        }
        sim.run_for(Duration::from_secs(2));
        sim.assert_converged(&what);
        let live = sim.live_members().count();
        assert!(live > 0, "{what}: churn left nobody");
    }
}

#[test]
fn after_a_manager_restart_links_back_off_reconnect_and_rejoin() {
    let mut sim = Sim::new(7);
    let links: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));
    let seen: Vec<usize> = links.iter().map(|&i| sim.links[i].connects.len()).collect();

    let killed_at = sim.now;
    sim.kill_manager();
    sim.run_for(Duration::from_secs(45));
    sim.start_manager();
    sim.run_for(Duration::from_secs(12));

    sim.assert_converged("after restart");
    assert_eq!(sim.registry_peers().len(), 3);
    for &i in &links {
        let rejoined = sim.links[i]
            .events
            .iter()
            .any(|(t, e)| *t > killed_at && *e == LinkEvent::Registered(sim.id(i)));
        assert!(rejoined, "link {i} did not register with the new manager");
    }
    let cfg = sim.link_config;
    let slack = 2 * sim.max_delay();
    for (k, &i) in links.iter().enumerate() {
        let times = &sim.links[i].connects[seen[k]..];
        assert!(times.len() >= 8, "link {i}: only {} attempts", times.len());
        assert!(
            times[0] - killed_at <= cfg.retry_min + slack,
            "link {i}: slow first retry"
        );
        let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
        for w in gaps.windows(2) {
            if w[0] * 2 <= cfg.retry_max {
                assert!(
                    w[1] >= w[0] * 3 / 2,
                    "link {i}: backoff not growing: {gaps:?}"
                );
            }
        }
        assert!(
            gaps.iter().all(|&g| g <= cfg.retry_max + slack),
            "link {i}: {gaps:?}"
        );
        let capped = gaps.iter().filter(|&&g| g >= cfg.retry_max).count();
        assert!(
            capped >= 2,
            "link {i}: backoff never reached the cap: {gaps:?}"
        );
    }
}

#[test]
fn file_queries_count_and_group_holders() {
    let mut sim = Sim::new(8);
    let [a, b, c, asker] = [0; 4].map(|_| sim.add_member());
    sim.links[a]
        .core
        .set_shared(vec![file("f", 1), file("g", 1)]);
    sim.run_for(Duration::from_secs(1));
    sim.links[b].core.set_shared(vec![file("f", 1)]);
    sim.links[c].core.set_shared(vec![file("f", 2)]);
    sim.run_for(200 * MS);
    let (ia, ib, ic) = (sim.id(a), sim.id(b), sim.id(c));

    let LinkEvent::Files(files) = sim.ask(asker, Query::ListFiles) else {
        panic!("not a file list");
    };
    let counts: Vec<(&str, Hash, u32)> = files
        .iter()
        .map(|f: &NetworkFile| (f.name.as_str(), f.root, f.holders))
        .collect();
    assert_eq!(
        counts,
        [
            ("f", Hash([1; 32]), 2),
            ("f", Hash([2; 32]), 1),
            ("g", Hash([1; 32]), 1)
        ]
    );
    assert_eq!(files[1].size, 2000);

    let LinkEvent::Holders(n, groups) = sim.ask(asker, Query::WhoHas(name("f"))) else {
        panic!("not holders");
    };
    assert_eq!(n, name("f"));
    assert_eq!(
        holder_ids(&groups),
        [(Hash([1; 32]), set([ia, ib])), (Hash([2; 32]), set([ic]))]
    );
    let entry_a = groups[0].peers.iter().find(|p| p.id == ia).unwrap(); // just checked
    assert_eq!(entry_a.addr, sim.expected_addr(a));
    assert_eq!(groups[1].size, 2000);

    // a re-shares: its old set is replaced, not added to.
    sim.links[a].core.set_shared(vec![file("f", 2)]);
    sim.run_for(200 * MS);
    let LinkEvent::Holders(_, groups) = sim.ask(asker, Query::WhoHas(name("f"))) else {
        panic!("not holders");
    };
    assert_eq!(
        holder_ids(&groups),
        [(Hash([2; 32]), set([ia, ic])), (Hash([1; 32]), set([ib]))]
    );
    let LinkEvent::Files(files) = sim.ask(asker, Query::ListFiles) else {
        panic!("not a file list");
    };
    assert!(files.iter().all(|f| f.name != name("g")), "g still listed");
    let LinkEvent::Holders(_, groups) = sim.ask(asker, Query::WhoHas(name("g"))) else {
        panic!("not holders");
    };
    assert!(groups.is_empty());

    // c leaves: no longer a holder.
    sim.shutdown(c);
    sim.run_for(200 * MS);
    let LinkEvent::Holders(_, groups) = sim.ask(asker, Query::WhoHas(name("f"))) else {
        panic!("not holders");
    };
    assert_eq!(
        holder_ids(&groups),
        [(Hash([1; 32]), set([ib])), (Hash([2; 32]), set([ia]))]
    );
}

#[test]
fn a_share_set_changed_during_the_handshake_reaches_the_manager() {
    let mut sim = Sim::with_delays(9, (5, 5));
    let a = sim.add_member();
    sim.links[a].core.set_shared(vec![file("old", 1)]);
    sim.run_for(7 * MS); // connected (5 ms), manager's hello not yet here (10 ms)
    assert!(sim.links[a].conn.is_some() && !sim.links[a].core.is_ready());
    sim.links[a].core.set_shared(vec![file("new", 1)]);
    sim.run_for(Duration::from_secs(1));

    let names: Vec<String> = sim
        .registry()
        .network_files()
        .iter()
        .map(|f| f.name.to_string())
        .collect();
    assert_eq!(names, ["new"]);
}

#[test]
fn a_query_only_link_is_answered_but_never_listed() {
    let mut sim = Sim::new(10);
    let members: Vec<usize> = (0..2).map(|_| sim.add_member()).collect();
    sim.links[members[0]].core.set_shared(vec![file("f", 1)]);
    sim.run_for(Duration::from_secs(1));
    let deltas: Vec<usize> = members.iter().map(|&i| sim.links[i].deltas).collect();

    let q = sim.add_link(LinkMode::QueryOnly);
    // Asked before it is connected: queued, then sent after the hello.
    let LinkEvent::Peers(peers) = sim.ask(q, Query::ListPeers) else {
        panic!("not a peer list");
    };
    assert_eq!(peers, sim.registry().peer_list());
    assert_eq!(peers.len(), 2);
    let LinkEvent::Files(files) = sim.ask(q, Query::ListFiles) else {
        panic!("not a file list");
    };
    assert_eq!(files.len(), 1);

    sim.run_for(Duration::from_secs(20)); // many heartbeats
    assert_eq!(sim.links[q].core.peer_id(), None);
    assert!(sim.links[q].core.is_ready(), "still connected");
    assert!(
        sim.links[q]
            .events
            .iter()
            .all(|(_, e)| !matches!(e, LinkEvent::Registered(_) | LinkEvent::Lost { .. }))
    );
    assert_eq!(sim.links[q].deltas, 0);
    assert_eq!(sim.registry_peers().len(), 2);
    for (k, &i) in members.iter().enumerate() {
        assert_eq!(
            sim.links[i].deltas, deltas[k],
            "link {i} heard of the query link"
        );
    }
    sim.assert_converged("with a query-only link");
}

#[test]
fn protocol_errors_close_only_the_offender() {
    let mut sim = Sim::new(11);
    let members: Vec<usize> = (0..2).map(|_| sim.add_member()).collect();
    sim.run_for(Duration::from_secs(1));
    let before = sim.registry_peers();
    let deltas: Vec<usize> = members.iter().map(|&i| sim.links[i].deltas).collect();
    let register = Message::Register {
        listen_port: 1,
        advertise: None,
    };
    let bad_hellos = [
        (PROTOCOL_VERSION + 1, Role::ManagerClient),
        (PROTOCOL_VERSION, Role::Peer),
    ];

    let (early, conn) = sim.raw_connect();
    sim.raw_send(conn, &register);
    let mut cases = vec![(early, ErrorCode::Protocol)];
    for (version, role) in bad_hellos {
        let (r, conn) = sim.raw_connect();
        sim.raw_send(conn, &Message::Hello { version, role });
        sim.raw_send(conn, &register); // after the refusal: ignored
        cases.push((r, ErrorCode::Incompatible));
    }
    sim.run_for(Duration::from_secs(1));

    for (r, want) in cases {
        let inbox = sim.raw_inbox(r);
        assert!(
            matches!(
                inbox[0],
                Message::Hello {
                    role: Role::Manager,
                    ..
                }
            ),
            "{inbox:?}"
        );
        assert!(
            matches!(&inbox[1..], [Message::Error { code, .. }] if *code == want),
            "raw {r}: {inbox:?}"
        );
        assert!(sim.raws[r].closed, "raw {r} left open");
    }
    assert_eq!(sim.registry_peers(), before);
    for (k, &i) in members.iter().enumerate() {
        assert_eq!(sim.links[i].deltas, deltas[k]);
    }
    sim.assert_converged("after refusals");

    // Silence instead of a hello: closed after the hello timeout, not before.
    let (mute, _) = sim.raw_connect();
    let hello_timeout = sim.registry_config.hello_timeout;
    sim.run_for(hello_timeout - 100 * MS);
    assert!(!sim.raws[mute].closed, "closed before the hello timeout");
    sim.run_for(200 * MS + sim.max_delay());
    assert!(sim.raws[mute].closed, "never closed");
    sim.assert_converged("after the mute connection");
}

fn many_files(prefix: &str, n: usize, version: u8) -> Vec<FileSummary> {
    (0..n)
        .map(|i| FileSummary {
            name: name(&format!("{prefix}{i:05}")),
            size: i as u64,
            root: Hash([version; 32]),
        })
        .collect()
}

#[test]
fn registrations_at_the_limits_get_answers_within_the_frame_limits() {
    // Every frame the registry sends is checked against its kind's limit in
    // `apply_registry`; here the answers are as large as the limits allow.
    let mut sim = Sim::new(20);
    let asker = sim.add_member();
    let mut raws = Vec::new();
    for k in 0..3u8 {
        let (r, conn) = sim.raw_member();
        let files = many_files(&format!("p{k}-"), wire::MAX_SHARED_FILES, k);
        sim.raw_send(conn, &Message::ShareFiles { files });
        raws.push(r);
    }
    // "hot": 40 versions, one per registration, and one version held by
    // 300 registrations: more than one answer lists.
    let versions = wire::MAX_HOLDER_GROUPS + 8;
    for k in 0..versions + 300 {
        let (_, conn) = sim.raw_member();
        let version = if k < versions { k as u64 } else { 999 };
        let hot = FileSummary {
            name: name("hot"),
            size: version,
            root: Hash([7; 32]),
        };
        sim.raw_send(conn, &Message::ShareFiles { files: vec![hot] });
    }
    sim.run_for(Duration::from_secs(1));
    sim.registry().check_invariants();

    let LinkEvent::Files(files) = sim.ask(asker, Query::ListFiles) else {
        panic!("not a file list");
    };
    assert_eq!(files.len(), 3 * wire::MAX_SHARED_FILES + versions + 1);
    assert!(files.len() > 3 * wire::FILE_PAGE, "several pages");
    assert_eq!(files, sim.registry().network_files(), "pages reassemble");

    let (_, conn) = sim.raw_connect();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    sim.raw_send(conn, &hello);
    sim.raw_send(conn, &Message::WhoHas { name: name("hot") });
    sim.run_for(Duration::from_secs(1));
    let r = sim.raws.len() - 1;
    let inbox = sim.raw_inbox(r);
    let Some(Message::Holders {
        truncated, groups, ..
    }) = inbox.last()
    else {
        panic!("no holders: {inbox:?}");
    };
    assert!(*truncated);
    assert_eq!(groups.len(), wire::MAX_HOLDER_GROUPS);
    assert_eq!(
        (groups[0].size, groups[0].holders),
        (999, 300),
        "majority first"
    );
    assert_eq!(groups[0].peers.len(), wire::MAX_HOLDERS_PER_GROUP);
    assert!(groups[1..].iter().all(|g| g.holders == 1));
}

#[test]
fn the_same_file_listed_five_times_is_one_vote() {
    let mut sim = Sim::new(21);
    let [a, b, c, asker] = [0; 4].map(|_| sim.add_member());
    sim.links[a].core.set_shared(vec![file("f", 1); 5]);
    sim.links[b]
        .core
        .set_shared(vec![file("f", 2), file("f", 2)]);
    sim.links[c].core.set_shared(vec![file("f", 2)]);
    sim.run_for(Duration::from_secs(1));

    let LinkEvent::Files(files) = sim.ask(asker, Query::ListFiles) else {
        panic!("not a file list");
    };
    let votes: Vec<(Hash, u32)> = files.iter().map(|f| (f.root, f.holders)).collect();
    assert_eq!(votes, [(Hash([1; 32]), 1), (Hash([2; 32]), 2)]);
    let LinkEvent::Holders(_, groups) = sim.ask(asker, Query::WhoHas(name("f"))) else {
        panic!("not holders");
    };
    let counts: Vec<(Hash, u32, usize)> = groups
        .iter()
        .map(|g| (g.root, g.holders, g.peers.len()))
        .collect();
    assert_eq!(
        counts,
        [(Hash([2; 32]), 2, 2), (Hash([1; 32]), 1, 1)],
        "b and c outvote a however often a lists its copy"
    );
    sim.assert_converged("after duplicate shares");
}

#[test]
fn over_limit_shares_are_refused_with_a_reason_and_only_the_liar_goes() {
    let mut sim = Sim::new(22);
    let honest: Vec<usize> = (0..2).map(|_| sim.add_member()).collect();
    sim.links[honest[0]].core.set_shared(vec![file("f", 1)]);
    sim.run_for(Duration::from_secs(1));
    let before = sim.registry_peers();

    let too_many = many_files("x", wire::MAX_SHARED_FILES + 1, 1);
    let two_versions = vec![file("f", 1), file("f", 2)];
    let absurd = vec![FileSummary {
        size: wire::MAX_FILE_SIZE + 1,
        ..file("big", 1)
    }];
    let mut cases = Vec::new();
    for (files, why) in [
        (too_many, "at most"),
        (two_versions, "two versions"),
        (absurd, "bytes"),
    ] {
        let (r, conn) = sim.raw_member();
        sim.raw_send(conn, &Message::ShareFiles { files });
        cases.push((r, why));
    }
    // And a ShareFiles before Register: refused from its header alone.
    let (early, conn) = sim.raw_connect();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    sim.raw_send(conn, &hello);
    sim.raw_send(conn, &Message::ShareFiles { files: vec![] });
    sim.run_for(Duration::from_secs(1));

    for (r, why) in cases {
        let inbox = sim.raw_inbox(r);
        let Some(Message::Error { code, reason }) = inbox.last() else {
            panic!("{why}: no error: {inbox:?}");
        };
        assert_eq!(*code, ErrorCode::Limit, "{reason}");
        assert!(reason.contains(why), "{reason:?} should say {why:?}");
        assert!(sim.raws[r].closed);
    }
    let inbox = sim.raw_inbox(early);
    assert!(
        matches!(inbox.last(), Some(Message::Error { code: ErrorCode::Protocol, reason }) if reason.contains("share-files")),
        "{inbox:?}"
    );
    assert_eq!(sim.registry_peers(), before, "the honest peers stay");
    assert_eq!(sim.registry().network_files().len(), 1);
    sim.assert_converged("after the refusals");
}

#[test]
fn honest_peers_stay_listed_while_a_hostile_one_floods() {
    let mut sim = Sim::new(23);
    let honest: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
    sim.links[honest[0]].core.set_shared(vec![file("hot", 1)]);
    sim.run_for(Duration::from_secs(1));
    let (_, conn) = sim.raw_member();
    let sets = [
        many_files("a", wire::MAX_SHARED_FILES, 1),
        many_files("b", wire::MAX_SHARED_FILES, 2),
    ];
    let start = sim.now;
    for step in 0..700u32 {
        // Every 30 ms of virtual time for 21 s: questions, and every 150 ms a
        // file page and a whole new share set at the limit (full churn).
        for _ in 0..3 {
            sim.raw_send(conn, &Message::WhoHas { name: name("hot") });
        }
        if step % 5 == 0 {
            sim.raw_send(conn, &Message::ListFiles { after: None });
            let files = sets[step as usize / 5 % 2].clone();
            sim.raw_send(conn, &Message::ShareFiles { files });
        }
        sim.run_for(30 * MS);
    }
    sim.run_for(Duration::from_secs(1));
    assert!(sim.now - start > 3 * sim.registry_config.peer_timeout);
    for &i in &honest {
        let lost = sim.links[i].events.iter().any(|(t, e)| {
            *t > start && matches!(e, LinkEvent::Lost { .. } | LinkEvent::Refused(_))
        });
        assert!(!lost, "honest link {i} lost the manager");
        assert!(sim.registry_peers().contains_key(&sim.id(i)));
    }
    sim.registry().check_invariants();
    assert_eq!(
        sim.registry_peers().len(),
        4,
        "the flooder is only busy, not wrong"
    );
}

/// Departures a link was told of, by link.
fn told_left(sim: &Sim, i: usize) -> Vec<PeerId> {
    sim.links[i]
        .events
        .iter()
        .flat_map(|(_, e)| match e {
            LinkEvent::PeersLeft(ids) => ids.clone(),
            _ => Vec::new(),
        })
        .collect()
}

#[test]
fn above_the_full_list_limit_links_follow_the_count_and_hear_of_watched_departures() {
    let mut sim = Sim::new(21);
    sim.registry_config.full_list_limit = 3;
    sim.registry = Some(Registry::new(sim.registry_config));
    let links: Vec<usize> = (0..6).map(|_| sim.add_member()).collect();
    let (holder, asker) = (links[0], links[5]);
    sim.links[holder].core.set_shared(vec![file("f", 1)]);
    sim.run_for(Duration::from_secs(1));
    for &i in &links {
        assert_eq!(sim.links[i].core.peer_count(), Some(6), "link {i}");
        assert!(
            sim.links[i].core.peers().is_empty(),
            "link {i} keeps no list"
        );
    }
    let holder_id = sim.id(holder);
    let LinkEvent::Holders(_, groups) = sim.ask(asker, Query::WhoHas(name("f"))) else {
        panic!("not holders");
    };
    assert_eq!(groups[0].peers[0].id, holder_id);

    // The holder crashes: the asker is told within a window, the others not.
    sim.crash(holder);
    sim.run_for(sim.registry_config.broadcast_delay + 3 * sim.max_delay());
    assert_eq!(told_left(&sim, asker), [holder_id]);
    for &i in &links[1..5] {
        assert!(told_left(&sim, i).is_empty(), "link {i} never asked");
    }
    sim.registry().check_invariants();

    // Down to the limit: every link follows the whole list again.
    sim.shutdown(links[1]);
    sim.shutdown(links[2]);
    sim.run_for(Duration::from_secs(3));
    for &i in &links[3..] {
        assert_eq!(sim.links[i].core.peer_count(), None, "link {i}");
    }
    sim.assert_converged("back at the limit");
    // And one more join crosses up again.
    let late = sim.add_member();
    sim.run_for(Duration::from_secs(3));
    for i in [links[3], links[4], links[5], late] {
        assert_eq!(sim.links[i].core.peer_count(), Some(4), "link {i}");
    }
}

#[test]
fn lists_converge_whenever_churn_brings_the_network_back_to_the_limit() {
    for seed in 0..8 {
        let mut sim = Sim::new(100 + seed);
        sim.registry_config.full_list_limit = 4;
        sim.registry = Some(Registry::new(sim.registry_config));
        let mut live: Vec<usize> = (0..3).map(|_| sim.add_member()).collect();
        for round in 0..12 {
            // Up to seven, then back down to at most four.
            while live.len() < 3 + (round % 5) {
                live.push(sim.add_member());
                let gap = MS * sim.rng.between(0, 80) as u32;
                sim.run_for(gap);
            }
            sim.run_for(Duration::from_secs(1));
            while live.len() > 4 {
                let k = sim.rng.between(0, live.len() as u64 - 1) as usize;
                let i = live.swap_remove(k);
                match sim.rng.between(0, 1) {
                    0 => sim.shutdown(i),
                    _ => sim.crash(i),
                }
            }
            sim.run_for(Duration::from_secs(3));
            sim.assert_converged(&format!("seed {seed}, round {round}"));
        }
    }
}
