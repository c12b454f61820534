//! The wire stage's door, [`Tracker`], on crafted TCP conversations.
use std::net::SocketAddr;

use qgate_agent::{
    capture::Segment,
    flow::{Direction, Flow},
    wire::{Completion, ConnId, Identity, Outcome, ProtocolPath, StmtSeq, Tracker, WireEvent},
};

const SYN: u8 = 0x02;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

fn msg(t: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![t];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend_from_slice(p.as_bytes());
        b.push(0);
    }
    b
}

fn startup(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend(cstrs(&[
        "user",
        user,
        "database",
        database,
        "application_name",
        "pgbench",
        "",
    ]));
    let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
    m.extend(body);
    m
}

fn ssl_request() -> Vec<u8> {
    [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat()
}

fn cancel_request(pid: u32, key: u32) -> Vec<u8> {
    [
        16u32.to_be_bytes(),
        80_877_102u32.to_be_bytes(),
        pid.to_be_bytes(),
        key.to_be_bytes(),
    ]
    .concat()
}

fn query(text: &str) -> Vec<u8> {
    msg(b'Q', &cstrs(&[text]))
}

fn parse(name: &str, text: &str) -> Vec<u8> {
    let mut b = cstrs(&[name, text]);
    b.extend_from_slice(&0u16.to_be_bytes());
    msg(b'P', &b)
}

fn bind(portal: &str, statement: &str) -> Vec<u8> {
    let mut b = cstrs(&[portal, statement]);
    b.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, b'7', 0, 0]);
    msg(b'B', &b)
}

fn execute(portal: &str) -> Vec<u8> {
    let mut b = cstrs(&[portal]);
    b.extend_from_slice(&0u32.to_be_bytes());
    msg(b'E', &b)
}

fn describe_portal(portal: &str) -> Vec<u8> {
    let mut b = vec![b'P'];
    b.extend(cstrs(&[portal]));
    msg(b'D', &b)
}

fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

fn auth_ok() -> Vec<u8> {
    msg(b'R', &0u32.to_be_bytes())
}

fn backend_key(pid: u32, key: u32) -> Vec<u8> {
    msg(b'K', &[pid.to_be_bytes(), key.to_be_bytes()].concat())
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

fn complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstrs(&[tag]))
}

fn error(code: &str, message: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (f, v) in [(b'S', "ERROR"), (b'C', code), (b'M', message)] {
        b.push(f);
        b.extend(cstrs(&[v]));
    }
    b.push(0);
    msg(b'E', &b)
}

fn data_row(value: &[u8]) -> Vec<u8> {
    let mut b = 1u16.to_be_bytes().to_vec();
    b.extend_from_slice(&(value.len() as u32).to_be_bytes());
    b.extend_from_slice(value);
    msg(b'D', &b)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

/// One TCP connection, producing segments as the capture would see them.
struct Conn {
    flow: Flow,
    client_seq: u32,
    server_seq: u32,
    at: i64,
}

impl Conn {
    fn new(client_port: u16) -> Self {
        Self::with_isn(client_port, 1000, 5000)
    }

    fn with_isn(client_port: u16, client_isn: u32, server_isn: u32) -> Self {
        let client: SocketAddr = format!("10.0.0.2:{client_port}").parse().expect("address");
        let server: SocketAddr = "10.0.0.1:5432".parse().expect("address");
        Self {
            flow: Flow { client, server },
            client_seq: client_isn,
            server_seq: server_isn,
            at: 1_700_000_000_000_000_000,
        }
    }

    fn segment(&mut self, direction: Direction, flags: u8, payload: &[u8]) -> Segment {
        self.at += 1000;
        let seq = match direction {
            Direction::ToServer => &mut self.client_seq,
            Direction::FromServer => &mut self.server_seq,
        };
        let segment = Segment {
            flow: self.flow,
            direction,
            seq: *seq,
            tcp_flags: flags,
            at: self.at,
            payload: payload.to_vec(),
            truncated: false,
            held: false,
            refused: false,
            tcp_header: Vec::new(),
        };
        *seq = seq.wrapping_add(payload.len() as u32 + u32::from(flags & (SYN | FIN) != 0));
        segment
    }

    fn handshake(&mut self) -> Vec<Segment> {
        vec![
            self.segment(Direction::ToServer, SYN, b""),
            self.segment(Direction::FromServer, SYN | ACK, b""),
        ]
    }

    fn client(&mut self, payload: &[u8]) -> Segment {
        self.segment(Direction::ToServer, ACK, payload)
    }

    fn server(&mut self, payload: &[u8]) -> Segment {
        self.segment(Direction::FromServer, ACK, payload)
    }

    /// Handshake, StartupMessage, AuthenticationOk … ReadyForQuery.
    fn opened(&mut self, pid: u32) -> Vec<Segment> {
        let mut s = self.handshake();
        s.push(self.client(&startup("alice", "shop")));
        s.push(self.server(&cat(&[auth_ok(), backend_key(pid, 77), ready(b'I')])));
        s
    }
}

fn run(segments: &[Segment]) -> Vec<WireEvent> {
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for s in segments {
        tracker.on_segment(s, &mut events);
    }
    events
}

/// (statement number, text, path, name) of every StatementReceived.
fn received(events: &[WireEvent]) -> Vec<(u64, String, ProtocolPath, Option<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            WireEvent::StatementReceived {
                stmt,
                text,
                path,
                statement_name,
                ..
            } => Some((stmt.0, text.clone(), *path, statement_name.clone())),
            _ => None,
        })
        .collect()
}

