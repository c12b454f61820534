//! SQLite store: connections, statements, requests, approvals, audit.
//!
//! THROWAWAY SHIM written on the `api` branch so the API builds; the store
//! engineer's module replaces this file at merge. The API relies on exactly:
//! [`StoreError`], [`open`] (WAL, `synchronous=FULL`, busy timeout, every
//! migration applied) and [`audit`]'s `append` / `verify`.
pub mod audit;
pub mod requests;

use std::path::Path;

use rusqlite::Connection;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("creating {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Tables of the store engineer that the API's audit search joins; the shim
/// creates them so the API can be tested before the merge.
const SHIM_TABLES: &str = "
CREATE TABLE IF NOT EXISTS connections (
    id INTEGER PRIMARY KEY,
    client_addr TEXT, client_port INTEGER, server_addr TEXT, server_port INTEGER,
    user TEXT, database TEXT, application TEXT
);
CREATE TABLE IF NOT EXISTS statements (
    id INTEGER PRIMARY KEY,
    connection_id INTEGER REFERENCES connections(id),
    text TEXT NOT NULL, received_at INTEGER NOT NULL, completed_at INTEGER,
    outcome TEXT, sqlstate TEXT, message TEXT, tag TEXT, rows INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    kind TEXT NOT NULL,
    actor TEXT,
    request_id INTEGER,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY);
";

/// Opens (creating if needed) the store at `path` with the durability the
/// audit needs and applies every migration not yet applied.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(SHIM_TABLES)?;
    for migration in requests::MIGRATIONS {
        let done: bool = tx.query_row(
            "SELECT EXISTS(SELECT 1 FROM migrations WHERE name = ?1)",
            [migration.name],
            |r| r.get(0),
        )?;
        if !done {
            tx.execute_batch(migration.sql)?;
            tx.execute(
                "INSERT INTO migrations (name) VALUES (?1)",
                [migration.name],
            )?;
        }
    }
    tx.commit()?;
    Ok(conn)
}
