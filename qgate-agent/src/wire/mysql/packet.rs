//! The fields of one MySQL packet. Which layout a payload has depends on
//! the conversation's state (`conversation`); these functions only read it.
use super::MysqlError;

/// Capability flags (`CLIENT_*`) this decoder reads.
pub mod caps {
    pub const CONNECT_WITH_DB: u32 = 1 << 3;
    pub const COMPRESS: u32 = 1 << 5;
    pub const LOCAL_FILES: u32 = 1 << 7;
    pub const PROTOCOL_41: u32 = 1 << 9;
    pub const SSL: u32 = 1 << 11;
    pub const SECURE_CONNECTION: u32 = 1 << 15;
    pub const MULTI_STATEMENTS: u32 = 1 << 16;
    pub const PLUGIN_AUTH: u32 = 1 << 19;
    pub const CONNECT_ATTRS: u32 = 1 << 20;
    pub const PLUGIN_AUTH_LENENC_CLIENT_DATA: u32 = 1 << 21;
    pub const DEPRECATE_EOF: u32 = 1 << 24;
    pub const QUERY_ATTRIBUTES: u32 = 1 << 27;
}

/// Command bytes (`COM_*`).
pub mod command {
    pub const QUIT: u8 = 0x01;
    pub const INIT_DB: u8 = 0x02;
    pub const QUERY: u8 = 0x03;
    pub const FIELD_LIST: u8 = 0x04;
    pub const STATISTICS: u8 = 0x09;
    pub const PROCESS_KILL: u8 = 0x0c;
    pub const PING: u8 = 0x0e;
    pub const CHANGE_USER: u8 = 0x11;
    pub const BINLOG_DUMP: u8 = 0x12;
    pub const STMT_PREPARE: u8 = 0x16;
    pub const STMT_EXECUTE: u8 = 0x17;
    pub const STMT_SEND_LONG_DATA: u8 = 0x18;
    pub const STMT_CLOSE: u8 = 0x19;
    pub const STMT_RESET: u8 = 0x1a;
    pub const SET_OPTION: u8 = 0x1b;
    pub const STMT_FETCH: u8 = 0x1c;
    pub const RESET_CONNECTION: u8 = 0x1f;
}

/// `SERVER_MORE_RESULTS_EXISTS`: another result of the same command follows.
pub const MORE_RESULTS: u16 = 0x0008;

/// A reader over a payload; every read is checked.
pub(crate) struct Fields<'a> {
    bytes: &'a [u8],
    packet: &'static str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(bytes: &'a [u8], packet: &'static str) -> Self {
        Fields { bytes, packet }
    }

    fn short(&self) -> MysqlError {
        MysqlError::Malformed {
            packet: self.packet,
            problem: "it ends before its fields do",
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], MysqlError> {
        if self.bytes.len() < n {
            return Err(self.short());
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, MysqlError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, MysqlError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, MysqlError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A length-encoded integer; `None` for the NULL marker (`0xFB`).
    pub(crate) fn lenenc(&mut self) -> Result<Option<u64>, MysqlError> {
        let first = self.u8()?;
        let n = match first {
            0..=0xFA => return Ok(Some(u64::from(first))),
            0xFB => return Ok(None),
            0xFC => 2,
            0xFD => 3,
            0xFE => 8,
            0xFF => {
                return Err(MysqlError::Malformed {
                    packet: self.packet,
                    problem: "0xFF is not a length-encoded integer",
                })
            }
        };
        let b = self.take(n)?;
        Ok(Some(
            b.iter()
                .rev()
                .fold(0u64, |acc, &byte| acc << 8 | u64::from(byte)),
        ))
    }

    /// A length-encoded string (NULL is refused where a string must be).
    pub(crate) fn lenenc_bytes(&mut self) -> Result<&'a [u8], MysqlError> {
        let len = self.lenenc()?.ok_or(MysqlError::Malformed {
            packet: self.packet,
            problem: "NULL where a string is due",
        })?;
        let len = usize::try_from(len).map_err(|_| self.short())?;
        self.take(len)
    }

    /// A NUL-terminated string.
    pub(crate) fn cstr(&mut self) -> Result<&'a [u8], MysqlError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(MysqlError::Malformed {
                packet: self.packet,
                problem: "a string has no NUL terminator",
            })?;
        let s = &self.bytes[..end];
        self.bytes = &self.bytes[end + 1..];
        Ok(s)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `Protocol::HandshakeV10`: the server's first packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Greeting {
    pub version: String,
    pub connection_id: u32,
    pub capabilities: u32,
    /// MariaDB's extended capabilities (the last 4 of the 10 reserved bytes,
    /// read only from a server without `CLIENT_MYSQL`); 0 otherwise.
    pub mariadb_capabilities: u32,
    /// The low byte of the server's default collation id: what a session
    /// gets when its login names a collation the server does not know
    /// (MariaDB 10.11 does not know MySQL 8's 255); `None` from a server
    /// too old to send it.
    pub collation: Option<u8>,
}

