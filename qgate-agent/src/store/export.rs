//! One record per captured statement, with its connection's identity, as
//! JSON lines or CSV, streamed row by row.
use std::io::Write;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::clock::{self, UnixNanos};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// One audit log entry as the API, the export and the audit stream give it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: i64,
    #[schema(format = DateTime)]
    pub at: String,
    pub kind: String,
    pub actor: Option<String>,
    pub request_id: Option<i64>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// [`AuditRecord`]'s fields, in order (the CSV header).
pub const AUDIT_COLUMNS: &[&str] = &["id", "at", "kind", "actor", "request_id", "details"];

/// Selects what [`audit_record`] reads; filters are appended (`AND …`).
const AUDIT_SELECT: &str = "SELECT id, at, kind, actor, request_id, details FROM audit WHERE 1 = 1";

/// A row of [`AUDIT_SELECT`].
fn audit_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditRecord> {
    let details: String = r.get(5)?;
    Ok(AuditRecord {
        id: r.get(0)?,
        at: clock::rfc3339_or_number(r.get(1)?),
        kind: r.get(2)?,
        actor: r.get(3)?,
        request_id: r.get(4)?,
        details: serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details)),
    })
}

/// What an audit log search selects; every field optional, combined with AND.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub kind: Option<String>,
    pub actor: Option<String>,
    pub request_id: Option<i64>,
    /// At or after / before.
    pub since: Option<UnixNanos>,
    pub until: Option<UnixNanos>,
    /// Only entries with an id above this (paging, the audit stream).
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

/// Audit log entries `filter` selects, oldest first.
pub fn search_audit(
    conn: &Connection,
    filter: &AuditFilter,
) -> Result<Vec<AuditRecord>, StoreError> {
    use rusqlite::types::Value;
    let mut sql = AUDIT_SELECT.to_owned();
    let mut args: Vec<Value> = Vec::new();
    let mut and = |clause: &str, value: Value| {
        args.push(value);
        sql.push_str(&format!(
            " AND {}",
            clause.replace('?', &format!("?{}", args.len()))
        ));
    };
    if let Some(kind) = &filter.kind {
        and("kind = ?", Value::Text(kind.clone()));
    }
    if let Some(actor) = &filter.actor {
        and("actor = ?", Value::Text(actor.clone()));
    }
    if let Some(request) = filter.request_id {
        and("request_id = ?", Value::Integer(request));
    }
    if let Some(since) = filter.since {
        and("at >= ?", Value::Integer(since));
    }
    if let Some(until) = filter.until {
        and("at < ?", Value::Integer(until));
    }
    if let Some(after) = filter.after {
        and("id > ?", Value::Integer(after));
    }
    sql.push_str(" ORDER BY id");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args), audit_record)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Statements received in `[since, until)`; `None` leaves that side open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub since: Option<UnixNanos>,
    pub until: Option<UnixNanos>,
}

