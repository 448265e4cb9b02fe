//! One whole download through the real event loops on loopback: a manager
//! and a seeder run on their own threads (each still one single-threaded mio
//! loop, as in their processes), and every iteration a fresh downloading
//! node fetches a 64 MiB file into an empty temp folder: locate, manifest,
//! every chunk requested, hashed and written, the file synced and renamed.
//! Reported as bytes of file per second.

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use shoal::manager::RegistryConfig;
use shoal::manager::server::{Server, ServerConfig};
use shoal::peer::download::GetRequest;
use shoal::peer::link::Query;
use shoal::peer::node::{Mode, Node, NodeConfig};
use shoal::wire::FileName;

const FILE_NAME: &str = "big.bin";
const FILE_SIZE: u64 = 64 << 20;

fn node_config(dir: &Path, manager: SocketAddr) -> NodeConfig {
    NodeConfig {
        dir: dir.to_path_buf(),
        manager,
        listen: "127.0.0.1:0".parse().expect("a socket address"),
        advertise: None,
        upload_limit: None,
        max_peers: 8,
        max_conns: 64,
        rotate_after: Duration::from_secs(30),
        rescan_interval: Duration::from_secs(5),
        progress_bar: false,
        keys: None,
        manager_key: None,
        allow: None,
    }
}

fn write_random_file(path: &Path, len: u64) {
    let mut f = std::io::BufWriter::new(File::create(path).expect("create the shared file"));
    common::write_pseudo_random(&mut f, len, 0x2545_f491_4f6c_dd1d);
}

/// Sends stdout to /dev/null while alive: every finished `get` prints its
/// summary line, which would bury criterion's report.
struct QuietStdout {
    saved: i32,
}

impl QuietStdout {
    fn new() -> Option<QuietStdout> {
        let null = File::options().write(true).open("/dev/null").ok()?;
        std::io::stdout().flush().ok()?;
        // SAFETY: dup/dup2 on fd 1 and on a file we own; no memory is touched.
        let saved = unsafe { libc::dup(1) };
        if saved < 0 {
            return None;
        }
        // SAFETY: as above; `null` stays open for the duration of the call.
        unsafe { libc::dup2(null.as_raw_fd(), 1) };
        Some(QuietStdout { saved })
    }
}

impl Drop for QuietStdout {
    fn drop(&mut self) {
        let _ = std::io::stdout().flush();
        // SAFETY: restores fd 1 from the copy taken in `new`, then closes the copy.
        unsafe {
            libc::dup2(self.saved, 1);
            libc::close(self.saved);
        }
    }
}

fn transfer(c: &mut Criterion) {
    let seed_dir = tempfile::tempdir().expect("create the seeder's folder");
    write_random_file(&seed_dir.path().join(FILE_NAME), FILE_SIZE);

    let (done_tx, done_rx) = mpsc::channel();
    let tx = done_tx.clone();
    let (addr_tx, addr_rx) = mpsc::channel();
    // Built on its own thread, like the seeder below: event loops are not Send.
    thread::spawn(move || {
        let server = Server::bind(ServerConfig {
            listen: "127.0.0.1:0".parse().expect("a socket address"),
            registry: RegistryConfig::default(),
            max_conns: 4096,
            keys: None,
            allow: None,
            metrics: None,
        })
        .expect("bind the manager");
        let _ = addr_tx.send(server.local_addr().expect("the manager's address"));
        let _ = server.run();
        let _ = tx.send(());
    });
    let manager = addr_rx.recv().expect("the manager's address");
    // A node is built on the thread that runs it (it is not Send: its open
    // files are shared with sends in progress).
    let seed_path = seed_dir.path().to_path_buf();
    thread::spawn(move || {
        let seeder = Node::new(node_config(&seed_path, manager), Mode::Interactive)
            .expect("start the seeder");
        let _ = seeder.run();
        let _ = done_tx.send(());
    });
    let start = Instant::now();
    let listed = |a: shoal::peer::query::Answer| matches!(a, shoal::peer::query::Answer::Files(f) if f.iter().any(|f| f.name.as_str() == FILE_NAME));
    while !shoal::peer::query::ask(manager, Query::ListFiles, None).is_ok_and(listed) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "seeder never registered"
        );
        thread::sleep(Duration::from_millis(20));
    }

    let name = FileName::new(FILE_NAME).expect("a valid file name");
    let mut group = c.benchmark_group("transfer");
    group.throughput(Throughput::Bytes(FILE_SIZE));
    group.sampling_mode(SamplingMode::Flat);
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    group.bench_function("64MiB_1_seeder_loopback", |b| {
        b.iter_custom(|iters| {
            let _quiet = QuietStdout::new();
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("create the downloader's folder");
                let mode = Mode::Get {
                    requests: vec![GetRequest {
                        name: name.clone(),
                        hash: None,
                    }],
                    seed: false,
                };
                let t = Instant::now();
                let node = Node::new(node_config(dir.path(), manager), mode)
                    .expect("start the downloader");
                node.run().expect("the download succeeds");
                total += t.elapsed();
                let got = std::fs::metadata(dir.path().join(FILE_NAME)).map(|m| m.len());
                assert_eq!(black_box(got.ok()), Some(FILE_SIZE), "incomplete download");
            }
            total
        })
    });
    group.finish();

    // Every loop in this process stops on SIGTERM (signal-hook has replaced
    // the default action); wait briefly for the manager and the seeder.
    let _ = signal_hook::low_level::raise(signal_hook::consts::SIGTERM);
    for _ in 0..2 {
        let _ = done_rx.recv_timeout(Duration::from_secs(5));
    }
}

criterion_group!(benches, transfer);
criterion_main!(benches);
