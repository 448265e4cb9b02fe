//! One serving session fed arbitrary decoded frames in advancing virtual
//! time, against a catalog of two files. Must never panic, keep its queue
//! within the bound, and only queue requests inside a shared file.
//!
//! `cargo +nightly fuzz run serve`; on stable, tests/prop_cores.rs covers it.

#![no_main]

mod common;

use std::time::{Duration, Instant};

use common::{Op, Ops, assert_decodable};
use libfuzzer_sys::fuzz_target;
use shoal::peer::serve::{Catalog, ServeAction, ServeConfig, ServeSession};
use shoal::store::Manifest;
use shoal::wire::{FileName, Hash};

struct Files(Vec<(FileName, Manifest)>);

impl Catalog for Files {
    fn find_by_name(&self, name: &FileName) -> Option<&Manifest> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }
    fn find_by_root(&self, root: &Hash) -> Option<&Manifest> {
        self.0.iter().find(|(_, m)| m.root == *root).map(|(_, m)| m)
    }
}

fuzz_target!(|data: &[u8]| {
    let chunk = 16u32 << 10;
    let files = Files(
        [("a", 0u64), ("b", 6 * u64::from(chunk) + 100)]
            .into_iter()
            .enumerate()
            .map(|(i, (name, size))| {
                let n = size.div_ceil(u64::from(chunk)) as usize;
                let m = Manifest {
                    root: Hash([i as u8 + 1; 32]),
                    size,
                    chunk_size: chunk,
                    hashes: vec![Hash([0; 32]); n],
                };
                (FileName::new(name).unwrap(), m)
            })
            .collect(),
    );
    let config = ServeConfig {
        max_queue: 8,
        hello_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(10),
    };
    let mut now = Instant::now();
    let mut session = ServeSession::new(config, now);
    let mut ops = Ops(data);
    let mut closed = false;
    while !closed {
        let Some(op) = ops.next_op() else { break };
        match op {
            Op::Msg(_, msg) => session.handle_message(msg, &files, now),
            Op::Toggle(_) => {
                if let Some(req) = session.pop_request() {
                    let m = files.find_by_root(&req.root).unwrap();
                    assert!(req.index < m.chunk_count());
                    assert!(req.offset + u64::from(req.len) <= m.size);
                }
            }
            Op::Advance(d) => {
                now += d;
                if session.poll_timeout().is_some_and(|t| t <= now) {
                    session.handle_timeout(now);
                }
            }
            Op::Timeout => session.handle_timeout(now),
            Op::Extra(..) => session.handle_read_failed("read failed".into()),
        }
        assert!(session.queued() <= config.max_queue);
        while let Some(action) = session.poll_action() {
            match action {
                ServeAction::Send(msg) => assert_decodable(&msg),
                ServeAction::SendManifest(root) => assert!(files.find_by_root(&root).is_some()),
                ServeAction::Close => closed = true,
            }
        }
    }
});
