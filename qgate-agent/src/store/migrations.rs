//! The schema, as an ordered list of named migrations.
//!
//! Each module that owns tables exposes `pub const MIGRATIONS: &[Migration]`
//! and is listed once in [`GROUPS`]. Rules, because a shipped database
//! already recorded what it applied:
//! - never edit, rename or remove a migration that was released: add one;
//! - add new migrations at the end of their module's list, and new modules
//!   at the end of [`GROUPS`];
//! - names are global and unique (`<module>_<nnnn>_<what>`).
//!
//! Applied migrations are recorded by name in `schema_migrations`, so a
//! migration appended to an earlier module's list is still applied to a
//! database that already has later modules' tables. A database that records
//! a name this binary does not know was written by a newer qgate: opening it
//! fails rather than run old code against a schema it does not understand.
use std::collections::HashSet;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use super::StoreError;

/// One schema change: `sql` runs in its own transaction (do not put `BEGIN`
/// or `COMMIT` in it), and `name` is recorded once it has committed.
#[derive(Clone, Copy, Debug)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

/// Every module's migrations, in the order they apply.
pub const GROUPS: &[&[Migration]] = &[
    CAPTURE_MIGRATIONS,
    super::audit::MIGRATIONS,
    super::requests::MIGRATIONS,
    super::preapprovals::MIGRATIONS,
    super::stream::MIGRATIONS,
];

/// Every migration, in the order a fresh database gets them.
pub fn all() -> impl Iterator<Item = &'static Migration> {
    GROUPS.iter().flat_map(|group| group.iter())
}