fn completed(events: &[WireEvent]) -> Vec<(u64, Completion)> {
    events
        .iter()
        .filter_map(|e| match e {
            WireEvent::StatementCompleted {
                stmt, completion, ..
            } => Some((stmt.0, completion.clone())),
            _ => None,
        })
        .collect()
}

fn ok(tag: &str, rows: Option<u64>) -> Completion {
    Completion {
        outcome: Outcome::Ok,
        tag: Some(tag.to_owned()),
        rows,
        sqlstate: None,
        message: None,
    }
}

fn failed(sqlstate: &str, message: &str) -> Completion {
    Completion {
        outcome: Outcome::Error,
        tag: None,
        rows: None,
        sqlstate: Some(sqlstate.to_owned()),
        message: Some(message.to_owned()),
    }
}

const SKIPPED: &str = "not executed: the server skipped it after an earlier error before Sync";

fn skipped() -> Completion {
    Completion {
        outcome: Outcome::Error,
        tag: None,
        rows: None,
        sqlstate: None,
        message: Some(SKIPPED.to_owned()),
    }
}

#[test]
fn a_connection_is_opened_and_identified_from_its_startup_message() {
    let mut c = Conn::new(40000);
    let events = run(&c.opened(4242));
    // The server's ParameterStatus and ReadyForQuery are reported to the gate.
    assert!(events[2..]
        .iter()
        .all(|e| matches!(e, WireEvent::ServerReport { .. })));
    let events: Vec<WireEvent> = events
        .into_iter()
        .filter(|e| !matches!(e, WireEvent::ServerReport { .. }))
        .collect();
    assert!(matches!(
        events[0],
        WireEvent::ConnectionOpened {
            conn: ConnId(1),
            mid_stream: false,
            ..
        }
    ));
    assert!(matches!(
        &events[1],
        WireEvent::Identified { identity, .. } if *identity == Identity {
            user: Some("alice".into()),
            database: Some("shop".into()),
            application: Some("pgbench".into()),
            settings: Vec::new(),
        }
    ));
    assert_eq!(events.len(), 2);
}

#[test]
fn a_multi_statement_query_is_one_statement_completed_at_ready_for_query() {
    let mut c = Conn::new(40001);
    let mut s = c.opened(1);
    s.push(c.client(&query("INSERT INTO t VALUES (1); DELETE FROM t")));
    s.push(c.server(&complete("INSERT 0 1")));
    s.push(c.server(&complete("DELETE 3")));
    let before_ready = completed(&run(&s));
    s.push(c.server(&ready(b'I')));
    let events = run(&s);
    assert!(before_ready.is_empty());
    assert_eq!(
        received(&events),
        [(
            1,
            "INSERT INTO t VALUES (1); DELETE FROM t".to_owned(),
            ProtocolPath::Simple,
            None
        )]
    );
    assert_eq!(completed(&events), [(1, ok("DELETE 3", Some(3)))]);
}

