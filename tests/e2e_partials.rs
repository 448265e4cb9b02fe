//! Several downloads at once at the interactive prompt, and the partial files
//! of abandoned downloads (`ls`, `rm-partial`, the stale sweep at start), with
//! the real binaries.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use tempfile::TempDir;

const MIB: u64 = 1 << 20;

/// A seeding peer in a fresh folder holding `files` (name, size, seed),
/// started with `extra` flags; returns once the manager lists them all.
fn seeder(manager: &Manager, files: &[(&str, u64, u64)], extra: &[&str]) -> (TempDir, Peer) {
    let dir = TempDir::new().unwrap();
    for (name, size, seed) in files {
        write_pattern(&dir.path().join(name), *size, *seed);
    }
    let peer = Peer::start(dir.path(), manager.addr, extra);
    wait_for(WAIT, "the files to be listed", || {
        let (ok, out, _) = peer_oneshot(manager.addr, &["files"]);
        ok && files.iter().all(|(name, _, _)| out.contains(name))
    });
    (dir, peer)
}

fn partial_dir(dir: &Path) -> std::path::PathBuf {
    dir.join(".shoal/partial")
}

fn partial_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(partial_dir(dir))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Sends `line` and waits until the output since then satisfies `done`;
/// returns that output.
fn ask(p: &mut Peer, line: &str, what: &str, mut done: impl FnMut(&str) -> bool) -> String {
    p.proc.stdout.clear();
    p.proc.send_line(line);
    let mut out = String::new();
    wait_for(WAIT, what, || {
        out = p.proc.stdout.text();
        done(&out)
    });
    out
}

/// A `status` line for a running download of `name`.
fn status_line_of(out: &str, name: &str) -> bool {
    out.lines()
        .any(|l| l.starts_with(&format!("{name}: ")) && l.ends_with("sources"))
}

#[test]
fn two_interactive_downloads_run_at_once() {
    let manager = Manager::start(0.5, 3.0);
    let files = [("a.bin", 8 * MIB, 1), ("b.bin", 8 * MIB, 2)];
    // 16 MiB at 4 MiB/s: both run for seconds, so they overlap.
    let (src, _seed) = seeder(&manager, &files, &["--upload-limit", "4MiB"]);
    let dl = TempDir::new().unwrap();
    let mut p = Peer::start(dl.path(), manager.addr, &[]);
    p.proc.send_line("get a.bin");
    p.proc.send_line("get b.bin");

    // `status` lists both while both run.
    let start = Instant::now();
    let mut both = false;
    while !both {
        assert!(start.elapsed() < WAIT, "status never listed both downloads");
        p.proc.stdout.clear();
        p.proc.send_line("status");
        std::thread::sleep(Duration::from_millis(200));
        let out = p.proc.stdout.text();
        both = status_line_of(&out, "a.bin") && status_line_of(&out, "b.bin");
        assert!(
            !out.contains("downloaded "),
            "a download finished before status listed both: {out}"
        );
    }
    assert!(!p.proc.stdout.text().contains("already downloading"));

    for (name, _, _) in files {
        let want = std::fs::read(src.path().join(name)).unwrap();
        let got = dl.path().join(name);
        wait_for(WAIT, &format!("{name} to arrive"), || {
            std::fs::read(&got).is_ok_and(|b| b == want)
        });
    }
    // Each prints its own summary.
    wait_for(WAIT, "both summaries", || {
        let out = p.proc.stdout.text();
        out.contains("downloaded a.bin: 8.4 MB") && out.contains("downloaded b.bin: 8.4 MB")
    });
    assert!(partial_names(dl.path()).is_empty());
}

