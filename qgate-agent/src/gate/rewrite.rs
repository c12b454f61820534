//! Same-length replacement texts for denied statements.
//!
//! A denied Query or Parse is released with its SQL replaced by a statement of
//! exactly the same byte length, so the TCP stream stays consistent and the
//! server itself answers with an ErrorResponse that names qgate and the
//! request. Never an empty or whitespace-only text: the server would answer
//! EmptyQueryResponse, which clients take for success.

/// What a denial's message names, so that the client can quote it to a
/// reviewer or the security team. Never a made-up number: a denial whose
/// audit entry could not be written says so instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenialRef {
    /// A request (`qgate-agent requests show 7`), denied by a reviewer,
    /// expiry, cancel or disconnect.
    Request(i64),
    /// An audit entry of kind `decision`: the policy denied it outright.
    Decision(i64),
    /// The audit write failed (logged and counted in `/metrics`); the
    /// statement is denied all the same.
    Unrecorded,
}

impl std::fmt::Display for DenialRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DenialRef::Request(id) => write!(f, "request {id}"),
            DenialRef::Decision(id) => write!(f, "decision {id}"),
            DenialRef::Unrecorded => f.write_str("unrecorded"),
        }
    }
}

impl DenialRef {
    pub fn request(self) -> Option<i64> {
        match self {
            DenialRef::Request(id) => Some(id),
            _ => None,
        }
    }

    pub fn decision(self) -> Option<i64> {
        match self {
            DenialRef::Decision(id) => Some(id),
            _ => None,
        }
    }

    /// `qgate: request 7 denied`, `qgate: denied (decision 12)`.
    fn head(self) -> String {
        match self {
            DenialRef::Request(id) => format!("qgate: request {id} denied"),
            DenialRef::Decision(id) => format!("qgate: denied (decision {id})"),
            DenialRef::Unrecorded => "qgate: denied (unrecorded)".to_string(),
        }
    }

    /// The shortest name, identifier characters only: `7`, `d12`, `u`.
    fn short(self) -> String {
        match self {
            DenialRef::Request(id) => id.to_string(),
            DenialRef::Decision(id) => format!("d{id}"),
            DenialRef::Unrecorded => "u".to_string(),
        }
    }
}

/// The replacement for `len` bytes of SQL, in order of preference:
/// 1. `DO $$BEGIN RAISE EXCEPTION 'qgate: request 7 denied: reason';END$$`
///    (the client sees exactly that message; the reason is cut to fit);
/// 2. `SHOW "qgate: request 7 denied: reason"` → `unrecognized configuration
///    parameter "qgate: request 7 denied: reason"`;
/// 3. a lone quoted identifier, `"qgate request 7"` down to `"q7"` →
///    `syntax error at or near ""qgate request 7""`;
/// 4. below that, a bare identifier cut to `len` (`q`): still a syntax error.
///
/// The result is padded with spaces to exactly `len` bytes; `len` must be at least 1.
pub fn denial_text(len: usize, denial: DenialRef, reason: &str) -> Vec<u8> {
    const DO_PREFIX: &str = "DO $$BEGIN RAISE EXCEPTION '";
    const DO_SUFFIX: &str = "';END$$";
    // NAMEDATALEN - 1: longer identifiers are truncated by the server.
    const MAX_IDENT: usize = 63;
    let head = denial.head();
    let short = denial.short();
    let clean = sanitize(reason);
    let with_reason = |room: usize| with_reason(&head, &clean, room);
    let do_room = len.saturating_sub(DO_PREFIX.len() + DO_SUFFIX.len());
    let show_room = len.saturating_sub("SHOW \"\"".len()).min(MAX_IDENT);
    let text = if do_room >= head.len() {
        format!("{DO_PREFIX}{}{DO_SUFFIX}", with_reason(do_room))
    } else if show_room >= head.len() {
        format!("SHOW \"{}\"", with_reason(show_room))
    } else {
        shortest_fitting(
            [
                format!("\"{}\"", head.replace(':', "")),
                format!("\"qgate {short}\""),
                format!("\"q{short}\""),
            ],
            len,
        )
    };
    padded(text, len)
}

/// `head`, then `": "` and as much of the (sanitized) reason as fits in
/// `room` bytes, when at least a few of its characters fit.
fn with_reason(head: &str, clean: &str, room: usize) -> String {
    let mut message = head.to_owned();
    if !clean.is_empty() && room >= message.len() + 3 {
        message.push_str(": ");
        let keep = (room - message.len()).min(clean.len());
        message.push_str(&clean[..keep]);
    }
    message
}

