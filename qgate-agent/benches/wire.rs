//! Throughput of the wire stage (reassembly, decoding, pairing) on synthetic
//! pgbench-like traffic cut at 1448 bytes, both directions.
//!
//! `cargo bench -p qgate-agent --bench wire`; criterion reports statements
//! per second on one core.
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qgate_agent::{
    capture::Segment,
    flow::{Direction, Flow},
    wire::{Tracker, WireEvent},
};

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Cuts a byte stream into MSS-sized segments.
fn segments(flow: Flow, dir: Direction, seq: &mut u32, at: &mut i64, bytes: &[u8]) -> Vec<Segment> {
    bytes
        .chunks(1448)
        .map(|chunk| {
            *at += 1000;
            let s = Segment {
                flow,
                direction: dir,
                seq: *seq,
                tcp_flags: 0x18,
                at: *at,
                payload: chunk.to_vec(),
                truncated: false,
                held: false,
                refused: false,
                tcp_header: Vec::new(),
            };
            *seq = seq.wrapping_add(chunk.len() as u32);
            s
        })
        .collect()
}

/// `connections` pgbench-like clients (`-M prepared`: Bind/Execute/Sync
/// per statement) plus a simple SELECT returning `rows` 100-byte rows.
fn workload(connections: u16, transactions: usize, rows: usize) -> Vec<Segment> {
    let server: SocketAddr = "10.0.0.1:5432".parse().expect("address");
    let mut all = Vec::new();
    let mut at = 0;
    for c in 0..connections {
        let flow = Flow {
            client: SocketAddr::new("10.0.0.2".parse().expect("address"), 30000 + c),
            server,
        };
        let (mut cseq, mut sseq) = (1000u32, 9000u32);
        all.push(Segment {
            flow,
            direction: Direction::ToServer,
            seq: cseq - 1,
            tcp_flags: 0x02,
            at,
            payload: Vec::new(),
            truncated: false,
            held: false,
            refused: false,
            tcp_header: Vec::new(),
        });
        let mut startup = 196_608u32.to_be_bytes().to_vec();
        startup.extend_from_slice(b"user\0bench\0database\0bench\0\0");
        let mut first = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
        first.extend(startup);
        let parse =
            b"P0_1\0UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2\0\0\0"
                .to_vec();
        first.extend(msg(b'P', &parse));
        all.extend(segments(
            flow,
            Direction::ToServer,
            &mut cseq,
            &mut at,
            &first,
        ));
        let mut reply = msg(b'R', &[0, 0, 0, 0]);
        reply.extend(msg(b'Z', b"I"));
        all.extend(segments(
            flow,
            Direction::FromServer,
            &mut sseq,
            &mut at,
            &reply,
        ));
        let bind = msg(b'B', b"\0P0_1\0\0\0\0\x02\0\0\0\x0212\0\0\0\x043456\0\0");
        let execute = msg(b'E', b"\0\0\0\0\0");
        let sync = msg(b'S', b"");
        let answer = [msg(b'2', b""), msg(b'C', b"UPDATE 1\0"), msg(b'Z', b"T")].concat();
        let row = msg(b'D', &[&[0u8, 1, 0, 0, 0, 94][..], &[b'x'; 94]].concat());
        let select_answer: Vec<u8> = std::iter::once(msg(
            b'T',
            &[
                0, 1, b'x', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        ))
        .chain(std::iter::repeat_n(row, rows))
        .chain([
            msg(b'C', format!("SELECT {rows}\0").as_bytes()),
            msg(b'Z', b"I"),
        ])
        .collect::<Vec<_>>()
        .concat();
        for _ in 0..transactions {
            let request = [bind.clone(), execute.clone(), sync.clone()].concat();
            all.extend(segments(
                flow,
                Direction::ToServer,
                &mut cseq,
                &mut at,
                &request,
            ));
            all.extend(segments(
                flow,
                Direction::FromServer,
                &mut sseq,
                &mut at,
                &answer,
            ));
            let q = msg(b'Q', b"SELECT * FROM pgbench_accounts LIMIT 100\0");
            all.extend(segments(flow, Direction::ToServer, &mut cseq, &mut at, &q));
            all.extend(segments(
                flow,
                Direction::FromServer,
                &mut sseq,
                &mut at,
                &select_answer,
            ));
        }
    }
    all
}

/// Feeds every segment to a fresh tracker; returns the statements completed.
fn run(segs: &[Segment]) -> u64 {
    let mut tracker = Tracker::new();
    let mut events = Vec::with_capacity(1024);
    let mut statements = 0u64;
    for s in segs {
        tracker.on_segment(s, &mut events);
        statements += events
            .iter()
            .filter(|e| matches!(e, WireEvent::StatementCompleted { .. }))
            .count() as u64;
        events.clear();
    }
    statements
}

fn tracker_throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    group.sample_size(10);
    for (name, segs, statements) in [
        ("100-row results", workload(20, 200, 100), 20 * 200 * 2),
        ("1-row results", workload(20, 1000, 1), 20 * 1000 * 2),
    ] {
        assert_eq!(run(&segs), statements, "{name}: every statement completes");
        group.throughput(Throughput::Elements(statements));
        group.bench_function(name, |b| b.iter(|| run(&segs)));
    }
    group.finish();
}

criterion_group!(benches, tracker_throughput);
criterion_main!(benches);
