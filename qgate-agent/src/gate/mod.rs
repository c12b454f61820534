//! Holding, releasing and denying statements: the agent's half of the tc
//! program's gate.
//!
//! The program drops what it cannot prove harmless and reports the dropped
//! copies (`Segment::held`). [`Gate`] keeps them per connection
//! ([`held::HeldStream`]), learns the message boundaries from the wire
//! stage, decides each SQL message with the policy, and then:
//! - allow: re-injects the held bytes at once ([`inject`]) and tells the
//!   program where the next message starts ([`kernel`]);
//! - hold: opens a request on the [`RequestBoard`] and waits for its final
//!   event (approved → as allow; denied, expired, withdrawn → as deny);
//! - deny: re-injects the bytes with the statement rewritten to one of the
//!   same length that fails naming qgate and the request ([`rewrite`]), and
//!   makes the program drop every later copy of the original.
//!
//! Sessions the server hook reads are held the other way, by stopping the
//! backend (`backend`): same decisions, requests and audit, a different
//! way to hold, release and refuse. What a message is judged on (the
//! classifier's facts plus the session's lexing, the database's user code,
//! a write's estimated share of its table) is `judge`.
//!
//! The door is [`Gate`]: the capture loop hands it every segment
//! (`before_segment` / `after_segment`), every wire event (`on_event`),
//! every request event (`on_request_event`) and a `tick`. It guarantees
//! that nothing it was asked about reaches the server undecided: a message
//! it cannot decide stays held, and a failure to record a decision denies.
//!
//! | module | does |
//! | --- | --- |
//! | [`held`] | the held bytes of one connection, in order; what may be released |
//! | [`inject`] | re-injects released bytes and resets through raw sockets |
//! | [`rewrite`] | same-length denial texts (whole, prefix, tail, startup) |
//! | [`startup`] | StartupMessage settings judged as the `SET`s they are |
//! | `connection` | the one record the gate keeps per connection |
//! | `decide` | a message's ruling carried out: request, audit, the store's record |
//! | `modes` | what the kernel is told of each connection; catalogs and estimates arriving |
//! | `refuse` | refusing held bytes (rewrite or reset); withdrawing requests of clients gone |
//! | `judge` | what a message is judged on, and the ruling (pure: no kernel, board or socket) |
//! | `backend` | the server hook's way: stopped backends, rewrite in place |
//! | `recover` | after a restart: pending requests taken over, dead ones withdrawn |
mod backend;
mod connection;
mod decide;
pub mod held;
mod modes;
mod recover;
mod refuse;

/// What the gate measures (served at `/metrics` by the API).
pub mod metrics {
    /// Counter, label `decision` = `allow` | `hold` | `deny`: policy decisions.
    pub const DECISIONS: &str = "qgate_decisions_total";
    /// Histogram, seconds: from a gated message's arrival to the policy's decision.
    pub const DECISION_LATENCY: &str = "qgate_decision_latency_seconds";
    /// Counter, labels `rule` and `would` (`hold` | `deny`): what rules
    /// marked `shadow = true` would have done.
    pub const SHADOW: &str = "qgate_policy_shadow_total";
}
pub mod inject;
mod judge;
pub mod rewrite;
pub mod startup;

use std::time::{Duration, Instant};

use crate::FastMap as HashMap;

use tracing::{debug, info, warn};

use self::{
    connection::{BackendRead, ConnInfo, GatedConnection, HookedSession},
    held::{HeldStream, PendingSql},
    inject::Injector,
    judge::{database_of, encoding_is_modelled, Judge, Lexing},
    recover::Recovery,
    rewrite::DenialRef,
};
use crate::bpf::KernelGate;
use crate::{
    board::{RequestBoard, RequestEvent, RequestEventKind},
    capture::Segment,
    catalog::Catalogs,
    classify::Dialect,
    flow::{Direction, Flow, GateMode, Transport},
    policy::{self, DecisionCache, PolicyHandle, RowEstimator, Subject},
    store::requests::HookHold,
    wire::{ClientMessage, ConnId, Identity, ServerReport, SqlCarrier, Tracker, WireEvent},
};

/// What a pending SQL message needs to be decided and reported.
#[derive(Clone, Debug)]
pub struct SqlInfo {
    pub conn: ConnId,
    pub carrier: SqlCarrier,
    pub text: String,
    /// Held by the server hook: the stopped backend and how to refuse there.
    pub hook: Option<HookHold>,
}

/// Counts for logs and metrics.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GateStats {
    pub decided: u64,
    pub allowed: u64,
    pub held: u64,
    pub denied: u64,
    pub released_bytes: u64,
    pub inject_errors: u64,
    /// Re-injected bytes sent again because the client's copy of them was
    /// refused while the server had not acknowledged them.
    pub redelivered: u64,
    /// Stopped backends sent SIGCONT (server hook).
    pub backends_resumed: u64,
}

