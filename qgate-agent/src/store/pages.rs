//! Statement pages: the statements a writer batch saw complete, stored as
//! one row holding a JSON array (one element per statement) instead of one
//! row per statement.
//!
//! Why: a row per statement with its two indexes was the agent's largest
//! cost under load (SQLite's insert and index maintenance, its commits and
//! WAL checkpoints: two thirds of the agent's CPU at 48 k statements/s on a
//! 2-core host). A page costs one insert per batch. Statements still
//! running when their batch is written keep the row path (`statement_log`,
//! updated when they complete).
//!
//! Readers see no difference: the `statements` view is both, a page's
//! elements expanded with SQLite's `json_each`, every column as before; a
//! statement's id is its page's id plus the element's offset, from the one
//! sequence the writer gives rows and pages alike. Every page statement is
//! sealed into the audit chain with the same digest a row gets (its values
//! in column order, the text resolved), so `audit verify` reads both the
//! same way and an edit to a page's JSON is an edit to those statements.
//! Searches prune pages by their time and id bounds before expanding them
//! ([`statement_source`]).
use serde::ser::{Serialize, SerializeTuple, Serializer};

/// The rows arm of every statement reader: `statement_log`'s columns in
/// the order of the `statements` view, then `sealed_in`.
macro_rules! rows_arm {
    () => {
        "SELECT l.id AS id, l.connection_id AS connection_id, l.seq AS seq,
       coalesce(l.text, t.text) AS text, l.path AS path, l.statement_name AS statement_name,
       l.received_at AS received_at, l.completed_at AS completed_at, l.outcome AS outcome,
       l.sqlstate AS sqlstate, l.error_message AS error_message, l.command_tag AS command_tag,
       l.rows AS rows, l.decision AS decision, l.rule AS rule, l.request_id AS request_id,
       l.sealed_in AS sealed_in
FROM statement_log l LEFT JOIN statement_texts t ON t.id = l.text_id"
    };
}

/// The pages arm: each element of a page's array ([`PageEntry`]) as a row.
macro_rules! pages_arm {
    () => {
        "SELECT p.id + (j.value ->> 0) AS id, j.value ->> 1 AS connection_id, j.value ->> 2 AS seq,
       coalesce(j.value ->> 3, t.text) AS text, j.value ->> 5 AS path,
       j.value ->> 6 AS statement_name, p.base_at + (j.value ->> 7) AS received_at,
       p.base_at + (j.value ->> 7) + (j.value ->> 8) AS completed_at,
       j.value ->> 9 AS outcome, j.value ->> 10 AS sqlstate,
       j.value ->> 11 AS error_message, j.value ->> 12 AS command_tag, j.value ->> 13 AS rows,
       j.value ->> 14 AS decision, j.value ->> 15 AS rule, j.value ->> 16 AS request_id,
       p.sealed_in AS sealed_in
FROM statement_pages p JOIN json_each(p.body) j
     LEFT JOIN statement_texts t ON t.id = (j.value ->> 4)"
    };
}

/// The schema: the pages, and the `statements` view over rows and pages.
pub const MIGRATION_SQL: &str = concat!(
    r#"
-- Statements that completed within their writer batch, one row per batch:
-- `body` is a JSON array with one element per statement,
-- [id - page id, connection_id, seq, text or null, text_id or null, path,
--  statement_name, received_at - base_at, completed_at - received_at,
--  outcome, sqlstate, error_message, command_tag, rows, decision, rule,
--  request_id], trailing nulls left out.
-- Statement ids come from one sequence shared with `statement_log`: a page
-- spans ids `id` to `last_id`, and rows may hold ids in between.
CREATE TABLE statement_pages (
    id        INTEGER PRIMARY KEY,
    last_id   INTEGER NOT NULL,
    first_at  INTEGER NOT NULL,
    last_at   INTEGER NOT NULL,
    base_at   INTEGER NOT NULL,
    sealed_in INTEGER NOT NULL,
    body      TEXT    NOT NULL
) STRICT;
CREATE INDEX statement_pages_last_at ON statement_pages (last_at);
CREATE INDEX statement_pages_last_id ON statement_pages (last_id);

DROP VIEW statements;
CREATE VIEW statements AS
    SELECT id, connection_id, seq, text, path, statement_name, received_at, completed_at,
           outcome, sqlstate, error_message, command_tag, rows, decision, rule, request_id
    FROM ("#,
    rows_arm!(),
    "\nUNION ALL\n",
    pages_arm!(),
    ");\n"
);

/// The statements with `received_at` in `[since, until)` and `id > after`,
/// rows and pages, as a subquery of the `statements` view's columns plus
/// `sealed_in`; pages outside the bounds are not expanded. Each argument is an
/// SQL expression (a parameter such as `?1`, or a literal).
pub fn statement_source(since: &str, until: &str, after: &str) -> String {
    format!(
        "({rows} WHERE l.received_at >= {since} AND l.received_at < {until} AND l.id > {after}
UNION ALL
{pages} WHERE p.last_at >= {since} AND p.first_at < {until} AND p.last_id > {after}
    AND p.base_at + (j.value ->> 7) >= {since} AND p.base_at + (j.value ->> 7) < {until}
    AND p.id + (j.value ->> 0) > {after})",
        rows = rows_arm!(),
        pages = pages_arm!(),
    )
}

