//! `qgate-agent policy check` and `qgate-agent policy validate`.
use std::{io::Read, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use crate::{
    classify::Dialect,
    policy::{
        check::check,
        estimate::{EstimatorConfig, ExplainEstimator},
        NoEstimator, Policy, RowEstimator, Subject,
    },
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
    /// Policy file (default: the shipped default policy).
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
    /// Time limit for one EXPLAIN estimate, in milliseconds.
    #[arg(long = "explain-timeout-ms", default_value_t = 2000)]
    explain_timeout_ms: u64,
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
    let policy = match &args.policy {
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
    let estimator: Box<dyn RowEstimator> = match &args.explain_with {
        Some(conninfo) => Box::new(ExplainEstimator {
            config: EstimatorConfig::from_conninfo(conninfo).context("--explain-with")?,
            timeout: Duration::from_millis(args.explain_timeout_ms),
        }),
        None => Box::new(NoEstimator),
    };
    let report = check(&policy, &subject, &sql, args.dialect, estimator.as_ref());
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(ExitCode::SUCCESS)
}
