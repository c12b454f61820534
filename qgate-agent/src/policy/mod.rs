//! The policy engine: who × what × how much → allow / hold / deny.
//!
//! A policy (TOML, see `policy.toml` for the documented shipped default) names
//! identity groups, table tags, and ordered rules; the first rule whose
//! conditions all hold decides a statement, the default decides when none
//! does. A query string with several statements gets the strictest of their
//! decisions. When an identity is unknown (the agent did not see the
//! connection start), a group test on the missing field counts as a match for
//! rules that hold or deny and as a miss for rules that allow: an unknown
//! client is treated as the most restricted identity it could be.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::LazyLock,
};

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, Weekday};

use crate::classify::{
    is_known_safe_function, Classification, Dialect, Flags, Kind, RowShare, StatementFacts,
};

mod cache;
pub mod check;
pub mod estimate;
mod file;
mod pattern;
mod reload;
mod verbs;

pub use cache::DecisionCache;
pub use file::{Findings, PolicyWarning, DEFAULT_REVIEWERS};
pub use pattern::{Cidr, Glob, TablePattern};
pub use reload::{watch_file, PolicyHandle, PolicyWatcher};

/// The shipped default policy, documented in place.
pub const DEFAULT_POLICY: &str = include_str!("../../policy.toml");

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("line {line}: {message}")]
    Invalid { line: usize, message: String },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl PolicyError {
    /// The line the error is on, when it is about the file's content.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Syntax { line, .. } | PolicyError::Invalid { line, .. } => Some(*line),
            PolicyError::Read { .. } => None,
        }
    }
}

/// Who sent a statement. Every field may be unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subject {
    pub user: Option<String>,
    pub database: Option<String>,
    pub client_addr: Option<IpAddr>,
    pub application: Option<String>,
}

/// What happens to a statement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    Allow,
    /// Runs, and the audit log marks it for attention.
    AuditOnly,
    /// Waits until `approvals` reviewers from `reviewer_groups` approve.
    Hold {
        approvals: u32,
        reviewer_groups: Vec<String>,
    },
    /// Refused; the client gets `message` as an SQL error.
    Deny {
        message: String,
    },
}

impl Action {
    /// allow / audit-only / hold / deny.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::AuditOnly => "audit-only",
            Action::Hold { .. } => "hold",
            Action::Deny { .. } => "deny",
        }
    }

    fn strictness(&self) -> u8 {
        match self {
            Action::Allow => 0,
            Action::AuditOnly => 1,
            Action::Hold { .. } => 2,
            Action::Deny { .. } => 3,
        }
    }

    pub fn restricts(&self) -> bool {
        self.strictness() >= 2
    }
}

/// The verdict on a whole query string, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    #[serde(flatten)]
    pub action: Action,
    /// The rule that fired (the strictest statement's), or `default`.
    pub rule: String,
    /// One line per statement: which rule decided it and on what facts.
    pub reasons: Vec<String>,
    /// Rules marked `shadow = true` that matched: what they would have
    /// done. The statement was decided as if they did not exist.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowHit>,
    /// False when the decision depended on the clock or a row estimate, so it
    /// must not be reused for the next identical statement.
    #[serde(skip)]
    pub(crate) reusable: bool,
}

/// A shadow rule that matched, and the action it would have taken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShadowHit {
    pub rule: String,
    /// `hold` or `deny`.
    pub would: &'static str,
}

/// How much the kernel must gate a connection, from its identity alone
/// ([`needs_gate`]): the one mode type of policy, gate and kernel maps.
use crate::flow::GateMode;

/// Answers `estimated_rows_above` and `estimated_cost_above` conditions.
pub trait RowEstimator {
    /// Rows the statement is estimated to read or change, or why there is no estimate.
    fn estimate_rows(&self, statement: &StatementFacts) -> Result<u64, String>;
    /// The planner's total cost of the statement, or why there is none.
    fn estimate_cost(&self, _statement: &StatementFacts) -> Result<f64, String> {
        Err("no cost estimator is configured".into())
    }
    /// True (once) when an estimate asked since the last call is still
    /// being worked out elsewhere: the decision just made counted it as
    /// missing, and should be made again once it is in rather than acted on.
    fn take_pending(&self) -> bool {
        false
    }
}

