//! One inbound peer connection, serving chunks: a pure state machine. It
//! checks every request against the shared listing (a [`Catalog`]), queues
//! valid chunk requests up to a bound, and hands them out one at a time when
//! the shell has room in the socket buffer, so disk reads never outrun the
//! network. Bad requests get an error frame and the connection is closed.
//! A file still downloading is served too: a request for a chunk not yet
//! verified here is answered `NoChunk`, and a client that asked for the
//! have-map is sent `Have` batches as chunks verify (the shell sends them,
//! to every session [`ServeSession::watching`] the root).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use fixedbitset::FixedBitSet;

use crate::store::Manifest;
use crate::wire::{Accept, ErrorCode, FileName, Hash, Message, PROTOCOL_VERSION, Role, accept};

/// The files a peer serves, looked up by name (manifests) or root (chunks).
pub trait Catalog {
    fn find_by_name(&self, name: &FileName) -> Option<&Manifest>;
    fn find_by_root(&self, root: &Hash) -> Option<&Manifest>;
    /// The verified chunks of `root` if it is still downloading; `None` for
    /// a complete file (or none at all).
    fn held_chunks(&self, _root: &Hash) -> Option<&FixedBitSet> {
        None
    }
}

/// Queued requests looked at for a fresh one: bounds the cost per chunk
/// whatever a client queues.
pub const FRESH_SCAN: usize = 32;

/// Limits of one serving connection.
#[derive(Debug, Clone, Copy)]
pub struct ServeConfig {
    /// Chunk requests queued at most; a client that pipelines more is broken.
    pub max_queue: usize,
    pub hello_timeout: Duration,
    /// A connection with nothing queued and no request for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            // Matches the downloader's pipeline cap (512), with room to spare.
            max_queue: 1024,
            hello_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// A validated chunk request, ready to be read from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRequest {
    pub root: Hash,
    pub index: u32,
    pub offset: u64,
    pub len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeAction {
    Send(Message<'static>),
    /// Send the manifest of the shared file with this root. The shell encodes
    /// it from the index: a big file's hash list is never copied.
    SendManifest(Hash),
    /// Flush what is queued, then close.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingHello { since: Instant },
    Ready { last_request: Instant },
    Closing,
}

pub struct ServeSession {
    config: ServeConfig,
    state: State,
    queue: VecDeque<ChunkRequest>,
    actions: VecDeque<ServeAction>,
    /// The root whose have-map the client asked for: it gets `Have`s.
    watching: Option<Hash>,
}

impl ServeSession {
    /// A freshly accepted connection; we greet it at once.
    pub fn new(config: ServeConfig, now: Instant) -> ServeSession {
        let mut session = ServeSession {
            config,
            state: State::AwaitingHello { since: now },
            queue: VecDeque::new(),
            actions: VecDeque::new(),
            watching: None,
        };
        session.send(Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
        });
        session
    }

    pub fn handle_message(&mut self, msg: Message<'_>, catalog: &impl Catalog, now: Instant) {
        match (self.state, msg) {
            (State::AwaitingHello { .. }, Message::Hello { version, role }) => {
                if version != PROTOCOL_VERSION || role != Role::Peer {
                    self.refuse(
                        ErrorCode::Incompatible,
                        format!("expected a peer speaking protocol {PROTOCOL_VERSION}, got {role:?} version {version}"),
                    );
                } else {
                    self.state = State::Ready { last_request: now };
                }
            }
            (State::Ready { .. }, Message::GetManifest { name, root }) => {
                self.state = State::Ready { last_request: now };
                match catalog.find_by_name(&name) {
                    Some(m) if root.is_none_or(|r| r == m.root) => {
                        self.actions.push_back(ServeAction::SendManifest(m.root));
                    }
                    Some(_) => self.refuse(
                        ErrorCode::NotFound,
                        format!("{name}: the version shared here has a different hash"),
                    ),
                    None => self.refuse(ErrorCode::NotFound, format!("{name} is not shared here")),
                }
            }
            (State::Ready { .. }, Message::GetHaveMap { root }) => {
                self.state = State::Ready { last_request: now };
                let Some(m) = catalog.find_by_root(&root) else {
                    return self.refuse(
                        ErrorCode::NotFound,
                        format!("no shared file has root {}", root.short()),
                    );
                };
                let have = catalog.held_chunks(&root).cloned();
                self.watching = have.is_some().then_some(root);
                let chunks = m.chunk_count();
                self.send(Message::HaveMap { root, chunks, have });
            }
            (State::Ready { .. }, Message::GetChunk { root, index }) => {
                self.state = State::Ready { last_request: now };
                self.handle_get_chunk(root, index, catalog);
            }
            (State::Ready { .. }, Message::Cancel { root, index }) => {
                self.queue.retain(|r| !(r.root == root && r.index == index));
            }
            (State::Ready { .. }, Message::Ping { nonce }) => self.send(Message::Pong { nonce }),
            (State::Closing, _) => {}
            (_, Message::Goodbye) => self.close(),
            (state, msg) => self.refuse(
                ErrorCode::Protocol,
                format!("unexpected {} in state {state:?}", describe(&msg)),
            ),
        }
    }

    fn handle_get_chunk(&mut self, root: Hash, index: u32, catalog: &impl Catalog) {
        let Some(m) = catalog.find_by_root(&root) else {
            return self.refuse(
                ErrorCode::NotFound,
                format!("no shared file has root {}", root.short()),
            );
        };
        if index >= m.chunk_count() {
            return self.refuse(
                ErrorCode::OutOfRange,
                format!("chunk {index} is past the end ({} chunks)", m.chunk_count()),
            );
        }
        if catalog
            .held_chunks(&root)
            .is_some_and(|h| !h.contains(index as usize))
        {
            return self.send(Message::NoChunk { root, index });
        }
        if self.queue.len() >= self.config.max_queue {
            return self.refuse(
                ErrorCode::Busy,
                format!("more than {} chunk requests queued", self.config.max_queue),
            );
        }
        self.queue.push_back(ChunkRequest {
            root,
            index,
            offset: m.chunk_offset(index),
            len: m.chunk_len(index),
        });
    }

    /// The next chunk to send, without taking it (the shell may have to wait
    /// for upload tokens first).
    pub fn peek_request(&self) -> Option<&ChunkRequest> {
        self.queue.front()
    }

    pub fn pop_request(&mut self) -> Option<ChunkRequest> {
        self.queue.pop_front()
    }

    /// Where, among the first [`FRESH_SCAN`] queued requests, the first one
    /// `fresh` accepts is (the shell serves chunks it has sent nobody yet
    /// first: see `Node::serve_round`).
    pub fn fresh_request(&self, fresh: impl Fn(&ChunkRequest) -> bool) -> Option<usize> {
        self.queue.iter().take(FRESH_SCAN).position(fresh)
    }

    /// The queued request at `pos` (from [`Self::fresh_request`]).
    pub fn request_at(&self, pos: usize) -> Option<&ChunkRequest> {
        self.queue.get(pos)
    }

    pub fn take_request_at(&mut self, pos: usize) -> Option<ChunkRequest> {
        self.queue.remove(pos)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The root this client follows with `Have`s, while it is downloading here.
    pub fn watching(&self) -> Option<&Hash> {
        self.watching.as_ref()
    }

    /// The shell could not read a chunk from disk (file gone, I/O error).
    pub fn handle_read_failed(&mut self, why: String) {
        self.refuse(ErrorCode::Internal, why);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            log::debug!("closing serving connection: {:?} timed out", self.state);
            self.close();
        }
    }

    /// What the next frame may be: a hello first, then requests only.
    pub fn accepts(&self) -> Accept {
        match self.state {
            State::AwaitingHello { .. } => accept::PEER_BEFORE_HELLO,
            State::Ready { .. } | State::Closing => accept::SERVING,
        }
    }

    /// True while actions wait to be drained.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    #[must_use]
    pub fn poll_action(&mut self) -> Option<ServeAction> {
        self.actions.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::AwaitingHello { since } => Some(since + self.config.hello_timeout),
            State::Ready { last_request } if self.queue.is_empty() => {
                Some(last_request + self.config.idle_timeout)
            }
            _ => None,
        }
    }