/// MariaDB's extended capability bits (MariaDB's "Client/Server Protocol",
/// "MariaDB Protocol Differences with MySQL").
pub mod mariadb_caps {
    /// `CLIENT_MYSQL` (bit 0 of the classic capabilities, also
    /// `CLIENT_LONG_PASSWORD`): set by MySQL peers; MariaDB's extended
    /// capabilities are read only when it is not.
    pub const CLIENT_MYSQL: u32 = 1;
    /// `MARIADB_CLIENT_CACHE_METADATA` (bit 36, 4 of the extended word): a
    /// result set's column count is followed by a "metadata follows" byte,
    /// and when it is 0 the column definitions are not sent.
    pub const CACHE_METADATA: u32 = 1 << 4;
}

pub fn greeting(payload: &[u8]) -> Result<Greeting, MysqlError> {
    let mut f = Fields::new(payload, "server greeting");
    let protocol = f.u8()?;
    if protocol != 10 {
        return Err(MysqlError::Malformed {
            packet: "server greeting",
            problem: "not protocol version 10",
        });
    }
    let version = text(f.cstr()?);
    let connection_id = f.u32()?;
    f.take(8 + 1)?;
    let low = u32::from(f.u16()?);
    // Older servers end here.
    let (high, collation) = if f.is_empty() {
        (0, None)
    } else {
        let collation = f.u8()?;
        f.take(2)?;
        (u32::from(f.u16()?), Some(collation))
    };
    let capabilities = low | high << 16;
    // Auth data length, 6 reserved bytes, then MariaDB's 4.
    let mariadb_capabilities = match (f.take(1 + 6), f.u32()) {
        (Ok(_), Ok(extended)) if capabilities & mariadb_caps::CLIENT_MYSQL == 0 => extended,
        _ => 0,
    };
    Ok(Greeting {
        version,
        connection_id,
        capabilities,
        mariadb_capabilities,
        collation,
    })
}

/// `Protocol::HandshakeResponse41` (the login) or `Protocol::SSLRequest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Login {
    /// The client asks for TLS: what follows is unreadable.
    Ssl {
        capabilities: u32,
    },
    Response(LoginResponse),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub capabilities: u32,
    /// The collation id the client asked for: the session's character set.
    pub collation: u8,
    /// MariaDB's extended capabilities (the last 4 of the 23 filler bytes,
    /// from a client without `CLIENT_MYSQL`); 0 otherwise.
    pub mariadb_capabilities: u32,
    pub user: String,
    pub database: Option<String>,
    pub auth_plugin: Option<String>,
    /// Connection attributes (`program_name`, `_client_name`, …).
    pub attributes: Vec<(String, String)>,
}

