//! The manager's protocol core: who is connected, who is a live peer, what
//! each shares. Pure: it takes decoded messages and `now`, and hands back
//! frames to send and connections to close. The mio shell in `server.rs` only
//! moves bytes and fires the deadline from [`Registry::poll_timeout`].
//!
//! Liveness: the registry pings every member each heartbeat; a member not
//! heard from (any frame counts) for the peer timeout is swept. Broadcasts:
//! a change to the member set arms a short coalescing timer; when it fires,
//! every member gets one `PeerDelta` computed as the difference between what
//! was last broadcast and the set now, so a burst of joins and leaves costs
//! one small frame per member, not a full list per change per member.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::ops::Bound;
use std::rc::Rc;
use std::time::{Duration, Instant};

use super::index::FileIndex;
use crate::net::ConnId;
use crate::wire::{
    self, Accept, ErrorCode, FILE_PAGE, FileCursor, FileName, FileSummary, Hash, HolderGroup,
    MAX_FILE_SIZE, MAX_SHARED_FILES, Message, NetworkFile, PEER_PAGE, PROTOCOL_VERSION, PeerEntry,
    PeerId, PeerKey, Role, accept,
};

/// Timers of the membership protocol.
#[derive(Debug, Clone, Copy)]
pub struct RegistryConfig {
    /// How often each member is pinged.
    pub heartbeat: Duration,
    /// A member silent this long is dropped.
    pub peer_timeout: Duration,
    /// How long changes are gathered before one delta goes out.
    pub broadcast_delay: Duration,
    /// Most connections waiting for their hello; also bounds how long one may wait.
    pub hello_timeout: Duration,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            heartbeat: Duration::from_secs(2),
            peer_timeout: Duration::from_secs(6),
            broadcast_delay: Duration::from_millis(50),
            hello_timeout: Duration::from_secs(10),
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
    /// Connected; its hello not yet seen.
    AwaitingHello { since: Instant },
    /// Said hello; may ask questions or register.
    Client,
    /// A registered, live peer.
    Member(Member),
}

#[derive(Debug)]
struct Member {
    id: PeerId,
    last_heard: Instant,
    /// What it shares: sorted by name, one version per name, no duplicates.
    files: Vec<FileSummary>,
}