pub struct Gate {
    kernel: KernelGate,
    injector: Injector,
    judge: Judge,
    board: RequestBoard,
    runtime: tokio::runtime::Handle,
    /// Every connection the gate keeps something of.
    conns: HashMap<Flow, GatedConnection>,
    /// Connections whose stopped read the wire stage is decoding: filled by
    /// [`Gate::backend_stopped`], emptied by the next `after_segment`.
    decoding: Vec<Flow>,
    /// The requests the gate waits on, with what holds their statement.
    awaited: HashMap<i64, Awaited>,
    /// Requests a previous agent left pending (see `recover`).
    recovery: Recovery,
    /// When the host's socket table was last read for clients that closed
    /// while held (see [`Gate::withdraw_closed_local_clients`]).
    last_socket_look: Instant,
    /// When re-injected bytes were last checked against the server's
    /// acknowledgments ([`Gate::forget_acknowledged`]).
    last_ack_look: Instant,
    /// Server hook: backends stopped and not resumed yet, by pid.
    stopped: HashMap<u32, backend::StoppedBackend>,
    /// `gate.unreadable = "refuse"`: the program holds the TLS handshake of
    /// sessions it cannot read, and the gate resets them.
    refuse_encrypted_sessions: bool,
    /// Server hook: backends the program stopped that the agent heard
    /// nothing of at the last look (their record was lost).
    orphan_suspects: std::collections::HashSet<(u32, u64)>,
    /// Decisions for the store, taken by [`Gate::take_decided`].
    decided: Vec<crate::store::Decided>,
    stats: GateStats,
}

/// A request the gate waits on.
#[derive(Clone, Copy, Debug)]
struct Awaited {
    holder: Holder,
    /// Its statement may change the schema (`Some(creates_code)`): the
    /// catalog is read again if it is approved.
    schema: Option<bool>,
}

/// What holds a statement waiting for reviewers.
#[derive(Clone, Copy, Debug)]
enum Holder {
    /// The tc program, on this connection.
    Wire(Flow),
    /// The server hook: this stopped backend.
    Backend(u32),
}

/// What the gate does with a message, once ruled on.
enum Outcome {
    Allow,
    Deny {
        id: DenialRef,
        reason: String,
    },
    /// Held: this request decides.
    Wait {
        id: i64,
        schema: Option<bool>,
    },
    /// Not decided yet: a fact it needs is being read (`catalogs_changed`).
    Defer,
}

/// How long a held message may stay incomplete with the client silent
/// before it is judged on what was seen (see `PendingSql::incomplete`).
const STALL: Duration = Duration::from_millis(200);

/// The same refused copy is answered at most this often (a client's
/// retransmission timer starts at 200 ms).
const REDELIVER_EVERY: Duration = Duration::from_millis(100);

/// How often re-injected bytes are checked against the server's
/// acknowledgments, so what it has is not kept.
const ACK_LOOK_EVERY: Duration = Duration::from_millis(500);

/// Text decided in place of a statement not seen whole: it never parses, so
/// the policy's rule for unparseable statements applies.
const INCOMPLETE: &str = "-- qgate: statement not seen whole\n(";

/// Text decided in place of a FunctionCall message (libpq's fast path: a
/// function run by OID, with no SQL to read): qgate does not resolve the
/// OID yet, so it is judged as a statement qgate does not understand.
const FUNCTION_CALL: &str = "-- qgate: FunctionCall by OID, not resolved\n(";

fn subject_of(identity: &Identity, flow: &Flow) -> Subject {
    Subject {
        user: identity.user.clone(),
        database: identity.database.clone(),
        client_addr: Some(flow.client.ip()),
        application: identity.application.clone(),
    }
}

impl Gate {
    pub fn new(
        kernel: KernelGate,
        injector: Injector,
        policy: PolicyHandle,
        estimator: Box<dyn RowEstimator + Send + Sync>,
        board: RequestBoard,
        runtime: tokio::runtime::Handle,
        enforcing: bool,
    ) -> Self {
        Self {
            kernel,
            injector,
            judge: Judge {
                policy,
                cache: DecisionCache::default(),
                estimator,
                catalogs: None,
                enforcing,
            },
            board,
            runtime,
            conns: HashMap::default(),
            decoding: Vec::new(),
            awaited: HashMap::default(),
            recovery: Recovery::default(),
            last_socket_look: Instant::now(),
            last_ack_look: Instant::now(),
            stopped: HashMap::default(),
            orphan_suspects: std::collections::HashSet::new(),
            refuse_encrypted_sessions: false,
            decided: Vec::new(),
            stats: GateStats::default(),
        }
    }

    /// Judge with each database's catalog (user code, FunctionCall by OID).
    pub fn use_catalogs(&mut self, catalogs: Catalogs) {
        self.judge.catalogs = Some(catalogs);
    }

    /// What the wire stage identified of the connection.
    fn info(&self, flow: &Flow) -> Option<&ConnInfo> {
        self.conns.get(flow)?.info.as_ref()
    }

    fn info_mut(&mut self, flow: &Flow) -> Option<&mut ConnInfo> {
        self.conns.get_mut(flow)?.info.as_mut()
    }

    /// The connection's held bytes and undecided messages (tc path).
    fn held_mut(&mut self, flow: &Flow) -> Option<&mut HeldStream<SqlInfo>> {
        self.conns.get_mut(flow)?.held.as_mut()
    }

    /// The server hook's session on this connection.
    fn hook(&self, flow: &Flow) -> Option<HookedSession> {
        self.conns.get(flow)?.hook
    }

    /// The connection's record, made if it is new.
    fn record(&mut self, flow: Flow) -> &mut GatedConnection {
        self.conns.entry(flow).or_default()
    }

