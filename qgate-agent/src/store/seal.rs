//! Seals: the captured statements and connections, chained into the
//! tamper-evident audit log in batches.
//!
//! The store's writer updates a row until it is final (a statement's
//! completion and decision, a connection's identity and end), so rows are
//! sealed once they are final, not when they are inserted. A seal pass
//! ([`seal`]) puts every row that became final into a new group: it sets
//! the rows' `sealed_in` to the group, stores for each row its id and a
//! 16-byte digest of its values (the statement's text resolved through
//! `statement_texts`) in the group's `seals` row, and appends a
//! `store.seal` entry to the audit chain holding the SHA-256 of those
//! lists and their counts. All in one transaction.
//!
//! [`verify`] recomputes every sealed row's digest and names the first row
//! that was edited, deleted, or added to a group, and a `seals` row that
//! no longer matches its chained entry. What it cannot see: a row not yet
//! sealed (the last few seconds of statements, and statements still
//! running), and a whole tail of the chain removed with its rows (only a
//! head kept elsewhere catches that: `audit verify --head`).
use std::collections::HashMap;

use rusqlite::{types::ValueRef, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use super::{
    audit::{self, AuditEntry},
    StoreError,
};
use crate::capture::UnixNanos;

/// The schema: a `sealed_in` column on the sealed tables (NULL: not yet
/// sealed), and one row per seal group.
pub const MIGRATION_SQL: &str = r#"
ALTER TABLE statement_log ADD COLUMN sealed_in INTEGER;
ALTER TABLE connections ADD COLUMN sealed_in INTEGER;
-- Only the unsealed rows: small, and what a seal pass looks for.
CREATE INDEX statement_log_unsealed ON statement_log (id) WHERE sealed_in IS NULL;
CREATE INDEX connections_unsealed ON connections (id) WHERE sealed_in IS NULL;
-- One row per group: for each sealed row, its id (8 bytes, big-endian)
-- and the first 16 bytes of the SHA-256 of its values, in id order.
CREATE TABLE seals (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    audit_id    INTEGER,
    statements  BLOB    NOT NULL,
    connections BLOB    NOT NULL
) STRICT;
"#;

/// Bytes per sealed row in a `seals` list: id, then digest.
const ENTRY: usize = 8 + DIGEST;
const DIGEST: usize = 16;

/// A sealed table: its name, and the query giving every column of its rows
/// as sealed (`?1`: the group), in id order.
struct Table {
    name: &'static str,
    rows_of_group: &'static str,
    all_sealed_rows: &'static str,
}

const STATEMENTS: Table = Table {
    name: "statements",
    rows_of_group: "SELECT l.id, l.connection_id, l.seq, coalesce(l.text, t.text), l.path,
            l.statement_name, l.received_at, l.completed_at, l.outcome, l.sqlstate,
            l.error_message, l.command_tag, l.rows, l.decision, l.rule, l.request_id, l.sealed_in
         FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id
         WHERE l.sealed_in = ?1 ORDER BY l.id",
    all_sealed_rows: "SELECT l.id, l.connection_id, l.seq, coalesce(l.text, t.text), l.path,
            l.statement_name, l.received_at, l.completed_at, l.outcome, l.sqlstate,
            l.error_message, l.command_tag, l.rows, l.decision, l.rule, l.request_id, l.sealed_in
         FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id
         WHERE l.sealed_in IS NOT NULL ORDER BY l.id",
};

const CONNECTIONS: Table = Table {
    name: "connections",
    rows_of_group: "SELECT id, client_addr, client_port, server_addr, server_port, user, database,
            application, encrypted, mid_stream, started_at, identified_at, ended_at, transport,
            gated_by, backend_pid, replayed_from, sealed_in
         FROM connections WHERE sealed_in = ?1 ORDER BY id",
    all_sealed_rows:
        "SELECT id, client_addr, client_port, server_addr, server_port, user, database,
            application, encrypted, mid_stream, started_at, identified_at, ended_at, transport,
            gated_by, backend_pid, replayed_from, sealed_in
         FROM connections WHERE sealed_in IS NOT NULL ORDER BY id",
};

/// Which rows a seal pass takes.
pub enum Scope<'a> {
    /// Rows up to these ids that are final: statements other than
    /// `pending` (still running: their completion is still to be written),
    /// connections that ended.
    Final {
        max_statement: i64,
        max_connection: i64,
        pending: &'a [i64],
    },
    /// Every unsealed row: nobody will write to them again (the writer
    /// stops, or they were left by an earlier agent).
    Everything,
}

