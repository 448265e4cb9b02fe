//! Unit tests: one behaviour each, with hand-made timings.

use super::*;

const LEN: u32 = 64 << 10;

fn ms(base: Instant, n: u64) -> Instant {
    base + Duration::from_millis(n)
}

/// The depth rule without the latency bound (the window is always
/// `target_window`) and with small depth limits, so hand-made timings give
/// exact depths. The latency bound has its own test.
fn rate_only_config() -> SchedulerConfig {
    SchedulerConfig {
        latency_margin: Duration::from_millis(250),
        min_inflight: 2,
        max_inflight: 64,
        ..SchedulerConfig::default()
    }
}

fn new_sched(count: usize) -> Scheduler {
    Scheduler::new(vec![LEN; count], &[], rate_only_config())
}

fn drain(s: &mut Scheduler) -> Vec<Action> {
    let out: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
    s.check_invariants().unwrap();
    out
}

fn requests_to(actions: &[Action], to: SourceId) -> Vec<u32> {
    actions
        .iter()
        .filter_map(|a| match *a {
            Action::Request { source, index } if source == to => Some(index),
            _ => None,
        })
        .collect()
}

/// Delivers a good chunk: it must be wanted, and must complete the chunk.
fn deliver(s: &mut Scheduler, source: SourceId, index: u32, now: Instant) {
    assert_eq!(s.handle_chunk_arrived(source, index, now), Arrival::Verify);
    assert!(s.handle_chunk_verified(source, index, now));
}

const A: SourceId = SourceId(1);
const B: SourceId = SourceId(2);
const C: SourceId = SourceId(3);

#[test]
fn requests_are_spread_across_sources_lowest_first() {
    let t = Instant::now();
    let mut s = new_sched(20);
    for id in [A, B, C] {
        s.add_source(id, t);
    }
    let acts = drain(&mut s);
    assert_eq!(requests_to(&acts, A), [0, 1, 2, 3]);
    assert_eq!(requests_to(&acts, B), [4, 5, 6, 7]);
    assert_eq!(requests_to(&acts, C), [8, 9, 10, 11]);
    assert_eq!(acts.len(), 12);
    assert_eq!(s.source_stats(B).unwrap().in_flight, 4);
}

