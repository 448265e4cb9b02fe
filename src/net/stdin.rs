//! Standard input as a mio event source, one command per line.
//!
//! epoll refuses `/dev/null` and regular files (EPERM), so a peer started as
//! `peer ... </dev/null &` must go on without stdin rather than fail; a
//! regular file is read whole at start (reading it cannot block). We never set
//! O_NONBLOCK on fd 0: it is shared with the user's shell, and leaving a
//! terminal nonblocking breaks it. Instead every read is preceded by a
//! zero-timeout poll, so it only happens when data is there.

use std::io;

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

pub struct StdinLines {
    registered: bool,
    partial: Vec<u8>,
    /// Lines read at start from a non-pollable stdin (a regular file).
    preloaded: Vec<String>,
}

const STDIN_FD: i32 = 0;

impl StdinLines {
    /// Registers fd 0 with the loop if epoll accepts it.
    pub fn register(registry: &Registry, token: Token) -> StdinLines {
        let mut lines = StdinLines {
            registered: false,
            partial: Vec::new(),
            preloaded: Vec::new(),
        };
        match registry.register(&mut SourceFd(&STDIN_FD), token, Interest::READABLE) {
            Ok(()) => lines.registered = true,
            Err(e) => {
                log::debug!("stdin not pollable ({e}); reading it once if it is a file");
                lines.preload_regular_file();
            }
        }
        lines
    }

    fn preload_regular_file(&mut self) {
        let is_file = rustix::fs::fstat(rustix::stdio::stdin())
            .map(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_file())
            .unwrap_or(false);
        if is_file {
            let text = io::read_to_string(io::stdin()).unwrap_or_default();
            self.preloaded = text.lines().map(str::to_string).collect();
        }
    }

    /// Lines that arrived before the loop started (stdin was a regular file).
    pub fn take_preloaded(&mut self) -> Vec<String> {
        std::mem::take(&mut self.preloaded)
    }

    /// Drains what stdin has now; returns complete lines. At EOF the fd is
    /// deregistered and the process keeps running without stdin.
    pub fn read_lines(&mut self, registry: &Registry) -> Vec<String> {
        let mut buf = [0u8; 4096];
        while self.registered && stdin_has_data() {
            match rustix::io::read(rustix::stdio::stdin(), &mut buf) {
                Ok(n) if n > 0 => self.partial.extend_from_slice(&buf[..n]),
                Err(rustix::io::Errno::INTR) => continue,
                _ => {
                    log::debug!("stdin closed; continuing without it");
                    let _ = registry.deregister(&mut SourceFd(&STDIN_FD));
                    self.registered = false;
                    if !self.partial.is_empty() {
                        self.partial.push(b'\n');
                    }
                }
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line).trim().to_string());
        }
        lines
    }
}

/// A zero-timeout poll: true if a read on fd 0 would not block (data or EOF).
fn stdin_has_data() -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::from_borrowed_fd(
        rustix::stdio::stdin(),
        PollFlags::IN,
    )];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::IN | PollFlags::HUP | PollFlags::ERR)
}