/// No database connection configured: every estimate is missing.
pub struct NoEstimator;

impl RowEstimator for NoEstimator {
    fn estimate_rows(&self, _: &StatementFacts) -> Result<u64, String> {
        Err("no row estimator is configured".into())
    }
}

impl<F: Fn(&StatementFacts) -> Result<u64, String>> RowEstimator for F {
    fn estimate_rows(&self, statement: &StatementFacts) -> Result<u64, String> {
        self(statement)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Membership {
    No,
    /// Depends on a field of the identity that is unknown.
    Maybe,
    Yes,
}

#[derive(Clone, Debug)]
struct Group {
    users: Vec<Glob>,
    databases: Vec<Glob>,
    client_addrs: Vec<Cidr>,
    applications: Vec<Glob>,
    identity_unknown: Option<bool>,
}

/// A MySQL statement whose every database qgate reads from its table
/// names: a plain read, write, table creation or removal, transaction
/// control or setting, calling no function of another database.
fn sees_every_database(s: &StatementFacts) -> bool {
    let kind = matches!(
        s.kind,
        Kind::Read | Kind::Write | Kind::Transaction | Kind::Session | Kind::Ddl
    );
    let first = s.verb.split(' ').next().unwrap_or("");
    let verb = matches!(
        first,
        "SELECT"
            | "INSERT"
            | "UPDATE"
            | "DELETE"
            | "REPLACE"
            | "WITH"
            | "VALUES"
            | "TABLE"
            | "TRUNCATE"
            | "BEGIN"
            | "START"
            | "COMMIT"
            | "ROLLBACK"
            | "SAVEPOINT"
            | "RELEASE"
            | "SET"
    ) || matches!(s.verb.as_str(), "CREATE TABLE" | "DROP TABLE");
    kind && verb && !s.functions.iter().any(|f| f.contains('.'))
}

/// Which databases a statement may act in, for groups' `databases`.
#[derive(Clone, Copy)]
enum Reach<'a> {
    /// The session's only (PostgreSQL: a session cannot name another
    /// database's tables).
    Session,
    /// The session's and these, named as table qualifiers (MySQL's
    /// `otherdb.t`).
    Also(&'a [String]),
    /// Any: a MySQL session's connection-wide mode, before any statement
    /// is seen (its statements may name any database).
    Anywhere,
}

impl Group {
    /// Membership for a statement that may act in the databases `reach`
    /// says: in a `databases` group only if every one of them matches, in
    /// none if none does, unknown (`Maybe`: restricting rules apply,
    /// allowing ones do not) otherwise.
    fn membership_reaching(&self, subject: &Subject, reach: Reach<'_>) -> Membership {
        fn field<T>(patterns: &[T], value: Option<bool>) -> Membership {
            match (patterns.is_empty(), value) {
                (true, _) => Membership::Yes,
                (false, None) => Membership::Maybe,
                (false, Some(true)) => Membership::Yes,
                (false, Some(false)) => Membership::No,
            }
        }
        let any = |globs: &[Glob], value: &Option<String>| {
            value.as_deref().map(|v| globs.iter().any(|g| g.matches(v)))
        };
        let session = any(&self.databases, &subject.database);
        let databases = match reach {
            Reach::Session => session,
            Reach::Anywhere => None,
            Reach::Also(others) => {
                // Unquoted names were folded to lower case: a qualifier
                // matches a pattern ignoring case.
                let matched = others
                    .iter()
                    .map(|d| Some(self.databases.iter().any(|g| g.matches_ignoring_case(d))));
                std::iter::once(session)
                    .chain(matched)
                    .try_fold(None, |seen: Option<bool>, m| match (seen, m) {
                        (_, None) => Err(()),
                        (None, Some(m)) => Ok(Some(m)),
                        (Some(a), Some(b)) if a == b => Ok(Some(a)),
                        _ => Err(()),
                    })
                    .ok()
                    .flatten()
            }
        };
        let tests = [
            field(&self.users, any(&self.users, &subject.user)),
            field(&self.databases, databases),
            field(
                &self.client_addrs,
                subject
                    .client_addr
                    .map(|a| self.client_addrs.iter().any(|c| c.contains(a))),
            ),
            field(
                &self.applications,
                any(&self.applications, &subject.application),
            ),
            match self.identity_unknown {
                None => Membership::Yes,
                Some(wanted) => {
                    if (subject.user.is_none()) == wanted {
                        Membership::Yes
                    } else {
                        Membership::No
                    }
                }
            },
        ];
        tests.into_iter().min().unwrap_or(Membership::Yes)
    }
}

/// Days of the week and a UTC time of day range (`from` > `to` wraps midnight).
#[derive(Clone, Debug)]
struct TimeWindow {
    days: u8,
    from_minute: u16,
    to_minute: u16,
}

impl TimeWindow {
    fn parse(days: &[String], from: &str, to: &str) -> Result<TimeWindow, String> {
        let mut mask = 0u8;
        for day in days {
            let index = match day.to_ascii_lowercase().get(..3) {
                Some("mon") => 0,
                Some("tue") => 1,
                Some("wed") => 2,
                Some("thu") => 3,
                Some("fri") => 4,
                Some("sat") => 5,
                Some("sun") => 6,
                _ => return Err(format!("time: unknown day `{day}` (mon … sun)")),
            };
            mask |= 1 << index;
        }
        if days.is_empty() {
            mask = 0x7f;
        }
        Ok(TimeWindow {
            days: mask,
            from_minute: minute_of_day(from)?,
            to_minute: minute_of_day(to)?,
        })
    }

    fn contains(&self, now: OffsetDateTime) -> bool {
        let day = match now.weekday() {
            Weekday::Monday => 0,
            Weekday::Tuesday => 1,
            Weekday::Wednesday => 2,
            Weekday::Thursday => 3,
            Weekday::Friday => 4,
            Weekday::Saturday => 5,
            Weekday::Sunday => 6,
        };
        let minute = u16::from(now.hour()) * 60 + u16::from(now.minute());
        let in_range = if self.from_minute <= self.to_minute {
            (self.from_minute..self.to_minute).contains(&minute)
        } else {
            minute >= self.from_minute || minute < self.to_minute
        };
        self.days & (1 << day) != 0 && in_range
    }
}

fn minute_of_day(text: &str) -> Result<u16, String> {
    let bad = || format!("time: `{text}` is not HH:MM (UTC)");
    let (h, m) = text.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 24 || m > 59 || (h == 24 && m != 0) {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    line: usize,
    groups: Vec<usize>,
    kinds: Vec<Kind>,
    verbs: Vec<String>,
    tags: Vec<usize>,
    tables: Vec<TablePattern>,
    flags: Flags,
    functions: Vec<Glob>,
    unsafe_functions: bool,
    estimated_rows_above: Option<u64>,
    /// The planner's total cost above this (or no estimate).
    estimated_cost_above: Option<f64>,
    /// Writes changing existing rows whose planner estimate is above this
    /// share of their table (or that have no estimate).
    estimated_share_above: Option<f64>,
    time: Option<TimeWindow>,
    /// Decides in shadow: what it would do is recorded, the statement goes
    /// on to the next rules.
    shadow: bool,
    action: Action,
}

impl Rule {
    /// True when every statement and identity `later` matches, this rule
    /// matches too (so `later`, coming after it, never decides anything).
    /// Conservative: only list conditions are compared; a rule with a time
    /// window, estimates or function conditions covers nothing.
    fn covers(&self, later: &Rule) -> bool {
        fn subset<T: PartialEq>(earlier: &[T], later: &[T]) -> bool {
            earlier.is_empty() || (!later.is_empty() && later.iter().all(|x| earlier.contains(x)))
        }
        let plain = self.time.is_none()
            && self.estimated_rows_above.is_none()
            && self.estimated_cost_above.is_none()
            && self.estimated_share_above.is_none()
            && self.functions.is_empty()
            && !self.unsafe_functions;
        let verbs = self.verbs.is_empty()
            || (!later.verbs.is_empty()
                && later.verbs.iter().all(|v| {
                    self.verbs.iter().any(|e| {
                        e == v
                            || v.strip_prefix(e.as_str())
                                .is_some_and(|r| r.starts_with(' '))
                    })
                }));
        let tables: Vec<&str> = self.tables.iter().map(TablePattern::as_str).collect();
        let later_tables: Vec<&str> = later.tables.iter().map(TablePattern::as_str).collect();
        let flags = self.flags.is_empty()
            || (!later.flags.is_empty() && later.flags.iter().all(|f| self.flags.contains(f)));
        plain
            && verbs
            && flags
            && subset(&self.groups, &later.groups)
            && subset(&self.kinds, &later.kinds)
            && subset(&self.tags, &later.tags)
            && subset(&tables, &later_tables)
    }

    /// Whether the rule could match a statement the kernel passes on its
    /// own in `GateRisky` mode: one SELECT or SHOW reading tables, with no
    /// function call and no flag. Conservative: unsure means yes.
    fn could_match_plain_read(&self) -> bool {
        let kind_ok = self.kinds.is_empty()
            || self
                .kinds
                .iter()
                .any(|k| matches!(k, Kind::Read | Kind::Session | Kind::Utility));
        let verb_ok = self.verbs.is_empty()
            || self
                .verbs
                .iter()
                .any(|v| v.eq_ignore_ascii_case("select") || v.eq_ignore_ascii_case("show"));
        kind_ok
            && verb_ok
            && self.estimated_share_above.is_none()
            && self.flags.is_empty()
            && self.functions.is_empty()
            && !self.unsafe_functions
    }

    /// True when the rule names no statement condition: it decides every
    /// statement of the identities it applies to.
    fn matches_every_statement(&self) -> bool {
        self.kinds.is_empty()
            && self.verbs.is_empty()
            && self.tags.is_empty()
            && self.tables.is_empty()
            && self.flags.is_empty()
            && self.functions.is_empty()
            && !self.unsafe_functions
            && self.estimated_rows_above.is_none()
            && self.estimated_cost_above.is_none()
            && self.estimated_share_above.is_none()
            && self.time.is_none()
    }
}

/// A checked policy, ready to decide.
#[derive(Clone, Debug)]
pub struct Policy {
    groups: Vec<Group>,
    tags: Vec<(String, Vec<TablePattern>)>,
    rules: Vec<Rule>,
    default: Action,
    safe_functions: Vec<Glob>,
    /// Schemas unqualified table names resolve to; `$user` is the subject's user.
    search_path: Vec<String>,
}

/// PostgreSQL's default search_path.
pub(crate) fn default_search_path() -> Vec<String> {
    vec!["$user".to_owned(), "public".to_owned()]
}

static BUILTIN: LazyLock<Policy> = LazyLock::new(|| {
    // The shipped file is part of the binary and covered by tests.
    file::parse(DEFAULT_POLICY).expect("the shipped policy.toml is valid")
});

/// One statement's ruling before statements are combined.
struct StatementRuling {
    action: Action,
    rule: String,
    shadow: Vec<ShadowHit>,
    /// "rule NAME (line N)" or "default".
    source: String,
    why: String,
    reusable: bool,
}

impl Policy {
    /// Whether some identity could be refused outright (a deny rule with no
    /// statement condition, or a deny default): the kernel must then hold
    /// each StartupMessage until the agent has judged who is connecting.
    pub fn refuses_some_connections(&self) -> bool {
        matches!(self.default, Action::Deny { .. })
            || self
                .rules
                .iter()
                .any(|r| matches!(r.action, Action::Deny { .. }) && r.matches_every_statement())
    }

    /// Parses and checks a policy; errors name the line.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        file::parse(text)
    }

    /// Every error and warning of a policy text, and the policy when it has
    /// no error (what `policy validate` reports, and what the agent logs at
    /// start and on reload).
    pub fn validate_toml(text: &str) -> (Option<Policy>, Findings) {
        file::parse_all(text)
    }

    /// The rules that need the configured estimator (`estimated_rows_above`;
    /// `estimated_share_above` asks over the agent's catalog session):
    /// without one such a rule decides on "no estimate", for every
    /// statement it names.
    pub fn needs_estimator(&self) -> Vec<String> {
        self.rules
            .iter()
            .filter(|r| r.estimated_rows_above.is_some() || r.estimated_cost_above.is_some())
            .map(|r| format!("rule `{}` (line {})", r.name, r.line))
            .collect()
    }

    /// The policy against the agent's setting: a rule that needs the
    /// planner's estimate with no estimator configured is an error (it
    /// would decide every statement it names on "no estimate").
    pub fn check_estimator(&self, estimator_configured: bool) -> Result<(), PolicyError> {
        let needing = self.needs_estimator();
        if estimator_configured || needing.is_empty() {
            return Ok(());
        }
        let line = self
            .rules
            .iter()
            .find(|r| r.estimated_rows_above.is_some() || r.estimated_cost_above.is_some())
            .map_or(1, |r| r.line);
        Err(PolicyError::Invalid {
            line,
            message: format!(
                "{} need(s) the planner's estimate, but no estimator is configured: set \
                 `estimator` under [policy] in qgate.toml (a read-only connection string), or \
                 remove `estimated_rows_above`",
                needing.join(", ")
            ),
        })
    }

    /// Reviewer groups the hold rules (and the default) ask, with the line
    /// of the first rule asking each (0: the default).
    pub fn reviewer_groups(&self) -> Vec<(String, usize)> {
        let mut out: Vec<(String, usize)> = Vec::new();
        let actions = self
            .rules
            .iter()
            .map(|r| (&r.action, r.line))
            .chain(std::iter::once((&self.default, 0)));
        for (action, line) in actions {
            if let Action::Hold {
                reviewer_groups, ..
            } = action
            {
                for g in reviewer_groups {
                    if !out.iter().any(|(name, _)| name == g) {
                        out.push((g.clone(), line));
                    }
                }
            }
        }
        out
    }

    pub fn from_file(path: &Path) -> Result<Policy, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Policy::from_toml(&text)
    }

    /// The shipped default (`policy.toml`): holds every risky statement for the
    /// `reviewers` group, allows the rest.
    pub fn builtin_default() -> Policy {
        BUILTIN.clone()
    }

    /// Rule names in order, then `default`.
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }

    /// Decides `classification` for `subject` now.
    pub fn decide(
        &self,
        subject: &Subject,
        classification: &Classification,
        estimator: &dyn RowEstimator,
    ) -> Decision {
        self.decide_at(
            subject,
            classification,
            estimator,
            OffsetDateTime::now_utc(),
        )
    }

    /// Decides as if the clock read `now` (time-window rules).
    pub fn decide_at(
        &self,
        subject: &Subject,
        classification: &Classification,
        estimator: &dyn RowEstimator,
        now: OffsetDateTime,
    ) -> Decision {
        // A MySQL statement may name tables of other databases
        // (`otherdb.t`): a group's `databases` counts them too.
        let qualifiers: Vec<String> = if classification.dialect == Dialect::Mysql {
            let mut q: Vec<String> = classification
                .statements
                .iter()
                .flat_map(|s| s.tables())
                .filter_map(|t| t.parts.len().checked_sub(2).map(|i| t.parts[i].clone()))
                .collect();
            q.sort();
            q.dedup();
            q
        } else {
            Vec::new()
        };
        // Only where qgate sees every object a MySQL statement acts on can
        // the databases it names settle a `databases` group; otherwise
        // (`CALL prod.p()`, `RENAME TABLE`, `SHOW … FROM prod`, a `USE`,
        // text not understood …) membership is unknown.
        let reach = if classification.dialect == Dialect::Mysql
            && !classification.statements.iter().all(sees_every_database)
        {
            Reach::Anywhere
        } else {
            Reach::Also(&qualifiers)
        };
        let membership: Vec<Membership> = self
            .groups
            .iter()
            .map(|g| g.membership_reaching(subject, reach))
            .collect();
        let search_path = self.resolved_search_path(subject);
        if classification.statements.is_empty() {
            return Decision {
                action: Action::Allow,
                rule: "empty-query".into(),
                reasons: vec!["the string holds no statement".into()],
                shadow: Vec::new(),
                reusable: true,
            };
        }
        let mut combined: Option<(Action, String)> = None;
        let mut reasons = Vec::with_capacity(classification.statements.len());
        let mut shadow: Vec<ShadowHit> = Vec::new();
        let mut reusable = true;
        for (i, statement) in classification.statements.iter().enumerate() {
            let verdict = self.decide_statement(
                &membership,
                search_path.as_deref(),
                statement,
                estimator,
                now,
            );
            reusable &= verdict.reusable;
            for hit in &verdict.shadow {
                reasons.push(format!(
                    "statement {}: rule {} would {} (shadow)",
                    i + 1,
                    hit.rule,
                    hit.would
                ));
            }
            for hit in verdict.shadow.iter().cloned() {
                if !shadow.contains(&hit) {
                    shadow.push(hit);
                }
            }
            reasons.push(format!(
                "statement {} ({}): {} → {} ({})",
                i + 1,
                if statement.verb.is_empty() {
                    "?"
                } else {
                    &statement.verb
                },
                verdict.source,
                verdict.action.name(),
                verdict.why
            ));
            combined = Some(match combined {
                None => (verdict.action, verdict.rule),
                Some((current, rule)) => strictest(current, rule, verdict.action, verdict.rule),
            });
        }
        let (action, rule) = combined.unwrap_or((Action::Allow, "empty-query".into()));
        Decision {
            action,
            rule,
            reasons,
            shadow,
            reusable,
        }
    }

