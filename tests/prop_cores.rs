//! Property tests of the pure protocol cores fed arbitrary message sequences
//! in advancing virtual time: the manager's `Registry`, the peer's
//! `ManagerLink`, one serving `ServeSession` and the download `Scheduler`.
//! Each op sequence is what a hostile or broken remote could make the shell
//! deliver (any decodable message, in any state, at any time; connections
//! opening and closing), driven the way the shells drive them (actions
//! drained after every input, timers fired when due).
//!
//! Besides "no panic", each run checks what every core promises its shell:
//! every frame it asks to send can be decoded by the other side, it never
//! talks to a connection it closed, a due timer never stays due after
//! `handle_timeout` (the event loop would spin), and each core's own
//! invariants (the scheduler's `check_invariants`, the serving queue bound).

mod strategies;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use shoal::manager::registry::{Action, Registry, RegistryConfig};
use shoal::net::ConnId;
use shoal::peer::link::{LinkAction, LinkConfig, LinkMode, ManagerLink, Query};
use shoal::peer::scheduler::{
    Action as SchedAction, Arrival, Scheduler, SchedulerConfig, SourceId,
};
use shoal::peer::serve::{Catalog, ServeAction, ServeConfig, ServeSession};
use shoal::store::Manifest;
use shoal::wire::{
    FileName, FileSummary, Hash, Message, PROTOCOL_VERSION, PeerId, Role, decode, encode,
};
use strategies::{POOL_NAMES, from_manager, message, name, pool_root, root};

