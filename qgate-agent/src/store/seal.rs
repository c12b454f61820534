//! Seals: the captured statements and connections, chained into the
//! tamper-evident audit log in batches.
//!
//! The store's writer updates a row until it is final (a statement's
//! completion and decision, a connection's end), so rows are sealed once
//! final, and sealed where the values already are: in the writer's memory.
//! A statement written final (or completed later) gets the open group's
//! number in its `sealed_in` column in that same INSERT or UPDATE; its
//! digest (SHA-256 of its values, the text resolved, cut to 8 bytes) is
//! taken one batch later from the values the writer wrote, so a decision
//! noted a moment after its statement still lands (the [`Sealer`]). Every
//! few seconds the group is closed: its list (each row's id and digest) is
//! stored in `seals` and a `store.seal` entry holding the list's SHA-256
//! and counts is appended to the audit chain. Nothing is read back and no
//! row is rewritten for it. Rows left unsealed by an earlier writer are
//! sealed by reading them back ([`seal_leftovers`]): rare and small.
//!
//! [`verify`] recomputes every sealed row's digest and names the first row
//! that was edited, deleted, or added to a group, and a `seals` row that
//! no longer matches its chained entry. What it cannot see: a row not yet
//! sealed (the last seconds of statements, and statements still running),
//! and a whole tail of the chain removed with its rows (only a head kept
//! elsewhere catches that: `audit verify --head`).
use std::collections::HashMap;

use rusqlite::{types::ValueRef, Connection, OptionalExtension, TransactionBehavior};
use sha2::{Digest, Sha256};

use super::{
    audit::{self, AuditEntry},
    StoreError,
};
use crate::clock::UnixNanos;

/// The schema: a `sealed_in` column on the sealed tables (NULL: not yet
/// sealed), and one row per seal group.
pub const MIGRATION_SQL: &str = r#"
ALTER TABLE statement_log ADD COLUMN sealed_in INTEGER;
ALTER TABLE connections ADD COLUMN sealed_in INTEGER;
-- Only the unsealed rows (a statement still running, a connection still
-- open): small, and what a leftover pass looks for.
CREATE INDEX statement_log_unsealed ON statement_log (id) WHERE sealed_in IS NULL;
CREATE INDEX connections_unsealed ON connections (id) WHERE sealed_in IS NULL;
-- One row per group: for each sealed row, in id order, the id's distance
-- from the previous one (LEB128) and the row's 8-byte digest. A writer
-- reserves its open group's row (audit_id 0, empty lists) when it opens
-- it, so two writers never share a group.
CREATE TABLE seals (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    audit_id    INTEGER NOT NULL,
    statements  BLOB    NOT NULL,
    connections BLOB    NOT NULL
) STRICT;
"#;

const DIGEST: usize = 8;
type RowDigest = [u8; DIGEST];

/// One column's value as the digest encodes it.
#[derive(Clone, Copy)]
enum Field<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Other(&'a [u8]),
}

impl<'a> From<ValueRef<'a>> for Field<'a> {
    fn from(value: ValueRef<'a>) -> Self {
        match value {
            ValueRef::Null => Field::Null,
            ValueRef::Integer(v) => Field::Int(v),
            // Never written by qgate: kept apart from any text.
            ValueRef::Real(_) => Field::Other(b"real"),
            ValueRef::Text(v) => match std::str::from_utf8(v) {
                Ok(t) => Field::Text(t),
                Err(_) => Field::Other(v),
            },
            ValueRef::Blob(v) => Field::Other(v),
        }
    }
}

fn opt_text(v: &Option<String>) -> Field<'_> {
    v.as_deref().map_or(Field::Null, Field::Text)
}

fn opt_int(v: Option<i64>) -> Field<'static> {
    v.map_or(Field::Null, Field::Int)
}

