//! The tree walk: sqlparser statements → [`StatementFacts`].
//!
//! The top-level statement variant gives the kind and verb; a full visit of the
//! tree then finds everything nested (writes in CTEs and cursors, subqueries,
//! function calls anywhere). A variant not named here is [`Kind::Unknown`].
use std::{borrow::Cow, ops::ControlFlow};

use sqlparser::{
    ast::{
        BinaryOperator, CopySource, CopyTarget, Delete, Expr, FromTable, MergeClauseKind,
        ObjectName, ObjectNamePart, ObjectType, Query, Select, Set, SetExpr, Statement,
        TableFactor, TableObject, TableWithJoins, UnaryOperator, Update, UtilityOption, Value,
        Visit, Visitor,
    },
    parser::Parser,
    tokenizer::TokenWithSpan,
};

use super::{
    facts::{CodeRefs, Flag, Flags, Kind, StatementFacts, TableName},
    functions::is_safety_setting,
    split::{segments, LineIndex, Segment},
    truth::Condition,
    Dialect,
};

/// Deeper nesting than this is refused by the parser (it recurses per level).
const PARSER_RECURSION_LIMIT: usize = 200;

/// Classifies every statement of `sql` (already tokenized). Also returns whether
/// any fact depended on a literal's value.
pub(crate) fn classify_statements(
    sql: &str,
    tokens: Vec<TokenWithSpan>,
    dialect: Dialect,
) -> (Vec<StatementFacts>, bool) {
    if dialect == Dialect::Mysql {
        if let Some(why) =
            versioned_executable_comment(sql).or_else(|| mysql_lexes_differently(&tokens))
        {
            return (
                vec![StatementFacts::unknown(sql.to_owned(), String::new(), why)],
                false,
            );
        }
    }
    let index = LineIndex::new(sql);
    let pieces = segments(&tokens);
    let texts: Vec<Option<String>> = pieces
        .iter()
        .map(|s| piece_text(s, &index).map(str::to_owned))
        .collect();
    drop(pieces);

    let parsed = Parser::new(dialect.parser_dialect())
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .with_tokens_with_locations(tokens)
        .parse_statements();
    match parsed {
        Ok(statements) => {
            let texts_fit = texts.len() == statements.len() && texts.iter().all(Option::is_some);
            let mut depends = false;
            let facts = statements
                .iter()
                .enumerate()
                .map(|(i, statement)| {
                    let text = match texts.get(i) {
                        Some(Some(text)) if texts_fit => text.clone(),
                        _ => statement.to_string(),
                    };
                    let (mut facts, d) = facts_of(statement, text);
                    if dialect == Dialect::Mysql {
                        mysql_facts(statement, &mut facts);
                    }
                    depends |= d;
                    facts
                })
                .collect::<Vec<StatementFacts>>();
            let mut facts = facts;
            if dialect == Dialect::Mysql && facts.len() > 1 {
                // The statements after a USE run in another database than
                // the session's, which the policy and the grant-table check
                // read: the USE is not understood (the text is held).
                for f in facts.iter_mut().filter(|f| f.verb == "USE") {
                    f.kind = Kind::Unknown;
                    f.error =
                        Some("a USE among other statements: they run in another database".into());
                }
            }
            (facts, depends)
        }
        Err(_) => classify_pieces(sql, &index, dialect),
    }
}

/// A versioned executable comment (`/*!50000 …*/`, `/*M!100000 …*/`):
/// MariaDB runs its body or skips it by its own version (and skips MySQL's
/// 50700–99999 whatever it is), sqlparser always runs it. Not modelled: the
/// text is not understood. (Anywhere in the text, a string's content
/// included: held rather than guessed.)
fn versioned_executable_comment(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    for opener in ["/*!", "/*M!"] {
        let mut from = 0;
        while let Some(at) = sql[from..].find(opener) {
            let next = from + at + opener.len();
            if bytes.get(next).is_some_and(u8::is_ascii_digit) {
                return Some(
                    "a versioned executable comment: MariaDB runs it or not by its version".into(),
                );
            }
            from = next;
        }
    }
    None
}

/// Where sqlparser's MySQL tokenizer splits text otherwise than MySQL:
/// a `--` comment opened by a whitespace character that is not ASCII (MySQL
/// needs a space or a control character: `--\u{a0}x` is `- -x`), and a
/// string literal of a kind MySQL does not have (`b"…"` is the column `b`
/// and a string with backslash escapes to MySQL, a byte string without them
/// to sqlparser). Such a text is not understood.
fn mysql_lexes_differently(tokens: &[TokenWithSpan]) -> Option<String> {
    use sqlparser::tokenizer::{Token, Whitespace};
    for t in tokens {
        match &t.token {
            Token::Whitespace(Whitespace::SingleLineComment { prefix, comment })
                if prefix == "--"
                    && comment
                        .chars()
                        .next()
                        .is_some_and(|c| c.is_whitespace() && !c.is_ascii()) =>
            {
                return Some("a `--` followed by a non-ASCII space is no comment to MySQL".into());
            }
            Token::SingleQuotedString(_)
            | Token::DoubleQuotedString(_)
            | Token::NationalStringLiteral(_)
            | Token::HexStringLiteral(_)
            | Token::SingleQuotedByteStringLiteral(_) => {}
            Token::TripleSingleQuotedString(_)
            | Token::TripleDoubleQuotedString(_)
            | Token::DollarQuotedString(_)
            | Token::DoubleQuotedByteStringLiteral(_)
            | Token::TripleSingleQuotedByteStringLiteral(_)
            | Token::TripleDoubleQuotedByteStringLiteral(_)
            | Token::SingleQuotedRawStringLiteral(_)
            | Token::DoubleQuotedRawStringLiteral(_)
            | Token::TripleSingleQuotedRawStringLiteral(_)
            | Token::TripleDoubleQuotedRawStringLiteral(_)
            | Token::QuoteDelimitedStringLiteral(_)
            | Token::NationalQuoteDelimitedStringLiteral(_)
            | Token::EscapedStringLiteral(_)
            | Token::UnicodeStringLiteral(_) => {
                return Some(format!(
                    "a literal MySQL does not read as sqlparser does: {}",
                    t.token
                ));
            }
            _ => {}
        }
    }
    None
}

