//! The manager under hostile registrations, end to end: the real binary and
//! raw TCP clients whose frames are built by hand from docs/PROTOCOL.md
//! with byteorder (not with our encoder), next to an honest `peer`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::{Receiver, channel};
use std::thread;
use std::time::{Duration, Instant};

use byteorder::{BigEndian, ReadBytesExt, WriteBytesExt};
use common::*;
use tempfile::TempDir;

const HELLO: u8 = 0x01;
const ERROR: u8 = 0x02;
const PING: u8 = 0x04;
const PONG: u8 = 0x05;
const REGISTER: u8 = 0x10;
const SHARE_FILES: u8 = 0x14;
const WHO_HAS: u8 = 0x15;
const HOLDERS: u8 = 0x16;

/// Per registration (docs/PROTOCOL.md, "Limits").
const MAX_SHARED_FILES: usize = 4096;

/// `u32` length (kind + body), `u8` kind, body.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(5 + body.len());
    f.write_u32::<BigEndian>(body.len() as u32 + 1).unwrap();
    f.push(kind);
    f.extend_from_slice(body);
    f
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.write_u16::<BigEndian>(s.len() as u16).unwrap();
    out.extend_from_slice(s.as_bytes());
}

/// Hello: magic "SHOL", the protocol version, role 1 (ManagerClient).
fn hello() -> Vec<u8> {
    let mut b = b"SHOL".to_vec();
    b.write_u16::<BigEndian>(raw::VERSION).unwrap();
    b.push(0x01);
    frame(HELLO, &b)
}

/// Register: listen port, advertise family 0 (none).
fn register(port: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u16::<BigEndian>(port).unwrap();
    b.push(0);
    frame(REGISTER, &b)
}

/// ShareFiles: `u32` count, then per file `str` name, `u64` size, 32-byte root.
fn share_files(files: &[(String, u64, [u8; 32])]) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u32::<BigEndian>(files.len() as u32).unwrap();
    for (name, size, root) in files {
        put_str(&mut b, name);
        b.write_u64::<BigEndian>(*size).unwrap();
        b.extend_from_slice(root);
    }
    frame(SHARE_FILES, &b)
}

fn who_has(name: &str) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, name);
    frame(WHO_HAS, &b)
}

/// One frame: (kind, body); None at EOF or on a read error.
fn read_frame(s: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let len = s.read_u32::<BigEndian>().ok()? as usize;
    let kind = s.read_u8().ok()?;
    let mut body = vec![0; len.checked_sub(1)?];
    s.read_exact(&mut body).ok()?;
    Some((kind, body))
}

/// A raw client: a thread reads every frame, answers pings, and passes
/// everything else on; another sends the keepalive (`Pong` 0) every 250 ms,
/// so a registered client stays listed (PROTOCOL.md section 5).
struct Raw {
    stream: TcpStream,
    frames: Receiver<(u8, Vec<u8>)>,
}

impl Raw {
    fn connect(manager: SocketAddr) -> Raw {
        let stream = TcpStream::connect(manager).unwrap();
        let mut reader = stream.try_clone().unwrap();
        let mut ponger = stream.try_clone().unwrap();
        let (tx, frames) = channel();
        thread::spawn(move || {
            while let Some((kind, body)) = read_frame(&mut reader) {
                if kind == PING {
                    let _ = ponger.write_all(&frame(PONG, &body));
                } else if tx.send((kind, body)).is_err() {
                    return;
                }
            }
        });
        let mut raw = Raw { stream, frames };
        raw.send(&hello());
        let mut keepalive = raw.stream.try_clone().unwrap();
        thread::spawn(move || {
            while keepalive
                .write_all(&frame(PONG, &0u64.to_be_bytes()))
                .is_ok()
            {
                thread::sleep(Duration::from_millis(250));
            }
        });
        raw
    }

    fn send(&mut self, bytes: &[u8]) {
        // The manager may close on us mid-write (a refusal): that is fine.
        let _ = self.stream.write_all(bytes);
    }