/// SHA-256 over the table's name and each field as a type byte and its
/// value (integers as 8 bytes, texts and bytes length-prefixed), cut.
fn digest_of(table: &str, fields: &[Field<'_>]) -> RowDigest {
    let mut h = Sha256::new();
    h.update((table.len() as u64).to_be_bytes());
    h.update(table.as_bytes());
    for field in fields {
        feed(&mut h, *field);
    }
    let mut digest = [0u8; DIGEST];
    digest.copy_from_slice(&h.finalize()[..DIGEST]);
    digest
}

fn feed(h: &mut Sha256, field: Field<'_>) {
    match field {
        Field::Null => h.update([0u8]),
        Field::Int(v) => {
            h.update([1u8]);
            h.update(v.to_be_bytes());
        }
        Field::Text(v) => {
            h.update([3u8]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v.as_bytes());
        }
        Field::Other(v) => {
            h.update([4u8]);
            h.update((v.len() as u64).to_be_bytes());
            h.update(v);
        }
    }
}

/// The sealed columns of each table, `sealed_in` last (it groups the rows
/// and is not itself hashed: a row moved to another group is missing from
/// one list and foreign to the other).
const STATEMENT_COLUMNS: &str = "l.id, l.connection_id, l.seq, coalesce(l.text, t.text), l.path,
    l.statement_name, l.received_at, l.completed_at, l.outcome, l.sqlstate, l.error_message,
    l.command_tag, l.rows, l.decision, l.rule, l.request_id, l.sealed_in
    FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id";
const CONNECTION_COLUMNS: &str = "id, client_addr, client_port, server_addr, server_port, user,
    database, application, encrypted, mid_stream, started_at, identified_at, ended_at, transport,
    gated_by, backend_pid, replayed_from, protocol, sealed_in FROM connections";

/// A row read back: its id, digest and group.
fn read_row(
    table: &str,
    row: &rusqlite::Row<'_>,
) -> Result<(i64, RowDigest, Option<i64>), StoreError> {
    let n = row.as_ref().column_count();
    let mut fields = Vec::with_capacity(n - 1);
    for i in 0..n - 1 {
        fields.push(Field::from(row.get_ref(i)?));
    }
    // Columns added after rows were sealed (`connections.protocol`) are
    // hashed only when set: a row sealed before them, NULL there, keeps
    // its digest, and a value set or cleared later still changes it.
    if table == "connections" && matches!(fields.last(), Some(Field::Null)) {
        fields.pop();
    }
    Ok((row.get(0)?, digest_of(table, &fields), row.get(n - 1)?))
}

/// A statement row's identity and text, as the writer inserts them.
pub struct Written<'a> {
    pub id: i64,
    pub connection_id: i64,
    pub seq: i64,
    pub text: &'a str,
    pub path: &'a str,
    pub statement_name: Option<&'a str>,
    pub received_at: i64,
}

/// A statement's completion, as the writer writes it.
pub struct Completed<'a> {
    pub completed_at: Option<i64>,
    pub outcome: &'a str,
    pub sqlstate: Option<&'a str>,
    pub error_message: Option<&'a str>,
    pub command_tag: Option<&'a str>,
    pub rows: Option<i64>,
}

/// What the agent decided for a statement (NULLs when it was not asked).
#[derive(Clone, Debug, Default)]
pub struct DecisionFields {
    pub decision: Option<&'static str>,
    pub rule: Option<String>,
    pub request_id: Option<i64>,
}

/// A statement row's digest in the making: the columns up to its
/// completion are hashed as they are written (in the order `verify` reads
/// them: identity and text, then completion), the decision kept apart
/// until the digest is taken (it may still come). No text is copied.
#[derive(Clone)]
struct RowHash {
    state: Sha256,
    decision: DecisionFields,
}

