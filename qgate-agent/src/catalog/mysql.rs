//! MariaDB's planner asked how much of its table a write changes (the
//! shipped policy's `estimated_share_above` on MySQL sessions).
//!
//! The agent finds each MariaDB/MySQL server listening on a gated MySQL port
//! in its network namespace and reads it over the server's own Unix socket
//! as `root` (Debian's `root@localhost` logs in by `unix_socket`: the agent
//! runs as root, no password is kept anywhere). The session is not on the
//! wire, so the gate never waits on itself.
//!
//! The statement is never run: `EXPLAIN FORMAT=JSON` without ANALYZE, sent
//! as a prepared statement (the server refuses a second statement in it),
//! placeholders bound to NULL, inside a transaction that is rolled back,
//! with `max_statement_time`. (Not a READ ONLY one: MariaDB refuses to
//! EXPLAIN a write there, error 1792.) MariaDB evaluates constant
//! expressions while planning, so a statement calling a function qgate does
//! not know is not planned (the gate says so and holds it).
//!
//! MariaDB's EXPLAIN of a single-table UPDATE or DELETE gives the rows the
//! server expects to *examine*, not to change: a condition no index serves
//! estimates the whole table. qgate takes the largest row count anywhere in
//! the plan, which never under-counts: an over-estimate holds a write for a
//! reviewer, it never lets one through.
use std::{
    collections::{HashMap, HashSet},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use mysql::prelude::Queryable;
use serde_json::Value;

use super::load::Share;
use crate::classify::TableName;

/// A MariaDB/MySQL server the agent gates: its TCP port and Unix socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MysqlServer {
    pub pid: u32,
    pub port: u16,
    pub socket: PathBuf,
}

/// `mariadbd`/`mysqld` processes in this network namespace listening on one
/// of `ports`, each with the Unix socket it listens on (a server without one
/// is left out: nothing to read it over).
pub fn find_servers(ports: &[u16]) -> Vec<MysqlServer> {
    use procfs::process::FDTarget;
    if ports.is_empty() {
        return Vec::new();
    }
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    let Ok(own_ns) = std::fs::metadata("/proc/self/ns/net") else {
        return Vec::new();
    };
    let servers: Vec<_> = all
        .flatten()
        .filter(|p| {
            p.stat()
                .is_ok_and(|s| s.comm == "mariadbd" || s.comm == "mysqld")
                && std::fs::metadata(format!("/proc/{}/ns/net", p.pid))
                    .is_ok_and(|ns| ns.ino() == own_ns.ino() && ns.dev() == own_ns.dev())
        })
        .collect();
    if servers.is_empty() {
        return Vec::new();
    }
    // Listening sockets of this namespace: TCP by inode → port, Unix by
    // inode → path.
    let mut tcp: HashMap<u64, u16> = HashMap::new();
    for entries in [procfs::net::tcp(), procfs::net::tcp6()]
        .into_iter()
        .flatten()
    {
        for e in entries {
            if e.state == procfs::net::TcpState::Listen {
                tcp.insert(e.inode, e.local_address.port());
            }
        }
    }
    let unix: HashMap<u64, PathBuf> = procfs::net::unix()
        .map(|v| {
            v.into_iter()
                .filter(|e| e.state == procfs::net::UnixState::UNCONNECTED)
                .filter_map(|e| Some((e.inode, e.path?)))
                .collect()
        })
        .unwrap_or_default();
    let mut found = Vec::new();
    for p in servers {
        let Ok(fds) = p.fd() else { continue };
        let mut listening: HashSet<u16> = HashSet::new();
        let mut socket = None;
        for fd in fds.flatten() {
            let FDTarget::Socket(inode) = fd.target else {
                continue;
            };
            if let Some(port) = tcp.get(&inode) {
                listening.insert(*port);
            }
            if let Some(path) = unix.get(&inode) {
                socket = Some(path.clone());
            }
        }
        let Some(socket) = socket else { continue };
        for port in ports.iter().filter(|p| listening.contains(p)) {
            found.push(MysqlServer {
                pid: p.pid as u32,
                port: *port,
                socket: socket.clone(),
            });
        }
    }
    found.sort_by_key(|s| s.port);
    found
}

