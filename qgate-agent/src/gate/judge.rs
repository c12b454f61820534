//! Judging one SQL message: the classifier's facts, what the session and
//! the database's catalog add to them (unmodelled lexing, user code,
//! FunctionCall by OID, a write's estimated share of its table, an
//! uncommitted schema change), and the policy's decision on the whole.
use std::sync::Arc;

use super::{connection::ConnInfo, held::PendingSql, SqlInfo, FUNCTION_CALL, INCOMPLETE};
use crate::{
    catalog::{CatalogView, Catalogs, Estimate, Lookup, MysqlLookup},
    classify::{Classification, Dialect, Flag, Kind, RowShare},
    flow::Transport,
    policy::{self, Action, DecisionCache, PolicyHandle, RowEstimator, Subject},
    store::requests::{Identity as RequestIdentity, NewRequest, TransactionState},
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
    /// MySQL: the session may have changed its `sql_mode`
    /// (`NO_BACKSLASH_ESCAPES` ends a string where qgate's reading goes on).
    pub(super) sql_mode: bool,
}

/// MySQL statement text that may change how the server splits text: its
/// `sql_mode` (backslashes) or its character set (multibyte characters
/// that hide a `\` or a quote). Matched on the words, wherever they are:
/// `SET sql_mode`, `SET @@SESSION.sql_mode`, `SET STATEMENT sql_mode=… FOR`,
/// `SET NAMES`, `SET CHARACTER SET`, `character_set_client`, `collation_…`.
fn mysql_changes_lexing(text: &str) -> (bool, bool) {
    let lower = text.to_ascii_lowercase();
    let sql_mode = lower.contains("sql_mode");
    // (A COM_CHANGE_USER, judged as its name, carries a character set too.)
    let charset = [
        "names",
        "character",
        "charset",
        "collation",
        "com_change_user",
    ]
    .iter()
    .any(|w| lower.contains(w));
    (sql_mode, charset)
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
        self.encoding.is_some() || self.backslashes || self.sql_mode
    }

    /// A MySQL statement judged in this session: from now on its text is
    /// read with care if it may change the session's `sql_mode` or
    /// character set (`unmodelled` then holds what qgate cannot split
    /// like the server).
    pub(super) fn mysql_statement(&mut self, text: &str, hides_session_change: bool) {
        let (sql_mode, charset) = mysql_changes_lexing(text);
        self.sql_mode |= sql_mode || hides_session_change;
        if (charset || hides_session_change) && self.encoding.is_none() {
            self.encoding = Some(if charset {
                "set by the session".into()
            } else {
                "perhaps set by a statement whose effect qgate cannot read (a CALL, EXECUTE, \
                 text not understood)"
                    .into()
            });
        }
    }

    /// Why a MySQL text may be read differently by the server than by
    /// qgate: the session's state, or the text itself changing it before
    /// a later statement in it (`SET sql_mode='NO_BACKSLASH_ESCAPES';
    /// SELECT 'a\'; DROP …`).
    pub(super) fn mysql_unmodelled(&self, text: &str, server: Option<&str>) -> Option<String> {
        if let Some(why) = server {
            if text.contains('\\') || text.contains('"') || !text.is_ascii() {
                return Some(format!(
                    "{why}: backslashes, double quotes and non-ASCII bytes may be read \
                     differently by the server, which qgate does not model"
                ));
            }
        }
        let (sql_mode, charset) = mysql_changes_lexing(text);
        if (self.sql_mode || sql_mode) && (text.contains('\\') || text.contains('"')) {
            return Some(
                "the session may have changed its sql_mode: backslashes in strings may \
                 not escape and double quotes may name columns (ANSI_QUOTES), which \
                 qgate does not model"
                    .into(),
            );
        }
        if charset && !text.is_ascii() {
            return Some(
                "the statement changes the character set and has non-ASCII bytes \
                 (a multibyte character can hide a quote or backslash)"
                    .into(),
            );
        }
        self.unmodelled(text)
    }
}

/// True if a MySQL text has an `@` outside its quoted strings and names
/// (a user or system variable; one in a comment counts too). Backslashes
/// escape in strings, as in MariaDB's default `sql_mode` (a session that may
/// have changed it is not estimated at all).
fn mentions_variable(sql: &str) -> bool {
    let mut quote: Option<char> = None;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == '\\' && q != '`' => {
                chars.next();
            }
            Some(q) if c == q => {
                if chars.peek() == Some(&q) {
                    chars.next();
                } else {
                    quote = None;
                }
            }
            Some(_) => {}
            None if matches!(c, '\'' | '"' | '`') => quote = Some(c),
            None if c == '@' => return true,
            None => {}
        }
    }
    false
}

