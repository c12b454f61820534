//! What the wire stage tells the rest of the agent.
use std::net::SocketAddr;

use serde::Serialize;

use crate::{clock::UnixNanos, flow::Transport};

/// A connection the tracker knows, numbered from 1 in order of first sight
/// (0: none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ConnId(pub u64);

/// A statement within its connection, numbered from 1 in order of arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct StmtSeq(pub u64);

/// How a statement reached the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolPath {
    /// A `Query` message.
    Simple,
    /// `Parse` … `Execute` (the text is the prepared statement's).
    Extended,
}

/// Who is on the other end, from the StartupMessage. `None` fields were not
/// sent; a connection picked up mid-stream has no identity at all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub user: Option<String>,
    pub database: Option<String>,
    pub application: Option<String>,
    /// Every other StartupMessage parameter (`options`, `client_encoding`,
    /// any GUC), in order: settings the session starts with, which the
    /// gate judges as the `SET`s they are.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub settings: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error,
}

/// The server's answer to one statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Completion {
    pub outcome: Outcome,
    /// CommandComplete tag, e.g. `DELETE 5000`.
    pub tag: Option<String>,
    /// Row count from the tag (`INSERT 0 5` → 5), when it has one.
    pub rows: Option<u64>,
    /// ErrorResponse field `C`.
    pub sqlstate: Option<String>,
    /// ErrorResponse field `M`.
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum WireEvent {
    /// First sight of a connection. `mid_stream`: its start was not seen
    /// (opened before the agent), so its identity is unknown.
    ConnectionOpened {
        conn: ConnId,
        client: SocketAddr,
        server: SocketAddr,
        at: UnixNanos,
        mid_stream: bool,
        protocol: crate::flow::Protocol,
    },
    /// The connection is read inside the server (the server hook), not on
    /// the wire: how it reached the server and which backend serves it.
    ServerHooked {
        conn: ConnId,
        transport: Transport,
        backend_pid: u32,
        /// The real addresses (the wire stage's are synthetic); `None` for
        /// a Unix socket.
        client: Option<SocketAddr>,
        server: Option<SocketAddr>,
    },
    /// StartupMessage seen.
    Identified {
        conn: ConnId,
        identity: Identity,
        at: UnixNanos,
    },
    /// The server accepted SSLRequest/GSSENCRequest: the rest is opaque.
    Encrypted {
        conn: ConnId,
        at: UnixNanos,
    },
    /// A statement sent to the server (Query, or Execute of a prepared one).
    StatementReceived {
        conn: ConnId,
        stmt: StmtSeq,
        text: String,
        path: ProtocolPath,
        /// Prepared statement name for the extended path (`""` = unnamed).
        statement_name: Option<String>,
        at: UnixNanos,
    },
    /// The server's answer to a statement.
    StatementCompleted {
        conn: ConnId,
        stmt: StmtSeq,
        completion: Completion,
        at: UnixNanos,
    },
    /// A CancelRequest (on its own short connection) for the backend with
    /// this process id.
    CancelRequested {
        conn: ConnId,
        backend_pid: u32,
        /// The key it presents: only the right one ends anything (the
        /// server ignores a wrong one). Kept out of the record.
        #[serde(skip)]
        secret_key: Vec<u8>,
        at: UnixNanos,
    },
    /// Bytes that are not PostgreSQL protocol, or a broken stream; decoding of
    /// this direction stops until it can resynchronise. Also reported, with
    /// decoding going on, for an Execute whose statement text is unknown (its
    /// Parse came before the agent saw the connection): no
    /// `StatementReceived` is reported for it, so treat it as unparseable.
    Undecodable {
        conn: ConnId,
        reason: String,
        at: UnixNanos,
    },
    /// Bytes the capture lost (gap or truncation); what they held is unknown.
    CaptureGap {
        conn: ConnId,
        at: UnixNanos,
    },
    ConnectionClosed {
        conn: ConnId,
        at: UnixNanos,
    },
    /// What the server says of the session's state that changes how it
    /// reads statement text or whether a transaction is open. For the
    /// gate only: not stored.
    ServerReport {
        conn: ConnId,
        report: ServerReport,
    },
}

/// See [`WireEvent::ServerReport`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "report", rename_all = "snake_case")]
pub enum ServerReport {
    /// ParameterStatus of `client_encoding` or `standard_conforming_strings`.
    Parameter { name: String, value: String },
    /// ReadyForQuery: idle (no transaction open) or not.
    Ready { idle: bool },
}
