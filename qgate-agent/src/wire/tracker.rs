//! [`Tracker`]: every connection's reassembly, decoding and pairing state.
use crate::FastMap as HashMap;

use super::{
    mysql::{
        conversation::{Carrier as MysqlCarrier, ClientPacket},
        track::{LoggedPacket, MysqlStreams},
    },
    pg::{BackendDecoder, BackendMessage, Decoded, FrontendDecoder, FrontendMessage},
    session::{MessageSpan, Session},
    tcp::{Delivery, StreamReassembler},
    ConnId, StmtSeq, WireEvent,
};
use crate::{
    capture::Segment,
    clock::UnixNanos,
    flow::{Direction, Flow},
};

/// TCP ACK flag (RFC 9293 §3.1): a SYN without it opens a connection.
const TCP_ACK: u8 = 0x10;

/// A message in the client → server stream, with the TCP sequence number of
/// its first byte (for holding, releasing or rewriting that segment).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSpan {
    /// Offset in the client → server stream (see [`super::tcp`]).
    pub offset: u64,
    pub len: u64,
    pub seq: u32,
}

/// Where a statement that is still waiting for its answer was sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatementSpan {
    /// The Query or Execute message.
    pub message: StreamSpan,
    /// The message carrying the statement text: the Query itself, or the
    /// Parse of a prepared statement (`None` if it was not seen).
    pub text: Option<StreamSpan>,
}

/// What a client message carries that the gate must judge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SqlCarrier {
    Query,
    Parse,
    /// FunctionCall: runs a function by OID, with no SQL text to judge.
    FunctionCall,
    /// The StartupMessage: the identity the policy judges.
    Startup,
    /// A MySQL command with an effect of its own and no SQL text (kill,
    /// shutdown, change user, …): judged as the statement it amounts to;
    /// its "text" in the stream is the command byte.
    Command,
}

/// One message of a watched connection's client → server stream (see
/// [`Tracker::watch`]), for the gate: where it is and, when it carries SQL,
/// the text and where the text sits (for a same-length rewrite).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMessage {
    pub conn: ConnId,
    pub flow: Flow,
    pub span: StreamSpan,
    pub sql: Option<ClientSql>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSql {
    pub carrier: SqlCarrier,
    /// The text up to its NUL terminator (lossy UTF-8).
    pub text: String,
    /// The text's bytes in the stream, NUL excluded.
    pub text_span: StreamSpan,
    /// Prepared statement name (Parse).
    pub statement: String,
}

/// One tracked connection: its two streams, what they decode to, and where
/// it is in its life (announced, FINs seen, reported closed).
#[derive(Debug)]
struct Connection {
    id: ConnId,
    /// Report every client message to [`Tracker::take_client_messages`].
    watched: bool,
    last_seen: UnixNanos,
    streams: Streams,
    decoding: Decoding,
    /// A MySQL connection (its server port carries MySQL): its bytes go
    /// here, not to `decoding`.
    mysql: Option<Box<MysqlStreams>>,
    closed_reported: bool,
    client_fin: bool,
    server_fin: bool,
    /// `ConnectionOpened` was reported: only once the connection carried
    /// bytes (a SYN flood's handshakes leave no record, and are the first
    /// state shed when the table is full).
    announced: bool,
    opened_at: UnixNanos,
    mid_stream: bool,
    /// A client SYN with another initial sequence number, kept until the
    /// server's SYN|ACK shows it accepted a new connection.
    new_syn: Option<Segment>,
}

/// Both directions of a connection's bytes, put back in TCP order.
#[derive(Debug, Default)]
struct Streams {
    client: StreamReassembler,
    server: StreamReassembler,
}

/// What a connection's bytes become: both decoders, the session pairing
/// statements with answers, and what was already reported about them.
#[derive(Debug)]
struct Decoding {
    frontend: FrontendDecoder,
    backend: BackendDecoder,
    session: Session,
    encrypted: bool,
    undecodable: UndecodableStretch,
    /// From the last BackendKeyData: whose cancel key to forget at close.
    backend_pid: Option<u32>,
}

/// Whether an Undecodable was reported and nothing decoded since (in either
/// direction): one report per undecodable stretch, not one per byte.
#[derive(Debug, Default)]
struct UndecodableStretch {
    reported: bool,
}

