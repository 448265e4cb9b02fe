//! A raw shoal protocol client, written from `docs/PROTOCOL.md` alone (it
//! does not use `shoal::wire`), so that a test can act as a hostile or broken
//! party: a peer that announces huge frames and goes quiet, a client that
//! never reads, a fake holder registered with the manager, or a fake serving
//! peer whose listening socket the test controls.
//!
//! Frames are `u32` BE length (kind + body), `u8` kind, body. Builders return
//! whole encoded frames; parsers take a frame's body.

use std::io::{self, Cursor, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use byteorder::{BigEndian, ReadBytesExt, WriteBytesExt};

/// Frame kinds (PROTOCOL.md section 4).
pub mod kind {
    pub const HELLO: u8 = 0x01;
    pub const ERROR: u8 = 0x02;
    pub const GOODBYE: u8 = 0x03;
    pub const PING: u8 = 0x04;
    pub const PONG: u8 = 0x05;
    pub const REGISTER: u8 = 0x10;
    pub const WELCOME: u8 = 0x11;
    pub const PEER_LIST: u8 = 0x12;
    pub const PEER_DELTA: u8 = 0x13;
    pub const SHARE_FILES: u8 = 0x14;
    pub const WHO_HAS: u8 = 0x15;
    pub const HOLDERS: u8 = 0x16;
    pub const LIST_FILES: u8 = 0x17;
    pub const FILE_LIST: u8 = 0x18;
    pub const LIST_PEERS: u8 = 0x19;
    pub const PEER_COUNT: u8 = 0x1a;
    pub const GET_MANIFEST: u8 = 0x20;
    pub const MANIFEST: u8 = 0x21;
    pub const GET_CHUNK: u8 = 0x22;
    pub const CHUNK: u8 = 0x23;
    pub const CANCEL: u8 = 0x24;
    pub const GET_HAVE_MAP: u8 = 0x25;
    pub const HAVE_MAP: u8 = 0x26;
    pub const HAVE: u8 = 0x27;
    pub const NO_CHUNK: u8 = 0x28;
}

/// Hello roles (section 3).
pub mod role {
    pub const MANAGER_CLIENT: u8 = 0x01;
    pub const MANAGER: u8 = 0x02;
    pub const PEER: u8 = 0x03;
}

/// Error codes (section 7).
pub mod code {
    pub const INCOMPATIBLE: u16 = 0x0001;
    pub const PROTOCOL: u16 = 0x0002;
    pub const NOT_FOUND: u16 = 0x0003;
    pub const OUT_OF_RANGE: u16 = 0x0004;
    pub const BUSY: u16 = 0x0005;
    pub const INTERNAL: u16 = 0x0006;
}

/// Largest bodies (section 1).
pub const MAX_CHUNK_BODY: u32 = 4 + (4 << 20);
pub const MAX_MANIFEST_BODY: u32 = 48 + 32 * (1 << 19);
pub const MAX_LIST_BODY: u32 = 8 << 20;
pub const MAX_SMALL_BODY: u32 = 4096;

pub const MAGIC: &[u8; 4] = b"SHOL";
pub const VERSION: u16 = 5;

pub type Hash = [u8; 32];

// ---------------------------------------------------------------- encoding

/// A whole frame: length, kind, body.
pub fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + body.len());
    out.write_u32::<BigEndian>(1 + body.len() as u32).unwrap();
    out.push(kind);
    out.extend_from_slice(body);
    out
}

/// Only the 5 header bytes of a frame announcing a body of `body_len`.
pub fn header(kind: u8, body_len: u32) -> [u8; 5] {
    let mut h = [0u8; 5];
    h[..4].copy_from_slice(&(body_len + 1).to_be_bytes());
    h[4] = kind;
    h
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.write_u16::<BigEndian>(s.len() as u16).unwrap();
    out.extend_from_slice(s.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.write_u16::<BigEndian>(a.port()).unwrap();
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.write_u16::<BigEndian>(a.port()).unwrap();
        }
    }
}

pub fn hello(role: u8) -> Vec<u8> {
    let mut b = MAGIC.to_vec();
    b.write_u16::<BigEndian>(VERSION).unwrap();
    b.push(role);
    frame(kind::HELLO, &b)
}

