//! A swarm in virtual time: one seeder and many downloaders, each with its
//! own [`Scheduler`], every peer uploading at the same capped rate, each
//! downloader serving the others the chunks it has verified (announced
//! with a `Have` after one latency). Peers join late and leave early. The
//! invariants of every scheduler are checked as it runs; a run must
//! finish every downloader that stays, and the swarm must beat the seeder
//! alone.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::*;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000 * MS;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// Downloader `d` starts (peer 0, the seeder, is there from the start).
    Join(usize),
    /// Downloader `d` leaves, done or not.
    Leave(usize),
    /// `from` asks peer `to` for chunk `index`.
    Request { from: usize, to: usize, index: u32 },
    /// `to` cancels its request for `index` at `from`.
    Cancel { from: usize, to: usize, index: u32 },
    /// Peer `p` finished uploading a chunk and may start the next.
    Free(usize),
    /// Chunk `index` from `from` reaches `to`.
    Chunk { from: usize, to: usize, index: u32 },
    /// `to` learns that `from` now holds `index`.
    Have { from: usize, to: usize, index: u32 },
}

struct Peer {
    /// `None` for the seeder, and for a downloader not yet joined.
    sched: Option<Scheduler>,
    joined: bool,
    left: bool,
    holds: FixedBitSet,
    /// Requests waiting for the uplink: (requester, chunk).
    queue: VecDeque<(usize, u32)>,
    busy: bool,
    uploaded: u64,
    done_at: Option<u64>,
    /// Chunks it has uploaded to anyone.
    sent: FixedBitSet,
    /// The requester it served last (the turns go on from there).
    last_to: usize,
}

struct Swarm {
    chunks: u32,
    chunk_len: u32,
    /// Bytes per second each peer uploads.
    rate: f64,
    latency: u64,
    peers: Vec<Peer>,
    events: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    now: u64,
    base: Instant,
}

impl Swarm {
    fn new(downloaders: usize, chunks: u32, rate: f64, seed: u64) -> Swarm {
        let full: FixedBitSet = {
            let mut b = FixedBitSet::with_capacity(chunks as usize);
            b.insert_range(..);
            b
        };
        let mut rng = fastrand::Rng::with_seed(seed);
        let peers = (0..=downloaders)
            .map(|p| Peer {
                sched: (p > 0).then(|| {
                    let config = SchedulerConfig {
                        start_chunk: rng.u32(..),
                        ..SchedulerConfig::default()
                    };
                    Scheduler::new(vec![32 << 10; chunks as usize], &[], config)
                }),
                joined: p == 0,
                left: false,
                holds: if p == 0 {
                    full.clone()
                } else {
                    FixedBitSet::with_capacity(chunks as usize)
                },
                queue: VecDeque::new(),
                busy: false,
                uploaded: 0,
                done_at: None,
                sent: FixedBitSet::with_capacity(chunks as usize),
                last_to: 0,
            })
            .collect();
        Swarm {
            chunks,
            chunk_len: 32 << 10,
            rate,
            latency: 2 * MS,
            peers,
            events: BinaryHeap::new(),
            seq: 0,
            now: 0,
            base: Instant::now(),
        }
    }

    fn at(&self, t: u64) -> Instant {
        self.base + Duration::from_nanos(t)
    }

    fn push(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.events.push(Reverse((t, self.seq, e)));
    }

    fn live(&self, p: usize) -> bool {
        self.peers[p].joined && !self.peers[p].left
    }

    /// Runs until no event is left or `limit`; returns the virtual time.
    fn run(&mut self, limit: u64) -> u64 {
        while let Some(Reverse((t, _, e))) = self.events.pop() {
            assert!(t <= limit, "the swarm did not settle within {limit} ns");
            self.now = t;
            self.step(e);
            self.fire_timers();
            // In full every 64 events: one check is O(chunks) per scheduler.
            if self.seq.is_multiple_of(64) {
                for p in &self.peers {
                    if let Some(s) = &p.sched {
                        s.check_invariants().unwrap();
                    }
                }
            }
        }
        self.now
    }

