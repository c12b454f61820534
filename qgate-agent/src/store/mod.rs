//! SQLite (WAL) state of the agent: captured connections and statements, the
//! reviewers' requests, and the hash-chained audit log.
//!
//! Doors:
//! - [`Store::open`]: a connection to the database, migrated to this binary's
//!   schema. The API and the CLI use one each; several processes may hold
//!   one at the same time (WAL readers never block, writers wait for each
//!   other up to [`BUSY_TIMEOUT`]).
//! - [`Writer`]: the live path. Takes [`WireEvent`](crate::wire::WireEvent)s
//!   without ever blocking the capture thread and writes them in batches on
//!   its own thread.
//! - [`audit::append`] / [`audit::verify`]: the tamper-evident log.
//! - [`export::export_statements`] / [`export::search_statements`]: one
//!   record per statement ([`export::StatementRecord`], documented in
//!   `schema/statement.schema.json`), for the CLI export, the API and the
//!   audit stream; [`export::search_audit`] the same for the audit log.
//!
//! | module | does |
//! | --- | --- |
//! | [`writer`] | the capture's batched writes; links decisions to statements |
//! | [`requests`] | requests and votes (the board's tables) |
//! | [`reviewers`] | reviewers and their tokens |
//! | [`preapprovals`] | statements approved before they are sent |
//! | [`seal`] | captured rows sealed into the audit chain; `audit verify` of it all |
//! | [`audit`] | the hash-chained log: kinds, append, verify |
//! | [`export`] | the statement and audit records, their search and export |
//! | [`stream`] | every record as it happens to JSONL and syslog (`[audit_stream]`) |
//! | [`pages`] | statements stored a batch per row; the readers' union of rows and pages |
//! | [`migrations`] | the schema as named, ordered migrations |
pub mod audit;
pub mod export;
pub mod migrations;
pub mod pages;
pub mod preapprovals;
pub mod requests;
pub mod reviewers;
pub mod seal;
pub mod stream;
pub mod writer;

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, OpenFlags};

use crate::clock::UnixNanos;

pub use migrations::Migration;
pub use writer::{Decided, StatementDecision, Writer, WriterConfig, WriterStats};

/// Where the agent keeps its database unless `[store] path` says otherwise.
pub const DEFAULT_DB_PATH: &str = "/var/lib/qgate/qgate.sqlite";

/// How long a connection waits for another process's write transaction
/// before giving up with `SQLITE_BUSY`. Write transactions here are short
/// (one batch, one audit entry), so a wait this long means something is stuck.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a waiting connection retries the lock. SQLite has no lock
/// queue, and its own `busy_timeout` backs off to one try per 100 ms: a
/// connection committing in a loop (the writer's batches, a burst of audit
/// appends) then starves the other for the whole timeout. Trying every
/// millisecond finds the gaps between transactions.
const BUSY_POLL: Duration = Duration::from_millis(1);

fn busy_wait(attempts: i32) -> bool {
    let waited = BUSY_POLL * u32::try_from(attempts).unwrap_or(u32::MAX);
    if waited >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(BUSY_POLL);
    true
}

/// Puts the database in WAL mode (a no-op once it is) and returns the
/// journal mode it is in.
///
/// Switching a fresh database rewrites its header: the connection reads it
/// under a shared lock, then needs the write lock. SQLite never calls the
/// busy handler for that upgrade (two readers waiting on each other would
/// deadlock), so when several processes open a new database at once all but
/// one get `SQLITE_BUSY` at once. They retry here until the winner has
/// switched the file; from then on the switch only reads the header.
/// SQLite counts every allocation under a global mutex unless told not to
/// before its first connection (the bundled build keeps the default): a
/// lock and an unlock per allocation, 5 % of the store writer's time.
fn without_memory_statistics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: before any connection of this process (the Once runs at the
        // first open); after initialisation SQLite refuses it harmlessly.
        unsafe { rusqlite::ffi::sqlite3_config(rusqlite::ffi::SQLITE_CONFIG_MEMSTATUS, 0) };
    });
}

