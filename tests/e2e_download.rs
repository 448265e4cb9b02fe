//! Downloads end to end: real manager, seeders and downloaders on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use shoal::wire::{self, Message};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// A seeder in a fresh folder holding a copy of `src` under `name`.
fn seeder(manager: SocketAddr, src: &Path, name: &str, extra: &[&str]) -> (TempDir, Peer) {
    let dir = TempDir::new().unwrap();
    std::fs::copy(src, dir.path().join(name)).unwrap();
    let peer = Peer::start(dir.path(), manager, extra);
    (dir, peer)
}

/// A source file of `len` pseudo-random bytes in its own temp folder.
fn source_file(len: u64, seed: u64) -> (TempDir, std::path::PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("src.bin");
    write_pattern(&path, len, seed);
    (dir, path)
}

/// Starts `peer --dir DIR get NAME`, returning the running process.
fn spawn_get(dir: &Path, manager: SocketAddr, name: &str, extra: &[&str]) -> Proc {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--manager", &manager.to_string(), "-v", "get", name])
        .args(extra);
    Proc::spawn_cmd(cmd)
}

/// Runs a get to completion; returns (success, stdout, stderr).
fn get(dir: &Path, manager: SocketAddr, name: &str) -> (bool, String, String) {
    let mut p = spawn_get(dir, manager, name, &[]);
    let status = p.wait_exit(Duration::from_secs(60));
    (status.success(), p.stdout.text(), p.stderr.text())
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// Runs `get --json` to completion; returns (success, size, fetched bytes,
/// sources, stdout, stderr) from the summary document.
fn get_json(dir: &Path, manager: SocketAddr, name: &str) -> (bool, u64, u64, u64, String, String) {
    let mut p = spawn_get(dir, manager, name, &["--json"]);
    let status = p.wait_exit(Duration::from_secs(60));
    let (out, err) = (p.stdout.text(), p.stderr.text());
    if !status.success() {
        return (false, 0, 0, 0, out, err);
    }
    let doc: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON: {out:?}"));
    let field = |k: &str| doc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {out}"));
    (
        true,
        field("size"),
        field("fetched_bytes"),
        field("sources"),
        out,
        err,
    )
}

#[test]
fn three_seeders_give_a_byte_identical_file() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(24 * MIB + 12345, 1);
    let seeds: Vec<_> = (0..3)
        .map(|_| seeder(manager.addr, &src, "data.bin", &[]))
        .collect();
    wait_holders(manager.addr, "data.bin", 3);

    let dl = TempDir::new().unwrap();
    let (ok, size, fetched, peers, out, err) = get_json(dl.path(), manager.addr, "data.bin");
    assert!(ok, "get failed: {err}");
    assert!(same_bytes(&src, &dl.path().join("data.bin")));
    assert_eq!((size, fetched), (24 * MIB + 12345, 24 * MIB + 12345));
    assert!(peers >= 2, "chunks came from {peers} peers: {out}");
    // Nothing left behind in the partial area.
    let partial = dl.path().join(".shoal/partial");
    assert_eq!(std::fs::read_dir(partial).unwrap().count(), 0);
    drop(seeds);
}

#[test]
fn a_finished_download_is_served_with_seed() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(3 * MIB, 2);
    let (_d1, _p1) = seeder(manager.addr, &src, "f.bin", &[]);
    wait_holders(manager.addr, "f.bin", 1);
    let dl = TempDir::new().unwrap();
    let mut p = spawn_get(dl.path(), manager.addr, "f.bin", &["--seed"]);
    // A downloader is listed from the moment its partial file is open, so
    // being listed is not yet being done: wait for the summary first.
    wait_for(WAIT, "the download to finish", || {
        p.stdout.text().contains("downloaded f.bin")
    });
    wait_holders(manager.addr, "f.bin", 2);
    assert!(p.is_running(), "--seed keeps the peer running");
    assert!(same_bytes(&src, &dl.path().join("f.bin")));
}