#[test]
fn a_query_with_an_error_anywhere_completes_as_an_error_with_the_last_tag() {
    let mut c = Conn::new(40002);
    let mut s = c.opened(1);
    s.push(c.client(&query("UPDATE t SET x = 1; SELECT 1/0")));
    s.push(c.server(&cat(&[
        complete("UPDATE 7"),
        error("22012", "division by zero"),
        ready(b'I'),
    ])));
    let events = run(&s);
    assert_eq!(
        completed(&events),
        [(
            1,
            Completion {
                tag: Some("UPDATE 7".into()),
                rows: Some(7),
                ..failed("22012", "division by zero")
            }
        )]
    );
}

#[test]
fn pipelined_queries_in_one_segment_are_answered_in_order() {
    let mut c = Conn::new(40003);
    let mut s = c.opened(1);
    s.push(c.client(&cat(&[query("SELECT 1"), query("SELECT 2")])));
    s.push(c.server(&cat(&[
        data_row(b"1"),
        complete("SELECT 1"),
        ready(b'I'),
        error("42P01", "nope"),
        ready(b'I'),
    ])));
    let events = run(&s);
    assert_eq!(received(&events).len(), 2);
    assert_eq!(
        completed(&events),
        [(1, ok("SELECT 1", Some(1))), (2, failed("42P01", "nope"))]
    );
}

#[test]
fn each_execute_is_a_statement_with_the_prepared_text_and_name() {
    let mut c = Conn::new(40004);
    let mut s = c.opened(1);
    // pgbench -M prepared: Parse once, then Bind/Execute/Sync per transaction.
    s.push(c.client(&cat(&[
        parse("P0_1", "UPDATE a SET b = b + $1"),
        bind("", "P0_1"),
        describe_portal(""),
        execute(""),
        sync(),
    ])));
    s.push(c.server(&cat(&[
        msg(b'1', &[]),
        msg(b'2', &[]),
        msg(b'n', &[]),
        complete("UPDATE 1"),
        ready(b'T'),
    ])));
    s.push(c.client(&cat(&[bind("", "P0_1"), execute(""), sync()])));
    s.push(c.server(&cat(&[msg(b'2', &[]), complete("UPDATE 1"), ready(b'T')])));
    let events = run(&s);
    let text = "UPDATE a SET b = b + $1".to_owned();
    let name = Some("P0_1".to_owned());
    assert_eq!(
        received(&events),
        [
            (1, text.clone(), ProtocolPath::Extended, name.clone()),
            (2, text, ProtocolPath::Extended, name)
        ]
    );
    assert_eq!(
        completed(&events),
        [(1, ok("UPDATE 1", Some(1))), (2, ok("UPDATE 1", Some(1)))]
    );
}

#[test]
fn after_an_error_in_extended_mode_the_executes_before_sync_complete_as_skipped() {
    let mut c = Conn::new(40005);
    let mut s = c.opened(1);
    s.push(c.client(&cat(&[
        parse("", "INSERT INTO t VALUES (1)"),
        bind("", ""),
        execute(""),
        parse("", "INSERT INTO missing VALUES (1)"),
        bind("", ""),
        execute(""),
        parse("", "SELECT 3"),
        bind("", ""),
        execute(""),
        sync(),
        parse("", "SELECT 4"),
        bind("", ""),
        execute(""),
        sync(),
    ])));
    s.push(c.server(&cat(&[
        msg(b'1', &[]),
        msg(b'2', &[]),
        complete("INSERT 0 1"),
        error("42P01", "relation \"missing\" does not exist"),
        ready(b'E'),
        msg(b'1', &[]),
        msg(b'2', &[]),
        data_row(b"4"),
        complete("SELECT 1"),
        ready(b'I'),
    ])));
    let events = run(&s);
    assert_eq!(received(&events).len(), 4);
    assert_eq!(
        completed(&events),
        [
            (1, ok("INSERT 0 1", Some(1))),
            (2, failed("42P01", "relation \"missing\" does not exist")),
            (3, skipped()),
            (4, ok("SELECT 1", Some(1))),
        ]
    );
}

