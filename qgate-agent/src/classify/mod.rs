//! Statement classification: a captured query string → the facts the policy decides on.
//!
//! The facts come from walking sqlparser's tree, never from matching text, so
//! keywords inside literals, dollar quotes, quoted identifiers and comments
//! cannot count. Every judgement leans restrictive: a string that does not
//! parse, or a statement variant the walk does not know, is [`Kind::Unknown`];
//! a `WHERE` that cannot tell rows apart counts as touching all rows; a function
//! is recorded wherever it is called so the policy can hold it.

mod facts;
mod fingerprint;
mod functions;
mod joins;
pub mod justification;
pub mod redact;
pub mod script;
mod split;
mod truth;
mod walk;

pub use facts::{CodeRefs, Flag, Flags, Kind, RowShare, StatementFacts, TableName};
pub use fingerprint::Fingerprint;
pub use functions::is_known_safe_function;

use serde::{Deserialize, Serialize};
use sqlparser::tokenizer::{TokenWithSpan, Tokenizer};

/// Which server's grammar a statement is read with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    #[default]
    Postgresql,
    Mysql,
}

impl Dialect {
    pub(crate) fn parser_dialect(self) -> &'static dyn sqlparser::dialect::Dialect {
        match self {
            Dialect::Postgresql => &sqlparser::dialect::PostgreSqlDialect {},
            Dialect::Mysql => &sqlparser::dialect::MySqlDialect {},
        }
    }
}

impl std::str::FromStr for Dialect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "postgresql" | "postgres" | "pg" => Ok(Dialect::Postgresql),
            "mysql" | "mariadb" => Ok(Dialect::Mysql),
            other => Err(format!("unknown SQL dialect `{other}` (postgresql, mysql)")),
        }
    }
}

/// Everything known about one query string: one entry per statement it holds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Classification {
    pub dialect: Dialect,
    /// The string with literals normalised to `?`; `None` when it does not tokenize.
    pub fingerprint: Option<String>,
    pub statements: Vec<StatementFacts>,
    /// True when some fact was derived from a literal's value (e.g. `WHERE 1 = 1`),
    /// so statements sharing this fingerprint may classify differently and the
    /// classification must not be reused by fingerprint.
    pub depends_on_literals: bool,
}

impl Classification {
    /// One statement qgate will not read, and why.
    pub fn unknown(sql: &str, dialect: Dialect, why: String) -> Classification {
        Classification {
            dialect,
            fingerprint: None,
            statements: vec![StatementFacts::unknown(sql.to_owned(), String::new(), why)],
            depends_on_literals: false,
        }
    }

    /// True when any statement is [`Kind::Unknown`].
    pub fn has_unknown(&self) -> bool {
        self.statements.iter().any(|s| s.kind == Kind::Unknown)
    }
}

/// Statements with more tokens than this are classified on a thread with a large
/// stack: sqlparser builds left-deep operator chains without a depth limit, and
/// walking (or dropping) a very deep tree recurses once per level.
const LARGE_STATEMENT_TOKENS: usize = 4_000;
const LARGE_STATEMENT_STACK: usize = 512 * 1024 * 1024;

/// Classifies every statement in `sql`.
pub fn classify(sql: &str, dialect: Dialect) -> Classification {
    match tokenize(sql, dialect) {
        Ok(tokens) => {
            let fingerprint = Fingerprint::from_tokens(&tokens);
            classify_tokens(sql, tokens, dialect, Some(fingerprint.text().to_owned()))
        }
        Err(error) => untokenizable(sql, dialect, error),
    }
}

pub(crate) fn tokenize(sql: &str, dialect: Dialect) -> Result<Vec<TokenWithSpan>, String> {
    // MariaDB runs the body of `/*M!…*/` as it runs MySQL's `/*!…*/`, which
    // the MySQL dialect reads as code: read as `/*! …` (same length, so the
    // tokens' places are the text's). Only an upper-case M: MariaDB takes
    // `/*m!…*/` for a comment. (A versioned one is not understood at all:
    // `walk::classify_statements`.)
    let mariadb;
    let sql = if dialect == Dialect::Mysql && sql.contains("/*M!") {
        mariadb = sql.replace("/*M!", "/*! ");
        mariadb.as_str()
    } else {
        sql
    };
    Tokenizer::new(dialect.parser_dialect(), sql)
        .tokenize_with_location()
        .map_err(|e| e.to_string())
}

pub(crate) fn untokenizable(sql: &str, dialect: Dialect, error: String) -> Classification {
    Classification {
        dialect,
        fingerprint: None,
        statements: vec![StatementFacts::unknown(
            sql.to_owned(),
            String::new(),
            format!("does not tokenize: {error}"),
        )],
        depends_on_literals: false,
    }
}

/// Classification from an already tokenized string (the cache tokenizes once for
/// both the fingerprint and, on a miss, the parse).
pub(crate) fn classify_tokens(
    sql: &str,
    tokens: Vec<TokenWithSpan>,
    dialect: Dialect,
    fingerprint: Option<String>,
) -> Classification {
    if tokens.len() > LARGE_STATEMENT_TOKENS {
        let owned = sql.to_owned();
        let spawned = std::thread::Builder::new()
            .name("qgate-classify-large".into())
            .stack_size(LARGE_STATEMENT_STACK)
            .spawn(move || walk::classify_statements(&owned, tokens, dialect));
        let result = match spawned {
            Ok(handle) => handle.join().ok(),
            Err(_) => None,
        };
        let (statements, depends_on_literals) = result.unwrap_or_else(|| {
            (
                vec![StatementFacts::unknown(
                    sql.to_owned(),
                    String::new(),
                    "too large to classify".into(),
                )],
                false,
            )
        });
        return Classification {
            dialect,
            fingerprint,
            statements,
            depends_on_literals,
        };
    }
    let (statements, depends_on_literals) = walk::classify_statements(sql, tokens, dialect);
    Classification {
        dialect,
        fingerprint,
        statements,
        depends_on_literals,
    }
}

/// `template` (the classification of a string with the same fingerprint) with
/// each statement's text taken from `sql`; `None` when the pieces do not line up.
pub(crate) fn with_texts_of(
    template: &Classification,
    sql: &str,
    tokens: &[TokenWithSpan],
) -> Option<Classification> {
    let index = split::LineIndex::new(sql);
    let pieces = split::segments(tokens);
    if pieces.len() != template.statements.len() {
        return None;
    }
    let mut statements = Vec::with_capacity(pieces.len());
    for (piece, facts) in pieces.iter().zip(&template.statements) {
        let text = piece.byte_range(&index).and_then(|r| index.slice(r))?;
        statements.push(StatementFacts {
            sql: text.to_owned(),
            ..facts.clone()
        });
    }
    Some(Classification {
        dialect: template.dialect,
        fingerprint: template.fingerprint.clone(),
        statements,
        depends_on_literals: template.depends_on_literals,
    })
}
