//! The peer's event loop: one mio `Poll` over the serving listener, the
//! manager connection, every peer connection (serving and downloading, in one
//! slab), stdin and the shutdown signals. Protocol decisions are made by the
//! pure cores ([`ManagerLink`], [`ServeSession`], [`Download`]); this module
//! moves bytes between them, the sockets and the disk: the loop, timers and
//! stdin here, the manager connection in `manager_conn.rs`, serving in
//! `serving.rs`, downloads in `downloads.rs`.

mod downloads;
mod manager_conn;
mod partials;
mod serving;
mod sink;
mod stats;
mod swarm;

pub use sink::{JsonSink, Report, Sink, StdoutSink};

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::commands::{self, Command};
use super::download::{DownloadError, GetRequest};
use super::fair::{FairQueue, QUANTUM, Rotation, RotationConfig};
use super::files::OpenFiles;
use super::link::{LinkConfig, LinkMode, ManagerLink, Query};
use super::ratelimit::TokenBucket;
use super::scheduler::SourceId;
use super::serve::ServeSession;
use crate::metrics::http::MetricsServer;
use crate::net::{self, Conn, ConnId, StdinLines, allow};
use crate::store::SharedFolder;
use crate::wire;

const LISTENER: Token = Token(usize::MAX - 1);
const MANAGER: Token = Token(usize::MAX - 2);
const STDIN: Token = Token(usize::MAX - 3);
const SIGNALS: Token = Token(usize::MAX - 4);

/// Bytes of new files hashed per loop turn (a few milliseconds): the loop
/// keeps answering pings and serving while a big new file is hashed.
const HASH_SLICE: usize = 4 << 20;

/// Queue more chunks on a serving connection only while less than this is
/// waiting in user space: disk reads follow the socket's pace, and a chunk
/// is chosen (fresh first, then in turn) as late as possible. 16 downloaders
/// of a 100 mbit seeder: 512 KiB 7.16 s, 128 KiB 6.94 s (medians of 3);
/// one seeder to one downloader on loopback: 827 and 805 MB/s, the same.
const SEND_LOW_WATER: usize = 128 << 10;

/// A one-shot `get` fails this soon if the manager never answers (down,
/// unreachable, or not a manager), rather than retrying while a user waits.
const GET_MANAGER_LIMIT: Duration = Duration::from_secs(4);

/// How the peer is run.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub dir: PathBuf,
    pub manager: SocketAddr,
    pub listen: SocketAddr,
    pub advertise: Option<SocketAddr>,
    /// Bytes per second for all uploads together.
    pub upload_limit: Option<u64>,
    /// Most sources one download uses at once.
    pub max_peers: usize,
    /// Most inbound serving connections.
    pub max_conns: usize,
    /// At the cap, with peers turned away, a connection served this long
    /// makes room (docs/state/serving.md, rotation).
    pub rotate_after: Duration,
    /// How often the shared folder is re-read for new or changed files.
    pub rescan_interval: Duration,
    /// Show a progress bar (stderr is a terminal).
    pub progress_bar: bool,
    /// The network key and this peer's identity: every connection, to
    /// the manager and between peers, is sealed. `None` on an open network.
    pub keys: Option<crate::net::noise::Keys>,
    /// The manager's static key, pinned with `--manager-key`; without it
    /// the first key met is pinned in `DIR/.shoal/managers`.
    pub manager_key: Option<crate::wire::PeerKey>,
    /// `--allow`: serve only these keys (a sealed network).
    pub allow: Option<crate::net::allow::AllowList>,
}

/// What this run of the peer is for.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Share the folder and take commands on stdin until told to quit.
    Interactive,
    /// Download these files (at once), then exit (or keep serving with `seed`).
    Get {
        requests: Vec<GetRequest>,
        seed: bool,
    },
}

