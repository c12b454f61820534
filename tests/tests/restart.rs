//! Issue 5: what happens when the agent dies. The tc program keeps holding
//! (fail closed) or passes and counts (fail open); a restarted agent takes
//! over the pending requests and no approved statement runs twice.
use std::{io::Write, process::Stdio, time::Duration};

use anyhow::{Context, Result};
use qgate_e2e::{finish, hook_reads_tcp, require_root, Lab, Via};

fn lab_with_table(tag: &str, config: &[(&str, &str)]) -> Result<(Lab, String)> {
    require_root();
    let mut lab = Lab::new(tag)?;
    lab.start_postgres()?;
    lab.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")?;
    lab.sql("INSERT INTO t VALUES (1, 'a'), (2, 'b')")?;
    let config = lab.config_with(config)?;
    lab.start_agent(&["--config", config.to_str().unwrap_or_default()])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    Ok((lab, token))
}

fn config_path(lab: &Lab) -> String {
    lab.dir.join("qgate.toml").display().to_string()
}

#[test]
fn after_kill_9_a_restarted_agent_runs_the_approved_statement_exactly_once() -> Result<()> {
    let (mut lab, token) = lab_with_table("rkill", &[])?;
    // An UPDATE of every row is held by the default policy.
    let held = lab.psql_spawn("postgres", "postgres", &["-c", "UPDATE t SET v = v || 'x'"])?;
    let first = lab.pending_requests(&token, 1, Duration::from_secs(30))?;
    let id = first[0]["id"].as_i64().context("id")?;

    // Opened now: while the agent is down, a new connection's StartupMessage
    // waits for it too (its settings are judged).
    let mut open = lab.session(Via::Tcp)?;
    lab.kill_agent()?;
    std::thread::sleep(Duration::from_secs(3));
    // Fail closed: with no agent, a risky statement waits; a plain read
    // (which the kernel proves harmless by itself) runs.
    let read = "SELECT v FROM t ORDER BY id";
    assert_eq!(open.query(read, Duration::from_secs(10))?, "a\nb");
    let blocked = lab.psql_spawn("postgres", "postgres", &["-c", "DELETE FROM t"])?;
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        open.query(read, Duration::from_secs(10))?,
        "a\nb",
        "nothing passes while the agent is down"
    );

    let config = config_path(&lab);
    lab.start_agent(&["--config", &config])?;
    lab.requests(&token, &["approve", &id.to_string()])?;
    // The statement comes back with the client's next retransmission.
    assert!(
        finish(held, Duration::from_secs(30))?.0,
        "the approved UPDATE finished"
    );
    assert_eq!(
        lab.sql("SELECT string_agg(v, ',' ORDER BY id) FROM t")?,
        "ax,bx",
        "ran exactly once"
    );
    let shown = lab.requests(&token, &["show", &id.to_string()])?;
    assert_eq!(shown["status"], "approved");
    // The DELETE sent while the agent was down is held for review now.
    let later = lab.pending_requests(&token, 1, Duration::from_secs(30))?;
    assert!(later[0]["statement"]
        .as_str()
        .unwrap_or_default()
        .starts_with("DELETE"));
    assert_eq!(lab.sql("SELECT count(*) FROM t")?, "2");
    let later_id = later[0]["id"].as_i64().context("id")?;
    lab.requests(&token, &["deny", &later_id.to_string()])?;
    assert!(
        !finish(blocked, Duration::from_secs(10))?.0,
        "the denied DELETE fails"
    );
    assert_eq!(lab.sql("SELECT count(*) FROM t")?, "2");
    Ok(())
}

#[test]
fn in_fail_open_mode_traffic_passes_while_the_agent_is_gone_and_the_gap_is_audited() -> Result<()> {
    let (mut lab, _token) = lab_with_table(
        "ropen",
        &[
            ("fail = \"closed\"", "fail = \"open\""),
            ("fail_after_ms = 2000", "fail_after_ms = 500"),
        ],
    )?;
    lab.kill_agent()?;
    std::thread::sleep(Duration::from_secs(1));
    lab.sql("UPDATE t SET v = 'open'")?;

    assert_eq!(
        lab.sql("SELECT string_agg(v, ',' ORDER BY id) FROM t")?,
        "open,open"
    );
    let config = config_path(&lab);
    lab.start_agent(&["--config", &config])?;
    let audited = lab.wait_for("a fail-open audit row", Duration::from_secs(10), || {
        let n: i64 = lab.store()?.query_row(
            "SELECT count(*) FROM audit WHERE kind = 'agent.failed_open'",
            [],
            |r| r.get(0),
        )?;
        Ok((n > 0).then_some(n))
    })?;
    assert_eq!(audited, 1);
    Ok(())
}

