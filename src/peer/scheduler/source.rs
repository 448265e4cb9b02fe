//! One source's bookkeeping: what it has outstanding, what it was told to
//! forget, and how fast it delivers.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fixedbitset::FixedBitSet;

/// Weight of a new sample in the per-source rate average.
const RATE_ALPHA: f64 = 0.25;

/// Smallest seconds-per-byte the estimate may hold, so a burst of chunks read
/// in one go (interval zero) cannot make the rate infinite.
const MIN_SECS_PER_BYTE: f64 = 1e-12;

/// One `GetChunk` sent to a source and not yet settled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Request {
    pub index: u32,
    pub sent: Instant,
    /// Set when the bytes came in; the chunk then waits for the shell's hash
    /// check, and the sample feeds the rate only if the hash is good.
    pub arrived: Option<Sample>,
}

/// How long one chunk took to come in from this source.
#[derive(Debug, Clone, Copy)]
pub(super) struct Sample {
    /// From the later of the previous arrival and this request's send time:
    /// the inter-arrival time while the pipeline is full.
    pub interval: Duration,
    /// The request left only after the previous chunk had come in, so the
    /// interval holds a round trip and idle time: it bounds the rate from
    /// below and may raise the estimate but never lower it.
    pub starved: bool,
}

/// A connected source as the scheduler sees it.
#[derive(Debug)]
pub(super) struct Source {
    /// Chunks requested from this source and not yet settled, oldest
    /// request first (at most `max_inflight`, so a scan is cheap).
    inflight: Vec<Request>,
    /// Chunks cancelled here after another source delivered them: if they
    /// still come, they are discarded without blame.
    pub cancelled: BTreeSet<u32>,
    pub last_arrival: Option<Instant>,
    /// EWMA of seconds per byte (averaging time, not rate, keeps bursts from
    /// inflating it); `None` until the first verified chunk.
    secs_per_byte: Option<f64>,
    /// Shortest time from a request to its chunk seen so far: about a round
    /// trip plus one chunk's service time, free of queueing (which only
    /// lengthens a sample).
    pub min_latency: Option<Duration>,
    /// Bytes of chunks that arrived at the same instant as the previous one
    /// (the shell timestamps a whole batch read in one go alike); they are
    /// counted into the next sample with a real interval.
    batched_bytes: u64,
    pub chunks_received: u64,
    pub bytes_received: u64,
    /// The chunks it holds, if it is still downloading the file itself
    /// (`None`: a complete source, which holds every chunk).
    pub has: Option<FixedBitSet>,
    /// Bits set in `has`.
    pub has_count: usize,
    /// Missing chunks it holds: what it could be asked for now.
    pub useful: usize,
    /// Chunks it claimed to hold, then answered `NoChunk` for.
    pub broken_claims: u32,
}

impl Source {
    pub fn new(has: Option<FixedBitSet>) -> Source {
        Source {
            has_count: has.as_ref().map_or(0, |h| h.count_ones(..)),
            has,
            useful: 0,
            broken_claims: 0,
            inflight: Vec::new(),
            cancelled: BTreeSet::new(),
            last_arrival: None,
            secs_per_byte: None,
            min_latency: None,
            batched_bytes: 0,
            chunks_received: 0,
            bytes_received: 0,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    pub fn request(&self, index: u32) -> Option<&Request> {
        self.inflight.iter().find(|r| r.index == index)
    }

    pub fn holds(&self, index: u32) -> bool {
        self.request(index).is_some()
    }

    /// Whether it has chunk `index` to give (not whether it was asked).
    pub fn has_chunk(&self, index: u32) -> bool {
        self.has.as_ref().is_none_or(|h| h.contains(index as usize))
    }

    /// Every chunk in flight here, oldest request first.
    pub fn requests(&self) -> impl Iterator<Item = &Request> {
        self.inflight.iter()
    }

    /// Requests sent and not yet answered, oldest first.
    pub fn outstanding(&self) -> impl Iterator<Item = &Request> {
        self.inflight.iter().filter(|r| r.arrived.is_none())
    }

    pub fn send(&mut self, index: u32, now: Instant) {
        let arrived = None;
        self.inflight.push(Request {
            index,
            sent: now,
            arrived,
        });
    }

    /// Settles chunk `index` here (verified, cancelled).
    pub fn take(&mut self, index: u32) -> Option<Request> {
        let pos = self.inflight.iter().position(|r| r.index == index)?;
        Some(self.inflight.remove(pos))
    }

    /// The later of the last arrival and the oldest unanswered request: the
    /// moment from which this source owes us a chunk. `None` if it owes none.
    pub fn progress_base(&self) -> Option<Instant> {
        let oldest = self.outstanding().next()?.sent;
        Some(self.last_arrival.map_or(oldest, |a| a.max(oldest)))
    }

    pub fn stall_deadline(&self, timeout: Duration) -> Option<Instant> {
        self.progress_base().map(|b| b + timeout)
    }

    /// Bytes per second, once a chunk has been verified.
    pub fn rate(&self) -> Option<f64> {
        self.secs_per_byte.map(|spb| 1.0 / spb)
    }

    /// Seconds this source is expected to need per chunk: its measured pace,
    /// or longer if it has already owed a chunk for longer than that.
    /// Infinite while its rate is unknown.
    pub fn chunk_time(&self, avg_len: f64, now: Instant) -> f64 {
        let Some(spb) = self.secs_per_byte else {
            return f64::INFINITY;
        };
        let behind = self
            .progress_base()
            .map_or(0.0, |b| now.saturating_duration_since(b).as_secs_f64());
        (spb * avg_len).max(behind)
    }

    /// Marks chunk `index` as arrived at `now` and measures its interval.
    pub fn record_arrival(&mut self, index: u32, now: Instant) {
        let last = self.last_arrival;
        if let Some(req) = self.inflight.iter_mut().find(|r| r.index == index) {
            let latency = now.saturating_duration_since(req.sent);
            self.min_latency = Some(self.min_latency.map_or(latency, |m| m.min(latency)));
            let start = last.map_or(req.sent, |l| l.max(req.sent));
            req.arrived = Some(Sample {
                interval: now.saturating_duration_since(start),
                starved: last.is_none_or(|l| req.sent >= l),
            });
        }
        self.note_arrival(now);
    }

    /// Any chunk coming in shows the source is alive.
    pub fn note_arrival(&mut self, now: Instant) {
        self.last_arrival = Some(self.last_arrival.map_or(now, |l| l.max(now)));
    }

    /// Feeds one verified chunk of `len` bytes into the rate estimate.
    pub fn apply_sample(&mut self, sample: Sample, len: u32) {
        self.chunks_received += 1;
        self.bytes_received += u64::from(len);
        if len == 0 {
            return;
        }
        if sample.interval.is_zero() {
            self.batched_bytes += u64::from(len);
            return;
        }
        let bytes = u64::from(len) + std::mem::take(&mut self.batched_bytes);
        let spb = (sample.interval.as_secs_f64() / bytes as f64).max(MIN_SECS_PER_BYTE);
        self.secs_per_byte = Some(match self.secs_per_byte {
            None => spb,
            // A starved sample can only say "at least this fast".
            Some(old) if sample.starved && spb >= old => old,
            Some(old) => old + RATE_ALPHA * (spb - old),
        });
    }
}