    fn rule_applies(&self, rule: &Rule, membership: &[Membership]) -> bool {
        let m = if rule.groups.is_empty() {
            Membership::Yes
        } else {
            rule.groups
                .iter()
                .map(|g| membership.get(*g).copied().unwrap_or(Membership::No))
                .max()
                .unwrap_or(Membership::No)
        };
        m == Membership::Yes || (m == Membership::Maybe && rule.action.restricts())
    }

    /// The schemas an unqualified name may resolve to for `subject`; `None`
    /// (any schema) when the path names `$user` and the user is unknown.
    fn resolved_search_path(&self, subject: &Subject) -> Option<Vec<String>> {
        self.search_path
            .iter()
            .map(|s| {
                if s == "$user" {
                    subject.user.clone()
                } else {
                    Some(s.clone())
                }
            })
            .collect()
    }

    fn decide_statement(
        &self,
        membership: &[Membership],
        search_path: Option<&[String]>,
        statement: &StatementFacts,
        estimator: &dyn RowEstimator,
        now: OffsetDateTime,
    ) -> StatementRuling {
        let mut reusable = true;
        let mut shadow = Vec::new();
        for rule in &self.rules {
            if !self.rule_applies(rule, membership) {
                continue;
            }
            let Some(mut why) = self.static_match(rule, statement, search_path) else {
                continue;
            };
            if let Some(window) = &rule.time {
                reusable = false;
                if !window.contains(now) {
                    continue;
                }
                why.push("inside the rule's time window".into());
            }
            if let Some(limit) = rule.estimated_rows_above {
                reusable = false;
                match estimator.estimate_rows(statement) {
                    Ok(rows) if rows > limit => {
                        why.push(format!("estimated {rows} rows > {limit}"))
                    }
                    Ok(_) => continue,
                    Err(reason) => why.push(format!(
                        "row estimate unavailable ({reason}), counted as above {limit}"
                    )),
                }
            }
            if let Some(limit) = rule.estimated_cost_above {
                reusable = false;
                match estimator.estimate_cost(statement) {
                    Ok(cost) if cost > limit => {
                        why.push(format!("estimated cost {cost:.0} > {limit}"))
                    }
                    Ok(_) => continue,
                    Err(reason) => why.push(format!(
                        "cost estimate unavailable ({reason}), counted as above {limit}"
                    )),
                }
            }
            if let Some(limit) = rule.estimated_share_above {
                // Only writes the gate estimated (it sets `share`); `policy
                // check` and replays have no planner to ask.
                let Some(share) = statement
                    .share
                    .as_ref()
                    .filter(|_| statement.changes_existing_rows())
                else {
                    continue;
                };
                reusable = false;
                match share {
                    RowShare::Estimated { rows, of, relation } => {
                        let fraction = share.fraction().unwrap_or(1.0);
                        if fraction <= limit {
                            continue;
                        }
                        why.push(format!(
                            "the planner estimates it changes {rows} of about {of} rows of {relation} \
                             ({:.0}% > {:.0}%)",
                            fraction * 100.0,
                            limit * 100.0
                        ));
                    }
                    RowShare::Unavailable { reason } => why.push(format!(
                        "no row estimate ({reason}), counted as above {:.0}% of the table",
                        limit * 100.0
                    )),
                }
            }
            if rule.shadow {
                // Recorded, and the next rules decide.
                shadow.push(ShadowHit {
                    rule: rule.name.clone(),
                    would: rule.action.name(),
                });
                continue;
            }
            if why.is_empty() {
                why.push("applies to every statement of this identity".into());
            }
            return StatementRuling {
                action: rule.action.clone(),
                rule: rule.name.clone(),
                shadow,
                source: format!("rule {} (line {})", rule.name, rule.line),
                why: why.join("; "),
                reusable,
            };
        }
        StatementRuling {
            action: self.default.clone(),
            rule: "default".into(),
            shadow,
            source: "default".into(),
            why: "no rule matched".into(),
            reusable,
        }
    }