    /// The next frame of `kind` within `limit` (others are skipped).
    fn expect(&self, kind: u8, limit: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.frames.recv_timeout(left) {
                Ok((k, body)) if k == kind => return Some(body),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

fn files(prefix: &str, n: usize, root: u8) -> Vec<(String, u64, [u8; 32])> {
    (0..n)
        .map(|i| (format!("{prefix}-{i:05}"), i as u64, [root; 32]))
        .collect()
}

/// Error body: `u16` code, `str` reason.
fn error_code(body: &[u8]) -> (u16, String) {
    let mut c = body;
    let code = c.read_u16::<BigEndian>().unwrap();
    let n = c.read_u16::<BigEndian>().unwrap() as usize;
    (code, String::from_utf8_lossy(&c[..n]).into_owned())
}

#[test]
fn a_name_under_many_versions_neither_stalls_the_manager_nor_drops_the_honest() {
    let mut manager = Manager::start(1.0, 3.0);
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("hot"), b"the honest copy\n").unwrap();
    let mut honest = Peer::start(dir.path(), manager.addr, &[]);
    wait_for(WAIT, "the honest peer listed", || {
        network_peers(manager.addr) == vec![honest.addr]
    });

    // One registration with "hot" under 60,000 versions: its frame is over
    // the ShareFiles limit, refused from the header.
    let mut liar = Raw::connect(manager.addr);
    liar.send(&register(9000));
    let versions: Vec<(String, u64, [u8; 32])> = (0..60_000u64)
        .map(|v| ("hot".to_string(), v, [9; 32]))
        .collect();
    liar.send(&share_files(&versions));
    let err = liar.expect(ERROR, WAIT).expect("an error for the liar");
    assert_eq!(error_code(&err).0, 0x0007, "{:?}", error_code(&err));
    // Within the frame limit but "hot" twice: refused for what it says.
    let mut liar2 = Raw::connect(manager.addr);
    liar2.send(&register(9001));
    liar2.send(&share_files(&versions[..MAX_SHARED_FILES]));
    let err = liar2.expect(ERROR, WAIT).expect("an error for liar 2");
    let (code, reason) = error_code(&err);
    assert_eq!(code, 0x0007);
    assert!(reason.contains("two versions"), "{reason}");

    // 50 registrations at the file limit, each with its own version of
    // "hot": 50 versions of one name, 200,000 index entries.
    let mut sybils: Vec<Raw> = (0..50u16)
        .map(|k| {
            let mut r = Raw::connect(manager.addr);
            r.send(&register(10_000 + k));
            let mut set = files(&format!("s{k}"), MAX_SHARED_FILES - 1, 1);
            set.push(("hot".to_string(), 1000 + u64::from(k), [k as u8; 32]));
            r.send(&share_files(&set));
            r
        })
        .collect();

    // One of them floods: WhoHas bursts and full re-shares at the limit.
    let mut flooder = sybils.pop().unwrap();
    let flood = thread::spawn(move || {
        let sets = [
            files("fa", MAX_SHARED_FILES, 2),
            files("fb", MAX_SHARED_FILES, 3),
        ];
        let frames = [share_files(&sets[0]), share_files(&sets[1])];
        let start = Instant::now();
        let mut k = 0;
        while start.elapsed() < Duration::from_secs(8) {
            for _ in 0..50 {
                flooder.send(&who_has("hot"));
            }
            flooder.send(&frames[k % 2]);
            k += 1;
            thread::sleep(Duration::from_millis(20));
        }
        k
    });

    // Meanwhile every question is answered promptly; once all 50 shares are
    // in, the answer is cut to the limits and says so.
    let mut asker = Raw::connect(manager.addr);
    let mut ask = || {
        let sent = Instant::now();
        asker.send(&who_has("hot"));
        let body = asker.expect(HOLDERS, WAIT).expect("a holders answer");
        let took = sent.elapsed();
        assert!(took < Duration::from_secs(2), "WhoHas took {took:?}");
        let mut c = &body[..];
        let n = c.read_u16::<BigEndian>().unwrap() as usize;
        assert_eq!(&c[..n], b"hot");
        c = &c[n..];
        let truncated = c.read_u8().unwrap();
        let groups = c.read_u32::<BigEndian>().unwrap();
        (truncated, groups)
    };
    wait_for(WAIT, "all shares indexed", || ask() == (1, 32));
    for _ in 0..8 {
        assert_eq!(ask(), (1, 32), "51 versions, 32 listed");
        thread::sleep(Duration::from_millis(500));
    }
    let rounds = flood.join().unwrap();
    assert!(rounds > 20, "the flood ran ({rounds} rounds)");

    // The honest peer was never dropped nor lost its manager.
    let listed = network_peers(manager.addr);
    assert!(listed.contains(&honest.addr), "{listed:?}");
    assert_eq!(manager.peer_count(), 1 + 50, "honest + sybils (liars gone)");
    let log = honest.proc.stderr.text();
    assert!(!log.contains("lost the manager"), "{log}");
    assert!(!log.contains("silent"), "{log}");
    assert!(honest.listed_addrs().contains(&honest.addr));
    drop(sybils);
}