    /// Drops the connection's record once nothing of it is left: the one
    /// place records go.
    fn tidy(&mut self, flow: &Flow) {
        if self.conns.get(flow).is_some_and(GatedConnection::is_empty) {
            self.conns.remove(flow);
        }
    }

    /// What the gate decided since the last call, for the store's statement
    /// and request rows (the capture loop hands them to the writer).
    pub fn take_decided(&mut self) -> Vec<crate::store::Decided> {
        std::mem::take(&mut self.decided)
    }

    /// `gate.unreadable = "refuse"` in force (the program holds TLS handshakes).
    pub fn refuse_encrypted_sessions(&mut self, refuse: bool) {
        self.refuse_encrypted_sessions = refuse;
    }

    pub fn kernel(&mut self) -> &mut KernelGate {
        &mut self.kernel
    }

    pub fn stats(&self) -> GateStats {
        self.stats
    }

    /// Connections with held bytes or undecided statements, and stopped backends.
    pub fn holding(&self) -> usize {
        self.conns.values().filter(|c| c.held.is_some()).count() + self.stopped.len()
    }

    /// A connection the server hook reads (from its first segment on).
    pub fn hooked_session(
        &mut self,
        flow: Flow,
        pid: u32,
        client: Option<std::net::SocketAddr>,
        server: Option<std::net::SocketAddr>,
        transport: Transport,
    ) {
        self.record(flow).hook = Some(HookedSession {
            pid,
            client,
            server,
            transport,
        });
    }

    /// A hooked backend exited: nothing of it is held any more.
    pub fn backend_exited(&mut self, pid: u32, flow: Option<Flow>) {
        if let Some(flow) = flow {
            if let Some(c) = self.conns.get_mut(&flow) {
                c.hook = None;
                c.read = None;
            }
            self.tidy(&flow);
        }
        if let Some(b) = self.stopped.remove(&pid) {
            for w in b.waiting_requests() {
                self.awaited.remove(&w);
                if let Err(e) = self
                    .runtime
                    .block_on(self.board.withdraw(w, "the backend exited"))
                {
                    warn!("withdrawing request {w}: {e}");
                }
            }
        }
    }

    /// The client address as requests and the policy see it: none for a
    /// Unix-socket session.
    fn client_of(&self, flow: &Flow) -> Option<std::net::SocketAddr> {
        match self.hook(flow) {
            Some(session) => session.client,
            None => Some(flow.client),
        }
    }

    /// Before the wire stage sees a segment: keep the copy if it was held,
    /// and have the tracker report the connection's message boundaries.
    pub fn before_segment(&mut self, seg: &Segment, tracker: &mut Tracker) {
        if seg.direction != Direction::ToServer {
            return;
        }
        if seg.is_syn() {
            // A new connection on a reused address starts from scratch.
            if let Some(c) = self.conns.get_mut(&seg.flow) {
                c.released_until = None;
                c.delivered = None;
            }
            self.tidy(&seg.flow);
        }
        if seg.is_fin() || seg.is_rst() {
            // The client gave up on its held statement (closed or died) —
            // if the server would take it so: a FIN or RST outside what the
            // server can still receive (before the held bytes or past them,
            // a forged one) ends nothing.
            let held = self.conns.get(&seg.flow).and_then(|c| c.held.as_ref());
            let honoured = held.is_some_and(|s| {
                !held::seq_lt(seg.seq, s.base()) && !held::seq_lt(s.data_end(), seg.seq)
            });
            if honoured {
                self.withdraw(&seg.flow, "the client disconnected");
            }
        }
        if !seg.held || seg.payload.is_empty() {
            return;
        }
        let unreleased = match self.conns.get(&seg.flow) {
            Some(c) => c.unreleased(seg.seq, &seg.payload),
            None => Some((seg.seq, seg.payload.as_slice())),
        };
        let Some((seq, payload)) = unreleased else {
            debug!(flow = ?seg.flow, seq = seg.seq, "stale held copy ignored");
            return;
        };
        let encrypted = tracker
            .connection_id(&seg.flow)
            .filter(|c| tracker.is_encrypted(*c));
        let mysql_tls = encrypted.is_some_and(|c| tracker.is_mysql(c));
        let refuse_encrypted = self.refuse_encrypted_sessions;
        if self.refuse_encrypted_sessions && !mysql_tls {
            if let Some(conn) = encrypted {
                // Held only because the session turned encrypted.
                self.refuse_encrypted(&seg.flow, tracker, conn, seq);
                return;
            }
        }
        // A new hold starts where the kernel's does: bytes of this copy
        // before it went through already (the server has them, and they
        // may differ from this copy's), and a copy that arrived out of
        // order waits for the bytes before it.
        let base = match self.conns.get(&seg.flow) {
            Some(c) if c.held.is_some() => seq,
            known => {
                let base = self
                    .kernel
                    .state(&seg.flow)
                    .filter(|s| s.held != 0)
                    .map_or(seq, |s| s.hold_seq);
                // Never before what was re-injected already (its copies
                // are trimmed there, so a base before it never fills).
                match known.and_then(|c| c.released_until) {
                    Some(until) if held::seq_lt(base, until) => until,
                    _ => base,
                }
            }
        };
        let c = self.record(seg.flow);
        let stream = c.held.get_or_insert_with(|| HeldStream::new(base));
        stream.add_copy(seq, payload, &seg.tcp_header);
        if !mysql_tls && tracker.mysql_unread(&seg.flow) {
            // Held bytes of a MySQL conversation qgate stopped reading (it
            // failed, or the client quit): never released unread.
            self.reset_unreadable(
                &seg.flow,
                "qgate: the held bytes could not be read",
                "the MySQL conversation could not be read on",
            );
            return;
        }
        if mysql_tls && !refuse_encrypted {
            // `gate.unreadable = "allow"`: the SSL request and the TLS
            // bytes after it go through unread, as for PostgreSQL (the
            // connection is recorded as encrypted).
            self.let_encrypted_through(&seg.flow, tracker);
            return;
        }
        if mysql_tls {
            // MySQL's TLS starts right after its SSL request, which the
            // kernel holds with everything before a login is accepted:
            // `gate.unreadable = "refuse"` resets the connection (audited).
            self.reset_unreadable(
                &seg.flow,
                "qgate: an encrypted MySQL session cannot be read on this port",
                "the client asked for TLS on a gated MySQL port",
            );
            return;
        }
        if stream.held_bytes() > held::MAX_HELD {
            self.reset_unreadable(
                &seg.flow,
                "qgate: more than 16 MiB held on one connection",
                "more held bytes than qgate keeps for one connection",
            );
            return;
        }
        debug!(flow = ?seg.flow, seq, len = payload.len(), base = stream.base(), data_end = stream.data_end(), "held copy");
        c.last_copy = Some(Instant::now());
        tracker.watch(&seg.flow, true);
    }

