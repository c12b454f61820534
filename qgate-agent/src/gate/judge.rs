//! Judging one SQL message: the classifier's facts, what the session and
//! the database's catalog add to them (unmodelled lexing, user code,
//! FunctionCall by OID, a write's estimated share of its table, an
//! uncommitted schema change), and the policy's decision on the whole.
use std::sync::Arc;

use super::{held::PendingSql, ConnInfo, Flow, Gate, SqlInfo, FUNCTION_CALL, INCOMPLETE};
use crate::{
    catalog::{CatalogView, Estimate, Lookup},
    classify::{Classification, Dialect, Flag, Kind, RowShare},
    policy::{self, Subject},
    wire::SqlCarrier,
};

/// Session settings that change how the server splits statement text.
#[derive(Clone, Debug, Default)]
pub(super) struct Lexing {
    /// `client_encoding` whose multibyte characters may contain `\` or `'`
    /// bytes (SJIS, BIG5, GBK, GB18030, JOHAB, UHC), or one not known.
    pub(super) encoding: Option<String>,
    /// `standard_conforming_strings = off`: backslashes escape in '…'.
    pub(super) backslashes: bool,
}

impl Lexing {
    /// Why the session's reading of `text` may differ from qgate's.
    pub(super) fn unmodelled(&self, text: &str) -> Option<String> {
        if let Some(enc) = &self.encoding {
            if !text.is_ascii() {
                return Some(format!(
                    "the session's client_encoding {enc} may read these non-ASCII bytes \
                     differently from qgate (a multibyte character can hide a quote or backslash)"
                ));
            }
        }
        if self.backslashes && text.contains('\\') {
            return Some(
                "standard_conforming_strings is off in this session: backslashes in \
                 strings escape, which qgate does not model"
                    .into(),
            );
        }
        None
    }

    pub(super) fn any(&self) -> bool {
        self.encoding.is_some() || self.backslashes
    }
}

/// Client encodings whose every byte ≥ 0x80 starts or continues a character
/// that contains no ASCII byte: text in them splits like qgate splits it.
pub(super) fn encoding_is_modelled(name: &str) -> bool {
    let n: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        n.as_str(),
        "UTF8"
            | "UNICODE"
            | "SQLASCII"
            | "LATIN1"
            | "LATIN2"
            | "LATIN3"
            | "LATIN4"
            | "LATIN5"
            | "LATIN6"
            | "LATIN7"
            | "LATIN8"
            | "LATIN9"
            | "LATIN10"
            | "ISO88591"
            | "ISO88592"
            | "ISO88593"
            | "ISO88594"
            | "ISO88595"
            | "ISO88596"
            | "ISO88597"
            | "ISO88598"
            | "ISO88599"
            | "ISO885910"
            | "ISO885913"
            | "ISO885914"
            | "ISO885915"
            | "ISO885916"
            | "WIN1250"
            | "WIN1251"
            | "WIN1252"
            | "WIN1253"
            | "WIN1254"
            | "WIN1255"
            | "WIN1256"
            | "WIN1257"
            | "WIN1258"
            | "WIN866"
            | "WIN874"
            | "KOI8R"
            | "KOI8U"
            | "EUCJP"
            | "EUCCN"
            | "EUCKR"
            | "EUCTW"
            | "EUCJIS2004"
            | "MULEINTERNAL"
    )
}

/// The database a session works in (PostgreSQL's default: the user's name).
pub(super) fn database_of(subject: &Subject) -> String {
    subject
        .database
        .clone()
        .or_else(|| subject.user.clone())
        .unwrap_or_default()
}

/// A FunctionCall judged as the call it is: `SELECT schema.name()` for the
/// function its OID names; `None` when the OID is unknown (then held).
fn function_call_text(view: &CatalogView, text: &str) -> Option<String> {
    let oid: u32 = text.rsplit(' ').next()?.trim().parse().ok()?;
    let (schema, name, _) = view.function_by_oid(oid)?;
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    Some(format!("SELECT {}.{}()", quote(schema), quote(name)))
}

