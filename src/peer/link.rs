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
    FileName, FileSummary, HolderGroup, Message, NetworkFile, PROTOCOL_VERSION, PeerEntry, PeerId,
    Role,
};

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
    /// The peer list changed.
    PeersChanged,
    Holders(FileName, Vec<HolderGroup>),
    Files(Vec<NetworkFile>),
    Peers(Vec<PeerEntry>),
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
    Idle { retry_at: Instant },
    Connecting { since: Instant },
    AwaitingHello { since: Instant },
    Ready { last_heard: Instant },
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
    peer_id: Option<PeerId>,
    /// The first PeerList after a Welcome is the join list, not an answer.
    awaiting_join_list: bool,
    peers: BTreeMap<PeerId, SocketAddr>,
    shared: Vec<FileSummary>,
    /// Questions sent and not yet answered, in order (answers come in order).
    in_flight: VecDeque<Query>,
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
            peer_id: None,
            awaiting_join_list: false,
            peers: BTreeMap::new(),
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

    /// The live peers as last broadcast (ourselves included).
    pub fn peers(&self) -> &BTreeMap<PeerId, SocketAddr> {
        &self.peers
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
        for query in self.in_flight.drain(..).chain(self.queued.drain(..)) {
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
        if let State::Ready { last_heard } = &mut self.state {
            *last_heard = now;
        }
        match (self.state, msg) {
            (State::AwaitingHello { .. }, Message::Hello { version, role }) => {
                if version != PROTOCOL_VERSION || role != Role::Manager {
                    let why = format!(
                        "the manager speaks protocol {version} as {role:?}; this peer needs {PROTOCOL_VERSION}"
                    );
                    self.fail(why, now);
                    return;
                }
                self.set_state(State::Ready { last_heard: now });
                self.failures = 0;
                self.give_up_at = None;
                if self.mode == LinkMode::QueryOnly {
                    self.backoff = self.config.retry_min;
                }
                while let Some(q) = self.queued.pop_front() {
                    self.send_query(q);
                }
            }
            (
                State::Ready { .. },
                Message::Welcome {
                    peer_id,
                    peer_timeout_ms,
                    ..
                },
            ) if self.mode != LinkMode::QueryOnly => {
                self.peer_id = Some(peer_id);
                self.backoff = self.config.retry_min;
                if peer_timeout_ms > 0 {
                    self.silence_timeout = Duration::from_millis(peer_timeout_ms as u64);
                }
                self.awaiting_join_list = true;
                log::info!("registered with the manager as peer {peer_id}");
                self.event(LinkEvent::Registered(peer_id));
            }
            (State::Ready { .. }, Message::PeerList { peers }) if self.awaiting_join_list => {
                self.awaiting_join_list = false;
                self.peers = peers.into_iter().map(|p| (p.id, p.addr)).collect();
                self.event(LinkEvent::PeersChanged);
            }
            (State::Ready { .. }, Message::PeerDelta { added, removed }) => {
                for id in removed {
                    self.peers.remove(&id);
                }
                for p in added {
                    self.peers.insert(p.id, p.addr);
                }
                self.event(LinkEvent::PeersChanged);
            }
            (State::Ready { .. }, Message::Ping { nonce }) => self.send(Message::Pong { nonce }),
            (State::Ready { .. }, Message::Pong { .. }) => {}
            (State::Ready { .. }, Message::PeerList { peers })
                if self.in_flight.front() == Some(&Query::ListPeers) =>
            {
                self.in_flight.pop_front();
                self.event(LinkEvent::Peers(peers));
            }
            (State::Ready { .. }, Message::FileList { files })
                if self.in_flight.front() == Some(&Query::ListFiles) =>
            {
                self.in_flight.pop_front();
                self.event(LinkEvent::Files(files));
            }
            (State::Ready { .. }, Message::Holders { name, groups })
                if self.in_flight.front() == Some(&Query::WhoHas(name.clone())) =>
            {
                self.in_flight.pop_front();
                self.event(LinkEvent::Holders(name, groups));
            }
            (_, Message::Error { code, reason }) => {
                self.fail(format!("manager refused: {reason} ({code:?})"), now);
            }
            (state, msg) => {
                let msg = crate::text::debug_within(&msg, 200);
                log::warn!("manager sent {msg} while {state}; reconnecting");
                self.actions.push_back(LinkAction::Close);
                self.handle_disconnected(now);
            }
        }
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
            State::Ready { last_heard } if self.silence_deadline(last_heard) <= now => {
                log::warn!(
                    "manager silent for {:?}; reconnecting",
                    self.silence_timeout
                );
                self.actions.push_back(LinkAction::Close);
                self.handle_disconnected(now);
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
            State::Ready { last_heard } => Some(self.silence_deadline(last_heard)),
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
        for query in self.in_flight.drain(..).chain(self.queued.drain(..)) {
            self.actions
                .push_back(LinkAction::Event(LinkEvent::QueryFailed(query)));
        }
        self.event(LinkEvent::GaveUp(Unreachable {
            attempts: attempts.max(1),
            accepted: self.accepted,
            after: now.duration_since(self.created),
        }));
    }

    /// A registered member hears a ping every heartbeat, so silence means
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
        let msg = match &query {
            Query::WhoHas(name) => Message::WhoHas { name: name.clone() },
            Query::ListFiles => Message::ListFiles,
            Query::ListPeers => Message::ListPeers,
        };
        self.send(msg);
        self.in_flight.push_back(query);
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
            Some(&LinkAction::Send(Message::ListFiles)),
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
}