/// What a statement means on MySQL/MariaDB beyond its PostgreSQL reading:
/// `RESET` (MySQL's `RESET MASTER` deletes the binary logs, `RESET SLAVE`
/// forgets replication: nothing like PostgreSQL's RESET of a setting) is
/// not understood; `SET GLOBAL` / `@@global.` / `PERSIST` changes the
/// server for every session; a write to the `mysql` schema (the grant
/// tables) changes privileges.
fn mysql_facts(statement: &Statement, facts: &mut StatementFacts) {
    let text = facts.sql.to_ascii_lowercase();
    if let Statement::Reset(_) = statement {
        facts.kind = Kind::Unknown;
        facts.error = Some("MySQL's RESET is not a setting's reset".into());
    }
    if matches!(statement, Statement::Execute { .. }) {
        facts.kind = Kind::Unknown;
        if text.split_whitespace().nth(1) == Some("immediate") {
            // Read by sqlparser's MySQL dialect as a statement named IMMEDIATE.
            facts.verb = "EXECUTE IMMEDIATE".into();
            facts.error = Some("EXECUTE IMMEDIATE runs text qgate does not see".into());
        } else {
            // The statement a SQL-level PREPARE gave the name (from a
            // variable, or before qgate saw the session): not followed.
            facts.error =
                Some("EXECUTE runs a statement prepared by name, not followed on MySQL".into());
        }
    }
    if facts.settings.iter().any(|s| s == "password") {
        // SET PASSWORD [FOR user] = …: a credential change.
        facts.kind = Kind::Dcl;
        facts.verb = "SET PASSWORD".into();
    }
    if let Statement::Insert(insert) = statement {
        let from_query = insert
            .source
            .as_ref()
            .is_some_and(|q| !matches!(*q.body, SetExpr::Values(_)));
        if from_query && (insert.replace_into || insert.on.is_some()) {
            // REPLACE … SELECT deletes every row whose key the query
            // produces; INSERT … SELECT … ON DUPLICATE KEY UPDATE updates
            // them: as many existing rows as the query returns.
            facts.flags.insert(Flag::AllRows);
        }
    }
    if let Statement::Set(Set::SingleAssignment {
        scope: Some(sqlparser::ast::ContextModifier::Global),
        ..
    }) = statement
    {
        facts.flags.insert(Flag::AlterSystem);
    }
    if matches!(statement, Statement::Set(_))
        && ["@@global.", "@@persist", "global ", "persist "]
            .iter()
            .any(|scope| text.contains(scope))
    {
        facts.flags.insert(Flag::AlterSystem);
    }
    if facts.kind == Kind::Write
        && facts
            .tables_written
            .iter()
            .any(|t| t.schema().is_some_and(|s| s.eq_ignore_ascii_case("mysql")))
    {
        facts.flags.insert(Flag::PrivilegeChange);
        facts.kind = Kind::Dcl;
    }
}

/// The string as a whole does not parse: classify each semicolon-separated piece
/// on its own so the reviewer sees which one failed. The server rejects the
/// whole string in this case, but the failing piece keeps it `unknown` anyway.
fn classify_pieces(
    sql: &str,
    index: &LineIndex<'_>,
    dialect: Dialect,
) -> (Vec<StatementFacts>, bool) {
    let tokens = match super::tokenize(sql, dialect) {
        Ok(tokens) => tokens,
        Err(error) => {
            let c = super::untokenizable(sql, dialect, error);
            return (c.statements, false);
        }
    };
    let mut depends = false;
    let mut out = Vec::new();
    for piece in segments(&tokens) {
        let text = piece_text(&piece, index).unwrap_or(sql).to_owned();
        let parsed = Parser::new(dialect.parser_dialect())
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .with_tokens_with_locations(piece.tokens.to_vec())
            .parse_statements();
        match parsed {
            Ok(statements) if statements.len() == 1 => {
                let (facts, d) = facts_of(&statements[0], text);
                depends |= d;
                out.push(facts);
            }
            Ok(statements) if statements.is_empty() => {}
            Ok(_) => out.push(StatementFacts::unknown(
                text,
                piece.leading_words(),
                "splits into several statements".into(),
            )),
            Err(error) => match parse_spelled_otherwise(&piece, text.clone(), dialect) {
                Some((facts, d)) => {
                    depends |= d;
                    out.push(facts);
                }
                None => out.push(unparsed(text, &piece, error.to_string())),
            },
        }
    }
    if out.is_empty() {
        out.push(StatementFacts::unknown(
            sql.to_owned(),
            String::new(),
            "does not parse".into(),
        ));
    }
    (out, depends)
}

/// PostgreSQL statements sqlparser does not read, parsed as the statement
/// they equal for every fact qgate records: `ANALYSE` is `ANALYZE`;
/// `TABLE t` is `SELECT * FROM t`;
/// `FOR NO KEY UPDATE` and `FOR KEY SHARE` lock rows like `FOR UPDATE` and
/// `FOR SHARE` (more weakly); `SET CONSTRAINTS` only moves constraint checks
/// within the transaction.
fn parse_spelled_otherwise(
    piece: &Segment<'_>,
    text: String,
    dialect: Dialect,
) -> Option<(StatementFacts, bool)> {
    use sqlparser::tokenizer::{Token, Whitespace};
    if dialect != Dialect::Postgresql {
        return None;
    }
    let significant: Vec<&TokenWithSpan> = piece
        .tokens
        .iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_) | Token::SemiColon))
        .collect();
    let keyword = |t: &TokenWithSpan, k: &str| matches!(&t.token, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(k));
    if significant.len() >= 2
        && keyword(significant[0], "SET")
        && keyword(significant[1], "CONSTRAINTS")
    {
        let names_only = significant[2..]
            .iter()
            .all(|t| matches!(t.token, Token::Word(_) | Token::Comma | Token::Period));
        if !names_only {
            return None;
        }
        let mut facts = StatementFacts::unknown(text, "SET CONSTRAINTS".into(), String::new());
        facts.kind = Kind::Transaction;
        facts.error = None;
        return Some((facts, false));
    }
    let word = |value: &str| TokenWithSpan::wrap(Token::make_word(value, None));
    let space = || TokenWithSpan::wrap(Token::Whitespace(Whitespace::Space));
    let mut tokens: Vec<TokenWithSpan> = Vec::with_capacity(piece.tokens.len() + 4);
    let mut changed = false;
    let mut i = 0;
    let all = piece.tokens;
    let next_significant =
        |from: usize| (from..all.len()).find(|&j| !matches!(all[j].token, Token::Whitespace(_)));
    while i < all.len() {
        let t = &all[i];
        let leading = i == 0
            || tokens
                .iter()
                .all(|t| matches!(t.token, Token::Whitespace(_)));
        if leading && keyword(t, "TABLE") {
            tokens.extend([
                word("SELECT"),
                space(),
                TokenWithSpan::wrap(Token::Mul),
                space(),
                word("FROM"),
            ]);
            changed = true;
            i += 1;
            continue;
        }
        if keyword(t, "ANALYSE") {
            // The grammar's `analyze_keyword: ANALYZE | ANALYSE`, everywhere
            // (a reserved word: never an unquoted name).
            tokens.push(word("ANALYZE"));
            changed = true;
            i += 1;
            continue;
        }
        if keyword(t, "FOR") {
            if let Some(a) = next_significant(i + 1) {
                if keyword(&all[a], "NO") {
                    if let Some(b) = next_significant(a + 1).filter(|&b| keyword(&all[b], "KEY")) {
                        tokens.push(t.clone());
                        i = b + 1;
                        changed = true;
                        continue;
                    }
                } else if keyword(&all[a], "KEY")
                    && next_significant(a + 1).is_some_and(|b| keyword(&all[b], "SHARE"))
                {
                    tokens.push(t.clone());
                    i = a + 1;
                    changed = true;
                    continue;
                }
            }
        }
        tokens.push(t.clone());
        i += 1;
    }
    if !changed {
        return None;
    }
    let statements = Parser::new(dialect.parser_dialect())
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .with_tokens_with_locations(tokens)
        .parse_statements()
        .ok()?;
    let [statement] = statements.as_slice() else {
        return None;
    };
    Some(facts_of(statement, text))
}

