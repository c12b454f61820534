//! The server hook end to end: uprobes on PostgreSQL's `secure_read` and
//! `secure_write` gate every session of the server, TLS and Unix socket
//! included, which the tc program cannot read. A risky statement is held
//! inside the backend until a reviewer decides; a denied one is an SQL
//! error; cancels, disconnects and an agent killed mid-hold never let it run
//! unapproved, and every statement is stored exactly once.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Child,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use qgate_e2e::{finish, hook_reads_tcp, require_root, Lab, Via, PG_PORT};
use serde_json::Value;

/// What every gating test tries to do; the default policy holds it.
const DROP: &str = "DROP TABLE t";

/// A lab whose server also speaks TLS, with a table `t` of three rows, the
/// agent (started with `agent_args`) under the shipped default policy, and
/// reviewer rita in `reviewers`. Returns rita's token.
fn hook_lab(tag: &str, agent_args: &[&str]) -> Result<(Lab, String)> {
    require_root();
    let mut lab = Lab::new(tag)?;
    lab.start_postgres_tls()?;
    create_t(&lab, Via::Tcp)?;
    lab.start_agent(agent_args)?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    Ok((lab, token))
}

/// Creates `t` with rows 1 to 3 in one Query (one implicit transaction).
fn create_t(lab: &Lab, via: Via) -> Result<()> {
    lab.sql_via(
        via,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')",
    )?;
    Ok(())
}

/// The first pending request (waiting up to 10 s for one) and its id.
fn pending(lab: &Lab, token: &str) -> Result<(Value, i64)> {
    let mut list = lab.pending_requests(token, 1, Duration::from_secs(10))?;
    let request = list.remove(0);
    let id = request["id"].as_i64().context("request id")?;
    Ok((request, id))
}

/// Polls request `id` until its status is `status`.
fn status_becomes(lab: &Lab, token: &str, id: i64, status: &str, within: Duration) -> Result<()> {
    lab.wait_for(&format!("request {id} {status}"), within, || {
        let shown = lab.requests(token, &["show", &id.to_string()])?;
        Ok((shown["status"] == status).then_some(()))
    })
}

/// Whether table `t` exists, asked `via` a transport (a plain read, which
/// the gate lets run at once).
/// Plain reads only (no parenthesis): the kernel passes them without the
/// agent, so they answer even while the agent is gone (fail closed).
fn table_exists(lab: &Lab, via: Via) -> Result<bool> {
    Ok(lab.sql_via(via, "SELECT tablename FROM pg_tables WHERE tablename = 't'")? == "t")
}

/// `t` is there with its three rows: none of what a held DROP, DELETE or
/// TRUNCATE would do has happened.
fn untouched(lab: &Lab, via: Via) -> Result<bool> {
    Ok(table_exists(lab, via)? && lab.sql_via(via, "SELECT id FROM t ORDER BY id")? == "1\n2\n3")
}

/// psql running `text` as a script file (`-At -f`) `via` a transport, in the
/// background.
fn psql_script(lab: &Lab, via: Via, name: &str, text: impl AsRef<[u8]>) -> Result<Child> {
    let path = lab.dir.join(name);
    std::fs::write(&path, text)?;
    let path = path.to_str().context("script path")?;
    lab.psql_via_spawn(via, "postgres", "postgres", &["-At", "-f", path])
}

/// Denies request `id`, waits for its client and checks that the denial
/// reached it as an SQL error naming qgate (and the request, when
/// `names_request`: a statement long enough to carry it) and that `t` is
/// untouched. Returns the client's stdout.
fn deny_and_check(
    lab: &Lab,
    token: &str,
    id: i64,
    client: Child,
    via: Via,
    names_request: bool,
) -> Result<String> {
    lab.requests(token, &["deny", &id.to_string(), "--comment", "not today"])?;
    let (_, out, err) = finish(client, Duration::from_secs(10))?;
    let shown = &err[..err.len().min(600)];
    assert!(err.contains("qgate"), "the error names qgate: {shown}");
    if names_request {
        assert!(
            err.contains(&format!("request {id}")),
            "the error names the request: {shown}"
        );
    }
    assert!(untouched(lab, via)?, "a denied statement never runs");
    Ok(out)
}

/// One row per time the store recorded a statement: its connection's
/// transport, gating path, identity and backend, and the server's outcome.
#[derive(Debug)]
struct Recorded {
    transport: Option<String>,
    gated_by: Option<String>,
    user: Option<String>,
    database: Option<String>,
    client_addr: String,
    backend_pid: Option<i64>,
    outcome: String,
}

