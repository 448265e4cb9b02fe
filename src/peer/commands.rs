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
    /// `rm-partial NAME|ROOT`: the rest of the line, as typed.
    RmPartial(String),
    Files,
    Peers,
    Status,
    Quit,
    Help,
}

pub const HELP: &str = r#"commands:
  get NAME [HASH]  (1)  download NAME from the peers that hold it
  ls               (2)  files this peer shares, then partial files of
                        unfinished downloads: name, size, % saved, age
  rm-partial NAME|ROOT  delete the partial file of a download that is not
                        running (ROOT: its hash, or 12+ leading hex digits)
  peers            (3)  live peers, as the manager last said
  files                 files on the network, with size and holder count
  status                the downloads in progress
  quit             (4)  say goodbye to the manager and exit
NAME is the rest of the line, spaces included: `get my file.txt` fetches
"my file.txt". Quoted names work too: get "my file.txt" or get 'my file.txt';
quote a name that starts or ends with a space, starts with a quote, or whose
last word is 64 hex digits (it would be taken for the HASH). Inside double
quotes, \" stands for a quote. Several downloads can run at once.
Partial files untouched for 7 days are deleted when the peer starts.
"#;

/// Parses one line; `Ok(None)` for a blank line.
pub fn parse(line: &str) -> Result<Option<Command>, String> {
    let line = line.trim();
    let (verb, rest) = match line.split_once(char::is_whitespace) {
        Some((verb, rest)) => (verb, rest.trim()),
        None => (line, ""),
    };
    if verb.is_empty() {
        return Ok(None);
    }
    let bare = rest.is_empty();
    let cmd = match verb {
        "get" | "1" if bare => Command::AskName,
        "get" | "1" => {
            let (name, hash) = parse_get_args(rest)?;
            Command::Get { name, hash }
        }
        "ls" | "2" if bare => Command::Ls,
        "rm-partial" if !bare => Command::RmPartial(rest.to_string()),
        "peers" | "3" if bare => Command::Peers,
        "quit" | "exit" | "q" | "4" if bare => Command::Quit,
        "files" if bare => Command::Files,
        "status" if bare => Command::Status,
        "help" | "?" => Command::Help,
        verb => {
            return Err(format!(
                "unknown command {verb:?} (or wrong arguments); type help"
            ));
        }
    };
    Ok(Some(cmd))
}

/// What follows `get `: a quoted name or the rest of the line, then an
/// optional hash. Unquoted, the last word is the hash only if it is 64 hex
/// digits and something comes before it.
pub fn parse_get_args(rest: &str) -> Result<(FileName, Option<Hash>), String> {
    let rest = rest.trim();
    let (name, tail) = if rest.starts_with('"') || rest.starts_with('\'') {
        unquote(rest)?
    } else {
        match rest.rsplit_once(char::is_whitespace) {
            Some((name, last)) if Hash::from_hex(last).is_some() => {
                (name.trim_end().to_string(), last)
            }
            _ => (rest.to_string(), ""),
        }
    };
    let hash = match tail.trim() {
        "" => None,
        hash => Some(parse_hash(hash)?),
    };
    Ok((parse_name(&name)?, hash))
}

/// Splits a leading quoted string (`"..."` with `\"` and `\\` escapes, or
/// `'...'` taken as it is) from what follows it.
fn unquote(s: &str) -> Result<(String, &str), String> {
    let mut chars = s.char_indices();
    let Some((_, quote)) = chars.next() else {
        return Err("no name".into());
    };
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        match c {
            c if c == quote => {
                let after = &s[i + c.len_utf8()..];
                if !after.is_empty() && !after.starts_with(char::is_whitespace) {
                    return Err(format!(
                        "unexpected {after:?} after the closing quote; put the whole name in quotes"
                    ));
                }
                return Ok((out, after));
            }
            '\\' if quote == '"' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            c => out.push(c),
        }
    }
    Err(format!("no closing {quote} in {s:?}"))
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

    /// Every command in the README's table of interactive commands is in
    /// `help`, and every command `help` lists is in the table.
    #[test]
    fn help_and_the_readme_list_the_same_commands() {
        let readme = include_str!("../../README.md");
        let from_readme: Vec<&str> = readme
            .lines()
            .skip_while(|l| !l.starts_with("| command | alias |"))
            .take_while(|l| l.starts_with('|'))
            .filter(|l| l.starts_with("| `"))
            .filter_map(|l| l.trim_start_matches("| `").split([' ', '`']).next())
            .collect();
        let from_help: Vec<&str> = HELP
            .lines()
            .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        assert!(from_help.contains(&"rm-partial"), "{from_help:?}");
        for cmd in &from_help {
            assert!(from_readme.contains(cmd), "README lacks {cmd}");
        }
        for cmd in &from_readme {
            assert!(from_help.contains(cmd), "help lacks {cmd}");
            let line = if *cmd == "get" { "get x" } else { cmd };
            let line = if *cmd == "rm-partial" {
                "rm-partial x"
            } else {
                line
            };
            assert!(parse(line).unwrap().is_some(), "{cmd} does not parse");
        }
    }

    #[test]
    fn rm_partial_takes_the_rest_of_the_line() {
        assert_eq!(
            parse("rm-partial my file.txt ").unwrap(),
            Some(Command::RmPartial("my file.txt".into()))
        );
        assert!(parse("rm-partial").is_err());
    }

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
        assert!(parse("get \"../x\"").is_err());
        assert!(parse("get \"a\" zz").is_err());
        assert!(parse("get \"unclosed").is_err());
        assert!(parse("get \"a\"b").is_err());
        assert!(parse("frobnicate").is_err());
        assert!(parse("ls extra").is_err());
        assert_eq!(parse("   ").unwrap(), None);
    }

    fn get(line: &str) -> (String, Option<Hash>) {
        match parse(line) {
            Ok(Some(Command::Get { name, hash })) => (name.as_str().to_string(), hash),
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn everything_after_get_is_the_name() {
        assert_eq!(get("get my file.txt"), ("my file.txt".into(), None));
        assert_eq!(get("get my file.txt   "), ("my file.txt".into(), None));
        assert_eq!(get("1 two  spaces"), ("two  spaces".into(), None));
        assert_eq!(get("get a zz"), ("a zz".into(), None));
        assert_eq!(
            get("get \u{e9}t\u{e9} \u{1f41f}"),
            ("\u{e9}t\u{e9} \u{1f41f}".into(), None)
        );
    }

    #[test]
    fn quoted_names_and_a_trailing_hash() {
        let hex = "ab".repeat(32);
        let hash = Hash::from_hex(&hex);
        assert_eq!(get("get \"a b.txt\""), ("a b.txt".into(), None));
        assert_eq!(get("get 'a b.txt'"), ("a b.txt".into(), None));
        assert_eq!(get("get \" lead\""), (" lead".into(), None));
        assert_eq!(get("get \"say \\\"hi\\\"\""), ("say \"hi\"".into(), None));
        assert_eq!(
            get(&format!("get my file.txt {hex}")),
            ("my file.txt".into(), hash)
        );
        assert_eq!(get(&format!("get \"a b\" {hex}")), ("a b".into(), hash));
        // A name that is only a hash-looking word is a name.
        assert_eq!(get(&format!("get {hex}")), (hex.clone(), None));
        // Quoted, a hash-looking last word stays part of the name.
        let name = format!("x {hex}");
        assert_eq!(get(&format!("get \"{name}\"")), (name, None));
    }
}
