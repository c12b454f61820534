//! One MySQL connection's two directions, read in the order they were
//! captured: the login, each statement (`COM_QUERY`, `COM_STMT_PREPARE`,
//! and `COM_STMT_EXECUTE` named by the text it prepared) and what the server
//! answered (OK with affected rows, ERR with code and SQLSTATE, a result
//! set with its rows counted).
//!
//! Commands are answered in order, so a command sent before the previous
//! answer (MariaDB's pipelined prepare + execute, a `COM_STMT_CLOSE`,
//! which has no answer) waits in a queue. A server packet means what the
//! command at the queue's front makes it mean; a client packet is a command
//! only when one is due: during the login, `COM_CHANGE_USER`'s exchange or
//! a `LOAD DATA LOCAL INFILE` transfer it is not, whatever its bytes say.
use std::collections::{HashMap, VecDeque};

use super::{
    packet::{self, caps, command, Command, Login, Reply, MORE_RESULTS},
    Frame, MysqlError,
};

/// What the conversation tells the rest of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MysqlEvent {
    Greeting {
        version: String,
        connection_id: u32,
    },
    /// The login the client sent (not yet accepted).
    Login {
        user: String,
        database: Option<String>,
        /// The client's `program_name` attribute (`mysql`, `mariadb`, …).
        program: Option<String>,
        /// The collation id it asked for (its character set); 0 when the
        /// server is MariaDB and that id is MySQL 8's 255, which MariaDB
        /// does not know and replaces with its global
        /// `character_set_client` (unseen by qgate).
        collation: u8,
        /// The server's default collation (its greeting's), which the
        /// session gets if the server does not know `collation`.
        server_collation: Option<u8>,
    },
    /// The server accepted the login (or a `COM_CHANGE_USER`).
    LoggedIn,
    LoginFailed {
        code: u16,
        message: String,
    },
    /// The client asked for TLS: nothing after this is readable.
    Encrypted,
    /// A statement the server is about to run.
    Statement {
        carrier: Carrier,
        /// `None` for an execute of a statement prepared before the capture.
        text: Option<String>,
        statement_id: Option<u32>,
    },
    /// A statement's result (one per result of a multi-statement query).
    /// (`more`: another result of the same command follows.)
    Completed {
        outcome: Outcome,
        more: bool,
    },
    /// `COM_INIT_DB` accepted: the session's database changed.
    Database {
        name: String,
    },
    /// `COM_CHANGE_USER` asked (accepted with the next `LoggedIn`).
    ChangeUser {
        user: String,
        database: Option<String>,
    },
    Quit,
    /// The server's status says backslashes do (false) or do not (true)
    /// escape in strings (`sql_mode` `NO_BACKSLASH_ESCAPES`); on a change.
    NoBackslashEscapes(bool),
    /// The stream stopped being decodable; nothing more is read from it.
    Undecodable {
        side: &'static str,
        error: MysqlError,
    },
}

/// What one client packet is to the gate: whether the server runs SQL
/// from it, and what may be released without a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientPacket {
    /// Not a command: the TLS request, authentication data the server
    /// asked for, a `LOCAL INFILE` file the server asked for. Nothing in it
    /// runs as SQL.
    Exchange,
    /// The login (`HandshakeResponse41`): the identity the policy judges;
    /// refused by rewriting it into a login no server accepts.
    Login { user: String },
    /// SQL text the server parses (`COM_QUERY`, `COM_STMT_PREPARE`), from
    /// payload byte `text_at` to the end.
    Sql {
        carrier: Carrier,
        text: String,
        text_at: usize,
    },
    /// A command that runs no SQL text of its own and changes nothing the
    /// policy judges: ping, quit, the execute, close, reset or fetch of a
    /// statement whose prepare was judged, set option, reset connection,
    /// statistics, field list.
    Plain,
    /// A command with an effect of its own (shutdown, kill, refresh, change
    /// user, replication, an execute of a statement prepared before qgate
    /// saw it, …): judged as `text`, the statement it amounts to (or a name
    /// the policy does not understand), refused by replacing its command
    /// byte with one the server does not take.
    Command { text: String },
    /// Not read: the conversation failed, turned encrypted or is over.
    /// Never released on qgate's word.
    Unread,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Carrier {
    Query,
    Prepare,
    Execute,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok {
        affected_rows: u64,
        rows: u64,
    },
    Error {
        code: u16,
        sqlstate: Option<String>,
        message: String,
    },
}

