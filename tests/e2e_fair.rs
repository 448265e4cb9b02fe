//! Fair upload end to end: downloaders of one capped seeder, started
//! together, progress together (the seeder shares its upload round-robin by
//! bytes) instead of finishing one after another.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

#[test]
fn downloaders_of_one_capped_seeder_finish_together() {
    let manager = Manager::start(0.5, 3.0);
    let size = 24 * MIB;
    let src_dir = TempDir::new().unwrap();
    let src = src_dir.path().join("fair.bin");
    write_pattern(&src, size, 21);
    let _seed = Peer::start(src_dir.path(), manager.addr, &["--upload-limit", "8MiB"]);
    wait_holders(manager.addr, "fair.bin", 1);

    let dirs: Vec<TempDir> = (0..3).map(|_| TempDir::new().unwrap()).collect();
    let start = Instant::now();
    let mut gets: Vec<Proc> = dirs
        .iter()
        .map(|d| spawn_peer(d.path(), manager.addr, &["get", "fair.bin"]))
        .collect();
    let mut finished = [None; 3];
    // 72 MiB at 8 MiB/s is 9 s; a generous bound for a loaded machine.
    let limit = Duration::from_secs(60);
    while finished.iter().any(Option::is_none) {
        assert!(start.elapsed() < limit, "downloads not done in {limit:?}");
        for (k, g) in gets.iter_mut().enumerate() {
            if finished[k].is_none() && !g.is_running() {
                let status = g.wait_exit(WAIT);
                assert!(status.success(), "get {k} failed:\n{}", g.stderr.text());
                finished[k] = Some(start.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let times: Vec<f64> = finished.iter().map(|t| t.unwrap_or(0.0)).collect();
    for d in &dirs {
        let got = std::fs::read(d.path().join("fair.bin")).unwrap();
        assert!(got == std::fs::read(&src).unwrap(), "a copy differs");
    }
    let first = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let last = times.iter().cloned().fold(0.0, f64::max);
    eprintln!("finish times: {times:.2?}");
    assert!(
        first >= 0.8 * last,
        "downloaders finished at {times:.2?} s: the first is under 0.8 x the last"
    );
}

#[test]
fn at_the_connection_cap_the_seeder_rotates_who_it_serves() {
    let manager = Manager::start(0.5, 3.0);
    let size = 12 * MIB;
    let src_dir = TempDir::new().unwrap();
    let src = src_dir.path().join("rot.bin");
    write_pattern(&src, size, 22);
    // One slot, 4 MiB/s: each download alone takes about 3 s, and the one
    // served is asked to make room after 2 s while the other waits. (Few
    // rotations: the download core doubles a Busy holder's backoff and
    // never resets it, and gives up after 30 s without progress.)
    let seed = Peer::start(
        src_dir.path(),
        manager.addr,
        &[
            "--upload-limit",
            "4MiB",
            "--max-conns",
            "1",
            "--rotate-after",
            "2",
        ],
    );
    wait_holders(manager.addr, "rot.bin", 1);

    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new().unwrap()).collect();
    let mut gets: Vec<Proc> = dirs
        .iter()
        .map(|d| spawn_peer(d.path(), manager.addr, &["get", "rot.bin"]))
        .collect();
    for (k, g) in gets.iter_mut().enumerate() {
        let status = g.wait_exit(Duration::from_secs(60));
        assert!(status.success(), "get {k} failed:\n{}", g.stderr.text());
    }
    let want = std::fs::read(&src).unwrap();
    for d in &dirs {
        assert!(std::fs::read(d.path().join("rot.bin")).unwrap() == want);
    }
    let log = seed.proc.stderr.text();
    assert!(
        log.contains("rotating") && log.contains("out: a peer is waiting"),
        "the seeder never rotated:\n{log}"
    );
    eprintln!("rotations: {}", log.matches("rotating").count());
}
