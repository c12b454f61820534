use super::*;
use std::sync::Arc;

use crate::classify::{classify, Dialect};

fn subject(user: &str) -> Subject {
    Subject {
        user: Some(user.into()),
        database: Some("app".into()),
        client_addr: Some("10.0.0.5".parse().unwrap()),
        application: Some("psql".into()),
    }
}

fn decide(policy: &Policy, who: &Subject, sql: &str) -> Decision {
    policy.decide(who, &classify(sql, Dialect::Postgresql), &NoEstimator)
}

#[test]
fn shipped_policy_parses() {
    let p = Policy::builtin_default();
    assert!(p.rule_names().count() >= 8);
}

#[test]
fn hold_rules_of_the_shipped_policy_name_the_reviewers_group() {
    let p = Policy::builtin_default();
    for rule in &p.rules {
        if let Action::Hold {
            reviewer_groups, ..
        } = &rule.action
        {
            assert_eq!(
                reviewer_groups,
                &vec!["reviewers".to_owned()],
                "{}",
                rule.name
            );
        }
    }
}

#[test]
fn syntax_errors_name_line_and_column() {
    let err = Policy::from_toml("[default]\naction = \"allow\"\n[[rules]\n").unwrap_err();
    assert_eq!(err.line(), Some(3), "{err}");
}

#[test]
fn unknown_keys_name_their_line() {
    let text = "[[rules]]\nname = \"a\"\naction = \"allow\"\n\n[[rules]]\nname = \"b\"\nkindz = [\"ddl\"]\naction = \"hold\"\n";
    let err = Policy::from_toml(text).unwrap_err();
    assert_eq!(err.line(), Some(7), "{err}");
    assert!(err.to_string().contains("kindz"), "{err}");
}

#[test]
fn semantic_errors_name_the_rule_and_its_line() {
    let text = "[[rules]]\nname = \"a\"\naction = \"allow\"\n\n[[rules]]\nname = \"b\"\nkinds = [\"dll\"]\naction = \"hold\"\n";
    let err = Policy::from_toml(text).unwrap_err();
    assert_eq!(err.line(), Some(5), "{err}");
    assert!(err.to_string().contains("dll"), "{err}");
    for (text, needle) in [
        ("[[rules]]\nname = \"a\"\ngroups = [\"ghosts\"]\naction = \"allow\"\n", "ghosts"),
        ("[[rules]]\nname = \"a\"\naction = \"maybe\"\n", "maybe"),
        ("[[rules]]\nname = \"a\"\naction = \"hold\"\napprovals = 0\n", "approvals"),
        ("[[rules]]\nname = \"a\"\naction = \"allow\"\n[[rules]]\nname = \"a\"\naction = \"deny\"\n", "already"),
        ("[groups.g]\nclient_addrs = [\"10.0.0.0/40\"]\n", "prefix"),
        ("[tags]\ns = [\"a.b.c\"]\n", "table pattern"),
        ("[[rules]]\nname = \"a\"\naction = \"deny\"\ntime = { from = \"25:00\", to = \"01:00\" }\n", "HH:MM"),
    ] {
        let err = Policy::from_toml(text).unwrap_err().to_string();
        assert!(err.contains(needle), "{text:?}: {err}");
        assert!(err.starts_with("line "), "{err}");
    }
}

#[test]
fn first_matching_rule_wins() {
    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n[[rules]]\nname = \"first\"\nkinds = [\"write\"]\naction = \"deny\"\n\
         [[rules]]\nname = \"second\"\nverbs = [\"DELETE\"]\naction = \"allow\"\n",
    )
    .unwrap();
    let d = decide(&p, &subject("a"), "DELETE FROM t WHERE id = 1");
    assert_eq!(d.rule, "first");
    assert!(matches!(d.action, Action::Deny { .. }));
}

#[test]
fn strictest_statement_decides_a_multi_statement_string() {
    let p = Policy::builtin_default();
    let d = decide(&p, &subject("a"), "SELECT 1; DROP TABLE t; SELECT 2");
    assert_eq!(d.action.name(), "hold");
    assert_eq!(d.rule, "schema-change");
    assert_eq!(d.reasons.len(), 3);
}