#[test]
fn pipeline_grows_for_a_fast_source_and_not_for_a_slow_one() {
    let t = Instant::now();
    let mut s = new_sched(2000);
    s.add_source(A, t);
    s.add_source(B, t);
    drain(&mut s);
    let mut queue_a: VecDeque<u32> = (0..4).collect();
    let mut queue_b: VecDeque<u32> = (4..8).collect();
    // A delivers a chunk every millisecond after a 50 ms round trip, B one
    // every 100 ms: A is 100 times faster.
    for step in 0..400u64 {
        let now = ms(t, 50 + step);
        let index = queue_a.pop_front().unwrap();
        deliver(&mut s, A, index, now);
        if step % 100 == 99 {
            let index = queue_b.pop_front().unwrap();
            deliver(&mut s, B, index, now);
        }
        for a in drain(&mut s) {
            match a {
                Action::Request { source: A, index } => queue_a.push_back(index),
                Action::Request { source: B, index } => queue_b.push_back(index),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    let a = s.source_stats(A).unwrap();
    let b = s.source_stats(B).unwrap();
    // 64 KiB per ms is 65.5 MB/s: the first sample (a 50 ms round trip)
    // must not pin the estimate low.
    let rate = a.rate.unwrap();
    assert!((rate / 65.5e6 - 1.0).abs() < 0.05, "rate {rate}");
    assert_eq!(a.target_depth, 64);
    assert_eq!(a.in_flight, 64);
    // B: 655 kB/s * 250 ms / 64 KiB = 2.5 chunks, rounded up.
    assert_eq!(b.target_depth, 3);
    assert_eq!(b.in_flight, 3);
    assert_eq!(a.chunks_received, 400);
    assert_eq!(b.chunks_received, 4);
}

#[test]
fn a_starved_sample_cannot_lower_the_rate() {
    // Depth one: every request leaves when the previous chunk is in, so
    // each interval holds a round trip and says only "at least this fast".
    let t = Instant::now();
    let config = SchedulerConfig {
        min_inflight: 1,
        initial_inflight: 1,
        max_inflight: 1,
        ..rate_only_config()
    };
    let mut s = Scheduler::new(vec![LEN; 10], &[], config);
    s.add_source(A, t);
    assert_eq!(requests_to(&drain(&mut s), A), [0]);
    deliver(&mut s, A, 0, ms(t, 1));
    let fast = s.source_stats(A).unwrap().rate.unwrap();
    assert!((fast / 65.5e6 - 1.0).abs() < 0.01, "rate {fast}");
    assert_eq!(requests_to(&drain(&mut s), A), [1]);
    deliver(&mut s, A, 1, ms(t, 101));
    assert_eq!(s.source_stats(A).unwrap().rate, Some(fast));
}

#[test]
fn resumed_chunks_are_never_requested() {
    let t = Instant::now();
    let have: Vec<bool> = (0..12).map(|i| i % 3 == 0).collect();
    let mut s = Scheduler::new(vec![LEN; 12], &have, rate_only_config());
    assert_eq!(s.progress().chunks_done, 4);
    assert_eq!(s.progress().bytes_done, 4 * u64::from(LEN));
    s.add_source(A, t);
    s.add_source(B, t);
    let mut asked = Vec::new();
    let mut pending: Vec<(SourceId, u32)> = Vec::new();
    for round in 0..20u64 {
        for a in drain(&mut s) {
            match a {
                Action::Request { source, index } => {
                    asked.push(index);
                    pending.push((source, index));
                }
                Action::Cancel { source, index } => pending.retain(|&p| p != (source, index)),
                Action::DropSource { .. } => panic!("{a:?}"),
            }
        }
        if let Some((source, index)) = pending.pop() {
            deliver(&mut s, source, index, ms(t, round + 1));
        }
    }
    assert!(s.is_complete());
    asked.sort_unstable();
    asked.dedup();
    assert_eq!(asked, [1, 2, 4, 5, 7, 8, 10, 11]);
}

#[test]
fn nothing_to_do_when_everything_is_here() {
    let t = Instant::now();
    let mut s = Scheduler::new(vec![LEN, 5], &[true, true], rate_only_config());
    assert!(s.is_complete());
    s.add_source(A, t);
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), None);
    let empty = Scheduler::new(Vec::new(), &[], rate_only_config());
    assert!(empty.is_complete());
    assert_eq!(empty.progress().bytes_total, 0);
}

#[test]
fn endgame_duplicates_the_slow_holders_chunks_then_cancels() {
    let t = Instant::now();
    let mut s = new_sched(12);
    s.add_source(A, t);
    s.add_source(B, t);
    drain(&mut s); // A: 0..4, B: 4..8
    // A answers fast; B has said nothing yet. A takes the rest (8..12),
    // then, nothing being missing, duplicates B's chunks, not its own.
    deliver(&mut s, A, 0, ms(t, 10));
    let acts = drain(&mut s);
    assert_eq!(requests_to(&acts, A), [8, 9, 10, 11, 4, 5, 6, 7]);
    // Copies are capped at two: a third source gets nothing to do.
    s.add_source(C, ms(t, 11));
    assert!(requests_to(&drain(&mut s), C).is_empty());
    // A's copy of 4 wins: B is told to forget it.
    deliver(&mut s, A, 4, ms(t, 12));
    let acts = drain(&mut s);
    assert!(
        acts.contains(&Action::Cancel {
            source: B,
            index: 4
        }),
        "{acts:?}"
    );
    // B's copy was already on its way: discarded, and B is not blamed.
    assert_eq!(s.handle_chunk_arrived(B, 4, ms(t, 13)), Arrival::Discard);
    assert!(drain(&mut s).is_empty());
    assert!(s.source_stats(B).is_some());
    // B wins chunk 5: A's copy is cancelled.
    deliver(&mut s, B, 5, ms(t, 14));
    let acts = drain(&mut s);
    assert!(
        acts.contains(&Action::Cancel {
            source: A,
            index: 5
        }),
        "{acts:?}"
    );
}

#[test]
fn endgame_spares_a_fresh_fast_holder_then_rechecks() {
    let t = Instant::now();
    let config = SchedulerConfig {
        max_inflight: 4,
        ..rate_only_config()
    };
    let mut s = Scheduler::new(vec![LEN; 12], &[], config);
    s.add_source(B, t);
    drain(&mut s); // B: 0..4
    deliver(&mut s, B, 0, ms(t, 100)); // B: 100 ms a chunk, depth 3
    s.add_source(A, ms(t, 100));
    assert_eq!(requests_to(&drain(&mut s), A), [4, 5, 6, 7]);
    for i in 4..8u32 {
        deliver(&mut s, A, i, ms(t, 97 + u64::from(i))); // A: 1 ms a chunk
    }
    assert_eq!(requests_to(&drain(&mut s), A), [8, 9, 10, 11]);
    // Nothing is missing. A frees a slot and duplicates B's last chunk.
    deliver(&mut s, A, 8, ms(t, 199));
    assert_eq!(
        drain(&mut s),
        [Action::Request {
            source: A,
            index: 3
        }]
    );
    // B frees a slot, but A's chunks are due long before B could send one
    // (3 x 100 ms): no duplicate, only a re-check when A would be late.
    deliver(&mut s, B, 1, ms(t, 200));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.poll_timeout(), Some(ms(t, 300)));
    s.handle_timeout(ms(t, 299));
    assert!(drain(&mut s).is_empty());
    // A has now been silent for 101 ms: its last chunk is due after B's
    // copy would be.
    s.handle_timeout(ms(t, 300));
    assert_eq!(
        drain(&mut s),
        [Action::Request {
            source: B,
            index: 11
        }]
    );
}