/// MySQL settings that change no statement's meaning (what it reads,
/// writes or compares): a session setting them can still be estimated.
const MEANINGLESS_SETTINGS: &[&str] = &[
    "autocommit",
    "wait_timeout",
    "interactive_timeout",
    "net_read_timeout",
    "net_write_timeout",
    "innodb_lock_wait_timeout",
    "lock_wait_timeout",
    "max_statement_time",
    "max_execution_time",
    "character_set_results",
    "transaction_isolation",
    "tx_isolation",
    "session_track_schema",
    "session_track_state_change",
    "session_track_system_variables",
    "session_track_transaction_info",
];

/// MySQL functions whose value depends on the session calling them: a
/// plan in qgate's own session would estimate another statement.
const SESSION_FUNCTIONS: &[&str] = &[
    "lastval",
    "nextval",
    "setval",
    "last_insert_id",
    "found_rows",
    "row_count",
    "connection_id",
    "current_user",
    "current_role",
    "user",
    "session_user",
    "system_user",
    "database",
    "schema",
];

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

/// What decides a message: the policy and its cache, the planner's
/// estimates, each database's catalog. It reads the gate's record of the
/// session and says what to do ([`Ruling`]); it touches no kernel, request
/// board or socket (the gate carries the ruling out), so it is tested on
/// its own.
pub(super) struct Judge {
    pub policy: PolicyHandle,
    pub cache: DecisionCache,
    /// Answers `estimated_rows_above` (EXPLAIN over the configured connection).
    pub estimator: Box<dyn RowEstimator + Send + Sync>,
    /// Each database's user code (`None`: not read, `catalog.enabled = false`).
    pub catalogs: Option<Catalogs>,
    /// Whether statements are judged by the policy at all (`gate.mode`).
    pub enforcing: bool,
}

/// Where a message came from, as a request shows it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    /// `None` for a Unix-socket session.
    pub client: Option<std::net::SocketAddr>,
    /// The server's address the session reached (`None`: a Unix socket).
    pub server: Option<std::net::SocketAddr>,
    pub transport: Transport,
}

/// What to do with one message.
#[derive(Debug)]
pub(super) enum Ruling {
    /// Let it run. `rule`: the policy's rule, stored with the statement
    /// (`None` when no policy judged it: monitor mode, the agent's own
    /// session, a StartupMessage); `schema`: it may change the schema
    /// (`Some(creates_code)`, see [`may_create_code`]); `search_path`: it
    /// may change how the session resolves names.
    Allow {
        rule: Option<String>,
        schema: Option<bool>,
        search_path: bool,
    },
    /// Refuse it; `rule` as for `Allow`.
    Deny {
        reason: String,
        rule: Option<String>,
    },
    /// Open this request and wait for its final event.
    Hold {
        request: Box<NewRequest>,
        schema: Option<bool>,
    },
    /// Not decided yet: a planner's estimate is being asked (off the loop);
    /// judged again when it is in.
    Defer,
}

/// A ruling, with the audit records of what shadow rules would have done.
#[derive(Debug)]
pub(super) struct Judged {
    pub ruling: Ruling,
    pub shadow: Vec<serde_json::Value>,
    /// A MySQL text that sets a variable of the session (`SET timestamp`,
    /// `time_zone`, …), or is not understood, whatever its ruling: from
    /// then on the session's statements mean something qgate's planner
    /// session cannot reproduce (no row estimates).
    pub changes_session: bool,
    /// A MySQL text whose effect on the session qgate cannot read (a CALL,
    /// `EXECUTE`, `EXECUTE IMMEDIATE`, a function not on the known-safe
    /// list, text not understood), whatever its ruling: it may have set
    /// the session's `sql_mode` or character set where no word of the text
    /// says so (`PREPARE s FROM CONCAT('SET sql_', 'mode=…')`).
    pub hides_session_change: bool,
}

impl From<Ruling> for Judged {
    fn from(ruling: Ruling) -> Self {
        Judged {
            ruling,
            shadow: Vec::new(),
            changes_session: false,
            hides_session_change: false,
        }
    }
}