#[test]
fn unknown_identity_fields_count_against_the_client() {
    let p = Policy::from_toml(
        "[groups.trusted]\nusers = [\"admin\"]\n\
         [groups.interns]\nusers = [\"intern_*\"]\n\
         [[rules]]\nname = \"interns-denied\"\ngroups = [\"interns\"]\nkinds = [\"write\"]\naction = \"deny\"\n\
         [[rules]]\nname = \"trusted-free\"\ngroups = [\"trusted\"]\naction = \"allow\"\n\
         [default]\naction = \"hold\"\n",
    )
    .unwrap();
    let unknown = Subject::default();
    let d = decide(&p, &unknown, "INSERT INTO t VALUES (1)");
    assert_eq!(d.rule, "interns-denied");
    let d = decide(&p, &unknown, "SELECT 1");
    assert_eq!(
        d.rule, "default",
        "an allow rule must not apply to an unknown user"
    );
    assert_eq!(
        decide(&p, &subject("admin"), "SELECT 1").rule,
        "trusted-free"
    );
}

#[test]
fn missing_estimate_counts_as_exceeded_and_says_why() {
    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n[[rules]]\nname = \"big\"\nkinds = [\"read\", \"write\"]\nestimated_rows_above = 10000\naction = \"deny\"\n",
    )
    .unwrap();
    let d = decide(&p, &subject("m"), "DELETE FROM t WHERE id < 5");
    assert_eq!(d.rule, "big");
    assert!(
        d.reasons[0].contains("row estimate unavailable"),
        "{:?}",
        d.reasons
    );
    assert!(!d.reusable);
    let small = |_: &StatementFacts| Ok(5);
    let c = classify("DELETE FROM t WHERE id < 5", Dialect::Postgresql);
    assert_eq!(p.decide(&subject("m"), &c, &small).rule, "default");
    let large = |_: &StatementFacts| Ok(50_000);
    let d = p.decide(&subject("m"), &c, &large);
    assert_eq!(d.rule, "big");
    assert!(d.reasons[0].contains("50000"), "{:?}", d.reasons);
}

#[test]
fn time_windows_use_utc_days_and_hours() {
    let p = Policy::from_toml(
        "[[rules]]\nname = \"office-hours-ddl\"\nkinds = [\"ddl\"]\naction = \"allow\"\n\
         time = { days = [\"mon\", \"tue\", \"wed\", \"thu\", \"fri\"], from = \"09:00\", to = \"18:00\" }\n\
         [default]\naction = \"deny\"\n",
    )
    .unwrap();
    let c = classify("CREATE TABLE t (a int)", Dialect::Postgresql);
    let monday_noon = time::macros::datetime!(2024-01-01 12:00 UTC);
    let monday_night = time::macros::datetime!(2024-01-01 22:00 UTC);
    let saturday_noon = time::macros::datetime!(2024-01-06 12:00 UTC);
    let who = subject("a");
    assert_eq!(
        p.decide_at(&who, &c, &NoEstimator, monday_noon).rule,
        "office-hours-ddl"
    );
    assert_eq!(
        p.decide_at(&who, &c, &NoEstimator, monday_night).rule,
        "default"
    );
    assert_eq!(
        p.decide_at(&who, &c, &NoEstimator, saturday_noon).rule,
        "default"
    );
}

#[test]
fn safe_functions_extend_the_known_safe_list() {
    let p = Policy::from_toml(
        "safe_functions = [\"myapp.*\"]\n[default]\naction = \"allow\"\n\
         [[rules]]\nname = \"fn\"\nunsafe_functions = true\naction = \"hold\"\n",
    )
    .unwrap();
    assert_eq!(
        decide(&p, &subject("a"), "SELECT myapp.fmt(a) FROM t").rule,
        "default"
    );
    assert_eq!(
        decide(&p, &subject("a"), "SELECT other.fmt(a) FROM t").rule,
        "fn"
    );
}

#[test]
fn gate_mode_is_monitor_only_when_nothing_can_be_held() {
    let free = Policy::from_toml("[default]\naction = \"allow\"\n").unwrap();
    assert_eq!(needs_gate(&free, &subject("a"), false), GateMode::Monitor);
    assert_eq!(
        needs_gate(&Policy::builtin_default(), &subject("a"), false),
        GateMode::GateRisky
    );
    assert_eq!(
        needs_gate(&Policy::builtin_default(), &Subject::default(), false),
        GateMode::GateRisky
    );

    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n[groups.bots]\napplications = [\"bot\"]\n\
         [groups.admins]\nusers = [\"admin\"]\n\
         [[rules]]\nname = \"bots-out\"\ngroups = [\"bots\"]\naction = \"deny\"\n\
         [[rules]]\nname = \"admins-free\"\ngroups = [\"admins\"]\naction = \"allow\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n",
    )
    .unwrap();
    let mut bot = subject("x");
    bot.application = Some("bot".into());
    assert_eq!(needs_gate(&p, &bot, false), GateMode::Deny);
    assert_eq!(needs_gate(&p, &subject("admin"), false), GateMode::Monitor);
    assert_eq!(
        needs_gate(&p, &subject("someone"), false),
        GateMode::GateRisky
    );
    // Application unknown: might be a bot, so statements are gated (not
    // refused outright) — all of them, since a bot's plain read is denied too.
    let mut unsure = subject("admin");
    unsure.application = None;
    assert_eq!(needs_gate(&p, &unsure, false), GateMode::GateAll);
}