#[test]
fn executes_sent_after_the_error_but_before_sync_are_skipped_too() {
    let mut c = Conn::new(40006);
    let mut s = c.opened(1);
    s.push(c.client(&cat(&[parse("s", "SELECT bad"), bind("", "s")])));
    s.push(c.client(&msg(b'H', &[])));
    s.push(c.server(&error("42703", "column \"bad\" does not exist")));
    s.push(c.client(&cat(&[execute(""), sync()])));
    s.push(c.server(&ready(b'I')));
    s.push(c.client(&query("SELECT 1")));
    s.push(c.server(&cat(&[complete("SELECT 1"), ready(b'I')])));
    let events = run(&s);
    assert_eq!(
        completed(&events),
        [(1, skipped()), (2, ok("SELECT 1", Some(1)))]
    );
}

#[test]
fn copy_from_stdin_is_one_statement_answered_by_the_copy_tag() {
    let mut c = Conn::new(40007);
    let mut s = c.opened(1);
    s.push(c.client(&query("COPY t FROM STDIN")));
    s.push(c.server(&msg(b'G', &[0, 0, 1, 0, 0])));
    s.push(c.client(&cat(&[
        msg(b'd', b"1\ta\n"),
        msg(b'd', b"2\tb\n"),
        msg(b'c', &[]),
    ])));
    s.push(c.server(&cat(&[complete("COPY 2"), ready(b'I')])));
    let events = run(&s);
    assert_eq!(received(&events).len(), 1);
    assert_eq!(completed(&events), [(1, ok("COPY 2", Some(2)))]);
}

#[test]
fn an_accepted_ssl_request_makes_the_connection_opaque() {
    let mut c = Conn::new(40008);
    let mut s = c.handshake();
    s.push(c.client(&ssl_request()));
    s.push(c.server(b"S"));
    s.push(c.client(&[0x16, 0x03, 0x01, 0x00, 0x02, 1, 2]));
    s.push(c.client(&query("SELECT 'looks like a query but is inside TLS'")));
    let events = run(&s);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, WireEvent::Encrypted { .. }))
            .count(),
        1
    );
    assert!(received(&events).is_empty());
    assert!(!events
        .iter()
        .any(|e| matches!(e, WireEvent::Undecodable { .. })));
}

#[test]
fn a_refused_ssl_request_is_followed_by_a_normal_startup() {
    let mut c = Conn::new(40009);
    let mut s = c.handshake();
    s.push(c.client(&ssl_request()));
    s.push(c.server(b"N"));
    s.push(c.client(&startup("bob", "db")));
    s.push(c.server(&cat(&[auth_ok(), ready(b'I')])));
    s.push(c.client(&query("SELECT 1")));
    s.push(c.server(&cat(&[complete("SELECT 1"), ready(b'I')])));
    let events = run(&s);
    assert!(events
        .iter()
        .any(|e| matches!(e, WireEvent::Identified { .. })));
    assert_eq!(completed(&events), [(1, ok("SELECT 1", Some(1)))]);
}

#[test]
fn a_cancel_request_names_the_backend_of_another_connection() {
    let mut main = Conn::new(40010);
    let mut cancel = Conn::new(40011);
    let mut s = main.opened(31337);
    s.push(main.client(&query("SELECT pg_sleep(60)")));
    s.extend(cancel.handshake());
    s.push(cancel.client(&cancel_request(31337, 77)));
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in &s {
        tracker.on_segment(seg, &mut events);
    }
    let cancelled = events.iter().find_map(|e| match e {
        WireEvent::CancelRequested {
            conn, backend_pid, ..
        } => Some((*conn, *backend_pid)),
        _ => None,
    });
    assert_eq!(cancelled, Some((ConnId(2), 31337)));
    assert_eq!(tracker.backend_connection(31337), Some(ConnId(1)));
    assert!(tracker.cancel_key_matches(31337, &77u32.to_be_bytes()));
    assert!(!tracker.cancel_key_matches(31337, &78u32.to_be_bytes()));
}