impl LoginResponse {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

pub fn login(payload: &[u8]) -> Result<Login, MysqlError> {
    let mut f = Fields::new(payload, "login");
    let capabilities = f.u32()?;
    if capabilities & caps::PROTOCOL_41 == 0 {
        // HandshakeResponse320: no server this decoder gates still takes it.
        return Err(MysqlError::Malformed {
            packet: "login",
            problem: "a pre-4.1 handshake response",
        });
    }
    f.take(4)?;
    let collation = f.u8()?;
    f.take(19)?;
    let extended = f.u32()?;
    let mariadb_capabilities = if capabilities & mariadb_caps::CLIENT_MYSQL == 0 {
        extended
    } else {
        0
    };
    // MariaDB turns to TLS on the capability alone, whatever follows it in
    // the packet (a full login with the bit set is followed by a TLS
    // handshake, and the real login inside it).
    if capabilities & caps::SSL != 0 {
        return Ok(Login::Ssl { capabilities });
    }
    let user = text(f.cstr()?);
    if capabilities & caps::PLUGIN_AUTH_LENENC_CLIENT_DATA != 0 {
        f.lenenc_bytes()?;
    } else if capabilities & caps::SECURE_CONNECTION != 0 {
        let n = f.u8()?;
        f.take(usize::from(n))?;
    } else {
        f.cstr()?;
    }
    let database = if capabilities & caps::CONNECT_WITH_DB != 0 && !f.is_empty() {
        Some(text(f.cstr()?))
    } else {
        None
    };
    let auth_plugin = if capabilities & caps::PLUGIN_AUTH != 0 && !f.is_empty() {
        Some(text(f.cstr()?))
    } else {
        None
    };
    let mut attributes = Vec::new();
    if capabilities & caps::CONNECT_ATTRS != 0 && !f.is_empty() {
        let mut attrs = Fields::new(f.lenenc_bytes()?, "login attributes");
        while !attrs.is_empty() {
            let key = text(attrs.lenenc_bytes()?);
            let value = text(attrs.lenenc_bytes()?);
            attributes.push((key, value));
        }
    }
    Ok(Login::Response(LoginResponse {
        capabilities,
        collation,
        mariadb_capabilities,
        user,
        database,
        auth_plugin,
        attributes,
    }))
}

/// A command from the client (the first packet of each exchange).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Quit,
    InitDb {
        database: String,
    },
    /// `COM_QUERY`: one or more statements (with `CLIENT_MULTI_STATEMENTS`).
    Query {
        text: String,
    },
    Prepare {
        text: String,
    },
    Execute {
        statement_id: u32,
    },
    SendLongData {
        statement_id: u32,
    },
    Close {
        statement_id: u32,
    },
    Reset {
        statement_id: u32,
    },
    Fetch {
        statement_id: u32,
    },
    ChangeUser {
        user: String,
        /// The database it names (`None` when it names none, or when the
        /// packet's tail is not in the 4.1 layout).
        database: Option<String>,
    },
    Ping,
    /// Anything else the server knows (statistics, kill, set option, …):
    /// no SQL text, answered with one OK, ERR or EOF-like packet.
    Other {
        code: u8,
    },
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Quit => "COM_QUIT",
            Command::InitDb { .. } => "COM_INIT_DB",
            Command::Query { .. } => "COM_QUERY",
            Command::Prepare { .. } => "COM_STMT_PREPARE",
            Command::Execute { .. } => "COM_STMT_EXECUTE",
            Command::SendLongData { .. } => "COM_STMT_SEND_LONG_DATA",
            Command::Close { .. } => "COM_STMT_CLOSE",
            Command::Reset { .. } => "COM_STMT_RESET",
            Command::Fetch { .. } => "COM_STMT_FETCH",
            Command::ChangeUser { .. } => "COM_CHANGE_USER",
            Command::Ping => "COM_PING",
            Command::Other { .. } => "command",
        }
    }
}

