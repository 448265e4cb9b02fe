//! The peer's event loop: one mio `Poll` over the serving listener, the
//! manager connection, every peer connection (serving and downloading, in one
//! slab), stdin and the shutdown signals. Protocol decisions are made by the
//! pure cores ([`ManagerLink`], [`ServeSession`], the download scheduler);
//! this module moves bytes between them, the sockets and the disk: the loop,
//! timers, stdin and downloads here, the manager connection in
//! `manager_conn.rs`, serving in `serving.rs`.

mod manager_conn;
mod serving;

use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::commands::{self, Command};
use super::download::{Download, DownloadOutcome, GetRequest};
use super::files::OpenFiles;
use super::link::{LinkConfig, LinkMode, ManagerLink, Query};
use super::ratelimit::TokenBucket;
use super::serve::ServeSession;
use crate::net::{self, Conn, ConnId, StdinLines};
use crate::store::SharedFolder;
use crate::wire;

const LISTENER: Token = Token(usize::MAX - 1);
const MANAGER: Token = Token(usize::MAX - 2);
const STDIN: Token = Token(usize::MAX - 3);
const SIGNALS: Token = Token(usize::MAX - 4);

/// Queue more chunks on a serving connection only while less than this is
/// waiting in user space: disk reads follow the socket's pace.
const SEND_LOW_WATER: usize = 512 << 10;

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
    /// How often the shared folder is re-read for new or changed files.
    pub rescan_interval: Duration,
    /// Show a progress bar (stderr is a terminal).
    pub progress_bar: bool,
}

/// What this run of the peer is for.
#[derive(Debug, Clone)]
pub enum Mode {
    /// Share the folder and take commands on stdin until told to quit.
    Interactive,
    /// Download one file, then exit (or keep serving with `seed`).
    Get { request: GetRequest, seed: bool },
}

/// Why a run ended badly; the binary prints it and exits non-zero.
#[derive(Debug)]
pub struct NodeError(pub String);

impl std::fmt::Display for NodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NodeError {}

/// One connection to another peer: either we serve it, or it is a source of
/// the running download.
pub(super) enum PeerConn {
    Serving { conn: Conn, session: ServeSession },
    Source { conn: Conn, connected: bool },
}

impl PeerConn {
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
    store: SharedFolder,
    link: ManagerLink,
    manager_conn: Option<Conn>,
    manager_connected: bool,
    pub(super) conns: Slab<PeerConn>,
    open_files: OpenFiles,
    limiter: Option<TokenBucket>,
    /// When the limiter next has tokens for a waiting connection.
    limiter_wake: Option<Instant>,
    download: Option<Download>,
    mode: Mode,
    stdin: StdinLines,
    awaiting_name: bool,
    signals: signal_hook_mio::v1_0::Signals,
    revisit: Vec<ConnId>,
    next_rescan: Instant,
    /// Set when the run should end, with its outcome.
    finished: Option<Result<(), NodeError>>,
}