#[test]
fn corrupt_chunk_drops_the_source_and_goes_to_another() {
    let t = Instant::now();
    let mut s = new_sched(20);
    s.add_source(A, t);
    s.add_source(B, t);
    drain(&mut s); // A: 0..4, B: 4..8
    assert_eq!(s.handle_chunk_arrived(A, 0, ms(t, 5)), Arrival::Verify);
    s.handle_chunk_corrupt(A, 0, ms(t, 5));
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: A,
            reason: DropReason::Corrupt
        }]
    );
    assert_eq!(s.progress().active_sources, 1);
    // The next free slot at B goes to the lowest missing chunk: A's 0.
    deliver(&mut s, B, 4, ms(t, 6));
    assert_eq!(requests_to(&drain(&mut s), B)[0], 0);
    // A is gone: what it still sends is ignored, without a second drop.
    assert_eq!(s.handle_chunk_arrived(A, 1, ms(t, 7)), Arrival::Discard);
    assert!(!s.handle_chunk_verified(A, 1, ms(t, 7)));
    s.handle_chunk_corrupt(A, 1, ms(t, 7));
    assert!(drain(&mut s).is_empty());
    // And it cannot come back under the same id.
    s.add_source(A, ms(t, 8));
    assert!(drain(&mut s).is_empty());
    assert!(s.source_stats(A).is_none());
}

#[test]
fn a_stalled_source_is_dropped_after_the_timeout_and_not_before() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source(A, t);
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(ms(t, 5000)));
    s.handle_timeout(ms(t, 4999));
    assert!(drain(&mut s).is_empty());
    // A chunk at 3 s restarts the clock from then.
    deliver(&mut s, A, 0, ms(t, 3000));
    drain(&mut s);
    assert_eq!(s.poll_timeout(), Some(ms(t, 8000)));
    s.handle_timeout(ms(t, 7999));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.progress().active_sources, 1);
    s.handle_timeout(ms(t, 8000));
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: A,
            reason: DropReason::Stalled
        }]
    );
    assert_eq!(s.poll_timeout(), None);
    // Its chunks are missing again and go to the next source, lowest first.
    s.add_source(B, ms(t, 8001));
    assert_eq!(requests_to(&drain(&mut s), B), [1, 2, 3, 4]);
}

#[test]
fn an_idle_source_never_stalls() {
    let t = Instant::now();
    let mut s = new_sched(1);
    s.add_source(A, t);
    drain(&mut s);
    deliver(&mut s, A, 0, ms(t, 1));
    assert!(s.is_complete());
    assert_eq!(s.poll_timeout(), None);
    s.handle_timeout(ms(t, 60_000));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.progress().active_sources, 1);
}

