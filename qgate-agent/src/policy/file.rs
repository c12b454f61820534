//! Reading a policy file: TOML → checked [`Policy`], every error naming its line.
use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use toml::Spanned;

use super::{
    pattern::{Cidr, Glob, TablePattern},
    Action, Group, Policy, PolicyError, Rule, TimeWindow,
};
use crate::classify::{Flag, Flags, Kind};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<RawAction>>,
    /// Every hold/deny rule decides in shadow (see `RawRule::shadow`).
    #[serde(default)]
    shadow: bool,
    #[serde(default)]
    safe_functions: Vec<String>,
    search_path: Option<Vec<String>>,
    #[serde(default)]
    groups: BTreeMap<String, Spanned<RawGroup>>,
    #[serde(default)]
    tags: BTreeMap<String, Spanned<Vec<String>>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAction {
    action: String,
    approvals: Option<i64>,
    reviewers: Option<Vec<String>>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroup {
    #[serde(default)]
    users: Vec<String>,
    #[serde(default)]
    databases: Vec<String>,
    #[serde(default)]
    client_addrs: Vec<String>,
    #[serde(default)]
    applications: Vec<String>,
    identity_unknown: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    // `None`: the key is absent (no condition). `Some([])` is refused: it
    // reads as "none" but would match everything.
    groups: Option<Vec<String>>,
    kinds: Option<Vec<String>>,
    verbs: Option<Vec<String>>,
    tags: Option<Vec<String>>,
    tables: Option<Vec<String>>,
    flags: Option<Vec<String>>,
    functions: Option<Vec<String>>,
    unsafe_functions: Option<bool>,
    estimated_rows_above: Option<i64>,
    estimated_cost_above: Option<f64>,
    estimated_share_above: Option<f64>,
    time: Option<RawTime>,
    /// Decides and records what it would do (audit `policy.shadow`,
    /// metrics), but lets the statement run.
    #[serde(default)]
    shadow: bool,
    action: String,
    approvals: Option<i64>,
    reviewers: Option<Vec<String>>,
    message: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTime {
    #[serde(default)]
    days: Vec<String>,
    from: String,
    to: String,
}

/// Byte offset → 1-based line number.
fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .unwrap_or(text)
        .bytes()
        .filter(|b| *b == b'\n')
        .count()
        + 1
}

/// A policy that loads but most likely does not say what its author meant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Every problem of a policy file: errors (it does not load) and warnings.
#[derive(Debug, Default)]
pub struct Findings {
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<PolicyWarning>,
}

pub(super) fn parse(text: &str) -> Result<Policy, PolicyError> {
    let (policy, findings) = parse_all(text);
    match (policy, findings.errors.into_iter().next()) {
        (Some(policy), None) => Ok(policy),
        (_, Some(error)) => Err(error),
        (None, None) => Err(PolicyError::Invalid {
            line: 1,
            message: "the policy could not be read".into(),
        }),
    }
}

/// Reads the whole file, collecting every error and warning; the policy
/// only when there is no error.
pub(super) fn parse_all(text: &str) -> (Option<Policy>, Findings) {
    let mut findings = Findings::default();
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let (line, column) = match e.span() {
                Some(span) => {
                    let line = line_of(text, span.start);
                    let line_start = text[..span.start.min(text.len())]
                        .rfind('\n')
                        .map_or(0, |i| i + 1);
                    (line, span.start.saturating_sub(line_start) + 1)
                }
                None => (0, 0),
            };
            findings.errors.push(PolicyError::Syntax {
                line,
                column,
                message: e.message().trim().to_owned(),
            });
            return (None, findings);
        }
    };
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    let invalid = |offset: usize, message: String| PolicyError::Invalid {
        line: line_of(text, offset),
        message,
    };

    let mut groups = Vec::new();
    let mut group_index = HashMap::new();
    for (name, spanned) in &raw.groups {
        let at = spanned.span().start;
        let g = spanned.get_ref();
        let mut client_addrs = Vec::new();
        for c in &g.client_addrs {
            match Cidr::parse(c) {
                Ok(cidr) => client_addrs.push(cidr),
                Err(e) => errors.push(invalid(at, format!("group `{name}`: {e}"))),
            }
        }
        if g.users.is_empty()
            && g.databases.is_empty()
            && g.client_addrs.is_empty()
            && g.applications.is_empty()
            && g.identity_unknown.is_none()
        {
            warnings.push(PolicyWarning {
                line: line_of(text, at),
                message: format!(
                    "group `{name}` has no condition: every identity is in it \
                     (give it users, databases, client_addrs, applications or identity_unknown)"
                ),
            });
        }
        group_index.insert(name.clone(), groups.len());
        groups.push(Group {
            users: g.users.iter().map(|p| Glob::new(p)).collect(),
            databases: g.databases.iter().map(|p| Glob::new(p)).collect(),
            client_addrs,
            applications: g.applications.iter().map(|p| Glob::new(p)).collect(),
            identity_unknown: g.identity_unknown,
        });
    }

    let mut tags = Vec::new();
    let mut tag_index = HashMap::new();
    for (name, spanned) in &raw.tags {
        let mut patterns = Vec::new();
        for p in spanned.get_ref() {
            match TablePattern::parse(p) {
                Ok(pattern) => patterns.push(pattern),
                Err(e) => errors.push(invalid(spanned.span().start, format!("tag `{name}`: {e}"))),
            }
        }
        tag_index.insert(name.clone(), tags.len());
        tags.push((name.clone(), patterns));
    }

    let mut rules = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for spanned in &raw.rules {
        let at = spanned.span().start;
        let line = line_of(text, at);
        let r = spanned.get_ref();
        let before = errors.len();
        let fail = |message: String| PolicyError::Invalid {
            line,
            message: format!("rule `{}`: {message}", r.name),
        };
        if r.name.trim().is_empty() {
            errors.push(invalid(at, "a rule needs a non-empty `name`".into()));
        }
        if let Some(first) = names.insert(r.name.clone(), line) {
            errors.push(fail(format!(
                "name already used by the rule on line {first}"
            )));
        }
        for (key, list, everything) in [
            ("groups", &r.groups, "every identity"),
            ("kinds", &r.kinds, "every kind of statement"),
            ("verbs", &r.verbs, "every verb"),
            ("tags", &r.tags, "every table"),
            ("tables", &r.tables, "every table"),
            ("flags", &r.flags, "statements with or without flags"),
            (
                "functions",
                &r.functions,
                "statements calling any function or none",
            ),
        ] {
            if list.as_ref().is_some_and(Vec::is_empty) {
                errors.push(fail(format!(
                    "`{key} = []` names nothing, which would match {everything}: list what the \
                     rule is for, or leave `{key}` out if it is for {everything}"
                )));
            }
        }
        let list = |l: &Option<Vec<String>>| l.clone().unwrap_or_default();
        let mut rule_groups = Vec::new();
        for g in list(&r.groups) {
            match group_index.get(&g) {
                Some(i) => rule_groups.push(*i),
                None => errors.push(fail(format!(
                    "unknown group `{g}` (define it under [groups.{g}])"
                ))),
            }
        }
        let mut kinds = Vec::new();
        for k in list(&r.kinds) {
            match Kind::from_name(&k.to_ascii_lowercase()) {
                Some(kind) => kinds.push(kind),
                None => errors.push(fail(format!(
                    "unknown kind `{k}` (one of: {})",
                    Kind::ALL.map(Kind::name).join(", ")
                ))),
            }
        }
        let mut flags = Flags::default();
        for f in list(&r.flags) {
            match Flag::from_name(&f.to_ascii_lowercase()) {
                Some(flag) => flags.insert(flag),
                None => errors.push(fail(format!(
                    "unknown flag `{f}` (one of: {})",
                    Flag::ALL.map(Flag::name).join(", ")
                ))),
            }
        }
        let mut rule_tags = Vec::new();
        for t in list(&r.tags) {
            match tag_index.get(&t) {
                Some(i) => rule_tags.push(*i),
                None => errors.push(fail(format!("unknown tag `{t}` (define it under [tags])"))),
            }
        }
        let mut tables = Vec::new();
        for t in list(&r.tables) {
            match TablePattern::parse(&t) {
                Ok(pattern) => tables.push(pattern),
                Err(e) => errors.push(fail(e)),
            }
        }
        let verbs: Vec<String> = list(&r.verbs)
            .iter()
            .map(|v| {
                v.split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .to_ascii_uppercase()
            })
            .collect();
        for v in &verbs {
            if let Err(e) = super::verbs::check(v) {
                errors.push(fail(e));
            }
        }
        if !kinds.is_empty() && !verbs.is_empty() {
            let possible = verbs
                .iter()
                .any(|v| super::verbs::kinds_of(v).iter().any(|k| kinds.contains(k)));
            if !possible {
                warnings.push(PolicyWarning {
                    line,
                    message: format!(
                        "rule `{}` can never match: no statement with verb {} is of kind {} \
                         (drop `kinds` or `verbs`, or fix one of them)",
                        r.name,
                        verbs.join("/"),
                        kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join("/"),
                    ),
                });
            }
        }
        let estimated_rows_above = match r.estimated_rows_above.map(u64::try_from) {
            Some(Ok(n)) => Some(n),
            Some(Err(_)) => {
                errors.push(fail("estimated_rows_above must be ≥ 0".into()));
                None
            }
            None => None,
        };
        let estimated_cost_above = match r.estimated_cost_above {
            Some(c) if c.is_finite() && c >= 0.0 => Some(c),
            Some(_) => {
                errors.push(fail(
                    "estimated_cost_above must be a number ≥ 0 (PostgreSQL's total cost)".into(),
                ));
                None
            }
            None => None,
        };
        let estimated_share_above = match r.estimated_share_above {
            Some(f) if (0.0..=1.0).contains(&f) => Some(f),
            Some(_) => {
                errors.push(fail(
                    "estimated_share_above must be between 0 and 1 (a share of the table)".into(),
                ));
                None
            }
            None => None,
        };
        let time = match r
            .time
            .as_ref()
            .map(|t| TimeWindow::parse(&t.days, &t.from, &t.to))
        {
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                errors.push(fail(e));
                None
            }
            None => None,
        };
        let action = match action(
            &r.action,
            r.approvals,
            r.reviewers.as_deref(),
            r.message.as_deref(),
        ) {
            Ok(action) => action,
            Err(e) => {
                errors.push(fail(e));
                continue;
            }
        };
        if errors.len() > before {
            continue;
        }
        rules.push(Rule {
            name: r.name.clone(),
            line,
            groups: rule_groups,
            kinds,
            verbs,
            tags: rule_tags,
            tables,
            flags,
            functions: list(&r.functions)
                .iter()
                .map(|f| Glob::new(&f.to_lowercase()))
                .collect(),
            unsafe_functions: r.unsafe_functions.unwrap_or(false),
            estimated_rows_above,
            estimated_cost_above,
            estimated_share_above,
            time,
            shadow: (r.shadow || raw.shadow) && action.restricts(),
            action,
        });
    }
    // A rule after one that matches everything it would never decides.
    for (i, later) in rules.iter().enumerate() {
        if let Some(earlier) = rules[..i].iter().find(|e| e.covers(later)) {
            warnings.push(PolicyWarning {
                line: later.line,
                message: format!(
                    "rule `{}` is never reached: rule `{}` (line {}) matches every statement \
                     it would and comes first (move it above, or narrow the earlier one)",
                    later.name, earlier.name, earlier.line
                ),
            });
        }
    }

    let mut missing_default = None;
    let default = match &raw.default {
        None => {
            missing_default = Some(PolicyError::Invalid {
                line: 1,
                message: "no [default]: say what happens to a statement no rule matches, e.g. \
                          `[default]` then `action = \"allow\"` (or \"hold\", \"deny\")"
                    .into(),
            });
            Action::Allow
        }
        Some(spanned) => {
            let d = spanned.get_ref();
            match action(
                &d.action,
                d.approvals,
                d.reviewers.as_deref(),
                d.message.as_deref(),
            ) {
                Ok(action) => action,
                Err(e) => {
                    errors.push(invalid(spanned.span().start, format!("[default]: {e}")));
                    Action::Allow
                }
            }
        }
    };
    errors.sort_by_key(|e| e.line().unwrap_or(0));
    // Last: the other errors say more about what to fix first.
    errors.extend(missing_default);
    warnings.sort_by_key(|w| w.line);
    findings.errors = errors;
    findings.warnings = warnings;
    if !findings.errors.is_empty() {
        return (None, findings);
    }
    let policy = Policy {
        groups,
        tags,
        rules,
        default,
        safe_functions: raw
            .safe_functions
            .iter()
            .map(|f| Glob::new(&f.to_lowercase()))
            .collect(),
        search_path: match raw.search_path {
            None => super::default_search_path(),
            Some(path) => path
                .iter()
                .map(|s| {
                    let s = s.trim();
                    match s.strip_prefix('"').and_then(|q| q.strip_suffix('"')) {
                        Some(quoted) => quoted.to_owned(),
                        None => s.to_lowercase(),
                    }
                })
                .collect(),
        },
    };
    (Some(policy), findings)
}

