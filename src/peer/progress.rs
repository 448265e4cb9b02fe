//! Download progress for people: a bar with rate, ETA and peer count on a
//! terminal, periodic log lines otherwise (so logs and CI output stay readable).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::output::{human_rate, human_size};
use crate::wire::FileName;

/// Seconds between log lines when there is no terminal.
const LOG_EVERY: Duration = Duration::from_secs(2);

pub struct ProgressReport {
    name: String,
    total: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    start_bytes: u64,
    next_log: Instant,
}

impl ProgressReport {
    pub fn new(name: &FileName, total: u64, done: u64, bar: bool, now: Instant) -> ProgressReport {
        let bar = bar.then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(done);
            bar
        });
        ProgressReport {
            name: name.to_string(),
            total,
            bar,
            started: now,
            start_bytes: done,
            next_log: now + LOG_EVERY,
        }
    }

    pub fn update(&mut self, done: u64, peers: usize, now: Instant) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{} ({peers} peers)", self.name));
            bar.set_position(done);
            return;
        }
        if now < self.next_log {
            return;
        }
        self.next_log = now + LOG_EVERY;
        let secs = now.duration_since(self.started).as_secs_f64().max(1e-3);
        let rate = (done - self.start_bytes.min(done)) as f64 / secs;
        let pct = if self.total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / self.total as f64
        };
        log::info!(
            "{}: {pct:.0}% ({} of {}), {}, {peers} peers",
            self.name,
            human_size(done),
            human_size(self.total),
            human_rate(rate)
        );
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
