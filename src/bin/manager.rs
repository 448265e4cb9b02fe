//! `manager`: keeps the list of live shoal peers and tells every peer when it changes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use shoal::manager::RegistryConfig;
use shoal::manager::server::{Server, ServerConfig};

/// The shoal manager: accepts peer registrations, checks on a timer that
/// every peer's keepalives keep coming, drops the silent ones, and
/// broadcasts each change of the peer list to every peer. It also answers "who has this file" from the file lists
/// the peers report.
///
/// Commands on stdin: `peers`, `files`, `close` (or `c`). Stdin may be
/// closed or /dev/null; SIGINT or SIGTERM stops it cleanly.
#[derive(Parser, Debug)]
#[command(version, about, long_about, args_override_self = true)]
struct Args {
    /// Address to accept peers on: HOST:PORT or IP:PORT (a host name is
    /// resolved once, at start).
    #[arg(long, default_value = "127.0.0.1:10000", value_name = "ADDR", value_parser = shoal::cli::parse_addr)]
    listen: SocketAddr,

    /// Seconds between a peer's keepalives (told to each peer when it
    /// registers). The manager itself pings each peer only every 10
    /// heartbeats, so peers can tell a hung manager from a quiet one.
    #[arg(long, default_value_t = 2.0, value_name = "SECS", value_parser = positive_secs)]
    heartbeat: f64,

    /// Seconds a peer may stay silent (hung, stopped, cut off) before it is
    /// dropped from the list. Must exceed --heartbeat.
    #[arg(long, default_value_t = 6.0, value_name = "SECS", value_parser = positive_secs)]
    peer_timeout: f64,

    /// The full-list threshold. While the network has at most N peers, every
    /// peer gets the whole peer list on joining and every change after.
    /// Above N a peer gets only the count (again with each ping) and
    /// the departures of the peers it was told about when it asked who has
    /// a file; `peer peers` then shows one page and the total.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    full_list_limit: usize,

    /// Most simultaneous connections (peers and queries).
    #[arg(long, default_value_t = 4096, value_name = "N")]
    max_conns: usize,

    /// More log output (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Less log output (-q warnings only, -qq errors only).
    #[arg(short, long, action = clap::ArgAction::Count)]
    quiet: u8,

    /// Write the log to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_file: Option<PathBuf>,

    /// The network key's file: made (32 random bytes, mode 0600) if
    /// missing, and its copyable form printed once for the peers' --key.
    /// With a key every connection is sealed and only holders get in.
    #[arg(long, value_name = "PATH", conflicts_with = "key")]
    key_file: Option<PathBuf>,

    /// The network key in its printed form (also read from SHOAL_KEY).
    #[arg(long, value_name = "KEY")]
    key: Option<String>,

    /// The manager's own static key pair (its identity, which peers pin on
    /// first contact): made (mode 0600) if missing. Default: the key file's
    /// path with `.identity` appended; with --key alone, a fresh identity
    /// each start (peers that met an earlier one then refuse this one).
    #[arg(long, value_name = "PATH")]
    identity_file: Option<PathBuf>,

    /// Admit only the peers whose public keys (`peer --show-id`) this file
    /// lists, one a line; reread when it changes and on SIGHUP. Needs a key.
    #[arg(long, value_name = "FILE")]
    allow: Option<PathBuf>,

    /// Run without a key on a non-loopback address: anyone who can reach
    /// the port may join, and nothing on the wire is sealed.
    #[arg(long, conflicts_with_all = ["key", "key_file"])]
    open: bool,

    /// Serve Prometheus metrics over HTTP at http://ADDR/metrics (peers,
    /// joins, leaves, timeouts, bytes by frame kind, loop turn times,
    /// connections by state, RSS; see docs/METRICS.md). GET only, one
    /// request per connection, at most 16 at once. Unauthenticated: bind
    /// it to loopback or a private address.
    #[arg(long, value_name = "ADDR", value_parser = shoal::cli::parse_addr)]
    metrics: Option<SocketAddr>,
}

