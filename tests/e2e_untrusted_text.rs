//! Hostile text from the network never reaches a terminal or a log raw.
//!
//! A raw client (frames built by hand from docs/PROTOCOL.md with byteorder,
//! not with our encoder) registers with a real manager, shares names holding
//! ESC sequences, newlines, U+202E and backspaces, and serves nothing but an
//! `Error` frame with a hostile reason. Every place a person could read that
//! text (stdout of `files`, `ls` and the manager's console, the stderr logs
//! of manager, peer and downloader, and a `--log-file`) must show it escaped.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::Duration;

use byteorder::{BigEndian, ReadBytesExt, WriteBytesExt};
use common::*;
use tempfile::TempDir;

/// Names the raw client shares, with how they must be shown.
const NAMES: &[(&str, &str)] = &[
    ("esc\u{1b}[31mred.txt", "esc\\x1b[31mred.txt"),
    ("two\nlines.txt", "two\\nlines.txt"),
    ("invoice\u{202e}fdp.exe", "invoice\\u{202e}fdp.exe"),
    (
        "back\u{8}\u{8}\u{8}space.txt",
        "back\\x08\\x08\\x08space.txt",
    ),
    ("c1\u{9b}2J\u{85}.txt", "c1\\u{9b}2J\\u{85}.txt"),
    ("café.txt", "café.txt"),
    ("文件.txt", "文件.txt"),
];

/// The reason the raw server refuses every request with: a forged log line,
/// a screen clear, a title change, a bidi override, backspaces, a C1 CSI.
const REASON: &str = "no\n2026-01-01T00:00:00Z [ERROR] forged line\u{1b}[2J\u{1b}]0;pwned\u{7}\u{202e}gnp.exe\u{8}\u{8}\u{9b}31m";
const REASON_SHOWN: &str = "no\\n2026-01-01T00:00:00Z [ERROR] forged line\\x1b[2J\\x1b]0;pwned\\x07\\u{202e}gnp.exe\\x08\\x08\\u{9b}31m";

// ---- frames by hand (docs/PROTOCOL.md) -------------------------------------

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.write_u32::<BigEndian>(1 + body.len() as u32).unwrap();
    f.push(kind);
    f.extend_from_slice(body);
    f
}

fn hello(role: u8) -> Vec<u8> {
    let mut b = b"SHOL".to_vec();
    b.write_u16::<BigEndian>(raw::VERSION).unwrap();
    b.push(role);
    frame(0x01, &b)
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.write_u16::<BigEndian>(s.len() as u16).unwrap();
    b.extend_from_slice(s.as_bytes());
}

fn register(port: u16) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u16::<BigEndian>(port).unwrap();
    b.push(0); // advertise: the address the manager sees
    frame(0x10, &b)
}

fn share_files(names: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u32::<BigEndian>(names.len() as u32).unwrap();
    for (i, name) in names.iter().enumerate() {
        put_str(&mut b, name);
        b.write_u64::<BigEndian>(1000 + i as u64).unwrap();
        b.extend_from_slice(&[i as u8 + 1; 32]);
    }
    frame(0x14, &b)
}

fn error(code: u16, reason: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.write_u16::<BigEndian>(code).unwrap();
    put_str(&mut b, reason);
    frame(0x02, &b)
}

/// Reads one frame: (kind, body).
fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let len = s.read_u32::<BigEndian>()? as usize;
    let kind = s.read_u8()?;
    let mut body = vec![0; len.saturating_sub(1)];
    s.read_exact(&mut body)?;
    Ok((kind, body))
}

// ---- the raw client ----------------------------------------------------------

/// Registers with the manager, shares [`NAMES`], answers pings from a thread,
/// and serves: every peer that connects gets `Hello` then `Error{NotFound, REASON}`.
fn raw_sharer(manager: SocketAddr) -> TcpStream {
    let server = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in server.incoming() {
            let Ok(mut conn) = conn else { continue };
            thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                let _ = read_frame(&mut conn); // their hello
                let mut out = hello(0x03);
                out.extend(error(0x0003, REASON));
                let _ = conn.write_all(&out);
                let _ = read_frame(&mut conn); // linger until they close
            });
        }
    });

    let mut s = TcpStream::connect(manager).unwrap();
    s.write_all(&hello(0x01)).unwrap();
    s.write_all(&register(port)).unwrap();
    loop {
        let (kind, _) = read_frame(&mut s).unwrap();
        if kind == 0x11 {
            break; // Welcome
        }
    }
    let names: Vec<&str> = NAMES.iter().map(|(raw, _)| *raw).collect();
    s.write_all(&share_files(&names)).unwrap();
    let mut pinger = s.try_clone().unwrap();
    thread::spawn(move || {
        while let Ok((kind, body)) = read_frame(&mut pinger) {
            if kind == 0x04 {
                let _ = pinger.write_all(&frame(0x05, &body)); // Pong, same nonce
            }
        }
    });
    s
}

