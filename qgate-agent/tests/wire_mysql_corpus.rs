//! The MySQL decoder (`wire::mysql`) against the corpus's MySQL captures:
//! every COM_QUERY and COM_STMT_PREPARE text must agree with
//! `queries-by-tshark.tsv`, an independent decoder's output, except where
//! tshark is known to be wrong (listed below, each checked by hand); and no
//! capture may make it panic.
use std::{collections::HashMap, path::Path};

mod corpus_support;
use corpus_support::{corpus, tshark_rows};

use qgate_agent::{
    capture::{pcap::read_segments, Segment},
    flow::{Direction, Flow},
    wire::{
        mysql::{conversation::Carrier, Conversation, Framer, MysqlEvent},
        tcp::{Delivery, StreamReassembler},
    },
};

const PORTS: &[u16] = &[3306, 20130, 30130, 6033, 2883];

/// Statements tshark 4.0 does not decode (its README says so), checked by
/// hand: the MySQL 9 client sends `SELECT version()` with an empty query
/// attribute block (count 0, one set), and the server answers one row.
const TSHARK_MISSES: &[(&str, usize, &str, &str)] = &[(
    "zeek/mysql/mysql-9.0.0-query-attributes.pcap",
    0,
    "COM_QUERY",
    "SELECT version()",
)];

fn mysql_captures(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for dir in ["deepflow/mysql", "zeek/mysql"] {
        let mut files: Vec<String> = std::fs::read_dir(root.join(dir))
            .expect("corpus directory is readable")
            .map(|e| format!("{dir}/{}", e.expect("entry").file_name().to_string_lossy()))
            .filter(|f| f.ends_with(".pcap") || f.ends_with(".pcapng"))
            .collect();
        files.sort();
        out.extend(files);
    }
    out.push("ndpi/mysql.pcapng".into());
    out
}

/// As tshark prints SQL (see `wire_corpus.rs`): newlines and tabs escaped,
/// a character outside ASCII as U+FFFD, and the text cut at its first NUL
/// (tshark reads the query as a C string; the server, and qgate, read the
/// whole payload: `deepflow/mysql/binary-in-sql.pcap` has a `_binary`
/// literal with NUL bytes, and what follows them is part of the statement).
fn as_tshark_prints(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\0' => break,
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_ascii() => out.push(c),
            _ => out.push(char::REPLACEMENT_CHARACTER),
        }
    }
    out
}

struct Connection {
    number: usize,
    client: (StreamReassembler, Framer),
    server: (StreamReassembler, Framer),
    conversation: Conversation,
}

