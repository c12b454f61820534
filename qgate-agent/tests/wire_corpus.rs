//! Golden tests of the wire stage over the shared capture corpus
//! (`$QGATE_CORPUS/pcap`, see its README.md).
//!
//! * Every query-carrying client message (Query text, Parse text) decoded
//!   from a PostgreSQL capture must agree with `queries-by-tshark.tsv`, an
//!   independent decoder's output.
//! * The [`Tracker`]'s events for each PostgreSQL capture must match
//!   `tests/golden/<dir>__<file>.expected.jsonl` (statement texts are stored
//!   as length + FNV-1a hash so that no corpus content lands in this repo).
//!   Regenerate with `QGATE_BLESS=1` after checking the differences.
//! * MySQL captures, fed through the PostgreSQL decoder on their own ports,
//!   must not panic and must not yield a single statement.
//!
//! Intended differences from tshark: none for the PostgreSQL captures. The
//! TLS sessions (`ndpi/pgsql2.pcapng`, `suricata-verify/pgsql-upgrade-tls`,
//! `zeek/postgresql/psql-aws-ssl-{preferred,require}*`) have no rows in the
//! TSV either; here they must produce `encrypted` and no statement. In
//! `ndpi/pgsql.pcap` the server answers two GSSENCRequests with `G`, which
//! §55.2.11 defines as acceptance (the corpus README calls them refused): the
//! clients then hang up, and those connections are reported `encrypted`.
use std::{collections::HashMap, fmt::Write as _, path::Path};

mod corpus_support;
use corpus_support::{corpus, tshark_rows};

use qgate_agent::{
    capture::{
        pcap::{read_segments, SegmentReader},
        Segment,
    },
    flow::{Direction, Flow},
    wire::{
        pg::{Decoded, FrontendDecoder, FrontendMessage},
        tcp::{Delivery, StreamReassembler},
        ProtocolPath, Tracker, WireEvent,
    },
};

/// The database ports of a capture (README: "Ports that need decode-as").
fn ports(file: &str) -> &'static [u16] {
    match file {
        "deepflow/postgre/pgsql-all.pcap" => &[8000],
        "ndpi/pgsql2.pcapng" => &[60102],
        f if f.ends_with("-15432.pcap") => &[15432],
        f if is_mysql(f) => &[3306, 20130, 30130, 6033, 2883],
        _ => &[5432],
    }
}

fn is_mysql(file: &str) -> bool {
    file.contains("/mysql/") || file == "ndpi/mysql.pcapng"
}

