//! `cargo xtask`: everything a fresh host needs, then run, test or bench.
//!
//! Every bootstrap step checks before it acts and says what it does, so a
//! second run installs nothing.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod bootstrap;
mod demo;
mod package;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing for building, running and testing (LLVM 22,
    /// rust-src, bpf-linker, bpffs; PostgreSQL 15, Chromium and the other
    /// tools the tests drive).
    Bootstrap,
    /// Install what building and running the agent needs (no database
    /// server or client), build (release) and run the agent with the
    /// shipped configuration.
    Run {
        /// Extra arguments for `qgate-agent run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Bootstrap and run the whole suite: unit, corpus and end-to-end tests.
    Test {
        /// Extra arguments for the test binaries (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build a Debian package of the agent (target/package/qgate_VERSION_ARCH.deb):
    /// the binary, a systemd unit, /etc/qgate/{qgate,policy}.toml as conffiles,
    /// the state directory /var/lib/qgate.
    Package {
        /// Package this binary instead of building a release one.
        #[arg(long)]
        binary: Option<PathBuf>,
    },
    /// A throwaway PostgreSQL with a sample schema, the agent gating it with
    /// the shipped policy, a reviewer: prints the inbox address, the token
    /// and a psql command whose DROP TABLE is held. Ctrl-C removes it all.
    Demo,
    /// Bootstrap, then benchmark qgate against a direct connection and proxies
    /// (release builds; results in target/bench/). Runner options after `--`,
    /// e.g. `-- --only 1,2`.
    Bench {
        /// A short version (about two minutes) for a smoke check.
        #[arg(long)]
        quick: bool,
        /// Options for the runner: --only N,N  --pairs N  --seconds N  --out DIR.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root()?;
    match cli.command {
        Task::Bootstrap => bootstrap::all(),
        Task::Run { args } => {
            bootstrap::build()?;
            cargo(&root, &["build", "--release", "-p", "qgate-agent"])?;
            let agent = root.join("target/release/qgate-agent");
            let status = Command::new(&agent)
                .arg("run")
                .args(&args)
                .status()
                .with_context(|| format!("starting {}", agent.display()))?;
            if !status.success() {
                bail!("qgate-agent exited with {status}");
            }
            Ok(())
        }
        Task::Test { args } => {
            bootstrap::all()?;
            test(&root, &args)
        }
        Task::Demo => {
            bootstrap::all()?;
            cargo(&root, &["build", "--release", "-p", "qgate-agent"])?;
            demo::run(&root)
        }
        Task::Package { binary } => {
            bootstrap::build()?;
            let binary = match binary {
                Some(binary) => binary,
                None => {
                    cargo(&root, &["build", "--release", "-p", "qgate-agent"])?;
                    root.join("target/release/qgate-agent")
                }
            };
            package::build(&root, &binary, &root.join("target/package")).map(|_| ())
        }
        Task::Bench { quick, args } => {
            bootstrap::all()?;
            bench::run(&root, quick, &args)
        }
    }
}

/// Unit and corpus tests of every crate, then the end-to-end tests (root,
/// network namespaces, real PostgreSQL) one at a time: each starts its own
/// cluster and the 2-core machines are the limit. The gate, restart and
/// judgement tests run twice: with the server hook holding (the default)
/// and with the hook off, where the tc programs hold on the wire.
fn test(root: &Path, args: &[String]) -> Result<()> {
    // A full cold run needs several GB under target/; say what there is, so a
    // linker killed by a full disk is not a mystery.
    let _ = Command::new("df")
        .args(["-h", "--output=avail,target"])
        .arg(root)
        .status();
    cargo(root, &["build", "-p", "qgate-agent"])?;
    // The package test installs this one (the debug binary: a release
    // build would add minutes; `cargo xtask package` makes the real one).
    package::build(
        root,
        &root.join("target/debug/qgate-agent"),
        &root.join("target/package"),
    )?;
    let mut unit = vec!["test", "--workspace", "--exclude", "qgate-e2e", "--"];
    unit.extend(args.iter().map(String::as_str));
    cargo(root, &unit)?;
    let mut e2e = vec!["test", "-p", "qgate-e2e", "--", "--test-threads=1"];
    e2e.extend(args.iter().map(String::as_str));
    cargo(root, &e2e)?;
    let mut wire = vec![
        "test",
        "-p",
        "qgate-e2e",
        "--test",
        "gate",
        "--test",
        "restart",
        "--test",
        "judgement",
        "--",
        "--test-threads=1",
    ];
    wire.extend(args.iter().map(String::as_str));
    println!("xtask: the gate, restart and judgement tests again, with the server hook off");
    cargo_env(root, &wire, &[("QGATE_E2E_SERVER_HOOK", "off")])?;
    // Per-session probes: plaintext TCP is then the wire's (proven by the
    // pass above); the hook's own tests prove the sessions it reads.
    let mut per_session = vec![
        "test",
        "-p",
        "qgate-e2e",
        "--test",
        "hook",
        "--",
        "--test-threads=1",
    ];
    per_session.extend(args.iter().map(String::as_str));
    println!("xtask: the server hook tests again, with its probes attached per session");
    cargo_env(
        root,
        &per_session,
        &[("QGATE_E2E_SERVER_HOOK", "per-session")],
    )
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    cargo_env(root, args, &[])
}

fn cargo_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    println!("xtask: cargo {}", args.join(" "));
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root)
        .env("QGATE_AGENT_BIN", root.join("target/debug/qgate-agent"))
        // A full build keeps no incremental state: it doubles the disk a cold
        // run needs and a fresh checkout never reuses it.
        .env(
            "CARGO_INCREMENTAL",
            std::env::var("CARGO_INCREMENTAL").unwrap_or_else(|_| "0".into()),
        )
        .envs(env.iter().copied())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed with {status}", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .context("xtask has no parent directory")
}