/// (stream number, message, text) of every statement, and every event.
fn decode(segments: &[Segment]) -> (Vec<(usize, &'static str, String)>, Vec<MysqlEvent>) {
    let mut conns: HashMap<Flow, Connection> = HashMap::new();
    let mut found = Vec::new();
    let mut all = Vec::new();
    for seg in segments {
        let count = conns.len();
        let c = conns.entry(seg.flow).or_insert_with(|| Connection {
            number: count,
            client: (StreamReassembler::new(), Framer::client()),
            server: (StreamReassembler::new(), Framer::server()),
            conversation: if seg.is_syn() {
                Conversation::new()
            } else {
                Conversation::mid_stream()
            },
        });
        let to_server = seg.direction == Direction::ToServer;
        let (tcp, framer) = if to_server {
            &mut c.client
        } else {
            &mut c.server
        };
        let mut frames = Vec::new();
        tcp.push(
            seg.seq,
            seg.is_syn(),
            &seg.payload,
            seg.truncated,
            &mut |d| match d {
                Delivery::Data { offset, bytes } => {
                    framer.push(offset, bytes, &mut |f| frames.push(f))
                }
                Delivery::Gap { .. } => framer.gap(),
            },
        );
        let mut events = Vec::new();
        for frame in frames {
            match frame {
                Ok(f) if to_server => {
                    c.conversation.client(&f, &mut events);
                }
                Ok(f) => c.conversation.server(&f, &mut events),
                Err(error) => events.push(MysqlEvent::Undecodable {
                    side: if to_server { "client" } else { "server" },
                    error,
                }),
            }
        }
        for e in &events {
            if let MysqlEvent::Statement {
                carrier,
                text: Some(text),
                ..
            } = e
            {
                let message = match carrier {
                    Carrier::Query => "COM_QUERY",
                    Carrier::Prepare => "COM_STMT_PREPARE",
                    Carrier::Execute => continue,
                };
                found.push((c.number, message, as_tshark_prints(text)));
            }
        }
        all.extend(events);
    }
    (found, all)
}

#[test]
fn query_and_prepare_texts_agree_with_tshark_on_every_mysql_capture() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    let expected = tshark_rows(&corpus, "mysql");
    let (mut checked, mut statements) = (0, 0);
    let mut differences = Vec::new();
    for file in mysql_captures(&pcap_dir) {
        let segments =
            read_segments(&pcap_dir.join(&file), PORTS).unwrap_or_else(|e| panic!("{file}: {e}"));
        let (mut ours, _) = decode(&segments);
        let mut theirs: Vec<(usize, &'static str, String)> = expected
            .get(&file)
            .map(|rows| {
                rows.iter()
                    .map(|(s, m, t)| {
                        let m = if m == "COM_QUERY" {
                            "COM_QUERY"
                        } else {
                            "COM_STMT_PREPARE"
                        };
                        (*s, m, t.clone())
                    })
                    .collect()
            })
            .unwrap_or_default();
        theirs.extend(
            TSHARK_MISSES
                .iter()
                .filter(|(f, ..)| *f == file)
                .map(|&(_, s, m, t)| (s, m, t.to_owned())),
        );
        ours.sort_by_key(|(s, _, _)| *s);
        theirs.sort_by_key(|(s, _, _)| *s);
        statements += ours.len();
        if ours != theirs {
            differences.push(format!("{file}:\n  ours   {ours:?}\n  tshark {theirs:?}"));
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} MySQL captures found");
    assert!(
        differences.is_empty(),
        "{} of {checked} captures differ ({statements} statements decoded):\n{}",
        differences.len(),
        differences.join("\n")
    );
}

#[test]
fn a_whole_session_reads_as_its_events() {
    let Some(corpus) = corpus() else { return };
    let file = "zeek/mysql/change-user-success.pcap";
    let segments = read_segments(&corpus.join("pcap").join(file), PORTS).unwrap();
    let events: Vec<_> = decode(&segments)
        .1
        .into_iter()
        .filter(|e| !matches!(e, MysqlEvent::NoBackslashEscapes(_)))
        .collect();
    assert_eq!(
        events[..4],
        [
            MysqlEvent::Greeting {
                version: "8.4.2".into(),
                connection_id: 17
            },
            MysqlEvent::Login {
                user: "root".into(),
                database: None,
                program: None,
                collation: 255,
                server_collation: Some(255),
            },
            MysqlEvent::LoggedIn,
            MysqlEvent::ChangeUser {
                user: "root2".into(),
                database: None
            },
        ],
        "{events:?}"
    );
    // The new user's authentication exchange is not read as commands, and
    // the session goes on under it.
    assert!(events.contains(&MysqlEvent::LoggedIn));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, MysqlEvent::Undecodable { .. })),
        "{events:?}"
    );
}

