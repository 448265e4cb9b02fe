//! The manager core at its limits, no sockets: the cost of one request to
//! the loop (a WhoHas on the most contested name, a ShareFiles of the most
//! files one registration may share, a FileList page), of N joins at 10^4
//! to 10^6 (above the default full-list limit: joiners get the count), of
//! joins with everyone following the full list (10^3, 10^4), and of one
//! timer tick with nothing due at 10^4 and 10^6 members (it must not grow
//! with N). Each request's answer is also encoded, as the shell would.
//! Resident memory at 10^6: `tests/registry_scale.rs`,
//! `examples/registry_scale.rs`.

use std::net::SocketAddr;
use std::time::Instant;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use shoal::manager::registry::{Action, Registry, RegistryConfig};
use shoal::net::ConnId;
use shoal::wire::{
    self, FileName, FileSummary, Hash, MAX_HOLDER_GROUPS, MAX_SHARED_FILES, Message,
    PROTOCOL_VERSION, Role,
};

fn remote(i: usize) -> SocketAddr {
    SocketAddr::new([10, (i >> 16) as u8, (i >> 8) as u8, i as u8].into(), 4000)
}

fn join(r: &mut Registry, i: usize, now: Instant) {
    let conn = ConnId(i);
    r.handle_connected(conn, now);
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        role: Role::ManagerClient,
    };
    r.handle_message(conn, remote(i), hello, now);
    let register = Message::Register {
        listen_port: 7000,
        advertise: None,
    };
    r.handle_message(conn, remote(i), register, now);
}

/// Sends every queued frame through the encoder, as the shell would.
fn drain(r: &mut Registry, out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    while let Some(action) = r.poll_action() {
        match action {
            Action::Send(_, msg) => {
                out.clear();
                wire::encode(&msg, out);
                n += out.len();
            }
            // Shared frames (join lists, deltas) are encoded by the shell
            // once per connection; the core only hands out the same list.
            Action::SendShared(_, msgs) => n += msgs.len(),
            Action::Broadcast(conns, msgs) => n += conns.len() * msgs.len(),
            Action::Close(_) => {}
        }
    }
    n
}

fn files(prefix: &str, n: usize, root: u8) -> Vec<FileSummary> {
    (0..n)
        .map(|i| FileSummary {
            name: FileName::new(&format!("{prefix}-{i:06}-{}", "x".repeat(200))).unwrap(),
            size: i as u64,
            root: Hash([root; 32]),
        })
        .collect()
}

/// 2,000 registrations: "hot" under 1,000 versions (one per registration,
/// the most a registration may add) and 1,000 holding the same version,
/// each also sharing 10 other files; registration 0 shares the full limit.
fn contested(now: Instant) -> Registry {
    let mut r = Registry::new(RegistryConfig::default());
    let hot = FileName::new("hot").unwrap();
    for i in 0..2_000 {
        join(&mut r, i, now);
        let mut set = files(&format!("p{i}"), 10, 1);
        let root = if i < 1_000 { (i % 251) as u8 } else { 0xff };
        let size = if i < 1_000 { i as u64 } else { 7 };
        set.push(FileSummary {
            name: hot.clone(),
            size,
            root: Hash([root; 32]),
        });
        r.handle_message(
            ConnId(i),
            remote(i),
            Message::ShareFiles { files: set },
            now,
        );
    }
    let big = files("big", MAX_SHARED_FILES, 3);
    r.handle_message(
        ConnId(0),
        remote(0),
        Message::ShareFiles { files: big },
        now,
    );
    let mut out = Vec::new();
    drain(&mut r, &mut out);
    r
}

fn bench_requests(c: &mut Criterion) {
    let now = Instant::now();
    let mut r = contested(now);
    let mut out = Vec::new();
    let mut group = c.benchmark_group("registry-request");
    group.sample_size(20);

    group.bench_function("who-has-1000-versions", |b| {
        b.iter(|| {
            let name = FileName::new("hot").unwrap();
            r.handle_message(ConnId(5), remote(5), Message::WhoHas { name }, now);
            drain(&mut r, &mut out)
        })
    });
    let (groups, truncated) = r.holders(&FileName::new("hot").unwrap());
    assert!(truncated && groups.len() == MAX_HOLDER_GROUPS);

    group.bench_function("list-files-page", |b| {
        b.iter(|| {
            r.handle_message(
                ConnId(5),
                remote(5),
                Message::ListFiles { after: None },
                now,
            );
            drain(&mut r, &mut out)
        })
    });

    // Full churn at the limit: registration 0 swaps between two disjoint
    // sets of 4,096 long names, so every ShareFiles removes and adds all.
    let sets = [
        files("a", MAX_SHARED_FILES, 4),
        files("b", MAX_SHARED_FILES, 5),
    ];
    let mut k = 0;
    group.bench_function("share-files-4096-churn", |b| {
        b.iter_batched(
            || {
                k += 1;
                sets[k % 2].clone()
            },
            |files| {
                r.handle_message(ConnId(0), remote(0), Message::ShareFiles { files }, now);
                drain(&mut r, &mut out)
            },
            BatchSize::LargeInput,
        )
    });

    // An honest re-share: the same 4,096 files with one of them changed.
    let mut edited = sets[k % 2].clone();
    group.bench_function("share-files-4096-one-edit", |b| {
        b.iter_batched(
            || {
                edited[0].size += 1;
                edited.clone()
            },
            |files| {
                r.handle_message(ConnId(0), remote(0), Message::ShareFiles { files }, now);
                drain(&mut r, &mut out)
            },
            BatchSize::LargeInput,
        )
    });
    group.finish();
}

fn bench_joins(c: &mut Criterion) {
    bench_joins_with(
        c,
        "registry-joins",
        &[10_000, 100_000, 1_000_000],
        RegistryConfig::default(),
    );
}

/// The same joins with every member following the full list (the limit
/// above N): the cost the threshold avoids, at the sizes that finish.
fn bench_joins_full_lists(c: &mut Criterion) {
    let config = RegistryConfig {
        full_list_limit: usize::MAX,
        ..RegistryConfig::default()
    };
    bench_joins_with(c, "registry-joins-full-lists", &[1_000, 10_000], config);
}

/// N joins into a fresh registry and the broadcast window after them, the
/// bytes of every frame they queue counted.
fn bench_joins_with(c: &mut Criterion, group: &str, sizes: &[usize], config: RegistryConfig) {
    let mut group = c.benchmark_group(group);
    group.sample_size(10);
    for &n in sizes {
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                let now = Instant::now();
                let mut r = Registry::new(config);
                let mut out = Vec::new();
                let mut bytes = 0;
                for i in 0..n {
                    join(&mut r, i, now);
                    bytes += drain(&mut r, &mut out);
                }
                r.handle_timeout(now + r.config().broadcast_delay);
                bytes + drain(&mut r, &mut out)
            })
        });
    }
    group.finish();
}

/// One timer tick with N members, none due: independent of N.
fn bench_idle_tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry-idle-tick");
    for n in [10_000usize, 1_000_000] {
        let now = Instant::now();
        let mut r = Registry::new(RegistryConfig::default());
        let mut out = Vec::new();
        for i in 0..n {
            join(&mut r, i, now);
            drain(&mut r, &mut out);
        }
        let later = now + r.config().broadcast_delay;
        r.handle_timeout(later);
        drain(&mut r, &mut out);
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                r.handle_timeout(later);
                drain(&mut r, &mut out)
            })
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    bench_requests,
    bench_joins,
    bench_joins_full_lists,
    bench_idle_tick
);
criterion_main!(benches);
