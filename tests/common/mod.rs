//! Harness for end-to-end tests: the real `manager` and `peer` binaries on
//! loopback ephemeral ports, in temp folders, with every wait bounded.
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod raw;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// No single wait in a test may take longer than this.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn manager_bin() -> &'static str {
    env!("CARGO_BIN_EXE_manager")
}

pub fn peer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_peer")
}

/// Polls `cond` every 50 ms until it holds or `limit` passes.
pub fn wait_for(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Collects a child's output on a thread so its pipe never fills up.
#[derive(Clone, Default)]
pub struct Captured(Arc<Mutex<(String, bool)>>);

impl Captured {
    fn drain(&self, pipe: impl Read + Send + 'static) {
        let buf = self.0.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut b = buf.lock().unwrap();
                b.0.push_str(&line);
                b.0.push('\n');
            }
            buf.lock().unwrap().1 = true;
        });
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().0.clone()
    }

    pub fn clear(&self) {
        self.0.lock().unwrap().0.clear();
    }

    /// True once the pipe reached EOF: all the output is in.
    fn complete(&self) -> bool {
        self.0.lock().unwrap().1
    }
}

/// A running process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub stdout: Captured,
    pub stderr: Captured,
}

impl Proc {
    pub fn spawn_cmd(mut cmd: Command) -> Proc {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn binary");
        let stdout = Captured::default();
        let stderr = Captured::default();
        stdout.drain(child.stdout.take().unwrap());
        stderr.drain(child.stderr.take().unwrap());
        let stdin = child.stdin.take();
        Proc {
            child,
            stdin,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Types a command line on the process's stdin.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").expect("write to stdin");
        stdin.flush().unwrap();
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -{sig} {}", self.pid());
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit on its own; panics after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The exit can beat the drain threads to the last bytes.
                wait_for(WAIT, "output to be read", || {
                    self.stdout.complete() && self.stderr.complete()
                });
                return status;
            }
            assert!(
                start.elapsed() < limit,
                "process did not exit within {limit:?}; stderr:\n{}",
                self.stderr.text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued before it can die of SIGKILL
        // promptly everywhere; harmless if it is running.
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid().to_string()])
            .status();
        self.kill();
    }
}

/// A manager on an ephemeral loopback port.
pub struct Manager {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Manager {
    /// Starts a manager with short timers, for fast tests.
    pub fn start(heartbeat: f64, peer_timeout: f64) -> Manager {
        Manager::start_on("127.0.0.1:0", heartbeat, peer_timeout)
    }

    pub fn start_on(listen: &str, heartbeat: f64, peer_timeout: f64) -> Manager {
        Manager::start_with(listen, heartbeat, peer_timeout, &[])
    }

    /// [`Manager::start_on`] with more flags (`--full-list-limit 2`, ...).
    pub fn start_with(listen: &str, heartbeat: f64, peer_timeout: f64, extra: &[&str]) -> Manager {
        let mut cmd = Command::new(manager_bin());
        cmd.args(extra);
        cmd.args([
            "--listen",
            listen,
            "--heartbeat",
            &heartbeat.to_string(),
            "--peer-timeout",
            &peer_timeout.to_string(),
            "-v",
        ]);
        let proc = Proc::spawn_cmd(cmd);
        let mut addr = None;
        wait_for(WAIT, "manager to listen", || {
            addr = listening_addr(&proc.stderr.text(), "manager listening on ");
            addr.is_some()
        });
        Manager {
            proc,
            addr: addr.unwrap(),
        }
    }

    /// The manager's own view, via its `peers` stdin command.
    pub fn peer_count(&mut self) -> usize {
        self.proc.stdout.clear();
        self.proc.send_line("peers");
        let mut count = None;
        wait_for(WAIT, "manager peers output", || {
            count = self
                .proc
                .stdout
                .text()
                .lines()
                .find_map(|l| l.strip_suffix(" live peers").and_then(|n| n.parse().ok()));
            count.is_some()
        });
        count.unwrap()
    }
}

fn listening_addr(log: &str, marker: &str) -> Option<SocketAddr> {
    log.lines()
        .find_map(|l| l.split(marker).nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
}

/// A sharing peer in its own folder, taking commands on stdin.
pub struct Peer {
    pub proc: Proc,
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

impl Peer {
    pub fn start(dir: &Path, manager: SocketAddr, extra: &[&str]) -> Peer {
        let mut cmd = Command::new(peer_bin());
        cmd.arg("--dir")
            .arg(dir)
            .args(["--manager", &manager.to_string(), "--rescan", "1", "-v"])
            .args(extra);
        let proc = Proc::spawn_cmd(cmd);
        let mut addr = None;
        wait_for(WAIT, "peer to listen", || {
            addr = listening_addr(&proc.stderr.text(), "peer serving on ");
            addr.is_some()
        });
        Peer {
            proc,
            dir: dir.to_path_buf(),
            addr: addr.unwrap(),
        }
    }

    /// The serving addresses this peer lists, via its `peers` command.
    pub fn listed_addrs(&mut self) -> Vec<SocketAddr> {
        self.proc.stdout.clear();
        self.proc.send_line("peers");
        let mut out = String::new();
        wait_for(WAIT, "peer `peers` output", || {
            out = self.proc.stdout.text();
            parse_peer_list(&out).is_some()
        });
        parse_peer_list(&out).unwrap()
    }
}

/// Parses the `N live peers` block printed by `peers`; `None` until complete.
pub fn parse_peer_list(out: &str) -> Option<Vec<SocketAddr>> {
    let mut lines = out.lines().skip_while(|l| !l.ends_with(" live peers"));
    let n: usize = lines.next()?.strip_suffix(" live peers")?.parse().ok()?;
    let addrs: Vec<SocketAddr> = lines
        .take(n)
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    (addrs.len() == n).then(|| {
        let mut a = addrs;
        a.sort();
        a
    })
}

/// Starts `peer --dir DIR --manager ADDR -v <args>` (a `get`, usually),
/// returning the running process.
pub fn spawn_peer(dir: &Path, manager: SocketAddr, args: &[&str]) -> Proc {
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dir)
        .args(["--manager", &manager.to_string(), "-v"])
        .args(args);
    Proc::spawn_cmd(cmd)
}

/// Runs `peer --manager ADDR <args>` to completion and returns its stdout.
/// Waits until the manager lists `name` with `holders` holders.
pub fn wait_holders(manager: SocketAddr, name: &str, holders: u32) {
    let want = format!("{holders:>3} holders");
    wait_for(WAIT, "holders to be listed", || {
        let (_, out, _) = peer_oneshot(manager, &["files"]);
        out.lines()
            .any(|l| l.trim_start().starts_with(name) && l.contains(&want))
    });
}

pub fn peer_oneshot(manager: SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(peer_bin())
        .args(["--manager", &manager.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run peer");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The manager's view of the live peers, via `peer peers`.
pub fn network_peers(manager: SocketAddr) -> Vec<SocketAddr> {
    let (ok, out, err) = peer_oneshot(manager, &["peers"]);
    assert!(ok, "peer peers failed: {err}");
    parse_peer_list(&out).expect("a peer list")
}

/// Writes `len` bytes of deterministic, non-repeating content.
pub fn write_pattern(path: &Path, len: u64, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut left = len;
    let mut block = vec![0u8; 1 << 16];
    while left > 0 {
        rng.fill(&mut block);
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}
