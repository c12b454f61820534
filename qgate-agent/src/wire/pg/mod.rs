//! PostgreSQL frontend/backend protocol 3.0, decoded incrementally.
//!
//! Reference: PostgreSQL 15 documentation, chapter 55 "Frontend/Backend
//! Protocol": §55.2 "Message Flow", §55.7 "Message Formats", §55.8 "Error and
//! Notice Message Fields". Message layouts are not re-explained here.
//!
//! Both decoders accept bytes split anywhere (one message across many pushes,
//! many messages in one push), report every message with its offset in the
//! stream, never panic, and never copy a body they do not need (DataRow,
//! CopyData and password payloads are counted and skipped, not buffered).
//! After a framing error a decoder hunts: it only resumes at the start of a
//! later chunk that parses as a plausible run of whole messages.
pub mod backend;
pub mod frontend;

use std::ops::Range;

pub use backend::{
    command_rows, AuthRequest, BackendDecoder, BackendMessage, CopyDirection, ErrorFields,
    TransactionStatus,
};
pub use frontend::{FrontendDecoder, FrontendMessage, ParamTypes, StartupMessage, Target};

/// Largest message body the server accepts and largest startup packet:
/// shared with the kernel programs.
pub use qgate_common::pg::{MAX_MESSAGE_LEN, MAX_STARTUP_LEN};
/// Largest length the server accepts for its "small" frontend messages
/// (`PQ_SMALL_MESSAGE_LIMIT`: Execute, Describe, Close, Sync, Flush, …).
pub const MAX_SMALL_MESSAGE_LEN: u32 = 10_000;

/// Why a byte stream stopped being PostgreSQL.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message {msg_type:?} declares length {len}, below the minimum of 4")]
    LengthTooShort { msg_type: char, len: u32 },
    #[error("message {msg_type:?} declares length {len}, above the limit of {limit}")]
    LengthTooLong {
        msg_type: char,
        len: u32,
        limit: u32,
    },
    #[error("startup packet declares length {0}, outside 8..=10000")]
    StartupLength(u32),
    #[error("startup packet with unknown request code {0:#x}")]
    UnknownStartupCode(u32),
    #[error("unsupported protocol version {major}.{minor}")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("unknown {side} message type {msg_type:#04x}")]
    UnknownType { side: &'static str, msg_type: u8 },
    #[error("malformed {message}: {problem}")]
    Malformed {
        message: &'static str,
        problem: &'static str,
    },
}

/// One decoder output, with the stream offset of the message's first byte.
#[derive(Debug)]
pub enum Decoded<M> {
    /// `len`: the whole message on the wire, header included.
    Message { offset: u64, len: u64, message: M },
    /// Hunting skipped a chunk that does not start on a message boundary.
    Unsynchronised { offset: u64 },
    /// The stream is not (or no longer) decodable from `offset`; the decoder
    /// now hunts for a place to resume.
    Error { offset: u64, error: DecodeError },
    /// Hunting found a plausible message boundary at `offset`.
    Resynchronised { offset: u64 },
}

/// How a message starts on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeaderKind {
    /// Type byte + Int32 length (§55.7).
    Typed,
    /// Int32 length only: StartupMessage, SSLRequest, GSSENCRequest, CancelRequest.
    Startup,
}

impl HeaderKind {
    fn len(self) -> usize {
        match self {
            HeaderKind::Typed => 5,
            HeaderKind::Startup => 4,
        }
    }
}

/// What one side of the protocol allows; lets [`Framer`] serve both.
pub(crate) trait FramingRules {
    /// Rejects an unknown type or an impossible length before any body byte
    /// is buffered.
    fn check(msg_type: u8, len: u32) -> Result<(), DecodeError>;
    /// How many leading body bytes the decoder needs; the rest is skipped.
    fn keep(msg_type: u8, body_len: usize) -> usize;
}

/// Checks a declared length against the protocol's bounds.
pub(crate) fn check_len(msg_type: u8, len: u32, limit: u32) -> Result<(), DecodeError> {
    if len < 4 {
        Err(DecodeError::LengthTooShort {
            msg_type: char::from(msg_type),
            len,
        })
    } else if len > limit {
        Err(DecodeError::LengthTooLong {
            msg_type: char::from(msg_type),
            len,
            limit,
        })
    } else {
        Ok(())
    }
}

/// Where a completed frame's kept body bytes are.
#[derive(Debug)]
pub(crate) enum BodyAt {
    /// In the caller's input, no copy made.
    Input(Range<usize>),
    /// In [`Framer::buffered`], because the message spanned pushes.
    Buffer,
}

#[derive(Debug)]
pub(crate) struct FrameRef {
    pub offset: u64,
    /// The whole message, header included.
    pub len: u64,
    /// `0` for startup packets.
    pub msg_type: u8,
    pub body_len: usize,
    pub body: BodyAt,
}

#[derive(Debug)]
struct InProgress {
    offset: u64,
    msg_type: u8,
    body_len: usize,
    keep: usize,
    seen: usize,
}

