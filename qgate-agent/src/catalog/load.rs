//! Reading one database's catalog: over the server's Unix socket, as the
//! operating-system user the postmaster runs as (on a stock host `postgres`,
//! whose `peer` login needs no password and no connection string), in a
//! READ ONLY transaction.
//!
//! Only the connecting thread takes the postmaster's user id, for the
//! `connect(2)` alone (the server reads the peer's credentials then): the
//! raw `setresuid` system call changes one thread's credentials, unlike
//! libc's wrapper, which changes every thread's.
use std::{
    collections::HashMap,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use super::view::{CastRow, Depend, FunctionRow, Snapshot, TypeRow};

/// Where and as whom the agent reads a server's catalogs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    /// The server's Unix socket (`<dir>/.s.PGSQL.<port>`).
    pub socket: PathBuf,
    /// The postmaster's user and group ids, and that user's name (the role).
    pub uid: u32,
    pub gid: u32,
    pub user: String,
}

impl Server {
    /// The server a postmaster runs: its socket from `postmaster.pid`, its
    /// user from `/proc`.
    pub fn of_postmaster(pid: u32, data_dir: &Path, port: u16) -> Result<Server, String> {
        let pidfile = std::fs::read_to_string(data_dir.join("postmaster.pid"))
            .map_err(|e| format!("reading postmaster.pid: {e}"))?;
        let dir = pidfile
            .lines()
            .nth(4)
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .ok_or("the server listens on no Unix socket (postmaster.pid names none)")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("reading the postmaster's status: {e}"))?;
        let id = |key: &str| -> Option<u32> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        };
        let (uid, gid) = id("Uid:")
            .zip(id("Gid:"))
            .ok_or("the postmaster's user id is unreadable")?;
        Ok(Server {
            socket: Path::new(dir).join(format!(".s.PGSQL.{port}")),
            uid,
            gid,
            user: user_name(uid).ok_or_else(|| format!("user id {uid} has no name"))?,
        })
    }
}

fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 4096];
    // SAFETY: an all-zero passwd is a valid out-parameter for getpwuid_r.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: buffers are valid for the call; `result` points into `pwd`.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: getpwuid_r filled pw_name with a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    Some(name.to_string_lossy().into_owned())
}