/// Reads a command packet. `capabilities` are the client's (query
/// attributes change `COM_QUERY`'s layout).
pub fn command(payload: &[u8], capabilities: u32) -> Result<Command, MysqlError> {
    let mut f = Fields::new(payload, "command");
    let code = f.u8()?;
    let id = |f: &mut Fields<'_>| f.u32();
    Ok(match code {
        command::QUIT => Command::Quit,
        command::INIT_DB => Command::InitDb {
            database: text(f.rest()),
        },
        command::QUERY => {
            if capabilities & caps::QUERY_ATTRIBUTES != 0 {
                let mut q = Fields::new(f.rest(), "COM_QUERY");
                skip_query_attributes(&mut q)?;
                Command::Query {
                    text: text(q.rest()),
                }
            } else {
                Command::Query {
                    text: text(f.rest()),
                }
            }
        }
        command::STMT_PREPARE => Command::Prepare {
            text: text(f.rest()),
        },
        command::STMT_EXECUTE => Command::Execute {
            statement_id: id(&mut f)?,
        },
        command::STMT_SEND_LONG_DATA => Command::SendLongData {
            statement_id: id(&mut f)?,
        },
        command::STMT_CLOSE => Command::Close {
            statement_id: id(&mut f)?,
        },
        command::STMT_RESET => Command::Reset {
            statement_id: id(&mut f)?,
        },
        command::STMT_FETCH => Command::Fetch {
            statement_id: id(&mut f)?,
        },
        command::CHANGE_USER => {
            let user = text(f.cstr()?);
            // 4.1 layout: auth data (1-byte length), then the database.
            let database = (|| {
                let auth = f.u8().ok()?;
                f.take(usize::from(auth)).ok()?;
                Some(text(f.cstr().ok()?))
            })()
            .filter(|d| !d.is_empty());
            Command::ChangeUser { user, database }
        }
        command::PING => Command::Ping,
        command::FIELD_LIST
        | command::STATISTICS
        | command::PROCESS_KILL
        | command::BINLOG_DUMP
        | command::SET_OPTION
        | command::RESET_CONNECTION
        | 0x00
        | 0x05..=0x08
        | 0x0a
        | 0x0b
        | 0x0d
        | 0x0f
        | 0x10
        | 0x13..=0x15
        | 0x1d
        | 0x1e => Command::Other { code },
        other => return Err(MysqlError::UnknownCommand(other)),
    })
}

/// Whether text in the character set of collation `id` (a login's, from
/// the server's `SHOW COLLATION`) splits like ASCII: every byte above 0x7F
/// belongs to a character with no ASCII byte in it (latin1, UTF-8, ASCII,
/// binary). The others (big5, sjis, gbk, cp932, …: a `\` or a quote can be
/// a multibyte character's second byte), or an id not listed here, are not.
pub fn collation_splits_like_ascii(id: u8) -> bool {
    matches!(
        id,
        // latin1
        5 | 8 | 15 | 31 | 47 | 48 | 49 | 94
        // ascii, binary
        | 11 | 65 | 63
        // utf8mb3
        | 33 | 83 | 192..=215 | 223
        // utf8mb4
        | 45 | 46 | 224..=247 | 255
    )
}

/// Where the text of a `COM_QUERY` or `COM_STMT_PREPARE` starts in its
/// payload (after the command byte and, for a query, its attributes).
pub fn text_at(payload: &[u8], capabilities: u32) -> Option<usize> {
    let mut f = Fields::new(payload, "command");
    let code = f.u8().ok()?;
    if code == command::QUERY && capabilities & caps::QUERY_ATTRIBUTES != 0 {
        let mut q = Fields::new(f.rest(), "COM_QUERY");
        skip_query_attributes(&mut q).ok()?;
        return Some(payload.len() - q.rest().len());
    }
    Some(1)
}

/// Skips `COM_QUERY`'s query attributes (MySQL 8.0.23+): their count, the
/// NULL bitmap, each one's type and name, and the values in the binary
/// protocol's encoding; what is left is the statement's text.
fn skip_query_attributes(q: &mut Fields<'_>) -> Result<(), MysqlError> {
    let count = q.lenenc()?.unwrap_or(0);
    let _sets = q.lenenc()?;
    if count == 0 {
        return Ok(());
    }
    let count = usize::try_from(count).map_err(|_| MysqlError::Malformed {
        packet: "COM_QUERY",
        problem: "an impossible number of query attributes",
    })?;
    if count > 65_535 {
        return Err(MysqlError::Malformed {
            packet: "COM_QUERY",
            problem: "an impossible number of query attributes",
        });
    }
    let nulls = q.take(count.div_ceil(8))?.to_vec();
    if q.u8()? != 1 {
        return Err(MysqlError::Malformed {
            packet: "COM_QUERY",
            problem: "query attributes without their types",
        });
    }
    let mut types = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = q.u16()?;
        q.lenenc_bytes()?;
        types.push((kind & 0xff) as u8);
    }
    for (i, kind) in types.into_iter().enumerate() {
        if nulls[i / 8] & (1 << (i % 8)) != 0 {
            continue;
        }
        binary_value(q, kind)?;
    }
    Ok(())
}