#[derive(Debug)]
enum Phase {
    /// The server's greeting is due.
    Greeting,
    /// The client's login (or SSL request) is due.
    Login,
    /// Authentication packets both ways until the server's OK or ERR.
    Auth,
    /// Commands and their answers.
    Commands,
    /// TLS, a quit, a failed login or an error: nothing more is read.
    Done,
}

/// Where an answer is.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// Its first packet is due.
    First,
    /// A result set's column definitions still to come, then (old style)
    /// their EOF.
    Columns {
        left: u64,
    },
    ColumnsEof,
    /// Rows, until the terminator.
    Rows {
        rows: u64,
    },
    /// `COM_STMT_PREPARE_OK` read: definitions still to come.
    PrepareDefs {
        left: u64,
    },
    /// A `LOCAL INFILE` file is being sent by the client; its next packet
    /// carries this sequence id.
    Infile {
        next_seq: u8,
    },
}

#[derive(Debug)]
struct Pending {
    command: Command,
    answer: Answer,
}

/// One connection's conversation.
#[derive(Debug)]
pub struct Conversation {
    phase: Phase,
    /// The client's capabilities (from its login); until known, assumed
    /// 4.1 with query attributes off.
    capabilities: u32,
    /// The login was seen (`capabilities` are the client's own).
    logged_in_here: bool,
    /// `CLIENT_DEPRECATE_EOF` in force: `None` until known (then learnt
    /// from the first result set's shape).
    deprecate_eof: Option<bool>,
    server_capabilities: Option<u32>,
    /// Both sides declared MariaDB's `CACHE_METADATA`: a column count is
    /// followed by a "metadata follows" byte.
    cache_metadata: bool,
    server_mariadb_capabilities: u32,
    /// The greeting's default collation.
    server_collation: Option<u8>,
    queue: VecDeque<Pending>,
    /// Prepared statements' texts by id, and the last one prepared.
    prepared: HashMap<u32, String>,
    last_prepared: Option<u32>,
    /// Prepares whose id is not known yet, in order.
    preparing: VecDeque<String>,
    /// During a login or `COM_CHANGE_USER`: the server asked the client for
    /// authentication data (an auth switch, more data) and the client has
    /// not answered. A client packet nobody asked for is a command sent
    /// ahead of the server's OK, which the server runs as one: never taken
    /// for authentication data.
    auth_asked: Option<u8>,
    /// The server's last word on `NO_BACKSLASH_ESCAPES` (OK/EOF status).
    no_backslash_escapes: Option<bool>,
}

impl Conversation {
    /// A connection seen from its start (the greeting is due).
    pub fn new() -> Self {
        Self::at(Phase::Greeting)
    }

    /// A connection first seen mid-session: commands are due.
    pub fn mid_stream() -> Self {
        Self::at(Phase::Commands)
    }

    fn at(phase: Phase) -> Self {
        Conversation {
            phase,
            capabilities: caps::PROTOCOL_41,
            logged_in_here: false,
            deprecate_eof: None,
            server_capabilities: None,
            cache_metadata: false,
            server_mariadb_capabilities: 0,
            server_collation: None,
            queue: VecDeque::new(),
            prepared: HashMap::new(),
            last_prepared: None,
            preparing: VecDeque::new(),
            auth_asked: None,
            no_backslash_escapes: None,
        }
    }

