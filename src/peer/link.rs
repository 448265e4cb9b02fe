//! The peer's side of the manager protocol, as a pure state machine: the
//! hello, registration, answering pings, keeping the peer list from the
//! broadcasts, questions (who has, list files, list peers), and reconnecting
//! with exponential backoff when the manager goes away or goes quiet.
//!
//! The shell owns the socket: it connects when asked ([`LinkAction::Connect`]),
//! feeds frames in, and sends what comes out.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::wire::{
    FileName, FileSummary, HolderGroup, MIN_HEARTBEAT_MS, Message, NetworkFile, PROBE_HEARTBEATS,
    PROTOCOL_VERSION, PeerEntry, PeerId, Role,
};

/// Most entries a paged answer (or a join list) may add up to: a manager
/// that keeps saying `more` cannot make us grow without bound.
const MAX_LISTED: usize = 1 << 22;

/// Whether this link joins the network or only asks questions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    /// A sharing peer, serving chunks on `listen_port`.
    Member {
        listen_port: u16,
        advertise: Option<SocketAddr>,
    },
    /// `peer peers`, `peer files`: ask, print, exit. Never registers.
    QueryOnly,
}

/// Timers of the link.
#[derive(Debug, Clone, Copy)]
pub struct LinkConfig {
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Connect + hello must finish within this.
    pub connect_timeout: Duration,
    /// With no word from the manager for this long, it is presumed gone. The
    /// manager's `Welcome` replaces it with the manager's own peer timeout.
    pub silence_timeout: Duration,
    /// If the manager has not answered a hello this long after the link was
    /// made, give up ([`LinkEvent::GaveUp`]) instead of retrying forever: for
    /// one-shot commands, where a user waits for the answer.
    pub give_up_after: Option<Duration>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            retry_min: Duration::from_millis(250),
            retry_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            silence_timeout: Duration::from_secs(15),
            give_up_after: None,
        }
    }
}

/// A question to the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    WhoHas(FileName),
    ListFiles,
    ListPeers,
}

/// What the shell must do, or hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkAction {
    /// Open a TCP connection to the manager, then call `handle_connected`.
    Connect,
    Send(Message<'static>),
    /// Close the manager connection (a reconnect is already scheduled).
    Close,
    Event(LinkEvent),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// Registered (again) with this id.
    Registered(PeerId),
    /// These peers left the network (a delta removed them, a new join list
    /// lacks them, or, above the full-list limit, the manager said that a
    /// peer a `Holders` answer named has left). May name peers already gone.
    PeersLeft(Vec<PeerId>),
    Holders(FileName, Vec<HolderGroup>),
    Files(Vec<NetworkFile>),
    Peers(Vec<PeerEntry>),
    /// On a network above the full-list limit: the first page of the peer
    /// list, and how many peers there are in all.
    PeerPage {
        peers: Vec<PeerEntry>,
        total: u32,
    },
    /// A question could not be asked or answered: the manager is unreachable.
    QueryFailed(Query),
    /// The connection to the manager was lost, or could not be made;
    /// retrying in the given time. `first` is set for the first failure since
    /// the manager last answered, unless the link may still give up (then
    /// `GaveUp` is the one to tell): worth telling the user once, the
    /// retries are not.
    Lost {
        retry_in: Duration,
        first: bool,
    },
    /// `give_up_after` passed without an answer from the manager; the link
    /// is closed and will not retry.
    GaveUp(Unreachable),
    /// The manager refused us (version mismatch, ...).
    Refused(String),
}

/// A question sent and not yet answered in full: list answers come in
/// pages, gathered here until the last one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    WhoHas(FileName),
    Files(Vec<NetworkFile>),
    /// The pages so far, and the total a `PeerCount` before the first one
    /// gave (then only one page is asked for).
    Peers(Vec<PeerEntry>, Option<u32>),
}

impl Pending {
    fn query(self) -> Query {
        match self {
            Pending::WhoHas(name) => Query::WhoHas(name),
            Pending::Files(_) => Query::ListFiles,
            Pending::Peers(..) => Query::ListPeers,
        }
    }
}

/// How a link that gave up had fared, for a message that says what to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    /// Connection attempts made.
    pub attempts: u32,
    /// Whether any attempt got a TCP connection (so something listens there,
    /// but it did not answer like a manager).
    pub accepted: bool,
    /// How long the link tried.
    pub after: Duration,
}

impl Unreachable {
    /// The user's error message for a manager at `addr`.
    pub fn message(&self, addr: SocketAddr) -> String {
        let secs = self.after.as_secs_f64();
        if self.accepted {
            format!(
                "the manager at {addr} took the connection but did not answer within {secs:.0} s (is a shoal manager listening there? check --manager)"
            )
        } else {
            let tries = match self.attempts {
                1 => "1 try".to_string(),
                n => format!("{n} tries"),
            };
            format!(
                "cannot reach the manager at {addr}: no connection in {secs:.0} s, {tries} (is the manager running there? check --manager)"
            )
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle {
        retry_at: Instant,
    },
    Connecting {
        since: Instant,
    },
    AwaitingHello {
        since: Instant,
    },
    /// `renew_at`: when the next keepalive is due (a member, once welcomed).
    Ready {
        last_heard: Instant,
        renew_at: Option<Instant>,
    },
    Closed,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            State::Idle { .. } => "idle",
            State::Connecting { .. } => "connecting",
            State::AwaitingHello { .. } => "awaiting-hello",
            State::Ready { .. } => "ready",
            State::Closed => "closed",
        })
    }
}

