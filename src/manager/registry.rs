//! The manager's protocol core: who is connected, who is a live peer, what
//! each shares. Pure: it takes decoded messages and `now`, and hands back
//! frames to send and connections to close. The mio shell in `server.rs` only
//! moves bytes and fires the deadline from [`Registry::poll_timeout`].
//!
//! Liveness is a lease: each member sends a keepalive every heartbeat, and a
//! member not heard from (any frame counts) for the peer timeout is swept.
//! The registry pings each member once in [`PROBE_HEARTBEATS`] heartbeats,
//! on the member's own schedule (a second bucketed wheel), only so that
//! members can tell a hung manager from a quiet one: the steady cost per
//! member is one read a heartbeat and a write every ten. Deadlines
//! sit in buckets a fraction of a heartbeat wide ([`timers`](super::timers)),
//! so a sweep looks only at the connections whose bucket is due.
//!
//! Broadcasts: a change to the member set arms a short coalescing timer;
//! when it fires, every member gets one `PeerDelta` computed as the
//! difference between what was last broadcast and the set now, so a burst of
//! joins and leaves costs one small frame per member, not a full list per
//! change per member. Above the full-list limit the members stop following
//! the list: they get `PeerCount` instead, and each member hears only of
//! the departures of peers it was told about in `Holders` answers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::index::FileIndex;
use super::members::Members;
use super::timers::{Slot, Wheel};
use crate::net::ConnId;
use crate::wire::{
    self, Accept, ErrorCode, FILE_PAGE, FileCursor, FileName, FileSummary, Hash, HolderGroup,
    MAX_FILE_SIZE, MAX_SHARED_FILES, Message, NetworkFile, PEER_PAGE, PROBE_HEARTBEATS,
    PROTOCOL_VERSION, PeerEntry, PeerId, PeerKey, Role, accept,
};

/// Most peers a member is remembered to have been told about (in `Holders`
/// answers) for departures on a network above the full-list limit; the
/// oldest are forgotten first.
pub const MAX_WATCHED: usize = 256;

/// Timers of the membership protocol, and the full-list limit.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// How often each member sends its keepalive (and, times
    /// [`PROBE_HEARTBEATS`], how often the registry pings it).
    pub heartbeat: Duration,
    /// A member silent this long is dropped.
    pub peer_timeout: Duration,
    /// How long changes are gathered before one delta goes out.
    pub broadcast_delay: Duration,
    /// Most connections waiting for their hello; also bounds how long one may wait.
    pub hello_timeout: Duration,
    /// While the network has at most this many members, every member gets
    /// the full list and every change; above it, the count and the
    /// departures of the peers it was told about.
    pub full_list_limit: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(6),
            broadcast_delay: Duration::from_millis(50),
            hello_timeout: Duration::from_secs(10),
            full_list_limit: 1000,
        }
    }
}

/// What the shell must do for the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Send(ConnId, Message<'static>),
    /// Send each of these frames, in order. Shared by every connection that
    /// gets the same frames (a join list, a broadcast delta), so queueing
    /// them costs the core O(1) per connection however long they are.
    SendShared(ConnId, Rc<[Message<'static>]>),
    /// Send each of these frames, in order, to each of these connections
    /// (pings and deltas to every member): one action, not one per member.
    Broadcast(Vec<ConnId>, Rc<[Message<'static>]>),
    /// Flush what is queued for the connection, then close it.
    Close(ConnId),
}

/// Why a member left; logged, and useful in tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveReason {
    Goodbye,
    Disconnected,
    TimedOut,
    ProtocolError,
}

impl fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaveReason::Goodbye => "said goodbye",
            LeaveReason::Disconnected => "disconnected",
            LeaveReason::TimedOut => "timed out",
            LeaveReason::ProtocolError => "protocol error",
        })
    }
}

#[derive(Debug)]
enum ConnState {
    /// Connected; its hello not yet seen. `armed`: its deadline's bucket.
    AwaitingHello { since: Instant, armed: Slot },
    /// Said hello; may ask questions or register.
    Client,
    /// A registered, live peer.
    Member(Member),
}

#[derive(Debug)]
struct Member {
    id: PeerId,
    last_heard: Instant,
    /// The bucket its timeout entry is in (see [`Wheel`]).
    armed: Slot,
    /// The bucket its next ping is in.
    ping_armed: Slot,
    /// Whether its list is the member set as of the last broadcast (it got
    /// the join list, or a full delta, and every delta since).
    follows: bool,
    /// What it shares: sorted by name, one version per name, no duplicates.
    files: Vec<FileSummary>,
    /// Peers named to it in `Holders` answers, oldest first, at most
    /// [`MAX_WATCHED`]: it hears of their departures.
    watched: Vec<PeerId>,
}

/// A live member as the lists show it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Live {
    pub conn: ConnId,
    pub addr: SocketAddr,
    /// What its handshake proved ([`PeerKey::UNKNOWN`] on an open network).
    pub key: PeerKey,
}

impl Live {
    fn entry(&self, id: PeerId) -> PeerEntry {
        PeerEntry {
            id,
            addr: self.addr,
            key: self.key,
        }
    }
}

/// Connection states by [`ConnId`]. The shell's ids are slab keys, small
/// and dense, so a vector indexed by them is the compact map: about one
/// state's size per slot, where a hash map of a million entries doubles it.
#[derive(Debug, Default)]
struct ConnTable {
    slots: Vec<Option<ConnState>>,
    len: usize,
}

impl ConnTable {
    fn get(&self, conn: ConnId) -> Option<&ConnState> {
        self.slots.get(conn.0)?.as_ref()
    }

    fn get_mut(&mut self, conn: ConnId) -> Option<&mut ConnState> {
        self.slots.get_mut(conn.0)?.as_mut()
    }

    fn insert(&mut self, conn: ConnId, state: ConnState) {
        if conn.0 >= self.slots.len() {
            self.slots.resize_with(conn.0 + 1, || None);
        }
        if self.slots[conn.0].replace(state).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, conn: ConnId) -> Option<ConnState> {
        let state = self.slots.get_mut(conn.0)?.take()?;
        self.len -= 1;
        Some(state)
    }

    fn iter(&self) -> impl Iterator<Item = (ConnId, &ConnState)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().map(|s| (ConnId(i), s)))
    }

    fn member_mut(&mut self, conn: ConnId) -> Option<&mut Member> {
        match self.get_mut(conn)? {
            ConnState::Member(m) => Some(m),
            _ => None,
        }
    }
}

