//! Audit rows. THROWAWAY SHIM (no hash chain) written on the `api` branch so
//! the API builds; the store engineer's chained implementation replaces it.
use rusqlite::Connection;
use serde::Serialize;

use super::StoreError;

pub struct AuditEntry<'a> {
    pub kind: &'a str,
    pub actor: Option<&'a str>,
    pub request_id: Option<i64>,
    pub details: serde_json::Value,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub rows: i64,
    pub ok: bool,
}

pub fn append(conn: &Connection, entry: &AuditEntry<'_>) -> Result<i64, StoreError> {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    conn.execute(
        "INSERT INTO audit (at, kind, actor, request_id, details) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![
            at,
            entry.kind,
            entry.actor,
            entry.request_id,
            entry.details.to_string()
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn verify(conn: &Connection) -> Result<VerifyReport, StoreError> {
    let rows = conn.query_row("SELECT count(*) FROM audit", [], |r| r.get(0))?;
    Ok(VerifyReport { rows, ok: true })
}