/// Why a run ended badly; the binary maps each to a message and exit code.
#[derive(Debug)]
pub enum NodeError {
    /// The folder, the port or the event loop could not be set up.
    Setup(String),
    /// The event loop itself failed.
    Loop(std::io::Error),
    /// The manager could not be reached, or refused us.
    Manager(String),
    /// The download of a one-shot `get` failed.
    Download(DownloadError),
    /// Some of a one-shot `get`'s several downloads failed (each was logged).
    Downloads { failed: usize, total: usize },
    /// Stopped by a signal before the downloads finished.
    Interrupted { names: Vec<String> },
}

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodeError::Setup(why) => f.write_str(why),
            NodeError::Loop(e) => write!(f, "event loop failed: {e}"),
            NodeError::Manager(why) => f.write_str(why),
            NodeError::Download(e) => write!(f, "{e}"),
            NodeError::Downloads { failed, total } => {
                write!(f, "{failed} of {total} downloads failed (see above)")
            }
            NodeError::Interrupted { names } => write!(
                f,
                "interrupted; the verified part of {} is kept, run the same get to resume",
                names.join(", ")
            ),
        }
    }
}

impl std::error::Error for NodeError {}

/// One connection to another peer: either we serve it, or it is a source of
/// one of the running downloads.
pub(super) enum PeerConn {
    Serving {
        conn: Conn,
        /// Boxed: the variants stay close in size.
        session: Box<ServeSession>,
        /// A manifest being streamed to it.
        manifest: Option<serving::ManifestStream>,
    },
    Source {
        conn: Conn,
        /// The download's key in `Node::downloads`.
        job: usize,
        source: SourceId,
        connected: bool,
    },
}

impl PeerConn {
    pub(super) fn into_conn(self) -> Conn {
        match self {
            PeerConn::Serving { conn, .. } | PeerConn::Source { conn, .. } => conn,
        }
    }

    pub(super) fn conn(&mut self) -> &mut Conn {
        match self {
            PeerConn::Serving { conn, .. } | PeerConn::Source { conn, .. } => conn,
        }
    }
}

pub struct Node {
    config: NodeConfig,
    poll: Poll,
    listener: TcpListener,
    acceptor: net::Acceptor,
    store: SharedFolder,
    link: ManagerLink,
    manager_conn: Option<Conn>,
    manager_connected: bool,
    pub(super) conns: Slab<PeerConn>,
    open_files: OpenFiles,
    limiter: Option<TokenBucket>,
    /// When the limiter next has tokens for a waiting connection.
    limiter_wake: Option<Instant>,
    /// Serving connections that may send now, taking turns by bytes.
    fair: FairQueue,
    /// Who gives up a serving slot when peers are turned away at the cap.
    rotation: Rotation,
    pub(super) downloads: Slab<downloads::Job>,
    /// How the downloads of a one-shot get failed.
    failures: Vec<DownloadError>,
    mode: Mode,
    stdin: StdinLines,
    awaiting_name: bool,
    signals: signal_hook_mio::v1_0::Signals,
    revisit: Vec<ConnId>,
    /// The manager connection has bytes to read that no edge will announce.
    revisit_manager: bool,
    next_rescan: Instant,
    /// When to look at the `--allow` file for a change next.
    allow_check_at: Option<Instant>,
    next_progress: Instant,
    sink: Box<dyn Sink>,
    /// Set when the run should end, with its outcome.
    finished: Option<Result<(), NodeError>>,
    /// When chunks verified since the last `Have` are announced.
    haves_due: Option<Instant>,
    /// Chunks served from files this peer was still downloading.
    partial_chunks_served: u64,
    /// Which chunks were sent to anyone: fresh ones are served first.
    sent_chunks: swarm::SentChunks,
    /// The `--metrics` endpoint, once [`Node::serve_metrics`] bound it.
    metrics_http: Option<MetricsServer>,
    pub(super) stats: stats::PeerStats,
}