pub struct Registry {
    config: RegistryConfig,
    conns: ConnTable,
    /// Live members by id: the source of every peer list and page.
    members: Members,
    /// Who shares what; every answer about files reads only this.
    index: FileIndex,
    next_peer_id: u64,
    next_nonce: u64,
    /// The highest id the last broadcast announced. Ids grow with every
    /// join, so the members that joined since are exactly the members above
    /// it: the pending additions need no storage of their own.
    announced_upto: PeerId,
    /// Left since the last broadcast and named in some member's list.
    pending_removed: Vec<PeerId>,
    /// The join list pages every joiner gets until the next broadcast: the
    /// member set when the first joiner after a broadcast came, with the
    /// highest id it names. The next delta brings each
    /// joiner from it to the live set, so it is built once per broadcast
    /// window, not once per join.
    join_list: Option<(Rc<[Message<'static>]>, PeerId)>,
    /// The network was at most the full-list limit at the last broadcast:
    /// members follow the list. When false, no member follows.
    listing: bool,
    /// Watched peer -> the members that were told about it.
    watchers: HashMap<PeerId, BTreeSet<ConnId>>,
    /// Watched peers that left since the last broadcast, by watcher.
    departures: BTreeMap<ConnId, Vec<PeerId>>,
    /// Turns every `WhoHas` to a new starting holder.
    rotate: u64,
    broadcast_due: Option<Instant>,
    /// Hello and peer timeouts, bucketed.
    deadlines: Wheel,
    /// When each member is next pinged, bucketed the same way.
    pings: Wheel,
    actions: VecDeque<Action>,
    /// Static keys proved by each connection's handshake (sealed networks).
    keys: HashMap<ConnId, PeerKey>,
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Registry {
        Registry {
            config,
            conns: ConnTable::default(),
            members: Members::default(),
            index: FileIndex::default(),
            next_peer_id: 1,
            next_nonce: 1,
            announced_upto: PeerId(0),
            pending_removed: Vec::new(),
            join_list: None,
            listing: true,
            watchers: HashMap::new(),
            departures: BTreeMap::new(),
            rotate: 0,
            broadcast_due: None,
            deadlines: Wheel::new(config.heartbeat / 4),
            pings: Wheel::new(config.heartbeat / 4),
            actions: VecDeque::new(),
            keys: HashMap::new(),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// The largest body a frame of `kind` may have on `conn` now, or `None`
    /// if `conn` may not send that kind at all in its state (or is unknown).
    /// The shell asks before buffering each frame's body, so an unregistered
    /// connection can never make the manager hold a large `ShareFiles`:
    /// before its hello only `Hello` (and `Error`), before `Register` no
    /// `ShareFiles`, and never a peer-to-peer or manager-to-peer kind.
    pub fn max_frame_body(&self, conn: ConnId, kind: u8) -> Option<usize> {
        self.conns.get(conn)?;
        self.accepts(conn).limit(kind)
    }

    /// The shell read the header of a frame that [`Registry::max_frame_body`]
    /// refuses: the connection is told why and closed.
    pub fn handle_refused_frame(&mut self, conn: ConnId, kind: u8, body_len: usize, now: Instant) {
        let Some(state) = self.conns.get(conn) else {
            self.actions.push_back(Action::Close(conn));
            return;
        };
        let state = state_name(state);
        let name = wire::kind_name(kind);
        let (code, reason) = match self.max_frame_body(conn, kind) {
            None => (
                ErrorCode::Protocol,
                format!("a {name} frame (0x{kind:02x}) is not accepted while {state}"),
            ),
            Some(max) => (
                ErrorCode::Limit,
                format!("a {name} frame of {body_len} bytes is over its limit of {max}"),
            ),
        };
        self.refuse(conn, code, reason, now);
    }

    /// A new connection: greet it and give it until the hello timeout.
    pub fn handle_connected(&mut self, conn: ConnId, now: Instant) {
        self.keys.remove(&conn);
        if self.conns.get(conn).is_some() {
            // A reused id the shell never reported closed: the old one is gone.
            self.drop_conn(conn, LeaveReason::Disconnected, now);
        }
        let armed = self
            .deadlines
            .arm(conn, now + self.config.hello_timeout, now);
        self.conns
            .insert(conn, ConnState::AwaitingHello { since: now, armed });
        self.send(
            conn,
            Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Manager,
            },
        );
    }

    /// The connection's Noise handshake proved `key` (sealed networks only;
    /// the shell calls this before any frame of it reaches the registry).
    /// A member registered over it is listed with this key.
    pub fn handle_authenticated(&mut self, conn: ConnId, key: PeerKey) {
        self.keys.insert(conn, key);
    }

    /// The connection closed (EOF, reset, or a frame that did not decode).
    pub fn handle_disconnected(&mut self, conn: ConnId, now: Instant) {
        self.drop_conn(conn, LeaveReason::Disconnected, now);
    }

    /// A frame from `conn`. `remote` is the address the connection came from,
    /// used for a member's address unless it advertises its own.
    pub fn handle_message(
        &mut self,
        conn: ConnId,
        remote: SocketAddr,
        msg: Message<'_>,
        now: Instant,
    ) {
        let Some(state) = self.conns.get_mut(conn) else {
            return; // stale: the connection was already dropped
        };
        if let ConnState::Member(m) = state {
            m.last_heard = now;
        }
        match (state, msg) {
            (ConnState::AwaitingHello { .. }, Message::Hello { version, role }) => {
                if version != PROTOCOL_VERSION || role != Role::ManagerClient {
                    let reason = format!(
                        "this manager speaks protocol {PROTOCOL_VERSION} to peers; got version {version} from a {role:?}"
                    );
                    self.refuse(conn, ErrorCode::Incompatible, reason, now);
                } else {
                    // Its wheel entry goes stale: a client has no deadline.
                    self.conns.insert(conn, ConnState::Client);
                }
            }
            (
                ConnState::Client,
                Message::Register {
                    listen_port,
                    advertise,
                },
            ) => {
                let addr = advertise.unwrap_or(SocketAddr::new(remote.ip(), listen_port));
                self.join(conn, addr, now);
            }
            (ConnState::Member(_), Message::ShareFiles { files }) => self.share(conn, files, now),
            // A keepalive or the answer to a ping: `last_heard` is all it does.
            (ConnState::Client | ConnState::Member(_), Message::Pong { .. }) => {}
            (ConnState::Client | ConnState::Member(_), Message::Goodbye) => {
                self.drop_conn(conn, LeaveReason::Goodbye, now);
                self.actions.push_back(Action::Close(conn));
            }
            (_, Message::Error { code, reason }) => {
                log::info!("connection {} gave up: {reason} ({code:?})", conn.0);
                self.drop_conn(conn, LeaveReason::Disconnected, now);
                self.actions.push_back(Action::Close(conn));
            }
            (ConnState::Client | ConnState::Member(_), Message::Ping { nonce }) => {
                self.send(conn, Message::Pong { nonce });
            }
            (state, Message::ListPeers { after })
                if !matches!(state, ConnState::AwaitingHello { .. }) =>
            {
                // A client gets no broadcasts: above the limit, the answer
                // tells it how many there are in all.
                let client = matches!(state, ConnState::Client);
                if client && self.members.len() > self.config.full_list_limit {
                    let total = count(self.members.len());
                    self.send(conn, Message::PeerCount { total });
                }
                let (peers, more) = self.peer_page(after, PEER_PAGE);
                self.send(conn, Message::PeerList { peers, more });
            }
            (ConnState::Client | ConnState::Member(_), Message::ListFiles { after }) => {
                let (files, more) = self.index.page(after.as_ref(), FILE_PAGE);
                self.send(conn, Message::FileList { files, more });
            }
            (ConnState::Client | ConnState::Member(_), Message::WhoHas { name }) => {
                self.rotate = self.rotate.wrapping_add(1);
                let start =
                    (self.rotate.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 11) % self.next_peer_id;
                let (groups, truncated) = self.holders_from(&name, start);
                self.watch(conn, &groups);
                self.send(
                    conn,
                    Message::Holders {
                        name,
                        truncated,
                        groups,
                    },
                );
            }
            (state, msg) => {
                let reason = format!(
                    "unexpected {} while {}",
                    wire::kind_name(msg.kind()),
                    state_name(state)
                );
                self.refuse(conn, ErrorCode::Protocol, reason, now);
            }
        }
    }

    /// What the next frame from `conn` may be: only a hello before the hello,
    /// and a big file list only from a registered member.
    pub fn accepts(&self, conn: ConnId) -> Accept {
        match self.conns.get(conn) {
            Some(ConnState::Member(_)) => accept::MANAGER_MEMBER,
            Some(ConnState::Client) => accept::MANAGER_CLIENT,
            _ => accept::MANAGER_BEFORE_HELLO,
        }
    }

    /// True while actions wait to be drained.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Fires due timers: handshake and member timeouts, pings, the broadcast.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.sweep(now);
        self.ping_members(now);
        if self.broadcast_due.is_some_and(|t| t <= now) {
            self.broadcast();
        }
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        [
            self.deadlines.next_due(),
            self.pings.next_due(),
            self.broadcast_due,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// How many live members the network has.
    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    /// Every live peer, ordered by id (the operator's `peers` command).
    pub fn peer_list(&self) -> Vec<PeerEntry> {
        self.members.iter().map(|(id, l)| l.entry(id)).collect()
    }

    /// Live peers with ids above `after`, at most `limit`, and whether more
    /// follow. O(page + log n).
    pub fn peer_page(&self, after: PeerId, limit: usize) -> (Vec<PeerEntry>, bool) {
        let mut peers: Vec<PeerEntry> = self
            .members
            .after(after)
            .map(|(id, l)| l.entry(id))
            .take(limit.saturating_add(1))
            .collect();
        let more = peers.len() > limit;
        peers.truncate(limit);
        (peers, more)
    }

    /// Every (name, version) shared on the network with its holder count
    /// (the operator's `files` command; peers get it page by page).
    pub fn network_files(&self) -> Vec<NetworkFile> {
        let mut all = Vec::with_capacity(self.index.len());
        let mut after: Option<FileCursor> = None;
        loop {
            let (page, more) = self.index.page(after.as_ref(), FILE_PAGE);
            after = page.last().map(NetworkFile::cursor);
            all.extend(page);
            if !more || after.is_none() {
                return all;
            }
        }
    }

    /// The answer to `WhoHas name` (without rotation): versions most-held
    /// first, and whether some versions or holders were left out.
    pub fn holders(&self, name: &FileName) -> (Vec<HolderGroup>, bool) {
        self.holders_from(name, 0)
    }

    fn holders_from(&self, name: &FileName, start: u64) -> (Vec<HolderGroup>, bool) {
        self.index
            .holders(name, start, |id| self.members.get(id).map(|l| l.entry(id)))
    }

    /// Checks the invariants docs/state/membership.md states (for tests):
    /// `members` and the `Member` connections agree, the index holds
    /// exactly the members' shared files, every deadline is in the wheel,
    /// and the watch lists and their reverse map mirror each other.
    pub fn check_invariants(&self) {
        self.members.check_invariants();
        let mut shared = 0;
        for (id, live) in self.members.iter() {
            match self.conns.get(live.conn) {
                Some(ConnState::Member(m)) if m.id == id => shared += m.files.len(),
                other => panic!("member {id} points at {other:?}"),
            }
        }
        let mut member_conns = 0;
        let mut watch_pairs = 0;
        for (conn, state) in self.conns.iter() {
            match state {
                ConnState::AwaitingHello { armed, .. } => {
                    assert!(
                        self.deadlines.holds(*armed, conn),
                        "{conn:?}'s hello deadline"
                    );
                }
                ConnState::Member(m) => {
                    member_conns += 1;
                    assert!(self.deadlines.holds(m.armed, conn), "{conn:?}'s deadline");
                    assert!(self.pings.holds(m.ping_armed, conn), "{conn:?}'s ping");
                    assert!(!m.follows || self.listing, "a follower while not listing");
                    assert!(m.watched.len() <= MAX_WATCHED);
                    for id in &m.watched {
                        let w = self.watchers.get(id);
                        assert!(
                            w.is_some_and(|w| w.contains(&conn)),
                            "{conn:?} watches {id}"
                        );
                    }
                    watch_pairs += m.watched.len();
                }
                ConnState::Client => {}
            }
        }
        assert_eq!(member_conns, self.members.len());
        assert_eq!(self.conns.len, self.conns.iter().count());
        let reverse: usize = self.watchers.values().map(BTreeSet::len).sum();
        assert_eq!(reverse, watch_pairs, "watchers mirror the watch lists");
        assert!(self.watchers.values().all(|w| !w.is_empty()));
        for conn in self.departures.keys() {
            assert!(matches!(self.conns.get(*conn), Some(ConnState::Member(_))));
        }
        self.index.check_invariants();
        let (mut pairs, mut more, mut after) = (0, true, None);
        while more {
            let (page, m) = self.index.page(after.as_ref(), FILE_PAGE);
            pairs += page.iter().map(|f| f.holders as usize).sum::<usize>();
            after = page.last().map(NetworkFile::cursor);
            more = m;
        }
        assert_eq!(pairs, shared, "index votes vs members' files");
    }

    fn join(&mut self, conn: ConnId, addr: SocketAddr, now: Instant) {
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        log::info!("peer {id} joined, serving at {addr}");
        let key = self.keys.get(&conn).copied().unwrap_or_default();
        // Ids only grow, so the push cannot be refused.
        self.members.push(id, Live { conn, addr, key });
        let follows = self.listing && self.members.len() <= self.config.full_list_limit;
        let armed = self
            .deadlines
            .arm(conn, now + self.config.peer_timeout, now);
        // The first ping within PROBE_HEARTBEATS - 1 heartbeats, spread by
        // id so that a burst of joins is not pinged all in one turn.
        let first = 1 + (id.0 % u64::from(PROBE_HEARTBEATS - 1)) as u32;
        let ping_armed = self
            .pings
            .arm(conn, now + self.config.heartbeat * first, now);
        self.conns.insert(
            conn,
            ConnState::Member(Member {
                id,
                last_heard: now,
                armed,
                ping_armed,
                follows,
                files: Vec::new(),
                watched: Vec::new(),
            }),
        );
        self.send(
            conn,
            Message::Welcome {
                peer_id: id,
                heartbeat_ms: self.config.heartbeat.as_millis() as u32,
                peer_timeout_ms: self.config.peer_timeout.as_millis() as u32,
            },
        );
        if follows {
            // The join list, in pages sent back to back: no delta can come
            // between them, so the link may assemble them before applying any.
            let pages = match &self.join_list {
                Some((pages, _)) => pages.clone(),
                None => {
                    let pages = self.join_pages();
                    self.join_list = Some((pages.clone(), id));
                    pages
                }
            };
            self.actions.push_back(Action::SendShared(conn, pages));
        } else {
            let total = count(self.members.len());
            self.send(conn, Message::PeerCount { total });
        }
        self.membership_changed(now);
    }

    /// Remembers the peers a `Holders` answer names to a member (the first
    /// [`MAX_WATCHED`], the ones a download tries first), so it hears of
    /// their departures on a network above the limit. O(answer · 256).
    fn watch(&mut self, conn: ConnId, groups: &[HolderGroup]) {
        let Some(m) = self.conns.member_mut(conn) else {
            return; // a client gets no broadcasts
        };
        let named = groups.iter().flat_map(|g| &g.peers).map(|p| p.id);
        for id in named.take(MAX_WATCHED) {
            if id == m.id || m.watched.contains(&id) {
                continue;
            }
            if m.watched.len() == MAX_WATCHED {
                let old = m.watched.remove(0);
                unwatch(&mut self.watchers, old, conn);
            }
            m.watched.push(id);
            self.watchers.entry(id).or_default().insert(conn);
        }
    }

    /// Replaces a member's shared set, after checking it against the limits:
    /// O(its size), whatever the rest of the network holds. Exact duplicate
    /// entries count once; anything else suspicious refuses the whole frame.
    fn share(&mut self, conn: ConnId, mut files: Vec<FileSummary>, now: Instant) {
        if let Err(reason) = check_share(&mut files) {
            return self.refuse(conn, ErrorCode::Limit, reason, now);
        }
        let Some(m) = self.conns.member_mut(conn) else {
            return; // the caller matched a member
        };
        log::debug!("peer {} shares {} files", m.id, files.len());
        // Both sets are sorted the same way: walk them together so only what
        // changed touches the index (a re-share after one edit costs one
        // add and one remove, not the whole set twice).
        let (old, id) = (std::mem::take(&mut m.files), m.id);
        let (mut i, mut j) = (0, 0);
        loop {
            match (old.get(i), files.get(j)) {
                (Some(o), Some(n)) if o == n => (i, j) = (i + 1, j + 1),
                (Some(o), Some(n)) if share_key(o) < share_key(n) => {
                    self.index.remove(id, &o.name, o.root, o.size);
                    i += 1;
                }
                (Some(o), None) => {
                    self.index.remove(id, &o.name, o.root, o.size);
                    i += 1;
                }
                (_, Some(n)) => {
                    self.index.add(id, &n.name, n.root, n.size);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        if let Some(m) = self.conns.member_mut(conn) {
            m.files = files;
        }
    }

    fn drop_conn(&mut self, conn: ConnId, reason: LeaveReason, now: Instant) {
        self.keys.remove(&conn);
        let Some(ConnState::Member(m)) = self.conns.remove(conn) else {
            return;
        };
        log::info!("peer {} left ({reason})", m.id);
        self.members.remove(m.id);
        for f in &m.files {
            self.index.remove(m.id, &f.name, f.root, f.size);
        }
        let named = self.join_list.as_ref().map_or(PeerId(0), |(_, upto)| *upto);
        // Never broadcast and in no join list: nobody knows it.
        if m.id <= self.announced_upto.max(named) {
            self.pending_removed.push(m.id);
        }
        for id in &m.watched {
            unwatch(&mut self.watchers, *id, conn);
        }
        self.departures.remove(&conn);
        for watcher in self.watchers.remove(&m.id).unwrap_or_default() {
            if let Some(w) = self.conns.member_mut(watcher) {
                w.watched.retain(|id| *id != m.id);
                self.departures.entry(watcher).or_default().push(m.id);
            }
        }
        self.membership_changed(now);
    }

    /// The live set as `PeerList` pages, `more` on all but the last.
    fn join_pages(&self) -> Rc<[Message<'static>]> {
        let peers = self.peer_list();
        let pages = peers.len().div_ceil(PEER_PAGE).max(1);
        (0..pages)
            .map(|i| Message::PeerList {
                peers: page_of(&peers, i).to_vec(),
                more: i + 1 < pages,
            })
            .collect()
    }

    fn refuse(&mut self, conn: ConnId, code: ErrorCode, reason: String, now: Instant) {
        log::warn!("closing connection {}: {reason}", conn.0);
        self.send(conn, Message::Error { code, reason });
        self.actions.push_back(Action::Close(conn));
        self.drop_conn(conn, LeaveReason::ProtocolError, now);
        self.conns.remove(conn);
    }

    fn membership_changed(&mut self, now: Instant) {
        // Earlier than a held-back count's window: a change goes out within
        // the broadcast delay.
        let due = now + self.config.broadcast_delay;
        self.broadcast_due = Some(self.broadcast_due.map_or(due, |t| t.min(due)));
    }

    /// What changed since the last broadcast, to everyone who should hear
    /// it. At most the limit: one delta per following member, cut in frames
    /// of at most [`PEER_PAGE`] ids per list (O(changes) to build, never a
    /// walk over the member set to find them), and the whole set as one
    /// delta to a member that does not follow (it joined above the limit,
    /// or the network just came back down to it). Above the limit: one
    /// `PeerCount` to every member if the count changed (at most once a
    /// heartbeat; a change held back re-arms the window). Either way, each
    /// watcher gets the departures of the peers it watched that its delta
    /// does not already carry.
    fn broadcast(&mut self) {
        self.broadcast_due = None;
        self.join_list = None;
        let removed = std::mem::take(&mut self.pending_removed);
        let mut departures = std::mem::take(&mut self.departures);
        let total = self.members.len();
        let upto = std::mem::replace(&mut self.announced_upto, PeerId(self.next_peer_id - 1));
        if total <= self.config.full_list_limit {
            let added = self.members.after(upto).count();
            let delta =
                (added > 0 || !removed.is_empty()).then(|| self.delta_frames(upto, &removed));
            let (mut followers, mut others) = (Vec::new(), Vec::new());
            for (_, live) in self.members.iter() {
                if let Some(ConnState::Member(m)) = self.conns.get(live.conn) {
                    match m.follows {
                        true => followers.push(live.conn),
                        false => others.push(live.conn),
                    }
                }
            }
            log::debug!(
                "broadcast: +{added} -{} to {} peers, the whole list to {}",
                removed.len(),
                followers.len(),
                others.len()
            );
            if !self.listing {
                log::info!(
                    "{total} peers: at most {}, members follow the list again",
                    self.config.full_list_limit
                );
            }
            self.listing = true;
            // A follower's delta already names the ids it removes.
            if !removed.is_empty() && !departures.is_empty() {
                let named: HashSet<PeerId> = removed.iter().copied().collect();
                for (conn, ids) in departures.iter_mut() {
                    if self.conns.get(*conn).is_some_and(follows) {
                        ids.retain(|id| !named.contains(id));
                    }
                }
            }
            if let Some(delta) = delta.filter(|_| !followers.is_empty()) {
                self.actions.push_back(Action::Broadcast(followers, delta));
            }
            if !others.is_empty() {
                for conn in &others {
                    if let Some(m) = self.conns.member_mut(*conn) {
                        m.follows = true;
                    }
                }
                let whole = self.delta_frames(PeerId(0), &[]);
                self.actions.push_back(Action::Broadcast(others, whole));
            }
        } else {
            let crossed = self.listing;
            if crossed {
                log::info!(
                    "{total} peers: over {}, members get the count",
                    self.config.full_list_limit
                );
                for conn in self.members.conns() {
                    if let Some(m) = self.conns.member_mut(conn) {
                        m.follows = false;
                    }
                }
            }
            self.listing = false;
            // Everyone switches from the list to the count at once; after
            // that the count rides on the pings (`ping_members`), so a
            // churning big network costs no write per member per change.
            if crossed {
                let frame: Rc<[Message<'static>]> = Rc::new([Message::PeerCount {
                    total: count(total),
                }]);
                self.actions
                    .push_back(Action::Broadcast(self.members.conns(), frame));
            }
        }
        for (conn, removed) in departures {
            if !removed.is_empty() {
                let added = Vec::new();
                self.send(conn, Message::PeerDelta { added, removed });
            }
        }
    }

    /// Members above `after` as additions and `removed` as removals, in
    /// `PeerDelta` frames of at most [`PEER_PAGE`] ids per list (at least one).
    fn delta_frames(&self, after: PeerId, removed: &[PeerId]) -> Rc<[Message<'static>]> {
        let added = self.members.after(after).count();
        let mut joined = self.members.after(after).map(|(id, l)| l.entry(id));
        let frames = added.max(removed.len()).div_ceil(PEER_PAGE).max(1);
        (0..frames)
            .map(|i| Message::PeerDelta {
                added: joined.by_ref().take(PEER_PAGE).collect(),
                removed: page_of(removed, i).to_vec(),
            })
            .collect()
    }

    /// Pings the members whose ping bucket is due, one frame shared by all
    /// of them, and puts each back [`PROBE_HEARTBEATS`] - 1 heartbeats on.
    /// A bucket fires late by less than a quarter heartbeat, so every member
    /// is pinged within [`PROBE_HEARTBEATS`] heartbeats of its Welcome and
    /// of its last ping, whatever joins and leaves meanwhile; a turn looks
    /// only at the entries due. An entry left by a closed connection is
    /// dropped when its bucket comes up.
    fn ping_members(&mut self, now: Instant) {
        let again = self.config.heartbeat * (PROBE_HEARTBEATS - 1);
        let mut conns = Vec::new();
        while let Some((slot, due)) = self.pings.pop_due(now) {
            for conn in due {
                let Some(m) = self.conns.member_mut(conn) else {
                    continue; // closed, or a new connection in its slot
                };
                if m.ping_armed != slot {
                    continue;
                }
                m.ping_armed = self.pings.arm(conn, now + again, now);
                conns.push(conn);
            }
        }
        if conns.is_empty() {
            return;
        }
        let ping = Message::Ping {
            nonce: self.next_nonce,
        };
        self.next_nonce += 1;
        let frames: Rc<[Message<'static>]> = if self.listing {
            Rc::new([ping])
        } else {
            let total = count(self.members.len());
            Rc::new([Message::PeerCount { total }, ping])
        };
        self.actions.push_back(Action::Broadcast(conns, frames));
    }

    /// Expires the connections whose deadline bucket is due: each entry is
    /// checked against its connection's state (it may have closed, moved
    /// to a later bucket, or been heard from since, then it is re-armed).
    /// O(due entries), whatever the number of connections.
    fn sweep(&mut self, now: Instant) {
        let peer_timeout = self.config.peer_timeout;
        let hello_timeout = self.config.hello_timeout;
        while let Some((slot, conns)) = self.deadlines.pop_due(now) {
            for conn in conns {
                let (deadline, reason) = match self.conns.get(conn) {
                    Some(ConnState::AwaitingHello { since, armed }) if *armed == slot => {
                        (*since + hello_timeout, LeaveReason::ProtocolError)
                    }
                    Some(ConnState::Member(m)) if m.armed == slot => {
                        (m.last_heard + peer_timeout, LeaveReason::TimedOut)
                    }
                    _ => continue, // closed, a client now, or bucketed elsewhere
                };
                if deadline > now {
                    let armed = self.deadlines.arm(conn, deadline, now);
                    match self.conns.get_mut(conn) {
                        Some(ConnState::AwaitingHello { armed: a, .. }) => *a = armed,
                        Some(ConnState::Member(m)) => m.armed = armed,
                        _ => {}
                    }
                    continue;
                }
                if reason == LeaveReason::TimedOut {
                    log::warn!("peer on connection {} silent for {peer_timeout:?}", conn.0);
                }
                self.drop_conn(conn, reason, now);
                self.conns.remove(conn);
                self.actions.push_back(Action::Close(conn));
            }
        }
    }

    fn send(&mut self, conn: ConnId, msg: Message<'static>) {
        self.actions.push_back(Action::Send(conn, msg));
    }
}

fn follows(state: &ConnState) -> bool {
    matches!(state, ConnState::Member(m) if m.follows)
}

/// A member count as `PeerCount` carries it.
fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// `conn` no longer watches `id`.
fn unwatch(watchers: &mut HashMap<PeerId, BTreeSet<ConnId>>, id: PeerId, conn: ConnId) {
    if let Some(w) = watchers.get_mut(&id) {
        w.remove(&conn);
        if w.is_empty() {
            watchers.remove(&id);
        }
    }
}

/// Sorts and dedups a share set and checks it against the per-registration
/// limits; the error is the reason sent to the peer. O(n log n) in the
/// frame's own size.
fn check_share(files: &mut Vec<FileSummary>) -> Result<(), String> {
    if files.len() > MAX_SHARED_FILES {
        return Err(format!(
            "shares {} files; one registration may share at most {MAX_SHARED_FILES}",
            files.len()
        ));
    }
    if let Some(f) = files.iter().find(|f| f.size > MAX_FILE_SIZE) {
        return Err(format!(
            "claims {:?} is {} bytes, over the {MAX_FILE_SIZE} a manifest can describe",
            f.name.as_str(),
            f.size
        ));
    }
    files.sort_unstable_by(|a, b| share_key(a).cmp(&share_key(b)));
    files.dedup();
    if let Some(w) = files.windows(2).find(|w| w[0].name == w[1].name) {
        return Err(format!(
            "lists {:?} in two versions ({} and {}); share one version per name",
            w[0].name.as_str(),
            w[0].root.short(),
            w[1].root.short()
        ));
    }
    Ok(())
}

/// The order a member's files are kept in (the index's order too).
fn share_key(f: &FileSummary) -> (&FileName, Hash, u64) {
    (&f.name, f.root, f.size)
}

/// The `i`th page of [`PEER_PAGE`] items (empty past the end).
fn page_of<T>(items: &[T], i: usize) -> &[T] {
    let start = (i * PEER_PAGE).min(items.len());
    &items[start..(start + PEER_PAGE).min(items.len())]
}

fn state_name(state: &ConnState) -> &'static str {
    match state {
        ConnState::AwaitingHello { .. } => "awaiting hello",
        ConnState::Client => "connected, not registered",
        ConnState::Member(_) => "registered",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::kind;

    fn check_invariants(r: &Registry) {
        r.check_invariants();
    }

    fn join(r: &mut Registry, conn: usize, now: Instant) {
        let remote: SocketAddr = ([10, 0, 0, conn as u8], 4000).into();
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        };
        let register = Message::Register {
            listen_port: 7000,
            advertise: None,
        };
        r.handle_connected(ConnId(conn), now);
        r.handle_message(ConnId(conn), remote, hello, now);
        r.handle_message(ConnId(conn), remote, register, now);
        check_invariants(r);
    }

    #[test]
    fn a_member_that_joins_and_leaves_between_broadcasts_is_removed_in_the_delta() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        join(&mut r, 1, t0);
        join(&mut r, 2, t0);
        r.handle_disconnected(ConnId(1), t0);
        check_invariants(&r);
        while r.poll_action().is_some() {}

        r.handle_timeout(t0 + r.config.broadcast_delay);
        let delta = std::iter::from_fn(|| r.poll_action()).find_map(|a| match a {
            Action::Broadcast(conns, frames) if conns == [ConnId(2)] => match &frames[..] {
                [Message::PeerDelta { added, removed }] => Some((added.clone(), removed.clone())),
                _ => None,
            },
            _ => None,
        });
        let (added, removed) = delta.expect("a delta to the member still there");
        assert_eq!(added.iter().map(|p| p.id).collect::<Vec<_>>(), [PeerId(2)]);
        assert_eq!(removed, [PeerId(1)], "conn 2's join list named peer 1");
    }

    fn share(r: &mut Registry, conn: usize, files: Vec<FileSummary>, now: Instant) {
        let remote: SocketAddr = ([10, 0, 0, conn as u8], 4000).into();
        r.handle_message(ConnId(conn), remote, Message::ShareFiles { files }, now);
        check_invariants(r);
    }

    fn entry(name: &str, root: u8, size: u64) -> FileSummary {
        FileSummary {
            name: FileName::new(name).unwrap(), // a plain name
            size,
            root: crate::wire::Hash([root; 32]),
        }
    }

    fn drain(r: &mut Registry) -> Vec<Action> {
        std::iter::from_fn(|| r.poll_action()).collect()
    }

    #[test]
    fn the_frame_table_follows_the_connection_state() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        let c = ConnId(1);
        assert_eq!(r.max_frame_body(c, kind::HELLO), None, "unknown connection");
        r.handle_connected(c, t0);
        assert!(r.max_frame_body(c, kind::HELLO).is_some());
        for k in [
            kind::REGISTER,
            kind::SHARE_FILES,
            kind::LIST_FILES,
            kind::CHUNK,
        ] {
            assert_eq!(r.max_frame_body(c, k), None, "kind {k:#x} before hello");
        }
        let remote: SocketAddr = ([10, 0, 0, 1], 4000).into();
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        };
        r.handle_message(c, remote, hello, t0);
        assert!(r.max_frame_body(c, kind::REGISTER).is_some());
        assert!(r.max_frame_body(c, kind::WHO_HAS).is_some());
        assert_eq!(
            r.max_frame_body(c, kind::SHARE_FILES),
            None,
            "before register"
        );
        assert_eq!(r.max_frame_body(c, kind::HELLO), None, "a second hello");
        let register = Message::Register {
            listen_port: 7000,
            advertise: None,
        };
        r.handle_message(c, remote, register, t0);
        assert_eq!(
            r.max_frame_body(c, kind::SHARE_FILES),
            Some(crate::wire::MAX_SHARE_FILES_BODY)
        );
        for k in [
            kind::MANIFEST,
            kind::CHUNK,
            kind::GET_CHUNK,
            kind::GET_MANIFEST,
            kind::CANCEL,
            kind::PEER_LIST,
            kind::PEER_DELTA,
            kind::HOLDERS,
            kind::FILE_LIST,
            kind::WELCOME,
            kind::REGISTER,
            0xee,
        ] {
            assert_eq!(r.max_frame_body(c, k), None, "kind {k:#x} from a member");
        }
        drain(&mut r);
        r.handle_refused_frame(c, kind::CHUNK, 10, t0);
        let actions = drain(&mut r);
        assert!(
            matches!(&actions[..], [Action::Send(_, Message::Error { code: ErrorCode::Protocol, reason }), Action::Close(_)] if reason.contains("chunk")),
            "{actions:?}"
        );
        assert!(r.peer_list().is_empty(), "the offender left");
        check_invariants(&r);
    }

    #[test]
    fn one_registration_is_one_vote() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        join(&mut r, 1, t0);
        join(&mut r, 2, t0);
        share(&mut r, 1, vec![entry("f", 1, 10); 5], t0);
        share(&mut r, 2, vec![entry("f", 2, 10), entry("f", 2, 10)], t0);
        let files = r.network_files();
        let votes: Vec<u32> = files.iter().map(|f| f.holders).collect();
        assert_eq!(votes, [1, 1], "{files:?}");
        let (groups, truncated) = r.holders(&FileName::new("f").unwrap());
        assert!(!truncated);
        assert_eq!(groups.len(), 2);
        assert!(groups.iter().all(|g| g.holders == 1 && g.peers.len() == 1));
        // Re-sharing the same set again changes nothing.
        share(&mut r, 1, vec![entry("f", 1, 10); 3], t0);
        assert_eq!(r.network_files(), files);
    }