fn piece_text<'s>(piece: &Segment<'_>, index: &LineIndex<'s>) -> Option<&'s str> {
    piece.byte_range(index).and_then(|r| index.slice(r))
}

/// An unparsed statement stays `unknown`; its leading keywords still name what
/// it claims to be, and the flags say what such a statement would do.
fn unparsed(text: String, piece: &Segment<'_>, error: String) -> StatementFacts {
    let verb = piece.leading_words();
    let mut facts = StatementFacts::unknown(text, verb, error);
    let first = facts.verb.split(' ').next().unwrap_or("");
    match first {
        "DO" => facts.flags.insert(Flag::DoBlock),
        "CLUSTER" | "REINDEX" | "VACUUM" => facts.flags.insert(Flag::HeavyLock),
        _ => {}
    }
    if facts.verb == "ALTER SYSTEM" {
        facts.flags.insert(Flag::AlterSystem);
    }
    facts
}

/// The facts of one parsed statement, and whether they depended on a literal's value.
pub(crate) fn facts_of(statement: &Statement, sql: String) -> (StatementFacts, bool) {
    match statement {
        Statement::Prepare {
            statement: inner, ..
        } => {
            let (mut facts, depends) = facts_of(inner, sql);
            facts.flags.insert(Flag::Prepared);
            (facts, depends)
        }
        Statement::Explain {
            analyze,
            options,
            statement: inner,
            ..
        } => {
            let (mut facts, mut depends) = facts_of(inner, sql);
            // `ANALYZE 0` and `ANALYZE 1` differ only in a literal.
            depends |= options
                .as_deref()
                .is_some_and(|o| o.iter().any(|o| matches!(o.arg, Some(Expr::Value(_)))));
            if *analyze || options.as_deref().is_some_and(has_analyze_option) {
                facts.flags.insert(Flag::ExplainAnalyze);
            } else {
                // Planned, not run: what it would touch is only read.
                let written = std::mem::take(&mut facts.tables_written);
                facts.tables_read.extend(written);
                facts.tables_read.sort();
                facts.tables_read.dedup();
                facts.kind = if facts.kind == Kind::Unknown {
                    Kind::Unknown
                } else {
                    Kind::Explain
                };
                facts.verb = "EXPLAIN".into();
                facts.flags = Flags::default();
                facts.settings.clear();
            }
            (facts, depends)
        }
        _ => {
            let head = head(statement);
            let mut collector = Collector::new(head.kind);
            let _ = statement.visit(&mut collector);
            let mut flags = head.flags.union(collector.flags);
            let depends_on_literals = collector.depends_on_literals || head.depends_on_literals;
            let functions = dedup(std::mem::take(&mut collector.functions));
            let mut code = std::mem::take(&mut collector.code);
            code.operators = dedup(code.operators);
            code.types = dedup(code.types);
            code.attributes = dedup(code.attributes);
            let kind = match head.kind {
                // A read that writes (writable CTE, DECLARE … FOR DELETE) is a write.
                Kind::Read | Kind::Utility | Kind::Explain | Kind::Session
                    if collector.writes_seen =>
                {
                    Kind::Write
                }
                Kind::Read | Kind::Write if flags.contains(Flag::SelectInto) => Kind::Ddl,
                other => other,
            };
            if matches!(statement, Statement::Call(_)) {
                flags.insert(Flag::Call);
            }
            let (tables_read, tables_written) = collector.tables();
            let facts = StatementFacts {
                sql,
                kind,
                verb: head.verb.into_owned(),
                tables_read,
                tables_written,
                functions,
                settings: head.settings,
                flags,
                code,
                share: None,
                error: (kind == Kind::Unknown).then(|| {
                    head.unknown_because
                        .unwrap_or("statement type not classified")
                        .to_owned()
                }),
            };
            (facts, depends_on_literals)
        }
    }
}

/// `EXPLAIN (ANALYZE …)`: any ANALYZE option counts unless its value is one
/// PostgreSQL reads as false (`defGetBoolean`: false, off, 0, as a keyword,
/// number or string). The grammar accepts the British spelling too
/// (`analyze_keyword: ANALYZE | ANALYSE`).
fn has_analyze_option(options: &[UtilityOption]) -> bool {
    let falsy = |arg: &Option<Expr>| match arg {
        Some(Expr::Value(v)) => match &v.value {
            Value::Boolean(b) => !b,
            Value::Number(n, _) => n == "0",
            Value::SingleQuotedString(s) => {
                s.eq_ignore_ascii_case("false") || s.eq_ignore_ascii_case("off")
            }
            _ => false,
        },
        Some(Expr::Identifier(i)) => {
            i.value.eq_ignore_ascii_case("off") || i.value.eq_ignore_ascii_case("false")
        }
        _ => false,
    };
    options.iter().any(|o| {
        (o.name.value.eq_ignore_ascii_case("analyze")
            || o.name.value.eq_ignore_ascii_case("analyse"))
            && !falsy(&o.arg)
    })
}

fn dedup<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v.dedup();
    v
}

/// What the top-level variant says about the statement.
struct Head {
    kind: Kind,
    verb: Cow<'static, str>,
    flags: Flags,
    settings: Vec<String>,
    /// A fact came from a literal's value (e.g. the encoding in `SET NAMES 'x'`).
    depends_on_literals: bool,
    /// Why a statement that parsed is still `unknown`.
    unknown_because: Option<&'static str>,
}

