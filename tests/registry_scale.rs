//! The registry core at a million members, no sockets: resident memory
//! stays under the 256 MiB. Its own test binary, so the process's
//! high-water mark is this test's alone. (Speed is in `benches/registry.rs`
//! and `examples/registry_scale.rs`, never asserted here.)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use shoal::manager::registry::{Registry, RegistryConfig};
use shoal::net::ConnId;
use shoal::wire::{Message, PROTOCOL_VERSION, Role};

/// A field of /proc/self/status in KiB (Linux), `None` elsewhere.
fn status_kib(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
#[cfg_attr(debug_assertions, ignore = "a million joins: run with --release")]
fn a_million_members_fit_in_256_mib() {
    let Some(before) = status_kib("VmHWM:") else {
        panic!("no /proc/self/status: this test needs Linux");
    };
    let n = 1_000_000;
    let start = Instant::now();
    let mut now = start;
    let mut r = Registry::new(RegistryConfig::default());
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
        now = start + Duration::from_nanos(i as u64 * 1_000);
        if r.poll_timeout().is_some_and(|t| t <= now) {
            r.handle_timeout(now);
        }
        while r.poll_action().is_some() {}
    }
    r.handle_timeout(now + r.config().broadcast_delay);
    while r.poll_action().is_some() {}
    assert_eq!(r.member_count(), n);
    let after = status_kib("VmHWM:").unwrap_or(u64::MAX);
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!("a million members: VmHWM grew {grown_mib} MiB");
    assert!(grown_mib < 256, "{grown_mib} MiB for a million members");
}
