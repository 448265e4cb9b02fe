//! Sealed networks with the real binaries: the network key keeps strangers
//! out of the manager and of serving peers, tampering closes a connection,
//! identities stop a registration that advertises someone else's address,
//! `--allow` admits listed keys only, and a manager refuses to run open on a
//! non-loopback address.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A key as `manager --key-file` prints it (52 base32 letters).
const KEY: &str = "sy3u4u3oduiiyr2qjtxlg5vngv2ljmcfucmwz5ikbjetz3jiazba";
const OTHER_KEY: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn listening(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines()
        .find_map(|l| l.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
}

/// A keyed manager on a loopback ephemeral port, with `extra` flags.
fn keyed_manager(extra: &[&str]) -> Manager {
    keyed_manager_on("127.0.0.1:0", extra)
}

fn keyed_manager_on(listen: &str, extra: &[&str]) -> Manager {
    let mut cmd = Command::new(manager_bin());
    cmd.args(["--listen", listen, "--heartbeat", "0.5"])
        .args(["--peer-timeout", "2", "-v", "--key", KEY])
        .args(extra);
    let proc = Proc::spawn_cmd(cmd);
    let mut addr = None;
    wait_for(WAIT, "manager to listen", || {
        addr = listening(&proc.stderr.text(), "manager listening on ");
        addr.is_some()
    });
    Manager {
        proc,
        addr: addr.unwrap(),
    }
}

fn keyed_peer(dir: &Path, manager: SocketAddr, key: &str, extra: &[&str]) -> Peer {
    let mut args = vec!["--key", key];
    args.extend_from_slice(extra);
    Peer::start(dir, manager, &args)
}

/// The `peers --json` answer's keys, by address.
fn listed_keys(manager: SocketAddr) -> Vec<(SocketAddr, String)> {
    listed_keys_as(manager, &[])
}

/// The same, asked with extra flags (`--dir D` proves D's identity).
fn listed_keys_as(manager: SocketAddr, extra: &[&str]) -> Vec<(SocketAddr, String)> {
    let mut args = vec!["--key", KEY];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["peers", "--json"]);
    let (ok, out, err) = peer_oneshot(manager, &args);
    assert!(ok, "peers --json failed: {err}");
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    doc["peers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["addr"].as_str().unwrap().parse().unwrap(),
                p["key"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn show_id(dir: &Path) -> String {
    let out = Command::new(peer_bin())
        .arg("--dir")
        .arg(dir)
        .arg("--show-id")
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn wait_listed(manager: SocketAddr, n: usize) {
    wait_for(WAIT, "peers to be listed", || {
        listed_keys(manager).len() == n
    });
}

#[test]
fn wrong_or_no_key_is_refused_by_the_manager_and_never_listed() {
    let mut m = keyed_manager(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for d in [&a, &b, &c] {
        std::fs::create_dir(d).unwrap();
    }
    let good = keyed_peer(&a, m.addr, KEY, &[]);
    let _wrong = keyed_peer(&b, m.addr, OTHER_KEY, &[]);
    let _none = Peer::start(&c, m.addr, &[]);
    wait_listed(m.addr, 1);
    wait_for(WAIT, "both refusals logged", || {
        let log = m.proc.stderr.text();
        log.contains("does not hold this network's key") && log.contains("no network key")
    });
    thread::sleep(Duration::from_secs(1));
    let listed = listed_keys(m.addr);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].0, good.addr);
    assert_eq!(listed[0].1, show_id(&a), "listed with the key it proved");
    assert_eq!(m.peer_count(), 1);

    // A one-shot query without the key is told what it needs.
    let (ok, _, err) = peer_oneshot(m.addr, &["peers"]);
    assert!(!ok);
    assert!(
        err.contains("this network needs a key: --key or SHOAL_KEY"),
        "{err}"
    );
    let (ok, _, err) = peer_oneshot(m.addr, &["--key", OTHER_KEY, "peers"]);
    assert!(!ok);
    assert!(err.contains("handshake"), "{err}");
    // SHOAL_KEY works as --key does.
    let out = Command::new(peer_bin())
        .args(["--manager", &m.addr.to_string(), "peers"])
        .env("SHOAL_KEY", KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Connects, sends `bytes`, and returns what came back before the close
/// and how long the close took.
fn poke(addr: SocketAddr, bytes: &[u8]) -> (Vec<u8>, Duration) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let start = Instant::now();
    s.write_all(bytes).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    (got, start.elapsed())
}

#[test]
fn a_serving_peer_refuses_strangers_and_a_stalled_handshake_times_out() {
    let m = keyed_manager(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir(&a).unwrap();
    write_pattern(&a.join("f.bin"), 300_000, 1);
    let mut seeder = keyed_peer(&a, m.addr, KEY, &[]);

    // A client speaking plain shoal gets one error frame saying what it
    // needs, and is closed at once; the serving core never saw it.
    let (got, took) = poke(seeder.addr, &common::raw::hello(1));
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("this network needs a key"), "{text:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Random bytes that are no handshake: closed, nothing learned.
    let mut junk = vec![0x00, 0x30];
    junk.extend_from_slice(&[0x5a; 48]);
    let (got, took) = poke(seeder.addr, &junk);
    assert!(got.is_empty(), "a stranger learns nothing: {got:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // One byte, then silence: closed by the handshake timeout, both by
    // the serving peer and by the manager.
    for addr in [seeder.addr, m.addr] {
        let (got, took) = poke(addr, &[0x00]);
        assert!(got.is_empty());
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(10),
            "closed after {took:?}"
        );
    }
    wait_for(WAIT, "the refusals logged", || {
        let log = seeder.proc.stderr.text();
        log.contains("no network key") && log.contains("no handshake within")
    });

    // A downloader with another key gets nothing from it either.
    let b = tmp.path().join("b");
    std::fs::create_dir(&b).unwrap();
    let out = Command::new(peer_bin())
        .arg("--dir")
        .arg(&b)
        .args([
            "--manager",
            &m.addr.to_string(),
            "--key",
            OTHER_KEY,
            "get",
            "f.bin",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!b.join("f.bin").exists());
    // With the key it works.
    let out = Command::new(peer_bin())
        .arg("--dir")
        .arg(&b)
        .args([
            "--manager",
            &m.addr.to_string(),
            "--key",
            KEY,
            "get",
            "f.bin",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(b.join("f.bin")).unwrap(),
        std::fs::read(a.join("f.bin")).unwrap()
    );
    seeder.proc.kill();
}

/// A relay from `listener` to `target` that flips one byte of the
/// server-to-client stream at `flip_at` in its first connection.
fn tampering_relay(listener: TcpListener, target: SocketAddr, flip_at: usize) {
    thread::spawn(move || {
        let mut first = true;
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(server) = TcpStream::connect(target) else {
                return;
            };
            let flip = first.then_some(flip_at);
            first = false;
            let (mut c1, mut s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            thread::spawn(move || {
                let _ = std::io::copy(&mut c1, &mut s1);
                let _ = s1.shutdown(std::net::Shutdown::Write);
            });
            let (mut c2, mut s2) = (client, server);
            thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                let mut at = 0usize;
                loop {
                    let n = match s2.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if let Some(f) = flip
                        && (at..at + n).contains(&f)
                    {
                        buf[f - at] ^= 0x01;
                    }
                    at += n;
                    if c2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
}

#[test]
fn a_flipped_byte_closes_that_connection_and_the_download_completes_from_others() {
    let m = keyed_manager(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (a, c, d) = (
        tmp.path().join("a"),
        tmp.path().join("c"),
        tmp.path().join("d"),
    );
    for dir in [&a, &c, &d] {
        std::fs::create_dir(dir).unwrap();
    }
    let len = 8 << 20;
    write_pattern(&a.join("f.bin"), len, 7);
    std::fs::copy(a.join("f.bin"), c.join("f.bin")).unwrap();
    // Seeder A is reached only through the relay (it advertises the relay).
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let seeder_a = keyed_peer(&a, m.addr, KEY, &["--advertise", &relay_addr.to_string()]);
    // Byte 1 MiB is inside the chunk data A sends (past the handshake and
    // the 8 KiB manifest). C is capped, so the download is still running
    // when A, uncapped, gets that far.
    tampering_relay(relay, seeder_a.addr, 1 << 20);
    let _seeder_c = keyed_peer(&c, m.addr, KEY, &["--upload-limit", "2MiB"]);
    wait_for(WAIT, "both seeders to share f.bin", || {
        let (ok, out, _) = peer_oneshot(m.addr, &["--key", KEY, "files"]);
        ok && out.contains("2 holders")
    });
    let out = Command::new(peer_bin())
        .arg("--dir")
        .arg(&d)
        .args([
            "--manager",
            &m.addr.to_string(),
            "--key",
            KEY,
            "-v",
            "get",
            "f.bin",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("failed its authentication check"), "{log}");
    assert_eq!(
        std::fs::read(d.join("f.bin")).unwrap(),
        std::fs::read(a.join("f.bin")).unwrap()
    );
}

#[test]
fn a_registration_advertising_another_peers_address_is_not_used() {
    let m = keyed_manager(&[]);
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, d) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("d"),
    );
    for dir in [&a, &b, &d] {
        std::fs::create_dir(dir).unwrap();
    }
    write_pattern(&a.join("f.bin"), 2 << 20, 3);
    std::fs::copy(a.join("f.bin"), b.join("f.bin")).unwrap();
    let seeder = keyed_peer(&a, m.addr, KEY, &[]);
    // B holds the key but claims A's address.
    let _liar = keyed_peer(&b, m.addr, KEY, &["--advertise", &seeder.addr.to_string()]);
    wait_for(WAIT, "both registrations to share f.bin", || {
        let (ok, out, _) = peer_oneshot(m.addr, &["--key", KEY, "files"]);
        ok && out.contains("2 holders")
    });
    let listed = listed_keys(m.addr);
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().all(|(addr, _)| *addr == seeder.addr));
    let b_key = show_id(&b);
    assert!(listed.iter().any(|(_, k)| *k == b_key));
    let out = Command::new(peer_bin())
        .arg("--dir")
        .arg(&d)
        .args([
            "--manager",
            &m.addr.to_string(),
            "--key",
            KEY,
            "-v",
            "get",
            "f.bin",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("dropping peer")
                && l.contains(&format!("the manager listed {b_key}"))),
        "the entry with B's key was not used: {log}"
    );
}

#[test]
fn allow_admits_listed_keys_only_and_is_reread_on_change() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    for dir in [&a, &b] {
        std::fs::create_dir(dir).unwrap();
    }
    let (ka, kb) = (show_id(&a), show_id(&b));
    assert_ne!(ka, kb);
    assert_eq!(show_id(&a), ka, "the identity is kept");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(a.join(".shoal/identity"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let allow = tmp.path().join("allow");
    std::fs::write(&allow, format!("# known machines\n{ka} a\n")).unwrap();
    let mut m = keyed_manager(&["--allow", allow.to_str().unwrap()]);
    let pa = keyed_peer(&a, m.addr, KEY, &[]);
    let _pb = keyed_peer(&b, m.addr, KEY, &[]);
    let as_a = ["--dir", a.to_str().unwrap()];
    wait_for(WAIT, "a listed", || {
        listed_keys_as(m.addr, &as_a).len() == 1
    });
    wait_for(WAIT, "b refused", || {
        m.proc
            .stderr
            .text()
            .contains(&format!("its key {kb} is not in the allow list"))
    });
    assert_eq!(listed_keys_as(m.addr, &as_a), vec![(pa.addr, ka.clone())]);
    // A question from an unlisted key is refused too.
    let (ok, _, _) = peer_oneshot(m.addr, &["--key", KEY, "peers"]);
    assert!(!ok, "an unlisted one-shot query was answered");
    // Adding b's key lets it in on its next try.
    std::fs::write(&allow, format!("{ka}\n{kb}\n")).unwrap();
    wait_for(WAIT, "b admitted", || {
        listed_keys_as(m.addr, &as_a).len() == 2
    });
    assert_eq!(m.peer_count(), 2);
}

/// The manager's key as it logs it at start.
fn manager_key(m: &Manager) -> String {
    let log = m.proc.stderr.text();
    log.lines()
        .find_map(|l| l.split("manager key ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the manager logs its key")
        .to_string()
}

#[test]
fn a_key_removed_from_allow_drops_its_member_on_sighup() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        tmp.path().join("a"),
        tmp.path().join("b"),
        tmp.path().join("c"),
    );
    for dir in [&a, &b, &c] {
        std::fs::create_dir(dir).unwrap();
    }
    let (ka, kb, kc) = (show_id(&a), show_id(&b), show_id(&c));
    let allow = tmp.path().join("allow");
    std::fs::write(&allow, format!("{ka}\n{kb}\n")).unwrap();
    let mut m = keyed_manager(&["--allow", allow.to_str().unwrap()]);
    let pa = keyed_peer(&a, m.addr, KEY, &[]);
    let mut pb = keyed_peer(&b, m.addr, KEY, &[]);
    let as_a = ["--dir", a.to_str().unwrap()];
    wait_for(WAIT, "a and b listed", || {
        listed_keys_as(m.addr, &as_a).len() == 2
    });
    // Swap b's key for c's in place: same inode, same size, and the old
    // mtime put back, so only the SIGHUP can tell the manager to reread.
    let before = std::fs::metadata(&allow).unwrap();
    std::fs::write(&allow, format!("{ka}\n{kc}\n")).unwrap();
    use std::os::unix::fs::MetadataExt;
    let stamp = format!("@{}.{:09}", before.mtime(), before.mtime_nsec());
    let touched = Command::new("touch")
        .args(["-m", "-d", &stamp])
        .arg(&allow)
        .status()
        .unwrap();
    assert!(touched.success());
    thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        listed_keys_as(m.addr, &as_a).len(),
        2,
        "an unchanged stamp is not reread before the SIGHUP"
    );
    m.proc.signal("HUP");
    wait_for(WAIT, "b dropped", || {
        m.proc
            .stderr
            .text()
            .contains(&format!("its key {kb} was removed from the allow list"))
    });
    wait_for(WAIT, "b gone from the list", || {
        listed_keys_as(m.addr, &as_a) == vec![(pa.addr, ka.clone())]
    });
    assert_eq!(m.peer_count(), 1);
    // b's connection was closed, with the reason, and its retries are
    // refused at the handshake.
    wait_for(WAIT, "b told why", || {
        pb.proc
            .stderr
            .text()
            .contains("removed from the manager's allow list")
    });
    wait_for(WAIT, "b's retry refused", || {
        m.proc
            .stderr
            .text()
            .contains(&format!("its key {kb} is not in the allow list"))
    });
    assert!(pb.proc.is_running());
    assert_eq!(listed_keys_as(m.addr, &as_a).len(), 1);
}

#[test]
fn a_manager_with_another_identity_at_a_known_address_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    std::fs::create_dir(&a).unwrap();
    let (id1, id2) = (tmp.path().join("id1"), tmp.path().join("id2"));
    let m1 = keyed_manager(&["--identity-file", id1.to_str().unwrap()]);
    let addr = m1.addr;
    let k1 = manager_key(&m1);
    let mut pa = keyed_peer(&a, addr, KEY, &[]);
    wait_listed(addr, 1);
    let pins = a.join(".shoal/managers");
    wait_for(WAIT, "the manager's key pinned", || {
        std::fs::read_to_string(&pins).is_ok_and(|t| t.contains(&format!("{addr} {k1}")))
    });
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&pins).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    pa.proc.kill();
    drop(m1);

    // The same identity again at the same address: accepted.
    let m1 = keyed_manager_on(
        &addr.to_string(),
        &["--identity-file", id1.to_str().unwrap()],
    );
    assert_eq!(manager_key(&m1), k1, "the identity file is kept");
    let mut pa = keyed_peer(&a, addr, KEY, &[]);
    wait_listed(addr, 1);
    pa.proc.kill();
    drop(m1);

    // Another identity, same network key, same address: refused, saying
    // what changed and how to accept it.
    let m2 = keyed_manager_on(
        &addr.to_string(),
        &["--identity-file", id2.to_str().unwrap()],
    );
    let k2 = manager_key(&m2);
    assert_ne!(k1, k2);
    let mut pa = keyed_peer(&a, addr, KEY, &[]);
    let status = pa.proc.wait_exit(WAIT);
    assert!(!status.success());
    let err = pa.proc.stderr.text();
    assert!(
        err.contains(&format!("proved the key {k2}"))
            && err.contains(&format!("met the key {k1} there before"))
            && err.contains("--manager-key"),
        "{err}"
    );
    assert_eq!(listed_keys(addr).len(), 0, "never joined");
    // A one-shot question from the folder checks it the same way.
    let dir = ["--dir", a.to_str().unwrap()];
    let (ok, _, err) = peer_oneshot(addr, &[&["--key", KEY][..], &dir, &["peers"]].concat());
    assert!(!ok);
    assert!(err.contains(&format!("proved the key {k2}")), "{err}");
    // --manager-key accepts the new key and records it.
    let (ok, _, err) = peer_oneshot(
        addr,
        &[&["--key", KEY, "--manager-key", &k2][..], &dir, &["peers"]].concat(),
    );
    assert!(ok, "{err}");
    assert!(
        std::fs::read_to_string(&pins)
            .unwrap()
            .contains(&format!("{addr} {k2}"))
    );
    let (ok, _, err) = peer_oneshot(addr, &[&["--key", KEY][..], &dir, &["peers"]].concat());
    assert!(ok, "{err}");
    // And a wrong --manager-key is refused even where nothing is pinned.
    let (ok, _, err) = peer_oneshot(addr, &["--key", KEY, "--manager-key", &k1, "peers"]);
    assert!(!ok);
    assert!(
        err.contains("not the one given with --manager-key"),
        "{err}"
    );
}

#[test]
fn a_non_loopback_manager_without_a_key_refuses_to_start() {
    let out = Command::new(manager_bin())
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--key-file") && err.contains("--open"),
        "{err}"
    );
    // --key-file makes the key (0600) and prints it once.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("net.key");
    let mut cmd = Command::new(manager_bin());
    cmd.args([
        "--listen",
        "0.0.0.0:0",
        "--key-file",
        path.to_str().unwrap(),
    ]);
    let mut first = Proc::spawn_cmd(cmd);
    wait_for(WAIT, "the key printed", || {
        first.stdout.text().contains("--key")
    });
    let printed = first
        .stdout
        .text()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(printed.len(), 52);
    first.kill();
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
}

#[test]
fn a_peer_with_allow_serves_listed_keys_only_and_drops_one_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (seed, a, b) = (
        tmp.path().join("s"),
        tmp.path().join("a"),
        tmp.path().join("b"),
    );
    for dir in [&seed, &a, &b] {
        std::fs::create_dir(dir).unwrap();
    }
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(seed.join("f.bin"), &data).unwrap();
    let (ka, kb) = (show_id(&a), show_id(&b));
    let allow = tmp.path().join("allow");
    std::fs::write(&allow, format!("{ka} a\n")).unwrap();
    let m = keyed_manager(&[]);
    // 8 MiB at 2 MiB/s: a download takes about 4 s.
    let flags = ["--allow", allow.to_str().unwrap(), "--upload-limit", "2MiB"];
    let seeder = keyed_peer(&seed, m.addr, KEY, &flags);
    wait_listed(m.addr, 1);
    let spawn_get = |dir: &Path| {
        let mut cmd = Command::new(peer_bin());
        cmd.arg("--dir").arg(dir);
        cmd.args(["--manager", &m.addr.to_string(), "--key", KEY, "-v"]);
        cmd.args(["get", "f.bin"]);
        Proc::spawn_cmd(cmd)
    };
    let seeder_says = |what: &str| seeder.proc.stderr.text().contains(what);

    // b holds the network key but is not on the seeder's list.
    let b_get = spawn_get(&b);
    wait_for(WAIT, "b refused by the seeder", || {
        seeder_says(&format!("its key {kb} is not in the allow list"))
    });
    wait_for(WAIT, "b told why", || {
        b_get
            .stderr
            .text()
            .contains("serves only the keys on its allow list")
    });
    drop(b_get);
    assert!(!b.join("f.bin").exists(), "an unlisted peer got the file");

    // a is listed, until the list changes mid-download.
    let a_get = spawn_get(&a);
    wait_for(WAIT, "a's download under way", || {
        seeder_says(&format!("sealed, key {ka}"))
    });
    std::fs::write(&allow, format!("{kb} b\n")).unwrap();
    wait_for(WAIT, "a dropped by the seeder", || {
        seeder_says(&format!("its key {ka} was removed from the allow list"))
    });
    assert!(
        !a.join("f.bin").exists(),
        "a finished before the change: the test needs a slower link"
    );
    wait_for(WAIT, "a told why", || {
        a_get
            .stderr
            .text()
            .contains("serves only the keys on its allow list")
    });
    // Longer than the whole download would take: a never gets the rest.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !a.join("f.bin").exists(),
        "a got the file after it was dropped"
    );
    drop(a_get);

    // And b, listed now, gets it.
    let args = ["--key", KEY, "--dir", b.to_str().unwrap(), "get", "f.bin"];
    let (ok, _, err) = peer_oneshot(m.addr, &args);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read(b.join("f.bin")).unwrap(), data);
}
