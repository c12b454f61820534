//! Held statements ("requests"), their votes, and the rules of approval
//! (reviewers and their tokens: [`super::reviewers`], re-exported here).
//!
//! Every state change here writes its audit row with [`audit::append`] inside
//! the same SQLite transaction, and the connection runs with
//! `synchronous=FULL`: when a function returns `Ok`, the decision and its
//! audit row are on disk, so the gate may act on it and a crash cannot lose it.
use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::audit::{self, AuditEntry};
pub use super::reviewers::{
    add_reviewer, list_reviewers, new_token, reviewer_by_token, revoke_reviewer, token_sha256,
    NewReviewer, Reviewer, Role,
};
use super::{migrations::Migration, Store, StoreError};
use crate::clock::{self, UnixNanos};

pub const MIGRATIONS: &[Migration] = &[Migration {
    name: "requests-0001-requests-reviewers-votes",
    sql: "
CREATE TABLE reviewers (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('reviewer', 'admin', 'auditor')),
    groups TEXT NOT NULL,       -- JSON array of group names
    db_users TEXT NOT NULL,     -- JSON array of DB users this reviewer is
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL, -- unix ms
    revoked_at INTEGER
);
-- A name can be reused only after the previous holder was revoked.
CREATE UNIQUE INDEX reviewers_active_name ON reviewers(name) WHERE revoked_at IS NULL;

CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    statement_id INTEGER,
    statement TEXT NOT NULL,
    justification TEXT,
    facts TEXT NOT NULL,        -- JSON from the classifier
    rule TEXT NOT NULL,
    approvals_needed INTEGER NOT NULL CHECK (approvals_needed >= 1),
    reviewer_groups TEXT NOT NULL, -- JSON array
    db_user TEXT,
    database TEXT,
    application TEXT,
    client_addr TEXT,
    connection_id INTEGER NOT NULL,
    transaction_state TEXT NOT NULL,
    estimated_rows INTEGER,
    status TEXT NOT NULL CHECK (status IN ('pending', 'approved', 'denied', 'expired', 'withdrawn')),
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    closed_at INTEGER,
    closed_by TEXT,
    close_comment TEXT,
    forced INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX requests_status_expiry ON requests(status, expires_at);
CREATE INDEX requests_created ON requests(created_at);

CREATE TABLE votes (
    id INTEGER PRIMARY KEY,
    request_id INTEGER NOT NULL REFERENCES requests(id),
    reviewer TEXT NOT NULL,
    verdict TEXT NOT NULL CHECK (verdict IN ('approve', 'deny', 'force-approve')),
    comment TEXT,
    at INTEGER NOT NULL
);
-- N-of-M means N distinct reviewers: a second approval by the same name is refused.
CREATE UNIQUE INDEX votes_one_approval_each ON votes(request_id, reviewer) WHERE verdict = 'approve';
",
}, Migration {
    name: "requests-0002-held-by-server-hook",
    sql: "
-- Which capture point holds the statement: 'wire' (tc program, held
-- segment) or 'server_hook' (a stopped backend), and for the latter what a
-- restarted agent needs to take the backend over.
ALTER TABLE requests ADD COLUMN held_by TEXT NOT NULL DEFAULT 'wire'
    CHECK (held_by IN ('wire', 'server_hook'));
ALTER TABLE requests ADD COLUMN backend_pid INTEGER;
ALTER TABLE requests ADD COLUMN resume TEXT;
",
}, Migration {
    name: "requests-0003-transport",
    sql: "
-- How the held statement's session reached the server (tcp, tls, gss,
-- unix, unknown); NULL for requests recorded before this column.
ALTER TABLE requests ADD COLUMN transport TEXT;
",
}, Migration {
    name: "requests-0004-protocol-server",
    sql: "
-- Which server and protocol the held statement came from: 'postgresql' or
-- 'mysql', and the server's address:port (NULL for a Unix socket, and for
-- requests recorded before these columns).
ALTER TABLE requests ADD COLUMN protocol TEXT
    CHECK (protocol IS NULL OR protocol IN ('postgresql', 'mysql'));
ALTER TABLE requests ADD COLUMN server TEXT;
",
}];