fn head(statement: &Statement) -> Head {
    use Kind::*;
    let mut flags = Flags::default();
    let mut settings = Vec::new();
    let mut depends_on_literals = false;
    let mut unknown_because = None;
    let (kind, verb): (Kind, Cow<'static, str>) = match statement {
        Statement::Query(query) => (Read, query_verb(&query.body).into()),
        Statement::Insert(insert) => (
            Write,
            if insert.replace_into {
                "REPLACE"
            } else {
                "INSERT"
            }
            .into(),
        ),
        Statement::Update(_) => (Write, "UPDATE".into()),
        Statement::Delete(_) => (Write, "DELETE".into()),
        Statement::Merge(_) => (Write, "MERGE".into()),
        Statement::Truncate(_) => {
            flags.insert(Flag::AllRows);
            flags.insert(Flag::HeavyLock);
            (Write, "TRUNCATE".into())
        }
        Statement::Copy {
            target, payload, ..
        } => {
            match target {
                CopyTarget::Program { .. } => flags.insert(Flag::CopyProgram),
                CopyTarget::File { .. } => flags.insert(Flag::CopyServerFile),
                CopyTarget::Stdin | CopyTarget::Stdout => {}
            }
            if payload.is_some() {
                // Text after `COPY … FROM STDIN` in the same string is more SQL
                // to the server (its data comes in CopyData messages), but the
                // parser read it as data: whatever it is went unseen.
                unknown_because =
                    Some("text after COPY … FROM STDIN is SQL to the server, data to the parser");
                (Unknown, "COPY".into())
            } else {
                (Copy, "COPY".into())
            }
        }
        Statement::LoadData { .. } => {
            flags.insert(Flag::ServerAccess);
            (Copy, "LOAD DATA".into())
        }

        Statement::CreateTable(create) => {
            if create.query.is_some() {
                flags.insert(Flag::SelectInto);
            }
            (Ddl, "CREATE TABLE".into())
        }
        Statement::CreateView(view) => (
            Ddl,
            if view.materialized {
                "CREATE MATERIALIZED VIEW"
            } else {
                "CREATE VIEW"
            }
            .into(),
        ),
        Statement::CreateIndex(_) => (Ddl, "CREATE INDEX".into()),
        Statement::CreateSchema { .. } => (Ddl, "CREATE SCHEMA".into()),
        Statement::CreateDatabase { .. } => (Ddl, "CREATE DATABASE".into()),
        Statement::CreateFunction(_) => (Ddl, "CREATE FUNCTION".into()),
        Statement::CreateProcedure { .. } => (Ddl, "CREATE PROCEDURE".into()),
        Statement::CreateTrigger(_) => (Ddl, "CREATE TRIGGER".into()),
        Statement::CreateSequence { .. } => (Ddl, "CREATE SEQUENCE".into()),
        Statement::CreateDomain(_) => (Ddl, "CREATE DOMAIN".into()),
        Statement::CreateType { .. } => (Ddl, "CREATE TYPE".into()),
        Statement::CreateExtension(_) => (Ddl, "CREATE EXTENSION".into()),
        Statement::CreateCollation(_) => (Ddl, "CREATE COLLATION".into()),
        Statement::CreatePolicy(_) => (Ddl, "CREATE POLICY".into()),
        Statement::CreateRule(_) => (Ddl, "CREATE RULE".into()),
        Statement::CreateServer(_) => (Ddl, "CREATE SERVER".into()),
        Statement::CreateForeignTable(_) => (Ddl, "CREATE FOREIGN TABLE".into()),
        Statement::CreateForeignDataWrapper(_) => (Ddl, "CREATE FOREIGN DATA WRAPPER".into()),
        Statement::CreateUserMapping(_) => (Ddl, "CREATE USER MAPPING".into()),
        Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_) => (Ddl, "CREATE OPERATOR".into()),
        Statement::CreateTextSearch(_) => (Ddl, "CREATE TEXT SEARCH".into()),
        Statement::CreateAggregate(_) => (Ddl, "CREATE AGGREGATE".into()),
        Statement::CreateVirtualTable { .. }
        | Statement::CreateSecret { .. }
        | Statement::CreateConnector(_)
        | Statement::CreateMacro { .. }
        | Statement::CreateStage { .. }
        | Statement::CreateFileFormat { .. }
        | Statement::CreateWarehouse(_) => (Ddl, "CREATE".into()),
        Statement::AlterTable(_) => (Ddl, "ALTER TABLE".into()),
        Statement::AlterSchema(_) => (Ddl, "ALTER SCHEMA".into()),
        Statement::AlterIndex { .. } => (Ddl, "ALTER INDEX".into()),
        Statement::AlterView(_) => (Ddl, "ALTER VIEW".into()),
        Statement::AlterFunction(_) => (Ddl, "ALTER FUNCTION".into()),
        Statement::AlterType(_) => (Ddl, "ALTER TYPE".into()),
        Statement::AlterCollation(_) => (Ddl, "ALTER COLLATION".into()),
        Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_) => (Ddl, "ALTER OPERATOR".into()),
        Statement::AlterTextSearch(_) => (Ddl, "ALTER TEXT SEARCH".into()),
        Statement::AlterPolicy(_) => (Ddl, "ALTER POLICY".into()),
        Statement::AlterTrigger(_) => (Ddl, "ALTER TRIGGER".into()),
        Statement::AlterConnector { .. } => (Ddl, "ALTER CONNECTOR".into()),
        Statement::Drop { object_type, .. } => {
            let verb = format!("DROP {object_type}");
            if matches!(object_type, ObjectType::Role | ObjectType::User) {
                flags.insert(Flag::RoleChange);
                (Dcl, verb.into())
            } else {
                (Ddl, verb.into())
            }
        }
        Statement::DropFunction(_) => (Ddl, "DROP FUNCTION".into()),
        Statement::DropDomain(_) => (Ddl, "DROP DOMAIN".into()),
        Statement::DropProcedure { .. } => (Ddl, "DROP PROCEDURE".into()),
        Statement::DropPolicy(_) => (Ddl, "DROP POLICY".into()),
        Statement::DropRule(_) => (Ddl, "DROP RULE".into()),
        Statement::DropTrigger(_) => (Ddl, "DROP TRIGGER".into()),
        Statement::DropExtension(_) => (Ddl, "DROP EXTENSION".into()),
        Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_) => (Ddl, "DROP OPERATOR".into()),
        Statement::DropSecret { .. } | Statement::DropConnector { .. } => (Ddl, "DROP".into()),
        Statement::Comment { .. } => (Ddl, "COMMENT".into()),
        Statement::RenameTable(_) => (Ddl, "RENAME TABLE".into()),

        Statement::CreateRole(_) => {
            flags.insert(Flag::RoleChange);
            (Dcl, "CREATE ROLE".into())
        }
        Statement::CreateUser(_) => {
            flags.insert(Flag::RoleChange);
            (Dcl, "CREATE USER".into())
        }
        Statement::AlterRole { .. } => {
            flags.insert(Flag::RoleChange);
            (Dcl, "ALTER ROLE".into())
        }
        Statement::AlterUser(_) => {
            flags.insert(Flag::RoleChange);
            (Dcl, "ALTER USER".into())
        }
        Statement::GrantRole(_) => {
            flags.insert(Flag::RoleChange);
            (Dcl, "GRANT".into())
        }
        Statement::RevokeRole(_) => {
            flags.insert(Flag::RoleChange);
            (Dcl, "REVOKE".into())
        }
        Statement::Grant(_) => {
            flags.insert(Flag::PrivilegeChange);
            (Dcl, "GRANT".into())
        }
        Statement::Revoke(_) => {
            flags.insert(Flag::PrivilegeChange);
            (Dcl, "REVOKE".into())
        }
        Statement::Deny(_) => {
            flags.insert(Flag::PrivilegeChange);
            (Dcl, "DENY".into())
        }
        Statement::AlterDefaultPrivileges(_) => {
            flags.insert(Flag::PrivilegeChange);
            (Dcl, "ALTER DEFAULT PRIVILEGES".into())
        }

        Statement::StartTransaction {
            statements, modes, ..
        } => {
            if read_write(modes) {
                // Switches off a database's default_transaction_read_only.
                flags.insert(Flag::DisablesSafety);
            }
            if statements.is_empty() {
                (Transaction, "BEGIN".into())
            } else {
                (Procedural, "BEGIN".into())
            }
        }
        Statement::Commit { .. } => (Transaction, "COMMIT".into()),
        Statement::Rollback { .. } => (Transaction, "ROLLBACK".into()),
        Statement::Savepoint { .. } => (Transaction, "SAVEPOINT".into()),
        Statement::ReleaseSavepoint { .. } => (Transaction, "RELEASE SAVEPOINT".into()),

        Statement::Set(set) => set_head(set, &mut flags, &mut settings, &mut depends_on_literals),
        Statement::Reset(_) => (Session, "RESET".into()),
        Statement::Discard { .. } => (Session, "DISCARD".into()),
        Statement::Use(_) => {
            flags.insert(Flag::SearchPathChange);
            (Session, "USE".into())
        }

        Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowProcessList { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. } => (Read, "SHOW".into()),
        Statement::ExplainTable { .. } => (Read, "DESCRIBE".into()),
        Statement::Fetch { .. } => (Read, "FETCH".into()),
        Statement::Declare { .. } => (Read, "DECLARE".into()),
        Statement::Close { .. } => (Utility, "CLOSE".into()),

        Statement::Analyze(_) => (Utility, "ANALYZE".into()),
        Statement::Vacuum(vacuum) => {
            if vacuum.full {
                flags.insert(Flag::HeavyLock);
            }
            (Utility, "VACUUM".into())
        }
        Statement::Lock(_) => {
            flags.insert(Flag::HeavyLock);
            (Utility, "LOCK".into())
        }
        Statement::LockTables { .. } => {
            flags.insert(Flag::HeavyLock);
            (Utility, "LOCK TABLES".into())
        }
        Statement::UnlockTables => (Utility, "UNLOCK TABLES".into()),
        Statement::OptimizeTable { .. } => {
            flags.insert(Flag::HeavyLock);
            (Utility, "OPTIMIZE TABLE".into())
        }
        Statement::Flush { .. } => {
            flags.insert(Flag::HeavyLock);
            (Utility, "FLUSH".into())
        }
        Statement::RefreshMaterializedView(_) => {
            // CONCURRENTLY too: its EXCLUSIVE lock blocks every writer of the
            // view for the whole refresh.
            flags.insert(Flag::HeavyLock);
            (Utility, "REFRESH MATERIALIZED VIEW".into())
        }
        Statement::Kill { .. } => {
            flags.insert(Flag::TerminatesSession);
            (Utility, "KILL".into())
        }
        Statement::Load { .. } => {
            flags.insert(Flag::ServerAccess);
            (Utility, "LOAD".into())
        }
        Statement::Deallocate { .. } => (Utility, "DEALLOCATE".into()),
        // EXECUTE IMMEDIATE runs a text (or a variable's) nobody sees here.
        Statement::Execute {
            immediate: true, ..
        } => {
            unknown_because = Some("EXECUTE IMMEDIATE runs text qgate does not see");
            (Unknown, "EXECUTE IMMEDIATE".into())
        }
        Statement::Execute { .. } => (Utility, "EXECUTE".into()),
        Statement::LISTEN { .. } => (Utility, "LISTEN".into()),
        Statement::UNLISTEN { .. } => (Utility, "UNLISTEN".into()),
        Statement::NOTIFY { .. } => (Utility, "NOTIFY".into()),

        Statement::Call(_) => (Procedural, "CALL".into()),
        Statement::Case(_)
        | Statement::If(_)
        | Statement::While(_)
        | Statement::Raise(_)
        | Statement::Return(_) => (Procedural, "PROCEDURAL".into()),

        // Other dialects' statements (Snowflake, Hive, DuckDB, MSSQL …) and
        // anything added to sqlparser later: not understood, so not trusted.
        _ => (Unknown, first_words(statement).into()),
    };
    Head {
        kind,
        verb,
        flags,
        settings,
        depends_on_literals,
        unknown_because,
    }
}