/// The first candidate of at most `len` bytes, else a bare identifier cut
/// to `len` (`q`): a syntax error either way.
fn shortest_fitting<const N: usize>(candidates: [String; N], len: usize) -> String {
    candidates
        .into_iter()
        .find(|candidate| candidate.len() <= len)
        .unwrap_or_else(|| {
            let mut ident = "qgate_denied".to_string();
            ident.truncate(len.max(1));
            ident
        })
}

/// `text` padded with spaces to `len` bytes.
fn padded(mut text: String, len: usize) -> Vec<u8> {
    while text.len() < len {
        text.push(' ');
    }
    text.into_bytes()
}

/// The replacement for the held prefix (`len` bytes) of a statement whose
/// rest the client has not sent yet and will send unchanged: it opens a
/// dollar-quoted string with a tag the client cannot guess, so whatever
/// follows is inside it and the server fails with
/// `unterminated dollar-quoted string at or near "$qgate_denied_7_…$"` and
/// runs nothing. `None` when `len` is too short for that.
pub fn prefix_denial_text(len: usize, denial: DenialRef, nonce: u64) -> Option<Vec<u8>> {
    let mut text = format!("SELECT $qgate_denied_{}_{nonce:016x}$", denial.short());
    if text.len() > len {
        return None;
    }
    while text.len() < len {
        text.push(' ');
    }
    Some(text.into_bytes())
}

/// The replacement for the last `len` bytes of a statement whose earlier
/// bytes the server already holds unchanged (the server hook: a long
/// statement's first reads were copied out of the receive buffer before the
/// read that completed it). A newline ends a `--` comment the tail might be
/// in, then a dollar quote opens whose tag occurs nowhere in `text`: in
/// plain code it is an unterminated dollar-quoted string, inside a string,
/// quoted identifier or block comment that construct stays unterminated;
/// either way the whole string fails to parse and nothing of it runs, with
/// `unterminated dollar-quoted string at or near "$qgate_7_…$ …"` in the
/// common case. `None` when `len` is too short for any safe tag.
pub fn tail_denial_text(len: usize, denial: DenialRef, nonce: u64, text: &str) -> Option<Vec<u8>> {
    let short = denial.short();
    let tags = [
        format!("$qgate_{short}_{nonce:016x}$"),
        format!("$qgate_{short}_{:08x}$", nonce as u32),
        format!("$q{:04x}$", nonce as u16),
        "$q$".to_string(),
    ];
    let tag = tags
        .into_iter()
        .find(|tag| tag.len() < len && !text.contains(tag.as_str()))?;
    let mut tail = format!("\n{tag} {}", denial.head());
    tail.truncate(len);
    while tail.len() < len {
        tail.push(' ');
    }
    Some(tail.into_bytes())
}

/// A StartupMessage of exactly `len` bytes (protocol 3.0, "Message
/// Formats") whose user is a role that cannot exist, naming qgate and the
/// refusal: the server answers `FATAL: role "qgate: connection refused …"
/// does not exist` and closes. `None` below the 16 bytes that takes.
pub fn startup_refusal(len: usize, denial: DenialRef, reason: &str) -> Option<Vec<u8>> {
    // Int32 length, Int32 196608 (3.0), "user\0", name, "\0", final "\0".
    const FIXED: usize = 4 + 4 + 5 + 1 + 1;
    let room = len.checked_sub(FIXED).filter(|r| *r >= 1)?;
    let mut name = format!("qgate: connection refused ({denial}): {}", sanitize(reason));
    name.truncate(room);
    while name.len() < room {
        name.push(' ');
    }
    let mut msg = Vec::with_capacity(len);
    msg.extend_from_slice(&(len as u32).to_be_bytes());
    msg.extend_from_slice(&196_608u32.to_be_bytes());
    msg.extend_from_slice(b"user\0");
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(b"\0\0");
    Some(msg)
}

