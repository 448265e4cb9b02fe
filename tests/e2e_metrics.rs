//! `--metrics` end to end: the real binaries, scraped over raw TCP.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;

use common::*;
use tempfile::TempDir;

/// Sends `request` as is and returns the status code and the body.
fn http(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the metrics port");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(request).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read the answer");
    let text = String::from_utf8(out).expect("a text answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {head:?}"));
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|n| n.parse().ok())
        .expect("a Content-Length");
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (code, body.to_string())
}

fn scrape(addr: SocketAddr) -> String {
    let (code, body) = http(addr, b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    body
}

/// The value of the sample whose name and labels are exactly `series`.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn metrics_addr(log: &str) -> Option<SocketAddr> {
    log.lines()
        .find_map(|l| l.split("metrics at http://").nth(1))
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .and_then(|a| a.parse().ok())
}

/// A manager with `--metrics` on an ephemeral port; (process, peer address, metrics address).
fn manager_with_metrics() -> (Proc, SocketAddr, SocketAddr) {
    let mut cmd = Command::new(manager_bin());
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--heartbeat",
        "0.3",
        "--peer-timeout",
        "1.5",
        "--metrics",
        "127.0.0.1:0",
        "-v",
    ]);
    let proc = Proc::spawn_cmd(cmd);
    let mut addrs = None;
    wait_for(WAIT, "manager to listen", || {
        let log = proc.stderr.text();
        let listen = log
            .lines()
            .find_map(|l| l.split("manager listening on ").nth(1))
            .and_then(|a| a.trim().parse().ok());
        addrs = listen.zip(metrics_addr(&log));
        addrs.is_some()
    });
    let (listen, metrics) = addrs.unwrap();
    (proc, listen, metrics)
}

fn wait_value(addr: SocketAddr, series: &str, want: f64) -> String {
    let mut page = String::new();
    wait_for(WAIT, &format!("{series} = {want}"), || {
        page = scrape(addr);
        value(&page, series) == Some(want)
    });
    page
}

