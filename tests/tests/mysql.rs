//! MySQL/MariaDB read and audited (issue 16's first piece): MariaDB 10.11
//! from Debian's packages in the lab's server namespace (a throwaway data
//! directory, no system service), the `mariadb` client in the client one,
//! the real tc programs on the veth between, the shipped `capture.mysql_ports = [3306]`.
//! The audit tests run with `gate.mode = "monitor"`; the gate tests with
//! the shipped default policy, where the tc program holds every client
//! packet on the MySQL port and the agent decides each.
use std::{
    path::PathBuf,
    process::{Child, Command},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{finish, require_root, run, Lab};

const PORT: u16 = 3306;

/// A MariaDB server of the lab's, stopped when dropped.
struct Mariadb {
    child: Child,
    socket: PathBuf,
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Mariadb {
    /// `mariadb-install-db` into the lab's directory, `mariadbd` on the
    /// server address, and a user `app` (password `secret`) owning `shop`.
    fn start(lab: &Lab) -> Result<Mariadb> {
        Mariadb::start_with(lab, &[])
    }

    /// As [`Mariadb::start`], with more `mariadbd` options.
    fn start_with(lab: &Lab, options: &[&str]) -> Result<Mariadb> {
        let dir = lab.dir.join("mariadb");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("data");
        run(Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ]))?;
        let socket = dir.join("mariadb.sock");
        let child = lab
            .in_server("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg(format!("--port={PORT}"))
            .arg(format!("--bind-address={}", lab.server_ip))
            .args(["--user=root", "--skip-name-resolve", "--skip-log-bin"])
            .args(options)
            .spawn()
            .context("starting mariadbd")?;
        let server = Mariadb { child, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if server.root("SELECT 1").is_ok() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "mariadbd did not start:\n{}",
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
        server.root(
            "CREATE DATABASE shop; CREATE USER 'app'@'%' IDENTIFIED BY 'secret'; \
             GRANT ALL ON shop.* TO 'app'@'%';",
        )?;
        Ok(server)
    }

    /// SQL as root over the Unix socket (not captured: no TCP).
    fn root(&self, sql: &str) -> Result<String> {
        let out = run(Command::new("mariadb")
            .arg("--no-defaults")
            .arg(format!("--socket={}", self.socket.display()))
            .args(["-u", "root", "-N", "-B", "-e", sql]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// The `mariadb` client in the client namespace, over TCP, as `app`.
/// The `mariadb` client in the client namespace, pointed at the lab's
/// server (no option files).
fn mariadb(lab: &Lab) -> Command {
    let mut cmd = lab.in_client("mariadb");
    cmd.arg("--no-defaults")
        .args(["-h", &lab.server_ip.to_string(), "-P", &PORT.to_string()]);
    cmd
}

fn client(lab: &Lab, sql: &str) -> std::process::Output {
    mariadb(lab)
        .args(["-u", "app", "-psecret", "shop", "-N", "-B", "-e", sql])
        .output()
        .expect("running the mariadb client")
}

#[test]
fn a_mariadb_sessions_statements_are_stored_with_user_database_rows_and_errors() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mysql1")?;
    let server = Mariadb::start(&lab)?;
    let config = lab.config_with(&[("mode = \"policy\"", "mode = \"monitor\"")])?;
    lab.start_agent(&["--config", &config.to_string_lossy()])?;
    // Reads, writes, DDL (not held: the gate only watches), then a failure.
    let out = client(
        &lab,
        "CREATE TABLE t (a INT); INSERT INTO t VALUES (1),(2),(3); \
         SELECT a FROM t ORDER BY a; UPDATE t SET a = a + 10 WHERE a > 1; \
         DELETE FROM nope",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the last statement fails: {stderr}");
    assert!(stderr.contains("1146"), "{stderr}");
    assert_eq!(
        stdout.split_whitespace().collect::<Vec<_>>(),
        ["1", "2", "3"]
    );
    assert_eq!(
        server
            .root("SELECT a FROM shop.t ORDER BY a")?
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["1", "12", "13"],
        "everything ran"
    );
    lab.stop_agent()?;

    let store = lab.store()?;
    let mut stmt = store.prepare(
        "SELECT c.user, c.database, c.application, c.server_port, s.text, s.path, s.outcome,
                s.rows, s.sqlstate, s.error_message
         FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.server_port = ?1 ORDER BY s.id",
    )?;
    type Row = (
        Option<String>,
        Option<String>,
        Option<String>,
        i64,
        String,
        String,
        String,
        Option<i64>,
        Option<String>,
        Option<String>,
    );
    let rows: Vec<Row> = stmt
        .query_map([PORT], |r| Row::try_from(r))?
        .collect::<Result<_, _>>()?;
    let texts: Vec<&str> = rows.iter().map(|r| r.4.as_str()).collect();
    // The client's own statements (after its `select @@version_comment`).
    let ours: Vec<&Row> = rows
        .iter()
        .filter(|r| !r.4.starts_with("select @@version_comment"))
        .collect();
    assert_eq!(
        ours.iter().map(|r| r.4.as_str()).collect::<Vec<_>>(),
        [
            "CREATE TABLE t (a INT)",
            "INSERT INTO t VALUES (1),(2),(3)",
            "SELECT a FROM t ORDER BY a",
            "UPDATE t SET a = a + 10 WHERE a > 1",
            "DELETE FROM nope"
        ],
        "every statement, in order: {texts:?}"
    );
    for r in &ours {
        assert_eq!(
            (r.0.as_deref(), r.1.as_deref(), r.3),
            (Some("app"), Some("shop"), i64::from(PORT)),
            "{r:?}"
        );
        assert_eq!(r.5, "simple");
    }
    let outcome = |i: usize| (ours[i].6.as_str(), ours[i].7, ours[i].8.as_deref());
    assert_eq!(outcome(1), ("ok", Some(3), None), "INSERT: 3 rows affected");
    assert_eq!(outcome(2), ("ok", Some(3), None), "SELECT: 3 rows returned");
    assert_eq!(outcome(3), ("ok", Some(2), None), "UPDATE: 2 rows changed");
    assert_eq!(outcome(4), ("error", None, Some("42S02")));
    assert!(
        ours[4].9.as_deref().is_some_and(|m| m.contains("nope")),
        "{:?}",
        ours[4]
    );
    // Nothing was held or asked for.
    let requests: i64 = store.query_row("SELECT count(*) FROM requests", [], |r| r.get(0))?;
    assert_eq!(requests, 0);
    Ok(())
}

/// `USE` (the client's own command: `COM_INIT_DB`) and a `USE` the server
/// reads from a `COM_QUERY`: each statement is stored under the database
/// it ran in, in one connection row per identity.
#[test]
fn a_mariadb_session_that_changes_database_is_stored_under_each() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mysql2")?;
    let server = Mariadb::start(&lab)?;
    server.root("CREATE DATABASE depot; GRANT ALL ON depot.* TO 'app'@'%';")?;
    let config = lab.config_with(&[("mode = \"policy\"", "mode = \"monitor\"")])?;
    lab.start_agent(&["--config", &config.to_string_lossy()])?;
    let out = client(
        &lab,
        "CREATE TABLE t (a INT); USE depot; CREATE TABLE u (b INT); \
         /* back */ USE shop; INSERT INTO t VALUES (7)",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(server.root("SELECT count(*) FROM depot.u")?.trim(), "0");
    assert_eq!(server.root("SELECT a FROM shop.t")?.trim(), "7");
    lab.stop_agent()?;

    let store = lab.store()?;
    let rows: Vec<(String, Option<String>)> = store
        .prepare(
            "SELECT s.text, c.database FROM statements s
             JOIN connections c ON c.id = s.connection_id
             WHERE c.server_port = ?1 AND s.text NOT LIKE 'select @@version_comment%'
             ORDER BY s.id",
        )?
        .query_map([PORT], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let at = |text: &str| {
        rows.iter()
            .find(|(t, _)| t.contains(text))
            .and_then(|(_, db)| db.clone())
    };
    assert_eq!(at("CREATE TABLE t"), Some("shop".into()), "{rows:?}");
    assert_eq!(at("CREATE TABLE u"), Some("depot".into()), "{rows:?}");
    assert_eq!(at("INSERT INTO t"), Some("shop".into()), "{rows:?}");
    let changes: i64 = store.query_row(
        "SELECT count(*) FROM capture_events WHERE kind = 'identity_changed'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(changes, 2, "{rows:?}");
    let protocols: Vec<String> = store
        .prepare(
            "SELECT DISTINCT coalesce(protocol, 'NULL') FROM connections WHERE server_port = ?1",
        )?
        .query_map([PORT], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    assert_eq!(protocols, ["mysql"], "every row of the session says mysql");
    Ok(())
}

/// The `mariadb` client running the script `sql` (from its standard
/// input, `--force`: on after a failed statement, in the same session) in
/// the background.
fn client_spawn(lab: &Lab, sql: &str) -> Result<Child> {
    use std::io::Write;
    let mut child = mariadb(lab)
        .args([
            "-u",
            "app",
            "-psecret",
            "shop",
            "-N",
            "-B",
            "--force",
            "--comments",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running the mariadb client")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    stdin.write_all(sql.as_bytes())?;
    stdin.write_all(b";\n")?;
    Ok(child)
}

/// A gated lab: MariaDB with `shop.victim` (3 rows), the agent with the
/// shipped default policy on port 3306, and a reviewer's token.
fn gated(tag: &str) -> Result<(Lab, Mariadb, String)> {
    gated_with(tag, &[])
}

/// As [`gated`], the server started with more `mariadbd` options.
fn gated_with(tag: &str, options: &[&str]) -> Result<(Lab, Mariadb, String)> {
    require_root();
    let mut lab = Lab::new(tag)?;
    let server = Mariadb::start_with(&lab, options)?;
    server.root(
        "CREATE TABLE shop.victim (id INT PRIMARY KEY, v TEXT); \
         INSERT INTO shop.victim VALUES (1,'a'),(2,'b'),(3,'c'); \
         CREATE TABLE shop.spare (id INT);",
    )?;
    let config = lab.config_with(&[])?;
    lab.start_agent(&["--config", &config.to_string_lossy()])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    Ok((lab, server, token))
}

fn pending_id(lab: &Lab, token: &str) -> Result<(serde_json::Value, i64)> {
    let request = lab
        .pending_requests(token, 1, Duration::from_secs(10))?
        .remove(0);
    let id = request["id"].as_i64().context("request id")?;
    Ok((request, id))
}

fn victim_rows(server: &Mariadb) -> Result<Option<u32>> {
    let tables = server.root("SELECT count(*) FROM information_schema.tables WHERE table_schema='shop' AND table_name='victim'")?;
    if tables.trim() == "0" {
        return Ok(None);
    }
    Ok(Some(
        server
            .root("SELECT count(*) FROM shop.victim")?
            .trim()
            .parse()?,
    ))
}

/// Issue 16's gate: a `DROP TABLE` over MariaDB's protocol waits for a
/// reviewer (the table intact, other sessions' reads answered), runs once
/// approved; plain reads and small writes are decided at once.
#[test]
fn a_mariadb_drop_table_is_held_until_approved() -> Result<()> {
    let (lab, server, token) = gated("mygate1")?;
    // Reads and a keyed write go through without a request.
    let out = client(
        &lab,
        "SELECT count(*) FROM victim; INSERT INTO spare VALUES (1); SELECT v FROM victim WHERE id = 2",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["3", "b"]
    );
    let none = lab.requests(&token, &["list", "--status", "pending"])?;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");

    let drop = client_spawn(&lab, "DROP TABLE victim")?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["statement"], "DROP TABLE victim", "{request}");
    thread::sleep(Duration::from_millis(1000));
    assert_eq!(victim_rows(&server)?, Some(3), "DROP ran before approval");
    // Another session meanwhile: answered.
    let started = Instant::now();
    let other = client(&lab, "SELECT count(*) FROM victim");
    assert_eq!(String::from_utf8_lossy(&other.stdout).trim(), "3");
    eprintln!("a read in another session took {:?}", started.elapsed());

    lab.requests(&token, &["approve", &id.to_string(), "--comment", "ok"])?;
    let approved_at = Instant::now();
    let (ok, _, err) = finish(drop, Duration::from_secs(10))?;
    let latency = approved_at.elapsed();
    assert!(ok, "the approved DROP failed: {err}");
    eprintln!("approved DROP TABLE completed {latency:?} after the approve call returned");
    assert_eq!(victim_rows(&server)?, None, "the approved DROP did not run");
    let shown = lab.requests(&token, &["show", &id.to_string()])?;
    assert_eq!(shown["status"], "approved", "{shown}");
    Ok(())
}

/// Issue 16's row estimate: MariaDB's own planner is asked (over its Unix
/// socket, as root, `EXPLAIN FORMAT=JSON`, never run) how much of its table
/// a write changes. A keyed `DELETE` of 1 % runs without a request; an
/// `UPDATE` whose condition no index serves is estimated at the whole
/// table and held by the shipped `most-of-a-table-write` with the numbers;
/// a write calling a function qgate does not know is not planned (MariaDB
/// evaluates constants while planning) and is held saying so. The request
/// names the protocol and the server.
#[test]
fn mariadbs_planner_estimates_how_much_of_its_table_a_write_changes() -> Result<()> {
    let (lab, server, token) = gated("myest")?;
    server.root(
        "CREATE TABLE shop.big (id INT PRIMARY KEY, v INT); \
         USE shop; INSERT INTO big SELECT seq, seq % 100 FROM seq_1_to_5000; \
         ANALYZE TABLE shop.big; \
         CREATE FUNCTION shop.pick() RETURNS INT DETERMINISTIC RETURN 7;",
    )?;
    let keyed = client_spawn(
        &lab,
        "DELETE FROM big WHERE id <= 50; SELECT count(*) FROM big",
    )?;
    let (ok, out, err) = finish(keyed, Duration::from_secs(15))?;
    assert!(ok, "a keyed delete of 1 % did not run at once: {err}");
    assert_eq!(out.trim(), "4950");
    let none = lab.requests(&token, &["list", "--status", "pending"])?;
    assert_eq!(none.as_array().map(Vec::len), Some(0), "{none}");

    let update = client_spawn(&lab, "UPDATE big SET v = 0 WHERE v = 3")?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["rule"], "most-of-a-table-write", "{request}");
    let reasons = request["facts"]["reasons"].to_string();
    assert!(
        reasons.contains("planner estimates it changes") && reasons.contains("`shop`.`big`"),
        "{reasons}"
    );
    assert_eq!(request["identity"]["protocol"], "mysql", "{request}");
    assert_eq!(
        request["identity"]["server"],
        format!("{}:{PORT}", lab.server_ip),
        "{request}"
    );
    let untouched = server.root("SELECT count(*) FROM shop.big WHERE v = 0")?;
    assert_eq!(untouched.trim(), "50", "the held UPDATE ran");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = finish(update, Duration::from_secs(10))?;

    // A session variable: qgate's planner session would read it as NULL
    // ("Impossible WHERE", 0 rows) while this session deletes every row.
    let variable = client_spawn(&lab, "SET @x = 0; DELETE FROM big WHERE id > (SELECT @x)")?;
    let (request, id) = pending_id(&lab, &token)?;
    let reasons = request["facts"]["reasons"].to_string();
    assert!(reasons.contains("variables"), "{request}");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = finish(variable, Duration::from_secs(10))?;

    let call = client_spawn(&lab, "DELETE FROM big WHERE id = pick()")?;
    let (request, id) = pending_id(&lab, &token)?;
    let reasons = request["facts"]["reasons"].to_string();
    assert!(reasons.contains("planning could run it"), "{request}");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = finish(call, Duration::from_secs(10))?;
    let rows = server.root("SELECT count(*) FROM shop.big")?;
    assert_eq!(rows.trim(), "4950", "a denied write ran");

    // A REPLACE of 2 000 rows deletes the 2 000 rows it collides with: 40 %.
    let values: Vec<String> = (51..2051).map(|i| format!("({i},0)")).collect();
    let replace = client_spawn(
        &lab,
        &format!("REPLACE INTO big VALUES {}", values.join(",")),
    )?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["rule"], "most-of-a-table-write", "{request}");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = finish(replace, Duration::from_secs(10))?;

    // A session whose collation compares otherwise than qgate's planner
    // session: under utf8mb4_bin 'B' < 'a', so this deletes every row; it
    // is planned under the session's collation, and held.
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    let mut raw = Raw::login_with(&lab, 46)?; // utf8mb4_bin
    raw.command(
        0x03,
        b"DELETE FROM big WHERE id > CASE WHEN 'B' < 'a' THEN 0 ELSE 100000 END",
    )?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["rule"], "most-of-a-table-write", "{request}");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = raw.read()?;

    // A trigger may write more than the statement's own rows: not planned.
    server.root(
        "CREATE TABLE shop.log (n INT); \
         CREATE TRIGGER shop.big_del AFTER DELETE ON shop.big \
         FOR EACH ROW DELETE FROM shop.log;",
    )?;
    let keyed = client_spawn(&lab, "DELETE FROM big WHERE id = 60")?;
    let (request, id) = pending_id(&lab, &token)?;
    assert!(
        request["facts"]["reasons"].to_string().contains("trigger"),
        "{request}"
    );
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "no"])?;
    let _ = finish(keyed, Duration::from_secs(10))?;
    let rows = server.root("SELECT count(*) FROM shop.big")?;
    assert_eq!(rows.trim(), "4950", "a denied write ran");
    Ok(())
}

/// Denied: the server itself answers with an error naming qgate and the
/// request (a same-length SIGNAL, or for a short text a quoted name the
/// parser stops at), the table is intact, and the same session runs its
/// next statement.
#[test]
fn a_denied_mariadb_statement_fails_naming_qgate_and_the_session_goes_on() -> Result<()> {
    let (lab, server, token) = gated("mygate2")?;
    let long = "DELETE FROM victim /* clearing out the old rows before the quarterly import, as agreed with the data team */";
    let child = client_spawn(
        &lab,
        &format!("{long};\nSELECT 'next', count(*) FROM victim"),
    )?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["statement"], long, "{request}");
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "not today"])?;
    let (_, stdout, stderr) = finish(child, Duration::from_secs(10))?;
    assert!(
        stderr.contains("1644 (45000)") && stderr.contains(&format!("qgate: request {id} denied")),
        "the error names qgate and the request: {stderr}"
    );
    assert!(
        stderr.contains("not today"),
        "the reviewer's comment: {stderr}"
    );
    assert_eq!(
        stdout.split_whitespace().collect::<Vec<_>>(),
        ["next", "3"],
        "the session ran its next statement: {stderr}"
    );
    assert_eq!(victim_rows(&server)?, Some(3));

    // Too short for SIGNAL: a quoted name the parser stops at.
    let child = client_spawn(&lab, "DROP TABLE victim;\nSELECT 'after'")?;
    let (_, id) = pending_id(&lab, &token)?;
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (_, stdout, stderr) = finish(child, Duration::from_secs(10))?;
    assert!(
        stderr.contains("1064") && stderr.contains(&format!("`qgate {id}`")),
        "{stderr}"
    );
    assert_eq!(stdout.trim(), "after");
    assert_eq!(victim_rows(&server)?, Some(3));

    Ok(())
}

/// An identity the policy refuses gets a clear error at connect: its login
/// is rewritten into one no server accepts, whose user name is qgate's
/// refusal (MariaDB: error 1045 "Access denied for user 'qgate: connection
/// refused (decision N): …'"); nothing of the session runs, and everybody
/// else connects as before.
#[test]
fn a_mariadb_identity_the_policy_refuses_gets_an_error_at_connect() -> Result<()> {
    require_root();
    let mut lab = Lab::new("myrefuse")?;
    let server = Mariadb::start(&lab)?;
    server.root(
        "CREATE TABLE shop.victim (id INT); INSERT INTO shop.victim VALUES (1); \
         CREATE USER 'mallory'@'%' IDENTIFIED BY 'secret'; GRANT ALL ON shop.* TO 'mallory'@'%';",
    )?;
    lab.start_agent_with_policy(
        "[default]\naction = \"allow\"\n\n[groups.outsiders]\nusers = [\"mallory\"]\n\n\
         [[rules]]\nname = \"no-outsiders\"\ngroups = [\"outsiders\"]\naction = \"deny\"\n\
         message = \"outsiders may not connect\"\n",
    )?;
    let started = Instant::now();
    let out = mariadb(&lab)
        .args([
            "-u",
            "mallory",
            "-psecret",
            "shop",
            "-N",
            "-B",
            "-e",
            "DELETE FROM victim",
        ])
        .output()?;
    let took = started.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused");
    assert!(
        err.contains("1045") && err.contains("qgate: connection refused (decision"),
        "{err}"
    );
    assert!(
        took < Duration::from_secs(3),
        "promptly, not a hang: {took:?}"
    );
    assert_eq!(server.root("SELECT count(*) FROM shop.victim")?.trim(), "1");
    // Everybody else connects as before.
    let out = client(&lab, "SELECT count(*) FROM victim");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "1");
    Ok(())
}

/// `LOAD DATA LOCAL INFILE` through the gate: held (the shipped policy holds
/// LOAD), approved, then the file the server asks for is let through packet
/// by packet (each in sequence, while the kernel holds everything of the
/// session), and the session's next statement runs as usual.
#[test]
fn an_approved_load_data_local_transfers_its_file_and_the_session_goes_on() -> Result<()> {
    let (lab, server, token) = gated("myload")?;
    let csv = lab.dir.join("rows.csv");
    let rows: String = (0..5000).map(|i| format!("{i}\n")).collect();
    std::fs::write(&csv, rows)?;
    let mut child = mariadb(&lab)
        .args([
            "-u",
            "app",
            "-psecret",
            "shop",
            "-N",
            "-B",
            "--local-infile=1",
        ])
        .arg("-e")
        .arg(format!(
            "LOAD DATA LOCAL INFILE '{}' INTO TABLE spare; SELECT count(*) FROM spare",
            csv.display()
        ))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let (request, id) = pending_id(&lab, &token)?;
    assert!(
        request["statement"]
            .as_str()
            .is_some_and(|s| s.starts_with("LOAD DATA LOCAL INFILE")),
        "{request}"
    );
    lab.requests(&token, &["approve", &id.to_string()])?;
    let _ = child.stdin.take();
    let (ok, stdout, stderr) = finish(child, Duration::from_secs(20))?;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "5000");
    assert_eq!(
        server.root("SELECT count(*) FROM shop.spare")?.trim(),
        "5000"
    );
    Ok(())
}

