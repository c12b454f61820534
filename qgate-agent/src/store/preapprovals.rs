//! Pre-approved statements: a reviewer approves a statement before it is
//! sent (a migration's, say), for one database user, for a while and a
//! number of uses. A held statement whose every part matches one of them
//! — by its normalized text: whitespace and comments aside and unquoted
//! names folded, but every literal as written, so `… WHERE id = 1` never
//! pre-approves `… id = 2` — gets that reviewer's approval at once, through
//! the same vote as any approval (no self-approval, N-of-M needs N
//! reviewers' pre-approvals), and a use is counted down.
use rusqlite::{params, Connection, TransactionBehavior};
use serde::Serialize;
use sqlparser::{
    dialect::PostgreSqlDialect,
    tokenizer::{Token, Tokenizer, Whitespace},
};
use utoipa::ToSchema;

use super::audit::{self, AuditEntry};
use super::migrations::Migration;
use super::requests::{column_text, now_column, RequestError, Reviewer};

pub const MIGRATIONS: &[Migration] = &[Migration {
    name: "requests-0003-preapprovals",
    sql: "
CREATE TABLE preapprovals (
    id          INTEGER PRIMARY KEY,
    reviewer_id INTEGER NOT NULL REFERENCES reviewers(id),
    db_user     TEXT NOT NULL,
    normalized  TEXT NOT NULL,
    statement   TEXT NOT NULL,
    created_at  INTEGER NOT NULL, -- unix ms
    valid_until INTEGER NOT NULL, -- unix ms
    uses_left   INTEGER NOT NULL CHECK (uses_left >= 0)
);
CREATE INDEX preapprovals_lookup ON preapprovals(db_user, normalized);
",
}];

/// One pre-approved statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Preapproval {
    pub id: i64,
    pub reviewer: String,
    pub db_user: String,
    pub statement: String,
    #[schema(format = DateTime)]
    pub valid_until: String,
    pub uses_left: i64,
}

/// The text as the match compares it: tokens without whitespace or
/// comments, one space apart, unquoted words in lower case, literals and
/// quoted names exactly as written, a final `;` dropped. `None` when it
/// does not tokenize (never pre-approved).
pub fn normalize(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    let mut parts: Vec<String> = Vec::new();
    for token in tokens {
        match token {
            Token::Whitespace(
                Whitespace::Space
                | Whitespace::Newline
                | Whitespace::Tab
                | Whitespace::SingleLineComment { .. }
                | Whitespace::MultiLineComment(_),
            ) => {}
            Token::Word(w) if w.quote_style.is_none() => parts.push(w.value.to_lowercase()),
            other => parts.push(other.to_string()),
        }
    }
    while parts.last().is_some_and(|p| p == ";") {
        parts.pop();
    }
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// The longest a pre-approval may last: 366 days.
pub const MAX_VALID_MS: i64 = 366 * 86_400 * 1000;
/// The most uses one may have.
pub const MAX_USES: i64 = 100_000;

/// Records `statements` as pre-approved by `reviewer` for `db_user`.
pub fn add(
    conn: &mut Connection,
    reviewer: &Reviewer,
    db_user: &str,
    statements: &[String],
    valid_ms: i64,
    uses: i64,
) -> Result<Vec<Preapproval>, RequestError> {
    if statements.is_empty() {
        return Err(RequestError::InvalidPreapproval(
            "no statement given".into(),
        ));
    }
    if !(1..=MAX_USES).contains(&uses) || !(1..=MAX_VALID_MS).contains(&valid_ms) {
        return Err(RequestError::InvalidPreapproval(format!(
            "uses must be 1 to {MAX_USES} and validity 1 s to 366 days (a standing approval \
             belongs in the policy)"
        )));
    }
    let now = now_column();
    let until = now.saturating_add(valid_ms);
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut out = Vec::new();
    for statement in statements {
        // Matched against held statements as they are kept: redacted.
        let statement = crate::classify::redact::redact(statement).into_owned();
        let Some(normalized) = normalize(&statement) else {
            return Err(RequestError::InvalidPreapproval(format!(
                "does not read as SQL: {statement:?}"
            )));
        };
        tx.execute(
            "INSERT INTO preapprovals (reviewer_id, db_user, normalized, statement, created_at,
                 valid_until, uses_left) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                reviewer.id,
                db_user,
                normalized,
                statement,
                now,
                until,
                uses
            ],
        )?;
        out.push(Preapproval {
            id: tx.last_insert_rowid(),
            reviewer: reviewer.name.clone(),
            db_user: db_user.to_owned(),
            statement,
            valid_until: column_text(until),
            uses_left: uses,
        });
    }
    audit::append(
        &tx,
        &AuditEntry {
            kind: audit::kinds::REQUEST_PREAPPROVED,
            actor: Some(&reviewer.name),
            request_id: None,
            details: serde_json::json!({
                "db_user": db_user,
                "statements": out.iter().map(|p| &p.statement).collect::<Vec<_>>(),
                "ids": out.iter().map(|p| p.id).collect::<Vec<_>>(),
                "valid_until": column_text(until),
                "uses": uses,
            }),
        },
    )?;
    tx.commit()?;
    Ok(out)
}

