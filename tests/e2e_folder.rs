//! The shared folder end to end: shoal's own state cannot be used to write
//! outside the folder, a swapped file is never served, and a peer hashing a
//! big new file keeps answering.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shoal::store::{Manifest, hash_file};
use shoal::wire::{self, Message};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

fn manifest_of(path: &Path) -> Manifest {
    let file = fs::File::open(path).unwrap();
    hash_file(&file, file.metadata().unwrap().len()).unwrap()
}

/// Waits until the manager lists `name` (with any number of holders).
fn wait_listed(manager: SocketAddr, name: &str, limit: Duration) {
    wait_for(limit, &format!("{name} to be listed"), || {
        listed(manager, name)
    });
}

fn listed(manager: SocketAddr, name: &str) -> bool {
    let (_, out, _) = peer_oneshot(manager, &["files"]);
    out.lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

/// Sends a hello and `frames` to a serving peer; returns every frame it
/// answers with until `last` matches one, the peer closes, or 10 s pass.
fn raw_exchange(
    addr: SocketAddr,
    frames: &[u8],
    last: impl Fn(&Message<'_>) -> bool,
) -> Vec<Vec<u8>> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = Vec::new();
    wire::encode(
        &Message::Hello {
            version: wire::PROTOCOL_VERSION,
            role: wire::Role::Peer,
        },
        &mut out,
    );
    out.extend_from_slice(frames);
    s.write_all(&out).unwrap();
    let (mut buf, mut got, mut piece) = (Vec::new(), Vec::new(), vec![0u8; 1 << 16]);
    loop {
        match s.read(&mut piece) {
            Ok(0) | Err(_) => return got,
            Ok(n) => buf.extend_from_slice(&piece[..n]),
        }
        while let Ok(Some((msg, used))) = wire::decode(&buf) {
            let done = last(&msg);
            got.push(buf[..used].to_vec());
            buf.drain(..used);
            if done {
                return got;
            }
        }
    }
}

/// Asks for every chunk of `manifest`; returns the data of each chunk the
/// peer sent, and whether it answered with an error.
fn get_all_chunks(addr: SocketAddr, manifest: &Manifest) -> (Vec<Vec<u8>>, bool) {
    let mut frames = Vec::new();
    for index in 0..manifest.chunk_count() {
        wire::encode(
            &Message::GetChunk {
                root: manifest.root,
                index,
            },
            &mut frames,
        );
    }
    let answers = raw_exchange(addr, &frames, |m| {
        matches!(m, Message::Error { .. })
            || matches!(m, Message::Chunk { index, .. } if *index + 1 == manifest.chunk_count())
    });
    let mut chunks = Vec::new();
    let mut refused = false;
    for frame in &answers {
        match wire::decode(frame) {
            Ok(Some((Message::Chunk { data, .. }, _))) => chunks.push(data.to_vec()),
            Ok(Some((Message::Error { .. }, _))) => refused = true,
            _ => {}
        }
    }
    (chunks, refused)
}

#[test]
fn a_symlink_at_dot_shoal_makes_the_peer_refuse_to_start() {
    let manager = Manager::start(0.5, 3.0);
    for planted in [".shoal", ".shoal/partial"] {
        let tmp = TempDir::new().unwrap();
        let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("elsewhere"));
        fs::create_dir_all(&dir).unwrap();
        if planted == ".shoal/partial" {
            fs::create_dir(dir.join(".shoal")).unwrap();
        }
        fs::create_dir_all(&outside).unwrap();
        fs::write(dir.join("a.txt"), b"a").unwrap();
        symlink(&outside, dir.join(planted)).unwrap();
        let mut cmd = Command::new(peer_bin());
        cmd.arg("--dir")
            .arg(&dir)
            .args(["--manager", &manager.addr.to_string()]);
        let mut peer = Proc::spawn_cmd(cmd);
        let status = peer.wait_exit(WAIT);
        assert!(!status.success(), "{planted}: started anyway");
        let err = peer.stderr.text();
        assert!(
            err.contains(&format!("{planted} is not a real directory"))
                && err.contains("remove it"),
            "{planted}: unclear message: {err}"
        );
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "{planted}: something was created through the link"
        );
    }
}