impl Judge {
    /// Rules on one message of the session `conn` describes.
    pub(super) fn rule(
        &mut self,
        conn: &ConnInfo,
        sql: &PendingSql<SqlInfo>,
        origin: Origin,
    ) -> Judged {
        let allow = || Ruling::Allow {
            rule: None,
            schema: None,
            search_path: false,
        };
        if conn.own {
            // The agent's own catalog session (let go of at its startup; a
            // statement already on its way is let through).
            return allow().into();
        }
        if sql.info.carrier == SqlCarrier::Startup {
            let refusal = if conn.refused {
                Some("the policy refuses this identity".to_string())
            } else if conn.dialect == Dialect::Mysql {
                // A MySQL login carries no settings to judge (its collation
                // is read into the session's lexing).
                None
            } else {
                self.judge_startup_settings(conn)
            };
            return match refusal {
                None => allow(),
                Some(reason) => Ruling::Deny { reason, rule: None },
            }
            .into();
        }
        if conn.refused {
            return Ruling::Deny {
                reason: "connection refused by policy".into(),
                rule: None,
            }
            .into();
        }
        if !self.enforcing {
            return allow().into();
        }
        let policy = self.policy.current();
        let server_port = origin.server.map(|a| a.port());
        let Some((classification, decision)) =
            self.classify_and_decide_now(conn, sql, &policy, server_port)
        else {
            return Ruling::Defer.into();
        };
        let shadow = decision
            .shadow
            .iter()
            .map(|hit| {
                serde_json::json!({
                    "rule": hit.rule,
                    "would": hit.would,
                    "decided": decision.action.name(),
                    "decided_by": decision.rule,
                    "statement": crate::classify::redact::redact(&sql.info.text),
                    "fingerprint": classification.fingerprint,
                    "user": conn.subject.user,
                    "database": conn.subject.database,
                    "client_addr": conn.subject.client_addr.map(|a| a.to_string()),
                })
            })
            .collect();
        // A MySQL text naming GLOBAL may change the server's `sql_mode` or
        // `init_connect` for every later session: its catalog is read again.
        let sets_globals = conn.dialect == Dialect::Mysql
            && crate::contains_ignoring_case(&sql.info.text, "global");
        let schema = (may_change_schema(&classification) || sets_globals)
            .then(|| may_create_code(&classification));
        let ruling = match decision.action {
            Action::Allow | Action::AuditOnly => Ruling::Allow {
                rule: Some(decision.rule),
                schema,
                search_path: classification
                    .statements
                    .iter()
                    .any(|s| s.has(Flag::SearchPathChange) || s.kind == Kind::Unknown),
            },
            Action::Deny { message } => Ruling::Deny {
                reason: format!("{message} (rule {})", decision.rule),
                rule: Some(decision.rule),
            },
            Action::Hold {
                approvals,
                reviewer_groups,
            } => {
                let client = origin
                    .client
                    .map_or_else(|| "local".to_string(), |a| a.to_string());
                let mut facts = redacted_facts(&classification);
                // Why the rule held it, for the reviewer (estimates included).
                facts["reasons"] = decision
                    .reasons
                    .iter()
                    .map(|r| crate::classify::redact::redact(r).into_owned())
                    .collect::<Vec<_>>()
                    .into();
                let request = NewRequest {
                    statement_id: None,
                    // What reviewers, the store and webhooks see:
                    // credentials redacted (`classify::redact`).
                    statement: crate::classify::redact::redact(&sql.info.text).into_owned(),
                    facts,
                    rule: decision.rule,
                    approvals_needed: approvals,
                    reviewer_groups,
                    identity: RequestIdentity {
                        db_user: conn.subject.user.clone(),
                        database: conn.subject.database.clone(),
                        application: conn.subject.application.clone(),
                        client_addr: Some(client),
                        transport: Some(origin.transport.as_str().to_owned()),
                        protocol: Some(
                            match conn.dialect {
                                Dialect::Mysql => crate::flow::Protocol::Mysql,
                                Dialect::Postgresql => crate::flow::Protocol::Postgresql,
                            }
                            .as_str()
                            .to_owned(),
                        ),
                        server: origin.server.map(|a| a.to_string()),
                    },
                    // The `connections` row: set by the store's writer
                    // with `statement_id` (see `store::Decided`).
                    connection_id: 0,
                    transaction_state: TransactionState::Unknown,
                    estimated_rows: None,
                    timeout: None,
                    hook: sql.info.hook.clone(),
                };
                Ruling::Hold {
                    request: Box::new(request),
                    schema,
                }
            }
        };
        // A procedure or function of the server's may set the session's
        // variables too (`time_zone` outlives the CALL); so may text qgate
        // does not understand (`EXECUTE s`).
        let hides = |s: &crate::classify::StatementFacts| {
            s.kind == Kind::Unknown
                || s.kind == Kind::Procedural
                || s.functions.iter().any(|f| {
                    !crate::classify::is_known_safe_function(f) && !policy.lists_safe_function(f)
                })
        };
        let mysql = conn.dialect == Dialect::Mysql;
        let hides_session_change = mysql && classification.statements.iter().any(hides);
        let changes_session = mysql
            && classification.statements.iter().any(|s| {
                let sets = s.verb.split(' ').next() == Some("SET") || !s.settings.is_empty();
                let harmless = s.verb.starts_with("SET TRANSACTION")
                    || (!s.settings.is_empty()
                        && s.settings
                            .iter()
                            .all(|name| MEANINGLESS_SETTINGS.contains(&name.as_str())));
                hides(s) || (sets && !harmless)
            });
        Judged {
            ruling,
            shadow,
            changes_session,
            hides_session_change,
        }
    }