#[test]
fn unknown_sources_and_indices_are_ignored() {
    let t = Instant::now();
    let mut s = new_sched(4);
    s.add_source(A, t);
    drain(&mut s);
    let before = s.progress();
    let stranger = SourceId(99);
    assert_eq!(s.handle_chunk_arrived(stranger, 0, t), Arrival::Discard);
    assert!(!s.handle_chunk_verified(stranger, 0, t));
    s.handle_chunk_corrupt(stranger, 0, t);
    s.handle_source_error(stranger, t);
    s.remove_source(stranger, t);
    assert!(s.source_stats(stranger).is_none());
    // A known source, a chunk past the end, never through `arrived`.
    assert!(!s.handle_chunk_verified(A, 1000, t));
    s.handle_chunk_corrupt(A, u32::MAX, t);
    // A chunk that was requested but has not arrived cannot be verified.
    assert!(!s.handle_chunk_verified(A, 0, t));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.progress(), before);
}

#[test]
fn an_unrequested_chunk_is_a_protocol_violation() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source(A, t);
    s.add_source(B, t);
    drain(&mut s); // A: 0..4, B: 4..8
    // B sends chunk 0, which was asked of A.
    assert_eq!(s.handle_chunk_arrived(B, 0, t), Arrival::Discard);
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: B,
            reason: DropReason::Unrequested
        }]
    );
    // A sends a chunk past the end of the file.
    assert_eq!(s.handle_chunk_arrived(A, 10, t), Arrival::Discard);
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: A,
            reason: DropReason::Unrequested
        }]
    );
    assert_eq!(s.progress().active_sources, 0);
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn the_same_chunk_twice_is_a_protocol_violation() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source(A, t);
    drain(&mut s);
    assert_eq!(s.handle_chunk_arrived(A, 0, t), Arrival::Verify);
    assert_eq!(s.handle_chunk_arrived(A, 0, t), Arrival::Discard);
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: A,
            reason: DropReason::Unrequested
        }]
    );
    // The first copy's late verdict is ignored: the chunk is queued again.
    assert!(!s.handle_chunk_verified(A, 0, t));
    assert_eq!(s.progress().chunks_done, 0);
}

#[test]
fn removing_a_source_requeues_its_chunks_without_a_drop_action() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source(A, t);
    s.add_source(B, t);
    drain(&mut s); // A: 0..4, B: 4..8
    s.remove_source(A, ms(t, 1));
    assert!(drain(&mut s).is_empty());
    deliver(&mut s, B, 4, ms(t, 2));
    assert_eq!(requests_to(&drain(&mut s), B)[..4], [0, 1, 2, 3]);
    s.handle_source_error(B, ms(t, 3));
    assert!(drain(&mut s).is_empty());
    assert_eq!(s.progress().active_sources, 0);
    assert_eq!(s.progress().chunks_done, 1);
}

#[test]
fn a_drop_withdraws_the_requests_not_yet_polled() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source(A, t);
    // Requests to A are queued; the shell has not polled them yet when A
    // sends something unasked.
    assert_eq!(s.handle_chunk_arrived(A, 9, t), Arrival::Discard);
    let acts = drain(&mut s);
    assert_eq!(
        acts,
        [Action::DropSource {
            source: A,
            reason: DropReason::Unrequested
        }]
    );
}

#[test]
fn the_window_follows_the_best_latency_not_the_fixed_window() {
    // A source one millisecond away that could deliver a chunk every 0.1 ms
    // (655 MB/s): each request is answered 1 ms after it was sent, at most
    // one chunk per 0.1 ms.
    let t0 = Instant::now();
    let mut s = Scheduler::new(vec![LEN; 20_000], &[], SchedulerConfig::default());
    s.add_source(A, t0);
    let mut pending: std::collections::VecDeque<(u32, Instant)> = requests_to(&drain(&mut s), A)
        .into_iter()
        .map(|i| (i, t0))
        .collect();
    let mut now = t0;
    for _ in 0..3000 {
        now += Duration::from_micros(100);
        if let Some(&(index, sent)) = pending.front()
            && sent + Duration::from_millis(1) <= now
        {
            pending.pop_front();
            deliver(&mut s, A, index, now);
        }
        pending.extend(requests_to(&drain(&mut s), A).into_iter().map(|i| (i, now)));
    }
    let stats = s.source_stats(A).unwrap();
    let latency = stats.min_latency.expect("latency measured");
    assert!(latency >= Duration::from_millis(1), "{latency:?}");
    // Enough in flight to cover the round trip: the pipe is full...
    assert!(stats.target_depth >= 10, "{stats:?}");
    // ...but sized by 2 * latency + 0.5 ms, not by rate * 250 ms (~2500).
    assert!(stats.target_depth <= 40, "{stats:?}");
    let rate = stats.rate.expect("rate measured");
    assert!(rate > 500e6, "the source ran near its pace: {rate}");
}