// ---- checks ------------------------------------------------------------------

/// Panics if `text` holds any character that can drive or fool a terminal:
/// C0 controls (other than the newline ending each line), DEL, C1 controls,
/// bidi controls or other invisible format characters. Written out here
/// independently of `shoal::text`, so a gap there fails this test.
fn assert_clean(what: &str, text: &str) {
    for (i, c) in text.char_indices() {
        let u = c as u32;
        let bad = (u < 0x20 && c != '\n')
            || (0x7f..0xa0).contains(&u)
            || (0x202a..=0x202e).contains(&u)
            || (0x2066..=0x2069).contains(&u)
            || matches!(u, 0x200b..=0x200f | 0x061c | 0xfeff | 0x2028 | 0x2029);
        assert!(!bad, "{what}: raw {c:?} at byte {i}:\n{text}");
    }
    for line in text.lines() {
        assert!(
            !line.starts_with("lines.txt") && !line.starts_with("2026-01-01T00:00:00Z [ERROR]"),
            "{what}: a forged line: {line:?}\n{text}"
        );
    }
}

fn read_log(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    String::from_utf8(bytes).expect("the log file is UTF-8")
}

/// A sharing peer logging to `log`, not stderr; colours off so any ESC in
/// its output is one that came from the network.
fn peer_with_log_file(dir: &Path, manager: SocketAddr, log: &Path) -> Proc {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--manager", &manager.to_string(), "--rescan", "1", "-vv"])
        .arg("--log-file")
        .arg(log)
        .env("NO_COLOR", "1");
    let proc = Proc::spawn_cmd(cmd);
    wait_for(WAIT, "peer to start (log file)", || {
        read_log(log).contains("peer serving on")
    });
    proc
}

