//! The DESIGN.md example policies (examples/policies/design-examples.toml),
//! one test per rule, through the same function `qgate-agent policy check` calls.
use std::{net::TcpListener, path::Path, time::Duration};

use qgate_agent::{
    classify::{Dialect, StatementFacts},
    policy::{
        check::{check, CheckReport},
        estimate::{EstimatorConfig, ExplainEstimator},
        Action, NoEstimator, Policy, RowEstimator, Subject,
    },
};

fn example_policy() -> Policy {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/policies/design-examples.toml");
    Policy::from_file(&path).expect("the example policy is valid")
}

fn user(name: &str) -> Subject {
    Subject {
        user: Some(name.into()),
        database: Some("shop".into()),
        client_addr: Some("10.1.2.3".parse().unwrap()),
        application: Some("psql".into()),
    }
}

fn run(who: &Subject, sql: &str, estimator: &dyn RowEstimator) -> CheckReport {
    check(&example_policy(), who, sql, Dialect::Postgresql, estimator)
}

fn rows(n: u64) -> impl Fn(&StatementFacts) -> Result<u64, String> {
    move |_| Ok(n)
}

#[test]
fn engineers_ddl_waits_for_one_engineer_approval() {
    for sql in [
        "ALTER TABLE orders ADD COLUMN note text",
        "CREATE INDEX ON orders (created_at)",
        "DROP TABLE old_orders",
    ] {
        let r = run(&user("alice"), sql, &NoEstimator);
        assert_eq!(r.decision, "hold", "{sql}");
        assert_eq!(r.rule, "engineers-ddl-needs-a-peer");
        assert_eq!(
            r.action,
            Action::Hold {
                approvals: 1,
                reviewer_groups: vec!["engineers".into()]
            }
        );
    }
}

#[test]
fn engineers_write_without_approval() {
    for sql in [
        "INSERT INTO orders (id) VALUES (7)",
        "UPDATE orders SET state = 'paid' WHERE id = 7",
        "DELETE FROM orders WHERE id = 7",
        "BEGIN",
    ] {
        let r = run(&user("eng_carol"), sql, &NoEstimator);
        assert_eq!(r.decision, "allow", "{sql}");
        assert_eq!(r.rule, "engineers-may-write");
    }
}

#[test]
fn analysts_read_freely() {
    let r = run(
        &user("analyst_ann"),
        "SELECT count(*) FROM orders GROUP BY state",
        &NoEstimator,
    );
    assert_eq!(r.decision, "allow");
    assert_eq!(r.rule, "analysts-read-freely");
}

#[test]
fn analysts_touching_sensitive_tables_are_held() {
    for sql in [
        "SELECT * FROM public.salaries",
        "SELECT * FROM salaries",
        "SELECT name FROM hr.reviews",
        "SELECT o.id FROM orders o JOIN hr.people p ON p.id = o.owner",
        "SELECT * FROM orders WHERE owner IN (SELECT id FROM hr.people)",
        "WITH s AS (SELECT * FROM public.salaries) SELECT avg(amount) FROM s",
        "SELECT 1; SELECT * FROM \"hr\".\"people\"",
    ] {
        let r = run(&user("analyst_ann"), sql, &NoEstimator);
        assert_eq!(r.decision, "hold", "{sql}");
        assert_eq!(r.rule, "analysts-sensitive-tables-held", "{sql}");
        assert!(
            r.reasons.iter().any(|x| x.contains("tag sensitive")),
            "{:?}",
            r.reasons
        );
    }
}

#[test]
fn analysts_writing_wait_for_a_reviewer() {
    let r = run(
        &user("analyst_ann"),
        "DELETE FROM orders WHERE id = 1",
        &NoEstimator,
    );
    assert_eq!(r.decision, "hold");
    assert_eq!(r.rule, "default");
}

#[test]
fn maintenance_runs_small_statements_freely() {
    let small = rows(500);
    for sql in [
        "DELETE FROM sessions WHERE expires < now()",
        "VACUUM orders",
        "CREATE INDEX ON t (a)",
    ] {
        let r = run(&user("maintenance"), sql, &small);
        assert_eq!(r.decision, "allow", "{sql}");
        assert_eq!(r.rule, "maintenance-runs-freely");
    }
}

#[test]
fn maintenance_statements_estimated_above_ten_thousand_rows_are_denied() {
    let r = run(
        &user("maintenance"),
        "DELETE FROM sessions WHERE expires < now()",
        &rows(50_000),
    );
    assert_eq!(r.decision, "deny");
    assert_eq!(r.rule, "maintenance-large-statements-denied");
    assert!(
        matches!(&r.action, Action::Deny { message } if message.contains("10000")),
        "{:?}",
        r.action
    );
    assert!(
        r.reasons[0].contains("estimated 50000 rows > 10000"),
        "{:?}",
        r.reasons
    );
    let r = run(
        &user("maintenance"),
        "DELETE FROM sessions WHERE expires < now()",
        &rows(10_000),
    );
    assert_eq!(
        r.decision, "allow",
        "the limit itself is not above the limit"
    );
}

#[test]
fn maintenance_statement_without_an_estimate_is_denied_and_says_why() {
    // Nothing listens on a port just released.
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let estimator = ExplainEstimator::new(
        EstimatorConfig {
            host: "127.0.0.1".into(),
            port,
            user: "qgate".into(),
            dbname: "shop".into(),
            password: None,
        },
        Duration::from_secs(2),
    );
    let r = run(
        &user("maintenance"),
        "DELETE FROM sessions WHERE id = 1",
        &estimator,
    );
    assert_eq!(r.decision, "deny");
    assert_eq!(r.rule, "maintenance-large-statements-denied");
    assert!(
        r.reasons[0].contains("row estimate unavailable") && r.reasons[0].contains("connect"),
        "{:?}",
        r.reasons
    );
}

#[test]
fn unknown_identities_get_the_most_restricted_treatment() {
    // Could be the maintenance role: a small statement waits for a reviewer
    // (the maintenance allow rule does not apply to an unknown user) …
    let r = run(&Subject::default(), "SELECT 1", &rows(1));
    assert_eq!(r.decision, "hold");
    assert_eq!(r.rule, "default");
    // … and one that cannot be estimated is denied as maintenance's would be.
    let r = run(&Subject::default(), "SELECT 1", &NoEstimator);
    assert_eq!(r.decision, "deny");
    assert_eq!(r.rule, "maintenance-large-statements-denied");
    // DDL could be an engineer's: held for engineers, like theirs.
    let r = run(&Subject::default(), "DROP TABLE t", &NoEstimator);
    assert_eq!(r.rule, "engineers-ddl-needs-a-peer");
}

#[test]
fn analysts_changing_search_path_or_calling_functions_are_held() {
    for (sql, rule) in [
        ("SET search_path = hr", "analysts-search-path-held"),
        (
            "SELECT pg_read_file('/etc/passwd')",
            "analysts-functions-held",
        ),
        (
            "SELECT set_config('search_path', 'hr', false)",
            "analysts-functions-held",
        ),
    ] {
        let r = run(&user("analyst_ann"), sql, &NoEstimator);
        assert_eq!(r.decision, "hold", "{sql}");
        assert_eq!(r.rule, rule, "{sql}");
    }
}

#[test]
fn shipped_policy_file_is_the_built_in_default() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml");
    let from_file = Policy::from_file(&path).expect("policy.toml is valid");
    let builtin = Policy::builtin_default();
    assert!(from_file.rule_names().eq(builtin.rule_names()));
}
