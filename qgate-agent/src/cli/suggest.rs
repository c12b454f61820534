//! `qgate-agent policy suggest`: a policy proposed from the traffic the
//! store recorded — the shipped default's rules, plus groups for the
//! database users seen, the functions seen in reads (commented out: making
//! a function safe is the DBA's call), a `sensitive` tag for tables whose
//! name or a column read from them looks sensitive, a rule holding reads
//! of them, and over each rule how many of the recorded statements it would
//! have held. The output is TOML the DBA edits; `policy validate` accepts
//! it as it is.
use std::collections::{BTreeMap, BTreeSet};

use crate::{
    classify::{classify, Dialect, Kind},
    policy::{Policy, Subject, DEFAULT_POLICY},
    store::Store,
};

/// Words that make a table or column look sensitive.
const SENSITIVE: &[&str] = &[
    "ssn", "salary", "salaries", "password", "passwd", "card", "credit", "secret", "token", "iban",
    "dob", "birth",
];

/// Distinct statements read at most (a workload of literal-laden texts
/// would otherwise be read whole).
const MAX_TEXTS: usize = 20_000;

/// What the store recorded since `since` (Unix ns), as a proposed policy.
pub fn suggest(store: &Store, since: i64) -> anyhow::Result<String> {
    let conn = store.conn();
    // Distinct (user, database, application, client, text), with counts.
    let mut stmt = conn.prepare(&format!(
        "SELECT c.user, c.database, c.application, c.client_addr, s.text, count(*)
         FROM {} s JOIN connections c ON c.id = s.connection_id
         GROUP BY 1, 2, 3, 4, 5 ORDER BY count(*) DESC LIMIT ?2",
        crate::store::pages::statement_source("?1", "9223372036854775807", "-1")
    ))?;
    type Row = (
        Option<String>,
        Option<String>,
        Option<String>,
        String,
        String,
        i64,
    );
    let rows: Vec<Row> = stmt
        .query_map(rusqlite::params![since, MAX_TEXTS as i64], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut users: BTreeMap<String, i64> = BTreeMap::new();
    let mut applications: BTreeSet<String> = BTreeSet::new();
    let mut read_functions: BTreeMap<String, i64> = BTreeMap::new();
    let mut sensitive: BTreeSet<String> = BTreeSet::new();
    let mut total = 0i64;
    for (user, _, application, _, text, n) in &rows {
        total += n;
        if let Some(user) = user {
            *users.entry(user.clone()).or_default() += n;
        }
        if let Some(app) = application.as_ref().filter(|a| !a.is_empty()) {
            applications.insert(app.clone());
        }
        let lower = text.to_lowercase();
        for facts in classify(text, Dialect::Postgresql).statements {
            if facts.kind == Kind::Read {
                for f in &facts.functions {
                    if !crate::classify::is_known_safe_function(f) {
                        *read_functions.entry(f.clone()).or_default() += n;
                    }
                }
            }
            for table in facts.tables_read.iter().chain(&facts.tables_written) {
                let name = table.to_string();
                let named = SENSITIVE.iter().any(|w| name.to_lowercase().contains(w));
                let column =
                    facts.kind == Kind::Read && SENSITIVE.iter().any(|w| mentions_word(&lower, w));
                if named || column {
                    sensitive.insert(name);
                }
            }
        }
    }
    let mut out = String::new();
    let since_text = crate::clock::rfc3339_or_number(since);
    out.push_str(&format!(
        "# Proposed by `qgate-agent policy suggest` from {total} statements recorded since \
         {since_text}\n# ({} distinct). Read it, edit it, then check it with `qgate-agent policy \
         validate`.\n#\n",
        rows.len()
    ));
    if !applications.is_empty() {
        let apps: Vec<&str> = applications.iter().map(String::as_str).take(20).collect();
        out.push_str(&format!("# Applications seen: {}\n#\n", apps.join(", ")));
    }
    // The shipped default, whose rules the counts below are for.
    out.push_str(DEFAULT_POLICY);
    out.push_str("\n# ---- suggested from the traffic ----\n\n");
    if !read_functions.is_empty() {
        out.push_str(
            "# Functions called in reads that qgate does not know to be harmless, with how \
             often.\n# Reads calling them are held (`function-not-known-safe`). Uncomment the \
             ones you know\n# only read:\n",
        );
        let list: Vec<String> = read_functions
            .iter()
            .take(40)
            .map(|(f, n)| format!("\"{}\"", f.replace('"', "")) + &format!(" # {n}"))
            .collect();
        out.push_str("# safe_functions = [\n");
        for item in list {
            out.push_str(&format!("#   {item},\n"));
        }
        out.push_str("# ]\n\n");
    }
    let mut names = BTreeSet::new();
    for (user, n) in users.iter().take(20) {
        let mut name = group_name(user);
        while !names.insert(name.clone()) {
            name.push('_');
        }
        out.push_str(&format!(
            "# {n} statements.\n[groups.{name}]\nusers = [{}]\n\n",
            toml_string(user)
        ));
    }
    if !sensitive.is_empty() {
        out.push_str(
            "# Tables whose name, or a column read from them, looks sensitive (ssn, salary,\n\
             # password, card …):\n[tags]\nsensitive = [",
        );
        let list: Vec<String> = sensitive.iter().map(|t| toml_string(t)).collect();
        out.push_str(&list.join(", "));
        out.push_str("]\n\n");
        out.push_str(
            "[[rules]]\nname = \"sensitive-reads\"\n# Reads of sensitive tables wait for a \
             reviewer (add an allow rule above it for\n# the groups that may read them).\n\
             tags = [\"sensitive\"]\nkinds = [\"read\"]\naction = \"hold\"\nreviewers = \
             [\"reviewers\"]\n",
        );
    }
    // How many of the recorded statements each rule would have held.
    let policy = Policy::from_toml(&out)
        .map_err(|e| anyhow::anyhow!("the proposed policy does not validate: {e}"))?;
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    for (user, database, application, client, text, n) in &rows {
        let subject = Subject {
            user: user.clone(),
            database: database.clone(),
            client_addr: client.parse().ok(),
            application: application.clone(),
        };
        let decision = policy.decide(
            &subject,
            &classify(text, Dialect::Postgresql),
            &crate::policy::NoEstimator,
        );
        if decision.action.restricts() {
            *held.entry(decision.rule.clone()).or_default() += n;
        }
    }
    out.push_str(&format!(
        "\n# Over the {total} statements recorded, this policy would have held or denied:\n"
    ));
    if held.is_empty() {
        out.push_str("#   none\n");
    }
    for (rule, n) in &held {
        out.push_str(&format!("#   {n:>8}  by rule {rule}\n"));
    }
    Ok(out)
}

/// Whether `word` appears in `text` as a word of its own (or a prefix of
/// one joined by `_`: `card_number`).
fn mentions_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        let boundary = |c: Option<char>| c.is_none_or(|c| !c.is_alphanumeric());
        boundary(before) && (boundary(after) || after == Some('_'))
    })
}

/// A group name from a user name: letters, digits and `_` only.
fn group_name(user: &str) -> String {
    let clean: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("user_{clean}")
}

fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}