/// The reader's sessions, one per server (by port), kept open between
/// estimates.
#[derive(Default)]
pub struct MysqlReader {
    sessions: HashMap<u16, (PathBuf, mysql::Conn)>,
    /// Each table's size as the planner sees it, by (port, database, table).
    sizes: HashMap<(u16, String, String), (u64, Instant)>,
}

/// A table's planned size serves this long.
const SIZE_FRESH: Duration = Duration::from_secs(30);

/// The open session to `server`, connecting if there is none (or it died).
fn session<'a>(
    sessions: &'a mut HashMap<u16, (PathBuf, mysql::Conn)>,
    server: &MysqlServer,
    timeout: Duration,
) -> Result<&'a mut mysql::Conn, String> {
    let fresh = match sessions.get_mut(&server.port) {
        Some((socket, conn)) if *socket == server.socket => conn.ping().is_err(),
        _ => true,
    };
    if fresh {
        sessions.remove(&server.port);
        let opts = mysql::OptsBuilder::new()
            .socket(Some(server.socket.to_string_lossy()))
            .prefer_socket(true)
            .user(Some("root"))
            .read_timeout(Some(timeout))
            .write_timeout(Some(timeout));
        let mut conn = mysql::Conn::new(opts)
            .map_err(|e| format!("connecting to {}: {e}", server.socket.display()))?;
        // Whole seconds or a fraction: the server's own limit, so a
        // plan that takes too long is stopped there, not only here.
        conn.query_drop(format!(
            "SET SESSION max_statement_time = {:.3}",
            timeout.as_secs_f64()
        ))
        .map_err(|e| e.to_string())?;
        sessions.insert(server.port, (server.socket.clone(), conn));
    }
    Ok(&mut sessions.get_mut(&server.port).expect("inserted above").1)
}

impl MysqlReader {
    /// The planner's estimate of the share of a written table `sql`
    /// changes, planned in `database` (the client session's) and never run.
    pub fn estimate(
        &mut self,
        server: &MysqlServer,
        database: Option<&str>,
        sql: &str,
        written: &[TableName],
        timeout: Duration,
    ) -> Result<Share, String> {
        if written.is_empty() {
            return Err("the statement names no table it writes".into());
        }
        if self.sizes.len() > 10_000 {
            self.sizes.clear();
        }
        let port = server.port;
        let conn = session(&mut self.sessions, server, timeout)?;
        let result = explain_share(conn, port, database, sql, written, &mut self.sizes);
        if result.is_err()
            && self
                .sessions
                .get_mut(&port)
                .is_some_and(|(_, c)| c.ping().is_err())
        {
            self.sessions.remove(&port);
        }
        result
    }
}