/// Opens the store the way every user of these tables must: the one place
/// that names the store's opener, so the merge adapts a single call.
pub fn open_db(path: &Path) -> Result<Connection, StoreError> {
    Store::open(path).map(Store::into_conn)
}

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("request {0} not found")]
    NotFound(i64),
    #[error("reviewer {0:?} not found or already revoked")]
    NoSuchReviewer(String),
    #[error("an active reviewer named {0:?} already exists")]
    DuplicateReviewer(String),
    #[error("invalid reviewer: {0}")]
    InvalidReviewer(String),
    #[error("stored row is corrupt: {0}")]
    Corrupt(String),
    #[error("pre-approval: {0}")]
    InvalidPreapproval(String),
}

/// Why a reviewer may not cast a vote; each maps to a 403 or 409 in the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("auditors may read but not decide")]
    ReadOnly,
    #[error("only admins may force-approve")]
    NotAdmin,
    #[error("rule {rule:?} asks for reviewers from {wanted:?}; {reviewer:?} is in {has:?}")]
    NotInGroup {
        rule: String,
        reviewer: String,
        wanted: Vec<String>,
        has: Vec<String>,
    },
    #[error("self-approval refused by rule {rule:?}: reviewer {reviewer:?} is linked to DB user {db_user:?}, who issued the statement")]
    SelfApproval {
        rule: String,
        reviewer: String,
        db_user: String,
    },
    #[error("self-approval refused by rule {rule:?}: the statement's DB user is unknown and reviewer {reviewer:?} is linked to DB users, so it could be their own")]
    UnknownRequester { rule: String, reviewer: String },
    #[error("reviewer {reviewer:?} has already approved request {request}; N-of-M needs distinct reviewers")]
    AlreadyApproved { request: i64, reviewer: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum RequestStatus {
    Pending,
    Approved,
    Denied,
    Expired,
    Withdrawn,
}

impl RequestStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestStatus::Pending => "pending",
            RequestStatus::Approved => "approved",
            RequestStatus::Denied => "denied",
            RequestStatus::Expired => "expired",
            RequestStatus::Withdrawn => "withdrawn",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "pending" => Some(RequestStatus::Pending),
            "approved" => Some(RequestStatus::Approved),
            "denied" => Some(RequestStatus::Denied),
            "expired" => Some(RequestStatus::Expired),
            "withdrawn" => Some(RequestStatus::Withdrawn),
            _ => None,
        }
    }
}

/// The session's transaction status from the last ReadyForQuery
/// (PostgreSQL protocol docs, 55.7 "Message Formats", ReadyForQuery).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TransactionState {
    Idle,
    InTransaction,
    FailedTransaction,
    /// No ReadyForQuery seen yet on this connection.
    Unknown,
}

impl TransactionState {
    /// From ReadyForQuery's status byte: `I`, `T` or `E`.
    pub fn from_ready_for_query(status: u8) -> Self {
        match status {
            b'I' => TransactionState::Idle,
            b'T' => TransactionState::InTransaction,
            b'E' => TransactionState::FailedTransaction,
            _ => TransactionState::Unknown,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TransactionState::Idle => "idle",
            TransactionState::InTransaction => "in_transaction",
            TransactionState::FailedTransaction => "failed_transaction",
            TransactionState::Unknown => "unknown",
        }
    }

    fn parse(text: &str) -> Self {
        match text {
            "idle" => TransactionState::Idle,
            "in_transaction" => TransactionState::InTransaction,
            "failed_transaction" => TransactionState::FailedTransaction,
            _ => TransactionState::Unknown,
        }
    }
}

/// Who sent the statement, as the connection's startup told it; `None` where
/// qgate did not see the connection start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Identity {
    pub db_user: Option<String>,
    pub database: Option<String>,
    pub application: Option<String>,
    pub client_addr: Option<String>,
    /// How the session reached the server: `tcp`, `tls`, `gss`, `unix`, or
    /// `unknown` (a TCP session first seen mid-stream); `None` from before
    /// qgate recorded it.
    #[serde(default)]
    pub transport: Option<String>,
    /// The protocol the session speaks: `postgresql` or `mysql`; `None`
    /// from before qgate recorded it.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The server's address and port the session reached (`None` for a
    /// Unix-socket session, or from before qgate recorded it).
    #[serde(default)]
    pub server: Option<String>,
}