#[test]
fn killed_and_stopped_seeders_do_not_stop_the_download() {
    let manager = Manager::start(0.3, 1.5);
    let (_s, src) = source_file(30 * MIB, 3);
    // Capped seeders make the transfer last a few seconds, so the manager
    // sweeps the stopped one (timeout 1.5 s) while chunks are still missing.
    let limit = ["--upload-limit", "2MiB"];
    let mut seeds: Vec<_> = (0..4)
        .map(|_| seeder(manager.addr, &src, "d.bin", &limit))
        .collect();
    wait_holders(manager.addr, "d.bin", 4);

    let dl = TempDir::new().unwrap();
    let mut p = spawn_get(dl.path(), manager.addr, "d.bin", &["-v"]);
    wait_for(WAIT, "the transfer to start", || {
        p.stderr.text().contains("Preparing => Transferring")
    });
    std::thread::sleep(Duration::from_millis(700));
    seeds[0].1.proc.signal("KILL");
    seeds[1].1.proc.signal("STOP");
    // The faults land mid-transfer: nothing is finished yet.
    assert!(p.is_running(), "the download ended before the faults");
    assert!(!dl.path().join("d.bin").exists());
    let status = p.wait_exit(Duration::from_secs(60));
    let err = p.stderr.text();
    assert!(status.success(), "get failed: {err}");
    assert!(same_bytes(&src, &dl.path().join("d.bin")));
    // Both faults were seen and handled during the download.
    assert!(
        err.contains("went away"),
        "the killed seeder was not noticed: {err}"
    );
    // The stopped one is dropped as stalled, or when the manager sweeps it.
    assert!(
        err.contains("stalled") || err.contains("source left the network"),
        "the stopped seeder was not dropped: {err}"
    );
    drop(seeds.drain(..));
}

#[test]
fn a_seeder_serving_wrong_bytes_does_not_corrupt_the_result() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(8 * MIB, 4);
    // This seeder never rescans, so it keeps announcing the old hash.
    let (liar_dir, liar) = seeder(manager.addr, &src, "x.bin", &["--rescan", "100000"]);
    wait_holders(manager.addr, "x.bin", 1);
    // Change the file under it: same size, different bytes.
    write_pattern(&liar_dir.path().join("x.bin"), 8 * MIB, 99);
    let (_h1, _honest1) = seeder(manager.addr, &src, "x.bin", &[]);
    let (_h2, _honest2) = seeder(manager.addr, &src, "x.bin", &[]);
    wait_holders(manager.addr, "x.bin", 3);

    let dl = TempDir::new().unwrap();
    let (ok, _out, err) = get(dl.path(), manager.addr, "x.bin");
    assert!(ok, "get failed: {err}");
    assert!(same_bytes(&src, &dl.path().join("x.bin")));
    // The liar's own check (inode, size, mtime, ctime against the index)
    // refuses to serve bytes that are not the ones it hashed; a chunk that
    // got through anyway would be caught by the downloader's hash check.
    assert!(
        liar.proc.stderr.text().contains("since it was indexed") || err.contains("corrupt"),
        "the changed file was noticed: {err}\nliar: {}",
        liar.proc.stderr.text()
    );
}