/// How many parameters (`$1` … `$n`) a statement text takes.
fn placeholders(sql: &str) -> usize {
    let Ok(tokens) = crate::classify::tokenize(sql, Dialect::Postgresql) else {
        return 0;
    };
    tokens
        .iter()
        .filter_map(|t| match &t.token {
            sqlparser::tokenizer::Token::Placeholder(p) => p.strip_prefix('$')?.parse().ok(),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// True when a statement may create or change what runs user code.
pub(super) fn may_change_schema(classification: &Classification) -> bool {
    classification.statements.iter().any(|s| {
        matches!(
            s.kind,
            Kind::Ddl | Kind::Dcl | Kind::Unknown | Kind::Procedural | Kind::Utility
        ) || s.has(Flag::UserCode)
    })
}

/// True when a statement may create or change code the catalog reader
/// would find (functions, operators, casts, types, views, rules, triggers,
/// policies …), or may do anything (server-side code, not understood):
/// until its transaction ends, the session's later statements count as
/// user code. Other DDL (a table, a column, an index) only has the catalog
/// read again.
pub(super) fn may_create_code(classification: &Classification) -> bool {
    const CODE_OBJECTS: &[&str] = &[
        "FUNCTION",
        "PROCEDURE",
        "OPERATOR",
        "CAST",
        "TYPE",
        "DOMAIN",
        "RULE",
        "TRIGGER",
        "VIEW",
        "POLICY",
        "AGGREGATE",
        "EXTENSION",
        "LANGUAGE",
        "TRANSFORM",
        "CONVERSION",
        "METHOD",
        "SCHEMA",
    ];
    classification.statements.iter().any(|s| match s.kind {
        Kind::Unknown | Kind::Procedural => true,
        Kind::Ddl => s.verb.split(' ').any(|w| CODE_OBJECTS.contains(&w)),
        _ => s.has(Flag::UserCode),
    })
}

impl Gate {
    /// The statement's facts, with what the session and the database's
    /// catalog add, and the policy's decision on them. What shadow rules
    /// would have done is audited (`policy.shadow`) and counted.
    pub(super) fn classify_and_decide(
        &mut self,
        conn: &ConnInfo,
        sql: &PendingSql<SqlInfo>,
        policy: &Arc<policy::Policy>,
    ) -> Option<(Classification, policy::Decision)> {
        let (classification, decision) = self.classify_and_decide_now(conn, sql, policy)?;
        for hit in &decision.shadow {
            ::metrics::counter!(
                super::metrics::SHADOW,
                "rule" => hit.rule.clone(),
                "would" => hit.would
            )
            .increment(1);
            let details = serde_json::json!({
                "rule": hit.rule,
                "would": hit.would,
                "decided": decision.action.name(),
                "decided_by": decision.rule,
                "statement": crate::classify::redact::redact(&sql.info.text),
                "fingerprint": classification.fingerprint,
                "user": conn.subject.user,
                "database": conn.subject.database,
                "client_addr": conn.subject.client_addr.map(|a| a.to_string()),
            });
            // Not waited for: the statement goes on at once.
            let board = self.board.clone();
            self.runtime.spawn(async move {
                let _ = board
                    .audit(crate::store::audit::kinds::POLICY_SHADOW, details)
                    .await;
            });
        }
        Some((classification, decision))
    }

    fn classify_and_decide_now(
        &mut self,
        conn: &ConnInfo,
        sql: &PendingSql<SqlInfo>,
        policy: &Arc<policy::Policy>,
    ) -> Option<(Classification, policy::Decision)> {
        let text = sql.info.text.as_str();
        if let Some(why) = conn.lexing.unmodelled(text) {
            let c = Classification::unknown(text, Dialect::Postgresql, why);
            let d = policy.decide(&conn.subject, &c, self.estimator.as_ref());
            return self.unless_estimating((c, d));
        }
        let database = database_of(&conn.subject);
        let view = match &self.catalogs {
            None => None,
            Some(_) if database.is_empty() => Some(Err(
                "the session's database is unknown (it was open before the agent started)"
                    .to_string(),
            )),
            Some(catalogs) => Some(match catalogs.lookup(&database) {
                Lookup::Ready(view) => Ok(view),
                // Asked again after the deadline: decide without it (below).
                Lookup::Pending => Err("the database's catalog is still being read".to_string()),
                Lookup::Unavailable(why) => Err(why),
            }),
        };
        let function_call;
        let judged = if sql.incomplete {
            INCOMPLETE
        } else if sql.info.carrier == SqlCarrier::FunctionCall {
            function_call = view
                .as_ref()
                .and_then(|v| v.as_ref().ok())
                .and_then(|v| function_call_text(v, text));
            function_call.as_deref().unwrap_or(FUNCTION_CALL)
        } else {
            text
        };
        let (mut classification, decision) = self.cache.decide(
            policy,
            &conn.subject,
            judged,
            Dialect::Postgresql,
            self.estimator.as_ref(),
        );
        if self.estimator.take_pending() {
            // Decided again when the planner has answered (off this loop).
            return None;
        }
        if judged != text {
            // The reviewer reads what the client sent.
            for s in &mut classification.statements {
                s.sql = text.to_owned();
            }
        }
        let Some(view) = view else {
            return Some((classification, decision));
        };
        let mut flagged = false;
        for statement in &mut classification.statements {
            let mut runs = match &view {
                Ok(view) => view.user_code(statement, &|f| policy.lists_safe_function(f)),
                Err(why) if !matches!(statement.kind, Kind::Transaction) => vec![why.clone()],
                Err(_) => Vec::new(),
            };
            if conn.schema_changed && !matches!(statement.kind, Kind::Transaction) {
                runs.push(
                    "this session changed the schema in its open transaction; qgate reads \
                     only committed catalogs"
                        .into(),
                );
            }
            if !runs.is_empty() {
                statement.flags.insert(Flag::UserCode);
                statement.code.runs = runs;
                flagged = true;
            }
        }
        if policy.wants_row_shares() {
            for statement in &mut classification.statements {
                if !statement.changes_existing_rows()
                    || statement.has(Flag::UserCode)
                    || statement.has(Flag::AllRows)
                {
                    // Held already, or planning it could run user code.
                    continue;
                }
                statement.share = Some(self.row_share(conn, &view, &statement.sql)?);
                flagged = true;
            }
        }
        if !flagged {
            return Some((classification, decision));
        }
        let decision = policy.decide(&conn.subject, &classification, self.estimator.as_ref());
        self.unless_estimating((classification, decision))
    }

    /// `decided`, unless it met an estimate still being asked: then `None`,
    /// and the statement is decided again when the answer is in.
    fn unless_estimating<T>(&self, decided: T) -> Option<T> {
        (!self.estimator.take_pending()).then_some(decided)
    }

    /// The planner's estimate of how much of its table a write changes;
    /// `None` while it is being asked.
    fn row_share(
        &self,
        conn: &ConnInfo,
        view: &Result<Arc<CatalogView>, String>,
        sql: &str,
    ) -> Option<RowShare> {
        let unavailable = |reason: String| Some(RowShare::Unavailable { reason });
        if let Err(why) = view {
            return unavailable(why.clone());
        }
        if conn.search_path_changed {
            return unavailable(
                "the session changed its search_path, so the planner here may read \
                 other tables"
                    .into(),
            );
        }
        if let Err(e) = crate::policy::estimate::plannable(sql) {
            return unavailable(e.to_string());
        }
        let catalogs = self.catalogs.as_ref()?;
        match catalogs.estimate(&database_of(&conn.subject), sql, placeholders(sql)) {
            Estimate::Pending => None,
            Estimate::Ready(Ok(share)) => Some(RowShare::Estimated {
                rows: share.rows,
                of: share.of,
                relation: share.relation,
            }),
            Estimate::Ready(Err(reason)) => unavailable(reason),
        }
    }

    /// A statement that may create or change what runs user code (DDL, a
    /// statement qgate does not understand, server-side code) was let run:
    /// the database's catalog is read again, and this session's statements
    /// count as user code until its transaction ends.
    pub(super) fn schema_changed(&mut self, flow: &Flow, creates_code: bool) {
        if self.catalogs.is_none() {
            return;
        }
        let Some(info) = self.conns.get_mut(flow) else {
            return;
        };
        let database = database_of(&info.subject);
        // Read again once it is committed (the session is idle).
        info.catalog_stale = true;
        if creates_code {
            info.schema_changed = true;
        }
        self.invalidate_database(&database);
    }

    /// `database`'s catalog no longer serves: it is read again, and until
    /// then no session in it gets the kernel's fast path (a statement of
    /// another session must not reach, unasked, what the change created).
    pub(super) fn invalidate_database(&mut self, database: &str) {
        let Some(catalogs) = self.catalogs.clone() else {
            return;
        };
        catalogs.invalidate(database);
        let flows: Vec<Flow> = self
            .conns
            .iter()
            .filter(|(_, c)| database_of(&c.subject) == database)
            .map(|(flow, _)| *flow)
            .collect();
        for flow in flows {
            self.apply_mode(&flow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_qgate_splits_like_the_server() {
        for (name, modelled) in [
            ("UTF8", true),
            ("utf-8", true),
            ("SQL_ASCII", true),
            ("LATIN1", true),
            ("WIN1252", true),
            ("EUC_JP", true),
            ("SJIS", false),
            ("Shift_JIS", false),
            ("BIG5", false),
            ("GBK", false),
            ("GB18030", false),
            ("UHC", false),
            ("JOHAB", false),
            ("SHIFT_JIS_2004", false),
            ("made-up", false),
        ] {
            assert_eq!(encoding_is_modelled(name), modelled, "{name}");
        }
    }

    #[test]
    fn session_lexing_holds_only_what_it_cannot_model() {
        let plain = Lexing::default();
        assert!(plain.unmodelled("SELECT 'é\\'").is_none());
        let sjis = Lexing {
            encoding: Some("SJIS".into()),
            backslashes: false,
        };
        assert!(
            sjis.unmodelled("SELECT 'a\\b'").is_none(),
            "ASCII reads alike"
        );
        let why = sjis
            .unmodelled("SELECT E'\u{fffd}\\'; DROP TABLE t; --'")
            .unwrap();
        assert!(why.contains("client_encoding SJIS"), "{why}");
        let escapes = Lexing {
            encoding: None,
            backslashes: true,
        };
        assert!(escapes.unmodelled("SELECT 'x'").is_none());
        let why = escapes
            .unmodelled("SELECT 'x\\' , $$' ; DROP TABLE t; -- $$")
            .unwrap();
        assert!(why.contains("standard_conforming_strings"), "{why}");
        assert!(!plain.any() && sjis.any() && escapes.any());
    }

    #[test]
    fn parameters_are_counted_from_tokens() {
        assert_eq!(placeholders("DELETE FROM t WHERE id > $1"), 1);
        assert_eq!(placeholders("UPDATE t SET v = $2 WHERE id = $1"), 2);
        assert_eq!(placeholders("SELECT '$3' FROM t"), 0, "inside a string");
        assert_eq!(placeholders("DELETE FROM t WHERE id = 1"), 0);
    }

    #[test]
    fn function_calls_are_judged_as_the_function_their_oid_names() {
        use crate::catalog::view::{FunctionRow, Snapshot};
        let view = crate::catalog::CatalogView::build(&Snapshot {
            functions: vec![FunctionRow {
                oid: 964,
                schema: "pg_catalog".into(),
                name: "lo_unlink".into(),
                args: String::new(),
                required_args: 1,
            }],
            ..Snapshot::default()
        });
        assert_eq!(
            function_call_text(&view, "-- FunctionCall of function OID 964").as_deref(),
            Some("SELECT \"pg_catalog\".\"lo_unlink\"()")
        );
        assert_eq!(
            function_call_text(&view, "-- FunctionCall of function OID 1"),
            None
        );
    }
}