fn switch_to_wal(conn: &Connection) -> rusqlite::Result<String> {
    let mut attempts = 0;
    loop {
        match conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy && busy_wait(attempts) =>
            {
                attempts += 1;
            }
            result => return result,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: journal mode is {mode:?}, not WAL; the agent and the CLI could not share it")]
    NotWal { path: PathBuf, mode: String },
    #[error(
        "the database was written by a newer qgate: it has migrations this binary does not know \
         ({}); upgrade qgate-agent",
        unknown.join(", ")
    )]
    SchemaTooNew { unknown: Vec<String> },
    #[error("applying migration {name}: {source}")]
    Migration {
        name: &'static str,
        source: rusqlite::Error,
    },
    #[error(
        "audit entries must be durable: the connection runs with synchronous={level} inside the \
         caller's transaction, which needs synchronous=FULL (2) or EXTRA (3)"
    )]
    NotDurable { level: i64 },
    #[error("audit_head holds {0:?}, which is not a hash: run `qgate-agent audit verify`")]
    CorruptHead(String),
    #[error("seal group {0}: its reserved row is gone or already closed")]
    SealGroupGone(i64),
    #[error("audit entry details must be a JSON object, got {0}")]
    DetailsNotObject(&'static str),
    #[error(
        "invalid time {input:?}: expected RFC 3339 (2024-05-01T12:00:00Z) or a date (2024-05-01)"
    )]
    BadTime { input: String },
    #[error("time {0} ns is outside the range RFC 3339 can express")]
    TimeOutOfRange(i128),
    #[error("starting the store writer thread: {0}")]
    Spawn(std::io::Error),
    #[error("the store writer thread panicked")]
    WriterPanicked,
    #[error("writing the export: {0}")]
    Io(#[from] std::io::Error),
    #[error("writing CSV: {0}")]
    Csv(#[from] csv::Error),
    #[error("writing JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
}

/// One connection to the qgate database, migrated and configured.
///
/// Opened with `synchronous=FULL`: every commit is fsync'd, so a request,
/// approval or audit entry written through it survives a power cut. (The
/// [`Writer`] lowers this on its own connection: capture data may lose its
/// last batches on power loss, decisions may not.)
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

impl Store {
    /// Opens (creating it and its parent directories if needed) and migrates
    /// the database at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            create_private_dir(parent)?;
        }
        Self::open_with(path, OpenFlags::default())
    }

    /// Opens and migrates an existing database; fails if `path` does not
    /// exist. For the CLI, so a mistyped `--db` is an error rather than a
    /// new empty (and therefore "intact") database.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let flags = OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE);
        Self::open_with(path.as_ref(), flags)
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<Store, StoreError> {
        let open_error = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        without_memory_statistics();
        let mut conn = Connection::open_with_flags(path, flags).map_err(open_error)?;
        conn.busy_handler(Some(busy_wait)).map_err(open_error)?;
        let mode = switch_to_wal(&conn).map_err(open_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::NotWal {
                path: path.to_owned(),
                mode,
            });
        }
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_error)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_error)?;
        migrations::migrate(&mut conn)?;
        Ok(Store {
            conn,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn into_conn(self) -> Connection {
        self.conn
    }

    /// Records the kernel programs' cumulative counters (see
    /// [`qgate_common::Counters`]) at `at`, with `writer_dropped` events the
    /// [`Writer`] could not queue. Loss over a period is the difference of
    /// two records; a counter that goes down means the programs were reloaded.
    pub fn record_capture_loss(
        &self,
        at: UnixNanos,
        counters: &qgate_common::Counters,
        writer_dropped: u64,
    ) -> Result<(), StoreError> {
        insert_capture_loss(&self.conn, at, counters, writer_dropped)
    }
}

/// A read transaction on `conn` when it has none: what is read through it
/// is one consistent snapshot while other processes write. `None`: the
/// caller's transaction already is one.
pub(crate) fn read_snapshot(
    conn: &Connection,
) -> Result<Option<rusqlite::Transaction<'_>>, StoreError> {
    Ok(if conn.is_autocommit() {
        Some(rusqlite::Transaction::new_unchecked(
            conn,
            rusqlite::TransactionBehavior::Deferred,
        )?)
    } else {
        None
    })
}

pub(crate) fn insert_capture_loss(
    conn: &Connection,
    at: UnixNanos,
    counters: &qgate_common::Counters,
    writer_dropped: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO capture_loss (at, segments_seen, ringbuf_full, truncated, load_errors, writer_dropped, hook_lost)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute((
        at,
        sql_count(counters.segments_seen),
        sql_count(counters.ringbuf_full),
        sql_count(counters.truncated),
        sql_count(counters.load_errors),
        sql_count(writer_dropped),
        sql_count(counters.hook_lost),
    ))?;
    Ok(())
}

/// SQLite integers are signed; a count past `i64::MAX` cannot happen in
/// practice, and saturating keeps a corrupt counter from failing a batch.
pub(crate) fn sql_count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The database holds every statement text the agent saw: keep its directory
/// out of other users' reach when we are the ones creating it.
fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn default_path_is_the_shipped_configs() {
        let config = crate::config::Config::load(None).unwrap();
        assert_eq!(
            config.store.path,
            std::path::Path::new(super::DEFAULT_DB_PATH)
        );
    }
}