fn captures(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("corpus directory is readable")
            .map(|e| e.expect("corpus directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, root, out);
            } else if path
                .extension()
                .is_some_and(|e| e == "pcap" || e == "pcapng")
            {
                let rel = path.strip_prefix(root).expect("under the corpus root");
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

/// tshark prints newlines and tabs in SQL as `\n` / `\t`, and every
/// non-ASCII byte as U+FFFD (it decodes pgsql strings as ASCII: the UTF-8
/// Chinese comments of `deepflow/postgre/pgsql-all.pcap` come out as one
/// replacement character per byte). That is the one intended difference.
fn as_tshark_prints(text: &[u8]) -> String {
    let mut out = String::with_capacity(text.len());
    for &b in text {
        match b {
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            0..=0x7f => out.push(char::from(b)),
            _ => out.push(char::REPLACEMENT_CHARACTER),
        }
    }
    out
}

/// (stream number in order of first sight, message, text) of every Query
/// and Parse, decoded with the wire stage's own reassembler and decoder.
fn decoded_query_messages(segments: &[Segment]) -> Vec<(usize, &'static str, String)> {
    struct Stream {
        number: usize,
        tcp: StreamReassembler,
        decoder: FrontendDecoder,
    }
    let mut streams: HashMap<Flow, Stream> = HashMap::new();
    let mut found = Vec::new();
    for seg in segments {
        let count = streams.len();
        let stream = streams.entry(seg.flow).or_insert_with(|| Stream {
            number: count,
            tcp: StreamReassembler::new(),
            decoder: if seg.is_syn() {
                FrontendDecoder::new()
            } else {
                FrontendDecoder::mid_stream()
            },
        });
        if seg.direction != Direction::ToServer {
            continue;
        }
        let Stream {
            number,
            tcp,
            decoder,
        } = stream;
        tcp.push(
            seg.seq,
            seg.is_syn(),
            &seg.payload,
            seg.truncated,
            &mut |d| match d {
                Delivery::Data { offset, bytes } => decoder.push(offset, bytes, &mut |m| {
                    if let Decoded::Message { message, .. } = m {
                        match message {
                            FrontendMessage::Query { text } => {
                                found.push((*number, "Q", as_tshark_prints(text)))
                            }
                            FrontendMessage::Parse { text, .. } => {
                                found.push((*number, "Parse", as_tshark_prints(text)))
                            }
                            _ => {}
                        }
                    }
                }),
                Delivery::Gap { .. } => decoder.gap(),
            },
        );
    }
    found
}

fn tracker_events(segments: &[Segment]) -> Vec<WireEvent> {
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in segments {
        tracker.on_segment(seg, &mut events);
    }
    let end = segments.last().map_or(0, |s| s.at);
    tracker.close_all(end, &mut events);
    // Session reports are for the gate, never stored.
    events.retain(|e| !matches!(e, WireEvent::ServerReport { .. }));
    events
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One event per line; statement texts reduced to length and hash.
fn golden_lines(events: &[WireEvent]) -> String {
    let mut out = String::new();
    for event in events {
        let mut value = serde_json::to_value(event).expect("events serialise");
        if let Some(text) = value.get_mut("text") {
            let s = text.as_str().unwrap_or_default();
            *text = format!("{} bytes, fnv1a {:016x}", s.len(), fnv1a(s.as_bytes())).into();
        }
        writeln!(out, "{value}").expect("writing to a String");
    }
    out
}

#[test]
fn query_and_parse_texts_agree_with_tshark_on_every_postgresql_capture() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    let expected = tshark_rows(&corpus, "pgsql");
    let mut checked = 0;
    for file in captures(&pcap_dir) {
        if is_mysql(&file) {
            continue;
        }
        let segments = read_segments(&pcap_dir.join(&file), ports(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let mut ours = decoded_query_messages(&segments);
        let mut theirs: Vec<(usize, &'static str, String)> = expected
            .get(&file)
            .map(|rows| {
                rows.iter()
                    .map(|(s, m, t)| (*s, if m == "Q" { "Q" } else { "Parse" }, t.clone()))
                    .collect()
            })
            .unwrap_or_default();
        // Per connection in stream order; tshark numbers connections as we do
        // (first sight), but orders rows by frame across connections.
        ours.sort_by_key(|(s, _, _)| *s);
        theirs.sort_by_key(|(s, _, _)| *s);
        assert_eq!(ours, theirs, "{file}: decoded Query/Parse texts differ");
        checked += 1;
    }
    assert!(checked >= 37, "only {checked} PostgreSQL captures found");
}

#[test]
fn tracker_events_match_the_golden_files() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    let golden_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let bless = std::env::var_os("QGATE_BLESS").is_some();
    let mut mismatches = Vec::new();
    for file in captures(&pcap_dir) {
        if is_mysql(&file) {
            continue;
        }
        let segments = read_segments(&pcap_dir.join(&file), ports(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let actual = golden_lines(&tracker_events(&segments));
        let golden = golden_dir.join(format!("{}.expected.jsonl", file.replace('/', "__")));
        if bless {
            std::fs::create_dir_all(&golden_dir).expect("creating tests/golden");
            std::fs::write(&golden, &actual).expect("writing a golden file");
            continue;
        }
        let expected = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with QGATE_BLESS=1)", golden.display()));
        if expected != actual {
            mismatches.push(format!(
                "{file}:\n--- expected\n{expected}--- actual\n{actual}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

#[test]
fn simple_query_statements_are_exactly_the_tshark_query_rows() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    let expected = tshark_rows(&corpus, "pgsql");
    for file in captures(&pcap_dir) {
        if is_mysql(&file) {
            continue;
        }
        let segments = read_segments(&pcap_dir.join(&file), ports(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let events = tracker_events(&segments);
        let mut simple = Vec::new();
        let mut extended = Vec::new();
        for event in &events {
            if let WireEvent::StatementReceived { text, path, .. } = event {
                let text = as_tshark_prints(text.as_bytes());
                match path {
                    ProtocolPath::Simple => simple.push(text),
                    ProtocolPath::Extended => extended.push(text),
                }
            }
        }
        let rows = expected.get(&file).cloned().unwrap_or_default();
        let mut queries: Vec<String> = rows
            .iter()
            .filter(|(_, m, _)| m == "Q")
            .map(|(_, _, t)| t.clone())
            .collect();
        let parses: Vec<&String> = rows
            .iter()
            .filter(|(_, m, _)| m == "Parse")
            .map(|(_, _, t)| t)
            .collect();
        simple.sort();
        queries.sort();
        assert_eq!(simple, queries, "{file}: simple-query statements");
        for text in &extended {
            assert!(
                parses.contains(&text),
                "{file}: executed text {text:?} was never parsed"
            );
        }
    }
}

#[test]
fn mysql_captures_fed_to_the_postgresql_decoder_yield_no_statement() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    for file in captures(&pcap_dir) {
        if !is_mysql(&file) {
            continue;
        }
        let mut reader = SegmentReader::open(&pcap_dir.join(&file), ports(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let segments: Vec<Segment> = reader
            .by_ref()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(
            reader.stats().segments > 0,
            "{file}: no segment on ports {:?}",
            ports(&file)
        );
        let events = tracker_events(&segments);
        let statements = events
            .iter()
            .filter(|e| matches!(e, WireEvent::StatementReceived { .. }))
            .count();
        assert_eq!(statements, 0, "{file}: MySQL decoded as PostgreSQL");
        assert!(
            events
                .iter()
                .any(|e| matches!(e, WireEvent::Undecodable { .. })),
            "{file}: MySQL bytes not reported undecodable"
        );
    }
}
