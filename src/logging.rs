//! Logging set-up shared by both binaries: to stderr (so stdout stays for
//! command output that scripts parse), or to a file with `--log-file`.
//! Colour only when a person is watching: stderr is a terminal, the log is
//! not going to a file, and `NO_COLOR` is not set (<https://no-color.org>).

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::path::Path;

use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, TermLogger,
    TerminalMode, WriteLogger,
};

/// `-v` raises the level (debug, then trace), `-q` lowers it (warn, then
/// error). A one-shot command (`peer get`, `peers`, `files`) starts one step
/// quieter, at warnings only, so its own output is what a user sees; any `-v`
/// gives it the same levels as a long-running process.
pub fn level(verbose: u8, quiet: u8, one_shot: bool) -> LevelFilter {
    let quiet = quiet.saturating_add(u8::from(one_shot && verbose == 0));
    match i16::from(verbose) - i16::from(quiet) {
        i16::MIN..=-2 => LevelFilter::Error,
        -1 => LevelFilter::Warn,
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Whether log lines on stderr may carry ANSI colour codes.
pub fn use_colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    // no-color.org: set and not empty means no colour, whatever the value.
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Starts logging at `level`, to `log_file` if given, else to stderr.
pub fn init(level: LevelFilter, log_file: Option<&Path>) -> Result<(), String> {
    let config = ConfigBuilder::new()
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_time_format_rfc3339()
        .build();
    let logger: Box<dyn SharedLogger> = match log_file {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            WriteLogger::new(level, config, file)
        }
        None => {
            // simplelog's `Auto` only looks at TERM, not at whether stderr
            // is a terminal: piped logs got escape codes. Decide here.
            let no_color = std::env::var_os("NO_COLOR");
            let colour = use_colour(std::io::stderr().is_terminal(), no_color.as_deref());
            let choice = if colour {
                ColorChoice::Always
            } else {
                ColorChoice::Never
            };
            TermLogger::new(level, config, TerminalMode::Stderr, choice)
        }
    };
    // Every record is sanitized first: no log line carries a raw control or
    // bidi character from the network (see crate::text).
    let logger = crate::text::EscapingLogger(CombinedLogger::new(vec![logger]));
    log::set_boxed_logger(Box::new(logger)).map_err(|e| format!("logging already set up: {e}"))?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn one_shots_are_quieter_unless_verbose() {
        assert_eq!(level(0, 0, false), LevelFilter::Info);
        assert_eq!(level(0, 0, true), LevelFilter::Warn);
        assert_eq!(level(0, 1, true), LevelFilter::Error);
        assert_eq!(level(1, 0, true), LevelFilter::Debug);
        assert_eq!(level(1, 0, false), LevelFilter::Debug);
        assert_eq!(level(2, 0, true), LevelFilter::Trace);
        assert_eq!(level(0, 255, true), LevelFilter::Error);
        assert_eq!(level(255, 0, false), LevelFilter::Trace);
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_colour(true, None));
        assert!(use_colour(true, Some(OsStr::new(""))));
        assert!(!use_colour(true, Some(OsStr::new("1"))));
        assert!(!use_colour(false, None));
    }
}