#[test]
fn a_rule_that_can_hold_plain_reads_makes_the_kernel_send_every_statement_up() {
    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n[groups.analysts]\nusers = [\"ana\"]\n\
         [tags]\nsensitive = [\"public.salaries\"]\n\
         [[rules]]\nname = \"sensitive\"\ngroups = [\"analysts\"]\ntags = [\"sensitive\"]\naction = \"hold\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n",
    )
    .unwrap();
    // A plain `SELECT * FROM salaries` could be held for ana: the kernel must not pass it.
    assert_eq!(needs_gate(&p, &subject("ana"), false), GateMode::GateAll);
    // For others only DDL can be held: plain reads may pass in the kernel.
    assert_eq!(needs_gate(&p, &subject("bob"), false), GateMode::GateRisky);
}

#[test]
fn decision_cache_never_changes_a_decision() {
    let policy = Arc::new(Policy::builtin_default());
    let mut cache = DecisionCache::new(1000);
    let statements = [
        "SELECT abalance FROM pgbench_accounts WHERE aid = 1",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 2",
        "DELETE FROM t WHERE 1 = 1",
        "DELETE FROM t WHERE 1 = 2",
        "DELETE FROM t WHERE id = 1",
        "DELETE FROM t WHERE id = 2",
        "UPDATE t SET a = 1 WHERE 'yes'",
        "UPDATE t SET a = 1 WHERE 'no'",
        "UPDATE t SET a = 1 WHERE a + 1 = a + 1",
        "UPDATE t SET a = 1 WHERE a + 1 = a + 2",
        "SELECT 1; DROP TABLE x",
        "SELECT 2; DROP TABLE x",
        "SELECT 'x' 'y",
        "SELECT 'x' 'z",
        "SET NAMES 'UTF8'",
        "SET NAMES 'SJIS'",
        "SET client_encoding = 'UTF8'",
        "SET client_encoding = 'GBK'",
        "EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 1",
        "EXPLAIN (ANALYZE 1) DELETE FROM t WHERE id = 1",
    ];
    let who = [subject("a"), subject("b"), Subject::default()];
    for round in 0..2 {
        for sql in statements {
            for s in &who {
                let (c, cached) = cache.decide(&policy, s, sql, Dialect::Postgresql, &NoEstimator);
                let fresh = decide(&policy, s, sql);
                assert_eq!(cached, fresh, "round {round}: {sql}");
                assert_eq!(
                    c.statements,
                    classify(sql, Dialect::Postgresql).statements,
                    "{sql}"
                );
            }
        }
    }
    assert!(cache.len().1 > 0);
}

#[test]
fn reload_keeps_the_old_policy_when_the_new_one_is_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[default]\naction = \"deny\"\n").unwrap();
    let handle = PolicyHandle::new(Policy::builtin_default());
    handle.reload_from(&path).unwrap();
    assert_eq!(handle.generation(), 1);
    let who = subject("a");
    assert_eq!(
        decide(&handle.current(), &who, "SELECT 1").action.name(),
        "deny"
    );

    // The audit log records which text is in force (file and SHA-256).
    let source = handle.source();
    assert_eq!(source.file.as_deref(), Some(path.to_str().unwrap()));
    assert_eq!(source.sha256.len(), 64);
    assert_ne!(
        source,
        PolicyHandle::new(Policy::builtin_default()).source()
    );

    std::fs::write(&path, "[default]\naction = \"sometimes\"\n").unwrap();
    let err = handle.reload_from(&path).unwrap_err();
    assert_eq!(err.line(), Some(1), "{err}");
    assert_eq!(handle.generation(), 1);
    assert_eq!(
        handle.source(),
        source,
        "a refused reload keeps the old source"
    );
    assert_eq!(
        decide(&handle.current(), &who, "SELECT 1").action.name(),
        "deny"
    );
}

