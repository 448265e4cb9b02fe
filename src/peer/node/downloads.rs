//! Downloads in the event loop: each is a pure [`Download`] core; this file
//! carries out its actions (connections, frames, the partial file, the final
//! move into the folder) and feeds it what the sockets, the disk and the
//! manager link report. Several run at once, each with its own sources.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mio::Token;

use super::*;
use crate::net::{CloseReason, Conn, ConnId, Flow, ReadEnd};
use crate::peer::download::{Action, Download, DownloadConfig, DownloadOutcome};
use crate::peer::progress::ProgressReport;
use crate::store::PartialFile;
use crate::wire::{FileName, HolderGroup, Message, PeerId, accept};

/// Bytes read per call on a source connection. Measured (1 GiB, one seeder,
/// 32 KiB chunks, median of 7): 64 KiB 1380 MB/s, 256 KiB 1580, 512 KiB
/// 1465, 1 MiB 1430: fewer reads and loop turns per chunk, while a read's
/// worth of chunks is still in cache when it is hashed and written.
const SOURCE_READ_CHUNK: usize = 256 << 10;

/// How often progress bars and log lines are refreshed.
const PROGRESS_TICK: Duration = Duration::from_millis(500);

/// One running download: its core and what the shell keeps for it.
pub(in crate::peer) struct Job {
    pub(super) core: Download,
    partial: Option<PartialFile>,
    /// Each source's connection.
    conns: BTreeMap<SourceId, ConnId>,
    progress: Option<ProgressReport>,
    /// The partial file's claims are being re-verified, a slice per turn.
    verifying: bool,
    /// Chunks verified and stored since the last `Have` went out.
    pub(super) unannounced: Vec<u32>,
}

impl Job {
    pub(super) fn is_verifying(&self) -> bool {
        self.verifying
    }

    /// The manifest and the partial file, once this download can serve the
    /// chunks it has verified (its file open, its old claims re-checked).
    pub(super) fn serving(&self) -> Option<(&crate::store::Manifest, &PartialFile)> {
        match (self.core.manifest(), self.partial.as_ref()) {
            (Some(m), Some(p)) if !self.verifying => Some((m, p)),
            _ => None,
        }
    }

    /// Makes verified chunks durable so a crash keeps them.
    pub(super) fn save_progress(&mut self) {
        if let Some(p) = self.partial.as_mut()
            && let Err(e) = p.save_progress()
        {
            log::warn!("cannot save download progress: {e}");
        }
    }
}

impl Node {
    pub(super) fn start_download(&mut self, request: GetRequest, now: Instant) {
        if let Some((_, j)) = self
            .downloads
            .iter()
            .find(|(_, j)| *j.core.name() == request.name)
        {
            let text = format!("already downloading {}\n", j.core.name());
            return self.say(&text);
        }
        let local = self.store.by_name(&request.name).map(|f| f.manifest.root);
        let config = DownloadConfig {
            max_sources: self.config.max_peers,
            ..DownloadConfig::default()
        };
        let mut config = config;
        // Downloaders of one seeder start at different chunks, so they have
        // something to trade (the scheduler's tie-break).
        config.scheduler.start_chunk = fastrand::u32(..);
        let core = Download::new(request, local, config, now);
        let job = self.downloads.insert(Job {
            core,
            partial: None,
            conns: BTreeMap::new(),
            progress: None,
            verifying: false,
            unannounced: Vec::new(),
        });
        self.apply_download_actions(job, now);
    }

    /// Carries out what the download's core asked for, until it asks nothing.
    pub(super) fn apply_download_actions(&mut self, job: usize, now: Instant) {
        let mut touched = Vec::new();
        while let Some(action) = self
            .downloads
            .get_mut(job)
            .and_then(|j| j.core.poll_action())
        {
            let Some(j) = self.downloads.get_mut(job) else {
                break;
            };
            match action {
                Action::AskHolders(name) => self.link.ask(Query::WhoHas(name)),
                Action::Connect { source, addr } => self.connect_source(job, source, addr, now),
                Action::Send { source, msg } => {
                    if let Some(&id) = j.conns.get(&source)
                        && let Some(pc) = self.conns.get_mut(id.0)
                    {
                        pc.conn().send(&msg);
                        // What we ask changes what may come back: a manifest
                        // asked on a timer (the hedge) must be accepted
                        // although no frame of that source came since.
                        pc.conn().set_accept(j.core.accepts(source));
                        touched.push(id);
                    }
                }
                Action::Close { source } => {
                    if let Some(id) = j.conns.remove(&source)
                        && let Some(pc) = self.conns.try_remove(id.0)
                    {
                        pc.into_conn().close(self.poll.registry());
                    }
                }
                Action::OpenPartial => self.open_partial(job, now),
                Action::SaveProgress => j.save_progress(),
                Action::Finish => self.finish_download(job, now),
                Action::Ended(outcome) => self.download_ended(job, outcome, now),
            }
        }
        touched.sort_unstable();
        touched.dedup();
        for id in touched {
            self.flush_source(id, now);
        }
        self.apply_link_actions(now);
    }

