//! Showing untrusted text to people. File names and error reasons come from
//! other peers (and from whatever files sit in a shared folder); printed raw,
//! a newline could forge a line of output, an ESC sequence could drive the
//! terminal, a backspace or U+202E (right-to-left override) could make a
//! name look like another. Everything that prints such text goes through
//! this module:
//!
//! - [`escape`]: a faithful, unambiguous form for names (`FileName`'s
//!   `Display`): every character [`is_unsafe`] reports, and the backslash
//!   itself, become an escape (`\n`, `\x1b`, `\u{202e}`, `\\`); everything
//!   else, including any non-ASCII letter (`café.txt`, `文件.txt`), is shown
//!   as is.
//! - [`sanitize`]: the same escapes but the backslash left alone, so text
//!   that is already escaped stays readable and sanitizing is idempotent.
//!   Used for error reasons at decode and for every log record.
//! - [`EscapingLogger`]: defence in depth, sanitizes each log record before
//!   the real logger writes it (and adds its final newline).

use std::borrow::Cow;
use std::fmt::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// True for characters that must never reach a terminal raw: C0 controls,
/// DEL, C1 controls, line and paragraph separators, and every format
/// character (Unicode category Cf), which includes the bidi controls
/// U+061C, U+200E/F, U+202A–U+202E, U+2066–U+2069, the zero-width
/// characters and the byte order mark.
pub fn is_unsafe(c: char) -> bool {
    let c = c as u32;
    c < 0x20 || (0x7f..0xa0).contains(&c) || c == 0x2028 || c == 0x2029 || is_format(c)
}

/// Unicode 15 general category Cf (format characters), as ranges.
const FORMAT: &[(u32, u32)] = &[
    (0x00ad, 0x00ad),
    (0x0600, 0x0605),
    (0x061c, 0x061c),
    (0x06dd, 0x06dd),
    (0x070f, 0x070f),
    (0x0890, 0x0891),
    (0x08e2, 0x08e2),
    (0x180e, 0x180e),
    (0x200b, 0x200f),
    (0x202a, 0x202e),
    (0x2060, 0x2064),
    (0x2066, 0x206f),
    (0xfeff, 0xfeff),
    (0xfff9, 0xfffb),
    (0x110bd, 0x110bd),
    (0x110cd, 0x110cd),
    (0x13430, 0x1343f),
    (0x1bca0, 0x1bca3),
    (0x1d173, 0x1d17a),
    (0xe0001, 0xe0001),
    (0xe0020, 0xe007f),
];

fn is_format(c: u32) -> bool {
    c >= 0xad && FORMAT.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}

/// Writes the escape for one unsafe character (or a backslash).
fn write_escape(out: &mut impl Write, c: char) -> fmt::Result {
    match c {
        '\\' => out.write_str("\\\\"),
        '\n' => out.write_str("\\n"),
        '\r' => out.write_str("\\r"),
        '\t' => out.write_str("\\t"),
        '\0' => out.write_str("\\0"),
        c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// Streams `s` to `out`, escaping what `must_escape` picks; runs of plain
/// characters go out in one write.
fn write_escaped(out: &mut impl Write, s: &str, must_escape: fn(char) -> bool) -> fmt::Result {
    let mut plain = 0;
    for (i, c) in s.char_indices() {
        if must_escape(c) {
            out.write_str(&s[plain..i])?;
            write_escape(out, c)?;
            plain = i + c.len_utf8();
        }
    }
    out.write_str(&s[plain..])
}

fn unsafe_or_backslash(c: char) -> bool {
    c == '\\' || is_unsafe(c)
}

/// `s` shown faithfully and unambiguously; see the module docs.
pub fn escape(s: &str) -> Escaped<'_> {
    Escaped(s)
}

/// The `Display` of [`escape`]: writes the escaped text without allocating,
/// and honours width and alignment (`{:<32}`) on the escaped form.
#[derive(Clone, Copy)]
pub struct Escaped<'a>(&'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.width().is_none() && f.precision().is_none() {
            return write_escaped(f, self.0, unsafe_or_backslash);
        }
        let mut s = String::with_capacity(self.0.len());
        write_escaped(&mut s, self.0, unsafe_or_backslash)?;
        f.pad(&s)
    }
}

impl fmt::Debug for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Quotes for Debug; a quote inside is shown as is (it is harmless).
        write!(f, "\"{self}\"")
    }
}