/// Which backend a CancelRequest names (§55.2.8): from BackendKeyData.
#[derive(Debug)]
struct BackendKey {
    conn: ConnId,
    secret_key: Box<[u8]>,
}

/// The BackendKeyData a connection's server sent, by backend pid, in
/// stream order: what the tracker adds to its cancel keys.
type LearnedKeys = Vec<(u32, BackendKey)>;

/// One message of a watched connection as logged during decoding: its
/// connection, stream offset and length, and what it carries.
type LogEntry = (ConnId, u64, u64, Option<LoggedSql>);

/// A MySQL client packet as the gate's log entry: a packet the
/// conversation could not read is not logged (it is never released).
fn mysql_log_entry(conn: ConnId, p: LoggedPacket) -> Option<LogEntry> {
    let end = p.offset + p.wire_len;
    let sql = match p.packet {
        ClientPacket::Unread => return None,
        ClientPacket::Exchange | ClientPacket::Plain => None,
        ClientPacket::Sql { carrier, text, .. } => {
            // A text split over several physical packets has no one place
            // on the wire: logged empty, so it cannot be rewritten (a
            // denial leaves it held).
            let text_offset = p.text_offset.unwrap_or(end);
            Some(LoggedSql {
                carrier: match carrier {
                    MysqlCarrier::Prepare => SqlCarrier::Parse,
                    _ => SqlCarrier::Query,
                },
                text,
                text_offset,
                text_len: end - text_offset,
                statement: String::new(),
            })
        }
        ClientPacket::Login { user } => {
            // Refused by rewriting the whole payload (the header stays).
            let text_offset = p.text_offset.unwrap_or(end);
            Some(LoggedSql {
                carrier: SqlCarrier::Startup,
                text: format!("MySQL login as '{user}'"),
                text_offset,
                text_len: end - text_offset,
                statement: String::new(),
            })
        }
        ClientPacket::Command { text } => Some(LoggedSql {
            carrier: SqlCarrier::Command,
            text,
            text_offset: p.text_offset.unwrap_or(p.offset + 4),
            text_len: 1,
            statement: String::new(),
        }),
    };
    Some((conn, p.offset, p.wire_len, sql))
}

/// A SQL-bearing message as logged during decoding (offsets, not yet seqs).
#[derive(Debug)]
struct LoggedSql {
    carrier: SqlCarrier,
    text: String,
    text_offset: u64,
    text_len: u64,
    statement: String,
}

/// The wire stage's door: feed it every segment of every connection on the
/// database ports, in capture order; it reports [`WireEvent`]s. Input never
/// makes it panic; one connection's bytes never affect another's.
#[derive(Debug, Default)]
pub struct Tracker {
    /// Messages of watched connections, as (conn, stream offset, len, sql).
    client_log: Vec<LogEntry>,
    /// Flows to watch from their first segment on (not known yet).
    watch_next: crate::FastSet<Flow>,
    connections: HashMap<Flow, Connection>,
    flows: HashMap<ConnId, Flow>,
    backends: HashMap<u32, BackendKey>,
    opened: u64,
    /// Connections that carried no byte yet, oldest first (may name ones
    /// gone since): what is shed when the table is full.
    silent: std::collections::VecDeque<(Flow, ConnId)>,
    /// Connections forgotten, or never tracked, because the table was full.
    shed: u64,
    /// Server ports that carry MySQL (the rest carry PostgreSQL).
    mysql_ports: crate::FastSet<u16>,
}