/// One exported statement: what the security team searches for. The same
/// record is what `qgate-agent audit export` writes (JSON lines, CSV),
/// what the API's `/v1/audit/statements` answers, and what
/// `schema/statement.schema.json` documents (a test keeps the three
/// equal). Field order is the CSV column order; times are RFC 3339 in UTC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatementRecord {
    pub statement_id: i64,
    /// The `connections` row.
    pub connection_id: i64,
    /// Position of the statement within its connection, from 1.
    pub seq: i64,
    /// Database user, database and application from the StartupMessage
    /// (absent for a connection first seen mid-stream).
    pub user: Option<String>,
    pub database: Option<String>,
    pub application: Option<String>,
    /// `local` for a Unix-socket session.
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    /// `postgresql` or `mysql`.
    pub protocol: String,
    /// `tcp`, `tls`, `gss`, `unix` or `unknown`.
    pub transport: String,
    /// What read and gated it: `wire` (tc program) or `server_hook`.
    pub gated_by: String,
    /// The connection was already open when capture started: identity unknown.
    pub mid_stream: bool,
    /// The capture file it was replayed from (`qgate-agent replay`); absent
    /// for live traffic.
    pub replayed_from: Option<String>,
    /// The statement text, credentials redacted.
    pub text: String,
    /// What it does, as the classifier reads the stored text: `read`,
    /// `write`, `ddl`, `dcl`, `transaction`, `session`, `utility`, `copy`,
    /// `procedural`, `explain` or `unknown`; several texts in one string
    /// give their distinct kinds, comma-separated, in order.
    pub kind: String,
    /// Tables it reads or writes, as written (schema-qualified when it
    /// was), comma-separated, each once. Names reached through views,
    /// functions or dynamic SQL are not listed.
    pub tables: String,
    /// `simple` or `extended`.
    pub path: String,
    pub statement_name: Option<String>,
    #[schema(format = DateTime)]
    pub received_at: String,
    #[schema(format = DateTime)]
    pub completed_at: Option<String>,
    /// `ok`, `error`, or `unknown` (no answer seen).
    pub outcome: String,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub tag: Option<String>,
    pub rows: Option<i64>,
    /// What the agent decided: `allow`, `deny` or `hold`; absent when it was
    /// not asked (monitor mode, or the kernel's plain-read fast path).
    pub decision: Option<String>,
    /// The policy rule that decided (`default` when none matched).
    pub rule: Option<String>,
    /// Held: its request, and how the request ended (`pending`,
    /// `approved`, `denied`, `expired`, `withdrawn`), by whom and when.
    pub request_id: Option<i64>,
    pub request_status: Option<String>,
    pub decided_by: Option<String>,
    #[schema(format = DateTime)]
    pub decided_at: Option<String>,
    /// The `/* qgate: reason=… */` justification the statement carried.
    pub justification: Option<String>,
}

/// CSV header, in [`StatementRecord`]'s field order.
pub const CSV_HEADER: [&str; 34] = [
    "statement_id",
    "connection_id",
    "seq",
    "user",
    "database",
    "application",
    "client_addr",
    "client_port",
    "server_addr",
    "server_port",
    "protocol",
    "transport",
    "gated_by",
    "mid_stream",
    "replayed_from",
    "text",
    "kind",
    "tables",
    "path",
    "statement_name",
    "received_at",
    "completed_at",
    "outcome",
    "sqlstate",
    "message",
    "tag",
    "rows",
    "decision",
    "rule",
    "request_id",
    "request_status",
    "decided_by",
    "decided_at",
    "justification",
];

/// Which statements: every condition given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatementFilter {
    pub range: TimeRange,
    pub user: Option<String>,
    pub database: Option<String>,
    /// A name appearing in the statement text (case-insensitive).
    pub table: Option<String>,
    pub decision: Option<DecisionFilter>,
    /// The policy rule that decided it.
    pub rule: Option<String>,
    pub outcome: Option<String>,
    /// Only statements with an id above this (paging).
    pub after: Option<i64>,
    pub limit: Option<u32>,
}

/// What the agent decided, as searched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionFilter {
    Allow,
    Deny,
    Hold,
    /// The agent was not asked.
    NotAsked,
    /// Held, and its request is in this state.
    Request(super::requests::RequestStatus),
}

impl std::str::FromStr for DecisionFilter {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Ok(match text {
            "allow" => DecisionFilter::Allow,
            "deny" => DecisionFilter::Deny,
            "hold" | "held" => DecisionFilter::Hold,
            "none" => DecisionFilter::NotAsked,
            other => DecisionFilter::Request(
                super::requests::RequestStatus::parse(other).ok_or_else(|| {
                    format!(
                        "`decision` must be allow, deny, hold (or held), none, pending, approved, \
                         denied, expired or withdrawn, got {other:?}"
                    )
                })?,
            ),
        })
    }
}

const STATEMENT_SELECT: &str = "
SELECT s.id, c.id, s.seq, c.user, c.database, c.application,
       c.client_addr, c.client_port, c.server_addr, c.server_port, c.transport, c.gated_by,
       c.mid_stream, c.replayed_from,
       s.text, s.path, s.statement_name, s.received_at, s.completed_at,
       s.outcome, s.sqlstate, s.error_message, s.command_tag, s.rows,
       s.decision, coalesce(s.rule, r.rule), s.request_id, r.status, r.closed_by, r.closed_at,
       r.justification, coalesce(c.protocol, 'postgresql')
