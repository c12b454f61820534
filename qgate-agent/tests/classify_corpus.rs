//! The classifier over SQL nobody on the team wrote: PostgreSQL's regression
//! scripts and the MySQL/MariaDB test suites (`$QGATE_CORPUS`).
//!
//! Every statement must classify without panicking; every DROP, TRUNCATE,
//! ALTER, GRANT and REVOKE must be held by the shipped default; the decision
//! cache must agree with deciding afresh. Counts are printed (run with
//! `--nocapture` to see them).
mod corpus_support;
use corpus_support::corpus;
use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use qgate_agent::{
    classify::{
        classify,
        script::{split_mysqltest, split_psql},
        Dialect, Kind,
    },
    policy::{DecisionCache, NoEstimator, Policy, Subject},
};
use sqlparser::{
    dialect::PostgreSqlDialect,
    tokenizer::{Token, Tokenizer},
};

fn files(dir: &Path, extensions: &[&str]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .collect();
    out.sort();
    out
}

fn read(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The first keyword of a statement as written, found by the tokenizer alone
/// (independent of the classifier under test).
fn first_keyword(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
    tokens.into_iter().find_map(|t| match t {
        Token::Whitespace(_) => None,
        Token::Word(w) if w.quote_style.is_none() => Some(Some(w.value.to_ascii_uppercase())),
        _ => Some(None),
    })?
}

#[derive(Default)]
struct Tally {
    statements: usize,
    unknown: usize,
}

fn run(paths: &[PathBuf], dialect: Dialect, split: fn(&str) -> Vec<String>) -> Tally {
    let policy = Arc::new(Policy::builtin_default());
    let subject = Subject::default();
    let mut cache = DecisionCache::default();
    let mut tally = Tally::default();
    let mut problems = Vec::new();
    for path in paths {
        for sql in split(&read(path)) {
            let classified = std::panic::catch_unwind(|| classify(&sql, dialect));
            let Ok(classification) = classified else {
                problems.push(format!("{}: panic on {sql:?}", path.display()));
                continue;
            };
            tally.statements += classification.statements.len().max(1);
            tally.unknown += classification
                .statements
                .iter()
                .filter(|s| s.kind == Kind::Unknown)
                .count();
            let fresh = policy.decide(&subject, &classification, &NoEstimator);
            let (_, cached) = cache.decide(&policy, &subject, &sql, dialect, &NoEstimator);
            if cached != fresh {
                problems.push(format!("cache changed the decision on {sql:?}"));
            }
            if dialect == Dialect::Postgresql {
                let risky = first_keyword(&sql).is_some_and(|k| {
                    matches!(
                        k.as_str(),
                        "DROP" | "TRUNCATE" | "ALTER" | "GRANT" | "REVOKE"
                    )
                });
                if risky && fresh.action.name() != "hold" {
                    problems.push(format!(
                        "{}: {} by rule {} for {sql:?}",
                        path.display(),
                        fresh.action.name(),
                        fresh.rule
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    tally
}

#[test]
fn pg_regress_classifies_without_panic_and_holds_destructive_verbs() {
    let Some(dir) = corpus() else { return };
    let paths = files(&dir.join("pg-regress"), &["sql"]);
    assert!(paths.len() >= 40, "expected the 44 pg-regress files");
    let tally = run(&paths, Dialect::Postgresql, split_psql);
    println!(
        "pg-regress: {} statements, {} parsed, {} unknown ({:.1}%)",
        tally.statements,
        tally.statements - tally.unknown,
        tally.unknown,
        100.0 * tally.unknown as f64 / tally.statements.max(1) as f64
    );
    assert!(
        tally.statements > 10_000,
        "splitter found only {}",
        tally.statements
    );
}

#[test]
fn mysql_test_suites_classify_without_panic() {
    let Some(dir) = corpus() else { return };
    let mut paths = Vec::new();
    for sub in ["mariadb-10.0.12", "mysql-8.0"] {
        paths.extend(files(&dir.join("mysql-test").join(sub), &["test", "inc"]));
    }
    assert!(paths.len() >= 25, "expected the mysql-test files");
    let tally = run(&paths, Dialect::Mysql, split_mysqltest);
    println!(
        "mysql-test: {} statements, {} parsed, {} unknown ({:.1}%)",
        tally.statements,
        tally.statements - tally.unknown,
        tally.unknown,
        100.0 * tally.unknown as f64 / tally.statements.max(1) as f64
    );
    assert!(
        tally.statements > 3_000,
        "splitter found only {}",
        tally.statements
    );
}

/// The unfiltered-join flag over pg-regress: printed (`--nocapture`) with
/// every flagged statement, to read for false positives; the count must
/// stay small (a join the regression suite runs is nearly always linked).
#[test]
fn pg_regress_unfiltered_joins_are_few_and_printed() {
    use qgate_agent::classify::Flag;
    let Some(dir) = corpus() else { return };
    let paths = files(&dir.join("pg-regress"), &["sql"]);
    let (mut statements, mut unfiltered, mut cross) = (0usize, Vec::new(), 0usize);
    for path in &paths {
        for sql in split_psql(&read(path)) {
            for facts in classify(&sql, Dialect::Postgresql).statements {
                statements += 1;
                if facts.flags.contains(Flag::UnfilteredJoin) {
                    unfiltered.push(facts.sql.clone());
                }
                if facts.flags.contains(Flag::CrossJoin) {
                    cross += 1;
                }
            }
        }
    }
    println!(
        "pg-regress: {statements} statements, {} unfiltered_join, {cross} cross_join",
        unfiltered.len()
    );
    for sql in &unfiltered {
        println!("--- unfiltered_join:\n{sql}");
    }
    assert!(
        unfiltered.len() * 100 < statements,
        "{} flagged",
        unfiltered.len()
    );
}
