//! MySQL/MariaDB statement texts that try to get past the gate, each with
//! what a security reviewer demands of the shipped default policy: `Held`
//! (must not run without review) or `Runs` (may run at once).
//!
//! Texts are classified as the gate classifies them on a MySQL connection
//! (`classify(text, Dialect::Mysql)`, sqlparser's MySQL dialect) and decided
//! by `Policy::builtin_default()` for user `app` on database `shop` with no
//! row estimator (the gate asks no planner on MySQL/MariaDB; the gate's own
//! "no estimate" marking of writes is not reproduced here).
//!
//! The expected column is never lowered to match qgate. A text that must be
//! held but that qgate currently lets run is listed in [`KNOWN_BYPASSES`]:
//! the test asserts it is still allowed, so that fixing the classifier
//! makes this test fail and the entry is moved out of the list.
//!
//! The splitting claims (comments, quotes, escapes) and the bypasses in
//! [`KNOWN_BYPASSES`] other than `RESET MASTER`, `max_connections`,
//! `local_infile` and the grant-table insert were checked by running the
//! text on a MariaDB 10.11 server (multi-statements on) against a table `t`.
//!
//! `QGATE_DUMP=1 cargo test -p qgate-agent --test classify_mysql_evasions
//! -- --nocapture` prints every case's decision and classification.
use qgate_agent::{
    classify::{classify, Classification, Dialect, Flag, RowShare},
    policy::{Action, Decision, NoEstimator, Policy, Subject},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    /// May run at once (allow or audit-only).
    Runs,
    /// Must wait for review (hold or deny).
    Held,
    /// Harmless, but qgate holds it: accepted as over-cautious (see the
    /// case's note). Asserted held so that a change is noticed.
    HeldOverCautious,
}

use Want::{Held, HeldOverCautious, Runs};

struct Case {
    sql: &'static str,
    want: Want,
    note: &'static str,
}

const fn c(sql: &'static str, want: Want, note: &'static str) -> Case {
    Case { sql, want, note }
}

