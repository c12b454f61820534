use super::{
    conversation::{Carrier, ClientPacket, Outcome},
    packet::{self, caps, Command, Login},
    *,
};

/// One physical packet.
fn pkt(seq: u8, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_le_bytes()[..3].to_vec();
    out.push(seq);
    out.extend_from_slice(payload);
    out
}

fn frames(framer: &mut Framer, bytes: &[u8], split: usize) -> Vec<Result<Frame, MysqlError>> {
    let mut out = Vec::new();
    let mut offset = 0;
    for chunk in bytes.chunks(split.max(1)) {
        framer.push(offset, chunk, &mut |f| out.push(f));
        offset += chunk.len() as u64;
    }
    out
}

#[test]
fn packets_split_anywhere_frame_alike() {
    let mut stream = pkt(0, b"\x03SELECT 1");
    stream.extend(pkt(0, b"\x0e"));
    stream.extend(pkt(0, b""));
    stream.extend(pkt(7, b"\x03SELECT 'x'"));
    let whole = frames(&mut Framer::client(), &stream, stream.len());
    assert_eq!(whole.len(), 4);
    let first = whole[0].clone().unwrap();
    assert_eq!(
        (first.offset, first.wire_len, first.seq, first.len),
        (0, 13, 0, 9)
    );
    assert_eq!(first.payload, b"\x03SELECT 1");
    let last = whole[3].clone().unwrap();
    assert_eq!((last.offset, last.seq), (22, 7));
    for split in 1..stream.len() {
        assert_eq!(
            frames(&mut Framer::client(), &stream, split),
            whole,
            "split every {split} bytes"
        );
    }
}

#[test]
fn a_payload_of_16_mib_is_joined_with_its_continuation() {
    let mut text = vec![b'a'; MAX_PAYLOAD + 10];
    text[0] = 0x03;
    let mut stream = pkt(0, &text[..MAX_PAYLOAD]);
    stream.extend(pkt(1, &text[MAX_PAYLOAD..]));
    stream.extend(pkt(0, b"\x0e"));
    let out = frames(&mut Framer::client(), &stream, 1 << 20);
    assert_eq!(out.len(), 2, "one logical packet, then the ping");
    let big = out[0].clone().unwrap();
    assert_eq!(big.len, MAX_PAYLOAD + 10);
    assert_eq!(big.payload, text);
    assert_eq!(big.wire_len, (MAX_PAYLOAD + 10 + 8) as u64);
    // Exactly 16 MiB − 1 needs an empty continuation.
    let mut stream = pkt(0, &text[..MAX_PAYLOAD]);
    stream.extend(pkt(1, b""));
    let out = frames(&mut Framer::client(), &stream, 1 << 20);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].clone().unwrap().len, MAX_PAYLOAD);
    // A continuation out of sequence ends decoding.
    let mut stream = pkt(0, &text[..MAX_PAYLOAD]);
    stream.extend(pkt(5, b"x"));
    let out = frames(&mut Framer::client(), &stream, 1 << 20);
    assert_eq!(
        out,
        vec![Err(MysqlError::Sequence {
            expected: 1,
            got: 5
        })]
    );
}

#[test]
fn server_packets_keep_a_prefix_and_client_packets_have_a_ceiling() {
    let row = vec![7u8; 5000];
    let out = frames(&mut Framer::server(), &pkt(3, &row), 333);
    let f = out[0].clone().unwrap();
    assert_eq!((f.len, f.payload.len()), (5000, SERVER_PREFIX));
    let mut small = Framer::new("client", 100);
    let out = frames(&mut small, &pkt(0, &[b'x'; 101]), 7);
    assert!(
        matches!(out[..], [Err(MysqlError::TooLong { len: 101, .. })]),
        "{out:?}"
    );
    // Nothing more after an error, whatever comes.
    let mut after = Vec::new();
    small.push(200, &pkt(0, b"\x0e"), &mut |f| after.push(f));
    assert!(after.is_empty());
}

fn greeting_payload(caps_low: u16, caps_high: u16) -> Vec<u8> {
    let mut g = vec![10];
    g.extend_from_slice(b"10.11.6-MariaDB-0+deb12u1\0");
    g.extend_from_slice(&42u32.to_le_bytes());
    g.extend_from_slice(b"12345678\0");
    g.extend_from_slice(&caps_low.to_le_bytes());
    g.push(45);
    g.extend_from_slice(&2u16.to_le_bytes());
    g.extend_from_slice(&caps_high.to_le_bytes());
    g.push(21);
    g.extend_from_slice(&[0; 10]);
    g.extend_from_slice(b"abcdefghijkl\0");
    g.extend_from_slice(b"mysql_native_password\0");
    g
}