    /// The conditions that need neither the clock nor the database; `Some`
    /// with the reasons when all of them hold.
    fn static_match(
        &self,
        rule: &Rule,
        s: &StatementFacts,
        search_path: Option<&[String]>,
    ) -> Option<Vec<String>> {
        let mut why = Vec::new();
        if !rule.kinds.is_empty() {
            if !rule.kinds.contains(&s.kind) {
                return None;
            }
            why.push(format!("kind {}", s.kind));
        }
        if !rule.verbs.is_empty() {
            if !rule.verbs.iter().any(|v| s.verb_matches(v)) {
                return None;
            }
            why.push(format!("verb {}", s.verb));
        }
        if !rule.flags.is_empty() {
            if !rule.flags.intersects(s.flags) {
                return None;
            }
            let hit: Vec<&str> = rule
                .flags
                .iter()
                .filter(|f| s.flags.contains(*f))
                .map(|f| f.name())
                .collect();
            why.push(format!("flags {}", hit.join(", ")));
        }
        if !rule.tags.is_empty() {
            let hit = rule.tags.iter().find_map(|t| {
                let (name, patterns) = self.tags.get(*t)?;
                s.tables()
                    .find(|table| patterns.iter().any(|p| p.matches(table, search_path)))
                    .map(|table| format!("touches {table} (tag {name})"))
            })?;
            why.push(hit);
        }
        if !rule.tables.is_empty() {
            let table = s
                .tables()
                .find(|table| rule.tables.iter().any(|p| p.matches(table, search_path)))?;
            why.push(format!("touches {table}"));
        }
        if !rule.functions.is_empty() {
            let f = s
                .functions
                .iter()
                .find(|f| rule.functions.iter().any(|g| g.matches(f)))?;
            why.push(format!("calls {f}"));
        }
        if rule.unsafe_functions {
            let f = s.functions.iter().find(|f| !self.is_safe_function(f))?;
            why.push(format!("calls {f}, which is not on the known-safe list"));
        }
        Some(why)
    }