/// What the gate knows when the policy says `hold`.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// The statement's row in the store's `statements` table, when written.
    pub statement_id: Option<i64>,
    pub statement: String,
    pub facts: serde_json::Value,
    pub rule: String,
    pub approvals_needed: u32,
    pub reviewer_groups: Vec<String>,
    pub identity: Identity,
    pub connection_id: i64,
    pub transaction_state: TransactionState,
    pub estimated_rows: Option<i64>,
    /// How long the request may wait; `None` takes the agent's hold timeout.
    pub timeout: Option<std::time::Duration>,
    /// Set when the server hook holds the statement (a stopped backend).
    pub hook: Option<HookHold>,
}

/// A statement the server hook holds: the stopped backend and what a
/// restarted agent needs to finish it (opaque to the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookHold {
    pub backend_pid: u32,
    pub resume: String,
}

/// Which capture point holds a request's statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HeldBy {
    /// The tc program: the statement's segment is dropped until released.
    Wire,
    /// The server hook: the backend is stopped before it parses the statement.
    ServerHook,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Vote {
    pub reviewer: String,
    /// The database users the reviewer was linked to when voting (a
    /// reviewer never approves a statement of one of them): empty for a
    /// reviewer added with `--no-db-user`.
    pub reviewer_db_users: Vec<String>,
    pub verdict: Verdict,
    pub comment: Option<String>,
    #[schema(format = DateTime)]
    pub at: String,
}

/// How a closed request ended and who ended it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Closing {
    /// Reviewer name, or `qgate` for expiry and withdrawal.
    pub by: String,
    pub comment: Option<String>,
    #[schema(format = DateTime)]
    pub at: String,
    /// An admin's break-glass approval.
    pub forced: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Request {
    pub id: i64,
    pub status: RequestStatus,
    pub statement: String,
    /// From a leading `/* qgate: reason=… */` or `-- qgate: reason=…` comment.
    pub justification: Option<String>,
    #[schema(value_type = Object)]
    pub facts: serde_json::Value,
    pub rule: String,
    pub identity: Identity,
    pub connection_id: i64,
    pub statement_id: Option<i64>,
    pub transaction_state: TransactionState,
    pub estimated_rows: Option<i64>,
    pub approvals_needed: u32,
    pub approvals_remaining: u32,
    pub reviewer_groups: Vec<String>,
    pub votes: Vec<Vote>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub expires_at: String,
    pub closing: Option<Closing>,
    pub held_by: HeldBy,
    /// The stopped backend's process id (server hook only).
    pub backend_pid: Option<u32>,
    /// What a restarted agent needs to take a stopped backend over.
    #[serde(skip)]
    pub resume: Option<String>,
}

/// Filters of a request listing; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct RequestFilter {
    pub status: Option<RequestStatus>,
    pub db_user: Option<String>,
    pub database: Option<String>,
    /// Created at or after.
    pub since: Option<UnixNanos>,
    pub limit: u32,
}

/// What a reviewer asks for: the vote's `verdict` in the API, the store
/// and the audit log (`approve`, `deny`, `force-approve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Approve,
    Deny,
    /// Admin break-glass: approves at once, whatever N and the groups.
    ForceApprove,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Approve => "approve",
            Verdict::Deny => "deny",
            Verdict::ForceApprove => "force-approve",
        }
    }
}

impl rusqlite::types::FromSql for Verdict {
    fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        match value.as_str()? {
            "approve" => Ok(Verdict::Approve),
            "deny" => Ok(Verdict::Deny),
            "force-approve" => Ok(Verdict::ForceApprove),
            other => Err(rusqlite::types::FromSqlError::Other(
                format!("unknown verdict {other:?}").into(),
            )),
        }
    }
}

/// The result of an accepted vote.
#[derive(Debug, Clone)]
pub struct VoteOutcome {
    pub request: Request,
    /// The vote closed the request (approved or denied); otherwise it still waits.
    pub closed: bool,
}

/// The current time as the request tables store it (Unix milliseconds).
pub(super) fn now_column() -> i64 {
    clock::to_ms(clock::now())
}

/// A time read from a milliseconds column, as RFC 3339.
pub(super) fn column_text(ms: i64) -> String {
    clock::rfc3339_or_number(clock::from_ms(ms))
}

pub(super) fn json_list(values: &[String]) -> String {
    serde_json::Value::from(values.to_vec()).to_string()
}

pub(super) fn parse_list(text: &str, what: &str) -> Result<Vec<String>, RequestError> {
    serde_json::from_str(text).map_err(|e| RequestError::Corrupt(format!("{what}: {e}")))
}

