//! Pairing one connection's requests with the server's answers.
//!
//! The server answers in request order (§55.2.2 "Simple Query", §55.2.3
//! "Extended Query", §55.2.4 "Pipelining"), so a queue of what is still
//! unanswered is enough: a Query completes at its ReadyForQuery, an Execute
//! at its CommandComplete / EmptyQueryResponse / PortalSuspended /
//! ErrorResponse, and every Sync (or FunctionCall) is a point where one
//! ReadyForQuery comes back. After an error in extended mode the server
//! discards messages up to the next Sync; the Executes it discards complete
//! as errors here, so a statement count matches what the client sent.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
};

use super::{
    pg::{command_rows, BackendMessage, ErrorFields, FrontendMessage, Target, TransactionStatus},
    Completion, ConnId, Identity, Outcome, ProtocolPath, ServerReport, StmtSeq, WireEvent,
};
use crate::clock::UnixNanos;

/// Prepared statements and portals kept per connection; beyond this an
/// arbitrary old one is forgotten (the server-side limit is memory only).
const MAX_NAMED: usize = 4096;

const SKIPPED: &str = "not executed: the server skipped it after an earlier error before Sync";

/// A message's place in its stream (the session keeps the client → server ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MessageSpan {
    pub offset: u64,
    pub len: u64,
}

#[derive(Clone, Debug)]
struct Prepared {
    text: Arc<str>,
    parse: MessageSpan,
}

#[derive(Clone, Debug)]
struct Portal {
    statement: Arc<str>,
    prepared: Option<Prepared>,
}

#[derive(Debug)]
enum Pending {
    Query {
        stmt: StmtSeq,
        span: MessageSpan,
        tag: Option<String>,
        error: Option<(Option<String>, Option<String>)>,
    },
    Execute {
        /// `None`: the statement's Parse was not seen, nothing was reported.
        stmt: Option<StmtSeq>,
        span: MessageSpan,
        parse: Option<MessageSpan>,
    },
    /// Sync or FunctionCall: one ReadyForQuery answers it.
    SyncPoint,
}

/// Where a statement still waiting for its answer sits in the client stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PendingSpans {
    /// The Query or Execute message.
    pub message: MessageSpan,
    /// The message carrying the text: the Query itself, or the Parse.
    pub text: Option<MessageSpan>,
}

#[derive(Debug, Default)]
pub(crate) struct Session {
    next_stmt: u64,
    queue: VecDeque<Pending>,
    prepared: HashMap<Box<[u8]>, Prepared>,
    portals: HashMap<Box<[u8]>, Portal>,
    /// The server is discarding messages until the client's next Sync.
    discarding: bool,
    /// The last client message belonged to the extended protocol.
    extended: bool,
    pub awaiting_encryption_answer: bool,
    /// Terminate or FIN seen: close once nothing is pending.
    pub closing: bool,
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn error_completion(fields: &ErrorFields<'_>) -> (Option<String>, Option<String>) {
    (fields.sqlstate().map(lossy), fields.message().map(lossy))
}

fn failed(sqlstate: Option<String>, message: Option<String>) -> Completion {
    Completion {
        outcome: Outcome::Error,
        tag: None,
        rows: None,
        sqlstate,
        message,
    }
}

fn succeeded(tag: Option<String>) -> Completion {
    let rows = tag.as_deref().and_then(|t| command_rows(t.as_bytes()));
    Completion {
        outcome: Outcome::Ok,
        tag,
        rows,
        sqlstate: None,
        message: None,
    }
}

fn insert_bounded<V>(map: &mut HashMap<Box<[u8]>, V>, key: &[u8], value: V) {
    if map.len() >= MAX_NAMED && !map.contains_key(key) {
        if let Some(old) = map.keys().next().cloned() {
            map.remove(&old);
        }
    }
    map.insert(key.into(), value);
}

impl Session {
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn pending_spans(&self, stmt: StmtSeq) -> Option<PendingSpans> {
        self.queue.iter().find_map(|p| match p {
            Pending::Query { stmt: s, span, .. } if *s == stmt => Some(PendingSpans {
                message: *span,
                text: Some(*span),
            }),
            Pending::Execute {
                stmt: Some(s),
                span,
                parse,
            } if *s == stmt => Some(PendingSpans {
                message: *span,
                text: *parse,
            }),
            _ => None,
        })
    }

    fn next_stmt(&mut self) -> StmtSeq {
        self.next_stmt += 1;
        StmtSeq(self.next_stmt)
    }

    /// A request the server will discard: reported and completed at once.
    fn received_and_skipped(
        &mut self,
        conn: ConnId,
        text: String,
        path: ProtocolPath,
        statement_name: Option<String>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        let stmt = self.next_stmt();
        out.push(WireEvent::StatementReceived {
            conn,
            stmt,
            text,
            path,
            statement_name,
            at,
        });
        out.push(WireEvent::StatementCompleted {
            conn,
            stmt,
            completion: failed(None, Some(SKIPPED.to_owned())),
            at,
        });
    }