    /// True when some rule asks for a write's estimated share of its table.
    pub fn wants_row_shares(&self) -> bool {
        self.rules.iter().any(|r| r.estimated_share_above.is_some())
    }

    /// True when the policy's `safe_functions` names this (user) function.
    pub fn lists_safe_function(&self, name: &str) -> bool {
        self.safe_functions.iter().any(|g| g.matches(name))
    }

    fn is_safe_function(&self, name: &str) -> bool {
        is_known_safe_function(name) || self.safe_functions.iter().any(|g| g.matches(name))
    }
}

fn strictest(a: Action, a_rule: String, b: Action, b_rule: String) -> (Action, String) {
    match (a, b) {
        (
            Action::Hold {
                approvals: n,
                reviewer_groups: mut groups,
            },
            Action::Hold {
                approvals: m,
                reviewer_groups: more,
            },
        ) => {
            for g in more {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            (
                Action::Hold {
                    approvals: n.max(m),
                    reviewer_groups: groups,
                },
                a_rule,
            )
        }
        (a, b) if b.strictness() > a.strictness() => (b, b_rule),
        (a, _) => (a, a_rule),
    }
}

/// How strictly the kernel must gate connections of `subject`: `Monitor` only
/// when no statement of theirs could ever be held or denied. Unknown identity
/// fields count against the subject.
///
/// `any_database`: the session's statements may name tables of any
/// database (MySQL), so a group's `databases` cannot settle its membership
/// for the whole connection (each statement is decided with the databases
/// it names).
pub fn needs_gate(policy: &Policy, subject: &Subject, any_database: bool) -> GateMode {
    let reach = if any_database {
        Reach::Anywhere
    } else {
        Reach::Session
    };
    let membership: Vec<Membership> = policy
        .groups
        .iter()
        .map(|g| g.membership_reaching(subject, reach))
        .collect();
    let mut earlier_rule_applies = false;
    // A restricting rule applies to this subject; one could hold a plain read.
    let mut restricted = false;
    let mut reads_restricted = false;
    let risky = |reads_restricted: bool| {
        if reads_restricted {
            GateMode::GateAll
        } else {
            GateMode::GateRisky
        }
    };
    for rule in &policy.rules {
        let m = if rule.groups.is_empty() {
            Membership::Yes
        } else {
            rule.groups
                .iter()
                .map(|g| membership.get(*g).copied().unwrap_or(Membership::No))
                .max()
                .unwrap_or(Membership::No)
        };
        if m == Membership::No {
            continue;
        }
        if rule.action.restricts() {
            let outright = !rule.shadow
                && matches!(rule.action, Action::Deny { .. })
                && rule.matches_every_statement()
                && m == Membership::Yes
                && !earlier_rule_applies;
            if outright {
                return GateMode::Deny;
            }
            restricted = true;
            reads_restricted |= rule.could_match_plain_read();
            continue;
        }
        if m == Membership::Yes && rule.matches_every_statement() {
            // Everything not restricted above is allowed from here on.
            return if restricted {
                risky(reads_restricted)
            } else {
                GateMode::Monitor
            };
        }
        if m == Membership::Yes {
            earlier_rule_applies = true;
        }
    }
    match policy.default {
        Action::Deny { .. } if !earlier_rule_applies && !restricted => GateMode::Deny,
        Action::Deny { .. } | Action::Hold { .. } => GateMode::GateAll,
        Action::Allow | Action::AuditOnly if restricted => risky(reads_restricted),
        Action::Allow | Action::AuditOnly => GateMode::Monitor,
    }
}

#[cfg(test)]
mod tests;
