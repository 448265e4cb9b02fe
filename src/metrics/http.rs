//! The `--metrics` endpoint: `GET /metrics` over HTTP/1.x, served on the
//! process's own mio loop. One request per connection, then close.
//! Everything is bounded, since anyone who reaches the port may be hostile:
//! a request head of at most [`MAX_HEAD`] bytes, at most [`MAX_CONNS`]
//! connections (more are closed at once), [`TIMEOUT`] per connection from
//! accept to the last byte written (a slowloris holds a slot for no longer),
//! and the response written as the socket drains.
//!
//! [`judge`] and [`HttpConn`] are pure (bytes and `now` in, bytes out);
//! [`MetricsServer`] only moves bytes between them and the sockets.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

/// Longest request head (request line and headers) read.
pub const MAX_HEAD: usize = 8 << 10;
/// Most metrics connections open at once; more are closed on accept.
pub const MAX_CONNS: usize = 16;
/// Each connection is closed this long after it was accepted.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Most headers a request may carry.
const MAX_HEADERS: usize = 32;

/// The mio tokens the endpoint uses: its listener and, below it, one per
/// connection slot. Both binaries keep their own tokens out of this range
/// (their slabs count up from 0, their fixed tokens are `usize::MAX - 1..4`).
pub const LISTENER: Token = Token(usize::MAX - 64);
const FIRST_CONN: usize = usize::MAX - 64 - MAX_CONNS;

/// What a request head asks for, once it is complete or known to be bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not a whole head yet, and not over the limit.
    NeedMore,
    /// `GET /metrics`: answer with the page.
    Metrics,
    /// Answer with this status and a short text body.
    Reply(Status),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    HeadTooLarge,
}

impl Status {
    fn line(self) -> (u16, &'static str) {
        match self {
            Status::BadRequest => (400, "Bad Request"),
            Status::NotFound => (404, "Not Found"),
            Status::MethodNotAllowed => (405, "Method Not Allowed"),
            Status::HeadTooLarge => (431, "Request Header Fields Too Large"),
        }
    }
}