    #[test]
    fn lying_shares_are_refused_with_a_reason() {
        let t0 = Instant::now();
        let too_many: Vec<FileSummary> = (0..=MAX_SHARED_FILES)
            .map(|i| entry(&format!("f{i}"), 1, 1))
            .collect();
        let cases: [(Vec<FileSummary>, &str); 3] = [
            (vec![entry("f", 1, 1), entry("f", 2, 1)], "two versions"),
            (vec![entry("f", 1, MAX_FILE_SIZE + 1)], "bytes"),
            (too_many, "at most"),
        ];
        for (files, why) in cases {
            let mut r = Registry::new(RegistryConfig::default());
            join(&mut r, 1, t0);
            join(&mut r, 2, t0);
            share(&mut r, 2, vec![entry("g", 1, 1)], t0);
            drain(&mut r);
            share(&mut r, 1, files, t0);
            let actions = drain(&mut r);
            assert!(
                matches!(&actions[..], [Action::Send(ConnId(1), Message::Error { code: ErrorCode::Limit, reason }), Action::Close(ConnId(1))] if reason.contains(why)),
                "{why}: {actions:?}"
            );
            let ids: Vec<PeerId> = r.peer_list().iter().map(|p| p.id).collect();
            assert_eq!(ids, [PeerId(2)], "only the liar left");
            assert_eq!(r.network_files().len(), 1, "the honest share stays");
        }
    }

