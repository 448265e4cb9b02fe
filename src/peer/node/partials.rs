//! Partial files of downloads in `DIR/.shoal/partial/`: listed by `ls`,
//! removed by `rm-partial`, and swept at start when stale.

use std::time::{Duration, SystemTime};

use super::*;
use crate::store::{self, PartialInfo};
use crate::wire::Hash;

/// Partial files none of whose files changed for this long are removed at
/// start: an abandoned download, not one paused for a weekend.
pub(super) const STALE_PARTIAL_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The fewest leading hex digits `rm-partial` takes for a root (as many as
/// `ls` and the logs show).
const MIN_ROOT_PREFIX: usize = 12;

impl Node {
    /// Removes partial files untouched for [`STALE_PARTIAL_AGE`], with a log
    /// line for each. Called before any download starts.
    pub(super) fn sweep_stale_partials(&mut self) {
        let dirs = self.store.dirs();
        match store::sweep_stale_partials(dirs, STALE_PARTIAL_AGE, SystemTime::now()) {
            Ok(removed) => {
                for info in removed {
                    log::info!(
                        "removed stale partial download {} ({}, {} saved, untouched for {})",
                        describe(&info),
                        super::super::output::human_size(info.size),
                        percent(&info),
                        super::super::output::human_age(age(&info)),
                    );
                }
            }
            Err(e) => log::warn!("cannot sweep {}: {e}", self.store.partial_dir().display()),
        }
    }

    /// Roots of the downloads running now, whose partials are not abandoned.
    fn running_roots(&self) -> Vec<Hash> {
        self.downloads
            .iter()
            .filter_map(|(_, j)| j.core.manifest().map(|m| m.root))
            .collect()
    }

    /// `ls`: the shared files, then the partial files.
    pub(super) fn ls_text(&self) -> String {
        let mut text = super::super::output::shared_files(&self.store);
        match store::list_partials(self.store.dirs()) {
            Ok(list) => {
                text += &super::super::output::partial_files(
                    &list,
                    &self.running_roots(),
                    SystemTime::now(),
                );
            }
            Err(e) => {
                text += &format!("cannot list {}: {e}\n", self.store.partial_dir().display());
            }
        }
        text
    }

    /// `rm-partial TARGET`: TARGET is a recorded name, a root or a root's
    /// leading hex digits, and must pick exactly one partial file.
    pub(super) fn rm_partial(&mut self, target: &str) {
        let text = self.rm_partial_text(target);
        self.say(&text);
    }

    fn rm_partial_text(&self, target: &str) -> String {
        let list = match store::list_partials(self.store.dirs()) {
            Ok(list) => list,
            Err(e) => {
                return format!("cannot list {}: {e}\n", self.store.partial_dir().display());
            }
        };
        let name = commands::parse_name(target).ok();
        let hex = target.to_ascii_lowercase();
        let by_root = hex.len() >= MIN_ROOT_PREFIX && hex.bytes().all(|b| b.is_ascii_hexdigit());
        let matches: Vec<&PartialInfo> = list
            .iter()
            .filter(|info| {
                (name.is_some() && info.name == name)
                    || (by_root && info.root.to_hex().starts_with(&hex))
            })
            .collect();
        let info = match matches.as_slice() {
            [] => {
                return format!(
                    "no partial file matches \"{}\" (ls lists them; give a name or {MIN_ROOT_PREFIX}+ hex digits of the root)\n",
                    crate::text::escape(target)
                );
            }
            [one] => *one,
            several => {
                let roots: Vec<String> = several.iter().map(|i| i.root.short()).collect();
                return format!(
                    "\"{}\" matches {} partial files ({}); give the root instead\n",
                    crate::text::escape(target),
                    several.len(),
                    roots.join(", ")
                );
            }
        };
        let running = self.downloads.iter().any(|(_, j)| {
            j.core.manifest().is_some_and(|m| m.root == info.root)
                || info.name.as_ref() == Some(j.core.name())
        });
        if running {
            return format!(
                "{} is downloading now; its partial file stays until the download ends\n",
                describe(info)
            );
        }
        match store::remove_partial(self.store.dirs(), &info.root) {
            Ok(()) => format!(
                "removed partial file of {} ({} saved)\n",
                describe(info),
                percent(info)
            ),
            Err(e) => format!(
                "cannot remove the partial file of {}: {e}\n",
                describe(info)
            ),
        }
    }
}

/// The name (escaped) and short root of a partial, for messages.
fn describe(info: &PartialInfo) -> String {
    match &info.name {
        Some(name) => format!("{name} ({})", info.root.short()),
        None => format!("download {}", info.root.short()),
    }
}

fn percent(info: &PartialInfo) -> String {
    format!("{:.0}%", info.percent().floor())
}

fn age(info: &PartialInfo) -> Duration {
    SystemTime::now()
        .duration_since(info.modified)
        .unwrap_or_default()
}