/// Connections tracked at most. Beyond, the oldest that never carried a
/// byte is forgotten first; with none such, new connections are not
/// tracked (counted in [`Tracker::shed`]; their statements, on a gated
/// port, stay held: nothing unread runs).
pub const MAX_CONNECTIONS: usize = 65_536;

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Connections to these server ports speak MySQL (`capture.mysql_ports`).
    pub fn set_mysql_ports(&mut self, ports: &[u16]) {
        self.mysql_ports = ports.iter().copied().collect();
    }

    /// Connections shed or refused because the table was full.
    pub fn shed(&self) -> u64 {
        self.shed
    }

    /// Forgets the oldest connection that never carried a byte; false when
    /// there is none.
    fn shed_one(&mut self) -> bool {
        while let Some((flow, id)) = self.silent.pop_front() {
            let silent = self
                .connections
                .get(&flow)
                .is_some_and(|c| c.id == id && !c.announced);
            if silent {
                self.connections.remove(&flow);
                self.flows.remove(&id);
                self.shed += 1;
                return true;
            }
        }
        false
    }

    /// Connections currently tracked.
    pub fn len(&self) -> usize {
        self.connections.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connections.is_empty()
    }

    pub fn flow(&self, conn: ConnId) -> Option<Flow> {
        self.flows.get(&conn).copied()
    }

    /// The connection whose server process is `backend_pid` (from its
    /// BackendKeyData), e.g. the target of a [`WireEvent::CancelRequested`].
    pub fn backend_connection(&self, backend_pid: u32) -> Option<ConnId> {
        self.backends.get(&backend_pid).map(|b| b.conn)
    }

    /// Whether `secret_key` is the one the server gave `backend_pid`'s
    /// client, i.e. whether a CancelRequest is genuine.
    pub fn cancel_key_matches(&self, backend_pid: u32, secret_key: &[u8]) -> bool {
        self.backends
            .get(&backend_pid)
            .is_some_and(|b| *b.secret_key == *secret_key)
    }

    /// TCP sequence number of a server → client stream offset.
    pub fn server_seq_at(&self, conn: ConnId, offset: u64) -> Option<u32> {
        let flow = self.flows.get(&conn)?;
        self.connections.get(flow)?.streams.server.seq_at(offset)
    }

    /// TCP sequence number of a client → server stream offset.
    pub fn client_seq_at(&self, conn: ConnId, offset: u64) -> Option<u32> {
        let flow = self.flows.get(&conn)?;
        self.connections.get(flow)?.streams.client.seq_at(offset)
    }

    /// Client → server stream offset of a TCP sequence number (nearest to
    /// the current position).
    pub fn client_offset_of(&self, conn: ConnId, seq: u32) -> Option<u64> {
        let flow = self.flows.get(&conn)?;
        self.connections.get(flow)?.streams.client.offset_of(seq)
    }

    /// Where a statement still waiting for its answer sits in the client's
    /// TCP stream. `None` once it completed.
    pub fn pending_statement(&self, conn: ConnId, stmt: StmtSeq) -> Option<StatementSpan> {
        let flow = self.flows.get(&conn)?;
        let c = self.connections.get(flow)?;
        let spans = c.decoding.session.pending_spans(stmt)?;
        let locate = |span: MessageSpan| {
            Some(StreamSpan {
                offset: span.offset,
                len: span.len,
                seq: c.streams.client.seq_at(span.offset)?,
            })
        };
        Some(StatementSpan {
            message: locate(spans.message)?,
            text: spans.text.and_then(locate),
        })
    }

    /// Starts (or stops) reporting every client message of `flow` through
    /// [`Tracker::take_client_messages`]: the gate watches connections whose
    /// bytes the kernel holds.
    pub fn watch(&mut self, flow: &Flow, on: bool) {
        match self.connections.get_mut(flow) {
            Some(c) => c.watched = on,
            None if on => {
                self.watch_next.insert(*flow);
            }
            None => {
                self.watch_next.remove(flow);
            }
        }
    }

    /// The messages of watched connections decoded since the last call, in
    /// stream order per connection, with TCP sequence numbers.
    pub fn take_client_messages(&mut self) -> Vec<ClientMessage> {
        let log = std::mem::take(&mut self.client_log);
        let mut messages = Vec::with_capacity(log.len());
        for (conn, offset, len, sql) in log {
            let Some(flow) = self.flows.get(&conn).copied() else {
                continue;
            };
            let Some(c) = self.connections.get(&flow) else {
                continue;
            };
            let locate = |offset: u64, len: u64| {
                Some(StreamSpan {
                    offset,
                    len,
                    seq: c.streams.client.seq_at(offset)?,
                })
            };
            let Some(span) = locate(offset, len) else {
                continue;
            };
            let sql = match sql {
                Some(s) => match locate(s.text_offset, s.text_len) {
                    Some(text_span) => Some(ClientSql {
                        carrier: s.carrier,
                        text: s.text,
                        text_span,
                        statement: s.statement,
                    }),
                    None => continue,
                },
                None => None,
            };
            messages.push(ClientMessage {
                conn,
                flow,
                span,
                sql,
            });
        }
        messages
    }

    /// Whether the connection turned out TLS or GSS-encrypted (unreadable).
    pub fn is_encrypted(&self, conn: ConnId) -> bool {
        self.flows
            .get(&conn)
            .and_then(|f| self.connections.get(f))
            .is_some_and(|c| c.decoding.encrypted || c.mysql.as_ref().is_some_and(|m| m.encrypted))
    }

    /// A MySQL connection (read, not gated).
    pub fn is_mysql(&self, conn: ConnId) -> bool {
        self.flows
            .get(&conn)
            .and_then(|f| self.connections.get(f))
            .is_some_and(|c| c.mysql.is_some())
    }

    /// A MySQL connection whose conversation stopped being read (it failed,
    /// or the client quit), other than by turning encrypted: nothing more
    /// of it is decoded.
    pub fn mysql_unread(&self, flow: &Flow) -> bool {
        self.connections
            .get(flow)
            .and_then(|c| c.mysql.as_ref())
            .is_some_and(|m| m.unread())
    }

    /// The connection was seen from its first bytes (not picked up
    /// mid-stream).
    pub fn seen_from_start(&self, conn: ConnId) -> bool {
        self.flows
            .get(&conn)
            .and_then(|f| self.connections.get(f))
            .is_some_and(|c| !c.mid_stream)
    }

    /// A MySQL connection whose server reads the next client packet as a
    /// command, whatever was released so far (see
    /// `Conversation::at_command_boundary`); `None` for a PostgreSQL one.
    pub fn mysql_at_command_boundary(&self, flow: &Flow) -> Option<bool> {
        let c = self.connections.get(flow)?;
        c.mysql.as_ref().map(|m| m.at_command_boundary())
    }

    /// The tracker's id for `flow`'s connection.
    pub fn connection_id(&self, flow: &Flow) -> Option<ConnId> {
        self.connections.get(flow).map(|c| c.id)
    }

    pub fn on_segment(&mut self, seg: &Segment, out: &mut Vec<WireEvent>) {
        if seg.is_syn() && !self.screen_syn(seg, out) {
            return;
        }
        if !self.connections.contains_key(&seg.flow) && !self.open(seg) {
            return;
        }
        let Some(conn) = self.connections.get_mut(&seg.flow) else {
            return;
        };
        if (seg.is_rst() || seg.is_fin()) && !conn.streams.in_receive_window(seg) {
            // A receiver drops a RST or FIN far from where its stream is
            // (RFC 5961 §3, RFC 9293 §3.10.7.4): a forged one ends nothing.
            return;
        }
        conn.announce(seg, out);
        conn.last_seen = seg.at;
        // Once reported closed (Terminate or FIN with nothing pending), the
        // rest is teardown: nothing more to decode or report.
        if !conn.closed_reported {
            match seg.direction {
                Direction::ToServer => conn.client_segment(seg, &mut self.client_log, out),
                Direction::FromServer => self.backends.extend(conn.server_segment(seg, out)),
            }
        }
        if seg.is_rst() {
            self.close(seg.flow, "the connection was reset", seg.at, out);
            return;
        }
        if seg.is_fin() {
            conn.finished(seg.direction);
        }
        if conn.client_fin && conn.server_fin {
            self.close(seg.flow, "the connection closed", seg.at, out);
            return;
        }
        conn.report_closed_if_done(seg.at, out);
    }

    /// What a SYN does to a connection under way; false when the segment
    /// goes no further.
    fn screen_syn(&mut self, seg: &Segment, out: &mut Vec<WireEvent>) -> bool {
        // A client SYN on a connection under way: the server ignores it
        // unless it is a new connection on a reused address, which the
        // server's SYN|ACK acknowledging it shows. Until then it changes
        // nothing.
        if seg.tcp_flags & TCP_ACK == 0 && seg.direction == Direction::ToServer {
            if let Some(c) = self.connections.get_mut(&seg.flow) {
                let client = &c.streams.client;
                if client.is_started() && client.seq_at(0) != Some(seg.seq.wrapping_add(1)) {
                    c.new_syn = Some(seg.clone());
                    return false;
                }
            }
        }
        let accepted_syn = (seg.direction == Direction::FromServer && seg.tcp_flags & TCP_ACK != 0)
            .then(|| self.connections.get_mut(&seg.flow))
            .flatten()
            .and_then(|c| {
                let syn = c.new_syn.as_ref()?;
                (ack_of(seg) == Some(syn.seq.wrapping_add(1))).then(|| c.new_syn.take())?
            });
        if let Some(syn) = accepted_syn {
            self.close(
                seg.flow,
                "the client reused the address for a new connection",
                seg.at,
                out,
            );
            self.on_segment(&syn, out);
            return true;
        }
        // Any other SYN on a live connection (a SYN|ACK towards the server,
        // one the server did not answer): ignored, as the server's stack
        // ignores it.
        !self
            .connections
            .get(&seg.flow)
            .is_some_and(|c| c.streams.of(seg.direction).is_started())
    }

    /// Starts tracking `seg`'s connection; false when it opens none (a stray
    /// FIN, RST or ACK of a connection already forgotten, or a full table).
    fn open(&mut self, seg: &Segment) -> bool {
        if seg.is_rst() || !(seg.is_syn() || !seg.payload.is_empty() || seg.truncated) {
            return false;
        }
        if self.connections.len() >= MAX_CONNECTIONS && !self.shed_one() {
            self.shed += 1;
            return false;
        }
        self.opened += 1;
        let id = ConnId(self.opened);
        let mut connection = Connection::new(id, seg.at, !seg.is_syn());
        if self.mysql_ports.contains(&seg.flow.server.port()) {
            connection.mysql = Some(Box::new(MysqlStreams::new(!seg.is_syn())));
        }
        connection.watched = self.watch_next.remove(&seg.flow);
        self.connections.insert(seg.flow, connection);
        self.flows.insert(id, seg.flow);
        self.silent.push_back((seg.flow, id));
        if self.silent.len() > 2 * MAX_CONNECTIONS {
            let connections = &self.connections;
            self.silent.retain(|(flow, id)| {
                connections
                    .get(flow)
                    .is_some_and(|c| c.id == *id && !c.announced)
            });
        }
        true
    }

    /// Forgets connections silent since before `now - max_idle` (their
    /// FIN/RST was not seen, or they are idle); returns how many.
    pub fn expire_idle(
        &mut self,
        now: UnixNanos,
        max_idle: std::time::Duration,
        out: &mut Vec<WireEvent>,
    ) -> usize {
        let limit = i64::try_from(max_idle.as_nanos()).unwrap_or(i64::MAX);
        let stale: Vec<Flow> = self
            .connections
            .iter()
            .filter(|(_, c)| now.saturating_sub(c.last_seen) > limit)
            .map(|(flow, _)| *flow)
            .collect();
        for flow in &stale {
            self.close(
                *flow,
                "the connection went idle and was forgotten",
                now,
                out,
            );
        }
        stale.len()
    }

    /// Closes every connection (end of a capture file, agent shutdown).
    pub fn close_all(&mut self, at: UnixNanos, out: &mut Vec<WireEvent>) {
        let mut flows: Vec<(ConnId, Flow)> =
            self.connections.iter().map(|(f, c)| (c.id, *f)).collect();
        flows.sort();
        for (_, flow) in flows {
            self.close(flow, "the capture ended", at, out);
        }
    }

    /// Delivers whatever is held, ends pending statements, reports the close
    /// and forgets the connection.
    fn close(&mut self, flow: Flow, why: &str, at: UnixNanos, out: &mut Vec<WireEvent>) {
        let Some(mut conn) = self.connections.remove(&flow) else {
            return;
        };
        self.flows.remove(&conn.id);
        if let Some(pid) = conn.decoding.backend_pid {
            if self.backends.get(&pid).is_some_and(|b| b.conn == conn.id) {
                self.backends.remove(&pid);
            }
        }
        if conn.closed_reported || !conn.announced {
            return;
        }
        self.backends.extend(conn.report_close(why, at, out));
    }
}

