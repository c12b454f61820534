//! The facts recorded for one statement.
use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// What a statement does, coarsely. Policies match on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Reads data only (SELECT, VALUES, SHOW, FETCH).
    Read,
    /// Changes rows (INSERT, UPDATE, DELETE, MERGE, TRUNCATE, or a SELECT with a writing CTE).
    Write,
    /// Changes the schema (CREATE, ALTER, DROP, COMMENT, SELECT INTO, CREATE TABLE AS …).
    Ddl,
    /// Changes roles or privileges (GRANT, REVOKE, CREATE/ALTER/DROP ROLE …).
    Dcl,
    /// BEGIN, COMMIT, ROLLBACK, SAVEPOINT, SET TRANSACTION.
    Transaction,
    /// Session state (SET, RESET, DISCARD, USE).
    Session,
    /// Maintenance and other commands (VACUUM, ANALYZE, LOCK, LISTEN, EXECUTE …).
    Utility,
    /// COPY.
    Copy,
    /// Runs server-side code (CALL, DO, procedural blocks).
    Procedural,
    /// EXPLAIN without ANALYZE (the statement is planned, not run).
    Explain,
    /// Did not parse, or parsed into something this classifier does not know.
    Unknown,
}

impl Kind {
    pub const ALL: [Kind; 11] = [
        Kind::Read,
        Kind::Write,
        Kind::Ddl,
        Kind::Dcl,
        Kind::Transaction,
        Kind::Session,
        Kind::Utility,
        Kind::Copy,
        Kind::Procedural,
        Kind::Explain,
        Kind::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Ddl => "ddl",
            Kind::Dcl => "dcl",
            Kind::Transaction => "transaction",
            Kind::Session => "session",
            Kind::Utility => "utility",
            Kind::Copy => "copy",
            Kind::Procedural => "procedural",
            Kind::Explain => "explain",
            Kind::Unknown => "unknown",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Risky properties of a statement, each one something a policy may hold on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flag {
    /// An UPDATE/DELETE/MERGE (anywhere in the statement) whose WHERE/ON cannot
    /// tell rows apart, or a TRUNCATE.
    AllRows,
    /// A data-modifying statement inside a WITH clause (or a cursor definition).
    WriteInCte,
    /// EXPLAIN ANALYZE: the explained statement really runs.
    ExplainAnalyze,
    /// PREPARE: the facts are those of the prepared statement.
    Prepared,
    /// SELECT … INTO or CREATE TABLE … AS: creates a table.
    SelectInto,
    /// COPY … TO/FROM PROGRAM: runs a shell command on the server.
    CopyProgram,
    /// COPY … TO/FROM a server-side file.
    CopyServerFile,
    /// A DO block (anonymous server-side code).
    DoBlock,
    /// CALL of a procedure.
    Call,
    /// SET of a setting that switches off a safety mechanism (e.g. session_replication_role).
    DisablesSafety,
    /// ALTER SYSTEM: changes the server configuration file.
    AlterSystem,
    /// Takes a lock that blocks other sessions' reads or writes (LOCK TABLE,
    /// VACUUM FULL, CLUSTER, REINDEX, REFRESH MATERIALIZED VIEW, TRUNCATE).
    HeavyLock,
    /// Creates, alters or drops a role, or grants/revokes role membership.
    RoleChange,
    /// GRANT/REVOKE of privileges, ALTER DEFAULT PRIVILEGES.
    PrivilegeChange,
    /// SET ROLE / SET SESSION AUTHORIZATION: the session acts as someone else.
    IdentityChange,
    /// Reaches the server's files or code (LOAD, LOAD DATA).
    ServerAccess,
    /// Ends another session (KILL).
    TerminatesSession,
    /// SET search_path (or MySQL USE): later unqualified table names may
    /// resolve to other schemas than the policy's `search_path` assumes.
    SearchPathChange,
    /// Calls code a user wrote (a function, or an operator, cast, type,
    /// view, rule, trigger or policy that calls one), as the database's
    /// catalog says (`catalog`); also set when the catalog cannot be read.
    UserCode,
    /// INSERT … ON CONFLICT … DO UPDATE: may change existing rows.
    Upsert,
    /// SELECT … FOR UPDATE/SHARE (any strength) whose WHERE may select
    /// every row: the whole table stays locked against writers until the
    /// transaction ends.
    LocksAllRows,
    /// A join that multiplies rows because nothing links the joined tables:
    /// a comma join whose WHERE never relates them, `JOIN … ON true` or an
    /// always-true condition (`classify::joins`).
    UnfilteredJoin,
    /// An explicit `CROSS JOIN` nothing else links (sometimes intended).
    CrossJoin,
}

impl Flag {
    pub const ALL: [Flag; 23] = [
        Flag::AllRows,
        Flag::WriteInCte,
        Flag::ExplainAnalyze,
        Flag::Prepared,
        Flag::SelectInto,
        Flag::CopyProgram,
        Flag::CopyServerFile,
        Flag::DoBlock,
        Flag::Call,
        Flag::DisablesSafety,
        Flag::AlterSystem,
        Flag::HeavyLock,
        Flag::RoleChange,
        Flag::PrivilegeChange,
        Flag::IdentityChange,
        Flag::ServerAccess,
        Flag::TerminatesSession,
        Flag::SearchPathChange,
        Flag::UserCode,
        Flag::Upsert,
        Flag::LocksAllRows,
        Flag::UnfilteredJoin,
        Flag::CrossJoin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Flag::AllRows => "all_rows",
            Flag::WriteInCte => "write_in_cte",
            Flag::ExplainAnalyze => "explain_analyze",
            Flag::Prepared => "prepared",
            Flag::SelectInto => "select_into",
            Flag::CopyProgram => "copy_program",
            Flag::CopyServerFile => "copy_server_file",
            Flag::DoBlock => "do_block",
            Flag::Call => "call",
            Flag::DisablesSafety => "disables_safety",
            Flag::AlterSystem => "alter_system",
            Flag::HeavyLock => "heavy_lock",
            Flag::RoleChange => "role_change",
            Flag::PrivilegeChange => "privilege_change",
            Flag::IdentityChange => "identity_change",
            Flag::ServerAccess => "server_access",
            Flag::TerminatesSession => "terminates_session",
            Flag::SearchPathChange => "search_path_change",
            Flag::UserCode => "user_code",
            Flag::Upsert => "upsert",
            Flag::LocksAllRows => "locks_all_rows",
            Flag::UnfilteredJoin => "unfiltered_join",
            Flag::CrossJoin => "cross_join",
        }
    }

    pub fn from_name(name: &str) -> Option<Flag> {
        Flag::ALL.into_iter().find(|f| f.name() == name)
    }

    fn bit(self) -> u32 {
        1 << (self as u32)
    }
}

/// A set of [`Flag`]s; serialises as the list of their names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u32);

impl Flags {
    pub fn insert(&mut self, flag: Flag) {
        self.0 |= flag.bit();
    }