pub struct ManagerLink {
    mode: LinkMode,
    config: LinkConfig,
    state: State,
    backoff: Duration,
    silence_timeout: Duration,
    /// How often a member sends its keepalive (the manager's heartbeat).
    renew_every: Duration,
    peer_id: Option<PeerId>,
    /// The PeerList pages after a Welcome are the join list, not an answer.
    awaiting_join_list: bool,
    /// The join list's pages so far.
    join_pages: Vec<PeerEntry>,
    peers: BTreeMap<PeerId, SocketAddr>,
    /// Set while the network is above the manager's full-list limit: how
    /// many peers it has. Then `peers` is not kept (it is empty).
    total: Option<u32>,
    shared: Vec<FileSummary>,
    /// Questions sent and not yet answered, in order (answers come in order;
    /// a paged answer's next request goes to the back).
    in_flight: VecDeque<Pending>,
    /// Questions asked while not connected.
    queued: VecDeque<Query>,
    actions: VecDeque<LinkAction>,
    /// Connection attempts that failed since the manager last answered a hello.
    failures: u32,
    /// When the link was made, and whether any attempt got connected: for
    /// `give_up_after`, and the message when it fires.
    created: Instant,
    accepted: bool,
    /// Set until the manager first answers, if the link may give up.
    give_up_at: Option<Instant>,
}

impl ManagerLink {
    /// A link that will connect at once.
    pub fn new(mode: LinkMode, config: LinkConfig, now: Instant) -> ManagerLink {
        ManagerLink {
            mode,
            config,
            state: State::Idle { retry_at: now },
            backoff: config.retry_min,
            silence_timeout: config.silence_timeout,
            renew_every: Duration::from_secs(2),
            peer_id: None,
            awaiting_join_list: false,
            join_pages: Vec::new(),
            peers: BTreeMap::new(),
            total: None,
            shared: Vec::new(),
            in_flight: VecDeque::new(),
            queued: VecDeque::new(),
            actions: VecDeque::new(),
            failures: 0,
            created: now,
            accepted: false,
            give_up_at: config.give_up_after.map(|d| now + d),
        }
    }