/// Judges the bytes received so far (only the first [`MAX_HEAD`] count).
pub fn judge(received: &[u8]) -> Verdict {
    let head = &received[..received.len().min(MAX_HEAD)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Partial) if received.len() >= MAX_HEAD => {
            Verdict::Reply(Status::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => Verdict::NeedMore,
        Ok(httparse::Status::Complete(_)) => {
            let path = req.path.unwrap_or("");
            let path = path.split_once('?').map_or(path, |(p, _)| p);
            if req.method != Some("GET") {
                Verdict::Reply(Status::MethodNotAllowed)
            } else if path != "/metrics" {
                Verdict::Reply(Status::NotFound)
            } else {
                Verdict::Metrics
            }
        }
        Err(httparse::Error::TooManyHeaders) => Verdict::Reply(Status::HeadTooLarge),
        Err(_) => Verdict::Reply(Status::BadRequest),
    }
}

/// A whole response: status line, headers, body; the connection closes after it.
pub fn response(code: u16, reason: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let allow = if code == 405 { "Allow: GET\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn error_response(status: Status) -> Vec<u8> {
    let (code, reason) = status.line();
    let body = format!("{code} {reason}\n");
    response(code, reason, "text/plain; charset=utf-8", body.as_bytes())
}

#[derive(Debug)]
enum State {
    Reading { head: Vec<u8> },
    Writing { out: Vec<u8>, sent: usize },
    Done,
}

/// One metrics connection: reading its request head, writing the answer,
/// or done (the shell closes it).
#[derive(Debug)]
pub struct HttpConn {
    state: State,
    deadline: Instant,
}

impl HttpConn {
    pub fn new(now: Instant) -> HttpConn {
        HttpConn {
            state: State::Reading { head: Vec::new() },
            deadline: now + TIMEOUT,
        }
    }

    /// Bytes arrived. `render` makes the metrics page; it is called only
    /// for a complete `GET /metrics`. Bytes past the head limit, or after
    /// the head, are ignored.
    pub fn handle_bytes(&mut self, bytes: &[u8], render: impl FnOnce() -> String) {
        let State::Reading { head } = &mut self.state else {
            return;
        };
        let room = (MAX_HEAD + 1).saturating_sub(head.len());
        head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        let out = match judge(head) {
            Verdict::NeedMore => return,
            Verdict::Metrics => {
                let page = render();
                response(200, "OK", super::CONTENT_TYPE, page.as_bytes())
            }
            Verdict::Reply(status) => error_response(status),
        };
        self.state = State::Writing { out, sent: 0 };
    }

    /// The client closed its side. A whole request is still answered (a
    /// client may shut its write side after sending); a partial one ends.
    pub fn handle_eof(&mut self) {
        if matches!(self.state, State::Reading { .. }) {
            self.state = State::Done;
        }
    }

    /// The socket failed: done.
    pub fn handle_failed(&mut self) {
        self.state = State::Done;
    }

    /// Past the deadline: done, whatever was left.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now >= self.deadline {
            self.state = State::Done;
        }
    }

    pub fn wants_read(&self) -> bool {
        matches!(self.state, State::Reading { .. })
    }

    /// What is still to be written.
    #[must_use]
    pub fn poll_output(&self) -> &[u8] {
        match &self.state {
            State::Writing { out, sent } => &out[*sent..],
            _ => &[],
        }
    }

    /// `n` bytes of [`HttpConn::poll_output`] were written.
    pub fn handle_written(&mut self, n: usize) {
        if let State::Writing { out, sent } = &mut self.state {
            *sent = (*sent + n).min(out.len());
            if *sent == out.len() {
                self.state = State::Done;
            }
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }
}

/// The mio part: the listener and up to [`MAX_CONNS`] connections, each
/// registered for both readiness kinds (edge-triggered; an event with
/// nothing to do is harmless).
pub struct MetricsServer {
    listener: TcpListener,
    conns: Slab<(TcpStream, HttpConn)>,
}

impl MetricsServer {
    /// Binds `addr` and registers the listener as [`LISTENER`].
    pub fn bind(addr: SocketAddr, registry: &Registry) -> io::Result<MetricsServer> {
        let mut listener = TcpListener::bind(addr)?;
        registry.register(&mut listener, LISTENER, Interest::READABLE)?;
        Ok(MetricsServer {
            listener,
            conns: Slab::with_capacity(MAX_CONNS),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Whether `token` is this endpoint's (the listener or a connection).
    pub fn owns(token: Token) -> bool {
        (FIRST_CONN..=LISTENER.0).contains(&token.0)
    }

    /// Handles an event on one of our tokens; `render` makes the page.
    pub fn handle_event(
        &mut self,
        token: Token,
        registry: &Registry,
        now: Instant,
        render: impl FnMut() -> String,
    ) {
        if token == LISTENER {
            self.accept_all(registry, now);
        } else if let Some(key) = token.0.checked_sub(FIRST_CONN) {
            self.drive(key, registry, render);
        }
    }

    fn accept_all(&mut self, registry: &Registry, now: Instant) {
        loop {
            let (mut stream, addr) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors or a connection reset in the queue:
                    // the next edge (or scrape) tries again.
                    log::debug!("metrics: accept failed: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                log::debug!("metrics: refusing {addr}: {MAX_CONNS} connections open");
                continue; // dropped: closed
            }
            let entry = self.conns.vacant_entry();
            let token = Token(FIRST_CONN + entry.key());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = registry.register(&mut stream, token, interest) {
                log::debug!("metrics: cannot register {addr}: {e}");
                continue;
            }
            entry.insert((stream, HttpConn::new(now)));
        }
    }

    /// Reads what the socket has while the head is incomplete, writes what
    /// the answer still needs, and closes the connection once done.
    fn drive(&mut self, key: usize, registry: &Registry, mut render: impl FnMut() -> String) {
        let Some((stream, http)) = self.conns.get_mut(key) else {
            return; // stale token
        };
        let mut buf = [0u8; 4096];
        while http.wants_read() {
            match stream.read(&mut buf) {
                Ok(0) => http.handle_eof(),
                Ok(n) => http.handle_bytes(&buf[..n], &mut render),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => http.handle_failed(),
            }
        }
        while !http.poll_output().is_empty() {
            match stream.write(http.poll_output()) {
                Ok(n) => http.handle_written(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => http.handle_failed(),
            }
        }
        if http.is_done() {
            self.close(key, registry);
        }
    }

    fn close(&mut self, key: usize, registry: &Registry) {
        if let Some((mut stream, _)) = self.conns.try_remove(key) {
            let _ = registry.deregister(&mut stream);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// The earliest connection deadline.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns.iter().map(|(_, (_, h))| h.deadline()).min()
    }

    /// Closes the connections past their deadline.
    pub fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        let due: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, (_, h))| h.deadline() <= now)
            .map(|(k, _)| k)
            .collect();
        for key in due {
            log::debug!("metrics: closing a connection after {TIMEOUT:?}");
            self.close(key, registry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> String {
        "shoal_test 1\n".to_string()
    }

    fn answer(conn: &mut HttpConn) -> String {
        let out = String::from_utf8_lossy(conn.poll_output()).into_owned();
        let n = conn.poll_output().len();
        conn.handle_written(n);
        out
    }

    fn respond(request: &[u8]) -> String {
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(request, page);
        answer(&mut c)
    }

    #[test]
    fn get_metrics_is_answered_with_the_page() {
        let out = respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("Content-Length: 13\r\n"), "{out}");
        assert!(out.contains("Connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nshoal_test 1\n"), "{out}");
        let out = respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    }

    #[test]
    fn other_paths_methods_and_garbage_are_refused() {
        assert!(respond(b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        assert!(respond(b"GET /metricsx HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404 "));
        let post = respond(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        assert!(post.contains("Allow: GET\r\n"), "{post}");
        assert!(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405 "));
        for garbage in [
            &b"\x00\x01\x02\x03\r\n\r\n"[..],
            b"GET /metrics HTTP/9.9\r\n\r\n",
            b"GET\r\n\r\n",
            b"GET /metrics HTTP/1.1\r\nbad header line\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
        ] {
            let out = respond(garbage);
            assert!(out.starts_with("HTTP/1.1 400 "), "{garbage:?}: {out}");
        }
    }

    #[test]
    fn a_huge_head_is_refused_at_the_limit_without_rendering() {
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(b"GET /metrics HTTP/1.1\r\n", || panic!("rendered"));
        let header = format!("X-Pad: {}\r\n", "a".repeat(1000));
        let mut fed = 0;
        while c.wants_read() {
            c.handle_bytes(header.as_bytes(), || panic!("rendered"));
            fed += header.len();
            assert!(fed < 1 << 20, "never refused");
        }
        assert!(fed <= MAX_HEAD + header.len(), "read {fed} bytes");
        assert!(answer(&mut c).starts_with("HTTP/1.1 431 "));
        assert!(c.is_done());
        // One giant read is cut at the limit too.
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(&vec![b'G'; 10 << 20], page);
        assert!(answer(&mut c).starts_with("HTTP/1.1 4"));
        // Many tiny headers hit the header count limit.
        let mut many = b"GET /metrics HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(respond(&many).starts_with("HTTP/1.1 431 "));
    }

    #[test]
    fn a_request_split_into_single_bytes_is_answered_once_whole() {
        let request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        let mut c = HttpConn::new(Instant::now());
        let mut renders = 0;
        for (i, b) in request.iter().enumerate() {
            assert!(c.wants_read(), "stopped reading at byte {i}");
            c.handle_bytes(std::slice::from_ref(b), || {
                renders += 1;
                page()
            });
        }
        assert_eq!(renders, 1);
        assert!(!c.wants_read());
        // Written in small pieces as the socket drains.
        let mut out = Vec::new();
        while !c.poll_output().is_empty() {
            let piece = c.poll_output().len().min(7);
            out.extend_from_slice(&c.poll_output()[..piece]);
            c.handle_written(piece);
        }
        assert!(c.is_done());
        assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(out.ends_with(b"shoal_test 1\n"));
        // Bytes after the head (a pipelined second request) are ignored.
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(
            b"GET /metrics HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n",
            page,
        );
        c.handle_bytes(b"GET /metrics HTTP/1.1\r\n\r\n", || {
            panic!("rendered twice")
        });
        assert_eq!(answer(&mut c).matches("HTTP/1.1").count(), 1);
    }

    #[test]
    fn a_slowloris_is_cut_off_at_the_deadline() {
        let start = Instant::now();
        let mut c = HttpConn::new(start);
        assert_eq!(c.deadline(), start + TIMEOUT);
        let mut now = start;
        for b in b"GET /metrics HTTP/1.1\r\nX: " {
            now += Duration::from_millis(150);
            c.handle_timeout(now);
            c.handle_bytes(std::slice::from_ref(b), || panic!("rendered"));
        }
        assert!(c.wants_read(), "still within the deadline");
        c.handle_timeout(start + TIMEOUT);
        assert!(c.is_done());
        assert!(c.poll_output().is_empty());
        // A slow reader of the answer is cut off the same way.
        let mut c = HttpConn::new(start);
        c.handle_bytes(b"GET /metrics HTTP/1.1\r\n\r\n", page);
        c.handle_written(3);
        c.handle_timeout(start + TIMEOUT);
        assert!(c.is_done());
    }

    #[test]
    fn eof_before_a_whole_head_ends_but_after_one_still_answers() {
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(b"GET /met", page);
        c.handle_eof();
        assert!(c.is_done());
        let mut c = HttpConn::new(Instant::now());
        c.handle_bytes(b"GET /metrics HTTP/1.1\r\n\r\n", page);
        c.handle_eof();
        assert!(answer(&mut c).starts_with("HTTP/1.1 200 "));
    }

    #[test]
    fn judge_never_panics_on_random_bytes() {
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..20_000 {
            let len = rng.usize(0..64);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
            if rng.bool() {
                let mut req = b"GET /metrics HTTP/1.1\r\n".to_vec();
                req.append(&mut bytes);
                bytes = req;
            }
            let _ = judge(&bytes);
        }
    }
}