    fn fire_timers(&mut self) {
        let now = self.at(self.now);
        for d in 1..self.peers.len() {
            if !self.live(d) {
                continue;
            }
            let due = self.peers[d]
                .sched
                .as_ref()
                .and_then(|s| s.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                if let Some(s) = self.peers[d].sched.as_mut() {
                    s.handle_timeout(now);
                }
                self.drain(d);
            }
        }
    }

    fn step(&mut self, e: Event) {
        let now = self.at(self.now);
        match e {
            Event::Join(d) => {
                self.peers[d].joined = true;
                // It connects to every live peer, which connect back.
                for p in 0..self.peers.len() {
                    if p == d || !self.live(p) {
                        continue;
                    }
                    let has = (p > 0).then(|| self.peers[p].holds.clone());
                    if let Some(s) = self.peers[d].sched.as_mut() {
                        s.add_source_holding(SourceId(p as u32), has, now);
                    }
                    let empty = FixedBitSet::with_capacity(self.chunks as usize);
                    if let Some(s) = self.peers[p].sched.as_mut() {
                        s.add_source_holding(SourceId(d as u32), Some(empty), now);
                    }
                    self.drain(p);
                }
                self.drain(d);
            }
            Event::Leave(d) => {
                self.peers[d].left = true;
                self.peers[d].queue.clear();
                for p in 1..self.peers.len() {
                    if let Some(s) = self.peers[p].sched.as_mut() {
                        s.remove_source(SourceId(d as u32), now);
                    }
                    self.drain(p);
                }
            }
            Event::Request { from, to, index } => {
                if self.live(to) {
                    assert!(
                        self.peers[to].holds.contains(index as usize),
                        "peer {from} asked {to} for chunk {index}, which it does not hold"
                    );
                    self.peers[to].queue.push_back((from, index));
                    self.serve(to);
                }
            }
            Event::Cancel { from, to, index } => {
                self.peers[from]
                    .queue
                    .retain(|&(r, i)| !(r == to && i == index));
            }
            Event::Free(p) => {
                self.peers[p].busy = false;
                self.serve(p);
            }
            Event::Chunk { from, to, index } => {
                if !self.live(to) {
                    return;
                }
                let Some(s) = self.peers[to].sched.as_mut() else {
                    return;
                };
                let source = SourceId(from as u32);
                let verified = s.handle_chunk_arrived(source, index, now) == Arrival::Verify
                    && s.handle_chunk_verified(source, index, now);
                let complete = s.is_complete();
                if verified {
                    self.peers[to].holds.insert(index as usize);
                    if complete {
                        self.peers[to].done_at = Some(self.now);
                    }
                    for p in 1..self.peers.len() {
                        if p != to && self.live(p) {
                            let t = self.now + self.latency;
                            self.push(
                                t,
                                Event::Have {
                                    from: to,
                                    to: p,
                                    index,
                                },
                            );
                        }
                    }
                }
                self.drain(to);
            }
            Event::Have { from, to, index } => {
                if self.live(to)
                    && let Some(s) = self.peers[to].sched.as_mut()
                {
                    s.handle_have(SourceId(from as u32), index, now);
                    self.drain(to);
                }
            }
        }
    }

    /// Starts the next upload of peer `p` if its uplink is idle.
    fn serve(&mut self, p: usize) {
        if self.peers[p].busy || !self.live(p) {
            return;
        }
        // As the serving shell does: a chunk this peer has sent nobody yet
        // first, whoever asked; else the requesters in turn, each one's
        // oldest request.
        let pos = {
            let (q, sent) = (&self.peers[p].queue, &self.peers[p].sent);
            let n = self.peers.len();
            let last = self.peers[p].last_to;
            let next = (1..=n)
                .map(|k| (last + k) % n)
                .find(|r| q.iter().any(|(to, _)| to == r));
            q.iter()
                .position(|(_, i)| !sent.contains(*i as usize))
                .or_else(|| next.and_then(|r| q.iter().position(|(to, _)| *to == r)))
        };
        let Some((to, index)) = pos.and_then(|k| self.peers[p].queue.remove(k)) else {
            return;
        };
        self.peers[p].sent.insert(index as usize);
        self.peers[p].last_to = to;
        self.peers[p].busy = true;
        self.peers[p].uploaded += 1;
        let took = (f64::from(self.chunk_len) / self.rate * 1e9) as u64;
        self.push(self.now + took, Event::Free(p));
        let t = self.now + took + self.latency;
        self.push(t, Event::Chunk { from: p, to, index });
    }