#[test]
fn ls_shows_a_killed_downloads_partial_and_rm_partial_removes_it() {
    let manager = Manager::start(0.5, 3.0);
    let (src, _seed) = seeder(
        &manager,
        &[("r.bin", 16 * MIB, 3)],
        &["--upload-limit", "2MiB"],
    );
    let dl = TempDir::new().unwrap();
    let mut cmd = Command::new(peer_bin());
    cmd.arg("--dir")
        .arg(dl.path())
        .args(["--manager", &manager.addr.to_string(), "get", "r.bin"]);
    let mut first = Proc::spawn_cmd(cmd);
    // Progress is saved every 2 s; let a save with some chunks happen.
    let started = Instant::now();
    wait_for(WAIT, "a saved bitmap", || {
        partial_names(dl.path())
            .iter()
            .any(|n| n.ends_with(".have"))
            && started.elapsed() > Duration::from_millis(3000)
    });
    first.signal("KILL");
    first.wait_exit(WAIT);
    assert!(!dl.path().join("r.bin").exists(), "finished too soon");

    let mut p = Peer::start(dl.path(), manager.addr, &[]);
    let out = ask(&mut p, "ls", "ls to list the partial", |o| {
        o.contains("1 partial files") && o.contains("% saved")
    });
    let line = out
        .lines()
        .find(|l| l.contains("% saved"))
        .unwrap()
        .to_string();
    assert!(line.trim_start().starts_with("r.bin "), "{line}");
    assert!(line.contains("16.8 MB"), "{line}");
    let percent: u32 = line
        .split("% saved")
        .next()
        .and_then(|s| s.split_whitespace().last())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no percent in {line}"));
    assert!(percent > 0 && percent < 100, "{line}");
    assert!(!line.contains("downloading"), "{line}");

    let out = ask(&mut p, "rm-partial r.bin", "rm-partial", |o| {
        o.ends_with('\n')
    });
    assert!(out.contains("removed partial file of r.bin"), "{out}");
    assert!(
        partial_names(dl.path()).is_empty(),
        "{:?}",
        partial_names(dl.path())
    );
    let out = ask(&mut p, "ls", "ls", |o| o.contains("shared files"));
    assert!(!out.contains("partial files"), "{out}");
    let out = ask(&mut p, "rm-partial r.bin", "rm-partial again", |o| {
        o.ends_with('\n')
    });
    assert!(out.contains("no partial file matches"), "{out}");

    // Not while that download runs.
    p.proc.send_line("get r.bin");
    wait_for(WAIT, "the download to open its partial", || {
        partial_names(dl.path())
            .iter()
            .any(|n| n.ends_with(".name"))
    });
    let out = ask(&mut p, "rm-partial r.bin", "refusal", |o| o.ends_with('\n'));
    assert!(out.contains("is downloading now"), "{out}");
    let out = ask(&mut p, "ls", "ls while running", |o| o.contains("% saved"));
    assert!(out.contains("(downloading)"), "{out}");
    let want = std::fs::read(src.path().join("r.bin")).unwrap();
    wait_for(WAIT, "r.bin to arrive", || {
        std::fs::read(dl.path().join("r.bin")).is_ok_and(|b| b == want)
    });
}

#[test]
fn stale_partials_are_swept_at_start_and_fresh_ones_kept() {
    let manager = Manager::start(0.5, 3.0);
    let dl = TempDir::new().unwrap();
    let dir = partial_dir(dl.path());
    std::fs::create_dir_all(&dir).unwrap();
    let (old, fresh) = ("ab".repeat(32), "cd".repeat(32));
    for (root, name) in [(&old, "old file.bin"), (&fresh, "fresh.bin")] {
        std::fs::write(dir.join(format!("{root}.part")), vec![7u8; 5000]).unwrap();
        std::fs::write(dir.join(format!("{root}.have")), b"not a bitmap").unwrap();
        std::fs::write(dir.join(format!("{root}.name")), name).unwrap();
    }
    for suffix in [".part", ".have", ".name"] {
        let ok = Command::new("touch")
            .args(["-h", "-d", "8 days ago"])
            .arg(dir.join(format!("{old}{suffix}")))
            .status()
            .unwrap()
            .success();
        assert!(ok, "touch -d failed");
    }
    // A fresh partial with one old file is not stale.
    let ok = Command::new("touch")
        .args(["-d", "8 days ago"])
        .arg(dir.join(format!("{fresh}.part")))
        .status()
        .unwrap()
        .success();
    assert!(ok);

    let mut p = Peer::start(dl.path(), manager.addr, &[]);
    wait_for(WAIT, "the sweep's log line", || {
        p.proc
            .stderr
            .text()
            .contains("removed stale partial download old file.bin")
    });
    let log = p.proc.stderr.text();
    let line = log
        .lines()
        .find(|l| l.contains("removed stale partial"))
        .unwrap();
    assert!(line.contains("untouched for 8 days"), "{line}");
    assert!(!log.contains("fresh.bin"), "{log}");
    let left = partial_names(dl.path());
    assert_eq!(
        left,
        [".part", ".have", ".name"]
            .map(|s| format!("{fresh}{s}"))
            .iter()
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect::<Vec<_>>()
    );
    let out = ask(&mut p, "ls", "ls", |o| o.contains("% saved"));
    assert!(
        out.contains("1 partial files") && out.contains("fresh.bin"),
        "{out}"
    );
}