pub fn error(code: u16, reason: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u16::<BigEndian>(code).unwrap();
    put_str(&mut b, reason);
    frame(kind::ERROR, &b)
}

pub fn pong(nonce: u64) -> Vec<u8> {
    frame(kind::PONG, &nonce.to_be_bytes())
}

pub fn register(listen_port: u16, advertise: Option<SocketAddr>) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u16::<BigEndian>(listen_port).unwrap();
    put_addr(&mut b, advertise);
    frame(kind::REGISTER, &b)
}

/// One shared file as `ShareFiles` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub root: Hash,
}

pub fn share_files(files: &[FileEntry]) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u32::<BigEndian>(files.len() as u32).unwrap();
    for f in files {
        put_str(&mut b, &f.name);
        b.write_u64::<BigEndian>(f.size).unwrap();
        b.extend_from_slice(&f.root);
    }
    frame(kind::SHARE_FILES, &b)
}

pub fn who_has(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, name);
    frame(kind::WHO_HAS, &b)
}

/// The first page of the file list (cursor flag 0).
pub fn list_files() -> Vec<u8> {
    frame(kind::LIST_FILES, &[0])
}

/// The first page of the peer list (after id 0).
pub fn list_peers() -> Vec<u8> {
    frame(kind::LIST_PEERS, &0u64.to_be_bytes())
}

pub fn get_manifest(name: &str, root: Option<&Hash>) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, name);
    match root {
        None => b.push(0),
        Some(r) => {
            b.push(1);
            b.extend_from_slice(r);
        }
    }
    frame(kind::GET_MANIFEST, &b)
}

pub fn get_chunk(root: &Hash, index: u32) -> Vec<u8> {
    let mut b = root.to_vec();
    b.write_u32::<BigEndian>(index).unwrap();
    frame(kind::GET_CHUNK, &b)
}

pub fn get_have_map(root: &Hash) -> Vec<u8> {
    frame(kind::GET_HAVE_MAP, root)
}

/// "I hold every one of the `chunks` chunks of `root`."
pub fn have_map_complete(root: &Hash, chunks: u32) -> Vec<u8> {
    let mut b = root.to_vec();
    b.write_u32::<BigEndian>(chunks).unwrap();
    b.push(1);
    frame(kind::HAVE_MAP, &b)
}

/// A `HaveMap` body: its root and, for a partial holder, which chunks it
/// holds (`None`: complete). Section 4: bit i is bit i % 8 of byte i / 8.
pub fn parse_have_map(body: &[u8]) -> io::Result<(Hash, Option<Vec<bool>>)> {
    let mut c = Cursor::new(body);
    let root = hash(&mut c)?;
    let chunks = c.read_u32::<BigEndian>()? as usize;
    match c.read_u8()? {
        1 => Ok((root, None)),
        0 => {
            let bytes = &body[37..];
            if bytes.len() != chunks.div_ceil(8) {
                return Err(io::Error::other("have-map of the wrong length"));
            }
            Ok((
                root,
                Some(
                    (0..chunks)
                        .map(|i| bytes[i / 8] & (1 << (i % 8)) != 0)
                        .collect(),
                ),
            ))
        }
        _ => Err(io::Error::other("bad complete flag")),
    }
}

/// The indices a `Have` body names.
pub fn parse_have(body: &[u8]) -> io::Result<(Hash, Vec<u32>)> {
    let mut c = Cursor::new(body);
    let root = hash(&mut c)?;
    let n = c.read_u16::<BigEndian>()?;
    let indices = (0..n)
        .map(|_| c.read_u32::<BigEndian>())
        .collect::<io::Result<_>>()?;
    Ok((root, indices))
}

pub fn chunk(index: u32, data: &[u8]) -> Vec<u8> {
    let mut b = index.to_be_bytes().to_vec();
    b.extend_from_slice(data);
    frame(kind::CHUNK, &b)
}

/// A file's manifest, computed by hand from section 6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub root: Hash,
    pub size: u64,
    pub chunk_size: u32,
    pub hashes: Vec<Hash>,
}

