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

/// What of a MariaDB server's catalog runs code a statement's text does
/// not show: stored and loadable functions (a view may call one, and a
/// plain `SELECT * FROM v` runs it) and triggers (a write to their table
/// runs them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MysqlCatalog {
    /// Views that call a stored or loadable function, by (database, name),
    /// lower case. The `sys` schema's functions, which the server's own
    /// install creates, do not count.
    pub views: HashSet<(String, String)>,
    /// Tables with triggers, by (database, name), lower case.
    pub triggers: HashSet<(String, String)>,
    /// Why a new session of this server may split text differently from
    /// MariaDB's default `sql_mode` and its login character set, from the
    /// server's global settings ([`server_lexing`]); `None`: it does not.
    pub lexing: Option<String>,
}

/// Why sessions of a server whose global `sql_mode` and `init_connect` are
/// these may read statement text differently from how qgate splits it:
/// `ANSI_QUOTES` makes `"…"` a name (a backslash no longer escapes in it),
/// `NO_BACKSLASH_ESCAPES` ends a string at a backslash-quote, and
/// `init_connect` runs at every login (except a SUPER user's) whatever it
/// sets: `SET NAMES gbk`, a `sql_mode`. `None` when none of this holds.
pub fn server_lexing(sql_mode: &str, init_connect: &str) -> Option<String> {
    let modes: Vec<&str> = sql_mode
        .split(',')
        .map(str::trim)
        .filter(|m| {
            m.eq_ignore_ascii_case("ANSI_QUOTES")
                || m.eq_ignore_ascii_case("NO_BACKSLASH_ESCAPES")
                // ANSI and ORACLE include ANSI_QUOTES.
                || m.eq_ignore_ascii_case("ANSI")
                || m.eq_ignore_ascii_case("ORACLE")
        })
        .collect();
    if !modes.is_empty() {
        return Some(format!(
            "the server's global sql_mode has {}",
            modes.join(", ")
        ));
    }
    let init = init_connect.trim();
    if !init.is_empty() {
        let shown: String = init.chars().take(60).collect();
        return Some(format!(
            "the server's init_connect runs `{shown}` at every login (it may set sql_mode or the character set)"
        ));
    }
    None
}

impl MysqlCatalog {
    /// What `statement` may run that its text does not show, in a session
    /// whose database is `database`: each a reason for the `user_code` fact.
    pub fn user_code(
        &self,
        statement: &crate::classify::StatementFacts,
        database: Option<&str>,
    ) -> Vec<String> {
        let key = |t: &TableName| -> Option<(String, String)> {
            let (db, name) = resolve(t, database).ok()?;
            Some((db.to_lowercase(), name.to_lowercase()))
        };
        let mut runs = Vec::new();
        for t in statement.tables() {
            match key(t) {
                Some(k) if self.views.contains(&k) => runs.push(format!(
                    "it reads the view {}.{}, which calls a stored function",
                    quote(&k.0),
                    quote(&k.1)
                )),
                Some(_) => {}
                None if !self.views.is_empty() => runs.push(format!(
                    "`{}` may be a view calling a stored function (no database selected)",
                    t.parts.join(".")
                )),
                None => {}
            }
        }
        for t in &statement.tables_written {
            match key(t) {
                Some(k) if self.triggers.contains(&k) => runs.push(format!(
                    "it writes {}.{}, whose triggers run",
                    quote(&k.0),
                    quote(&k.1)
                )),
                Some(_) => {}
                None if !self.triggers.is_empty() => runs.push(format!(
                    "`{}` may have triggers (no database selected)",
                    t.parts.join(".")
                )),
                None => {}
            }
        }
        runs
    }
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
        // `eq_range_index_dive_limit = 0`: an IN list of any length is
        // estimated by index dives, not by the average rows per key (a
        // list of 201 values one of which is 90 % of the table).
        conn.query_drop(format!(
            "SET SESSION max_statement_time = {:.3}, eq_range_index_dive_limit = 0",
            timeout.as_secs_f64()
        ))
        .map_err(|e| e.to_string())?;
        sessions.insert(server.port, (server.socket.clone(), conn));
    }
    Ok(&mut sessions.get_mut(&server.port).expect("inserted above").1)
}