    /// Carries out downloader `d`'s scheduler actions.
    fn drain(&mut self, d: usize) {
        let t = self.now + self.latency;
        while let Some(a) = self.peers[d].sched.as_mut().and_then(|s| s.poll_action()) {
            match a {
                Action::Request { source, index } => {
                    let to = source.0 as usize;
                    self.push(t, Event::Request { from: d, to, index });
                }
                Action::Cancel { source, index } => {
                    let from = source.0 as usize;
                    self.push(t, Event::Cancel { from, to: d, index });
                }
                Action::DropSource { source, reason } => {
                    panic!("downloader {d} dropped peer {source}: {reason}")
                }
            }
        }
    }
}

/// max(F/u_s, N*F/(u_s + N*u)) with every peer uploading at `rate`.
fn kumar_ross_bound(downloaders: usize, file: f64, rate: f64) -> f64 {
    let n = downloaders as f64;
    (file / rate).max(n * file / (rate + n * rate))
}

#[test]
fn a_swarm_of_equal_peers_finishes_near_the_bound_and_trades_chunks() {
    for seed in 0..20 {
        let (n, chunks, rate) = (16, 256, 8.0 * 1024.0 * 1024.0);
        let mut swarm = Swarm::new(n, chunks, rate, seed);
        for d in 1..=n {
            swarm.push(0, Event::Join(d));
        }
        swarm.run(600 * SEC);
        let file = f64::from(chunks) * f64::from(swarm.chunk_len);
        let bound = kumar_ross_bound(n, file, rate);
        let last = (1..=n)
            .map(|d| swarm.peers[d].done_at.expect("every downloader finishes"))
            .max()
            .unwrap_or(0) as f64
            / 1e9;
        let uploads: Vec<u64> = swarm.peers.iter().map(|p| p.uploaded).collect();
        eprintln!("seed {seed}: last done {last:.2}s, bound {bound:.2}s, uploads {uploads:?}");
        // Measured 1.2-1.35 x. Without serving fresh chunks first it was
        // 1.8-2.3 x: the seeder sent about two copies before every chunk had
        // reached someone once (downloaders cannot see each other's requests).
        assert!(
            last <= 1.5 * bound,
            "seed {seed}: last done at {last:.2}s, bound {bound:.2}s"
        );
        // The seeder served a little over one copy, not sixteen.
        let seeder = swarm.peers[0].uploaded;
        assert!(
            seeder < 2 * u64::from(chunks),
            "seed {seed}: the seeder uploaded {seeder} chunks of {chunks}"
        );
    }
}

#[test]
fn peers_joining_late_and_leaving_early_do_not_stop_the_rest() {
    for seed in 0..20 {
        let mut rng = fastrand::Rng::with_seed(seed);
        let (n, chunks, rate) = (8, 128, 4.0 * 1024.0 * 1024.0);
        let mut swarm = Swarm::new(n, chunks, rate, seed);
        let mut leavers = Vec::new();
        for d in 1..=n {
            swarm.push(rng.u64(0..SEC), Event::Join(d));
            if d % 3 == 0 {
                swarm.push(rng.u64(SEC..3 * SEC), Event::Leave(d));
                leavers.push(d);
            }
        }
        swarm.run(600 * SEC);
        for d in (1..=n).filter(|d| !leavers.contains(d)) {
            assert!(
                swarm.peers[d].done_at.is_some(),
                "seed {seed}: downloader {d} never finished"
            );
            assert_eq!(
                swarm.peers[d].holds.count_ones(..),
                chunks as usize,
                "seed {seed}"
            );
        }
    }
}