impl Manifest {
    /// Chunks the file and hashes it as an indexing peer would.
    pub fn of_file(path: &Path) -> Manifest {
        let data = std::fs::read(path).unwrap();
        let size = data.len() as u64;
        let mut chunk_size: u32 = 32 << 10;
        while size.div_ceil(u64::from(chunk_size)) > 65_536 && chunk_size < 4 << 20 {
            chunk_size *= 2;
        }
        let hashes: Vec<Hash> = data
            .chunks(chunk_size as usize)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        let mut h = blake3::Hasher::new();
        h.update(b"shoal-root-v1");
        h.update(&size.to_be_bytes());
        h.update(&chunk_size.to_be_bytes());
        for c in &hashes {
            h.update(c);
        }
        Manifest {
            root: *h.finalize().as_bytes(),
            size,
            chunk_size,
            hashes,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.root.to_vec();
        b.write_u64::<BigEndian>(self.size).unwrap();
        b.write_u32::<BigEndian>(self.chunk_size).unwrap();
        b.write_u32::<BigEndian>(self.hashes.len() as u32).unwrap();
        for h in &self.hashes {
            b.extend_from_slice(h);
        }
        frame(kind::MANIFEST, &b)
    }

    /// Parses a `Manifest` body.
    pub fn parse(body: &[u8]) -> io::Result<Manifest> {
        let mut c = Cursor::new(body);
        let root = hash(&mut c)?;
        let size = c.read_u64::<BigEndian>()?;
        let chunk_size = c.read_u32::<BigEndian>()?;
        let n = c.read_u32::<BigEndian>()?;
        let hashes = (0..n).map(|_| hash(&mut c)).collect::<io::Result<_>>()?;
        Ok(Manifest {
            root,
            size,
            chunk_size,
            hashes,
        })
    }

    pub fn entry(&self, name: &str) -> FileEntry {
        FileEntry {
            name: name.into(),
            size: self.size,
            root: self.root,
        }
    }
}

pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------- decoding

/// One received frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Frame {
    /// The code and reason of an `Error` frame.
    pub fn error(&self) -> Option<(u16, String)> {
        if self.kind != kind::ERROR {
            return None;
        }
        let mut c = Cursor::new(&self.body[..]);
        let code = c.read_u16::<BigEndian>().ok()?;
        let reason = string(&mut c).ok()?;
        Some((code, reason))
    }
}

/// Splits one frame off the front of `buf`: `None` until it is complete.
pub fn split_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 5 {
        return None;
    }
    let len = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
    if len == 0 || buf.len() < 4 + len {
        return None;
    }
    let f = Frame {
        kind: buf[4],
        body: buf[5..4 + len].to_vec(),
    };
    Some((f, 4 + len))
}

fn hash(c: &mut Cursor<&[u8]>) -> io::Result<Hash> {
    let mut h = [0u8; 32];
    c.read_exact(&mut h)?;
    Ok(h)
}

fn string(c: &mut Cursor<&[u8]>) -> io::Result<String> {
    let n = c.read_u16::<BigEndian>()? as usize;
    let mut b = vec![0u8; n];
    c.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn addr(c: &mut Cursor<&[u8]>) -> io::Result<SocketAddr> {
    let ip = match c.read_u8()? {
        4 => {
            let mut o = [0u8; 4];
            c.read_exact(&mut o)?;
            IpAddr::V4(Ipv4Addr::from(o))
        }
        6 => {
            let mut o = [0u8; 16];
            c.read_exact(&mut o)?;
            IpAddr::V6(Ipv6Addr::from(o))
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("address family {f}"),
            ));
        }
    };
    Ok(SocketAddr::new(ip, c.read_u16::<BigEndian>()?))
}

/// One version of a file in a `Holders` answer.
#[derive(Debug, Clone)]
pub struct HolderGroup {
    pub root: Hash,
    pub size: u64,
    pub peers: Vec<(u64, SocketAddr)>,
}

/// Parses a `Holders` body into the name and its version groups.
pub fn parse_holders(body: &[u8]) -> io::Result<(String, Vec<HolderGroup>)> {
    let mut c = Cursor::new(body);
    let name = string(&mut c)?;
    let _truncated = c.read_u8()?;
    let n = c.read_u32::<BigEndian>()?;
    let mut groups = Vec::new();
    for _ in 0..n {
        let root = hash(&mut c)?;
        let size = c.read_u64::<BigEndian>()?;
        let _votes = c.read_u32::<BigEndian>()?;
        let np = c.read_u32::<BigEndian>()?;
        let mut peers = Vec::new();
        for _ in 0..np {
            let id = c.read_u64::<BigEndian>()?;
            peers.push((id, addr(&mut c)?));
            // The key its sealed handshake proved (zero on an open network).
            let _key = hash(&mut c)?;
        }
        groups.push(HolderGroup { root, size, peers });
    }
    Ok((name, groups))
}

