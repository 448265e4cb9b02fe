//! The command line as a new user meets it, with the real binaries: names
//! with spaces, `--json`, colour, an absent manager, host names, units, exit
//! codes, and the README against `--help`.

mod common;

use std::ffi::CStr;
use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tempfile::TempDir;

/// What "fails within 5 s" allows, measured around the whole process.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// Runs `peer ARGS` to completion with stdin closed.
fn peer(args: &[&str]) -> Output {
    peer_env(args, &[])
}

fn peer_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(peer_bin());
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run peer")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `peer files --json`, parsed.
fn files_json(manager: SocketAddr) -> Value {
    let out = peer(&["--manager", &manager.to_string(), "files", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("files --json is one JSON document")
}

/// Waits until the manager lists every one of `names`.
fn wait_listed(manager: SocketAddr, names: &[&str]) {
    wait_for(WAIT, "the files to be listed", || {
        let doc = files_json(manager);
        let listed: Vec<&str> = doc["files"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|f| f["name"].as_str())
            .collect();
        names.iter().all(|n| listed.contains(n))
    });
}

/// A seeding peer in a fresh folder holding `files` (name, content).
fn seeder(manager: SocketAddr, files: &[(&str, &[u8])]) -> (TempDir, Peer) {
    let dir = TempDir::new().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let peer = Peer::start(dir.path(), manager, &[]);
    let names: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
    wait_listed(manager, &names);
    (dir, peer)
}

/// A loopback port nobody listens on (bound, then released).
fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A listener that accepts every connection and never sends a byte.
fn mute_listener() -> (SocketAddr, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().map_while(Result::ok) {
            keep.lock().unwrap().push(s);
        }
    });
    (addr, held)
}

#[test]
fn the_prompt_takes_names_with_spaces_and_quoted_names() {
    let manager = Manager::start(0.5, 3.0);
    let files: [(&str, &[u8]); 3] = [
        ("my file.txt", b"spaces in the name\n"),
        ("a b.txt", b"quoted\n"),
        ("two  spaces.txt", b"double space\n"),
    ];
    let (src, _seed) = seeder(manager.addr, &files);
    let dl = TempDir::new().unwrap();
    let mut p = Peer::start(dl.path(), manager.addr, &[]);

    p.proc.send_line("help");
    wait_for(WAIT, "help", || {
        p.proc.stdout.text().contains("spaces included")
    });
    // One download at a time: each line waits for the file before the next.
    let typed: [&[&str]; 3] = [
        &["get my file.txt   "],
        &["get \"a b.txt\""],
        &["1", "two  spaces.txt"],
    ];
    for ((name, _), lines) in files.iter().zip(typed) {
        for line in lines {
            p.proc.send_line(line);
        }
        let want = std::fs::read(src.path().join(name)).unwrap();
        let got = dl.path().join(name);
        wait_for(WAIT, &format!("{name} to arrive"), || {
            std::fs::read(&got).is_ok_and(|b| b == want)
        });
    }
    assert!(!p.proc.stdout.text().contains("unknown command"));
}

