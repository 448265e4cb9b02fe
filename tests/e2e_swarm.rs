//! Swarming end to end: downloaders of one capped seeder serve each other
//! the chunks they have verified, before their own copy is complete.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Every peer's upload cap, as on a real link.
const CAP: &str = "8MiB";
const CAP_BYTES: f64 = 8.0 * MIB as f64;

/// `peer --upload-limit CAP get --seed NAME`: stays to serve once done.
fn spawn_seeding_get(dir: &Path, manager: std::net::SocketAddr, name: &str) -> Proc {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--manager", &manager.to_string(), "-v"])
        .args(["--upload-limit", CAP, "get", "--seed", name]);
    Proc::spawn_cmd(cmd)
}

#[test]
fn six_capped_downloaders_serve_each_other_before_they_are_complete() {
    let manager = Manager::start(0.5, 3.0);
    let size = 32 * MIB;
    let src_dir = TempDir::new().unwrap();
    let src = src_dir.path().join("swarm.bin");
    write_pattern(&src, size, 21);
    let seed_dir = TempDir::new().unwrap();
    std::fs::copy(&src, seed_dir.path().join("swarm.bin")).unwrap();
    let _seeder = Peer::start(seed_dir.path(), manager.addr, &["--upload-limit", CAP]);
    wait_for(WAIT, "the seeder to be listed", || {
        let (_, out, _) = peer_oneshot(manager.addr, &["files"]);
        out.contains("swarm.bin")
    });

    let n = 6;
    let dirs: Vec<TempDir> = (0..n).map(|_| TempDir::new().unwrap()).collect();
    let start = Instant::now();
    let mut gets: Vec<Proc> = dirs
        .iter()
        .map(|d| spawn_seeding_get(d.path(), manager.addr, "swarm.bin"))
        .collect();
    let mut finished = vec![None; n];
    wait_for(Duration::from_secs(120), "all six to finish", || {
        for (i, d) in dirs.iter().enumerate() {
            if finished[i].is_none() && d.path().join("swarm.bin").exists() {
                finished[i] = Some(start.elapsed().as_secs_f64());
            }
        }
        finished.iter().all(Option::is_some)
    });
    let last = finished.iter().flatten().copied().fold(0.0, f64::max);
    let original = std::fs::read(&src).unwrap();
    for d in &dirs {
        assert!(
            std::fs::read(d.path().join("swarm.bin")).unwrap() == original,
            "a downloaded copy differs"
        );
    }
    // The seeder alone can upload at most CAP per second (plus one burst
    // of a quarter second): six copies from it alone need about 6 x 4 s.
    let seeder_alone = (n as f64 * size as f64) / CAP_BYTES - 0.25;
    assert!(
        last < seeder_alone,
        "the last of six finished at {last:.1}s; the seeder alone needs {seeder_alone:.1}s, \
         so the downloaders did not serve each other"
    );
    // And each says so in its log, for chunks served while still downloading.
    let served: Vec<u64> = gets
        .iter()
        .map(|g| {
            g.stderr
                .text()
                .lines()
                .find_map(|l| {
                    l.split("served ")
                        .nth(1)?
                        .strip_suffix(" chunks to other peers while downloading")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0)
        })
        .collect();
    assert!(
        served.iter().filter(|&&c| c > 0).count() >= n / 2,
        "chunks served while downloading, per downloader: {served:?}"
    );
    eprintln!("finish times {finished:?}, served while downloading {served:?}");
    for g in &mut gets {
        assert!(
            g.is_running(),
            "a get --seed left once its download was done"
        );
    }
}
