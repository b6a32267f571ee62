//! # secondsite
//!
//! The site daemon and command-line tool of secondsite. For now it serves the policy verbs:
//!
//! ```text
//! secondsite policy check FILE...   every error as FILE:LINE:COL: message; exit 2 on errors
//! secondsite policy schema          the policy's JSON Schema, for editors
//! secondsite policy explain FILE    the policy in plain words
//! ```
//!
//! `cli` holds the argument definitions; `commands/` one module per command group, each a thin
//! layer over the library crate that does the work.

#![forbid(unsafe_code)]

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("secondsite: {e:#}");
            ExitCode::FAILURE
        }
    }
}
