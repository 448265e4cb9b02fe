//! The one connection driver every shell uses: a nonblocking TCP connection
//! with a frame-aware read buffer and a bounded write buffer, following mio's
//! edge-triggered rules (reads and writes run until `WouldBlock` or a per-turn
//! budget; WRITABLE interest only while there are bytes to send), and the read
//! loop written once ([`Conn::read_frames`]): fill, decode each frame under
//! the state's [`Accept`] limits, hand it to the core, hold reads while our
//! replies pile up unread, and end with a typed [`CloseReason`].

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use super::noise::{self, Handshake, HandshakeError, Keys, Step, Transport};
use crate::metrics::FrameStats;
use crate::wire::{self, Accept, DecodeError, ErrorCode, HEADER_LEN, Message, PeerKey};

/// A sealed connection's handshake must be done within this, or it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a keyed side answers, in the clear, to a peer that has no key.
pub const NEEDS_KEY: &str = "this network needs a key: --key or SHOAL_KEY";

/// How a read or write pass over the socket ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// The socket has nothing more for us now; wait for the next event.
    WouldBlock,
    /// The per-turn budget ran out with data still waiting: revisit this
    /// connection on the next turn, since no new edge will announce it.
    Budget,
    /// The other side closed its end (read) or everything was sent (write).
    Done,
}

/// Default room kept free at the end of the read buffer beyond the frame at
/// its front: enough for the small frames of control and serving links.
const READ_CHUNK: usize = 64 << 10;

/// Sent bytes at the front of the write buffer beyond this are dropped.
const COMPACT_WRITES_ABOVE: usize = 64 << 10;

/// An empty read or write buffer larger than this is freed.
const SHRINK_ABOVE: usize = 1 << 20;

/// Requests are not read from a connection while more than this of our
/// replies to it waits unsent: a client that does not read cannot make us
/// queue more (backpressure; see docs/SECURITY.md).
const HOLD_READS_ABOVE: usize = 256 << 10;

/// What a frame handler tells the read loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on with the next frame.
    Continue,
    /// Go on, accepting what the new state allows from the next frame on.
    Expect(Accept),
    /// Stop decoding for now: the core has output for this connection that
    /// the shell should queue first (the connection is revisited next turn,
    /// and held there if the output is not being read).
    Yield,
    /// The core is done with this connection; stop reading it.
    Close,
}

/// Why the read loop ended a connection.
#[derive(Debug)]
pub enum CloseReason {
    /// The other end closed its side.
    PeerClosed,
    Io(io::Error),
    /// A frame that does not decode or is wrong for the state; an error
    /// frame saying so is already queued.
    BadFrame(DecodeError),
    /// The frame handler's core closed it (and logged why).
    Handler,
    /// The Noise handshake failed: no or another network key.
    Handshake(HandshakeError),
    /// A sealed message did not authenticate (changed in transit).
    Tampered(noise::OpenError),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::PeerClosed => f.write_str("closed by the other end"),
            CloseReason::Io(e) => write!(f, "connection error: {e}"),
            CloseReason::BadFrame(e) => write!(f, "bad frame: {e}"),
            CloseReason::Handler => f.write_str("closed by us"),
            CloseReason::Handshake(e) => e.fmt(f),
            CloseReason::Tampered(e) => e.fmt(f),
        }
    }
}

/// How a read pass left the connection.
#[derive(Debug)]
pub enum ReadEnd {
    /// Still open. With `revisit`, bytes may be waiting that no new edge
    /// will announce: read again next turn.
    Open {
        revisit: bool,
    },
    /// The Noise handshake just finished and proved the other side's static
    /// key. No frame was decoded yet: the shell checks the key (or tells its
    /// core), flushes (the handshake's last message and any frames queued
    /// meanwhile wait), and reads again.
    Authenticated(PeerKey),
    Closed(CloseReason),
}

/// How a sealed read pass ended early.
enum SealedEnd {
    Authenticated(PeerKey),
    Closed(CloseReason),
}

/// Below this much spare room, compact or grow before reading again.
const MIN_READ: usize = 16 << 10;

pub struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    /// Allocated (and zeroed) once per growth; `read_start..read_end` is unread.
    read_buf: Vec<u8>,
    read_start: usize,
    read_end: usize,
    /// Spare room wanted per read; see [`Conn::set_read_chunk`].
    read_chunk: usize,
    /// Give the buffers back whenever they empty: see
    /// [`Conn::set_release_idle_buffers`].
    release_idle: bool,
    write_buf: Vec<u8>,
    write_start: usize,
    /// Chunk payloads to send straight from files, each after the buffer
    /// bytes before its position `at`.
    file_segments: VecDeque<FileSegment>,
    interest: Interest,
    /// What the next frame may be; see [`Conn::read_frames`].
    accept: Accept,
    /// Reads were held back (backpressure, or the shell asked): once that
    /// ends, the shell must read again, since no new edge may come.
    reads_held: bool,
    /// The shell holds reads (e.g. while it streams a big reply).
    hold_reads: bool,
    /// Set on a sealed connection (a network key is in use).
    sealed: Option<Box<Sealed>>,
    /// Where frame bytes are counted by kind (`--metrics`), if anywhere.
    stats: Option<Rc<FrameStats>>,
}

