//! The audit log: append-only, hash-chained, and every kind of tampering
//! named at the first bad entry.
mod store_support;

use std::path::{Path, PathBuf};

use qgate_agent::store::{
    audit::{self, encode_hash, entry_hash, AuditEntry, HashedFields, Problem, Tamper},
    Store, StoreError,
};
use rusqlite::TransactionBehavior;
use serde_json::json;
use store_support::tamper;

/// A database with `n` entries (ids 1..=n).
fn log_with(n: i64) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let store = Store::open(&db).unwrap();
    for i in 1..=n {
        let id = audit::append(
            store.conn(),
            &AuditEntry {
                kind: if i % 2 == 0 {
                    audit::kinds::REQUEST_APPROVED
                } else {
                    audit::kinds::DECISION
                },
                actor: (i % 3 != 0).then_some("bob"),
                request_id: (i % 4 != 0).then_some(100 + i),
                details: json!({"rule": "ddl-needs-review", "i": i}),
            },
        )
        .unwrap();
        assert_eq!(id, i);
    }
    (dir, db)
}

fn first_problem(db: &Path) -> Option<Tamper> {
    let report = audit::verify(Store::open(db).unwrap().conn()).unwrap();
    report.first_problem
}

fn assert_tamper(db: &Path, id: i64, problem: Problem) {
    assert_eq!(first_problem(db), Some(Tamper { id, problem }));
}

#[test]
fn an_untouched_log_verifies() {
    let (_dir, db) = log_with(10);
    let report = audit::verify(Store::open(&db).unwrap().conn()).unwrap();
    assert!(report.is_intact(), "{:?}", report.first_problem);
    assert_eq!(report.entries, 10);
    assert_eq!(report.last_hash.unwrap().len(), 64);
}

#[test]
fn an_empty_log_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let report = audit::verify(Store::open(dir.path().join("q.sqlite")).unwrap().conn()).unwrap();
    assert!(report.is_intact());
    assert_eq!((report.entries, report.last_hash), (0, None));
}

#[test]
fn details_are_stored_as_canonical_json() {
    let (_dir, db) = log_with(1);
    let details: String = Store::open(&db)
        .unwrap()
        .conn()
        .query_row("SELECT details FROM audit WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(details, r#"{"i":1,"rule":"ddl-needs-review"}"#);
}

#[test]
fn the_table_refuses_update_and_delete() {
    let (_dir, db) = log_with(3);
    let store = Store::open(&db).unwrap();
    for sql in [
        "UPDATE audit SET actor = 'mallory' WHERE id = 2",
        "DELETE FROM audit WHERE id = 3",
        "DELETE FROM audit_head",
        "UPDATE audit_head SET entries = 2, last_id = 2",
        // Does not extend the head: would fork the chain.
        "INSERT INTO audit (id, at, kind, details, prev_hash, hash) VALUES (3, 0, 'decision', '{}', 'x', 'y')",
    ] {
        let err = store.conn().execute(sql, []).unwrap_err();
        assert!(err.to_string().contains("audit"), "{sql}: {err}");
    }
    assert!(first_problem(&db).is_none());
}

#[test]
fn details_must_be_an_object() {
    let (_dir, db) = log_with(0);
    let store = Store::open(&db).unwrap();
    let err = audit::append(
        store.conn(),
        &AuditEntry {
            kind: audit::kinds::DECISION,
            actor: None,
            request_id: None,
            details: json!(["not", "an", "object"]),
        },
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::DetailsNotObject("an array")));
}

#[test]
fn an_append_inside_a_rolled_back_transaction_leaves_no_trace() {
    let (_dir, db) = log_with(2);
    let mut store = Store::open(&db).unwrap();
    let tx = store
        .conn_mut()
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .unwrap();
    let id = audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::REQUEST_APPROVED,
            actor: Some("carol"),
            request_id: Some(7),
            details: json!({}),
        },
    )
    .unwrap();
    assert_eq!(id, 3);
    tx.rollback().unwrap();
    let report = audit::verify(store.conn()).unwrap();
    assert!(report.is_intact());
    assert_eq!(report.entries, 2);
}

