//! `qgate-agent`: the command line. Each subcommand lives in `cli/`.
use std::process::ExitCode;

use clap::Parser;
use qgate_agent::cli;

/// mimalloc: the capture thread allocates what the store thread frees
/// (statement texts, batches of records), which glibc's malloc serves under
/// its arena locks; a quarter of the store thread's samples were glibc's
/// malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
