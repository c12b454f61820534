//! The tamper-evident audit log: an append-only, hash-chained table.
//!
//! Entry `n` stores `hash = SHA-256(encode(id, at, kind, actor, request_id,
//! details, prev_hash))` where `prev_hash` is entry `n-1`'s hash (all zeros
//! for entry 1) and `encode` is the unambiguous encoding in [`entry_hash`].
//! A one-row table, `audit_head`, records how many entries there are and the
//! last one's id and hash, so deleting entries at the end is detected too.
//!
//! Triggers make the tables refuse `UPDATE` and `DELETE`, and refuse an
//! `INSERT` that does not extend the head: a bug in qgate cannot edit or fork
//! the log. They are a guard against mistakes, not against an attacker:
//! [`verify`] detects edits made with the triggers dropped.
//!
//! What verification cannot detect: someone with write access to the file
//! can drop the triggers, rewrite entries from some point on, recompute every
//! later hash and the head, and produce a log that verifies. Truncating the
//! log together with the head is the same attack. Detecting that needs a
//! copy of a recent head hash kept out of their reach (printed by
//! `qgate-agent audit verify`, shipped to a log host, or signed).
use std::fmt;

use rusqlite::{types::ValueRef, Connection, OptionalExtension, Row, TransactionBehavior};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{migrations::Migration, StoreError};
use crate::clock::UnixNanos;

/// The kind of an audit entry. Only the constants in [`kinds`] exist, so
/// every writer and every test spells a kind the same way (the column
/// stays free text so that a new kind needs no migration).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Kind(&'static str);