/// Every statement, unpruned (see [`statement_source`]).
pub fn all_statements() -> String {
    format!("({} UNION ALL {})", rows_arm!(), pages_arm!())
}

/// The highest statement id stored, rows and pages (0: none).
pub const MAX_STATEMENT_ID: &str = "SELECT max(coalesce((SELECT max(id) FROM statement_log), 0),
    coalesce((SELECT max(last_id) FROM statement_pages), 0))";

/// One statement of a page, as its JSON array element (times as offsets:
/// see the table's comment).
pub struct PageEntry<'a> {
    pub connection_id: i64,
    pub seq: i64,
    /// Inline (`text_id` is `None`) or by reference.
    pub text: Option<&'a str>,
    pub text_id: Option<i64>,
    pub path: &'a str,
    pub statement_name: Option<&'a str>,
    pub received_at: i64,
    pub completed_at: i64,
    pub outcome: &'a str,
    pub sqlstate: Option<&'a str>,
    pub error_message: Option<&'a str>,
    pub command_tag: Option<&'a str>,
    pub rows: Option<i64>,
    pub decision: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub request_id: Option<i64>,
}

/// An element as written: the entry, its id's offset and its page's base.
struct Element<'e, 'a> {
    entry: &'e PageEntry<'a>,
    offset: i64,
    base_at: i64,
}

impl Serialize for Element<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        // The optional tail, in element order: cut after its last value.
        fn text(v: Option<&str>) -> Tail<'_> {
            v.map_or(Tail::Null, Tail::Text)
        }
        fn int(v: Option<i64>) -> Tail<'static> {
            v.map_or(Tail::Null, Tail::Int)
        }
        let tail = [
            text(e.sqlstate),
            text(e.error_message),
            text(e.command_tag),
            int(e.rows),
            text(e.decision),
            text(e.rule),
            int(e.request_id),
        ];
        let kept = tail
            .iter()
            .rposition(|v| !matches!(v, Tail::Null))
            .map_or(0, |i| i + 1);
        let mut t = serializer.serialize_tuple(10 + kept)?;
        t.serialize_element(&self.offset)?;
        t.serialize_element(&e.connection_id)?;
        t.serialize_element(&e.seq)?;
        t.serialize_element(&e.text)?;
        t.serialize_element(&e.text_id)?;
        t.serialize_element(e.path)?;
        t.serialize_element(&e.statement_name)?;
        t.serialize_element(&(e.received_at - self.base_at))?;
        t.serialize_element(&(e.completed_at - e.received_at))?;
        t.serialize_element(e.outcome)?;
        for value in &tail[..kept] {
            t.serialize_element(value)?;
        }
        t.end()
    }
}

/// An optional field of an element.
enum Tail<'a> {
    Null,
    Text(&'a str),
    Int(i64),
}

impl Serialize for Tail<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Tail::Null => serializer.serialize_none(),
            Tail::Text(v) => serializer.serialize_str(v),
            Tail::Int(v) => serializer.serialize_i64(*v),
        }
    }
}

/// A page in the making: its JSON array and bounds.
#[derive(Default)]
pub struct PageBuilder {
    body: Vec<u8>,
    first_id: Option<i64>,
    last_id: i64,
    first_at: i64,
    last_at: i64,
    base_at: i64,
}

impl PageBuilder {
    /// A page for about `statements` statements.
    pub fn with_capacity(statements: usize) -> PageBuilder {
        PageBuilder {
            body: Vec::with_capacity(statements.saturating_mul(128)),
            ..PageBuilder::default()
        }
    }

    /// Adds the statement with id `id` (ids added in increasing order).
    pub fn push(&mut self, id: i64, entry: &PageEntry<'_>) -> Result<(), serde_json::Error> {
        let first = *self.first_id.get_or_insert(id);
        if self.body.is_empty() {
            self.body.push(b'[');
            self.first_at = entry.received_at;
            self.last_at = entry.received_at;
            self.base_at = entry.received_at;
        } else {
            self.body.push(b',');
        }
        self.first_at = self.first_at.min(entry.received_at);
        self.last_at = self.last_at.max(entry.received_at);
        self.last_id = id;
        serde_json::to_writer(
            &mut self.body,
            &Element {
                entry,
                offset: id - first,
                base_at: self.base_at,
            },
        )
    }

    /// Inserts the page (nothing when empty).
    pub fn insert(
        mut self,
        tx: &rusqlite::Connection,
        sealed_in: i64,
    ) -> Result<(), super::StoreError> {
        let Some(first_id) = self.first_id else {
            return Ok(());
        };
        self.body.push(b']');
        // serde_json writes UTF-8 only.
        let body = String::from_utf8(self.body).expect("serde_json writes UTF-8");
        tx.prepare_cached(
            "INSERT INTO statement_pages (id, last_id, first_at, last_at, base_at, sealed_in, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute((
            first_id,
            self.last_id,
            self.first_at,
            self.last_at,
            self.base_at,
            sealed_in,
            body,
        ))?;
        Ok(())
    }
}