    /// A StartupMessage's settings judged as the `SET`s they are (see
    /// [`super::startup`]): why the connection is refused, if a setting is
    /// one the policy would not let run at once. (Holding a connection for
    /// review is not offered: issue such a SET inside the session instead,
    /// where it is held like any statement.)
    fn judge_startup_settings(&mut self, conn: &ConnInfo) -> Option<String> {
        if !self.enforcing || conn.settings.is_empty() {
            return None;
        }
        let statements = match super::startup::settings_as_statements(&conn.settings) {
            Ok(statements) => statements,
            Err(why) => return Some(why),
        };
        let policy = self.policy.current();
        for sql in statements {
            let (_, decision) = self.cache.decide(
                &policy,
                &conn.subject,
                &sql,
                Dialect::Postgresql,
                self.estimator.as_ref(),
            );
            if !matches!(decision.action, Action::Allow | Action::AuditOnly) {
                return Some(format!(
                    "startup setting `{sql}` needs review (rule {}): set it inside the session",
                    decision.rule
                ));
            }
        }
        None
    }

    /// The statement's facts, with what the session and the database's
    /// catalog add, and the policy's decision on them; `None` while an
    /// estimate it needs is being asked.
    fn classify_and_decide_now(
        &mut self,
        conn: &ConnInfo,
        sql: &PendingSql<SqlInfo>,
        policy: &Arc<policy::Policy>,
        server_port: Option<u16>,
    ) -> Option<(Classification, policy::Decision)> {
        let text = sql.info.text.as_str();
        let unmodelled = match conn.dialect {
            Dialect::Mysql => {
                let server = self.mysql_server_lexing(server_port)?;
                conn.lexing.mysql_unmodelled(text, server.as_deref())
            }
            Dialect::Postgresql => conn.lexing.unmodelled(text),
        };
        if let Some(why) = unmodelled {
            let c = Classification::unknown(text, conn.dialect, why);
            let d = policy.decide(&conn.subject, &c, self.estimator.as_ref());
            return self.unless_estimating((c, d));
        }
        let database = database_of(&conn.subject);
        let view = match &self.catalogs {
            None => None,
            // No catalog of MariaDB's is read (stored functions are not on
            // the known-safe list, so the shipped policy holds them).
            Some(_) if conn.dialect == Dialect::Mysql => None,
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
            conn.dialect,
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
        if conn.dialect == Dialect::Mysql
            && (conn.database_pending
                || conn
                    .subject
                    .database
                    .as_deref()
                    .is_some_and(|d| d.eq_ignore_ascii_case("mysql")))
        {
            // The session's database is the grant tables' (or may be: a
            // USE on its way): an unqualified write there changes
            // privileges.
            let mut flagged = false;
            for statement in &mut classification.statements {
                if statement.kind == Kind::Write {
                    statement.kind = Kind::Dcl;
                    statement.flags.insert(Flag::PrivilegeChange);
                    flagged = true;
                }
            }
            if flagged {
                let decision =
                    policy.decide(&conn.subject, &classification, self.estimator.as_ref());
                return self.unless_estimating((classification, decision));
            }
        }
        let Some(view) = view else {
            let mut flagged = false;
            if conn.dialect == Dialect::Mysql {
                // What MariaDB's catalog says runs unseen: a view that may
                // call a stored function, a table's triggers.
                flagged |= self.mysql_user_code(conn, &mut classification, server_port)?;
            }
            if conn.dialect == Dialect::Mysql && policy.wants_row_shares() {
                // MariaDB's planner is asked (`catalog::mysql`); a write it
                // cannot estimate is held with the reason (the policy's
                // rules on shares fail closed on that).
                for statement in &mut classification.statements {
                    if statement.changes_existing_rows()
                        && !statement.has(Flag::AllRows)
                        && !statement.has(Flag::UserCode)
                    {
                        statement.share = Some(self.mysql_row_share(
                            conn,
                            text,
                            statement,
                            policy,
                            server_port,
                        )?);
                        flagged = true;
                    }
                }
            }
            if flagged {
                let decision =
                    policy.decide(&conn.subject, &classification, self.estimator.as_ref());
                return self.unless_estimating((classification, decision));
            }
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

    /// Marks the statements of a MySQL session that run code their text
    /// does not show, from the server's catalog (`catalog::mysql`): `true`
    /// if any was marked; `None` while the catalog is being read. A catalog
    /// that cannot be read marks every statement but transaction control
    /// (fails closed, as for PostgreSQL). Nothing without catalogs
    /// (`catalog.enabled = false`).
    fn mysql_user_code(
        &self,
        conn: &ConnInfo,
        classification: &mut Classification,
        server_port: Option<u16>,
    ) -> Option<bool> {
        let Some(catalogs) = &self.catalogs else {
            return Some(false);
        };
        let lookup = match server_port {
            Some(port) => catalogs.lookup_mysql(port),
            None => MysqlLookup::Unavailable("the session's server is not known".into()),
        };
        let catalog = match lookup {
            MysqlLookup::Pending => return None,
            MysqlLookup::Ready(catalog) => Ok(catalog),
            MysqlLookup::Unavailable(why) => Err(why),
        };
        let mut flagged = false;
        for statement in &mut classification.statements {
            let runs = match &catalog {
                Ok(catalog) => catalog.user_code(statement, conn.subject.database.as_deref()),
                Err(why) if statement.kind != Kind::Transaction => vec![why.clone()],
                Err(_) => Vec::new(),
            };
            if !runs.is_empty() {
                statement.flags.insert(Flag::UserCode);
                statement.code.runs.extend(runs);
                flagged = true;
            }
        }
        Some(flagged)
    }

    /// Why the MySQL server at `server_port` may split every session's text
    /// differently from qgate (its global `sql_mode`, its `init_connect`),
    /// from its catalog; a catalog that cannot be read counts as such a
    /// reason (fails closed). `None` while it is being read; `Some(None)`
    /// without catalogs (`catalog.enabled = false`).
    fn mysql_server_lexing(&self, server_port: Option<u16>) -> Option<Option<String>> {
        let Some(catalogs) = &self.catalogs else {
            return Some(None);
        };
        let Some(port) = server_port else {
            return Some(Some("the session's server is not known".into()));
        };
        match catalogs.lookup_mysql(port) {
            MysqlLookup::Pending => None,
            MysqlLookup::Ready(catalog) => Some(catalog.lexing.clone()),
            MysqlLookup::Unavailable(why) => Some(Some(format!(
                "the server's global settings could not be read ({why})"
            ))),
        }
    }

    /// MariaDB's estimate of how much of its table a write on a MySQL
    /// session changes; `None` while it is being asked.
    fn mysql_row_share(
        &self,
        conn: &ConnInfo,
        text: &str,
        statement: &crate::classify::StatementFacts,
        policy: &policy::Policy,
        server_port: Option<u16>,
    ) -> Option<RowShare> {
        let unavailable = |reason: String| Some(RowShare::Unavailable { reason });
        let Some(catalogs) = &self.catalogs else {
            return unavailable("MariaDB's planner is not asked (catalog.enabled = false)".into());
        };
        let Some(port) = server_port else {
            return unavailable("the session's server is not known".into());
        };
        if conn.database_pending {
            return unavailable("the session's database is changing (a USE on its way)".into());
        }
        if conn.session_changed {
            return unavailable(
                "the session set variables of its own (`SET time_zone`, `timestamp` …), \
                 which MariaDB's planner in qgate's session does not have"
                    .into(),
            );
        }
        // The planner is asked in a session of qgate's own, in the server's
        // defaults: what the client's session changed it cannot see.
        let (sql_mode, charset) = mysql_changes_lexing(text);
        if conn.lexing.sql_mode || conn.lexing.encoding.is_some() || sql_mode || charset {
            return unavailable(
                "the session may have changed its sql_mode or character set, which \
                 MariaDB's planner in qgate's session does not have"
                    .into(),
            );
        }
        if mentions_variable(&statement.sql) {
            return unavailable(
                "it reads variables (`@x`, `@@x`) of the session, which MariaDB's planner \
                 in qgate's session does not have"
                    .into(),
            );
        }
        if let Some(f) = statement
            .functions
            .iter()
            .find(|f| SESSION_FUNCTIONS.contains(&f.as_str()))
        {
            return unavailable(format!(
                "it calls `{f}`, whose value in qgate's session is not the client's"
            ));
        }
        // MariaDB evaluates constant expressions while it plans: a stored
        // function could run (and write) inside EXPLAIN.
        if let Some(f) = statement
            .functions
            .iter()
            .find(|f| !crate::classify::is_known_safe_function(f) && !policy.lists_safe_function(f))
        {
            return unavailable(format!(
                "it calls `{f}`, which qgate does not know: planning could run it"
            ));
        }
        let plan = crate::classify::classify(&statement.sql, Dialect::Mysql);
        if plan.statements.len() != 1 {
            return unavailable(format!(
                "{} statements in one text cannot be planned one by one",
                plan.statements.len()
            ));
        }
        if let Some(t) = statement
            .tables_read
            .iter()
            .find(|t| !statement.tables_written.contains(t))
        {
            // Planned as root: a constant subquery's value would be read
            // with privileges the client may not have, and decide the
            // estimate the client sees.
            return unavailable(format!(
                "it reads {} besides what it writes: qgate's planner session may read \
                 what the client cannot",
                t.parts.join(".")
            ));
        }
        let collation = conn
            .settings
            .iter()
            .find(|(k, _)| k == crate::wire::mysql::track::MYSQL_LOGIN_COLLATION)
            .and_then(|(_, v)| v.parse::<u8>().ok());
        match catalogs.estimate_mysql(
            port,
            conn.subject.database.as_deref(),
            collation,
            &statement.sql,
            &statement.tables_written,
        ) {
            Estimate::Pending => None,
            Estimate::Ready(ready) => Some(row_share(ready)),
        }
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
        if conn.session_changed {
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
            Estimate::Ready(ready) => Some(row_share(ready)),
        }
    }
}

/// A planner's answer as the statement's facts keep it.
fn row_share(answer: Result<crate::catalog::load::Share, String>) -> RowShare {
    match answer {
        Ok(share) => RowShare::Estimated {
            rows: share.rows,
            of: share.of,
            relation: share.relation,
        },
        Err(reason) => RowShare::Unavailable { reason },
    }
}

/// The classifier's facts as a request keeps them, each statement's text
/// with its credentials redacted (a parse error, which may quote them, is
/// withheld for such a statement).
fn redacted_facts(classification: &crate::classify::Classification) -> serde_json::Value {
    let mut facts = serde_json::to_value(classification).unwrap_or_default();
    if let Some(statements) = facts
        .get_mut("statements")
        .and_then(serde_json::Value::as_array_mut)
    {
        for statement in statements {
            let Some(sql) = statement.get("sql").and_then(serde_json::Value::as_str) else {
                continue;
            };
            if let std::borrow::Cow::Owned(redacted) = crate::classify::redact::redact(sql) {
                statement["sql"] = redacted.into();
                if statement.get("error").is_some_and(|e| !e.is_null()) {
                    statement["error"] = "withheld: the statement holds a credential".into();
                }
            }
        }
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_found_outside_strings_only() {
        assert!(mentions_variable("DELETE FROM t WHERE id > @x"));
        assert!(mentions_variable(
            "DELETE FROM t WHERE id > @@max_sp_recursion_depth"
        ));
        assert!(mentions_variable(
            "DELETE FROM t WHERE v = 'a\\'' OR id > @x"
        ));
        assert!(mentions_variable(
            "DELETE FROM t WHERE v = 'it''s' AND id > @x"
        ));
        assert!(!mentions_variable(
            "UPDATE u SET email = 'x@y.com' WHERE id = 5"
        ));
        assert!(!mentions_variable(
            "UPDATE u SET `a@b` = \"c@d\" WHERE id = 5"
        ));
        assert!(!mentions_variable("UPDATE u SET v = 'a\\'@' WHERE id = 5"));
    }

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
            sql_mode: false,
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
            sql_mode: false,
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

    /// A judge over `policy` with no catalog and no estimator.
    fn judge(policy: &str, enforcing: bool) -> Judge {
        Judge {
            policy: PolicyHandle::new(policy::Policy::from_toml(policy).unwrap()),
            cache: DecisionCache::default(),
            estimator: Box::new(policy::NoEstimator),
            catalogs: None,
            enforcing,
        }
    }

    fn session(user: &str) -> ConnInfo {
        ConnInfo {
            subject: Subject {
                user: Some(user.into()),
                database: Some("shop".into()),
                client_addr: Some("10.1.2.3".parse().unwrap()),
                application: Some("psql".into()),
            },
            ..ConnInfo::default()
        }
    }

    fn message(carrier: SqlCarrier, text: &str) -> PendingSql<SqlInfo> {
        PendingSql {
            start: 0,
            end: 0,
            text_start: 0,
            text_end: 0,
            info: SqlInfo {
                conn: Default::default(),
                carrier,
                text: text.into(),
                hook: None,
            },
            request: None,
            incomplete: false,
            tail: false,
        }
    }

    const ORIGIN: Origin = Origin {
        client: Some(std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 3)),
            50000,
        )),
        server: Some(std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::new(10, 1, 2, 4)),
            5432,
        )),
        transport: Transport::Tcp,
    };

    const POLICY: &str = r#"
