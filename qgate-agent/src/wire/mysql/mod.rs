//! The MySQL client/server protocol (MySQL 5.7/8, MariaDB 10.x), decoded
//! incrementally (issue 16). The [`Tracker`](super::Tracker) reads the
//! ports it is told carry MySQL with it (`track`); for the gate, each client
//! packet is also told apart ([`conversation::ClientPacket`]): SQL to judge,
//! a command with an effect, authentication data the server asked for.
//!
//! References: MySQL Source Code Documentation, "Client/Server Protocol"
//! (Protocol Basics: packets, integer and string types; Connection
//! Lifecycle: `Protocol::HandshakeV10`, `Protocol::HandshakeResponse41`,
//! `Protocol::SSLRequest`; Command Phase: `COM_QUERY` with query
//! attributes, `COM_STMT_PREPARE` / `COM_STMT_EXECUTE`, the text and binary
//! result sets, `LOCAL INFILE`); MariaDB's "Client/Server Protocol" pages
//! for its extended capabilities. Layouts are not re-explained here.
//!
//! | module | does |
//! | --- | --- |
//! | this one | framing: 4-byte headers, payloads of 16 MiB − 1 continued, sequence ids |
//! | [`packet`] | one packet's fields (greeting, login, commands, OK, ERR, EOF) |
//! | [`conversation`] | both directions in order: who logged in, each statement and its outcome |
//! | `track` | a MySQL connection in the tracker: its events as `WireEvent`s |
//!
//! Like the PostgreSQL decoders, nothing here panics on input and nothing
//! buffers what it does not read: a server packet keeps at most
//! [`SERVER_PREFIX`] bytes (rows are counted, not copied).
pub mod conversation;
pub mod packet;
pub(crate) mod track;

pub use conversation::{Conversation, MysqlEvent, Outcome as MysqlOutcome};

/// The largest payload one physical packet carries; a payload of exactly
/// this length is continued by the next packet.
pub const MAX_PAYLOAD: usize = 0xFF_FFFF;

/// The largest logical client packet kept whole (a statement's text): the
/// server's own `max_allowed_packet` ceiling is 1 GiB.
pub const MAX_CLIENT_PACKET: usize = 1 << 30;

/// How much of a server packet is kept: enough for an ERR's message (the
/// server caps it at 512 bytes) or an OK's counters; the rest is counted.
pub const SERVER_PREFIX: usize = 1024;

/// Why a byte stream stopped being MySQL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MysqlError {
    #[error("a {side} packet of {len} bytes is longer than the {limit} bytes kept")]
    TooLong {
        side: &'static str,
        len: usize,
        limit: usize,
    },
    #[error("packet sequence id {got} where {expected} was due")]
    Sequence { expected: u8, got: u8 },
    #[error("malformed {packet}: {problem}")]
    Malformed {
        packet: &'static str,
        problem: &'static str,
    },
    #[error("unknown command {0:#04x}")]
    UnknownCommand(u8),
    #[error("the client sent {0} while the server's answer to the previous command was due")]
    OutOfTurn(&'static str),
}

/// One logical packet: its payload (the continuation packets of a 16 MiB
/// payload joined), the sequence id of its first physical packet, where it
/// starts in the stream and how long it is on the wire, headers included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub offset: u64,
    pub wire_len: u64,
    pub seq: u8,
    /// The whole payload (client side), or its first [`SERVER_PREFIX`]
    /// bytes (server side).
    pub payload: Vec<u8>,
    /// The payload's whole length.
    pub len: usize,
}

/// Reassembles one direction's bytes into [`Frame`]s, split anywhere.
#[derive(Debug)]
pub struct Framer {
    side: &'static str,
    /// Bytes of a payload kept at most (longer client packets are an error;
    /// server payloads are cut to it).
    keep: usize,
    /// Where the next unread byte of the stream is.
    offset: u64,
    /// The partial header.
    header: Vec<u8>,
    /// The logical packet being read.
    current: Option<Partial>,
    /// Bytes of the current physical packet's payload still to come.
    remaining: usize,
    /// The current physical packet's length was `MAX_PAYLOAD`: another follows.
    continued: bool,
    failed: bool,
}