    fn refuse(&mut self, code: ErrorCode, reason: String) {
        log::warn!("refusing a peer: {reason}");
        self.send(Message::Error { code, reason });
        self.close();
    }

    fn close(&mut self) {
        self.queue.clear();
        self.state = State::Closing;
        self.actions.push_back(ServeAction::Close);
    }

    fn send(&mut self, msg: Message<'static>) {
        self.actions.push_back(ServeAction::Send(msg));
    }
}

/// A short description of a message for error text (never a whole chunk).
fn describe(msg: &Message<'_>) -> String {
    match msg {
        Message::Chunk { index, data } => format!("chunk {index} ({} bytes)", data.len()),
        Message::Manifest { root, .. } => format!("manifest {}", root.short()),
        other => crate::text::debug_within(other, 200),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Manifest;

    /// One shared file of 5 chunks of 32 KiB, the last one short.
    struct OneFile(Manifest);

    impl OneFile {
        fn new() -> OneFile {
            let hashes = (0..5u8).map(|i| Hash([i; 32])).collect();
            OneFile(Manifest::from_hashes(4 * 32768 + 100, 32768, hashes))
        }

        fn name() -> FileName {
            FileName::new("f.bin").unwrap()
        }
    }

    impl Catalog for OneFile {
        fn find_by_name(&self, name: &FileName) -> Option<&Manifest> {
            (*name == OneFile::name()).then_some(&self.0)
        }

        fn find_by_root(&self, root: &Hash) -> Option<&Manifest> {
            (*root == self.0.root).then_some(&self.0)
        }
    }

    fn drain(s: &mut ServeSession) -> Vec<ServeAction> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn hello() -> Message<'static> {
        Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Peer,
        }
    }

    fn ready(files: &OneFile, now: Instant) -> ServeSession {
        let mut s = ServeSession::new(ServeConfig::default(), now);
        s.handle_message(hello(), files, now);
        assert!(matches!(
            drain(&mut s).as_slice(),
            [ServeAction::Send(Message::Hello { .. })]
        ));
        s
    }

    fn refused_with(actions: &[ServeAction]) -> Option<ErrorCode> {
        match actions {
            [
                ServeAction::Send(Message::Error { code, .. }),
                ServeAction::Close,
            ] => Some(*code),
            _ => None,
        }
    }

    #[test]
    fn requests_before_the_hello_or_from_another_role_are_refused() {
        let files = OneFile::new();
        let now = Instant::now();
        let mut s = ServeSession::new(ServeConfig::default(), now);
        let _ = drain(&mut s);
        s.handle_message(
            Message::GetChunk {
                root: files.0.root,
                index: 0,
            },
            &files,
            now,
        );
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::Protocol));

        let mut s = ServeSession::new(ServeConfig::default(), now);
        let _ = drain(&mut s);
        let manager_hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::Manager,
        };
        s.handle_message(manager_hello, &files, now);
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::Incompatible));
    }

    #[test]
    fn manifests_only_for_shared_names_and_versions() {
        let files = OneFile::new();
        let now = Instant::now();
        let mut s = ready(&files, now);
        s.handle_message(
            Message::GetManifest {
                name: OneFile::name(),
                root: None,
            },
            &files,
            now,
        );
        assert_eq!(drain(&mut s), vec![ServeAction::SendManifest(files.0.root)]);

        let other = FileName::new("other.bin").unwrap();
        s.handle_message(
            Message::GetManifest {
                name: other,
                root: None,
            },
            &files,
            now,
        );
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::NotFound));

        let mut s = ready(&files, now);
        let wrong = Some(Hash([0xee; 32]));
        s.handle_message(
            Message::GetManifest {
                name: OneFile::name(),
                root: wrong,
            },
            &files,
            now,
        );
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::NotFound));
    }

    #[test]
    fn chunk_requests_are_checked_queued_and_cancelled() {
        let files = OneFile::new();
        let now = Instant::now();
        let mut s = ready(&files, now);
        let root = files.0.root;
        for index in [0, 4, 2] {
            s.handle_message(Message::GetChunk { root, index }, &files, now);
        }
        s.handle_message(Message::Cancel { root, index: 4 }, &files, now);
        assert!(drain(&mut s).is_empty());
        let first = s.pop_request().unwrap();
        assert_eq!((first.index, first.offset, first.len), (0, 0, 32768));
        let next = s.pop_request().unwrap();
        assert_eq!((next.index, next.offset, next.len), (2, 65536, 32768));
        assert_eq!(s.pop_request(), None, "chunk 4 was cancelled");

        // The last chunk is short; past it is an error, not a crash.
        s.handle_message(Message::GetChunk { root, index: 4 }, &files, now);
        assert_eq!(s.pop_request().unwrap().len, 100);
        s.handle_message(Message::GetChunk { root, index: 5 }, &files, now);
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::OutOfRange));
    }

    #[test]
    fn the_queue_is_bounded() {
        let files = OneFile::new();
        let now = Instant::now();
        let config = ServeConfig {
            max_queue: 3,
            ..ServeConfig::default()
        };
        let mut s = ServeSession::new(config, now);
        s.handle_message(hello(), &files, now);
        let _ = drain(&mut s);
        for _ in 0..3 {
            s.handle_message(
                Message::GetChunk {
                    root: files.0.root,
                    index: 1,
                },
                &files,
                now,
            );
        }
        assert_eq!(s.queued(), 3);
        s.handle_message(
            Message::GetChunk {
                root: files.0.root,
                index: 1,
            },
            &files,
            now,
        );
        assert_eq!(refused_with(&drain(&mut s)), Some(ErrorCode::Busy));
        assert_eq!(s.queued(), 0, "a closing session serves nothing more");
        s.handle_message(Message::Goodbye, &files, now);
        s.handle_message(
            Message::GetChunk {
                root: files.0.root,
                index: 1,
            },
            &files,
            now,
        );
        assert!(drain(&mut s).is_empty(), "nothing after the one Close");
    }

    #[test]
    fn silent_connections_time_out_and_busy_ones_do_not() {
        let files = OneFile::new();
        let t0 = Instant::now();
        let config = ServeConfig::default();
        let mut s = ServeSession::new(config, t0);
        let _ = drain(&mut s);
        s.handle_timeout(t0 + config.hello_timeout - Duration::from_millis(1));
        assert!(drain(&mut s).is_empty(), "not before the hello timeout");
        s.handle_timeout(t0 + config.hello_timeout);
        assert_eq!(drain(&mut s), vec![ServeAction::Close]);

        let mut s = ready(&files, t0);
        s.handle_message(
            Message::GetChunk {
                root: files.0.root,
                index: 0,
            },
            &files,
            t0,
        );
        assert_eq!(
            s.poll_timeout(),
            None,
            "no idle timeout while a request waits"
        );
        let _ = s.pop_request();
        assert_eq!(s.poll_timeout(), Some(t0 + config.idle_timeout));
    }
}