/// Skips one value in the binary protocol's encoding of `MYSQL_TYPE_*`.
fn binary_value(q: &mut Fields<'_>, kind: u8) -> Result<(), MysqlError> {
    let fixed = match kind {
        0x06 => 0,               // NULL
        0x01 => 1,               // TINY
        0x02 | 0x0d => 2,        // SHORT, YEAR
        0x03 | 0x09 | 0x04 => 4, // LONG, INT24, FLOAT
        0x08 | 0x05 => 8,        // LONGLONG, DOUBLE
        0x07 | 0x0a | 0x0b | 0x0c => {
            // TIMESTAMP, DATE, TIME, DATETIME: a length, then that many bytes.
            let n = q.u8()?;
            usize::from(n)
        }
        0x0f | 0x10 | 0xf5..=0xfe | 0x00 => {
            // VARCHAR, BIT, JSON, (NEW)DECIMAL, ENUM, SET, BLOBs, strings, GEOMETRY.
            q.lenenc_bytes()?;
            0
        }
        _ => {
            return Err(MysqlError::Malformed {
                packet: "COM_QUERY",
                problem: "a query attribute of an unknown type",
            })
        }
    };
    q.take(fixed)?;
    Ok(())
}

/// What a server packet is, by its first byte and length.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok {
        affected_rows: u64,
        last_insert_id: u64,
        status: u16,
    },
    Err {
        code: u16,
        sqlstate: Option<String>,
        message: String,
    },
    /// `EOF_Packet` (a 0xFE header under 9 bytes).
    Eof { status: u16 },
    /// `LOCAL INFILE` request: the client is to send this file.
    LocalInfile { file: String },
    /// Anything else: the start of a result set (its column count) or one
    /// of its column definitions or rows.
    Data,
}

/// Reads a server packet's kind. `len` is the payload's whole length
/// (`payload` may be its prefix).
pub fn reply(payload: &[u8], len: usize) -> Result<Reply, MysqlError> {
    let Some(&first) = payload.first() else {
        return Ok(Reply::Data);
    };
    match first {
        0x00 if len >= 7 => ok(payload),
        0xFE if len < 9 => {
            let mut f = Fields::new(&payload[1..], "EOF");
            let status = if f.is_empty() {
                0
            } else {
                f.u16()?;
                f.u16()?
            };
            Ok(Reply::Eof { status })
        }
        0xFF => {
            let mut f = Fields::new(&payload[1..], "ERR");
            let code = f.u16()?;
            let rest = f.rest();
            let (sqlstate, message) = match rest.split_first() {
                Some((b'#', tail)) if tail.len() >= 5 => (Some(text(&tail[..5])), text(&tail[5..])),
                _ => (None, text(rest)),
            };
            Ok(Reply::Err {
                code,
                sqlstate,
                message,
            })
        }
        0xFB => Ok(Reply::LocalInfile {
            file: text(&payload[1..]),
        }),
        _ => Ok(Reply::Data),
    }
}

/// An OK packet (header 0x00, or 0xFE ending a result set under
/// `CLIENT_DEPRECATE_EOF`).
pub fn ok(payload: &[u8]) -> Result<Reply, MysqlError> {
    let mut f = Fields::new(payload.get(1..).unwrap_or_default(), "OK");
    let affected_rows = f.lenenc()?.unwrap_or(0);
    let last_insert_id = f.lenenc()?.unwrap_or(0);
    let status = if f.is_empty() { 0 } else { f.u16()? };
    Ok(Reply::Ok {
        affected_rows,
        last_insert_id,
        status,
    })
}

/// `COM_STMT_PREPARE_OK`: the statement id and how many parameter and
/// column definitions follow.
pub fn prepare_ok(payload: &[u8]) -> Result<(u32, u16, u16), MysqlError> {
    let mut f = Fields::new(payload, "COM_STMT_PREPARE_OK");
    if f.u8()? != 0 {
        return Err(MysqlError::Malformed {
            packet: "COM_STMT_PREPARE_OK",
            problem: "it does not start with 0x00",
        });
    }
    let id = f.u32()?;
    let columns = f.u16()?;
    let params = f.u16()?;
    Ok((id, columns, params))
}