/// `qgate_decisions_total{decision="allow"}`: statements the agent decided.
fn allowed_by_agent(lab: &Lab, token: &str) -> Result<f64> {
    let (status, metrics) = lab.api_get(token, "/metrics")?;
    if status != 200 {
        bail!("/metrics: {status} {metrics}");
    }
    Ok(metrics
        .lines()
        .find(|l| l.starts_with("qgate_decisions_total{decision=\"allow\"}"))
        .and_then(|l| l.split_whitespace().last())
        .map_or(Ok(0.0), str::parse)?)
}

/// The kernel's MySQL prefilter: plain reads pass without a round trip to
/// the agent (and are still stored); a statement longer than a segment is
/// held by its end (its first bytes pass, the server runs nothing of it
/// before it has it whole): a 1 MB INSERT runs without a request, a long
/// DELETE waits and runs once approved, a long DROP denied closes the
/// connection with nothing run.
#[test]
fn mariadb_plain_reads_pass_in_the_kernel_and_long_statements_are_held_by_their_end() -> Result<()>
{
    let (lab, server, token) = gated("mytail")?;
    let before = allowed_by_agent(&lab, &token)?;
    let reads = "SELECT v FROM victim WHERE id = 1;\n".repeat(20);
    let out = client_spawn(&lab, &reads)?;
    let (ok, stdout, stderr) = finish(out, Duration::from_secs(20))?;
    assert!(ok, "{stderr}");
    assert_eq!(stdout.split_whitespace().filter(|w| *w == "a").count(), 20);
    // The client's first statement after its login (`select
    // @@version_comment`) is the agent's: the kernel reads commands only once
    // the agent has seen the conversation reach them.
    let decided = allowed_by_agent(&lab, &token)? - before;
    assert!(
        decided <= 2.0,
        "{decided} of 21 plain reads were decided by the agent, not passed by the kernel"
    );

    // A 1 MB INSERT: allowed by the policy, run without a request.
    let values: Vec<String> = (0..100_000).map(|i| format!("({i})")).collect();
    let insert = format!("INSERT INTO spare VALUES {}", values.join(","));
    assert!(insert.len() > 700_000);
    let (ok, _, stderr) = finish(client_spawn(&lab, &insert)?, Duration::from_secs(30))?;
    assert!(ok, "{}", &stderr[stderr.len().saturating_sub(300)..]);
    assert_eq!(
        server.root("SELECT count(*) FROM shop.spare")?.trim(),
        "100000"
    );

    // A long DELETE of every row: held by its end, approved, run.
    let padding = "x".repeat(200_000);
    let delete = format!("DELETE FROM spare /* {padding} */");
    let child = client_spawn(&lab, &delete)?;
    let (request, id) = pending_id(&lab, &token)?;
    assert!(
        request["statement"]
            .as_str()
            .is_some_and(|s| s.starts_with("DELETE FROM spare /* xxx") && s.len() > 200_000),
        "the whole statement is up for review"
    );
    assert_eq!(
        server.root("SELECT count(*) FROM shop.spare")?.trim(),
        "100000"
    );
    lab.requests(&token, &["approve", &id.to_string()])?;
    let (ok, _, stderr) = finish(child, Duration::from_secs(20))?;
    assert!(ok, "{}", &stderr[stderr.len().saturating_sub(300)..]);
    assert_eq!(server.root("SELECT count(*) FROM shop.spare")?.trim(), "0");

    // A long DROP denied: no same-length text makes every prefix fail, so
    // the connection is closed; nothing of it ran.
    let drop = format!("DROP TABLE victim /* {padding} */");
    let child = client_spawn(&lab, &format!("{drop};\nSELECT 'after'"))?;
    let (_, id) = pending_id(&lab, &token)?;
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (_, _, stderr) = finish(child, Duration::from_secs(20))?;
    // (The client reconnects for its next statement.)
    assert!(
        stderr.contains("ERROR 2013"),
        "the connection was closed: {}",
        &stderr[stderr.len().saturating_sub(300)..]
    );
    assert_eq!(victim_rows(&server)?, Some(3));
    Ok(())
}

