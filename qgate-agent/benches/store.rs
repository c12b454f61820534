//! Cost of the store writer per statement: a pgbench `-S`-like stream (8
//! sessions, one repeated text, each statement completed) written through
//! [`Writer`] into a fresh file, as the agent writes it (sealing included).
//!
//! `cargo bench -p qgate-agent --bench store`; the time criterion reports
//! is the process's CPU time (user + system, all threads: the sender's and
//! the writer's), not wall time, so "elements per second" reads as
//! statements per CPU-second, and a change to the writer as a ratio against
//! a baseline run on the same machine (`--save-baseline` / `--baseline`).
#[path = "../tests/store_support/mod.rs"]
mod store_support;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgate_agent::store::{Store, Writer, WriterConfig};
use store_support::*;

const SESSIONS: u64 = 8;
/// Enough for the WAL to pass SQLite's automatic checkpoint (1000 pages)
/// several times, as it does every few seconds on a live host.
const STATEMENTS: u64 = 100_000;

/// pgbench -S over the extended protocol: one text, repeated.
fn prepared(i: u64) -> String {
    let _ = i;
    "SELECT abalance FROM pgbench_accounts WHERE aid = $1;".to_owned()
}

/// pgbench -S over the simple protocol: the literal differs every time.
fn simple(i: u64) -> String {
    format!(
        "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
        (i * 7919) % 100_000 + 1
    )
}

fn events(text: fn(u64) -> String) -> Vec<qgate_agent::wire::WireEvent> {
    let mut events = Vec::new();
    for c in 0..SESSIONS {
        events.push(opened(c, T0));
        events.push(identified(c, "bench", "postgres", "pgbench", T0 + MS));
    }
    for i in 0..STATEMENTS {
        let (c, seq) = (i % SESSIONS, i / SESSIONS + 1);
        let at = T0 + 2 * MS + i as i64 * 10_000;
        events.push(received(c, seq, &text(i), at));
        events.push(completed_ok(c, seq, "SELECT 1", Some(1), at + 5_000));
    }
    events
}

/// This process's CPU time so far, every thread's.
fn cpu_time() -> Duration {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn writer(c: &mut Criterion) {
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(STATEMENTS));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    for (name, text) in [
        (
            "pgbench -S stream, written and sealed",
            prepared as fn(u64) -> String,
        ),
        (
            "pgbench -S simple protocol (literal texts), written and sealed",
            simple,
        ),
    ] {
        let events = events(text);
        group.bench_function(name, |b| {
            b.iter_custom(|iterations| {
                let mut spent = Duration::ZERO;
                for _ in 0..iterations {
                    let dir = tempfile::tempdir().expect("temp dir");
                    let writer = Writer::spawn(
                        Store::open(dir.path().join("qgate.sqlite")).expect("store"),
                        // All of it is sent at once: the queue holds it.
                        WriterConfig {
                            queue: 1 << 20,
                            ..WriterConfig::default()
                        },
                    )
                    .expect("writer");
                    let started = cpu_time();
                    for event in events.iter().cloned() {
                        assert!(writer.send(event));
                    }
                    writer.flush();
                    spent += cpu_time() - started;
                    writer.shutdown().expect("shutdown");
                }
                spent
            })
        });
    }
    group.finish();
}

criterion_group!(benches, writer);
criterion_main!(benches);
