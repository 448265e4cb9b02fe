//! A token bucket for `--upload-limit`, pure: the event loop asks whether a
//! chunk may go now, and if not, when to wake up and try again. No timer
//! thread: the wake-up time becomes one more poll deadline.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `rate` bytes per second with room for `burst` bytes at once (at least
    /// one chunk, or a chunk could never be sent).
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: rate.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` tokens if that many are there.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        let n = (n as f64).min(self.burst);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// When `n` tokens will be there.
    pub fn ready_at(&self, n: u64, now: Instant) -> Instant {
        let n = (n as f64).min(self.burst);
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        let have = (self.tokens + elapsed * self.rate).min(self.burst);
        if have >= n {
            now
        } else {
            now + Duration::from_secs_f64((n - have) / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sustained_rate_matches_the_limit() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1_000_000, 100_000, start);
        let mut now = start;
        let mut sent = 0u64;
        // Send 10 kB pieces as fast as allowed for 10 virtual seconds.
        while now < start + Duration::from_secs(10) {
            if bucket.try_take(10_000, now) {
                sent += 10_000;
            } else {
                now = bucket.ready_at(10_000, now);
            }
        }
        // 10 s at 1 MB/s plus the initial burst.
        assert!((10_000_000..=10_110_000).contains(&sent), "sent {sent}");
    }

    #[test]
    fn waits_exactly_as_long_as_needed() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1000, 1000, start);
        assert!(bucket.try_take(1000, start));
        assert!(!bucket.try_take(500, start));
        let at = bucket.ready_at(500, start);
        assert_eq!(at, start + Duration::from_millis(500));
        assert!(!bucket.try_take(500, at - Duration::from_millis(10)));
        assert!(bucket.try_take(500, at));
    }

    #[test]
    fn requests_larger_than_the_burst_still_pass() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, 100, start);
        assert!(bucket.try_take(1_000_000, start));
        assert!(!bucket.try_take(1, start));
    }
}