/// Reviewer group named by hold rules that do not name one.
pub const DEFAULT_REVIEWERS: &str = "reviewers";

fn action(
    name: &str,
    approvals: Option<i64>,
    reviewers: Option<&[String]>,
    message: Option<&str>,
) -> Result<Action, String> {
    let not_for = |what: &str| format!("`{what}` only applies to action \"hold\"");
    match name {
        "allow" | "audit-only" | "deny" => {
            if approvals.is_some() {
                return Err(not_for("approvals"));
            }
            if reviewers.is_some() {
                return Err(not_for("reviewers"));
            }
            Ok(match name {
                "allow" => {
                    if message.is_some() {
                        return Err("`message` only applies to action \"deny\"".into());
                    }
                    Action::Allow
                }
                "audit-only" => Action::AuditOnly,
                _ => Action::Deny {
                    message: message
                        .unwrap_or("statement denied by qgate policy")
                        .to_owned(),
                },
            })
        }
        "hold" => {
            let approvals = approvals.unwrap_or(1);
            let approvals = u32::try_from(approvals)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("approvals must be at least 1, not {approvals}"))?;
            let reviewer_groups = match reviewers {
                None => vec![DEFAULT_REVIEWERS.to_owned()],
                Some([]) => return Err("reviewers must name at least one group".into()),
                Some(list) => list.to_vec(),
            };
            Ok(Action::Hold {
                approvals,
                reviewer_groups,
            })
        }
        other => Err(format!(
            "unknown action `{other}` (one of: allow, hold, deny, audit-only)"
        )),
    }
}
