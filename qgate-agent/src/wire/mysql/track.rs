//! A MySQL connection inside the [`Tracker`](crate::wire::Tracker): its two
//! framers and its conversation, and what their events mean as
//! [`WireEvent`]s (the same ones a PostgreSQL connection reports, so the
//! store, the API and the audit need nothing new).
//!
//! A statement is reported when it runs: a `COM_QUERY`, or a
//! `COM_STMT_EXECUTE` with the text its `COM_STMT_PREPARE` carried (the
//! prepare itself runs nothing, as a PostgreSQL Parse). The results of a
//! multi-statement query are folded into one completion (rows summed, the
//! first error wins).
use std::collections::VecDeque;

use super::{
    conversation::{Carrier, ClientPacket, Outcome as MysqlOutcome},
    Conversation, Framer, MysqlEvent,
};

/// One client packet of a watched connection, for the gate: where it is
/// in the stream (header included), where its text is when it carries
/// SQL, and what it is.
#[derive(Debug)]
pub(crate) struct LoggedPacket {
    pub offset: u64,
    pub wire_len: u64,
    /// Stream offset of the text (`ClientPacket::Sql`) or of the command
    /// byte (`ClientPacket::Command`); `None` for a packet split in
    /// several physical ones (its text is not contiguous on the wire).
    pub text_offset: Option<u64>,
    pub packet: ClientPacket,
}
use crate::{
    clock::UnixNanos,
    wire::{
        tcp::Delivery, Completion, ConnId, Identity, Outcome, ProtocolPath, StmtSeq, WireEvent,
    },
};

/// The setting a MySQL login's `Identity` carries: the collation id it
/// asked for (`super::packet::collation_splits_like_ascii`).
pub const MYSQL_LOGIN_COLLATION: &str = "mysql_login_collation";

/// The setting a MySQL login's `Identity` carries for the server's default
/// collation (its greeting's): the session's if the server does not know
/// the login's.
pub const MYSQL_SERVER_COLLATION: &str = "mysql_server_collation";

/// The `ServerReport::Parameter` a MySQL server's status reports its
/// `NO_BACKSLASH_ESCAPES` with ("on"/"off").
pub const MYSQL_NO_BACKSLASH_ESCAPES: &str = "mysql_no_backslash_escapes";

/// One MySQL connection's decoding state.
#[derive(Debug)]
pub(crate) struct MysqlStreams {
    client: Framer,
    server: Framer,
    conversation: Conversation,
    /// Answers due, in order: the statement each belongs to (`None`: a
    /// prepare or an unknown execute, whose answer is not reported).
    due: VecDeque<Option<Due>>,
    next_stmt: u64,
    /// TLS was asked for.
    pub(crate) encrypted: bool,
    /// Who the session is now: the login, then each accepted
    /// `COM_CHANGE_USER`, `COM_INIT_DB` or `USE` (each reported again as
    /// `Identified`, so the statements after it are stored under it).
    identity: Option<Identity>,
    /// A `COM_CHANGE_USER` asked for, until the server answers it.
    changing_user: Option<(String, Option<String>)>,
}

/// A reported statement waiting for its completion, results folded so far.
#[derive(Debug)]
struct Due {
    stmt: StmtSeq,
    rows: u64,
    error: Option<(u16, Option<String>, String)>,
    /// The statement is a `USE`: the database it names once it succeeds
    /// (`Some(None)`: a `USE` whose name qgate could not read).
    use_database: Option<Option<String>>,
}