/// sysbench `oltp_read_write` (prepared statements, BEGIN/COMMIT, keyed
/// UPDATEs and DELETEs, INSERTs, MariaDB's metadata cache) through the gate
/// with the shipped default policy and a fixed number of events: it runs to
/// the end without a request (each keyed write is estimated at one row:
/// `WHERE id = ?` pins the primary key), and the store holds exactly the
/// statements it sent, none undecodable, each with its user, database,
/// affected rows and errors.
#[test]
fn sysbench_through_the_gate_stores_exactly_its_statements() -> Result<()> {
    let (mut lab, server, token) = gated("mysb")?;
    // The tables, as root over the Unix socket (not captured, not gated).
    run(Command::new("sysbench")
        .arg("oltp_read_write")
        .args(["--db-driver=mysql", "--mysql-user=root", "--mysql-db=shop"])
        .arg(format!("--mysql-socket={}", server.socket.display()))
        .args(["--tables=2", "--table-size=1000", "prepare"]))?;
    server.root("GRANT ALL ON shop.* TO 'app'@'%'")?;
    let out = run(lab
        .in_client("sysbench")
        .arg("oltp_read_write")
        .args([
            "--db-driver=mysql",
            &format!("--mysql-host={}", lab.server_ip),
        ])
        .args([
            "--mysql-port=3306",
            "--mysql-user=app",
            "--mysql-password=secret",
        ])
        .args(["--mysql-db=shop", "--tables=2", "--table-size=1000"])
        .args(["--threads=2", "--events=100", "--time=0", "run"]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let total: i64 = text
        .lines()
        .find(|l| l.trim_start().starts_with("total:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("sysbench's query total in:\n{text}"))?;
    let counted = |label: &str| -> Result<i64> {
        text.lines()
            .find_map(|l| l.trim_start().strip_prefix(label))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("sysbench's `{label}` in:\n{text}"))
    };
    let (writes, errors) = (counted("write:")?, counted("ignored errors:")?);
    // 100 events of 20 queries (10 point reads, 4 ranges, 2 updates, a
    // delete, an insert, BEGIN, COMMIT), plus what a deadlock retried.
    assert_eq!(total, 2000 + 20 * errors, "{text}");
    let pending = lab.requests(&token, &["list", "--status", "pending"])?;
    assert_eq!(pending.as_array().map(Vec::len), Some(0), "{pending}");
    lab.stop_agent()?;
    let store = lab.store()?;
    let stored: i64 = store.query_row(
        "SELECT count(*) FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.server_port = 3306 AND c.user = 'app' AND c.database = 'shop'",
        [],
        |r| r.get(0),
    )?;
    // Every write stored with its affected rows (one each: keyed, and the
    // row is there), every failure with its error.
    let (stored_writes, one_row): (i64, i64) = store.query_row(
        "SELECT count(*), coalesce(sum(s.rows = 1), 0)
         FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.server_port = 3306 AND c.user = 'app'
           AND (s.text LIKE 'UPDATE%' OR s.text LIKE 'DELETE%' OR s.text LIKE 'INSERT%')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    assert_eq!(stored_writes, writes, "sysbench's writes, stored");
    assert_eq!(
        one_row + errors,
        writes,
        "each write changed one row or failed"
    );
    let failed: i64 = store.query_row(
        "SELECT count(*) FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.server_port = 3306 AND s.outcome = 'error' AND s.sqlstate IS NOT NULL",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(
        failed, errors,
        "sysbench's ignored errors, stored as errors"
    );
    let undecodable: i64 = store.query_row(
        "SELECT count(*) FROM capture_events WHERE kind = 'undecodable'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(
        (stored, undecodable),
        (total, 0),
        "every statement sysbench sent, none lost"
    );
    Ok(())
}

/// A MySQL client that writes its packets itself, for what the `mariadb`
/// client never sends: commands ahead of the login's answer, prepared
/// statements, commands without SQL. Logs in as `raw` (no password).
struct Raw {
    stream: std::net::TcpStream,
    /// The server's connection id (its greeting's).
    id: u32,
}

impl Raw {
    const CAPS: u32 = 0x1 // LONG_PASSWORD
        | 0x8 // CONNECT_WITH_DB
        | 0x200 // PROTOCOL_41
        | 0x2000 // TRANSACTIONS
        | 0x8000 // SECURE_CONNECTION
        | 0x1_0000 // MULTI_STATEMENTS
        | 0x2_0000 // MULTI_RESULTS
        | 0x8_0000; // PLUGIN_AUTH

    /// Connects and reads the greeting; the login is the caller's.
    fn open(lab: &Lab) -> Result<Raw> {
        let addr = std::net::SocketAddr::from((lab.server_ip, PORT));
        let stream = lab.connect_from_client(addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut raw = Raw { stream, id: 0 };
        let (_, greeting) = raw.read()?;
        let version_end = greeting[1..]
            .iter()
            .position(|&b| b == 0)
            .context("greeting version")?;
        let at = 1 + version_end + 1;
        raw.id = u32::from_le_bytes(greeting[at..at + 4].try_into()?);
        Ok(raw)
    }

    /// Connected and logged in to `shop`.
    fn login(lab: &Lab) -> Result<Raw> {
        Raw::login_with(lab, 33)
    }

    /// Logged in with the collation `collation` (its character set).
    fn login_with(lab: &Lab, collation: u8) -> Result<Raw> {
        let mut raw = Raw::open(lab)?;
        let mut login = Raw::login_packet();
        login[8] = collation;
        raw.write(&[(1, login)])?;
        let (_, ok) = raw.read()?;
        if ok.first() != Some(&0) {
            bail!("login refused: {}", String::from_utf8_lossy(&ok));
        }
        Ok(raw)
    }

    fn login_packet() -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&Raw::CAPS.to_le_bytes());
        p.extend_from_slice(&(1u32 << 24).to_le_bytes());
        p.push(33); // utf8_general_ci
        p.extend_from_slice(&[0; 23]);
        p.extend_from_slice(b"raw\0");
        p.push(0); // no auth data: no password
        p.extend_from_slice(b"shop\0");
        p.extend_from_slice(b"mysql_native_password\0");
        p
    }

    /// Writes `(sequence id, payload)` packets in one write.
    fn write(&mut self, packets: &[(u8, Vec<u8>)]) -> Result<()> {
        use std::io::Write;
        let mut bytes = Vec::new();
        for (seq, payload) in packets {
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes()[..3]);
            bytes.push(*seq);
            bytes.extend_from_slice(payload);
        }
        self.stream.write_all(&bytes)?;
        Ok(())
    }

    fn command(&mut self, code: u8, body: &[u8]) -> Result<()> {
        let mut payload = vec![code];
        payload.extend_from_slice(body);
        self.write(&[(0, payload)])
    }

    fn read(&mut self) -> Result<(u8, Vec<u8>)> {
        use std::io::Read;
        let mut header = [0u8; 4];
        self.stream.read_exact(&mut header)?;
        let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
        let mut payload = vec![0; len];
        self.stream.read_exact(&mut payload)?;
        Ok((header[3], payload))
    }

    /// Reads packets up to and including the next EOF (0xFE, short) or ERR.
    fn read_through_eof(&mut self) -> Result<Vec<Vec<u8>>> {
        let mut packets = Vec::new();
        loop {
            let (_, p) = self.read()?;
            let end = (p.first() == Some(&0xFE) && p.len() < 9) || p.first() == Some(&0xFF);
            packets.push(p);
            if end {
                return Ok(packets);
            }
        }
    }
}

/// An ERR packet's message, or why the packet is not one.
fn err_message(packet: &[u8]) -> String {
    if packet.first() != Some(&0xFF) || packet.len() < 9 {
        return format!("not an ERR packet: {packet:?}");
    }
    let code = u16::from_le_bytes([packet[1], packet[2]]);
    format!("{code} {}", String::from_utf8_lossy(&packet[9..]))
}

/// A session that logs in with a multibyte character set (gbk: 0xBF 0x5C is
/// one character) reads `'\xBF\'` as a closed string where qgate's lexer
/// reads an escaped quote: the rest of the text is a DELETE to MariaDB and
/// part of a string to sqlparser. Such text is not understood: held, and
/// denied here; nothing runs.
#[test]
fn a_multibyte_login_character_set_cannot_hide_a_statement() -> Result<()> {
    gbk_text_is_held("mygbk", &[], 28) // gbk_chinese_ci
}

/// The same through the server's default: a login naming MySQL 8's
/// `utf8mb4_0900_ai_ci` (255), which MariaDB 10.11 does not know, gets the
/// server's default character set, here gbk. The greeting says so; the
/// text is not understood, held, denied; nothing runs.
#[test]
fn a_collation_the_server_does_not_know_cannot_hide_a_statement() -> Result<()> {
    gbk_text_is_held(
        "mygbk2",
        &[
            "--character-set-server=gbk",
            "--collation-server=gbk_chinese_ci",
        ],
        255,
    )
}

/// A raw client logged in with `collation` (on a server started with
/// `options`) sends `'\xBF\'` followed by a DELETE: held as not
/// understood, denied; nothing runs.
fn gbk_text_is_held(tag: &str, options: &[&str], collation: u8) -> Result<()> {
    text_is_held(
        tag,
        options,
        collation,
        b"SELECT '\xbf\\' ; DELETE FROM victim; -- '",
        "",
    )
}

/// Server-wide settings change how every session's text splits: a global
/// `sql_mode` with ANSI_QUOTES makes `"x\"` a name ending at its second
/// quote (`SELECT 1 AS "x\" ; DELETE FROM victim; -- "` is a DELETE to the
/// server, one SELECT with a string alias in MariaDB's default mode), and
/// an `init_connect` of `SET NAMES gbk` makes `\xBF\` one character. qgate
/// reads both settings from the server (catalog) and holds such text as not
/// understood; without that the DELETE ran.
#[test]
fn server_wide_sql_mode_and_init_connect_cannot_hide_a_statement() -> Result<()> {
    text_is_held(
        "myansi",
        &["--sql-mode=ANSI_QUOTES"],
        33,
        ANSI_DELETE,
        "ANSI_QUOTES",
    )?;
    text_is_held(
        "myinit",
        &["--init-connect=SET NAMES gbk"],
        33,
        b"SELECT '\xbf\\' ; DELETE FROM victim; -- '",
        "init_connect",
    )?;
    // Set through the gate (held, approved): the next session's text is
    // read with the new setting in mind, not after the 60 s re-read.
    let (lab, server, token) = gated_with("myglobal", &[])?;
    server.root(
        "CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%'; \
         CREATE USER 'admin'@'%' IDENTIFIED BY 'secret'; GRANT ALL ON *.* TO 'admin'@'%';",
    )?;
    let admin = mariadb(&lab)
        .args(["--skip-ssl", "-u", "admin", "-psecret", "-N", "-B"])
        .args(["-e", "SET GLOBAL sql_mode = 'ANSI_QUOTES'"])
        .spawn()?;
    let (_, id) = pending_id(&lab, &token)?;
    lab.requests(&token, &["approve", &id.to_string()])?;
    let set = admin.wait_with_output()?;
    assert!(set.status.success(), "SET GLOBAL: {set:?}");
    assert!(server
        .root("SELECT @@GLOBAL.sql_mode")?
        .contains("ANSI_QUOTES"));
    let mut raw = Raw::login_with(&lab, 33)?;
    held_as_unknown_and_denied(&lab, &server, &token, &mut raw, ANSI_DELETE, "ANSI_QUOTES")
}

/// A session can set its own `sql_mode` where no word of its text says so:
/// `PREPARE s FROM CONCAT('SET sql_', 'mode=…')` and `EXECUTE s`. Both are
/// held (not understood); once a reviewer lets them run, qgate cannot know
/// what they set, so the session's later texts with double quotes,
/// backslashes or non-ASCII bytes are not understood either. Without that
/// the ANSI_QUOTES text below ran its DELETE.
#[test]
fn a_session_change_qgate_cannot_read_leaves_its_text_unmodelled() -> Result<()> {
    let (lab, server, token) = gated_with("myexec", &[])?;
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    let mut raw = Raw::login_with(&lab, 33)?;
    for step in [
        &b"PREPARE s FROM CONCAT('SET sql_', 'mode=''ANSI_QUOTES''')"[..],
        b"EXECUTE s",
    ] {
        raw.command(0x03, step)?;
        let (_, id) = pending_id(&lab, &token)?;
        lab.requests(&token, &["approve", &id.to_string()])?;
        let (_, answer) = raw.read()?;
        assert!(answer.first() == Some(&0), "{}", err_message(&answer));
    }
    held_as_unknown_and_denied(&lab, &server, &token, &mut raw, ANSI_DELETE, "")
}

/// A raw client logged in with `collation` (on a server started with
/// `options`) sends `text`, which hides a DELETE: held as not understood
/// (the reason names `why`), denied; nothing runs.
fn text_is_held(tag: &str, options: &[&str], collation: u8, text: &[u8], why: &str) -> Result<()> {
    let (lab, server, token) = gated_with(tag, options)?;
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    let mut raw = Raw::login_with(&lab, collation)?;
    held_as_unknown_and_denied(&lab, &server, &token, &mut raw, text, why)
}

/// A text that is one SELECT (with a string alias) to MariaDB's default
/// `sql_mode` and a DELETE of every row under ANSI_QUOTES, where `"x\"` is
/// a name that ends at its second quote.
const ANSI_DELETE: &[u8] = b"SELECT 1 AS \"x\\\" ; DELETE FROM victim; -- \"";

/// `raw` sends `text`, which hides a DELETE: it is held as not understood
/// (the request names `why`), denied with an error, and nothing runs.
fn held_as_unknown_and_denied(
    lab: &Lab,
    server: &Mariadb,
    token: &str,
    raw: &mut Raw,
    text: &[u8],
    why: &str,
) -> Result<()> {
    raw.command(0x03, text)?;
    let (request, id) = pending_id(lab, token)?;
    assert!(
        request["facts"]["statements"][0]["kind"] == "unknown",
        "{request}"
    );
    assert!(request.to_string().contains(why), "{request}");
    lab.requests(token, &["deny", &id.to_string()])?;
    let (_, answer) = raw.read()?;
    assert!(answer.first() == Some(&0xFF), "{}", err_message(&answer));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(victim_rows(server)?, Some(3));
    Ok(())
}

/// A TLS session on a gated MySQL port: qgate cannot read it. The shipped
/// `gate.unreadable = "refuse"` resets it before its handshake (the SSL
/// request is held with everything before a login); `"allow"` lets it
/// through unread and records it as encrypted, as for PostgreSQL.
#[test]
fn a_mariadb_tls_session_is_refused_or_let_through_as_gate_unreadable_says() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mytls")?;
    let (cert, key) = lab.self_signed_cert()?;
    let _server = Mariadb::start_with(
        &lab,
        &[
            &format!("--ssl-cert={}", cert.display()),
            &format!("--ssl-key={}", key.display()),
        ],
    )?;
    let tls_client = |lab: &Lab| {
        mariadb(lab)
            .args(["--ssl", "-u", "app", "-psecret", "shop", "-N", "-B"])
            .args(["-e", "SELECT 'over tls'"])
            .output()
    };
    let config = lab.config_with(&[])?;
    lab.start_agent(&["--config", &config.to_string_lossy()])?;
    let refused = tls_client(&lab)?;
    assert!(
        !refused.status.success(),
        "a TLS session ran through a refusing gate: {}",
        String::from_utf8_lossy(&refused.stdout)
    );
    // (The mariadb client asks for TLS whenever the server offers it.)
    let plain = mariadb(&lab)
        .args(["--skip-ssl", "-u", "app", "-psecret", "shop", "-N", "-B"])
        .args(["-e", "SELECT 'plain'"])
        .output()?;
    assert_eq!(
        String::from_utf8_lossy(&plain.stdout).trim(),
        "plain",
        "{}",
        String::from_utf8_lossy(&plain.stderr)
    );
    lab.stop_agent()?;

    let allowing = lab.config_with(&[("unreadable = \"refuse\"", "unreadable = \"allow\"")])?;
    lab.start_agent(&["--config", &allowing.to_string_lossy()])?;
    let allowed = tls_client(&lab)?;
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&allowed.stdout).trim(), "over tls");
    lab.stop_agent()?;
    let encrypted: i64 = lab.store()?.query_row(
        "SELECT count(*) FROM connections WHERE server_port = 3306 AND encrypted = 1",
        [],
        |r| r.get(0),
    )?;
    assert!(
        encrypted >= 2,
        "both TLS sessions recorded as encrypted: {encrypted}"
    );
    Ok(())
}