impl Connection {
    fn new(id: ConnId, at: UnixNanos, mid_stream: bool) -> Self {
        Self {
            id,
            watched: false,
            last_seen: at,
            streams: Streams::default(),
            decoding: Decoding::new(mid_stream),
            mysql: None,
            closed_reported: false,
            client_fin: false,
            server_fin: false,
            announced: false,
            opened_at: at,
            mid_stream,
            new_syn: None,
        }
    }

    /// Reports `ConnectionOpened` at the first segment carrying bytes.
    /// Synthetic connections (the server hook's, server port 0) are reported
    /// at once: the hook's own record about them follows.
    fn announce(&mut self, seg: &Segment, out: &mut Vec<WireEvent>) {
        if !self.announced
            && (!seg.payload.is_empty() || seg.truncated || seg.flow.server.port() == 0)
        {
            self.announced = true;
            out.push(WireEvent::ConnectionOpened {
                conn: self.id,
                client: seg.flow.client,
                server: seg.flow.server,
                at: self.opened_at,
                mid_stream: self.mid_stream,
                protocol: if self.mysql.is_some() {
                    crate::flow::Protocol::Mysql
                } else {
                    crate::flow::Protocol::Postgresql
                },
            });
        }
    }

    /// A MySQL connection's segment, either way; false for a PostgreSQL one.
    fn mysql_segment(
        &mut self,
        seg: &Segment,
        log: Option<&mut Vec<LogEntry>>,
        out: &mut Vec<WireEvent>,
    ) -> bool {
        let Some(mysql) = &mut self.mysql else {
            return false;
        };
        let mut packets = Vec::new();
        let mut packets_log =
            (log.is_some() && seg.direction == Direction::ToServer).then_some(&mut packets);
        let from_client = seg.direction == Direction::ToServer;
        let stream = if from_client {
            &mut self.streams.client
        } else {
            &mut self.streams.server
        };
        let id = self.id;
        stream.push(
            seg.seq,
            seg.is_syn(),
            &seg.payload,
            seg.truncated,
            &mut |d| mysql.feed(from_client, id, d, seg.at, packets_log.as_deref_mut(), out),
        );
        if let Some(log) = log {
            log.extend(packets.into_iter().filter_map(|p| mysql_log_entry(id, p)));
        }
        true
    }