/// Connects to `socket` with this thread's effective ids set to `uid`/`gid`.
fn connect_as(socket: &Path, uid: u32, gid: u32) -> std::io::Result<UnixStream> {
    const KEEP: libc::c_long = -1;
    // SAFETY: raw setres[ug]id change the calling thread's credentials only;
    // real and saved ids stay root, so the effective ones can come back.
    let switch = |uid: libc::c_long, gid: libc::c_long| unsafe {
        if gid != KEEP && libc::syscall(libc::SYS_setresgid, KEEP, gid, KEEP) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if uid != KEEP && libc::syscall(libc::SYS_setresuid, KEEP, uid, KEEP) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: geteuid/getegid cannot fail.
    let (own_uid, own_gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    if own_uid == uid {
        return UnixStream::connect(socket);
    }
    switch(uid as libc::c_long, gid as libc::c_long)?;
    let stream = UnixStream::connect(socket);
    // Back to root: the user id first (a non-root thread cannot change its group).
    // SAFETY: as above.
    let restored = unsafe {
        libc::syscall(libc::SYS_setresuid, KEEP, own_uid as libc::c_long, KEEP) == 0
            && libc::syscall(libc::SYS_setresgid, KEEP, own_gid as libc::c_long, KEEP) == 0
    };
    if !restored {
        // A thread left as another user must not go on working.
        panic!("qgate: could not restore the catalog thread's credentials");
    }
    stream
}

/// The reader's sessions, one per database, kept open between reads; the
/// runtime that drives them lives on the reader's thread.
pub struct Reader {
    runtime: tokio::runtime::Runtime,
    sessions: HashMap<String, std::sync::Arc<tokio_postgres::Client>>,
    /// The planner's size of each table written lately, by (database, table).
    sizes: HashMap<(String, String), (u64, std::time::Instant)>,
}

/// A table's planned size serves this long (it moves slowly; the row
/// estimate of each statement is asked every time).
const SIZE_FRESH: Duration = Duration::from_secs(30);

/// The planner's estimate for a write: rows changed against the size of the
/// table they are in (the largest share over every table written).
#[derive(Clone, Debug, PartialEq)]
pub struct Share {
    pub rows: u64,
    pub of: u64,
    pub relation: String,
}

impl Reader {
    pub fn new() -> std::io::Result<Reader> {
        Ok(Reader {
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            sessions: HashMap::new(),
            sizes: HashMap::new(),
        })
    }

    /// The open session to `database`, connecting with `token` as its
    /// `application_name` if there is none (the gate lets that session go).
    fn session(
        &mut self,
        server: &Server,
        database: &str,
        token: &dyn Fn() -> String,
    ) -> Result<std::sync::Arc<tokio_postgres::Client>, String> {
        if let Some(client) = self.sessions.get(database).filter(|c| !c.is_closed()) {
            return Ok(std::sync::Arc::clone(client));
        }
        let stream = connect_as(&server.socket, server.uid, server.gid)
            .map_err(|e| format!("connecting to {}: {e}", server.socket.display()))?;
        stream.set_nonblocking(true).map_err(|e| e.to_string())?;
        let application_name = token();
        let connected = self.runtime.block_on(async {
            let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
            let mut config = tokio_postgres::Config::new();
            config
                .user(&server.user)
                .dbname(database)
                .application_name(&application_name);
            let work = config.connect_raw(stream, tokio_postgres::NoTls);
            match tokio::time::timeout(CONNECT_TIMEOUT, work).await {
                Ok(r) => r.map_err(|e| describe(&e)),
                Err(_) => Err(format!("no answer within {CONNECT_TIMEOUT:?}")),
            }
        })?;
        let (client, connection) = connected;
        self.runtime.spawn(connection);
        let client = std::sync::Arc::new(client);
        self.sessions
            .insert(database.to_owned(), std::sync::Arc::clone(&client));
        Ok(client)
    }

    /// Reads `database`'s catalog.
    pub fn snapshot(
        &mut self,
        server: &Server,
        database: &str,
        token: &dyn Fn() -> String,
        timeout: Duration,
    ) -> Result<Snapshot, String> {
        let client = self.session(server, database, token)?;
        let result = self.runtime.block_on(async {
            match tokio::time::timeout(timeout, read_snapshot(&client)).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        if result.is_err() {
            self.sessions.remove(database);
        }
        result
    }

    /// The planner's estimate for `sql` (one UPDATE, DELETE, MERGE or
    /// INSERT … ON CONFLICT, possibly inside WITH), planned in `database`
    /// and never run: `EXPLAIN` without ANALYZE in a READ ONLY transaction,
    /// sent over the extended protocol (one statement only). A statement with
    /// parameters (`$1`) is planned generically (`PREPARE` with
    /// `plan_cache_mode = force_generic_plan`, then `EXPLAIN EXECUTE` with
    /// NULLs), the plan every execution may get.
    pub fn estimate(
        &mut self,
        server: &Server,
        database: &str,
        sql: &str,
        params: usize,
        token: &dyn Fn() -> String,
        timeout: Duration,
    ) -> Result<Share, String> {
        let client = self.session(server, database, token)?;
        if self.sizes.len() > 10_000 {
            self.sizes.clear();
        }
        let sizes = &mut self.sizes;
        let result = self.runtime.block_on(async {
            let work = explain_share(&client, database, sql, params, timeout, sizes);
            match tokio::time::timeout(timeout, work).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {timeout:?}")),
            }
        });
        if let Err(e) = &result {
            if client.is_closed() || e.starts_with("no answer") {
                self.sessions.remove(database);
            }
        }
        result
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

async fn explain_share(
    client: &tokio_postgres::Client,
    database: &str,
    sql: &str,
    params: usize,
    timeout: Duration,
    sizes: &mut HashMap<(String, String), (u64, std::time::Instant)>,
) -> Result<Share, String> {
    let fail = |e: tokio_postgres::Error| describe(&e);
    let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
    client
        .batch_execute(&format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {millis}; \
             SET LOCAL lock_timeout = {millis}; SET LOCAL plan_cache_mode = force_generic_plan"
        ))
        .await
        .map_err(fail)?;
    let result = async {
        let explain = if params == 0 {
            format!("EXPLAIN (FORMAT JSON, VERBOSE) {sql}")
        } else {
            // Extended protocol: the server refuses a second statement.
            client
                .execute(format!("PREPARE qgate_estimate AS {sql}").as_str(), &[])
                .await
                .map_err(fail)?;
            let nulls = vec!["NULL"; params].join(", ");
            format!("EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE qgate_estimate({nulls})")
        };
        let row = client
            .query_one(explain.as_str(), &[])
            .await
            .map_err(fail)?;
        let plan: serde_json::Value = row.try_get(0).map_err(fail)?;
        let writes = written_rows(&plan)?;
        let mut best: Option<Share> = None;
        for (relation, rows) in writes {
            let key = (database.to_owned(), relation.clone());
            if let Some((of, _)) = sizes.get(&key).filter(|(_, at)| at.elapsed() < SIZE_FRESH) {
                keep_largest(
                    &mut best,
                    Share {
                        rows,
                        of: *of,
                        relation,
                    },
                );
                continue;
            }
            let size = client
                .query_one(
                    format!("EXPLAIN (FORMAT JSON) SELECT 1 FROM {relation}").as_str(),
                    &[],
                )
                .await
                .map_err(fail)?;
            let size: serde_json::Value = size.try_get(0).map_err(fail)?;
            let of = size
                .get(0)
                .and_then(|e| e.get("Plan"))
                .and_then(|p| p.get("Plan Rows"))
                .and_then(serde_json::Value::as_f64)
                .ok_or("no table size in the plan")?
                .max(1.0) as u64;
            sizes.insert(key, (of, std::time::Instant::now()));
            keep_largest(&mut best, Share { rows, of, relation });
        }
        best.ok_or_else(|| "the plan changes no existing rows".to_string())
    }
    .await;
    let _ = client.batch_execute("ROLLBACK; DEALLOCATE ALL").await;
    result
}

/// Keeps in `best` the share that is the larger part of its table.
fn keep_largest(best: &mut Option<Share>, share: Share) {
    let fraction = |s: &Share| s.rows as f64 / s.of.max(1) as f64;
    if best.as_ref().is_none_or(|b| fraction(&share) > fraction(b)) {
        *best = Some(share);
    }
}

/// Each ModifyTable that changes existing rows (UPDATE, DELETE, MERGE, or
/// INSERT with ON CONFLICT DO UPDATE) in a VERBOSE JSON plan: its table
/// (quoted, schema-qualified) and the rows its input produces.
pub fn written_rows(plan: &serde_json::Value) -> Result<Vec<(String, u64)>, String> {
    let top = plan
        .get(0)
        .and_then(|e| e.get("Plan"))
        .ok_or("no [0].Plan in the EXPLAIN output")?;
    let mut out = Vec::new();
    let mut stack = vec![top];
    while let Some(node) = stack.pop() {
        let children = node
            .get("Plans")
            .and_then(serde_json::Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        stack.extend(children);
        if node.get("Node Type").and_then(serde_json::Value::as_str) != Some("ModifyTable") {
            continue;
        }
        let operation = node.get("Operation").and_then(serde_json::Value::as_str);
        let changes_existing = match operation {
            Some("Update" | "Delete" | "Merge") => true,
            Some("Insert") => {
                node.get("Conflict Resolution")
                    .and_then(serde_json::Value::as_str)
                    == Some("UPDATE")
            }
            _ => false,
        };
        if !changes_existing {
            continue;
        }
        let name = |key: &str| node.get(key).and_then(serde_json::Value::as_str);
        let (Some(schema), Some(relation)) = (name("Schema"), name("Relation Name")) else {
            return Err("a ModifyTable without its table in the plan".into());
        };
        let rows = children
            .iter()
            .filter_map(|c| c.get("Plan Rows").and_then(serde_json::Value::as_f64))
            .fold(0.0, f64::max);
        out.push((
            format!("{}.{}", quote_ident(schema), quote_ident(relation)),
            rows.ceil() as u64,
        ));
    }
    Ok(out)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn describe(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

const FUNCTIONS: &str = "SELECT p.oid::int8, n.nspname::text, p.proname::text, \
    CASE WHEN p.oid >= 16384 THEN pg_catalog.pg_get_function_identity_arguments(p.oid) ELSE '' END, \
    (p.pronargs - p.pronargdefaults)::int2 \
    FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace";
const OPERATORS: &str =
    "SELECT oid::int8, oprname::text FROM pg_catalog.pg_operator WHERE oid >= 16384";
const TYPES: &str =
    "SELECT oid::int8, typname::text, typrelid <> 0 FROM pg_catalog.pg_type WHERE oid >= 16384";
const CASTS: &str = "SELECT c.oid::int8, s.typname::text, t.typname::text, \
    pg_catalog.format_type(c.castsource, NULL), pg_catalog.format_type(c.casttarget, NULL), \
    c.castcontext::text FROM pg_catalog.pg_cast c \
    JOIN pg_catalog.pg_type s ON s.oid = c.castsource JOIN pg_catalog.pg_type t ON t.oid = c.casttarget \
    WHERE c.oid >= 16384";
const RELATIONS: &str = "SELECT c.oid::int8, n.nspname::text, c.relname::text \
    FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.oid >= 16384 AND c.relkind IN ('r', 'v', 'm', 'f', 'p')";
const DEPENDS: &str =
    "SELECT classid::int8, objid::int8, objsubid, refclassid::int8, refobjid::int8 \
    FROM pg_catalog.pg_depend WHERE refobjid >= 16384 AND deptype IN ('n', 'a', 'i')";
const RULES: &str =
    "SELECT oid::int8, ev_class::int8, ev_type::text FROM pg_catalog.pg_rewrite WHERE oid >= 16384";
const TRIGGERS: &str =
    "SELECT oid::int8, tgrelid::int8 FROM pg_catalog.pg_trigger WHERE NOT tgisinternal";
const DEFAULTS: &str = "SELECT oid::int8, adrelid::int8 FROM pg_catalog.pg_attrdef";
const CONSTRAINTS: &str = "SELECT oid::int8, conrelid::int8, contypid::int8 \
    FROM pg_catalog.pg_constraint WHERE oid >= 16384";
const POLICIES: &str = "SELECT oid::int8, polrelid::int8 FROM pg_catalog.pg_policy";
const INDEXES: &str = "SELECT indexrelid::int8, indrelid::int8 FROM pg_catalog.pg_index \
    WHERE indexrelid >= 16384";

async fn read_snapshot(client: &tokio_postgres::Client) -> Result<Snapshot, String> {
    let fail = |e: tokio_postgres::Error| describe(&e);
    client
        .batch_execute("BEGIN TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await
        .map_err(fail)?;
    let oid = |row: &tokio_postgres::Row, i: usize| -> u32 { row.get::<_, i64>(i) as u32 };
    let pairs = |rows: Vec<tokio_postgres::Row>| -> Vec<(u32, u32)> {
        rows.iter().map(|r| (oid(r, 0), oid(r, 1))).collect()
    };
    let q = |sql: &'static str| client.query(sql, &[]);
    let mut s = Snapshot::default();
    for r in q(FUNCTIONS).await.map_err(fail)? {
        s.functions.push(FunctionRow {
            oid: oid(&r, 0),
            schema: r.get(1),
            name: r.get(2),
            args: r.get(3),
            required_args: r.get(4),
        });
    }
    s.operators = q(OPERATORS)
        .await
        .map_err(fail)?
        .iter()
        .map(|r| (oid(r, 0), r.get(1)))
        .collect();
    for r in q(TYPES).await.map_err(fail)? {
        s.types.push(TypeRow {
            oid: oid(&r, 0),
            name: r.get(1),
            row_type: r.get(2),
        });
    }
    for r in q(CASTS).await.map_err(fail)? {
        let context: String = r.get(5);
        let context = context.chars().next().unwrap_or('e');
        // Both the catalog name (`int4`) and the SQL one (`integer`).
        for (source, target) in [(1, 2), (3, 4)] {
            s.casts.push(CastRow {
                oid: oid(&r, 0),
                source: r.get(source),
                target: r.get(target),
                context,
            });
        }
    }
    s.relations = q(RELATIONS)
        .await
        .map_err(fail)?
        .iter()
        .map(|r| (oid(r, 0), r.get(1), r.get(2)))
        .collect();
    s.depends = q(DEPENDS)
        .await
        .map_err(fail)?
        .iter()
        .map(|r| Depend {
            classid: oid(r, 0),
            objid: oid(r, 1),
            objsubid: r.get(2),
            refclassid: oid(r, 3),
            refobjid: oid(r, 4),
        })
        .collect();
    s.rules = q(RULES)
        .await
        .map_err(fail)?
        .iter()
        .map(|r| {
            let ev: String = r.get(2);
            (oid(r, 0), oid(r, 1), ev.chars().next().unwrap_or('1'))
        })
        .collect();
    s.triggers = pairs(q(TRIGGERS).await.map_err(fail)?);
    s.defaults = pairs(q(DEFAULTS).await.map_err(fail)?);
    s.constraints = q(CONSTRAINTS)
        .await
        .map_err(fail)?
        .iter()
        .map(|r| (oid(r, 0), oid(r, 1), oid(r, 2)))
        .collect();
    s.policies = pairs(q(POLICIES).await.map_err(fail)?);
    s.indexes = pairs(q(INDEXES).await.map_err(fail)?);
    let _ = client.batch_execute("ROLLBACK").await;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_are_read_from_every_modify_table() {
        let plan = json!([{"Plan": {
            "Node Type": "CTE Scan", "Plan Rows": 1,
            "Plans": [
                {"Node Type": "ModifyTable", "Operation": "Delete", "Schema": "public",
                 "Relation Name": "t", "Plan Rows": 0,
                 "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 753.0}]},
                {"Node Type": "ModifyTable", "Operation": "Insert", "Schema": "public",
                 "Relation Name": "log", "Plan Rows": 0,
                 "Plans": [{"Node Type": "Result", "Plan Rows": 1.0}]},
                {"Node Type": "ModifyTable", "Operation": "Insert", "Schema": "a\"b",
                 "Relation Name": "u", "Conflict Resolution": "UPDATE", "Plan Rows": 0,
                 "Plans": [{"Node Type": "Seq Scan", "Plan Rows": 10.0}]}
            ]
        }}]);
        let mut writes = written_rows(&plan).unwrap();
        writes.sort();
        assert_eq!(
            writes,
            vec![
                ("\"a\"\"b\".\"u\"".to_string(), 10),
                ("\"public\".\"t\"".to_string(), 753)
            ],
            "a plain INSERT changes no existing row"
        );
    }

    #[test]
    fn plans_without_their_tables_are_errors() {
        let plan =
            json!([{"Plan": {"Node Type": "ModifyTable", "Operation": "Update", "Plans": []}}]);
        assert!(written_rows(&plan).is_err());
        assert!(written_rows(&json!({})).is_err());
    }
}
