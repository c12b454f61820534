//! Random and mutated input, split at random places: the wire stage must
//! never panic, and a valid stream must decode the same however it is split.
use std::net::SocketAddr;

use qgate_agent::{
    capture::Segment,
    flow::{Direction, Flow},
    wire::{
        pg::{BackendDecoder, FrontendDecoder},
        Tracker,
    },
};

/// xorshift64* (Vigna 2016): fixed seed, reproducible runs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Up to `max - 1` random bytes.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max);
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// A plausible client stream: startup, then simple and extended traffic.
fn client_stream() -> Vec<u8> {
    let params = b"user\0alice\0database\0shop\0\0";
    let mut s = (8 + params.len() as u32).to_be_bytes().to_vec();
    s.extend_from_slice(&196_608u32.to_be_bytes());
    s.extend_from_slice(params);
    s.extend(msg(b'Q', b"SELECT 1; DELETE FROM t\0"));
    s.extend(msg(b'P', b"s1\0UPDATE t SET a = $1\0\0\x01\0\0\0\x17"));
    s.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
    s.extend(msg(b'D', b"P\0"));
    s.extend(msg(b'E', b"\0\0\0\0\0"));
    s.extend(msg(b'S', b""));
    s.extend(msg(b'd', b"copy data\n"));
    s.extend(msg(b'c', b""));
    s.extend(msg(b'X', b""));
    s
}

fn server_stream() -> Vec<u8> {
    let mut s = msg(b'R', &[0, 0, 0, 0]);
    s.extend(msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
    s.extend(msg(b'Z', b"I"));
    s.extend(msg(
        b'T',
        &[
            0, 1, b'a', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ],
    ));
    s.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'1']));
    s.extend(msg(b'C', b"DELETE 3\0"));
    s.extend(msg(b'E', b"SERROR\0C42P01\0Mno\0\0"));
    s.extend(msg(b'1', b""));
    s.extend(msg(b'2', b""));
    s.extend(msg(b'C', b"UPDATE 1\0"));
    s.extend(msg(b'Z', b"T"));
    s
}

/// Cuts `bytes` at random points.
fn random_split<'a>(rng: &mut Rng, bytes: &'a [u8]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = 1 + rng.below(rest.len().min(64));
        let (a, b) = rest.split_at(n);
        chunks.push(a);
        rest = b;
    }
    chunks
}

fn decode_frontend(chunks: &[&[u8]], mid_stream: bool) -> Vec<String> {
    let mut d = if mid_stream {
        FrontendDecoder::mid_stream()
    } else {
        FrontendDecoder::new()
    };
    let mut out = Vec::new();
    let mut offset = 0;
    for c in chunks {
        d.push(offset, c, &mut |m| out.push(format!("{m:?}")));
        offset += c.len() as u64;
    }
    out
}

fn decode_backend(chunks: &[&[u8]], mid_stream: bool) -> Vec<String> {
    let mut d = if mid_stream {
        BackendDecoder::mid_stream()
    } else {
        BackendDecoder::new()
    };
    let mut out = Vec::new();
    let mut offset = 0;
    for c in chunks {
        d.push(offset, c, &mut |m| out.push(format!("{m:?}")));
        offset += c.len() as u64;
    }
    out
}

fn mutate(rng: &mut Rng, bytes: &[u8]) -> Vec<u8> {
    let mut m = bytes.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(m.len());
        match rng.below(4) {
            0 => m[at] = rng.next() as u8,
            1 => m[at] ^= 1 << rng.below(8),
            2 => {
                let junk = rng.bytes(8);
                m.splice(at..at, junk);
            }
            _ => {
                let end = (at + rng.below(8)).min(m.len());
                m.drain(at..end);
            }
        }
    }
    m
}

#[test]
fn a_valid_stream_decodes_the_same_however_it_is_split() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let client = client_stream();
    let server = server_stream();
    let whole_client = decode_frontend(&[&client], false);
    let whole_server = decode_backend(&[&server], false);
    assert!(whole_client.len() > 8 && !whole_client.iter().any(|m| m.starts_with("Error")));
    assert!(whole_server.len() > 8 && !whole_server.iter().any(|m| m.starts_with("Error")));
    for _ in 0..2000 {
        assert_eq!(
            decode_frontend(&random_split(&mut rng, &client), false),
            whole_client
        );
        assert_eq!(
            decode_backend(&random_split(&mut rng, &server), false),
            whole_server
        );
    }
}

#[test]
fn random_and_mutated_bytes_never_panic_the_decoders() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let client = client_stream();
    let server = server_stream();
    for i in 0..5000 {
        let random = rng.bytes(300);
        let mutated_client = mutate(&mut rng, &client);
        let mutated_server = mutate(&mut rng, &server);
        let mid_stream = i % 2 == 0;
        for input in [&random, &mutated_client, &mutated_server] {
            let chunks = random_split(&mut rng, input);
            decode_frontend(&chunks, mid_stream);
            decode_backend(&chunks, mid_stream);
        }
    }
}

#[test]
fn random_segments_never_panic_the_tracker() {
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    let server: SocketAddr = "10.0.0.1:5432".parse().expect("address");
    let client_stream = client_stream();
    let server_stream = server_stream();
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    let mut at = 0;
    for i in 0..20_000 {
        let port = 40_000 + rng.below(8) as u16;
        let flow = Flow {
            client: SocketAddr::new("10.0.0.2".parse().expect("address"), port),
            server,
        };
        let direction = if rng.below(2) == 0 {
            Direction::ToServer
        } else {
            Direction::FromServer
        };
        let payload = match rng.below(4) {
            0 => rng.bytes(200),
            1 => {
                let source = if direction == Direction::ToServer {
                    &client_stream
                } else {
                    &server_stream
                };
                let from = rng.below(source.len());
                let to = (from + rng.below(100)).min(source.len());
                source[from..to].to_vec()
            }
            2 => Vec::new(),
            _ => mutate(&mut rng, &client_stream),
        };
        let seq = if rng.below(3) == 0 {
            rng.next() as u32
        } else {
            (u32::MAX - 500).wrapping_add(rng.below(2000) as u32)
        };
        let flags = match rng.below(10) {
            0 => 0x02,
            1 => 0x01 | 0x10,
            2 => 0x04,
            _ => 0x10,
        };
        at += rng.below(1_000_000) as i64;
        let segment = Segment {
            flow,
            direction,
            seq,
            tcp_flags: flags,
            at,
            payload,
            truncated: rng.below(20) == 0,
            held: false,
            refused: false,
            tcp_header: Vec::new(),
        };
        tracker.on_segment(&segment, &mut events);
        if i % 1000 == 999 {
            tracker.expire_idle(at, std::time::Duration::from_millis(500), &mut events);
            events.clear();
        }
    }
    tracker.close_all(at, &mut events);
    assert!(tracker.is_empty());
}