#[test]
fn terminate_closes_the_connection_once() {
    let mut c = Conn::new(40012);
    let mut s = c.opened(1);
    s.push(c.client(&terminate()));
    s.push(c.segment(Direction::ToServer, FIN | ACK, b""));
    s.push(c.segment(Direction::FromServer, FIN | ACK, b""));
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in &s {
        tracker.on_segment(seg, &mut events);
    }
    let closed = events
        .iter()
        .filter(|e| matches!(e, WireEvent::ConnectionClosed { .. }))
        .count();
    assert_eq!(closed, 1);
    assert!(tracker.is_empty());
}

#[test]
fn a_reset_closes_the_connection_and_ends_its_pending_statement() {
    let mut c = Conn::new(40013);
    let mut s = c.opened(1);
    s.push(c.client(&query("DELETE FROM t")));
    s.push(c.segment(Direction::FromServer, RST, b""));
    let events = run(&s);
    let outcome = completed(&events);
    assert_eq!(outcome.len(), 1);
    assert_eq!(outcome[0].1.outcome, Outcome::Error);
    assert!(matches!(
        events.last(),
        Some(WireEvent::ConnectionClosed { .. })
    ));
}

#[test]
fn retransmitted_overlapping_and_reordered_segments_give_the_same_events() {
    let mut c = Conn::new(40014);
    let mut s = c.opened(9);
    let q = cat(&[query("SELECT 1"), query("SELECT 2")]);
    let base = c.client_seq;
    let clean = {
        let mut t = s.clone();
        t.push(c.client(&q));
        run(&t)
    };
    let template = s[2].clone();
    let piece = |from: usize, to: usize| Segment {
        seq: base.wrapping_add(from as u32),
        payload: q[from..to].to_vec(),
        ..template.clone()
    };
    s.push(piece(10, q.len()));
    s.push(piece(0, 6));
    s.push(piece(0, 6));
    s.push(piece(3, 14));
    s.push(piece(10, q.len()));
    assert_eq!(received(&run(&s)), received(&clean));
}

#[test]
fn a_query_across_the_sequence_number_wrap_is_reassembled_and_located() {
    let mut c = Conn::with_isn(40015, u32::MAX - 40, 7);
    let mut s = c.opened(1);
    let q = query(&format!("SELECT '{}'", "y".repeat(3000)));
    let start_seq = c.client_seq;
    for chunk in q.chunks(1000) {
        s.push(c.client(chunk));
    }
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in &s {
        tracker.on_segment(seg, &mut events);
    }
    assert_eq!(received(&events).len(), 1);
    let span = tracker
        .pending_statement(ConnId(1), StmtSeq(1))
        .expect("the statement is pending");
    assert_eq!(span.message.seq, start_seq);
    assert_eq!(span.message.len, q.len() as u64);
    assert_eq!(span.text, Some(span.message));
    assert_eq!(
        tracker.client_seq_at(ConnId(1), span.message.offset),
        Some(start_seq)
    );
}

#[test]
fn a_one_mib_query_split_over_many_segments_is_one_statement() {
    let mut c = Conn::new(40016);
    let mut s = c.opened(1);
    let text = format!("INSERT INTO t VALUES ('{}')", "z".repeat(1 << 20));
    for chunk in query(&text).chunks(1448) {
        s.push(c.client(chunk));
    }
    let events = run(&s);
    let got = received(&events);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, text);
}

#[test]
fn a_connection_picked_up_mid_stream_resynchronises_with_unknown_identity() {
    let mut c = Conn::new(40017);
    let mut s = vec![
        c.client(b"ROM t WHERE id = 3\0"),
        c.server(&cat(&[complete("DELETE 1"), ready(b'I')])),
    ];
    s.push(c.client(&query("SELECT 42")));
    s.push(c.server(&cat(&[data_row(b"42"), complete("SELECT 1"), ready(b'I')])));
    let events = run(&s);
    assert!(matches!(
        events[0],
        WireEvent::ConnectionOpened {
            mid_stream: true,
            ..
        }
    ));
    assert!(!events
        .iter()
        .any(|e| matches!(e, WireEvent::Identified { .. })));
    assert_eq!(
        received(&events),
        [(1, "SELECT 42".to_owned(), ProtocolPath::Simple, None)]
    );
    assert_eq!(completed(&events), [(1, ok("SELECT 1", Some(1)))]);
}