impl RowHash {
    fn start(row: &Written<'_>) -> RowHash {
        let mut state = Sha256::new();
        let table = "statements";
        state.update((table.len() as u64).to_be_bytes());
        state.update(table.as_bytes());
        for field in [
            Field::Int(row.id),
            Field::Int(row.connection_id),
            Field::Int(row.seq),
            Field::Text(row.text),
            Field::Text(row.path),
            row.statement_name.map_or(Field::Null, Field::Text),
            Field::Int(row.received_at),
        ] {
            feed(&mut state, field);
        }
        RowHash {
            state,
            decision: DecisionFields::default(),
        }
    }

    fn complete(&mut self, c: &Completed<'_>) {
        fn text(v: Option<&str>) -> Field<'_> {
            v.map_or(Field::Null, Field::Text)
        }
        for field in [
            opt_int(c.completed_at),
            Field::Text(c.outcome),
            text(c.sqlstate),
            text(c.error_message),
            text(c.command_tag),
            opt_int(c.rows),
        ] {
            feed(&mut self.state, field);
        }
    }

    fn digest(self) -> RowDigest {
        let mut state = self.state;
        let d = self.decision;
        feed(&mut state, d.decision.map_or(Field::Null, Field::Text));
        feed(&mut state, opt_text(&d.rule));
        feed(&mut state, opt_int(d.request_id));
        let mut digest = [0u8; DIGEST];
        digest.copy_from_slice(&state.finalize()[..DIGEST]);
        digest
    }
}