/// What one seal pass sealed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    pub group: i64,
    pub statements: u64,
    pub connections: u64,
}

/// Seals the rows `scope` takes, in a transaction of its own; `None` when
/// there was nothing to seal. The chained entry is durable when this
/// returns (`synchronous=FULL` for the transaction).
pub fn seal(
    conn: &Connection,
    scope: Scope<'_>,
    at: UnixNanos,
) -> Result<Option<Sealed>, StoreError> {
    let level: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    if level < 2 {
        conn.pragma_update(None, "synchronous", 2)?;
    }
    let result = seal_in_transaction(conn, scope, at);
    if level < 2 {
        if let Err(e) = conn.pragma_update(None, "synchronous", level) {
            tracing::warn!("restoring synchronous={level} after a seal: {e}");
        }
    }
    result
}

fn seal_in_transaction(
    conn: &Connection,
    scope: Scope<'_>,
    at: UnixNanos,
) -> Result<Option<Sealed>, StoreError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO seals (at, statements, connections) VALUES (?1, x'', x'')",
        [at],
    )?;
    let group = tx.last_insert_rowid();
    let (statements, connections) = match scope {
        Scope::Final {
            max_statement,
            max_connection,
            pending,
        } => {
            let pending = serde_json::to_string(pending).unwrap_or_else(|_| "[]".into());
            let s = tx.execute(
                "UPDATE statement_log SET sealed_in = ?1
                 WHERE sealed_in IS NULL AND id <= ?2
                   AND id NOT IN (SELECT value FROM json_each(?3))",
                (group, max_statement, pending),
            )?;
            let c = tx.execute(
                "UPDATE connections SET sealed_in = ?1
                 WHERE sealed_in IS NULL AND id <= ?2 AND ended_at IS NOT NULL",
                (group, max_connection),
            )?;
            (s, c)
        }
        Scope::Everything => (
            tx.execute(
                "UPDATE statement_log SET sealed_in = ?1 WHERE sealed_in IS NULL",
                [group],
            )?,
            tx.execute(
                "UPDATE connections SET sealed_in = ?1 WHERE sealed_in IS NULL",
                [group],
            )?,
        ),
    };
    if statements == 0 && connections == 0 {
        // Nothing final since the last pass: no group, no entry.
        tx.rollback()?;
        return Ok(None);
    }
    let statement_list = list_of_group(&tx, &STATEMENTS, group)?;
    let connection_list = list_of_group(&tx, &CONNECTIONS, group)?;
    let summary = |list: &[u8]| {
        let first = list.get(..8).map(id_of);
        let last = list
            .len()
            .checked_sub(ENTRY)
            .map(|i| id_of(&list[i..i + 8]));
        serde_json::json!({
            "rows": list.len() / ENTRY,
            "first": first,
            "last": last,
            "sha256": audit::encode_hash(&Sha256::digest(list).into()),
        })
    };
    let audit_id = audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::STORE_SEAL,
            actor: None,
            request_id: None,
            details: serde_json::json!({
                "group": group,
                "statements": summary(&statement_list),
                "connections": summary(&connection_list),
            }),
        },
    )?;
    tx.execute(
        "UPDATE seals SET audit_id = ?2, statements = ?3, connections = ?4 WHERE id = ?1",
        (group, audit_id, &statement_list, &connection_list),
    )?;
    tx.commit()?;
    Ok(Some(Sealed {
        group,
        statements: statements as u64,
        connections: connections as u64,
    }))
}

fn id_of(bytes: &[u8]) -> i64 {
    let mut id = [0u8; 8];
    id.copy_from_slice(&bytes[..8]);
    i64::from_be_bytes(id)
}

/// The group's list: id and digest of each of its rows in `table`.
fn list_of_group(conn: &Connection, table: &Table, group: i64) -> Result<Vec<u8>, StoreError> {
    let mut stmt = conn.prepare_cached(table.rows_of_group)?;
    let mut rows = stmt.query([group])?;
    let mut list = Vec::new();
    while let Some(row) = rows.next()? {
        let (id, digest) = row_digest(table, row)?;
        list.extend_from_slice(&id.to_be_bytes());
        list.extend_from_slice(&digest);
    }
    Ok(list)
}

