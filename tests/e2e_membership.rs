//! Membership end to end: real manager and peer processes on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const HEARTBEAT: f64 = 0.3;
const PEER_TIMEOUT: f64 = 1.5;

/// A peer in a fresh temp folder holding one small file named `name`.
fn peer_with_file(manager: SocketAddr, name: &str) -> (TempDir, Peer) {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join(name), format!("contents of {name}\n")).unwrap();
    let peer = Peer::start(dir.path(), manager, &[]);
    (dir, peer)
}

fn sorted(mut v: Vec<SocketAddr>) -> Vec<SocketAddr> {
    v.sort();
    v
}

/// Waits until the manager and every peer list exactly `expected`.
fn wait_converged(
    manager: SocketAddr,
    peers: &mut [&mut Peer],
    expected: &[SocketAddr],
    limit: Duration,
) {
    let expected = sorted(expected.to_vec());
    wait_for(limit, "manager list to converge", || {
        network_peers(manager) == expected
    });
    for p in peers.iter_mut() {
        wait_for(limit, "peer list to converge", || {
            p.listed_addrs() == expected
        });
    }
}

#[test]
fn three_peers_see_the_same_list() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (_d1, mut p1) = peer_with_file(manager.addr, "a.txt");
    let (_d2, mut p2) = peer_with_file(manager.addr, "b.txt");
    let (_d3, mut p3) = peer_with_file(manager.addr, "c.txt");
    let all = [p1.addr, p2.addr, p3.addr];
    wait_converged(manager.addr, &mut [&mut p1, &mut p2, &mut p3], &all, WAIT);
}

#[test]
fn killed_and_stopped_peers_vanish_within_the_timeout() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (_d1, mut p1) = peer_with_file(manager.addr, "a.txt");
    let (_d2, mut p2) = peer_with_file(manager.addr, "b.txt");
    let (_d3, p3) = peer_with_file(manager.addr, "c.txt");
    let (_d4, p4) = peer_with_file(manager.addr, "d.txt");
    let all = [p1.addr, p2.addr, p3.addr, p4.addr];
    wait_converged(manager.addr, &mut [&mut p1, &mut p2], &all, WAIT);

    let killed = p3;
    killed.proc.signal("KILL");
    let stopped = p4;
    stopped.proc.signal("STOP");
    // Detection within the peer timeout, plus a heartbeat and the broadcast
    // delay for the news to reach everyone, plus slack for a loaded machine.
    let limit = Duration::from_secs_f64(PEER_TIMEOUT + HEARTBEAT + 2.0);
    let survivors = [p1.addr, p2.addr];
    wait_converged(manager.addr, &mut [&mut p1, &mut p2], &survivors, limit);
    drop(stopped);
    drop(killed);
}

#[test]
fn a_peer_that_quits_is_removed_at_once() {
    // A long timeout: removal must come from the goodbye, not the sweep.
    let manager = Manager::start(1.0, 60.0);
    let (_d1, mut p1) = peer_with_file(manager.addr, "a.txt");
    let (_d2, mut p2) = peer_with_file(manager.addr, "b.txt");
    let (_d3, mut p3) = peer_with_file(manager.addr, "c.txt");
    let all = [p1.addr, p2.addr, p3.addr];
    wait_converged(manager.addr, &mut [&mut p1], &all, WAIT);

    p2.proc.send_line("quit");
    let status = p2.proc.wait_exit(WAIT);
    assert!(status.success(), "quit exits 0");
    p3.proc.signal("TERM");
    let status = p3.proc.wait_exit(WAIT);
    assert!(status.success(), "SIGTERM on an idle peer exits 0");
    let survivor = [p1.addr];
    wait_converged(
        manager.addr,
        &mut [&mut p1],
        &survivor,
        Duration::from_secs(5),
    );
}

#[test]
fn a_restarted_manager_gets_every_peer_back() {
    let mut manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let addr = manager.addr;
    let (_d1, mut p1) = peer_with_file(addr, "a.txt");
    let (_d2, mut p2) = peer_with_file(addr, "b.txt");
    let (_d3, mut p3) = peer_with_file(addr, "c.txt");
    let all = [p1.addr, p2.addr, p3.addr];
    wait_converged(addr, &mut [&mut p1], &all, WAIT);

    manager.proc.kill();
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Manager::start_on(&addr.to_string(), HEARTBEAT, PEER_TIMEOUT);
    assert_eq!(restarted.addr, addr);
    wait_converged(addr, &mut [&mut p1, &mut p2, &mut p3], &all, WAIT);
    // The files come back with the registrations.
    let (ok, files, _) = peer_oneshot(addr, &["files"]);
    assert!(ok);
    assert!(files.starts_with("3 files on the network"), "{files}");
}