const CASES: &[Case] = &[
    // ---- plain reads and harmless statements ---------------------------
    c("SELECT * FROM t WHERE id = 1", Runs, "plain read"),
    c("SELECT count(*) FROM t", Runs, "aggregate read"),
    c("SHOW TABLES", Runs, "catalog read"),
    c("SHOW PROCESSLIST", Runs, "lists sessions, changes nothing"),
    c(r"SELECT 'a\'b' FROM t", Runs, r"\' is an escaped quote inside the string"),
    c("SET @q = 'DROP TABLE t'", Runs, "a string into a user variable: running it (PREPARE/EXECUTE) is what must be held"),
    c("SELECT @a := 1", Runs, "user-variable assignment"),
    c("INSERT INTO t (id) VALUES (1)", Runs, "one-row insert"),
    c("INSERT INTO t VALUES (1, 2) ON DUPLICATE KEY UPDATE a = 1", Runs, "one-row upsert"),
    c("REPLACE INTO t VALUES (1, 2)", Runs, "one-row replace"),
    c("DELETE FROM t WHERE id = 1", Runs, "one-row delete (the real gate holds every MySQL DELETE for want of a row estimate)"),
    c("ANALYZE TABLE t", Runs, "statistics only"),
    c("DEALLOCATE PREPARE s", Runs, "drops a prepared statement"),
    c("/*!40101 SET NAMES utf8mb4 */", HeldOverCautious, "mysqldump header: a versioned executable comment is not modelled (MariaDB runs or skips it by its version)"),
    c("TABLE t", HeldOverCautious, "MySQL 8 TABLE statement (a plain read): sqlparser cannot parse it"),
    c("SELECT * FROM t WHERE id = 1 INTO @x", HeldOverCautious, "into a user variable: sqlparser cannot parse a trailing INTO"),
    c("PREPARE s FROM 'SELECT 1'", HeldOverCautious, "sqlparser parses only PREPARE … AS; every MySQL PREPARE is held"),
    c("UPDATE t SET a = 1 ORDER BY id LIMIT 1", HeldOverCautious, "one row, but no WHERE: all_rows"),
    // ---- executable comments: MySQL/MariaDB RUN their body -------------
    c("SELECT 1 /*! ; DROP TABLE t */", Held, "/*! … */ body is code (MariaDB 10.11 rejects the `;` inside, holding is still right)"),
    c("/*!50000 DROP TABLE t */", Held, "versioned executable comment (drops t on MariaDB)"),
    c("SELECT 1 /*M!100000 ; DELETE FROM t */", Held, "MariaDB /*M! … */"),
    c("SELECT 1 /*m!100000 ; DELETE FROM t */", Runs, "a lower-case m! is a plain comment to MariaDB (10.11: SELECT 1 /*m! , 2 */ returns one column)"),
    c("/*m! EXPLAIN */ DROP TABLE t", Held, "the comment is skipped: DROP TABLE runs"),
    c("/*!99999 EXPLAIN */ DROP TABLE t", Held, "MariaDB skips versions above its own: DROP TABLE runs"),
    c("/*!DROP TABLE t*/", Held, "no space, no version (drops t on MariaDB)"),
    c("DELETE FROM t WHERE id = 1 /*! OR 1=1 */", Held, "executable comment widens the WHERE"),
    c("DELETE FROM t WHERE id = 1 /*M! OR 1=1 */", Held, "MariaDB spelling (deletes every row on MariaDB)"),
    c("SELECT 1 /*!99999 ; DROP TABLE t */", Held, "ignored by today's servers, run by one of version >= 9.99.99: holding is right"),
    c("SELECT 1 /*!50000 , '*/ ; DROP TABLE t; -- ' */", Held, "a quote inside the executable comment: not tokenizable, held"),
    // ---- comments ------------------------------------------------------
    c("SELECT 1 # ; DROP TABLE t", Runs, "# comments to end of line"),
    c("SELECT 1 --1; DROP TABLE t", Held, "--1 is no comment in MySQL: SELECT 1 - -1; DROP TABLE t"),
    c("DELETE FROM t WHERE id = 1 --1 OR 1=1", Held, "id = 1 - -1 OR 1=1: every row"),
    c("SELECT 1 --\tx; DROP TABLE t", Runs, "--<TAB> IS a comment in MySQL (tab is whitespace): only SELECT 1 runs"),
    c("SELECT 1 --\n; DROP TABLE t", Held, "--<LF>: the comment ends at the newline, DROP runs"),
    c("SELECT 1 -- x\n; DROP TABLE t", Held, "the comment ends at the newline"),
    c("SELECT 1 # x\n; DELETE FROM t", Held, "# comment ends at the newline: DELETE runs"),
    c("SELECT 1 -- x\r; DROP TABLE t", Runs, "a lone CR does not end a MySQL comment"),
    c("SELECT 1 /* /* */ ; DROP TABLE t; /* */", Held, "MySQL comments do not nest: DROP runs"),
    c("SELECT 1 --", HeldOverCautious, "-- at the end is a comment to MySQL; sqlparser reads two minus signs"),
    c("SELECT 1 --\x01; DROP TABLE t", HeldOverCautious, "-- then a control character is a comment to MySQL, not to sqlparser"),
    c("SELECT 1 --\u{a0}x FROM (SELECT 1 AS \u{a0}x) d; DROP TABLE t", Held,
        "NBSP after -- is no whitespace to MySQL but an identifier character: not a comment, DROP runs"),
    // ---- backslash escapes and quoting ---------------------------------
    c(r"SELECT 'a\\' ; DROP TABLE t; -- '", Held, r"\\ is one backslash: the string ends, DROP runs"),
    c(r"SELECT 'a\' ; DROP TABLE t; -- '", Runs, r"\' escapes: the rest is one string"),
    c(r#"SELECT "a\\" ; DROP TABLE t; -- ""#, Held, "the same in a double-quoted string"),
    c(r#"SELECT "a\" ; DROP TABLE t; -- ""#, Runs, "the same in a double-quoted string"),
    c(r"SELECT N'a\\' ; DROP TABLE t; -- '", Held, "national string: backslashes escape too"),
    c(r"SELECT 'a'';DROP TABLE t;--'", Runs, "doubled quote inside the string"),
    c(r#"SELECT "x; DROP TABLE t; --""#, Runs, "double quotes are a string in MySQL"),
    c("SELECT `a;DROP TABLE t` FROM t", Runs, "backtick identifier"),
    c(r"SELECT 1 AS `a\`; DROP TABLE t; -- `", Held, r"no backslash escape in backticks: `a\` ends, DROP runs"),
    c(r#"SELECT b"\"" FROM (SELECT 1 AS b) d; DROP TABLE t; -- ""#, Held,
        r#"MySQL has no b"…" literal: column b, then the string "\"" (escaped quote), then DROP runs"#),
    // ---- several statements --------------------------------------------
    c("SELECT 1; DROP TABLE t", Held, "multi-statement"),
    c("SELECT 1;DELETE FROM t", Held, "multi-statement, no space"),
    c("SELECT 1; SHUTDOWN", Held, "multi-statement"),
    // ---- all-rows writes -----------------------------------------------
    c("DELETE FROM t", Held, "no WHERE"),
    c("UPDATE t SET a = 1", Held, "no WHERE"),
    c("DELETE FROM t WHERE 1=1", Held, "always true"),
    c("DELETE FROM t WHERE 1", Held, "MySQL: a non-zero number is true"),
    c("DELETE FROM t WHERE 2", Held, "MySQL: a non-zero number is true"),
    c("DELETE FROM t WHERE -1", Held, "MySQL: a non-zero number is true"),
    c("DELETE FROM t WHERE 0.5", Held, "MySQL: a non-zero number is true"),
    c("DELETE FROM t WHERE 0x01", Held, "hex literal, non-zero"),
    c("DELETE FROM t WHERE b'1'", Held, "bit literal, non-zero"),
    c("DELETE FROM t WHERE '1'", Held, "MySQL: '1' converts to 1"),
    c("DELETE FROM t WHERE '1abc'", Held, "MySQL: '1abc' converts to 1"),
    c("DELETE FROM t WHERE NOT 0", Held, "always true"),
    c("DELETE FROM t WHERE !0", Held, "MySQL ! is NOT (held as not understood)"),
    c("DELETE FROM t WHERE TRUE IS TRUE", Held, "always true"),
    c("DELETE FROM t WHERE 1 IN (1)", Held, "always true"),
    c("DELETE FROM t WHERE 1 BETWEEN 0 AND 2", Held, "always true"),
    c("DELETE FROM t WHERE id = 1 OR 'x' LIKE 'x'", Held, "always true"),
    c("DELETE FROM t WHERE id = 1 OR 1 REGEXP '1'", Held, "always true"),
    c("DELETE FROM t WHERE id IN (1) OR 1", Held, "always true"),
    c("DELETE FROM t WHERE id = id", Held, "true for every non-NULL id"),
    c("UPDATE t SET a = 1 WHERE a = a", Held, "true for every non-NULL a"),
    c("DELETE FROM t WHERE id = 1 OR id IS NOT NULL", Held, "every row with an id"),
    c("DELETE FROM t WHERE id = 1 || 1", Held, "|| is OR in MySQL's default sql_mode: every row"),
    c("DELETE FROM t WHERE id = 1 OR @x IS NULL", Held, "a user variable is one value for every row (NULL unless set): every row"),
    c("UPDATE t SET a=1 WHERE true", Held, "always true"),
    c("UPDATE t SET a = 1 WHERE 1 <=> 1", Held, "NULL-safe equality, always true"),
    c("DELETE t FROM t", Held, "multi-table syntax, no WHERE"),
    c("UPDATE t, u SET t.a = 1", Held, "multi-table UPDATE, no WHERE (held as not understood)"),
    c("DELETE FROM t LIMIT 1000000", Held, "no WHERE: a LIMIT does not make it safe"),
    c("TRUNCATE t", Held, "TRUNCATE without TABLE"),
    c("REPLACE INTO t SELECT * FROM u", Held, "REPLACE deletes and rewrites every row of t that u matches"),
    c("INSERT INTO t SELECT * FROM u ON DUPLICATE KEY UPDATE a = 1", Held, "updates every row of t that u matches"),
    c("SET STATEMENT max_statement_time=1 FOR DELETE FROM t", Held, "MariaDB SET STATEMENT … FOR wraps a DELETE of every row"),
    // ---- server files, code, dynamic SQL -------------------------------
    c("LOAD DATA INFILE '/etc/passwd' INTO TABLE t", Held, "reads a server file"),
    c("LOAD DATA LOCAL INFILE 'x' INTO TABLE t", Held, "bulk load"),
    c("LOAD XML INFILE '/etc/x.xml' INTO TABLE t", Held, "reads a server file"),
    c("SELECT * FROM t INTO OUTFILE '/tmp/x'", Held, "writes a server file"),
    c("SELECT * INTO DUMPFILE '/tmp/x' FROM t", Held, "writes a server file"),
    c("SELECT load_file('/etc/passwd')", Held, "reads a server file"),
    c("INSTALL PLUGIN x SONAME 'x.so'", Held, "loads a shared library into the server"),
    c("CREATE FUNCTION x RETURNS STRING SONAME 'x.so'", Held, "loads a UDF library"),
    c("CREATE EVENT e ON SCHEDULE AT NOW() DO DROP TABLE t", Held, "scheduled code"),
    c("CALL p()", Held, "stored procedure"),
    c("DO sleep(10)", Held, "DO runs expressions; sleep is not known safe"),
    c("SELECT sleep(10)", Held, "sleep is not known safe"),
    c("SELECT f(1)", Held, "user function"),
    c("SELECT benchmark(1000000, md5('a'))", Held, "burns CPU"),
    c("SELECT get_lock('x', 10)", Held, "takes a named lock"),
    c("PREPARE s FROM @q", Held, "the prepared text is in a variable the reviewer never sees"),
    c("PREPARE s FROM 'DROP TABLE t'", Held, "prepares a DROP"),
    c("EXECUTE s", Held, "runs whatever s holds: prepared from a variable, or before the agent saw the session"),
    c("EXECUTE IMMEDIATE 'DROP TABLE t'", Held, "MariaDB dynamic SQL: drops t"),
    c("EXECUTE IMMEDIATE @q", Held, "MariaDB dynamic SQL from a variable (SET @q = 'DROP TABLE t' is allowed)"),
    c("HANDLER t OPEN", Held, "low-level table access qgate does not model (held as not understood)"),
    c("BINLOG 'AAAA'", Held, "replays raw binary-log events"),
    // ---- settings --------------------------------------------------------
    c("SET sql_log_bin = 0", Held, "writes stop reaching replicas and the binlog"),
    c("SET SQL_LOG_BIN = 0", Held, "upper case"),
    c("SET @@SESSION.sql_log_bin = 0", Held, "other spelling"),
    c("SET `SQL_LOG_BIN` = 0", Held, "quoted: MySQL variable names are case-insensitive, quoted or not"),
    c("SET foreign_key_checks = 0", Held, "switches off a safety mechanism"),
    c("SET sql_safe_updates = 0", Held, "switches off a safety mechanism"),
    c("SET NAMES gbk", Held, "a multibyte charset can hide quotes from qgate"),
    c("SET CHARACTER SET gbk", Held, "the same (held as not understood)"),
    c("SET GLOBAL general_log = 1", Held, "changes the server for everyone"),
    c("SET GLOBAL read_only = 0", Held, "changes the server for everyone"),
    c("SET GLOBAL max_connections = 1", Held, "GLOBAL: locks every other client out"),
    c("SET GLOBAL general_log_file = '/var/www/html/x.php'", Held, "GLOBAL: the classic way to write a file where the server can"),
    c("SET @@GLOBAL.local_infile = 1", Held, "GLOBAL: enables LOAD DATA LOCAL for everyone"),
    c("SET PERSIST local_infile = 1", Held, "MySQL 8: written to the server's configuration"),
    c("SET PASSWORD = 'x'", Held, "changes the account's credentials (locks the application out)"),
    c("SET PASSWORD FOR root = 'x'", Held, "changes another account's credentials"),
    // ---- sessions, server, privileges, schema --------------------------
    c("KILL 5", Held, "ends another session"),
    c("KILL QUERY 5", Held, "ends another session's query"),
    c("KILL 12", Held, "the gate's spelling of COM_PROCESS_KILL"),
    c("SHUTDOWN", Held, "stops the server"),
    c("RESET MASTER", Held, "deletes every binary log"),
    c("RESET SLAVE ALL", Held, "forgets replication settings"),
    c("PURGE BINARY LOGS BEFORE '2030-01-01'", Held, "deletes binary logs"),
    c("CHANGE MASTER TO MASTER_HOST = 'evil'", Held, "replicates from elsewhere"),
    c("STOP SLAVE", Held, "stops replication"),
    c("GRANT ALL ON *.* TO x", Held, "privileges"),
    c("CREATE USER x", Held, "accounts"),
    c("ALTER USER root IDENTIFIED BY 'x'", Held, "credentials"),
    c("INSERT INTO mysql.global_priv VALUES ('%', 'evil', '{\"access\":1073741823}')", Held,
        "writes the grant tables directly: a new superuser at the next FLUSH PRIVILEGES or restart"),
    c("DROP DATABASE shop", Held, "schema"),
    c("ALTER TABLE t DROP COLUMN a", Held, "schema"),
    c("RENAME TABLE t TO u", Held, "schema"),
    c("CREATE TABLE x ENGINE=CONNECT TABLE_TYPE=DOS FILE_NAME='/etc/passwd'", Held, "a table over a server file"),
    c("OPTIMIZE TABLE t", Held, "rebuilds and locks the table"),
    c("LOCK TABLES t WRITE", Held, "locks others out"),
    c("LOCK TABLE t WRITE", Held, "singular spelling"),
    c("FLUSH TABLES", Held, "closes every table, waits for every lock"),
    c("SELECT * FROM t FOR UPDATE", Held, "locks every row against writers until the transaction ends"),
    c("SELECT * FROM t FOR SHARE", Held, "locks every row against writers"),
    c("SELECT * FROM t LOCK IN SHARE MODE", Held, "locks every row against writers"),
    c("XA START 'x'", Held, "an XA transaction outlives the session once prepared, holding its locks"),
    // ---- commands with no SQL text (the gate's names for them) ---------
    c("COM_CHANGE_USER to 'root'", Held, "not SQL: not understood"),
    c("COM_SLEEP", Held, "not SQL: not understood"),
];

/// A text that must be held but that qgate currently lets run at once.
struct Bypass {
    sql: &'static str,
    /// True when the running gate holds it anyway: on MySQL it marks every
    /// write that changes existing rows (and is not `all_rows`) as having
    /// no row estimate, and rule `most-of-a-table-write` holds that. The
    /// classification is still wrong (a policy without that rule, or a
    /// reviewer reading the facts, is misled).
    gate_holds_anyway: bool,
}

const fn b(sql: &'static str, gate_holds_anyway: bool) -> Bypass {
    Bypass {
        sql,
        gate_holds_anyway,
    }
}

/// KNOWN BYPASSES: dangerous texts the shipped default policy currently
/// ALLOWS. They stay in [`CASES`] as `Held`; this test asserts each one is
/// still allowed, so that a fix makes it fail: then delete the entry here
/// (the table then asserts it is held). Never add a case here to make a
/// failing harmless case pass.
const KNOWN_BYPASSES: &[Bypass] = &[
    // `||` read as concatenation (PostgreSQL), not MySQL's OR. The gate
    // holds it anyway: a MySQL write to existing rows has no estimate.
    b("DELETE FROM t WHERE id = 1 || 1", true),
    // A user variable counted as if it told rows apart (held by the gate
    // for the same reason).
    b("DELETE FROM t WHERE id = 1 OR @x IS NULL", true),
];

fn subject() -> Subject {
    Subject {
        user: Some("app".into()),
        database: Some("shop".into()),
        ..Subject::default()
    }
}

/// The public API's decision: the text classified for MySQL, decided by the
/// shipped default with no row estimator.
fn judge(policy: &Policy, sql: &str) -> (Classification, Decision) {
    let classification = classify(sql, Dialect::Mysql);
    let decision = policy.decide(&subject(), &classification, &NoEstimator);
    (classification, decision)
}

/// As the running gate decides on a MySQL connection with no catalog
/// (`gate::judge`, `classify_and_decide_now`): a write that changes
/// existing rows and is not `all_rows` gets "no row estimate".
fn judge_as_the_gate(policy: &Policy, sql: &str) -> Decision {
    let mut classification = classify(sql, Dialect::Mysql);
    if policy.wants_row_shares() {
        for s in &mut classification.statements {
            if s.changes_existing_rows() && !s.has(Flag::AllRows) {
                s.share = Some(RowShare::Unavailable {
                    reason: "qgate does not estimate rows on MySQL/MariaDB".into(),
                });
            }
        }
    }
    policy.decide(&subject(), &classification, &NoEstimator)
}

fn runs_at_once(decision: &Decision) -> bool {
    matches!(decision.action, Action::Allow | Action::AuditOnly)
}

fn describe(classification: &Classification, decision: &Decision) -> String {
    format!(
        "{} (rule {})\n    {}",
        decision.action.name(),
        decision.rule,
        serde_json::to_string(&classification.statements).unwrap_or_default()
    )
}

fn known_bypass(sql: &str) -> Option<&'static Bypass> {
    KNOWN_BYPASSES.iter().find(|b| b.sql == sql)
}

#[test]
fn mysql_evasions_are_judged_as_a_security_reviewer_demands() {
    let policy = Policy::builtin_default();
    let dump = std::env::var_os("QGATE_DUMP").is_some();
    let mut failures = Vec::new();
    for (n, case) in CASES.iter().enumerate() {
        let (classification, decision) = judge(&policy, case.sql);
        let runs = runs_at_once(&decision);
        let bypass = known_bypass(case.sql).is_some();
        if dump {
            println!(
                "case {n} {:?} want {:?}{}: {}",
                case.sql,
                case.want,
                if bypass { " [KNOWN BYPASS]" } else { "" },
                describe(&classification, &decision)
            );
        }
        let wrong = match (case.want, bypass) {
            (Held, true) if !runs => {
                Some("is held now: the bypass is fixed, remove it from KNOWN_BYPASSES")
            }
            (Held, true) => None,
            (Runs | HeldOverCautious, true) => {
                Some("is in KNOWN_BYPASSES but is not expected held")
            }
            (Held, false) if runs => Some("must be held but runs at once"),
            (HeldOverCautious, false) if runs => {
                Some("was held as over-cautious and now runs: move it to Runs if that is right")
            }
            (Runs, false) if !runs => Some("harmless but held"),
            _ => None,
        };
        if let Some(wrong) = wrong {
            failures.push(format!(
                "case {n} {:?} ({}): {wrong}\n    got {}",
                case.sql,
                case.note,
                describe(&classification, &decision)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases wrong:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn known_bypasses_are_cases_that_must_be_held_and_say_whether_the_gate_holds_them() {
    let policy = Policy::builtin_default();
    for bypass in KNOWN_BYPASSES {
        let case = CASES.iter().find(|c| c.sql == bypass.sql);
        assert!(
            case.is_some_and(|c| c.want == Held),
            "{:?} is in KNOWN_BYPASSES but not in CASES as Held",
            bypass.sql
        );
        let gate = judge_as_the_gate(&policy, bypass.sql);
        assert_eq!(
            !runs_at_once(&gate),
            bypass.gate_holds_anyway,
            "{:?}: the gate's decision is {} (rule {}); update gate_holds_anyway",
            bypass.sql,
            gate.action.name(),
            gate.rule
        );
    }
}

#[test]
fn the_table_is_large_and_has_no_duplicates() {
    assert!(CASES.len() >= 30);
    for (i, a) in CASES.iter().enumerate() {
        assert!(
            CASES[i + 1..].iter().all(|b| b.sql != a.sql),
            "duplicate case {:?}",
            a.sql
        );
    }
    for (i, a) in KNOWN_BYPASSES.iter().enumerate() {
        assert!(
            KNOWN_BYPASSES[i + 1..].iter().all(|b| b.sql != a.sql),
            "duplicate bypass {:?}",
            a.sql
        );
    }
}