/// Keeps what can sit, unescaped, inside a single-quoted RAISE format in a
/// dollar-quoted body or a quoted identifier: printable ASCII except quotes,
/// dollar, backslash and `%` (a RAISE placeholder).
/// The replacement for `len` bytes of a MySQL/MariaDB statement's text
/// (`COM_QUERY`, or `COM_STMT_PREPARE` when `prepare`), in order of
/// preference:
/// 1. `SIGNAL SQLSTATE'45000'SET MESSAGE_TEXT='qgate: request 7 denied: reason'`
///    (MariaDB runs SIGNAL outside stored programs: the client sees error
///    1644 with exactly that message; not for a prepare, which would
///    succeed and fail only at its execute);
/// 2. a quoted identifier, `` `qgate: request 7 denied: reason` `` down to
///    `` `q7` ``: error 1064, "… near '`qgate: request 7 denied`'" (a
///    prepare fails at once, so no statement id exists to execute);
/// 3. below that, a bare identifier cut to `len` (`q`): still error 1064.
///
/// Padded with spaces to exactly `len` bytes; `len` must be at least 1.
pub fn mysql_denial_text(len: usize, denial: DenialRef, reason: &str, prepare: bool) -> Vec<u8> {
    const SIGNAL_PREFIX: &str = "SIGNAL SQLSTATE'45000'SET MESSAGE_TEXT='";
    // The server cuts a SIGNAL's message at 128 characters.
    const MAX_MESSAGE: usize = 128;
    let head = denial.head();
    let clean: String = sanitize(reason).chars().filter(|&c| c != '`').collect();
    let with_reason = |room: usize| with_reason(&head, &clean, room);
    let signal_room = len.saturating_sub(SIGNAL_PREFIX.len() + 1).min(MAX_MESSAGE);
    let quoted_room = len.saturating_sub(2).min(MAX_MESSAGE);
    let text = if !prepare && signal_room >= head.len() {
        format!("{SIGNAL_PREFIX}{}'", with_reason(signal_room))
    } else if quoted_room >= head.len() {
        format!("`{}`", with_reason(quoted_room))
    } else {
        shortest_fitting(
            [
                format!("`qgate {}`", denial.short()),
                format!("`q{}`", denial.short()),
            ],
            len,
        )
    };
    padded(text, len)
}

/// A MySQL login (`HandshakeResponse41` payload) of exactly `len` bytes
/// that no server accepts, naming qgate and the refusal in its user name:
/// the server answers error 1045 "Access denied for user 'qgate: connection
/// refused (decision 12): …'@'…'" and closes. Capabilities: 4.1 protocol,
/// secure connection and a database (no plugin name, no attributes, so the
/// server cannot switch the authentication); the user is cut at 80
/// characters (MariaDB keeps 128), the auth data is a scramble's 20 bytes
/// when there is room (MariaDB 10.11 answers "Bad handshake" to other
/// lengths without a plugin name) or none, and a database name takes the
/// rest (the login is refused before it is looked at; 3 000 characters
/// tried). `None` below 44 bytes.
pub fn mysql_login_refusal(len: usize, denial: DenialRef, reason: &str) -> Option<Vec<u8>> {
    const PROTOCOL_41: u32 = 0x200;
    const SECURE_CONNECTION: u32 = 0x8000;
    const CONNECT_WITH_DB: u32 = 0x8;
    const USER_MAX: usize = 80;
    const SCRAMBLE: usize = 20;
    // caps, max packet, charset, filler; the user's NUL, the auth length
    // byte, the database's NUL; a database of at least one character.
    const FIXED: usize = 4 + 4 + 1 + 23 + 1 + 1 + 1 + 1;
    let room = len.checked_sub(FIXED).filter(|r| *r >= 8)?;
    let mut user = format!("qgate: connection refused ({denial}): {}", sanitize(reason));
    user.truncate(room.min(USER_MAX));
    let rest = room - user.len();
    let auth = if rest >= SCRAMBLE { SCRAMBLE } else { 0 };
    let database = 1 + rest - auth;
    let mut login = Vec::with_capacity(len);
    login.extend_from_slice(&(PROTOCOL_41 | SECURE_CONNECTION | CONNECT_WITH_DB).to_le_bytes());
    login.extend_from_slice(&(1u32 << 24).to_le_bytes());
    login.push(33);
    login.extend_from_slice(&[0; 23]);
    login.extend_from_slice(user.as_bytes());
    login.push(0);
    login.push(auth as u8);
    login.extend(std::iter::repeat_n(b'q', auth));
    login.extend(std::iter::repeat_n(b'q', database));
    login.push(0);
    debug_assert_eq!(login.len(), len);
    Some(login)
}