/// A sealed connection's state: the socket carries Noise messages, the
/// read and write buffers above hold what they seal.
struct Sealed {
    phase: Phase,
    /// Raw bytes from the socket not yet opened; `cin_start..cin_end`.
    cin: Vec<u8>,
    cin_start: usize,
    cin_end: usize,
    /// Plaintext frames queued and not yet sealed into `write_buf`.
    plain_out: Vec<u8>,
    /// Until the handshake is done.
    deadline: Instant,
    /// A queued chunk could not be read from its file; the next flush fails.
    broken: Option<io::Error>,
}

enum Phase {
    Handshake(Box<Handshake>),
    /// Handshake done and reported to the shell ([`ReadEnd::Authenticated`]).
    Open(Box<Transport>),
    /// Done but not yet reported: the transport waits here.
    JustDone(Box<Transport>),
    /// Failed; nothing more is read or sent.
    Failed,
}

impl Conn {
    pub fn new(stream: TcpStream, peer: SocketAddr) -> Conn {
        Conn {
            stream,
            peer,
            read_buf: Vec::new(),
            read_start: 0,
            read_end: 0,
            read_chunk: READ_CHUNK,
            release_idle: false,
            write_buf: Vec::new(),
            write_start: 0,
            file_segments: VecDeque::new(),
            interest: Interest::READABLE,
            accept: wire::accept::PEER_BEFORE_HELLO,
            reads_held: false,
            hold_reads: false,
            sealed: None,
            stats: None,
        }
    }

    /// Counts every frame decoded or queued on this connection into
    /// `stats`, by kind (one add per frame).
    pub fn set_frame_stats(&mut self, stats: Rc<FrameStats>) {
        self.stats = Some(stats);
    }

    /// Makes this a sealed connection: a Noise handshake keyed by `keys`
    /// runs first (we start it if `initiator`), then every frame is sealed.
    /// Frames queued before it is done wait for it. It must be done by
    /// `now` + [`HANDSHAKE_TIMEOUT`]: see [`Conn::handshake_deadline`].
    pub fn seal(&mut self, keys: &Keys, initiator: bool, now: Instant) {
        let started = if initiator {
            Handshake::initiator(keys, &mut self.write_buf)
        } else {
            Handshake::responder(keys)
        };
        let phase = match started {
            Ok(hs) => Phase::Handshake(Box::new(hs)),
            Err(e) => {
                log::error!("{}: {e}", self.peer);
                Phase::Failed
            }
        };
        self.sealed = Some(Box::new(Sealed {
            phase,
            cin: Vec::new(),
            cin_start: 0,
            cin_end: 0,
            plain_out: Vec::new(),
            deadline: now + HANDSHAKE_TIMEOUT,
            broken: None,
        }));
    }

    /// While a sealed connection's handshake runs: when it must be done.
    /// The shell closes the connection past it (the other side stalled).
    pub fn handshake_deadline(&self) -> Option<Instant> {
        match &self.sealed {
            Some(s) if matches!(s.phase, Phase::Handshake(_)) => Some(s.deadline),
            _ => None,
        }
    }

    /// The static key the other side's handshake proved, once done.
    pub fn remote_key(&self) -> Option<PeerKey> {
        match self.sealed.as_deref()?.phase {
            Phase::Open(ref t) | Phase::JustDone(ref t) => Some(t.remote_key()),
            _ => None,
        }
    }

    /// Opens a nonblocking connection to `addr`, registered for both
    /// readiness kinds: WRITABLE reports whether the connect succeeded
    /// ([`Conn::is_connected`]).
    pub fn connect(
        addr: SocketAddr,
        registry: &Registry,
        token: Token,
        accept: Accept,
    ) -> io::Result<Conn> {
        let mut stream = TcpStream::connect(addr)?;
        let _ = stream.set_nodelay(true);
        let interest = Interest::READABLE | Interest::WRITABLE;
        registry.register(&mut stream, token, interest)?;
        let mut conn = Conn::new_registered(stream, addr, interest);
        conn.accept = accept;
        Ok(conn)
    }

    /// Sets what the next frames may be (the state's limits).
    pub fn set_accept(&mut self, accept: Accept) {
        self.accept = accept;
    }

