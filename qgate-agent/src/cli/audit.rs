//! `qgate-agent audit …`: export captured statements, verify the audit log.
use std::{
    io::{BufWriter, Write},
    path::PathBuf,
    process::ExitCode,
};

use crate::{
    clock::UnixNanos,
    store::{
        export::{self, ExportFormat, TimeRange},
        seal, Store, StoreError, DEFAULT_DB_PATH,
    },
};
use anyhow::Context;

/// Exit status of `audit verify` when the log was tampered with (1 is left
/// for "could not check at all").
pub const EXIT_TAMPERED: u8 = 2;

#[derive(Debug, clap::Subcommand)]
pub enum AuditCommand {
    /// Write one record per captured statement (with its connection's user,
    /// database, application and client address) to standard output.
    Export {
        /// The agent's database.
        #[arg(long, env = "QGATE_DB", default_value = DEFAULT_DB_PATH)]
        db: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Only statements received at or after T (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long, value_name = "T", value_parser = parse_time)]
        since: Option<UnixNanos>,
        /// Only statements received before T (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long, value_name = "T", value_parser = parse_time)]
        until: Option<UnixNanos>,
        /// Only this database user's statements.
        #[arg(long)]
        user: Option<String>,
        /// Only statements in this database.
        #[arg(long)]
        database: Option<String>,
        /// Only statements the agent decided so: allow, deny, hold, none (not
        /// asked), or how their request ended: pending, approved, denied,
        /// expired, withdrawn.
        #[arg(long, value_parser = parse_decision)]
        decision: Option<export::DecisionFilter>,
    },
    /// Check the audit log's hash chain, the captured statements and
    /// connections sealed into it, and the reviewers table. Exits 0 and
    /// prints the counts and the head (last hash) when intact; exits 2
    /// naming the first bad entry or row when anything was edited,
    /// deleted, inserted or reordered.
    Verify {
        /// The agent's database.
        #[arg(long, env = "QGATE_DB", default_value = DEFAULT_DB_PATH)]
        db: PathBuf,
        /// A head seen elsewhere (the agent writes each new one to the
        /// system log): the store must still hold that entry, or its tail
        /// was cut or rolled back.
        #[arg(long, value_name = "HASH")]
        head: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Jsonl,
    /// RFC 4180 CSV with a header row.
    Csv,
}

fn parse_decision(input: &str) -> Result<export::DecisionFilter, String> {
    input.parse()
}

fn parse_time(input: &str) -> Result<UnixNanos, StoreError> {
    crate::clock::parse_human(input).ok_or_else(|| StoreError::BadTime {
        input: input.to_owned(),
    })
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        AuditCommand::Export {
            db,
            format,
            since,
            until,
            user,
            database,
            decision,
        } => {
            if let (Some(since), Some(until)) = (since, until) {
                if since >= until {
                    anyhow::bail!(
                        "--since must come before --until: nothing is received in that range"
                    );
                }
            }
            let store = open(&db)?;
            let format = match format {
                Format::Jsonl => ExportFormat::Jsonl,
                Format::Csv => ExportFormat::Csv,
            };
            let stdout = std::io::stdout().lock();
            let result = export::export_statements(
                store.conn(),
                &export::StatementFilter {
                    range: TimeRange { since, until },
                    user,
                    database,
                    decision,
                    ..Default::default()
                },
                format,
                BufWriter::new(stdout),
            );
            match result {
                Ok(_) => Ok(ExitCode::SUCCESS),
                // `… | head` closed the pipe: the reader has what it wanted.
                Err(StoreError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                    Ok(ExitCode::SUCCESS)
                }
                Err(StoreError::Csv(e)) if is_broken_pipe(&e) => Ok(ExitCode::SUCCESS),
                Err(e) => Err(e).context("exporting statements"),
            }
        }
        AuditCommand::Verify { db, head } => {
            let store = open(&db)?;
            let report = seal::verify_store(store.conn(), head.as_deref())
                .context("reading the audit log")?;
            let mut out = std::io::stdout().lock();
            print_verify(&mut out, &report)?;
            Ok(if report.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_TAMPERED)
            })
        }
    }
}

fn print_verify(out: &mut impl Write, report: &seal::StoreReport) -> std::io::Result<()> {
    let chain = &report.chain;
    match &chain.first_problem {
        None => writeln!(
            out,
            "audit log intact: {} entries, last hash {}",
            chain.entries,
            chain.last_hash.as_deref().unwrap_or("(none)")
        )?,
        Some(tamper) => {
            // The rest trusts the chain: nothing more to say.
            return writeln!(
                out,
                "audit log TAMPERED ({} entries in the table): {tamper}",
                chain.entries
            );
        }
    }
    let seals = &report.seals;
    match &seals.first_problem {
        None => writeln!(
            out,
            "captured rows intact: {} statements and {} connections sealed in {} groups; \
             not sealed yet (the last seconds, or still running): {} statements, {} connections",
            seals.statements_sealed,
            seals.connections_sealed,
            seals.groups,
            seals.statements_unsealed,
            seals.connections_unsealed
        )?,
        Some(problem) => writeln!(out, "captured rows TAMPERED: {problem}")?,
    }
    match &report.reviewers {
        seal::ReviewersCheck::Intact { entry } => writeln!(
            out,
            "reviewers intact: as audit entry {entry} recorded them"
        )?,
        seal::ReviewersCheck::Empty => writeln!(out, "reviewers: none")?,
        seal::ReviewersCheck::NotCovered { entry } => writeln!(
            out,
            "reviewers not covered: audit entry {entry}, their last change, predates reviewer digests"
        )?,
        seal::ReviewersCheck::Changed { entry: Some(entry) } => writeln!(
            out,
            "reviewers TAMPERED: the table is not what audit entry {entry} (qgate's last change) recorded"
        )?,
        seal::ReviewersCheck::Changed { entry: None } => writeln!(
            out,
            "reviewers TAMPERED: reviewers exist that no audit entry records"
        )?,
    }
    match &report.head {
        None => {}
        Some(seal::HeadCheck {
            hash,
            entry: Some(entry),
        }) => writeln!(out, "head {hash}: entry {entry} of this log")?,
        Some(seal::HeadCheck { hash, entry: None }) => writeln!(
            out,
            "head {hash} NOT FOUND: the log was cut or rolled back to before it (or this is another store)"
        )?,
    }
    Ok(())
}

fn open(db: &std::path::Path) -> anyhow::Result<Store> {
    Store::open_existing(db).with_context(|| format!("opening the qgate database {}", db.display()))
}

fn is_broken_pipe(e: &csv::Error) -> bool {
    matches!(e.kind(), csv::ErrorKind::Io(io) if io.kind() == std::io::ErrorKind::BrokenPipe)
}
