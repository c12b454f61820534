//! Fingerprints: a query string with its literal values taken out.
//!
//! Built from sqlparser's own tokens, so it agrees with the parser about where
//! a string, comment or dollar quote ends. Two strings with the same
//! fingerprint key have the same token sequence apart from literal values and
//! whitespace, and therefore parse into the same tree apart from those values.
use std::fmt::Write as _;

use sqlparser::tokenizer::{Token, TokenWithSpan};

use super::Dialect;

/// A query's fingerprint: readable text for people, an unambiguous key for caches.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    text: String,
    key: String,
}

impl Fingerprint {
    /// Tokenizes `sql`; `None` when it does not tokenize.
    pub fn of(sql: &str, dialect: Dialect) -> Option<Fingerprint> {
        super::tokenize(sql, dialect)
            .ok()
            .map(|tokens| Fingerprint::from_tokens(&tokens))
    }

    pub(crate) fn from_tokens(tokens: &[TokenWithSpan]) -> Fingerprint {
        let mut text = String::with_capacity(tokens.len() * 6);
        let mut key = String::with_capacity(tokens.len() * 8);
        let mut shown = String::new();
        let mut pending_space = false;
        for token in tokens {
            if let Some(tag) = literal_tag(&token.token) {
                space(&mut text, &mut key, &mut pending_space);
                text.push('?');
                key.push('L');
                key.push(tag);
                continue;
            }
            match &token.token {
                Token::Whitespace(_) => {
                    pending_space = true;
                    continue;
                }
                Token::EOF => continue,
                other => {
                    space(&mut text, &mut key, &mut pending_space);
                    shown.clear();
                    // Writing to a String cannot fail.
                    let _ = write!(shown, "{other}");
                    // Length-prefixed, so no token text can imitate a boundary.
                    let _ = write!(key, "T{}:", shown.len());
                    key.push_str(&shown);
                    text.push_str(&shown);
                }
            }
        }
        Fingerprint { text, key }
    }

    /// The string with every literal shown as `?` and whitespace collapsed.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The exact identity of the token sequence, literal values excepted.
    pub fn key(&self) -> &str {
        &self.key
    }
}

fn space(text: &mut String, key: &mut String, pending: &mut bool) {
    if *pending {
        if !text.is_empty() {
            text.push(' ');
        }
        key.push('_');
        *pending = false;
    }
}

/// A distinct tag per literal token type: the parser accepts different literal
/// types in different places, so the type stays part of the key.
fn literal_tag(token: &Token) -> Option<char> {
    Some(match token {
        Token::Number(_, false) => 'n',
        Token::Number(_, true) => 'N',
        Token::SingleQuotedString(_) => 's',
        Token::DoubleQuotedString(_) => 'd',
        Token::TripleSingleQuotedString(_) => 't',
        Token::TripleDoubleQuotedString(_) => 'T',
        Token::DollarQuotedString(_) => '$',
        Token::SingleQuotedByteStringLiteral(_) => 'b',
        Token::DoubleQuotedByteStringLiteral(_) => 'B',
        Token::TripleSingleQuotedByteStringLiteral(_) => 'c',
        Token::TripleDoubleQuotedByteStringLiteral(_) => 'C',
        Token::SingleQuotedRawStringLiteral(_) => 'r',
        Token::DoubleQuotedRawStringLiteral(_) => 'R',
        Token::TripleSingleQuotedRawStringLiteral(_) => 'q',
        Token::TripleDoubleQuotedRawStringLiteral(_) => 'Q',
        Token::NationalStringLiteral(_) => 'x',
        Token::QuoteDelimitedStringLiteral(_) => 'o',
        Token::NationalQuoteDelimitedStringLiteral(_) => 'O',
        Token::EscapedStringLiteral(_) => 'e',
        Token::UnicodeStringLiteral(_) => 'u',
        Token::HexStringLiteral(_) => 'h',
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(sql: &str) -> Fingerprint {
        Fingerprint::of(sql, Dialect::Postgresql).expect("tokenizes")
    }

    #[test]
    fn literals_are_normalised_and_whitespace_collapsed() {
        let a = fp("SELECT abalance FROM pgbench_accounts WHERE aid = 123;");
        let b = fp("SELECT  abalance\nFROM pgbench_accounts /* c */ WHERE aid = 98765;");
        assert_eq!(a.key(), b.key());
        assert_eq!(
            a.text(),
            "SELECT abalance FROM pgbench_accounts WHERE aid = ?;"
        );
    }

    #[test]
    fn identifiers_and_literal_types_stay_distinct() {
        assert_ne!(fp("SELECT a FROM t").key(), fp("SELECT b FROM t").key());
        assert_ne!(fp("SELECT \"a\" FROM t").key(), fp("SELECT a FROM t").key());
        assert_ne!(fp("SELECT 1").key(), fp("SELECT '1'").key());
        assert_ne!(fp("SELECT 1or 1").key(), fp("SELECT 1and 1").key());
    }
}
