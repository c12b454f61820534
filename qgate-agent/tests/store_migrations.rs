//! Opening the database: creation, WAL, migrations, refusing newer schemas.
use qgate_agent::store::{migrations, Store, StoreError};

fn applied(store: &Store) -> Vec<(i64, String)> {
    store
        .conn()
        .prepare("SELECT version, name FROM schema_migrations ORDER BY version")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn fresh_database_is_created_with_parent_directories_in_wal_mode() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("var/lib/qgate/qgate.sqlite");
    let store = Store::open(&db).unwrap();
    assert!(db.exists());
    let mode: String = store
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let synchronous: i64 = store
        .conn()
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(synchronous, 2, "FULL: decisions are fsync'd");
    let expected: Vec<(i64, String)> = migrations::all()
        .enumerate()
        .map(|(i, m)| (i as i64 + 1, m.name.to_owned()))
        .collect();
    assert_eq!(applied(&store), expected);
}

#[test]
fn reopening_applies_nothing_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let first = Store::open(&db).unwrap();
    first
        .conn()
        .execute(
            "INSERT INTO connections (client_addr, client_port, server_addr, server_port, mid_stream, started_at)
             VALUES ('10.0.0.7', 40000, '10.0.0.1', 5432, 0, 1)",
            [],
        )
        .unwrap();
    let before = applied(&first);
    drop(first);
    let second = Store::open(&db).unwrap();
    assert_eq!(applied(&second), before);
    let n: i64 = second
        .conn()
        .query_row("SELECT count(*) FROM connections", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

#[test]
fn database_from_a_newer_qgate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    Store::open(&db)
        .unwrap()
        .conn()
        .execute(
            "INSERT INTO schema_migrations (name, applied_at) VALUES ('requests_0042_from_the_future', 0)",
            [],
        )
        .unwrap();
    match Store::open(&db) {
        Err(e @ StoreError::SchemaTooNew { .. }) => {
            let message = e.to_string();
            assert!(
                message.contains("requests_0042_from_the_future"),
                "{message}"
            );
            assert!(message.contains("newer qgate"), "{message}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a database from a newer qgate was opened"),
    }
}

#[test]
fn open_existing_refuses_a_missing_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("typo.sqlite");
    assert!(matches!(
        Store::open_existing(&db),
        Err(StoreError::Open { .. })
    ));
    assert!(!db.exists());
}

#[test]
fn processes_opening_a_fresh_database_at_once_migrate_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let openers: Vec<_> = (0..4)
        .map(|_| {
            let db = db.clone();
            std::thread::spawn(move || Store::open(&db).map(|_| ()))
        })
        .collect();
    for opener in openers {
        opener.join().unwrap().unwrap();
    }
    let store = Store::open(&db).unwrap();
    assert_eq!(applied(&store).len(), migrations::all().count());
}

#[test]
fn an_up_to_date_database_opens_while_another_process_is_writing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let writer = Store::open(&db).unwrap();
    writer.conn().execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let reader = Store::open(&db).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let n: i64 = reader
        .conn()
        .query_row("SELECT count(*) FROM statements", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    writer.conn().execute_batch("COMMIT").unwrap();
}

/// The window the test above hits by chance, held open: another process has
/// the fresh file's write lock while it is still in rollback-journal mode
/// (it is switching it to WAL, or migrating it). SQLite does not call the busy
/// handler for the switch's lock upgrade, so `open` must wait on its own.
#[test]
fn a_database_another_process_is_creating_opens_once_that_process_commits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    let creator = rusqlite::Connection::open(&db).unwrap();
    creator
        .busy_timeout(std::time::Duration::from_secs(5))
        .unwrap();
    creator
        .execute_batch("BEGIN IMMEDIATE; CREATE TABLE other_tool (x INTEGER)")
        .unwrap();
    let opener = {
        let db = db.clone();
        std::thread::spawn(move || Store::open(&db).map(|_| ()))
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert!(!opener.is_finished(), "open did not wait for the creator");
    creator.execute_batch("COMMIT").unwrap();
    opener.join().unwrap().unwrap();
    let store = Store::open(&db).unwrap();
    assert_eq!(applied(&store).len(), migrations::all().count());
}

/// A database written before texts were stored once (capture_0003): its
/// statements read back the same through the `statements` view.
#[test]
fn statements_written_before_texts_were_shared_survive_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("qgate.sqlite");
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, applied_at INTEGER NOT NULL) STRICT",
        )
        .unwrap();
        // The schema as it was: every migration before capture_0003.
        let tx = conn.transaction().unwrap();
        for m in migrations::all().take_while(|m| m.name != "capture_0003_statement_texts") {
            tx.execute_batch(m.sql).unwrap();
            tx.execute(
                "INSERT INTO schema_migrations (name, applied_at) VALUES (?1, 0)",
                [m.name],
            )
            .unwrap();
        }
        tx.execute_batch(
            "INSERT INTO connections (id, client_addr, client_port, server_addr, server_port, mid_stream, started_at)
                 VALUES (1, '10.0.0.7', 50432, '10.0.0.1', 5432, 0, 1);
             INSERT INTO statements (id, connection_id, seq, text, path, received_at, completed_at, outcome, command_tag, rows)
                 VALUES (5, 1, 1, 'SELECT 1', 'simple', 10, 11, 'ok', 'SELECT 1', 1),
                        (6, 1, 2, 'DELETE FROM t', 'extended', 20, NULL, 'unknown', NULL, NULL),
                        (9, 1, 3, 'SELECT 1', 'simple', 30, 31, 'error', NULL, NULL);",
        )
        .unwrap();
        tx.commit().unwrap();
    }
    let store = Store::open(&db).unwrap();
    let rows: Vec<(i64, i64, String, String, String)> = store
        .conn()
        .prepare("SELECT id, seq, text, path, outcome FROM statements ORDER BY id")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let row = |id, seq, text: &str, path: &str, outcome: &str| {
        (
            id,
            seq,
            text.to_string(),
            path.to_string(),
            outcome.to_string(),
        )
    };
    assert_eq!(
        rows,
        vec![
            row(5, 1, "SELECT 1", "simple", "ok"),
            row(6, 2, "DELETE FROM t", "extended", "unknown"),
            row(9, 3, "SELECT 1", "simple", "error"),
        ]
    );
    let moved: i64 = store
        .conn()
        .query_row(
            "SELECT count(*) FROM statement_log WHERE text IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(moved, 3, "moved inline");
}