impl Node {
    /// Opens the shared folder (hashing what the cache does not cover),
    /// binds the serving port and prepares the loop.
    pub fn new(config: NodeConfig, mode: Mode) -> Result<Node, NodeError> {
        let now = Instant::now();
        let store = SharedFolder::open(&config.dir).map_err(|e| NodeError::Setup(e.to_string()))?;
        let poll = Poll::new()
            .map_err(|e| NodeError::Setup(format!("cannot create the event loop: {e}")))?;
        let mut listener = TcpListener::bind(config.listen).map_err(|e| {
            NodeError::Setup(format!(
                "cannot listen on {}: {e} (pick another --listen)",
                config.listen
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| NodeError::Setup(format!("cannot read the serving address: {e}")))?;
        let setup = |e: io::Error| NodeError::Setup(format!("cannot set up the event loop: {e}"));
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(setup)?;
        let mut signals = net::shutdown_signals().map_err(setup)?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(setup)?;
        let stdin = StdinLines::register(poll.registry(), STDIN);
        let mut link = ManagerLink::new(
            LinkMode::Member {
                listen_port: local.port(),
                advertise: config.advertise,
            },
            LinkConfig {
                give_up_after: matches!(mode, Mode::Get { .. }).then_some(GET_MANAGER_LIMIT),
                ..LinkConfig::default()
            },
            now,
        );
        link.set_shared(store.summaries());
        log::info!("peer serving on {local}");
        let limiter = config
            .upload_limit
            .map(|rate| TokenBucket::new(rate, (rate / 4).max(wire::MAX_CHUNK_SIZE as u64), now));
        let rotation = Rotation::new(RotationConfig {
            turn: config.rotate_after,
            ..RotationConfig::default()
        });
        let mut node = Node {
            next_rescan: now + config.rescan_interval,
            allow_check_at: config.allow.as_ref().map(|_| now + allow::CHECK_EVERY),
            config,
            poll,
            listener,
            acceptor: net::Acceptor::new(),
            store,
            link,
            manager_conn: None,
            manager_connected: false,
            conns: Slab::new(),
            open_files: OpenFiles::new(16),
            limiter,
            limiter_wake: None,
            fair: FairQueue::new(QUANTUM),
            rotation,
            downloads: Slab::new(),
            failures: Vec::new(),
            mode,
            stdin,
            awaiting_name: false,
            signals,
            revisit: Vec::new(),
            revisit_manager: false,
            next_progress: now,
            sink: Box::new(StdoutSink),
            finished: None,
            haves_due: None,
            partial_chunks_served: 0,
            sent_chunks: swarm::SentChunks::default(),
            metrics_http: None,
            stats: stats::PeerStats::default(),
        };
        node.sweep_stale_partials();
        Ok(node)
    }

    /// Sends command output and download reports to `sink` instead of stdout.
    pub fn set_sink(&mut self, sink: Box<dyn Sink>) {
        self.sink = sink;
    }

    /// Serves Prometheus metrics at `http://addr/metrics` on this loop
    /// (`--metrics`); returns the bound address.
    pub fn serve_metrics(&mut self, addr: SocketAddr) -> io::Result<SocketAddr> {
        let http = MetricsServer::bind(addr, self.poll.registry())?;
        let bound = http.local_addr()?;
        self.metrics_http = Some(http);
        Ok(bound)
    }

    /// The address other peers reach us at (for tests and logs).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until quit, a signal, or (for a one-shot get) the end of the download.
    pub fn run(mut self) -> Result<(), NodeError> {
        let mut events = Events::with_capacity(1024);
        if let Mode::Get { requests, .. } = self.mode.clone() {
            for request in requests {
                self.start_download(request, Instant::now());
            }
        }
        for line in self.stdin.take_preloaded() {
            self.handle_line(&line, Instant::now());
        }
        while self.finished.is_none() {
            let now = Instant::now();
            let busy = self.revisit_manager
                || self.store.has_pending_work()
                || self.downloads.iter().any(|(_, j)| j.is_verifying());
            let timeout = if self.revisit.is_empty() && !busy {
                net::timeout_until(self.next_deadline(), now)
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NodeError::Loop(e));
            }
            let now = Instant::now();
            for id in std::mem::take(&mut self.revisit) {
                self.handle_peer_readable(id, Instant::now());
            }
            if std::mem::take(&mut self.revisit_manager) {
                self.handle_manager_readable(now);
            }
            for event in events.iter() {
                self.handle_event(event, now);
            }
            if self.acceptor.wants_retry() {
                self.accept_all(now);
            }
            self.handle_timers(now);
            if self.store.has_pending_work() && self.store.do_work(HASH_SLICE) {
                self.open_files.clear();
                self.share_with_manager();
                self.apply_link_actions(now);
            }
            self.verify_partials(HASH_SLICE, now);
        }
        self.shutdown();
        self.finished.take().unwrap_or(Ok(()))
    }

    fn handle_event(&mut self, event: &mio::event::Event, now: Instant) {
        match event.token() {
            LISTENER => self.accept_all(now),
            MANAGER => self.handle_manager_event(event, now),
            STDIN => {
                for line in self.stdin.read_lines(self.poll.registry()) {
                    self.handle_line(&line, now);
                }
            }
            SIGNALS => {
                if self.signals.pending().next().is_some() {
                    log::info!("signal received; saying goodbye");
                    let names: Vec<String> = self
                        .downloads
                        .iter()
                        .map(|(_, j)| j.core.name().to_string())
                        .collect();
                    let outcome = match &self.mode {
                        Mode::Get { .. } if !names.is_empty() => {
                            Err(NodeError::Interrupted { names })
                        }
                        _ => Ok(()),
                    };
                    self.finish(outcome);
                }
            }
            token if MetricsServer::owns(token) => {
                if let Some(http) = &mut self.metrics_http {
                    let (stats, downloads) = (&self.stats, &self.downloads);
                    http.handle_event(token, self.poll.registry(), now, || {
                        let corrupt = downloads.iter().map(|(_, j)| j.core.corrupt_chunks());
                        stats.render(downloads.len(), corrupt.sum())
                    });
                }
            }
            Token(key) => {
                // Fresh per connection: one turn may read many chunks, and
                // the scheduler's rate and latency samples need their times.
                let now = Instant::now();
                let id = ConnId(key);
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.handle_peer_readable(id, now);
                }
                if event.is_writable() {
                    self.handle_peer_writable(id, now);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut deadline = net::earliest(self.link.poll_timeout(), Some(self.next_rescan));
        deadline = net::earliest(deadline, self.acceptor.retry_at(Instant::now()));
        deadline = net::earliest(deadline, self.limiter_wake);
        deadline = net::earliest(deadline, self.haves_due);
        deadline = net::earliest(deadline, self.rotation.poll_timeout());
        deadline = net::earliest(deadline, self.allow_check_at);
        if let Some(http) = &self.metrics_http {
            deadline = net::earliest(deadline, http.poll_timeout());
        }
        if !self.downloads.is_empty() {
            deadline = net::earliest(deadline, Some(self.next_progress));
        }
        for (_, job) in self.downloads.iter() {
            deadline = net::earliest(deadline, job.core.poll_timeout());
        }
        for (_, pc) in self.conns.iter() {
            if let PeerConn::Serving { session, conn, .. } = pc {
                deadline = net::earliest(deadline, session.poll_timeout());
                deadline = net::earliest(deadline, conn.handshake_deadline());
            }
        }
        deadline
    }

    fn handle_timers(&mut self, now: Instant) {
        if let Some(http) = &mut self.metrics_http {
            http.handle_timeout(self.poll.registry(), now);
        }
        self.link.handle_timeout(now);
        self.apply_link_actions(now);
        if self.haves_due.is_some_and(|t| t <= now) {
            self.announce_all();
        }
        if self.limiter_wake.is_some_and(|t| t <= now) {
            self.limiter_wake = None;
            self.serve_round(now);
        }
        if self.rotation.poll_timeout().is_some_and(|t| t <= now) {
            self.handle_rotation(now);
        }
        // Only what is due: this runs every loop turn, and a busy download
        // takes a turn per read.
        let expired: Vec<ConnId> = self
            .conns
            .iter_mut()
            .filter_map(|(k, pc)| match pc {
                PeerConn::Serving { session, .. }
                    if session.poll_timeout().is_some_and(|t| t <= now) =>
                {
                    session.handle_timeout(now);
                    Some(ConnId(k))
                }
                _ => None,
            })
            .collect();
        for id in expired {
            self.apply_serve_actions(id);
        }
        // A sealed serving connection whose handshake stalled (a client
        // that sends a byte and stops) is closed, and never reaches a core.
        let stalled: Vec<ConnId> = self
            .conns
            .iter_mut()
            .filter_map(|(k, pc)| match pc {
                PeerConn::Serving { conn, .. }
                    if conn.handshake_deadline().is_some_and(|t| t <= now) =>
                {
                    log::warn!(
                        "refusing {}: no handshake within {:?}",
                        conn.peer_addr(),
                        net::HANDSHAKE_TIMEOUT
                    );
                    Some(ConnId(k))
                }
                _ => None,
            })
            .collect();
        for id in stalled {
            self.close_peer(id);
        }
        self.handle_download_timers(now);
        if now >= self.next_rescan {
            self.next_rescan = now + self.config.rescan_interval;
            self.rescan();
        }
        if self.allow_check_at.is_some_and(|at| at <= now) {
            self.allow_check_at = Some(now + allow::CHECK_EVERY);
            if self
                .config
                .allow
                .as_mut()
                .is_some_and(allow::AllowList::refresh)
            {
                self.drop_unlisted();
            }
        }
    }

    fn rescan(&mut self) {
        match self.store.rescan() {
            Ok(true) => {
                log::info!(
                    "shared folder changed: {} files",
                    self.store.files().count()
                );
                self.open_files.clear();
                self.share_with_manager();
            }
            Ok(false) => {}
            Err(e) => log::warn!("cannot rescan the shared folder: {e}"),
        }
    }

    fn handle_line(&mut self, line: &str, now: Instant) {
        if std::mem::take(&mut self.awaiting_name) && !line.is_empty() {
            return self.handle_line(&format!("get {line}"), now);
        }
        match commands::parse(line) {
            Ok(None) => {}
            Ok(Some(cmd)) => self.handle_command(cmd, now),
            Err(e) => self.say(&format!("{e}\n")),
        }
    }

    fn handle_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Get { name, hash } => {
                self.start_download(GetRequest { name, hash }, now);
            }
            Command::AskName => {
                self.awaiting_name = true;
                self.say("file name: ");
            }
            Command::Ls => {
                let text = self.ls_text();
                self.say(&text);
            }
            Command::RmPartial(target) => self.rm_partial(&target),
            // Above the full-list limit the link keeps only the count: ask
            // for a page.
            Command::Peers if self.link.peer_count().is_some() => {
                self.link.ask(Query::ListPeers);
                self.apply_link_actions(now);
            }
            Command::Peers => self.say(&super::output::peer_map(
                self.link.peers(),
                self.link.peer_id(),
            )),
            Command::Files => {
                self.link.ask(Query::ListFiles);
                self.apply_link_actions(now);
            }
            Command::Status => {
                let text = self.status_text();
                self.say(&text);
            }
            Command::Quit => self.finish(Ok(())),
            Command::Help => self.say(commands::HELP),
        }
    }

    fn finish(&mut self, outcome: Result<(), NodeError>) {
        if self.finished.is_none() {
            self.finished = Some(outcome);
        }
    }

    /// Saves download progress, says goodbye, and flushes what it can.
    fn shutdown(&mut self) {
        for (_, job) in self.downloads.iter_mut() {
            job.save_progress();
        }
        self.link.shutdown();
        let now = Instant::now();
        self.apply_link_actions(now);
        if let Some(conn) = self.manager_conn.as_mut() {
            conn.flush_and_close();
        }
        for (_, pc) in self.conns.iter_mut() {
            pc.conn().flush_and_close();
        }
    }

    fn say(&mut self, text: &str) {
        self.sink.report(Report::Text(text));
    }
}
