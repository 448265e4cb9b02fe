//! The peer's manager link (member or query-only, chosen by the first byte)
//! fed arbitrary connect/disconnect events and decoded frames in advancing
//! virtual time. Must never panic and only send frames that decode.
//!
//! `cargo +nightly fuzz run manager_link`; on stable, tests/prop_cores.rs covers it.

#![no_main]

mod common;

use std::time::Instant;

use common::{Op, Ops, assert_decodable};
use libfuzzer_sys::fuzz_target;
use shoal::peer::link::{LinkAction, LinkConfig, LinkMode, ManagerLink, Query};
use shoal::wire::FileName;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mode = if mode & 1 == 0 {
        LinkMode::QueryOnly
    } else {
        LinkMode::Member {
            listen_port: 7001,
            advertise: None,
        }
    };
    let mut now = Instant::now();
    let mut link = ManagerLink::new(mode, LinkConfig::default(), now);
    let mut ops = Ops(data);
    let mut open = false;
    while let Some(op) = ops.next_op() {
        match op {
            Op::Toggle(_) if open => {
                open = false;
                link.handle_disconnected(now);
            }
            Op::Toggle(_) => {
                open = true;
                link.handle_connected(now);
            }
            Op::Msg(_, msg) => {
                if open {
                    link.handle_message(msg, now);
                }
            }
            Op::Advance(d) => {
                now += d;
                if link.poll_timeout().is_some_and(|t| t <= now) {
                    link.handle_timeout(now);
                }
            }
            Op::Timeout => link.handle_timeout(now),
            Op::Extra(kind, arg) => match kind % 4 {
                0 => link.ask(Query::ListFiles),
                1 => link.ask(Query::ListPeers),
                2 => {
                    if let Ok(name) = FileName::new(&format!("f{arg}")) {
                        link.ask(Query::WhoHas(name));
                    }
                }
                _ => link.shutdown(),
            },
        }
        while let Some(action) = link.poll_action() {
            match action {
                LinkAction::Send(msg) => assert_decodable(&msg),
                LinkAction::Close => open = false,
                LinkAction::Connect | LinkAction::Event(_) => {}
            }
        }
    }
});
