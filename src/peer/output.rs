//! How the peer prints what it knows: for people (a count line, then one item
//! a line, sizes and rates in human units), and for scripts (`--json`: one
//! JSON document, field names as documented in the README).
//!
//! Names come from the network and may hold any Unicode, so the human forms
//! escape control characters (a name must not be able to drive the terminal)
//! and the JSON forms escape what JSON requires.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use crate::store::{PartialInfo, SharedFolder};
use crate::wire::{Hash, NetworkFile, PeerEntry, PeerId};

pub fn peer_entries(peers: &[PeerEntry], me: Option<PeerId>) -> String {
    if peers.iter().any(|p| p.key.is_known()) {
        // A sealed network: each peer with the key it proved.
        let mut sorted: Vec<&PeerEntry> = peers.iter().collect();
        sorted.sort_by_key(|p| p.id);
        let mut out = format!("{} live peers\n", peers.len());
        for p in sorted {
            let mark = if Some(p.id) == me { "  (me)" } else { "" };
            let _ = writeln!(
                out,
                "  {:<6} {:<21} {}{mark}",
                p.id.to_string(),
                p.addr.to_string(),
                p.key
            );
        }
        return out;
    }
    let map: BTreeMap<PeerId, SocketAddr> = peers.iter().map(|p| (p.id, p.addr)).collect();
    peer_map(&map, me)
}

/// One page of a big network's peers: "showing 256 of 19,900 peers",
/// then the page as [`peer_entries`] lists it.
pub fn peer_page(peers: &[PeerEntry], total: u32, me: Option<PeerId>) -> String {
    let list = peer_entries(peers, me);
    let body = list.split_once('\n').map_or("", |(_, rest)| rest);
    format!(
        "showing {} of {} peers\n{body}",
        thousands(peers.len() as u64),
        thousands(u64::from(total))
    )
}

/// `peer peers --json` on a big network: [`peers_json`] with `"total"`.
pub fn peer_page_json(peers: &[PeerEntry], total: u32) -> String {
    let all = peers_json(peers);
    let open = all.trim_end().trim_end_matches('}');
    format!("{open},\"total\":{total}}}\n")
}

/// 19900 as "19,900".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, d) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(d);
    }
    out
}

pub fn peer_map(peers: &BTreeMap<PeerId, SocketAddr>, me: Option<PeerId>) -> String {
    let mut out = format!("{} live peers\n", peers.len());
    for (id, addr) in peers {
        let mark = if Some(*id) == me { "  (me)" } else { "" };
        let _ = writeln!(out, "  {:<6} {addr}{mark}", id.to_string());
    }
    out
}

pub fn network_files(files: &[NetworkFile]) -> String {
    let mut out = format!("{} files on the network\n", files.len());
    for f in files {
        let _ = writeln!(
            out,
            "  {:<32} {:>14} bytes  {:>3} holders  {}",
            f.name,
            f.size,
            f.holders,
            f.root.short()
        );
    }
    out
}

pub fn shared_files(store: &SharedFolder) -> String {
    let mut out = format!("{} shared files\n", store.files().count());
    for f in store.files() {
        let _ = writeln!(
            out,
            "  {:<32} {:>14} bytes  {}",
            f.name,
            f.manifest.size,
            f.manifest.root.short()
        );
    }
    out
}

/// `ls`, after the shared files: one line per partial file, with its name
/// (or `?` when none was recorded), size, share of chunks saved and how long
/// ago it last changed; the ones in `running` are marked.
pub fn partial_files(list: &[PartialInfo], running: &[Hash], now: SystemTime) -> String {
    if list.is_empty() {
        return String::new();
    }
    let mut out = format!(
        "{} partial files (unfinished downloads; rm-partial NAME|ROOT deletes one)\n",
        list.len()
    );
    for p in list {
        let name = p
            .name
            .as_ref()
            .map_or_else(|| "?".to_string(), |n| n.to_string());
        let age = now.duration_since(p.modified).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {:<32} {:>10}  {:>3.0}% saved  changed {} ago  {}{}",
            name,
            human_size(p.size),
            p.percent().floor(),
            human_age(age),
            p.root.short(),
            if running.contains(&p.root) {
                "  (downloading)"
            } else {
                ""
            }
        );
    }
    out
}

/// How long ago, coarsely: `40 s`, `12 min`, `5 h`, `8 days`.
pub fn human_age(d: Duration) -> String {
    let secs = d.as_secs();
    match secs {
        0..60 => format!("{secs} s"),
        60..3600 => format!("{} min", secs / 60),
        3600..86400 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86400),
    }
}

/// `peer peers --json`: `{"peers":[{"id":1,"addr":"127.0.0.1:4001"}]}`,
/// ordered by id, and a newline.
pub fn peers_json(peers: &[PeerEntry]) -> String {
    let mut sorted: Vec<&PeerEntry> = peers.iter().collect();
    sorted.sort_by_key(|p| p.id);
    let mut out = String::from("{\"peers\":[");
    for (i, p) in sorted.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{{\"id\":{},\"addr\":", p.id.0);
        json_string(&mut out, &p.addr.to_string());
        // On a sealed network: the key its handshake proved.
        if p.key.is_known() {
            let _ = write!(out, ",\"key\":\"{}\"", p.key);
        }
        out.push('}');
    }
    out.push_str("]}\n");
    out
}