#[test]
fn a_killed_download_resumes_with_only_what_was_missing() {
    let manager = Manager::start(0.5, 3.0);
    let size = 40 * MIB;
    let (_s, src) = source_file(size, 5);
    let (_d1, _p1) = seeder(manager.addr, &src, "r.bin", &["--upload-limit", "8MiB"]);
    wait_holders(manager.addr, "r.bin", 1);

    let dl = TempDir::new().unwrap();
    let mut first = spawn_get(dl.path(), manager.addr, "r.bin", &[]);
    // Progress is made durable every 2 s; let at least one save happen.
    let started = Instant::now();
    wait_for(WAIT, "the first save", || {
        std::fs::read_dir(dl.path().join(".shoal/partial"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .any(|e| e.path().extension().is_some_and(|x| x == "have"))
            })
            .unwrap_or(false)
            && started.elapsed() > Duration::from_millis(2500)
    });
    first.signal("KILL");
    first.wait_exit(WAIT);
    assert!(!dl.path().join("r.bin").exists(), "not finished yet");

    let (ok, total, fetched, _, out, err) = get_json(dl.path(), manager.addr, "r.bin");
    assert!(ok, "resume failed: {err}");
    assert!(same_bytes(&src, &dl.path().join("r.bin")));
    assert_eq!(total, size);
    assert!(fetched < size, "resume fetched everything again: {out}");
    assert!(err.contains("resuming"), "{err}");
}

#[test]
fn existing_files_are_never_overwritten() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(MIB, 6);
    let (_d1, _p1) = seeder(manager.addr, &src, "same.bin", &[]);
    wait_holders(manager.addr, "same.bin", 1);

    // Same content already here: a no-op that succeeds.
    let dl = TempDir::new().unwrap();
    std::fs::copy(&src, dl.path().join("same.bin")).unwrap();
    let (ok, out, err) = get(dl.path(), manager.addr, "same.bin");
    assert!(ok, "{err}");
    assert!(out.contains("nothing to do"), "{out}");

    // Different content under that name: refused, and left untouched.
    let other = TempDir::new().unwrap();
    std::fs::write(other.path().join("same.bin"), b"mine, keep it").unwrap();
    let (ok, _, err) = get(other.path(), manager.addr, "same.bin");
    assert!(!ok);
    assert!(err.contains("never overwritten"), "{err}");
    assert_eq!(
        std::fs::read(other.path().join("same.bin")).unwrap(),
        b"mine, keep it"
    );
}

#[test]
fn missing_files_and_hostile_names_fail_clearly() {
    let manager = Manager::start(0.5, 3.0);
    let dl = TempDir::new().unwrap();
    let (ok, _, err) = get(dl.path(), manager.addr, "nowhere.bin");
    assert!(!ok);
    assert!(err.contains("not on the network"), "{err}");

    for hostile in ["../x", "/etc/passwd", "a/b"] {
        let (ok, _, err) = get(dl.path(), manager.addr, hostile);
        assert!(!ok, "{hostile} accepted");
        assert!(err.contains("one plain path component"), "{hostile}: {err}");
    }
}

/// Speaks the peer protocol by hand: hello, then `frames`; returns the
/// frames received until one matches `last`, or the peer closes.
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
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let mut piece = vec![0u8; 1 << 16];
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

fn error_code(frame: &[u8]) -> Option<wire::ErrorCode> {
    match wire::decode(frame) {
        Ok(Some((Message::Error { code, .. }, _))) => Some(code),
        _ => None,
    }
}

#[test]
fn a_seeder_refuses_hostile_names_and_bad_chunks_and_keeps_serving() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(MIB, 7);
    let (_d1, seed) = seeder(manager.addr, &src, "ok.bin", &[]);

    for name in ["../x", "/etc/passwd"] {
        // GetManifest (0x20) with the name and no root, built by hand since
        // the library refuses to build such a name.
        let mut frame = Vec::new();
        let body_len = 1 + 2 + name.len() + 1;
        frame.extend_from_slice(&(body_len as u32).to_be_bytes());
        frame.push(0x20);
        frame.extend_from_slice(&(name.len() as u16).to_be_bytes());
        frame.extend_from_slice(name.as_bytes());
        frame.push(0);
        let got = raw_exchange(seed.addr, &frame, |m| matches!(m, Message::Error { .. }));
        assert!(
            got.iter().any(|f| error_code(f).is_some()),
            "{name}: no error frame"
        );
    }

    // A chunk past the end of a file we do share.
    let root = shoal::store::hash_file(&std::fs::File::open(&src).unwrap(), MIB)
        .unwrap()
        .root;
    let mut frame = Vec::new();
    wire::encode(
        &Message::GetChunk {
            root,
            index: 1_000_000,
        },
        &mut frame,
    );
    let got = raw_exchange(seed.addr, &frame, |m| matches!(m, Message::Error { .. }));
    assert!(
        got.iter()
            .any(|f| error_code(f) == Some(wire::ErrorCode::OutOfRange))
    );

    // And it still serves a good request.
    let dl = TempDir::new().unwrap();
    let (ok, _, err) = get(dl.path(), manager.addr, "ok.bin");
    assert!(ok, "{err}");
    assert!(same_bytes(&src, &dl.path().join("ok.bin")));
}