/// A row's id and digest: SHA-256 over the table's name and each column
/// as a type byte and its value (integers as 8 bytes, texts and blobs
/// length-prefixed), cut to 16 bytes.
fn row_digest(table: &Table, row: &rusqlite::Row<'_>) -> Result<(i64, [u8; DIGEST]), StoreError> {
    let mut h = Sha256::new();
    h.update((table.name.len() as u64).to_be_bytes());
    h.update(table.name.as_bytes());
    hash_columns(&mut h, row)?;
    let id: i64 = row.get(0)?;
    let mut digest = [0u8; DIGEST];
    digest.copy_from_slice(&h.finalize()[..DIGEST]);
    Ok((id, digest))
}

/// Each column as a type byte and its value (integers as 8 bytes, texts
/// and blobs length-prefixed).
fn hash_columns(h: &mut Sha256, row: &rusqlite::Row<'_>) -> Result<(), StoreError> {
    let columns = row.as_ref().column_count();
    for i in 0..columns {
        match row.get_ref(i)? {
            ValueRef::Null => h.update([0u8]),
            ValueRef::Integer(v) => {
                h.update([1u8]);
                h.update(v.to_be_bytes());
            }
            ValueRef::Real(v) => {
                h.update([2u8]);
                h.update(v.to_bits().to_be_bytes());
            }
            ValueRef::Text(v) => {
                h.update([3u8]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
            ValueRef::Blob(v) => {
                h.update([4u8]);
                h.update((v.len() as u64).to_be_bytes());
                h.update(v);
            }
        }
    }
    Ok(())
}

/// SHA-256 of every reviewer row (tokens' hashes, roles, groups, links,
/// revocations), in id order: each change qgate makes to the table puts
/// the digest of the result in its audit entry, so a change made behind
/// qgate's back (a role raised to admin, a token swapped) no longer
/// matches the last one.
pub fn reviewers_digest(conn: &Connection) -> Result<String, StoreError> {
    let mut h = Sha256::new();
    let mut stmt = conn.prepare_cached(
        "SELECT id, name, role, groups, db_users, token_sha256, created_at, revoked_at
         FROM reviewers ORDER BY id",
    )?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        hash_columns(&mut h, row)?;
    }
    Ok(audit::encode_hash(&h.finalize().into()))
}

/// Whether the reviewers table is as qgate's last change to it left it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ReviewersCheck {
    /// As the last `reviewer.*` entry recorded it.
    Intact { entry: i64 },
    /// No reviewer was ever added through qgate, and the table is empty.
    Empty,
    /// Changed since: not by qgate.
    Changed { entry: Option<i64> },
    /// The last change was recorded by a qgate too old to record digests.
    NotCovered { entry: i64 },
}

pub fn verify_reviewers(conn: &Connection) -> Result<ReviewersCheck, StoreError> {
    let last: Option<(i64, String)> = conn
        .query_row(
            "SELECT id, details FROM audit WHERE kind IN (?1, ?2) ORDER BY id DESC LIMIT 1",
            [
                audit::kinds::REVIEWER_ADDED.as_str(),
                audit::kinds::REVIEWER_REVOKED.as_str(),
            ],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let now = reviewers_digest(conn)?;
    let rows: i64 = conn.query_row("SELECT count(*) FROM reviewers", [], |r| r.get(0))?;
    Ok(match last {
        None if rows == 0 => ReviewersCheck::Empty,
        None => ReviewersCheck::Changed { entry: None },
        Some((entry, details)) => {
            let value: serde_json::Value = serde_json::from_str(&details).unwrap_or_default();
            match value["reviewers_sha256"].as_str() {
                None => ReviewersCheck::NotCovered { entry },
                Some(recorded) if recorded == now => ReviewersCheck::Intact { entry },
                Some(_) => ReviewersCheck::Changed { entry: Some(entry) },
            }
        }
    })
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SealReport {
    pub groups: u64,
    pub statements_sealed: u64,
    pub connections_sealed: u64,
    /// Rows not sealed yet: still running, or final for less than a seal
    /// interval. Not covered by the chain.
    pub statements_unsealed: u64,
    pub connections_unsealed: u64,
    /// The first problem, by table then row id; `None` when every sealed
    /// row is as it was sealed.
    pub first_problem: Option<SealProblem>,
}

/// A sealed row (or a seal group) that is not what was sealed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SealProblem {
    /// `statements`, `connections` or `seals`.
    pub table: &'static str,
    /// The row at fault (for `seals`, the group).
    pub id: i64,
    pub group: i64,
    pub what: &'static str,
}

impl std::fmt::Display for SealProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row {}: {} (seal group {})",
            self.table, self.id, self.what, self.group
        )
    }
}

