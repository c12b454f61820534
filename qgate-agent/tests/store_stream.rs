//! The audit stream: every record once, in the export's shape, across
//! JSONL rotations; running statements wait until they are final; the
//! cursor survives a restart; syslog messages are RFC 5424 with the record
//! as JSON. (A real rsyslog receiving a psql session is tested end to end
//! in tests/tests/capture.rs.)
mod store_support;

use std::{collections::BTreeMap, path::Path, time::Duration};

use qgate_agent::store::{
    stream::{StreamConfig, Streamer},
    Store, Writer, WriterConfig,
};
use store_support::*;

fn streamer(db: &Path, config: &StreamConfig) -> Streamer {
    Streamer::open(Store::open(db).unwrap().into_conn(), config).unwrap()
}

/// Every JSON line of `path` and its rotated files, oldest first.
fn lines(path: &Path, keep: u32) -> Vec<serde_json::Value> {
    let mut files: Vec<std::path::PathBuf> = (1..=keep)
        .rev()
        .map(|n| path.with_extension(format!("jsonl.{n}")))
        .collect();
    files.push(path.to_owned());
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| {
            text.lines()
                .map(|l| serde_json::from_str(l).expect("a JSON line"))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_record_arrives_once_across_rotations_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let out = dir.path().join("audit.jsonl");
    let config = StreamConfig {
        jsonl: Some(out.clone()),
        jsonl_max_bytes: 4096,
        jsonl_keep: 100,
        syslog: None,
        syslog_facility: "authpriv".into(),
    };
    // The stream starts at the store's end: opened before anything is written.
    let mut stream = streamer(&db, &config);
    // Now, not the fixtures' 2024: a statement running for long is given up on.
    let t0 = qgate_agent::clock::now();
    let writer = Writer::spawn(Store::open(&db).unwrap(), WriterConfig::default()).unwrap();
    let mut events = vec![opened(1, t0), identified(1, "alice", "shop", "psql", t0)];
    for seq in 1..=60u64 {
        let at = t0 + seq as i64 * MS;
        events.push(received(1, seq, &format!("SELECT {seq} FROM orders"), at));
        if seq != 7 {
            events.push(completed_ok(1, seq, "SELECT 1", Some(1), at + 1));
        }
    }
    for e in events {
        assert!(writer.send(e));
    }
    writer.flush();
    let sent = stream.pass().unwrap();
    let got = lines(&out, 100);
    assert_eq!(got.len(), sent);
    let statements: Vec<i64> = got
        .iter()
        .filter(|r| r["record"] == "statement")
        .map(|r| r["statement_id"].as_i64().unwrap())
        .collect();
    assert_eq!(statements.len(), 59, "all but the running one");
    let running = statements.iter().all(|id| *id != 7);
    assert!(running, "statement 7 has not completed");
    let rotated = (1..=100)
        .filter(|n| out.with_extension(format!("jsonl.{n}")).exists())
        .count();
    assert!(rotated >= 2, "rotated {rotated} times");
    for r in got.iter().filter(|r| r["record"] == "statement") {
        assert_eq!(r["user"], "alice", "{r}");
        assert!(r["text"].as_str().unwrap().starts_with("SELECT "), "{r}");
        assert!(r["received_at"].is_string(), "the export's fields: {r}");
    }

    // Statement 7 completes; a restart resumes at the cursor.
    let writer2 = writer;
    assert!(writer2.send(completed_ok(1, 7, "SELECT 1", Some(1), t0 + 99 * MS)));
    assert!(writer2.send(closed(1, t0 + 100 * MS)));
    writer2.shutdown().unwrap();
    drop(stream);
    let mut stream = streamer(&db, &config);
    stream.pass().unwrap();
    let got = lines(&out, 100);
    let mut seen: BTreeMap<i64, usize> = BTreeMap::new();
    for r in got.iter().filter(|r| r["record"] == "statement") {
        *seen.entry(r["statement_id"].as_i64().unwrap()).or_default() += 1;
    }
    assert_eq!(seen.len(), 60, "every statement");
    assert!(seen.values().all(|n| *n == 1), "each once: {seen:?}");
    let audit: Vec<&serde_json::Value> = got.iter().filter(|r| r["record"] == "audit").collect();
    assert!(
        audit.iter().any(|r| r["kind"] == "store.seal"),
        "the seal entries are audit records too: {audit:?}"
    );
    let ids: Vec<i64> = audit.iter().map(|r| r["id"].as_i64().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(ids, sorted, "audit entries once, in order");
    assert_eq!(stream.pass().unwrap(), 0, "nothing new, nothing again");
}

#[test]
fn syslog_messages_are_rfc5424_with_the_record_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let listener = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let config = StreamConfig {
        syslog: Some(format!("udp:{}", listener.local_addr().unwrap())),
        syslog_facility: "local3".into(),
        jsonl_max_bytes: 4096,
        jsonl_keep: 1,
        ..Default::default()
    };
    let mut stream = streamer(&db, &config);
    let writer = Writer::spawn(Store::open(&db).unwrap(), WriterConfig::default()).unwrap();
    for e in [
        opened(1, T0),
        identified(1, "bob", "crm", "app", T0),
        received(1, 1, "DELETE FROM t WHERE id = 1", T0 + MS),
        completed_ok(1, 1, "DELETE 1", Some(1), T0 + 2 * MS),
    ] {
        assert!(writer.send(e));
    }
    writer.flush();
    assert!(stream.pass().unwrap() >= 1);
    let mut buf = [0u8; 65536];
    let n = listener.recv(&mut buf).unwrap();
    let message = std::str::from_utf8(&buf[..n]).unwrap();
    // <PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG; local3 (19) * 8 + info (6).
    let parts: Vec<&str> = message.splitn(8, ' ').collect();
    assert_eq!(parts[0], "<158>1", "{message}");
    assert!(
        time::OffsetDateTime::parse(parts[1], &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{message}"
    );
    assert_eq!(parts[3], "qgate-agent");
    assert_eq!(parts[5], "statement");
    assert_eq!(parts[6], "-");
    let record: serde_json::Value = serde_json::from_str(parts[7]).unwrap();
    assert_eq!(record["record"], "statement");
    assert_eq!(record["text"], "DELETE FROM t WHERE id = 1");
    assert_eq!(record["user"], "bob");
    writer.shutdown().unwrap();
}