impl MysqlReader {
    /// The server's functions, views and triggers (see [`MysqlCatalog`]).
    pub fn catalog(
        &mut self,
        server: &MysqlServer,
        timeout: Duration,
    ) -> Result<MysqlCatalog, String> {
        let fail = |e: mysql::Error| format!("MariaDB: {e}");
        let conn = session(&mut self.sessions, server, timeout)?;
        let functions: Vec<(String, String)> = conn
            .query(
                "SELECT ROUTINE_SCHEMA, ROUTINE_NAME FROM information_schema.ROUTINES \
                 WHERE ROUTINE_TYPE = 'FUNCTION' AND ROUTINE_SCHEMA <> 'sys'",
            )
            .map_err(fail)?;
        let loadable: Vec<String> = conn.query("SELECT name FROM mysql.func").map_err(fail)?;
        let views: Vec<(String, String, String)> = conn
            .query("SELECT TABLE_SCHEMA, TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS")
            .map_err(fail)?;
        // MariaDB keeps a view's definition with names quoted: a call reads
        // `` `db`.`f`( ``, or `` `f`( `` for a function of the view's own
        // database; a loadable function's `` `f`( `` or `f(`. Matched by
        // name alone (a function of another database with the same name
        // counts too: more is held, never less).
        let calls: Vec<String> = functions
            .iter()
            .map(|(_, f)| format!("`{}`(", f.to_lowercase()))
            .chain(loadable.iter().flat_map(|f| {
                let f = f.to_lowercase();
                [format!("`{f}`("), format!("{f}(")]
            }))
            .collect();
        let views: Vec<(String, String)> = views
            .into_iter()
            .filter(|(_, _, definition)| {
                let definition = definition.to_lowercase();
                calls.iter().any(|c| definition.contains(c))
            })
            .map(|(d, n, _)| (d, n))
            .collect();
        let triggers: Vec<(String, String)> = conn
            .query(
                "SELECT DISTINCT EVENT_OBJECT_SCHEMA, EVENT_OBJECT_TABLE \
                 FROM information_schema.TRIGGERS",
            )
            .map_err(fail)?;
        let settings: Option<(String, Option<String>)> = conn
            .query_first("SELECT @@GLOBAL.sql_mode, @@GLOBAL.init_connect")
            .map_err(fail)?;
        let (sql_mode, init_connect) = settings.ok_or("MariaDB returned no global settings")?;
        let lower = |(d, n): (String, String)| (d.to_lowercase(), n.to_lowercase());
        Ok(MysqlCatalog {
            views: views.into_iter().map(lower).collect(),
            triggers: triggers.into_iter().map(lower).collect(),
            lexing: server_lexing(&sql_mode, init_connect.as_deref().unwrap_or("")),
        })
    }