#[test]
fn chunks_past_4_gib_are_served_from_the_right_offset() {
    // A sparse 4 GiB + 1 MiB file with known bytes in its last megabyte:
    // the seeder must read chunk offsets as 64-bit.
    let manager = Manager::start(0.5, 3.0);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("huge.bin");
    let size = (4 << 30) + MIB;
    {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        use std::os::unix::fs::FileExt;
        let tail: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all_at(&tail, 4 << 30).unwrap();
    }
    let seed = Peer::start(dir.path(), manager.addr, &[]);
    let manifest = shoal::store::hash_file(&std::fs::File::open(&path).unwrap(), size).unwrap();
    let last = manifest.chunk_count() - 1;
    assert!(manifest.chunk_offset(last) >= 4 << 30);

    let mut frame = Vec::new();
    wire::encode(
        &Message::GetChunk {
            root: manifest.root,
            index: last,
        },
        &mut frame,
    );
    let got = raw_exchange(seed.addr, &frame, |m| matches!(m, Message::Chunk { .. }));
    let chunk = got
        .iter()
        .find_map(|f| match wire::decode(f) {
            Ok(Some((Message::Chunk { index, data }, _))) if index == last => Some(data.to_vec()),
            _ => None,
        })
        .expect("the last chunk");
    assert_eq!(
        shoal::store::hash_chunk(&chunk),
        manifest.hashes[last as usize]
    );
    let expected: Vec<u8> = {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0u8; manifest.chunk_len(last) as usize];
        std::fs::File::open(&path)
            .unwrap()
            .read_exact_at(&mut b, manifest.chunk_offset(last))
            .unwrap();
        b
    };
    assert_eq!(chunk, expected);
    assert!(chunk.iter().any(|&b| b != 0), "the known bytes, not a hole");
}

#[test]
fn the_most_held_version_is_fetched_unless_a_hash_names_another() {
    let manager = Manager::start(0.5, 3.0);
    let (_a, common) = source_file(2 * MIB, 10);
    let (_b, rare) = source_file(2 * MIB + 1, 11);
    let (_d1, _p1) = seeder(manager.addr, &common, "v.bin", &[]);
    let (_d2, _p2) = seeder(manager.addr, &common, "v.bin", &[]);
    let (_d3, _p3) = seeder(manager.addr, &rare, "v.bin", &[]);
    wait_holders(manager.addr, "v.bin", 2);
    wait_holders(manager.addr, "v.bin", 1);

    let dl = TempDir::new().unwrap();
    let (ok, _, err) = get(dl.path(), manager.addr, "v.bin");
    assert!(ok, "{err}");
    assert!(
        same_bytes(&common, &dl.path().join("v.bin")),
        "the majority version"
    );

    let rare_root = shoal::store::hash_file(&std::fs::File::open(&rare).unwrap(), 2 * MIB + 1)
        .unwrap()
        .root
        .to_hex();
    let dl2 = TempDir::new().unwrap();
    let mut p = spawn_get(dl2.path(), manager.addr, "v.bin", &["--hash", &rare_root]);
    let status = p.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{}", p.stderr.text());
    assert!(
        same_bytes(&rare, &dl2.path().join("v.bin")),
        "the version --hash named"
    );

    // A hash nobody holds: a clear error naming the versions there are.
    let dl3 = TempDir::new().unwrap();
    let mut p = spawn_get(
        dl3.path(),
        manager.addr,
        "v.bin",
        &["--hash", &"ab".repeat(32)],
    );
    let status = p.wait_exit(Duration::from_secs(60));
    assert!(!status.success());
    assert!(
        p.stderr.text().contains("versions on the network"),
        "{}",
        p.stderr.text()
    );
}