    /// Reassembles and decodes a client → server segment, logging its
    /// messages in `log` when the connection is watched.
    fn client_segment(&mut self, seg: &Segment, log: &mut Vec<LogEntry>, out: &mut Vec<WireEvent>) {
        let mut log = self.watched.then_some(log);
        if self.mysql_segment(seg, log.as_deref_mut(), out) {
            return;
        }
        self.streams.client.push(
            seg.seq,
            seg.is_syn(),
            &seg.payload,
            seg.truncated,
            &mut |d| {
                self.decoding
                    .on_client_delivery(self.id, d, seg.at, log.as_deref_mut(), out)
            },
        );
    }

    /// Reassembles and decodes a server → client segment; returns the cancel
    /// keys it carried.
    fn server_segment(&mut self, seg: &Segment, out: &mut Vec<WireEvent>) -> LearnedKeys {
        if self.mysql_segment(seg, None, out) {
            return LearnedKeys::new();
        }
        let decoding = &mut self.decoding;
        if decoding.session.awaiting_encryption_answer {
            decoding.session.awaiting_encryption_answer = false;
            decoding.backend.expect_encryption_answer();
        }
        let mut keys = LearnedKeys::new();
        self.streams.server.push(
            seg.seq,
            seg.is_syn(),
            &seg.payload,
            seg.truncated,
            &mut |d| {
                self.decoding
                    .on_server_delivery(self.id, d, seg.at, &mut keys, out)
            },
        );
        keys
    }