/// Outside files with known contents, and where they were planted.
struct Planted {
    victims: Vec<(PathBuf, Vec<u8>)>,
}

impl Planted {
    fn at(outside: &Path, links: &[PathBuf]) -> Planted {
        let mut victims = Vec::new();
        for (i, link) in links.iter().enumerate() {
            let victim = outside.join(format!("victim{i}"));
            let bytes = format!("precious {i}\n").repeat(1000).into_bytes();
            fs::write(&victim, &bytes).unwrap();
            symlink(&victim, link).unwrap();
            victims.push((victim, bytes));
        }
        Planted { victims }
    }

    fn assert_untouched(&self) {
        for (victim, bytes) in &self.victims {
            assert_eq!(
                &fs::read(victim).unwrap(),
                bytes,
                "{} was changed",
                victim.display()
            );
        }
    }
}

#[test]
fn symlinks_planted_in_dot_shoal_lead_no_write_outside() {
    let manager = Manager::start(0.5, 3.0);
    let seed_dir = TempDir::new().unwrap();
    let src = seed_dir.path().join("d.bin");
    write_pattern(&src, 3 * MIB + 5, 21);
    let _seed = Peer::start(seed_dir.path(), manager.addr, &[]);
    wait_listed(manager.addr, "d.bin", WAIT);
    let hex = manifest_of(&src).root.to_hex();

    let tmp = TempDir::new().unwrap();
    let (dir, outside) = (tmp.path().join("dl"), tmp.path().join("outside"));
    fs::create_dir_all(dir.join(".shoal/partial")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    let partial = dir.join(".shoal/partial");
    let planted = Planted::at(
        &outside,
        &[
            partial.join(format!("{hex}.part")),
            partial.join(format!("{hex}.have")),
            partial.join(format!("{hex}.have.tmp")),
            dir.join(".shoal/index.v1"),
            dir.join(".shoal/index.v1.tmp"),
        ],
    );
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(&dir)
        .args(["--manager", &manager.addr.to_string(), "-v", "get", "d.bin"]);
    let mut get = Proc::spawn_cmd(cmd);
    let status = get.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "get failed: {}", get.stderr.text());
    assert_eq!(
        fs::read(dir.join("d.bin")).unwrap(),
        fs::read(&src).unwrap()
    );
    planted.assert_untouched();
    // Our state is back in real files, not links.
    let cache = fs::symlink_metadata(dir.join(".shoal/index.v1")).unwrap();
    assert!(cache.is_file());
}