const CLIENT: u32 = caps::PROTOCOL_41
    | caps::SECURE_CONNECTION
    | caps::PLUGIN_AUTH
    | caps::CONNECT_WITH_DB
    | caps::CONNECT_ATTRS
    | caps::MULTI_STATEMENTS
    | caps::LOCAL_FILES;

fn login_payload(capabilities: u32, user: &str, db: Option<&str>) -> Vec<u8> {
    let capabilities = match db {
        Some(_) => capabilities,
        None => capabilities & !caps::CONNECT_WITH_DB,
    };
    let mut l = capabilities.to_le_bytes().to_vec();
    l.extend_from_slice(&(16u32 << 20).to_le_bytes());
    l.push(45);
    l.extend_from_slice(&[0; 23]);
    l.extend_from_slice(user.as_bytes());
    l.push(0);
    l.push(20);
    l.extend_from_slice(&[0xAB; 20]);
    if let Some(db) = db {
        l.extend_from_slice(db.as_bytes());
        l.push(0);
    }
    l.extend_from_slice(b"mysql_native_password\0");
    let mut attrs = Vec::new();
    for (k, v) in [("_client_name", "libmariadb"), ("program_name", "mariadb")] {
        attrs.push(k.len() as u8);
        attrs.extend_from_slice(k.as_bytes());
        attrs.push(v.len() as u8);
        attrs.extend_from_slice(v.as_bytes());
    }
    l.push(attrs.len() as u8);
    l.extend(attrs);
    l
}

/// MariaDB turns to TLS on the SSL capability alone: a full login with
/// the bit is an SSL request (the real login follows inside TLS).
#[test]
fn a_login_with_the_ssl_capability_is_an_ssl_request() {
    let login = login_payload(CLIENT | caps::SSL, "n", Some("shop"));
    assert!(matches!(packet::login(&login).unwrap(), Login::Ssl { .. }));
}

#[test]
fn greeting_and_login_fields() {
    let g = packet::greeting(&greeting_payload(0xf7fe, 0x81bf)).unwrap();
    assert_eq!(g.version, "10.11.6-MariaDB-0+deb12u1");
    assert_eq!(g.connection_id, 42);
    assert_eq!(g.capabilities, 0x81bf_f7fe);
    assert_eq!(g.collation, Some(45));
    let Login::Response(l) = packet::login(&login_payload(CLIENT, "alice", Some("shop"))).unwrap()
    else {
        panic!("a login")
    };
    assert_eq!(l.user, "alice");
    assert_eq!(l.database.as_deref(), Some("shop"));
    assert_eq!(l.auth_plugin.as_deref(), Some("mysql_native_password"));
    assert_eq!(l.attribute("program_name"), Some("mariadb"));
    let mut ssl = (CLIENT | caps::SSL).to_le_bytes().to_vec();
    ssl.extend_from_slice(&[0; 28]);
    assert!(matches!(packet::login(&ssl), Ok(Login::Ssl { .. })));
    // Cut anywhere inside its fields: an error, never a panic.
    let whole = login_payload(CLIENT, "alice", Some("shop"));
    for n in 0..whole.len() - 1 {
        let _ = packet::login(&whole[..n]);
    }
    assert!(packet::login(&whole[..40]).is_err());
}

#[test]
fn commands_by_their_first_byte() {
    let c = |p: &[u8]| packet::command(p, caps::PROTOCOL_41);
    assert_eq!(
        c(b"\x03SELECT 1").unwrap(),
        Command::Query {
            text: "SELECT 1".into()
        }
    );
    assert_eq!(
        c(b"\x02shop").unwrap(),
        Command::InitDb {
            database: "shop".into()
        }
    );
    assert_eq!(
        c(b"\x17\x05\x00\x00\x00\x00\x01\x00\x00\x00").unwrap(),
        Command::Execute { statement_id: 5 }
    );
    assert_eq!(c(b"\x01").unwrap(), Command::Quit);
    assert_eq!(c(b"\x0e").unwrap(), Command::Ping);
    assert_eq!(c(b"\x99"), Err(MysqlError::UnknownCommand(0x99)));
    assert!(c(b"\x17\x05").is_err(), "an execute without its id");
    assert!(c(b"").is_err());
    // MySQL 8 query attributes: none, then the text; with values, not read.
    let qa = caps::PROTOCOL_41 | caps::QUERY_ATTRIBUTES;
    assert_eq!(
        packet::command(b"\x03\x00\x01SELECT 2", qa).unwrap(),
        Command::Query {
            text: "SELECT 2".into()
        }
    );
    // One string attribute `a` = "xy" (type 0xFE), not NULL.
    assert_eq!(
        packet::command(b"\x03\x01\x01\x00\x01\xfe\x00\x01a\x02xySELECT 3", qa).unwrap(),
        Command::Query {
            text: "SELECT 3".into()
        }
    );
    // A NULL one has no value; a LONGLONG has 8 bytes.
    assert_eq!(
        packet::command(
            b"\x03\x02\x01\x01\x01\xfe\x00\x01a\x08\x00\x01b\x2a\x00\x00\x00\x00\x00\x00\x00SELECT 4",
            qa
        )
        .unwrap(),
        Command::Query {
            text: "SELECT 4".into()
        }
    );
    // Cut inside its attributes, or an unknown type: an error, never a panic.
    assert!(packet::command(b"\x03\x01\x01\x00\x01\xfe\x00\x01a\x09xy", qa).is_err());
    assert!(packet::command(b"\x03\x01\x01\x00\x01\x42\x00\x01a\x02xySELECT 3", qa).is_err());
}