// ---- requests ----

const REQUEST_COLUMNS: &str =
    "id, status, statement, justification, facts, rule, db_user, database,
    application, client_addr, connection_id, statement_id, transaction_state, estimated_rows,
    approvals_needed, reviewer_groups, created_at, expires_at, closed_at, closed_by,
    close_comment, forced, held_by, backend_pid, resume, transport, protocol, server";

/// A request row before its votes are attached.
fn request_from_row(row: &Row<'_>) -> rusqlite::Result<Result<Request, RequestError>> {
    let status: String = row.get(1)?;
    let facts: String = row.get(4)?;
    let groups: String = row.get(15)?;
    let needed: i64 = row.get(14)?;
    let closed_at: Option<i64> = row.get(18)?;
    let closing = match closed_at {
        Some(at) => Some(Closing {
            by: row.get::<_, Option<String>>(19)?.unwrap_or_default(),
            comment: row.get(20)?,
            at: column_text(at),
            forced: row.get(21)?,
        }),
        None => None,
    };
    let identity = Identity {
        db_user: row.get(6)?,
        database: row.get(7)?,
        application: row.get(8)?,
        client_addr: row.get(9)?,
        transport: row.get(25)?,
        protocol: row.get(26)?,
        server: row.get(27)?,
    };
    let (id, statement, justification, rule): (i64, String, Option<String>, String) =
        (row.get(0)?, row.get(2)?, row.get(3)?, row.get(5)?);
    let (connection_id, statement_id, tx_state, estimated_rows): (
        i64,
        Option<i64>,
        String,
        Option<i64>,
    ) = (row.get(10)?, row.get(11)?, row.get(12)?, row.get(13)?);
    let (created, expires): (i64, i64) = (row.get(16)?, row.get(17)?);
    let (held_by, backend_pid, resume): (String, Option<u32>, Option<String>) =
        (row.get(22)?, row.get(23)?, row.get(24)?);
    Ok((|| {
        let approvals_needed = u32::try_from(needed)
            .map_err(|_| RequestError::Corrupt(format!("approvals_needed {needed}")))?;
        Ok(Request {
            id,
            status: RequestStatus::parse(&status)
                .ok_or_else(|| RequestError::Corrupt(format!("request status {status:?}")))?,
            statement,
            justification,
            facts: serde_json::from_str(&facts)
                .map_err(|e| RequestError::Corrupt(format!("request facts: {e}")))?,
            rule,
            identity,
            connection_id,
            statement_id,
            transaction_state: TransactionState::parse(&tx_state),
            estimated_rows,
            approvals_needed,
            approvals_remaining: approvals_needed,
            reviewer_groups: parse_list(&groups, "request reviewer_groups")?,
            votes: Vec::new(),
            created_at: column_text(created),
            expires_at: column_text(expires),
            closing,
            held_by: match held_by.as_str() {
                "server_hook" => HeldBy::ServerHook,
                _ => HeldBy::Wire,
            },
            backend_pid,
            resume,
        })
    })())
}

fn attach_votes(conn: &Connection, request: &mut Request) -> Result<(), RequestError> {
    let mut stmt = conn.prepare_cached(
        "SELECT v.reviewer, v.verdict, v.comment, v.at, r.db_users FROM votes v
         LEFT JOIN reviewers r ON r.name = v.reviewer AND r.created_at <= v.at
              AND (r.revoked_at IS NULL OR r.revoked_at >= v.at)
         WHERE v.request_id = ?1 ORDER BY v.id",
    )?;
    let votes = stmt.query_map([request.id], |r| {
        let db_users: Option<String> = r.get(4)?;
        Ok((
            Vote {
                reviewer: r.get(0)?,
                reviewer_db_users: Vec::new(),
                verdict: r.get(1)?,
                comment: r.get(2)?,
                at: column_text(r.get(3)?),
            },
            db_users,
        ))
    })?;
    request.votes = Vec::new();
    for vote in votes {
        let (mut vote, db_users) = vote?;
        if let Some(list) = db_users {
            vote.reviewer_db_users = parse_list(&list, "reviewer db_users")?;
        }
        request.votes.push(vote);
    }
    let approvals = request
        .votes
        .iter()
        .filter(|v| v.verdict == Verdict::Approve)
        .count();
    request.approvals_remaining = match request.status {
        RequestStatus::Pending => request
            .approvals_needed
            .saturating_sub(u32::try_from(approvals).unwrap_or(u32::MAX)),
        _ => 0,
    };
    Ok(())
}

