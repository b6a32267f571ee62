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

/// `println!` for the commands' output: a closed standard output (`secondsite store ls DIR |
/// head`) ends the process quietly, as SIGPIPE ends a Unix tool, instead of a panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

mod cli;
mod commands;
mod output;

use std::process::ExitCode;

use clap::Parser;

/// mimalloc rather than glibc's malloc: a receiver applies each link's epochs on a thread of
/// its own, and glibc keeps what a thread's arena freed (a full epoch's worth of pages) for
/// that arena only, so the process grew by about one full epoch per reconnect; mimalloc gives
/// freed memory back.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
