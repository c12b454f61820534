//! One record per captured statement, with its connection's identity, as
//! JSON lines or CSV, streamed row by row.
use std::io::Write;

use rusqlite::Connection;
use serde::{Deserialize, Serialize};
use time::{format_description::well_known::Rfc3339, macros::format_description, OffsetDateTime};

use super::StoreError;
use crate::capture::UnixNanos;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    Jsonl,
    Csv,
}

/// Statements received in `[since, until)`; `None` leaves that side open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeRange {
    pub since: Option<UnixNanos>,
    pub until: Option<UnixNanos>,
}

/// One exported statement. Field order is the CSV column order; times are
/// RFC 3339 in UTC with nanoseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatementRecord {
    pub statement_id: i64,
    pub connection_id: i64,
    /// Position of the statement within its connection, from 1.
    pub seq: i64,
    pub user: Option<String>,
    pub database: Option<String>,
    pub application: Option<String>,
    pub client_addr: String,
    pub client_port: u16,
    pub server_addr: String,
    pub server_port: u16,
    /// The connection was already open when capture started: identity unknown.
    pub mid_stream: bool,
    pub text: String,
    /// `simple` or `extended`.
    pub path: String,
    pub statement_name: Option<String>,
    pub received_at: String,
    pub completed_at: Option<String>,
    /// `ok`, `error`, or `unknown` (no answer seen).
    pub outcome: String,
    pub sqlstate: Option<String>,
    pub message: Option<String>,
    pub tag: Option<String>,
    pub rows: Option<i64>,
}

/// CSV header, in [`StatementRecord`]'s field order.
pub const CSV_HEADER: [&str; 21] = [
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
    "mid_stream",
    "text",
    "path",
    "statement_name",
    "received_at",
    "completed_at",
    "outcome",
    "sqlstate",
    "message",
    "tag",
    "rows",
];

/// Writes every statement in `range`, oldest first, to `out`; returns how
/// many. The CSV header is written even when there are none.
pub fn export_statements(
    conn: &Connection,
    range: TimeRange,
    format: ExportFormat,
    out: impl Write,
) -> Result<u64, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT s.id, c.id, s.seq, c.user, c.database, c.application,
                c.client_addr, c.client_port, c.server_addr, c.server_port, c.mid_stream,
                s.text, s.path, s.statement_name, s.received_at, s.completed_at,
                s.outcome, s.sqlstate, s.error_message, s.command_tag, s.rows
         FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE s.received_at >= ?1 AND s.received_at < ?2
         ORDER BY s.received_at, s.id",
    )?;
    let mut rows = stmt.query((
        range.since.unwrap_or(i64::MIN),
        range.until.unwrap_or(i64::MAX),
    ))?;
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
    let mut count = 0;
    while let Some(row) = rows.next()? {
        let record = StatementRecord {
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
            mid_stream: row.get(10)?,
            text: row.get(11)?,
            path: row.get(12)?,
            statement_name: row.get(13)?,
            received_at: rfc3339(row.get(14)?)?,
            completed_at: row.get::<_, Option<i64>>(15)?.map(rfc3339).transpose()?,
            outcome: row.get(16)?,
            sqlstate: row.get(17)?,
            message: row.get(18)?,
            tag: row.get(19)?,
            rows: row.get(20)?,
        };
        match &mut sink {
            Sink::Jsonl(out) => {
                serde_json::to_writer(&mut *out, &record)?;
                out.write_all(b"\n")?;
            }
            Sink::Csv(csv) => csv.serialize(&record)?,
        }
        count += 1;
    }
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

/// Unix nanoseconds as RFC 3339 UTC, e.g. `2024-05-01T12:00:00.123456789Z`.
pub fn rfc3339(at: UnixNanos) -> Result<String, StoreError> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(at))
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .ok_or(StoreError::TimeOutOfRange(i128::from(at)))
}

/// Parses a command-line time: RFC 3339 (`2024-05-01T12:00:00Z`,
/// `2024-05-01T14:00:00+02:00`) or a date (`2024-05-01`, midnight UTC).
pub fn parse_time(input: &str) -> Result<UnixNanos, StoreError> {
    let bad = || StoreError::BadTime {
        input: input.to_owned(),
    };
    let at = match OffsetDateTime::parse(input, &Rfc3339) {
        Ok(t) => t,
        Err(_) => time::Date::parse(input, format_description!("[year]-[month]-[day]"))
            .map_err(|_| bad())?
            .midnight()
            .assume_utc(),
    };
    i64::try_from(at.unix_timestamp_nanos()).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_mean_midnight_utc() {
        assert_eq!(parse_time("1970-01-02").unwrap(), 86_400_000_000_000);
    }

    #[test]
    fn rfc3339_offsets_are_honoured() {
        assert_eq!(
            parse_time("1970-01-01T01:00:00+01:00").unwrap(),
            parse_time("1970-01-01T00:00:00Z").unwrap()
        );
        assert_eq!(
            parse_time("2024-05-01T12:00:00.5Z").unwrap(),
            1_714_564_800_500_000_000
        );
    }

    #[test]
    fn nonsense_times_are_refused() {
        for input in ["yesterday", "2024-13-01", "2024-05-01 12:00", ""] {
            assert!(
                matches!(parse_time(input), Err(StoreError::BadTime { .. })),
                "{input}"
            );
        }
    }

    #[test]
    fn times_export_with_nanoseconds() {
        assert_eq!(
            rfc3339(1_714_564_800_000_000_001).unwrap(),
            "2024-05-01T12:00:00.000000001Z"
        );
    }

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
            mid_stream: false,
            text: String::new(),
            path: String::new(),
            statement_name: None,
            received_at: String::new(),
            completed_at: None,
            outcome: String::new(),
            sqlstate: None,
            message: None,
            tag: None,
            rows: None,
        };
        let mut csv = csv::Writer::from_writer(Vec::new());
        csv.serialize(&record).unwrap();
        let text = String::from_utf8(csv.into_inner().unwrap()).unwrap();
        assert_eq!(text.lines().next().unwrap(), CSV_HEADER.join(","));
    }
}