/// Every stored copy of the statement `text`, once one has its outcome.
fn recorded(lab: &Lab, text: &str) -> Result<Vec<Recorded>> {
    lab.wait_for(
        &format!("{text:?} stored with its outcome"),
        Duration::from_secs(10),
        || {
            let db = lab.store()?;
            let mut stmt = db.prepare(
                "SELECT c.transport, c.gated_by, c.user, c.database, c.client_addr,
                        c.backend_pid, s.outcome
                 FROM statements s JOIN connections c ON c.id = s.connection_id
                 WHERE s.text = ?1 ORDER BY s.id",
            )?;
            let rows = stmt
                .query_map([text], |r| {
                    Ok(Recorded {
                        transport: r.get(0)?,
                        gated_by: r.get(1)?,
                        user: r.get(2)?,
                        database: r.get(3)?,
                        client_addr: r.get(4)?,
                        backend_pid: r.get(5)?,
                        outcome: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows.iter().any(|r| r.outcome != "unknown").then_some(rows))
        },
    )
}

/// `DROP TABLE t` sent `via` a transport is held by the server hook while
/// the server serves everybody else, runs within a second of its approval,
/// and is stored once, attributed to the transport and its backend.
fn held_until_approved(via: Via, tag: &str) -> Result<()> {
    let (lab, token) = hook_lab(tag, &[])?;
    let psql = lab.psql_via_spawn(via, "postgres", "postgres", &["-c", DROP])?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["statement"], DROP, "{request}");
    assert_eq!(request["held_by"], "server_hook", "{request}");
    assert_eq!(request["identity"]["protocol"], "postgresql", "{request}");
    if via == Via::Unix {
        assert!(request["identity"]["server"].is_null(), "{request}");
    } else {
        let server = request["identity"]["server"].as_str().unwrap_or_default();
        assert!(server.ends_with(":5432"), "{request}");
    }
    // The held session is the only other client: its backend is in here.
    let held_backends = lab.backend_pids()?;

    thread::sleep(Duration::from_millis(1500));
    assert!(table_exists(&lab, via)?, "DROP ran before approval");
    let started = Instant::now();
    assert_eq!(lab.sql_via(via, "SELECT count(*) FROM t")?, "3");
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "another session took {took:?}"
    );

    lab.requests(&token, &["approve", &id.to_string(), "--comment", "ok"])?;
    let approved_at = Instant::now();
    let (ok, _, err) = finish(psql, Duration::from_secs(5))?;
    let latency = approved_at.elapsed();
    assert!(ok, "psql failed: {err}");
    eprintln!("{via:?}: the approved DROP completed {latency:?} after the approve call returned (target 50 ms)");
    assert!(
        latency < Duration::from_secs(1),
        "ran {latency:?} after approval"
    );
    assert!(!table_exists(&lab, via)?, "the approved DROP did not run");

    let rows = recorded(&lab, DROP)?;
    assert_eq!(rows.len(), 1, "stored once, by one path: {rows:#?}");
    let row = &rows[0];
    assert_eq!(row.transport.as_deref(), Some(via.transport()), "{row:?}");
    assert_eq!(row.gated_by.as_deref(), Some("server_hook"), "{row:?}");
    assert_eq!(row.user.as_deref(), Some("postgres"), "{row:?}");
    assert_eq!(row.database.as_deref(), Some("postgres"), "{row:?}");
    assert_eq!(row.outcome, "ok", "{row:?}");
    assert!(
        row.backend_pid
            .is_some_and(|pid| held_backends.iter().any(|b| i64::from(*b) == pid)),
        "the store names the held backend: {row:?}, backends {held_backends:?}"
    );
    if via == Via::Unix {
        assert_eq!(row.client_addr, "local", "{row:?}");
    }
    Ok(())
}

#[test]
fn a_tls_drop_table_is_held_until_approved() -> Result<()> {
    held_until_approved(Via::Tls, "htlshld")
}

#[test]
fn a_unix_socket_drop_table_is_held_until_approved() -> Result<()> {
    held_until_approved(Via::Unix, "hunixhld")
}

/// A denied `DROP TABLE t` sent `via` a transport is an SQL error naming
/// qgate, and the same session runs its next statement.
fn denied_and_the_session_goes_on(via: Via, tag: &str) -> Result<()> {
    let (lab, token) = hook_lab(tag, &[])?;
    let psql = psql_script(
        &lab,
        via,
        "deny.sql",
        "DROP TABLE t;\nSELECT 40 + 2 AS answer;\n",
    )?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["held_by"], "server_hook", "{request}");
    let out = deny_and_check(&lab, &token, id, psql, via, false)?;
    assert!(out.contains("42"), "the session stays usable: {out}");
    let shown = lab.requests(&token, &["show", &id.to_string()])?;
    assert_eq!(shown["status"], "denied", "{shown}");
    Ok(())
}

#[test]
fn a_denied_tls_statement_is_an_sql_error_and_the_session_goes_on() -> Result<()> {
    denied_and_the_session_goes_on(Via::Tls, "htlsden")
}

#[test]
fn a_denied_unix_socket_statement_is_an_sql_error_and_the_session_goes_on() -> Result<()> {
    denied_and_the_session_goes_on(Via::Unix, "hunixden")
}

/// Waits for the held request of `client` (newer than `last_id`), checks it
/// is the disguised risky statement (`needle`, lower case) held by the hook
/// and that nothing happened to `t`, then denies it. Returns its id.
fn disguise_is_held(
    lab: &Lab,
    token: &str,
    client: Child,
    needle: &str,
    last_id: i64,
) -> Result<i64> {
    let (request, id) = pending(lab, token)?;
    assert!(id > last_id, "a new request: {request}");
    let statement = request["statement"].as_str().unwrap_or_default();
    assert!(
        statement.to_lowercase().contains(needle),
        "{needle:?} held: {request}"
    );
    assert_eq!(request["held_by"], "server_hook", "{request}");
    thread::sleep(Duration::from_millis(500));
    assert!(
        untouched(lab, Via::Tls)?,
        "{statement:?} did damage before a decision"
    );
    deny_and_check(lab, token, id, client, Via::Tls, statement.len() >= 30)?;
    Ok(id)
}

