//! Issue 3 end to end: `estimated_rows_above` answered by a real PostgreSQL
//! planner. The DESIGN example policy denies the maintenance role any
//! statement estimated above 10 000 rows; `qgate-agent policy check` run from
//! the client namespace asks the server's planner over the estimator's own
//! read-only connection, as an operator trying a statement would.
use anyhow::{bail, Context, Result};
use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    time::{Duration, Instant},
};

use qgate_e2e::{agent_bin, finish, require_root, Lab, PG_PORT};
use serde_json::Value;

/// The estimator's role may plan DELETEs on the tables: PostgreSQL checks an
/// explained statement's privileges as if it ran. Its transactions are read
/// only, so it never changes a row. `reader` may only SELECT.
const ESTIMATOR_SETUP: &str = "\
CREATE ROLE qgate_estimator LOGIN;
CREATE TABLE big AS SELECT g AS id, 'row ' || g AS note FROM generate_series(1, 50000) g;
CREATE TABLE small AS SELECT g AS id, 'row ' || g AS note FROM generate_series(1, 10) g;
ANALYZE big;
ANALYZE small;
GRANT SELECT, DELETE ON big, small TO qgate_estimator;
CREATE ROLE reader LOGIN;
GRANT SELECT ON big, small TO reader;
";

fn example_policy() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qgate-agent/examples/policies/design-examples.toml"
    )
    .to_owned()
}

/// `qgate-agent policy check --json` for the maintenance user from the
/// client namespace, with the example policy, estimating with `conninfo`.
fn check_as_maintenance(lab: &Lab, conninfo: &str, sql: &str) -> Result<Value> {
    let policy = example_policy();
    check_from_client(
        lab,
        &[
            "--policy",
            &policy,
            "--explain-with",
            conninfo,
            "--explain-timeout-ms",
            "5000",
        ],
        sql,
    )
}