/// The database a `USE` statement switches to: `None` when `text` is not a
/// `USE`, `Some(None)` when it is one qgate cannot read the name of (the
/// session's database is then unknown, never guessed). MariaDB runs the
/// inside of `/*! … */` comments: a `USE` hidden there counts as unread.
pub(crate) fn use_database(text: &str) -> Option<Option<String>> {
    use sqlparser::{
        ast::{ObjectNamePart, Statement, Use},
        dialect::MySqlDialect,
        keywords::Keyword,
        parser::Parser,
        tokenizer::{Token, Tokenizer},
    };
    let dialect = MySqlDialect {};
    let hidden_use = use_in_executable_comment(text);
    let Ok(statements) = Parser::parse_sql(&dialect, text) else {
        // Unparsed: is any statement of it a USE?
        let starts_with_use = Tokenizer::new(&dialect, text)
            .tokenize()
            .map_or(true, |tokens| {
                let mut at_start = true;
                tokens.iter().any(|token| match token {
                    Token::Whitespace(_) => false,
                    Token::SemiColon => {
                        at_start = true;
                        false
                    }
                    Token::Word(w) => {
                        std::mem::replace(&mut at_start, false) && w.keyword == Keyword::USE
                    }
                    _ => {
                        at_start = false;
                        false
                    }
                })
            });
        return (starts_with_use || hidden_use).then_some(None);
    };
    let mut found = None;
    for statement in statements {
        if let Statement::Use(used) = statement {
            found = Some(match used {
                Use::Object(name) | Use::Database(name) | Use::Schema(name) => {
                    match name.0.as_slice() {
                        [ObjectNamePart::Identifier(ident)] => Some(ident.value.clone()),
                        _ => None,
                    }
                }
                _ => None,
            });
        }
    }
    if hidden_use {
        // Whether the server runs it depends on its version (`/*!NNNNN`),
        // which qgate does not model: whatever a plain USE beside it said,
        // the database is unknown.
        return Some(None);
    }
    found
}

/// Whether an executable comment (`/*! … */`, `/*M! … */`, which MariaDB
/// runs when its version is at least the one written after the `!`) holds
/// the word `USE`. Other executable comments (mysqldump's
/// `/*!40001 SQL_NO_CACHE */`) and a table named `users` are not one. A
/// comment opener inside a string literal counts too: the database is then
/// unknown, never guessed.
fn use_in_executable_comment(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    let mut rest = lower.as_str();
    while let Some(at) = rest.find("/*") {
        let after = &rest[at + 2..];
        let end = after.find("*/").unwrap_or(after.len());
        let body = &after[..end];
        if (body.starts_with('!') || body.starts_with("m!"))
            && body
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
                .any(|word| word == "use")
        {
            return true;
        }
        rest = &after[end..];
    }
    false
}

impl MysqlStreams {
    pub(crate) fn new(mid_stream: bool) -> Self {
        MysqlStreams {
            client: Framer::client(),
            server: Framer::server(),
            conversation: if mid_stream {
                Conversation::mid_stream()
            } else {
                Conversation::new()
            },
            due: VecDeque::new(),
            next_stmt: 0,
            encrypted: false,
            identity: None,
            changing_user: None,
        }
    }

    /// See `Conversation::at_command_boundary`.
    pub(crate) fn at_command_boundary(&self) -> bool {
        self.conversation.at_command_boundary()
    }

    /// The conversation is over other than by TLS: nothing more is read.
    pub(crate) fn unread(&self) -> bool {
        self.conversation.is_done() && !self.encrypted
    }

    /// No reported statement waits for its answer.
    pub(crate) fn is_idle(&self) -> bool {
        self.due.iter().all(Option::is_none)
    }

