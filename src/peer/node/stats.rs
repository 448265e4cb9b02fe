//! What `peer --metrics` reports: counted by the shell where it already
//! handles each event (a chunk stored, a chunk queued for a client, a
//! download ended). Every metric is in docs/METRICS.md.

use std::net::SocketAddr;

use crate::metrics::{self, BoundedLabels, Encoder, MAX_LABEL_VALUES};

/// Counters of one peer process.
pub struct PeerStats {
    pub downloads_done: u64,
    pub downloads_failed: u64,
    /// Chunk payload bytes queued for the peers we serve.
    pub bytes_served: u64,
    /// Verified chunk payload bytes written, by the source they came from.
    pub fetched: BoundedLabels<SocketAddr>,
    /// Corrupt chunks of downloads that have ended (running ones are
    /// added on scrape).
    pub hash_failures_ended: u64,
}

impl Default for PeerStats {
    fn default() -> Self {
        PeerStats {
            downloads_done: 0,
            downloads_failed: 0,
            bytes_served: 0,
            fetched: BoundedLabels::new(MAX_LABEL_VALUES),
            hash_failures_ended: 0,
        }
    }
}

impl PeerStats {
    /// The page, given the running downloads and their corrupt chunks so far.
    pub fn render(&self, active: usize, hash_failures_running: u64) -> String {
        let mut out = Encoder::new();
        out.gauge(
            "shoal_peer_downloads_active",
            "downloads running now",
            active,
        );
        out.counter(
            "shoal_peer_downloads_done_total",
            "downloads finished and verified",
            self.downloads_done,
        );
        out.counter(
            "shoal_peer_downloads_failed_total",
            "downloads that ended in failure",
            self.downloads_failed,
        );
        out.counter(
            "shoal_peer_served_bytes_total",
            "chunk payload bytes sent to peers we serve",
            self.bytes_served,
        );
        self.fetched.encode(
            "shoal_peer_fetched_bytes_total",
            "source",
            "verified chunk payload bytes stored, by source address (at most 64, the rest as other)",
            &mut out,
        );
        out.counter(
            "shoal_peer_hash_failures_total",
            "chunks whose hash did not match the manifest (the source is dropped)",
            self.hash_failures_ended + hash_failures_running,
        );
        metrics::encode_rss("shoal_peer", &mut out);
        out.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_sums_ended_and_running_hash_failures() {
        let mut s = PeerStats {
            downloads_done: 2,
            hash_failures_ended: 1,
            ..PeerStats::default()
        };
        s.fetched.add("127.0.0.1:9".parse().unwrap(), 100);
        let text = s.render(3, 4);
        assert!(text.contains("shoal_peer_downloads_active 3\n"), "{text}");
        assert!(
            text.contains("shoal_peer_downloads_done_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_peer_hash_failures_total 5\n"),
            "{text}"
        );
        assert!(
            text.contains("shoal_peer_fetched_bytes_total{source=\"127.0.0.1:9\"} 100\n"),
            "{text}"
        );
    }
}