/// `peer files --json`:
/// `{"files":[{"name":"a.txt","size":6,"root":"<64 hex>","holders":1}]}`,
/// in the manager's order, and a newline.
pub fn files_json(files: &[NetworkFile]) -> String {
    let mut out = String::from("{\"files\":[");
    for (i, f) in files.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"name\":");
        json_string(&mut out, f.name.as_str());
        let _ = write!(
            out,
            ",\"size\":{},\"root\":\"{}\",\"holders\":{}}}",
            f.size, f.root, f.holders
        );
    }
    out.push_str("]}\n");
    out
}

/// What one finished download did, for the summary `get` prints.
pub use crate::peer::download::DownloadSummary as GetSummary;

impl GetSummary {
    /// One line for people, e.g. `downloaded a.txt: 57 B in 6 ms (9.5 kB/s)
    /// from 1 peer; root 7cbf...`; ends in a newline.
    pub fn human(&self) -> String {
        let resumed = if self.fetched_bytes < self.size {
            format!(
                ", {} fetched, the rest resumed",
                human_size(self.fetched_bytes)
            )
        } else {
            String::new()
        };
        let secs = finite_non_negative(self.seconds);
        let rate = self.fetched_bytes as f64 / secs.max(1e-6);
        let peers = if self.sources == 1 { "peer" } else { "peers" };
        format!(
            "downloaded {}: {}{resumed} in {} ({}) from {} {peers}; root {}\n",
            self.name,
            human_size(self.size),
            human_duration(Duration::from_secs_f64(secs)),
            human_rate(rate),
            self.sources,
            self.root
        )
    }

    /// The JSON document for `get --json`:
    /// `{"name":..,"size":..,"root":"<64 hex>","fetched_bytes":..,"seconds":..,"sources":..}`
    /// and a newline.
    pub fn json(&self) -> String {
        let mut out = String::from("{\"name\":");
        json_string(&mut out, self.name.as_str());
        let _ = writeln!(
            out,
            ",\"size\":{},\"root\":\"{}\",\"fetched_bytes\":{},\"seconds\":{:.6},\"sources\":{}}}",
            self.size,
            self.root,
            self.fetched_bytes,
            finite_non_negative(self.seconds),
            self.sources
        );
        out
    }
}

fn finite_non_negative(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 { x } else { 0.0 }
}

/// A size in SI units with one decimal: `57 B`, `1.2 kB`, `64.0 MB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    // 999.95 would print as "1000.0": move up instead.
    while value >= 999.95 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A rate: `9.5 kB/s`, `1.2 GB/s`.
pub fn human_rate(bytes_per_sec: f64) -> String {
    let b = finite_non_negative(bytes_per_sec);
    format!("{}/s", human_size(b.round().min(u64::MAX as f64) as u64))
}

/// A duration for people: `6 ms`, `1.25 s`, `12.3 s`, `2 min 3 s`.
pub fn human_duration(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 1.0 {
        format!("{} ms", d.as_millis())
    } else if secs < 10.0 {
        format!("{secs:.2} s")
    } else if secs < 60.0 {
        format!("{secs:.1} s")
    } else {
        let whole = d.as_secs();
        format!("{} min {} s", whole / 60, whole % 60)
    }
}