#[test]
fn watcher_reloads_a_changed_file_and_ignores_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.toml");
    std::fs::write(&path, "[default]\naction = \"allow\"\n").unwrap();
    let handle = PolicyHandle::new(Policy::from_file(&path).unwrap());
    let _watcher = watch_file(
        handle.clone(),
        path.clone(),
        std::time::Duration::from_millis(20),
    )
    .unwrap();
    let wait_for_generation = |n: u64| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while handle.generation() < n && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        handle.generation()
    };
    std::fs::write(&path, "[default]\naction = \"deny\"\n# changed\n").unwrap();
    assert_eq!(wait_for_generation(1), 1);
    assert_eq!(
        decide(&handle.current(), &subject("a"), "SELECT 1")
            .action
            .name(),
        "deny"
    );

    std::fs::write(&path, "[default]\naction = \"allow\"\nbroken = \n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(handle.generation(), 1);
    assert_eq!(
        decide(&handle.current(), &subject("a"), "SELECT 1")
            .action
            .name(),
        "deny"
    );

    std::fs::write(&path, "[default]\naction = \"allow\"\n").unwrap();
    assert_eq!(wait_for_generation(2), 2);
}

#[test]
fn shadow_rules_record_what_they_would_do_and_never_hold() {
    let p = Policy::from_toml(
        r#"
[default]
action = "allow"

[[rules]]
name = "no-drops"
verbs = ["DROP"]
shadow = true
action = "hold"

[[rules]]
name = "no-deletes"
verbs = ["DELETE"]
action = "deny"
message = "no"

[[rules]]
name = "deny-everyone"
shadow = true
action = "deny"
message = "all"
"#,
    )
    .unwrap();
    let who = subject("alice");
    let d = decide(&p, &who, "DROP TABLE t");
    assert_eq!(d.action.name(), "allow", "{d:?}");
    assert_eq!(d.rule, "default");
    assert_eq!(
        d.shadow,
        vec![
            ShadowHit {
                rule: "no-drops".into(),
                would: "hold"
            },
            ShadowHit {
                rule: "deny-everyone".into(),
                would: "deny"
            }
        ]
    );
    // A rule in force after a shadow one still decides.
    let d = decide(&p, &who, "DELETE FROM t WHERE id = 1");
    assert_eq!((d.action.name(), d.rule.as_str()), ("deny", "no-deletes"));
    // A shadow deny of everyone refuses no connection outright.
    assert_ne!(needs_gate(&p, &who, false), GateMode::Deny);
    // The whole policy in shadow: nothing is held, everything is recorded.
    let all = Policy::from_toml(
        "shadow = true\n[default]\naction = \"allow\"\n[[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n",
    )
    .unwrap();
    let d = decide(&all, &who, "DROP TABLE t");
    assert_eq!(d.action.name(), "allow");
    assert_eq!(d.shadow.len(), 1);
}

#[test]
fn estimated_cost_above_holds_costly_statements_and_fails_closed() {
    struct Costs;
    impl RowEstimator for Costs {
        fn estimate_rows(&self, _: &StatementFacts) -> Result<u64, String> {
            Ok(1)
        }
        fn estimate_cost(&self, s: &StatementFacts) -> Result<f64, String> {
            if s.sql.contains("big") {
                Ok(90_000.0)
            } else if s.sql.contains("small") {
                Ok(12.5)
            } else {
                Err("unplannable".into())
            }
        }
    }
    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n[[rules]]\nname = \"costly\"\nkinds = [\"read\"]\nestimated_cost_above = 1000\naction = \"hold\"\n",
    )
    .unwrap();
    let who = subject("ana");
    let decide_with = |sql: &str| p.decide(&who, &classify(sql, Dialect::Postgresql), &Costs);
    assert_eq!(decide_with("SELECT * FROM big").action.name(), "hold");
    assert_eq!(decide_with("SELECT * FROM small").action.name(), "allow");
    // No estimate: counted as above (fail closed), and said so.
    let d = decide_with("SELECT * FROM other");
    assert_eq!(d.action.name(), "hold");
    assert!(
        d.reasons.join(" ").contains("cost estimate unavailable"),
        "{d:?}"
    );
    // A negative limit is refused with its line.
    assert!(Policy::from_toml(
        "[default]\naction = \"allow\"\n[[rules]]\nname = \"x\"\nestimated_cost_above = -1\naction = \"hold\"\n"
    )
    .is_err());
}