pub fn get_request(conn: &Connection, id: i64) -> Result<Option<Request>, RequestError> {
    let found = conn
        .query_row(
            &format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE id = ?1"),
            [id],
            request_from_row,
        )
        .optional()?;
    match found {
        None => Ok(None),
        Some(request) => {
            let mut request = request?;
            attach_votes(conn, &mut request)?;
            Ok(Some(request))
        }
    }
}

/// Requests matching `filter`, newest first.
pub fn list_requests(
    conn: &Connection,
    filter: &RequestFilter,
) -> Result<Vec<Request>, RequestError> {
    let mut sql = format!("SELECT {REQUEST_COLUMNS} FROM requests WHERE 1 = 1");
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(status) = filter.status {
        args.push(Box::new(status.as_str()));
        sql.push_str(&format!(" AND status = ?{}", args.len()));
    }
    if let Some(user) = &filter.db_user {
        args.push(Box::new(user.clone()));
        sql.push_str(&format!(" AND db_user = ?{}", args.len()));
    }
    if let Some(database) = &filter.database {
        args.push(Box::new(database.clone()));
        sql.push_str(&format!(" AND database = ?{}", args.len()));
    }
    if let Some(since) = filter.since {
        args.push(Box::new(clock::to_ms(since)));
        sql.push_str(&format!(" AND created_at >= ?{}", args.len()));
    }
    args.push(Box::new(i64::from(filter.limit)));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(rusqlite::params_from_iter(args.iter()), request_from_row)?;
    let mut requests = Vec::new();
    for row in rows {
        let mut request = row??;
        attach_votes(conn, &mut request)?;
        requests.push(request);
    }
    Ok(requests)
}

/// Records a held statement; returns it as stored.
pub fn create_request(
    conn: &mut Connection,
    new: &NewRequest,
    default_timeout: std::time::Duration,
) -> Result<Request, RequestError> {
    let created = now_column();
    let timeout = new.timeout.unwrap_or(default_timeout);
    let expires = created.saturating_add(i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX));
    // The gate redacts before it asks; redacted here too, so that no caller
    // can put a credential where reviewers, webhooks and exports read.
    let statement = crate::classify::redact::redact(&new.statement);
    let justification = crate::classify::justification::parse(&statement);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO requests (statement_id, statement, justification, facts, rule,
            approvals_needed, reviewer_groups, db_user, database, application, client_addr,
            connection_id, transaction_state, estimated_rows, status, created_at, expires_at,
            held_by, backend_pid, resume, transport, protocol, server)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'pending', ?15, ?16,
            ?17, ?18, ?19, ?20, ?21, ?22)",
        params![
            new.statement_id,
            statement,
            justification,
            new.facts.to_string(),
            new.rule,
            new.approvals_needed.max(1),
            json_list(&new.reviewer_groups),
            new.identity.db_user,
            new.identity.database,
            new.identity.application,
            new.identity.client_addr,
            new.connection_id,
            new.transaction_state.as_str(),
            new.estimated_rows,
            created,
            expires,
            if new.hook.is_some() {
                "server_hook"
            } else {
                "wire"
            },
            new.hook.as_ref().map(|h| h.backend_pid),
            new.hook.as_ref().map(|h| h.resume.as_str()),
            new.identity.transport,
            new.identity.protocol,
            new.identity.server,
        ],
    )?;
    let id = tx.last_insert_rowid();
    audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::REQUEST_CREATED,
            actor: None,
            request_id: Some(id),
            details: serde_json::json!({
                "rule": new.rule,
                "statement_id": new.statement_id,
                "approvals_needed": new.approvals_needed.max(1),
                "reviewer_groups": new.reviewer_groups,
                "db_user": new.identity.db_user,
                "database": new.identity.database,
                "protocol": new.identity.protocol,
                "server": new.identity.server,
                "expires_at": column_text(expires),
            }),
        },
    )?;
    let request = get_request(&tx, id)?.ok_or(RequestError::NotFound(id))?;
    tx.commit()?;
    Ok(request)
}