/// A policy rule for one database (`sandbox`: anything goes) neither frees
/// nor spares what a MySQL statement does to another's tables
/// (`shop.victim`, named from a session in `sandbox`): the connection is not
/// handed to the kernel as "nothing to gate", and the DELETE of every row
/// of `shop.victim` is held.
#[test]
fn a_rule_for_one_database_does_not_free_another_databases_tables() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mydbs")?;
    let server = Mariadb::start(&lab)?;
    server.root(
        "CREATE DATABASE sandbox; GRANT ALL ON sandbox.* TO 'app'@'%'; \
         CREATE TABLE sandbox.scratch (id INT); \
         CREATE TABLE shop.victim (id INT PRIMARY KEY, v TEXT); \
         INSERT INTO shop.victim VALUES (1,'a'),(2,'b'),(3,'c');",
    )?;
    lab.start_agent_with_policy(
        "[default]\naction = \"allow\"\n\
         [groups.sandbox]\ndatabases = [\"sandbox\"]\n\
         [[rules]]\nname = \"sandbox-free\"\ngroups = [\"sandbox\"]\naction = \"allow\"\n\
         [[rules]]\nname = \"all-rows-write\"\nflags = [\"all_rows\"]\naction = \"hold\"\n\
         reviewers = [\"reviewers\"]\n",
    )?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    let in_sandbox = |sql: &str| {
        mariadb(&lab)
            .args(["-u", "app", "-psecret", "sandbox", "-N", "-B", "-e", sql])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    // Its own database: free.
    let own = in_sandbox("DELETE FROM scratch")?;
    let (ok, _, err) = finish(own, Duration::from_secs(15))?;
    assert!(ok, "the sandbox's own DELETE: {err}");
    // Another's: held, and denied here.
    let other = in_sandbox("DELETE FROM shop.victim")?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["rule"], "all-rows-write", "{request}");
    assert_eq!(victim_rows(&server)?, Some(3), "ran before a decision");
    lab.requests(&token, &["deny", &id.to_string()])?;
    let _ = finish(other, Duration::from_secs(10))?;
    assert_eq!(victim_rows(&server)?, Some(3));
    Ok(())
}