    fn connect_source(&mut self, job: usize, source: SourceId, addr: SocketAddr, now: Instant) {
        let entry = self.conns.vacant_entry();
        let id = ConnId(entry.key());
        match Conn::connect(
            addr,
            self.poll.registry(),
            Token(id.0),
            accept::PEER_BEFORE_HELLO,
        ) {
            Ok(mut conn) => {
                conn.set_read_chunk(SOURCE_READ_CHUNK);
                if let Some(keys) = &self.config.keys {
                    conn.seal(keys, true, now);
                }
                entry.insert(PeerConn::Source {
                    conn,
                    job,
                    source,
                    connected: false,
                });
                if let Some(j) = self.downloads.get_mut(job) {
                    j.conns.insert(source, id);
                }
            }
            Err(e) => {
                log::warn!("cannot connect to a holder at {addr}: {e}");
                if let Some(j) = self.downloads.get_mut(job) {
                    j.core.handle_closed(source, false, now);
                }
            }
        }
    }

    /// Opens the partial file of the manifest the core verified. What an
    /// earlier run claims is re-verified a slice per loop turn
    /// ([`Node::verify_partials`]), so a big resume never stalls the loop.
    fn open_partial(&mut self, job: usize, now: Instant) {
        let Some(j) = self.downloads.get_mut(job) else {
            return;
        };
        let Some(manifest) = j.core.manifest() else {
            return;
        };
        match PartialFile::open_unverified(self.store.dirs(), manifest) {
            Ok(partial) => {
                if let Err(e) = partial.record_name(j.core.name()) {
                    log::warn!("cannot record the name of download {}: {e}", j.core.name());
                }
                j.partial = Some(partial);
                j.verifying = true;
                self.verify_partials(0, now);
            }
            Err(e) => j.core.handle_partial_ready(Err(e), now),
        }
    }

    /// One slice of re-verification for each download resuming a partial
    /// file; a download whose claims are all checked goes on to transfer.
    pub(super) fn verify_partials(&mut self, budget: usize, now: Instant) {
        let ready: Vec<usize> = self
            .downloads
            .iter_mut()
            .filter(|(_, j)| j.verifying)
            .filter_map(|(k, j)| {
                let partial = j.partial.as_mut()?;
                partial.verify_step(budget).then_some(k)
            })
            .collect();
        for job in ready {
            self.partial_verified(job, now);
            self.apply_download_actions(job, now);
        }
    }

    fn partial_verified(&mut self, job: usize, now: Instant) {
        let free = self.store.dirs().free_space().ok();
        let Some(j) = self.downloads.get_mut(job) else {
            return;
        };
        j.verifying = false;
        let (Some(partial), Some(manifest)) = (j.partial.as_ref(), j.core.manifest()) else {
            return;
        };
        let have: Vec<bool> = (0..manifest.chunk_count())
            .map(|i| partial.has(i))
            .collect();
        if self.config.progress_bar || log::log_enabled!(log::Level::Info) {
            let done = (0..manifest.chunk_count())
                .filter(|&i| have[i as usize])
                .map(|i| manifest.chunk_len(i) as u64)
                .sum();
            j.progress = Some(ProgressReport::new(
                j.core.name(),
                manifest.size,
                done,
                self.config.progress_bar,
                now,
            ));
        }
        j.core.handle_partial_ready(Ok((have, free)), now);
        // From now on it serves what it verifies: a partial holder.
        self.share_with_manager();
    }

    /// Every chunk is verified: move the file into the folder and share it
    /// at once, with the manifest it was verified against (no rehash).
    fn finish_download(&mut self, job: usize, now: Instant) {
        // Followers hear of the last chunks before the file stops being partial.
        self.announce(job);
        let Some(j) = self.downloads.get_mut(job) else {
            return;
        };
        let name = j.core.name().clone();
        let result = match j.partial.take() {
            Some(partial) => partial.finish(&name).map_err(|e| e.to_string()),
            None => Err("the partial file is not open".to_string()),
        };
        if result.is_ok()
            && let Some(manifest) = j.core.manifest().cloned()
            && let Err(e) = self.store.add_downloaded(name, manifest)
        {
            log::warn!("{e}");
        }
        j.core.handle_finished(result, now);
        // Shared whole now, or (if the move failed) no longer at all.
        self.share_with_manager();
    }

