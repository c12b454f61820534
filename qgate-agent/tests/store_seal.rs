//! Captured statements and connections sealed into the audit chain: every
//! edit, deletion or insertion an attacker with the SQLite file could make
//! to a sealed row is found and named by `seal::verify`.
mod store_support;

use std::time::Duration;

use qgate_agent::store::{audit, seal, Store, Writer, WriterConfig};
use rusqlite::Connection;
use store_support::*;

/// A store with two connections and their statements, written by the live
/// writer and sealed by its passes and its shutdown.
fn sealed_store(dir: &std::path::Path) -> std::path::PathBuf {
    let db = dir.join("qgate.sqlite");
    let writer = Writer::spawn(
        Store::open(&db).unwrap(),
        WriterConfig {
            seal_every: Duration::from_millis(50),
            ..WriterConfig::default()
        },
    )
    .unwrap();
    for event in [
        opened(1, T0),
        identified(1, "alice", "shop", "psql", T0 + MS),
        received(1, 1, "SELECT 1", T0 + 2 * MS),
        completed_ok(1, 1, "SELECT 1", Some(1), T0 + 3 * MS),
        received(1, 2, "DELETE FROM orders WHERE id = 7", T0 + 4 * MS),
        completed_ok(1, 2, "DELETE 1", Some(1), T0 + 5 * MS),
        closed(1, T0 + 6 * MS),
        opened(2, T0 + 7 * MS),
        identified(2, "bob", "shop", "app", T0 + 8 * MS),
        received(2, 1, "SELECT 1", T0 + 9 * MS),
        completed_ok(2, 1, "SELECT 1", Some(1), T0 + 10 * MS),
    ] {
        assert!(writer.send(event));
    }
    writer.flush();
    // Passes run while the writer lives: the closed connection and the
    // completed statements are sealed before shutdown seals the rest.
    std::thread::sleep(Duration::from_millis(300));
    let mid: i64 = reader(&db)
        .query_row(
            "SELECT (SELECT count(*) FROM statement_log WHERE sealed_in IS NOT NULL)
                  + (SELECT count(*) FROM statement_pages p, json_each(p.body))",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        mid, 3,
        "completed statements are sealed while the writer runs"
    );
    let stats = writer.shutdown().unwrap();
    assert_eq!(stats.seal_failures, 0);
    assert_eq!(stats.sealed, 5, "3 statements and 2 connections: {stats:?}");
    db
}

fn reader(db: &std::path::Path) -> Connection {
    Store::open(db).unwrap().into_conn()
}

fn verify(db: &std::path::Path) -> seal::SealReport {
    let conn = reader(db);
    assert!(
        audit::verify(&conn).unwrap().is_intact(),
        "the chain itself"
    );
    seal::verify(&conn).unwrap()
}

#[test]
fn an_untouched_store_verifies_and_every_row_is_covered() {
    let dir = tempfile::tempdir().unwrap();
    let db = sealed_store(dir.path());
    let report = verify(&db);
    assert_eq!(report.first_problem, None, "{report:?}");
    assert_eq!(
        (
            report.statements_sealed,
            report.connections_sealed,
            report.statements_unsealed,
            report.connections_unsealed
        ),
        (3, 2, 0, 0)
    );
    assert!(report.groups >= 2, "passes and shutdown: {report:?}");
}

/// SQL that sets `path` (e.g. `[3]`: the text) of statement `id`'s element
/// in its page (`store::pages`) to `value` (an SQL expression).
fn page_edit(id: i64, path: &str, value: &str) -> String {
    format!(
        "UPDATE statement_pages SET body = json_set(body, '$[' || (SELECT j.key
             FROM json_each(statement_pages.body) j
             WHERE statement_pages.id + (j.value ->> 0) = {id}) || ']{path}', {value})
         WHERE {id} BETWEEN id AND last_id"
    )
}

/// SQL that removes statement `id`'s element from its page.
fn page_remove(id: i64) -> String {
    format!(
        "UPDATE statement_pages SET body = json_remove(body, '$[' || (SELECT j.key
             FROM json_each(statement_pages.body) j
             WHERE statement_pages.id + (j.value ->> 0) = {id}) || ']')
         WHERE {id} BETWEEN id AND last_id"
    )
}

