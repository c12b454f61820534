//! `qgate-agent reviewers add|list|revoke`: works directly on the SQLite
//! store, so it works while the agent runs (WAL, busy timeout) and needs no token.
use std::{io::Write, path::PathBuf, process::ExitCode};

use anyhow::Context;

use crate::{
    api::DEFAULT_STORE_PATH,
    store::requests::{self as store, NewReviewer, Reviewer, Role},
};

#[derive(Debug, clap::Subcommand)]
pub enum ReviewersCommand {
    /// Add a reviewer and print its API token (shown once; only its hash is stored).
    Add {
        name: String,
        /// Groups whose rules this reviewer decides (comma-separated).
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// reviewer: decides its groups' requests; admin: may also force-approve; auditor: reads only.
        #[arg(long, default_value = "reviewer", value_parser = parse_role)]
        role: Role,
        /// DB users this reviewer is (comma-separated): they can never
        /// approve those users' statements, nor one whose user is unknown.
        /// Default: the DB user of the reviewer's own name (peer review:
        /// alice never approves what the database user alice sent).
        #[arg(
            long = "db-users",
            value_delimiter = ',',
            conflicts_with = "no_db_user"
        )]
        db_users: Vec<String>,
        /// This reviewer is no database user at all: linked to none, so no
        /// statement counts as theirs. Must be said explicitly.
        #[arg(long = "no-db-user")]
        no_db_user: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List reviewers (revoked ones included).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a reviewer's token.
    Revoke {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// The agent's SQLite store.
    #[arg(long, env = "QGATE_DB", default_value = DEFAULT_STORE_PATH)]
    pub db: PathBuf,
    /// Print JSON for scripts.
    #[arg(long)]
    pub json: bool,
}

fn parse_role(text: &str) -> Result<Role, String> {
    Role::parse(text)
        .ok_or_else(|| format!("{text:?} is not a role: use reviewer, admin or auditor"))
}

pub fn run(cmd: ReviewersCommand) -> anyhow::Result<ExitCode> {
    execute(cmd, &mut std::io::stdout().lock())
}

/// [`run`] with its output going to `out`.
pub fn execute(cmd: ReviewersCommand, out: &mut dyn Write) -> anyhow::Result<ExitCode> {
    match cmd {
        ReviewersCommand::Add {
            name,
            groups,
            role,
            db_users,
            no_db_user,
            store: args,
        } => {
            let mut conn = open(&args.db)?;
            let clean = |v: Vec<String>| -> Vec<String> {
                v.into_iter()
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            };
            let db_users = match (no_db_user, clean(db_users)) {
                (true, _) => Vec::new(),
                (false, named) if named.is_empty() => vec![name.trim().to_owned()],
                (false, named) => named,
            };
            let (reviewer, token) = store::add_reviewer(
                &mut conn,
                &NewReviewer {
                    name,
                    role,
                    groups: clean(groups),
                    db_users,
                },
            )?;
            if args.json {
                let mut value = serde_json::to_value(&reviewer)?;
                value["token"] = token.into();
                writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
            } else {
                writeln!(
                    out,
                    "added {} ({}; groups {}; DB users {})",
                    reviewer.name,
                    reviewer.role.as_str(),
                    list_or_dash(&reviewer.groups),
                    db_users_shown(&reviewer.db_users)
                )?;
                writeln!(out, "token: {token}")?;
                writeln!(out, "(shown once: qgate keeps only its hash)")?;
            }
        }
        ReviewersCommand::List { store: args } => {
            let reviewers = store::list_reviewers(&open(&args.db)?)?;
            if args.json {
                writeln!(out, "{}", serde_json::to_string_pretty(&reviewers)?)?;
            } else {
                write_table(out, &reviewers)?;
            }
        }
        ReviewersCommand::Revoke { name, store: args } => {
            store::revoke_reviewer(&mut open(&args.db)?, &name)?;
            if args.json {
                writeln!(
                    out,
                    "{}",
                    serde_json::json!({ "name": name, "revoked": true })
                )?;
            } else {
                writeln!(out, "revoked {name}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn open(db: &std::path::Path) -> anyhow::Result<rusqlite::Connection> {
    store::open_db(db).with_context(|| format!("opening the store {}", db.display()))
}

fn list_or_dash(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// A reviewer's link to database users, as the CLI shows it.
fn db_users_shown(db_users: &[String]) -> String {
    if db_users.is_empty() {
        "none (--no-db-user)".to_owned()
    } else {
        db_users.join(",")
    }
}

fn write_table(out: &mut dyn Write, reviewers: &[Reviewer]) -> std::io::Result<()> {
    let rows: Vec<[String; 6]> = reviewers
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.role.as_str().to_owned(),
                list_or_dash(&r.groups),
                db_users_shown(&r.db_users),
                r.created_at.clone(),
                r.revoked_at.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    super::requests::write_columns(
        out,
        &["NAME", "ROLE", "GROUPS", "DB USERS", "CREATED", "REVOKED"],
        &rows,
    )
}
