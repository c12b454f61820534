//! The kernel's fast path against the agent's judgement (issue 10).
//!
//! The tc gate and the server hook pass a statement without asking the
//! agent when the plain-read proof (`qgate_common::scan`, the very state
//! machine the kernel runs) accepts its text. Whatever it accepts, the agent
//! must judge the same way: one read, no function call, no write, no flag,
//! allowed by the shipped policy, reaching no user code in any database
//! whose catalog leaves the fast path on. Checked on every statement of the
//! PostgreSQL regression scripts, on each family of the red team's attacks,
//! and on 200 000 generated texts.
mod corpus_support;
use corpus_support::corpus;
use std::path::PathBuf;

use qgate_agent::{
    catalog::{
        view::{class, CastRow, Depend, FunctionRow, Snapshot, TypeRow},
        CatalogView,
    },
    classify::{classify, script::split_psql, Dialect, Kind},
    policy::{Action, NoEstimator, Policy, Subject},
};
use qgate_common::scan::harmless_text;

const KEYWORD_FUNCTIONS: &[&str] = &[
    "current_user",
    "session_user",
    "current_role",
    "user",
    "current_catalog",
    "current_schema",
    "current_date",
    "current_time",
    "current_timestamp",
    "localtime",
    "localtimestamp",
    "system_user",
];

/// Checks one text; returns whether the kernel would pass it.
fn agrees(text: &str, policy: &Policy) -> bool {
    if !harmless_text(text.as_bytes(), false) {
        return false;
    }
    let c = classify(text, Dialect::Postgresql);
    let subject = Subject::default();
    if c.has_unknown() {
        // sqlparser does not read it: the server (stricter than this
        // proof's alphabet) rejects it or reads a plain SELECT/SHOW; either
        // way nothing here may call, write or lock. Counted by the caller.
        return true;
    }
    assert_eq!(
        c.statements.len(),
        1,
        "the kernel passed several statements: {text:?}"
    );
    let s = &c.statements[0];
    assert!(
        matches!(s.kind, Kind::Read | Kind::Session),
        "the kernel passed a {} statement: {text:?}",
        s.kind
    );
    // Calls without parentheses are SQL keywords the grammar binds to the
    // server's own code (SQLValueFunction, or `pg_catalog.` by name): no
    // search path or overload can reach user code through them.
    assert!(
        s.functions
            .iter()
            .all(|f| KEYWORD_FUNCTIONS.contains(&f.as_str())),
        "the kernel passed a call: {text:?} {:?}",
        s.functions
    );
    assert!(
        s.tables_written.is_empty(),
        "the kernel passed a write: {text:?}"
    );
    assert!(
        s.flags.is_empty(),
        "the kernel passed flags {:?}: {text:?}",
        s.flags
    );
    let d = policy.decide(&subject, &c, &NoEstimator);
    assert!(
        matches!(d.action, Action::Allow),
        "the kernel passed what the default policy does not allow ({}): {text:?}",
        d.rule
    );
    // In a database whose catalog leaves the fast path on, nothing it names
    // can be user code.
    let safe = CatalogView::build(&safe_catalog());
    assert!(safe.fast_path_safe());
    assert!(safe.user_code(s, &|_| false).is_empty(), "{text:?}");
    true
}

/// User code the fast path must not reach by a plain SELECT: functions of
/// two arguments and a trigger on a table.
fn safe_catalog() -> Snapshot {
    Snapshot {
        functions: vec![FunctionRow {
            oid: 20_000,
            schema: "app".into(),
            name: "f2".into(),
            args: "integer, integer".into(),
            required_args: 2,
        }],
        relations: vec![(60_000, "public".into(), "t".into())],
        triggers: vec![(90_000, 60_000)],
        depends: vec![Depend {
            classid: class::PG_TRIGGER,
            objid: 90_000,
            objsubid: 0,
            refclassid: class::PG_PROC,
            refobjid: 20_000,
        }],
        ..Snapshot::default()
    }
}

/// The red team's catalog: every family of user code reachable by name.
fn attacked_catalog() -> CatalogView {
    let dep = |classid, objid, refobjid| Depend {
        classid,
        objid,
        objsubid: 0,
        refclassid: class::PG_PROC,
        refobjid,
    };
    let f = |oid, name: &str, args: &str, required| FunctionRow {
        oid,
        schema: "public".into(),
        name: name.into(),
        args: args.into(),
        required_args: required,
    };
    CatalogView::build(&Snapshot {
        functions: vec![
            f(20_000, "evil_op", "integer, integer", 2),
            f(20_001, "evil_cast", "integer", 1),
            f(20_002, "evil", "t", 1),
        ],
        operators: vec![(30_000, "===".into()), (30_001, "+".into())],
        types: vec![TypeRow {
            oid: 40_000,
            name: "thing".into(),
            row_type: false,
        }],
        casts: vec![CastRow {
            oid: 50_000,
            source: "int4".into(),
            target: "thing".into(),
            context: 'e',
        }],
        depends: vec![
            dep(class::PG_OPERATOR, 30_000, 20_000),
            dep(class::PG_OPERATOR, 30_001, 20_000),
            dep(class::PG_CAST, 50_000, 20_001),
        ],
        ..Snapshot::default()
    })
}

