//! Manager load generator: N simulated peers over real sockets, in one mio
//! loop, against a real `manager` process it starts (so the two each have
//! their own descriptor limit). Each simulated peer binds a loopback source
//! address 127.0.0.2.. before connecting (so ephemeral ports are spread over
//! many addresses), sends Hello and Register, then a keepalive every
//! heartbeat from its Welcome on (as a real member does), answers every
//! Ping, and
//! applies every PeerList and PeerDelta to its own view of the membership (a
//! bitset of peer ids).
//!
//!     cargo build --release --bins --example loadgen
//!     target/release/examples/loadgen --peers 5000 [--heartbeat 2] [--peer-timeout 6]
//!
//! Phases and what is reported:
//! 1. burst: all N connect at once (or `--rate` per second). "joined": time until every peer got
//!    its Welcome (or until none got in for 20 s: handshakes the manager's
//!    accept queue dropped hang); "converged": until every peer that got
//!    in holds every other that got in.
//! 2. steady: 10 s of heartbeats (`--steady`), with `--churn N` peers joining
//!    and as many crashing each second; the manager's CPU share over it.
//! 3. join, goodbye, crash, hang: one more peer joins, says goodbye; another
//!    joins and its socket is closed without goodbye (a killed process);
//!    another joins and goes silent with its socket open (a hung host,
//!    found by the peer timeout). For each, p50/p99/max over the N peers of
//!    the time until each learned of it.
//!
//! Then the manager's CPU for the burst, its peak RSS (VmHWM) and the bytes
//! it sent by kind (from its own --metrics page).
//!
//! It is a cargo example (not a binary of the package) because it is a
//! measuring tool, not something to install; it uses `shoal::wire` to
//! encode and decode, like the real peer.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream as StdStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use fixedbitset::FixedBitSet;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use shoal::wire::{self, Message, PROTOCOL_VERSION, PeerId, Role};
use slab::Slab;

/// Simulated peers per loopback source address.
const PER_SOURCE_ADDR: usize = 500;

struct Args {
    peers: usize,
    heartbeat: f64,
    peer_timeout: f64,
    manager_bin: PathBuf,
    steady_secs: u64,
    /// Connects per second in the burst; `None`: all at once.
    rate: Option<f64>,
    /// During the steady phase, this many extra peers join and as many
    /// crash each second (a churning network).
    churn: f64,
}