/// A live member as the lists show it.
#[derive(Debug, Clone, Copy)]
struct Live {
    conn: ConnId,
    addr: SocketAddr,
    /// What its handshake proved ([`PeerKey::UNKNOWN`] on an open network).
    key: PeerKey,
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

pub struct Registry {
    config: RegistryConfig,
    conns: HashMap<ConnId, ConnState>,
    /// Live members by id: the source of every peer list and page.
    members: BTreeMap<PeerId, Live>,
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
    /// Turns every `WhoHas` to a new starting holder.
    rotate: u64,
    broadcast_due: Option<Instant>,
    next_ping: Option<Instant>,
    /// Earliest moment any member or handshake can expire (may be early, never late).
    next_sweep: Option<Instant>,
    actions: VecDeque<Action>,
    /// Static keys proved by each connection's handshake (sealed networks).
    keys: HashMap<ConnId, PeerKey>,
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Registry {
        Registry {
            config,
            conns: HashMap::new(),
            members: BTreeMap::new(),
            index: FileIndex::default(),
            next_peer_id: 1,
            next_nonce: 1,
            announced_upto: PeerId(0),
            pending_removed: Vec::new(),
            join_list: None,
            rotate: 0,
            broadcast_due: None,
            next_ping: None,
            next_sweep: None,
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
        self.conns.get(&conn)?;
        self.accepts(conn).limit(kind)
    }

    /// The shell read the header of a frame that [`Registry::max_frame_body`]
    /// refuses: the connection is told why and closed.
    pub fn handle_refused_frame(&mut self, conn: ConnId, kind: u8, body_len: usize, now: Instant) {
        let Some(state) = self.conns.get(&conn) else {
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
        self.conns
            .insert(conn, ConnState::AwaitingHello { since: now });
        self.send(
            conn,
            Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Manager,
            },
        );
        self.arm_sweep(now + self.config.hello_timeout);
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
        let Some(state) = self.conns.get_mut(&conn) else {
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
            (ConnState::Member(_), Message::Pong { .. }) => {}
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
            (ConnState::Client | ConnState::Member(_), Message::ListPeers { after }) => {
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
        match self.conns.get(&conn) {
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
        if self.next_sweep.is_some_and(|t| t <= now) {
            self.sweep(now);
        }
        if self.next_ping.is_some_and(|t| t <= now) {
            self.ping_members(now);
        }
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
        [self.next_sweep, self.next_ping, self.broadcast_due]
            .into_iter()
            .flatten()
            .min()
    }

    /// Every live peer, ordered by id (the operator's `peers` command).
    pub fn peer_list(&self) -> Vec<PeerEntry> {
        self.members.iter().map(|(&id, l)| l.entry(id)).collect()
    }

    /// Live peers with ids above `after`, at most `limit`, and whether more
    /// follow. O(page · log n).
    pub fn peer_page(&self, after: PeerId, limit: usize) -> (Vec<PeerEntry>, bool) {
        let mut peers: Vec<PeerEntry> = self
            .members
            .range((Bound::Excluded(after), Bound::Unbounded))
            .map(|(&id, l)| l.entry(id))
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
            .holders(name, start, |id| self.members.get(&id).map(|l| l.entry(id)))
    }

    /// Checks the invariants docs/state/membership.md states (for tests):
    /// `members` and the `Member` connections agree, and the index holds
    /// exactly the members' shared files.
    pub fn check_invariants(&self) {
        let mut shared = 0;
        for (id, live) in &self.members {
            match self.conns.get(&live.conn) {
                Some(ConnState::Member(m)) if m.id == *id => shared += m.files.len(),
                other => panic!("member {id} points at {other:?}"),
            }
        }
        let member_conns = self
            .conns
            .values()
            .filter(|s| matches!(s, ConnState::Member(_)))
            .count();
        assert_eq!(member_conns, self.members.len());
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
        self.conns.insert(
            conn,
            ConnState::Member(Member {
                id,
                last_heard: now,
                files: Vec::new(),
            }),
        );
        let key = self.keys.get(&conn).copied().unwrap_or_default();
        self.members.insert(id, Live { conn, addr, key });
        self.send(
            conn,
            Message::Welcome {
                peer_id: id,
                heartbeat_ms: self.config.heartbeat.as_millis() as u32,
                peer_timeout_ms: self.config.peer_timeout.as_millis() as u32,
            },
        );
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
        self.arm_sweep(now + self.config.peer_timeout);
        if self.next_ping.is_none() {
            self.next_ping = Some(now + self.config.heartbeat);
        }
        self.membership_changed(now);
    }

    /// Replaces a member's shared set, after checking it against the limits:
    /// O(its size), whatever the rest of the network holds. Exact duplicate
    /// entries count once; anything else suspicious refuses the whole frame.
    fn share(&mut self, conn: ConnId, mut files: Vec<FileSummary>, now: Instant) {
        if let Err(reason) = check_share(&mut files) {
            return self.refuse(conn, ErrorCode::Limit, reason, now);
        }
        let Some(ConnState::Member(m)) = self.conns.get_mut(&conn) else {
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
        m.files = files;
    }

    fn drop_conn(&mut self, conn: ConnId, reason: LeaveReason, now: Instant) {
        self.keys.remove(&conn);
        if let Some(ConnState::Member(m)) = self.conns.remove(&conn) {
            log::info!("peer {} left ({reason})", m.id);
            self.members.remove(&m.id);
            for f in &m.files {
                self.index.remove(m.id, &f.name, f.root, f.size);
            }
            let named = self.join_list.as_ref().map_or(PeerId(0), |(_, upto)| *upto);
            // Never broadcast and in no join list: nobody knows it.
            if m.id <= self.announced_upto.max(named) {
                self.pending_removed.push(m.id);
            }
            self.membership_changed(now);
        }
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
        self.conns.remove(&conn);
    }

    fn membership_changed(&mut self, now: Instant) {
        if self.broadcast_due.is_none() {
            self.broadcast_due = Some(now + self.config.broadcast_delay);
        }
        if self.members.is_empty() {
            self.next_ping = None;
        }
    }

    /// One delta per member for everything since the last broadcast, cut in
    /// frames of at most [`PEER_PAGE`] ids per list. O(changes · members),
    /// never a walk over the member set to find the changes.
    fn broadcast(&mut self) {
        self.broadcast_due = None;
        let after = (Bound::Excluded(self.announced_upto), Bound::Unbounded);
        let added = self.members.range(after).count();
        let removed = std::mem::take(&mut self.pending_removed);
        if added == 0 && removed.is_empty() {
            return;
        }
        self.join_list = None;
        log::debug!(
            "broadcast: +{added} -{} to {} peers",
            removed.len(),
            self.members.len()
        );
        // Pages straight from the member map: no list of all additions.
        let mut joined = self.members.range(after).map(|(&id, l)| l.entry(id));
        let frames = added.max(removed.len()).div_ceil(PEER_PAGE);
        let deltas: Rc<[Message<'static>]> = (0..frames)
            .map(|i| Message::PeerDelta {
                added: joined.by_ref().take(PEER_PAGE).collect(),
                removed: page_of(&removed, i).to_vec(),
            })
            .collect();
        self.announced_upto = PeerId(self.next_peer_id - 1);
        let conns = self.members.values().map(|l| l.conn).collect();
        self.actions.push_back(Action::Broadcast(conns, deltas));
    }

    fn ping_members(&mut self, now: Instant) {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let conns = self.members.values().map(|l| l.conn).collect();
        let ping: Rc<[Message<'static>]> = Rc::new([Message::Ping { nonce }]);
        self.actions.push_back(Action::Broadcast(conns, ping));
        self.next_ping = (!self.members.is_empty()).then(|| now + self.config.heartbeat);
    }

    fn sweep(&mut self, now: Instant) {
        let peer_timeout = self.config.peer_timeout;
        let hello_timeout = self.config.hello_timeout;
        let expired: Vec<(ConnId, LeaveReason)> = self
            .conns
            .iter()
            .filter_map(|(&conn, state)| match state {
                ConnState::AwaitingHello { since } if *since + hello_timeout <= now => {
                    Some((conn, LeaveReason::ProtocolError))
                }
                ConnState::Member(m) if m.last_heard + peer_timeout <= now => {
                    Some((conn, LeaveReason::TimedOut))
                }
                _ => None,
            })
            .collect();
        for (conn, reason) in expired {
            if reason == LeaveReason::TimedOut {
                log::warn!("peer on connection {} silent for {peer_timeout:?}", conn.0);
            }
            self.drop_conn(conn, reason, now);
            self.conns.remove(&conn);
            self.actions.push_back(Action::Close(conn));
        }
        self.next_sweep = self
            .conns
            .values()
            .filter_map(|state| match state {
                ConnState::AwaitingHello { since } => Some(*since + hello_timeout),
                ConnState::Member(m) => Some(m.last_heard + peer_timeout),
                ConnState::Client => None,
            })
            .min();
    }

    fn arm_sweep(&mut self, at: Instant) {
        self.next_sweep = Some(self.next_sweep.map_or(at, |t| t.min(at)));
    }

    fn send(&mut self, conn: ConnId, msg: Message<'static>) {
        self.actions.push_back(Action::Send(conn, msg));
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
}
