//! Shared by the `store_*` integration tests: wire events, and a way to edit
//! the database as someone with write access to the file would.
#![allow(dead_code)] // each test crate uses a different part of it

use std::{net::SocketAddr, path::Path};

use qgate_agent::wire::{Completion, ConnId, Identity, Outcome, ProtocolPath, StmtSeq, WireEvent};

/// 2024-05-01T12:00:00Z, so exported times are easy to read.
pub const T0: i64 = 1_714_564_800_000_000_000;
pub const MS: i64 = 1_000_000;

pub fn client(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 7], port))
}

pub fn server() -> SocketAddr {
    SocketAddr::from(([10, 0, 0, 1], 5432))
}

pub fn opened(conn: u64, at: i64) -> WireEvent {
    WireEvent::ConnectionOpened {
        conn: ConnId(conn),
        client: client(40_000 + conn as u16),
        server: server(),
        at,
        mid_stream: false,
        protocol: qgate_agent::flow::Protocol::Postgresql,
    }
}

pub fn identified(conn: u64, user: &str, database: &str, application: &str, at: i64) -> WireEvent {
    WireEvent::Identified {
        conn: ConnId(conn),
        identity: Identity {
            user: Some(user.into()),
            database: Some(database.into()),
            application: Some(application.into()),
            settings: Vec::new(),
        },
        at,
    }
}

pub fn received(conn: u64, stmt: u64, text: &str, at: i64) -> WireEvent {
    WireEvent::StatementReceived {
        conn: ConnId(conn),
        stmt: StmtSeq(stmt),
        text: text.into(),
        path: ProtocolPath::Simple,
        statement_name: None,
        at,
    }
}

pub fn completed_ok(conn: u64, stmt: u64, tag: &str, rows: Option<u64>, at: i64) -> WireEvent {
    WireEvent::StatementCompleted {
        conn: ConnId(conn),
        stmt: StmtSeq(stmt),
        completion: Completion {
            outcome: Outcome::Ok,
            tag: Some(tag.into()),
            rows,
            sqlstate: None,
            message: None,
        },
        at,
    }
}

pub fn completed_error(conn: u64, stmt: u64, sqlstate: &str, message: &str, at: i64) -> WireEvent {
    WireEvent::StatementCompleted {
        conn: ConnId(conn),
        stmt: StmtSeq(stmt),
        completion: Completion {
            outcome: Outcome::Error,
            tag: None,
            rows: None,
            sqlstate: Some(sqlstate.into()),
            message: Some(message.into()),
        },
        at,
    }
}

pub fn closed(conn: u64, at: i64) -> WireEvent {
    WireEvent::ConnectionClosed {
        conn: ConnId(conn),
        at,
    }
}

/// Runs `sql` on the database with every audit guard trigger dropped, as an
/// attacker with write access to the file could.
pub fn tamper(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).expect("open the database file directly");
    conn.execute_batch(
        "DROP TRIGGER audit_no_update;
         DROP TRIGGER audit_no_delete;
         DROP TRIGGER audit_extends_head;
         DROP TRIGGER audit_advance_head;
         DROP TRIGGER audit_head_no_delete;
         DROP TRIGGER audit_head_follows_log;",
    )
    .expect("drop the audit triggers");
    conn.execute_batch(sql).expect("tampering SQL");
}