fn parse_args() -> Result<Args, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/examples/loadgen -> target/release/manager
    let default_bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("manager"))
        .unwrap_or_else(|| PathBuf::from("manager"));
    let mut args = Args {
        peers: 1000,
        heartbeat: 2.0,
        peer_timeout: 6.0,
        manager_bin: default_bin,
        steady_secs: 10,
        rate: None,
        churn: 0.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--peers" => args.peers = value()?.parse().map_err(|e| format!("--peers: {e}"))?,
            "--heartbeat" => args.heartbeat = value()?.parse().map_err(|e| format!("{e}"))?,
            "--peer-timeout" => args.peer_timeout = value()?.parse().map_err(|e| format!("{e}"))?,
            "--manager-bin" => args.manager_bin = PathBuf::from(value()?),
            "--rate" => args.rate = Some(value()?.parse().map_err(|e| format!("{e}"))?),
            "--steady" => args.steady_secs = value()?.parse().map_err(|e| format!("{e}"))?,
            "--churn" => args.churn = value()?.parse().map_err(|e| format!("{e}"))?,
            "-h" | "--help" => {
                return Err(
                    "usage: loadgen [--peers N] [--heartbeat SECS] [--peer-timeout SECS] \
                            [--steady SECS] [--churn JOINS_AND_LEAVES_PER_SEC] \
                            [--rate CONNECTS_PER_SEC] [--manager-bin PATH]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

/// One simulated peer.
struct Sim {
    stream: TcpStream,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    /// Peer ids in this peer's view of the membership.
    view: FixedBitSet,
    count: usize,
    /// Inside a paged list (the pages after the first add to it).
    in_list: bool,
    id: Option<PeerId>,
    joined_at: Option<Instant>,
    /// When this peer learned of the event being measured.
    seen_at: Option<Instant>,
    /// Hung: reads nothing and answers nothing.
    silent: bool,
    /// Part of the burst (the probes are not).
    burst: bool,
    /// The member count, on a network above the manager's full-list limit
    /// (it sends `PeerCount` instead of lists there).
    total: Option<u32>,
    /// Got a `Holders` answer since the last `WhoHas` (so the manager now
    /// counts it among the watchers of the holders it named).
    answered: bool,
}

/// The event whose propagation is being timed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    None,
    Added(PeerId),
    Removed(PeerId),
}

struct Gen {
    poll: Poll,
    sims: Slab<Sim>,
    manager: SocketAddr,
    watch: Watch,
    /// The member count when the probe began (for `PeerCount` networks).
    baseline: u32,
    scratch: Vec<u8>,
    burst: usize,
    joined: usize,
    errors: usize,
    /// Burst peers whose connection the manager closed (after or before
    /// their welcome).
    closed: usize,
    closed_unjoined: usize,
    bytes_in: u64,
    /// When the latest burst peer was welcomed.
    last_join: Instant,
    keepalives: Keepalives,
}

/// When each simulated member's next keepalive is due: one slot per
/// millisecond of the heartbeat, each member in the slot of its Welcome
/// (so, as with real peers, the keepalives are spread over the heartbeat).
struct Keepalives {
    slots: Vec<Vec<usize>>,
    origin: Instant,
    /// Milliseconds since `origin` whose slot has been sent.
    done_ms: u64,
}

impl Keepalives {
    fn new(heartbeat: Duration) -> Keepalives {
        Keepalives {
            slots: vec![Vec::new(); heartbeat.as_millis().max(1) as usize],
            origin: Instant::now(),
            done_ms: 0,
        }
    }

    fn slot_at(&self, t: Instant) -> usize {
        (t.duration_since(self.origin).as_millis() as usize) % self.slots.len()
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    if let Some(max) = lim.maximum {
        let _ = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(max),
                maximum: Some(max),
            },
        );
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn run() -> Result<(), String> {
    let args = parse_args()?;
    let limit = raise_fd_limit();
    if args.peers as u64 + 100 > limit {
        return Err(format!(
            "{} peers need more descriptors than the limit of {limit}",
            args.peers
        ));
    }
    let port = free_port().map_err(|e| e.to_string())?;
    let metrics_port = free_port().map_err(|e| e.to_string())?;
    let manager: SocketAddr = format!("127.0.0.1:{port}")
        .parse()
        .unwrap_or_else(|_| unreachable!());
    let metrics: SocketAddr = format!("127.0.0.1:{metrics_port}")
        .parse()
        .unwrap_or_else(|_| unreachable!());
    let mut child = Command::new(&args.manager_bin)
        .args(["--listen", &manager.to_string()])
        .args(["--metrics", &metrics.to_string()])
        .args(["--heartbeat", &args.heartbeat.to_string()])
        .args(["--peer-timeout", &args.peer_timeout.to_string()])
        .args(["--max-conns", &(args.peers + 1000).to_string()])
        .arg("-q")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", args.manager_bin.display()))?;
    let result = measure(&args, manager, metrics, &child);
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn wait_listening(addr: SocketAddr) -> Result<(), String> {
    let start = Instant::now();
    while StdStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("the manager never listened on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn measure(
    args: &Args,
    manager: SocketAddr,
    metrics: SocketAddr,
    child: &Child,
) -> Result<(), String> {
    wait_listening(manager)?;
    let pid = child.id();
    let mut g = Gen {
        poll: Poll::new().map_err(|e| e.to_string())?,
        sims: Slab::with_capacity(args.peers + 8),
        manager,
        watch: Watch::None,
        baseline: 0,
        scratch: vec![0; 256 << 10],
        burst: args.peers,
        joined: 0,
        errors: 0,
        closed: 0,
        closed_unjoined: 0,
        bytes_in: 0,
        last_join: Instant::now(),
        keepalives: Keepalives::new(Duration::from_secs_f64(args.heartbeat)),
    };
    let n = args.peers;
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    let mut spawned = 0;
    while spawned < n {
        let due = args.rate.map_or(n, |r| {
            ((t0.elapsed().as_secs_f64() * r) as usize + 1).min(n)
        });
        for i in spawned..due {
            if let Err(e) = g.spawn(i, true) {
                g.errors += 1;
                if g.errors < 5 {
                    eprintln!("connect {i}: {e}");
                }
            }
        }
        spawned = due;
        if spawned < n {
            g.run_until(Duration::from_millis(5), |_| false);
        }
    }
    let limit = Duration::from_secs(300);
    // Done when everyone is in or gone, or when nobody got in for 20 s
    // (connections the manager's accept queue dropped hang in the kernel).
    g.run_until(limit, |g| {
        g.joined + g.closed_unjoined + g.errors >= n
            || g.last_join.elapsed() > Duration::from_secs(20)
    });
    let joined_in = g.last_join - t0;
    let joined = g.joined;
    let mut join_times: Vec<f64> = g
        .sims
        .iter()
        .filter_map(|(_, s)| s.joined_at.map(|t| (t - t0).as_secs_f64()))
        .collect();
    join_times.sort_by(f64::total_cmp);
    let q = |q: f64| {
        join_times
            .get(((join_times.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "welcome after connect: p50 {:.3} s, p99 {:.3} s",
        q(0.5),
        q(0.99)
    );
    let cpu_joined = cpu_secs(pid) - cpu0;
    let converged = g.run_until(Duration::from_secs(60), Gen::converged);
    let converged_in = t0.elapsed();
    let converged_text = if converged {
        format!("{:.2} s", converged_in.as_secs_f64())
    } else {
        format!(
            "never ({} of {} after {:.0} s)",
            g.converged_count(),
            g.joined,
            converged_in.as_secs_f64()
        )
    };
    let cpu_converged = cpu_secs(pid) - cpu0;
    let own_cpu = cpu_secs(std::process::id());
    println!(
        "burst of {n}: generator CPU {own_cpu:.2} s, {} connections closed on us",
        g.closed
    );
    println!(
        "burst of {n}: joined {} in {:.2} s, converged {converged_text} ({} errors, {} closed); manager CPU {:.2} s to join, {:.2} s to converge",
        g.joined,
        joined_in.as_secs_f64(),
        g.errors,
        g.closed,
        cpu_joined,
        cpu_converged
    );

    let cpu_s0 = cpu_secs(pid);
    let s0 = Instant::now();
    let churned = g.churn(args.churn, Duration::from_secs(args.steady_secs));
    let steady = (cpu_secs(pid) - cpu_s0) / s0.elapsed().as_secs_f64();
    let still = g.sims.iter().filter(|(_, s)| s.burst).count();
    println!(
        "steady: manager CPU {:.1} % over {} s ({churned} joins and as many crashes); {still} of {n} still connected",
        steady * 100.0,
        args.steady_secs
    );

    let join = g.probe_join()?;
    let goodbye = g.probe_leave(join.0, Leave::Goodbye, Duration::from_secs(30));
    let (crash_key, _) = g.probe_join()?;
    let crash = g.probe_leave(crash_key, Leave::Crash, Duration::from_secs(30));
    let (hang_key, _) = g.probe_join()?;
    let hang_limit = Duration::from_secs_f64(args.peer_timeout * 2.0 + 10.0);
    let hang = g.probe_leave(hang_key, Leave::Hang, hang_limit);
    let show = |what: &str, s: &Spread| {
        println!(
            "{what:<8} p50 {:>7.1} ms  p99 {:>7.1} ms  max {:>7.1} ms  ({} of {} learned)",
            s.p50 * 1e3,
            s.p99 * 1e3,
            s.max * 1e3,
            s.learned,
            s.of
        )
    };
    show("join", &join.1);
    show("goodbye", &goodbye);
    show("crash", &crash);
    show("hang", &hang);

    let hwm = vm_hwm_kib(pid).unwrap_or(0);
    let page = scrape(metrics).unwrap_or_default();
    let sent = |kind: &str| {
        metric(
            &page,
            &format!("shoal_manager_frame_bytes_out_total{{kind=\"{kind}\"}}"),
        )
    };
    println!(
        "manager: peak RSS {:.0} MiB; sent {:.1} MB of peer lists, {:.1} MB of deltas; loop turn max {:.3} s; generator read {:.1} MB, its CPU {:.1} s",
        hwm as f64 / 1024.0,
        sent("peer-list") / 1e6,
        sent("peer-delta") / 1e6,
        metric(&page, "shoal_manager_loop_turn_max_seconds"),
        g.bytes_in as f64 / 1e6,
        cpu_secs(std::process::id()),
    );
    println!(
        "| {n} | {joined} in {:.2} s | {converged_text} | {} | {:.2} s | {:.0} MiB | {:.0} MB | {:.1} % | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms | {:.0} / {:.0} ms |",
        joined_in.as_secs_f64(),
        g.closed,
        cpu_joined,
        hwm as f64 / 1024.0,
        sent("peer-list") / 1e6,
        steady * 100.0,
        join.1.p50 * 1e3,
        join.1.p99 * 1e3,
        goodbye.p50 * 1e3,
        goodbye.p99 * 1e3,
        crash.p50 * 1e3,
        crash.p99 * 1e3,
        hang.p50 * 1e3,
        hang.p99 * 1e3,
    );
    Ok(())
}

#[derive(Clone, Copy)]
enum Leave {
    Goodbye,
    Crash,
    Hang,
}

#[derive(Default)]
struct Spread {
    p50: f64,
    p99: f64,
    max: f64,
    learned: usize,
    of: usize,
}

impl Gen {
    /// Opens simulated peer `i`'s connection from its loopback address.
    fn spawn(&mut self, i: usize, burst: bool) -> io::Result<usize> {
        use rustix::net::{AddressFamily, SocketFlags, SocketType, bind, connect, socket_with};
        let host = 2 + (i / PER_SOURCE_ADDR) as u32;
        let src = Ipv4Addr::from(0x7f00_0000 | host.min(0x00ff_fffe));
        let fd = socket_with(
            AddressFamily::INET,
            SocketType::STREAM,
            SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            None,
        )?;
        bind(&fd, &SocketAddrV4::new(src, 0))?;
        let _ = rustix::net::sockopt::set_tcp_nodelay(&fd, true);
        match connect(&fd, &self.manager) {
            Ok(()) | Err(rustix::io::Errno::INPROGRESS) => {}
            Err(e) => return Err(e.into()),
        }
        let mut stream = TcpStream::from_std(StdStream::from(fd));
        let entry = self.sims.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let mut wbuf = Vec::new();
        wire::encode(
            &Message::Hello {
                version: PROTOCOL_VERSION,
                role: Role::ManagerClient,
            },
            &mut wbuf,
        );
        wire::encode(
            &Message::Register {
                listen_port: 1024 + (i % 60000) as u16,
                advertise: None,
            },
            &mut wbuf,
        );
        entry.insert(Sim {
            stream,
            rbuf: Vec::new(),
            wbuf,
            view: FixedBitSet::with_capacity(self.burst + 64),
            count: 0,
            in_list: false,
            id: None,
            joined_at: None,
            seen_at: None,
            silent: false,
            burst,
            total: None,
            answered: false,
        });
        Ok(key)
    }

    /// Runs the loop until `done` holds or `limit` passes.
    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Gen) -> bool) -> bool {
        let start = Instant::now();
        let mut events = Events::with_capacity(4096);
        while !done(self) && start.elapsed() < limit {
            let left = limit.saturating_sub(start.elapsed());
            if self
                .poll
                .poll(&mut events, Some(left.min(Duration::from_millis(1))))
                .is_err()
            {
                continue;
            }
            for event in events.iter() {
                let key = event.token().0;
                if event.is_writable() {
                    self.flush(key);
                }
                if event.is_readable() || event.is_read_closed() || event.is_error() {
                    self.read(key);
                }
            }
            self.send_keepalives();
        }
        done(self)
    }

    /// Sends the keepalives of every slot that came due since the last call
    /// (a hung peer sends none, and so is dropped by the peer timeout).
    fn send_keepalives(&mut self) {
        let now_ms = self.keepalives.origin.elapsed().as_millis() as u64;
        while self.keepalives.done_ms < now_ms {
            let slot = (self.keepalives.done_ms % self.keepalives.slots.len() as u64) as usize;
            self.keepalives.done_ms += 1;
            for key in std::mem::take(&mut self.keepalives.slots[slot]) {
                let Some(sim) = self.sims.get_mut(key) else {
                    continue;
                };
                if sim.silent {
                    continue;
                }
                wire::encode(&Message::Pong { nonce: 0 }, &mut sim.wbuf);
                self.flush(key);
                if self.sims.contains(key) {
                    self.keepalives.slots[slot].push(key);
                }
            }
        }
    }

    fn flush(&mut self, key: usize) {
        let Some(sim) = self.sims.get_mut(key) else {
            return;
        };
        let mut sent = 0;
        while sent < sim.wbuf.len() {
            match sim.stream.write(&sim.wbuf[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_sim(key);
                    return;
                }
            }
        }
        sim.wbuf.drain(..sent);
    }

    fn read(&mut self, key: usize) {
        let Some(sim) = self.sims.get_mut(key) else {
            return;
        };
        if sim.silent {
            return;
        }
        let mut buf = std::mem::take(&mut sim.rbuf);
        let mut gone = false;
        loop {
            match sim.stream.read(&mut self.scratch) {
                Ok(0) => {
                    gone = true;
                    break;
                }
                Ok(n) => {
                    self.bytes_in += n as u64;
                    buf.extend_from_slice(&self.scratch[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    gone = true;
                    break;
                }
            }
        }
        let mut used = 0;
        let now = Instant::now();
        loop {
            match wire::decode(&buf[used..]) {
                Ok(Some((msg, n))) => {
                    used += n;
                    self.handle(key, msg, now);
                }
                Ok(None) => break,
                Err(e) => {
                    eprintln!("peer {key}: bad frame from the manager: {e}");
                    gone = true;
                    break;
                }
            }
        }
        buf.drain(..used);
        if buf.is_empty() && buf.capacity() > 64 << 10 {
            buf = Vec::new();
        }
        if gone {
            self.drop_sim(key);
            return;
        }
        if let Some(sim) = self.sims.get_mut(key) {
            sim.rbuf = buf;
            if !sim.wbuf.is_empty() {
                self.flush(key);
            }
        }
    }

    fn drop_sim(&mut self, key: usize) {
        if let Some(mut sim) = self.sims.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut sim.stream);
            if sim.burst {
                self.closed += 1;
                if sim.id.is_none() {
                    self.closed_unjoined += 1;
                }
            }
        }
    }

    fn handle(&mut self, key: usize, msg: Message<'_>, now: Instant) {
        let (watch, baseline) = (self.watch, self.baseline);
        let Some(sim) = self.sims.get_mut(key) else {
            return;
        };
        match msg {
            // Above the full-list limit: a join or a leave shows as the count
            // moving past what it was when the probe began.
            Message::PeerCount { total } => {
                sim.total = Some(total);
                let moved = match watch {
                    Watch::Added(_) => total > baseline,
                    Watch::Removed(_) => total < baseline,
                    Watch::None => false,
                };
                if moved {
                    sim.seen_at.get_or_insert(now);
                }
            }
            Message::Ping { nonce } => wire::encode(&Message::Pong { nonce }, &mut sim.wbuf),
            Message::Welcome { peer_id, .. } => {
                sim.id = Some(peer_id);
                let slot = self.keepalives.slot_at(now);
                self.keepalives.slots[slot].push(key);
                sim.joined_at = Some(now);
                if sim.burst {
                    self.joined += 1;
                    self.last_join = now;
                }
            }
            Message::PeerList { peers, more } => {
                if !sim.in_list {
                    sim.view.clear();
                    sim.count = 0;
                }
                sim.in_list = more;
                for p in &peers {
                    insert(sim, p.id);
                    if watch == Watch::Added(p.id) {
                        sim.seen_at.get_or_insert(now);
                    }
                }
            }
            Message::PeerDelta { added, removed } => {
                for p in &added {
                    insert(sim, p.id);
                    if watch == Watch::Added(p.id) {
                        sim.seen_at.get_or_insert(now);
                    }
                }
                for id in &removed {
                    let i = id.0 as usize;
                    if i < sim.view.len() && sim.view.contains(i) {
                        sim.view.set(i, false);
                        sim.count -= 1;
                    }
                    if watch == Watch::Removed(*id) {
                        sim.seen_at.get_or_insert(now);
                    }
                }
            }
            Message::Holders { .. } => sim.answered = true,
            Message::Error { reason, .. } => {
                eprintln!("peer {key}: manager error: {reason}");
            }
            _ => {}
        }
    }

    /// One more peer joins; returns its key and how long the others took
    /// to learn of it (from its connect).
    fn probe_join(&mut self) -> Result<(usize, Spread), String> {
        self.reset_seen();
        let start = Instant::now();
        let key = self
            .spawn(self.sims.len() + 1000, false)
            .map_err(|e| format!("probe connect: {e}"))?;
        self.run_until(Duration::from_secs(10), |g| g.sims[key].id.is_some());
        let id = self.sims[key]
            .id
            .ok_or("the probe peer was never welcomed")?;
        // Anyone who saw it in the join list before it read its welcome.
        self.watch = Watch::Added(id);
        let start_seen = start;
        let now = Instant::now();
        for (_, s) in self.sims.iter_mut() {
            if s.burst && s.view.len() > id.0 as usize && s.view.contains(id.0 as usize) {
                s.seen_at.get_or_insert(now);
            }
        }
        self.run_until(Duration::from_secs(30), Gen::all_seen);
        self.watch = Watch::None;
        Ok((key, self.spread(start_seen)))
    }

    fn probe_leave(&mut self, key: usize, how: Leave, limit: Duration) -> Spread {
        self.reset_seen();
        let Some(id) = self.sims.get(key).and_then(|s| s.id) else {
            return Spread::default();
        };
        self.follow(key);
        self.watch = Watch::Removed(id);
        let start = Instant::now();
        match how {
            Leave::Goodbye => {
                if let Some(sim) = self.sims.get_mut(key) {
                    wire::encode(&Message::Goodbye, &mut sim.wbuf);
                }
                self.flush(key);
            }
            Leave::Crash => {
                if let Some(mut sim) = self.sims.try_remove(key) {
                    let _ = self.poll.registry().deregister(&mut sim.stream);
                }
            }
            Leave::Hang => {
                if let Some(sim) = self.sims.get_mut(key) {
                    sim.silent = true;
                }
            }
        }
        self.run_until(limit, Gen::all_seen);
        self.watch = Watch::None;
        if let Some(mut sim) = self.sims.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut sim.stream);
        }
        self.spread(start)
    }

    /// Runs the loop for `steady`; with `per_sec` > 0, meanwhile that many
    /// extra peers join each second and, once ten are in, the oldest of
    /// them crashes for each one that joins. Returns the joins.
    fn churn(&mut self, per_sec: f64, steady: Duration) -> usize {
        if per_sec <= 0.0 {
            self.run_until(steady, |_| false);
            return 0;
        }
        let start = Instant::now();
        let mut extra: std::collections::VecDeque<usize> = Default::default();
        let mut joined = 0;
        while start.elapsed() < steady {
            let due = (start.elapsed().as_secs_f64() * per_sec) as usize;
            while joined < due {
                match self.spawn(self.burst + 1000 + joined, false) {
                    Ok(key) => extra.push_back(key),
                    Err(e) => eprintln!("churn connect: {e}"),
                }
                joined += 1;
                if extra.len() > 10
                    && let Some(old) = extra.pop_front()
                    && let Some(mut sim) = self.sims.try_remove(old)
                {
                    let _ = self.poll.registry().deregister(&mut sim.stream);
                }
            }
            self.run_until(Duration::from_millis(5), |_| false);
        }
        for key in extra {
            if let Some(mut sim) = self.sims.try_remove(key) {
                let _ = self.poll.registry().deregister(&mut sim.stream);
            }
        }
        joined
    }

    /// Makes every burst peer follow probe `key`, as a downloader follows
    /// its sources: the probe shares a file and every burst peer asks who
    /// has it. Above the full-list limit, only such followers hear of a
    /// departure at once (everyone else gets the count with its next ping).
    fn follow(&mut self, key: usize) {
        let name = wire::FileName::new(&format!("probe-{key}")).expect("a valid name");
        let file = wire::FileSummary {
            name: name.clone(),
            size: 1,
            root: wire::Hash([7; 32]),
        };
        if let Some(sim) = self.sims.get_mut(key) {
            let files = vec![file];
            wire::encode(&Message::ShareFiles { files }, &mut sim.wbuf);
        }
        self.flush(key);
        // The share goes first on its own connection; give it a moment.
        self.run_until(Duration::from_millis(200), |_| false);
        let askers: Vec<usize> = self
            .sims
            .iter()
            .filter(|(_, s)| s.burst && s.id.is_some())
            .map(|(k, _)| k)
            .collect();
        for &k in &askers {
            let sim = &mut self.sims[k];
            sim.answered = false;
            let name = name.clone();
            wire::encode(&Message::WhoHas { name }, &mut sim.wbuf);
            self.flush(k);
        }
        let answered = |g: &Gen| {
            askers
                .iter()
                .all(|&k| g.sims.get(k).is_none_or(|s| s.answered))
        };
        if !self.run_until(Duration::from_secs(30), answered) {
            eprintln!("not every peer got its Holders answer");
        }
    }

    /// Every burst peer that is in holds every burst peer that is in (or,
    /// above the full-list limit, has the right count).
    fn converged(&self) -> bool {
        let members = self.members();
        self.sims.iter().all(|(_, s)| {
            !s.burst || s.id.is_none() || s.count == members || s.total == Some(members as u32)
        })
    }

    fn members(&self) -> usize {
        self.sims
            .iter()
            .filter(|(_, s)| s.burst && s.id.is_some())
            .count()
    }

    fn converged_count(&self) -> usize {
        let members = self.members();
        self.sims
            .iter()
            .filter(|(_, s)| {
                s.burst && s.id.is_some() && (s.count == members || s.total == Some(members as u32))
            })
            .count()
    }

    fn reset_seen(&mut self) {
        for (_, s) in self.sims.iter_mut() {
            s.seen_at = None;
        }
        // Every peer the manager counts now: the burst and any probe still in.
        self.baseline = self.sims.iter().filter(|(_, s)| s.id.is_some()).count() as u32;
    }

    fn all_seen(&self) -> bool {
        self.sims
            .iter()
            .all(|(_, s)| !s.burst || s.seen_at.is_some())
    }

    fn spread(&self, start: Instant) -> Spread {
        let mut times: Vec<f64> = self
            .sims
            .iter()
            .filter(|(_, s)| s.burst)
            .filter_map(|(_, s)| {
                s.seen_at
                    .map(|t| t.saturating_duration_since(start).as_secs_f64())
            })
            .collect();
        let of = self.sims.iter().filter(|(_, s)| s.burst).count();
        times.sort_by(f64::total_cmp);
        let at = |q: f64| -> f64 {
            if times.is_empty() {
                return f64::NAN;
            }
            times[((times.len() as f64 * q).ceil() as usize).clamp(1, times.len()) - 1]
        };
        Spread {
            p50: at(0.5),
            p99: at(0.99),
            max: times.last().copied().unwrap_or(f64::NAN),
            learned: times.len(),
            of,
        }
    }
}

fn insert(sim: &mut Sim, id: PeerId) {
    let i = id.0 as usize;
    if i >= sim.view.len() {
        sim.view.grow((i + 1).next_power_of_two());
    }
    if !sim.view.put(i) {
        sim.count += 1;
    }
}

/// The process's user + system CPU seconds (/proc/PID/stat fields 14, 15).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces: count from its ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 overall are 11 and 12 after the ')'; /proc counts
    // in USER_HZ, which is 100 on Linux whatever the kernel's own HZ.
    (ticks(11) + ticks(12)) / 100.0
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn scrape(addr: SocketAddr) -> io::Result<String> {
    let mut s = StdStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: loadgen\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
