//! `qgate-agent replay` and `audit export` as a security team would run them
//! on a capture none of us made.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

mod corpus_support;

fn corpus_pcap(name: &str) -> Option<PathBuf> {
    corpus_support::corpus_file(&format!("pcap/suricata-verify/{name}"))
}

/// [`replay`] of `PCAP` into `DB` (after `extra`), which must succeed; its summary.
fn replay_ok(pcap: &Path, db: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = extra.iter().map(std::ffi::OsStr::new).collect();
    args.extend([
        std::ffi::OsStr::new("--pcap"),
        pcap.as_os_str(),
        std::ffi::OsStr::new("--db"),
        db.as_os_str(),
    ]);
    let (ok, summary, err) = replay(&args);
    assert!(ok, "{summary}{err}");
    summary
}

/// `qgate-agent audit export --format jsonl --db DB`, one value per row.
fn export(db: &Path) -> Vec<serde_json::Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .args(["audit", "export", "--format", "jsonl", "--db"])
        .arg(db)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn replaying_a_capture_stores_every_statement_with_its_outcome() {
    let Some(pcap) = corpus_pcap("pgsql-simple-query-rollback__input.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("replay.sqlite");
    let summary = replay_ok(&pcap, &db, &[]);
    assert!(
        summary.contains("22 statements (22 answered, 5 with an error)"),
        "{summary}"
    );

    let rows = export(&db);
    assert_eq!(rows.len(), 22);
    assert!(rows
        .iter()
        .all(|r| r["user"] == "ju-Test" && r["database"] == "Test"));
    let delete = rows
        .iter()
        .find(|r| {
            r["text"]
                .as_str()
                .is_some_and(|t| t.starts_with("DELETE FROM new_table"))
        })
        .expect("the DELETE is exported");
    assert_eq!(delete["path"], "simple");
    assert_eq!(
        rows.iter().filter(|r| r["outcome"] == "error").count(),
        5,
        "errors carried through"
    );
}

fn replay(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .arg("replay")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn replay_keeps_to_a_store_of_its_own_marks_its_rows_and_never_replays_twice() {
    let Some(corpus) = corpus_pcap("pgsql-simple-query-rollback__input.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pcap = dir.path().join("incident.pcap");
    std::fs::copy(&corpus, &pcap).unwrap();
    let (ok, out, err) = replay(&["--pcap".as_ref(), pcap.as_os_str()]);
    assert!(ok, "{out}{err}");
    assert!(
        !out.contains("PcapStats") && !out.contains("{"),
        "plain words: {out}"
    );
    // Beside the capture, not /var/lib/qgate.
    let own = dir.path().join("incident.pcap.qgate.sqlite");
    assert!(out.contains(&own.display().to_string()), "{out}");
    let conn = rusqlite::Connection::open(&own).unwrap();
    let (rows, marked): (i64, i64) = conn
        .query_row(
            "SELECT count(*), count(c.replayed_from) FROM statements s
             JOIN connections c ON c.id = s.connection_id",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, marked), (22, 22), "every row says it was replayed");
    let from: String = conn
        .query_row("SELECT DISTINCT replayed_from FROM connections", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(from, "incident.pcap");

    // The same file again: refused, nothing stored twice.
    let (ok, _, err) = replay(&["--pcap".as_ref(), pcap.as_os_str()]);
    assert!(!ok);
    assert!(
        err.contains("replayed into") && err.contains("already"),
        "{err}"
    );
    let again: i64 = conn
        .query_row("SELECT count(*) FROM statements", [], |r| r.get(0))
        .unwrap();
    assert_eq!(again, 22);
}

#[test]
fn replay_says_plainly_what_is_wrong_with_its_input() {
    let Some(corpus) = corpus_pcap("pgsql-simple-query-rollback__input.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.sqlite");
    // A missing file.
    let (ok, _, err) = replay(&[
        "--pcap".as_ref(),
        dir.path().join("nope.pcap").as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("cannot read") && err.contains("nope.pcap"),
        "{err}"
    );
    // Not a capture.
    let text = dir.path().join("notes.pcap");
    std::fs::write(&text, "just some notes\n").unwrap();
    let (ok, _, err) = replay(&[
        "--pcap".as_ref(),
        text.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("not a pcap or pcapng file"), "{err}");
    // The wrong port: nothing useful was done.
    let (ok, _, err) = replay(&[
        "--pcap".as_ref(),
        corpus.as_os_str(),
        "--port".as_ref(),
        "6543".as_ref(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("no PostgreSQL traffic on port 6543") && err.contains("--port"),
        "{err}"
    );
    // Cut short in the middle of a packet: what came before is replayed,
    // and the exit says the capture is damaged.
    let bytes = std::fs::read(&corpus).unwrap();
    let cut = dir.path().join("cut.pcap");
    std::fs::write(&cut, &bytes[..bytes.len() - 7]).unwrap();
    let (ok, out, err) = replay(&["--pcap".as_ref(), cut.as_os_str()]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("middle of a packet") || err.contains("damaged"),
        "{err}"
    );
}

#[test]
fn export_refuses_an_empty_time_range_and_ends_quietly_on_a_closed_pipe() {
    let Some(corpus) = corpus_pcap("pgsql-simple-query-rollback__input.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("r.sqlite");
    let (ok, _, err) = replay(&[
        "--pcap".as_ref(),
        corpus.as_os_str(),
        "--db".as_ref(),
        db.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .args([
            "audit",
            "export",
            "--since",
            "2026-02-01",
            "--until",
            "2026-01-01",
        ])
        .env("QGATE_DB", &db)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--since must come before --until"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `| head -1`: the reader goes away; no panic, no error text.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "QGATE_DB={} {} audit export | head -1 >/dev/null; {} audit verify --db {} | head -0",
            db.display(),
            env!("CARGO_BIN_EXE_qgate-agent"),
            env!("CARGO_BIN_EXE_qgate-agent"),
            db.display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !err.contains("panicked") && !err.contains("Broken pipe"),
        "{err}"
    );
}

#[test]
fn a_mysql_capture_replays_with_its_port_named() {
    let Some(pcap) = corpus_support::corpus_file("pcap/deepflow/mysql/mysql-error.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("replay.sqlite");
    replay_ok(&pcap, &db, &["--mysql-port", "20130"]);
    let rows = export(&db);
    let texts: Vec<&str> = rows.iter().filter_map(|r| r["text"].as_str()).collect();
    assert_eq!(
        texts,
        ["select @@version_comment limit 1", "SELECT DATABASE()"]
    );
    assert!(rows
        .iter()
        .all(|r| r["user"] == "root" && r["application"] == "mysql" && r["server_port"] == 20130));
}