/// A path shown like [`escape`] shows a name: a path in the shared folder
/// ends in a name from the network. Bytes that are not UTF-8 show as `\xNN`
/// (never ambiguous with a character: those are below 0x80 or `\u{..}`).
pub fn escape_path(path: &Path) -> EscapedPath<'_> {
    EscapedPath(path)
}

/// The `Display` of [`escape_path`].
#[derive(Clone, Copy)]
pub struct EscapedPath<'a>(&'a Path);

impl fmt::Display for EscapedPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for chunk in self.0.as_os_str().as_bytes().utf8_chunks() {
            write_escaped(f, chunk.valid(), unsafe_or_backslash)?;
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Text we composed ourselves for stdout or stderr, possibly several lines:
/// sanitized like [`sanitize`] except that newlines stay. Names in it are
/// escaped already; this is the last guard for anything that was not.
pub fn sanitize_lines(s: &str) -> Cow<'_, str> {
    let unsafe_but_newline = |c: char| c != '\n' && is_unsafe(c);
    if !s.chars().any(unsafe_but_newline) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let _ = write_escaped(&mut out, s, |c| c != '\n' && is_unsafe(c));
    Cow::Owned(out)
}

/// The inverse of [`escape`]: turns `\n`, `\x1b`, `\u{202e}`, `\\` (and
/// `\r`, `\t`, `\0`) back into characters, so a user can type a name the
/// way it was listed. `None` for a malformed escape. File names can never
/// hold a backslash, so for names this is unambiguous.
pub fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        let c = match chars.next()? {
            '\\' => '\\',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            '0' => '\0',
            'x' => {
                let hex: String = chars.by_ref().take(2).collect();
                let v = u8::from_str_radix(&hex, 16).ok().filter(|v| *v < 0x80)?;
                if hex.len() != 2 {
                    return None;
                }
                char::from(v)
            }
            'u' => {
                if chars.next()? != '{' {
                    return None;
                }
                let hex: String = chars.by_ref().take_while(|&c| c != '}').collect();
                if hex.is_empty() || hex.len() > 6 {
                    return None;
                }
                char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?
            }
            _ => return None,
        };
        out.push(c);
    }
    Some(out)
}

/// True if [`sanitize`] would change `s`.
pub fn needs_sanitizing(s: &str) -> bool {
    s.chars().any(is_unsafe)
}

/// `s` with every unsafe character escaped, backslashes left alone: safe to
/// print, and unchanged when sanitized again. Borrows when nothing changes.
pub fn sanitize(s: &str) -> Cow<'_, str> {
    if !needs_sanitizing(s) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    // Writing to a String cannot fail.
    let _ = write_escaped(&mut out, s, is_unsafe);
    Cow::Owned(out)
}

/// [`sanitize`], keeping at most `max` bytes: the text is cut before the
/// first character (or whole escape) that would not fit, so the result is
/// valid UTF-8, never ends in half an escape, and sanitizing it again
/// changes nothing.
pub fn sanitize_within(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut piece = String::new();
    for c in s.chars() {
        piece.clear();
        if is_unsafe(c) {
            // Writing to a String cannot fail.
            let _ = write_escape(&mut piece, c);
        } else {
            piece.push(c);
        }
        if out.len() + piece.len() > max {
            break;
        }
        out.push_str(&piece);
    }
    out
}

/// `value`'s `Debug` form, cut to at most `max` bytes (then ending in
/// "..."). Formatting stops at the cut, so describing an 8 MiB message in
/// an error reason or a log line costs `max` bytes, not a 40 MB string.
pub fn debug_within(value: &impl fmt::Debug, max: usize) -> String {
    struct Bounded {
        out: String,
        max: usize,
        cut: bool,
    }
    impl Write for Bounded {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            if self.out.len() + s.len() <= self.max {
                self.out.push_str(s);
                return Ok(());
            }
            let mut end = self.max - self.out.len();
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            self.out.push_str(&s[..end]);
            self.cut = true;
            Err(fmt::Error) // stops the formatting
        }
    }
    let mut b = Bounded {
        out: String::new(),
        max,
        cut: false,
    };
    let _ = write!(b, "{value:?}");
    if b.cut {
        b.out.push_str("...");
    }
    b.out
}

/// Wraps a logger so that every record's text is [`sanitize`]d before the
/// inner logger formats it: whatever a log line interpolates, the line
/// cannot carry a raw control or bidi character (only the newline the inner
/// logger appends). Records with nothing to escape pass through untouched.
pub struct EscapingLogger<L>(pub L);