    pub fn on_frontend(
        &mut self,
        conn: ConnId,
        span: MessageSpan,
        message: &FrontendMessage<'_>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        match *message {
            FrontendMessage::Startup(startup) => out.push(WireEvent::Identified {
                conn,
                identity: Identity {
                    user: startup.param("user").map(lossy),
                    database: startup.param("database").map(lossy),
                    application: startup.param("application_name").map(lossy),
                    settings: startup
                        .params()
                        .filter(|(name, _)| {
                            !matches!(*name, b"user" | b"database" | b"application_name")
                        })
                        .map(|(name, value)| (lossy(name), lossy(value)))
                        .collect(),
                },
                at,
            }),
            FrontendMessage::SslRequest | FrontendMessage::GssEncRequest => {
                self.awaiting_encryption_answer = true;
            }
            FrontendMessage::CancelRequest {
                backend_pid,
                secret_key,
            } => {
                out.push(WireEvent::CancelRequested {
                    conn,
                    backend_pid,
                    secret_key: secret_key.to_vec(),
                    at,
                });
            }
            FrontendMessage::Query { text } => {
                self.extended = false;
                if self.discarding {
                    self.received_and_skipped(
                        conn,
                        lossy(text),
                        ProtocolPath::Simple,
                        None,
                        at,
                        out,
                    );
                    return;
                }
                let stmt = self.next_stmt();
                out.push(WireEvent::StatementReceived {
                    conn,
                    stmt,
                    text: lossy(text),
                    path: ProtocolPath::Simple,
                    statement_name: None,
                    at,
                });
                self.queue.push_back(Pending::Query {
                    stmt,
                    span,
                    tag: None,
                    error: None,
                });
            }
            FrontendMessage::Parse {
                statement, text, ..
            } => {
                self.extended = true;
                let prepared = Prepared {
                    text: String::from_utf8_lossy(text).into(),
                    parse: span,
                };
                insert_bounded(&mut self.prepared, statement, prepared);
            }
            FrontendMessage::Bind { portal, statement } => {
                self.extended = true;
                let bound = Portal {
                    statement: String::from_utf8_lossy(statement).into(),
                    prepared: self.prepared.get(statement).cloned(),
                };
                insert_bounded(&mut self.portals, portal, bound);
            }
            FrontendMessage::Execute { portal, .. } => {
                self.extended = true;
                self.on_execute(conn, span, portal, at, out);
            }
            FrontendMessage::Describe { .. } | FrontendMessage::Flush => self.extended = true,
            FrontendMessage::Close { target, name } => {
                self.extended = true;
                match target {
                    Target::Statement => {
                        self.prepared.remove(name);
                    }
                    Target::Portal => {
                        self.portals.remove(name);
                    }
                }
            }
            FrontendMessage::Sync => {
                self.extended = false;
                self.discarding = false;
                self.queue.push_back(Pending::SyncPoint);
            }
            FrontendMessage::FunctionCall { .. } => {
                self.extended = false;
                if !self.discarding {
                    self.queue.push_back(Pending::SyncPoint);
                }
            }
            FrontendMessage::Terminate => self.closing = true,
            FrontendMessage::Tls
            | FrontendMessage::CopyData { .. }
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail { .. }
            | FrontendMessage::AuthenticationResponse { .. } => {}
        }
    }

    fn on_execute(
        &mut self,
        conn: ConnId,
        span: MessageSpan,
        portal: &[u8],
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        let bound = self.portals.get(portal);
        let Some((statement, Some(prepared))) =
            bound.map(|p| (p.statement.clone(), p.prepared.clone()))
        else {
            let what = match bound {
                Some(p) => format!("prepared statement {:?}", &*p.statement),
                None => format!("portal {:?}", String::from_utf8_lossy(portal)),
            };
            out.push(WireEvent::Undecodable {
                conn,
                reason: format!(
                    "Execute at client stream offset {} runs {what} whose Parse was not seen \
                     (connection picked up mid-stream?): its text is unknown",
                    span.offset
                ),
                at,
            });
            if !self.discarding {
                self.queue.push_back(Pending::Execute {
                    stmt: None,
                    span,
                    parse: None,
                });
            }
            return;
        };
        let text = prepared.text.to_string();
        let name = Some(statement.to_string());
        if self.discarding {
            self.received_and_skipped(conn, text, ProtocolPath::Extended, name, at, out);
            return;
        }
        let stmt = self.next_stmt();
        out.push(WireEvent::StatementReceived {
            conn,
            stmt,
            text,
            path: ProtocolPath::Extended,
            statement_name: name,
            at,
        });
        self.queue.push_back(Pending::Execute {
            stmt: Some(stmt),
            span,
            parse: Some(prepared.parse),
        });
    }

    fn complete(
        conn: ConnId,
        stmt: Option<StmtSeq>,
        completion: Completion,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        if let Some(stmt) = stmt {
            out.push(WireEvent::StatementCompleted {
                conn,
                stmt,
                completion,
                at,
            });
        }
    }

