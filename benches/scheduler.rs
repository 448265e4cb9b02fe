//! Scheduler decisions per second: a whole download's worth of requests,
//! arrivals and verifications through the pure core, no sockets, with many
//! sources and many chunks. One "element" is one chunk fetched.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use shoal::peer::scheduler::{Action, Arrival, Scheduler, SchedulerConfig, SourceId};

/// Runs a download of `chunks` chunks from `sources` sources that answer
/// every request in order, 10 µs of virtual time apart.
fn run_download(chunks: u32, sources: u32) -> u64 {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = Scheduler::new(
        vec![32 << 10; chunks as usize],
        &[],
        SchedulerConfig::default(),
    );
    let mut queues: Vec<std::collections::VecDeque<u32>> =
        vec![Default::default(); sources as usize];
    for id in 0..sources {
        s.add_source(SourceId(id), now);
    }
    let mut decisions = 0u64;
    while !s.is_complete() {
        while let Some(action) = s.poll_action() {
            decisions += 1;
            if let Action::Request { source, index } = action {
                queues[source.0 as usize].push_back(index);
            }
        }
        for (id, q) in queues.iter_mut().enumerate() {
            if let Some(index) = q.pop_front() {
                now += Duration::from_micros(10);
                let source = SourceId(id as u32);
                if s.handle_chunk_arrived(source, index, now) == Arrival::Verify {
                    s.handle_chunk_verified(source, index, now);
                }
            }
        }
    }
    decisions
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler");
    group.sample_size(10);
    for (chunks, sources) in [(32_768u32, 1u32), (32_768, 8), (65_536, 64)] {
        group.throughput(Throughput::Elements(u64::from(chunks)));
        group.bench_with_input(
            BenchmarkId::new("download", format!("{chunks}chunks-{sources}sources")),
            &(chunks, sources),
            |b, &(chunks, sources)| b.iter(|| run_download(chunks, sources)),
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