    /// A MySQL session that turned to TLS, let through unread
    /// (`gate.unreadable = "allow"`): the kernel passes its bytes from now
    /// on (monitor mode), and what it held is re-injected as it came.
    fn let_encrypted_through(&mut self, flow: &Flow, tracker: &mut Tracker) {
        if let Err(e) = self.kernel.set_mysql_mode(flow, GateMode::Monitor, false) {
            warn!(?flow, "letting an encrypted MySQL session through: {e}");
        }
        if let Some(info) = self.info_mut(flow) {
            info.mode = Some(GateMode::Monitor);
            info.kernel_mode = Some(GateMode::Monitor);
        }
        if let Some(stream) = self.held_mut(flow) {
            let end = stream.data_end();
            stream.message_ends(end);
        }
        self.release(flow, tracker);
    }

    /// A copy the tc program refused (`Segment::refused`): the client sent
    /// bytes again that were let through and that the server has not
    /// acknowledged. When the agent re-injected them the server may have
    /// lost that copy: its TCP drops a segment whose timestamp is older
    /// than one it took since (PAWS: the re-injected copy carries the held
    /// copy's timestamp, and a later client segment may have passed while
    /// the statement was judged), or one its full receive buffer cannot
    /// take. The client keeps retransmitting and every copy is refused, so
    /// the connection would wait forever: the agent sends its own judged
    /// bytes again, under this copy's TCP header (the client's latest
    /// timestamp and acknowledgment). A copy of bytes the program let
    /// through itself stays refused (counted as `refused_segments`).
    pub fn on_refused(&mut self, seg: &Segment) {
        if seg.direction != Direction::ToServer || seg.tcp_header.is_empty() {
            return;
        }
        let acked = self
            .kernel
            .state(&seg.flow)
            .filter(|s| s.known & qgate_common::known::SERVER_ACK != 0)
            .map(|s| s.server_ack);
        let Some(c) = self.conns.get_mut(&seg.flow) else {
            return;
        };
        let Some(delivered) = c.delivered.as_mut() else {
            return;
        };
        if let Some(ack) = acked {
            delivered.acknowledged(ack);
        }
        if delivered
            .last
            .is_some_and(|(seq, t)| seq == seg.seq && t.elapsed() < REDELIVER_EVERY)
        {
            return;
        }
        // Only what this copy covers: no copy makes the agent send more
        // than it carries.
        let parts = delivered.overlapping(seg.seq, seg.payload.len());
        if parts.is_empty() {
            return;
        }
        info!(
            flow = ?seg.flow,
            copy = seg.seq,
            len = seg.payload.len(),
            ?acked,
            "re-delivering released bytes the server has not acknowledged"
        );
        for (seq, bytes) in parts {
            match self.injector.inject(&seg.flow, &seg.tcp_header, seq, bytes) {
                Ok(()) => self.stats.redelivered += 1,
                Err(e) => {
                    self.stats.inject_errors += 1;
                    warn!("re-delivering {} bytes at {seq}: {e}", bytes.len());
                }
            }
        }
        delivered.last = Some((seg.seq, Instant::now()));
    }

    /// Forgets re-injected bytes the server has acknowledged (at most every
    /// [`ACK_LOOK_EVERY`]: one map read per connection that has some).
    fn forget_acknowledged(&mut self) {
        if self.last_ack_look.elapsed() < ACK_LOOK_EVERY {
            return;
        }
        self.last_ack_look = Instant::now();
        let kernel = &self.kernel;
        let mut emptied = Vec::new();
        for (flow, c) in self.conns.iter_mut() {
            let Some(delivered) = c.delivered.as_mut() else {
                continue;
            };
            match kernel.state(flow) {
                Some(state) if state.known & qgate_common::known::SERVER_ACK != 0 => {
                    delivered.acknowledged(state.server_ack)
                }
                Some(_) => {}
                // The kernel forgot the flow: nothing of it is refused now.
                None => *delivered = Default::default(),
            }
            if delivered.is_empty() {
                c.delivered = None;
                emptied.push(*flow);
            }
        }
        for flow in emptied {
            self.tidy(&flow);
        }
    }

