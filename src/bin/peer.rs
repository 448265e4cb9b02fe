//! `peer`: shares a folder with the shoal network and downloads files from it.

use std::io::{self, BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use shoal::cli::{parse_addr, parse_rate};
use shoal::peer::commands::{parse_hash, parse_name};
use shoal::peer::download::GetRequest;
use shoal::peer::link::Query;
use shoal::peer::node::{JsonSink, Mode, Node, NodeConfig};
use shoal::peer::output;
use shoal::peer::query::Answer;
use shoal::wire::{FileName, Hash, PeerKey};

/// How `peer` exits; the README's "Exit codes" lists the same. Kept here, in
/// one place, so typed errors can map onto new codes later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// Done: the file is complete and verified (or was already here), the
    /// list was printed, or an interactive peer was told to quit.
    Success = 0,
    /// What was asked could not be done: the manager is unreachable, the
    /// file is not on the network, a different file of that name is in the
    /// folder, the disk is full, interrupted, ...
    Failed = 1,
    /// Bad arguments (clap exits with 2 too) or a setting that cannot work:
    /// no --dir, a log file that cannot be opened, ...
    Usage = 2,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// Why a run failed: the message printed on stderr, and the exit code.
struct Failure(Exit, String);

impl Failure {
    fn failed(msg: impl ToString) -> Failure {
        Failure(Exit::Failed, msg.to_string())
    }

    fn usage(msg: impl ToString) -> Failure {
        Failure(Exit::Usage, msg.to_string())
    }
}

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

    /// Where the manager listens: HOST:PORT or IP:PORT (a host name is
    /// resolved once, at start).
    #[arg(long, default_value = "127.0.0.1:10000", value_name = "ADDR", value_parser = parse_addr)]
    manager: SocketAddr,

    /// Address to serve chunks on, HOST:PORT or IP:PORT (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:0", value_name = "ADDR", value_parser = parse_addr)]
    listen: SocketAddr,

    /// Address other peers should connect to, if not the one the manager
    /// sees (behind NAT, or listening on 0.0.0.0).
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    advertise: Option<SocketAddr>,

    /// Cap on upload speed for all peers together, per second, with a unit:
    /// 20MiB, 500KB, 1.5GB (a bare number is refused).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    upload_limit: Option<u64>,

    /// Most peers one download fetches from at once (in a swarm, the more
    /// of the others it sees, the fewer chunks it asks the seeder for that
    /// another downloader already has).
    #[arg(long, default_value_t = 16, value_name = "N")]
    max_peers: usize,

    /// Most peers served at once.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_conns: usize,

    /// When peers are turned away at --max-conns, one served this many
    /// seconds is told Busy and makes room (it comes back later).
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    rotate_after: u64,

    /// Seconds between checks of the folder for new or changed files.
    #[arg(long, default_value_t = 5, value_name = "SECS")]
    rescan: u64,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics
    /// (downloads, bytes served and fetched per source, hash failures, RSS;
    /// see docs/METRICS.md). GET only, one request per connection, at most
    /// 16 at once. Unauthenticated: bind it to loopback or a private address.
    #[arg(long, value_name = "ADDR", value_parser = parse_addr)]
    metrics: Option<SocketAddr>,

    /// More log output (-v debug, -vv trace). One-shot commands log only
    /// warnings and errors unless -v is given.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    quiet: u8,

    /// Write the log to this file instead of stderr.
    #[arg(long, value_name = "PATH", global = true)]
    log_file: Option<PathBuf>,

    /// The network key (the 52 letters `manager --key-file` printed):
    /// every connection is then sealed. Also read from SHOAL_KEY.
    #[arg(long, value_name = "KEY", global = true, conflicts_with = "key_file")]
    key: Option<String>,

    /// Read the network key from this file (raw, or the printed form).
    #[arg(long, value_name = "PATH", global = true)]
    key_file: Option<PathBuf>,

    /// Accept only a manager that proves this static key (as the manager
    /// prints it at start). Without it, the first key a manager at
    /// --manager proves is recorded in DIR/.shoal/managers and another key
    /// there later is refused; give the new key here to accept it.
    #[arg(long, value_name = "KEY", global = true, value_parser = parse_peer_key)]
    manager_key: Option<PeerKey>,

    /// Serve only the peers whose public keys (`peer --show-id`) this file
    /// lists, one a line (the manager's --allow format); reread when it
    /// changes, and a key removed from it loses its connections. Needs a key.
    #[arg(long, value_name = "FILE", global = true)]
    allow: Option<PathBuf>,

    /// Print this peer's public key (its identity, kept in
    /// DIR/.shoal/identity; made on first use) and exit. Put it in the
    /// manager's --allow file to admit this peer.
    #[arg(long)]
    show_id: bool,

    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Download each NAME from the network into DIR (all at once), print a
    /// summary for each, and exit.
    Get {
        /// File names as the network lists them (see `peer files`); quote a
        /// name with spaces for the shell: get 'my file.txt'.
        #[arg(value_parser = parse_name, required = true, num_args = 1..)]
        names: Vec<FileName>,
        /// Fetch only this version (64 hex digits, as `files` shows the start
        /// of); only with a single NAME.
        #[arg(long, value_parser = parse_hash)]
        hash: Option<Hash>,
        /// Keep running and sharing after the download.
        #[arg(long)]
        seed: bool,
        /// Print each finished download as one JSON document instead:
        /// {"name":S,"size":N,"root":HEX,"fetched_bytes":N,"seconds":F,"sources":N}.
        #[arg(long)]
        json: bool,
    },
    /// Print the live peers and exit, without joining.
    Peers {
        /// Print one JSON document instead: {"peers":[{"id":N,"addr":"IP:PORT"}]}.
        #[arg(long)]
        json: bool,
    },
    /// Print the files on the network and exit, without joining.
    Files {
        /// Print one JSON document instead:
        /// {"files":[{"name":S,"size":N,"root":HEX,"holders":N}]}.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let no_args = std::env::args_os().len() == 1;
    let mut args = Args::parse();
    let one_shot = matches!(
        args.command,
        Some(Cmd::Get { seed: false, .. } | Cmd::Peers { .. } | Cmd::Files { .. })
    );
    let result = shoal::logging::init(
        shoal::logging::level(args.verbose, args.quiet, one_shot),
        args.log_file.as_deref(),
    )
    .map_err(Failure::usage)
    .and_then(|()| {
        if no_args {
            ask_like_the_original(&mut args).map_err(Failure::usage)?;
        }
        run(args)
    });
    match result {
        Ok(()) => Exit::Success.into(),
        Err(Failure(code, msg)) => {
            eprintln!("peer: {}", shoal::text::sanitize_lines(&msg));
            code.into()
        }
    }
}

fn run(args: Args) -> Result<(), Failure> {
    use shoal::net::noise::{Identity, Keys};
    if args.show_id {
        let dir = args
            .dir
            .ok_or_else(|| Failure::usage("--show-id needs the peer's folder: pass --dir DIR"))?;
        let id = shoal::peer::identity(&dir).map_err(Failure::failed)?;
        println!("{}", id.public());
        return Ok(());
    }
    let network = shoal::cli::network_key(args.key.as_deref(), args.key_file.as_deref())
        .map_err(Failure::usage)?;
    // A one-shot question proves the folder's identity when given --dir
    // (a manager with --allow admits only listed keys), else a fresh one.
    let dir_for_id = args.dir.clone();
    let query_keys =
        |network: &Option<shoal::net::noise::NetworkKey>| -> Result<Option<Keys>, Failure> {
            let Some(n) = network else {
                return Ok(None);
            };
            let identity = match &dir_for_id {
                Some(dir) => shoal::peer::identity(dir).map_err(Failure::failed)?,
                None => Identity::generate().map_err(Failure::failed)?,
            };
            Ok(Some(Keys {
                network: n.clone(),
                identity,
            }))
        };
    let mut json_summary = false;
    // A one-shot question checks the manager's key like a peer does when it
    // has a folder (--dir) or --manager-key.
    let pins = match &args.dir {
        Some(dir) if network.is_some() => {
            Some(shoal::store::FolderDirs::open(dir).map_err(Failure::failed)?)
        }
        _ => None,
    };
    let trust = (pins.as_ref(), args.manager_key);
    let mode = match args.command {
        Some(Cmd::Peers { json }) => {
            let keys = query_keys(&network)?;
            return query(args.manager, Query::ListPeers, json, keys, trust);
        }
        Some(Cmd::Files { json }) => {
            let keys = query_keys(&network)?;
            return query(args.manager, Query::ListFiles, json, keys, trust);
        }
        Some(Cmd::Get {
            names,
            hash,
            seed,
            json,
        }) => {
            if hash.is_some() && names.len() > 1 {
                return Err(Failure::usage(
                    "--hash names one version of one file: give a single NAME",
                ));
            }
            json_summary = json;
            let requests = names
                .into_iter()
                .map(|name| GetRequest { name, hash })
                .collect();
            Mode::Get { requests, seed }
        }
        None => Mode::Interactive,
    };
    let dir = args.dir.ok_or_else(|| {
        Failure::usage("no folder to share: pass --dir DIR (for example --dir peer1)")
    })?;
    let keys = match network {
        None => None,
        Some(network) => Some(Keys {
            network,
            identity: shoal::peer::identity(&dir).map_err(Failure::failed)?,
        }),
    };
    let allow = match (&args.allow, &keys) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(Failure::usage(
                "--allow needs a network key (--key-file or --key): peers prove their keys in the sealed handshake",
            ));
        }
        (Some(path), Some(_)) => {
            Some(shoal::net::allow::AllowList::load(path).map_err(Failure::usage)?)
        }
    };
    let config = NodeConfig {
        keys,
        allow,
        manager_key: args.manager_key,
        dir,
        manager: args.manager,
        listen: args.listen,
        advertise: args.advertise,
        upload_limit: args.upload_limit,
        max_peers: args.max_peers.max(1),
        max_conns: args.max_conns.max(1),
        rotate_after: Duration::from_secs(args.rotate_after.max(1)),
        rescan_interval: Duration::from_secs(args.rescan.max(1)),
        progress_bar: io::stderr().is_terminal() && args.log_file.is_none(),
    };
    let mut node = Node::new(config, mode).map_err(Failure::failed)?;
    if let Some(addr) = args.metrics {
        let bound = node.serve_metrics(addr).map_err(|e| {
            Failure::failed(format!(
                "cannot serve metrics on {addr}: {e} (pick another --metrics)"
            ))
        })?;
        log::info!("metrics at http://{bound}/metrics");
    }
    if json_summary {
        node.set_sink(Box::new(JsonSink));
    }
    node.run().map_err(Failure::failed)
}