#[test]
fn disguised_risky_statements_over_tls_are_held_and_do_no_harm() -> Result<()> {
    let (lab, token) = hook_lab("htlsevad", &[])?;
    let mut last_id = 0;
    // psql -c sends each as one Query message: a harmless statement first,
    // lower case, a comment before the verb.
    for sql in [
        "select 1; DROP TABLE t",
        "drop table t",
        "/* tidying up after last week's migration */ DROP TABLE t",
    ] {
        let psql = lab.psql_via_spawn(Via::Tls, "postgres", "postgres", &["-c", sql])?;
        last_id = disguise_is_held(&lab, &token, psql, "drop table t", last_id)?;
    }
    // pgbench: Parse/Bind/Describe/Execute/Sync in one write; then two
    // Query messages, the DROP sent after the harmless one's answer.
    for (mode, script, needle) in [
        ("extended", "DELETE FROM t;\n", "delete from t"),
        ("simple", "SELECT 1;\nDROP TABLE t;\n", "drop table t"),
    ] {
        let path = lab.dir.join(format!("{mode}.sql"));
        std::fs::write(&path, script)?;
        let path = path.to_str().context("script path")?;
        let args = ["-n", "-t", "1", "-M", mode, "-f", path];
        let bench = lab.pgbench_via_spawn(Via::Tls, &args)?;
        last_id = disguise_is_held(&lab, &token, bench, needle, last_id)?;
    }
    Ok(())
}

#[test]
fn a_denied_100_kb_tls_statement_never_runs() -> Result<()> {
    let (lab, token) = hook_lab("htlsbig", &[])?;
    let padding = "x".repeat(100_000);
    let psql = psql_script(
        &lab,
        Via::Tls,
        "big.sql",
        format!("DROP TABLE t /* {padding} */;\nSELECT 'after';\n"),
    )?;
    let (request, id) = pending(&lab, &token)?;
    let statement = request["statement"].as_str().unwrap_or_default();
    assert!(
        statement.starts_with("DROP TABLE t /* xxx"),
        "the request shows the statement: {}",
        &statement[..statement.len().min(200)]
    );
    thread::sleep(Duration::from_millis(500));
    assert!(untouched(&lab, Via::Tls)?, "ran before a decision");
    let out = deny_and_check(&lab, &token, id, psql, Via::Tls, false)?;
    assert!(out.contains("after"), "the session stays usable: {out}");
    Ok(())
}

/// One protocol message from the server: its type and payload.
fn read_message(stream: &mut TcpStream) -> Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head).context("reading a message")?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut payload = vec![0; len.checked_sub(4).context("message length")?];
    stream
        .read_exact(&mut payload)
        .context("reading a message")?;
    Ok((head[0], payload))
}

/// A protocol 3.0 Query message.
fn query_message(sql: &str) -> Vec<u8> {
    let len = (sql.len() + 5) as u32;
    [&[b'Q'][..], &len.to_be_bytes(), sql.as_bytes(), &[0]].concat()
}

/// A plaintext session as postgres on database postgres, spoken by hand from
/// the client namespace, read up to its first ReadyForQuery.
fn raw_session(lab: &Lab) -> Result<TcpStream> {
    let server = SocketAddr::from((lab.server_ip, PG_PORT));
    let mut stream = lab.connect_from_client(server, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    let params: &[u8] = b"user\0postgres\0database\0postgres\0\0";
    let len = (8 + params.len()) as u32;
    let protocol = 3u32 << 16;
    stream.write_all(&[&len.to_be_bytes()[..], &protocol.to_be_bytes(), params].concat())?;
    loop {
        match read_message(&mut stream)? {
            (b'Z', _) => return Ok(stream),
            (b'E', payload) => bail!("startup refused: {}", String::from_utf8_lossy(&payload)),
            _ => {}
        }
    }
}

#[test]
fn two_plaintext_queries_in_one_write_hold_the_risky_one() -> Result<()> {
    let (lab, token) = hook_lab("htcppipe", &[])?;
    let mut stream = raw_session(&lab)?;
    // One segment, two Query messages: a harmless one in front of the DROP.
    stream.write_all(&[query_message("SELECT 1"), query_message(DROP)].concat())?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["statement"], DROP, "{request}");
    // Read by the hook with probes on every backend, else on the wire.
    let reader = if hook_reads_tcp() {
        "server_hook"
    } else {
        "wire"
    };
    assert_eq!(request["held_by"], reader, "{request}");
    thread::sleep(Duration::from_millis(500));
    assert!(untouched(&lab, Via::Tcp)?, "DROP ran before a decision");
    lab.requests(&token, &["deny", &id.to_string()])?;
    // Both answers, each ending in ReadyForQuery.
    let mut answers = Vec::new();
    while answers.iter().filter(|(kind, _)| *kind == b'Z').count() < 2 {
        answers.push(read_message(&mut stream)?);
    }
    let text = |kind: u8| -> String {
        answers
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, p)| String::from_utf8_lossy(p).into_owned())
            .collect()
    };
    assert!(text(b'C').contains("SELECT 1"), "{answers:?}");
    assert!(text(b'E').contains("qgate"), "{answers:?}");
    assert!(untouched(&lab, Via::Tcp)?, "a denied DROP never runs");
    Ok(())
}