    /// The planner's estimate of the share of a written table `sql`
    /// changes, planned in `database` (the client session's) and never run.
    pub fn estimate(
        &mut self,
        server: &MysqlServer,
        database: Option<&str>,
        sql: &str,
        written: &[TableName],
        collation: Option<u8>,
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
        let result = set_collation(conn, collation, sql)
            .and_then(|()| explain_share(conn, port, database, sql, written, &mut self.sizes));
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

/// Compares text as the client's session does: its login's collation (a
/// literal's comparisons depend on it: `'B' < 'a'` under `utf8mb4_bin`).
/// A collation the server does not know, or non-ASCII text in a character
/// set other than UTF-8 (qgate sends UTF-8), is not estimated.
fn set_collation(conn: &mut mysql::Conn, collation: Option<u8>, sql: &str) -> Result<(), String> {
    let Some(id) = collation else {
        return Err("the session's collation is not known".into());
    };
    let found: Option<(String, String)> = conn
        .exec_first(
            "SELECT COLLATION_NAME, CHARACTER_SET_NAME FROM information_schema.COLLATIONS \
             WHERE ID = ?",
            (id,),
        )
        .map_err(|e| format!("MariaDB: {e}"))?;
    let Some((name, charset)) = found else {
        return Err(format!(
            "the session's collation {id} is not one the server knows"
        ));
    };
    if !sql.is_ascii() && !charset.starts_with("utf8") {
        return Err(format!(
            "non-ASCII text in the session's character set {charset}"
        ));
    }
    conn.query_drop(format!(
        "SET NAMES {} COLLATE {}",
        quote(&charset),
        quote(&name)
    ))
    .map_err(|e| format!("MariaDB: {e}"))
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
    // Every written table resolved (the judge reads no other), and none
    // that runs more than the write itself: a trigger, or a foreign key
    // that cascades onto another table.
    for table in written {
        let (db, name) = resolve(table, database)?;
        let (schema, exact, _) = table_rows(conn, db, name)?;
        runs_more(conn, &schema, &exact)?;
    }
    if let Some(db) = database {
        conn.select_db(db).map_err(fail)?;
    }
    // Not READ ONLY: MariaDB refuses to EXPLAIN a write in a read-only
    // transaction (error 1792). Nothing runs (no ANALYZE; statements that
    // call a function qgate does not know are not planned at all), and the
    // transaction is rolled back whatever happens.
    match shape(sql)? {
        Shape::Planned => {}
        Shape::Keyed(keyed) => return keyed_share(conn, database, written, &keyed, sizes, port),
        Shape::Values { rows, replace } => {
            return values_share(conn, database, written, rows, replace, sizes, port)
        }
    }
    conn.query_drop("START TRANSACTION").map_err(fail)?;
    let result = (|| {
        let statement = conn
            .prep(format!("EXPLAIN FORMAT=JSON {sql}"))
            .map_err(fail)?;
        if statement.num_params() != 0 {
            // A parameter the text hid from qgate's reading (inside an
            // executable comment): never planned with a stand-in value.
            let _ = conn.close(statement);
            return Err("parameters qgate did not see in the text".into());
        }
        let plan: Option<String> = conn.exec_first(&statement, ()).map_err(fail)?;
        let _ = conn.close(statement);
        let plan = plan.ok_or("EXPLAIN returned no plan")?;
        let plan: Value =
            serde_json::from_str(&plan).map_err(|e| format!("EXPLAIN's JSON: {e}"))?;
        let planned = rows_from_plan(&plan)?;
        // The smallest written table: the largest share.
        let mut best: Option<Share> = None;
        for table in written {
            let (db, name) = resolve(table, database)?;
            let key = (port, db.to_owned(), name.to_owned());
            let of = match sizes.get(&key).filter(|(_, at)| at.elapsed() < SIZE_FRESH) {
                Some((of, _)) => *of,
                None => {
                    let (_, _, of) = table_rows(conn, db, name)?;
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

/// The share of a prepared write whose parameters (`?`) are not known when
/// it is judged: at most one row if its condition pins a unique key of
/// integer columns (`id = ?`, alone or ANDed with anything); otherwise no
/// estimate. (Binding NULL or a sample value would plan another statement
/// than the one that runs: `id > ?` is 0 rows with NULL. A string or
/// decimal key is left out: MariaDB compares it with a number parameter as
/// numbers, and `email = 0` matches every email not starting with a digit.)
fn keyed_share(
    conn: &mut mysql::Conn,
    database: Option<&str>,
    written: &[TableName],
    keyed: &[String],
    sizes: &mut HashMap<(u16, String, String), (u64, Instant)>,
    port: u16,
) -> Result<Share, String> {
    let [table] = written else {
        return Err("a prepared write to several tables: its parameters are not known".into());
    };
    let (db, name) = resolve(table, database)?;
    let (schema, exact, of) = table_rows(conn, db, name)?;
    sizes.insert((port, db.to_owned(), name.to_owned()), (of, Instant::now()));
    let keys = unique_keys(conn, &schema, &exact)?;
    let integer = |t: &str| {
        matches!(
            t.to_ascii_lowercase().as_str(),
            "tinyint" | "smallint" | "mediumint" | "int" | "bigint"
        )
    };
    let pinned = keys.values().any(|key| {
        key.iter().all(|(column, data_type)| {
            integer(data_type) && keyed.iter().any(|k| k.eq_ignore_ascii_case(column))
        })
    });
    if !pinned {
        return Err(format!(
            "a prepared write's parameters are only known when it runs, and its condition \
             pins no unique integer key of {}.{} with `column = ?`",
            quote(&schema),
            quote(&exact)
        ));
    }
    Ok(Share {
        rows: 1,
        of,
        relation: format!("{}.{}", quote(&schema), quote(&exact)),
    })
}

/// The share of an `INSERT … VALUES … ON DUPLICATE KEY UPDATE` (each row
/// updates at most one existing row) or a `REPLACE … VALUES` (each row
/// deletes at most one existing row per unique key): MariaDB's EXPLAIN
/// gives no row count for them.
fn values_share(
    conn: &mut mysql::Conn,
    database: Option<&str>,
    written: &[TableName],
    rows: u64,
    replace: bool,
    sizes: &mut HashMap<(u16, String, String), (u64, Instant)>,
    port: u16,
) -> Result<Share, String> {
    let [table] = written else {
        return Err("an insert into several tables".into());
    };
    let (db, name) = resolve(table, database)?;
    let (schema, exact, of) = table_rows(conn, db, name)?;
    sizes.insert((port, db.to_owned(), name.to_owned()), (of, Instant::now()));
    let per_row = if replace {
        unique_keys(conn, &schema, &exact)?.len().max(1) as u64
    } else {
        1
    };
    Ok(Share {
        rows: rows.saturating_mul(per_row),
        of,
        relation: format!("{}.{}", quote(&schema), quote(&exact)),
    })
}

/// Each unique index of a table: its columns with their data types.
fn unique_keys(
    conn: &mut mysql::Conn,
    schema: &str,
    table: &str,
) -> Result<HashMap<String, Vec<(String, String)>>, String> {
    let columns: Vec<(String, String, String)> = conn
        .exec(
            "SELECT s.INDEX_NAME, s.COLUMN_NAME, c.DATA_TYPE \
             FROM information_schema.STATISTICS s JOIN information_schema.COLUMNS c \
               ON c.TABLE_SCHEMA = s.TABLE_SCHEMA AND c.TABLE_NAME = s.TABLE_NAME \
              AND c.COLUMN_NAME = s.COLUMN_NAME \
             WHERE s.TABLE_SCHEMA = ? AND s.TABLE_NAME = ? AND s.NON_UNIQUE = 0",
            (schema, table),
        )
        .map_err(|e| format!("MariaDB: {e}"))?;
    let mut keys: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (index, column, data_type) in columns {
        keys.entry(index).or_default().push((column, data_type));
    }
    Ok(keys)
}

/// A written table's database and name (an unqualified one is in the
/// session's database).
fn resolve<'a>(
    table: &'a TableName,
    database: Option<&'a str>,
) -> Result<(&'a str, &'a str), String> {
    match table.parts.as_slice() {
        [name] => Ok((
            database.ok_or("no database selected for an unqualified table")?,
            name.as_str(),
        )),
        [.., db, name] => Ok((db.as_str(), name.as_str())),
        [] => Err("a table without a name".into()),
    }
}

/// How a write's rows are estimated.
#[derive(Debug, PartialEq, Eq)]
pub enum Shape {
    /// By MariaDB's EXPLAIN (no parameters).
    Planned,
    /// A single-table UPDATE or DELETE with `?` parameters: the columns its
    /// condition compares with a parameter by `=` at its top level
    /// (`a = ? AND b = ? AND …`).
    Keyed(Vec<String>),
    /// `INSERT … VALUES … ON DUPLICATE KEY UPDATE` or `REPLACE … VALUES`:
    /// how many rows it inserts.
    Values { rows: u64, replace: bool },
}

/// See [`Shape`]. An error for any other statement with parameters
/// (nothing to estimate it by).
pub fn shape(sql: &str) -> Result<Shape, String> {
    use sqlparser::ast::{
        visit_expressions, BinaryOperator, Expr, FromTable, OnInsert, SetExpr, Statement, Value,
    };
    use std::ops::ControlFlow;
    let parsed = sqlparser::parser::Parser::parse_sql(&sqlparser::dialect::MySqlDialect {}, sql)
        .map_err(|e| format!("qgate cannot parse it to estimate it: {e}"))?;
    let [statement] = parsed.as_slice() else {
        return Err(format!("{} statements in one text", parsed.len()));
    };
    // A subquery is evaluated while planning when it is constant, with the
    // estimator's privileges (root's), and its value decides the
    // estimate: it could tell the client what it may not read, or wait on
    // a lock. Not planned.
    let tokens = sqlparser::tokenizer::Tokenizer::new(&sqlparser::dialect::MySqlDialect {}, sql)
        .tokenize()
        .map_err(|e| format!("qgate cannot split it to estimate it: {e}"))?;
    if tokens.iter().any(|t| {
        matches!(t, sqlparser::tokenizer::Token::Word(w)
            if w.keyword == sqlparser::keywords::Keyword::SELECT && w.quote_style.is_none())
    }) {
        return Err("a subquery: its value while planning would decide the estimate".into());
    }
    let is_placeholder =
        |e: &Expr| matches!(e, Expr::Value(v) if matches!(v.value, Value::Placeholder(_)));
    let mut placeholders = 0;
    let _ = visit_expressions(statement, |e| {
        if is_placeholder(e) {
            placeholders += 1;
        }
        ControlFlow::<()>::Continue(())
    });
    if sql.contains("/*") || sql.contains("||") || sql.contains("&&") {
        // Text MariaDB may read otherwise than sqlparser (an executable
        // comment runs; `||` is OR): only MariaDB's own EXPLAIN judges it.
        return if placeholders == 0 {
            Ok(Shape::Planned)
        } else {
            Err("a prepared statement with comments or `||`/`&&` is not estimated".into())
        };
    }
    if let Statement::Insert(insert) = statement {
        let upsert = matches!(insert.on, Some(OnInsert::DuplicateKeyUpdate(_)));
        if upsert || insert.replace_into {
            let rows = match &insert.source {
                None if !insert.assignments.is_empty() => Some(1),
                Some(query) => match query.body.as_ref() {
                    SetExpr::Values(values) if query.with.is_none() => {
                        Some(values.rows.len() as u64)
                    }
                    _ => None,
                },
                None => None,
            };
            if let Some(rows) = rows {
                return Ok(Shape::Values {
                    rows,
                    replace: insert.replace_into,
                });
            }
        }
    }
    if placeholders == 0 {
        return Ok(Shape::Planned);
    }
    let single =
        |from: &[sqlparser::ast::TableWithJoins]| matches!(from, [only] if only.joins.is_empty());
    let selection = match statement {
        Statement::Delete(d)
            if d.tables.is_empty()
                && d.using.is_none()
                && matches!(&d.from, FromTable::WithFromKeyword(f) | FromTable::WithoutKeyword(f)
                    if single(f)) =>
        {
            d.selection.as_ref()
        }
        Statement::Update(u) if u.table.joins.is_empty() && u.from.is_none() => {
            u.selection.as_ref()
        }
        _ => return Err("a prepared statement's parameters are only known when it runs".into()),
    };
    let mut conjuncts = Vec::new();
    let mut stack: Vec<&Expr> = selection.into_iter().collect();
    while let Some(e) = stack.pop() {
        match e {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                stack.push(left);
                stack.push(right);
            }
            Expr::Nested(inner) => stack.push(inner),
            other => conjuncts.push(other),
        }
    }
    let column = |e: &Expr| match e {
        Expr::Identifier(i) => Some(i.value.to_lowercase()),
        Expr::CompoundIdentifier(parts) => parts.last().map(|i| i.value.to_lowercase()),
        _ => None,
    };
    let operand = |e: &Expr| matches!(e, Expr::Value(_));
    // Every conjunct a column compared with a parameter or a literal:
    // nothing else, so no operator MariaDB binds otherwise than sqlparser
    // (`||` and XOR are OR-like to MariaDB) can sit between them.
    let mut pinned = Vec::new();
    for c in conjuncts {
        let Expr::BinaryOp { left, op, right } = c else {
            return Ok(Shape::Keyed(Vec::new()));
        };
        let comparison = matches!(
            op,
            BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq
        );
        let (col, other) = match (column(left), column(right)) {
            (Some(col), None) => (col, right),
            (None, Some(col)) => (col, left),
            _ => return Ok(Shape::Keyed(Vec::new())),
        };
        if !comparison || !operand(other) {
            return Ok(Shape::Keyed(Vec::new()));
        }
        if *op == BinaryOperator::Eq && is_placeholder(other) {
            pinned.push(col);
        }
    }
    Ok(Shape::Keyed(pinned))
}

/// The server's row count of a table (`information_schema.TABLES`, the
/// statistics the planner's estimates come from). qgate folds unquoted
/// names to lower case; MariaDB's table names are case-sensitive on Linux,
/// so the name is matched ignoring case and must match one table only
/// (exactly, if several differ only in case).
fn table_rows(
    conn: &mut mysql::Conn,
    db: &str,
    name: &str,
) -> Result<(String, String, u64), String> {
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
        Some(rows) => Ok((row.0.clone(), row.1.clone(), rows.max(1))),
        None => Err(format!(
            "{}.{} has no row count (a view?)",
            quote(&row.0),
            quote(&row.1)
        )),
    }
}

/// Why a write to this table does more than its own rows show: a trigger
/// on it, or a foreign key that cascades (or sets NULL or a default) from
/// it onto another table.
fn runs_more(conn: &mut mysql::Conn, schema: &str, table: &str) -> Result<(), String> {
    let triggers: Option<String> = conn
        .exec_first(
            "SELECT TRIGGER_NAME FROM information_schema.TRIGGERS \
             WHERE EVENT_OBJECT_SCHEMA = ? AND EVENT_OBJECT_TABLE = ? LIMIT 1",
            (schema, table),
        )
        .map_err(|e| format!("MariaDB: {e}"))?;
    if let Some(trigger) = triggers {
        return Err(format!(
            "{}.{} has a trigger ({trigger}), which may change more rows",
            quote(schema),
            quote(table)
        ));
    }
    let cascades: Option<String> = conn
        .exec_first(
            "SELECT CONSTRAINT_NAME FROM information_schema.REFERENTIAL_CONSTRAINTS \
             WHERE UNIQUE_CONSTRAINT_SCHEMA = ? AND REFERENCED_TABLE_NAME = ? \
               AND (DELETE_RULE NOT IN ('RESTRICT', 'NO ACTION') \
                 OR UPDATE_RULE NOT IN ('RESTRICT', 'NO ACTION')) LIMIT 1",
            (schema, table),
        )
        .map_err(|e| format!("MariaDB: {e}"))?;
    if let Some(constraint) = cascades {
        return Err(format!(
            "a foreign key ({constraint}) cascades from {}.{} onto another table",
            quote(schema),
            quote(table)
        ));
    }
    Ok(())
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
    // Steps that may give more than one row per row before them: MariaDB's
    // `rows` is per loop, so a join's rows multiply. One such step (the
    // rest unique lookups) is the only plan whose largest `rows` bounds it.
    let mut fanning = 0;
    let mut stack = vec![plan];
    while let Some(node) = stack.pop() {
        match node {
            Value::Object(map) => {
                if map.contains_key("table_name")
                    && !matches!(
                        map.get("access_type").and_then(Value::as_str),
                        Some("eq_ref" | "const" | "system")
                    )
                {
                    fanning += 1;
                }
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
    if fanning > 1 {
        return Err("a join whose steps each fan out: MariaDB's rows are per loop".into());
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

    /// `rows` is per loop: a join whose later steps are not unique lookups
    /// multiplies (5 keys × 1 026 rows each was "1 026"), so it has no
    /// estimate.
    #[test]
    fn joins_that_fan_out_have_no_estimate() {
        let fanning = json!({"query_block": {"select_id": 1, "nested_loop": [
            {"table": {"table_name": "<derived2>", "access_type": "ALL", "rows": 5}},
            {"table": {"table_name": "t", "access_type": "ref", "ref": ["d.k"],
                "rows": 1026}}]}});
        assert!(rows_from_plan(&fanning).unwrap_err().contains("per loop"));
    }

    #[test]
    fn subqueries_are_not_planned() {
        for sql in [
            "DELETE FROM t WHERE id > (SELECT IF(val LIKE 'h%', 0, 1) FROM secret.k)",
            "DELETE t FROM t JOIN (SELECT 0 AS k) d ON t.k = d.k",
            "UPDATE t SET v = 1 WHERE EXISTS (SELECT 1 FROM u)",
        ] {
            assert!(shape(sql).unwrap_err().contains("subquery"), "{sql}");
        }
        // The word in a string or a quoted name is no subquery.
        assert_eq!(
            shape("UPDATE t SET note = 'select' WHERE `select` = 1").unwrap(),
            Shape::Planned
        );
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
    fn parameters_are_estimated_only_by_a_pinned_key() {
        assert_eq!(shape("DELETE FROM t WHERE v > 5").unwrap(), Shape::Planned);
        assert_eq!(
            shape("UPDATE sbtest1 SET k=k+1 WHERE id=?").unwrap(),
            Shape::Keyed(vec!["id".to_string()])
        );
        let Shape::Keyed(mut both) =
            shape("DELETE FROM t WHERE (a = ? AND t.B = ?) AND v > ?").unwrap()
        else {
            panic!("keyed");
        };
        both.sort();
        assert_eq!(both, ["a", "b"]);
        // Not at the top level, or not `=`: no column pinned.
        for sql in [
            "DELETE FROM t WHERE id = ? OR 1 = 1",
            "DELETE FROM t WHERE id > ?",
            "DELETE FROM t WHERE id <=> ?",
            "UPDATE t SET v = ? WHERE v > 3",
            // MariaDB: `(id = ? AND 1) XOR 1`, every row.
            "DELETE FROM t WHERE id = ? AND 1 XOR 1",
            "DELETE FROM t WHERE id = ? AND f(v) = 1",
        ] {
            assert_eq!(shape(sql).unwrap(), Shape::Keyed(vec![]), "{sql}");
        }
        // Read otherwise by MariaDB: `(id = ? AND 1) OR 1`, and an
        // executable comment that runs.
        for sql in [
            "DELETE FROM t WHERE id = ? AND 1 || 1",
            "DELETE FROM t WHERE id = ? /*! OR 1 = 1 */",
            "INSERT INTO t VALUES (?) /*!, (2), (3) */ ON DUPLICATE KEY UPDATE v = 1",
        ] {
            assert!(shape(sql).is_err(), "{sql}");
        }
        // Several tables, a SELECT source, or several statements: refused.
        for sql in [
            "DELETE t FROM t JOIN u ON t.id = u.id WHERE u.id = ?",
            "UPDATE t JOIN u ON t.id = u.id SET t.v = ? WHERE u.id = 1",
            "DELETE FROM t WHERE id = ?; DELETE FROM t",
            "INSERT INTO t SELECT * FROM u WHERE id = ? ON DUPLICATE KEY UPDATE v = 1",
        ] {
            assert!(shape(sql).is_err(), "{sql}");
        }
    }

    #[test]
    fn upserts_and_replaces_of_values_count_their_rows() {
        assert_eq!(
            shape("INSERT INTO t VALUES (1,2),(3,?) ON DUPLICATE KEY UPDATE v = ?").unwrap(),
            Shape::Values {
                rows: 2,
                replace: false
            }
        );
        assert_eq!(
            shape("REPLACE INTO t VALUES (?, ?)").unwrap(),
            Shape::Values {
                rows: 1,
                replace: true
            }
        );
        assert_eq!(
            shape("INSERT INTO t SET id = 1, v = 2 ON DUPLICATE KEY UPDATE v = 9").unwrap(),
            Shape::Values {
                rows: 1,
                replace: false
            }
        );
        // From a SELECT: not planned (a subquery; the classifier holds it
        // as an all-rows write anyway).
        assert!(shape("REPLACE INTO t SELECT * FROM u").is_err());
    }

    #[test]
    fn server_wide_settings_that_change_how_text_splits_are_named() {
        assert_eq!(
            server_lexing(
                "STRICT_TRANS_TABLES,ERROR_FOR_DIVISION_BY_ZERO,NO_AUTO_CREATE_USER,NO_ENGINE_SUBSTITUTION",
                ""
            ),
            None
        );
        let why = server_lexing("STRICT_TRANS_TABLES,ANSI_QUOTES", "").unwrap();
        assert!(why.contains("ANSI_QUOTES"), "{why}");
        let why = server_lexing("no_backslash_escapes", "").unwrap();
        assert!(why.contains("no_backslash_escapes"), "{why}");
        // MariaDB's compound modes that include ANSI_QUOTES.
        assert!(server_lexing("ANSI", "").is_some());
        assert!(server_lexing("PIPES_AS_CONCAT,ORACLE", "").is_some());
        let why = server_lexing("", "SET NAMES gbk").unwrap();
        assert!(
            why.contains("init_connect") && why.contains("SET NAMES gbk"),
            "{why}"
        );
        assert_eq!(server_lexing("", "  "), None);
    }

    #[test]
    fn views_calling_functions_and_triggered_tables_are_user_code() {
        use crate::classify::{classify, Dialect};
        let catalog = MysqlCatalog {
            views: [("shop".to_string(), "report".to_string())].into(),
            triggers: [("shop".to_string(), "inbox".to_string())].into(),
            lexing: None,
        };
        let runs = |sql: &str, db: Option<&str>| {
            let c = classify(sql, Dialect::Mysql);
            catalog.user_code(&c.statements[0], db)
        };
        assert!(runs("SELECT * FROM report", Some("shop"))[0].contains("view"));
        assert!(runs("SELECT * FROM Shop.Report", Some("other"))[0].contains("view"));
        assert!(runs("INSERT INTO inbox VALUES (1)", Some("shop"))[0].contains("trigger"));
        // A read of the triggered table runs no trigger.
        assert!(runs("SELECT * FROM inbox", Some("shop")).is_empty());
        assert!(runs("SELECT * FROM report", Some("other")).is_empty());
        // No database selected: an unqualified name may be either.
        assert!(!runs("SELECT * FROM report", None).is_empty());
    }

    #[test]
    fn identifiers_are_backquoted() {
        assert_eq!(quote("t"), "`t`");
        assert_eq!(quote("a`b"), "`a``b`");
    }
}