#[test]
fn completed_statements_are_written_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let db = sealed_store(dir.path());
    let conn = reader(&db);
    let (pages, rows): (i64, i64) = conn
        .query_row(
            "SELECT (SELECT count(*) FROM statement_pages), (SELECT count(*) FROM statement_log)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((pages, rows), (1, 0), "one batch, one page, no row");
    type Read = (
        i64,
        i64,
        String,
        Option<i64>,
        i64,
        i64,
        String,
        Option<String>,
    );
    let read: Vec<Read> = conn
        .prepare(
            "SELECT id, connection_id, text, rows, received_at, completed_at, command_tag,
                    sqlstate FROM statements ORDER BY id",
        )
        .unwrap()
        .query_map([], |r| Read::try_from(r))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let select = "SELECT 1".to_owned();
    let delete = "DELETE FROM orders WHERE id = 7".to_owned();
    assert_eq!(
        read,
        [
            (
                1,
                1,
                select.clone(),
                Some(1),
                T0 + 2 * MS,
                T0 + 3 * MS,
                select.clone(),
                None
            ),
            (
                2,
                1,
                delete,
                Some(1),
                T0 + 4 * MS,
                T0 + 5 * MS,
                "DELETE 1".into(),
                None
            ),
            (
                3,
                2,
                select.clone(),
                Some(1),
                T0 + 9 * MS,
                T0 + 10 * MS,
                select,
                None
            ),
        ]
    );
}

/// Each tampering, on a fresh copy, and the table and row verify must name.
#[test]
fn every_tampering_with_a_sealed_row_is_named() {
    let edit_text = page_edit(2, "[3]", "'DELETE FROM orders WHERE id = 8'");
    let edit_rows = page_edit(2, "[13]", "0");
    let delete = page_remove(2);
    let take_out = format!(
        "INSERT INTO statement_log (id, connection_id, seq, text, path, received_at,
                                    completed_at, outcome, command_tag, rows)
             SELECT id, connection_id, seq, text, path, received_at, completed_at, outcome,
                    command_tag, rows FROM statements WHERE id = 2;
         {delete}"
    );
    let forge_in_page = "UPDATE statement_pages SET body = json_insert(body, '$[#]',
         json_array(99 - id, 1, 3, 'GRANT ALL ON orders TO bob', NULL, 'simple', NULL, 1, 2,
                    'ok', NULL, NULL, 'GRANT', NULL, NULL, NULL, NULL))";
    let cases: &[(&str, &str, &str, i64)] = &[
        (
            "a repeated text edited in its shared row (the second SELECT 1 uses it)",
            "UPDATE statement_texts SET text = 'SELECT 2'",
            "statements",
            3,
        ),
        ("an inline text edited in its page", &edit_text, "statements", 2),
        (
            "a statement's outcome rewritten in its page",
            &edit_rows,
            "statements",
            2,
        ),
        ("a statement deleted from its page", &delete, "statements", 2),
        (
            "a statement taken out of its page into an unsealed row",
            &take_out,
            "statements",
            2,
        ),
        (
            "a statement forged into a page",
            forge_in_page,
            "statements",
            99,
        ),
        (
            "a statement forged into a group as a row",
            "INSERT INTO statement_log (id, connection_id, seq, text, path, received_at, sealed_in)
             SELECT 99, 1, 3, 'GRANT ALL ON orders TO bob', 'simple', 1, sealed_in
             FROM statement_pages LIMIT 1",
            "statements",
            99,
        ),
        (
            "a page moved to another group",
            "UPDATE statement_pages SET sealed_in = (SELECT max(id) FROM seals WHERE audit_id != 0 AND id != statement_pages.sealed_in)",
            "statements",
            1,
        ),
        (
            "a connection's user edited",
            "UPDATE connections SET user = 'carol' WHERE id = 1",
            "connections",
            1,
        ),
        (
            "a connection's protocol cleared (as rows sealed before the column read)",
            "UPDATE connections SET protocol = NULL WHERE id = 1",
            "connections",
            1,
        ),
        (
            "a connection deleted",
            "PRAGMA foreign_keys = OFF; DELETE FROM connections WHERE id = 2",
            "connections",
            2,
        ),
        (
            "a seal group's list rewritten",
            "UPDATE seals SET statements = x'' WHERE id = (SELECT min(id) FROM seals)",
            "seals",
            -1,
        ),
        (
            "a seal group deleted",
            "DELETE FROM seals WHERE id = (SELECT min(id) FROM seals)",
            "seals",
            -1,
        ),
    ];
    for (what, sql, table, id) in cases {
        let dir = tempfile::tempdir().unwrap();
        let db = sealed_store(dir.path());
        tamper(&db, sql);
        let report = verify(&db);
        let problem = report
            .first_problem
            .unwrap_or_else(|| panic!("{what}: not detected"));
        assert_eq!(problem.table, *table, "{what}: {problem}");
        if *id >= 0 {
            assert_eq!(problem.id, *id, "{what}: {problem}");
        }
    }
}