/// A group's list: per row the LEB128 distance of its id from the previous
/// one, then its digest.
fn encode_list(rows: &mut [(i64, RowDigest)]) -> Vec<u8> {
    rows.sort_unstable_by_key(|(id, _)| *id);
    let mut out = Vec::with_capacity(rows.len() * (DIGEST + 2));
    let mut last = 0i64;
    for (id, digest) in rows.iter() {
        let mut delta = (*id - last) as u64;
        last = *id;
        loop {
            let byte = (delta & 0x7f) as u8;
            delta >>= 7;
            if delta == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(digest);
    }
    out
}

/// `None`: not a list [`encode_list`] wrote.
fn decode_list(list: &[u8]) -> Option<HashMap<i64, RowDigest>> {
    let mut out = HashMap::new();
    let (mut i, mut last) = (0usize, 0i64);
    while i < list.len() {
        let (mut delta, mut shift) = (0u64, 0u32);
        loop {
            let byte = *list.get(i)?;
            i += 1;
            delta |= u64::from(byte & 0x7f).checked_shl(shift)?;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        last = last.checked_add(i64::try_from(delta).ok()?)?;
        out.insert(last, list.get(i..i + DIGEST)?.try_into().ok()?);
        i += DIGEST;
    }
    Some(out)
}

/// What one group held when it was closed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sealed {
    pub group: i64,
    pub statements: u64,
    pub connections: u64,
}

type Rows = HashMap<i64, RowHash, foldhash::fast::RandomState>;

/// The writer's side of sealing: the open group, and the statements it
/// wrote whose digest is not taken yet.
pub struct Sealer {
    group: i64,
    /// Statements still running, and final ones whose digest waits a batch.
    rows: Rows,
    /// Final in the current batch / in the previous one.
    current: Vec<i64>,
    previous: Vec<i64>,
    /// The open group's digested statements, and its connections.
    statements: Vec<(i64, RowDigest)>,
    /// Statements written in a page by the current batch, digested: they
    /// join `statements` when the batch commits.
    paged: Vec<(i64, RowDigest)>,
    connections: Vec<i64>,
    /// Where the current batch began, to forget it if it rolls back.
    mark: (usize, usize),
}

impl Sealer {
    /// Reserves a group in `conn`'s store and opens it.
    pub fn open(conn: &Connection) -> Result<Sealer, StoreError> {
        Ok(Sealer {
            group: reserve_group(conn)?,
            rows: Rows::default(),
            current: Vec::new(),
            previous: Vec::new(),
            statements: Vec::new(),
            paged: Vec::new(),
            connections: Vec::new(),
            mark: (0, 0),
        })
    }

    /// The group a row written final now goes into (`sealed_in`).
    pub fn group(&self) -> i64 {
        self.group
    }

    /// A statement written: final (with its completion; `sealed_in` set to
    /// [`Sealer::group`]) or still running.
    pub fn written(
        &mut self,
        row: &Written<'_>,
        completion: Option<&Completed<'_>>,
        decision: DecisionFields,
    ) {
        let mut hash = RowHash::start(row);
        hash.decision = decision;
        if let Some(c) = completion {
            hash.complete(c);
            self.current.push(row.id);
        }
        self.rows.insert(row.id, hash);
    }

    /// A final statement written in a page (into [`Sealer::group`]): its
    /// digest is taken now, so nothing about it may change any more.
    pub fn paged(
        &mut self,
        row: &Written<'_>,
        completion: &Completed<'_>,
        decision: DecisionFields,
    ) {
        let mut hash = RowHash::start(row);
        hash.complete(completion);
        hash.decision = decision;
        self.paged.push((row.id, hash.digest()));
    }

    /// A running statement completed (its row now in [`Sealer::group`]).
    /// `false`: its values are unknown here (not written by this writer).
    pub fn completed(&mut self, id: i64, completion: &Completed<'_>) -> bool {
        match self.rows.get_mut(&id) {
            Some(hash) => {
                hash.complete(completion);
                self.current.push(id);
                true
            }
            None => false,
        }
    }

    /// A decision for a written statement. `false`: its digest was taken
    /// already, so the row must not change any more.
    pub fn decided(&mut self, id: i64, decision: DecisionFields) -> bool {
        match self.rows.get_mut(&id) {
            Some(hash) => {
                hash.decision = decision;
                true
            }
            None => false,
        }
    }

    /// A connection ended (its row now in [`Sealer::group`]).
    pub fn connection_ended(&mut self, row: i64) {
        self.connections.push(row);
    }

    /// The batch committed: digests of the rows final since the one
    /// before, whose decisions had a batch to arrive.
    pub fn committed(&mut self) {
        self.statements.append(&mut self.paged);
        for id in self.previous.drain(..) {
            if let Some(hash) = self.rows.remove(&id) {
                self.statements.push((id, hash.digest()));
            }
        }
        std::mem::swap(&mut self.previous, &mut self.current);
        self.mark = (0, self.connections.len());
    }

    /// The batch rolled back: forget what it marked final, and take the
    /// rows it touched from the store again (the retry writes them anew).
    pub fn rolled_back(&mut self, conn: &Connection) -> Result<(), StoreError> {
        self.paged.clear();
        self.current.truncate(self.mark.0);
        self.connections.truncate(self.mark.1);
        let final_before: std::collections::HashSet<i64> =
            self.previous.iter().chain(&self.current).copied().collect();
        let ids: Vec<i64> = self.rows.keys().copied().collect();
        let mut stmt = conn.prepare(&format!("SELECT {STATEMENT_COLUMNS} WHERE l.id = ?1"))?;
        for id in ids {
            let hash = stmt
                .query_row([id], |r| {
                    let text = |i| r.get::<_, Option<String>>(i);
                    let (text_col, path, name) = (
                        text(3)?.unwrap_or_default(),
                        r.get::<_, String>(4)?,
                        text(5)?,
                    );
                    let mut hash = RowHash::start(&Written {
                        id: r.get(0)?,
                        connection_id: r.get(1)?,
                        seq: r.get(2)?,
                        text: &text_col,
                        path: &path,
                        statement_name: name.as_deref(),
                        received_at: r.get(6)?,
                    });
                    let completed_at: Option<i64> = r.get(7)?;
                    if completed_at.is_some() || final_before.contains(&id) {
                        let (outcome, sqlstate, message, tag) =
                            (r.get::<_, String>(8)?, text(9)?, text(10)?, text(11)?);
                        hash.complete(&Completed {
                            completed_at,
                            outcome: &outcome,
                            sqlstate: sqlstate.as_deref(),
                            error_message: message.as_deref(),
                            command_tag: tag.as_deref(),
                            rows: r.get(12)?,
                        });
                    }
                    hash.decision = DecisionFields {
                        decision: match r.get::<_, Option<String>>(13)?.as_deref() {
                            Some("allow") => Some("allow"),
                            Some("deny") => Some("deny"),
                            Some("hold") => Some("hold"),
                            Some(_) => Some("unknown"),
                            None => None,
                        },
                        rule: text(14)?,
                        request_id: r.get(15)?,
                    };
                    Ok(hash)
                })
                .optional()?;
            match hash {
                Some(hash) => {
                    self.rows.insert(id, hash);
                }
                None => {
                    self.rows.remove(&id);
                }
            }
        }
        let known = |id: &i64| self.rows.contains_key(id);
        self.previous.retain(known);
        self.current.retain(known);
        self.mark = (self.current.len(), self.connections.len());
        Ok(())
    }

    /// Closes the open group: every final row's digest is taken now, the
    /// list goes into `seals` and its hash into the audit chain, in one
    /// transaction (`synchronous=FULL` for it). On failure the group stays
    /// open and the next close tries again with more rows.
    pub fn close(
        &mut self,
        conn: &Connection,
        at: UnixNanos,
    ) -> Result<Option<Sealed>, StoreError> {
        for id in self.previous.drain(..).chain(self.current.drain(..)) {
            if let Some(hash) = self.rows.remove(&id) {
                self.statements.push((id, hash.digest()));
            }
        }
        self.mark = (0, self.connections.len());
        if self.statements.is_empty() && self.connections.is_empty() {
            return Ok(None);
        }
        let sealed = with_full_sync(conn, |tx| {
            let mut connections = Vec::with_capacity(self.connections.len());
            let mut stmt =
                tx.prepare_cached(&format!("SELECT {CONNECTION_COLUMNS} WHERE id = ?1"))?;
            for &id in &self.connections {
                let mut rows = stmt.query([id])?;
                if let Some(row) = rows.next()? {
                    let (id, digest, _) = read_row("connections", row)?;
                    connections.push((id, digest));
                }
            }
            let mut statements = self.statements.clone();
            let sealed = write_group(tx, self.group, &mut statements, &mut connections, at)?;
            Ok((sealed, reserve_group(tx)?))
        })?;
        self.statements.clear();
        self.connections.clear();
        self.mark = (0, 0);
        self.group = sealed.1;
        Ok(Some(sealed.0))
    }
}

/// A new group's number: its `seals` row, reserved.
fn reserve_group(conn: &Connection) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO seals (at, audit_id, statements, connections) VALUES (?1, 0, x'', x'')",
        [crate::clock::now()],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Runs `f` in an IMMEDIATE transaction on `conn` with synchronous=FULL
/// (an audit entry is on disk when its transaction returns).
fn with_full_sync<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let level: i64 = conn.pragma_query_value(None, "synchronous", |row| row.get(0))?;
    if level < 2 {
        conn.pragma_update(None, "synchronous", 2)?;
    }
    let result = (|| {
        let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    })();
    if level < 2 {
        if let Err(e) = conn.pragma_update(None, "synchronous", level) {
            tracing::warn!("restoring synchronous={level} after a seal: {e}");
        }
    }
    result
}