/// Parses a `FileList` page: (name, size, root, holder count) per entry
/// (the trailing `more` flag is left unread).
pub fn parse_file_list(body: &[u8]) -> io::Result<Vec<(String, u64, Hash, u32)>> {
    let mut c = Cursor::new(body);
    let n = c.read_u32::<BigEndian>()?;
    (0..n)
        .map(|_| {
            let name = string(&mut c)?;
            let size = c.read_u64::<BigEndian>()?;
            let root = hash(&mut c)?;
            Ok((name, size, root, c.read_u32::<BigEndian>()?))
        })
        .collect()
}

// ---------------------------------------------------------------- a connection

/// A blocking connection that speaks frames by hand.
pub struct RawConn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    pub fn connect(addr: SocketAddr) -> io::Result<RawConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        Ok(RawConn::from_stream(stream))
    }

    pub fn from_stream(stream: TcpStream) -> RawConn {
        RawConn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and sends our Hello with `role` (the other side's is read
    /// later, as any frame).
    pub fn hello(addr: SocketAddr, role: u8) -> io::Result<RawConn> {
        let mut c = RawConn::connect(addr)?;
        c.send(&hello(role))?;
        Ok(c)
    }

    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next frame, waiting at most `limit`: `Ok(None)` if the other side
    /// closed, `Err(TimedOut/WouldBlock)` if nothing came in time.
    pub fn recv(&mut self, limit: Duration) -> io::Result<Option<Frame>> {
        let deadline = Instant::now() + limit;
        let mut piece = vec![0u8; 64 << 10];
        loop {
            if let Some((f, used)) = split_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(Some(f));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(&mut piece) {
                Ok(0) => return Ok(None),
                Ok(n) => self.buf.extend_from_slice(&piece[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads frames until one of `kind` (returned), skipping others (Pings
    /// are answered). `None` if the other side closed first or time ran out.
    pub fn recv_kind(&mut self, want: u8, limit: Duration) -> Option<Frame> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some(f)) if f.kind == want => return Some(f),
                Ok(Some(f)) if f.kind == kind::PING => {
                    let _ = self.send(&pong(u64::from_be_bytes(f.body[..8].try_into().ok()?)));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// How the other side reacts within `limit`: an Error frame, a close,
    /// or nothing. Frames other than Error (its Hello) are skipped.
    pub fn reaction(&mut self, limit: Duration) -> Reaction {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Ok(Some(f)) => {
                    if let Some((code, reason)) = f.error() {
                        return Reaction::Error(code, reason);
                    }
                }
                Ok(None) => return Reaction::Closed,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                    ) =>
                {
                    return Reaction::Nothing;
                }
                Err(_) => return Reaction::Closed, // reset
            }
        }
    }
}

/// What a peer or manager did about something we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reaction {
    Error(u16, String),
    Closed,
    Nothing,
}

/// Asks the manager who holds `name`.
pub fn who_has_groups(manager: SocketAddr, name: &str) -> Vec<HolderGroup> {
    let mut c = RawConn::hello(manager, role::MANAGER_CLIENT).unwrap();
    c.send(&who_has(name)).unwrap();
    let f = c
        .recv_kind(kind::HOLDERS, Duration::from_secs(10))
        .expect("a Holders answer");
    parse_holders(&f.body).unwrap().1
}

// ---------------------------------------------------------------- fake parties

/// A background task stopped (and its sockets closed) when this is dropped.
pub struct Stopper(Arc<AtomicBool>);

impl Stopper {
    fn new() -> (Stopper, Arc<AtomicBool>) {
        let flag = Arc::new(AtomicBool::new(false));
        (Stopper(flag.clone()), flag)
    }
}

impl Drop for Stopper {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// A registered member of the manager's network, kept alive by answering
/// its Pings on a thread: it lists whatever files it is told to share.
pub struct FakeMember {
    pub id: u64,
    _stop: Stopper,
}

impl FakeMember {
    /// Registers with `listen_port` as its serving port and shares `files`.
    pub fn join(manager: SocketAddr, listen_port: u16, files: &[FileEntry]) -> FakeMember {
        let mut c = RawConn::hello(manager, role::MANAGER_CLIENT).unwrap();
        c.send(&register(listen_port, None)).unwrap();
        let welcome = c
            .recv_kind(kind::WELCOME, Duration::from_secs(10))
            .expect("a Welcome");
        let id = u64::from_be_bytes(welcome.body[..8].try_into().unwrap());
        c.send(&share_files(files)).unwrap();
        let (stop, flag) = Stopper::new();
        thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match c.recv(Duration::from_millis(100)) {
                    Ok(Some(f)) if f.kind == kind::PING && f.body.len() == 8 => {
                        let nonce = u64::from_be_bytes(f.body[..8].try_into().unwrap());
                        if c.send(&pong(nonce)).is_err() {
                            return;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                        ) => {}
                    Err(_) => return,
                }
            }
            let _ = c.send(&frame(kind::GOODBYE, &[]));
        });
        FakeMember { id, _stop: stop }
    }
}

/// How a fake serving peer treats each connection it accepts.
#[derive(Debug, Clone)]
pub enum Serve {
    /// Accepts, then never sends or reads a byte.
    Silent,
    /// Sends Hello, then reads and ignores everything.
    HelloOnly,
    /// Hello, answers GetManifest with this manifest, then stops reading.
    ManifestThenDeaf(Manifest),
    /// Hello, answers GetManifest with this manifest and GetHaveMap with
    /// "complete", reads and ignores every GetChunk.
    ManifestNoChunks(Manifest),
    /// Hello, answers GetManifest with this manifest, GetHaveMap with
    /// "complete" and every GetChunk with a chunk of the right length whose
    /// bytes are all 0xAA.
    WrongChunks(Manifest),
}

/// A serving peer the test controls: a listener on loopback whose accepted
/// connections behave as `Serve` says, until dropped.
pub struct FakeServer {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    _stop: Stopper,
}

impl FakeServer {
    pub fn start(behaviour: Serve) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (stop, flag) = Stopper::new();
        let count = accepted.clone();
        thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((s, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = s.set_nonblocking(false);
                        let b = behaviour.clone();
                        let f = flag.clone();
                        thread::spawn(move || serve_one(RawConn::from_stream(s), b, f));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FakeServer {
            addr,
            accepted,
            _stop: stop,
        }
    }
}

fn serve_one(mut c: RawConn, behaviour: Serve, stop: Arc<AtomicBool>) {
    let tick = Duration::from_millis(100);
    let idle = |stop: &AtomicBool| {
        while !stop.load(Ordering::SeqCst) {
            thread::sleep(tick);
        }
    };
    let wrong_chunks = matches!(behaviour, Serve::WrongChunks(_));
    let (manifest, deaf) = match behaviour {
        Serve::Silent => return idle(&stop),
        Serve::HelloOnly => (None, false),
        Serve::ManifestThenDeaf(m) => (Some(m), true),
        Serve::ManifestNoChunks(m) | Serve::WrongChunks(m) => (Some(m), false),
    };
    if c.send(&hello(role::PEER)).is_err() {
        return;
    }
    while !stop.load(Ordering::SeqCst) {
        match c.recv(tick) {
            Ok(Some(f)) if f.kind == kind::GET_MANIFEST => {
                if let Some(m) = &manifest {
                    let _ = c.send(&m.encode());
                    if deaf {
                        return idle(&stop);
                    }
                }
            }
            Ok(Some(f)) if f.kind == kind::GET_HAVE_MAP => {
                if let Some(m) = &manifest {
                    let _ = c.send(&have_map_complete(&m.root, m.hashes.len() as u32));
                }
            }
            Ok(Some(f)) if f.kind == kind::GET_CHUNK && wrong_chunks && f.body.len() == 36 => {
                if let Some(m) = &manifest {
                    let index = u32::from_be_bytes(f.body[32..36].try_into().unwrap());
                    let at = u64::from(index) * u64::from(m.chunk_size);
                    let len = m.size.saturating_sub(at).min(u64::from(m.chunk_size));
                    let _ = c.send(&chunk(index, &vec![0xAA; len as usize]));
                }
            }
            Ok(Some(_)) => {}
            Ok(None) => return,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) => {}
            Err(_) => return,
        }
    }
}