/// What MariaDB runs that a statement's text does not show, read from the
/// server's catalog: a plain `SELECT * FROM v` whose view calls a stored
/// function that deletes rows, and an INSERT into a table whose trigger
/// deletes rows elsewhere. Both are held (`user_code`), neither passes in
/// the kernel, and nothing runs on a denial; a plain read of a table runs.
#[test]
fn views_calling_functions_and_triggers_are_user_code_on_mariadb() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mycode")?;
    let server = Mariadb::start(&lab)?;
    server.root(
        "CREATE TABLE shop.victim (id INT PRIMARY KEY, v TEXT); \
         INSERT INTO shop.victim VALUES (1,'a'),(2,'b'),(3,'c'); \
         CREATE TABLE shop.inbox (n INT); \
         CREATE TRIGGER shop.inbox_in AFTER INSERT ON shop.inbox \
           FOR EACH ROW DELETE FROM shop.victim;",
    )?;
    server.root(
        "DELIMITER //\n\
         CREATE FUNCTION shop.purge() RETURNS INT MODIFIES SQL DATA \
           BEGIN DELETE FROM shop.victim; RETURN 1; END//\n\
         DELIMITER ;\n\
         CREATE VIEW shop.report AS SELECT shop.purge() AS done;",
    )?;
    let config = lab.config_with(&[])?;
    lab.start_agent(&["--config", &config.to_string_lossy()])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;

    let read = client_spawn(&lab, "SELECT count(*) FROM victim")?;
    let (ok, out, err) = finish(read, Duration::from_secs(15))?;
    assert!(ok && out.trim() == "3", "a plain read: {out} {err}");

    for sql in ["SELECT * FROM report", "INSERT INTO inbox VALUES (1)"] {
        let child = client_spawn(&lab, sql)?;
        let (request, id) = pending_id(&lab, &token)?;
        let facts = request["facts"].to_string();
        assert!(
            facts.contains("user_code") && (facts.contains("view") || facts.contains("trigger")),
            "{sql}: {request}"
        );
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            victim_rows(&server)?,
            Some(3),
            "{sql} ran before a decision"
        );
        lab.requests(&token, &["deny", &id.to_string()])?;
        let _ = finish(child, Duration::from_secs(10))?;
        assert_eq!(victim_rows(&server)?, Some(3), "{sql} ran");
    }
    Ok(())
}