/// Stores a group's lists and chains their hashes.
fn write_group(
    tx: &Connection,
    group: i64,
    statements: &mut [(i64, RowDigest)],
    connections: &mut [(i64, RowDigest)],
    at: UnixNanos,
) -> Result<Sealed, StoreError> {
    let (statement_list, connection_list) = (encode_list(statements), encode_list(connections));
    let summary = |rows: &[(i64, RowDigest)], list: &[u8]| {
        serde_json::json!({
            "rows": rows.len(),
            "first": rows.first().map(|r| r.0),
            "last": rows.last().map(|r| r.0),
            "sha256": audit::encode_hash(&Sha256::digest(list).into()),
        })
    };
    let audit_id = audit::append(
        tx,
        &AuditEntry {
            kind: audit::kinds::STORE_SEAL,
            actor: None,
            request_id: None,
            details: serde_json::json!({
                "group": group,
                "statements": summary(statements, &statement_list),
                "connections": summary(connections, &connection_list),
            }),
        },
    )?;
    let filled = tx.execute(
        "UPDATE seals SET at = ?2, audit_id = ?3, statements = ?4, connections = ?5
         WHERE id = ?1 AND audit_id = 0",
        (group, at, audit_id, &statement_list, &connection_list),
    )?;
    if filled != 1 {
        return Err(StoreError::SealGroupGone(group));
    }
    Ok(Sealed {
        group,
        statements: statements.len() as u64,
        connections: connections.len() as u64,
    })
}

