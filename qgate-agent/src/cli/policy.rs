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
    /// Check a policy file; errors name the line. Exits non-zero when invalid.
    Validate {
        /// The policy file (TOML).
        file: PathBuf,
    },
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
        PolicyCommand::Validate { file } => match Policy::from_file(&file) {
            Ok(policy) => {
                println!(
                    "{}: valid, {} rules",
                    file.display(),
                    policy.rule_names().count()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(error) => {
                eprintln!("{}: {error}", file.display());
                Ok(ExitCode::FAILURE)
            }
        },
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