#[derive(Debug)]
struct Partial {
    offset: u64,
    seq: u8,
    last_seq: u8,
    payload: Vec<u8>,
    len: usize,
}

impl Framer {
    pub fn client() -> Self {
        Self::new("client", MAX_CLIENT_PACKET)
    }

    pub fn server() -> Self {
        Self::new("server", SERVER_PREFIX)
    }

    fn new(side: &'static str, keep: usize) -> Self {
        Framer {
            side,
            keep,
            offset: 0,
            header: Vec::with_capacity(4),
            current: None,
            remaining: 0,
            continued: false,
            failed: false,
        }
    }

    /// Feeds the bytes at `offset` (the stream's next ones); calls `out`
    /// for every logical packet completed, or once with the error that
    /// ends decoding (the stream is then ignored).
    pub fn push(
        &mut self,
        offset: u64,
        mut bytes: &[u8],
        out: &mut impl FnMut(Result<Frame, MysqlError>),
    ) {
        if self.failed {
            return;
        }
        self.offset = offset;
        while !bytes.is_empty() {
            if self.remaining == 0 && (self.current.is_none() || self.continued) {
                let need = 4 - self.header.len();
                let take = need.min(bytes.len());
                self.header.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                self.offset += take as u64;
                if self.header.len() < 4 {
                    return;
                }
                let len = usize::from(self.header[0])
                    | usize::from(self.header[1]) << 8
                    | usize::from(self.header[2]) << 16;
                let seq = self.header[3];
                self.header.clear();
                let start = self.offset - 4;
                match &mut self.current {
                    Some(partial) => {
                        let expected = partial.last_seq.wrapping_add(1);
                        if seq != expected {
                            self.failed = true;
                            out(Err(MysqlError::Sequence { expected, got: seq }));
                            return;
                        }
                        partial.last_seq = seq;
                    }
                    None => {
                        self.current = Some(Partial {
                            offset: start,
                            seq,
                            last_seq: seq,
                            payload: Vec::new(),
                            len: 0,
                        })
                    }
                }
                self.remaining = len;
                self.continued = len == MAX_PAYLOAD;
                let partial = self.current.as_mut().expect("set above");
                partial.len += len;
                if self.side == "client" && partial.len > self.keep {
                    self.failed = true;
                    out(Err(MysqlError::TooLong {
                        side: self.side,
                        len: partial.len,
                        limit: self.keep,
                    }));
                    return;
                }
                if len == 0 {
                    self.finish(out);
                }
                continue;
            }
            let take = self.remaining.min(bytes.len());
            let partial = self.current.as_mut().expect("a packet is being read");
            let room = self.keep.saturating_sub(partial.payload.len()).min(take);
            partial.payload.extend_from_slice(&bytes[..room]);
            bytes = &bytes[take..];
            self.offset += take as u64;
            self.remaining -= take;
            if self.remaining == 0 {
                self.finish(out);
            }
        }
    }

    /// The current physical packet is complete: the logical one too, unless
    /// a continuation follows.
    fn finish(&mut self, out: &mut impl FnMut(Result<Frame, MysqlError>)) {
        if self.continued {
            return;
        }
        if let Some(p) = self.current.take() {
            out(Ok(Frame {
                offset: p.offset,
                wire_len: self.offset - p.offset,
                seq: p.seq,
                payload: p.payload,
                len: p.len,
            }));
        }
    }

    /// Bytes were lost: nothing after them can be framed with certainty.
    pub fn gap(&mut self) {
        self.failed = true;
    }

    pub fn failed(&self) -> bool {
        self.failed
    }
}

#[cfg(test)]
mod tests;
