//! Credentials kept out of everything qgate stores, exports, shows to
//! reviewers or sends to webhooks.
//!
//! [`redact`] replaces the literal of each credential it recognises with
//! `'[redacted]'`, so the text still says that a password was set, and
//! where, but not what it is:
//! - `PASSWORD 'x'` anywhere: `CREATE/ALTER ROLE|USER … [ENCRYPTED] PASSWORD`,
//!   and the `password 'x'` option of `CREATE/ALTER USER MAPPING|SERVER …
//!   OPTIONS (…)` (also after `ADD`/`SET`);
//! - every string argument after the first of pgcrypto's symmetric and
//!   public-key functions (`pgp_sym_encrypt(data, 'key')`, …);
//! - a string argument of a `dblink*` function that holds a password
//!   (`password=…`) or a URI with credentials (`postgresql://u:p@h`).
//!
//! A text that mentions one of those words but does not tokenize is cut
//! after the first such word: nothing after it can be told apart from a
//! secret. The check is a case-insensitive substring search first, so a
//! statement that mentions none of them costs one scan of its bytes.
use std::{borrow::Cow, sync::LazyLock};

use aho_corasick::AhoCorasick;
use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::{split::LineIndex, tokenize, Dialect};

/// What a redacted literal becomes.
pub const REDACTED: &str = "'[redacted]'";

/// Words without which [`redact`] leaves a text as it is.
const TRIGGERS: &[&str] = &["password", "pgp_", "dblink"];

static FINDER: LazyLock<Option<AhoCorasick>> = LazyLock::new(|| {
    AhoCorasick::builder()
        .ascii_case_insensitive(true)
        .build(TRIGGERS)
        .ok()
});

/// `sql` with every credential literal replaced by [`REDACTED`] (borrowed
/// when there is none).
pub fn redact(sql: &str) -> Cow<'_, str> {
    let Some(finder) = FINDER.as_ref() else {
        return Cow::Owned(cut(sql, 0));
    };
    let Some(first) = finder.find(sql) else {
        return Cow::Borrowed(sql);
    };
    let Ok(tokens) = tokenize(sql, Dialect::Postgresql) else {
        return Cow::Owned(cut(sql, first.end()));
    };
    let index = LineIndex::new(sql);
    let mut ranges = Vec::new();
    for range in secret_literals(&tokens) {
        let (Some(start), Some(end)) = (
            index.offset(tokens[range].span.start),
            index.offset(tokens[range].span.end),
        ) else {
            return Cow::Owned(cut(sql, first.end()));
        };
        ranges.push(start..end);
    }
    if ranges.is_empty() {
        return Cow::Borrowed(sql);
    }
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for range in ranges {
        if range.start < at {
            continue;
        }
        out.push_str(&sql[at..range.start]);
        out.push_str(REDACTED);
        at = range.end;
    }
    out.push_str(&sql[at..]);
    Cow::Owned(out)
}

/// The text up to `at`, then a note that the rest was withheld.
fn cut(sql: &str, at: usize) -> String {
    let at = (0..=at.min(sql.len()))
        .rev()
        .find(|i| sql.is_char_boundary(*i))
        .unwrap_or(0);
    format!(
        "{} [redacted: the rest of this text was withheld]",
        &sql[..at]
    )
}

fn is_string(token: &Token) -> bool {
    matches!(
        token,
        Token::SingleQuotedString(_)
            | Token::EscapedStringLiteral(_)
            | Token::DollarQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::UnicodeStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedString(_)
    )
}

fn string_text(token: &Token) -> &str {
    match token {
        Token::SingleQuotedString(s)
        | Token::EscapedStringLiteral(s)
        | Token::NationalStringLiteral(s)
        | Token::UnicodeStringLiteral(s)
        | Token::TripleSingleQuotedString(s) => s,
        Token::DollarQuotedString(d) => &d.value,
        _ => "",
    }
}

/// A word, unquoted, compared case-insensitively.
fn word_is(token: &Token, pred: impl Fn(&str) -> bool) -> bool {
    match token {
        Token::Word(w) if w.quote_style.is_none() => pred(&w.value.to_ascii_lowercase()),
        _ => false,
    }
}