FROM {source} s
JOIN connections c ON c.id = s.connection_id
LEFT JOIN requests r ON r.id = s.request_id
WHERE 1 = 1";

/// The query for `filter` and its arguments.
fn statement_query(filter: &StatementFilter) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    // Time and id bounds prune the pages before they are expanded.
    let mut sql = STATEMENT_SELECT.replace(
        "{source}",
        &super::pages::statement_source("?1", "?2", "?3"),
    );
    let mut args: Vec<Value> = vec![
        Value::Integer(filter.range.since.unwrap_or(i64::MIN)),
        Value::Integer(filter.range.until.unwrap_or(i64::MAX)),
        Value::Integer(filter.after.unwrap_or(i64::MIN)),
    ];
    let mut and = |clause: &str, value: Value| {
        args.push(value);
        sql.push_str(&format!(
            " AND {}",
            clause.replace('?', &format!("?{}", args.len()))
        ));
    };
    if let Some(user) = &filter.user {
        and("c.user = ?", Value::Text(user.clone()));
    }
    if let Some(database) = &filter.database {
        and("c.database = ?", Value::Text(database.clone()));
    }
    if let Some(table) = &filter.table {
        and(
            "instr(lower(s.text), lower(?)) > 0",
            Value::Text(table.clone()),
        );
    }
    if let Some(outcome) = &filter.outcome {
        and("s.outcome = ?", Value::Text(outcome.clone()));
    }
    if let Some(rule) = &filter.rule {
        and("s.rule = ?", Value::Text(rule.clone()));
    }
    match filter.decision {
        None => {}
        Some(DecisionFilter::Allow) => sql.push_str(" AND s.decision = 'allow'"),
        Some(DecisionFilter::Deny) => sql.push_str(" AND s.decision = 'deny'"),
        Some(DecisionFilter::Hold) => sql.push_str(" AND s.decision = 'hold'"),
        Some(DecisionFilter::NotAsked) => sql.push_str(" AND s.decision IS NULL"),
        Some(DecisionFilter::Request(status)) => {
            and("r.status = ?", Value::Text(status.as_str().to_owned()))
        }
    }
    sql.push_str(" ORDER BY s.id");
    if let Some(limit) = filter.limit {
        sql.push_str(&format!(" LIMIT {limit}"));
    }
    (sql, args)
}

fn statement_record(row: &rusqlite::Row<'_>) -> Result<StatementRecord, StoreError> {
    let ms = |v: Option<i64>| v.map(|ms| clock::rfc3339_or_number(clock::from_ms(ms)));
    Ok(StatementRecord {
        statement_id: row.get(0)?,
        connection_id: row.get(1)?,
        seq: row.get(2)?,
        user: row.get(3)?,
        database: row.get(4)?,
        application: row.get(5)?,
        client_addr: row.get(6)?,
        client_port: row.get(7)?,
        server_addr: row.get(8)?,
        server_port: row.get(9)?,
        protocol: row.get(31)?,
        transport: row.get(10)?,
        gated_by: row.get(11)?,
        mid_stream: row.get(12)?,
        replayed_from: row.get(13)?,
        text: row.get(14)?,
        kind: String::new(),
        tables: String::new(),
        path: row.get(15)?,
        statement_name: row.get(16)?,
        received_at: clock::rfc3339_or_number(row.get(17)?),
        completed_at: row.get::<_, Option<i64>>(18)?.map(clock::rfc3339_or_number),
        outcome: row.get(19)?,
        sqlstate: row.get(20)?,
        message: row.get(21)?,
        tag: row.get(22)?,
        rows: row.get(23)?,
        decision: row.get(24)?,
        rule: row.get(25)?,
        request_id: row.get(26)?,
        request_status: row.get(27)?,
        decided_by: row.get(28)?,
        decided_at: ms(row.get(29)?),
        justification: row.get(30)?,
    })
}