/// Cases per property: small for CI; `SHOAL_PROP_CASES=100000` for a long run.
fn cases() -> u32 {
    std::env::var("SHOAL_PROP_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// The other side must be able to read every frame a core sends.
fn assert_decodable(msg: &Message<'_>) {
    let mut out = Vec::new();
    encode(msg, &mut out);
    match decode(&out) {
        Ok(Some((_, used))) if used == out.len() => {}
        other => panic!(
            "core sent a frame the other side cannot decode: {other:?}\n{}",
            shoal::text::debug_within(msg, 500)
        ),
    }
}

/// Virtual time moves by 0 ms to a minute, biased small.
fn advance() -> impl Strategy<Value = Duration> {
    prop_oneof![
        3 => (0u64..50).prop_map(Duration::from_millis),
        2 => (0u64..3_000).prop_map(Duration::from_millis),
        1 => (0u64..60_000).prop_map(Duration::from_millis),
    ]
}

/// After a due timer fired, it must not still be due: the shell would spin.
fn assert_not_due(deadline: Option<Instant>, now: Instant, core: &str) {
    if let Some(t) = deadline {
        assert!(t > now, "{core}: deadline still due after handle_timeout");
    }
}

// ---- registry ----------------------------------------------------------------

#[derive(Debug, Clone)]
enum RegOp {
    Connect(usize),
    /// Connect, hello, register and share: a well-behaved peer joining.
    Join(usize, Message<'static>),
    Disconnect(usize),
    Msg(usize, Message<'static>),
    Advance(Duration),
    EarlyTimeout,
}

/// Arbitrary messages, mixed with the ones a well-behaved peer sends, so
/// runs get past the handshake and into registered states.
fn to_manager() -> impl Strategy<Value = Message<'static>> {
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    prop_oneof![
        4 => message(),
        2 => Just(hello),
        2 => Just(Message::Register { listen_port: 7001, advertise: None }),
        1 => share_files(),
        1 => Just(Message::Pong { nonce: 1 }),
        1 => Just(Message::ListFiles { after: None }),
        1 => name().prop_map(|name| Message::WhoHas { name }),
    ]
}

fn share_files() -> impl Strategy<Value = Message<'static>> {
    let file = (name(), 0u64..1 << 40, root()).prop_map(|(name, size, root)| FileSummary {
        name,
        size,
        root,
    });
    prop::collection::vec(file, 0..4).prop_map(|files| Message::ShareFiles { files })
}

fn reg_op() -> impl Strategy<Value = RegOp> {
    let conn = 0usize..4;
    prop_oneof![
        2 => conn.clone().prop_map(RegOp::Connect),
        2 => (conn.clone(), share_files()).prop_map(|(c, m)| RegOp::Join(c, m)),
        1 => conn.clone().prop_map(RegOp::Disconnect),
        8 => (conn, to_manager()).prop_map(|(c, m)| RegOp::Msg(c, m)),
        2 => advance().prop_map(RegOp::Advance),
        1 => Just(RegOp::EarlyTimeout),
    ]
}

struct RegRun {
    reg: Registry,
    live: BTreeSet<usize>,
    now: Instant,
}

impl RegRun {
    fn drain(&mut self) {
        while let Some(action) = self.reg.poll_action() {
            match action {
                Action::Send(ConnId(c), msg) => {
                    assert!(
                        self.live.contains(&c),
                        "send to closed connection {c}: {msg:?}"
                    );
                    assert_decodable(&msg);
                }
                Action::SendShared(ConnId(c), msgs) => {
                    assert!(self.live.contains(&c), "send to closed connection {c}");
                    msgs.iter().for_each(assert_decodable);
                }
                Action::Broadcast(conns, msgs) => {
                    for ConnId(c) in conns {
                        assert!(self.live.contains(&c), "broadcast to closed connection {c}");
                    }
                    msgs.iter().for_each(assert_decodable);
                }
                Action::Close(ConnId(c)) => {
                    // The shell removes the connection at once; it never
                    // tells the registry it disconnected.
                    assert!(self.live.remove(&c), "close of unknown connection {c}");
                }
            }
        }
    }

    fn check_views(&self) {
        let peers = self.reg.peer_list();
        let ids: BTreeSet<_> = peers.iter().map(|p| p.id).collect();
        assert_eq!(ids.len(), peers.len(), "a peer listed twice: {peers:?}");
        assert!(peers.len() <= self.live.len());
        for f in self.reg.network_files() {
            assert!(f.holders >= 1, "{f:?} listed with no holder");
            let (groups, _) = self.reg.holders(&f.name);
            let g = groups
                .iter()
                .find(|g| g.root == f.root)
                .expect("listed file has holders");
            assert_eq!(g.holders, f.holders);
            assert!(
                g.peers.iter().all(|p| ids.contains(&p.id)),
                "holder not a live peer"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn registry_survives_arbitrary_traffic(ops in prop::collection::vec(reg_op(), 1..80)) {
        let config = RegistryConfig {
            heartbeat: Duration::from_millis(500),
            peer_timeout: Duration::from_millis(1500),
            broadcast_delay: Duration::from_millis(50),
            hello_timeout: Duration::from_millis(2000),
            full_list_limit: 3,
        };
        let remote: SocketAddr = "10.0.0.9:5000".parse().unwrap();
        let mut run = RegRun { reg: Registry::new(config), live: BTreeSet::new(), now: Instant::now() };
        for op in ops {
            let now = run.now;
            match op {
                RegOp::Connect(c) => {
                    if run.live.insert(c) {
                        run.reg.handle_connected(ConnId(c), now);
                    }
                }
                RegOp::Join(c, share) => {
                    if run.live.insert(c) {
                        let id = ConnId(c);
                        run.reg.handle_connected(id, now);
                        let hello = Message::Hello { version: PROTOCOL_VERSION, role: Role::ManagerClient };
                        run.reg.handle_message(id, remote, hello, now);
                        let register = Message::Register { listen_port: 7000 + c as u16, advertise: None };
                        run.reg.handle_message(id, remote, register, now);
                        run.reg.handle_message(id, remote, share, now);
                    }
                }
                RegOp::Disconnect(c) => {
                    if run.live.remove(&c) {
                        run.reg.handle_disconnected(ConnId(c), now);
                    }
                }
                RegOp::Msg(c, msg) => {
                    if run.live.contains(&c) {
                        run.reg.handle_message(ConnId(c), remote, msg, now);
                    }
                }
                RegOp::Advance(d) => {
                    run.now += d;
                    if run.reg.poll_timeout().is_some_and(|t| t <= run.now) {
                        run.reg.handle_timeout(run.now);
                        run.drain();
                        assert_not_due(run.reg.poll_timeout(), run.now, "registry");
                    }
                }
                RegOp::EarlyTimeout => run.reg.handle_timeout(now),
            }
            run.drain();
            run.check_views();
            run.reg.check_invariants();
        }
    }
}

// ---- manager link ------------------------------------------------------------

#[derive(Debug, Clone)]
enum LinkOp {
    Connected,
    /// Connected, then the manager's hello, welcome and join list.
    Handshake(Vec<shoal::wire::PeerEntry>),
    Disconnected,
    Msg(Message<'static>),
    Ask(Query),
    SetShared(Vec<FileSummary>),
    Advance(Duration),
    EarlyTimeout,
    Shutdown,
}

fn link_op() -> impl Strategy<Value = LinkOp> {
    let query = prop_oneof![
        name().prop_map(Query::WhoHas),
        Just(Query::ListFiles),
        Just(Query::ListPeers),
    ];
    let files = prop::collection::vec(
        (name(), any::<u64>(), root()).prop_map(|(name, size, root)| FileSummary {
            name,
            size,
            root,
        }),
        0..3,
    );
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Manager,
    };
    let welcome = (1u64..4, 100u32..5000, 100u32..20000).prop_map(|(id, h, t)| Message::Welcome {
        peer_id: PeerId(id),
        heartbeat_ms: h,
        peer_timeout_ms: t,
    });
    prop_oneof![
        3 => Just(LinkOp::Connected),
        1 => Just(LinkOp::Disconnected),
        2 => message().prop_map(LinkOp::Msg),
        1 => Just(LinkOp::Msg(hello)),
        2 => welcome.prop_map(LinkOp::Msg),
        3 => prop::collection::vec(strategies::peer_entry(), 0..4).prop_map(LinkOp::Handshake),
        6 => from_manager().prop_map(LinkOp::Msg),
        2 => query.prop_map(LinkOp::Ask),
        1 => files.prop_map(LinkOp::SetShared),
        6 => advance().prop_map(LinkOp::Advance),
        1 => Just(LinkOp::EarlyTimeout),
        1 => Just(LinkOp::Shutdown),
    ]
}

#[derive(Debug, PartialEq)]
enum Socket {
    None,
    Connecting,
    Open,
}

fn drain_link(link: &mut ManagerLink, socket: &mut Socket) {
    while let Some(action) = link.poll_action() {
        match action {
            LinkAction::Connect => {
                assert_eq!(*socket, Socket::None, "connect while a connection is open");
                *socket = Socket::Connecting;
            }
            LinkAction::Send(msg) => {
                assert_ne!(*socket, Socket::None, "send with no connection: {msg:?}");
                assert_decodable(&msg);
            }
            LinkAction::Close => *socket = Socket::None,
            LinkAction::Event(_) => {}
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn manager_link_survives_arbitrary_traffic(
        member in any::<bool>(),
        ops in prop::collection::vec(link_op(), 1..120),
    ) {
        let mode = if member {
            LinkMode::Member { listen_port: 7001, advertise: None }
        } else {
            LinkMode::QueryOnly
        };
        let mut now = Instant::now();
        let mut link = ManagerLink::new(mode, LinkConfig::default(), now);
        let mut socket = Socket::None;
        drain_link(&mut link, &mut socket);
        for op in ops {
            match op {
                LinkOp::Connected => {
                    if socket == Socket::Connecting {
                        socket = Socket::Open;
                        link.handle_connected(now);
                    }
                }
                LinkOp::Handshake(peers) => {
                    if socket == Socket::Connecting {
                        socket = Socket::Open;
                        link.handle_connected(now);
                        drain_link(&mut link, &mut socket);
                        let hello = Message::Hello { version: PROTOCOL_VERSION, role: Role::Manager };
                        link.handle_message(hello, now);
                        if member {
                            let welcome = Message::Welcome { peer_id: PeerId(7), heartbeat_ms: 500, peer_timeout_ms: 1500 };
                            link.handle_message(welcome, now);
                            link.handle_message(Message::PeerList { peers, more: false }, now);
                        }
                    }
                }
                LinkOp::Disconnected => {
                    if socket != Socket::None {
                        socket = Socket::None;
                        link.handle_disconnected(now);
                    }
                }
                LinkOp::Msg(msg) => {
                    if socket == Socket::Open {
                        link.handle_message(msg, now);
                    }
                }
                LinkOp::Ask(q) => link.ask(q),
                LinkOp::SetShared(files) => link.set_shared(files),
                LinkOp::Advance(d) => {
                    now += d;
                    if link.poll_timeout().is_some_and(|t| t <= now) {
                        link.handle_timeout(now);
                        drain_link(&mut link, &mut socket);
                        assert_not_due(link.poll_timeout(), now, "manager link");
                    }
                }
                LinkOp::EarlyTimeout => link.handle_timeout(now),
                LinkOp::Shutdown => link.shutdown(),
            }
            drain_link(&mut link, &mut socket);
            prop_assert!(link.peer_id().is_none() || member, "a query-only link registered");
        }
    }
}

// ---- serving session ---------------------------------------------------------

/// Three shared files named from the pool: empty, 7 chunks with a short
/// last one, exactly 5 chunks.
struct TestCatalog(Vec<(FileName, Manifest)>);

impl TestCatalog {
    fn new() -> TestCatalog {
        let chunk = 16 << 10;
        let sizes = [0u64, 6 * chunk + 100, 5 * chunk];
        let files = POOL_NAMES
            .iter()
            .zip(sizes)
            .enumerate()
            .map(|(i, (name, size))| {
                let n = size.div_ceil(chunk) as usize;
                let manifest = Manifest {
                    root: pool_root(i),
                    size,
                    chunk_size: chunk as u32,
                    hashes: vec![Hash([9; 32]); n],
                };
                (FileName::new(name).unwrap(), manifest)
            })
            .collect();
        TestCatalog(files)
    }
}

impl Catalog for TestCatalog {
    fn find_by_name(&self, name: &FileName) -> Option<&Manifest> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }
    fn find_by_root(&self, root: &Hash) -> Option<&Manifest> {
        self.0.iter().find(|(_, m)| m.root == *root).map(|(_, m)| m)
    }
}

#[derive(Debug, Clone)]
enum ServeOp {
    Msg(Message<'static>),
    /// The shell has room: it takes the next queued request.
    Pop,
    ReadFailed,
    Advance(Duration),
    EarlyTimeout,
}

/// What a downloader sends: mostly requests for the shared roots.
fn to_server() -> impl Strategy<Value = Message<'static>> {
    let shared = (0..POOL_NAMES.len()).prop_map(pool_root);
    prop_oneof![
        1 => message(),
        1 => (shared.clone(), 0u32..9).prop_map(|(root, index)| Message::GetChunk { root, index }),
        12 => (1..POOL_NAMES.len(), 0u32..5)
            .prop_map(|(i, index)| Message::GetChunk { root: pool_root(i), index }),
        2 => (shared.clone(), 0u32..9).prop_map(|(root, index)| Message::Cancel { root, index }),
        1 => (name(), prop::option::of(shared)).prop_map(|(name, root)| Message::GetManifest { name, root }),
        1 => Just(Message::Ping { nonce: 3 }),
    ]
}

fn serve_op() -> impl Strategy<Value = ServeOp> {
    prop_oneof![
        10 => to_server().prop_map(ServeOp::Msg),
        3 => Just(ServeOp::Pop),
        1 => Just(ServeOp::ReadFailed),
        2 => advance().prop_map(ServeOp::Advance),
        1 => Just(ServeOp::EarlyTimeout),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn serve_session_survives_arbitrary_traffic(
        hello_first in any::<bool>(),
        ops in prop::collection::vec(serve_op(), 1..80),
    ) {
        let catalog = TestCatalog::new();
        let config = ServeConfig {
            max_queue: 6,
            hello_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
        };
        let mut now = Instant::now();
        let mut session = ServeSession::new(config, now);
        let mut closed = false;
        let mut ops = ops;
        if hello_first {
            let hello = Message::Hello { version: PROTOCOL_VERSION, role: Role::Peer };
            ops.insert(0, ServeOp::Msg(hello));
        }
        for op in ops {
            if closed {
                break; // the shell has flushed and closed the socket
            }
            match op {
                ServeOp::Msg(msg) => session.handle_message(msg, &catalog, now),
                ServeOp::Pop => {
                    if let Some(req) = session.pop_request() {
                        let m = catalog.find_by_root(&req.root).expect("queued root is shared");
                        prop_assert!(req.index < m.chunk_count());
                        prop_assert_eq!(req.offset, u64::from(req.index) * u64::from(m.chunk_size));
                        prop_assert_eq!(req.len, m.chunk_len(req.index));
                        prop_assert!(req.len > 0 && req.offset + u64::from(req.len) <= m.size);
                    }
                }
                ServeOp::ReadFailed => session.handle_read_failed("disk \u{1b}gone".into()),
                ServeOp::Advance(d) => {
                    now += d;
                    if session.poll_timeout().is_some_and(|t| t <= now) {
                        session.handle_timeout(now);
                        assert_not_due(session.poll_timeout(), now, "serve");
                    }
                }
                ServeOp::EarlyTimeout => session.handle_timeout(now),
            }
            prop_assert!(session.queued() <= config.max_queue);
            while let Some(action) = session.poll_action() {
                match action {
                    ServeAction::Send(msg) => assert_decodable(&msg),
                    ServeAction::SendManifest(root) => {
                        prop_assert!(catalog.find_by_root(&root).is_some(), "manifest of an unshared root");
                    }
                    ServeAction::Close => closed = true,
                }
            }
        }
    }
}

// ---- download scheduler ------------------------------------------------------

#[derive(Debug, Clone)]
enum SchedOp {
    AddSource(u32),
    RemoveSource(u32),
    SourceError(u32),
    /// A chunk arrives from a source: one it was asked for (picked by the
    /// index), or any index at all; then it hashes right or wrong.
    Arrive {
        source: u32,
        pick: prop::sample::Index,
        asked: bool,
        any: u32,
        good: bool,
    },
    /// A verdict for a chunk that was never `Verify`d (a confused shell).
    StrayVerdict {
        source: u32,
        index: u32,
        good: bool,
    },
    Advance(Duration),
    EarlyTimeout,
}

fn sched_op() -> impl Strategy<Value = SchedOp> {
    let src = 0u32..5;
    prop_oneof![
        2 => src.clone().prop_map(SchedOp::AddSource),
        1 => src.clone().prop_map(SchedOp::RemoveSource),
        1 => src.clone().prop_map(SchedOp::SourceError),
        10 => (src.clone(), any::<prop::sample::Index>(), prop::bool::weighted(0.85), 0u32..40, prop::bool::weighted(0.9))
            .prop_map(|(source, pick, asked, any, good)| SchedOp::Arrive { source, pick, asked, any, good }),
        1 => (src, 0u32..40, any::<bool>()).prop_map(|(source, index, good)| SchedOp::StrayVerdict { source, index, good }),
        2 => advance().prop_map(SchedOp::Advance),
        1 => Just(SchedOp::EarlyTimeout),
    ]
}

fn chunks() -> impl Strategy<Value = (Vec<u32>, Vec<bool>)> {
    (1usize..30).prop_flat_map(|n| {
        (
            prop::collection::vec(1u32..(64 << 10), n),
            prop::collection::vec(prop::bool::weighted(0.2), 0..=n + 2),
        )
    })
}

/// What the shell knows: the requests it sent to each open source.
#[derive(Default)]
struct SchedShell {
    asked: BTreeMap<u32, BTreeSet<u32>>,
    dropped: BTreeSet<u32>,
}

impl SchedShell {
    fn drain(&mut self, s: &mut Scheduler, n: usize) {
        while let Some(action) = s.poll_action() {
            match action {
                SchedAction::Request { source, index } => {
                    assert!((index as usize) < n, "request past the end: {index}");
                    assert!(
                        !self.dropped.contains(&source.0),
                        "request to dropped {source}"
                    );
                    assert!(
                        self.asked.entry(source.0).or_default().insert(index),
                        "{source} has two live requests for chunk {index}"
                    );
                }
                SchedAction::Cancel { source, index } => {
                    assert!(
                        !self.dropped.contains(&source.0),
                        "cancel to dropped {source}"
                    );
                    // It may still arrive (and is then discarded), or never.
                    self.asked.entry(source.0).or_default().remove(&index);
                }
                SchedAction::DropSource { source, .. } => {
                    self.dropped.insert(source.0);
                    self.asked.remove(&source.0);
                }
            }
        }
        s.check_invariants().expect("scheduler invariants");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn scheduler_survives_arbitrary_arrivals((lens, have) in chunks(), ops in prop::collection::vec(sched_op(), 1..120)) {
        let n = lens.len();
        let mut now = Instant::now();
        let mut s = Scheduler::new(lens, &have, SchedulerConfig::default());
        let mut shell = SchedShell::default();
        s.check_invariants().expect("invariants at start");
        for op in ops {
            match op {
                SchedOp::AddSource(id) => {
                    if !shell.dropped.contains(&id) {
                        s.add_source(SourceId(id), now);
                    }
                }
                SchedOp::RemoveSource(id) => {
                    s.remove_source(SourceId(id), now);
                    shell.dropped.insert(id);
                    shell.asked.remove(&id);
                }
                SchedOp::SourceError(id) => {
                    s.handle_source_error(SourceId(id), now);
                    shell.dropped.insert(id);
                    shell.asked.remove(&id);
                }
                SchedOp::Arrive { source, pick, asked, any, good } => {
                    let outstanding: Vec<u32> =
                        shell.asked.get(&source).map(|a| a.iter().copied().collect()).unwrap_or_default();
                    let index = if asked && !outstanding.is_empty() {
                        outstanding[pick.index(outstanding.len())]
                    } else {
                        any
                    };
                    if let Some(a) = shell.asked.get_mut(&source) {
                        a.remove(&index);
                    }
                    if s.handle_chunk_arrived(SourceId(source), index, now) == Arrival::Verify {
                        if good {
                            s.handle_chunk_verified(SourceId(source), index, now);
                        } else {
                            s.handle_chunk_corrupt(SourceId(source), index, now);
                        }
                    }
                }
                SchedOp::StrayVerdict { source, index, good } => {
                    if good {
                        s.handle_chunk_verified(SourceId(source), index, now);
                    } else {
                        s.handle_chunk_corrupt(SourceId(source), index, now);
                    }
                }
                SchedOp::Advance(d) => {
                    now += d;
                    if s.poll_timeout().is_some_and(|t| t <= now) {
                        s.handle_timeout(now);
                        shell.drain(&mut s, n);
                        assert_not_due(s.poll_timeout(), now, "scheduler");
                    }
                }
                SchedOp::EarlyTimeout => s.handle_timeout(now),
            }
            shell.drain(&mut s, n);
            let p = s.progress();
            prop_assert!(p.chunks_done <= n as u32);
            prop_assert_eq!(s.is_complete(), p.chunks_done == n as u32);
        }
    }
}

/// Found by `manager_link_survives_arbitrary_traffic`: a `Welcome` sent to a
/// query-only client (`peer files`) made it believe it had registered and
/// take the manager's peer timeout as its own. Now it is unexpected there.
#[test]
fn a_query_only_link_refuses_an_unsolicited_welcome() {
    let now = Instant::now();
    let mut link = ManagerLink::new(LinkMode::QueryOnly, LinkConfig::default(), now);
    let mut socket = Socket::None;
    link.handle_timeout(now);
    drain_link(&mut link, &mut socket);
    assert_eq!(socket, Socket::Connecting);
    link.handle_connected(now);
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::Manager,
    };
    link.handle_message(hello, now);
    drain_link(&mut link, &mut socket);
    assert!(link.is_ready());
    let welcome = Message::Welcome {
        peer_id: PeerId(9),
        heartbeat_ms: 1,
        peer_timeout_ms: 1,
    };
    link.handle_message(welcome, now);
    assert_eq!(link.peer_id(), None);
    let mut closed = false;
    while let Some(a) = link.poll_action() {
        closed |= a == LinkAction::Close;
    }
    assert!(closed, "an unexpected welcome closes the connection");
}

/// A huge frame that is wrong for the state is described in a few hundred
/// bytes, not formatted whole into the refusal (and the warning logged with
/// it): 8 MiB of names would otherwise become a 40 MB log line.
#[test]
fn a_huge_unexpected_message_gets_a_short_refusal() {
    let now = Instant::now();
    let mut reg = Registry::new(RegistryConfig::default());
    let conn = ConnId(1);
    reg.handle_connected(conn, now);
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    let remote: SocketAddr = "10.0.0.1:1".parse().unwrap();
    reg.handle_message(conn, remote, hello, now);
    let name = FileName::new(&"n".repeat(200)).unwrap();
    let file = FileSummary {
        name,
        size: 1,
        root: Hash([0; 32]),
    };
    // ShareFiles before Register: wrong for the state.
    let files = vec![file; 40_000];
    reg.handle_message(conn, remote, Message::ShareFiles { files }, now);
    let mut reason = None;
    while let Some(a) = reg.poll_action() {
        if let Action::Send(_, Message::Error { reason: r, .. }) = a {
            reason = Some(r);
        }
    }
    let reason = reason.expect("refused");
    assert!(reason.len() < 400, "{} bytes", reason.len());
    assert!(reason.starts_with("unexpected share-files"), "{reason}");
}

/// Every answer the registry sends must fit in one frame, or the client
/// cannot decode it: a member sharing as many files as a registration may,
/// each with the longest name, still gets a `FileList` every client decodes
/// (it comes in pages).
#[test]
fn registry_answers_fit_in_one_frame() {
    let now = Instant::now();
    let mut reg = Registry::new(RegistryConfig::default());
    let remote: SocketAddr = "10.0.0.1:1".parse().unwrap();
    let member = ConnId(1);
    reg.handle_connected(member, now);
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    reg.handle_message(member, remote, hello.clone(), now);
    let register = Message::Register {
        listen_port: 7001,
        advertise: None,
    };
    reg.handle_message(member, remote, register, now);
    // The most files one registration may share, each with a 255-byte name.
    let files: Vec<FileSummary> = (0..shoal::wire::MAX_SHARED_FILES as u32)
        .map(|i| FileSummary {
            name: FileName::new(&format!("{i:0>255}")).unwrap(),
            size: 1,
            root: Hash([1; 32]),
        })
        .collect();
    let share = Message::ShareFiles { files };
    let mut bytes = Vec::new();
    encode(&share, &mut bytes);
    assert!(
        decode(&bytes).unwrap().is_some(),
        "the ShareFiles itself is a valid frame"
    );
    reg.handle_message(member, remote, share, now);
    let client = ConnId(2);
    reg.handle_connected(client, now);
    reg.handle_message(client, remote, hello, now);
    reg.handle_message(client, remote, Message::ListFiles { after: None }, now);
    let mut listed = 0;
    while let Some(action) = reg.poll_action() {
        if let Action::Send(_, msg) = action {
            assert_decodable(&msg);
            if let Message::FileList { files, .. } = &msg {
                listed += files.len();
            }
        }
    }
    assert!(listed > 0, "the client got a page of the files");
}
