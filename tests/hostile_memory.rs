//! Memory is bounded by what a connection may legitimately send, not by what
//! it announces, and replies to a client that does not read are bounded.
//! Each case attacks a real `peer` or `manager` through the raw client, reads
//! the victim's VmRSS/VmHWM from /proc, and checks that an honest client is
//! still served while and after the flood. Target (hardening issue): under
//! any flood from one attacker using up to `--max-conns` connections, RSS
//! stays within +64 MiB of its idle size.

mod common;

use std::io;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::raw::{self, FakeMember, FileEntry, RawConn, Reaction, kind, role};
use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// The growth the issue allows over the idle size.
const BOUND: u64 = 64 * MIB;
/// A flood stops once the victim has grown this much: the property has
/// failed by then, and the machine is shared.
const SAFETY_CAP: u64 = 320 * MIB;
/// Attack connections; each victim gets `--max-conns` one above this, so an
/// honest client still finds a free slot.
const ATTACK_CONNS: usize = 16;

// ---------------------------------------------------------------- memory

/// (VmRSS, VmHWM) of a process, in bytes.
fn mem(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Watches one process's memory from an idle baseline.
struct Watch {
    pid: u32,
    idle: u64,
}

impl Watch {
    /// Takes the idle size now and resets the peak to it
    /// (`clear_refs` 5 resets VmHWM, Linux 4.0+).
    fn start(pid: u32) -> Watch {
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset VmHWM");
        let (idle, hwm) = mem(pid);
        assert!(hwm <= idle + MIB, "VmHWM was reset");
        Watch { pid, idle }
    }

    /// Growth of the current RSS over idle.
    fn now(&self) -> u64 {
        mem(self.pid).0.saturating_sub(self.idle)
    }

    /// Growth of the peak over idle.
    fn peak(&self) -> u64 {
        mem(self.pid).1.saturating_sub(self.idle)
    }

    fn report(&self, what: &str) -> u64 {
        let peak = self.peak();
        eprintln!(
            "{what}: idle {} MiB, now +{} MiB, peak +{} MiB",
            self.idle / MIB,
            self.now() / MIB,
            peak / MIB
        );
        peak
    }
}

fn assert_bounded(watch: &Watch, what: &str) {
    let peak = watch.report(what);
    assert!(
        peak <= BOUND,
        "{what}: RSS peaked at +{} MiB over an idle {} MiB (bound +{} MiB)",
        peak / MIB,
        watch.idle / MIB,
        BOUND / MIB
    );
}

// ---------------------------------------------------------------- victims

/// A manager with `--max-conns`, on an ephemeral port.
fn start_manager(max_conns: usize) -> Manager {
    let mut cmd = Command::new(manager_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--heartbeat", "0.5"])
        .args(["--peer-timeout", "3", "--max-conns", &max_conns.to_string()]);
    let proc = Proc::spawn_cmd(cmd);
    let mut addr = None;
    wait_for(WAIT, "manager to listen", || {
        addr = proc
            .stderr
            .text()
            .lines()
            .find_map(|l| l.split("manager listening on ").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        addr.is_some()
    });
    Manager {
        proc,
        addr: addr.unwrap(),
    }
}

/// A serving peer sharing `small.bin` (1 MiB, what honest clients fetch)
/// and, if asked, `big.bin`: a sparse 2 GiB file, whose manifest is 2 MiB
/// (65 536 chunks of 32 KiB) yet is hashed in a moment (holes are skipped).
struct Victim {
    manager: Manager,
    peer: Peer,
    _dir: TempDir,
    small: Vec<u8>,
    big_root: Option<raw::Hash>,
}

fn start_victim_peer(with_big: bool) -> Victim {
    let manager = start_manager(64);
    let dir = TempDir::new().unwrap();
    write_pattern(&dir.path().join("small.bin"), MIB, 31);
    if with_big {
        let f = std::fs::File::create(dir.path().join("big.bin")).unwrap();
        f.set_len(2 << 30).unwrap();
    }
    let conns = (ATTACK_CONNS + 1).to_string();
    let peer = Peer::start(dir.path(), manager.addr, &["--max-conns", &conns]);
    let mut big_root = None;
    wait_for(WAIT, "the victim's files to be listed", || {
        let small = !raw::who_has_groups(manager.addr, "small.bin").is_empty();
        if with_big {
            big_root = raw::who_has_groups(manager.addr, "big.bin")
                .first()
                .map(|g| g.root);
        }
        small && (!with_big || big_root.is_some())
    });
    let small = std::fs::read(dir.path().join("small.bin")).unwrap();
    Victim {
        manager,
        peer,
        _dir: dir,
        small,
        big_root,
    }
}

impl Victim {
    /// An honest download of `small.bin` from the victim, bounded in time.
    fn honest_download(&self, when: &str) -> Result<(), String> {
        let dl = TempDir::new().unwrap();
        let mut cmd = Command::new(peer_bin());
        cmd.arg("--dir").arg(dl.path()).args([
            "--manager",
            &self.manager.addr.to_string(),
            "get",
            "small.bin",
        ]);
        let mut p = Proc::spawn_cmd(cmd);
        let status = p.wait_exit(Duration::from_secs(60));
        if !status.success() {
            return Err(format!(
                "honest download {when} failed: {}",
                p.stderr.text()
            ));
        }
        if std::fs::read(dl.path().join("small.bin")).ok().as_ref() != Some(&self.small) {
            return Err(format!("honest download {when} saved wrong bytes"));
        }
        Ok(())
    }
}

/// `peer files` against the manager works and lists `name`.
fn honest_files(manager: SocketAddr, name: &str, when: &str) -> Result<(), String> {
    let (ok, out, err) = peer_oneshot(manager, &["files"]);
    if !ok {
        return Err(format!("peer files {when} failed: {err}"));
    }
    if !out.contains(name) {
        return Err(format!("peer files {when} does not list {name}: {out}"));
    }
    Ok(())
}

/// Checks the memory bound first (so its numbers are always reported),
/// then that every honest request was served.
fn verdict(watch: &Watch, what: &str, honest: &[Result<(), String>]) {
    for e in honest.iter().filter_map(|h| h.as_ref().err()) {
        eprintln!("{what}: {}", e.lines().last().unwrap_or(""));
    }
    assert_bounded(watch, what);
    for h in honest {
        if let Err(e) = h {
            panic!("{what}: {e}");
        }
    }
}

// ---------------------------------------------------------------- attacks

/// Where in the handshake the attack frame comes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    BeforeHello,
    AfterHello,
    AfterRegister,
}

/// Body bytes an announcing connection sends before falling silent: a
/// sliver of the frame, yet more than a reader keeps free for small frames,
/// so a reader that sizes its buffer from the header does so now.
const SLIVER: usize = 256 << 10;

/// Opens `ATTACK_CONNS` connections that each announce a frame of
/// `kind` with a `body_len` body, send `SLIVER` bytes of it, and fall silent.
fn announce(
    addr: SocketAddr,
    hello_role: u8,
    stage: Stage,
    kind: u8,
    body_len: u32,
) -> Vec<RawConn> {
    (0..ATTACK_CONNS)
        .map(|i| {
            let mut c = RawConn::connect(addr).unwrap();
            match stage {
                Stage::BeforeHello => {}
                Stage::AfterHello => c.send(&raw::hello(hello_role)).unwrap(),
                Stage::AfterRegister => {
                    c.send(&raw::hello(hello_role)).unwrap();
                    c.send(&raw::register(40000 + i as u16, None)).unwrap();
                    assert!(
                        c.recv_kind(kind::WELCOME, Duration::from_secs(10))
                            .is_some(),
                        "registered"
                    );
                }
            }
            c.send(&raw::header(kind, body_len)).unwrap();
            // A victim that refuses the header may close before all of it.
            let _ = c.send(&[0x5a; SLIVER]);
            c
        })
        .collect()
}

fn peer_announce_attack(stage: Stage, kind: u8, body_len: u32) {
    let v = start_victim_peer(false);
    let watch = Watch::start(v.peer.proc.pid());
    let attack = announce(v.peer.addr, role::PEER, stage, kind, body_len);
    std::thread::sleep(Duration::from_secs(1));
    let during = v.honest_download("during the attack");
    drop(attack);
    let after = v.honest_download("after the attack");
    verdict(
        &watch,
        &format!("peer, {ATTACK_CONNS} conns announcing {body_len} B {stage:?}"),
        &[during, after],
    );
}

#[test]

fn a_peer_does_not_buffer_what_headers_announce_before_hello() {
    peer_announce_attack(Stage::BeforeHello, kind::MANIFEST, raw::MAX_MANIFEST_BODY);
}

#[test]

fn a_peer_does_not_buffer_a_manifest_a_server_never_accepts() {
    peer_announce_attack(Stage::AfterHello, kind::MANIFEST, raw::MAX_MANIFEST_BODY);
}

#[test]

fn a_peer_does_not_buffer_a_chunk_a_server_never_accepts() {
    peer_announce_attack(Stage::AfterHello, kind::CHUNK, raw::MAX_CHUNK_BODY);
}

fn manager_announce_attack(stage: Stage) {
    let manager = start_manager(ATTACK_CONNS + 4);
    let entry = FileEntry {
        name: "listed.bin".into(),
        size: 5,
        root: [7; 32],
    };
    let _member = FakeMember::join(manager.addr, 9, &[entry]);
    honest_files(manager.addr, "listed.bin", "before the attack").unwrap();
    let watch = Watch::start(manager.proc.pid());
    let attack = announce(
        manager.addr,
        role::MANAGER_CLIENT,
        stage,
        kind::SHARE_FILES,
        raw::MAX_LIST_BODY,
    );
    std::thread::sleep(Duration::from_secs(1));
    let during = honest_files(manager.addr, "listed.bin", "during the attack");
    drop(attack);
    let after = honest_files(manager.addr, "listed.bin", "after the attack");
    verdict(
        &watch,
        &format!("manager, {ATTACK_CONNS} conns announcing 8 MiB ShareFiles {stage:?}"),
        &[during, after],
    );
}

#[test]

fn a_manager_does_not_buffer_what_headers_announce_before_hello() {
    manager_announce_attack(Stage::BeforeHello);
}

#[test]

fn a_manager_does_not_buffer_share_files_from_an_unregistered_client() {
    manager_announce_attack(Stage::AfterHello);
}

#[test]

fn a_manager_buffers_a_registered_peers_share_files_only_as_it_arrives() {
    manager_announce_attack(Stage::AfterRegister);
}

/// Result of flooding requests at connections that never read.
#[derive(Debug, Default)]
struct Flood {
    sent: usize,
    /// Writes that timed out: the victim stopped reading (backpressure).
    blocked: usize,
    /// Connections the victim closed or reset.
    closed: usize,
}

/// Sends `request` round-robin on `conns`, never reading, until the victim
/// pushes back on all of them, closes them, `max` requests went out, `limit`
/// passes, or the victim grows past the safety cap.
fn flood(
    conns: &mut [RawConn],
    request: &[u8],
    batch: usize,
    max: usize,
    watch: &Watch,
    limit: Duration,
) -> Flood {
    let mut out = Flood::default();
    let bytes: Vec<u8> = request.repeat(batch);
    let mut live: Vec<bool> = vec![true; conns.len()];
    for c in conns.iter() {
        c.stream
            .set_write_timeout(Some(Duration::from_millis(200)))
            .unwrap();
    }
    let start = Instant::now();
    while out.sent < max && start.elapsed() < limit && watch.now() < SAFETY_CAP {
        let mut any = false;
        for (c, alive) in conns.iter_mut().zip(live.iter_mut()) {
            if !*alive {
                continue;
            }
            match c.send(&bytes) {
                Ok(()) => {
                    out.sent += batch;
                    any = true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    out.blocked += 1;
                    *alive = false;
                }
                Err(_) => {
                    out.closed += 1;
                    *alive = false;
                }
            }
        }
        if !any {
            break;
        }
    }
    // Let the victim work through what it read.
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("flood: {out:?} in {:?}", start.elapsed());
    watch.report("right after the flood");
    out
}

fn connect_all(addr: SocketAddr, hello_role: u8) -> Vec<RawConn> {
    (0..ATTACK_CONNS)
        .map(|_| RawConn::hello(addr, hello_role).unwrap())
        .collect()
}

#[test]

fn a_peer_bounds_manifests_queued_for_clients_that_do_not_read() {
    let v = start_victim_peer(true);
    let watch = Watch::start(v.peer.proc.pid());
    let mut conns = connect_all(v.peer.addr, role::PEER);
    let req = raw::get_manifest("big.bin", None);
    // Each answer is a 2 MiB manifest: today none would be refused, so send
    // no more than the safety cap's worth.
    let most = (SAFETY_CAP / (2 * MIB)) as usize;
    flood(
        &mut conns,
        &req,
        most / ATTACK_CONNS,
        most,
        &watch,
        Duration::from_secs(20),
    );
    let during = v.honest_download("during the flood");
    drop(conns);
    let after = v.honest_download("after the flood");
    verdict(
        &watch,
        "peer, GetManifest flood of a 2 MiB manifest",
        &[during, after],
    );
}

#[test]
fn a_peer_bounds_chunks_queued_for_clients_that_do_not_read() {
    let v = start_victim_peer(true);
    let root = v.big_root.unwrap();
    let watch = Watch::start(v.peer.proc.pid());
    let mut conns = connect_all(v.peer.addr, role::PEER);
    // Distinct chunk indexes, so every request is a valid one.
    let mut reqs = Vec::new();
    for i in 0..4096u32 {
        reqs.extend_from_slice(&raw::get_chunk(&root, i));
    }
    flood(&mut conns, &reqs, 1, 16, &watch, Duration::from_secs(20));
    let during = v.honest_download("during the flood");
    drop(conns);
    let after = v.honest_download("after the flood");
    verdict(&watch, "peer, GetChunk flood", &[during, after]);
}

/// A manager whose index is big: five members share 4000 files each (the
/// per-registration limit is 4096), 20 000 in all (a `FileList` of about
/// 1.2 MB over its pages), and 50 members share one version of `w.bin`
/// (one registration may hold one version of a name); the 55 members make
/// the `PeerList`.
fn busy_manager() -> (Manager, Vec<FakeMember>) {
    let manager = start_manager(ATTACK_CONNS + 60);
    let file = |i: u32| FileEntry {
        name: format!("file-{i:06}.bin"),
        size: u64::from(i),
        root: *blake3::hash(&i.to_be_bytes()).as_bytes(),
    };
    let w = [FileEntry {
        name: "w.bin".into(),
        size: 1000,
        root: *blake3::hash(b"w").as_bytes(),
    }];
    let mut members: Vec<FakeMember> = (0..5u32)
        .map(|m| {
            let files: Vec<FileEntry> = (m * 4000..(m + 1) * 4000).map(file).collect();
            FakeMember::join(manager.addr, 4 + m as u16, &files)
        })
        .collect();
    for i in 0..50 {
        members.push(FakeMember::join(manager.addr, 10 + i, &w));
    }
    wait_for(WAIT, "the index to fill", || {
        raw::who_has_groups(manager.addr, "w.bin")
            .first()
            .is_some_and(|g| g.peers.len() == 50)
    });
    honest_files(manager.addr, "file-019999.bin", "before the flood").unwrap();
    (manager, members)
}

/// Floods `request` at the busy manager; `answer` is the size of one reply,
/// so that no more than the safety cap's worth of replies is asked for.
fn manager_flood(request: &[u8], answer: u64, conns: usize, what: &str) {
    let (manager, _members) = busy_manager();
    let watch = Watch::start(manager.proc.pid());
    let mut conns: Vec<RawConn> = (0..conns)
        .map(|_| RawConn::hello(manager.addr, role::MANAGER_CLIENT).unwrap())
        .collect();
    let most = (SAFETY_CAP / answer) as usize;
    // All of it at once: the requests a victim reads in one go are the
    // worst case for a reader that checks its outbox only between reads.
    let batch = (most / conns.len()).max(1);
    flood(
        &mut conns,
        request,
        batch,
        most,
        &watch,
        Duration::from_secs(20),
    );
    let during = honest_files(manager.addr, "file-019999.bin", "during the flood");
    drop(conns);
    let after = honest_files(manager.addr, "file-019999.bin", "after the flood");
    verdict(&watch, what, &[during, after]);
}

#[test]

fn a_manager_bounds_file_lists_queued_for_clients_that_do_not_read() {
    // 20 000 entries of 60-61 bytes, 1.2 MB encoded; building one costs the
    // manager about three times that, so count 3.6 MB per answer.
    manager_flood(
        &raw::list_files(),
        // One page: 4096 entries of 61 bytes.
        4096 * 61,
        1,
        "manager, ListFiles flood on one connection",
    );
}

#[test]

fn a_manager_bounds_peer_lists_queued_for_clients_that_do_not_read() {
    // 51 entries of 15 bytes.
    manager_flood(
        &raw::list_peers(),
        55 * 15 + 9,
        ATTACK_CONNS,
        "manager, ListPeers flood",
    );
}

#[test]

fn a_manager_bounds_holder_lists_queued_for_clients_that_do_not_read() {
    // 400 groups of 44 bytes and 50 holders of 15 bytes.
    manager_flood(
        &raw::who_has("w.bin"),
        44 + 50 * 15 + 8,
        ATTACK_CONNS,
        "manager, WhoHas flood",
    );
}

// ---------------------------------------------------------------- wrong kinds

/// Sends `frames` after a Hello and expects a refusal (Error or close)
/// within `limit`.
fn refused(
    addr: SocketAddr,
    hello_role: Option<u8>,
    frames: &[&[u8]],
    limit: Duration,
) -> Reaction {
    let mut c = RawConn::connect(addr).unwrap();
    if let Some(r) = hello_role {
        c.send(&raw::hello(r)).unwrap();
    }
    for f in frames {
        // The victim may close before taking all of it.
        let _ = c.send(f);
    }
    c.reaction(limit)
}

fn assert_refused(r: Reaction, what: &str) {
    assert!(
        matches!(r, Reaction::Error(..) | Reaction::Closed),
        "{what}: no Error frame and no close, got {r:?}"
    );
}

#[test]
fn a_peer_refuses_small_frames_a_server_never_accepts() {
    let v = start_victim_peer(false);
    let manifest = raw::Manifest {
        root: [1; 32],
        size: 10,
        chunk_size: 32 << 10,
        hashes: vec![[2; 32]],
    };
    let chunk = raw::chunk(0, b"unasked");
    let r = refused(
        v.peer.addr,
        Some(role::PEER),
        &[&chunk],
        Duration::from_secs(5),
    );
    assert_refused(r, "a Chunk sent to a server");
    let r = refused(
        v.peer.addr,
        Some(role::PEER),
        &[&manifest.encode()],
        Duration::from_secs(5),
    );
    assert_refused(r, "a Manifest sent to a server");
    let r = refused(
        v.peer.addr,
        None,
        &[&raw::get_chunk(&[0; 32], 0)],
        Duration::from_secs(5),
    );
    assert_refused(r, "a GetChunk before Hello");
    v.honest_download("after the refusals").unwrap();
}

#[test]

fn a_peer_refuses_a_big_chunk_from_its_header_alone() {
    let v = start_victim_peer(false);
    let watch = Watch::start(v.peer.proc.pid());
    for (k, len) in [
        (kind::CHUNK, raw::MAX_CHUNK_BODY),
        (kind::MANIFEST, raw::MAX_MANIFEST_BODY),
    ] {
        let head = raw::header(k, len);
        let r = refused(
            v.peer.addr,
            Some(role::PEER),
            &[&head, &[0; 1000]],
            Duration::from_secs(3),
        );
        assert_refused(
            r,
            &format!("a {len}-byte frame of kind {k:#x} announced to a server"),
        );
        let r = refused(
            v.peer.addr,
            None,
            &[&head, &[0; 1000]],
            Duration::from_secs(3),
        );
        assert_refused(
            r,
            &format!("a {len}-byte frame of kind {k:#x} before Hello"),
        );
    }
    v.honest_download("after the refusals").unwrap();
    assert_bounded(&watch, "peer, big wrong frames");
}

#[test]
fn a_manager_refuses_small_frames_wrong_for_the_state() {
    let manager = start_manager(16);
    let files = raw::share_files(&[FileEntry {
        name: "x.bin".into(),
        size: 1,
        root: [3; 32],
    }]);
    let r = refused(
        manager.addr,
        Some(role::MANAGER_CLIENT),
        &[&files],
        Duration::from_secs(5),
    );
    assert_refused(r, "ShareFiles before Register");
    let r = refused(manager.addr, None, &[&files], Duration::from_secs(5));
    assert_refused(r, "ShareFiles before Hello");
    let r = refused(manager.addr, Some(role::PEER), &[], Duration::from_secs(5));
    assert_refused(r, "a Hello with the Peer role at the manager");
    let (ok, out, err) = peer_oneshot(manager.addr, &["files"]);
    assert!(ok, "peer files after the refusals: {err}");
    assert!(
        !out.contains("x.bin"),
        "the refused ShareFiles was not applied: {out}"
    );
}

#[test]

fn a_manager_refuses_a_big_share_files_before_register_from_its_header_alone() {
    let manager = start_manager(16);
    let head = raw::header(kind::SHARE_FILES, raw::MAX_LIST_BODY);
    let r = refused(
        manager.addr,
        Some(role::MANAGER_CLIENT),
        &[&head, &[0; 1000]],
        Duration::from_secs(3),
    );
    assert_refused(r, "an 8 MiB ShareFiles announced before Register");
    let r = refused(
        manager.addr,
        None,
        &[&head, &[0; 1000]],
        Duration::from_secs(3),
    );
    assert_refused(r, "an 8 MiB ShareFiles announced before Hello");
    let (ok, _, err) = peer_oneshot(manager.addr, &["files"]);
    assert!(ok, "peer files after the refusals: {err}");
}