    #[test]
    fn names_are_compared_byte_for_byte() {
        // "é" precomposed and decomposed, and a case difference: distinct
        // names, each its own entry, each bounded by the same limits.
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        join(&mut r, 1, t0);
        let names = ["caf\u{e9}", "cafe\u{301}", "Cafe", "cafe"];
        share(
            &mut r,
            1,
            names.iter().map(|n| entry(n, 1, 0)).collect(),
            t0,
        );
        assert_eq!(r.network_files().len(), 4);
        let (groups, _) = r.holders(&FileName::new("cafe").unwrap());
        assert_eq!(groups.len(), 1);
    }

    #[test]
    fn a_join_list_is_built_once_per_window_and_shared() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        let mut lists = Vec::new();
        for c in 1..=3 {
            join(&mut r, c, t0);
            lists.extend(drain(&mut r).into_iter().filter_map(|a| match a {
                Action::SendShared(_, frames) => Some(frames),
                _ => None,
            }));
        }
        assert_eq!(lists.len(), 3);
        assert!(Rc::ptr_eq(&lists[0], &lists[2]), "one list for the window");
        // Peer 3 joined after the list was built: no list names it, so its
        // leave needs no removal; peer 1 is named and must be removed.
        r.handle_disconnected(ConnId(3), t0);
        r.handle_disconnected(ConnId(1), t0);
        r.handle_timeout(t0 + r.config.broadcast_delay);
        let deltas: Vec<Rc<[Message<'static>]>> = drain(&mut r)
            .into_iter()
            .filter_map(|a| match a {
                Action::Broadcast(conns, frames) if conns == [ConnId(2)] => Some(frames),
                _ => None,
            })
            .collect();
        let [delta] = &deltas[..] else {
            panic!("{deltas:?}");
        };
        assert!(
            matches!(&delta[..], [Message::PeerDelta { added, removed }]
                if added.iter().map(|p| p.id).eq([PeerId(2)]) && removed == &[PeerId(1)]),
            "{delta:?}"
        );
        check_invariants(&r);
    }