/// A tmpfs of `size` mounted on a fresh temp folder; unmounted on drop.
struct SmallDisk(TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = TempDir::new().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn a_full_disk_is_reported_and_nothing_is_lost() {
    // CI runs as root; elsewhere this fails rather than pass untested.
    let disk = SmallDisk::mount("4m")
        .expect("cannot mount a tmpfs: this test needs root (skip it with --skip a_full_disk)");
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(16 * MIB, 12);
    let (_d1, _p1) = seeder(manager.addr, &src, "big.bin", &[]);
    wait_holders(manager.addr, "big.bin", 1);
    std::fs::write(disk.0.path().join("keep.txt"), b"already here").unwrap();

    let (ok, _, err) = get(disk.0.path(), manager.addr, "big.bin");
    assert!(!ok, "a 16 MiB file cannot fit on a 4 MiB disk");
    assert!(err.contains("disk full"), "{err}");
    assert!(!disk.0.path().join("big.bin").exists());
    assert_eq!(
        std::fs::read(disk.0.path().join("keep.txt")).unwrap(),
        b"already here"
    );
}

#[test]
fn connections_over_the_cap_are_refused_as_busy_and_others_still_served() {
    let manager = Manager::start(0.5, 3.0);
    let (_s, src) = source_file(MIB, 13);
    let (_d1, seed) = seeder(manager.addr, &src, "cap.bin", &["--max-conns", "1"]);
    // The first connection holds the only slot (it stays open, idle).
    let mut first = TcpStream::connect(seed.addr).unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut hello = [0u8; 5];
    first.read_exact(&mut hello).unwrap();
    // The second is turned away with a Busy error frame.
    let got = raw_exchange(seed.addr, &[], |m| matches!(m, Message::Error { .. }));
    assert!(
        got.iter()
            .any(|f| error_code(f) == Some(wire::ErrorCode::Busy)),
        "no Busy frame"
    );
    // Once the slot is free, a download gets through.
    drop(first);
    let dl = TempDir::new().unwrap();
    let (ok, _, err) = get(dl.path(), manager.addr, "cap.bin");
    assert!(ok, "{err}");
    assert!(same_bytes(&src, &dl.path().join("cap.bin")));
}

#[test]
fn the_upload_limit_holds_the_rate() {
    let manager = Manager::start(0.5, 3.0);
    let size = 12 * MIB;
    let (_s, src) = source_file(size, 14);
    let (_d, _p) = seeder(
        manager.addr,
        &src,
        "capped.bin",
        &["--upload-limit", "4MiB"],
    );
    wait_holders(manager.addr, "capped.bin", 1);
    let dl = TempDir::new().unwrap();
    let start = std::time::Instant::now();
    let (ok, _, err) = get(dl.path(), manager.addr, "capped.bin");
    let elapsed = start.elapsed().as_secs_f64();
    assert!(ok, "{err}");
    assert!(same_bytes(&src, &dl.path().join("capped.bin")));
    // The bucket may start full (one 4 MiB burst); the rest goes at 4 MiB/s.
    let burst = 4 * MIB;
    let least = (size - burst) as f64 / (4 * MIB) as f64;
    assert!(
        elapsed >= least * 0.95,
        "12 MiB at 4 MiB/s took {elapsed:.2}s, under the {least:.2}s the limit allows"
    );
}