    /// Judges held messages the client stopped sending half-way: a statement
    /// longer than the client's congestion window cannot arrive whole while
    /// its first bytes are held, so after [`STALL`] it is decided as a
    /// statement not seen whole (unparseable: the policy's strictest case).
    pub fn tick(&mut self, tracker: &mut Tracker) {
        self.forget_acknowledged();
        self.watch_stopped();
        self.withdraw_unreturned();
        self.withdraw_closed_local_clients();
        let now = Instant::now();
        let stalled: Vec<Flow> =
            self.conns
                .iter()
                .filter(|(_, c)| {
                    c.held.as_ref().is_some_and(|s| {
                        !s.has_pending() && held::seq_lt(s.boundary(), s.data_end())
                    }) && c.last_copy.is_some_and(|t| now.duration_since(t) >= STALL)
                })
                .map(|(flow, _)| *flow)
                .collect();
        for flow in stalled {
            if self.pend_incomplete(&flow) {
                self.advance(&flow, tracker);
            }
        }
    }

    /// Turns the partial Query/Parse at the stream's boundary into a pending
    /// message; false when the held bytes are not one.
    fn pend_incomplete(&mut self, flow: &Flow) -> bool {
        if self.info(flow).is_some_and(|c| c.dialect == Dialect::Mysql) {
            // MySQL packets are held whole (no partial decision): a packet
            // the client stopped sending stays held until it gives up.
            return false;
        }
        let conn = self.info(flow).map(|c| c.conn).unwrap_or_default();
        let Some(stream) = self.held_mut(flow) else {
            return false;
        };
        let start = stream.boundary();
        let header = stream.peek(start, 5).to_vec();
        if header.len() < 5 || !matches!(header[0], b'Q' | b'P') {
            return false;
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let end = start.wrapping_add(1).wrapping_add(len);
        let held_end = stream.data_end();
        if !held::seq_lt(held_end, end) {
            return false;
        }
        let mut text_start = start.wrapping_add(5);
        if header[0] == b'P' {
            // Skip the statement name (a C string) if it is all there.
            let name = stream.peek(text_start, 256);
            match name.iter().position(|&b| b == 0) {
                Some(n) => text_start = text_start.wrapping_add(n as u32 + 1),
                None => return false,
            }
        }
        let prefix = String::from_utf8_lossy(stream.peek(text_start, usize::MAX)).into_owned();
        let seen = held_end.wrapping_sub(start);
        stream.push_sql(PendingSql {
            start,
            end,
            text_start,
            text_end: held_end,
            info: SqlInfo {
                conn,
                carrier: if header[0] == b'Q' {
                    SqlCarrier::Query
                } else {
                    SqlCarrier::Parse
                },
                text: format!(
                    "{prefix}\n-- [qgate: statement not seen whole: {seen} of {} bytes]",
                    len + 1
                ),
                hook: None,
            },
            request: None,
            incomplete: true,
            tail: false,
        });
        true
    }

    /// Every wire event: identities set the connection's mode, closes and
    /// cancels withdraw what the connection had waiting.
    pub fn on_event(&mut self, tracker: &Tracker, event: &WireEvent) {
        match event {
            WireEvent::Identified { conn, identity, .. } => {
                let Some(flow) = tracker.flow(*conn) else {
                    return;
                };
                let dialect = if tracker.is_mysql(*conn) {
                    Dialect::Mysql
                } else {
                    Dialect::Postgresql
                };
                let mut subject = subject_of(identity, &flow);
                subject.client_addr = self.client_of(&flow).map(|a| a.ip());
                // The agent's own catalog session: a one-time token, over a
                // Unix socket the server hook reads.
                let own = dialect == Dialect::Postgresql
                    && self.hook(&flow).is_some_and(|h| h.client.is_none())
                    && identity.application.as_deref().is_some_and(|app| {
                        self.judge
                            .catalogs
                            .as_ref()
                            .is_some_and(|c| c.consume_token(app))
                    });
                let mode = if self.judge.enforcing && !own {
                    policy::needs_gate(
                        &self.judge.policy.current(),
                        &subject,
                        dialect == Dialect::Mysql,
                    )
                } else {
                    GateMode::Monitor
                };
                let refused = mode == GateMode::Deny;
                if refused {
                    info!(
                        ?subject,
                        "connection refused by policy: its statements will be denied"
                    );
                }
                if let (Some(catalogs), false) = (
                    &self.judge.catalogs,
                    own || refused || dialect == Dialect::Mysql,
                ) {
                    catalogs.prefetch(&database_of(&subject));
                }
                // A MySQL session is identified again at each change of
                // user or database: what it learnt of the session stays.
                let before = self.info(&flow).filter(|i| i.conn == *conn);
                let mut lexing: Lexing = before.map(|i| i.lexing.clone()).unwrap_or_default();
                // A collation setting qgate cannot read (`COM_CHANGE_USER`'s)
                // counts as 0: not one that splits like ASCII.
                let collation = |key: &str| {
                    identity
                        .settings
                        .iter()
                        .find(|(k, _)| k == key)
                        .map(|(_, v)| v.parse::<u8>().unwrap_or(0))
                };
                // The login's collation, and the server's default, which
                // the session gets if the server does not know the login's
                // (MariaDB 10.11 and MySQL 8's 255): both must split text
                // like ASCII.
                let unmodelled = [
                    crate::wire::mysql::track::MYSQL_LOGIN_COLLATION,
                    crate::wire::mysql::track::MYSQL_SERVER_COLLATION,
                ]
                .into_iter()
                .filter_map(|key| collation(key).map(|id| (key, id)))
                .find(|(_, id)| !crate::wire::mysql::packet::collation_splits_like_ascii(*id));
                if let Some((key, id)) = unmodelled.filter(|_| dialect == Dialect::Mysql) {
                    // A multibyte character set (gbk, sjis, big5 …): a `\`
                    // or a quote may be a character's second byte, which
                    // qgate's reading does not model.
                    let whose = if key == crate::wire::mysql::track::MYSQL_LOGIN_COLLATION {
                        "the login's"
                    } else {
                        "the server's default"
                    };
                    lexing.encoding = Some(format!("{whose} collation {id}"));
                }
                let kernel_mode = before.and_then(|i| i.kernel_mode);
                self.record(flow).info = Some(ConnInfo {
                    conn: *conn,
                    subject,
                    refused,
                    settings: identity.settings.clone(),
                    mode: Some(mode),
                    lexing,
                    schema_changed: false,
                    own,
                    catalog_stale: false,
                    session_changed: false,
                    kernel_mode,
                    dialect,
                    prepared_judged: dialect == Dialect::Mysql && tracker.seen_from_start(*conn),
                    database_pending: false,
                    walk_paused: before.is_some_and(|i| i.walk_paused),
                });
                if own {
                    if let Some(pid) = self.hook(&flow).map(|h| h.pid) {
                        // Not followed from here on; resumed with its read.
                        self.kernel.ignore_backend(pid);
                    }
                } else {
                    self.apply_mode(&flow);
                    self.mysql_resume_walk(tracker, &flow);
                }
            }
            WireEvent::StatementCompleted { conn, .. } => {
                if let Some(flow) = tracker.flow(*conn) {
                    self.mysql_resume_walk(tracker, &flow);
                }
            }
            WireEvent::ServerReport { conn, report } => {
                let Some(flow) = tracker.flow(*conn) else {
                    return;
                };
                self.server_report(&flow, report);
                // (A MySQL login's OK reports its status first.)
                self.mysql_resume_walk(tracker, &flow);
            }
            WireEvent::Encrypted { conn, .. } => {
                if let Some(flow) = tracker.flow(*conn) {
                    self.wire_encrypted(&flow);
                }
            }
            WireEvent::Undecodable { conn, .. } | WireEvent::CaptureGap { conn, .. } => {
                let Some(flow) = tracker.flow(*conn) else {
                    return;
                };
                if let Some(BackendRead::Decoding { broken, .. }) =
                    self.conns.get_mut(&flow).and_then(|c| c.read.as_mut())
                {
                    *broken = true;
                }
                let mysql_unread = matches!(event, WireEvent::Undecodable { .. })
                    && self.info(&flow).is_some_and(|i| {
                        i.dialect == Dialect::Mysql && i.mode != Some(GateMode::Monitor)
                    });
                if mysql_unread {
                    // Nothing more passes on the kernel's word either: its
                    // next bytes are held, and reset (`before_segment`).
                    if let Some(info) = self.info_mut(&flow) {
                        info.kernel_mode = Some(GateMode::GateAll);
                    }
                    if let Err(e) = self.kernel.set_mode(&flow, GateMode::GateAll) {
                        warn!("setting the gate mode of {flow:?}: {e}");
                    }
                }
                if mysql_unread && self.held_mut(&flow).is_some() {
                    // A MySQL conversation qgate stopped reading (a command
                    // sent ahead of the server's answer to a login, a
                    // malformed packet, the compressed protocol): what the
                    // kernel holds of it is never released unread.
                    self.reset_unreadable(
                        &flow,
                        "qgate: the held bytes could not be read",
                        "the MySQL conversation could not be read on",
                    );
                    return;
                }
                if matches!(event, WireEvent::CaptureGap { .. }) && self.held_mut(&flow).is_some() {
                    // The wire stage gave up on bytes of a connection the
                    // kernel holds (a hole it could not wait for, a lost or
                    // truncated copy) and decodes on from past them: the
                    // held bytes may then fill in what it never decoded,
                    // and nothing of them may be released on its word. The
                    // connection is reset (audited); nothing held runs.
                    self.reset_unreadable(
                        &flow,
                        "qgate: the held bytes could not be read whole",
                        "the wire stage lost bytes of the held stream",
                    );
                }
            }
            WireEvent::ConnectionClosed { conn, .. } => {
                if let Some(pid) = tracker.flow(*conn).and_then(|f| self.stopped_pid(&f)) {
                    self.withdraw_backend(pid, "the client disconnected");
                }
                if let Some(flow) = tracker.flow(*conn) {
                    self.withdraw(&flow, "the client disconnected");
                    if let Some(c) = self.conns.get_mut(&flow) {
                        c.closed();
                    }
                    self.tidy(&flow);
                    self.kernel.forget(&flow);
                }
            }
            WireEvent::CancelRequested {
                backend_pid,
                secret_key,
                ..
            } => {
                // Only what the server would honour ends a request. A
                // stopped backend is left to the server: it checks the key
                // and signals the backend, and the pending SIGINT withdraws
                // the request (`watch_stopped`).
                if self.stopped.contains_key(backend_pid)
                    || !tracker.cancel_key_matches(*backend_pid, secret_key)
                {
                    return;
                }
                if let Some(flow) = tracker
                    .backend_connection(*backend_pid)
                    .and_then(|c| tracker.flow(c))
                {
                    self.withdraw(&flow, "the client cancelled it");
                }
            }
            _ => {}
        }
    }

    /// A MySQL connection the kernel holds everything of (a login or a
    /// `LOCAL INFILE` transfer was under way when it was last released)
    /// that is back at a command boundary with nothing held: the kernel
    /// reads its commands again (a first command longer than the client's
    /// window could not arrive whole otherwise).
    fn mysql_resume_walk(&mut self, tracker: &Tracker, flow: &Flow) {
        let Some(c) = self.conns.get_mut(flow) else {
            return;
        };
        let paused = c.info.as_ref().is_some_and(|i| i.walk_paused);
        if !paused || c.held.is_some() || tracker.mysql_at_command_boundary(flow) != Some(true) {
            return;
        }
        if let Some(info) = c.info.as_mut() {
            info.walk_paused = false;
        }
        if let Err(e) = self.kernel.resume_walk(flow) {
            warn!("resuming the kernel's walk of {flow:?}: {e}");
        }
    }

    /// ParameterStatus and ReadyForQuery: how the session reads text, and
    /// whether a schema change it made is committed (then visible to the
    /// catalog reader) or rolled back.
    fn server_report(&mut self, flow: &Flow, report: &ServerReport) {
        let Some(info) = self.info_mut(flow) else {
            return;
        };
        match report {
            ServerReport::Parameter { name, value } => {
                match name.as_str() {
                    "client_encoding" => {
                        info.lexing.encoding =
                            (!encoding_is_modelled(value)).then(|| value.clone());
                    }
                    "standard_conforming_strings" => {
                        info.lexing.backslashes = !value.eq_ignore_ascii_case("on");
                    }
                    crate::wire::mysql::track::MYSQL_NO_BACKSLASH_ESCAPES => {
                        // Once seen on, backslashes are read with care for
                        // the rest of the session.
                        info.lexing.sql_mode |= value == "on";
                    }
                    _ => return,
                }
                self.apply_mode(flow);
            }
            ServerReport::Ready { idle } => {
                if *idle && (info.schema_changed || info.catalog_stale) {
                    info.schema_changed = false;
                    info.catalog_stale = false;
                    let database = database_of(&info.subject);
                    self.invalidate_database(&database);
                }
            }
        }
    }

    /// After the wire stage processed a segment: place the reported
    /// messages in their held streams, decide, release.
    pub fn after_segment(&mut self, tracker: &mut Tracker) {
        let messages = tracker.take_client_messages();
        if messages.is_empty() && self.decoding.is_empty() {
            return;
        }
        let mut touched = Vec::new();
        let mut stopped: HashMap<Flow, Vec<ClientMessage>> = std::mem::take(&mut self.decoding)
            .into_iter()
            .map(|flow| (flow, Vec::new()))
            .collect();
        for m in messages {
            let flow = m.flow;
            if let Some(list) = stopped.get_mut(&flow) {
                list.push(m);
                continue;
            }
            if self.place(m) && !touched.contains(&flow) {
                touched.push(flow);
            }
        }
        for (flow, messages) in stopped {
            tracker.watch(&flow, false);
            self.decide_stopped(flow, messages);
        }
        for flow in touched {
            self.advance(&flow, tracker);
        }
    }

    /// Puts one message into its connection's held stream; false when the
    /// connection holds nothing or the message was released already.
    fn place(&mut self, m: ClientMessage) -> bool {
        debug!(flow = ?m.flow, seq = m.span.seq, len = m.span.len, sql = m.sql.is_some(), "client message");
        let Some(stream) = self.held_mut(&m.flow) else {
            return false;
        };
        let start = m.span.seq;
        let end = start.wrapping_add(m.span.len as u32);
        if !held::seq_lt(stream.base(), end) {
            return false;
        }
        // A Query or Parse that began before the held bytes is one the
        // kernel held by its end (its first bytes went to the server, which
        // runs nothing of a message before it has it whole): it is decided
        // here on its whole text, unless it was decided already. Any other
        // message that began before them was decided (or passed) already.
        let tail = held::seq_lt(start, stream.base());
        match m.sql {
            Some(sql) if !(tail && stream.decided(end)) => {
                let held_from = if tail { stream.base() } else { start };
                let text_end = sql.text_span.seq.wrapping_add(sql.text_span.len as u32);
                // The held part of the text (empty when the held end is
                // past it).
                let text_start = if held::seq_lt(sql.text_span.seq, held_from) {
                    held_from
                } else {
                    sql.text_span.seq
                };
                let text_start = if held::seq_lt(text_end, text_start) {
                    text_end
                } else {
                    text_start
                };
                stream.push_sql(PendingSql {
                    start: held_from,
                    end,
                    text_start,
                    text_end,
                    info: SqlInfo {
                        conn: m.conn,
                        carrier: sql.carrier,
                        text: sql.text,
                        hook: None,
                    },
                    request: None,
                    incomplete: false,
                    tail,
                });
            }
            _ => stream.message_ends(end),
        }
        true
    }

    /// Decides waiting messages in order until one needs reviewers, then
    /// releases what can go.
    fn advance(&mut self, flow: &Flow, tracker: &mut Tracker) {
        loop {
            let Some(stream) = self.held_mut(flow) else {
                return;
            };
            let Some(front) = stream.front() else {
                break;
            };
            if front.request.is_some() {
                break;
            }
            let front = front.clone();
            if front.info.carrier != SqlCarrier::Startup && self.catalog_pending(flow) {
                // Decided when the database's catalog is read (`catalogs_changed`).
                break;
            }
            match self.decide(flow, &front) {
                Outcome::Allow => {
                    if let Some(s) = self.held_mut(flow) {
                        s.allow_front();
                    }
                }
                Outcome::Deny { id, reason } => self.deny_front(flow, id, &reason),
                // Decided when the estimate arrives (`catalogs_changed`).
                Outcome::Defer => break,
                Outcome::Wait { id, schema } => {
                    if let Some(f) = self.held_mut(flow).and_then(|s| s.front()) {
                        f.request = Some(id);
                    }
                    self.awaited.insert(
                        id,
                        Awaited {
                            holder: Holder::Wire(*flow),
                            schema,
                        },
                    );
                    if let Some(event) = self.recovery.take_final(id) {
                        // Decided while the statement was on its way back.
                        self.on_request_event(&event, tracker);
                        return;
                    }
                    break;
                }
            }
        }
        self.release(flow, tracker);
    }

    /// Re-injects what is decided and tells the program where things stand.
    fn release(&mut self, flow: &Flow, tracker: &mut Tracker) {
        // MySQL: the kernel reads commands itself only while the server
        // will take the next packet for one.
        let walk = tracker.mysql_at_command_boundary(flow).unwrap_or(true);
        let Some(c) = self.conns.get_mut(flow) else {
            return;
        };
        let Some(stream) = c.held.as_mut() else {
            return;
        };
        let mut released_until = None;
        while let Some(r) = stream.take_release() {
            let end = r.seq.wrapping_add(r.bytes.len() as u32);
            released_until = Some(end);
            if let Err(e) = self.injector.inject(flow, &r.template, r.seq, &r.bytes) {
                self.stats.inject_errors += 1;
                warn!("re-injecting {} bytes at {}: {e}", r.bytes.len(), r.seq);
            }
            self.stats.released_bytes += r.bytes.len() as u64;
            c.delivered.get_or_insert_default().add(r.seq, &r.bytes);
            let still = r.more_held.then_some(end);
            debug!(
                ?flow,
                seq = r.seq,
                len = r.bytes.len(),
                next = r.next_header,
                ?still,
                "released"
            );
            if let Err(e) = self.kernel.release_with(flow, r.next_header, still, walk) {
                warn!("releasing in the kernel: {e}");
            }
        }
        let idle = stream.is_idle();
        if let Some(end) = released_until {
            c.released(end);
            if let Some(info) = c.info.as_mut() {
                info.walk_paused = !walk;
            }
        }
        if idle {
            c.drop_held();
            tracker.watch(flow, false);
        }
    }

    /// A request reached a final state: run or refuse what waited on it.
    pub fn on_request_event(&mut self, event: &RequestEvent, tracker: &mut Tracker) {
        if !event.kind.is_final() {
            return;
        }
        let Some(awaited) = self.awaited.remove(&event.request_id) else {
            self.recovery.keep_final(event);
            return;
        };
        if let Some(creates_code) = awaited
            .schema
            .filter(|_| event.kind == RequestEventKind::Approved)
        {
            let flow = match awaited.holder {
                Holder::Backend(pid) => self
                    .conns
                    .iter()
                    .find(|(_, c)| c.hook.is_some_and(|h| h.pid == pid))
                    .map(|(flow, _)| *flow),
                Holder::Wire(flow) => Some(flow),
            };
            if let Some(flow) = flow {
                self.schema_changed(&flow, creates_code);
            }
        }
        let flow = match awaited.holder {
            Holder::Backend(pid) => {
                let approved = event.kind == RequestEventKind::Approved;
                let reason = final_reason(event);
                self.backend_request_final(pid, event.request_id, approved, &reason);
                return;
            }
            Holder::Wire(flow) => flow,
        };
        let waiting = self
            .held_mut(&flow)
            .and_then(|s| s.front())
            .is_some_and(|f| f.request == Some(event.request_id));
        if !waiting {
            return;
        }
        match event.kind {
            RequestEventKind::Approved => {
                if let Some(s) = self.held_mut(&flow) {
                    s.allow_front();
                }
            }
            _ => {
                let reason = final_reason(event);
                self.deny_front(&flow, DenialRef::Request(event.request_id), &reason);
            }
        }
        self.advance(&flow, tracker);
    }
}

/// Why a request that did not end approved refuses its statement.
fn final_reason(event: &RequestEvent) -> String {
    match event.kind {
        RequestEventKind::Expired => "expired before a decision".to_string(),
        RequestEventKind::Withdrawn => "withdrawn".to_string(),
        _ => match event.request.closing.as_ref() {
            Some(c) => match &c.comment {
                Some(comment) => format!("denied by {}: {comment}", c.by),
                None => format!("denied by {}", c.by),
            },
            None => "denied".to_string(),
        },
    }
}