    pub fn on_backend(
        &mut self,
        conn: ConnId,
        message: &BackendMessage<'_>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        match *message {
            BackendMessage::CommandComplete { tag } => match self.queue.front_mut() {
                Some(Pending::Query { tag: last, .. }) => *last = Some(lossy(tag)),
                Some(Pending::Execute { stmt, .. }) => {
                    let stmt = *stmt;
                    self.queue.pop_front();
                    Self::complete(conn, stmt, succeeded(Some(lossy(tag))), at, out);
                }
                Some(Pending::SyncPoint) | None => {}
            },
            BackendMessage::EmptyQueryResponse | BackendMessage::PortalSuspended => {
                if let Some(Pending::Execute { stmt, .. }) = self.queue.front() {
                    let stmt = *stmt;
                    self.queue.pop_front();
                    Self::complete(conn, stmt, succeeded(None), at, out);
                }
            }
            BackendMessage::ErrorResponse(fields) => self.on_error(conn, &fields, at, out),
            BackendMessage::ReadyForQuery { status } => {
                out.push(WireEvent::ServerReport {
                    conn,
                    report: ServerReport::Ready {
                        idle: status == TransactionStatus::Idle,
                    },
                });
                self.on_ready(conn, at, out)
            }
            BackendMessage::ParameterStatus { name, value }
                if matches!(name, b"client_encoding" | b"standard_conforming_strings") =>
            {
                out.push(WireEvent::ServerReport {
                    conn,
                    report: ServerReport::Parameter {
                        name: lossy(name),
                        value: lossy(value),
                    },
                });
            }
            _ => {}
        }
    }

    fn on_error(
        &mut self,
        conn: ConnId,
        fields: &ErrorFields<'_>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        match self.queue.front_mut() {
            Some(Pending::Query { error, .. }) => {
                error.get_or_insert_with(|| error_completion(fields));
            }
            Some(Pending::Execute { stmt, .. }) => {
                let stmt = *stmt;
                self.queue.pop_front();
                let (sqlstate, message) = error_completion(fields);
                Self::complete(conn, stmt, failed(sqlstate, message), at, out);
                self.skip_until_sync(conn, at, out);
            }
            Some(Pending::SyncPoint) => {}
            None => self.discarding = self.extended,
        }
    }

    /// The server skips the rest up to the next Sync (§55.2.3).
    fn skip_until_sync(&mut self, conn: ConnId, at: UnixNanos, out: &mut Vec<WireEvent>) {
        while let Some(Pending::Execute { stmt, .. }) = self.queue.front() {
            let stmt = *stmt;
            self.queue.pop_front();
            Self::complete(conn, stmt, failed(None, Some(SKIPPED.to_owned())), at, out);
        }
        if self.queue.is_empty() {
            self.discarding = true;
        }
    }

    fn on_ready(&mut self, conn: ConnId, at: UnixNanos, out: &mut Vec<WireEvent>) {
        let answers_something = self
            .queue
            .iter()
            .any(|p| matches!(p, Pending::Query { .. } | Pending::SyncPoint));
        if !answers_something {
            return;
        }
        while let Some(pending) = self.queue.pop_front() {
            match pending {
                Pending::Execute { stmt, .. } => {
                    let message = "no answer before ReadyForQuery".to_owned();
                    Self::complete(conn, stmt, failed(None, Some(message)), at, out);
                }
                Pending::Query {
                    stmt, tag, error, ..
                } => {
                    let completion = match error {
                        Some((sqlstate, message)) => Completion {
                            rows: tag.as_deref().and_then(|t| command_rows(t.as_bytes())),
                            tag,
                            ..failed(sqlstate, message)
                        },
                        None => succeeded(tag),
                    };
                    Self::complete(conn, Some(stmt), completion, at, out);
                    return;
                }
                Pending::SyncPoint => return,
            }
        }
    }

    /// Every pending statement ends with an error saying why its answer will
    /// never be seen.
    pub fn fail_pending(
        &mut self,
        conn: ConnId,
        why: &str,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) {
        for pending in self.queue.drain(..) {
            let (stmt, completion) = match pending {
                // An ErrorResponse already decided the outcome; only the
                // ReadyForQuery is missing.
                Pending::Query {
                    stmt,
                    tag,
                    error: Some((sqlstate, message)),
                    ..
                } => (
                    Some(stmt),
                    Completion {
                        rows: tag.as_deref().and_then(|t| command_rows(t.as_bytes())),
                        tag,
                        ..failed(sqlstate, message)
                    },
                ),
                Pending::Query { stmt, tag, .. } => (
                    Some(stmt),
                    Completion {
                        tag,
                        ..failed(None, Some(why.to_owned()))
                    },
                ),
                Pending::Execute { stmt, .. } => (stmt, failed(None, Some(why.to_owned()))),
                Pending::SyncPoint => (None, failed(None, None)),
            };
            Self::complete(conn, stmt, completion, at, out);
        }
        self.discarding = false;
    }
}