    pub fn contains(self, flag: Flag) -> bool {
        self.0 & flag.bit() != 0
    }

    pub fn union(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }

    pub fn intersects(self, other: Flags) -> bool {
        self.0 & other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Flag> {
        Flag::ALL.into_iter().filter(move |f| self.contains(*f))
    }
}

impl FromIterator<Flag> for Flags {
    fn from_iter<I: IntoIterator<Item = Flag>>(iter: I) -> Self {
        let mut flags = Flags::default();
        for flag in iter {
            flags.insert(flag);
        }
        flags
    }
}

impl Serialize for Flags {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter().map(Flag::name))
    }
}

/// A table (or other relation) name as the server resolves it: unquoted parts
/// folded to lower case (PostgreSQL), quoted parts kept exactly.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub parts: Vec<String>,
}

impl TableName {
    /// The last part: the relation's own name without schema or database.
    pub fn relation(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or("")
    }

    /// The schema (or MySQL database) part, when written.
    pub fn schema(&self) -> Option<&str> {
        if self.parts.len() >= 2 {
            Some(self.parts[self.parts.len() - 2].as_str())
        } else {
            None
        }
    }
}

/// Quotes a name part when printing it bare would read back differently.
fn write_part(f: &mut fmt::Formatter<'_>, part: &str) -> fmt::Result {
    let bare = !part.is_empty()
        && part
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && part
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
    if bare {
        f.write_str(part)
    } else {
        write!(f, "\"{}\"", part.replace('"', "\"\""))
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            write_part(f, part)?;
        }
        Ok(())
    }
}

