//! Decoder behaviour on crafted bytes.
use super::*;

/// Builders for wire messages (§55.7), shared by the decoder tests.
pub(crate) mod build {
    pub fn msg(t: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![t];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cstr(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    pub fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = 196_608u32.to_be_bytes().to_vec();
        for (k, v) in params {
            cstr(&mut body, k);
            cstr(&mut body, v);
        }
        body.push(0);
        let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
        m.extend_from_slice(&body);
        m
    }

    pub fn startup_code(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut m = (8 + extra.len() as u32).to_be_bytes().to_vec();
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(extra);
        m
    }

    pub fn query(text: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, text);
        msg(b'Q', &b)
    }

    pub fn parse(name: &str, text: &str, types: &[u32]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, name);
        cstr(&mut b, text);
        b.extend_from_slice(&(types.len() as u16).to_be_bytes());
        for t in types {
            b.extend_from_slice(&t.to_be_bytes());
        }
        msg(b'P', &b)
    }

    pub fn bind(portal: &str, statement: &str, values: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        cstr(&mut b, statement);
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&(values.len() as u16).to_be_bytes());
        for v in values {
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v);
        }
        b.extend_from_slice(&0u16.to_be_bytes());
        msg(b'B', &b)
    }

    pub fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, portal);
        b.extend_from_slice(&max_rows.to_be_bytes());
        msg(b'E', &b)
    }

    pub fn describe_or_close(t: u8, target: u8, name: &str) -> Vec<u8> {
        let mut b = vec![target];
        cstr(&mut b, name);
        msg(t, &b)
    }

    pub fn command_complete(tag: &str) -> Vec<u8> {
        let mut b = Vec::new();
        cstr(&mut b, tag);
        msg(b'C', &b)
    }

    pub fn error(code: &str, message: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (f, v) in [
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', code),
            (b'M', message),
        ] {
            b.push(f);
            cstr(&mut b, v);
        }
        b.push(0);
        msg(b'E', &b)
    }

    pub fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    pub fn data_row(values: &[&[u8]]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v);
        }
        msg(b'D', &b)
    }

    pub fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(extra);
        msg(b'R', &b)
    }
}

use build::*;

/// A decoded message in owned, comparable form.
fn frontend_all(chunks: &[&[u8]], decoder: &mut FrontendDecoder) -> Vec<String> {
    let mut seen = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        decoder.push(offset, chunk, &mut |d| seen.push(format!("{d:?}")));
        offset += chunk.len() as u64;
    }
    seen
}

fn backend_all(chunks: &[&[u8]], decoder: &mut BackendDecoder) -> Vec<String> {
    let mut seen = Vec::new();
    let mut offset = 0;
    for chunk in chunks {
        decoder.push(offset, chunk, &mut |d| seen.push(format!("{d:?}")));
        offset += chunk.len() as u64;
    }
    seen
}

fn frontend_messages(bytes: &[u8]) -> Vec<String> {
    frontend_all(&[bytes], &mut FrontendDecoder::new())
}