    /// A FIN in `direction`: that side sends no more, the session is closing.
    fn finished(&mut self, direction: Direction) {
        match direction {
            Direction::ToServer => self.client_fin = true,
            Direction::FromServer => self.server_fin = true,
        }
        self.decoding.session.closing = true;
    }

    fn report_closed_if_done(&mut self, at: UnixNanos, out: &mut Vec<WireEvent>) {
        let session = &self.decoding.session;
        let idle = self
            .mysql
            .as_ref()
            .map_or(session.is_idle(), |m| m.is_idle());
        if session.closing && idle && !self.closed_reported && self.announced {
            self.closed_reported = true;
            out.push(WireEvent::ConnectionClosed { conn: self.id, at });
        }
    }

    /// Decodes what both streams still hold (none of it logged for the gate),
    /// ends pending statements and reports the close; returns the cancel keys
    /// the server's last bytes carried.
    fn report_close(&mut self, why: &str, at: UnixNanos, out: &mut Vec<WireEvent>) -> LearnedKeys {
        if let Some(mysql) = &mut self.mysql {
            let id = self.id;
            self.streams
                .client
                .flush(&mut |d| mysql.feed(true, id, d, at, None, out));
            self.streams
                .server
                .flush(&mut |d| mysql.feed(false, id, d, at, None, out));
            mysql.fail_pending(id, &format!("no answer seen: {why}"), at, out);
            out.push(WireEvent::ConnectionClosed { conn: id, at });
            return LearnedKeys::new();
        }
        self.streams
            .client
            .flush(&mut |d| self.decoding.on_client_delivery(self.id, d, at, None, out));
        let mut keys = LearnedKeys::new();
        self.streams.server.flush(&mut |d| {
            self.decoding
                .on_server_delivery(self.id, d, at, &mut keys, out)
        });
        let why = format!("no answer seen: {why}");
        self.decoding.session.fail_pending(self.id, &why, at, out);
        out.push(WireEvent::ConnectionClosed { conn: self.id, at });
        keys
    }
}