#[test]
fn every_family_is_refused_by_the_scanner_or_turns_the_fast_path_off() {
    let policy = Policy::builtin_default();
    let attacked = attacked_catalog();
    // Reachable from a plain SELECT: the kernel may accept the text, so the
    // database's catalog must keep the fast path off.
    for text in [
        "SELECT 1 === 2",
        "SELECT 1 + 1",
        "SELECT 1::thing",
        "SELECT t.evil FROM t",
        "SELECT x FROM v",
        "SELECT evil_dom '1'",
    ] {
        let _ = agrees(text, &policy);
        assert!(!attacked.fast_path_safe(), "{text}");
    }
    // Never accepted by the scanner, whatever the catalog.
    for text in [
        "SELECT lower(1)",
        "SELECT count(t) FROM t",
        "SELECT E'\u{95}\\'; DROP TABLE sac; --'",
        "SELECT 'x\\' , $$' ; DROP TABLE sac; -- $$",
        "SELECT 1; DROP TABLE t",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * INTO x FROM t",
        "SELECT * FROM t WHERE id IN (SELECT id FROM t)",
        "EXPLAIN (ANALYSE) DELETE FROM t",
        "TABLE t",
        "DELETE FROM t",
        "SELECT set_config('session_replication_role', 'replica', false)",
        "/* /* */ SELECT 1 */ DROP TABLE t",
        "-- x\r DROP TABLE t",
    ] {
        assert!(!agrees(text, &policy), "the kernel would pass {text:?}");
    }
}

#[test]
fn the_regression_scripts_agree() {
    let Some(dir) = corpus() else {
        return;
    };
    let policy = Policy::builtin_default();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir.join("pg-regress"))
        .expect("pg-regress")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    paths.sort();
    let (mut seen, mut passed) = (0, 0);
    for path in paths {
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
        for statement in split_psql(&text) {
            seen += 1;
            if agrees(&statement, &policy) {
                passed += 1;
            }
        }
    }
    eprintln!("{seen} statements, {passed} the kernel would pass on its own");
    assert!(seen > 1000 && passed > 10, "{seen} / {passed}");
}

/// Texts from a small alphabet of SQL pieces, chosen so the scanner's edge
/// cases (comments, quotes, words it refuses, semicolons) meet.
#[test]
fn generated_texts_agree() {
    const PIECES: &[&str] = &[
        "SELECT", "select", "SHOW", " ", "\n", "\t", "\r", "*", "a", "t.a", "t", "FROM", "WHERE",
        "=", "+", "-", "/", "<", ">", "1", "'x'", "'", "\"", "\"q\"", "$$", "$1", "::", "int",
        "--", "/*", "*/", ";", "(", ")", ",", "INTO", "FOR", "UPDATE", "DROP", "TABLE", "E'\\''",
        "AS", "ORDER BY", "LIMIT", "UNION", "JOIN", "ON", "x.y.z", "||", "~", "!", "@", "#", "%",
        "^", "&", "|", "`", "?", "[", "]", "{", "}", ".", "é", "\\",
    ];
    let policy = Policy::builtin_default();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        // xorshift64*: reproducible, no dependency.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let (mut passed, mut unknown) = (0, 0);
    for _ in 0..200_000 {
        let n = 2 + (next() % 10) as usize;
        let mut text = String::new();
        for i in 0..n {
            let piece = if i == 0 && next() % 2 == 0 {
                "SELECT "
            } else {
                PIECES[(next() % PIECES.len() as u64) as usize]
            };
            text.push_str(piece);
            if next() % 3 == 0 {
                text.push(' ');
            }
        }
        if agrees(&text, &policy) {
            passed += 1;
            if classify(&text, Dialect::Postgresql).has_unknown() {
                unknown += 1;
            }
        }
    }
    eprintln!("200000 texts: the kernel would pass {passed}, {unknown} of them unparsed by qgate");
    assert!(
        passed > 1000,
        "the generator reaches the fast path: {passed}"
    );
}