#[test]
fn a_shared_file_swapped_after_indexing_is_never_served() {
    let manager = Manager::start(0.5, 3.0);
    let tmp = TempDir::new().unwrap();
    let (dir, outside) = (tmp.path().join("shared"), tmp.path().join("secret.bin"));
    fs::create_dir_all(&dir).unwrap();
    write_pattern(&dir.join("a.bin"), MIB, 31);
    write_pattern(&dir.join("b.bin"), MIB, 32);
    write_pattern(&outside, MIB, 33);
    let secret = fs::read(&outside).unwrap();
    let (a, b) = (
        manifest_of(&dir.join("a.bin")),
        manifest_of(&dir.join("b.bin")),
    );
    // No rescan during the test: only the check at open stands in the way.
    let seed = Peer::start(&dir, manager.addr, &["--rescan", "100000"]);
    wait_listed(manager.addr, "b.bin", WAIT);

    // a.bin becomes a symlink to the secret; b.bin a copy of it (a new
    // inode with the indexed size and, set back, the indexed mtime).
    fs::remove_file(dir.join("a.bin")).unwrap();
    symlink(&outside, dir.join("a.bin")).unwrap();
    let mtime = fs::metadata(dir.join("b.bin")).unwrap().modified().unwrap();
    fs::remove_file(dir.join("b.bin")).unwrap();
    fs::copy(&outside, dir.join("b.bin")).unwrap();
    fs::File::options()
        .write(true)
        .open(dir.join("b.bin"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();

    for manifest in [&a, &b] {
        let (chunks, refused) = get_all_chunks(seed.addr, manifest);
        assert!(refused, "no error for a swapped file");
        for chunk in &chunks {
            assert!(
                !secret
                    .windows(chunk.len().min(64))
                    .any(|w| chunk.starts_with(w)),
                "served the outside file's bytes"
            );
        }
    }
    wait_for(WAIT, "the refusal to be logged", || {
        seed.proc.stderr.text().contains("since it was indexed")
            || seed.proc.stderr.text().contains("symlink")
    });
}

#[test]
fn a_peer_hashing_a_big_new_file_stays_listed_and_serving() {
    let staging = TempDir::new().unwrap();
    let big = staging.path().join("big.bin");
    // Big enough that hashing it in one go would outlast the manager's
    // timeout below by 2x; grown until it is, within the disk we have.
    let mut size = 1u64 << 30;
    let hash_time = loop {
        write_pattern(&big, size, 41);
        let start = Instant::now();
        manifest_of(&big);
        let took = start.elapsed();
        let free = shoal::store::free_space(staging.path()).unwrap();
        if took >= Duration::from_millis(1200) || size >= 8 << 30 || free < 4 * size {
            break took;
        }
        size *= 2;
    };
    eprintln!("hashing {size} bytes in one go took {hash_time:?}");
    assert!(
        hash_time >= Duration::from_millis(1200),
        "this machine hashes {size} bytes in {hash_time:?}: too fast for the test to tell"
    );
    let timeout = (hash_time.as_secs_f64() / 2.0).clamp(0.6, 3.0);
    let mut manager = Manager::start(timeout / 4.0, timeout);

    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("shared");
    fs::create_dir_all(&dir).unwrap();
    write_pattern(&dir.join("small.bin"), MIB, 42);
    let small = manifest_of(&dir.join("small.bin"));
    let peer = Peer::start(&dir, manager.addr, &[]);
    wait_listed(manager.addr, "small.bin", WAIT);

    // Appears whole (a rename), found by the next rescan.
    fs::rename(&big, dir.join("big.bin")).unwrap();
    let start = Instant::now();
    wait_for(WAIT, "the peer to start hashing", || {
        peer.proc.stderr.text().contains("hashing big.bin")
    });
    let mut checks = 0;
    let mut slowest = Duration::ZERO;
    while !listed(manager.addr, "big.bin") {
        assert!(start.elapsed() < Duration::from_secs(120), "never shared");
        assert_eq!(manager.peer_count(), 1, "the hashing peer was dropped");
        // Serving goes on: a chunk of the small file, answered promptly.
        let asked = Instant::now();
        let (chunks, refused) = get_all_chunks(peer.addr, &small);
        slowest = slowest.max(asked.elapsed());
        assert!(!refused && chunks.len() == small.chunk_count() as usize);
        checks += 1;
    }
    let took = start.elapsed();
    eprintln!("shared after {took:?}; {checks} checks, slowest answer {slowest:?}");
    assert!(
        took.as_secs_f64() > timeout,
        "hashed in {took:?}, within the {timeout} s timeout: nothing was shown"
    );
    assert!(checks >= 2, "too few checks while hashing");
    assert!(
        slowest.as_secs_f64() < timeout,
        "an answer took {slowest:?} while hashing"
    );
    let log = manager.proc.stderr.text();
    assert!(
        !log.contains("silent for") && !log.contains(" left ("),
        "the manager dropped the peer: {log}"
    );
}
