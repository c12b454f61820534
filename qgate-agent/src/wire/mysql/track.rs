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
    conversation::{Carrier, Outcome as MysqlOutcome},
    Conversation, Framer, MysqlEvent,
};
use crate::{
    clock::UnixNanos,
    wire::{
        tcp::Delivery, Completion, ConnId, Identity, Outcome, ProtocolPath, StmtSeq, WireEvent,
    },
};

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
}

/// A reported statement waiting for its completion, results folded so far.
#[derive(Debug)]
struct Due {
    stmt: StmtSeq,
    rows: u64,
    error: Option<(u16, Option<String>, String)>,
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
        }
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
                Ok(f) if from_client => self.conversation.client(&f, &mut events),
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
            } => out.push(WireEvent::Identified {
                conn,
                identity: Identity {
                    user: Some(user),
                    database,
                    application: program,
                    settings: Vec::new(),
                },
                at,
            }),
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
                    if let Some(Some(due)) = self.due.pop_front() {
                        out.push(WireEvent::StatementCompleted {
                            conn,
                            stmt: due.stmt,
                            completion: completion(due),
                            at,
                        });
                    }
                }
            }
            MysqlEvent::Undecodable { side, error } => out.push(WireEvent::Undecodable {
                conn,
                reason: format!("{side} stream: not MySQL from here on: {error}"),
                at,
            }),
            // Greeting, login outcome, COM_INIT_DB, COM_CHANGE_USER, quit:
            // not yet reported (see the note).
            MysqlEvent::Greeting { .. }
            | MysqlEvent::LoggedIn
            | MysqlEvent::LoginFailed { .. }
            | MysqlEvent::Database { .. }
            | MysqlEvent::ChangeUser { .. }
            | MysqlEvent::Quit => {}
        }
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