/// Cuts a byte stream into frames. Copies only when a message spans pushes,
/// and then only the part the decoder keeps.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    buf: Vec<u8>,
    /// `buf` holds the body of the frame last returned: clear it first.
    buf_is_frame: bool,
    header_offset: u64,
    body: Option<InProgress>,
}

/// Buffers above this are released after use so idle connections stay small.
const RETAINED_BUFFER: usize = 64 * 1024;

impl Framer {
    pub fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > RETAINED_BUFFER {
            self.buf = Vec::new();
        }
        self.buf_is_frame = false;
        self.body = None;
    }

    /// Whether a message is partly received.
    pub fn is_mid_message(&self) -> bool {
        self.body.is_some() || (!self.buf_is_frame && !self.buf.is_empty())
    }

    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// Advances `pos` through `input` (which starts at stream offset `base`)
    /// until one frame is complete (`Some`) or the input is used up (`None`).
    pub fn step<R: FramingRules>(
        &mut self,
        input: &[u8],
        pos: &mut usize,
        base: u64,
        kind: HeaderKind,
    ) -> Result<Option<FrameRef>, DecodeError> {
        if self.buf_is_frame {
            self.reset();
        }
        if self.body.is_none() {
            let hlen = kind.len();
            let avail = input.len().saturating_sub(*pos);
            let mut header = [0u8; 5];
            let offset;
            if self.buf.is_empty() && avail >= hlen {
                offset = base + *pos as u64;
                header[..hlen].copy_from_slice(&input[*pos..*pos + hlen]);
                *pos += hlen;
            } else {
                if avail == 0 {
                    return Ok(None);
                }
                if self.buf.is_empty() {
                    self.header_offset = base + *pos as u64;
                }
                let take = (hlen - self.buf.len()).min(avail);
                self.buf.extend_from_slice(&input[*pos..*pos + take]);
                *pos += take;
                if self.buf.len() < hlen {
                    return Ok(None);
                }
                header[..hlen].copy_from_slice(&self.buf);
                self.buf.clear();
                offset = self.header_offset;
            }
            let (msg_type, len) = match kind {
                HeaderKind::Typed => (
                    header[0],
                    u32::from_be_bytes([header[1], header[2], header[3], header[4]]),
                ),
                HeaderKind::Startup => (
                    0,
                    u32::from_be_bytes([header[0], header[1], header[2], header[3]]),
                ),
            };
            match kind {
                HeaderKind::Typed => R::check(msg_type, len)?,
                HeaderKind::Startup => {
                    if !(8..=MAX_STARTUP_LEN).contains(&len) {
                        return Err(DecodeError::StartupLength(len));
                    }
                }
            }
            let body_len = len as usize - 4;
            self.body = Some(InProgress {
                offset,
                msg_type,
                body_len,
                keep: R::keep(msg_type, body_len).min(body_len),
                seen: 0,
            });
        }
        let Some(body) = self.body.as_mut() else {
            return Ok(None);
        };
        let avail = input.len().saturating_sub(*pos);
        if body.seen == 0 && avail >= body.body_len {
            let range = *pos..*pos + body.keep;
            *pos += body.body_len;
            let frame = FrameRef {
                offset: body.offset,
                len: (body.body_len + kind.len()) as u64,
                msg_type: body.msg_type,
                body_len: body.body_len,
                body: BodyAt::Input(range),
            };
            self.body = None;
            return Ok(Some(frame));
        }
        let take = avail.min(body.body_len - body.seen);
        let keep_take = take.min(body.keep.saturating_sub(body.seen));
        self.buf.extend_from_slice(&input[*pos..*pos + keep_take]);
        body.seen += take;
        *pos += take;
        if body.seen < body.body_len {
            return Ok(None);
        }
        let frame = FrameRef {
            offset: body.offset,
            len: (body.body_len + kind.len()) as u64,
            msg_type: body.msg_type,
            body_len: body.body_len,
            body: BodyAt::Buffer,
        };
        self.body = None;
        self.buf_is_frame = true;
        Ok(Some(frame))
    }
}

/// Reads the fields of one message body (§55.6 "Message Data Types").
pub(crate) struct BodyReader<'a> {
    rest: &'a [u8],
    message: &'static str,
}

impl<'a> BodyReader<'a> {
    pub fn new(body: &'a [u8], message: &'static str) -> Self {
        Self {
            rest: body,
            message,
        }
    }

    pub fn malformed(&self, problem: &'static str) -> DecodeError {
        DecodeError::Malformed {
            message: self.message,
            problem,
        }
    }

    /// A NUL-terminated String, without its terminator.
    pub fn cstr(&mut self) -> Result<&'a [u8], DecodeError> {
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.malformed("string without terminating NUL"))?;
        let (s, rest) = self.rest.split_at(end);
        self.rest = &rest[1..];
        Ok(s)
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.rest.len() < n {
            return Err(self.malformed("shorter than its fields"));
        }
        let (s, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// The body must be fully consumed, as the server checks (`pq_getmsgend`).
    pub fn finish(&self) -> Result<(), DecodeError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes after its fields"))
        }
    }
}

#[cfg(test)]
mod tests;