impl Kind {
    pub const fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Every kind of entry qgate writes, `stage.event` (a statement's decision
/// is plain `decision`).
pub mod kinds {
    use super::Kind;

    /// The gate decided a statement or a connection without a request
    /// (denied by policy, refused encrypted session, audit of a denial).
    pub const DECISION: Kind = Kind("decision");
    pub const REQUEST_CREATED: Kind = Kind("request.created");
    /// One reviewer's approval that does not yet reach the quorum.
    pub const REQUEST_APPROVAL: Kind = Kind("request.approval");
    pub const REQUEST_APPROVED: Kind = Kind("request.approved");
    pub const REQUEST_FORCE_APPROVED: Kind = Kind("request.force_approved");
    pub const REQUEST_DENIED: Kind = Kind("request.denied");
    pub const REQUEST_EXPIRED: Kind = Kind("request.expired");
    pub const REQUEST_WITHDRAWN: Kind = Kind("request.withdrawn");
    /// A reviewer approved statements before they were sent.
    pub const REQUEST_PREAPPROVED: Kind = Kind("request.preapproved");
    pub const REVIEWER_ADDED: Kind = Kind("reviewer.added");
    pub const REVIEWER_REVOKED: Kind = Kind("reviewer.revoked");
    pub const POLICY_RELOAD: Kind = Kind("policy.reload");
    /// A rule marked `shadow = true` matched: what it would have done.
    pub const POLICY_SHADOW: Kind = Kind("policy.shadow");
    pub const AGENT_START: Kind = Kind("agent.start");
    pub const AGENT_STOP: Kind = Kind("agent.stop");
    /// The kernel passed segments unreviewed because the agent was gone.
    pub const AGENT_FAILED_OPEN: Kind = Kind("agent.failed_open");
    pub const CAPTURE_REFUSED_SEGMENTS: Kind = Kind("capture.refused_segments");
    pub const CAPTURE_CONNECTIONS_SHED: Kind = Kind("capture.connections_shed");
    pub const BACKEND_TERMINATED: Kind = Kind("backend.terminated");
    /// A connection was reset to refuse a statement no rewrite could.
    pub const CONNECTION_RESET: Kind = Kind("gate.connection_reset");
    /// Captured statements and connections sealed into the chain
    /// (`store::seal`).
    pub const STORE_SEAL: Kind = Kind("store.seal");

    /// All of the above, for searches and tests.
    pub const ALL: &[Kind] = &[
        DECISION,
        REQUEST_CREATED,
        REQUEST_APPROVAL,
        REQUEST_APPROVED,
        REQUEST_FORCE_APPROVED,
        REQUEST_DENIED,
        REQUEST_EXPIRED,
        REQUEST_WITHDRAWN,
        REQUEST_PREAPPROVED,
        REVIEWER_ADDED,
        REVIEWER_REVOKED,
        POLICY_RELOAD,
        POLICY_SHADOW,
        AGENT_START,
        AGENT_STOP,
        AGENT_FAILED_OPEN,
        CAPTURE_REFUSED_SEGMENTS,
        CAPTURE_CONNECTIONS_SHED,
        BACKEND_TERMINATED,
        CONNECTION_RESET,
        STORE_SEAL,
    ];
}

/// What a caller logs; the id, time and hashes are filled in by [`append`].
pub struct AuditEntry<'a> {
    pub kind: Kind,
    pub actor: Option<&'a str>,
    pub request_id: Option<i64>,
    /// A JSON object; stored in canonical form (see [`canonical_json`]).
    pub details: serde_json::Value,
}

/// The `prev_hash` of the first entry.
pub const GENESIS_HASH: [u8; 32] = [0; 32];

pub const MIGRATIONS: &[Migration] = &[Migration {
    name: "audit_0001_hash_chain",
    sql: r#"
CREATE TABLE audit (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    actor      TEXT,
    request_id INTEGER,
    details    TEXT    NOT NULL,
    prev_hash  TEXT    NOT NULL,
    hash       TEXT    NOT NULL
) STRICT;
CREATE INDEX audit_at ON audit (at);
CREATE INDEX audit_request ON audit (request_id) WHERE request_id IS NOT NULL;

CREATE TABLE audit_head (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    entries   INTEGER NOT NULL,
    last_id   INTEGER NOT NULL,
    last_hash TEXT    NOT NULL
) STRICT;
INSERT INTO audit_head (id, entries, last_id, last_hash)
VALUES (1, 0, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only: UPDATE refused'); END;
CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only: DELETE refused'); END;
CREATE TRIGGER audit_extends_head BEFORE INSERT ON audit
WHEN NEW.id IS NOT (SELECT last_id + 1 FROM audit_head WHERE id = 1)
  OR NEW.prev_hash IS NOT (SELECT last_hash FROM audit_head WHERE id = 1)
BEGIN SELECT RAISE(ABORT, 'audit: entry does not extend the chain head'); END;
CREATE TRIGGER audit_advance_head AFTER INSERT ON audit
BEGIN
    UPDATE audit_head SET entries = entries + 1, last_id = NEW.id, last_hash = NEW.hash WHERE id = 1;
END;

CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
BEGIN SELECT RAISE(ABORT, 'audit_head: DELETE refused'); END;
CREATE TRIGGER audit_head_follows_log BEFORE UPDATE ON audit_head
WHEN NEW.entries IS NOT OLD.entries + 1
  OR NEW.last_id IS NOT (SELECT max(id) FROM audit)
  OR NEW.last_hash IS NOT (SELECT hash FROM audit WHERE id = NEW.last_id)
BEGIN SELECT RAISE(ABORT, 'audit_head only follows the audit table'); END;
"#,
}];

/// Appends `entry` and returns its id.
///
/// Outside a transaction, runs its own `BEGIN IMMEDIATE` transaction (the
/// previous hash is read under the write lock, so concurrent appenders in
/// other processes cannot fork the chain) and commits it with
/// `synchronous=FULL`: the entry is on disk when this returns.
///
/// Inside the caller's transaction, it becomes part of it: start that
/// transaction with [`TransactionBehavior::Immediate`] (a deferred one fails
/// with `SQLITE_BUSY` if another process appended meanwhile; it never forks),
/// on a connection with `synchronous=FULL` such as [`super::Store`]'s, or
/// this returns [`StoreError::NotDurable`].
pub fn append(conn: &Connection, entry: &AuditEntry<'_>) -> Result<i64, StoreError> {
    let details = canonical_details(&entry.details)?;
    if !conn.is_autocommit() {
        let level: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
        if level < SYNCHRONOUS_FULL {
            return Err(StoreError::NotDurable { level });
        }
        return insert_entry(conn, entry, &details);
    }
    let level: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    if level < SYNCHRONOUS_FULL {
        conn.pragma_update(None, "synchronous", SYNCHRONOUS_FULL)?;
    }
    let result = append_in_own_transaction(conn, entry, &details);
    if level < SYNCHRONOUS_FULL {
        // The entry is committed (or not) either way: failing here would
        // make a caller retry an append that happened.
        if let Err(e) = conn.pragma_update(None, "synchronous", level) {
            tracing::warn!("restoring synchronous={level} after an audit append: {e}");
        }
    }
    result
}

const SYNCHRONOUS_FULL: i64 = 2;

fn append_in_own_transaction(
    conn: &Connection,
    entry: &AuditEntry<'_>,
    details: &str,
) -> Result<i64, StoreError> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let id = insert_entry(&tx, entry, details)?;
    tx.commit()?;
    Ok(id)
}

fn insert_entry(
    conn: &Connection,
    entry: &AuditEntry<'_>,
    details: &str,
) -> Result<i64, StoreError> {
    let (last_id, last_hash): (i64, String) = conn.query_row(
        "SELECT last_id, last_hash FROM audit_head WHERE id = 1",
        [],
        |row| Ok((row.get(0)?, row.get(1)?)),
    )?;
    let prev_hash =
        decode_hash(&last_hash).ok_or_else(|| StoreError::CorruptHead(last_hash.clone()))?;
    let id = last_id + 1;
    let at = crate::clock::now();
    let hash = entry_hash(&HashedFields {
        id,
        at,
        kind: entry.kind.as_str(),
        actor: entry.actor,
        request_id: entry.request_id,
        details,
        prev_hash: &prev_hash,
    });
    conn.prepare_cached(
        "INSERT INTO audit (id, at, kind, actor, request_id, details, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute((
        id,
        at,
        entry.kind.as_str(),
        entry.actor,
        entry.request_id,
        details,
        &last_hash,
        encode_hash(&hash),
    ))?;
    Ok(id)
}

