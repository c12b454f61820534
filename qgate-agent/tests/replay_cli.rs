//! `qgate-agent replay` and `audit export` as a security team would run them
//! on a capture none of us made.
use std::{path::PathBuf, process::Command};

mod corpus_support;

fn corpus_pcap(name: &str) -> Option<PathBuf> {
    corpus_support::corpus_file(&format!("pcap/suricata-verify/{name}"))
}

#[test]
fn replaying_a_capture_stores_every_statement_with_its_outcome() {
    let Some(pcap) = corpus_pcap("pgsql-simple-query-rollback__input.pcap") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("replay.sqlite");
    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .args(["replay", "--pcap"])
        .arg(&pcap)
        .arg("--db")
        .arg(&db)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{summary}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        summary.contains("22 statements (22 completed, 5 errors)"),
        "{summary}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_qgate-agent"))
        .args(["audit", "export", "--format", "jsonl", "--db"])
        .arg(&db)
        .output()
        .unwrap();
    assert!(out.status.success());
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
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