#[test]
fn a_decision_after_the_seal_is_not_written_and_is_counted() {
    // The writer seals a completed statement one to two intervals after it
    // was written; a decision later than that must not change the row the
    // chain vouches for.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let writer = Writer::spawn(
        Store::open(&db).unwrap(),
        WriterConfig {
            seal_every: Duration::from_millis(30),
            ..WriterConfig::default()
        },
    )
    .unwrap();
    for event in [
        opened(1, T0),
        received(1, 1, "DROP TABLE t", T0 + MS),
        completed_ok(1, 1, "DROP TABLE", None, T0 + 2 * MS),
    ] {
        assert!(writer.send(event));
    }
    writer.flush();
    std::thread::sleep(Duration::from_millis(200));
    writer.decided(qgate_agent::store::Decided {
        conn: qgate_agent::wire::ConnId(1),
        text: "DROP TABLE t".into(),
        decision: qgate_agent::store::StatementDecision::Allow,
        rule: "late".into(),
        request: None,
    });
    writer.flush();
    let stats = writer.shutdown().unwrap();
    assert_eq!(stats.late_after_seal, 1, "{stats:?}");
    assert_eq!(verify(&db).first_problem, None);
}

/// The writer's in-memory digests equal what verify reads back, whatever
/// order a statement's parts came in: completed in a later batch, decided
/// after it was written, and checked while the writer still runs (its open
/// group's rows are counted as not sealed yet, not as a problem).
#[test]
fn rows_written_in_pieces_verify_while_the_writer_runs_and_after() {
    use qgate_agent::{
        store::{Decided, StatementDecision},
        wire::ConnId,
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let writer = Writer::spawn(
        Store::open(&db).unwrap(),
        WriterConfig {
            seal_every: Duration::from_millis(100),
            ..WriterConfig::default()
        },
    )
    .unwrap();
    writer.send(opened(1, T0));
    writer.send(identified(1, "alice", "shop", "psql", T0 + MS));
    writer.send(received(1, 1, "UPDATE t SET a = 1", T0 + 2 * MS));
    writer.flush();
    writer.decided(Decided {
        conn: ConnId(1),
        text: "UPDATE t SET a = 1".into(),
        decision: StatementDecision::Hold,
        rule: "all-rows writes".into(),
        request: Some(7),
    });
    writer.flush();
    writer.send(completed_ok(1, 1, "UPDATE 3", Some(3), T0 + 3 * MS));
    writer.flush();
    writer.send(received(1, 2, "SELECT 1", T0 + 4 * MS));
    writer.send(completed_ok(1, 2, "SELECT 1", Some(1), T0 + 5 * MS));
    writer.flush();
    std::thread::sleep(Duration::from_millis(350));
    let running = verify(&db);
    assert_eq!(running.first_problem, None, "{running:?}");
    assert_eq!(running.statements_sealed, 2, "{running:?}");
    assert_eq!(running.connections_unsealed, 1, "still open: {running:?}");
    let stats = writer.shutdown().unwrap();
    assert_eq!(stats.late_after_seal, 0);
    let done = verify(&db);
    assert_eq!(done.first_problem, None, "{done:?}");
    assert_eq!(
        (
            done.statements_sealed,
            done.connections_sealed,
            done.statements_unsealed
        ),
        (2, 1, 0)
    );
    let decision: String = reader(&db)
        .query_row("SELECT decision FROM statement_log WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(decision, "hold");
    // And the sealed decision is covered: changing it is found.
    tamper(
        &db,
        "UPDATE statement_log SET decision = 'allow' WHERE id = 1",
    );
    let problem = verify(&db).first_problem.expect("edited decision found");
    assert_eq!((problem.table, problem.id), ("statements", 1), "{problem}");
}

/// Connections sealed before the `protocol` column existed (NULL there)
/// keep verifying; giving one a protocol afterwards is found.
#[test]
fn rows_sealed_before_the_protocol_column_still_verify() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let conn = reader(&db);
    conn.execute(
        "INSERT INTO connections (client_addr, client_port, server_addr, server_port, mid_stream,
                                  started_at, ended_at)
         VALUES ('10.0.0.7', 40001, '10.0.0.1', 5432, 0, 1, 2)",
        [],
    )
    .unwrap();
    let sealed = seal::seal_leftovers(&conn, 3).unwrap().expect("a group");
    assert_eq!(sealed.connections, 1);
    drop(conn);
    assert_eq!(verify(&db).first_problem, None);
    tamper(&db, "UPDATE connections SET protocol = 'mysql'");
    let problem = verify(&db)
        .first_problem
        .expect("a protocol set later is found");
    assert_eq!((problem.table, problem.id), ("connections", 1), "{problem}");
}
