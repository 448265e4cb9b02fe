//! Running out of descriptors is a refusal, not a wedge: the real manager
//! under a low `ulimit -n`, more clients arriving than it can hold. Those
//! over the limit are told Busy, its member and the clients it holds keep
//! being served, and newcomers get in once others leave.

mod common;

use std::process::Command;
use std::time::Duration;

use common::raw::{self, RawConn, kind, role};
use common::*;

/// The manager with at most `fds` open descriptors.
fn manager_with_fd_limit(fds: u32) -> (Proc, std::net::SocketAddr) {
    let mut cmd = Command::new("sh");
    cmd.args([
        "-c",
        &format!("ulimit -n {fds} && exec \"$0\" \"$@\""),
        manager_bin(),
        "--listen",
        "127.0.0.1:0",
        "--heartbeat",
        "0.5",
        "--peer-timeout",
        "3",
        "-v",
    ]);
    let proc = Proc::spawn_cmd(cmd);
    let mut addr = None;
    wait_for(WAIT, "the manager to listen", || {
        addr = proc
            .stderr
            .text()
            .lines()
            .find_map(|l| l.split("manager listening on ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        addr.is_some()
    });
    (proc, addr.unwrap())
}

/// Busy, admitted (the manager's Hello and no error), or nothing at all.
fn admitted(c: &mut RawConn) -> Option<bool> {
    match c.recv(Duration::from_secs(3)) {
        Ok(Some(f)) if f.kind == kind::HELLO => Some(true),
        Ok(Some(f)) => match f.error() {
            Some((5, _)) => Some(false),
            other => panic!("unexpected answer {other:?}"),
        },
        Ok(None) | Err(_) => None,
    }
}

#[test]
fn clients_over_the_descriptor_limit_are_refused_and_the_manager_recovers() {
    let (manager, addr) = manager_with_fd_limit(40);
    let dir = tempfile::tempdir().unwrap();
    let member = Peer::start(dir.path(), addr, &[]);
    wait_for(WAIT, "the member to be listed", || {
        network_peers(addr) == vec![member.addr]
    });

    // Far more clients than 40 descriptors allow.
    let mut held = Vec::new();
    let mut busy = 0;
    for _ in 0..60 {
        let mut c = RawConn::hello(addr, role::MANAGER_CLIENT).expect("connect");
        match admitted(&mut c) {
            Some(true) => held.push(c),
            Some(false) => busy += 1,
            None => panic!("a client got neither a Hello nor Busy"),
        }
    }
    assert!(busy > 0, "every one of 60 clients fit in 40 descriptors?");
    assert!(!held.is_empty());

    // Those it holds are still served, and so is its member.
    let asker = held.last_mut().unwrap();
    asker.send(&raw::list_peers()).unwrap();
    assert!(
        asker.recv_kind(kind::PEER_LIST, WAIT).is_some(),
        "a held client got no peer list"
    );
    assert!(
        !manager.stderr.text().contains("left"),
        "the member was dropped while the manager was full"
    );

    // Once some leave, a newcomer gets in and sees the member.
    held.truncate(held.len() / 2);
    std::thread::sleep(Duration::from_millis(300));
    wait_for(WAIT, "a newcomer to be admitted", || {
        RawConn::hello(addr, role::MANAGER_CLIENT)
            .ok()
            .and_then(|mut c| admitted(&mut c))
            == Some(true)
    });
    assert_eq!(network_peers(addr), vec![member.addr]);
    drop(held);
}