#[test]
fn files_lists_what_each_peer_shares() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (_d1, _p1) = peer_with_file(manager.addr, "a.txt");
    let (d2, _p2) = peer_with_file(manager.addr, "b.txt");
    // Same name and content in a third peer: one file, two holders.
    let d3 = TempDir::new().unwrap();
    std::fs::copy(d2.path().join("b.txt"), d3.path().join("b.txt")).unwrap();
    let _p3 = Peer::start(d3.path(), manager.addr, &[]);

    let mut out = String::new();
    wait_for(WAIT, "files to list both files", || {
        out = peer_oneshot(manager.addr, &["files"]).1;
        out.starts_with("2 files on the network") && out.contains(" 2 holders")
    });
    let a = out
        .lines()
        .find(|l| l.trim_start().starts_with("a.txt"))
        .expect("a.txt listed");
    assert!(a.contains("  1 holders"), "{a}");
    assert!(
        a.contains(&format!(" {} bytes", "contents of a.txt\n".len())),
        "{a}"
    );
    let b = out
        .lines()
        .find(|l| l.trim_start().starts_with("b.txt"))
        .expect("b.txt listed");
    assert!(b.contains("  2 holders"), "{b}");
}

#[test]
fn a_new_file_in_the_folder_is_announced() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (dir, _p1) = peer_with_file(manager.addr, "a.txt");
    wait_for(WAIT, "a.txt listed", || {
        peer_oneshot(manager.addr, &["files"]).1.contains("a.txt")
    });
    std::fs::write(dir.path().join("later.bin"), b"added after start").unwrap();
    wait_for(WAIT, "later.bin listed", || {
        peer_oneshot(manager.addr, &["files"])
            .1
            .contains("later.bin")
    });
}

/// Reads until the other side closes; true if it did within the limit.
fn closed_by_peer(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn garbage_and_oversized_frames_close_only_that_connection() {
    let mut manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (_d1, mut p1) = peer_with_file(manager.addr, "a.txt");
    let only = [p1.addr];
    wait_converged(manager.addr, &mut [&mut p1], &only, WAIT);

    let mut garbage = TcpStream::connect(manager.addr).unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed_by_peer(&mut garbage), "garbage connection closed");

    // A hello-sized header announcing a 4 GiB body: refused from the header.
    let mut oversized = TcpStream::connect(manager.addr).unwrap();
    oversized
        .write_all(&[0xff, 0xff, 0xff, 0xff, 0x01])
        .unwrap();
    assert!(
        closed_by_peer(&mut oversized),
        "oversized connection closed"
    );

    // An unknown kind.
    let mut unknown = TcpStream::connect(manager.addr).unwrap();
    unknown.write_all(&[0, 0, 0, 1, 0x7e]).unwrap();
    assert!(
        closed_by_peer(&mut unknown),
        "unknown-kind connection closed"
    );

    // Everyone else is still served, and the registered peer is still listed.
    assert_eq!(network_peers(manager.addr), vec![p1.addr]);
    assert_eq!(manager.peer_count(), 1);
    assert_eq!(p1.listed_addrs(), vec![p1.addr]);
}

#[test]
fn peers_run_without_stdin() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("x.txt"), b"x").unwrap();
    let child = std::process::Command::new(peer_bin())
        .arg("--dir")
        .arg(dir.path())
        .args(["--manager", &manager.addr.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard(child);
    wait_for(WAIT, "the stdin-less peer to register", || {
        network_peers(manager.addr).len() == 1
    });
    // Still there several peer timeouts later: it answers pings without stdin.
    std::thread::sleep(Duration::from_secs_f64(PEER_TIMEOUT * 2.0));
    assert_eq!(network_peers(manager.addr).len(), 1);
    assert!(guard.0.try_wait().unwrap().is_none(), "peer still running");
}

#[test]
fn oneshot_queries_fail_clearly_without_a_manager() {
    // A port nothing listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (ok, _, err) = peer_oneshot(unused, &["peers"]);
    assert!(!ok);
    assert!(err.contains("cannot reach the manager"), "{err}");
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_peer_stays_listed_on_keepalives_and_notices_a_hung_manager_after_ten_heartbeats() {
    let manager = Manager::start(HEARTBEAT, PEER_TIMEOUT);
    let (_d, mut peer) = peer_with_file(manager.addr, "a.txt");
    let addr = peer.addr;
    wait_converged(manager.addr, &mut [&mut peer], &[addr], WAIT);
    // Several peer timeouts, and longer than one ping round: listed all
    // along, by its keepalives, and it never thought the manager gone.
    std::thread::sleep(Duration::from_secs_f64(4.0 * PEER_TIMEOUT));
    assert_eq!(network_peers(manager.addr), vec![peer.addr]);
    let log = manager.proc.stderr.text();
    assert_eq!(log.matches("joined").count(), 1, "re-registered:\n{log}");
    assert!(!peer.proc.stderr.text().contains("manager silent"));

    // SIGSTOP the manager: its kernel keeps the connection up, so only the
    // missing pings tell. The peer must not give up within 10 heartbeats
    // plus the timeout, and must after it.
    manager.proc.signal("STOP");
    let stopped = std::time::Instant::now();
    let patience = Duration::from_secs_f64(10.0 * HEARTBEAT + PEER_TIMEOUT);
    wait_for(
        patience + WAIT,
        "the peer to notice the hung manager",
        || peer.proc.stderr.text().contains("manager silent"),
    );
    let noticed = stopped.elapsed();
    manager.proc.signal("CONT");
    // Its last ping may have come up to 10 heartbeats before the stop.
    let earliest = patience.saturating_sub(Duration::from_secs_f64(10.0 * HEARTBEAT));
    assert!(noticed >= earliest, "gave up after {noticed:?}");
}
