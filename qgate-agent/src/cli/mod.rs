//! The command line: parsing and dispatch, one file per command group.
//! `main.rs` only calls [`dispatch`]. Errors here are `anyhow`: this is the
//! program's edge, where they become messages for a person.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod audit;
pub mod doctor;
pub mod policy;
pub mod requests;
pub mod reviewers;
mod run;
pub mod suggest;

#[derive(Parser)]
#[command(
    name = "qgate-agent",
    version,
    about = "Query-level approval for PostgreSQL, in the kernel"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach to the database interfaces and run the pipeline.
    Run(run::RunArgs),
    /// Decode and store a pcap/pcapng capture instead of live traffic.
    Replay(run::ReplayArgs),
    /// Check statements against a policy; validate policy files.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Export and verify the audit trail.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Held statements: list, show, approve, deny, watch (through the API).
    #[command(subcommand)]
    Requests(requests::RequestsCommand),
    /// Reviewers and their tokens (directly on the store).
    #[command(subcommand)]
    Reviewers(reviewers::ReviewersCommand),
    /// Check what the agent needs on this host (kernel, bpffs, uprobes,
    /// privileges, the PostgreSQL servers it would gate, policy, store, API
    /// address): one line each, how to fix what is wrong; exits 1 when
    /// something would stop a start. Takes `run`'s options.
    Doctor(doctor::DoctorArgs),
}

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    if !matches!(cli.command, Command::Run(_)) {
        // The offline tools end quietly when their reader goes away
        // (`… | head`), as other command-line tools do. (Not the agent: it
        // writes to sockets, where a closed peer must be an error, not a
        // signal that ends it.)
        // SAFETY: restoring a signal's default disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    match cli.command {
        Command::Run(args) => run::run(args),
        Command::Replay(args) => run::replay(args),
        Command::Policy(cmd) => policy::run(cmd),
        Command::Audit(cmd) => audit::run(cmd),
        Command::Requests(cmd) => requests::run(cmd),
        Command::Reviewers(cmd) => reviewers::run(cmd),
        Command::Doctor(args) => doctor::run(args),
    }
}

/// An error and its causes on one line, each cause once: errors here
/// often quote their source in their own message (`opening P: …`), and the
/// source's own text would then follow a second time.
pub fn error_chain(err: &anyhow::Error) -> String {
    let mut line = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            line.push_str(": ");
            line.push_str(&cause);
        }
    }
    line
}

/// Logs to stderr (the journal under systemd); `RUST_LOG` filters.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// `7d`, `12h`, `30m`, `45s` as seconds (a positive count).
pub(crate) fn parse_duration_s(text: &str) -> Result<i64, String> {
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let n: i64 = number
        .parse()
        .map_err(|_| format!("expected a number and d, h, m or s (7d, 12h, 30m), got {text:?}"))?;
    let unit = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "expected d, h, m or s after the number, got {text:?}"
            ))
        }
    };
    n.checked_mul(unit)
        .filter(|s| *s > 0)
        .ok_or_else(|| format!("{text:?} is out of range"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_cause_is_said_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("opening /x: {source}")]
        struct Open {
            source: std::io::Error,
        }
        let err = anyhow::Error::new(Open {
            source: std::io::Error::other("no such file"),
        })
        .context("reading the store");
        assert_eq!(
            super::error_chain(&err),
            "reading the store: opening /x: no such file"
        );
    }
}