    fn download_ended(&mut self, job: usize, outcome: DownloadOutcome, _now: Instant) {
        let Some(mut j) = self.downloads.try_remove(job) else {
            return;
        };
        j.save_progress();
        self.stats.hash_failures_ended += j.core.corrupt_chunks();
        match &outcome {
            DownloadOutcome::Done(_) => self.stats.downloads_done += 1,
            DownloadOutcome::Failed(_) => self.stats.downloads_failed += 1,
            _ => {}
        }
        for (_, id) in std::mem::take(&mut j.conns) {
            if let Some(pc) = self.conns.try_remove(id.0) {
                pc.into_conn().close(self.poll.registry());
            }
        }
        if let Some(p) = j.progress.take() {
            p.finish();
        }
        if j.serving().is_some() {
            self.share_with_manager(); // no longer a partial holder
        }
        if self.partial_chunks_served > 0 {
            log::info!(
                "served {} chunks to other peers while downloading",
                self.partial_chunks_served
            );
        }
        let requested = match &self.mode {
            Mode::Get { requests, .. } => requests.len(),
            Mode::Interactive => 0,
        };
        if let DownloadOutcome::Failed(e) = &outcome {
            // Said once: an interactive peer answers the command with it; a
            // one-shot get of one file returns it (the binary prints it on
            // stderr); of several, each is named as it fails.
            match self.mode {
                Mode::Interactive => self.say(&format!("download failed: {e}\n")),
                Mode::Get { .. } if requested > 1 => log::error!("{e}"),
                Mode::Get { .. } => {}
            }
            self.failures.push(e.clone());
        }
        self.sink.report(Report::DownloadEnded(&outcome));
        if matches!(outcome, DownloadOutcome::Done(_)) {
            self.rescan();
        }
        let Mode::Get { seed, .. } = self.mode else {
            return;
        };
        if self.downloads.is_empty() && (!seed || !self.failures.is_empty()) {
            let mut failures = std::mem::take(&mut self.failures);
            let result = match failures.len() {
                0 => Ok(()),
                1 if requested == 1 => Err(NodeError::Download(failures.remove(0))),
                failed => Err(NodeError::Downloads {
                    failed,
                    total: requested,
                }),
            };
            self.finish(result);
        }
    }

    /// Frames from a source: decoded in place, handed to the core, and each
    /// chunk it passes written straight from the read buffer.
    pub(super) fn handle_source_readable(&mut self, id: ConnId, now: Instant) {
        // The peer greets at once: its hello may come with the connect.
        if !self.source_connected(id, now) {
            return;
        }
        let Some(PeerConn::Source {
            conn, job, source, ..
        }) = self.conns.get_mut(id.0)
        else {
            return;
        };
        let (job, source) = (*job, *source);
        let Some(j) = self.downloads.get_mut(job) else {
            return;
        };
        let from = conn.peer_addr();
        let stats = &mut self.stats;
        let end = conn.read_frames(|msg| {
            let payload = match &msg {
                Message::Chunk { data, .. } => *data,
                _ => &[],
            };
            if let Some(chunk) = j.core.handle_message(source, msg, now) {
                let stored = match j.partial.as_mut() {
                    Some(p) => p.write_chunk(chunk.index, payload),
                    None => Err(io::Error::other("the partial file is not open")),
                };
                if stored.is_ok() {
                    j.unannounced.push(chunk.index);
                    stats.fetched.add(from, payload.len() as u64);
                }
                j.core.handle_chunk_stored(source, chunk.index, stored, now);
            }
            if j.core.has_source(source) {
                Flow::Expect(j.core.accepts(source))
            } else {
                Flow::Close
            }
        });
        match end {
            ReadEnd::Open { revisit } => {
                if revisit {
                    self.revisit.push(id);
                }
            }
            ReadEnd::Authenticated(key) => {
                // The core checks it is the key the manager listed for
                // this holder (and drops the source if not).
                j.core.handle_authenticated(source, key, now);
                if j.core.has_source(source) {
                    self.revisit.push(id);
                }
            }
            ReadEnd::Closed(why) => self.source_closed(job, source, why, now),
        }
        self.schedule_announce(job, now);
        self.apply_download_actions(job, now);
        self.flush_source(id, now);
    }

    pub(super) fn handle_source_writable(&mut self, id: ConnId, now: Instant) {
        if self.source_connected(id, now) {
            self.flush_source(id, now);
        }
    }

    /// Whether the source's connect finished; the first time it has, the
    /// core hears of it (and greets the peer).
    fn source_connected(&mut self, id: ConnId, now: Instant) -> bool {
        let Some(PeerConn::Source {
            conn,
            job,
            source,
            connected,
        }) = self.conns.get_mut(id.0)
        else {
            return false;
        };
        if *connected {
            return true;
        }
        let (job, source) = (*job, *source);
        match conn.is_connected() {
            Ok(true) => *connected = true,
            Ok(false) => return false,
            Err(e) => {
                log::debug!("cannot connect to {}: {e}", conn.peer_addr());
                self.source_closed(job, source, CloseReason::Io(e), now);
                self.apply_download_actions(job, now);
                return false;
            }
        }
        if let Some(j) = self.downloads.get_mut(job) {
            j.core.handle_connected(source, now);
        }
        self.apply_download_actions(job, now);
        true
    }