/// A cost limit is a statement condition: a deny rule with only a cost
/// limit refuses costly statements, not the connection, and an allow rule
/// with only a cost limit does not let everything after it run unasked.
#[test]
fn a_rule_with_only_a_cost_limit_does_not_decide_every_statement() {
    let deny = Policy::from_toml(
        "[default]\naction = \"allow\"\n[groups.analysts]\nusers = [\"ana\"]\n\
         [[rules]]\nname = \"costly\"\ngroups = [\"analysts\"]\nestimated_cost_above = 1000\naction = \"deny\"\n",
    )
    .unwrap();
    assert!(!deny.refuses_some_connections());
    assert_eq!(needs_gate(&deny, &subject("ana"), false), GateMode::GateAll);
    let allow_then_hold = Policy::from_toml(
        "[default]\naction = \"allow\"\n[groups.analysts]\nusers = [\"ana\"]\n\
         [[rules]]\nname = \"cheap\"\ngroups = [\"analysts\"]\nestimated_cost_above = 1000\naction = \"allow\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n",
    )
    .unwrap();
    assert_ne!(
        needs_gate(&allow_then_hold, &subject("ana"), false),
        GateMode::Monitor
    );
}

/// A MySQL statement may name another database's tables (`prod.t`): a
/// group's `databases` counts them, so a rule for the session's database
/// neither frees nor spares what the statement does elsewhere; and the
/// connection-wide mode cannot trust the session's database at all.
#[test]
fn mysql_tables_of_other_databases_count_for_database_groups() {
    let p = Policy::from_toml(
        "[default]\naction = \"allow\"\n\
         [groups.sandbox]\ndatabases = [\"sandbox\"]\n\
         [groups.prod]\ndatabases = [\"prod\"]\n\
         [[rules]]\nname = \"sandbox-free\"\ngroups = [\"sandbox\"]\naction = \"allow\"\n\
         [[rules]]\nname = \"prod-writes\"\ngroups = [\"prod\"]\nkinds = [\"write\"]\naction = \"hold\"\n\
         [[rules]]\nname = \"ddl\"\nkinds = [\"ddl\"]\naction = \"hold\"\n",
    )
    .unwrap();
    let mysql = |db: &str, sql: &str| {
        let mut who = subject("app");
        who.database = Some(db.into());
        p.decide(&who, &classify(sql, Dialect::Mysql), &NoEstimator)
    };
    assert_eq!(mysql("sandbox", "DROP TABLE t").rule, "sandbox-free");
    // From the sandbox, on prod's tables: neither free nor spared.
    assert_eq!(mysql("sandbox", "DROP TABLE prod.t").rule, "ddl");
    assert_eq!(
        mysql("sandbox", "DELETE FROM prod.t WHERE id = 1").rule,
        "prod-writes"
    );
    assert_eq!(
        mysql("test", "DELETE FROM prod.t WHERE id = 1").rule,
        "prod-writes"
    );
    // Unquoted names are folded: `PROD.t` is prod's as far as groups go.
    assert_eq!(
        mysql("test", "UPDATE PROD.t SET v = 1 WHERE id = 1").rule,
        "prod-writes"
    );
    assert_eq!(mysql("test", "DELETE FROM t WHERE id = 1").rule, "default");
    // What names a database qgate does not list as a table's: the
    // sandbox's rule does not free it.
    for sql in [
        "CALL prod.p()",
        "SELECT prod.f()",
        "RENAME TABLE prod.t TO sandbox.t",
        "SHOW TABLES FROM prod",
        "DROP DATABASE prod",
        "USE prod; DELETE FROM t",
        "LOAD DATA INFILE '/tmp/x' INTO TABLE prod.t",
        "ALTER TABLE t RENAME TO prod.t",
    ] {
        assert_ne!(mysql("sandbox", sql).rule, "sandbox-free", "{sql}");
    }
    // PostgreSQL's `prod.t` is a schema's table in the session's database.
    let mut who = subject("app");
    who.database = Some("sandbox".into());
    assert_eq!(decide(&p, &who, "DROP TABLE prod.t").rule, "sandbox-free");

    // The connection's mode: a MySQL session in the sandbox can still
    // reach prod, so its statements go up to the agent.
    assert_eq!(needs_gate(&p, &who, false), GateMode::Monitor);
    assert_ne!(needs_gate(&p, &who, true), GateMode::Monitor);
}
