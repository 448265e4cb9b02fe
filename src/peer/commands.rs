//! The peer's interactive commands, parsed from stdin lines. The original's
//! menu numbers (1 get, 2 ls, 3 peers, 4 quit) still work.

use crate::wire::{FileName, Hash};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Get {
        name: FileName,
        hash: Option<Hash>,
    },
    /// `get`/`1` without a name: the next line is the name, as in the original.
    AskName,
    Ls,
    Files,
    Peers,
    Status,
    Quit,
    Help,
}

pub const HELP: &str = "\
commands:
  get NAME [HASH]  (1)  download NAME from the peers that hold it
  ls               (2)  files this peer shares
  peers            (3)  live peers, as the manager last said
  files                 files on the network, with size and holder count
  status                the download in progress, if any
  quit             (4)  say goodbye to the manager and exit
";

/// Parses one line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let mut words = line.split_whitespace();
    let Some(verb) = words.next() else {
        return Ok(None);
    };
    let rest: Vec<&str> = words.collect();
    let cmd = match (verb, rest.as_slice()) {
        ("get" | "1", []) => Command::AskName,
        ("get" | "1", [name]) => Command::Get {
            name: parse_name(name)?,
            hash: None,
        },
        ("get" | "1", [name, hash]) => Command::Get {
            name: parse_name(name)?,
            hash: Some(parse_hash(hash)?),
        },
        ("ls" | "2", []) => Command::Ls,
        ("peers" | "3", []) => Command::Peers,
        ("quit" | "exit" | "q" | "4", []) => Command::Quit,
        ("files", []) => Command::Files,
        ("status", []) => Command::Status,
        ("help" | "?", _) => Command::Help,
        (verb, _) => {
            return Err(format!(
                "unknown command {verb:?} (or wrong arguments); type help"
            ));
        }
    };
    Ok(Some(cmd))
}

/// A name as typed, or as `files` lists it: a backslash (never part of a
/// name) starts an escape such as `\x1b` or `\u{202e}`, so a name with
/// controls in it can still be fetched by copying it from the list.
pub fn parse_name(name: &str) -> Result<FileName, String> {
    let raw = if name.contains('\\') {
        crate::text::unescape(name).ok_or_else(|| {
            format!(
                "\"{}\": a backslash starts an escape like \\n, \\x1b or \\u{{202e}}",
                crate::text::escape(name)
            )
        })?
    } else {
        name.to_string()
    };
    FileName::new(&raw).map_err(|e| e.to_string())
}

pub fn parse_hash(hash: &str) -> Result<Hash, String> {
    Hash::from_hex(hash).ok_or_else(|| format!("{hash:?} is not a 64-digit hex root hash"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn menu_numbers_alias_the_commands() {
        assert_eq!(parse("2").unwrap(), Some(Command::Ls));
        assert_eq!(parse("3").unwrap(), Some(Command::Peers));
        assert_eq!(parse("4").unwrap(), Some(Command::Quit));
        assert_eq!(parse("1").unwrap(), Some(Command::AskName));
        let name = FileName::new("file1.txt").unwrap();
        assert_eq!(
            parse("1 file1.txt").unwrap(),
            Some(Command::Get { name, hash: None })
        );
    }

    #[test]
    fn names_can_be_typed_as_listed() {
        let raw = FileName::new("esc\u{1b}[31m\u{202e}.txt").unwrap();
        assert_eq!(parse_name(&raw.to_string()).unwrap(), raw);
        assert!(parse_name("a\\qb").is_err());
        assert!(
            parse_name("a\\\\b").is_err(),
            "an escaped backslash is still refused"
        );
        assert!(
            parse_name("a\\x2fb").is_err(),
            "an escaped slash is still refused"
        );
    }

    #[test]
    fn hostile_names_and_bad_hashes_are_refused() {
        assert!(parse("get ../x").is_err());
        assert!(parse("get /etc/passwd").is_err());
        assert!(parse("get a zz").is_err());
        assert!(parse("frobnicate").is_err());
        assert_eq!(parse("   ").unwrap(), None);
    }
}