fn bits(n: usize, ones: &[usize]) -> FixedBitSet {
    let mut b = FixedBitSet::with_capacity(n);
    for &i in ones {
        b.insert(i);
    }
    b
}

#[test]
fn a_partial_source_is_asked_only_for_what_it_holds_and_gets_more_as_it_says_have() {
    let t = Instant::now();
    let mut s = new_sched(10);
    s.add_source_holding(A, Some(bits(10, &[3, 7])), t);
    let acts = drain(&mut s);
    let mut asked = requests_to(&acts, A);
    asked.sort_unstable();
    assert_eq!(asked, [3, 7]);
    s.handle_have(A, 5, t);
    assert_eq!(requests_to(&drain(&mut s), A), [5]);
    // Nothing else: no endgame duplicates of its own requests, no guesses.
    s.handle_have(A, 5, t);
    assert!(drain(&mut s).is_empty());
}

#[test]
fn the_chunk_only_one_source_has_is_fetched_first_from_a_complete_one() {
    let t = Instant::now();
    let config = SchedulerConfig {
        max_inflight: 1,
        min_inflight: 1,
        initial_inflight: 1,
        ..rate_only_config()
    };
    let mut s = Scheduler::new(vec![LEN; 4], &[], config);
    // B and C (still downloading) hold 0, 1 and 2 between them; only the
    // seeder A has chunk 3, so that is what A is asked for first.
    s.add_source_holding(B, Some(bits(4, &[0, 1])), t);
    s.add_source_holding(C, Some(bits(4, &[1, 2])), t);
    let _ = drain(&mut s);
    s.add_source(A, t);
    assert_eq!(requests_to(&drain(&mut s), A), [3]);
}

#[test]
fn no_chunk_sends_the_chunk_elsewhere_and_repeated_broken_claims_drop_the_source() {
    let t = Instant::now();
    let mut s = new_sched(40);
    let all: Vec<usize> = (0..40).collect();
    s.add_source_holding(A, Some(bits(40, &all)), t);
    let asked = requests_to(&drain(&mut s), A);
    let first = asked[0];
    s.handle_no_chunk(A, first, t);
    let acts = drain(&mut s);
    assert!(
        !requests_to(&acts, A).contains(&first),
        "asked again for a chunk it refused: {acts:?}"
    );
    s.add_source(B, t);
    let to_b = requests_to(&drain(&mut s), B);
    assert!(
        to_b.contains(&first),
        "the refused chunk goes to B: {to_b:?}"
    );
    // A keeps refusing chunks it claimed: dropped, not banned (Lacking).
    let mut dropped = false;
    for _ in 0..40 {
        let Some(index) = (0..40).find(|&i| s.sources.get(&A).is_some_and(|src| src.holds(i)))
        else {
            break;
        };
        s.handle_no_chunk(A, index, t);
        dropped = drain(&mut s).iter().any(|a| {
            matches!(a, Action::DropSource { source, reason: DropReason::Lacking } if *source == A)
        });
        if dropped {
            break;
        }
    }
    assert!(dropped, "a source refusing every chunk it claimed was kept");
}

#[test]
fn a_complete_source_that_refuses_a_chunk_is_dropped() {
    let t = Instant::now();
    let mut s = new_sched(4);
    s.add_source(A, t);
    let first = requests_to(&drain(&mut s), A)[0];
    s.handle_no_chunk(A, first, t);
    assert!(drain(&mut s).contains(&Action::DropSource {
        source: A,
        reason: DropReason::Lacking
    }));
}