#[test]
fn replies_by_their_first_byte_and_length() {
    assert_eq!(
        packet::reply(b"\x00\x03\x07\x02\x00\x00\x00", 7).unwrap(),
        packet::Reply::Ok {
            affected_rows: 3,
            last_insert_id: 7,
            status: 2
        }
    );
    assert_eq!(
        packet::reply(b"\x00\xfc\x10\x27\x00\x02\x00\x00\x00", 9).unwrap(),
        packet::Reply::Ok {
            affected_rows: 10_000,
            last_insert_id: 0,
            status: 2
        }
    );
    assert_eq!(
        packet::reply(b"\xff\x7a\x04#42S02Table 'shop.t' doesn't exist", 40).unwrap(),
        packet::Reply::Err {
            code: 1146,
            sqlstate: Some("42S02".into()),
            message: "Table 'shop.t' doesn't exist".into()
        }
    );
    assert_eq!(
        packet::reply(b"\xfe\x00\x00\x0a\x00", 5).unwrap(),
        packet::Reply::Eof { status: 10 }
    );
    assert_eq!(
        packet::reply(b"\xfb/etc/passwd", 12).unwrap(),
        packet::Reply::LocalInfile {
            file: "/etc/passwd".into()
        }
    );
    // A row whose first column is 16 MiB or more starts with 0xFE too.
    assert_eq!(
        packet::reply(b"\xfe\x00\x00\x00\x01", 20_000_000).unwrap(),
        packet::Reply::Data
    );
    assert_eq!(packet::reply(b"\x01", 1).unwrap(), packet::Reply::Data);
}

/// Feeds a conversation in order: (from the client?, packet bytes).
/// The events of `steps`, without the server's `NoBackslashEscapes`
/// reports (`converse_all` keeps them).
fn converse(c: &mut Conversation, steps: &[(bool, Vec<u8>)]) -> Vec<MysqlEvent> {
    converse_all(c, steps)
        .into_iter()
        .filter(|e| !matches!(e, MysqlEvent::NoBackslashEscapes(_)))
        .collect()
}

fn converse_all(c: &mut Conversation, steps: &[(bool, Vec<u8>)]) -> Vec<MysqlEvent> {
    run_script(c, steps).0
}

/// Frames and feeds `steps` (client or server bytes) to `c`: its events, and
/// what each client packet was to the gate.
fn run_script(
    c: &mut Conversation,
    steps: &[(bool, Vec<u8>)],
) -> (Vec<MysqlEvent>, Vec<ClientPacket>) {
    let (mut client, mut server) = (Framer::client(), Framer::server());
    let (mut co, mut so) = (0u64, 0u64);
    let (mut out, mut seen) = (Vec::new(), Vec::new());
    for (from_client, bytes) in steps {
        let mut got = Vec::new();
        if *from_client {
            client.push(co, bytes, &mut |f| got.push(f));
            co += bytes.len() as u64;
        } else {
            server.push(so, bytes, &mut |f| got.push(f));
            so += bytes.len() as u64;
        }
        for f in got {
            let f = f.expect("framed");
            if *from_client {
                seen.push(c.client(&f, &mut out));
            } else {
                c.server(&f, &mut out);
            }
        }
    }
    (out, seen)
}

fn ok(seq: u8, affected: u64, status: u16) -> Vec<u8> {
    let mut p = vec![0];
    if affected < 0xfb {
        p.push(affected as u8);
    } else {
        p.push(0xfc);
        p.extend_from_slice(&(affected as u16).to_le_bytes());
    }
    p.push(0);
    p.extend_from_slice(&status.to_le_bytes());
    p.extend_from_slice(&[0, 0]);
    pkt(seq, &p)
}

fn eof(seq: u8, status: u16) -> Vec<u8> {
    let mut p = vec![0xfe, 0, 0];
    p.extend_from_slice(&status.to_le_bytes());
    pkt(seq, &p)
}

fn err(seq: u8, code: u16, state: &str, message: &str) -> Vec<u8> {
    let mut p = vec![0xff];
    p.extend_from_slice(&code.to_le_bytes());
    p.push(b'#');
    p.extend_from_slice(state.as_bytes());
    p.extend_from_slice(message.as_bytes());
    pkt(seq, &p)
}

