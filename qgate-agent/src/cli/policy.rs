//! `qgate-agent policy check` and `qgate-agent policy validate`.
use std::{io::Read, net::IpAddr, path::PathBuf, process::ExitCode};

use crate::{
    classify::Dialect,
    config::{Config, PolicyConfig},
    policy::{check::check, Policy, Subject},
};
use anyhow::Context;
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Decide one SQL string as the agent would, and show the rule and the facts.
    Check(CheckArgs),
    /// Check a policy file: every error and warning, each naming its line.
    /// Exits non-zero when the agent would refuse the file.
    Validate {
        /// The policy file (TOML).
        file: PathBuf,
        /// The agent's configuration (default: the built-in one): rules that
        /// need the planner's estimate need its `[policy] estimator`.
        #[arg(long)]
        config: Option<PathBuf>,
        /// The agent's store: warns about reviewer groups no active reviewer
        /// is in (skipped when the file does not exist).
        #[arg(long, env = "QGATE_DB", default_value = crate::api::DEFAULT_STORE_PATH)]
        db: PathBuf,
    },
    /// Propose a policy from the traffic the store recorded: the shipped
    /// default's rules, groups for the users seen, the functions seen in
    /// reads, sensitive-looking tables, and how many recorded statements
    /// each rule would have held. Prints TOML to edit.
    Suggest {
        /// From what happened since this long ago: `14d`, `12h`.
        #[arg(long, default_value = "14d", value_parser = parse_age)]
        since: i64,
        /// The agent's store.
        #[arg(long, env = "QGATE_DB", default_value = crate::api::DEFAULT_STORE_PATH)]
        db: PathBuf,
    },
    /// What each rule did, and what each rule marked `shadow = true` would
    /// have done, from the audit: counts, top statements (by fingerprint)
    /// and users.
    Report {
        /// Only what happened since this long ago: `7d`, `12h`, `30m`.
        #[arg(long, default_value = "7d", value_parser = parse_age)]
        since: i64,
        /// The agent's store.
        #[arg(long, env = "QGATE_DB", default_value = crate::api::DEFAULT_STORE_PATH)]
        db: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `7d`, `12h`, `30m`, `45s` as nanoseconds.
fn parse_age(text: &str) -> Result<i64, String> {
    super::parse_duration_s(text)?
        .checked_mul(1_000_000_000)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

#[derive(Args)]
pub struct CheckArgs {
    /// The agent's configuration: decide with its `[policy]` file and
    /// estimator, as the running agent would (the flags below override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Policy file (default: the configuration's, else the shipped default policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Database user of the connection.
    #[arg(long)]
    user: Option<String>,
    /// Database name of the connection.
    #[arg(long)]
    database: Option<String>,
    /// Client address of the connection.
    #[arg(long = "client-addr")]
    client_addr: Option<IpAddr>,
    /// application_name of the connection.
    #[arg(long)]
    application: Option<String>,
    /// SQL dialect: postgresql or mysql.
    #[arg(long, default_value = "postgresql")]
    dialect: Dialect,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Answer `estimated_rows_above` with EXPLAIN over this read-only
    /// connection ("host=… port=… user=… dbname=…"). Without it, estimates
    /// are unavailable and such conditions count as exceeded. The user needs
    /// the privileges of the statements it plans (PostgreSQL checks them for
    /// EXPLAIN too); its transactions are read only, so nothing runs.
    #[arg(long = "explain-with")]
    explain_with: Option<String>,
    /// Time limit for one EXPLAIN estimate, in milliseconds (default: the
    /// configuration's `estimator_timeout_ms`, 2000).
    #[arg(long = "explain-timeout-ms")]
    explain_timeout_ms: Option<u64>,
    /// The SQL string, or `-` to read it from standard input.
    sql: String,
}

pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Check(args) => run_check(args),
        PolicyCommand::Validate { file, config, db } => validate(&file, config.as_deref(), &db),
        PolicyCommand::Report { since, db, json } => report(&db, since, json),
        PolicyCommand::Suggest { since, db } => {
            let store = crate::store::Store::open_existing(&db)
                .with_context(|| format!("opening the qgate database {}", db.display()))?;
            let text = super::suggest::suggest(&store, crate::clock::now() - since)?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// One rule's line in `policy report`.
#[derive(serde::Serialize, Default)]
struct RuleReport {
    rule: String,
    /// Statements it decided, by decision (`allow`, `deny`, `hold`).
    decided: std::collections::BTreeMap<String, i64>,
    /// Statements it would have held or denied in shadow, by action.
    would: std::collections::BTreeMap<String, i64>,
    /// The statements it matched most often in shadow (fingerprints), with counts.
    top_statements: Vec<(String, i64)>,
    /// The users it matched in shadow, with counts.
    users: Vec<(String, i64)>,
}

/// `policy report`: per rule, from the store.
fn report(db: &std::path::Path, since_ago: i64, json: bool) -> anyhow::Result<ExitCode> {
    use std::io::Write;
    let store = crate::store::Store::open_existing(db)
        .with_context(|| format!("opening the qgate database {}", db.display()))?;
    let conn = store.conn();
    let since = crate::clock::now() - since_ago;
    let mut rules: std::collections::BTreeMap<String, RuleReport> = Default::default();
    fn entry<'r>(
        rules: &'r mut std::collections::BTreeMap<String, RuleReport>,
        rule: &str,
    ) -> &'r mut RuleReport {
        rules.entry(rule.to_owned()).or_insert_with(|| RuleReport {
            rule: rule.to_owned(),
            ..RuleReport::default()
        })
    }
    {
        let mut stmt = conn.prepare(&format!(
            "SELECT rule, decision, count(*) FROM {}
             WHERE rule IS NOT NULL GROUP BY rule, decision",
            crate::store::pages::statement_source("?1", "9223372036854775807", "-1")
        ))?;
        let mut rows = stmt.query([since])?;
        while let Some(row) = rows.next()? {
            let (rule, decision, n): (String, Option<String>, i64) =
                (row.get(0)?, row.get(1)?, row.get(2)?);
            entry(&mut rules, &rule)
                .decided
                .insert(decision.unwrap_or_else(|| "none".into()), n);
        }
    }
    let shadow = |key: &str| {
        format!(
            "SELECT json_extract(details, '$.rule'), {key}, count(*) FROM audit
             WHERE kind = 'policy.shadow' AND at >= ?1
             GROUP BY 1, 2 ORDER BY 1, count(*) DESC"
        )
    };
    for (key, which) in [
        ("json_extract(details, '$.would')", 0),
        ("coalesce(json_extract(details, '$.fingerprint'), json_extract(details, '$.statement'))", 1),
        ("coalesce(json_extract(details, '$.user'), '(unknown)')", 2),
    ] {
        let mut stmt = conn.prepare(&shadow(key))?;
        let mut rows = stmt.query([since])?;
        while let Some(row) = rows.next()? {
            let (rule, value, n): (String, String, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
            let r = entry(&mut rules, &rule);
            match which {
                0 => {
                    r.would.insert(value, n);
                }
                1 if r.top_statements.len() < 5 => r.top_statements.push((value, n)),
                2 if r.users.len() < 10 => r.users.push((value, n)),
                _ => {}
            }
        }
    }
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "since_ns": since,
                "rules": rules.values().collect::<Vec<_>>(),
            }))?
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    if rules.is_empty() {
        writeln!(
            out,
            "no rule decided anything, in force or in shadow, in that time"
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    for r in rules.values() {
        let list = |m: &std::collections::BTreeMap<String, i64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(out, "rule {}", r.rule)?;
        if !r.decided.is_empty() {
            writeln!(out, "  decided:      {}", list(&r.decided))?;
        }
        if !r.would.is_empty() {
            writeln!(out, "  would have (shadow): {}", list(&r.would))?;
            for (text, n) in &r.top_statements {
                writeln!(out, "    {n:>6}  {text}")?;
            }
            let users: Vec<String> = r.users.iter().map(|(u, n)| format!("{u} {n}")).collect();
            writeln!(out, "  users:        {}", users.join(", "))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `policy validate`: every problem, errors first, then a one-line verdict.
fn validate(
    file: &std::path::Path,
    config: Option<&std::path::Path>,
    db: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let name = file.display();
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{name}: cannot read it: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let (policy, mut findings) = Policy::validate_toml(&text);
    let mut notes = Vec::new();
    if let Some(policy) = &policy {
        match Config::load(config) {
            Ok(config) => {
                if let Err(e) = policy.check_estimator(config.policy.estimator.is_some()) {
                    findings.errors.push(e);
                }
            }
            Err(e) => notes.push(format!("the configuration was not checked against: {e}")),
        }
        if db.is_file() {
            match crate::store::requests::open_db(db)
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(crate::store::requests::list_reviewers(&c)?))
            {
                Ok(reviewers) => {
                    for (group, line) in policy.reviewer_groups() {
                        let staffed = reviewers
                            .iter()
                            .any(|r| r.revoked_at.is_none() && r.groups.contains(&group));
                        if !staffed {
                            findings.warnings.push(crate::policy::PolicyWarning {
                                line: line.max(1),
                                message: format!(
                                    "reviewer group `{group}` has no active reviewer in {}: what \
                                     it must approve waits until it expires (add one: \
                                     qgate-agent reviewers add NAME --groups {group})",
                                    db.display()
                                ),
                            });
                        }
                    }
                }
                Err(e) => notes.push(format!("reviewers not checked: {e}")),
            }
        }
    }
    for error in &findings.errors {
        eprintln!("{name}: error: {error}");
    }
    for warning in &findings.warnings {
        eprintln!("{name}: warning: {warning}");
    }
    for note in &notes {
        eprintln!("{name}: note: {note}");
    }
    match (&policy, findings.errors.len()) {
        (Some(policy), 0) => {
            println!(
                "{name}: valid, {} rules, {} warning(s)",
                policy.rule_names().count(),
                findings.warnings.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        (_, errors) => {
            println!(
                "{name}: invalid: {errors} error(s), {} warning(s); the agent would refuse it",
                findings.warnings.len()
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

fn run_check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let mut settings = match &args.config {
        Some(path) => Config::load(Some(path))?.policy,
        None => PolicyConfig::default(),
    };
    if let Some(path) = &args.policy {
        settings.file = Some(path.clone());
    }
    if let Some(conninfo) = &args.explain_with {
        settings.estimator = Some(conninfo.clone());
    }
    if let Some(millis) = args.explain_timeout_ms {
        settings.estimator_timeout_ms = millis;
    }
    let policy = match &settings.file {
        Some(path) => {
            Policy::from_file(path).with_context(|| format!("policy {}", path.display()))?
        }
        None => Policy::builtin_default(),
    };
    let sql = if args.sql == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading SQL from standard input")?;
        text
    } else {
        args.sql
    };
    let subject = Subject {
        user: args.user,
        database: args.database,
        client_addr: args.client_addr,
        application: args.application,
    };
    let estimator = settings
        .row_estimator()
        .context("the estimator connection (--explain-with or [policy] estimator)")?;
    let report = check(&policy, &subject, &sql, args.dialect, estimator.as_ref());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
