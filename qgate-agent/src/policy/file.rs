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
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    kinds: Vec<String>,
    #[serde(default)]
    verbs: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    tables: Vec<String>,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    functions: Vec<String>,
    unsafe_functions: Option<bool>,
    estimated_rows_above: Option<i64>,
    estimated_share_above: Option<f64>,
    time: Option<RawTime>,
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

pub(super) fn parse(text: &str) -> Result<Policy, PolicyError> {
    let raw: RawPolicy = toml::from_str(text).map_err(|e| {
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
        PolicyError::Syntax {
            line,
            column,
            message: e.message().trim().to_owned(),
        }
    })?;
    let invalid = |offset: usize, message: String| PolicyError::Invalid {
        line: line_of(text, offset),
        message,
    };

    let mut groups = Vec::new();
    let mut group_index = HashMap::new();
    for (name, spanned) in &raw.groups {
        let at = spanned.span().start;
        let g = spanned.get_ref();
        let client_addrs = g
            .client_addrs
            .iter()
            .map(|c| Cidr::parse(c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(at, format!("group `{name}`: {e}")))?;
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
        let patterns = spanned
            .get_ref()
            .iter()
            .map(|p| TablePattern::parse(p))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(spanned.span().start, format!("tag `{name}`: {e}")))?;
        tag_index.insert(name.clone(), tags.len());
        tags.push((name.clone(), patterns));
    }

    let mut rules = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for spanned in &raw.rules {
        let at = spanned.span().start;
        let line = line_of(text, at);
        let r = spanned.get_ref();
        let fail = |message: String| PolicyError::Invalid {
            line,
            message: format!("rule `{}`: {message}", r.name),
        };
        if r.name.trim().is_empty() {
            return Err(invalid(at, "a rule needs a non-empty `name`".into()));
        }
        if let Some(first) = names.insert(r.name.clone(), line) {
            return Err(fail(format!(
                "name already used by the rule on line {first}"
            )));
        }
        let groups = r
            .groups
            .iter()
            .map(|g| {
                group_index.get(g).copied().ok_or_else(|| {
                    fail(format!(
                        "unknown group `{g}` (define it under [groups.{g}])"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let kinds = r
            .kinds
            .iter()
            .map(|k| {
                Kind::from_name(&k.to_ascii_lowercase()).ok_or_else(|| {
                    fail(format!(
                        "unknown kind `{k}` (one of: {})",
                        Kind::ALL.map(Kind::name).join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let flags = r
            .flags
            .iter()
            .map(|f| {
                Flag::from_name(&f.to_ascii_lowercase()).ok_or_else(|| {
                    fail(format!(
                        "unknown flag `{f}` (one of: {})",
                        Flag::ALL.map(Flag::name).join(", ")
                    ))
                })
            })
            .collect::<Result<Flags, _>>()?;
        let tags = r
            .tags
            .iter()
            .map(|t| {
                tag_index
                    .get(t)
                    .copied()
                    .ok_or_else(|| fail(format!("unknown tag `{t}` (define it under [tags])")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let tables = r
            .tables
            .iter()
            .map(|t| TablePattern::parse(t).map_err(&fail))
            .collect::<Result<Vec<_>, _>>()?;
        let estimated_rows_above = r
            .estimated_rows_above
            .map(|n| u64::try_from(n).map_err(|_| fail("estimated_rows_above must be ≥ 0".into())))
            .transpose()?;
        let estimated_share_above = r
            .estimated_share_above
            .map(|f| {
                if (0.0..=1.0).contains(&f) {
                    Ok(f)
                } else {
                    Err(fail(
                        "estimated_share_above must be between 0 and 1 (a share of the table)"
                            .into(),
                    ))
                }
            })
            .transpose()?;
        let time = r
            .time
            .as_ref()
            .map(|t| TimeWindow::parse(&t.days, &t.from, &t.to).map_err(&fail))
            .transpose()?;
        let action = action(
            &r.action,
            r.approvals,
            r.reviewers.as_deref(),
            r.message.as_deref(),
        )
        .map_err(&fail)?;
        rules.push(Rule {
            name: r.name.clone(),
            line,
            groups,
            kinds,
            verbs: r
                .verbs
                .iter()
                .map(|v| v.trim().to_ascii_uppercase())
                .collect(),
            tags,
            tables,
            flags,
            functions: r
                .functions
                .iter()
                .map(|f| Glob::new(&f.to_lowercase()))
                .collect(),
            unsafe_functions: r.unsafe_functions.unwrap_or(false),
            estimated_rows_above,
            estimated_share_above,
            time,
            action,
        });
    }

    let default = match &raw.default {
        None => Action::Allow,
        Some(spanned) => {
            let d = spanned.get_ref();
            action(
                &d.action,
                d.approvals,
                d.reviewers.as_deref(),
                d.message.as_deref(),
            )
            .map_err(|e| invalid(spanned.span().start, format!("[default]: {e}")))?
        }
    };

    Ok(Policy {
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
    })
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