/// A text result set of one column and `rows` rows, old style.
fn rows(first_seq: u8, n: usize, status: u16) -> Vec<u8> {
    let mut out = pkt(first_seq, b"\x01");
    out.extend(pkt(
        first_seq + 1,
        b"\x03def\x04shop\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    ));
    out.extend(eof(first_seq + 2, 0));
    for i in 0..n {
        out.extend(pkt(first_seq + 3 + i as u8, b"\x011"));
    }
    out.extend(eof(first_seq + 3 + n as u8, status));
    out
}

fn statement(carrier: Carrier, text: &str) -> MysqlEvent {
    MysqlEvent::Statement {
        carrier,
        text: Some(text.into()),
        statement_id: None,
    }
}

fn done(affected_rows: u64, rows: u64) -> MysqlEvent {
    MysqlEvent::Completed {
        outcome: Outcome::Ok {
            affected_rows,
            rows,
        },
        more: false,
    }
}

fn more(affected_rows: u64, rows: u64) -> MysqlEvent {
    MysqlEvent::Completed {
        outcome: Outcome::Ok {
            affected_rows,
            rows,
        },
        more: true,
    }
}

#[test]
fn a_session_from_greeting_to_quit() {
    let mut c = Conversation::new();
    let mut script = vec![
        (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
        (true, pkt(1, &login_payload(CLIENT, "alice", Some("shop")))),
        (false, ok(2, 0, 2)),
        (true, pkt(0, b"\x03SELECT a FROM t")),
        (false, rows(1, 3, 2)),
        (true, pkt(0, b"\x03INSERT INTO t VALUES (1),(2)")),
        (false, ok(1, 2, 2)),
        (true, pkt(0, b"\x03DROP TABLE nope")),
        (false, err(1, 1051, "42S02", "Unknown table 'shop.nope'")),
        // Two statements in one COM_QUERY: two results.
        (true, pkt(0, b"\x03UPDATE t SET a = 2; SELECT a FROM t")),
        (false, ok(1, 2, 2 | packet::MORE_RESULTS)),
        (false, rows(2, 2, 2)),
        (true, pkt(0, b"\x02other")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x0e")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x01")),
    ];
    let events = converse(&mut c, &script);
    assert_eq!(
        events,
        vec![
            MysqlEvent::Greeting {
                version: "10.11.6-MariaDB-0+deb12u1".into(),
                connection_id: 42
            },
            MysqlEvent::Login {
                user: "alice".into(),
                database: Some("shop".into()),
                program: Some("mariadb".into()),
                collation: 45,
                server_collation: Some(45),
            },
            MysqlEvent::LoggedIn,
            statement(Carrier::Query, "SELECT a FROM t"),
            done(0, 3),
            statement(Carrier::Query, "INSERT INTO t VALUES (1),(2)"),
            done(2, 0),
            statement(Carrier::Query, "DROP TABLE nope"),
            MysqlEvent::Completed {
                outcome: Outcome::Error {
                    code: 1051,
                    sqlstate: Some("42S02".into()),
                    message: "Unknown table 'shop.nope'".into()
                },
                more: false
            },
            statement(Carrier::Query, "UPDATE t SET a = 2; SELECT a FROM t"),
            more(2, 0),
            done(0, 2),
            MysqlEvent::Database {
                name: "other".into()
            },
            MysqlEvent::Quit,
        ]
    );
    assert!(c.is_done());
    // The same bytes, each direction cut into 3-byte pieces: the same events.
    let mut cut = Vec::new();
    for (side, bytes) in script.drain(..) {
        for piece in bytes.chunks(3) {
            cut.push((side, piece.to_vec()));
        }
    }
    assert_eq!(converse(&mut Conversation::new(), &cut), events);
}

#[test]
fn prepared_statements_are_named_by_their_text() {
    let mut c = Conversation::mid_stream();
    let mut prepare_ok = vec![0];
    prepare_ok.extend_from_slice(&9u32.to_le_bytes());
    prepare_ok.extend_from_slice(&0u16.to_le_bytes()); // columns
    prepare_ok.extend_from_slice(&1u16.to_le_bytes()); // params
    prepare_ok.extend_from_slice(&[0, 0, 0]);
    let execute = |id: u32| {
        let mut e = vec![0x17];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&[0, 1, 0, 0, 0]);
        e
    };
    let events = converse(
        &mut c,
        &[
            (true, pkt(0, b"\x16DELETE FROM t WHERE id = ?")),
            (false, pkt(1, &prepare_ok)),
            (false, pkt(2, b"\x03def\x00\x00\x00\x01?\x00\x0c\x3f\x00\x00\x00\x00\x00\xfd\x80\x00\x00\x00\x00")),
            (false, eof(3, 2)),
            (true, pkt(0, &execute(9))),
            (false, ok(1, 1, 2)),
            // MariaDB: the statement prepared last.
            (true, pkt(0, &execute(u32::MAX))),
            (false, ok(1, 0, 2)),
            (true, pkt(0, b"\x19\x09\x00\x00\x00")),
            (true, pkt(0, &execute(9))),
            (false, err(1, 1243, "HY000", "Unknown prepared statement handler")),
        ],
    );
    let exec = |text: Option<&str>| MysqlEvent::Statement {
        carrier: Carrier::Execute,
        text: text.map(str::to_owned),
        statement_id: Some(9),
    };
    assert_eq!(
        events,
        vec![
            statement(Carrier::Prepare, "DELETE FROM t WHERE id = ?"),
            done(0, 0),
            exec(Some("DELETE FROM t WHERE id = ?")),
            done(1, 0),
            exec(Some("DELETE FROM t WHERE id = ?")),
            done(0, 0),
            // Closed: the text is gone, and the server agrees.
            exec(None),
            MysqlEvent::Completed {
                outcome: Outcome::Error {
                    code: 1243,
                    sqlstate: Some("HY000".into()),
                    message: "Unknown prepared statement handler".into()
                },
                more: false
            },
        ]
    );
}

#[test]
fn a_local_infile_transfer_is_data_whatever_its_bytes_say() {
    let mut c = Conversation::mid_stream();
    let mut script = vec![
        (
            true,
            pkt(0, b"\x03LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"),
        ),
        (false, pkt(1, b"\xfbx.csv")),
    ];
    // 300 file packets: the sequence id wraps to 0, and one of them looks
    // exactly like a COM_QUERY.
    for i in 0..300u32 {
        let seq = (2 + i) as u8;
        let body: &[u8] = if seq == 0 {
            b"\x03DROP TABLE t"
        } else {
            b"1,2\n"
        };
        script.push((true, pkt(seq, body)));
    }
    script.push((true, pkt((2 + 300u32) as u8, b"")));
    script.push((false, ok(47, 300, 2)));
    let events = converse(&mut c, &script);
    assert_eq!(
        events,
        vec![
            statement(
                Carrier::Query,
                "LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"
            ),
            done(300, 0),
        ]
    );
}

#[test]
fn new_style_result_sets_end_with_an_ok() {
    // CLIENT_DEPRECATE_EOF, learnt from the login.
    let mut c = Conversation::new();
    let client = CLIENT | caps::DEPRECATE_EOF;
    let mut result = pkt(1, b"\x01");
    result.extend(pkt(
        2,
        b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    ));
    result.extend(pkt(3, b"\x011"));
    result.extend(pkt(4, b"\x012"));
    result.extend(pkt(5, b"\xfe\x00\x00\x02\x00\x00\x00"));
    let mut empty = pkt(1, b"\x01");
    empty.extend(pkt(
        2,
        b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00",
    ));
    empty.extend(pkt(3, b"\xfe\x00\x00\x02\x00\x00\x00"));
    let events = converse(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81ff))),
            (true, pkt(1, &login_payload(client, "bob", None))),
            (false, ok(2, 0, 2)),
            (true, pkt(0, b"\x03SELECT a FROM t")),
            (false, result.clone()),
            (true, pkt(0, b"\x03SELECT a FROM t WHERE false")),
            (false, empty.clone()),
        ],
    );
    assert_eq!(
        &events[3..],
        &[
            statement(Carrier::Query, "SELECT a FROM t"),
            done(0, 2),
            statement(Carrier::Query, "SELECT a FROM t WHERE false"),
            done(0, 0),
        ]
    );
    // Mid-stream the style is learnt from the first result set's shape.
    let mut c = Conversation::mid_stream();
    let events = converse(
        &mut c,
        &[
            (true, pkt(0, b"\x03SELECT a FROM t WHERE false")),
            (false, empty),
            (true, pkt(0, b"\x03SELECT a FROM t")),
            (false, result),
        ],
    );
    assert_eq!(events[1], done(0, 0));
    assert_eq!(events[3], done(0, 2));
}

