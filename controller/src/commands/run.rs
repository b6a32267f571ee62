//! `secondsite run --policy FILE --site NAME`: the site daemon (see `secondsite::site::daemon`).

use std::process::ExitCode;

use secondsite::site::daemon::{self, DaemonConfig};

use super::{EXIT_INVALID_INPUT, print_diagnostics};
use crate::cli::RunArgs;

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let report = secondsite_policy::check_file(&args.policy);
    print_diagnostics(&args.policy, &report);
    let Some(policy) = report.policy else {
        return Ok(ExitCode::from(EXIT_INVALID_INPUT));
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = runtime.block_on(daemon::run(DaemonConfig {
        policy,
        policy_file: args.policy,
        site: args.site,
        state_dir: args.state_dir,
    }));
    // Blocking readers (heartbeat sockets end with the runtime): do not wait for them.
    runtime.shutdown_background();
    result.map(|()| ExitCode::SUCCESS)
}
