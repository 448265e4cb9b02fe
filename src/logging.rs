//! Logging set-up shared by both binaries: to stderr (so stdout stays for
//! command output that scripts parse), or to a file with `--log-file`.

use std::fs::OpenOptions;
use std::path::Path;

use simplelog::{
    ColorChoice, CombinedLogger, ConfigBuilder, LevelFilter, SharedLogger, TermLogger,
    TerminalMode, WriteLogger,
};

/// `-v` raises the level (debug, then trace), `-q` lowers it (warn, then error).
pub fn level(verbose: u8, quiet: u8) -> LevelFilter {
    match verbose as i8 - quiet as i8 {
        i8::MIN..=-2 => LevelFilter::Error,
        -1 => LevelFilter::Warn,
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
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
        None => TermLogger::new(level, config, TerminalMode::Stderr, ColorChoice::Auto),
    };
    // Every record is sanitized first: no log line carries a raw control or
    // bidi character from the network (see crate::text).
    let logger = crate::text::EscapingLogger(CombinedLogger::new(vec![logger]));
    log::set_boxed_logger(Box::new(logger)).map_err(|e| format!("logging already set up: {e}"))?;
    log::set_max_level(level);
    Ok(())
}