fn first_words(statement: &Statement) -> String {
    statement
        .to_string()
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_uppercase()
}

/// True for a client encoding in which every byte below 0x80 is ASCII, so the
/// agent (reading UTF-8) and the server tokenize the same characters. In
/// SJIS, BIG5, GBK and the like a multi-byte character can end in `\` or `'`.
/// `READ WRITE` among transaction modes.
fn read_write(modes: &[sqlparser::ast::TransactionMode]) -> bool {
    use sqlparser::ast::{TransactionAccessMode, TransactionMode};
    modes.iter().any(|m| {
        matches!(
            m,
            TransactionMode::AccessMode(TransactionAccessMode::ReadWrite)
        )
    })
}

fn ascii_safe_encoding(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase().replace(['-', '_'], "");
    name.starts_with("utf8") || name == "unicode" || name == "sqlascii" || name == "ascii"
}

/// The text of a setting's value when written as a single name or string.
fn setting_text(value: &Expr) -> Option<(&str, bool)> {
    match value {
        Expr::Identifier(ident) => Some((&ident.value, ident.quote_style == Some('\''))),
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some((s, true)),
            _ => None,
        },
        _ => None,
    }
}

fn set_head(
    set: &Set,
    flags: &mut Flags,
    settings: &mut Vec<String>,
    depends_on_literals: &mut bool,
) -> (Kind, Cow<'static, str>) {
    let mut encoding = |value: Option<(&str, bool)>| match value {
        Some((text, from_literal)) => {
            *depends_on_literals |= from_literal;
            if !ascii_safe_encoding(text) {
                flags.insert(Flag::DisablesSafety);
            }
        }
        None => flags.insert(Flag::DisablesSafety),
    };
    if let Set::SetNames { charset_name, .. } = set {
        encoding(Some((
            &charset_name.value,
            charset_name.quote_style == Some('\''),
        )));
        return (Kind::Session, "SET".into());
    }
    if let Set::SingleAssignment {
        variable, values, ..
    } = set
    {
        let name = setting_name(variable);
        if name == "client_encoding" || name == "names" || name == "character_set_client" {
            encoding(values.first().and_then(setting_text));
        }
    }
    let mut assign = |name: &ObjectName| {
        let name = setting_name(name);
        if is_safety_setting(&name) {
            flags.insert(Flag::DisablesSafety);
        }
        if name == "role" || name == "session_authorization" {
            flags.insert(Flag::IdentityChange);
        }
        if name == "password" {
            // MySQL's SET PASSWORD [FOR user] = …: a credential change.
            flags.insert(Flag::PrivilegeChange);
        }
        if name == "search_path" || name == "schema" {
            flags.insert(Flag::SearchPathChange);
        }
        settings.push(name);
    };
    match set {
        Set::SingleAssignment { variable, .. } => {
            assign(variable);
            (Kind::Session, "SET".into())
        }
        Set::ParenthesizedAssignments { variables, .. } => {
            variables.iter().for_each(&mut assign);
            (Kind::Session, "SET".into())
        }
        Set::MultipleAssignments { assignments } => {
            assignments.iter().for_each(|a| assign(&a.name));
            (Kind::Session, "SET".into())
        }
        Set::SetSessionAuthorization(_) => {
            flags.insert(Flag::IdentityChange);
            (Kind::Session, "SET SESSION AUTHORIZATION".into())
        }
        Set::SetRole { role_name, .. } => {
            if role_name.is_some() {
                flags.insert(Flag::IdentityChange);
            }
            (Kind::Session, "SET ROLE".into())
        }
        Set::SetTransaction { modes, .. } => {
            if read_write(modes) {
                // As `SET default_transaction_read_only = off` (with SESSION
                // CHARACTERISTICS) or for this transaction.
                flags.insert(Flag::DisablesSafety);
            }
            (Kind::Transaction, "SET TRANSACTION".into())
        }
        Set::SetNames { charset_name, .. } => {
            // `SET NAMES x` is `SET client_encoding = x`.
            if !ascii_safe_encoding(&charset_name.value) {
                flags.insert(Flag::DisablesSafety);
            }
            (Kind::Session, "SET".into())
        }
        Set::SetTimeZone { .. } | Set::SetNamesDefault {} => (Kind::Session, "SET".into()),
        // MSSQL session options: not PostgreSQL, not trusted.
        Set::SetSessionParam(_) => (Kind::Unknown, "SET".into()),
    }
}