    /// Holds or releases reads at the shell's request (e.g. while a big
    /// reply is streamed). After a release, call [`Conn::read_frames`]
    /// again: bytes may be waiting that no new edge will announce.
    pub fn set_hold_reads(&mut self, hold: bool) {
        self.hold_reads = hold;
    }

    /// Reads were held and may go on now: the shell should read again.
    pub fn should_resume_reading(&self) -> bool {
        self.reads_held && !self.holding()
    }

    fn holding(&self) -> bool {
        self.hold_reads || self.pending_write_bytes() > HOLD_READS_ABOVE
    }

    /// The read loop, written once for every connection: reads what the
    /// socket has (within the per-turn budget, and not while our replies to
    /// it pile up unread), decodes each frame under the connection's current
    /// [`Accept`], and hands it to `on_frame`. A bad frame queues an error
    /// frame naming the problem and ends the connection.
    pub fn read_frames(&mut self, mut on_frame: impl FnMut(Message<'_>) -> Flow) -> ReadEnd {
        if self.holding() {
            self.reads_held = true;
            return ReadEnd::Open { revisit: false };
        }
        self.reads_held = false;
        let mut budget = super::READ_BUDGET;
        // One round per call: read (or, sealed, open) until a read chunk
        // that starts with a whole frame is buffered, decode it, and return
        // with `revisit` if more may be waiting. The buffer stays small
        // however much the socket holds, and the shell acts on what the
        // frames asked for (new requests) before the next round.
        let status = if self.sealed.is_some() {
            match self.fill_sealed(&mut budget) {
                Ok(status) => Ok(status),
                Err(SealedEnd::Authenticated(key)) => return ReadEnd::Authenticated(key),
                Err(SealedEnd::Closed(why)) => return ReadEnd::Closed(why),
            }
        } else {
            self.fill(&mut budget)
        };
        loop {
            let decoded = self
                .accept
                .decode(&self.read_buf[self.read_start..self.read_end]);
            let (msg, used) = match decoded {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    self.send(&Message::Error {
                        code: e.error_code(),
                        reason: e.to_string(),
                    });
                    return ReadEnd::Closed(CloseReason::BadFrame(e));
                }
            };
            if let Some(stats) = &self.stats
                && let Some(&kind) = self.read_buf.get(self.read_start + 4)
            {
                stats.add_in(kind, used);
            }
            let flow = on_frame(msg);
            self.consume(used);
            match flow {
                Flow::Continue => {}
                Flow::Expect(accept) => self.accept = accept,
                Flow::Yield => return ReadEnd::Open { revisit: true },
                Flow::Close => return ReadEnd::Closed(CloseReason::Handler),
            }
        }
        if self.release_idle && self.read_start == self.read_end {
            self.read_buf = Vec::new();
            (self.read_start, self.read_end) = (0, 0);
        }
        match status {
            Ok(IoStatus::WouldBlock) => ReadEnd::Open { revisit: false },
            Ok(IoStatus::Budget) => ReadEnd::Open { revisit: true },
            Ok(IoStatus::Done) => ReadEnd::Closed(CloseReason::PeerClosed),
            Err(e) => ReadEnd::Closed(CloseReason::Io(e)),
        }
    }

    /// Flushes once more, then deregisters and closes (the one way every
    /// shell ends a connection; deregistering comes before the slab removal
    /// the caller does, as mio asks).
    pub fn close(mut self, registry: &Registry) {
        self.deregister(registry);
        self.flush_and_close();
    }

    /// A connection whose stream the caller already registered with
    /// `interest` (an outgoing connect waits for WRITABLE to learn the result).
    pub fn new_registered(stream: TcpStream, peer: SocketAddr, interest: Interest) -> Conn {
        Conn {
            interest,
            ..Conn::new(stream, peer)
        }
    }

    /// Reads up to about this much at a time (the buffer holds the frame at
    /// its front plus this). Bulk receivers want more per read; every byte
    /// of it is resident, so small links keep the default.
    pub fn set_read_chunk(&mut self, bytes: usize) {
        self.read_chunk = bytes.max(MIN_READ);
    }

    /// Frees the read buffer whenever every byte in it was decoded, and the
    /// write buffer whenever it drained, so an idle connection holds no
    /// buffer at all. For the manager's thousands of mostly idle members
    /// (a ping, a pong, a delta now and then): a read chunk kept per member
    /// was 64 KiB x 19,900 = 1.2 GiB; allocating it per read costs little
    /// next to the syscall.
    pub fn set_release_idle_buffers(&mut self, release: bool) {
        self.release_idle = release;
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    pub fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        self.interest = self.wanted_interest();
        registry.register(&mut self.stream, token, self.interest)
    }

