//! One module per command group.

mod bench;
mod bgp;
mod group;
mod policy;
mod protect;
mod replay;
mod replicate;
mod vm;

use std::process::ExitCode;

use crate::cli::{BenchCommand, Cli, Command};

/// Exit status for "the input is wrong" (bad policy), as distinct from a failure to run (1).
pub const EXIT_INVALID_INPUT: u8 = 2;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Policy(command) => policy::run(command),
        Command::Vm(command) => vm::run(command),
        Command::Group(command) => group::run(command),
        Command::Bench(BenchCommand::Vm { json, quick }) => bench::vm(json, quick),
        Command::Bench(BenchCommand::Replication {
            json,
            quick,
            throughput_only,
            shared_cpus,
        }) => bench::replication(json, quick, throughput_only, shared_cpus),
        Command::Bench(BenchCommand::Bgp { json, quick }) => bench::bgp(json, quick),
        Command::Bench(BenchCommand::Gateway { json, quick }) => bench::gateway(json, quick),
        Command::Replicate(command) => replicate::receive(command),
        Command::Store(command) => replicate::store(command),
        Command::Replay(command) => replay::run(command),
        Command::Bgp(crate::cli::BgpCommand::Speak(args)) => bgp::speak(args),
    }
}
