//! A nonblocking TCP connection with a frame-aware read buffer and a bounded
//! write buffer, following mio's edge-triggered rules: reads and writes run
//! until `WouldBlock` (or a per-turn budget), and WRITABLE interest is held
//! only while there are bytes to send.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use mio::net::TcpStream;
use mio::{Interest, Registry, Token};

use crate::wire::{self, DecodeError, HEADER_LEN, Message};

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
    write_buf: Vec<u8>,
    write_start: usize,
    /// Chunk payloads to send straight from files, each after the buffer
    /// bytes before its position `at`.
    file_segments: VecDeque<FileSegment>,
    interest: Interest,
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
            write_buf: Vec::new(),
            write_start: 0,
            file_segments: VecDeque::new(),
            interest: Interest::READABLE,
        }
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

    /// Reads until `WouldBlock`, EOF, `budget` bytes, or a buffer full of
    /// complete frames (`Budget`: decode them, then call again next turn).
    pub fn fill(&mut self, budget: usize) -> io::Result<IoStatus> {
        let mut read = 0;
        while read < budget {
            if !self.make_room() {
                // Full of complete frames: the caller decodes them, then
                // revisits us (no new edge will come for bytes still queued).
                return Ok(IoStatus::Budget);
            }
            match self.stream.read(&mut self.read_buf[self.read_end..]) {
                Ok(0) => return Ok(IoStatus::Done),
                Ok(n) => {
                    self.read_end += n;
                    read += n;
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
        if self.read_buf.len() - self.read_end >= MIN_READ {
            return true;
        }
        if self.read_start > 0 {
            self.read_buf.copy_within(self.read_start..self.read_end, 0);
            self.read_end -= self.read_start;
            self.read_start = 0;
        }
        let frame_len = match wire::peek_header(&self.read_buf[..self.read_end]) {
            Ok(Some((_, body))) => HEADER_LEN + body,
            // A bad header is reported by `next_frame`; just read a little.
            _ => HEADER_LEN,
        };
        let want = frame_len.max(self.read_chunk) + self.read_chunk;
        if self.read_buf.len() < want {
            self.read_buf.resize(want, 0);
        }
        self.read_end < self.read_buf.len()
    }

    /// The kind and body length of the frame at the front of the read
    /// buffer, once its 5 header bytes are in (checked against the kind's
    /// wire limit): lets a caller refuse a frame before its body is read.
    pub fn peek_frame_header(&self) -> Result<Option<(u8, usize)>, DecodeError> {
        wire::peek_header(&self.read_buf[self.read_start..self.read_end])
    }

    /// The next complete frame, borrowed from the read buffer. Call
    /// [`Conn::consume`] with the returned length once done with the message.
    pub fn next_frame(&self) -> Result<Option<(Message<'_>, usize)>, DecodeError> {
        wire::decode(&self.read_buf[self.read_start..self.read_end])
    }

    pub fn consume(&mut self, n: usize) {
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

    /// Queues one frame for sending.
    pub fn send(&mut self, msg: &Message<'_>) {
        wire::encode(msg, &mut self.write_buf);
    }

    /// Queues one frame that `encode` appends to the write buffer itself
    /// (a manifest encoded straight from borrowed hashes).
    pub fn send_with(&mut self, encode: impl FnOnce(&mut Vec<u8>)) {
        encode(&mut self.write_buf);
    }

    /// Queues a chunk frame whose payload is sent from `file` by the kernel
    /// (`sendfile`), never copied through our memory: the header goes into
    /// the write buffer, the payload follows it on the wire.
    pub fn send_chunk_from_file(&mut self, index: u32, file: Rc<File>, offset: u64, len: u32) {
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
        self.write_buf.len() - self.write_start + from_files
    }

    pub fn has_pending_writes(&self) -> bool {
        self.pending_write_bytes() > 0
    }

    /// Writes until everything queued is sent or the socket would block.
    /// Buffer bytes and file payloads go out in the order they were queued.
    pub fn flush(&mut self) -> io::Result<IoStatus> {
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
        if self.write_buf.capacity() > SHRINK_ABOVE {
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
        log::warn!("refusing {}: {reason}", self.peer);
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
    let mut offset = seg.offset as libc::off_t;
    // SAFETY: both descriptors are open for the duration of the call, and
    // `offset` is a valid pointer the kernel updates.
    let n = unsafe {
        libc::sendfile(
            stream.as_raw_fd(),
            seg.file.as_raw_fd(),
            &mut offset,
            seg.left.min(1 << 30),
        )
    };
    match n {
        n if n > 0 => {
            seg.offset += n as u64;
            seg.left -= n as usize;
            Ok(())
        }
        // The file shrank under us: the frame cannot be completed.
        0 => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "shared file shrank while a chunk of it was being sent",
        )),
        _ => Err(io::Error::last_os_error()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Fixes a socket buffer size, which also stops the kernel autotuning it.
    fn set_buffer(fd: &impl AsRawFd, option: libc::c_int, bytes: libc::c_int) {
        // SAFETY: a valid socket and a pointer to an int of the given size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt");
    }

    /// A connected pair: our `Conn` and the plain socket at the other end,
    /// with small fixed kernel buffers so our own buffer is what fills up.
    fn pair() -> (Conn, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        set_buffer(&client, libc::SO_RCVBUF, 64 << 10);
        let (server, _) = listener.accept().unwrap();
        set_buffer(&server, libc::SO_SNDBUF, 64 << 10);
        server.set_nonblocking(true).unwrap();
        (Conn::new(TcpStream::from_std(server), addr), client)
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
