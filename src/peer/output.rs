//! How the peer prints lists for people (and for scripts: one item a line,
//! fields separated by spaces, a count line first).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::SocketAddr;

use crate::store::SharedFolder;
use crate::wire::{NetworkFile, PeerEntry, PeerId};

pub fn peer_entries(peers: &[PeerEntry], me: Option<PeerId>) -> String {
    let map: BTreeMap<PeerId, SocketAddr> = peers.iter().map(|p| (p.id, p.addr)).collect();
    peer_map(&map, me)
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
