//! Metrics both binaries expose with `--metrics ADDR`: a few counter,
//! gauge and histogram types cheap enough for the hot path (a field
//! increment, no allocation), the Prometheus text encoder a scrape writes
//! them with, and the HTTP endpoint that serves the page on the process's
//! own event loop ([`http`]). docs/METRICS.md lists every metric.
//!
//! Nothing here reads the clock or a socket except [`http::MetricsServer`],
//! the thin mio part; what a request gets back is decided by the pure
//! [`http::HttpConn`].

pub mod http;

use std::cell::Cell;
use std::fmt::{Display, Write};

use crate::wire;

/// Frame bytes in and out by kind byte, shared by every connection of a
/// process (`Conn::set_frame_stats`). Counted where the connection driver
/// already knows each frame's kind: a `Cell` add per frame, no allocation.
/// On a sealed connection these are the frames inside the seal.
pub struct FrameStats {
    bytes_in: [Cell<u64>; 256],
    bytes_out: [Cell<u64>; 256],
}

impl Default for FrameStats {
    fn default() -> Self {
        FrameStats {
            bytes_in: std::array::from_fn(|_| Cell::new(0)),
            bytes_out: std::array::from_fn(|_| Cell::new(0)),
        }
    }
}

impl FrameStats {
    pub fn new() -> FrameStats {
        FrameStats::default()
    }

    /// A frame of `kind`, `len` bytes with its header, was decoded.
    pub fn add_in(&self, kind: u8, len: usize) {
        let c = &self.bytes_in[kind as usize];
        c.set(c.get().wrapping_add(len as u64));
    }

    /// A frame of `kind`, `len` bytes with its header, was queued.
    pub fn add_out(&self, kind: u8, len: usize) {
        let c = &self.bytes_out[kind as usize];
        c.set(c.get().wrapping_add(len as u64));
    }

    pub fn bytes_in(&self, kind: u8) -> u64 {
        self.bytes_in[kind as usize].get()
    }

    pub fn bytes_out(&self, kind: u8) -> u64 {
        self.bytes_out[kind as usize].get()
    }

    /// Writes `<prefix>_frame_bytes_in_total` and `..._out_total` with a
    /// `kind` label for every kind that moved a byte.
    pub fn encode(&self, prefix: &str, out: &mut Encoder) {
        for (dir, cells) in [("in", &self.bytes_in), ("out", &self.bytes_out)] {
            let name = format!("{prefix}_frame_bytes_{dir}_total");
            out.header(
                &name,
                "counter",
                &format!("frame bytes {dir} (header included), by frame kind"),
            );
            for (kind, c) in cells.iter().enumerate() {
                // Only decoded or encoded frames are counted: every kind
                // here has a name, so no two samples share a label.
                if c.get() > 0 {
                    out.sample_labeled(&name, "kind", wire::kind_name(kind as u8), c.get());
                }
            }
        }
    }
}

/// Upper bounds (seconds) of the loop-turn histogram's buckets.
pub const TURN_BUCKETS: [f64; 10] = [0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A histogram with fixed bucket bounds: `observe` is a short scan and
/// two adds.
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        let at = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.counts[at] += 1;
        self.sum += value;
        self.count += 1;
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn encode(&self, name: &str, help: &str, out: &mut Encoder) {
        out.header(name, "histogram", help);
        let mut cumulative = 0;
        for (i, n) in self.counts.iter().enumerate() {
            cumulative += n;
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".to_string(),
            };
            out.sample_labeled(&format!("{name}_bucket"), "le", &le, cumulative);
        }
        out.sample(&format!("{name}_sum"), self.sum);
        out.sample(&format!("{name}_count"), self.count);
    }
}

/// A counter with one label whose values come from the network (a source
/// address): at most `limit` distinct values get their own series, the
/// rest are summed under `other`, so a hostile swarm cannot grow the page
/// or our memory. Lookup is a scan of at most `limit` keys, no allocation.
#[derive(Debug, Clone)]
pub struct BoundedLabels<K> {
    limit: usize,
    series: Vec<(K, u64)>,
    other: u64,
}

/// Label values [`BoundedLabels`] keeps by default.
pub const MAX_LABEL_VALUES: usize = 64;

impl<K: PartialEq + Display> BoundedLabels<K> {
    pub fn new(limit: usize) -> BoundedLabels<K> {
        BoundedLabels {
            limit,
            series: Vec::new(),
            other: 0,
        }
    }