/// A session's worth of client messages, one of every type.
fn every_frontend_message() -> Vec<u8> {
    let mut s = startup(&[
        ("user", "alice"),
        ("database", "shop"),
        ("application_name", "psql"),
        ("client_encoding", "UTF8"),
    ]);
    for m in [
        msg(b'p', b"md5abcdef\0"),
        query("SELECT 1; SELECT 2"),
        parse("s1", "DELETE FROM t WHERE id = $1", &[23]),
        bind("p1", "s1", &[b"42"]),
        describe_or_close(b'D', b'P', "p1"),
        execute("p1", 0),
        msg(b'H', &[]),
        describe_or_close(b'C', b'S', "s1"),
        msg(b'S', &[]),
        query("COPY t FROM STDIN"),
        msg(b'd', b"1\tx\n"),
        msg(b'c', &[]),
        msg(b'f', b"client gave up\0"),
        msg(b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        msg(b'X', &[]),
    ] {
        s.extend_from_slice(&m);
    }
    s
}

fn every_backend_message() -> Vec<u8> {
    let mut s = Vec::new();
    let mut row_description = 1u16.to_be_bytes().to_vec();
    row_description.extend_from_slice(b"id\0");
    row_description.extend_from_slice(&[0; 18]);
    for m in [
        auth(10, b"SCRAM-SHA-256\0\0"),
        auth(11, b"r=nonce"),
        auth(12, b"v=sig"),
        auth(5, b"salt"),
        auth(0, &[]),
        msg(b'S', b"server_version\x0015.4\0"),
        msg(b'K', &[0, 0, 0x30, 0x39, 1, 2, 3, 4]),
        ready(b'I'),
        msg(b'1', &[]),
        msg(b'2', &[]),
        msg(b't', &[0, 1, 0, 0, 0, 23]),
        msg(b'T', &row_description),
        data_row(&[b"42"]),
        msg(b'n', &[]),
        command_complete("INSERT 0 5"),
        msg(b'I', &[]),
        msg(b's', &[]),
        msg(b'3', &[]),
        error("42P01", "relation \"t\" does not exist"),
        msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"),
        msg(b'G', &[0, 0, 1, 0, 0]),
        msg(b'H', &[0, 0, 0]),
        msg(b'd', b"row\n"),
        msg(b'c', &[]),
        msg(b'A', &[0, 0, 0, 7, b'c', 0, b'p', 0]),
        msg(b'V', &[0, 0, 0, 1, 9]),
        msg(b'v', &[0, 0, 0, 0, 0, 0, 0, 0]),
        ready(b'E'),
    ] {
        s.extend_from_slice(&m);
    }
    s
}

#[test]
fn every_frontend_message_type_decodes() {
    let bytes = every_frontend_message();
    let mut messages = Vec::new();
    FrontendDecoder::new().push(0, &bytes, &mut |d| match d {
        Decoded::Message { message, .. } => messages.push(format!("{message:?}")),
        other => panic!("unexpected {other:?}"),
    });
    let joined = messages.join("\n");
    for expected in [
        "Startup(StartupMessage { major: 3, minor: 0",
        "AuthenticationResponse { len: 10 }",
        "Query { text: [83, 69, 76",
        "Parse { statement: [115, 49], text: [68, 69, 76",
        "Bind { portal: [112, 49], statement: [115, 49] }",
        "Describe { target: Portal, name: [112, 49] }",
        "Execute { portal: [112, 49], max_rows: 0 }",
        "Flush",
        "Close { target: Statement, name: [115, 49] }",
        "Sync",
        "CopyData { len: 4 }",
        "CopyDone",
        "CopyFail { message: [99, 108",
        "FunctionCall { function_oid: 1024 }",
        "Terminate",
    ] {
        assert!(joined.contains(expected), "missing {expected} in\n{joined}");
    }
    assert_eq!(messages.len(), 16);
}

#[test]
fn startup_parameters_are_readable_by_name() {
    let bytes = startup(&[
        ("database", "shop"),
        ("user", "alice"),
        ("options", "-c x=1"),
    ]);
    let mut found = None;
    FrontendDecoder::new().push(0, &bytes, &mut |d| {
        if let Decoded::Message {
            message: FrontendMessage::Startup(s),
            ..
        } = d
        {
            found = Some((
                s.param("user").map(<[u8]>::to_vec),
                s.param("database").map(<[u8]>::to_vec),
                s.param("application_name").map(<[u8]>::to_vec),
                s.params().count(),
            ));
        }
    });
    assert_eq!(
        found,
        Some((Some(b"alice".to_vec()), Some(b"shop".to_vec()), None, 3))
    );
}

#[test]
fn ssl_gssenc_and_cancel_requests_decode_before_the_startup_message() {
    let mut bytes = startup_code(80_877_103, &[]);
    bytes.extend(startup_code(80_877_104, &[]));
    bytes.extend(startup_code(80_877_102, &[0, 0, 0x30, 0x39, 9, 9, 9, 9]));
    bytes.extend(startup(&[("user", "bob")]));
    bytes.extend(query("SELECT 1"));
    let seen = frontend_messages(&bytes);
    assert!(seen[0].contains("SslRequest"), "{seen:?}");
    assert!(seen[1].contains("GssEncRequest"), "{seen:?}");
    assert!(
        seen[2].contains("CancelRequest { backend_pid: 12345, secret_key: [9, 9, 9, 9] }"),
        "{seen:?}"
    );
    assert!(seen[3].contains("Startup"), "{seen:?}");
    assert!(seen[4].contains("Query"), "{seen:?}");
}

#[test]
fn every_backend_message_type_decodes() {
    let bytes = every_backend_message();
    let mut messages = Vec::new();
    BackendDecoder::new().push(0, &bytes, &mut |d| match d {
        Decoded::Message { message, .. } => messages.push(message_summary(&message)),
        other => panic!("unexpected {other:?}"),
    });
    assert_eq!(
        messages,
        [
            "Authentication(Sasl)",
            "Authentication(SaslContinue)",
            "Authentication(SaslFinal)",
            "Authentication(Md5Password)",
            "Authentication(Ok)",
            "ParameterStatus server_version=15.4",
            "BackendKeyData 12345",
            "ReadyForQuery { status: Idle }",
            "ParseComplete",
            "BindComplete",
            "ParameterDescription { params: 1 }",
            "RowDescription { columns: 1 }",
            "DataRow { columns: 1, len: 8 }",
            "NoData",
            "CommandComplete INSERT 0 5 rows Some(5)",
            "EmptyQueryResponse",
            "PortalSuspended",
            "CloseComplete",
            "ErrorResponse ERROR 42P01 relation \"t\" does not exist",
            "NoticeResponse NOTICE 00000 hello",
            "CopyResponse { direction: In, binary: false, columns: 1 }",
            "CopyResponse { direction: Out, binary: false, columns: 0 }",
            "CopyData { len: 4 }",
            "CopyDone",
            "NotificationResponse { backend_pid: 7 }",
            "FunctionCallResponse { len: 5 }",
            "NegotiateProtocolVersion { newest_minor: 0 }",
            "ReadyForQuery { status: Failed }",
        ]
    );
}

fn message_summary(m: &BackendMessage<'_>) -> String {
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    match m {
        BackendMessage::ParameterStatus { name, value } => {
            format!("ParameterStatus {}={}", s(name), s(value))
        }
        BackendMessage::BackendKeyData { backend_pid, .. } => {
            format!("BackendKeyData {backend_pid}")
        }
        BackendMessage::CommandComplete { tag } => {
            format!("CommandComplete {} rows {:?}", s(tag), command_rows(tag))
        }
        BackendMessage::ErrorResponse(f) | BackendMessage::NoticeResponse(f) => format!(
            "{} {} {} {}",
            if matches!(m, BackendMessage::ErrorResponse(_)) {
                "ErrorResponse"
            } else {
                "NoticeResponse"
            },
            s(f.severity().unwrap_or_default()),
            s(f.sqlstate().unwrap_or_default()),
            s(f.message().unwrap_or_default())
        ),
        other => format!("{other:?}"),
    }
}

#[test]
fn command_tags_give_row_counts() {
    for (tag, rows) in [
        ("INSERT 0 5", Some(5)),
        ("DELETE 3", Some(3)),
        ("UPDATE 7", Some(7)),
        ("SELECT 10", Some(10)),
        ("COPY 4", Some(4)),
        ("MOVE 2", Some(2)),
        ("FETCH 1", Some(1)),
        ("MERGE 9", Some(9)),
        ("SELECT", None),
        ("CREATE TABLE", None),
        ("INSERT 5", None),
        ("DELETE x", None),
        ("DELETE 99999999999999999999999", None),
        ("", None),
    ] {
        assert_eq!(command_rows(tag.as_bytes()), rows, "{tag:?}");
    }
}

#[test]
fn a_stream_split_at_every_byte_boundary_decodes_identically() {
    let frontend = every_frontend_message();
    let whole = frontend_messages(&frontend);
    for cut in 0..=frontend.len() {
        let (a, b) = frontend.split_at(cut);
        let split = frontend_all(&[a, b], &mut FrontendDecoder::new());
        assert_eq!(split, whole, "frontend split at {cut}");
    }
    let backend = every_backend_message();
    let whole = backend_all(&[&backend], &mut BackendDecoder::new());
    for cut in 0..=backend.len() {
        let (a, b) = backend.split_at(cut);
        let split = backend_all(&[a, b], &mut BackendDecoder::new());
        assert_eq!(split, whole, "backend split at {cut}");
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_decodes_identically() {
    let frontend = every_frontend_message();
    let bytes: Vec<&[u8]> = frontend.chunks(1).collect();
    assert_eq!(
        frontend_all(&bytes, &mut FrontendDecoder::new()),
        frontend_messages(&frontend)
    );
    let backend = every_backend_message();
    let bytes: Vec<&[u8]> = backend.chunks(1).collect();
    assert_eq!(
        backend_all(&bytes, &mut BackendDecoder::new()),
        backend_all(&[&backend], &mut BackendDecoder::new())
    );
}

#[test]
fn messages_carry_their_stream_offset_and_length() {
    let mut bytes = startup(&[("user", "u")]);
    let q = query("SELECT 1");
    let startup_len = bytes.len() as u64;
    bytes.extend_from_slice(&q);
    let mut spans = Vec::new();
    FrontendDecoder::new().push(1000, &bytes, &mut |d| {
        if let Decoded::Message { offset, len, .. } = d {
            spans.push((offset, len));
        }
    });
    assert_eq!(
        spans,
        [(1000, startup_len), (1000 + startup_len, q.len() as u64)]
    );
}

#[test]
fn a_one_mib_query_decodes_across_many_pushes() {
    let text = "SELECT '".to_owned() + &"x".repeat(1 << 20) + "'";
    let mut bytes = startup(&[("user", "u")]);
    bytes.extend(query(&text));
    let chunks: Vec<&[u8]> = bytes.chunks(1460).collect();
    let mut decoder = FrontendDecoder::new();
    let mut found = None;
    let mut offset = 0;
    for chunk in &chunks {
        decoder.push(offset, chunk, &mut |d| {
            if let Decoded::Message {
                message: FrontendMessage::Query { text },
                ..
            } = d
            {
                found = Some(text.len());
            }
        });
        offset += chunk.len() as u64;
    }
    assert_eq!(found, Some(text.len()));
}

fn first_error(bytes: &[u8], frontend: bool) -> String {
    let mut error = None;
    let mut sink = |message: String| {
        error.get_or_insert(message);
    };
    if frontend {
        FrontendDecoder::new().push(0, bytes, &mut |d| {
            if let Decoded::Error { error, .. } = d {
                sink(error.to_string());
            }
        });
    } else {
        BackendDecoder::new().push(0, bytes, &mut |d| {
            if let Decoded::Error { error, .. } = d {
                sink(error.to_string());
            }
        });
    }
    error.unwrap_or_else(|| "no error".to_owned())
}

#[test]
fn malformed_lengths_are_clear_errors() {
    let mut short = startup(&[("user", "u")]);
    short.extend_from_slice(&[b'Q', 0, 0, 0, 3]);
    assert_eq!(
        first_error(&short, true),
        "message 'Q' declares length 3, below the minimum of 4"
    );
    let mut huge = startup(&[("user", "u")]);
    huge.extend_from_slice(&[b'Q', 0x40, 0, 0, 0]);
    assert_eq!(
        first_error(&huge, true),
        "message 'Q' declares length 1073741824, above the limit of 1073741823"
    );
    let mut small = startup(&[("user", "u")]);
    small.extend_from_slice(&[b'S', 0, 0, 0x30, 0]);
    assert_eq!(
        first_error(&small, true),
        "message 'S' declares length 12288, above the limit of 10000"
    );
    assert_eq!(
        first_error(&10_001u32.to_be_bytes(), true),
        "startup packet declares length 10001, outside 8..=10000"
    );
    assert_eq!(
        first_error(&[0, 0, 0, 4], true),
        "startup packet declares length 4, outside 8..=10000"
    );
    assert_eq!(
        first_error(&[b'D', 0xff, 0xff, 0xff, 0xff], false),
        "message 'D' declares length 4294967295, above the limit of 1073741823"
    );
    assert_eq!(
        first_error(&[b'Z', 0, 0, 0, 1], false),
        "message 'Z' declares length 1, below the minimum of 4"
    );
}

#[test]
fn malformed_bodies_are_clear_errors() {
    let mut no_nul = startup(&[("user", "u")]);
    no_nul.extend(msg(b'Q', b"SELECT 1"));
    assert_eq!(
        first_error(&no_nul, true),
        "malformed Query: string without terminating NUL"
    );
    let mut sync_with_body = startup(&[("user", "u")]);
    sync_with_body.extend(msg(b'S', b"x"));
    assert_eq!(
        first_error(&sync_with_body, true),
        "malformed Sync: trailing bytes after its fields"
    );
    assert_eq!(
        first_error(&msg(b'Z', b"X"), false),
        "malformed ReadyForQuery: unknown transaction status"
    );
    assert_eq!(
        first_error(&startup_code(0x0002_0000, &[]), true),
        "unsupported protocol version 2.0"
    );
}

#[test]
fn garbage_on_the_port_is_one_error_then_silence() {
    let http = b"GET / HTTP/1.1\r\nHost: db\r\n\r\n";
    let mut decoder = FrontendDecoder::new();
    let seen = frontend_all(&[http, http, b"\x00\x01\x02"], &mut decoder);
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen[0].starts_with("Error"), "{seen:?}");
    assert!(seen[1..].iter().all(|s| s.starts_with("Unsynchronised")));
    let mut backend = BackendDecoder::new();
    let seen = backend_all(&[b"HTTP/1.1 400 Bad Request\r\n\r\n"], &mut backend);
    assert!(seen[0].starts_with("Error"), "{seen:?}");
}

#[test]
fn a_mid_stream_decoder_skips_partial_data_and_resumes_at_a_message_boundary() {
    let mut decoder = FrontendDecoder::mid_stream();
    let tail_of_a_query = b"ERE id = 1\0".to_vec();
    let mut next = query("SELECT 2");
    next.extend(msg(b'S', &[]));
    let seen = frontend_all(&[&tail_of_a_query, &next], &mut decoder);
    assert!(seen[0].starts_with("Unsynchronised"), "{seen:?}");
    assert!(seen[1].starts_with("Resynchronised"), "{seen:?}");
    assert!(seen[2].contains("Query"), "{seen:?}");
    assert!(seen[3].contains("Sync"), "{seen:?}");
}

#[test]
fn a_mid_stream_decoder_accepts_a_chunk_that_starts_a_long_message() {
    let big = query(&"x".repeat(5000));
    let mut decoder = FrontendDecoder::mid_stream();
    let seen = frontend_all(&[&big[..1000], &big[1000..]], &mut decoder);
    assert!(seen[0].starts_with("Resynchronised"), "{seen:?}");
    assert!(seen[1].contains("Query"), "{seen:?}");
}

#[test]
fn a_mid_stream_decoder_rejects_a_run_that_does_not_fill_the_chunk() {
    let mut bytes = query("SELECT 1");
    bytes.extend_from_slice(b"\x00\x00");
    let seen = frontend_all(&[&bytes], &mut FrontendDecoder::mid_stream());
    assert_eq!(seen.len(), 1);
    assert!(seen[0].starts_with("Unsynchronised"), "{seen:?}");
}

#[test]
fn a_gap_drops_the_partial_message_and_resumes_at_the_next_boundary() {
    let mut decoder = FrontendDecoder::new();
    let mut bytes = startup(&[("user", "u")]);
    let q = query("SELECT 'lost'");
    bytes.extend_from_slice(&q[..6]);
    let mut seen = frontend_all(&[&bytes], &mut decoder);
    decoder.gap();
    decoder.push(500, &query("SELECT 3"), &mut |d| {
        seen.push(format!("{d:?}"))
    });
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen[1].starts_with("Resynchronised { offset: 500 }"),
        "{seen:?}"
    );
    assert!(seen[2].contains("Query"), "{seen:?}");
}

#[test]
fn direct_tls_is_reported_instead_of_a_startup_error() {
    let client_hello = [0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5];
    let seen = frontend_messages(&client_hello);
    assert_eq!(seen.len(), 1);
    assert!(seen[0].contains("Tls"), "{seen:?}");
}

#[test]
fn the_one_byte_ssl_answer_is_decoded_only_when_expected() {
    let mut decoder = BackendDecoder::new();
    decoder.expect_encryption_answer();
    let mut bytes = vec![b'N'];
    bytes.extend(auth(0, &[]));
    let seen = backend_all(&[&bytes], &mut decoder);
    assert!(
        seen[0].contains("EncryptionResponse { accepted: false }"),
        "{seen:?}"
    );
    assert!(seen[1].contains("Authentication(Ok)"), "{seen:?}");

    let mut decoder = BackendDecoder::new();
    decoder.expect_encryption_answer();
    let seen = backend_all(&[b"S\x16\x03\x03\x00\x10"], &mut decoder);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].contains("accepted: true"), "{seen:?}");
}