/// Calls `each` for every statement `filter` selects, in the order they
/// were recorded; returns how many.
fn for_each_statement(
    conn: &Connection,
    filter: &StatementFilter,
    mut each: impl FnMut(StatementRecord) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let (sql, args) = statement_query(filter);
    let mut stmt = conn.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut count = 0;
    let mut read = TextFacts::default();
    while let Some(row) = rows.next()? {
        let mut record = statement_record(row)?;
        (record.kind, record.tables) = read.of(&record.text);
        each(record)?;
        count += 1;
    }
    Ok(count)
}

/// Kind and tables of exported texts, by the classifier (no catalog: what
/// the text itself says), each distinct text read once per export.
#[derive(Default)]
struct TextFacts {
    known: std::collections::HashMap<String, (String, String)>,
}

impl TextFacts {
    /// Texts remembered at most (a workload of literal-laden texts that
    /// never repeat would otherwise keep every one).
    const KEEP: usize = 4096;

    fn of(&mut self, text: &str) -> (String, String) {
        if let Some(known) = self.known.get(text) {
            return known.clone();
        }
        let read = crate::classify::classify(text, crate::classify::Dialect::Postgresql);
        let mut kinds: Vec<&str> = Vec::new();
        let mut tables: Vec<String> = Vec::new();
        for facts in &read.statements {
            if !kinds.contains(&facts.kind.name()) {
                kinds.push(facts.kind.name());
            }
            for table in facts.tables_read.iter().chain(&facts.tables_written) {
                let name = table.to_string();
                if !tables.contains(&name) {
                    tables.push(name);
                }
            }
        }
        let facts = (kinds.join(","), tables.join(","));
        if self.known.len() >= Self::KEEP {
            self.known.clear();
        }
        self.known.insert(text.to_owned(), facts.clone());
        facts
    }
}

/// The statements `filter` selects (the API's search).
pub fn search_statements(
    conn: &Connection,
    filter: &StatementFilter,
) -> Result<Vec<StatementRecord>, StoreError> {
    let mut out = Vec::new();
    for_each_statement(conn, filter, |record| {
        out.push(record);
        Ok(())
    })?;
    Ok(out)
}

/// Writes every statement `filter` selects, in the order they were
/// recorded, to `out`; returns how many. The CSV header is written even
/// when there are none.
pub fn export_statements(
    conn: &Connection,
    filter: &StatementFilter,
    format: ExportFormat,
    out: impl Write,
) -> Result<u64, StoreError> {
    let mut sink = match format {
        ExportFormat::Jsonl => Sink::Jsonl(out),
        ExportFormat::Csv => {
            let mut csv = csv::WriterBuilder::new()
                .has_headers(false)
                .from_writer(out);
            csv.write_record(CSV_HEADER)?;
            Sink::Csv(Box::new(csv))
        }
    };
    let count = for_each_statement(conn, filter, |record| {
        match &mut sink {
            Sink::Jsonl(out) => {
                serde_json::to_writer(&mut *out, &record)?;
                out.write_all(b"\n")?;
            }
            Sink::Csv(csv) => csv.serialize(&record)?,
        }
        Ok(())
    })?;
    match sink {
        Sink::Jsonl(mut out) => out.flush()?,
        Sink::Csv(mut csv) => csv.flush()?,
    }
    Ok(count)
}

enum Sink<W: Write> {
    Jsonl(W),
    Csv(Box<csv::Writer<W>>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_header_matches_the_record() {
        let record = StatementRecord {
            statement_id: 1,
            connection_id: 1,
            seq: 1,
            user: None,
            database: None,
            application: None,
            client_addr: String::new(),
            client_port: 0,
            server_addr: String::new(),
            server_port: 0,
            protocol: String::new(),
            transport: String::new(),
            gated_by: String::new(),
            mid_stream: false,
            replayed_from: None,
            text: String::new(),
            kind: String::new(),
            tables: String::new(),
            path: String::new(),
            statement_name: None,
            received_at: String::new(),
            completed_at: None,
            outcome: String::new(),
            sqlstate: None,
            message: None,
            tag: None,
            rows: None,
            decision: None,
            rule: None,
            request_id: None,
            request_status: None,
            decided_by: None,
            decided_at: None,
            justification: None,
        };
        let mut csv = csv::Writer::from_writer(Vec::new());
        csv.serialize(&record).unwrap();
        let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), CSV_HEADER.join(","));
    }
}
