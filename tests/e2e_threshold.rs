//! End to end with the real binaries: a network above the manager's
//! full-list limit. Peers there get the count, not the list, yet a
//! downloader still hears at once from the manager that its source left.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn spawn_get(dir: &Path, manager: std::net::SocketAddr, name: &str) -> Proc {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--manager", &manager.to_string(), "-v", "get", name]);
    Proc::spawn_cmd(cmd)
}

#[test]
fn above_the_limit_a_downloader_learns_at_once_that_its_source_left() {
    // Heartbeat 0.3 s, timeout 1.2 s: the manager sweeps a stopped peer
    // within about 1.3 s, far sooner than the download's own 5 s stall
    // timeout would drop it. A stopped process keeps its sockets open, so
    // nothing but the manager's departure notice can tell the downloader.
    let manager = Manager::start_with("127.0.0.1:0", 0.3, 1.2, &["--full-list-limit", "2"]);
    let seed_dir = TempDir::new().unwrap();
    write_pattern(&seed_dir.path().join("big.bin"), 40 * MIB, 5);
    let seeder = Peer::start(seed_dir.path(), manager.addr, &["--upload-limit", "1MiB"]);
    let idle: Vec<(TempDir, Peer)> = (0..3)
        .map(|_| {
            let d = TempDir::new().unwrap();
            let p = Peer::start(d.path(), manager.addr, &[]);
            (d, p)
        })
        .collect();
    // Five peers once the downloader is in: over the limit of 2.
    wait_for(WAIT, "the seeder's file to be listed", || {
        let (_, out, _) = peer_oneshot(manager.addr, &["files"]);
        out.contains("big.bin")
    });
    // Above the limit, `peer peers` shows a page and the total.
    let mut out = String::new();
    wait_for(WAIT, "all four to be counted", || {
        out = peer_oneshot(manager.addr, &["peers"]).1;
        out.starts_with("showing 4 of 4 peers")
    });
    assert_eq!(out.lines().count(), 5, "{out}");

    let dl = TempDir::new().unwrap();
    let mut get = spawn_get(dl.path(), manager.addr, "big.bin");
    wait_for(WAIT, "the transfer to start", || {
        get.stderr.text().contains("Preparing => Transferring")
    });
    let err = get.stderr.text();
    assert!(
        err.contains("following the count, not the list"),
        "the downloader was sent a list: {err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    seeder.proc.signal("STOP");
    let stopped = Instant::now();
    wait_for(Duration::from_secs(10), "the source to be dropped", || {
        let e = get.stderr.text();
        e.contains("source left the network") || e.contains("stalled")
    });
    let took = stopped.elapsed();
    let err = get.stderr.text();
    assert!(
        err.contains("source left the network"),
        "dropped only by its own stall timeout, the manager never said: {err}"
    );
    assert!(
        took < Duration::from_millis(3500),
        "told {took:?} after the stop, not within the manager's timeout"
    );
    assert!(get.is_running(), "the download waits for another holder");
    assert!(!dl.path().join("big.bin").exists());
    drop(idle);
}