fn explain_share(
    conn: &mut mysql::Conn,
    port: u16,
    database: Option<&str>,
    sql: &str,
    written: &[TableName],
    sizes: &mut HashMap<(u16, String, String), (u64, Instant)>,
) -> Result<Share, String> {
    let fail = |e: mysql::Error| format!("MariaDB: {e}");
    match database {
        Some(db) => conn.select_db(db).map_err(fail)?,
        // No database selected: unqualified names fail to plan (as they
        // would fail to run).
        None => conn.query_drop("SELECT 1").map_err(fail)?,
    }
    // Not READ ONLY: MariaDB refuses to EXPLAIN a write in a read-only
    // transaction (error 1792). Nothing runs (no ANALYZE; statements that
    // call a function qgate does not know are not planned at all), and the
    // transaction is rolled back whatever happens.
    conn.query_drop("START TRANSACTION").map_err(fail)?;
    let result = (|| {
        let statement = conn
            .prep(format!("EXPLAIN FORMAT=JSON {sql}"))
            .map_err(fail)?;
        let nulls = vec![mysql::Value::NULL; statement.num_params() as usize];
        let plan: Option<String> = conn.exec_first(&statement, nulls).map_err(fail)?;
        let _ = conn.close(statement);
        let plan = plan.ok_or("EXPLAIN returned no plan")?;
        let plan: Value =
            serde_json::from_str(&plan).map_err(|e| format!("EXPLAIN's JSON: {e}"))?;
        let planned = rows_from_plan(&plan)?;
        // The smallest written table: the largest share.
        let mut best: Option<Share> = None;
        for table in written {
            let (db, name) = match table.parts.as_slice() {
                [name] => (
                    database.ok_or("no database selected for an unqualified table")?,
                    name.as_str(),
                ),
                [.., db, name] => (db.as_str(), name.as_str()),
                [] => continue,
            };
            let key = (port, db.to_owned(), name.to_owned());
            let of = match sizes.get(&key).filter(|(_, at)| at.elapsed() < SIZE_FRESH) {
                Some((of, _)) => *of,
                None => {
                    let of = table_rows(conn, db, name)?;
                    sizes.insert(key, (of, Instant::now()));
                    of
                }
            };
            let rows = match planned {
                Planned::Rows(rows) => rows,
                Planned::All => of,
            };
            let share = Share {
                rows,
                of,
                relation: format!("{}.{}", quote(db), quote(name)),
            };
            let fraction = |s: &Share| s.rows as f64 / s.of.max(1) as f64;
            if best.as_ref().is_none_or(|b| fraction(&share) > fraction(b)) {
                best = Some(share);
            }
        }
        best.ok_or_else(|| "the statement names no table it writes".to_string())
    })();
    let _ = conn.query_drop("ROLLBACK");
    result
}

/// The server's row count of a table (`information_schema.TABLES`, the
/// statistics the planner's estimates come from). qgate folds unquoted
/// names to lower case; MariaDB's table names are case-sensitive on Linux,
/// so the name is matched ignoring case and must match one table only
/// (exactly, if several differ only in case).
fn table_rows(conn: &mut mysql::Conn, db: &str, name: &str) -> Result<u64, String> {
    let found: Vec<(String, String, Option<u64>)> = conn
        .exec(
            "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_ROWS FROM information_schema.TABLES \
             WHERE LOWER(TABLE_SCHEMA) = LOWER(?) AND LOWER(TABLE_NAME) = LOWER(?)",
            (db, name),
        )
        .map_err(|e| format!("MariaDB: {e}"))?;
    let exact: Vec<_> = found
        .iter()
        .filter(|(d, n, _)| d == db && n == name)
        .collect();
    let row = match (found.as_slice(), exact.as_slice()) {
        ([only], _) => only,
        (_, [only]) => *only,
        ([], _) => {
            return Err(format!(
                "no table {}.{} on the server",
                quote(db),
                quote(name)
            ))
        }
        _ => {
            return Err(format!(
                "several tables are named {}.{} ignoring case",
                quote(db),
                quote(name)
            ))
        }
    };
    match row.2 {
        Some(rows) => Ok(rows.max(1)),
        None => Err(format!(
            "{}.{} has no row count (a view?)",
            quote(&row.0),
            quote(&row.1)
        )),
    }
}

/// A MariaDB identifier in backquotes.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// What a MariaDB plan says of the rows a statement touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Planned {
    /// The most rows any step of the plan examines.
    Rows(u64),
    /// Every row of the table ("Deleting all rows").
    All,
}

/// Messages a plan gives instead of a table step that mean no row is
/// touched.
const NOTHING_TOUCHED: &[&str] = &[
    "Impossible WHERE",
    "Impossible WHERE noticed after reading const tables",
    "No matching rows after partition pruning",
    "no matching row in const table",
    "No tables used",
    "Select tables optimized away",
];