/// Seals, by reading them back, every row still unsealed: rows an earlier
/// writer left (it stopped before they were final) or this writer's last
/// running statements and open connections when it stops. Nothing writes
/// to them afterwards. In a group of its own.
///
/// One writer per store at a time: a second one starting would take the
/// first one's running statements for leftovers (a replay writes a store
/// of its own).
pub fn seal_leftovers(conn: &Connection, at: UnixNanos) -> Result<Option<Sealed>, StoreError> {
    with_full_sync(conn, |tx| {
        let group = reserve_group(tx)?;
        let s = tx.execute(
            "UPDATE statement_log SET sealed_in = ?1 WHERE sealed_in IS NULL",
            [group],
        )?;
        let c = tx.execute(
            "UPDATE connections SET sealed_in = ?1 WHERE sealed_in IS NULL",
            [group],
        )?;
        if s == 0 && c == 0 {
            tx.execute("DELETE FROM seals WHERE id = ?1", [group])?;
            return Ok(None);
        }
        let mut statements = read_group(tx, "statements", STATEMENT_COLUMNS, "l.sealed_in", group)?;
        let mut connections =
            read_group(tx, "connections", CONNECTION_COLUMNS, "sealed_in", group)?;
        write_group(tx, group, &mut statements, &mut connections, at).map(Some)
    })
}

fn read_group(
    conn: &Connection,
    table: &str,
    columns: &str,
    group_column: &str,
    group: i64,
) -> Result<Vec<(i64, RowDigest)>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {columns} WHERE {group_column} = ?1"))?;
    let mut rows = stmt.query([group])?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let (id, digest, _) = read_row(table, row)?;
        out.push((id, digest));
    }
    Ok(out)
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
    statements: HashMap<i64, RowDigest>,
    connections: HashMap<i64, RowDigest>,
}

impl Group {
    fn list(&mut self, table: &str) -> &mut HashMap<i64, RowDigest> {
        if table == "statements" {
            &mut self.statements
        } else {
            &mut self.connections
        }
    }
}