/// A client that claims MySQL 8's query attributes (`CLIENT_QUERY_ATTRIBUTES`,
/// which MariaDB never offers): MariaDB reads a COM_QUERY's text from its
/// second byte, so bytes a MySQL 8 reader would skip as attributes are SQL
/// to it. Here they are `#…` up to a newline, then `DROP TABLE victim`, then
/// a `#` that comments out the rest (a MySQL 8 reader sees `SELECT 1`). qgate
/// reads the text as MariaDB does: the DROP is held, and denied here.
#[test]
fn query_attributes_the_server_never_offered_hide_nothing() -> Result<()> {
    let (lab, server, token) = gated("myattrs")?;
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    let mut raw = Raw::open(&lab)?;
    let mut login = Raw::login_packet();
    let caps = Raw::CAPS | 1 << 27;
    login[..4].copy_from_slice(&caps.to_le_bytes());
    raw.write(&[(1, login)])?;
    let (_, ok) = raw.read()?;
    assert_eq!(ok.first(), Some(&0), "{}", err_message(&ok));
    // 35 attributes in one set, all NULL (no values), the first one's name
    // the hidden statement; then the text a MySQL 8 reader would run.
    let mut query = vec![0x03, b'#', b'x'];
    query.extend_from_slice(b"AAAAA");
    query.push(0x01);
    query.extend_from_slice(&[0x06, b'A', 0x16]);
    query.extend_from_slice(b"\nDROP TABLE victim   #");
    for _ in 0..34 {
        query.extend_from_slice(&[0x06, b'A', 0x01, b'a']);
    }
    query.extend_from_slice(b"SELECT 1");
    raw.write(&[(0, query)])?;
    let (request, id) = pending_id(&lab, &token)?;
    assert!(
        request["statement"]
            .as_str()
            .is_some_and(|s| s.contains("DROP TABLE victim")),
        "{request}"
    );
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (_, answer) = raw.read()?;
    assert!(
        err_message(&answer).contains("qgate"),
        "{}",
        err_message(&answer)
    );
    assert_eq!(victim_rows(&server)?, Some(3));
    Ok(())
}

