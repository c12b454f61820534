//! `qgate-agent`: the command line. Each subcommand lives in `cli/`.
use std::process::ExitCode;

use clap::Parser;
use qgate_agent::cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    cli::init_logging();
    match cli::dispatch(args) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("qgate-agent: {}", cli::error_chain(&err));
            ExitCode::FAILURE
        }
    }
}