    /// Bytes (or a gap) of one direction, in stream order.
    pub(crate) fn feed(
        &mut self,
        from_client: bool,
        conn: ConnId,
        delivery: Delivery<'_>,
        at: UnixNanos,
        mut log: Option<&mut Vec<LoggedPacket>>,
        out: &mut Vec<WireEvent>,
    ) {
        if self.conversation.is_done() {
            return;
        }
        let framer = if from_client {
            &mut self.client
        } else {
            &mut self.server
        };
        let mut frames = Vec::new();
        match delivery {
            Delivery::Data { offset, bytes } => framer.push(offset, bytes, &mut |f| frames.push(f)),
            Delivery::Gap { .. } => {
                framer.gap();
                out.push(WireEvent::CaptureGap { conn, at });
                self.fail_pending(
                    conn,
                    "the capture lost part of the connection: outcome unknown",
                    at,
                    out,
                );
                return;
            }
        }
        let mut events = Vec::new();
        for frame in frames {
            match frame {
                Ok(f) if from_client => {
                    let packet = self.conversation.client(&f, &mut events);
                    if let Some(log) = log.as_deref_mut() {
                        let single = f.wire_len == f.len as u64 + 4;
                        let text_offset = match &packet {
                            ClientPacket::Sql { text_at, .. } => {
                                single.then_some(f.offset + 4 + *text_at as u64)
                            }
                            ClientPacket::Command { .. } => Some(f.offset + 4),
                            ClientPacket::Login { .. } => single.then_some(f.offset + 4),
                            _ => None,
                        };
                        log.push(LoggedPacket {
                            offset: f.offset,
                            wire_len: f.wire_len,
                            text_offset,
                            packet,
                        });
                    }
                }
                Ok(f) => self.conversation.server(&f, &mut events),
                Err(error) => events.push(MysqlEvent::Undecodable {
                    side: if from_client { "client" } else { "server" },
                    error,
                }),
            }
        }
        for event in events {
            self.report(conn, event, at, out);
        }
    }

    fn report(&mut self, conn: ConnId, event: MysqlEvent, at: UnixNanos, out: &mut Vec<WireEvent>) {
        match event {
            MysqlEvent::Login {
                user,
                database,
                program,
                collation,
                server_collation,
            } => self.identify(
                conn,
                Identity {
                    user: Some(user),
                    database,
                    application: program,
                    // Not a SET: the gate reads how the session splits
                    // text from it (`MYSQL_LOGIN_COLLATION`).
                    settings: std::iter::once((
                        MYSQL_LOGIN_COLLATION.into(),
                        collation.to_string(),
                    ))
                    .chain(server_collation.map(|c| (MYSQL_SERVER_COLLATION.into(), c.to_string())))
                    .collect(),
                },
                at,
                out,
            ),
            MysqlEvent::ChangeUser { user, database } => {
                self.changing_user = Some((user, database));
            }
            MysqlEvent::LoggedIn => {
                if let Some((user, database)) = self.changing_user.take() {
                    let application = self.identity.as_ref().and_then(|i| i.application.clone());
                    self.identify(
                        conn,
                        Identity {
                            user: Some(user),
                            database,
                            application,
                            // Its character set is not read: the session's
                            // text is not modelled from now on.
                            settings: vec![(
                                MYSQL_LOGIN_COLLATION.into(),
                                "set by COM_CHANGE_USER".into(),
                            )],
                        },
                        at,
                        out,
                    );
                }
            }
            MysqlEvent::LoginFailed { .. } => self.changing_user = None,
            MysqlEvent::Database { name } => self.use_database(conn, Some(name), at, out),
            MysqlEvent::Encrypted => {
                self.encrypted = true;
                out.push(WireEvent::Encrypted { conn, at });
            }
            MysqlEvent::Statement {
                carrier: Carrier::Prepare,
                ..
            } => self.due.push_back(None),
            MysqlEvent::Statement {
                carrier,
                text: Some(text),
                statement_id,
            } => {
                self.next_stmt += 1;
                let stmt = StmtSeq(self.next_stmt);
                let use_database = use_database(&text);
                out.push(WireEvent::StatementReceived {
                    conn,
                    stmt,
                    text,
                    path: match carrier {
                        Carrier::Query => ProtocolPath::Simple,
                        _ => ProtocolPath::Extended,
                    },
                    statement_name: statement_id.map(|id| id.to_string()),
                    at,
                });
                self.due.push_back(Some(Due {
                    stmt,
                    rows: 0,
                    error: None,
                    use_database,
                }));
            }
            MysqlEvent::Statement { statement_id, .. } => {
                // An execute of a statement prepared before qgate saw it:
                // unknown text, reported as such (never as an allowed one).
                out.push(WireEvent::Undecodable {
                    conn,
                    reason: format!(
                        "COM_STMT_EXECUTE of statement {} prepared before the capture: its text is unknown",
                        statement_id.map_or("?".to_owned(), |id| id.to_string())
                    ),
                    at,
                });
                self.due.push_back(None);
            }
            MysqlEvent::Completed { outcome, more } => {
                let Some(front) = self.due.front_mut() else {
                    return;
                };
                if let Some(due) = front {
                    match outcome {
                        MysqlOutcome::Ok {
                            affected_rows,
                            rows,
                        } => due.rows += affected_rows + rows,
                        MysqlOutcome::Error {
                            code,
                            sqlstate,
                            message,
                        } => {
                            due.error.get_or_insert((code, sqlstate, message));
                        }
                    }
                }
                if !more {
                    if let Some(Some(mut due)) = self.due.pop_front() {
                        let switched = due.use_database.take().filter(|_| due.error.is_none());
                        out.push(WireEvent::StatementCompleted {
                            conn,
                            stmt: due.stmt,
                            completion: completion(due),
                            at,
                        });
                        if let Some(database) = switched {
                            self.use_database(conn, database, at, out);
                        }
                    }
                }
            }
            MysqlEvent::Undecodable { side, error } => out.push(WireEvent::Undecodable {
                conn,
                reason: format!("{side} stream: not MySQL from here on: {error}"),
                at,
            }),
            // The greeting and the end say nothing the store keeps.
            MysqlEvent::Greeting { .. } | MysqlEvent::Quit => {}
            MysqlEvent::NoBackslashEscapes(on) => out.push(WireEvent::ServerReport {
                conn,
                report: crate::wire::ServerReport::Parameter {
                    name: MYSQL_NO_BACKSLASH_ESCAPES.into(),
                    value: if on { "on" } else { "off" }.into(),
                },
            }),
        }
    }