/// One group's lists as the chain vouches for them.
struct Group {
    statements: HashMap<i64, [u8; DIGEST]>,
    connections: HashMap<i64, [u8; DIGEST]>,
}

/// Checks every seal group against its chained entry and every sealed row
/// against its group's list. Verify the chain itself first
/// ([`audit::verify`]): this trusts the `store.seal` entries it reads.
pub fn verify(conn: &Connection) -> Result<SealReport, StoreError> {
    let mut report = SealReport::default();
    let mut groups: HashMap<i64, Group> = HashMap::new();
    // The chain's word for each group.
    let mut vouched: HashMap<i64, (String, String)> = HashMap::new();
    {
        let mut stmt = conn.prepare("SELECT details FROM audit WHERE kind = ?1 ORDER BY id")?;
        let mut rows = stmt.query([audit::kinds::STORE_SEAL.as_str()])?;
        while let Some(row) = rows.next()? {
            let details: String = row.get(0)?;
            let value: serde_json::Value = serde_json::from_str(&details).unwrap_or_default();
            let hash = |table: &str| {
                value[table]["sha256"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            };
            if let Some(group) = value["group"].as_i64() {
                vouched.insert(group, (hash("statements"), hash("connections")));
            }
        }
    }
    {
        let mut stmt = conn.prepare("SELECT id, statements, connections FROM seals ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let group: i64 = row.get(0)?;
            let statements: Vec<u8> = row.get(1)?;
            let connections: Vec<u8> = row.get(2)?;
            let sha = |list: &[u8]| audit::encode_hash(&Sha256::digest(list).into());
            let intact = vouched
                .remove(&group)
                .is_some_and(|(s, c)| s == sha(&statements) && c == sha(&connections));
            if !intact {
                report.first_problem.get_or_insert(SealProblem {
                    table: "seals",
                    id: group,
                    group,
                    what: "its lists are not the ones its chained store.seal entry vouches for",
                });
                continue;
            }
            report.groups += 1;
            groups.insert(
                group,
                Group {
                    statements: decode(&statements),
                    connections: decode(&connections),
                },
            );
        }
    }
    if let Some((&group, _)) = vouched.iter().min_by_key(|(g, _)| **g) {
        report.first_problem.get_or_insert(SealProblem {
            table: "seals",
            id: group,
            group,
            what: "the group's seals row is gone (its chained entry remains)",
        });
    }
    for table in [&STATEMENTS, &CONNECTIONS] {
        let problem = verify_table(conn, table, &mut groups, &mut report)?;
        if let Some(problem) = problem {
            report.first_problem.get_or_insert(problem);
        }
    }
    let unsealed = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0));
    report.statements_unsealed =
        unsealed("SELECT count(*) FROM statement_log WHERE sealed_in IS NULL")? as u64;
    report.connections_unsealed =
        unsealed("SELECT count(*) FROM connections WHERE sealed_in IS NULL")? as u64;
    Ok(report)
}

impl Group {
    fn list(&mut self, table: &Table) -> &mut HashMap<i64, [u8; DIGEST]> {
        if table.name == STATEMENTS.name {
            &mut self.statements
        } else {
            &mut self.connections
        }
    }
}

fn decode(list: &[u8]) -> HashMap<i64, [u8; DIGEST]> {
    list.chunks_exact(ENTRY)
        .map(|e| {
            let mut digest = [0u8; DIGEST];
            digest.copy_from_slice(&e[8..]);
            (id_of(e), digest)
        })
        .collect()
}

fn verify_table(
    conn: &Connection,
    table: &Table,
    groups: &mut HashMap<i64, Group>,
    report: &mut SealReport,
) -> Result<Option<SealProblem>, StoreError> {
    let mut first = None;
    let mut stmt = conn.prepare(table.all_sealed_rows)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let group: i64 = row.get(row.as_ref().column_count() - 1)?;
        let (id, digest) = row_digest(table, row)?;
        let problem = |what| SealProblem {
            table: table.name,
            id,
            group,
            what,
        };
        if table.name == STATEMENTS.name {
            report.statements_sealed += 1;
        } else {
            report.connections_sealed += 1;
        }
        let Some(g) = groups.get_mut(&group) else {
            first.get_or_insert(problem("sealed in a group that does not exist"));
            continue;
        };
        match g.list(table).remove(&id) {
            Some(sealed) if sealed == digest => {}
            Some(_) => {
                first.get_or_insert(problem("edited after it was sealed"));
            }
            None => {
                first.get_or_insert(problem("not in its group's list: added or moved"));
            }
        }
    }
    // Whatever a list still names was deleted (or taken out of its group).
    let mut missing: Option<(i64, i64)> = None;
    for (&group, g) in groups.iter_mut() {
        if let Some(&id) = g.list(table).keys().min() {
            if missing.is_none_or(|(m, _)| id < m) {
                missing = Some((id, group));
            }
        }
    }
    if let Some((id, group)) = missing {
        let deleted = SealProblem {
            table: table.name,
            id,
            group,
            what: "deleted (or taken out of its group) after it was sealed",
        };
        first = Some(match first {
            Some(p) if p.id < id => p,
            _ => deleted,
        });
    }
    Ok(first)
}