impl Node {
    /// Opens the shared folder (hashing what the cache does not cover),
    /// binds the serving port and prepares the loop.
    pub fn new(config: NodeConfig, mode: Mode) -> Result<Node, NodeError> {
        let now = Instant::now();
        let store = SharedFolder::open(&config.dir).map_err(|e| NodeError(e.to_string()))?;
        let poll =
            Poll::new().map_err(|e| NodeError(format!("cannot create the event loop: {e}")))?;
        let mut listener = TcpListener::bind(config.listen).map_err(|e| {
            NodeError(format!(
                "cannot listen on {}: {e} (pick another --listen)",
                config.listen
            ))
        })?;
        let local = listener
            .local_addr()
            .map_err(|e| NodeError(format!("cannot read the serving address: {e}")))?;
        let setup = |e: io::Error| NodeError(format!("cannot set up the event loop: {e}"));
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
            LinkConfig::default(),
            now,
        );
        link.set_shared(store.summaries());
        log::info!(
            "sharing {} files from {}",
            store.files().count(),
            config.dir.display()
        );
        log::info!("peer serving on {local}");
        let limiter = config
            .upload_limit
            .map(|rate| TokenBucket::new(rate, (rate / 4).max(wire::MAX_CHUNK_SIZE as u64), now));
        Ok(Node {
            next_rescan: now + config.rescan_interval,
            config,
            poll,
            listener,
            store,
            link,
            manager_conn: None,
            manager_connected: false,
            conns: Slab::new(),
            open_files: OpenFiles::new(16),
            limiter,
            limiter_wake: None,
            download: None,
            mode,
            stdin,
            awaiting_name: false,
            signals,
            revisit: Vec::new(),
            finished: None,
        })
    }

    /// The address other peers reach us at (for tests and logs).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Runs until quit, a signal, or (for a one-shot get) the end of the download.
    pub fn run(mut self) -> Result<(), NodeError> {
        let mut events = Events::with_capacity(1024);
        if let Mode::Get { request, .. } = self.mode.clone() {
            self.start_download(request, Instant::now());
        }
        for line in self.stdin.take_preloaded() {
            self.handle_line(&line, Instant::now());
        }
        while self.finished.is_none() {
            let now = Instant::now();
            let timeout = if self.revisit.is_empty() {
                net::timeout_until(self.next_deadline(), now)
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NodeError(format!("event loop failed: {e}")));
            }
            let now = Instant::now();
            for id in std::mem::take(&mut self.revisit) {
                self.handle_peer_readable(id, Instant::now());
            }
            for event in events.iter() {
                self.handle_event(event, now);
            }
            self.handle_timers(now);
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
                    let outcome = match (&self.mode, &self.download) {
                        (Mode::Get { .. }, Some(d)) => Err(NodeError(format!(
                            "interrupted; the verified part of {} is kept, run the same get to resume",
                            d.name()
                        ))),
                        _ => Ok(()),
                    };
                    self.finish(outcome);
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
        deadline = net::earliest(deadline, self.limiter_wake);
        if let Some(d) = &self.download {
            deadline = net::earliest(deadline, d.poll_timeout());
        }
        for (_, pc) in self.conns.iter() {
            if let PeerConn::Serving { session, .. } = pc {
                deadline = net::earliest(deadline, session.poll_timeout());
            }
        }
        deadline
    }

    fn handle_timers(&mut self, now: Instant) {
        self.link.handle_timeout(now);
        self.apply_link_actions(now);
        if self.limiter_wake.is_some_and(|t| t <= now) {
            self.limiter_wake = None;
            let serving: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, pc)| matches!(pc, PeerConn::Serving { .. }))
                .map(|(k, _)| ConnId(k))
                .collect();
            for id in serving {
                self.pump_serving(id, now);
            }
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
        if self
            .download
            .as_ref()
            .is_some_and(|d| d.poll_timeout().is_some_and(|t| t <= now))
        {
            self.with_download(now, |d, ctx| d.handle_timeout(ctx));
        }
        if now >= self.next_rescan {
            self.next_rescan = now + self.config.rescan_interval;
            self.rescan();
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
                self.link.set_shared(self.store.summaries());
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
            Err(e) => say(&format!("{e}\n")),
        }
    }

    fn handle_command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Get { name, hash } => {
                self.start_download(GetRequest { name, hash }, now);
            }
            Command::AskName => {
                self.awaiting_name = true;
                say("file name: ");
            }
            Command::Ls => say(&super::output::shared_files(&self.store)),
            Command::Peers => say(&super::output::peer_map(
                self.link.peers(),
                self.link.peer_id(),
            )),
            Command::Files => {
                self.link.ask(Query::ListFiles);
                self.apply_link_actions(now);
            }
            Command::Status => say(&match &self.download {
                Some(d) => d.status_line(),
                None => "no download in progress\n".into(),
            }),
            Command::Quit => self.finish(Ok(())),
            Command::Help => say(commands::HELP),
        }
    }

    fn finish(&mut self, outcome: Result<(), NodeError>) {
        if self.finished.is_none() {
            self.finished = Some(outcome);
        }
    }

    /// Saves download progress, says goodbye, and flushes what it can.
    fn shutdown(&mut self) {
        if let Some(d) = self.download.as_mut() {
            d.save_progress();
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

    fn start_download(&mut self, request: GetRequest, now: Instant) {
        if let Some(d) = &self.download {
            say(&format!(
                "already downloading {}; wait for it to finish\n",
                d.name()
            ));
            return;
        }
        match Download::start(request, &self.store) {
            Ok(d) => {
                self.download = Some(d);
                self.with_download(now, |d, ctx| d.begin(ctx));
            }
            Err(DownloadOutcome::AlreadyHave(msg)) => {
                say(&format!("{msg}\n"));
                if matches!(self.mode, Mode::Get { seed: false, .. }) {
                    self.finish(Ok(()));
                }
            }
            Err(DownloadOutcome::Failed(msg)) => self.download_failed(msg),
            Err(DownloadOutcome::Done(_)) => {}
        }
    }

    /// Runs `f` on the download with a context giving it the sockets, the
    /// link and the store, then acts on how it ended.
    fn with_download(
        &mut self,
        now: Instant,
        f: impl FnOnce(&mut Download, &mut super::download::Ctx<'_>),
    ) {
        let Some(mut download) = self.download.take() else {
            return;
        };
        let mut ctx = super::download::Ctx {
            now,
            poll: &self.poll,
            conns: &mut self.conns,
            link: &mut self.link,
            store: &self.store,
            max_peers: self.config.max_peers,
            progress_bar: self.config.progress_bar,
            revisit: &mut self.revisit,
        };
        f(&mut download, &mut ctx);
        match download.take_outcome() {
            None => {
                self.download = Some(download);
                // Only now: a link event drained here may be for the download.
                self.apply_link_actions(now);
            }
            Some(DownloadOutcome::Done(summary)) => {
                download.close_sources(&self.poll, &mut self.conns);
                say(&summary);
                // Shared at once, with the manifest it was verified against.
                if let Some((name, manifest)) = download.completed_file() {
                    match self.store.add_downloaded(name, manifest) {
                        Ok(()) => self.link.set_shared(self.store.summaries()),
                        Err(e) => log::warn!("{e}"),
                    }
                }
                self.rescan();
                if matches!(self.mode, Mode::Get { seed: false, .. }) {
                    self.finish(Ok(()));
                }
            }
            Some(DownloadOutcome::AlreadyHave(msg)) => {
                download.close_sources(&self.poll, &mut self.conns);
                say(&format!("{msg}\n"));
                if matches!(self.mode, Mode::Get { seed: false, .. }) {
                    self.finish(Ok(()));
                }
            }
            Some(DownloadOutcome::Failed(msg)) => {
                download.save_progress();
                download.close_sources(&self.poll, &mut self.conns);
                self.download_failed(msg);
            }
        }
    }

    fn download_failed(&mut self, msg: String) {
        log::error!("{msg}");
        match self.mode {
            Mode::Get { .. } => self.finish(Err(NodeError(msg))),
            Mode::Interactive => say(&format!("download failed: {msg}\n")),
        }
    }
}

/// Prints command output to stdout; a closed stdout is not worth a panic.
pub(super) fn say(text: &str) {
    let mut out = io::stdout().lock();
    // Last guard: names are escaped where they are formatted.
    let text = crate::text::sanitize_lines(text);
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}
