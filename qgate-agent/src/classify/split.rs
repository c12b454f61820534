//! Cutting a token stream into statements at top-level semicolons, and finding
//! each piece's text in the original string.
use sqlparser::tokenizer::{Location, Token, TokenWithSpan};

/// The tokens of one statement (between semicolons, whitespace-only pieces dropped).
pub(crate) struct Segment<'t> {
    pub tokens: &'t [TokenWithSpan],
}

impl Segment<'_> {
    /// The first one or two keywords, upper case: what the statement says it is.
    /// Used as the verb of a statement that does not parse.
    pub fn leading_words(&self) -> String {
        let mut words = self.tokens.iter().filter_map(|t| match &t.token {
            Token::Whitespace(_) => None,
            Token::Word(w) if w.quote_style.is_none() => Some(Some(w.value.to_ascii_uppercase())),
            _ => Some(None),
        });
        let Some(Some(first)) = words.next() else {
            return String::new();
        };
        let takes_object = matches!(
            first.as_str(),
            "CREATE" | "ALTER" | "DROP" | "REINDEX" | "SECURITY" | "IMPORT" | "REASSIGN"
        );
        match words.next() {
            Some(Some(second)) if takes_object => format!("{first} {second}"),
            _ => first,
        }
    }

    /// The byte range this segment covers in the source.
    pub fn byte_range(&self, index: &LineIndex<'_>) -> Option<std::ops::Range<usize>> {
        let first = self
            .tokens
            .iter()
            .find(|t| !matches!(t.token, Token::Whitespace(_)))?;
        let last = self
            .tokens
            .iter()
            .rev()
            .find(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF))?;
        let start = index.offset(first.span.start)?;
        let end = index.offset(last.span.end)?;
        (start <= end).then_some(start..end)
    }
}

/// Splits at every semicolon token. Semicolons inside a `BEGIN ATOMIC` body
/// split too; callers only use the pieces when their count matches the parse.
pub(crate) fn segments(tokens: &[TokenWithSpan]) -> Vec<Segment<'_>> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, token) in tokens.iter().enumerate() {
        if matches!(token.token, Token::SemiColon) {
            push_segment(&mut out, &tokens[start..i]);
            start = i + 1;
        }
    }
    push_segment(&mut out, &tokens[start..]);
    out
}

fn push_segment<'t>(out: &mut Vec<Segment<'t>>, tokens: &'t [TokenWithSpan]) {
    let substantive = tokens
        .iter()
        .any(|t| !matches!(t.token, Token::Whitespace(_) | Token::EOF));
    if substantive {
        out.push(Segment { tokens });
    }
}

/// Converts sqlparser's (line, column-in-characters) locations to byte offsets.
pub(crate) struct LineIndex<'s> {
    source: &'s str,
    line_starts: Vec<usize>,
}

impl<'s> LineIndex<'s> {
    pub fn new(source: &'s str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(
            source
                .bytes()
                .enumerate()
                .filter(|(_, b)| *b == b'\n')
                .map(|(i, _)| i + 1),
        );
        LineIndex {
            source,
            line_starts,
        }
    }

    pub fn offset(&self, location: Location) -> Option<usize> {
        let line = usize::try_from(location.line).ok()?.checked_sub(1)?;
        let column = usize::try_from(location.column).ok()?.checked_sub(1)?;
        let start = *self.line_starts.get(line)?;
        let rest = self.source.get(start..)?;
        if column == 0 {
            return Some(start);
        }
        match rest.char_indices().nth(column) {
            Some((i, _)) => Some(start + i),
            None if rest.chars().count() == column => Some(self.source.len()),
            None => None,
        }
    }

    pub fn slice(&self, range: std::ops::Range<usize>) -> Option<&'s str> {
        self.source.get(range)
    }
}