fn canonical_details(details: &Value) -> Result<String, StoreError> {
    match details {
        Value::Object(_) => Ok(canonical_json(details)),
        Value::Null => Err(StoreError::DetailsNotObject("null")),
        Value::Bool(_) => Err(StoreError::DetailsNotObject("a boolean")),
        Value::Number(_) => Err(StoreError::DetailsNotObject("a number")),
        Value::String(_) => Err(StoreError::DetailsNotObject("a string")),
        Value::Array(_) => Err(StoreError::DetailsNotObject("an array")),
    }
}

/// Compact JSON with object keys sorted by their UTF-8 bytes at every level,
/// whatever order the `Value` holds them in (serde_json keeps insertion
/// order when any crate in the build enables `preserve_order`). Numbers are
/// written as serde_json writes them. The hash covers the stored text, so
/// this only has to be deterministic for equal values, which it is.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The fields an entry's hash covers.
pub struct HashedFields<'a> {
    pub id: i64,
    pub at: UnixNanos,
    pub kind: &'a str,
    pub actor: Option<&'a str>,
    pub request_id: Option<i64>,
    pub details: &'a str,
    pub prev_hash: &'a [u8; 32],
}

/// SHA-256 over a versioned, length-prefixed encoding: integers as 8 bytes
/// big-endian, text as its byte length (8 bytes big-endian) then its UTF-8,
/// optional fields as a presence byte (0 or 1) then the value, `prev_hash`
/// as its 32 raw bytes. No two distinct entries encode the same.
pub fn entry_hash(fields: &HashedFields<'_>) -> [u8; 32] {
    fn text(h: &mut Sha256, s: &str) {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    }
    let mut h = Sha256::new();
    text(&mut h, "qgate-audit-v1");
    h.update(fields.id.to_be_bytes());
    h.update(fields.at.to_be_bytes());
    text(&mut h, fields.kind);
    match fields.actor {
        None => h.update([0]),
        Some(actor) => {
            h.update([1]);
            text(&mut h, actor);
        }
    }
    match fields.request_id {
        None => h.update([0]),
        Some(request_id) => {
            h.update([1]);
            h.update(request_id.to_be_bytes());
        }
    }
    text(&mut h, fields.details);
    h.update(fields.prev_hash);
    h.finalize().into()
}

pub fn encode_hash(hash: &[u8; 32]) -> String {
    use std::fmt::Write;
    hash.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Lowercase hex only, as [`encode_hash`] writes it: any other spelling of
/// the same bytes is an edit.
pub fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(out)
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Entries in the table.
    pub entries: u64,
    /// The hash of the last entry found intact: with no problem, the head of
    /// the log (keep a copy elsewhere to detect a rewrite of the whole tail;
    /// see the module docs).
    pub last_hash: Option<String>,
    /// The first problem in id order; `None` when the log is intact.
    pub first_problem: Option<Tamper>,
}

impl VerifyReport {
    pub fn is_intact(&self) -> bool {
        self.first_problem.is_none()
    }
}