#[test]
fn an_execute_of_a_statement_prepared_before_pickup_is_undecodable_not_a_statement() {
    let mut c = Conn::new(40018);
    let s = vec![
        c.client(&cat(&[bind("", "P0_1"), execute(""), sync()])),
        c.server(&cat(&[msg(b'2', &[]), complete("UPDATE 1"), ready(b'I')])),
        c.client(&cat(&[
            parse("", "SELECT 1"),
            bind("", ""),
            execute(""),
            sync(),
        ])),
        c.server(&cat(&[
            msg(b'1', &[]),
            msg(b'2', &[]),
            complete("SELECT 1"),
            ready(b'I'),
        ])),
    ];
    let events = run(&s);
    let undecodable: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            WireEvent::Undecodable { reason, .. } => Some(reason),
            _ => None,
        })
        .collect();
    assert_eq!(undecodable.len(), 1, "{undecodable:?}");
    assert!(
        undecodable[0].contains("prepared statement \"P0_1\" whose Parse was not seen"),
        "{undecodable:?}"
    );
    assert_eq!(completed(&events), [(1, ok("SELECT 1", Some(1)))]);
}

#[test]
fn garbage_on_the_port_is_undecodable_once_and_other_connections_are_unaffected() {
    let mut http = Conn::new(40019);
    let mut good = Conn::new(40020);
    let mut s = http.handshake();
    s.extend(good.opened(5));
    s.push(http.client(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
    s.push(good.client(&query("SELECT 1")));
    s.push(http.server(b"HTTP/1.1 400 Bad Request\r\n\r\n"));
    s.push(http.client(b"GET /again HTTP/1.1\r\n\r\n"));
    s.push(good.server(&cat(&[complete("SELECT 1"), ready(b'I')])));
    let events = run(&s);
    let undecodable: Vec<ConnId> = events
        .iter()
        .filter_map(|e| match e {
            WireEvent::Undecodable { conn, .. } => Some(*conn),
            _ => None,
        })
        .collect();
    assert_eq!(undecodable, [ConnId(1)]);
    assert_eq!(completed(&events), [(1, ok("SELECT 1", Some(1)))]);
}

#[test]
fn a_capture_gap_is_reported_and_decoding_resumes_at_the_next_message() {
    let mut c = Conn::new(40021);
    let mut s = c.opened(1);
    let lost = query("SELECT 'this segment is lost'");
    c.client_seq = c.client_seq.wrapping_add(lost.len() as u32);
    s.push(c.client(&query("SELECT 2")));
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in &s {
        tracker.on_segment(seg, &mut events);
    }
    tracker.close_all(0, &mut events);
    assert!(events
        .iter()
        .any(|e| matches!(e, WireEvent::CaptureGap { .. })));
    assert_eq!(
        received(&events),
        [(1, "SELECT 2".to_owned(), ProtocolPath::Simple, None)]
    );
}

#[test]
fn a_truncated_segment_is_a_capture_gap() {
    let mut c = Conn::new(40022);
    let mut s = c.opened(1);
    let q = query("DROP TABLE accounts");
    let mut cut = c.client(&q[..8]);
    cut.truncated = true;
    s.push(cut);
    let events = run(&s);
    assert!(events
        .iter()
        .any(|e| matches!(e, WireEvent::CaptureGap { .. })));
    assert!(received(&events).is_empty());
}

#[test]
fn idle_connections_are_expired() {
    let mut c = Conn::new(40023);
    let s = c.opened(1);
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for seg in &s {
        tracker.on_segment(seg, &mut events);
    }
    let late = c.at + 3_600_000_000_000;
    let expired = tracker.expire_idle(late, std::time::Duration::from_secs(60), &mut events);
    assert_eq!(expired, 1);
    assert!(tracker.is_empty());
    assert!(matches!(
        events.last(),
        Some(WireEvent::ConnectionClosed { .. })
    ));
}

#[test]
fn a_reset_or_fin_far_from_the_stream_ends_nothing() {
    let mut c = Conn::new(40100);
    let mut s = c.opened(4243);
    // A forged RST and FIN with sequence numbers the server would drop.
    let mut rst = c.client(b"");
    rst.tcp_flags |= 0x04;
    rst.seq = rst.seq.wrapping_add(0x4000_0000);
    let mut fin = c.client(b"");
    fin.tcp_flags |= 0x01;
    fin.seq = fin.seq.wrapping_sub(0x2000_0000);
    s.push(rst);
    s.push(fin);
    s.push(c.client(&query("SELECT 1")));
    let events = run(&s);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, WireEvent::ConnectionClosed { .. })),
        "{events:?}"
    );
    assert_eq!(received(&events).len(), 1, "the connection is still read");
    // The client's own RST, where its stream is, ends it.
    let mut real = c.client(b"");
    real.tcp_flags |= 0x04;
    s.push(real);
    let events = run(&s);
    assert!(events
        .iter()
        .any(|e| matches!(e, WireEvent::ConnectionClosed { .. })));
}