/// A command sent in the same write as the login, ahead of the server's
/// answer: MariaDB runs it as a command once it accepts the login (no
/// authentication exchange for a user without a password), so it must
/// never pass for authentication data. The conversation stops being read
/// and the held connection is reset (audited); the table is intact.
#[test]
fn a_command_sent_ahead_of_the_login_answer_is_never_run_unjudged() -> Result<()> {
    let (lab, server, _token) = gated("myahead")?;
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    // The same user, logged in the usual way first: the login alone passes.
    Raw::login(&lab)?;
    let mut raw = Raw::open(&lab)?;
    let mut drop = vec![0x03];
    drop.extend_from_slice(b"DROP TABLE victim");
    raw.write(&[(1, Raw::login_packet()), (0, drop)])?;
    // Whatever comes back (a reset, or nothing), the DROP never runs.
    let answer = raw.read();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        victim_rows(&server)?,
        Some(3),
        "the DROP sent ahead of the login's answer ran (answer {answer:?})"
    );
    assert!(answer.is_err(), "the connection is ended: {answer:?}");
    let store = lab.store()?;
    let resets: i64 = store.query_row(
        "SELECT count(*) FROM audit WHERE kind = 'gate.connection_reset'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(resets, 1, "the reset is audited");
    Ok(())
}