    /// The conversation is over (nothing more is read).
    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// No command waits for its answer.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    fn fail(&mut self, side: &'static str, error: MysqlError, out: &mut Vec<MysqlEvent>) {
        self.phase = Phase::Done;
        out.push(MysqlEvent::Undecodable { side, error });
    }

    /// A frame from the client, and what it is to the gate.
    pub fn client(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) -> ClientPacket {
        match self.phase {
            Phase::Done => ClientPacket::Unread,
            Phase::Greeting => {
                self.fail(
                    "client",
                    MysqlError::OutOfTurn("a packet before the server's greeting"),
                    out,
                );
                ClientPacket::Unread
            }
            Phase::Login => match packet::login(&frame.payload) {
                Ok(Login::Ssl { .. }) => {
                    self.phase = Phase::Done;
                    out.push(MysqlEvent::Encrypted);
                    ClientPacket::Exchange
                }
                Ok(Login::Response(login)) => {
                    self.capabilities = login.capabilities;
                    self.cache_metadata = login.mariadb_capabilities
                        & self.server_mariadb_capabilities
                        & packet::mariadb_caps::CACHE_METADATA
                        != 0;
                    self.logged_in_here = true;
                    self.deprecate_eof = Some(self.negotiated(caps::DEPRECATE_EOF));
                    if self.negotiated(caps::COMPRESS) {
                        self.fail(
                            "client",
                            MysqlError::Malformed {
                                packet: "login",
                                problem: "the compressed protocol is not decoded",
                            },
                            out,
                        );
                        return ClientPacket::Unread;
                    }
                    let user = login.user.clone();
                    let mariadb = self
                        .server_capabilities
                        .is_some_and(|c| c & packet::mariadb_caps::CLIENT_MYSQL == 0);
                    out.push(MysqlEvent::Login {
                        collation: if mariadb && login.collation == 255 {
                            0
                        } else {
                            login.collation
                        },
                        server_collation: self.server_collation,
                        program: login.attribute("program_name").map(str::to_owned),
                        user: login.user,
                        database: login.database.filter(|d| !d.is_empty()),
                    });
                    self.phase = Phase::Auth;
                    self.auth_asked = None;
                    ClientPacket::Login { user }
                }
                Err(e) => {
                    self.fail("client", e, out);
                    ClientPacket::Unread
                }
            },
            // Auth data (switch responses, public keys …): not read.
            Phase::Auth => self.auth_answer(frame, out),
            Phase::Commands => {
                if let Some(front) = self.queue.front() {
                    if let Answer::Infile { next_seq } = front.answer {
                        // The file's content; an empty packet ends it. Each
                        // in sequence: MariaDB reads only the header of a
                        // packet out of sequence and takes what follows it
                        // for a new packet.
                        if frame.seq != next_seq {
                            self.fail(
                                "client",
                                MysqlError::Sequence {
                                    expected: next_seq,
                                    got: frame.seq,
                                },
                                out,
                            );
                            return ClientPacket::Unread;
                        }
                        self.queue[0].answer = if frame.len == 0 {
                            Answer::First
                        } else {
                            Answer::Infile {
                                next_seq: next_seq.wrapping_add(physical_packets(frame)),
                            }
                        };
                        return ClientPacket::Exchange;
                    }
                    if matches!(front.command, Command::ChangeUser { .. }) {
                        // Its authentication exchange: not commands.
                        return self.auth_answer(frame, out);
                    }
                }
                self.command(frame, out)
            }
        }
    }

    /// Whether the kernel may pass commands on its own: the server reads
    /// the client's next packet as a command, or, during the login's
    /// authentication, as data that cannot become one (a failed login ends
    /// the connection; the kernel passes only packets with sequence id 0,
    /// which the conversation then refuses as not asked for: the connection
    /// is reset); and nothing released so far can make the server read a
    /// packet otherwise: no `COM_CHANGE_USER` (whose failed authentication
    /// keeps the session, and MariaDB takes the body of a packet out of
    /// sequence for the next command) or `LOCAL INFILE` transfer under way
    /// or possible (a pending text that names `INFILE`). Holding the login's
    /// exchange instead stalled a first command longer than the client's
    /// window (the kernel's tail hold needs the walk).
    pub fn at_command_boundary(&self) -> bool {
        matches!(self.phase, Phase::Commands | Phase::Auth)
            && self.queue.iter().all(|p| {
                !matches!(p.answer, Answer::Infile { .. })
                    && match &p.command {
                        Command::ChangeUser { .. } => false,
                        Command::Query { text } | Command::Prepare { text } => {
                            !crate::contains_ignoring_case(text, "infile")
                        }
                        _ => true,
                    }
            })
    }

    /// A client packet during an authentication exchange: data the server
    /// asked for, in sequence, or a command sent ahead of the server's
    /// answer (the server would run it as one if it accepts the login):
    /// the conversation fails rather than let it pass for data.
    fn auth_answer(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) -> ClientPacket {
        match self.auth_asked.take() {
            Some(seq) if seq == frame.seq => return ClientPacket::Exchange,
            Some(seq) => self.fail(
                "client",
                MysqlError::Sequence {
                    expected: seq,
                    got: frame.seq,
                },
                out,
            ),
            None => self.fail(
                "client",
                MysqlError::OutOfTurn("a packet the server did not ask for during authentication"),
                out,
            ),
        }
        ClientPacket::Unread
    }

    /// A server packet during an authentication exchange that asks the
    /// client for more: an auth switch (0xFE), or more data (0x01) other
    /// than caching_sha2's "fast authentication succeeded" (0x01 0x03),
    /// which an OK follows. The answer is due with the next sequence id.
    fn asks_for_auth_data(frame: &Frame) -> Option<u8> {
        let asks = match frame.payload.first() {
            Some(0xFE) => true,
            Some(0x01) => frame.payload != [0x01, 0x03],
            _ => false,
        };
        asks.then(|| frame.seq.wrapping_add(physical_packets(frame)))
    }

    /// The capabilities a command is read with: `CLIENT_QUERY_ATTRIBUTES`
    /// only when the server offered it too (MariaDB never does, and reads a
    /// COM_QUERY's text from its second byte whatever the client claims;
    /// unknown server: off).
    fn command_capabilities(&self) -> u32 {
        let server_has = self
            .server_capabilities
            .is_some_and(|s| s & caps::QUERY_ATTRIBUTES != 0);
        if server_has {
            self.capabilities
        } else {
            self.capabilities & !caps::QUERY_ATTRIBUTES
        }
    }

    /// Both sides have it (server capabilities unknown: the client's).
    fn negotiated(&self, flag: u32) -> bool {
        self.capabilities & self.server_capabilities.unwrap_or(u32::MAX) & flag != 0
    }

    fn command(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) -> ClientPacket {
        if frame.seq != 0 {
            self.fail(
                "client",
                MysqlError::Sequence {
                    expected: 0,
                    got: frame.seq,
                },
                out,
            );
            return ClientPacket::Unread;
        }
        let capabilities = self.command_capabilities();
        let command = match packet::command(&frame.payload, capabilities) {
            Ok(command) => command,
            Err(e) => {
                self.fail("client", e, out);
                return ClientPacket::Unread;
            }
        };
        let sql = |carrier, text: &String| ClientPacket::Sql {
            carrier,
            text: text.clone(),
            text_at: packet::text_at(&frame.payload, capabilities).unwrap_or(frame.payload.len()),
        };
        let (answered, packet) = match &command {
            Command::Query { text } => {
                out.push(MysqlEvent::Statement {
                    carrier: Carrier::Query,
                    text: Some(text.clone()),
                    statement_id: None,
                });
                (true, sql(Carrier::Query, text))
            }
            Command::Prepare { text } => {
                self.preparing.push_back(text.clone());
                out.push(MysqlEvent::Statement {
                    carrier: Carrier::Prepare,
                    text: Some(text.clone()),
                    statement_id: None,
                });
                (true, sql(Carrier::Prepare, text))
            }
            Command::Execute { statement_id } => {
                // MariaDB: id 0xFFFFFFFF is the statement prepared last.
                let id = if *statement_id == u32::MAX {
                    self.last_prepared
                } else {
                    Some(*statement_id)
                };
                let text = id.and_then(|id| self.prepared.get(&id).cloned());
                let packet = if text.is_some() {
                    ClientPacket::Plain
                } else {
                    ClientPacket::Command {
                        text: format!(
                            "COM_STMT_EXECUTE of statement {} prepared before qgate saw it",
                            id.map_or("?".to_owned(), |id| id.to_string())
                        ),
                    }
                };
                out.push(MysqlEvent::Statement {
                    carrier: Carrier::Execute,
                    text,
                    statement_id: id,
                });
                (true, packet)
            }
            Command::Close { statement_id } => {
                self.prepared.remove(statement_id);
                (false, ClientPacket::Plain)
            }
            Command::SendLongData { .. } => (false, ClientPacket::Plain),
            Command::Quit => {
                out.push(MysqlEvent::Quit);
                self.phase = Phase::Done;
                (false, ClientPacket::Plain)
            }
            Command::ChangeUser { user, database } => {
                out.push(MysqlEvent::ChangeUser {
                    user: user.clone(),
                    database: database.clone(),
                });
                self.auth_asked = None;
                let text = format!("COM_CHANGE_USER to '{user}'");
                (true, ClientPacket::Command { text })
            }
            Command::Other { code } => (true, other_command(*code, &frame.payload)),
            // Judged as the USE it is: the gate follows the database the
            // statements after it are judged in.
            Command::InitDb { database } => (
                true,
                ClientPacket::Command {
                    text: format!("USE `{}`", database.replace('`', "``")),
                },
            ),
            Command::Reset { .. } | Command::Fetch { .. } | Command::Ping => {
                (true, ClientPacket::Plain)
            }
        };
        if answered {
            self.queue.push_back(Pending {
                command,
                answer: Answer::First,
            });
        }
        packet
    }

    /// A frame from the server.
    pub fn server(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) {
        match self.phase {
            Phase::Done => {}
            Phase::Greeting => {
                if frame.payload.first() == Some(&0xFF) {
                    // Refused before the handshake (too many connections, host blocked).
                    if let Ok(Reply::Err { code, message, .. }) =
                        packet::reply(&frame.payload, frame.len)
                    {
                        out.push(MysqlEvent::LoginFailed { code, message });
                    }
                    self.phase = Phase::Done;
                    return;
                }
                match packet::greeting(&frame.payload) {
                    Ok(g) => {
                        self.server_capabilities = Some(g.capabilities);
                        self.server_mariadb_capabilities = g.mariadb_capabilities;
                        self.server_collation = g.collation;
                        out.push(MysqlEvent::Greeting {
                            version: g.version,
                            connection_id: g.connection_id,
                        });
                        self.phase = Phase::Login;
                    }
                    Err(e) => self.fail("server", e, out),
                }
            }
            Phase::Login => self.fail(
                "server",
                MysqlError::OutOfTurn("a server packet before the client's login"),
                out,
            ),
            Phase::Auth => self.auth_reply(frame, out),
            Phase::Commands => self.answer(frame, out),
        }
    }

    fn auth_reply(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) {
        match frame.payload.first() {
            Some(0x00) => {
                out.push(MysqlEvent::LoggedIn);
                if let Ok(Reply::Ok { status, .. }) = packet::reply(&frame.payload, frame.len) {
                    self.note_status(status, out);
                }
                self.phase = Phase::Commands;
            }
            Some(0xFF) => {
                if let Ok(Reply::Err { code, message, .. }) =
                    packet::reply(&frame.payload, frame.len)
                {
                    out.push(MysqlEvent::LoginFailed { code, message });
                }
                self.phase = Phase::Done;
            }
            // Auth switch (0xFE), more data (0x01): the exchange goes on.
            _ => self.auth_asked = Self::asks_for_auth_data(frame),
        }
    }

    fn answer(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) {
        let Some(front) = self.queue.front() else {
            self.fail(
                "server",
                MysqlError::OutOfTurn("a server packet no command asked for"),
                out,
            );
            return;
        };
        if frame.payload.starts_with(&[0xFF, 0xFF, 0xFF]) {
            // MariaDB's progress report (an ERR with code 0xFFFF, sent to
            // clients with MARIADB_CLIENT_PROGRESS during LOAD DATA, ALTER
            // TABLE …): not an answer; the real one follows.
            return;
        }
        if let Command::ChangeUser { .. } = front.command {
            // The same exchange as a login.
            match frame.payload.first() {
                Some(0x00) => {
                    self.queue.pop_front();
                    out.push(MysqlEvent::LoggedIn);
                }
                Some(0xFF) => {
                    self.queue.pop_front();
                    if let Ok(Reply::Err { code, message, .. }) =
                        packet::reply(&frame.payload, frame.len)
                    {
                        out.push(MysqlEvent::LoginFailed { code, message });
                    }
                }
                _ => self.auth_asked = Self::asks_for_auth_data(frame),
            }
            return;
        }
        let first = frame.payload.first().copied();
        let result = match front.answer {
            Answer::First => self.first_reply(frame, out),
            Answer::Columns { left } => {
                self.queue[0].answer = if left > 1 {
                    Answer::Columns { left: left - 1 }
                } else if self.deprecate_eof == Some(true) {
                    Answer::Rows { rows: 0 }
                } else {
                    Answer::ColumnsEof
                };
                Ok(())
            }
            Answer::ColumnsEof => {
                // An EOF_Packet is 5 bytes (1 before 4.1); an OK that ends
                // an empty result set in the new style is 7 or more.
                let eof = first == Some(0xFE) && frame.len < 7;
                match (eof, self.deprecate_eof) {
                    (true, _) => {
                        self.deprecate_eof = Some(false);
                        self.queue[0].answer = Answer::Rows { rows: 0 };
                        Ok(())
                    }
                    (false, None) => {
                        // No EOF after the definitions: the new style; this
                        // packet is the first row or the terminator.
                        self.deprecate_eof = Some(true);
                        self.queue[0].answer = Answer::Rows { rows: 0 };
                        return self.answer(frame, out);
                    }
                    (false, Some(_)) => Err(MysqlError::Malformed {
                        packet: "result set",
                        problem: "no EOF after the column definitions",
                    }),
                }
            }
            Answer::Rows { rows } => {
                let new_style = self.deprecate_eof == Some(true);
                let terminator = first == Some(0xFE)
                    && if new_style {
                        frame.len < super::MAX_PAYLOAD
                    } else {
                        frame.len < 9
                    };
                if terminator {
                    let read = if new_style {
                        packet::ok(&frame.payload)
                    } else {
                        packet::reply(&frame.payload, frame.len)
                    };
                    let status = match read {
                        Ok(Reply::Ok { status, .. } | Reply::Eof { status }) => status,
                        _ => 0,
                    };
                    self.complete(
                        Outcome::Ok {
                            affected_rows: 0,
                            rows,
                        },
                        status,
                        out,
                    );
                } else if first == Some(0xFF) {
                    self.error(frame, out);
                } else {
                    self.queue[0].answer = Answer::Rows { rows: rows + 1 };
                }
                Ok(())
            }
            Answer::PrepareDefs { left } => {
                if left <= 1 {
                    self.prepared_ok(out);
                } else {
                    self.queue[0].answer = Answer::PrepareDefs { left: left - 1 };
                }
                Ok(())
            }
            Answer::Infile { .. } => Err(MysqlError::OutOfTurn(
                "the server answered during a LOCAL INFILE transfer",
            )),
        };
        if let Err(e) = result {
            self.fail("server", e, out);
        }
    }

    /// The first packet of an answer.
    fn first_reply(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) -> Result<(), MysqlError> {
        let front = self.queue.front().expect("checked by the caller");
        if let Command::Prepare { .. } = front.command {
            if frame.payload.first() == Some(&0xFF) {
                self.preparing.pop_front();
                self.error(frame, out);
                return Ok(());
            }
            let (id, columns, params) = packet::prepare_ok(&frame.payload)?;
            if let Some(text) = self.preparing.pop_front() {
                self.prepared.insert(id, text);
            }
            self.last_prepared = Some(id);
            // Definitions, each list followed by an EOF in the old style.
            let old = u64::from(self.deprecate_eof != Some(true));
            let defs = |n: u16| if n > 0 { u64::from(n) + old } else { 0 };
            let left = defs(columns) + defs(params);
            if left == 0 {
                self.prepared_ok(out);
            } else {
                self.queue[0].answer = Answer::PrepareDefs { left };
            }
            return Ok(());
        }
        match packet::reply(&frame.payload, frame.len)? {
            Reply::Ok {
                affected_rows,
                status,
                ..
            } => {
                if let Command::InitDb { database } = &front.command {
                    out.push(MysqlEvent::Database {
                        name: database.clone(),
                    });
                }
                let statement = matches!(
                    front.command,
                    Command::Query { .. } | Command::Execute { .. }
                );
                if statement {
                    self.complete(
                        Outcome::Ok {
                            affected_rows,
                            rows: 0,
                        },
                        status,
                        out,
                    );
                } else {
                    self.queue.pop_front();
                }
            }
            Reply::Err { .. } => self.error(frame, out),
            Reply::Eof { .. } => {
                // COM_FIELD_LIST's end, a COM_STMT_FETCH without rows …
                self.queue.pop_front();
            }
            Reply::LocalInfile { .. } => {
                if self.logged_in_here && self.capabilities & caps::LOCAL_FILES == 0 {
                    return Err(MysqlError::OutOfTurn(
                        "a LOCAL INFILE request the client did not offer to serve",
                    ));
                }
                self.queue[0].answer = Answer::Infile {
                    next_seq: frame.seq.wrapping_add(physical_packets(frame)),
                };
            }
            Reply::Data => match front.command {
                Command::Query { .. } | Command::Execute { .. } => {
                    let mut f = packet::Fields::new(&frame.payload, "column count");
                    let columns = f.lenenc()?.unwrap_or(0);
                    if columns == 0 {
                        return Err(MysqlError::Malformed {
                            packet: "result set",
                            problem: "zero columns",
                        });
                    }
                    // MariaDB's metadata cache: 0 = no column definitions
                    // follow (their EOF still does, in the old style).
                    let skipped = self.cache_metadata && f.u8()? == 0;
                    self.queue[0].answer = match (skipped, self.deprecate_eof) {
                        (false, _) => Answer::Columns { left: columns },
                        (true, Some(true)) => Answer::Rows { rows: 0 },
                        (true, _) => Answer::ColumnsEof,
                    };
                }
                Command::Other {
                    code: command::FIELD_LIST,
                } => {
                    // Column definitions until the EOF.
                }
                _ => {
                    // COM_STATISTICS's string and the like: one packet.
                    self.queue.pop_front();
                }
            },
        }
        Ok(())
    }

    /// A prepare's answer is complete.
    fn prepared_ok(&mut self, out: &mut Vec<MysqlEvent>) {
        self.queue.pop_front();
        out.push(MysqlEvent::Completed {
            outcome: Outcome::Ok {
                affected_rows: 0,
                rows: 0,
            },
            more: false,
        });
    }

    fn error(&mut self, frame: &Frame, out: &mut Vec<MysqlEvent>) {
        let Ok(Reply::Err {
            code,
            sqlstate,
            message,
        }) = packet::reply(&frame.payload, frame.len)
        else {
            return;
        };
        let statement = self.queue.front().is_some_and(|p| {
            matches!(
                p.command,
                Command::Query { .. } | Command::Prepare { .. } | Command::Execute { .. }
            )
        });
        // An error ends the command, the rest of a multi-statement query included.
        self.queue.pop_front();
        if statement {
            out.push(MysqlEvent::Completed {
                outcome: Outcome::Error {
                    code,
                    sqlstate,
                    message,
                },
                more: false,
            });
        }
    }

    /// One result of the command at the front; the command ends unless the
    /// server says more results follow.
    fn complete(&mut self, outcome: Outcome, status: u16, out: &mut Vec<MysqlEvent>) {
        self.note_status(status, out);
        let more = status & MORE_RESULTS != 0;
        out.push(MysqlEvent::Completed { outcome, more });
        if more {
            if let Some(front) = self.queue.front_mut() {
                front.answer = Answer::First;
            }
        } else {
            self.queue.pop_front();
        }
    }
}