fn positive_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = shoal::logging::init(
        shoal::logging::level(args.verbose, args.quiet, false),
        args.log_file.as_deref(),
    ) {
        eprintln!("manager: {e}");
        return ExitCode::from(2);
    }
    let min_heartbeat = f64::from(shoal::wire::MIN_HEARTBEAT_MS) / 1000.0;
    if args.heartbeat < min_heartbeat {
        eprintln!(
            "manager: --heartbeat ({}) must be at least {min_heartbeat} s: peers send their keepalives no faster",
            args.heartbeat
        );
        return ExitCode::from(2);
    }
    if args.peer_timeout <= args.heartbeat {
        eprintln!(
            "manager: --peer-timeout ({}) must be longer than --heartbeat ({}), or live peers would be dropped",
            args.peer_timeout, args.heartbeat
        );
        return ExitCode::from(2);
    }
    let network = match &args.key_file {
        Some(path) => match shoal::net::noise::NetworkKey::load_or_create(path) {
            Ok((key, created)) => {
                if created {
                    println!(
                        "made a network key in {}; give it to each peer as --key or SHOAL_KEY:\n{}",
                        path.display(),
                        key.to_text()
                    );
                }
                Some(key)
            }
            Err(e) => {
                eprintln!("manager: {e}");
                return ExitCode::from(2);
            }
        },
        None if args.open => None,
        None => match shoal::cli::network_key(args.key.as_deref(), None) {
            Ok(key) => key,
            Err(e) => {
                eprintln!("manager: {e}");
                return ExitCode::from(2);
            }
        },
    };
    if network.is_none() && !args.open && !args.listen.ip().is_loopback() {
        eprintln!(
            "manager: refusing to listen on {} without a network key: anyone who can reach it could join and read everything.\n\
             Make a key with --key-file PATH (created if missing; give what it prints to each peer as --key or SHOAL_KEY),\n\
             or pass --open to run an open network knowingly.",
            args.listen
        );
        return ExitCode::from(2);
    }
    let allow = match (&args.allow, &network) {
        (None, _) => None,
        (Some(_), None) => {
            eprintln!(
                "manager: --allow needs a network key (--key-file or --key): peers prove their keys in the sealed handshake"
            );
            return ExitCode::from(2);
        }
        (Some(path), Some(_)) => match shoal::net::allow::AllowList::load(path) {
            Ok(list) => Some(list),
            Err(e) => {
                eprintln!("manager: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let identity_file = args.identity_file.clone().or_else(|| {
        args.key_file.as_ref().map(|k| {
            let mut p = k.clone().into_os_string();
            p.push(".identity");
            PathBuf::from(p)
        })
    });
    let keys = match network {
        None => None,
        Some(network) => {
            let identity = match &identity_file {
                Some(path) => shoal::net::noise::Identity::load_or_create(path),
                None => {
                    log::warn!(
                        "no --identity-file: this manager has a new identity each start, and peers that met an earlier one will refuse it"
                    );
                    shoal::net::noise::Identity::generate().map_err(|e| e.to_string())
                }
            };
            match identity {
                Ok(identity) => {
                    log::info!(
                        "manager key {} (peers may pin it with --manager-key)",
                        identity.public()
                    );
                    Some(shoal::net::noise::Keys { network, identity })
                }
                Err(e) => {
                    eprintln!("manager: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    };
    let config = ServerConfig {
        keys,
        allow,
        listen: args.listen,
        registry: RegistryConfig {
            heartbeat: Duration::from_secs_f64(args.heartbeat),
            peer_timeout: Duration::from_secs_f64(args.peer_timeout),
            full_list_limit: args.full_list_limit,
            ..RegistryConfig::default()
        },
        max_conns: args.max_conns,
        metrics: args.metrics,
    };
    let server = match Server::bind(config) {
        Ok(s) => s,
        Err(e) => {
            let what = match args.metrics {
                Some(m) => format!("{} (or --metrics {m})", args.listen),
                None => args.listen.to_string(),
            };
            eprintln!(
                "manager: cannot listen on {what}: {e} (is another manager running? pick another --listen)"
            );
            return ExitCode::from(1);
        }
    };
    match server.local_addr() {
        Ok(addr) => log::info!("manager listening on {addr}"),
        Err(e) => log::warn!("listening, but cannot read the local address: {e}"),
    }
    if let Some(Ok(addr)) = server.metrics_addr() {
        log::info!("metrics at http://{addr}/metrics");
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("manager: event loop failed: {e}");
            ExitCode::from(1)
        }
    }
}