    pub fn add(&mut self, key: K, n: u64) {
        if let Some((_, v)) = self.series.iter_mut().find(|(k, _)| *k == key) {
            *v += n;
        } else if self.series.len() < self.limit {
            self.series.push((key, n));
        } else {
            self.other += n;
        }
    }

    pub fn total(&self) -> u64 {
        self.other + self.series.iter().map(|(_, v)| v).sum::<u64>()
    }

    pub fn encode(&self, name: &str, label: &str, help: &str, out: &mut Encoder) {
        out.header(name, "counter", help);
        for (k, v) in &self.series {
            out.sample_labeled(name, label, &k.to_string(), *v);
        }
        if self.other > 0 {
            out.sample_labeled(name, label, "other", self.other);
        }
    }
}

/// The text exposition format (version 0.0.4): `# HELP`, `# TYPE`, then
/// samples, one a line.
#[derive(Debug, Default)]
pub struct Encoder {
    text: String,
}

/// The Content-Type of what [`Encoder`] writes.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

impl Encoder {
    pub fn new() -> Encoder {
        Encoder::default()
    }

    pub fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    pub fn sample(&mut self, name: &str, value: impl Display) {
        let _ = writeln!(self.text, "{name} {value}");
    }

    pub fn sample_labeled(&mut self, name: &str, label: &str, value: &str, v: impl Display) {
        let _ = write!(self.text, "{name}{{{label}=\"");
        escape_label(value, &mut self.text);
        let _ = writeln!(self.text, "\"}} {v}");
    }

    /// A counter with no labels: header and its one sample.
    pub fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.header(name, "counter", help);
        self.sample(name, value);
    }

    /// A gauge with no labels: header and its one sample.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl Display) {
        self.header(name, "gauge", help);
        self.sample(name, value);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// Label values escape backslash, double quote and newline (the format's
/// rules); anything else is written as is.
fn escape_label(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// This process's resident set size in bytes (`VmRSS` in
/// `/proc/self/status`, the kernel's own figure from `statm` in KiB), or
/// `None` where that cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Writes `<prefix>_resident_bytes` (read now).
pub fn encode_rss(prefix: &str, out: &mut Encoder) {
    if let Some(rss) = resident_bytes() {
        out.gauge(
            &format!("{prefix}_resident_bytes"),
            "resident set size, read from /proc/self/status on scrape",
            rss,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_in_inf() {
        let mut h = Histogram::new(&TURN_BUCKETS);
        h.observe(0.00005);
        h.observe(0.003);
        h.observe(100.0);
        let mut e = Encoder::new();
        h.encode("t", "turns", &mut e);
        let text = e.finish();
        assert!(text.contains("t_bucket{le=\"0.0001\"} 1\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"0.005\"} 2\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"5\"} 2\n"), "{text}");
        assert!(text.contains("t_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("t_count 3\n"), "{text}");
        assert!(text.contains("# TYPE t histogram\n"), "{text}");
    }

    #[test]
    fn bounded_labels_sum_the_overflow_in_other() {
        let mut c = BoundedLabels::new(2);
        c.add("a", 1);
        c.add("b", 2);
        c.add("c", 4);
        c.add("d", 8);
        c.add("a", 16);
        assert_eq!(c.total(), 31);
        let mut e = Encoder::new();
        c.encode("x", "source", "h", &mut e);
        let text = e.finish();
        assert!(text.contains("x{source=\"a\"} 17\n"), "{text}");
        assert!(text.contains("x{source=\"b\"} 2\n"), "{text}");
        assert!(text.contains("x{source=\"other\"} 12\n"), "{text}");
        assert!(!text.contains("\"c\""), "{text}");
    }

    #[test]
    fn label_values_are_escaped() {
        let mut e = Encoder::new();
        e.sample_labeled("x", "l", "a\"b\\c\nd", 1);
        assert_eq!(e.finish(), "x{l=\"a\\\"b\\\\c\\nd\"} 1\n");
    }

    #[test]
    fn frame_stats_count_by_kind() {
        let s = FrameStats::new();
        s.add_in(wire::kind::PING, 13);
        s.add_in(wire::kind::PING, 13);
        s.add_out(wire::kind::PEER_LIST, 100);
        let mut e = Encoder::new();
        s.encode("m", &mut e);
        let text = e.finish();
        assert!(
            text.contains("m_frame_bytes_in_total{kind=\"ping\"} 26\n"),
            "{text}"
        );
        assert!(
            text.contains("m_frame_bytes_out_total{kind=\"peer-list\"} 100\n"),
            "{text}"
        );
        assert!(!text.contains("pong"), "{text}");
    }

    #[test]
    fn rss_is_read() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
    }
}