/// Who may cast `verdict` on `request`; the rules of approval in one place.
pub fn check_vote(request: &Request, reviewer: &Reviewer, verdict: Verdict) -> Result<(), Refusal> {
    if reviewer.role == Role::Auditor {
        return Err(Refusal::ReadOnly);
    }
    let approving = matches!(verdict, Verdict::Approve | Verdict::ForceApprove);
    if approving && !reviewer.db_users.is_empty() {
        match &request.identity.db_user {
            Some(user) if reviewer.db_users.iter().any(|u| u == user) => {
                return Err(Refusal::SelfApproval {
                    rule: request.rule.clone(),
                    reviewer: reviewer.name.clone(),
                    db_user: user.clone(),
                })
            }
            Some(_) => {}
            None => {
                return Err(Refusal::UnknownRequester {
                    rule: request.rule.clone(),
                    reviewer: reviewer.name.clone(),
                })
            }
        }
    }
    let in_group = reviewer
        .groups
        .iter()
        .any(|g| request.reviewer_groups.iter().any(|w| w == g));
    match verdict {
        Verdict::ForceApprove if reviewer.role != Role::Admin => Err(Refusal::NotAdmin),
        Verdict::ForceApprove => Ok(()),
        // Stopping a statement is always safe, so admins may deny anything.
        Verdict::Deny if reviewer.role == Role::Admin => Ok(()),
        Verdict::Approve | Verdict::Deny if !in_group => Err(Refusal::NotInGroup {
            rule: request.rule.clone(),
            reviewer: reviewer.name.clone(),
            wanted: request.reviewer_groups.clone(),
            has: reviewer.groups.clone(),
        }),
        Verdict::Approve
            if request
                .votes
                .iter()
                .any(|v| v.verdict == Verdict::Approve && v.reviewer == reviewer.name) =>
        {
            Err(Refusal::AlreadyApproved {
                request: request.id,
                reviewer: reviewer.name.clone(),
            })
        }
        Verdict::Approve | Verdict::Deny => Ok(()),
    }
}

/// How a pending request ends.
struct Close<'a> {
    status: RequestStatus,
    /// The reviewer, or `qgate` for expiry and withdrawal.
    by: &'a str,
    comment: Option<&'a str>,
    /// An admin's force-approval.
    forced: bool,
    /// Unix milliseconds.
    at: i64,
}

fn close(tx: &rusqlite::Transaction<'_>, id: i64, closing: Close<'_>) -> Result<(), RequestError> {
    tx.execute(
        "UPDATE requests SET status = ?1, closed_at = ?2, closed_by = ?3, close_comment = ?4,
            forced = ?5 WHERE id = ?6 AND status = 'pending'",
        params![
            closing.status.as_str(),
            closing.at,
            closing.by,
            closing.comment,
            closing.forced,
            id
        ],
    )?;
    Ok(())
}

/// Loads a request that is still open at `now`; a pending request past its
/// deadline is expired on the spot (and `Closed` returned with `expired_now`).
fn load_open(
    tx: &rusqlite::Transaction<'_>,
    id: i64,
    now: i64,
) -> Result<Result<Request, (Request, bool)>, RequestError> {
    let request = get_request(tx, id)?.ok_or(RequestError::NotFound(id))?;
    if request.status != RequestStatus::Pending {
        return Ok(Err((request, false)));
    }
    let expires = clock::parse(&request.expires_at).map_or(i64::MIN, clock::to_ms);
    if now >= expires {
        expire_in(tx, &request, now)?;
        let expired = get_request(tx, id)?.ok_or(RequestError::NotFound(id))?;
        return Ok(Err((expired, true)));
    }
    Ok(Ok(request))
}

fn expire_in(
    tx: &rusqlite::Transaction<'_>,
    request: &Request,
    now: i64,
) -> Result<(), RequestError> {
    close(
        tx,
        request.id,
        Close {
            status: RequestStatus::Expired,
            by: "qgate",
            comment: None,
            forced: false,
            at: now,
        },
    )?;
    audit::append(
        tx,
        &AuditEntry {
            kind: audit::kinds::REQUEST_EXPIRED,
            actor: None,
            request_id: Some(request.id),
            details: serde_json::json!({ "rule": request.rule, "expires_at": request.expires_at }),
        },
    )?;
    Ok(())
}