/// The first entry that is not what was written, and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Tamper {
    /// The entry at fault (for a deletion, the first missing id).
    pub id: i64,
    pub problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum Problem {
    /// A column holds a value of the wrong type or shape.
    Malformed { column: &'static str },
    /// The stored hash is not the hash of the entry's fields: a field (or the
    /// hash) was edited, or the entry was forged.
    HashMismatch,
    /// The entry's fields are what was written as entry `written_as`: entries
    /// were reordered, or inserted or deleted with later ids renumbered.
    Moved { written_as: i64 },
    /// Entries `id..next` are missing (`next` is `None` past the end).
    Missing { next: Option<i64> },
    /// The entry is intact but the next one was chained to a different
    /// hash: this entry was rewritten and its hash recomputed.
    Rewritten { next: i64 },
    /// The entry chains to something that is not the previous entry's hash.
    BrokenLink,
    /// The entry is not counted in `audit_head`: appended outside qgate.
    NotInHead,
    /// `audit_head` is missing or contradicts the table.
    HeadMismatch { detail: String },
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let id = self.id;
        match &self.problem {
            Problem::Malformed { column } => {
                write!(f, "entry {id}: column {column} holds a value qgate never writes there")
            }
            Problem::HashMismatch => write!(
                f,
                "entry {id}: hash mismatch: its stored hash is not the hash of its fields (edited or forged)"
            ),
            Problem::Moved { written_as } => write!(
                f,
                "entry {id}: reordered: it holds the entry written as id {written_as} \
                 (entries were swapped, or inserted/deleted and renumbered)"
            ),
            Problem::Missing { next: Some(next) } if *next == id + 1 => write!(
                f,
                "entry {id}: missing (deleted): gap in ids between {} and {next}",
                id - 1
            ),
            Problem::Missing { next: Some(next) } => write!(
                f,
                "entry {id}: missing (deleted): gap in ids, entries {id} to {} are absent",
                next - 1
            ),
            Problem::Missing { next: None } => write!(
                f,
                "entry {id}: missing: the head records entries up to {id} or later, the table ends before it (deleted)"
            ),
            Problem::Rewritten { next } => write!(
                f,
                "entry {id}: broken link: entry {next} was chained to a different hash than entry \
                 {id} has now: entry {id} was rewritten and its hash recomputed (or entry {next}'s \
                 prev_hash and hash both were)"
            ),
            Problem::BrokenLink => write!(
                f,
                "entry {id}: broken link: its prev_hash is not the previous entry's hash"
            ),
            Problem::NotInHead => write!(
                f,
                "entry {id}: not recorded in audit_head: inserted outside qgate"
            ),
            Problem::HeadMismatch { detail } => write!(f, "entry {id}: audit_head mismatch: {detail}"),
        }
    }
}

/// One row as stored, types checked.
struct StoredEntry {
    id: i64,
    at: i64,
    kind: String,
    actor: Option<String>,
    request_id: Option<i64>,
    details: String,
    prev_hash: String,
    hash: String,
}

/// Why a row could not be read as an entry.
enum ReadError {
    Sqlite(rusqlite::Error),
    Malformed(&'static str),
}

impl From<rusqlite::Error> for ReadError {
    fn from(e: rusqlite::Error) -> Self {
        ReadError::Sqlite(e)
    }
}

fn int_column(row: &Row<'_>, i: usize, column: &'static str) -> Result<Option<i64>, ReadError> {
    match row.get_ref(i)? {
        ValueRef::Integer(v) => Ok(Some(v)),
        ValueRef::Null => Ok(None),
        _ => Err(ReadError::Malformed(column)),
    }
}

fn text_column(row: &Row<'_>, i: usize, column: &'static str) -> Result<Option<String>, ReadError> {
    match row.get_ref(i)? {
        ValueRef::Text(t) => std::str::from_utf8(t)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ReadError::Malformed(column)),
        ValueRef::Null => Ok(None),
        _ => Err(ReadError::Malformed(column)),
    }
}

fn required<T>(value: Option<T>, column: &'static str) -> Result<T, ReadError> {
    value.ok_or(ReadError::Malformed(column))
}

impl StoredEntry {
    /// Columns in the order of [`verify`]'s query. Type checks matter when
    /// the file was edited with a tool that ignores `STRICT`.
    fn read(row: &Row<'_>) -> Result<StoredEntry, ReadError> {
        Ok(StoredEntry {
            id: row.get(0)?,
            at: required(int_column(row, 1, "at")?, "at")?,
            kind: required(text_column(row, 2, "kind")?, "kind")?,
            actor: text_column(row, 3, "actor")?,
            request_id: int_column(row, 4, "request_id")?,
            details: required(text_column(row, 5, "details")?, "details")?,
            prev_hash: required(text_column(row, 6, "prev_hash")?, "prev_hash")?,
            hash: required(text_column(row, 7, "hash")?, "hash")?,
        })
    }