/// The rows in `EXPLAIN FORMAT=JSON` output: the largest `rows` of any step
/// (what the server expects to examine, never fewer than it changes), or
/// every row for "Deleting all rows". A message qgate does not know, or a
/// plan with no step and no message, is an error (no estimate: the policy
/// fails closed).
pub fn rows_from_plan(plan: &Value) -> Result<Planned, String> {
    let mut rows: Option<f64> = None;
    let mut all = false;
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("rows", Value::Number(n)) => {
                            let n = n
                                .as_f64()
                                .filter(|n| n.is_finite() && *n >= 0.0)
                                .ok_or("a plan step with a bad row count")?;
                            rows = Some(rows.map_or(n, |r| r.max(n)));
                        }
                        ("rows", other) => {
                            return Err(format!("a plan step's rows is {other}"));
                        }
                        ("message", Value::String(m)) => {
                            if m == "Deleting all rows" {
                                all = true;
                            } else if !NOTHING_TOUCHED.contains(&m.as_str()) {
                                return Err(format!("MariaDB's plan says `{m}`"));
                            } else {
                                rows = Some(rows.unwrap_or(0.0));
                            }
                        }
                        _ => stack.push(value),
                    }
                }
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    if all {
        return Ok(Planned::All);
    }
    rows.map(|r| Planned::Rows(r.ceil() as u64))
        .ok_or_else(|| "the plan has no step with a row count".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Plans as MariaDB 10.11 printed them (`EXPLAIN FORMAT=JSON`, a
    /// 10 000-row table with an index on `k`).
    #[test]
    fn rows_are_the_most_any_step_examines() {
        let single = json!({"query_block": {"select_id": 1, "table": {
            "delete": 1, "table_name": "t", "access_type": "range",
            "possible_keys": ["PRIMARY"], "key": "PRIMARY", "rows": 99,
            "attached_condition": "t.`id` < 100"}}});
        assert_eq!(rows_from_plan(&single).unwrap(), Planned::Rows(99));
        let join = json!({"query_block": {"select_id": 1, "nested_loop": [
            {"table": {"table_name": "t2", "access_type": "ALL", "rows": 10000,
                "filtered": 1.5625}},
            {"table": {"table_name": "t", "access_type": "eq_ref", "rows": 1,
                "filtered": 100}}]}});
        assert_eq!(rows_from_plan(&join).unwrap(), Planned::Rows(10000));
        let upsert = json!({"query_block": {"select_id": 1, "temporary_table": {
            "nested_loop": [{"table": {"table_name": "t", "access_type": "ALL",
                "rows": 10000, "filtered": 100}}]}}});
        assert_eq!(rows_from_plan(&upsert).unwrap(), Planned::Rows(10000));
    }

    #[test]
    fn messages_mean_all_rows_none_or_no_estimate() {
        let all = json!({"query_block": {"select_id": 1,
            "table": {"message": "Deleting all rows"}}});
        assert_eq!(rows_from_plan(&all).unwrap(), Planned::All);
        let none = json!({"query_block": {"select_id": 1,
            "table": {"message": "Impossible WHERE"}}});
        assert_eq!(rows_from_plan(&none).unwrap(), Planned::Rows(0));
        let odd = json!({"query_block": {"select_id": 1,
            "table": {"message": "Something new"}}});
        assert!(rows_from_plan(&odd).unwrap_err().contains("Something new"));
    }

    #[test]
    fn malformed_plans_are_errors() {
        assert!(rows_from_plan(&json!({})).is_err());
        assert!(rows_from_plan(&json!({"query_block": {"table": {"rows": "many"}}})).is_err());
        assert!(rows_from_plan(&json!({"query_block": {"table": {"rows": -1}}})).is_err());
        assert!(rows_from_plan(&json!([])).is_err());
    }

    #[test]
    fn identifiers_are_backquoted() {
        assert_eq!(quote("t"), "`t`");
        assert_eq!(quote("a`b"), "`a``b`");
    }
}