    fn flush_source(&mut self, id: ConnId, now: Instant) {
        let Some(PeerConn::Source {
            conn,
            job,
            source,
            connected: true,
        }) = self.conns.get_mut(id.0)
        else {
            return;
        };
        let (job, source) = (*job, *source);
        let result = conn
            .flush()
            .and_then(|_| conn.sync_interest(self.poll.registry(), Token(id.0)));
        if let Err(e) = result {
            self.source_closed(job, source, CloseReason::Io(e), now);
            self.apply_download_actions(job, now);
        }
    }

    /// A source's connection ended under us: tell the core, drop the socket.
    fn source_closed(&mut self, job: usize, source: SourceId, why: CloseReason, now: Instant) {
        let Some(j) = self.downloads.get_mut(job) else {
            return;
        };
        if let Some(id) = j.conns.remove(&source)
            && let Some(pc) = self.conns.try_remove(id.0)
        {
            let conn = pc.into_conn();
            log::info!("source at {} went away: {why}", conn.peer_addr());
            conn.close(self.poll.registry());
        }
        let misbehaved = matches!(
            why,
            CloseReason::BadFrame(_) | CloseReason::Handshake(_) | CloseReason::Tampered(_)
        );
        j.core.handle_closed(source, misbehaved, now);
    }

    pub(super) fn handle_download_timers(&mut self, now: Instant) {
        let due: Vec<usize> = self
            .downloads
            .iter()
            .filter(|(_, j)| j.core.poll_timeout().is_some_and(|t| t <= now))
            .map(|(k, _)| k)
            .collect();
        for job in due {
            if let Some(j) = self.downloads.get_mut(job) {
                j.core.handle_timeout(now);
            }
            self.apply_download_actions(job, now);
        }
        if now >= self.next_progress {
            self.next_progress = now + PROGRESS_TICK;
            for (_, j) in self.downloads.iter_mut() {
                let st = j.core.status();
                if let Some(p) = j.progress.as_mut() {
                    p.update(st.bytes_done, st.sources, now);
                }
            }
        }
    }

    /// The manager answered "who has": every download of that name hears it.
    pub(super) fn handle_holders(
        &mut self,
        name: FileName,
        groups: Vec<HolderGroup>,
        now: Instant,
    ) {
        let local = self.store.by_name(&name).map(|f| f.manifest.root);
        let me = self.link.peer_id();
        let jobs: Vec<usize> = self.jobs_named(&name);
        for job in jobs {
            if let Some(j) = self.downloads.get_mut(job) {
                j.core.handle_holders(groups.clone(), me, local, now);
            }
            self.apply_download_actions(job, now);
        }
    }

    pub(super) fn handle_holders_failed(&mut self, name: &FileName, now: Instant) -> bool {
        let jobs = self.jobs_named(name);
        for &job in &jobs {
            if let Some(j) = self.downloads.get_mut(job) {
                j.core.handle_query_failed(now);
            }
            self.apply_download_actions(job, now);
        }
        !jobs.is_empty()
    }

    /// Sources the manager says left are dropped by their downloads.
    pub(super) fn handle_peers_left(&mut self, ids: &[PeerId], now: Instant) {
        let jobs: Vec<usize> = self.downloads.iter().map(|(k, _)| k).collect();
        for job in jobs {
            if let Some(j) = self.downloads.get_mut(job) {
                j.core.handle_peers_left(ids, now);
            }
            self.apply_download_actions(job, now);
        }
    }

    fn jobs_named(&self, name: &FileName) -> Vec<usize> {
        self.downloads
            .iter()
            .filter(|(_, j)| j.core.name() == name)
            .map(|(k, _)| k)
            .collect()
    }

    /// One line per download, for `status`.
    pub(super) fn status_text(&self) -> String {
        if self.downloads.is_empty() {
            return "no download in progress\n".into();
        }
        let mut text = String::new();
        for (_, j) in self.downloads.iter() {
            let st = j.core.status();
            text += &match st.size {
                Some(size) => format!(
                    "{}: {} of {size} bytes ({:.0}%), {} sources\n",
                    st.name,
                    st.bytes_done,
                    st.bytes_done as f64 * 100.0 / size.max(1) as f64,
                    st.sources
                ),
                None => format!("{}: {:?}, {} sources\n", st.name, st.phase, st.sources),
            };
        }
        text
    }
}