/// What the capture stage records: connections, statements, what could not
/// be decoded, and how much the capture lost. Times are Unix nanoseconds.
pub const CAPTURE_MIGRATIONS: &[Migration] = &[
    Migration {
        name: "capture_0001_connections_statements",
        sql: r#"
CREATE TABLE connections (
    id            INTEGER PRIMARY KEY,
    client_addr   TEXT    NOT NULL,
    client_port   INTEGER NOT NULL,
    server_addr   TEXT    NOT NULL,
    server_port   INTEGER NOT NULL,
    -- From the StartupMessage; NULL when not sent or not seen (mid_stream).
    user          TEXT,
    database      TEXT,
    application   TEXT,
    -- The server accepted SSLRequest/GSSENCRequest: statements are not visible.
    encrypted     INTEGER NOT NULL DEFAULT 0 CHECK (encrypted IN (0, 1)),
    -- Opened before the agent saw it: identity unknown.
    mid_stream    INTEGER NOT NULL CHECK (mid_stream IN (0, 1)),
    started_at    INTEGER NOT NULL,
    identified_at INTEGER,
    ended_at      INTEGER
) STRICT;
CREATE INDEX connections_started_at ON connections (started_at);

CREATE TABLE statements (
    id             INTEGER PRIMARY KEY,
    connection_id  INTEGER NOT NULL REFERENCES connections (id),
    seq            INTEGER NOT NULL,
    text           TEXT    NOT NULL,
    path           TEXT    NOT NULL CHECK (path IN ('simple', 'extended')),
    statement_name TEXT,
    received_at    INTEGER NOT NULL,
    completed_at   INTEGER,
    -- Not `IN (...)`: SQLite builds a temporary table for a list of three
    -- or more on every row written, a fifth of the writer's time.
    outcome        TEXT    NOT NULL DEFAULT 'unknown'
                   CHECK (outcome = 'ok' OR outcome = 'error' OR outcome = 'unknown'),
    sqlstate       TEXT,
    error_message  TEXT,
    command_tag    TEXT,
    rows           INTEGER
) STRICT;
CREATE INDEX statements_received_at ON statements (received_at);
CREATE INDEX statements_connection ON statements (connection_id, seq);

-- Things that make the record of a connection incomplete or unusual.
CREATE TABLE capture_events (
    id            INTEGER PRIMARY KEY,
    connection_id INTEGER REFERENCES connections (id),
    kind          TEXT    NOT NULL CHECK (kind = 'gap' OR kind = 'undecodable'
                                          OR kind = 'cancel_request' OR kind = 'writer_dropped'),
    detail        TEXT,
    at            INTEGER NOT NULL
) STRICT;
CREATE INDEX capture_events_at ON capture_events (at);
CREATE INDEX capture_events_connection ON capture_events (connection_id);

-- Cumulative counters reported periodically by the agent.
CREATE TABLE capture_loss (
    id             INTEGER PRIMARY KEY,
    at             INTEGER NOT NULL,
    segments_seen  INTEGER NOT NULL,
    ringbuf_full   INTEGER NOT NULL,
    truncated      INTEGER NOT NULL,
    load_errors    INTEGER NOT NULL,
    writer_dropped INTEGER NOT NULL
) STRICT;
CREATE INDEX capture_loss_at ON capture_loss (at);
"#,
    },
    Migration {
        name: "capture_0002_connection_transport",
        sql: r#"
-- How the session reached the server and which capture point read it:
-- 'wire' (the tc program: plaintext TCP only) or 'server_hook' (inside the
-- backend: TCP, TLS and Unix-socket sessions in plain). 'unknown': a TCP
-- session the hook first saw mid-stream (TLS or not is not known then).
ALTER TABLE connections ADD COLUMN transport TEXT NOT NULL DEFAULT 'tcp'
    CHECK (transport IN ('tcp', 'tls', 'gss', 'unix', 'unknown'));
ALTER TABLE connections ADD COLUMN gated_by TEXT NOT NULL DEFAULT 'wire'
    CHECK (gated_by IN ('wire', 'server_hook'));
ALTER TABLE connections ADD COLUMN backend_pid INTEGER;
"#,
    },
    Migration {
        name: "capture_0003_statement_texts",
        sql: r#"
-- Statement texts that repeat, stored once: a workload sends a handful of
-- texts millions of times (prepared statements, ORMs). The writer stores a
-- text inline the first time it sees it and by reference from the second
-- (`store::writer`), so a text seen once costs what it did before.
CREATE TABLE statement_texts (
    id   INTEGER PRIMARY KEY,
    text TEXT    NOT NULL
) STRICT;

-- One row per statement: its text inline or by reference, never both.
CREATE TABLE statement_log (
    id             INTEGER PRIMARY KEY,
    connection_id  INTEGER NOT NULL REFERENCES connections (id),
    seq            INTEGER NOT NULL,
    text           TEXT,
    text_id        INTEGER REFERENCES statement_texts (id),
    path           TEXT    NOT NULL CHECK (path = 'simple' OR path = 'extended'),
    statement_name TEXT,
    received_at    INTEGER NOT NULL,
    completed_at   INTEGER,
    outcome        TEXT    NOT NULL DEFAULT 'unknown'
                   CHECK (outcome = 'ok' OR outcome = 'error' OR outcome = 'unknown'),
    sqlstate       TEXT,
    error_message  TEXT,
    command_tag    TEXT,
    rows           INTEGER,
    CHECK ((text IS NULL) <> (text_id IS NULL))
) STRICT;
INSERT INTO statement_log (id, connection_id, seq, text, path, statement_name, received_at,
                           completed_at, outcome, sqlstate, error_message, command_tag, rows)
    SELECT id, connection_id, seq, text, path, statement_name, received_at,
           completed_at, outcome, sqlstate, error_message, command_tag, rows
    FROM statements;
DROP TABLE statements;
CREATE INDEX statement_log_received_at ON statement_log (received_at);
CREATE INDEX statement_log_connection ON statement_log (connection_id, seq);

-- What every reader (API, export, CLI, `sqlite3`) reads, as before.
CREATE VIEW statements AS
    SELECT l.id, l.connection_id, l.seq, coalesce(l.text, t.text) AS text, l.path,
           l.statement_name, l.received_at, l.completed_at, l.outcome, l.sqlstate,
           l.error_message, l.command_tag, l.rows
    FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id;
"#,
    },
    Migration {
        name: "capture_0004_statement_decisions",
        sql: r#"
-- What the agent decided for a statement it was asked about: 'allow',
-- 'deny' (by the policy, at once) or 'hold' (a request, `request_id`, whose
-- status says how it ended), and the rule that decided. NULL: the agent was
-- not asked (monitor mode, or the kernel's plain-read fast path).
ALTER TABLE statement_log ADD COLUMN decision TEXT
    CHECK (decision IS NULL OR decision = 'allow' OR decision = 'deny' OR decision = 'hold');
ALTER TABLE statement_log ADD COLUMN rule TEXT;
ALTER TABLE statement_log ADD COLUMN request_id INTEGER;
CREATE INDEX statement_log_decision ON statement_log (decision, received_at)
    WHERE decision IS NOT NULL;
CREATE INDEX statement_log_request ON statement_log (request_id) WHERE request_id IS NOT NULL;

DROP VIEW statements;
CREATE VIEW statements AS
    SELECT l.id, l.connection_id, l.seq, coalesce(l.text, t.text) AS text, l.path,
           l.statement_name, l.received_at, l.completed_at, l.outcome, l.sqlstate,
           l.error_message, l.command_tag, l.rows, l.decision, l.rule, l.request_id
    FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id;
"#,
    },
    Migration {
        name: "capture_0005_replays",
        sql: r#"
-- Connections read from a capture file by `qgate-agent replay`, not live:
-- the file's name. NULL for live traffic.
ALTER TABLE connections ADD COLUMN replayed_from TEXT;
-- Each capture file replayed into this store, by content: the same file is
-- not replayed twice into one store.
CREATE TABLE replays (
    sha256     TEXT    PRIMARY KEY,
    file       TEXT    NOT NULL,
    at         INTEGER NOT NULL,
    statements INTEGER NOT NULL
) STRICT;
"#,
    },
    Migration {
        name: "capture_0006_hook_lost",
        sql: r#"
-- The server hook's lost records (its ring full, or a read it could not
-- copy): counted by the kernel all along, recorded here too, so a loss in
-- the hook is never silent in the store.
ALTER TABLE capture_loss ADD COLUMN hook_lost INTEGER NOT NULL DEFAULT 0;
"#,
    },
    Migration {
        name: "capture_0007_seals",
        sql: super::seal::MIGRATION_SQL,
    },
    Migration {
        name: "capture_0008_statement_pages",
        sql: super::pages::MIGRATION_SQL,
    },
    Migration {
        name: "capture_0009_identity_changed",
        sql: r#"
-- A session that changed its identity (MySQL's COM_CHANGE_USER,
-- COM_INIT_DB, USE) is one connection row per identity: the old row ends
-- with an 'identity_changed' event naming the row that continues it.
-- SQLite cannot widen a CHECK in place: the table is rebuilt.
CREATE TABLE capture_events_new (
    id            INTEGER PRIMARY KEY,
    connection_id INTEGER REFERENCES connections (id),
    kind          TEXT    NOT NULL CHECK (kind = 'gap' OR kind = 'undecodable'
                                          OR kind = 'cancel_request' OR kind = 'writer_dropped'
                                          OR kind = 'identity_changed'),
    detail        TEXT,
    at            INTEGER NOT NULL
) STRICT;
INSERT INTO capture_events_new (id, connection_id, kind, detail, at)
    SELECT id, connection_id, kind, detail, at FROM capture_events;
DROP TABLE capture_events;
ALTER TABLE capture_events_new RENAME TO capture_events;
CREATE INDEX capture_events_at ON capture_events (at);
CREATE INDEX capture_events_connection ON capture_events (connection_id);
"#,
    },
    Migration {
        name: "capture_0010_connection_protocol",
        sql: r#"
-- The protocol a connection speaks. NULL on rows written before this
-- column (all PostgreSQL): sealed digests leave a NULL protocol out, so
-- they still verify (`store::seal`).
ALTER TABLE connections ADD COLUMN protocol TEXT
    CHECK (protocol IS NULL OR protocol = 'postgresql' OR protocol = 'mysql');
"#,
    },
];