#[test]
fn postgresql_read_as_mysql_yields_no_statement_and_nothing_panics() {
    let Some(corpus) = corpus() else { return };
    let pcap_dir = corpus.join("pcap");
    let mut checked = 0;
    let mut undecodable = 0;
    for dir in ["zeek/postgresql", "deepflow/postgre", "suricata-verify"] {
        let Ok(entries) = std::fs::read_dir(pcap_dir.join(dir)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("entry").path();
            let file = path.display().to_string();
            let Ok(segments) = read_segments(&path, &[5432, 8000, 15432]) else {
                continue;
            };
            let events = decode(&segments).1;
            let mysql = file.contains("mysql-on-port-5432");
            let statements = events
                .iter()
                .filter(|e| matches!(e, MysqlEvent::Statement { .. }))
                .count();
            assert!(
                mysql || statements == 0,
                "{file}: PostgreSQL read as {statements} MySQL statements: {events:?}"
            );
            undecodable += events
                .iter()
                .filter(|e| matches!(e, MysqlEvent::Undecodable { .. }))
                .count();
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} PostgreSQL captures");
    assert!(undecodable >= checked / 2, "{undecodable} of {checked}");
}

fn tracked(file: &str) -> Vec<qgate_agent::wire::WireEvent> {
    let Some(corpus) = corpus() else {
        return Vec::new();
    };
    let segments = read_segments(&corpus.join("pcap").join(file), PORTS).unwrap();
    let mut tracker = qgate_agent::wire::Tracker::new();
    tracker.set_mysql_ports(PORTS);
    let mut events = Vec::new();
    for seg in &segments {
        tracker.on_segment(seg, &mut events);
    }
    let end = segments.last().map_or(0, |s| s.at);
    tracker.close_all(end, &mut events);
    events
}

#[test]
fn mysql_sessions_become_the_wire_events_postgresql_ones_do() {
    use qgate_agent::wire::{Outcome, ProtocolPath, WireEvent};
    if corpus().is_none() {
        return;
    }
    // A whole session of the `mysql` client: login, two reads, quit.
    let events = tracked("deepflow/mysql/mysql-error.pcap");
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "connection_opened",
            "identified",
            // The login OK's status: backslashes escape.
            "server_report",
            "statement_received",
            "statement_completed",
            "statement_received",
            "statement_completed",
            "connection_closed"
        ]
    );
    let WireEvent::Identified { identity, .. } = &events[1] else {
        panic!()
    };
    assert_eq!(identity.user.as_deref(), Some("root"));
    assert_eq!(identity.application.as_deref(), Some("mysql"));
    let WireEvent::StatementReceived { text, path, .. } = &events[5] else {
        panic!()
    };
    assert_eq!(
        (text.as_str(), *path),
        ("SELECT DATABASE()", ProtocolPath::Simple)
    );
    let WireEvent::StatementCompleted { completion, .. } = &events[6] else {
        panic!()
    };
    assert_eq!(
        (completion.outcome.clone(), completion.rows),
        (Outcome::Ok, Some(1))
    );
    // A prepared INSERT, executed: the execute is the statement, with the
    // prepared text and its id.
    let events = tracked("deepflow/mysql/mysql-exec.pcap");
    let received: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            WireEvent::StatementReceived {
                text,
                path,
                statement_name,
                ..
            } => Some((text.clone(), *path, statement_name.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(received.len(), 1, "{received:?}");
    assert!(received[0].0.starts_with("INSERT INTO `controller`"));
    assert_eq!(received[0].1, ProtocolPath::Extended);
    assert!(received[0].2.is_some());
    // Every MySQL capture: each statement reported is completed exactly once.
    let corpus = corpus().unwrap();
    for file in mysql_captures(&corpus.join("pcap")) {
        let events = tracked(&file);
        let mut open = std::collections::BTreeSet::new();
        for e in &events {
            match e {
                WireEvent::StatementReceived { conn, stmt, .. } => {
                    assert!(open.insert((*conn, *stmt)), "{file}: {e:?} twice")
                }
                WireEvent::StatementCompleted { conn, stmt, .. } => {
                    assert!(
                        open.remove(&(*conn, *stmt)),
                        "{file}: {e:?} without its statement"
                    )
                }
                _ => {}
            }
        }
        assert!(open.is_empty(), "{file}: never completed: {open:?}");
    }
}
