//! `peer`: shares a folder with the shoal network and downloads files from it.

use std::io::{self, BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal::peer::commands::{parse_hash, parse_name};
use shoal::peer::download::GetRequest;
use shoal::peer::link::Query;
use shoal::peer::node::{Mode, Node, NodeConfig};
use shoal::wire::{FileName, Hash};

/// A shoal peer: shares every file in its folder, keeps the list of live
/// peers from the manager, and downloads files chunk by chunk from all the
/// peers that hold them at once, checking every chunk's BLAKE3 hash.
///
/// Without a command it runs interactively: type `help` for the commands
/// (get NAME, ls, peers, files, status, quit; or the menu numbers 1-4).
/// Started with no arguments at all it asks for a port and a peer number,
/// like the original, and shares the folder peerN.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Args {
    /// The folder to share; downloads land here too.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,

    /// Where the manager listens.
    #[arg(long, default_value = "127.0.0.1:10000", value_name = "ADDR")]
    manager: SocketAddr,

    /// Address to serve chunks on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR")]
    listen: SocketAddr,

    /// Address other peers should connect to, if not the one the manager
    /// sees (behind NAT, or listening on 0.0.0.0).
    #[arg(long, value_name = "ADDR")]
    advertise: Option<SocketAddr>,

    /// Cap on upload speed for all peers together, e.g. 20MiB or 500KB (per second).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    upload_limit: Option<u64>,

    /// Most peers one download fetches from at once.
    #[arg(long, default_value_t = 8, value_name = "N")]
    max_peers: usize,

    /// Most peers served at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_conns: usize,

    /// Seconds between checks of the folder for new or changed files.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    rescan: u64,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    quiet: u8,

    /// Write the log to this file instead of stderr.
    #[arg(long, value_name = "PATH", global = true)]
    log_file: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Download NAME from the network into DIR, print a summary, and exit.
    Get {
        /// File name as the network lists it (see `peer files`).
        #[arg(value_parser = parse_name)]
        name: FileName,
        /// Fetch only this version (64 hex digits, as `files` shows the start of).
        #[arg(long, value_parser = parse_hash)]
        hash: Option<Hash>,
        /// Keep running and sharing after the download.
        #[arg(long)]
        seed: bool,
    },
    /// Print the live peers and exit, without joining.
    Peers,
    /// Print the files on the network and exit, without joining.
    Files,
}

fn parse_rate(s: &str) -> Result<u64, String> {
    let s = s.trim().trim_end_matches("/s");
    let size: bytesize::ByteSize = s
        .parse()
        .map_err(|e| format!("{s:?} is not a rate like 20MiB or 500KB: {e}"))?;
    if size.as_u64() == 0 {
        return Err("an upload limit must be above zero".into());
    }
    Ok(size.as_u64())
}

fn main() -> ExitCode {
    let no_args = std::env::args_os().len() == 1;
    let mut args = Args::parse();
    if let Err(e) = shoal::logging::init(
        shoal::logging::level(args.verbose, args.quiet),
        args.log_file.as_deref(),
    ) {
        eprintln!("peer: {}", shoal::text::sanitize_lines(&e));
        return ExitCode::from(2);
    }
    if no_args && let Err(e) = ask_like_the_original(&mut args) {
        eprintln!("peer: {}", shoal::text::sanitize_lines(&e));
        return ExitCode::from(2);
    }
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peer: {}", shoal::text::sanitize_lines(&e));
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let mode = match args.command {
        Some(Cmd::Peers) => return query(args.manager, Query::ListPeers),
        Some(Cmd::Files) => return query(args.manager, Query::ListFiles),
        Some(Cmd::Get { name, hash, seed }) => Mode::Get {
            request: GetRequest { name, hash },
            seed,
        },
        None => Mode::Interactive,
    };
    let dir = args
        .dir
        .ok_or("no folder to share: pass --dir DIR (for example --dir peer1)")?;
    let config = NodeConfig {
        dir,
        manager: args.manager,
        listen: args.listen,
        advertise: args.advertise,
        upload_limit: args.upload_limit,
        max_peers: args.max_peers.max(1),
        max_conns: args.max_conns.max(1),
        rescan_interval: Duration::from_secs(args.rescan.max(1)),
        progress_bar: io::stderr().is_terminal() && args.log_file.is_none(),
    };
    let node = Node::new(config, mode).map_err(|e| e.to_string())?;
    node.run().map_err(|e| e.to_string())
}

fn query(manager: SocketAddr, q: Query) -> Result<(), String> {
    let text = shoal::peer::query::ask(manager, q).map_err(|e| e.to_string())?;
    print!("{}", shoal::text::sanitize_lines(&text));
    Ok(())
}

/// The original asked for a port and a peer number; so do we when started bare.
fn ask_like_the_original(args: &mut Args) -> Result<(), String> {
    let mut lines = io::stdin().lock().lines();
    let mut ask = |prompt: &str| -> Result<String, String> {
        print!("{prompt}");
        let _ = io::stdout().flush();
        match lines.next() {
            Some(Ok(line)) => Ok(line.trim().to_string()),
            _ => Err("no answer on stdin; run with --dir DIR instead (see --help)".into()),
        }
    };
    let port = ask("port number (0 for any): ")?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    let number = ask("peer number: ")?;
    let number: u32 = number
        .parse()
        .map_err(|_| format!("{number:?} is not a peer number"))?;
    args.listen = SocketAddr::new(args.listen.ip(), port);
    args.dir = Some(PathBuf::from(format!("peer{number}")));
    Ok(())
}