impl Streams {
    /// The stream that `direction`'s segments carry.
    fn of(&self, direction: Direction) -> &StreamReassembler {
        match direction {
            Direction::ToServer => &self.client,
            Direction::FromServer => &self.server,
        }
    }

    /// True when `seg`'s sequence number is near where its direction's
    /// stream is (or that stream has not started, so nothing can be checked).
    fn in_receive_window(&self, seg: &Segment) -> bool {
        let stream = self.of(seg.direction);
        let Some(expected) = stream
            .seq_at(stream.next_offset())
            .filter(|_| stream.is_started())
        else {
            return true;
        };
        let delta = i64::from(qgate_common::tcp::seq_delta(seg.seq, expected));
        (-CONTROL_WINDOW..=CONTROL_WINDOW).contains(&delta)
    }
}

impl Decoding {
    fn new(mid_stream: bool) -> Self {
        Self {
            frontend: if mid_stream {
                FrontendDecoder::mid_stream()
            } else {
                FrontendDecoder::new()
            },
            backend: if mid_stream {
                BackendDecoder::mid_stream()
            } else {
                BackendDecoder::new()
            },
            session: Session::default(),
            encrypted: false,
            undecodable: UndecodableStretch::default(),
            backend_pid: None,
        }
    }

    /// Decodes client bytes in order, appending each message to `log` when
    /// given.
    fn on_client_delivery(
        &mut self,
        conn: ConnId,
        delivery: Delivery<'_>,
        at: UnixNanos,
        mut log: Option<&mut Vec<LogEntry>>,
        out: &mut Vec<WireEvent>,
    ) {
        match delivery {
            Delivery::Gap { .. } => {
                if !self.encrypted {
                    out.push(WireEvent::CaptureGap { conn, at });
                }
                self.frontend.gap();
            }
            Delivery::Data { offset, bytes } => {
                let mut tls = false;
                self.frontend.push(offset, bytes, &mut |decoded| {
                    let Some((span, message)) = self
                        .undecodable
                        .message_or_report(conn, "client", decoded, at, out)
                    else {
                        return;
                    };
                    if message == FrontendMessage::Tls {
                        tls = true;
                    }
                    if let Some(log) = log.as_deref_mut() {
                        log.push(log_entry(conn, span.offset, span.len, &message));
                    }
                    self.session.on_frontend(conn, span, &message, at, out);
                });
                if tls {
                    self.report_encrypted(conn, at, out);
                }
            }
        }
    }

    /// Decodes server bytes in order, appending each BackendKeyData to
    /// `keys`.
    fn on_server_delivery(
        &mut self,
        conn: ConnId,
        delivery: Delivery<'_>,
        at: UnixNanos,
        keys: &mut LearnedKeys,
        out: &mut Vec<WireEvent>,
    ) {
        match delivery {
            Delivery::Gap { .. } => {
                if !self.encrypted {
                    out.push(WireEvent::CaptureGap { conn, at });
                }
                self.backend.gap();
                self.session.fail_pending(
                    conn,
                    "the capture lost part of the server's answer: outcome unknown",
                    at,
                    out,
                );
            }
            Delivery::Data { offset, bytes } => {
                let mut encryption_started = false;
                self.backend.push(offset, bytes, &mut |decoded| {
                    let Some((_, message)) = self
                        .undecodable
                        .message_or_report(conn, "server", decoded, at, out)
                    else {
                        return;
                    };
                    match message {
                        BackendMessage::EncryptionResponse { accepted: true }
                        | BackendMessage::Tls => {
                            encryption_started = true;
                        }
                        BackendMessage::BackendKeyData {
                            backend_pid,
                            secret_key,
                        } => {
                            self.backend_pid = Some(backend_pid);
                            keys.push((
                                backend_pid,
                                BackendKey {
                                    conn,
                                    secret_key: secret_key.into(),
                                },
                            ));
                        }
                        other => self.session.on_backend(conn, &other, at, out),
                    }
                });
                if encryption_started {
                    self.report_encrypted(conn, at, out);
                }
            }
        }
    }