impl Serialize for TableName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What in a statement names code besides function calls: the catalog
/// matches these against the database's user code (`catalog`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CodeRefs {
    /// Operator symbols, including those the grammar implies (`LIKE` is
    /// `~~`, `IN` and `CASE x WHEN` are `=`, `BETWEEN` is `>=` and `<=`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub operators: Vec<String>,
    /// Types converted to: casts (`::t`, `CAST(… AS t)`) and typed literals (`t '…'`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub types: Vec<String>,
    /// Last names of qualified references (`t.f`): a one-argument function
    /// may be called this way.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
    /// The user code these reach in the session's database, as its catalog
    /// says (set by the gate, with [`Flag::UserCode`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runs: Vec<String>,
}

impl CodeRefs {
    pub fn is_empty(&self) -> bool {
        self.operators.is_empty()
            && self.types.is_empty()
            && self.attributes.is_empty()
            && self.runs.is_empty()
    }
}

/// How much of its table a write is estimated to change.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "estimate", rename_all = "snake_case")]
pub enum RowShare {
    /// `rows` of about `of` rows of `relation`.
    Estimated {
        rows: u64,
        of: u64,
        relation: String,
    },
    /// No estimate, and why (rules asking for one count it as exceeded).
    Unavailable { reason: String },
}

impl RowShare {
    pub fn fraction(&self) -> Option<f64> {
        match self {
            RowShare::Estimated { rows, of, .. } => Some(*rows as f64 / (*of).max(1) as f64),
            RowShare::Unavailable { .. } => None,
        }
    }
}

/// The facts of one statement.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatementFacts {
    /// The statement's text (as written when it can be cut out of the string).
    pub sql: String,
    pub kind: Kind,
    /// The statement's leading keywords, upper case: `DELETE`, `CREATE TABLE`,
    /// `ALTER SYSTEM` … For PREPARE and EXPLAIN ANALYZE, the verb of the inner statement.
    pub verb: String,
    pub tables_read: Vec<TableName>,
    pub tables_written: Vec<TableName>,
    /// Functions and procedures called, lower case, schema-qualified where written so.
    pub functions: Vec<String>,
    /// Settings assigned by SET (lower case).
    pub settings: Vec<String>,
    pub flags: Flags,
    /// Operators, cast types and attribute names: what else may call code.
    #[serde(skip_serializing_if = "CodeRefs::is_empty")]
    pub code: CodeRefs,
    /// For a write that changes existing rows: the planner's estimate of the
    /// share of its table it changes (set by the gate; see `catalog`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share: Option<RowShare>,
    /// Why the statement is [`Kind::Unknown`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl StatementFacts {
    pub(crate) fn unknown(sql: String, verb: String, error: String) -> Self {
        StatementFacts {
            sql,
            kind: Kind::Unknown,
            verb,
            tables_read: Vec::new(),
            tables_written: Vec::new(),
            functions: Vec::new(),
            settings: Vec::new(),
            flags: Flags::default(),
            code: CodeRefs::default(),
            share: None,
            error: Some(error),
        }
    }

    pub fn has(&self, flag: Flag) -> bool {
        self.flags.contains(flag)
    }

    /// Every table read or written.
    pub fn tables(&self) -> impl Iterator<Item = &TableName> {
        self.tables_read.iter().chain(self.tables_written.iter())
    }

    /// True for a write that may change rows already in a table: UPDATE,
    /// DELETE, MERGE, an INSERT with ON CONFLICT DO UPDATE (MySQL: ON
    /// DUPLICATE KEY UPDATE), MySQL's REPLACE (it deletes the rows a new
    /// one collides with), any of them in WITH or prepared, or a statement
    /// qgate reads as a write in a CTE.
    pub fn changes_existing_rows(&self) -> bool {
        if !matches!(self.kind, Kind::Write) {
            return false;
        }
        let first = self.verb.split(' ').next().unwrap_or("");
        matches!(first, "UPDATE" | "DELETE" | "MERGE" | "REPLACE")
            || self.has(Flag::WriteInCte)
            || self.has(Flag::Upsert)
    }

    /// True when `pattern` names this statement's verb: the whole verb or its
    /// first word, case-insensitively (`DROP` matches `DROP TABLE`).
    pub fn verb_matches(&self, pattern: &str) -> bool {
        let pattern = pattern.trim();
        self.verb.eq_ignore_ascii_case(pattern)
            || self
                .verb
                .split(' ')
                .next()
                .is_some_and(|first| first.eq_ignore_ascii_case(pattern))
    }
}
