//! Command-line subcommands, one file per family; `main.rs` wires them.
pub mod requests;
pub mod reviewers;