fn query(
    manager: SocketAddr,
    q: Query,
    json: bool,
    keys: Option<shoal::net::noise::Keys>,
    (dirs, explicit): (Option<&shoal::store::FolderDirs>, Option<PeerKey>),
) -> Result<(), Failure> {
    let answer = shoal::peer::query::ask_checked(manager, q, keys.as_ref(), |key| {
        shoal::peer::check_manager_key(dirs, manager, key, explicit)
    })
    .map_err(Failure::failed)?;
    let text = match (answer, json) {
        (Answer::Peers(peers), false) => output::peer_entries(&peers, None),
        (Answer::Peers(peers), true) => output::peers_json(&peers),
        (Answer::PeerPage { peers, total }, false) => output::peer_page(&peers, total, None),
        (Answer::PeerPage { peers, total }, true) => output::peer_page_json(&peers, total),
        (Answer::Files(files), false) => output::network_files(&files),
        (Answer::Files(files), true) => output::files_json(&files),
    };
    // Last guard: names are escaped where they are formatted.
    let text = if json {
        text
    } else {
        shoal::text::sanitize_lines(&text).into_owned()
    };
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Failure::failed(format!("cannot write to stdout: {e}")))
}

/// The original asked for a port and a peer number; so do we when started bare.
fn parse_peer_key(text: &str) -> Result<PeerKey, String> {
    PeerKey::from_text(text.trim()).ok_or_else(|| {
        "a manager key is 52 letters a-z and digits 2-7 (as the manager prints it at start)"
            .to_string()
    })
}

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