/// Takes one use of a live pre-approval of `normalized` for `db_user` by
/// each reviewer who has one: (pre-approval id, reviewer id).
pub fn take(
    conn: &mut Connection,
    db_user: &str,
    normalized: &[String],
) -> Result<Vec<(Vec<i64>, i64)>, RequestError> {
    let now = now_column();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Reviewers with a live pre-approval of every part.
    let mut by_reviewer: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for (i, text) in normalized.iter().enumerate() {
        let mut stmt = tx.prepare_cached(
            "SELECT p.id, p.reviewer_id FROM preapprovals p JOIN reviewers r ON r.id = p.reviewer_id
             WHERE p.db_user = ?1 AND p.normalized = ?2 AND p.valid_until > ?3 AND p.uses_left > 0
               AND r.revoked_at IS NULL ORDER BY p.id",
        )?;
        let found: Vec<(i64, i64)> = stmt
            .query_map(params![db_user, text, now], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut next: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
        for (id, reviewer) in found {
            let have = if i == 0 {
                Some(Vec::new())
            } else {
                by_reviewer.get(&reviewer).cloned()
            };
            if let Some(mut ids) = have {
                if ids.len() == i {
                    ids.push(id);
                    next.insert(reviewer, ids);
                }
            }
        }
        by_reviewer = next;
    }
    let mut taken = Vec::new();
    for (reviewer, ids) in by_reviewer {
        for id in &ids {
            tx.execute(
                "UPDATE preapprovals SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left > 0",
                [id],
            )?;
        }
        taken.push((ids, reviewer));
    }
    tx.commit()?;
    Ok(taken)
}

/// Gives back uses taken for a vote that was refused.
pub fn give_back(conn: &Connection, ids: &[i64]) -> Result<(), RequestError> {
    for id in ids {
        conn.execute(
            "UPDATE preapprovals SET uses_left = uses_left + 1 WHERE id = ?1",
            [id],
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn normalization_ignores_layout_and_case_never_literals() {
        let a = normalize("ALTER TABLE  orders\n  ADD COLUMN note text; -- why").unwrap();
        assert_eq!(
            Some(a.clone()),
            normalize("/* qgate: reason=MIG-1 */ alter table orders add column note TEXT")
        );
        assert_ne!(
            normalize("DELETE FROM t WHERE id = 1"),
            normalize("DELETE FROM t WHERE id = 2")
        );
        assert_ne!(
            normalize("UPDATE t SET v = 'a'"),
            normalize("UPDATE t SET v = 'A'")
        );
        assert_ne!(normalize("DROP TABLE \"T\""), normalize("DROP TABLE t"));
        assert_ne!(normalize("DROP TABLE t"), normalize("DROP TABLE t CASCADE"));
        assert_eq!(normalize("  ;  "), None);
    }
}