/// Brings `conn`'s database up to this binary's schema. Safe to call from
/// several processes at once: each migration re-checks, inside its own
/// `BEGIN IMMEDIATE` transaction, that nobody applied it meanwhile.
///
/// An up-to-date database is only read: opening it takes no write lock.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let has_table = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !has_table {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    INTEGER PRIMARY KEY,
                 name       TEXT    NOT NULL UNIQUE,
                 applied_at INTEGER NOT NULL
             ) STRICT",
        )?;
    }
    let known: HashSet<&str> = all().map(|m| m.name).collect();
    let recorded: HashSet<String> = applied(conn)?.into_iter().collect();
    let mut unknown: Vec<String> = recorded
        .iter()
        .filter(|name| !known.contains(name.as_str()))
        .cloned()
        .collect();
    if !unknown.is_empty() {
        unknown.sort();
        return Err(StoreError::SchemaTooNew { unknown });
    }
    for migration in all().filter(|m| !recorded.contains(m.name)) {
        apply(conn, migration)?;
    }
    Ok(())
}

/// Names of the migrations `conn`'s database has, in the order they applied.
pub fn applied(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut stmt = conn.prepare("SELECT name FROM schema_migrations ORDER BY version")?;
    let names = stmt
        .query_map([], |row| row.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(names)
}

fn apply(conn: &mut Connection, migration: &Migration) -> Result<(), StoreError> {
    let failed = |source| StoreError::Migration {
        name: migration.name,
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(failed)?;
    let done = tx
        .query_row(
            "SELECT 1 FROM schema_migrations WHERE name = ?1",
            [migration.name],
            |_| Ok(()),
        )
        .optional()
        .map_err(failed)?
        .is_some();
    if done {
        return Ok(());
    }
    tx.execute_batch(migration.sql).map_err(failed)?;
    tx.execute(
        "INSERT INTO schema_migrations (name, applied_at) VALUES (?1, ?2)",
        (migration.name, crate::clock::now()),
    )
    .map_err(failed)?;
    tx.commit().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_names_are_unique() {
        let mut seen = HashSet::new();
        for m in all() {
            assert!(seen.insert(m.name), "duplicate migration name {}", m.name);
        }
    }

    #[test]
    fn every_migration_applies_to_an_empty_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        let names = applied(&conn).unwrap();
        let expected: Vec<&str> = all().map(|m| m.name).collect();
        assert_eq!(names, expected);
    }
}