/// Indexes (into `tokens`) of the literals that hold credentials.
fn secret_literals(tokens: &[TokenWithSpan]) -> Vec<usize> {
    let code: Vec<usize> = (0..tokens.len())
        .filter(|&i| !matches!(tokens[i].token, Token::Whitespace(_) | Token::EOF))
        .collect();
    let mut out = Vec::new();
    for (k, &i) in code.iter().enumerate() {
        let token = &tokens[i].token;
        // PASSWORD 'x' (role clauses; the `password` option of a mapping).
        if word_is(token, |w| w == "password") {
            if let Some(&next) = code.get(k + 1) {
                if is_string(&tokens[next].token) {
                    out.push(next);
                }
            }
            continue;
        }
        let pgp = word_is(token, |w| {
            w.starts_with("pgp_sym_") || w.starts_with("pgp_pub_")
        });
        let dblink = word_is(token, |w| w.starts_with("dblink"));
        if !(pgp || dblink)
            || !matches!(
                code.get(k + 1).map(|&n| &tokens[n].token),
                Some(Token::LParen)
            )
        {
            continue;
        }
        // The call's arguments: string literals at depth 1, by position.
        let mut depth = 0usize;
        let mut argument = 0usize;
        for &j in &code[k + 1..] {
            match &tokens[j].token {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                Token::Comma if depth == 1 => argument += 1,
                t if depth == 1 && is_string(t) => {
                    let text = string_text(t).to_ascii_lowercase();
                    let credential = if pgp {
                        argument >= 1
                    } else {
                        text.contains("password") || (text.contains("://") && text.contains('@'))
                    };
                    if credential {
                        out.push(j);
                    }
                }
                _ => {}
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn redacted(sql: &str, secret: &str) -> String {
        let out = redact(sql).into_owned();
        assert!(!out.contains(secret), "{secret:?} left in {out:?}");
        assert!(
            out.contains(REDACTED) || out.contains("[redacted:"),
            "{out}"
        );
        out
    }

    #[test]
    fn role_passwords_are_redacted_and_the_clause_stays() {
        assert_eq!(
            redacted("ALTER ROLE app PASSWORD 'hunter2'", "hunter2"),
            "ALTER ROLE app PASSWORD '[redacted]'"
        );
        redacted(
            "create user bob with login encrypted password 'S3cr3t!'",
            "S3cr3t!",
        );
        redacted(
            "CREATE ROLE x PASSWORD $p$dollar-secret$p$ VALID UNTIL 'infinity'",
            "dollar-secret",
        );
        redacted("ALTER USER x WITH PASSWORD E'esc\\'aped'", "aped");
        redacted(
            "ALTER ROLE \"Mixed\" PASSWORD 'a''b-secret' LOGIN",
            "b-secret",
        );
        // Nothing to redact: borrowed as is.
        assert!(matches!(
            redact("ALTER ROLE x PASSWORD NULL"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(redact("SELECT 1"), Cow::Borrowed(_)));
    }

    #[test]
    fn mapping_options_pgcrypto_keys_and_dblink_credentials_are_redacted() {
        let out = redacted(
            "CREATE USER MAPPING FOR bob SERVER s OPTIONS (user 'bob', password 'map-secret')",
            "map-secret",
        );
        assert!(out.contains("user 'bob'"), "other options stay: {out}");
        redacted(
            "ALTER USER MAPPING FOR bob SERVER s OPTIONS (SET password 'set-secret')",
            "set-secret",
        );
        let out = redacted(
            "SELECT pgp_sym_encrypt('payload', 'sym-secret', 'cipher-algo=aes256')",
            "sym-secret",
        );
        assert!(out.contains("'payload'"), "the data argument stays: {out}");
        redacted(
            "select PGP_SYM_DECRYPT(col, 'k3y-secret') from t",
            "k3y-secret",
        );
        redacted(
            "SELECT dblink_connect('c', 'host=db dbname=x user=u password=dbl-secret')",
            "dbl-secret",
        );
        redacted(
            "SELECT * FROM dblink('postgresql://u:uri-secret@db/x', 'SELECT 1') AS t(a int)",
            "uri-secret",
        );
        let out = redact("SELECT dblink_exec('c', 'UPDATE t SET a = 1')");
        assert!(matches!(out, Cow::Borrowed(_)), "no credential: {out}");
    }

    #[test]
    fn a_text_that_does_not_tokenize_is_cut_after_the_trigger() {
        let out = redacted("ALTER ROLE x PASSWORD 'never-closed", "never-closed");
        assert!(out.starts_with("ALTER ROLE x PASSWORD [redacted:"), "{out}");
    }
}