    /// The hash of these fields if the entry had id `id`; `None` when
    /// `prev_hash` is not a hash at all.
    fn hash_as(&self, id: i64) -> Option<[u8; 32]> {
        let prev_hash = decode_hash(&self.prev_hash)?;
        Some(entry_hash(&HashedFields {
            id,
            at: self.at,
            kind: &self.kind,
            actor: self.actor.as_deref(),
            request_id: self.request_id,
            details: &self.details,
            prev_hash: &prev_hash,
        }))
    }
}

fn malformed(id: i64, column: &'static str) -> Tamper {
    Tamper {
        id,
        problem: Problem::Malformed { column },
    }
}

/// Checks the whole chain and the head, in one read transaction (a
/// consistent snapshot even while another process appends). Reads entries
/// one at a time: memory does not grow with the log.
pub fn verify(conn: &Connection) -> Result<VerifyReport, StoreError> {
    let _snapshot = super::read_snapshot(conn)?;
    let mut entries = 0u64;
    let mut expected_id = 1i64;
    let mut expected_prev = encode_hash(&GENESIS_HASH);
    let mut last_hash = None;
    let mut suspect = None;
    {
        let mut stmt = conn.prepare(
            "SELECT id, at, kind, actor, request_id, details, prev_hash, hash FROM audit ORDER BY id",
        )?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            entries += 1;
            let entry = match StoredEntry::read(row) {
                Ok(entry) => entry,
                Err(ReadError::Sqlite(e)) => return Err(e.into()),
                Err(ReadError::Malformed(column)) => {
                    suspect = Some(Suspect::Found(malformed(row.get(0)?, column)));
                    break;
                }
            };
            if entry.id != expected_id {
                suspect = Some(Suspect::Found(Tamper {
                    id: expected_id,
                    problem: Problem::Missing {
                        next: Some(entry.id),
                    },
                }));
                break;
            }
            let self_consistent = entry
                .hash_as(entry.id)
                .is_some_and(|h| encode_hash(&h) == entry.hash);
            if !self_consistent || entry.prev_hash != expected_prev {
                suspect = Some(Suspect::Entry {
                    entry,
                    self_consistent,
                });
                break;
            }
            expected_id += 1;
            expected_prev = entry.hash.clone();
            last_hash = Some(entry.hash);
        }
    }
    let first_problem = match suspect {
        Some(Suspect::Found(tamper)) => Some(tamper),
        Some(Suspect::Entry {
            entry,
            self_consistent,
        }) => Some(diagnose(conn, &entry, self_consistent)?),
        None => check_head(conn, entries, expected_id - 1, last_hash.as_deref())?,
    };
    if first_problem.is_some() {
        entries =
            conn.query_row("SELECT count(*) FROM audit", [], |row| row.get::<_, i64>(0))? as u64;
    }
    Ok(VerifyReport {
        entries,
        last_hash,
        first_problem,
    })
}

enum Suspect {
    Found(Tamper),
    Entry {
        entry: StoredEntry,
        self_consistent: bool,
    },
}

/// Names what is wrong with `entry`, the first one that does not chain from
/// its (intact) predecessor. Only runs once, on a broken log, so it may scan.
fn diagnose(
    conn: &Connection,
    entry: &StoredEntry,
    self_consistent: bool,
) -> Result<Tamper, StoreError> {
    let id = entry.id;
    if decode_hash(&entry.prev_hash).is_none() {
        return Ok(malformed(id, "prev_hash"));
    }
    if decode_hash(&entry.hash).is_none() {
        return Ok(malformed(id, "hash"));
    }
    if self_consistent {
        // Its own fields are intact, so it was written chained to a
        // predecessor that is no longer there as it was.
        return Ok(if id > 1 {
            Tamper {
                id: id - 1,
                problem: Problem::Rewritten { next: id },
            }
        } else {
            Tamper {
                id,
                problem: Problem::BrokenLink,
            }
        });
    }
    if let Some(written_as) = written_as(conn, entry)? {
        return Ok(Tamper {
            id,
            problem: Problem::Moved { written_as },
        });
    }
    Ok(Tamper {
        id,
        problem: Problem::HashMismatch,
    })
}

