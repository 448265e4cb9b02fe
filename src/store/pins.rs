//! `DIR/.shoal/managers`: the manager keys this folder has met, one line
//! per manager address (`ADDR KEY`), for trust on first use. The first
//! sealed handshake with a manager at an address records the static key it
//! proved; a later manager at that address with another key is refused
//! (see [`check`]). The file is the user's to edit: deleting a line accepts
//! the next key met there. Lines that do not parse are kept as they are and
//! match nothing.

use std::net::SocketAddr;

use crate::wire::PeerKey;

/// The file's name in `.shoal/`.
pub const MANAGERS_FILE: &str = "managers";

/// What the file says about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    lines: Vec<String>,
}

fn parse_line(line: &str) -> Option<(SocketAddr, PeerKey)> {
    let mut words = line.split_whitespace();
    let addr = words.next()?.parse().ok()?;
    let key = PeerKey::from_text(words.next()?)?;
    Some((addr, key))
}

impl Pins {
    pub fn parse(text: &str) -> Pins {
        Pins {
            lines: text.lines().map(str::to_string).collect(),
        }
    }

    /// The key pinned for `addr`, if any (the first line naming it).
    pub fn get(&self, addr: SocketAddr) -> Option<PeerKey> {
        self.lines
            .iter()
            .filter_map(|l| parse_line(l))
            .find(|&(a, _)| a == addr)
            .map(|(_, k)| k)
    }

    /// Pins `key` for `addr`, replacing the line that named it.
    pub fn set(&mut self, addr: SocketAddr, key: PeerKey) {
        let line = format!("{addr} {key}");
        match self
            .lines
            .iter()
            .position(|l| parse_line(l).is_some_and(|(a, _)| a == addr))
        {
            Some(i) => self.lines[i] = line,
            None => self.lines.push(line),
        }
    }

    pub fn render(&self) -> String {
        let mut text = self.lines.join("\n");
        text.push('\n');
        text
    }
}

/// What [`check`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key matches what was pinned (or given with `--manager-key`).
    Known,
    /// First meeting (or an explicit `--manager-key`): pin it.
    Pin,
    /// Another key than the one met before (or given): refuse, saying so.
    Changed { expected: PeerKey, explicit: bool },
}

/// Trust on first use, as a pure decision: `proven` is the key the manager
/// at the address proved, `pinned` what the file holds for it, `explicit`
/// the key given with `--manager-key` (which wins over the file).
pub fn check(proven: PeerKey, pinned: Option<PeerKey>, explicit: Option<PeerKey>) -> Verdict {
    match (explicit, pinned) {
        (Some(want), _) if want != proven => Verdict::Changed {
            expected: want,
            explicit: true,
        },
        (Some(_), Some(had)) if had == proven => Verdict::Known,
        (Some(_), _) => Verdict::Pin,
        (None, Some(had)) if had == proven => Verdict::Known,
        (None, Some(had)) => Verdict::Changed {
            expected: had,
            explicit: false,
        },
        (None, None) => Verdict::Pin,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_found_replaced_and_kept() {
        let a: SocketAddr = "10.0.0.1:10000".parse().unwrap();
        let b: SocketAddr = "[::1]:7".parse().unwrap();
        let (k1, k2) = (PeerKey([1; 32]), PeerKey([2; 32]));
        let mut pins = Pins::parse(&format!("# mine\n{a} {k1}\nnot a line\n"));
        assert_eq!(pins.get(a), Some(k1));
        assert_eq!(pins.get(b), None);
        pins.set(b, k2);
        pins.set(a, k2);
        let again = Pins::parse(&pins.render());
        assert_eq!(again.get(a), Some(k2));
        assert_eq!(again.get(b), Some(k2));
        assert!(again.render().contains("# mine\n") && again.render().contains("not a line\n"));
        assert_eq!(again.render().lines().count(), 4);
    }

    #[test]
    fn first_use_pins_a_change_is_refused_and_an_explicit_key_wins() {
        let (k1, k2) = (PeerKey([1; 32]), PeerKey([2; 32]));
        assert_eq!(check(k1, None, None), Verdict::Pin);
        assert_eq!(check(k1, Some(k1), None), Verdict::Known);
        assert_eq!(
            check(k2, Some(k1), None),
            Verdict::Changed {
                expected: k1,
                explicit: false
            }
        );
        assert_eq!(check(k2, Some(k1), Some(k2)), Verdict::Pin);
        assert_eq!(check(k2, Some(k2), Some(k2)), Verdict::Known);
        assert_eq!(
            check(k1, None, Some(k2)),
            Verdict::Changed {
                expected: k2,
                explicit: true
            }
        );
    }
}