fn sanitize(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                ' '
            }
        })
        .filter(|c| !matches!(c, '\'' | '"' | '$' | '\\' | '%'))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_refused_mysql_login_is_a_well_formed_login_of_the_same_length() {
        use super::{mysql_login_refusal, DenialRef};
        assert!(mysql_login_refusal(43, DenialRef::Decision(3), "no").is_none());
        for len in [44, 64, 100, 200, 500, 2000] {
            let p =
                mysql_login_refusal(len, DenialRef::Decision(3), "the 'policy' refuses").unwrap();
            assert_eq!(p.len(), len);
            assert_eq!(u32::from_le_bytes(p[..4].try_into().unwrap()), 0x8208);
            let user_end = 32 + p[32..].iter().position(|&b| b == 0).unwrap();
            let user = std::str::from_utf8(&p[32..user_end]).unwrap();
            assert!(user.starts_with("qgate: c") && user.len() <= 80, "{user}");
            assert!(!user.contains('\''), "{user}");
            let auth = p[user_end + 1] as usize;
            assert!(auth == 0 || auth == 20);
            let db = &p[user_end + 2 + auth..];
            assert!(db.len() >= 2 && db.ends_with(&[0]) && !db[..db.len() - 1].contains(&0));
        }
    }

    #[test]
    fn mysql_denials_keep_the_length_and_name_qgate() {
        use super::{mysql_denial_text, DenialRef};
        let r = DenialRef::Request(7);
        let reason = "denied by ann: it's `dangerous` \\ here";
        for len in 1..200 {
            for prepare in [false, true] {
                let t = mysql_denial_text(len, r, reason, prepare);
                assert_eq!(t.len(), len, "{len}");
                let text = String::from_utf8(t).unwrap();
                assert!(!text.trim().is_empty());
                assert!(!text.contains('\\'), "{text}");
                if len >= 64 && !prepare {
                    assert!(
                        text.starts_with(
                            "SIGNAL SQLSTATE'45000'SET MESSAGE_TEXT='qgate: request 7 denied"
                        ),
                        "{text}"
                    );
                    assert_eq!(text.matches('\'').count(), 4, "{text}");
                } else if len >= 25 {
                    assert!(text.starts_with("`qgate: request 7 denied"), "{text}");
                    assert_eq!(text.matches('`').count(), 2, "{text}");
                }
            }
        }
        assert_eq!(mysql_denial_text(4, r, "", false), b"`q7`");
        assert_eq!(mysql_denial_text(1, r, "", true), b"q");
    }

    use super::*;

    #[test]
    fn long_statement_becomes_a_raise_with_request_and_reason() {
        let original = "DROP TABLE accounts CASCADE; -- cleanup of the old accounts table please";
        let text = denial_text(
            original.len(),
            DenialRef::Request(40),
            "denied by reviewer bob",
        );
        assert_eq!(text.len(), original.len());
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with("DO $$BEGIN RAISE EXCEPTION 'qgate: request 40 denied: denied by"),
            "{text}"
        );
        assert!(text.trim_end().ends_with("';END$$"), "{text}");
    }

    #[test]
    fn reason_quotes_and_dollars_cannot_break_out_of_the_literal() {
        let text = denial_text(
            120,
            DenialRef::Decision(3),
            "it's $$ evil \\ ';DROP TABLE x;--",
        );
        let text = String::from_utf8(text).unwrap();
        let body =
            &text["DO $$BEGIN RAISE EXCEPTION '".len()..text.trim_end().len() - "';END$$".len()];
        assert!(
            !body.contains('\'') && !body.contains('$') && !body.contains('\\'),
            "{body}"
        );
    }

    #[test]
    fn medium_statement_becomes_show_of_a_parameter_named_for_the_denial() {
        let text = denial_text(
            "DROP TABLE accounts CASCADE;".len() + 10,
            DenialRef::Request(40),
            "no",
        );
        let text = String::from_utf8(text).unwrap();
        assert!(
            text.starts_with("SHOW \"qgate: request 40 denied"),
            "{text}"
        );
    }

    #[test]
    fn short_statement_becomes_a_quoted_identifier_naming_qgate_and_the_request() {
        let text = String::from_utf8(denial_text(
            "DROP TABLE t".len(),
            DenialRef::Request(40),
            "x",
        ))
        .unwrap();
        assert_eq!(text, "\"qgate 40\"  ");
        assert_eq!(denial_text(5, DenialRef::Request(40), ""), b"\"q40\"");
        assert_eq!(denial_text(4, DenialRef::Request(40), ""), b"qgat");
        assert_eq!(denial_text(1, DenialRef::Request(40), ""), b"q");
    }

    #[test]
    fn a_policy_denial_names_its_decision_and_an_unrecorded_one_no_number() {
        let text = String::from_utf8(denial_text(90, DenialRef::Decision(12), "no")).unwrap();
        assert!(text.contains("'qgate: denied (decision 12): no'"), "{text}");
        let text = String::from_utf8(denial_text(90, DenialRef::Unrecorded, "no")).unwrap();
        assert!(text.contains("'qgate: denied (unrecorded): no'"), "{text}");
        assert!(!text.bytes().any(|b| b.is_ascii_digit()), "{text}");
        let short = String::from_utf8(denial_text(9, DenialRef::Unrecorded, "")).unwrap();
        assert_eq!(short, "\"qgate u\"");
        let msg = startup_refusal(80, DenialRef::Unrecorded, "refused").unwrap();
        assert!(String::from_utf8_lossy(&msg).contains("qgate: connection refused (unrecorded)"));
    }

    #[test]
    fn prefix_denial_opens_a_string_the_rest_cannot_close() {
        let text =
            String::from_utf8(prefix_denial_text(100, DenialRef::Request(7), 0xabc).unwrap())
                .unwrap();
        assert_eq!(text.len(), 100);
        assert!(
            text.starts_with("SELECT $qgate_denied_7_0000000000000abc$"),
            "{text}"
        );
        assert!(prefix_denial_text(10, DenialRef::Request(7), 1).is_none());
    }

    #[test]
    fn startup_refusal_is_a_well_formed_startup_message_of_the_same_length() {
        let msg = startup_refusal(
            80,
            DenialRef::Decision(9),
            "identity refused by rule no-mallory",
        )
        .unwrap();
        assert_eq!(msg.len(), 80);
        assert_eq!(u32::from_be_bytes([msg[0], msg[1], msg[2], msg[3]]), 80);
        assert_eq!(&msg[4..8], &196_608u32.to_be_bytes());
        assert!(msg.starts_with(&[0, 0, 0, 80, 0, 3, 0, 0, b'u']));
        assert!(String::from_utf8_lossy(&msg).contains("qgate: connection refused (decision 9)"));
        assert!(msg.ends_with(b"\0\0"));
        assert!(startup_refusal(15, DenialRef::Decision(9), "x").is_none());
    }

    #[test]
    fn every_length_is_exact_and_never_blank() {
        for (len, denial) in (1..200).flat_map(|len| {
            [
                DenialRef::Request(123_456),
                DenialRef::Decision(7),
                DenialRef::Unrecorded,
            ]
            .map(|d| (len, d))
        }) {
            let text = denial_text(len, denial, "policy rule no-ddl");
            assert_eq!(text.len(), len);
            assert!(
                text.iter().any(|b| !b.is_ascii_whitespace()),
                "blank at {len}"
            );
            assert!(!text.contains(&b';') || text.starts_with(b"DO $$"), "{len}");
            let quotes = text.iter().filter(|&&b| b == b'"').count();
            assert!(quotes == 0 || quotes == 2, "balanced quotes at {len}");
        }
    }

    #[test]
    fn a_denied_tail_opens_a_dollar_quote_with_a_tag_not_in_the_statement() {
        let text = "DROP TABLE t /* long comment */";
        let tail = tail_denial_text(40, DenialRef::Request(7), 0xabcdef, text).unwrap();
        assert_eq!(tail.len(), 40);
        let tail = String::from_utf8(tail).unwrap();
        // A newline first: it ends a `--` comment the tail could be in.
        assert!(tail.starts_with("\n$qgate_7_"), "{tail:?}");
        let tag_end = tail[2..].find('$').unwrap() + 3;
        assert!(!text.contains(&tail[1..tag_end]));
    }

    #[test]
    fn a_denied_tail_never_reuses_a_tag_the_statement_contains() {
        // The attacker's text holds every short tag: a shorter one that
        // would close their own dollar quote must not be chosen.
        let text = "SELECT $q$ x $q0001$ $qgate_7_00000001$";
        let tail = tail_denial_text(8, DenialRef::Request(7), 1, text);
        assert!(tail.is_none(), "{tail:?}");
        let tail = String::from_utf8(tail_denial_text(30, DenialRef::Request(7), 1, text).unwrap())
            .unwrap();
        assert!(tail.starts_with("\n$qgate_7_0000000000000001$"), "{tail:?}");
        assert!(
            tail_denial_text(3, DenialRef::Request(7), 2, "DROP TABLE t").is_none(),
            "no room for newline + tag"
        );
        assert_eq!(
            tail_denial_text(4, DenialRef::Request(7), 2, "DROP TABLE t").unwrap(),
            b"\n$q$".to_vec()
        );
        assert_eq!(
            tail_denial_text(5, DenialRef::Request(7), 2, "x").unwrap(),
            b"\n$q$ ".to_vec()
        );
    }
}
