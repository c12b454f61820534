//! Server → client messages (§55.7 "Message Formats", messages marked (B)).
use super::{
    check_len, frontend::plausible_tls_run, BodyAt, BodyReader, DecodeError, Decoded, Framer,
    FramingRules, HeaderKind, MAX_MESSAGE_LEN,
};

/// Which authentication the server asks for (§55.7 Authentication*).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthRequest {
    Ok,
    KerberosV5,
    CleartextPassword,
    Md5Password,
    Gss,
    GssContinue,
    Sspi,
    Sasl,
    SaslContinue,
    SaslFinal,
    Other(u32),
}

/// ReadyForQuery's transaction status indicator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionStatus {
    Idle,
    InTransaction,
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDirection {
    /// CopyInResponse: the client sends CopyData (COPY … FROM STDIN).
    In,
    /// CopyOutResponse: the server sends CopyData (COPY … TO STDOUT).
    Out,
    /// CopyBothResponse (replication).
    Both,
}

/// The fields of an ErrorResponse or NoticeResponse (§55.8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorFields<'a>(&'a [u8]);

impl<'a> ErrorFields<'a> {
    /// Every (field type, value) pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u8, &'a [u8])> + 'a {
        let mut rest = self.0;
        std::iter::from_fn(move || {
            let (&code, tail) = rest.split_first()?;
            if code == 0 {
                return None;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            rest = &tail[end + 1..];
            Some((code, &tail[..end]))
        })
    }

    pub fn field(&self, code: u8) -> Option<&'a [u8]> {
        self.iter().find(|(c, _)| *c == code).map(|(_, v)| v)
    }

    /// `V` (never localised, 9.6+), else `S`.
    pub fn severity(&self) -> Option<&'a [u8]> {
        self.field(b'V').or_else(|| self.field(b'S'))
    }

    pub fn sqlstate(&self) -> Option<&'a [u8]> {
        self.field(b'C')
    }

    pub fn message(&self) -> Option<&'a [u8]> {
        self.field(b'M')
    }
}