fn query_verb(body: &SetExpr) -> &'static str {
    match body {
        SetExpr::Select(select) if select.into.is_some() => "SELECT INTO",
        SetExpr::Select(_) | SetExpr::SetOperation { .. } => "SELECT",
        SetExpr::Query(query) => query_verb(&query.body),
        SetExpr::Values(_) => "VALUES",
        SetExpr::Insert(_) => "INSERT",
        SetExpr::Update(_) => "UPDATE",
        SetExpr::Delete(_) => "DELETE",
        SetExpr::Merge(_) => "MERGE",
        SetExpr::Table(_) => "TABLE",
    }
}

/// A function's name as recorded: unquoted parts lower case, joined with dots.
/// A setting's name as the server resolves it: MySQL's `@@x`,
/// `@@session.x`, `@@global.x` (and `local`, `persist`, `persist_only`)
/// all name the system variable `x`.
fn setting_name(name: &ObjectName) -> String {
    // Both servers look settings up ignoring case, quoted or not
    // (``SET `SQL_LOG_BIN` = 0``, `SET "Search_Path" = …`).
    let name = function_name(name).to_ascii_lowercase();
    let Some(bare) = name.strip_prefix("@@") else {
        return name;
    };
    let lower = bare.to_ascii_lowercase();
    for scope in ["session.", "global.", "local.", "persist.", "persist_only."] {
        if lower.starts_with(scope) {
            return bare[scope.len()..].to_owned();
        }
    }
    bare.to_owned()
}

pub(crate) fn function_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part {
            ObjectNamePart::Identifier(ident) => {
                if ident.quote_style.is_some() {
                    out.push_str(&ident.value);
                } else {
                    out.push_str(&ident.value.to_lowercase());
                }
            }
            ObjectNamePart::Function(f) => out.push_str(&f.name.value.to_lowercase()),
        }
    }
    out
}

/// An operator's symbol as the catalog names it (`OPERATOR(s.===)` → `===`).
fn operator_name(op: &BinaryOperator) -> String {
    match op {
        BinaryOperator::PGCustomBinaryOperator(parts) => parts.last().cloned().unwrap_or_default(),
        BinaryOperator::Custom(symbol) => symbol.clone(),
        other => other.to_string(),
    }
}

/// A type's name as written, lower case, without modifiers or array brackets.
fn type_name(data_type: &sqlparser::ast::DataType) -> String {
    let text = data_type.to_string().to_lowercase();
    let text = text.split('(').next().unwrap_or(&text);
    text.trim_end_matches("[]")
        .trim()
        .trim_matches('"')
        .to_string()
}