    pub fn deregister(&mut self, registry: &Registry) {
        // Deregistering a socket mio already dropped from epoll is harmless.
        let _ = registry.deregister(&mut self.stream);
    }

    fn wanted_interest(&self) -> Interest {
        if self.has_pending_writes() {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Re-registers only when the wanted interest changed: one epoll_ctl per
    /// transition between "idle" and "sending", not one per event.
    pub fn sync_interest(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let wanted = self.wanted_interest();
        if wanted != self.interest {
            self.interest = wanted;
            registry.reregister(&mut self.stream, token, wanted)?;
        }
        Ok(())
    }

    /// Reads until `WouldBlock`, EOF, `budget` bytes (taken off it), or a
    /// read chunk of bytes that starts with a whole frame (`Budget`: decode
    /// them, then read on).
    fn fill(&mut self, budget: &mut usize) -> io::Result<IoStatus> {
        while *budget > 0 {
            if self.holds_a_read_chunk() || !self.make_room() {
                // Full of complete frames: the caller decodes them, then
                // revisits us (no new edge will come for bytes still queued).
                return Ok(IoStatus::Budget);
            }
            match self.stream.read(&mut self.read_buf[self.read_end..]) {
                Ok(0) => return Ok(IoStatus::Done),
                Ok(n) => {
                    self.read_end += n;
                    *budget = budget.saturating_sub(n);
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(IoStatus::WouldBlock),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                },
            }
        }
        Ok(IoStatus::Budget)
    }

    /// Makes spare room after the buffered bytes; false if there is none
    /// because the buffer already holds complete frames to decode first.
    /// The buffer grows only to fit the frame at its front (plus a read's
    /// worth), whose length `peek_header` checked against the kind's limit.
    /// The unread tail moves to the front only when the end is reached.
    fn make_room(&mut self) -> bool {
        self.make_room_for(MIN_READ)
    }

    /// [`Conn::make_room`] for at least `min` bytes of spare room.
    fn make_room_for(&mut self, min: usize) -> bool {
        if self.read_buf.len() - self.read_end >= min {
            return true;
        }
        if self.read_start > 0 {
            self.read_buf.copy_within(self.read_start..self.read_end, 0);
            self.read_end -= self.read_start;
            self.read_start = 0;
        }
        let frame_len = match self.accept.check_header(&self.read_buf[..self.read_end]) {
            Ok(Some((_, body))) => HEADER_LEN + body,
            // A bad header is reported by the decoder; just read a little.
            _ => HEADER_LEN,
        };
        // Room for the frame at the front plus a read's worth, but grown
        // only as bytes arrive (at most doubling what is buffered): a header
        // that announces megabytes and then goes quiet costs one read's worth.
        // A sealed connection opens one message (`min`) at a time and stops
        // at a read chunk of plaintext (see `holds_a_read_chunk`).
        let spare = if self.sealed.is_some() {
            min
        } else {
            self.read_chunk
        };
        let want = frame_len.max(self.read_chunk) + spare;
        let grown = (2 * self.read_end).max(self.read_chunk + MIN_READ);
        let want = want.min(grown).max(self.read_end + min);
        if self.read_buf.len() < want {
            self.read_buf.resize(want, 0);
        }
        self.read_buf.len() - self.read_end >= min
    }

    /// [`Conn::fill`] for a sealed connection: reads Noise messages into
    /// `cin`, runs the handshake on them, then opens each transport message
    /// into the read buffer, where `read_frames` decodes frames as usual.
    /// Takes what it reads off `budget`.
    fn fill_sealed(&mut self, budget: &mut usize) -> Result<IoStatus, SealedEnd> {
        loop {
            self.open_sealed()?;
            if *budget == 0 {
                return Ok(IoStatus::Budget);
            }
            // open_sealed stops with a whole message left only when the
            // read buffer holds its cap of frames to decode first.
            let Some(sealed) = self.sealed.as_deref_mut() else {
                return Ok(IoStatus::Budget);
            };
            let buffered = &sealed.cin[sealed.cin_start..sealed.cin_end];
            if Transport::peek(buffered).is_some_and(|len| buffered.len() >= len) {
                return Ok(IoStatus::Budget);
            }
            // Make room for one whole message after what is buffered.
            if sealed.cin_start > 0 {
                sealed.cin.copy_within(sealed.cin_start..sealed.cin_end, 0);
                sealed.cin_end -= sealed.cin_start;
                sealed.cin_start = 0;
            }
            // Room for the whole message at the front, or for a read's
            // worth: half a read chunk, so a serving link (small requests)
            // keeps 32 KiB and a bulk source 128 KiB, two whole messages.
            let want = match sealed.phase {
                Phase::Handshake(_) => noise::LEN_PREFIX + noise::MAX_HANDSHAKE_MESSAGE,
                _ => {
                    let front = Transport::peek(&sealed.cin[..sealed.cin_end]).unwrap_or(0);
                    let read = (self.read_chunk / 2)
                        .clamp(MIN_READ, 2 * (noise::LEN_PREFIX + noise::MAX_MESSAGE));
                    front.max(read)
                }
            };
            if sealed.cin.len() < want {
                sealed.cin.resize(want, 0);
            }
            match self.stream.read(&mut sealed.cin[sealed.cin_end..]) {
                Ok(0) => {
                    if let Phase::Handshake(_) = sealed.phase {
                        sealed.phase = Phase::Failed;
                        return Err(SealedEnd::Closed(CloseReason::Handshake(
                            HandshakeError::Closed,
                        )));
                    }
                    return Ok(IoStatus::Done);
                }
                Ok(n) => {
                    sealed.cin_end += n;
                    *budget = budget.saturating_sub(n);
                }
                Err(e) => match e.kind() {
                    io::ErrorKind::WouldBlock => return Ok(IoStatus::WouldBlock),
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(SealedEnd::Closed(CloseReason::Io(e))),
                },
            }
        }
    }

    /// Runs the handshake on, or opens, the whole messages in `cin`.
    fn open_sealed(&mut self) -> Result<(), SealedEnd> {
        let Some(mut sealed) = self.sealed.take() else {
            return Ok(());
        };
        let result = self.open_sealed_in(&mut sealed);
        self.sealed = Some(sealed);
        result
    }

    fn open_sealed_in(&mut self, sealed: &mut Sealed) -> Result<(), SealedEnd> {
        loop {
            let buffered = &sealed.cin[sealed.cin_start..sealed.cin_end];
            match std::mem::replace(&mut sealed.phase, Phase::Failed) {
                Phase::Failed => {
                    return Err(SealedEnd::Closed(CloseReason::Handshake(
                        HandshakeError::Closed,
                    )));
                }
                Phase::JustDone(t) => {
                    let key = t.remote_key();
                    sealed.phase = Phase::Open(t);
                    return Err(SealedEnd::Authenticated(key));
                }
                Phase::Handshake(hs) => {
                    let written = self.write_buf.len();
                    match hs.feed(buffered, &mut self.write_buf) {
                        Ok((Step::More { used }, Some(hs))) => {
                            sealed.cin_start += used;
                            sealed.phase = Phase::Handshake(hs);
                            if self.write_buf.len() > written {
                                // Our next handshake message (tens of bytes
                                // into an idle socket): sent now, since no
                                // shell flushes a connection that decoded
                                // no frame. Whatever does not fit waits for
                                // the next flush.
                                let _ = self
                                    .stream
                                    .write(&self.write_buf[self.write_start..])
                                    .map(|n| self.write_start += n);
                            }
                            return Ok(());
                        }
                        Ok((Step::Done { used, transport }, _)) => {
                            sealed.cin_start += used;
                            sealed.phase = Phase::JustDone(transport);
                        }
                        Ok((Step::More { .. }, None)) => {
                            return Err(SealedEnd::Closed(CloseReason::Handshake(
                                HandshakeError::Closed,
                            )));
                        }
                        Err(e) => {
                            if let HandshakeError::Plaintext { reason: None } = e {
                                // A peer without a key: say so in its own
                                // terms, in the clear (it learns only that
                                // this network is keyed).
                                self.write_buf.truncate(written);
                                wire::encode(
                                    &Message::Error {
                                        code: ErrorCode::Incompatible,
                                        reason: NEEDS_KEY.to_string(),
                                    },
                                    &mut self.write_buf,
                                );
                            }
                            return Err(SealedEnd::Closed(CloseReason::Handshake(e)));
                        }
                    }
                }
                Phase::Open(mut t) => {
                    let whole = Transport::peek(buffered).filter(|&l| buffered.len() >= l);
                    let Some(len) = whole.filter(|_| !self.holds_a_read_chunk()) else {
                        sealed.phase = Phase::Open(t);
                        return Ok(());
                    };
                    let plain = len - noise::LEN_PREFIX;
                    // Room for the plaintext (at most the message's length).
                    if !self.make_room_for(plain) {
                        sealed.phase = Phase::Open(t);
                        return Ok(());
                    }
                    let at = sealed.cin_start;
                    let opened = t.open(
                        &sealed.cin[at..at + len],
                        &mut self.read_buf[self.read_end..],
                    );
                    match opened {
                        Ok(n) => {
                            self.read_end += n;
                            sealed.cin_start += len;
                            if sealed.cin_start == sealed.cin_end {
                                sealed.cin_start = 0;
                                sealed.cin_end = 0;
                            }
                            sealed.phase = Phase::Open(t);
                        }
                        Err(e) => return Err(SealedEnd::Closed(CloseReason::Tampered(e))),
                    }
                }
            }
        }
    }

    /// Whether the read buffer holds enough to decode before more is read
    /// (or, sealed, opened) into it: a read chunk's worth that starts with
    /// a whole frame (a bigger frame is read until it is whole).
    fn holds_a_read_chunk(&self) -> bool {
        let buffered = &self.read_buf[self.read_start..self.read_end];
        if buffered.len() < self.read_chunk {
            return false;
        }
        match self.accept.check_header(buffered) {
            Ok(Some((_, body))) => buffered.len() >= HEADER_LEN + body,
            Ok(None) => false,
            // The decoder reports it.
            Err(_) => true,
        }
    }

    fn consume(&mut self, n: usize) {
        self.read_start += n;
        if self.read_start == self.read_end {
            self.read_start = 0;
            self.read_end = 0;
            // A big frame (a manifest) grew the buffer; give it back rather
            // than hold megabytes for the rest of the connection's life.
            if self.read_buf.len() > SHRINK_ABOVE {
                self.read_buf = Vec::new();
            }
        }
    }

    /// Where frames are queued: the write buffer itself, or on a sealed
    /// connection the plaintext waiting to be sealed into it.
    fn out_buf(&mut self) -> &mut Vec<u8> {
        match self.sealed.as_deref_mut() {
            Some(s) => &mut s.plain_out,
            None => &mut self.write_buf,
        }
    }

    /// Queues one frame for sending.
    pub fn send(&mut self, msg: &Message<'_>) {
        let before = self.queued().len();
        wire::encode(msg, self.out_buf());
        self.count_out(before);
    }

    /// Queues one frame that `encode` appends to the write buffer itself
    /// (a manifest encoded straight from borrowed hashes).
    pub fn send_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        let before = self.queued().len();
        encode(self.out_buf());
        self.count_out(before);
    }

    /// Queues one frame encoded already (a broadcast encodes each frame
    /// once and hands every member the same bytes).
    pub fn send_encoded(&mut self, frame: &[u8]) {
        let before = self.queued().len();
        self.out_buf().extend_from_slice(frame);
        self.count_out(before);
    }

    /// What [`Conn::out_buf`] holds.
    fn queued(&self) -> &[u8] {
        match self.sealed.as_deref() {
            Some(s) => &s.plain_out,
            None => &self.write_buf,
        }
    }

    /// Counts the frame queued at `before` in the frame stats, if any.
    fn count_out(&self, before: usize) {
        if let Some(stats) = &self.stats {
            let queued = self.queued();
            if let Some(&kind) = queued.get(before + 4) {
                stats.add_out(kind, queued.len() - before);
            }
        }
    }

    /// Queues a chunk frame whose payload is sent from `file` by the kernel
    /// (`sendfile`), never copied through our memory: the header goes into
    /// the write buffer, the payload follows it on the wire.
    /// On a sealed connection the payload is read into the plaintext
    /// buffer (reused, so no allocation per chunk) and sealed with it.
    pub fn send_chunk_from_file(&mut self, index: u32, file: Rc<File>, offset: u64, len: u32) {
        if let Some(stats) = &self.stats {
            stats.add_out(wire::kind::CHUNK, HEADER_LEN + 4 + len as usize);
        }
        if let Some(sealed) = self.sealed.as_deref_mut() {
            let out = &mut sealed.plain_out;
            wire::encode_chunk_header(index, len, out);
            let at = out.len();
            out.resize(at + len as usize, 0);
            if let Err(e) = file.read_exact_at(&mut out[at..], offset) {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "shared file shrank while a chunk of it was being sent",
                    )
                } else {
                    e
                };
                sealed.broken.get_or_insert(e);
            }
            return;
        }
        wire::encode_chunk_header(index, len, &mut self.write_buf);
        self.file_segments.push_back(FileSegment {
            at: self.write_buf.len(),
            file,
            offset,
            left: len as usize,
        });
    }

    /// Bytes queued and not yet sent (buffer and file payloads).
    pub fn pending_write_bytes(&self) -> usize {
        let from_files: usize = self.file_segments.iter().map(|s| s.left).sum();
        let unsealed = self.sealed.as_deref().map_or(0, |s| s.plain_out.len());
        self.write_buf.len() - self.write_start + from_files + unsealed
    }

    pub fn has_pending_writes(&self) -> bool {
        self.pending_write_bytes() > 0
    }

    /// Writes until everything queued is sent or the socket would block.
    /// Buffer bytes and file payloads go out in the order they were queued.
    pub fn flush(&mut self) -> io::Result<IoStatus> {
        if let Some(sealed) = self.sealed.as_deref_mut() {
            if let Some(e) = sealed.broken.take() {
                return Err(e);
            }
            if let Phase::Open(t) = &mut sealed.phase
                && !sealed.plain_out.is_empty()
            {
                t.seal(&sealed.plain_out, &mut self.write_buf);
                sealed.plain_out.clear();
                if sealed.plain_out.capacity() > SHRINK_ABOVE {
                    sealed.plain_out = Vec::new();
                }
            }
        }
        loop {
            let buffered_until = self
                .file_segments
                .front()
                .map_or(self.write_buf.len(), |seg| seg.at);
            let result = if self.write_start < buffered_until {
                self.stream
                    .write(&self.write_buf[self.write_start..buffered_until])
                    .map(|n| self.write_start += n)
            } else if let Some(seg) = self.file_segments.front_mut() {
                let sent = send_file_segment(&self.stream, seg);
                if seg.left == 0 {
                    self.file_segments.pop_front();
                }
                sent
            } else {
                break;
            };
            if let Err(e) = result {
                match e.kind() {
                    io::ErrorKind::WouldBlock => {
                        self.compact_write_buf();
                        return Ok(IoStatus::WouldBlock);
                    }
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
        }
        self.write_buf.clear();
        self.write_start = 0;
        // A big frame (a manifest) grew it: give the memory back.
        if self.write_buf.capacity() > SHRINK_ABOVE || self.release_idle {
            self.write_buf = Vec::new();
        }
        Ok(IoStatus::Done)
    }

    /// Drops the bytes already sent once they are many: on a link slower
    /// than the requests, the buffer never empties completely, and without
    /// this it would keep everything ever sent.
    fn compact_write_buf(&mut self) {
        if self.write_start < COMPACT_WRITES_ABOVE {
            return;
        }
        self.write_buf.drain(..self.write_start);
        for seg in &mut self.file_segments {
            seg.at -= self.write_start;
        }
        self.write_start = 0;
    }

    /// Best effort: push out what is queued (an error frame, a goodbye)
    /// before the connection is dropped. Never blocks.
    pub fn flush_and_close(&mut self) {
        let _ = self.flush();
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Turns a connection away over a limit: a `Busy` error frame, then close.
    pub fn refuse_busy(mut self, reason: String) {
        log::debug!("refusing {}: {reason}", self.peer);
        self.send(&Message::Error {
            code: crate::wire::ErrorCode::Busy,
            reason,
        });
        self.flush_and_close();
    }

    /// Whether a nonblocking connect finished: `Ok(true)` once connected.
    pub fn is_connected(&self) -> io::Result<bool> {
        if let Some(e) = self.stream.take_error()? {
            return Err(e);
        }
        match self.stream.peer_addr() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Part of a file still to be sent, after `at` bytes of the write buffer.
struct FileSegment {
    at: usize,
    file: Rc<File>,
    offset: u64,
    left: usize,
}

/// One `sendfile(2)` call: page cache to socket, no copy through user space.
fn send_file_segment(stream: &TcpStream, seg: &mut FileSegment) -> io::Result<()> {
    let mut offset = seg.offset;
    let n = rustix::fs::sendfile(stream, &*seg.file, Some(&mut offset), seg.left.min(1 << 30))?;
    if n == 0 {
        // The file shrank under us: the frame cannot be completed.
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "shared file shrank while a chunk of it was being sent",
        ));
    }
    seg.offset += n as u64;
    seg.left -= n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// A connected pair: our `Conn` and the plain socket at the other end,
    /// with small fixed kernel buffers so our own buffer is what fills up.
    fn pair() -> (Conn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        // Fixed sizes also stop the kernel autotuning them.
        rustix::net::sockopt::set_socket_recv_buffer_size(&client, 64 << 10).unwrap();
        let (server, _) = listener.accept().unwrap();
        rustix::net::sockopt::set_socket_send_buffer_size(&server, 64 << 10).unwrap();
        server.set_nonblocking(true).unwrap();
        (Conn::new(TcpStream::from_std(server), addr), client)
    }

    /// Two sealed ends of one loopback connection, handshake done.
    /// Two ends of a loopback connection, not sealed.
    fn open_pair() -> (Conn, Conn) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.set_nonblocking(true).unwrap();
        server.set_nonblocking(true).unwrap();
        (
            Conn::new(TcpStream::from_std(client), addr),
            Conn::new(TcpStream::from_std(server), addr),
        )
    }

    fn sealed_pair() -> (Conn, Conn) {
        let (mut a, mut b) = open_pair();
        let keys = || Keys {
            network: noise::NetworkKey::from_bytes([9; 32]),
            identity: noise::Identity::generate().unwrap(),
        };
        let now = Instant::now();
        a.seal(&keys(), true, now);
        b.seal(&keys(), false, now);
        let (mut a_done, mut b_done) = (false, false);
        for _ in 0..10_000 {
            if a_done && b_done {
                return (a, b);
            }
            a.flush().unwrap();
            b.flush().unwrap();
            for (conn, done) in [(&mut a, &mut a_done), (&mut b, &mut b_done)] {
                match conn.read_frames(|_| Flow::Continue) {
                    ReadEnd::Authenticated(_) => *done = true,
                    ReadEnd::Closed(why) => panic!("handshake: {why}"),
                    ReadEnd::Open { .. } => {}
                }
            }
        }
        panic!("no handshake");
    }

    #[test]
    fn a_sealed_reader_opens_a_read_chunk_at_a_time_however_much_is_waiting() {
        let (a, b) = sealed_pair();
        reads_a_read_chunk_at_a_time(a, b);
    }

    #[test]
    fn an_open_reader_reads_a_read_chunk_at_a_time_however_much_is_waiting() {
        let (a, b) = open_pair();
        reads_a_read_chunk_at_a_time(a, b);
    }

    #[test]
    fn an_idle_connection_that_releases_its_buffers_holds_none() {
        let (mut a, mut b) = open_pair();
        b.set_release_idle_buffers(true);
        b.set_accept(crate::wire::accept::MANAGER_CLIENT);
        a.send(&Message::Ping { nonce: 7 });
        a.flush().unwrap();
        let mut got = None;
        for _ in 0..10_000 {
            let end = b.read_frames(|m| {
                got = Some(m.kind());
                Flow::Continue
            });
            assert!(!matches!(end, ReadEnd::Closed(_)));
            if got.is_some() {
                break;
            }
        }
        assert_eq!(got, Some(crate::wire::kind::PING));
        assert_eq!(
            b.read_buf.capacity(),
            0,
            "the read buffer is kept while idle"
        );
        b.send(&Message::Pong { nonce: 7 });
        b.flush().unwrap();
        assert_eq!(
            b.write_buf.capacity(),
            0,
            "the write buffer is kept once drained"
        );
    }

    /// 16 MB of frames sent at once reach `b` whole, while its read buffer
    /// stays within two read chunks.
    fn reads_a_read_chunk_at_a_time(mut a: Conn, mut b: Conn) {
        b.set_read_chunk(256 << 10);
        let frame = Message::Error {
            code: crate::wire::ErrorCode::Other,
            reason: "x".repeat(1000),
        };
        let frames = 16_000;
        for _ in 0..frames {
            a.send(&frame);
        }
        let (mut got, mut biggest) = (0, 0);
        for _ in 0..100_000 {
            if got == frames {
                break;
            }
            a.flush().unwrap();
            match b.read_frames(|_| {
                got += 1;
                Flow::Continue
            }) {
                ReadEnd::Closed(why) => panic!("{why}"),
                _ => biggest = biggest.max(b.read_buf.len()),
            }
        }
        assert_eq!(got, frames);
        assert!(
            biggest <= 512 << 10,
            "the read buffer grew to {biggest} bytes"
        );
    }

    #[test]
    fn a_never_empty_write_buffer_does_not_keep_what_was_sent() {
        let (mut conn, mut peer) = pair();
        peer.set_nonblocking(true).unwrap();
        let frame = Message::Error {
            code: crate::wire::ErrorCode::Other,
            reason: "x".repeat(1000),
        };
        let mut encoded = Vec::new();
        wire::encode(&frame, &mut encoded);
        let frame_len = encoded.len();
        // Fill the kernel's buffers until bytes wait in ours.
        while conn.pending_write_bytes() < 1 << 20 {
            conn.send(&frame);
            conn.flush().unwrap();
        }
        // Then each round queue 1000 frames and let the reader take all but
        // one: our buffer never empties, while 40 MB go through it.
        let mut buf = vec![0u8; 1 << 16];
        let mut got = 0usize;
        for _ in 0..40 {
            for _ in 0..1000 {
                conn.send(&frame);
            }
            let target = got + 999 * frame_len;
            while got < target {
                conn.flush().unwrap();
                let want = buf.len().min(target - got);
                match peer.read(&mut buf[..want]) {
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            conn.flush().unwrap();
            assert!(conn.has_pending_writes(), "the buffer never empties");
        }
        assert!(
            conn.write_buf.len() < 8 << 20,
            "write buffer kept {} bytes of history",
            conn.write_buf.len()
        );
    }
}