#[test]
fn tls_a_failed_login_and_garbage_end_the_conversation() {
    let mut ssl = (CLIENT | caps::SSL).to_le_bytes().to_vec();
    ssl.extend_from_slice(&[0; 28]);
    let events = converse(
        &mut Conversation::new(),
        &[
            (false, pkt(0, &greeting_payload(0xffff, 0x81bf))),
            (true, pkt(1, &ssl)),
            (true, vec![0x16, 0x03, 0x01, 0x02, 0x00]),
        ],
    );
    assert_eq!(events[1], MysqlEvent::Encrypted);
    assert_eq!(events.len(), 2, "nothing read after TLS: {events:?}");
    let events = converse(
        &mut Conversation::new(),
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "mallory", None))),
            (
                false,
                err(2, 1045, "28000", "Access denied for user 'mallory'"),
            ),
        ],
    );
    assert_eq!(
        events[2],
        MysqlEvent::LoginFailed {
            code: 1045,
            message: "Access denied for user 'mallory'".into()
        }
    );
    // A command out of sequence, an unknown command: undecodable, once.
    for bad in [pkt(3, b"\x03SELECT 1"), pkt(0, b"\x99")] {
        let events = converse(
            &mut Conversation::mid_stream(),
            &[(true, bad.clone()), (true, pkt(0, b"\x03SELECT 2"))],
        );
        assert!(
            matches!(events[..], [MysqlEvent::Undecodable { side: "client", .. }]),
            "{events:?}"
        );
    }
}

