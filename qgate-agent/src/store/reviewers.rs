//! Reviewers and their tokens: who may decide requests, in which groups,
//! as which database users (never their own statements). Every change is
//! audited with a digest of the whole table (`store::seal`), so a change
//! made behind qgate's back is found by `audit verify`.
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

use super::audit::{self, AuditEntry};
use super::requests::{column_text, json_list, now_column, parse_list, RequestError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Decides requests whose rule names one of the reviewer's groups.
    Reviewer,
    /// A reviewer who may also force-approve (break-glass) any request.
    Admin,
    /// Reads requests and the audit; decides nothing.
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reviewer => "reviewer",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "reviewer" => Some(Role::Reviewer),
            "admin" => Some(Role::Admin),
            "auditor" => Some(Role::Auditor),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Reviewer {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    /// DB users this reviewer is: they can never approve those users' statements.
    pub db_users: Vec<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub revoked_at: Option<String>,
}

pub struct NewReviewer {
    pub name: String,
    pub role: Role,
    pub groups: Vec<String>,
    pub db_users: Vec<String>,
}

/// A new bearer token: 256 random bits, so a plain SHA-256 of it is a safe stored form.
pub fn new_token() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(format!("qgt_{}", hex(&bytes)))
}

pub fn token_sha256(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Adds a reviewer and returns it with its token, shown once: only its hash is kept.
pub fn add_reviewer(
    conn: &mut Connection,
    new: &NewReviewer,
) -> Result<(Reviewer, String), RequestError> {
    let name = new.name.trim();
    if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
        return Err(RequestError::InvalidReviewer(
            "name must be 1–100 printable characters".into(),
        ));
    }
    if new.role == Role::Reviewer && new.groups.is_empty() {
        return Err(RequestError::InvalidReviewer(
            "a reviewer without groups could decide nothing; give --groups".into(),
        ));
    }
    let token =
        new_token().map_err(|e| RequestError::InvalidReviewer(format!("no randomness: {e}")))?;
    let now = now_column();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let taken: bool = tx.query_row(
        "SELECT EXISTS(SELECT 1 FROM reviewers WHERE name = ?1 AND revoked_at IS NULL)",
        [name],
        |r| r.get(0),
    )?;
    if taken {
        return Err(RequestError::DuplicateReviewer(name.to_owned()));
    }
    tx.execute(
        "INSERT INTO reviewers (name, role, groups, db_users, token_sha256, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            name,
            new.role.as_str(),
            json_list(&new.groups),
            json_list(&new.db_users),
            token_sha256(&token),
            now
        ],
    )?;
    let id = tx.last_insert_rowid();
    audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::REVIEWER_ADDED,
            actor: None,
            request_id: None,
            details: serde_json::json!({
                "reviewer": name, "role": new.role.as_str(),
                "groups": new.groups, "db_users": new.db_users,
                "reviewers_sha256": super::seal::reviewers_digest(&tx)?,
            }),
        },
    )?;
    tx.commit()?;
    let reviewer = Reviewer {
        id,
        name: name.to_owned(),
        role: new.role,
        groups: new.groups.clone(),
        db_users: new.db_users.clone(),
        created_at: column_text(now),
        revoked_at: None,
    };
    Ok((reviewer, token))
}

const REVIEWER_COLUMNS: &str = "id, name, role, groups, db_users, created_at, revoked_at";

fn reviewer_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Reviewer, RequestError>> {
    let role: String = row.get(2)?;
    let groups: String = row.get(3)?;
    let db_users: String = row.get(4)?;
    let revoked: Option<i64> = row.get(6)?;
    let (id, name, created): (i64, String, i64) = (row.get(0)?, row.get(1)?, row.get(5)?);
    Ok((|| {
        Ok(Reviewer {
            id,
            name,
            role: Role::parse(&role)
                .ok_or_else(|| RequestError::Corrupt(format!("reviewer role {role:?}")))?,
            groups: parse_list(&groups, "reviewer groups")?,
            db_users: parse_list(&db_users, "reviewer db_users")?,
            created_at: column_text(created),
            revoked_at: revoked.map(column_text),
        })
    })())
}

pub fn list_reviewers(conn: &Connection) -> Result<Vec<Reviewer>, RequestError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {REVIEWER_COLUMNS} FROM reviewers ORDER BY name, id"
    ))?;
    let rows = stmt.query_map([], reviewer_from_row)?;
    rows.map(|r| r?).collect()
}

/// The active reviewer holding `token`, if any.
pub fn reviewer_by_token(conn: &Connection, token: &str) -> Result<Option<Reviewer>, RequestError> {
    conn.query_row(
        &format!(
            "SELECT {REVIEWER_COLUMNS} FROM reviewers WHERE token_sha256 = ?1 AND revoked_at IS NULL"
        ),
        [token_sha256(token)],
        reviewer_from_row,
    )
    .optional()?
    .transpose()
}

/// The active reviewer with this row id, if any.
pub fn active_reviewer_by_id(conn: &Connection, id: i64) -> Result<Option<Reviewer>, RequestError> {
    conn.query_row(
        &format!("SELECT {REVIEWER_COLUMNS} FROM reviewers WHERE id = ?1 AND revoked_at IS NULL"),
        [id],
        reviewer_from_row,
    )
    .optional()?
    .transpose()
}

pub fn revoke_reviewer(conn: &mut Connection, name: &str) -> Result<(), RequestError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let changed = tx.execute(
        "UPDATE reviewers SET revoked_at = ?1 WHERE name = ?2 AND revoked_at IS NULL",
        params![now_column(), name],
    )?;
    if changed == 0 {
        return Err(RequestError::NoSuchReviewer(name.to_owned()));
    }
    audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::REVIEWER_REVOKED,
            actor: None,
            request_id: None,
            details: serde_json::json!({
                "reviewer": name,
                "reviewers_sha256": super::seal::reviewers_digest(&tx)?,
            }),
        },
    )?;
    tx.commit()?;
    Ok(())
}