    /// The session is now `identity`.
    fn identify(
        &mut self,
        conn: ConnId,
        identity: Identity,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        self.identity = Some(identity.clone());
        out.push(WireEvent::Identified { conn, identity, at });
    }

    /// The session's database is now `database` (`None`: unknown).
    fn use_database(
        &mut self,
        conn: ConnId,
        database: Option<String>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        let Some(mut identity) = self.identity.clone() else {
            return;
        };
        identity.database = database;
        self.identify(conn, identity, at, out);
    }

    /// Statements still waiting end with an unknown outcome.
    pub(crate) fn fail_pending(
        &mut self,
        conn: ConnId,
        why: &str,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        for due in self.due.drain(..).flatten() {
            out.push(WireEvent::StatementCompleted {
                conn,
                stmt: due.stmt,
                completion: Completion {
                    outcome: Outcome::Error,
                    tag: None,
                    rows: None,
                    sqlstate: None,
                    message: Some(why.to_owned()),
                },
                at,
            });
        }
    }
}

fn completion(due: Due) -> Completion {
    match due.error {
        None => Completion {
            outcome: Outcome::Ok,
            tag: None,
            rows: Some(due.rows),
            sqlstate: None,
            message: None,
        },
        Some((code, sqlstate, message)) => Completion {
            outcome: Outcome::Error,
            tag: Some(format!("ERROR {code}")),
            rows: None,
            sqlstate,
            message: Some(message),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::use_database;

    #[test]
    fn a_use_is_read_and_one_in_an_executable_comment_makes_the_database_unknown() {
        assert_eq!(use_database("  use `third`"), Some(Some("third".into())));
        assert_eq!(use_database("SELECT 1"), None);
        // mysqldump's hints and a table named `users` are not a USE.
        assert_eq!(
            use_database("SELECT /*!40001 SQL_NO_CACHE */ * FROM users"),
            None
        );
        assert_eq!(use_database("SELECT * FROM users /* use me */"), None);
        // Run or not by the server's version: unknown, never guessed.
        assert_eq!(use_database("/*!99999 USE other */"), Some(None));
        assert_eq!(use_database("/*M!100100 USE sixth */"), Some(None));
        assert_eq!(use_database("USE a; /*!50000 USE b */"), Some(None));
        assert_eq!(use_database("SELECT 1; /*!40101 USE fourth */"), Some(None));
    }
}