#[test]
fn random_bytes_never_panic() {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    for _ in 0..2000 {
        let mut steps = Vec::new();
        for _ in 0..(next() % 8) {
            let len = (next() % 40) as usize;
            let mut payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if next() % 2 == 0 && !payload.is_empty() {
                payload[0] = [0x00, 0x03, 0x16, 0x17, 0xfe, 0xff, 0xfb][(next() % 7) as usize];
            }
            let seq = (next() % 3) as u8;
            steps.push((next() % 2 == 0, pkt(seq, &payload)));
        }
        let start = if next() % 2 == 0 {
            Conversation::new()
        } else {
            Conversation::mid_stream()
        };
        let mut c = start;
        let _ = converse(&mut c, &steps);
    }
}

/// `COM_INIT_DB`, `USE` (plain, unreadable, hidden in an executable
/// comment, failed) and `COM_CHANGE_USER`, through the tracker's MySQL
/// streams: each accepted one is a new identity, reported after the
/// statement that made it; a failed one changes nothing.
#[test]
fn identity_changes_are_followed() {
    use super::track::MysqlStreams;
    use crate::wire::{tcp::Delivery, ConnId, WireEvent};

    let mut change_user = b"\x11bob\0".to_vec();
    change_user.push(20);
    change_user.extend_from_slice(&[0xCD; 20]);
    change_user.extend_from_slice(b"bobdb\0");
    change_user.extend_from_slice(&45u16.to_le_bytes());
    change_user.extend_from_slice(b"mysql_native_password\0");
    let script = vec![
        (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
        (true, pkt(1, &login_payload(CLIENT, "app", Some("shop")))),
        (false, ok(2, 0, 2)),
        (true, pkt(0, b"\x02other")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x03  use `third`")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x03USE nowhere")),
        (false, err(1, 1049, "42000", "Unknown database 'nowhere'")),
        (true, pkt(0, b"\x03SELECT 1; /*!40101 USE fourth */")),
        (false, ok(1, 0, 2 | packet::MORE_RESULTS)),
        (false, ok(2, 0, 2)),
        (true, pkt(0, b"\x03USE fifth")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x03/*M!100100 USE sixth */")),
        (false, ok(1, 0, 2)),
        (true, pkt(0, &change_user)),
        (false, ok(1, 0, 2)),
        (true, pkt(0, b"\x03SELECT 2")),
        (false, ok(1, 0, 2)),
    ];
    let mut streams = MysqlStreams::new(false);
    let (mut client_at, mut server_at) = (0u64, 0u64);
    let mut events = Vec::new();
    for (i, (from_client, bytes)) in script.iter().enumerate() {
        let offset = if *from_client {
            &mut client_at
        } else {
            &mut server_at
        };
        streams.feed(
            *from_client,
            ConnId(1),
            Delivery::Data {
                offset: *offset,
                bytes,
            },
            i as i64,
            None,
            &mut events,
        );
        *offset += bytes.len() as u64;
    }
    let seen: Vec<(Option<String>, Option<String>, Option<String>)> = events
        .iter()
        .filter_map(|e| match e {
            WireEvent::Identified { identity, .. } => Some((
                identity.user.clone(),
                identity.database.clone(),
                identity.application.clone(),
            )),
            _ => None,
        })
        .collect();
    let who = |user: &str, db: Option<&str>| {
        (
            Some(user.to_owned()),
            db.map(str::to_owned),
            Some("mariadb".to_owned()),
        )
    };
    assert_eq!(
        seen,
        vec![
            who("app", Some("shop")),
            who("app", Some("other")),
            who("app", Some("third")),
            // An executable comment runs or not by the server's version
            // (`/*!99999 USE x */` does not on 10.11): unknown, never guessed.
            who("app", None),
            who("app", Some("fifth")),
            // MariaDB's form too.
            who("app", None),
            who("bob", Some("bobdb")),
        ]
    );
    // Each new identity comes after the statement that made it.
    let order: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            WireEvent::Identified { .. } => Some("identified"),
            WireEvent::StatementCompleted { .. } => Some("completed"),
            _ => None,
        })
        .collect();
    assert_eq!(
        order,
        [
            "identified",
            "identified",
            "completed",
            "identified",
            "completed",
            "completed",
            "identified",
            "completed",
            "identified",
            "completed",
            "identified",
            "identified",
            "completed"
        ]
    );
}