impl Conversation {
    /// `SERVER_STATUS_NO_BACKSLASH_ESCAPES` in an OK or EOF: the session's
    /// `sql_mode` (its own, or the server's global one) ends a string at a
    /// quote after a backslash. Reported when it changes.
    fn note_status(&mut self, status: u16, out: &mut Vec<MysqlEvent>) {
        let on = status & NO_BACKSLASH_ESCAPES != 0;
        if self.no_backslash_escapes != Some(on) {
            self.no_backslash_escapes = Some(on);
            out.push(MysqlEvent::NoBackslashEscapes(on));
        }
    }
}

/// `SERVER_STATUS_NO_BACKSLASH_ESCAPES`.
const NO_BACKSLASH_ESCAPES: u16 = 0x0200;

impl Default for Conversation {
    fn default() -> Self {
        Self::new()
    }
}

/// A command without SQL text (`Command::Other`) as the gate sees it: the
/// ones that only read or change the session's own protocol state pass,
/// the others are judged as the statement they amount to.
fn other_command(code: u8, payload: &[u8]) -> ClientPacket {
    use packet::command as c;
    let text = match code {
        c::FIELD_LIST | c::STATISTICS | c::SET_OPTION | c::RESET_CONNECTION => {
            return ClientPacket::Plain
        }
        // COM_PROCESS_INFO: the process list.
        0x0a => "SHOW PROCESSLIST".to_owned(),
        c::PROCESS_KILL => match payload.get(1..5) {
            Some(id) => format!("KILL {}", u32::from_le_bytes([id[0], id[1], id[2], id[3]])),
            None => "KILL".to_owned(),
        },
        0x08 => "SHUTDOWN".to_owned(),
        // The rest have no SQL spelling the policy reads: named, and so
        // not understood (held by the shipped policy).
        0x00 => "COM_SLEEP".to_owned(),
        0x05 => format!("COM_CREATE_DB {}", String::from_utf8_lossy(&payload[1..])),
        0x06 => format!("COM_DROP_DB {}", String::from_utf8_lossy(&payload[1..])),
        0x07 => "COM_REFRESH".to_owned(),
        0x0b => "COM_CONNECT".to_owned(),
        0x0d => "COM_DEBUG".to_owned(),
        0x0f => "COM_TIME".to_owned(),
        0x10 => "COM_DELAYED_INSERT".to_owned(),
        c::BINLOG_DUMP | 0x1e => "COM_BINLOG_DUMP".to_owned(),
        0x13 => "COM_TABLE_DUMP".to_owned(),
        0x14 => "COM_CONNECT_OUT".to_owned(),
        0x15 => "COM_REGISTER_SLAVE".to_owned(),
        0x1d => "COM_DAEMON".to_owned(),
        other => format!("COM_{other:#04x}"),
    };
    ClientPacket::Command { text }
}

/// How many physical packets a logical one took (a payload of 16 MiB − 1 or
/// more is continued): the sequence id after it is its first one's plus this.
fn physical_packets(frame: &Frame) -> u8 {
    (frame.len / super::MAX_PAYLOAD + 1) as u8
}