impl<L: log::Log> log::Log for EscapingLogger<L> {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.0.enabled(record.metadata()) {
            return;
        }
        if let Some(s) = record.args().as_str()
            && !needs_sanitizing(s)
        {
            return self.0.log(record);
        }
        let text = record.args().to_string();
        if !needs_sanitizing(&text) {
            return self.0.log(record);
        }
        let clean = sanitize(&text);
        self.0.log(
            &log::Record::builder()
                .metadata(record.metadata().clone())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .args(format_args!("{clean}"))
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn esc(s: &str) -> String {
        escape(s).to_string()
    }

    #[test]
    fn plain_and_non_ascii_text_is_shown_as_is() {
        for s in [
            "file1.txt",
            "café.txt",
            "文件.txt",
            "Ωmega-ü.tar.gz",
            "emoji 🦀.bin",
            "e\u{301}.txt", // combining accent: a letter, not a control
            "nbsp\u{a0}ok",
            "",
        ] {
            assert_eq!(esc(s), s);
            assert_eq!(sanitize(s), s);
            assert!(matches!(sanitize(s), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn c0_controls_and_del_are_escaped() {
        assert_eq!(esc("a\nb"), "a\\nb");
        assert_eq!(esc("a\rb\tc\0d"), "a\\rb\\tc\\0d");
        assert_eq!(esc("\u{1b}[31mred"), "\\x1b[31mred");
        assert_eq!(esc("ab\u{8}\u{8}cd"), "ab\\x08\\x08cd");
        assert_eq!(esc("bell\u{7}"), "bell\\x07");
        assert_eq!(esc("del\u{7f}"), "del\\x7f");
        for c in (0u8..0x20).chain([0x7f]) {
            let out = esc(&char::from(c).to_string());
            assert!(out.starts_with('\\') && out.is_ascii(), "{c:#x} -> {out}");
        }
    }

    #[test]
    fn c1_controls_are_escaped() {
        assert_eq!(esc("a\u{85}b"), "a\\u{85}b");
        assert_eq!(esc("\u{9b}31m"), "\\u{9b}31m"); // CSI
        for c in 0x80..0xa0 {
            let s = char::from_u32(c).unwrap().to_string();
            assert_eq!(esc(&s), format!("\\u{{{c:x}}}"));
        }
    }

    #[test]
    fn bidi_controls_are_escaped() {
        assert_eq!(esc("invoice\u{202e}fdp.exe"), "invoice\\u{202e}fdp.exe");
        for c in [
            0x202a, 0x202b, 0x202c, 0x202d, 0x202e, 0x2066, 0x2067, 0x2068, 0x2069, 0x200e, 0x200f,
            0x061c,
        ] {
            let s = char::from_u32(c).unwrap().to_string();
            assert_eq!(esc(&s), format!("\\u{{{c:x}}}"));
        }
    }

    #[test]
    fn other_format_characters_and_separators_are_escaped() {
        for c in [
            0xad, 0x200b, 0x200c, 0x200d, 0x2060, 0xfeff, 0xfff9, 0xe0001, 0xe0041, 0x2028, 0x2029,
        ] {
            let s = char::from_u32(c).unwrap().to_string();
            assert_eq!(esc(&s), format!("\\u{{{c:x}}}"));
        }
    }

    #[test]
    fn backslash_is_escaped_by_escape_but_not_by_sanitize() {
        assert_eq!(esc("a\\nb"), "a\\\\nb");
        assert_eq!(esc("a\nb"), "a\\nb");
        assert_ne!(esc("a\\nb"), esc("a\nb"), "escape must be unambiguous");
        assert_eq!(sanitize("a\\nb"), "a\\nb");
        assert_eq!(sanitize("a\nb"), "a\\nb");
    }

    #[test]
    fn escaped_output_is_always_safe_and_sanitize_is_idempotent() {
        let nasty: String = (0u32..0x3000)
            .chain(0xe0000..0xe0080)
            .filter_map(char::from_u32)
            .collect();
        let e = esc(&nasty);
        assert!(!needs_sanitizing(&e));
        let s = sanitize(&nasty).into_owned();
        assert!(!needs_sanitizing(&s));
        assert_eq!(sanitize(&s), s);
    }

    #[test]
    fn width_applies_to_the_escaped_form() {
        assert_eq!(format!("[{:<8}]", escape("a\nb")), "[a\\nb    ]");
        assert_eq!(format!("[{:>6}]", escape("é")), "[     é]");
        assert_eq!(format!("{:?}", escape("a\u{1b}")), "\"a\\x1b\"");
    }

    #[test]
    fn sanitize_within_cuts_on_whole_characters_and_escapes() {
        assert_eq!(sanitize_within("abc", 10), "abc");
        assert_eq!(sanitize_within("abc", 2), "ab");
        assert_eq!(sanitize_within("aé", 2), "a");
        // "\x1b" is 4 bytes: it fits whole or not at all.
        assert_eq!(sanitize_within("a\u{1b}b", 4), "a");
        assert_eq!(sanitize_within("a\u{1b}b", 5), "a\\x1b");
        assert_eq!(sanitize_within("\u{202e}", 7), "");
        assert_eq!(sanitize_within("\u{202e}", 8), "\\u{202e}");
        let long = "\u{1b}".repeat(1000);
        let cut = sanitize_within(&long, 1024);
        assert_eq!(cut.len(), 1024);
        assert_eq!(sanitize_within(&cut, 1024), cut);
    }

    #[test]
    fn debug_within_stops_at_the_limit() {
        assert_eq!(debug_within(&"ab", 10), "\"ab\"");
        assert_eq!(debug_within(&vec![1u8; 10_000], 8), "[1, 1, 1...");
        assert_eq!(debug_within(&"éé", 3), "\"é...");
        assert!(debug_within(&vec!["x".repeat(1000); 1000], 200).len() <= 203);
    }

    #[test]
    fn paths_are_escaped_including_bytes_that_are_not_utf8() {
        use std::ffi::OsStr;
        let p = Path::new("/srv/dl/two\nlines\u{1b}[2J\u{202e}.txt");
        assert_eq!(
            escape_path(p).to_string(),
            "/srv/dl/two\\nlines\\x1b[2J\\u{202e}.txt"
        );
        let p = Path::new(OsStr::from_bytes(b"/d/caf\xc3\xa9-\xff\x1b"));
        assert_eq!(escape_path(p).to_string(), "/d/café-\\xff\\x1b");
    }

    #[test]
    fn sanitize_lines_keeps_newlines_only() {
        assert_eq!(sanitize_lines("a\nb\n"), "a\nb\n");
        assert_eq!(
            sanitize_lines("a\u{1b}[2J\nb\r\u{202e}\n"),
            "a\\x1b[2J\nb\\r\\u{202e}\n"
        );
    }

    #[test]
    fn unescape_reverses_escape() {
        assert_eq!(
            unescape("esc\\x1b[31mred.txt").unwrap(),
            "esc\u{1b}[31mred.txt"
        );
        assert_eq!(unescape("a\\u{202e}b\\n\\\\").unwrap(), "a\u{202e}b\n\\");
        assert_eq!(unescape("café.txt").unwrap(), "café.txt");
        for bad in [
            "\\",
            "\\q",
            "\\x1",
            "\\xzz",
            "\\x80",
            "\\u202e",
            "\\u{}",
            "\\u{d800}",
            "\\u{1234567}",
        ] {
            assert_eq!(unescape(bad), None, "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn escape_round_trips_and_is_safe(s in "\\PC*|[\\x00-\\x7f\\u{80}-\\u{9f}\\u{2000}-\\u{206f}\\\\]*") {
            let e = escape(&s).to_string();
            proptest::prop_assert!(!needs_sanitizing(&e));
            proptest::prop_assert_eq!(unescape(&e), Some(s.clone()));
            let once = sanitize(&s).into_owned();
            proptest::prop_assert_eq!(sanitize(&once), once.as_str());
        }
    }

    struct Capture(std::sync::Mutex<Vec<String>>);

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            self.0.lock().unwrap().push(record.args().to_string());
        }
        fn flush(&self) {}
    }

    #[test]
    fn escaping_logger_sanitizes_each_record() {
        use log::Log;
        let logger = EscapingLogger(Capture(Default::default()));
        let name = "evil\n2026-01-01 [ERROR] forged\u{1b}[2J\u{202e}";
        logger.log(
            &log::Record::builder()
                .level(log::Level::Warn)
                .args(format_args!("refused: {name}"))
                .build(),
        );
        logger.log(
            &log::Record::builder()
                .args(format_args!("plain line"))
                .build(),
        );
        let lines = logger.0.0.lock().unwrap();
        assert_eq!(
            lines[0],
            "refused: evil\\n2026-01-01 [ERROR] forged\\x1b[2J\\u{202e}"
        );
        assert_eq!(lines[1], "plain line");
    }
}