fn manager_no_color() -> (Proc, SocketAddr) {
    let mut cmd = Command::new(manager_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--heartbeat", "0.5"])
        .args(["--peer-timeout", "10", "-vv"])
        .env("NO_COLOR", "1");
    let proc = Proc::spawn_cmd(cmd);
    let mut addr = None;
    wait_for(WAIT, "manager to listen", || {
        addr = proc
            .stderr
            .text()
            .lines()
            .find_map(|l| l.split("manager listening on ").nth(1))
            .and_then(|a| a.split_whitespace().next()?.parse().ok());
        addr.is_some()
    });
    (proc, addr.unwrap())
}

fn assert_lists_escaped(what: &str, out: &str) {
    for (raw, shown) in NAMES {
        assert!(
            out.lines().any(|l| l.trim_start().starts_with(shown)),
            "{what}: {raw:?} not listed as {shown}:\n{out}"
        );
    }
}

#[test]
fn hostile_names_and_reasons_are_shown_escaped_everywhere() {
    let (mut manager, addr) = manager_no_color();
    let _sharer = raw_sharer(addr);
    wait_for(WAIT, "the hostile names to be listed", || {
        let (_, out, _) = peer_oneshot(addr, &["files"]);
        NAMES.iter().all(|(_, shown)| out.contains(shown))
    });

    // `peer files` on stdout.
    let (ok, out, err) = peer_oneshot(addr, &["files"]);
    assert!(ok, "{err}");
    assert_clean("peer files stdout", &out);
    assert_lists_escaped("peer files stdout", &out);

    // The manager's console.
    manager.stdout.clear();
    manager.send_line("files");
    wait_for(WAIT, "the manager's file list", || {
        manager.stdout.text().lines().count() > NAMES.len()
    });
    let console = manager.stdout.text();
    assert_clean("manager console", &console);
    assert_lists_escaped("manager console", &console);

    // A WhoHas with a name the manager must refuse: it logs and answers
    // with the name in its reason, both escaped.
    let bad = "x/\u{1b}[2J\u{202e}evil";
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut who_has = Vec::new();
    put_str(&mut who_has, bad);
    s.write_all(&hello(0x01)).unwrap();
    s.write_all(&frame(0x15, &who_has)).unwrap();
    let mut refusal = None;
    while let Ok((kind, body)) = read_frame(&mut s) {
        if kind == 0x02 {
            refusal = Some(String::from_utf8(body[4..].to_vec()).unwrap());
            break;
        }
    }
    let refusal = refusal.expect("the manager answers a bad name with Error");
    assert_clean("manager's error reason on the wire", &refusal);
    assert!(refusal.contains("x/\\x1b[2J\\u{202e}evil"), "{refusal}");

    // A full peer with a hostile local file too, logging to a file; it lists
    // the network, then tries to fetch a hostile name from the raw server.
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("local\u{1b}]0;t\u{7}\u{202e}.txt"), b"hi").unwrap();
    let logs = TempDir::new().unwrap(); // not in the shared folder
    let log = logs.path().join("peer.log");
    let mut peer = peer_with_log_file(dir.path(), addr, &log);
    wait_for(WAIT, "the local file to be hashed", || {
        read_log(&log).contains("hashed local")
    });
    peer.send_line("ls");
    peer.send_line("files");
    // Typed as `files` listed it: the escapes name the raw name.
    let get = format!("get {}", NAMES[0].1);
    peer.send_line(&get);
    wait_for(WAIT, "the peer's file list and the refusal", || {
        let out = peer.stdout.text();
        NAMES.iter().all(|(_, shown)| out.contains(shown))
            && out.contains("local\\x1b")
            && read_log(&log).contains("refused:")
    });
    let out = peer.stdout.text();
    assert_clean("peer stdout", &out);
    assert_lists_escaped("peer stdout", &out);
    assert!(out.contains("local\\x1b]0;t\\x07\\u{202e}.txt"), "{out}");
    let text = read_log(&log);
    assert_clean("peer --log-file", &text);
    assert!(text.contains(REASON_SHOWN), "{text}");
    assert!(text.contains("local\\x1b]0;t\\x07\\u{202e}.txt"), "{text}");
    assert_clean("peer stderr (empty with --log-file)", &peer.stderr.text());

    // `peer get` of a hostile name: the raw server refuses with a hostile
    // reason, and the downloader's stderr shows both escaped. The refusal is
    // logged; the name is in the line asking the manager.
    let dl = TempDir::new().unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dl.path())
        .args(["--manager", &addr.to_string(), "-v", "get", NAMES[2].0])
        .env("NO_COLOR", "1");
    let mut getter = Proc::spawn_cmd(cmd);
    // It keeps looking for a holder for a while; the refusal is what counts.
    wait_for(WAIT, "the downloader to log the refusal", || {
        getter.stderr.text().contains("refused")
    });
    getter.kill();
    let err = getter.stderr.text();
    assert_clean("downloader stderr", &err);
    assert!(err.contains(REASON_SHOWN), "{err}");
    assert!(err.contains(&format!("who has {}", NAMES[2].1)), "{err}");
    assert_clean("downloader stdout", &getter.stdout.text());

    // And the manager's own log, after all of the above.
    let mlog = manager.stderr.text();
    assert_clean("manager stderr", &mlog);
    assert!(mlog.contains("x/\\x1b[2J\\u{202e}evil"), "{mlog}");
}

/// A real seeder shares a file whose name holds an ESC sequence, a newline
/// and U+202E; `peer get`, given the name as `files` lists it, fetches it
/// under its raw name and prints its summary and logs escaped.
#[test]
fn a_hostile_name_is_fetched_by_its_listed_form_and_reported_escaped() {
    let (_manager, addr) = manager_no_color();
    let raw = "two\nlines\u{1b}[2J\u{202e}txt.exe";
    let shown = "two\\nlines\\x1b[2J\\u{202e}txt.exe";
    let seed_dir = TempDir::new().unwrap();
    write_pattern(&seed_dir.path().join(raw), 300_000, 5);
    let _seeder = Peer::start(seed_dir.path(), addr, &[]);
    wait_for(WAIT, "the seeder's file to be listed", || {
        peer_oneshot(addr, &["files"]).1.contains(shown)
    });

    let dl = TempDir::new().unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dl.path())
        .args(["--manager", &addr.to_string(), "-v", "get", shown])
        .env("NO_COLOR", "1");
    let mut getter = Proc::spawn_cmd(cmd);
    let status = getter.wait_exit(WAIT);
    let (out, err) = (getter.stdout.text(), getter.stderr.text());
    assert!(status.success(), "get failed:\n{err}");
    let got = std::fs::read(dl.path().join(raw)).expect("saved under its raw name");
    assert_eq!(got, std::fs::read(seed_dir.path().join(raw)).unwrap());
    assert_clean("get stdout", &out);
    assert_clean("get stderr", &err);
    assert!(
        out.contains(shown),
        "the summary names the file escaped:\n{out}"
    );
    // The saved path ends in the name too: escaped, it cannot start a line.
    for text in [&out, &err] {
        assert!(
            !text.lines().any(|l| l.starts_with("lines")),
            "a forged line:\n{text}"
        );
    }
}