#[test]
fn manager_metrics_count_joins_leaves_and_timeouts() {
    let (_manager, listen, metrics) = manager_with_metrics();
    let page = scrape(metrics);
    assert_eq!(value(&page, "shoal_manager_peers"), Some(0.0), "{page}");
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new().unwrap()).collect();
    let mut peers: Vec<Peer> = dirs
        .iter()
        .map(|d| Peer::start(d.path(), listen, &[]))
        .collect();
    let page = wait_value(metrics, "shoal_manager_peers", 2.0);
    assert_eq!(
        value(&page, "shoal_manager_joins_total"),
        Some(2.0),
        "{page}"
    );
    assert_eq!(value(&page, "shoal_manager_leaves_total"), Some(0.0));
    assert_eq!(
        value(&page, "shoal_manager_connections{state=\"member\"}"),
        Some(2.0),
        "{page}"
    );
    assert!(
        value(
            &page,
            "shoal_manager_frame_bytes_in_total{kind=\"register\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{page}"
    );
    assert!(
        value(
            &page,
            "shoal_manager_frame_bytes_out_total{kind=\"welcome\"}"
        )
        .unwrap_or(0.0)
            > 0.0,
        "{page}"
    );
    assert!(value(&page, "shoal_manager_resident_bytes").unwrap_or(0.0) > 0.0);
    assert!(value(&page, "shoal_manager_loop_turn_seconds_count").unwrap_or(0.0) > 0.0);

    // Refusals: garbage, another method, another path.
    assert_eq!(http(metrics, b"\x01\x02garbage\r\n\r\n").0, 400);
    assert_eq!(
        http(
            metrics,
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
        )
        .0,
        405
    );
    assert_eq!(http(metrics, b"GET /other HTTP/1.1\r\n\r\n").0, 404);

    // A goodbye is a leave; a stopped peer, silent past the timeout, is a timeout.
    peers[0].proc.send_line("quit");
    let page = wait_value(metrics, "shoal_manager_leaves_total", 1.0);
    assert_eq!(value(&page, "shoal_manager_peers"), Some(1.0), "{page}");
    peers[1].proc.signal("STOP");
    let page = wait_value(metrics, "shoal_manager_timeouts_total", 1.0);
    assert_eq!(value(&page, "shoal_manager_peers"), Some(0.0), "{page}");
    assert_eq!(
        value(&page, "shoal_manager_leaves_total"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(
        value(&page, "shoal_manager_joins_total"),
        Some(2.0),
        "{page}"
    );
    peers[1].proc.signal("CONT");
    peers.clear();
}

#[test]
fn peer_metrics_count_a_download_and_its_bytes() {
    let manager = Manager::start(0.5, 3.0);
    let len = 3 << 20;
    let seed_dir = TempDir::new().unwrap();
    write_pattern(&seed_dir.path().join("f.bin"), len, 7);
    let seeder = Peer::start(seed_dir.path(), manager.addr, &["--metrics", "127.0.0.1:0"]);
    let mut seeder_metrics = None;
    wait_for(WAIT, "the seeder's metrics address", || {
        seeder_metrics = metrics_addr(&seeder.proc.stderr.text());
        seeder_metrics.is_some()
    });
    let seeder_metrics = seeder_metrics.unwrap();
    wait_for(WAIT, "the file to be listed", || {
        let (_, out, _) = peer_oneshot(manager.addr, &["files"]);
        out.contains("f.bin")
    });

    let dl = TempDir::new().unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir").arg(dl.path()).args([
        "--manager",
        &manager.addr.to_string(),
        "--metrics",
        "127.0.0.1:0",
        "-v",
        "get",
        "f.bin",
        "--seed",
    ]);
    let getter = Proc::spawn_cmd(cmd);
    wait_for(WAIT, "the download", || {
        getter.stdout.text().contains("downloaded f.bin")
    });
    let addr = metrics_addr(&getter.stderr.text()).expect("the getter's metrics address");
    let page = scrape(addr);
    assert_eq!(
        value(&page, "shoal_peer_downloads_done_total"),
        Some(1.0),
        "{page}"
    );
    assert_eq!(value(&page, "shoal_peer_downloads_failed_total"), Some(0.0));
    assert_eq!(value(&page, "shoal_peer_downloads_active"), Some(0.0));
    assert_eq!(value(&page, "shoal_peer_hash_failures_total"), Some(0.0));
    let from_seeder = format!(
        "shoal_peer_fetched_bytes_total{{source=\"{}\"}}",
        seeder.addr
    );
    assert_eq!(value(&page, &from_seeder), Some(len as f64), "{page}");

    let page = scrape(seeder_metrics);
    let served = value(&page, "shoal_peer_served_bytes_total").unwrap_or(0.0);
    assert!(served >= len as f64, "served {served}: {page}");
    assert_eq!(value(&page, "shoal_peer_downloads_done_total"), Some(0.0));
    assert_eq!(
        http(seeder_metrics, b"DELETE /metrics HTTP/1.1\r\n\r\n").0,
        405
    );
    assert_eq!(
        http(seeder_metrics, b"GET /metrics HTTP/1.1\r\n\x00\r\n\r\n").0,
        400
    );
}

#[test]
fn a_holder_sending_corrupt_chunks_shows_as_hash_failures() {
    use common::raw::{self, FakeMember, FakeServer, Manifest, Serve};
    let manager = Manager::start(0.5, 3.0);
    let src_dir = TempDir::new().unwrap();
    let src = src_dir.path().join("c.bin");
    write_pattern(&src, 1 << 20, 11);
    let manifest = Manifest::of_file(&src);
    // The only holder: a fake that answers every GetChunk with wrong bytes.
    let liar = FakeServer::start(Serve::WrongChunks(manifest.clone()));
    let _member = FakeMember::join(manager.addr, liar.addr.port(), &[manifest.entry("c.bin")]);
    wait_for(WAIT, "the fake holder to be listed", || {
        !raw::who_has_groups(manager.addr, "c.bin").is_empty()
    });
    let dl = TempDir::new().unwrap();
    let mut getter = Peer::start(dl.path(), manager.addr, &["--metrics", "127.0.0.1:0"]);
    let mut addr = None;
    wait_for(WAIT, "the getter's metrics address", || {
        addr = metrics_addr(&getter.proc.stderr.text());
        addr.is_some()
    });
    let addr = addr.unwrap();
    let page = scrape(addr);
    assert_eq!(
        value(&page, "shoal_peer_hash_failures_total"),
        Some(0.0),
        "{page}"
    );
    getter.proc.send_line("get c.bin");
    // Chunks already in flight from the liar may arrive before it is dropped.
    let mut page = String::new();
    wait_for(WAIT, "a hash failure to be counted", || {
        page = scrape(addr);
        value(&page, "shoal_peer_hash_failures_total").unwrap_or(0.0) >= 1.0
    });
    assert_eq!(
        value(&page, "shoal_peer_downloads_done_total"),
        Some(0.0),
        "{page}"
    );
    assert!(
        !page.contains("shoal_peer_fetched_bytes_total{"),
        "no corrupt byte counts as fetched: {page}"
    );
}