/// `qgate-agent policy check --json` for the maintenance user from the client
/// namespace; `source` says where the policy and the estimator come from.
fn check_from_client(lab: &Lab, source: &[&str], sql: &str) -> Result<Value> {
    let agent = agent_bin();
    let agent = agent
        .to_str()
        .context("qgate-agent path is not UTF-8")?
        .to_owned();
    let out = lab
        .in_client(&agent)
        .args(["policy", "check", "--json"])
        .args(source)
        .args(["--user", "maintenance", "--database", "postgres"])
        .args(["--client-addr", &lab.client_ip.to_string()])
        .arg(sql)
        .output()
        .with_context(|| format!("running {agent} (build it: cargo build -p qgate-agent)"))?;
    if !out.status.success() {
        bail!(
            "policy check {sql:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "policy check printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn reasons(report: &Value) -> String {
    report["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default()
}

#[test]
fn maintenance_delete_is_decided_by_the_planners_row_estimate() -> Result<()> {
    require_root();
    let mut lab = Lab::new("estimate")?;
    lab.start_postgres()?;
    lab.sql(ESTIMATOR_SETUP)?;
    let estimator = format!(
        "host={} port={PG_PORT} user=qgate_estimator dbname=postgres",
        lab.server_ip
    );

    let big = check_as_maintenance(&lab, &estimator, "DELETE FROM big WHERE id > 0")?;
    assert_eq!(big["decision"], "deny", "{big}");
    assert_eq!(big["rule"], "maintenance-large-statements-denied", "{big}");
    assert!(
        reasons(&big).contains("> 10000"),
        "the reason names the estimate and the limit: {big}"
    );
    let estimated: u64 = reasons(&big)
        .split_whitespace()
        .skip_while(|w| *w != "estimated")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no row count in the reasons: {big}"))?;
    assert!(
        (45_000..=55_000).contains(&estimated),
        "the planner estimates about 50 000 rows, got {estimated}"
    );

    let small = check_as_maintenance(&lab, &estimator, "DELETE FROM small WHERE id > 0")?;
    assert_eq!(small["decision"], "allow", "{small}");
    assert_eq!(small["rule"], "maintenance-runs-freely", "{small}");

    // The same decision from the agent's configuration file.
    let config = lab.dir.join("qgate.toml");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qgate-agent/qgate.toml"
    ))?;
    std::fs::write(
        &config,
        shipped.replace(
            "[policy]\n",
            &format!(
                "[policy]\nfile = {:?}\nestimator = {estimator:?}\n",
                example_policy()
            ),
        ),
    )?;
    let config = config.to_str().context("config path is not UTF-8")?;
    let configured =
        check_from_client(&lab, &["--config", config], "DELETE FROM big WHERE id > 0")?;
    assert_eq!(configured["decision"], "deny", "{configured}");
    assert!(
        reasons(&configured).contains("rows > 10000"),
        "{configured}"
    );

    // A role that may only read cannot have a DELETE planned: the server's
    // refusal is the reason, and the statement is denied as unestimated.
    let reader = estimator.replace("user=qgate_estimator", "user=reader");
    let refused = check_as_maintenance(&lab, &reader, "DELETE FROM small WHERE id > 0")?;
    assert_eq!(refused["decision"], "deny", "{refused}");
    let why = reasons(&refused);
    assert!(
        why.contains("row estimate unavailable")
            && why.contains("permission denied for table small"),
        "{why}"
    );

    assert_eq!(
        lab.sql("SELECT (SELECT count(*) FROM big) || ' ' || (SELECT count(*) FROM small)")?,
        "50000 10",
        "estimating never deletes a row"
    );
    Ok(())
}

#[test]
fn unreachable_estimator_database_denies_maintenance_and_says_why() -> Result<()> {
    require_root();
    let lab = Lab::new("estdown")?;
    // The lab's server address, where no PostgreSQL listens: connection refused.
    let nowhere = format!(
        "host={} port={PG_PORT} user=qgate_estimator dbname=postgres",
        lab.server_ip
    );
    let report = check_as_maintenance(&lab, &nowhere, "DELETE FROM small WHERE id > 0")?;
    assert_eq!(report["decision"], "deny", "{report}");
    assert_eq!(
        report["rule"], "maintenance-large-statements-denied",
        "{report}"
    );
    let why = reasons(&report);
    assert!(
        why.contains("row estimate unavailable")
            && why.contains("cannot connect to the estimator database")
            && why.contains("Connection refused")
            && why.contains("counted as above 10000"),
        "the reason says the estimate failed and how it counted: {why}"
    );
    Ok(())
}

/// `estimated_cost_above` on reads: a read the planner costs high is held
/// for analysts, a cheap one runs; both answered by the real planner.
#[test]
fn an_analysts_costly_read_is_held_and_a_cheap_one_runs() -> Result<()> {
    require_root();
    let mut lab = Lab::new("estcost")?;
    lab.start_postgres()?;
    lab.sql(ESTIMATOR_SETUP)?;
    let estimator = format!(
        "host={} port={PG_PORT} user=qgate_estimator dbname=postgres",
        lab.server_ip
    );
    let policy = lab.dir.join("cost.toml");
    std::fs::write(
        &policy,
        "[default]\naction = \"allow\"\n\n[groups.analysts]\nusers = [\"maintenance\"]\n\n\
         [[rules]]\nname = \"costly-reads\"\ngroups = [\"analysts\"]\nkinds = [\"read\"]\n\
         estimated_cost_above = 300\naction = \"hold\"\n",
    )?;
    let source = [
        "--policy",
        policy.to_str().unwrap_or_default(),
        "--explain-with",
        &estimator,
        "--explain-timeout-ms",
        "5000",
    ];
    let big = check_from_client(&lab, &source, "SELECT * FROM big")?;
    assert_eq!(big["decision"], "hold", "{big}");
    assert_eq!(big["rule"], "costly-reads", "{big}");
    assert!(reasons(&big).contains("estimated cost"), "{big}");
    let small = check_from_client(&lab, &source, "SELECT * FROM small")?;
    assert_eq!(small["decision"], "allow", "{small}");
    Ok(())
}

/// The agent's configuration with `policy` and an estimator at `conninfo`.
fn live_config(lab: &Lab, policy: &str, conninfo: &str, timeout_ms: u64) -> Result<String> {
    let path = lab.dir.join("policy.toml");
    std::fs::write(&path, policy)?;
    let config = lab.dir.join("qgate.toml");
    let shipped = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../qgate-agent/qgate.toml"
    ))?;
    let shipped = shipped
        .lines()
        .filter(|l| !l.starts_with("estimator_timeout_ms"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(
        &config,
        shipped.replace(
            "[policy]\n",
            &format!(
                "[policy]\nfile = {path:?}\nestimator = {conninfo:?}\nestimator_timeout_ms = {timeout_ms}\n"
            ),
        ),
    )?;
    Ok(config
        .to_str()
        .context("config path is not UTF-8")?
        .to_owned())
}

/// Analysts' reads are held above a planner cost; `writer`'s DDL is held
/// (so the kernel sends its writes up and the agent decides them).
const LIVE_POLICY: &str = "[default]\naction = \"allow\"\n\n\
    [groups.analysts]\nusers = [\"analyst\"]\n\n[groups.writers]\nusers = [\"writer\"]\n\n\
    [[rules]]\nname = \"costly-reads\"\ngroups = [\"analysts\"]\nkinds = [\"read\"]\n\
    estimated_cost_above = 300\naction = \"hold\"\n\n\
    [[rules]]\nname = \"writers-ddl\"\ngroups = [\"writers\"]\nkinds = [\"ddl\"]\naction = \"hold\"\n";

const LIVE_SETUP: &str = "\
CREATE ROLE analyst LOGIN;
GRANT SELECT ON big, small TO analyst;
CREATE ROLE writer LOGIN;
GRANT SELECT, UPDATE ON small TO writer;
";

fn psql_as(lab: &Lab, user: &str, sql: &str) -> Result<String> {
    let out = lab.psql(user, "postgres", &["-At", "-c", sql])?;
    if !out.status.success() {
        bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The live gate asks the real planner: an analyst's costly read is held
/// for review (the request says the estimated cost), a cheap one runs
/// after the estimate arrives, and the time each took is printed.
#[test]
fn the_live_gate_holds_a_costly_read_on_the_planners_word() -> Result<()> {
    require_root();
    let mut lab = Lab::new("estlive")?;
    lab.start_postgres()?;
    lab.sql(ESTIMATOR_SETUP)?;
    lab.sql(LIVE_SETUP)?;
    let estimator = format!(
        "host={} port={PG_PORT} user=qgate_estimator dbname=postgres",
        lab.server_ip
    );
    let config = live_config(&lab, LIVE_POLICY, &estimator, 5000)?;
    lab.start_agent(&["--config", &config])?;
    let token = lab.add_reviewer("rita", "reviewers", Some(""))?;

    let started = Instant::now();
    assert_eq!(
        psql_as(&lab, "analyst", "SELECT count(*) FROM small")?,
        "10"
    );
    let cheap = started.elapsed();
    let started = Instant::now();
    assert_eq!(
        psql_as(&lab, "analyst", "SELECT count(*) FROM small")?,
        "10"
    );
    let cheap_again = started.elapsed();
    eprintln!(
        "cheap read, estimate asked: {:.1} ms; the same again (answer kept): {:.1} ms",
        cheap.as_secs_f64() * 1e3,
        cheap_again.as_secs_f64() * 1e3
    );

    let held = lab.psql_spawn("analyst", "postgres", &["-At", "-c", "SELECT * FROM big"])?;
    let request = lab
        .pending_requests(&token, 1, Duration::from_secs(15))?
        .remove(0);
    assert_eq!(request["rule"], "costly-reads", "{request}");
    let id = request["id"].as_i64().context("request id")?;
    lab.requests(&token, &["deny", &id.to_string(), "--comment", "too big"])?;
    let (ok, _, err) = finish(held, Duration::from_secs(10))?;
    assert!(!ok, "denied, so psql fails");
    assert!(err.contains("qgate"), "the denial names qgate: {err}");
    Ok(())
}

/// The capture loop never waits on the planner: while an analyst's
/// estimate is outstanding (the estimator's server accepts the connection
/// and says nothing), another session's write is decided and runs. When
/// the estimator's server goes away, the read is held for review with no
/// estimate (fail closed), never let through.
#[test]
fn other_sessions_run_while_an_estimate_is_outstanding() -> Result<()> {
    require_root();
    let mut lab = Lab::new("estslow")?;
    lab.start_postgres()?;
    lab.sql(ESTIMATOR_SETUP)?;
    lab.sql(LIVE_SETUP)?;
    // A server that accepts and never answers, in the client namespace.
    let mut silent = lab
        .in_client("python3")
        .args([
            "-c",
            "import socket, sys\n\
             s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('0.0.0.0', 15439)); s.listen()\n\
             print('listening', flush=True)\n\
             c, _ = s.accept(); print('accepted', flush=True)\n\
             sys.stdin.read()\n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("python3 listener")?;
    let mut said = BufReader::new(silent.stdout.take().context("listener stdout")?).lines();
    assert_eq!(said.next().transpose()?.as_deref(), Some("listening"));
    let estimator = format!(
        "host={} port=15439 user=qgate_estimator dbname=postgres",
        lab.client_ip
    );
    // Longer than this test waits for anything: an estimate that blocked
    // the loop would show as the write below never finishing.
    let config = live_config(&lab, LIVE_POLICY, &estimator, 120_000)?;
    lab.start_agent(&["--config", &config])?;
    let token = lab.add_reviewer("rita", "reviewers", Some(""))?;

    let read = lab.psql_spawn("analyst", "postgres", &["-At", "-c", "SELECT * FROM big"])?;
    assert_eq!(
        said.next().transpose()?.as_deref(),
        Some("accepted"),
        "the estimator connected"
    );
    // The estimate is outstanding now. The writer's UPDATE needs the
    // agent's decision (its session is gated), and gets it.
    let write = lab.psql_spawn(
        "writer",
        "postgres",
        &["-At", "-c", "UPDATE small SET note = 'seen' WHERE id = 1"],
    )?;
    let (ok, out, err) = finish(write, Duration::from_secs(20))?;
    assert!(
        ok,
        "the write ran while the estimate was outstanding: {out} {err}"
    );
    assert_eq!(lab.sql("SELECT note FROM small WHERE id = 1")?, "seen");
    let pending = lab.requests(&token, &["list", "--status", "pending"])?;
    assert_eq!(
        pending.as_array().map(Vec::len),
        Some(0),
        "the read waits for its estimate, not for a reviewer yet: {pending}"
    );

    // The estimator's server goes away: no estimate, so held for review.
    drop(silent.stdin.take());
    let _ = silent.wait();
    let request = lab
        .pending_requests(&token, 1, Duration::from_secs(20))?
        .remove(0);
    assert_eq!(request["rule"], "costly-reads", "{request}");
    let id = request["id"].as_i64().context("request id")?;
    lab.requests(
        &token,
        &["deny", &id.to_string(), "--comment", "no estimate"],
    )?;
    let (ok, _, _) = finish(read, Duration::from_secs(10))?;
    assert!(!ok, "the read never ran unestimated");
    Ok(())
}