#[test]
fn a_one_shot_get_of_a_name_with_spaces_is_quiet_and_exact() {
    let manager = Manager::start(0.5, 3.0);
    let (src, _seed) = seeder(manager.addr, &[("my file.txt", b"0123456789\n")]);
    let dl = TempDir::new().unwrap();
    let m = manager.addr.to_string();
    let dir = dl.path().to_str().unwrap();
    let out = peer(&["--dir", dir, "--manager", &m, "get", "my file.txt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(dl.path().join("my file.txt")).unwrap(),
        std::fs::read(src.path().join("my file.txt")).unwrap()
    );
    // Warnings only unless -v: nothing at all on a clean run.
    assert_eq!(text(&out.stderr), "", "a quiet get logs nothing");
    assert!(
        text(&out.stdout).contains("my file.txt"),
        "{}",
        text(&out.stdout)
    );

    // -v brings the log back.
    let dl2 = TempDir::new().unwrap();
    let dir2 = dl2.path().to_str().unwrap();
    let out = peer(&["--dir", dir2, "--manager", &m, "-v", "get", "my file.txt"]);
    assert!(out.status.success());
    assert!(text(&out.stderr).contains("INFO"), "{}", text(&out.stderr));
}

#[test]
fn json_lists_parse_and_keep_odd_names_exact() {
    let manager = Manager::start(0.5, 3.0);
    let odd = "say \"hi\" \u{e9}t\u{e9} \u{1f41f}\ttab\u{1b}[31m.bin";
    let (src, seed) = seeder(manager.addr, &[(odd, b"odd"), ("plain.txt", b"plain!")]);
    let doc = files_json(manager.addr);
    let files = doc["files"].as_array().expect("a files array");
    assert_eq!(files.len(), 2);
    let f = files
        .iter()
        .find(|f| f["name"] == odd)
        .expect("the odd name");
    assert_eq!(f["size"], 3);
    assert_eq!(f["holders"], 1);
    let root = f["root"].as_str().unwrap();
    assert!(root.len() == 64 && root.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(
        files.iter().find(|f| f["name"] == "plain.txt").unwrap()["size"],
        6
    );

    let m = manager.addr.to_string();
    let out = peer(&["--manager", &m, "peers", "--json"]);
    assert!(out.status.success());
    let doc: Value = serde_json::from_slice(&out.stdout).expect("peers --json parses");
    let peers = doc["peers"].as_array().expect("a peers array");
    assert_eq!(peers.len(), 1);
    assert!(peers[0]["id"].is_u64());
    assert_eq!(peers[0]["addr"], seed.addr.to_string());

    // The human list shows the escape character escaped, not raw.
    let out = peer(&["--manager", &m, "files"]);
    let human = text(&out.stdout);
    assert!(!human.contains('\u{1b}'), "{human:?}");
    assert!(human.contains("\\x1b[31m.bin"), "{human:?}");
    drop(src);
}

#[test]
fn an_unreachable_manager_fails_get_peers_and_files_within_5_s() {
    let dl = TempDir::new().unwrap();
    let dir = dl.path().to_str().unwrap().to_string();
    let dead = dead_port();
    let (mute, _held) = mute_listener();
    // All six at once: each is bounded on its own, and the test stays short.
    let mut runs = Vec::new();
    for addr in [dead, mute] {
        let m = addr.to_string();
        let cases: [Vec<String>; 3] = [
            vec!["--manager".into(), m.clone(), "peers".into()],
            vec!["--manager".into(), m.clone(), "files".into()],
            vec![
                "--dir".into(),
                dir.clone(),
                "--manager".into(),
                m.clone(),
                "get".into(),
                "x.bin".into(),
            ],
        ];
        for args in cases {
            let m = m.clone();
            runs.push(std::thread::spawn(move || {
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let start = Instant::now();
                let out = peer(&argv);
                (args, m, start.elapsed(), out)
            }));
        }
    }
    for run in runs {
        let (args, m, took, out) = run.join().unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(took < FAIL_FAST, "{args:?} took {took:?}");
        assert!(err.contains(&m), "{args:?}: the message names {m}: {err}");
        assert!(
            err.contains("--manager"),
            "{args:?}: says what to check: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{args:?}: said once: {err}");
        assert!(
            text(&out.stdout).is_empty(),
            "{args:?}: errors go to stderr"
        );
    }
}

#[test]
fn an_interactive_peer_says_once_that_the_manager_is_away_and_keeps_trying() {
    let addr = dead_port();
    let dl = TempDir::new().unwrap();
    let mut p = Peer::start(dl.path(), addr, &[]);
    // Tries at 0, 0.25, 0.75, 1.75 s: several failures, one warning.
    wait_for(WAIT, "retries", || {
        p.proc.stderr.text().matches("manager still away").count() >= 3
    });
    let warned = |p: &Peer| {
        p.proc
            .stderr
            .text()
            .matches("cannot reach the manager")
            .count()
    };
    assert_eq!(warned(&p), 1, "{}", p.proc.stderr.text());
    // A question meanwhile is answered at once, not after the next retry.
    p.proc.send_line("files");
    wait_for(FAIL_FAST, "files to fail", || {
        p.proc
            .stdout
            .text()
            .contains("cannot list the network's files")
    });
    assert!(p.proc.stdout.text().contains(&addr.to_string()));
    // The manager comes up: the peer joins on its own.
    let mut manager = Manager::start_on(&addr.to_string(), 0.5, 3.0);
    wait_for(WAIT, "the peer to register", || {
        p.proc.stderr.text().contains("registered with the manager")
    });
    assert_eq!(warned(&p), 1);
    // It goes away again: one more warning for the new outage.
    manager.proc.kill();
    wait_for(WAIT, "the new outage", || warned(&p) == 2);
    wait_for(WAIT, "retries", || {
        p.proc.stderr.text().matches("manager still away").count() >= 5
    });
    assert_eq!(warned(&p), 2);
    assert!(p.proc.is_running());
}

/// A pseudo-terminal: the master to read, and the path of the slave end.
fn open_pty() -> (File, String) {
    // SAFETY: plain libc calls on a descriptor this function owns; ptsname's
    // buffer is copied before any other pty call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(master), 0);
        assert_eq!(libc::unlockpt(master), 0);
        let name = libc::ptsname(master);
        assert!(!name.is_null());
        let path = CStr::from_ptr(name).to_string_lossy().into_owned();
        (File::from_raw_fd(master), path)
    }
}

/// Runs an interactive peer (manager absent) until it logs that it serves,
/// with stderr on a terminal, and returns what it wrote there.
fn stderr_on_a_terminal(env: &[(&str, &str)]) -> String {
    let (mut master, slave) = open_pty();
    let dl = TempDir::new().unwrap();
    let tty = File::options().write(true).open(&slave).unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dl.path())
        .args(["--manager", &dead_port().to_string()])
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(tty);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let buf = seen.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = master.read(&mut chunk) {
            if n == 0 {
                break;
            }
            buf.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    let read = || text(&seen.lock().unwrap());
    wait_for(WAIT, "the peer to log on the terminal", || {
        read().contains("peer serving on")
    });
    let _ = child.kill();
    let _ = child.wait();
    read()
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    // The check can see colour: on a terminal, the levels are coloured.
    let tty = stderr_on_a_terminal(&[]);
    assert!(
        tty.contains('\u{1b}'),
        "expected colour on a terminal: {tty:?}"
    );
    let no_color = stderr_on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(!no_color.contains('\u{1b}'), "{no_color:?}");
    assert!(no_color.contains("[INFO]"));

    // A pipe: no colour even with a colour-capable TERM.
    let dl = TempDir::new().unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dl.path())
        .args(["--manager", &dead_port().to_string()])
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR");
    let p = Proc::spawn_cmd(cmd);
    wait_for(WAIT, "the peer to log", || {
        p.stderr.text().contains("peer serving on")
    });
    let piped = p.stderr.text();
    assert!(!piped.contains('\u{1b}'), "{piped:?}");
}