    /// Stops decoding both directions and reports the encryption once.
    fn report_encrypted(&mut self, conn: ConnId, at: UnixNanos, out: &mut Vec<WireEvent>) {
        self.frontend.stop();
        self.backend.stop();
        if !self.encrypted {
            self.encrypted = true;
            out.push(WireEvent::Encrypted { conn, at });
        }
    }
}

impl UndecodableStretch {
    /// Hands a decoded message back with its place in the stream; reports
    /// anything else a decoder says (once per undecodable stretch, re-armed
    /// when it finds its footing again), the same way for both directions.
    /// `stream` names the direction.
    fn message_or_report<M>(
        &mut self,
        conn: ConnId,
        stream: &str,
        decoded: Decoded<M>,
        at: UnixNanos,
        out: &mut Vec<WireEvent>,
    ) -> Option<(MessageSpan, M)> {
        match decoded {
            Decoded::Message {
                offset,
                len,
                message,
            } => return Some((MessageSpan { offset, len }, message)),
            Decoded::Error { offset, error } => self.report(
                conn,
                format!("{stream} stream at offset {offset}: {error}"),
                at,
                out,
            ),
            Decoded::Unsynchronised { offset } => self.report(
                conn,
                format!(
                    "{stream} stream at offset {offset}: no PostgreSQL message starts here \
                     (picked up mid-stream, after a gap, or not PostgreSQL)"
                ),
                at,
                out,
            ),
            Decoded::Resynchronised { .. } => self.reported = false,
        }
        None
    }

    fn report(&mut self, conn: ConnId, reason: String, at: UnixNanos, out: &mut Vec<WireEvent>) {
        if !self.reported {
            self.reported = true;
            out.push(WireEvent::Undecodable { conn, reason, at });
        }
    }
}

/// What the gate needs to know of one decoded client message.
fn log_entry(conn: ConnId, offset: u64, len: u64, message: &FrontendMessage<'_>) -> LogEntry {
    // Protocol 3.0 "Message Formats": type byte + Int32 length, then the body.
    const HEADER: u64 = 5;
    fn text_until_nul(bytes: &[u8]) -> &[u8] {
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        &bytes[..end]
    }
    let sql = match message {
        FrontendMessage::Query { text } => {
            let text = text_until_nul(text);
            Some(LoggedSql {
                carrier: SqlCarrier::Query,
                text: String::from_utf8_lossy(text).into_owned(),
                text_offset: offset + HEADER,
                text_len: text.len() as u64,
                statement: String::new(),
            })
        }
        FrontendMessage::Parse {
            statement, text, ..
        } => {
            let text = text_until_nul(text);
            Some(LoggedSql {
                carrier: SqlCarrier::Parse,
                text: String::from_utf8_lossy(text).into_owned(),
                text_offset: offset + HEADER + statement.len() as u64 + 1,
                text_len: text.len() as u64,
                statement: String::from_utf8_lossy(statement).into_owned(),
            })
        }
        // The "text" of a FunctionCall is its function's OID (4 bytes after
        // the header): what a refusal rewrites.
        FrontendMessage::FunctionCall { function_oid } => Some(LoggedSql {
            carrier: SqlCarrier::FunctionCall,
            text: format!("-- FunctionCall of function OID {function_oid}"),
            text_offset: offset + HEADER,
            text_len: 4,
            statement: String::new(),
        }),
        FrontendMessage::Startup(_) => Some(LoggedSql {
            carrier: SqlCarrier::Startup,
            text: String::new(),
            text_offset: offset,
            text_len: len,
            statement: String::new(),
        }),
        _ => None,
    };
    (conn, offset, len, sql)
}

/// How far from the next expected byte a RST or FIN may be and still be
/// taken as the peer's (a receive window's worth).
const CONTROL_WINDOW: i64 = 1 << 20;

/// The acknowledgment number of a segment whose TCP header was captured.
fn ack_of(seg: &Segment) -> Option<u32> {
    let h = seg.tcp_header.get(8..12)?;
    Some(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
}
