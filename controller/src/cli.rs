//! Command-line arguments.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// secondsite: disaster recovery for whole servers, by continuous VM checkpoints and BGP.
#[derive(Debug, Parser)]
#[command(name = "secondsite", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check, explain and describe policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files: one summary line per good file; every error as FILE:LINE:COL and
    /// exit status 2 if any file has errors. Warnings do not change the exit status.
    Check {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON Schema (draft 2020-12) of the policy format.
    Schema,
    /// Describe a policy in plain words: announcements, failure detection, bandwidth budgets.
    Explain {
        /// The policy file.
        file: PathBuf,
    },
}