/// Prepared statements over the binary protocol: a `COM_STMT_PREPARE` of a
/// `DROP TABLE` is held and, denied, fails at the prepare naming qgate (no
/// statement id to execute); a prepared read runs at once, with its
/// parameter; an approved prepared `DELETE` runs at its execute without a
/// second request. A `COM_PROCESS_KILL` (no SQL text) is judged as the
/// `KILL` it is: held, denied by a command byte the server does not know,
/// the session named in it untouched.
#[test]
fn mariadb_prepared_statements_and_commands_without_sql_are_gated() -> Result<()> {
    let (mut lab, server, token) = gated("myprep")?;
    server.root("CREATE USER 'raw'@'%'; GRANT ALL ON shop.* TO 'raw'@'%';")?;
    let mut raw = Raw::login(&lab)?;

    raw.command(0x16, b"DROP TABLE victim")?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(request["statement"], "DROP TABLE victim", "{request}");
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (_, answer) = raw.read()?;
    let message = err_message(&answer);
    assert!(
        message.starts_with("1064") && message.contains(&format!("`qgate {id}`")),
        "{message}"
    );
    assert_eq!(victim_rows(&server)?, Some(3));

    // A read: prepared and executed with its parameter, no request.
    raw.command(0x16, b"SELECT v FROM victim WHERE id = ?")?;
    let (_, ok) = raw.read()?;
    assert_eq!(ok.first(), Some(&0), "PREPARE_OK: {}", err_message(&ok));
    let stmt = u32::from_le_bytes(ok[1..5].try_into()?);
    raw.read_through_eof()?; // the parameter's definition
    raw.read_through_eof()?; // the column's
    let mut execute = stmt.to_le_bytes().to_vec();
    execute.extend_from_slice(&[0, 1, 0, 0, 0]); // no cursor, 1 iteration
    execute.extend_from_slice(&[0, 1, 0x03, 0]); // no NULLs, types: LONG
    execute.extend_from_slice(&2i32.to_le_bytes());
    raw.command(0x17, &execute)?;
    let (_, columns) = raw.read()?;
    assert_eq!(columns, [1], "one column: {}", err_message(&columns));
    raw.read_through_eof()?; // its definition
    let rows = raw.read_through_eof()?;
    assert!(
        rows.len() == 2 && rows[0].ends_with(b"\x01b"),
        "the row of id 2: {rows:?}"
    );
    // Its next executes pass in the kernel: the session was seen from its
    // login, so the statement id came from a prepare the agent judged
    // (counted below from the bytes the agent released).
    for _ in 0..200 {
        raw.command(0x17, &execute)?;
        raw.read()?;
        raw.read_through_eof()?;
        raw.read_through_eof()?;
    }

    // An approved prepared DELETE runs at its execute.
    raw.command(0x16, b"DELETE FROM victim")?;
    let (_, id) = pending_id(&lab, &token)?;
    lab.requests(&token, &["approve", &id.to_string()])?;
    let (_, ok) = raw.read()?;
    assert_eq!(ok.first(), Some(&0), "PREPARE_OK: {}", err_message(&ok));
    let stmt = u32::from_le_bytes(ok[1..5].try_into()?);
    let mut execute = stmt.to_le_bytes().to_vec();
    execute.extend_from_slice(&[0, 1, 0, 0, 0]);
    raw.command(0x17, &execute)?;
    let (_, ok) = raw.read()?;
    assert_eq!(
        ok.get(..2),
        Some(&[0, 3][..]),
        "OK, 3 rows: {}",
        err_message(&ok)
    );
    assert_eq!(victim_rows(&server)?, Some(0));
    let pending = lab.requests(&token, &["list", "--status", "pending"])?;
    assert_eq!(pending.as_array().map(Vec::len), Some(0), "{pending}");

    // COM_PROCESS_KILL of another session of the same user.
    let mut other = Raw::login(&lab)?;
    raw.command(0x0c, &other.id.to_le_bytes())?;
    let (request, id) = pending_id(&lab, &token)?;
    assert_eq!(
        request["statement"],
        format!("KILL {}", other.id),
        "{request}"
    );
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (_, answer) = raw.read()?;
    assert!(
        err_message(&answer).starts_with("1047"),
        "{}",
        err_message(&answer)
    );
    other.command(0x0e, b"")?; // COM_PING: the named session lives
    let (_, pong) = other.read()?;
    assert_eq!(pong.first(), Some(&0), "{}", err_message(&pong));
    // And the session that asked goes on.
    raw.command(0x03, b"SELECT 1")?;
    let (_, columns) = raw.read()?;
    assert_eq!(columns, [1], "{}", err_message(&columns));
    drop((raw, other));
    lab.stop_agent()?;
    let released: i64 = lab.store()?.query_row(
        "SELECT json_extract(details, '$.gate.released_bytes') FROM audit WHERE kind = 'agent.stop'",
        [],
        |r| r.get(0),
    )?;
    // 200 executes of 18 bytes each would be 3 600 bytes on their own.
    assert!(
        released < 2_000,
        "{released} bytes released by the agent: the executes were held"
    );
    Ok(())
}

/// By hand, not in CI (a measurement, not a check):
/// `cargo test -p qgate-e2e --test mysql -- --ignored --nocapture`.
/// sysbench `oltp_read_only` against MariaDB, direct, with the agent only
/// watching port 3306 (`gate.mode = "monitor"`) and gating it with the
/// shipped default policy, legs alternated; prints TPS ratios and the
/// agent's CPU per statement.
#[test]
#[ignore]
fn sysbench_oltp_read_only_with_and_without_the_agent() -> Result<()> {
    require_root();
    let mut lab = Lab::new("mysqlb")?;
    let _server = Mariadb::start(&lab)?;
    let gated = lab.config_with(&[])?;
    let gated = {
        let path = lab.dir.join("gated.toml");
        std::fs::rename(&gated, &path)?;
        path
    };
    let monitor = lab.config_with(&[("mode = \"policy\"", "mode = \"monitor\"")])?;
    let host = lab.server_ip.to_string();
    let sysbench = |lab: &Lab, threads: u32, command: &str, seconds: u32| -> Result<String> {
        let out = run(lab
            .in_client("sysbench")
            .arg("oltp_read_only")
            .args(["--db-driver=mysql", &format!("--mysql-host={host}")])
            .args([
                "--mysql-port=3306",
                "--mysql-user=app",
                "--mysql-password=secret",
            ])
            .args(["--mysql-db=shop", "--tables=4", "--table-size=10000"])
            .arg(format!("--threads={threads}"))
            .arg(format!("--time={seconds}"))
            .arg(command))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    sysbench(&lab, 4, "prepare", 0)?;
    let tps = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.trim_start().starts_with("transactions:"))
            .and_then(|l| l.split('(').nth(1))
            .and_then(|s| s.split_whitespace().next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0)
    };
    let queries = |text: &str| -> f64 {
        text.lines()
            .find(|l| l.trim_start().starts_with("queries:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0)
    };
    let ticks = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        fields
            .get(11)
            .and_then(|u| u.parse::<f64>().ok())
            .unwrap_or(0.0)
            + fields
                .get(12)
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(0.0)
    };
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for threads in [1, 8] {
        let mut direct = Vec::new();
        // (monitor, default policy): tps and agent CPU per statement.
        let mut legs = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
        for _ in 0..3 {
            direct.push(tps(&sysbench(&lab, threads, "run", 10)?));
            for (leg, config) in legs.iter_mut().zip([&monitor, &gated]) {
                lab.start_agent(&["--config", &config.to_string_lossy()])?;
                let pid = lab.agent_pid().expect("agent running");
                let before = ticks(pid);
                let out = sysbench(&lab, threads, "run", 10)?;
                let spent = (ticks(pid) - before) / 100.0;
                leg.0.push(tps(&out));
                leg.1.push(spent * 1e6 / queries(&out).max(1.0));
                lab.stop_agent()?;
            }
        }
        let d = median(&mut direct);
        for (name, (tps_leg, cpu)) in ["monitor", "default policy"].iter().zip(legs.iter_mut()) {
            let (w, c) = (median(tps_leg), median(cpu));
            eprintln!(
                "oltp_read_only, {threads} thread(s), {name}: direct {d:.0} tps, qgate {w:.0} tps, \
                 ratio {:.3}; agent {c:.2} µs CPU per statement (legs {direct:?} / {tps_leg:?})",
                w / d
            );
        }
    }
    Ok(())
}