/// The last connection id the store has.
fn last_connection_id(lab: &Lab) -> Result<i64> {
    let sql = "SELECT coalesce(max(id), 0) FROM connections";
    Ok(lab.store()?.query_row(sql, [], |r| r.get(0))?)
}

/// pgbench -S's statement, one per transaction.
const READ: &str = "SELECT abalance FROM pgbench_accounts%";

/// pgbench -S reads completed on connections after `after`.
fn reads_completed_since(lab: &Lab, after: i64) -> Result<i64> {
    Ok(lab.store()?.query_row(
        "SELECT count(*) FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.id > ?1 AND s.text LIKE ?2 AND s.completed_at IS NOT NULL",
        rusqlite::params![after, READ],
        |r| r.get(0),
    )?)
}

/// Statements stored for connections `after < id <= upto`, counted by
/// transport, gating path and whether they are pgbench -S's read:
/// (transport, gated_by, is the read, stored, of them with outcome ok).
type PathCount = (Option<String>, Option<String>, bool, i64, i64);

fn counts_by_path(lab: &Lab, after: i64, upto: i64) -> Result<Vec<PathCount>> {
    let db = lab.store()?;
    let mut stmt = db.prepare(
        "SELECT c.transport, c.gated_by, s.text LIKE ?3, count(*), sum(s.outcome = 'ok')
         FROM statements s JOIN connections c ON c.id = s.connection_id
         WHERE c.id > ?1 AND c.id <= ?2
           AND coalesce(c.application, '') NOT LIKE 'qgate-catalog-%'
         GROUP BY 1, 2, 3 ORDER BY 3 DESC, 1, 2",
    )?;
    let rows = stmt
        .query_map(rusqlite::params![after, upto, READ], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// pgbench -S `via` a transport, prepared and simple, under a policy that
/// lets everything run: each read is stored exactly once, by the hook (by
/// the tc programs for plaintext TCP, which they read), attributed to the
/// transport, and the capture lost nothing.
fn counts_are_exact(via: Via, tag: &str) -> Result<()> {
    require_root();
    let mut lab = Lab::new(tag)?;
    lab.start_postgres_tls()?;
    // Before the agent: -i's DDL would be held, and it is not what is counted.
    lab.pgbench(&["-i", "-q", "-s", "1"])?;
    let policy = lab.dir.join("allow.toml");
    std::fs::write(&policy, "[default]\naction = \"allow\"\n")?;
    lab.start_agent(&["--policy", policy.to_str().context("policy path")?])?;
    let (clients, transactions) = (4i64, 200i64);
    let reads = clients * transactions;
    let (c, t) = (clients.to_string(), transactions.to_string());
    let modes = ["prepared", "simple"];
    // Each run's connections are those after the last one stored before it.
    let mut firsts = Vec::new();
    for mode in modes {
        let after = last_connection_id(&lab)?;
        let args = ["-n", "-S", "-c", &c, "-j", "2", "-t", &t, "-M", mode];
        lab.pgbench_via(via, &args)?;
        lab.wait_for(
            &format!("every {mode} read completed"),
            Duration::from_secs(30),
            || Ok((reads_completed_since(&lab, after)? >= reads).then_some(())),
        )?;
        firsts.push(after);
    }
    lab.stop_agent()?;
    let gated_by = if via == Via::Tcp && !hook_reads_tcp() {
        "wire"
    } else {
        "server_hook"
    };
    let (transport, hook) = (Some(via.transport().to_owned()), Some(gated_by.to_owned()));
    for (i, mode) in modes.iter().enumerate() {
        let upto = firsts.get(i + 1).copied().unwrap_or(i64::MAX);
        let counts = counts_by_path(&lab, firsts[i], upto)?;
        // The reads, then pgbench's start-up: the scale query on
        // pgbench_branches and the partitioning query.
        let expected = vec![
            (transport.clone(), hook.clone(), true, reads, reads),
            (transport.clone(), hook.clone(), false, 2, 2),
        ];
        assert_eq!(counts, expected, "{via:?} -M {mode}");
    }
    let loss: i64 = lab.store()?.query_row(
        "SELECT coalesce(max(ringbuf_full + truncated + load_errors + writer_dropped + hook_lost), 0)
         FROM capture_loss",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(loss, 0, "capture loss");
    Ok(())
}

/// The pins of backend `pid`'s session probes in the lab's pin directory.
fn session_pins(lab: &Lab, pid: u32) -> Result<usize> {
    let prefix = format!("session-{pid}-");
    let mut n = 0;
    for dir in std::fs::read_dir(lab.pin_dir())? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            if entry?.file_name().to_string_lossy().starts_with(&prefix) {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// With `server_hook.probes = "per-session"` the read and write probes are
/// attached per backend, and only to the sessions no tc program can read: a
/// Unix-socket and a TLS session get them (three links, pinned under their
/// backend's pid), a plaintext TCP session none (a probe there would cost
/// its every statement a trap for bytes the wire already reads), and they
/// go when the backend exits. With probes on every backend (the default)
/// no backend has its own, and the hook reads all three.
#[test]
fn session_probes_go_only_to_the_sessions_the_wire_cannot_read() -> Result<()> {
    let (lab, _token) = hook_lab("hprobes", &[])?;
    let mut sessions = Vec::new();
    for via in [Via::Unix, Via::Tls, Via::Tcp] {
        let mut session = lab.session(via)?;
        let pid: u32 = session
            .query("SELECT pg_backend_pid()", Duration::from_secs(30))?
            .trim()
            .parse()
            .context("pg_backend_pid")?;
        sessions.push((via, pid, session));
    }
    for (via, pid, _) in &sessions {
        let expected = if *via == Via::Tcp || hook_reads_tcp() {
            0
        } else {
            3
        };
        assert_eq!(session_pins(&lab, *pid)?, expected, "{via:?} backend {pid}");
    }
    // Each statement was read where it says: the hook's sessions by the
    // hook, the TCP one on the wire.
    let text = "SELECT pg_backend_pid();";
    lab.wait_for(
        "the three statements stored",
        Duration::from_secs(10),
        || Ok((recorded(&lab, text)?.len() == 3).then_some(())),
    )?;
    let mut paths: Vec<(Option<String>, Option<String>)> = recorded(&lab, text)?
        .into_iter()
        .map(|r| (r.transport, r.gated_by))
        .collect();
    paths.sort();
    let tcp_reader = if hook_reads_tcp() {
        "server_hook"
    } else {
        "wire"
    };
    let expected = [
        ("tcp", tcp_reader),
        ("tls", "server_hook"),
        ("unix", "server_hook"),
    ]
    .map(|(t, g)| (Some(t.to_owned()), Some(g.to_owned())));
    assert_eq!(paths, expected);
    let pids: Vec<u32> = sessions.iter().map(|(_, pid, _)| *pid).collect();
    drop(sessions);
    lab.wait_for(
        "the exited backends' probes detached",
        Duration::from_secs(10),
        || {
            let left: usize = pids
                .iter()
                .map(|pid| session_pins(&lab, *pid))
                .sum::<Result<usize>>()?;
            Ok((left == 0).then_some(()))
        },
    )?;
    Ok(())
}

#[test]
fn pgbench_over_plaintext_tcp_is_stored_exactly_once() -> Result<()> {
    counts_are_exact(Via::Tcp, "hcnttcp")
}

#[test]
fn pgbench_over_tls_is_stored_exactly_once() -> Result<()> {
    counts_are_exact(Via::Tls, "hcnttls")
}

#[test]
fn pgbench_over_the_unix_socket_is_stored_exactly_once() -> Result<()> {
    counts_are_exact(Via::Unix, "hcntunix")
}

#[test]
fn a_ctrl_c_withdraws_a_held_tls_statement() -> Result<()> {
    let (lab, token) = hook_lab("htlsint", &[])?;
    let psql = psql_script(
        &lab,
        Via::Tls,
        "cancel.sql",
        "DROP TABLE /* the user will think better of it */ t;\n",
    )?;
    let (_, id) = pending(&lab, &token)?;
    // Ctrl-C: psql sends a CancelRequest on a new connection.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(psql.id() as i32, libc::SIGINT) };
    let (ok, _, err) = finish(psql, Duration::from_secs(5))?;
    assert!(!ok && err.contains("qgate"), "{err}");
    status_becomes(&lab, &token, id, "withdrawn", Duration::from_secs(5))?;
    assert!(untouched(&lab, Via::Tls)?, "a withdrawn DROP never runs");
    Ok(())
}

#[test]
fn pg_cancel_backend_withdraws_a_held_tls_statement() -> Result<()> {
    let (lab, token) = hook_lab("htlspgc", &[])?;
    let victim = "dbname=postgres application_name=victim";
    let psql = lab.psql_via_spawn(Via::Tls, "postgres", victim, &["-c", DROP])?;
    let (_, id) = pending(&lab, &token)?;
    let pid: u32 = lab
        .sql_via(
            Via::Unix,
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'victim'",
        )?
        .parse()
        .context("the held backend's pid")?;
    assert!(lab.backend_pids()?.contains(&pid));
    // pg_cancel_backend is itself a statement the default policy holds: the
    // reviewer lets it through.
    let cancel = lab.psql_via_spawn(
        Via::Tls,
        "postgres",
        "postgres",
        &["-At", "-c", &format!("SELECT pg_cancel_backend({pid})")],
    )?;
    let requests = lab.pending_requests(&token, 2, Duration::from_secs(10))?;
    let cancel_id = requests
        .iter()
        .find(|r| {
            r["statement"]
                .as_str()
                .is_some_and(|s| s.contains("pg_cancel_backend"))
        })
        .and_then(|r| r["id"].as_i64())
        .context("a request for pg_cancel_backend")?;
    lab.requests(&token, &["approve", &cancel_id.to_string()])?;
    let (ok, out, err) = finish(cancel, Duration::from_secs(10))?;
    assert!(
        ok && out.trim() == "t",
        "the backend was signalled: {out} {err}"
    );
    status_becomes(&lab, &token, id, "withdrawn", Duration::from_secs(5))?;
    let (ok, _, err) = finish(psql, Duration::from_secs(10))?;
    assert!(!ok, "the cancelled DROP failed: {err}");
    thread::sleep(Duration::from_secs(2));
    assert!(untouched(&lab, Via::Tls)?, "a withdrawn DROP never runs");
    Ok(())
}

/// A client `via` a transport killed while its DROP is held: the request is
/// withdrawn and the DROP never runs.
fn disconnect_withdraws(via: Via, tag: &str) -> Result<()> {
    let (lab, token) = hook_lab(tag, &[])?;
    let mut psql = lab.psql_via_spawn(via, "postgres", "postgres", &["-c", DROP])?;
    let (_, id) = pending(&lab, &token)?;
    psql.kill()?;
    psql.wait()?;
    status_becomes(&lab, &token, id, "withdrawn", Duration::from_secs(10))?;
    assert!(untouched(&lab, via)?, "a withdrawn DROP never runs");
    Ok(())
}

#[test]
fn a_tls_client_that_disconnects_withdraws_its_held_statement() -> Result<()> {
    disconnect_withdraws(Via::Tls, "htlsdisc")
}

#[test]
fn a_unix_socket_client_that_disconnects_withdraws_its_held_statement() -> Result<()> {
    disconnect_withdraws(Via::Unix, "hunixdsc")
}

#[test]
fn after_kill_9_a_restarted_agent_releases_the_held_tls_statement_once() -> Result<()> {
    let (mut lab, token) = hook_lab("htlsk9", &[])?;
    let mut psql = lab.psql_via_spawn(Via::Tls, "postgres", "postgres", &["-c", DROP])?;
    let (_, id) = pending(&lab, &token)?;
    // Opened now: while the agent is down a new connection's StartupMessage
    // waits for it too.
    let mut open = lab.session(Via::Tls)?;
    lab.kill_agent()?;
    thread::sleep(Duration::from_secs(1));
    assert!(
        psql.try_wait()?.is_none(),
        "the agent's death released the client"
    );
    assert_eq!(
        open.query(
            "SELECT tablename FROM pg_tables WHERE tablename = 't'",
            Duration::from_secs(10)
        )?,
        "t",
        "the DROP ran with the agent gone"
    );

    lab.start_agent(&[])?;
    lab.requests(&token, &["approve", &id.to_string()])?;
    let (ok, _, err) = finish(psql, Duration::from_secs(30))?;
    assert!(ok, "the approved DROP finished: {err}");
    assert!(!table_exists(&lab, Via::Tls)?, "the approved DROP ran");
    let shown = lab.requests(&token, &["show", &id.to_string()])?;
    assert_eq!(shown["status"], "approved", "{shown}");
    // A second run would have failed on the missing table, and the server
    // logs every error.
    let log = std::fs::read_to_string(lab.dir.join("postgres.log"))?;
    assert!(
        !log.contains("table \"t\" does not exist"),
        "the DROP ran twice:\n{log}"
    );
    Ok(())
}

/// A Unix-socket session that starts while the agent is down (killed):
/// with probes per session its backend waits at its start for them (fail
/// closed) and the restarted agent attaches them (its look at the backends
/// waiting), with probes on every backend it is read from its first byte;
/// either way its DROP is held for review like any other and never runs
/// unjudged.
#[test]
fn a_unix_session_started_while_the_agent_is_down_is_read_once_it_is_back() -> Result<()> {
    let (mut lab, token) = hook_lab("hunixdn", &[])?;
    lab.kill_agent()?;
    // The programs count the agent gone once its heartbeat is this old.
    thread::sleep(Duration::from_secs(3));
    let psql = lab.psql_via_spawn(Via::Unix, "postgres", "postgres", &["-c", DROP])?;
    thread::sleep(Duration::from_secs(1));
    let mut waiting = psql;
    assert!(
        waiting.try_wait()?.is_none(),
        "the session ended with the agent gone"
    );
    lab.start_agent(&[])?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["statement"], DROP, "{request}");
    assert_eq!(request["held_by"], "server_hook", "{request}");
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (ok, _, err) = finish(waiting, Duration::from_secs(10))?;
    assert!(!ok && err.contains("qgate"), "{err}");
    assert!(untouched(&lab, Via::Tcp)?, "a denied DROP never runs");
    Ok(())
}

/// Under `gate.fail = "open"` a Unix-socket session that starts while the
/// agent is gone runs unjudged (the operator's choice). When the agent is
/// back: with probes on every backend it was read all along and its next
/// DROP is held; with per-session probes its backend idles inside a read
/// that probes attached now would not see return, so, like a session from
/// before the hook, it is ended and audited rather than left unseen.
#[test]
fn a_unix_session_that_ran_unread_under_fail_open_is_read_or_ended_when_the_agent_is_back(
) -> Result<()> {
    require_root();
    let mut lab = Lab::new("hunixopn")?;
    lab.start_postgres_tls()?;
    create_t(&lab, Via::Tcp)?;
    let config = lab.config_with(&[
        ("fail = \"closed\"", "fail = \"open\""),
        ("fail_after_ms = 2000", "fail_after_ms = 500"),
    ])?;
    let config = config.to_str().context("config path")?.to_owned();
    lab.start_agent(&["--config", &config])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    lab.kill_agent()?;
    thread::sleep(Duration::from_secs(1));
    let mut session = lab.session(Via::Unix)?;
    lab.start_agent(&["--config", &config])?;
    if hook_reads_tcp() {
        // Held: no answer while it waits for a reviewer.
        assert!(session.query(DROP, Duration::from_secs(2)).is_err());
        let (request, id) = pending(&lab, &token)?;
        assert_eq!(request["held_by"], "server_hook", "{request}");
        lab.requests(&token, &["deny", &id.to_string()])?;
    } else {
        lab.wait_for(
            "the session ended and audited",
            Duration::from_secs(10),
            || Ok((terminations(&lab)? == 1).then_some(())),
        )?;
        assert!(
            session.query(DROP, Duration::from_secs(3)).is_err(),
            "the ended session ran on"
        );
    }
    thread::sleep(Duration::from_millis(500));
    assert!(untouched(&lab, Via::Tcp)?, "the DROP never runs");
    Ok(())
}

#[test]
fn without_the_server_hook_tls_is_refused_naming_qgate_and_plaintext_is_held_on_the_wire(
) -> Result<()> {
    let (lab, token) = hook_lab("hnohook", &["--no-server-hook"])?;
    // The tc program cannot read TLS: under `unreadable = "refuse"` the
    // session is reset once the server accepted TLS, before the handshake
    // (libpq shows no server error text during the SSL exchange, so the
    // client sees the reset; the audit names qgate's decision).
    let out = lab.psql_via(Via::Tls, "postgres", "postgres", &["-c", DROP])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "refused: {err}");
    assert!(untouched(&lab, Via::Tcp)?, "nothing ran");
    let audited: i64 = lab.store()?.query_row(
        "SELECT count(*) FROM audit WHERE kind = 'decision' AND details LIKE '%encrypted session%'",
        [],
        |r| r.get(0),
    )?;
    assert_eq!(audited, 1, "the refusal is audited: {err}");
    // Plaintext on the same server is read, so it is gated, not refused.
    let psql = lab.psql_via_spawn(Via::Tcp, "postgres", "postgres", &["-c", DROP])?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["statement"], DROP, "{request}");
    assert_eq!(request["held_by"], "wire", "{request}");
    assert!(untouched(&lab, Via::Tcp)?, "DROP ran before a decision");
    deny_and_check(&lab, &token, id, psql, Via::Tcp, false)?;
    Ok(())
}

#[test]
fn without_the_server_hook_and_unreadable_allowed_tls_runs_unseen() -> Result<()> {
    require_root();
    let mut lab = Lab::new("hnoread")?;
    lab.start_postgres_tls()?;
    create_t(&lab, Via::Tcp)?;
    let config = lab.config_with(&[("unreadable = \"refuse\"", "unreadable = \"allow\"")])?;
    let config = config.to_str().context("config path")?.to_string();
    lab.start_agent(&["--no-server-hook", "--config", &config])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    // What the DBA chose: the DROP is never seen, so never held.
    lab.sql_via(Via::Tls, DROP)?;
    assert!(!table_exists(&lab, Via::Tcp)?, "the unseen DROP ran");
    let list = lab.requests(&token, &["list"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");
    // The store is written in batches: wait for it.
    lab.wait_for(
        "the unread session on record",
        Duration::from_secs(10),
        || {
            let encrypted: i64 = lab.store()?.query_row(
                "SELECT count(*) FROM connections WHERE encrypted = 1",
                [],
                |r| r.get(0),
            )?;
            Ok((encrypted >= 1).then_some(()))
        },
    )?;
    Ok(())
}

/// A psql session `via` a transport opened before the agent (its backend
/// idles inside `secure_read` when the hook attaches), then the agent.
fn session_before_the_agent(tag: &str, via: Via) -> Result<(Lab, Child, std::process::ChildStdin)> {
    require_root();
    let mut lab = Lab::new(tag)?;
    lab.start_postgres_tls()?;
    create_t(&lab, Via::Tcp)?;
    let mut psql = lab.psql_via_spawn_stdin(via, "postgres", "postgres", &["-At"])?;
    let mut stdin = psql.stdin.take().context("psql stdin")?;
    writeln!(stdin, "SELECT 'before';")?;
    thread::sleep(Duration::from_millis(500));
    lab.start_agent(&[])?;
    Ok((lab, psql, stdin))
}

fn terminations(lab: &Lab) -> Result<i64> {
    Ok(lab.store()?.query_row(
        "SELECT count(*) FROM audit WHERE kind = 'backend.terminated'",
        [],
        |r| r.get(0),
    )?)
}

/// The hook cannot see the read such a backend is already blocked in, and
/// nothing else can read a Unix socket or TLS: the session is ended, audited,
/// and what it sends next never runs.
fn unseeable_session_before_the_agent_is_ended(tag: &str, via: Via) -> Result<()> {
    let (lab, psql, mut stdin) = session_before_the_agent(tag, via)?;
    // TLS is only known to be TLS once its next bytes reach the wire path.
    let _ = writeln!(stdin, "DROP TABLE t;");
    drop(stdin);
    let (ok, out, err) = finish(psql, Duration::from_secs(10))?;
    assert!(out.contains("before"), "the session worked before: {out}");
    assert!(
        !ok || err.contains("terminat"),
        "the session was ended: {out} / {err}"
    );
    assert!(untouched(&lab, Via::Tcp)?, "the unseen DROP never runs");
    lab.wait_for(
        "the termination in the audit",
        Duration::from_secs(5),
        || Ok((terminations(&lab)? == 1).then_some(())),
    )?;
    Ok(())
}

#[test]
fn a_unix_socket_session_opened_before_the_agent_is_ended_and_audited() -> Result<()> {
    unseeable_session_before_the_agent_is_ended("hunixold", Via::Unix)
}

#[test]
fn a_tls_session_opened_before_the_agent_is_ended_and_audited() -> Result<()> {
    unseeable_session_before_the_agent_is_ended("htlsold", Via::Tls)
}

#[test]
fn a_plaintext_session_opened_before_the_agent_stays_gated_on_the_wire() -> Result<()> {
    let (lab, psql, mut stdin) = session_before_the_agent("htcpold", Via::Tcp)?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    writeln!(stdin, "DROP TABLE t;")?;
    writeln!(stdin, "SELECT 'after';")?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["held_by"], "wire", "{request}");
    assert!(untouched(&lab, Via::Tcp)?, "held, not run");
    lab.requests(&token, &["deny", &id.to_string()])?;
    drop(stdin);
    let (_, out, err) = finish(psql, Duration::from_secs(10))?;
    assert!(err.contains("qgate"), "{err}");
    assert!(out.contains("after"), "the session goes on: {out}");
    assert!(untouched(&lab, Via::Tcp)?);
    assert_eq!(terminations(&lab)?, 0, "nothing ended");
    Ok(())
}

#[test]
fn a_server_restarted_under_the_agent_is_gated_from_its_first_session() -> Result<()> {
    let (lab, token) = hook_lab("hrestart", &[])?;
    lab.restart_postgres()?;
    // At once, before the agent's periodic look for servers.
    let psql = lab.psql_via_spawn(Via::Unix, "postgres", "postgres", &["-c", DROP])?;
    let (request, id) = pending(&lab, &token)?;
    assert_eq!(request["held_by"], "server_hook", "{request}");
    assert!(untouched(&lab, Via::Tcp)?, "held, not run");
    deny_and_check(&lab, &token, id, psql, Via::Unix, false)?;
    assert_eq!(terminations(&lab)?, 0, "nothing ended");
    Ok(())
}

#[test]
fn a_function_call_by_oid_is_held_and_a_denied_one_never_runs() -> Result<()> {
    require_root();
    let mut lab = Lab::new("hfcall")?;
    lab.start_postgres_tls()?;
    create_t(&lab, Via::Tcp)?;
    lab.sql_via(Via::Tcp, "SELECT lo_create(4242)")?;
    lab.start_agent(&[])?;
    let token = lab.add_reviewer("rita", "reviewers", None)?;
    // psql's \lo_unlink runs lo_unlink through libpq's fast path: a
    // FunctionCall message with the function's OID and no SQL text.
    let psql = lab.psql_via_spawn(
        Via::Unix,
        "postgres",
        "postgres",
        &["-c", "\\lo_unlink 4242"],
    )?;
    let (request, id) = pending(&lab, &token)?;
    assert!(
        request["statement"]
            .as_str()
            .is_some_and(|s| s.contains("FunctionCall")),
        "{request}"
    );
    lab.requests(&token, &["deny", &id.to_string()])?;
    let (ok, _, err) = finish(psql, Duration::from_secs(10))?;
    assert!(!ok, "the denied call failed: {err}");
    assert_eq!(
        lab.sql_via(
            Via::Tcp,
            "SELECT oid FROM pg_largeobject_metadata WHERE oid = 4242"
        )?,
        "4242",
        "the large object survives"
    );
    Ok(())
}

/// psql `via` a transport with `PGOPTIONS` (the StartupMessage's `options`).
fn psql_with_options(lab: &Lab, via: Via, options: &str) -> Result<std::process::Output> {
    let arg = format!("options='{options}'");
    lab.psql_via(
        via,
        "postgres",
        &format!("dbname=postgres {arg}"),
        &["-c", "SELECT 'in'"],
    )
}

#[test]
fn startup_settings_are_judged_as_the_sets_they_are() -> Result<()> {
    let (lab, _token) = hook_lab("hstartup", &[])?;
    for via in [Via::Unix, Via::Tls, Via::Tcp] {
        // Held as a statement (it turns triggers and foreign keys off), so
        // refused as a startup setting, naming qgate.
        let out = psql_with_options(&lab, via, "-c session_replication_role=replica")?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{via:?}: {err}");
        assert!(err.contains("qgate"), "{via:?}: {err}");
        // A switch that is not a setting is refused too.
        let out = psql_with_options(&lab, via, "-P")?;
        assert!(!out.status.success(), "{via:?}");
        // Harmless settings pass.
        let out = psql_with_options(&lab, via, "-c extra_float_digits=2")?;
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && said.contains("in"),
            "{via:?}: {said}"
        );
    }
    Ok(())
}
