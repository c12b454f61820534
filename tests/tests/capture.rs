//! Issue 2 end to end: every statement a real client sends over a real veth
//! reaches the agent's store whole, attributed to its user and database, with
//! the server's outcome.
use std::time::Duration;

use anyhow::Result;
use qgate_e2e::{require_root, Lab};

/// psql script mixing reads, writes, DDL, a failing statement, a
/// multi-statement string and COPY FROM STDIN.
const SCRIPT: &str = "\
CREATE TABLE items (id int PRIMARY KEY, name text, qty int);
INSERT INTO items SELECT g, 'item' || g, g FROM generate_series(1, 10) g;
SELECT count(*) FROM items;
UPDATE items SET qty = qty + 1 WHERE id <= 3;
DELETE FROM items WHERE id = 10;
SELECT * FROM no_such_table;
SELECT 1 \\; SELECT 2;
COPY items (id, name, qty) FROM STDIN;
100\tcopied-a\t1
101\tcopied-b\t2
\\.
DROP TABLE items;
";

#[derive(Debug)]
struct Stored {
    text: String,
    user: Option<String>,
    database: Option<String>,
    outcome: Option<String>,
    sqlstate: Option<String>,
    tag: Option<String>,
    rows: Option<i64>,
}

fn stored_statements(lab: &Lab) -> Result<Vec<Stored>> {
    let db = lab.store()?;
    let mut stmt = db.prepare(
        "SELECT s.text, c.user, c.database, s.outcome, s.sqlstate, s.command_tag, s.rows
         FROM statements s JOIN connections c ON c.id = s.connection_id
         ORDER BY s.id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(Stored {
            text: r.get(0)?,
            user: r.get(1)?,
            database: r.get(2)?,
            outcome: r.get(3)?,
            sqlstate: r.get(4)?,
            tag: r.get(5)?,
            rows: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

fn completed_count(lab: &Lab) -> Result<i64> {
    Ok(lab.store()?.query_row(
        "SELECT count(*) FROM statements WHERE completed_at IS NOT NULL",
        [],
        |r| r.get(0),
    )?)
}

fn capture_loss(lab: &Lab) -> Result<i64> {
    Ok(lab
        .store()?
        .query_row("SELECT coalesce(max(ringbuf_full + truncated + load_errors + writer_dropped + hook_lost), 0) FROM capture_loss", [], |r| {
            r.get(0)
        })?)
}

#[test]
fn psql_script_statements_are_stored_with_identity_and_outcome() -> Result<()> {
    require_root();
    let mut lab = Lab::new("cappsql")?;
    lab.start_postgres()?;
    lab.sql("CREATE ROLE alice LOGIN")?;
    lab.sql("CREATE DATABASE shop OWNER alice")?;
    lab.start_agent(&["--monitor"])?;

    let script = lab.dir.join("script.sql");
    std::fs::write(&script, SCRIPT)?;
    let out = lab.psql(
        "alice",
        "shop",
        &["-f", script.to_str().unwrap_or_default()],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no_such_table"),
        "the failing statement fails: {stderr}"
    );

    let expected = 9;
    lab.wait_for("9 completed statements", Duration::from_secs(10), || {
        Ok((completed_count(&lab)? >= expected).then_some(()))
    })?;
    lab.stop_agent()?;
    let stored = stored_statements(&lab)?;
    assert_eq!(stored.len(), expected as usize, "{stored:#?}");
    for s in &stored {
        assert_eq!(s.user.as_deref(), Some("alice"), "{s:?}");
        assert_eq!(s.database.as_deref(), Some("shop"), "{s:?}");
    }
    let find = |prefix: &str| {
        stored
            .iter()
            .find(|s| s.text.starts_with(prefix))
            .unwrap_or_else(|| panic!("no statement starting {prefix:?} in {stored:#?}"))
    };
    let update = find("UPDATE items");
    assert_eq!(update.outcome.as_deref(), Some("ok"));
    assert_eq!(update.tag.as_deref(), Some("UPDATE 3"));
    assert_eq!(update.rows, Some(3));
    let failing = find("SELECT * FROM no_such_table");
    assert_eq!(failing.outcome.as_deref(), Some("error"));
    assert_eq!(failing.sqlstate.as_deref(), Some("42P01"));
    let multi = find("SELECT 1");
    assert!(
        multi.text.contains("SELECT 2"),
        "one Query with both: {multi:?}"
    );
    let copy = find("COPY items");
    assert_eq!(copy.tag.as_deref(), Some("COPY 2"));
    assert_eq!(copy.rows, Some(2));
    assert_eq!(find("INSERT INTO items").rows, Some(10));
    assert_eq!(find("DROP TABLE items").outcome.as_deref(), Some("ok"));
    assert_eq!(capture_loss(&lab)?, 0);
    Ok(())
}

/// The seven statements of pgbench's built-in TPC-B-like transaction.
const TPCB: [&str; 7] = [
    "BEGIN",
    "UPDATE pgbench_accounts",
    "SELECT abalance FROM pgbench_accounts",
    "UPDATE pgbench_tellers",
    "UPDATE pgbench_branches",
    "INSERT INTO pgbench_history",
    "END",
];

fn pgbench_counts_are_exact(tag: &str, mode: &str) -> Result<()> {
    require_root();
    let mut lab = Lab::new(tag)?;
    lab.start_postgres()?;
    lab.pgbench(&["-i", "-q", "-s", "1"])?;
    lab.start_agent(&["--monitor"])?;
    let (clients, txs) = (4, 500);
    lab.pgbench(&["-n", "-c", "4", "-j", "2", "-t", "500", "-M", mode])?;
    let per_kind = clients * txs;
    let total_min = per_kind * TPCB.len() as i64;
    lab.wait_for(
        "every pgbench statement completed",
        Duration::from_secs(20),
        || Ok((completed_count(&lab)? >= total_min).then_some(())),
    )?;
    lab.stop_agent()?;
    let stored = stored_statements(&lab)?;
    for prefix in TPCB {
        let n = stored
            .iter()
            .filter(|s| s.text.trim_start().starts_with(prefix))
            .count() as i64;
        assert_eq!(
            n, per_kind,
            "{prefix}: {n} stored, {per_kind} sent ({mode})"
        );
    }
    let benchmark: Vec<&Stored> = stored
        .iter()
        .filter(|s| TPCB.iter().any(|p| s.text.trim_start().starts_with(p)))
        .collect();
    for s in &benchmark {
        assert_eq!(s.user.as_deref(), Some("postgres"));
        assert_eq!(s.database.as_deref(), Some("postgres"));
        assert_eq!(s.outcome.as_deref(), Some("ok"), "{s:?}");
    }
    let updates = benchmark
        .iter()
        .filter(|s| s.text.starts_with("UPDATE pgbench_accounts"))
        .filter(|s| s.rows == Some(1))
        .count() as i64;
    assert_eq!(updates, per_kind, "every account UPDATE reports 1 row");
    // Whatever else is stored is pgbench's own start-up: the scale query on
    // pgbench_branches and the partitioning query on pgbench_accounts.
    let others: Vec<&Stored> = stored
        .iter()
        .filter(|s| !TPCB.iter().any(|p| s.text.trim_start().starts_with(p)))
        .collect();
    assert_eq!(others.len(), 2, "{others:#?}");
    for s in &others {
        assert!(s.text.to_lowercase().starts_with("select"), "{s:?}");
        assert!(s.text.contains("pgbench_"), "{s:?}");
        assert_eq!(s.outcome.as_deref(), Some("ok"), "{s:?}");
    }
    assert_eq!(capture_loss(&lab)?, 0);
    Ok(())
}

#[test]
fn pgbench_prepared_statements_are_counted_exactly() -> Result<()> {
    pgbench_counts_are_exact("capprep", "prepared")
}

#[test]
fn pgbench_simple_statements_are_counted_exactly() -> Result<()> {
    pgbench_counts_are_exact("capsimp", "simple")
}

/// `policy suggest` over a store the live capture filled: a pgbench run
/// plus an analyst's psql script (a read of `ssn`, a user function, a
/// DROP). The proposal validates as printed, holds the DDL it saw for the
/// analyst and lets pgbench's statements run.
#[test]
fn a_policy_suggested_from_recorded_pgbench_and_psql_traffic_holds_its_ddl() -> Result<()> {
    require_root();
    let mut lab = Lab::new("csuggest")?;
    lab.start_postgres()?;
    lab.pgbench(&["-i", "-q", "-s", "1"])?;
    for sql in [
        "CREATE TABLE people (id int, name text, ssn text)",
        "INSERT INTO people VALUES (1, 'ann', '123-45-6789')",
        "CREATE FUNCTION mask(t text) RETURNS text LANGUAGE sql AS $$ SELECT 'xxx' || right(t, 4) $$",
        "CREATE TABLE old_stuff (id int)",
        "CREATE ROLE analyst LOGIN",
        "GRANT SELECT ON people TO analyst",
        "ALTER TABLE old_stuff OWNER TO analyst",
    ] {
        lab.sql(sql)?;
    }
    lab.start_agent(&["--monitor"])?;
    lab.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "100"])?;
    let script = lab.dir.join("analyst.sql");
    std::fs::write(
        &script,
        "SELECT name, ssn FROM people WHERE id = 1;\n\
         SELECT mask(ssn) FROM people;\n\
         DROP TABLE old_stuff;\n",
    )?;
    let out = lab.psql(
        "analyst",
        "postgres",
        &[
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-f",
            script.to_str().unwrap_or_default(),
        ],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lab.wait_for("the DROP stored", Duration::from_secs(20), || {
        Ok((lab.store()?.query_row(
            "SELECT count(*) FROM statements WHERE text LIKE 'DROP TABLE old_stuff%' AND completed_at IS NOT NULL",
            [],
            |r| r.get::<_, i64>(0),
        )? == 1)
            .then_some(()))
    })?;
    lab.stop_agent()?;

    let db = lab.db_path();
    let db = db.to_str().unwrap_or_default();
    let out = lab.agent_cli(&["policy", "suggest", "--db", db, "--since", "1h"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let suggested = String::from_utf8(out.stdout)?;
    assert!(suggested.contains("[groups.user_analyst]"), "{suggested}");
    assert!(suggested.contains("[groups.user_postgres]"), "{suggested}");
    assert!(
        suggested.contains("\"people\""),
        "the ssn column tags its table: {suggested}"
    );
    assert!(
        suggested.contains("mask"),
        "the user function is listed: {suggested}"
    );
    let file = lab.dir.join("suggested.toml");
    std::fs::write(&file, &suggested)?;
    let file = file.to_str().unwrap_or_default();
    let out = lab.agent_cli(&["policy", "validate", file])?;
    assert!(
        out.status.success(),
        "validates as printed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let decide = |user: &str, sql: &str| -> Result<serde_json::Value> {
        let out = lab.agent_cli(&[
            "policy",
            "check",
            "--json",
            "--policy",
            file,
            "--user",
            user,
            "--database",
            "postgres",
            sql,
        ])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    };
    let drop = decide("analyst", "DROP TABLE old_stuff")?;
    assert_eq!(drop["decision"], "hold", "{drop}");
    let read = decide(
        "postgres",
        "SELECT abalance FROM pgbench_accounts WHERE aid = 7",
    )?;
    assert_eq!(read["decision"], "allow", "{read}");
    let update = decide(
        "postgres",
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = 7",
    )?;
    assert_eq!(update["decision"], "allow", "{update}");
    Ok(())
}

/// `doctor` beside a running lab server: everything fine, the server found
/// with its version, TLS and Unix socket; then a broken policy and a pin
/// directory off bpffs (as with bpffs unmounted) are each named, with a
/// non-zero exit.
#[test]
fn doctor_finds_the_server_and_names_what_would_stop_a_start() -> Result<()> {
    require_root();
    let mut lab = Lab::new("cdoctor")?;
    lab.start_postgres()?;
    let db = lab.db_path();
    let port = qgate_e2e::PG_PORT.to_string();
    let pins = lab.pin_dir();
    let base = [
        "doctor",
        "--port",
        &port,
        "--db",
        db.to_str().unwrap_or_default(),
        "--pin-dir",
        pins.to_str().unwrap_or_default(),
    ];
    // nsenter --net keeps the host's /sys (and its bpffs) in view, as the
    // agent has it; `ip netns exec` would remount /sys without it.
    let doctor = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", lab.server_ns))
            .arg("--")
            .arg(qgate_e2e::agent_bin())
            .args(args)
            .output()?)
    };
    let out = doctor(&base)?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let server = said
        .lines()
        .find(|l| l.contains("postgresql"))
        .unwrap_or_default();
    assert!(server.starts_with("ok"), "{said}");
    assert!(server.contains("PostgreSQL 15"), "{server}");
    assert!(
        server.contains("TLS on") || server.contains("TLS off"),
        "asked the server: {server}"
    );
    assert!(server.contains(&format!(".s.PGSQL.{port}")), "{server}");
    assert!(!said.contains("FAIL"), "{said}");

    let broken = lab.dir.join("broken.toml");
    std::fs::write(
        &broken,
        "[[rules]]\nname = \"x\"\naction = \"hold\"\nkinds = [\"nonsense\"]\n",
    )?;
    // The first FAIL line of a doctor that must fail.
    let first_failure = |args: &[&str]| -> Result<(String, String)> {
        let out = doctor(args)?;
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(!out.status.success(), "{said}");
        let line = said
            .lines()
            .find(|l| l.starts_with("FAIL"))
            .unwrap_or_default()
            .to_owned();
        Ok((line, said))
    };
    let mut args = base.to_vec();
    args.extend(["--policy", broken.to_str().unwrap_or_default()]);
    let (line, said) = first_failure(&args)?;
    assert!(
        line.contains("policy") && line.contains("nonsense"),
        "{said}"
    );

    let off_bpffs = lab.dir.join("pins");
    let mut args = base.to_vec();
    args[6] = off_bpffs.to_str().unwrap_or_default();
    let (line, said) = first_failure(&args)?;
    assert!(
        line.contains("bpffs") && line.contains("mount -t bpf"),
        "{said}"
    );
    Ok(())
}

/// The audit stream of a psql session reaches a real rsyslog (UDP on
/// loopback, RFC 5424), one message per record, each parseable, and the
/// same records land in the rotated JSONL file, each once.
#[test]
fn a_sessions_audit_records_reach_rsyslog_and_the_jsonl_file() -> Result<()> {
    require_root();
    let mut lab = Lab::new("csyslog")?;
    lab.start_postgres()?;
    lab.sql("CREATE TABLE notes (id int PRIMARY KEY, body text)")?;
    let received = lab.dir.join("rsyslog.out");
    let conf = lab.dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{dir}\")\n\
             module(load=\"imudp\")\n\
             input(type=\"imudp\" address=\"127.0.0.1\" port=\"15514\")\n\
             template(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n\
             *.* action(type=\"omfile\" file=\"{out}\" template=\"raw\")\n",
            dir = lab.dir.display(),
            out = received.display()
        ),
    )?;
    let mut rsyslog = lab
        .in_server("/usr/sbin/rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(lab.dir.join("rsyslog.pid"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let jsonl = lab.dir.join("audit.jsonl");
    let config = lab.dir.join("qgate.toml");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qgate-agent/qgate.toml"
    ))?;
    let shipped: String = shipped
        .lines()
        .filter(|l| !l.starts_with("jsonl_") && !l.starts_with("syslog_facility"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        &config,
        shipped.replace(
            "[audit_stream]\n",
            &format!(
                "[audit_stream]\njsonl = {jsonl:?}\njsonl_max_bytes = 4096\njsonl_keep = 50\n\
                 syslog = \"udp:127.0.0.1:15514\"\nsyslog_facility = \"local0\"\n"
            ),
        ),
    )?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(&["--config", config.to_str().unwrap_or_default()])?;
    let mut session: Vec<String> = (1..=8)
        .map(|i| format!("INSERT INTO notes VALUES ({i}, 'note {i}')"))
        .collect();
    session.extend([
        "UPDATE notes SET body = 'second' WHERE id = 1".to_owned(),
        "SELECT body FROM notes WHERE id = 1".to_owned(),
        "DELETE FROM notes WHERE id = 1".to_owned(),
    ]);
    for sql in &session {
        lab.sql(sql)?;
    }
    lab.stop_agent()?;
    // SAFETY: kill(2) on our child; rsyslog writes out what it holds.
    unsafe { libc::kill(rsyslog.id() as i32, libc::SIGTERM) };
    let _ = rsyslog.wait();

    let messages = std::fs::read_to_string(&received)?;
    let mut from_syslog = Vec::new();
    for line in messages.lines().filter(|l| !l.is_empty()) {
        let parts: Vec<&str> = line.splitn(8, ' ').collect();
        assert_eq!(parts.len(), 8, "RFC 5424: {line}");
        assert!(
            parts[0].starts_with('<') && parts[0].ends_with(">1"),
            "{line}"
        );
        assert_eq!(parts[3], "qgate-agent", "{line}");
        let record: serde_json::Value =
            serde_json::from_str(parts[7]).map_err(|e| anyhow::anyhow!("{e}: {line}"))?;
        assert_eq!(
            record["record"].as_str(),
            Some(parts[5]),
            "MSGID names the record: {line}"
        );
        from_syslog.push(record);
    }
    let texts = |records: &[serde_json::Value]| -> Vec<String> {
        records
            .iter()
            .filter(|r| r["record"] == "statement")
            .filter_map(|r| r["text"].as_str().map(str::to_owned))
            .collect()
    };
    let syslog_texts = texts(&from_syslog);
    for sql in &session {
        assert_eq!(
            syslog_texts.iter().filter(|t| *t == sql).count(),
            1,
            "{sql} once in syslog: {syslog_texts:?}"
        );
    }
    assert!(
        from_syslog
            .iter()
            .any(|r| r["record"] == "audit" && r["kind"] == "agent.start"),
        "agent events too"
    );
    // The JSONL file and its rotations hold the same records.
    let mut from_file = Vec::new();
    let mut files: Vec<std::path::PathBuf> = (1..=50)
        .rev()
        .map(|n| lab.dir.join(format!("audit.jsonl.{n}")))
        .filter(|p| p.exists())
        .collect();
    let rotations = files.len();
    files.push(jsonl.clone());
    for f in files {
        for line in std::fs::read_to_string(f)?.lines() {
            from_file.push(serde_json::from_str::<serde_json::Value>(line)?);
        }
    }
    assert!(rotations >= 1, "the 4 KiB file rotated");
    assert_eq!(
        from_file, from_syslog,
        "the same records, in the same order"
    );
    Ok(())
}