/// Checks every seal group against its chained entry and every sealed row
/// against its group's list. Verify the chain itself first
/// ([`audit::verify`]): this trusts the `store.seal` entries it reads.
pub fn verify(conn: &Connection) -> Result<SealReport, StoreError> {
    let mut report = SealReport::default();
    let mut groups: HashMap<i64, Group> = HashMap::new();
    let mut open: Vec<i64> = Vec::new();
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
        let mut stmt =
            conn.prepare("SELECT id, statements, connections, audit_id FROM seals ORDER BY id")?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            let group: i64 = row.get(0)?;
            let statements: Vec<u8> = row.get(1)?;
            let connections: Vec<u8> = row.get(2)?;
            let sha = |list: &[u8]| audit::encode_hash(&Sha256::digest(list).into());
            let audit_id: i64 = row.get(3)?;
            if audit_id == 0 && !vouched.contains_key(&group) {
                // A writer's open group: its rows are not sealed yet.
                open.push(group);
                continue;
            }
            let vouched_for = vouched
                .remove(&group)
                .is_some_and(|(s, c)| s == sha(&statements) && c == sha(&connections));
            let lists = decode_list(&statements).zip(decode_list(&connections));
            match lists {
                Some((statements, connections)) if vouched_for => {
                    report.groups += 1;
                    groups.insert(
                        group,
                        Group {
                            statements,
                            connections,
                        },
                    );
                }
                _ => {
                    report.first_problem.get_or_insert(SealProblem {
                        table: "seals",
                        id: group,
                        group,
                        what: "its lists are not the ones its chained store.seal entry vouches for",
                    });
                }
            }
        }
    }
    if let Some(&group) = vouched.keys().min() {
        report.first_problem.get_or_insert(SealProblem {
            table: "seals",
            id: group,
            group,
            what: "the group's seals row is gone (its chained entry remains)",
        });
    }
    // Statements in rows and in pages alike (`store::pages`).
    let statement_columns = format!("* FROM {}", super::pages::all_statements());
    for (table, columns) in [
        ("statements", statement_columns.as_str()),
        ("connections", CONNECTION_COLUMNS),
    ] {
        let sql = format!("SELECT {columns} WHERE sealed_in IS NOT NULL ORDER BY 1");
        let (sealed, in_open, problem) = verify_table(conn, table, &sql, &mut groups, &open)?;
        if table == "statements" {
            report.statements_sealed = sealed;
            report.statements_unsealed += in_open;
        } else {
            report.connections_sealed = sealed;
            report.connections_unsealed += in_open;
        }
        if let Some(problem) = problem {
            report.first_problem.get_or_insert(problem);
        }
    }
    let unsealed = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0));
    report.statements_unsealed +=
        unsealed("SELECT count(*) FROM statement_log WHERE sealed_in IS NULL")? as u64;
    report.connections_unsealed +=
        unsealed("SELECT count(*) FROM connections WHERE sealed_in IS NULL")? as u64;
    Ok(report)
}

fn verify_table(
    conn: &Connection,
    table: &'static str,
    sql: &str,
    groups: &mut HashMap<i64, Group>,
    open: &[i64],
) -> Result<(u64, u64, Option<SealProblem>), StoreError> {
    let mut first: Option<SealProblem> = None;
    let (mut sealed, mut in_open) = (0u64, 0u64);
    let mut stmt = conn.prepare(sql)?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        let (id, digest, group) = read_row(table, row)?;
        let group = group.unwrap_or_default();
        if open.contains(&group) {
            in_open += 1;
            continue;
        }
        sealed += 1;
        let problem = |what| SealProblem {
            table,
            id,
            group,
            what,
        };
        let Some(g) = groups.get_mut(&group) else {
            first.get_or_insert(problem("sealed in a group that does not exist"));
            continue;
        };
        match g.list(table).remove(&id) {
            Some(listed) if listed == digest => {}
            Some(_) => {
                first.get_or_insert(problem("edited after it was sealed"));
            }
            None => {
                first.get_or_insert(problem("not in its group's list: added or moved"));
            }
        }
    }
    // Whatever a list still names was deleted (or taken out of its group).
    let missing = groups
        .iter_mut()
        .filter_map(|(&group, g)| g.list(table).keys().min().map(|&id| (id, group)))
        .min();
    if let Some((id, group)) = missing {
        if first.as_ref().is_none_or(|p| id < p.id) {
            first = Some(SealProblem {
                table,
                id,
                group,
                what: "deleted (or taken out of its group) after it was sealed",
            });
        }
    }
    Ok((sealed, in_open, first))
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
        for i in 0..row.as_ref().column_count() {
            feed(&mut h, Field::from(row.get_ref(i)?));
        }
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
    let _snapshot = super::read_snapshot(conn)?;
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