#[test]
fn a_syn_flood_is_bounded_and_leaves_no_record_and_sessions_still_read() {
    use qgate_agent::wire::MAX_CONNECTIONS;
    let mut tracker = Tracker::new();
    let mut events = Vec::new();
    for i in 0..(MAX_CONNECTIONS as u32 + 500) {
        let mut c = Conn::new(1024 + (i % 60_000) as u16);
        c.flow.client = std::net::SocketAddr::new(
            std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)),
            c.flow.client.port(),
        );
        for s in c.handshake() {
            tracker.on_segment(&s, &mut events);
        }
    }
    assert!(
        events.is_empty(),
        "handshakes alone leave no record: {}",
        events.len()
    );
    assert!(tracker.len() <= MAX_CONNECTIONS);
    assert!(tracker.shed() >= 500, "{}", tracker.shed());
    // A real session after the flood is tracked and read.
    let mut c = Conn::new(40200);
    for s in c.opened(4244) {
        tracker.on_segment(&s, &mut events);
    }
    tracker.on_segment(&c.client(&query("SELECT 1")), &mut events);
    assert!(received(&events).len() == 1, "{events:?}");
    assert!(matches!(events[0], WireEvent::ConnectionOpened { .. }));
}

#[test]
fn a_syn_on_a_live_connection_changes_nothing_unless_the_server_accepts_it() {
    let mut c = Conn::new(40300);
    let mut s = c.opened(4245);
    // A forged SYN far from the connection's sequence numbers, and a forged
    // SYN|ACK towards the server: the server ignores both.
    let mut syn = c.client(b"");
    syn.tcp_flags = SYN;
    syn.seq = syn.seq.wrapping_add(0x7000_0000);
    s.push(syn);
    let mut synack = c.client(b"");
    synack.tcp_flags = SYN | ACK;
    synack.seq = synack.seq.wrapping_sub(0x1000_0000);
    s.push(synack);
    s.push(c.client(&query("DELETE FROM t")));
    let events = run(&s);
    let opened = events
        .iter()
        .filter(|e| matches!(e, WireEvent::ConnectionOpened { .. }))
        .count();
    assert_eq!(opened, 1, "no new connection: {events:?}");
    assert_eq!(
        received(&events).len(),
        1,
        "the statement is still read in place"
    );

    // A new connection on the reused address: the server's SYN|ACK
    // acknowledges the client's new SYN.
    let mut reuse = Conn::new(40300);
    reuse.client_seq = c.client_seq.wrapping_add(0x4000_0000);
    let mut again = reuse.handshake();
    let mut synack = again.remove(1);
    let ack = again[0].seq.wrapping_add(1);
    synack.tcp_header = vec![0; 20];
    synack.tcp_header[8..12].copy_from_slice(&ack.to_be_bytes());
    s.extend(again);
    s.push(synack);
    s.push(reuse.client(&startup("bob", "shop")));
    let events = run(&s);
    assert!(
        events
            .iter()
            .any(|e| matches!(e, WireEvent::Identified { identity, .. } if identity.user.as_deref() == Some("bob"))),
        "{events:?}"
    );
}