/// The largest row ids now, for the next pass's [`Scope::Final`] (rows
/// seen final a full interval after they were written).
pub fn high_water(conn: &Connection) -> Result<(i64, i64), StoreError> {
    let max = |sql: &str| {
        conn.query_row(sql, [], |r| r.get::<_, Option<i64>>(0))
            .optional()
            .map(|v| v.flatten().unwrap_or(0))
    };
    Ok((
        max("SELECT max(id) FROM statement_log")?,
        max("SELECT max(id) FROM connections")?,
    ))
}

/// Everything `audit verify` checks, in one read snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StoreReport {
    pub chain: audit::VerifyReport,
    pub seals: SealReport,
    pub reviewers: ReviewersCheck,
    /// With a head seen elsewhere (`--head`): the entry it names, or `None`
    /// when the store holds no such entry (its tail was cut or rolled
    /// back, or it is another store).
    pub head: Option<HeadCheck>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HeadCheck {
    pub hash: String,
    pub entry: Option<i64>,
}

impl StoreReport {
    pub fn is_intact(&self) -> bool {
        self.chain.is_intact()
            && self.seals.first_problem.is_none()
            && !matches!(self.reviewers, ReviewersCheck::Changed { .. })
            && self.head.as_ref().is_none_or(|h| h.entry.is_some())
    }
}

/// The chain, the sealed rows, the reviewers table, and (given) a head
/// seen elsewhere. The seals are only checked on an intact chain: they
/// trust its `store.seal` entries.
pub fn verify_store(conn: &Connection, head: Option<&str>) -> Result<StoreReport, StoreError> {
    let _snapshot = if conn.is_autocommit() {
        Some(rusqlite::Transaction::new_unchecked(
            conn,
            TransactionBehavior::Deferred,
        )?)
    } else {
        None
    };
    let chain = audit::verify(conn)?;
    let seals = if chain.is_intact() {
        verify(conn)?
    } else {
        SealReport::default()
    };
    let reviewers = verify_reviewers(conn)?;
    let head = match head {
        Some(hash) => Some(HeadCheck {
            hash: hash.to_owned(),
            entry: conn
                .query_row(
                    "SELECT id FROM audit WHERE hash = ?1",
                    [hash.to_ascii_lowercase()],
                    |r| r.get(0),
                )
                .optional()?,
        }),
        None => None,
    };
    Ok(StoreReport {
        chain,
        seals,
        reviewers,
        head,
    })
}

/// Writes the chain's head (last entry id and hash) to the system log,
/// facility `authpriv`, and to the agent's log: a copy the store's owner
/// cannot rewrite alone, to check the store against later with `audit
/// verify --head HASH`.
pub fn publish_head(conn: &Connection) -> Result<(), StoreError> {
    static OPEN: std::sync::Once = std::sync::Once::new();
    let (id, hash): (i64, String) = conn.query_row(
        "SELECT last_id, last_hash FROM audit_head WHERE id = 1",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    tracing::info!(entry = id, hash = %hash, "audit head");
    let line = format!("audit head: entry {id} hash {hash}");
    let Ok(line) = std::ffi::CString::new(line) else {
        return Ok(());
    };
    OPEN.call_once(|| {
        // SAFETY: a static NUL-terminated ident that outlives every call.
        unsafe { libc::openlog(c"qgate-agent".as_ptr(), libc::LOG_PID, libc::LOG_AUTHPRIV) };
    });
    // SAFETY: a constant "%s" format and one NUL-terminated argument.
    unsafe {
        libc::syslog(
            libc::LOG_AUTHPRIV | libc::LOG_NOTICE,
            c"%s".as_ptr(),
            line.as_ptr(),
        )
    };
    Ok(())
}