#[test]
fn an_append_in_a_transaction_that_would_not_be_fsynced_is_refused() {
    let (_dir, db) = log_with(0);
    let mut store = Store::open(&db).unwrap();
    store
        .conn()
        .pragma_update(None, "synchronous", "NORMAL")
        .unwrap();
    let tx = store.conn_mut().transaction().unwrap();
    let err = audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::DECISION,
            actor: None,
            request_id: None,
            details: json!({}),
        },
    )
    .unwrap_err();
    assert!(matches!(err, StoreError::NotDurable { level: 1 }), "{err}");
    drop(tx);
    // Outside a transaction it raises the level for its own commit only.
    audit::append(
        store.conn(),
        &AuditEntry {
            kind: audit::kinds::DECISION,
            actor: None,
            request_id: None,
            details: json!({}),
        },
    )
    .unwrap();
    let level: i64 = store
        .conn()
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(level, 1);
}

#[test]
fn editing_any_column_is_named_at_the_edited_entry() {
    let zero_hash = "0".repeat(64);
    let edits = [
        ("at", "UPDATE audit SET at = at + 1 WHERE id = 4".to_owned()),
        (
            "kind",
            "UPDATE audit SET kind = 'denial' WHERE id = 4".to_owned(),
        ),
        (
            "actor",
            "UPDATE audit SET actor = 'mallory' WHERE id = 4".to_owned(),
        ),
        (
            "actor to NULL",
            "UPDATE audit SET actor = NULL WHERE id = 4".to_owned(),
        ),
        (
            "request_id",
            "UPDATE audit SET request_id = 999 WHERE id = 4".to_owned(),
        ),
        (
            "request_id to NULL",
            "UPDATE audit SET request_id = NULL WHERE id = 5".to_owned(),
        ),
        (
            "details",
            r#"UPDATE audit SET details = '{"i":4,"rule":"allow-all"}' WHERE id = 4"#.to_owned(),
        ),
        (
            "prev_hash",
            format!("UPDATE audit SET prev_hash = '{zero_hash}' WHERE id = 4"),
        ),
        (
            "hash",
            format!("UPDATE audit SET hash = '{zero_hash}' WHERE id = 4"),
        ),
    ];
    for (what, sql) in edits {
        let (_dir, db) = log_with(8);
        tamper(&db, &sql);
        let id = if what == "request_id to NULL" { 5 } else { 4 };
        assert_eq!(
            first_problem(&db),
            Some(Tamper {
                id,
                problem: Problem::HashMismatch
            }),
            "edit of {what}"
        );
    }
}

#[test]
fn a_hash_that_is_not_lowercase_hex_is_malformed() {
    let (_dir, db) = log_with(5);
    tamper(&db, "UPDATE audit SET hash = upper(hash) WHERE id = 2");
    assert_tamper(&db, 2, Problem::Malformed { column: "hash" });
}

#[test]
fn deleting_a_middle_entry_is_named_as_missing() {
    let (_dir, db) = log_with(8);
    tamper(&db, "DELETE FROM audit WHERE id = 5");
    assert_tamper(&db, 5, Problem::Missing { next: Some(6) });
}

#[test]
fn deleting_the_last_entry_is_detected_through_the_head() {
    let (_dir, db) = log_with(8);
    tamper(&db, "DELETE FROM audit WHERE id = 8");
    assert_tamper(&db, 8, Problem::Missing { next: None });
}

#[test]
fn deleting_the_head_is_detected() {
    let (_dir, db) = log_with(3);
    tamper(&db, "DELETE FROM audit_head");
    let problem = first_problem(&db).unwrap();
    assert!(
        matches!(problem.problem, Problem::HeadMismatch { .. }),
        "{problem}"
    );
}

#[test]
fn a_forged_entry_at_the_end_is_named() {
    let (_dir, db) = log_with(4);
    tamper(
        &db,
        &format!(
            "INSERT INTO audit (id, at, kind, actor, details, prev_hash, hash)
             SELECT 5, at + 1, 'approval', 'mallory', '{{}}', hash, '{}' FROM audit WHERE id = 4",
            "ab".repeat(32)
        ),
    );
    assert_tamper(&db, 5, Problem::HashMismatch);
}

