//! Where the node's words for the user go: stdout for the binary, a
//! collector for tests and benches (no stdout tricks needed).

use std::io::{self, Write};

use crate::peer::download::DownloadOutcome;

/// Something the node tells the user.
#[derive(Debug)]
pub enum Report<'a> {
    /// Command output (`ls`, `peers`, `files`, `status`, prompts).
    Text(&'a str),
    /// A download ended (done, nothing to do, or failed).
    DownloadEnded(&'a DownloadOutcome),
}

pub trait Sink {
    fn report(&mut self, report: Report<'_>);
}

/// The binary's sink: command output and summaries on stdout; failures are
/// logged as errors by the node, so stderr carries them.
pub struct StdoutSink;

/// `get --json`: one JSON document on stdout per finished download, and
/// nothing else (command output is dropped; errors go to stderr).
pub struct JsonSink;

impl Sink for JsonSink {
    fn report(&mut self, report: Report<'_>) {
        if let Report::DownloadEnded(DownloadOutcome::Done(summary)) = report {
            let mut out = io::stdout().lock();
            let _ = out.write_all(summary.json().as_bytes());
            let _ = out.flush();
        }
    }
}

impl Sink for StdoutSink {
    fn report(&mut self, report: Report<'_>) {
        let text = match report {
            Report::Text(text) => text.to_string(),
            Report::DownloadEnded(DownloadOutcome::Done(summary)) => summary.human(),
            Report::DownloadEnded(DownloadOutcome::AlreadyHave { name }) => {
                format!("{name} is already in the folder with the same content; nothing to do\n")
            }
            Report::DownloadEnded(DownloadOutcome::Failed(_)) => return,
        };
        // Last guard: names are escaped where they are formatted.
        let text = crate::text::sanitize_lines(&text);
        // A closed stdout is not worth a panic.
        let mut out = io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.flush();
    }
}