[default]
action = "allow"

[[rules]]
name = "no-drops"
kinds = ["ddl"]
action = "hold"
approvals = 2

[[rules]]
name = "no-deletes"
verbs = ["DELETE"]
action = "deny"
message = "deletes are not allowed here"

[[rules]]
name = "watch-updates"
verbs = ["UPDATE"]
shadow = true
action = "hold"
"#;

    #[test]
    fn the_ruling_says_what_to_do_without_doing_it() {
        let mut j = judge(POLICY, true);
        let alice = session("alice");
        let query =
            |j: &mut Judge, text: &str| j.rule(&alice, &message(SqlCarrier::Query, text), ORIGIN);
        match query(&mut j, "SELECT 1").ruling {
            Ruling::Allow {
                rule,
                schema,
                search_path,
            } => {
                assert_eq!(rule.as_deref(), Some("default"));
                assert_eq!((schema, search_path), (None, false));
            }
            other => panic!("{other:?}"),
        }
        match query(&mut j, "DELETE FROM orders WHERE id = 1").ruling {
            Ruling::Deny { reason, rule } => {
                assert_eq!(rule.as_deref(), Some("no-deletes"));
                assert!(reason.contains("deletes are not allowed here"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        match query(&mut j, "DROP TABLE orders").ruling {
            Ruling::Hold { request, schema } => {
                assert_eq!(request.rule, "no-drops");
                assert_eq!(request.approvals_needed, 2);
                assert_eq!(request.statement, "DROP TABLE orders");
                assert_eq!(request.identity.db_user.as_deref(), Some("alice"));
                assert_eq!(request.identity.database.as_deref(), Some("shop"));
                assert_eq!(
                    request.identity.client_addr.as_deref(),
                    Some("10.1.2.3:50000")
                );
                assert_eq!(request.identity.transport.as_deref(), Some("tcp"));
                assert_eq!(schema, Some(false), "a table: the catalog is read again");
            }
            other => panic!("{other:?}"),
        }
        // A shadow rule changes nothing but is reported for the audit.
        let judged = query(&mut j, "UPDATE orders SET v = 1 WHERE id = 2");
        assert!(matches!(judged.ruling, Ruling::Allow { .. }), "{judged:?}");
        assert_eq!(judged.shadow.len(), 1, "{judged:?}");
        assert_eq!(judged.shadow[0]["rule"], "watch-updates");
        assert_eq!(judged.shadow[0]["would"], "hold");
    }

    #[test]
    fn credentials_never_reach_a_request_and_code_creation_is_marked() {
        let mut j = judge(crate::policy::DEFAULT_POLICY, true);
        let judged = j.rule(
            &session("alice"),
            &message(
                SqlCarrier::Query,
                "ALTER ROLE bob PASSWORD 'hunter2-secret'",
            ),
            Origin {
                client: None,
                server: None,
                transport: Transport::Unix,
            },
        );
        let Ruling::Hold { request, .. } = judged.ruling else {
            panic!("{judged:?}");
        };
        let shown = serde_json::to_string(&(&request.statement, &request.facts)).unwrap();
        assert!(!shown.contains("hunter2-secret"), "{shown}");
        assert_eq!(request.identity.client_addr.as_deref(), Some("local"));
        assert_eq!(request.identity.transport.as_deref(), Some("unix"));
        let judged = j.rule(
            &session("alice"),
            &message(
                SqlCarrier::Query,
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            ),
            ORIGIN,
        );
        assert!(
            matches!(
                judged.ruling,
                Ruling::Hold {
                    schema: Some(true),
                    ..
                }
            ),
            "{judged:?}"
        );
    }

    #[test]
    fn refused_identities_startup_settings_monitor_mode_and_the_agents_own_session() {
        let mut j = judge(
            r#"
[default]
action = "allow"

[[rules]]
name = "safety"
flags = ["disables_safety"]
action = "hold"
"#,
            true,
        );
        let refused = ConnInfo {
            refused: true,
            ..session("mallory")
        };
        for carrier in [SqlCarrier::Startup, SqlCarrier::Query] {
            let judged = j.rule(&refused, &message(carrier, "SELECT 1"), ORIGIN);
            assert!(
                matches!(&judged.ruling, Ruling::Deny { rule: None, .. }),
                "{carrier:?}: {judged:?}"
            );
        }
        // A StartupMessage setting is judged as the SET it is.
        let mut settings = session("alice");
        settings.settings = vec![("session_replication_role".into(), "replica".into())];
        let judged = j.rule(&settings, &message(SqlCarrier::Startup, ""), ORIGIN);
        match &judged.ruling {
            Ruling::Deny { reason, rule: None } => {
                assert!(reason.contains("session_replication_role"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        settings.settings = vec![("application_name".into(), "x".into())];
        let judged = j.rule(&settings, &message(SqlCarrier::Startup, ""), ORIGIN);
        assert!(
            matches!(judged.ruling, Ruling::Allow { rule: None, .. }),
            "{judged:?}"
        );
        // The agent's own catalog session, and monitor mode: nothing judged.
        let own = ConnInfo {
            own: true,
            ..session("qgate")
        };
        let drop = message(SqlCarrier::Query, "DROP TABLE t");
        assert!(matches!(
            j.rule(&own, &drop, ORIGIN).ruling,
            Ruling::Allow { rule: None, .. }
        ));
        let mut monitor = judge(POLICY, false);
        assert!(matches!(
            monitor.rule(&session("alice"), &drop, ORIGIN).ruling,
            Ruling::Allow { rule: None, .. }
        ));
    }

    #[test]
    fn text_the_session_reads_differently_or_not_seen_whole_is_not_understood() {
        let mut j = judge(crate::policy::DEFAULT_POLICY, true);
        let sjis = ConnInfo {
            lexing: Lexing {
                encoding: Some("SJIS".into()),
                backslashes: false,
                sql_mode: false,
            },
            ..session("alice")
        };
        let judged = j.rule(
            &sjis,
            &message(SqlCarrier::Query, "SELECT '\u{8868}\\'; DROP TABLE t; --'"),
            ORIGIN,
        );
        assert!(
            matches!(&judged.ruling, Ruling::Hold { request, .. } if request.rule == "not-understood"),
            "{judged:?}"
        );
        let mut partial = message(SqlCarrier::Query, "SELECT 1 FROM t WHERE x = '");
        partial.incomplete = true;
        let judged = j.rule(&session("alice"), &partial, ORIGIN);
        match &judged.ruling {
            Ruling::Hold { request, .. } => {
                assert_eq!(request.rule, "not-understood");
                assert!(
                    request.statement.starts_with("SELECT 1 FROM t"),
                    "{request:?}"
                );
            }
            other => panic!("{other:?}"),
        }
        // A plain read from the same session runs.
        let judged = j.rule(
            &session("alice"),
            &message(SqlCarrier::Query, "SELECT 1"),
            ORIGIN,
        );
        assert!(matches!(judged.ruling, Ruling::Allow { .. }), "{judged:?}");
    }
}
