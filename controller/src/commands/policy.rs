//! `secondsite policy check|schema|explain`.

use std::path::Path;
use std::process::ExitCode;

use secondsite_policy::{check_file, count, explain, json_schema};

use super::{EXIT_INVALID_INPUT, print_diagnostics};
use crate::cli::PolicyCommand;

/// `policy check|schema|explain` (`policy reload` asks the daemon: `commands::api`).
pub fn run(command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Reload { .. } => unreachable!("dispatched to commands::api"),
        PolicyCommand::Check { files } => {
            let mut failed = false;
            for file in &files {
                failed |= !check_one(file);
            }
            Ok(if failed {
                ExitCode::from(EXIT_INVALID_INPUT)
            } else {
                ExitCode::SUCCESS
            })
        }
        PolicyCommand::Schema => {
            let text = serde_json::to_string_pretty(&json_schema())?;
            outln!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Explain { file } => {
            let report = check_file(&file);
            print_diagnostics(&file, &report);
            match &report.policy {
                Some(policy) => {
                    outln!("{}", explain(policy).trim_end());
                    Ok(ExitCode::SUCCESS)
                }
                None => Ok(ExitCode::from(EXIT_INVALID_INPUT)),
            }
        }
    }
}

/// Checks one file and prints its findings (stderr) and summary (stdout); true when it is valid.
fn check_one(file: &Path) -> bool {
    let report = check_file(file);
    print_diagnostics(file, &report);
    let name = file.display();
    let warnings = match report.warning_count() {
        0 => String::new(),
        n => format!(", {}", count(n, "warning")),
    };
    match &report.policy {
        Some(policy) => {
            let vms: usize = policy.groups.iter().map(|g| g.vms.len()).sum();
            outln!(
                "{name}: ok: {}, {}, {}, {}{warnings}",
                count(policy.sites.len(), "site"),
                count(policy.prefixes.len(), "prefix"),
                count(policy.groups.len(), "group"),
                count(vms, "VM")
            );
            true
        }
        None => {
            eprintln!("{name}: {}{warnings}", count(report.error_count(), "error"));
            false
        }
    }
}
