//! The small matchers a policy is written with: globs, CIDR blocks, table patterns.
use std::net::IpAddr;

use crate::classify::TableName;

/// `*` matches any run of characters, `?` one character; everything else is literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(pattern: &str) -> Glob {
        Glob(pattern.to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// As [`Glob::matches`], with ASCII case ignored on both sides.
    pub fn matches_ignoring_case(&self, text: &str) -> bool {
        Glob(self.0.to_ascii_lowercase()).matches(&text.to_ascii_lowercase())
    }

    pub fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }

    /// True when the pattern matches everything.
    pub fn is_any(&self) -> bool {
        self.0.chars().all(|c| c == '*') && !self.0.is_empty()
    }
}

/// Iterative wildcard matching with single-star backtracking: linear in practice,
/// no recursion on user input.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) && pattern[p] != b'*'
        {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    while p < pattern.len() && pattern[p] == b'*' {
        p += 1;
    }
    p == pattern.len()
}

/// An address block such as `10.0.0.0/8`, `2001:db8::/32`, or a single address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let network: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR block"))?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { network, prefix })
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        let addr = match (self.network, addr) {
            // An IPv4 client seen on an IPv6 socket.
            (IpAddr::V4(_), IpAddr::V6(v6)) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(addr),
            _ => addr,
        };
        match (self.network, addr) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// A table pattern such as `public.salaries`, `hr.*`, `salaries` or `"HR"."Pay"`:
/// each part a glob over the name as the server stores it (unquoted parts fold
/// to lower case, quoted parts are exact).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablePattern {
    text: String,
    schema: Option<Glob>,
    relation: Glob,
}

impl TablePattern {
    pub fn parse(text: &str) -> Result<TablePattern, String> {
        let parts = split_name(text)?;
        match parts.as_slice() {
            [relation] => Ok(TablePattern {
                text: text.to_owned(),
                schema: None,
                relation: Glob::new(relation),
            }),
            [schema, relation] => Ok(TablePattern {
                text: text.to_owned(),
                schema: Some(Glob::new(schema)),
                relation: Glob::new(relation),
            }),
            _ => Err(format!(
                "`{text}`: a table pattern is `table` or `schema.table`"
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Does `table` match, when an unqualified name may resolve to any of
    /// `search_path` (`None`: to any schema at all)?
    ///
    /// A pattern naming a table (`hr.salaries`, `hr.salar*`) matches an
    /// unqualified name on the table part alone, whatever the search path: the
    /// session may have changed its search_path. A schema-wide pattern (`hr.*`)
    /// matches an unqualified name only when its schema is on the search path.
    pub fn matches(&self, table: &TableName, search_path: Option<&[String]>) -> bool {
        if !self.relation.matches(table.relation()) {
            return false;
        }
        match (&self.schema, table.schema()) {
            (Some(pattern), Some(schema)) => pattern.matches(schema),
            (Some(pattern), None) if self.relation.is_any() => match search_path {
                Some(schemas) => schemas.iter().any(|s| pattern.matches(s)),
                None => true,
            },
            _ => true,
        }
    }
}

/// Splits a dotted name, folding unquoted parts to lower case.
fn split_name(text: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = text.trim().chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                current.push('"');
            }
            '"' => {
                quoted = !quoted;
                was_quoted = true;
            }
            '.' if !quoted => {
                parts.push(std::mem::take(&mut current));
                was_quoted = false;
            }
            c if quoted || was_quoted => current.push(c),
            c if c.is_alphanumeric() || matches!(c, '_' | '$' | '*' | '?') => {
                current.extend(c.to_lowercase())
            }
            c => {
                return Err(format!(
                    "`{text}`: `{c}` cannot be part of an unquoted name; a pattern is `table` or \
                     `schema.table`, with `*` (any run of characters) and `?` (one character) as \
                     wildcards (write \"{c}\" inside double quotes to mean the character itself)"
                ))
            }
        }
    }
    if quoted {
        return Err(format!("`{text}`: unterminated quote"));
    }
    parts.push(current);
    if parts.iter().any(String::is_empty) {
        return Err(format!(
            "`{text}`: a part of the name is empty (a pattern is `table` or `schema.table`)"
        ));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(parts: &[&str]) -> TableName {
        TableName {
            parts: parts.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn globs_match_stars_and_question_marks() {
        assert!(Glob::new("eng_*").matches("eng_alice"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a?c").matches("abc"));
        assert!(!Glob::new("a?c").matches("abbc"));
        assert!(Glob::new("*x*y").matches("axbxy"));
        assert!(!Glob::new("alice").matches("alice2"));
    }

    #[test]
    fn cidr_blocks_contain_their_addresses() {
        let block = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(block.contains("10.1.200.3".parse().unwrap()));
        assert!(!block.contains("10.2.0.1".parse().unwrap()));
        assert!(block.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }

    #[test]
    fn table_patterns_match_qualified_and_unqualified_names() {
        let path = ["public".to_owned()];
        let public = Some(&path[..]);
        let salaries = TablePattern::parse("public.salaries").unwrap();
        assert!(salaries.matches(&table(&["public", "salaries"]), public));
        assert!(salaries.matches(&table(&["salaries"]), public));
        assert!(!salaries.matches(&table(&["hr", "salaries"]), public));
        assert!(!salaries.matches(&table(&["public", "orders"]), public));
        let hr = TablePattern::parse("HR.*").unwrap();
        assert!(hr.matches(&table(&["hr", "anything"]), public));
        assert!(!hr.matches(&table(&["public", "anything"]), public));
        assert!(!hr.matches(&table(&["anything"]), public));
        assert!(hr.matches(&table(&["anything"]), Some(&["hr".to_owned()])));
        assert!(hr.matches(&table(&["anything"]), None));
        let quoted = TablePattern::parse("\"HR\".\"Pay\"").unwrap();
        assert!(quoted.matches(&table(&["HR", "Pay"]), public));
        assert!(!quoted.matches(&table(&["hr", "pay"]), public));
    }
}
