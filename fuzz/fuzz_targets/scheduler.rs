//! The download scheduler fed arbitrary source events and chunk arrivals
//! (any index, from any source, verified or corrupt) in advancing virtual
//! time. Must never panic and keep `check_invariants` after every step.
//!
//! `cargo +nightly fuzz run scheduler`; on stable, tests/prop_cores.rs covers it.

#![no_main]

mod common;

use std::time::Instant;

use common::{Op, Ops};
use libfuzzer_sys::fuzz_target;
use shoal::peer::scheduler::{Action, Arrival, Scheduler, SchedulerConfig, SourceId};

fuzz_target!(|data: &[u8]| {
    let Some((&n, data)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 40) + 1;
    let lens: Vec<u32> = (0..n).map(|i| 1000 + i as u32).collect();
    let have: Vec<bool> = (0..n).map(|i| i % 7 == 3).collect();
    let mut now = Instant::now();
    let mut s = Scheduler::new(lens, &have, SchedulerConfig::default());
    let mut ops = Ops(data);
    let mut asked: Vec<(u32, u32)> = Vec::new();
    while let Some(op) = ops.next_op() {
        match op {
            Op::Toggle(id) => s.add_source(SourceId(u32::from(id % 6)), now),
            Op::Msg(..) => {}
            Op::Advance(d) => {
                now += d;
                if s.poll_timeout().is_some_and(|t| t <= now) {
                    s.handle_timeout(now);
                }
            }
            Op::Timeout => s.handle_timeout(now),
            Op::Extra(kind, arg) => {
                let source = SourceId(u32::from(arg % 6));
                // Mostly a chunk that was asked for, sometimes any index.
                let index = match asked.get(usize::from(arg) % asked.len().max(1)) {
                    Some(&(_, i)) if kind % 4 != 3 => i,
                    _ => u32::from(arg),
                };
                match kind % 8 {
                    0 => s.remove_source(source, now),
                    1 => s.handle_source_error(source, now),
                    _ => {
                        if s.handle_chunk_arrived(source, index, now) == Arrival::Verify {
                            if kind % 8 == 7 {
                                s.handle_chunk_corrupt(source, index, now);
                            } else {
                                s.handle_chunk_verified(source, index, now);
                            }
                        }
                    }
                }
            }
        }
        while let Some(action) = s.poll_action() {
            if let Action::Request { source, index } = action {
                assert!((index as usize) < n);
                asked.push((source.0, index));
            }
        }
        if let Err(e) = s.check_invariants() {
            panic!("{e}");
        }
    }
});