/// What each client packet is to the gate, in order.
fn packets(c: &mut Conversation, steps: &[(bool, Vec<u8>)]) -> Vec<ClientPacket> {
    run_script(c, steps).1
}

#[test]
fn the_gate_sees_sql_commands_and_exchanges_apart() {
    let mut c = Conversation::new();
    let seen = packets(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "alice", Some("shop")))),
            // An auth switch: the client's answer is data the server asked for.
            (
                false,
                pkt(2, b"\xfemysql_native_password\x00abcdefghijklmnopqrst\x00"),
            ),
            (true, pkt(3, &[7; 20])),
            (false, ok(4, 0, 2)),
            (true, pkt(0, b"\x03SELECT 1")),
            (false, ok(1, 0, 2)),
            (true, pkt(0, b"\x16DELETE FROM t WHERE id = ?")),
            (false, err(1, 1146, "42S02", "no")),
            (true, pkt(0, b"\x0e")),
            (false, ok(1, 0, 2)),
            (true, pkt(0, b"\x0c\x05\x00\x00\x00")),
            (false, ok(1, 0, 2)),
            (true, pkt(0, b"\x08")),
            (false, ok(1, 0, 2)),
            (true, pkt(0, b"\x17\x09\x00\x00\x00\x00\x01\x00\x00\x00")),
        ],
    );
    let sql = |carrier, text: &str| ClientPacket::Sql {
        carrier,
        text: text.into(),
        text_at: 1,
    };
    assert_eq!(
        seen,
        [
            ClientPacket::Login {
                user: "alice".into()
            },
            ClientPacket::Exchange,
            sql(Carrier::Query, "SELECT 1"),
            sql(Carrier::Prepare, "DELETE FROM t WHERE id = ?"),
            ClientPacket::Plain,
            ClientPacket::Command {
                text: "KILL 5".into()
            },
            ClientPacket::Command {
                text: "SHUTDOWN".into()
            },
            // Statement 9 was never prepared here: its text is unknown.
            ClientPacket::Command {
                text: "COM_STMT_EXECUTE of statement 9 prepared before qgate saw it".into()
            },
        ]
    );
}

#[test]
fn a_packet_the_server_did_not_ask_for_during_authentication_is_never_data() {
    // A command written with the login, before the server's OK: MariaDB
    // runs it as a command once it accepts the login.
    let mut c = Conversation::new();
    let seen = packets(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "alice", Some("shop")))),
            (true, pkt(0, b"\x03DROP TABLE t")),
            (false, ok(2, 0, 2)),
            (true, pkt(0, b"\x03SELECT 1")),
        ],
    );
    assert_eq!(
        seen,
        [
            ClientPacket::Login {
                user: "alice".into()
            },
            ClientPacket::Unread,
            ClientPacket::Unread
        ]
    );
    assert!(c.is_done());
    // caching_sha2's "fast authentication succeeded" asks for nothing: an
    // OK follows, and a packet before it is not data either.
    let mut c = Conversation::new();
    let seen = packets(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "alice", None))),
            (false, pkt(2, b"\x01\x03")),
            (true, pkt(3, b"\x03DROP TABLE t")),
        ],
    );
    assert_eq!(
        seen,
        [
            ClientPacket::Login {
                user: "alice".into()
            },
            ClientPacket::Unread
        ]
    );
    // The same holds during a COM_CHANGE_USER: only what the server asked for.
    let mut c = Conversation::new();
    let mut change = b"\x11bob\x00\x00".to_vec();
    change.extend_from_slice(b"shop\x00");
    let seen = packets(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "alice", None))),
            (false, ok(2, 0, 2)),
            (true, pkt(0, &change)),
            (
                false,
                pkt(1, b"\xfemysql_native_password\x00abcdefghijklmnopqrst\x00"),
            ),
            (true, pkt(2, &[7; 20])),
            (true, pkt(0, b"\x03DROP TABLE t")),
        ],
    );
    assert_eq!(
        seen,
        [
            ClientPacket::Login {
                user: "alice".into()
            },
            ClientPacket::Command {
                text: "COM_CHANGE_USER to 'bob'".into()
            },
            ClientPacket::Exchange,
            ClientPacket::Unread,
        ]
    );
}