    fn with_limit(limit: usize) -> Registry {
        Registry::new(RegistryConfig {
            full_list_limit: limit,
            ..RegistryConfig::default()
        })
    }

    /// What each connection was sent, in order, broadcasts spread out
    /// (pings left out).
    fn sent(r: &mut Registry) -> BTreeMap<ConnId, Vec<Message<'static>>> {
        let mut out: BTreeMap<ConnId, Vec<Message<'static>>> = BTreeMap::new();
        for a in drain(r) {
            match a {
                Action::Send(c, m) => out.entry(c).or_default().push(m),
                Action::SendShared(c, ms) => out.entry(c).or_default().extend(ms.iter().cloned()),
                Action::Broadcast(cs, ms) => {
                    for c in cs {
                        out.entry(c).or_default().extend(ms.iter().cloned());
                    }
                }
                Action::Close(_) => {}
            }
        }
        for msgs in out.values_mut() {
            msgs.retain(|m| !matches!(m, Message::Ping { .. }));
        }
        out.retain(|_, msgs| !msgs.is_empty());
        out
    }

    fn window(r: &mut Registry, now: &mut Instant) -> BTreeMap<ConnId, Vec<Message<'static>>> {
        *now += r.config.broadcast_delay;
        r.handle_timeout(*now);
        check_invariants(r);
        sent(r)
    }

    fn is_count(m: &Message<'_>, n: u32) -> bool {
        matches!(m, Message::PeerCount { total } if *total == n)
    }

    fn removed_of(msgs: &[Message<'_>]) -> Vec<PeerId> {
        msgs.iter()
            .flat_map(|m| match m {
                Message::PeerDelta { removed, .. } => removed.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn ask_holders(r: &mut Registry, conn: usize, name: &str, now: Instant) -> Vec<PeerId> {
        let remote: SocketAddr = ([10, 0, 0, conn as u8], 4000).into();
        let name = FileName::new(name).unwrap();
        r.handle_message(ConnId(conn), remote, Message::WhoHas { name }, now);
        check_invariants(r);
        let msgs = sent(r).remove(&ConnId(conn)).unwrap_or_default();
        match &msgs[..] {
            [Message::Holders { groups, .. }] => groups
                .iter()
                .flat_map(|g| g.peers.iter().map(|p| p.id))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn at_the_limit_everyone_gets_lists_and_deltas() {
        let mut now = Instant::now();
        let mut r = with_limit(3);
        for c in 1..=3 {
            join(&mut r, c, now);
        }
        let got = sent(&mut r);
        for c in 1..=3 {
            let msgs = &got[&ConnId(c)];
            assert!(matches!(msgs[2], Message::PeerList { .. }), "{c}: {msgs:?}");
            assert!(
                !msgs.iter().any(|m| is_count(m, 3)),
                "{c}: no count at the limit"
            );
        }
        let got = window(&mut r, &mut now);
        assert!(
            got.values()
                .all(|m| matches!(&m[..], [Message::PeerDelta { .. }]))
        );
    }

    #[test]
    fn above_the_limit_a_joiner_gets_the_count_and_deltas_stop() {
        let mut now = Instant::now();
        let mut r = with_limit(2);
        join(&mut r, 1, now);
        join(&mut r, 2, now);
        window(&mut r, &mut now);
        join(&mut r, 3, now);
        let got = sent(&mut r);
        let third = &got[&ConnId(3)];
        assert!(matches!(third[1], Message::Welcome { .. }));
        assert!(is_count(&third[2], 3), "the count, not a list: {third:?}");
        assert_eq!(third.len(), 3);
        // Crossing up: everyone gets the count instead of the delta.
        let got = window(&mut r, &mut now);
        for c in 1..=3 {
            assert!(
                matches!(&got[&ConnId(c)][..], [m] if is_count(m, 3)),
                "{c}: {got:?}"
            );
        }
        // A leave nobody watched: no delta, no write to anyone; the new
        // count rides on each member's next ping.
        r.handle_disconnected(ConnId(1), now);
        join(&mut r, 4, now);
        sent(&mut r);
        join(&mut r, 5, now);
        sent(&mut r);
        assert!(
            window(&mut r, &mut now).is_empty(),
            "no broadcast of the count"
        );
        let counts = counts_over_a_probe_cycle(&mut r, &mut now);
        for c in [2, 3, 4, 5] {
            let got = counts.get(&ConnId(c));
            assert!(
                got.is_some_and(|n| !n.is_empty() && n.iter().all(|&n| n == 4)),
                "{c}: {counts:?}"
            );
        }
    }

    /// Every member sends its keepalive.
    fn keep_alive(r: &mut Registry, now: Instant) {
        for conn in r.members.conns() {
            let remote: SocketAddr = ([10, 0, 0, conn.0 as u8], 4000).into();
            r.handle_message(conn, remote, Message::Pong { nonce: 0 }, now);
        }
    }

    #[test]
    fn every_member_is_pinged_once_in_ten_heartbeats_through_joins_and_leaves() {
        let mut now = Instant::now();
        // Above the limit: pings (with the count) are all a member hears.
        let mut r = with_limit(10);
        let hb = r.config.heartbeat;
        let mut joined_at: BTreeMap<ConnId, Instant> = BTreeMap::new();
        // Connection ids are slab keys: a leaver's is handed to the next
        // joiner, so stale ping entries meet new members under the same id.
        let mut free: Vec<usize> = Vec::new();
        let mut next_conn = 1;
        let mut join_some =
            |r: &mut Registry, joined_at: &mut BTreeMap<_, _>, free: &mut Vec<usize>, k, now| {
                for _ in 0..k {
                    let conn = free.pop().unwrap_or_else(|| {
                        next_conn += 1;
                        next_conn - 1
                    });
                    join(r, conn, now);
                    joined_at.insert(ConnId(conn), now);
                }
            };
        join_some(&mut r, &mut joined_at, &mut free, 100, now);
        drain(&mut r);
        let mut peak_entries = 0;
        let start = now;
        let mut pinged: BTreeMap<ConnId, Vec<Instant>> = BTreeMap::new();
        let end = now + hb * (3 * PROBE_HEARTBEATS);
        let mut beat = 0;
        while now < end {
            now += hb / 4;
            keep_alive(&mut r, now);
            if now.duration_since(start) >= hb * beat {
                beat += 1;
                // A steady stream of joins; three members leave each
                // heartbeat (their ids go to the next joiners); at
                // heartbeat 8 a bulk leave of half the members pinged so far.
                let mut leaving: Vec<ConnId> =
                    joined_at.keys().copied().step_by(7).take(3).collect();
                if beat == 8 {
                    leaving.extend(pinged.keys().copied().step_by(2));
                }
                leaving.sort();
                leaving.dedup();
                for conn in leaving {
                    r.handle_disconnected(conn, now);
                    pinged.remove(&conn);
                    joined_at.remove(&conn);
                    free.push(conn.0);
                }
                join_some(&mut r, &mut joined_at, &mut free, 20, now);
            }
            r.handle_timeout(now);
            for action in drain(&mut r) {
                if let Action::Broadcast(conns, msgs) = action
                    && msgs.iter().any(|m| matches!(m, Message::Ping { .. }))
                {
                    for c in conns {
                        pinged.entry(c).or_default().push(now);
                    }
                }
            }
            peak_entries = peak_entries.max(r.pings.len());
        }
        check_invariants(&r);
        // Stale entries go when their bucket comes up: bounded by the
        // leaves of the last 10 heartbeats, not by the run's churn.
        assert!(
            peak_entries < 2 * r.members.len(),
            "{peak_entries} ping entries for {} members",
            r.members.len()
        );
        let most = hb * PROBE_HEARTBEATS;
        let least = hb * (PROBE_HEARTBEATS - 1) - hb / 4;
        for (conn, &joined) in &joined_at {
            let times = pinged.get(conn).cloned().unwrap_or_default();
            let heard: Vec<Instant> = std::iter::once(joined)
                .chain(times.iter().copied())
                .collect();
            for w in heard.windows(2) {
                assert!(
                    w[1] - w[0] <= most,
                    "{conn:?}: {:?} without a ping",
                    w[1] - w[0]
                );
            }
            assert!(
                end - heard[heard.len() - 1] <= most,
                "{conn:?}: not pinged lately"
            );
            for w in times.windows(2) {
                assert!(
                    w[1] - w[0] >= least,
                    "{conn:?}: pinged again after {:?}",
                    w[1] - w[0]
                );
            }
        }
        let n = joined_at.len();
        assert_eq!(r.members.len(), n, "keepalives keep every member listed");
        // Without its keepalives a member is dropped at the peer timeout,
        // pings or not.
        let quiet = *joined_at.keys().next().expect("members left");
        let start = now;
        while now < start + r.config.peer_timeout + r.config.heartbeat {
            now += r.config.heartbeat / 4;
            for conn in r.members.conns().into_iter().filter(|&c| c != quiet) {
                let remote: SocketAddr = ([10, 0, 0, conn.0 as u8], 4000).into();
                r.handle_message(conn, remote, Message::Pong { nonce: 0 }, now);
            }
            r.handle_timeout(now);
            drain(&mut r);
        }
        assert_eq!(r.members.len(), n - 1);
        assert!(r.conns.get(quiet).is_none(), "the silent member is gone");
    }

    /// Runs one probe cycle, a heartbeat at a time, every member sending
    /// its keepalive: the counts each member got (with its pings), in order.
    fn counts_over_a_probe_cycle(
        r: &mut Registry,
        now: &mut Instant,
    ) -> BTreeMap<ConnId, Vec<u32>> {
        let mut counts: BTreeMap<ConnId, Vec<u32>> = BTreeMap::new();
        for _ in 0..PROBE_HEARTBEATS {
            *now += r.config.heartbeat;
            keep_alive(r, *now);
            for (conn, msgs) in window(r, now) {
                for m in msgs {
                    if let Message::PeerCount { total } = m {
                        counts.entry(conn).or_default().push(total);
                    }
                }
            }
        }
        counts
    }

    #[test]
    fn crossing_back_down_sends_the_whole_list_then_deltas() {
        let mut now = Instant::now();
        let mut r = with_limit(2);
        for c in 1..=3 {
            join(&mut r, c, now);
        }
        window(&mut r, &mut now);
        r.handle_disconnected(ConnId(2), now);
        let got = window(&mut r, &mut now);
        for c in [1, 3] {
            let msgs = &got[&ConnId(c)];
            let [Message::PeerDelta { added, removed }] = &msgs[..] else {
                panic!("{c}: {msgs:?}");
            };
            let ids: Vec<PeerId> = added.iter().map(|p| p.id).collect();
            assert_eq!(ids, [PeerId(1), PeerId(3)], "the whole set as additions");
            assert!(removed.is_empty());
        }
        // Following again: the next change is a plain delta.
        join(&mut r, 4, now);
        r.handle_disconnected(ConnId(4), now);
        r.handle_disconnected(ConnId(3), now);
        sent(&mut r);
        let got = window(&mut r, &mut now);
        assert!(
            matches!(&got[&ConnId(1)][..], [Message::PeerDelta { added, removed }]
                if added.is_empty() && removed == &[PeerId(3)]),
            "{got:?}"
        );
    }

    #[test]
    fn above_the_limit_watchers_hear_of_departures_and_others_do_not() {
        let mut now = Instant::now();
        let mut r = with_limit(2);
        for c in 1..=5 {
            join(&mut r, c, now);
        }
        share(&mut r, 1, vec![entry("f", 1, 10)], now);
        window(&mut r, &mut now);
        let named = ask_holders(&mut r, 2, "f", now);
        assert_eq!(named, [PeerId(1)]);
        r.handle_disconnected(ConnId(1), now);
        check_invariants(&r);
        let got = window(&mut r, &mut now);
        assert!(
            matches!(&got[&ConnId(2)][..], [Message::PeerDelta { added, removed }]
                if added.is_empty() && removed == &[PeerId(1)]),
            "at once, in the next window: {got:?}"
        );
        for c in 3..=5 {
            assert!(!got.contains_key(&ConnId(c)), "{c} never asked: {got:?}");
        }
        // The count follows with the pings, to everyone.
        let counts = counts_over_a_probe_cycle(&mut r, &mut now);
        for c in 2..=5 {
            let got = counts.get(&ConnId(c));
            assert!(
                got.is_some_and(|n| !n.is_empty() && n.iter().all(|&n| n == 4)),
                "{c}: {counts:?}"
            );
        }
        // Told once: a second leave of nobody it watched says nothing.
        r.handle_disconnected(ConnId(3), now);
        let got = window(&mut r, &mut now);
        assert!(!got.contains_key(&ConnId(2)), "{got:?}");
    }

    #[test]
    fn a_watch_list_is_bounded_and_a_leaving_watcher_is_forgotten() {
        let mut now = Instant::now();
        let mut r = with_limit(2);
        let n = MAX_WATCHED + 10;
        for c in 1..=n {
            join(&mut r, c, now);
        }
        // Each peer shares its own file; peer n asks about every one.
        for c in 1..n {
            share(&mut r, c, vec![entry(&format!("f{c}"), 1, 1)], now);
        }
        window(&mut r, &mut now);
        for c in 1..n {
            ask_holders(&mut r, n, &format!("f{c}"), now);
        }
        check_invariants(&r);
        // The oldest are forgotten: peer 1's leave is not sent, peer n-1's is.
        r.handle_disconnected(ConnId(1), now);
        r.handle_disconnected(ConnId(n - 1), now);
        let got = window(&mut r, &mut now);
        assert_eq!(removed_of(&got[&ConnId(n)]), [PeerId(n as u64 - 1)]);
        // The watcher leaves: nobody is left watching anything.
        ask_holders(&mut r, n, &format!("f{}", n - 2), now);
        r.handle_disconnected(ConnId(n), now);
        check_invariants(&r);
        assert!(r.watchers.is_empty());
        r.handle_disconnected(ConnId(n - 2), now);
        window(&mut r, &mut now);
        check_invariants(&r);
    }

    #[test]
    fn below_the_limit_a_watched_departure_is_not_sent_twice() {
        let mut now = Instant::now();
        let mut r = with_limit(10);
        join(&mut r, 1, now);
        join(&mut r, 2, now);
        share(&mut r, 1, vec![entry("f", 1, 10)], now);
        window(&mut r, &mut now);
        ask_holders(&mut r, 2, "f", now);
        r.handle_disconnected(ConnId(1), now);
        let got = window(&mut r, &mut now);
        assert_eq!(got[&ConnId(2)].len(), 1, "only the delta: {got:?}");
        assert_eq!(removed_of(&got[&ConnId(2)]), [PeerId(1)]);
    }

    #[test]
    fn a_client_asking_for_peers_above_the_limit_gets_the_count_first() {
        let mut now = Instant::now();
        let mut r = with_limit(2);
        for c in 1..=3 {
            join(&mut r, c, now);
        }
        window(&mut r, &mut now);
        let remote: SocketAddr = ([10, 0, 0, 9], 4000).into();
        let q = ConnId(9);
        r.handle_connected(q, now);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        };
        r.handle_message(q, remote, hello, now);
        sent(&mut r);
        r.handle_message(q, remote, Message::ListPeers { after: PeerId(0) }, now);
        let got = sent(&mut r);
        assert!(
            matches!(&got[&q][..], [c, Message::PeerList { peers, more: false }] if is_count(c, 3) && peers.len() == 3),
            "{got:?}"
        );
        // A member gets the page alone (it has the count from broadcasts).
        r.handle_message(
            ConnId(1),
            remote,
            Message::ListPeers { after: PeerId(0) },
            now,
        );
        let got = sent(&mut r);
        assert!(matches!(&got[&ConnId(1)][..], [Message::PeerList { .. }]));
    }

    #[test]
    fn silent_members_and_handshakes_expire_within_a_tick_of_their_deadline() {
        let t0 = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        let cfg = *r.config();
        let tick = cfg.heartbeat / 4;
        join(&mut r, 1, t0);
        join(&mut r, 2, t0);
        r.handle_connected(ConnId(3), t0); // never says hello
        drain(&mut r);
        // Member 2 keeps talking; member 1 goes quiet.
        let mut now = t0;
        let end = t0 + cfg.hello_timeout + tick;
        let mut gone: BTreeMap<ConnId, Instant> = BTreeMap::new();
        while now < end {
            now += Duration::from_millis(100);
            let remote: SocketAddr = ([10, 0, 0, 2], 4000).into();
            r.handle_message(ConnId(2), remote, Message::Pong { nonce: 1 }, now);
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now);
            }
            check_invariants(&r);
            for a in drain(&mut r) {
                if let Action::Close(c) = a {
                    gone.insert(c, now);
                }
            }
        }
        let one = gone[&ConnId(1)];
        assert!(one >= t0 + cfg.peer_timeout && one <= t0 + cfg.peer_timeout + tick);
        let three = gone[&ConnId(3)];
        assert!(three >= t0 + cfg.hello_timeout && three <= t0 + cfg.hello_timeout + tick);
        assert!(
            !gone.contains_key(&ConnId(2)),
            "a live member is never swept"
        );
        // The wheel holds about one entry per timed connection, not one per frame.
        assert!(r.deadlines.len() <= 2, "{}", r.deadlines.len());
    }
}
