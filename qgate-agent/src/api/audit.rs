//! Audit search, export (JSON, JSON lines, CSV) and chain verification.
//!
//! Statements are searched through the store (`store::export`: one record
//! type for the API, the CLI export and the documented schema); the audit
//! log's own query is the constant below.
use axum::{
    extract::{rejection::QueryRejection, Query, State},
    http::header,
    response::{IntoResponse, Response},
    Json,
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::store::export::{
    search_audit, search_statements as search_statements_in, AuditFilter, AuditRecord,
    StatementFilter, TimeRange, AUDIT_COLUMNS, CSV_HEADER,
};

use super::{
    auth::Caller,
    error::ApiError,
    routes::{limit, parse_time, query},
    AppState, ErrorBody,
};

const DEFAULT_LIMIT: u32 = 1000;
const MAX_LIMIT: u32 = 100_000;

/// Audit rows: decisions, approvals, expiries, reviewer changes, agent events.

#[derive(Debug, Clone, Copy, Default, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// One JSON array.
    #[default]
    Json,
    /// JSON lines (`application/x-ndjson`), one object per line.
    Jsonl,
    /// CSV with a header row.
    Csv,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatementQuery {
    /// DB user.
    user: Option<String>,
    database: Option<String>,
    /// Table name appearing in the statement text (case-insensitive).
    table: Option<String>,
    /// What the agent decided: `allow`, `deny` (by the policy, at once),
    /// `hold` or `held` (a request was opened), `none` (the agent was not
    /// asked), or the status its request reached: `pending`, `approved`,
    /// `denied`, `expired`, `withdrawn`.
    decision: Option<String>,
    /// The policy rule that decided it (exact name).
    rule: Option<String>,
    /// The statement's outcome as the store records it (e.g. `ok`, `error`).
    outcome: Option<String>,
    /// Received at or after (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Received before (RFC 3339).
    #[param(format = DateTime)]
    until: Option<String>,
    /// Only statements with an id above this (paging).
    after: Option<i64>,
    #[param(minimum = 1, maximum = 100000)]
    limit: Option<u32>,
    #[param(inline)]
    format: Option<ExportFormat>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// Row kind, e.g. `request.approved`, `request.denied`, `reviewer.added`.
    kind: Option<String>,
    /// Reviewer name.
    actor: Option<String>,
    /// Request id.
    request: Option<i64>,
    /// At or after (RFC 3339).
    since: Option<String>,
    /// Before (RFC 3339).
    until: Option<String>,
    /// Only rows with an id above this (paging).
    after: Option<i64>,
    #[param(minimum = 1, maximum = 100000)]
    limit: Option<u32>,
    #[param(inline)]
    format: Option<ExportFormat>,
}

/// Search and export statements.
#[utoipa::path(get, path = "/v1/audit/statements", tag = "audit", params(StatementQuery),
    responses((status = 200, content(
            (Vec<crate::store::export::StatementRecord> = "application/json"),
            (String = "application/x-ndjson"),
            (String = "text/csv"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn search_statements(
    _caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<StatementQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let filter = StatementFilter {
        range: TimeRange {
            since: parse_time("since", q.since.as_deref())?,
            until: parse_time("until", q.until.as_deref())?,
        },
        user: q.user,
        database: q.database,
        table: q.table,
        decision: q
            .decision
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(ApiError::bad_request)?,
        rule: q.rule,
        outcome: q.outcome,
        after: q.after,
        limit: Some(limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?),
    };
    let rows = state
        .board
        .with_db(move |c| search_statements_in(c, &filter))
        .await?
        .map_err(ApiError::internal)?;
    export(q.format.unwrap_or_default(), &CSV_HEADER, rows)
}

/// Search and export the audit log (decisions, approvals, expiries, reviewer changes, …).
#[utoipa::path(get, path = "/v1/audit/log", tag = "audit", params(LogQuery),
    responses((status = 200, content(
            (Vec<AuditRecord> = "application/json"),
            (String = "application/x-ndjson"),
            (String = "text/csv"))),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn search_log(
    _caller: Caller,
    State(state): State<AppState>,
    q: Result<Query<LogQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let filter = AuditFilter {
        kind: q.kind,
        actor: q.actor,
        request_id: q.request,
        since: parse_time("since", q.since.as_deref())?,
        until: parse_time("until", q.until.as_deref())?,
        after: q.after,
        limit: Some(limit(q.limit, DEFAULT_LIMIT, MAX_LIMIT)?),
    };
    let rows = state
        .board
        .with_db(move |c| search_audit(c, &filter))
        .await?
        .map_err(ApiError::internal)?;
    export(q.format.unwrap_or_default(), AUDIT_COLUMNS, rows)
}

/// Verifies the audit chain, the captured statements and connections
/// sealed into it, and the reviewers table: any edited, deleted or added
/// row is reported. `ok` is false when anything is.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit",
    responses((status = 200, body = Object, description = "The verification report"),
        (status = 401, body = ErrorBody)))]
pub async fn verify(_caller: Caller, State(state): State<AppState>) -> Result<Response, ApiError> {
    let report = state
        .board
        .with_db(|c| crate::store::seal::verify_store(c, None))
        .await?
        .map_err(ApiError::internal)?;
    Ok(Json(serde_json::json!({
        "ok": report.is_intact(),
        "entries": report.chain.entries,
        "last_hash": report.chain.last_hash,
        "first_problem": report.chain.first_problem,
        "seals": report.seals,
        "reviewers": report.reviewers,
    }))
    .into_response())
}

fn export<T: Serialize>(
    format: ExportFormat,
    columns: &[&str],
    rows: Vec<T>,
) -> Result<Response, ApiError> {
    match format {
        ExportFormat::Json => Ok(Json(rows).into_response()),
        ExportFormat::Jsonl => {
            let mut out = String::new();
            for row in &rows {
                out.push_str(&serde_json::to_string(row).map_err(ApiError::internal)?);
                out.push('\n');
            }
            Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], out).into_response())
        }
        ExportFormat::Csv => {
            let mut out = csv_line(columns.iter().map(|c| (*c).to_owned()));
            for row in &rows {
                let value = serde_json::to_value(row).map_err(ApiError::internal)?;
                out.push_str(&csv_line(columns.iter().map(|c| match &value[*c] {
                    serde_json::Value::Null => String::new(),
                    serde_json::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })));
            }
            Ok((
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"qgate-audit.csv\"",
                    ),
                ],
                out,
            )
                .into_response())
        }
    }
}

/// One RFC 4180 record: fields with a comma, quote or line break are quoted.
/// Fields starting with `=`, `+`, `-` or `@` get a leading `'` so a
/// spreadsheet opening the export does not run them as formulas.
fn csv_line(fields: impl Iterator<Item = String>) -> String {
    let mut line = fields
        .map(|f| {
            let f = if f.starts_with(['=', '+', '-', '@']) {
                format!("'{f}")
            } else {
                f
            };
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f
            }
        })
        .collect::<Vec<_>>()
        .join(",");
    line.push_str("\r\n");
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_separators_and_defuses_formulas() {
        let line = csv_line(
            ["a,b", "say \"hi\"", "=cmd()", "-- x", "plain"]
                .into_iter()
                .map(String::from),
        );
        assert_eq!(line, "\"a,b\",\"say \"\"hi\"\"\",'=cmd(),'-- x,plain\r\n");
    }
}