#[test]
fn a_forged_entry_with_a_correct_hash_is_caught_by_the_head() {
    let (_dir, db) = log_with(4);
    let prev: String = Store::open(&db)
        .unwrap()
        .conn()
        .query_row("SELECT hash FROM audit WHERE id = 4", [], |r| r.get(0))
        .unwrap();
    let prev_bytes = audit::decode_hash(&prev).unwrap();
    let hash = entry_hash(&HashedFields {
        id: 5,
        at: 0,
        kind: audit::kinds::REQUEST_APPROVED.as_str(),
        actor: Some("mallory"),
        request_id: Some(104),
        details: "{}",
        prev_hash: &prev_bytes,
    });
    tamper(
        &db,
        &format!(
            "INSERT INTO audit VALUES (5, 0, 'request.approved', 'mallory', 104, '{{}}', '{prev}', '{}')",
            encode_hash(&hash)
        ),
    );
    assert_tamper(&db, 5, Problem::NotInHead);
}

#[test]
fn a_forged_entry_inserted_in_the_middle_is_named() {
    let (_dir, db) = log_with(6);
    tamper(
        &db,
        "UPDATE audit SET id = -id WHERE id >= 3;
         UPDATE audit SET id = -id + 1 WHERE id < 0;
         INSERT INTO audit (id, at, kind, details, prev_hash, hash)
         SELECT 3, at, 'approval', '{}', hash, hash FROM audit WHERE id = 2;",
    );
    assert_tamper(&db, 3, Problem::HashMismatch);
}

#[test]
fn swapping_two_entries_is_named_as_reordered() {
    let (_dir, db) = log_with(8);
    tamper(
        &db,
        "UPDATE audit SET id = -3 WHERE id = 3;
         UPDATE audit SET id = 3 WHERE id = 4;
         UPDATE audit SET id = 4 WHERE id = -3;",
    );
    assert_tamper(&db, 3, Problem::Moved { written_as: 4 });
}

#[test]
fn deleting_an_entry_and_renumbering_the_rest_is_named_as_reordered() {
    let (_dir, db) = log_with(6);
    tamper(
        &db,
        "DELETE FROM audit WHERE id = 3;
         UPDATE audit SET id = -id WHERE id > 3;
         UPDATE audit SET id = -id - 1 WHERE id < 0;",
    );
    assert_tamper(&db, 3, Problem::Moved { written_as: 4 });
}

#[test]
fn rewriting_an_entry_with_a_recomputed_hash_breaks_the_next_link() {
    let (_dir, db) = log_with(6);
    let store = Store::open(&db).unwrap();
    let (at, prev): (i64, String) = store
        .conn()
        .query_row("SELECT at, prev_hash FROM audit WHERE id = 3", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    let forged = entry_hash(&HashedFields {
        id: 3,
        at,
        kind: audit::kinds::REQUEST_DENIED.as_str(),
        actor: None,
        request_id: None,
        details: "{}",
        prev_hash: &audit::decode_hash(&prev).unwrap(),
    });
    tamper(
        &db,
        &format!(
            "UPDATE audit SET kind = 'request.denied', actor = NULL, request_id = NULL, details = '{{}}', hash = '{}' WHERE id = 3",
            encode_hash(&forged)
        ),
    );
    assert_tamper(&db, 3, Problem::Rewritten { next: 4 });
}

#[test]
fn concurrent_appenders_do_not_fork_the_chain() {
    let (_dir, db) = log_with(0);
    let appenders: Vec<_> = ["agent", "cli"]
        .into_iter()
        .map(|actor| {
            let db = db.clone();
            std::thread::spawn(move || {
                let store = Store::open(&db).unwrap();
                for i in 0..500 {
                    audit::append(
                        store.conn(),
                        &AuditEntry {
                            kind: audit::kinds::DECISION,
                            actor: Some(actor),
                            request_id: Some(i),
                            details: json!({"i": i}),
                        },
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for appender in appenders {
        appender.join().unwrap();
    }
    let report = audit::verify(Store::open(&db).unwrap().conn()).unwrap();
    assert!(report.is_intact(), "{:?}", report.first_problem);
    assert_eq!(report.entries, 1000);
}
