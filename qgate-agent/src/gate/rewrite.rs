//! Same-length replacement texts for denied statements.
//!
//! A denied Query or Parse is released with its SQL replaced by a statement of
//! exactly the same byte length, so the TCP stream stays consistent and the
//! server itself answers with an ErrorResponse that names qgate and the
//! request. Never an empty or whitespace-only text: the server would answer
//! EmptyQueryResponse, which clients take for success.

/// The replacement for `len` bytes of SQL, in order of preference:
/// 1. `DO $$BEGIN RAISE EXCEPTION 'qgate: request 7 denied: reason';END$$`
///    (the client sees exactly that message; the reason is cut to fit);
/// 2. `CLOSE qgate_denied_request_7` → `cursor "qgate_denied_request_7" does not exist`;
/// 3. a bare identifier such as `qgate_denied_7` → `syntax error at or near "qgate_denied_7"`,
///    cut to `len` (down to `q`).
///
/// The result is padded with spaces to exactly `len` bytes; `len` must be at least 1.
pub fn denial_text(len: usize, request_id: i64, reason: &str) -> Vec<u8> {
    const PREFIX: &str = "DO $$BEGIN RAISE EXCEPTION '";
    const SUFFIX: &str = "';END$$";
    let head = format!("qgate: request {request_id} denied");
    let clean = sanitize(reason);
    let room = len.saturating_sub(PREFIX.len() + SUFFIX.len());
    let mut text = if room >= head.len() {
        let mut message = head;
        if !clean.is_empty() && room >= message.len() + 3 {
            message.push_str(": ");
            let keep = (room - message.len()).min(clean.len());
            message.push_str(&clean[..keep]);
        }
        format!("{PREFIX}{message}{SUFFIX}")
    } else {
        let cursor = format!("CLOSE qgate_denied_request_{request_id}");
        if cursor.len() <= len {
            cursor
        } else {
            let mut ident = format!("qgate_denied_{request_id}");
            ident.truncate(len.max(1));
            ident
        }
    };
    while text.len() < len {
        text.push(' ');
    }
    text.into_bytes()
}

/// Keeps what can sit inside a single-quoted literal in a dollar-quoted body
/// without escaping: printable ASCII except quote, dollar and backslash.
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
        .filter(|c| !matches!(c, '\'' | '$' | '\\'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_statement_becomes_a_raise_with_request_and_reason() {
        let original = "DROP TABLE accounts CASCADE; -- cleanup of the old accounts table please";
        let text = denial_text(original.len(), 40, "denied by reviewer bob");
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
        let text = denial_text(120, 3, "it's $$ evil \\ ';DROP TABLE x;--");
        let text = String::from_utf8(text).unwrap();
        let body =
            &text["DO $$BEGIN RAISE EXCEPTION '".len()..text.trim_end().len() - "';END$$".len()];
        assert!(
            !body.contains('\'') && !body.contains('$') && !body.contains('\\'),
            "{body}"
        );
    }

    #[test]
    fn medium_statement_becomes_close_of_a_named_cursor() {
        let text = denial_text("DROP TABLE accounts".len() + 12, 40, "x");
        let text = String::from_utf8(text).unwrap();
        assert!(text.starts_with("CLOSE qgate_denied_request_40"), "{text}");
    }

    #[test]
    fn short_statement_becomes_an_identifier_naming_qgate() {
        let text = String::from_utf8(denial_text("DROP TABLE t".len(), 40, "x")).unwrap();
        assert_eq!(text, "qgate_denied");
        assert_eq!(denial_text(1, 40, ""), b"q");
    }

    #[test]
    fn every_length_is_exact_and_never_blank() {
        for len in 1..200 {
            let text = denial_text(len, 123_456, "policy rule no-ddl");
            assert_eq!(text.len(), len);
            assert!(
                text.iter().any(|b| !b.is_ascii_whitespace()),
                "blank at {len}"
            );
            assert!(!text.contains(&b';') || text.starts_with(b"DO $$"), "{len}");
        }
    }
}
