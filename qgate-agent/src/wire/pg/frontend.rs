//! Client → server messages (§55.7 "Message Formats", messages marked (F)).
use super::{
    check_len, BodyAt, BodyReader, DecodeError, Decoded, Framer, FramingRules, HeaderKind,
    MAX_MESSAGE_LEN, MAX_SMALL_MESSAGE_LEN, MAX_STARTUP_LEN,
};

/// Startup request codes (§55.7: StartupMessage, SSLRequest, GSSENCRequest,
/// CancelRequest).
const PROTOCOL_MAJOR_3: u16 = 3;
use qgate_common::pg::{CANCEL_REQUEST, GSSENC_REQUEST, SSL_REQUEST};

/// Bind and FunctionCall carry parameter values of any size; only their
/// leading names (or function OID) matter here, so at most this much is kept.
const KEPT_PREFIX: usize = 64 * 1024;

/// Describe/Close target (§55.7 Describe, Close: `'S'` or `'P'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Statement,
    Portal,
}

/// The parameters of a StartupMessage, as sent (name/value pairs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StartupMessage<'a> {
    pub major: u16,
    pub minor: u16,
    params: &'a [u8],
}

impl<'a> StartupMessage<'a> {
    /// Every name/value pair, in order (user, database, application_name,
    /// options, replication, …).
    pub fn params(&self) -> impl Iterator<Item = (&'a [u8], &'a [u8])> + 'a {
        let mut fields = self.params.split(|&b| b == 0);
        std::iter::from_fn(move || {
            let name = fields.next().filter(|n| !n.is_empty())?;
            let value = fields.next()?;
            Some((name, value))
        })
    }

    pub fn param(&self, name: &str) -> Option<&'a [u8]> {
        self.params()
            .find(|(n, _)| *n == name.as_bytes())
            .map(|(_, v)| v)
    }
}

/// Parameter type OIDs of a Parse message (`0` = unspecified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamTypes<'a>(&'a [u8]);

impl ParamTypes<'_> {
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

/// One decoded client message. Byte strings are as sent: the client's
/// encoding is not necessarily UTF-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendMessage<'a> {
    Startup(StartupMessage<'a>),
    SslRequest,
    GssEncRequest,
    CancelRequest {
        backend_pid: u32,
        /// 4 bytes in protocol 3.0, longer from 3.2 on.
        secret_key: &'a [u8],
    },
    /// TLS bytes where a startup packet or message was expected: direct TLS
    /// (no SSLRequest), or a TLS session picked up mid-stream.
    Tls,
    Query {
        text: &'a [u8],
    },
    Parse {
        statement: &'a [u8],
        text: &'a [u8],
        param_types: ParamTypes<'a>,
    },
    Bind {
        portal: &'a [u8],
        statement: &'a [u8],
    },
    Execute {
        portal: &'a [u8],
        /// `0` = no limit.
        max_rows: u32,
    },
    Describe {
        target: Target,
        name: &'a [u8],
    },
    Close {
        target: Target,
        name: &'a [u8],
    },
    Sync,
    Flush,
    Terminate,
    /// Contents skipped, never buffered.
    CopyData {
        len: usize,
    },
    CopyDone,
    CopyFail {
        message: &'a [u8],
    },
    /// PasswordMessage, SASLInitialResponse, SASLResponse or GSSResponse
    /// (all type `p`); contents skipped on purpose.
    AuthenticationResponse {
        len: usize,
    },
    FunctionCall {
        function_oid: u32,
    },
}

struct Rules;

impl FramingRules for Rules {
    fn check(msg_type: u8, len: u32) -> Result<(), DecodeError> {
        let limit = match msg_type {
            b'Q' | b'P' | b'B' | b'F' | b'd' | b'p' => MAX_MESSAGE_LEN,
            b'E' | b'D' | b'C' | b'S' | b'H' | b'X' | b'c' | b'f' => MAX_SMALL_MESSAGE_LEN,
            _ => {
                return Err(DecodeError::UnknownType {
                    side: "frontend",
                    msg_type,
                })
            }
        };
        check_len(msg_type, len, limit)
    }

