//! The registry core at scale, no sockets: N joins (default 1,000,000) with
//! every action drained as the shell would, one broadcast window and one
//! sweep, then the time taken and the process's resident memory (VmRSS and
//! VmHWM from /proc/self/status). The target: 10^6 joins in under
//! 10 s with resident state under 256 MiB.
//!
//! `cargo run --release --example registry_scale [-- N]`

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal::manager::registry::{Action, Registry, RegistryConfig};
use shoal::net::ConnId;
use shoal::wire::{Message, PROTOCOL_VERSION, Role};

fn status(field: &str) -> String {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    text.lines().find(|l| l.starts_with(field)).map_or_else(
        || format!("{field} ?"),
        |l| l.split_whitespace().collect::<Vec<_>>().join(" "),
    )
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    println!("before: {}, {}", status("VmRSS"), status("VmHWM"));
    let start = Instant::now();
    let mut r = Registry::new(RegistryConfig::default());
    let mut now = start;
    let mut frames = 0usize;
    for i in 0..n {
        let conn = ConnId(i);
        let remote = SocketAddr::new([10, (i >> 16) as u8, (i >> 8) as u8, i as u8].into(), 4000);
        r.handle_connected(conn, now);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION,
            role: Role::ManagerClient,
        };
        r.handle_message(conn, remote, hello, now);
        let register = Message::Register {
            listen_port: 7000,
            advertise: None,
        };
        r.handle_message(conn, remote, register, now);
        frames += drain(&mut r);
        // The burst spread over 1 s of virtual time (timers fire; nobody
        // sends a keepalive, but 1 s is inside the peer timeout).
        now = start + Duration::from_nanos(i as u64 * 1_000_000_000 / n as u64);
        if r.poll_timeout().is_some_and(|t| t <= now) {
            r.handle_timeout(now);
            frames += drain(&mut r);
        }
    }
    let joined = start.elapsed();
    now += r.config().broadcast_delay;
    r.handle_timeout(now);
    frames += drain(&mut r);
    println!(
        "{n} joins in {:.2} s ({:.0} joins/s), {} members, {frames} frames queued",
        joined.as_secs_f64(),
        n as f64 / joined.as_secs_f64(),
        r.member_count()
    );
    println!("after:  {}, {}", status("VmRSS"), status("VmHWM"));
    let t = Instant::now();
    r.handle_timeout(now + Duration::from_millis(1));
    drain(&mut r);
    println!("one idle tick: {:?}", t.elapsed());
}

/// Frames the shell would send: each queued frame once per connection.
fn drain(r: &mut Registry) -> usize {
    let mut n = 0;
    while let Some(a) = r.poll_action() {
        n += match a {
            Action::Send(..) => 1,
            Action::SendShared(_, m) => m.len(),
            Action::Broadcast(c, m) => c.len() * m.len(),
            Action::Close(_) => 0,
        };
    }
    n
}
