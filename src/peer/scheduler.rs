//! TEMPORARY stand-in with the planned API; replaced by the real scheduler.
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub stall_timeout: Duration,
}
impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            stall_timeout: Duration::from_secs(5),
        }
    }
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Stalled,
    Corrupt,
    Unrequested,
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Request {
        source: SourceId,
        index: u32,
    },
    Cancel {
        source: SourceId,
        index: u32,
    },
    DropSource {
        source: SourceId,
        reason: DropReason,
    },
}
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    Verify,
    Discard,
}
pub struct Progress {
    pub chunks_done: u32,
    pub chunks_total: u32,
    pub bytes_done: u64,
}
pub struct Scheduler {
    lens: Vec<u32>,
    done: Vec<bool>,
    inflight: BTreeMap<u32, SourceId>,
    sources: BTreeMap<SourceId, Instant>,
    actions: VecDeque<Action>,
    config: SchedulerConfig,
}
impl Scheduler {
    pub fn new(lens: Vec<u32>, have: &[bool], config: SchedulerConfig) -> Scheduler {
        Scheduler {
            done: have.to_vec(),
            lens,
            inflight: BTreeMap::new(),
            sources: BTreeMap::new(),
            actions: VecDeque::new(),
            config,
        }
    }
    pub fn add_source(&mut self, s: SourceId, now: Instant) {
        self.sources.insert(s, now);
        self.fill();
    }
    pub fn remove_source(&mut self, s: SourceId, _now: Instant) {
        self.sources.remove(&s);
        self.inflight.retain(|_, v| *v != s);
        self.fill();
    }
    pub fn handle_source_error(&mut self, s: SourceId, now: Instant) {
        self.remove_source(s, now)
    }
    pub fn handle_chunk_arrived(&mut self, s: SourceId, i: u32, now: Instant) -> Arrival {
        if self.inflight.get(&i) == Some(&s) {
            self.sources.insert(s, now);
            Arrival::Verify
        } else {
            Arrival::Discard
        }
    }
    pub fn handle_chunk_verified(&mut self, _s: SourceId, i: u32, _now: Instant) {
        self.inflight.remove(&i);
        self.done[i as usize] = true;
        self.fill();
    }
    pub fn handle_chunk_corrupt(&mut self, s: SourceId, _i: u32, now: Instant) {
        self.actions.push_back(Action::DropSource {
            source: s,
            reason: DropReason::Corrupt,
        });
        self.remove_source(s, now);
    }
    pub fn handle_timeout(&mut self, now: Instant) {
        let stalled: Vec<SourceId> = self
            .sources
            .iter()
            .filter(|(s, t)| {
                self.inflight.values().any(|v| v == *s) && **t + self.config.stall_timeout <= now
            })
            .map(|(s, _)| *s)
            .collect();
        for s in stalled {
            self.actions.push_back(Action::DropSource {
                source: s,
                reason: DropReason::Stalled,
            });
            self.remove_source(s, now);
        }
    }
    fn fill(&mut self) {
        for &s in self.sources.keys() {
            let mut n = self.inflight.values().filter(|v| **v == s).count();
            for i in 0..self.lens.len() as u32 {
                if n >= 16 {
                    break;
                }
                if !self.done[i as usize] && !self.inflight.contains_key(&i) {
                    self.inflight.insert(i, s);
                    self.actions.push_back(Action::Request {
                        source: s,
                        index: i,
                    });
                    n += 1;
                }
            }
        }
    }
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.sources
            .values()
            .min()
            .map(|t| *t + self.config.stall_timeout)
    }
    pub fn is_complete(&self) -> bool {
        self.done.iter().all(|d| *d)
    }
    pub fn progress(&self) -> Progress {
        Progress {
            chunks_done: self.done.iter().filter(|d| **d).count() as u32,
            chunks_total: self.lens.len() as u32,
            bytes_done: self
                .lens
                .iter()
                .zip(&self.done)
                .filter(|(_, d)| **d)
                .map(|(l, _)| *l as u64)
                .sum(),
        }
    }
}