    fn keep(msg_type: u8, body_len: usize) -> usize {
        match msg_type {
            b'd' | b'p' => 0,
            b'B' | b'F' => KEPT_PREFIX,
            _ => body_len,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Untyped startup packets (§55.2.1 "Start-up").
    Startup,
    Messages,
    /// Lost track (mid-stream pickup, capture gap, error): waiting for a
    /// chunk that starts on a message boundary.
    Hunting,
    /// Encrypted: nothing more to decode.
    Opaque,
}

/// Incremental decoder of the client → server byte stream.
#[derive(Debug)]
pub struct FrontendDecoder {
    framer: Framer,
    phase: Phase,
}

impl FrontendDecoder {
    /// For a connection whose start was seen.
    pub fn new() -> Self {
        Self {
            framer: Framer::default(),
            phase: Phase::Startup,
        }
    }

    /// For a connection picked up mid-stream: hunts before decoding.
    pub fn mid_stream() -> Self {
        Self {
            framer: Framer::default(),
            phase: Phase::Hunting,
        }
    }

    /// Bytes were lost: drop any partial message and hunt.
    pub fn gap(&mut self) {
        if self.phase != Phase::Opaque {
            self.framer.reset();
            self.phase = Phase::Hunting;
        }
    }

    /// The session is encrypted from here on.
    pub fn stop(&mut self) {
        self.framer.reset();
        self.phase = Phase::Opaque;
    }

    pub fn is_hunting(&self) -> bool {
        self.phase == Phase::Hunting
    }

    /// Decodes `bytes`, which start at stream `offset` and directly follow
    /// the previous push (or a [`gap`](Self::gap)).
    pub fn push(
        &mut self,
        offset: u64,
        bytes: &[u8],
        sink: &mut impl FnMut(Decoded<FrontendMessage<'_>>),
    ) {
        match self.phase {
            Phase::Opaque => return,
            Phase::Hunting => match plausible_start(bytes) {
                Some(Start::Tls) => {
                    sink(Decoded::Resynchronised { offset });
                    sink(Decoded::Message {
                        offset,
                        len: 0,
                        message: FrontendMessage::Tls,
                    });
                    self.stop();
                    return;
                }
                Some(Start::Startup) => {
                    self.phase = Phase::Startup;
                    sink(Decoded::Resynchronised { offset });
                }
                Some(Start::Messages) => {
                    self.phase = Phase::Messages;
                    sink(Decoded::Resynchronised { offset });
                }
                None => {
                    sink(Decoded::Unsynchronised { offset });
                    return;
                }
            },
            Phase::Startup | Phase::Messages => {}
        }
        let mut pos = 0;
        loop {
            let at = offset + pos as u64;
            if self.phase == Phase::Startup
                && !self.framer.is_mid_message()
                && is_tls_record_start(&bytes[pos..])
            {
                sink(Decoded::Message {
                    offset: at,
                    len: 0,
                    message: FrontendMessage::Tls,
                });
                self.stop();
                return;
            }
            let kind = if self.phase == Phase::Startup {
                HeaderKind::Startup
            } else {
                HeaderKind::Typed
            };
            let frame = match self.framer.step::<Rules>(bytes, &mut pos, offset, kind) {
                Ok(Some(frame)) => frame,
                Ok(None) => return,
                Err(error) => {
                    self.gap();
                    sink(Decoded::Error { offset: at, error });
                    return;
                }
            };
            let body = match &frame.body {
                BodyAt::Input(range) => &bytes[range.clone()],
                BodyAt::Buffer => self.framer.buffered(),
            };
            let parsed = if frame.msg_type == 0 {
                parse_startup(body)
            } else {
                parse_message(frame.msg_type, frame.body_len, body)
            };
            match parsed {
                Ok(message) => {
                    if let FrontendMessage::Startup(_) = message {
                        self.phase = Phase::Messages;
                    }
                    sink(Decoded::Message {
                        offset: frame.offset,
                        len: frame.len,
                        message,
                    });
                }
                Err(error) => {
                    self.gap();
                    sink(Decoded::Error {
                        offset: frame.offset,
                        error,
                    });
                    return;
                }
            }
        }
    }
}

impl Default for FrontendDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// A TLS record header (RFC 8446 §5.1): content type 20..=23, legacy version 3.x.
pub(crate) fn is_tls_record_start(bytes: &[u8]) -> bool {
    matches!(bytes, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

enum Start {
    Startup,
    Messages,
    Tls,
}

/// Whether a chunk begins on a message boundary: a whole startup packet, a
/// run of whole TLS records, or a run of messages that exactly fills the
/// chunk (or whose last large message continues past it).
fn plausible_start(bytes: &[u8]) -> Option<Start> {
    if let [a, b, c, d, ..] = *bytes {
        let len = u32::from_be_bytes([a, b, c, d]);
        if len as usize == bytes.len()
            && (8..=MAX_STARTUP_LEN).contains(&len)
            && parse_startup(&bytes[4..]).is_ok()
        {
            return Some(Start::Startup);
        }
    }
    if plausible_tls_run(bytes) {
        return Some(Start::Tls);
    }
    let mut i = 0;
    while i < bytes.len() {
        let [t, a, b, c, d, ..] = bytes[i..] else {
            return None;
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        Rules::check(t, len).ok()?;
        let end = i + 1 + len as usize;
        if end > bytes.len() {
            let partial = &bytes[i + 5..];
            let plausible = match t {
                b'Q' => !partial.contains(&0),
                b'P' => partial.iter().filter(|&&b| b == 0).count() <= 2,
                b'B' | b'd' | b'F' => true,
                _ => false,
            };
            return plausible.then_some(Start::Messages);
        }
        parse_message(t, len as usize - 4, &bytes[i + 5..end]).ok()?;
        i = end;
    }
    (i > 0).then_some(Start::Messages)
}

/// A chunk made of whole TLS records (RFC 8446 §5.1: at most 2^14 + 2048
/// bytes each), the last one possibly continuing past the chunk.
pub(crate) fn plausible_tls_run(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if !is_tls_record_start(&bytes[i..]) {
            return false;
        }
        let [_, _, _, a, b, ..] = bytes[i..] else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([a, b]));
        if len == 0 || len > (1 << 14) + 2048 {
            return false;
        }
        i += 5 + len;
    }
    true
}

/// `body` is the startup packet after its length word.
fn parse_startup(body: &[u8]) -> Result<FrontendMessage<'_>, DecodeError> {
    let mut r = BodyReader::new(body, "startup packet");
    let code = r.u32()?;
    match code {
        SSL_REQUEST => {
            r.finish()?;
            Ok(FrontendMessage::SslRequest)
        }
        GSSENC_REQUEST => {
            r.finish()?;
            Ok(FrontendMessage::GssEncRequest)
        }
        CANCEL_REQUEST => {
            let backend_pid = r.u32()?;
            let secret_key = r.rest();
            if secret_key.len() < 4 {
                return Err(r.malformed("cancel key shorter than 4 bytes"));
            }
            Ok(FrontendMessage::CancelRequest {
                backend_pid,
                secret_key,
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != PROTOCOL_MAJOR_3 {
                return Err(if major == 1234 {
                    DecodeError::UnknownStartupCode(code)
                } else {
                    DecodeError::UnsupportedProtocol { major, minor }
                });
            }
            let params = r.rest();
            // Pairs of Strings, then one terminating NUL.
            match params.split_last() {
                Some((0, pairs)) if pairs.is_empty() || pairs.last() == Some(&0) => {
                    // n Strings and the trailing NUL split into n + 1 pieces.
                    if !pairs.is_empty() && pairs.split(|&b| b == 0).count() % 2 == 0 {
                        return Err(DecodeError::Malformed {
                            message: "StartupMessage",
                            problem: "parameter name without value",
                        });
                    }
                    Ok(FrontendMessage::Startup(StartupMessage {
                        major,
                        minor,
                        params,
                    }))
                }
                _ => Err(DecodeError::Malformed {
                    message: "StartupMessage",
                    problem: "parameter list not NUL-terminated",
                }),
            }
        }
    }
}

fn target(r: &mut BodyReader<'_>) -> Result<Target, DecodeError> {
    match r.u8()? {
        b'S' => Ok(Target::Statement),
        b'P' => Ok(Target::Portal),
        _ => Err(r.malformed("target is neither 'S' nor 'P'")),
    }
}

/// `body` is the kept part of a `body_len`-byte body (all of it unless the
/// type keeps a prefix).
fn parse_message(
    msg_type: u8,
    body_len: usize,
    body: &[u8],
) -> Result<FrontendMessage<'_>, DecodeError> {
    let complete = body.len() == body_len;
    let message = match msg_type {
        b'Q' => {
            let mut r = BodyReader::new(body, "Query");
            let text = r.cstr()?;
            r.finish()?;
            FrontendMessage::Query { text }
        }
        b'P' => {
            let mut r = BodyReader::new(body, "Parse");
            let statement = r.cstr()?;
            let text = r.cstr()?;
            let count = usize::from(r.u16()?);
            let param_types = ParamTypes(r.bytes(count * 4)?);
            r.finish()?;
            FrontendMessage::Parse {
                statement,
                text,
                param_types,
            }
        }
        b'B' => {
            let mut r = BodyReader::new(body, "Bind");
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            if complete {
                check_bind_values(&mut r)?;
            }
            FrontendMessage::Bind { portal, statement }
        }
        b'E' => {
            let mut r = BodyReader::new(body, "Execute");
            let portal = r.cstr()?;
            let max_rows = r.u32()?;
            r.finish()?;
            FrontendMessage::Execute { portal, max_rows }
        }
        b'D' | b'C' => {
            let mut r = BodyReader::new(
                body,
                if msg_type == b'D' {
                    "Describe"
                } else {
                    "Close"
                },
            );
            let target = target(&mut r)?;
            let name = r.cstr()?;
            r.finish()?;
            if msg_type == b'D' {
                FrontendMessage::Describe { target, name }
            } else {
                FrontendMessage::Close { target, name }
            }
        }
        b'S' | b'H' | b'X' | b'c' => {
            let (message, name) = match msg_type {
                b'S' => (FrontendMessage::Sync, "Sync"),
                b'H' => (FrontendMessage::Flush, "Flush"),
                b'X' => (FrontendMessage::Terminate, "Terminate"),
                _ => (FrontendMessage::CopyDone, "CopyDone"),
            };
            BodyReader::new(body, name).finish()?;
            message
        }
        b'd' => FrontendMessage::CopyData { len: body_len },
        b'f' => {
            let mut r = BodyReader::new(body, "CopyFail");
            let message = r.cstr()?;
            r.finish()?;
            FrontendMessage::CopyFail { message }
        }
        b'p' => FrontendMessage::AuthenticationResponse { len: body_len },
        b'F' => {
            let mut r = BodyReader::new(body, "FunctionCall");
            FrontendMessage::FunctionCall {
                function_oid: r.u32()?,
            }
        }
        _ => {
            return Err(DecodeError::UnknownType {
                side: "frontend",
                msg_type,
            })
        }
    };
    Ok(message)
}

/// Walks Bind's format codes, values and result formats so that a bogus
/// Bind is rejected (this matters when hunting for a message boundary).
fn check_bind_values(r: &mut BodyReader<'_>) -> Result<(), DecodeError> {
    let formats = usize::from(r.u16()?);
    r.bytes(formats * 2)?;
    let values = r.u16()?;
    for _ in 0..values {
        let len = r.u32()?;
        if len != u32::MAX {
            if len > MAX_MESSAGE_LEN {
                return Err(r.malformed("parameter length out of range"));
            }
            r.bytes(len as usize)?;
        }
    }
    let results = usize::from(r.u16()?);
    r.bytes(results * 2)?;
    r.finish()
}