/// Appends `s` as a JSON string: quotes, backslashes and every control
/// character escaped (RFC 8259 section 7); all other Unicode as UTF-8.
pub fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            // Valid JSON either way, but some JavaScript parsers choke on raw
            // line and paragraph separators.
            '\u{2028}' | '\u{2029}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{FileName, Hash, PeerKey};

    fn name(s: &str) -> FileName {
        FileName::new(s).unwrap()
    }

    fn summary() -> GetSummary {
        GetSummary {
            name: name("file1.txt"),
            size: 57,
            root: Hash([0xab; 32]),
            fetched_bytes: 57,
            seconds: 0.006,
            sources: 1,
            path: std::path::PathBuf::from("/tmp/file1.txt"),
        }
    }

    #[test]
    fn partial_files_show_name_size_percent_and_age() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10 * 86400);
        let mut info = PartialInfo {
            root: Hash([7; 32]),
            name: Some(name("a\u{1b}b.bin")),
            size: 2_500_000,
            chunks: 40,
            saved: 10,
            modified: now - Duration::from_secs(3 * 3600 + 5),
        };
        let text = partial_files(std::slice::from_ref(&info), &[], now);
        assert!(text.starts_with("1 partial files"), "{text}");
        let line = text.lines().nth(1).unwrap();
        for part in [
            "a\\x1bb.bin",
            "2.5 MB",
            " 25% saved",
            "changed 3 h ago",
            &info.root.short(),
        ] {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
        assert!(!line.contains('\u{1b}'));
        assert!(!line.contains("downloading"));
        info.name = None;
        let text = partial_files(&[info.clone()], &[info.root], now);
        assert!(
            text.contains("  ?  ") && text.contains("(downloading)"),
            "{text}"
        );
        assert_eq!(partial_files(&[], &[], now), "");
        assert_eq!(human_age(Duration::from_secs(8 * 86400 + 7)), "8 days");
    }

    #[test]
    fn sizes_rates_and_durations_in_human_units() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(57), "57 B");
        assert_eq!(human_size(999), "999 B");
        assert_eq!(human_size(1000), "1.0 kB");
        assert_eq!(human_size(1_234_567), "1.2 MB");
        assert_eq!(human_size(999_999), "1.0 MB");
        assert_eq!(human_size(64 << 20), "67.1 MB");
        assert_eq!(human_size(u64::MAX), "18.4 EB");
        assert_eq!(human_rate(1.2e9), "1.2 GB/s");
        assert_eq!(human_rate(f64::NAN), "0 B/s");
        assert_eq!(human_duration(Duration::from_millis(6)), "6 ms");
        assert_eq!(human_duration(Duration::from_millis(1250)), "1.25 s");
        assert_eq!(human_duration(Duration::from_millis(12_340)), "12.3 s");
        assert_eq!(human_duration(Duration::from_secs(123)), "2 min 3 s");
    }

    #[test]
    fn the_summary_line_reads_like_a_sentence() {
        let s = summary();
        assert_eq!(
            s.human(),
            format!(
                "downloaded file1.txt: 57 B in 6 ms (9.5 kB/s) from 1 peer; root {}\n",
                "ab".repeat(32)
            )
        );
        let resumed = GetSummary {
            size: 2_000_000,
            fetched_bytes: 500_000,
            seconds: 0.5,
            sources: 3,
            ..s
        };
        let line = resumed.human();
        assert!(
            line.starts_with(
                "downloaded file1.txt: 2.0 MB, 500.0 kB fetched, the rest resumed in 500 ms (1.0 MB/s) from 3 peers;"
            ),
            "{line}"
        );
    }

    #[test]
    fn the_summary_json_has_the_documented_fields() {
        assert_eq!(
            summary().json(),
            format!(
                "{{\"name\":\"file1.txt\",\"size\":57,\"root\":\"{}\",\"fetched_bytes\":57,\"seconds\":0.006000,\"sources\":1}}\n",
                "ab".repeat(32)
            )
        );
        let odd = GetSummary {
            seconds: f64::INFINITY,
            ..summary()
        };
        assert!(odd.json().contains("\"seconds\":0.000000"));
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        let mut out = String::new();
        json_string(&mut out, "a\"b\\c\nd\u{1}e\u{7f}f\u{2028}é🐟");
        assert_eq!(out, "\"a\\\"b\\\\c\\nd\\u0001e\\u007ff\\u2028é🐟\"");
    }

    #[test]
    fn lists_as_json() {
        let peers = [
            PeerEntry {
                id: PeerId(9),
                addr: "127.0.0.1:2".parse().unwrap(),
                key: PeerKey::UNKNOWN,
            },
            PeerEntry {
                id: PeerId(3),
                addr: "[::1]:1".parse().unwrap(),
                key: PeerKey::UNKNOWN,
            },
        ];
        assert_eq!(
            peers_json(&peers),
            "{\"peers\":[{\"id\":3,\"addr\":\"[::1]:1\"},{\"id\":9,\"addr\":\"127.0.0.1:2\"}]}\n"
        );
        assert_eq!(peers_json(&[]), "{\"peers\":[]}\n");
        let files = [NetworkFile {
            name: name("say \"hi\""),
            size: 6,
            root: Hash([1; 32]),
            holders: 2,
        }];
        assert_eq!(
            files_json(&files),
            format!(
                "{{\"files\":[{{\"name\":\"say \\\"hi\\\"\",\"size\":6,\"root\":\"{}\",\"holders\":2}}]}}\n",
                "01".repeat(32)
            )
        );
    }

    #[test]
    fn control_characters_in_names_are_shown_escaped() {
        assert_eq!(name("a\u{1b}[2Jb\nc").to_string(), "a\\x1b[2Jb\\nc");
        assert_eq!(name("été 🐟.txt").to_string(), "été 🐟.txt");
    }

    #[test]
    fn a_page_of_a_big_network_says_how_many_in_all() {
        let peers = vec![PeerEntry {
            id: PeerId(3),
            addr: ([127, 0, 0, 1], 2).into(),
            key: Default::default(),
        }];
        let text = peer_page(&peers, 19_900, None);
        assert!(
            text.starts_with("showing 1 of 19,900 peers\n  #3 "),
            "{text}"
        );
        assert_eq!(text.lines().count(), 2);
        assert_eq!(
            peer_page_json(&peers, 1_000_000),
            "{\"peers\":[{\"id\":3,\"addr\":\"127.0.0.1:2\"}],\"total\":1000000}\n"
        );
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
    }
}
