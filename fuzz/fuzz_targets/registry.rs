//! The manager's registry fed arbitrary connection events and decoded
//! frames in advancing virtual time. Must never panic, never send to a
//! connection it closed, and only send frames that decode.
//!
//! `cargo +nightly fuzz run registry`; on stable, tests/prop_cores.rs covers it.

#![no_main]

mod common;

use std::collections::BTreeSet;
use std::time::Instant;

use common::{Op, Ops, assert_decodable};
use libfuzzer_sys::fuzz_target;
use shoal::manager::registry::{Action, Registry, RegistryConfig};
use shoal::net::ConnId;

fuzz_target!(|data: &[u8]| {
    let mut now = Instant::now();
    let mut reg = Registry::new(RegistryConfig::default());
    let mut live = BTreeSet::new();
    let remote = "10.0.0.9:5000".parse().unwrap();
    let mut ops = Ops(data);
    while let Some(op) = ops.next_op() {
        match op {
            Op::Toggle(c) => {
                let c = usize::from(c % 4);
                if live.insert(c) {
                    reg.handle_connected(ConnId(c), now);
                } else {
                    live.remove(&c);
                    reg.handle_disconnected(ConnId(c), now);
                }
            }
            Op::Msg(c, msg) => {
                let c = usize::from(c % 4);
                if live.contains(&c) {
                    reg.handle_message(ConnId(c), remote, msg, now);
                }
            }
            Op::Advance(d) => {
                now += d;
                if reg.poll_timeout().is_some_and(|t| t <= now) {
                    reg.handle_timeout(now);
                }
            }
            Op::Timeout | Op::Extra(..) => reg.handle_timeout(now),
        }
        while let Some(action) = reg.poll_action() {
            match action {
                Action::Send(ConnId(c), msg) => {
                    assert!(live.contains(&c));
                    assert_decodable(&msg);
                }
                Action::Close(ConnId(c)) => assert!(live.remove(&c)),
            }
        }
    }
});