    /// Our id while registered.
    pub fn peer_id(&self) -> Option<PeerId> {
        self.peer_id.filter(|_| self.is_ready())
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready { .. })
    }

    /// The live peers as last broadcast (ourselves included); empty on a
    /// network above the full-list limit (see [`ManagerLink::peer_count`]).
    pub fn peers(&self) -> &BTreeMap<PeerId, SocketAddr> {
        &self.peers
    }

    /// How many peers the network has, while it is above the manager's
    /// full-list limit (the link then follows the count, not the list).
    pub fn peer_count(&self) -> Option<u32> {
        self.total
    }

    /// Replaces the set of files we share; sent now if registered or
    /// registering (the `Register` already went out with the old set), else
    /// on the next registration.
    pub fn set_shared(&mut self, files: Vec<FileSummary>) {
        self.shared = files;
        let registered = matches!(
            self.state,
            State::AwaitingHello { .. } | State::Ready { .. }
        );
        if registered && matches!(self.mode, LinkMode::Member { .. }) {
            self.send(Message::ShareFiles {
                files: self.shared.clone(),
            });
        }
    }

    /// Asks the manager, now or once connected. While the manager is away
    /// (the last try failed and the next is not under way) the question
    /// fails at once rather than waiting for a retry that may be seconds off.
    pub fn ask(&mut self, query: Query) {
        if self.is_ready() {
            self.send_query(query);
        } else if self.failures > 0 && matches!(self.state, State::Idle { .. } | State::Closed) {
            self.event(LinkEvent::QueryFailed(query));
        } else {
            self.queued.push_back(query);
        }
    }

    /// The shell's connect finished.
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.state, State::Connecting { .. }) {
            return;
        }
        self.set_state(State::AwaitingHello { since: now });
        self.accepted = true;
        self.send(Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        });
        if let LinkMode::Member {
            listen_port,
            advertise,
        } = self.mode
        {
            self.send(Message::Register {
                listen_port,
                advertise,
            });
            self.send(Message::ShareFiles {
                files: self.shared.clone(),
            });
        }
    }

    /// The connection failed, closed, or sent bytes that did not decode.
    pub fn handle_disconnected(&mut self, now: Instant) {
        if matches!(self.state, State::Idle { .. } | State::Closed) {
            return;
        }
        let retry_in = self.backoff;
        self.backoff = (self.backoff * 2).min(self.config.retry_max);
        self.set_state(State::Idle {
            retry_at: now + retry_in,
        });
        self.awaiting_join_list = false;
        self.join_pages.clear();
        let in_flight = self.in_flight.drain(..).map(Pending::query);
        for query in in_flight.chain(self.queued.drain(..)) {
            self.actions
                .push_back(LinkAction::Event(LinkEvent::QueryFailed(query)));
        }
        self.failures = self.failures.saturating_add(1);
        let first = self.failures == 1 && self.give_up_at.is_none();
        self.actions
            .push_back(LinkAction::Event(LinkEvent::Lost { retry_in, first }));
    }

    pub fn handle_message(&mut self, msg: Message<'_>, now: Instant) {
        log::trace!("manager link <- {msg:?}");
        if let State::Ready { last_heard, .. } = &mut self.state {
            *last_heard = now;
        }
        let member = self.mode != LinkMode::QueryOnly;
        match (self.state, msg) {
            (State::AwaitingHello { .. }, Message::Hello { version, role }) => {
                self.on_hello(version, role, now);
            }
            (
                State::Ready { .. },
                Message::Welcome {
                    peer_id,
                    heartbeat_ms,
                    peer_timeout_ms,
                },
            ) if member => self.on_welcome(peer_id, heartbeat_ms, peer_timeout_ms, now),
            (State::Ready { .. }, Message::PeerList { peers, more }) if self.awaiting_join_list => {
                self.on_join_page(peers, more, now);
            }
            (State::Ready { .. }, Message::PeerCount { total }) if member => {
                self.on_peer_count(total);
            }
            (State::Ready { .. }, Message::PeerCount { total }) if matches!(self.in_flight.front(), Some(Pending::Peers(got, None)) if got.is_empty()) => {
                if let Some(Pending::Peers(_, t)) = self.in_flight.front_mut() {
                    *t = Some(total);
                }
            }
            (State::Ready { .. }, Message::PeerDelta { added, removed }) => {
                self.on_delta(added, removed);
            }
            (State::Ready { .. }, Message::Ping { nonce }) => self.send(Message::Pong { nonce }),
            (State::Ready { .. }, Message::Pong { .. }) => {}
            (State::Ready { .. }, Message::PeerList { peers, more })
                if matches!(self.in_flight.front(), Some(Pending::Peers(..))) =>
            {
                self.on_peer_page(peers, more, now);
            }
            (State::Ready { .. }, Message::FileList { files, more })
                if matches!(self.in_flight.front(), Some(Pending::Files(_))) =>
            {
                self.on_file_page(files, more, now);
            }
            (State::Ready { .. }, Message::Holders { name, groups, .. })
                if self.in_flight.front() == Some(&Pending::WhoHas(name.clone())) =>
            {
                self.in_flight.pop_front();
                self.event(LinkEvent::Holders(name, groups));
            }
            (_, Message::Error { code, reason }) => {
                self.fail(format!("manager refused: {reason} ({code:?})"), now);
            }
            (state, msg) => {
                let what = format!("{} while {state}", crate::wire::kind_name(msg.kind()));
                self.protocol_error(&what, now);
            }
        }
    }

    fn on_hello(&mut self, version: u16, role: Role, now: Instant) {
        if version != PROTOCOL_VERSION || role != Role::Manager {
            let why = format!(
                "the manager speaks protocol {version} as {role:?}; this peer needs {PROTOCOL_VERSION}"
            );
            return self.fail(why, now);
        }
        self.set_state(State::Ready {
            last_heard: now,
            renew_at: None,
        });
        self.failures = 0;
        self.give_up_at = None;
        if self.mode == LinkMode::QueryOnly {
            self.backoff = self.config.retry_min;
        }
        while let Some(q) = self.queued.pop_front() {
            self.send_query(q);
        }
    }

    fn on_welcome(
        &mut self,
        peer_id: PeerId,
        heartbeat_ms: u32,
        peer_timeout_ms: u32,
        now: Instant,
    ) {
        self.peer_id = Some(peer_id);
        self.backoff = self.config.retry_min;
        // The lease: a keepalive each heartbeat keeps us listed; the
        // manager pings us every PROBE_HEARTBEATS heartbeats, so silence
        // longer than that plus its timeout means it is gone.
        let heartbeat = Duration::from_millis(u64::from(heartbeat_ms.max(MIN_HEARTBEAT_MS)));
        self.renew_every = heartbeat;
        if let State::Ready { renew_at, .. } = &mut self.state {
            *renew_at = Some(now + heartbeat);
        }
        // At least a heartbeat of slack, whatever the timeout says.
        let timeout = Duration::from_millis(u64::from(peer_timeout_ms)).max(heartbeat);
        self.silence_timeout = heartbeat * PROBE_HEARTBEATS + timeout;
        self.awaiting_join_list = true;
        log::info!("registered with the manager as peer {peer_id}");
        self.event(LinkEvent::Registered(peer_id));
    }

    /// A page of the join list; the last one replaces the list.
    fn on_join_page(&mut self, peers: Vec<PeerEntry>, more: bool, now: Instant) {
        self.join_pages.extend(peers);
        if self.join_pages.len() > MAX_LISTED {
            return self.protocol_error("a join list over the limit", now);
        }
        if more {
            return;
        }
        self.awaiting_join_list = false;
        self.total = None;
        let pages = std::mem::take(&mut self.join_pages);
        let old = std::mem::take(&mut self.peers);
        self.peers = pages.into_iter().map(|p| (p.id, p.addr)).collect();
        let left: Vec<PeerId> = old
            .into_keys()
            .filter(|id| !self.peers.contains_key(id))
            .collect();
        if !left.is_empty() {
            self.event(LinkEvent::PeersLeft(left));
        }
    }

    /// Above the limit: the count instead of the list (also in place of a
    /// join list).
    fn on_peer_count(&mut self, total: u32) {
        if self.total.is_none() {
            log::info!("the network has {total} peers; following the count, not the list");
        }
        self.total = Some(total);
        self.awaiting_join_list = false;
        self.join_pages.clear();
        self.peers.clear();
    }

    fn on_delta(&mut self, added: Vec<PeerEntry>, removed: Vec<PeerId>) {
        if self.total.is_some() && !added.is_empty() {
            // Back at or under the limit: the whole set, as additions.
            log::info!("the network is small again; following the list");
            self.total = None;
        }
        for id in &removed {
            self.peers.remove(id);
        }
        if self.total.is_none() {
            for p in added {
                self.peers.insert(p.id, p.addr);
            }
        }
        if !removed.is_empty() {
            self.event(LinkEvent::PeersLeft(removed));
        }
    }

    /// A page answering `ListPeers` (the question at the head of `in_flight`).
    fn on_peer_page(&mut self, peers: Vec<PeerEntry>, more: bool, now: Instant) {
        let Some(Pending::Peers(mut got, total)) = self.in_flight.pop_front() else {
            return; // the caller matched it
        };
        // A big network: one page and the count, not every page.
        if let Some(total) = total.or(self.total) {
            return self.event(LinkEvent::PeerPage { peers, total });
        }
        let last = peers.last().map(|p| p.id);
        got.extend(peers);
        if got.len() > MAX_LISTED {
            let what = "a peer list over the limit";
            return self.fail_paged(Pending::Peers(got, None), what, now);
        }
        match (more, last) {
            (false, _) => self.event(LinkEvent::Peers(got)),
            (true, Some(after)) => {
                self.send(Message::ListPeers { after });
                self.in_flight.push_back(Pending::Peers(got, None));
            }
            (true, None) => {
                let what = "an empty peer page with more";
                self.fail_paged(Pending::Peers(got, None), what, now);
            }
        }
    }

    /// A page answering `ListFiles` (the question at the head of `in_flight`).
    fn on_file_page(&mut self, files: Vec<NetworkFile>, more: bool, now: Instant) {
        let Some(Pending::Files(mut got)) = self.in_flight.pop_front() else {
            return; // the caller matched it
        };
        let after = files.last().map(NetworkFile::cursor);
        got.extend(files);
        if got.len() > MAX_LISTED {
            let what = "a file list over the limit";
            return self.fail_paged(Pending::Files(got), what, now);
        }
        match (more, after) {
            (false, _) => self.event(LinkEvent::Files(got)),
            (true, Some(after)) => {
                self.send(Message::ListFiles { after: Some(after) });
                self.in_flight.push_back(Pending::Files(got));
            }
            (true, None) => {
                let what = "an empty file page with more";
                self.fail_paged(Pending::Files(got), what, now);
            }
        }
    }

    /// A paged answer went wrong: the question goes back to the head of
    /// `in_flight`, so the disconnect fails it like every other.
    fn fail_paged(&mut self, pending: Pending, what: &str, now: Instant) {
        self.in_flight.push_front(pending);
        self.protocol_error(what, now);
    }

    fn protocol_error(&mut self, what: &str, now: Instant) {
        log::warn!("manager sent {what}; reconnecting");
        self.actions.push_back(LinkAction::Close);
        self.handle_disconnected(now);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.give_up_at.is_some_and(|t| t <= now) && self.state != State::Closed {
            return self.give_up(now);
        }
        match self.state {
            State::Idle { retry_at } if retry_at <= now => {
                self.set_state(State::Connecting { since: now });
                self.actions.push_back(LinkAction::Connect);
            }
            State::Connecting { since } | State::AwaitingHello { since }
                if since + self.config.connect_timeout <= now =>
            {
                // Debug only: the shell reports the outage once (`Lost`).
                log::debug!(
                    "manager did not answer within {:?}",
                    self.config.connect_timeout
                );
                self.actions.push_back(LinkAction::Close);
                self.handle_disconnected(now);
            }
            State::Ready { last_heard, .. } if self.silence_deadline(last_heard) <= now => {
                log::warn!(
                    "manager silent for {:?}; reconnecting",
                    self.silence_timeout
                );
                self.actions.push_back(LinkAction::Close);
                self.handle_disconnected(now);
            }
            State::Ready {
                last_heard,
                renew_at: Some(due),
            } if due <= now => {
                self.send(Message::Pong { nonce: 0 });
                self.set_state(State::Ready {
                    last_heard,
                    renew_at: Some(now + self.renew_every),
                });
            }
            _ => {}
        }
    }

    /// Says goodbye (if registered) and stops reconnecting.
    pub fn shutdown(&mut self) {
        if self.is_ready() {
            self.send(Message::Goodbye);
        }
        self.set_state(State::Closed);
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<LinkAction> {
        self.actions.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = match self.state {
            State::Idle { retry_at } => Some(retry_at),
            State::Connecting { since } | State::AwaitingHello { since } => {
                Some(since + self.config.connect_timeout)
            }
            State::Ready {
                last_heard,
                renew_at,
            } => {
                let silence = self.silence_deadline(last_heard);
                Some(renew_at.map_or(silence, |r| r.min(silence)))
            }
            State::Closed => return None,
        };
        match (t, self.give_up_at) {
            (Some(t), Some(g)) => Some(t.min(g)),
            (t, g) => t.or(g),
        }
    }

    fn give_up(&mut self, now: Instant) {
        let attempts = self.failures + u32::from(!matches!(self.state, State::Idle { .. }));
        if !matches!(self.state, State::Idle { .. }) {
            self.actions.push_back(LinkAction::Close);
        }
        self.set_state(State::Closed);
        self.give_up_at = None;
        let in_flight: Vec<Query> = self.in_flight.drain(..).map(Pending::query).collect();
        for query in in_flight.into_iter().chain(self.queued.drain(..)) {
            self.actions
                .push_back(LinkAction::Event(LinkEvent::QueryFailed(query)));
        }
        self.event(LinkEvent::GaveUp(Unreachable {
            attempts: attempts.max(1),
            accepted: self.accepted,
            after: now.duration_since(self.created),
        }));
    }

    /// A registered member hears a ping at least every 10 heartbeats, so silence
    /// past that and the peer timeout (`silence_timeout`) means
    /// trouble; a query-only client hears nothing between answers, so for it
    /// silence only counts while a question is waiting.
    fn silence_deadline(&self, last_heard: Instant) -> Instant {
        let waiting = !self.in_flight.is_empty();
        match self.mode {
            LinkMode::Member { .. } => last_heard + self.silence_timeout,
            LinkMode::QueryOnly if waiting => last_heard + self.config.connect_timeout,
            LinkMode::QueryOnly => last_heard + Duration::from_secs(24 * 3600),
        }
    }

    fn fail(&mut self, why: String, now: Instant) {
        // Not logged here: the shell reports `Refused` (once).
        self.event(LinkEvent::Refused(why));
        self.actions.push_back(LinkAction::Close);
        self.handle_disconnected(now);
    }

    fn send_query(&mut self, query: Query) {
        let (msg, pending) = match query {
            Query::WhoHas(name) => (
                Message::WhoHas { name: name.clone() },
                Pending::WhoHas(name),
            ),
            Query::ListFiles => (
                Message::ListFiles { after: None },
                Pending::Files(Vec::new()),
            ),
            Query::ListPeers => (
                Message::ListPeers { after: PeerId(0) },
                Pending::Peers(Vec::new(), None),
            ),
        };
        self.send(msg);
        self.in_flight.push_back(pending);
    }

    fn send(&mut self, msg: Message<'static>) {
        log::trace!("manager link -> {msg:?}");
        self.actions.push_back(LinkAction::Send(msg));
    }

    fn event(&mut self, event: LinkEvent) {
        self.actions.push_back(LinkAction::Event(event));
    }

    fn set_state(&mut self, state: State) {
        if std::mem::discriminant(&state) != std::mem::discriminant(&self.state) {
            log::debug!("manager link: {} => {}", self.state, state);
        }
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64) -> PeerEntry {
        PeerEntry {
            id: PeerId(id),
            addr: ([10, 0, 0, 1], id as u16).into(),
            key: Default::default(),
        }
    }

    fn sent(link: &mut ManagerLink) -> Vec<Message<'static>> {
        std::iter::from_fn(|| link.poll_action())
            .filter_map(|a| match a {
                LinkAction::Send(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    const MEMBER: LinkMode = LinkMode::Member {
        listen_port: 7000,
        advertise: None,
    };

    fn drain(link: &mut ManagerLink) -> Vec<LinkAction> {
        std::iter::from_fn(|| link.poll_action()).collect()
    }

    fn lost_flags(actions: &[LinkAction]) -> Vec<bool> {
        actions
            .iter()
            .filter_map(|a| match a {
                LinkAction::Event(LinkEvent::Lost { first, .. }) => Some(*first),
                _ => None,
            })
            .collect()
    }

    fn ready(mode: LinkMode, now: Instant) -> ManagerLink {
        let mut link = ManagerLink::new(mode, LinkConfig::default(), now);
        link.handle_timeout(now);
        link.handle_connected(now);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Manager,
        };
        link.handle_message(hello, now);
        link
    }

    #[test]
    fn a_paged_peer_answer_is_followed_to_the_end() {
        let now = Instant::now();
        let mut link = ready(LinkMode::QueryOnly, now);
        sent(&mut link);
        link.ask(Query::ListPeers);
        link.ask(Query::WhoHas(FileName::new("f").unwrap()));
        sent(&mut link);
        let page1 = Message::PeerList {
            peers: vec![entry(1), entry(2)],
            more: true,
        };
        link.handle_message(page1, now);
        assert_eq!(sent(&mut link), [Message::ListPeers { after: PeerId(2) }]);
        // The WhoHas was asked first, so its answer comes before page 2.
        let holders = Message::Holders {
            name: FileName::new("f").unwrap(),
            truncated: false,
            groups: vec![],
        };
        link.handle_message(holders, now);
        let page2 = Message::PeerList {
            peers: vec![entry(5)],
            more: false,
        };
        link.handle_message(page2, now);
        let events: Vec<LinkEvent> = std::iter::from_fn(|| link.poll_action())
            .filter_map(|a| match a {
                LinkAction::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        assert!(matches!(&events[0], LinkEvent::Holders(..)), "{events:?}");
        assert_eq!(
            events[1],
            LinkEvent::Peers(vec![entry(1), entry(2), entry(5)])
        );
        assert!(link.is_ready());
    }

    #[test]
    fn a_paged_join_list_is_applied_once_whole() {
        let now = Instant::now();
        let mode = LinkMode::Member {
            listen_port: 7000,
            advertise: None,
        };
        let mut link = ready(mode, now);
        let welcome = Message::Welcome {
            peer_id: PeerId(3),
            heartbeat_ms: 1000,
            peer_timeout_ms: 3000,
        };
        link.handle_message(welcome, now);
        let pages = [vec![entry(1), entry(2)], vec![entry(3)]];
        for (k, peers) in pages.into_iter().enumerate() {
            let more = k == 0;
            link.handle_message(Message::PeerList { peers, more }, now);
            assert_eq!(link.peers().len(), if more { 0 } else { 3 });
        }
        let delta = Message::PeerDelta {
            added: vec![entry(4)],
            removed: vec![PeerId(1)],
        };
        link.handle_message(delta, now);
        let ids: Vec<u64> = link.peers().keys().map(|p| p.0).collect();
        assert_eq!(ids, [2, 3, 4]);
    }

    /// Runs the link's timers up to `until`, a millisecond at a time.
    fn run_to(link: &mut ManagerLink, now: &mut Instant, until: Instant) -> Vec<LinkAction> {
        let mut actions = Vec::new();
        while *now < until {
            *now += Duration::from_millis(1);
            if link.poll_timeout().is_some_and(|t| t <= *now) {
                link.handle_timeout(*now);
            }
            actions.extend(drain(link));
        }
        actions
    }

    fn keepalives(actions: &[LinkAction]) -> usize {
        let keepalive = LinkAction::Send(Message::Pong { nonce: 0 });
        actions.iter().filter(|a| **a == keepalive).count()
    }

    /// A member link welcomed at `now` with these timers.
    fn welcomed(now: Instant, heartbeat_ms: u32, peer_timeout_ms: u32) -> ManagerLink {
        let mut link = ready(MEMBER, now);
        let welcome = Message::Welcome {
            peer_id: PeerId(3),
            heartbeat_ms,
            peer_timeout_ms,
        };
        link.handle_message(welcome, now);
        drain(&mut link);
        link
    }

    #[test]
    fn a_member_renews_its_lease_each_heartbeat_and_waits_ten_for_a_ping() {
        let mut now = Instant::now();
        let start = now;
        let mut link = welcomed(now, 1000, 3000);
        // A keepalive a heartbeat, none before the first is due.
        let first = run_to(&mut link, &mut now, start + Duration::from_millis(999));
        assert_eq!(keepalives(&first), 0);
        let ten = run_to(&mut link, &mut now, start + Duration::from_millis(10_500));
        assert_eq!(keepalives(&ten), 10);
        assert!(link.is_ready());
        // A ping resets the silence clock; without one for 10 heartbeats
        // plus the peer timeout, the link gives up on the manager.
        link.handle_message(Message::Ping { nonce: 9 }, now);
        assert_eq!(sent(&mut link), [Message::Pong { nonce: 9 }]);
        let heard = now;
        run_to(&mut link, &mut now, heard + Duration::from_millis(12_999));
        assert!(
            link.is_ready(),
            "gave up before 10 heartbeats + the timeout"
        );
        let after = run_to(&mut link, &mut now, heard + Duration::from_millis(13_001));
        assert!(after.contains(&LinkAction::Close), "{after:?}");
        assert!(!link.is_ready());
    }

    #[test]
    fn a_heartbeat_of_zero_is_followed_at_100_ms() {
        let mut now = Instant::now();
        let start = now;
        let mut link = welcomed(now, 0, 3000);
        let second = run_to(&mut link, &mut now, start + Duration::from_millis(1000));
        assert_eq!(keepalives(&second), 10, "not one per turn");
    }

    #[test]
    fn a_manager_that_pages_without_entries_fails_the_question_once() {
        let now = Instant::now();
        let mut link = ready(LinkMode::QueryOnly, now);
        link.ask(Query::ListFiles);
        sent(&mut link);
        let bad = Message::FileList {
            files: vec![],
            more: true,
        };
        link.handle_message(bad, now);
        let events: Vec<LinkEvent> = std::iter::from_fn(|| link.poll_action())
            .filter_map(|a| match a {
                LinkAction::Event(e) => Some(e),
                _ => None,
            })
            .collect();
        let failed = events
            .iter()
            .filter(|e| **e == LinkEvent::QueryFailed(Query::ListFiles))
            .count();
        assert_eq!(failed, 1, "{events:?}");
        assert!(!link.is_ready());
    }

    /// Every connect is refused: runs the link to each deadline until `end`.
    fn refuse_until(link: &mut ManagerLink, now: &mut Instant, end: Instant) -> Vec<LinkAction> {
        let mut all = Vec::new();
        while let Some(t) = link.poll_timeout().filter(|t| *t <= end) {
            *now = t;
            link.handle_timeout(t);
            for action in drain(link) {
                if action == LinkAction::Connect {
                    link.handle_disconnected(t);
                }
                all.push(action);
            }
            all.extend(drain(link));
        }
        all
    }

    fn hello(link: &mut ManagerLink, now: Instant) {
        link.handle_connected(now);
        link.handle_message(
            Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::Manager,
            },
            now,
        );
    }

    #[test]
    fn an_outage_is_reported_once_until_the_manager_answers_again() {
        let start = Instant::now();
        let mut now = start;
        let mut link = ManagerLink::new(MEMBER, LinkConfig::default(), now);
        let actions = refuse_until(&mut link, &mut now, start + Duration::from_secs(60));
        let flags = lost_flags(&actions);
        assert!(flags.len() > 5, "{flags:?}");
        assert_eq!(flags.iter().filter(|f| **f).count(), 1);
        assert!(flags[0]);
        // Back, then gone again: one more report.
        let t = link.poll_timeout().unwrap();
        link.handle_timeout(t);
        assert_eq!(drain(&mut link), vec![LinkAction::Connect]);
        hello(&mut link, t);
        drain(&mut link);
        link.handle_disconnected(t);
        assert_eq!(lost_flags(&drain(&mut link)), vec![true]);
    }

    #[test]
    fn a_question_while_the_manager_is_away_fails_at_once() {
        let start = Instant::now();
        let mut now = start;
        let mut link = ManagerLink::new(MEMBER, LinkConfig::default(), now);
        // Before any try, a question waits for the connection.
        link.ask(Query::ListFiles);
        assert!(drain(&mut link).is_empty());
        refuse_until(&mut link, &mut now, start + Duration::from_secs(30));
        link.ask(Query::ListFiles);
        assert_eq!(
            drain(&mut link),
            vec![LinkAction::Event(LinkEvent::QueryFailed(Query::ListFiles))]
        );
        // During a try it waits again: the try ends within connect_timeout.
        let t = link.poll_timeout().unwrap();
        link.handle_timeout(t);
        assert_eq!(drain(&mut link), vec![LinkAction::Connect]);
        link.ask(Query::ListFiles);
        assert!(drain(&mut link).is_empty());
        hello(&mut link, t);
        let sent = drain(&mut link);
        assert_eq!(
            sent.last(),
            Some(&LinkAction::Send(Message::ListFiles { after: None })),
            "{sent:?}"
        );
    }

    #[test]
    fn a_link_that_may_give_up_gives_up_on_time_and_stops() {
        let start = Instant::now();
        let mut now = start;
        let config = LinkConfig {
            give_up_after: Some(Duration::from_secs(4)),
            ..LinkConfig::default()
        };
        let mut link = ManagerLink::new(MEMBER, config, now);
        link.ask(Query::WhoHas(FileName::new("a").unwrap()));
        let actions = refuse_until(&mut link, &mut now, start + Duration::from_secs(60));
        assert_eq!(now, start + Duration::from_secs(4));
        assert!(
            lost_flags(&actions).iter().all(|f| !f),
            "GaveUp is the report"
        );
        let gave_up: Vec<&Unreachable> = actions
            .iter()
            .filter_map(|a| match a {
                LinkAction::Event(LinkEvent::GaveUp(u)) => Some(u),
                _ => None,
            })
            .collect();
        assert_eq!(gave_up.len(), 1);
        let u = gave_up[0];
        assert!(!u.accepted);
        assert_eq!(u.after, Duration::from_secs(4));
        // Tries at 0, 0.25, 0.75, 1.75 and 3.75 s.
        assert_eq!(u.attempts, 5);
        let msg = u.message("127.0.0.1:1".parse().unwrap());
        assert!(
            msg.contains("127.0.0.1:1") && msg.contains("--manager"),
            "{msg}"
        );
        assert!(link.poll_timeout().is_none());
        link.handle_timeout(now + Duration::from_secs(100));
        assert!(drain(&mut link).is_empty());
    }

    #[test]
    fn a_listener_that_never_says_hello_is_given_up_on_too() {
        let start = Instant::now();
        let config = LinkConfig {
            give_up_after: Some(Duration::from_secs(4)),
            ..LinkConfig::default()
        };
        let mut link = ManagerLink::new(LinkMode::QueryOnly, config, start);
        link.handle_timeout(start);
        assert_eq!(drain(&mut link), vec![LinkAction::Connect]);
        link.handle_connected(start);
        drain(&mut link);
        let t = link.poll_timeout().unwrap();
        assert_eq!(t, start + Duration::from_secs(4));
        link.handle_timeout(t);
        let actions = drain(&mut link);
        assert!(actions.contains(&LinkAction::Close), "{actions:?}");
        let accepted = actions.iter().any(|a| {
            matches!(a, LinkAction::Event(LinkEvent::GaveUp(u)) if u.accepted && u.attempts == 1)
        });
        assert!(accepted, "{actions:?}");
        let msg = Unreachable {
            attempts: 1,
            accepted: true,
            after: Duration::from_secs(4),
        }
        .message("127.0.0.1:9".parse().unwrap());
        assert!(msg.contains("did not answer"), "{msg}");
    }

    #[test]
    fn an_answer_in_time_cancels_giving_up() {
        let start = Instant::now();
        let config = LinkConfig {
            give_up_after: Some(Duration::from_secs(4)),
            ..LinkConfig::default()
        };
        let mut link = ManagerLink::new(MEMBER, config, start);
        link.handle_timeout(start);
        drain(&mut link);
        hello(&mut link, start + Duration::from_secs(1));
        drain(&mut link);
        link.handle_timeout(start + Duration::from_secs(5));
        let actions = drain(&mut link);
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, LinkAction::Event(LinkEvent::GaveUp(_)))),
            "{actions:?}"
        );
        assert!(link.is_ready());
    }

    fn events(link: &mut ManagerLink) -> Vec<LinkEvent> {
        std::iter::from_fn(|| link.poll_action())
            .filter_map(|a| match a {
                LinkAction::Event(e) => Some(e),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn above_the_limit_the_link_follows_the_count_and_reports_departures() {
        let now = Instant::now();
        let mut link = ready(MEMBER, now);
        let welcome = Message::Welcome {
            peer_id: PeerId(7),
            heartbeat_ms: 1000,
            peer_timeout_ms: 3000,
        };
        link.handle_message(welcome, now);
        link.handle_message(Message::PeerCount { total: 5000 }, now);
        assert_eq!(link.peer_count(), Some(5000));
        assert!(link.peers().is_empty());
        drain(&mut link);
        // A watched holder left: told at once, whatever the map holds.
        let gone = Message::PeerDelta {
            added: vec![],
            removed: vec![PeerId(3)],
        };
        link.handle_message(gone, now);
        assert_eq!(events(&mut link), [LinkEvent::PeersLeft(vec![PeerId(3)])]);
        assert_eq!(link.peer_count(), Some(5000));
        // Asked for peers: one page and the count, not every page.
        link.ask(Query::ListPeers);
        drain(&mut link);
        let page = Message::PeerList {
            peers: vec![entry(1), entry(2)],
            more: true,
        };
        link.handle_message(page, now);
        let actions = drain(&mut link);
        assert!(
            actions.contains(&LinkAction::Event(LinkEvent::PeerPage {
                peers: vec![entry(1), entry(2)],
                total: 5000
            })),
            "{actions:?}"
        );
        assert!(!actions.iter().any(|a| matches!(a, LinkAction::Send(_))));
        // Back under the limit: the whole set as additions, then deltas.
        let whole = Message::PeerDelta {
            added: vec![entry(1), entry(7)],
            removed: vec![],
        };
        link.handle_message(whole, now);
        assert_eq!(link.peer_count(), None);
        assert_eq!(link.peers().len(), 2);
    }

    #[test]
    fn a_new_join_list_reports_the_peers_it_lacks_as_left() {
        let now = Instant::now();
        let mut link = ready(MEMBER, now);
        let welcome = Message::Welcome {
            peer_id: PeerId(1),
            heartbeat_ms: 1000,
            peer_timeout_ms: 3000,
        };
        for peers in [vec![entry(1), entry(2), entry(3)], vec![entry(1), entry(3)]] {
            link.handle_message(welcome.clone(), now);
            drain(&mut link);
            link.handle_message(Message::PeerList { peers, more: false }, now);
        }
        assert_eq!(events(&mut link), [LinkEvent::PeersLeft(vec![PeerId(2)])]);
    }

    #[test]
    fn a_query_told_the_count_stops_after_one_page() {
        let now = Instant::now();
        let mut link = ready(LinkMode::QueryOnly, now);
        link.ask(Query::ListPeers);
        drain(&mut link);
        link.handle_message(Message::PeerCount { total: 19_900 }, now);
        let page = Message::PeerList {
            peers: vec![entry(1)],
            more: true,
        };
        link.handle_message(page, now);
        assert_eq!(
            events(&mut link),
            [LinkEvent::PeerPage {
                peers: vec![entry(1)],
                total: 19_900
            }]
        );
        assert_eq!(
            link.peer_count(),
            None,
            "a query does not follow the network"
        );
    }
}