#[test]
fn mariadbs_metadata_cache_is_followed_when_both_sides_declare_it() {
    // MARIADB_CLIENT_CACHE_METADATA (extended bit 4) in the greeting's last
    // 4 reserved bytes and the login's last 4 filler bytes.
    let mut greeting = greeting_payload(0xf7fe, 0x81bf);
    let reserved = greeting.len() - 22 - 13 - 10;
    greeting[reserved + 6..reserved + 10].copy_from_slice(&(1u32 << 4).to_le_bytes());
    let mut login = login_payload(CLIENT, "alice", Some("shop"));
    login[28..32].copy_from_slice(&(1u32 << 4).to_le_bytes());
    let mut prepare_ok = vec![0];
    prepare_ok.extend_from_slice(&9u32.to_le_bytes());
    prepare_ok.extend_from_slice(&1u16.to_le_bytes()); // columns
    prepare_ok.extend_from_slice(&0u16.to_le_bytes()); // params
    prepare_ok.extend_from_slice(&[0, 0, 0]);
    let column =
        b"\x03def\x04shop\x01t\x01t\x01a\x01a\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00";
    let mut execute = vec![0x17];
    execute.extend_from_slice(&9u32.to_le_bytes());
    execute.extend_from_slice(&[0, 1, 0, 0, 0]);
    let mut c = Conversation::new();
    let events = converse(
        &mut c,
        &[
            (false, pkt(0, &greeting)),
            (true, pkt(1, &login)),
            (false, ok(2, 0, 2)),
            (true, pkt(0, b"\x16SELECT a FROM t")),
            (false, pkt(1, &prepare_ok)),
            (false, pkt(2, column)),
            (false, eof(3, 2)),
            // First execute: "metadata follows" = 1, the definitions come.
            (true, pkt(0, &execute)),
            (false, pkt(1, b"\x01\x01")),
            (false, pkt(2, column)),
            (false, eof(3, 0)),
            (false, pkt(4, b"\x00\x00\x01")),
            (false, eof(5, 2)),
            // Then 0: straight to the EOF that ends the (absent) definitions.
            (true, pkt(0, &execute)),
            (false, pkt(1, b"\x01\x00")),
            (false, eof(2, 0)),
            (false, pkt(3, b"\x00\x00\x01")),
            (false, pkt(4, b"\x00\x00\x02")),
            (false, eof(5, 2)),
            (true, pkt(0, b"\x0e")),
            (false, ok(1, 0, 2)),
        ],
    );
    let exec = MysqlEvent::Statement {
        carrier: Carrier::Execute,
        text: Some("SELECT a FROM t".into()),
        statement_id: Some(9),
    };
    let tail: Vec<_> = events
        .into_iter()
        .filter(|e| !matches!(e, MysqlEvent::Greeting { .. } | MysqlEvent::Login { .. }))
        .collect();
    assert_eq!(
        tail,
        vec![
            MysqlEvent::LoggedIn,
            statement(Carrier::Prepare, "SELECT a FROM t"),
            done(0, 0),
            exec.clone(),
            done(0, 1),
            exec,
            done(0, 2),
        ]
    );
    assert!(!c.is_done());
}

#[test]
fn the_servers_no_backslash_escapes_status_is_reported_when_it_changes() {
    let mut c = Conversation::new();
    let events = converse_all(
        &mut c,
        &[
            (false, pkt(0, &greeting_payload(0xf7fe, 0x81bf))),
            (true, pkt(1, &login_payload(CLIENT, "alice", Some("shop")))),
            (false, ok(2, 0, 2)),
            (true, pkt(0, b"\x03SET sql_mode = 'NO_BACKSLASH_ESCAPES'")),
            (false, ok(1, 0, 2 | 0x0200)),
            (true, pkt(0, b"\x03SELECT 1")),
            (false, ok(1, 0, 2 | 0x0200)),
        ],
    );
    let reports: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, MysqlEvent::NoBackslashEscapes(_)))
        .collect();
    assert_eq!(
        reports,
        [
            &MysqlEvent::NoBackslashEscapes(false),
            &MysqlEvent::NoBackslashEscapes(true)
        ]
    );
}

#[test]
fn mariadbs_progress_reports_are_not_answers() {
    // The `mariadb` client asks for progress reports: during a LOAD DATA
    // the server sends ERRs with code 0xFFFF before its OK.
    let mut c = Conversation::mid_stream();
    let mut progress = vec![0xFF, 0xFF, 0xFF, 0x01, 0x02, 0x02];
    progress.extend_from_slice(&[0x00, 0x00, 0x00, 0x05, b'l', b'o', b'a', b'd', b'!']);
    let events = converse(
        &mut c,
        &[
            (
                true,
                pkt(0, b"\x03LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"),
            ),
            (false, pkt(1, b"\xfbx.csv")),
            (true, pkt(2, b"1\n2\n")),
            (true, pkt(3, b"")),
            (false, pkt(4, &progress)),
            (false, ok(5, 2, 2)),
            (true, pkt(0, b"\x03SELECT a FROM t")),
            (false, rows(1, 2, 2)),
        ],
    );
    assert_eq!(
        events,
        vec![
            statement(
                Carrier::Query,
                "LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t"
            ),
            done(2, 0),
            statement(Carrier::Query, "SELECT a FROM t"),
            done(0, 2),
        ]
    );
    assert!(!c.is_done());
}
