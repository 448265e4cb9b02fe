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
use std::time::{Duration, Instant};

use crate::net::ConnId;
use crate::wire::{
    Accept, ErrorCode, FileName, FileSummary, HolderGroup, Message, NetworkFile, PROTOCOL_VERSION,
    PeerEntry, PeerId, PeerKey, Role, accept,
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
    addr: SocketAddr,
    /// What its handshake proved ([`PeerKey::UNKNOWN`] on an open network).
    key: PeerKey,
    last_heard: Instant,
    files: Vec<FileSummary>,
}

pub struct Registry {
    config: RegistryConfig,
    conns: HashMap<ConnId, ConnState>,
    /// Members by id; the value is their connection.
    members: BTreeMap<PeerId, ConnId>,
    next_peer_id: u64,
    next_nonce: u64,
    /// The member set as last broadcast; deltas are computed against it.
    broadcast_view: BTreeMap<PeerId, SocketAddr>,
    /// Members that joined and left since the last broadcast. The view never
    /// held them, but the join lists sent meanwhile did, so the next delta
    /// must remove them too.
    unannounced_leaves: Vec<PeerId>,
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
            next_peer_id: 1,
            next_nonce: 1,
            broadcast_view: BTreeMap::new(),
            unannounced_leaves: Vec::new(),
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
            (ConnState::Member(m), Message::ShareFiles { files }) => {
                log::debug!("peer {} shares {} files", m.id, files.len());
                m.files = files;
            }
            (ConnState::Member(_), Message::Pong { .. }) => {}
            (ConnState::Member(_), Message::Goodbye) => {
                self.drop_conn(conn, LeaveReason::Goodbye, now);
                self.actions.push_back(Action::Close(conn));
            }
            (ConnState::Client, Message::Goodbye) => {
                self.drop_conn(conn, LeaveReason::Goodbye, now);
                self.actions.push_back(Action::Close(conn));
            }
            (ConnState::Client | ConnState::Member(_), Message::Ping { nonce }) => {
                self.send(conn, Message::Pong { nonce });
            }
            (ConnState::Client | ConnState::Member(_), Message::ListPeers) => {
                let peers = self.peer_list();
                self.send(conn, Message::PeerList { peers });
            }
            (ConnState::Client | ConnState::Member(_), Message::ListFiles) => {
                let files = self.network_files();
                self.send(conn, Message::FileList { files });
            }
            (ConnState::Client | ConnState::Member(_), Message::WhoHas { name }) => {
                let groups = self.holders(&name);
                self.send(conn, Message::Holders { name, groups });
            }
            (state, msg) => {
                let reason = format!("unexpected {msg:?} while {}", state_name(state));
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

    /// The live peers, ordered by id.
    pub fn peer_list(&self) -> Vec<PeerEntry> {
        self.members
            .values()
            .filter_map(|c| match self.conns.get(c) {
                Some(ConnState::Member(m)) => Some(PeerEntry {
                    id: m.id,
                    addr: m.addr,
                    key: m.key,
                }),
                _ => None,
            })
            .collect()
    }

    /// Every (name, version) shared on the network with its holder count.
    pub fn network_files(&self) -> Vec<NetworkFile> {
        let mut by_version: BTreeMap<(&FileName, crate::wire::Hash), (u64, u32)> = BTreeMap::new();
        for m in self.live_members() {
            for f in &m.files {
                by_version.entry((&f.name, f.root)).or_insert((f.size, 0)).1 += 1;
            }
        }
        by_version
            .into_iter()
            .map(|((name, root), (size, holders))| NetworkFile {
                name: name.clone(),
                size,
                root,
                holders,
            })
            .collect()
    }

    /// The holders of `name`, one group per version, most-held version first.
    pub fn holders(&self, name: &FileName) -> Vec<HolderGroup> {
        let mut groups: Vec<HolderGroup> = Vec::new();
        for m in self.live_members() {
            for f in m.files.iter().filter(|f| &f.name == name) {
                let entry = PeerEntry {
                    id: m.id,
                    addr: m.addr,
                    key: m.key,
                };
                match groups.iter_mut().find(|g| g.root == f.root) {
                    Some(g) => g.peers.push(entry),
                    None => groups.push(HolderGroup {
                        root: f.root,
                        size: f.size,
                        peers: vec![entry],
                    }),
                }
            }
        }
        groups.sort_by(|a, b| b.peers.len().cmp(&a.peers.len()).then(a.root.cmp(&b.root)));
        groups
    }

    fn live_members(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter_map(|c| match self.conns.get(c) {
                Some(ConnState::Member(m)) => Some(m),
                _ => None,
            })
    }

    fn join(&mut self, conn: ConnId, addr: SocketAddr, now: Instant) {
        let id = PeerId(self.next_peer_id);
        self.next_peer_id += 1;
        log::info!("peer {id} joined, serving at {addr}");
        self.conns.insert(
            conn,
            ConnState::Member(Member {
                id,
                addr,
                key: self.keys.get(&conn).copied().unwrap_or_default(),
                last_heard: now,
                files: Vec::new(),
            }),
        );
        self.members.insert(id, conn);
        self.send(
            conn,
            Message::Welcome {
                peer_id: id,
                heartbeat_ms: self.config.heartbeat.as_millis() as u32,
                peer_timeout_ms: self.config.peer_timeout.as_millis() as u32,
            },
        );
        let peers = self.peer_list();
        self.send(conn, Message::PeerList { peers });
        self.arm_sweep(now + self.config.peer_timeout);
        if self.next_ping.is_none() {
            self.next_ping = Some(now + self.config.heartbeat);
        }
        self.membership_changed(now);
    }

    fn drop_conn(&mut self, conn: ConnId, reason: LeaveReason, now: Instant) {
        self.keys.remove(&conn);
        if let Some(ConnState::Member(m)) = self.conns.remove(&conn) {
            log::info!("peer {} left ({reason})", m.id);
            self.members.remove(&m.id);
            if !self.broadcast_view.contains_key(&m.id) {
                self.unannounced_leaves.push(m.id);
            }
            self.membership_changed(now);
        }
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

    fn broadcast(&mut self) {
        self.broadcast_due = None;
        let current = self.peer_list();
        let now_view: BTreeMap<PeerId, SocketAddr> =
            current.iter().map(|p| (p.id, p.addr)).collect();
        let added: Vec<PeerEntry> = current
            .into_iter()
            .filter(|p| !self.broadcast_view.contains_key(&p.id))
            .collect();
        let mut removed: Vec<PeerId> = self
            .broadcast_view
            .keys()
            .filter(|id| !now_view.contains_key(id))
            .copied()
            .collect();
        removed.append(&mut self.unannounced_leaves);
        self.broadcast_view = now_view;
        if added.is_empty() && removed.is_empty() {
            return;
        }
        log::debug!(
            "broadcast: +{} -{} to {} peers",
            added.len(),
            removed.len(),
            self.members.len()
        );
        let conns: Vec<ConnId> = self.members.values().copied().collect();
        for conn in conns {
            self.send(
                conn,
                Message::PeerDelta {
                    added: added.clone(),
                    removed: removed.clone(),
                },
            );
        }
    }

    fn ping_members(&mut self, now: Instant) {
        let nonce = self.next_nonce;
        self.next_nonce += 1;
        let conns: Vec<ConnId> = self.members.values().copied().collect();
        for conn in conns {
            self.send(conn, Message::Ping { nonce });
        }
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

    /// Every id in `members` points at a connection in state `Member` with
    /// that id, and every `Member` connection is in `members`.
    fn check_invariants(r: &Registry) {
        for (id, conn) in &r.members {
            assert!(matches!(r.conns.get(conn), Some(ConnState::Member(m)) if m.id == *id));
        }
        let member_conns = r
            .conns
            .values()
            .filter(|s| matches!(s, ConnState::Member(_)));
        assert_eq!(member_conns.count(), r.members.len());
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
            Action::Send(ConnId(2), Message::PeerDelta { added, removed }) => {
                Some((added, removed))
            }
            _ => None,
        });
        let (added, removed) = delta.expect("a delta to the member still there");
        assert_eq!(added.iter().map(|p| p.id).collect::<Vec<_>>(), [PeerId(2)]);
        assert_eq!(removed, [PeerId(1)], "conn 2's join list named peer 1");
    }
}