#[test]
fn a_connection_opened_before_the_agent_is_gated_as_an_unknown_identity() -> Result<()> {
    require_root();
    let mut lab = Lab::new("runknown")?;
    lab.start_postgres()?;
    lab.sql("CREATE TABLE t (id int PRIMARY KEY, v text)")?;
    lab.sql("INSERT INTO t VALUES (1, 'a')")?;
    let mut psql = lab
        .in_client("psql")
        .args([
            "-h",
            &lab.server_ip.to_string(),
            "-U",
            "postgres",
            "-X",
            "-q",
            "-At",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = psql.stdin.take().context("stdin")?;
    writeln!(stdin, "SELECT 1;")?;
    std::thread::sleep(Duration::from_millis(500));
    lab.start_agent(&[])?;
    // The statement's user is unknown: only a reviewer who is no database
    // user at all may approve it (anyone else could be its author).
    let token = lab.add_reviewer("rita", "reviewers", Some(""))?;
    writeln!(stdin, "UPDATE t SET v = 'b';")?;
    let request = lab
        .pending_requests(&token, 1, Duration::from_secs(30))?
        .remove(0);
    assert!(
        request["identity"]["db_user"].is_null(),
        "identity unknown: {request}"
    );
    assert_eq!(lab.sql("SELECT v FROM t")?, "a", "held");
    let id = request["id"].as_i64().context("id")?;
    lab.requests(&token, &["approve", &id.to_string()])?;
    lab.wait_for("the approved UPDATE", Duration::from_secs(5), || {
        Ok((lab.sql("SELECT v FROM t")? == "b").then_some(()))
    })?;
    drop(stdin);
    assert!(finish(psql, Duration::from_secs(5))?.0);
    Ok(())
}

#[test]
fn a_link_severed_with_its_interface_is_replaced_and_its_dead_statement_withdrawn() -> Result<()> {
    let (mut lab, token) = lab_with_table(
        "rsever",
        &[("recovery_grace_s = 150", "recovery_grace_s = 4")],
    )?;
    let mut held = lab.psql_spawn("postgres", "postgres", &["-c", "DROP TABLE t"])?;
    let first = lab.pending_requests(&token, 1, Duration::from_secs(30))?;
    let id = first[0]["id"].as_i64().context("id")?;

    // The agent dies with a statement held (its pins stay), the client
    // dies too, and the interface is removed and made again: the pinned
    // links are severed and the connection is gone for good.
    lab.kill_agent()?;
    held.kill()?;
    held.wait()?;
    let client_ns = format!("qg{}c", "rsever");
    let server = lab.server_ip.to_string();
    let _ = std::process::Command::new("ip")
        .args(["netns", "exec", &client_ns, "ss", "-K", "dst", &server])
        .output();
    lab.recreate_link()?;

    // The agent starts: severed links are replaced, not fatal.
    let config = config_path(&lab);
    lab.start_agent(&["--config", &config])?;
    assert!(lab.agent_log().contains("severed"), "{}", lab.agent_log());
    // New sessions are gated on the new interface.
    let again = lab.psql_spawn("postgres", "postgres", &["-c", "DROP TABLE t"])?;
    let pending = lab.wait_for("the new DROP held", Duration::from_secs(30), || {
        let list = lab.requests(&token, &["list", "--status", "pending"])?;
        Ok(list
            .as_array()
            .and_then(|l| l.iter().find(|r| r["id"].as_i64() != Some(id)).cloned()))
    })?;
    let second = pending["id"].as_i64().context("id")?;
    lab.requests(&token, &["deny", &second.to_string(), "--comment", "no"])?;
    let (ok, _, err) = finish(again, Duration::from_secs(10))?;
    assert!(!ok && err.contains("qgate"), "{err}");

    if hook_reads_tcp() {
        // Held in a stopped backend: its request waits for the server's
        // TCP to notice the dead client (keepalive) or for its expiry; the
        // recovery grace is for statements held on the wire.
        return Ok(());
    }
    // The dead connection's statement never comes back: withdrawn, audited.
    let status = lab.wait_for(
        "the dead statement withdrawn",
        Duration::from_secs(30),
        || {
            let shown = lab.requests(&token, &["show", &id.to_string()])?;
            Ok((shown["status"] != "pending").then(|| shown["status"].clone()))
        },
    )?;
    assert_eq!(status, "withdrawn");
    let audited: i64 = lab.store()?.query_row(
        "SELECT count(*) FROM audit WHERE kind = 'request.withdrawn' AND request_id = ?1",
        [id],
        |r| r.get(0),
    )?;
    assert_eq!(audited, 1);
    assert!(
        lab.sql("SELECT count(*) FROM t").is_ok(),
        "the DROP never ran"
    );
    Ok(())
}