/// One decoded server message. Row contents are never decoded or copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendMessage<'a> {
    /// The one-byte answer to SSLRequest / GSSENCRequest (§55.2.10, §55.2.11).
    EncryptionResponse {
        accepted: bool,
    },
    /// TLS records where messages were expected (picked up mid-stream).
    Tls,
    Authentication(AuthRequest),
    BackendKeyData {
        backend_pid: u32,
        secret_key: &'a [u8],
    },
    ParameterStatus {
        name: &'a [u8],
        value: &'a [u8],
    },
    NegotiateProtocolVersion {
        newest_minor: u32,
    },
    ReadyForQuery {
        status: TransactionStatus,
    },
    ParseComplete,
    BindComplete,
    CloseComplete,
    NoData,
    EmptyQueryResponse,
    PortalSuspended,
    CommandComplete {
        tag: &'a [u8],
    },
    ErrorResponse(ErrorFields<'a>),
    NoticeResponse(ErrorFields<'a>),
    RowDescription {
        columns: u16,
    },
    DataRow {
        columns: u16,
        len: usize,
    },
    ParameterDescription {
        params: u16,
    },
    CopyResponse {
        direction: CopyDirection,
        binary: bool,
        columns: u16,
    },
    CopyData {
        len: usize,
    },
    CopyDone,
    NotificationResponse {
        backend_pid: u32,
    },
    FunctionCallResponse {
        len: usize,
    },
}

/// Rows affected, from a CommandComplete tag (§55.7 CommandComplete):
/// `INSERT 0 5` → 5, `DELETE 3`, `UPDATE 7`, `SELECT 10`, `COPY 4`, `MOVE`,
/// `FETCH`, `MERGE`. Other tags carry no count.
pub fn command_rows(tag: &[u8]) -> Option<u64> {
    let mut words = tag.split(|&b| b == b' ');
    let command = words.next()?;
    let expected_words = match command {
        b"INSERT" => 3,
        b"DELETE" | b"UPDATE" | b"SELECT" | b"COPY" | b"MOVE" | b"FETCH" | b"MERGE" => 2,
        _ => return None,
    };
    let mut count: &[u8] = &[];
    let mut seen_words = 1;
    for word in words {
        seen_words += 1;
        count = word;
    }
    if seen_words != expected_words {
        return None;
    }
    if count.is_empty() || !count.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(count).ok()?.parse().ok()
}

struct Rules;

impl FramingRules for Rules {
    fn check(msg_type: u8, len: u32) -> Result<(), DecodeError> {
        if !matches!(
            msg_type,
            b'R' | b'K'
                | b'S'
                | b'v'
                | b'Z'
                | b'1'
                | b'2'
                | b'3'
                | b'n'
                | b'I'
                | b's'
                | b'C'
                | b'E'
                | b'N'
                | b'T'
                | b'D'
                | b't'
                | b'G'
                | b'H'
                | b'W'
                | b'd'
                | b'c'
                | b'A'
                | b'V'
        ) {
            return Err(DecodeError::UnknownType {
                side: "backend",
                msg_type,
            });
        }
        check_len(msg_type, len, MAX_MESSAGE_LEN)
    }

    fn keep(msg_type: u8, body_len: usize) -> usize {
        match msg_type {
            b'd' | b'V' => 0,
            b'D' | b'T' | b't' => 2,
            b'A' => 4,
            _ => body_len,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Messages,
    /// An SSLRequest/GSSENCRequest is outstanding: one answer byte comes next.
    EncryptionAnswer,
    Hunting,
    Opaque,
}

/// Incremental decoder of the server → client byte stream.
#[derive(Debug)]
pub struct BackendDecoder {
    framer: Framer,
    phase: Phase,
}

impl BackendDecoder {
    pub fn new() -> Self {
        Self {
            framer: Framer::default(),
            phase: Phase::Messages,
        }
    }

    pub fn mid_stream() -> Self {
        Self {
            framer: Framer::default(),
            phase: Phase::Hunting,
        }
    }

    /// The client sent SSLRequest or GSSENCRequest: the server's next byte
    /// is the single-byte answer, not a message.
    pub fn expect_encryption_answer(&mut self) {
        if self.phase == Phase::Messages && !self.framer.is_mid_message() {
            self.phase = Phase::EncryptionAnswer;
        }
    }

    pub fn gap(&mut self) {
        if self.phase != Phase::Opaque {
            self.framer.reset();
            self.phase = Phase::Hunting;
        }
    }

    pub fn stop(&mut self) {
        self.framer.reset();
        self.phase = Phase::Opaque;
    }

    pub fn is_hunting(&self) -> bool {
        self.phase == Phase::Hunting
    }

    pub fn push(
        &mut self,
        offset: u64,
        bytes: &[u8],
        sink: &mut impl FnMut(Decoded<BackendMessage<'_>>),
    ) {
        let mut pos = 0;
        match self.phase {
            Phase::Opaque => return,
            Phase::Hunting => {
                if plausible_tls_run(bytes) && !bytes.is_empty() {
                    sink(Decoded::Resynchronised { offset });
                    sink(Decoded::Message {
                        offset,
                        len: 0,
                        message: BackendMessage::Tls,
                    });
                    self.stop();
                    return;
                }
                if !plausible_run(bytes) {
                    sink(Decoded::Unsynchronised { offset });
                    return;
                }
                self.phase = Phase::Messages;
                sink(Decoded::Resynchronised { offset });
            }
            Phase::EncryptionAnswer => {
                let Some(&answer) = bytes.first() else {
                    return;
                };
                match answer {
                    b'S' | b'G' => {
                        sink(Decoded::Message {
                            offset,
                            len: 1,
                            message: BackendMessage::EncryptionResponse { accepted: true },
                        });
                        self.stop();
                        return;
                    }
                    b'N' => {
                        sink(Decoded::Message {
                            offset,
                            len: 1,
                            message: BackendMessage::EncryptionResponse { accepted: false },
                        });
                        pos = 1;
                    }
                    // A server that does not know the request answers with
                    // an ErrorResponse (§55.2.10).
                    _ => {}
                }
                self.phase = Phase::Messages;
            }
            Phase::Messages => {}
        }
        loop {
            let at = offset + pos as u64;
            let frame = match self
                .framer
                .step::<Rules>(bytes, &mut pos, offset, HeaderKind::Typed)
            {
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
            match parse_message(frame.msg_type, frame.body_len, body) {
                Ok(message) => sink(Decoded::Message {
                    offset: frame.offset,
                    len: frame.len,
                    message,
                }),
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

impl Default for BackendDecoder {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether a chunk starts on a message boundary: whole messages exactly
/// filling it, the last possibly a large one continuing past it.
fn plausible_run(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        let [t, a, b, c, d, ..] = bytes[i..] else {
            return false;
        };
        let len = u32::from_be_bytes([a, b, c, d]);
        if Rules::check(t, len).is_err() {
            return false;
        }
        let end = i + 1 + len as usize;
        if end > bytes.len() {
            return matches!(t, b'D' | b'd' | b'T' | b'E' | b'N' | b'A' | b'V')
                && (bytes.len() - i - 5 >= 2 || t == b'd');
        }
        let body = &bytes[i + 5..end];
        let kept = &body[..Rules::keep(t, body.len()).min(body.len())];
        if parse_message(t, body.len(), kept).is_err() {
            return false;
        }
        i = end;
    }
    i > 0
}

fn parse_message(
    msg_type: u8,
    body_len: usize,
    body: &[u8],
) -> Result<BackendMessage<'_>, DecodeError> {
    let empty = |message: BackendMessage<'static>, name: &'static str| {
        BodyReader::new(body, name).finish().map(|()| message)
    };
    let message = match msg_type {
        b'R' => {
            let mut r = BodyReader::new(body, "Authentication");
            let request = match r.u32()? {
                0 => AuthRequest::Ok,
                2 => AuthRequest::KerberosV5,
                3 => AuthRequest::CleartextPassword,
                5 => {
                    r.bytes(4)?;
                    AuthRequest::Md5Password
                }
                7 => AuthRequest::Gss,
                8 => {
                    r.rest();
                    AuthRequest::GssContinue
                }
                9 => AuthRequest::Sspi,
                10 => {
                    r.rest();
                    AuthRequest::Sasl
                }
                11 => {
                    r.rest();
                    AuthRequest::SaslContinue
                }
                12 => {
                    r.rest();
                    AuthRequest::SaslFinal
                }
                other => {
                    r.rest();
                    AuthRequest::Other(other)
                }
            };
            r.finish()?;
            BackendMessage::Authentication(request)
        }
        b'K' => {
            let mut r = BodyReader::new(body, "BackendKeyData");
            let backend_pid = r.u32()?;
            let secret_key = r.rest();
            if secret_key.len() < 4 {
                return Err(r.malformed("secret key shorter than 4 bytes"));
            }
            BackendMessage::BackendKeyData {
                backend_pid,
                secret_key,
            }
        }
        b'S' => {
            let mut r = BodyReader::new(body, "ParameterStatus");
            let name = r.cstr()?;
            let value = r.cstr()?;
            r.finish()?;
            BackendMessage::ParameterStatus { name, value }
        }
        b'v' => {
            let mut r = BodyReader::new(body, "NegotiateProtocolVersion");
            let newest_minor = r.u32()?;
            let options = r.u32()?;
            for _ in 0..options {
                r.cstr()?;
            }
            r.finish()?;
            BackendMessage::NegotiateProtocolVersion { newest_minor }
        }
        b'Z' => {
            let mut r = BodyReader::new(body, "ReadyForQuery");
            let status = match r.u8()? {
                b'I' => TransactionStatus::Idle,
                b'T' => TransactionStatus::InTransaction,
                b'E' => TransactionStatus::Failed,
                _ => return Err(r.malformed("unknown transaction status")),
            };
            r.finish()?;
            BackendMessage::ReadyForQuery { status }
        }
        b'1' => empty(BackendMessage::ParseComplete, "ParseComplete")?,
        b'2' => empty(BackendMessage::BindComplete, "BindComplete")?,
        b'3' => empty(BackendMessage::CloseComplete, "CloseComplete")?,
        b'n' => empty(BackendMessage::NoData, "NoData")?,
        b'I' => empty(BackendMessage::EmptyQueryResponse, "EmptyQueryResponse")?,
        b's' => empty(BackendMessage::PortalSuspended, "PortalSuspended")?,
        b'c' => empty(BackendMessage::CopyDone, "CopyDone")?,
        b'C' => {
            let mut r = BodyReader::new(body, "CommandComplete");
            let tag = r.cstr()?;
            r.finish()?;
            BackendMessage::CommandComplete { tag }
        }
        b'E' | b'N' => {
            let name = if msg_type == b'E' {
                "ErrorResponse"
            } else {
                "NoticeResponse"
            };
            let mut r = BodyReader::new(body, name);
            loop {
                if r.u8()? == 0 {
                    break;
                }
                r.cstr()?;
            }
            r.finish()?;
            let fields = ErrorFields(body);
            if msg_type == b'E' {
                BackendMessage::ErrorResponse(fields)
            } else {
                BackendMessage::NoticeResponse(fields)
            }
        }
        b'T' => BackendMessage::RowDescription {
            columns: BodyReader::new(body, "RowDescription").u16()?,
        },
        b'D' => BackendMessage::DataRow {
            columns: BodyReader::new(body, "DataRow").u16()?,
            len: body_len,
        },
        b't' => BackendMessage::ParameterDescription {
            params: BodyReader::new(body, "ParameterDescription").u16()?,
        },
        b'G' | b'H' | b'W' => {
            let mut r = BodyReader::new(body, "CopyResponse");
            let binary = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(r.malformed("unknown copy format")),
            };
            let columns = r.u16()?;
            r.bytes(usize::from(columns) * 2)?;
            r.finish()?;
            let direction = match msg_type {
                b'G' => CopyDirection::In,
                b'H' => CopyDirection::Out,
                _ => CopyDirection::Both,
            };
            BackendMessage::CopyResponse {
                direction,
                binary,
                columns,
            }
        }
        b'd' => BackendMessage::CopyData { len: body_len },
        b'A' => BackendMessage::NotificationResponse {
            backend_pid: BodyReader::new(body, "NotificationResponse").u32()?,
        },
        b'V' => BackendMessage::FunctionCallResponse { len: body_len },
        _ => {
            return Err(DecodeError::UnknownType {
                side: "backend",
                msg_type,
            })
        }
    };
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_big_data_row_is_counted_not_buffered() {
        let row = super::super::tests::build::data_row(&[&vec![7u8; 8 << 20]]);
        let mut decoder = BackendDecoder::new();
        let mut rows = Vec::new();
        for (i, chunk) in row.chunks(1460).enumerate() {
            decoder.push((i * 1460) as u64, chunk, &mut |d| {
                if let Decoded::Message {
                    message: BackendMessage::DataRow { columns, len },
                    ..
                } = d
                {
                    rows.push((columns, len));
                }
            });
            assert!(
                decoder.framer.buf.capacity() <= 64,
                "DataRow bytes buffered"
            );
        }
        assert_eq!(rows, [(1, 2 + 4 + (8 << 20))]);
    }
}