fn ident_name(ident: &sqlparser::ast::Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

pub(super) fn table_name(name: &ObjectName) -> TableName {
    TableName {
        parts: name
            .0
            .iter()
            .map(|part| match part {
                ObjectNamePart::Identifier(ident) if ident.quote_style.is_some() => {
                    ident.value.clone()
                }
                ObjectNamePart::Identifier(ident) => ident.value.to_lowercase(),
                ObjectNamePart::Function(f) => f.name.value.to_lowercase(),
            })
            .collect(),
    }
}

/// Names and aliases (lower case) of the tables in `from`, for resolving
/// qualified column references and MySQL's `DELETE alias FROM …`.
fn factor_names(factors: &[&TableFactor]) -> Vec<(String, Option<TableName>)> {
    let mut out = Vec::new();
    for factor in factors {
        if let TableFactor::Table { name, alias, .. } = factor {
            let table = table_name(name);
            out.push((table.relation().to_lowercase(), Some(table.clone())));
            if let Some(alias) = alias {
                out.push((alias.name.value.to_lowercase(), Some(table)));
            }
        } else if let Some(alias) = factor_alias(factor) {
            out.push((alias, None));
        }
    }
    out
}

fn factor_alias(factor: &TableFactor) -> Option<String> {
    match factor {
        TableFactor::Derived { alias, .. }
        | TableFactor::Function { alias, .. }
        | TableFactor::TableFunction { alias, .. }
        | TableFactor::UNNEST { alias, .. } => alias.as_ref().map(|a| a.name.value.to_lowercase()),
        _ => None,
    }
}

fn factors(tables: &[TableWithJoins]) -> Vec<&TableFactor> {
    let mut out = Vec::new();
    for t in tables {
        out.push(&t.relation);
        out.extend(t.joins.iter().map(|j| &j.relation));
    }
    out
}

struct CteFrame {
    owner: *const Query,
    ctes: Vec<(*const Query, String)>,
    recursive: bool,
    visible: usize,
}

/// Visits the whole tree of one top-level statement.
struct Collector {
    /// DDL and similar: relations outside queries are the objects changed.
    targets_outside_queries: bool,
    touched: Vec<TableName>,
    touched_in_ddl: Vec<TableName>,
    written: Vec<TableName>,
    functions: Vec<String>,
    code: CodeRefs,
    flags: Flags,
    writes_seen: bool,
    depends_on_literals: bool,
    statement_depth: usize,
    query_depth: usize,
    in_cte: usize,
    frames: Vec<CteFrame>,
    skip_relations: usize,
}

impl Collector {
    fn new(kind: Kind) -> Self {
        Collector {
            targets_outside_queries: matches!(kind, Kind::Ddl | Kind::Dcl | Kind::Utility),
            touched: Vec::new(),
            touched_in_ddl: Vec::new(),
            written: Vec::new(),
            functions: Vec::new(),
            code: CodeRefs::default(),
            flags: Flags::default(),
            writes_seen: false,
            depends_on_literals: false,
            statement_depth: 0,
            query_depth: 0,
            in_cte: 0,
            frames: Vec::new(),
            skip_relations: 0,
        }
    }

    /// (read, written): every relation touched, less one occurrence per write target.
    fn tables(mut self) -> (Vec<TableName>, Vec<TableName>) {
        for target in &self.written {
            if let Some(i) = self.touched.iter().position(|t| t == target) {
                self.touched.swap_remove(i);
            }
        }
        let mut written = self.written;
        written.extend(self.touched_in_ddl);
        (dedup(self.touched), dedup(written))
    }

    fn is_cte_reference(&self, name: &TableName) -> bool {
        if name.parts.len() != 1 {
            return false;
        }
        let wanted = &name.parts[0];
        self.frames
            .iter()
            .any(|f| f.ctes.iter().take(f.visible).any(|(_, n)| n == wanted))
    }

    fn write(&mut self, target: TableName) {
        self.written.push(target);
    }

    fn note_write(&mut self) {
        self.writes_seen = true;
        if self.in_cte > 0 || self.query_depth > 0 {
            self.flags.insert(Flag::WriteInCte);
        }
    }

    fn all_rows_if(
        &mut self,
        selection: Option<&Expr>,
        outer: &[(String, Option<TableName>)],
        own: &[(String, Option<TableName>)],
    ) {
        let own: Vec<String> = own.iter().map(|(n, _)| n.clone()).collect();
        if self.selects_all_of(selection, outer, &own) {
            self.flags.insert(Flag::AllRows);
        }
    }

    /// True when `selection` (a WHERE over the rows named in `outer`) may
    /// select every row.
    fn selects_all(
        &mut self,
        selection: Option<&Expr>,
        outer: &[(String, Option<TableName>)],
    ) -> bool {
        self.selects_all_of(selection, outer, &[])
    }

    /// As [`Self::selects_all`], `own` naming the rows being changed.
    fn selects_all_of(
        &mut self,
        selection: Option<&Expr>,
        outer: &[(String, Option<TableName>)],
        own: &[String],
    ) -> bool {
        let names: Vec<String> = outer.iter().map(|(n, _)| n.clone()).collect();
        match selection {
            None => true,
            Some(condition) => {
                let mut c = Condition::with_own(&names, own);
                let all = c.selects_all_rows(condition);
                self.depends_on_literals |= c.depends_on_literals;
                all
            }
        }
    }

    fn update(&mut self, update: &Update) {
        let mut all = factors(std::slice::from_ref(&update.table));
        for factor in &all {
            if let TableFactor::Table { name, .. } = factor {
                self.write(table_name(name));
            }
        }
        if let Some(from) = &update.from {
            let (sqlparser::ast::UpdateTableFromKind::BeforeSet(from)
            | sqlparser::ast::UpdateTableFromKind::AfterSet(from)) = from;
            all.extend(factors(from));
        }
        let outer = factor_names(&all);
        let own = factor_names(&factors(std::slice::from_ref(&update.table)));
        self.all_rows_if(update.selection.as_ref(), &outer, &own);
    }

    fn delete(&mut self, delete: &Delete) {
        let (FromTable::WithFromKeyword(from) | FromTable::WithoutKeyword(from)) = &delete.from;
        let from_factors = factors(from);
        let mut all = from_factors.clone();
        if let Some(using) = &delete.using {
            all.extend(factors(using));
        }
        let outer = factor_names(&all);
        if delete.tables.is_empty() {
            for factor in &from_factors {
                if let TableFactor::Table { name, .. } = factor {
                    self.write(table_name(name));
                }
            }
        } else {
            // MySQL `DELETE a, b FROM …`: the targets may be aliases.
            for target in &delete.tables {
                let target = table_name(target);
                let resolved = if target.parts.len() == 1 {
                    outer
                        .iter()
                        .find(|(n, _)| *n == target.relation().to_lowercase())
                        .and_then(|(_, t)| t.clone())
                } else {
                    None
                };
                self.write(resolved.unwrap_or(target));
            }
        }
        let own = factor_names(&from_factors);
        self.all_rows_if(delete.selection.as_ref(), &outer, &own);
    }

    fn merge(&mut self, merge: &sqlparser::ast::Merge) {
        if let TableFactor::Table { name, .. } = &merge.table {
            self.write(table_name(name));
        }
        let outer = factor_names(&[&merge.table, &merge.source]);
        let own = factor_names(&[&merge.table]);
        self.all_rows_if(Some(&merge.on), &outer, &own);
        // Rows of the target with no partner in the source are all of them when
        // the source is empty.
        if merge
            .clauses
            .iter()
            .any(|c| matches!(c.clause_kind, MergeClauseKind::NotMatchedBySource))
        {
            self.flags.insert(Flag::AllRows);
        }
    }

    fn select(&mut self, select: &Select) {
        let joins = super::joins::judge(select, |name| {
            self.is_cte_reference(&TableName {
                parts: vec![name.to_owned()],
            })
        });
        if joins.unfiltered {
            self.flags.insert(Flag::UnfilteredJoin);
        }
        if joins.cross {
            self.flags.insert(Flag::CrossJoin);
        }
        self.depends_on_literals |= joins.depends_on_literals;
        if let Some(into) = &select.into {
            self.flags.insert(Flag::SelectInto);
            for target in &into.targets {
                match target {
                    Expr::Identifier(ident) => {
                        self.write(table_name(&ObjectName::from(vec![ident.clone()])))
                    }
                    Expr::CompoundIdentifier(parts) => {
                        self.write(table_name(&ObjectName::from(parts.clone())))
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Visitor for Collector {
    type Break = ();

    fn pre_visit_statement(&mut self, statement: &Statement) -> ControlFlow<()> {
        self.statement_depth += 1;
        match statement {
            Statement::Insert(insert) => {
                self.note_write();
                if let TableObject::TableName(name) = &insert.table {
                    self.write(table_name(name));
                }
                let upsert = match &insert.on {
                    Some(sqlparser::ast::OnInsert::OnConflict(c)) => {
                        matches!(c.action, sqlparser::ast::OnConflictAction::DoUpdate(_))
                    }
                    Some(sqlparser::ast::OnInsert::DuplicateKeyUpdate(_)) => true,
                    _ => false,
                };
                if upsert {
                    self.flags.insert(Flag::Upsert);
                }
            }
            Statement::Update(update) => {
                self.note_write();
                self.update(update);
            }
            Statement::Delete(delete) => {
                self.note_write();
                self.delete(delete);
            }
            Statement::Merge(merge) => {
                self.note_write();
                self.merge(merge);
            }
            Statement::Truncate(truncate) => {
                self.note_write();
                for target in &truncate.table_names {
                    self.write(table_name(&target.name));
                }
            }
            Statement::Drop { names, .. } => {
                for name in names {
                    self.touched_in_ddl.push(table_name(name));
                }
            }
            Statement::Copy { source, to, .. } => match source {
                CopySource::Table {
                    table_name: name, ..
                } if !*to => {
                    self.note_write();
                    self.write(table_name(name));
                }
                _ => {}
            },
            Statement::Grant(sqlparser::ast::Grant {
                objects: Some(sqlparser::ast::GrantObjects::Tables(tables)),
                ..
            })
            | Statement::Revoke(sqlparser::ast::Revoke {
                objects: Some(sqlparser::ast::GrantObjects::Tables(tables)),
                ..
            }) => {
                for name in tables {
                    self.touched_in_ddl.push(table_name(name));
                }
            }
            Statement::Call(function) => self.functions.push(function_name(&function.name)),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, _: &Statement) -> ControlFlow<()> {
        self.statement_depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let me = query as *const Query;
        if let Some(frame) = self.frames.last_mut() {
            if let Some(i) = frame.ctes.iter().position(|(q, _)| *q == me) {
                frame.visible = if frame.recursive { frame.ctes.len() } else { i };
                self.in_cte += 1;
            }
        }
        self.query_depth += 1;
        if !query.locks.is_empty() {
            // SELECT … FOR UPDATE/SHARE: every row its WHERE selects is
            // locked until the transaction ends.
            if let SetExpr::Select(select) = &*query.body {
                let outer = factor_names(&factors(&select.from));
                if self.selects_all(select.selection.as_ref(), &outer) {
                    self.flags.insert(Flag::LocksAllRows);
                }
            }
        }
        if let Some(with) = &query.with {
            self.frames.push(CteFrame {
                owner: me,
                ctes: with
                    .cte_tables
                    .iter()
                    .map(|cte| {
                        let name = if cte.alias.name.quote_style.is_some() {
                            cte.alias.name.value.clone()
                        } else {
                            cte.alias.name.value.to_lowercase()
                        };
                        (&*cte.query as *const Query, name)
                    })
                    .collect(),
                recursive: with.recursive,
                visible: 0,
            });
        }
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        let me = query as *const Query;
        if self.frames.last().is_some_and(|f| f.owner == me) {
            self.frames.pop();
        }
        self.query_depth -= 1;
        if let Some(frame) = self.frames.last_mut() {
            if frame.ctes.iter().any(|(q, _)| *q == me) {
                frame.visible = frame.ctes.len();
                self.in_cte -= 1;
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        self.select(select);
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, factor: &TableFactor) -> ControlFlow<()> {
        match factor {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => {
                // `FROM generate_series(…)`: a function, visited next as a relation.
                self.functions.push(function_name(name));
                self.skip_relations += 1;
            }
            TableFactor::Function { name, .. } => self.functions.push(function_name(name)),
            _ => {}
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        if self.skip_relations > 0 {
            self.skip_relations -= 1;
            return ControlFlow::Continue(());
        }
        let name = table_name(relation);
        if self.is_cte_reference(&name) {
            return ControlFlow::Continue(());
        }
        if self.targets_outside_queries && self.query_depth == 0 {
            self.touched_in_ddl.push(name);
        } else {
            self.touched.push(name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        let ops = &mut self.code.operators;
        match expr {
            Expr::Function(function) => self.functions.push(function_name(&function.name)),
            Expr::BinaryOp { op, .. } => ops.push(operator_name(op)),
            Expr::AnyOp { compare_op, .. } | Expr::AllOp { compare_op, .. } => {
                ops.push(operator_name(compare_op))
            }
            Expr::UnaryOp { op, .. } if !matches!(op, UnaryOperator::Not) => {
                ops.push(op.to_string())
            }
            Expr::Like { negated, .. } => ops.push(if *negated { "!~~" } else { "~~" }.into()),
            Expr::ILike { negated, .. } => ops.push(if *negated { "!~~*" } else { "~~*" }.into()),
            Expr::SimilarTo { negated, .. } | Expr::RLike { negated, .. } => {
                ops.push(if *negated { "!~" } else { "~" }.into())
            }
            Expr::Between { .. } => ops.extend([">=".into(), "<=".into()]),
            Expr::In { negated, .. } => ops.push(if *negated { "<>" } else { "=" }.into()),
            Expr::IsDistinctFrom(..) | Expr::IsNotDistinctFrom(..) => ops.push("=".into()),
            Expr::Case {
                operand: Some(_), ..
            } => ops.push("=".into()),
            Expr::Cast { data_type, .. }
            | Expr::Convert {
                data_type: Some(data_type),
                ..
            } => self.code.types.push(type_name(data_type)),
            Expr::TypedString(typed) => self.code.types.push(type_name(&typed.data_type)),
            Expr::CompoundIdentifier(parts) if parts.len() > 1 => {
                if let Some(last) = parts.last() {
                    self.code.attributes.push(ident_name(last));
                }
            }
            Expr::CompoundFieldAccess { access_chain, .. } => {
                for access in access_chain {
                    if let sqlparser::ast::AccessExpr::Dot(Expr::Identifier(ident)) = access {
                        self.code.attributes.push(ident_name(ident));
                    }
                }
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}
