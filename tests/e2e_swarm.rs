//! Swarming end to end: downloaders of one capped seeder serve each other
//! the chunks they have verified, before their own copy is complete.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// Every peer's upload cap, as on a real link.
const CAP: &str = "8MiB";
const CAP_BYTES: f64 = 8.0 * MIB as f64;

/// `peer --upload-limit CAP get --seed NAME`: stays to serve once done.
fn spawn_seeding_get(dir: &Path, manager: std::net::SocketAddr, name: &str) -> Proc {
    spawn_peer(
        dir,
        manager,
        &["--upload-limit", CAP, "get", "--seed", name],
    )
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

/// A raw client written from docs/PROTOCOL.md asks a peer still downloading
/// for its have-map, a chunk it holds and one it does not.
#[test]
fn a_peer_still_downloading_serves_what_it_has_and_refuses_the_rest_explicitly() {
    use common::raw::{self, RawConn, kind, role};
    let manager = Manager::start(0.5, 3.0);
    let size = 8 * MIB;
    let src_dir = TempDir::new().unwrap();
    let src = src_dir.path().join("part.bin");
    write_pattern(&src, size, 22);
    let want = raw::Manifest::of_file(&src);
    let seed_dir = TempDir::new().unwrap();
    std::fs::copy(&src, seed_dir.path().join("part.bin")).unwrap();
    // Slow enough that the downloader is still partial for seconds.
    let _seeder = Peer::start(seed_dir.path(), manager.addr, &["--upload-limit", "1MiB"]);
    wait_for(WAIT, "the seeder to be listed", || {
        raw::who_has_groups(manager.addr, "part.bin").len() == 1
    });
    let dl = TempDir::new().unwrap();
    let mut getter = spawn_peer(dl.path(), manager.addr, &["get", "part.bin"]);
    let mut addr = None;
    wait_for(WAIT, "the downloader to serve", || {
        addr = getter
            .stderr
            .text()
            .lines()
            .find_map(|l| l.split("peer serving on ").nth(1)?.trim().parse().ok());
        addr.is_some()
    });
    // Listed as a second holder of the same version once its file is open.
    wait_for(WAIT, "the downloader to be listed as a holder", || {
        raw::who_has_groups(manager.addr, "part.bin")
            .first()
            .is_some_and(|g| g.peers.len() == 2)
    });

    let mut c = RawConn::hello(addr.unwrap(), role::PEER).unwrap();
    c.send(&raw::get_have_map(&want.root)).unwrap();
    let map = c
        .recv_kind(kind::HAVE_MAP, Duration::from_secs(5))
        .expect("a have-map");
    let (root, bits) = raw::parse_have_map(&map.body).unwrap();
    assert_eq!(root, want.root);
    let mut bits = bits.expect("a partial holder sends its bits, not 'complete'");
    assert_eq!(bits.len(), want.hashes.len());
    // Have batches follow while it downloads.
    let have = c
        .recv_kind(kind::HAVE, Duration::from_secs(5))
        .expect("a Have batch while downloading");
    let (have_root, indices) = raw::parse_have(&have.body).unwrap();
    assert_eq!(have_root, want.root);
    assert!(!indices.is_empty());
    for i in indices {
        bits[i as usize] = true;
    }
    let held = bits.iter().position(|&b| b).expect("some chunk held") as u32;
    let lacking = bits.iter().rposition(|&b| !b).expect("some chunk missing") as u32;

    c.send(&raw::get_chunk(&want.root, lacking)).unwrap();
    let no = c
        .recv_kind(kind::NO_CHUNK, Duration::from_secs(5))
        .expect("an explicit NoChunk, not silence");
    assert_eq!(&no.body[..32], &want.root);
    assert_eq!(
        u32::from_be_bytes(no.body[32..36].try_into().unwrap()),
        lacking
    );

    // The connection stays open and serves a chunk it holds, byte-exact.
    c.send(&raw::get_chunk(&want.root, held)).unwrap();
    let chunk = c
        .recv_kind(kind::CHUNK, Duration::from_secs(5))
        .expect("the chunk it holds");
    assert_eq!(
        u32::from_be_bytes(chunk.body[..4].try_into().unwrap()),
        held
    );
    assert_eq!(
        *blake3::hash(&chunk.body[4..]).as_bytes(),
        want.hashes[held as usize]
    );
    getter.kill();
}