/// Casts a reviewer's vote. `Err(Closed)` carries the request's current state;
/// its second field says whether this call expired it (the caller announces that).
pub fn vote(
    conn: &mut Connection,
    id: i64,
    reviewer: &Reviewer,
    verdict: Verdict,
    comment: Option<&str>,
) -> Result<VoteOutcome, VoteError> {
    let now = now_column();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let request = match load_open(&tx, id, now)? {
        Ok(request) => request,
        Err((request, expired_now)) => {
            tx.commit()?;
            return Err(VoteError::Closed {
                request: Box::new(request),
                expired_now,
            });
        }
    };
    check_vote(&request, reviewer, verdict).map_err(VoteError::Refused)?;
    tx.execute(
        "INSERT INTO votes (request_id, reviewer, verdict, comment, at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![id, reviewer.name, verdict.as_str(), comment, now],
    )?;
    let approvals = request
        .votes
        .iter()
        .filter(|v| v.verdict == Verdict::Approve)
        .count() as u64
        + 1;
    let (kind, closed) = match verdict {
        Verdict::Deny => {
            close(
                &tx,
                id,
                Close {
                    status: RequestStatus::Denied,
                    by: &reviewer.name,
                    comment,
                    forced: false,
                    at: now,
                },
            )?;
            (audit::kinds::REQUEST_DENIED, true)
        }
        Verdict::ForceApprove => {
            close(
                &tx,
                id,
                Close {
                    status: RequestStatus::Approved,
                    by: &reviewer.name,
                    comment,
                    forced: true,
                    at: now,
                },
            )?;
            (audit::kinds::REQUEST_FORCE_APPROVED, true)
        }
        Verdict::Approve if approvals >= u64::from(request.approvals_needed) => {
            close(
                &tx,
                id,
                Close {
                    status: RequestStatus::Approved,
                    by: &reviewer.name,
                    comment,
                    forced: false,
                    at: now,
                },
            )?;
            (audit::kinds::REQUEST_APPROVED, true)
        }
        Verdict::Approve => (audit::kinds::REQUEST_APPROVAL, false),
    };
    audit::append(
        &tx,
        &AuditEntry {
            kind,
            actor: Some(&reviewer.name),
            request_id: Some(id),
            details: serde_json::json!({
                "rule": request.rule,
                "role": reviewer.role.as_str(),
                "comment": comment,
                "approvals": if verdict == Verdict::Deny { approvals - 1 } else { approvals },
                "approvals_needed": request.approvals_needed,
            }),
        },
    )?;
    let request = get_request(&tx, id)?.ok_or(RequestError::NotFound(id))?;
    tx.commit()?;
    Ok(VoteOutcome { request, closed })
}

#[derive(Debug, thiserror::Error)]
pub enum VoteError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("request {} is already {}", .request.id, .request.status.as_str())]
    Closed {
        request: Box<Request>,
        expired_now: bool,
    },
    #[error("{0}")]
    Refused(Refusal),
}

impl From<rusqlite::Error> for VoteError {
    fn from(e: rusqlite::Error) -> Self {
        VoteError::Request(e.into())
    }
}

impl From<StoreError> for VoteError {
    fn from(e: StoreError) -> Self {
        VoteError::Request(e.into())
    }
}

/// Closes a pending request without a reviewer: expiry or withdrawal.
pub fn close_by_qgate(
    conn: &mut Connection,
    id: i64,
    status: RequestStatus,
    reason: Option<&str>,
) -> Result<Request, VoteError> {
    let now = now_column();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let request = get_request(&tx, id)?.ok_or(RequestError::NotFound(id))?;
    if request.status != RequestStatus::Pending {
        return Err(VoteError::Closed {
            request: Box::new(request),
            expired_now: false,
        });
    }
    match status {
        RequestStatus::Expired => expire_in(&tx, &request, now)?,
        _ => {
            close(
                &tx,
                id,
                Close {
                    status: RequestStatus::Withdrawn,
                    by: "qgate",
                    comment: reason,
                    forced: false,
                    at: now,
                },
            )?;
            audit::append(
                &tx,
                &AuditEntry {
                    kind: audit::kinds::REQUEST_WITHDRAWN,
                    actor: None,
                    request_id: Some(id),
                    details: serde_json::json!({ "rule": request.rule, "reason": reason }),
                },
            )?;
        }
    }
    let request = get_request(&tx, id)?.ok_or(RequestError::NotFound(id))?;
    tx.commit()?;
    Ok(request)
}