/// The id under which `entry`'s fields hash to its stored hash, if another
/// one than its own: found by trying every id the table spans.
fn written_as(conn: &Connection, entry: &StoredEntry) -> Result<Option<i64>, StoreError> {
    let max_id: Option<i64> = conn.query_row("SELECT max(id) FROM audit", [], |row| row.get(0))?;
    let head_id: Option<i64> = conn
        .query_row("SELECT last_id FROM audit_head WHERE id = 1", [], |row| {
            row.get(0)
        })
        .optional()?;
    let span = max_id.unwrap_or(0).max(head_id.unwrap_or(0)) + 1;
    Ok((1..=span)
        .filter(|&candidate| candidate != entry.id)
        .find(|&candidate| {
            entry
                .hash_as(candidate)
                .is_some_and(|h| encode_hash(&h) == entry.hash)
        }))
}

/// The chain is intact through `last_id`; does the head agree?
fn check_head(
    conn: &Connection,
    entries: u64,
    last_id: i64,
    last_hash: Option<&str>,
) -> Result<Option<Tamper>, StoreError> {
    let head: Option<(i64, i64, String)> = conn
        .query_row(
            "SELECT entries, last_id, last_hash FROM audit_head WHERE id = 1",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .optional()?;
    let Some((head_entries, head_last_id, head_hash)) = head else {
        return Ok(Some(Tamper {
            id: last_id,
            problem: Problem::HeadMismatch {
                detail: "audit_head has no row (deleted)".into(),
            },
        }));
    };
    let table_hash = last_hash.map_or_else(|| encode_hash(&GENESIS_HASH), str::to_owned);
    if head_last_id > last_id {
        return Ok(Some(Tamper {
            id: last_id + 1,
            problem: Problem::Missing { next: None },
        }));
    }
    if head_last_id < last_id {
        return Ok(Some(Tamper {
            id: head_last_id + 1,
            problem: Problem::NotInHead,
        }));
    }
    if head_entries != last_id || entries as i64 != last_id || head_hash != table_hash {
        return Ok(Some(Tamper {
            id: last_id,
            problem: Problem::HeadMismatch {
                detail: format!(
                    "head records {head_entries} entries ending at id {head_last_id} with hash \
                     {head_hash}; the table has {entries} ending at id {last_id} with hash {table_hash}"
                ),
            },
        }));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_level() {
        let value = json!({"b": 1, "a": {"z": [true, null], "y": "é\"\n"}});
        assert_eq!(
            canonical_json(&value),
            r#"{"a":{"y":"é\"\n","z":[true,null]},"b":1}"#
        );
    }

    #[test]
    fn kinds_are_distinct_and_spelt_stage_dot_event() {
        let mut seen = std::collections::HashSet::new();
        for kind in kinds::ALL {
            assert!(seen.insert(kind.as_str()), "{kind} listed twice");
            let well_formed = kind.as_str() == "decision"
                || kind.as_str().split_once('.').is_some_and(|(stage, event)| {
                    [stage, event].iter().all(|part| {
                        !part.is_empty()
                            && part.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    })
                });
            assert!(well_formed, "{kind} is not stage.event");
        }
    }

    #[test]
    fn hash_encoding_separates_fields() {
        let prev = GENESIS_HASH;
        let base = HashedFields {
            id: 1,
            at: 2,
            kind: "ab",
            actor: Some("c"),
            request_id: None,
            details: "{}",
            prev_hash: &prev,
        };
        let shifted = HashedFields {
            kind: "a",
            actor: Some("bc"),
            ..base
        };
        assert_ne!(entry_hash(&base), entry_hash(&shifted));
        let no_actor = HashedFields {
            actor: None,
            ..base
        };
        let empty_actor = HashedFields {
            actor: Some(""),
            ..base
        };
        assert_ne!(entry_hash(&no_actor), entry_hash(&empty_actor));
    }

    #[test]
    fn hashes_round_trip_through_hex() {
        let hash = entry_hash(&HashedFields {
            id: 7,
            at: 0,
            kind: "decision",
            actor: None,
            request_id: Some(3),
            details: "{}",
            prev_hash: &GENESIS_HASH,
        });
        assert_eq!(decode_hash(&encode_hash(&hash)), Some(hash));
        assert_eq!(decode_hash(&encode_hash(&hash).to_uppercase()), None);
    }
}