#[test]
fn host_names_are_taken_and_bad_ones_refused() {
    let manager = Manager::start_on("localhost:0", 0.5, 3.0);
    let port = manager.addr.port();
    let by_name = format!("localhost:{port}");
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("n.txt"), b"by name").unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir").arg(dir.path()).args([
        "--manager",
        &by_name,
        "--listen",
        "localhost:0",
        "--advertise",
        "localhost:4567",
        "-v",
    ]);
    let p = Proc::spawn_cmd(cmd);
    wait_for(WAIT, "the peer to register", || {
        p.stderr.text().contains("registered with the manager")
    });
    let out = peer(&["--manager", &by_name, "peers", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["peers"][0]["addr"], "127.0.0.1:4567");

    let out = peer(&["--manager", "no-such-host.invalid:10000", "peers"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot resolve") && err.contains("no-such-host.invalid"),
        "{err}"
    );
    let out = peer(&["--manager", "localhost", "peers"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no port"));
}

#[test]
fn a_bare_number_is_refused_with_a_hint() {
    let out = peer(&["--upload-limit", "20", "--dir", ".", "peers"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("add a unit, e.g. 20MiB or 500KB"), "{err}");
    // With a unit it is accepted (this then fails on the absent manager: 1, not 2).
    let m = dead_port().to_string();
    let out = peer(&["--upload-limit", "20MiB", "--manager", &m, "peers"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

#[test]
fn a_name_clash_is_reported_once_with_exit_code_1() {
    let manager = Manager::start(0.5, 3.0);
    let (_src, _seed) = seeder(manager.addr, &[("x.txt", b"theirs")]);
    let dl = TempDir::new().unwrap();
    std::fs::write(dl.path().join("x.txt"), b"mine").unwrap();
    let m = manager.addr.to_string();
    let dir = dl.path().to_str().unwrap();
    let out = peer(&["--dir", dir, "--manager", &m, "get", "x.txt"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert_eq!(
        err.matches("already holds a different x.txt").count(),
        1,
        "{err}"
    );
    assert_eq!(std::fs::read(dl.path().join("x.txt")).unwrap(), b"mine");
}

#[test]
fn usage_errors_exit_2() {
    let out = peer(&["get", "x"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--dir"));
    assert!(out.stdout.is_empty());
    assert_eq!(peer(&["--frobnicate"]).status.code(), Some(2));
    // An allow list means nothing on an open network.
    let dir = tempfile::tempdir().unwrap();
    let out = peer(&["--dir", dir.path().to_str().unwrap(), "--allow", "keys.txt"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--allow needs a network key"));
}

#[test]
fn manager_timers_that_would_drop_live_peers_are_refused() {
    let manager = |args: &[&str]| Command::new(manager_bin()).args(args).output().unwrap();
    // Peers send keepalives at most every 100 ms.
    let out = manager(&["--heartbeat", "0.05", "--peer-timeout", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--heartbeat (0.05) must be at least 0.1 s"),
        "{}",
        text(&out.stderr)
    );
    let out = manager(&["--heartbeat", "2", "--peer-timeout", "2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("must be longer than --heartbeat"));
}

/// Every flag `--help` lists is in the README, and every flag the README
/// lists in its tables is one `--help` knows.
#[test]
fn the_readme_lists_the_flags_that_help_shows() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let flags = |help: &str| -> Vec<String> {
        let mut v: Vec<String> = help
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_string)
            .collect();
        v.sort();
        v.dedup();
        v
    };
    let help_of = |bin: &str, args: &[&str]| {
        let out = Command::new(bin).args(args).output().unwrap();
        assert!(out.status.success());
        text(&out.stdout)
    };
    let mut shown = Vec::new();
    for (bin, args) in [
        (manager_bin(), vec!["--help"]),
        (peer_bin(), vec!["--help"]),
        (peer_bin(), vec!["get", "--help"]),
        (peer_bin(), vec!["peers", "--help"]),
        (peer_bin(), vec!["files", "--help"]),
    ] {
        for flag in flags(&help_of(bin, &args)) {
            if flag != "--help" && flag != "--version" {
                assert!(
                    readme.contains(&format!("`{flag}")),
                    "{flag} (from {args:?}) is not in the README"
                );
            }
            shown.push(flag);
        }
    }
    for line in readme.lines().filter(|l| l.starts_with("| `--")) {
        for flag in flags(line) {
            assert!(
                shown.contains(&flag),
                "README lists {flag}, --help does not"
            );
        }
    }
}