/// One audit row in its own transaction, for events that change no table here.
pub fn append_audit(
    conn: &mut Connection,
    kind: audit::Kind,
    details: serde_json::Value,
) -> Result<i64, RequestError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let id = audit::append(
        &tx,
        &AuditEntry {
            kind,
            actor: None,
            request_id: None,
            details,
        },
    )?;
    tx.commit()?;
    Ok(id)
}

/// Ids of pending requests whose deadline is at or before `now`.
pub fn due_for_expiry(conn: &Connection, now: UnixNanos) -> Result<Vec<i64>, RequestError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM requests WHERE status = 'pending' AND expires_at <= ?1 ORDER BY expires_at",
    )?;
    let ids = stmt.query_map([clock::to_ms(now)], |r| r.get(0))?;
    Ok(ids.collect::<Result<_, _>>()?)
}

/// The earliest deadline among pending requests, unix ms.
pub fn next_deadline(conn: &Connection) -> Result<Option<UnixNanos>, RequestError> {
    let ms: Option<i64> = conn.query_row(
        "SELECT min(expires_at) FROM requests WHERE status = 'pending'",
        [],
        |r| r.get(0),
    )?;
    Ok(ms.map(clock::from_ms))
}

pub fn count_pending(conn: &Connection) -> Result<i64, RequestError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM requests WHERE status = 'pending'",
        [],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(user: Option<&str>, groups: &[&str]) -> Request {
        Request {
            id: 7,
            status: RequestStatus::Pending,
            statement: "DROP TABLE t".into(),
            justification: None,
            facts: serde_json::json!({}),
            rule: "ddl-needs-peer".into(),
            identity: Identity {
                db_user: user.map(Into::into),
                ..Identity::default()
            },
            connection_id: 1,
            statement_id: None,
            transaction_state: TransactionState::Idle,
            estimated_rows: None,
            approvals_needed: 2,
            approvals_remaining: 2,
            reviewer_groups: groups.iter().map(|g| g.to_string()).collect(),
            votes: Vec::new(),
            created_at: String::new(),
            expires_at: String::new(),
            closing: None,
            held_by: HeldBy::Wire,
            backend_pid: None,
            resume: None,
        }
    }

    fn reviewer(name: &str, role: Role, groups: &[&str], db_users: &[&str]) -> Reviewer {
        Reviewer {
            id: 1,
            name: name.into(),
            role,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            db_users: db_users.iter().map(|g| g.to_string()).collect(),
            created_at: String::new(),
            revoked_at: None,
        }
    }

    #[test]
    fn reviewer_linked_to_the_requesting_db_user_cannot_approve() {
        let r = request(Some("alice"), &["dba"]);
        let alice = reviewer("alice", Role::Admin, &["dba"], &["alice"]);
        assert!(matches!(
            check_vote(&r, &alice, Verdict::Approve),
            Err(Refusal::SelfApproval { .. })
        ));
        assert!(matches!(
            check_vote(&r, &alice, Verdict::ForceApprove),
            Err(Refusal::SelfApproval { .. })
        ));
        assert_eq!(check_vote(&r, &alice, Verdict::Deny), Ok(()));
    }

    #[test]
    fn linked_reviewer_cannot_approve_a_statement_of_unknown_user() {
        let r = request(None, &["dba"]);
        let bob = reviewer("bob", Role::Reviewer, &["dba"], &["bob"]);
        assert!(matches!(
            check_vote(&r, &bob, Verdict::Approve),
            Err(Refusal::UnknownRequester { .. })
        ));
        let carol = reviewer("carol", Role::Reviewer, &["dba"], &[]);
        assert_eq!(check_vote(&r, &carol, Verdict::Approve), Ok(()));
    }

    #[test]
    fn only_named_groups_decide_and_only_admins_force() {
        let r = request(Some("app"), &["dba"]);
        let dev = reviewer("dev", Role::Reviewer, &["dev"], &[]);
        assert!(matches!(
            check_vote(&r, &dev, Verdict::Approve),
            Err(Refusal::NotInGroup { .. })
        ));
        assert_eq!(
            check_vote(&r, &dev, Verdict::ForceApprove),
            Err(Refusal::NotAdmin)
        );
        let auditor = reviewer("aud", Role::Auditor, &["dba"], &[]);
        assert_eq!(
            check_vote(&r, &auditor, Verdict::Deny),
            Err(Refusal::ReadOnly)
        );
    }
}
